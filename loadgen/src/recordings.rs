//! `loadgen recordings`: what session recording costs.
//!
//! 1. **Ingest**: N concurrent PTY sessions through the Proxy to one real agent, each printing
//!    `rate_kb` KB/s of log-like text (`loadgen print`) for `duration`. Auth's CPU while the
//!    recordings stream in (as a share of one core), MB of recordings per Auth CPU-second,
//!    recordings completed per second once the sessions end, and the agent's memory per session.
//! 2. **Overhead**: one PTY session printing `overhead_mb` (`cat` of a file), on a cluster that
//!    records and on one with `mode = "off"`, in interleaved rounds: the agent's own CPU seconds
//!    (its children, `cat`, not counted).

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::fleet::{self, Fleet};
use crate::procstat;
use crate::ssh::{self, SshPath, SshTarget};

pub(crate) struct RecRun {
    pub sessions: usize,
    pub rate_kb: u64,
    pub duration: Duration,
    pub overhead_mb: u64,
    pub runs: usize,
}

#[derive(Debug, Serialize)]
struct Ingest {
    sessions: usize,
    rate_kb_per_s: u64,
    seconds: f64,
    ok: usize,
    errors: usize,
    first_error: Option<String>,
    printed_mb: f64,
    recorded_mb: f64,
    /// Auth's CPU while the sessions printed (steady window), % of one core.
    auth_core_pct_steady: f64,
    /// How long the steady window lasted, and when it began (every session printing).
    steady_s: f64,
    all_printing_after_s: f64,
    /// Auth's CPU from the first session to the last recording complete.
    auth_cpu_s_total: f64,
    mb_recorded_per_auth_cpu_s: f64,
    complete: usize,
    /// From the last session's end to its recording complete at Auth.
    completion_s: f64,
    /// Recordings complete per second, from the first session's end to the last recording done.
    recordings_per_s: f64,
    finishing_s: f64,
    agent_rss_kib_per_session: f64,
}

#[derive(Debug, Serialize)]
struct OverheadRound {
    round: usize,
    recording: bool,
    mb: f64,
    seconds: f64,
    agent_cpu_s: f64,
}

#[derive(Debug, Serialize)]
struct Summary {
    scenario: &'static str,
    ingest: Ingest,
    overhead: Vec<OverheadRound>,
    /// Medians: the agent's CPU with recording on and off, and on ÷ off.
    overhead_on_cpu_s: Option<f64>,
    overhead_off_cpu_s: Option<f64>,
    overhead_ratio: Option<f64>,
}

/// `loadgen print`: log-like lines at `rate_kb` KB/s for `duration`.
pub(crate) fn print(rate_kb: u64, duration: Duration) -> anyhow::Result<()> {
    let start = Instant::now();
    let per_tick = (rate_kb * 1000 / 10) as usize;
    let mut out = std::io::stdout().lock();
    let mut seq = 0u64;
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15 ^ u64::from(std::process::id());
    let mut tick = 0u32;
    while start.elapsed() < duration {
        let mut written = 0;
        let mut buf = String::with_capacity(per_tick + 128);
        while written < per_tick {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let line = format!(
                "{:>10.3} INFO request seq={seq} id={x:016x} path=/api/v1/items/{} status=200 took={}ms\n",
                start.elapsed().as_secs_f64(),
                x % 9973,
                x % 250
            );
            written += line.len();
            buf.push_str(&line);
            seq += 1;
        }
        out.write_all(buf.as_bytes())?;
        out.flush()?;
        tick += 1;
        let next = Duration::from_millis(100) * tick;
        if let Some(wait) = next.checked_sub(start.elapsed()) {
            std::thread::sleep(wait);
        }
    }
    Ok(())
}

async fn target(fleet: &Fleet, node: &str, login: &str) -> anyhow::Result<SshTarget> {
    let user = fleet.user("recbench", login).await?;
    let t = SshTarget {
        path: SshPath::Gatehouse,
        addr: fleet.proxy_addr.clone(),
        jump: None,
        node: node.into(),
        login: login.into(),
        user,
    };
    ssh::wait_ready(&t, Duration::from_secs(30)).await?;
    Ok(t)
}

fn recordings_json(fleet: &Fleet) -> Vec<serde_json::Value> {
    fleet::gctl(
        &fleet.dir().join("auth"),
        &["recordings", "ls", "--format", "json"],
    )
    .ok()
    .and_then(|s| serde_json::from_str(&s).ok())
    .unwrap_or_default()
}

