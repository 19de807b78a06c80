//! `send-zc` runs both sends through io_uring and reports both (skipped where the kernel has
//! no io_uring, unless CI's io_uring pass requires it).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[test]
fn send_zc_measures_both_sends() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("zc.json");
    let run = std::process::Command::new(env!("CARGO_BIN_EXE_send-zc"))
        .args([
            "--rounds",
            "1",
            "--seconds",
            "0.2",
            "--chunk-kib",
            "16",
            "--json",
        ])
        .arg(&out)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&run.stderr);
    if !run.status.success()
        && err.contains("io_uring_setup")
        && std::env::var("GATEHOUSE_PROXY_IO_BACKEND").as_deref() != Ok("io_uring")
    {
        eprintln!("skipped: no io_uring here: {err}");
        return;
    }
    assert!(run.status.success(), "{err}");
    let text = std::fs::read_to_string(&out).unwrap();
    for op in ["\"op\":\"SEND\"", "\"op\":\"SEND_ZC\""] {
        assert!(text.contains(op), "{text}");
    }
    assert!(!text.contains("\"gb_per_s\":0.0000"), "{text}");
}
