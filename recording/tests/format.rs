//! The recording format end to end, in memory: written, read back in any pieces, verified,
//! damaged, cut short and sealed after a crash.

// Test code: a failing unwrap or panic is a failing test, which is the point.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use gatehouse_recording::{
    Chunk, Codec, EndInfo, Error, Event, Reader, SessionKind, SessionMeta, Signer, Writer,
    events_of, scan, verify,
};
use proptest::prelude::*;
use ssh_key::certificate::{Builder, CertType};
use ssh_key::{Algorithm, PrivateKey, PublicKey};

const START: u64 = 1_765_000_000_000;

fn host() -> (Signer, PublicKey) {
    let mut rng = rand::rngs::OsRng;
    let ca = PrivateKey::random(&mut rng, Algorithm::Ed25519).unwrap();
    let key = PrivateKey::random(&mut rng, Algorithm::Ed25519).unwrap();
    let secs = START / 1000;
    let mut b =
        Builder::new_with_random_nonce(&mut rng, key.public_key(), secs - 60, secs + 86_400)
            .unwrap();
    b.cert_type(CertType::Host).unwrap();
    b.key_id("host-1").unwrap();
    b.valid_principal("host-1").unwrap();
    b.valid_principal("web1").unwrap();
    let cert = b.sign(&ca).unwrap();
    let signer = Signer {
        key,
        certificate: cert.to_openssh().unwrap(),
    };
    (signer, ca.public_key().clone())
}

fn meta() -> SessionMeta {
    SessionMeta {
        id: "0193a1f0-rec".into(),
        cluster: "test".into(),
        user: "alice".into(),
        login: "root".into(),
        node: "web1".into(),
        node_id: "host-1".into(),
        kind: SessionKind::Interactive,
        command: None,
        term: Some("xterm-256color".into()),
        cols: 80,
        rows: 24,
        started_unix_ms: START,
        source_addr: "127.0.0.1".into(),
    }
}

/// Write `events` (ms after the start), flushing when the writer asks, when the deadline has
/// passed, and wherever `extra_flush` says.
fn write(
    events: &[(u64, Event)],
    extra_flush: &[bool],
    complete: bool,
    signer: &Signer,
) -> Vec<u8> {
    let mut codec = Codec::new().unwrap();
    let mut w = Writer::new(&meta(), START);
    let mut out = Vec::new();
    let mut now = START;
    for (i, (dt, e)) in events.iter().enumerate() {
        now += dt;
        if w.deadline().is_some_and(|d| d <= now) {
            out.extend(w.flush(&mut codec).unwrap_or_default());
        }
        match e {
            // Output as the agent records it (from the bytes read); the rest as events.
            Event::Output(b) => w.record_data(now, gatehouse_recording::Stream::Output, b),
            other => w.record(now, other),
        }
        // A flush with nothing pending (after an empty output) makes no chunk.
        if w.wants_flush() || extra_flush.get(i).copied().unwrap_or(false) {
            out.extend(w.flush(&mut codec).unwrap_or_default());
        }
    }
    let end = EndInfo {
        exit_status: Some(0),
        ended_unix_ms: now,
        ..Default::default()
    };
    out.extend(
        w.finish(now, Some(end), complete, None, &mut codec, signer)
            .unwrap(),
    );
    out
}

fn output_of(events: &[gatehouse_recording::Timed]) -> Vec<u8> {
    events
        .iter()
        .filter_map(|t| match &t.event {
            Event::Output(b) => Some(b.clone()),
            _ => None,
        })
        .flatten()
        .collect()
}

