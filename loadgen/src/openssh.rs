//! A real OpenSSH `sshd` on loopback, started and stopped by the generator: the jump-host
//! baseline for `throughput` (`ssh -W` per stream, aes128-gcm) and the direct baseline for the
//! `ssh` scenario (the same client, certificate auth against the cluster's user CA).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

const SSHD: &str = "/usr/sbin/sshd";
/// The cipher the comparison uses: AES-GCM, like the Proxy's TLS suites (AES-NI on this machine).
pub const CIPHER: &str = "aes128-gcm@openssh.com";

/// A running sshd (killed on drop) and a client key it accepts for the current user.
pub struct Sshd {
    child: std::process::Child,
    dir: tempfile::TempDir,
    pub addr: SocketAddr,
    pub login: String,
}

/// The name of the account the generator runs as (the login both sshd and the agent accept).
pub fn current_login() -> anyhow::Result<String> {
    let uid = nix::unistd::geteuid();
    nix::unistd::User::from_uid(uid)?
        .map(|u| u.name)
        .with_context(|| format!("uid {uid} has no entry in the user database"))
}

fn keygen(path: &Path) -> anyhow::Result<()> {
    let status = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-f"])
        .arg(path)
        .stdout(Stdio::null())
        .status()
        .context("running ssh-keygen (install openssh-client)")?;
    anyhow::ensure!(status.success(), "ssh-keygen failed");
    Ok(())
}

impl Sshd {
    /// Whether this machine has an sshd to compare against.
    pub fn available() -> bool {
        Path::new(SSHD).exists()
    }

    /// Start sshd on `ip` (an ephemeral port). It accepts the generated client key and, with
    /// `user_ca`, certificates signed by that CA (OpenSSH public key line).
    pub fn start(ip: &str, user_ca: Option<&str>) -> anyhow::Result<Self> {
        if !Self::available() {
            bail!("{SSHD} is not installed (apt-get install openssh-server)");
        }
        // sshd refuses to start without its privilege separation directory.
        let _ = std::fs::create_dir_all("/run/sshd");
        let dir = tempfile::tempdir()?;
        let login = current_login()?;
        let host_key = dir.path().join("host_key");
        keygen(&host_key)?;
        keygen(&dir.path().join("client_key"))?;
        std::fs::copy(
            dir.path().join("client_key.pub"),
            dir.path().join("authorized_keys"),
        )?;
        let ca_line = match user_ca {
            Some(ca) => {
                std::fs::write(dir.path().join("user_ca.pub"), ca)?;
                format!("TrustedUserCAKeys {}/user_ca.pub\n", dir.path().display())
            }
            None => String::new(),
        };
        // The node's own sftp-server, as a stock sshd and the Gatehouse agent run it.
        let sftp = [
            "/usr/lib/openssh/sftp-server",
            "/usr/libexec/openssh/sftp-server",
        ]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .unwrap_or("internal-sftp");
        let mut last_err = String::new();
        for _ in 0..5 {
            let port = std::net::TcpListener::bind((ip, 0))?.local_addr()?.port();
            let config = format!(
                "Port {port}\nListenAddress {ip}\nHostKey {hk}\nPidFile none\n{ca_line}\
                 AuthorizedKeysFile {d}/authorized_keys\nPasswordAuthentication no\n\
                 KbdInteractiveAuthentication no\nPubkeyAuthentication yes\nPermitRootLogin yes\n\
                 UsePAM no\nStrictModes no\nAllowTcpForwarding yes\nCiphers {CIPHER}\n\
                 MaxStartups 1000:30:2000\nMaxSessions 1000\nLogLevel ERROR\nSubsystem sftp {sftp}\n",
                hk = host_key.display(),
                d = dir.path().display()
            );
            std::fs::write(dir.path().join("sshd_config"), config)?;
            let log = std::fs::File::create(dir.path().join("sshd.log"))?;
            let child = Command::new(SSHD)
                .arg("-D")
                .arg("-e")
                .arg("-f")
                .arg(dir.path().join("sshd_config"))
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .context("starting sshd")?;
            let mut child = child;
            let addr: SocketAddr = format!("{ip}:{port}").parse()?;
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if std::net::TcpStream::connect(addr).is_ok() {
                    return Ok(Sshd {
                        child,
                        dir,
                        addr,
                        login,
                    });
                }
                if let Ok(Some(_)) = child.try_wait() {
                    break; // the port was taken meanwhile: try another
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
            last_err = std::fs::read_to_string(dir.path().join("sshd.log")).unwrap_or_default();
        }
        bail!("sshd did not start; its log:\n{last_err}")
    }

    /// The listener's PID; per-connection sshd processes are its children.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    fn client_key(&self) -> PathBuf {
        self.dir.path().join("client_key")
    }

    /// `ssh -W dest` through this sshd: the child's stdin/stdout carry the forwarded stream.
    pub fn jump_command(&self, dest: &str) -> tokio::process::Command {
        let mut cmd = tokio::process::Command::new("ssh");
        cmd.args([
            "-F",
            "/dev/null",
            "-o",
            "BatchMode=yes",
            "-o",
            "StrictHostKeyChecking=no",
            "-o",
            "UserKnownHostsFile=/dev/null",
            "-o",
            "IdentitiesOnly=yes",
            "-o",
            "LogLevel=ERROR",
            "-c",
            CIPHER,
            "-i",
        ])
        .arg(self.client_key())
        .args(["-p", &self.addr.port().to_string(), "-W", dest])
        .arg(format!("{}@{}", self.login, self.addr.ip()))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true);
        cmd
    }
}

impl Drop for Sshd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
