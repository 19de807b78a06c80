//! The Proxy: one public TLS port on every core (SO_REUSEPORT), routed by ALPN.
//!
//! - `gatehouse-auth`: passed through to Auth byte for byte (decided by the ClientHello's ALPN,
//!   before any TLS termination), so the client's certificate authenticates to Auth.
//! - `gatehouse-tunnel`: an agent (node certificate) holds its reverse tunnel here.
//! - `gatehouse-ssh` / `gatehouse-tcp`: a user (user certificate) asks for a target; the session is
//!   moved to the core that owns the target's tunnel (socket and TLS state over a channel), opened
//!   as a stream in that tunnel and spliced. For SSH the Proxy forwards bytes only: the SSH
//!   handshake is end to end between the client and the agent.
//!
//! Each worker is a thread with a current-thread tokio runtime; a tunnel and its sessions live on
//! one worker, so the data path takes no locks. The route table is shared and copy-on-write.

pub mod metrics;
pub mod router;

use std::cell::RefCell;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use arc_swap::ArcSwap;
use bytes::{Bytes, BytesMut};
use gatehouse_controlplane::identity::{Identity, IdentityKind};
use prometheus_client::metrics::gauge::Gauge;
use rustls::HandshakeKind;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};

use crate::client_hello::{self, Peek};
use crate::mux::{OpenError, Tunnel, TunnelEvent};
use crate::session_proto::{
    self, ALPN_AUTH, ALPN_SSH, ALPN_TCP, ALPN_TUNNEL, ALPN_TUNNEL_STREAMS, SessionRequest,
    SessionResponse,
};
use crate::socket::{self, IoBackend, Socket};
use crate::tls_stream::{TlsParts, TlsStream};
use crate::tunnel::{self, Side, code};
use crate::uring::UringListener;
pub use metrics::ProxyMetrics;
pub use router::{Inventory, RouteChange, RouteError, RouteTable, TunnelEntry};

const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Clone)]
pub struct ProxyConfig {
    pub listen: SocketAddr,
    /// Worker threads (cores); 0 means one per available core.
    pub workers: usize,
    /// Where `gatehouse-auth` connections are passed through to.
    pub auth_addr: String,
    /// Server config: the Proxy's certificate, client certificates verified against the cluster
    /// CA (optional at the TLS layer, required per ALPN), ALPN protocols set by [`server_alpn`].
    pub tls: Arc<rustls::ServerConfig>,
    pub cluster: String,
    pub tunnel: tunnel::Config,
    /// epoll, io_uring, or auto (io_uring when the kernel allows it).
    pub io_backend: IoBackend,
    /// Accept agent tunnels over QUIC on UDP at the same address and port.
    pub quic: bool,
    /// TCP congestion control for the public port's connections (users' sessions and agents'
    /// tunnels alike), e.g. `cubic`; `None` keeps the host's default
    /// (`net.ipv4.tcp_congestion_control`). Set on the listening sockets, which accepted
    /// connections inherit. Like HAProxy's `cc` bind option: BBR's pacing suits long, lossy
    /// paths, but its timers cost CPU for every byte sent, which shows on fast local ones (see
    /// ARCHITECTURE, "Congestion control").
    pub tcp_congestion: Option<String>,
}

/// The ALPN protocols the Proxy terminates.
pub fn server_alpn() -> Vec<Vec<u8>> {
    vec![ALPN_TUNNEL.to_vec(), ALPN_SSH.to_vec(), ALPN_TCP.to_vec()]
}

/// A connection on its way to another core, as movable parts.
enum Handover {
    /// A session, to the core that owns its tunnel.
    Session { parts: TlsParts, plan: SessionPlan },
    /// A new tunnel, to the core that holds the fewest (its place already counted there).
    Tunnel {
        parts: TlsParts,
        remote: SocketAddr,
        id: Identity,
        place: TunnelPlace,
    },
}

/// The core a new tunnel should live on: the one holding the fewest tunnels, unless this one
/// holds no more than that (ties stay where they were accepted, so nothing moves needlessly).
fn place_tunnel(counts: &[usize], here: usize) -> usize {
    let fewest = counts
        .iter()
        .enumerate()
        .min_by_key(|&(core, &n)| (n, core != here))
        .map_or(here, |(core, _)| core);
    match (counts.get(here), counts.get(fewest)) {
        (Some(h), Some(f)) if h > f => fewest,
        _ => here,
    }
}

/// A tunnel's place on a core, counted from the moment it was chosen (so concurrent placements
/// see each other) until the tunnel ends.
struct TunnelPlace {
    shared: Arc<Shared>,
    core: usize,
}

impl TunnelPlace {
    fn take(shared: &Arc<Shared>, core: usize) -> Self {
        if let Some(n) = shared.tunnel_counts.get(core) {
            n.inc();
        }
        Self {
            shared: Arc::clone(shared),
            core,
        }
    }
}

impl Drop for TunnelPlace {
    fn drop(&mut self) {
        if let Some(n) = self.shared.tunnel_counts.get(self.core) {
            n.dec();
        }
    }
}

