//! A TCP app behind an agent: 128 MiB through `gsh proxy tcp` and back, checksums matching; a
//! client that stops reading stalls the app, and an app that stops reading stalls the client,
//! over TLS and QUIC tunnels, without growing the proxy's or the agent's memory.

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
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::{Fleet, cert_expiry, echo_server, forward, sleep_past};
use sha2::{Digest, Sha256};

/// `n` agents, `node1` … `nodeN`, each serving one echo server as its app `echo1` … `echoN`,
/// with `extra` arguments: (node name, agent arguments).
fn echo_agents(n: usize, extra: &[&str]) -> Vec<(String, Vec<String>)> {
    let echo = echo_server();
    (1..=n)
        .map(|i| {
            let mut args = vec!["--app".to_string(), format!("echo{i}={echo}")];
            args.extend(extra.iter().map(|a| a.to_string()));
            (format!("node{i}"), args)
        })
        .collect()
}

/// [`echo_agents`] as [`Fleet::start_with`] takes them (labels `env=dev`).
fn agent_args(agents: &[(String, Vec<String>)]) -> Vec<(&str, &str, Vec<String>)> {
    agents
        .iter()
        .map(|(name, args)| (name.as_str(), "env=dev", args.clone()))
        .collect()
}

/// A cluster with one node, `node1` (`env=dev`), serving an echo server as the app `echo`.
fn echo_fleet(name: &str) -> Fleet {
    let echo = echo_server();
    Fleet::start(
        name,
        &[(
            "node1",
            "env=dev",
            vec!["--app".into(), format!("echo={echo}")],
        )],
    )
}

#[test]
fn hundred_mib_round_trip_through_gsh_proxy_tcp() {
    let f = echo_fleet("apps");
    let home = tempfile::tempdir().unwrap();
    f.user(home.path(), "alice", "access", &f.login, &[]);
    f.wait_for_nodes(home.path(), 1);
    let ls = f.gsh(home.path(), &["ls"], None).ok().stdout;
    assert!(ls.contains("tcp:echo"), "{ls}");
    round_trip(home.path(), 128 * 1024 * 1024);

    // An app that does not exist: a clear error naming what exists.
    let (mut fwd, local) = forward(home.path(), "nope");
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

/// A source on 127.0.0.9: each connection gets an endless stream in which the byte at offset `i`
/// is `i % 251`, written until the peer goes away; `written` counts what the socket took.
fn source_server(written: Arc<AtomicU64>) -> std::net::SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.9:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            let written = Arc::clone(&written);
            std::thread::spawn(move || {
                let block: Vec<u8> = (0..251 * 256).map(|i| (i % 251) as u8).collect();
                // `block[at..]` starts where the pattern stands after what was written.
                let mut at = 0;
                while let Ok(n) = conn.write(&block[at..]) {
                    if n == 0 {
                        break;
                    }
                    written.fetch_add(n as u64, Ordering::Relaxed);
                    at = (at + n) % 251;
                }
            });
        }
    });
    addr
}

/// Resident memory of a process, in KiB.
fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap()
}

/// Read `n` bytes of the source's stream from `conn`, starting at `offset`, checking each.
fn read_pattern(conn: &mut std::net::TcpStream, offset: &mut u64, n: u64) {
    let mut buf = vec![0u8; 1 << 16];
    let end = *offset + n;
    while *offset < end {
        let want = usize::try_from(end - *offset).unwrap().min(buf.len());
        let got = conn.read(&mut buf[..want]).unwrap();
        assert!(got > 0, "the stream ended at offset {offset}");
        for (i, b) in buf[..got].iter().enumerate() {
            let at = *offset + i as u64;
            assert_eq!(u64::from(*b), at % 251, "byte at offset {at}");
        }
        *offset += got as u64;
    }
}

/// A client that stops reading stalls the app behind the agent instead of filling memory: the
/// app's writes stop (backpressure reaches it through `gsh`, the proxy, the tunnel's stream
/// window and the agent), neither the proxy's nor the agent's memory grows with what the app
/// tried to send, and when the client reads again every byte arrives, in order.
#[test]
fn a_client_that_stops_reading_stalls_the_app_without_growing_memory() {
    client_stall("stall", &[], 8 << 10);
}

