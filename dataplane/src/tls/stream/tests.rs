//! The TLS stream over real sockets on both I/O backends: echo, records cut anywhere, tickets,
//! hand-over between threads, refused certificates, garbage, backpressure.

// Test code: a failing unwrap is a failing test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use gatehouse_controlplane::tls::{Trust, client_config_with_alpn, server_config_with_alpn};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::*;
use bytes::Bytes;

use crate::tls::incoming::FULL_RECORD;
use crate::tls::testing::Ca;
use crate::tls::write::{MAX_OUTGOING, WRITE_SCRATCH};

const NAME: &str = gatehouse_controlplane::identity::PROXY_SERVER_NAME;
const ALPN: &[u8] = b"test";

struct Setup {
    server: Arc<ServerConfig>,
    client: Arc<rustls::ClientConfig>,
    listener: tokio::net::TcpListener,
}

async fn setup(client_ca: &Ca, ca: &Ca) -> Setup {
    let (cert, key) = ca.leaf(NAME);
    let mut server = (*server_config_with_alpn(&ca.pem, &cert, &key, &[ALPN]).unwrap()).clone();
    server.send_tls13_tickets = 0;
    let (ccert, ckey) = client_ca.leaf("client");
    let client = client_config_with_alpn(
        &Trust::CaPem(ca.pem.clone()),
        Some((&ccert, &ckey)),
        &[ALPN],
    )
    .unwrap();
    Setup {
        server: Arc::new(server),
        client,
        listener: tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap(),
    }
}

async fn connect(s: &Setup) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    let tcp = tokio::net::TcpStream::connect(s.listener.local_addr().unwrap())
        .await
        .unwrap();
    tokio_rustls::TlsConnector::from(Arc::clone(&s.client))
        .connect(rustls::pki_types::ServerName::try_from(NAME).unwrap(), tcp)
        .await
        .unwrap()
}

fn pattern(n: usize) -> Vec<u8> {
    (0..n).map(|i| (i * 7 + i / 251) as u8).collect()
}

async fn timeout<F: std::future::Future>(f: F) -> F::Output {
    tokio::time::timeout(Duration::from_secs(20), f)
        .await
        .expect("timed out")
}

/// Reads end at a record's end when the peer's records are full ones, and never give the
/// reader more plaintext than it has room for; otherwise a whole record at least.
#[test]
fn reads_end_at_record_boundaries_within_the_readers_room() {
    let full_header = |len: usize| -> Vec<u8> {
        let mut h = vec![23, 3, 3];
        h.extend_from_slice(&u16::try_from(len).unwrap().to_be_bytes());
        h
    };
    // Nothing in hand: four whole records for a 64 KiB reader (its 64 KiB of plaintext).
    assert_eq!(read_size(&[], 64 * 1024), 4 * FULL_RECORD);
    assert_eq!(read_size(&[], 50_000), 3 * FULL_RECORD);
    // A full record's first 1,000 bytes in hand: its rest and three more.
    let mut partial = full_header(FULL_RECORD - 5);
    partial.resize(1_000, 0);
    assert_eq!(
        read_size(&partial, 64 * 1024),
        FULL_RECORD - 1_000 + 3 * FULL_RECORD
    );
    // Three bytes of a header: assumed full.
    assert_eq!(
        read_size(&[23, 3, 3], 64 * 1024),
        FULL_RECORD - 3 + 3 * FULL_RECORD
    );
    // A short record in hand: its rest, then full ones within the room.
    let mut short = full_header(117);
    short.resize(50, 0);
    assert_eq!(read_size(&short, 64 * 1024), 122 - 50 + 3 * FULL_RECORD);
    // A reader with less room than a record: one whole record (the rest waits decrypted).
    assert_eq!(read_size(&[], 100), MAX_RECORD);
    // Never more than four records' worth beyond the one in hand, whatever the room.
    assert_eq!(read_size(&[], 1 << 20), 4 * FULL_RECORD);
}

