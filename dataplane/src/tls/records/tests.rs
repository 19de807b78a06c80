//! The record layer between a client and a server after a real handshake in memory: sealing
//! and opening in both directions, key updates, tickets, interop with rustls' own records, and
//! every malformed record a peer could send.

// Test code: a failing unwrap is a failing test.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::io::IoSlice;
use std::sync::Arc;

use gatehouse_controlplane::tls::{Trust, client_config_with_alpn, server_config_with_alpn};
use proptest::prelude::*;
use rustls::client::{ClientConnectionData, UnbufferedClientConnection};
use rustls::server::{ServerConnectionData, UnbufferedServerConnection};
use rustls::unbuffered::{ConnectionState, UnbufferedStatus};
use rustls::{ClientConfig, HandshakeKind, ServerConfig};

use super::*;
use crate::tls::side::TlsSide;
use crate::tls::testing::{Ca, in_memory};

const NAME: &str = gatehouse_controlplane::identity::PROXY_SERVER_NAME;

fn configs(tickets: usize) -> (Arc<ServerConfig>, Arc<ClientConfig>) {
    let ca = Ca::new("records CA");
    let (cert, key) = ca.leaf(NAME);
    let mut server = (*server_config_with_alpn(&ca.pem, &cert, &key, &[b"t"]).unwrap()).clone();
    server.send_tls13_tickets = tickets;
    let client = client_config_with_alpn(&Trust::CaPem(ca.pem.clone()), None, &[b"t"]).unwrap();
    (Arc::new(server), client)
}

fn pump<C: TlsSide>(
    c: &mut C,
    incoming: &mut Vec<u8>,
    out: &mut Vec<u8>,
    data: &mut Vec<u8>,
) -> bool {
    in_memory::pump(c, incoming, out, data).unwrap()
}

fn handshake(
    server: &Arc<ServerConfig>,
    client: &Arc<ClientConfig>,
) -> (
    UnbufferedClientConnection,
    UnbufferedServerConnection,
    Vec<u8>,
) {
    in_memory::handshake(server, client, NAME).unwrap()
}

fn take_over<C: TlsSide>(c: C) -> Records<C::Data> {
    in_memory::take_over(c).unwrap()
}

fn pair() -> (Records<ClientConnectionData>, Records<ServerConnectionData>) {
    let (server, client) = configs(0);
    let (c, s, pending) = handshake(&server, &client);
    assert!(pending.is_empty());
    (take_over(c), take_over(s))
}

/// Seal everything in `bufs`, in rounds of `dst_len`-byte destinations.
fn seal_all<D>(r: &mut Records<D>, bufs: &[&[u8]], dst_len: usize) -> Vec<u8> {
    let mut owned: Vec<Vec<u8>> = bufs.iter().map(|b| b.to_vec()).collect();
    let mut wire = Vec::new();
    loop {
        let slices: Vec<IoSlice<'_>> = owned.iter().map(|b| IoSlice::new(b)).collect();
        let mut dst = vec![0u8; dst_len];
        let (taken, written) = r.seal(&slices, 64 * 1024, &mut dst).unwrap();
        wire.extend_from_slice(&dst[..written]);
        if owned.iter().all(Vec::is_empty) {
            return wire;
        }
        assert!(taken > 0, "no progress with {dst_len} bytes of room");
        let mut left = taken;
        for b in &mut owned {
            let k = left.min(b.len());
            b.drain(..k);
            left -= k;
        }
    }
}

/// Open every record in `wire`: the application data, and whether close_notify came.
fn open_all<D>(r: &mut Records<D>, wire: &mut [u8], replies: &mut BytesMut) -> (Vec<u8>, bool) {
    let (mut data, mut at) = (Vec::new(), 0);
    while at < wire.len() {
        let (n, opened) = r.open(&mut wire[at..], replies).unwrap();
        assert!(n > 0, "an incomplete record at {at} of {}", wire.len());
        at += n;
        match opened {
            Opened::Data(d) => data.extend_from_slice(d),
            Opened::Control => {}
            Opened::Closed => return (data, true),
        }
    }
    (data, false)
}

