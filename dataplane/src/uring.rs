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
//! [`crate::quic`]). Each block says why it is sound.
#![allow(unsafe_code)]

use std::alloc::Layout;
use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, OwnedFd, RawFd};
use std::pin::Pin;
use std::rc::Rc;
use std::sync::atomic::{AtomicU16, Ordering};
use std::task::{Context, Poll, Waker};

use bytes::BytesMut;
use io_uring::{IoUring, cqueue, opcode, squeue, types};
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};

use crate::pool;

/// Submission ring size (the completion ring is eight times this: completions of a burst of
/// connections can outnumber the submissions of one batch).
const RING_ENTRIES: u32 = 2048;
/// One provided receive buffer (two full TLS records): it takes the first bytes after a wait;
/// bulk reads that find more waiting go straight to the socket.
pub const BUF_SIZE: usize = 32 * 1024;
/// Room in front of each receive buffer, ours to fill: a TLS record split across two receives
/// is completed in place by copying its first part (at most one record) in front of the second.
pub const HEADROOM: usize = 16 * 1024 + 512;
/// Provided buffers per worker (must be a power of two).
const BUF_COUNT: u16 = 128;
const BGID: u16 = 0;
/// One send buffer: what a connection queues while a send is in flight, at most.
const SEND_BUF: usize = 192 * 1024;
/// Send buffers kept per thread for reuse (initialized once, never freed while in the pool).
const SEND_POOL_MAX: usize = 16;
/// A send still in flight when its connection is dropped gets this long to finish (a TLS
/// alert or the last bytes of a session), then it is cancelled.
const LINGER: std::time::Duration = std::time::Duration::from_secs(5);
/// `user_data` of operations whose completion nobody waits for (cancellations).
const IGNORED: u64 = u64::MAX;

thread_local! {
    static SEND_POOL: RefCell<Vec<Vec<u8>>> = const { RefCell::new(Vec::new()) };
    static DRIVER: RefCell<Option<Rc<Driver>>> = const { RefCell::new(None) };
}

/// The driver of this thread, if it runs on io_uring.
pub fn current() -> Option<Rc<Driver>> {
    DRIVER.with(|d| d.borrow().clone())
}