#[derive(Debug, Clone)]
struct SessionPlan {
    tunnel_id: u64,
    stream_target: String,
    metadata: Bytes,
    node: String,
    host_id: String,
    remote: SocketAddr,
    user: String,
}

struct Shared {
    config: ProxyConfig,
    routes: ArcSwap<RouteTable>,
    handovers: Vec<mpsc::UnboundedSender<Handover>>,
    /// Tunnels per core (placed there, whether or not their task has started yet): the
    /// `gatehouse_proxy_worker_tunnels` gauges, which placement reads.
    tunnel_counts: Vec<Gauge>,
    next_tunnel: AtomicU64,
    metrics: Arc<ProxyMetrics>,
    inventory: mpsc::UnboundedSender<Vec<Inventory>>,
    stop: watch::Receiver<bool>,
}

/// A running Proxy.
pub struct Proxy {
    pub local_addr: SocketAddr,
    /// The I/O backend the workers run on (never `Auto`).
    pub io_backend: IoBackend,
    shared: Arc<Shared>,
    stop: watch::Sender<bool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl std::fmt::Debug for Proxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Proxy")
            .field("local_addr", &self.local_addr)
            .finish_non_exhaustive()
    }
}

impl Proxy {
    /// Bind one listener per worker on the same address (SO_REUSEPORT) and start the workers.
    /// Agents' inventories arrive on the returned channel, in batches (for batching to Auth).
    pub fn start(
        config: ProxyConfig,
        metrics: Arc<ProxyMetrics>,
    ) -> std::io::Result<(Self, mpsc::UnboundedReceiver<Vec<Inventory>>)> {
        let (io_backend, why) = socket::choose(config.io_backend).map_err(std::io::Error::other)?;
        tracing::info!(backend = %io_backend, reason = %why, "proxy: data plane I/O backend");
        metrics.set_io_backend(io_backend);
        let workers = if config.workers == 0 {
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1)
        } else {
            config.workers
        };
        let mut listeners = Vec::with_capacity(workers);
        let mut addr = config.listen;
        for _ in 0..workers {
            let l = bind_reuseport(addr, config.tcp_congestion.as_deref())?;
            addr = l.local_addr()?;
            listeners.push(l);
        }
        // What the accepted connections will run, as the kernel reports it (the host's default
        // unless one was configured).
        if let Some(cc) = listeners
            .first()
            .and_then(|l| socket::tcp_congestion(l).ok())
        {
            let source = if config.tcp_congestion.is_some() {
                "configured"
            } else {
                "host default"
            };
            tracing::info!(congestion_control = %cc, %source, "proxy: TCP congestion control on the public port");
            metrics.set_tcp_congestion(&cc);
        }
        // QUIC tunnels: an endpoint on every worker, each with a socket of its own in one
        // reuseport group that steers datagrams by connection ID (a tunnel lives on the worker
        // whose endpoint accepted it; a quinn connection cannot move).
        let mut quic: Vec<QuicListener> = if config.quic {
            let server = crate::quic::server_config(&config.tls).map_err(std::io::Error::other)?;
            match crate::quic::bind_endpoints(addr, workers) {
                Ok(sockets) => {
                    tracing::info!(%addr, endpoints = sockets.len(), "proxy: QUIC tunnels on UDP");
                    sockets
                        .into_iter()
                        .map(|udp| Some((udp, server.clone())))
                        .collect()
                }
                Err(e) => {
                    tracing::warn!(%addr, error = %e, "proxy: cannot bind UDP; QUIC tunnels are off");
                    Vec::new()
                }
            }
        } else {
            Vec::new()
        };
        let (inv_tx, inv_rx) = mpsc::unbounded_channel();
        let (stop_tx, stop_rx) = watch::channel(false);
        let mut senders = Vec::with_capacity(workers);
        let mut receivers = Vec::with_capacity(workers);
        for _ in 0..workers {
            let (tx, rx) = mpsc::unbounded_channel();
            senders.push(tx);
            receivers.push(rx);
        }
        let shared = Arc::new(Shared {
            config,
            routes: ArcSwap::from_pointee(RouteTable::default()),
            handovers: senders,
            tunnel_counts: (0..workers).map(|c| metrics.worker_tunnels(c)).collect(),
            next_tunnel: AtomicU64::new(1),
            metrics,
            inventory: inv_tx,
            stop: stop_rx,
        });
        let mut threads = Vec::with_capacity(workers);
        for (core, (listener, rx)) in listeners.into_iter().zip(receivers).enumerate() {
            let shared = Arc::clone(&shared);
            let quic = quic.get_mut(core).and_then(Option::take);
            threads.push(
                std::thread::Builder::new()
                    .name(format!("proxy-{core}"))
                    .spawn(move || worker(core, listener, quic, rx, shared, io_backend))?,
            );
        }
        Ok((
            Self {
                local_addr: addr,
                io_backend,
                shared,
                stop: stop_tx,
                threads,
            },
            inv_rx,
        ))
    }

    pub fn routes(&self) -> Arc<RouteTable> {
        self.shared.routes.load_full()
    }

    /// Stop accepting, tell agents to go away (they reconnect elsewhere or later), and join.
    pub fn shutdown(self) {
        let _ = self.stop.send(true);
        for t in self.threads {
            let _ = t.join();
        }
    }
}

