//! `gbot`, Machine ID: a bot joins once with its single-use token, keeps its renewable identity
//! in its data dir (0600), renews it over the `Renew` RPC before it expires (its current
//! certificate in, a new one out, no token) and writes outputs for the programs on its machine
//! ([`outputs`]). `SIGHUP` renews at once; `--oneshot` writes once and exits.

pub mod admin;
pub mod outputs;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use gatehouse_controlplane::ca::spki_pin;
use gatehouse_controlplane::client::AuthEndpoint;
use gatehouse_controlplane::files::{create_private_dir, write_private};
use gatehouse_controlplane::identity::Identity;
use gatehouse_controlplane::proto;
use gatehouse_controlplane::tls::{Trust, certs_from_pem, key_pem_for_tools};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

pub use outputs::Output;

use crate::{connect, fmt_time, rpc_error};

/// What `gbot start` runs with: from flags, or `gbot.toml`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BotConfig {
    /// The cluster's proxy (host:port); Auth is reached through it.
    pub proxy: String,
    /// The join token (needed for the first start, or to join again).
    #[serde(default)]
    pub token: Option<String>,
    /// The cluster's CA pin (sha256:…), verified at the join.
    #[serde(default)]
    pub ca_pin: Option<String>,
    /// Where the bot keeps its own identity.
    pub data_dir: PathBuf,
    /// Certificate lifetime to ask for (capped by the bot's roles).
    #[serde(default = "default_ttl", with = "humantime_serde_compat")]
    pub ttl: Duration,
    /// Renew this often (and always by two thirds of the lifetime).
    #[serde(default = "default_renew", with = "humantime_serde_compat")]
    pub renew_interval: Duration,
    #[serde(default)]
    pub outputs: Vec<Output>,
    /// Diagnostics listener (`/healthz`, `/readyz`, `/metrics`).
    #[serde(default)]
    pub diag_addr: Option<std::net::SocketAddr>,
}

fn default_ttl() -> Duration {
    Duration::from_secs(3600)
}
fn default_renew() -> Duration {
    Duration::from_secs(20 * 60)
}

/// Durations in TOML as humantime strings ("1h", "20m").
mod humantime_serde_compat {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_duration(*d).to_string())
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let text = String::deserialize(d)?;
        humantime::parse_duration(&text).map_err(serde::de::Error::custom)
    }
}

impl BotConfig {
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        toml::from_str(&text)
            .with_context(|| format!("{} is not a valid gbot config", path.display()))
    }

    fn check(&self) -> anyhow::Result<()> {
        if self.outputs.is_empty() {
            bail!("no outputs: pass --destination DIR or list [[outputs]] in the config");
        }
        if self.renew_interval < Duration::from_secs(1) {
            bail!("--renew-interval must be at least 1s");
        }
        if self.ttl < Duration::from_secs(60) {
            bail!("--ttl must be at least 1m");
        }
        Ok(())
    }
}

/// The bot's renewable identity, kept in `<data-dir>/identity.json` (0600).
#[derive(Clone, Serialize, Deserialize)]
pub struct BotIdentity {
    pub bot: String,
    pub cluster: String,
    pub proxy_addr: String,
    pub ca_pin: String,
    pub ca_pem: String,
    /// OpenSSH private key and certificate line.
    pub ssh_key: String,
    pub ssh_cert: String,
    /// PKCS#8 v1 PEM key and PEM certificate.
    pub tls_key: String,
    pub tls_cert: String,
    pub ssh_host_ca: Vec<String>,
    pub roles: Vec<String>,
    pub logins: Vec<String>,
    pub expires: i64,
    pub generation: u64,
    /// SHA-256 of the token it joined with: another token means "join again".
    pub joined_with: String,
}

impl std::fmt::Debug for BotIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BotIdentity")
            .field("bot", &self.bot)
            .field("generation", &self.generation)
            .field("expires", &self.expires)
            .finish_non_exhaustive()
    }
}

const IDENTITY_FILE: &str = "identity.json";

