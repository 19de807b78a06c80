//! The web UI and the second factor, end to end with real processes.
//!
//! - `gsh mfa add` enrolls a TOTP device (QR code and otpauth URI in the terminal) and
//!   `gsh login` asks for its code when the cluster requires one (`[auth] second_factor`).
//! - In Debian's Chromium driven by playwright-core (`web/ui/e2e/run.mjs`): log in with
//!   password and TOTP, see the node, run `echo` in the web terminal, watch it live from a
//!   second page, play its recording, find it in the audit log; a wrong code, an expired
//!   session and cross-site / token-less POSTs are refused. The web terminal's session is then
//!   checked in `gctl events` and `gsh recordings ls` like any SSH session.

// Test code: a failing unwrap or panic is a failing test, which is the point.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{Cluster, Fleet, bin};
use gatehouse_controlplane::otp;

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// `gsh mfa add` as a user would run it: the password, then (after reading the URI it prints)
/// a code of the new device. Returns the device's secret (base32) and what gsh printed.
fn enroll(args: &[&str], home: &Path, password: &str) -> (String, String) {
    let mut child = Command::new(bin("gsh"))
        .args(["mfa", "add", "--password-stdin"])
        .args(args)
        .env("GATEHOUSE_HOME", home)
        .env_remove("GATEHOUSE_AUTH")
        .env_remove("GATEHOUSE_PROXY")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    writeln!(stdin, "{password}").unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut printed = String::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    let uri = loop {
        let mut line = String::new();
        assert!(
            out.read_line(&mut line).unwrap() > 0,
            "gsh ended before printing the URI:\n{printed}"
        );
        printed.push_str(&line);
        if let Some(uri) = line.trim().strip_prefix("otpauth://") {
            break uri.to_string();
        }
        assert!(Instant::now() < deadline, "no URI:\n{printed}");
    };
    let secret = uri
        .split(['?', '&'])
        .find_map(|kv| kv.strip_prefix("secret="))
        .unwrap()
        .to_string();
    let code = otp::code_at(&otp::base32_decode(&secret).unwrap(), now());
    writeln!(stdin, "{code}").unwrap();
    drop(stdin);
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut out, &mut rest).unwrap();
    printed.push_str(&rest);
    let status = child.wait().unwrap();
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
    assert!(status.success(), "gsh mfa add failed:\n{printed}\n{err}");
    (secret, printed)
}

/// Wait until the next 30-second step starts (a code of the enrolling step is used up).
fn next_step() {
    let s = otp::step_at(now());
    while otp::step_at(now()) == s {
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn gsh_enrolls_a_device_and_logs_in_with_its_code() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("auth.toml");
    std::fs::write(&config, "[auth]\nsecond_factor = \"otp\"\n").unwrap();
    let c = Cluster::start_in_with(dir, "mfa-cli", &["--config", config.to_str().unwrap()]);
    let pw = c.add_user("carol", "access", "carol");
    let home = tempfile::tempdir().unwrap();

    // Without a device a login that needs one is refused, saying how to enroll.
    let out = c.login(home.path(), "carol", &pw, &[]).failed();
    assert!(out.stderr.contains("gsh mfa add"), "{}", out.stderr);

    let (secret, printed) = enroll(
        &["--auth", &c.auth, "--user", "carol", "--ca-pin", &c.pin],
        home.path(),
        &pw,
    );
    // The QR code is drawn with block characters; the URI names the cluster and the user.
    assert!(printed.contains('█') || printed.contains('▀'), "{printed}");
    assert!(
        printed.contains("otpauth://totp/mfa-cli:carol?"),
        "{printed}"
    );
    let secret = otp::base32_decode(&secret).unwrap();
    next_step();

    // A wrong code is refused; the code asked at the prompt (stdin after the password) works.
    let mut wrong = otp::code_at(&secret, now() + 300);
    if wrong == otp::code_at(&secret, now()) {
        wrong = "000000".into();
    }
    let out = c
        .login(home.path(), "carol", &pw, &["--otp", &wrong])
        .failed();
    assert!(out.stderr.contains("wrong one-time code"), "{}", out.stderr);
    let code = otp::code_at(&secret, now());
    let out = c.gsh(
        home.path(),
        &[
            "login",
            "--auth",
            &c.auth,
            "--user",
            "carol",
            "--password-stdin",
            "--ca-pin",
            &c.pin,
        ],
        Some(&format!("{pw}\n{code}\n")),
    );
    let out = out.ok();
    assert!(out.stdout.contains("Logged in"), "{}", out.stdout);
    // The same code again is a replay.
    let out = c
        .login(home.path(), "carol", &pw, &["--otp", &code])
        .failed();
    assert!(out.stderr.contains("already used"), "{}", out.stderr);

    let logins = c.events("user.login");
    assert!(
        logins
            .iter()
            .any(|e| e["data"]["method"] == "password+otp" && e["data"]["success"] == true),
        "{logins:?}"
    );
    assert!(!c.events("mfa.add").is_empty());
}

/// The UI project's directory and its installed packages (`scripts/provision` runs `npm ci`).
fn ui_dir() -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../web/ui");
    assert!(
        dir.join("node_modules/playwright-core").is_dir(),
        "web/ui/node_modules is missing: run scripts/provision (npm ci in web/ui)"
    );
    dir
}

