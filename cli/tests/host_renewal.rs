//! Every identity renews: with `[auth] host_cert_ttl = "1m"` the agent and the proxy renew
//! their certificates every 20 s (two thirds of a lifetime back-dated by a minute) while an
//! SSH session runs through them; the session never drops, the tunnel never reconnects, and
//! after the first certificates have expired the real OpenSSH client (which checks the host
//! certificate's validity) and `gsh` (which checks the proxy's) still get in.

// Test code: a failing unwrap or panic is a failing test, which is the point.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use std::time::{Duration, Instant};

use common::{Fleet, openssh};

#[test]
fn agent_and_proxy_renew_their_certificates_while_a_session_runs() {
    let f = Fleet::start_custom(
        "renew",
        "[auth]\nhost_cert_ttl = \"1m\"\n",
        &[],
        &[],
        &[("node1", "env=dev", vec![])],
        |p| p.to_string(),
    );
    let home = tempfile::tempdir().unwrap();
    f.user(home.path(), "alice", "access", &f.login, &[]);
    f.wait_for_nodes(home.path(), 1);
    let config = f.ssh_config(home.path());
    let dest = format!("{}@node1.renew", f.login);
    let agent_identity = f.dir.path().join("node1/agent/identity.json");
    let first: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&agent_identity).unwrap()).unwrap();
    let started = Instant::now();

    // A session of 50 s, across two renewals of both.
    let session = {
        let (config, dest) = (config.clone(), dest.clone());
        std::thread::spawn(move || {
            openssh(
                &config,
                &[],
                &dest,
                &["for i in $(seq 1 50); do echo tick-$i; sleep 1; done"],
                None,
            )
        })
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    let renewed = |log: &str, what: &str| log.matches(what).count();
    while renewed(&f.agents[0].log(), "agent: host certificate renewed") < 2
        || renewed(&f.proxy.log(), "proxy: certificate renewed") < 2
    {
        assert!(
            Instant::now() < deadline,
            "no renewals in 60 s\nagent:\n{}\nproxy:\n{}",
            f.agents[0].log(),
            f.proxy.log()
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    let out = session.join().unwrap().ok();
    for i in 1..=50 {
        assert!(
            out.stdout.contains(&format!("tick-{i}\n")),
            "tick-{i} missing:\n{}",
            out.stdout
        );
    }

    // The certificates of the start have expired by now (1 min): new sessions get in on the
    // renewed ones.
    let wait = Duration::from_secs(65).saturating_sub(started.elapsed());
    std::thread::sleep(wait);
    let fresh = openssh(&config, &[], &dest, &["echo", "after-renewal"], None).ok();
    assert!(fresh.stdout.contains("after-renewal"), "{fresh:?}");
    let ls = f.gsh(home.path(), &["ls"], None).ok();
    assert!(ls.stdout.contains("node1"), "{ls:?}");

    let now: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&agent_identity).unwrap()).unwrap();
    assert_ne!(
        first["ssh_cert"], now["ssh_cert"],
        "the stored identity was not renewed"
    );
    assert_eq!(first["host_id"], now["host_id"]);
    let log = f.agents[0].log();
    assert_eq!(
        log.matches("agent: tunnel up").count(),
        1,
        "the tunnel reconnected:\n{log}"
    );
}