fn record_lengths(wire: &[u8]) -> Vec<usize> {
    let (mut lens, mut at) = (Vec::new(), 0);
    while at < wire.len() {
        let len = usize::from(u16::from_be_bytes([wire[at + 3], wire[at + 4]]));
        assert_eq!(wire[at], APPLICATION_DATA);
        lens.push(len);
        at += HEADER + len;
    }
    lens
}

fn pattern(n: usize, seed: usize) -> Vec<u8> {
    (0..n).map(|i| (i * 31 + seed + i / 253) as u8).collect()
}

/// Writes of every size become records of at most 16 KiB each, which open
/// as the same bytes on the other side, in both directions; close_notify ends it.
#[test]
fn writes_of_every_size_open_the_same_both_ways() {
    let (mut client, mut server) = pair();
    let bufs: Vec<Vec<u8>> = [9usize, 1, 70_000, 0, 3, 16 * 1024, 5, 40_000]
        .iter()
        .enumerate()
        .map(|(i, &n)| pattern(n, i))
        .collect();
    let refs: Vec<&[u8]> = bufs.iter().map(Vec::as_slice).collect();
    let all: Vec<u8> = bufs.concat();
    for dst_len in [64 * 1024 + 1024, 100, OVERHEAD + 1] {
        let mut wire = seal_all(&mut client, &refs, dst_len);
        let lens = record_lengths(&wire);
        assert!(lens.iter().all(|&l| l <= MAX_PLAINTEXT + 1 + TAG));
        let mut replies = BytesMut::new();
        let (got, closed) = open_all(&mut server, &mut wire, &mut replies);
        assert!(got == all && !closed && replies.is_empty());
        let mut back = seal_all(&mut server, &refs, dst_len);
        let (got, _) = open_all(&mut client, &mut back, &mut replies);
        assert!(got == all);
    }
    let mut close = BytesMut::new();
    client.push_alert(&mut close, None);
    let (got, closed) = open_all(&mut server, &mut close, &mut BytesMut::new());
    assert!(got.is_empty() && closed);
}

/// Small writes share records; a large write starts a record of its own, so the small end of
/// the write before it is a short record (sealed from where it is, like the large one's).
#[test]
fn small_writes_share_records_and_large_ones_start_their_own() {
    let (mut client, mut server) = pair();
    let small: Vec<Vec<u8>> = (0..100).map(|i| pattern(100, i)).collect();
    let refs: Vec<&[u8]> = small.iter().map(Vec::as_slice).collect();
    let mut wire = seal_all(&mut client, &refs, 64 * 1024 + 1024);
    assert_eq!(record_lengths(&wire), [10_000 + 1 + TAG]);
    let (got, _) = open_all(&mut server, &mut wire, &mut BytesMut::new());
    assert!(got == small.concat());

    let (tail, large) = (pattern(10, 1), pattern(40_000, 2));
    let mut wire = seal_all(&mut client, &[&tail, &large], 64 * 1024 + 1024);
    let plaintext: Vec<usize> = record_lengths(&wire).iter().map(|l| l - 1 - TAG).collect();
    assert_eq!(plaintext, [10, 16_384, 16_384, 7_232]);
    let (got, _) = open_all(&mut server, &mut wire, &mut BytesMut::new());
    assert!(got == [tail, large].concat());
}

/// Keys are replaced before they seal their share, and a key update that asks for one back
/// is answered; data keeps flowing across every change.
#[test]
fn key_updates_on_schedule_and_on_request() {
    let (mut client, mut server) = pair();
    client.set_key_update_interval(3);
    let data = pattern(200_000, 7);
    let mut wire = seal_all(&mut client, &[&data], 64 * 1024 + 1024);
    // 13 data records, a key update after every 3 records of a key.
    assert_eq!(record_lengths(&wire).len(), 13 + 4);
    let mut replies = BytesMut::new();
    let (got, _) = open_all(&mut server, &mut wire, &mut replies);
    assert!(got == data && replies.is_empty());

    // The server asks the client to update too.
    let mut ask = vec![0u8; 64];
    let n = server.update_tx_key(&mut ask, true).unwrap();
    let (got, _) = open_all(&mut client, &mut ask[..n], &mut replies);
    assert!(got.is_empty());
    assert!(!replies.is_empty(), "the request was not answered");
    let mut answer = replies.split().to_vec();
    let after = seal_all(&mut client, &[b"after the update"], 1024);
    answer.extend_from_slice(&after);
    let (got, _) = open_all(&mut server, &mut answer, &mut replies);
    assert_eq!(got, b"after the update");
    let mut back = seal_all(&mut server, &[b"and back"], 1024);
    assert_eq!(
        open_all(&mut client, &mut back, &mut replies).0,
        b"and back"
    );
}

