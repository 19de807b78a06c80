//! Tunnel frames and their wire format. Pure: bytes in, frames out (and back).
//!
//! Every frame has a 10-byte header, big-endian:
//!
//! ```text
//! +---------+----------+---------------+---------------+-----------------+
//! | type u8 | flags u8 | stream id u32 | length u32    | payload (length)|
//! +---------+----------+---------------+---------------+-----------------+
//! ```
//!
//! Flags are reserved and must be zero. Connection-level frames (hello, ping, pong, heartbeat,
//! go-away) use stream id 0. Payload length is capped by the receiver's `max_frame`.

use bytes::{Buf, BufMut, Bytes, BytesMut};

pub const HEADER_LEN: usize = 10;
/// Protocol version spoken by this build.
pub const VERSION: u16 = 1;
/// The largest payload any peer may send, whatever it announces (bounds per-frame memory).
pub const MAX_FRAME_LIMIT: u32 = 1 << 20;

/// A stream identifier: odd ones are opened by the dialer (agent), even ones by the listener
/// (proxy). 0 is the connection itself.
pub type StreamId = u32;

#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Frame {
    /// First frame from each side: protocol version and the sender's receive limits.
    Hello {
        version: u16,
        initial_window: u32,
        max_frame: u32,
    },
    /// Open a stream to `target` (e.g. `ssh`, `tcp:APP`), with JSON metadata (who, from where).
    Open {
        stream: StreamId,
        target: String,
        metadata: Bytes,
    },
    OpenOk {
        stream: StreamId,
    },
    OpenErr {
        stream: StreamId,
        code: u16,
        message: String,
    },
    Data {
        stream: StreamId,
        data: Bytes,
    },
    /// The receiver consumed `increment` more bytes: the sender may send that much more.
    Window {
        stream: StreamId,
        increment: u32,
    },
    /// The sender will send no more data on this stream (half-close).
    Fin {
        stream: StreamId,
    },
    Reset {
        stream: StreamId,
        code: u16,
    },
    Ping {
        opaque: u64,
    },
    Pong {
        opaque: u64,
    },
    /// Inventory of the agent (JSON), sent periodically.
    Heartbeat {
        inventory: Bytes,
    },
    /// The sender is draining: no new streams above `last_stream` will be accepted.
    GoAway {
        last_stream: StreamId,
        code: u16,
        message: String,
    },
}

mod kind {
    pub const HELLO: u8 = 0x01;
    pub const OPEN: u8 = 0x02;
    pub const OPEN_OK: u8 = 0x03;
    pub const OPEN_ERR: u8 = 0x04;
    pub const DATA: u8 = 0x05;
    pub const WINDOW: u8 = 0x06;
    pub const FIN: u8 = 0x07;
    pub const RESET: u8 = 0x08;
    pub const PING: u8 = 0x09;
    pub const PONG: u8 = 0x0A;
    pub const HEARTBEAT: u8 = 0x0B;
    pub const GO_AWAY: u8 = 0x0C;
}

/// Why bytes from a peer are not a valid frame. Any of these closes the tunnel.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FrameError {
    #[error("unknown frame type 0x{0:02x}")]
    UnknownType(u8),
    #[error("reserved flags set (0x{0:02x})")]
    Flags(u8),
    #[error("frame of {len} bytes exceeds the limit of {max}")]
    TooLarge { len: u32, max: u32 },
    #[error("{0} frame is malformed: {1}")]
    Malformed(&'static str, &'static str),
    #[error("{0} frame on stream {1}, expected stream {2}")]
    WrongStream(&'static str, StreamId, &'static str),
}

/// A frame's header, checked by [`Frame::decode_header`]: what its payload will be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    ty: u8,
    stream: StreamId,
    /// The payload's length.
    pub len: usize,
}

