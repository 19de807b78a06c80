//! Gatehouse Auth: certificate authorities, identity encoding, RBAC, storage, audit and the gRPC
//! API. Pure logic (CAs, RBAC, resources, rate limiting) is separate from I/O (storage, server).

pub mod ca;
pub mod identity;
pub mod leaf_trust;
pub mod locks;
pub mod rbac;
pub mod resources;
pub mod role_map;
pub mod template;

/// Generated gRPC types and service stubs (compiled from `proto/` by protox; no system protoc).
#[allow(clippy::all, clippy::pedantic, missing_docs)]
pub mod proto {
    tonic::include_proto!("gatehouse.auth.v1");
}
pub mod audit;
pub mod client;
pub mod client_addr;
pub mod files;
pub mod host;
pub mod otp;
pub mod password;
pub mod ratelimit;
pub mod recording_stream;
pub mod recordings;
pub mod role;
pub mod server;
pub mod storage;
#[cfg(any(test, feature = "testing"))]
pub mod testing;
pub mod tls;
pub mod tls_authority;
pub mod watch;
