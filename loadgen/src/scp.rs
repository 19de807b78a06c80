//! The real-client rows of `loadgen ssh`: OpenSSH's own `scp` (SFTP mode, its default) copies one
//! sparse file to `/dev/null` on the far side through Gatehouse (the `gsh config` block a user
//! adds to `~/.ssh/config`: `gsh proxy ssh` as ProxyCommand), through a jump sshd (`scp -J`) and
//! straight to sshd. Each row: wall time and the server side's CPU (Proxy + agent with the
//! `sftp-server` it starts; jump + target sshd trees; the one sshd tree).

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Instant;

use anyhow::Context;
use serde::Serialize;

use crate::fleet::UserCreds;
use crate::procstat;
use crate::ssh::{SshPath, SshTarget};

#[derive(Debug, Clone, Serialize)]
pub struct ScpReport {
    pub scenario: &'static str,
    pub path: SshPath,
    /// Which round (from 0); in a median, the number of rounds.
    pub round: usize,
    pub bytes: u64,
    pub seconds: f64,
    pub gb_per_s: f64,
    pub server_cpu_s: Option<f64>,
    pub gb_per_server_cpu_s: Option<f64>,
    /// `scp` and everything it starts (`ssh`, the ProxyCommand or the jump's `ssh -W`).
    pub client_cpu_s: Option<f64>,
}

/// The file to copy and the client configurations, in a temporary directory.
pub struct ScpSetup {
    dir: tempfile::TempDir,
    file: PathBuf,
    bytes: u64,
    cluster: String,
}

impl ScpSetup {
    /// A sparse file of `bytes`; the user's key and certificate for the OpenSSH paths; and a
    /// Gatehouse profile from `gsh login` with the block `gsh config` prints.
    pub async fn new(
        user: &UserCreds,
        proxy_addr: &str,
        pin: &str,
        bytes: u64,
    ) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let file = dir.path().join("payload");
        std::fs::File::create(&file)?.set_len(bytes)?;
        let key = dir.path().join("id");
        write_private(&key, user.ssh_key.as_bytes())?;
        std::fs::write(dir.path().join("id-cert.pub"), &user.ssh_cert)?;
        // Both sshd baselines accept only aes128-gcm (openssh.rs); the jump hop reads this file
        // too (OpenSSH passes -F on to the `ssh -W` it starts for -J).
        std::fs::write(
            dir.path().join("openssh_config"),
            format!(
                "Host *\n    IdentityFile {k}\n    CertificateFile {k}-cert.pub\n    \
                 IdentitiesOnly yes\n    StrictHostKeyChecking no\n    UserKnownHostsFile /dev/null\n    \
                 BatchMode yes\n    LogLevel ERROR\n    Ciphers {c}\n",
                k = key.display(),
                c = crate::openssh::CIPHER,
            ),
        )?;

        let home = dir.path().join("gatehouse");
        let gsh = crate::fleet::sibling("gsh")?;
        let mut login = tokio::process::Command::new(&gsh)
            .env("GATEHOUSE_HOME", &home)
            .args(["login", "--proxy", proxy_addr, "--user", &user.name])
            .args(["--password-stdin", "--ca-pin", pin])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("running gsh login")?;
        if let Some(mut stdin) = login.stdin.take() {
            use tokio::io::AsyncWriteExt;
            stdin
                .write_all(format!("{}\n", user.password).as_bytes())
                .await?;
        }
        let out = login.wait_with_output().await?;
        anyhow::ensure!(
            out.status.success(),
            "gsh login: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let config = tokio::process::Command::new(&gsh)
            .env("GATEHOUSE_HOME", &home)
            .arg("config")
            .output()
            .await?;
        anyhow::ensure!(
            config.status.success(),
            "gsh config: {}",
            String::from_utf8_lossy(&config.stderr)
        );
        let mut block = String::from_utf8(config.stdout)?;
        // Nodes are named `NODE.CLUSTER` (the block's `Host *.CLUSTER`), as users write them.
        let cluster = block
            .lines()
            .find_map(|l| l.trim().strip_prefix("Host *."))
            .and_then(|l| l.split_whitespace().next())
            .context("gsh config printed no `Host *.CLUSTER` line")?
            .to_owned();
        block.push_str("    BatchMode yes\n    LogLevel ERROR\n");
        std::fs::write(dir.path().join("gsh_config"), block)?;
        Ok(ScpSetup {
            dir,
            file,
            bytes,
            cluster,
        })
    }

