//! The agent's reverse tunnel: dial the Proxy, hold the tunnel, heartbeat the inventory, serve
//! the streams the Proxy opens (SSH, TCP apps), and reconnect with jittered backoff when the
//! tunnel ends. The tunnel lives on its own thread (single-threaded runtime, no locks on the
//! data path); SSH sessions run on the caller's multi-threaded runtime, joined by in-memory pipes.

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use gatehouse_controlplane::identity::PROXY_SERVER_NAME;
use gatehouse_controlplane::tls::{Trust, client_config_with_alpn};
use gatehouse_dataplane::io::quic::TunnelTransport;
use gatehouse_dataplane::mux::{Tunnel, TunnelEvent};
use gatehouse_dataplane::proxy::{Inventory, ProxyAnnouncement};
use gatehouse_dataplane::tls::TlsStream;
use gatehouse_proto::alpn::TUNNEL as ALPN_TUNNEL;
use gatehouse_proto::tunnel::{self, Side, code};
use rand::Rng;
use rustls::client::UnbufferedClientConnection;

use gatehouse_controlplane::host::HostIdentity;

/// Serves one SSH connection over a byte stream (the SSH node service implements it).
pub trait SshService: Send + Sync + 'static {
    fn serve(
        &self,
        io: tokio::io::DuplexStream,
        meta: StreamMeta,
    ) -> Pin<Box<dyn Future<Output = ()> + Send>>;
}

/// What the Proxy says about a stream it opened (its JSON metadata).
#[derive(Debug, Clone, Default)]
pub struct StreamMeta {
    /// The user's address as the Proxy saw it.
    pub source_addr: String,
    /// The Gatehouse user the Proxy authenticated by X.509 certificate.
    pub user: String,
}

#[derive(Debug, Clone)]
pub struct TunnelClientConfig {
    pub proxy_addr: String,
    pub node_name: String,
    pub labels: BTreeMap<String, String>,
    /// The apps the agent serves, authorized by their labels.
    pub apps: Option<Arc<crate::apps::AppService>>,
    pub addresses: Vec<String>,
    pub heartbeat_interval: Duration,
    pub tunnel: tunnel::Config,
    /// TLS over TCP, or QUIC.
    pub transport: TunnelTransport,
    /// TCP congestion control for the tunnel's connection; `None`: the host's default.
    pub tcp_congestion: Option<String>,
}

/// What the agent reports about its tunnel (for /readyz and /metrics, `gatehouse_agent_*`).
#[derive(Debug, Default)]
pub struct TunnelStatus {
    pub connected: prometheus_client::metrics::gauge::Gauge,
    pub connects: prometheus_client::metrics::counter::Counter,
    pub streams_served: prometheus_client::metrics::counter::Counter,
    pub stream_failures: prometheus_client::metrics::counter::Counter,
}

impl TunnelStatus {
    pub fn register(&self, registry: &mut prometheus_client::registry::Registry) {
        let r = registry.sub_registry_with_prefix("gatehouse_agent");
        r.register(
            "tunnel_connected",
            "Reverse tunnels up (one per proxy)",
            self.connected.clone(),
        );
        r.register(
            "tunnel_connects",
            "Tunnels established (reconnects included)",
            self.connects.clone(),
        );
        r.register(
            "streams_served",
            "Sessions served (SSH and TCP apps)",
            self.streams_served.clone(),
        );
        r.register(
            "stream_failures",
            "Sessions that could not reach their local target",
            self.stream_failures.clone(),
        );
    }

    pub fn is_connected(&self) -> bool {
        self.connected.get() > 0
    }
}

/// The proxies the agent was last told to keep tunnels to (empty until a proxy says).
pub type Announced = tokio::sync::watch::Receiver<Vec<String>>;

