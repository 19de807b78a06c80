//! TLS 1.3 record protection of our own, once rustls has finished the handshake.
//!
//! rustls 0.23's unbuffered API copies every record twice on each side: a received record's
//! plaintext into a fresh `Vec` before the caller sees it, and the plaintext to send into a `Vec`
//! per record, sealed there and copied into the caller's buffer. Here records are opened in place
//! where they were received, and sealed in place in the buffer they are sent from, several
//! writes (a tunnel's frames) per record.
//!
//! rustls stays in charge of everything but the records: it runs the handshake, derives the keys
//! and hands them over with [`UnbufferedServerConnection::dangerous_into_kernel_connection`]
//! (its kTLS entry point), then derives the next keys on a key update and keeps the session
//! tickets a server sends a client. This module is sans-IO: bytes in, bytes out.
//!
//! Only TLS 1.3 is done here. A TLS 1.2 connection keeps rustls' own record layer.
//!
//! [`UnbufferedServerConnection::dangerous_into_kernel_connection`]:
//!     rustls::server::UnbufferedServerConnection::dangerous_into_kernel_connection

use aws_lc_rs::aead::{self, Aad, LessSafeKey, Nonce, UnboundKey};
use bytes::BytesMut;
use rustls::kernel::KernelConnection;
use rustls::{ConnectionTrafficSecrets, ExtractedSecrets, ProtocolVersion};

/// Most plaintext in one record.
pub(crate) const MAX_PLAINTEXT: usize = 16 * 1024;
/// Most ciphertext in one record (RFC 8446 5.2: plaintext, content type, padding and tag).
const MAX_CIPHERTEXT: usize = MAX_PLAINTEXT + 256;
/// A record's header: content type, legacy version, length.
pub(crate) const HEADER: usize = 5;
pub(crate) const TAG: usize = 16;
/// What a record adds to its plaintext: header, inner content type and tag.
pub(crate) const OVERHEAD: usize = HEADER + 1 + TAG;

const CHANGE_CIPHER_SPEC: u8 = 20;
const ALERT: u8 = 21;
const HANDSHAKE: u8 = 22;
const APPLICATION_DATA: u8 = 23;

const NEW_SESSION_TICKET: u8 = 4;
const KEY_UPDATE: u8 = 24;

/// A post-handshake message split across records is kept until complete, up to this size.
const MAX_HANDSHAKE_MESSAGE: usize = 64 * 1024;
/// Records sealed with one key before it is replaced, below the suite's confidentiality limit.
const KEY_UPDATE_MARGIN: u64 = 1024;

const ALERT_WARNING: u8 = 1;
const ALERT_FATAL: u8 = 2;
const CLOSE_NOTIFY: u8 = 0;
const USER_CANCELED: u8 = 90;

/// Why a connection's records cannot go on.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    #[error("TLS record larger than the protocol allows")]
    Overflow,
    #[error("TLS record failed authentication")]
    BadRecordMac,
    #[error("unexpected TLS message: {0}")]
    Unexpected(&'static str),
    #[error("malformed TLS message: {0}")]
    Decode(&'static str),
    #[error("the peer sent TLS alert {0}")]
    PeerAlert(u8),
    #[error("TLS keys: {0}")]
    Keys(&'static str),
    #[error(transparent)]
    Rustls(#[from] rustls::Error),
}

impl RecordError {
    /// The fatal alert that tells the peer (none for an alert it sent).
    pub(crate) fn alert(&self) -> Option<u8> {
        Some(match self {
            Self::Overflow => 22,
            Self::BadRecordMac => 20,
            Self::Unexpected(_) => 10,
            Self::Decode(_) => 50,
            Self::PeerAlert(_) => return None,
            Self::Keys(_) | Self::Rustls(_) => 80,
        })
    }
}

/// One direction's key, IV and record sequence number.
struct Keys {
    key: LessSafeKey,
    iv: [u8; 12],
    seq: u64,
}

impl Keys {
    fn new((seq, secrets): (u64, ConnectionTrafficSecrets)) -> Result<Self, RecordError> {
        let (algorithm, key, iv) = match &secrets {
            ConnectionTrafficSecrets::Aes128Gcm { key, iv } => (&aead::AES_128_GCM, key, iv),
            ConnectionTrafficSecrets::Aes256Gcm { key, iv } => (&aead::AES_256_GCM, key, iv),
            ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv } => {
                (&aead::CHACHA20_POLY1305, key, iv)
            }
            _ => return Err(RecordError::Keys("cipher suite not supported")),
        };
        let key = UnboundKey::new(algorithm, key.as_ref())
            .map_err(|_| RecordError::Keys("bad key length"))?;
        let iv = <[u8; 12]>::try_from(iv.as_ref()).map_err(|_| RecordError::Keys("bad IV"))?;
        Ok(Self {
            key: LessSafeKey::new(key),
            iv,
            seq,
        })
    }

    /// The nonce of the next record (RFC 8446 5.3: the IV XOR the sequence number), which is
    /// then used up.
    fn next_nonce(&mut self) -> Result<Nonce, RecordError> {
        let seq = self.seq;
        self.seq = seq
            .checked_add(1)
            .ok_or(RecordError::Keys("record sequence number exhausted"))?;
        let mut nonce = self.iv;
        for (n, s) in nonce.iter_mut().skip(4).zip(seq.to_be_bytes()) {
            *n ^= s;
        }
        Ok(Nonce::assume_unique_for_key(nonce))
    }
}

/// What one record held.
#[derive(Debug)]
pub(crate) enum Opened<'a> {
    /// Application data (possibly empty).
    Data(&'a [u8]),
    /// A message for the record layer itself (a key update, a session ticket, user_canceled).
    Control,
    /// close_notify.
    Closed,
}

/// Hands a session ticket from the server to rustls (clients only).
pub(crate) type TicketSink<D> = fn(&mut KernelConnection<D>, &[u8]) -> Result<(), rustls::Error>;

/// A TLS 1.3 connection's record layer after the handshake.
pub(crate) struct Records<D> {
    kernel: KernelConnection<D>,
    tickets: TicketSink<D>,
    tx: Keys,
    rx: Keys,
    /// Records sealed with one key before a key update replaces it.
    tx_limit: u64,
    /// The start of a post-handshake message whose end is in a later record.
    handshake: Vec<u8>,
}

impl<D> std::fmt::Debug for Records<D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Records")
            .field("tx_seq", &self.tx.seq)
            .field("rx_seq", &self.rx.seq)
            .finish_non_exhaustive()
    }
}

impl<D> Records<D> {
    /// Take over from rustls. Fails (and the connection with it) for anything but TLS 1.3.
    pub(crate) fn new(
        secrets: ExtractedSecrets,
        kernel: KernelConnection<D>,
        tickets: TicketSink<D>,
    ) -> Result<Self, RecordError> {
        if kernel.protocol_version() != ProtocolVersion::TLSv1_3 {
            return Err(RecordError::Keys("only TLS 1.3 records are done here"));
        }
        let limit = kernel
            .negotiated_cipher_suite()
            .tls13()
            .map_or(0, |s| s.common.confidentiality_limit);
        Ok(Self {
            tx: Keys::new(secrets.tx)?,
            rx: Keys::new(secrets.rx)?,
            kernel,
            tickets,
            tx_limit: limit.saturating_sub(KEY_UPDATE_MARGIN).max(1),
            handshake: Vec::new(),
        })
    }

