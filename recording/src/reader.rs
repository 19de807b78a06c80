//! The reader: bytes in, in any pieces; chunks and their events out, every check done.

use sha2::{Digest, Sha256};

use crate::chunk::{ChunkHeader, ChunkKind, HEADER_LEN};
use crate::event::{self, Event, SessionMeta, Timed};
use crate::verify::Trailer;
use crate::{Error, MAX_PAYLOAD};

/// One chunk, checked and decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Chunk {
    Data {
        seq: u64,
        time_ms: u64,
        events: Vec<Timed>,
    },
    Trailer(Trailer),
}

pub struct Reader {
    buf: Vec<u8>,
    /// Offset in the recording of `buf[0]`: the end of the last whole chunk read.
    offset: u64,
    next_seq: u64,
    digest: Sha256,
    data_bytes: u64,
    meta: Option<SessionMeta>,
    last_at_ms: u64,
    trailer: Option<Trailer>,
    failed: Option<Error>,
    decompressor: Option<zstd::bulk::Decompressor<'static>>,
}

impl std::fmt::Debug for Reader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reader")
            .field("offset", &self.offset)
            .field("next_seq", &self.next_seq)
            .finish_non_exhaustive()
    }
}

impl Default for Reader {
    fn default() -> Self {
        Self::new()
    }
}

impl Reader {
    pub fn new() -> Self {
        Self {
            buf: Vec::new(),
            offset: 0,
            next_seq: 0,
            digest: Sha256::new(),
            data_bytes: 0,
            meta: None,
            last_at_ms: 0,
            trailer: None,
            failed: None,
            decompressor: None,
        }
    }

    /// More of the recording's bytes.
    pub fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// Bytes pushed but not yet read as a chunk.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// The end of the last whole, valid chunk: where a torn write starts.
    pub fn consumed(&self) -> u64 {
        self.offset
    }

    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    pub fn data_bytes(&self) -> u64 {
        self.data_bytes
    }

    pub fn meta(&self) -> Option<&SessionMeta> {
        self.meta.as_ref()
    }

    pub fn trailer(&self) -> Option<&Trailer> {
        self.trailer.as_ref()
    }

    pub fn trailer_seen(&self) -> bool {
        self.trailer.is_some()
    }

    pub fn last_at_ms(&self) -> u64 {
        self.last_at_ms
    }

    /// The SHA-256 state over the data chunks read so far.
    pub fn digest_state(&self) -> Sha256 {
        self.digest.clone()
    }

    fn corrupt(&mut self, what: impl Into<String>) -> Error {
        let e = Error::Corrupt {
            seq: self.next_seq,
            offset: self.offset,
            what: what.into(),
        };
        self.failed = Some(e.clone());
        e
    }

