//! A randomized model test of the tunnel protocol. Two connections, each with a configuration of
//! its own, are driven by arbitrary sequences of what their applications do (open, send by copy
//! or in place, consume, finish, reset, heartbeat, go away), of transport deliveries cut into
//! arbitrary pieces (through both input paths), and of time passing. Each transport takes only so
//! much before it pushes back, like a socket's buffer.
//!
//! Between two well-behaved peers nothing may fail, and:
//! - every stream's bytes arrive in order and intact, and all of them before their sender's fin;
//! - no stream ever holds more unconsumed bytes than its receiver's largest window;
//! - what waits for a pushed-back transport stays within the connection's cap;
//! - once both applications have finished and read everything, neither connection keeps a
//!   stream.

// Tests start from an arbitrary instant (the one read of the clock); time then moves only as
// they say.
#![allow(clippy::disallowed_methods)]

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::time::{Duration, Instant};

use bytes::Bytes;
use proptest::prelude::*;

use super::conn::{Config, Connection, Event, Framed, Side, StreamError, code};
use super::frame::{HEADER_LEN, StreamId};

#[derive(Debug, Clone)]
enum Action {
    Open {
        side: usize,
    },
    Send {
        side: usize,
        pick: usize,
        len: usize,
        framed: bool,
    },
    Consume {
        side: usize,
        pick: usize,
        len: usize,
    },
    Finish {
        side: usize,
        pick: usize,
    },
    Reset {
        side: usize,
        pick: usize,
    },
    /// Move up to `max` of the bytes `side` has written to its peer, in `pieces` reads.
    Deliver {
        side: usize,
        max: usize,
        pieces: usize,
        lend: bool,
    },
    Tick {
        ms: u64,
    },
    Heartbeat {
        side: usize,
    },
    GoAway {
        side: usize,
    },
}

fn action() -> impl Strategy<Value = Action> {
    let side = 0usize..2;
    prop_oneof![
        2 => side.clone().prop_map(|side| Action::Open { side }),
        6 => (side.clone(), any::<usize>(), 1usize..20_000, any::<bool>())
            .prop_map(|(side, pick, len, framed)| Action::Send { side, pick, len, framed }),
        4 => (side.clone(), any::<usize>(), 1usize..20_000)
            .prop_map(|(side, pick, len)| Action::Consume { side, pick, len }),
        1 => (side.clone(), any::<usize>()).prop_map(|(side, pick)| Action::Finish { side, pick }),
        1 => (side.clone(), any::<usize>()).prop_map(|(side, pick)| Action::Reset { side, pick }),
        6 => (side.clone(), 1usize..40_000, 1usize..6, any::<bool>())
            .prop_map(|(side, max, pieces, lend)| Action::Deliver { side, max, pieces, lend }),
        2 => (0u64..200).prop_map(|ms| Action::Tick { ms }),
        1 => side.clone().prop_map(|side| Action::Heartbeat { side }),
        1 => side.prop_map(|side| Action::GoAway { side }),
    ]
}

fn config() -> impl Strategy<Value = Config> {
    (
        256u32..262_144,
        0u32..4,
        0u64..1024 * 1024,
        1024u32..16_384,
        2048usize..64 * 1024,
        1u64..20,
    )
        .prop_map(
            |(initial, doublings, growth, max_frame, buffered, ping_s)| Config {
                initial_window: initial,
                max_window: initial << doublings,
                max_window_growth: growth,
                max_frame,
                max_streams: 8,
                max_buffered: buffered,
                ping_interval: Duration::from_secs(ping_s),
                // Time passes by at most 200 ms per action here; idle timeouts have their own test.
                idle_timeout: Duration::from_secs(3600),
            },
        )
}

/// The byte at `offset` of what `side` sends on `stream`.
fn byte_at(side: usize, stream: StreamId, offset: u64) -> u8 {
    (offset.wrapping_mul(31) ^ (offset >> 9) ^ (u64::from(stream) * 7 + side as u64 * 101)) as u8
}

fn bytes_at(side: usize, stream: StreamId, from: u64, len: usize) -> Vec<u8> {
    (from..from + len as u64)
        .map(|o| byte_at(side, stream, o))
        .collect()
}

#[derive(Debug, Default)]
struct StreamModel {
    /// Opened by this side and not yet accepted.
    opening: bool,
    /// Bytes the connection took from this side's application.
    sent: u64,
    /// This side finished (sent its fin).
    finished: bool,
    /// Bytes received from the peer, and of those not yet consumed.
    received: u64,
    unconsumed: u64,
    /// The peer finished and everything it sent arrived.
    peer_finished: bool,
}