/// Records opened into the reader's buffer (`open_to`) read as records opened in place do,
/// key updates included; a buffer without room for the record, or a record not all there,
/// takes nothing (the next open still has its key and sequence number); a broken record is
/// the same error.
#[test]
fn records_open_into_the_readers_buffer_alike() {
    let (mut client, mut server) = pair();
    client.set_key_update_interval(3);
    let data = pattern(200_000, 9);
    let wire = seal_all(&mut client, &[&data], 64 * 1024 + 1024);
    let mut replies = BytesMut::new();
    let mut out = vec![0u8; MAX_PLAINTEXT + 1];
    let (mut at, mut got, mut records) = (0, Vec::new(), 0);
    while at < wire.len() {
        let len = usize::from(u16::from_be_bytes([wire[at + 3], wire[at + 4]]));
        let mut short = vec![0u8; len - TAG - 1];
        let r = server.open_to(&wire[at..], &mut short, &mut replies);
        assert!(matches!(r, Ok(None)), "one byte short: {r:?}");
        let r = server.open_to(&wire[at..at + HEADER + len - 1], &mut out, &mut replies);
        assert!(matches!(r, Ok(None)), "incomplete: {r:?}");
        let (n, opened) = server
            .open_to(&wire[at..], &mut out, &mut replies)
            .unwrap()
            .unwrap();
        assert_eq!(n, HEADER + len);
        match opened {
            Opened::Data(d) => got.extend_from_slice(d),
            Opened::Control => {}
            Opened::Closed => panic!("close_notify"),
        }
        at += n;
        records += 1;
    }
    assert_eq!(records, 13 + 4, "data records and key updates");
    assert!(got == data && replies.is_empty());
    let mut bad = seal_all(&mut client, &[b"hello"], 1024);
    bad[7] ^= 1;
    let err = server.open_to(&bad, &mut out, &mut replies).unwrap_err();
    assert_eq!(err.alert(), Some(20), "{err}");
}

/// Our records against rustls' own record layer: data both ways across a key update from
/// each side.
#[test]
fn interoperates_with_rustls_records_and_key_updates() {
    let (server_config, client_config) = configs(0);
    let (mut c, s, _) = handshake(&server_config, &client_config);
    let mut server = take_over(s);
    server.set_key_update_interval(2);
    let (mut none, mut c2s, mut data) = (Vec::new(), Vec::new(), Vec::new());
    let mut replies = BytesMut::new();
    for round in 0..3 {
        // rustls encrypts; then asks for new keys (from the second round on).
        let msg = pattern(40_000 + round, round);
        let UnbufferedStatus { state, .. } = c.process_tls_records(&mut none);
        let ConnectionState::WriteTraffic(mut w) = state.unwrap() else {
            panic!("client not ready to write");
        };
        let mut buf = vec![0u8; 64 * 1024];
        let n = w.encrypt(&msg, &mut buf).unwrap();
        c2s.extend_from_slice(&buf[..n]);
        if round > 0 {
            w.refresh_traffic_keys().unwrap();
            pump(&mut c, &mut none, &mut c2s, &mut data);
        }
        let (got, _) = open_all(&mut server, &mut c2s, &mut replies);
        assert!(got == msg, "round {round}: client to server");
        c2s.clear();
        // We encrypt (with our own key updates every 2 records); rustls decrypts.
        // (An answer to a key update rustls asked for was sealed first: it goes first.)
        let mut back = replies.split().to_vec();
        // rustls asks for ours in return when it updates its keys.
        assert_eq!(
            back.is_empty(),
            round == 0,
            "round {round}: {} bytes",
            back.len()
        );
        back.extend_from_slice(&seal_all(&mut server, &[&msg], 64 * 1024 + 1024));
        pump(&mut c, &mut back, &mut c2s, &mut data);
        assert!(back.is_empty());
        assert!(data == msg, "round {round}: server to client");
        data.clear();
    }
}

