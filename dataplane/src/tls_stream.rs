//! The Proxy's server-side TLS stream, on rustls' unbuffered API.
//!
//! Why not tokio-rustls or rustls' buffered `ServerConnection`:
//! - the accepted socket and TLS state must move to another core as plain values (see
//!   [`TlsParts`]), so a user session runs on the worker that owns its target's tunnel;
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

use bytes::{Buf, Bytes, BytesMut};
use rustls::ServerConfig;
use rustls::server::UnbufferedServerConnection;
use rustls::unbuffered::{ConnectionState, EncodeError, EncryptError, UnbufferedStatus};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// Largest TLS record on the wire (16 KiB of payload plus header and AEAD overhead).
const MAX_RECORD: usize = 16 * 1024 + 256 + 5;
/// How much one socket read takes into the thread's buffer.
const READ_CHUNK: usize = 64 * 1024;
/// Plaintext encrypted per `poll_write` at most (four full records).
const WRITE_CHUNK: usize = 64 * 1024;

/// Room for the records of one `WRITE_CHUNK` (header, content type and tag per record).
const WRITE_SCRATCH: usize = WRITE_CHUNK + 1024;

thread_local! {
    /// Ciphertext is read and decrypted here, shared by every connection of the thread: a
    /// connection's bytes are processed within the poll that read them.
    static INCOMING: RefCell<Vec<u8>> = RefCell::new(vec![0u8; READ_CHUNK + MAX_RECORD]);
    /// Records are encrypted here and written from here; only what the socket does not take
    /// is copied into the connection's own `outgoing`.
    static SCRATCH: RefCell<Vec<u8>> = RefCell::new(vec![0u8; WRITE_SCRATCH]);
}

/// An accepted, handshaken TLS connection as movable parts.
pub struct TlsParts {
    pub socket: std::net::TcpStream,
    pub tls: Box<UnbufferedServerConnection>,
    /// Plaintext already read from the TLS session but not yet consumed by the application.
    pub leftover: Bytes,
    buffers: Buffers,
}

impl std::fmt::Debug for TlsParts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsParts")
            .field("socket", &self.socket)
            .finish_non_exhaustive()
    }
}

/// A connection's own bytes (each empty, without allocation, most of the time).
#[derive(Debug, Default)]
struct Buffers {
    /// Ciphertext of a record split across reads.
    incoming: Vec<u8>,
    /// Decrypted, not yet delivered.
    plaintext: BytesMut,
    /// TLS records not yet taken by the socket.
    outgoing: BytesMut,
}

pub struct TlsStream {
    io: TcpStream,
    tls: Box<UnbufferedServerConnection>,
    buf: Buffers,
    /// The peer sent close_notify or closed the socket.
    read_eof: bool,
    /// A fatal TLS error (kept to answer every later call the same way).
    failed: Option<String>,
    sent_close_notify: bool,
}

impl std::fmt::Debug for TlsStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsStream")
            .field("peer", &self.io.peer_addr().ok())
            .finish_non_exhaustive()
    }
}

fn tls_error(e: impl std::fmt::Display) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e.to_string())
}

/// What one pass over the incoming bytes achieved.
enum Step {
    /// Every complete record was processed; more ciphertext is needed.
    NeedInput,
    /// Application data was delivered (to the caller or to `plaintext`).
    Delivered,
    /// The peer closed the TLS session.
    PeerClosed,
}

impl Buffers {
    /// Keep `rest` (an incomplete record) for the next read.
    fn keep_incoming(&mut self, rest: &[u8]) {
        self.incoming.clear();
        if rest.is_empty() {
            self.incoming = Vec::new();
        } else {
            self.incoming.extend_from_slice(rest);
        }
    }
}

