//! Login end to end: the certificates gsh stores are what the real OpenSSH and OpenSSL tools
//! accept, the profile is private, admin flows work, and a restart keeps the cluster.
// Test code: a failing unwrap or panic is a failing test, which is the point.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use std::process::Command;

use common::{Cluster, http_get, mode, run};

#[test]
fn login_issues_certs_that_ssh_keygen_and_openssl_accept() {
    let c = Cluster::start("alpha");
    let home = tempfile::tempdir().unwrap();
    let pw = c.add_user("alice", "access,editor", "alice,root");
    assert_eq!(pw.len(), 24, "generated password: {pw}");
    let out = c.login(home.path(), "alice", &pw, &[]).ok();
    assert!(
        out.stdout
            .contains("Logged in to cluster \"alpha\" as alice"),
        "{}",
        out.stdout
    );

    // ssh-keygen -L lists key id, principals, validity and extensions.
    let cert = home.path().join("id_ed25519-cert.pub");
    let mut cmd = Command::new("ssh-keygen");
    cmd.arg("-L").arg("-f").arg(&cert);
    let listing = run(cmd, None).ok().stdout;
    assert!(listing.contains("user certificate"), "{listing}");
    assert!(listing.contains("Key ID: \"alice\""), "{listing}");
    let principals: Vec<&str> = listing
        .split("Principals:")
        .nth(1)
        .unwrap()
        .split("Critical Options")
        .next()
        .unwrap()
        .split_whitespace()
        .collect();
    assert_eq!(
        principals,
        ["alice", "root", "-gatehouse-nologin"],
        "{listing}"
    );
    assert!(listing.contains("Valid: from "), "{listing}");
    for ext in [
        "permit-pty",
        "permit-port-forwarding",
        "roles@gatehouse.dev",
        "traits@gatehouse.dev",
        "route-to-cluster@gatehouse.dev",
    ] {
        assert!(listing.contains(ext), "missing {ext} in {listing}");
    }
    assert!(!listing.contains("permit-X11-forwarding"), "{listing}");

    // openssl verify against the exported TLS CA.
    let ca = c.gctl(&["auth", "export", "--type", "tls"]).ok().stdout;
    let ca_path = home.path().join("exported-ca.pem");
    std::fs::write(&ca_path, ca).unwrap();
    let mut cmd = Command::new("openssl");
    cmd.arg("verify")
        .arg("-CAfile")
        .arg(&ca_path)
        .arg(home.path().join("tls.crt"));
    let verify = run(cmd, None).ok().stdout;
    assert!(verify.trim().ends_with(": OK"), "{verify}");

    // The key loads in OpenSSL 3.0 (PKCS#8 v1), and it is the certificate's.
    let mut cmd = Command::new("openssl");
    cmd.args(["pkey", "-pubout", "-in"])
        .arg(home.path().join("tls.key"));
    let key_pub = run(cmd, None).ok().stdout;
    let mut cmd = Command::new("openssl");
    cmd.args(["x509", "-noout", "-pubkey", "-in"])
        .arg(home.path().join("tls.crt"));
    assert_eq!(key_pub, run(cmd, None).ok().stdout);

    // The identity is in the X.509 cert: CN and the extension's JSON.
    let mut cmd = Command::new("openssl");
    cmd.args(["x509", "-noout", "-subject", "-text", "-in"])
        .arg(home.path().join("tls.crt"));
    let text = run(cmd, None).ok().stdout;
    assert!(
        text.contains("CN = alice") || text.contains("CN=alice"),
        "{text}"
    );
    assert!(text.contains("\"roles\":[\"access\",\"editor\"]"), "{text}");
    assert!(text.contains("TLS Web Client Authentication"), "{text}");
    // The user's key is Ed25519 (cheaper for the Proxy to check on every session); the CA that
    // signed it is ECDSA P-256.
    assert!(text.contains("Public Key Algorithm: ED25519"), "{text}");
    assert!(text.contains("ecdsa-with-SHA256"), "{text}");

    // Everything under the profile is 0600.
    for entry in std::fs::read_dir(home.path()).unwrap() {
        let p = entry.unwrap().path();
        if p.file_name().unwrap() != "exported-ca.pem" {
            assert_eq!(mode(&p), 0o600, "{}", p.display());
        }
    }
    // And the admin identity and database in the data dir too.
    for p in ["admin/tls.key", "admin/tls.crt", "gatehouse.db"] {
        assert_eq!(mode(&c.data_dir().join(p)), 0o600, "{p}");
    }

    let status = c.gsh(home.path(), &["status"], None).ok().stdout;
    assert!(status.contains("User:      alice"), "{status}");
    assert!(status.contains("Roles:     access, editor"), "{status}");
    assert!(status.contains("Logins:    alice, root"), "{status}");
    assert!(
        status.contains("valid for 11h") || status.contains("valid for 12h"),
        "{status}"
    );

    // Audit: login success and the certificate issued, with actor and source address.
    let logins = c.events("user.login");
    assert_eq!(logins.len(), 1);
    assert_eq!(logins[0]["actor"], "alice");
    assert_eq!(logins[0]["source_addr"], "127.0.0.1");
    assert_eq!(logins[0]["data"]["success"], true);
    let issued = c.events("cert.issued");
    assert_eq!(issued.len(), 1);
    assert_eq!(
        issued[0]["data"]["logins"],
        serde_json::json!(["alice", "root"])
    );

    c.gsh(home.path(), &["logout"], None).ok();
    assert!(!home.path().join("tls.key").exists());
    c.gsh(home.path(), &["status"], None).failed();
}

