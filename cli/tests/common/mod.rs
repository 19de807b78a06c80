//! Test harness: real `gatehouse`, `gctl` and `gsh` processes on loopback with ephemeral ports,
//! every command bounded in time, every process killed on drop.
// Test code: a failing unwrap or panic is a failing test, which is the point.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

mod fleet;
pub mod sshd;
#[allow(unused_imports)] // not every test binary uses the fleet
pub use fleet::*;

pub const CMD_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Debug)]
pub struct Output {
    pub status: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Output {
    pub fn ok(self) -> Self {
        assert_eq!(
            self.status, 0,
            "command failed\nstdout:\n{}\nstderr:\n{}",
            self.stdout, self.stderr
        );
        self
    }
    pub fn failed(self) -> Self {
        assert_ne!(
            self.status, 0,
            "command unexpectedly succeeded\nstdout:\n{}",
            self.stdout
        );
        self
    }
}

/// Run a command with optional stdin, killing it after `CMD_TIMEOUT`.
pub fn run(mut cmd: Command, stdin: Option<&str>) -> Output {
    cmd.stdin(if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("spawning {cmd:?}: {e}"));
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let t_out = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let t_err = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    // Written while the output is read: a command that echoes its input (`cat`) blocks on a
    // full stdout pipe until someone reads it.
    let t_in = stdin.map(|input| {
        let mut s = child.stdin.take().unwrap();
        let input = input.to_owned();
        std::thread::spawn(move || {
            // A command that fails before reading its input (e.g. a refused login) closes the
            // pipe first: its exit status and output say what happened, not this write.
            if let Err(e) = s.write_all(input.as_bytes()) {
                assert_eq!(
                    e.kind(),
                    std::io::ErrorKind::BrokenPipe,
                    "writing stdin: {e}"
                );
            }
        })
    });
    let deadline = Instant::now() + CMD_TIMEOUT;
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("command timed out: {cmd:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    if let Some(t) = t_in {
        t.join().unwrap();
    }
    Output {
        status: status.code().unwrap_or(-1),
        stdout: t_out.join().unwrap(),
        stderr: t_err.join().unwrap(),
    }
}

pub fn bin(name: &str) -> PathBuf {
    match name {
        "gatehouse" => PathBuf::from(env!("CARGO_BIN_EXE_gatehouse")),
        "gctl" => PathBuf::from(env!("CARGO_BIN_EXE_gctl")),
        "gsh" => PathBuf::from(env!("CARGO_BIN_EXE_gsh")),
        "gbot" => PathBuf::from(env!("CARGO_BIN_EXE_gbot")),
        other => panic!("unknown binary {other}"),
    }
}

/// A running single-process cluster (Auth role) in a temp dir.
pub struct Cluster {
    pub dir: tempfile::TempDir,
    pub child: Child,
    pub auth: String,
    pub diag: String,
    pub pin: String,
    pub cluster_name: String,
    pub stdout: String,
}

impl Cluster {
    pub fn start(name: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        Self::start_in(dir, name)
    }

    pub fn start_in(dir: tempfile::TempDir, name: &str) -> Self {
        Self::start_in_with(dir, name, &[])
    }

