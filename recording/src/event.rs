//! The events inside a data chunk: `tag u8 | delta_ms varint | len varint | body`, where the
//! delta is from the previous event in the chunk (the first: from the chunk's time).

use serde::{Deserialize, Serialize};

/// What kind of session was recorded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SessionKind {
    /// A shell or command on a PTY: one output stream, resizes.
    Interactive,
    /// A command without a PTY: stdout and stderr apart.
    Exec,
}

/// Who, where and what: the first event of every recording.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionMeta {
    /// The recording's id (also the session's id).
    pub id: String,
    pub cluster: String,
    pub user: String,
    pub login: String,
    /// The node's name and host id (the host certificate's principals).
    pub node: String,
    pub node_id: String,
    pub kind: SessionKind,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub term: Option<String>,
    #[serde(default)]
    pub cols: u32,
    #[serde(default)]
    pub rows: u32,
    pub started_unix_ms: u64,
    #[serde(default)]
    pub source_addr: String,
}

/// How the session ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct EndInfo {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_status: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_signal: Option<String>,
    /// Why the session was ended by the agent, if it was (e.g. its recording failed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    pub ended_unix_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    Start(SessionMeta),
    /// What the PTY printed.
    Output(Vec<u8>),
    Stdout(Vec<u8>),
    Stderr(Vec<u8>),
    Resize {
        cols: u32,
        rows: u32,
    },
    /// Someone joined to watch (`gsh join`).
    Joined {
        user: String,
    },
    End(EndInfo),
}

/// An event at its offset from the recording's start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Timed {
    pub at_ms: u64,
    pub event: Event,
}

const T_START: u8 = 1;
const T_OUTPUT: u8 = 2;
const T_STDOUT: u8 = 3;
const T_STDERR: u8 = 4;
const T_RESIZE: u8 = 5;
const T_JOINED: u8 = 6;
const T_END: u8 = 7;

pub(crate) fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn get_varint(b: &[u8], at: &mut usize) -> Result<u64, String> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let byte = *b.get(*at).ok_or("event ends inside a number")?;
        *at += 1;
        v |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return Ok(v);
        }
    }
    Err("number longer than 64 bits".into())
}

/// Which output stream a piece of data came from (for [`crate::Writer::record_data`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    /// A PTY's output.
    Output,
    Stdout,
    Stderr,
}

impl Stream {
    pub(crate) fn tag(self) -> u8 {
        match self {
            Stream::Output => T_OUTPUT,
            Stream::Stdout => T_STDOUT,
            Stream::Stderr => T_STDERR,
        }
    }
}

/// Append one event given as its tag and body; `delta_ms` from the previous one.
pub(crate) fn encode_raw(out: &mut Vec<u8>, delta_ms: u64, tag: u8, body: &[u8]) {
    out.push(tag);
    put_varint(out, delta_ms);
    put_varint(out, body.len() as u64);
    out.extend_from_slice(body);
}

/// Append one event; `delta_ms` from the previous one.
pub(crate) fn encode(out: &mut Vec<u8>, delta_ms: u64, event: &Event) {
    let (tag, body): (u8, std::borrow::Cow<'_, [u8]>) = match event {
        Event::Start(m) => (T_START, serde_json::to_vec(m).unwrap_or_default().into()),
        Event::Output(b) => (T_OUTPUT, b.as_slice().into()),
        Event::Stdout(b) => (T_STDOUT, b.as_slice().into()),
        Event::Stderr(b) => (T_STDERR, b.as_slice().into()),
        Event::Resize { cols, rows } => {
            let mut v = Vec::with_capacity(8);
            v.extend_from_slice(&cols.to_be_bytes());
            v.extend_from_slice(&rows.to_be_bytes());
            (T_RESIZE, v.into())
        }
        Event::Joined { user } => (T_JOINED, user.as_bytes().into()),
        Event::End(e) => (T_END, serde_json::to_vec(e).unwrap_or_default().into()),
    };
    encode_raw(out, delta_ms, tag, &body);
}

