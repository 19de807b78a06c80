//! Arbitrary bytes from a peer into a tunnel connection, after a valid hello so the fuzzer
//! spends its time on frames: in pieces, through both input paths, with the application
//! accepting or refusing what it is offered, sending, consuming what arrives and opening streams
//! of its own, and time moving. Never a panic, and once the connection has failed it stays
//! closed.
#![no_main]

use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use gatehouse_proto::tunnel::{Config, Connection, Event, Frame, Side};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&knobs, bytes)) = data.split_first() else {
        return;
    };
    let side = if knobs & 1 == 0 {
        Side::Listener
    } else {
        Side::Dialer
    };
    let piece = usize::from(knobs >> 2).max(1) * 7;
    let lend = knobs & 2 == 2;
    let config = Config {
        initial_window: 4096,
        max_window: 16 * 1024,
        max_frame: 2048,
        max_streams: 16,
        max_buffered: 8 * 1024,
        ..Config::default()
    };
    let mut now = Instant::now();
    let mut c = Connection::new(side, config, now);
    let mut wire = BytesMut::new();
    Frame::Hello {
        version: 1,
        initial_window: 4096,
        max_frame: 4096,
    }
    .encode(&mut wire);
    wire.extend_from_slice(bytes);
    let mut failed = false;
    for chunk in wire.chunks(piece) {
        now += Duration::from_millis(3);
        let r = if lend {
            let room = c.input_buffer(chunk.len());
            room[..chunk.len()].copy_from_slice(chunk);
            c.input_filled(chunk.len());
            c.process_input(now)
        } else {
            c.handle_input(chunk, now)
        };
        if r.is_err() {
            failed = true;
        }
        if failed {
            assert!(c.is_closed(), "failed but not closed");
        }
        while let Some(ev) = c.poll_event() {
            match ev {
                Event::Incoming { stream, .. } => {
                    if stream % 3 == 0 {
                        c.reject(stream, 1, "no");
                    } else {
                        let _ = c.accept(stream);
                        let _ = c.send(stream, &[7u8; 3000]);
                    }
                }
                Event::Data { stream, data } => c.consumed(stream, data.len(), now),
                Event::Finished { stream } => {
                    let _ = c.finish(stream);
                }
                _ => {}
            }
        }
        if c.is_ready() && !failed && chunk.len() % 5 == 0 {
            let _ = c.open("app", Bytes::from_static(b"{}"));
        }
        let _ = c.handle_timeout(now);
        while c.poll_transmit().is_some() {}
    }
});
