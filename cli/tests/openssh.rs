//! The real OpenSSH sshd trusts the cluster's user CA (from `gctl auth export --type user`); the
//! real ssh client logs in with the cert gsh stored, and is refused for a login outside the
//! cert's principals and once the cert has expired.
// Test code: a failing unwrap or panic is a failing test, which is the point.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use common::sshd::{ssh, start_sshd};
use common::{Cluster, cert_expiry, sleep_past};

#[test]
fn real_sshd_accepts_the_cert_and_refuses_other_logins_and_expired_certs() {
    let c = Cluster::start("ssh-test");
    let work = tempfile::tempdir().unwrap();
    let user_ca = c.gctl(&["auth", "export", "--type", "user"]).ok().stdout;
    let sshd = start_sshd(work.path(), &user_ca);
    let me = std::env::var("USER")
        .ok()
        .filter(|u| !u.is_empty())
        .unwrap_or_else(|| "root".into());

    // A role whose certs live 3 seconds, for the expiry check.
    let role = work.path().join("brief.toml");
    std::fs::write(&role, "kind = \"role\"\n[metadata]\nname = \"brief\"\n[spec.options]\nmax_session_ttl = \"3s\"\n[spec.allow]\nlogins = [\"{{internal.logins}}\"]\nnode_labels = { \"*\" = \"*\" }\n").unwrap();
    c.gctl(&["create", "-f", role.to_str().unwrap()]).ok();

    let alice_home = tempfile::tempdir().unwrap();
    let pw = c.add_user("alice", "access", &me);
    c.login(alice_home.path(), "alice", &pw, &[]).ok();
    let out = ssh(alice_home.path(), sshd.port, &me, "echo hi");
    assert_eq!(
        out.status,
        0,
        "ssh failed: {}\nsshd log:\n{}",
        out.stderr,
        std::fs::read_to_string(work.path().join("sshd.log")).unwrap_or_default()
    );
    assert_eq!(out.stdout.trim(), "hi");

    // A login outside the cert's principals is refused.
    let out = ssh(alice_home.path(), sshd.port, "nobody", "echo hi").failed();
    assert!(out.stderr.contains("Permission denied"), "{}", out.stderr);
    // The guard principal never lets anyone in either.
    let out = ssh(
        alice_home.path(),
        sshd.port,
        "-gatehouse-nologin",
        "echo hi",
    )
    .failed();
    assert!(!out.stdout.contains("hi"));

    // An expired cert is refused.
    let bob_home = tempfile::tempdir().unwrap();
    let pw = c.add_user("bob", "brief", &me);
    c.login(bob_home.path(), "bob", &pw, &[]).ok();
    let fresh = ssh(bob_home.path(), sshd.port, &me, "echo fresh");
    // (The 3 s cert may or may not still be valid here on a slow machine; only expiry matters.)
    let _ = fresh;
    sleep_past(cert_expiry(&bob_home.path().join("tls.crt")));
    let status = c.gsh(bob_home.path(), &["status"], None).failed().stdout;
    assert!(status.contains("EXPIRED"), "{status}");
    let out = ssh(bob_home.path(), sshd.port, &me, "echo late").failed();
    assert!(out.stderr.contains("Permission denied"), "{}", out.stderr);
    let log = std::fs::read_to_string(work.path().join("sshd.log")).unwrap_or_default();
    assert!(
        log.contains("expired") || log.contains("Certificate invalid"),
        "sshd did not log the expiry:\n{log}"
    );
}
