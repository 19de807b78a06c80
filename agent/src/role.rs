//! The agent role as a daemon runs it: [`start`] gets the host identity (kept in
//! `<data-dir>/agent/`; issued in-process when Auth runs beside it, else joined once with a
//! `node` token through the proxy), opens the audit spool and its sender, the role source the
//! SSH service authorizes with, and the reverse tunnel. The returned [`AgentHandle`] stops it.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use gatehouse_controlplane::client::{AuthEndpoint, Client};
use gatehouse_controlplane::host::{HostError, HostIdentity, JoinParams, NewKeys};
use gatehouse_controlplane::locks::LockView;
use gatehouse_controlplane::proto;
use gatehouse_controlplane::resources::{Resource, Role};
use gatehouse_controlplane::server::AuthService;
use gatehouse_dataplane::io::quic::TunnelTransport;

use crate::recording::Recordings;
use crate::runner::{SshService, StreamMeta, TunnelClientConfig, TunnelStatus, TunnelThread};
use crate::spool::Spool;
use crate::ssh::{AuditSink, BoxFuture, ConnMeta, RoleSource, SshNode, SshNodeConfig};

/// What the agent role is started with.
#[derive(Debug, Clone)]
pub struct AgentRoleConfig {
    /// The agent's own directory (`<data-dir>/agent/`): identity and audit spool.
    pub data_dir: PathBuf,
    /// The proxy to dial (and to reach Auth through).
    pub proxy_addr: String,
    pub node_name: String,
    pub labels: BTreeMap<String, String>,
    /// TCP apps by name: address and labels.
    pub apps: BTreeMap<String, crate::apps::App>,
    pub addresses: Vec<String>,
    /// Serve SSH (false: TCP apps only).
    pub ssh: bool,
    /// How the tunnel reaches the proxy: TLS over TCP (default) or QUIC.
    pub transport: TunnelTransport,
    /// TCP congestion control for a TLS tunnel's connection (the agent sends a download's bytes
    /// on it), e.g. `cubic`; `None` keeps the host's default. (QUIC: quinn's own.)
    pub tcp_congestion: Option<String>,
    /// For an agent without a local Auth.
    pub join: JoinParams,
    /// Bytes of session recordings the agent keeps on disk while Auth has not taken them.
    pub recording_quota: u64,
}

/// The default recording spool quota: 1 GiB.
pub const DEFAULT_RECORDING_QUOTA: u64 = 1 << 30;

/// A running agent.
#[derive(Debug)]
pub struct AgentHandle {
    pub status: Arc<TunnelStatus>,
    pub spool: Arc<Spool>,
    /// Session recordings (when the agent serves SSH).
    pub recordings: Option<Arc<Recordings>>,
    /// The node's name as its certificate says.
    pub node_name: String,
    pub cluster: String,
    tunnel: TunnelThread,
    deliver: tokio::task::JoinHandle<()>,
    upload: Option<tokio::task::JoinHandle<()>>,
    renew: tokio::task::JoinHandle<()>,
    follow: tokio::task::JoinHandle<()>,
    follow_roots: Option<tokio::task::JoinHandle<()>>,
    follow_locks: tokio::task::JoinHandle<()>,
    follow_cas: tokio::task::JoinHandle<()>,
}

