//! In-memory tests of the tunnel state machine: two connections wired back to back, with
//! simulated time. Nothing here sleeps or touches a socket.

// Tests start from an arbitrary instant (the one read of the clock); time then moves only as
// they say.
#![allow(clippy::disallowed_methods)]

use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};

use super::conn::{Config, ConnError, Connection, Event, Framed, Side, StreamError, code};
use super::frame::{HEADER_LEN, StreamId};

struct Pair {
    agent: Connection,
    proxy: Connection,
    now: Instant,
}

impl Pair {
    fn new(config: Config) -> Self {
        let now = Instant::now();
        let mut p = Pair {
            agent: Connection::new(Side::Dialer, config.clone(), now),
            proxy: Connection::new(Side::Listener, config, now),
            now,
        };
        p.drive();
        // Each side pings as the peer's hello arrives (a first round-trip time); simulated time
        // stands still, so it is zero here.
        assert_eq!(p.agent.poll_event(), Some(Event::Ready));
        assert_eq!(p.proxy.poll_event(), Some(Event::Ready));
        let rtt0 = Event::Pong {
            rtt: Duration::ZERO,
        };
        assert_eq!(p.agent.poll_event(), Some(rtt0.clone()));
        assert_eq!(p.proxy.poll_event(), Some(rtt0));
        p
    }

    /// Move bytes both ways until both are quiet.
    fn drive(&mut self) {
        loop {
            let mut moved = false;
            if let Some(b) = self.agent.poll_transmit() {
                self.proxy.handle_input(&b, self.now).unwrap();
                moved = true;
            }
            if let Some(b) = self.proxy.poll_transmit() {
                self.agent.handle_input(&b, self.now).unwrap();
                moved = true;
            }
            if !moved {
                break;
            }
        }
    }

    fn events(c: &mut Connection) -> Vec<Event> {
        std::iter::from_fn(|| c.poll_event()).collect()
    }

    /// Proxy opens a stream to the agent, which accepts it.
    fn open(&mut self, target: &str) -> u32 {
        let id = self.proxy.open(target, Bytes::from_static(b"{}")).unwrap();
        self.drive();
        let ev = Self::events(&mut self.agent);
        assert_eq!(
            ev,
            vec![Event::Incoming {
                stream: id,
                target: target.into(),
                metadata: Bytes::from_static(b"{}")
            }]
        );
        self.agent.accept(id).unwrap();
        self.drive();
        assert_eq!(
            Self::events(&mut self.proxy),
            vec![Event::Accepted { stream: id }]
        );
        id
    }
}

fn data_of(events: &[Event]) -> Vec<u8> {
    events
        .iter()
        .filter_map(|e| match e {
            Event::Data { data, .. } => Some(data.to_vec()),
            _ => None,
        })
        .flatten()
        .collect()
}

#[test]
fn open_exchange_and_close_both_ways() {
    let mut p = Pair::new(Config::default());
    let id = p.open("ssh");
    assert_eq!(id, 2, "the proxy opens even streams");
    assert_eq!(p.proxy.send(id, b"SSH-2.0-client\r\n").unwrap(), 16);
    p.drive();
    let ev = Pair::events(&mut p.agent);
    assert_eq!(data_of(&ev), b"SSH-2.0-client\r\n");
    p.agent.send(id, b"SSH-2.0-server\r\n").unwrap();
    p.agent.finish(id).unwrap();
    p.drive();
    let ev = Pair::events(&mut p.proxy);
    assert_eq!(data_of(&ev), b"SSH-2.0-server\r\n");
    assert_eq!(ev.last(), Some(&Event::Finished { stream: id }));
    // Half-closed: the proxy can still send.
    p.proxy.send(id, b"more").unwrap();
    p.proxy.finish(id).unwrap();
    p.drive();
    let ev = Pair::events(&mut p.agent);
    assert_eq!(data_of(&ev), b"more");
    assert_eq!(ev.last(), Some(&Event::Finished { stream: id }));
    assert_eq!(p.agent.open_streams(), 0);
    assert_eq!(p.proxy.open_streams(), 0);
    assert_eq!(p.agent.send(id, b"x"), Err(StreamError::UnknownStream(id)));
}

