//! `tunnels`: N simulated agents hold idle tunnels with heartbeats. Reports the connect rate,
//! the Proxy's resident memory per tunnel (RSS delta / N, from /proc) and its CPU while idle.
//! The agents run in `procs` worker processes, each from its own 127.0.0.x source address.

use std::io::{BufRead, BufReader};
use std::time::{Duration, Instant};

use anyhow::Context;
use serde::Serialize;

use crate::fleet::Fleet;
use crate::procstat;

#[derive(Debug, Clone)]
pub struct TunnelsConfig {
    pub count: usize,
    pub procs: usize,
    pub identities: usize,
    pub hold: Duration,
    pub transport: gatehouse_dataplane::io::quic::TunnelTransport,
}

#[derive(Debug, Clone, Serialize)]
pub struct TunnelsReport {
    pub scenario: &'static str,
    /// The agents' tunnel transport (tls or quic).
    pub transport: String,
    pub tunnels_requested: usize,
    pub tunnels_held: u64,
    pub failures: u64,
    pub connect_seconds: f64,
    pub connects_per_second: f64,
    pub proxy_rss_before_kib: u64,
    pub proxy_rss_after_kib: u64,
    pub proxy_kib_per_tunnel: f64,
    pub proxy_idle_cpu_percent: f64,
    pub generator_processes: usize,
}

/// Every round, and each measure's median over them (held and failed tunnels: the fewest held
/// and the most failed, so a bad round shows).
#[derive(Debug, Serialize)]
pub struct TunnelsSummary {
    pub rounds: Vec<TunnelsReport>,
    pub median: TunnelsReport,
}

impl TunnelsSummary {
    /// `None` without rounds.
    pub fn new(rounds: Vec<TunnelsReport>) -> Option<Self> {
        let f = |pick: fn(&TunnelsReport) -> f64| crate::median(rounds.iter().map(pick).collect());
        let u =
            |pick: fn(&TunnelsReport) -> u64| crate::median_int(rounds.iter().map(pick).collect());
        let median = TunnelsReport {
            tunnels_held: rounds.iter().map(|r| r.tunnels_held).min()?,
            failures: rounds.iter().map(|r| r.failures).max()?,
            connect_seconds: f(|r| r.connect_seconds),
            connects_per_second: f(|r| r.connects_per_second),
            proxy_rss_before_kib: u(|r| r.proxy_rss_before_kib),
            proxy_rss_after_kib: u(|r| r.proxy_rss_after_kib),
            proxy_kib_per_tunnel: f(|r| r.proxy_kib_per_tunnel),
            proxy_idle_cpu_percent: f(|r| r.proxy_idle_cpu_percent),
            ..rounds.first()?.clone()
        };
        Some(Self { rounds, median })
    }
}

