//! Shared pieces of the Gatehouse binaries: logging setup, the user profile under
//! `~/.gatehouse/`, finding credentials, and turning RPC errors into messages people can act on.

use std::path::{Path, PathBuf};

use anyhow::Context;
use gatehouse_controlplane::client::{AuthEndpoint, Client, error_chain};
use gatehouse_controlplane::tls::Trust;
use serde::{Deserialize, Serialize};

/// Run a client command on a single-threaded runtime; print `NAME: error: …` and exit 1 on error.
pub fn run_main(name: &str, command: impl std::future::Future<Output = anyhow::Result<()>>) {
    let result = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(anyhow::Error::from)
        .and_then(|rt| rt.block_on(command));
    if let Err(e) = result {
        eprintln!("{name}: error: {e:#}");
        std::process::exit(1);
    }
}

/// `text` or `json` logs on stderr, filtered by `level` (or `RUST_LOG`).
pub fn init_logging(format: &str, level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
}

/// A tonic status as a one-line message: the server's words first, the code after.
pub fn rpc_error(status: tonic::Status) -> anyhow::Error {
    let code = status.code();
    let msg = status.message();
    if code == tonic::Code::Cancelled && msg.contains("canceled") {
        // TLS 1.3 refuses a client certificate after the client considers the handshake done,
        // so the client only sees the connection close. Say what that usually means.
        return anyhow::anyhow!(
            "Auth closed the connection ({code:?}): the client certificate was probably refused \
             (issued by another cluster's CA, or expired: log in again, or check --identity); \
             the Auth log names the reason"
        );
    }
    if code == tonic::Code::Unavailable || code == tonic::Code::Unknown {
        let chain = std::error::Error::source(&status)
            .map(error_chain)
            .unwrap_or_default();
        anyhow::anyhow!(
            "{msg}{}{chain} ({code:?})",
            if chain.is_empty() { "" } else { ": " }
        )
    } else {
        anyhow::anyhow!("{msg} ({code:?})")
    }
}

/// Connect and map failures to a readable error.
pub async fn connect(endpoint: &AuthEndpoint) -> anyhow::Result<Client> {
    endpoint
        .connect()
        .await
        .map_err(|e| anyhow::anyhow!(error_chain(&e)))
}

/// Where a user's profile lives: `$GATEHOUSE_HOME`, else `~/.gatehouse`.
pub fn profile_dir() -> anyhow::Result<PathBuf> {
    if let Some(dir) = std::env::var_os("GATEHOUSE_HOME") {
        return Ok(PathBuf::from(dir));
    }
    let home = std::env::var_os("HOME").context("HOME is not set; set GATEHOUSE_HOME")?;
    Ok(PathBuf::from(home).join(".gatehouse"))
}

/// What `gsh login` remembers (`profile.toml`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Profile {
    /// The Proxy, when logged in through one (Auth is then reached through it too).
    #[serde(default)]
    pub proxy_addr: Option<String>,
    pub auth_addr: String,
    pub cluster: String,
    pub user: String,
    pub ca_pin: String,
    pub expires: i64,
    pub roles: Vec<String>,
    pub logins: Vec<String>,
}

pub const SSH_KEY_FILE: &str = "id_ed25519";
pub const SSH_CERT_FILE: &str = "id_ed25519-cert.pub";

impl Profile {
    pub fn load(dir: &Path) -> anyhow::Result<Self> {
        let path = dir.join("profile.toml");
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("not logged in (no {}); run `gsh login`", path.display()))?;
        toml::from_str(&text).with_context(|| format!("reading {}", path.display()))
    }

    pub fn save(&self, dir: &Path) -> anyhow::Result<()> {
        let text = toml::to_string(self)?;
        gatehouse_controlplane::files::write_private(&dir.join("profile.toml"), text.as_bytes())?;
        Ok(())
    }
}

/// Credentials found in an identity directory (`tls.crt`, `tls.key`, `ca.pem`).
pub fn identity_endpoint(dir: &Path, addr: &str) -> anyhow::Result<AuthEndpoint> {
    let read = |name: &str| {
        std::fs::read_to_string(dir.join(name))
            .with_context(|| format!("reading {}", dir.join(name).display()))
    };
    Ok(AuthEndpoint {
        addr: addr.to_owned(),
        trust: Trust::CaPem(read("ca.pem")?),
        identity: Some((read("tls.crt")?, read("tls.key")?)),
    })
}

/// The addresses a running daemon bound (`<data-dir>/run/addresses.json`).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct RunAddresses {
    pub auth: Option<String>,
    pub diag: Option<String>,
    #[serde(default)]
    pub proxy: Option<String>,
}

impl RunAddresses {
    pub fn path(data_dir: &Path) -> PathBuf {
        data_dir.join("run").join("addresses.json")
    }
    pub fn load(data_dir: &Path) -> Option<Self> {
        let text = std::fs::read_to_string(Self::path(data_dir)).ok()?;
        serde_json::from_str(&text).ok()
    }
}

/// Unix seconds as RFC 3339 UTC.
pub fn fmt_time(unix: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(unix)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| unix.to_string())
}

/// Print rows as an aligned table with a header.
pub fn print_table(header: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            if let Some(w) = widths.get_mut(i) {
                *w = (*w).max(cell.chars().count());
            }
        }
    }
    let line = |cells: Vec<String>| {
        let mut out = String::new();
        for (i, c) in cells.iter().enumerate() {
            let w = widths.get(i).copied().unwrap_or(0);
            if i + 1 == cells.len() {
                out.push_str(c);
            } else {
                out.push_str(&format!("{c:<w$}  "));
            }
        }
        println!("{}", out.trim_end());
    };
    line(header.iter().map(|s| s.to_string()).collect());
    line(widths.iter().map(|w| "-".repeat(*w)).collect());
    for row in rows {
        line(row.clone());
    }
}

/// Read one line from stdin (for `--password-stdin`), without the newline.
pub fn read_stdin_line() -> anyhow::Result<String> {
    let mut line = String::new();
    std::io::stdin()
        .read_line(&mut line)
        .context("reading stdin")?;
    Ok(line.trim_end_matches(['\n', '\r']).to_owned())
}
pub mod access;
pub mod bot;
pub mod clusters;
pub mod locks;
pub mod mfa;
pub mod recordings;
pub mod stdio;
