//! What people do over SSH every day, with the real OpenSSH tools through a real proxy and agent
//! (separate processes, joined with real tokens): `scp` (SFTP by default, and `-O`), `scp -r -p`,
//! `sftp -b`, `rsync -e ssh` and `gsh scp`, as a login user other than the agent's, with that
//! user's permissions and umask.

// Test code: a failing unwrap or panic is a failing test, which is the point.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::{Fleet, Output, run};
use sha2::{Digest, Sha256};

/// A throwaway system account (home under /home), removed on drop; `None` unless root.
struct TempUser {
    name: String,
    uid: u32,
    home: PathBuf,
}

impl TempUser {
    fn create(prefix: &str) -> Option<Self> {
        if !nix_is_root() {
            eprintln!("skipped: creating a login user needs root");
            return None;
        }
        let name = format!("{prefix}{}", std::process::id());
        let status = Command::new("useradd")
            .args(["-m", "-U", "-s", "/bin/sh", &name])
            .status()
            .unwrap();
        assert!(status.success(), "useradd {name}");
        let out = Command::new("id").args(["-u", &name]).output().unwrap();
        let uid = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap();
        Some(Self {
            home: PathBuf::from(format!("/home/{name}")),
            name,
            uid,
        })
    }
}

impl Drop for TempUser {
    fn drop(&mut self) {
        let _ = Command::new("userdel").args(["-r", &self.name]).output();
    }
}

fn nix_is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

fn pattern(n: usize, seed: u8) -> Vec<u8> {
    (0..n)
        .map(|i| ((i as u64 * 2_654_435_761) >> 13) as u8 ^ seed)
        .collect()
}

