//! `--spawn` for the data-plane scenarios: Auth and a Proxy as separate processes (so the
//! Proxy's CPU and memory are its own, read from /proc), joined with real tokens, plus a user
//! logged in and a set of joined agent identities for simulated agents.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, bail};
use gatehouse_controlplane::client::{AuthEndpoint, error_chain};
use gatehouse_controlplane::host::HostIdentity;
use gatehouse_controlplane::proto;
use gatehouse_controlplane::tls::Trust;

pub fn sibling(name: &str) -> anyhow::Result<PathBuf> {
    let path = std::env::current_exe()?.with_file_name(name);
    if !path.exists() {
        bail!(
            "--spawn needs `{name}` next to loadgen ({}); build with `cargo build --release --bins`",
            path.display()
        );
    }
    Ok(path)
}

/// A child process killed on drop.
#[derive(Debug)]
pub struct Proc {
    child: Child,
    pub banner: String,
}

impl Proc {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
    pub fn field(&self, label: &str) -> anyhow::Result<String> {
        self.banner
            .lines()
            .find_map(|l| l.trim().strip_prefix(label).map(|v| v.trim().to_string()))
            .with_context(|| format!("no `{label}` in the daemon's banner:\n{}", self.banner))
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
        std::thread::sleep(Duration::from_millis(100));
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn start_daemon(args: &[&str], log: &Path) -> anyhow::Result<Proc> {
    let log_file = std::fs::File::create(log)?;
    let mut child = Command::new(sibling("gatehouse")?)
        .arg("start")
        .args(args)
        .args(["--log-level", "warn"])
        .stdout(Stdio::piped())
        .stderr(log_file)
        .spawn()
        .context("starting gatehouse")?;
    let stdout = child.stdout.take().context("no stdout")?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut all = String::new();
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            all.push_str(&line);
            all.push('\n');
            if line.starts_with("  Data dir:") {
                let _ = tx.send(all.clone());
            }
        }
    });
    match rx.recv_timeout(Duration::from_secs(60)) {
        Ok(banner) => Ok(Proc { child, banner }),
        Err(_) => {
            let _ = child.kill();
            bail!(
                "gatehouse {args:?} did not start within 60 s; see {}",
                log.display()
            )
        }
    }
}

