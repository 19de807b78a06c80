//! `gatehouse start --config FILE`: the TOML config is honoured (data dir, cluster name, listen
//! addresses, JSON logs) and a bad config or role is a clear error, not a panic; proxy socket
//! options asked for reach the kernel; SIGTERM stops every role cleanly.

// Test code: a failing unwrap or panic is a failing test, which is the point.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{Fleet, bin, run};

#[test]
fn config_file_sets_data_dir_name_addresses_and_json_logs() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("gatehouse.toml");
    std::fs::write(
        &config,
        format!(
            "data_dir = \"{}\"\ncluster_name = \"from-config\"\nroles = [\"auth\"]\n[auth]\nlisten = \"127.0.0.1:0\"\npublic_addrs = [\"auth.example.test\"]\n[diag]\nlisten = \"127.0.0.1:0\"\n[log]\nformat = \"json\"\nlevel = \"info\"\n",
            dir.path().join("state").display()
        ),
    )
    .unwrap();
    let mut child = Command::new(bin("gatehouse"))
        .arg("start")
        .arg("--config")
        .arg(&config)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let mut banner = String::new();
    while let Ok(line) = rx.recv_timeout(Duration::from_secs(60)) {
        banner.push_str(&line);
        banner.push('\n');
        if line.starts_with("  gsh login") {
            break;
        }
    }
    let _ = Command::new("kill").arg(child.id().to_string()).status();
    let _ = child.wait();
    assert!(
        banner.contains("Gatehouse cluster \"from-config\" is running"),
        "{banner}"
    );
    assert!(dir.path().join("state/gatehouse.db").exists());
    assert!(dir.path().join("state/admin/tls.crt").exists());
    let logs: Vec<String> = BufReader::new(stderr)
        .lines()
        .map_while(Result::ok)
        .collect();
    assert!(!logs.is_empty());
    for line in &logs {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON: {line}: {e}"));
        assert!(v.get("level").is_some(), "{line}");
    }
    assert!(
        logs.iter().any(|l| l.contains("gatehouse started")),
        "{logs:?}"
    );
}

#[test]
fn bad_config_and_unknown_role_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("bad.toml");
    std::fs::write(&config, "[auth]\nlisten = \"127.0.0.1:0\"\nlisen = 1\n").unwrap();
    let mut cmd = Command::new(bin("gatehouse"));
    cmd.arg("start").arg("--config").arg(&config);
    let out = run(cmd, None).failed();
    assert!(out.stderr.contains("lisen"), "{}", out.stderr);

    let mut cmd = Command::new(bin("gatehouse"));
    cmd.args(["start", "--roles", "auth,teleporter", "--data-dir"])
        .arg(dir.path().join("d"));
    let out = run(cmd, None).failed();
    assert!(
        out.stderr.contains("role `teleporter` is not available"),
        "{}",
        out.stderr
    );
    assert!(
        !dir.path().join("d").exists(),
        "a refused start must not create state"
    );
}

/// `ss -tinH state established FILTER`: the details of each matching socket, as words (`ss -ti`
/// prints them on an indented line under the socket's addresses).
fn established(filter: &str) -> Vec<Vec<String>> {
    let out = Command::new("ss")
        .args(["-tinH", "state", "established", filter])
        .output()
        .expect("run ss (iproute2)");
    assert!(out.status.success(), "ss failed: {out:?}");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.starts_with([' ', '\t']))
        .map(|l| l.split_whitespace().map(str::to_owned).collect())
        .collect()
}

