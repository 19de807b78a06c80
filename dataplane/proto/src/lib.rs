//! The data plane's wire protocols, sans-IO (in the manner of `quinn-proto`): nothing here owns a
//! socket, spawns a task or reads a clock. Callers hand in bytes and `now`; out come frames,
//! events and deadlines. That makes every protocol here deterministic to test in memory, to
//! property-test and to fuzz (`fuzz/`), and leaves the I/O to thin drivers in
//! `gatehouse-dataplane` (`mux` drives [`tunnel::Connection`], `proxy` reads ClientHellos and
//! session requests).
//!
//! The rule is enforced, not only written: this crate does not depend on tokio, and its
//! `clippy.toml` refuses the clock and sockets.
//!
//! - [`tunnel`]: the reverse-tunnel protocol — typed frames, their incremental decoder, and the
//!   connection state machine with per-stream credit flow control, pings and go-away.
//! - [`session`]: the request a user's client sends on `gatehouse-ssh` / `gatehouse-tcp` before
//!   its bytes are spliced, and the Proxy's answer.
//! - [`client_hello`]: the ALPN and SNI of a TLS ClientHello, read without terminating TLS.
//! - [`alpn`]: the protocol names the Proxy's one port routes by.
//! - [`pool`]: per-thread pools of equal-sized buffers, shared with the I/O layers.

pub mod alpn;
pub mod client_hello;
pub mod pool;
pub mod session;
pub mod tunnel;
