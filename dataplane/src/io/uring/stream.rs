//! A TCP connection served through the worker's io_uring: receives into provided buffers
//! (decrypted in place by `tls` where it can), sends from buffers the driver owns while the
//! kernel reads them, with a plain non-blocking `recv`/`send` first where the socket is likely
//! ready.

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, OwnedFd};
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll};

use bytes::BytesMut;
use io_uring::{cqueue, opcode, squeue, types};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::driver::{Completion, Driver, Kind, Taken};
use super::send_buf::{SEND_BUF, SendBuf};
use super::{BGID, HEADROOM};

/// A TCP connection served through the worker's io_uring.
pub struct UringStream {
    pub(super) fd: OwnedFd,
    driver: Rc<Driver>,
    /// The receive in flight.
    recv: Option<usize>,
    /// Received bytes the reader could not take yet.
    pending: BytesMut,
    eof: bool,
    /// The send in flight (its bytes live in its op slot).
    pub(super) send: Option<usize>,
    /// Bytes written while a send is in flight.
    pub(super) queued: Option<SendBuf>,
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

pub(super) fn os_error(result: i32) -> io::Error {
    io::Error::from_raw_os_error(-result)
}

impl UringStream {
    /// Serve `socket` through `driver` (the socket is put in blocking mode: io_uring waits for
    /// readiness itself).
    pub(crate) fn new(socket: std::net::TcpStream, driver: Rc<Driver>) -> io::Result<Self> {
        socket.set_nonblocking(false)?;
        Ok(Self::blocking(socket, driver))
    }

    /// `new` for a socket known to be in blocking mode already (one the ring accepted).
    pub(super) fn blocking(socket: std::net::TcpStream, driver: Rc<Driver>) -> Self {
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

    pub(crate) fn peer_addr(&self) -> io::Result<SocketAddr> {
        self.sock()
            .peer_addr()?
            .as_socket()
            .ok_or_else(|| io::Error::other("not an IP socket"))
    }

    pub(crate) fn set_nodelay(&self, on: bool) -> io::Result<()> {
        self.sock().set_tcp_nodelay(on)
    }

    /// The socket back, with bytes received but not read; fails while operations are in flight.
    pub(crate) fn into_std(mut self) -> io::Result<(std::net::TcpStream, BytesMut)> {
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
        let len = len.clamp(1, self.driver.bufs.size) as u32;
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
    pub(crate) fn poll_recv_with<R>(
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
                self.driver.no_buffers.set(self.driver.no_buffers.get() + 1);
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
    pub(crate) fn data_waiting(&self) -> bool {
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
                    self.driver
                        .short_sends
                        .set(self.driver.short_sends.get() + 1);
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
    pub(crate) fn poll_queue(
        &mut self,
        cx: &mut Context<'_>,
        room: usize,
    ) -> Poll<io::Result<SendBuf>> {
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
    pub(crate) fn requeue(&mut self, q: SendBuf) {
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
            crate::io::drain_into(&mut this.pending, rb);
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
                    this.driver.no_buffers.set(this.driver.no_buffers.get() + 1);
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
