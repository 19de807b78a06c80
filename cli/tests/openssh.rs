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

use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{Cluster, cert_expiry, run, sleep_past};

const SSHD: &str = "/usr/sbin/sshd";

struct Sshd {
    child: Child,
    port: u16,
}

impl Drop for Sshd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn start_sshd(dir: &Path, user_ca: &str) -> Sshd {
    assert!(
        Path::new(SSHD).exists(),
        "{SSHD} is missing: scripts/test installs openssh-server"
    );
    std::fs::create_dir_all("/run/sshd").unwrap();
    let host_key = dir.join("ssh_host_ed25519_key");
    let mut cmd = Command::new("ssh-keygen");
    cmd.args(["-q", "-t", "ed25519", "-N", "", "-f"])
        .arg(&host_key);
    run(cmd, None).ok();
    std::fs::write(dir.join("user_ca.pub"), user_ca).unwrap();
    for _ in 0..5 {
        let port = free_port();
        let config = format!(
            "Port {port}\nListenAddress 127.0.0.1\nHostKey {hk}\nPidFile {dir}/sshd.pid\nTrustedUserCAKeys {dir}/user_ca.pub\n\
             AuthorizedKeysFile none\nPasswordAuthentication no\nKbdInteractiveAuthentication no\nPubkeyAuthentication yes\n\
             PermitRootLogin prohibit-password\nUsePAM no\nStrictModes no\nLogLevel VERBOSE\n",
            hk = host_key.display(),
            dir = dir.display()
        );
        std::fs::write(dir.join("sshd_config"), config).unwrap();
        let log = std::fs::File::create(dir.join("sshd.log")).unwrap();
        let child = Command::new(SSHD)
            .arg("-D")
            .arg("-e")
            .arg("-f")
            .arg(dir.join("sshd_config"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        let mut sshd = Sshd { child, port };
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return sshd;
            }
            if let Ok(Some(_)) = sshd.child.try_wait() {
                break; // port taken meanwhile: try another
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        drop(sshd);
    }
    panic!(
        "sshd did not start; log:\n{}",
        std::fs::read_to_string(dir.join("sshd.log")).unwrap_or_default()
    );
}

fn ssh(home: &Path, port: u16, login: &str, command: &str) -> common::Output {
    let mut cmd = Command::new("ssh");
    cmd.args([
        "-F",
        "/dev/null",
        "-o",
        "BatchMode=yes",
        "-o",
        "StrictHostKeyChecking=no",
        "-o",
        "UserKnownHostsFile=/dev/null",
    ])
    .args([
        "-o",
        "IdentitiesOnly=yes",
        "-o",
        "ConnectTimeout=10",
        "-o",
        "LogLevel=ERROR",
    ])
    .arg("-o")
    .arg(format!(
        "IdentityFile={}",
        home.join("id_ed25519").display()
    ))
    .arg("-o")
    .arg(format!(
        "CertificateFile={}",
        home.join("id_ed25519-cert.pub").display()
    ))
    .args(["-p", &port.to_string()])
    .arg(format!("{login}@127.0.0.1"))
    .arg(command);
    run(cmd, None)
}

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
