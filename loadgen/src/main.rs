//! `loadgen`: Gatehouse's bundled load generator. Scenarios: `logins` (Auth); `tunnels`,
//! `throughput`, `latency`, `sessions` and `ssh` (the Proxy, with their baselines); `link` (the
//! agents' tunnel transports over an emulated lossy link).

mod audit;
mod auth_restart;
mod cli;
mod fleet;
mod latency;
mod leaves;
mod link;
mod link_cmd;
mod logins;
mod openssh;
mod procstat;
mod progress;
mod rathole;
mod recordings;
mod renewals;
mod report;
mod scp;
mod sim_agent;
mod spawn;
mod ssh;
mod ssh_cmd;
mod throughput;
mod tunnels;
mod web;

use std::path::PathBuf;

use clap::Parser;
pub(crate) use report::{median, median_int, write_json};

use cli::{Cli, Handshakes, Scenario, SessionPath};
use link_cmd::{LinkRun, link_cmd};
use ssh_cmd::{SshRun, ssh_cmd};

/// Raise the soft open-files limit to the hard one: thousands of tunnels need thousands of fds.
fn raise_nofile() {
    if let Ok((_, hard)) =
        nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
    {
        let _ =
            nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE, hard, hard);
    }
}

fn main() {
    raise_nofile();
    let cli = Cli::parse();
    let result = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(anyhow::Error::from)
        .and_then(|rt| rt.block_on(run(cli)));
    if let Err(e) = result {
        eprintln!("loadgen: error: {e:#}");
        std::process::exit(1);
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.scenario {
        Scenario::Logins {
            spawn,
            auth,
            ca_pin,
            user,
            password,
            auth_pid,
            concurrency,
            duration,
        } => {
            let spawned = if spawn {
                Some(spawn::start("127.0.0.1")?)
            } else {
                None
            };
            let cfg = match &spawned {
                Some(s) => logins::LoginsConfig {
                    auth: s.auth.clone(),
                    pin: s.pin.clone(),
                    user: s.user.clone(),
                    password: s.password.clone(),
                    concurrency,
                    duration: duration.into(),
                    auth_pid: Some(s.pid()),
                },
                None => logins::LoginsConfig {
                    auth: auth.unwrap_or_default(),
                    pin: ca_pin.unwrap_or_default(),
                    user: user.unwrap_or_default(),
                    password: password.ok_or_else(|| {
                        anyhow::anyhow!("pass --password or set LOADGEN_PASSWORD")
                    })?,
                    concurrency,
                    duration: duration.into(),
                    auth_pid,
                },
            };
            if cfg.concurrency == 0 {
                anyhow::bail!("--concurrency must be at least 1");
            }
            let report = logins::run(cfg).await?;
            logins::print(&report);
            write_json(cli.json.as_deref(), &report)?;
            drop(spawned);
            Ok(())
        }
        Scenario::Audit {
            emitters,
            batch,
            duration,
            events,
            storage,
            actors,
            searches,
        } => {
            if emitters == 0 || batch == 0 || batch > 1000 {
                anyhow::bail!("--emitters must be at least 1 and --batch 1 to 1000");
            }
            let postgres = match storage.as_str() {
                "sqlite" => false,
                "postgres" => true,
                other => anyhow::bail!("--storage {other}: expected sqlite or postgres"),
            };
            let report = audit::run(audit::AuditConfig {
                emitters,
                batch,
                duration: duration.into(),
                events,
                postgres,
                actors,
                searches,
            })
            .await?;
            audit::print(&report);
            write_json(cli.json.as_deref(), &report)
        }
        Scenario::AuthRestart {
            agents,
            procs,
            down,
            observe,
        } => {
            if agents == 0 {
                anyhow::bail!("--agents must be at least 1");
            }
            let report = auth_restart::run(auth_restart::AuthRestartConfig {
                agents,
                procs,
                down: down.into(),
                observe: observe.into(),
            })
            .await?;
            auth_restart::print(&report);
            write_json(cli.json.as_deref(), &report)
        }
        Scenario::Leaves {
            leaves,
            agents,
            lists,
        } => {
            if agents == 0 {
                anyhow::bail!("--agents must be at least 1");
            }
            let report = leaves::run(leaves::LeavesConfig {
                leaves,
                agents,
                lists,
            })
            .await?;
            leaves::print(&report);
            write_json(cli.json.as_deref(), &report)
        }
        Scenario::Renewals { bots, duration } => {
            if bots == 0 {
                anyhow::bail!("--bots must be at least 1");
            }
            let report = renewals::run(renewals::RenewalsConfig {
                bots,
                duration: duration.into(),
            })
            .await?;
            renewals::print(&report);
            write_json(cli.json.as_deref(), &report)
        }
        Scenario::Tunnels {
            count,
            procs,
            identities,
            hold,
            workers,
            transport,
            runs,
        } => {
            if count == 0 || procs == 0 || runs == 0 {
                anyhow::bail!("--count, --procs and --runs must be at least 1");
            }
            let cfg = tunnels::TunnelsConfig {
                count,
                procs,
                identities,
                hold: hold.into(),
                transport,
            };
            let mut rounds = Vec::new();
            for round in 1..=runs {
                // A fresh cluster each round: the proxy's memory before the tunnels is its own.
                let fleet = fleet::Fleet::spawn("127.0.0.2", workers).await?;
                println!(
                    "round {round}/{runs}: proxy I/O backend {}",
                    fleet.io_backend
                );
                let report = tunnels::run(&fleet, &cfg).await?;
                tunnels::print(&report);
                rounds.push(report);
            }
            let summary = tunnels::TunnelsSummary::new(rounds)
                .ok_or_else(|| anyhow::anyhow!("no rounds ran"))?;
            if runs > 1 {
                println!("median of {runs} rounds:");
                tunnels::print(&summary.median);
            }
            write_json(cli.json.as_deref(), &summary)?;
            Ok(())
        }
        Scenario::Throughput {
            streams,
            duration,
            runs,
            paths,
            workers,
            direction,
        } => {
            throughput_cmd(
                streams,
                duration.into(),
                runs,
                &paths,
                workers,
                direction,
                cli.json,
            )
            .await
        }
        Scenario::Latency {
            sessions,
            rate,
            duration,
            workers,
            runs,
        } => {
            if sessions == 0 || rate <= 0.0 || runs == 0 {
                anyhow::bail!("--sessions, --rate and --runs must be positive");
            }
            let (echo, _, _, ca) =
                throughput::start_sink(&format!("{}:0", throughput::sink_ip()), true)?;
            let (fleet, _stats) = proxy_fleet(workers, &[]).await?;
            let print = |label: &str, r: &latency::LatencyReport| {
                println!(
                    "latency {label:<14} {} req over {sessions} sessions at {rate:.0}/s: p50 {} µs  p99 {} µs  p99.9 {} µs  max {} µs",
                    r.requests, r.p50_us, r.p99_us, r.p999_us, r.max_us
                );
            };
            let mut pairs = Vec::new();
            for round in 1..=runs {
                let one = async |path: throughput::Path| {
                    let target = echo_target(path, &fleet, echo);
                    let r = latency::latency(&target, &ca, sessions, rate, duration.into(), false)
                        .await?;
                    print(&format!("{} {round}/{runs}", path.name()), &r);
                    Ok::<_, anyhow::Error>(r)
                };
                let direct = one(throughput::Path::Direct).await?;
                let proxy = one(throughput::Path::Proxy).await?;
                pairs.push((direct, proxy));
            }
            let summary = latency::LatencySummary::new(pairs);
            if runs > 1 {
                for m in &summary.medians {
                    print(&format!("{} median", m.path.name()), m);
                }
            }
            let a = summary.added;
            println!(
                "added by the proxy{}: p50 {} µs  p99 {} µs  p99.9 {} µs",
                if runs > 1 {
                    " (median of the rounds)"
                } else {
                    ""
                },
                a.p50_us,
                a.p99_us,
                a.p999_us
            );
            write_json(cli.json.as_deref(), &summary)?;
            Ok(())
        }
        Scenario::Sessions {
            concurrency,
            duration,
            workers,
            handshakes,
            runs,
            paths,
        } => {
            if concurrency == 0 || runs == 0 || paths.is_empty() {
                anyhow::bail!("--concurrency, --runs and --paths must be at least 1");
            }
            if handshakes.is_empty() {
                anyhow::bail!("--handshakes needs full, resumed or both");
            }
            let (echo, _, _, ca) =
                throughput::start_sink(&format!("{}:0", throughput::sink_ip()), true)?;
            let (fleet, _stats) = proxy_fleet(workers, &[]).await?;
            let mut reports = Vec::new();
            // Each session a new client (full handshakes), then one client for all sessions
            // (resumed handshakes, as `gsh proxy tcp` makes them).
            for (round, resumption) in (1..=runs).flat_map(|n| [(n, false), (n, true)]) {
                let kind = if resumption {
                    Handshakes::Resumed
                } else {
                    Handshakes::Full
                };
                if !handshakes.contains(&kind) {
                    continue;
                }
                for path in [throughput::Path::Direct, throughput::Path::Proxy] {
                    let wanted = match path {
                        throughput::Path::Direct => SessionPath::Direct,
                        _ => SessionPath::Proxy,
                    };
                    if !paths.contains(&wanted) {
                        continue;
                    }
                    let target = echo_target(path, &fleet, echo);
                    let pid = (path == throughput::Path::Proxy).then(|| fleet.proxy.pid());
                    let r = latency::sessions(
                        &target,
                        &ca,
                        concurrency,
                        duration.into(),
                        pid,
                        resumption,
                    )
                    .await?;
                    print_sessions(&format!("{round}/{runs}"), &r);
                    reports.push(r);
                }
            }
            let summary = latency::SessionsSummary::new(runs, reports);
            if runs > 1 {
                for m in &summary.medians {
                    print_sessions("median", m);
                }
            }
            write_json(cli.json.as_deref(), &summary)?;
            Ok(())
        }
        Scenario::Recordings {
            sessions,
            rate_kb,
            duration,
            overhead_mb,
            runs,
        } => {
            if sessions == 0 || rate_kb == 0 || runs == 0 {
                anyhow::bail!("--sessions, --rate-kb and --runs must be at least 1");
            }
            let cfg = recordings::RecRun {
                sessions,
                rate_kb,
                duration: duration.into(),
                overhead_mb,
                runs,
            };
            recordings::run(&cfg, cli.json).await
        }
        Scenario::Print { rate_kb, duration } => recordings::print(rate_kb, duration.into()),
        Scenario::Web {
            terminals,
            rate_kb,
            duration,
            probes,
        } => web::main(terminals, rate_kb, duration.into(), probes, cli.json).await,
        Scenario::Ssh {
            concurrency,
            duration,
            workers,
            runs,
            scp_mib,
            paths,
            parts,
        } => {
            if concurrency == 0 || runs == 0 || scp_mib == 0 {
                anyhow::bail!("--concurrency, --runs and --scp-mib must be at least 1");
            }
            let cfg = SshRun {
                concurrency,
                duration: duration.into(),
                workers,
                runs,
                scp_bytes: scp_mib << 20,
                paths,
                parts,
            };
            ssh_cmd(&cfg, cli.json).await
        }
        Scenario::Link {
            delay,
            loss,
            rate_mbit,
            queue,
            transports,
            streams,
            sessions,
            rate,
            duration,
            settle,
            runs,
            loaded,
            workers,
        } => {
            if loss.is_empty() || transports.is_empty() || runs == 0 || streams == 0 {
                anyhow::bail!("--loss, --transports, --runs and --streams need at least one");
            }
            if sessions == 0 || rate <= 0.0 || rate_mbit < 0.0 {
                anyhow::bail!("--sessions and --rate must be positive, --rate-mbit not negative");
            }
            if let Some(bad) = loss.iter().find(|l| !(0.0..100.0).contains(*l)) {
                anyhow::bail!("--loss {bad}: a percentage from 0 up to (not including) 100");
            }
            let cfg = LinkRun {
                imp: link::Impairment {
                    delay: delay.into(),
                    loss: 0.0,
                    rate_bps: (rate_mbit * 1e6) as u64,
                    queue: queue.into(),
                },
                losses: loss,
                transports,
                streams,
                sessions,
                rate,
                duration: duration.into(),
                settle: settle.into(),
                loaded,
                runs,
                workers,
            };
            link_cmd(&cfg, cli.json).await
        }
        Scenario::WorkerAgents {
            identities,
            count,
            proxy,
            source_ip,
            transport,
        } => {
            let ids = fleet::load_identities(&identities)?;
            let stats = std::sync::Arc::new(sim_agent::AgentStats::default());
            sim_agent::spawn(
                ids,
                count,
                proxy,
                source_ip,
                std::sync::Arc::clone(&stats),
                transport,
            )?;
            loop {
                tokio::time::sleep(std::time::Duration::from_millis(500)).await;
                let c = stats.connected.load(std::sync::atomic::Ordering::Relaxed);
                let f = stats.failed.load(std::sync::atomic::Ordering::Relaxed);
                let t = stats
                    .last_settled_us
                    .load(std::sync::atomic::Ordering::Relaxed);
                println!("STATUS {c} {f} {t}");
            }
        }
    }
}

/// The echo through the Proxy (the simulated agents' `tcp:echo`) or directly.
fn echo_target(
    path: throughput::Path,
    fleet: &fleet::Fleet,
    echo: std::net::SocketAddr,
) -> throughput::Target {
    let proxy = path == throughput::Path::Proxy;
    throughput::Target {
        path,
        addr: if proxy {
            fleet.proxy_addr.clone()
        } else {
            echo.to_string()
        },
        user: proxy.then(|| fleet.user.clone()),
        jump: None,
    }
}

/// A spawned Auth + Proxy with two simulated agents (sim-0, sim-1) serving sink and echo.
async fn proxy_fleet(
    workers: usize,
    proxy_args: &[&str],
) -> anyhow::Result<(fleet::Fleet, std::sync::Arc<sim_agent::AgentStats>)> {
    proxy_fleet_with(
        workers,
        proxy_args,
        gatehouse_dataplane::io::quic::TunnelTransport::Tls,
    )
    .await
}

/// `proxy_fleet` with the simulated agents' tunnels over `transport`.
async fn proxy_fleet_with(
    workers: usize,
    proxy_args: &[&str],
    transport: gatehouse_dataplane::io::quic::TunnelTransport,
) -> anyhow::Result<(fleet::Fleet, std::sync::Arc<sim_agent::AgentStats>)> {
    proxy_fleet_at(workers, proxy_args, transport, None).await
}

/// `proxy_fleet_with`, the agents reaching the proxy over `link` if there is one (the proxy
/// listens on the link's local address, the agents dial its far end), else on loopback.
async fn proxy_fleet_at(
    workers: usize,
    proxy_args: &[&str],
    transport: gatehouse_dataplane::io::quic::TunnelTransport,
    link: Option<&link::Link>,
) -> anyhow::Result<(fleet::Fleet, std::sync::Arc<sim_agent::AgentStats>)> {
    use std::sync::atomic::Ordering;
    let proxy_ip = link.map_or_else(|| "127.0.0.2".to_string(), |l| l.local.to_string());
    let f = fleet::Fleet::spawn_with(&proxy_ip, workers, proxy_args).await?;
    println!("proxy I/O backend: {}", f.io_backend);
    let ids = f.join_agents(2).await?;
    let stats = std::sync::Arc::new(sim_agent::AgentStats::default());
    let proxy: std::net::SocketAddr = f.proxy_addr.parse()?;
    let (dial, source) = match link {
        None => (proxy, throughput::sink_ip().parse()?),
        Some(l) => {
            l.add_server_port(proxy.port());
            (
                std::net::SocketAddr::new(l.peer.into(), proxy.port()),
                l.local.into(),
            )
        }
    };
    sim_agent::spawn(
        ids,
        2,
        dial,
        source,
        std::sync::Arc::clone(&stats),
        transport,
    )?;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while stats.connected.load(Ordering::Relaxed) < 2 {
        if std::time::Instant::now() > deadline {
            anyhow::bail!("simulated agents did not connect");
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    // The first heartbeat puts the agents' apps in the route table.
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    Ok((f, stats))
}

/// The middle box of one throughput path, started on first use and kept for its runs.
enum Middle {
    None,
    Relay(ChildGuard, String),
    Fleet(Box<(fleet::Fleet, std::sync::Arc<sim_agent::AgentStats>)>),
    Jump(std::sync::Arc<openssh::Sshd>),
    Rathole(rathole::Rathole),
}

/// Start the naive relay (bench/src/bin/naive-relay.rs) in front of `sink`.
fn start_relay(
    sink: std::net::SocketAddr,
    dir: &std::path::Path,
    pems: [&str; 3],
) -> anyhow::Result<(ChildGuard, String)> {
    for (name, text) in ["cert.pem", "key.pem", "ca.pem"].into_iter().zip(pems) {
        std::fs::write(dir.join(name), text)?;
    }
    let exe = std::env::current_exe()?.with_file_name("naive-relay");
    let mut child = std::process::Command::new(&exe)
        .args(["--listen", "127.0.0.3:0", "--upstream", &sink.to_string()])
        .arg("--cert")
        .arg(dir.join("cert.pem"))
        .arg("--key")
        .arg(dir.join("key.pem"))
        .arg("--upstream-ca")
        .arg(dir.join("ca.pem"))
        .stdout(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| {
            anyhow::anyhow!(
                "starting {} (build with cargo build --release --bins): {e}",
                exe.display()
            )
        })?;
    let mut line = String::new();
    if let Some(out) = child.stdout.take() {
        std::io::BufRead::read_line(&mut std::io::BufReader::new(out), &mut line)?;
    }
    let addr = line
        .trim()
        .strip_prefix("LISTENING ")
        .unwrap_or_default()
        .to_string();
    Ok((ChildGuard(child), addr))
}

async fn throughput_cmd(
    streams: usize,
    duration: std::time::Duration,
    runs: usize,
    paths: &[throughput::Path],
    workers: usize,
    direction: throughput::Direction,
    json: Option<PathBuf>,
) -> anyhow::Result<()> {
    use throughput::{Path, Target};
    if streams == 0 || runs == 0 {
        anyhow::bail!("--streams and --runs must be at least 1");
    }
    let (sink, cert, key, ca) =
        throughput::start_sink(&format!("{}:0", throughput::sink_ip()), false)?;
    let dir = tempfile::tempdir()?;
    let mut all = Vec::new();
    let mut summary = Vec::new();
    let mut skipped: Vec<(Path, String)> = Vec::new();
    let mut active = Vec::new();
    let mut backends: Vec<(Path, String)> = Vec::new();
    for &path in paths {
        let middle =
            match path {
                Path::Direct => Ok(Middle::None),
                Path::Naive => start_relay(sink, dir.path(), [&cert, &key, &ca])
                    .map(|(g, a)| Middle::Relay(g, a)),
                Path::Proxy => proxy_fleet(workers, &[])
                    .await
                    .map(|f| Middle::Fleet(Box::new(f))),
                Path::ProxyEpoll => proxy_fleet(workers, &["--proxy-io-backend", "epoll"])
                    .await
                    .map(|f| Middle::Fleet(Box::new(f))),
                Path::ProxyCubic => proxy_fleet(workers, &["--proxy-tcp-congestion", "cubic"])
                    .await
                    .map(|f| Middle::Fleet(Box::new(f))),
                Path::ProxyQuic => proxy_fleet_with(
                    workers,
                    &[],
                    gatehouse_dataplane::io::quic::TunnelTransport::Quic,
                )
                .await
                .map(|f| Middle::Fleet(Box::new(f))),
                Path::Openssh => openssh::Sshd::start("127.0.0.4", None)
                    .map(|s| Middle::Jump(std::sync::Arc::new(s))),
                Path::Rathole => rathole::Rathole::start("127.0.0.5", sink, &cert, &key, &ca)
                    .map(Middle::Rathole),
            };
        // Third-party baselines are optional: without them the run goes on and says why.
        let middle = match middle {
            Ok(m) => m,
            Err(e) if matches!(path, Path::Openssh | Path::Rathole) => {
                println!("throughput {:<7} skipped: {e:#}", path.name());
                skipped.push((path, format!("{e:#}")));
                continue;
            }
            Err(e) => return Err(e),
        };
        let (target, pid) = match &middle {
            Middle::None => (
                Target {
                    path,
                    addr: sink.to_string(),
                    user: None,
                    jump: None,
                },
                None,
            ),
            Middle::Relay(guard, addr) => (
                Target {
                    path,
                    addr: addr.clone(),
                    user: None,
                    jump: None,
                },
                Some(guard.0.id()),
            ),
            Middle::Fleet(f) => (
                Target {
                    path,
                    addr: f.0.proxy_addr.clone(),
                    user: Some(f.0.user.clone()),
                    jump: None,
                },
                Some(f.0.proxy.pid()),
            ),
            Middle::Jump(sshd) => (
                Target {
                    path,
                    addr: sink.to_string(),
                    user: None,
                    jump: Some(std::sync::Arc::clone(sshd)),
                },
                Some(sshd.pid()),
            ),
            Middle::Rathole(r) => (
                Target {
                    path,
                    addr: r.service.to_string(),
                    user: None,
                    jump: None,
                },
                Some(r.server_pid()),
            ),
        };
        if let Middle::Fleet(f) = &middle {
            backends.push((path, f.0.io_backend.clone()));
        }
        active.push((path, middle, target, pid));
    }
    // Rounds: each round runs every path once, so slow drift on a shared machine touches all
    // paths alike instead of whichever ran last.
    for _ in 0..runs {
        for (_path, _middle, target, pid) in &active {
            let r = throughput::run(target, &ca, streams, duration, direction, *pid).await?;
            throughput::print(&r);
            all.push(r);
        }
    }
    for &path in paths {
        if let Some((_, why)) = skipped.iter().find(|(p, _)| *p == path) {
            summary.push(serde_json::json!({
                "scenario": "throughput", "path": path, "skipped": why,
            }));
            continue;
        }
        let runs_of = || all.iter().filter(|r| r.path == path);
        if runs_of().next().is_none() {
            continue;
        }
        let per_cpu: Vec<f64> = runs_of().filter_map(|r| r.gb_per_middle_cpu_s).collect();
        let io_backend = backends.iter().find(|(p, _)| *p == path).map(|(_, b)| b);
        summary.push(serde_json::json!({
            "scenario": "throughput", "path": path, "streams": streams, "runs": runs,
            "direction": direction, "proxy_io_backend": io_backend,
            "median_gb_per_s": median(runs_of().map(|r| r.gb_per_s).collect()),
            "median_gb_per_middle_cpu_s": if per_cpu.is_empty() { None } else { Some(median(per_cpu)) },
        }));
    }
    drop(active);
    println!("medians:");
    for s in &summary {
        println!("  {s}");
    }
    write_json(
        json.as_deref(),
        &serde_json::json!({ "runs": all, "medians": summary }),
    )
}

fn print_sessions(label: &str, r: &latency::SessionsReport) {
    println!(
        "sessions {:<6} {:<7} {label:<6} {:.0}/s ({} ok, {} resumed, {} errors)  p50 {:.2} ms  p99 {:.2} ms{}",
        r.path.name(),
        if r.resumption { "resumed" } else { "full" },
        r.sessions_per_s,
        r.sessions,
        r.resumed,
        r.errors,
        r.p50_ms,
        r.p99_ms,
        r.sessions_per_middle_cpu_s
            .map(|s| format!("  {s:.0} per proxy CPU-second"))
            .unwrap_or_default()
    );
}

struct ChildGuard(std::process::Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
