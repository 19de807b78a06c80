//! A worker's TCP connection and listening socket on whichever I/O backend the worker runs:
//! epoll (tokio's reactor) or io_uring ([`super::uring`]). Everything above (TLS, tunnels,
//! splices) sees one `AsyncRead + AsyncWrite` type.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};

use super::uring::{self, UringListener, UringStream};

/// A connection on the worker's backend.
#[derive(Debug)]
pub enum Socket {
    Epoll(TcpStream),
    Uring(UringStream),
}

impl From<TcpStream> for Socket {
    fn from(s: TcpStream) -> Self {
        Self::Epoll(s)
    }
}

impl From<UringStream> for Socket {
    fn from(s: UringStream) -> Self {
        Self::Uring(s)
    }
}

impl Socket {
    /// Adopt `socket` on the current thread's backend (io_uring if the thread runs a ring).
    pub fn from_std(socket: std::net::TcpStream) -> io::Result<Self> {
        match uring::current() {
            Some(driver) => Ok(Self::Uring(UringStream::new(socket, driver)?)),
            None => {
                socket.set_nonblocking(true)?;
                Ok(Self::Epoll(TcpStream::from_std(socket)?))
            }
        }
    }

    /// The socket as a std value to move to another thread, with bytes already received from
    /// it that nobody read.
    pub fn into_std(self) -> io::Result<(std::net::TcpStream, BytesMut)> {
        match self {
            Self::Epoll(s) => Ok((s.into_std()?, BytesMut::new())),
            Self::Uring(s) => s.into_std(),
        }
    }

    pub fn peer_addr(&self) -> io::Result<SocketAddr> {
        match self {
            Self::Epoll(s) => s.peer_addr(),
            Self::Uring(s) => s.peer_addr(),
        }
    }

    pub fn set_nodelay(&self, on: bool) -> io::Result<()> {
        match self {
            Self::Epoll(s) => s.set_nodelay(on),
            Self::Uring(s) => s.set_nodelay(on),
        }
    }
}

impl AsyncRead for Socket {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Epoll(s) => Pin::new(s).poll_read(cx, buf),
            Self::Uring(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Socket {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Self::Epoll(s) => Pin::new(s).poll_write(cx, buf),
            Self::Uring(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Epoll(s) => Pin::new(s).poll_flush(cx),
            Self::Uring(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Epoll(s) => Pin::new(s).poll_shutdown(cx),
            Self::Uring(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

/// A worker's listening socket on its backend.
#[derive(Debug)]
pub(crate) enum Listener {
    Epoll(TcpListener),
    Uring(UringListener),
}

impl Listener {
    /// Serve `listener` on the current thread's backend (io_uring if the thread runs a ring).
    pub(crate) fn from_std(listener: std::net::TcpListener) -> io::Result<Self> {
        match uring::current() {
            Some(d) => UringListener::new(listener, d).map(Self::Uring),
            None => TcpListener::from_std(listener).map(Self::Epoll),
        }
    }

    pub(crate) async fn accept(&mut self) -> io::Result<(Socket, SocketAddr)> {
        match self {
            Self::Epoll(l) => l.accept().await.map(|(s, a)| (Socket::Epoll(s), a)),
            Self::Uring(l) => l.accept().await.map(|(s, a)| (Socket::Uring(s), a)),
        }
    }
}
