//! Where recordings go and what happens when they cannot: a real S3-compatible server (moto's
//! server mode) with a recording above the multipart threshold, and the agent's spool quota with
//! `on_failure = "continue"` and `"refuse"`.

// Test code: a failing unwrap or panic is a failing test, which is the point.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{Fleet, openssh};

fn recordings(fleet: &Fleet, home: &Path) -> Vec<serde_json::Value> {
    let out = fleet.gsh(home, &["recordings", "ls", "--format", "json"], None);
    serde_json::from_str(&out.stdout).unwrap_or_default()
}

fn wait_for(
    fleet: &Fleet,
    home: &Path,
    what: &str,
    pred: impl Fn(&[serde_json::Value]) -> bool,
) -> Vec<serde_json::Value> {
    let deadline = Instant::now() + Duration::from_secs(40);
    loop {
        let list = recordings(fleet, home);
        if pred(&list) {
            return list;
        }
        assert!(Instant::now() < deadline, "{what}: {list:?}");
        std::thread::sleep(Duration::from_millis(300));
    }
}

/// moto's S3 server on a free loopback port, killed on drop.
struct Moto {
    child: Child,
    url: String,
}

impl Moto {
    fn start() -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = Command::new("python3")
            .args([
                "-m",
                "moto.server",
                "-H",
                "127.0.0.1",
                "-p",
                &port.to_string(),
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("python3 -m moto.server (scripts/provision installs moto[server])");
        let url = format!("http://127.0.0.1:{port}");
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "moto did not start");
            std::thread::sleep(Duration::from_millis(100));
        }
        Moto { child, url }
    }

    fn curl(&self, args: &[&str]) -> String {
        let mut cmd = Command::new("curl");
        cmd.args(["-sS", "--fail"]).args(args);
        common::run(cmd, None).ok().stdout
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(bytes))
}

#[test]
fn recordings_go_to_s3_in_parts_and_come_back_whole() {
    let moto = Moto::start();
    moto.curl(&["-X", "PUT", &format!("{}/recordings", moto.url)]);
    let config = format!(
        "[auth.recordings]\nstorage = \"s3://recordings/cluster-a\"\nendpoint = \"{}\"\nregion = \"us-east-1\"\n",
        moto.url
    );
    let env = [
        ("AWS_ACCESS_KEY_ID".to_string(), "testing".to_string()),
        ("AWS_SECRET_ACCESS_KEY".to_string(), "testing".to_string()),
    ];
    let fleet = Fleet::start_custom(
        "s3",
        &config,
        &env,
        &[],
        &[("web1", "env=dev", vec![])],
        |p| p.to_string(),
    );
    let login = fleet.login.clone();
    let alice = tempfile::tempdir().unwrap();
    fleet.user(alice.path(), "alice", "access", &login, &[]);
    fleet.wait_for_nodes(alice.path(), 1);
    let ssh_config = fleet.ssh_config(alice.path());

    // A small recording and one of ~16 MB of base64 (compresses to ~12 MB: above the 8 MiB
    // multipart threshold).
    openssh(
        &ssh_config,
        &[],
        &format!("{login}@web1.s3"),
        &["echo small"],
        None,
    )
    .ok();
    let big = openssh(
        &ssh_config,
        &[],
        &format!("{login}@web1.s3"),
        &["head -c 12000000 /dev/urandom | base64 -w 76"],
        None,
    )
    .ok();
    assert!(big.stdout.len() > 16_000_000);
    let list = wait_for(&fleet, alice.path(), "two complete recordings", |l| {
        l.len() == 2 && l.iter().all(|r| r["state"] == "complete")
    });
    let big_rec = list
        .iter()
        .find(|r| r["bytes"].as_u64().unwrap() > 8 << 20)
        .unwrap_or_else(|| panic!("no recording above 8 MiB: {list:?}"));
    let id = big_rec["id"].as_str().unwrap();

    // The objects are in the bucket, under the prefix.
    let listing = moto.curl(&[&format!(
        "{}/recordings?list-type=2&prefix=cluster-a/",
        moto.url
    )]);
    assert!(
        listing.contains(&format!("cluster-a/{id}.rec")),
        "{listing}"
    );
    // Read back from S3: verified, and the exported output is byte for byte what was printed.
    let v = fleet.gctl(&["recordings", "verify", id]).ok();
    assert!(v.stdout.contains("OK"), "{}", v.stdout);
    let text = fleet
        .gsh(
            alice.path(),
            &["recordings", "export", id, "--format", "text"],
            None,
        )
        .ok();
    assert_eq!(
        sha256_hex(text.stdout.as_bytes()),
        sha256_hex(big.stdout.as_bytes())
    );
}