async fn ingest(cfg: &RecRun, login: &str) -> anyhow::Result<Ingest> {
    let fleet = Fleet::spawn("127.0.0.2", 0).await?;
    let agent = fleet.start_agent("rec-node", "127.0.0.6")?;
    let t = target(&fleet, "rec-node", login).await?;
    let exe = std::env::current_exe()?;
    let command = format!(
        "{} print --rate-kb {} --duration {}s",
        exe.display(),
        cfg.rate_kb,
        cfg.duration.as_secs()
    );
    let auth_pid = fleet._auth.pid();
    let rss0 = procstat::rss_kib(agent.pid()).unwrap_or(0);
    let auth0 = procstat::cpu_seconds(auth_pid).unwrap_or(0.0);
    let started = Instant::now();
    let running = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::with_capacity(cfg.sessions);
    for _ in 0..cfg.sessions {
        let (t, command, running) = (t.clone(), command.clone(), Arc::clone(&running));
        tasks.push(tokio::spawn(async move {
            let bytes = ssh::pty_output(&t, &command, &running).await?;
            Ok::<_, anyhow::Error>((bytes, Instant::now()))
        }));
    }
    // The steady window: once every session prints, for half of what is left of the first
    // one's time (all of them print throughout it).
    while running.load(Ordering::Relaxed) < cfg.sessions && started.elapsed() < cfg.duration {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let all_printing = started.elapsed();
    let (a0, w0) = (procstat::cpu_seconds(auth_pid), Instant::now());
    tokio::time::sleep(cfg.duration.saturating_sub(all_printing) / 2).await;
    let (a1, w1) = (procstat::cpu_seconds(auth_pid), Instant::now());
    let rss1 = procstat::rss_kib(agent.pid()).unwrap_or(0);
    let steady_pct = match (a0, a1) {
        (Some(a), Some(b)) => (b - a) / (w1 - w0).as_secs_f64().max(0.001) * 100.0,
        _ => 0.0,
    };
    let (mut ok, mut errors, mut first_error, mut printed) = (0, 0, None, 0u64);
    let mut first_end: Option<Instant> = None;
    for task in tasks {
        match task.await {
            Ok(Ok((bytes, end))) => {
                ok += 1;
                printed += bytes;
                first_end = Some(first_end.map_or(end, |f| f.min(end)));
            }
            Ok(Err(e)) => {
                errors += 1;
                first_error.get_or_insert(format!("{e:#}"));
            }
            Err(e) => {
                errors += 1;
                first_error.get_or_insert(e.to_string());
            }
        }
    }
    let ended = Instant::now();
    let seconds = (ended - started).as_secs_f64();
    let deadline = ended + Duration::from_secs(300);
    let mut list;
    loop {
        list = recordings_json(&fleet);
        let done = list.iter().filter(|r| r["state"] != "live").count();
        if done >= ok || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let completion_s = ended.elapsed().as_secs_f64();
    // Recordings finish as their sessions end: the rate from the first end to the last done.
    let finishing_s = first_end.map_or(completion_s, |f| f.elapsed().as_secs_f64());
    let auth_total = procstat::cpu_seconds(auth_pid).unwrap_or(0.0) - auth0;
    let complete = list.iter().filter(|r| r["state"] == "complete").count();
    let recorded: u64 = list.iter().filter_map(|r| r["bytes"].as_u64()).sum();
    drop(agent);
    Ok(Ingest {
        sessions: cfg.sessions,
        rate_kb_per_s: cfg.rate_kb,
        seconds,
        ok,
        errors,
        first_error,
        printed_mb: printed as f64 / 1e6,
        recorded_mb: recorded as f64 / 1e6,
        auth_core_pct_steady: steady_pct,
        steady_s: (w1 - w0).as_secs_f64(),
        all_printing_after_s: all_printing.as_secs_f64(),
        auth_cpu_s_total: auth_total,
        mb_recorded_per_auth_cpu_s: recorded as f64 / 1e6 / auth_total.max(0.001),
        complete,
        completion_s,
        recordings_per_s: complete as f64 / finishing_s.max(0.001),
        finishing_s,
        agent_rss_kib_per_session: rss1.saturating_sub(rss0) as f64 / cfg.sessions as f64,
    })
}

/// The file the overhead sessions `cat`: log-like lines, `mb` MB.
fn overhead_file(mb: u64) -> anyhow::Result<tempfile::NamedTempFile> {
    let mut f = tempfile::NamedTempFile::new()?;
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    let mut written = 0u64;
    let mut w = std::io::BufWriter::new(f.as_file_mut());
    let mut seq = 0u64;
    while written < mb * 1_000_000 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let line = format!(
            "INFO request seq={seq} id={x:016x} path=/api/v1/items/{} status=200 took={}ms\n",
            x % 9973,
            x % 250
        );
        written += line.len() as u64;
        w.write_all(line.as_bytes())?;
        seq += 1;
    }
    w.flush()?;
    drop(w);
    // The login user reads it.
    std::fs::set_permissions(
        f.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o644),
    )?;
    Ok(f)
}

