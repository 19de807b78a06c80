//! `loadgen`: Gatehouse's bundled load generator. Scenarios: `logins` (Auth); `tunnels`,
//! `throughput`, `latency`, `sessions` and `ssh` (the Proxy, with their baselines); `link` (the
//! agents' tunnel transports over an emulated lossy link).

mod fleet;
mod latency;
mod link;
mod logins;
mod openssh;
mod procstat;
mod progress;
mod rathole;
mod sim_agent;
mod spawn;
mod ssh;
mod throughput;
mod tunnels;

use std::path::PathBuf;

use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(name = "loadgen", version, about = "Gatehouse load generator")]
struct Cli {
    /// Write the report as JSON to this file too.
    #[arg(long, global = true)]
    json: Option<PathBuf>,
    #[command(subcommand)]
    scenario: Scenario,
}

#[derive(Subcommand, Debug)]
enum Scenario {
    /// Password logins per second against Auth: each login verifies an argon2id hash, signs an
    /// SSH and an X.509 certificate and stores two audit events durably.
    Logins {
        /// Start a throwaway cluster (gatehouse and gctl next to this binary) and a user.
        #[arg(long, conflicts_with_all = ["auth", "ca_pin", "user"])]
        spawn: bool,
        /// Auth API address of a running cluster.
        #[arg(long, required_unless_present = "spawn")]
        auth: Option<String>,
        /// The cluster's CA pin.
        #[arg(long, required_unless_present = "spawn")]
        ca_pin: Option<String>,
        #[arg(long, required_unless_present = "spawn")]
        user: Option<String>,
        /// The user's password (or set LOADGEN_PASSWORD).
        #[arg(long, env = "LOADGEN_PASSWORD", hide_env_values = true)]
        password: Option<String>,
        /// PID of the Auth process, to report its CPU use (known with --spawn).
        #[arg(long)]
        auth_pid: Option<u32>,
        /// Concurrent clients, each with its own connection.
        #[arg(long, default_value_t = 8)]
        concurrency: usize,
        /// How long to run.
        #[arg(long, default_value = "10s")]
        duration: humantime::Duration,
    },
    /// Simulated agents hold idle tunnels (real TLS, real joined certificates, heartbeats):
    /// connect rate, Proxy memory per tunnel and Proxy CPU while idle. Spawns its own cluster.
    Tunnels {
        /// Tunnels to hold.
        #[arg(long, default_value_t = 1000)]
        count: usize,
        /// Generator processes (each from its own 127.0.0.x address; ≤ 10k tunnels each).
        #[arg(long, default_value_t = 2)]
        procs: usize,
        /// Joined identities the simulated agents share (each joins with a real token).
        #[arg(long, default_value_t = 16)]
        identities: usize,
        /// How long to hold the tunnels idle while measuring CPU.
        #[arg(long, default_value = "10s")]
        hold: humantime::Duration,
        /// Proxy worker threads (0 = one per core).
        #[arg(long, default_value_t = 0)]
        workers: usize,
        /// The agents' tunnel transport: tls or quic.
        #[arg(long, default_value = "tls")]
        transport: gatehouse_dataplane::io::quic::TunnelTransport,
        /// Rounds, each on a freshly started cluster. The report gives every round and the
        /// medians.
        #[arg(long, default_value_t = 1)]
        runs: usize,
    },
    /// Bulk streams client -> middle -> sink over TLS, for each path (proxy, direct, naive
    /// relay): GB/s and GB per CPU-second of the middle box. Spawns its own cluster.
    Throughput {
        /// Concurrent streams.
        #[arg(long, default_value_t = 4)]
        streams: usize,
        /// How long each run lasts.
        #[arg(long, default_value = "5s")]
        duration: humantime::Duration,
        /// Rounds; each round runs every path once, in turn (so drift on a shared machine
        /// touches all paths alike). The report gives each path's median.
        #[arg(long, default_value_t = 3)]
        runs: usize,
        /// Paths to measure.
        #[arg(long, value_delimiter = ',', default_value = "direct,naive,proxy")]
        paths: Vec<throughput::Path>,
        /// Proxy worker threads (0 = one per core).
        #[arg(long, default_value_t = 0)]
        workers: usize,
        /// Which way the bytes flow: `upload` (client to sink: at the proxy TLS in, tunnel out)
        /// or `download` (a source to the client: tunnel in, TLS out).
        #[arg(long, value_enum, default_value_t = throughput::Direction::Upload)]
        direction: throughput::Direction,
    },
    /// Fixed-rate 64-byte request/response over K sessions through an echo, proxy beside direct:
    /// p50/p99/p99.9/max, coordinated-omission corrected, and the latency the proxy adds.
    Latency {
        #[arg(long, default_value_t = 32)]
        sessions: usize,
        /// Total requests per second over all sessions.
        #[arg(long, default_value_t = 20000.0)]
        rate: f64,
        #[arg(long, default_value = "10s")]
        duration: humantime::Duration,
        #[arg(long, default_value_t = 0)]
        workers: usize,
        /// Rounds; each runs direct, then the proxy (so drift on a shared machine touches both
        /// alike). The report gives every round and the medians.
        #[arg(long, default_value_t = 3)]
        runs: usize,
    },
    /// New sessions as fast as C workers can open them (TLS handshake, route, stream open, one
    /// byte echoed, close), proxy beside direct TLS: sessions/s, latency, per proxy CPU-second.
    Sessions {
        #[arg(long, default_value_t = 8)]
        concurrency: usize,
        #[arg(long, default_value = "5s")]
        duration: humantime::Duration,
        #[arg(long, default_value_t = 0)]
        workers: usize,
        /// Which handshakes to measure: `full` (every session a new client), `resumed` (one
        /// client resuming each session with its previous ticket), or both.
        #[arg(long, value_delimiter = ',', default_value = "full,resumed")]
        handshakes: Vec<Handshakes>,
        /// Rounds; each runs every path and handshake kind once, in turn. The report gives
        /// every run and the medians.
        #[arg(long, default_value_t = 3)]
        runs: usize,
        /// Paths to measure: direct (TLS straight to the echo), proxy, or both.
        #[arg(long, value_delimiter = ',', default_value = "direct,proxy")]
        paths: Vec<SessionPath>,
    },
    /// Real SSH with the user's certificate (russh client): new sessions per second (TLS + SSH
    /// handshake, certificate auth, `exec true`, exit status) and one channel's bulk upload,
    /// through the Proxy to a real agent process beside the same client straight to a loopback
    /// OpenSSH sshd that trusts the cluster's user CA. Logs in as the user running loadgen.
    Ssh {
        /// Workers opening sessions back to back.
        #[arg(long, default_value_t = 8)]
        concurrency: usize,
        /// How long each measurement lasts (bulk: at most 5 s).
        #[arg(long, default_value = "5s")]
        duration: humantime::Duration,
        #[arg(long, default_value_t = 0)]
        workers: usize,
    },
    /// The agents' tunnel transports (TLS over TCP, QUIC) over an emulated wide-area link with
    /// delay, a rate and random loss (a TUN device; needs root): per loss rate and transport,
    /// one download's throughput through a tunnel, then request/response latency through it.
    /// Spawns its own cluster, one Proxy per transport, both behind the same link.
    Link {
        /// One-way delay each direction (the round trip is twice this).
        #[arg(long, default_value = "20ms")]
        delay: humantime::Duration,
        /// Packet loss rates to measure, in percent, each direction.
        #[arg(long, value_delimiter = ',', default_value = "0,0.5,2")]
        loss: Vec<f64>,
        /// The link's rate each direction, Mbit/s (0: unlimited).
        #[arg(long, default_value_t = 100.0)]
        rate_mbit: f64,
        /// The longest a packet queues for the rate before the link drops it.
        #[arg(long, default_value = "40ms")]
        queue: humantime::Duration,
        /// Tunnel transports to measure.
        #[arg(long, value_delimiter = ',', default_value = "tls,quic")]
        transports: Vec<gatehouse_dataplane::io::quic::TunnelTransport>,
        /// Download streams for the throughput part.
        #[arg(long, default_value_t = 1)]
        streams: usize,
        /// Sessions for the latency part. Each has one request outstanding at a time, so a
        /// session's share of the rate must leave room for the round trip.
        #[arg(long, default_value_t = 64)]
        sessions: usize,
        /// Requests per second over all sessions, for the latency part.
        #[arg(long, default_value_t = 400.0)]
        rate: f64,
        /// How long each part lasts.
        #[arg(long, default_value = "10s")]
        duration: humantime::Duration,
        /// Before the rounds of each loss rate, a download through every tunnel for this long,
        /// not measured, so each congestion controller settles to the new loss rate.
        #[arg(long, default_value = "5s")]
        settle: humantime::Duration,
        /// Rounds per loss rate; each measures every transport once, in turn.
        #[arg(long, default_value_t = 1)]
        runs: usize,
        /// Then measure the requests again while a download runs through the same tunnel.
        #[arg(long)]
        loaded: bool,
        #[arg(long, default_value_t = 0)]
        workers: usize,
    },
    /// (internal) a generator worker process holding simulated agents' tunnels.
    #[command(hide = true)]
    WorkerAgents {
        #[arg(long)]
        identities: PathBuf,
        #[arg(long)]
        count: usize,
        #[arg(long)]
        proxy: std::net::SocketAddr,
        #[arg(long)]
        source_ip: std::net::IpAddr,
        #[arg(long, default_value = "tls")]
        transport: gatehouse_dataplane::io::quic::TunnelTransport,
    },
}

