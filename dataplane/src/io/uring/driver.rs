//! One worker's io_uring: operation slots, batched submission, completions, cancellation and
//! the lingering of sends whose connection is gone. Memory the kernel may touch (a send's
//! buffer, the provided receive buffers) is owned here until the kernel says it is done.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::rc::Rc;
use std::task::{Context, Poll, Waker};

use io_uring::{IoUring, cqueue, opcode, squeue, types};
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;

use super::buf_ring::BufRing;
use super::send_buf::SendBuf;
use super::{BGID, DRIVER, HEADROOM, RingSize, new_ring};

/// A send still in flight when its connection is dropped gets this long to finish (a TLS
/// alert or the last bytes of a session), then it is cancelled.
pub(super) const LINGER: std::time::Duration = std::time::Duration::from_secs(5);
/// `user_data` of operations whose completion nobody waits for (cancellations).
const IGNORED: u64 = u64::MAX;

/// A completion handed to the op's owner.
pub(super) struct Taken {
    pub(super) c: Completion,
    /// The op is over (its slot is free).
    pub(super) done: bool,
    pub(super) buf: Option<SendBuf>,
}

/// What one completion said.
#[derive(Debug, Clone, Copy)]
pub(super) struct Completion {
    pub(super) result: i32,
    pub(super) flags: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Kind {
    Recv,
    Send,
    Accept,
}

pub(super) struct Op {
    kind: Kind,
    /// Tells a reused slot from the op that had it before.
    generation: u64,
    pub(super) waker: Option<Waker>,
    pub(super) first: Option<Completion>,
    /// Further completions of a multishot operation not yet taken.
    more: VecDeque<Completion>,
    /// The kernel will post no more completions for this operation.
    pub(super) finished: bool,
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
pub(super) struct Slots {
    ops: Vec<Option<Op>>,
    free: Vec<usize>,
    pub(super) live: usize,
}

impl Slots {
    /// A slot for a new operation (an empty one first: slots are reused).
    #[cfg(test)]
    pub(super) fn insert_for_test(&mut self, kind: Kind) -> usize {
        self.insert(Op::new(kind))
    }

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

    pub(super) fn get_mut(&mut self, i: usize) -> Option<&mut Op> {
        self.ops.get_mut(i).and_then(Option::as_mut)
    }

    pub(super) fn remove(&mut self, i: usize) -> Option<Op> {
        let op = self.ops.get_mut(i).and_then(Option::take);
        if op.is_some() {
            self.live -= 1;
            self.free.push(i);
        }
        op
    }
}

/// One worker's io_uring.
pub(crate) struct Driver {
    ring: RefCell<IoUring>,
    pub(super) ops: RefCell<Slots>,
    pub(super) bufs: BufRing,
    /// Entries pushed since the last submit.
    unsubmitted: Cell<u32>,
    submitter: RefCell<Option<Waker>>,
    wake: RefCell<Vec<Waker>>,
    next_generation: Cell<u64>,
    /// Sends left to finish after their connections were dropped: (slot, generation, deadline).
    pub(super) lingering: RefCell<Vec<(usize, u64, std::time::Instant)>>,
    linger_task: RefCell<Option<Waker>>,
    /// Set when the driver could not drain: its buffers are leaked rather than freed under the
    /// kernel's feet.
    leak: Cell<bool>,
    /// Receives that found no provided buffer left (`ENOBUFS`) and were asked again, and sends
    /// the kernel took only part of: what the tests check the driver survives.
    pub(super) no_buffers: Cell<u64>,
    pub(super) short_sends: Cell<u64>,
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
    pub(crate) fn install(size: RingSize) -> io::Result<Rc<Self>> {
        let ring = new_ring(size.entries)?;
        let bufs = BufRing::new(size.buffers, size.buffer_size, HEADROOM)?;
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
            no_buffers: Cell::new(0),
            short_sends: Cell::new(0),
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
    pub(crate) fn uninstall() {
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
    pub(crate) fn submit(&self) {
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
    pub(super) fn reap(&self) {
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
    pub(super) fn start(
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
    pub(super) fn take(&self, slot: usize, cx: &mut Context<'_>) -> Option<Taken> {
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
    pub(super) fn linger(&self, slot: usize) {
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

    pub(super) fn expire_lingering(&self, now: std::time::Instant) {
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
    pub(super) fn abandon(&self, slot: usize) {
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
