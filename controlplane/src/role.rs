//! The Auth role as a daemon runs it: [`start`] opens storage, creates the CAs on first start
//! (reuses them after), issues the server's and the admin's certificates and serves the gRPC
//! API over mutual TLS; the returned [`AuthHandle`] stops it gracefully. (Diagnostics are the
//! daemon's, in `gatehouse-diag`.)

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::registry::Registry;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::Connected;

use crate::ca::{CaKind, SshCa, TlsCa, TlsUsage};
use crate::files::{create_private_dir, write_identity_dir};
use crate::identity::{Identity, IdentityKind};
use crate::proto::auth_server::AuthServer;
use crate::server::{AuthService, AuthState, PeerInfo};
use crate::storage::{Store, StoreError};

/// Validity of the admin identity in the data dir; re-issued at every start and every day.
const ADMIN_IDENTITY_TTL: Duration = Duration::from_secs(7 * 24 * 3600);
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// `[auth]` in the daemon's TOML config.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    pub listen: SocketAddr,
    /// Extra names/IPs for the Auth server certificate.
    pub public_addrs: Vec<String>,
    /// Session recordings: how agents record, and where Auth keeps them.
    pub recording: crate::recordings::RecordingConfig,
    /// Where recordings are kept, also accepted as `[auth.recordings]` (`storage`, `endpoint`,
    /// `region`); it overrides the same keys of `[auth.recording]`.
    pub recordings: Option<crate::recordings::RecordingStorage>,
    /// Lifetime of agents' and proxies' certificates (e.g. "7d"); they renew at two thirds.
    pub host_cert_ttl: Option<String>,
    /// The cluster database: unset for SQLite in the data dir (`gatehouse.db`), or
    /// `postgres://USER:PASSWORD@HOST:PORT/DB` for several Auths on one PostgreSQL.
    pub storage: Option<String>,
    /// `"off"` (the default) or `"otp"`: every user's login needs a TOTP code (`gsh mfa add`
    /// enrolls a device). Roles with `require_mfa` need one whatever this says.
    pub second_factor: SecondFactor,
    /// `"best_effort"` (the default): proxies and agents keep the locks they last heard while
    /// Auth is away; `"strict"`: they refuse new sessions once they could not refresh the locks
    /// for 5 minutes.
    pub locking_mode: crate::locks::LockingMode,
}

/// Whether logins need a second factor cluster-wide.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SecondFactor {
    #[default]
    Off,
    Otp,
}

impl AuthConfig {
    /// `host_cert_ttl`, parsed (at least a minute).
    pub fn host_cert_ttl(&self) -> Result<Duration, String> {
        let Some(text) = &self.host_cert_ttl else {
            return Ok(crate::server::DEFAULT_HOST_CERT_TTL);
        };
        let ttl = humantime::parse_duration(text)
            .map_err(|e| format!("[auth] host_cert_ttl = {text:?}: {e}"))?;
        if ttl < Duration::from_secs(60) {
            return Err(format!("[auth] host_cert_ttl = {text:?}: at least 1m"));
        }
        Ok(ttl)
    }

    /// The recording settings with `[auth.recordings]` applied.
    pub fn recording_config(&self) -> crate::recordings::RecordingConfig {
        let mut c = self.recording.clone();
        if let Some(r) = &self.recordings {
            if let Some(s) = &r.storage {
                c.storage = s.clone();
            }
            if r.endpoint.is_some() {
                c.endpoint = r.endpoint.clone();
            }
            if r.region.is_some() {
                c.region = r.region.clone();
            }
        }
        c
    }
}

impl Default for AuthConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 3025)),
            public_addrs: vec![],
            recording: Default::default(),
            recordings: None,
            host_cert_ttl: None,
            storage: None,
            second_factor: SecondFactor::Off,
            locking_mode: crate::locks::LockingMode::BestEffort,
        }
    }
}

