//! The web UI, served on the Proxy's one port to browsers (HTTP over the Proxy's TLS; see
//! `gatehouse_dataplane::proxy::Browsers`). A thin translator: the browser holds an opaque
//! session cookie; the proxy holds the user's own short-lived certificates for it and calls
//! Auth (and opens SSH sessions through the agents' tunnels) *as the user*, so Auth and the
//! agents authorize, record and audit exactly as for `gsh`.
//!
//! - [`sessions`]: web sessions (token hash → the user's certificates, CSRF token, expiry).
//! - [`guard`]: cookie, origin, CSRF and response headers, as pure functions.
//! - `api`: the JSON API under `/v1/webapi/` and the embedded page.
//! - `login`: password + one-time code → certificates from Auth → a web session.
//! - `terminal`: a WebSocket ↔ an SSH session through the proxy's own port.
//! - `replay`: recordings as asciicast v2 (playback, and live sessions to watch).
//! - [`client`]: the API as a browser uses it, for tests and `loadgen web`.

mod api;
mod assets;
pub mod client;
pub mod guard;
mod login;
mod replay;
pub mod sessions;
pub mod ssh;
mod terminal;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use gatehouse_controlplane::client::{AuthEndpoint, Client};
use gatehouse_controlplane::ratelimit::LoginLimiter;
use gatehouse_controlplane::tls::Trust;
use gatehouse_dataplane::proxy::{BrowserConn, Browsers};

/// What the web UI needs to know of the proxy it runs in.
#[derive(Debug, Clone)]
pub struct WebConfig {
    pub cluster: String,
    /// The cluster's X.509 CA certificates (PEM) trusted now: Auth's and the proxy's
    /// certificates chain to them (the proxy keeps them current across a rotation).
    pub ca_pem: Arc<arc_swap::ArcSwap<String>>,
    /// Where Auth is (as the proxy reaches it).
    pub auth_addr: String,
    /// The proxy's own port, where web terminals open their SSH sessions (like `gsh` would).
    pub proxy_addr: SocketAddr,
    /// Web terminals open at once on this proxy, at most.
    pub max_terminals: usize,
    /// Signs the preamble that gives Auth a browser's address on logins (the proxy's identity);
    /// `None`: Auth sees the proxy's.
    pub client_addr:
        Option<Arc<arc_swap::ArcSwapOption<gatehouse_controlplane::client_addr::Asserter>>>,
    /// Where web terminals' connections to the proxy are registered, so the proxy credits
    /// each session to the browser's address; `None`: the proxy's own address.
    pub local_clients: Option<Arc<gatehouse_dataplane::proxy::LocalClients>>,
}

impl WebConfig {
    pub fn new(
        cluster: String,
        ca_pem: Arc<arc_swap::ArcSwap<String>>,
        auth_addr: String,
        proxy_addr: SocketAddr,
    ) -> Self {
        // A proxy listening on every address is reached on loopback from inside.
        let proxy_addr = if proxy_addr.ip().is_unspecified() {
            SocketAddr::from(([127, 0, 0, 1], proxy_addr.port()))
        } else {
            proxy_addr
        };
        Self {
            cluster,
            ca_pem,
            auth_addr,
            proxy_addr,
            max_terminals: 4096,
            client_addr: None,
            local_clients: None,
        }
    }
}

/// The user's credentials a web session holds.
pub(crate) struct Creds {
    pub(crate) id: ssh::UserIdentity,
    /// A connection to Auth as this user (made on first use).
    client: tokio::sync::OnceCell<Client>,
}

impl Creds {
    pub(crate) fn new(id: ssh::UserIdentity) -> Self {
        Self {
            id,
            client: tokio::sync::OnceCell::new(),
        }
    }
}

impl std::fmt::Debug for Creds {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Creds").finish_non_exhaustive()
    }
}

pub(crate) type Session = sessions::WebSession<Creds>;

/// Everything the handlers share.
pub(crate) struct App {
    pub(crate) config: WebConfig,
    pub(crate) sessions: Mutex<sessions::Sessions<Creds>>,
    /// Failed logins per user and per browser address: the same limits as Auth's own.
    pub(crate) limiter: Mutex<LoginLimiter>,
    pub(crate) terminals: Arc<tokio::sync::Semaphore>,
}

impl App {
    /// Auth, without a client identity (logins).
    /// Auth without a certificate, crediting `browser` (an IP) when this proxy can assert it.
    pub(crate) async fn public_client(
        &self,
        browser: &str,
    ) -> Result<Client, gatehouse_controlplane::client::ClientError> {
        let asserter = self.config.client_addr.as_ref().and_then(|a| a.load_full());
        let ip = browser.parse::<std::net::IpAddr>().ok();
        match (asserter, ip) {
            (Some(a), Some(ip)) => {
                self.public_endpoint()
                    .connect_for(SocketAddr::new(ip, 0), a)
                    .await
            }
            _ => self.public_endpoint().connect().await,
        }
    }

    pub(crate) fn public_endpoint(&self) -> AuthEndpoint {
        AuthEndpoint {
            addr: self.config.auth_addr.clone(),
            trust: Trust::CaPem(self.config.ca_pem.load().to_string()),
            identity: None,
        }
    }

    /// Auth as the session's user.
    pub(crate) async fn client(&self, s: &Session) -> Result<Client, api::ApiError> {
        s.creds
            .client
            .get_or_try_init(|| async {
                AuthEndpoint {
                    addr: self.config.auth_addr.clone(),
                    trust: Trust::CaPem(self.config.ca_pem.load().to_string()),
                    identity: Some((s.creds.id.tls_cert.clone(), s.creds.id.tls_key.clone())),
                }
                .connect()
                .await
            })
            .await
            .cloned()
            .map_err(|e| api::ApiError::unavailable(format!("cannot reach Auth: {e}")))
    }
}

/// The web UI: give it to the proxy with `ProxyHandle::serve_browsers`.
pub struct WebUi {
    app: Arc<App>,
    router: axum::Router,
    runtime: tokio::runtime::Handle,
}

impl std::fmt::Debug for WebUi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebUi")
            .field("cluster", &self.app.config.cluster)
            .finish_non_exhaustive()
    }
}

impl WebUi {
    /// Serve on the current (multi-threaded) runtime.
    pub fn new(config: WebConfig) -> Arc<Self> {
        let terminals = Arc::new(tokio::sync::Semaphore::new(config.max_terminals));
        let app = Arc::new(App {
            config,
            sessions: Mutex::default(),
            limiter: Mutex::default(),
            terminals,
        });
        Arc::new(Self {
            router: api::router(Arc::clone(&app)),
            app,
            runtime: tokio::runtime::Handle::current(),
        })
    }
}

impl Browsers for WebUi {
    fn accept(&self, conn: BrowserConn) {
        self.runtime
            .spawn(api::serve_connection(self.router.clone(), conn));
    }
}

/// Seconds since the epoch.
pub(crate) fn now_secs() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp()
}
