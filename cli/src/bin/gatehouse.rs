//! `gatehouse`: the daemon. `gatehouse start` runs any mix of the Auth, Proxy and agent roles on
//! the embedded defaults (SQLite and files in `./gatehouse-data`, loopback addresses) or from a
//! TOML config. This file parses flags and config; each role is started by its own crate
//! (`gatehouse_controlplane::role`, `gatehouse_dataplane::role`, `gatehouse_agent::role`) and
//! stopped through the handle it returns.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use clap::{Parser, Subcommand};
use gatehouse_agent::role::{AgentHandle, AgentRoleConfig};
use gatehouse_cli::{RunAddresses, init_logging};
use gatehouse_controlplane::files::{create_private_dir, write_private};
use gatehouse_controlplane::host::JoinParams;
use gatehouse_controlplane::role::{AuthConfig, AuthHandle};
use gatehouse_dataplane::io::{IoBackend, TunnelTransport};
use gatehouse_dataplane::proxy::SessionRate;
use gatehouse_dataplane::role::{ProxyHandle, ProxyRoleConfig};
use gatehouse_diag::Readiness;
use prometheus_client::registry::Registry;
use serde::{Deserialize, Serialize};

#[derive(Parser, Debug)]
#[command(
    name = "gatehouse",
    version,
    about = "Gatehouse access platform daemon"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Start the daemon with the roles given (default: auth).
    Start(StartArgs),
}

