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

/// `gsh login` through the proxy pinning the cluster's first CA (`f.pin`).
fn pinned_login(f: &Fleet, home: &Path, user: &str, password: &str) -> common::Output {
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
    f.gsh(home, &args, Some(&format!("{password}\n")))
}

fn relogin(f: &Fleet, home: &Path, user: &str) {
    let pw = f.reset_password(user);
    pinned_login(f, home, user, &pw).ok();
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
}

/// The issuer's common name of the first certificate in the PEM file `path`.
fn issuer_cn(path: &Path) -> String {
    let out = common::run(
        {
            let mut c = std::process::Command::new("openssl");
            c.args(["x509", "-noout", "-issuer", "-nameopt", "multiline", "-in"])
                .arg(path);
            c
        },
        None,
    )
    .ok();
    out.stdout
        .lines()
        .find_map(|l| {
            l.trim()
                .strip_prefix("commonName")
                .map(|v| v.trim_start_matches([' ', '=']).trim().to_owned())
        })
        .unwrap_or_default()
}

/// `openssl s_client` to the proxy trusting only `ca_file`: whether the chain verified, and the
/// issuer of the certificate the proxy presented.
fn proxy_verifies(f: &Fleet, ca_file: &Path) -> (bool, String) {
    let mut c = std::process::Command::new("openssl");
    c.args([
        "s_client",
        "-connect",
        &f.proxy_addr,
        "-alpn",
        "gatehouse-auth",
        "-verify_return_error",
        "-CAfile",
    ])
    .arg(ca_file);
    let out = common::run(c, Some(""));
    let issuer = out
        .stdout
        .lines()
        .find_map(|l| l.trim().strip_prefix("i:").map(str::to_owned))
        .and_then(|i| {
            i.split(", ")
                .find_map(|part| part.trim().strip_prefix("CN = ").map(str::to_owned))
        })
        .unwrap_or_default();
    (out.stdout.contains("Verify return code: 0 (ok)"), issuer)
}

/// `(pred)(proxy_verifies(ca_file))` within 20 s (the proxy renews on hearing of a change).
fn proxy_eventually(f: &Fleet, ca_file: &Path, pred: impl Fn(bool, &str) -> bool) -> String {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (ok, issuer) = proxy_verifies(f, ca_file);
        if pred(ok, &issuer) {
            return issuer;
        }
        assert!(
            Instant::now() < deadline,
            "the proxy's chain: verified={ok} issuer={issuer}"
        );
        std::thread::sleep(Duration::from_millis(300));
    }
}

/// The distinct `sha256:` pins `gctl auth rotate` printed (the signer's first).
fn gctl_pins(text: &str) -> Vec<String> {
    let mut pins: Vec<String> = Vec::new();
    for l in text.lines().map(str::trim) {
        if l.starts_with("sha256:") && !pins.iter().any(|p| p == l) {
            pins.push(l.to_owned());
        }
    }
    pins
}