impl BotIdentity {
    fn load(dir: &Path) -> anyhow::Result<Option<Self>> {
        match std::fs::read_to_string(dir.join(IDENTITY_FILE)) {
            Ok(text) => Ok(Some(serde_json::from_str(&text).with_context(|| {
                format!("{} is damaged", dir.join(IDENTITY_FILE).display())
            })?)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e).with_context(|| format!("reading {}", dir.display())),
        }
    }

    fn save(&self, dir: &Path) -> anyhow::Result<()> {
        create_private_dir(dir).with_context(|| format!("creating {}", dir.display()))?;
        write_private(&dir.join(IDENTITY_FILE), &serde_json::to_vec_pretty(self)?)
            .with_context(|| format!("writing {}", dir.join(IDENTITY_FILE).display()))
    }

    fn public_keys(&self) -> anyhow::Result<(String, Vec<u8>)> {
        let ssh = ssh_key::PrivateKey::from_openssh(&self.ssh_key)?;
        let tls = rcgen::KeyPair::from_pem(&self.tls_key)?;
        Ok((
            ssh.public_key().to_openssh()?,
            rcgen::PublicKeyData::subject_public_key_info(&tls),
        ))
    }

    /// Take in Auth's answer (join or renewal).
    fn update(&mut self, creds: proto::Credentials, generation: u64) -> anyhow::Result<()> {
        let der = certs_from_pem(&creds.tls_cert)?;
        let id = der
            .first()
            .context("Auth sent no certificate")
            .and_then(|c| Identity::from_cert_der(c).map_err(anyhow::Error::from))?;
        self.bot = id.name;
        self.roles = id.roles;
        self.logins = id.logins;
        self.generation = id.bot.map(|b| b.generation).unwrap_or(generation);
        self.cluster = creds.cluster_name;
        self.ssh_cert = creds.ssh_cert;
        self.tls_cert = creds.tls_cert;
        self.ca_pem = creds.tls_ca;
        self.ssh_host_ca = creds.ssh_host_ca;
        self.expires = creds.expires;
        Ok(())
    }
}

fn now() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp()
}

