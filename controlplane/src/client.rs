//! Connecting to the Auth API: TCP, then rustls with [`crate::tls`] trust, then tonic over h2.

use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::TokioIo;
use tonic::transport::{Channel, Endpoint};

use crate::identity::AUTH_SERVER_NAME;
use crate::proto::auth_client::AuthClient;
use crate::tls::{Trust, client_config};

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
    #[error("cannot reach Auth at {addr}: {source}")]
    Connect {
        addr: String,
        #[source]
        source: tonic::transport::Error,
    },
}

/// How long one Auth address gets to accept a TCP connection before the next is tried.
pub const PER_ADDRESS_CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// Which address of a list connections start with: the last one that answered. A process stays
/// with one Auth while it answers (an upload in several calls lands on one Auth even when
/// recordings are files in that Auth's data dir), and moves to the next when it does not.
static LAST_GOOD: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// The addresses of a comma-separated list (`auth-a:3025,auth-b:3025`), trimmed, empty ones
/// dropped.
pub fn auth_addrs(list: &str) -> Vec<&str> {
    list.split(',')
        .map(str::trim)
        .filter(|a| !a.is_empty())
        .collect()
}

/// A TCP connection to one of the Auth servers of `list` (comma-separated): each is tried in
/// turn, starting with the last that answered, `per_try` at most each. The last error if none
/// answers.
pub async fn connect_any(list: &str, per_try: Duration) -> std::io::Result<tokio::net::TcpStream> {
    let addrs = auth_addrs(list);
    if addrs.is_empty() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "no Auth address given",
        ));
    }
    let start = LAST_GOOD.load(std::sync::atomic::Ordering::Relaxed);
    let mut last = None;
    for i in 0..addrs.len() {
        let at = (start + i) % addrs.len();
        let Some(addr) = addrs.get(at) else {
            continue;
        };
        match tokio::time::timeout(per_try, tokio::net::TcpStream::connect(addr)).await {
            Ok(Ok(tcp)) => {
                LAST_GOOD.store(at, std::sync::atomic::Ordering::Relaxed);
                return Ok(tcp);
            }
            Ok(Err(e)) => last = Some(std::io::Error::new(e.kind(), format!("{addr}: {e}"))),
            Err(_) => {
                last = Some(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("{addr}: no answer in {per_try:?}"),
                ));
            }
        }
    }
    Err(last.unwrap_or_else(|| std::io::Error::other("no Auth address answered")))
}

/// Where Auth is (one address, or several comma-separated: any of them serves any call) and
/// how to talk to it.
#[derive(Debug, Clone)]
pub struct AuthEndpoint {
    pub addr: String,
    pub trust: Trust,
    /// Client certificate chain and key, PEM.
    pub identity: Option<(String, String)>,
}

/// The control-plane gRPC client over Gatehouse mTLS.
pub type Client = AuthClient<Channel>;

/// Sets options on the TCP socket before TLS (e.g. congestion control).
pub type SocketSetup = Arc<dyn Fn(&tokio::net::TcpStream) -> std::io::Result<()> + Send + Sync>;

/// Bytes written on each new connection before TLS (a client-address preamble).
type Prefix = Arc<dyn Fn() -> Vec<u8> + Send + Sync>;

impl AuthEndpoint {
    pub async fn connect(&self) -> Result<Client, ClientError> {
        self.connect_with(Arc::new(|_| Ok(()))).await
    }

    /// [`AuthEndpoint::connect`], with `setup` applied to each TCP socket it opens.
    pub async fn connect_with(&self, setup: SocketSetup) -> Result<Client, ClientError> {
        self.connect_prefixed(setup, None).await
    }

    /// [`AuthEndpoint::connect`] on behalf of a client at `client`: each connection starts with
    /// a preamble `asserter` (a proxy's identity) signs, so Auth credits the client's address.
    pub async fn connect_for(
        &self,
        client: std::net::SocketAddr,
        asserter: Arc<crate::client_addr::Asserter>,
    ) -> Result<Client, ClientError> {
        let prefix: Prefix = Arc::new(move || {
            let now = time::OffsetDateTime::now_utc().unix_timestamp();
            asserter.preamble(client, now, rand::random())
        });
        self.connect_prefixed(Arc::new(|_| Ok(())), Some(prefix))
            .await
    }

    async fn connect_prefixed(
        &self,
        setup: SocketSetup,
        prefix: Option<Prefix>,
    ) -> Result<Client, ClientError> {
        let tls = client_config(
            &self.trust,
            self.identity
                .as_ref()
                .map(|(c, k)| (c.as_str(), k.as_str())),
        )?;
        let connector = tokio_rustls::TlsConnector::from(Arc::clone(&tls));
        let addr = self.addr.clone();
        let endpoint = Endpoint::from_static("http://auth.gatehouse.cluster.local")
            .connect_timeout(Duration::from_secs(10))
            .timeout(Duration::from_secs(60))
            .tcp_nodelay(true);
        let channel = endpoint
            .connect_with_connector(tower::service_fn(move |_uri: http::Uri| {
                let connector = connector.clone();
                let addr = addr.clone();
                let setup = Arc::clone(&setup);
                let prefix = prefix.clone();
                async move {
                    let mut tcp = connect_any(&addr, PER_ADDRESS_CONNECT_TIMEOUT).await?;
                    tcp.set_nodelay(true)?;
                    setup(&tcp)?;
                    if let Some(prefix) = prefix {
                        tokio::io::AsyncWriteExt::write_all(&mut tcp, &prefix()).await?;
                    }
                    let name = rustls::pki_types::ServerName::try_from(AUTH_SERVER_NAME)
                        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
                    let tls = connector.connect(name, tcp).await?;
                    Ok::<_, std::io::Error>(TokioIo::new(tls))
                }
            }))
            .await
            .map_err(|source| ClientError::Connect {
                addr: self.addr.clone(),
                source,
            })?;
        Ok(AuthClient::new(channel).max_decoding_message_size(64 * 1024 * 1024))
    }
}

/// Render a tonic transport error with its whole cause chain, e.g. the TLS alert a server sent.
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        let msg = s.to_string();
        if !out.contains(&msg) {
            out.push_str(": ");
            out.push_str(&msg);
        }
        cur = s.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_dead_auth_in_the_list_is_skipped() {
        let live = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let live_addr = live.local_addr().unwrap().to_string();
        // A port nobody listens on: refused at once.
        let dead = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let dead_addr = dead.local_addr().unwrap().to_string();
        drop(dead);
        let list = format!("{dead_addr}, {live_addr},");
        assert_eq!(auth_addrs(&list), [dead_addr.as_str(), live_addr.as_str()]);
        for _ in 0..4 {
            let tcp = connect_any(&list, Duration::from_secs(2)).await.unwrap();
            assert_eq!(tcp.peer_addr().unwrap().to_string(), live_addr);
        }
        let err = connect_any(&dead_addr, Duration::from_secs(2))
            .await
            .unwrap_err();
        assert!(err.to_string().contains(&dead_addr), "{err}");
        assert!(connect_any(" , ", Duration::from_secs(1)).await.is_err());
    }
}