/// Whether io_uring can serve the Proxy on this machine; the error says why not (for logs).
pub fn probe() -> Result<(), String> {
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

/// Bytes on their way to a socket: a buffer from the thread's pool, written into directly
/// (a TLS stream encrypts into it), owned by the send operation while the kernel reads it.
#[derive(Debug)]
pub struct SendBuf {
    data: Vec<u8>,
    start: usize,
    end: usize,
}

impl SendBuf {
    fn from_pool() -> Self {
        let data = pool::take(&SEND_POOL, SEND_BUF);
        Self {
            data,
            start: 0,
            end: 0,
        }
    }

    /// Free room at the end, to write into and then [`Self::commit`].
    pub fn spare(&mut self) -> &mut [u8] {
        self.data.get_mut(self.end..).unwrap_or_default()
    }

    pub fn commit(&mut self, n: usize) {
        self.end = (self.end + n).min(self.data.len());
    }

    /// Take back the last `n` committed bytes (returned as a copy).
    pub fn uncommit(&mut self, n: usize) -> Vec<u8> {
        let from = self.end.saturating_sub(n).max(self.start);
        let bytes = self.data.get(from..self.end).unwrap_or_default().to_vec();
        self.end = from;
        bytes
    }

    fn pending(&self) -> &[u8] {
        self.data.get(self.start..self.end).unwrap_or_default()
    }

    pub fn len(&self) -> usize {
        self.end - self.start
    }

    pub fn is_empty(&self) -> bool {
        self.end == self.start
    }

    fn advance(&mut self, n: usize) {
        self.start = (self.start + n).min(self.end);
    }
}

impl Drop for SendBuf {
    fn drop(&mut self) {
        if self.data.len() == SEND_BUF {
            pool::give(&SEND_POOL, SEND_POOL_MAX, std::mem::take(&mut self.data));
        }
    }
}

/// A completion handed to the op's owner.
struct Taken {
    c: Completion,
    /// The op is over (its slot is free).
    done: bool,
    buf: Option<SendBuf>,
}

/// What one completion said.
#[derive(Debug, Clone, Copy)]
struct Completion {
    result: i32,
    flags: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Recv,
    Send,
    Accept,
}

struct Op {
    kind: Kind,
    /// Tells a reused slot from the op that had it before.
    generation: u64,
    waker: Option<Waker>,
    first: Option<Completion>,
    /// Further completions of a multishot operation not yet taken.
    more: VecDeque<Completion>,
    /// The kernel will post no more completions for this operation.
    finished: bool,
    /// Its owner is gone: completions only release what they hold.
    abandoned: bool,
    /// A send's bytes, owned here until the kernel is done with them.
    buf: Option<SendBuf>,
}

impl Op {
    fn new(kind: Kind) -> Self {
        Self {
            kind,
            generation: 0,
            waker: None,
            first: None,
            more: VecDeque::new(),
            finished: false,
            abandoned: false,
            buf: None,
        }
    }
}

#[derive(Default)]
struct Slots {
    ops: Vec<Option<Op>>,
    free: Vec<usize>,
    live: usize,
}

impl Slots {
    fn insert(&mut self, op: Op) -> usize {
        self.live += 1;
        if let Some(i) = self.free.pop()
            && let Some(slot) = self.ops.get_mut(i)
        {
            *slot = Some(op);
            return i;
        }
        self.ops.push(Some(op));
        self.ops.len() - 1
    }

    fn get_mut(&mut self, i: usize) -> Option<&mut Op> {
        self.ops.get_mut(i).and_then(Option::as_mut)
    }

    fn remove(&mut self, i: usize) -> Option<Op> {
        let op = self.ops.get_mut(i).and_then(Option::take);
        if op.is_some() {
            self.live -= 1;
            self.free.push(i);
        }
        op
    }
}

/// A ring of provided receive buffers (`IORING_REGISTER_PBUF_RING`).
struct BufRing {
    /// Page-aligned array of `entries` ring entries shared with the kernel.
    ring: *mut types::BufRingEntry,
    entries: u16,
    /// `entries` slots of `headroom + size` bytes; the kernel writes into the last `size`.
    data: *mut u8,
    size: usize,
    headroom: usize,
    tail: Cell<u16>,
}

impl BufRing {
    fn ring_layout(entries: u16) -> io::Result<Layout> {
        Layout::from_size_align(
            usize::from(entries) * std::mem::size_of::<types::BufRingEntry>(),
            4096,
        )
        .map_err(io::Error::other)
    }

    fn data_layout(entries: u16, slot: usize) -> io::Result<Layout> {
        Layout::from_size_align(usize::from(entries) * slot, 4096).map_err(io::Error::other)
    }

    fn slot(&self) -> usize {
        self.headroom + self.size
    }

    fn new(entries: u16, size: usize, headroom: usize) -> io::Result<Self> {
        let ring_layout = Self::ring_layout(entries)?;
        let data_layout = Self::data_layout(entries, headroom + size)?;
        // SAFETY: both layouts have non-zero size; null results are checked.
        let ring = unsafe { std::alloc::alloc_zeroed(ring_layout) }.cast::<types::BufRingEntry>();
        if ring.is_null() {
            return Err(io::ErrorKind::OutOfMemory.into());
        }
        // Not zeroed: pages the kernel never fills are never touched (RSS grows with use).
        // SAFETY: as above.
        let data = unsafe { std::alloc::alloc(data_layout) };
        if data.is_null() {
            // SAFETY: allocated above with this layout.
            unsafe { std::alloc::dealloc(ring.cast(), ring_layout) };
            return Err(io::ErrorKind::OutOfMemory.into());
        }
        let r = Self {
            ring,
            entries,
            data,
            size,
            headroom,
            tail: Cell::new(0),
        };
        for bid in 0..entries {
            r.put(bid);
        }
        r.publish();
        Ok(r)
    }

    /// Queue buffer `bid` at the tail (visible to the kernel after [`Self::publish`]).
    fn put(&self, bid: u16) {
        let tail = self.tail.get();
        let idx = usize::from(tail & (self.entries - 1));
        // SAFETY: idx < entries; the entry is ours until the tail moves past it.
        let entry = unsafe { &mut *self.ring.add(idx) };
        // SAFETY: bid < entries, so the buffer lies inside `data`.
        let at = usize::from(bid) * self.slot() + self.headroom;
        entry.set_addr(unsafe { self.data.add(at) } as u64);
        entry.set_len(self.size as u32);
        entry.set_bid(bid);
        self.tail.set(tail.wrapping_add(1));
    }

    fn publish(&self) {
        // SAFETY: the tail field overlays the first entry's reserved field (the kernel ABI);
        // the kernel reads it concurrently, hence the atomic release store.
        unsafe {
            let tail = types::BufRingEntry::tail(self.ring).cast_mut();
            AtomicU16::from_ptr(tail).store(self.tail.get(), Ordering::Release);
        }
    }

    /// Give buffer `bid` back to the kernel.
    fn recycle(&self, bid: u16) {
        if bid < self.entries {
            self.put(bid);
            self.publish();
        }
    }

    /// Buffer `bid`'s slot: `headroom` bytes, then the `len` bytes the kernel wrote.
    #[allow(clippy::mut_from_ref)]
    fn slot_mut(&self, bid: u16, len: usize) -> &mut [u8] {
        if bid >= self.entries {
            return &mut [];
        }
        let len = self.headroom + len.min(self.size);
        // SAFETY: the kernel filled buffer `bid` and handed it to us with the completion; it
        // does not touch the slot again until we recycle it, and only one completion (one
        // caller) holds a given `bid` at a time.
        unsafe {
            std::slice::from_raw_parts_mut(self.data.add(usize::from(bid) * self.slot()), len)
        }
    }

    /// The `len` bytes the kernel wrote into buffer `bid`.
    fn filled(&self, bid: u16, len: usize) -> &[u8] {
        self.slot_mut(bid, len)
            .get(self.headroom..)
            .unwrap_or_default()
    }
}

impl Drop for BufRing {
    fn drop(&mut self) {
        if let (Ok(ring_layout), Ok(data_layout)) = (
            Self::ring_layout(self.entries),
            Self::data_layout(self.entries, self.slot()),
        ) {
            // SAFETY: allocated in `new` with these layouts; the ring is unregistered (or its
            // io_uring closed and drained) before the driver drops this.
            unsafe {
                std::alloc::dealloc(self.ring.cast(), ring_layout);
                std::alloc::dealloc(self.data, data_layout);
            }
        }
    }
}

/// One worker's io_uring.
pub struct Driver {
    ring: RefCell<IoUring>,
    ops: RefCell<Slots>,
    bufs: BufRing,
    /// Entries pushed since the last submit.
    unsubmitted: Cell<u32>,
    submitter: RefCell<Option<Waker>>,
    wake: RefCell<Vec<Waker>>,
    next_generation: Cell<u64>,
    /// Sends left to finish after their connections were dropped: (slot, generation, deadline).
    lingering: RefCell<Vec<(usize, u64, std::time::Instant)>>,
    linger_task: RefCell<Option<Waker>>,
    /// Set when the driver could not drain: its buffers are leaked rather than freed under the
    /// kernel's feet.
    leak: Cell<bool>,
}

impl std::fmt::Debug for Driver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Driver")
            .field("live_ops", &self.ops.borrow().live)
            .finish_non_exhaustive()
    }
}

