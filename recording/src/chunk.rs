//! The chunk header: 36 bytes, big-endian.
//!
//! ```text
//!  0  magic "GHRC"        4
//!  4  version (1)         1
//!  5  kind (1 data, 2 trailer)
//!  6  flags (bit 0: payload compressed with zstd)
//!  7  reserved (0)
//!  8  seq                 8   0, 1, 2, … without gaps
//! 16  time_ms             8   data: offset of its first event from the start; trailer: duration
//! 24  payload_len         4   bytes that follow the header
//! 28  raw_len             4   the payload's length once decompressed
//! 32  crc32               4   CRC-32 (IEEE) over bytes 0..32 and the payload
//! ```

pub const MAGIC: [u8; 4] = *b"GHRC";
pub const VERSION: u8 = 1;
pub const HEADER_LEN: usize = 36;
/// The largest payload, on disk or decompressed: a reader never allocates more for a chunk.
pub const MAX_PAYLOAD: usize = 1 << 20;
pub(crate) const FLAG_ZSTD: u8 = 1;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChunkKind {
    Data,
    Trailer,
}

impl ChunkKind {
    fn byte(self) -> u8 {
        match self {
            ChunkKind::Data => 1,
            ChunkKind::Trailer => 2,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkHeader {
    pub kind: ChunkKind,
    pub compressed: bool,
    pub seq: u64,
    pub time_ms: u64,
    pub payload_len: u32,
    pub raw_len: u32,
    pub crc: u32,
}

fn be_u64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    if let Some(s) = b.get(at..at + 8) {
        a.copy_from_slice(s);
    }
    u64::from_be_bytes(a)
}

fn be_u32(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    if let Some(s) = b.get(at..at + 4) {
        a.copy_from_slice(s);
    }
    u32::from_be_bytes(a)
}

impl ChunkHeader {
    /// Parse a header (the CRC is checked with the payload, by [`ChunkHeader::check`]).
    pub fn parse(b: &[u8]) -> Result<Self, String> {
        let b = b.get(..HEADER_LEN).ok_or("short header")?;
        if b.get(..4) != Some(&MAGIC[..]) {
            return Err("bad magic (not a Gatehouse recording chunk)".into());
        }
        if b.get(4) != Some(&VERSION) {
            return Err(format!(
                "unknown version {}",
                b.get(4).copied().unwrap_or(0)
            ));
        }
        let kind = match b.get(5) {
            Some(1) => ChunkKind::Data,
            Some(2) => ChunkKind::Trailer,
            other => {
                return Err(format!(
                    "unknown chunk kind {}",
                    other.copied().unwrap_or(0)
                ));
            }
        };
        let flags = b.get(6).copied().unwrap_or(0);
        if flags & !FLAG_ZSTD != 0 || b.get(7) != Some(&0) {
            return Err(format!("unknown flags {flags:#x}"));
        }
        let h = ChunkHeader {
            kind,
            compressed: flags & FLAG_ZSTD != 0,
            seq: be_u64(b, 8),
            time_ms: be_u64(b, 16),
            payload_len: be_u32(b, 24),
            raw_len: be_u32(b, 28),
            crc: be_u32(b, 32),
        };
        if h.payload_len as usize > MAX_PAYLOAD || h.raw_len as usize > MAX_PAYLOAD {
            return Err(format!(
                "payload of {} bytes ({} raw) exceeds the {MAX_PAYLOAD}-byte limit",
                h.payload_len, h.raw_len
            ));
        }
        if !h.compressed && h.raw_len != h.payload_len {
            return Err("raw length differs from the length of an uncompressed payload".into());
        }
        Ok(h)
    }

    /// The header's bytes before the CRC.
    fn prefix(&self) -> [u8; 32] {
        let mut b = [0u8; 32];
        b[..4].copy_from_slice(&MAGIC);
        b[4] = VERSION;
        b[5] = self.kind.byte();
        b[6] = if self.compressed { FLAG_ZSTD } else { 0 };
        b[8..16].copy_from_slice(&self.seq.to_be_bytes());
        b[16..24].copy_from_slice(&self.time_ms.to_be_bytes());
        b[24..28].copy_from_slice(&self.payload_len.to_be_bytes());
        b[28..32].copy_from_slice(&self.raw_len.to_be_bytes());
        b
    }

    /// Does the CRC cover this payload?
    pub fn check(&self, payload: &[u8]) -> bool {
        crc(&self.prefix(), payload) == self.crc
    }
}

fn crc(prefix: &[u8], payload: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(prefix);
    h.update(payload);
    h.finalize()
}

/// Encode a whole chunk: header (with its CRC) and payload.
pub(crate) fn encode(
    kind: ChunkKind,
    seq: u64,
    time_ms: u64,
    payload: &[u8],
    raw_len: usize,
    compressed: bool,
) -> Vec<u8> {
    let mut h = ChunkHeader {
        kind,
        compressed,
        seq,
        time_ms,
        payload_len: payload.len() as u32,
        raw_len: raw_len as u32,
        crc: 0,
    };
    let prefix = h.prefix();
    h.crc = crc(&prefix, payload);
    let mut out = Vec::with_capacity(HEADER_LEN + payload.len());
    out.extend_from_slice(&prefix);
    out.extend_from_slice(&h.crc.to_be_bytes());
    out.extend_from_slice(payload);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_roundtrip_and_crc() {
        let bytes = encode(ChunkKind::Data, 7, 1234, b"hello", 5, false);
        let h = ChunkHeader::parse(&bytes).unwrap();
        assert_eq!((h.seq, h.time_ms, h.payload_len), (7, 1234, 5));
        assert!(h.check(&bytes[HEADER_LEN..]));
        assert!(!h.check(b"hellp"));
    }

    #[test]
    fn refuses_bad_headers() {
        let good = encode(ChunkKind::Trailer, 0, 0, b"{}", 2, false);
        for (at, v) in [(0, b'X'), (4, 9), (5, 3), (6, 0x80), (7, 1)] {
            let mut b = good.clone();
            b[at] = v;
            assert!(ChunkHeader::parse(&b).is_err(), "byte {at}");
        }
        let mut big = good.clone();
        big[24..28].copy_from_slice(&(MAX_PAYLOAD as u32 + 1).to_be_bytes());
        assert!(ChunkHeader::parse(&big).unwrap_err().contains("limit"));
    }
}
