//! Standard input and output for `gsh proxy ssh`, the ProxyCommand every OpenSSH session through
//! Gatehouse runs: a thread each doing blocking I/O in large reads and writes, joined to the
//! async side by bounded channels of chunks. `tokio::io::stdin` hands each read to the blocking
//! pool (one thread hand-off per read) and `tokio::io::copy` reads 8 KiB at a time, which made
//! the client, not the network, the limit of an `scp` through the proxy.

use std::future::Future;
use std::io::{Read, Write};
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{Buf, Bytes};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::mpsc;

/// The largest single read from stdin.
const READ_SIZE: usize = 256 * 1024;
/// Chunks in flight each way: the backpressure between the threads and the session.
const DEPTH: usize = 8;

/// Standard input as `AsyncRead`, read by a thread of its own.
pub struct Stdin {
    rx: mpsc::Receiver<std::io::Result<Bytes>>,
    chunk: Bytes,
}

/// Start the reader thread. It stops at end of input, on an error, or when `Stdin` is dropped
/// (after its next read returns).
pub fn stdin() -> Stdin {
    let (tx, rx) = mpsc::channel(DEPTH);
    std::thread::spawn(move || {
        let mut input = std::io::stdin().lock();
        loop {
            let mut buf = vec![0u8; READ_SIZE];
            let msg = match input.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    buf.truncate(n);
                    Ok(Bytes::from(buf))
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => Err(e),
            };
            let last = msg.is_err();
            if tx.blocking_send(msg).is_err() || last {
                break;
            }
        }
    });
    Stdin {
        rx,
        chunk: Bytes::new(),
    }
}

impl AsyncRead for Stdin {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if self.chunk.is_empty() {
            match ready!(self.rx.poll_recv(cx)) {
                Some(Ok(chunk)) => self.chunk = chunk,
                Some(Err(e)) => return Poll::Ready(Err(e)),
                None => return Poll::Ready(Ok(())), // end of input
            }
        }
        let n = self.chunk.len().min(buf.remaining());
        buf.put_slice(self.chunk.get(..n).unwrap_or_default());
        self.chunk.advance(n);
        Poll::Ready(Ok(()))
    }
}

type Reserve = Pin<
    Box<dyn Future<Output = Result<mpsc::OwnedPermit<Bytes>, mpsc::error::SendError<()>>> + Send>,
>;

/// Standard output as `AsyncWrite`, written by a thread of its own. A write is accepted once the
/// thread has room for it; `shutdown` waits until everything queued is written.
pub struct Stdout {
    tx: Option<mpsc::Sender<Bytes>>,
    reserving: Option<Reserve>,
    done: Option<tokio::sync::oneshot::Receiver<std::io::Result<()>>>,
}

/// Start the writer thread. It writes straight to file descriptor 1 (a duplicate of it), not
/// through std's line buffer.
pub fn stdout() -> std::io::Result<Stdout> {
    use std::os::fd::AsFd;
    let mut out = std::fs::File::from(std::io::stdout().as_fd().try_clone_to_owned()?);
    let (tx, mut rx) = mpsc::channel::<Bytes>(DEPTH);
    let (done_tx, done_rx) = tokio::sync::oneshot::channel();
    std::thread::spawn(move || {
        let mut result = Ok(());
        while let Some(chunk) = rx.blocking_recv() {
            if let Err(e) = out.write_all(&chunk) {
                result = Err(e);
                break;
            }
        }
        let _ = done_tx.send(result);
    });
    Ok(Stdout {
        tx: Some(tx),
        reserving: None,
        done: Some(done_rx),
    })
}

fn gone() -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::BrokenPipe, "stdout is closed")
}

impl AsyncWrite for Stdout {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = &mut *self;
        let Some(tx) = this.tx.as_ref() else {
            return Poll::Ready(Err(gone()));
        };
        let permit = match this.reserving.as_mut() {
            Some(reserve) => {
                let permit = ready!(reserve.as_mut().poll(cx));
                this.reserving = None;
                permit.map_err(|_| gone())?
            }
            None => match tx.clone().try_reserve_owned() {
                Ok(permit) => permit,
                Err(mpsc::error::TrySendError::Full(tx)) => {
                    let mut reserve: Reserve = Box::pin(tx.reserve_owned());
                    let polled = reserve.as_mut().poll(cx);
                    match polled {
                        Poll::Ready(permit) => permit.map_err(|_| gone())?,
                        Poll::Pending => {
                            this.reserving = Some(reserve);
                            return Poll::Pending;
                        }
                    }
                }
                Err(mpsc::error::TrySendError::Closed(_)) => return Poll::Ready(Err(gone())),
            },
        };
        permit.send(Bytes::copy_from_slice(buf));
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        // The thread writes each chunk as it arrives, unbuffered.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        // The thread drains what is queued, then ends.
        self.tx = None;
        self.reserving = None;
        let Some(done) = self.done.as_mut() else {
            return Poll::Ready(Ok(()));
        };
        let result = ready!(Pin::new(done).poll(cx));
        self.done = None;
        Poll::Ready(result.unwrap_or(Ok(())))
    }
}
