//! The writer: events and `now` in, chunk bytes out.

use sha2::{Digest, Sha256};

use crate::chunk::{self, ChunkKind};
use crate::event::{self, EndInfo, Event, SessionMeta, Timed};
use crate::verify::{self, Trailer};
use crate::{Error, Reader};

/// Pending bytes that make a chunk worth flushing at once.
pub const FLUSH_BYTES: usize = 16 * 1024;
/// The longest an event waits for its chunk: what a crash may lose.
pub const FLUSH_AFTER_MS: u64 = 1000;
/// Output events are split into pieces of at most this much, which bounds the pending buffer
/// at `FLUSH_BYTES + MAX_EVENT_DATA` plus a header.
const MAX_EVENT_DATA: usize = 32 * 1024;
/// zstd's fastest regular level: terminal output still shrinks 4-5× (`loadgen recordings`).
const ZSTD_LEVEL: i32 = 1;

/// A zstd compressor and decompressor, shared by every recording a thread writes (a context is
/// far larger than a recording's pending bytes, so recordings do not own one).
pub struct Codec {
    compressor: zstd::bulk::Compressor<'static>,
}

impl std::fmt::Debug for Codec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Codec")
    }
}

impl Codec {
    pub fn new() -> Result<Self, Error> {
        let compressor = zstd::bulk::Compressor::new(ZSTD_LEVEL)
            .map_err(|e| Error::Encode(format!("zstd: {e}")))?;
        Ok(Self { compressor })
    }

    /// Compressed payload, or `None` when compression would not pay.
    fn compress(&mut self, raw: &[u8]) -> Option<Vec<u8>> {
        let out = self.compressor.compress(raw).ok()?;
        (out.len() < raw.len()).then_some(out)
    }
}

/// Signs a recording's trailer: the recording agent's host key and the host certificate that
/// vouches for it (an OpenSSH `…-cert-v01@openssh.com` line).
#[derive(Debug, Clone)]
pub struct Signer {
    pub key: ssh_key::PrivateKey,
    pub certificate: String,
}

impl Signer {
    fn sign(&self, message: &[u8]) -> Result<String, Error> {
        let sig = self
            .key
            .sign(
                verify::SIGNATURE_NAMESPACE,
                ssh_key::HashAlg::Sha512,
                message,
            )
            .map_err(|e| Error::Signature(e.to_string()))?;
        sig.to_pem(ssh_key::LineEnding::LF)
            .map_err(|e| Error::Signature(e.to_string()))
    }
}

/// One recording being written. Holds at most one chunk's pending events (≤ 48 KiB, freed
/// after each flush), a running SHA-256 and counters.
#[derive(Debug)]
pub struct Writer {
    id: String,
    start_unix_ms: u64,
    seq: u64,
    pending: Vec<u8>,
    /// When (Unix ms) the oldest pending event was recorded: its chunk is due a second later.
    pending_since: Option<u64>,
    chunk_time_ms: u64,
    last_at_ms: u64,
    digest: Sha256,
    data_bytes: u64,
}

impl Writer {
    /// Start a recording: its first event is the session's metadata.
    pub fn new(meta: &SessionMeta, now_unix_ms: u64) -> Self {
        let mut w = Self {
            id: meta.id.clone(),
            start_unix_ms: meta.started_unix_ms,
            seq: 0,
            pending: Vec::new(),
            pending_since: None,
            chunk_time_ms: 0,
            last_at_ms: 0,
            digest: Sha256::new(),
            data_bytes: 0,
        };
        w.record(now_unix_ms, &Event::Start(meta.clone()));
        w
    }

