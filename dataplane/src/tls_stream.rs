//! The data plane's TLS stream, on rustls' unbuffered API: the Proxy's server side
//! ([`TlsStream::accept`]) and the agents' client side ([`TlsStream::connect`]).
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
use rustls::client::{ClientConnectionData, UnbufferedClientConnection};
use rustls::kernel::KernelConnection;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::server::{ServerConnectionData, UnbufferedServerConnection};
use rustls::unbuffered::{
    ConnectionState, EncodeError, EncryptError, UnbufferedConnectionCommon, UnbufferedStatus,
};
use rustls::{ClientConfig, ExtractedSecrets, HandshakeKind, ProtocolVersion, ServerConfig};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::socket::Socket;
use crate::tls_records::{HEADER, MAX_PLAINTEXT, OVERHEAD, Opened, Records, TAG, TicketSink};

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

/// One side of an unbuffered rustls connection: the server or the client.
pub trait TlsSide:
    std::ops::DerefMut<Target = UnbufferedConnectionCommon<Self::Data>> + Send + 'static
{
    type Data;
    /// Records produced as the handshake completes wait for the first write (the server's
    /// session tickets: one send less per connection). Never on a client, whose last flight
    /// completes the handshake for the peer.
    const HOLDS_RECORDS_AFTER_HANDSHAKE: bool;
    fn process<'c, 'i>(
        &'c mut self,
        incoming: &'i mut [u8],
    ) -> UnbufferedStatus<'c, 'i, Self::Data>;
    /// Hand the records over after the handshake (see [`crate::tls_records`]).
    fn into_kernel(self)
    -> Result<(ExtractedSecrets, KernelConnection<Self::Data>), rustls::Error>;
    /// What becomes of a session ticket the peer sends after the handshake.
    const TICKETS: TicketSink<Self::Data>;
}

impl TlsSide for UnbufferedServerConnection {
    type Data = ServerConnectionData;
    const HOLDS_RECORDS_AFTER_HANDSHAKE: bool = true;
    fn process<'c, 'i>(
        &'c mut self,
        incoming: &'i mut [u8],
    ) -> UnbufferedStatus<'c, 'i, ServerConnectionData> {
        self.process_tls_records(incoming)
    }
    fn into_kernel(
        self,
    ) -> Result<(ExtractedSecrets, KernelConnection<ServerConnectionData>), rustls::Error> {
        self.dangerous_into_kernel_connection()
    }
    const TICKETS: TicketSink<ServerConnectionData> = |_, _| {
        Err(rustls::Error::General(
            "a client sent a session ticket".into(),
        ))
    };
}

impl TlsSide for UnbufferedClientConnection {
    type Data = ClientConnectionData;
    const HOLDS_RECORDS_AFTER_HANDSHAKE: bool = false;
    fn process<'c, 'i>(
        &'c mut self,
        incoming: &'i mut [u8],
    ) -> UnbufferedStatus<'c, 'i, ClientConnectionData> {
        self.process_tls_records(incoming)
    }
    fn into_kernel(
        self,
    ) -> Result<(ExtractedSecrets, KernelConnection<ClientConnectionData>), rustls::Error> {
        self.dangerous_into_kernel_connection()
    }
    const TICKETS: TicketSink<ClientConnectionData> =
        |kernel, ticket| kernel.handle_new_session_ticket(ticket);
}

/// Who protects a connection's records.
enum Engine<C: TlsSide> {
    /// rustls: during the handshake, and for good on TLS 1.2 or with a config that does not
    /// allow secret extraction.
    Rustls(Box<C>),
    /// Our own record layer (TLS 1.3 after the handshake).
    Records(Box<Records<C::Data>>),
}

/// What the handshake settled, kept for the application after rustls hands the records over.
#[derive(Debug, Default)]
struct Handshake {
    alpn: Option<Vec<u8>>,
    kind: Option<HandshakeKind>,
    peer_certificates: Option<Vec<CertificateDer<'static>>>,
}

/// An accepted, handshaken TLS connection as movable parts.
pub struct TlsParts {
    pub socket: std::net::TcpStream,
    tls: Engine<UnbufferedServerConnection>,
    handshake: Handshake,
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
    /// How much of the front of `outgoing` is records from after the handshake (a server's
    /// session tickets) that wait for the first write, to go out in the same send.
    held: usize,
}

/// A TLS connection over a [`Socket`]: the server side by default, `TlsStream<UnbufferedClientConnection>`
/// for a client.
pub struct TlsStream<C: TlsSide = UnbufferedServerConnection> {
    io: Socket,
    tls: Engine<C>,
    handshake: Handshake,
    /// The config allows rustls to hand the records over after the handshake.
    take_over: bool,
    buf: Buffers,
    /// The peer sent close_notify or closed the socket.
    read_eof: bool,
    /// A fatal TLS error (kept to answer every later call the same way).
    failed: Option<String>,
    sent_close_notify: bool,
    /// `buf.incoming` may hold complete records (moved here from another core, or read before
    /// the handshake to route the connection) that must be processed before waiting for more.
    stored_unprocessed: bool,
}