/// Start the tunnel client on its own thread; it runs until [`TunnelThread::stop`].
pub fn spawn(
    config: TunnelClientConfig,
    identity: Arc<arc_swap::ArcSwap<HostIdentity>>,
    ssh: Option<Arc<dyn SshService>>,
    sessions: tokio::runtime::Handle,
) -> std::io::Result<(Arc<TunnelStatus>, TunnelThread, Announced)> {
    let status = Arc::new(TunnelStatus::default());
    let st = Arc::clone(&status);
    let (proxies, announced) = tokio::sync::watch::channel(Vec::new());
    let (stop, mut stopped) = tokio::sync::watch::channel(false);
    let thread = std::thread::Builder::new()
        .name("agent-tunnel".into())
        .spawn(move || {
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    tracing::error!(error = %e, "agent: cannot build the tunnel runtime");
                    return;
                }
            };
            let local = tokio::task::LocalSet::new();
            local.block_on(&rt, async move {
                tokio::select! {
                    () = run(config, identity, ssh, sessions, st, proxies) => {}
                    _ = stopped.changed() => {}
                }
            });
        })?;
    Ok((
        status,
        TunnelThread {
            stop,
            thread: Some(thread),
        },
        announced,
    ))
}

/// The tunnel's thread, stopped (its tunnel closed) by [`TunnelThread::stop`].
#[derive(Debug)]
pub struct TunnelThread {
    stop: tokio::sync::watch::Sender<bool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl TunnelThread {
    /// Close the tunnel and join its thread.
    pub fn stop(mut self) {
        let _ = self.stop.send(true);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// What every dial loop shares.
struct Dialer {
    config: TunnelClientConfig,
    identity: Arc<arc_swap::ArcSwap<HostIdentity>>,
    ssh: Option<Arc<dyn SshService>>,
    sessions: tokio::runtime::Handle,
    status: Arc<TunnelStatus>,
    quic: Option<(quinn::ClientConfig, quinn::Endpoint)>,
    /// The proxies to keep a tunnel to, as the last proxy announced them.
    proxies: tokio::sync::watch::Sender<Vec<String>>,
    /// Dial address → the announced address of the proxy its tunnel reached (a balancer's
    /// address reaches some proxy: that one needs no tunnel of its own).
    reached: std::rc::Rc<std::cell::RefCell<BTreeMap<String, String>>>,
}

/// Keep a tunnel to the configured proxy, and one to every proxy the proxies announce (see
/// `gatehouse_dataplane::proxy::ProxySet`): a loop per address, started when it first appears.
/// A loop for an announced address ends when its tunnel ends (or cannot be dialed) and the
/// address is no longer announced; a tunnel that is up is never closed by an announcement, so
/// a stale set (Auth away, a proxy that has not announced itself again yet) costs nothing.
async fn run(
    config: TunnelClientConfig,
    identity: Arc<arc_swap::ArcSwap<HostIdentity>>,
    ssh: Option<Arc<dyn SshService>>,
    sessions: tokio::runtime::Handle,
    status: Arc<TunnelStatus>,
    proxies: tokio::sync::watch::Sender<Vec<String>>,
) {
    let Some(client) = tunnel_client_config(&identity.load_full()) else {
        return;
    };
    let quic = match config.transport {
        TunnelTransport::Tls => None,
        TunnelTransport::Quic => {
            let cfg = gatehouse_dataplane::io::quic::client_config(&client);
            let endpoint = gatehouse_dataplane::io::quic::client_endpoint(
                std::net::SocketAddr::from(([0, 0, 0, 0], 0)),
            );
            match (cfg, endpoint) {
                (Ok(cfg), Ok(endpoint)) => Some((cfg, endpoint)),
                (Err(e), _) => {
                    tracing::error!(error = %e, "agent: cannot set up QUIC; the tunnel cannot start");
                    return;
                }
                (_, Err(e)) => {
                    tracing::error!(error = %e, "agent: cannot bind UDP for QUIC; the tunnel cannot start");
                    return;
                }
            }
        }
    };
    let mut announced = proxies.subscribe();
    let seed = config.proxy_addr.clone();
    let dialer = std::rc::Rc::new(Dialer {
        config,
        identity,
        ssh,
        sessions,
        status,
        quic,
        proxies,
        reached: std::rc::Rc::default(),
    });
    let mut loops: BTreeMap<String, tokio::task::JoinHandle<()>> = BTreeMap::new();
    loops.insert(
        seed.clone(),
        tokio::task::spawn_local(dial_loop(std::rc::Rc::clone(&dialer), seed.clone(), true)),
    );
    loop {
        let set = announced.borrow_and_update().clone();
        loops.retain(|_, l| !l.is_finished());
        let reached: Vec<String> = dialer.reached.borrow().values().cloned().collect();
        for addr in set.into_iter().filter(|a| !reached.contains(a)) {
            if let std::collections::btree_map::Entry::Vacant(slot) = loops.entry(addr) {
                tracing::info!(proxy = %slot.key(), "agent: a proxy was announced; keeping a tunnel to it");
                let addr = slot.key().clone();
                slot.insert(tokio::task::spawn_local(dial_loop(
                    std::rc::Rc::clone(&dialer),
                    addr,
                    false,
                )));
            }
        }
        // Changes, and a look every few seconds at loops that ended (a proxy that comes back
        // after it was dropped from the set gets a new one).
        let _ = tokio::time::timeout(Duration::from_secs(5), announced.changed()).await;
    }
}

/// Dial `addr` and hold the tunnel, reconnecting with backoff; for ever when `permanent` (the
/// configured proxy), else while the proxies announce `addr`.
async fn dial_loop(d: std::rc::Rc<Dialer>, addr: String, permanent: bool) {
    let config = &d.config;
    let status = &d.status;
    let mut current = d.identity.load_full();
    let Some(mut client) = tunnel_client_config(&current) else {
        return;
    };
    let mut attempt: u32 = 0;
    loop {
        if !permanent && !d.proxies.borrow().contains(&addr) {
            tracing::info!(proxy = %addr, "agent: the proxy is no longer announced; no tunnel to it");
            return;
        }
        // A renewed certificate is used from the next dial on; the tunnel up keeps its own.
        let latest = d.identity.load_full();
        if !Arc::ptr_eq(&latest, &current) {
            if let Some(c) = tunnel_client_config(&latest) {
                client = c;
            }
            current = latest;
        }
        let started = Instant::now();
        let connected = match &d.quic {
            None => dial(&client, &addr, config.tcp_congestion.as_deref())
                .await
                .map(|s| (Box::new(s) as Box<dyn TunnelIo>, None)),
            Some((cfg, endpoint)) => tokio::time::timeout(
                Duration::from_secs(10),
                gatehouse_dataplane::io::quic::dial(endpoint, cfg.clone(), &addr),
            )
            .await
            .unwrap_or_else(|_| {
                Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "QUIC connect timed out",
                ))
            })
            .map(|(conn, s)| (Box::new(s) as Box<dyn TunnelIo>, Some(conn))),
        };
        match connected {
            Ok((stream, quic_conn)) => {
                status.connected.inc();
                status.connects.inc();
                tracing::info!(proxy = %addr, transport = %config.transport, "agent: tunnel up");
                // Sessions on QUIC streams of their own, where the proxy agreed to it. (The
                // connection is kept until the tunnel ends either way.)
                let native = quic_conn
                    .as_ref()
                    .filter(|c| gatehouse_dataplane::io::quic::session_streams(c))
                    .cloned();
                let reason = serve_tunnel(stream, native, &d, &addr, &current).await;
                d.reached.borrow_mut().remove(&addr);
                drop(quic_conn);
                status.connected.dec();
                tracing::warn!(proxy = %addr, %reason, "agent: tunnel down; reconnecting");
                // A tunnel that held for a while starts the backoff over.
                if started.elapsed() > Duration::from_secs(30) {
                    attempt = 0;
                }
            }
            Err(e) => {
                tracing::warn!(proxy = %addr, error = %e, attempt, "agent: cannot reach the proxy");
            }
        }
        let delay = crate::backoff::delay(attempt, rand::thread_rng().r#gen::<f64>());
        attempt = attempt.saturating_add(1);
        tokio::time::sleep(delay).await;
    }
}

/// The TLS client config a tunnel dials with, for `identity`.
fn tunnel_client_config(identity: &HostIdentity) -> Option<Arc<rustls::ClientConfig>> {
    match client_config_with_alpn(
        &Trust::CaPem(identity.ca_pem.clone()),
        Some((&identity.tls_cert, &identity.tls_key)),
        &[ALPN_TUNNEL],
    ) {
        Ok(c) => Some(c),
        Err(e) => {
            tracing::error!(error = %e, "agent: bad TLS identity; the tunnel cannot start");
            None
        }
    }
}

/// TCP and TLS to the proxy, on the data plane's unbuffered TLS stream (the proxy's own, client
/// side): records are decrypted in place and copied once, into the tunnel's input buffer.
async fn dial(
    client: &Arc<rustls::ClientConfig>,
    addr: &str,
    congestion: Option<&str>,
) -> std::io::Result<TlsStream<UnbufferedClientConnection>> {
    let tcp = tokio::time::timeout(
        Duration::from_secs(10),
        tokio::net::TcpStream::connect(addr),
    )
    .await
    .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out"))??;
    tcp.set_nodelay(true)?;
    if let Some(cc) = congestion {
        gatehouse_dataplane::io::set_tcp_congestion(&tcp, cc)?;
    }
    let name = rustls::pki_types::ServerName::try_from(PROXY_SERVER_NAME)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    tokio::time::timeout(
        Duration::from_secs(10),
        TlsStream::connect(tcp, Arc::clone(client), name),
    )
    .await
    .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "TLS handshake timed out"))?
}

