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

    /// A connection to Auth as its admin (the identity in `data/admin`).
    pub async fn admin_client(&self) -> anyhow::Result<gatehouse_controlplane::client::Client> {
        let read = |n: &str| std::fs::read_to_string(self.data.join("admin").join(n));
        gatehouse_controlplane::client::AuthEndpoint {
            addr: self.auth.clone(),
            trust: gatehouse_controlplane::tls::Trust::CaPem(read("ca.pem")?),
            identity: Some((read("tls.crt")?, read("tls.key")?)),
        }
        .connect()
        .await
        .map_err(|e| anyhow::anyhow!("{}", gatehouse_controlplane::client::error_chain(&e)))
    }

    /// Start counting CPU seconds: Auth's and this generator's.
    pub fn cpu_clock(&self) -> CpuClock {
        CpuClock {
            pid: self.pid(),
            auth: crate::procstat::cpu_seconds(self.pid()),
            generator: crate::procstat::self_cpu_seconds(),
        }
    }
}

/// CPU seconds at a start, to take the difference from.
pub struct CpuClock {
    pid: u32,
    auth: Option<f64>,
    generator: Option<f64>,
}

impl CpuClock {
    /// CPU seconds used since the start: (Auth, generator), where readable.
    pub fn used(&self) -> (Option<f64>, Option<f64>) {
        let auth = self
            .auth
            .and_then(|a| crate::procstat::cpu_seconds(self.pid).map(|b| b - a));
        let generator = self
            .generator
            .zip(crate::procstat::self_cpu_seconds())
            .map(|(a, b)| b - a);
        (auth, generator)
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
