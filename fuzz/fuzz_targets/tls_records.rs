//! Our TLS 1.3 record layer between a client and a server after a real handshake in memory. The
//! input is a script: either end seals application data (gathered from several writes into
//! small or large destinations), records whose inner plaintext is anything an authenticated
//! but hostile peer could send (any type, content, padding and size), key updates asked for
//! or not, close_notify, raw unauthenticated bytes and flipped bits; and the bytes reach the
//! other end in pieces, which it opens in place or into a reader's buffer of some size.
//!
//! Never a panic. What an end reads is always a prefix of the application data sent to it
//! (raw or flipped bytes never authenticate; an inner type of zero can hide data inside the
//! content, so it ends this check). While only well-formed records were sent, every byte
//! arrives, close_notify with it, and nothing fails.
#![no_main]

use bytes::BytesMut;
use gatehouse_dataplane::tls::testing::fuzzing::{End, MAX_PLAINTEXT, Pair, Read};
use libfuzzer_sys::fuzz_target;

/// The script, read front to back; zeros once it runs out.
struct Script<'a>(&'a [u8]);

impl Script<'_> {
    fn byte(&mut self) -> u8 {
        let Some((&b, rest)) = self.0.split_first() else {
            return 0;
        };
        self.0 = rest;
        b
    }
    fn u16(&mut self) -> usize {
        usize::from(u16::from_be_bytes([self.byte(), self.byte()]))
    }
    fn take(&mut self, n: usize) -> &[u8] {
        let (a, b) = self.0.split_at(n.min(self.0.len()));
        self.0 = b;
        a
    }
    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// One direction: the bytes on the wire to `to`, what was sent and what arrived.
struct Direction {
    to: End,
    /// Sent, not yet delivered.
    wire: Vec<u8>,
    /// Delivered, not yet opened (an incomplete record).
    inbox: Vec<u8>,
    sent: Vec<u8>,
    read: Vec<u8>,
    close_sent: bool,
    closed: bool,
    /// Only well-formed records so far: everything must arrive.
    exact: bool,
    /// What arrives is a prefix of `sent`.
    prefix: bool,
    /// The reader's buffer.
    out: Vec<u8>,
}

impl Direction {
    fn new(to: End) -> Self {
        Self {
            to,
            wire: Vec::new(),
            inbox: Vec::new(),
            sent: Vec::new(),
            read: Vec::new(),
            close_sent: false,
            closed: false,
            exact: true,
            prefix: true,
            out: Vec::new(),
        }
    }

    /// Deliver `n` bytes to the receiver and open what is whole, `room` deciding how (0: in
    /// place; else into a reader's buffer of that many bytes, in place when it is too small).
    /// Its replies go onto `back`. False once the receiver has failed.
    fn deliver(&mut self, pair: &mut Pair, n: usize, room: usize, back: &mut Vec<u8>) -> bool {
        let n = n.min(self.wire.len());
        self.inbox.extend(self.wire.drain(..n));
        let mut replies = BytesMut::new();
        self.out.resize(room, 0);
        let read_before = self.read.len();
        let ok = loop {
            if self.closed || self.inbox.is_empty() {
                break true;
            }
            let r = if room > 0 {
                match pair.open_to(self.to, &self.inbox, &mut self.out, &mut replies) {
                    Ok(Some((n, read))) => Ok((n, read)),
                    Ok(None) => pair.open(self.to, &mut self.inbox, &mut replies),
                    Err(e) => Err(e),
                }
            } else {
                pair.open(self.to, &mut self.inbox, &mut replies)
            };
            match r {
                Ok((0, _)) => break true,
                Ok((n, read)) => {
                    match read {
                        Read::Data(d) => self.read.extend_from_slice(d),
                        Read::Control => {}
                        Read::Closed => self.closed = true,
                    }
                    self.inbox.drain(..n);
                }
                Err(e) => {
                    assert!(!self.exact, "well-formed records failed: {e}");
                    break false;
                }
            }
        };
        back.extend_from_slice(&replies);
        if self.prefix {
            let new = self.read.get(read_before..).unwrap_or_default();
            assert!(
                self.sent.get(read_before..self.read.len()) == Some(new),
                "read bytes {read_before}..{} that were not sent",
                self.read.len()
            );
        }
        ok
    }
}

/// Direction `from` and the other one, whose wire carries the answers back.
fn both(dirs: &mut [Direction; 2], from: usize) -> (&mut Direction, &mut Direction) {
    let [a, b] = dirs;
    if from == 0 { (a, b) } else { (b, a) }
}

/// Deterministic filler, so the script spends its bytes on shape, not content.
fn pattern(n: usize, seed: u8) -> Vec<u8> {
    (0..n).map(|i| (i as u8).wrapping_mul(31) ^ seed).collect()
}

