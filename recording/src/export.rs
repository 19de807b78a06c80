//! Export: asciicast v2 (what `asciinema play` and `asciinema cat` read) and plain text for
//! grep. Both are streaming encoders: one event in, zero or more output bytes out.

use crate::event::{Event, SessionKind, SessionMeta, Timed};

/// asciicast v2: a header line, then one `[seconds, "o" | "r", data]` line per event.
#[derive(Debug)]
pub struct Asciicast {
    /// Bytes of a UTF-8 sequence split across events, kept for the next one.
    carry: Vec<u8>,
    /// Exec sessions print `\n` without `\r` (no PTY): a terminal needs both.
    exec: bool,
}

impl Asciicast {
    pub fn new(meta: &SessionMeta) -> Self {
        Self {
            carry: Vec::new(),
            exec: meta.kind == SessionKind::Exec,
        }
    }

    /// The header line.
    pub fn header(meta: &SessionMeta) -> String {
        let mut env = serde_json::Map::new();
        if let Some(term) = &meta.term {
            env.insert("TERM".into(), term.clone().into());
        }
        let title = match &meta.command {
            Some(c) => format!("{}@{}: {c}", meta.login, meta.node),
            None => format!("{}@{}", meta.login, meta.node),
        };
        let header = serde_json::json!({
            "version": 2,
            "width": if meta.cols > 0 { meta.cols } else { 80 },
            "height": if meta.rows > 0 { meta.rows } else { 24 },
            "timestamp": meta.started_unix_ms / 1000,
            "title": title,
            "env": env,
        });
        format!("{header}\n")
    }

    /// The line for one event, if it has one.
    pub fn event(&mut self, t: &Timed) -> Option<String> {
        let secs = t.at_ms as f64 / 1000.0;
        match &t.event {
            Event::Output(b) | Event::Stdout(b) | Event::Stderr(b) => {
                let text = self.text(b);
                if text.is_empty() {
                    return None;
                }
                let line = serde_json::json!([secs, "o", text]);
                Some(format!("{line}\n"))
            }
            Event::Resize { cols, rows } => {
                let line = serde_json::json!([secs, "r", format!("{cols}x{rows}")]);
                Some(format!("{line}\n"))
            }
            Event::Start(_) | Event::End(_) | Event::Joined { .. } => None,
        }
    }

    fn text(&mut self, b: &[u8]) -> String {
        self.carry.extend_from_slice(b);
        let bytes = std::mem::take(&mut self.carry);
        // Keep an incomplete UTF-8 sequence at the end for the next event.
        let cut = match std::str::from_utf8(&bytes) {
            Ok(_) => bytes.len(),
            Err(e) if e.error_len().is_none() => e.valid_up_to(),
            Err(_) => bytes.len(),
        };
        let (now, later) = bytes.split_at(cut);
        self.carry = later.to_vec();
        let s = String::from_utf8_lossy(now);
        if self.exec {
            s.replace("\r\n", "\n").replace('\n', "\r\n")
        } else {
            s.into_owned()
        }
    }
}

/// Plain text: output with terminal escape sequences and carriage returns removed.
#[derive(Debug, Default)]
pub struct Text {
    state: TextState,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum TextState {
    #[default]
    Ground,
    Escape,
    Csi,
    /// OSC, DCS and the like: until BEL or ESC \.
    String,
    StringEscape,
}

impl Text {
    /// The text of one event.
    pub fn event(&mut self, t: &Timed) -> Vec<u8> {
        match &t.event {
            Event::Output(b) | Event::Stdout(b) | Event::Stderr(b) => self.strip(b),
            _ => Vec::new(),
        }
    }

    fn strip(&mut self, b: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(b.len());
        for &c in b {
            self.state = match (self.state, c) {
                (TextState::Ground, 0x1b) => TextState::Escape,
                (TextState::Ground, b'\n' | b'\t') => {
                    out.push(c);
                    TextState::Ground
                }
                (TextState::Ground, c) if c < 0x20 || c == 0x7f => TextState::Ground,
                (TextState::Ground, c) => {
                    out.push(c);
                    TextState::Ground
                }
                (TextState::Escape, b'[') => TextState::Csi,
                (TextState::Escape, b']' | b'P' | b'X' | b'^' | b'_') => TextState::String,
                (TextState::Escape, _) => TextState::Ground,
                (TextState::Csi, 0x40..=0x7e) => TextState::Ground,
                (TextState::Csi, _) => TextState::Csi,
                (TextState::String, 0x07) => TextState::Ground,
                (TextState::String, 0x1b) => TextState::StringEscape,
                (TextState::String, _) => TextState::String,
                (TextState::StringEscape, b'\\') => TextState::Ground,
                (TextState::StringEscape, _) => TextState::String,
            };
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(kind: SessionKind) -> SessionMeta {
        SessionMeta {
            id: "r1".into(),
            cluster: "c".into(),
            user: "alice".into(),
            login: "root".into(),
            node: "web1".into(),
            node_id: "h1".into(),
            kind,
            command: None,
            term: Some("xterm".into()),
            cols: 100,
            rows: 30,
            started_unix_ms: 1_700_000_000_000,
            source_addr: String::new(),
        }
    }

    fn at(at_ms: u64, event: Event) -> Timed {
        Timed { at_ms, event }
    }

    #[test]
    fn asciicast_keeps_split_utf8_and_resizes() {
        let m = meta(SessionKind::Interactive);
        let header: serde_json::Value = serde_json::from_str(Asciicast::header(&m).trim()).unwrap();
        assert_eq!(header["version"], 2);
        assert_eq!(header["width"], 100);
        let mut a = Asciicast::new(&m);
        let snow = "☃".as_bytes();
        assert_eq!(a.event(&at(0, Event::Output(snow[..1].to_vec()))), None);
        let line = a
            .event(&at(1500, Event::Output(snow[1..].to_vec())))
            .unwrap();
        assert_eq!(line, "[1.5,\"o\",\"☃\"]\n");
        let r = a
            .event(&at(2000, Event::Resize { cols: 80, rows: 24 }))
            .unwrap();
        assert_eq!(r, "[2.0,\"r\",\"80x24\"]\n");
        let mut e = Asciicast::new(&meta(SessionKind::Exec));
        let l = e
            .event(&at(0, Event::Stdout(b"a\nb\r\n".to_vec())))
            .unwrap();
        assert_eq!(l, "[0.0,\"o\",\"a\\r\\nb\\r\\n\"]\n");
    }

    #[test]
    fn text_strips_escapes_across_events() {
        let mut t = Text::default();
        let a = t.event(&at(0, Event::Output(b"\x1b[1;3".to_vec())));
        let b = t.event(&at(
            0,
            Event::Output(b"1mred\x1b[0m\r\n\x1b]0;title\x07ok\n".to_vec()),
        ));
        assert_eq!([a, b].concat(), b"red\nok\n");
    }
}
