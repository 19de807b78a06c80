//! The Proxy data plane, in layers that depend downward only:
//!
//! ```text
//! proxy   the Proxy: workers, admission (pure), tunnels, sessions, route table, metrics
//!   │
//! mux     the tunnel driver around gatehouse_proto's state machine; splices; QUIC streams
//!   │
//! tls     rustls handshake, our own TLS 1.3 record layer, the stream, hand-over between cores
//!   │
//! io      sockets on io_uring or epoll, socket options, QUIC endpoints
//! ```
//!
//! Below them all, the wire protocols themselves (tunnel frames and state machine, session
//! request, ClientHello reader) are sans-IO in the `gatehouse-proto` crate. [`role`] starts the
//! Proxy as a daemon role. Agents use [`mux`], [`tls::TlsStream`] and [`io::quic`] for their end
//! of the tunnel.

pub mod io;
mod leaf_link;
pub mod mux;
mod peers;
pub mod proxy;
pub mod role;
pub mod tls;
