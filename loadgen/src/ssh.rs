//! `ssh`: real SSH through Gatehouse (user → Proxy → tunnel → a real agent's SSH service, which
//! starts a real process) beside the same client talking straight to a real OpenSSH `sshd` that
//! trusts the cluster's user CA. The client is russh with the user's certificate from login.
//!
//! The third path is the bastion Gatehouse replaces: the same client through a jump `sshd`
//! (`direct-tcpip`, as `ssh -J` does) to a target `sshd`, both on loopback.
//!
//! Two measurements per path: new sessions per second (TCP + TLS + SSH handshake + certificate
//! auth + `exec true` + exit status + close, by C concurrent workers) with setup latency, and one
//! channel's bulk throughput (`cat > /dev/null`).

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use gatehouse_controlplane::identity::PROXY_SERVER_NAME;
use gatehouse_controlplane::tls::{Trust, client_config_with_alpn};
use gatehouse_proto::alpn::SSH as ALPN_SSH;
use gatehouse_proto::session::{self, SessionRequest, SessionResponse};
use hdrhistogram::Histogram;
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::fleet::UserCreds;
use crate::procstat;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum SshPath {
    /// Through the Proxy to a Gatehouse agent.
    Gatehouse,
    /// Straight to OpenSSH sshd on loopback.
    Openssh,
    /// Through a jump sshd (`direct-tcpip`) to a target sshd, as `ssh -J` does.
    Proxyjump,
}

/// Where the SSH client goes.
#[derive(Clone)]
pub struct SshTarget {
    pub path: SshPath,
    /// The Proxy (Gatehouse) or the target sshd (OpenSSH, ProxyJump).
    pub addr: String,
    /// The jump sshd (ProxyJump).
    pub jump: Option<String>,
    /// The node name the Proxy routes to.
    pub node: String,
    pub login: String,
    pub user: UserCreds,
}

#[derive(Debug, Clone, Serialize)]
pub struct SshReport {
    pub scenario: &'static str,
    pub path: SshPath,
    /// Which round (from 0); in a median, the number of rounds.
    pub round: usize,
    pub concurrency: usize,
    pub sessions: u64,
    pub errors: u64,
    pub first_error: Option<String>,
    pub sessions_per_s: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    /// CPU of the server side while opening sessions: Proxy + agent, or sshd and its children.
    pub server_cpu_s: Option<f64>,
    pub sessions_per_server_cpu_s: Option<f64>,
    /// One channel's bulk upload into `cat > /dev/null`.
    pub bulk_gb_per_s: f64,
    pub bulk_gb_per_server_cpu_s: Option<f64>,
    pub generator_cpu_s: f64,
}

struct AnyHost;

impl russh::client::Handler for AnyHost {
    type Error = russh::Error;

    // The bench trusts the host it just started; the product's client (`gsh ssh`) checks the
    // host certificate against the cluster's host CA.
    async fn check_server_key(
        &mut self,
        _key: &russh::keys::PublicKeyOrCertificate,
    ) -> Result<bool, Self::Error> {
        Ok(true)
    }
}

fn client_config() -> Arc<russh::client::Config> {
    let mut config = russh::client::Config::default();
    // Agents present host certificates (sshd here a plain key, which stays acceptable).
    config.preferred.host_key_certificates =
        std::borrow::Cow::Owned(vec![russh::keys::Algorithm::Ed25519]);
    // AES-GCM, as the jump-host baseline and the Proxy's TLS use.
    config.preferred.cipher =
        std::borrow::Cow::Owned(vec![russh::cipher::AES_256_GCM, russh::cipher::AES_128_GCM]);
    Arc::new(config)
}

type Handle = russh::client::Handle<AnyHost>;

/// One authenticated connection to the target (and, through a jump host, the jump connection
/// that carries it, kept open as long as it).
struct Session {
    target: Handle,
    _jump: Option<Handle>,
}

impl std::ops::Deref for Session {
    type Target = Handle;
    fn deref(&self) -> &Handle {
        &self.target
    }
}

async fn authenticate(
    session: &mut Handle,
    login: &str,
    key: &Arc<russh::keys::PrivateKey>,
    cert: &russh::keys::Certificate,
) -> anyhow::Result<()> {
    let auth = session
        .authenticate_openssh_cert(login.to_owned(), Arc::clone(key), cert.clone())
        .await?;
    anyhow::ensure!(auth.success(), "certificate authentication refused");
    Ok(())
}