    #[cfg(test)]
    pub(crate) fn set_key_update_interval(&mut self, records: u64) {
        self.tx_limit = records.max(1);
    }

    /// The front of `buf` as the record of `n` bytes of plaintext, its header written: (header,
    /// the rest of the record).
    fn record_at(buf: &mut [u8], n: usize) -> Result<([u8; HEADER], &mut [u8]), RecordError> {
        let len = n + 1 + TAG;
        let record = buf
            .get_mut(..HEADER + len)
            .ok_or(RecordError::Keys("no room for the record"))?;
        let [hi, lo] = u16::try_from(len)
            .map_err(|_| RecordError::Overflow)?
            .to_be_bytes();
        let header = [APPLICATION_DATA, 3, 3, hi, lo];
        let (head, body) = record.split_at_mut(HEADER);
        head.copy_from_slice(&header);
        Ok((header, body))
    }

    /// Seal `plaintext` straight from where it is into a record of application data at the
    /// front of `buf` (no copy first). Returns the record's length.
    fn seal_from(&mut self, buf: &mut [u8], plaintext: &[u8]) -> Result<usize, RecordError> {
        let n = plaintext.len();
        let (header, body) = Self::record_at(buf, n)?;
        let (ciphertext, type_and_tag) = body.split_at_mut(n);
        let nonce = self.tx.next_nonce()?;
        self.tx
            .key
            .seal_out_of_place_scatter(
                nonce,
                Aad::from(header),
                plaintext,
                ciphertext,
                &[APPLICATION_DATA],
                type_and_tag,
            )
            .map_err(|_| RecordError::Keys("seal failed"))?;
        Ok(HEADER + n + 1 + TAG)
    }

    /// Seal `plaintext` already placed at `buf[HEADER..HEADER + n]` as one record of inner type
    /// `content_type`: writes the header, the type and the tag. Returns the record's length.
    fn seal_at(
        &mut self,
        buf: &mut [u8],
        n: usize,
        content_type: u8,
    ) -> Result<usize, RecordError> {
        let (header, body) = Self::record_at(buf, n)?;
        let len = body.len();
        let (inner, tag_out) = body.split_at_mut(n + 1);
        if let Some(t) = inner.last_mut() {
            *t = content_type;
        }
        let nonce = self.tx.next_nonce()?;
        let tag = self
            .tx
            .key
            .seal_in_place_separate_tag(nonce, Aad::from(header), inner)
            .map_err(|_| RecordError::Keys("seal failed"))?;
        tag_out.copy_from_slice(tag.as_ref());
        Ok(HEADER + len)
    }

    /// One record holding `message` (a short control message) into `dst`.
    fn seal_message(
        &mut self,
        dst: &mut [u8],
        content_type: u8,
        message: &[u8],
    ) -> Result<usize, RecordError> {
        let body = dst
            .get_mut(HEADER..HEADER + message.len())
            .ok_or(RecordError::Keys("no room for the record"))?;
        body.copy_from_slice(message);
        self.seal_at(dst, message.len(), content_type)
    }

    /// One record of inner type `content_type` holding `content`, then `padding` zeros,
    /// verbatim: records of any shape a peer could send, for the tests and fuzzing.
    #[cfg(any(test, feature = "fuzzing"))]
    pub(crate) fn seal_padded(
        &mut self,
        content_type: u8,
        content: &[u8],
        padding: usize,
    ) -> Result<Vec<u8>, RecordError> {
        let mut message = content.to_vec();
        let last = if padding == 0 {
            content_type
        } else {
            // The type goes inside the message and the record's own type byte is the last
            // zero of the padding.
            message.push(content_type);
            message.resize(message.len() + padding - 1, 0);
            0
        };
        let mut wire = vec![0u8; message.len() + OVERHEAD];
        let n = self.seal_message(&mut wire, last, &message)?;
        wire.truncate(n);
        Ok(wire)
    }

    /// Append a record holding `message` to `out`.
    fn push_message(
        &mut self,
        out: &mut BytesMut,
        content_type: u8,
        message: &[u8],
    ) -> Result<(), RecordError> {
        let start = out.len();
        out.resize(start + message.len() + OVERHEAD, 0);
        let r = self.seal_message(
            out.get_mut(start..).unwrap_or_default(),
            content_type,
            message,
        );
        match r {
            Ok(n) => {
                out.truncate(start + n);
                Ok(())
            }
            Err(e) => {
                out.truncate(start);
                Err(e)
            }
        }
    }

    /// Our key update into `dst` (sealed with the old key), then the new key.
    fn update_tx_key(&mut self, dst: &mut [u8], request: bool) -> Result<usize, RecordError> {
        let n = self.seal_message(dst, HANDSHAKE, &[KEY_UPDATE, 0, 0, 1, u8::from(request)])?;
        self.tx = Keys::new(self.kernel.update_tx_secret()?)?;
        Ok(n)
    }

