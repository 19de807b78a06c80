//! `loadgen --help` explains the scenarios; wrong options and unreachable clusters are clear
//! errors, not panics.

// Test code: a failing unwrap or panic is a failing test, which is the point.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::process::Command;

fn loadgen(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_loadgen"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn help_lists_every_scenario_and_its_options() {
    let (code, out, _) = loadgen(&["--help"]);
    assert_eq!(code, 0);
    for s in ["logins", "tunnels", "throughput", "latency", "sessions"] {
        assert!(out.contains(s), "--help lacks {s}:\n{out}");
    }
    assert!(
        !out.contains("worker-agents"),
        "internal subcommand shown:\n{out}"
    );
    let (code, out, _) = loadgen(&["tunnels", "--help"]);
    assert_eq!(code, 0);
    for opt in ["--count", "--procs", "--identities", "--hold", "--workers"] {
        assert!(out.contains(opt), "tunnels --help lacks {opt}:\n{out}");
    }
}

#[test]
fn wrong_options_and_unreachable_clusters_are_clear_errors() {
    let (code, _, err) = loadgen(&["throughput", "--streams", "lots"]);
    assert_ne!(code, 0);
    assert!(err.contains("invalid value 'lots'"), "{err}");
    let (code, _, err) = loadgen(&["throughput", "--paths", "carrier-pigeon"]);
    assert_ne!(code, 0);
    assert!(err.contains("carrier-pigeon"), "{err}");
    let (code, _, err) = loadgen(&["tunnels", "--count", "0"]);
    assert_ne!(code, 0);
    assert!(err.contains("at least 1"), "{err}");
    let (code, _, err) = loadgen(&[
        "logins",
        "--auth",
        "127.0.0.1:1",
        "--ca-pin",
        "sha256:00",
        "--user",
        "x",
        "--password",
        "y",
        "--duration",
        "1s",
    ]);
    assert_ne!(code, 0);
    assert!(err.contains("cannot reach Auth at 127.0.0.1:1"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}
