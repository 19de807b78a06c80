//! `loadgen`: Gatehouse's bundled load generator. This version has the `logins` scenario
//! (Auth); the data-plane scenarios (tunnels, throughput, latency, sessions, ssh) arrive with the
//! Proxy.

mod logins;
mod procstat;
mod spawn;

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
}

fn main() {
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
            if let Some(path) = cli.json {
                std::fs::write(&path, serde_json::to_string_pretty(&report)?)?;
            }
            drop(spawned);
            Ok(())
        }
    }
}