#[test]
fn the_tls_ca_rotates_through_a_cross_signed_grace_and_rolls_back() {
    let f = Fleet::start("rotatetls", &[("node1", "env=dev", vec![])]);
    let alice = tempfile::tempdir().unwrap();
    f.user(alice.path(), "alice", "access", &f.login, &[]);
    f.wait_for_nodes(alice.path(), 1);
    let work = tempfile::tempdir().unwrap();
    let old_ca = work.path().join("old_ca.pem");
    std::fs::write(
        &old_ca,
        f.gctl(&["auth", "export", "--type", "tls"]).ok().stdout,
    )
    .unwrap();
    let old_cn = proxy_eventually(&f, &old_ca, |ok, _| ok);
    let config = f.ssh_config(alice.path());
    let openssh = || {
        common::openssh(
            &config,
            &[],
            &format!("{}@node1.{}", f.login, f.cluster),
            &["echo", "openssh-ok"],
            None,
        )
    };
    assert_eq!(openssh().ok().stdout.trim(), "openssh-ok");
    // alice reaches node1 with `gsh ssh` and with OpenSSH through `gsh config`.
    let both_ways = || {
        assert_eq!(
            ssh_node1_eventually(&f, alice.path(), true)
                .ok()
                .stdout
                .trim(),
            "ok"
        );
        assert_eq!(openssh().ok().stdout.trim(), "openssh-ok");
    };
    let (mut long, _out) = f.long_ssh(alice.path());

    // 1. Rotate with a grace: the new CA signs at once; both are trusted.
    let rotated = f
        .gctl(&["auth", "rotate", "--type", "tls", "--grace", "45s"])
        .ok()
        .stdout;
    let grace_ends = Instant::now() + Duration::from_secs(45);
    let pins = gctl_pins(&rotated);
    assert_eq!(pins.len(), 2, "{rotated}");
    let bundle = f.gctl(&["auth", "export", "--type", "tls"]).ok().stdout;
    assert_eq!(bundle.matches("BEGIN CERTIFICATE").count(), 2, "{bundle}");
    let new_ca = work.path().join("new_ca.pem");
    let first = bundle
        .split_inclusive("-----END CERTIFICATE-----\n")
        .next()
        .unwrap();
    std::fs::write(&new_ca, first).unwrap();
    // A second rotation during the grace is refused (the first's old CA is still in use).
    let again = f.gctl(&["auth", "rotate", "--type", "tls"]).failed();
    assert!(again.stderr.contains("grace period"), "{}", again.stderr);
    // The proxy renews at once: it presents a certificate of the new CA, which a client that
    // trusts only the old CA (OpenSSL here) still verifies through the cross-signed copy.
    let new_cn = proxy_eventually(&f, &new_ca, |ok, issuer| ok && issuer != old_cn);
    assert_ne!(new_cn, old_cn);
    assert!(
        proxy_verifies(&f, &old_ca).0,
        "old-CA clients lost the proxy"
    );
    // The agent renews too.
    let deadline = Instant::now() + Duration::from_secs(20);
    while !f.agents[0]
        .log()
        .contains("renewing the host certificate now")
    {
        assert!(Instant::now() < deadline, "the agent did not renew");
        std::thread::sleep(Duration::from_millis(200));
    }
    // alice's credentials from before the rotation (old CA only) still work, with gsh and
    // the real OpenSSH client through the proxy.
    assert_eq!(issuer_cn(&alice.path().join("tls.crt")), old_cn);
    both_ways();
    // A new login: a certificate of the new CA, both CAs stored; OpenSSL verifies it.
    relogin(&f, alice.path(), "alice");
    assert_eq!(issuer_cn(&alice.path().join("tls.crt")), new_cn);
    let ca_pem = std::fs::read_to_string(alice.path().join("ca.pem")).unwrap();
    assert_eq!(ca_pem.matches("BEGIN CERTIFICATE").count(), 2);
    let mut verify = std::process::Command::new("openssl");
    verify
        .args(["verify", "-CAfile"])
        .arg(&new_ca)
        .arg(alice.path().join("tls.crt"));
    assert!(common::run(verify, None).ok().stdout.contains("OK"));
    assert_eq!(openssh().ok().stdout.trim(), "openssh-ok");

    // 2. The grace ends: the old CA is trusted nowhere. The proxy drops the cross-signed copy
    // (an old-CA-only client no longer verifies it), Auth's export lists one CA, a client
    // pinning the old CA is refused, and everything renewed goes on working.
    if let Some(left) = grace_ends.checked_duration_since(Instant::now()) {
        std::thread::sleep(left);
    }
    proxy_eventually(&f, &old_ca, |ok, _| !ok);
    let bundle = f.gctl(&["auth", "export", "--type", "tls"]).ok().stdout;
    assert_eq!(bundle.matches("BEGIN CERTIFICATE").count(), 1, "{bundle}");
    let stranger = tempfile::tempdir().unwrap();
    let pw = f.reset_password("alice");
    let old_pin = pinned_login(&f, stranger.path(), "alice", &pw);
    assert_ne!(old_pin.status, 0, "a login pinning the dropped CA worked");
    // alice's stored CAs carry her over (her next login needs no new pin).
    both_ways();
    let again = f.gsh(
        alice.path(),
        &["login", "--user", "alice", "--password-stdin"],
        Some(&format!("{pw}\n")),
    );
    assert_eq!(again.status, 0, "{}", again.stderr);

    // 3. Rotate again and roll back: the CA from step 1 signs again.
    f.gctl(&["auth", "rotate", "--type", "tls", "--grace", "60s"])
        .ok();
    let rolled = f
        .gctl(&[
            "auth",
            "rotate",
            "--type",
            "tls",
            "--rollback",
            "--grace",
            "60s",
        ])
        .ok()
        .stdout;
    assert!(rolled.contains("rolled back"), "{rolled}");
    relogin_with_stored_cas(&f, alice.path());
    assert_eq!(issuer_cn(&alice.path().join("tls.crt")), new_cn);
    proxy_eventually(&f, &new_ca, |ok, issuer| ok && issuer == new_cn);
    both_ways();

    // No session dropped; every change audited.
    assert!(long.try_wait().unwrap().is_none(), "the long session ended");
    let _ = long.kill();
    assert_eq!(f.events("ca.rotate").len(), 3);
}

/// `gsh login` with no pin: the CAs the last login stored are what it trusts.
fn relogin_with_stored_cas(f: &Fleet, home: &Path) {
    let pw = f.reset_password("alice");
    f.gsh(
        home,
        &["login", "--user", "alice", "--password-stdin"],
        Some(&format!("{pw}\n")),
    )
    .ok();
}
