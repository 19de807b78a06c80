//! Splicing one tunnel stream to a local `AsyncRead + AsyncWrite` (a user's TLS session on the
//! Proxy; an SSH server or an app's socket on an agent): both directions in one loop, reads
//! framed in place behind room for a header, credit from the tunnel as the local side drains.

use std::cell::RefCell;
use std::rc::Rc;
use std::time::Instant;

use bytes::Bytes;
use gatehouse_proto::pool;
use gatehouse_proto::tunnel::{Framed, HEADER_LEN, StreamId, code};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::Notify;

use super::{Tunnel, native};

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
pub(crate) struct ReadBuffer(Vec<u8>);

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

/// Bytes moved by one spliced stream.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SpliceStats {
    /// From the local io into the tunnel.
    pub to_tunnel: u64,
    /// From the tunnel to the local io.
    pub from_tunnel: u64,
    pub reset: bool,
}

/// One stream of a tunnel.
pub struct StreamHandle {
    pub(super) tunnel: Tunnel,
    pub(super) id: StreamId,
    pub(super) notify: Rc<Notify>,
    /// A session on a QUIC stream of its own instead of a stream inside the tunnel.
    pub(super) native: Option<Box<native::Native>>,
}

impl std::fmt::Debug for StreamHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamHandle")
            .field("id", &self.id)
            .finish()
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