/// Connect and authenticate one SSH connection.
async fn connect(
    target: &SshTarget,
    config: Arc<russh::client::Config>,
    key: Arc<russh::keys::PrivateKey>,
    cert: russh::keys::Certificate,
) -> anyhow::Result<Session> {
    if target.path == SshPath::Proxyjump {
        let jump_addr = target
            .jump
            .as_deref()
            .context("ProxyJump without a jump host")?;
        let tcp = tokio::net::TcpStream::connect(jump_addr).await?;
        tcp.set_nodelay(true)?;
        let mut jump = russh::client::connect_stream(Arc::clone(&config), tcp, AnyHost).await?;
        authenticate(&mut jump, &target.login, &key, &cert).await?;
        let dest: std::net::SocketAddr = target.addr.parse()?;
        let channel = jump
            .channel_open_direct_tcpip(
                dest.ip().to_string(),
                u32::from(dest.port()),
                "127.0.0.1",
                0,
            )
            .await?;
        let mut session =
            russh::client::connect_stream(config, channel.into_stream(), AnyHost).await?;
        authenticate(&mut session, &target.login, &key, &cert).await?;
        return Ok(Session {
            target: session,
            _jump: Some(jump),
        });
    }
    let tcp = tokio::net::TcpStream::connect(&target.addr).await?;
    tcp.set_nodelay(true)?;
    let mut session = match target.path {
        SshPath::Openssh | SshPath::Proxyjump => {
            russh::client::connect_stream(config, tcp, AnyHost).await?
        }
        SshPath::Gatehouse => {
            let tls_cfg = client_config_with_alpn(
                &Trust::CaPem(target.user.ca.clone()),
                Some((&target.user.cert, &target.user.key)),
                &[ALPN_SSH],
            )?;
            let mut tls = tokio_rustls::TlsConnector::from(tls_cfg)
                .connect(
                    rustls::pki_types::ServerName::try_from(PROXY_SERVER_NAME)?,
                    tcp,
                )
                .await?;
            let req = SessionRequest {
                target: target.node.clone(),
                login: target.login.clone(),
                cluster: String::new(),
                on_behalf: None,
            };
            tls.write_all(&session::encode(&req)).await?;
            // Read exactly the answer (length-prefixed) so the SSH bytes after it stay unread.
            let len = tls.read_u32().await? as usize;
            anyhow::ensure!(len <= session::MAX_MESSAGE, "proxy answer too large");
            let mut buf = bytes::BytesMut::with_capacity(4 + len);
            buf.extend_from_slice(&(len as u32).to_be_bytes());
            buf.resize(4 + len, 0);
            tls.read_exact(buf.get_mut(4..).context("buffer")?).await?;
            let resp =
                session::decode::<SessionResponse>(&mut buf)?.context("incomplete proxy answer")?;
            anyhow::ensure!(resp.ok, "proxy refused the session: {}", resp.error);
            russh::client::connect_stream(config, tls, AnyHost).await?
        }
    };
    authenticate(&mut session, &target.login, &key, &cert).await?;
    Ok(Session {
        target: session,
        _jump: None,
    })
}

/// Connect, run `command` on a PTY and count its output until the channel closes; `started`
/// counts sessions whose command runs.
pub async fn pty_output(
    target: &SshTarget,
    command: &str,
    started: &std::sync::atomic::AtomicUsize,
) -> anyhow::Result<u64> {
    let (key, cert) = keys(&target.user)?;
    let session = connect(target, client_config(), key, cert).await?;
    let mut ch = session.channel_open_session().await?;
    ch.request_pty(false, "xterm", 120, 40, 0, 0, &[]).await?;
    ch.exec(true, command).await?;
    started.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let mut bytes = 0u64;
    while let Some(msg) = ch.wait().await {
        match msg {
            russh::ChannelMsg::Data { data } => bytes += data.len() as u64,
            russh::ChannelMsg::Close => break,
            _ => {}
        }
    }
    Ok(bytes)
}

/// Run `command` on a new channel and wait for its exit status.
async fn exec(session: &Session, command: &str) -> anyhow::Result<u32> {
    let mut ch = session.channel_open_session().await?;
    ch.exec(true, command).await?;
    let mut status = None;
    while let Some(msg) = ch.wait().await {
        match msg {
            russh::ChannelMsg::ExitStatus { exit_status } => status = Some(exit_status),
            russh::ChannelMsg::Close => break,
            _ => {}
        }
    }
    status.context("the channel closed without an exit status")
}

fn keys(
    user: &UserCreds,
) -> anyhow::Result<(Arc<russh::keys::PrivateKey>, russh::keys::Certificate)> {
    let key = russh::keys::PrivateKey::from_openssh(user.ssh_key.as_bytes())
        .context("parsing the SSH key")?;
    let cert = russh::keys::Certificate::from_openssh(user.ssh_cert.trim())
        .context("parsing the SSH certificate")?;
    Ok((Arc::new(key), cert))
}

