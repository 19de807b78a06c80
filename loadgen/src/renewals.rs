//! `renewals`: Machine ID bots renewing against a throwaway Auth. N bots are added and joined
//! (real single-use tokens), then each keeps one connection open (mutual TLS with its joined
//! certificate) and renews again and again, each time presenting its newest certificate
//! (`current_cert`) and getting an SSH and an X.509 certificate one generation later. A renewal
//! is answered only once its generation and audit event are durable. Reported: renewals per
//! second, latency percentiles, Auth's CPU, renewals per Auth CPU-second; checked at the end:
//! the generations Auth stored add up to the renewals answered.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use gatehouse_controlplane::client::{AuthEndpoint, Client};
use gatehouse_controlplane::proto;
use gatehouse_controlplane::tls::{Trust, certs_from_pem};
use hdrhistogram::Histogram;
use serde::Serialize;

#[derive(Debug, Clone)]
pub struct RenewalsConfig {
    pub bots: usize,
    pub duration: Duration,
}

#[derive(Debug, Serialize)]
pub struct RenewalsReport {
    pub scenario: &'static str,
    pub bots: usize,
    pub duration_s: f64,
    pub renewals: u64,
    pub errors: u64,
    pub renewals_per_s: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    pub auth_cpu_s: Option<f64>,
    pub renewals_per_auth_cpu_s: Option<f64>,
    pub generator_cpu_s: Option<f64>,
    /// Sum over bots of (stored generation − 1): every renewal Auth made durable.
    pub generations_stored: i64,
}

/// One joined bot: its keys' public halves, its key and its newest certificate.
struct Bot {
    ssh_pub: String,
    tls_pub: Vec<u8>,
    tls_key: String,
    cert_pem: String,
}

/// Add and join `n` bots (role `access`), 16 at a time.
async fn join_bots(
    auth: &str,
    pin: &str,
    admin: &mut Client,
    n: usize,
) -> anyhow::Result<Vec<Bot>> {
    let mut tokens = Vec::with_capacity(n);
    for i in 0..n {
        let t = admin
            .create_bot(proto::CreateBotRequest {
                name: format!("bench-{i}"),
                roles: vec!["access".into()],
                token_ttl_seconds: 0,
            })
            .await
            .context("CreateBot")?
            .into_inner()
            .token;
        tokens.push(t);
    }
    let endpoint = AuthEndpoint {
        addr: auth.to_owned(),
        trust: Trust::Pin(pin.to_owned()),
        identity: None,
    };
    let mut client = endpoint
        .connect()
        .await
        .map_err(|e| anyhow::anyhow!("{}", gatehouse_controlplane::client::error_chain(&e)))?;
    let mut bots = Vec::with_capacity(n);
    for token in tokens {
        let ssh = ssh_key::PrivateKey::random(
            &mut ssh_key::rand_core::OsRng,
            ssh_key::Algorithm::Ed25519,
        )?;
        let tls = gatehouse_controlplane::ca::generate_leaf_key()?;
        let ssh_pub = ssh.public_key().to_openssh()?;
        let tls_pub = rcgen::PublicKeyData::subject_public_key_info(&tls);
        let resp = client
            .join(proto::JoinRequest {
                token,
                host_name: "bench".into(),
                ssh_public_key: ssh_pub.clone(),
                tls_public_key: tls_pub.clone(),
                ttl_seconds: 3600,
                ..Default::default()
            })
            .await
            .context("Join")?
            .into_inner();
        let creds = resp.credentials.context("no credentials")?;
        bots.push(Bot {
            ssh_pub,
            tls_pub,
            tls_key: gatehouse_controlplane::tls::key_pem_for_tools(&tls),
            cert_pem: creds.tls_cert,
        });
    }
    Ok(bots)
}

