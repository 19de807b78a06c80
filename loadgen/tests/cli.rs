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
    for s in [
        "logins",
        "tunnels",
        "throughput",
        "latency",
        "sessions",
        "ssh",
        "recordings",
        "audit",
        "auth-restart",
        "leaves",
    ] {
        assert!(out.contains(s), "--help lacks {s}:\n{out}");
    }
    assert!(
        !out.contains("worker-agents"),
        "internal subcommand shown:\n{out}"
    );
    let (code, out, _) = loadgen(&["tunnels", "--help"]);
    assert_eq!(code, 0);
    for opt in [
        "--count",
        "--procs",
        "--identities",
        "--hold",
        "--workers",
        "--runs",
    ] {
        assert!(out.contains(opt), "tunnels --help lacks {opt}:\n{out}");
    }
    let (code, out, _) = loadgen(&["throughput", "--help"]);
    assert_eq!(code, 0);
    for path in [
        "proxy",
        "proxy-epoll",
        "proxy-cubic",
        "proxy-quic",
        "direct",
        "naive",
        "openssh",
        "rathole",
    ] {
        assert!(out.contains(path), "throughput --help lacks {path}:\n{out}");
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
    let (code, _, err) = loadgen(&["ssh", "--concurrency", "0"]);
    assert_ne!(code, 0);
    assert!(err.contains("at least 1"), "{err}");
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

fn json(path: &std::path::Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// `loadgen --json FILE ARGS...`, which must succeed: the JSON report it wrote.
fn report(args: &[&str]) -> serde_json::Value {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("report.json");
    let mut all = vec!["--json", out.to_str().unwrap()];
    all.extend_from_slice(args);
    let (code, stdout, err) = loadgen(&all);
    assert_eq!(code, 0, "stdout:\n{stdout}\nstderr:\n{err}");
    json(&out)
}

/// The `ssh` scenario end to end, briefly: a spawned cluster and a real agent process, a real
/// sshd, and through a jump sshd to that sshd (ProxyJump); sessions open without errors on
/// every path and bytes flow; then OpenSSH's scp copies a file on each path.
#[test]
fn ssh_scenario_runs_through_the_proxy_beside_proxyjump_and_openssh() {
    let v = report(&[
        "ssh",
        "--duration",
        "1s",
        "--concurrency",
        "2",
        "--scp-mib",
        "16",
    ]);
    assert_eq!(v["rounds"], 1, "{v}");
    assert_eq!(v["skipped"].as_array().map(Vec::len), Some(0), "{v}");
    let rows = v["medians"].as_array().unwrap();
    let paths: Vec<&str> = rows.iter().map(|r| r["path"].as_str().unwrap()).collect();
    assert_eq!(paths, ["gatehouse", "proxyjump", "openssh"], "{v}");
    for row in rows {
        assert!(row["sessions"].as_u64().unwrap() > 0, "{row}");
        assert_eq!(row["errors"], 0, "{row}");
        assert!(row["bulk_gb_per_s"].as_f64().unwrap() > 0.0, "{row}");
        assert!(row["server_cpu_s"].as_f64().unwrap() > 0.0, "{row}");
    }
    let scp = v["scp_medians"].as_array().unwrap();
    let paths: Vec<&str> = scp.iter().map(|r| r["path"].as_str().unwrap()).collect();
    assert_eq!(paths, ["gatehouse", "proxyjump", "openssh"], "{v}");
    for row in scp {
        assert_eq!(row["bytes"], 16 << 20, "{row}");
        assert!(row["gb_per_s"].as_f64().unwrap() > 0.0, "{row}");
        assert!(row["server_cpu_s"].as_f64().unwrap() > 0.0, "{row}");
    }
}

/// The `recordings` scenario briefly: recorded sessions run, their recordings complete at Auth,
/// and the on/off rounds each move the whole output.
#[test]
fn recordings_scenario_records_sessions_and_compares_on_and_off() {
    let v = report(&[
        "recordings",
        "--sessions",
        "5",
        "--rate-kb",
        "2",
        "--duration",
        "3s",
        "--overhead-mb",
        "1",
        "--runs",
        "1",
    ]);
    let g = &v["ingest"];
    assert_eq!(g["ok"], 5, "{v}");
    assert_eq!(g["errors"], 0, "{v}");
    assert!(g["complete"].as_u64().unwrap() >= 5, "{v}");
    assert!(g["recorded_mb"].as_f64().unwrap() > 0.0, "{v}");
    let rounds = v["overhead"].as_array().unwrap();
    assert_eq!(rounds.len(), 2, "{v}");
    for r in rounds {
        assert!(r["mb"].as_f64().unwrap() >= 1.0, "{r}");
    }
    assert!(v["overhead_ratio"].as_f64().is_some(), "{v}");
}

/// The OpenSSH jump host baseline moves bytes and is charged its sshd children's CPU; rathole
/// either runs or is skipped with the reason.
#[test]
fn throughput_baselines_run_or_say_why_not() {
    let v = throughput_json("openssh,rathole", "1");
    let medians = v["medians"].as_array().unwrap();
    assert_eq!(medians.len(), 2, "{v}");
    assert_eq!(medians[0]["path"], "openssh");
    assert!(medians[0]["median_gb_per_s"].as_f64().unwrap() > 0.0, "{v}");
    assert!(
        medians[0]["median_gb_per_middle_cpu_s"].as_f64().unwrap() > 0.0,
        "{v}"
    );
    assert_eq!(medians[1]["path"], "rathole");
    assert!(
        medians[1]["median_gb_per_s"].as_f64().unwrap_or(0.0) > 0.0
            || medians[1]["skipped"]
                .as_str()
                .is_some_and(|s| !s.is_empty()),
        "{v}"
    );
}

/// The proxy on each I/O backend, side by side in one run: both move bytes, and each reports the
/// backend it really ran on (from the daemon's banner).
#[test]
fn throughput_measures_both_proxy_backends() {
    let v = throughput_json("proxy,proxy-epoll", "1");
    let medians = v["medians"].as_array().unwrap();
    assert_eq!(medians.len(), 2, "{v}");
    for m in medians {
        assert!(m["median_gb_per_s"].as_f64().unwrap() > 0.0, "{v}");
    }
    assert_eq!(medians[1]["path"], "proxy-epoll");
    assert_eq!(medians[1]["proxy_io_backend"], "epoll", "{v}");
    let wanted = std::env::var("GATEHOUSE_PROXY_IO_BACKEND").unwrap_or_default();
    let got = medians[0]["proxy_io_backend"].as_str().unwrap();
    match wanted.as_str() {
        "io_uring" | "epoll" => assert_eq!(got, wanted, "{v}"),
        _ => assert!(got == "io_uring" || got == "epoll", "{v}"),
    }
}

/// The simulated agents' tunnels over QUIC carry bulk sessions through the proxy.
#[test]
fn throughput_through_quic_tunnels() {
    let v = throughput_json("proxy-quic", "2");
    let m = &v["medians"][0];
    assert_eq!(m["path"], "proxy-quic", "{v}");
    assert!(m["median_gb_per_s"].as_f64().unwrap() > 0.0, "{v}");
    assert!(
        m["median_gb_per_middle_cpu_s"].as_f64().unwrap() > 0.0,
        "{v}"
    );
}

/// `--direction download`: a source behind each path sends, the client reads; direct and through
/// the proxy, bytes arrive and the proxy's CPU is measured; each run and median says which way.
#[test]
fn throughput_downloads_through_the_proxy_and_direct() {
    let v = report(&[
        "throughput",
        "--direction",
        "download",
        "--paths",
        "direct,proxy",
        "--runs",
        "1",
        "--streams",
        "2",
        "--duration",
        "1s",
    ]);
    for r in v["runs"].as_array().unwrap() {
        assert_eq!(r["direction"], "download", "{r}");
        // At least a few MB in a second, on any path (a stalled source sends nothing).
        assert!(r["bytes"].as_u64().unwrap() > 4 << 20, "{r}");
    }
    let medians = v["medians"].as_array().unwrap();
    assert_eq!(medians.len(), 2, "{v}");
    let proxy = medians.iter().find(|m| m["path"] == "proxy").unwrap();
    assert_eq!(proxy["direction"], "download", "{v}");
    assert!(
        proxy["median_gb_per_middle_cpu_s"].as_f64().unwrap() > 0.0,
        "{v}"
    );
}

/// `loadgen throughput` over `paths` (one 1 s round of `streams` streams): its JSON report.
fn throughput_json(paths: &str, streams: &str) -> serde_json::Value {
    report(&[
        "throughput",
        "--paths",
        paths,
        "--runs",
        "1",
        "--streams",
        streams,
        "--duration",
        "1s",
    ])
}

/// `loadgen latency` paces its requests: every slot of every round is sent and answered on both
/// paths (4 sessions at 2,000/s for 1 s: 2,001 slots, both ends included), each run reports its
/// percentiles in order, and the summary holds each path's medians and the median of the
/// rounds' added latencies.
#[test]
fn latency_sends_every_slot_on_both_paths() {
    let v = report(&[
        "latency",
        "--sessions",
        "4",
        "--rate",
        "2000",
        "--duration",
        "1s",
        "--runs",
        "3",
    ]);
    let rounds = v["rounds"].as_array().unwrap();
    assert_eq!(rounds.len(), 3, "{v}");
    let ordered = |r: &serde_json::Value| {
        assert_eq!(r["requests"].as_u64().unwrap(), 2001, "{r}");
        let (p50, p99, max) = (
            r["p50_us"].as_u64().unwrap(),
            r["p99_us"].as_u64().unwrap(),
            r["max_us"].as_u64().unwrap(),
        );
        assert!(0 < p50 && p50 <= p99 && p99 <= max, "{r}");
    };
    let mut added_p99 = Vec::new();
    for r in rounds {
        ordered(&r["direct"]);
        ordered(&r["proxy"]);
        let added = r["added"]["p99_us"].as_i64().unwrap();
        let (d, p) = (
            r["direct"]["p99_us"].as_i64().unwrap(),
            r["proxy"]["p99_us"].as_i64().unwrap(),
        );
        assert_eq!(added, p - d, "{r}");
        added_p99.push(added);
    }
    added_p99.sort_unstable();
    assert_eq!(v["added"]["p99_us"].as_i64().unwrap(), added_p99[1], "{v}");
    let medians = v["medians"].as_array().unwrap();
    assert_eq!(medians.len(), 2, "{v}");
    assert_eq!(medians[0]["path"], "direct");
    assert_eq!(medians[1]["path"], "proxy");
    let mut p50s: Vec<u64> = rounds
        .iter()
        .map(|r| r["proxy"]["p50_us"].as_u64().unwrap())
        .collect();
    p50s.sort_unstable();
    assert_eq!(medians[1]["p50_us"].as_u64().unwrap(), p50s[1], "{v}");
}

/// `loadgen sessions --handshakes resumed` measures only resumed handshakes, and they resume.
#[test]
fn sessions_measure_the_handshakes_asked_for() {
    let v = report(&[
        "sessions",
        "--handshakes",
        "resumed",
        "--concurrency",
        "2",
        "--duration",
        "1s",
        "--runs",
        "2",
    ]);
    // Two rounds of direct and proxy, and one median row per path, whose counts are the
    // rounds' sums.
    let runs = v["runs"].as_array().unwrap();
    assert_eq!(runs.len(), 4, "{v}");
    let medians = v["medians"].as_array().unwrap();
    assert_eq!(medians.len(), 2, "{v}");
    for m in medians {
        let sum: u64 = runs
            .iter()
            .filter(|r| r["path"] == m["path"])
            .map(|r| r["sessions"].as_u64().unwrap())
            .sum();
        assert_eq!(m["sessions"].as_u64().unwrap(), sum, "{v}");
    }
    for r in runs {
        assert_eq!(r["resumption"], true, "{r}");
        assert_eq!(r["errors"], 0, "{r}");
        let (n, resumed) = (
            r["sessions"].as_u64().unwrap(),
            r["resumed"].as_u64().unwrap(),
        );
        // Every session after each worker's first resumes its predecessor's ticket.
        assert!(n > 10 && resumed + 2 >= n, "{r}");
    }
}

/// `loadgen tunnels` holds every tunnel it asks for in each round (a fresh cluster per round),
/// and the summary's median row is built from the rounds.
#[test]
fn tunnels_rounds_hold_every_tunnel() {
    let v = report(&[
        "tunnels",
        "--count",
        "40",
        "--procs",
        "2",
        "--identities",
        "2",
        "--hold",
        "1s",
        "--runs",
        "3",
    ]);
    let rounds = v["rounds"].as_array().unwrap();
    assert_eq!(rounds.len(), 3, "{v}");
    for r in rounds {
        assert_eq!(r["tunnels_held"].as_u64().unwrap(), 40, "{r}");
        assert_eq!(r["failures"].as_u64().unwrap(), 0, "{r}");
    }
    let mut rates: Vec<f64> = rounds
        .iter()
        .map(|r| r["connects_per_second"].as_f64().unwrap())
        .collect();
    rates.sort_by(f64::total_cmp);
    let m = &v["median"];
    assert_eq!(m["connects_per_second"].as_f64().unwrap(), rates[1], "{v}");
    assert_eq!(m["tunnels_held"].as_u64().unwrap(), 40, "{v}");
    assert_eq!(m["transport"], "tls", "{v}");
}

/// `auth-restart`, small: agents tunnelled to both proxies lose no tunnel while both Auths
/// restart, and every node is listed again.
#[test]
fn auth_restart_loses_no_tunnel() {
    let v = report(&[
        "auth-restart",
        "--agents",
        "20",
        "--procs",
        "1",
        "--down",
        "2s",
        "--observe",
        "6s",
    ]);
    assert_eq!(v["tunnels_before"].as_u64().unwrap(), 40, "{v}");
    assert_eq!(v["agent_reconnects"].as_u64().unwrap(), 0, "{v}");
    assert_eq!(v["tunnels_after"].as_u64().unwrap(), 40, "{v}");
    assert!(v["nodes_back_seconds"].as_f64().unwrap() < 60.0, "{v}");
    // The proxies came back to the restarted Auths (announcements, the watch stream).
    assert!(v["auth_connections"].as_u64().unwrap() >= 2, "{v}");
}
