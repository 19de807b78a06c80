//! The I/O driver around the sans-IO [`gatehouse_proto::tunnel::Connection`]: one tunnel per task pair
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

use gatehouse_proto::tunnel::{
    Config, ConnError, Connection, Event, Side, StreamError, StreamId, code,
};

mod events;
mod native;
mod splice;

use events::{EventSender, event_queue};
pub use events::{Events, TunnelEvent};
pub use splice::{SpliceStats, StreamHandle};

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
            native_allowance: crate::io::quic::FIRST_SESSIONS,
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

    /// See [`gatehouse_proto::tunnel::Connection::input_allocations`].
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

/// Errors a tunnel run can end with, for logs and metrics.
pub fn is_protocol_error(e: &ConnError) -> bool {
    matches!(
        e,
        ConnError::Frame(_) | ConnError::Protocol(_) | ConnError::Version(_)
    )
}
