//! The I/O layer: the Proxy workers' sockets on io_uring or epoll, socket options, and QUIC
//! endpoints. Above it, TLS, tunnels and splices see `AsyncRead + AsyncWrite` values and know
//! nothing of the backend (but for the io_uring fast paths `tls` takes where it can).
//!
//! - `backend`: choosing io_uring or epoll, and a worker thread's runtime.
//! - `socket`: one connection type and one listener type over both backends.
//! - `uring`: the io_uring driver (the data plane's `unsafe` lives there).
//! - `options`: TCP congestion control and the public port's `SO_REUSEPORT` listeners.
//! - [`quic`]: quinn endpoints for agents' QUIC tunnels, steered to workers by connection ID.

pub(crate) mod backend;
pub(crate) mod options;
pub mod quic;
pub(crate) mod socket;
pub(crate) mod uring;

use bytes::BytesMut;
use tokio::io::ReadBuf;

pub use backend::IoBackend;
pub use options::{check_tcp_congestion, set_tcp_congestion};
pub use quic::TunnelTransport;

/// Move what fits of `buf` into `out`; an emptied `buf` gives its memory back (idle
/// connections hold no buffers).
pub(crate) fn drain_into(buf: &mut BytesMut, out: &mut ReadBuf<'_>) {
    let n = buf.len().min(out.remaining());
    out.put_slice(buf.get(..n).unwrap_or_default());
    bytes::Buf::advance(buf, n);
    if buf.is_empty() {
        *buf = BytesMut::new();
    }
}