#[test]
fn reject_and_reset() {
    let mut p = Pair::new(Config::default());
    let id = p.proxy.open("tcp:nope", Bytes::new()).unwrap();
    p.drive();
    assert!(matches!(
        Pair::events(&mut p.agent)[..],
        [Event::Incoming { .. }]
    ));
    p.agent.reject(id, code::NOT_FOUND, "no app named nope");
    p.drive();
    assert_eq!(
        Pair::events(&mut p.proxy),
        vec![Event::Rejected {
            stream: id,
            code: code::NOT_FOUND,
            message: "no app named nope".into()
        }]
    );
    let id = p.open("ssh");
    p.agent.reset(id, code::CANCELLED);
    p.drive();
    assert_eq!(
        Pair::events(&mut p.proxy),
        vec![Event::Reset {
            stream: id,
            code: code::CANCELLED
        }]
    );
    assert_eq!(p.proxy.open_streams(), 0);
}

#[test]
fn flow_control_blocks_the_writer_until_the_reader_consumes() {
    let config = Config {
        initial_window: 64 * 1024,
        ..Config::default()
    };
    let mut p = Pair::new(config);
    let id = p.open("ssh");
    let chunk = vec![7u8; 100 * 1024];
    let n = p.proxy.send(id, &chunk).unwrap();
    assert_eq!(n, 64 * 1024, "no more than the window is in flight");
    assert_eq!(p.proxy.send(id, &chunk).unwrap(), 0);
    p.drive();
    let got = data_of(&Pair::events(&mut p.agent));
    assert_eq!(got.len(), 64 * 1024);
    assert!(
        Pair::events(&mut p.proxy).is_empty(),
        "no credit yet, so no writable"
    );
    // The agent's app consumes a quarter: below the half-window threshold, no credit yet.
    p.agent.consumed(id, 16 * 1024, p.now);
    p.drive();
    assert!(Pair::events(&mut p.proxy).is_empty());
    p.agent.consumed(id, 48 * 1024, p.now);
    p.drive();
    assert_eq!(
        Pair::events(&mut p.proxy),
        vec![Event::Writable { stream: id }]
    );
    assert_eq!(p.proxy.send(id, &chunk).unwrap(), 64 * 1024);
}

/// The agent's round-trip time becomes about `rtt` (a ping answered that long after it left).
fn set_agent_rtt(p: &mut Pair, rtt: Duration) {
    for _ in 0..40 {
        p.now += Duration::from_secs(15);
        p.agent.handle_timeout(p.now).unwrap();
        p.proxy.handle_timeout(p.now).unwrap();
        let ping = p.agent.poll_transmit().unwrap();
        p.proxy.handle_input(&ping, p.now).unwrap();
        p.now += rtt;
        p.drive();
        Pair::events(&mut p.agent);
        Pair::events(&mut p.proxy);
    }
    let srtt = p.agent.rtt().unwrap();
    assert!(srtt > rtt * 9 / 10 && srtt <= rtt, "{srtt:?}");
}

/// The proxy sends all it may on `id`, the agent receives it and its app consumes it
/// `after` the data arrived. Returns how much was in flight (the window the agent granted).
fn window_round(p: &mut Pair, id: u32, after: Duration) -> usize {
    let chunk = vec![1u8; 8 << 20];
    let mut sent = 0;
    loop {
        let n = p.proxy.send(id, &chunk).unwrap();
        if n == 0 {
            break;
        }
        sent += n;
        p.drive();
    }
    let got = data_of(&Pair::events(&mut p.agent)).len();
    assert_eq!(got, sent);
    p.now += after;
    p.agent.consumed(id, got, p.now);
    p.drive();
    Pair::events(&mut p.proxy);
    sent
}