/// The same over a QUIC tunnel: quinn's flow control carries the backpressure, and what the
/// proxy may hold for the stalled stream is quinn's receive window (8 MiB per stream).
#[test]
fn a_client_that_stops_reading_stalls_the_app_over_quic() {
    client_stall("stallquic", &["--tunnel-transport", "quic"], 16 << 10);
}

/// A cluster whose one agent (started with `agent_args`) serves `addr` as the app `app`, and a
/// user's home logged in to it.
fn app_fleet(
    cluster: &str,
    app: &str,
    addr: std::net::SocketAddr,
    agent_args: &[&str],
) -> (Fleet, tempfile::TempDir) {
    let mut args = vec!["--app".to_string(), format!("{app}={addr}")];
    args.extend(agent_args.iter().map(|a| a.to_string()));
    let f = Fleet::start(cluster, &[("node1", "env=dev", args)]);
    let home = tempfile::tempdir().unwrap();
    f.user(home.path(), "alice", "access", &f.login, &[]);
    f.wait_for_nodes(home.path(), 1);
    (f, home)
}

/// Poll `count` until it has not grown for 3 s (at most 60 s), calling `check` with each value
/// (it fails the test early if the count or a process's memory runs away). Returns the count.
fn wait_until_stalled(count: &AtomicU64, mut check: impl FnMut(u64)) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut last = (count.load(Ordering::Relaxed), Instant::now());
    loop {
        std::thread::sleep(Duration::from_millis(250));
        let now = count.load(Ordering::Relaxed);
        check(now);
        if now != last.0 {
            last = (now, Instant::now());
        } else if last.1.elapsed() > Duration::from_secs(3) {
            return now;
        }
        assert!(
            Instant::now() < deadline,
            "the writer never stopped: {now} bytes"
        );
    }
}

/// A client stall with the agent started with `agent_args`; `stall_kib` bounds what the stall
/// itself may add to the proxy's and the agent's RSS.
fn client_stall(cluster: &str, agent_args: &[&str], stall_kib: u64) {
    let written = Arc::new(AtomicU64::new(0));
    let source = source_server(Arc::clone(&written));
    let (f, home) = app_fleet(cluster, "source", source, agent_args);
    let (proxy, agent) = (f.proxy.child.id(), f.agents[0].child.id());
    let (proxy0, agent0) = (rss_kib(proxy), rss_kib(agent));

    let (fwd, local) = forward(home.path(), "source");
    let _fwd = KillOnDrop(fwd);
    let mut conn = std::net::TcpStream::connect(&local).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut offset = 0;
    // The stream flows (and its windows grow) before the client stops reading.
    read_pattern(&mut conn, &mut offset, 64 << 20);
    let (proxy_flowing, agent_flowing) = (rss_kib(proxy), rss_kib(agent));

    // Stalled: what the app has written stops growing once every buffer on the way is full.
    // Kernel socket buffers (four connections on the way, auto-tuned) and the stream window hold
    // what is in flight; a path without backpressure takes all the app writes (checked as it
    // goes, so such a regression fails here rather than filling the machine's memory).
    let stalled_at = wait_until_stalled(&written, |now| {
        assert!(
            now - offset < 256 << 20,
            "the app kept writing to a client that reads nothing: {} MiB in flight",
            (now - offset) >> 20
        );
        let grown = rss_kib(proxy).saturating_sub(proxy_flowing);
        assert!(grown < 64 << 10, "the proxy grew by {grown} KiB");
    });
    let in_flight = stalled_at - offset;
    let (proxy1, agent1) = (rss_kib(proxy), rss_kib(agent));
    eprintln!(
        "stalled with {} MiB in flight; RSS before the session, while it flowed, stalled: \
         proxy {proxy0} / {proxy_flowing} / {proxy1} KiB, agent {agent0} / {agent_flowing} / {agent1} KiB",
        in_flight >> 20,
    );
    // The stall itself adds at most a stream window's worth; the session as a whole, that and
    // what a worker keeps for bulk transfers (its send buffers and the ring's receive buffers,
    // faulted in as they are first used).
    for (who, before, flowing, stalled) in [
        ("proxy", proxy0, proxy_flowing, proxy1),
        ("agent", agent0, agent_flowing, agent1),
    ] {
        assert!(
            stalled.saturating_sub(flowing) < stall_kib
                && stalled.saturating_sub(before) < stall_kib + (16 << 10),
            "{who} RSS grew from {before} (before) and {flowing} (flowing) to {stalled} KiB \
             with a stalled stream"
        );
    }

    // Reading again: everything the app wrote arrives, in order, and more after it.
    read_pattern(&mut conn, &mut offset, in_flight + (16 << 20));
}

