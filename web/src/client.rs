//! A client of the web API, as a browser would use it (HTTP/1.1 over TLS, the session cookie,
//! the CSRF header, WebSockets for terminals): what the tests and `loadgen web` drive the web UI
//! with. It does not check the proxy's certificate (the browsers' certificate is self-signed
//! on a joined proxy): for tests and benchmarks on loopback, not for people.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_tungstenite::WebSocketStream;

/// Why a web call failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("TLS: {0}")]
    Tls(String),
    #[error("HTTP {status}: {body}")]
    Status { status: u16, body: String },
    #[error("malformed response: {0}")]
    Malformed(String),
    #[error("WebSocket: {0}")]
    WebSocket(#[from] tokio_tungstenite::tungstenite::Error),
}

/// A logged-in web session.
#[derive(Debug, Clone)]
pub struct WebClient {
    pub addr: SocketAddr,
    pub cookie: String,
    pub csrf: String,
}

/// An HTTP response: status and body.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub body: String,
}

#[derive(Debug)]
struct AnyCert(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AnyCert {
    fn verify_server_cert(
        &self,
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &[rustls::pki_types::CertificateDer<'_>],
        _: &rustls::pki_types::ServerName<'_>,
        _: &[u8],
        _: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// TLS to the proxy as a browser (HTTP/1.1, no client certificate).
pub async fn connect(addr: SocketAddr) -> Result<TlsStream<TcpStream>, ClientError> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()
        .map_err(|e| ClientError::Tls(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyCert(provider)))
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let tcp = TcpStream::connect(addr).await?;
    tcp.set_nodelay(true)?;
    let name = rustls::pki_types::ServerName::try_from("gatehouse.web")
        .map_err(|e| ClientError::Tls(e.to_string()))?;
    Ok(tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await?)
}

/// One HTTP/1.1 request on a fresh connection (`Connection: close`), `extra` headers added.
pub async fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    extra: &[(&str, &str)],
    body: &[u8],
) -> Result<(u16, Vec<(String, String)>, String), ClientError> {
    let mut tls = connect(addr).await?;
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in extra {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    tls.write_all(head.as_bytes()).await?;
    // A server may answer (413, say) and close before it has read the whole body: read its
    // answer whatever the write said.
    let wrote = async {
        tls.write_all(body).await?;
        tls.flush().await
    }
    .await;
    let mut raw = Vec::new();
    let read = tls.read_to_end(&mut raw).await;
    if raw.is_empty() {
        wrote?;
        read?;
    }
    let text = String::from_utf8_lossy(&raw);
    let (head, rest) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| ClientError::Malformed("no end of headers".into()))?;
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| ClientError::Malformed("no status".into()))?;
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect::<Vec<_>>();
    let chunked = headers
        .iter()
        .any(|(k, v)| k == "transfer-encoding" && v.contains("chunked"));
    let body = if chunked {
        dechunk(rest)
    } else {
        rest.to_owned()
    };
    Ok((status, headers, body))
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = s.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if n == 0 {
            break;
        }
        out.push_str(rest.get(..n).unwrap_or(rest));
        s = rest.get(n + 2..).unwrap_or("");
    }
    out
}

impl WebClient {
    /// Log in with a password (and a one-time code, or "").
    pub async fn login(
        addr: SocketAddr,
        user: &str,
        password: &str,
        otp: &str,
    ) -> Result<Self, ClientError> {
        let body =
            serde_json::json!({ "user": user, "password": password, "otp": otp }).to_string();
        let (status, headers, text) = request(
            addr,
            "POST",
            "/v1/webapi/login",
            &[("Content-Type", "application/json")],
            body.as_bytes(),
        )
        .await?;
        if status != 200 {
            return Err(ClientError::Status { status, body: text });
        }
        let cookie = headers
            .iter()
            .find(|(k, _)| k == "set-cookie")
            .and_then(|(_, v)| v.split(';').next())
            .ok_or_else(|| ClientError::Malformed("no session cookie".into()))?
            .to_owned();
        let v: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| ClientError::Malformed(e.to_string()))?;
        let csrf = v
            .get("csrf")
            .and_then(|c| c.as_str())
            .unwrap_or_default()
            .to_owned();
        Ok(Self { addr, cookie, csrf })
    }

    /// A call as this session (the CSRF token on anything but GET).
    pub async fn call(&self, method: &str, path: &str, body: &[u8]) -> Result<Reply, ClientError> {
        let mut headers = vec![("Cookie", self.cookie.as_str())];
        if method != "GET" {
            headers.push(("X-CSRF-Token", self.csrf.as_str()));
            headers.push(("Content-Type", "application/json"));
        }
        let (status, _, body) = request(self.addr, method, path, &headers, body).await?;
        Ok(Reply { status, body })
    }

    /// A web terminal on `node` as `login`.
    pub async fn terminal(
        &self,
        node: &str,
        login: &str,
        cols: u32,
        rows: u32,
    ) -> Result<WebSocketStream<TlsStream<TcpStream>>, ClientError> {
        let tls = connect(self.addr).await?;
        let q = format!(
            "node={}&login={}&cols={cols}&rows={rows}&csrf={}",
            gatehouse_controlplane::otp::percent_encode(node),
            gatehouse_controlplane::otp::percent_encode(login),
            gatehouse_controlplane::otp::percent_encode(&self.csrf)
        );
        let mut req =
            tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(
                format!("wss://{}/v1/webapi/ws/ssh?{q}", self.addr),
            )?;
        let h = req.headers_mut();
        let v = |s: &str| {
            http::HeaderValue::from_str(s).map_err(|e| ClientError::Malformed(e.to_string()))
        };
        h.insert("cookie", v(&self.cookie)?);
        h.insert("origin", v(&format!("https://{}", self.addr))?);
        let (ws, _) = tokio_tungstenite::client_async(req, tls).await?;
        Ok(ws)
    }
}
