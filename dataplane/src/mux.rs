//! The I/O driver around the sans-IO [`crate::tunnel::Connection`]: one tunnel per task pair
//! (reader, writer) on a single-threaded runtime, with its streams spliced to sockets or any
//! `AsyncRead + AsyncWrite`. State is shared with `Rc<RefCell<…>>`: everything of one tunnel lives
//! on one thread, so there are no locks on the data path. No `RefCell` borrow is held across an
//! `.await`.

use std::cell::RefCell;
use std::collections::{HashMap, VecDeque};
use std::rc::Rc;
use std::time::Instant;

use bytes::{Buf, Bytes};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::sync::Notify;

use crate::pool;

mod native;
use crate::tunnel::{
    Config, ConnError, Connection, Event, Framed, HEADER_LEN, Side, StreamError, StreamId, code,
};

/// What a tunnel tells its owner (besides stream data, which goes to the streams).
#[derive(Debug)]
pub enum TunnelEvent {
    /// The peer opened a stream: answer with [`Tunnel::accept`] or [`Tunnel::reject`].
    Incoming {
        stream: StreamId,
        target: String,
        metadata: Bytes,
    },
    Heartbeat(Bytes),
    GoAway {
        code: u16,
        message: String,
    },
}

#[derive(Debug, Default)]
struct Slot {
    inbox: VecDeque<Bytes>,
    fin: bool,
    reset: Option<u16>,
    open: Option<Result<(), (u16, String)>>,
    notify: Rc<Notify>,
}

struct Inner {
    conn: Connection,
    slots: HashMap<StreamId, Slot>,
    wake_writer: Rc<Notify>,
    /// Signalled when the peer's hello arrives or the tunnel closes.
    ready: Rc<Notify>,
    closed: Option<String>,
    events: EventSender,
    bytes_in: u64,
    bytes_out: u64,
    /// Sessions on QUIC streams of their own ([`Tunnel::attach_quic`]): the connection, the
    /// streams the peer opened that wait for an answer, the next id, how many are open.
    quic: Option<quinn::Connection>,
    native: HashMap<StreamId, (quinn::SendStream, quinn::RecvStream)>,
    next_native: StreamId,
    native_open: usize,
    /// Session streams the peer may open at once (raised as they open).
    native_allowance: u32,
}

/// Events of one tunnel, for its owner. Unlike a tokio mpsc channel (which allocates a block of
/// 32 slots up front), an idle tunnel's queue holds no allocation at all.
#[derive(Default)]
struct EventQueue {
    queue: VecDeque<TunnelEvent>,
    /// The tunnel is gone: no more events will come.
    closed: bool,
}

struct EventSender {
    shared: Rc<RefCell<EventQueue>>,
    notify: Rc<Notify>,
}

/// The receiving end of a tunnel's events (see [`TunnelEvent`]); ends when the tunnel is dropped.
pub struct Events {
    shared: Rc<RefCell<EventQueue>>,
    notify: Rc<Notify>,
}

impl std::fmt::Debug for Events {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Events").finish_non_exhaustive()
    }
}

fn event_queue() -> (EventSender, Events) {
    let shared = Rc::new(RefCell::new(EventQueue::default()));
    let notify = Rc::new(Notify::new());
    (
        EventSender {
            shared: Rc::clone(&shared),
            notify: Rc::clone(&notify),
        },
        Events { shared, notify },
    )
}

impl EventSender {
    fn send(&self, ev: TunnelEvent) {
        self.shared.borrow_mut().queue.push_back(ev);
        self.notify.notify_one();
    }
}

impl Drop for EventSender {
    fn drop(&mut self) {
        self.shared.borrow_mut().closed = true;
        self.notify.notify_one();
    }
}

impl Events {
    /// The next event, or `None` once the tunnel is gone and every event was taken.
    pub async fn recv(&mut self) -> Option<TunnelEvent> {
        loop {
            {
                let mut q = self.shared.borrow_mut();
                if let Some(ev) = q.queue.pop_front() {
                    if q.queue.is_empty() {
                        // Give the memory back: most tunnels see an event every few seconds.
                        q.queue = VecDeque::new();
                    }
                    return Some(ev);
                }
                if q.closed {
                    return None;
                }
            }
            self.notify.notified().await;
        }
    }
}