impl Driver {
    /// Create this thread's ring and install it; spawn its tasks on the current `LocalSet`.
    pub fn install() -> io::Result<Rc<Self>> {
        let ring = new_ring(RING_ENTRIES)?;
        let bufs = BufRing::new(BUF_COUNT, BUF_SIZE, HEADROOM)?;
        // SAFETY: the buffer ring outlives its registration: the driver drops the io_uring
        // (which releases it) before `bufs` (field order), and leaks it if it cannot drain.
        unsafe {
            ring.submitter().register_buf_ring_with_flags(
                bufs.ring as u64,
                bufs.entries,
                BGID,
                0,
            )?;
        }
        let fd = ring.as_raw_fd();
        let driver = Rc::new(Self {
            ring: RefCell::new(ring),
            ops: RefCell::default(),
            bufs,
            unsubmitted: Cell::new(0),
            submitter: RefCell::new(None),
            wake: RefCell::new(Vec::new()),
            next_generation: Cell::new(1),
            lingering: RefCell::new(Vec::new()),
            linger_task: RefCell::new(None),
            leak: Cell::new(false),
        });
        DRIVER.with(|d| *d.borrow_mut() = Some(Rc::clone(&driver)));
        // SAFETY: the ring's descriptor stays open while the `AsyncFd` lives: the task that
        // owns it also holds the driver, which owns the ring.
        let afd = unsafe { AsyncFd::register_with_interest(RingFd(fd), Interest::READABLE) }?;
        {
            let d = Rc::clone(&driver);
            tokio::task::spawn_local(async move {
                loop {
                    let mut guard = match afd.readable().await {
                        Ok(g) => g,
                        Err(e) => {
                            tracing::error!(error = %e, "io_uring: cannot wait for completions");
                            return;
                        }
                    };
                    d.reap();
                    guard.clear_ready();
                    // Completions posted between the reap and clearing readiness.
                    d.reap();
                }
            });
        }
        {
            // Cancels lingering sends past their deadline.
            let d = Rc::clone(&driver);
            tokio::task::spawn_local(async move {
                loop {
                    std::future::poll_fn(|cx| {
                        if d.lingering.borrow().is_empty() {
                            *d.linger_task.borrow_mut() = Some(cx.waker().clone());
                            Poll::Pending
                        } else {
                            Poll::Ready(())
                        }
                    })
                    .await;
                    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
                    d.expire_lingering(std::time::Instant::now());
                }
            });
        }
        {
            let d = Rc::clone(&driver);
            tokio::task::spawn_local(std::future::poll_fn(move |cx| {
                d.submit();
                let mut w = d.submitter.borrow_mut();
                if !w.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                    *w = Some(cx.waker().clone());
                }
                Poll::<()>::Pending
            }));
        }
        Ok(driver)
    }

    /// Remove this thread's driver; cancel and drain whatever is still in flight.
    pub fn uninstall() {
        let Some(d) = DRIVER.with(|d| d.borrow_mut().take()) else {
            return;
        };
        d.drain_all();
    }

    fn drain_all(&self) {
        let cancel_all = opcode::AsyncCancel2::new(types::CancelBuilder::any())
            .build()
            .user_data(IGNORED);
        self.push(cancel_all);
        for _ in 0..100 {
            if self.ops.borrow().live == 0 {
                return;
            }
            let r = self.ring.borrow().submitter().submit_with_args(
                1,
                &types::SubmitArgs::new().timespec(&types::Timespec::new().nsec(10_000_000)),
            );
            self.unsubmitted.set(0);
            if let Err(e) = r
                && e.raw_os_error() != Some(libc::ETIME)
                && e.raw_os_error() != Some(libc::EINTR)
            {
                break;
            }
            self.reap();
        }
        if self.ops.borrow().live > 0 {
            tracing::warn!(
                live = self.ops.borrow().live,
                "io_uring: operations still in flight at shutdown; their buffers are leaked"
            );
            self.leak.set(true);
        }
    }

    /// Queue an entry; the batch goes to the kernel when the submitter runs.
    fn push(&self, entry: squeue::Entry) {
        let mut ring = self.ring.borrow_mut();
        // SAFETY (for every entry pushed here): buffers an entry points to are owned by its
        // op slot or by the provided-buffer ring, both kept until the completion arrives.
        if unsafe { ring.submission().push(&entry) }.is_err() {
            if let Err(e) = ring.submit() {
                tracing::warn!(error = %e, "io_uring: submit failed");
            }
            self.unsubmitted.set(0);
            // SAFETY: as above.
            if unsafe { ring.submission().push(&entry) }.is_err() {
                tracing::error!("io_uring: submission queue full after a submit");
                return;
            }
        }
        drop(ring);
        let n = self.unsubmitted.get();
        self.unsubmitted.set(n + 1);
        if n == 0
            && let Some(w) = self.submitter.borrow().as_ref()
        {
            w.wake_by_ref();
        }
    }

    /// Hand the kernel everything queued, then reap what it finished inline.
    pub fn submit(&self) {
        if self.unsubmitted.get() == 0 {
            return;
        }
        self.unsubmitted.set(0);
        loop {
            let r = self.ring.borrow().submit();
            match r {
                Ok(_) => break,
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                    // The completion ring is full: make room, then try again.
                    self.reap();
                    continue;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "io_uring: submit failed");
                    break;
                }
            }
        }
        self.reap();
    }

    /// Take every completion: record it with its op and wake the op's task.
    fn reap(&self) {
        let mut wake = self.wake.borrow_mut();
        for _ in 0..8 {
            let mut ring = self.ring.borrow_mut();
            let mut ops = self.ops.borrow_mut();
            for cqe in ring.completion() {
                let ud = cqe.user_data();
                if ud == IGNORED {
                    continue;
                }
                let slot = ud as usize;
                let c = Completion {
                    result: cqe.result(),
                    flags: cqe.flags(),
                };
                let more = cqueue::more(c.flags);
                let Some(op) = ops.get_mut(slot) else {
                    continue;
                };
                if op.abandoned {
                    self.release(op.kind, c);
                    if !more {
                        ops.remove(slot);
                    }
                    continue;
                }
                if op.first.is_none() {
                    op.first = Some(c);
                } else {
                    op.more.push_back(c);
                }
                if !more {
                    op.finished = true;
                }
                if let Some(w) = op.waker.take() {
                    wake.push(w);
                }
            }
            // Completions the kernel kept aside while the ring was full reach it only through
            // an enter: without one they would wait for the next submission.
            if !ring.submission().cq_overflow() {
                break;
            }
            if let Err(e) = ring.submit() {
                tracing::warn!(error = %e, "io_uring: flushing overflowed completions failed");
                break;
            }
        }
        for w in wake.drain(..) {
            w.wake();
        }
    }

    /// Free what a completion nobody waits for holds.
    fn release(&self, kind: Kind, c: Completion) {
        if let Some(bid) = cqueue::buffer_select(c.flags) {
            self.bufs.recycle(bid);
        }
        if kind == Kind::Accept && c.result >= 0 {
            // SAFETY: a successful accept's result is a new descriptor that nobody else owns.
            drop(unsafe { OwnedFd::from_raw_fd(c.result) });
        }
    }

    /// Start an operation; `buf` (a send's bytes) is owned by its slot until it completes, and
    /// `build` makes the entry from the bytes at their final address.
    fn start(
        &self,
        kind: Kind,
        buf: Option<SendBuf>,
        build: impl FnOnce(Option<&SendBuf>) -> squeue::Entry,
    ) -> usize {
        let mut ops = self.ops.borrow_mut();
        let generation = self.next_generation.get();
        self.next_generation.set(generation + 1);
        let slot = ops.insert(Op {
            buf,
            generation,
            ..Op::new(kind)
        });
        // Moving the `Op` (a Vec of slots may grow) does not move the bytes it owns.
        let entry = ops
            .get_mut(slot)
            .map(|op| build(op.buf.as_ref()))
            .unwrap_or_else(|| opcode::Nop::new().build())
            .user_data(slot as u64);
        drop(ops);
        self.push(entry);
        slot
    }

    /// The next completion of `slot`, if any. When it was the last, the slot is freed and
    /// `Taken::buf` returns what the op owned.
    fn take(&self, slot: usize, cx: &mut Context<'_>) -> Option<Taken> {
        let mut ops = self.ops.borrow_mut();
        let op = ops.get_mut(slot)?;
        let c = match op.first.take() {
            Some(c) => {
                op.first = op.more.pop_front();
                c
            }
            None => {
                if !op.waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                    op.waker = Some(cx.waker().clone());
                }
                return None;
            }
        };
        let done = op.finished && op.first.is_none();
        let buf = if done {
            ops.remove(slot).and_then(|op| op.buf)
        } else {
            None
        };
        Some(Taken { c, done, buf })
    }

    /// Let the send in `slot` finish without its owner, cancelling it after [`LINGER`].
    fn linger(&self, slot: usize) {
        let generation = {
            let mut ops = self.ops.borrow_mut();
            let Some(op) = ops.get_mut(slot) else {
                return;
            };
            op.abandoned = true;
            op.waker = None;
            if op.finished {
                // Done already: nothing to wait for.
                ops.remove(slot);
                return;
            }
            op.generation
        };
        self.lingering
            .borrow_mut()
            .push((slot, generation, std::time::Instant::now() + LINGER));
        if let Some(w) = self.linger_task.borrow_mut().take() {
            w.wake();
        }
    }

    fn expire_lingering(&self, now: std::time::Instant) {
        let mut expired = Vec::new();
        self.lingering
            .borrow_mut()
            .retain(|&(slot, generation, deadline)| {
                let live = self
                    .ops
                    .borrow_mut()
                    .get_mut(slot)
                    .is_some_and(|op| op.generation == generation);
                if live && deadline <= now {
                    expired.push(slot);
                }
                live && deadline > now
            });
        for slot in expired {
            self.abandon(slot);
        }
    }

    /// Give up on `slot`: its completions only release what they hold; cancel it.
    fn abandon(&self, slot: usize) {
        let mut ops = self.ops.borrow_mut();
        let Some(op) = ops.get_mut(slot) else {
            return;
        };
        op.abandoned = true;
        op.waker = None;
        let kind = op.kind;
        let pending: Vec<Completion> = op
            .first
            .take()
            .into_iter()
            .chain(op.more.drain(..))
            .collect();
        let finished = op.finished;
        if finished {
            ops.remove(slot);
        }
        drop(ops);
        for c in pending {
            self.release(kind, c);
        }
        if !finished {
            self.push(
                opcode::AsyncCancel::new(slot as u64)
                    .build()
                    .user_data(IGNORED),
            );
        }
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        if self.leak.get() {
            // The kernel may still write into receive buffers or read send buffers.
            let bufs = std::mem::replace(
                &mut self.bufs,
                BufRing {
                    ring: std::ptr::null_mut(),
                    entries: 0,
                    data: std::ptr::null_mut(),
                    size: 0,
                    headroom: 0,
                    tail: Cell::new(0),
                },
            );
            std::mem::forget(bufs);
            std::mem::forget(std::mem::take(&mut *self.ops.borrow_mut()));
        }
    }
}