/// A tunnel's byte stream, over TLS or QUIC.
trait TunnelIo: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin> TunnelIo for T {}

fn inventory(config: &TunnelClientConfig, identity: &HostIdentity, ssh: bool) -> Bytes {
    let apps = config.apps.as_ref().map(|a| a.apps());
    let mut services: Vec<String> = apps
        .into_iter()
        .flat_map(|a| a.keys())
        .map(|a| format!("tcp:{a}"))
        .collect();
    if ssh {
        services.insert(0, "ssh".into());
    }
    let inv = Inventory {
        host_id: identity.host_id.clone(),
        name: config.node_name.clone(),
        labels: config.labels.clone(),
        addresses: config.addresses.clone(),
        services,
        app_labels: apps
            .into_iter()
            .flat_map(|a| a.iter())
            .filter(|(_, app)| !app.labels.is_empty())
            .map(|(name, app)| (name.clone(), app.labels.clone()))
            .collect(),
    };
    Bytes::from(serde_json::to_vec(&inv).unwrap_or_default())
}

async fn serve_tunnel<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + 'static>(
    io: T,
    quic_sessions: Option<quinn::Connection>,
    d: &Dialer,
    dialed: &str,
    identity: &HostIdentity,
) -> String {
    let (config, ssh, sessions, status) = (&d.config, &d.ssh, &d.sessions, &d.status);
    let (tunnel, mut events) = Tunnel::new(Side::Dialer, config.tunnel.clone());
    if let Some(conn) = quic_sessions {
        tunnel.attach_quic(conn);
    }
    let heartbeat = {
        let (tunnel, inv, every) = (
            tunnel.clone(),
            inventory(config, identity, ssh.is_some()),
            config.heartbeat_interval,
        );
        tokio::task::spawn_local(async move {
            loop {
                tunnel.send_heartbeat(inv.clone());
                tokio::time::sleep(every).await;
            }
        })
    };
    let dispatcher = {
        let (tunnel, apps, sessions, status, ssh, proxies) = (
            tunnel.clone(),
            config.apps.clone(),
            sessions.clone(),
            Arc::clone(status),
            ssh.clone(),
            d.proxies.clone(),
        );
        let (dialed, reached) = (dialed.to_owned(), std::rc::Rc::clone(&d.reached));
        tokio::task::spawn_local(async move {
            while let Some(ev) = events.recv().await {
                match ev {
                    TunnelEvent::Incoming {
                        stream,
                        target,
                        metadata,
                    } => {
                        serve_stream(
                            &tunnel,
                            stream,
                            &target,
                            &metadata,
                            apps.as_ref(),
                            ssh.as_ref(),
                            &sessions,
                            &status,
                        )
                        .await;
                    }
                    TunnelEvent::GoAway { message, .. } => {
                        tracing::info!(%message, "agent: proxy is draining this tunnel")
                    }
                    // The proxies to keep a tunnel to; an empty set says nothing.
                    TunnelEvent::Heartbeat(bytes) => match ProxyAnnouncement::parse(&bytes) {
                        Ok(a) if !a.proxies.is_empty() => {
                            if !a.this.is_empty() && a.this != dialed {
                                reached.borrow_mut().insert(dialed.clone(), a.this.clone());
                            }
                            let mut set = a.proxies;
                            set.sort();
                            proxies.send_if_modified(|known| {
                                let new = *known != set;
                                if new {
                                    *known = set;
                                }
                                new
                            });
                        }
                        Ok(_) => {}
                        Err(e) => {
                            tracing::warn!(error = %e, "agent: malformed proxy announcement ignored")
                        }
                    },
                }
            }
        })
    };
    let reason = tunnel.run(io).await;
    heartbeat.abort();
    dispatcher.abort();
    reason
}