pub fn gctl(data: &Path, args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new(sibling("gctl")?)
        .arg("--data-dir")
        .arg(data)
        .args(args)
        .output()?;
    if !out.status.success() {
        bail!("gctl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

pub(crate) fn new_token(data: &Path, ty: &str) -> anyhow::Result<String> {
    let out = gctl(
        data,
        &["tokens", "add", "--type", ty, "--uses", "0", "--ttl", "2h"],
    )?;
    out.split("Join token (shown once): ")
        .nth(1)
        .and_then(|r| r.lines().next())
        .map(|t| t.trim().to_string())
        .context("gctl printed no token")
}

/// A user's credentials for the Proxy's session ALPNs.
#[derive(Clone)]
pub struct UserCreds {
    pub cert: String,
    pub key: String,
    pub ca: String,
    /// OpenSSH private key and its certificate, and the cluster's user CA (public key lines).
    pub ssh_key: String,
    pub ssh_cert: String,
    pub ssh_user_ca: Vec<String>,
    /// The user's name and password (for `gsh login` in the real-client measurements).
    pub name: String,
    pub password: String,
}

/// Names only: keys and the password stay out of debug output.
impl std::fmt::Debug for UserCreds {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UserCreds")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

#[derive(Debug)]
pub struct Fleet {
    _dir: tempfile::TempDir,
    /// Kept alive for the run (killed on drop).
    pub _auth: Proc,
    pub proxy: Proc,
    pub proxy_addr: String,
    /// The I/O backend the proxy runs on (`io_uring` or `epoll`), from its banner.
    pub io_backend: String,
    pub pin: String,
    pub node_token: String,
    pub user: UserCreds,
}

impl Fleet {
    pub async fn spawn(proxy_ip: &str, workers: usize) -> anyhow::Result<Self> {
        Self::spawn_with(proxy_ip, workers, &[]).await
    }

    /// `proxy_args`: more `gatehouse start` options for the proxy, e.g.
    /// `["--proxy-io-backend", "epoll"]` (without one, its default, or
    /// GATEHOUSE_PROXY_IO_BACKEND from the environment).
    pub async fn spawn_with(
        proxy_ip: &str,
        workers: usize,
        proxy_args: &[&str],
    ) -> anyhow::Result<Self> {
        Self::spawn_full(proxy_ip, workers, proxy_args, None).await
    }

    /// [`Fleet::spawn_with`], Auth with a TOML config (e.g. `[auth.recording]`).
    pub async fn spawn_full(
        proxy_ip: &str,
        workers: usize,
        proxy_args: &[&str],
        auth_config: Option<&str>,
    ) -> anyhow::Result<Self> {
        Self::spawn_named(proxy_ip, workers, proxy_args, auth_config, "bench").await
    }

    /// [`Fleet::spawn_full`] for a cluster named `cluster`.
    pub async fn spawn_named(
        proxy_ip: &str,
        workers: usize,
        proxy_args: &[&str],
        auth_config: Option<&str>,
        cluster: &str,
    ) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let auth_data = dir.path().join("auth");
        let config_path = dir.path().join("auth.toml");
        std::fs::write(&config_path, auth_config.unwrap_or(""))?;
        let config_arg = config_path.display().to_string();
        let auth = start_daemon(
            &[
                "--config",
                &config_arg,
                "--roles",
                "auth",
                "--cluster-name",
                cluster,
                "--auth-addr",
                "127.0.0.1:0",
                "--diag-addr",
                "127.0.0.1:0",
                "--data-dir",
                &auth_data.display().to_string(),
            ],
            &dir.path().join("auth.log"),
        )?;
        let auth_addr = auth.field("Auth API:")?;
        let pin = auth.field("CA pin:")?;
        let proxy_token = new_token(&auth_data, "proxy")?;
        let node_token = new_token(&auth_data, "node")?;
        let workers = workers.to_string();
        let proxy_addr_arg = format!("{proxy_ip}:0");
        let data_dir = dir.path().join("proxy").display().to_string();
        let mut args = vec![
            "--roles",
            "proxy",
            "--auth",
            &auth_addr,
            "--token",
            &proxy_token,
            "--ca-pin",
            &pin,
            "--proxy-addr",
            &proxy_addr_arg,
            "--proxy-workers",
            &workers,
            "--diag-addr",
            &proxy_addr_arg,
            "--node-name",
            "bench-proxy",
            "--data-dir",
            &data_dir,
            // The generator opens sessions from one address as fast as it can: measure the
            // proxy, not its per-address throttle.
            "--proxy-ssh-session-rate",
            "0",
        ];
        args.extend_from_slice(proxy_args);
        let proxy = start_daemon(&args, &dir.path().join("proxy.log"))?;
        let io_backend = proxy.field("Proxy I/O:")?;
        let proxy_addr = proxy.field("Proxy:")?;
        let user = add_user(&auth_data, &proxy_addr, &pin, "bench", "bench").await?;
        Ok(Self {
            _dir: dir,
            _auth: auth,
            proxy,
            proxy_addr,
            io_backend,
            pin,
            node_token,
            user,
        })
    }

    pub fn dir(&self) -> &Path {
        self._dir.path()
    }

    /// The Auth admin's connection (the identity in the Auth data dir's `admin/`).
    pub async fn admin_client(&self) -> anyhow::Result<gatehouse_controlplane::client::Client> {
        let admin = self.dir().join("auth").join("admin");
        let read = |n: &str| std::fs::read_to_string(admin.join(n));
        AuthEndpoint {
            addr: self._auth.field("Auth API:")?,
            trust: Trust::CaPem(read("ca.pem")?),
            identity: Some((read("tls.crt")?, read("tls.key")?)),
        }
        .connect()
        .await
        .map_err(|e| anyhow::anyhow!("{}", error_chain(&e)))
    }

    /// A user with the `access` role and these logins, logged in through the Proxy.
    pub async fn user(&self, name: &str, logins: &str) -> anyhow::Result<UserCreds> {
        add_user(
            &self.dir().join("auth"),
            &self.proxy_addr,
            &self.pin,
            name,
            logins,
        )
        .await
    }

    /// Start a real agent process (`gatehouse start --roles agent`) joined through the Proxy.
    pub fn start_agent(&self, name: &str, ip: &str) -> anyhow::Result<Proc> {
        start_daemon(
            &[
                "--roles",
                "agent",
                "--proxy",
                &self.proxy_addr,
                "--token",
                &self.node_token,
                "--ca-pin",
                &self.pin,
                "--node-name",
                name,
                "--diag-addr",
                &format!("{ip}:0"),
                "--data-dir",
                &self.dir().join(name).display().to_string(),
            ],
            &self.dir().join(format!("{name}.log")),
        )
    }

    /// Join `n` agent identities (real host certificates) through the Proxy.
    pub async fn join_agents(&self, n: usize) -> anyhow::Result<Vec<HostIdentity>> {
        let mut out = Vec::with_capacity(n);
        for i in 0..n {
            let id = HostIdentity::join(
                &self.proxy_addr,
                &self.pin,
                &self.node_token,
                &format!("sim-{i}"),
                &[],
            )
            .await
            .map_err(|e| anyhow::anyhow!("joining simulated agent {i}: {e}"))?;
            out.push(id);
        }
        Ok(out)
    }
}

async fn add_user(
    auth_data: &Path,
    proxy: &str,
    pin: &str,
    name: &str,
    logins: &str,
) -> anyhow::Result<UserCreds> {
    let out = gctl(
        auth_data,
        &[
            "users", "add", name, "--roles", "access", "--logins", logins,
        ],
    )?;
    let password = out.lines().last().unwrap_or_default().trim().to_string();
    login(proxy, pin, name, &password).await
}

pub async fn login(
    proxy: &str,
    pin: &str,
    user: &str,
    password: &str,
) -> anyhow::Result<UserCreds> {
    let ssh =
        ssh_key::PrivateKey::random(&mut ssh_key::rand_core::OsRng, ssh_key::Algorithm::Ed25519)?;
    let tls = gatehouse_controlplane::ca::generate_leaf_key()?;
    let endpoint = AuthEndpoint {
        addr: proxy.to_owned(),
        trust: Trust::Pin(pin.to_owned()),
        identity: None,
    };
    let mut client = endpoint
        .connect()
        .await
        .map_err(|e| anyhow::anyhow!("{}", error_chain(&e)))?;
    let resp = client
        .login(proto::LoginRequest {
            user: user.into(),
            password: password.into(),
            ssh_public_key: ssh.public_key().to_openssh()?,
            tls_public_key: rcgen::PublicKeyData::subject_public_key_info(&tls),
            ttl_seconds: 0,
            ..Default::default()
        })
        .await?
        .into_inner();
    let creds = resp.credentials.context("no credentials")?;
    Ok(UserCreds {
        cert: creds.tls_cert,
        key: tls.serialize_pem(),
        ca: creds.tls_ca,
        ssh_key: ssh.to_openssh(ssh_key::LineEnding::LF)?.to_string(),
        ssh_cert: creds.ssh_cert,
        ssh_user_ca: creds.ssh_user_ca,
        name: user.to_owned(),
        password: password.to_owned(),
    })
}

/// Keys for identities kept in files by worker processes.
/// A `loadgen worker-agents` process holding `count` simulated agents' tunnels to `proxy` from
/// `source_ip`, with the identities saved at `ids` (and `extra` options); its status lines on
/// its piped stdout.
pub fn spawn_worker_agents(
    ids: &Path,
    count: usize,
    proxy: &str,
    source_ip: &str,
    extra: &[&str],
) -> anyhow::Result<Child> {
    Command::new(std::env::current_exe()?)
        .args(["worker-agents", "--identities"])
        .arg(ids)
        .args([
            "--count",
            &count.to_string(),
            "--proxy",
            proxy,
            "--source-ip",
            source_ip,
        ])
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .context("starting a generator worker")
}

pub fn save_identities(ids: &[HostIdentity], path: &Path) -> anyhow::Result<()> {
    std::fs::write(path, serde_json::to_vec(ids)?)?;
    Ok(())
}

pub fn load_identities(path: &Path) -> anyhow::Result<Vec<HostIdentity>> {
    Ok(serde_json::from_slice(&std::fs::read(path)?)?)
}