    /// Seal `bufs` in order as records into `dst`, taking at most `max` bytes of plaintext.
    /// Records are filled across the slices, up to [`MAX_PLAINTEXT`] each. Returns (plaintext
    /// taken, bytes written). A key that has sealed its share is replaced on the way.
    ///
    /// A record whose plaintext lies in one slice is sealed from there; small slices share a
    /// record, gathered into `dst` and sealed in place. A slice large enough to fill a record
    /// by itself starts a record of its own: the small end of the slice before it (a frame's
    /// last bytes) goes out as a short record rather than having 16 KiB of the large one copied
    /// behind it.
    pub(crate) fn seal(
        &mut self,
        bufs: &[std::io::IoSlice<'_>],
        max: usize,
        dst: &mut [u8],
    ) -> Result<(usize, usize), RecordError> {
        let (mut taken, mut written) = (0, 0);
        let (mut slice, mut pos) = (0, 0);
        loop {
            if self.tx.seq >= self.tx_limit {
                // Room for the key update and a record after it, or the update waits: a call
                // that took no plaintext must not have written anything.
                if dst.len() - written < 5 + OVERHEAD + OVERHEAD + 1 {
                    break;
                }
                written += self.update_tx_key(dst.get_mut(written..).unwrap_or_default(), false)?;
            }
            let room = (dst.len() - written).saturating_sub(OVERHEAD);
            let want = MAX_PLAINTEXT.min(max - taken).min(room);
            if want == 0 {
                break;
            }
            let out = dst.get_mut(written..).unwrap_or_default();
            let whole_record = bufs.get(slice).and_then(|b| b.get(pos..)).filter(|src| {
                src.len() >= want
                    || (!src.is_empty()
                        && bufs
                            .iter()
                            .skip(slice + 1)
                            .find(|b| !b.is_empty())
                            .is_none_or(|next| next.len() >= MAX_PLAINTEXT))
            });
            if let Some(src) = whole_record {
                let n = src.len().min(want);
                written += self.seal_from(out, src.get(..n).unwrap_or_default())?;
                taken += n;
                if n == src.len() {
                    slice += 1;
                    pos = 0;
                } else {
                    pos += n;
                }
                continue;
            }
            let mut n = 0;
            while n < want {
                let Some(whole) = bufs.get(slice) else {
                    break;
                };
                let src = whole.get(pos..).unwrap_or_default();
                if n > 0 && pos == 0 && src.len() >= MAX_PLAINTEXT {
                    // A large slice starts a record of its own (sealed from where it is).
                    break;
                }
                let k = src.len().min(want - n);
                if let (Some(d), Some(s)) = (out.get_mut(HEADER + n..HEADER + n + k), src.get(..k))
                {
                    d.copy_from_slice(s);
                }
                n += k;
                pos += k;
                if pos >= whole.len() {
                    slice += 1;
                    pos = 0;
                }
            }
            if n == 0 {
                break;
            }
            written += self.seal_at(out, n, APPLICATION_DATA)?;
            taken += n;
        }
        Ok((taken, written))
    }

    /// Append close_notify (or a fatal alert) to `out`.
    pub(crate) fn push_alert(&mut self, out: &mut BytesMut, fatal: Option<u8>) {
        let message = match fatal {
            Some(desc) => [ALERT_FATAL, desc],
            None => [ALERT_WARNING, CLOSE_NOTIFY],
        };
        // Best effort: a connection that cannot seal an alert is closed without one.
        let _ = self.push_message(out, ALERT, &message);
    }

    /// The header and wire length of the record at the front of `input`, once it is all there.
    fn whole_record(input: &[u8]) -> Result<Option<([u8; HEADER], usize)>, RecordError> {
        let Some(&[content_type, major, minor, hi, lo]) = input.get(..HEADER) else {
            return Ok(None);
        };
        // (RFC 8446 5.1: the legacy version bytes are ignored.)
        if content_type != APPLICATION_DATA {
            return Err(RecordError::Unexpected(match content_type {
                ALERT => "an unencrypted alert after the handshake",
                CHANGE_CIPHER_SPEC => "change_cipher_spec after the handshake",
                HANDSHAKE => "an unencrypted handshake message after the handshake",
                _ => "a record of unknown type",
            }));
        }
        let len = usize::from(u16::from_be_bytes([hi, lo]));
        if len > MAX_CIPHERTEXT {
            return Err(RecordError::Overflow);
        }
        if input.len() < HEADER + len {
            return Ok(None);
        }
        if len < TAG + 1 {
            return Err(RecordError::BadRecordMac);
        }
        Ok(Some(([content_type, major, minor, hi, lo], HEADER + len)))
    }

    /// Open the record at the front of `input` if it is all there. Returns its length on the wire
    /// (0 while incomplete) and what it held; a key update the peer asks for is answered into
    /// `replies`.
    pub(crate) fn open<'a>(
        &mut self,
        input: &'a mut [u8],
        replies: &mut BytesMut,
    ) -> Result<(usize, Opened<'a>), RecordError> {
        let Some((header, total)) = Self::whole_record(input)? else {
            return Ok((0, Opened::Control));
        };
        let body = input
            .get_mut(HEADER..total)
            .ok_or(RecordError::BadRecordMac)?;
        let nonce = self.rx.next_nonce()?;
        let plain = self
            .rx
            .key
            .open_in_place(nonce, Aad::from(header), body)
            .map_err(|_| RecordError::BadRecordMac)?;
        let plain: &'a [u8] = plain;
        Ok((total, self.inner(plain, replies)?))
    }

    /// [`Self::open`] into `out` instead of in place, when the record is all there and `out` has
    /// room for what it may hold (its length less header and tag): the application data lands
    /// where the reader wants it, with no copy after the cipher's pass. `Ok(None)` otherwise
    /// (nothing taken). After an error `out` may hold unauthenticated bytes: it is the reader's
    /// unfilled room, which the caller does not hand on.
    pub(crate) fn open_to<'o>(
        &mut self,
        input: &[u8],
        out: &'o mut [u8],
        replies: &mut BytesMut,
    ) -> Result<Option<(usize, Opened<'o>)>, RecordError> {
        let Some((header, total)) = Self::whole_record(input)? else {
            return Ok(None);
        };
        let body = input.get(HEADER..total).ok_or(RecordError::BadRecordMac)?;
        let (ciphertext, tag) = body.split_at(body.len() - TAG);
        let Some(dst) = out.get_mut(..ciphertext.len()) else {
            return Ok(None);
        };
        let nonce = self.rx.next_nonce()?;
        self.rx
            .key
            .open_separate_gather(nonce, Aad::from(header), ciphertext, tag, dst)
            .map_err(|_| RecordError::BadRecordMac)?;
        let plain: &'o [u8] = dst;
        Ok(Some((total, self.inner(plain, replies)?)))
    }

    /// What an opened record's plaintext (content, type, padding) holds.
    fn inner<'p>(
        &mut self,
        plain: &'p [u8],
        replies: &mut BytesMut,
    ) -> Result<Opened<'p>, RecordError> {
        // RFC 8446 5.4: content, type and padding within 2^14 + 1 bytes (as rustls checks).
        if plain.len() > MAX_PLAINTEXT + 1 {
            return Err(RecordError::Overflow);
        }
        // The inner content type is the last byte that is not padding.
        let Some(end) = plain.iter().rposition(|&b| b != 0) else {
            return Err(RecordError::Unexpected("a record without a content type"));
        };
        let (content, inner_type) = plain.split_at(end);
        let inner_type = inner_type.first().copied().unwrap_or_default();
        if inner_type != HANDSHAKE && !self.handshake.is_empty() {
            return Err(RecordError::Unexpected(
                "a handshake message cut by another record",
            ));
        }
        Ok(match inner_type {
            APPLICATION_DATA => Opened::Data(content),
            ALERT => match *content {
                [_, CLOSE_NOTIFY] => Opened::Closed,
                [_, USER_CANCELED] => Opened::Control,
                [_, desc] => return Err(RecordError::PeerAlert(desc)),
                _ => return Err(RecordError::Decode("alert")),
            },
            HANDSHAKE if content.is_empty() => {
                return Err(RecordError::Unexpected("an empty handshake record"));
            }
            HANDSHAKE => {
                self.handshake_messages(content, replies)?;
                Opened::Control
            }
            _ => return Err(RecordError::Unexpected("a record of unknown inner type")),
        })
    }

    /// Handle the post-handshake messages in `content` (after what an earlier record started).
    fn handshake_messages(
        &mut self,
        content: &[u8],
        replies: &mut BytesMut,
    ) -> Result<(), RecordError> {
        let mut joined = std::mem::take(&mut self.handshake);
        let mut data = if joined.is_empty() {
            content
        } else {
            if joined.len() + content.len() > MAX_HANDSHAKE_MESSAGE + 4 {
                return Err(RecordError::Decode("handshake message too large"));
            }
            joined.extend_from_slice(content);
            &joined[..]
        };
        while let Some(&[kind, a, b, c]) = data.get(..4) {
            let len = u32::from_be_bytes([0, a, b, c]) as usize;
            if len > MAX_HANDSHAKE_MESSAGE {
                return Err(RecordError::Decode("handshake message too large"));
            }
            let Some(body) = data.get(4..4 + len) else {
                break;
            };
            data = data.get(4 + len..).unwrap_or_default();
            match kind {
                KEY_UPDATE => {
                    let request = match *body {
                        [0] => false,
                        [1] => true,
                        _ => return Err(RecordError::Decode("key_update")),
                    };
                    // RFC 8446 5.1: a key change ends its record.
                    if !data.is_empty() {
                        return Err(RecordError::Unexpected(
                            "data after key_update in its record",
                        ));
                    }
                    self.rx = Keys::new(self.kernel.update_rx_secret()?)?;
                    if request {
                        let start = replies.len();
                        replies.resize(start + 5 + OVERHEAD, 0);
                        let dst = replies.get_mut(start..).unwrap_or_default();
                        match self.update_tx_key(dst, false) {
                            Ok(n) => replies.truncate(start + n),
                            Err(e) => {
                                replies.truncate(start);
                                return Err(e);
                            }
                        }
                    }
                }
                NEW_SESSION_TICKET => (self.tickets)(&mut self.kernel, body)?,
                _ => {
                    return Err(RecordError::Unexpected(
                        "a handshake message after the handshake",
                    ));
                }
            }
        }
        if !data.is_empty() {
            self.handshake = data.to_vec();
        }
        Ok(())
    }
}