#[test]
fn the_web_ui_in_a_real_browser() {
    let ui = ui_dir();
    let f = Fleet::start("webui", &[("web-node", "env=dev", vec![])]);
    let files = tempfile::tempdir().unwrap();
    let role = |name: &str, doc: &str| {
        let p = files.path().join(format!("{name}.toml"));
        std::fs::write(&p, doc).unwrap();
        f.gctl(&["create", "-f", p.to_str().unwrap()]).ok();
    };
    role(
        "mfa",
        "kind = \"role\"\n[metadata]\nname = \"mfa\"\n[spec.options]\nrequire_mfa = true\n",
    );
    role(
        "brief",
        "kind = \"role\"\n[metadata]\nname = \"brief\"\n[spec.options]\nmax_session_ttl = \"25s\"\n[spec.allow]\nlogins = [\"{{internal.logins}}\"]\nnode_labels = { \"*\" = \"*\" }\n",
    );
    let add = |name: &str, roles: &str| -> String {
        let out = f
            .gctl(&["users", "add", name, "--roles", roles, "--logins", &f.login])
            .ok();
        out.stdout.lines().last().unwrap().trim().to_string()
    };
    let alice_pw = add("alice", "access,auditor,mfa");
    let brief_pw = add("briefly", "brief,access");
    let home = tempfile::tempdir().unwrap();
    let (secret, _) = enroll(
        &[
            "--proxy",
            &f.proxy_addr,
            "--user",
            "alice",
            "--ca-pin",
            &f.pin,
        ],
        home.path(),
        &alice_pw,
    );
    // Wait for the agent's node to be listed (heartbeats agent → proxy → Auth).
    let admin_home = tempfile::tempdir().unwrap();
    f.user(
        admin_home.path(),
        "watcher",
        "access,auditor",
        &f.login,
        &[],
    );
    f.wait_for_nodes(admin_home.path(), 1);

    let shots = match std::env::var_os("GATEHOUSE_SCREENSHOTS") {
        Some(d) => PathBuf::from(d),
        None => files.path().join("shots"),
    };
    let out = Command::new("node")
        .arg("e2e/run.mjs")
        .current_dir(&ui)
        .env("GH_PROXY", &f.proxy_addr)
        .env("GH_USER", "alice")
        .env("GH_PASSWORD", &alice_pw)
        .env("GH_OTP_SECRET", &secret)
        .env("GH_BRIEF_USER", "briefly")
        .env("GH_BRIEF_PASSWORD", &brief_pw)
        .env("GH_NODE", "web-node")
        .env("GH_LOGIN", &f.login)
        .env("GH_SHOTS", &shots)
        .output()
        .expect("node (Node.js) runs the browser test");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stdout.contains("e2e: all passed"),
        "browser test failed\nstdout:\n{stdout}\nstderr:\n{stderr}\nproxy log:\n{}",
        f.proxy.log()
    );
    for page in [
        "login",
        "nodes",
        "terminal",
        "sessions",
        "join",
        "recordings",
        "player",
        "audit",
        "account",
    ] {
        assert!(
            shots.join(format!("{page}.png")).is_file(),
            "no screenshot of {page}"
        );
    }

    // The web terminal's session is an SSH session like any other: audited and recorded.
    let starts = f.events("session.start");
    let web = starts
        .iter()
        .find(|e| e["actor"] == "alice")
        .unwrap_or_else(|| panic!("no session.start by alice: {starts:?}"));
    assert_eq!(web["data"]["node"], "web-node", "{web}");
    let logins = f.events("user.login");
    assert!(
        logins.iter().any(|e| e["actor"] == "alice"
            && e["data"]["via"] == "web"
            && e["data"]["method"] == "password+otp"),
        "{logins:?}"
    );
    let recs = f.gsh(
        admin_home.path(),
        &["recordings", "ls", "--user", "alice", "--format", "json"],
        None,
    );
    let recs: Vec<serde_json::Value> = serde_json::from_str(&recs.ok().stdout).unwrap();
    assert!(
        recs.iter()
            .any(|r| r["user"] == "alice" && r["node"] == "web-node" && r["kind"] == "interactive"),
        "{recs:?}"
    );
}
