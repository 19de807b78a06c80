//! The SSH node service against the real OpenSSH client: host certificate trust, user
//! certificate authentication, RBAC, sessions (exec, PTY, env, stdin, signals) and the audit trail.
// Test code: a failing unwrap or panic is a failing test, which is the point.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use gatehouse_controlplane::ca::SshCa;
use ssh_key::LineEnding;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::AsyncWriteExt;

use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_echo_over_host_certificate_with_audit() {
    let f = Fixture::start().await;
    let cert = f.cert(&CertSpec::for_login(&f.login));
    let out = f.ssh(&cert, &f.login, &[], "echo hi", None).await;
    assert_eq!(out.code, Some(0), "{out:?}");
    assert_eq!(out.stdout, "hi\n");

    let start = f.audit.wait_for("session.start", |_| true).await;
    assert_eq!(start["user"], "alice");
    assert_eq!(start["login"], f.login.as_str());
    assert_eq!(start["node"], "node-1");
    let session_id = start["session_id"].as_str().unwrap().to_string();
    assert_eq!(session_id.len(), 36, "uuid: {session_id}");
    let exec = f.audit.wait_for("exec", |_| true).await;
    assert_eq!(exec["command"], "echo hi");
    assert_eq!(exec["session_id"], session_id.as_str());
    let end = f.audit.wait_for("session.end", |_| true).await;
    assert_eq!(end["session_id"], session_id.as_str());
    assert_eq!(end["exit_code"], 0);
    assert_eq!(end["bytes_out"], 3);
    assert!(end["duration_ms"].is_u64());
    assert!(f.audit.events("session.rejected").is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exit_status_stdin_and_stderr() {
    let f = Fixture::start().await;
    let cert = f.cert(&CertSpec::for_login(&f.login));
    let out = f.ssh(&cert, &f.login, &[], "exit 3", None).await;
    assert_eq!(out.code, Some(3), "{out:?}");

    let out = f
        .ssh(
            &cert,
            &f.login,
            &[],
            "cat; echo err >&2",
            Some(b"from stdin\n"),
        )
        .await;
    assert_eq!(out.code, Some(0), "{out:?}");
    assert_eq!(out.stdout, "from stdin\n");
    assert!(out.stderr.contains("err"), "{out:?}");
    let end = f
        .audit
        .wait_for("session.end", |e| e["bytes_in"] == 11)
        .await;
    assert_eq!(end["exit_code"], 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_by_signal_reports_exit_signal() {
    let f = Fixture::start().await;
    let cert = f.cert(&CertSpec::for_login(&f.login));
    let out = f.ssh(&cert, &f.login, &[], "kill -TERM $$", None).await;
    // OpenSSH exits 255 when the remote command was killed by a signal.
    assert_eq!(out.code, Some(255), "{out:?}");
    let end = f.audit.wait_for("session.end", |_| true).await;
    assert_eq!(end["exit_signal"], "TERM", "{end}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pty_exec_and_permit_pty() {
    let f = Fixture::start().await;
    let cert = f.cert(&CertSpec::for_login(&f.login));
    let out = f
        .ssh(
            &cert,
            &f.login,
            &["-tt"],
            "tty; test -t 0 && echo is-a-tty; echo $TERM",
            None,
        )
        .await;
    assert_eq!(out.code, Some(0), "{out:?}");
    assert!(out.stdout.contains("/dev/pts/"), "{out:?}");
    assert!(out.stdout.contains("is-a-tty"), "{out:?}");
    let start = f.audit.wait_for("session.start", |_| true).await;
    assert_eq!(start["tty"], true);

    let out = f.ssh(&cert, &f.login, &["-tt"], "exit 5", None).await;
    assert_eq!(out.code, Some(5), "{out:?}");

    // Without permit-pty the PTY is refused (with -tt the OpenSSH client then gives up).
    let no_pty = f.cert(&CertSpec {
        pty: false,
        ..CertSpec::for_login(&f.login)
    });
    let out = f
        .ssh(
            &no_pty,
            &f.login,
            &["-tt"],
            "test -t 0 && echo is-a-tty",
            None,
        )
        .await;
    assert!(
        out.stderr.contains("PTY allocation request failed"),
        "{out:?}"
    );
    assert!(!out.stdout.contains("is-a-tty"), "{out:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interactive_pty_shell() {
    let f = Fixture::start().await;
    let cert = f.cert(&CertSpec::for_login(&f.login));
    let mut cmd = f.ssh_command(&cert, &f.login, &["-tt"]);
    cmd.stdin(Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    let mut stdin = child.stdin.take().unwrap();
    stdin
        .write_all(b"stty size; echo shell-$((40+2)); exit 7\n")
        .await
        .unwrap();
    let out = tokio::time::timeout(SSH_TIMEOUT, child.wait_with_output())
        .await
        .expect("ssh did not finish in time")
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("shell-42"), "{stdout}");
    assert_eq!(out.status.code(), Some(7), "{stdout}");
    drop(stdin);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn env_requests_reach_the_command() {
    let f = Fixture::start().await;
    let cert = f.cert(&CertSpec::for_login(&f.login));
    let out = f
        .ssh(
            &cert,
            &f.login,
            &["-o", "SetEnv=FOO=bar LD_PRELOAD=/nope"],
            "echo \"$FOO\"; echo \"[$LD_PRELOAD]\"; echo \"$USER $HOME\"",
            None,
        )
        .await;
    assert_eq!(out.code, Some(0), "{out:?}");
    let lines: Vec<&str> = out.stdout.lines().collect();
    assert_eq!(lines[0], "bar");
    assert_eq!(lines[1], "[]", "LD_PRELOAD must be refused");
    assert!(lines[2].starts_with(&format!("{} /", f.login)), "{out:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_login_not_in_principals() {
    let f = Fixture::start().await;
    let cert = f.cert(&CertSpec::for_login("somebody-else"));
    let reason = f.rejected_reason(&cert, &f.login).await;
    assert_eq!(
        reason,
        format!("login `{}` not in certificate principals", f.login)
    );
    let event = &f.audit.events("session.rejected")[0];
    assert_eq!(event["user"], "alice");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_expired_certificate() {
    let f = Fixture::start().await;
    let cert = f.cert(&CertSpec {
        signed_at: -7200,
        expires_in: -3600,
        ..CertSpec::for_login(&f.login)
    });
    let reason = f.rejected_reason(&cert, &f.login).await;
    assert!(reason.contains("expired"), "{reason}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_certificate_from_another_ca() {
    let f = Fixture::start().await;
    let other = SshCa::generate().unwrap();
    let cert = f.cert_from(&other, &CertSpec::for_login(&f.login));
    let reason = f.rejected_reason(&cert, &f.login).await;
    assert_eq!(reason, "certificate not signed by this cluster's user CA");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_by_rbac_node_labels() {
    let f = Fixture::start().await;
    let cert = f.cert(&CertSpec {
        roles: &["prod-only"],
        ..CertSpec::for_login(&f.login)
    });
    let reason = f.rejected_reason(&cert, &f.login).await;
    assert_eq!(
        reason,
        "access denied: no role's node labels match this node"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_unknown_login_user() {
    let f = Fixture::start().await;
    let login = "gh-no-such-user";
    let cert = f.cert(&CertSpec::for_login(login));
    let reason = f.rejected_reason(&cert, login).await;
    assert_eq!(
        reason,
        format!("login user `{login}` does not exist on this host")
    );
}

/// A throwaway system account, removed on drop.
struct TempUser(String);

impl Drop for TempUser {
    fn drop(&mut self) {
        let _ = std::process::Command::new("userdel")
            .args(["-r", &self.0])
            .stderr(Stdio::null())
            .status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runs_as_another_user_with_groups_home_and_shell() {
    if !is_root()
        || std::process::Command::new("useradd")
            .arg("-h")
            .output()
            .is_err()
    {
        eprintln!("skipped: needs root and useradd");
        return;
    }
    let name = format!("ghssh{}", std::process::id());
    let status = std::process::Command::new("useradd")
        .args(["-m", "-s", "/bin/sh", "-G", "users", &name])
        .status()
        .unwrap();
    assert!(status.success());
    let _user = TempUser(name.clone());

    let f = Fixture::start().await;
    let cert = f.cert(&CertSpec::for_login(&name));
    let out = f
        .ssh(
            &cert,
            &name,
            &["-o", "SetEnv=FOO=bar"],
            "id -un; id -Gn; pwd; echo \"$HOME $SHELL $FOO\"",
            None,
        )
        .await;
    assert_eq!(out.code, Some(0), "{out:?}");
    let lines: Vec<&str> = out.stdout.lines().collect();
    assert_eq!(lines[0], name);
    assert!(lines[1].split(' ').any(|g| g == "users"), "{out:?}");
    let home = format!("/home/{name}");
    assert_eq!(lines[2], home);
    assert_eq!(lines[3], format!("{home} /bin/sh bar"));

    // The PTY belongs to the login user.
    let out = f
        .ssh(&cert, &name, &["-tt"], "stat -c %U $(tty)", None)
        .await;
    assert_eq!(out.code, Some(0), "{out:?}");
    assert!(out.stdout.contains(&name), "{out:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_transfer_both_ways() {
    let f = Fixture::start().await;
    let cert = f.cert(&CertSpec::for_login(&f.login));
    let input: Vec<u8> = (0..20 * 1024 * 1024u32).map(|i| (i % 251) as u8).collect();
    let started = std::time::Instant::now();
    let out = f
        .ssh(&cert, &f.login, &[], "cat | sha256sum", Some(&input))
        .await;
    assert_eq!(out.code, Some(0), "{out:?}");
    let expected = {
        use std::io::Write;
        let mut c = std::process::Command::new("sha256sum")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        c.stdin.take().unwrap().write_all(&input).unwrap();
        String::from_utf8(c.wait_with_output().unwrap().stdout).unwrap()
    };
    assert_eq!(out.stdout, expected);
    eprintln!("20 MiB in: {:?}", started.elapsed());

    let started = std::time::Instant::now();
    let out = f
        .ssh(&cert, &f.login, &[], "head -c 20971520 /dev/zero", None)
        .await;
    assert_eq!(out.code, Some(0));
    assert_eq!(out.stdout.len(), 20 * 1024 * 1024);
    eprintln!("20 MiB out: {:?}", started.elapsed());
    let end = f
        .audit
        .wait_for("session.end", |e| e["bytes_out"] == 20 * 1024 * 1024)
        .await;
    assert_eq!(end["exit_code"], 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_closes_only_that_connection() {
    let f = Fixture::start().await;
    for junk in [
        &b"GET / HTTP/1.1\r\n\r\n"[..],
        &b"SSH-2.0-x\r\n\x00\x00\x00\x0c\x0a\x14garbagegarbage"[..],
        &[0xffu8; 4096][..],
    ] {
        let mut sock = tokio::net::TcpStream::connect(f.addr).await.unwrap();
        let _ = sock.write_all(junk).await;
        let mut buf = Vec::new();
        // The server answers with its banner (and maybe an error), then closes.
        let read = tokio::time::timeout(
            Duration::from_secs(10),
            tokio::io::AsyncReadExt::read_to_end(&mut sock, &mut buf),
        )
        .await;
        assert!(read.is_ok(), "server kept a garbage connection open");
    }
    let cert = f.cert(&CertSpec::for_login(&f.login));
    let out = f.ssh(&cert, &f.login, &[], "echo still-alive", None).await;
    assert_eq!(out.stdout, "still-alive\n");
}

struct TrustAnyHost;

impl russh::client::Handler for TrustAnyHost {
    type Error = russh::Error;

    async fn check_server_key(
        &mut self,
        key: &russh::keys::PublicKeyOrCertificate,
    ) -> Result<bool, Self::Error> {
        // The node presents its certificate, not a bare key.
        Ok(matches!(
            key,
            russh::keys::PublicKeyOrCertificate::Certificate(_)
        ))
    }
}

/// Everything a channel sent until it closed: (output, exit status, exit signal).
async fn drain(
    ch: &mut russh::Channel<russh::client::Msg>,
) -> (String, Option<u32>, Option<russh::Sig>) {
    let mut out = Vec::new();
    let (mut status, mut signal) = (None, None);
    loop {
        let msg = tokio::time::timeout(SSH_TIMEOUT, ch.wait())
            .await
            .expect("channel did not close in time");
        match msg {
            Some(russh::ChannelMsg::Data { data }) => out.extend_from_slice(&data),
            Some(russh::ChannelMsg::ExitStatus { exit_status }) => status = Some(exit_status),
            Some(russh::ChannelMsg::ExitSignal { signal_name, .. }) => signal = Some(signal_name),
            Some(russh::ChannelMsg::Close) | None => break,
            Some(_) => {}
        }
    }
    (String::from_utf8_lossy(&out).into_owned(), status, signal)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn window_change_and_signal_from_a_russh_client() {
    let f = Fixture::start().await;
    let (key, cert) = f.sign(&f.user_ca, &CertSpec::for_login(&f.login));
    let key =
        russh::keys::PrivateKey::from_openssh(key.to_openssh(LineEnding::LF).unwrap().as_bytes())
            .unwrap();
    let cert = russh::keys::Certificate::from_openssh(&cert.to_openssh().unwrap()).unwrap();
    let mut config = russh::client::Config::default();
    // Ask for the host certificate (russh clients do not by default).
    config.preferred.host_key_certificates =
        std::borrow::Cow::Owned(vec![russh::keys::Algorithm::Ed25519]);
    let mut session = russh::client::connect(Arc::new(config), f.addr, TrustAnyHost)
        .await
        .unwrap();
    let auth = session
        .authenticate_openssh_cert(f.login.clone(), Arc::new(key), cert)
        .await
        .unwrap();
    assert!(auth.success());

    // PTY shell: a window-change before the command reaches the terminal.
    let mut ch = session.channel_open_session().await.unwrap();
    ch.request_pty(true, "xterm", 80, 24, 0, 0, &[])
        .await
        .unwrap();
    ch.request_shell(true).await.unwrap();
    ch.window_change(132, 43, 0, 0).await.unwrap();
    ch.data(&b"stty size; exit 4\n"[..]).await.unwrap();
    let (out, status, _) = drain(&mut ch).await;
    assert!(out.contains("43 132"), "{out:?}");
    assert_eq!(status, Some(4));

    // More sessions, one after the other, than a connection may hold at once.
    for i in 0..12 {
        let mut ch = session.channel_open_session().await.unwrap();
        ch.exec(true, format!("echo run-{i}")).await.unwrap();
        let (out, status, _) = drain(&mut ch).await;
        assert_eq!(out, format!("run-{i}\n"));
        assert_eq!(status, Some(0));
    }

    // A signal reaches the command's process group; the client learns the signal.
    let mut ch = session.channel_open_session().await.unwrap();
    ch.exec(true, "echo started; sleep 30").await.unwrap();
    let msg = tokio::time::timeout(SSH_TIMEOUT, ch.wait()).await.unwrap();
    assert!(matches!(msg, Some(russh::ChannelMsg::Success)), "{msg:?}");
    let msg = tokio::time::timeout(SSH_TIMEOUT, ch.wait()).await.unwrap();
    assert!(
        matches!(msg, Some(russh::ChannelMsg::Data { .. })),
        "{msg:?}"
    );
    ch.signal(russh::Sig::INT).await.unwrap();
    let (_, status, signal) = drain(&mut ch).await;
    assert_eq!(status, None);
    assert!(matches!(signal, Some(russh::Sig::INT)), "{signal:?}");
    let end = f
        .audit
        .wait_for("session.end", |e| e["exit_signal"] == "INT")
        .await;
    assert!(end["duration_ms"].as_u64().unwrap() < 30_000);
}

/// What `ssh -Q WHAT` says this OpenSSH client supports.
fn client_supports(what: &str) -> Vec<String> {
    let out = std::process::Command::new("ssh")
        .args(["-Q", what])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_owned)
        .collect()
}

/// The algorithm lists the server offered, as the real client logs them at `-vv`.
fn offered(stderr: &str, what: &str) -> Vec<String> {
    let server_part = stderr
        .split("peer server KEXINIT proposal")
        .nth(1)
        .expect("no server proposal in the client's log");
    server_part
        .lines()
        .find_map(|l| l.split_once(&format!("debug2: {what}: ")).map(|(_, v)| v))
        .unwrap_or_else(|| panic!("no `{what}` in the server's proposal"))
        .split(',')
        .map(str::to_owned)
        .collect()
}

/// The node offers a hardened set, checked from the real OpenSSH client's side: exactly these
/// lists (post-quantum hybrid and curve25519 key exchange with strict kex, AEAD ciphers,
/// encrypt-then-MAC MACs, no compression), each cipher and MAC one this client can use (as
/// `ssh -Q` says), each offered cipher working, and older choices refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offers_a_hardened_algorithm_set() {
    let f = Fixture::start().await;
    let cert = f.cert(&CertSpec::for_login(&f.login));
    let out = f
        .ssh(
            &cert,
            &f.login,
            &["-vv", "-o", "LogLevel=DEBUG2"],
            "true",
            None,
        )
        .await;
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    let kex = offered(&out.stderr, "KEX algorithms");
    assert_eq!(
        kex,
        [
            "mlkem768x25519-sha256",
            "curve25519-sha256",
            "curve25519-sha256@libssh.org",
            "ext-info-s",
            "kex-strict-s-v00@openssh.com",
        ]
    );
    let ciphers = [
        "aes128-gcm@openssh.com",
        "aes256-gcm@openssh.com",
        "chacha20-poly1305@openssh.com",
    ];
    let macs = [
        "hmac-sha2-256-etm@openssh.com",
        "hmac-sha2-512-etm@openssh.com",
    ];
    for dir in ["ctos", "stoc"] {
        assert_eq!(offered(&out.stderr, &format!("ciphers {dir}")), ciphers);
        assert_eq!(offered(&out.stderr, &format!("MACs {dir}")), macs);
        assert_eq!(
            offered(&out.stderr, &format!("compression {dir}")),
            ["none"]
        );
    }
    // Every cipher and MAC offered is one a real OpenSSH client has; the key exchange this
    // client and the node agree on is one of the client's.
    let (client_ciphers, client_macs, client_kex) = (
        client_supports("cipher"),
        client_supports("mac"),
        client_supports("kex"),
    );
    for c in ciphers {
        assert!(client_ciphers.iter().any(|x| x == c), "{c}");
    }
    for m in macs {
        assert!(client_macs.iter().any(|x| x == m), "{m}");
    }
    assert!(
        kex.iter().any(|k| client_kex.contains(k)),
        "no key exchange in common with this client"
    );
    // Each cipher works when the client insists on it.
    for c in ciphers {
        let out = f.ssh(&cert, &f.login, &["-c", c], "echo ok", None).await;
        assert_eq!(out.stdout, "ok\n", "{c}: {}", out.stderr);
    }
    // Older choices are refused in the handshake.
    // Older choices are refused in the handshake.
    for (opt, value) in [
        ("Ciphers", "aes128-ctr"),
        ("Ciphers", "aes256-cbc"),
        ("KexAlgorithms", "diffie-hellman-group14-sha256"),
        ("KexAlgorithms", "ecdh-sha2-nistp256"),
    ] {
        let option = format!("{opt}={value}");
        let out = f
            .ssh(&cert, &f.login, &["-o", &option], "echo ok", None)
            .await;
        assert_ne!(out.code, Some(0), "{option} was accepted");
        assert_eq!(out.stdout, "", "{option} ran a command");
    }
    // A client that asks for compression gets none, and still connects.
    let out = f
        .ssh(&cert, &f.login, &["-o", "Compression=yes"], "echo ok", None)
        .await;
    assert_eq!(out.stdout, "ok\n", "{}", out.stderr);
}