/// A slow app on 127.0.0.9: each connection is left unread until `go` is set, then read to the
/// end, each byte checked against the pattern (`i % 251` at offset `i`); `received` counts the
/// bytes that matched.
fn slow_app(go: Arc<AtomicBool>, received: Arc<AtomicU64>) -> std::net::SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.9:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            let (go, received) = (Arc::clone(&go), Arc::clone(&received));
            std::thread::spawn(move || {
                while !go.load(Ordering::Relaxed) {
                    std::thread::sleep(Duration::from_millis(20));
                }
                let mut buf = vec![0u8; 1 << 16];
                let mut at = 0u64;
                while let Ok(n) = conn.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    for b in &buf[..n] {
                        if u64::from(*b) != at % 251 {
                            return;
                        }
                        at += 1;
                    }
                    received.store(at, Ordering::Relaxed);
                }
            });
        }
    });
    addr
}

/// The other way round: an app that stops reading stalls the client. Its writes stop once the
/// buffers on the way are full (the agent stops reading the tunnel's stream when the app's socket
/// is full, the window stops the proxy, the proxy stops reading the client), neither the proxy's
/// nor the agent's memory grows with what the client tried to send, and when the app reads again
/// every byte arrives, in order.
#[test]
fn an_app_that_stops_reading_stalls_the_client_without_growing_memory() {
    app_stall("slowapp", &[]);
}

/// The same over a QUIC tunnel: the agent's quinn receive window stops the proxy's sends.
#[test]
fn an_app_that_stops_reading_stalls_the_client_over_quic() {
    app_stall("slowappquic", &["--tunnel-transport", "quic"]);
}