/// A fleet whose Auth says `on_failure`, with agents web1 (quota 64 KiB) and web2 (100 bytes).
fn quota_fleet(name: &str, on_failure: &str) -> Fleet {
    let config = format!("[auth.recording]\non_failure = \"{on_failure}\"\n");
    Fleet::start_custom(
        name,
        &config,
        &[],
        &[],
        &[
            (
                "web1",
                "env=dev",
                vec!["--recording-spool-quota".into(), "64KiB".into()],
            ),
            (
                "web2",
                "env=dev",
                vec!["--recording-spool-quota".into(), "100".into()],
            ),
        ],
        |p| p.to_string(),
    )
}

/// Prints ~400 KB that does not compress over about two seconds (the spool fills a quarter of
/// the way in).
const NOISY: &str = "for i in $(seq 1 40); do head -c 7500 /dev/urandom | base64 -w 76; sleep 0.05; done; echo finished-ok";

#[test]
fn a_full_spool_with_continue_keeps_the_session_and_seals_the_recording_incomplete() {
    let fleet = quota_fleet("qc", "continue");
    let login = fleet.login.clone();
    let alice = tempfile::tempdir().unwrap();
    fleet.user(alice.path(), "alice", "access", &login, &[]);
    fleet.wait_for_nodes(alice.path(), 2);
    let config = fleet.ssh_config(alice.path());

    let out = openssh(&config, &[], &format!("{login}@web1.qc"), &[NOISY], None).ok();
    assert!(out.stdout.contains("finished-ok"));
    // web2 cannot even hold a session's start: the session still runs, unrecorded.
    let out = openssh(
        &config,
        &[],
        &format!("{login}@web2.qc"),
        &["echo still-served"],
        None,
    )
    .ok();
    assert!(out.stdout.contains("still-served"));

    let list = wait_for(&fleet, alice.path(), "an incomplete recording", |l| {
        l.iter().any(|r| r["state"] == "incomplete")
    });
    let rec = list.iter().find(|r| r["state"] == "incomplete").unwrap();
    assert!(
        rec["reason"].as_str().unwrap().contains("spool is full"),
        "{rec:?}"
    );
    let failed = fleet.events("recording.failed");
    assert!(failed.len() >= 2, "{failed:?}");
    assert!(failed.iter().all(|e| {
        e["data"]["reason"]
            .as_str()
            .unwrap()
            .contains("spool is full")
    }));
    // Both agents still serve.
    openssh(&config, &[], &format!("{login}@web1.qc"), &["true"], None).ok();
}

#[test]
fn a_full_spool_with_refuse_ends_the_session_with_why_and_refuses_new_ones() {
    let fleet = quota_fleet("qr", "refuse");
    let login = fleet.login.clone();
    let alice = tempfile::tempdir().unwrap();
    fleet.user(alice.path(), "alice", "access", &login, &[]);
    fleet.wait_for_nodes(alice.path(), 2);
    let config = fleet.ssh_config(alice.path());
    // The agents learn the cluster's setting from Auth within a few seconds of starting.
    std::thread::sleep(Duration::from_secs(2));

    // A running session is ended, with the reason on the user's terminal.
    let out = openssh(&config, &[], &format!("{login}@web1.qr"), &[NOISY], None).failed();
    assert!(!out.stdout.contains("finished-ok"));
    assert!(
        out.stderr.contains("its recording cannot be written")
            && out.stderr.contains("spool is full"),
        "{}",
        out.stderr
    );
    // A new session on a node whose spool cannot take it is not started.
    let out = openssh(
        &config,
        &[],
        &format!("{login}@web2.qr"),
        &["echo must-not-run"],
        None,
    )
    .failed();
    assert!(!out.stdout.contains("must-not-run"));
    assert!(
        out.stderr.contains("not started") || out.stderr.contains("recording cannot be written"),
        "{}",
        out.stderr
    );
    // The node keeps serving sessions it can record.
    let out = openssh(
        &config,
        &[],
        &format!("{login}@web1.qr"),
        &["echo small-ok"],
        None,
    )
    .ok();
    assert!(out.stdout.contains("small-ok"));
    assert!(!fleet.events("recording.failed").is_empty());
}