struct RingFd(RawFd);

impl AsRawFd for RingFd {
    fn as_raw_fd(&self) -> RawFd {
        self.0
    }
}

/// A TCP connection served through the worker's io_uring.
pub struct UringStream {
    fd: OwnedFd,
    driver: Rc<Driver>,
    /// The receive in flight.
    recv: Option<usize>,
    /// Received bytes the reader could not take yet.
    pending: BytesMut,
    eof: bool,
    /// The send in flight (its bytes live in its op slot).
    send: Option<usize>,
    /// Bytes written while a send is in flight.
    queued: Option<SendBuf>,
    write_error: Option<io::ErrorKind>,
    /// The last receive said more data was waiting in the socket (`IORING_CQE_F_SOCK_NONEMPTY`):
    /// the next read takes it with a plain non-blocking `recv` instead of a ring round trip.
    nonempty: bool,
}

impl std::fmt::Debug for UringStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UringStream")
            .field("fd", &self.fd.as_raw_fd())
            .finish_non_exhaustive()
    }
}

fn os_error(result: i32) -> io::Error {
    io::Error::from_raw_os_error(-result)
}

impl UringStream {
    /// Serve `socket` through `driver` (the socket is put in blocking mode: io_uring waits for
    /// readiness itself).
    pub fn new(socket: std::net::TcpStream, driver: Rc<Driver>) -> io::Result<Self> {
        socket.set_nonblocking(false)?;
        Ok(Self::blocking(socket, driver))
    }

