//! `gbot`: Machine ID. Joins a bot once with its single-use token, renews its short-lived
//! identity before it expires, and writes it where the machine's programs read it.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use clap::{Parser, Subcommand};
use gatehouse_cli::bot::{BotConfig, BotMetrics, Output};
use gatehouse_cli::init_logging;

#[derive(Parser, Debug)]
#[command(
    name = "gbot",
    version,
    about = "Gatehouse Machine ID: keep a bot's short-lived credentials fresh"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Join (first start), write the outputs, renew them before they expire.
    Start(Box<StartArgs>),
    /// Helpers the written files use.
    #[command(subcommand)]
    Proxy(ProxyCmd),
}

#[derive(clap::Args, Debug)]
struct StartArgs {
    /// gbot.toml with several outputs; flags given too override its values.
    #[arg(long, short = 'c')]
    config: Option<PathBuf>,
    /// The cluster's proxy (host:port).
    #[arg(long, env = "GATEHOUSE_PROXY")]
    proxy: Option<String>,
    /// The bot's join token (from `gctl bots add`); needed to join.
    #[arg(long, env = "GATEHOUSE_BOT_TOKEN")]
    token: Option<String>,
    /// The cluster's CA pin (sha256:…).
    #[arg(long, env = "GATEHOUSE_CA_PIN")]
    ca_pin: Option<String>,
    /// Where the bot keeps its renewable identity (0700).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Write the bot's identity here (an `identity` output).
    #[arg(long)]
    destination: Option<PathBuf>,
    /// Certificate lifetime to ask for (capped by the bot's roles). Default 1h.
    #[arg(long)]
    ttl: Option<humantime::Duration>,
    /// Renew this often (and by two thirds of the lifetime). Default 20m.
    #[arg(long)]
    renew_interval: Option<humantime::Duration>,
    /// Write once and exit (CI jobs): 0 on success, non-zero with the reason.
    #[arg(long)]
    oneshot: bool,
    /// Also forward a local listener to this TCP app through the proxy (with --listen).
    #[arg(long, requires = "listen")]
    app: Option<String>,
    #[arg(long, requires = "app")]
    listen: Option<String>,
    /// Diagnostics listener: /healthz, /readyz (outputs fresh), /metrics.
    #[arg(long)]
    diag_addr: Option<std::net::SocketAddr>,
    /// Log format: text or json.
    #[arg(long, default_value = "text")]
    log_format: String,
}

#[derive(Subcommand, Debug)]
enum ProxyCmd {
    /// OpenSSH ProxyCommand with an output directory's credentials: LOGIN@HOST:PORT.
    Ssh {
        #[arg(long)]
        destination: PathBuf,
        spec: String,
    },
}

fn config(args: &StartArgs) -> anyhow::Result<BotConfig> {
    let mut c = match &args.config {
        Some(path) => BotConfig::load(path)?,
        None => BotConfig {
            proxy: args
                .proxy
                .clone()
                .context("pass --proxy HOST:PORT (or --config gbot.toml)")?,
            token: None,
            ca_pin: None,
            data_dir: args
                .data_dir
                .clone()
                .context("pass --data-dir DIR: where the bot keeps its identity")?,
            ttl: std::time::Duration::from_secs(3600),
            renew_interval: std::time::Duration::from_secs(20 * 60),
            outputs: vec![],
            diag_addr: None,
        },
    };
    if let Some(p) = &args.proxy {
        c.proxy = p.clone();
    }
    if args.token.is_some() {
        c.token = args.token.clone();
    }
    if args.ca_pin.is_some() {
        c.ca_pin = args.ca_pin.clone();
    }
    if let Some(d) = &args.data_dir {
        c.data_dir = d.clone();
    }
    if let Some(t) = args.ttl {
        c.ttl = t.into();
    }
    if let Some(r) = args.renew_interval {
        c.renew_interval = r.into();
    }
    if let Some(d) = &args.destination {
        c.outputs.push(Output::Identity {
            destination: d.clone(),
        });
    }
    if let (Some(app), Some(listen)) = (&args.app, &args.listen) {
        c.outputs.push(Output::App {
            app: app.clone(),
            listen: listen.clone(),
            destination: None,
        });
    }
    if args.diag_addr.is_some() {
        c.diag_addr = args.diag_addr;
    }
    Ok(c)
}

async fn start(args: StartArgs) -> anyhow::Result<()> {
    let config = config(&args)?;
    let metrics = Arc::new(BotMetrics::default());
    if let Some(addr) = config.diag_addr {
        let mut registry = prometheus_client::registry::Registry::default();
        metrics.register(&mut registry);
        let ready = gatehouse_diag::Readiness::default();
        let m = Arc::clone(&metrics);
        ready.add_check(Box::new(move || m.ready()));
        ready.set(true);
        let (bound, serve) =
            gatehouse_diag::bind(addr, gatehouse_diag::Metrics::new(registry), ready)
                .await
                .with_context(|| format!("cannot listen on {addr} for diagnostics"))?;
        eprintln!("gbot: diagnostics on http://{bound}");
        tokio::spawn(serve);
    }
    let oneshot = args.oneshot;
    tokio::select! {
        r = gatehouse_cli::bot::start(config, oneshot, metrics) => r,
        _ = tokio::signal::ctrl_c() => Ok(()),
    }
}

fn main() {
    let cli = Cli::parse();
    match cli.command {
        Command::Start(args) => {
            init_logging(&args.log_format, "info");
            gatehouse_cli::run_main("gbot", start(*args));
        }
        Command::Proxy(ProxyCmd::Ssh { destination, spec }) => {
            init_logging("text", "warn");
            gatehouse_cli::run_main("gbot", async move {
                gatehouse_cli::access::proxy_ssh(&destination, &spec, None).await
            });
        }
    }
}