/// An app stall with the agent started with `agent_args`.
fn app_stall(cluster: &str, agent_args: &[&str]) {
    let (go, received) = (
        Arc::new(AtomicBool::new(false)),
        Arc::new(AtomicU64::new(0)),
    );
    let app = slow_app(Arc::clone(&go), Arc::clone(&received));
    let (f, home) = app_fleet(cluster, "slow", app, agent_args);
    let (proxy, agent) = (f.proxy.child.id(), f.agents[0].child.id());
    let (proxy0, agent0) = (rss_kib(proxy), rss_kib(agent));

    let (fwd, local) = forward(home.path(), "slow");
    let _fwd = KillOnDrop(fwd);
    let conn = std::net::TcpStream::connect(&local).unwrap();
    let sent = Arc::new(AtomicU64::new(0));
    let writer = {
        let (mut conn, sent) = (conn.try_clone().unwrap(), Arc::clone(&sent));
        std::thread::spawn(move || {
            let block: Vec<u8> = (0..251 * 256).map(|i| (i % 251) as u8).collect();
            // 256 MiB in all: far more than the buffers on the way hold.
            for _ in 0..(256 << 20) / block.len() {
                conn.write_all(&block).unwrap();
                sent.fetch_add(block.len() as u64, Ordering::Relaxed);
            }
            conn.shutdown(std::net::Shutdown::Write).unwrap();
            sent.load(Ordering::Relaxed)
        })
    };

    let stalled_at = wait_until_stalled(&sent, |now| {
        assert!(
            now < 192 << 20,
            "the client kept writing to an app that reads nothing: {} MiB",
            now >> 20
        );
        let grown = rss_kib(proxy).saturating_sub(proxy0);
        assert!(grown < 64 << 10, "the proxy grew by {grown} KiB");
    });
    let (proxy1, agent1) = (rss_kib(proxy), rss_kib(agent));
    eprintln!(
        "stalled with {} MiB written; RSS before the session and stalled: proxy {proxy0} / \
         {proxy1} KiB, agent {agent0} / {agent1} KiB",
        stalled_at >> 20,
    );
    for (who, before, stalled) in [("proxy", proxy0, proxy1), ("agent", agent0, agent1)] {
        assert!(
            stalled.saturating_sub(before) < 24 << 10,
            "{who} RSS grew from {before} to {stalled} KiB with a stalled stream"
        );
    }

    // The app reads again: everything the client sent (256 MiB) arrives, in order.
    go.store(true, Ordering::Relaxed);
    let total = writer.join().unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    while received.load(Ordering::Relaxed) < total {
        assert!(
            Instant::now() < deadline,
            "the app got {} of {total} bytes (in order)",
            received.load(Ordering::Relaxed)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A child process killed when the test ends, pass or fail.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// New tunnels go to the proxy worker holding the fewest, whatever worker the kernel's
/// `SO_REUSEPORT` hash gave the connection: eight agents on a proxy with four workers hold two
/// tunnels per worker (left to the hash, that happens in ~4 % of runs), and a session reaches
/// the app behind each of them (tunnels handed to another worker serve like any other).
#[test]
fn tunnels_spread_over_the_proxys_workers() {
    let apps = echo_agents(8, &[]);
    let f = Fleet::start_with("spread", &["--proxy-workers", "4"], &agent_args(&apps));
    let home = tempfile::tempdir().unwrap();
    f.user(home.path(), "alice", "access", &f.login, &[]);
    f.wait_for_nodes(home.path(), 8);
    let metrics = f.proxy_metrics();
    assert!(metrics.contains("gatehouse_proxy_tunnels 8"), "{metrics}");
    for core in 0..4 {
        let line = format!("gatehouse_proxy_worker_tunnels{{core=\"{core}\"}} 2");
        assert!(metrics.contains(&line), "{line} missing:\n{metrics}");
    }
    for i in 1..=8 {
        round_trip_app(home.path(), &format!("echo{i}"), 1 << 20);
    }
}

/// A NAT between agents and the proxy (127.0.0.60): TCP relayed as is; each client's UDP
/// leaves from a port of its own, and after [`Nat::rebind`] from a new port once the client
/// sends again (as a NAT does when a mapping has expired), the old one answering until then.
struct Nat {
    addr: std::net::SocketAddr,
    target: Arc<std::sync::OnceLock<std::net::SocketAddr>>,
    generation: Arc<AtomicU64>,
    /// Datagrams from the target that came back through a port opened after a rebind.
    answered_after_rebind: Arc<AtomicU64>,
    _stop: tokio::sync::oneshot::Sender<()>,
}

impl Nat {
    fn start() -> Self {
        let tcp = std::net::TcpListener::bind("127.0.0.60:0").unwrap();
        let addr = tcp.local_addr().unwrap();
        let udp = std::net::UdpSocket::bind(addr).unwrap();
        tcp.set_nonblocking(true).unwrap();
        udp.set_nonblocking(true).unwrap();
        let target: Arc<std::sync::OnceLock<std::net::SocketAddr>> = Arc::default();
        let generation = Arc::new(AtomicU64::new(0));
        let answered = Arc::new(AtomicU64::new(0));
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let (t, g, a) = (target.clone(), generation.clone(), answered.clone());
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                tokio::select! {
                    _ = Self::run(tcp, udp, t, g, a) => {}
                    _ = stopped => {}
                }
            });
        });
        Self {
            addr,
            target,
            generation,
            answered_after_rebind: answered,
            _stop: stop,
        }
    }

    /// Forward to `proxy`; returns the address to dial instead.
    fn forward_to(&self, proxy: &str) -> String {
        self.target.set(proxy.parse().unwrap()).unwrap();
        self.addr.to_string()
    }

    fn rebind(&self) {
        self.generation.fetch_add(1, Ordering::SeqCst);
    }

    async fn run(
        tcp: std::net::TcpListener,
        udp: std::net::UdpSocket,
        target: Arc<std::sync::OnceLock<std::net::SocketAddr>>,
        generation: Arc<AtomicU64>,
        answered: Arc<AtomicU64>,
    ) {
        let tcp = tokio::net::TcpListener::from_std(tcp).unwrap();
        let udp = Arc::new(tokio::net::UdpSocket::from_std(udp).unwrap());
        let t = target.clone();
        tokio::spawn(async move {
            while let Ok((mut c, _)) = tcp.accept().await {
                let Some(&to) = t.get() else { continue };
                tokio::spawn(async move {
                    if let Ok(mut up) = tokio::net::TcpStream::connect(to).await {
                        let _ = tokio::io::copy_bidirectional(&mut c, &mut up).await;
                    }
                });
            }
        });
        // client address -> (generation, the port it leaves from, its return task)
        type Mapping = (u64, Arc<tokio::net::UdpSocket>, tokio::task::JoinHandle<()>);
        let mut mappings: std::collections::HashMap<std::net::SocketAddr, Mapping> =
            Default::default();
        let mut buf = vec![0u8; 65536];
        loop {
            let Ok((n, from)) = udp.recv_from(&mut buf).await else {
                continue;
            };
            let Some(&to) = target.get() else { continue };
            let now = generation.load(Ordering::SeqCst);
            let fresh = !matches!(mappings.get(&from), Some((g, _, _)) if *g == now);
            if fresh {
                let out = Arc::new(tokio::net::UdpSocket::bind("127.0.0.60:0").await.unwrap());
                let (back, out2, answered) = (udp.clone(), out.clone(), answered.clone());
                let task = tokio::spawn(async move {
                    let mut buf = vec![0u8; 65536];
                    while let Ok((n, _)) = out2.recv_from(&mut buf).await {
                        if now > 0 {
                            answered.fetch_add(1, Ordering::SeqCst);
                        }
                        let _ = back.send_to(&buf[..n], from).await;
                    }
                });
                if let Some((_, _, old)) = mappings.insert(from, (now, out, task)) {
                    old.abort();
                }
            }
            if let Some((_, out, _)) = mappings.get(&from) {
                let _ = out.send_to(&buf[..n], to).await;
            }
        }
    }
}