#[test]
fn windows_grow_while_the_reader_keeps_up_and_only_then() {
    let config = Config {
        initial_window: 64 * 1024,
        max_window: 512 * 1024,
        ..Config::default()
    };
    let rtt = Duration::from_millis(20);

    // A reader that consumes everything within a round trip: the window doubles per grant
    // (the first grant only starts the clock) up to max_window.
    let mut p = Pair::new(config.clone());
    set_agent_rtt(&mut p, rtt);
    let id = p.open("ssh");
    let in_flight: Vec<usize> = (0..7).map(|_| window_round(&mut p, id, rtt / 4)).collect();
    assert_eq!(
        in_flight,
        [64, 64, 128, 256, 512, 512, 512].map(|k| k * 1024),
        "window per round"
    );

    // A reader slower than two round trips per half window: the window stays.
    let mut p = Pair::new(config.clone());
    set_agent_rtt(&mut p, rtt);
    let id = p.open("ssh");
    for _ in 0..5 {
        assert_eq!(window_round(&mut p, id, rtt * 3), 64 * 1024);
    }

    // No round-trip time measured (simulated time stood still): fixed windows.
    let mut p = Pair::new(config);
    let id = p.open("ssh");
    for _ in 0..5 {
        assert_eq!(window_round(&mut p, id, Duration::ZERO), 64 * 1024);
    }
}

/// Frames `c` has queued for the transport.
fn queued_frames(c: &mut Connection) -> Vec<super::frame::Frame> {
    let mut wire = BytesMut::new();
    while let Some(b) = c.poll_transmit() {
        wire.extend_from_slice(&b);
    }
    std::iter::from_fn(|| super::frame::Frame::decode(&mut wire, 1 << 20).unwrap()).collect()
}

#[test]
fn window_grants_sample_the_round_trip_under_load() {
    use super::frame::Frame;
    let mut p = Pair::new(Config::default());
    let id = p.open("ssh");
    // The idle sample from the hello is a while old when data starts to flow.
    p.now += Duration::from_secs(1);
    let half = vec![0u8; 128 * 1024];
    let grant = |p: &mut Pair| {
        assert_eq!(p.proxy.send(id, &half).unwrap(), half.len());
        p.drive();
        Pair::events(&mut p.agent);
        p.now += Duration::from_millis(4);
        p.agent.consumed(id, half.len(), p.now);
        queued_frames(&mut p.agent)
    };
    // The first grant carries a ping; its pong comes back 30 ms later (say, behind the
    // sender's queue): the smoothed RTT moves an eighth of the way from the idle sample (0).
    let frames = grant(&mut p);
    assert!(
        matches!(frames[..], [Frame::Window { .. }, Frame::Ping { opaque }] if opaque == 2),
        "{frames:?}"
    );
    p.proxy.handle_input(&encode(&frames[1..]), p.now).unwrap();
    p.now += Duration::from_millis(30);
    p.drive();
    assert_eq!(p.agent.rtt(), Some(Duration::from_micros(3750)));
    // Grants within 10 ms of that sample carry none; the next one after does.
    let frames = grant(&mut p);
    assert!(matches!(frames[..], [Frame::Window { .. }]), "{frames:?}");
    p.proxy.handle_input(&encode(&frames), p.now).unwrap();
    p.now += Duration::from_millis(10);
    let frames = grant(&mut p);
    assert!(
        matches!(frames[..], [Frame::Window { .. }, Frame::Ping { .. }]),
        "{frames:?}"
    );
}

/// The wire bytes of `frames`, in order.
pub(super) fn encode(frames: &[super::frame::Frame]) -> Vec<u8> {
    let mut b = BytesMut::new();
    for f in frames {
        f.encode(&mut b);
    }
    b.to_vec()
}

#[test]
fn window_growth_is_bounded_per_connection_and_returned_when_a_stream_ends() {
    let config = Config {
        initial_window: 64 * 1024,
        max_window: 1024 * 1024,
        max_window_growth: 192 * 1024,
        ..Config::default()
    };
    let rtt = Duration::from_millis(20);
    let mut p = Pair::new(config);
    set_agent_rtt(&mut p, rtt);
    let a = p.open("a");
    let b = p.open("b");
    // Stream a takes the whole budget: 64 + 64 + 128 = 256 KiB.
    let in_flight: Vec<usize> = (0..5).map(|_| window_round(&mut p, a, rtt / 4)).collect();
    assert_eq!(in_flight, [64, 64, 128, 256, 256].map(|k| k * 1024));
    // Stream b is as fast, but nothing is left to grow by.
    let in_flight: Vec<usize> = (0..4).map(|_| window_round(&mut p, b, rtt / 4)).collect();
    assert_eq!(in_flight, [64; 4].map(|k| k * 1024));
    // Stream a ends: its growth returns, and b grows.
    p.proxy.reset(a, code::CANCELLED);
    p.drive();
    Pair::events(&mut p.agent);
    let in_flight: Vec<usize> = (0..3).map(|_| window_round(&mut p, b, rtt / 4)).collect();
    assert_eq!(in_flight, [64, 128, 256].map(|k| k * 1024));
}