/// Write every buffer of `batch` in order (vectored where the writer supports it), then flush;
/// `batch` is empty afterwards.
async fn write_all_flush<W: AsyncWrite + Unpin>(
    w: &mut W,
    batch: &mut Vec<Bytes>,
) -> std::io::Result<()> {
    let mut first = 0;
    while first < batch.len() {
        let slices: Vec<std::io::IoSlice<'_>> = batch
            .iter()
            .skip(first)
            .map(|b| std::io::IoSlice::new(b))
            .collect();
        let mut n = w.write_vectored(&slices).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        for b in batch.iter_mut().skip(first) {
            if n >= b.len() {
                n -= b.len();
                first += 1;
            } else {
                b.advance(n);
                break;
            }
        }
    }
    batch.clear();
    w.flush().await
}

/// Frames (buffers) a tunnel writer hands to one vectored write, at most.
const WRITE_BATCH: usize = 16;
const WRITE_BATCH_BYTES: usize = 256 * 1024;

/// How much a spliced stream reads from its socket at once, at most (a busy stream) and at
/// least (a quiet one): the read size doubles after a read that filled it and halves after one
/// that used less than an eighth.
const SPLICE_READ: usize = 64 * 1024;
const SPLICE_READ_MIN: usize = 4 * 1024;

/// A bulk read's buffer: header room and the largest splice read.
const BULK_BUF: usize = HEADER_LEN + SPLICE_READ;
/// Bulk read buffers kept per thread for reuse.
const BULK_POOL_MAX: usize = 16;

thread_local! {
    static BULK_POOL: RefCell<Vec<Vec<u8>>> = const { RefCell::new(Vec::new()) };
}

/// A splice's read buffer: room for a frame header, then the read. It is initialized memory
/// (zeroed once, when allocated), so a reader writes into it as it is: the TLS stream decrypts
/// records straight into it, with no copy after the cipher and no zeroing before it. The frame
/// made in it is a view of it ([`Connection::send_framed`]); a bulk-sized buffer goes back to
/// its thread's pool when the last view is dropped (a fresh 64 KiB buffer per read faulted its
/// pages in anew each time the allocator had given them back: 14 % of the proxy's samples for
/// one stream).
struct ReadBuffer(Vec<u8>);

impl ReadBuffer {
    fn take(len: usize) -> Self {
        if len == BULK_BUF {
            Self(pool::take(&BULK_POOL, BULK_BUF))
        } else {
            Self(vec![0u8; len])
        }
    }
}

impl AsRef<[u8]> for ReadBuffer {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

impl AsMut<[u8]> for ReadBuffer {
    fn as_mut(&mut self) -> &mut [u8] {
        &mut self.0
    }
}

impl Drop for ReadBuffer {
    fn drop(&mut self) {
        if self.0.len() == BULK_BUF {
            pool::give(&BULK_POOL, BULK_POOL_MAX, std::mem::take(&mut self.0));
        }
    }
}

/// Size of each thread's shared read buffer (a read takes at most this much at once).
const READ_BUF: usize = 64 * 1024;

thread_local! {
    /// One read buffer per thread, shared by every tunnel the thread drives: tunnels are many
    /// and mostly idle, and a read is consumed before its poll returns.
    static READ_BUF_SHARED: RefCell<Box<[u8]>> = RefCell::new(vec![0u8; READ_BUF].into_boxed_slice());
}

/// Run `f` with the thread's read buffer (a private one if it is somehow already in use).
fn with_read_buf<R>(f: impl FnOnce(&mut [u8]) -> R) -> R {
    READ_BUF_SHARED.with(|cell| match cell.try_borrow_mut() {
        Ok(mut buf) => f(&mut buf),
        Err(_) => f(&mut vec![0u8; READ_BUF]),
    })
}

/// A handle to one tunnel; cheap to clone, single-threaded.
#[derive(Clone)]
pub struct Tunnel {
    inner: Rc<RefCell<Inner>>,
}

impl std::fmt::Debug for Tunnel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tunnel").finish_non_exhaustive()
    }
}