fn median(mut v: Vec<f64>) -> Option<f64> {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied()
}

pub(crate) async fn run(cfg: &RecRun, json: Option<PathBuf>) -> anyhow::Result<()> {
    let login = crate::openssh::current_login()?;
    let ingest = ingest(cfg, &login).await?;
    println!(
        "recordings ingest {} sessions x {} KB/s for {:.0} s: {} ok, {} errors{}; Auth {:.1} % of a core while they printed, {:.1} MB recorded ({:.1} MB printed), {:.1} MB per Auth CPU-second; {} complete {:.1} s after the last session ended ({:.0} recordings/s from the first end); agent {:.0} KiB per session",
        ingest.sessions,
        ingest.rate_kb_per_s,
        ingest.seconds,
        ingest.ok,
        ingest.errors,
        ingest
            .first_error
            .as_deref()
            .map(|e| format!(" (first: {e})"))
            .unwrap_or_default(),
        ingest.auth_core_pct_steady,
        ingest.recorded_mb,
        ingest.printed_mb,
        ingest.mb_recorded_per_auth_cpu_s,
        ingest.complete,
        ingest.completion_s,
        ingest.recordings_per_s,
        ingest.agent_rss_kib_per_session,
    );

    let mut overhead = Vec::new();
    if cfg.overhead_mb > 0 {
        let file = overhead_file(cfg.overhead_mb)?;
        let command = format!("cat {}", file.path().display());
        let on = Fleet::spawn("127.0.0.2", 0).await?;
        let on_agent = on.start_agent("rec-on", "127.0.0.6")?;
        let on_t = target(&on, "rec-on", &login).await?;
        let off = Fleet::spawn_full(
            "127.0.0.3",
            0,
            &[],
            Some("[auth.recording]\nmode = \"off\"\n"),
        )
        .await?;
        let off_agent = off.start_agent("rec-off", "127.0.0.7")?;
        let off_t = target(&off, "rec-off", &login).await?;
        // The agents learn the cluster's setting from Auth at start.
        tokio::time::sleep(Duration::from_secs(2)).await;
        for round in 0..cfg.runs {
            for (recording, t, pid) in [
                (true, &on_t, on_agent.pid()),
                (false, &off_t, off_agent.pid()),
            ] {
                let c0 = procstat::cpu_seconds(pid).unwrap_or(0.0);
                let w0 = Instant::now();
                let bytes = ssh::pty_output(t, &command, &AtomicUsize::new(0)).await?;
                let r = OverheadRound {
                    round,
                    recording,
                    mb: bytes as f64 / 1e6,
                    seconds: w0.elapsed().as_secs_f64(),
                    agent_cpu_s: procstat::cpu_seconds(pid).unwrap_or(0.0) - c0,
                };
                println!(
                    "recordings overhead round {}/{} recording {}: {:.0} MB in {:.2} s, agent {:.2} CPU-s",
                    round + 1,
                    cfg.runs,
                    if recording { "on " } else { "off" },
                    r.mb,
                    r.seconds,
                    r.agent_cpu_s
                );
                overhead.push(r);
            }
        }
    }
    let on_cpu = median(
        overhead
            .iter()
            .filter(|r| r.recording)
            .map(|r| r.agent_cpu_s)
            .collect(),
    );
    let off_cpu = median(
        overhead
            .iter()
            .filter(|r| !r.recording)
            .map(|r| r.agent_cpu_s)
            .collect(),
    );
    let ratio = match (on_cpu, off_cpu) {
        (Some(a), Some(b)) if b > 0.0 => Some(a / b),
        _ => None,
    };
    if let (Some(a), Some(b), Some(r)) = (on_cpu, off_cpu, ratio) {
        println!(
            "recordings overhead medians: agent {a:.2} CPU-s recording, {b:.2} not: {:+.1} %",
            (r - 1.0) * 100.0
        );
    }
    crate::write_json(
        json.as_deref(),
        &Summary {
            scenario: "recordings",
            ingest,
            overhead,
            overhead_on_cpu_s: on_cpu,
            overhead_off_cpu_s: off_cpu,
            overhead_ratio: ratio,
        },
    )
}