    /// `new` for a socket known to be in blocking mode already (one the ring accepted).
    fn blocking(socket: std::net::TcpStream, driver: Rc<Driver>) -> Self {
        Self {
            fd: OwnedFd::from(socket),
            driver,
            recv: None,
            pending: BytesMut::new(),
            eof: false,
            send: None,
            queued: None,
            write_error: None,
            // A new connection usually has its first bytes waiting (a ClientHello, a request).
            nonempty: true,
        }
    }

    fn sock(&self) -> socket2::SockRef<'_> {
        socket2::SockRef::from(&self.fd)
    }

    pub fn peer_addr(&self) -> io::Result<SocketAddr> {
        self.sock()
            .peer_addr()?
            .as_socket()
            .ok_or_else(|| io::Error::other("not an IP socket"))
    }

    pub fn set_nodelay(&self, on: bool) -> io::Result<()> {
        self.sock().set_tcp_nodelay(on)
    }

    /// The socket back, with bytes received but not read; fails while operations are in flight.
    pub fn into_std(mut self) -> io::Result<(std::net::TcpStream, BytesMut)> {
        if self.recv.is_some() || self.send.is_some() || self.queued.is_some() {
            return Err(io::Error::new(
                io::ErrorKind::WouldBlock,
                "io_uring operations in flight",
            ));
        }
        let pending = std::mem::take(&mut self.pending);
        let fd = self.fd.try_clone()?;
        // `self` drops here: nothing in flight, and its descriptor closes; the clone lives on.
        drop(self);
        let raw = fd.into_raw_fd();
        // SAFETY: `raw` is a descriptor we own (from the clone above).
        let socket = unsafe { std::net::TcpStream::from_raw_fd(raw) };
        Ok((socket, pending))
    }

    /// Finish the receive in flight, if any: `Some(result)` once it completed.
    fn poll_recv_done(&mut self, cx: &mut Context<'_>) -> Option<Completion> {
        let slot = self.recv?;
        let t = self.driver.take(slot, cx)?;
        self.recv = None;
        Some(t.c)
    }

    fn start_recv(&mut self, len: usize) {
        let len = len.clamp(1, BUF_SIZE) as u32;
        let fd = self.fd.as_raw_fd();
        self.recv = Some(self.driver.start(Kind::Recv, None, |_| {
            opcode::Recv::new(types::Fd(fd), std::ptr::null_mut(), len)
                .buf_group(BGID)
                .build()
                .flags(squeue::Flags::BUFFER_SELECT)
        }));
    }

    /// Copy a receive's bytes to `dst` (what does not fit to `pending`); recycle its buffer.
    fn deliver(&mut self, c: Completion, dst: &mut [u8]) -> io::Result<usize> {
        let bid = cqueue::buffer_select(c.flags);
        if c.result < 0 {
            if let Some(bid) = bid {
                self.driver.bufs.recycle(bid);
            }
            return Err(os_error(c.result));
        }
        // End of stream carries no buffer.
        let Some(bid) = bid else {
            return Ok(0);
        };
        let data = self.driver.bufs.filled(bid, c.result as usize);
        let n = data.len().min(dst.len());
        if let (Some(d), Some(s)) = (dst.get_mut(..n), data.get(..n)) {
            d.copy_from_slice(s);
        }
        if let Some(rest) = data.get(n..) {
            self.pending.extend_from_slice(rest);
        }
        self.driver.bufs.recycle(bid);
        Ok(n)
    }

    /// Receive (at most `len` bytes) into a provided buffer and run `f` on `prefix` followed by
    /// the received bytes, in place, mutable: no copy of what was received. `Ready(Ok(None))`
    /// at the end of the stream. (A `prefix` longer than [`HEADROOM`], or bytes a plain read
    /// left behind, go through a temporary buffer instead.)
    pub fn poll_recv_with<R>(
        &mut self,
        cx: &mut Context<'_>,
        len: usize,
        prefix: &[u8],
        f: impl FnOnce(&mut [u8]) -> R,
    ) -> Poll<io::Result<Option<R>>> {
        if !self.pending.is_empty() {
            let mut joined = Vec::with_capacity(prefix.len() + self.pending.len());
            joined.extend_from_slice(prefix);
            joined.extend_from_slice(&self.pending);
            self.pending = BytesMut::new();
            return Poll::Ready(Ok(Some(f(&mut joined))));
        }
        if self.eof {
            return Poll::Ready(Ok(None));
        }
        loop {
            let Some(c) = self.poll_recv_done(cx) else {
                if self.recv.is_none() {
                    self.start_recv(len);
                    continue;
                }
                return Poll::Pending;
            };
            let bid = cqueue::buffer_select(c.flags);
            if c.result == -libc::ENOBUFS {
                // Every provided buffer is out: they come back within the tick.
                self.start_recv(len);
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            if c.result < 0 {
                if let Some(bid) = bid {
                    self.driver.bufs.recycle(bid);
                }
                return Poll::Ready(Err(os_error(c.result)));
            }
            let (Some(bid), true) = (bid, c.result > 0) else {
                self.eof = true;
                return Poll::Ready(Ok(None));
            };
            let n = c.result as usize;
            self.nonempty = cqueue::sock_nonempty(c.flags);
            let slot = self.driver.bufs.slot_mut(bid, n);
            let r = if prefix.len() <= HEADROOM
                && let Some(input) = slot.get_mut(HEADROOM - prefix.len()..)
                && let Some(front) = input.get_mut(..prefix.len())
            {
                front.copy_from_slice(prefix);
                f(input)
            } else {
                let mut joined = Vec::with_capacity(prefix.len() + n);
                joined.extend_from_slice(prefix);
                joined.extend_from_slice(slot.get(HEADROOM..).unwrap_or_default());
                f(&mut joined)
            };
            self.driver.bufs.recycle(bid);
            return Poll::Ready(Ok(Some(r)));
        }
    }

    /// Whether a plain read is likely to find data now (see [`Self::poll_read`]).
    pub fn data_waiting(&self) -> bool {
        self.nonempty && self.recv.is_none() && self.pending.is_empty()
    }

    /// A non-blocking `recv` into `dst`: `None` when the socket is empty (the hint is cleared).
    fn recv_now(&mut self, dst: &mut [u8]) -> Option<io::Result<usize>> {
        // SAFETY: `dst` is a valid, writable buffer of `dst.len()` bytes for the call.
        let n = unsafe {
            libc::recv(
                self.fd.as_raw_fd(),
                dst.as_mut_ptr().cast(),
                dst.len(),
                libc::MSG_DONTWAIT,
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            self.nonempty = false;
            return match e.kind() {
                io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted => None,
                _ => Some(Err(e)),
            };
        }
        let n = n as usize;
        // A full buffer suggests more behind it; a short one that the socket is drained.
        self.nonempty = n == dst.len() && n > 0;
        Some(Ok(n))
    }

    /// Move the send along: take its completion, send the rest or what was queued meanwhile.
    /// Ready when nothing is in flight or queued.
    fn poll_send(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        loop {
            if let Some(kind) = self.write_error {
                return Poll::Ready(Err(kind.into()));
            }
            let Some(slot) = self.send else {
                match self.queued.take() {
                    Some(q) if !q.is_empty() => {
                        self.start_send(q);
                        continue;
                    }
                    _ => return Poll::Ready(Ok(())),
                }
            };
            let Some(Taken { c, buf, .. }) = self.driver.take(slot, cx) else {
                return Poll::Pending;
            };
            self.send = None;
            if c.result < 0 {
                self.write_error = Some(os_error(c.result).kind());
                continue;
            }
            if c.result == 0 {
                self.write_error = Some(io::ErrorKind::WriteZero);
                continue;
            }
            if let Some(mut sent) = buf {
                sent.advance(c.result as usize);
                if !sent.is_empty() {
                    // A short send: the rest goes before anything queued behind it.
                    self.start_send(sent);
                }
            }
        }
    }

    fn start_send(&mut self, mut buf: SendBuf) {
        let fd = self.fd.as_raw_fd();
        // Most sends find room in the socket: one non-blocking send, and the ring only for what
        // the socket did not take (it then waits for room without a thread waiting).
        let pending = buf.pending();
        // SAFETY: `pending` is a valid buffer of `pending.len()` bytes for the call.
        let n = unsafe {
            libc::send(
                fd,
                pending.as_ptr().cast(),
                pending.len(),
                libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
            )
        };
        if n > 0 {
            buf.advance(n as usize);
            if buf.is_empty() {
                return;
            }
        } else if n < 0 {
            let e = io::Error::last_os_error();
            if !matches!(
                e.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
            ) {
                self.write_error = Some(e.kind());
                return;
            }
        }
        self.send = Some(self.driver.start(Kind::Send, Some(buf), |b| {
            let bytes = b.map(SendBuf::pending).unwrap_or_default();
            opcode::Send::new(types::Fd(fd), bytes.as_ptr(), bytes.len() as u32)
                .flags(libc::MSG_NOSIGNAL)
                .build()
        }));
    }

    /// The send queue, to write into directly, once it has `room` bytes free: Pending (the
    /// waker set on the send in flight) while it is full. Give it back with [`Self::requeue`].
    pub fn poll_queue(&mut self, cx: &mut Context<'_>, room: usize) -> Poll<io::Result<SendBuf>> {
        loop {
            if let Poll::Ready(Err(e)) = self.poll_send(cx) {
                return Poll::Ready(Err(e));
            }
            let mut q = self.queued.take().unwrap_or_else(SendBuf::from_pool);
            if q.spare().len() >= room.min(SEND_BUF) {
                return Poll::Ready(Ok(q));
            }
            if self.send.is_none() && !q.is_empty() {
                self.start_send(q);
                continue;
            }
            self.queued = Some(q);
            return Poll::Pending;
        }
    }

    /// Put the queue back; it goes out at once when no send is in flight.
    pub fn requeue(&mut self, q: SendBuf) {
        if q.is_empty() {
            return;
        }
        if self.send.is_none() {
            self.start_send(q);
        } else {
            self.queued = Some(q);
        }
    }
}

impl AsyncRead for UringStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        rb: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.pending.is_empty() {
            crate::socket::drain_into(&mut this.pending, rb);
            return Poll::Ready(Ok(()));
        }
        if this.eof || rb.remaining() == 0 {
            return Poll::Ready(Ok(()));
        }
        // Bulk transfer: the socket had more than the last receive took, so read it directly
        // (one syscall, no ring round trip); an empty socket goes back to waiting on the ring.
        if this.data_waiting() {
            match this.recv_now(rb.initialize_unfilled()) {
                Some(Ok(n)) => {
                    if n == 0 {
                        this.eof = true;
                    }
                    rb.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Some(Err(e)) => return Poll::Ready(Err(e)),
                None => {}
            }
        }
        loop {
            if let Some(c) = this.poll_recv_done(cx) {
                if c.result == -libc::ENOBUFS {
                    // Every provided buffer is out: ask again (they come back within the tick).
                    this.start_recv(rb.remaining());
                    cx.waker().wake_by_ref();
                    return Poll::Pending;
                }
                let dst = rb.initialize_unfilled();
                let n = this.deliver(c, dst)?;
                if n == 0 {
                    this.eof = true;
                }
                rb.advance(n);
                return Poll::Ready(Ok(()));
            }
            if this.recv.is_some() {
                return Poll::Pending;
            }
            this.start_recv(rb.remaining());
        }
    }
}