/// Why opening a stream failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OpenError {
    #[error("{0}")]
    Stream(#[from] StreamError),
    #[error("refused by the agent: {message} (code {code})")]
    Rejected { code: u16, message: String },
    #[error("tunnel closed: {0}")]
    Closed(String),
}

/// Bytes moved by one spliced stream.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SpliceStats {
    /// From the local io into the tunnel.
    pub to_tunnel: u64,
    /// From the tunnel to the local io.
    pub from_tunnel: u64,
    pub reset: bool,
}

impl Tunnel {
    /// Create a tunnel and the receiver of its events. Run it with [`Tunnel::run`].
    pub fn new(side: Side, config: Config) -> (Self, Events) {
        let (tx, rx) = event_queue();
        let inner = Inner {
            conn: Connection::new(side, config, Instant::now()),
            slots: HashMap::new(),
            wake_writer: Rc::new(Notify::new()),
            ready: Rc::new(Notify::new()),
            closed: None,
            events: tx,
            bytes_in: 0,
            bytes_out: 0,
            quic: None,
            native: HashMap::new(),
            next_native: native::NATIVE_ID_BASE,
            native_open: 0,
            native_allowance: crate::quic::FIRST_SESSIONS,
        };
        (
            Self {
                inner: Rc::new(RefCell::new(inner)),
            },
            rx,
        )
    }

    pub fn is_closed(&self) -> bool {
        self.inner.borrow().closed.is_some()
    }

    pub fn open_streams(&self) -> usize {
        let inner = self.inner.borrow();
        inner.slots.len() + inner.native_open
    }

    /// Bytes of input buffer the tunnel holds: none while it has no streams and waits.
    pub fn input_capacity(&self) -> usize {
        self.inner.borrow().conn.input_capacity()
    }

    /// See [`crate::tunnel::Connection::input_allocations`].
    pub fn input_allocations(&self) -> u64 {
        self.inner.borrow().conn.input_allocations()
    }

    /// Total payload bytes (received, sent) over this tunnel.
    pub fn bytes(&self) -> (u64, u64) {
        let i = self.inner.borrow();
        (i.bytes_in, i.bytes_out)
    }

    fn wake(&self) {
        self.inner.borrow().wake_writer.notify_one();
    }

