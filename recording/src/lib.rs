//! Session recordings, sans-IO.
//!
//! A recording is a sequence of **chunks** appended to one file (or object): each chunk has a
//! 36-byte header (magic, kind, sequence number, time, lengths, CRC-32 over header and
//! payload) and a payload. Data chunks hold the session's events (output with timing, resizes,
//! start and end), compressed with zstd. The last chunk is the **trailer**: the SHA-256 over
//! every data chunk's bytes, whether the recording is complete, and an SSH signature over that
//! digest by the recording agent's host key, with the host certificate that vouches for the key.
//!
//! - [`Writer`]: events and `now` in, chunk bytes out; at most [`FLUSH_BYTES`] plus one event
//!   pending, and a deadline one second after the oldest pending event.
//! - [`Reader`]: bytes in (in any pieces), chunks and their events out; every check a verifier
//!   needs (magic, CRC, sequence, sizes, decompression bounds), failing with the chunk and offset.
//! - [`verify`]: a whole recording's digest, trailer and signature against the host CA.
//! - [`play`] and [`export`]: playback timing (speed, idle skipping, seeking) and asciicast v2
//!   and plain text.

mod chunk;
mod event;
pub mod export;
pub mod play;
mod reader;
mod verify;
mod writer;

pub use chunk::{ChunkHeader, ChunkKind, HEADER_LEN, MAX_PAYLOAD};
pub use event::{EndInfo, Event, SessionKind, SessionMeta, Stream, Timed};
pub use reader::{Chunk, Reader, Scan, scan, scan_from};
pub use verify::{SIGNATURE_NAMESPACE, Trailer, Verified, signed_message, verify, verify_trailer};
pub use writer::{Checkpoint, Codec, FLUSH_AFTER_MS, FLUSH_BYTES, Signer, Writer, events_of};

/// What is wrong with a recording's bytes, and where.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    #[error("chunk {seq} at byte {offset}: {what}")]
    Corrupt { seq: u64, offset: u64, what: String },
    #[error("chunk {seq} at byte {offset}: the recording ends inside the chunk (truncated)")]
    Truncated { seq: u64, offset: u64 },
    #[error("the recording ends after {} chunks without its trailer (in progress, or cut short)", last_seq.map_or(0, |s| s + 1))]
    NoTrailer { last_seq: Option<u64> },
    #[error("trailer: {0}")]
    Trailer(String),
    #[error("signature: {0}")]
    Signature(String),
    #[error("encoding: {0}")]
    Encode(String),
}

impl Error {
    /// The chunk the recording failed at, when the failure is in one.
    pub fn chunk(&self) -> Option<u64> {
        match self {
            Error::Corrupt { seq, .. } | Error::Truncated { seq, .. } => Some(*seq),
            _ => None,
        }
    }
}