fuzz_target!(|data: &[u8]| {
    let mut pair = match Pair::new() {
        Ok(p) => p,
        Err(e) => panic!("the in-memory handshake failed: {e}"),
    };
    let mut s = Script(data);
    // [0]: to the server (sent by the client); [1]: to the client.
    let mut dirs = [Direction::new(End::Server), Direction::new(End::Client)];
    let mut failed = false;
    while !s.is_empty() && !failed {
        let op = s.byte();
        let from = if op & 0x10 == 0 { 0 } else { 1 };
        let from_end = dirs[1 - from].to;
        let d = &mut dirs[from];
        if d.close_sent && op & 7 < 5 {
            continue;
        }
        match op & 7 {
            0 => {
                let writes: Vec<Vec<u8>> = (0..1 + s.byte() % 4)
                    .map(|i| pattern(s.u16() % 40_000, i))
                    .collect();
                let refs: Vec<&[u8]> = writes.iter().map(Vec::as_slice).collect();
                let room = match s.byte() % 4 {
                    0 => 64 * 1024 + 1024,
                    1 => 16 * 1024 + 100,
                    _ => 23 + s.u16() % 4096,
                };
                match pair.seal(from_end, &refs, room, &mut d.wire) {
                    Ok(true) => d.sent.extend(writes.concat()),
                    // A destination too small for any record: nothing sealed, or only what was
                    // before it (key updates and whole records), whose data is not followed.
                    Ok(false) => {
                        d.exact = false;
                        d.prefix = false;
                    }
                    Err(e) => panic!("sealing failed: {e}"),
                }
            }
            1 => {
                let inner_type = s.byte();
                let padding = usize::from(s.byte() % 64) * usize::from(s.byte() % 5);
                let content = match s.byte() % 8 {
                    // Over the limit, or just at it.
                    0 => pattern(MAX_PLAINTEXT + usize::from(s.byte() % 4), inner_type),
                    n => {
                        let k = usize::from(s.byte()) * usize::from(n);
                        s.take(k).to_vec()
                    }
                };
                if pair
                    .seal_raw(from_end, &content, inner_type, padding, &mut d.wire)
                    .is_err()
                {
                    continue;
                }
                match inner_type {
                    // (RFC 8446 5.4: content, type and padding within 2^14 + 1 bytes.)
                    23 if content.len() + padding <= MAX_PLAINTEXT => {
                        d.sent.extend_from_slice(&content)
                    }
                    // A zero type: the real one is the content's last nonzero byte.
                    0 if content.iter().any(|&b| b != 0) => {
                        d.exact = false;
                        d.prefix = false;
                    }
                    _ => d.exact = false,
                }
            }
            2 => {
                if let Err(e) = pair.key_update(from_end, op & 0x20 != 0, &mut d.wire) {
                    panic!("key update failed: {e}");
                }
            }
            3 => {
                let mut out = BytesMut::new();
                pair.close(from_end, &mut out);
                d.wire.extend_from_slice(&out);
                d.close_sent = true;
            }
            4 => {
                let n = usize::from(s.byte() % 32);
                d.wire.extend_from_slice(s.take(n));
                d.exact = false;
            }
            5 => {
                let at = s.u16();
                if !d.wire.is_empty() {
                    let i = at % d.wire.len();
                    d.wire[i] ^= 1 << (op >> 5);
                    d.exact = false;
                }
            }
            6 => {
                let (n, room) = (s.u16() * 2, usize::from(s.byte()) * 80);
                let (there, back) = both(&mut dirs, from);
                failed = !there.deliver(&mut pair, n, room, &mut back.wire);
            }
            _ => pair.set_key_update_interval(from_end, u64::from(s.byte() % 16)),
        }
    }
    // Everything left arrives, in pieces of one size (replies may come back on the way).
    let piece = 64 + usize::from(s.byte()) * 300;
    let room = usize::from(s.byte()) * 80;
    while !failed && dirs.iter().any(|d| !d.wire.is_empty() && !d.closed) {
        for from in 0..2 {
            let (there, back) = both(&mut dirs, from);
            if !there.closed && !there.deliver(&mut pair, piece, room, &mut back.wire) {
                failed = true;
                break;
            }
        }
    }
    if !failed {
        for d in &dirs {
            if d.exact {
                assert!(
                    d.read == d.sent,
                    "{:?}: read {} of {} bytes",
                    d.to,
                    d.read.len(),
                    d.sent.len()
                );
                assert_eq!(d.closed, d.close_sent, "{:?}: close_notify", d.to);
            }
        }
    }
});
