//! Running the Auth role: open storage, create the CAs on first start (reuse them after), issue
//! the server's and the admin's certificates, and serve gRPC over mTLS plus diagnostics.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use prometheus_client::registry::Registry;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::Connected;

use crate::ca::{CaKind, SshCa, TlsCa, TlsUsage};
use crate::identity::{Identity, IdentityKind};
use crate::proto::auth_server::AuthServer;
use crate::server::{AuthService, AuthState, PeerInfo};
use crate::storage::Store;

/// Validity of the admin identity in the data dir; re-issued at every start and every day.
const ADMIN_IDENTITY_TTL: Duration = Duration::from_secs(7 * 24 * 3600);
const SERVER_CERT_TTL: Duration = Duration::from_secs(365 * 24 * 3600);
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// `[auth]` in the daemon's TOML config.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    pub listen: SocketAddr,
    /// Extra names/IPs for the Auth server certificate.
    pub public_addrs: Vec<String>,
}

impl Default for AuthConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 3025)),
            public_addrs: vec![],
        }
    }
}

/// The files of an identity directory: `tls.crt`, `tls.key`, `ca.pem` (all 0600).
pub fn write_identity_dir(
    dir: &Path,
    cert_pem: &str,
    key_pem: &str,
    ca_pem: &str,
) -> std::io::Result<()> {
    create_private_dir(dir)?;
    write_private(&dir.join("tls.crt"), cert_pem.as_bytes())?;
    write_private(&dir.join("tls.key"), key_pem.as_bytes())?;
    write_private(&dir.join("ca.pem"), ca_pem.as_bytes())?;
    Ok(())
}

pub fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    let mut b = std::fs::DirBuilder::new();
    b.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut b, 0o700);
    b.create(dir)
}

/// Write a file readable only by its owner, atomically (temp file + rename).
pub fn write_private(path: &Path, data: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
    let mut f = opts.open(&tmp)?;
    f.write_all(data)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
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
pub struct PreparedAuth {
    pub info: AuthInfo,
    service: AuthService,
    listener: tokio::net::TcpListener,
    tls: Arc<rustls::ServerConfig>,
}

impl PreparedAuth {
    /// The service, for roles that run in the same process (they issue their own certificates).
    pub fn service(&self) -> &AuthService {
        &self.service
    }
}

impl std::fmt::Debug for PreparedAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PreparedAuth")
            .field("info", &self.info)
            .finish_non_exhaustive()
    }
}

async fn load_or_create_ssh_ca(store: &Store, kind: CaKind, now: i64) -> anyhow::Result<SshCa> {
    if let Some((_, private)) = store.get_ca(kind.as_str()).await? {
        return SshCa::from_openssh(&private)
            .with_context(|| format!("loading the {} CA", kind.as_str()));
    }
    let ca = SshCa::generate()?;
    let (_, private) = store
        .init_ca(
            kind.as_str(),
            &ca.public_line(),
            &ca.private_openssh()?,
            now,
        )
        .await?;
    Ok(SshCa::from_openssh(&private)?)
}

async fn load_or_create_tls_ca(
    store: &Store,
    cluster: &str,
    now: time::OffsetDateTime,
) -> anyhow::Result<TlsCa> {
    if let Some((public, private)) = store.get_ca(CaKind::Tls.as_str()).await? {
        return TlsCa::from_pem(&public, &private).context("loading the TLS CA");
    }
    let ca = TlsCa::generate(cluster, now)?;
    let (public, private) = store
        .init_ca(
            CaKind::Tls.as_str(),
            ca.cert_pem(),
            &ca.key_pem(),
            now.unix_timestamp(),
        )
        .await?;
    Ok(TlsCa::from_pem(&public, &private)?)
}