/// Data written right behind the handshake, in writes of every size, read back through a
/// tiny server buffer (so plaintext waits in the connection) and echoed; then close_notify
/// each way ends both sides cleanly.
///
/// Both record layers: our own (what the configs allow by default) and rustls' (a config
/// that does not allow rustls to hand the records over).
async fn echo_with_tiny_reads_and_clean_close_on() {
    for own_records in [true, false] {
        echo_with_tiny_reads(own_records).await;
    }
}

async fn echo_with_tiny_reads(own_records: bool) {
    let ca = Ca::new("test CA");
    let s = setup(&ca, &ca).await;
    let addr = s.listener.local_addr().unwrap();
    let client_config = Arc::clone(&s.client);
    let server = {
        let mut config = (*s.server).clone();
        config.enable_secret_extraction = own_records;
        let config = Arc::new(config);
        let listener = tokio::net::TcpListener::from_std(s.listener.into_std().unwrap()).unwrap();
        tokio::task::spawn_local(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            let mut tls = TlsStream::accept(adopt(tcp), config).await.unwrap();
            assert_eq!(tls.alpn_protocol(), Some(ALPN));
            assert!(tls.peer_certificates().is_some());
            assert_eq!(tls.own_records(), own_records);
            // A tiny buffer, so plaintext waits in the connection.
            echo_until_eof(&mut tls, 100).await
        })
    };
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut c = tokio_rustls::TlsConnector::from(client_config)
        .connect(rustls::pki_types::ServerName::try_from(NAME).unwrap(), tcp)
        .await
        .unwrap();
    let data = pattern(3 * 1024 * 1024 + 17);
    let back = timeout(send_and_read_back(&mut c, &data, false)).await;
    assert_eq!(back.len(), data.len());
    assert!(back == data, "echoed bytes differ");
    assert_eq!(timeout(server).await.unwrap(), data.len());
}

/// TLS records cut at arbitrary points: a relay between a tokio-rustls client and our
/// server passes the client's bytes on in random pieces with pauses between them, so
/// records, and record headers, arrive split across receives anywhere (on io_uring, the
/// first part of a split record is copied in front of the next receive's buffer). The server
/// reads with random read sizes and echoes; every byte comes back in order. Several seeds
/// per backend, each printed when it runs.
async fn records_cut_anywhere_read_back_whole_on() {
    use rand::{Rng, SeedableRng};
    for seed in 0..6u64 {
        eprintln!("records_cut_anywhere: seed {seed}");
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let ca = Ca::new("test CA");
        let s = setup(&ca, &ca).await;
        let server_addr = s.listener.local_addr().unwrap();
        let config = Arc::clone(&s.server);
        let reads: Vec<usize> = (0..64).map(|_| rng.gen_range(1..70_000)).collect();
        let server = {
            let listener =
                tokio::net::TcpListener::from_std(s.listener.into_std().unwrap()).unwrap();
            tokio::task::spawn_local(async move {
                let mut tls = accept_one(&listener, config).await;
                echo_in_reads_until_eof(&mut tls, reads.iter().copied().cycle()).await
            })
        };
        let relay = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let relay_addr = relay.local_addr().unwrap();
        let pieces: Vec<(usize, bool)> = (0..97)
            .map(|_| (rng.gen_range(1..20_000), rng.gen_bool(0.3)))
            .collect();
        let relay = tokio::task::spawn_local(async move {
            let (client, _) = relay.accept().await.unwrap();
            let upstream = tokio::net::TcpStream::connect(server_addr).await.unwrap();
            upstream.set_nodelay(true).unwrap();
            let (mut from_client, mut to_client) = client.into_split();
            let (mut from_server, mut to_server) = upstream.into_split();
            let up = async move {
                let mut buf = vec![0u8; 20_000];
                for (size, pause) in pieces.iter().cycle() {
                    let n = from_client.read(&mut buf[..*size]).await.unwrap();
                    if n == 0 {
                        break;
                    }
                    // Each piece its own segment: the server sees these cuts.
                    to_server.write_all(&buf[..n]).await.unwrap();
                    if *pause {
                        tokio::time::sleep(Duration::from_micros(200)).await;
                    } else {
                        tokio::task::yield_now().await;
                    }
                }
                to_server.shutdown().await.unwrap();
            };
            let down = async move {
                tokio::io::copy(&mut from_server, &mut to_client)
                    .await
                    .unwrap();
                to_client.shutdown().await.unwrap();
            };
            tokio::join!(up, down);
        });
        let tcp = tokio::net::TcpStream::connect(relay_addr).await.unwrap();
        let mut c = tokio_rustls::TlsConnector::from(Arc::clone(&s.client))
            .connect(rustls::pki_types::ServerName::try_from(NAME).unwrap(), tcp)
            .await
            .unwrap();
        let data = pattern(rng.gen_range(1..600_000));
        let back = timeout(send_and_read_back(&mut c, &data, seed % 2 == 1)).await;
        assert!(back == data, "seed {seed}: echoed bytes differ");
        assert_eq!(timeout(server).await.unwrap(), data.len(), "seed {seed}");
        timeout(relay).await.unwrap();
    }
}