struct End {
    conn: Connection,
    config: Config,
    streams: BTreeMap<StreamId, StreamModel>,
    /// Written by this side, not yet delivered to the peer.
    wire: VecDeque<u8>,
    /// The peer said it goes away (or this side did): open nothing new.
    draining: bool,
    /// How much the transport takes before it pushes back (a socket's buffer).
    room: usize,
    /// Actions since the transport last took everything the connection had queued.
    backlogged: usize,
}

struct Model {
    ends: [End; 2],
    now: Instant,
    /// Decides whether an incoming stream is accepted (bit `stream % 64`).
    accept_bits: u64,
    /// Bytes each side's application handed over per stream, kept after the stream is gone.
    sent_total: HashMap<(usize, StreamId), u64>,
    /// Streams that ended by a reset or a refusal: what arrived is only a prefix.
    cut: std::collections::HashSet<StreamId>,
}

impl Model {
    fn new(configs: [Config; 2], rooms: [usize; 2], accept_bits: u64) -> Self {
        let now = Instant::now();
        let end = |side: usize, config: &Config| End {
            conn: Connection::new(
                if side == 0 {
                    Side::Dialer
                } else {
                    Side::Listener
                },
                config.clone(),
                now,
            ),
            config: config.clone(),
            streams: BTreeMap::new(),
            wire: VecDeque::new(),
            draining: false,
            room: rooms[side],
            backlogged: 0,
        };
        let [a, b] = &configs;
        let mut m = Model {
            ends: [end(0, a), end(1, b)],
            now,
            accept_bits,
            sent_total: HashMap::new(),
            cut: Default::default(),
        };
        m.collect(0);
        m.collect(1);
        m
    }

    /// Take what `side`'s connection wants to write, while the transport has room.
    fn collect(&mut self, side: usize) {
        let end = &mut self.ends[side];
        while end.wire.len() < end.room {
            match end.conn.poll_transmit() {
                Some(b) => end.wire.extend(b.iter()),
                None => {
                    end.backlogged = 0;
                    break;
                }
            }
        }
    }

    /// Pick the `pick`-th (modulo) of `side`'s streams that `ok` accepts.
    fn pick(
        &self,
        side: usize,
        pick: usize,
        ok: impl Fn(&StreamModel) -> bool,
    ) -> Option<StreamId> {
        let ids: Vec<StreamId> = self.ends[side]
            .streams
            .iter()
            .filter(|(_, s)| ok(s))
            .map(|(id, _)| *id)
            .collect();
        if ids.is_empty() {
            None
        } else {
            Some(ids[pick % ids.len()])
        }
    }

    fn apply(&mut self, action: &Action) -> Result<(), TestCaseError> {
        match *action {
            Action::Open { side } => {
                let end = &mut self.ends[side];
                if end.draining || !end.conn.is_ready() {
                    return Ok(());
                }
                let id = end
                    .conn
                    .open("app", Bytes::from_static(b"{}"))
                    .map_err(|e| TestCaseError::fail(format!("open: {e}")))?;
                end.streams.insert(
                    id,
                    StreamModel {
                        opening: true,
                        ..StreamModel::default()
                    },
                );
            }
            Action::Send {
                side,
                pick,
                len,
                framed,
            } => {
                let Some(id) = self.pick(side, pick, |s| !s.finished) else {
                    return Ok(());
                };
                let end = &mut self.ends[side];
                let s = end
                    .streams
                    .get_mut(&id)
                    .ok_or_else(|| TestCaseError::fail("stream"))?;
                let data = bytes_at(side, id, s.sent, len);
                let n = if framed {
                    let mut buf = vec![0u8; HEADER_LEN];
                    buf.extend_from_slice(&data);
                    match end.conn.send_framed(id, buf, len) {
                        Ok(Framed::Sent { n, .. }) => n,
                        Ok(Framed::Blocked(_)) => 0,
                        Err(e) => {
                            return Err(TestCaseError::fail(format!("send_framed {id}: {e}")));
                        }
                    }
                } else {
                    end.conn
                        .send(id, &data)
                        .map_err(|e| TestCaseError::fail(format!("send {id}: {e}")))?
                };
                prop_assert!(n <= len);
                prop_assert!(!s.opening || n == 0, "sent on a stream not yet accepted");
                s.sent += n as u64;
                *self.sent_total.entry((side, id)).or_default() += n as u64;
            }
            Action::Consume { side, pick, len } => {
                let Some(id) = self.pick(side, pick, |s| s.unconsumed > 0) else {
                    return Ok(());
                };
                self.consume(side, id, len as u64);
            }
            Action::Finish { side, pick } => {
                let Some(id) = self.pick(side, pick, |s| !s.finished && !s.opening) else {
                    return Ok(());
                };
                self.finish(side, id)?;
            }
            Action::Reset { side, pick } => {
                let Some(id) = self.pick(side, pick, |_| true) else {
                    return Ok(());
                };
                self.ends[side].conn.reset(id, code::CANCELLED);
                self.ends[side].streams.remove(&id);
                self.cut.insert(id);
            }
            Action::Deliver {
                side,
                max,
                pieces,
                lend,
            } => self.deliver(side, max, pieces, lend)?,
            Action::Tick { ms } => {
                self.now += Duration::from_millis(ms);
                for side in 0..2 {
                    let end = &mut self.ends[side];
                    if end.conn.poll_timeout().is_some_and(|t| t <= self.now) {
                        end.conn
                            .handle_timeout(self.now)
                            .map_err(|e| TestCaseError::fail(format!("timeout: {e}")))?;
                    }
                }
            }
            Action::Heartbeat { side } => {
                self.ends[side]
                    .conn
                    .send_heartbeat(Bytes::from_static(b"inventory"));
            }
            Action::GoAway { side } => {
                self.ends[side].conn.go_away(code::GOING_AWAY, "draining");
                self.ends[side].draining = true;
            }
        }
        for side in 0..2 {
            self.events(side)?;
            self.collect(side);
            // What waits for the transport is capped: data up to one frame past the cap, and
            // the small control frames (grants, pings, pongs, heartbeats, fins) of the actions
            // since the transport last took everything.
            let end = &mut self.ends[side];
            end.backlogged += 1;
            let cap = end.config.max_buffered
                + end.config.max_frame as usize
                + HEADER_LEN
                + 256 * end.backlogged;
            prop_assert!(
                end.conn.queued_bytes() <= cap,
                "side {} queues {} bytes, cap {}",
                side,
                end.conn.queued_bytes(),
                cap
            );
        }
        Ok(())
    }