#[derive(clap::Args, Debug)]
struct StartArgs {
    /// TOML config file; flags given on the command line override it.
    #[arg(long, short = 'c')]
    config: Option<PathBuf>,
    /// Where state lives (SQLite database, admin identity). Default: ./gatehouse-data
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Cluster name, fixed at first start. Default: this host's name.
    #[arg(long)]
    cluster_name: Option<String>,
    /// Auth API listen address. Default: 127.0.0.1:3025
    #[arg(long)]
    auth_addr: Option<SocketAddr>,
    /// Diagnostics (/healthz, /readyz, /metrics) listen address. Default: 127.0.0.1:3434
    #[arg(long)]
    diag_addr: Option<SocketAddr>,
    /// Roles to run, comma-separated: auth, proxy, agent. Default: all three.
    #[arg(long, value_delimiter = ',')]
    roles: Option<Vec<String>>,
    /// Proxy listen address (the public port). Default: 127.0.0.1:3080
    #[arg(long)]
    proxy_addr: Option<SocketAddr>,
    /// Proxy worker threads (0 = one per core).
    #[arg(long)]
    proxy_workers: Option<usize>,
    /// Proxy I/O backend: auto (io_uring when the kernel allows it), io_uring or epoll.
    #[arg(long, env = "GATEHOUSE_PROXY_IO_BACKEND")]
    proxy_io_backend: Option<IoBackend>,
    /// Proxy: TCP congestion control for the public port's connections, e.g. cubic or bbr.
    /// Default: the host's (net.ipv4.tcp_congestion_control).
    #[arg(long, env = "GATEHOUSE_PROXY_TCP_CONGESTION")]
    proxy_tcp_congestion: Option<String>,
    /// Proxy: new SSH sessions one source address may start, PER_SECOND[/BURST] (0: no limit).
    /// Default 16/64.
    #[arg(long, value_parser = parse_session_rate)]
    proxy_ssh_session_rate: Option<SessionRate>,
    /// Proxy: where agents reach this proxy directly (HOST:PORT), announced to the cluster so
    /// that agents keep a tunnel to every proxy. Default: the proxy listen address when it
    /// names one, else this host's name with its port.
    #[arg(long)]
    proxy_advertise_addr: Option<String>,
    /// For a proxy without a local Auth: the Auth API address, or several comma-separated
    /// (`auth-a:3025,auth-b:3025`: any Auth serves any call; a dead one is skipped).
    #[arg(long)]
    auth: Option<String>,
    /// For an agent without a local proxy: the proxy to dial.
    #[arg(long)]
    proxy: Option<String>,
    /// Join token (a `proxy` token for a proxy, a `node` token for an agent).
    #[arg(long, env = "GATEHOUSE_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// The cluster CA pin (sha256:…), needed to join.
    #[arg(long)]
    ca_pin: Option<String>,
    /// Agent: the node's name. Default: this host's name.
    #[arg(long)]
    node_name: Option<String>,
    /// Agent: labels, e.g. env=dev,team=core.
    #[arg(long, value_delimiter = ',')]
    labels: Option<Vec<String>>,
    /// Agent: how the tunnel reaches the proxy, tls (TCP) or quic (UDP).
    #[arg(long)]
    tunnel_transport: Option<TunnelTransport>,
    /// Agent: TCP congestion control for the tunnel's connection, e.g. cubic or bbr.
    /// Default: the host's (net.ipv4.tcp_congestion_control).
    #[arg(long, env = "GATEHOUSE_AGENT_TCP_CONGESTION")]
    agent_tcp_congestion: Option<String>,
    /// Agent: session recordings kept on disk while Auth has not taken them, at most (e.g.
    /// 1GiB, 500MiB). Default 1GiB.
    #[arg(long)]
    recording_spool_quota: Option<String>,
    /// Agent: a TCP app, NAME=HOST:PORT (repeatable).
    #[arg(long = "app")]
    apps: Vec<String>,
    /// Agent: an app's labels, NAME:KEY=VALUE[,KEY=VALUE...] (repeatable), matched by roles'
    /// `app_labels`.
    #[arg(long = "app-labels")]
    app_labels: Vec<String>,
    /// Log format: text or json.
    #[arg(long)]
    log_format: Option<String>,
    /// Log level filter (tracing EnvFilter syntax), e.g. info or gatehouse=debug.
    #[arg(long)]
    log_level: Option<String>,
}

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct FileConfig {
    data_dir: Option<PathBuf>,
    cluster_name: Option<String>,
    roles: Option<Vec<String>>,
    auth: AuthConfig,
    proxy: ProxySection,
    agent: AgentSection,
    join: JoinSection,
    diag: DiagConfig,
    log: LogConfig,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct ProxySection {
    listen: SocketAddr,
    workers: usize,
    /// `auto` (io_uring when the kernel allows it, else epoll), `io_uring` or `epoll`.
    io_backend: IoBackend,
    /// Accept agent tunnels over QUIC (UDP, same address and port).
    quic: bool,
    /// TCP congestion control for the public port's connections (users' and agents' alike),
    /// e.g. `cubic`; unset keeps the host's default.
    tcp_congestion: Option<String>,
    /// Auth API address when Auth does not run in this process.
    auth_addr: Option<String>,
    /// Extra names/IPs for the proxy certificate.
    public_addrs: Vec<String>,
    /// Where agents reach this proxy directly (HOST:PORT); default: the listen address when it
    /// names one, else this host's name with its port.
    advertise_addr: Option<String>,
    /// New SSH sessions per source address: `{ per_second = 16, burst = 64 }`; 0 turns it off.
    ssh_session_rate: SessionRate,
    /// The certificate chain (PEM) browsers are shown on the web UI, e.g. ACME-issued, with
    /// its key; unset: the cluster's proxy certificate (browsers then warn).
    tls_cert: Option<PathBuf>,
    tls_key: Option<PathBuf>,
    /// Serve the web UI on the public port (HTTPS for browsers).
    web: bool,
}

impl Default for ProxySection {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 3080)),
            workers: 0,
            io_backend: Default::default(),
            quic: true,
            tcp_congestion: None,
            auth_addr: None,
            public_addrs: vec![],
            advertise_addr: None,
            ssh_session_rate: SessionRate::default(),
            tls_cert: None,
            tls_key: None,
            web: true,
        }
    }
}

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct AgentSection {
    /// The proxy to dial; default: the proxy in this process.
    proxy: Option<String>,
    node_name: Option<String>,
    labels: std::collections::BTreeMap<String, String>,
    /// App name → host:port.
    apps: std::collections::BTreeMap<String, String>,
    /// App name → its labels (`[agent.app_labels.grafana] env = "prod"`).
    app_labels: std::collections::BTreeMap<String, std::collections::BTreeMap<String, String>>,
    /// Serve SSH (default true).
    ssh: Option<bool>,
    /// The tunnel's transport: `tls` (TCP, default) or `quic` (UDP, same proxy address).
    transport: TunnelTransport,
    /// TCP congestion control for the tunnel's connection, e.g. `cubic`; unset keeps the
    /// host's default.
    tcp_congestion: Option<String>,
    /// Session recordings kept on disk while Auth has not taken them, at most (e.g. `1GiB`,
    /// `500MiB`, or bytes). Default 1 GiB.
    recording_spool_quota: Option<String>,
}

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct JoinSection {
    token: Option<String>,
    ca_pin: Option<String>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct DiagConfig {
    listen: SocketAddr,
}

impl Default for DiagConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 3434)),
        }
    }
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct LogConfig {
    format: String,
    level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            format: "text".into(),
            level: "info".into(),
        }
    }
}

