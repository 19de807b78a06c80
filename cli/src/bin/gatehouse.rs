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
    /// Roles to run, comma-separated. This version runs: auth.
    #[arg(long, value_delimiter = ',')]
    roles: Option<Vec<String>>,
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
    diag: DiagConfig,
    log: LogConfig,
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

fn main() {
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
    let roles = config.roles.clone().unwrap_or_else(|| vec!["auth".into()]);
    for r in &roles {
        if r != "auth" {
            anyhow::bail!("role `{r}` is not available in this version; available: auth");
        }
    }
    let data_dir = config
        .data_dir
        .clone()
        .unwrap_or_else(|| PathBuf::from("gatehouse-data"));

    let mut registry = diag::Registry::default();
    let prepared = daemon::prepare(
        &data_dir,
        config.cluster_name.as_deref(),
        &config.auth,
        &mut registry,
    )
    .await?;
    let info = prepared.info.clone();
    let ready = Readiness::default();
    let (diag_addr, diag_server) =
        diag::bind(config.diag.listen, Arc::new(registry), ready.clone())
            .await
            .with_context(|| format!("binding diagnostics on {}", config.diag.listen))?;
    let diag_task = tokio::spawn(diag_server);

    let run = RunAddresses {
        auth: Some(info.listen.to_string()),
        diag: Some(diag_addr.to_string()),
    };
    daemon::create_private_dir(&data_dir.join("run"))?;
    daemon::write_private(
        &RunAddresses::path(&data_dir),
        serde_json::to_string_pretty(&run)?.as_bytes(),
    )?;

    tracing::info!(cluster = %info.cluster, auth = %info.listen, diag = %diag_addr, "gatehouse started");
    let exe_dir_hint = if data_dir.as_os_str() == "gatehouse-data" {
        String::new()
    } else {
        format!(" --data-dir {}", data_dir.display())
    };
    println!(
        "Gatehouse cluster \"{cluster}\" is running{first}.\n\
         \n  Auth API:     {auth}\n  CA pin:       {pin}\n  Diagnostics:  http://{diag}/metrics\n  Data dir:     {dir}\n\
         \nNext, in another terminal:\n  gctl{hint} users add alice --roles access,editor --logins alice,root\n  gsh login --auth {auth} --user alice --ca-pin {pin}\n",
        cluster = info.cluster,
        first = if info.first_start {
            " (new cluster: CAs created)"
        } else {
            ""
        },
        auth = info.listen,
        pin = info.ca_pin,
        diag = diag_addr,
        dir = data_dir.display(),
        hint = exe_dir_hint,
    );
    ready.set(true);
    let result = daemon::serve(prepared, shutdown_signal()).await;
    ready.set(false);
    diag_task.abort();
    tracing::info!("gatehouse stopped");
    result
}