    /// `start_in` with more `gatehouse start` arguments (e.g. `--config FILE`).
    pub fn start_in_with(dir: tempfile::TempDir, name: &str, extra: &[&str]) -> Self {
        let mut child = Command::new(bin("gatehouse"))
            .arg("start")
            .args(extra)
            .args([
                "--roles",
                "auth",
                "--auth-addr",
                "127.0.0.1:0",
                "--diag-addr",
                "127.0.0.1:0",
                "--cluster-name",
                name,
                "--data-dir",
            ])
            .arg(dir.path().join("data"))
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn gatehouse");
        let stdout = child.stdout.take().unwrap();
        let stderr = child.stderr.take().unwrap();
        let log_path = dir.path().join("daemon.log");
        std::thread::spawn(move || {
            let mut log = std::fs::File::create(log_path).unwrap();
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let _ = writeln!(log, "{line}");
            }
        });
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut all = String::new();
            let mut sent = false;
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                all.push_str(&line);
                all.push('\n');
                if !sent && line.starts_with("  gsh login") {
                    let _ = tx.send(all.clone());
                    sent = true;
                }
            }
        });
        let stdout = match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(s) => s,
            Err(_) => {
                let _ = child.kill();
                let log =
                    std::fs::read_to_string(dir.path().join("daemon.log")).unwrap_or_default();
                panic!("gatehouse did not start in time; log:\n{log}");
            }
        };
        let field = |label: &str| {
            stdout
                .lines()
                .find_map(|l| l.trim().strip_prefix(label).map(|v| v.trim().to_string()))
                .unwrap_or_else(|| panic!("no {label} in:\n{stdout}"))
        };
        let auth = field("Auth API:");
        let pin = field("CA pin:");
        let diag = field("Diagnostics:")
            .trim_start_matches("http://")
            .trim_end_matches("/metrics")
            .to_string();
        Cluster {
            dir,
            child,
            auth,
            diag,
            pin,
            cluster_name: name.into(),
            stdout,
        }
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    pub fn gctl(&self, args: &[&str]) -> Output {
        let mut cmd = Command::new(bin("gctl"));
        cmd.arg("--data-dir")
            .arg(self.data_dir())
            .args(args)
            .env_remove("GATEHOUSE_AUTH");
        run(cmd, None)
    }

    /// `gsh` with its profile in `home`.
    pub fn gsh(&self, home: &Path, args: &[&str], stdin: Option<&str>) -> Output {
        let mut cmd = Command::new(bin("gsh"));
        cmd.args(args)
            .env("GATEHOUSE_HOME", home)
            .env_remove("GATEHOUSE_AUTH")
            .env_remove("GATEHOUSE_CA_PIN");
        run(cmd, stdin)
    }

    /// Add a user and return the generated password.
    pub fn add_user(&self, name: &str, roles: &str, logins: &str) -> String {
        let out = self
            .gctl(&["users", "add", name, "--roles", roles, "--logins", logins])
            .ok();
        out.stdout.lines().last().unwrap().trim().to_string()
    }

    pub fn login(&self, home: &Path, user: &str, password: &str, extra: &[&str]) -> Output {
        let mut args = vec![
            "login",
            "--auth",
            &self.auth,
            "--user",
            user,
            "--password-stdin",
            "--ca-pin",
            &self.pin,
        ];
        args.extend_from_slice(extra);
        self.gsh(home, &args, Some(&format!("{password}\n")))
    }

    pub fn events(&self, event_type: &str) -> Vec<serde_json::Value> {
        let out = self
            .gctl(&["events", "--type", event_type, "--format", "json"])
            .ok();
        out.stdout
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    pub fn stop(mut self) -> tempfile::TempDir {
        kill(&mut self.child);
        std::mem::replace(&mut self.dir, tempfile::tempdir().unwrap())
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("daemon.log")).unwrap_or_default()
    }
}

