//! `logins`: password logins per second against a running Auth, with latency percentiles.
//! Every login is the full path: TLS to Auth (pinned CA), argon2id verification, RBAC, an SSH and
//! an X.509 certificate signed, and the audit events stored durably.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use gatehouse_controlplane::client::AuthEndpoint;
use gatehouse_controlplane::proto;
use gatehouse_controlplane::tls::Trust;
use hdrhistogram::Histogram;
use serde::Serialize;

#[derive(Debug, Clone)]
pub struct LoginsConfig {
    pub auth: String,
    pub pin: String,
    pub user: String,
    pub password: String,
    pub concurrency: usize,
    pub duration: Duration,
    pub auth_pid: Option<u32>,
}

#[derive(Debug, Serialize)]
pub struct LoginsReport {
    pub scenario: &'static str,
    pub concurrency: usize,
    pub duration_s: f64,
    pub logins: u64,
    pub errors: u64,
    pub logins_per_s: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    pub auth_cpu_s: Option<f64>,
    pub logins_per_auth_cpu_s: Option<f64>,
    pub generator_cpu_s: Option<f64>,
    pub auth_rss_kib: Option<u64>,
}

pub async fn run(cfg: LoginsConfig) -> anyhow::Result<LoginsReport> {
    let endpoint = AuthEndpoint {
        addr: cfg.auth.clone(),
        trust: Trust::Pin(cfg.pin.clone()),
        identity: None,
    };
    // Fail fast with a clear error if Auth is unreachable.
    let mut probe = endpoint
        .connect()
        .await
        .map_err(|e| anyhow::anyhow!("{}", gatehouse_controlplane::client::error_chain(&e)))?;
    probe.ping(proto::PingRequest {}).await.context("ping")?;

    let ssh_key =
        ssh_key::PrivateKey::random(&mut ssh_key::rand_core::OsRng, ssh_key::Algorithm::Ed25519)?;
    let ssh_pub = ssh_key.public_key().to_openssh()?;
    let tls_key = gatehouse_controlplane::ca::generate_leaf_key()?;
    let tls_pub = rcgen::PublicKeyData::subject_public_key_info(&tls_key);

    let done = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let bar = indicatif::ProgressBar::new(cfg.duration.as_secs());
    bar.set_style(
        indicatif::ProgressStyle::with_template("{spinner} logins [{bar:30}] {pos}/{len}s {msg}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let cpu0 = cfg.auth_pid.and_then(crate::procstat::cpu_seconds);
    let self0 = crate::procstat::self_cpu_seconds();
    let start = Instant::now();
    let deadline = start + cfg.duration;
    let mut tasks = Vec::new();
    for _ in 0..cfg.concurrency {
        let (endpoint, done, errors) = (endpoint.clone(), done.clone(), errors.clone());
        let req = proto::LoginRequest {
            user: cfg.user.clone(),
            password: cfg.password.clone(),
            ssh_public_key: ssh_pub.clone(),
            tls_public_key: tls_pub.clone(),
            ttl_seconds: 0,
            ..Default::default()
        };
        tasks.push(tokio::spawn(async move {
            let mut hist = Histogram::<u64>::new(3).map_err(|e| anyhow::anyhow!("{e}"))?;
            let mut client = endpoint
                .connect()
                .await
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            while Instant::now() < deadline {
                let t = Instant::now();
                match client.login(req.clone()).await {
                    Ok(_) => {
                        hist.record(t.elapsed().as_micros() as u64).ok();
                        done.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(_) => {
                        errors.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            Ok::<_, anyhow::Error>(hist)
        }));
    }
    let ticker = {
        let (bar, done) = (bar.clone(), done.clone());
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
                let secs = start.elapsed().as_secs_f64();
                bar.set_position(secs as u64);
                bar.set_message(format!(
                    "{:.0}/s",
                    done.load(Ordering::Relaxed) as f64 / secs
                ));
            }
        })
    };
    let mut hist = Histogram::<u64>::new(3).map_err(|e| anyhow::anyhow!("{e}"))?;
    for t in tasks {
        let h = t.await.context("worker panicked")??;
        hist.add(&h).map_err(|e| anyhow::anyhow!("{e}"))?;
    }
    ticker.abort();
    bar.finish_and_clear();
    let elapsed = start.elapsed().as_secs_f64();
    let auth_cpu = match (cpu0, cfg.auth_pid.and_then(crate::procstat::cpu_seconds)) {
        (Some(a), Some(b)) => Some(b - a),
        _ => None,
    };
    let gen_cpu = match (self0, crate::procstat::self_cpu_seconds()) {
        (Some(a), Some(b)) => Some(b - a),
        _ => None,
    };
    let logins = done.load(Ordering::Relaxed);
    Ok(LoginsReport {
        scenario: "logins",
        concurrency: cfg.concurrency,
        duration_s: elapsed,
        logins,
        errors: errors.load(Ordering::Relaxed),
        logins_per_s: logins as f64 / elapsed,
        p50_ms: hist.value_at_quantile(0.5) as f64 / 1000.0,
        p99_ms: hist.value_at_quantile(0.99) as f64 / 1000.0,
        max_ms: hist.max() as f64 / 1000.0,
        auth_cpu_s: auth_cpu,
        logins_per_auth_cpu_s: auth_cpu.filter(|c| *c > 0.0).map(|c| logins as f64 / c),
        generator_cpu_s: gen_cpu,
        auth_rss_kib: cfg.auth_pid.and_then(crate::procstat::rss_kib),
    })
}

pub fn print(r: &LoginsReport) {
    println!(
        "scenario      logins (full password login: argon2id + SSH + X.509 certs + durable audit)"
    );
    println!("concurrency   {}", r.concurrency);
    println!("duration      {:.1} s", r.duration_s);
    println!("logins        {} ({} errors)", r.logins, r.errors);
    println!("rate          {:.1} logins/s", r.logins_per_s);
    println!(
        "latency       p50 {:.1} ms   p99 {:.1} ms   max {:.1} ms",
        r.p50_ms, r.p99_ms, r.max_ms
    );
    if let (Some(cpu), Some(per)) = (r.auth_cpu_s, r.logins_per_auth_cpu_s) {
        println!("auth cpu      {cpu:.2} s ({per:.1} logins per Auth CPU-second)");
    }
    if let Some(rss) = r.auth_rss_kib {
        println!("auth rss      {:.1} MiB", rss as f64 / 1024.0);
    }
    if let Some(g) = r.generator_cpu_s {
        let busy = g / r.duration_s;
        println!(
            "generator cpu {g:.2} s ({:.0}% of one core){}",
            busy * 100.0,
            if busy > 0.9 {
                "  WARNING: the generator was saturated"
            } else {
                ""
            }
        );
    }
}