impl Frame {
    pub fn name(&self) -> &'static str {
        match self {
            Frame::Hello { .. } => "hello",
            Frame::Open { .. } => "open",
            Frame::OpenOk { .. } => "open-ok",
            Frame::OpenErr { .. } => "open-err",
            Frame::Data { .. } => "data",
            Frame::Window { .. } => "window",
            Frame::Fin { .. } => "fin",
            Frame::Reset { .. } => "reset",
            Frame::Ping { .. } => "ping",
            Frame::Pong { .. } => "pong",
            Frame::Heartbeat { .. } => "heartbeat",
            Frame::GoAway { .. } => "go-away",
        }
    }

    /// Bytes this frame occupies on the wire.
    pub fn encoded_len(&self) -> usize {
        HEADER_LEN
            + match self {
                Frame::Hello { .. } => 10,
                Frame::Open {
                    target, metadata, ..
                } => 2 + target.len() + metadata.len(),
                Frame::OpenOk { .. } | Frame::Fin { .. } => 0,
                Frame::OpenErr { message, .. } => 2 + message.len(),
                Frame::Data { data, .. } => data.len(),
                Frame::Window { .. } => 4,
                Frame::Reset { .. } => 2,
                Frame::Ping { .. } | Frame::Pong { .. } => 8,
                Frame::Heartbeat { inventory } => inventory.len(),
                Frame::GoAway { message, .. } => 6 + message.len(),
            }
    }

    /// Append the encoding to `out`. Strings longer than their length field are truncated
    /// (targets at 64 KiB), which callers prevent by validating first.
    pub fn encode(&self, out: &mut BytesMut) {
        out.reserve(self.encoded_len());
        let header = |out: &mut BytesMut, ty: u8, stream: StreamId, len: usize| {
            out.put_u8(ty);
            out.put_u8(0);
            out.put_u32(stream);
            out.put_u32(len as u32);
        };
        match self {
            Frame::Hello {
                version,
                initial_window,
                max_frame,
            } => {
                header(out, kind::HELLO, 0, 10);
                out.put_u16(*version);
                out.put_u32(*initial_window);
                out.put_u32(*max_frame);
            }
            Frame::Open {
                stream,
                target,
                metadata,
            } => {
                let target = truncate(target, u16::MAX as usize);
                header(out, kind::OPEN, *stream, 2 + target.len() + metadata.len());
                out.put_u16(target.len() as u16);
                out.put_slice(target.as_bytes());
                out.put_slice(metadata);
            }
            Frame::OpenOk { stream } => header(out, kind::OPEN_OK, *stream, 0),
            Frame::OpenErr {
                stream,
                code,
                message,
            } => {
                header(out, kind::OPEN_ERR, *stream, 2 + message.len());
                out.put_u16(*code);
                out.put_slice(message.as_bytes());
            }
            Frame::Data { stream, data } => {
                header(out, kind::DATA, *stream, data.len());
                out.put_slice(data);
            }
            Frame::Window { stream, increment } => {
                header(out, kind::WINDOW, *stream, 4);
                out.put_u32(*increment);
            }
            Frame::Fin { stream } => header(out, kind::FIN, *stream, 0),
            Frame::Reset { stream, code } => {
                header(out, kind::RESET, *stream, 2);
                out.put_u16(*code);
            }
            Frame::Ping { opaque } => {
                header(out, kind::PING, 0, 8);
                out.put_u64(*opaque);
            }
            Frame::Pong { opaque } => {
                header(out, kind::PONG, 0, 8);
                out.put_u64(*opaque);
            }
            Frame::Heartbeat { inventory } => {
                header(out, kind::HEARTBEAT, 0, inventory.len());
                out.put_slice(inventory);
            }
            Frame::GoAway {
                last_stream,
                code,
                message,
            } => {
                header(out, kind::GO_AWAY, 0, 6 + message.len());
                out.put_u32(*last_stream);
                out.put_u16(*code);
                out.put_slice(message.as_bytes());
            }
        }
    }

    /// Append a `Data` frame carrying `data` to `out`: the same bytes as encoding
    /// `Frame::Data`, without first copying the payload into a `Bytes`.
    pub fn encode_data(stream: StreamId, data: &[u8], out: &mut BytesMut) {
        out.reserve(HEADER_LEN + data.len());
        let start = out.len();
        out.put_bytes(0, HEADER_LEN);
        if let Some(header) = out.get_mut(start..) {
            Self::write_data_header(stream, data.len(), header);
        }
        out.put_slice(data);
    }

    /// Write the header of a `Data` frame with a `len`-byte payload into `header` (its first
    /// [`HEADER_LEN`] bytes), for a payload that follows it in place.
    pub fn write_data_header(stream: StreamId, len: usize, header: &mut [u8]) {
        let mut h = [0u8; HEADER_LEN];
        h[0] = kind::DATA;
        h[2..6].copy_from_slice(&stream.to_be_bytes());
        h[6..10].copy_from_slice(&(len as u32).to_be_bytes());
        if let Some(dst) = header.get_mut(..HEADER_LEN) {
            dst.copy_from_slice(&h);
        }
    }

    /// Decode one frame from the front of `buf`, if a whole one is there. Consumes exactly the
    /// frame's bytes; payloads are split off `buf` without copying.
    pub fn decode(buf: &mut BytesMut, max_frame: u32) -> Result<Option<Frame>, FrameError> {
        let Some(header) = Self::decode_header(buf, max_frame)? else {
            return Ok(None);
        };
        if buf.len() < HEADER_LEN + header.len {
            buf.reserve(HEADER_LEN + header.len - buf.len());
            return Ok(None);
        }
        buf.advance(HEADER_LEN);
        let payload = buf.split_to(header.len).freeze();
        Self::from_parts(header, payload).map(Some)
    }

    /// Check the header at the front of `buf`, if all of it is there: a known type, no flags,
    /// a length within `max_frame` (and [`MAX_FRAME_LIMIT`]).
    pub fn decode_header(buf: &[u8], max_frame: u32) -> Result<Option<Header>, FrameError> {
        let Some(mut h) = buf.get(..HEADER_LEN) else {
            return Ok(None);
        };
        let ty = h.get_u8();
        let flags = h.get_u8();
        let stream = h.get_u32();
        let len = h.get_u32();
        if !(kind::HELLO..=kind::GO_AWAY).contains(&ty) {
            return Err(FrameError::UnknownType(ty));
        }
        if flags != 0 {
            return Err(FrameError::Flags(flags));
        }
        let max = max_frame.min(MAX_FRAME_LIMIT);
        if len > max {
            return Err(FrameError::TooLarge { len, max });
        }
        Ok(Some(Header {
            ty,
            stream,
            len: len as usize,
        }))
    }

    /// The frame a checked header and its whole payload make.
    pub fn from_parts(header: Header, payload: Bytes) -> Result<Frame, FrameError> {
        let Header { ty, stream, .. } = header;
        let mut p = payload;
        let conn_level = |name: &'static str| {
            if stream == 0 {
                Ok(())
            } else {
                Err(FrameError::WrongStream(name, stream, "0"))
            }
        };
        let stream_level = |name: &'static str| {
            if stream != 0 {
                Ok(())
            } else {
                Err(FrameError::WrongStream(name, stream, "non-zero"))
            }
        };
        let exact = |p: &Bytes, n: usize, name: &'static str| {
            if p.len() == n {
                Ok(())
            } else {
                Err(FrameError::Malformed(name, "wrong payload length"))
            }
        };
        let frame = match ty {
            kind::HELLO => {
                conn_level("hello")?;
                exact(&p, 10, "hello")?;
                Frame::Hello {
                    version: p.get_u16(),
                    initial_window: p.get_u32(),
                    max_frame: p.get_u32(),
                }
            }
            kind::OPEN => {
                stream_level("open")?;
                if p.len() < 2 {
                    return Err(FrameError::Malformed("open", "missing target length"));
                }
                let tlen = p.get_u16() as usize;
                if p.len() < tlen {
                    return Err(FrameError::Malformed("open", "target longer than payload"));
                }
                let target = utf8(p.split_to(tlen), "open")?;
                Frame::Open {
                    stream,
                    target,
                    metadata: p,
                }
            }
            kind::OPEN_OK => {
                stream_level("open-ok")?;
                exact(&p, 0, "open-ok")?;
                Frame::OpenOk { stream }
            }
            kind::OPEN_ERR => {
                stream_level("open-err")?;
                if p.len() < 2 {
                    return Err(FrameError::Malformed("open-err", "missing code"));
                }
                let code = p.get_u16();
                Frame::OpenErr {
                    stream,
                    code,
                    message: utf8(p, "open-err")?,
                }
            }
            kind::DATA => {
                stream_level("data")?;
                Frame::Data { stream, data: p }
            }
            kind::WINDOW => {
                stream_level("window")?;
                exact(&p, 4, "window")?;
                Frame::Window {
                    stream,
                    increment: p.get_u32(),
                }
            }
            kind::FIN => {
                stream_level("fin")?;
                exact(&p, 0, "fin")?;
                Frame::Fin { stream }
            }
            kind::RESET => {
                stream_level("reset")?;
                exact(&p, 2, "reset")?;
                Frame::Reset {
                    stream,
                    code: p.get_u16(),
                }
            }
            kind::PING => {
                conn_level("ping")?;
                exact(&p, 8, "ping")?;
                Frame::Ping {
                    opaque: p.get_u64(),
                }
            }
            kind::PONG => {
                conn_level("pong")?;
                exact(&p, 8, "pong")?;
                Frame::Pong {
                    opaque: p.get_u64(),
                }
            }
            kind::HEARTBEAT => {
                conn_level("heartbeat")?;
                Frame::Heartbeat { inventory: p }
            }
            _ => {
                // kind::GO_AWAY: the range check above leaves nothing else.
                conn_level("go-away")?;
                if p.len() < 6 {
                    return Err(FrameError::Malformed("go-away", "too short"));
                }
                let last_stream = p.get_u32();
                let code = p.get_u16();
                Frame::GoAway {
                    last_stream,
                    code,
                    message: utf8(p, "go-away")?,
                }
            }
        };
        Ok(frame)
    }
}

