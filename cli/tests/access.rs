//! Reverse tunnels end to end: Auth, a Proxy and two agents as separate processes on 127.0.0.x,
//! joined with real tokens, reached by the real OpenSSH client with the config `gsh config`
//! writes.

// Test code: a failing unwrap or panic is a failing test, which is the point.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use std::time::{Duration, Instant};

use common::{Fleet, cert_expiry, openssh, sleep_past};

fn two_nodes(cluster: &str) -> Fleet {
    Fleet::start(
        cluster,
        &[
            ("node1", "env=dev,team=core", vec![]),
            ("node2", "env=prod", vec![]),
        ],
    )
}

#[test]
fn openssh_through_the_proxy_exec_exit_code_and_interactive_pty() {
    let f = two_nodes("ssh-e2e");
    let home = tempfile::tempdir().unwrap();
    f.user(home.path(), "alice", "access", &f.login, &[]);
    f.wait_for_nodes(home.path(), 2);
    let ls = f.gsh(home.path(), &["ls", "env=dev"], None).ok().stdout;
    assert!(ls.contains("node1") && !ls.contains("node2"), "{ls}");
    let config = f.ssh_config(home.path());

    let dest = format!("{}@node1", f.login);
    let out = openssh(&config, &[], &dest, &["echo", "hi"], None);
    assert_eq!(
        out.status,
        0,
        "{}\nproxy log:\n{}",
        out.stderr,
        f.proxy.log()
    );
    assert_eq!(out.stdout, "hi\n");
    // A command that answers while it reads: `cat` echoes 8 MiB back while the client still
    // sends, so the agent's and the proxy's splices must read while they write.
    let input: String = (0..128 * 1024).map(|i| format!("line {i:057}\n")).collect();
    let out = openssh(&config, &[], &dest, &["cat"], Some(&input));
    assert_eq!(out.status, 0, "{}", out.stderr);
    assert!(
        out.stdout == input,
        "cat echoed {} of {} bytes",
        out.stdout.len(),
        input.len()
    );
    // The cluster-suffixed name works too, with no host-key prompt (BatchMode would fail).
    let out = openssh(
        &config,
        &[],
        &format!("{}@node2.ssh-e2e", f.login),
        &["exit", "3"],
        None,
    );
    assert_eq!(out.status, 3, "{}", out.stderr);
    // gsh ssh: same, by label selector, exit code passed through.
    let out = f.gsh(
        home.path(),
        &[
            "ssh",
            &format!("{}@env=prod", f.login),
            "sh",
            "-c",
            "'echo $0; exit 4'",
        ],
        None,
    );
    assert_eq!(out.status, 4, "{}", out.stderr);

    // An interactive shell on a PTY: commands typed on stdin, the shell sees a terminal.
    let out = openssh(
        &config,
        &["-tt"],
        &dest,
        &[],
        Some("tty; test -t 0 && echo IS-A-TTY; echo TERM=$TERM; exit 7\n"),
    );
    assert_eq!(out.status, 7, "{}\n{}", out.stdout, out.stderr);
    assert!(out.stdout.contains("/dev/pts/"), "{}", out.stdout);
    assert!(out.stdout.contains("IS-A-TTY"), "{}", out.stdout);

    // The agent's audit events reach Auth: start, exec with the command, end with bytes.
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let execs = f.events("exec");
        if execs.iter().any(|e| e["data"]["command"] == "echo hi")
            && f.events("session.end").len() >= 4
        {
            break;
        }
        assert!(Instant::now() < deadline, "exec events missing: {execs:?}");
        std::thread::sleep(Duration::from_millis(200));
    }
    // Diagnostics on the proxy and the agents.
    let diag = |d: &common::Daemon| {
        d.field("Diagnostics:")
            .trim_start_matches("http://")
            .trim_end_matches("/metrics")
            .to_string()
    };
    let (code, metrics) = common::http_get(&diag(&f.proxy), "/metrics");
    assert_eq!(code, 200);
    assert!(metrics.contains("gatehouse_proxy_tunnels 2"), "{metrics}");
    assert!(
        metrics.contains("gatehouse_proxy_bytes_forwarded_total{direction=\"to_user\"}"),
        "{metrics}"
    );
    assert!(
        metrics.contains("gatehouse_proxy_dial_failures_total")
            || metrics.contains("gatehouse_proxy_sessions_total"),
        "{metrics}"
    );
    assert_eq!(common::http_get(&diag(&f.proxy), "/readyz").0, 200);
    let (code, agent_metrics) = common::http_get(&diag(&f.agents[0]), "/metrics");
    assert_eq!(code, 200);
    assert!(
        agent_metrics.contains("gatehouse_agent_tunnel_connected 1"),
        "{agent_metrics}"
    );
    assert_eq!(common::http_get(&diag(&f.agents[0]), "/healthz").0, 200);
    assert_eq!(common::http_get(&diag(&f.agents[0]), "/readyz").0, 200);
    let ends = f.events("session.end");
    assert!(
        ends.iter()
            .any(|e| e["data"]["exit_code"] == 7 && e["data"]["tty"] != false),
        "{ends:?}"
    );
    assert!(
        ends.iter()
            .any(|e| e["data"]["bytes_out"].as_u64().unwrap_or(0) >= 3),
        "{ends:?}"
    );
}

