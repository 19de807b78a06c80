//! The data plane's TLS stream, on rustls' unbuffered API: the Proxy's server side
//! ([`TlsStream::accept`]) and the agents' client side ([`TlsStream::connect`]).
//!
//! Why not tokio-rustls or rustls' buffered `ServerConnection`:
//! - the accepted socket and TLS state must move to another core as plain values (see
//!   [`super::TlsParts`]), so a user session runs on the worker that owns its target's tunnel;
//! - an idle connection should own no buffers. The buffered API keeps a 4 KiB receive buffer per
//!   connection forever; here ciphertext is read into one buffer per thread and decrypted in place
//!   there, and a connection keeps bytes only while a record is split across reads, while
//!   decrypted data waits for a reader with a smaller buffer, or while the socket does not take
//!   all it was given. Each of those buffers is released when it empties.

use std::cell::RefCell;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use rustls::client::UnbufferedClientConnection;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::server::UnbufferedServerConnection;
use rustls::{ClientConfig, HandshakeKind, ProtocolVersion, ServerConfig};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::incoming::{Buffers, MAX_RECORD, READ_CHUNK, Step, process, read_size};
use super::records::Records;
use super::side::{Engine, Handshake, TlsSide, tls_error};
use crate::io::socket::Socket;
use crate::io::uring::HEADROOM;

thread_local! {
    /// Ciphertext is read and decrypted here, shared by every connection of the thread: a
    /// connection's bytes are processed within the poll that read them.
    static INCOMING: RefCell<Vec<u8>> = RefCell::new(vec![0u8; READ_CHUNK + MAX_RECORD]);
}

/// A TLS connection over a worker's socket (epoll or io_uring): the server side by default, `TlsStream<UnbufferedClientConnection>`
/// for a client.
pub struct TlsStream<C: TlsSide = UnbufferedServerConnection> {
    pub(super) io: Socket,
    pub(super) tls: Engine<C>,
    pub(super) handshake: Handshake,
    /// The config allows rustls to hand the records over after the handshake.
    pub(super) take_over: bool,
    pub(super) buf: Buffers,
    /// The peer sent close_notify or closed the socket.
    pub(super) read_eof: bool,
    /// A fatal TLS error (kept to answer every later call the same way).
    pub(super) failed: Option<String>,
    pub(super) sent_close_notify: bool,
    /// `buf.incoming` may hold complete records (moved here from another core, or read before
    /// the handshake to route the connection) that must be processed before waiting for more.
    pub(super) stored_unprocessed: bool,
}

impl<C: TlsSide> std::fmt::Debug for TlsStream<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsStream")
            .field("peer", &self.io.peer_addr().ok())
            .finish_non_exhaustive()
    }
}

impl TlsStream {
    /// Run the server handshake on `io`.
    pub fn accept(
        io: impl Into<Socket>,
        config: Arc<ServerConfig>,
    ) -> impl Future<Output = io::Result<Self>> {
        Self::accept_received(io, config, Vec::new())
    }

    /// Run the server handshake on `io`, whose first bytes (`received`: the ClientHello the
    /// caller read to route the connection) were already taken from the socket.
    pub async fn accept_received(
        io: impl Into<Socket>,
        config: Arc<ServerConfig>,
        received: Vec<u8>,
    ) -> io::Result<Self> {
        let take_over = config.enable_secret_extraction;
        let tls = UnbufferedServerConnection::new(config).map_err(tls_error)?;
        Self::handshake(io.into(), tls, take_over, received).await
    }
}

impl TlsStream<UnbufferedClientConnection> {
    /// Run the client handshake to `name` on `io`.
    pub async fn connect(
        io: impl Into<Socket>,
        config: Arc<ClientConfig>,
        name: ServerName<'static>,
    ) -> io::Result<Self> {
        let take_over = config.enable_secret_extraction;
        let tls = UnbufferedClientConnection::new(config, name).map_err(tls_error)?;
        Self::handshake(io.into(), tls, take_over, Vec::new()).await
    }
}

impl<C: TlsSide> TlsStream<C> {
    /// Handshake on `io`; `received` is what was already read from it (processed first).
    async fn handshake(io: Socket, tls: C, take_over: bool, received: Vec<u8>) -> io::Result<Self> {
        let stored_unprocessed = !received.is_empty();
        let mut s = Self {
            io,
            tls: Engine::Rustls(Box::new(tls)),
            handshake: Handshake::default(),
            take_over,
            buf: Buffers {
                incoming: received,
                ..Buffers::default()
            },
            read_eof: false,
            failed: None,
            sent_close_notify: false,
            stored_unprocessed,
        };
        std::future::poll_fn(|cx| s.poll_handshake(cx)).await?;
        s.take_over_records()
    }

