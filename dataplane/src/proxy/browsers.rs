//! Browsers on the public port. A connection that negotiates HTTP (`h2`, `http/1.1`, or no ALPN)
//! is the web UI's ([`super::admission::Admission::Browser`]): the worker bridges its TLS stream
//! to one end of an in-memory pipe and hands the other end to the [`Browsers`] the daemon set
//! (the `gatehouse-web` crate), which serves HTTP on a multi-threaded runtime. The data plane
//! stays free of HTTP; the bridge costs one copy each way, bounded by the pipe's buffer.

use std::net::SocketAddr;
use std::sync::Arc;

/// Bytes in flight each way between the worker and the web UI, at most (back-pressure beyond).
pub(crate) const PIPE_BYTES: usize = 64 * 1024;

/// A browser's connection, TLS already terminated.
#[derive(Debug)]
pub struct BrowserConn {
    /// Plaintext HTTP both ways.
    pub io: tokio::io::DuplexStream,
    pub remote: SocketAddr,
    /// Whether ALPN chose HTTP/2 (else HTTP/1.1).
    pub http2: bool,
}

/// Whoever serves browsers: called on a proxy worker's thread, so it must not block (hand the
/// connection to a runtime of its own).
pub trait Browsers: Send + Sync + 'static {
    fn accept(&self, conn: BrowserConn);
}

/// Set once, when the daemon has started the web UI.
pub(crate) type BrowserSlot = Arc<std::sync::OnceLock<Arc<dyn Browsers>>>;
