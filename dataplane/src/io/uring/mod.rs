//! The io_uring backend of the Proxy's workers: one ring per worker thread, driven from the
//! worker's current-thread tokio runtime.
//!
//! - **Batched submissions.** Operations are queued in the submission ring as tasks ask for
//!   them; a submitter task, woken by the first operation of a batch, runs after the tasks that
//!   were ready in the same tick and hands the kernel the whole batch in one `io_uring_enter`
//!   (the runtime's park hook submits anything left before the thread sleeps). Completions that
//!   the kernel finished inline are reaped right after the submit, the rest when the ring's fd
//!   turns readable in tokio's reactor.
//! - **Multishot accept.** One accept operation per listener for as long as it listens.
//! - **Provided buffers.** Receives name a buffer group instead of a buffer: the kernel picks a
//!   buffer from the worker's ring of buffers only when data arrives. A waiting (idle)
//!   connection owns no receive buffer, and a completion's buffer goes back to the ring as soon as
//!   the reader has taken its bytes (what the reader cannot take is copied out first, so a slow
//!   reader never pins a ring buffer).
//! - **Sends** are written from a buffer the operation owns until the kernel completes it; bytes
//!   written while a send is in flight are queued and go out in the next send (one per flush),
//!   up to a cap past which the writer waits.
//!
//! Ownership rule: memory the kernel may touch (a send's buffer, the ring of receive buffers)
//! belongs to the driver, never to a connection. A connection dropped with operations in flight
//! leaves them to the driver, which cancels them and frees their buffers when the kernel says
//! they are done.
//!
//! This module holds the data plane's `unsafe`: pushing entries that carry raw pointers, and
//! the shared ring of provided buffers (the one other block is a `setsockopt` in
//! [`super::quic`]). Each block says why it is sound.
//!
//! The driver in files, one concern each: [`driver`] (the ring, operation slots, submission,
//! completion, cancellation), [`buf_ring`] (the provided receive buffers), [`send_buf`] (a
//! send's bytes), [`stream`] and [`listener`] (the `AsyncRead`/`AsyncWrite` connection and the
//! multishot acceptor). `tests` checks the invariants the `unsafe` blocks rely on against the
//! real kernel.
#![allow(unsafe_code)]

mod buf_ring;
mod driver;
mod listener;
mod send_buf;
mod stream;
#[cfg(test)]
mod tests;

use std::cell::RefCell;
use std::io;
use std::rc::Rc;

use io_uring::{IoUring, opcode};

use buf_ring::BufRing;
pub(crate) use driver::Driver;
pub(crate) use listener::UringListener;
pub(crate) use stream::UringStream;

/// Room in front of each receive buffer, ours to fill: a TLS record split across two receives
/// is completed in place by copying its first part (at most one record) in front of the second.
pub(crate) const HEADROOM: usize = 16 * 1024 + 512;
// A whole TLS record (16 KiB of payload and its overhead) fits in front of a receive.
const _: () = assert!(HEADROOM >= 16 * 1024 + 256 + 5);
/// Buffer group of the provided receive buffers.
const BGID: u16 = 0;

/// The sizes of one worker's ring and receive buffers.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RingSize {
    /// Submission ring entries (the completion ring is eight times this: completions of a burst
    /// of connections can outnumber the submissions of one batch).
    pub(crate) entries: u32,
    /// Provided receive buffers (a power of two).
    pub(crate) buffers: u16,
    /// Bytes of one provided buffer (two full TLS records): it takes the first bytes after a
    /// wait; bulk reads that find more waiting go straight to the socket.
    pub(crate) buffer_size: usize,
}

impl RingSize {
    /// What the Proxy's workers run with.
    pub(crate) const WORKER: Self = Self {
        entries: 2048,
        buffers: 128,
        buffer_size: 32 * 1024,
    };
}

thread_local! {
    static DRIVER: RefCell<Option<Rc<Driver>>> = const { RefCell::new(None) };
}

/// The driver of this thread, if it runs on io_uring.
pub(crate) fn current() -> Option<Rc<Driver>> {
    DRIVER.with(|d| d.borrow().clone())
}

/// Whether io_uring can serve the Proxy on this machine; the error says why not (for logs).
pub(crate) fn probe() -> Result<(), String> {
    let ring = new_ring(8).map_err(|e| format!("io_uring_setup: {e}"))?;
    let mut probe = io_uring::Probe::new();
    ring.submitter()
        .register_probe(&mut probe)
        .map_err(|e| format!("io_uring probe: {e}"))?;
    for (code, name) in [
        (opcode::Recv::CODE, "recv"),
        (opcode::Send::CODE, "send"),
        (opcode::Accept::CODE, "accept"),
        (opcode::AsyncCancel::CODE, "async_cancel"),
    ] {
        if !probe.is_supported(code) {
            return Err(format!("io_uring lacks {name}"));
        }
    }
    // Provided-buffer rings and multishot accept came with Linux 5.19.
    let bufs = BufRing::new(2, 4096, 0).map_err(|e| format!("allocating a buffer ring: {e}"))?;
    // SAFETY: the ring memory lives until after the unregister below.
    unsafe {
        ring.submitter()
            .register_buf_ring_with_flags(bufs.ring as u64, bufs.entries, 7, 0)
    }
    .map_err(|e| format!("provided buffer rings (Linux 5.19+): {e}"))?;
    let _ = ring.submitter().unregister_buf_ring(7);
    Ok(())
}

/// A ring as the workers set it up (the probe too, so a kernel that refuses the setup falls back
/// to epoll): a completion ring eight times the submission ring, and cooperative task running.
/// Without `COOP_TASKRUN`, a completion for a worker that is running (say, encrypting) is posted
/// by interrupting it with an IPI, an exit to the host on these VMs, only for the CQE to wait
/// until the worker's tasks yield anyway; with it the kernel posts the completion at the worker's
/// next system call (a `send`, the reaper's or the park hook's enter, `epoll_wait`), and a
/// sleeping worker is still woken at once. Linux 5.19+, like the provided-buffer rings.
fn new_ring(entries: u32) -> io::Result<IoUring> {
    IoUring::builder()
        .setup_cqsize(entries * 8)
        .setup_coop_taskrun()
        .build(entries)
}