/// A listening socket in the public port's `SO_REUSEPORT` group, with `congestion` control (which
/// the connections it accepts inherit) when one is asked for.
fn bind_reuseport(
    addr: SocketAddr,
    congestion: Option<&str>,
) -> std::io::Result<std::net::TcpListener> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )?;
    socket.set_reuse_address(true)?;
    #[cfg(unix)]
    socket.set_reuse_port(true)?;
    if let Some(cc) = congestion {
        socket::set_tcp_congestion(&socket, cc)?;
    }
    // Accepted connections inherit both (Linux copies the listener's TCP options into each
    // one): no setsockopt per connection.
    socket.set_tcp_nodelay(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(4096)?;
    Ok(socket.into())
}

/// Per-worker state: the tunnels this core owns.
#[derive(Clone)]
struct Worker {
    core: usize,
    shared: Arc<Shared>,
    tunnels: Rc<RefCell<HashMap<u64, Tunnel>>>,
    /// Route table changes this worker made in its current tick, not yet published.
    route_changes: Rc<RefCell<RouteChanges>>,
}

/// Route table changes waiting to be published together, and the inventories that go to Auth
/// once they are (Auth lists a node only after this proxy can route to it).
#[derive(Default)]
struct RouteChanges {
    changes: Vec<RouteChange>,
    inventories: Vec<Inventory>,
}

/// A worker's listening socket on its backend.
enum Listener {
    Epoll(TcpListener),
    Uring(UringListener),
}

impl Listener {
    async fn accept(&mut self) -> std::io::Result<(Socket, SocketAddr)> {
        match self {
            Self::Epoll(l) => l.accept().await.map(|(s, a)| (Socket::Epoll(s), a)),
            Self::Uring(l) => l.accept().await.map(|(s, a)| (Socket::Uring(s), a)),
        }
    }
}

type QuicListener = Option<(std::net::UdpSocket, quinn::ServerConfig)>;

fn worker(
    core: usize,
    listener: std::net::TcpListener,
    quic: QuicListener,
    handovers: mpsc::UnboundedReceiver<Handover>,
    shared: Arc<Shared>,
    backend: IoBackend,
) {
    let r = socket::block_on_worker(
        backend,
        serve_worker(core, listener, quic, handovers, shared),
    );
    if let Err(e) = r {
        tracing::error!(core, error = %e, "proxy worker: cannot build its runtime");
    }
}

