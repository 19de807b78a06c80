//! `--spawn`: start a throwaway cluster from the `gatehouse` and `gctl` binaries that sit next
//! to this one, with a user to log in as. Killed on drop.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, bail};

#[derive(Debug)]
pub struct SpawnedCluster {
    child: Child,
    _dir: tempfile::TempDir,
    pub auth: String,
    pub pin: String,
    pub user: String,
    pub password: String,
}

impl SpawnedCluster {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for SpawnedCluster {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
        std::thread::sleep(Duration::from_millis(200));
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn sibling(name: &str) -> anyhow::Result<PathBuf> {
    let me = std::env::current_exe()?;
    let path = me.with_file_name(name);
    if !path.exists() {
        bail!(
            "--spawn needs `{name}` next to loadgen ({}); build with `cargo build --release --bins`",
            path.display()
        );
    }
    Ok(path)
}

pub fn start(addr_ip: &str) -> anyhow::Result<SpawnedCluster> {
    let dir = tempfile::tempdir()?;
    let data = dir.path().join("data");
    let mut child = Command::new(sibling("gatehouse")?)
        .args([
            "start",
            "--cluster-name",
            "loadgen",
            "--auth-addr",
            &format!("{addr_ip}:0"),
            "--diag-addr",
            &format!("{addr_ip}:0"),
            "--log-level",
            "warn",
            "--data-dir",
        ])
        .arg(&data)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .context("starting gatehouse")?;
    let stdout = child.stdout.take().context("no stdout")?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut auth = None;
        let mut pin = None;
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let line = line.trim().to_string();
            if let Some(v) = line.strip_prefix("Auth API:") {
                auth = Some(v.trim().to_string());
            }
            if let Some(v) = line.strip_prefix("CA pin:") {
                pin = Some(v.trim().to_string());
            }
            if let (Some(a), Some(p)) = (&auth, &pin) {
                let _ = tx.send((a.clone(), p.clone()));
                auth = None;
            }
        }
    });
    let (auth, pin) = rx
        .recv_timeout(Duration::from_secs(60))
        .context("gatehouse did not start within 60 s")?;
    let user = "loadgen".to_string();
    let out = Command::new(sibling("gctl")?)
        .arg("--data-dir")
        .arg(&data)
        .args([
            "users", "add", &user, "--roles", "access", "--logins", "loadgen",
        ])
        .output()
        .context("running gctl")?;
    if !out.status.success() {
        bail!(
            "gctl users add failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let password = String::from_utf8_lossy(&out.stdout)
        .lines()
        .last()
        .unwrap_or_default()
        .trim()
        .to_string();
    Ok(SpawnedCluster {
        child,
        _dir: dir,
        auth,
        pin,
        user,
        password,
    })
}