/// Echo what arrives, read `chunk` bytes at most at a time, until EOF; then close. Returns
/// the bytes echoed.
async fn echo_until_eof<S: AsyncRead + AsyncWrite + Unpin>(s: &mut S, chunk: usize) -> usize {
    echo_in_reads_until_eof(s, std::iter::repeat(chunk)).await
}

/// [`echo_until_eof`] with each read taking at most the next of `sizes` bytes.
async fn echo_in_reads_until_eof<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    sizes: impl Iterator<Item = usize>,
) -> usize {
    let mut buf = Vec::new();
    let mut total = 0;
    for size in sizes {
        buf.resize(size, 0);
        let n = s.read(&mut buf).await.unwrap();
        if n == 0 {
            break;
        }
        total += n;
        s.write_all(&buf[..n]).await.unwrap();
    }
    s.shutdown().await.unwrap();
    total
}

/// Read until a clean EOF (`Ok`) or an error.
async fn read_to_eof_or_error<S: AsyncRead + Unpin>(s: &mut S) -> io::Result<()> {
    let mut buf = vec![0u8; 4096];
    loop {
        if s.read(&mut buf).await? == 0 {
            return Ok(());
        }
    }
}

/// Write `data` to `s` in writes of every size (two-slice vectored writes with `vectored`),
/// shut down the write side, and return everything read back until EOF.
async fn send_and_read_back<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    data: &[u8],
    vectored: bool,
) -> Vec<u8> {
    let (mut rd, mut wr) = tokio::io::split(s);
    let send = async {
        let mut off = 0;
        let mut size = 1;
        while off < data.len() {
            let end = (off + size).min(data.len());
            if vectored {
                let (a, b) = data[off..end].split_at((end - off) / 3);
                let mut slices = [std::io::IoSlice::new(a), std::io::IoSlice::new(b)];
                let mut slices = &mut slices[..];
                while !slices.is_empty() {
                    let n = wr.write_vectored(slices).await.unwrap();
                    std::io::IoSlice::advance_slices(&mut slices, n);
                }
            } else {
                wr.write_all(&data[off..end]).await.unwrap();
            }
            off = end;
            size = (size * 3 + 1) % 200_000 + 1;
        }
        wr.shutdown().await.unwrap();
    };
    let recv = async {
        let mut back = Vec::new();
        rd.read_to_end(&mut back).await.unwrap();
        back
    };
    tokio::join!(send, recv).1
}