    /// Read once from the transport and hand the bytes to the connection: `Ok(r)` with the
    /// connection's verdict on them, or `Err(reason)` when the transport failed or closed.
    fn poll_read_input<R: AsyncRead + Unpin>(
        &self,
        rd: &mut R,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<Result<(), ConnError>, String>> {
        use std::task::Poll;
        let mut inner = self.inner.borrow_mut();
        let read = if inner.conn.open_streams() > 0 {
            // While streams are open the connection keeps its input buffer anyway: read
            // straight into it, so received frames are not copied once more. The room lent is
            // initialized memory, so TLS decrypts records into it without zeroing it first. (A
            // `ReadBuf` keeps nothing between polls: a fresh one per poll is the same read.)
            let mut rb = tokio::io::ReadBuf::new(inner.conn.input_buffer(READ_BUF));
            match std::pin::Pin::new(&mut *rd).poll_read(cx, &mut rb) {
                Poll::Ready(Ok(())) if rb.filled().is_empty() => Ok(false),
                Poll::Ready(Ok(())) => {
                    let n = rb.filled().len();
                    inner.conn.input_filled(n);
                    inner.conn.process_input(Instant::now()).map(|()| true)
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(format!("read failed: {e}"))),
                // Reader and writer run in one task, and whatever ends a stream wakes the
                // writer: this read is polled again then and takes the branch below, which
                // releases what it reserved.
                Poll::Pending => return Poll::Pending,
            }
        } else {
            // Read into this thread's shared buffer and hand the bytes to the connection within
            // the same poll: an idle tunnel holds no read buffer. (A direct read that was waiting
            // when the last stream ended left room reserved in the input buffer: released here.)
            inner.conn.release_idle_input();
            drop(inner);
            let read = with_read_buf(|buf| {
                let mut rb = tokio::io::ReadBuf::new(buf);
                match std::pin::Pin::new(&mut *rd).poll_read(cx, &mut rb) {
                    Poll::Pending => Poll::Pending,
                    Poll::Ready(Err(e)) => Poll::Ready(Err(format!("read failed: {e}"))),
                    Poll::Ready(Ok(())) if rb.filled().is_empty() => Poll::Ready(Ok(Ok(false))),
                    Poll::Ready(Ok(())) => Poll::Ready(Ok(self
                        .inner
                        .borrow_mut()
                        .conn
                        .handle_input(rb.filled(), Instant::now())
                        .map(|()| true))),
                }
            });
            inner = self.inner.borrow_mut();
            match read {
                Poll::Ready(Ok(r)) => r,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            }
        };
        match read {
            Ok(false) => Poll::Ready(Err("the peer closed the connection".to_string())),
            r => {
                inner.dispatch();
                Poll::Ready(Ok(r.map(|_| ())))
            }
        }
    }

    /// Drive the tunnel over `io` until it ends; returns why it ended.
    pub async fn run<T: AsyncRead + AsyncWrite + 'static>(&self, io: T) -> String {
        let (mut rd, mut wr) = tokio::io::split(io);
        let reader = {
            let this = self.clone();
            async move {
                loop {
                    let read = std::future::poll_fn(|cx| this.poll_read_input(&mut rd, cx)).await;
                    match read {
                        Err(reason) => return reason,
                        Ok(result) => {
                            this.wake();
                            if let Err(e) = result {
                                return e.to_string();
                            }
                            if this.open_streams() > 0 {
                                // Let the streams' tasks take what this read delivered before
                                // reading more: the frames' payloads point into the input
                                // buffer, and once they are dropped the next read reuses it in
                                // place (read again at once, it had to allocate a fresh buffer
                                // and copy the partial frame over, faulting in new pages: a
                                // third of the receiving agent's samples for one stream).
                                tokio::task::yield_now().await;
                            }
                        }
                    }
                }
            }
        };
        let writer = {
            let this = self.clone();
            async move {
                let notify = this.inner.borrow().wake_writer.clone();
                let mut batch = Vec::new();
                loop {
                    let (deadline, closed) = {
                        let mut inner = this.inner.borrow_mut();
                        let mut len = 0;
                        while batch.len() < WRITE_BATCH && len < WRITE_BATCH_BYTES {
                            match inner.conn.poll_transmit() {
                                Some(b) => {
                                    len += b.len();
                                    batch.push(b);
                                }
                                None => break,
                            }
                        }
                        inner.dispatch();
                        (inner.conn.poll_timeout(), inner.conn.is_closed())
                    };
                    if !batch.is_empty() {
                        // One vectored write: a TLS writer makes the frames records in one
                        // batch and one send. Flushed too: it may keep what the socket did not
                        // take.
                        if let Err(e) = write_all_flush(&mut wr, &mut batch).await {
                            return format!("write failed: {e}");
                        }
                        continue;
                    }
                    if closed {
                        let _ = wr.shutdown().await;
                        return String::new();
                    }
                    let sleep = async {
                        match deadline {
                            Some(d) => {
                                tokio::time::sleep_until(tokio::time::Instant::from_std(d)).await
                            }
                            None => std::future::pending().await,
                        }
                    };
                    tokio::select! {
                        _ = notify.notified() => {}
                        _ = sleep => {
                            let r = {
                                let mut inner = this.inner.borrow_mut();
                                let r = inner.conn.handle_timeout(Instant::now());
                                inner.dispatch();
                                r
                            };
                            if let Err(e) = r {
                                // Flush the go-away that explains it (behind whatever was
                                // queued before it), then stop.
                                {
                                    let mut inner = this.inner.borrow_mut();
                                    while let Some(b) = inner.conn.poll_transmit() {
                                        batch.push(b);
                                    }
                                }
                                let _ = write_all_flush(&mut wr, &mut batch).await;
                                return e.to_string();
                            }
                        }
                    }
                }
            }
        };
        let reason = tokio::select! {
            r = reader => r,
            w = writer => w,
        };
        let reason = if reason.is_empty() {
            self.inner
                .borrow()
                .closed
                .clone()
                .unwrap_or_else(|| "closed".into())
        } else {
            reason
        };
        self.close(&reason);
        self.close_native(&reason);
        reason
    }