/// Raise the soft open-files limit to the hard one: a proxy holds a socket per tunnel.
fn raise_nofile() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE)
        && soft < hard
    {
        let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
    }
}

fn main() {
    raise_nofile();
    let cli = Cli::parse();
    let result = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(anyhow::Error::from)
        .and_then(|rt| {
            rt.block_on(async {
                match cli.command {
                    Command::Start(args) => start(args).await,
                }
            })
        });
    if let Err(e) = result {
        eprintln!("gatehouse: error: {e:#}");
        std::process::exit(1);
    }
}

/// SIGTERM or SIGINT (Ctrl-C). The handlers are installed when this is called, not when the
/// future is first polled: a signal that arrives while the roles start is not lost (nor does it
/// kill the process with the default action).
fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let term = signal(SignalKind::terminate()).ok();
        let int = signal(SignalKind::interrupt()).ok();
        async move {
            match (term, int) {
                (Some(mut t), Some(mut i)) => {
                    tokio::select! {
                        _ = t.recv() => {}
                        _ = i.recv() => {}
                    }
                }
                (Some(mut t), None) => {
                    t.recv().await;
                }
                (None, Some(mut i)) => {
                    i.recv().await;
                }
                (None, None) => std::future::pending().await,
            }
        }
    }
    #[cfg(not(unix))]
    async {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// The agent's apps with their labels; labels for an app it does not serve are a mistake.
fn agent_apps(
    agent: &AgentSection,
) -> anyhow::Result<std::collections::BTreeMap<String, gatehouse_agent::apps::App>> {
    if let Some(name) = agent
        .app_labels
        .keys()
        .find(|n| !agent.apps.contains_key(*n))
    {
        anyhow::bail!(
            "labels are given for app `{name}`, but no app of that name is served (--app {name}=HOST:PORT)"
        );
    }
    Ok(agent
        .apps
        .iter()
        .map(|(name, addr)| {
            let app = gatehouse_agent::apps::App {
                addr: addr.clone(),
                labels: agent.app_labels.get(name).cloned().unwrap_or_default(),
            };
            (name.clone(), app)
        })
        .collect())
}

fn parse_kv(
    items: &[String],
    what: &str,
) -> anyhow::Result<std::collections::BTreeMap<String, String>> {
    let mut out = std::collections::BTreeMap::new();
    for item in items.iter().filter(|i| !i.is_empty()) {
        let (k, v) = item
            .split_once('=')
            .with_context(|| format!("{what} `{item}`: expected KEY=VALUE"))?;
        if k.is_empty() {
            anyhow::bail!("{what} `{item}`: empty key");
        }
        out.insert(k.to_owned(), v.to_owned());
    }
    Ok(out)
}

/// `PER_SECOND[/BURST]`, e.g. `16/64`; the burst defaults to four seconds' worth.
fn parse_session_rate(s: &str) -> Result<SessionRate, String> {
    let (rate, burst) = match s.split_once('/') {
        Some((r, b)) => (r, Some(b)),
        None => (s, None),
    };
    let per_second: u32 = rate
        .trim()
        .parse()
        .map_err(|_| format!("`{s}`: expected PER_SECOND[/BURST], e.g. 16/64"))?;
    let burst = match burst {
        Some(b) => b
            .trim()
            .parse()
            .map_err(|_| format!("`{s}`: the burst must be a whole number"))?,
        None => per_second.saturating_mul(4),
    };
    Ok(SessionRate { per_second, burst })
}

fn host_name() -> String {
    std::fs::read_to_string("/etc/hostname")
        .ok()
        .map(|s| s.trim().to_owned())
        .filter(|s| gatehouse_controlplane::resources::validate_name(s).is_ok())
        .unwrap_or_else(|| "node".into())
}

/// A configured congestion-control name; an empty one (`tcp_congestion = ""`, an empty
/// environment variable) means unset: the host's default.
fn congestion_control(name: &Option<String>) -> Option<String> {
    name.clone().filter(|cc| !cc.is_empty())
}

async fn start(args: StartArgs) -> anyhow::Result<()> {
    let mut config = match &args.config {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading config {}", path.display()))?;
            toml::from_str::<FileConfig>(&text)
                .with_context(|| format!("config {}", path.display()))?
        }
        None => FileConfig::default(),
    };
    if let Some(v) = args.data_dir {
        config.data_dir = Some(v);
    }
    if let Some(v) = args.cluster_name {
        config.cluster_name = Some(v);
    }
    if let Some(v) = args.auth_addr {
        config.auth.listen = v;
    }
    if let Some(v) = args.diag_addr {
        config.diag.listen = v;
    }
    if let Some(v) = args.roles {
        config.roles = Some(v);
    }
    if let Some(v) = args.proxy_addr {
        config.proxy.listen = v;
    }
    if let Some(v) = args.proxy_workers {
        config.proxy.workers = v;
    }
    if let Some(v) = args.proxy_io_backend {
        config.proxy.io_backend = v;
    }
    if let Some(v) = args.proxy_tcp_congestion {
        config.proxy.tcp_congestion = Some(v);
    }
    if let Some(v) = args.proxy_ssh_session_rate {
        config.proxy.ssh_session_rate = v;
    }
    if let Some(v) = args.proxy_advertise_addr {
        config.proxy.advertise_addr = Some(v);
    }
    if let Some(v) = args.auth {
        config.proxy.auth_addr = Some(v);
    }
    if let Some(v) = args.proxy {
        config.agent.proxy = Some(v);
    }
    if let Some(v) = args.tunnel_transport {
        config.agent.transport = v;
    }
    if let Some(v) = args.agent_tcp_congestion {
        config.agent.tcp_congestion = Some(v);
    }
    if let Some(v) = args.recording_spool_quota {
        config.agent.recording_spool_quota = Some(v);
    }
    if let Some(v) = args.token {
        config.join.token = Some(v);
    }
    if let Some(v) = args.ca_pin {
        config.join.ca_pin = Some(v);
    }
    if let Some(v) = args.node_name {
        config.agent.node_name = Some(v);
    }
    if let Some(v) = args.labels {
        config.agent.labels.extend(parse_kv(&v, "label")?);
    }
    config.agent.apps.extend(parse_kv(&args.apps, "app")?);
    for item in &args.app_labels {
        let (app, labels) = item.split_once(':').with_context(|| {
            format!("--app-labels `{item}`: expected NAME:KEY=VALUE[,KEY=VALUE]")
        })?;
        let pairs: Vec<String> = labels.split(',').map(str::to_owned).collect();
        config
            .agent
            .app_labels
            .entry(app.to_owned())
            .or_default()
            .extend(parse_kv(&pairs, "app label")?);
    }
    if let Some(v) = args.log_format {
        config.log.format = v;
    }
    if let Some(v) = args.log_level {
        config.log.level = v;
    }
    if !matches!(config.log.format.as_str(), "text" | "json") {
        anyhow::bail!(
            "log format must be text or json, not `{}`",
            config.log.format
        );
    }
    init_logging(&config.log.format, &config.log.level);
    let roles = config
        .roles
        .clone()
        .unwrap_or_else(|| vec!["auth".into(), "proxy".into(), "agent".into()]);
    for r in &roles {
        if !matches!(r.as_str(), "auth" | "proxy" | "agent") {
            anyhow::bail!(
                "role `{r}` is not available in this version; available: auth, proxy, agent"
            );
        }
    }
    let has = |r: &str| roles.iter().any(|x| x == r);
    if has("proxy") && !has("auth") && config.proxy.auth_addr.is_none() {
        anyhow::bail!(
            "a proxy without a local Auth needs --auth ADDR (and --token, --ca-pin to join)"
        );
    }
    if has("agent") && !has("proxy") && config.agent.proxy.is_none() {
        anyhow::bail!(
            "an agent without a local proxy needs --proxy ADDR (and --token, --ca-pin to join)"
        );
    }
    let data_dir = config
        .data_dir
        .clone()
        .unwrap_or_else(|| PathBuf::from("gatehouse-data"));
    create_private_dir(&data_dir)
        .with_context(|| format!("creating data dir {}", data_dir.display()))?;
    let node_name = config.agent.node_name.clone().unwrap_or_else(host_name);
    let join = JoinParams {
        token: config.join.token.clone(),
        ca_pin: config.join.ca_pin.clone(),
    };

    let stop = shutdown_signal();
    tokio::pin!(stop);
    // Diagnostics first: /healthz answers and /readyz says "not ready" while the roles start
    // (Auth may wait for its database); /metrics fills in once they have.
    let ready = Readiness::default();
    let metrics = gatehouse_diag::Metrics::default();
    let (diag_addr, diag_server) =
        gatehouse_diag::bind(config.diag.listen, metrics.clone(), ready.clone())
            .await
            .with_context(|| format!("binding diagnostics on {}", config.diag.listen))?;
    let diag_task = tokio::spawn(diag_server);
    tracing::info!(diag = %diag_addr, "gatehouse: diagnostics listening; starting roles");

    let mut registry = Registry::default();
    let mut auth: Option<AuthHandle> = None;
    if has("auth") {
        // Auth may wait for its database for as long as it is away: a signal ends the wait.
        let started = gatehouse_controlplane::role::start(
            &data_dir,
            config.cluster_name.as_deref(),
            &config.auth,
            &mut registry,
        );
        tokio::select! {
            r = started => auth = Some(r?),
            () = &mut stop => {
                tracing::info!("gatehouse stopped before Auth started");
                diag_task.abort();
                return Ok(());
            }
        }
    }
    let local_auth = auth.as_ref().map(|a| a.service().clone());
    let auth_addr = match &auth {
        Some(a) => a.info.listen.to_string(),
        None => config.proxy.auth_addr.clone().unwrap_or_default(),
    };
    let mut cluster = auth
        .as_ref()
        .map(|a| a.info.cluster.clone())
        .unwrap_or_default();

    let mut proxy: Option<ProxyHandle> = None;
    if has("proxy") {
        let role = ProxyRoleConfig {
            data_dir: data_dir.clone(),
            listen: config.proxy.listen,
            workers: config.proxy.workers,
            io_backend: config.proxy.io_backend,
            quic: config.proxy.quic,
            tcp_congestion: congestion_control(&config.proxy.tcp_congestion),
            auth_addr: auth_addr.clone(),
            host_name: node_name.clone(),
            public_addrs: config.proxy.public_addrs.clone(),
            join: join.clone(),
            ssh_session_rate: config.proxy.ssh_session_rate,
            advertise_addr: config.proxy.advertise_addr.clone(),
            browser_cert: match (&config.proxy.tls_cert, &config.proxy.tls_key) {
                (Some(c), Some(k)) => Some((c.clone(), k.clone())),
                (None, None) => None,
                _ => anyhow::bail!("[proxy] tls_cert and tls_key go together"),
            },
        };
        let started =
            gatehouse_dataplane::role::start(role, local_auth.as_ref(), &mut registry).await?;
        if config.proxy.web {
            let mut web_config = gatehouse_web::WebConfig::new(
                started.cluster.clone(),
                Arc::clone(&started.ca_pem),
                started.auth_addr.clone(),
                started.addr,
            );
            web_config.client_addr = Some(Arc::clone(&started.client_addr));
            web_config.local_clients = Some(Arc::clone(&started.local_clients));
            let web = gatehouse_web::WebUi::new(web_config);
            started.serve_browsers(web);
        }
        cluster = started.cluster.clone();
        proxy = Some(started);
    }
    let proxy_addr = proxy
        .as_ref()
        .map(|p| p.addr.to_string())
        .or_else(|| config.agent.proxy.clone())
        .unwrap_or_default();

    let mut agent: Option<AgentHandle> = None;
    if has("agent") {
        let role = AgentRoleConfig {
            data_dir: data_dir.join("agent"),
            proxy_addr: proxy_addr.clone(),
            node_name: node_name.clone(),
            labels: config.agent.labels.clone(),
            apps: agent_apps(&config.agent)?,
            addresses: vec![],
            ssh: config.agent.ssh.unwrap_or(true),
            transport: config.agent.transport,
            tcp_congestion: congestion_control(&config.agent.tcp_congestion),
            join,
            recording_quota: match &config.agent.recording_spool_quota {
                Some(q) => parse_size(q)
                    .with_context(|| format!("[agent] recording_spool_quota = {q:?}"))?,
                None => gatehouse_agent::role::DEFAULT_RECORDING_QUOTA,
            },
        };
        let started = gatehouse_agent::role::start(role, local_auth.as_ref()).await?;
        if cluster.is_empty() {
            cluster = started.cluster.clone();
        }
        agent = Some(started);
    }

    if let Some(a) = &agent {
        a.status.register(&mut registry);
        if let Some(r) = &a.recordings {
            r.metrics.register(&mut registry);
        }
        let status = Arc::clone(&a.status);
        ready.add_check(Box::new(move || {
            if status.is_connected() {
                Ok(())
            } else {
                Err("agent tunnel is down".into())
            }
        }));
    }
    metrics.set(registry);

    let run = RunAddresses {
        auth: auth.as_ref().map(|a| a.info.listen.to_string()),
        diag: Some(diag_addr.to_string()),
        proxy: proxy.as_ref().map(|p| p.addr.to_string()),
    };
    create_private_dir(&data_dir.join("run"))?;
    write_private(
        &RunAddresses::path(&data_dir),
        serde_json::to_string_pretty(&run)?.as_bytes(),
    )?;

    tracing::info!(cluster = %cluster, roles = ?roles, auth = ?run.auth, proxy = ?run.proxy, diag = %diag_addr, "gatehouse started");
    let hint = if data_dir.as_os_str() == "gatehouse-data" {
        String::new()
    } else {
        format!(" --data-dir {}", data_dir.display())
    };
    let me = std::env::var("USER")
        .ok()
        .filter(|u| !u.is_empty())
        .unwrap_or_else(|| "root".into());
    let mut banner = format!(
        "Gatehouse cluster \"{cluster}\" is running (roles: {}).\n\n",
        roles.join(", ")
    );
    if let Some(p) = &auth {
        if p.info.first_start {
            banner = format!(
                "Gatehouse cluster \"{cluster}\" is running (roles: {}) (new cluster: CAs created).\n\n",
                roles.join(", ")
            );
        }
        banner.push_str(&format!(
            "  Auth API:     {}\n  CA pin:       {}\n",
            p.info.listen, p.info.ca_pin
        ));
    }
    if let Some(p) = &proxy {
        banner.push_str(&format!("  Proxy:        {}\n", p.addr));
        banner.push_str(&format!("  Proxy I/O:    {}\n", p.io_backend));
    }
    if agent.is_some() {
        banner.push_str(&format!(
            "  Agent:        node \"{node_name}\" via {proxy_addr}\n"
        ));
    }
    banner.push_str(&format!(
        "  Diagnostics:  http://{diag_addr}/metrics\n  Data dir:     {}\n",
        data_dir.display()
    ));
    if let (Some(p), Some(px)) = (&auth, &proxy) {
        banner.push_str(&format!(
            "\nNext, in another terminal:\n  gctl{hint} users add alice --roles access,editor --logins {me}\n  gsh login --proxy {} --user alice --ca-pin {}\n",
            px.addr, p.info.ca_pin
        ));
        if agent.is_some() {
            banner.push_str(&format!("  gsh ssh {me}@{node_name} echo hello\n"));
        }
    } else if let Some(p) = &auth {
        banner.push_str(&format!(
            "\nNext, in another terminal:\n  gctl{hint} users add alice --roles access,editor --logins {me}\n  gsh login --auth {} --user alice --ca-pin {}\n",
            p.info.listen, p.info.ca_pin
        ));
    }
    println!("{banner}");
    ready.set(true);
    // Until a signal, or until the Auth API fails on its own.
    let failed = match auth.as_mut() {
        Some(a) => tokio::select! {
            () = &mut stop => None,
            r = a.failed() => Some(r),
        },
        None => {
            stop.await;
            None
        }
    };
    ready.set(false);
    // In the reverse order of start: the agent's tunnel first (so it does not try to reconnect
    // to a proxy that is leaving), then the proxy (a go-away to its other agents), then Auth.
    if let Some(a) = agent {
        a.shutdown();
    }
    if let Some(p) = proxy {
        p.leave().await;
        p.shutdown();
    }
    let result = match (failed, auth) {
        (Some(r), _) => r,
        (None, Some(a)) => a.shutdown().await,
        (None, None) => Ok(()),
    };
    diag_task.abort();
    tracing::info!("gatehouse stopped");
    Ok(result?)
}

/// `1GiB`, `500MiB`, `64KiB`, `1000000`.
fn parse_size(s: &str) -> anyhow::Result<u64> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (n, unit) = s.split_at(split);
    let n: u64 = n
        .parse()
        .context("expected a number of bytes, e.g. 1GiB or 500MiB")?;
    let mult: u64 = match unit.trim() {
        "" | "B" => 1,
        "KiB" | "K" | "KB" => 1 << 10,
        "MiB" | "M" | "MB" => 1 << 20,
        "GiB" | "G" | "GB" => 1 << 30,
        "TiB" | "T" | "TB" => 1 << 40,
        other => anyhow::bail!("unknown unit `{other}` (use B, KiB, MiB, GiB, TiB)"),
    };
    n.checked_mul(mult).context("too large")
}