fn token_hash(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

/// Join with `token`: fresh keys, the cluster verified by its CA pin.
async fn join(config: &BotConfig, token: &str) -> anyhow::Result<BotIdentity> {
    let pin = config.ca_pin.clone().context(
        "joining needs --ca-pin sha256:… (printed by `gatehouse start` and `gctl status`)",
    )?;
    let ssh =
        ssh_key::PrivateKey::random(&mut ssh_key::rand_core::OsRng, ssh_key::Algorithm::Ed25519)?;
    let tls = gatehouse_controlplane::ca::generate_leaf_key()?;
    let endpoint = AuthEndpoint {
        addr: config.proxy.clone(),
        trust: Trust::Pin(pin.clone()),
        identity: None,
    };
    let mut client = connect(&endpoint).await?;
    let resp = client
        .join(proto::JoinRequest {
            token: token.to_owned(),
            host_name: "gbot".into(),
            ssh_public_key: ssh.public_key().to_openssh()?,
            tls_public_key: rcgen::PublicKeyData::subject_public_key_info(&tls),
            ttl_seconds: config.ttl.as_secs(),
            ..Default::default()
        })
        .await
        .map_err(rpc_error)
        .context("joining")?
        .into_inner();
    if resp.role != "bot" {
        bail!("that token is a `{}` token, not a bot's", resp.role);
    }
    let creds = resp.credentials.context("Auth sent no credentials")?;
    if !certs_from_pem(&creds.tls_ca)?
        .iter()
        .any(|c| spki_pin(c).as_deref() == Some(pin.as_str()))
    {
        bail!("Auth returned a CA that does not match the pin {pin}; refusing it");
    }
    let mut id = BotIdentity {
        bot: String::new(),
        cluster: String::new(),
        proxy_addr: config.proxy.clone(),
        ca_pin: pin,
        ca_pem: String::new(),
        ssh_key: ssh.to_openssh(ssh_key::LineEnding::LF)?.to_string(),
        ssh_cert: String::new(),
        tls_key: key_pem_for_tools(&tls),
        tls_cert: String::new(),
        ssh_host_ca: vec![],
        roles: vec![],
        logins: vec![],
        expires: 0,
        generation: 1,
        joined_with: token_hash(token),
    };
    id.update(creds, 1)?;
    Ok(id)
}

/// Renew: the current certificate in, a new one out (same keys).
async fn renew(config: &BotConfig, id: &BotIdentity) -> anyhow::Result<BotIdentity> {
    if id.expires <= now() {
        bail!(
            "the bot's identity expired at {}: it cannot renew; join again with a new token \
             (gctl tokens add --type bot --bot-name {})",
            fmt_time(id.expires),
            id.bot
        );
    }
    gatehouse_controlplane::tls::verify_client_cert(&id.ca_pem, &id.tls_cert).map_err(|e| {
        anyhow::anyhow!(
            "the bot's certificate in {} is not one cluster {}'s CA issued and still valid ({e}): \
             it cannot renew; join again with a new token",
            IDENTITY_FILE,
            id.cluster
        )
    })?;
    let (ssh, tls) = id.public_keys()?;
    let endpoint = AuthEndpoint {
        addr: config.proxy.clone(),
        trust: Trust::CaPem(id.ca_pem.clone()),
        identity: Some((id.tls_cert.clone(), id.tls_key.clone())),
    };
    let mut client = connect(&endpoint).await?;
    let resp = client
        .renew(proto::RenewRequest {
            ssh_public_key: ssh,
            tls_public_key: tls,
            ttl_seconds: config.ttl.as_secs(),
            current_cert: Vec::new(),
        })
        .await
        .map_err(rpc_error)
        .context("renewing")?
        .into_inner();
    let mut next = id.clone();
    next.update(
        resp.credentials.context("Auth sent no credentials")?,
        resp.generation,
    )?;
    Ok(next)
}

/// The identity to start from: the stored one (`false`), or a join (`true`: first start, a new
/// token).
async fn initial_identity(config: &BotConfig) -> anyhow::Result<(BotIdentity, bool)> {
    let stored = BotIdentity::load(&config.data_dir)?;
    let token = config.token.as_deref().filter(|t| !t.is_empty());
    let id = match (stored, token) {
        (Some(id), Some(t)) if id.joined_with != token_hash(t) => join(config, t).await?,
        (Some(id), _) if id.expires > now() => return Ok((id, false)),
        (Some(id), None) => bail!(
            "the bot's identity in {} expired at {}: it must join again; pass a new --token",
            config.data_dir.display(),
            fmt_time(id.expires)
        ),
        (Some(_), Some(_)) => bail!(
            "the bot's identity expired and --token is the one it joined with (single use): pass a new token"
        ),
        (None, Some(t)) => join(config, t).await?,
        (None, None) => bail!(
            "no identity in {} yet: the first start needs --token (from `gctl bots add`) and --ca-pin",
            config.data_dir.display()
        ),
    };
    id.save(&config.data_dir)?;
    Ok((id, true))
}

/// What `gbot` reports on `/metrics` and `/readyz`.
#[derive(Debug, Default)]
pub struct BotMetrics {
    pub renewals: Counter,
    pub failures: Counter,
    pub seconds_to_expiry: Gauge,
    /// Unix seconds until which the written outputs are valid (0: none written).
    pub outputs_valid_until: std::sync::atomic::AtomicI64,
}

impl BotMetrics {
    pub fn register(&self, registry: &mut prometheus_client::registry::Registry) {
        let r = registry.sub_registry_with_prefix("gatehouse_gbot");
        r.register(
            "renewals",
            "Identities renewed (joins included)",
            self.renewals.clone(),
        );
        r.register("failures", "Failed renewals", self.failures.clone());
        r.register(
            "seconds_to_expiry",
            "Seconds until the written certificates expire",
            self.seconds_to_expiry.clone(),
        );
    }

    /// Ready while the outputs hold certificates that have not expired.
    pub fn ready(&self) -> Result<(), String> {
        let until = self
            .outputs_valid_until
            .load(std::sync::atomic::Ordering::Acquire);
        if until > now() {
            Ok(())
        } else if until == 0 {
            Err("no outputs written yet".into())
        } else {
            Err(format!("the outputs expired at {}", fmt_time(until)))
        }
    }
}

fn write_all(config: &BotConfig, id: &BotIdentity, metrics: &BotMetrics) -> anyhow::Result<()> {
    for o in &config.outputs {
        outputs::write_output(o, &config.data_dir, id)?;
    }
    metrics
        .outputs_valid_until
        .store(id.expires, std::sync::atomic::Ordering::Release);
    metrics.seconds_to_expiry.set(id.expires - now());
    Ok(())
}

/// When to renew next: after `renew_interval`, and by two thirds of the lifetime left.
fn next_renewal(config: &BotConfig, id: &BotIdentity) -> Duration {
    let left = u64::try_from(id.expires - now()).unwrap_or(0);
    config
        .renew_interval
        .min(Duration::from_secs(left * 2 / 3))
        .max(Duration::from_secs(1))
}

/// `gbot start`: check the destinations, join or load, write, then renew for ever (or once).
pub async fn start(
    config: BotConfig,
    oneshot: bool,
    metrics: Arc<BotMetrics>,
) -> anyhow::Result<()> {
    config.check()?;
    for o in &config.outputs {
        outputs::check_destination(&o.destination(&config.data_dir))?;
    }
    let (mut id, joined) = initial_identity(&config).await?;
    // A stored identity renews before anything is written: outputs start fresh.
    if !joined {
        match renew(&config, &id).await {
            Ok(next) => {
                next.save(&config.data_dir)?;
                id = next;
            }
            Err(e) if oneshot => return Err(e),
            Err(e) => {
                metrics.failures.inc();
                tracing::warn!(error = %format!("{e:#}"), "gbot: cannot renew at start; writing the stored identity and retrying");
            }
        }
    }
    write_all(&config, &id, &metrics)?;
    metrics.renewals.inc();
    tracing::info!(bot = %id.bot, generation = id.generation, expires = %fmt_time(id.expires), "gbot: outputs written");
    if oneshot {
        return Ok(());
    }
    for o in &config.outputs {
        if let Output::App { app, listen, .. } = o {
            let (dir, app, listen) = (o.destination(&config.data_dir), app.clone(), listen.clone());
            tokio::spawn(async move {
                if let Err(e) = crate::access::proxy_tcp(&dir, &app, &listen).await {
                    tracing::error!(%app, error = %format!("{e:#}"), "gbot: app listener stopped");
                }
            });
        }
    }
    let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?;
    let mut failures: u32 = 0;
    let mut wait = next_renewal(&config, &id);
    loop {
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            _ = hup.recv() => tracing::info!("gbot: SIGHUP: renewing now"),
        }
        metrics.seconds_to_expiry.set(id.expires - now());
        match renew(&config, &id).await {
            Ok(next) => {
                next.save(&config.data_dir)?;
                id = next;
                if let Err(e) = write_all(&config, &id, &metrics) {
                    metrics.failures.inc();
                    tracing::error!(error = %format!("{e:#}"), "gbot: cannot write the outputs");
                }
                metrics.renewals.inc();
                failures = 0;
                tracing::info!(generation = id.generation, expires = %fmt_time(id.expires), "gbot: renewed");
                wait = next_renewal(&config, &id);
            }
            Err(e) => {
                metrics.failures.inc();
                failures = failures.saturating_add(1);
                if id.expires <= now() {
                    return Err(e.context("the identity expired before it could renew"));
                }
                let backoff = Duration::from_secs(1u64 << failures.min(5));
                wait = backoff.min(Duration::from_secs(
                    u64::try_from(id.expires - now()).unwrap_or(1).max(1),
                ));
                tracing::warn!(error = %format!("{e:#}"), retry_in = ?wait, "gbot: renewal failed");
            }
        }
    }
}