#[test]
fn a_reader_that_never_reads_bounds_the_writers_memory() {
    let config = Config {
        initial_window: 1 << 30,
        max_buffered: 256 * 1024,
        ..Config::default()
    };
    let now = Instant::now();
    let mut proxy = Connection::new(Side::Listener, config.clone(), now);
    let mut agent = Connection::new(Side::Dialer, config, now);
    proxy
        .handle_input(&agent.poll_transmit().unwrap(), now)
        .unwrap();
    agent
        .handle_input(&proxy.poll_transmit().unwrap(), now)
        .unwrap();
    let id = proxy.open("ssh", Bytes::new()).unwrap();
    agent
        .handle_input(&proxy.poll_transmit().unwrap(), now)
        .unwrap();
    agent.accept(id).unwrap();
    proxy
        .handle_input(&agent.poll_transmit().unwrap(), now)
        .unwrap();
    // The transport never drains: `send` stops at the buffer cap.
    let chunk = vec![0u8; 64 * 1024];
    let mut total = 0;
    for _ in 0..100 {
        total += proxy.send(id, &chunk).unwrap();
    }
    // The cap counts encoded bytes (headers included), so a little less than 256 KiB of data.
    assert!(
        total <= 256 * 1024 && total > 250 * 1024,
        "accepted {total}"
    );
    assert!(
        proxy.buffered_bytes() < 300 * 1024 + 4096,
        "buffered {}",
        proxy.buffered_bytes()
    );
}

#[test]
fn data_beyond_the_window_is_a_protocol_error_with_a_reason() {
    let config = Config {
        initial_window: 1024,
        ..Config::default()
    };
    let mut p = Pair::new(config);
    let id = p.open("ssh");
    // Forge an over-window data frame from the proxy side.
    let mut wire = bytes::BytesMut::new();
    super::frame::Frame::Data {
        stream: id,
        data: Bytes::from(vec![0u8; 2048]),
    }
    .encode(&mut wire);
    let err = p.agent.handle_input(&wire, p.now).unwrap_err();
    assert!(
        matches!(&err, ConnError::Protocol(m) if m.contains("flow control")),
        "{err}"
    );
    // The agent tells the proxy why, with a go-away, and refuses everything after.
    let goodbye = p.agent.poll_transmit().unwrap();
    p.proxy.handle_input(&goodbye, p.now).unwrap_err();
    assert!(Pair::events(&mut p.proxy).iter().any(|e| matches!(e, Event::GoAway { code: code::PROTOCOL, message } if message.contains("flow control"))));
    assert!(p.agent.is_closed());
    assert_eq!(p.agent.open("ssh", Bytes::new()), Err(StreamError::Closed));
}