    /// The `scp` command for one path (the `SshTarget`s of the session measurements).
    fn command(&self, target: &SshTarget) -> anyhow::Result<std::process::Command> {
        let mut cmd = std::process::Command::new("scp");
        if std::env::var_os("LOADGEN_SCP_DEBUG").is_some() {
            cmd.arg("-v");
        } else {
            cmd.arg("-q");
        }
        cmd.arg("-F");
        let dest = match target.path {
            SshPath::Gatehouse => {
                cmd.arg(self.dir.path().join("gsh_config"));
                format!(
                    "{}@{}.{}:/dev/null",
                    target.login, target.node, self.cluster
                )
            }
            SshPath::Openssh | SshPath::Proxyjump => {
                cmd.arg(self.dir.path().join("openssh_config"));
                let addr: std::net::SocketAddr = target.addr.parse()?;
                if let Some(jump) = &target.jump {
                    cmd.arg("-J").arg(format!("{}@{jump}", target.login));
                }
                cmd.args(["-P", &addr.port().to_string()]);
                format!("{}@{}:/dev/null", target.login, addr.ip())
            }
        };
        cmd.arg(&self.file).arg(dest);
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        Ok(cmd)
    }

    /// Copy the file once on `target`'s path; `server_pids` as in `ssh::run`.
    pub async fn run(&self, target: &SshTarget, server_pids: &[u32]) -> anyhow::Result<ScpReport> {
        let server_cpu = || -> Option<f64> {
            server_pids
                .iter()
                .map(|p| procstat::tree_cpu_seconds(*p))
                .sum()
        };
        let mut cmd = self.command(target)?;
        let _bar = crate::progress::spinner(&format!("scp {:?}", target.path));
        let cpu0 = server_cpu();
        let started = Instant::now();
        let (out, client_cpu) = tokio::task::spawn_blocking(move || run_measured(&mut cmd))
            .await
            .context("scp's waiter")??;
        let seconds = started.elapsed().as_secs_f64();
        let cpu = match (cpu0, server_cpu()) {
            (Some(a), Some(b)) => Some(b - a),
            _ => None,
        };
        anyhow::ensure!(
            out.status.success(),
            "scp on the {:?} path failed: {}",
            target.path,
            String::from_utf8_lossy(&out.stderr).trim()
        );
        let gb = self.bytes as f64 / 1e9;
        Ok(ScpReport {
            scenario: "scp",
            path: target.path,
            round: 0,
            bytes: self.bytes,
            seconds,
            gb_per_s: gb / seconds,
            server_cpu_s: cpu,
            gb_per_server_cpu_s: cpu.filter(|c| *c > 0.0).map(|c| gb / c),
            client_cpu_s: client_cpu,
        })
    }
}

/// Run `cmd` to its end; its output and the CPU it and its reaped descendants used.
fn run_measured(
    cmd: &mut std::process::Command,
) -> anyhow::Result<(std::process::Output, Option<f64>)> {
    use nix::sys::resource::{UsageWho, getrusage};
    let cpu = || {
        getrusage(UsageWho::RUSAGE_CHILDREN).ok().map(|u| {
            let t = |tv: nix::sys::time::TimeVal| tv.tv_sec() as f64 + tv.tv_usec() as f64 / 1e6;
            t(u.user_time()) + t(u.system_time())
        })
    };
    let before = cpu();
    let out = cmd
        .output()
        .context("running scp (install openssh-client)")?;
    let client = match (before, cpu()) {
        (Some(a), Some(b)) => Some(b - a),
        _ => None,
    };
    Ok((out, client))
}

fn write_private(path: &Path, data: &[u8]) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(data)?;
    Ok(())
}

pub fn print(r: &ScpReport) {
    println!(
        "scp {:<9} {:.0} MiB in {:.2} s: {:.3} GB/s{}{}",
        format!("{:?}", r.path).to_lowercase(),
        r.bytes as f64 / (1 << 20) as f64,
        r.seconds,
        r.gb_per_s,
        r.gb_per_server_cpu_s
            .map(|g| format!(" ({g:.2} GB per server CPU-second)"))
            .unwrap_or_default(),
        r.client_cpu_s
            .map(|c| format!("  client CPU {c:.2} s"))
            .unwrap_or_default(),
    );
}
