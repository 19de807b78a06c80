//! Security operations end to end, as processes: per-app access control by labels (the agent
//! decides), with every decision audited.

// Test code: a failing unwrap or panic is a failing test, which is the point.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{Fleet, bin};

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

fn create_role(f: &Fleet, name: &str, body: &str) {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join(format!("{name}.toml"));
    std::fs::write(
        &p,
        format!("kind = \"role\"\n[metadata]\nname = \"{name}\"\n{body}"),
    )
    .unwrap();
    f.gctl(&["create", "-f", p.to_str().unwrap()]).ok();
}

/// `gsh proxy tcp APP` listening on loopback: the child and its address.
fn forward(home: &Path, app: &str) -> (std::process::Child, String) {
    let mut fwd = Command::new(bin("gsh"))
        .args(["proxy", "tcp", app, "--listen", "127.0.0.1:0"])
        .env("GATEHOUSE_HOME", home)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(fwd.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let local = line.split_whitespace().nth(1).unwrap().to_string();
    (fwd, local)
}

/// One connection through `gsh proxy tcp APP`: send `msg`, half-close, read everything back.
/// Returns what came back and gsh's stderr.
fn echo_through(home: &Path, app: &str, msg: &[u8]) -> (Vec<u8>, String) {
    let (mut fwd, local) = forward(home, app);
    let mut c = std::net::TcpStream::connect(&local).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    c.write_all(msg).unwrap();
    c.shutdown(std::net::Shutdown::Write).unwrap();
    let mut back = Vec::new();
    let _ = c.read_to_end(&mut back);
    // gsh prints a refusal when the session is answered; give it a moment before the kill.
    std::thread::sleep(Duration::from_millis(200));
    let _ = fwd.kill();
    let mut err = String::new();
    fwd.stderr.take().unwrap().read_to_string(&mut err).unwrap();
    let _ = fwd.wait();
    (back, err)
}

/// Wait (30 s at most) until Auth has an event of `ty` that `pred` accepts.
fn wait_event(f: &Fleet, ty: &str, pred: impl Fn(&serde_json::Value) -> bool) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(e) = f.events(ty).into_iter().find(&pred) {
            return e;
        }
        assert!(
            Instant::now() < deadline,
            "no matching `{ty}` event: {:?}",
            f.events(ty)
        );
        std::thread::sleep(Duration::from_millis(300));
    }
}

#[test]
fn apps_are_reached_by_their_labels_and_audited() {
    let echo = echo_server();
    let f = Fleet::start(
        "app-rbac",
        &[(
            "node1",
            "env=dev",
            [
                "--app",
                &format!("grafana={echo}"),
                "--app",
                &format!("billing={echo}"),
                "--app-labels",
                "grafana:env=dev",
                "--app-labels",
                "billing:env=prod,team=pay",
            ]
            .map(String::from)
            .to_vec(),
        )],
    );
    create_role(
        &f,
        "dev-apps",
        "[spec.allow]\napp_labels = { env = [\"dev\"] }\n\
         [[spec.allow.rules]]\nresources = [\"node\"]\nverbs = [\"list\"]\n",
    );
    // Listing needs `list` on nodes (as in the `access` preset); the labels decide the rest.
    let alice = tempfile::tempdir().unwrap();
    f.user(alice.path(), "alice", "dev-apps", "alice", &[]);
    let admin = tempfile::tempdir().unwrap();
    f.user(admin.path(), "root-user", "access", "root", &[]);
    f.wait_for_nodes(admin.path(), 1);

    // `gsh ls --apps` shows each user what their roles reach, with the apps' labels.
    let ls = f.gsh(alice.path(), &["ls", "--apps"], None).ok().stdout;
    assert!(ls.contains("grafana") && ls.contains("env=dev"), "{ls}");
    assert!(!ls.contains("billing"), "{ls}");
    let all = f
        .gsh(admin.path(), &["ls", "--apps", "--format", "json"], None)
        .ok()
        .stdout;
    let all: Vec<serde_json::Value> = serde_json::from_str(&all).unwrap();
    let names: Vec<&str> = all.iter().map(|a| a["app"].as_str().unwrap()).collect();
    assert_eq!(names, ["billing", "grafana"]);
    assert_eq!(all[0]["labels"]["team"], "pay");
    let only_prod = f
        .gsh(admin.path(), &["ls", "--apps", "env=prod"], None)
        .ok()
        .stdout;
    assert!(
        only_prod.contains("billing") && !only_prod.contains("grafana"),
        "{only_prod}"
    );

    // alice reaches the dev app...
    let (back, err) = echo_through(alice.path(), "grafana", b"hello grafana");
    assert_eq!(back, b"hello grafana", "{err}");
    // ...and is refused the prod one, by the agent, with a reason she can act on.
    let (back, err) = echo_through(alice.path(), "billing", b"let me in");
    assert!(back.is_empty());
    assert!(
        err.contains("access denied: no role's app labels match app `billing`")
            && err.contains("env=prod"),
        "{err}"
    );
    // A deny rule wins over the `access` preset's `'*' = '*'`.
    create_role(
        &f,
        "no-prod-apps",
        "[spec.deny]\napp_labels = { env = \"prod\" }\n",
    );
    let carol = tempfile::tempdir().unwrap();
    f.user(carol.path(), "carol", "access,no-prod-apps", "carol", &[]);
    let (_, err) = echo_through(carol.path(), "billing", b"x");
    assert!(
        err.contains("role `no-prod-apps` denies app `billing`"),
        "{err}"
    );
    let (back, _) = echo_through(carol.path(), "grafana", b"y");
    assert_eq!(back, b"y");

    // Every decision is in the audit log: start and end (bytes both ways), and the refusal.
    let start = wait_event(&f, "app.session.start", |e| {
        e["actor"] == "alice" && e["data"]["app"] == "grafana"
    });
    assert_eq!(start["data"]["node"], "node1");
    assert!(
        start["source_addr"]
            .as_str()
            .unwrap()
            .starts_with("127.0.0.1"),
        "{start}"
    );
    let end = wait_event(&f, "app.session.end", |e| {
        e["actor"] == "alice" && e["data"]["app"] == "grafana"
    });
    assert_eq!(end["data"]["bytes_in"], 13, "{end}");
    assert_eq!(end["data"]["bytes_out"], 13, "{end}");
    let refused = wait_event(&f, "app.session.rejected", |e| {
        e["actor"] == "alice" && e["data"]["app"] == "billing"
    });
    assert!(
        refused["data"]["reason"]
            .as_str()
            .unwrap()
            .contains("no role's app labels match"),
        "{refused}"
    );
}
