//! A worker's TCP connection on whichever I/O backend the worker runs: epoll (tokio's reactor)
//! or io_uring ([`crate::uring`]). Everything above (TLS, tunnels, splices) sees one
//! `AsyncRead + AsyncWrite` type.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use crate::uring::{self, UringStream};

/// The I/O backend of the Proxy's workers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum IoBackend {
    /// io_uring when the kernel allows it, else epoll.
    #[default]
    Auto,
    IoUring,
    Epoll,
}

impl IoBackend {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Auto => "auto",
            Self::IoUring => "io_uring",
            Self::Epoll => "epoll",
        }
    }
}

impl std::str::FromStr for IoBackend {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(Self::Auto),
            "io_uring" | "io-uring" | "uring" => Ok(Self::IoUring),
            "epoll" => Ok(Self::Epoll),
            other => Err(format!(
                "unknown I/O backend `{other}` (expected auto, io_uring or epoll)"
            )),
        }
    }
}

impl std::fmt::Display for IoBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Set a TCP socket's congestion control to `cc` (`TCP_CONGESTION`), e.g. `cubic`; the error
/// names the algorithm and where the host lists the ones it has and allows.
pub fn set_tcp_congestion<S: std::os::fd::AsFd>(socket: &S, cc: &str) -> io::Result<()> {
    socket2::SockRef::from(socket)
        .set_tcp_congestion(cc.as_bytes())
        .map_err(|e| {
            io::Error::new(
                e.kind(),
                format!(
                    "TCP congestion control {cc:?}: {e} (available: \
                     /proc/sys/net/ipv4/tcp_available_congestion_control; without privilege, \
                     only net.ipv4.tcp_allowed_congestion_control)"
                ),
            )
        })
}

/// A TCP socket's congestion control (`TCP_CONGESTION`), e.g. `bbr`.
pub fn tcp_congestion<S: std::os::fd::AsFd>(socket: &S) -> io::Result<String> {
    let name = socket2::SockRef::from(socket).tcp_congestion()?;
    Ok(String::from_utf8_lossy(&name)
        .trim_end_matches('\0')
        .to_owned())
}

/// Whether `cc` can be set on this host's TCP sockets (a throwaway socket tries it), for
/// refusing a bad configuration at start rather than on every connection.
pub fn check_tcp_congestion(cc: &str) -> io::Result<()> {
    let probe = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
    set_tcp_congestion(&probe, cc)
}

/// Decide the backend for `wanted`: `Ok((backend, why))`, or an error when io_uring was
/// demanded and is not available.
pub fn choose(wanted: IoBackend) -> Result<(IoBackend, String), String> {
    choose_with(wanted, uring::probe)
}

fn choose_with(
    wanted: IoBackend,
    probe: impl FnOnce() -> Result<(), String>,
) -> Result<(IoBackend, String), String> {
    match wanted {
        IoBackend::Epoll => Ok((IoBackend::Epoll, "forced by configuration".into())),
        IoBackend::IoUring => match probe() {
            Ok(()) => Ok((IoBackend::IoUring, "forced by configuration".into())),
            Err(why) => Err(format!(
                "io_uring was asked for but is not available: {why}"
            )),
        },
        IoBackend::Auto => match probe() {
            Ok(()) => Ok((IoBackend::IoUring, "available".into())),
            Err(why) => Ok((IoBackend::Epoll, format!("io_uring unavailable: {why}"))),
        },
    }
}

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

/// Move what fits of `buf` into `out`; an emptied `buf` gives its memory back (idle
/// connections hold no buffers).
pub(crate) fn drain_into(buf: &mut BytesMut, out: &mut ReadBuf<'_>) {
    let n = buf.len().min(out.remaining());
    out.put_slice(buf.get(..n).unwrap_or_default());
    bytes::Buf::advance(buf, n);
    if buf.is_empty() {
        *buf = BytesMut::new();
    }
}

/// The backend of the current thread.
pub fn current_backend() -> IoBackend {
    if uring::current().is_some() {
        IoBackend::IoUring
    } else {
        IoBackend::Epoll
    }
}

/// Run `fut` on this thread as a Proxy worker on `backend` runs: a current-thread runtime and
/// a `LocalSet`, for io_uring with the ring installed and the batch submitted before the
/// thread sleeps. The ring is drained and removed after `fut` and its tasks are gone.
pub fn block_on_worker<F: std::future::Future>(
    backend: IoBackend,
    fut: F,
) -> io::Result<F::Output> {
    let mut builder = tokio::runtime::Builder::new_current_thread();
    builder.enable_all();
    let uring = backend == IoBackend::IoUring;
    if uring {
        builder.on_thread_park(|| {
            if let Some(d) = uring::current() {
                d.submit();
            }
        });
    }
    let rt = builder.build()?;
    let local = tokio::task::LocalSet::new();
    let out = local.block_on(&rt, async {
        if uring {
            uring::Driver::install()?;
        }
        Ok(fut.await)
    });
    // Tasks (and the connections they hold) go first, then the ring drains what they left.
    drop(local);
    drop(rt);
    uring::Driver::uninstall();
    out
}

/// Tests: run `test` on epoll, then on io_uring where the kernel has it (required when
/// `GATEHOUSE_PROXY_IO_BACKEND=io_uring`, as in CI's io_uring pass).
#[cfg(test)]
pub(crate) fn on_each_backend<F, Fut>(test: F)
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    #[allow(clippy::unwrap_used)]
    block_on_worker(IoBackend::Epoll, test()).unwrap();
    match uring::probe() {
        #[allow(clippy::unwrap_used)]
        Ok(()) => block_on_worker(IoBackend::IoUring, test()).unwrap(),
        Err(why) if std::env::var("GATEHOUSE_PROXY_IO_BACKEND").as_deref() == Ok("io_uring") => {
            #[allow(clippy::panic)]
            {
                panic!("io_uring required but unavailable: {why}")
            }
        }
        Err(why) => eprintln!("io_uring variant skipped: {why}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn denied() -> Result<(), String> {
        Err("io_uring_setup: Operation not permitted (os error 1)".into())
    }

    #[test]
    fn auto_falls_back_to_epoll_and_says_why() {
        let (b, why) = choose_with(IoBackend::Auto, denied).unwrap();
        assert_eq!(b, IoBackend::Epoll);
        assert!(why.contains("not permitted"), "{why}");
        let (b, _) = choose_with(IoBackend::Auto, || Ok(())).unwrap();
        assert_eq!(b, IoBackend::IoUring);
    }

    #[test]
    fn forced_backends_are_obeyed_or_refused() {
        let (b, _) = choose_with(IoBackend::Epoll, || Ok(())).unwrap();
        assert_eq!(b, IoBackend::Epoll);
        let err = choose_with(IoBackend::IoUring, denied).unwrap_err();
        assert!(err.contains("asked for"), "{err}");
        assert_eq!("epoll".parse::<IoBackend>().unwrap(), IoBackend::Epoll);
        assert_eq!("io_uring".parse::<IoBackend>().unwrap(), IoBackend::IoUring);
        assert!("kqueue".parse::<IoBackend>().is_err());
    }
}
