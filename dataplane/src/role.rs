//! The Proxy role as a daemon runs it: [`start`] gets the proxy's identity (issued in-process
//! when Auth runs beside it, else joined once with a `proxy` token and kept in
//! `<data-dir>/proxy/`), builds its TLS config, starts the workers and the task that batches
//! agents' heartbeats to Auth. The returned [`ProxyHandle`] stops it gracefully.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use gatehouse_controlplane::ca::TlsUsage;
use gatehouse_controlplane::client::{AuthEndpoint, Client};
use gatehouse_controlplane::host::{HostIdentity, JoinParams};
use gatehouse_controlplane::identity::{Identity, IdentityKind, PROXY_SERVER_NAME};
use gatehouse_controlplane::proto;
use gatehouse_controlplane::server::AuthService;
use gatehouse_controlplane::tls::{ReloadableCert, Trust, cert_validity as validity};
use prometheus_client::registry::Registry;

use crate::io::IoBackend;
use crate::proxy::{Inventory, Proxy, ProxyConfig, ProxyMetrics, server_alpn};

/// What the Proxy role is started with.
#[derive(Debug, Clone)]
pub struct ProxyRoleConfig {
    /// Where a joined proxy keeps its identity (`<data_dir>/proxy/`).
    pub data_dir: PathBuf,
    pub listen: SocketAddr,
    /// Worker threads (cores); 0 means one per available core.
    pub workers: usize,
    pub io_backend: IoBackend,
    /// Accept agents' tunnels over QUIC too.
    pub quic: bool,
    /// TCP congestion control for the public port; `None` keeps the host's.
    pub tcp_congestion: Option<String>,
    /// The Auth API (joins, heartbeats, and `gatehouse-auth` pass-through go there).
    pub auth_addr: String,
    /// This host's name, and extra names and addresses for the proxy's certificate.
    pub host_name: String,
    pub public_addrs: Vec<String>,
    /// For a proxy without a local Auth.
    pub join: JoinParams,
    /// New SSH sessions per source address.
    pub ssh_session_rate: crate::proxy::SessionRate,
    /// Where agents reach this proxy directly (`host:port`), announced to the cluster; `None`:
    /// the listen address when it names one, else the host name with the listen port.
    pub advertise_addr: Option<String>,
    /// The certificate (chain) and key files browsers are shown (e.g. ACME-issued; re-read
    /// when they change); `None`: the cluster's own proxy certificate.
    pub browser_cert: Option<(PathBuf, PathBuf)>,
}

