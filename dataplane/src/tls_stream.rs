//! A server-side TLS stream over rustls' buffer-level API that can be taken apart and rebuilt on
//! another core: the accepted socket and the TLS state travel as plain values (see
//! [`TlsParts`]), so a user session moves to the worker that owns its target's tunnel and its
//! bytes never cross cores after that. (tokio-rustls keeps its state private, so it cannot.)

use std::io::{self, BufRead, Read, Write};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use rustls::{ServerConfig, ServerConnection};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// An accepted, handshaken TLS connection as movable parts.
#[derive(Debug)]
pub struct TlsParts {
    pub socket: std::net::TcpStream,
    pub tls: ServerConnection,
    /// Plaintext already read from the TLS session but not yet consumed.
    pub leftover: Bytes,
}

pub struct TlsStream {
    io: TcpStream,
    tls: ServerConnection,
    read_eof: bool,
}

impl std::fmt::Debug for TlsStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsStream")
            .field("peer", &self.io.peer_addr().ok())
            .finish_non_exhaustive()
    }
}

/// `std::io` adapters over a polled socket: `Pending` becomes `WouldBlock`.
struct SyncIo<'a, 'b> {
    io: &'a mut TcpStream,
    cx: &'a mut Context<'b>,
}

impl Read for SyncIo<'_, '_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let mut rb = ReadBuf::new(buf);
        match Pin::new(&mut *self.io).poll_read(self.cx, &mut rb) {
            Poll::Ready(Ok(())) => Ok(rb.filled().len()),
            Poll::Ready(Err(e)) => Err(e),
            Poll::Pending => Err(io::ErrorKind::WouldBlock.into()),
        }
    }
}

impl Write for SyncIo<'_, '_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match Pin::new(&mut *self.io).poll_write(self.cx, buf) {
            Poll::Ready(r) => r,
            Poll::Pending => Err(io::ErrorKind::WouldBlock.into()),
        }
    }
    fn write_vectored(&mut self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        match Pin::new(&mut *self.io).poll_write_vectored(self.cx, bufs) {
            Poll::Ready(r) => r,
            Poll::Pending => Err(io::ErrorKind::WouldBlock.into()),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fn tls_error(e: rustls::Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

impl TlsStream {
    /// Run the server handshake on `io`.
    pub async fn accept(io: TcpStream, config: Arc<ServerConfig>) -> io::Result<Self> {
        let tls = ServerConnection::new(config).map_err(tls_error)?;
        let mut s = Self {
            io,
            tls,
            read_eof: false,
        };
        std::future::poll_fn(|cx| s.poll_handshake(cx)).await?;
        Ok(s)
    }

    fn poll_handshake(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        loop {
            // Write out whatever the handshake produced (including alerts on failure).
            while self.tls.wants_write() {
                match self.tls.write_tls(&mut SyncIo {
                    io: &mut self.io,
                    cx,
                }) {
                    Ok(_) => {}
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Poll::Pending,
                    Err(e) => return Poll::Ready(Err(e)),
                }
            }
            if !self.tls.is_handshaking() {
                return Poll::Ready(Ok(()));
            }
            match self.tls.read_tls(&mut SyncIo {
                io: &mut self.io,
                cx,
            }) {
                Ok(0) => {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "peer closed during the TLS handshake",
                    )));
                }
                Ok(_) => {
                    if let Err(e) = self.tls.process_new_packets() {
                        // Send the alert that says why, then fail.
                        let _ = self.tls.write_tls(&mut SyncIo {
                            io: &mut self.io,
                            cx,
                        });
                        return Poll::Ready(Err(tls_error(e)));
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Poll::Pending,
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }

    pub fn connection(&self) -> &ServerConnection {
        &self.tls
    }

    pub fn peer_addr(&self) -> io::Result<std::net::SocketAddr> {
        self.io.peer_addr()
    }

    /// Take the stream apart to move it to another thread.
    pub fn into_parts(self, leftover: Bytes) -> io::Result<TlsParts> {
        let socket = self.io.into_std()?;
        Ok(TlsParts {
            socket,
            tls: self.tls,
            leftover,
        })
    }

    /// Rebuild on the current thread's runtime.
    pub fn from_parts(parts: TlsParts) -> io::Result<(Self, Bytes)> {
        parts.socket.set_nonblocking(true)?;
        let io = TcpStream::from_std(parts.socket)?;
        Ok((
            Self {
                io,
                tls: parts.tls,
                read_eof: false,
            },
            parts.leftover,
        ))
    }

    /// Push buffered TLS records to the socket; Ready when none remain.
    fn poll_flush_tls(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.tls.wants_write() {
            match self.tls.write_tls(&mut SyncIo {
                io: &mut self.io,
                cx,
            }) {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Poll::Pending,
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
        Poll::Ready(Ok(()))
    }
}

impl AsyncRead for TlsStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            // Copy plaintext straight from rustls' buffers into the caller's (which may be
            // uninitialised: no zeroing first), as many records as fit.
            let mut copied = 0;
            let res = {
                let mut reader = this.tls.reader();
                loop {
                    if buf.remaining() == 0 {
                        break Ok(());
                    }
                    let n = match reader.fill_buf() {
                        Ok([]) => break Ok(()),
                        Ok(chunk) => {
                            let n = chunk.len().min(buf.remaining());
                            buf.put_slice(chunk.get(..n).unwrap_or_default());
                            n
                        }
                        Err(e) => break Err(e),
                    };
                    reader.consume(n);
                    copied += n;
                }
            };
            if copied > 0 {
                return Poll::Ready(Ok(()));
            }
            match res {
                Ok(()) => return Poll::Ready(Ok(())),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                // Peer closed without close_notify: report EOF (our protocols frame themselves).
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Poll::Ready(Ok(())),
                Err(e) => return Poll::Ready(Err(e)),
            }
            if this.read_eof {
                return Poll::Ready(Ok(()));
            }
            // Key updates and alerts may need writing before more can be read.
            if let Poll::Ready(Err(e)) = this.poll_flush_tls(cx) {
                return Poll::Ready(Err(e));
            }
            match this.tls.read_tls(&mut SyncIo {
                io: &mut this.io,
                cx,
            }) {
                Ok(0) => this.read_eof = true,
                Ok(_) => {
                    if let Err(e) = this.tls.process_new_packets() {
                        let _ = this.tls.write_tls(&mut SyncIo {
                            io: &mut this.io,
                            cx,
                        });
                        return Poll::Ready(Err(tls_error(e)));
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Poll::Pending,
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }
}

impl AsyncWrite for TlsStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        loop {
            // rustls buffers at most its buffer limit of plaintext; 0 means full.
            let n = this.tls.writer().write(buf)?;
            if n > 0 {
                // Best effort: start sending now; the rest goes out on later writes or flush.
                if let Poll::Ready(Err(e)) = this.poll_flush_tls(cx) {
                    return Poll::Ready(Err(e));
                }
                return Poll::Ready(Ok(n));
            }
            match this.poll_flush_tls(cx) {
                Poll::Ready(Ok(())) => {
                    if buf.is_empty() {
                        return Poll::Ready(Ok(0));
                    }
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        match this.poll_flush_tls(cx) {
            Poll::Ready(Ok(())) => Pin::new(&mut this.io).poll_flush(cx),
            other => other,
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.tls.send_close_notify();
        match this.poll_flush_tls(cx) {
            Poll::Ready(Ok(())) => Pin::new(&mut this.io).poll_shutdown(cx),
            other => other,
        }
    }
}