pub fn kill(child: &mut Child) {
    #[cfg(unix)]
    {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(child.id().to_string())
            .status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    let _ = child.kill();
    let _ = child.wait();
}

impl Drop for Cluster {
    fn drop(&mut self) {
        kill(&mut self.child);
    }
}

/// A plain HTTP/1.1 GET on loopback; returns (status code, body).
pub fn http_get(addr: &str, path: &str) -> (u16, String) {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    let code = resp
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = resp
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (code, body)
}

/// Unix mode bits of a file.
pub fn mode(path: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

/// A daemon process with its banner parsed, killed on drop.
pub struct Daemon {
    pub child: Child,
    pub banner: String,
    pub log_path: PathBuf,
    args: Vec<String>,
    env: Vec<(String, String)>,
}

impl Daemon {
    /// Start `gatehouse start ARGS` and wait for its banner (the line `  Diagnostics:`).
    pub fn start(args: &[String], log_path: PathBuf) -> Self {
        Self::start_env(args, &[], log_path)
    }

    /// [`Daemon::start`] with extra environment variables.
    pub fn start_env(args: &[String], env: &[(String, String)], log_path: PathBuf) -> Self {
        let mut child = Command::new(bin("gatehouse"))
            .arg("start")
            .args(args)
            .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .env("RUST_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn gatehouse");
        let stdout = child.stdout.take().unwrap();
        let stderr = child.stderr.take().unwrap();
        let lp = log_path.clone();
        std::thread::spawn(move || {
            let mut log = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(lp)
                .unwrap();
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let _ = writeln!(log, "{line}");
            }
        });
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut all = String::new();
            let mut sent = false;
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                all.push_str(&line);
                all.push('\n');
                if !sent && line.starts_with("  Data dir:") {
                    let _ = tx.send(all.clone());
                    sent = true;
                }
            }
        });
        match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(banner) => Daemon {
                child,
                banner,
                log_path,
                args: args.to_vec(),
                env: env.to_vec(),
            },
            Err(_) => {
                let _ = child.kill();
                panic!(
                    "gatehouse {args:?} did not start; log:\n{}",
                    std::fs::read_to_string(&log_path).unwrap_or_default()
                );
            }
        }
    }

    pub fn field(&self, label: &str) -> String {
        self.banner
            .lines()
            .find_map(|l| l.trim().strip_prefix(label).map(|v| v.trim().to_string()))
            .unwrap_or_else(|| panic!("no {label} in:\n{}", self.banner))
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// Start it again (after it was stopped or killed) with the same arguments, its proxy on the
    /// port it had.
    pub fn restart(&mut self) {
        let mut args = self.args.clone();
        if self.banner.contains("Proxy:") {
            let addr = self.field("Proxy:");
            if let Some(i) = args.iter().position(|a| a == "--proxy-addr") {
                args[i + 1] = addr;
            }
        }
        kill(&mut self.child);
        *self = Daemon::start_env(&args, &self.env, self.log_path.clone());
    }

    pub fn kill_hard(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn stop(&mut self) {
        kill(&mut self.child);
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        kill(&mut self.child);
    }
}

/// The real OpenSSH client with a config file.
pub fn openssh(
    config: &Path,
    extra: &[&str],
    dest: &str,
    command: &[&str],
    stdin: Option<&str>,
) -> Output {
    let mut cmd = Command::new("ssh");
    cmd.arg("-F")
        .arg(config)
        .args(["-o", "BatchMode=yes", "-o", "ConnectTimeout=10"])
        .args(extra)
        .arg(dest)
        .args(command);
    run(cmd, stdin)
}

/// When the certificate in `path` (PEM) expires: the identity's end, which is its `notAfter`.
pub fn cert_expiry(path: &std::path::Path) -> std::time::SystemTime {
    let pem = std::fs::read_to_string(path).unwrap();
    let certs = gatehouse_controlplane::tls::certs_from_pem(&pem).unwrap();
    let id = gatehouse_controlplane::identity::Identity::from_cert_der(certs[0].as_ref()).unwrap();
    std::time::UNIX_EPOCH + Duration::from_secs(u64::try_from(id.expires).unwrap())
}

/// Sleep until a second past `t` on the wall clock (whole seconds are what expiry compares).
pub fn sleep_past(t: std::time::SystemTime) {
    let until = t + Duration::from_secs(1);
    while let Ok(left) = until.duration_since(std::time::SystemTime::now()) {
        std::thread::sleep(left);
    }
}

/// An echo server on 127.0.0.9: each connection gets its bytes back.
pub fn echo_server() -> std::net::SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.9:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            std::thread::spawn(move || {
                let mut w = conn.try_clone().unwrap();
                let _ = std::io::copy(&mut conn, &mut w);
                let _ = w.shutdown(std::net::Shutdown::Write);
            });
        }
    });
    addr
}