/// In-memory handshakes between rustls' unbuffered connections: for the tests and the fuzz
/// targets, which take the records over from them.
#[cfg(any(test, feature = "fuzzing"))]
pub(crate) mod in_memory {
    use std::sync::Arc;

    use rustls::client::UnbufferedClientConnection;
    use rustls::pki_types::ServerName;
    use rustls::server::UnbufferedServerConnection;
    use rustls::unbuffered::{ConnectionState, UnbufferedStatus};
    use rustls::{ClientConfig, ServerConfig};

    use super::{RecordError, Records};
    use crate::tls_stream::TlsSide;

    /// Drive one side of an unbuffered rustls connection over `incoming` until it waits for
    /// the peer: records it sends go to `out`, application data it receives to `data`. True
    /// once its handshake is complete.
    pub(crate) fn pump<C: TlsSide>(
        c: &mut C,
        incoming: &mut Vec<u8>,
        out: &mut Vec<u8>,
        data: &mut Vec<u8>,
    ) -> Result<bool, RecordError> {
        loop {
            let UnbufferedStatus { discard, state } = c.process(incoming);
            let done = match state? {
                ConnectionState::EncodeTlsData(mut e) => {
                    let mut buf = vec![0u8; 64 * 1024];
                    let n = e
                        .encode(&mut buf)
                        .map_err(|_| RecordError::Keys("a handshake flight over 64 KiB"))?;
                    out.extend_from_slice(buf.get(..n).unwrap_or_default());
                    None
                }
                ConnectionState::TransmitTlsData(t) => {
                    t.done();
                    None
                }
                ConnectionState::ReadTraffic(mut r) => {
                    while let Some(record) = r.next_record() {
                        data.extend_from_slice(record?.payload);
                    }
                    None
                }
                ConnectionState::BlockedHandshake => Some(false),
                ConnectionState::WriteTraffic(_) => Some(true),
                _ => {
                    return Err(RecordError::Unexpected(
                        "a state a handshake does not reach",
                    ));
                }
            };
            incoming.drain(..discard);
            if let Some(done) = done {
                return Ok(done);
            }
        }
    }

    /// A client and a server of `name` with complete handshakes, and the server's records to
    /// the client (its session tickets) not yet delivered.
    pub(crate) fn handshake(
        server: &Arc<ServerConfig>,
        client: &Arc<ClientConfig>,
        name: &str,
    ) -> Result<
        (
            UnbufferedClientConnection,
            UnbufferedServerConnection,
            Vec<u8>,
        ),
        RecordError,
    > {
        let name = ServerName::try_from(name.to_owned())
            .map_err(|_| RecordError::Keys("not a server name"))?;
        let mut c = UnbufferedClientConnection::new(Arc::clone(client), name)?;
        let mut s = UnbufferedServerConnection::new(Arc::clone(server))?;
        let (mut c2s, mut s2c, mut data) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..8 {
            let client_done = pump(&mut c, &mut s2c, &mut c2s, &mut data)?;
            let server_done = pump(&mut s, &mut c2s, &mut s2c, &mut data)?;
            if client_done && server_done && c2s.is_empty() {
                if !data.is_empty() {
                    return Err(RecordError::Unexpected("data during the handshake"));
                }
                return Ok((c, s, s2c));
            }
        }
        Err(RecordError::Unexpected("the handshake did not complete"))
    }

    /// Hand one side's records over to [`Records`].
    pub(crate) fn take_over<C: TlsSide>(c: C) -> Result<Records<C::Data>, RecordError> {
        let (secrets, kernel) = c.into_kernel()?;
        Records::new(secrets, kernel, C::TICKETS)
    }
}

/// The record layer for the fuzz targets in `fuzz/` (cargo feature `fuzzing`, off everywhere
/// else; not an API): a client and a server after a real handshake in memory, which seal
/// records for each other, well-formed or with whatever inner plaintext an authenticated but
/// hostile peer could send, and open them in place or into a reader's buffer.
#[cfg(feature = "fuzzing")]
pub mod fuzzing {
    use std::sync::{Arc, OnceLock};

    use bytes::BytesMut;
    use gatehouse_controlplane::ca::TlsCa;
    use gatehouse_controlplane::identity::PROXY_SERVER_NAME;
    use gatehouse_controlplane::tls::{Trust, client_config_with_alpn, server_config_with_alpn};
    use rustls::client::ClientConnectionData;
    use rustls::server::ServerConnectionData;
    use rustls::{ClientConfig, ServerConfig};

    pub use super::RecordError;
    use super::{OVERHEAD, Opened, Records, in_memory};

    /// Most plaintext in one record.
    pub const MAX_PLAINTEXT: usize = super::MAX_PLAINTEXT;