#[test]
fn ttl_is_capped_by_roles_and_templates_fill_logins() {
    let c = Cluster::start("beta");
    let dir = tempfile::tempdir().unwrap();
    let role = dir.path().join("short.toml");
    std::fs::write(
        &role,
        "kind = \"role\"\n[metadata]\nname = \"short\"\n[spec.options]\nmax_session_ttl = \"1h\"\npermit_pty = false\n[spec.allow]\nlogins = [\"{{internal.logins}}-ops\", \"shared\"]\nnode_labels = { env = \"dev\" }\n",
    )
    .unwrap();
    c.gctl(&["create", "-f", role.to_str().unwrap()]).ok();
    // create again without --force fails; with --force updates.
    c.gctl(&["create", "-f", role.to_str().unwrap()]).failed();
    assert!(
        c.gctl(&["create", "--force", "-f", role.to_str().unwrap()])
            .ok()
            .stdout
            .contains("updated")
    );
    let pw = c.add_user("bob", "short", "bob");
    let out = c.login(dir.path(), "bob", &pw, &["--ttl", "8h"]).ok();
    assert!(
        out.stdout.contains("Logins:  bob-ops, shared"),
        "{}",
        out.stdout
    );
    let status = c.gsh(dir.path(), &["status"], None).ok().stdout;
    assert!(
        status.contains("valid for 59m") || status.contains("valid for 1h"),
        "{status}"
    );
    assert!(!status.contains("permit-pty"), "{status}");
}

