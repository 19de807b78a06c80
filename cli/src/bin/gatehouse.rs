//! `gatehouse`: the daemon. `gatehouse start` runs the Auth role on the embedded defaults
//! (SQLite and files in `./gatehouse-data`, Auth API on 127.0.0.1:3025) or from a TOML config.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use clap::{Parser, Subcommand};
use gatehouse_cli::{RunAddresses, init_logging};
use gatehouse_controlplane::daemon::{self, AuthConfig};
use gatehouse_controlplane::diag::{self, Readiness};
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
    proxy_io_backend: Option<gatehouse_agent::dataplane::socket::IoBackend>,
    /// Proxy: TCP congestion control for the public port's connections, e.g. cubic or bbr.
    /// Default: the host's (net.ipv4.tcp_congestion_control).
    #[arg(long, env = "GATEHOUSE_PROXY_TCP_CONGESTION")]
    proxy_tcp_congestion: Option<String>,
    /// For a proxy without a local Auth: the Auth API address.
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
    tunnel_transport: Option<gatehouse_agent::dataplane::quic::TunnelTransport>,
    /// Agent: TCP congestion control for the tunnel's connection, e.g. cubic or bbr.
    /// Default: the host's (net.ipv4.tcp_congestion_control).
    #[arg(long, env = "GATEHOUSE_AGENT_TCP_CONGESTION")]
    agent_tcp_congestion: Option<String>,
    /// Agent: a TCP app, NAME=HOST:PORT (repeatable).
    #[arg(long = "app")]
    apps: Vec<String>,
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
    io_backend: gatehouse_agent::dataplane::socket::IoBackend,
    /// Accept agent tunnels over QUIC (UDP, same address and port).
    quic: bool,
    /// TCP congestion control for the public port's connections (users' and agents' alike),
    /// e.g. `cubic`; unset keeps the host's default.
    tcp_congestion: Option<String>,
    /// Auth API address when Auth does not run in this process.
    auth_addr: Option<String>,
    /// Extra names/IPs for the proxy certificate.
    public_addrs: Vec<String>,
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
    /// Serve SSH (default true).
    ssh: Option<bool>,
    /// The tunnel's transport: `tls` (TCP, default) or `quic` (UDP, same proxy address).
    transport: gatehouse_agent::dataplane::quic::TunnelTransport,
    /// TCP congestion control for the tunnel's connection, e.g. `cubic`; unset keeps the
    /// host's default.
    tcp_congestion: Option<String>,
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

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
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
    gatehouse_controlplane::daemon::create_private_dir(&data_dir)
        .with_context(|| format!("creating data dir {}", data_dir.display()))?;
    let node_name = config.agent.node_name.clone().unwrap_or_else(host_name);
    let join = gatehouse_cli::roles::JoinParams {
        token: config.join.token.clone(),
        ca_pin: config.join.ca_pin.clone(),
    };

    let mut registry = diag::Registry::default();
    let prepared = if has("auth") {
        Some(
            daemon::prepare(
                &data_dir,
                config.cluster_name.as_deref(),
                &config.auth,
                &mut registry,
            )
            .await?,
        )
    } else {
        None
    };
    let local_auth = prepared.as_ref().map(|p| p.service().clone());
    let auth_addr = match &prepared {
        Some(p) => p.info.listen.to_string(),
        None => config.proxy.auth_addr.clone().unwrap_or_default(),
    };

    let mut proxy = None;
    let mut cluster = prepared
        .as_ref()
        .map(|p| p.info.cluster.clone())
        .unwrap_or_default();
    if has("proxy") {
        let mut sans = config.proxy.public_addrs.clone();
        if !config.proxy.listen.ip().is_unspecified() {
            sans.push(config.proxy.listen.ip().to_string());
        }
        let (cert, key, ca, name) = gatehouse_cli::roles::proxy_identity(
            &data_dir,
            local_auth.as_ref(),
            &auth_addr,
            &join,
            &node_name,
            &sans,
        )
        .await?;
        cluster = name;
        let metrics = Arc::new(gatehouse_agent::dataplane::proxy::ProxyMetrics::default());
        metrics.register(&mut registry);
        proxy = Some(gatehouse_cli::roles::start_proxy(
            config.proxy.listen,
            config.proxy.workers,
            config.proxy.io_backend,
            config.proxy.quic,
            congestion_control(&config.proxy.tcp_congestion),
            &auth_addr,
            &cert,
            &key,
            &ca,
            &cluster,
            metrics,
        )?);
    }
    let proxy_addr = proxy
        .as_ref()
        .map(|p| p.addr.to_string())
        .or_else(|| config.agent.proxy.clone())
        .unwrap_or_default();

    let mut agent = None;
    if has("agent") {
        let addresses = vec![];
        let identity = gatehouse_cli::roles::agent_identity(
            &data_dir,
            local_auth.as_ref(),
            &proxy_addr,
            &join,
            &node_name,
            &addresses,
        )
        .await?;
        if cluster.is_empty() {
            cluster = identity.cluster.clone();
        }
        let opts = gatehouse_agent::agent::AgentOptions {
            data_dir: data_dir.join("agent"),
            proxy_addr: proxy_addr.clone(),
            node_name: identity.host_name.clone(),
            labels: config.agent.labels.clone(),
            apps: config.agent.apps.clone(),
            addresses,
            ssh: config.agent.ssh.unwrap_or(true),
            transport: config.agent.transport,
            tcp_congestion: congestion_control(&config.agent.tcp_congestion),
        };
        agent = Some(gatehouse_agent::agent::start(opts, identity).await?);
    }

    let ready = Readiness::default();
    if let Some(a) = &agent {
        a.status.register(&mut registry);
        let status = Arc::clone(&a.status);
        ready.add_check(Box::new(move || {
            if status.is_connected() {
                Ok(())
            } else {
                Err("agent tunnel is down".into())
            }
        }));
    }
    let (diag_addr, diag_server) =
        diag::bind(config.diag.listen, Arc::new(registry), ready.clone())
            .await
            .with_context(|| format!("binding diagnostics on {}", config.diag.listen))?;
    let diag_task = tokio::spawn(diag_server);

    let run = RunAddresses {
        auth: prepared.as_ref().map(|p| p.info.listen.to_string()),
        diag: Some(diag_addr.to_string()),
        proxy: proxy.as_ref().map(|p| p.addr.to_string()),
    };
    daemon::create_private_dir(&data_dir.join("run"))?;
    daemon::write_private(
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
    if let Some(p) = &prepared {
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
        banner.push_str(&format!("  Proxy I/O:    {}\n", p.proxy.io_backend));
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
    if let (Some(p), Some(px)) = (&prepared, &proxy) {
        banner.push_str(&format!(
            "\nNext, in another terminal:\n  gctl{hint} users add alice --roles access,editor --logins {me}\n  gsh login --proxy {} --user alice --ca-pin {}\n",
            px.addr, p.info.ca_pin
        ));
        if agent.is_some() {
            banner.push_str(&format!("  gsh ssh {me}@{node_name} echo hello\n"));
        }
    } else if let Some(p) = &prepared {
        banner.push_str(&format!(
            "\nNext, in another terminal:\n  gctl{hint} users add alice --roles access,editor --logins {me}\n  gsh login --auth {} --user alice --ca-pin {}\n",
            p.info.listen, p.info.ca_pin
        ));
    }
    println!("{banner}");
    ready.set(true);
    let result = match prepared {
        Some(p) => daemon::serve(p, shutdown_signal()).await,
        None => {
            shutdown_signal().await;
            Ok(())
        }
    };
    ready.set(false);
    if let Some(p) = proxy {
        p.proxy.shutdown();
    }
    drop(agent);
    diag_task.abort();
    tracing::info!("gatehouse stopped");
    result
}