/// The client side: both ends are `TlsStream`s. The server sends session tickets after the
/// handshake (the client takes them in stride, mid-stream), data of every write size goes
/// both ways through vectored writes, and close_notify ends both cleanly. A client that does
/// not trust the server's CA fails its handshake with an error.
async fn client_side_echo_tickets_and_refusal_on() {
    let ca = Ca::new("test CA");
    let s = setup(&ca, &ca).await;
    let addr = s.listener.local_addr().unwrap();
    let mut server_config = (*s.server).clone();
    server_config.send_tls13_tickets = 2;
    let server_config = Arc::new(server_config);
    let listener = tokio::net::TcpListener::from_std(s.listener.into_std().unwrap()).unwrap();
    let server = tokio::task::spawn_local(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let mut tls = TlsStream::accept(adopt(tcp), server_config.clone())
            .await
            .unwrap();
        let total = echo_until_eof(&mut tls, 70_000).await;
        // The second client does not trust this server: its handshake fails.
        let (tcp, _) = listener.accept().await.unwrap();
        assert!(TlsStream::accept(adopt(tcp), server_config).await.is_err());
        total
    });
    let name = ServerName::try_from(NAME).unwrap();
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut c = TlsStream::connect(adopt(tcp), Arc::clone(&s.client), name.clone())
        .await
        .unwrap();
    assert_eq!(c.alpn_protocol(), Some(ALPN));
    assert!(c.own_records());
    let data = pattern(3 * 1024 * 1024 + 17);
    let back = timeout(send_and_read_back(&mut c, &data, true)).await;
    assert_eq!(back.len(), data.len());
    assert!(back == data, "echoed bytes differ");

    let other = Ca::new("other CA");
    let distrusting =
        client_config_with_alpn(&Trust::CaPem(other.pem.clone()), None, &[ALPN]).unwrap();
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let refused = timeout(TlsStream::connect(adopt(tcp), distrusting, name)).await;
    let err = refused.expect_err("a client that does not trust the server must fail");
    assert_eq!(err.kind(), io::ErrorKind::InvalidData, "{err}");
    assert_eq!(timeout(server).await.unwrap(), data.len());
}

/// The server's session ticket waits for its first write and goes out with it: nothing
/// reaches the client after the handshake until the server writes, and the ticket that came
/// with that write resumes the next session.
async fn tickets_go_out_with_the_first_write_on() {
    let ca = Ca::new("test CA");
    let s = setup(&ca, &ca).await;
    let mut server_config = (*s.server).clone();
    server_config.send_tls13_tickets = 1;
    let server_config = Arc::new(server_config);
    let accept = || accept_one(&s.listener, Arc::clone(&server_config));
    let (mut server, mut client) = tokio::join!(accept(), connect(&s));
    assert_eq!(server.handshake_kind(), Some(rustls::HandshakeKind::Full));
    // The server reads; nothing arrives at the client's socket meanwhile (peeked, so the
    // client's TLS does not consume it).
    let (mut one, mut other) = ([0u8; 1], [0u8; 1]);
    let idle = tokio::join!(
        tokio::time::timeout(
            Duration::from_millis(300),
            client.get_ref().0.peek(&mut one)
        ),
        tokio::time::timeout(Duration::from_millis(300), server.read(&mut other)),
    );
    assert!(
        idle.0.is_err(),
        "bytes reached the client before the server wrote: {:?}",
        idle.0
    );
    assert!(idle.1.is_err(), "the client sent nothing");
    server.write_all(b"hello").await.unwrap();
    let mut got = [0u8; 5];
    timeout(client.read_exact(&mut got)).await.unwrap();
    assert_eq!(&got, b"hello");
    // The ticket arrived with "hello": the next session resumes.
    let (second, _client2) = tokio::join!(accept(), connect(&s));
    assert_eq!(
        second.handshake_kind(),
        Some(rustls::HandshakeKind::Resumed)
    );
}