fn sha256_file(p: &Path) -> String {
    hex(&Sha256::digest(std::fs::read(p).unwrap()))
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// An OpenSSH client program (`scp`, `sftp`, `rsync`) with the `gsh config` file.
fn tool(program: &str, args: &[&str], stdin: Option<&str>) -> Output {
    let mut cmd = Command::new(program);
    cmd.args(args);
    run(cmd, stdin)
}

fn ok(out: Output, what: &str) -> Output {
    assert_eq!(
        out.status, 0,
        "{what} failed\nstdout:\n{}\nstderr:\n{}",
        out.stdout, out.stderr
    );
    out
}

/// One fleet with one agent, a Gatehouse user allowed `login`, logged in with an ssh config.
fn fleet(cluster: &str, login: &str) -> (Fleet, tempfile::TempDir, PathBuf) {
    let f = Fleet::start(cluster, &[("files", "env=test", vec![])]);
    let home = tempfile::tempdir().unwrap();
    f.user(home.path(), "alice", "access", login, &[]);
    f.wait_for_nodes(home.path(), 1);
    let config = f.ssh_config(home.path());
    (f, home, config)
}

#[test]
fn scp_sftp_and_rsync_as_the_login_user_with_its_umask() {
    let Some(user) = TempUser::create("ghft") else {
        return;
    };
    let (f, home, config) = fleet("files", &user.name);
    let cfg = config.display().to_string();
    let remote = |path: &str| format!("{}@files:{path}", user.name);
    let local = tempfile::tempdir().unwrap();
    let l = |name: &str| local.path().join(name);

    // scp in its default (SFTP) mode, both ways, 1 MiB and 64 MiB.
    for (name, size) in [("one", 1 << 20), ("big", 64 << 20)] {
        std::fs::write(l(name), pattern(size, size as u8)).unwrap();
        ok(
            tool(
                "scp",
                &["-F", &cfg, "-q", l(name).to_str().unwrap(), &remote(name)],
                None,
            ),
            "scp upload",
        );
        let on_node = user.home.join(name);
        assert_eq!(sha256_file(&on_node), sha256_file(&l(name)), "{name} up");
        let meta = std::fs::metadata(&on_node).unwrap();
        assert_eq!(meta.uid(), user.uid, "written as the login user");
        let back = l(&format!("{name}.back"));
        ok(
            tool(
                "scp",
                &["-F", &cfg, "-q", &remote(name), back.to_str().unwrap()],
                None,
            ),
            "scp download",
        );
        assert_eq!(sha256_file(&back), sha256_file(&l(name)), "{name} down");
    }
    // A new file gets the login's umask: Debian's UMASK 022 with a user-private group is 002.
    std::fs::write(l("fresh"), b"new file\n").unwrap();
    std::fs::set_permissions(l("fresh"), std::fs::Permissions::from_mode(0o666)).unwrap();
    ok(
        tool(
            "scp",
            &[
                "-F",
                &cfg,
                "-q",
                l("fresh").to_str().unwrap(),
                &remote("fresh"),
            ],
            None,
        ),
        "scp of a 0666 file",
    );
    let mode = std::fs::metadata(user.home.join("fresh"))
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o664, "the login's umask (002) applied: {mode:o}");

    // The legacy protocol (`scp -O`) both ways.
    ok(
        tool(
            "scp",
            &[
                "-O",
                "-F",
                &cfg,
                "-q",
                l("one").to_str().unwrap(),
                &remote("legacy"),
            ],
            None,
        ),
        "scp -O upload",
    );
    assert_eq!(
        sha256_file(&user.home.join("legacy")),
        sha256_file(&l("one"))
    );
    ok(
        tool(
            "scp",
            &[
                "-O",
                "-F",
                &cfg,
                "-q",
                &remote("legacy"),
                l("legacy.back").to_str().unwrap(),
            ],
            None,
        ),
        "scp -O download",
    );
    assert_eq!(sha256_file(&l("legacy.back")), sha256_file(&l("one")));

    // scp -r -p of a tree: contents, modes and modification times kept.
    let tree = l("tree");
    std::fs::create_dir_all(tree.join("sub/deeper")).unwrap();
    std::fs::write(tree.join("a.txt"), b"alpha\n").unwrap();
    std::fs::write(tree.join("sub/b.bin"), pattern(300_000, 7)).unwrap();
    std::fs::write(tree.join("sub/deeper/c.sh"), b"#!/bin/sh\necho c\n").unwrap();
    std::fs::set_permissions(
        tree.join("sub/deeper/c.sh"),
        std::fs::Permissions::from_mode(0o750),
    )
    .unwrap();
    let old = filetime(1_700_000_000);
    set_mtime(&tree.join("a.txt"), old);
    ok(
        tool(
            "scp",
            &[
                "-F",
                &cfg,
                "-q",
                "-r",
                "-p",
                tree.to_str().unwrap(),
                &remote(""),
            ],
            None,
        ),
        "scp -r -p",
    );
    let there = user.home.join("tree");
    assert_eq!(std::fs::read(there.join("a.txt")).unwrap(), b"alpha\n");
    assert_eq!(
        sha256_file(&there.join("sub/b.bin")),
        sha256_file(&tree.join("sub/b.bin"))
    );
    let c = std::fs::metadata(there.join("sub/deeper/c.sh")).unwrap();
    assert_eq!(c.permissions().mode() & 0o777, 0o750, "mode kept by -p");
    assert_eq!(
        std::fs::metadata(there.join("a.txt")).unwrap().mtime(),
        1_700_000_000,
        "mtime kept by -p"
    );

    // sftp in batch mode: put, get, ls, rename, mkdir, rm; and a path the login may not read,
    // a clear error that leaves the session serving the rest of the batch.
    std::fs::write(l("batch.txt"), b"batch file\n").unwrap();
    let batch = format!(
        "mkdir made\nput {} made/put.txt\nls made\nrename made/put.txt made/renamed.txt\nget made/renamed.txt {}\n-get /root/.gatehouse-no-such/secret {}\n-ls /root\nrm made/renamed.txt\nrmdir made\nls -la\n",
        l("batch.txt").display(),
        l("got.txt").display(),
        l("secret").display()
    );
    std::fs::write(l("batch"), &batch).unwrap();
    let out = ok(
        tool(
            "sftp",
            &[
                "-F",
                &cfg,
                "-b",
                l("batch").to_str().unwrap(),
                &format!("{}@files", user.name),
            ],
            None,
        ),
        "sftp -b",
    );
    assert!(out.stdout.contains("put.txt"), "{}", out.stdout);
    assert_eq!(std::fs::read(l("got.txt")).unwrap(), b"batch file\n");
    assert!(!l("secret").exists());
    assert!(
        out.stderr.contains("No such file")
            || out.stderr.contains("Permission denied")
            || out.stderr.contains("not found"),
        "the refused paths say why:\n{}",
        out.stderr
    );
    assert!(
        out.stderr.contains("Permission denied"),
        "/root is not the login's to list:\n{}",
        out.stderr
    );
    assert!(!user.home.join("made").exists(), "rm and rmdir ran");

    // rsync over ssh: a tree, then an update of one file.
    let rsh = format!("ssh -F {cfg}");
    ok(
        tool(
            "rsync",
            &[
                "-a",
                "-e",
                &rsh,
                &format!("{}/", tree.display()),
                &remote("synced"),
            ],
            None,
        ),
        "rsync",
    );
    assert_eq!(
        sha256_file(&user.home.join("synced/sub/b.bin")),
        sha256_file(&tree.join("sub/b.bin"))
    );
    std::fs::write(tree.join("a.txt"), b"alpha, again\n").unwrap();
    ok(
        tool(
            "rsync",
            &[
                "-a",
                "-e",
                &rsh,
                &format!("{}/", tree.display()),
                &remote("synced"),
            ],
            None,
        ),
        "rsync update",
    );
    assert_eq!(
        std::fs::read(user.home.join("synced/a.txt")).unwrap(),
        b"alpha, again\n"
    );
    assert_eq!(
        std::fs::metadata(user.home.join("synced/sub/b.bin"))
            .unwrap()
            .uid(),
        user.uid
    );

    // gsh scp: no ssh config, the same arguments as scp.
    let up = f.gsh(
        home.path(),
        &["scp", "-q", l("one").to_str().unwrap(), &remote("via-gsh")],
        None,
    );
    assert_eq!(up.status, 0, "{}", up.stderr);
    assert_eq!(
        sha256_file(&user.home.join("via-gsh")),
        sha256_file(&l("one"))
    );
    let down = f.gsh(
        home.path(),
        &[
            "scp",
            "-q",
            &remote("via-gsh"),
            l("via-gsh.back").to_str().unwrap(),
        ],
        None,
    );
    assert_eq!(down.status, 0, "{}", down.stderr);
    assert_eq!(sha256_file(&l("via-gsh.back")), sha256_file(&l("one")));

    // The SFTP sessions are audited as such.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let events = f.events("subsystem");
        if events
            .iter()
            .any(|e| e["data"]["subsystem"] == "sftp" && e["data"]["login"] == user.name.as_str())
        {
            break;
        }
        assert!(Instant::now() < deadline, "no subsystem event: {events:?}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn filetime(unix: i64) -> std::time::SystemTime {
    std::time::UNIX_EPOCH + Duration::from_secs(u64::try_from(unix).unwrap())
}

fn set_mtime(p: &Path, t: std::time::SystemTime) {
    let f = std::fs::File::options().write(true).open(p).unwrap();
    f.set_modified(t).unwrap();
}

/// A process killed when dropped (a background `ssh -N`, an HTTP server).
struct Bg(std::process::Child);

impl Drop for Bg {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `python3 -m http.server` on 127.0.0.1, serving `dir`; waits until it answers.
fn http_server(dir: &Path) -> (Bg, u16) {
    let port = free_port();
    let child = Command::new("python3")
        .args([
            "-m",
            "http.server",
            "--bind",
            "127.0.0.1",
            &port.to_string(),
        ])
        .current_dir(dir)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    wait_for_port(port);
    (Bg(child), port)
}

fn wait_for_port(port: u16) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "nothing listens on {port}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `ssh -N` with `extra` options, in the background until dropped.
fn ssh_bg(config: &Path, extra: &[&str], dest: &str) -> Bg {
    let child = Command::new("ssh")
        .arg("-F")
        .arg(config)
        .args([
            "-N",
            "-o",
            "BatchMode=yes",
            "-o",
            "ExitOnForwardFailure=yes",
        ])
        .args(extra)
        .arg(dest)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    Bg(child)
}

fn curl(args: &[&str]) -> Output {
    let mut cmd = Command::new("curl");
    cmd.args(["-s", "-S", "--max-time", "20"]).args(args);
    run(cmd, None)
}

fn wait_for_events(f: &Fleet, ty: &str, want: impl Fn(&[serde_json::Value]) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let events = f.events(ty);
        if want(&events) {
            return;
        }
        assert!(Instant::now() < deadline, "{ty} events: {events:#?}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn port_and_agent_forwarding_allowed_by_roles_refused_with_reasons() {
    let f = Fleet::start("forwards", &[("fwd", "env=test", vec![])]);
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
    role("agent-fwd", "[spec.options]\nforward_agent = true\n");
    role("no-fwd", "[spec.options]\nport_forwarding = false\n");
    let alice = tempfile::tempdir().unwrap();
    f.user(alice.path(), "alice", "access,agent-fwd", &f.login, &[]);
    let bob = tempfile::tempdir().unwrap();
    f.user(bob.path(), "bob", "access,no-fwd", &f.login, &[]);
    f.wait_for_nodes(alice.path(), 1);
    let cfg_a = f.ssh_config(alice.path());
    let cfg_b = f.ssh_config(bob.path());
    let dest = format!("{}@fwd", f.login);

    // A web server "on the node" (the node is this machine) and one "on the client".
    let site = tempfile::tempdir().unwrap();
    std::fs::write(site.path().join("hello.txt"), b"hello through the tunnel\n").unwrap();
    let (_web, web) = http_server(site.path());

    // -L: a local port on the client reaches the node's web server.
    let lport = free_port();
    let _l = ssh_bg(&cfg_a, &["-L", &format!("{lport}:127.0.0.1:{web}")], &dest);
    wait_for_port(lport);
    let got = curl(&[&format!("http://127.0.0.1:{lport}/hello.txt")]);
    assert_eq!(got.stdout, "hello through the tunnel\n", "{}", got.stderr);

    // -D: a SOCKS proxy in the client; the node resolves and connects.
    let dport = free_port();
    let _d = ssh_bg(&cfg_a, &["-D", &dport.to_string()], &dest);
    wait_for_port(dport);
    let got = curl(&[
        "--socks5-hostname",
        &format!("127.0.0.1:{dport}"),
        &format!("http://localhost:{web}/hello.txt"),
    ]);
    assert_eq!(got.stdout, "hello through the tunnel\n", "{}", got.stderr);

    // -R: the node's loopback reaches the client's web server (here the same one).
    let rport = free_port();
    let out = common::openssh(
        &cfg_a,
        &[
            "-o",
            "ExitOnForwardFailure=yes",
            "-R",
            &format!("{rport}:127.0.0.1:{web}"),
        ],
        &dest,
        &[&format!(
            "curl -s --max-time 10 http://127.0.0.1:{rport}/hello.txt"
        )],
        None,
    );
    assert_eq!(out.status, 0, "{}", out.stderr);
    assert_eq!(out.stdout, "hello through the tunnel\n");

    // -R asking for every address: the role says loopback (the default), so the listener is on
    // 127.0.0.1 only, whatever the client asked (as sshd's `GatewayPorts no`).
    let rport = free_port();
    let out = common::openssh(
        &cfg_a,
        &[
            "-o",
            "ExitOnForwardFailure=yes",
            "-R",
            &format!("0.0.0.0:{rport}:127.0.0.1:{web}"),
        ],
        &dest,
        &[&format!(
            "curl -s --max-time 10 http://127.0.0.1:{rport}/hello.txt; \
             curl -s --max-time 10 http://127.0.0.2:{rport}/hello.txt || echo not-on-127.0.0.2"
        )],
        None,
    );
    assert_eq!(
        out.stdout, "hello through the tunnel\nnot-on-127.0.0.2\n",
        "{}",
        out.stderr
    );

    // -A: the session sees the client's agent and its key.
    let agent_dir = tempfile::tempdir().unwrap();
    let sock = agent_dir.path().join("agent.sock");
    let _agent = Bg(Command::new("ssh-agent")
        .args(["-D", "-a"])
        .arg(&sock)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap());
    let deadline = Instant::now() + Duration::from_secs(10);
    while !sock.exists() {
        assert!(Instant::now() < deadline, "ssh-agent did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    let key = agent_dir.path().join("id");
    ok(
        tool(
            "ssh-keygen",
            &[
                "-q",
                "-t",
                "ed25519",
                "-N",
                "",
                "-C",
                "forwarded-key",
                "-f",
                key.to_str().unwrap(),
            ],
            None,
        ),
        "ssh-keygen",
    );
    let mut add = Command::new("ssh-add");
    add.arg(&key).env("SSH_AUTH_SOCK", &sock);
    ok(run(add, None), "ssh-add");
    let with_agent = |config: &Path| {
        let mut cmd = Command::new("ssh");
        cmd.arg("-F")
            .arg(config)
            .args([
                "-o",
                "BatchMode=yes",
                "-A",
                &dest,
                "ssh-add -l; echo sock=$SSH_AUTH_SOCK",
            ])
            .env("SSH_AUTH_SOCK", &sock);
        run(cmd, None)
    };
    let out = with_agent(&cfg_a);
    assert!(
        out.stdout.contains("forwarded-key"),
        "{}\n{}",
        out.stdout,
        out.stderr
    );
    let on_node = out
        .stdout
        .lines()
        .find_map(|l| l.strip_prefix("sock="))
        .unwrap()
        .to_string();
    // Removed as the agent closes the channel, which may trail the client's exit a little.
    let deadline = Instant::now() + Duration::from_secs(10);
    while Path::new(&on_node).exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        !Path::new(&on_node).exists(),
        "the agent socket is removed with the session: {on_node}"
    );

    // Refusals, each with a reason the client shows and an audit event.
    let out = common::openssh(
        &cfg_b,
        &["-W", &format!("127.0.0.1:{web}")],
        &dest,
        &[],
        None,
    );
    assert_ne!(out.status, 0);
    assert!(
        out.stderr
            .contains("port forwarding is not allowed by your roles"),
        "{}",
        out.stderr
    );
    let out = common::openssh(
        &cfg_b,
        &[
            "-o",
            "ExitOnForwardFailure=yes",
            "-R",
            &format!("{}:127.0.0.1:{web}", free_port()),
        ],
        &dest,
        &["true"],
        None,
    );
    assert_ne!(out.status, 0);
    assert!(
        out.stderr.contains("remote port forwarding failed"),
        "{}",
        out.stderr
    );
    let out = with_agent(&cfg_b);
    assert!(!out.stdout.contains("forwarded-key"), "{}", out.stdout);
    wait_for_events(&f, "port.forward", |events| {
        let ok = |dir: &str| {
            events
                .iter()
                .any(|e| e["data"]["direction"] == dir && e["data"]["success"] == true)
        };
        let refused = |dir: &str| {
            events.iter().any(|e| {
                e["data"]["direction"] == dir
                    && e["data"]["success"] == false
                    && e["data"]["user"] == "bob"
                    && e["data"]["reason"]
                        .as_str()
                        .is_some_and(|r| r.contains("permit-port-forwarding"))
            })
        };
        ok("local") && ok("remote") && refused("local") && refused("remote")
    });
    wait_for_events(&f, "agent.forward", |events| {
        events
            .iter()
            .any(|e| e["data"]["user"] == "alice" && e["data"]["success"] == true)
            && events
                .iter()
                .any(|e| e["data"]["user"] == "bob" && e["data"]["success"] == false)
    });
}

/// A client that opens 1,000 forwards at once: those past the connection's limit are refused
/// with a reason, the ones within it work, and the agent goes on serving other sessions.
#[test]
fn a_thousand_forwards_at_once_are_bounded_and_the_node_keeps_serving() {
    let f = Fleet::start("flood", &[("fwd", "env=test", vec![])]);
    let home = tempfile::tempdir().unwrap();
    f.user(home.path(), "alice", "access", &f.login, &[]);
    f.wait_for_nodes(home.path(), 1);
    let cfg = f.ssh_config(home.path());
    let dest = format!("{}@fwd", f.login);
    // The target holds every connection it accepts open.
    let target = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let tport = target.local_addr().unwrap().port();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for c in target.incoming().flatten() {
            held.push(c);
        }
    });
    let lport = free_port();
    let log = tempfile::NamedTempFile::new().unwrap();
    let child = Command::new("ssh")
        .arg("-F")
        .arg(&cfg)
        .args([
            "-N",
            "-o",
            "BatchMode=yes",
            "-o",
            "ExitOnForwardFailure=yes",
        ])
        .args(["-L", &format!("{lport}:127.0.0.1:{tport}"), &dest])
        .stdin(std::process::Stdio::null())
        .stderr(log.reopen().unwrap())
        .spawn()
        .unwrap();
    let _ssh = Bg(child);
    wait_for_port(lport);
    let conns: Vec<std::net::TcpStream> = (0..1000)
        .filter_map(|_| std::net::TcpStream::connect(("127.0.0.1", lport)).ok())
        .collect();
    assert!(conns.len() >= 900, "the client accepted {}", conns.len());
    // Those past the limit come back refused, each with the reason.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let text = std::fs::read_to_string(log.path()).unwrap_or_default();
        let refused = text.matches("too many forwarded channels").count();
        if refused >= 500 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{refused} refusals so far:\n{}",
            text.lines().take(5).collect::<Vec<_>>().join("\n")
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // Another session on the node is served meanwhile.
    let out = common::openssh(&cfg, &[], &dest, &["echo", "still here"], None);
    assert_eq!(out.status, 0, "{}", out.stderr);
    assert_eq!(out.stdout, "still here\n");
    drop(conns);
}

/// New SSH sessions from one address are throttled at the proxy: a burst passes, the rest are
/// refused with the reason before they reach the agent, and other addresses are not affected.
#[test]
fn new_ssh_sessions_per_address_are_throttled_at_the_proxy() {
    let f = Fleet::start_with(
        "throttle",
        &["--proxy-ssh-session-rate", "1/2"],
        &[("node", "env=test", vec![])],
    );
    let home = tempfile::tempdir().unwrap();
    f.user(home.path(), "alice", "access", &f.login, &[]);
    f.wait_for_nodes(home.path(), 1);
    let cfg = f.ssh_config(home.path());
    let dest = format!("{}@node", f.login);
    let started: Vec<_> = (0..10)
        .map(|_| {
            let (cfg, dest) = (cfg.clone(), dest.clone());
            std::thread::spawn(move || common::openssh(&cfg, &[], &dest, &["echo", "in"], None))
        })
        .collect();
    let outs: Vec<Output> = started.into_iter().map(|t| t.join().unwrap()).collect();
    let passed = outs.iter().filter(|o| o.stdout == "in\n").count();
    let refused: Vec<&Output> = outs
        .iter()
        .filter(|o| {
            o.stderr
                .contains("too many new SSH sessions from 127.0.0.1")
        })
        .collect();
    assert!((2..=5).contains(&passed), "{passed} passed");
    assert_eq!(passed + refused.len(), 10, "{outs:?}");
    let metrics = f.proxy_metrics();
    assert!(metrics.contains(r#"reason="rate_limited""#), "{metrics}");
    // After a pause the address may start sessions again.
    std::thread::sleep(Duration::from_secs(2));
    let out = common::openssh(&cfg, &[], &dest, &["echo", "again"], None);
    assert_eq!(out.stdout, "again\n", "{}", out.stderr);
}