#[test]
fn garbage_and_frames_before_hello_are_refused() {
    let now = Instant::now();
    let mut c = Connection::new(Side::Listener, Config::default(), now);
    let err = c
        .handle_input(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", now)
        .unwrap_err();
    assert!(matches!(err, ConnError::Frame(_)), "{err}");
    let mut c = Connection::new(Side::Listener, Config::default(), now);
    let mut wire = bytes::BytesMut::new();
    super::frame::Frame::Ping { opaque: 1 }.encode(&mut wire);
    assert!(
        matches!(c.handle_input(&wire, now), Err(ConnError::Protocol(m)) if m.contains("before hello"))
    );
}

#[test]
fn peer_streams_must_use_their_parity_and_increase() {
    let mut p = Pair::new(Config::default());
    let mut wire = bytes::BytesMut::new();
    // The agent (dialer) may only open odd streams.
    super::frame::Frame::Open {
        stream: 4,
        target: "x".into(),
        metadata: Bytes::new(),
    }
    .encode(&mut wire);
    assert!(p.proxy.handle_input(&wire, p.now).is_err());
    let mut p = Pair::new(Config::default());
    let a = p.agent.open("auth", Bytes::new()).unwrap();
    assert_eq!(a, 1);
    p.drive();
    let mut wire = bytes::BytesMut::new();
    super::frame::Frame::Open {
        stream: 1,
        target: "again".into(),
        metadata: Bytes::new(),
    }
    .encode(&mut wire);
    assert!(
        p.proxy.handle_input(&wire, p.now).is_err(),
        "reusing a stream id is refused"
    );
    let mut p = Pair::new(Config::default());
    let mut wire = bytes::BytesMut::new();
    super::frame::Frame::Data {
        stream: 9,
        data: Bytes::from_static(b"x"),
    }
    .encode(&mut wire);
    assert!(
        matches!(p.proxy.handle_input(&wire, p.now), Err(ConnError::Protocol(m)) if m.contains("never opened"))
    );
}

#[test]
fn too_many_streams_are_refused_without_killing_the_tunnel() {
    let mut p = Pair::new(Config {
        max_streams: 2,
        ..Config::default()
    });
    p.open("a");
    p.open("b");
    let id = p.proxy.open("c", Bytes::new()).unwrap();
    p.drive();
    assert!(Pair::events(&mut p.agent).is_empty());
    assert!(
        matches!(&Pair::events(&mut p.proxy)[..], [Event::Rejected { stream, code: code::TOO_MANY_STREAMS, .. }] if *stream == id)
    );
    assert!(!p.proxy.is_closed() && !p.agent.is_closed());
}

#[test]
fn pings_keep_a_quiet_tunnel_alive_and_silence_times_it_out() {
    let config = Config {
        ping_interval: Duration::from_secs(10),
        idle_timeout: Duration::from_secs(30),
        ..Config::default()
    };
    let mut p = Pair::new(config);
    for _ in 0..10 {
        p.now = p
            .agent
            .poll_timeout()
            .unwrap()
            .min(p.proxy.poll_timeout().unwrap());
        p.agent.handle_timeout(p.now).unwrap();
        p.proxy.handle_timeout(p.now).unwrap();
        p.drive();
    }
    assert!(
        Pair::events(&mut p.agent)
            .iter()
            .any(|e| matches!(e, Event::Pong { .. }))
    );
    // Now the proxy goes silent: the agent times out after 30 s and says why.
    let start = p.now;
    loop {
        let t = p.agent.poll_timeout().unwrap();
        p.now = t;
        match p.agent.handle_timeout(t) {
            Ok(()) => {
                let _ = p.agent.poll_transmit();
            }
            Err(e) => {
                assert_eq!(e, ConnError::IdleTimeout(Duration::from_secs(30)));
                break;
            }
        }
    }
    assert!(p.now.duration_since(start) <= Duration::from_secs(30));
}

#[test]
fn go_away_stops_new_streams_but_lets_open_ones_finish() {
    let mut p = Pair::new(Config::default());
    let id = p.open("ssh");
    p.proxy.go_away(code::GOING_AWAY, "proxy restarting");
    p.drive();
    assert!(Pair::events(&mut p.agent).contains(&Event::GoAway {
        code: code::GOING_AWAY,
        message: "proxy restarting".into()
    }));
    assert_eq!(p.agent.open("x", Bytes::new()), Err(StreamError::GoingAway));
    assert_eq!(p.proxy.open("x", Bytes::new()), Err(StreamError::GoingAway));
    p.agent.send(id, b"still here").unwrap();
    p.drive();
    assert_eq!(data_of(&Pair::events(&mut p.proxy)), b"still here");
}

#[test]
fn heartbeats_are_delivered() {
    let mut p = Pair::new(Config::default());
    p.agent
        .send_heartbeat(Bytes::from_static(b"{\"name\":\"node1\"}"));
    p.drive();
    assert_eq!(
        Pair::events(&mut p.proxy),
        vec![Event::Heartbeat {
            inventory: Bytes::from_static(b"{\"name\":\"node1\"}")
        }]
    );
}

/// `payload` behind room for a frame header, as `send_framed` takes it.
fn with_room(payload: &[u8]) -> Vec<u8> {
    let mut b = vec![0; HEADER_LEN];
    b.extend_from_slice(payload);
    b
}

/// `send_framed` of all of `buf`'s payload: (bytes taken, the rest).
fn framed_send(c: &mut Connection, id: StreamId, buf: Vec<u8>) -> (usize, Bytes) {
    let len = buf.len() - HEADER_LEN;
    match c.send_framed(id, buf, len).unwrap() {
        Framed::Sent { n, rest } => (n, rest),
        Framed::Blocked(_) => (0, Bytes::new()),
    }
}

/// Everything `c` has queued for the transport, in order.
fn drain(c: &mut Connection) -> Vec<u8> {
    std::iter::from_fn(|| c.poll_transmit()).flatten().collect()
}

#[test]
fn framed_sends_put_the_same_bytes_on_the_wire_in_the_same_order() {
    let payload: Vec<u8> = (0..20_000u32).map(|i| (i * 7) as u8).collect();
    let mut copied = Pair::new(Config::default());
    let mut framed = Pair::new(Config::default());
    let a = copied.open("app");
    let b = framed.open("app");
    assert_eq!(a, b);
    // A control frame before, a data frame, another control frame and data after.
    copied.proxy.send_heartbeat(Bytes::from_static(b"inv"));
    framed.proxy.send_heartbeat(Bytes::from_static(b"inv"));
    assert_eq!(copied.proxy.send(a, &payload).unwrap(), payload.len());
    let (n, rest) = framed_send(&mut framed.proxy, b, with_room(&payload));
    assert_eq!(n, payload.len());
    assert!(rest.is_empty());
    copied.proxy.send_heartbeat(Bytes::from_static(b"inv2"));
    framed.proxy.send_heartbeat(Bytes::from_static(b"inv2"));
    copied.proxy.send(a, b"tail").unwrap();
    framed_send(&mut framed.proxy, b, with_room(b"tail"));
    let wire = drain(&mut framed.proxy);
    assert_eq!(
        drain(&mut copied.proxy),
        wire,
        "framed and copied sends encode alike"
    );
    // And the peer reads it all.
    framed.agent.handle_input(&wire, framed.now).unwrap();
    let events = Pair::events(&mut framed.agent);
    let mut expected = payload.clone();
    expected.extend_from_slice(b"tail");
    assert_eq!(data_of(&events), expected);
    assert_eq!(
        events
            .iter()
            .filter(|e| matches!(e, Event::Heartbeat { .. }))
            .count(),
        2
    );
}

#[test]
fn a_framed_send_takes_what_credit_and_frame_size_allow_and_leaves_the_rest() {
    let config = Config {
        initial_window: 48 * 1024,
        max_frame: 32 * 1024,
        ..Config::default()
    };
    let max_frame = config.max_frame as usize;
    let mut p = Pair::new(config);
    let id = p.open("app");
    let payload: Vec<u8> = (0..100 * 1024u32).map(|i| (i % 251) as u8).collect();
    // One frame at most per call.
    let (n, rest) = framed_send(&mut p.proxy, id, with_room(&payload));
    assert_eq!(n, max_frame);
    assert_eq!(&rest[..], &payload[max_frame..], "the rest comes back");
    // Credit left: 48 KiB - one frame; the rest goes through `send`.
    let n = p.proxy.send(id, &rest).unwrap();
    assert_eq!(n, 48 * 1024 - max_frame);
    assert_eq!(p.proxy.send(id, &rest[n..]).unwrap(), 0, "window exhausted");
    match p.proxy.send_framed(id, with_room(&payload), payload.len()) {
        Ok(Framed::Blocked(more)) => {
            assert_eq!(more, with_room(&payload), "nothing taken: untouched")
        }
        other => panic!("{other:?}"),
    }
    p.drive();
    assert_eq!(
        data_of(&Pair::events(&mut p.agent)),
        payload[..48 * 1024].to_vec()
    );
}

#[test]
fn framed_sends_stop_at_the_buffer_cap_when_the_transport_never_drains() {
    let config = Config {
        initial_window: 1 << 30,
        max_buffered: 256 * 1024,
        ..Config::default()
    };
    let mut p = Pair::new(config);
    let id = p.open("app");
    let mut total = 0;
    for _ in 0..100 {
        total += framed_send(&mut p.proxy, id, with_room(&[1u8; 32 * 1024])).0;
    }
    assert!(
        total <= 256 * 1024 && total > 200 * 1024,
        "accepted {total}"
    );
    assert!(
        p.proxy.buffered_bytes() <= 256 * 1024 + 32 * 1024 + HEADER_LEN,
        "buffered {}",
        p.proxy.buffered_bytes()
    );
}
