//! The Proxy data plane: the tunnel protocol (sans-IO, both ends), and from here on the per-core
//! Proxy that routes user sessions to agents' tunnels.

pub mod client_hello;
pub mod mux;
mod pool;
pub mod proxy;
pub mod quic;
pub mod session_proto;
pub mod socket;
pub mod tls_records;
pub mod tls_stream;
pub mod tunnel;
pub mod uring;

pub use gatehouse_controlplane as controlplane;