/// Bytes an event takes once encoded, at most (for the writer's bound).
pub(crate) fn encoded_len_bound(event: &Event) -> usize {
    let body = match event {
        Event::Output(b) | Event::Stdout(b) | Event::Stderr(b) => b.len(),
        Event::Resize { .. } => 8,
        Event::Joined { user } => user.len(),
        Event::Start(_) | Event::End(_) => 1024,
    };
    body + 21
}

/// Decode every event of a data chunk's (decompressed) payload.
pub(crate) fn decode_all(b: &[u8], chunk_time_ms: u64) -> Result<Vec<Timed>, String> {
    let mut at = 0usize;
    let mut t = chunk_time_ms;
    let mut out = Vec::new();
    while at < b.len() {
        let tag = *b.get(at).ok_or("empty event")?;
        at += 1;
        t = t.saturating_add(get_varint(b, &mut at)?);
        let len = get_varint(b, &mut at)?;
        let end = at
            .checked_add(usize::try_from(len).map_err(|_| "event length overflows")?)
            .filter(|e| *e <= b.len())
            .ok_or("event body runs past the chunk")?;
        let body = b.get(at..end).ok_or("event body runs past the chunk")?;
        at = end;
        let event = match tag {
            T_START => {
                Event::Start(serde_json::from_slice(body).map_err(|e| format!("start event: {e}"))?)
            }
            T_OUTPUT => Event::Output(body.to_vec()),
            T_STDOUT => Event::Stdout(body.to_vec()),
            T_STDERR => Event::Stderr(body.to_vec()),
            T_RESIZE => {
                let cols = body.get(..4).ok_or("short resize event")?;
                let rows = body.get(4..8).ok_or("short resize event")?;
                let n = |s: &[u8]| {
                    let mut a = [0u8; 4];
                    a.copy_from_slice(s);
                    u32::from_be_bytes(a)
                };
                Event::Resize {
                    cols: n(cols),
                    rows: n(rows),
                }
            }
            T_JOINED => Event::Joined {
                user: String::from_utf8_lossy(body).into_owned(),
            },
            T_END => {
                Event::End(serde_json::from_slice(body).map_err(|e| format!("end event: {e}"))?)
            }
            other => return Err(format!("unknown event type {other}")),
        };
        out.push(Timed { at_ms: t, event });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn varints_roundtrip() {
        for v in [0, 1, 127, 128, 300, u32::MAX as u64, u64::MAX] {
            let mut b = Vec::new();
            put_varint(&mut b, v);
            let mut at = 0;
            assert_eq!(get_varint(&b, &mut at).unwrap(), v);
            assert_eq!(at, b.len());
        }
        let mut at = 0;
        assert!(get_varint(&[0xff; 11], &mut at).is_err());
    }

    #[test]
    fn events_roundtrip_with_times() {
        let events = [
            (0, Event::Output(b"$ ".to_vec())),
            (
                5,
                Event::Resize {
                    cols: 120,
                    rows: 40,
                },
            ),
            (7, Event::Stderr(vec![0xff, 0])),
            (
                0,
                Event::End(EndInfo {
                    exit_status: Some(3),
                    ended_unix_ms: 9,
                    ..Default::default()
                }),
            ),
        ];
        let mut b = Vec::new();
        for (d, e) in &events {
            encode(&mut b, *d, e);
        }
        let got = decode_all(&b, 100).unwrap();
        let times: Vec<u64> = got.iter().map(|t| t.at_ms).collect();
        assert_eq!(times, [100, 105, 112, 112]);
        assert_eq!(got[2].event, events[2].1);
        assert!(decode_all(&b[..b.len() - 1], 0).is_err());
        assert!(decode_all(&[99, 0, 0], 0).unwrap_err().contains("unknown"));
    }
}