impl<C: TlsSide> std::fmt::Debug for TlsStream<C> {
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
fn process<C: TlsSide>(
    tls: &mut Engine<C>,
    buf: &mut Buffers,
    input: &mut [u8],
    used: &mut usize,
    mut out: Option<&mut ReadBuf<'_>>,
) -> io::Result<Step> {
    let tls = match tls {
        Engine::Rustls(c) => &mut **c,
        Engine::Records(r) => return process_records(r, buf, input, used, out),
    };
    let mut step = Step::NeedInput;
    // Consumed bytes are skipped with `start` and removed once at the end (compacting after
    // every record would move the rest of a 64 KiB read again and again).
    let mut start = 0;
    let result = loop {
        let UnbufferedStatus { mut discard, state } =
            tls.process(input.get_mut(start..*used).unwrap_or_default());
        let mut stop = false;
        match state {
            Ok(ConnectionState::ReadTraffic(mut records)) => {
                while let Some(record) = records.next_record() {
                    let record = record.map_err(tls_error)?;
                    discard += record.discard;
                    deliver(buf, out.as_deref_mut(), record.payload);
                    step = Step::Delivered;
                }
            }
            Ok(ConnectionState::ReadEarlyData(_)) => {
                // Early data is never enabled (on the proxy's config; clients never receive it).
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
                // rustls must see the same unconsumed bytes again (it keeps offsets into them).
                start += discard;
                queue_alert(tls, buf, input.get_mut(start..*used).unwrap_or_default());
                break Err(tls_error(e));
            }
        }
        start += discard;
        if stop {
            break Ok(step);
        }
    };
    if start > 0 {
        input.copy_within(start..*used, 0);
        *used -= start;
    }
    result
}

/// A full TLS 1.3 record on the wire: 16 KiB of plaintext, content type, tag and header. Bulk
/// senders (rustls, our own records) send these.
const FULL_RECORD: usize = MAX_PLAINTEXT + OVERHEAD;

/// How much to read for a reader with room for `room` bytes of plaintext, with `partial` (the
/// start of a record) in hand. About as much as the reader can take, so little plaintext waits in
/// the connection (and is copied twice), never less than one whole record; and when that allows
/// whole records, just enough to end at a record's end if the peer's records are full ones: a
/// bulk stream's reads then carry no partial record over from one read to the next (copied out of
/// the thread's buffer and back in), and fill the reader (a 64 KiB reader got 48 KiB, three
/// records and the start of a fourth, from a 64 KiB read).
fn read_size(partial: &[u8], room: usize) -> usize {
    let default = room.clamp(MAX_RECORD, READ_CHUNK);
    // (bytes that complete the record in hand, its plaintext)
    let (first, first_plaintext) = match *partial {
        [] => (0, 0),
        [_, _, _, hi, lo, ..] => {
            let len = usize::from(u16::from_be_bytes([hi, lo]));
            (
                (HEADER + len).saturating_sub(partial.len()),
                len.saturating_sub(OVERHEAD - HEADER),
            )
        }
        _ => (FULL_RECORD - partial.len(), MAX_PLAINTEXT),
    };
    let records =
        (room.saturating_sub(first_plaintext) / MAX_PLAINTEXT).min(READ_CHUNK / MAX_PLAINTEXT);
    match first + records * FULL_RECORD {
        0 => default,
        aligned => aligned,
    }
}

/// Application data to the reader (as much as fits), the rest to `buf.plaintext`.
fn deliver(buf: &mut Buffers, out: Option<&mut ReadBuf<'_>>, payload: &[u8]) {
    let direct = match out {
        Some(o) if buf.plaintext.is_empty() => {
            let n = payload.len().min(o.remaining());
            o.put_slice(payload.get(..n).unwrap_or_default());
            n
        }
        _ => 0,
    };
    buf.plaintext
        .extend_from_slice(payload.get(direct..).unwrap_or_default());
}

/// What one record brought.
enum Got {
    /// Application data, delivered.
    Data,
    /// Nothing for the reader (an empty record, a key update, a ticket).
    Nothing,
    /// close_notify.
    Closed,
}

/// [`process`] on our own record layer: a record the reader has room for is decrypted straight
/// into the reader's buffer (when nothing decrypted earlier waits before it), others are opened
/// in place in `input` and their data copied out.
fn process_records<D>(
    records: &mut Records<D>,
    buf: &mut Buffers,
    input: &mut [u8],
    used: &mut usize,
    mut out: Option<&mut ReadBuf<'_>>,
) -> io::Result<Step> {
    let mut step = Step::NeedInput;
    let mut start = 0;
    let result = loop {
        let rest = input.get_mut(start..*used).unwrap_or_default();
        let room = record_room(rest);
        let opened = match out.as_deref_mut() {
            Some(o) if buf.plaintext.is_empty() && room.is_some_and(|r| o.remaining() >= r) => {
                let dst = o.initialize_unfilled_to(room.unwrap_or_default());
                match records.open_to(rest, dst, &mut buf.outgoing) {
                    Ok(Some((n, Opened::Data(payload)))) => {
                        let len = payload.len();
                        o.advance(len);
                        Ok((n, if len > 0 { Got::Data } else { Got::Nothing }))
                    }
                    Ok(Some((n, Opened::Control))) => Ok((n, Got::Nothing)),
                    Ok(Some((n, Opened::Closed))) => Ok((n, Got::Closed)),
                    Ok(None) => Ok((0, Got::Nothing)),
                    Err(e) => Err(e),
                }
            }
            _ => match records.open(rest, &mut buf.outgoing) {
                Ok((n, Opened::Data(payload))) if !payload.is_empty() => {
                    deliver(buf, out.as_deref_mut(), payload);
                    Ok((n, Got::Data))
                }
                Ok((n, Opened::Data(_) | Opened::Control)) => Ok((n, Got::Nothing)),
                Ok((n, Opened::Closed)) => Ok((n, Got::Closed)),
                Err(e) => Err(e),
            },
        };
        match opened {
            Ok((0, _)) => break Ok(step),
            Ok((n, got)) => {
                start += n;
                match got {
                    Got::Data => step = Step::Delivered,
                    Got::Nothing => {}
                    Got::Closed => break Ok(Step::PeerClosed),
                }
            }
            Err(e) => {
                // Tell the peer why (unless it was its own alert), for the caller to flush.
                if let Some(alert) = e.alert() {
                    records.push_alert(&mut buf.outgoing, Some(alert));
                }
                break Err(tls_error(e));
            }
        }
    };
    if start > 0 {
        input.copy_within(start..*used, 0);
        *used -= start;
    }
    result
}

/// Room a reader needs to take the whole record at the front of `input` straight from the
/// cipher (its ciphertext less the tag), once the record is all there.
fn record_room(input: &[u8]) -> Option<usize> {
    let &[_, _, _, hi, lo] = input.get(..HEADER)? else {
        return None;
    };
    let len = usize::from(u16::from_be_bytes([hi, lo]));
    (input.len() >= HEADER + len).then(|| len.saturating_sub(TAG))
}

/// After an error, move the alert rustls queued into `outgoing` (best effort). `input` is the
/// connection's unconsumed ciphertext, as rustls last saw it.
fn queue_alert<C: TlsSide>(tls: &mut C, buf: &mut Buffers, input: &mut [u8]) {
    // Only while records wait: past them rustls would process `input` again.
    while tls.wants_write() {
        let UnbufferedStatus { state, .. } = tls.process(&mut *input);
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

    /// Whether rustls handed the records over to [`crate::tls_records`].
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
            && self.buf.incoming.len() <= crate::uring::HEADROOM
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

impl TlsStream {
    /// Take the stream apart to move it to another thread.
    pub fn into_parts(self, leftover: Bytes) -> io::Result<TlsParts> {
        let (socket, received) = self.io.into_std()?;
        let mut buffers = self.buf;
        // Ciphertext the backend received but TLS has not seen yet goes after the partial
        // record it continues.
        buffers.incoming.extend_from_slice(&received);
        Ok(TlsParts {
            socket,
            tls: self.tls,
            handshake: self.handshake,
            leftover,
            buffers,
        })
    }

    /// Rebuild on the current thread's runtime.
    pub fn from_parts(parts: TlsParts) -> io::Result<(Self, Bytes)> {
        let io = Socket::from_std(parts.socket)?;
        Ok((
            Self {
                io,
                tls: parts.tls,
                handshake: parts.handshake,
                // (Already decided, one way or the other.)
                take_over: false,
                buf: parts.buffers,
                read_eof: false,
                failed: None,
                sent_close_notify: false,
                stored_unprocessed: true,
            },
            parts.leftover,
        ))
    }
}

impl<C: TlsSide> TlsStream<C> {
    /// Push `outgoing` to the socket; Ready when it is empty.
    fn poll_flush_out(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
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
    fn queue_close_notify(&mut self) -> io::Result<()> {
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

impl<C: TlsSide> AsyncRead for TlsStream<C> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if !this.buf.plaintext.is_empty() {
                crate::socket::drain_into(&mut this.buf.plaintext, out);
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

/// At most this much encrypted data waits in a connection's send buffer before writes wait.
const MAX_OUTGOING: usize = 128 * 1024;

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

#[cfg(test)]
pub(crate) mod tests {
    // Test code: a failing unwrap is a failing test.
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use std::time::Duration;

    use gatehouse_controlplane::tls::{Trust, client_config_with_alpn, server_config_with_alpn};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    const NAME: &str = gatehouse_controlplane::identity::PROXY_SERVER_NAME;
    const ALPN: &[u8] = b"test";

    /// A CA and a certificate with a fresh key signed by it: (cert PEM, key PEM).
    pub(crate) struct Ca {
        issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
        pub(crate) pem: String,
    }

    impl Ca {
        pub(crate) fn new(cn: &str) -> Self {
            let key = rcgen::KeyPair::generate().unwrap();
            let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
            params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
            params
                .distinguished_name
                .push(rcgen::DnType::CommonName, cn);
            let pem = params.self_signed(&key).unwrap().pem();
            Self {
                issuer: rcgen::Issuer::new(params, key),
                pem,
            }
        }
        pub(crate) fn leaf(&self, name: &str) -> (String, String) {
            let key = rcgen::KeyPair::generate().unwrap();
            let mut params = rcgen::CertificateParams::new(vec![name.to_string()]).unwrap();
            params
                .distinguished_name
                .push(rcgen::DnType::CommonName, name);
            let cert = params.signed_by(&key, &self.issuer).unwrap();
            (cert.pem(), key.serialize_pem())
        }
    }

    struct Setup {
        server: Arc<ServerConfig>,
        client: Arc<rustls::ClientConfig>,
        listener: tokio::net::TcpListener,
    }

    async fn setup(client_ca: &Ca, ca: &Ca) -> Setup {
        let (cert, key) = ca.leaf(NAME);
        let mut server = (*server_config_with_alpn(&ca.pem, &cert, &key, &[ALPN]).unwrap()).clone();
        server.send_tls13_tickets = 0;
        let (ccert, ckey) = client_ca.leaf("client");
        let client = client_config_with_alpn(
            &Trust::CaPem(ca.pem.clone()),
            Some((&ccert, &ckey)),
            &[ALPN],
        )
        .unwrap();
        Setup {
            server: Arc::new(server),
            client,
            listener: tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap(),
        }
    }

    async fn connect(s: &Setup) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
        let tcp = tokio::net::TcpStream::connect(s.listener.local_addr().unwrap())
            .await
            .unwrap();
        tokio_rustls::TlsConnector::from(Arc::clone(&s.client))
            .connect(rustls::pki_types::ServerName::try_from(NAME).unwrap(), tcp)
            .await
            .unwrap()
    }

    fn pattern(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i * 7 + i / 251) as u8).collect()
    }

    async fn timeout<F: std::future::Future>(f: F) -> F::Output {
        tokio::time::timeout(Duration::from_secs(20), f)
            .await
            .expect("timed out")
    }

    /// Reads end at a record's end when the peer's records are full ones, and never give the
    /// reader more plaintext than it has room for; otherwise a whole record at least.
    #[test]
    fn reads_end_at_record_boundaries_within_the_readers_room() {
        let full_header = |len: usize| -> Vec<u8> {
            let mut h = vec![23, 3, 3];
            h.extend_from_slice(&u16::try_from(len).unwrap().to_be_bytes());
            h
        };
        // Nothing in hand: four whole records for a 64 KiB reader (its 64 KiB of plaintext).
        assert_eq!(read_size(&[], 64 * 1024), 4 * FULL_RECORD);
        assert_eq!(read_size(&[], 50_000), 3 * FULL_RECORD);
        // A full record's first 1,000 bytes in hand: its rest and three more.
        let mut partial = full_header(FULL_RECORD - 5);
        partial.resize(1_000, 0);
        assert_eq!(
            read_size(&partial, 64 * 1024),
            FULL_RECORD - 1_000 + 3 * FULL_RECORD
        );
        // Three bytes of a header: assumed full.
        assert_eq!(
            read_size(&[23, 3, 3], 64 * 1024),
            FULL_RECORD - 3 + 3 * FULL_RECORD
        );
        // A short record in hand: its rest, then full ones within the room.
        let mut short = full_header(117);
        short.resize(50, 0);
        assert_eq!(read_size(&short, 64 * 1024), 122 - 50 + 3 * FULL_RECORD);
        // A reader with less room than a record: one whole record (the rest waits decrypted).
        assert_eq!(read_size(&[], 100), MAX_RECORD);
        // Never more than four records' worth beyond the one in hand, whatever the room.
        assert_eq!(read_size(&[], 1 << 20), 4 * FULL_RECORD);
    }

    /// Data written right behind the handshake, in writes of every size, read back through a
    /// tiny server buffer (so plaintext waits in the connection) and echoed; then close_notify
    /// each way ends both sides cleanly.
    ///
    /// Both record layers: our own (what the configs allow by default) and rustls' (a config
    /// that does not allow rustls to hand the records over).
    async fn echo_with_tiny_reads_and_clean_close_on() {
        for own_records in [true, false] {
            echo_with_tiny_reads(own_records).await;
        }
    }

    async fn echo_with_tiny_reads(own_records: bool) {
        let ca = Ca::new("test CA");
        let s = setup(&ca, &ca).await;
        let addr = s.listener.local_addr().unwrap();
        let client_config = Arc::clone(&s.client);
        let server = {
            let mut config = (*s.server).clone();
            config.enable_secret_extraction = own_records;
            let config = Arc::new(config);
            let listener =
                tokio::net::TcpListener::from_std(s.listener.into_std().unwrap()).unwrap();
            tokio::task::spawn_local(async move {
                let (tcp, _) = listener.accept().await.unwrap();
                let mut tls = TlsStream::accept(adopt(tcp), config).await.unwrap();
                assert_eq!(tls.alpn_protocol(), Some(ALPN));
                assert!(tls.peer_certificates().is_some());
                assert_eq!(tls.own_records(), own_records);
                // A tiny buffer, so plaintext waits in the connection.
                echo_until_eof(&mut tls, 100).await
            })
        };
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let mut c = tokio_rustls::TlsConnector::from(client_config)
            .connect(rustls::pki_types::ServerName::try_from(NAME).unwrap(), tcp)
            .await
            .unwrap();
        let data = pattern(3 * 1024 * 1024 + 17);
        let back = timeout(send_and_read_back(&mut c, &data, false)).await;
        assert_eq!(back.len(), data.len());
        assert!(back == data, "echoed bytes differ");
        assert_eq!(timeout(server).await.unwrap(), data.len());
    }

    /// TLS records cut at arbitrary points: a relay between a tokio-rustls client and our
    /// server passes the client's bytes on in random pieces with pauses between them, so
    /// records, and record headers, arrive split across receives anywhere (on io_uring, the
    /// first part of a split record is copied in front of the next receive's buffer). The server
    /// reads with random read sizes and echoes; every byte comes back in order. Several seeds
    /// per backend, each printed when it runs.
    async fn records_cut_anywhere_read_back_whole_on() {
        use rand::{Rng, SeedableRng};
        for seed in 0..6u64 {
            eprintln!("records_cut_anywhere: seed {seed}");
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
            let ca = Ca::new("test CA");
            let s = setup(&ca, &ca).await;
            let server_addr = s.listener.local_addr().unwrap();
            let config = Arc::clone(&s.server);
            let reads: Vec<usize> = (0..64).map(|_| rng.gen_range(1..70_000)).collect();
            let server = {
                let listener =
                    tokio::net::TcpListener::from_std(s.listener.into_std().unwrap()).unwrap();
                tokio::task::spawn_local(async move {
                    let mut tls = accept_one(&listener, config).await;
                    echo_in_reads_until_eof(&mut tls, reads.iter().copied().cycle()).await
                })
            };
            let relay = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let relay_addr = relay.local_addr().unwrap();
            let pieces: Vec<(usize, bool)> = (0..97)
                .map(|_| (rng.gen_range(1..20_000), rng.gen_bool(0.3)))
                .collect();
            let relay = tokio::task::spawn_local(async move {
                let (client, _) = relay.accept().await.unwrap();
                let upstream = tokio::net::TcpStream::connect(server_addr).await.unwrap();
                upstream.set_nodelay(true).unwrap();
                let (mut from_client, mut to_client) = client.into_split();
                let (mut from_server, mut to_server) = upstream.into_split();
                let up = async move {
                    let mut buf = vec![0u8; 20_000];
                    for (size, pause) in pieces.iter().cycle() {
                        let n = from_client.read(&mut buf[..*size]).await.unwrap();
                        if n == 0 {
                            break;
                        }
                        // Each piece its own segment: the server sees these cuts.
                        to_server.write_all(&buf[..n]).await.unwrap();
                        if *pause {
                            tokio::time::sleep(Duration::from_micros(200)).await;
                        } else {
                            tokio::task::yield_now().await;
                        }
                    }
                    to_server.shutdown().await.unwrap();
                };
                let down = async move {
                    tokio::io::copy(&mut from_server, &mut to_client)
                        .await
                        .unwrap();
                    to_client.shutdown().await.unwrap();
                };
                tokio::join!(up, down);
            });
            let tcp = tokio::net::TcpStream::connect(relay_addr).await.unwrap();
            let mut c = tokio_rustls::TlsConnector::from(Arc::clone(&s.client))
                .connect(rustls::pki_types::ServerName::try_from(NAME).unwrap(), tcp)
                .await
                .unwrap();
            let data = pattern(rng.gen_range(1..600_000));
            let back = timeout(send_and_read_back(&mut c, &data, seed % 2 == 1)).await;
            assert!(back == data, "seed {seed}: echoed bytes differ");
            assert_eq!(timeout(server).await.unwrap(), data.len(), "seed {seed}");
            timeout(relay).await.unwrap();
        }
    }

    /// Echo what arrives, read `chunk` bytes at most at a time, until EOF; then close. Returns
    /// the bytes echoed.
    async fn echo_until_eof<S: AsyncRead + AsyncWrite + Unpin>(s: &mut S, chunk: usize) -> usize {
        echo_in_reads_until_eof(s, std::iter::repeat(chunk)).await
    }

    /// [`echo_until_eof`] with each read taking at most the next of `sizes` bytes.
    async fn echo_in_reads_until_eof<S: AsyncRead + AsyncWrite + Unpin>(
        s: &mut S,
        sizes: impl Iterator<Item = usize>,
    ) -> usize {
        let mut buf = Vec::new();
        let mut total = 0;
        for size in sizes {
            buf.resize(size, 0);
            let n = s.read(&mut buf).await.unwrap();
            if n == 0 {
                break;
            }
            total += n;
            s.write_all(&buf[..n]).await.unwrap();
        }
        s.shutdown().await.unwrap();
        total
    }

    /// Read until a clean EOF (`Ok`) or an error.
    async fn read_to_eof_or_error<S: AsyncRead + Unpin>(s: &mut S) -> io::Result<()> {
        let mut buf = vec![0u8; 4096];
        loop {
            if s.read(&mut buf).await? == 0 {
                return Ok(());
            }
        }
    }

    /// Write `data` to `s` in writes of every size (two-slice vectored writes with `vectored`),
    /// shut down the write side, and return everything read back until EOF.
    async fn send_and_read_back<S: AsyncRead + AsyncWrite + Unpin>(
        s: &mut S,
        data: &[u8],
        vectored: bool,
    ) -> Vec<u8> {
        let (mut rd, mut wr) = tokio::io::split(s);
        let send = async {
            let mut off = 0;
            let mut size = 1;
            while off < data.len() {
                let end = (off + size).min(data.len());
                if vectored {
                    let (a, b) = data[off..end].split_at((end - off) / 3);
                    let mut slices = [std::io::IoSlice::new(a), std::io::IoSlice::new(b)];
                    let mut slices = &mut slices[..];
                    while !slices.is_empty() {
                        let n = wr.write_vectored(slices).await.unwrap();
                        std::io::IoSlice::advance_slices(&mut slices, n);
                    }
                } else {
                    wr.write_all(&data[off..end]).await.unwrap();
                }
                off = end;
                size = (size * 3 + 1) % 200_000 + 1;
            }
            wr.shutdown().await.unwrap();
        };
        let recv = async {
            let mut back = Vec::new();
            rd.read_to_end(&mut back).await.unwrap();
            back
        };
        tokio::join!(send, recv).1
    }

    /// The client side: both ends are `TlsStream`s. The server sends session tickets after the
    /// handshake (the client takes them in stride, mid-stream), data of every write size goes
    /// both ways through vectored writes, and close_notify ends both cleanly. A client that does
    /// not trust the server's CA fails its handshake with an error.
    async fn client_side_echo_tickets_and_refusal_on() {
        let ca = Ca::new("test CA");
        let s = setup(&ca, &ca).await;
        let addr = s.listener.local_addr().unwrap();
        let mut server_config = (*s.server).clone();
        server_config.send_tls13_tickets = 2;
        let server_config = Arc::new(server_config);
        let listener = tokio::net::TcpListener::from_std(s.listener.into_std().unwrap()).unwrap();
        let server = tokio::task::spawn_local(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            let mut tls = TlsStream::accept(adopt(tcp), server_config.clone())
                .await
                .unwrap();
            let total = echo_until_eof(&mut tls, 70_000).await;
            // The second client does not trust this server: its handshake fails.
            let (tcp, _) = listener.accept().await.unwrap();
            assert!(TlsStream::accept(adopt(tcp), server_config).await.is_err());
            total
        });
        let name = ServerName::try_from(NAME).unwrap();
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let mut c = TlsStream::connect(adopt(tcp), Arc::clone(&s.client), name.clone())
            .await
            .unwrap();
        assert_eq!(c.alpn_protocol(), Some(ALPN));
        assert!(c.own_records());
        let data = pattern(3 * 1024 * 1024 + 17);
        let back = timeout(send_and_read_back(&mut c, &data, true)).await;
        assert_eq!(back.len(), data.len());
        assert!(back == data, "echoed bytes differ");

        let other = Ca::new("other CA");
        let distrusting =
            client_config_with_alpn(&Trust::CaPem(other.pem.clone()), None, &[ALPN]).unwrap();
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let refused = timeout(TlsStream::connect(adopt(tcp), distrusting, name)).await;
        let err = refused.expect_err("a client that does not trust the server must fail");
        assert_eq!(err.kind(), io::ErrorKind::InvalidData, "{err}");
        assert_eq!(timeout(server).await.unwrap(), data.len());
    }

    /// The server's session ticket waits for its first write and goes out with it: nothing
    /// reaches the client after the handshake until the server writes, and the ticket that came
    /// with that write resumes the next session.
    async fn tickets_go_out_with_the_first_write_on() {
        let ca = Ca::new("test CA");
        let s = setup(&ca, &ca).await;
        let mut server_config = (*s.server).clone();
        server_config.send_tls13_tickets = 1;
        let server_config = Arc::new(server_config);
        let accept = || accept_one(&s.listener, Arc::clone(&server_config));
        let (mut server, mut client) = tokio::join!(accept(), connect(&s));
        assert_eq!(server.handshake_kind(), Some(rustls::HandshakeKind::Full));
        // The server reads; nothing arrives at the client's socket meanwhile (peeked, so the
        // client's TLS does not consume it).
        let (mut one, mut other) = ([0u8; 1], [0u8; 1]);
        let idle = tokio::join!(
            tokio::time::timeout(
                Duration::from_millis(300),
                client.get_ref().0.peek(&mut one)
            ),
            tokio::time::timeout(Duration::from_millis(300), server.read(&mut other)),
        );
        assert!(
            idle.0.is_err(),
            "bytes reached the client before the server wrote: {:?}",
            idle.0
        );
        assert!(idle.1.is_err(), "the client sent nothing");
        server.write_all(b"hello").await.unwrap();
        let mut got = [0u8; 5];
        timeout(client.read_exact(&mut got)).await.unwrap();
        assert_eq!(&got, b"hello");
        // The ticket arrived with "hello": the next session resumes.
        let (second, _client2) = tokio::join!(accept(), connect(&s));
        assert_eq!(
            second.handshake_kind(),
            Some(rustls::HandshakeKind::Resumed)
        );
    }

    /// The session moves to another thread mid-stream with ciphertext and plaintext buffered;
    /// nothing is lost or reordered.
    async fn handover_to_another_thread_keeps_buffered_bytes_on() {
        let ca = Ca::new("test CA");
        let s = setup(&ca, &ca).await;
        let data = pattern(2 * 1024 * 1024 + 5);
        let accept = accept_one(&s.listener, Arc::clone(&s.server));
        let (mut server, mut client) = tokio::join!(accept, connect(&s));
        client.write_all(&data).await.unwrap();
        client.flush().await.unwrap();
        // Take a little, so some is decrypted and some still ciphertext.
        let mut first = vec![0u8; 1000];
        server.read_exact(&mut first).await.unwrap();
        let parts = server.into_parts(Bytes::from_static(b"left")).unwrap();
        let backend = crate::socket::current_backend();
        let other = std::thread::spawn(move || {
            crate::socket::block_on_worker(backend, async move {
                let (mut tls, leftover) = TlsStream::from_parts(parts).unwrap();
                assert_eq!(&leftover[..], b"left");
                let mut rest = vec![0u8; data.len() - 1000];
                tls.read_exact(&mut rest).await.unwrap();
                tls.write_all(b"done").await.unwrap();
                tls.flush().await.unwrap();
                rest
            })
            .unwrap()
        });
        let mut done = [0u8; 4];
        timeout(client.read_exact(&mut done)).await.unwrap();
        assert_eq!(&done, b"done");
        let rest = other.join().unwrap();
        let mut all = first;
        all.extend_from_slice(&rest);
        assert!(
            all == pattern(2 * 1024 * 1024 + 5),
            "bytes lost or reordered"
        );
    }

    /// A client certificate from another CA fails the handshake with an alert the client sees.
    async fn foreign_client_certificate_is_refused_with_an_alert_on() {
        let ca = Ca::new("test CA");
        let other = Ca::new("other CA");
        let s = setup(&other, &ca).await;
        let accept = {
            let config = Arc::clone(&s.server);
            let listener = &s.listener;
            async move {
                let (tcp, _) = listener.accept().await.unwrap();
                TlsStream::accept(adopt(tcp), config).await
            }
        };
        let client = async {
            let tcp = tokio::net::TcpStream::connect(s.listener.local_addr().unwrap())
                .await
                .unwrap();
            let mut tls = tokio_rustls::TlsConnector::from(Arc::clone(&s.client))
                .connect(rustls::pki_types::ServerName::try_from(NAME).unwrap(), tcp)
                .await?;
            // TLS 1.3: the client learns of the refusal on its first read.
            let mut b = [0u8; 1];
            tls.read(&mut b).await.map(|_| ())
        };
        let (server, client) = timeout(async { tokio::join!(accept, client) }).await;
        let err = server.expect_err("the server accepted a foreign certificate");
        assert!(err.to_string().contains("certificate"), "{err}");
        let err = client.expect_err("the client did not notice the refusal");
        assert!(
            err.to_string().to_lowercase().contains("alert"),
            "the client saw no alert: {err}"
        );
    }

    /// Bytes that are not TLS end the handshake with an error, not a hang or a panic.
    async fn garbage_fails_the_handshake_on() {
        let ca = Ca::new("test CA");
        let s = setup(&ca, &ca).await;
        let addr = s.listener.local_addr().unwrap();
        let client = async {
            let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
            tcp.write_all(&[0x16, 0x03, 0x01, 0xff, 0xff, 1, 2, 3])
                .await
                .unwrap();
            tcp.write_all(&[0u8; 70_000]).await.ok();
            tcp
        };
        let accept = async {
            let (tcp, _) = s.listener.accept().await.unwrap();
            TlsStream::accept(adopt(tcp), Arc::clone(&s.server)).await
        };
        let (r, _tcp) = timeout(async { tokio::join!(accept, client) }).await;
        assert!(r.is_err());
    }

    /// After a good handshake the peer sends raw bytes that are not (valid) TLS records —
    /// random, a plausible header over random bytes, a record cut short, a huge length: the
    /// server's read ends with an error or EOF, never a panic or a hang.
    async fn garbage_after_the_handshake_is_an_error_not_a_panic_on() {
        let ca = Ca::new("test CA");
        let s = setup(&ca, &ca).await;
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for case in 0..24 {
            let len = (next() % 40_000) as usize + 1;
            let mut junk: Vec<u8> = (0..len).map(|_| next() as u8).collect();
            match case % 4 {
                // application_data header, random body
                1 => junk
                    .splice(0..0, [23, 3, 3, (len >> 8) as u8, len as u8])
                    .for_each(drop),
                // a record header promising more than will come
                2 => junk = vec![23, 3, 3, 0x40, 0x00, 1, 2, 3],
                // an impossible length
                3 => junk.splice(0..0, [23, 3, 3, 0xff, 0xff]).for_each(drop),
                _ => {}
            }
            let accept = accept_one(&s.listener, Arc::clone(&s.server));
            let (mut server, client) = tokio::join!(accept, connect(&s));
            let (mut tcp, _) = client.into_inner();
            tcp.write_all(&junk).await.unwrap();
            tcp.shutdown().await.unwrap();
            let r = timeout(read_to_eof_or_error(&mut server)).await;
            // Random bytes cannot authenticate: anything but a clean EOF must be an error.
            if case % 4 != 2 {
                assert!(r.is_err(), "case {case}: garbage was accepted as data");
            }
            // Once failed, the stream stays failed and writing is refused too.
            if r.is_err() {
                assert!(server.write_all(b"x").await.is_err());
            }
        }
    }

    /// The client side against a server that sends garbage after the handshake: errors, never
    /// a panic, and a clean EOF only where the garbage is an incomplete record header.
    async fn garbage_from_the_server_is_an_error_for_the_client_on() {
        let ca = Ca::new("test CA");
        let s = setup(&ca, &ca).await;
        let addr = s.listener.local_addr().unwrap();
        let name = ServerName::try_from(NAME).unwrap();
        for (case, junk) in [
            vec![0x42u8; 3000],
            [&[23u8, 3, 3, 0x01, 0x00][..], &[7u8; 256]].concat(),
            vec![23, 3, 3, 0x40, 0x00, 1, 2, 3],
            vec![23, 3, 3, 0xff, 0xff, 0, 0, 0],
            vec![21, 3, 3, 0, 2, 2, 40],
        ]
        .into_iter()
        .enumerate()
        {
            let accept = accept_one(&s.listener, Arc::clone(&s.server));
            let connect = async {
                let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
                TlsStream::connect(adopt(tcp), Arc::clone(&s.client), name.clone())
                    .await
                    .unwrap()
            };
            let (server, mut client) = tokio::join!(accept, connect);
            let parts = server.into_parts(Bytes::new()).unwrap();
            parts.socket.set_nonblocking(true).unwrap();
            let mut raw = tokio::net::TcpStream::from_std(parts.socket).unwrap();
            raw.write_all(&junk).await.unwrap();
            raw.shutdown().await.unwrap();
            let r = timeout(read_to_eof_or_error(&mut client)).await;
            if case != 2 {
                assert!(r.is_err(), "case {case}: garbage was accepted");
            }
            if r.is_err() {
                assert!(client.write_all(b"x").await.is_err(), "case {case}");
            }
        }
    }

    /// Vectored writes: many buffers of mixed sizes (a frame header's 10 bytes up to more than
    /// one batch holds) arrive whole and in order, however the batches split them.
    async fn vectored_writes_arrive_in_order_on() {
        let ca = Ca::new("test CA");
        let s = setup(&ca, &ca).await;
        let accept = accept_one(&s.listener, Arc::clone(&s.server));
        let (mut server, mut client) = tokio::join!(accept, connect(&s));
        assert!(server.is_write_vectored());
        let data = pattern(3 * 1024 * 1024 + 11);
        let sizes = [10usize, 32 * 1024, 1, 70 * 1024, 10, 16 * 1024 + 5, 300];
        let send = async {
            let mut off = 0;
            let mut round = 0;
            while off < data.len() {
                // Up to 12 buffers per call, sizes cycling through `sizes`.
                let mut bufs = Vec::new();
                let mut at = off;
                for k in 0..12 {
                    let end = (at + sizes[(round + k) % sizes.len()]).min(data.len());
                    if at == end {
                        break;
                    }
                    bufs.push(std::io::IoSlice::new(&data[at..end]));
                    at = end;
                }
                let n = server.write_vectored(&bufs).await.unwrap();
                assert!(n > 0 && n <= at - off, "wrote {n} of {}", at - off);
                off += n;
                round += 1;
            }
            server.flush().await.unwrap();
            server.shutdown().await.unwrap();
        };
        let recv = async {
            let mut got = Vec::new();
            client.read_to_end(&mut got).await.unwrap();
            got
        };
        let ((), got) = timeout(async { tokio::join!(send, recv) }).await;
        assert_eq!(got.len(), data.len());
        assert!(got == data, "bytes differ");
    }

    /// A peer that stops reading stops our writer: what waits in the connection stays bounded.
    async fn a_slow_reader_applies_backpressure_on() {
        let ca = Ca::new("test CA");
        let s = setup(&ca, &ca).await;
        let accept = accept_one(&s.listener, Arc::clone(&s.server));
        let (mut server, _client) = tokio::join!(accept, connect(&s));
        let chunk = vec![0x42u8; 64 * 1024];
        let mut written = 0usize;
        loop {
            match tokio::time::timeout(Duration::from_millis(300), server.write(&chunk)).await {
                Ok(Ok(n)) => written += n,
                Ok(Err(e)) => panic!("write failed: {e}"),
                Err(_) => break, // blocked: the client is not reading
            }
            assert!(written < 256 * 1024 * 1024, "writes never blocked");
        }
        assert!(
            server.buf.outgoing.len() <= MAX_OUTGOING + WRITE_SCRATCH,
            "{} bytes wait in the connection",
            server.buf.outgoing.len()
        );
    }

    /// Accept one connection on `listener` and run the server handshake.
    async fn accept_one(
        listener: &tokio::net::TcpListener,
        config: Arc<ServerConfig>,
    ) -> TlsStream {
        let (tcp, _) = listener.accept().await.unwrap();
        TlsStream::accept(adopt(tcp), config).await.unwrap()
    }

    /// The server side of a test connection on this thread's backend.
    fn adopt(tcp: tokio::net::TcpStream) -> crate::socket::Socket {
        crate::socket::Socket::from_std(tcp.into_std().unwrap()).unwrap()
    }

    #[test]
    fn echo_with_tiny_reads_and_clean_close() {
        crate::socket::on_each_backend(echo_with_tiny_reads_and_clean_close_on);
    }

    #[test]
    fn records_cut_anywhere_read_back_whole() {
        crate::socket::on_each_backend(records_cut_anywhere_read_back_whole_on);
    }

    #[test]
    fn client_side_echo_tickets_and_refusal() {
        crate::socket::on_each_backend(client_side_echo_tickets_and_refusal_on);
    }

    #[test]
    fn tickets_go_out_with_the_first_write() {
        crate::socket::on_each_backend(tickets_go_out_with_the_first_write_on);
    }

    #[test]
    fn handover_to_another_thread_keeps_buffered_bytes() {
        crate::socket::on_each_backend(handover_to_another_thread_keeps_buffered_bytes_on);
    }

    #[test]
    fn foreign_client_certificate_is_refused_with_an_alert() {
        crate::socket::on_each_backend(foreign_client_certificate_is_refused_with_an_alert_on);
    }

    #[test]
    fn garbage_fails_the_handshake() {
        crate::socket::on_each_backend(garbage_fails_the_handshake_on);
    }

    #[test]
    fn garbage_after_the_handshake_is_an_error_not_a_panic() {
        crate::socket::on_each_backend(garbage_after_the_handshake_is_an_error_not_a_panic_on);
    }

    #[test]
    fn garbage_from_the_server_is_an_error_for_the_client() {
        crate::socket::on_each_backend(garbage_from_the_server_is_an_error_for_the_client_on);
    }

    #[test]
    fn a_slow_reader_applies_backpressure() {
        crate::socket::on_each_backend(a_slow_reader_applies_backpressure_on);
    }

    #[test]
    fn vectored_writes_arrive_in_order() {
        crate::socket::on_each_backend(vectored_writes_arrive_in_order_on);
    }
}