impl AgentHandle {
    /// Close the tunnel and stop sending audit events (what is not sent stays in the spool).
    pub fn shutdown(self) {
        self.tunnel.stop();
        self.deliver.abort();
        self.renew.abort();
        self.follow.abort();
        self.follow_locks.abort();
        self.follow_cas.abort();
        if let Some(f) = self.follow_roots {
            f.abort();
        }
        if let Some(u) = self.upload {
            u.abort();
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("spool: {0}")]
    Spool(#[from] crate::spool::SpoolError),
    #[error("identity: {0}")]
    Identity(String),
    #[error("{0}")]
    Host(#[from] HostError),
    #[error("ssh: {0}")]
    Ssh(#[from] crate::ssh::SshError),
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
}

/// The agent's host identity: kept in `<data-dir>/agent/`; issued in-process when Auth runs
/// here, else joined with a `node` token through the proxy.
async fn identity(
    config: &AgentRoleConfig,
    local_auth: Option<&AuthService>,
) -> Result<HostIdentity, AgentError> {
    if let Some(id) = HostIdentity::load(&config.data_dir)? {
        return Ok(id);
    }
    gatehouse_controlplane::resources::validate_name(&config.node_name)
        .map_err(|m| AgentError::Identity(format!("node name: {m}")))?;
    let id = match local_auth {
        Some(service) => {
            let keys = NewKeys::generate()?;
            let req = keys.join_request("", &config.node_name, &config.addresses)?;
            let ssh_pub = ssh_key::PublicKey::from_openssh(&req.ssh_public_key)
                .map_err(|e| AgentError::Identity(e.to_string()))?;
            let resp = service
                .issue_local_host(&req, &ssh_pub)
                .await
                .map_err(|s| {
                    AgentError::Identity(format!(
                        "issuing the local agent's identity: {}",
                        s.message()
                    ))
                })?;
            keys.into_identity(&config.node_name, resp)?
        }
        None => {
            let token = config.join.token.as_deref().ok_or_else(|| {
                AgentError::Identity(
                    "an agent joins with --token (a `node` token) and --ca-pin".into(),
                )
            })?;
            let pin = config.join.ca_pin.as_deref().ok_or_else(|| {
                AgentError::Identity("pass --ca-pin (printed by the Auth server at start)".into())
            })?;
            HostIdentity::join(
                &config.proxy_addr,
                pin,
                token,
                &config.node_name,
                &config.addresses,
            )
            .await
            .map_err(|e| {
                AgentError::Identity(format!("joining the cluster through the proxy: {e}"))
            })?
        }
    };
    id.save(&config.data_dir)?;
    Ok(id)
}

/// Start the agent's services on the current (multi-threaded) tokio runtime.
pub async fn start(
    config: AgentRoleConfig,
    local_auth: Option<&AuthService>,
) -> Result<AgentHandle, AgentError> {
    if let Some(cc) = &config.tcp_congestion {
        gatehouse_dataplane::io::check_tcp_congestion(cc)?;
    }
    let identity = Arc::new(identity(&config, local_auth).await?);
    // The certificate names the node: a renamed host keeps its identity's name.
    let node_name = identity.host_name.clone();
    let spool = Spool::open(&config.data_dir.join("spool"))?;
    let auth = Arc::new(AuthLink::new(
        identity.auth_endpoint(&config.proxy_addr),
        config.tcp_congestion.clone(),
    ));
    let deliver = tokio::spawn(deliver(Arc::clone(&spool), Arc::clone(&auth)));

    let mut recordings = None;
    let mut upload = None;
    let mut ssh_node = None;
    let audit: Arc<dyn AuditSink> = Arc::new(SpoolSink(Arc::clone(&spool)));
    let roles = Arc::new(CachedRoles {
        auth: Arc::clone(&auth),
        cache: Mutex::new(HashMap::new()),
    });
    // A trusted root's users (leaf clusters): their CA and role map, followed from Auth.
    let trusted_roots = Arc::new(arc_swap::ArcSwap::from_pointee(Vec::new()));
    let follow_roots = (config.ssh || !config.apps.is_empty()).then(|| {
        let link = Arc::clone(&auth);
        tokio::spawn(crate::trust::follow_roots(
            move || link.endpoint(),
            auth.socket_setup(),
            Arc::clone(&trusted_roots),
        ))
    });
    // The locks in force, followed from Auth (through the proxy) for as long as the agent runs.
    let locks: Arc<arc_swap::ArcSwap<LockView>> = Arc::default();
    let apps = (!config.apps.is_empty()).then(|| {
        Arc::new(crate::apps::AppService::new(
            config.apps.clone(),
            Arc::clone(&roles) as Arc<dyn RoleSource>,
            Arc::clone(&audit),
            node_name.clone(),
            identity.cluster.clone(),
            Arc::clone(&trusted_roots),
            Arc::clone(&locks),
        ))
    });
    let ssh: Option<Arc<dyn SshService>> = if config.ssh {
        let host_key = ssh_key::PrivateKey::from_openssh(&identity.ssh_key)
            .map_err(|e| AgentError::Identity(e.to_string()))?;
        let recs = Recordings::open(
            &config.data_dir.join("recordings"),
            config.recording_quota,
            gatehouse_recording::Signer {
                key: host_key.clone(),
                certificate: identity.ssh_cert.trim().to_owned(),
            },
            Arc::clone(&audit),
        )?;
        upload = Some(crate::recording::spawn_uploader(
            Arc::clone(&recs),
            Arc::clone(&auth),
        ));
        recordings = Some(Arc::clone(&recs));
        let cfg = SshNodeConfig {
            trusted_roots: Arc::clone(&trusted_roots),
            locks: Arc::clone(&locks),
            host_key,
            host_cert: ssh_key::Certificate::from_openssh(&identity.ssh_cert)
                .map_err(|e| AgentError::Identity(e.to_string()))?,
            user_ca_keys: identity
                .ssh_user_ca
                .iter()
                .filter_map(|l| ssh_key::PublicKey::from_openssh(l).ok())
                .collect(),
            cluster: identity.cluster.clone(),
            node_name: node_name.clone(),
            labels: config.labels.clone(),
        };
        let node = Arc::new(
            SshNode::new(
                cfg,
                Arc::clone(&roles) as Arc<dyn RoleSource>,
                Arc::clone(&audit),
            )?
            .with_recordings(recs),
        );
        ssh_node = Some(Arc::clone(&node));
        Some(Arc::new(SshAdapter(node)))
    } else {
        None
    };
    let follow_locks = {
        let (link, node, apps) = (Arc::clone(&auth), ssh_node.clone(), apps.clone());
        tokio::spawn(gatehouse_controlplane::watch::follow_locks(
            move || link.endpoint(),
            Some(auth.socket_setup()),
            Arc::clone(&locks),
            move |_view| {
                let sessions = node.as_ref().map_or(0, |n| n.end_locked());
                let app_sessions = apps.as_ref().map_or(0, |a| a.end_locked());
                if sessions + app_sessions > 0 {
                    tracing::warn!(sessions, app_sessions, "agent: a lock ended live sessions");
                }
            },
        ))
    };
    let tunnel_config = TunnelClientConfig {
        proxy_addr: config.proxy_addr.clone(),
        node_name: node_name.clone(),
        labels: config.labels.clone(),
        apps: apps.clone(),
        addresses: config.addresses.clone(),
        heartbeat_interval: Duration::from_secs(10),
        tunnel: Default::default(),
        transport: config.transport,
        tcp_congestion: config.tcp_congestion.clone(),
    };
    let cluster = identity.cluster.clone();
    let shared = Arc::new(arc_swap::ArcSwap::new(identity));
    let renew_now = Arc::new(tokio::sync::Notify::new());
    let follow_cas = {
        let link = Arc::clone(&auth);
        tokio::spawn(crate::authorities::follow(
            move || link.endpoint(),
            auth.socket_setup(),
            ssh_node.clone(),
            Arc::clone(&shared),
            Arc::clone(&renew_now),
        ))
    };
    let renew = tokio::spawn(renew_host_identity(Renewal {
        identity: Arc::clone(&shared),
        data_dir: config.data_dir.clone(),
        auth: Arc::clone(&auth),
        ssh: ssh_node,
        recordings: recordings.clone(),
        now: renew_now,
    }));
    let (status, tunnel, announced) = crate::runner::spawn(
        tunnel_config,
        shared,
        ssh,
        tokio::runtime::Handle::current(),
    )?;
    let follow = tokio::spawn(auth_through_every_proxy(
        config.proxy_addr.clone(),
        announced,
        Arc::clone(&auth),
    ));
    Ok(AgentHandle {
        status,
        spool,
        recordings,
        upload,
        node_name,
        cluster,
        tunnel,
        deliver,
        renew,
        follow,
        follow_roots,
        follow_locks,
        follow_cas,
    })
}

/// Reach Auth (audit, recordings, renewals) through any proxy announced, the configured one
/// first: a proxy that dies does not cut the agent off from Auth.
async fn auth_through_every_proxy(
    seed: String,
    mut announced: crate::runner::Announced,
    auth: Arc<AuthLink>,
) {
    while announced.changed().await.is_ok() {
        let mut addrs = vec![seed.clone()];
        addrs.extend(
            announced
                .borrow_and_update()
                .iter()
                .filter(|a| **a != seed)
                .cloned(),
        );
        auth.set_addrs(addrs.join(","));
    }
}

/// What a host certificate renewal updates.
struct Renewal {
    identity: Arc<arc_swap::ArcSwap<HostIdentity>>,
    data_dir: PathBuf,
    auth: Arc<AuthLink>,
    ssh: Option<Arc<SshNode>>,
    recordings: Option<Arc<Recordings>>,
    /// Renew now (a host CA rotation).
    now: Arc<tokio::sync::Notify>,
}

fn unix_now() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp()
}

/// Renew the host certificates at two thirds of their lifetime, for ever: the new identity is
/// saved, then used by new SSH connections, the recordings' signatures, Auth calls and the
/// tunnel's next dial. Nothing running is interrupted. A failure is retried with backoff
/// until the certificate expires.
async fn renew_host_identity(r: Renewal) {
    let mut failures: u32 = 0;
    loop {
        let current = r.identity.load_full();
        let wait = u64::try_from(current.renew_at() - unix_now()).unwrap_or(0);
        tokio::select! {
            () = tokio::time::sleep(Duration::from_secs(wait.max(1))) => {}
            () = r.now.notified() => {
                tracing::info!("agent: a CA (host or X.509) changed; renewing the host certificate now");
            }
        }
        let renewed = match r.auth.client().await {
            Ok(mut c) => current.renew(&mut c).await.map_err(|e| e.to_string()),
            Err(e) => Err(e),
        };
        let next = match renewed {
            Ok(next) => next,
            Err(e) => {
                r.auth.forget().await;
                failures = failures.saturating_add(1);
                let left = current
                    .validity()
                    .map(|(_, to)| to - unix_now())
                    .unwrap_or(0);
                let backoff = Duration::from_secs((1u64 << failures.min(6)).min(60));
                tracing::warn!(error = %e, seconds_left = left, retry_in = ?backoff, "agent: cannot renew the host certificate");
                tokio::time::sleep(backoff).await;
                continue;
            }
        };
        failures = 0;
        if let Err(e) = next.save(&r.data_dir) {
            tracing::error!(error = %e, "agent: cannot store the renewed identity; using it in memory");
        }
        if let Some(ssh) = &r.ssh {
            match ssh_key::Certificate::from_openssh(&next.ssh_cert) {
                Ok(cert) => {
                    if let Err(e) = ssh.set_host_cert(&cert) {
                        tracing::error!(error = %e, "agent: renewed SSH host certificate refused");
                    }
                }
                Err(e) => {
                    tracing::error!(error = %e, "agent: renewed SSH host certificate unreadable")
                }
            }
        }
        if let Some(recs) = &r.recordings {
            recs.set_host_certificate(next.ssh_cert.trim().to_owned());
        }
        r.auth
            .set_identity(
                next.tls_cert.clone(),
                next.tls_key.clone(),
                next.ca_pem.clone(),
            )
            .await;
        let until = next.validity().map(|(_, to)| to).unwrap_or(0);
        r.identity.store(Arc::new(next));
        tracing::info!(valid_until = until, "agent: host certificate renewed");
    }
}

/// A lazily (re)connected Auth client, reached through the Proxy's pass-through.
pub(crate) struct AuthLink {
    /// Its client certificate is replaced when the host identity renews.
    endpoint: Mutex<AuthEndpoint>,
    /// The agent's TCP congestion control, for this connection to the proxy as for the tunnel.
    tcp_congestion: Option<String>,
    client: tokio::sync::Mutex<Option<Client>>,
}

impl AuthLink {
    fn new(endpoint: AuthEndpoint, tcp_congestion: Option<String>) -> Self {
        Self {
            endpoint: Mutex::new(endpoint),
            tcp_congestion,
            client: tokio::sync::Mutex::new(None),
        }
    }

    pub(crate) async fn client(&self) -> Result<Client, String> {
        let mut guard = self.client.lock().await;
        if let Some(c) = guard.as_ref() {
            return Ok(c.clone());
        }
        let endpoint = self
            .endpoint
            .lock()
            .map_err(|_| "the Auth endpoint is poisoned".to_string())?
            .clone();
        let c = endpoint
            .connect_with(self.socket_setup())
            .await
            .map_err(|e| gatehouse_controlplane::client::error_chain(&e))?;
        *guard = Some(c.clone());
        Ok(c)
    }

    pub(crate) async fn forget(&self) {
        *self.client.lock().await = None;
    }

    /// What each of the agent's sockets to the proxy gets: its congestion control.
    pub(crate) fn socket_setup(&self) -> gatehouse_controlplane::client::SocketSetup {
        let cc = self.tcp_congestion.clone();
        Arc::new(move |tcp| match &cc {
            Some(cc) => gatehouse_dataplane::io::set_tcp_congestion(tcp, cc),
            None => Ok(()),
        })
    }

    /// Where Auth is now, for other connections to it (the watch stream).
    pub(crate) fn endpoint(&self) -> Option<AuthEndpoint> {
        self.endpoint.lock().ok().map(|e| e.clone())
    }

    /// Reach Auth through these proxies (comma-separated) from the next connection on.
    fn set_addrs(&self, list: String) {
        if let Ok(mut e) = self.endpoint.lock() {
            e.addr = list;
        }
    }

    /// Authenticate with this certificate from now on (the next connection uses it).
    async fn set_identity(&self, cert: String, key: String, ca_pem: String) {
        if let Ok(mut e) = self.endpoint.lock() {
            e.identity = Some((cert, key));
            e.trust = gatehouse_controlplane::tls::Trust::CaPem(ca_pem);
        }
        self.forget().await;
    }
}

/// Deliver spooled events to Auth in batches; on failure wait and retry (the events stay on disk).
async fn deliver(spool: Arc<Spool>, auth: Arc<AuthLink>) {
    let mut failures: u32 = 0;
    loop {
        let (batch, next) = match spool.pending() {
            Ok(p) => p,
            Err(e) => {
                tracing::error!(error = %e, "spool: cannot read");
                tokio::time::sleep(Duration::from_secs(5)).await;
                continue;
            }
        };
        if batch.is_empty() {
            spool.wait(Duration::from_secs(5)).await;
            continue;
        }
        let events: Vec<proto::AuditEvent> = batch
            .iter()
            .map(|e| proto::AuditEvent {
                event_id: e.event_id.clone(),
                r#type: e.event_type.clone(),
                time_nanos: e.time_nanos,
                actor: e.actor.clone(),
                source_addr: e.source_addr.clone(),
                data_json: e.data.to_string(),
                id: 0,
                cluster: String::new(),
            })
            .collect();
        let sent = match auth.client().await {
            Ok(mut c) => c
                .emit_events(proto::EmitEventsRequest { events })
                .await
                .map_err(|s| s.to_string()),
            Err(e) => Err(e),
        };
        match sent {
            Ok(_) => {
                failures = 0;
                if let Err(e) = spool.delivered(next) {
                    tracing::error!(error = %e, "spool: cannot record delivery (events may be sent twice; Auth deduplicates)");
                }
            }
            Err(e) => {
                auth.forget().await;
                failures = failures.saturating_add(1);
                let wait = Duration::from_millis(500)
                    .saturating_mul(1 << failures.min(6))
                    .min(Duration::from_secs(15));
                tracing::warn!(error = %e, pending = batch.len(), retry_in = ?wait, "spool: Auth unreachable; events stay on disk");
                tokio::time::sleep(wait).await;
            }
        }
    }
}

struct SpoolSink(Arc<Spool>);

impl AuditSink for SpoolSink {
    fn emit(&self, event_type: &str, actor: &str, data: serde_json::Value) {
        let source = data
            .get("source_addr")
            .and_then(|v| v.as_str())
            .unwrap_or_default()
            .to_owned();
        if let Err(e) = self.0.emit(event_type, actor, &source, data) {
            tracing::error!(error = %e, event_type, "audit: cannot spool an event");
        }
    }
}

/// Roles from Auth, cached for 30 s; a stale copy is used while Auth is unreachable.
struct CachedRoles {
    auth: Arc<AuthLink>,
    cache: Mutex<HashMap<String, (Role, Instant)>>,
}

const ROLE_TTL: Duration = Duration::from_secs(30);

impl RoleSource for CachedRoles {
    fn roles<'a>(&'a self, names: &'a [String]) -> BoxFuture<'a, Result<Vec<Role>, String>> {
        Box::pin(async move {
            let mut out = Vec::with_capacity(names.len());
            for name in names {
                let cached = self.cache.lock().ok().and_then(|c| c.get(name).cloned());
                if let Some((role, at)) = &cached
                    && at.elapsed() < ROLE_TTL
                {
                    out.push(role.clone());
                    continue;
                }
                let fetched = match self.auth.client().await {
                    Ok(mut c) => c
                        .get_resource(proto::GetResourceRequest {
                            kind: "role".into(),
                            name: name.clone(),
                        })
                        .await
                        .map(|r| r.into_inner().json)
                        .map_err(|s| (s.code(), s.message().to_owned())),
                    Err(e) => Err((tonic::Code::Unavailable, e)),
                };
                match fetched {
                    Ok(json) => match gatehouse_controlplane::resources::parse_document(&json) {
                        Ok(Resource::Role(role)) => {
                            if let Ok(mut c) = self.cache.lock() {
                                c.insert(name.clone(), (role.clone(), Instant::now()));
                            }
                            out.push(role);
                        }
                        _ => return Err(format!("role `{name}` from Auth is malformed")),
                    },
                    // A role deleted since the certificate was issued grants nothing.
                    Err((tonic::Code::NotFound, _)) => {
                        if let Ok(mut c) = self.cache.lock() {
                            c.remove(name);
                        }
                    }
                    Err((_, e)) => {
                        self.auth.forget().await;
                        match cached {
                            Some((role, _)) => out.push(role),
                            None => {
                                return Err(format!("cannot fetch role `{name}` from Auth: {e}"));
                            }
                        }
                    }
                }
            }
            Ok(out)
        })
    }
}

struct SshAdapter(Arc<SshNode>);

impl SshService for SshAdapter {
    fn serve(
        &self,
        io: tokio::io::DuplexStream,
        meta: StreamMeta,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>> {
        let node = Arc::clone(&self.0);
        Box::pin(async move {
            let conn = ConnMeta {
                source_addr: meta.source_addr.clone(),
                proxy_user: meta.user,
            };
            if let Err(e) = node.serve(io, conn).await {
                tracing::info!(source = %meta.source_addr, error = %e, "ssh: connection ended with an error");
            }
        })
    }
}
