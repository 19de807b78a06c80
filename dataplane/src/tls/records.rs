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

    /// Replace the sending key after this many records (tests and fuzzing reach the schedule).
    #[cfg(any(test, feature = "fuzzing"))]
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
    pub(crate) fn update_tx_key(
        &mut self,
        dst: &mut [u8],
        request: bool,
    ) -> Result<usize, RecordError> {
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

#[cfg(test)]
mod tests;
