//! A listening socket accepting through one multishot accept operation.

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::rc::Rc;
use std::task::{Context, Poll};

use io_uring::{opcode, types};

use super::driver::{Driver, Kind, Taken};
use super::stream::{UringStream, os_error};

/// A listening socket accepting through one multishot accept.
pub(crate) struct UringListener {
    fd: OwnedFd,
    driver: Rc<Driver>,
    accept: Option<usize>,
}

impl std::fmt::Debug for UringListener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UringListener")
            .field("fd", &self.fd.as_raw_fd())
            .finish_non_exhaustive()
    }
}

impl UringListener {
    pub(crate) fn new(listener: std::net::TcpListener, driver: Rc<Driver>) -> io::Result<Self> {
        listener.set_nonblocking(false)?;
        Ok(Self {
            fd: OwnedFd::from(listener),
            driver,
            accept: None,
        })
    }

    pub(crate) async fn accept(&mut self) -> io::Result<(UringStream, SocketAddr)> {
        std::future::poll_fn(|cx| self.poll_accept(cx)).await
    }

    fn poll_accept(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<(UringStream, SocketAddr)>> {
        loop {
            let slot = match self.accept {
                Some(s) => s,
                None => {
                    let fd = self.fd.as_raw_fd();
                    let s = self.driver.start(Kind::Accept, None, |_| {
                        opcode::AcceptMulti::new(types::Fd(fd))
                            .flags(libc::SOCK_CLOEXEC)
                            .build()
                    });
                    self.accept = Some(s);
                    s
                }
            };
            let Some(Taken { c, done, .. }) = self.driver.take(slot, cx) else {
                return Poll::Pending;
            };
            if done {
                // The kernel ended the multishot (an error, or it had to): arm a new one next.
                self.accept = None;
            }
            if c.result < 0 {
                return Poll::Ready(Err(os_error(c.result)));
            }
            // SAFETY: a successful accept's result is a new descriptor that nobody else owns.
            let socket = unsafe { std::net::TcpStream::from_raw_fd(c.result) };
            // Accepted without SOCK_NONBLOCK: blocking already, no ioctl needed.
            let stream = UringStream::blocking(socket, Rc::clone(&self.driver));
            let peer = match stream.peer_addr() {
                Ok(p) => p,
                // Reset before we looked: next.
                Err(_) => continue,
            };
            return Poll::Ready(Ok((stream, peer)));
        }
    }
}

impl Drop for UringListener {
    fn drop(&mut self) {
        if let Some(slot) = self.accept.take() {
            self.driver.submit();
            self.driver.abandon(slot);
        }
    }
}