    /// The next whole chunk, or `None` until more bytes are pushed. After an error the reader
    /// stays failed.
    pub fn next_chunk(&mut self) -> Result<Option<Chunk>, Error> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        if self.buf.len() < HEADER_LEN {
            return Ok(None);
        }
        if self.trailer.is_some() {
            return Err(self.corrupt("bytes after the trailer"));
        }
        let h = match ChunkHeader::parse(&self.buf) {
            Ok(h) => h,
            Err(e) => return Err(self.corrupt(e)),
        };
        let total = HEADER_LEN + h.payload_len as usize;
        if self.buf.len() < total {
            return Ok(None);
        }
        let Some(payload) = self.buf.get(HEADER_LEN..total) else {
            return Ok(None);
        };
        if !h.check(payload) {
            return Err(self.corrupt("checksum mismatch"));
        }
        if h.seq != self.next_seq {
            let what = format!("sequence number {} where {} was due", h.seq, self.next_seq);
            return Err(self.corrupt(what));
        }
        let chunk = match h.kind {
            ChunkKind::Data => match self.decode_data(&h, total) {
                Ok(c) => c,
                Err(what) => return Err(self.corrupt(what)),
            },
            ChunkKind::Trailer => match self.decode_trailer(&h, total) {
                Ok(c) => c,
                Err(what) => return Err(self.corrupt(what)),
            },
        };
        self.buf.drain(..total);
        self.offset += total as u64;
        if matches!(chunk, Chunk::Data { .. }) {
            self.next_seq += 1;
        }
        Ok(Some(chunk))
    }

    fn decode_data(&mut self, h: &ChunkHeader, total: usize) -> Result<Chunk, String> {
        let payload = self.buf.get(HEADER_LEN..total).ok_or("short chunk")?;
        let raw = if h.compressed {
            let d = match &mut self.decompressor {
                Some(d) => d,
                None => self
                    .decompressor
                    .insert(zstd::bulk::Decompressor::new().map_err(|e| format!("zstd: {e}"))?),
            };
            let raw = d
                .decompress(payload, MAX_PAYLOAD)
                .map_err(|e| format!("cannot decompress: {e}"))?;
            if raw.len() != h.raw_len as usize {
                return Err(format!(
                    "decompressed to {} bytes where the header says {}",
                    raw.len(),
                    h.raw_len
                ));
            }
            std::borrow::Cow::Owned(raw)
        } else {
            std::borrow::Cow::Borrowed(payload)
        };
        let events = event::decode_all(&raw, h.time_ms)?;
        if events.is_empty() {
            return Err("a data chunk without events".into());
        }
        if h.time_ms < self.last_at_ms {
            return Err(format!(
                "time goes back ({} ms after {} ms)",
                h.time_ms, self.last_at_ms
            ));
        }
        match (h.seq, events.first().map(|t| &t.event)) {
            (0, Some(Event::Start(m))) => self.meta = Some(m.clone()),
            (0, _) => return Err("the first chunk does not start with the session".into()),
            (_, Some(Event::Start(_))) => return Err("a second session start".into()),
            _ => {}
        }
        if let Some(last) = events.last() {
            self.last_at_ms = last.at_ms;
        }
        let whole = self.buf.get(..total).ok_or("short chunk")?;
        self.digest.update(whole);
        self.data_bytes += total as u64;
        Ok(Chunk::Data {
            seq: h.seq,
            time_ms: h.time_ms,
            events,
        })
    }

    fn decode_trailer(&mut self, h: &ChunkHeader, total: usize) -> Result<Chunk, String> {
        if h.compressed {
            return Err("a compressed trailer".into());
        }
        let payload = self.buf.get(HEADER_LEN..total).ok_or("short chunk")?;
        let t: Trailer =
            serde_json::from_slice(payload).map_err(|e| format!("trailer is not valid: {e}"))?;
        if self.meta.is_none() {
            return Err("a trailer before any session data".into());
        }
        if t.chunks != self.next_seq || t.data_bytes != self.data_bytes {
            return Err(format!(
                "the trailer counts {} chunks and {} bytes where the recording has {} and {}",
                t.chunks, t.data_bytes, self.next_seq, self.data_bytes
            ));
        }
        let sha = hex::encode(self.digest.clone().finalize());
        if t.sha256 != sha {
            return Err(format!(
                "SHA-256 of the chunks is {sha}, the trailer says {}",
                t.sha256
            ));
        }
        self.trailer = Some(t.clone());
        Ok(Chunk::Trailer(t))
    }

    /// At the end of the bytes: is the recording whole? (Truncated inside a chunk, or no
    /// trailer yet.)
    pub fn finish(&self) -> Result<(), Error> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        if !self.buf.is_empty() {
            return Err(Error::Truncated {
                seq: self.next_seq,
                offset: self.offset,
            });
        }
        if self.trailer.is_none() {
            return Err(Error::NoTrailer {
                last_seq: self.next_seq.checked_sub(1),
            });
        }
        Ok(())
    }
}

/// What a pass over a recording's bytes found.
#[derive(Debug)]
pub struct Scan {
    pub reader: Reader,
    /// The first problem, if any (the reader stopped there).
    pub error: Option<Error>,
}

/// Read every chunk of `bytes` (checks only; events are decoded and dropped).
pub fn scan(bytes: &[u8]) -> Scan {
    match scan_from(bytes) {
        Ok(s) => s,
        // Reading a slice cannot fail.
        Err(_) => Scan {
            reader: Reader::new(),
            error: Some(Error::NoTrailer { last_seq: None }),
        },
    }
}

/// [`scan`] of whatever `source` yields, a chunk's worth at a time: memory stays at one chunk
/// whatever the recording's size (a file, a network stream).
pub fn scan_from(mut source: impl std::io::Read) -> std::io::Result<Scan> {
    let mut reader = Reader::new();
    let mut error = None;
    let mut buf = vec![0u8; HEADER_LEN + MAX_PAYLOAD];
    loop {
        let n = source.read(&mut buf)?;
        if n == 0 {
            break;
        }
        reader.push(buf.get(..n).unwrap_or_default());
        loop {
            match reader.next_chunk() {
                Ok(Some(_)) => {}
                Ok(None) => break,
                Err(e) => {
                    error = Some(e);
                    break;
                }
            }
        }
        if error.is_some() {
            break;
        }
    }
    if error.is_none() {
        error = reader.finish().err();
    }
    Ok(Scan { reader, error })
}