    /// Keep what the handshake settled, then (TLS 1.3, when the config allows it) let rustls
    /// hand the records over to [`Records`]. rustls has nothing left to send by now: the
    /// handshake's last records (a server's session tickets) are already in `outgoing`.
    fn take_over_records(mut self) -> io::Result<Self> {
        let Engine::Rustls(c) = &self.tls else {
            return Ok(self);
        };
        self.handshake = Handshake {
            alpn: c.alpn_protocol().map(<[u8]>::to_vec),
            kind: c.handshake_kind(),
            peer_certificates: c
                .peer_certificates()
                .map(|certs| certs.iter().map(|c| c.clone().into_owned()).collect()),
        };
        if !self.take_over
            || c.protocol_version() != Some(ProtocolVersion::TLSv1_3)
            || c.wants_write()
        {
            return Ok(self);
        }
        self.tls = match self.tls {
            Engine::Rustls(c) => {
                let (secrets, kernel) = (*c).into_kernel().map_err(tls_error)?;
                let records = Records::new(secrets, kernel, C::TICKETS).map_err(tls_error)?;
                Engine::Records(Box::new(records))
            }
            records => records,
        };
        Ok(self)
    }

    /// Whether rustls handed the records over to our own record layer (`tls::records`).
    pub fn own_records(&self) -> bool {
        matches!(self.tls, Engine::Records(_))
    }

    /// The protocol the handshake agreed through ALPN.
    pub fn alpn_protocol(&self) -> Option<&[u8]> {
        self.handshake.alpn.as_deref()
    }

    /// Full or resumed.
    pub fn handshake_kind(&self) -> Option<HandshakeKind> {
        self.handshake.kind
    }

    /// The peer's certificate chain, leaf first (when it presented one).
    pub fn peer_certificates(&self) -> Option<&[CertificateDer<'static>]> {
        self.handshake.peer_certificates.as_deref()
    }