async fn serve_worker(
    core: usize,
    listener: std::net::TcpListener,
    quic: QuicListener,
    mut handovers: mpsc::UnboundedReceiver<Handover>,
    shared: Arc<Shared>,
) {
    {
        let listener = match crate::uring::current() {
            Some(d) => UringListener::new(listener, d).map(Listener::Uring),
            None => TcpListener::from_std(listener).map(Listener::Epoll),
        };
        let mut listener = match listener {
            Ok(l) => l,
            Err(e) => {
                tracing::error!(core, error = %e, "proxy worker: cannot set up its listener");
                return;
            }
        };
        let w = Worker {
            core,
            shared: Arc::clone(&shared),
            tunnels: Rc::default(),
            route_changes: Rc::default(),
        };
        {
            let w = w.clone();
            tokio::task::spawn_local(async move {
                while let Some(h) = handovers.recv().await {
                    w.serve_handover(h);
                }
            });
        }
        let quic_endpoint = match quic {
            Some((udp, server)) => match quinn::Endpoint::new(
                crate::quic::endpoint_config(core),
                Some(server),
                udp,
                Arc::new(quinn::TokioRuntime),
            ) {
                Ok(endpoint) => {
                    let (w, endpoint2) = (w.clone(), endpoint.clone());
                    tokio::task::spawn_local(async move {
                        while let Some(incoming) = endpoint2.accept().await {
                            let w = w.clone();
                            tokio::task::spawn_local(async move { w.serve_quic(incoming).await });
                        }
                    });
                    Some(endpoint)
                }
                Err(e) => {
                    tracing::error!(core, error = %e, "proxy: cannot start the QUIC endpoint; QUIC tunnels are off");
                    None
                }
            },
            None => None,
        };
        let mut stop = shared.stop.clone();
        loop {
            tokio::select! {
                r = listener.accept() => match r {
                    Ok((tcp, remote)) => {
                        let w = w.clone();
                        tokio::task::spawn_local(async move { w.serve_connection(tcp, remote).await });
                    }
                    Err(e) => {
                        tracing::warn!(core, error = %e, "proxy: accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                },
                _ = stop.changed() => break,
            }
        }
        let tunnels: Vec<Tunnel> = w.tunnels.borrow().values().cloned().collect();
        for t in &tunnels {
            t.go_away("proxy shutting down");
        }
        // Give go-aways a moment to reach the agents.
        tokio::time::sleep(Duration::from_millis(100)).await;
        if let Some(endpoint) = quic_endpoint {
            endpoint.close(quinn::VarInt::from_u32(0), b"proxy shutting down");
        }
    }
}

/// Room for a first read: a ClientHello with a post-quantum key share is about 1.8 KiB.
const HELLO_READ: usize = 2048;

/// Read the ClientHello, and its ALPN: the bytes read go on to the TLS handshake or to Auth,
/// whichever the ALPN picks. A hello split across segments is read as its parts arrive.
async fn read_hello(tcp: &mut Socket) -> Result<(Vec<u8>, Vec<Vec<u8>>), &'static str> {
    use bytes::BufMut as _;
    let mut buf = Vec::with_capacity(HELLO_READ);
    loop {
        let room = client_hello::MAX_HELLO.saturating_sub(buf.len());
        let n = tcp
            .read_buf(&mut (&mut buf).limit(room))
            .await
            .map_err(|_| "read failed")?;
        if n == 0 {
            return Err("closed before sending a ClientHello");
        }
        match client_hello::peek(&buf) {
            Peek::Hello { alpn, .. } => return Ok((buf, alpn)),
            Peek::NotTls(why) => return Err(why),
            Peek::NeedMore if buf.len() >= client_hello::MAX_HELLO => {
                return Err("ClientHello too large");
            }
            Peek::NeedMore => {}
        }
    }
}

fn alpn_name(alpn: Option<&[u8]>) -> String {
    alpn.map(|a| String::from_utf8_lossy(a).into_owned())
        .unwrap_or_else(|| "none".into())
}

/// Who a refused peer was, for the log line.
fn who(id: &Result<Identity, &'static str>) -> String {
    match id {
        Ok(i) => format!("{:?} `{}`", i.kind, i.name),
        Err(why) => (*why).to_owned(),
    }
}

/// The refusal reason for the metric: an expired certificate is told apart.
fn refusal(id: &Result<Identity, &'static str>) -> &'static str {
    match id {
        Err(EXPIRED) => "expired",
        _ => "identity",
    }
}

const EXPIRED: &str = "certificate expired";

/// The identity in a peer's certificate, if this cluster issued it and it has not expired.
/// The expiry is checked here, on every connection, because a resumed TLS session presents
/// the certificate of its first handshake without it being verified again: resumption must
/// never outlive the certificate.
fn identity_of(cert: Option<&[u8]>, cluster: &str) -> Result<Identity, &'static str> {
    let cert = cert.ok_or("no client certificate")?;
    let id = parsed_identity(cert)?;
    if id.cluster != cluster {
        return Err("a certificate of another cluster");
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(0);
    if id.expires <= now {
        return Err(EXPIRED);
    }
    Ok(id)
}

/// Certificates' identities already parsed by this worker, by certificate (DER). A client
/// opens many sessions with one certificate, and parsing X.509 plus the identity's JSON was
/// ~3 % of the proxy's CPU per new session. Only the parse is remembered: cluster and expiry are
/// checked on every connection.
const PARSED_IDENTITIES: usize = 1024;

thread_local! {
    static IDENTITIES: RefCell<HashMap<Box<[u8]>, Identity>> =
        RefCell::new(HashMap::new());
}

fn parsed_identity(cert: &[u8]) -> Result<Identity, &'static str> {
    if let Some(id) = IDENTITIES.with_borrow(|m| m.get(cert).cloned()) {
        return Ok(id);
    }
    let id = Identity::from_cert_der(cert).map_err(|_| "no identity in the certificate")?;
    IDENTITIES.with_borrow_mut(|m| {
        // Bounded: past the limit start over (the busy certificates come straight back).
        if m.len() >= PARSED_IDENTITIES {
            *m = HashMap::new();
        }
        m.insert(cert.into(), id.clone());
    });
    Ok(id)
}

/// An agent's host id and its `host_name` trait; the rest of its identity is dropped.
fn host_of(id: Identity) -> (String, String) {
    let name = id
        .traits
        .get("host_name")
        .and_then(|v| v.first())
        .cloned()
        .unwrap_or_default();
    (id.name, name)
}

fn peer_identity(tls: &TlsStream, cluster: &str) -> Result<Identity, &'static str> {
    let cert = tls
        .peer_certificates()
        .and_then(|c| c.first())
        .map(|c| c.as_ref());
    identity_of(cert, cluster)
}

impl Worker {
    async fn serve_connection(&self, mut tcp: Socket, remote: SocketAddr) {
        // (TCP_NODELAY comes from the listener: see `bind_reuseport`.)
        let metrics = &self.shared.metrics;
        let (hello, alpn) = match tokio::time::timeout(HANDSHAKE_TIMEOUT, read_hello(&mut tcp))
            .await
        {
            Ok(Ok(read)) => read,
            Ok(Err(why)) => {
                tracing::info!(%remote, reason = why, "proxy: closing connection: not a TLS client");
                metrics.refuse("none", "not_tls");
                return;
            }
            Err(_) => {
                metrics.refuse("none", "hello_timeout");
                return;
            }
        };
        if alpn.iter().any(|a| a == ALPN_AUTH) {
            self.pass_to_auth(tcp, remote, &hello).await;
            return;
        }
        let tls = match tokio::time::timeout(
            HANDSHAKE_TIMEOUT,
            TlsStream::accept_received(tcp, Arc::clone(&self.shared.config.tls), hello),
        )
        .await
        {
            Ok(Ok(tls)) => tls,
            Ok(Err(e)) => {
                tracing::info!(%remote, error = %e, "proxy: TLS handshake failed; connection closed");
                metrics.refuse("tls", "handshake");
                return;
            }
            Err(_) => {
                metrics.refuse("tls", "handshake_timeout");
                return;
            }
        };
        let negotiated = tls.alpn_protocol().map(<[u8]>::to_vec);
        metrics.handshake(tls.handshake_kind() == Some(HandshakeKind::Resumed));
        let identity = peer_identity(&tls, &self.shared.config.cluster);
        match (negotiated.as_deref(), identity) {
            (Some(ALPN_TUNNEL), Ok(id))
                if id.kind == IdentityKind::Node && !id.roles.iter().any(|r| r == "@proxy") =>
            {
                self.place_tunnel(tls, remote, id);
            }
            (Some(a @ (ALPN_SSH | ALPN_TCP)), Ok(id)) if id.kind == IdentityKind::User => {
                Box::pin(self.serve_session(tls, remote, id, a == ALPN_SSH)).await
            }
            (alpn, id) => {
                tracing::info!(%remote, alpn = %alpn_name(alpn), who = %who(&id), "proxy: connection refused: wrong identity for this protocol");
                metrics.refuse(&alpn_name(alpn), refusal(&id));
            }
        }
    }

    /// An agent tunnel over QUIC: the same identity rules as over TLS, then the tunnel protocol
    /// on the first bidirectional stream the agent opens, and each session on a stream of its
    /// own where the agent offered that (`ALPN_TUNNEL_STREAMS`).
    async fn serve_quic(&self, incoming: quinn::Incoming) {
        let remote = incoming.remote_address();
        let metrics = &self.shared.metrics;
        let conn = match tokio::time::timeout(HANDSHAKE_TIMEOUT, incoming).await {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => {
                tracing::info!(%remote, error = %e, "proxy: QUIC handshake failed");
                metrics.refuse("quic", "handshake");
                return;
            }
            Err(_) => {
                metrics.refuse("quic", "handshake_timeout");
                return;
            }
        };
        let (alpn, cert) = crate::quic::peer(&conn);
        let id = identity_of(cert.as_deref(), &self.shared.config.cluster);
        let id = match (alpn.as_deref(), id) {
            (Some(ALPN_TUNNEL | ALPN_TUNNEL_STREAMS), Ok(id))
                if id.kind == IdentityKind::Node && !id.roles.iter().any(|r| r == "@proxy") =>
            {
                id
            }
            (alpn, id) => {
                tracing::info!(%remote, alpn = %alpn_name(alpn), who = %who(&id), "proxy: QUIC connection refused: wrong identity for this protocol");
                metrics.refuse("quic", refusal(&id));
                conn.close(quinn::VarInt::from_u32(1), b"wrong identity");
                return;
            }
        };
        let stream = match tokio::time::timeout(HANDSHAKE_TIMEOUT, conn.accept_bi()).await {
            Ok(Ok((send, recv))) => tokio::io::join(recv, send),
            _ => {
                metrics.refuse("quic", "no_stream");
                conn.close(quinn::VarInt::from_u32(2), b"no tunnel stream");
                return;
            }
        };
        // (QUIC tunnels stay on the endpoint's core: a quinn connection cannot move.)
        let place = TunnelPlace::take(&self.shared, self.core);
        // Sessions on QUIC streams of their own where the agent offered it.
        let sessions = (alpn.as_deref() == Some(ALPN_TUNNEL_STREAMS)).then(|| conn.clone());
        self.serve_tunnel(Box::new(stream), remote, id, place, sessions)
            .await;
        conn.close(quinn::VarInt::from_u32(0), b"tunnel closed");
    }

    /// Splice the connection to Auth, starting with the bytes already read from it (`hello`).
    async fn pass_to_auth(&self, mut tcp: Socket, remote: SocketAddr, hello: &[u8]) {
        let mut upstream = match TcpStream::connect(&self.shared.config.auth_addr).await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(%remote, auth = %self.shared.config.auth_addr, error = %e, "proxy: cannot reach Auth for pass-through");
                self.shared.metrics.dial_failure("auth_unreachable");
                return;
            }
        };
        let _ = upstream.set_nodelay(true);
        if upstream.write_all(hello).await.is_err() {
            return;
        }
        let _ = tokio::io::copy_bidirectional(&mut tcp, &mut upstream).await;
    }

    /// A new tunnel lives on the core holding the fewest tunnels (`SO_REUSEPORT` spreads
    /// connections by a hash of their addresses, which a few heavy agents can leave uneven); it is
    /// handed over right after its handshake, the way sessions are.
    fn place_tunnel(&self, tls: TlsStream, remote: SocketAddr, id: Identity) {
        let shared = &self.shared;
        let counts: Vec<usize> = shared
            .tunnel_counts
            .iter()
            .map(|n| usize::try_from(n.get()).unwrap_or(0))
            .collect();
        let core = place_tunnel(&counts, self.core);
        let place = TunnelPlace::take(shared, core);
        if core == self.core {
            self.spawn_tunnel(tls, remote, id, place);
            return;
        }
        let parts = match tls.into_parts(Bytes::new()) {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!(%remote, error = %e, "proxy: cannot hand the tunnel over");
                return;
            }
        };
        let Some(tx) = shared.handovers.get(core) else {
            return;
        };
        shared.metrics.tunnel_moves.inc();
        let moved = Handover::Tunnel {
            parts,
            remote,
            id,
            place,
        };
        if tx.send(moved).is_err() {
            tracing::warn!(%remote, core, "proxy: the tunnel's core is gone");
        }
    }

    /// A tunnel lives for days: it gets a task of its own sized for what it keeps (the
    /// handshake's or the handover's state stays with the task that had it), and its TLS state
    /// moves to the heap once instead of being copied into each enclosing future.
    fn spawn_tunnel(&self, tls: TlsStream, remote: SocketAddr, id: Identity, place: TunnelPlace) {
        let w = self.clone();
        tokio::task::spawn_local(async move {
            w.serve_tunnel(Box::new(tls), remote, id, place, None).await
        });
    }

    /// Queue a route table change, and an agent's inventory for Auth. The changes a worker
    /// makes in one tick are published together, by a task the first of them spawns: when
    /// thousands of agents connect at once (a proxy restart), the table's shared nodes are
    /// copied once per batch, not once per tunnel. An inventory with nothing queued ahead of it
    /// goes to Auth at once.
    fn change_routes(&self, change: Option<RouteChange>, inventory: Option<Inventory>) {
        let mut q = self.route_changes.borrow_mut();
        let idle = q.changes.is_empty() && q.inventories.is_empty();
        if idle && change.is_none() {
            if let Some(inv) = inventory {
                let _ = self.shared.inventory.send(vec![inv]);
            }
            return;
        }
        q.changes.extend(change);
        q.inventories.extend(inventory);
        if idle {
            let w = self.clone();
            tokio::task::spawn_local(async move { w.publish_routes() });
        }
    }

    /// Publish the queued route changes in one table update, then pass on the inventories.
    fn publish_routes(&self) {
        let RouteChanges {
            changes,
            inventories,
        } = std::mem::take(&mut *self.route_changes.borrow_mut());
        if !changes.is_empty() {
            self.shared.routes.rcu(|t| {
                let mut t = RouteTable::clone(t);
                for c in &changes {
                    t.apply(c);
                }
                t
            });
        }
        if !inventories.is_empty() {
            // One message (one wake-up of the Auth batcher) per batch.
            let _ = self.shared.inventory.send(inventories);
        }
    }

    async fn serve_tunnel<T>(
        &self,
        tls: Box<T>,
        remote: SocketAddr,
        id: Identity,
        _place: TunnelPlace,
        quic_sessions: Option<quinn::Connection>,
    ) where
        T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + 'static,
    {
        let shared = &self.shared;
        let tunnel_id = shared.next_tunnel.fetch_add(1, Ordering::Relaxed);
        // A tunnel lives for days: of its identity it keeps the host id and name, nothing else
        // (the rest is freed here, not when the tunnel ends).
        let (host_id, host_name) = host_of(id);
        let (tunnel, mut events) = Tunnel::new(Side::Listener, shared.config.tunnel.clone());
        let native = quic_sessions.is_some();
        if let Some(conn) = quic_sessions {
            tunnel.attach_quic(conn);
            shared.metrics.quic_stream_tunnels.inc();
        }
        self.tunnels.borrow_mut().insert(tunnel_id, tunnel.clone());
        let mut entry = Arc::new(TunnelEntry {
            tunnel_id,
            core: self.core,
            host_id: host_id.clone(),
            name: host_name,
            labels: Default::default(),
            apps: vec![],
        });
        self.change_routes(Some(RouteChange::Upsert(Arc::clone(&entry))), None);
        shared.metrics.tunnels.inc();
        tracing::info!(%remote, %host_id, core = self.core, "proxy: tunnel up");
        // The tunnel's events are handled in the same task as its I/O (one task per tunnel).
        let inventory = {
            let (w, tunnel, host_id) = (self.clone(), tunnel.clone(), host_id.clone());
            async move {
                while let Some(ev) = events.recv().await {
                    match ev {
                        TunnelEvent::Heartbeat(bytes) => {
                            match serde_json::from_slice::<Inventory>(&bytes) {
                                Ok(mut inv) => {
                                    // The certificate says who the agent is, not the heartbeat.
                                    inv.host_id = host_id.clone();
                                    let apps: Vec<String> = inv
                                        .services
                                        .iter()
                                        .filter_map(|s| s.strip_prefix("tcp:").map(str::to_owned))
                                        .collect();
                                    let change = (entry.name != inv.name
                                        || entry.labels != inv.labels
                                        || entry.apps != apps)
                                        .then(|| {
                                            entry = Arc::new(TunnelEntry {
                                                name: inv.name.clone(),
                                                labels: inv.labels.clone(),
                                                apps,
                                                ..(*entry).clone()
                                            });
                                            RouteChange::Upsert(Arc::clone(&entry))
                                        });
                                    w.change_routes(change, Some(inv));
                                }
                                Err(e) => {
                                    tracing::warn!(host_id = %host_id, error = %e, "proxy: malformed heartbeat ignored")
                                }
                            }
                        }
                        TunnelEvent::Incoming { stream, .. } => {
                            tunnel.reject(
                                stream,
                                code::REFUSED,
                                "the proxy accepts no streams from agents",
                            );
                        }
                        TunnelEvent::GoAway { message, .. } => {
                            tracing::info!(host_id = %host_id, %message, "proxy: agent is draining its tunnel");
                        }
                    }
                }
                // Events end only when the tunnel is dropped; the I/O side decides the end.
                std::future::pending::<()>().await;
            }
        };
        let reason = tokio::select! {
            reason = tunnel.run(tls) => reason,
            () = inventory => String::new(),
        };
        self.tunnels.borrow_mut().remove(&tunnel_id);
        self.change_routes(Some(RouteChange::Remove(tunnel_id)), None);
        shared.metrics.tunnels.dec();
        if native {
            shared.metrics.quic_stream_tunnels.dec();
        }
        tracing::info!(%remote, %host_id, %reason, "proxy: tunnel closed");
    }

    async fn serve_session(&self, mut tls: TlsStream, remote: SocketAddr, id: Identity, ssh: bool) {
        let shared = &self.shared;
        let alpn = if ssh {
            "gatehouse-ssh"
        } else {
            "gatehouse-tcp"
        };
        let mut buf = BytesMut::with_capacity(1024);
        let request = tokio::time::timeout(HANDSHAKE_TIMEOUT, async {
            loop {
                match session_proto::decode::<SessionRequest>(&mut buf) {
                    Ok(Some(r)) => return Ok(r),
                    Ok(None) => {}
                    Err(e) => return Err(e.to_string()),
                }
                match tls.read_buf(&mut buf).await {
                    Ok(0) => return Err("closed before sending a request".to_string()),
                    Ok(_) => {}
                    Err(e) => return Err(format!("read failed: {e}")),
                }
            }
        })
        .await;
        let request = match request {
            Ok(Ok(r)) => r,
            Ok(Err(why)) => {
                tracing::info!(%remote, user = %id.name, alpn, reason = %why, "proxy: malformed session request; connection closed");
                shared.metrics.refuse(alpn, "bad_request");
                return;
            }
            Err(_) => {
                shared.metrics.refuse(alpn, "request_timeout");
                return;
            }
        };
        let routes = shared.routes.load();
        let resolved = if ssh {
            routes
                .resolve_node(&request.target)
                .map(|e| (e.clone(), "ssh".to_string()))
        } else {
            routes
                .resolve_app(&request.target)
                .map(|(e, app)| (e.clone(), format!("tcp:{app}")))
        };
        let (entry, stream_target) = match resolved {
            Ok(r) => r,
            Err(e) => {
                let candidates = match &e {
                    RouteError::Unknown { candidates, .. }
                    | RouteError::Ambiguous { candidates, .. }
                    | RouteError::UnknownApp { candidates, .. }
                    | RouteError::AmbiguousApp { candidates, .. } => candidates.clone(),
                    _ => vec![],
                };
                shared.metrics.dial_failure(match e {
                    RouteError::Ambiguous { .. } | RouteError::AmbiguousApp { .. } => {
                        "ambiguous_target"
                    }
                    _ => "unknown_target",
                });
                let resp = SessionResponse {
                    ok: false,
                    error: e.to_string(),
                    candidates,
                    node: String::new(),
                    host_id: String::new(),
                };
                let _ = tls.write_all(&session_proto::encode(&resp)).await;
                let _ = tls.shutdown().await;
                return;
            }
        };
        let metadata = serde_json::json!({
            "user": id.name,
            "login": request.login,
            "source_addr": remote.to_string(),
            "roles": id.roles,
        });
        let plan = SessionPlan {
            tunnel_id: entry.tunnel_id,
            stream_target,
            metadata: Bytes::from(metadata.to_string()),
            node: entry.name.clone(),
            host_id: entry.host_id.clone(),
            remote,
            user: id.name.clone(),
        };
        let leftover = buf.split().freeze();
        if entry.core == self.core {
            self.run_session(tls, leftover, plan).await;
            return;
        }
        // Move the session to the core that owns the tunnel.
        let parts = match tls.into_parts(leftover) {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!(%remote, error = %e, "proxy: cannot hand the session over");
                return;
            }
        };
        match shared.handovers.get(entry.core) {
            Some(tx) => {
                shared.metrics.handovers.inc();
                if tx.send(Handover::Session { parts, plan }).is_err() {
                    tracing::warn!(%remote, core = entry.core, "proxy: owner core is gone");
                }
            }
            None => tracing::error!(
                core = entry.core,
                "proxy: route names a core that does not exist"
            ),
        }
    }

    /// Resume a connection handed over from another core, in a task of its own: a tunnel's task
    /// is sized for what a tunnel keeps (a task shared with the session path would be sized for
    /// a session's larger future, for days).
    fn serve_handover(&self, h: Handover) {
        match h {
            Handover::Session { parts, plan } => match TlsStream::from_parts(parts) {
                Ok((tls, leftover)) => {
                    let w = self.clone();
                    tokio::task::spawn_local(
                        async move { w.run_session(tls, leftover, plan).await },
                    );
                }
                Err(e) => {
                    tracing::warn!(remote = %plan.remote, error = %e, "proxy: cannot resume a handed-over session")
                }
            },
            Handover::Tunnel {
                parts,
                remote,
                id,
                place,
            } => match TlsStream::from_parts(parts) {
                // (Nothing was read from a tunnel before its hand-over: no leftover.)
                Ok((tls, _)) => self.spawn_tunnel(tls, remote, id, place),
                Err(e) => {
                    tracing::warn!(%remote, error = %e, "proxy: cannot resume a handed-over tunnel")
                }
            },
        }
    }

    /// On the tunnel's core: open the stream, answer the client, splice.
    async fn run_session(&self, mut tls: TlsStream, leftover: Bytes, plan: SessionPlan) {
        let shared = &self.shared;
        let tunnel = self.tunnels.borrow().get(&plan.tunnel_id).cloned();
        let opened = match tunnel {
            Some(t) => t.open(&plan.stream_target, plan.metadata.clone()).await,
            None => Err(OpenError::Closed("the node disconnected".into())),
        };
        let stream = match opened {
            Ok(s) => s,
            Err(e) => {
                shared.metrics.dial_failure(match &e {
                    OpenError::Rejected { .. } => "refused_by_agent",
                    _ => "tunnel_closed",
                });
                tracing::info!(remote = %plan.remote, user = %plan.user, node = %plan.node, error = %e, "proxy: session could not be opened");
                let resp = SessionResponse {
                    ok: false,
                    error: e.to_string(),
                    candidates: vec![],
                    node: plan.node,
                    host_id: plan.host_id,
                };
                let _ = tls.write_all(&session_proto::encode(&resp)).await;
                let _ = tls.shutdown().await;
                return;
            }
        };
        let resp = SessionResponse {
            ok: true,
            error: String::new(),
            candidates: vec![],
            node: plan.node.clone(),
            host_id: plan.host_id.clone(),
        };
        if tls.write_all(&session_proto::encode(&resp)).await.is_err() {
            return;
        }
        shared.metrics.sessions.inc();
        shared.metrics.streams.inc();
        let stats = stream.splice(tls, leftover).await;
        shared.metrics.streams.dec();
        shared
            .metrics
            .bytes
            .get_or_create(&metrics::DirectionLabel {
                direction: "to_agent",
            })
            .inc_by(stats.to_tunnel);
        shared
            .metrics
            .bytes
            .get_or_create(&metrics::DirectionLabel {
                direction: "to_user",
            })
            .inc_by(stats.from_tunnel);
        tracing::debug!(remote = %plan.remote, user = %plan.user, node = %plan.node, to_agent = stats.to_tunnel, to_user = stats.from_tunnel, "proxy: session ended");
    }
}