    fn consume(&mut self, side: usize, id: StreamId, most: u64) {
        let now = self.now;
        let end = &mut self.ends[side];
        if let Some(s) = end.streams.get_mut(&id) {
            let n = most.min(s.unconsumed);
            s.unconsumed -= n;
            end.conn.consumed(id, n as usize, now);
        }
    }

    fn finish(&mut self, side: usize, id: StreamId) -> Result<(), TestCaseError> {
        let end = &mut self.ends[side];
        end.conn
            .finish(id)
            .map_err(|e| TestCaseError::fail(format!("finish {id}: {e}")))?;
        if let Some(s) = end.streams.get_mut(&id) {
            s.finished = true;
        }
        Ok(())
    }

    fn deliver(
        &mut self,
        side: usize,
        max: usize,
        pieces: usize,
        lend: bool,
    ) -> Result<(), TestCaseError> {
        self.collect(side);
        let n = max.min(self.ends[side].wire.len());
        let bytes: Vec<u8> = self.ends[side].wire.drain(..n).collect();
        let piece = n.div_ceil(pieces.max(1)).max(1);
        let now = self.now;
        let peer = &mut self.ends[1 - side].conn;
        for chunk in bytes.chunks(piece) {
            let r = if lend {
                // The driver's path: read into the room the connection lends.
                let room = peer.input_buffer(chunk.len());
                room[..chunk.len()].copy_from_slice(chunk);
                peer.input_filled(chunk.len());
                peer.process_input(now)
            } else {
                peer.handle_input(chunk, now)
            };
            r.map_err(|e| TestCaseError::fail(format!("side {} failed on input: {e}", 1 - side)))?;
        }
        Ok(())
    }

