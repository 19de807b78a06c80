//! CA rotation end to end, as processes, with the real OpenSSH tools: the user and host CAs
//! rotate with both keys trusted during the grace period, roll back, and drop the replaced key
//! when the grace ends, while a session stays up throughout.

// Test code: a failing unwrap or panic is a failing test, which is the point.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::Fleet;

/// The key that signed the profile's SSH certificate (`ssh-keygen -L`'s "Signing CA").
fn signing_ca(home: &Path) -> String {
    let cert = std::fs::read_to_string(home.join("id_ed25519-cert.pub")).unwrap();
    let cert = ssh_key::Certificate::from_openssh(cert.trim()).unwrap();
    ssh_key::PublicKey::from(cert.signature_key().clone())
        .to_openssh()
        .unwrap()
}

/// `gsh ssh LOGIN@node1 echo ok`, retried for 15 s (agents hear of a rotation on the watch
/// stream): the last output.
fn ssh_node1_eventually(f: &Fleet, home: &Path, should_work: bool) -> common::Output {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let out = f.gsh(
            home,
            &["ssh", &format!("{}@node1", f.login), "echo", "ok"],
            None,
        );
        if (out.status == 0) == should_work || Instant::now() > deadline {
            return out;
        }
        std::thread::sleep(Duration::from_millis(300));
    }
}

fn relogin(f: &Fleet, home: &Path, user: &str) {
    let pw = f
        .gctl(&["users", "reset", user])
        .ok()
        .stdout
        .lines()
        .last()
        .unwrap()
        .trim()
        .to_string();
    let args = [
        "login",
        "--proxy",
        &f.proxy_addr,
        "--user",
        user,
        "--password-stdin",
        "--ca-pin",
        &f.pin,
    ];
    f.gsh(home, &args, Some(&format!("{pw}\n"))).ok();
}

fn export_lines(f: &Fleet, ty: &str) -> Vec<String> {
    f.gctl(&["auth", "export", "--type", ty])
        .ok()
        .stdout
        .lines()
        .map(str::to_owned)
        .collect()
}

#[test]
fn user_and_host_cas_rotate_and_roll_back_with_the_real_openssh_tools() {
    let f = Fleet::start("rotate", &[("node1", "env=dev", vec![])]);
    let alice = tempfile::tempdir().unwrap();
    f.user(alice.path(), "alice", "access", &f.login, &[]);
    f.wait_for_nodes(alice.path(), 1);
    let sshd_dir = tempfile::tempdir().unwrap();
    let sshd = common::sshd::start_sshd(sshd_dir.path(), &export_lines(&f, "user").join("\n"));
    let via_sshd = |home: &Path| common::sshd::ssh(home, sshd.port, &f.login, "echo sshd-ok");
    assert_eq!(via_sshd(alice.path()).ok().stdout.trim(), "sshd-ok");
    let old_user_ca = signing_ca(alice.path());
    // A session that must live through every rotation below.
    let (mut long, _out) = f.long_ssh(alice.path());

    // 1. User CA: the new key signs, both are trusted during the grace period.
    let rotated = f
        .gctl(&["auth", "rotate", "--type", "user", "--grace", "60s"])
        .ok()
        .stdout;
    assert!(rotated.contains("rotated"), "{rotated}");
    let both = export_lines(&f, "user");
    assert_eq!(both.len(), 2, "{both:?}");
    assert!(
        both[1].starts_with(
            old_user_ca
                .split(' ')
                .take(2)
                .collect::<Vec<_>>()
                .join(" ")
                .as_str()
        )
    );
    std::fs::write(sshd_dir.path().join("user_ca.pub"), both.join("\n")).unwrap();
    // The certificate from before still works everywhere...
    assert_eq!(via_sshd(alice.path()).ok().stdout.trim(), "sshd-ok");
    ssh_node1_eventually(&f, alice.path(), true).ok();
    // ...and a new login gets one from the new key, which sshd and the agent accept.
    relogin(&f, alice.path(), "alice");
    let new_user_ca = signing_ca(alice.path());
    assert_ne!(new_user_ca, old_user_ca);
    assert!(
        both[0].starts_with(
            new_user_ca
                .split(' ')
                .take(2)
                .collect::<Vec<_>>()
                .join(" ")
                .as_str()
        )
    );
    assert_eq!(via_sshd(alice.path()).ok().stdout.trim(), "sshd-ok");
    assert_eq!(
        ssh_node1_eventually(&f, alice.path(), true)
            .ok()
            .stdout
            .trim(),
        "ok"
    );

    // 2. Host CA: the agent renews its host certificate at once; gsh learns the new CA from the
    // proxy and OpenSSH (through gsh ssh) accepts the renewed host certificate.
    let hosts_before = std::fs::read_to_string(alice.path().join("known_hosts")).unwrap();
    f.gctl(&["auth", "rotate", "--type", "host", "--grace", "60s"])
        .ok();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !f.agents[0]
        .log()
        .contains("renewing the host certificate now")
    {
        assert!(Instant::now() < deadline, "the agent did not renew");
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(export_lines(&f, "host").len(), 2);
    assert_eq!(
        ssh_node1_eventually(&f, alice.path(), true)
            .ok()
            .stdout
            .trim(),
        "ok"
    );
    let hosts_after = std::fs::read_to_string(alice.path().join("known_hosts")).unwrap();
    assert_eq!(hosts_before.lines().count(), 1, "{hosts_before}");
    assert_eq!(hosts_after.lines().count(), 2, "{hosts_after}");

    // 3. Rollback of the user CA: the old key signs again; both stay trusted.
    f.gctl(&[
        "auth",
        "rotate",
        "--type",
        "user",
        "--rollback",
        "--grace",
        "60s",
    ])
    .ok();
    relogin(&f, alice.path(), "alice");
    assert_eq!(signing_ca(alice.path()), old_user_ca);
    assert_eq!(via_sshd(alice.path()).ok().stdout.trim(), "sshd-ok");
    assert_eq!(
        ssh_node1_eventually(&f, alice.path(), true)
            .ok()
            .stdout
            .trim(),
        "ok"
    );

    // 4. A rotation whose grace ends: the key replaced is dropped by Auth's export and by the
    // agent; a certificate it signed is refused, a new login works.
    f.gctl(&["auth", "rotate", "--type", "user", "--grace", "2s"])
        .ok();
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(export_lines(&f, "user").len(), 1);
    let refused = ssh_node1_eventually(&f, alice.path(), false);
    assert_ne!(
        refused.status, 0,
        "a certificate of the dropped key still works"
    );
    relogin(&f, alice.path(), "alice");
    assert_eq!(
        ssh_node1_eventually(&f, alice.path(), true)
            .ok()
            .stdout
            .trim(),
        "ok"
    );

    // No session dropped through all of it; every change is audited.
    assert!(long.try_wait().unwrap().is_none(), "the long session ended");
    let _ = long.kill();
    assert_eq!(f.events("ca.rotate").len(), 4);
    // The TLS CA does not rotate yet, and says so.
    let tls = f.gctl(&["auth", "rotate", "--type", "tls"]).failed();
    assert!(tls.stderr.contains("not supported yet"), "{}", tls.stderr);
}