    /// Continue a recording that `reader` read up to its last whole chunk (an agent restarted
    /// after a crash seals it as incomplete this way). `None` if it has no start or a trailer.
    pub fn resume(reader: &Reader) -> Option<Self> {
        let meta = reader.meta()?;
        if reader.trailer_seen() {
            return None;
        }
        Some(Self {
            id: meta.id.clone(),
            start_unix_ms: meta.started_unix_ms,
            seq: reader.next_seq(),
            pending: Vec::new(),
            pending_since: None,
            chunk_time_ms: 0,
            last_at_ms: reader.last_at_ms(),
            digest: reader.digest_state(),
            data_bytes: reader.data_bytes(),
        })
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    /// Chunks produced so far.
    pub fn chunks(&self) -> u64 {
        self.seq
    }

    /// Append an event at `now`. Output larger than 32 KiB is split.
    pub fn record(&mut self, now_unix_ms: u64, event: &Event) {
        match event {
            Event::Output(b) | Event::Stdout(b) | Event::Stderr(b) if b.len() > MAX_EVENT_DATA => {
                for piece in b.chunks(MAX_EVENT_DATA) {
                    let e = match event {
                        Event::Output(_) => Event::Output(piece.to_vec()),
                        Event::Stdout(_) => Event::Stdout(piece.to_vec()),
                        _ => Event::Stderr(piece.to_vec()),
                    };
                    self.record_one(now_unix_ms, &e);
                }
            }
            _ => self.record_one(now_unix_ms, event),
        }
    }

    /// Append output at `now` straight from the bytes read (no event value built); more than
    /// 32 KiB is split.
    pub fn record_data(&mut self, now_unix_ms: u64, stream: event::Stream, data: &[u8]) {
        for piece in data.chunks(MAX_EVENT_DATA) {
            let delta = self.delta(now_unix_ms, piece.len() + 21);
            event::encode_raw(&mut self.pending, delta, stream.tag(), piece);
        }
    }

    /// The time of an event recorded now, as a delta from the previous one in the chunk (the
    /// first of a chunk starts it); room for `bound` bytes is made.
    fn delta(&mut self, now_unix_ms: u64, bound: usize) -> u64 {
        let at = now_unix_ms
            .saturating_sub(self.start_unix_ms)
            .max(self.last_at_ms);
        let delta = if self.pending.is_empty() {
            self.pending.reserve_exact(FLUSH_BYTES + bound);
            self.chunk_time_ms = at;
            self.pending_since = Some(now_unix_ms);
            0
        } else {
            at - self.last_at_ms
        };
        self.last_at_ms = at;
        delta
    }

    fn record_one(&mut self, now_unix_ms: u64, event: &Event) {
        let delta = self.delta(now_unix_ms, event::encoded_len_bound(event));
        event::encode(&mut self.pending, delta, event);
    }

    /// Enough is pending for a chunk now.
    pub fn wants_flush(&self) -> bool {
        self.pending.len() >= FLUSH_BYTES
    }

    /// When (Unix ms) the pending events must be flushed, if any are pending.
    pub fn deadline(&self) -> Option<u64> {
        self.pending_since.map(|t| t.saturating_add(FLUSH_AFTER_MS))
    }

    /// Bytes this recording holds in memory.
    pub fn memory(&self) -> usize {
        self.pending.capacity() + std::mem::size_of::<Self>() + self.id.capacity()
    }

    /// The state after the chunks produced so far, to [`Writer::restore`] if the next one
    /// cannot be stored.
    pub fn checkpoint(&self) -> Checkpoint {
        Checkpoint {
            seq: self.seq,
            digest: self.digest.clone(),
            data_bytes: self.data_bytes,
        }
    }

    /// Forget the chunks produced since `cp` (they were not stored; their events are lost), so
    /// the trailer covers exactly what was.
    pub fn restore(&mut self, cp: Checkpoint) {
        self.seq = cp.seq;
        self.digest = cp.digest;
        self.data_bytes = cp.data_bytes;
    }

    /// The pending events as one data chunk, if any.
    pub fn flush(&mut self, codec: &mut Codec) -> Option<Vec<u8>> {
        if self.pending.is_empty() {
            return None;
        }
        let raw = std::mem::take(&mut self.pending);
        let bytes = match codec.compress(&raw) {
            Some(z) => chunk::encode(
                ChunkKind::Data,
                self.seq,
                self.chunk_time_ms,
                &z,
                raw.len(),
                true,
            ),
            None => chunk::encode(
                ChunkKind::Data,
                self.seq,
                self.chunk_time_ms,
                &raw,
                raw.len(),
                false,
            ),
        };
        self.digest.update(&bytes);
        self.data_bytes += bytes.len() as u64;
        self.seq += 1;
        self.pending_since = None;
        Some(bytes)
    }

    /// End the recording: the last data chunk (with `end`, if the session's end is known) and
    /// the signed trailer. `complete` says whether every event of the session is in it;
    /// `reason` says why not.
    pub fn finish(
        mut self,
        now_unix_ms: u64,
        end: Option<EndInfo>,
        complete: bool,
        reason: Option<String>,
        codec: &mut Codec,
        signer: &Signer,
    ) -> Result<Vec<u8>, Error> {
        if let Some(end) = end {
            self.record(now_unix_ms, &Event::End(end));
        }
        let mut out = self.flush(codec).unwrap_or_default();
        let sha256 = hex::encode(self.digest.clone().finalize());
        let message =
            verify::signed_message(&self.id, complete, self.seq, self.data_bytes, &sha256);
        let trailer = Trailer {
            complete,
            reason,
            chunks: self.seq,
            data_bytes: self.data_bytes,
            sha256,
            duration_ms: self.last_at_ms,
            host_cert: signer.certificate.clone(),
            signature: signer.sign(&message)?,
        };
        let json = serde_json::to_vec(&trailer).map_err(|e| Error::Encode(e.to_string()))?;
        out.extend(chunk::encode(
            ChunkKind::Trailer,
            self.seq,
            self.last_at_ms,
            &json,
            json.len(),
            false,
        ));
        Ok(out)
    }
}

/// What [`Writer::checkpoint`] keeps.
#[derive(Debug, Clone)]
pub struct Checkpoint {
    seq: u64,
    digest: Sha256,
    data_bytes: u64,
}

/// Every event of a recording in order (for tests and small recordings).
pub fn events_of(bytes: &[u8]) -> Result<Vec<Timed>, Error> {
    let mut r = Reader::new();
    r.push(bytes);
    let mut out = Vec::new();
    while let Some(c) = r.next_chunk()? {
        if let crate::Chunk::Data { events, .. } = c {
            out.extend(events);
        }
    }
    r.finish()?;
    Ok(out)
}