/// Why the Proxy role could not start.
#[derive(Debug, thiserror::Error)]
pub enum ProxyRoleError {
    #[error("{0}")]
    Config(String),
    #[error("the proxy's identity: {0}")]
    Identity(String),
    #[error("joining the cluster as a proxy: {0}")]
    Join(#[from] gatehouse_controlplane::host::HostError),
    #[error("starting the proxy on {listen}: {source}")]
    Start {
        listen: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// A running Proxy role.
#[derive(Debug)]
pub struct ProxyHandle {
    /// The bound public address.
    pub addr: SocketAddr,
    /// The I/O backend the workers run on.
    pub io_backend: IoBackend,
    /// The cluster this proxy belongs to.
    pub cluster: String,
    /// The cluster's X.509 CA certificates (PEM) this proxy trusts now (two during a
    /// rotation's grace; kept current by renewals).
    pub ca_pem: Arc<arc_swap::ArcSwap<String>>,
    /// Where this proxy reaches Auth.
    pub auth_addr: String,
    /// Signs client-address preambles to Auth with this proxy's current identity.
    pub client_addr: Arc<arc_swap::ArcSwapOption<gatehouse_controlplane::client_addr::Asserter>>,
    /// Where the web UI registers the connections it opens on browsers' behalf.
    pub local_clients: Arc<crate::proxy::LocalClients>,
    proxy: Proxy,
    browser_cert: Option<tokio::task::JoinHandle<()>>,
    reporter: tokio::task::JoinHandle<()>,
    auditor: tokio::task::JoinHandle<()>,
    renew: tokio::task::JoinHandle<()>,
    follow_locks: tokio::task::JoinHandle<()>,
    peers: crate::peers::PeersHandle,
}

impl ProxyHandle {
    /// Stop accepting, send agents a go-away, join the workers; heartbeats stop with them.
    pub fn shutdown(self) {
        self.proxy.shutdown();
        if let Some(t) = &self.browser_cert {
            t.abort();
        }
        self.reporter.abort();
        self.auditor.abort();
        self.renew.abort();
        self.follow_locks.abort();
        self.peers.stop();
    }

    /// Serve browsers (the web UI) with `b` from now on.
    pub fn serve_browsers(&self, b: Arc<dyn crate::proxy::Browsers>) -> bool {
        self.proxy.serve_browsers(b)
    }

    /// Tell Auth this proxy is leaving (agents drop their tunnels to it); best effort, 2 s.
    pub async fn leave(&self) {
        self.peers.leave().await;
    }
}

fn browser_cert_files(cert: &Path, key: &Path) -> Result<(String, String), ProxyRoleError> {
    let read = |p: &Path| {
        std::fs::read_to_string(p)
            .map_err(|e| ProxyRoleError::Config(format!("reading {}: {e}", p.display())))
    };
    Ok((read(cert)?, read(key)?))
}

/// Re-read the browsers' certificate files every minute; a renewed pair (an ACME client wrote
/// new files) is presented from the next handshake on. A pair that does not load is logged and
/// the previous one kept.
async fn reload_browser_cert(
    cert_path: PathBuf,
    key_path: PathBuf,
    mut current: (String, String),
    cert: Arc<ReloadableCert>,
) {
    let mut tick = tokio::time::interval(Duration::from_secs(60));
    tick.tick().await;
    loop {
        tick.tick().await;
        match browser_cert_files(&cert_path, &key_path) {
            Ok(read) if read != current => match cert.set_for_browsers(&read.0, &read.1) {
                Ok(()) => {
                    tracing::info!(cert = %cert_path.display(), "proxy: browsers' certificate reloaded");
                    current = read;
                }
                Err(e) => {
                    tracing::warn!(cert = %cert_path.display(), error = %e, "proxy: the new browsers' certificate does not load; keeping the previous one")
                }
            },
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "proxy: cannot re-read the browsers' certificate"),
        }
    }
}

/// The proxy's TLS identity: (certificate, key, CA, cluster), and where renewals come from.
struct ProxyIdentity {
    cert: String,
    key: String,
    ca: String,
    cluster: String,
    source: Source,
}

/// How the proxy's certificate is renewed.
enum Source {
    /// Issued again in-process by the Auth beside it.
    Local {
        state: Arc<gatehouse_controlplane::server::AuthState>,
        host_name: String,
        sans: Vec<String>,
    },
    /// Renewed over the `Renew` RPC and kept in the data dir.
    Joined {
        host: Box<HostIdentity>,
        dir: PathBuf,
    },
}

/// Start the Proxy role on the current (multi-threaded) runtime; its metrics go to `registry`.
pub async fn start(
    config: ProxyRoleConfig,
    local_auth: Option<&AuthService>,
    registry: &mut Registry,
) -> Result<ProxyHandle, ProxyRoleError> {
    let mut sans = config.public_addrs.clone();
    if !config.listen.ip().is_unspecified() {
        sans.push(config.listen.ip().to_string());
    }
    let id = identity(&config, local_auth, &sans).await?;
    let alpn = server_alpn();
    let alpn_refs: Vec<&[u8]> = alpn.iter().map(Vec::as_slice).collect();
    let chain = format!("{}{}", id.cert, id.ca);
    let cert = ReloadableCert::new(&chain, &id.key)
        .map_err(|e| ProxyRoleError::Identity(e.to_string()))?;
    let browser_cert = match &config.browser_cert {
        Some((cert_path, key_path)) => {
            let read = browser_cert_files(cert_path, key_path)?;
            cert.set_for_browsers(&read.0, &read.1).map_err(|e| {
                ProxyRoleError::Config(format!(
                    "proxy.tls_cert {} / tls_key {}: {e}",
                    cert_path.display(),
                    key_path.display()
                ))
            })?;
            Some(tokio::spawn(reload_browser_cert(
                cert_path.to_path_buf(),
                key_path.to_path_buf(),
                read,
                Arc::clone(&cert),
            )))
        }
        None => {
            // Browsers do not take the proxy's Ed25519 certificate: one of ECDSA P-256 by the
            // cluster CA (when Auth runs here), else self-signed.
            let mut names = vec![
                "localhost".to_string(),
                "127.0.0.1".into(),
                config.host_name.clone(),
            ];
            names.extend(sans.iter().cloned());
            names.sort();
            names.dedup();
            let pair = match local_auth {
                Some(service) => service.state().tls.load().signer().issue_browser_cert(
                    &id.cluster,
                    &names,
                    time::OffsetDateTime::now_utc(),
                ),
                None => gatehouse_controlplane::ca::self_signed_browser_cert(&names),
            }
            .map_err(|e| ProxyRoleError::Identity(format!("the browsers' certificate: {e}")))?;
            cert.set_for_browsers(&pair.0, &pair.1)
                .map_err(|e| ProxyRoleError::Identity(format!("the browsers' certificate: {e}")))?;
            None
        }
    };
    // This cluster's client certificates, and trusted leaves' proxies' (kept current from the
    // watch stream).
    let verifier = Arc::new(
        gatehouse_controlplane::leaf_trust::ClusterClientVerifier::new(&id.ca)
            .map_err(|e| ProxyRoleError::Identity(e.to_string()))?,
    );
    let mut tls = (*gatehouse_controlplane::tls::server_config_with_verifier(
        Arc::clone(&verifier) as Arc<dyn rustls::server::danger::ClientCertVerifier>,
        Arc::clone(&cert),
        &alpn_refs,
    )
    .map_err(|e| ProxyRoleError::Identity(e.to_string()))?)
    .clone();
    // One TLS 1.3 session ticket per connection, stateless (sealed with keys rustls rotates
    // every 6 hours; nothing is stored per session). A client that opens many sessions
    // (`gsh proxy tcp`, a reconnecting agent) resumes and skips the certificate signatures,
    // which are most of a full handshake's cost. The proxy checks the identity's expiry on every
    // connection, resumed or not, so a ticket never outlives its certificate; tickets die with
    // the process, and a resumption on another proxy falls back to a full handshake.
    tls.ticketer = rustls::crypto::aws_lc_rs::Ticketer::new()
        .map_err(|e| ProxyRoleError::Identity(format!("session ticket keys: {e}")))?;
    tls.send_tls13_tickets = 1;
    let metrics = Arc::new(ProxyMetrics::default());
    metrics.register(registry);
    let proxies = Arc::new(crate::proxy::ProxySet::default());
    let leaves = Arc::new(crate::proxy::Leaves::default());
    let locks = Arc::new(crate::proxy::Locks::default());
    let host_cas = Arc::new(crate::proxy::HostCas::default());
    let client_addr = Arc::new(arc_swap::ArcSwapOption::from(
        gatehouse_controlplane::client_addr::Asserter::new(&id.cert, &id.key)
            .map_err(
                |e| tracing::warn!(error = %e, "proxy: cannot assert clients' addresses to Auth"),
            )
            .ok()
            .map(Arc::new),
    ));
    let (audit_tx, audit_rx) = tokio::sync::mpsc::unbounded_channel();
    let local_clients = Arc::new(crate::proxy::LocalClients::default());
    let proxy_config = ProxyConfig {
        listen: config.listen,
        workers: config.workers,
        auth_addr: config.auth_addr.clone(),
        tls: Arc::new(tls),
        cluster: id.cluster.clone(),
        tunnel: Default::default(),
        io_backend: config.io_backend,
        quic: config.quic,
        tcp_congestion: config.tcp_congestion.clone(),
        ssh_session_rate: config.ssh_session_rate,
        proxies: Arc::clone(&proxies),
        leaves: Arc::clone(&leaves),
        locks: Arc::clone(&locks),
        client_addr: Arc::clone(&client_addr),
        local_clients: Arc::clone(&local_clients),
        host_cas: Arc::clone(&host_cas),
        audit: Some(audit_tx),
    };
    let (proxy, inventories) =
        Proxy::start(proxy_config, Arc::clone(&metrics)).map_err(|source| {
            ProxyRoleError::Start {
                listen: config.listen,
                source,
            }
        })?;
    let endpoint = Arc::new(std::sync::Mutex::new(AuthEndpoint {
        addr: config.auth_addr.clone(),
        trust: Trust::CaPem(id.ca.clone()),
        identity: Some((id.cert.clone(), id.key.clone())),
    }));
    let reporter = tokio::spawn(report_inventories(inventories, Arc::clone(&endpoint)));
    let auditor = tokio::spawn(send_audit(audit_rx, Arc::clone(&endpoint)));
    let follow_locks = {
        let (endpoint, signal) = (Arc::clone(&endpoint), Arc::clone(&locks));
        tokio::spawn(gatehouse_controlplane::watch::follow_locks(
            move || endpoint.lock().ok().map(|e| e.clone()),
            None,
            locks.view(),
            move |_| signal.changed(),
        ))
    };
    let advertise = config.advertise_addr.clone().unwrap_or_else(|| {
        if proxy.local_addr.ip().is_unspecified() {
            format!("{}:{}", config.host_name, proxy.local_addr.port())
        } else {
            proxy.local_addr.to_string()
        }
    });
    proxies.set_self(advertise.clone());
    // As a leaf: a tunnel to each root this cluster trusts.
    let (roots, wanted) = tokio::sync::watch::channel(Vec::new());
    let role_maps = crate::leaf_link::RoleMaps::default();
    crate::leaf_link::spawn(
        wanted,
        Arc::clone(&role_maps),
        Arc::clone(&endpoint),
        (id.cluster.clone(), id.ca.clone()),
        proxy.local_addr,
    )
    .map_err(|source| ProxyRoleError::Start {
        listen: config.listen,
        source,
    })?;
    let ca_pem = Arc::new(arc_swap::ArcSwap::from_pointee(id.ca.clone()));
    let renew_now = Arc::new(tokio::sync::Notify::new());
    let renew_verifier = Arc::clone(&verifier);
    let peers = crate::peers::start(
        advertise,
        Arc::clone(&endpoint),
        crate::peers::Shared {
            proxies,
            metrics: Arc::clone(&metrics),
            leaves,
            verifier,
            renew_now: Arc::clone(&renew_now),
            roots,
            role_maps,
            host_cas,
        },
    );
    let cluster = id.cluster.clone();
    let renew = tokio::spawn(renew_proxy_identity(
        id,
        Renewing {
            cert,
            endpoint,
            client_addr: Arc::clone(&client_addr),
            trust: Arc::clone(&ca_pem),
            verifier: renew_verifier,
            now: renew_now,
        },
    ));
    Ok(ProxyHandle {
        addr: proxy.local_addr,
        io_backend: proxy.io_backend,
        cluster,
        ca_pem,
        auth_addr: config.auth_addr.clone(),
        client_addr,
        local_clients,
        proxy,
        browser_cert,
        reporter,
        auditor,
        renew,
        follow_locks,
        peers,
    })
}

/// Issued in-process when Auth runs here, else joined with a `proxy` token and kept.
async fn identity(
    config: &ProxyRoleConfig,
    local_auth: Option<&AuthService>,
    sans: &[String],
) -> Result<ProxyIdentity, ProxyRoleError> {
    if let Some(service) = local_auth {
        let state = Arc::clone(service.state());
        let (cert, key, ca) = issue_local(&state, &config.host_name, sans)
            .map_err(|e| ProxyRoleError::Identity(e.to_string()))?;
        return Ok(ProxyIdentity {
            cert,
            key,
            ca,
            cluster: state.cluster.clone(),
            source: Source::Local {
                host_name: config.host_name.clone(),
                sans: sans.to_vec(),
                state,
            },
        });
    }
    let dir = config.data_dir.join("proxy");
    let id = match HostIdentity::load(&dir)? {
        Some(id) => id,
        None => {
            let token = config.join.token.as_deref().ok_or_else(|| {
                ProxyRoleError::Config(
                    "a proxy without a local Auth joins with --token (a `proxy` token) and --ca-pin"
                        .into(),
                )
            })?;
            let pin = config.join.ca_pin.as_deref().ok_or_else(|| {
                ProxyRoleError::Config("pass --ca-pin (printed by the Auth server at start)".into())
            })?;
            let id =
                HostIdentity::join(&config.auth_addr, pin, token, &config.host_name, sans).await?;
            id.save(&dir)?;
            id
        }
    };
    Ok(ProxyIdentity {
        cert: id.tls_cert.clone(),
        key: id.tls_key.clone(),
        ca: id.ca_pem.clone(),
        cluster: id.cluster.clone(),
        source: Source::Joined {
            host: Box::new(id),
            dir,
        },
    })
}

fn unix_now() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp()
}

/// What a renewal keeps current besides the certificate itself.
struct Renewing {
    cert: Arc<ReloadableCert>,
    endpoint: Arc<std::sync::Mutex<AuthEndpoint>>,
    client_addr: Arc<arc_swap::ArcSwapOption<gatehouse_controlplane::client_addr::Asserter>>,
    /// The CA certificates trusted (shared with the web UI and the handle).
    trust: Arc<arc_swap::ArcSwap<String>>,
    verifier: Arc<gatehouse_controlplane::leaf_trust::ClusterClientVerifier>,
    /// Woken by the watch stream when the X.509 CA changed (a rotation, its grace ending).
    now: Arc<tokio::sync::Notify>,
}

/// Renew the proxy's certificate at two thirds of its lifetime, and at once when the X.509 CA
/// changed, for ever: new handshakes get the new one (and the CAs trusted now), connections up
/// (agents' tunnels, sessions) keep theirs; Auth calls use it from their next connection. A
/// failure is retried with backoff.
async fn renew_proxy_identity(mut id: ProxyIdentity, r: Renewing) {
    let mut failures: u32 = 0;
    loop {
        let renew_at = validity(&id.cert)
            .map(|(from, to)| from + (to - from) * 2 / 3)
            .unwrap_or(0);
        let wait = u64::try_from(renew_at - unix_now()).unwrap_or(0).max(1);
        tokio::select! {
            () = tokio::time::sleep(Duration::from_secs(wait)) => {}
            () = r.now.notified() => {
                tracing::info!("proxy: the cluster's X.509 CA changed; renewing the certificate now");
            }
        }
        let endpoint = &r.endpoint;
        let renewed: Result<(String, String, String), String> = match &mut id.source {
            Source::Local {
                state,
                host_name,
                sans,
            } => issue_local(state, host_name, sans).map_err(|e| e.to_string()),
            Source::Joined { host, dir } => {
                let current = endpoint.lock().ok().map(|e| e.clone());
                let result = match current {
                    Some(e) => match e.connect().await {
                        Ok(mut c) => host.renew(&mut c).await.map_err(|e| e.to_string()),
                        Err(e) => Err(e.to_string()),
                    },
                    None => Err("the Auth endpoint is poisoned".into()),
                };
                result.map(|next| {
                    if let Err(e) = next.save(dir) {
                        tracing::error!(error = %e, "proxy: cannot store the renewed identity; using it in memory");
                    }
                    let triple = (
                        next.tls_cert.clone(),
                        next.tls_key.clone(),
                        next.ca_pem.clone(),
                    );
                    **host = next;
                    triple
                })
            }
        };
        match renewed {
            Ok((new_cert, new_key, new_ca)) => {
                failures = 0;
                if let Err(e) = r.cert.set(&format!("{new_cert}{new_ca}"), &new_key) {
                    tracing::error!(error = %e, "proxy: renewed certificate refused");
                }
                match gatehouse_controlplane::client_addr::Asserter::new(&new_cert, &new_key) {
                    Ok(a) => r.client_addr.store(Some(Arc::new(a))),
                    Err(e) => {
                        tracing::warn!(error = %e, "proxy: cannot assert addresses with the renewed certificate")
                    }
                }
                if let Err(e) = r.verifier.set_own(&new_ca) {
                    tracing::error!(error = %e, "proxy: the CA certificates Auth sent cannot be used");
                }
                if let Ok(mut e) = endpoint.lock() {
                    e.identity = Some((new_cert.clone(), new_key.clone()));
                    e.trust = Trust::CaPem(new_ca.clone());
                }
                r.trust.store(Arc::new(new_ca.clone()));
                id.cert = new_cert;
                id.key = new_key;
                id.ca = new_ca;
                tracing::info!(
                    valid_until = validity(&id.cert).map(|v| v.1).unwrap_or(0),
                    "proxy: certificate renewed"
                );
            }
            Err(e) => {
                failures = failures.saturating_add(1);
                let backoff = Duration::from_secs((1u64 << failures.min(6)).min(60));
                tracing::warn!(error = %e, retry_in = ?backoff, "proxy: cannot renew its certificate");
                tokio::time::sleep(backoff).await;
            }
        }
    }
}

/// The in-process proxy's certificate (with its intermediates), key and the CA certificates
/// trusted now (PEM), valid for the cluster's host certificate lifetime.
fn issue_local(
    state: &gatehouse_controlplane::server::AuthState,
    host_name: &str,
    sans: &[String],
) -> Result<(String, String, String), gatehouse_controlplane::ca::CaError> {
    let now = time::OffsetDateTime::now_utc();
    let ttl = time::Duration::try_from(state.host_cert_ttl).unwrap_or(time::Duration::days(7));
    let identity = Identity {
        kind: IdentityKind::Node,
        name: format!("proxy-{host_name}"),
        roles: vec!["@proxy".into()],
        logins: vec![],
        traits: BTreeMap::from([("host_name".to_string(), vec![host_name.to_owned()])]),
        cluster: state.cluster.clone(),
        route_to_cluster: state.cluster.clone(),
        bot: None,
        expires: (now + ttl).unix_timestamp(),
    };
    let mut all_sans = vec![
        PROXY_SERVER_NAME.to_string(),
        "localhost".into(),
        "127.0.0.1".into(),
    ];
    all_sans.extend(sans.iter().cloned());
    all_sans.sort();
    all_sans.dedup();
    let tls = state.tls.load();
    let (cert, key) =
        tls.issue_with_new_key(&identity, TlsUsage::ServerAndClient, &all_sans, now)?;
    Ok((cert, key, tls.trusted_pem(now.unix_timestamp())))
}

/// Send the proxy's own audit events to Auth, a batch at a time; kept (up to 10,000) and sent
/// again while Auth is away, each once (Auth deduplicates by event id).
async fn send_audit(
    mut rx: tokio::sync::mpsc::UnboundedReceiver<proto::AuditEvent>,
    endpoint: Arc<std::sync::Mutex<AuthEndpoint>>,
) {
    let mut pending: Vec<proto::AuditEvent> = Vec::new();
    let mut client: Option<Client> = None;
    loop {
        if pending.is_empty() {
            match rx.recv().await {
                Some(e) => pending.push(e),
                None => return,
            }
        }
        while let Ok(e) = rx.try_recv() {
            pending.push(e);
        }
        if pending.len() > 10_000 {
            let drop = pending.len() - 10_000;
            tracing::warn!(
                dropped = drop,
                "proxy: audit events dropped while Auth is away"
            );
            pending.drain(..drop);
        }
        if client.is_none() {
            let current = endpoint.lock().ok().map(|e| e.clone());
            if let Some(e) = current {
                client = e.connect().await.ok();
            }
        }
        let sent = match client.as_mut() {
            Some(c) => c
                .emit_events(proto::EmitEventsRequest {
                    events: pending.clone(),
                })
                .await
                .is_ok(),
            None => false,
        };
        if sent {
            pending.clear();
        } else {
            client = None;
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
    }
}

/// How long Auth keeps a node listed after its last heartbeat reached it.
const NODE_TTL: Duration = Duration::from_secs(60);
/// An unchanged node is written again after this long (well within [`NODE_TTL`]).
const NODE_REFRESH: Duration = Duration::from_secs(20);

/// The nodes of a batch to send to Auth now: those whose inventory changed since it was last
/// sent, or that were last sent [`NODE_REFRESH`] ago. Pure: `sent` is what Auth has (and when).
fn due<'a>(
    pending: &'a HashMap<String, Inventory>,
    sent: &HashMap<String, (Inventory, std::time::Instant)>,
    now: std::time::Instant,
) -> Vec<&'a Inventory> {
    pending
        .values()
        .filter(|inv| match sent.get(&inv.host_id) {
            Some((last, at)) => last != *inv || now.duration_since(*at) >= NODE_REFRESH,
            None => true,
        })
        .collect()
}