/// QUIC tunnels are served by every proxy worker, each endpoint on a socket of its own, and a
/// tunnel keeps its worker when the agent's address changes: eight agents behind a NAT reach a
/// four-worker proxy, land on more than one worker (the kernel picks by their first connection
/// ID), carry sessions, then the NAT gives every agent a new port; sessions still reach every
/// app and no agent reconnected. Without the kernel steering datagrams by connection ID, a
/// datagram from a new address lands on a worker picked by the new address, which does not
/// know the connection (three times in four here, for each of the eight).
#[test]
fn quic_tunnels_spread_over_the_workers_and_survive_a_new_address() {
    let apps = echo_agents(8, &["--tunnel-transport", "quic"]);
    let nat = Nat::start();
    let f = Fleet::start_via(
        "quicnat",
        &["--proxy-workers", "4"],
        &agent_args(&apps),
        |proxy| nat.forward_to(proxy),
    );
    let home = tempfile::tempdir().unwrap();
    f.user(home.path(), "alice", "access", &f.login, &[]);
    f.wait_for_nodes(home.path(), 8);
    let metrics = f.proxy_metrics();
    assert!(metrics.contains("gatehouse_proxy_tunnels 8"), "{metrics}");
    let busy = (0..4)
        .filter(|core| {
            let zero = format!("gatehouse_proxy_worker_tunnels{{core=\"{core}\"}} 0\n");
            let line = format!("gatehouse_proxy_worker_tunnels{{core=\"{core}\"}} ");
            metrics.contains(&line) && !metrics.contains(&zero)
        })
        .count();
    // (All eight on one worker: one run in 4^7.)
    assert!(busy >= 2, "QUIC tunnels on {busy} worker(s):\n{metrics}");
    for i in 1..=8 {
        round_trip_app(home.path(), &format!("echo{i}"), 1 << 20);
    }
    nat.rebind();
    for i in 1..=8 {
        round_trip_app(home.path(), &format!("echo{i}"), 1 << 20);
    }
    assert!(
        nat.answered_after_rebind.load(Ordering::SeqCst) > 0,
        "the proxy never answered through the new ports"
    );
    for (i, agent) in f.agents.iter().enumerate() {
        let log = agent.log();
        assert_eq!(
            log.matches("agent: tunnel up").count(),
            1,
            "node{} reconnected:\n{log}",
            i + 1
        );
    }
    let metrics = f.proxy_metrics();
    assert!(metrics.contains("gatehouse_proxy_tunnels 8"), "{metrics}");
}

