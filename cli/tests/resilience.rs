//! The fleet survives its parts failing: a killed and restarted Proxy (agents reconnect within
//! 10 s and new sessions work), Auth stopped while sessions run (the agents spool their audit
//! events and deliver every one once Auth is back), and garbage on every ALPN (only that
//! connection closes, with a logged reason; other sessions carry on).

// Test code: a failing unwrap or panic is a failing test, which is the point.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use std::io::{Read, Write};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{Daemon, Fleet, openssh};

#[test]
fn proxy_restart_and_auth_outage() {
    let mut f = Fleet::start(
        "resilience",
        &[("node1", "env=dev", vec![]), ("node2", "env=prod", vec![])],
    );
    let home = tempfile::tempdir().unwrap();
    f.user(home.path(), "alice", "access", &f.login, &[]);
    f.wait_for_nodes(home.path(), 2);
    let config = f.ssh_config(home.path());
    let dest = format!("{}@node1", f.login);
    assert_eq!(openssh(&config, &[], &dest, &["true"], None).status, 0);

    // Kill the proxy hard and start it again on the same address with the same identity.
    let proxy_args: Vec<String> = vec![
        "--roles".into(),
        "proxy".into(),
        "--auth".into(),
        f.auth_addr.clone(),
        "--ca-pin".into(),
        f.pin.clone(),
        "--proxy-addr".into(),
        f.proxy_addr.clone(),
        "--diag-addr".into(),
        "127.0.0.2:0".into(),
        "--data-dir".into(),
        f.dir.path().join("proxy").display().to_string(),
        "--node-name".into(),
        "proxy1".into(),
    ];
    f.proxy.kill_hard();
    f.proxy = Daemon::start(&proxy_args, f.dir.path().join("proxy2.log"));
    // Measured from when the new proxy listens (its start on a loaded machine is not the
    // agents' reconnect). Their backoff is capped at 8 s; 30 s without a tunnel is a failure to
    // reconnect, not slowness.
    let restarted = Instant::now();
    // Both agents reconnect: new sessions to each work.
    for node in ["node1", "node2"] {
        loop {
            let out = openssh(
                &config,
                &[],
                &format!("{}@{node}", f.login),
                &["echo", "back"],
                None,
            );
            if out.status == 0 && out.stdout == "back\n" {
                break;
            }
            assert!(
                restarted.elapsed() < Duration::from_secs(30),
                "{node} not reachable 30 s after the proxy restarted: {}",
                out.stderr
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    let reconnect = restarted.elapsed();
    eprintln!("agents reachable {reconnect:?} after the proxy restart");

    // Stop Auth. Sessions keep working (the agents use cached role definitions) and their
    // audit events wait in the agents' spools.
    f.auth.stop();
    const SESSIONS: usize = 6;
    for i in 0..SESSIONS {
        let node = if i % 2 == 0 { "node1" } else { "node2" };
        let out = openssh(
            &config,
            &[],
            &format!("{}@{node}", f.login),
            &["echo", &format!("outage-{i}")],
            None,
        );
        assert_eq!(
            out.status, 0,
            "session {i} during the Auth outage: {}",
            out.stderr
        );
    }
    // Auth comes back on the same address and data dir.
    let auth_args: Vec<String> = vec![
        "--roles".into(),
        "auth".into(),
        "--cluster-name".into(),
        "resilience".into(),
        "--auth-addr".into(),
        f.auth_addr.clone(),
        "--diag-addr".into(),
        "127.0.0.1:0".into(),
        "--data-dir".into(),
        f.auth_data().display().to_string(),
    ];
    f.auth = Daemon::start(&auth_args, f.dir.path().join("auth2.log"));
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let execs = f.events("exec");
        let outage: Vec<_> = execs
            .iter()
            .filter(|e| {
                e["data"]["command"]
                    .as_str()
                    .unwrap_or("")
                    .starts_with("echo outage-")
            })
            .collect();
        if outage.len() >= SESSIONS {
            // Each session's event exactly once, and no event stored twice (retries deduplicated).
            // (Events of sessions before the outage may still be arriving from the spools.)
            for i in 0..SESSIONS {
                let n = outage
                    .iter()
                    .filter(|e| e["data"]["command"] == format!("echo outage-{i}"))
                    .count();
                assert_eq!(n, 1, "outage-{i} stored {n} times");
            }
            let ids: std::collections::HashSet<&str> = execs
                .iter()
                .map(|e| e["event_id"].as_str().unwrap())
                .collect();
            assert_eq!(ids.len(), execs.len(), "an event was stored twice");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "only {} of {SESSIONS} spooled exec events arrived",
            outage.len()
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}

fn tls_client(
    alpn: &[u8],
    identity: Option<(String, String)>,
    ca: &str,
) -> Arc<rustls::ClientConfig> {
    gatehouse_controlplane::tls::client_config_with_alpn(
        &gatehouse_controlplane::tls::Trust::CaPem(ca.to_owned()),
        identity.as_ref().map(|(c, k)| (c.as_str(), k.as_str())),
        &[alpn],
    )
    .unwrap()
}

/// TLS to the proxy with blocking I/O, send `garbage`, and read until the proxy closes.
fn send_garbage(addr: &str, config: Arc<rustls::ClientConfig>, garbage: &[u8]) -> Duration {
    let name = rustls::pki_types::ServerName::try_from(
        gatehouse_controlplane::identity::PROXY_SERVER_NAME,
    )
    .unwrap();
    let conn = rustls::ClientConnection::new(config, name).unwrap();
    let tcp = std::net::TcpStream::connect(addr).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut tls = rustls::StreamOwned::new(conn, tcp);
    let started = Instant::now();
    let _ = tls.write_all(garbage);
    let _ = tls.flush();
    let mut buf = [0u8; 4096];
    loop {
        match tls.read(&mut buf) {
            Ok(0) | Err(_) => return started.elapsed(),
            Ok(_) => {}
        }
    }
}

/// A socket that sends what it is given in pieces of at most `piece` bytes, each its own
/// segment (`TCP_NODELAY` and a pause between them), the way a large ClientHello arrives over
/// a real link.
struct InPieces {
    tcp: std::net::TcpStream,
    piece: usize,
}

impl Read for InPieces {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.tcp.read(buf)
    }
}

impl Write for InPieces {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = buf.len().min(self.piece);
        self.tcp.write_all(&buf[..n])?;
        std::thread::sleep(Duration::from_millis(30));
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.tcp.flush()
    }
}

/// A TLS handshake through the proxy, with the ClientHello sent in pieces: the name the server
/// presented, once the handshake is done.
fn handshake_in_pieces(addr: &str, config: Arc<rustls::ClientConfig>, server: &str) -> bool {
    let name = rustls::pki_types::ServerName::try_from(server.to_owned()).unwrap();
    let mut conn = rustls::ClientConnection::new(config, name).unwrap();
    let tcp = std::net::TcpStream::connect(addr).unwrap();
    tcp.set_nodelay(true).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut io = InPieces { tcp, piece: 64 };
    while conn.is_handshaking() {
        if conn.complete_io(&mut io).is_err() {
            return false;
        }
    }
    true
}

#[test]
fn garbage_on_every_alpn_closes_only_that_connection() {
    let f = Fleet::start("garbage", &[("node1", "env=dev", vec![])]);
    let home = tempfile::tempdir().unwrap();
    f.user(home.path(), "alice", "access", &f.login, &[]);
    f.wait_for_nodes(home.path(), 1);
    let config = f.ssh_config(home.path());
    // A session that outlives all the garbage.
    let dest = format!("{}@node1", f.login);
    let long = {
        let (config, dest) = (config.clone(), dest.clone());
        std::thread::spawn(move || {
            openssh(
                &config,
                &[],
                &dest,
                &["sleep", "3;", "echo", "survived"],
                None,
            )
        })
    };
    std::thread::sleep(Duration::from_millis(500));

    let ca = std::fs::read_to_string(home.path().join("ca.pem")).unwrap();
    let user = Some((
        std::fs::read_to_string(home.path().join("tls.crt")).unwrap(),
        std::fs::read_to_string(home.path().join("tls.key")).unwrap(),
    ));
    let agent_id: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(f.dir.path().join("node1/agent/identity.json")).unwrap(),
    )
    .unwrap();
    let node = Some((
        agent_id["tls_cert"].as_str().unwrap().to_string(),
        agent_id["tls_key"].as_str().unwrap().to_string(),
    ));

    // Not TLS at all.
    let mut raw = std::net::TcpStream::connect(&f.proxy_addr).unwrap();
    raw.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    raw.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut sink = Vec::new();
    let _ = raw.read_to_end(&mut sink);
    // Each ALPN with garbage after the handshake (the tunnel one also with a valid hello first).
    send_garbage(
        &f.proxy_addr,
        tls_client(b"gatehouse-ssh", user.clone(), &ca),
        b"\xff\xff\xff\xffnot a request",
    );
    send_garbage(
        &f.proxy_addr,
        tls_client(b"gatehouse-tcp", user.clone(), &ca),
        b"\x00\x00\x00\x05{{{{{",
    );
    send_garbage(
        &f.proxy_addr,
        tls_client(b"gatehouse-tunnel", node.clone(), &ca),
        b"\x42garbage frames\x00\x00\x00\x00\x00",
    );
    let mut wire = bytes::BytesMut::new();
    gatehouse_proto::tunnel::Frame::Hello {
        version: 1,
        initial_window: 65536,
        max_frame: 16384,
    }
    .encode(&mut wire);
    wire.extend_from_slice(&[0x05, 0, 0, 0, 0, 7, 0, 0, 0, 3, b'x', b'y', b'z']); // data on a never-opened stream
    send_garbage(
        &f.proxy_addr,
        tls_client(b"gatehouse-tunnel", node, &ca),
        &wire,
    );
    // The wrong identity for the protocol: a user certificate on the tunnel port.
    send_garbage(
        &f.proxy_addr,
        tls_client(b"gatehouse-tunnel", user.clone(), &ca),
        b"x",
    );
    // Garbage to Auth through the pass-through.
    send_garbage(
        &f.proxy_addr,
        tls_client(b"gatehouse-auth", user.clone(), &ca),
        b"PRI * garbage\r\n\r\n",
    );
    // A ClientHello that arrives in 64-byte pieces is read as they come, and every byte of it
    // reaches the server that the ALPN picks: the proxy's TLS or, passed through, Auth's.
    for (alpn, server) in [
        (
            &b"gatehouse-ssh"[..],
            gatehouse_controlplane::identity::PROXY_SERVER_NAME,
        ),
        (
            &b"gatehouse-auth"[..],
            gatehouse_controlplane::identity::AUTH_SERVER_NAME,
        ),
    ] {
        assert!(
            handshake_in_pieces(&f.proxy_addr, tls_client(alpn, user.clone(), &ca), server),
            "handshake for {} with a split ClientHello",
            String::from_utf8_lossy(alpn)
        );
    }

    let out = long.join().unwrap();
    assert_eq!(out.status, 0, "{}", out.stderr);
    assert_eq!(out.stdout, "survived\n");
    // Still serving new sessions.
    assert_eq!(
        openssh(&config, &[], &dest, &["echo", "ok"], None).stdout,
        "ok\n"
    );
    let log = f.proxy.log();
    for reason in [
        "not a TLS client",
        "malformed session request",
        "malformed frame",
        "never opened",
        "wrong identity for this protocol",
    ] {
        assert!(log.contains(reason), "proxy log lacks `{reason}`:\n{log}");
    }
}