#[test]
fn refusals_carry_a_reason_and_a_session_rejected_event() {
    let f = two_nodes("refusals");
    let dir = tempfile::tempdir().unwrap();
    let role = |name: &str, body: &str| {
        let p = dir.path().join(format!("{name}.toml"));
        std::fs::write(
            &p,
            format!("kind = \"role\"\n[metadata]\nname = \"{name}\"\n{body}"),
        )
        .unwrap();
        f.gctl(&["create", "-f", p.to_str().unwrap()]).ok();
    };
    role(
        "prod-only",
        "[spec.allow]\nlogins = [\"{{internal.logins}}\"]\nnode_labels = { env = \"prod\" }\n",
    );
    role("no-dev", "[spec.deny]\nnode_labels = { env = \"dev\" }\n");
    role(
        "brief",
        "[spec.options]\nmax_session_ttl = \"2s\"\n[spec.allow]\nlogins = [\"{{internal.logins}}\"]\nnode_labels = { \"*\" = \"*\" }\n",
    );
    // Fully qualified names: users whose roles cannot list nodes get only `Host *.CLUSTER`.
    let dest = format!("{}@node1.refusals", f.login);
    let try_ssh = |home: &std::path::Path| {
        let config = f.ssh_config(home);
        openssh(&config, &[], &dest, &["echo", "should-not-run"], None)
    };

    // 1. A login the roles do not allow (not in the certificate's principals).
    let alice = tempfile::tempdir().unwrap();
    f.user(alice.path(), "alice", "access", "someone-else", &[]);
    f.wait_for_nodes(alice.path(), 2);
    let out = try_ssh(alice.path());
    assert_ne!(out.status, 0);
    assert!(!out.stdout.contains("should-not-run"));
    // 2. Node labels that do not match.
    let bob = tempfile::tempdir().unwrap();
    f.user(bob.path(), "bob", "prod-only", &f.login, &[]);
    assert_ne!(try_ssh(bob.path()).status, 0);
    // ...while the matching node lets bob in: the refusal is about labels, not bob.
    let config = f.ssh_config(bob.path());
    assert_eq!(
        openssh(
            &config,
            &[],
            &format!("{}@node2.refusals", f.login),
            &["true"],
            None
        )
        .status,
        0
    );
    // 3. A deny role.
    let carol = tempfile::tempdir().unwrap();
    f.user(carol.path(), "carol", "access,no-dev", &f.login, &[]);
    assert_ne!(try_ssh(carol.path()).status, 0);
    // 4. An expired user certificate.
    let dave = tempfile::tempdir().unwrap();
    f.user(dave.path(), "dave", "brief", &f.login, &[]);
    let config = f.ssh_config(dave.path());
    // Past the certificate's own end (the X.509 and SSH certificates end together).
    sleep_past(cert_expiry(&dave.path().join("tls.crt")));
    // The proxy already refuses the expired X.509 certificate; present a fresh X.509 from
    // another login so that the expired SSH certificate reaches the agent itself.
    let fresh = tempfile::tempdir().unwrap();
    f.user(fresh.path(), "erin", "access", &f.login, &[]);
    for file in ["tls.crt", "tls.key"] {
        std::fs::copy(fresh.path().join(file), dave.path().join(file)).unwrap();
    }
    assert_ne!(
        openssh(&config, &[], &dest, &["echo", "should-not-run"], None).status,
        0
    );
    // 5. A certificate from a foreign CA (signed by a CA that is not the cluster's).
    let mallory = tempfile::tempdir().unwrap();
    f.user(mallory.path(), "mallory", "access", &f.login, &[]);
    let foreign = gatehouse_controlplane::ca::SshCa::generate().unwrap();
    let key_text = std::fs::read_to_string(mallory.path().join("id_ed25519")).unwrap();
    let key = ssh_key::PrivateKey::from_openssh(&key_text).unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let identity = gatehouse_controlplane::identity::Identity {
        kind: gatehouse_controlplane::identity::IdentityKind::User,
        name: "mallory".into(),
        roles: vec!["access".into()],
        logins: vec![f.login.clone()],
        traits: [("logins".to_string(), vec![f.login.clone()])].into(),
        cluster: "refusals".into(),
        route_to_cluster: "refusals".into(),
        bot: None,
        expires: now as i64 + 3600,
    };
    let forged = foreign
        .sign_user(
            key.public_key(),
            &gatehouse_controlplane::ca::SshUserCertRequest {
                identity: &identity,
                permit_pty: true,
                permit_port_forwarding: false,
                permit_agent_forwarding: false,
                permit_x11_forwarding: false,
                remote_forward_any: false,
            },
            now,
        )
        .unwrap();
    std::fs::write(
        mallory.path().join("id_ed25519-cert.pub"),
        format!("{}\n", forged.to_openssh().unwrap()),
    )
    .unwrap();
    assert_ne!(try_ssh(mallory.path()).status, 0);

    // Every refusal is in the audit log with its reason (delivered from the agent's spool).
    let deadline = Instant::now() + Duration::from_secs(20);
    let wanted = [
        ("alice", "not in certificate principals"),
        ("bob", "node labels"),
        ("carol", "denies"),
        ("dave", "expired"),
        ("mallory", "user CA"),
    ];
    loop {
        let rejected = f.events("session.rejected");
        let missing: Vec<_> = wanted
            .iter()
            .filter(|(user, reason)| {
                // russh refuses an expired certificate before the node sees it: that rejection
                // names the user the proxy authenticated (erin's X.509 certificate, here).
                !rejected.iter().any(|e| {
                    (e["actor"] == *user || (*user == "dave" && e["actor"] == "erin"))
                        && e["data"]["reason"].as_str().unwrap_or("").contains(reason)
                })
            })
            .collect();
        if missing.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "missing rejections {missing:?} in {rejected:#?}"
        );
        std::thread::sleep(Duration::from_millis(300));
    }
}