/// Batch agents' heartbeats to Auth: every 5 s, in one call, the nodes that changed or are due
/// a refresh (every 20 s; Auth keeps a node 60 s). Auth's writes grow with the agents' changes
/// and the refresh rate, its calls with the proxy count.
async fn report_inventories(
    mut rx: tokio::sync::mpsc::UnboundedReceiver<Vec<Inventory>>,
    endpoint: Arc<std::sync::Mutex<AuthEndpoint>>,
) {
    let mut pending: HashMap<String, Inventory> = HashMap::new();
    let mut sent: HashMap<String, (Inventory, std::time::Instant)> = HashMap::new();
    let mut client: Option<Client> = None;
    let mut tick = tokio::time::interval(Duration::from_secs(5));
    loop {
        tokio::select! {
            batch = rx.recv() => match batch {
                Some(batch) => {
                    for inv in batch {
                        pending.insert(inv.host_id.clone(), inv);
                    }
                }
                None => return,
            },
            _ = tick.tick() => {
                let now = std::time::Instant::now();
                // Hosts not heard of for a node lifetime are forgotten (Auth drops them too).
                sent.retain(|_, (_, at)| now.duration_since(*at) < NODE_TTL);
                let nodes: Vec<proto::Node> = due(&pending, &sent, now)
                    .into_iter()
                    .map(|i| proto::Node {
                        host_id: i.host_id.clone(),
                        name: i.name.clone(),
                        labels: i.labels.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
                        addresses: i.addresses.clone(),
                        services: i.services.clone(),
                        apps: i
                            .services
                            .iter()
                            .filter_map(|s| s.strip_prefix("tcp:"))
                            .map(|name| proto::App {
                                name: name.to_owned(),
                                labels: i
                                    .app_labels
                                    .get(name)
                                    .map(|l| l.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
                                    .unwrap_or_default(),
                            })
                            .collect(),
                        last_seen: 0,
                        expires: 0,
                    })
                    .collect();
                if nodes.is_empty() {
                    pending.clear();
                    continue;
                }
                if client.is_none() {
                    let current = endpoint.lock().ok().map(|e| e.clone());
                    if let Some(e) = current {
                        client = e.connect().await.ok();
                    }
                }
                let Some(c) = client.as_mut() else { continue };
                let ttl_seconds = NODE_TTL.as_secs();
                match c.upsert_nodes(proto::UpsertNodesRequest { nodes, ttl_seconds }).await {
                    Ok(_) => {
                        for (host_id, inv) in pending.drain() {
                            let unchanged = sent.get(&host_id).is_some_and(|(last, _)| *last == inv);
                            let at = match sent.get(&host_id) {
                                Some((_, at)) if unchanged && now.duration_since(*at) < NODE_REFRESH => *at,
                                _ => now,
                            };
                            sent.insert(host_id, (inv, at));
                        }
                    }
                    Err(e) => {
                        tracing::warn!(error = %e.message(), "proxy: cannot report heartbeats to Auth; will retry");
                        client = None;
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inv(host: &str, name: &str) -> Inventory {
        Inventory {
            host_id: host.into(),
            name: name.into(),
            ..Default::default()
        }
    }

    #[test]
    fn only_changed_or_stale_nodes_are_due() {
        let t0 = std::time::Instant::now();
        let pending: HashMap<String, Inventory> = [
            ("a".to_string(), inv("a", "web")),
            ("b".to_string(), inv("b", "db")),
            ("c".to_string(), inv("c", "new")),
        ]
        .into();
        let sent: HashMap<String, (Inventory, std::time::Instant)> = [
            ("a".to_string(), (inv("a", "web"), t0)),
            ("b".to_string(), (inv("b", "old-name"), t0)),
        ]
        .into();
        let mut hosts: Vec<&str> = due(&pending, &sent, t0 + Duration::from_secs(5))
            .iter()
            .map(|i| i.host_id.as_str())
            .collect();
        hosts.sort();
        assert_eq!(hosts, ["b", "c"]);
        assert_eq!(due(&pending, &sent, t0 + NODE_REFRESH).len(), 3);
    }
}
