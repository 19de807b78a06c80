//! A TCP app behind an agent: 128 MiB through `gsh proxy tcp` and back, checksums matching.

// Test code: a failing unwrap or panic is a failing test, which is the point.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{Fleet, bin};
use sha2::{Digest, Sha256};

/// An echo server on 127.0.0.9: each connection gets its bytes back.
fn echo_server() -> std::net::SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.9:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            std::thread::spawn(move || {
                let mut w = conn.try_clone().unwrap();
                let _ = std::io::copy(&mut conn, &mut w);
                let _ = w.shutdown(std::net::Shutdown::Write);
            });
        }
    });
    addr
}

#[test]
fn hundred_mib_round_trip_through_gsh_proxy_tcp() {
    let echo = echo_server();
    let f = Fleet::start(
        "apps",
        &[(
            "node1",
            "env=dev",
            vec!["--app".into(), format!("echo={echo}")],
        )],
    );
    let home = tempfile::tempdir().unwrap();
    f.user(home.path(), "alice", "access", &f.login, &[]);
    f.wait_for_nodes(home.path(), 1);
    let ls = f.gsh(home.path(), &["ls"], None).ok().stdout;
    assert!(ls.contains("tcp:echo"), "{ls}");

    let mut fwd = Command::new(bin("gsh"))
        .args(["proxy", "tcp", "echo", "--listen", "127.0.0.1:0"])
        .env("GATEHOUSE_HOME", home.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(fwd.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let local = line.split_whitespace().nth(1).unwrap().to_string();

    const SIZE: usize = 128 * 1024 * 1024;
    let mut conn = std::net::TcpStream::connect(&local).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    let mut reader = conn.try_clone().unwrap();
    let started = Instant::now();
    let writer = std::thread::spawn(move || {
        let mut hash = Sha256::new();
        let mut block = vec![0u8; 1 << 20];
        let mut state = 0x9E37_79B9_7F4A_7C15u64;
        for _ in 0..SIZE / block.len() {
            for b in block.iter_mut() {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                *b = state as u8;
            }
            hash.update(&block);
            conn.write_all(&block).unwrap();
        }
        conn.shutdown(std::net::Shutdown::Write).unwrap();
        hash.finalize()
    });
    let mut hash = Sha256::new();
    let mut got = 0usize;
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = reader.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        hash.update(&buf[..n]);
        got += n;
    }
    let sent = writer.join().unwrap();
    let elapsed = started.elapsed();
    let _ = fwd.kill();
    let _ = fwd.wait();
    assert_eq!(got, SIZE);
    assert_eq!(hash.finalize(), sent, "checksums differ");
    eprintln!(
        "128 MiB each way in {elapsed:?} ({:.0} MiB/s, debug build)",
        (2 * SIZE) as f64 / 1048576.0 / elapsed.as_secs_f64()
    );

    // An app that does not exist: a clear error naming what exists.
    let mut fwd = Command::new(bin("gsh"))
        .args(["proxy", "tcp", "nope", "--listen", "127.0.0.1:0"])
        .env("GATEHOUSE_HOME", home.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(fwd.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let local = line.split_whitespace().nth(1).unwrap().to_string();
    let mut c = std::net::TcpStream::connect(&local).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut sink = Vec::new();
    let _ = c.read_to_end(&mut sink);
    let _ = fwd.kill();
    let mut err = String::new();
    fwd.stderr.take().unwrap().read_to_string(&mut err).unwrap();
    let _ = fwd.wait();
    assert!(
        err.contains("no app named `nope`") && err.contains("echo@node1"),
        "{err}"
    );
}