#[cfg(test)]
mod tests {
    use super::{bind_reuseport, place_tunnel, socket};

    /// The proxy sets congestion control and TCP_NODELAY on its listening sockets only: what it
    /// relies on is that every connection they accept comes out with them (whatever the host's
    /// default is).
    #[test]
    fn accepted_connections_inherit_the_listeners_options() {
        // reno is built into every kernel and always allowed without privilege.
        let listener = match bind_reuseport("127.0.0.1:0".parse().unwrap(), Some("reno")) {
            Ok(l) => l,
            Err(e) if e.kind() == std::io::ErrorKind::Unsupported => return, // not Linux
            Err(e) => panic!("bind with reno: {e}"),
        };
        listener.set_nonblocking(false).unwrap();
        let addr = listener.local_addr().unwrap();
        let _client = std::net::TcpStream::connect(addr).unwrap();
        let (accepted, _) = listener.accept().unwrap();
        assert_eq!(socket::tcp_congestion(&accepted).unwrap(), "reno");
        assert!(accepted.nodelay().unwrap(), "TCP_NODELAY inherited");

        let err = bind_reuseport("127.0.0.1:0".parse().unwrap(), Some("no-such-cc"))
            .expect_err("an unknown algorithm fails the bind");
        assert!(err.to_string().contains("no-such-cc"), "{err}");
    }

    #[test]
    fn a_new_tunnel_goes_to_the_core_holding_the_fewest_and_ties_stay() {
        assert_eq!(
            place_tunnel(&[0, 0, 0, 0], 2),
            2,
            "a tie stays where it was accepted"
        );
        assert_eq!(place_tunnel(&[1, 0, 0, 0], 0), 1);
        assert_eq!(place_tunnel(&[1, 1, 0, 1], 0), 2);
        assert_eq!(place_tunnel(&[3, 1, 1, 2], 3), 1);
        assert_eq!(
            place_tunnel(&[1, 1, 2, 1], 1),
            1,
            "no fewer elsewhere: stays"
        );
        assert_eq!(place_tunnel(&[5], 0), 0);
        // A core index out of range (cannot happen) keeps the tunnel where it is.
        assert_eq!(place_tunnel(&[0, 0], 7), 7);
    }
}
