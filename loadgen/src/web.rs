//! `loadgen web`: the web terminal under load, beside the same sessions through `gsh ssh`'s
//! path (TLS to the proxy, SSH end to end with the agent).
//!
//! For each path in turn (web, then ssh), on a cluster of separate processes (Auth, Proxy, one
//! real agent): N sessions each run `loadgen print` at `rate_kb` KB/s on a PTY; once all print,
//! over a steady window, the proxy's CPU seconds per MB delivered to the clients, and keystroke
//! echo latency on one more interactive shell of the same path (a key sent, the time until the
//! shell echoes it), `probes` times. Web terminals cost the proxy more than `gsh ssh`: there the
//! proxy only relays TLS records, here it terminates the browser's TLS and WebSocket and runs the
//! SSH client.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use futures_util::{SinkExt as _, StreamExt as _};
use gatehouse_web::client::WebClient;
use hdrhistogram::Histogram;
use serde::Serialize;
use tokio_tungstenite::tungstenite::Message;

use crate::fleet::Fleet;
use crate::procstat;
use crate::ssh::{self, SshPath, SshTarget};

/// Bytes after which a session counts as printing (past the prompt and the command's echo).
const PRINTING: usize = 600;

/// How a printing session waits its turn: at most 32 opening at a time; once open, it waits
/// for every other to be open before it starts printing (so that opening, which costs the
/// agent far more, is not measured with the steady state).
struct Start {
    permit: tokio::sync::OwnedSemaphorePermit,
    opened: Arc<AtomicUsize>,
    go: tokio::sync::watch::Receiver<bool>,
}

impl Start {
    async fn opened(mut self) {
        drop(self.permit);
        self.opened.fetch_add(1, Ordering::Relaxed);
        let _ = self.go.wait_for(|go| *go).await;
    }
}

pub(crate) struct WebRun {
    pub terminals: usize,
    pub rate_kb: u64,
    pub duration: Duration,
    pub probes: usize,
}

/// How long opening every session may take.
const OPEN_LIMIT: Duration = Duration::from_secs(600);

#[derive(Debug, Serialize)]
struct PathReport {
    path: &'static str,
    sessions: usize,
    /// Sessions open (and how long opening them all took), and printing in the window.
    opened_before_start: usize,
    open_s: f64,
    opened: usize,
    errors: usize,
    first_error: Option<String>,
    rate_kb_per_s: u64,
    steady_s: f64,
    /// Bytes the clients received in the steady window.
    mb: f64,
    proxy_cpu_s: f64,
    proxy_cpu_ms_per_mb: f64,
    proxy_core_pct: f64,
    proxy_rss_mib: f64,
    /// The agent's CPU in the window (SSH server, recording), % of one core.
    agent_core_pct: f64,
    echo_samples: usize,
    echo_p50_ms: f64,
    echo_p99_ms: f64,
}

type WebSocket =
    tokio_tungstenite::WebSocketStream<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>;

/// One printing web terminal: open, run `command`, count what arrives until it ends.
async fn web_printer(
    web: WebClient,
    login: String,
    command: String,
    bytes: Arc<AtomicU64>,
    printing: Arc<AtomicUsize>,
    start: Start,
) -> anyhow::Result<()> {
    let mut ws = web.terminal("web-node", &login, 120, 40).await?;
    // Open once the shell speaks (its prompt): the SSH session behind the WebSocket is up.
    wait_web(&mut ws).await?;
    start.opened().await;
    ws.send(Message::Binary(
        format!("exec {command}\n").into_bytes().into(),
    ))
    .await?;
    let (mut first, mut seen) = (true, 0usize);
    while let Some(msg) = ws.next().await {
        match msg? {
            Message::Binary(b) => {
                bytes.fetch_add(b.len() as u64, Ordering::Relaxed);
                seen += b.len();
                if first && seen > PRINTING {
                    first = false;
                    printing.fetch_add(1, Ordering::Relaxed);
                }
            }
            Message::Close(_) => break,
            _ => {}
        }
    }
    Ok(())
}

