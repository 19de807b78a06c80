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

/// Where Auth is and how to talk to it.
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

impl AuthEndpoint {
    pub async fn connect(&self) -> Result<Client, ClientError> {
        self.connect_with(Arc::new(|_| Ok(()))).await
    }

    /// [`AuthEndpoint::connect`], with `setup` applied to each TCP socket it opens.
    pub async fn connect_with(&self, setup: SocketSetup) -> Result<Client, ClientError> {
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
                async move {
                    let tcp = tokio::net::TcpStream::connect(&addr).await?;
                    tcp.set_nodelay(true)?;
                    setup(&tcp)?;
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