/// Process every complete record in `input[..*used]`: decrypted application data goes to
/// `out` (as much as fits) and then to `buf.plaintext`; TLS records the connection wants to send
/// go to `buf.outgoing`. Consumed bytes are removed from the front of `input`.
fn process(
    tls: &mut UnbufferedServerConnection,
    buf: &mut Buffers,
    input: &mut [u8],
    used: &mut usize,
    mut out: Option<&mut ReadBuf<'_>>,
) -> io::Result<Step> {
    let mut step = Step::NeedInput;
    loop {
        let UnbufferedStatus { mut discard, state } =
            tls.process_tls_records(input.get_mut(..*used).unwrap_or_default());
        let mut stop = false;
        match state {
            Ok(ConnectionState::ReadTraffic(mut records)) => {
                while let Some(record) = records.next_record() {
                    let record = record.map_err(tls_error)?;
                    discard += record.discard;
                    let payload = record.payload;
                    let direct = match out.as_deref_mut() {
                        Some(o) if buf.plaintext.is_empty() => {
                            let n = payload.len().min(o.remaining());
                            o.put_slice(payload.get(..n).unwrap_or_default());
                            n
                        }
                        _ => 0,
                    };
                    buf.plaintext
                        .extend_from_slice(payload.get(direct..).unwrap_or_default());
                    step = Step::Delivered;
                }
            }
            Ok(ConnectionState::ReadEarlyData(_)) => {
                // Early data is never enabled on the proxy's config.
                return Err(tls_error("unexpected early data"));
            }
            Ok(ConnectionState::EncodeTlsData(mut enc)) => loop {
                let spare = buf.outgoing.capacity() - buf.outgoing.len();
                let start = buf.outgoing.len();
                buf.outgoing.resize(start + spare.max(1), 0);
                match enc.encode(buf.outgoing.get_mut(start..).unwrap_or_default()) {
                    Ok(n) => {
                        buf.outgoing.truncate(start + n);
                        break;
                    }
                    Err(EncodeError::InsufficientSize(e)) => {
                        buf.outgoing.truncate(start);
                        buf.outgoing.reserve(e.required_size);
                    }
                    Err(e) => return Err(tls_error(e)),
                }
            },
            // The records are in `outgoing`; the caller flushes them.
            Ok(ConnectionState::TransmitTlsData(t)) => t.done(),
            Ok(ConnectionState::PeerClosed) | Ok(ConnectionState::Closed) => {
                step = Step::PeerClosed;
                stop = true;
            }
            Ok(ConnectionState::WriteTraffic(_)) | Ok(ConnectionState::BlockedHandshake) => {
                stop = true;
            }
            Ok(_) => stop = true,
            Err(e) => {
                // The fatal alert that says why is queued: encode it for the caller to flush.
                queue_alert(tls, buf);
                return Err(tls_error(e));
            }
        }
        if discard > 0 {
            input.copy_within(discard..*used, 0);
            *used -= discard;
        }
        if stop {
            return Ok(step);
        }
    }
}

/// After an error, move the alert rustls queued into `outgoing` (best effort).
fn queue_alert(tls: &mut UnbufferedServerConnection, buf: &mut Buffers) {
    for _ in 0..4 {
        let UnbufferedStatus { state, .. } = tls.process_tls_records(&mut []);
        match state {
            Ok(ConnectionState::EncodeTlsData(mut enc)) => {
                let start = buf.outgoing.len();
                buf.outgoing.resize(start + 64, 0);
                match enc.encode(buf.outgoing.get_mut(start..).unwrap_or_default()) {
                    Ok(n) => buf.outgoing.truncate(start + n),
                    Err(_) => {
                        buf.outgoing.truncate(start);
                        return;
                    }
                }
            }
            Ok(ConnectionState::TransmitTlsData(t)) => t.done(),
            _ => return,
        }
    }
}

impl TlsStream {
    /// Run the server handshake on `io`.
    pub async fn accept(io: TcpStream, config: Arc<ServerConfig>) -> io::Result<Self> {
        let tls = UnbufferedServerConnection::new(config).map_err(tls_error)?;
        let mut s = Self {
            io,
            tls: Box::new(tls),
            buf: Buffers::default(),
            read_eof: false,
            failed: None,
            sent_close_notify: false,
        };
        std::future::poll_fn(|cx| s.poll_handshake(cx)).await?;
        Ok(s)
    }

    fn poll_handshake(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        loop {
            // Whatever the handshake produced (including an alert on failure) goes out first.
            match self.poll_flush_out(cx) {
                Poll::Ready(Ok(())) => {}
                other => return other,
            }
            if let Some(why) = &self.failed {
                return Poll::Ready(Err(tls_error(why)));
            }
            if !self.tls.is_handshaking() && self.buf.outgoing.is_empty() {
                return Poll::Ready(Ok(()));
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
                if input.len() < used + READ_CHUNK {
                    input.resize(used + READ_CHUNK, 0);
                }
                let mut rb = ReadBuf::new(input.get_mut(used..).unwrap_or_default());
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

    pub fn connection(&self) -> &UnbufferedServerConnection {
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
            buffers: self.buf,
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
                buf: parts.buffers,
                read_eof: false,
                failed: None,
                sent_close_notify: false,
            },
            parts.leftover,
        ))
    }