/// A proxy started with `--proxy-tcp-congestion <proxy_cc>` and one agent with `agent_args`: the
/// congestion control of the proxy's side of the agent's tunnel, and of the agent's side, as the
/// kernel reports them, and the proxy's metrics.
fn tunnel_congestion(
    proxy_cc: &str,
    agent_args: &[&str],
) -> (Vec<Vec<String>>, Vec<Vec<String>>, String) {
    let agent_args = agent_args.iter().map(|a| a.to_string()).collect();
    let fleet = Fleet::start_with(
        "cc",
        &["--proxy-tcp-congestion", proxy_cc],
        &[("node1", "env=dev", agent_args)],
    );
    let port = fleet.proxy_addr.rsplit(':').next().unwrap().to_string();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let proxy_side = established(&format!("( sport = :{port} )"));
        let agent_side = established(&format!("( dport = :{port} )"));
        if !proxy_side.is_empty() && !agent_side.is_empty() {
            return (proxy_side, agent_side, fleet.proxy_metrics());
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no tunnel on :{port}:\n{}",
            fleet.proxy.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `--proxy-tcp-congestion`: the proxy's side of each connection on its public port (here, an
/// agent's tunnel) runs the algorithm asked for, as the kernel reports it (`ss -ti`), while the
/// agent's side keeps the host's default; an empty name is the host's default;
/// `--agent-tcp-congestion` does the same for the agent's side; `/metrics` says which one the
/// proxy's port runs; an unknown algorithm stops either start with a clear error.
#[test]
fn tunnels_run_the_congestion_control_asked_for() {
    let default = std::fs::read_to_string("/proc/sys/net/ipv4/tcp_congestion_control")
        .unwrap()
        .trim()
        .to_string();
    let has = |socks: &[Vec<String>], cc: &str| socks.iter().all(|w| w.iter().any(|w| w == cc));

    // reno is built into every kernel and always allowed.
    let metric = |cc: &str| format!("gatehouse_proxy_tcp_congestion{{algorithm=\"{cc}\"}} 1");
    let (proxy_side, agent_side, metrics) = tunnel_congestion("reno", &[]);
    assert!(has(&proxy_side, "reno"), "proxy side: {proxy_side:?}");
    assert!(metrics.contains(&metric("reno")), "{metrics}");
    assert!(
        has(&agent_side, &default),
        "agent side, host default {default}: {agent_side:?}"
    );

    let (proxy_side, agent_side, metrics) =
        tunnel_congestion("", &["--agent-tcp-congestion", "reno"]);
    assert!(
        has(&proxy_side, &default),
        "proxy side, host default {default}: {proxy_side:?}"
    );
    assert!(metrics.contains(&metric(&default)), "{metrics}");
    assert!(has(&agent_side, "reno"), "agent side: {agent_side:?}");

    for option in ["--proxy-tcp-congestion", "--agent-tcp-congestion"] {
        let dir = tempfile::tempdir().unwrap();
        let mut cmd = Command::new(bin("gatehouse"));
        cmd.args([
            "start",
            "--auth-addr",
            "127.0.0.1:0",
            "--proxy-addr",
            "127.0.0.1:0",
            "--diag-addr",
            "127.0.0.1:0",
            option,
            "carrier-pigeon",
            "--data-dir",
        ])
        .arg(dir.path().join("d"));
        let out = run(cmd, None).failed();
        assert!(
            out.stderr
                .contains("TCP congestion control \"carrier-pigeon\""),
            "{option}: {}",
            out.stderr
        );
    }
}

/// SIGTERM stops every role through its handle: the agent's tunnel first (it does not try to
/// reconnect), then the proxy, then Auth; the process exits 0 and says so.
#[test]
fn sigterm_stops_every_role_and_exits_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(bin("gatehouse"))
        .args([
            "start",
            "--auth-addr",
            "127.0.0.1:0",
            "--proxy-addr",
            "127.0.0.1:0",
            "--diag-addr",
            "127.0.0.1:0",
            "--node-name",
            "stopper",
            "--data-dir",
        ])
        .arg(dir.path().join("data"))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    // Up: the agent's tunnel reached the proxy.
    let mut logs = Vec::new();
    while let Ok(line) = rx.recv_timeout(Duration::from_secs(60)) {
        let up = line.contains("proxy: tunnel up");
        logs.push(line);
        if up {
            break;
        }
    }
    assert!(
        logs.iter().any(|l| l.contains("proxy: tunnel up")),
        "{logs:#?}"
    );
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "still running 30 s after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    // The rest of the log, to its end (the reader thread ends at EOF).
    while let Ok(line) = rx.recv_timeout(Duration::from_secs(10)) {
        logs.push(line);
    }
    assert!(status.success(), "{status:?}\n{logs:#?}");
    assert!(
        logs.iter().any(|l| l.contains("gatehouse stopped")),
        "{logs:#?}"
    );
    assert!(
        !logs.iter().any(|l| l.contains("reconnecting")),
        "the agent tried to reconnect while stopping: {logs:#?}"
    );
}
