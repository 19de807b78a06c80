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

mod admission;
mod browsers;
mod leaves;
mod locks;
mod metrics;
mod peers;
mod router;
mod sessions;
mod throttle;
mod tunnels;
mod worker;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use arc_swap::ArcSwap;
use gatehouse_proto::alpn;
use gatehouse_proto::tunnel;
use prometheus_client::metrics::gauge::Gauge;
use tokio::sync::{mpsc, watch};

use crate::io::IoBackend;
use crate::io::backend;
use crate::io::options::{bind_reuseport, tcp_congestion};
pub use browsers::{BrowserConn, Browsers, LocalClient, LocalClients};
pub use leaves::Leaves;
pub use locks::Locks;
pub use metrics::ProxyMetrics;
pub use peers::{ProxyAnnouncement, ProxySet};
pub use router::Inventory;
use router::RouteTable;
pub use throttle::SessionRate;
use worker::{Handover, QuicListener};

/// The host CA keys trusted now, as the watch stream says: the signer first, the previous key
/// (during a rotation) until `previous_until`.
#[derive(Debug, Default)]
pub struct HostCas(arc_swap::ArcSwap<(Vec<String>, i64)>);

impl HostCas {
    pub fn set(&self, keys: Vec<String>, previous_until: i64) {
        self.0.store(Arc::new((keys, previous_until)));
    }

    /// The keys trusted now.
    pub fn trusted(&self) -> Vec<String> {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
            .unwrap_or(0);
        let held = self.0.load();
        let (keys, until) = (&held.0, held.1);
        keys.iter()
            .enumerate()
            .filter(|(i, _)| *i == 0 || until > now)
            .map(|(_, k)| k.clone())
            .collect()
    }
}

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
    /// docs/decisions/0008).
    pub tcp_congestion: Option<String>,
    /// New SSH sessions per source address (a token bucket; `per_second = 0` turns it off).
    pub ssh_session_rate: SessionRate,
    /// The proxies agents are told to keep a tunnel to (kept current by the role).
    pub proxies: Arc<ProxySet>,
    /// Trusted leaf clusters, whose proxies may hold a tunnel here (kept current by the role).
    pub leaves: Arc<Leaves>,
    /// The locks in force (kept current by the role): locked users' and bots' sessions are
    /// refused, locked nodes' tunnels closed.
    pub locks: Arc<Locks>,
    /// The cluster's host CA keys (kept current by the role), told to SSH clients.
    pub host_cas: Arc<HostCas>,
    /// Signs the preamble that tells Auth a passed-through client's address (this proxy's
    /// certificate and key; replaced on renewal). `None`: Auth sees the proxy's address.
    pub client_addr: Arc<arc_swap::ArcSwapOption<gatehouse_controlplane::client_addr::Asserter>>,
    /// The web UI's connections on browsers' behalf (sessions credited to the browser).
    pub local_clients: Arc<LocalClients>,
    /// Audit events the proxy records itself (a session routed to a leaf), sent to Auth in
    /// batches by the role; `None`: not recorded.
    pub audit: Option<mpsc::UnboundedSender<gatehouse_controlplane::proto::AuditEvent>>,
}

/// The ALPN protocols the Proxy terminates.
pub fn server_alpn() -> Vec<Vec<u8>> {
    vec![
        alpn::TUNNEL.to_vec(),
        alpn::SSH.to_vec(),
        alpn::TCP.to_vec(),
        admission::HTTP2.to_vec(),
        admission::HTTP1.to_vec(),
    ]
}

/// What every worker of one Proxy shares.
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
    /// New SSH sessions per source address, shared by the workers (taken once per session).
    throttle: std::sync::Mutex<throttle::Throttle>,
    /// The web UI, once the daemon has set it (browsers are refused until then).
    browsers: browsers::BrowserSlot,
}

/// A running Proxy.
pub struct Proxy {
    pub local_addr: SocketAddr,
    /// The I/O backend the workers run on (never `Auto`).
    pub io_backend: IoBackend,
    stop: watch::Sender<bool>,
    threads: Vec<std::thread::JoinHandle<()>>,
    browsers: browsers::BrowserSlot,
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
        let (io_backend, why) =
            backend::choose(config.io_backend).map_err(std::io::Error::other)?;
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
        if let Some(cc) = listeners.first().and_then(|l| tcp_congestion(l).ok()) {
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
            let server =
                crate::io::quic::server_config(&config.tls).map_err(std::io::Error::other)?;
            match crate::io::quic::bind_endpoints(addr, workers) {
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
        let browsers = browsers::BrowserSlot::default();
        let shared = Arc::new(Shared {
            browsers: Arc::clone(&browsers),
            throttle: std::sync::Mutex::new(throttle::Throttle::new(config.ssh_session_rate)),
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
                    .spawn(move || worker::run(core, listener, quic, rx, shared, io_backend))?,
            );
        }
        Ok((
            Self {
                local_addr: addr,
                io_backend,
                stop: stop_tx,
                threads,
                browsers,
            },
            inv_rx,
        ))
    }

    /// Serve browsers (HTTP on the public port) with `b` from now on; false if already set.
    pub fn serve_browsers(&self, b: Arc<dyn Browsers>) -> bool {
        self.browsers.set(b).is_ok()
    }

    /// Stop accepting, tell agents to go away (they reconnect elsewhere or later), and join.
    pub fn shutdown(self) {
        let _ = self.stop.send(true);
        for t in self.threads {
            let _ = t.join();
        }
    }
}