/// The session moves to another thread mid-stream with ciphertext and plaintext buffered;
/// nothing is lost or reordered.
async fn handover_to_another_thread_keeps_buffered_bytes_on() {
    let ca = Ca::new("test CA");
    let s = setup(&ca, &ca).await;
    let data = pattern(2 * 1024 * 1024 + 5);
    let accept = accept_one(&s.listener, Arc::clone(&s.server));
    let (mut server, mut client) = tokio::join!(accept, connect(&s));
    client.write_all(&data).await.unwrap();
    client.flush().await.unwrap();
    // Take a little, so some is decrypted and some still ciphertext.
    let mut first = vec![0u8; 1000];
    server.read_exact(&mut first).await.unwrap();
    let parts = server.into_parts(Bytes::from_static(b"left")).unwrap();
    let backend = crate::io::backend::current_backend();
    let other = std::thread::spawn(move || {
        crate::io::backend::block_on_worker(backend, async move {
            let (mut tls, leftover) = TlsStream::from_parts(parts).unwrap();
            assert_eq!(&leftover[..], b"left");
            let mut rest = vec![0u8; data.len() - 1000];
            tls.read_exact(&mut rest).await.unwrap();
            tls.write_all(b"done").await.unwrap();
            tls.flush().await.unwrap();
            rest
        })
        .unwrap()
    });
    let mut done = [0u8; 4];
    timeout(client.read_exact(&mut done)).await.unwrap();
    assert_eq!(&done, b"done");
    let rest = other.join().unwrap();
    let mut all = first;
    all.extend_from_slice(&rest);
    assert!(
        all == pattern(2 * 1024 * 1024 + 5),
        "bytes lost or reordered"
    );
}

/// A client certificate from another CA fails the handshake with an alert the client sees.
async fn foreign_client_certificate_is_refused_with_an_alert_on() {
    let ca = Ca::new("test CA");
    let other = Ca::new("other CA");
    let s = setup(&other, &ca).await;
    let accept = {
        let config = Arc::clone(&s.server);
        let listener = &s.listener;
        async move {
            let (tcp, _) = listener.accept().await.unwrap();
            TlsStream::accept(adopt(tcp), config).await
        }
    };
    let client = async {
        let tcp = tokio::net::TcpStream::connect(s.listener.local_addr().unwrap())
            .await
            .unwrap();
        let mut tls = tokio_rustls::TlsConnector::from(Arc::clone(&s.client))
            .connect(rustls::pki_types::ServerName::try_from(NAME).unwrap(), tcp)
            .await?;
        // TLS 1.3: the client learns of the refusal on its first read.
        let mut b = [0u8; 1];
        tls.read(&mut b).await.map(|_| ())
    };
    let (server, client) = timeout(async { tokio::join!(accept, client) }).await;
    let err = server.expect_err("the server accepted a foreign certificate");
    assert!(err.to_string().contains("certificate"), "{err}");
    let err = client.expect_err("the client did not notice the refusal");
    assert!(
        err.to_string().to_lowercase().contains("alert"),
        "the client saw no alert: {err}"
    );
}

/// Bytes that are not TLS end the handshake with an error, not a hang or a panic.
async fn garbage_fails_the_handshake_on() {
    let ca = Ca::new("test CA");
    let s = setup(&ca, &ca).await;
    let addr = s.listener.local_addr().unwrap();
    let client = async {
        let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        tcp.write_all(&[0x16, 0x03, 0x01, 0xff, 0xff, 1, 2, 3])
            .await
            .unwrap();
        tcp.write_all(&[0u8; 70_000]).await.ok();
        tcp
    };
    let accept = async {
        let (tcp, _) = s.listener.accept().await.unwrap();
        TlsStream::accept(adopt(tcp), Arc::clone(&s.server)).await
    };
    let (r, _tcp) = timeout(async { tokio::join!(accept, client) }).await;
    assert!(r.is_err());
}

