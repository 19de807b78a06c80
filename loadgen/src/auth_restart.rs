//! `auth-restart`: a fleet behind edge proxies while its whole Auth cluster restarts. PostgreSQL
//! (fsync on), two Auth processes on it, two proxies given both, N simulated agents with their
//! own joined identities, each holding a tunnel to both proxies (as real agents do). Then both
//! Auths stop, stay down for `--down`, and start again on the same addresses. Reported: tunnels
//! lost (the goal is 0: the simulated agents never redial, so every reconnect would show as a
//! tunnel lost), connections Auth accepted, heartbeat rows and calls per second while observed,
//! and how long until `ListNodes` shows all N nodes again.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use gatehouse_controlplane::client::AuthEndpoint;
use gatehouse_controlplane::host::HostIdentity;
use gatehouse_controlplane::proto;
use gatehouse_controlplane::tls::Trust;
use serde::Serialize;

use crate::fleet::{Proc, new_token, start_daemon};

#[derive(Debug, Clone)]
pub struct AuthRestartConfig {
    pub agents: usize,
    /// Generator processes per proxy.
    pub procs: usize,
    pub down: Duration,
    pub observe: Duration,
}

#[derive(Debug, Serialize)]
pub struct AuthRestartReport {
    pub scenario: &'static str,
    pub agents: usize,
    pub proxies: usize,
    pub auths: usize,
    pub tunnels_before: u64,
    pub tunnels_after: u64,
    /// Tunnels that went down across the restart (each would be an agent reconnecting).
    pub agent_reconnects: u64,
    pub join_seconds: f64,
    pub connect_seconds: f64,
    /// From the first tunnel dialed until `ListNodes` listed every agent.
    pub initial_listing_seconds: f64,
    pub down_seconds: f64,
    /// From the Auths' start again until `ListNodes` listed every agent.
    pub nodes_back_seconds: f64,
    /// Connections the restarted Auths accepted while observed (both together).
    pub auth_connections: u64,
    pub observe_seconds: f64,
    pub heartbeat_rows_per_s: f64,
    pub heartbeat_calls_per_s: f64,
}

fn now_ms_since(t: Instant) -> f64 {
    t.elapsed().as_secs_f64()
}