    fn poll_handshake(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        loop {
            if C::HOLDS_RECORDS_AFTER_HANDSHAKE && !self.is_handshaking() && self.failed.is_none() {
                // Our flights went out before the peer's last one could arrive, so what waits
                // now came after the handshake (session tickets): it goes with the first write.
                self.buf.held = self.buf.outgoing.len();
                return Pin::new(&mut self.io).poll_flush(cx);
            }
            // Whatever the handshake produced (including an alert on failure) goes out first.
            match self.poll_flush_out(cx) {
                Poll::Ready(Ok(())) => {}
                other => return other,
            }
            if let Some(why) = &self.failed {
                return Poll::Ready(Err(tls_error(why)));
            }
            if !self.is_handshaking() && self.buf.outgoing.is_empty() {
                // On io_uring a write is only queued: the last flight is out when this is.
                return Pin::new(&mut self.io).poll_flush(cx);
            }
            let r = self.read_and_process(cx, None);
            match r {
                // Application data right behind the client's Finished: kept in `plaintext`.
                Poll::Ready(Ok(Step::Delivered | Step::NeedInput)) => {}
                Poll::Ready(Ok(Step::PeerClosed)) => {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "peer closed during the TLS handshake",
                    )));
                }
                Poll::Ready(Err(e)) => {
                    self.failed = Some(e.to_string());
                    // Send the alert that says why, then fail.
                    let _ = self.poll_flush_out(cx);
                    return Poll::Ready(Err(e));
                }
                Poll::Pending => {
                    // Records produced while processing (e.g. session tickets) still go out.
                    if self.buf.outgoing.is_empty() {
                        return Poll::Pending;
                    }
                }
            }
        }
    }

    /// Process stored ciphertext, then read the socket once more if nothing came of it.
    /// Ready(Delivered) when application data arrived, Ready(NeedInput) when a read made
    /// progress without data, Ready(PeerClosed) at the end, Pending when the socket is empty.
    fn read_and_process(
        &mut self,
        cx: &mut Context<'_>,
        out: Option<&mut ReadBuf<'_>>,
    ) -> Poll<io::Result<Step>> {
        if let Socket::Uring(u) = &self.io
            && !u.data_waiting()
            && !self.stored_unprocessed
            && self.buf.incoming.len() <= HEADROOM
        {
            return self.recv_and_process_in_place(cx, out);
        }
        self.stored_unprocessed = false;
        let Self { io, tls, buf, .. } = self;
        let run = |input: &mut Vec<u8>| -> Poll<io::Result<Step>> {
            let mut out = out;
            let mut used = buf.incoming.len();
            if input.len() < used + READ_CHUNK {
                input.resize(used + READ_CHUNK, 0);
            }
            if let Some(dst) = input.get_mut(..used) {
                dst.copy_from_slice(&buf.incoming);
            }
            let mut read_something = false;
            loop {
                let step = match process(tls, buf, input, &mut used, out.as_deref_mut()) {
                    Ok(s) => s,
                    Err(e) => {
                        buf.keep_incoming(&[]);
                        return Poll::Ready(Err(e));
                    }
                };
                match step {
                    Step::Delivered | Step::PeerClosed => {
                        buf.keep_incoming(input.get(..used).unwrap_or_default());
                        return Poll::Ready(Ok(step));
                    }
                    Step::NeedInput if read_something => {
                        buf.keep_incoming(input.get(..used).unwrap_or_default());
                        return Poll::Ready(Ok(Step::NeedInput));
                    }
                    Step::NeedInput => {}
                }
                let want = out.as_deref().map_or(READ_CHUNK, |o| {
                    read_size(input.get(..used).unwrap_or_default(), o.remaining())
                });
                if input.len() < used + want {
                    input.resize(used + want, 0);
                }
                let mut rb = ReadBuf::new(input.get_mut(used..used + want).unwrap_or_default());
                match Pin::new(&mut *io).poll_read(cx, &mut rb) {
                    Poll::Ready(Ok(())) if rb.filled().is_empty() => {
                        buf.keep_incoming(&[]);
                        return Poll::Ready(Ok(Step::PeerClosed));
                    }
                    Poll::Ready(Ok(())) => {
                        used += rb.filled().len();
                        read_something = true;
                    }
                    Poll::Ready(Err(e)) => {
                        buf.keep_incoming(&[]);
                        return Poll::Ready(Err(e));
                    }
                    Poll::Pending => {
                        buf.keep_incoming(input.get(..used).unwrap_or_default());
                        return Poll::Pending;
                    }
                }
            }
        };
        INCOMING.with(|cell| match cell.try_borrow_mut() {
            Ok(mut input) => run(&mut input),
            // Re-entered (cannot happen in this design): use a private buffer.
            Err(_) => run(&mut Vec::new()),
        })
    }

    /// io_uring: the records are decrypted where the kernel received them (the provided
    /// buffer), with the partial record kept from the last receive copied in front.
    fn recv_and_process_in_place(
        &mut self,
        cx: &mut Context<'_>,
        out: Option<&mut ReadBuf<'_>>,
    ) -> Poll<io::Result<Step>> {
        let Self { io, tls, buf, .. } = self;
        let Socket::Uring(u) = io else {
            return Poll::Ready(Err(io::Error::other("not an io_uring socket")));
        };
        let want = out
            .as_deref()
            .map_or(READ_CHUNK, |o| o.remaining().clamp(MAX_RECORD, READ_CHUNK));
        let prefix = std::mem::take(&mut buf.incoming);
        let r = u.poll_recv_with(cx, want, &prefix, |input| {
            let mut used = input.len();
            let step = process(tls, buf, input, &mut used, out);
            buf.keep_incoming(if step.is_ok() {
                input.get(..used).unwrap_or_default()
            } else {
                &[]
            });
            step
        });
        match r {
            Poll::Pending => {
                buf.incoming = prefix;
                Poll::Pending
            }
            Poll::Ready(Ok(Some(step))) => Poll::Ready(step),
            Poll::Ready(Ok(None)) => Poll::Ready(Ok(Step::PeerClosed)),
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
        }
    }

    fn is_handshaking(&self) -> bool {
        match &self.tls {
            Engine::Rustls(c) => c.is_handshaking(),
            Engine::Records(_) => false,
        }
    }

    pub fn peer_addr(&self) -> io::Result<std::net::SocketAddr> {
        self.io.peer_addr()
    }
}

impl<C: TlsSide> AsyncRead for TlsStream<C> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if !this.buf.plaintext.is_empty() {
                crate::io::drain_into(&mut this.buf.plaintext, out);
                return Poll::Ready(Ok(()));
            }
            if let Some(why) = &this.failed {
                return Poll::Ready(Err(tls_error(why)));
            }
            if this.read_eof || out.remaining() == 0 {
                return Poll::Ready(Ok(()));
            }
            let filled = out.filled().len();
            let r = this.read_and_process(cx, Some(out));
            // Records the peer's messages produced (key update answers) go out when they can;
            // held session tickets wait for the first write.
            if this.buf.outgoing.len() > this.buf.held {
                let _ = this.poll_flush_out(cx);
            }
            match r {
                Poll::Ready(Ok(Step::Delivered)) => {
                    if out.filled().len() > filled {
                        return Poll::Ready(Ok(()));
                    }
                    // Everything went to `plaintext` (or the records were empty): deliver above.
                    continue;
                }
                Poll::Ready(Ok(Step::NeedInput)) => {}
                // Closed, with or without close_notify: EOF (our protocols frame themselves).
                Poll::Ready(Ok(Step::PeerClosed)) => this.read_eof = true,
                Poll::Ready(Err(e)) => {
                    this.failed = Some(e.to_string());
                    let _ = this.poll_flush_out(cx);
                    return Poll::Ready(Err(e));
                }
                Poll::Pending => return Poll::Pending,
            }
            if out.filled().len() > filled {
                return Poll::Ready(Ok(()));
            }
        }
    }
}

#[cfg(test)]
mod tests;
