//! `gatehouse start --config FILE`: the TOML config is honoured (data dir, cluster name, listen
//! addresses, JSON logs) and a bad config or role is a clear error, not a panic.

// Test code: a failing unwrap or panic is a failing test, which is the point.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{bin, run};

#[test]
fn config_file_sets_data_dir_name_addresses_and_json_logs() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("gatehouse.toml");
    std::fs::write(
        &config,
        format!(
            "data_dir = \"{}\"\ncluster_name = \"from-config\"\nroles = [\"auth\"]\n[auth]\nlisten = \"127.0.0.1:0\"\npublic_addrs = [\"auth.example.test\"]\n[diag]\nlisten = \"127.0.0.1:0\"\n[log]\nformat = \"json\"\nlevel = \"info\"\n",
            dir.path().join("state").display()
        ),
    )
    .unwrap();
    let mut child = Command::new(bin("gatehouse"))
        .arg("start")
        .arg("--config")
        .arg(&config)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let mut banner = String::new();
    while let Ok(line) = rx.recv_timeout(Duration::from_secs(60)) {
        banner.push_str(&line);
        banner.push('\n');
        if line.starts_with("  gsh login") {
            break;
        }
    }
    let _ = Command::new("kill").arg(child.id().to_string()).status();
    let _ = child.wait();
    assert!(
        banner.contains("Gatehouse cluster \"from-config\" is running"),
        "{banner}"
    );
    assert!(dir.path().join("state/gatehouse.db").exists());
    assert!(dir.path().join("state/admin/tls.crt").exists());
    let logs: Vec<String> = BufReader::new(stderr)
        .lines()
        .map_while(Result::ok)
        .collect();
    assert!(!logs.is_empty());
    for line in &logs {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON: {line}: {e}"));
        assert!(v.get("level").is_some(), "{line}");
    }
    assert!(
        logs.iter().any(|l| l.contains("gatehouse started")),
        "{logs:?}"
    );
}

#[test]
fn bad_config_and_unknown_role_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("bad.toml");
    std::fs::write(&config, "[auth]\nlisten = \"127.0.0.1:0\"\nlisen = 1\n").unwrap();
    let mut cmd = Command::new(bin("gatehouse"));
    cmd.arg("start").arg("--config").arg(&config);
    let out = run(cmd, None).failed();
    assert!(out.stderr.contains("lisen"), "{}", out.stderr);

    let mut cmd = Command::new(bin("gatehouse"));
    cmd.args(["start", "--roles", "auth,teleporter", "--data-dir"])
        .arg(dir.path().join("d"));
    let out = run(cmd, None).failed();
    assert!(
        out.stderr.contains("role `teleporter` is not available"),
        "{}",
        out.stderr
    );
    assert!(
        !dir.path().join("d").exists(),
        "a refused start must not create state"
    );
}