pub async fn run(fleet: &Fleet, cfg: &TunnelsConfig) -> anyhow::Result<TunnelsReport> {
    let pid = fleet.proxy.pid();
    let ids = fleet.join_agents(cfg.identities.max(1)).await?;
    let dir = tempfile::tempdir()?;
    let ids_path = dir.path().join("identities.json");
    crate::fleet::save_identities(&ids, &ids_path)?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rss0 = procstat::rss_kib(pid).unwrap_or(0);

    let per = cfg.count.div_ceil(cfg.procs.max(1));
    let mut children = Vec::new();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(usize, u64, u64, u64)>();
    for p in 0..cfg.procs.max(1) {
        let n = per.min(cfg.count.saturating_sub(p * per));
        if n == 0 {
            break;
        }
        let mut child = crate::fleet::spawn_worker_agents(
            &ids_path,
            n,
            &fleet.proxy_addr,
            &format!("127.0.0.{}", 10 + p),
            &["--transport", &cfg.transport.to_string()],
        )?;
        let stdout = child.stdout.take().context("no stdout")?;
        let tx = tx.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let mut it = line.split_whitespace();
                if let (Some("STATUS"), Some(c), Some(f), Some(t)) =
                    (it.next(), it.next(), it.next(), it.next())
                {
                    let _ = tx.send((
                        p,
                        c.parse().unwrap_or(0),
                        f.parse().unwrap_or(0),
                        t.parse().unwrap_or(0),
                    ));
                }
            }
        });
        children.push(child);
    }
    drop(tx);
    let bar = indicatif::ProgressBar::new(cfg.count as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{spinner} tunnels [{bar:30}] {pos}/{len} {msg}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let started = Instant::now();
    let started_us = procstat::unix_micros();
    // (held, failed, when the last one settled) per generator process. The generators report
    // every 500 ms; the connect phase ends when the last tunnel settled, which each generator
    // stamps itself (one clock for all processes).
    let mut state = vec![(0u64, 0u64, 0u64); children.len()];
    let deadline = started + Duration::from_secs(300);
    let mut connect_seconds = 0.0;
    loop {
        match tokio::time::timeout(Duration::from_millis(500), rx.recv()).await {
            Ok(Some((p, c, f, t))) => {
                if let Some(s) = state.get_mut(p) {
                    *s = (c, f, t);
                }
            }
            Ok(None) => break,
            Err(_) => {}
        }
        let (held, failed): (u64, u64) = state.iter().fold((0, 0), |a, s| (a.0 + s.0, a.1 + s.1));
        bar.set_position(held);
        bar.set_message(format!("{failed} failed"));
        if held + failed >= cfg.count as u64 {
            let last_us = state.iter().map(|s| s.2).max().unwrap_or(0);
            connect_seconds = match last_us.checked_sub(started_us) {
                Some(us) if us > 0 => us as f64 / 1e6,
                _ => started.elapsed().as_secs_f64(),
            };
            break;
        }
        if Instant::now() > deadline {
            connect_seconds = started.elapsed().as_secs_f64();
            break;
        }
    }
    bar.finish_and_clear();
    // Let the proxy settle (heartbeats, route table), then measure memory and idle CPU.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let rss1 = procstat::rss_kib(pid).unwrap_or(0);
    let cpu0 = procstat::cpu_seconds(pid).unwrap_or(0.0);
    tokio::time::sleep(cfg.hold).await;
    let cpu1 = procstat::cpu_seconds(pid).unwrap_or(0.0);
    let (held, failed): (u64, u64) = state.iter().fold((0, 0), |a, s| (a.0 + s.0, a.1 + s.1));
    for mut c in children {
        let _ = c.kill();
        let _ = c.wait();
    }
    Ok(TunnelsReport {
        scenario: "tunnels",
        transport: cfg.transport.to_string(),
        tunnels_requested: cfg.count,
        tunnels_held: held,
        failures: failed,
        connect_seconds,
        connects_per_second: held as f64 / connect_seconds.max(1e-9),
        proxy_rss_before_kib: rss0,
        proxy_rss_after_kib: rss1,
        proxy_kib_per_tunnel: rss1.saturating_sub(rss0) as f64 / (held.max(1)) as f64,
        proxy_idle_cpu_percent: (cpu1 - cpu0) / cfg.hold.as_secs_f64() * 100.0,
        generator_processes: state.len(),
    })
}

pub fn print(r: &TunnelsReport) {
    println!(
        "scenario        tunnels over {} (idle tunnels with heartbeats, real certificates)",
        r.transport
    );
    println!(
        "held            {} of {} ({} failed), {} generator processes",
        r.tunnels_held, r.tunnels_requested, r.failures, r.generator_processes
    );
    println!(
        "connect         {:.1} s ({:.0} tunnels/s)",
        r.connect_seconds, r.connects_per_second
    );
    println!(
        "proxy rss       {:.1} MiB -> {:.1} MiB: {:.1} KiB per tunnel",
        r.proxy_rss_before_kib as f64 / 1024.0,
        r.proxy_rss_after_kib as f64 / 1024.0,
        r.proxy_kib_per_tunnel
    );
    println!(
        "proxy idle cpu  {:.1} % of one core",
        r.proxy_idle_cpu_percent
    );
}
