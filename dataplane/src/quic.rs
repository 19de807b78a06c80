//! QUIC as an agent transport (quinn): the same tunnel protocol, byte for byte, over one
//! bidirectional QUIC stream, for agents on lossy links. The proxy listens for it on UDP at its
//! public port; certificates, ALPN (`gatehouse-tunnel`) and the identity checks are the TLS
//! listener's. QUIC brings its own loss recovery and congestion control per connection, so a
//! lost packet stalls only until its retransmission instead of behind TCP's head-of-line, and a
//! changing client address (NAT rebinding, roaming) keeps the tunnel.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use crate::session_proto::{ALPN_TUNNEL, PROXY_SERVER_NAME};

/// A tunnel's byte stream over QUIC.
pub type QuicStream = tokio::io::Join<quinn::RecvStream, quinn::SendStream>;

/// How an agent reaches the proxy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TunnelTransport {
    /// TCP + TLS 1.3 (the default).
    #[default]
    Tls,
    /// QUIC (UDP) at the proxy's port.
    Quic,
}

impl std::str::FromStr for TunnelTransport {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "tls" | "tcp" => Ok(Self::Tls),
            "quic" => Ok(Self::Quic),
            other => Err(format!(
                "unknown tunnel transport `{other}` (expected tls or quic)"
            )),
        }
    }
}

impl std::fmt::Display for TunnelTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Tls => "tls",
            Self::Quic => "quic",
        })
    }
}

/// Transport settings for long-lived tunnels carrying bulk sessions: windows large enough for
/// a few MB in flight, keep-alives so idle tunnels survive NAT timeouts.
fn transport() -> Arc<quinn::TransportConfig> {
    let mut t = quinn::TransportConfig::default();
    t.stream_receive_window(quinn::VarInt::from_u32(8 * 1024 * 1024))
        .receive_window(quinn::VarInt::from_u32(16 * 1024 * 1024))
        .send_window(16 * 1024 * 1024)
        .max_concurrent_bidi_streams(quinn::VarInt::from_u32(4))
        .max_concurrent_uni_streams(quinn::VarInt::from_u32(0))
        .keep_alive_interval(Some(Duration::from_secs(15)));
    if let Ok(idle) = quinn::IdleTimeout::try_from(Duration::from_secs(60)) {
        t.max_idle_timeout(Some(idle));
    }
    Arc::new(t)
}

/// The proxy's QUIC server config, from its TLS server config (same certificate, same client
/// verification), offering only the tunnel protocol.
pub fn server_config(tls: &rustls::ServerConfig) -> Result<quinn::ServerConfig, String> {
    let mut tls = tls.clone();
    tls.alpn_protocols = vec![ALPN_TUNNEL.to_vec()];
    tls.max_early_data_size = 0;
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(Arc::new(tls))
        .map_err(|e| format!("QUIC needs TLS 1.3 with AES-128-GCM: {e}"))?;
    let mut cfg = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    cfg.transport_config(transport());
    Ok(cfg)
}

/// An agent's QUIC client config, from its TLS client config (its node certificate).
pub fn client_config(tls: &rustls::ClientConfig) -> Result<quinn::ClientConfig, String> {
    let mut tls = tls.clone();
    tls.alpn_protocols = vec![ALPN_TUNNEL.to_vec()];
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(Arc::new(tls))
        .map_err(|e| format!("QUIC needs TLS 1.3 with AES-128-GCM: {e}"))?;
    let mut cfg = quinn::ClientConfig::new(Arc::new(crypto));
    cfg.transport_config(transport());
    Ok(cfg)
}

/// A client endpoint bound to `local` (port 0 for any).
pub fn client_endpoint(local: SocketAddr) -> std::io::Result<quinn::Endpoint> {
    quinn::Endpoint::client(local)
}

/// Dial the proxy at `addr` and open the tunnel's stream. The connection must be kept (dropping
/// it closes the tunnel).
pub async fn dial(
    endpoint: &quinn::Endpoint,
    config: quinn::ClientConfig,
    addr: &str,
) -> std::io::Result<(quinn::Connection, QuicStream)> {
    let target = tokio::net::lookup_host(addr)
        .await?
        .find(|a| a.is_ipv4() == endpoint.local_addr().map(|l| l.is_ipv4()).unwrap_or(true))
        .ok_or_else(|| std::io::Error::other(format!("no address for {addr}")))?;
    let conn = endpoint
        .connect_with(config, target, PROXY_SERVER_NAME)
        .map_err(std::io::Error::other)?
        .await
        .map_err(std::io::Error::other)?;
    let (send, recv) = conn.open_bi().await.map_err(std::io::Error::other)?;
    Ok((conn, tokio::io::join(recv, send)))
}

/// The negotiated ALPN protocol and the client's certificate chain of an accepted connection.
pub fn peer(
    conn: &quinn::Connection,
) -> (
    Option<Vec<u8>>,
    Option<rustls::pki_types::CertificateDer<'static>>,
) {
    let alpn = conn
        .handshake_data()
        .and_then(|h| h.downcast::<quinn::crypto::rustls::HandshakeData>().ok())
        .and_then(|h| h.protocol);
    let cert = conn
        .peer_identity()
        .and_then(|p| {
            p.downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>()
                .ok()
        })
        .and_then(|chain| chain.into_iter().next());
    (alpn, cert)
}