impl AsyncWrite for UringStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let mut q = match this.poll_queue(cx, 1) {
            Poll::Ready(Ok(q)) => q,
            Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
            Poll::Pending => return Poll::Pending,
        };
        let spare = q.spare();
        let n = data.len().min(spare.len());
        if let (Some(d), Some(s)) = (spare.get_mut(..n), data.get(..n)) {
            d.copy_from_slice(s);
        }
        q.commit(n);
        this.requeue(q);
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.get_mut().poll_send(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        match this.poll_send(cx) {
            Poll::Ready(Ok(())) => {}
            other => return other,
        }
        match this.sock().shutdown(std::net::Shutdown::Write) {
            Ok(()) => Poll::Ready(Ok(())),
            Err(e) if e.kind() == io::ErrorKind::NotConnected => Poll::Ready(Ok(())),
            Err(e) => Poll::Ready(Err(e)),
        }
    }
}

impl Drop for UringStream {
    fn drop(&mut self) {
        // The descriptor closes now; the kernel keeps the socket until the cancelled
        // operations complete, and the driver frees their buffers then. Entries that name the
        // descriptor go to the kernel first: after the close its number may be reused.
        if self.recv.is_some() || self.send.is_some() {
            self.driver.submit();
        }
        if let Some(slot) = self.recv.take() {
            self.driver.abandon(slot);
        }
        if let Some(slot) = self.send.take() {
            self.driver.linger(slot);
        }
    }
}

