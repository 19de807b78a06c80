//! A cluster a fleet can run: PostgreSQL, two Auth servers on it, two proxies given both with
//! an L4 balancer in front, three agents; all separate processes. Agents keep a tunnel to every
//! proxy, so any proxy reaches any node. Kill one Auth: logins and sessions go on through the
//! other. Stop both for the test's window (`GATEHOUSE_HA_OUTAGE_SECS`, 120 by default): sessions
//! already open keep running and new SSH sessions still get in (proxies route and agents
//! authorize from certificates, neither asks Auth); a login fails and says so. An Auth back:
//! the agents' audit events of the outage arrive, each once. Kill a proxy: its sessions end,
//! the other's go on, and every node is reached through the survivor.

// Test code: a failing unwrap or panic is a failing test, which is the point.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use std::io::{BufRead, BufReader};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{Fleet, metrics_of, openssh};
use gatehouse_controlplane::testing::PgServer;

/// `exec` events (one per command run) whose command is `echo MARKER`, as Auth has them.
fn sessions_with(f: &Fleet, marker: &str) -> usize {
    let command = format!("echo {marker}");
    f.events("exec")
        .iter()
        .filter(|e| e["data"]["command"] == command.as_str())
        .count()
}

/// `gsh login` through `proxy`.
fn login(f: &Fleet, proxy: &str, home: &std::path::Path, pw: &str) -> common::Output {
    f.gsh(
        home,
        &[
            "login",
            "--proxy",
            proxy,
            "--user",
            "alice",
            "--password-stdin",
            "--ca-pin",
            &f.pin,
        ],
        Some(&format!("{pw}\n")),
    )
}

/// An L4 balancer: each connection goes to the next backend that accepts it (round robin).
fn balancer(backends: Vec<String>) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let next = AtomicUsize::new(0);
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(client) = conn else { continue };
            let start = next.fetch_add(1, Ordering::Relaxed);
            let upstream = (0..backends.len()).find_map(|i| {
                let b = backends[(start + i) % backends.len()].parse().unwrap();
                TcpStream::connect_timeout(&b, Duration::from_secs(2)).ok()
            });
            let Some(upstream) = upstream else { continue };
            let pipe = |mut from: TcpStream, mut to: TcpStream| {
                std::thread::spawn(move || {
                    let _ = std::io::copy(&mut from, &mut to);
                    let _ = to.shutdown(std::net::Shutdown::Both);
                    let _ = from.shutdown(std::net::Shutdown::Both);
                });
            };
            pipe(client.try_clone().unwrap(), upstream.try_clone().unwrap());
            pipe(upstream, client);
        }
    });
    addr
}

/// The value of a metric without labels.
fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .and_then(|v| v.trim().parse().ok())
}

/// A session that prints a line a second until it is ended; when each line arrived.
struct Ticker {
    child: Child,
    lines: Arc<Mutex<Vec<Instant>>>,
    reader: std::thread::JoinHandle<()>,
}

