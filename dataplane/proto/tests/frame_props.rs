//! Property tests of the tunnel decoder and state machine (run in CI, in place of a fuzzer
//! target): arbitrary bytes never panic, frames round-trip, and any split of the byte stream
//! decodes to the same frames.

// Test code: a failing unwrap or panic is a failing test, which is the point.
#![allow(
    clippy::disallowed_methods, // tests start from an arbitrary instant
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::time::Instant;

use bytes::{Bytes, BytesMut};
use gatehouse_proto::tunnel::{Config, Connection, Frame, Input, Side};
use proptest::prelude::*;

fn arb_frame() -> impl Strategy<Value = Frame> {
    let sid = 1u32..1000;
    let text = "\\PC{0,40}";
    let blob = proptest::collection::vec(any::<u8>(), 0..300).prop_map(Bytes::from);
    prop_oneof![
        (any::<u16>(), any::<u32>(), any::<u32>()).prop_map(|(v, w, m)| Frame::Hello {
            version: v,
            initial_window: w,
            max_frame: m
        }),
        (sid.clone(), text, blob.clone()).prop_map(|(stream, target, metadata)| Frame::Open {
            stream,
            target,
            metadata
        }),
        sid.clone().prop_map(|stream| Frame::OpenOk { stream }),
        (sid.clone(), any::<u16>(), "\\PC{0,40}").prop_map(|(stream, code, message)| {
            Frame::OpenErr {
                stream,
                code,
                message,
            }
        }),
        (sid.clone(), blob.clone()).prop_map(|(stream, data)| Frame::Data { stream, data }),
        (sid.clone(), any::<u32>())
            .prop_map(|(stream, increment)| Frame::Window { stream, increment }),
        sid.clone().prop_map(|stream| Frame::Fin { stream }),
        (sid, any::<u16>()).prop_map(|(stream, code)| Frame::Reset { stream, code }),
        any::<u64>().prop_map(|opaque| Frame::Ping { opaque }),
        any::<u64>().prop_map(|opaque| Frame::Pong { opaque }),
        blob.prop_map(|inventory| Frame::Heartbeat { inventory }),
        (any::<u32>(), any::<u16>(), "\\PC{0,40}").prop_map(|(last_stream, code, message)| {
            Frame::GoAway {
                last_stream,
                code,
                message,
            }
        }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 3000, ..ProptestConfig::default() })]

    #[test]
    fn decoder_never_panics_on_arbitrary_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..4096)) {
        let mut buf = BytesMut::from(&bytes[..]);
        while let Ok(Some(_)) = Frame::decode(&mut buf, 65_536) {}
    }

    #[test]
    fn frames_roundtrip_under_any_split(frames in proptest::collection::vec(arb_frame(), 1..20), cut in any::<prop::sample::Index>()) {
        let mut wire = BytesMut::new();
        for f in &frames {
            f.encode(&mut wire);
        }
        let wire = wire.freeze();
        let at = cut.index(wire.len() + 1);
        let mut buf = BytesMut::new();
        let mut got = vec![];
        for part in [&wire[..at], &wire[at..]] {
            buf.extend_from_slice(part);
            while let Some(f) = Frame::decode(&mut buf, 65_536).unwrap() {
                got.push(f);
            }
        }
        prop_assert_eq!(got, frames);
    }

    /// The tunnel's input buffer (what a connection decodes from) against the same: reads of
    /// any sizes written into the room it lends, with payloads kept alive across reads or
    /// dropped at once (the buffer is reused in place only when none is alive), and arbitrary
    /// bytes never panic it.
    #[test]
    fn the_input_buffer_decodes_the_same_frames_under_any_reads(
        frames in proptest::collection::vec(arb_frame(), 1..20),
        reads in proptest::collection::vec((1usize..700, any::<bool>()), 1..40),
        junk in proptest::collection::vec(any::<u8>(), 0..64),
    ) {
        let mut wire = BytesMut::new();
        for f in &frames {
            f.encode(&mut wire);
        }
        wire.extend_from_slice(&junk);
        let mut input = Input::default();
        let mut got = vec![];
        let mut kept = vec![];
        let mut at = 0;
        let mut turn = 0;
        'reading: while at < wire.len() {
            let (size, keep) = reads[turn % reads.len()];
            turn += 1;
            let room = input.room(size);
            prop_assert!(room.len() >= size);
            let n = size.min(wire.len() - at);
            room[..n].copy_from_slice(&wire[at..at + n]);
            input.filled(n);
            at += n;
            loop {
                match input.decode(65_536) {
                    Ok(Some(f)) if got.len() < frames.len() => {
                        if keep {
                            kept.push(f.clone());
                        }
                        got.push(f);
                    }
                    Ok(Some(_)) | Err(_) => break 'reading,
                    Ok(None) => break,
                }
            }
        }
        prop_assert_eq!(&got[..], &frames[..got.len()]);
        if junk.is_empty() {
            prop_assert_eq!(got.len(), frames.len());
        }
        // Payloads kept across later reads still hold their bytes.
        for f in &kept {
            prop_assert!(frames.contains(f));
        }
    }

    #[test]
    fn connection_survives_arbitrary_frames(frames in proptest::collection::vec(arb_frame(), 0..30), side in any::<bool>()) {
        let now = Instant::now();
        let side = if side { Side::Dialer } else { Side::Listener };
        let mut c = Connection::new(side, Config::default(), now);
        let mut wire = BytesMut::new();
        Frame::Hello { version: 1, initial_window: 65_536, max_frame: 16_384 }.encode(&mut wire);
        for f in &frames {
            f.encode(&mut wire);
        }
        // Any outcome is fine except a panic; after an error the connection stays closed.
        if c.handle_input(&wire, now).is_err() {
            prop_assert!(c.is_closed() || c.poll_transmit().is_some());
        }
        while c.poll_event().is_some() {}
        let _ = c.poll_transmit();
    }

    #[test]
    fn connection_survives_arbitrary_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
        let now = Instant::now();
        let mut c = Connection::new(Side::Listener, Config::default(), now);
        let _ = c.handle_input(&bytes, now);
    }
}