/// After a good handshake the peer sends raw bytes that are not (valid) TLS records —
/// random, a plausible header over random bytes, a record cut short, a huge length: the
/// server's read ends with an error or EOF, never a panic or a hang.
async fn garbage_after_the_handshake_is_an_error_not_a_panic_on() {
    let ca = Ca::new("test CA");
    let s = setup(&ca, &ca).await;
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    for case in 0..24 {
        let len = (next() % 40_000) as usize + 1;
        let mut junk: Vec<u8> = (0..len).map(|_| next() as u8).collect();
        match case % 4 {
            // application_data header, random body
            1 => junk
                .splice(0..0, [23, 3, 3, (len >> 8) as u8, len as u8])
                .for_each(drop),
            // a record header promising more than will come
            2 => junk = vec![23, 3, 3, 0x40, 0x00, 1, 2, 3],
            // an impossible length
            3 => junk.splice(0..0, [23, 3, 3, 0xff, 0xff]).for_each(drop),
            _ => {}
        }
        let accept = accept_one(&s.listener, Arc::clone(&s.server));
        let (mut server, client) = tokio::join!(accept, connect(&s));
        let (mut tcp, _) = client.into_inner();
        tcp.write_all(&junk).await.unwrap();
        tcp.shutdown().await.unwrap();
        let r = timeout(read_to_eof_or_error(&mut server)).await;
        // Random bytes cannot authenticate: anything but a clean EOF must be an error.
        if case % 4 != 2 {
            assert!(r.is_err(), "case {case}: garbage was accepted as data");
        }
        // Once failed, the stream stays failed and writing is refused too.
        if r.is_err() {
            assert!(server.write_all(b"x").await.is_err());
        }
    }
}

/// The client side against a server that sends garbage after the handshake: errors, never
/// a panic, and a clean EOF only where the garbage is an incomplete record header.
async fn garbage_from_the_server_is_an_error_for_the_client_on() {
    let ca = Ca::new("test CA");
    let s = setup(&ca, &ca).await;
    let addr = s.listener.local_addr().unwrap();
    let name = ServerName::try_from(NAME).unwrap();
    for (case, junk) in [
        vec![0x42u8; 3000],
        [&[23u8, 3, 3, 0x01, 0x00][..], &[7u8; 256]].concat(),
        vec![23, 3, 3, 0x40, 0x00, 1, 2, 3],
        vec![23, 3, 3, 0xff, 0xff, 0, 0, 0],
        vec![21, 3, 3, 0, 2, 2, 40],
    ]
    .into_iter()
    .enumerate()
    {
        let accept = accept_one(&s.listener, Arc::clone(&s.server));
        let connect = async {
            let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
            TlsStream::connect(adopt(tcp), Arc::clone(&s.client), name.clone())
                .await
                .unwrap()
        };
        let (server, mut client) = tokio::join!(accept, connect);
        let parts = server.into_parts(Bytes::new()).unwrap();
        parts.socket.set_nonblocking(true).unwrap();
        let mut raw = tokio::net::TcpStream::from_std(parts.socket).unwrap();
        raw.write_all(&junk).await.unwrap();
        raw.shutdown().await.unwrap();
        let r = timeout(read_to_eof_or_error(&mut client)).await;
        if case != 2 {
            assert!(r.is_err(), "case {case}: garbage was accepted");
        }
        if r.is_err() {
            assert!(client.write_all(b"x").await.is_err(), "case {case}");
        }
    }
}

/// Vectored writes: many buffers of mixed sizes (a frame header's 10 bytes up to more than
/// one batch holds) arrive whole and in order, however the batches split them.
async fn vectored_writes_arrive_in_order_on() {
    let ca = Ca::new("test CA");
    let s = setup(&ca, &ca).await;
    let accept = accept_one(&s.listener, Arc::clone(&s.server));
    let (mut server, mut client) = tokio::join!(accept, connect(&s));
    assert!(server.is_write_vectored());
    let data = pattern(3 * 1024 * 1024 + 11);
    let sizes = [10usize, 32 * 1024, 1, 70 * 1024, 10, 16 * 1024 + 5, 300];
    let send = async {
        let mut off = 0;
        let mut round = 0;
        while off < data.len() {
            // Up to 12 buffers per call, sizes cycling through `sizes`.
            let mut bufs = Vec::new();
            let mut at = off;
            for k in 0..12 {
                let end = (at + sizes[(round + k) % sizes.len()]).min(data.len());
                if at == end {
                    break;
                }
                bufs.push(std::io::IoSlice::new(&data[at..end]));
                at = end;
            }
            let n = server.write_vectored(&bufs).await.unwrap();
            assert!(n > 0 && n <= at - off, "wrote {n} of {}", at - off);
            off += n;
            round += 1;
        }
        server.flush().await.unwrap();
        server.shutdown().await.unwrap();
    };
    let recv = async {
        let mut got = Vec::new();
        client.read_to_end(&mut got).await.unwrap();
        got
    };
    let ((), got) = timeout(async { tokio::join!(send, recv) }).await;
    assert_eq!(got.len(), data.len());
    assert!(got == data, "bytes differ");
}