    /// One end of the pair.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum End {
        Client,
        Server,
    }

    impl End {
        pub fn peer(self) -> Self {
            match self {
                Self::Client => Self::Server,
                Self::Server => Self::Client,
            }
        }
    }

    /// What one opened record held.
    #[derive(Debug)]
    pub enum Read<'a> {
        Data(&'a [u8]),
        /// A key update, a session ticket or user_canceled.
        Control,
        /// close_notify.
        Closed,
    }

    impl<'a> From<Opened<'a>> for Read<'a> {
        fn from(o: Opened<'a>) -> Self {
            match o {
                Opened::Data(d) => Self::Data(d),
                Opened::Control => Self::Control,
                Opened::Closed => Self::Closed,
            }
        }
    }

    /// Configs made once per process (key generation is the slow part).
    fn configs() -> Result<&'static (Arc<ServerConfig>, Arc<ClientConfig>), RecordError> {
        static CONFIGS: OnceLock<Option<(Arc<ServerConfig>, Arc<ClientConfig>)>> = OnceLock::new();
        CONFIGS
            .get_or_init(|| {
                let now = time::OffsetDateTime::now_utc();
                let ca = TlsCa::generate("fuzz", now).ok()?;
                let sans = [PROXY_SERVER_NAME.to_owned()];
                let ttl = std::time::Duration::from_secs(3600);
                let (cert, key) = ca.issue_server_cert("fuzz", &sans, ttl, now).ok()?;
                let mut server = (*server_config_with_alpn(
                    ca.cert_pem(),
                    &cert.pem(),
                    &key.serialize_pem(),
                    &[b"t"],
                )
                .ok()?)
                .clone();
                server.send_tls13_tickets = 0;
                let trust = Trust::CaPem(ca.cert_pem().to_owned());
                let client = client_config_with_alpn(&trust, None, &[b"t"]).ok()?;
                Some((Arc::new(server), client))
            })
            .as_ref()
            .ok_or(RecordError::Keys("the fuzzing configs could not be made"))
    }

    /// A client's and a server's record layers after one handshake.
    pub struct Pair {
        client: Records<ClientConnectionData>,
        server: Records<ServerConnectionData>,
    }

    /// `$body` with `$r` bound to the record layer of `$end`.
    macro_rules! with_end {
        ($self:ident, $end:expr, |$r:ident| $body:expr) => {
            match $end {
                End::Client => {
                    let $r = &mut $self.client;
                    $body
                }
                End::Server => {
                    let $r = &mut $self.server;
                    $body
                }
            }
        };
    }

    impl Pair {
        pub fn new() -> Result<Self, RecordError> {
            let (server, client) = configs()?;
            let (c, s, pending) = in_memory::handshake(server, client, PROXY_SERVER_NAME)?;
            if !pending.is_empty() {
                return Err(RecordError::Unexpected("tickets without being configured"));
            }
            Ok(Self {
                client: in_memory::take_over(c)?,
                server: in_memory::take_over(s)?,
            })
        }

        /// `end` replaces its sending key after this many records (at least one).
        pub fn set_key_update_interval(&mut self, end: End, records: u64) {
            with_end!(self, end, |r| r.tx_limit = records.max(1));
        }

        /// Seal application data from `end` with [`Records::seal`]'s gathering, into
        /// destinations of `room` bytes per call, appending the records to `out`. False if a
        /// destination that small took nothing.
        pub fn seal(
            &mut self,
            end: End,
            bufs: &[&[u8]],
            room: usize,
            out: &mut Vec<u8>,
        ) -> Result<bool, RecordError> {
            let mut skip = 0;
            let total: usize = bufs.iter().map(|b| b.len()).sum();
            let mut dst = vec![0u8; room];
            while skip < total {
                let mut left = skip;
                let slices: Vec<std::io::IoSlice<'_>> = bufs
                    .iter()
                    .map(|b| {
                        let k = left.min(b.len());
                        left -= k;
                        std::io::IoSlice::new(b.get(k..).unwrap_or_default())
                    })
                    .collect();
                let (taken, written) =
                    with_end!(self, end, |r| r.seal(&slices, total - skip, &mut dst))?;
                out.extend_from_slice(dst.get(..written).unwrap_or_default());
                if taken == 0 {
                    return Ok(false);
                }
                skip += taken;
            }
            Ok(true)
        }

        /// One record from `end` whose inner plaintext is `content`, then `inner_type`, then
        /// `padding` zeros, verbatim: whatever its type, size and content.
        pub fn seal_raw(
            &mut self,
            end: End,
            content: &[u8],
            inner_type: u8,
            padding: usize,
            out: &mut Vec<u8>,
        ) -> Result<(), RecordError> {
            let record = with_end!(self, end, |r| r.seal_padded(inner_type, content, padding))?;
            out.extend_from_slice(&record);
            Ok(())
        }

        /// A key update from `end`, asking for one back or not.
        pub fn key_update(
            &mut self,
            end: End,
            request: bool,
            out: &mut Vec<u8>,
        ) -> Result<(), RecordError> {
            let mut dst = [0u8; 5 + OVERHEAD];
            let n = with_end!(self, end, |r| r.update_tx_key(&mut dst, request))?;
            out.extend_from_slice(dst.get(..n).unwrap_or_default());
            Ok(())
        }

        /// close_notify from `end`.
        pub fn close(&mut self, end: End, out: &mut BytesMut) {
            with_end!(self, end, |r| r.push_alert(out, None));
        }

        /// `end` opens the record at the front of `input` in place (0 bytes while incomplete);
        /// what it answers (a key update) goes to `replies`.
        pub fn open<'a>(
            &mut self,
            end: End,
            input: &'a mut [u8],
            replies: &mut BytesMut,
        ) -> Result<(usize, Read<'a>), RecordError> {
            let (n, opened) = with_end!(self, end, |r| r.open(input, replies))?;
            Ok((n, opened.into()))
        }

        /// `end` opens the record at the front of `input` into `out`, if it is all there and
        /// `out` has room.
        pub fn open_to<'o>(
            &mut self,
            end: End,
            input: &[u8],
            out: &'o mut [u8],
            replies: &mut BytesMut,
        ) -> Result<Option<(usize, Read<'o>)>, RecordError> {
            let r = with_end!(self, end, |r| r.open_to(input, out, replies))?;
            Ok(r.map(|(n, opened)| (n, opened.into())))
        }
    }
}