pub async fn run(cfg: RenewalsConfig) -> anyhow::Result<RenewalsReport> {
    let cluster = crate::spawn::start("127.0.0.1")?;
    let mut admin = cluster.admin_client().await?;
    let ca = std::fs::read_to_string(cluster.data.join("admin").join("ca.pem"))?;
    eprintln!("renewals: adding and joining {} bots", cfg.bots);
    let bots = join_bots(&cluster.auth, &cluster.pin, &mut admin, cfg.bots).await?;

    let done = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    // Every bot connects (one full handshake each) before the clock starts.
    let mut connected = Vec::with_capacity(bots.len());
    for bot in bots {
        let endpoint = AuthEndpoint {
            addr: cluster.auth.clone(),
            trust: Trust::CaPem(ca.clone()),
            identity: Some((bot.cert_pem.clone(), bot.tls_key.clone())),
        };
        let client = endpoint
            .connect()
            .await
            .map_err(|e| anyhow::anyhow!("{}", gatehouse_controlplane::client::error_chain(&e)))?;
        connected.push((bot, client));
    }
    let cpu = cluster.cpu_clock();
    let start = Instant::now();
    let deadline = start + cfg.duration;
    let mut tasks = Vec::new();
    for (bot, mut client) in connected {
        let (done, errors) = (Arc::clone(&done), Arc::clone(&errors));
        tasks.push(tokio::spawn(async move {
            let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
            let mut current = certs_from_pem(&bot.cert_pem)?
                .first()
                .context("no certificate")?
                .to_vec();
            while Instant::now() < deadline {
                let t0 = Instant::now();
                let r = client
                    .renew(proto::RenewRequest {
                        ssh_public_key: bot.ssh_pub.clone(),
                        tls_public_key: bot.tls_pub.clone(),
                        ttl_seconds: 3600,
                        current_cert: current.clone(),
                    })
                    .await;
                match r.ok().and_then(|r| r.into_inner().credentials) {
                    Some(creds) => {
                        let _ = hist.record(t0.elapsed().as_micros() as u64);
                        done.fetch_add(1, Ordering::Relaxed);
                        if let Some(der) = certs_from_pem(&creds.tls_cert)?.first() {
                            current = der.to_vec();
                        }
                    }
                    None => {
                        errors.fetch_add(1, Ordering::Relaxed);
                        // A refused renewal (a lock) ends this bot.
                        break;
                    }
                }
            }
            Ok::<_, anyhow::Error>(hist)
        }));
    }
    let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    for t in tasks {
        hist.add(t.await??)?;
    }
    let elapsed = start.elapsed().as_secs_f64();
    let (auth_cpu, gen_cpu) = cpu.used();
    let renewals = done.load(Ordering::Relaxed);
    let stored: i64 = admin
        .list_bots(proto::ListBotsRequest {})
        .await?
        .into_inner()
        .bots
        .iter()
        .map(|b| b.generation - 1)
        .sum();
    let ms = |q: f64| hist.value_at_quantile(q) as f64 / 1000.0;
    Ok(RenewalsReport {
        scenario: "renewals",
        bots: cfg.bots,
        duration_s: elapsed,
        renewals,
        errors: errors.load(Ordering::Relaxed),
        renewals_per_s: renewals as f64 / elapsed,
        p50_ms: ms(0.5),
        p99_ms: ms(0.99),
        max_ms: hist.max() as f64 / 1000.0,
        auth_cpu_s: auth_cpu,
        renewals_per_auth_cpu_s: auth_cpu.map(|c| renewals as f64 / c.max(1e-9)),
        generator_cpu_s: gen_cpu,
        generations_stored: stored,
    })
}

pub fn print(r: &RenewalsReport) {
    println!(
        "renewals: {} bots, {:.1} s: {} renewals ({:.0}/s), {} errors; p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        r.bots, r.duration_s, r.renewals, r.renewals_per_s, r.errors, r.p50_ms, r.p99_ms, r.max_ms
    );
    if let (Some(cpu), Some(per)) = (r.auth_cpu_s, r.renewals_per_auth_cpu_s) {
        println!(
            "  Auth CPU {cpu:.2} s ({:.0} % of a core): {per:.0} renewals per Auth CPU-second; generator CPU {:.2} s",
            100.0 * cpu / r.duration_s,
            r.generator_cpu_s.unwrap_or(0.0)
        );
    }
    println!(
        "  generations stored by Auth: {} (renewals answered: {})",
        r.generations_stored, r.renewals
    );
}