/// Issue (or re-issue) the admin identity for gctl into `<data-dir>/admin/`.
pub fn issue_admin_identity(tls_ca: &TlsCa, cluster: &str, dir: &Path) -> anyhow::Result<()> {
    let now = time::OffsetDateTime::now_utc();
    let key = crate::ca::generate_leaf_key()?;
    let identity = Identity {
        kind: IdentityKind::Builtin,
        name: "admin".into(),
        roles: vec!["@admin".into()],
        logins: vec![],
        traits: Default::default(),
        cluster: cluster.into(),
        route_to_cluster: cluster.into(),
        expires: (now + ADMIN_IDENTITY_TTL).unix_timestamp(),
    };
    let spki = rcgen::PublicKeyData::subject_public_key_info(&key);
    let cert = tls_ca.sign(&spki, &identity, TlsUsage::Client, &[], now)?;
    write_identity_dir(dir, &cert.pem(), &key.serialize_pem(), tls_ca.cert_pem())?;
    Ok(())
}

/// Open storage and CAs, create presets on first start, bind the listener.
pub async fn prepare(
    data_dir: &Path,
    cluster_name: Option<&str>,
    config: &AuthConfig,
    registry: &mut Registry,
) -> anyhow::Result<PreparedAuth> {
    create_private_dir(data_dir)
        .with_context(|| format!("creating data dir {}", data_dir.display()))?;
    let store = Store::open(&data_dir.join("gatehouse.db"))
        .await
        .context("opening the database")?;
    let now = time::OffsetDateTime::now_utc();
    let default_name = cluster_name
        .map(str::to_owned)
        .unwrap_or_else(default_cluster_name);
    crate::resources::validate_name(&default_name)
        .map_err(|m| anyhow::anyhow!("cluster name: {m}"))?;
    let first_start = store.get_meta("cluster_name").await?.is_none();
    let cluster = store.init_meta("cluster_name", &default_name).await?;
    if let Some(wanted) = cluster_name.filter(|w| *w != cluster) {
        anyhow::bail!(
            "this data dir belongs to cluster `{cluster}`, not `{wanted}`; the cluster name cannot change"
        );
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
    let (server_cert, server_key) =
        tls_ca.issue_server_cert(&cluster, &sans, SERVER_CERT_TTL, now)?;
    let chain = format!("{}{}", server_cert.pem(), tls_ca.cert_pem());
    let tls = crate::tls::server_config(tls_ca.cert_pem(), &chain, &server_key.serialize_pem())?;

    let admin_dir = data_dir.join("admin");
    issue_admin_identity(&tls_ca, &cluster, &admin_dir)?;

    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("binding the Auth API on {}", config.listen))?;
    let listen = listener.local_addr()?;
    let ca_pin = tls_ca.pin();
    let state = Arc::new(AuthState::new(
        cluster.clone(),
        store,
        user_ca,
        host_ca,
        tls_ca,
    )?);
    state.metrics.register(registry);
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
    let identity = match tls.get_ref().1.peer_certificates().and_then(|c| c.first()) {
        None => None,
        Some(cert) => match Identity::from_cert_der(cert) {
            Ok(id) if id.cluster == *cluster => Some(Arc::new(id)),
            Ok(id) => {
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
        },
    })
}

/// Serve until `shutdown` resolves. Renews the admin identity daily.
pub async fn serve(
    prepared: PreparedAuth,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> anyhow::Result<()> {
    let PreparedAuth {
        info,
        service,
        listener,
        tls,
    } = prepared;
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<AuthConn, std::io::Error>>(256);
    let cluster: Arc<str> = Arc::from(info.cluster.as_str());
    let accept_loop = tokio::spawn(async move {
        loop {
            match listener.accept().await {
                Ok((tcp, remote)) => {
                    let (acceptor, tx, cluster) = (acceptor.clone(), tx.clone(), cluster.clone());
                    tokio::spawn(async move {
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
            if let Err(e) = issue_admin_identity(&state.tls_ca, &state.cluster, &admin_dir) {
                tracing::error!(error = %e, "renewing the admin identity failed");
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
    let result = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .add_service(AuthServer::new(service.clone()).max_decoding_message_size(16 * 1024 * 1024))
        .serve_with_incoming_shutdown(ReceiverStream::new(rx), shutdown)
        .await;
    accept_loop.abort();
    renew.abort();
    reaper.abort();
    service.state().store.close().await;
    result.context("auth api server")
}