#[cfg(test)]
mod tests {
    // Test code: a failing unwrap is a failing test.
    #![allow(
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::panic,
        clippy::indexing_slicing
    )]

    use std::io::IoSlice;
    use std::sync::Arc;

    use gatehouse_controlplane::tls::{Trust, client_config_with_alpn, server_config_with_alpn};
    use proptest::prelude::*;
    use rustls::client::{ClientConnectionData, UnbufferedClientConnection};
    use rustls::server::{ServerConnectionData, UnbufferedServerConnection};
    use rustls::unbuffered::{ConnectionState, UnbufferedStatus};
    use rustls::{ClientConfig, HandshakeKind, ServerConfig};

    use super::*;
    use crate::tls_stream::TlsSide;
    use crate::tls_stream::tests::Ca;

    const NAME: &str = gatehouse_controlplane::identity::PROXY_SERVER_NAME;

    fn configs(tickets: usize) -> (Arc<ServerConfig>, Arc<ClientConfig>) {
        let ca = Ca::new("records CA");
        let (cert, key) = ca.leaf(NAME);
        let mut server = (*server_config_with_alpn(&ca.pem, &cert, &key, &[b"t"]).unwrap()).clone();
        server.send_tls13_tickets = tickets;
        let client = client_config_with_alpn(&Trust::CaPem(ca.pem.clone()), None, &[b"t"]).unwrap();
        (Arc::new(server), client)
    }

    fn pump<C: TlsSide>(
        c: &mut C,
        incoming: &mut Vec<u8>,
        out: &mut Vec<u8>,
        data: &mut Vec<u8>,
    ) -> bool {
        in_memory::pump(c, incoming, out, data).unwrap()
    }

    fn handshake(
        server: &Arc<ServerConfig>,
        client: &Arc<ClientConfig>,
    ) -> (
        UnbufferedClientConnection,
        UnbufferedServerConnection,
        Vec<u8>,
    ) {
        in_memory::handshake(server, client, NAME).unwrap()
    }

    fn take_over<C: TlsSide>(c: C) -> Records<C::Data> {
        in_memory::take_over(c).unwrap()
    }

    fn pair() -> (Records<ClientConnectionData>, Records<ServerConnectionData>) {
        let (server, client) = configs(0);
        let (c, s, pending) = handshake(&server, &client);
        assert!(pending.is_empty());
        (take_over(c), take_over(s))
    }

    /// Seal everything in `bufs`, in rounds of `dst_len`-byte destinations.
    fn seal_all<D>(r: &mut Records<D>, bufs: &[&[u8]], dst_len: usize) -> Vec<u8> {
        let mut owned: Vec<Vec<u8>> = bufs.iter().map(|b| b.to_vec()).collect();
        let mut wire = Vec::new();
        loop {
            let slices: Vec<IoSlice<'_>> = owned.iter().map(|b| IoSlice::new(b)).collect();
            let mut dst = vec![0u8; dst_len];
            let (taken, written) = r.seal(&slices, 64 * 1024, &mut dst).unwrap();
            wire.extend_from_slice(&dst[..written]);
            if owned.iter().all(Vec::is_empty) {
                return wire;
            }
            assert!(taken > 0, "no progress with {dst_len} bytes of room");
            let mut left = taken;
            for b in &mut owned {
                let k = left.min(b.len());
                b.drain(..k);
                left -= k;
            }
        }
    }

    /// Open every record in `wire`: the application data, and whether close_notify came.
    fn open_all<D>(r: &mut Records<D>, wire: &mut [u8], replies: &mut BytesMut) -> (Vec<u8>, bool) {
        let (mut data, mut at) = (Vec::new(), 0);
        while at < wire.len() {
            let (n, opened) = r.open(&mut wire[at..], replies).unwrap();
            assert!(n > 0, "an incomplete record at {at} of {}", wire.len());
            at += n;
            match opened {
                Opened::Data(d) => data.extend_from_slice(d),
                Opened::Control => {}
                Opened::Closed => return (data, true),
            }
        }
        (data, false)
    }

    fn record_lengths(wire: &[u8]) -> Vec<usize> {
        let (mut lens, mut at) = (Vec::new(), 0);
        while at < wire.len() {
            let len = usize::from(u16::from_be_bytes([wire[at + 3], wire[at + 4]]));
            assert_eq!(wire[at], APPLICATION_DATA);
            lens.push(len);
            at += HEADER + len;
        }
        lens
    }

    fn pattern(n: usize, seed: usize) -> Vec<u8> {
        (0..n).map(|i| (i * 31 + seed + i / 253) as u8).collect()
    }

    /// Writes of every size become records of at most 16 KiB each, which open
    /// as the same bytes on the other side, in both directions; close_notify ends it.
    #[test]
    fn writes_of_every_size_open_the_same_both_ways() {
        let (mut client, mut server) = pair();
        let bufs: Vec<Vec<u8>> = [9usize, 1, 70_000, 0, 3, 16 * 1024, 5, 40_000]
            .iter()
            .enumerate()
            .map(|(i, &n)| pattern(n, i))
            .collect();
        let refs: Vec<&[u8]> = bufs.iter().map(Vec::as_slice).collect();
        let all: Vec<u8> = bufs.concat();
        for dst_len in [64 * 1024 + 1024, 100, OVERHEAD + 1] {
            let mut wire = seal_all(&mut client, &refs, dst_len);
            let lens = record_lengths(&wire);
            assert!(lens.iter().all(|&l| l <= MAX_PLAINTEXT + 1 + TAG));
            let mut replies = BytesMut::new();
            let (got, closed) = open_all(&mut server, &mut wire, &mut replies);
            assert!(got == all && !closed && replies.is_empty());
            let mut back = seal_all(&mut server, &refs, dst_len);
            let (got, _) = open_all(&mut client, &mut back, &mut replies);
            assert!(got == all);
        }
        let mut close = BytesMut::new();
        client.push_alert(&mut close, None);
        let (got, closed) = open_all(&mut server, &mut close, &mut BytesMut::new());
        assert!(got.is_empty() && closed);
    }

    /// Small writes share records; a large write starts a record of its own, so the small end of
    /// the write before it is a short record (sealed from where it is, like the large one's).
    #[test]
    fn small_writes_share_records_and_large_ones_start_their_own() {
        let (mut client, mut server) = pair();
        let small: Vec<Vec<u8>> = (0..100).map(|i| pattern(100, i)).collect();
        let refs: Vec<&[u8]> = small.iter().map(Vec::as_slice).collect();
        let mut wire = seal_all(&mut client, &refs, 64 * 1024 + 1024);
        assert_eq!(record_lengths(&wire), [10_000 + 1 + TAG]);
        let (got, _) = open_all(&mut server, &mut wire, &mut BytesMut::new());
        assert!(got == small.concat());

        let (tail, large) = (pattern(10, 1), pattern(40_000, 2));
        let mut wire = seal_all(&mut client, &[&tail, &large], 64 * 1024 + 1024);
        let plaintext: Vec<usize> = record_lengths(&wire).iter().map(|l| l - 1 - TAG).collect();
        assert_eq!(plaintext, [10, 16_384, 16_384, 7_232]);
        let (got, _) = open_all(&mut server, &mut wire, &mut BytesMut::new());
        assert!(got == [tail, large].concat());
    }

    /// Keys are replaced before they seal their share, and a key update that asks for one back
    /// is answered; data keeps flowing across every change.
    #[test]
    fn key_updates_on_schedule_and_on_request() {
        let (mut client, mut server) = pair();
        client.set_key_update_interval(3);
        let data = pattern(200_000, 7);
        let mut wire = seal_all(&mut client, &[&data], 64 * 1024 + 1024);
        // 13 data records, a key update after every 3 records of a key.
        assert_eq!(record_lengths(&wire).len(), 13 + 4);
        let mut replies = BytesMut::new();
        let (got, _) = open_all(&mut server, &mut wire, &mut replies);
        assert!(got == data && replies.is_empty());

        // The server asks the client to update too.
        let mut ask = vec![0u8; 64];
        let n = server.update_tx_key(&mut ask, true).unwrap();
        let (got, _) = open_all(&mut client, &mut ask[..n], &mut replies);
        assert!(got.is_empty());
        assert!(!replies.is_empty(), "the request was not answered");
        let mut answer = replies.split().to_vec();
        let after = seal_all(&mut client, &[b"after the update"], 1024);
        answer.extend_from_slice(&after);
        let (got, _) = open_all(&mut server, &mut answer, &mut replies);
        assert_eq!(got, b"after the update");
        let mut back = seal_all(&mut server, &[b"and back"], 1024);
        assert_eq!(
            open_all(&mut client, &mut back, &mut replies).0,
            b"and back"
        );
    }

    /// Records opened into the reader's buffer (`open_to`) read as records opened in place do,
    /// key updates included; a buffer without room for the record, or a record not all there,
    /// takes nothing (the next open still has its key and sequence number); a broken record is
    /// the same error.
    #[test]
    fn records_open_into_the_readers_buffer_alike() {
        let (mut client, mut server) = pair();
        client.set_key_update_interval(3);
        let data = pattern(200_000, 9);
        let wire = seal_all(&mut client, &[&data], 64 * 1024 + 1024);
        let mut replies = BytesMut::new();
        let mut out = vec![0u8; MAX_PLAINTEXT + 1];
        let (mut at, mut got, mut records) = (0, Vec::new(), 0);
        while at < wire.len() {
            let len = usize::from(u16::from_be_bytes([wire[at + 3], wire[at + 4]]));
            let mut short = vec![0u8; len - TAG - 1];
            let r = server.open_to(&wire[at..], &mut short, &mut replies);
            assert!(matches!(r, Ok(None)), "one byte short: {r:?}");
            let r = server.open_to(&wire[at..at + HEADER + len - 1], &mut out, &mut replies);
            assert!(matches!(r, Ok(None)), "incomplete: {r:?}");
            let (n, opened) = server
                .open_to(&wire[at..], &mut out, &mut replies)
                .unwrap()
                .unwrap();
            assert_eq!(n, HEADER + len);
            match opened {
                Opened::Data(d) => got.extend_from_slice(d),
                Opened::Control => {}
                Opened::Closed => panic!("close_notify"),
            }
            at += n;
            records += 1;
        }
        assert_eq!(records, 13 + 4, "data records and key updates");
        assert!(got == data && replies.is_empty());
        let mut bad = seal_all(&mut client, &[b"hello"], 1024);
        bad[7] ^= 1;
        let err = server.open_to(&bad, &mut out, &mut replies).unwrap_err();
        assert_eq!(err.alert(), Some(20), "{err}");
    }

    /// Our records against rustls' own record layer: data both ways across a key update from
    /// each side.
    #[test]
    fn interoperates_with_rustls_records_and_key_updates() {
        let (server_config, client_config) = configs(0);
        let (mut c, s, _) = handshake(&server_config, &client_config);
        let mut server = take_over(s);
        server.set_key_update_interval(2);
        let (mut none, mut c2s, mut data) = (Vec::new(), Vec::new(), Vec::new());
        let mut replies = BytesMut::new();
        for round in 0..3 {
            // rustls encrypts; then asks for new keys (from the second round on).
            let msg = pattern(40_000 + round, round);
            let UnbufferedStatus { state, .. } = c.process_tls_records(&mut none);
            let ConnectionState::WriteTraffic(mut w) = state.unwrap() else {
                panic!("client not ready to write");
            };
            let mut buf = vec![0u8; 64 * 1024];
            let n = w.encrypt(&msg, &mut buf).unwrap();
            c2s.extend_from_slice(&buf[..n]);
            if round > 0 {
                w.refresh_traffic_keys().unwrap();
                pump(&mut c, &mut none, &mut c2s, &mut data);
            }
            let (got, _) = open_all(&mut server, &mut c2s, &mut replies);
            assert!(got == msg, "round {round}: client to server");
            c2s.clear();
            // We encrypt (with our own key updates every 2 records); rustls decrypts.
            // (An answer to a key update rustls asked for was sealed first: it goes first.)
            let mut back = replies.split().to_vec();
            // rustls asks for ours in return when it updates its keys.
            assert_eq!(
                back.is_empty(),
                round == 0,
                "round {round}: {} bytes",
                back.len()
            );
            back.extend_from_slice(&seal_all(&mut server, &[&msg], 64 * 1024 + 1024));
            pump(&mut c, &mut back, &mut c2s, &mut data);
            assert!(back.is_empty());
            assert!(data == msg, "round {round}: server to client");
            data.clear();
        }
    }

    /// A server's session tickets that arrive after the client handed its records over still
    /// reach rustls: the next connection resumes. A client's "ticket" is refused.
    #[test]
    fn tickets_after_the_handover_resume_the_next_session() {
        let (server_config, client_config) = configs(2);
        let (c, s, mut tickets) = handshake(&server_config, &client_config);
        assert!(!tickets.is_empty(), "the server sent no ticket");
        let mut client = take_over(c);
        let mut server = take_over(s);
        let (got, _) = open_all(&mut client, &mut tickets, &mut BytesMut::new());
        assert!(got.is_empty());
        let (c2, _, _) = handshake(&server_config, &client_config);
        assert_eq!(c2.handshake_kind(), Some(HandshakeKind::Resumed));

        // The same message from a client is not allowed.
        let mut wire = vec![0u8; 128];
        let n = client
            .seal_message(&mut wire, HANDSHAKE, &[NEW_SESSION_TICKET, 0, 0, 1, 0])
            .unwrap();
        let r = server.open(&mut wire[..n], &mut BytesMut::new());
        assert!(matches!(r, Err(RecordError::Rustls(_))), "{r:?}");
    }

    /// Broken or misplaced records are errors that name the alert to send, never panics.
    #[test]
    fn bad_records_are_errors_with_the_right_alert() {
        fn sealed(r: &mut Records<ClientConnectionData>, content_type: u8, body: &[u8]) -> Vec<u8> {
            r.seal_padded(content_type, body, 0).unwrap()
        }
        type Make = fn(&mut Records<ClientConnectionData>) -> Vec<u8>;
        let cases: [(&str, Make, Option<u8>); 9] = [
            (
                "flipped bit",
                |r| {
                    let mut w = sealed(r, APPLICATION_DATA, b"hello");
                    w[7] ^= 1;
                    w
                },
                Some(20),
            ),
            (
                "too long",
                |_| vec![APPLICATION_DATA, 3, 3, 0x48, 0x01],
                Some(22),
            ),
            (
                "shorter than a tag",
                |_| vec![APPLICATION_DATA, 3, 3, 0, 3, 1, 2, 3],
                Some(20),
            ),
            (
                "plaintext alert",
                |_| vec![ALERT, 3, 3, 0, 2, 2, 40],
                Some(10),
            ),
            ("no content type", |r| sealed(r, 0, &[0, 0, 0]), Some(10)),
            (
                // 16 KiB of data, its type and one byte of padding: one byte too many.
                "padded past the limit",
                |r| {
                    let mut inner = vec![1u8; MAX_PLAINTEXT];
                    inner.push(APPLICATION_DATA);
                    sealed(r, 0, &inner)
                },
                Some(22),
            ),
            ("peer's fatal alert", |r| sealed(r, ALERT, &[2, 40]), None),
            (
                "bad key update",
                |r| sealed(r, HANDSHAKE, &[KEY_UPDATE, 0, 0, 1, 7]),
                Some(50),
            ),
            (
                "data after key update",
                |r| {
                    sealed(
                        r,
                        HANDSHAKE,
                        &[KEY_UPDATE, 0, 0, 1, 0, KEY_UPDATE, 0, 0, 1, 0],
                    )
                },
                Some(10),
            ),
        ];
        for (what, make, alert) in cases {
            let (mut client, mut server) = pair();
            let mut wire = make(&mut client);
            let mut replies = BytesMut::new();
            let err = server.open(&mut wire, &mut replies).expect_err(what);
            assert_eq!(err.alert(), alert, "{what}: {err}");
            // The alert goes out sealed, and the client reads it as the error it is.
            if let Some(a) = alert {
                server.push_alert(&mut replies, Some(a));
                let r = client.open(&mut replies, &mut BytesMut::new());
                assert!(
                    matches!(r, Err(RecordError::PeerAlert(x)) if x == a),
                    "{what}: {r:?}"
                );
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

        /// Arbitrary bytes are an error or a wait for more, never a panic.
        #[test]
        fn arbitrary_bytes_never_panic(mut bytes in proptest::collection::vec(any::<u8>(), 0..40_000)) {
            let (_, mut server) = pair();
            let mut replies = BytesMut::new();
            let mut at = 0;
            while at < bytes.len() {
                match server.open(&mut bytes[at..], &mut replies) {
                    Ok((0, _)) | Err(_) => break,
                    Ok((n, _)) => at += n,
                }
            }
        }

        /// Records arriving in any pieces open to the same bytes (the driver keeps the
        /// incomplete tail and tries again).
        #[test]
        fn records_in_any_pieces_open_the_same(cuts in proptest::collection::vec(1usize..20_000, 1..12)) {
            let (mut client, mut server) = pair();
            let data = pattern(60_000, 3);
            let wire = seal_all(&mut client, &[&data], 64 * 1024 + 1024);
            let (mut input, mut got, mut fed) = (Vec::new(), Vec::new(), 0);
            let mut replies = BytesMut::new();
            for cut in cuts.iter().copied().chain(std::iter::once(wire.len())) {
                let end = (fed + cut).min(wire.len());
                input.extend_from_slice(&wire[fed..end]);
                fed = end;
                loop {
                    let (n, opened) = server.open(&mut input, &mut replies).unwrap();
                    if n == 0 {
                        break;
                    }
                    if let Opened::Data(d) = opened {
                        got.extend_from_slice(d);
                    }
                    input.drain(..n);
                }
            }
            prop_assert!(got == data);
        }
    }

    /// What goes into the records of the sequence test below.
    #[derive(Debug, Clone)]
    enum Item {
        /// The client's application data, sealed through `seal` (records of up to 16 KiB).
        Data(usize),
        /// One record of the client's application data with padding after its content type.
        Padded { len: usize, pad: usize },
        /// A warning the record layer takes in its stride.
        UserCanceled,
        /// A key update from the client, cut into this many handshake records; its end ends
        /// the last of them.
        KeyUpdate { request: bool, pieces: usize },
        /// The server sends application data back.
        Back(usize),
    }

    fn item() -> impl Strategy<Value = Item> {
        prop_oneof![
            4 => (0usize..40_000).prop_map(Item::Data),
            2 => (0usize..MAX_PLAINTEXT - 256, 0usize..256)
                .prop_map(|(len, pad)| Item::Padded { len, pad }),
            1 => Just(Item::UserCanceled),
            2 => (any::<bool>(), 1usize..6)
                .prop_map(|(request, pieces)| Item::KeyUpdate { request, pieces }),
            2 => (1usize..40_000).prop_map(Item::Back),
        ]
    }

    fn seal_padded(
        r: &mut Records<ClientConnectionData>,
        content_type: u8,
        content: &[u8],
        pad: usize,
    ) -> Vec<u8> {
        r.seal_padded(content_type, content, pad).unwrap()
    }

    /// The server opens what of `input` is complete, in place or into a reader's buffer by
    /// turns (sometimes one too small, which takes nothing); its key update answers go to `s2c`.
    fn server_reads(
        server: &mut Records<ServerConnectionData>,
        input: &mut Vec<u8>,
        into_buffer: &mut bool,
        got: &mut Vec<u8>,
        s2c: &mut BytesMut,
    ) -> Result<bool, RecordError> {
        fn owned((n, opened): (usize, Opened<'_>)) -> (usize, Vec<u8>, bool) {
            match opened {
                Opened::Data(d) => (n, d.to_vec(), false),
                Opened::Control => (n, Vec::new(), false),
                Opened::Closed => (n, Vec::new(), true),
            }
        }
        let mut out = vec![0u8; MAX_PLAINTEXT + 256];
        loop {
            *into_buffer = !*into_buffer;
            let opened = if *into_buffer {
                let room = if got.len().is_multiple_of(3) {
                    10
                } else {
                    out.len()
                };
                match server.open_to(input, &mut out[..room], s2c)? {
                    Some(r) => owned(r),
                    None => owned(server.open(input, s2c)?),
                }
            } else {
                owned(server.open(input, s2c)?)
            };
            let (n, data, closed) = opened;
            if n == 0 {
                return Ok(false);
            }
            got.extend_from_slice(&data);
            input.drain(..n);
            if closed {
                return Ok(true);
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

        /// Any sequence of data, padded records, warnings, key updates cut across records (asked
        /// for or not) and data the other way, with keys also replaced on schedule by both
        /// sides, delivered in any pieces: the server reads every byte in order and then the
        /// close_notify, the client reads every byte sent back, and nothing fails. The same
        /// bytes with one bit flipped anywhere never read as a whole session.
        #[test]
        fn any_sequence_of_records_in_any_pieces_reads_whole(
            items in proptest::collection::vec(item(), 1..24),
            cuts in proptest::collection::vec(1usize..30_000, 1..16),
            intervals in (1u64..12, 1u64..12),
            flip in proptest::option::of((any::<prop::sample::Index>(), 1u8..=255)),
        ) {
            let (mut client, mut server) = pair();
            client.set_key_update_interval(intervals.0);
            server.set_key_update_interval(intervals.1);
            let (mut c2s, mut expect, mut back_expect) = (Vec::new(), Vec::new(), Vec::new());
            let mut s2c = BytesMut::new();
            let (mut input, mut got, mut back_got) = (Vec::new(), Vec::new(), Vec::new());
            let mut into_buffer = false;
            let mut cut = cuts.iter().cycle();
            let mut replies = BytesMut::new();
            let mut failed = None;
            let mut closed = false;
            for (i, it) in items.iter().chain([Item::Back(0)].iter()).enumerate() {
                match it {
                    Item::Data(len) => {
                        let data = pattern(*len, i);
                        c2s.extend(seal_all(&mut client, &[&data], 64 * 1024 + 1024));
                        expect.extend(data);
                    }
                    Item::Padded { len, pad } => {
                        let data = pattern(*len, i);
                        c2s.extend(seal_padded(&mut client, APPLICATION_DATA, &data, *pad));
                        expect.extend(data);
                    }
                    Item::UserCanceled => {
                        c2s.extend(seal_padded(&mut client, ALERT, &[ALERT_WARNING, USER_CANCELED], 0));
                    }
                    Item::KeyUpdate { request, pieces } => {
                        let msg = [KEY_UPDATE, 0, 0, 1, u8::from(*request)];
                        for chunk in msg.chunks(msg.len().div_ceil(*pieces)) {
                            c2s.extend(seal_padded(&mut client, HANDSHAKE, chunk, 0));
                        }
                        client.tx = Keys::new(client.kernel.update_tx_secret().unwrap()).unwrap();
                    }
                    Item::Back(len) => {
                        if failed.is_some() {
                            break;
                        }
                        // Everything so far reaches the server, in pieces, before it answers.
                        if i == items.len() {
                            // The end: the client's close_notify goes last.
                            client.push_alert(&mut replies, None);
                            c2s.extend_from_slice(&replies.split());
                            if let Some((at, mask)) = flip {
                                let at = at.index(c2s.len());
                                c2s[at] ^= mask;
                            }
                        } else if flip.is_some() {
                            // Corrupted runs deliver everything at once, at the end.
                            continue;
                        }
                        while !c2s.is_empty() && failed.is_none() {
                            let n = (*cut.next().unwrap()).min(c2s.len());
                            input.extend(c2s.drain(..n));
                            match server_reads(&mut server, &mut input, &mut into_buffer, &mut got, &mut s2c) {
                                Ok(c) => closed |= c,
                                Err(e) => failed = Some(e),
                            }
                        }
                        let data = pattern(*len, i + 1000);
                        let sealed = seal_all(&mut server, &[&data], 64 * 1024 + 1024);
                        s2c.extend_from_slice(&sealed);
                        back_expect.extend(data);
                        let mut wire = s2c.split().to_vec();
                        let (data, _) = open_all(&mut client, &mut wire, &mut replies);
                        back_got.extend(data);
                        prop_assert!(replies.is_empty(), "the client was asked for a key update");
                    }
                }
            }
            if flip.is_some() {
                prop_assert!(
                    failed.is_some() || !closed || got != expect,
                    "a flipped bit went unnoticed"
                );
            } else {
                prop_assert!(failed.is_none(), "{:?}", failed);
                prop_assert!(closed && input.is_empty(), "close_notify not read");
                prop_assert!(got == expect, "the server read {} of {} bytes", got.len(), expect.len());
                prop_assert!(back_got == back_expect);
            }
        }
    }
}
