//! The receive path: ciphertext in, plaintext out. Complete records are processed where they
//! were read (the thread's buffer, or an io_uring provided buffer); a record split across reads
//! is kept, and plaintext the reader had no room for waits. Every buffer a connection keeps is
//! released when it empties.

use std::io;

use bytes::BytesMut;
use rustls::unbuffered::{ConnectionState, EncodeError, UnbufferedStatus};
use tokio::io::ReadBuf;

use super::records::{HEADER, MAX_PLAINTEXT, OVERHEAD, Opened, Records, TAG};
use super::side::{Engine, TlsSide, tls_error};

/// Largest TLS record on the wire (16 KiB of payload plus header and AEAD overhead).
pub(super) const MAX_RECORD: usize = 16 * 1024 + 256 + 5;
/// How much one socket read takes into the thread's buffer.
pub(super) const READ_CHUNK: usize = 64 * 1024;

/// A connection's own bytes (each empty, without allocation, most of the time).
#[derive(Debug, Default)]
pub(super) struct Buffers {
    /// Ciphertext of a record split across reads.
    pub(super) incoming: Vec<u8>,
    /// Decrypted, not yet delivered.
    pub(super) plaintext: BytesMut,
    /// TLS records not yet taken by the socket.
    pub(super) outgoing: BytesMut,
    /// How much of the front of `outgoing` is records from after the handshake (a server's
    /// session tickets) that wait for the first write, to go out in the same send.
    pub(super) held: usize,
}

/// What one pass over the incoming bytes achieved.
pub(super) enum Step {
    /// Every complete record was processed; more ciphertext is needed.
    NeedInput,
    /// Application data was delivered (to the caller or to `plaintext`).
    Delivered,
    /// The peer closed the TLS session.
    PeerClosed,
}

impl Buffers {
    /// Keep `rest` (an incomplete record) for the next read.
    pub(super) fn keep_incoming(&mut self, rest: &[u8]) {
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
pub(super) fn process<C: TlsSide>(
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
pub(super) const FULL_RECORD: usize = MAX_PLAINTEXT + OVERHEAD;

/// How much to read for a reader with room for `room` bytes of plaintext, with `partial` (the
/// start of a record) in hand. About as much as the reader can take, so little plaintext waits in
/// the connection (and is copied twice), never less than one whole record; and when that allows
/// whole records, just enough to end at a record's end if the peer's records are full ones: a
/// bulk stream's reads then carry no partial record over from one read to the next (copied out of
/// the thread's buffer and back in), and fill the reader (a 64 KiB reader got 48 KiB, three
/// records and the start of a fourth, from a 64 KiB read).
pub(super) fn read_size(partial: &[u8], room: usize) -> usize {
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
pub(super) fn deliver(buf: &mut Buffers, out: Option<&mut ReadBuf<'_>>, payload: &[u8]) {
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
pub(super) fn queue_alert<C: TlsSide>(tls: &mut C, buf: &mut Buffers, input: &mut [u8]) {
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
