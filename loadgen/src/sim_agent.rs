//! Simulated agents: real tunnel protocol, real TLS, real joined identities; no SSH. They serve
//! `tcp:sink` (read and discard) and `tcp:echo`. Each thread runs a current-thread runtime with
//! many tunnels, as the Proxy's workers do.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use gatehouse_controlplane::host::HostIdentity;
use gatehouse_controlplane::identity::PROXY_SERVER_NAME;
use gatehouse_controlplane::tls::{Trust, client_config_with_alpn};
use gatehouse_dataplane::io::quic::TunnelTransport;
use gatehouse_dataplane::mux::{Tunnel, TunnelEvent};
use gatehouse_dataplane::proxy::Inventory;
use gatehouse_dataplane::tls::TlsStream;
use gatehouse_proto::alpn::TUNNEL as ALPN_TUNNEL;
use gatehouse_proto::tunnel::{Config, Side, code};
use rustls::client::UnbufferedClientConnection;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[derive(Debug, Default)]
pub struct AgentStats {
    pub connected: AtomicU64,
    pub failed: AtomicU64,
    /// When a tunnel last came up or failed (µs since the Unix epoch): the end of the connect
    /// phase, to the microsecond rather than to the status line that reported it.
    pub last_settled_us: AtomicU64,
    pub sink_bytes: AtomicU64,
}

impl AgentStats {
    fn settled_now(&self) {
        self.last_settled_us
            .fetch_max(crate::procstat::unix_micros(), Ordering::Relaxed);
    }
}

/// Hold `count` tunnels (identity `i % ids.len()` for tunnel `i`) from `source_ip` until the
/// process ends. Returns at once; progress is in `stats`.
pub fn spawn(
    ids: Vec<HostIdentity>,
    count: usize,
    proxy: SocketAddr,
    source_ip: std::net::IpAddr,
    stats: Arc<AgentStats>,
    transport: TunnelTransport,
) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name("sim-agents".into())
        .spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            let local = tokio::task::LocalSet::new();
            local.block_on(&rt, async move {
                let configs: Vec<_> = ids
                    .iter()
                    .filter_map(|id| {
                        client_config_with_alpn(
                            &Trust::CaPem(id.ca_pem.clone()),
                            Some((&id.tls_cert, &id.tls_key)),
                            &[ALPN_TUNNEL],
                        )
                        .ok()
                    })
                    .collect();
                if configs.len() != ids.len() || ids.is_empty() {
                    return;
                }
                // QUIC: one client endpoint (one UDP socket) for all of this thread's tunnels.
                let quic = match transport {
                    TunnelTransport::Tls => None,
                    TunnelTransport::Quic => {
                        match gatehouse_dataplane::io::quic::client_endpoint(SocketAddr::new(
                            source_ip, 0,
                        )) {
                            Ok(e) => Some(e),
                            Err(e) => {
                                eprintln!("loadgen: simulated agents: cannot bind UDP: {e}");
                                return;
                            }
                        }
                    }
                };
                // Dial with bounded concurrency: a burst of thousands of handshakes at once only queues.
                let permits = Arc::new(tokio::sync::Semaphore::new(64));
                for i in 0..count {
                    let (Some(id), Some(cfg)) =
                        (ids.get(i % ids.len()), configs.get(i % configs.len()))
                    else {
                        continue;
                    };
                    let (id, cfg, stats, permits, quic) = (
                        id.clone(),
                        Arc::clone(cfg),
                        Arc::clone(&stats),
                        Arc::clone(&permits),
                        quic.clone(),
                    );
                    tokio::task::spawn_local(async move {
                        let Ok(permit) = permits.acquire_owned().await else {
                            return;
                        };
                        let dialed = match &quic {
                            None => dial(cfg, proxy, source_ip)
                                .await
                                .map(|t| (Box::new(t) as Box<dyn TunnelIo>, None)),
                            Some(endpoint) => {
                                match gatehouse_dataplane::io::quic::client_config(&cfg) {
                                    Ok(qcfg) => gatehouse_dataplane::io::quic::dial(
                                        endpoint,
                                        qcfg,
                                        &proxy.to_string(),
                                    )
                                    .await
                                    .map(|(c, s)| (Box::new(s) as Box<dyn TunnelIo>, Some(c))),
                                    Err(e) => Err(std::io::Error::other(e)),
                                }
                            }
                        };
                        match dialed {
                            Ok((io, quic_conn)) => {
                                drop(permit);
                                stats.connected.fetch_add(1, Ordering::Relaxed);
                                stats.settled_now();
                                let native = quic_conn
                                    .as_ref()
                                    .filter(|c| gatehouse_dataplane::io::quic::session_streams(c))
                                    .cloned();
                                serve(io, native, &id, i, &stats).await;
                                drop(quic_conn);
                                stats.connected.fetch_sub(1, Ordering::Relaxed);
                            }
                            Err(e) => {
                                stats.failed.fetch_add(1, Ordering::Relaxed);
                                stats.settled_now();
                                if stats.failed.load(Ordering::Relaxed) < 5 {
                                    eprintln!("loadgen: simulated agent {i}: {e}");
                                }
                            }
                        }
                    });
                }
                std::future::pending::<()>().await;
            });
        })?;
    Ok(())
}