/// The same app behind an agent whose tunnel runs over QUIC: bytes both ways, checksums
/// matching; the proxy lists the node like any other.
#[test]
fn round_trip_through_a_quic_tunnel() {
    let echo = echo_server();
    let f = Fleet::start(
        "quic",
        &[(
            "node1",
            "env=dev",
            vec![
                "--app".into(),
                format!("echo={echo}"),
                "--tunnel-transport".into(),
                "quic".into(),
            ],
        )],
    );
    let home = tempfile::tempdir().unwrap();
    f.user(home.path(), "alice", "access", &f.login, &[]);
    f.wait_for_nodes(home.path(), 1);
    let ls = f.gsh(home.path(), &["ls"], None).ok().stdout;
    assert!(ls.contains("tcp:echo"), "{ls}");
    // Both ends offer sessions on QUIC streams of their own, and agree on it.
    let metrics = f.proxy_metrics();
    assert!(
        metrics.contains("gatehouse_proxy_quic_stream_tunnels 1"),
        "{metrics}"
    );
    round_trip(home.path(), 16 * 1024 * 1024);

    // A certificate of this cluster that is not a node's (the admin's) may not hold a tunnel
    // over QUIC either: the proxy closes the connection and counts the refusal.
    let admin = f.dir.path().join("auth/admin");
    let read = |n: &str| std::fs::read_to_string(admin.join(n)).unwrap();
    let tls = gatehouse_controlplane::tls::client_config_with_alpn(
        &gatehouse_controlplane::tls::Trust::CaPem(read("ca.pem")),
        Some((&read("tls.crt"), &read("tls.key"))),
        &[b"gatehouse-tunnel"],
    )
    .unwrap();
    let quic = gatehouse_dataplane::io::quic::client_config(&tls).unwrap();
    let proxy = f.proxy_addr.clone();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let refused = rt.block_on(async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let endpoint =
            gatehouse_dataplane::io::quic::client_endpoint("127.0.0.1:0".parse().unwrap()).unwrap();
        // The proxy's refusal may already reach the dial (it closes the connection as soon as
        // it has seen the certificate, sometimes before the stream is open).
        let (_conn, mut stream) =
            gatehouse_dataplane::io::quic::dial(&endpoint, quic, &proxy).await?;
        // The stream reaches the proxy with its first bytes; then the proxy's verdict.
        let _ = stream.write_all(b"hello?").await;
        let mut buf = [0u8; 16];
        tokio::time::timeout(Duration::from_secs(10), stream.read(&mut buf))
            .await
            .unwrap()
    });
    // The stream fails (quinn reports the peer's close as "connection lost"); the metric below
    // says why.
    refused.expect_err("a non-node certificate got a QUIC tunnel");
    let metrics = f.proxy_metrics();
    assert!(
        metrics.contains(
            r#"gatehouse_proxy_connections_refused_total{alpn="quic",reason="identity"} 1"#
        ),
        "{metrics}"
    );
}