#[allow(clippy::too_many_arguments)]
async fn serve_stream(
    tunnel: &Tunnel,
    stream: u32,
    target: &str,
    metadata: &[u8],
    apps: Option<&Arc<crate::apps::AppService>>,
    ssh: Option<&Arc<dyn SshService>>,
    sessions: &tokio::runtime::Handle,
    status: &Arc<TunnelStatus>,
) {
    if target == "ssh" {
        let meta: serde_json::Value = serde_json::from_slice(metadata).unwrap_or_default();
        let field = |k: &str| {
            meta.get(k)
                .and_then(|v| v.as_str())
                .unwrap_or_default()
                .to_owned()
        };
        let source = StreamMeta {
            source_addr: field("source_addr"),
            user: field("user"),
        };
        let Some(ssh) = ssh else {
            tunnel.reject(stream, code::NOT_FOUND, "this agent does not serve SSH");
            return;
        };
        let Ok(handle) = tunnel.accept(stream) else {
            return;
        };
        let (near, far) = tokio::io::duplex(64 * 1024);
        sessions.spawn(ssh.serve(far, source));
        status.streams_served.inc();
        tokio::task::spawn_local(async move {
            handle.splice(near, Bytes::new()).await;
        });
        return;
    }
    if let Some(app) = target.strip_prefix("tcp:") {
        let Some(apps) = apps else {
            tunnel.reject(
                stream,
                code::NOT_FOUND,
                &format!("this agent serves no app named `{app}`"),
            );
            return;
        };
        let who = crate::apps::AppRequester::parse(metadata);
        let (tunnel, apps, app, status) = (
            tunnel.clone(),
            Arc::clone(apps),
            app.to_owned(),
            Arc::clone(status),
        );
        // The task is the session: a lock aborts it (ending the stream with a reset).
        let (go, ready) = tokio::sync::oneshot::channel::<tokio::task::AbortHandle>();
        let task = tokio::task::spawn_local(async move {
            let allowed = match apps.authorize(&app, &who).await {
                Ok(a) => a,
                Err(reason) => {
                    tunnel.reject(stream, code::ACCESS_DENIED, &reason);
                    return;
                }
            };
            if let Ok(handle) = ready.await {
                apps.opened(&allowed, handle);
            }
            let addr = allowed.addr.clone();
            let failed = |reason: String| {
                status.stream_failures.inc();
                tunnel.reject(stream, code::UNAVAILABLE, &reason);
                apps.ended(&allowed, 0, 0, &reason);
            };
            match tokio::time::timeout(
                Duration::from_secs(10),
                tokio::net::TcpStream::connect(&addr),
            )
            .await
            {
                Ok(Ok(tcp)) => {
                    let _ = tcp.set_nodelay(true);
                    let Ok(handle) = tunnel.accept(stream) else {
                        apps.ended(&allowed, 0, 0, "the stream closed before it opened");
                        return;
                    };
                    status.streams_served.inc();
                    let stats = handle.splice(tcp, Bytes::new()).await;
                    let reason = if stats.reset { "reset" } else { "closed" };
                    apps.ended(&allowed, stats.from_tunnel, stats.to_tunnel, reason);
                }
                Ok(Err(e)) => failed(format!("app `{app}` at {addr} is unreachable: {e}")),
                Err(_) => failed(format!("app `{app}` at {addr} did not answer in 10 s")),
            }
        });
        let _ = go.send(task.abort_handle());
        return;
    }
    tunnel.reject(
        stream,
        code::NOT_FOUND,
        &format!("unknown target `{target}`"),
    );
}