    /// Mark closed and wake every stream so it ends.
    pub fn close(&self, reason: &str) {
        let mut inner = self.inner.borrow_mut();
        if inner.closed.is_none() {
            inner.closed = Some(reason.to_owned());
        }
        inner.ready.notify_waiters();
        for slot in inner.slots.values_mut() {
            if slot.reset.is_none() {
                slot.reset = Some(code::CANCELLED);
            }
            if slot.open.is_none() {
                slot.open = Some(Err((code::UNAVAILABLE, format!("tunnel closed: {reason}"))));
            }
            slot.notify.notify_one();
        }
    }

    /// Ask the peer to drain; existing streams finish.
    pub fn go_away(&self, message: &str) {
        self.inner
            .borrow_mut()
            .conn
            .go_away(code::GOING_AWAY, message);
        self.wake();
    }

    pub fn send_heartbeat(&self, inventory: Bytes) {
        self.inner.borrow_mut().conn.send_heartbeat(inventory);
        self.wake();
    }

    /// Wait until the peer's hello has arrived (or the tunnel closed).
    pub async fn ready(&self) -> Result<(), OpenError> {
        loop {
            let notify = {
                let inner = self.inner.borrow();
                if let Some(reason) = &inner.closed {
                    return Err(OpenError::Closed(reason.clone()));
                }
                if inner.conn.is_ready() {
                    return Ok(());
                }
                inner.ready.clone()
            };
            let wait = notify.notified();
            tokio::pin!(wait);
            wait.as_mut().enable();
            // Re-check after registering, so a hello that raced in is not missed.
            if self.inner.borrow().conn.is_ready() || self.is_closed() {
                continue;
            }
            wait.await;
        }
    }

    /// Open a stream to `target` and wait for the peer's answer.
    pub async fn open(&self, target: &str, metadata: Bytes) -> Result<StreamHandle, OpenError> {
        self.ready().await?;
        let quic = self.inner.borrow().quic.clone();
        if let Some(conn) = quic {
            return self.open_native(conn, target, metadata).await;
        }
        let (id, notify) = {
            let mut inner = self.inner.borrow_mut();
            if let Some(reason) = &inner.closed {
                return Err(OpenError::Closed(reason.clone()));
            }
            let id = inner.conn.open(target, metadata)?;
            let slot = Slot::default();
            let notify = slot.notify.clone();
            inner.slots.insert(id, slot);
            (id, notify)
        };
        self.wake();
        loop {
            {
                let mut inner = self.inner.borrow_mut();
                match inner.slots.get_mut(&id).and_then(|s| s.open.take()) {
                    Some(Ok(())) => break,
                    Some(Err((code, message))) => {
                        inner.slots.remove(&id);
                        return Err(if code == code::UNAVAILABLE && inner.closed.is_some() {
                            OpenError::Closed(message)
                        } else {
                            OpenError::Rejected { code, message }
                        });
                    }
                    None => {}
                }
            }
            notify.notified().await;
        }
        Ok(StreamHandle {
            tunnel: self.clone(),
            id,
            notify,
            native: None,
        })
    }
}