/// Stateless Auths: two Auths on one PostgreSQL and one bucket, nothing else shared. A session
/// is recorded while the Auth taking its upload is killed: the upload goes on through the other
/// (its staged parts are in the bucket), which finishes, verifies and serves the recording.
#[test]
fn a_recording_survives_the_auth_that_took_its_upload() {
    let moto = Moto::start();
    moto.curl(&["-X", "PUT", &format!("{}/recordings", moto.url)]);
    let pg = gatehouse_controlplane::testing::PgServer::start().unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let url = rt.block_on(pg.fresh_db()).unwrap();
    let config = format!(
        "[auth]\nstorage = \"{url}\"\n[auth.recordings]\nstorage = \"s3://recordings/fleet\"\nendpoint = \"{}\"\nregion = \"us-east-1\"\n",
        moto.url
    );
    let env = [
        ("AWS_ACCESS_KEY_ID".to_string(), "testing".to_string()),
        ("AWS_SECRET_ACCESS_KEY".to_string(), "testing".to_string()),
    ];
    let mut fleet = Fleet::start_ha_env(
        "stateless",
        &config,
        &env,
        2,
        &[("web1", "env=dev", vec![])],
    );
    let login = fleet.login.clone();
    let alice = tempfile::tempdir().unwrap();
    fleet.user(alice.path(), "alice", "access", &login, &[]);
    fleet.wait_for_nodes(alice.path(), 1);
    let ssh_config = fleet.ssh_config(alice.path());
    let session = Command::new("ssh")
        .arg("-F")
        .arg(&ssh_config)
        .args(["-o", "BatchMode=yes", &format!("{login}@web1.stateless")])
        .args([
            "sh",
            "-c",
            "'for i in $(seq 1 16); do echo line-$i; sleep 0.5; done'",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Some of the recording is staged in the bucket, through the first Auth, before it dies.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let staged = moto.curl(&[&format!(
            "{}/recordings?list-type=2&prefix=fleet/staging/",
            moto.url
        )]);
        if staged.contains(".part") {
            break;
        }
        assert!(Instant::now() < deadline, "nothing staged: {staged}");
        std::thread::sleep(Duration::from_millis(200));
    }
    fleet.auth.kill_hard();
    let out = session.wait_with_output().unwrap();
    let printed = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(printed.contains("line-16"), "{printed}");

    // The other Auth has it, whole and verified; the staged parts are gone.
    let deadline = Instant::now() + Duration::from_secs(60);
    let id = loop {
        let list = fleet.gctl_in("auth1", &["recordings", "ls", "--format", "json"]);
        let list: Vec<serde_json::Value> = serde_json::from_str(&list.stdout).unwrap_or_default();
        if let Some(r) = list.iter().find(|r| r["state"] == "complete") {
            break r["id"].as_str().unwrap().to_string();
        }
        assert!(Instant::now() < deadline, "no complete recording: {list:?}");
        std::thread::sleep(Duration::from_millis(300));
    };
    let v = fleet.gctl_in("auth1", &["recordings", "verify", &id]).ok();
    assert!(v.stdout.contains("OK"), "{}", v.stdout);
    let listing = moto.curl(&[&format!(
        "{}/recordings?list-type=2&prefix=fleet/",
        moto.url
    )]);
    assert!(listing.contains(&format!("fleet/{id}.rec")), "{listing}");
    assert!(!listing.contains(".part"), "staged parts left: {listing}");
    let text = fleet
        .gsh(
            alice.path(),
            &["recordings", "export", &id, "--format", "text"],
            None,
        )
        .ok();
    for i in 1..=16 {
        assert!(
            text.stdout.contains(&format!("line-{i}")),
            "{}",
            text.stdout
        );
    }
}