    /// Push `outgoing` to the socket; Ready when it is empty.
    fn poll_flush_out(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while !self.buf.outgoing.is_empty() {
            match Pin::new(&mut self.io).poll_write(cx, &self.buf.outgoing) {
                Poll::Ready(Ok(0)) => {
                    return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                }
                Poll::Ready(Ok(n)) => self.buf.outgoing.advance(n),
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            }
        }
        // Idle connections keep no send buffer.
        if self.buf.outgoing.capacity() > 0 {
            self.buf.outgoing = BytesMut::new();
        }
        Poll::Ready(Ok(()))
    }

    /// Encrypt up to [`WRITE_CHUNK`] of `data` into `dst`; returns (plaintext taken, bytes of
    /// records written). Records the connection must send first (a key update) go to `outgoing`.
    fn encrypt_into(&mut self, data: &[u8], dst: &mut [u8]) -> io::Result<(usize, usize)> {
        let data = data.get(..data.len().min(WRITE_CHUNK)).unwrap_or_default();
        for _ in 0..8 {
            let UnbufferedStatus { state, .. } = self.tls.process_tls_records(&mut []);
            match state {
                Ok(ConnectionState::WriteTraffic(mut w)) => {
                    return match w.encrypt(data, dst) {
                        Ok(n) => Ok((data.len(), n)),
                        Err(EncryptError::InsufficientSize(e)) => Err(tls_error(format!(
                            "encrypt buffer too small ({} bytes needed)",
                            e.required_size
                        ))),
                        Err(e) => Err(tls_error(e)),
                    };
                }
                Ok(ConnectionState::EncodeTlsData(_) | ConnectionState::TransmitTlsData(_)) => {
                    let mut used = 0;
                    process(&mut self.tls, &mut self.buf, &mut [], &mut used, None)?;
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
    fn queue_close_notify(&mut self) -> io::Result<()> {
        let UnbufferedStatus { state, .. } = self.tls.process_tls_records(&mut []);
        if let Ok(ConnectionState::WriteTraffic(mut w)) = state {
            self.sent_close_notify = true;
            let start = self.buf.outgoing.len();
            self.buf.outgoing.resize(start + 64, 0);
            match w.queue_close_notify(self.buf.outgoing.get_mut(start..).unwrap_or_default()) {
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

impl AsyncRead for TlsStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if !this.buf.plaintext.is_empty() {
                let n = this.buf.plaintext.len().min(out.remaining());
                out.put_slice(this.buf.plaintext.get(..n).unwrap_or_default());
                this.buf.plaintext.advance(n);
                if this.buf.plaintext.is_empty() {
                    this.buf.plaintext = BytesMut::new();
                }
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
            // Records the peer's messages produced (key update answers) go out when they can.
            if !this.buf.outgoing.is_empty() {
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

/// At most this much encrypted data waits in a connection's send buffer before writes wait.
const MAX_OUTGOING: usize = 128 * 1024;

impl AsyncWrite for TlsStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if let Some(why) = &this.failed {
            return Poll::Ready(Err(tls_error(why)));
        }
        if data.is_empty() {
            return Poll::Ready(Ok(0));
        }
        // Backpressure: a socket that does not drain stops the writer, not memory growth.
        if this.buf.outgoing.len() >= MAX_OUTGOING {
            match this.poll_flush_out(cx) {
                Poll::Ready(Ok(())) => {}
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            }
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
            let (taken, written) = this.encrypt_into(data, scratch)?;
            let records = scratch.get(..written).unwrap_or_default();
            // Order on the wire: whatever already waits goes first.
            if !this.buf.outgoing.is_empty() {
                this.buf.outgoing.extend_from_slice(records);
                if let Poll::Ready(Err(e)) = this.poll_flush_out(cx) {
                    return Poll::Ready(Err(e));
                }
                return Poll::Ready(Ok(taken));
            }
            let mut sent = 0;
            while sent < records.len() {
                match Pin::new(&mut this.io).poll_write(cx, records.get(sent..).unwrap_or_default())
                {
                    Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                    Poll::Ready(Ok(n)) => sent += n,
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                    // The rest waits in the connection's buffer (the write is accepted).
                    Poll::Pending => break,
                }
            }
            this.buf
                .outgoing
                .extend_from_slice(records.get(sent..).unwrap_or_default());
            Poll::Ready(Ok(taken))
        })
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