/// A server's session tickets that arrive after the client handed its records over still
/// reach rustls: the next connection resumes. A client's "ticket" is refused.
#[test]
fn tickets_after_the_handover_resume_the_next_session() {
    let (server_config, client_config) = configs(2);
    let (c, s, mut tickets) = handshake(&server_config, &client_config);
    assert!(!tickets.is_empty(), "the server sent no ticket");
    let mut client = take_over(c);
    let mut server = take_over(s);
    let (got, _) = open_all(&mut client, &mut tickets, &mut BytesMut::new());
    assert!(got.is_empty());
    let (c2, _, _) = handshake(&server_config, &client_config);
    assert_eq!(c2.handshake_kind(), Some(HandshakeKind::Resumed));

    // The same message from a client is not allowed.
    let mut wire = vec![0u8; 128];
    let n = client
        .seal_message(&mut wire, HANDSHAKE, &[NEW_SESSION_TICKET, 0, 0, 1, 0])
        .unwrap();
    let r = server.open(&mut wire[..n], &mut BytesMut::new());
    assert!(matches!(r, Err(RecordError::Rustls(_))), "{r:?}");
}

/// Broken or misplaced records are errors that name the alert to send, never panics.
#[test]
fn bad_records_are_errors_with_the_right_alert() {
    fn sealed(r: &mut Records<ClientConnectionData>, content_type: u8, body: &[u8]) -> Vec<u8> {
        r.seal_padded(content_type, body, 0).unwrap()
    }
    type Make = fn(&mut Records<ClientConnectionData>) -> Vec<u8>;
    let cases: [(&str, Make, Option<u8>); 9] = [
        (
            "flipped bit",
            |r| {
                let mut w = sealed(r, APPLICATION_DATA, b"hello");
                w[7] ^= 1;
                w
            },
            Some(20),
        ),
        (
            "too long",
            |_| vec![APPLICATION_DATA, 3, 3, 0x48, 0x01],
            Some(22),
        ),
        (
            "shorter than a tag",
            |_| vec![APPLICATION_DATA, 3, 3, 0, 3, 1, 2, 3],
            Some(20),
        ),
        (
            "plaintext alert",
            |_| vec![ALERT, 3, 3, 0, 2, 2, 40],
            Some(10),
        ),
        ("no content type", |r| sealed(r, 0, &[0, 0, 0]), Some(10)),
        (
            // 16 KiB of data, its type and one byte of padding: one byte too many.
            "padded past the limit",
            |r| {
                let mut inner = vec![1u8; MAX_PLAINTEXT];
                inner.push(APPLICATION_DATA);
                sealed(r, 0, &inner)
            },
            Some(22),
        ),
        ("peer's fatal alert", |r| sealed(r, ALERT, &[2, 40]), None),
        (
            "bad key update",
            |r| sealed(r, HANDSHAKE, &[KEY_UPDATE, 0, 0, 1, 7]),
            Some(50),
        ),
        (
            "data after key update",
            |r| {
                sealed(
                    r,
                    HANDSHAKE,
                    &[KEY_UPDATE, 0, 0, 1, 0, KEY_UPDATE, 0, 0, 1, 0],
                )
            },
            Some(10),
        ),
    ];
    for (what, make, alert) in cases {
        let (mut client, mut server) = pair();
        let mut wire = make(&mut client);
        let mut replies = BytesMut::new();
        let err = server.open(&mut wire, &mut replies).expect_err(what);
        assert_eq!(err.alert(), alert, "{what}: {err}");
        // The alert goes out sealed, and the client reads it as the error it is.
        if let Some(a) = alert {
            server.push_alert(&mut replies, Some(a));
            let r = client.open(&mut replies, &mut BytesMut::new());
            assert!(
                matches!(r, Err(RecordError::PeerAlert(x)) if x == a),
                "{what}: {r:?}"
            );
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    /// Arbitrary bytes are an error or a wait for more, never a panic.
    #[test]
    fn arbitrary_bytes_never_panic(mut bytes in proptest::collection::vec(any::<u8>(), 0..40_000)) {
        let (_, mut server) = pair();
        let mut replies = BytesMut::new();
        let mut at = 0;
        while at < bytes.len() {
            match server.open(&mut bytes[at..], &mut replies) {
                Ok((0, _)) | Err(_) => break,
                Ok((n, _)) => at += n,
            }
        }
    }

    /// Records arriving in any pieces open to the same bytes (the driver keeps the
    /// incomplete tail and tries again).
    #[test]
    fn records_in_any_pieces_open_the_same(cuts in proptest::collection::vec(1usize..20_000, 1..12)) {
        let (mut client, mut server) = pair();
        let data = pattern(60_000, 3);
        let wire = seal_all(&mut client, &[&data], 64 * 1024 + 1024);
        let (mut input, mut got, mut fed) = (Vec::new(), Vec::new(), 0);
        let mut replies = BytesMut::new();
        for cut in cuts.iter().copied().chain(std::iter::once(wire.len())) {
            let end = (fed + cut).min(wire.len());
            input.extend_from_slice(&wire[fed..end]);
            fed = end;
            loop {
                let (n, opened) = server.open(&mut input, &mut replies).unwrap();
                if n == 0 {
                    break;
                }
                if let Opened::Data(d) = opened {
                    got.extend_from_slice(d);
                }
                input.drain(..n);
            }
        }
        prop_assert!(got == data);
    }
}

/// What goes into the records of the sequence test below.
#[derive(Debug, Clone)]
enum Item {
    /// The client's application data, sealed through `seal` (records of up to 16 KiB).
    Data(usize),
    /// One record of the client's application data with padding after its content type.
    Padded { len: usize, pad: usize },
    /// A warning the record layer takes in its stride.
    UserCanceled,
    /// A key update from the client, cut into this many handshake records; its end ends
    /// the last of them.
    KeyUpdate { request: bool, pieces: usize },
    /// The server sends application data back.
    Back(usize),
}

fn item() -> impl Strategy<Value = Item> {
    prop_oneof![
        4 => (0usize..40_000).prop_map(Item::Data),
        2 => (0usize..MAX_PLAINTEXT - 256, 0usize..256)
            .prop_map(|(len, pad)| Item::Padded { len, pad }),
        1 => Just(Item::UserCanceled),
        2 => (any::<bool>(), 1usize..6)
            .prop_map(|(request, pieces)| Item::KeyUpdate { request, pieces }),
        2 => (1usize..40_000).prop_map(Item::Back),
    ]
}

fn seal_padded(
    r: &mut Records<ClientConnectionData>,
    content_type: u8,
    content: &[u8],
    pad: usize,
) -> Vec<u8> {
    r.seal_padded(content_type, content, pad).unwrap()
}

/// The server opens what of `input` is complete, in place or into a reader's buffer by
/// turns (sometimes one too small, which takes nothing); its key update answers go to `s2c`.
fn server_reads(
    server: &mut Records<ServerConnectionData>,
    input: &mut Vec<u8>,
    into_buffer: &mut bool,
    got: &mut Vec<u8>,
    s2c: &mut BytesMut,
) -> Result<bool, RecordError> {
    fn owned((n, opened): (usize, Opened<'_>)) -> (usize, Vec<u8>, bool) {
        match opened {
            Opened::Data(d) => (n, d.to_vec(), false),
            Opened::Control => (n, Vec::new(), false),
            Opened::Closed => (n, Vec::new(), true),
        }
    }
    let mut out = vec![0u8; MAX_PLAINTEXT + 256];
    loop {
        *into_buffer = !*into_buffer;
        let opened = if *into_buffer {
            let room = if got.len().is_multiple_of(3) {
                10
            } else {
                out.len()
            };
            match server.open_to(input, &mut out[..room], s2c)? {
                Some(r) => owned(r),
                None => owned(server.open(input, s2c)?),
            }
        } else {
            owned(server.open(input, s2c)?)
        };
        let (n, data, closed) = opened;
        if n == 0 {
            return Ok(false);
        }
        got.extend_from_slice(&data);
        input.drain(..n);
        if closed {
            return Ok(true);
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    /// Any sequence of data, padded records, warnings, key updates cut across records (asked
    /// for or not) and data the other way, with keys also replaced on schedule by both
    /// sides, delivered in any pieces: the server reads every byte in order and then the
    /// close_notify, the client reads every byte sent back, and nothing fails. The same
    /// bytes with one bit flipped anywhere never read as a whole session.
    #[test]
    fn any_sequence_of_records_in_any_pieces_reads_whole(
        items in proptest::collection::vec(item(), 1..24),
        cuts in proptest::collection::vec(1usize..30_000, 1..16),
        intervals in (1u64..12, 1u64..12),
        flip in proptest::option::of((any::<prop::sample::Index>(), 1u8..=255)),
    ) {
        let (mut client, mut server) = pair();
        client.set_key_update_interval(intervals.0);
        server.set_key_update_interval(intervals.1);
        let (mut c2s, mut expect, mut back_expect) = (Vec::new(), Vec::new(), Vec::new());
        let mut s2c = BytesMut::new();
        let (mut input, mut got, mut back_got) = (Vec::new(), Vec::new(), Vec::new());
        let mut into_buffer = false;
        let mut cut = cuts.iter().cycle();
        let mut replies = BytesMut::new();
        let mut failed = None;
        let mut closed = false;
        for (i, it) in items.iter().chain([Item::Back(0)].iter()).enumerate() {
            match it {
                Item::Data(len) => {
                    let data = pattern(*len, i);
                    c2s.extend(seal_all(&mut client, &[&data], 64 * 1024 + 1024));
                    expect.extend(data);
                }
                Item::Padded { len, pad } => {
                    let data = pattern(*len, i);
                    c2s.extend(seal_padded(&mut client, APPLICATION_DATA, &data, *pad));
                    expect.extend(data);
                }
                Item::UserCanceled => {
                    c2s.extend(seal_padded(&mut client, ALERT, &[ALERT_WARNING, USER_CANCELED], 0));
                }
                Item::KeyUpdate { request, pieces } => {
                    let msg = [KEY_UPDATE, 0, 0, 1, u8::from(*request)];
                    for chunk in msg.chunks(msg.len().div_ceil(*pieces)) {
                        c2s.extend(seal_padded(&mut client, HANDSHAKE, chunk, 0));
                    }
                    client.tx = Keys::new(client.kernel.update_tx_secret().unwrap()).unwrap();
                }
                Item::Back(len) => {
                    if failed.is_some() {
                        break;
                    }
                    // Everything so far reaches the server, in pieces, before it answers.
                    if i == items.len() {
                        // The end: the client's close_notify goes last.
                        client.push_alert(&mut replies, None);
                        c2s.extend_from_slice(&replies.split());
                        if let Some((at, mask)) = flip {
                            let at = at.index(c2s.len());
                            c2s[at] ^= mask;
                        }
                    } else if flip.is_some() {
                        // Corrupted runs deliver everything at once, at the end.
                        continue;
                    }
                    while !c2s.is_empty() && failed.is_none() {
                        let n = (*cut.next().unwrap()).min(c2s.len());
                        input.extend(c2s.drain(..n));
                        match server_reads(&mut server, &mut input, &mut into_buffer, &mut got, &mut s2c) {
                            Ok(c) => closed |= c,
                            Err(e) => failed = Some(e),
                        }
                    }
                    let data = pattern(*len, i + 1000);
                    let sealed = seal_all(&mut server, &[&data], 64 * 1024 + 1024);
                    s2c.extend_from_slice(&sealed);
                    back_expect.extend(data);
                    let mut wire = s2c.split().to_vec();
                    let (data, _) = open_all(&mut client, &mut wire, &mut replies);
                    back_got.extend(data);
                    prop_assert!(replies.is_empty(), "the client was asked for a key update");
                }
            }
        }
        if flip.is_some() {
            prop_assert!(
                failed.is_some() || !closed || got != expect,
                "a flipped bit went unnoticed"
            );
        } else {
            prop_assert!(failed.is_none(), "{:?}", failed);
            prop_assert!(closed && input.is_empty(), "close_notify not read");
            prop_assert!(got == expect, "the server read {} of {} bytes", got.len(), expect.len());
            prop_assert!(back_got == back_expect);
        }
    }
}
