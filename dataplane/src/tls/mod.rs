//! TLS for the data plane, on rustls: rustls runs the handshake; after it, TLS 1.3 records are
//! protected by our own record layer, in place, in batches.
//!
//! - `records`: the TLS 1.3 record layer, sans-IO (bytes in, bytes out), with the keys rustls
//!   hands over; key updates and tickets stay rustls' business.
//! - `side`: the adapter over rustls' unbuffered server and client connections.
//! - `incoming` / `write`: the receive and send paths of a stream.
//! - `stream`: [`TlsStream`], an `AsyncRead + AsyncWrite` over the worker's socket
//!   that owns no buffer while idle.
//! - `handover`: a handshaken connection as movable parts, for another core.
//! - `testing`: a test CA, in-memory handshakes and the fuzz targets' entry points (never in a
//!   production build).

mod handover;
mod incoming;
pub(crate) mod records;
mod side;
mod stream;
#[cfg(any(test, feature = "fuzzing"))]
pub mod testing;
mod write;

pub use handover::TlsParts;
pub use side::TlsSide;
pub use stream::TlsStream;
