//! `logins --spawn`: a throwaway Auth (from the `gatehouse` and `gctl` binaries next to this
//! one) with a user to log in as. Killed on drop.

use crate::fleet::{Proc, gctl, start_daemon};

#[derive(Debug)]
pub struct SpawnedCluster {
    proc: Proc,
    _dir: tempfile::TempDir,
    /// The Auth data dir (its admin identity is in `admin/`).
    pub data: std::path::PathBuf,
    pub auth: String,
    pub pin: String,
    pub user: String,
    pub password: String,
}

impl SpawnedCluster {
    pub fn pid(&self) -> u32 {
        self.proc.pid()
    }
}

pub fn start(addr_ip: &str) -> anyhow::Result<SpawnedCluster> {
    start_with(addr_ip, &[])
}

/// `start` with more `gatehouse start` arguments (e.g. `--config FILE`).
pub fn start_with(addr_ip: &str, extra: &[&str]) -> anyhow::Result<SpawnedCluster> {
    let dir = tempfile::tempdir()?;
    let data = dir.path().join("data");
    let mut args: Vec<&str> = extra.to_vec();
    let auth_addr = format!("{addr_ip}:0");
    let data_arg = data.display().to_string();
    args.extend_from_slice(&[
        "--roles",
        "auth",
        "--cluster-name",
        "loadgen",
        "--auth-addr",
        &auth_addr,
        "--diag-addr",
        &auth_addr,
        "--data-dir",
        &data_arg,
    ]);
    let proc = start_daemon(&args, &dir.path().join("auth.log"))?;
    let auth = proc.field("Auth API:")?;
    let pin = proc.field("CA pin:")?;
    let user = "loadgen".to_string();
    let out = gctl(
        &data,
        &[
            "users", "add", &user, "--roles", "access", "--logins", "loadgen",
        ],
    )?;
    let password = out.lines().last().unwrap_or_default().trim().to_string();
    Ok(SpawnedCluster {
        proc,
        data,
        _dir: dir,
        auth,
        pin,
        user,
        password,
    })
}