/// A peer that stops reading stops our writer: what waits in the connection stays bounded.
async fn a_slow_reader_applies_backpressure_on() {
    let ca = Ca::new("test CA");
    let s = setup(&ca, &ca).await;
    let accept = accept_one(&s.listener, Arc::clone(&s.server));
    let (mut server, _client) = tokio::join!(accept, connect(&s));
    let chunk = vec![0x42u8; 64 * 1024];
    let mut written = 0usize;
    loop {
        match tokio::time::timeout(Duration::from_millis(300), server.write(&chunk)).await {
            Ok(Ok(n)) => written += n,
            Ok(Err(e)) => panic!("write failed: {e}"),
            Err(_) => break, // blocked: the client is not reading
        }
        assert!(written < 256 * 1024 * 1024, "writes never blocked");
    }
    assert!(
        server.buf.outgoing.len() <= MAX_OUTGOING + WRITE_SCRATCH,
        "{} bytes wait in the connection",
        server.buf.outgoing.len()
    );
}

/// Accept one connection on `listener` and run the server handshake.
async fn accept_one(listener: &tokio::net::TcpListener, config: Arc<ServerConfig>) -> TlsStream {
    let (tcp, _) = listener.accept().await.unwrap();
    TlsStream::accept(adopt(tcp), config).await.unwrap()
}

/// The server side of a test connection on this thread's backend.
fn adopt(tcp: tokio::net::TcpStream) -> crate::io::socket::Socket {
    crate::io::socket::Socket::from_std(tcp.into_std().unwrap()).unwrap()
}

#[test]
fn echo_with_tiny_reads_and_clean_close() {
    crate::io::backend::on_each_backend(echo_with_tiny_reads_and_clean_close_on);
}

#[test]
fn records_cut_anywhere_read_back_whole() {
    crate::io::backend::on_each_backend(records_cut_anywhere_read_back_whole_on);
}

#[test]
fn client_side_echo_tickets_and_refusal() {
    crate::io::backend::on_each_backend(client_side_echo_tickets_and_refusal_on);
}

#[test]
fn tickets_go_out_with_the_first_write() {
    crate::io::backend::on_each_backend(tickets_go_out_with_the_first_write_on);
}

#[test]
fn handover_to_another_thread_keeps_buffered_bytes() {
    crate::io::backend::on_each_backend(handover_to_another_thread_keeps_buffered_bytes_on);
}

#[test]
fn foreign_client_certificate_is_refused_with_an_alert() {
    crate::io::backend::on_each_backend(foreign_client_certificate_is_refused_with_an_alert_on);
}

#[test]
fn garbage_fails_the_handshake() {
    crate::io::backend::on_each_backend(garbage_fails_the_handshake_on);
}

#[test]
fn garbage_after_the_handshake_is_an_error_not_a_panic() {
    crate::io::backend::on_each_backend(garbage_after_the_handshake_is_an_error_not_a_panic_on);
}

#[test]
fn garbage_from_the_server_is_an_error_for_the_client() {
    crate::io::backend::on_each_backend(garbage_from_the_server_is_an_error_for_the_client_on);
}

#[test]
fn a_slow_reader_applies_backpressure() {
    crate::io::backend::on_each_backend(a_slow_reader_applies_backpressure_on);
}

#[test]
fn vectored_writes_arrive_in_order() {
    crate::io::backend::on_each_backend(vectored_writes_arrive_in_order_on);
}