/// One `gsh proxy tcp` serves many local connections: after the first, each resumes its TLS
/// session with the proxy (no certificate signatures). A resumed session carries the
/// certificate of its first handshake unverified, so the proxy checks expiry itself: once the
/// certificate has expired, the same forwarder's next (resumed) session is refused.
#[test]
fn sessions_resume_but_not_past_the_certificate() {
    let f = echo_fleet("resume");
    let admin_home = tempfile::tempdir().unwrap();
    f.user(admin_home.path(), "alice", "access", &f.login, &[]);
    f.wait_for_nodes(admin_home.path(), 1);

    let home = tempfile::tempdir().unwrap();
    f.user(home.path(), "bob", "access", &f.login, &["--ttl", "8s"]);
    // The certificate's own end, as the proxy checks it (not an instant taken around the login:
    // a login slowed by a loaded machine would leave the certificate valid past that).
    let expires = cert_expiry(&home.path().join("tls.crt"));
    let (mut fwd, local) = forward(home.path(), "echo");
    // What came back for `msg`. A refused session may have closed the connection (with a reset)
    // before the message is written or the write side shut, so those errors are not failures:
    // the bytes that came back are the answer.
    let echoed = |msg: &[u8]| -> Vec<u8> {
        let mut c = std::net::TcpStream::connect(&local).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let _ = c.write_all(msg);
        let _ = c.shutdown(std::net::Shutdown::Write);
        let mut back = Vec::new();
        let _ = c.read_to_end(&mut back);
        back
    };
    for i in 0..3 {
        let msg = format!("hello {i}");
        assert_eq!(echoed(msg.as_bytes()), msg.as_bytes());
    }
    assert!(
        std::time::SystemTime::now() < expires,
        "the sessions above took longer than the certificate lives; the test cannot tell"
    );
    let metrics = f.proxy_metrics();
    // alice's `gsh ls` went to Auth, not through the proxy's session port; bob's three
    // sessions: one full handshake, then resumptions.
    assert!(handshakes(&metrics, "resumed") >= 2, "{metrics}");

    // Past the certificate's end: the forwarder still holds a ticket and resumes, and the
    // proxy refuses the session.
    sleep_past(expires);
    let resumed_before = handshakes(&metrics, "resumed");
    assert_eq!(
        echoed(b"too late"),
        b"",
        "a session outlived its certificate"
    );
    let metrics = f.proxy_metrics();
    let _ = fwd.kill();
    let _ = fwd.wait();
    assert!(
        metrics.contains(r#"reason="expired"} 1"#),
        "the refusal is counted as an expired certificate: {metrics}"
    );
    let resumed_after = handshakes(&metrics, "resumed");
    assert!(
        resumed_after > resumed_before,
        "the refused session was a resumed one (the case this guards)"
    );
}

/// `gatehouse_proxy_tls_handshakes_total` of `kind` in a metrics text (0 when absent).
fn handshakes(metrics: &str, kind: &str) -> u64 {
    let name = format!("gatehouse_proxy_tls_handshakes_total{{kind=\"{kind}\"}} ");
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(&name))
        .map_or(0, |v| v.trim().parse().unwrap())
}

/// `size` pseudo-random bytes through `gsh proxy tcp echo` and back, checksums compared.
fn round_trip(home: &std::path::Path, size: usize) {
    round_trip_app(home, "echo", size);
}

/// [`round_trip`] through the app `app`.
fn round_trip_app(home: &std::path::Path, app: &str, size: usize) {
    let (mut fwd, local) = forward(home, app);

    let mut conn = std::net::TcpStream::connect(&local).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    let mut reader = conn.try_clone().unwrap();
    let started = Instant::now();
    let writer = std::thread::spawn(move || {
        let mut hash = Sha256::new();
        let mut block = vec![0u8; 1 << 20];
        let mut state = 0x9E37_79B9_7F4A_7C15u64;
        for _ in 0..size / block.len() {
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
    assert_eq!(got, size);
    assert_eq!(hash.finalize(), sent, "checksums differ");
    eprintln!(
        "{} MiB each way in {elapsed:?} ({:.0} MiB/s, debug build)",
        size >> 20,
        (2 * size) as f64 / 1048576.0 / elapsed.as_secs_f64()
    );
}
