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