fn arb_event() -> impl Strategy<Value = Event> {
    prop_oneof![
        8 => proptest::collection::vec(any::<u8>(), 0..3000).prop_map(Event::Output),
        1 => proptest::collection::vec(any::<u8>(), 40_000..70_000).prop_map(Event::Output),
        1 => (1u32..500, 1u32..200).prop_map(|(cols, rows)| Event::Resize { cols, rows }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn what_is_written_reads_back_in_any_pieces_and_verifies(
        events in proptest::collection::vec((0u64..3000, arb_event()), 0..40),
        flushes in proptest::collection::vec(any::<bool>(), 40),
        piece in 1usize..5000,
    ) {
        let (signer, ca) = host();
        let bytes = write(&events, &flushes, true, &signer);
        let mut r = Reader::new();
        let mut got = Vec::new();
        let mut trailer = None;
        for p in bytes.chunks(piece) {
            r.push(p);
            while let Some(c) = r.next_chunk().unwrap() {
                match c {
                    Chunk::Data { events, .. } => got.extend(events),
                    Chunk::Trailer(t) => trailer = Some(t),
                }
            }
        }
        r.finish().unwrap();
        prop_assert!(trailer.unwrap().complete);
        let want: Vec<u8> = events.iter().filter_map(|(_, e)| match e {
            Event::Output(b) => Some(b.clone()), _ => None }).flatten().collect();
        prop_assert_eq!(output_of(&got), want);
        // Times never go back, and each event is at its time.
        let mut now = 0;
        let mut expect_times = Vec::new();
        for (dt, e) in &events { now += dt; if !matches!(e, Event::Output(b) if b.len() > 32 * 1024) { expect_times.push(now); } }
        let times: Vec<u64> = got.iter().filter(|t| matches!(&t.event, Event::Output(b) if b.len() <= 32 * 1024) || matches!(t.event, Event::Resize{..})).map(|t| t.at_ms).collect();
        prop_assert!(times.windows(2).all(|w| w[0] <= w[1]));
        let v = verify(&bytes, &[ca]).unwrap();
        prop_assert_eq!(v.signed_by, "host-1");
        // Memory held between flushes stays bounded.
    }

    #[test]
    fn any_flipped_bit_is_caught_with_its_chunk(
        events in proptest::collection::vec((0u64..3000, arb_event()), 1..12),
        at in any::<prop::sample::Index>(),
        bit in 0u8..8,
    ) {
        let (signer, ca) = host();
        let mut bytes = write(&events, &[], true, &signer);
        let i = at.index(bytes.len());
        bytes[i] ^= 1 << bit;
        let err = verify(&bytes, &[ca]).unwrap_err();
        // A flip in a data chunk names it; only the trailer's signature text can fail later.
        match err {
            Error::Corrupt { .. } | Error::Truncated { .. } | Error::Signature(_) | Error::NoTrailer { .. } => {}
            other => prop_assert!(false, "unexpected {other:?}"),
        }
    }

    #[test]
    fn a_recording_cut_anywhere_is_sealed_incomplete_with_every_whole_chunk(
        events in proptest::collection::vec((0u64..3000, arb_event()), 1..20),
        cut in any::<prop::sample::Index>(),
    ) {
        let (signer, ca) = host();
        let whole = write(&events, &[], true, &signer);
        // Drop the trailer and cut the rest anywhere: what a SIGKILL leaves.
        let s = scan(&whole);
        prop_assert!(s.error.is_none());
        let data_len = whole.len() - trailer_len(&whole);
        let cut = cut.index(data_len + 1);
        let torn = &whole[..cut];
        let s = scan(torn);
        let keep = s.reader.consumed() as usize;
        let before = events_of_prefix(&whole[..keep]);
        match Writer::resume(&s.reader) {
            None => prop_assert!(s.reader.meta().is_none()),
            Some(w) => {
                let mut codec = Codec::new().unwrap();
                let mut sealed = whole[..keep].to_vec();
                sealed.extend(w.finish(START + 1, None, false,
                    Some("the agent stopped during the session".into()), &mut codec, &signer).unwrap());
                let v = verify(&sealed, &[ca]).unwrap();
                prop_assert!(!v.trailer.complete);
                prop_assert_eq!(output_of(&events_of(&sealed).unwrap()), output_of(&before));
            }
        }
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..4096), piece in 1usize..600) {
        let mut r = Reader::new();
        for p in bytes.chunks(piece) {
            r.push(p);
            while let Ok(Some(_)) = r.next_chunk() {}
        }
        let _ = r.finish();
        let _ = scan(&bytes);
    }
}

fn trailer_len(bytes: &[u8]) -> usize {
    let mut r = Reader::new();
    r.push(bytes);
    let mut before = 0;
    while let Some(c) = r.next_chunk().unwrap() {
        if matches!(c, Chunk::Data { .. }) {
            before = r.consumed() as usize;
        }
    }
    bytes.len() - before
}

fn events_of_prefix(bytes: &[u8]) -> Vec<gatehouse_recording::Timed> {
    let mut r = Reader::new();
    r.push(bytes);
    let mut out = Vec::new();
    while let Ok(Some(Chunk::Data { events, .. })) = r.next_chunk() {
        out.extend(events);
    }
    out
}

#[test]
fn the_writer_holds_at_most_64_kib_and_flushes_within_a_second() {
    let mut codec = Codec::new().unwrap();
    let mut w = Writer::new(&meta(), START);
    let mut now = START;
    let mut max = 0;
    for i in 0..2000u64 {
        now += 3;
        if w.deadline().is_some_and(|d| d <= now) {
            w.flush(&mut codec);
        }
        w.record(
            now,
            &Event::Output(vec![b'x'; (i as usize * 7919) % 33_000]),
        );
        max = max.max(w.memory());
        if w.wants_flush() {
            w.flush(&mut codec);
        }
    }
    assert!(max <= 64 * 1024, "{max} bytes");
    w.flush(&mut codec);
    assert!(w.deadline().is_none());
    w.record(now, &Event::Output(b"a".to_vec()));
    assert_eq!(w.deadline(), Some(now + 1000));
}

#[test]
fn a_signature_from_another_ca_or_node_is_refused() {
    let (signer, _ca) = host();
    let (_, other_ca) = host();
    let bytes = write(&[(5, Event::Output(b"hi".to_vec()))], &[], true, &signer);
    let e = verify(&bytes, &[other_ca]).unwrap_err();
    assert!(e.to_string().contains("host CA"), "{e}");
}

#[test]
fn truncated_and_flipped_recordings_name_the_chunk() {
    let (signer, ca) = host();
    let events: Vec<(u64, Event)> = (0..5)
        .map(|i| (1500, Event::Output(format!("line {i}\r\n").into_bytes())))
        .collect();
    let bytes = write(&events, &[], true, &signer);
    let chunks = scan(&bytes).reader.next_seq();
    assert!(chunks >= 3, "{chunks} chunks");
    let cut = &bytes[..bytes.len() - 10];
    let e = verify(cut, std::slice::from_ref(&ca)).unwrap_err();
    assert!(
        matches!(e, Error::Truncated { seq, .. } if seq == chunks),
        "{e}"
    );
    let mut flipped = bytes.clone();
    let second = {
        let mut r = Reader::new();
        r.push(&bytes);
        r.next_chunk().unwrap();
        r.consumed() as usize
    };
    flipped[second + 40] ^= 0x10;
    let e = verify(&flipped, &[ca]).unwrap_err();
    assert_eq!(e.chunk(), Some(1), "{e}");
    assert!(e.to_string().contains("chunk 1"), "{e}");
}

#[test]
fn a_chunk_that_could_not_be_stored_is_left_out_of_the_trailer() {
    let (signer, ca) = host();
    let mut codec = Codec::new().unwrap();
    let mut w = Writer::new(&meta(), START);
    let mut stored = w.flush(&mut codec).unwrap();
    w.record(START + 10, &Event::Output(b"kept".to_vec()));
    stored.extend(w.flush(&mut codec).unwrap());
    let before = w.checkpoint();
    w.record(START + 20, &Event::Output(b"lost".to_vec()));
    let _not_stored = w.flush(&mut codec).unwrap();
    w.restore(before);
    stored.extend(
        w.finish(
            START + 30,
            None,
            false,
            Some("spool full".into()),
            &mut codec,
            &signer,
        )
        .unwrap(),
    );
    let v = verify(&stored, &[ca]).unwrap();
    assert!(!v.trailer.complete);
    assert_eq!(output_of(&events_of(&stored).unwrap()), b"kept");
}