fn utf8(b: Bytes, name: &'static str) -> Result<String, FrameError> {
    String::from_utf8(b.to_vec()).map_err(|_| FrameError::Malformed(name, "text is not UTF-8"))
}

fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s.get(..end).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn all_frames() -> Vec<Frame> {
        vec![
            Frame::Hello {
                version: VERSION,
                initial_window: 262_144,
                max_frame: 65_536,
            },
            Frame::Open {
                stream: 2,
                target: "ssh".into(),
                metadata: Bytes::from_static(b"{\"user\":\"alice\"}"),
            },
            Frame::OpenOk { stream: 2 },
            Frame::OpenErr {
                stream: 4,
                code: 404,
                message: "no such app".into(),
            },
            Frame::Data {
                stream: 2,
                data: Bytes::from_static(b"hello"),
            },
            Frame::Data {
                stream: 2,
                data: Bytes::new(),
            },
            Frame::Window {
                stream: 2,
                increment: 65_536,
            },
            Frame::Fin { stream: 2 },
            Frame::Reset { stream: 2, code: 1 },
            Frame::Ping { opaque: 7 },
            Frame::Pong { opaque: 7 },
            Frame::Heartbeat {
                inventory: Bytes::from_static(b"{}"),
            },
            Frame::GoAway {
                last_stream: 9,
                code: 0,
                message: "restarting".into(),
            },
        ]
    }

    #[test]
    fn roundtrip_every_frame_whole_and_byte_by_byte() {
        let mut wire = BytesMut::new();
        for f in all_frames() {
            let before = wire.len();
            f.encode(&mut wire);
            assert_eq!(wire.len() - before, f.encoded_len(), "{f:?}");
        }
        let bytes = wire.clone().freeze();
        let mut whole = wire;
        for f in all_frames() {
            assert_eq!(Frame::decode(&mut whole, 65_536).unwrap(), Some(f));
        }
        assert!(whole.is_empty());
        // Byte by byte: a partial frame is never an error and never consumed.
        let mut partial = BytesMut::new();
        let mut got = vec![];
        for b in bytes.iter() {
            partial.put_u8(*b);
            while let Some(f) = Frame::decode(&mut partial, 65_536).unwrap() {
                got.push(f);
            }
        }
        assert_eq!(got, all_frames());
    }

    #[test]
    fn rejects_bad_headers_and_payloads() {
        let mut b = BytesMut::from(&[0xFF, 0, 0, 0, 0, 1, 0, 0, 0, 0][..]);
        assert_eq!(
            Frame::decode(&mut b, 1024),
            Err(FrameError::UnknownType(0xFF))
        );
        let mut b = BytesMut::from(&[kind::DATA, 1, 0, 0, 0, 1, 0, 0, 0, 0][..]);
        assert_eq!(Frame::decode(&mut b, 1024), Err(FrameError::Flags(1)));
        let mut b = BytesMut::from(&[kind::DATA, 0, 0, 0, 0, 1, 0, 0, 8, 0][..]);
        assert_eq!(
            Frame::decode(&mut b, 1024),
            Err(FrameError::TooLarge {
                len: 2048,
                max: 1024
            })
        );
        let mut b = BytesMut::from(&[kind::DATA, 0, 0, 0, 0, 0, 0, 0, 0, 0][..]);
        assert!(matches!(
            Frame::decode(&mut b, 1024),
            Err(FrameError::WrongStream("data", 0, _))
        ));
        let mut b = BytesMut::from(
            &[
                kind::PING,
                0,
                0,
                0,
                0,
                3,
                0,
                0,
                0,
                8,
                0,
                0,
                0,
                0,
                0,
                0,
                0,
                1,
            ][..],
        );
        assert!(matches!(
            Frame::decode(&mut b, 1024),
            Err(FrameError::WrongStream("ping", 3, _))
        ));
        let mut b = BytesMut::from(&[kind::WINDOW, 0, 0, 0, 0, 1, 0, 0, 0, 3, 0, 0, 1][..]);
        assert!(matches!(
            Frame::decode(&mut b, 1024),
            Err(FrameError::Malformed("window", _))
        ));
        let mut b = BytesMut::from(&[kind::OPEN, 0, 0, 0, 0, 1, 0, 0, 0, 3, 0, 9, 1][..]);
        assert!(matches!(
            Frame::decode(&mut b, 1024),
            Err(FrameError::Malformed("open", _))
        ));
        let mut b = BytesMut::from(&[kind::OPEN, 0, 0, 0, 0, 1, 0, 0, 0, 4, 0, 2, 0xC3, 0x28][..]);
        assert!(matches!(
            Frame::decode(&mut b, 1024),
            Err(FrameError::Malformed("open", _))
        ));
    }
}