impl Inner {
    /// Move connection events into stream slots and the owner's channel.
    fn dispatch(&mut self) {
        while let Some(ev) = self.conn.poll_event() {
            match ev {
                Event::Ready => self.ready.notify_waiters(),
                Event::Pong { .. } => {}
                Event::Incoming {
                    stream,
                    target,
                    metadata,
                } => {
                    self.slots.insert(
                        stream,
                        Slot {
                            open: Some(Ok(())),
                            ..Slot::default()
                        },
                    );
                    self.events.send(TunnelEvent::Incoming {
                        stream,
                        target,
                        metadata,
                    });
                }
                Event::Accepted { stream } => self.signal(stream, |s| s.open = Some(Ok(()))),
                Event::Rejected {
                    stream,
                    code,
                    message,
                } => self.signal(stream, |s| s.open = Some(Err((code, message)))),
                Event::Data { stream, data } => {
                    self.bytes_in += data.len() as u64;
                    self.signal(stream, |s| s.inbox.push_back(data));
                }
                Event::Writable { stream } => self.signal(stream, |_| {}),
                Event::Finished { stream } => self.signal(stream, |s| s.fin = true),
                Event::Reset { stream, code } => self.signal(stream, |s| s.reset = Some(code)),
                Event::Heartbeat { inventory } => {
                    self.events.send(TunnelEvent::Heartbeat(inventory));
                }
                Event::GoAway { code, message } => {
                    self.events.send(TunnelEvent::GoAway { code, message });
                }
            }
        }
    }

    fn signal(&mut self, stream: StreamId, f: impl FnOnce(&mut Slot)) {
        if let Some(slot) = self.slots.get_mut(&stream) {
            f(slot);
            slot.notify.notify_one();
        }
    }
}

/// One stream of a tunnel.
pub struct StreamHandle {
    tunnel: Tunnel,
    id: StreamId,
    notify: Rc<Notify>,
    /// A session on a QUIC stream of its own instead of a stream inside the tunnel.
    native: Option<Box<native::Native>>,
}

impl std::fmt::Debug for StreamHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamHandle")
            .field("id", &self.id)
            .finish()
    }
}

impl Tunnel {
    /// Accept a stream the peer opened (from [`TunnelEvent::Incoming`]).
    pub fn accept(&self, stream: StreamId) -> Result<StreamHandle, StreamError> {
        if let Some(handle) = self.accept_native(stream) {
            return Ok(handle);
        }
        let notify = {
            let mut inner = self.inner.borrow_mut();
            let notify = inner
                .slots
                .get(&stream)
                .map(|s| s.notify.clone())
                .ok_or(StreamError::UnknownStream(stream))?;
            inner.conn.accept(stream)?;
            notify
        };
        self.wake();
        Ok(StreamHandle {
            tunnel: self.clone(),
            id: stream,
            notify,
            native: None,
        })
    }

    /// Refuse a stream the peer opened, with a reason the other side will see.
    pub fn reject(&self, stream: StreamId, code: u16, message: &str) {
        if self.reject_native(stream, code, message) {
            return;
        }
        {
            let mut inner = self.inner.borrow_mut();
            inner.slots.remove(&stream);
            inner.conn.reject(stream, code, message);
        }
        self.wake();
    }
}

impl StreamHandle {
    pub fn id(&self) -> StreamId {
        self.id
    }