async fn dial(
    cfg: Arc<rustls::ClientConfig>,
    proxy: SocketAddr,
    source_ip: std::net::IpAddr,
) -> std::io::Result<TlsStream<UnbufferedClientConnection>> {
    let socket = if proxy.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    if proxy.is_ipv4() {
        // The port is chosen at connect, per destination: back-to-back runs of 15,000 tunnels
        // would otherwise run out of source ports on their address (TIME_WAIT holds them).
        nix::sys::socket::setsockopt(
            &socket,
            nix::sys::socket::sockopt::IpBindAddressNoPort,
            &true,
        )
        .map_err(std::io::Error::from)?;
    }
    socket.bind(SocketAddr::new(source_ip, 0))?;
    let tcp = socket.connect(proxy).await?;
    tcp.set_nodelay(true)?;
    let name = rustls::pki_types::ServerName::try_from(PROXY_SERVER_NAME)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    // The agent's own TLS stream (the data plane's, client side).
    TlsStream::connect(tcp, cfg, name).await
}

/// A tunnel's byte stream, over TLS or QUIC.
trait TunnelIo: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin> TunnelIo for T {}

async fn serve(
    tls: Box<dyn TunnelIo>,
    quic_sessions: Option<quinn::Connection>,
    id: &HostIdentity,
    i: usize,
    stats: &Arc<AgentStats>,
) {
    let (tunnel, mut events) = Tunnel::new(Side::Dialer, Config::default());
    if let Some(conn) = quic_sessions {
        tunnel.attach_quic(conn);
    }
    let inv = Inventory {
        host_id: id.host_id.clone(),
        name: id.host_name.clone(),
        labels: [("sim".to_string(), (i % 100).to_string())].into(),
        addresses: vec![],
        services: vec!["tcp:sink".into(), "tcp:echo".into(), "tcp:source".into()],
        app_labels: Default::default(),
    };
    let inv = Bytes::from(serde_json::to_vec(&inv).unwrap_or_default());
    let heartbeat = {
        let t = tunnel.clone();
        tokio::task::spawn_local(async move {
            loop {
                t.send_heartbeat(inv.clone());
                tokio::time::sleep(Duration::from_secs(30)).await;
            }
        })
    };
    let dispatcher = {
        let (t, stats) = (tunnel.clone(), Arc::clone(stats));
        tokio::task::spawn_local(async move {
            while let Some(ev) = events.recv().await {
                let TunnelEvent::Incoming { stream, target, .. } = ev else {
                    continue;
                };
                let Ok(handle) = (match target.as_str() {
                    "tcp:sink" | "tcp:echo" | "tcp:source" => t.accept(stream),
                    _ => {
                        t.reject(
                            stream,
                            code::NOT_FOUND,
                            "simulated agents serve tcp:sink, tcp:echo and tcp:source",
                        );
                        continue;
                    }
                }) else {
                    continue;
                };
                let stats = Arc::clone(&stats);
                let echo = target == "tcp:echo";
                let source = target == "tcp:source";
                tokio::task::spawn_local(async move {
                    let (near, mut far) = tokio::io::duplex(256 * 1024);
                    let app = async move {
                        if source {
                            crate::throughput::source(far).await;
                            return;
                        }
                        let mut buf = vec![0u8; 64 * 1024];
                        loop {
                            match far.read(&mut buf).await {
                                Ok(0) | Err(_) => break,
                                Ok(n) => {
                                    stats.sink_bytes.fetch_add(n as u64, Ordering::Relaxed);
                                    if echo
                                        && far
                                            .write_all(buf.get(..n).unwrap_or_default())
                                            .await
                                            .is_err()
                                    {
                                        break;
                                    }
                                }
                            }
                        }
                        let _ = far.shutdown().await;
                    };
                    tokio::join!(handle.splice(near, Bytes::new()), app);
                });
            }
        })
    };
    let _ = tunnel.run(tls).await;
    heartbeat.abort();
    dispatcher.abort();
}
