//! An SSH client session through a Gatehouse proxy, as a user: TLS to the proxy's port with the
//! user's X.509 certificate (ALPN `gatehouse-ssh`), the session request naming the node, then
//! SSH end to end with the agent, authenticated by the user's SSH certificate. The agent's host
//! certificate must be signed by the cluster's host CA and name the node. What the web terminal
//! uses (and what a load generator driving a proxy can use).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use gatehouse_controlplane::identity::PROXY_SERVER_NAME;
use gatehouse_controlplane::tls::{Trust, client_config_with_alpn};
use gatehouse_proto::alpn::SSH as ALPN_SSH;
use gatehouse_proto::session::{self, SessionRequest, SessionResponse};
use russh::keys::{Certificate, HashAlg, PrivateKey, PublicKey, PublicKeyOrCertificate};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

/// How long opening a session may take (TCP, TLS, the proxy's answer, SSH handshake and auth).
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(20);

/// Why a session could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum SshError {
    #[error("cannot reach the proxy: {0}")]
    Io(#[from] std::io::Error),
    #[error("TLS: {0}")]
    Tls(String),
    #[error("{0}")]
    Refused(String),
    #[error("SSH: {0}")]
    Ssh(#[from] russh::Error),
    #[error("timed out opening the session")]
    Timeout,
}

/// The user's identity for one session.
#[derive(Clone)]
pub struct UserIdentity {
    pub ca_pem: String,
    pub tls_cert: String,
    pub tls_key: String,
    pub ssh_key: Arc<PrivateKey>,
    pub ssh_cert: Certificate,
    pub host_cas: Vec<PublicKey>,
}

/// Accepts the agent's host certificate if the cluster's host CA signed it, it is valid now
/// and it names the node asked for.
pub struct HostCheck {
    cas: Vec<russh::keys::ssh_key::Fingerprint>,
    node: String,
}

impl russh::client::Handler for HostCheck {
    type Error = russh::Error;

    async fn check_server_key(
        &mut self,
        key: &PublicKeyOrCertificate,
    ) -> Result<bool, Self::Error> {
        let PublicKeyOrCertificate::Certificate(cert) = key else {
            return Ok(false);
        };
        Ok(cert.cert_type().is_host()
            && cert.validate(self.cas.iter()).is_ok()
            && cert.valid_principals().contains(&self.node))
    }
}

pub type Handle = russh::client::Handle<HostCheck>;

/// The client's algorithms: the agents' host certificates are Ed25519; AES-GCM first, as the
/// proxy's TLS.
pub fn client_config() -> Arc<russh::client::Config> {
    let mut config = russh::client::Config::default();
    // Agents present Ed25519 host certificates: ask for those.
    config.preferred.host_key_certificates =
        std::borrow::Cow::Owned(vec![russh::keys::Algorithm::Ed25519]);
    config.preferred.cipher =
        std::borrow::Cow::Owned(vec![russh::cipher::AES_256_GCM, russh::cipher::AES_128_GCM]);
    config.inactivity_timeout = None;
    config.keepalive_interval = Some(Duration::from_secs(30));
    Arc::new(config)
}

/// TLS to the proxy as the user, and the proxy's answer to the session request: the stream
/// then carries the node's SSH service.
pub async fn open_stream(
    proxy: SocketAddr,
    id: &UserIdentity,
    req: &SessionRequest,
    on_behalf: Option<&OnBehalf>,
) -> Result<TlsStream<TcpStream>, SshError> {
    let tls_cfg = client_config_with_alpn(
        &Trust::CaPem(id.ca_pem.clone()),
        Some((&id.tls_cert, &id.tls_key)),
        &[ALPN_SSH],
    )
    .map_err(|e| SshError::Tls(e.to_string()))?;
    let socket = if proxy.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    // Registered from before the connection exists until the proxy has answered (it reads
    // the registration before it answers).
    let _registered = match on_behalf {
        Some(b) => {
            socket.bind(SocketAddr::new(proxy.ip(), 0))?;
            Some(b.clients.register(socket.local_addr()?, b.browser))
        }
        None => None,
    };
    let tcp = socket.connect(proxy).await?;
    tcp.set_nodelay(true)?;
    let name = rustls::pki_types::ServerName::try_from(PROXY_SERVER_NAME)
        .map_err(|e| SshError::Tls(e.to_string()))?;
    let mut tls = tokio_rustls::TlsConnector::from(tls_cfg)
        .connect(name, tcp)
        .await?;
    tls.write_all(&session::encode(req)).await?;
    // Read exactly the answer (length-prefixed): the SSH bytes after it stay unread.
    let len = tls.read_u32().await? as usize;
    if len > session::MAX_MESSAGE {
        return Err(SshError::Refused("the proxy's answer is too large".into()));
    }
    let mut buf = BytesMut::with_capacity(4 + len);
    buf.extend_from_slice(&(len as u32).to_be_bytes());
    buf.resize(4 + len, 0);
    if let Some(body) = buf.get_mut(4..) {
        tls.read_exact(body).await?;
    }
    let resp: SessionResponse = session::decode(&mut buf)
        .map_err(|e| SshError::Refused(format!("the proxy's answer: {e}")))?
        .ok_or_else(|| SshError::Refused("incomplete answer from the proxy".into()))?;
    if !resp.ok {
        return Err(SshError::Refused(resp.error));
    }
    Ok(tls)
}

/// The browser a web terminal's connection is for, and where the proxy looks it up.
#[derive(Debug, Clone)]
pub struct OnBehalf {
    pub clients: Arc<gatehouse_dataplane::proxy::LocalClients>,
    pub browser: SocketAddr,
}

/// An authenticated SSH connection to `node` as `login`, through the proxy (credited to the
/// browser `on_behalf` names).
pub async fn connect(
    proxy: SocketAddr,
    id: &UserIdentity,
    node: &str,
    login: &str,
    on_behalf: Option<&OnBehalf>,
) -> Result<Handle, SshError> {
    let open = async {
        let req = SessionRequest {
            target: node.to_owned(),
            login: login.to_owned(),
            cluster: String::new(),
            on_behalf: None,
        };
        let tls = open_stream(proxy, id, &req, on_behalf).await?;
        let check = HostCheck {
            cas: id
                .host_cas
                .iter()
                .map(|k| k.fingerprint(HashAlg::Sha256))
                .collect(),
            node: node.to_owned(),
        };
        let mut handle = russh::client::connect_stream(client_config(), tls, check).await?;
        let auth = handle
            .authenticate_openssh_cert(
                login.to_owned(),
                Arc::clone(&id.ssh_key),
                id.ssh_cert.clone(),
            )
            .await?;
        if !auth.success() {
            return Err(SshError::Refused(format!(
                "the node refused login `{login}` for your certificate"
            )));
        }
        Ok(handle)
    };
    tokio::time::timeout(CONNECT_TIMEOUT, open)
        .await
        .map_err(|_| SshError::Timeout)?
}