/// Why the Auth role could not start or serve.
#[derive(Debug, thiserror::Error)]
pub enum AuthRoleError {
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the database: {0}")]
    Storage(#[from] StoreError),
    #[error("{what}: {message}")]
    Setup { what: String, message: String },
    #[error("{0}")]
    Config(String),
    #[error("auth api server: {0}")]
    Serve(#[from] tonic::transport::Error),
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> AuthRoleError {
    let what = what.into();
    move |source| AuthRoleError::Io { what, source }
}

fn setup<E: std::fmt::Display>(what: impl Into<String>) -> impl FnOnce(E) -> AuthRoleError {
    let what = what.into();
    move |e| AuthRoleError::Setup {
        what,
        message: e.to_string(),
    }
}

/// The running Auth service's facts for the caller (the CLI prints them).
#[derive(Debug, Clone)]
pub struct AuthInfo {
    pub cluster: String,
    pub ca_pin: String,
    pub listen: SocketAddr,
    pub admin_dir: PathBuf,
    pub first_start: bool,
}

/// Everything needed to serve: built by [`prepare`], run by [`serve`].
struct PreparedAuth {
    info: AuthInfo,
    service: AuthService,
    listener: tokio::net::TcpListener,
    tls: Arc<rustls::ServerConfig>,
}

impl std::fmt::Debug for PreparedAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PreparedAuth")
            .field("info", &self.info)
            .finish_non_exhaustive()
    }
}

async fn load_or_create_ssh_ca(
    store: &Store,
    kind: CaKind,
    now: i64,
) -> Result<SshCa, AuthRoleError> {
    let what = format!("the {} CA", kind.as_str());
    if let Some((_, private)) = store.get_ca(kind.as_str()).await? {
        return SshCa::from_openssh(&private).map_err(setup(what));
    }
    let ca = SshCa::generate().map_err(setup(what.clone()))?;
    let private = ca.private_openssh().map_err(setup(what.clone()))?;
    let (_, private) = store
        .init_ca(kind.as_str(), &ca.public_line(), &private, now)
        .await?;
    SshCa::from_openssh(&private).map_err(setup(what))
}

async fn load_or_create_tls_ca(
    store: &Store,
    cluster: &str,
    now: time::OffsetDateTime,
) -> Result<TlsCa, AuthRoleError> {
    if let Some((public, private)) = store.get_ca(CaKind::Tls.as_str()).await? {
        return TlsCa::from_pem(&public, &private).map_err(setup("the TLS CA"));
    }
    let ca = TlsCa::generate(cluster, now).map_err(setup("the TLS CA"))?;
    let (public, private) = store
        .init_ca(
            CaKind::Tls.as_str(),
            ca.cert_pem(),
            &ca.key_pem(),
            now.unix_timestamp(),
        )
        .await?;
    TlsCa::from_pem(&public, &private).map_err(setup("the TLS CA"))
}

/// Issue (or re-issue) the admin identity for gctl into `<data-dir>/admin/`.
pub fn issue_admin_identity(
    tls_ca: &crate::tls_authority::TlsAuthority,
    cluster: &str,
    dir: &Path,
) -> Result<(), AuthRoleError> {
    let now = time::OffsetDateTime::now_utc();
    let key = crate::ca::generate_leaf_key().map_err(setup("the admin identity's key"))?;
    let identity = Identity {
        kind: IdentityKind::Builtin,
        name: "admin".into(),
        roles: vec!["@admin".into()],
        logins: vec![],
        traits: Default::default(),
        cluster: cluster.into(),
        route_to_cluster: cluster.into(),
        bot: None,
        expires: (now + ADMIN_IDENTITY_TTL).unix_timestamp(),
    };
    let spki = rcgen::PublicKeyData::subject_public_key_info(&key);
    let cert = tls_ca
        .sign(&spki, &identity, TlsUsage::Client, &[], now)
        .map_err(setup("the admin identity"))?;
    write_identity_dir(
        dir,
        &cert,
        &crate::tls::key_pem_for_tools(&key),
        &tls_ca.trusted_pem(now.unix_timestamp()),
    )
    .map_err(io(format!(
        "writing the admin identity to {}",
        dir.display()
    )))
}

/// The cluster database: SQLite in the data dir, or the configured URL. A database that cannot
/// be reached is retried with backoff (1 s doubling to 30 s), each failure logged without the
/// URL's password; a schema newer than this binary or a malformed URL ends the start at once.
async fn open_store(data_dir: &Path, url: Option<&str>) -> Result<Store, AuthRoleError> {
    let Some(url) = url.filter(|u| !u.is_empty() && *u != "sqlite") else {
        return Ok(Store::open(&data_dir.join("gatehouse.db")).await?);
    };
    let shown = crate::storage::redact_url(url);
    let mut wait = Duration::from_secs(1);
    loop {
        match Store::connect(url).await {
            Ok(store) => {
                tracing::info!(database = %shown, "auth: storage connected");
                return Ok(store);
            }
            Err(e @ crate::storage::StoreError::Db(_)) => {
                tracing::warn!(database = %shown, error = %e, retry_in = ?wait, "auth: the database is unreachable; retrying");
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(Duration::from_secs(30));
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// Open storage and CAs, create presets on first start, bind the listener.
async fn prepare(
    data_dir: &Path,
    cluster_name: Option<&str>,
    config: &AuthConfig,
    registry: &mut Registry,
) -> Result<PreparedAuth, AuthRoleError> {
    create_private_dir(data_dir)
        .map_err(io(format!("creating data dir {}", data_dir.display())))?;
    let store = open_store(data_dir, config.storage.as_deref()).await?;
    let now = time::OffsetDateTime::now_utc();
    let default_name = cluster_name
        .map(str::to_owned)
        .unwrap_or_else(default_cluster_name);
    crate::resources::validate_name(&default_name)
        .map_err(|m| AuthRoleError::Config(format!("cluster name: {m}")))?;
    let first_start = store.get_meta("cluster_name").await?.is_none();
    let cluster = store.init_meta("cluster_name", &default_name).await?;
    if let Some(wanted) = cluster_name.filter(|w| *w != cluster) {
        return Err(AuthRoleError::Config(format!(
            "this data dir belongs to cluster `{cluster}`, not `{wanted}`; the cluster name cannot change"
        )));
    }
    let user_ca = load_or_create_ssh_ca(&store, CaKind::SshUser, now.unix_timestamp()).await?;
    let host_ca = load_or_create_ssh_ca(&store, CaKind::SshHost, now.unix_timestamp()).await?;
    let tls_ca = load_or_create_tls_ca(&store, &cluster, now).await?;
    if first_start {
        for role in crate::resources::preset_roles() {
            // create_only: never overwrite an edited preset.
            let _ = store.upsert_role(&role, true, now.unix_timestamp()).await;
        }
    }

    let mut sans = config.public_addrs.clone();
    if !config.listen.ip().is_unspecified() {
        sans.push(config.listen.ip().to_string());
    }
    let admin_dir = data_dir.join("admin");

    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(io(format!("binding the Auth API on {}", config.listen)))?;
    let listen = listener
        .local_addr()
        .map_err(io("the Auth API's address"))?;
    let recording = config.recording_config();
    let recordings = crate::recordings::RecordingStore::open(data_dir, &recording)
        .map_err(setup("session recordings storage"))?;
    tracing::info!(
        storage = recordings.describe(),
        mode = recording.mode.as_str(),
        "auth: session recordings"
    );
    let state = Arc::new(
        AuthState::new(cluster.clone(), store, user_ca, host_ca, tls_ca)
            .map_err(setup("the password hasher"))?
            .with_recordings(recording, recordings)
            .with_host_cert_ttl(config.host_cert_ttl().map_err(AuthRoleError::Config)?)
            .with_second_factor(config.second_factor)
            .with_locking_mode(config.locking_mode),
    );
    state.metrics.register(registry);
    // A rotation's previous keys stay trusted across restarts until their grace ends.
    state
        .reload_cas()
        .await
        .map_err(|s| AuthRoleError::Config(format!("loading the CAs: {}", s.message())))?;
    // Served from the X.509 CA as `reload_cas` finds it, and re-made whenever it changes.
    let (chain, key) = state.issue_server_chain(&sans).map_err(|e| {
        AuthRoleError::Config(format!("the Auth server certificate: {}", e.message()))
    })?;
    let trusted = state.tls.load().trusted_pem(now.unix_timestamp());
    let cert = crate::tls::ReloadableCert::new(&chain, &key)
        .map_err(setup("the Auth server certificate"))?;
    let verifier = Arc::new(
        crate::leaf_trust::ClusterClientVerifier::new(&trusted)
            .map_err(setup("the Auth API's client verifier"))?,
    );
    let tls = crate::tls::server_config_with_verifier(
        Arc::clone(&verifier) as Arc<dyn rustls::server::danger::ClientCertVerifier>,
        Arc::clone(&cert),
        &[crate::identity::ALPN_AUTH, b"h2"],
    )
    .map_err(setup("the Auth API's TLS config"))?;
    issue_admin_identity(&state.tls.load(), &cluster, &admin_dir)?;
    let _ = state.served.set(crate::server::ServedTls::new(
        cert,
        verifier,
        sans,
        admin_dir.clone(),
        trusted,
    ));
    let ca_pin = state.tls.load().pin();
    Ok(PreparedAuth {
        info: AuthInfo {
            cluster,
            ca_pin,
            listen,
            admin_dir,
            first_start,
        },
        service: AuthService::new(state),
        listener,
        tls,
    })
}

fn default_cluster_name() -> String {
    std::fs::read_to_string("/etc/hostname")
        .ok()
        .map(|s| s.trim().to_owned())
        .filter(|s| crate::resources::validate_name(s).is_ok())
        .unwrap_or_else(|| "gatehouse".into())
}

/// One accepted, handshaken Auth API connection with its verified peer.
struct AuthConn {
    inner: tokio_rustls::server::TlsStream<TcpStream>,
    peer: PeerInfo,
}

impl Connected for AuthConn {
    type ConnectInfo = PeerInfo;
    fn connect_info(&self) -> PeerInfo {
        self.peer.clone()
    }
}

impl AsyncRead for AuthConn {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for AuthConn {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }
    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }
    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// What checks proxies' client-address preambles.
struct AddrCheck {
    state: Arc<AuthState>,
    replay: std::sync::Mutex<crate::client_addr::ReplayCache>,
}

/// The address to credit a new connection to: a proxy's preamble, when there is one and it is
/// believed (`client_addr::verify`); else the socket's. A preamble that is not believed is
/// ignored (logged), and the TLS after it goes on; `None`: the connection is unreadable.
async fn client_address(
    tcp: &mut TcpStream,
    remote: SocketAddr,
    check: &AddrCheck,
) -> Option<SocketAddr> {
    use crate::client_addr::{body_len, starts_preamble, verify};
    use tokio::io::AsyncReadExt;
    let mut first = [0u8; 8];
    let n = match tokio::time::timeout(HANDSHAKE_TIMEOUT, tcp.peek(&mut first)).await {
        Ok(Ok(n)) => n,
        _ => return None,
    };
    if !starts_preamble(first.get(..n).unwrap_or_default()) {
        return Some(remote);
    }
    let read = async {
        let mut header = [0u8; 12];
        tcp.read_exact(&mut header)
            .await
            .map_err(|e| e.to_string())?;
        let len = body_len(&header).map_err(|e| e.to_string())?;
        let mut body = vec![0u8; len];
        tcp.read_exact(&mut body).await.map_err(|e| e.to_string())?;
        Ok::<_, String>(body)
    };
    let body = match tokio::time::timeout(HANDSHAKE_TIMEOUT, read).await {
        Ok(Ok(b)) => b,
        Ok(Err(e)) => {
            tracing::info!(%remote, error = %e, "auth api: unreadable address preamble; connection closed");
            return None;
        }
        Err(_) => return None,
    };
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    let verdict = match check.replay.lock() {
        Ok(mut replay) => verify(
            &body,
            &check.state.tls.load(),
            &check.state.cluster,
            now,
            &mut replay,
        ),
        Err(_) => return Some(remote),
    };
    match verdict {
        Ok(client) => Some(client),
        Err(e) => {
            tracing::warn!(%remote, error = %e, "auth api: client address preamble ignored; the connection's own address stands");
            Some(remote)
        }
    }
}

/// Handshake one connection; a failure closes only that connection, with a logged reason.
async fn handshake(
    acceptor: tokio_rustls::TlsAcceptor,
    tcp: TcpStream,
    remote: SocketAddr,
    cluster: Arc<str>,
) -> Option<AuthConn> {
    let _ = tcp.set_nodelay(true);
    let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => {
            tracing::info!(%remote, error = %e, "auth api: TLS handshake failed; connection closed");
            return None;
        }
        Err(_) => {
            tracing::info!(%remote, "auth api: TLS handshake timed out; connection closed");
            return None;
        }
    };
    let (identity, key) = match tls.get_ref().1.peer_certificates().and_then(|c| c.first()) {
        None => (None, None),
        Some(cert) => match Identity::with_key_from_cert_der(cert) {
            Ok((id, key)) if id.cluster == *cluster => (Some(Arc::new(id)), Some(Arc::from(key))),
            Ok((id, _)) => {
                tracing::info!(%remote, cluster = %id.cluster, "auth api: certificate from another cluster; connection closed");
                return None;
            }
            Err(e) => {
                tracing::info!(%remote, error = %e, "auth api: client certificate without a valid identity; connection closed");
                return None;
            }
        },
    };
    Some(AuthConn {
        inner: tls,
        peer: PeerInfo {
            remote: Some(remote),
            identity,
            key,
        },
    })
}

/// Serve until `shutdown` resolves. Renews the admin identity daily.
async fn serve(
    prepared: PreparedAuth,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<(), AuthRoleError> {
    let PreparedAuth {
        info,
        service,
        listener,
        tls,
    } = prepared;
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<AuthConn, std::io::Error>>(256);
    let cluster: Arc<str> = Arc::from(info.cluster.as_str());
    let metrics = Arc::clone(&service.state().metrics);
    let check = Arc::new(AddrCheck {
        state: Arc::clone(service.state()),
        replay: std::sync::Mutex::default(),
    });
    let accept_loop = tokio::spawn(async move {
        loop {
            match listener.accept().await {
                Ok((tcp, remote)) => {
                    metrics.connections.inc();
                    let (acceptor, tx, cluster, check) = (
                        acceptor.clone(),
                        tx.clone(),
                        cluster.clone(),
                        Arc::clone(&check),
                    );
                    tokio::spawn(async move {
                        let mut tcp = tcp;
                        let Some(remote) = client_address(&mut tcp, remote, &check).await else {
                            return;
                        };
                        if let Some(conn) = handshake(acceptor, tcp, remote, cluster).await {
                            let _ = tx.send(Ok(conn)).await;
                        }
                    });
                }
                Err(e) => {
                    // EMFILE and friends: back off briefly instead of spinning.
                    tracing::warn!(error = %e, "auth api: accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    });
    let state = Arc::clone(service.state());
    let admin_dir = info.admin_dir.clone();
    let renew = tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(24 * 3600));
        tick.tick().await;
        loop {
            tick.tick().await;
            if let Err(e) = issue_admin_identity(&state.tls.load(), &state.cluster, &admin_dir) {
                tracing::error!(error = %e, "renewing the admin identity failed");
            }
        }
    });
    // When a rotation's grace ends, every Auth re-makes what it serves and watchers hear that
    // the previous CA is no longer trusted.
    let grace_state = Arc::clone(service.state());
    let graces = tokio::spawn(async move {
        let mut watching = grace_state.next_grace_end();
        loop {
            tokio::time::sleep(Duration::from_secs(1)).await;
            let now = time::OffsetDateTime::now_utc().unix_timestamp();
            if watching.is_some_and(|until| until <= now) {
                if let Err(e) = grace_state.reload_cas().await {
                    tracing::warn!(error = %e, "auth: reloading the CAs at the end of a grace failed");
                    continue;
                }
                if let Err(e) = grace_state.announce_cas().await {
                    tracing::warn!(error = %e, "auth: announcing the end of a grace failed");
                }
                tracing::info!(
                    "auth: a CA rotation's grace period ended; the previous key is no longer trusted"
                );
            }
            watching = grace_state.next_grace_end();
        }
    });
    // As a leaf: keep this cluster's copy of each root's CAs current (their rotations).
    let trust_state = Arc::clone(service.state());
    let trust_refresh = tokio::spawn(async move {
        let mut tick = tokio::time::interval(crate::server::trust_refresh_every());
        loop {
            tick.tick().await;
            if let Err(e) = trust_state.refresh_roots().await {
                tracing::warn!(error = %e, "trust: refreshing the roots' CAs failed");
            }
        }
    });
    let reaper_state = Arc::clone(service.state());
    let reaper = tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(600));
        loop {
            tick.tick().await;
            let now = time::OffsetDateTime::now_utc().unix_timestamp();
            if let Err(e) = reaper_state.store.reap_tokens(now, 24 * 3600).await {
                tracing::warn!(error = %e, "reaping expired tokens failed");
            }
        }
    });
    // Streams (watches) end first: a graceful stop waits for calls in flight.
    let streams = Arc::clone(service.state());
    let shutdown = async move {
        shutdown.await;
        streams.end_streams();
    };
    let result = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .add_service(AuthServer::new(service.clone()).max_decoding_message_size(16 * 1024 * 1024))
        .serve_with_incoming_shutdown(ReceiverStream::new(rx), shutdown)
        .await;
    accept_loop.abort();
    renew.abort();
    reaper.abort();
    graces.abort();
    trust_refresh.abort();
    service.state().store.close().await;
    Ok(result?)
}

/// Start the Auth role: storage, CAs, certificates, and the API served in a task of its own
/// until [`AuthHandle::shutdown`].
pub async fn start(
    data_dir: &Path,
    cluster_name: Option<&str>,
    config: &AuthConfig,
    registry: &mut Registry,
) -> Result<AuthHandle, AuthRoleError> {
    let prepared = prepare(data_dir, cluster_name, config, registry).await?;
    let info = prepared.info.clone();
    let service = prepared.service.clone();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(serve(prepared, async move {
        let _ = stopped.await;
    }));
    Ok(AuthHandle {
        info,
        service,
        stop: Some(stop),
        task: Some(task),
    })
}

/// A running Auth role.
#[derive(Debug)]
pub struct AuthHandle {
    pub info: AuthInfo,
    service: AuthService,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<Result<(), AuthRoleError>>>,
}

impl AuthHandle {
    /// The service, for roles that run in the same process (they issue their own certificates).
    pub fn service(&self) -> &AuthService {
        &self.service
    }

    /// Resolves only if the API server stops by itself (it failed).
    pub async fn failed(&mut self) -> Result<(), AuthRoleError> {
        match self.task.as_mut() {
            Some(task) => {
                let r = join(task).await;
                self.task = None;
                r
            }
            None => std::future::pending().await,
        }
    }

    /// Stop accepting, let calls in flight finish, close storage.
    pub async fn shutdown(mut self) -> Result<(), AuthRoleError> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        match self.task.take() {
            Some(task) => join(task).await,
            None => Ok(()),
        }
    }
}

async fn join(
    task: impl Future<Output = Result<Result<(), AuthRoleError>, tokio::task::JoinError>>,
) -> Result<(), AuthRoleError> {
    task.await
        .map_err(|e| AuthRoleError::Config(format!("the Auth task: {e}")))?
}