    /// Copy bytes both ways between this stream and `io` until both directions finish (or a
    /// reset). `leftover` is plaintext already read from `io` that belongs to the stream.
    pub async fn splice<IO: AsyncRead + AsyncWrite>(
        mut self,
        io: IO,
        leftover: Bytes,
    ) -> SpliceStats {
        if let Some(native) = self.native.as_mut() {
            return native::splice(native, io, leftover).await;
        }
        // One loop serves both directions on the one `io` (no split, whose lock every poll
        // would take): each turn it waits for whichever comes first of the write to `io` making
        // progress, a read from `io`, and the tunnel's signal. A write to `io` never holds up
        // reads from it: an application that answers while it reads (an echo, a shell running
        // `cat`) stops reading when its replies are not read, and a splice that only read once
        // its write was done would then wait on it for ever.
        let mut io = std::pin::pin!(io);
        let mut stats = SpliceStats::default();
        // Reads land behind room for a frame header, so the bytes read become a data frame in
        // place (`send_framed`): the payload is not copied again on its way to the tunnel. A
        // read the tunnel has not taken yet waits here (buffer, payload length).
        let mut framed: Option<(ReadBuffer, usize)> = None;
        // Bytes for the tunnel that have no room in front (`leftover`, or the rest of a read
        // that credit cut short): these go through `send`, which copies them into frames.
        let mut pending: Bytes = leftover;
        // A read buffer taken but not read into (the wait ended for something else).
        let mut spare: Option<ReadBuffer> = None;
        // What the tunnel delivered that `io` has not taken yet, whether `io` owes a flush for
        // what it took (a TLS writer may hold records until then), and whether the stream's end
        // is to be passed on (shutdown).
        let mut out = Bytes::new();
        let mut flush_owed = false;
        let mut shutdown_owed = false;
        let mut read_size = SPLICE_READ_MIN;
        let mut read_done = false;
        let mut write_done = false;
        let tunnel = self.tunnel.clone();
        let id = self.id;
        loop {
            // Push what we have read into the tunnel, as far as credit allows.
            if !pending.is_empty() {
                let r = tunnel.inner.borrow_mut().conn.send(id, &pending);
                match r {
                    Ok(n) => {
                        stats.to_tunnel += n as u64;
                        tunnel.inner.borrow_mut().bytes_out += n as u64;
                        let _ = pending.split_to(n);
                        tunnel.wake();
                    }
                    Err(_) => {
                        read_done = true;
                        pending.clear();
                    }
                }
            } else if let Some((buf, len)) = framed.take() {
                let r = tunnel.inner.borrow_mut().conn.send_framed(id, buf, len);
                match r {
                    Ok(Framed::Blocked(buf)) => framed = Some((buf, len)),
                    Ok(Framed::Sent { n, rest }) => {
                        stats.to_tunnel += n as u64;
                        tunnel.inner.borrow_mut().bytes_out += n as u64;
                        // Credit took part of it: the rest has no header room.
                        pending = rest;
                        tunnel.wake();
                    }
                    Err(_) => read_done = true,
                }
            }
            if out.is_empty() && !flush_owed && !shutdown_owed {
                // Take the next chunk for `io`, and learn whether the stream ended.
                let (chunk, fin, reset) = {
                    let mut inner = tunnel.inner.borrow_mut();
                    match inner.slots.get_mut(&id) {
                        Some(s) => (s.inbox.pop_front(), s.fin && s.inbox.is_empty(), s.reset),
                        None => (None, true, Some(code::CANCELLED)),
                    }
                };
                if reset.is_some() && chunk.is_none() {
                    stats.reset = reset != Some(code::NO_ERROR);
                    break;
                }
                if let Some(chunk) = chunk {
                    out = chunk;
                } else if fin && !write_done {
                    shutdown_owed = true;
                }
            }
            if read_done && write_done {
                break;
            }
            let can_read = !read_done && pending.is_empty() && framed.is_none();
            // One frame's payload per read, behind its header's room; the buffer is sized by
            // what the last reads brought, so a quiet (interactive) session waits on a small one.
            let limit = read_size.min(tunnel.inner.borrow().conn.max_payload());
            let mut buf = can_read.then(|| match spare.take() {
                Some(b) if b.0.len() == HEADER_LEN + limit => b,
                _ => ReadBuffer::take(HEADER_LEN + limit),
            });
            let notified = self.notify.notified();
            let mut notified = std::pin::pin!(notified);
            let turn = std::future::poll_fn(|cx| {
                use std::task::Poll;
                if !out.is_empty() {
                    match io.as_mut().poll_write(cx, &out) {
                        Poll::Ready(Ok(n)) if n > 0 => return Poll::Ready(Turn::Wrote(n)),
                        Poll::Ready(_) => return Poll::Ready(Turn::WriteFailed),
                        Poll::Pending => {}
                    }
                } else if flush_owed {
                    match io.as_mut().poll_flush(cx) {
                        Poll::Ready(Ok(())) => return Poll::Ready(Turn::Flushed),
                        Poll::Ready(Err(_)) => return Poll::Ready(Turn::WriteFailed),
                        Poll::Pending => {}
                    }
                } else if shutdown_owed {
                    // (A shutdown flushes first.) Its error changes nothing: the stream is done.
                    if io.as_mut().poll_shutdown(cx).is_ready() {
                        return Poll::Ready(Turn::ShutDown);
                    }
                }
                if let Some(b) = buf.as_mut() {
                    let mut rb =
                        tokio::io::ReadBuf::new(b.0.get_mut(HEADER_LEN..).unwrap_or_default());
                    if let Poll::Ready(r) = io.as_mut().poll_read(cx, &mut rb) {
                        return Poll::Ready(Turn::Read(r.map(|()| rb.filled().len())));
                    }
                }
                // The tunnel brought data, credit, an end or a reset. (While a write to `io`
                // is under way, new data waits in the inbox.)
                if notified.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(Turn::Signalled);
                }
                Poll::Pending
            })
            .await;
            match turn {
                Turn::Wrote(n) => {
                    let _ = out.split_to(n);
                    flush_owed = out.is_empty();
                    stats.from_tunnel += n as u64;
                    tunnel
                        .inner
                        .borrow_mut()
                        .conn
                        .consumed(id, n, Instant::now());
                    tunnel.wake();
                }
                Turn::Flushed => flush_owed = false,
                Turn::ShutDown => {
                    shutdown_owed = false;
                    write_done = true;
                }
                Turn::WriteFailed => {
                    tunnel.inner.borrow_mut().conn.reset(id, code::CANCELLED);
                    tunnel.wake();
                    stats.reset = true;
                    break;
                }
                Turn::Read(Ok(n)) if n > 0 => {
                    framed = buf.take().map(|b| (b, n));
                    if n >= limit {
                        read_size = (read_size * 2).min(SPLICE_READ);
                    } else if n < read_size / 8 {
                        read_size = (read_size / 2).max(SPLICE_READ_MIN);
                    }
                }
                Turn::Read(_) => {
                    read_done = true;
                    let _ = tunnel.inner.borrow_mut().conn.finish(id);
                    tunnel.wake();
                }
                Turn::Signalled => {}
            }
            // A buffer not read into waits for the next read.
            if let Some(b) = buf {
                spare = Some(b);
            }
        }
        let mut inner = tunnel.inner.borrow_mut();
        inner.slots.remove(&id);
        if stats.reset {
            inner.conn.reset(id, code::CANCELLED);
        }
        drop(inner);
        tunnel.wake();
        stats
    }
}

/// What ended one turn of a splice's wait.
enum Turn {
    /// `io` took this many bytes of what the tunnel delivered.
    Wrote(usize),
    /// `io` flushed what it took.
    Flushed,
    /// `io` was shut down for writing (the stream's end passed on).
    ShutDown,
    /// `io` refused the write or the flush.
    WriteFailed,
    /// A read from `io`: its length (0 at the end) or its error.
    Read(std::io::Result<usize>),
    /// The stream's signal: the tunnel delivered, granted credit, or ended the stream.
    Signalled,
}

impl Drop for StreamHandle {
    fn drop(&mut self) {
        // A handle dropped without splicing (e.g. the session failed) resets its stream.
        if let Ok(mut inner) = self.tunnel.inner.try_borrow_mut()
            && inner.slots.remove(&self.id).is_some()
        {
            inner.conn.reset(self.id, code::CANCELLED);
            inner.wake_writer.notify_one();
        }
    }
}

/// Errors a tunnel run can end with, for logs and metrics.
pub fn is_protocol_error(e: &ConnError) -> bool {
    matches!(
        e,
        ConnError::Frame(_) | ConnError::Protocol(_) | ConnError::Version(_)
    )
}