/// One printing `gsh ssh`-path shell.
async fn ssh_printer(
    target: SshTarget,
    command: String,
    bytes: Arc<AtomicU64>,
    printing: Arc<AtomicUsize>,
    start: Start,
) -> anyhow::Result<()> {
    let mut shell = ssh::pty_shell(&target, 120, 40).await?;
    wait_ssh(&mut shell.channel).await?;
    start.opened().await;
    shell
        .channel
        .data(format!("exec {command}\n").as_bytes())
        .await?;
    let (mut first, mut seen) = (true, 0usize);
    while let Some(msg) = shell.channel.wait().await {
        match msg {
            russh::ChannelMsg::Data { data } => {
                bytes.fetch_add(data.len() as u64, Ordering::Relaxed);
                seen += data.len();
                if first && seen > PRINTING {
                    first = false;
                    printing.fetch_add(1, Ordering::Relaxed);
                }
            }
            russh::ChannelMsg::Close => break,
            _ => {}
        }
    }
    Ok(())
}

/// Keystroke echo on an idle shell prompt: send `a`, time until output, then erase it.
async fn web_echo(ws: &mut WebSocket, n: usize, hist: &mut Histogram<u64>) -> anyhow::Result<()> {
    drain_web(ws, Duration::from_millis(500)).await?;
    for _ in 0..n {
        let t0 = Instant::now();
        ws.send(Message::Binary(b"a".to_vec().into())).await?;
        wait_web(ws).await?;
        hist.record(t0.elapsed().as_micros() as u64)?;
        ws.send(Message::Binary(b"\x7f".to_vec().into())).await?;
        wait_web(ws).await?;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

async fn wait_web(ws: &mut WebSocket) -> anyhow::Result<()> {
    loop {
        match tokio::time::timeout(Duration::from_secs(30), ws.next())
            .await
            .context("no output within 30 s")?
        {
            Some(Ok(Message::Binary(_))) => return Ok(()),
            Some(Ok(_)) => {}
            _ => anyhow::bail!("the web terminal ended"),
        }
    }
}

async fn drain_web(ws: &mut WebSocket, quiet: Duration) -> anyhow::Result<()> {
    while let Ok(m) = tokio::time::timeout(quiet, ws.next()).await {
        if m.is_none() {
            anyhow::bail!("the web terminal ended");
        }
    }
    Ok(())
}

async fn ssh_echo(
    shell: &mut ssh::Shell,
    n: usize,
    hist: &mut Histogram<u64>,
) -> anyhow::Result<()> {
    let ch = &mut shell.channel;
    while tokio::time::timeout(Duration::from_millis(500), ch.wait())
        .await
        .is_ok()
    {}
    for _ in 0..n {
        let t0 = Instant::now();
        ch.data(&b"a"[..]).await?;
        wait_ssh(ch).await?;
        hist.record(t0.elapsed().as_micros() as u64)?;
        ch.data(&b"\x7f"[..]).await?;
        wait_ssh(ch).await?;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

async fn wait_ssh(ch: &mut russh::Channel<russh::client::Msg>) -> anyhow::Result<()> {
    loop {
        match tokio::time::timeout(Duration::from_secs(30), ch.wait())
            .await
            .context("no output within 30 s")?
        {
            Some(russh::ChannelMsg::Data { .. }) => return Ok(()),
            Some(_) => {}
            None => anyhow::bail!("the shell ended"),
        }
    }
}

async fn measure(
    path: &'static str,
    cfg: &WebRun,
    fleet: &Fleet,
    agent: u32,
    target: &SshTarget,
    web: &WebClient,
) -> anyhow::Result<PathReport> {
    let exe = std::env::current_exe()?;
    let command = format!(
        "{} print --rate-kb {} --duration {}s",
        exe.display(),
        cfg.rate_kb,
        cfg.duration.as_secs()
    );
    let bytes = Arc::new(AtomicU64::new(0));
    let printing = Arc::new(AtomicUsize::new(0));
    let opened = Arc::new(AtomicUsize::new(0));
    let (go_tx, go) = tokio::sync::watch::channel(false);
    let gate = Arc::new(tokio::sync::Semaphore::new(32));
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(cfg.terminals);
    for _ in 0..cfg.terminals {
        let (bytes, printing, command, gate) = (
            Arc::clone(&bytes),
            Arc::clone(&printing),
            command.clone(),
            Arc::clone(&gate),
        );
        let (opened, go) = (Arc::clone(&opened), go.clone());
        let (web, target) = (web.clone(), target.clone());
        tasks.push(tokio::spawn(async move {
            let permit = gate.acquire_owned().await?;
            let start = Start { permit, opened, go };
            if path == "web" {
                web_printer(web, target.login.clone(), command, bytes, printing, start).await
            } else {
                ssh_printer(target, command, bytes, printing, start).await
            }
        }));
    }
    // Open them all (and the echo probe's shell), then start every one printing.
    while opened.load(Ordering::Relaxed) < cfg.terminals && started.elapsed() < OPEN_LIMIT {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let opened_n = opened.load(Ordering::Relaxed);
    let open_s = started.elapsed().as_secs_f64();
    enum Probe {
        Web(Box<WebSocket>),
        Ssh(Box<ssh::Shell>),
    }
    let mut probe_session = if path == "web" {
        Probe::Web(Box::new(
            web.terminal("web-node", &target.login, 80, 24).await?,
        ))
    } else {
        Probe::Ssh(Box::new(ssh::pty_shell(target, 80, 24).await?))
    };
    let go_at = Instant::now();
    let _ = go_tx.send(true);
    while printing.load(Ordering::Relaxed) < opened_n && go_at.elapsed() < Duration::from_secs(60) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let opened = printing.load(Ordering::Relaxed);
    // The steady window (every session printing), with the echo probe running in it.
    let proxy = fleet.proxy.pid();
    let a0 = procstat::cpu_seconds(agent).unwrap_or(0.0);
    let (c0, b0, w0) = (
        procstat::cpu_seconds(proxy).unwrap_or(0.0),
        bytes.load(Ordering::Relaxed),
        Instant::now(),
    );
    // For a profiler to attach to the proxy in this state (`perf record -p PID` while it lasts).
    eprintln!("web: {path} steady window begins (proxy pid {proxy}, {opened} sessions printing)");
    let mut hist = Histogram::<u64>::new(3)?;
    let probe_result = match &mut probe_session {
        Probe::Web(ws) => web_echo(ws, cfg.probes, &mut hist).await,
        Probe::Ssh(shell) => ssh_echo(shell, cfg.probes, &mut hist).await,
    };
    // At least 10 s of steady state.
    if let Some(rest) = Duration::from_secs(10).checked_sub(w0.elapsed()) {
        tokio::time::sleep(rest).await;
    }
    let (c1, b1, w1) = (
        procstat::cpu_seconds(proxy).unwrap_or(0.0),
        bytes.load(Ordering::Relaxed),
        Instant::now(),
    );
    let rss = procstat::rss_kib(proxy).unwrap_or(0);
    let agent_cpu = procstat::cpu_seconds(agent).unwrap_or(0.0) - a0;
    drop(probe_session);
    let mut errors = 0;
    let mut first_error = probe_result.err().map(|e| format!("echo probe: {e:#}"));
    for t in tasks {
        match t.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                errors += 1;
                first_error.get_or_insert_with(|| format!("{e:#}"));
            }
            Err(e) => {
                errors += 1;
                first_error.get_or_insert_with(|| e.to_string());
            }
        }
    }
    let secs = (w1 - w0).as_secs_f64();
    let mb = (b1 - b0) as f64 / 1e6;
    let cpu = c1 - c0;
    Ok(PathReport {
        path,
        sessions: cfg.terminals,
        opened_before_start: opened_n,
        open_s,
        opened,
        errors,
        first_error,
        rate_kb_per_s: cfg.rate_kb,
        steady_s: secs,
        mb,
        proxy_cpu_s: cpu,
        proxy_cpu_ms_per_mb: if mb > 0.0 { cpu * 1000.0 / mb } else { 0.0 },
        proxy_core_pct: if secs > 0.0 { cpu / secs * 100.0 } else { 0.0 },
        proxy_rss_mib: rss as f64 / 1024.0,
        agent_core_pct: if secs > 0.0 {
            agent_cpu / secs * 100.0
        } else {
            0.0
        },
        echo_samples: hist.len() as usize,
        echo_p50_ms: hist.value_at_quantile(0.5) as f64 / 1000.0,
        echo_p99_ms: hist.value_at_quantile(0.99) as f64 / 1000.0,
    })
}

/// `loadgen web` from its flags.
pub(crate) async fn main(
    terminals: usize,
    rate_kb: u64,
    duration: Duration,
    probes: usize,
    json: Option<std::path::PathBuf>,
) -> anyhow::Result<()> {
    if terminals == 0 || rate_kb == 0 || probes == 0 {
        anyhow::bail!("--terminals, --rate-kb and --probes must be at least 1");
    }
    let cfg = WebRun {
        terminals,
        rate_kb,
        duration,
        probes,
    };
    run(&cfg, &crate::openssh::current_login()?, json).await
}

async fn run(cfg: &WebRun, login: &str, json: Option<std::path::PathBuf>) -> anyhow::Result<()> {
    // (The fleet's proxy runs without the per-address session throttle, which would count every
    // web terminal as one client: they all reach the proxy's port from the proxy itself.)
    let fleet = Fleet::spawn("127.0.0.2", 0).await?;
    let agent = fleet.start_agent("web-node", "127.0.0.6")?;
    let user = fleet.user("webbench", login).await?;
    let target = SshTarget {
        path: SshPath::Gatehouse,
        addr: fleet.proxy_addr.clone(),
        jump: None,
        node: "web-node".into(),
        login: login.into(),
        user,
    };
    ssh::wait_ready(&target, Duration::from_secs(30)).await?;
    let proxy: SocketAddr = fleet.proxy_addr.parse()?;
    let web = WebClient::login(proxy, &target.user.name, &target.user.password, "").await?;
    let mut reports = Vec::new();
    for path in ["web", "ssh"] {
        let r = measure(path, cfg, &fleet, agent.pid(), &target, &web).await?;
        println!(
            "{:>4}: {}/{} sessions open in {:.0} s, then printing {} KB/s; steady {:.1} s: {:.1} MB, proxy {:.2} CPU-s ({:.0} % of a core) = {:.1} ms per MB, RSS {:.0} MiB; agent {:.0} % of a core; echo p50 {:.2} ms p99 {:.2} ms ({} samples); errors {}{}",
            r.path,
            r.opened,
            r.sessions,
            r.open_s,
            r.rate_kb_per_s,
            r.steady_s,
            r.mb,
            r.proxy_cpu_s,
            r.proxy_core_pct,
            r.proxy_cpu_ms_per_mb,
            r.proxy_rss_mib,
            r.agent_core_pct,
            r.echo_p50_ms,
            r.echo_p99_ms,
            r.echo_samples,
            r.errors,
            r.first_error
                .as_deref()
                .map(|e| format!(" (first: {e})"))
                .unwrap_or_default()
        );
        reports.push(r);
        // Let the previous path's sessions end on the agent before the next.
        tokio::time::sleep(Duration::from_secs(3)).await;
    }
    if let [web, ssh] = reports.as_slice() {
        println!(
            "web − ssh: echo p99 {:+.2} ms (goal: within 2 ms); proxy CPU per MB ×{:.1}",
            web.echo_p99_ms - ssh.echo_p99_ms,
            if ssh.proxy_cpu_ms_per_mb > 0.0 {
                web.proxy_cpu_ms_per_mb / ssh.proxy_cpu_ms_per_mb
            } else {
                0.0
            }
        );
    }
    crate::report::write_json(
        json.as_deref(),
        &serde_json::json!({ "scenario": "web", "paths": reports }),
    )
}
