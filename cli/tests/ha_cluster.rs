//! A cluster a fleet can run: PostgreSQL, two Auth servers on it, a proxy given both, an agent;
//! all separate processes. Kill one Auth: logins and sessions go on through the other. Stop
//! both: a session already open keeps running and new SSH sessions still get in (the proxy
//! routes and the agent authorizes from certificates, neither asks Auth); a login fails and
//! says so. An Auth back: the agent's audit events of the outage arrive, each once.

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
use std::time::{Duration, Instant};

use common::{Fleet, openssh};
use gatehouse_controlplane::testing::PgServer;

/// `exec` events (one per command run) whose command is `echo MARKER`, as Auth has them.
fn sessions_with(f: &Fleet, marker: &str) -> usize {
    let command = format!("echo {marker}");
    f.events("exec")
        .iter()
        .filter(|e| e["data"]["command"] == command.as_str())
        .count()
}

/// `gsh login` through the proxy.
fn login(f: &Fleet, home: &std::path::Path, pw: &str) -> common::Output {
    f.gsh(
        home,
        &[
            "login",
            "--proxy",
            &f.proxy_addr,
            "--user",
            "alice",
            "--password-stdin",
            "--ca-pin",
            &f.pin,
        ],
        Some(&format!("{pw}\n")),
    )
}

#[test]
fn sessions_outlive_every_auth_and_audit_arrives_once_after() {
    let pg = PgServer::start().unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let url = rt.block_on(pg.fresh_db()).unwrap();
    let config = format!("[auth]\nstorage = \"{url}\"\n");
    let mut f = Fleet::start_ha("ha", &config, 2, &[("web", "env=prod", vec![])]);
    let home = tempfile::tempdir().unwrap();
    f.user(home.path(), "alice", "access", &f.login.clone(), &[]);
    f.wait_for_nodes(home.path(), 1);
    let ssh_config = f.ssh_config(home.path());
    let dest = format!("{}@web.ha", f.login);
    let run = |marker: &str| openssh(&ssh_config, &[], &dest, &["echo", marker], None);
    let out = run("before");
    assert_eq!(out.status, 0, "{}", out.stderr);

    // A session that runs through everything below, printing once a second.
    let mut long = Command::new("ssh")
        .arg("-F")
        .arg(&ssh_config)
        .args(["-o", "BatchMode=yes", &dest])
        .args([
            "sh",
            "-c",
            "'for i in $(seq 1 30); do echo tick-$i; sleep 1; done'",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut ticks = BufReader::new(long.stdout.take().unwrap()).lines();
    assert_eq!(ticks.next().unwrap().unwrap(), "tick-1");

    // One Auth killed: the other serves logins (through the proxy) and the session goes on.
    f.auth.kill_hard();
    let out = run("one-auth-down");
    assert_eq!(out.status, 0, "{}", out.stderr);
    let relogin = tempfile::tempdir().unwrap();
    let pw = f
        .gctl_in("auth1", &["users", "reset", "alice"])
        .ok()
        .stdout
        .lines()
        .last()
        .unwrap()
        .trim()
        .to_string();
    let out = login(&f, relogin.path(), &pw);
    assert_eq!(
        out.status, 0,
        "login through the surviving Auth: {}",
        out.stderr
    );

    // Both Auths gone: sessions still get in; a login says what is wrong.
    f.more_auths[0].kill_hard();
    for i in 0..3 {
        let out = run(&format!("no-auth-{i}"));
        assert_eq!(out.status, 0, "session {i} without Auth: {}", out.stderr);
    }
    let out = login(&f, tempfile::tempdir().unwrap().path(), &pw);
    assert_ne!(out.status, 0);
    assert!(
        out.stderr.to_lowercase().contains("auth"),
        "a login without Auth says so: {}",
        out.stderr
    );

    // The long session printed all along and ends normally.
    let mut last = String::new();
    for line in ticks.by_ref() {
        last = line.unwrap();
    }
    assert_eq!(last, "tick-30");
    assert!(long.wait().unwrap().success());

    // An Auth back on the same database and address: the agent's spooled events arrive, each
    // once.
    let again = Fleet::start_auth(f.dir.path(), 0, "ha", &config, &[], &f.auth_addr);
    f.auth = again;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let counts: Vec<usize> = [
            "before",
            "one-auth-down",
            "no-auth-0",
            "no-auth-1",
            "no-auth-2",
        ]
        .iter()
        .map(|m| sessions_with(&f, m))
        .collect();
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
}