/// Open one session and run `true`, retrying until `timeout`: the agent's tunnel and the
/// route may need a moment after start.
pub async fn wait_ready(target: &SshTarget, timeout: Duration) -> anyhow::Result<()> {
    let (key, cert) = keys(&target.user)?;
    let deadline = Instant::now() + timeout;
    loop {
        let attempt = async {
            let s = connect(target, client_config(), Arc::clone(&key), cert.clone()).await?;
            let status = exec(&s, "true").await?;
            anyhow::ensure!(status == 0, "`true` exited with {status}");
            Ok(())
        };
        match tokio::time::timeout(Duration::from_secs(10), attempt).await {
            Ok(Ok(())) => return Ok(()),
            Ok(Err(e)) if Instant::now() > deadline => {
                return Err(e.context(format!("{:?} SSH path not ready", target.path)));
            }
            Err(_) if Instant::now() > deadline => {
                anyhow::bail!("{:?} SSH path timed out", target.path)
            }
            _ => tokio::time::sleep(Duration::from_millis(300)).await,
        }
    }
}

/// The measurements `loadgen ssh` makes on each path.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Part {
    /// New sessions per second (russh client).
    Sessions,
    /// One channel's upload into `cat > /dev/null` (russh client).
    Bulk,
    /// OpenSSH's `scp` of one file to /dev/null.
    Scp,
}

/// Which measurements `run` makes.
#[derive(Debug, Clone, Copy)]
pub struct Parts {
    pub sessions: bool,
    pub bulk: bool,
}

/// The server side's CPU seconds so far: `pids` with their process trees.
fn server_cpu(pids: &[u32]) -> Option<f64> {
    pids.iter().map(|p| procstat::tree_cpu_seconds(*p)).sum()
}

fn delta(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    Some(b? - a?)
}

/// Sessions per second and bulk throughput on one path; `server_pids` are the processes whose
/// CPU (with their children) counts as the server side.
pub async fn run(
    target: &SshTarget,
    concurrency: usize,
    duration: Duration,
    server_pids: &[u32],
    parts: Parts,
) -> anyhow::Result<SshReport> {
    let gen0 = procstat::self_cpu_seconds().unwrap_or(0.0);
    let mut report = SshReport {
        scenario: "ssh",
        path: target.path,
        round: 0,
        concurrency,
        sessions: 0,
        errors: 0,
        first_error: None,
        sessions_per_s: 0.0,
        p50_ms: 0.0,
        p99_ms: 0.0,
        server_cpu_s: None,
        sessions_per_server_cpu_s: None,
        bulk_gb_per_s: 0.0,
        bulk_gb_per_server_cpu_s: None,
        generator_cpu_s: 0.0,
    };
    if parts.sessions {
        sessions(target, concurrency, duration, server_pids, &mut report).await?;
    }
    if parts.bulk {
        bulk(target, duration, server_pids, &mut report).await?;
    }
    report.generator_cpu_s = procstat::self_cpu_seconds().unwrap_or(0.0) - gen0;
    Ok(report)
}