fn ticker(ssh_config: &std::path::Path, dest: &str) -> Ticker {
    let mut child = Command::new("ssh")
        .arg("-F")
        .arg(ssh_config)
        .args(["-o", "BatchMode=yes", dest])
        .args(["sh", "-c", "'while true; do echo tick; sleep 1; done'"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let out = BufReader::new(child.stdout.take().unwrap());
    let lines = Arc::new(Mutex::new(Vec::new()));
    let seen = Arc::clone(&lines);
    let reader = std::thread::spawn(move || {
        for _ in out.lines().map_while(Result::ok) {
            seen.lock().unwrap().push(Instant::now());
        }
    });
    let t = Ticker {
        child,
        lines,
        reader,
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    while t.lines.lock().unwrap().is_empty() {
        assert!(Instant::now() < deadline, "the session did not start");
        std::thread::sleep(Duration::from_millis(100));
    }
    t
}

impl Ticker {
    /// The longest silence between lines so far (and since the last line).
    fn longest_gap(&self) -> Duration {
        let lines = self.lines.lock().unwrap();
        let mut gap = lines.last().map(|l| l.elapsed()).unwrap_or_default();
        for w in lines.windows(2) {
            gap = gap.max(w[1] - w[0]);
        }
        gap
    }
}

#[test]
fn sessions_outlive_every_auth_and_a_proxy_and_audit_arrives_once_after() {
    let outage = Duration::from_secs(
        std::env::var("GATEHOUSE_HA_OUTAGE_SECS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(120),
    );
    let pg = PgServer::start().unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let url = rt.block_on(pg.fresh_db()).unwrap();
    let config = format!("[auth]\nstorage = \"{url}\"\n");
    let nodes = ["web", "db", "cache"];
    let mut f = Fleet::start_ha(
        "ha",
        &config,
        2,
        &[
            ("web", "env=prod", vec![]),
            ("db", "env=prod", vec![]),
            ("cache", "env=dev", vec![]),
        ],
    );
    let proxy1 = f.proxy_addr.clone();
    let node_token = common::token(&f.auth_data(), "node");
    // Agents know only proxy1; a proxy added is announced to them, and they tunnel to it.
    let started = Instant::now();
    let mut second = f.start_proxy(2);
    let proxy2 = second.field("Proxy:");
    let tunnels = |d: &common::Daemon| metric(&metrics_of(d), "gatehouse_proxy_tunnels");
    while tunnels(&second) != Some(3.0) || tunnels(&f.proxy) != Some(3.0) {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "the added proxy was not used within 30 s: {:?} tunnels\n{}",
            tunnels(&second),
            f.agents[0].log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    eprintln!(
        "proxy added: every agent tunnelled to it in {:?}",
        started.elapsed()
    );
    let gauge = |d: &common::Daemon, name: &str| metric(&metrics_of(d), name);
    let deadline = Instant::now() + Duration::from_secs(15);
    while gauge(&f.proxy, "gatehouse_proxy_cluster_proxies") != Some(2.0)
        || gauge(&second, "gatehouse_proxy_auth_stream_up") != Some(1.0)
    {
        assert!(Instant::now() < deadline, "{}", metrics_of(&f.proxy));
        std::thread::sleep(Duration::from_millis(200));
    }
    let front = balancer(vec![proxy1.clone(), proxy2.clone()]);

    let pw = f
        .gctl(&[
            "users",
            "add",
            "alice",
            "--roles",
            "access",
            "--logins",
            &f.login.clone(),
        ])
        .ok()
        .stdout
        .lines()
        .last()
        .unwrap()
        .trim()
        .to_string();
    let homes: Vec<tempfile::TempDir> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    for (home, via) in homes.iter().zip([&front, &proxy1, &proxy2]) {
        let out = login(&f, via, home.path(), &pw);
        assert_eq!(out.status, 0, "login via {via}: {}", out.stderr);
    }
    f.wait_for_nodes(homes[0].path(), 3);
    let configs: Vec<std::path::PathBuf> = homes.iter().map(|h| f.ssh_config(h.path())).collect();
    let dest = |node: &str| format!("{}@{node}.ha", f.login);
    // Through the balancer: each session lands on the next proxy.
    let run =
        |node: &str, marker: &str| openssh(&configs[0], &[], &dest(node), &["echo", marker], None);
    let mut markers = Vec::new();
    for round in 0..2 {
        for node in nodes {
            let marker = format!("before-{node}-{round}");
            let out = run(node, &marker);
            assert_eq!(out.status, 0, "{node} via the balancer: {}", out.stderr);
            assert_eq!(out.stdout.trim(), marker);
            markers.push(marker);
        }
    }
    // A session through each proxy, running through everything below.
    let via_proxy1 = ticker(&configs[1], &dest("web"));
    let via_proxy2 = ticker(&configs[2], &dest("db"));

    // One Auth killed: the other serves logins (through the proxies) and sessions go on.
    f.auth.kill_hard();
    let out = run("cache", "one-auth-down");
    assert_eq!(out.status, 0, "{}", out.stderr);
    markers.push("one-auth-down".into());
    let relogin = tempfile::tempdir().unwrap();
    let out = login(&f, &front, relogin.path(), &pw);
    assert_eq!(
        out.status, 0,
        "login through the surviving Auth: {}",
        out.stderr
    );

    // Both Auths gone for the window: sessions still get in, on every node, through both
    // proxies; a login says what is wrong.
    f.more_auths[0].kill_hard();
    let out = login(&f, &front, tempfile::tempdir().unwrap().path(), &pw);
    assert_ne!(out.status, 0);
    assert!(
        out.stderr.to_lowercase().contains("auth"),
        "a login without Auth says so: {}",
        out.stderr
    );
    // A new agent cannot join: it says why and stops.
    let mut join = Command::new(common::bin("gatehouse"));
    join.args([
        "start",
        "--roles",
        "agent",
        "--proxy",
        &front,
        "--token",
        &node_token,
    ])
    .args([
        "--ca-pin",
        &f.pin,
        "--node-name",
        "late",
        "--diag-addr",
        "127.0.0.9:0",
    ])
    .arg("--data-dir")
    .arg(f.dir.path().join("late"));
    let out = common::run(join, None);
    assert_ne!(out.status, 0, "a join without Auth: {}", out.stdout);
    eprintln!("a join without Auth: {}", out.stderr.trim());
    assert!(
        out.stderr.contains("Auth"),
        "a join without Auth says so: {}",
        out.stderr
    );
    let outage_start = Instant::now();
    let mut i = 0;
    while outage_start.elapsed() < outage {
        let node = nodes[i % nodes.len()];
        let marker = format!("no-auth-{i}");
        let out = run(node, &marker);
        assert_eq!(
            out.status,
            0,
            "session {i} on {node}, {:?} into the outage: {}",
            outage_start.elapsed(),
            out.stderr
        );
        markers.push(marker);
        i += 1;
        std::thread::sleep(Duration::from_secs(5));
    }
    eprintln!("{i} sessions in {:?} without Auth", outage_start.elapsed());
    if outage >= Duration::from_secs(30) {
        // The proxies say their stream from Auth is down, and still announce both proxies.
        for p in [&f.proxy, &second] {
            assert_eq!(gauge(p, "gatehouse_proxy_auth_stream_up"), Some(0.0));
            assert_eq!(gauge(p, "gatehouse_proxy_cluster_proxies"), Some(2.0));
        }
    }
    for t in [&via_proxy1, &via_proxy2] {
        assert!(
            t.longest_gap() < Duration::from_secs(5),
            "a session stalled: {:?}",
            t.longest_gap()
        );
    }

    // An Auth back on the same database and address: the agents' spooled events arrive, each
    // once.
    f.auth = Fleet::start_auth(f.dir.path(), 0, "ha", &config, &[], &f.auth_addr);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let counts: Vec<usize> = markers.iter().map(|m| sessions_with(&f, m)).collect();
        if counts.iter().all(|&c| c == 1) {
            break;
        }
        assert!(
            counts.iter().all(|&c| c <= 1),
            "an event arrived twice: {counts:?}"
        );
        assert!(
            Instant::now() < deadline,
            "the outage's events did not all arrive: {counts:?}\n{}",
            f.agents[0].log()
        );
        std::thread::sleep(Duration::from_millis(500));
    }

    let deadline = Instant::now() + Duration::from_secs(30);
    while gauge(&second, "gatehouse_proxy_auth_stream_up") != Some(1.0) {
        assert!(Instant::now() < deadline, "the watch stream did not resume");
        std::thread::sleep(Duration::from_millis(200));
    }

    // A proxy killed: the session it carried ends, the other's goes on, and every node is
    // reached through the survivor (the balancer skips the dead one).
    f.proxy.kill_hard();
    let Ticker {
        mut child, reader, ..
    } = via_proxy1;
    let deadline = Instant::now() + Duration::from_secs(30);
    while !reader.is_finished() {
        assert!(
            Instant::now() < deadline,
            "a session of the killed proxy went on"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = child.wait();
    for node in nodes {
        let out = run(node, &format!("after-proxy-{node}"));
        assert_eq!(out.status, 0, "{node} after a proxy died: {}", out.stderr);
    }
    std::thread::sleep(Duration::from_secs(3));
    assert!(
        via_proxy2.longest_gap() < Duration::from_secs(5),
        "the surviving proxy's session stalled: {:?}",
        via_proxy2.longest_gap()
    );
    let Ticker { mut child, .. } = via_proxy2;
    common::kill(&mut child);
    second.stop();
}