#[test]
fn admin_flows_and_restart_keep_state() {
    let c = Cluster::start("gamma");
    let home = tempfile::tempdir().unwrap();

    // Presets exist.
    let roles = c.gctl(&["get", "roles"]).ok().stdout;
    for r in ["access", "editor", "auditor"] {
        assert!(roles.contains(r), "{roles}");
    }
    let pw = c.add_user("carol", "access", "carol");
    assert!(c.gctl(&["users", "ls"]).ok().stdout.contains("carol"));
    // Unknown role is refused with the field named.
    let err = c
        .gctl(&["users", "add", "dave", "--roles", "nope"])
        .failed()
        .stderr;
    assert!(err.contains("role `nope` does not exist"), "{err}");

    // Password reset invalidates the old password; gsh passwd changes it.
    let new_pw = c
        .gctl(&["users", "reset", "carol"])
        .ok()
        .stdout
        .lines()
        .last()
        .unwrap()
        .trim()
        .to_string();
    c.login(home.path(), "carol", &pw, &[]).failed();
    c.login(home.path(), "carol", &new_pw, &[]).ok();
    c.gsh(
        home.path(),
        &["passwd", "--stdin"],
        Some(&format!("{new_pw}\ncorrect horse battery staple\n")),
    )
    .ok();
    c.login(home.path(), "carol", "correct horse battery staple", &[])
        .ok();
    // Too-short new password: clear error.
    let err = c
        .gsh(
            home.path(),
            &["passwd", "--stdin"],
            Some("correct horse battery staple\nshort\n"),
        )
        .failed()
        .stderr;
    assert!(err.contains("at least 12 characters"), "{err}");

    // Tokens: created, listed without secrets, removed.
    let out = c
        .gctl(&["tokens", "add", "--type", "node", "--ttl", "10m"])
        .ok()
        .stdout;
    let secret = out
        .split("Join token (shown once): ")
        .nth(1)
        .unwrap()
        .lines()
        .next()
        .unwrap()
        .trim()
        .to_string();
    assert_eq!(secret.len(), 64);
    let ls = c.gctl(&["tokens", "ls"]).ok().stdout;
    assert!(!ls.contains(&secret), "token secret leaked into ls: {ls}");
    assert!(ls.contains("active"), "{ls}");
    let id = ls
        .lines()
        .nth(2)
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .to_string();
    c.gctl(&["rm", &format!("token/{id}")]).ok();
    assert!(!c.gctl(&["tokens", "ls"]).ok().stdout.contains(&id));
    // The secret never reaches the audit log either.
    let all = c.gctl(&["events", "--format", "json"]).ok().stdout;
    assert!(!all.contains(&secret));
    assert!(!all.contains(&new_pw));

    // Exports in the formats sshd and known_hosts want.
    let user_ca = c.gctl(&["auth", "export", "--type", "user"]).ok().stdout;
    assert!(user_ca.starts_with("ssh-ed25519 AAAA"), "{user_ca}");
    let host_ca = c.gctl(&["auth", "export", "--type", "host"]).ok().stdout;
    assert!(
        host_ca.starts_with("@cert-authority * ssh-ed25519 AAAA"),
        "{host_ca}"
    );
    let err = c
        .gctl(&["auth", "export", "--type", "bogus"])
        .failed()
        .stderr;
    assert!(err.contains("expected user, host or tls"), "{err}");

    // Diagnostics.
    assert_eq!(http_get(&c.diag, "/healthz").0, 200);
    assert_eq!(http_get(&c.diag, "/readyz").0, 200);
    let (code, metrics) = http_get(&c.diag, "/metrics");
    assert_eq!(code, 200);
    assert!(
        metrics.contains("gatehouse_auth_logins_total{result=\"success\"}"),
        "{metrics}"
    );
    assert!(
        metrics.contains("gatehouse_auth_audit_events_total"),
        "{metrics}"
    );

    // Restart: same CA pin, same users, same audit log.
    let pin = c.pin.clone();
    let before = c
        .gctl(&["events", "--format", "json"])
        .ok()
        .stdout
        .lines()
        .count();
    let dir = c.stop();
    let c = Cluster::start_in(dir, "gamma");
    assert_eq!(c.pin, pin);
    assert!(!c.stdout.contains("new cluster"), "{}", c.stdout);
    c.login(home.path(), "carol", "correct horse battery staple", &[])
        .ok();
    let after = c.gctl(&["events", "--format", "json"]).ok().stdout;
    assert!(after.lines().count() >= before + 2);
    let ids: Vec<i64> = after
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["id"]
                .as_i64()
                .unwrap()
        })
        .collect();
    assert!(
        ids.windows(2).all(|w| w[0] < w[1]),
        "ids not increasing: {ids:?}"
    );
    // The old profile's pin still works for a later login without --ca-pin.
    let mut cmd = Command::new(common::bin("gsh"));
    cmd.args(["login", "--user", "carol", "--password-stdin"])
        .env("GATEHOUSE_HOME", home.path());
    run(cmd, Some("correct horse battery staple\n")).ok();
}