/// Raise the soft open-files limit to the hard one: thousands of tunnels need thousands of fds.
fn raise_nofile() {
    if let Ok((_, hard)) =
        nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
    {
        let _ =
            nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE, hard, hard);
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

/// The median of integers (the upper middle one of an even number; 0 of none).
fn median_int<T: Ord + Copy + Default>(mut v: Vec<T>) -> T {
    v.sort_unstable();
    v.get(v.len() / 2).copied().unwrap_or_default()
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
        Scenario::Ssh {
            concurrency,
            duration,
            workers,
        } => {
            if concurrency == 0 {
                anyhow::bail!("--concurrency must be at least 1");
            }
            ssh_cmd(concurrency, duration.into(), workers, cli.json).await
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

async fn ssh_cmd(
    concurrency: usize,
    duration: std::time::Duration,
    workers: usize,
    json: Option<PathBuf>,
) -> anyhow::Result<()> {
    let login = openssh::current_login()?;
    let fleet = fleet::Fleet::spawn("127.0.0.2", workers).await?;
    let user = fleet.user("sshbench", &login).await?;
    let agent = fleet.start_agent("bench-node", "127.0.0.6")?;
    let mut reports = Vec::new();
    let gatehouse = ssh::SshTarget {
        path: ssh::SshPath::Gatehouse,
        addr: fleet.proxy_addr.clone(),
        node: "bench-node".into(),
        login: login.clone(),
        user: user.clone(),
    };
    ssh::wait_ready(&gatehouse, std::time::Duration::from_secs(30)).await?;
    let r = ssh::run(
        &gatehouse,
        concurrency,
        duration,
        &[fleet.proxy.pid(), agent.pid()],
    )
    .await?;
    ssh::print(&r);
    reports.push(serde_json::to_value(&r)?);
    drop(agent);
    match openssh::Sshd::start("127.0.0.4", Some(&user.ssh_user_ca.join("\n"))) {
        Ok(sshd) => {
            let direct = ssh::SshTarget {
                path: ssh::SshPath::Openssh,
                addr: sshd.addr.to_string(),
                ..gatehouse
            };
            ssh::wait_ready(&direct, std::time::Duration::from_secs(10)).await?;
            let r = ssh::run(&direct, concurrency, duration, &[sshd.pid()]).await?;
            ssh::print(&r);
            reports.push(serde_json::to_value(&r)?);
        }
        Err(e) => {
            println!("ssh openssh   skipped: {e:#}");
            reports.push(serde_json::json!({"scenario": "ssh", "path": "openssh", "skipped": format!("{e:#}")}));
        }
    }
    write_json(json.as_deref(), &reports)
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

/// The handshakes `loadgen sessions` measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Handshakes {
    Full,
    Resumed,
}

/// The paths `loadgen sessions` measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum SessionPath {
    Direct,
    Proxy,
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

/// `loadgen link`'s settings.
struct LinkRun {
    /// The link's impairment but for the loss, which `losses` sets in turn.
    imp: link::Impairment,
    /// In percent.
    losses: Vec<f64>,
    transports: Vec<gatehouse_dataplane::io::quic::TunnelTransport>,
    streams: usize,
    sessions: usize,
    rate: f64,
    duration: std::time::Duration,
    /// The download before each loss rate's rounds, not measured.
    settle: std::time::Duration,
    /// Also measure the requests while a download shares their tunnel.
    loaded: bool,
    runs: usize,
    workers: usize,
}

/// One loss rate and transport of one round of `loadgen link`.
#[derive(Debug, serde::Serialize)]
struct LinkMeasure {
    round: usize,
    loss_pct: f64,
    transport: gatehouse_dataplane::io::quic::TunnelTransport,
    /// The download through the tunnel: agent → link → proxy → client.
    download_mbit_per_s: f64,
    download_link: link::LinkStats,
    latency: latency::LatencyReport,
    latency_link: link::LinkStats,
    /// With `--loaded`: the requests again while a download shares their tunnel.
    #[serde(skip_serializing_if = "Option::is_none")]
    loaded: Option<LoadedMeasure>,
}

#[derive(Debug, serde::Serialize)]
struct LoadedMeasure {
    download_mbit_per_s: f64,
    latency: latency::LatencyReport,
}

async fn link_cmd(cfg: &LinkRun, json: Option<PathBuf>) -> anyhow::Result<()> {
    use gatehouse_dataplane::io::quic::TunnelTransport;
    let link = link::Link::start(cfg.imp, 0)?;
    println!(
        "link {}: agents at {} reach proxies at {} via {}; one-way delay {:?}, {}, queue {:?}",
        link.name,
        link.local,
        link.local,
        link.peer,
        cfg.imp.delay,
        if cfg.imp.rate_bps > 0 {
            format!("{:.0} Mbit/s", cfg.imp.rate_bps as f64 / 1e6)
        } else {
            "no rate limit".into()
        },
        cfg.imp.queue
    );
    let mut fleets = Vec::new();
    for &t in &cfg.transports {
        let fleet = proxy_fleet_at(cfg.workers, &[], t, Some(&link)).await?;
        fleets.push((t, fleet));
    }
    let target = |transport: &TunnelTransport, fleet: &fleet::Fleet| throughput::Target {
        path: match transport {
            TunnelTransport::Tls => throughput::Path::Proxy,
            TunnelTransport::Quic => throughput::Path::ProxyQuic,
        },
        addr: fleet.proxy_addr.clone(),
        user: Some(fleet.user.clone()),
        jump: None,
    };
    // The tunnels live through the whole run, and a congestion controller carries its state from
    // one loss rate to the next (cubic takes many seconds to regrow a window that 2 % loss cut).
    // So the loss rates go in rising order, each after a download that lets every tunnel settle
    // to it; the rounds of one loss rate then interleave the transports.
    let download = async |target: &throughput::Target, how_long| {
        let d = throughput::Direction::Download;
        throughput::run(target, "", cfg.streams, how_long, d, None).await
    };
    let requests = async |target: &throughput::Target| {
        latency::latency(target, "", cfg.sessions, cfg.rate, cfg.duration, true).await
    };
    // Between parts the link goes quiet: a download's tail (its last window in flight, what the
    // agent's socket still held) would otherwise meet the next part's first requests. Quiet is
    // fewer than 4 packets in 100 ms, both ways (heartbeats and keep-alives); at most 5 s.
    let quiet = async || {
        let give_up = std::time::Instant::now() + std::time::Duration::from_secs(5);
        let mut before = link.stats();
        while std::time::Instant::now() < give_up {
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            let now = link.stats();
            let d = now.since(&before);
            if d.up.packets + d.down.packets < 4 {
                break;
            }
            before = now;
        }
    };
    let mut losses = cfg.losses.clone();
    losses.sort_by(f64::total_cmp);
    losses.dedup();
    let mut all: Vec<LinkMeasure> = Vec::new();
    for &loss in &losses {
        link.set_impairment(link::Impairment {
            loss: loss / 100.0,
            ..cfg.imp
        });
        for (transport, (fleet, _)) in &fleets {
            let settle = download(&target(transport, fleet), cfg.settle).await?;
            println!(
                "link settling at {loss}% loss: {transport} {:.1} Mbit/s",
                settle.gb_per_s * 8000.0
            );
        }
        for round in 1..=cfg.runs {
            for (transport, (fleet, _)) in &fleets {
                let target = target(transport, fleet);
                let s0 = link.stats();
                let bulk = download(&target, cfg.duration).await?;
                quiet().await;
                let s1 = link.stats();
                let lat = requests(&target).await?;
                let s2 = link.stats();
                // The same requests while a download shares their tunnel: what an interactive
                // session feels while a transfer runs through the same agent.
                let loaded = if cfg.loaded {
                    quiet().await;
                    let (bulk, lat) = tokio::join!(
                        download(&target, cfg.duration + std::time::Duration::from_secs(1)),
                        async {
                            // The download first fills the path.
                            tokio::time::sleep(std::time::Duration::from_millis(500)).await;
                            requests(&target).await
                        }
                    );
                    Some(LoadedMeasure {
                        download_mbit_per_s: bulk?.gb_per_s * 8000.0,
                        latency: lat?,
                    })
                } else {
                    None
                };
                let m = LinkMeasure {
                    round,
                    loss_pct: loss,
                    transport: *transport,
                    download_mbit_per_s: bulk.gb_per_s * 8000.0,
                    download_link: s1.since(&s0),
                    latency: lat,
                    latency_link: s2.since(&s1),
                    loaded,
                };
                print_link(&m);
                all.push(m);
            }
        }
    }
    drop(fleets);
    println!("medians of {} round(s):", cfg.runs);
    let mut medians = Vec::new();
    for &loss in &losses {
        for &t in &cfg.transports {
            let of = || {
                all.iter()
                    .filter(move |m| m.loss_pct == loss && m.transport == t)
            };
            let row = serde_json::json!({
                "loss_pct": loss,
                "transport": t,
                "download_mbit_per_s": median(of().map(|m| m.download_mbit_per_s).collect()),
                "p50_us": median_int(of().map(|m| m.latency.p50_us).collect()),
                "p99_us": median_int(of().map(|m| m.latency.p99_us).collect()),
                "p999_us": median_int(of().map(|m| m.latency.p999_us).collect()),
                "max_us": median_int(of().map(|m| m.latency.max_us).collect()),
            });
            let loaded: Vec<&LoadedMeasure> = of().filter_map(|m| m.loaded.as_ref()).collect();
            let row = if loaded.is_empty() {
                row
            } else {
                let med = |f: fn(&LoadedMeasure) -> u64| {
                    median_int(loaded.iter().map(|l| f(l)).collect())
                };
                let mut row = row;
                if let Some(o) = row.as_object_mut() {
                    o.insert(
                        "loaded".into(),
                        serde_json::json!({
                            "download_mbit_per_s": median(loaded.iter().map(|l| l.download_mbit_per_s).collect()),
                            "p50_us": med(|l| l.latency.p50_us),
                            "p99_us": med(|l| l.latency.p99_us),
                            "p999_us": med(|l| l.latency.p999_us),
                            "max_us": med(|l| l.latency.max_us),
                        }),
                    );
                }
                row
            };
            println!("  {row}");
            medians.push(row);
        }
    }
    write_json(
        json.as_deref(),
        &serde_json::json!({
            "scenario": "link",
            "impairment": cfg.imp,
            "streams": cfg.streams,
            "sessions": cfg.sessions,
            "rate_per_s": cfg.rate,
            "runs": all,
            "medians": medians,
        }),
    )
}

fn print_link(m: &LinkMeasure) {
    let share = |d: &link::DirStats| 100.0 * d.lost as f64 / d.packets.max(1) as f64;
    let ms = |us: u64| us as f64 / 1000.0;
    println!(
        "link round {} loss {:>4}% {:<4}  download {:>7.1} Mbit/s (up {} packets, {:.2} % lost, {} dropped at the queue)  latency p50 {:.1} ms  p99 {:.1} ms  p99.9 {:.1} ms  max {:.1} ms ({} requests)",
        m.round,
        m.loss_pct,
        m.transport,
        m.download_mbit_per_s,
        m.download_link.up.packets,
        share(&m.download_link.up),
        m.download_link.up.dropped,
        ms(m.latency.p50_us),
        ms(m.latency.p99_us),
        ms(m.latency.p999_us),
        ms(m.latency.max_us),
        m.latency.requests,
    );
    if let Some(l) = &m.loaded {
        println!(
            "link round {} loss {:>4}% {:<4}  with a download beside ({:.1} Mbit/s): latency p50 {:.1} ms  p99 {:.1} ms  p99.9 {:.1} ms  max {:.1} ms",
            m.round,
            m.loss_pct,
            m.transport,
            l.download_mbit_per_s,
            ms(l.latency.p50_us),
            ms(l.latency.p99_us),
            ms(l.latency.p999_us),
            ms(l.latency.max_us),
        );
    }
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

/// `--json FILE`: the report, pretty-printed.
fn write_json(
    path: Option<&std::path::Path>,
    report: &impl serde::Serialize,
) -> anyhow::Result<()> {
    if let Some(path) = path {
        std::fs::write(path, serde_json::to_string_pretty(report)?)?;
    }
    Ok(())
}

struct ChildGuard(std::process::Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