/// New sessions back to back from `concurrency` workers for `duration`.
async fn sessions(
    target: &SshTarget,
    concurrency: usize,
    duration: Duration,
    server_pids: &[u32],
    report: &mut SshReport,
) -> anyhow::Result<()> {
    let (key, cert) = keys(&target.user)?;
    let config = client_config();
    let bar = crate::progress::timed(&format!("ssh sessions {:?}", target.path), duration);
    let cpu0 = server_cpu(server_pids);
    let started = Instant::now();
    let deadline = started + duration;
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let (target, config, key, cert) = (
            target.clone(),
            Arc::clone(&config),
            Arc::clone(&key),
            cert.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let mut hist = Histogram::<u64>::new(3).map_err(|e| anyhow::anyhow!("{e}"))?;
            let (mut errors, mut first_error) = (0u64, None);
            while Instant::now() < deadline {
                let t = Instant::now();
                let one = async {
                    let s = connect(&target, Arc::clone(&config), Arc::clone(&key), cert.clone())
                        .await?;
                    let status = exec(&s, "true").await?;
                    anyhow::ensure!(status == 0, "`true` exited with {status}");
                    let _ = s
                        .disconnect(russh::Disconnect::ByApplication, "", "en")
                        .await;
                    Ok(())
                };
                match tokio::time::timeout(Duration::from_secs(10), one).await {
                    Ok(Ok(())) => {
                        hist.record(t.elapsed().as_micros() as u64).ok();
                    }
                    Ok(Err(e)) => {
                        errors += 1;
                        first_error.get_or_insert_with(|| format!("{e:#}"));
                    }
                    Err(_) => {
                        errors += 1;
                        first_error.get_or_insert_with(|| "timed out after 10 s".into());
                    }
                }
            }
            Ok::<_, anyhow::Error>((hist, errors, first_error))
        }));
    }
    let mut hist = Histogram::<u64>::new(3).map_err(|e| anyhow::anyhow!("{e}"))?;
    for t in tasks {
        let (h, e, f) = t.await??;
        hist.add(h).map_err(|e| anyhow::anyhow!("{e}"))?;
        report.errors += e;
        if report.first_error.is_none() {
            report.first_error = f;
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    drop(bar);
    let cpu = delta(cpu0, server_cpu(server_pids));
    report.sessions = hist.len();
    report.sessions_per_s = hist.len() as f64 / elapsed;
    report.p50_ms = hist.value_at_quantile(0.5) as f64 / 1000.0;
    report.p99_ms = hist.value_at_quantile(0.99) as f64 / 1000.0;
    report.server_cpu_s = cpu;
    report.sessions_per_server_cpu_s = cpu.filter(|c| *c > 0.0).map(|c| hist.len() as f64 / c);
    Ok(())
}

/// One channel's upload into `cat > /dev/null` for `duration`.
async fn bulk(
    target: &SshTarget,
    duration: Duration,
    server_pids: &[u32],
    report: &mut SshReport,
) -> anyhow::Result<()> {
    let (key, cert) = keys(&target.user)?;
    let session = connect(target, client_config(), key, cert).await?;
    let ch = session.channel_open_session().await?;
    ch.exec(true, "cat > /dev/null").await?;
    let chunk = vec![0x5Au8; 32 * 1024];
    let _bar = crate::progress::timed(&format!("ssh bulk {:?}", target.path), duration);
    let cpu0 = server_cpu(server_pids);
    let start = Instant::now();
    let deadline = start + duration;
    let mut sent = 0u64;
    let writer = ch.make_writer();
    tokio::pin!(writer);
    while Instant::now() < deadline {
        writer.write_all(&chunk).await?;
        sent += chunk.len() as u64;
    }
    let secs = start.elapsed().as_secs_f64();
    let cpu = delta(cpu0, server_cpu(server_pids));
    let _ = writer.shutdown().await;
    let _ = session
        .disconnect(russh::Disconnect::ByApplication, "", "en")
        .await;
    let gb = sent as f64 / 1e9;
    report.bulk_gb_per_s = gb / secs;
    report.bulk_gb_per_server_cpu_s = cpu.filter(|c| *c > 0.0).map(|c| gb / c);
    Ok(())
}

pub fn print(r: &SshReport) {
    let mut line = format!("ssh {:<9}", format!("{:?}", r.path).to_lowercase());
    if r.sessions + r.errors > 0 {
        line.push_str(&format!(
            " {:.0} sessions/s ({} ok, {} errors)  p50 {:.2} ms  p99 {:.2} ms{}",
            r.sessions_per_s,
            r.sessions,
            r.errors,
            r.p50_ms,
            r.p99_ms,
            r.sessions_per_server_cpu_s
                .map(|s| format!("  {s:.0} per server CPU-second"))
                .unwrap_or_default(),
        ));
    }
    if r.bulk_gb_per_s > 0.0 {
        line.push_str(&format!(
            "  bulk {:.3} GB/s{}",
            r.bulk_gb_per_s,
            r.bulk_gb_per_server_cpu_s
                .map(|g| format!(" ({g:.2} GB per server CPU-second)"))
                .unwrap_or_default(),
        ));
    }
    println!("{line}");
    if let Some(e) = &r.first_error {
        println!("    first error: {e}");
    }
}

/// An interactive shell on a PTY (what `gsh ssh NODE` gives), kept with its connection.
pub struct Shell {
    _session: Session,
    pub channel: russh::Channel<russh::client::Msg>,
}

/// Connect and start a shell on a `cols`×`rows` PTY.
pub async fn pty_shell(target: &SshTarget, cols: u32, rows: u32) -> anyhow::Result<Shell> {
    let (key, cert) = keys(&target.user)?;
    let session = connect(target, client_config(), key, cert).await?;
    let channel = session.channel_open_session().await?;
    channel
        .request_pty(false, "xterm-256color", cols, rows, 0, 0, &[])
        .await?;
    channel.request_shell(true).await?;
    Ok(Shell {
        _session: session,
        channel,
    })
}
