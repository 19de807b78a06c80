//! The send path: plaintext in, records out. Several writes (a tunnel's frames) are sealed into
//! shared records in one batch and leave in one send; on io_uring straight into the socket's
//! send queue, else through the thread's scratch buffer, and only what the socket does not take
//! is kept, up to a cap past which writers wait.

use std::cell::RefCell;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, BytesMut};
use rustls::unbuffered::{ConnectionState, EncryptError, UnbufferedStatus};
use tokio::io::AsyncWrite;

use super::incoming::process;
use super::side::{Engine, TlsSide, tls_error};
use super::stream::TlsStream;
use crate::io::socket::Socket;

/// Plaintext encrypted per `poll_write` at most (four full records).
const WRITE_CHUNK: usize = 64 * 1024;
/// Room for the records of one `WRITE_CHUNK` (header, content type and tag per record).
pub(super) const WRITE_SCRATCH: usize = WRITE_CHUNK + 1024;

thread_local! {
    /// Records are encrypted here and written from here; only what the socket does not take
    /// is copied into the connection's own `outgoing`.
    static SCRATCH: RefCell<Vec<u8>> = RefCell::new(vec![0u8; WRITE_SCRATCH]);
}

impl<C: TlsSide> TlsStream<C> {
    /// Push `outgoing` to the socket; Ready when it is empty.
    pub(super) fn poll_flush_out(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while !self.buf.outgoing.is_empty() {
            match Pin::new(&mut self.io).poll_write(cx, &self.buf.outgoing) {
                Poll::Ready(Ok(0)) => {
                    return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                }
                Poll::Ready(Ok(n)) => {
                    self.buf.outgoing.advance(n);
                    self.buf.held = self.buf.held.saturating_sub(n);
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            }
        }
        // Idle connections keep no send buffer. (Not `capacity() > 0`: a buffer filled to its
        // end and then drained has no capacity left but still owns its allocation.)
        self.buf.outgoing = BytesMut::new();
        Poll::Ready(Ok(()))
    }

    /// Encrypt up to [`WRITE_CHUNK`] of `data` into `dst`; returns (plaintext taken, bytes of
    /// records written). Records the connection must send first (a key update) go to `outgoing`.
    fn encrypt_into(&mut self, data: &[u8], dst: &mut [u8]) -> io::Result<(usize, usize)> {
        let data = data.get(..data.len().min(WRITE_CHUNK)).unwrap_or_default();
        for _ in 0..8 {
            let Engine::Rustls(tls) = &mut self.tls else {
                return Err(tls_error("not a rustls record layer"));
            };
            // rustls sees the connection's unconsumed ciphertext on every call (it keeps
            // offsets into it); at rest that is at most an incomplete record.
            let UnbufferedStatus { discard, state } = tls.process(&mut self.buf.incoming);
            match state {
                Ok(ConnectionState::WriteTraffic(mut w)) => {
                    let r = w.encrypt(data, dst);
                    if discard > 0 {
                        self.buf
                            .incoming
                            .drain(..discard.min(self.buf.incoming.len()));
                    }
                    return match r {
                        Ok(n) => Ok((data.len(), n)),
                        Err(EncryptError::InsufficientSize(e)) => Err(tls_error(format!(
                            "encrypt buffer too small ({} bytes needed)",
                            e.required_size
                        ))),
                        Err(e) => Err(tls_error(e)),
                    };
                }
                Ok(ConnectionState::EncodeTlsData(_) | ConnectionState::TransmitTlsData(_)) => {
                    let mut incoming = std::mem::take(&mut self.buf.incoming);
                    let mut used = incoming.len();
                    let r = process(&mut self.tls, &mut self.buf, &mut incoming, &mut used, None);
                    incoming.truncate(used);
                    self.buf.incoming = incoming;
                    r?;
                }
                Ok(_) => {
                    return Err(io::Error::new(
                        io::ErrorKind::BrokenPipe,
                        "the TLS session is closed",
                    ));
                }
                Err(e) => return Err(tls_error(e)),
            }
        }
        Err(tls_error("TLS state did not settle for writing"))
    }

    /// Queue close_notify.
    pub(super) fn queue_close_notify(&mut self) -> io::Result<()> {
        let tls = match &mut self.tls {
            Engine::Rustls(tls) => tls,
            Engine::Records(records) => {
                self.sent_close_notify = true;
                records.push_alert(&mut self.buf.outgoing, None);
                return Ok(());
            }
        };
        let UnbufferedStatus { discard, state } = tls.process(&mut self.buf.incoming);
        if let Ok(ConnectionState::WriteTraffic(mut w)) = state {
            self.sent_close_notify = true;
            let start = self.buf.outgoing.len();
            self.buf.outgoing.resize(start + 64, 0);
            let r = w.queue_close_notify(self.buf.outgoing.get_mut(start..).unwrap_or_default());
            if discard > 0 {
                self.buf
                    .incoming
                    .drain(..discard.min(self.buf.incoming.len()));
            }
            match r {
                Ok(n) => self.buf.outgoing.truncate(start + n),
                Err(e) => {
                    self.buf.outgoing.truncate(start);
                    return Err(tls_error(e));
                }
            }
        }
        Ok(())
    }
}

/// At most this much encrypted data waits in a connection's send buffer before writes wait.
pub(super) const MAX_OUTGOING: usize = 128 * 1024;

/// What [`TlsStream::encrypt_slices`] did.
struct Encrypted {
    /// Plaintext bytes taken.
    taken: usize,
    /// Record bytes written.
    written: usize,
    /// rustls queued a message into `outgoing` mid-batch (e.g. a key update): where in the
    /// records those that must follow it begin, and where in `outgoing` the message begins.
    split: Option<(usize, usize)>,
}

impl<C: TlsSide> TlsStream<C> {
    /// Encrypt `bufs` in order (whole slices while [`WRITE_CHUNK`] of plaintext and the
    /// destination allow) into `dst` as records of their own per slice.
    fn encrypt_slices(
        &mut self,
        bufs: &[io::IoSlice<'_>],
        dst: &mut [u8],
    ) -> io::Result<Encrypted> {
        if let Engine::Records(records) = &mut self.tls {
            // Records are filled across the slices (a tunnel's frames share them).
            let (taken, written) = records.seal(bufs, WRITE_CHUNK, dst).map_err(tls_error)?;
            return Ok(Encrypted {
                taken,
                written,
                split: None,
            });
        }
        let (mut taken, mut written) = (0, 0);
        for slice in bufs.iter().filter(|b| !b.is_empty()) {
            let take = slice.len().min(WRITE_CHUNK - taken);
            // Each record adds its header, content type and tag (22 bytes; 64 is generous).
            let need = take + take.div_ceil(16 * 1024) * 64;
            let room = dst.len() - written;
            if take == 0 || (taken > 0 && room < need) {
                break;
            }
            let queued_before = self.buf.outgoing.len();
            let data = slice.get(..take).unwrap_or_default();
            let r = self.encrypt_into(data, dst.get_mut(written..).unwrap_or_default());
            let (t, w) = match r {
                Ok(tw) => tw,
                // What was taken is accepted; the error comes back on the next call.
                Err(_) if taken > 0 => break,
                Err(e) => return Err(e),
            };
            taken += t;
            written += w;
            if self.buf.outgoing.len() != queued_before {
                let split = Some((written - w, queued_before));
                return Ok(Encrypted {
                    taken,
                    written,
                    split,
                });
            }
            if t < slice.len() {
                break;
            }
        }
        Ok(Encrypted {
            taken,
            written,
            split: None,
        })
    }

    fn poll_write_slices(
        &mut self,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        if let Some(why) = &self.failed {
            return Poll::Ready(Err(tls_error(why)));
        }
        if bufs.iter().all(|b| b.is_empty()) {
            return Poll::Ready(Ok(0));
        }
        // Backpressure: a socket that does not drain stops the writer, not memory growth.
        if self.buf.outgoing.len() >= MAX_OUTGOING {
            match self.poll_flush_out(cx) {
                Poll::Ready(Ok(())) => {}
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            }
        }
        if self.buf.outgoing.is_empty()
            && let Socket::Uring(u) = &mut self.io
        {
            // io_uring: records are encrypted straight into the socket's send queue.
            let mut q = match u.poll_queue(cx, WRITE_SCRATCH) {
                Poll::Ready(Ok(q)) => q,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            };
            let r = self.encrypt_slices(bufs, q.spare());
            if let Ok(Encrypted { written, split, .. }) = r {
                q.commit(written);
                if let Some((from, _)) = split {
                    // Records rustls had to send first (a key update) go before the rest: the
                    // queue is sent before `outgoing`, which was empty.
                    let records = q.uncommit(written - from);
                    self.buf.outgoing.extend_from_slice(&records);
                }
            }
            if let Socket::Uring(u) = &mut self.io {
                u.requeue(q);
            }
            let taken = r?.taken;
            if !self.buf.outgoing.is_empty()
                && let Poll::Ready(Err(e)) = self.poll_flush_out(cx)
            {
                return Poll::Ready(Err(e));
            }
            return Poll::Ready(Ok(taken));
        }
        SCRATCH.with(|cell| {
            let mut private = Vec::new();
            let mut guard = cell.try_borrow_mut();
            let scratch: &mut Vec<u8> = match guard.as_deref_mut() {
                Ok(v) => v,
                Err(_) => &mut private,
            };
            if scratch.len() < WRITE_SCRATCH {
                scratch.resize(WRITE_SCRATCH, 0);
            }
            let waiting = !self.buf.outgoing.is_empty();
            let Encrypted {
                taken,
                written,
                split,
            } = self.encrypt_slices(bufs, scratch)?;
            let records = scratch.get(..written).unwrap_or_default();
            if let Some((from, at)) = split {
                // A message rustls queued mid-batch (a key update) goes between the records
                // before it and those after it; what waited before all of them stays first.
                let mut queued = std::mem::take(&mut self.buf.outgoing);
                let message = queued.split_off(at.min(queued.len()));
                let (before, rest) = records.split_at(from.min(records.len()));
                self.buf.outgoing = queued;
                self.buf.outgoing.extend_from_slice(before);
                self.buf.outgoing.extend_from_slice(&message);
                self.buf.outgoing.extend_from_slice(rest);
            } else if waiting {
                // Order on the wire: whatever already waits goes first.
                self.buf.outgoing.extend_from_slice(records);
            }
            if waiting || split.is_some() {
                if let Poll::Ready(Err(e)) = self.poll_flush_out(cx) {
                    return Poll::Ready(Err(e));
                }
                return Poll::Ready(Ok(taken));
            }
            let mut sent = 0;
            while sent < records.len() {
                match Pin::new(&mut self.io).poll_write(cx, records.get(sent..).unwrap_or_default())
                {
                    Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                    Poll::Ready(Ok(n)) => sent += n,
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                    // The rest waits in the connection's buffer (the write is accepted).
                    Poll::Pending => break,
                }
            }
            self.buf
                .outgoing
                .extend_from_slice(records.get(sent..).unwrap_or_default());
            Poll::Ready(Ok(taken))
        })
    }
}

impl<C: TlsSide> AsyncWrite for TlsStream<C> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.get_mut()
            .poll_write_slices(cx, &[io::IoSlice::new(data)])
    }

    /// Several buffers (e.g. a tunnel's queued frames) become records in one batch and leave
    /// in one send.
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.get_mut().poll_write_slices(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        match this.poll_flush_out(cx) {
            Poll::Ready(Ok(())) => Pin::new(&mut this.io).poll_flush(cx),
            other => other,
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.failed.is_none() && !this.sent_close_notify {
            this.queue_close_notify()?;
        }
        match this.poll_flush_out(cx) {
            Poll::Ready(Ok(())) => Pin::new(&mut this.io).poll_shutdown(cx),
            other => other,
        }
    }
}