/// A listening socket accepting through one multishot accept.
pub struct UringListener {
    fd: OwnedFd,
    driver: Rc<Driver>,
    accept: Option<usize>,
}

impl std::fmt::Debug for UringListener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UringListener")
            .field("fd", &self.fd.as_raw_fd())
            .finish_non_exhaustive()
    }
}

impl UringListener {
    pub fn new(listener: std::net::TcpListener, driver: Rc<Driver>) -> io::Result<Self> {
        listener.set_nonblocking(false)?;
        Ok(Self {
            fd: OwnedFd::from(listener),
            driver,
            accept: None,
        })
    }

    pub async fn accept(&mut self) -> io::Result<(UringStream, SocketAddr)> {
        std::future::poll_fn(|cx| self.poll_accept(cx)).await
    }

    fn poll_accept(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<(UringStream, SocketAddr)>> {
        loop {
            let slot = match self.accept {
                Some(s) => s,
                None => {
                    let fd = self.fd.as_raw_fd();
                    let s = self.driver.start(Kind::Accept, None, |_| {
                        opcode::AcceptMulti::new(types::Fd(fd))
                            .flags(libc::SOCK_CLOEXEC)
                            .build()
                    });
                    self.accept = Some(s);
                    s
                }
            };
            let Some(Taken { c, done, .. }) = self.driver.take(slot, cx) else {
                return Poll::Pending;
            };
            if done {
                // The kernel ended the multishot (an error, or it had to): arm a new one next.
                self.accept = None;
            }
            if c.result < 0 {
                return Poll::Ready(Err(os_error(c.result)));
            }
            // SAFETY: a successful accept's result is a new descriptor that nobody else owns.
            let socket = unsafe { std::net::TcpStream::from_raw_fd(c.result) };
            // Accepted without SOCK_NONBLOCK: blocking already, no ioctl needed.
            let stream = UringStream::blocking(socket, Rc::clone(&self.driver));
            let peer = match stream.peer_addr() {
                Ok(p) => p,
                // Reset before we looked: next.
                Err(_) => continue,
            };
            return Poll::Ready(Ok((stream, peer)));
        }
    }
}

impl Drop for UringListener {
    fn drop(&mut self) {
        if let Some(slot) = self.accept.take() {
            self.driver.submit();
            self.driver.abandon(slot);
        }
    }
}