/// A metric's value from a daemon's `/metrics` (`name` without labels; counters' `_total`).
fn metric(diag: &str, name: &str) -> Option<f64> {
    let addr = diag
        .trim_start_matches("http://")
        .trim_end_matches("/metrics");
    let mut tcp = std::net::TcpStream::connect(addr).ok()?;
    tcp.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    use std::io::{Read, Write};
    write!(
        tcp,
        "GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut body = String::new();
    tcp.read_to_string(&mut body).ok()?;
    body.lines().find_map(|l| {
        let (k, v) = l.split_once(' ')?;
        (k == name || k == format!("{name}_total")).then(|| v.trim().parse().ok())?
    })
}

struct Auth {
    proc: Proc,
    addr: String,
    diag: String,
}

fn start_auth(dir: &Path, n: usize, config: &Path, listen: &str) -> anyhow::Result<Auth> {
    let data = dir.join(format!("auth{n}"));
    let proc = start_daemon(
        &[
            "--config",
            &config.display().to_string(),
            "--roles",
            "auth",
            "--cluster-name",
            "fleet",
            "--auth-addr",
            listen,
            "--diag-addr",
            "127.0.0.1:0",
            "--data-dir",
            &data.display().to_string(),
        ],
        &dir.join(format!("auth{n}.log")),
    )?;
    let addr = proc.field("Auth API:")?;
    let diag = proc.field("Diagnostics:")?;
    Ok(Auth { proc, addr, diag })
}

async fn count_nodes(endpoint: &AuthEndpoint) -> Option<usize> {
    let mut c = endpoint.connect().await.ok()?;
    let r = c
        .list_nodes(proto::ListNodesRequest::default())
        .await
        .ok()?;
    Some(r.into_inner().nodes.len())
}

async fn until_nodes(endpoint: &AuthEndpoint, n: usize, limit: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + limit;
    loop {
        if count_nodes(endpoint).await.unwrap_or(0) >= n {
            return Ok(());
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "ListNodes did not reach {n} in {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

pub async fn run(cfg: AuthRestartConfig) -> anyhow::Result<AuthRestartReport> {
    let pg = gatehouse_controlplane::testing::PgServer::start_with(true)
        .map_err(|e| anyhow::anyhow!(e))?;
    let url = pg.fresh_db().await.map_err(|e| anyhow::anyhow!(e))?;
    let dir = tempfile::tempdir()?;
    let config = dir.path().join("auth.toml");
    std::fs::write(&config, format!("[auth]\nstorage = \"{url}\"\n"))?;
    let first = start_auth(dir.path(), 0, &config, "127.0.0.1:0")?;
    let pin = first.proc.field("CA pin:")?;
    let mut auths = vec![first];
    auths.push(start_auth(dir.path(), 1, &config, "127.0.0.1:0")?);
    let all = auths
        .iter()
        .map(|a| a.addr.clone())
        .collect::<Vec<_>>()
        .join(",");
    let admin = dir.path().join("auth0");
    let proxy_token = new_token(&admin, "proxy")?;
    let node_token = new_token(&admin, "node")?;
    let mut proxies = Vec::new();
    for p in 0..2 {
        let ip = format!("127.0.0.{}", 2 + p);
        let listen = format!("{ip}:0");
        let data = dir.path().join(format!("proxy{p}")).display().to_string();
        let name = format!("edge-{p}");
        proxies.push(start_daemon(
            &[
                "--roles",
                "proxy",
                "--auth",
                &all,
                "--token",
                &proxy_token,
                "--ca-pin",
                &pin,
                "--proxy-addr",
                &listen,
                "--diag-addr",
                &listen,
                "--node-name",
                &name,
                "--data-dir",
                &data,
            ],
            &dir.path().join(format!("proxy{p}.log")),
        )?);
    }
    let proxy_addrs: Vec<String> = proxies
        .iter()
        .map(|p| p.field("Proxy:"))
        .collect::<anyhow::Result<_>>()?;
    let join_via = proxy_addrs.first().cloned().context("no proxy")?;
    let read = |n: &str| std::fs::read_to_string(admin.join("admin").join(n));
    let endpoint = AuthEndpoint {
        addr: all.clone(),
        trust: Trust::CaPem(read("ca.pem")?),
        identity: Some((read("tls.crt")?, read("tls.key")?)),
    };

    // N identities, joined with a real token through the first proxy, 32 at a time.
    eprintln!("auth-restart: joining {} agents", cfg.agents);
    let joined = Instant::now();
    let permits = Arc::new(tokio::sync::Semaphore::new(32));
    let done = Arc::new(AtomicU64::new(0));
    let mut joins = tokio::task::JoinSet::new();
    for i in 0..cfg.agents {
        let (permits, done) = (Arc::clone(&permits), Arc::clone(&done));
        let (proxy, pin, token) = (join_via.clone(), pin.clone(), node_token.clone());
        joins.spawn(async move {
            let _permit = permits.acquire_owned().await?;
            let id = HostIdentity::join(&proxy, &pin, &token, &format!("sim-{i}"), &[])
                .await
                .map_err(|e| anyhow::anyhow!("joining agent {i}: {e}"))?;
            let n = done.fetch_add(1, Ordering::Relaxed) + 1;
            if n % 1000 == 0 {
                eprintln!("auth-restart: {n} joined");
            }
            Ok::<_, anyhow::Error>((i, id))
        });
    }
    let mut ids: Vec<(usize, HostIdentity)> = Vec::with_capacity(cfg.agents);
    while let Some(r) = joins.join_next().await {
        ids.push(r??);
    }
    ids.sort_by_key(|(i, _)| *i);
    let ids: Vec<HostIdentity> = ids.into_iter().map(|(_, id)| id).collect();
    let join_seconds = now_ms_since(joined);

    // Each agent holds a tunnel to each proxy: per proxy, `procs` generator processes, each
    // with its own share of the identities and its own source address.
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(usize, u64, u64)>();
    let mut children = Vec::new();
    let procs = cfg.procs.max(1);
    let per = ids.len().div_ceil(procs);
    let dialed = Instant::now();
    for (p, proxy) in proxy_addrs.iter().enumerate() {
        for (k, share) in ids.chunks(per.max(1)).enumerate() {
            let path = dir.path().join(format!("ids-{k}.json"));
            if p == 0 {
                crate::fleet::save_identities(share, &path)?;
            }
            let slot = children.len();
            let mut child = crate::fleet::spawn_worker_agents(
                &path,
                share.len(),
                proxy,
                &format!("127.0.{}.{}", 10 + p, 10 + k),
                &[],
            )?;
            let stdout = child.stdout.take().context("no stdout")?;
            let tx = tx.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                    let mut it = line.split_whitespace();
                    if let (Some("STATUS"), Some(c), Some(f)) = (it.next(), it.next(), it.next()) {
                        let _ = tx.send((slot, c.parse().unwrap_or(0), f.parse().unwrap_or(0)));
                    }
                }
            });
            children.push(child);
        }
    }
    drop(tx);
    let want = (cfg.agents * proxy_addrs.len()) as u64;
    let mut state = vec![(0u64, 0u64); children.len()];
    let held = |state: &[(u64, u64)]| state.iter().map(|s| s.0).sum::<u64>();
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        if let Ok(Some((slot, c, f))) =
            tokio::time::timeout(Duration::from_millis(500), rx.recv()).await
            && let Some(s) = state.get_mut(slot)
        {
            *s = (c, f);
        }
        let failed: u64 = state.iter().map(|s| s.1).sum();
        if held(&state) + failed >= want {
            anyhow::ensure!(failed == 0, "{failed} tunnels failed to connect");
            break;
        }
        anyhow::ensure!(Instant::now() < deadline, "tunnels did not all connect");
    }
    let connect_seconds = now_ms_since(dialed);
    eprintln!("auth-restart: {want} tunnels up in {connect_seconds:.1} s; waiting for the nodes");
    until_nodes(&endpoint, cfg.agents, Duration::from_secs(300)).await?;
    let initial_listing_seconds = now_ms_since(dialed);
    // Drain status lines for a few seconds; then the count before.
    let settle = Instant::now() + Duration::from_secs(5);
    while Instant::now() < settle {
        if let Ok(Some((slot, c, f))) =
            tokio::time::timeout(Duration::from_millis(200), rx.recv()).await
            && let Some(s) = state.get_mut(slot)
        {
            *s = (c, f);
        }
    }
    let tunnels_before = held(&state);

    // Both Auths stop (SIGTERM, as an upgrade does) and stay down.
    eprintln!("auth-restart: stopping both Auths for {:?}", cfg.down);
    let addrs: Vec<String> = auths.iter().map(|a| a.addr.clone()).collect();
    drop(auths);
    let down_from = Instant::now();
    tokio::time::sleep(cfg.down).await;
    let mut auths = Vec::new();
    for (n, addr) in addrs.iter().enumerate() {
        auths.push(start_auth(dir.path(), n, &config, addr)?);
    }
    let down_seconds = now_ms_since(down_from);
    let back = Instant::now();
    until_nodes(&endpoint, cfg.agents, Duration::from_secs(300)).await?;
    let nodes_back_seconds = now_ms_since(back);
    let observe_until = back + cfg.observe;
    let mut min_held = u64::MAX;
    while Instant::now() < observe_until {
        if let Ok(Some((slot, c, f))) =
            tokio::time::timeout(Duration::from_millis(200), rx.recv()).await
            && let Some(s) = state.get_mut(slot)
        {
            *s = (c, f);
        }
        min_held = min_held.min(held(&state));
    }
    let observe_seconds = now_ms_since(back);
    let sum = |name: &str| -> f64 {
        auths
            .iter()
            .map(|a| metric(&a.diag, name).unwrap_or(0.0))
            .sum()
    };
    let auth_connections = sum("gatehouse_auth_connections") as u64;
    let rows = sum("gatehouse_auth_heartbeat_rows");
    let calls = sum("gatehouse_auth_heartbeat_calls");
    let tunnels_after = held(&state).min(min_held);
    for mut c in children {
        let _ = c.kill();
        let _ = c.wait();
    }
    drop(proxies);
    drop(auths);
    Ok(AuthRestartReport {
        scenario: "auth-restart",
        agents: cfg.agents,
        proxies: proxy_addrs.len(),
        auths: addrs.len(),
        tunnels_before,
        tunnels_after,
        agent_reconnects: tunnels_before.saturating_sub(tunnels_after),
        join_seconds,
        connect_seconds,
        initial_listing_seconds,
        down_seconds,
        nodes_back_seconds,
        auth_connections,
        observe_seconds,
        heartbeat_rows_per_s: rows / observe_seconds.max(1e-9),
        heartbeat_calls_per_s: calls / observe_seconds.max(1e-9),
    })
}

pub fn print(r: &AuthRestartReport) {
    println!(
        "scenario        auth-restart: {} agents, each tunnelled to {} proxies; {} Auths on PostgreSQL",
        r.agents, r.proxies, r.auths
    );
    println!(
        "setup           joined in {:.1} s; {} tunnels up in {:.1} s; all nodes listed after {:.1} s",
        r.join_seconds, r.tunnels_before, r.connect_seconds, r.initial_listing_seconds
    );
    println!(
        "restart         both Auths down {:.1} s; all {} nodes listed {:.2} s after they started",
        r.down_seconds, r.agents, r.nodes_back_seconds
    );
    println!(
        "agents          {} tunnels before, {} after: {} reconnects",
        r.tunnels_before, r.tunnels_after, r.agent_reconnects
    );
    println!(
        "Auth load       {} connections accepted in {:.0} s; heartbeats {:.0} rows/s in {:.2} calls/s",
        r.auth_connections, r.observe_seconds, r.heartbeat_rows_per_s, r.heartbeat_calls_per_s
    );
}