    /// Take `side`'s events and check each against the model.
    fn events(&mut self, side: usize) -> Result<(), TestCaseError> {
        let peer = 1 - side;
        while let Some(ev) = self.ends[side].conn.poll_event() {
            let end = &mut self.ends[side];
            match ev {
                Event::Ready
                | Event::Writable { .. }
                | Event::Heartbeat { .. }
                | Event::Pong { .. } => {}
                Event::Incoming { stream, target, .. } => {
                    prop_assert_eq!(target, "app");
                    prop_assert!(!end.streams.contains_key(&stream));
                    if (self.accept_bits >> (stream % 64)) & 1 == 1 {
                        match end.conn.accept(stream) {
                            Ok(()) => {
                                end.streams.insert(stream, StreamModel::default());
                            }
                            // The opener reset it before its open was answered: the reset is
                            // among the events still to come.
                            Err(StreamError::UnknownStream(_)) => {
                                self.cut.insert(stream);
                            }
                            Err(e) => return Err(TestCaseError::fail(format!("accept: {e}"))),
                        }
                    } else {
                        end.conn.reject(stream, 7, "not today");
                        self.cut.insert(stream);
                    }
                }
                Event::Accepted { stream } => {
                    let s = end.streams.get_mut(&stream);
                    prop_assert!(s.as_ref().is_some_and(|s| s.opening), "accepted {}", stream);
                    if let Some(s) = s {
                        s.opening = false;
                    }
                }
                Event::Rejected { stream, .. } => {
                    let s = end.streams.remove(&stream);
                    prop_assert!(s.is_some_and(|s| s.opening), "rejected {}", stream);
                    self.cut.insert(stream);
                }
                Event::Data { stream, data } => {
                    let max_window = u64::from(end.config.max_window);
                    let Some(s) = end.streams.get_mut(&stream) else {
                        return Err(TestCaseError::fail(format!(
                            "side {side}: data for stream {stream}, which it no longer has"
                        )));
                    };
                    prop_assert!(!s.peer_finished, "data after fin on {}", stream);
                    prop_assert_eq!(
                        &data[..],
                        &bytes_at(peer, stream, s.received, data.len())[..],
                        "stream {} from side {} at {}",
                        stream,
                        peer,
                        s.received
                    );
                    s.received += data.len() as u64;
                    s.unconsumed += data.len() as u64;
                    prop_assert!(
                        s.unconsumed <= max_window,
                        "stream {} holds {} unconsumed bytes, window at most {}",
                        stream,
                        s.unconsumed,
                        max_window
                    );
                }
                Event::Finished { stream } => {
                    let Some(s) = end.streams.get_mut(&stream) else {
                        return Err(TestCaseError::fail(format!(
                            "side {side}: fin for stream {stream}, which it no longer has"
                        )));
                    };
                    s.peer_finished = true;
                    let sent = self.sent_total.get(&(peer, stream)).copied().unwrap_or(0);
                    prop_assert_eq!(s.received, sent, "stream {} ended short", stream);
                }
                Event::Reset { stream, .. } => {
                    end.streams.remove(&stream);
                    self.cut.insert(stream);
                }
                Event::GoAway { .. } => end.draining = true,
            }
        }
        Ok(())
    }

    /// Both applications finish and read everything; the transport delivers it all.
    fn settle(&mut self) -> Result<(), TestCaseError> {
        for end in &mut self.ends {
            end.room = usize::MAX;
        }
        for _ in 0..10_000 {
            for side in 0..2 {
                let ids: Vec<(StreamId, bool, u64)> = self.ends[side]
                    .streams
                    .iter()
                    .map(|(id, s)| (*id, !s.finished && !s.opening, s.unconsumed))
                    .collect();
                for (id, finish, unconsumed) in ids {
                    if unconsumed > 0 {
                        self.consume(side, id, unconsumed);
                    }
                    if finish {
                        self.finish(side, id)?;
                    }
                }
                self.collect(side);
            }
            let quiet = self.ends.iter().all(|e| e.wire.is_empty());
            if quiet {
                break;
            }
            for side in 0..2 {
                self.deliver(side, usize::MAX, 1, false)?;
                for s in 0..2 {
                    self.events(s)?;
                    self.collect(s);
                }
            }
        }
        Ok(())
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 400, ..ProptestConfig::default() })]

    #[test]
    fn two_well_behaved_ends_never_fail_and_deliver_every_byte(
        configs in [config(), config()],
        rooms in [256usize..32 * 1024, 256usize..32 * 1024],
        accept_bits in any::<u64>(),
        actions in proptest::collection::vec(action(), 1..250),
    ) {
        let mut m = Model::new(configs, rooms, accept_bits);
        for a in &actions {
            m.apply(a)?;
        }
        m.settle()?;
        for (side, end) in m.ends.iter().enumerate() {
            prop_assert!(!end.conn.is_closed(), "side {} closed", side);
            for (id, s) in &end.streams {
                prop_assert!(s.finished && s.peer_finished && s.unconsumed == 0,
                    "side {}: stream {} not done: {:?}", side, id, s);
            }
            prop_assert_eq!(end.conn.open_streams(), 0, "side {} keeps streams", side);
        }
        // Every stream not cut by a reset or a refusal ended with a fin each way, and each fin
        // came after all the bytes its side sent (checked as the fin arrived).
        for (side, id) in m.sent_total.keys() {
            if !m.cut.contains(id) {
                let peer = &m.ends[1 - side].streams;
                prop_assert!(peer.get(id).is_some_and(|s| s.peer_finished),
                    "stream {} from side {} did not end at the peer", id, side);
            }
        }
    }
}
