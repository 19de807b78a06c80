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

use std::io::{Read, Write};
use std::path::Path;
use std::time::{Duration, Instant};

use common::{Fleet, echo_server, forward};

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

/// Wait (60 s at most) for `child` to exit; how long it took and its stderr.
fn wait_exit(child: &mut std::process::Child) -> (Duration, String) {
    let started = Instant::now();
    loop {
        if child.try_wait().unwrap().is_some() {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the session did not end"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    (started.elapsed(), err)
}

#[test]
fn a_lock_ends_live_sessions_refuses_logins_and_lifting_it_restores_access() {
    let f = Fleet::start("locks", &[("node1", "env=dev", vec![])]);
    let alice = tempfile::tempdir().unwrap();
    f.user(alice.path(), "alice", "access", &f.login, &[]);
    let bob = tempfile::tempdir().unwrap();
    f.user(bob.path(), "bob", "access", &f.login, &[]);
    f.wait_for_nodes(alice.path(), 1);

    // alice and bob each have a session open; alice is locked.
    let (mut a, _a_out) = f.long_ssh(alice.path());
    let (mut b, _b_out) = f.long_ssh(bob.path());
    let locked_at = Instant::now();
    let out = f
        .gctl(&[
            "lock",
            "--user",
            "alice",
            "--message",
            "laptop stolen, call security",
        ])
        .ok();
    assert!(out.stdout.contains("user:alice"), "{}", out.stdout);
    let (_, err) = wait_exit(&mut a);
    let took = locked_at.elapsed();
    eprintln!("alice's session ended {took:?} after `gctl lock` was started");
    assert!(err.contains("laptop stolen, call security"), "{err}");
    // bob's session goes on.
    assert!(b.try_wait().unwrap().is_none(), "bob's session ended too");

    // New sessions, Auth calls and logins are refused with the message.
    let ssh = f.gsh(
        alice.path(),
        &["ssh", &format!("{}@node1", f.login), "true"],
        None,
    );
    assert_ne!(ssh.status, 0);
    assert!(ssh.stderr.contains("laptop stolen"), "{}", ssh.stderr);
    let ls = f.gsh(alice.path(), &["ls"], None).failed();
    assert!(ls.stderr.contains("locked: laptop stolen"), "{}", ls.stderr);
    let listed = f.gctl(&["locks", "ls", "--format", "json"]).ok().stdout;
    let locks: Vec<serde_json::Value> = serde_json::from_str(&listed).unwrap();
    assert_eq!(locks.len(), 1);
    assert_eq!(locks[0]["target"], "alice");
    assert_eq!(locks[0]["created_by"], "admin");
    wait_event(&f, "lock.create", |e| e["data"]["target"] == "alice");
    wait_event(&f, "session.locked", |e| e["actor"] == "alice");

    // Lifted: alice works again.
    f.gctl(&["locks", "rm", "user:alice"]).ok();
    wait_event(&f, "lock.delete", |e| e["data"]["lock"] == "user:alice");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let ssh = f.gsh(
            alice.path(),
            &["ssh", &format!("{}@node1", f.login), "echo", "back"],
            None,
        );
        if ssh.status == 0 {
            assert_eq!(ssh.stdout.trim(), "back");
            break;
        }
        assert!(Instant::now() < deadline, "still refused: {}", ssh.stderr);
        std::thread::sleep(Duration::from_millis(200));
    }

    // A role lock stops everyone holding it; bob's live session ends too.
    f.gctl(&["lock", "--role", "access", "--ttl", "1h"]).ok();
    let (_, err) = wait_exit(&mut b);
    assert!(err.contains("role `access` is locked"), "{err}");
    f.gctl(&["locks", "rm", "role:access"]).ok();
}

/// `gsh ssh LOGIN@node1 echo ok` until `(pred)(output)` holds, for up to `within`: the last output.
fn ssh_until(
    f: &Fleet,
    home: &Path,
    within: Duration,
    pred: impl Fn(&common::Output) -> bool,
) -> common::Output {
    let deadline = Instant::now() + within;
    loop {
        let out = f.gsh(
            home,
            &["ssh", &format!("{}@node1", f.login), "echo", "ok"],
            None,
        );
        if pred(&out) || Instant::now() > deadline {
            return out;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

#[test]
fn strict_locking_refuses_new_sessions_once_lock_state_cannot_be_refreshed() {
    // Strict mode with the staleness window cut from 5 minutes to 15 s (a hidden setting for
    // tests; the watch stream's keepalives come every 5 s).
    let config = "[auth]\nlocking_mode = \"strict\"\n";
    let env = vec![("GATEHOUSE_LOCKS_STALE_SECS".to_string(), "15".to_string())];
    let mut f = Fleet::start_custom(
        "strict",
        config,
        &env,
        &[],
        &[("node1", "env=dev", vec![])],
        |p| p.to_string(),
    );
    let alice = tempfile::tempdir().unwrap();
    f.user(alice.path(), "alice", "access", &f.login, &[]);
    let bob = tempfile::tempdir().unwrap();
    f.user(bob.path(), "bob", "access", &f.login, &[]);
    f.wait_for_nodes(alice.path(), 1);
    let ok = |o: &common::Output| o.status == 0 && o.stdout.trim() == "ok";
    let out = ssh_until(&f, alice.path(), Duration::from_secs(20), ok);
    assert!(ok(&out), "{}", out.stderr);
    f.gctl(&["lock", "--user", "bob", "--message", "on leave"])
        .ok();
    let out = ssh_until(&f, bob.path(), Duration::from_secs(20), |o| o.status != 0);
    assert!(out.stderr.contains("on leave"), "{}", out.stderr);

    // Auth goes away. The locks known are kept, and sessions go on while the lock state is
    // fresh...
    f.auth.kill_hard();
    let ssh = |home: &Path| {
        f.gsh(
            home,
            &["ssh", &format!("{}@node1", f.login), "echo", "ok"],
            None,
        )
    };
    let out = ssh(alice.path());
    assert!(
        ok(&out),
        "refused while the lock state was fresh: {}",
        out.stderr
    );
    let out = ssh(bob.path());
    assert!(
        out.stderr.contains("on leave"),
        "a known lock was lost: {}",
        out.stderr
    );
    // ...and are refused, saying why, once it is older than the window.
    let refused = ssh_until(&f, alice.path(), Duration::from_secs(45), |o| o.status != 0);
    assert_ne!(refused.status, 0, "strict mode never refused");
    // The proxy says why; if the agent's state went stale first, it refuses the certificate
    // as sshd would ("Permission denied") and audits the reason (checked once Auth is back).
    let by_proxy = refused.stderr.contains("locking_mode = \"strict\"");
    assert!(
        by_proxy || refused.stderr.contains("Permission denied"),
        "{}",
        refused.stderr
    );

    // Auth back on its address: the state is fresh again and sessions start.
    f.auth = Fleet::start_auth(f.dir.path(), 0, "strict", config, &env, &f.auth_addr);
    let out = ssh_until(&f, alice.path(), Duration::from_secs(45), ok);
    assert!(ok(&out), "not restored: {}", out.stderr);
    if !by_proxy {
        let rejected = wait_event(&f, "session.rejected", |e| {
            e["actor"] == "alice"
                && e["data"]["reason"]
                    .as_str()
                    .is_some_and(|r| r.contains("strict"))
        });
        assert_eq!(rejected["actor"], "alice");
    }
}

#[test]
fn a_locked_node_loses_its_tunnel_and_a_locked_bot_cannot_renew() {
    let f = Fleet::start("lock-node", &[("node1", "env=dev", vec![])]);
    let home = tempfile::tempdir().unwrap();
    f.user(home.path(), "alice", "access", &f.login, &[]);
    f.wait_for_nodes(home.path(), 1);
    let tunnels = || -> String {
        f.proxy_metrics()
            .lines()
            .find(|l| l.starts_with("gatehouse_proxy_tunnels "))
            .map(|l| l.split_whitespace().nth(1).unwrap().to_string())
            .unwrap_or_default()
    };
    let wait_tunnels = |want: &str| {
        let deadline = Instant::now() + Duration::from_secs(30);
        while tunnels() != want {
            assert!(
                Instant::now() < deadline,
                "tunnels: {} (want {want})",
                tunnels()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    wait_tunnels("1");
    let t = Instant::now();
    f.gctl(&["lock", "--node", "node1", "--message", "compromised host"])
        .ok();
    wait_tunnels("0");
    eprintln!(
        "node1's tunnel closed {:?} after `gctl lock` was started",
        t.elapsed()
    );
    // It stays out: its reconnections are refused before they are placed.
    let until = Instant::now() + Duration::from_secs(3);
    while Instant::now() < until {
        assert_eq!(tunnels(), "0", "a locked node's tunnel was placed");
        std::thread::sleep(Duration::from_millis(100));
    }
    let ssh = f.gsh(
        home.path(),
        &["ssh", &format!("{}@node1", f.login), "true"],
        None,
    );
    assert_ne!(ssh.status, 0);
    assert!(
        f.agents[0].log().contains("compromised host"),
        "the agent was not told why"
    );
    f.gctl(&["locks", "rm", "node:node1"]).ok();
    wait_tunnels("1");

    // A bot: joined, locked, cannot renew; unlocked, renews.
    let role = f.dir.path().join("ci-bot.toml");
    std::fs::write(
        &role,
        "kind = \"role\"\n[metadata]\nname = \"ci-bot\"\n[[spec.allow.rules]]\nresources = [\"node\"]\nverbs = [\"list\"]\n",
    )
    .unwrap();
    f.gctl(&["create", "-f", role.to_str().unwrap()]).ok();
    let added = f
        .gctl(&["bots", "add", "ci", "--roles", "ci-bot"])
        .ok()
        .stdout;
    let mut lines = added.lines().skip_while(|l| !l.contains("shown only now:"));
    lines.next();
    let token = lines
        .map(str::trim)
        .find(|l| !l.is_empty())
        .unwrap()
        .to_string();
    let data = f.dir.path().join("bot-data");
    let out = f.dir.path().join("bot-out");
    let gbot = |extra: &[&str]| f.gbot_oneshot(&data, &out, extra);
    gbot(&["--token", &token]).ok();
    f.gctl(&["lock", "--bot", "ci", "--message", "rotating CI secrets"])
        .ok();
    let renew = gbot(&[]).failed();
    assert!(
        renew.stderr.contains("locked: rotating CI secrets"),
        "{}",
        renew.stderr
    );
    f.gctl(&["locks", "rm", "bot:ci"]).ok();
    gbot(&[]).ok();
}

/// A TCP relay to `target` whose outgoing connections come from `source` (a loopback address):
/// what the proxy sees of a user behind it. Returns the relay's address.
fn relay_from(rt: &tokio::runtime::Runtime, source: std::net::IpAddr, target: String) -> String {
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    rt.spawn(async move {
        while let Ok((mut client, _)) = listener.accept().await {
            let target = target.clone();
            tokio::spawn(async move {
                let socket = tokio::net::TcpSocket::new_v4().unwrap();
                socket.bind(std::net::SocketAddr::new(source, 0)).unwrap();
                let Ok(mut upstream) = socket.connect(target.parse().unwrap()).await else {
                    return;
                };
                let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
            });
        }
    });
    addr
}

/// `gsh login` through `proxy` (a relay) as `user` with `password`.
fn login_via(f: &Fleet, proxy: &str, user: &str, password: &str) -> common::Output {
    let home = tempfile::tempdir().unwrap();
    f.gsh(
        home.path(),
        &[
            "login",
            "--proxy",
            proxy,
            "--user",
            user,
            "--password-stdin",
            "--ca-pin",
            &f.pin,
        ],
        Some(&format!("{password}\n")),
    )
}

#[test]
fn auth_limits_and_audits_each_users_own_address_behind_the_proxy() {
    let f = Fleet::start("real-addr", &[]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut users = Vec::new();
    for i in 1..=20u8 {
        let name = format!("u{i}");
        let out = f
            .gctl(&[
                "users", "add", &name, "--roles", "access", "--logins", &f.login,
            ])
            .ok();
        let pw = out.stdout.lines().last().unwrap().trim().to_string();
        let relay = relay_from(&rt, [127, 0, 0, 10 + i].into(), f.proxy_addr.clone());
        users.push((name, pw, relay, format!("127.0.0.{}", 10 + i)));
    }
    // One address guesses: 30 failures (the per-address limit) on names that do not exist.
    let attacker = relay_from(&rt, [127, 0, 0, 99].into(), f.proxy_addr.clone());
    std::thread::scope(|scope| {
        for t in 0..3 {
            let (f, attacker) = (&f, &attacker);
            scope.spawn(move || {
                for i in 0..10 {
                    login_via(f, attacker, &format!("ghost{t}-{i}"), "guess").failed();
                }
            });
        }
    });
    let limited = login_via(&f, &attacker, "u1", &users[0].1).failed();
    assert!(
        limited.stderr.contains("too many failed login attempts"),
        "{}",
        limited.stderr
    );
    // Twenty users, each from their own address, mistype their password (20 more failures
    // through the same proxy), then log in: none of them is limited.
    std::thread::scope(|scope| {
        for chunk in users.chunks(5) {
            let f = &f;
            scope.spawn(move || {
                for (name, pw, relay, _) in chunk {
                    let out = login_via(f, relay, name, "wrong").failed();
                    assert!(!out.stderr.contains("too many"), "{name}: {}", out.stderr);
                    login_via(f, relay, name, pw).ok();
                }
            });
        }
    });
    // The audit log has each user's own address, not the proxy's.
    let logins = f.events("user.login");
    for (name, _, _, addr) in &users {
        let ok = logins
            .iter()
            .find(|e| e["actor"] == name.as_str() && e["data"]["success"] == true)
            .unwrap_or_else(|| panic!("no successful login of {name}"));
        assert_eq!(ok["source_addr"], addr.as_str(), "{ok}");
    }
    assert!(
        logins
            .iter()
            .filter(|e| e["actor"].as_str().unwrap_or("").starts_with("ghost"))
            .all(|e| e["source_addr"] == "127.0.0.99")
    );

    // A client straight to Auth with a preamble it made (a "proxy" certificate of a CA of its
    // own, claiming 10.9.9.9): ignored; Auth credits the connection's own address.
    let now = time::OffsetDateTime::now_utc();
    let fake_ca = gatehouse_controlplane::ca::TlsCa::generate(&f.cluster, now).unwrap();
    let fake = gatehouse_controlplane::identity::Identity {
        kind: gatehouse_controlplane::identity::IdentityKind::Node,
        name: "evil-proxy".into(),
        roles: vec!["@proxy".into()],
        logins: vec![],
        traits: Default::default(),
        cluster: f.cluster.clone(),
        route_to_cluster: String::new(),
        bot: None,
        expires: now.unix_timestamp() + 600,
    };
    let (cert, key) = fake_ca
        .issue_with_new_key(
            &fake,
            gatehouse_controlplane::ca::TlsUsage::ServerAndClient,
            &[],
            now,
        )
        .unwrap();
    let forger = std::sync::Arc::new(
        gatehouse_controlplane::client_addr::Asserter::new(&cert.pem(), &key.serialize_pem())
            .unwrap(),
    );
    let endpoint = gatehouse_controlplane::client::AuthEndpoint {
        addr: f.auth_addr.clone(),
        trust: gatehouse_controlplane::tls::Trust::Pin(f.pin.clone()),
        identity: None,
    };
    let ssh =
        ssh_key::PrivateKey::random(&mut ssh_key::rand_core::OsRng, ssh_key::Algorithm::Ed25519)
            .unwrap();
    let tls_key = rcgen::KeyPair::generate().unwrap();
    let refused = rt.block_on(async {
        let mut c = endpoint
            .connect_for("10.9.9.9:4444".parse().unwrap(), forger)
            .await
            .unwrap();
        c.login(gatehouse_controlplane::proto::LoginRequest {
            user: "u2".into(),
            password: "forged".into(),
            ssh_public_key: ssh.public_key().to_openssh().unwrap(),
            tls_public_key: rcgen::PublicKeyData::subject_public_key_info(&tls_key),
            ..Default::default()
        })
        .await
    });
    assert_eq!(refused.unwrap_err().code(), tonic::Code::Unauthenticated);
    let forged = f
        .events("user.login")
        .into_iter()
        .rfind(|e| e["actor"] == "u2" && e["data"]["success"] == false)
        .unwrap();
    assert!(
        forged["source_addr"].as_str().unwrap().starts_with("127."),
        "{forged}"
    );
    assert!(
        !f.events("user.login")
            .iter()
            .any(|e| e["source_addr"] == "10.9.9.9")
    );
    assert!(
        f.auth.log().contains("client address preamble ignored"),
        "Auth did not say why"
    );
}
