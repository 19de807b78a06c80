//! One Proxy worker: a thread with a current-thread runtime on its I/O backend, accepting on its
//! own `SO_REUSEPORT` listener (and QUIC endpoint), reading each ClientHello to pass Auth's
//! connections through untouched, handshaking the rest and handing each to a tunnel or a
//! session as [`super::admission`] decides. Connections that belong on another core arrive here
//! as [`Handover`]s.

use std::cell::RefCell;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use gatehouse_controlplane::identity::Identity;
use gatehouse_proto::client_hello::{self, Peek};
use rustls::HandshakeKind;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;

use super::Shared;
use super::admission::{
    self, Admission, FrontDoor, Transport, Unverified, alpn_name, parsed_identity, verify, who,
};
use super::sessions::SessionPlan;
use super::tunnels::{RouteChanges, TunnelPlace};
use crate::io::IoBackend;
use crate::io::backend;
use crate::io::socket::{Listener, Socket};
use crate::mux::Tunnel;
use crate::tls::{TlsParts, TlsStream};

/// How long a client has to send its ClientHello, finish its handshake, or send its session
/// request.
pub(super) const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// A connection on its way to another core, as movable parts.
pub(super) enum Handover {
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

/// Per-worker state: the tunnels this core owns.
#[derive(Clone)]
pub(super) struct Worker {
    pub(super) core: usize,
    pub(super) shared: Arc<Shared>,
    pub(super) tunnels: Rc<RefCell<HashMap<u64, Tunnel>>>,
    /// Route table changes this worker made in its current tick, not yet published.
    pub(super) route_changes: Rc<RefCell<RouteChanges>>,
}

pub(super) type QuicListener = Option<(std::net::UdpSocket, quinn::ServerConfig)>;

/// The worker thread's body.
pub(super) fn run(
    core: usize,
    listener: std::net::TcpListener,
    quic: QuicListener,
    handovers: mpsc::UnboundedReceiver<Handover>,
    shared: Arc<Shared>,
    backend: IoBackend,
) {
    let r = backend::block_on_worker(
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
        let mut listener = match Listener::from_std(listener) {
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
                crate::io::quic::endpoint_config(core),
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

impl Worker {
    pub(super) async fn serve_connection(&self, mut tcp: Socket, remote: SocketAddr) {
        // (TCP_NODELAY comes from the listener: see `io::options::bind_reuseport`.)
        let metrics = &self.shared.metrics;
        let (hello, offered) = match tokio::time::timeout(HANDSHAKE_TIMEOUT, read_hello(&mut tcp))
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
        if admission::front_door(&offered) == FrontDoor::PassToAuth {
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
        let peer = self.peer_identity(
            tls.peer_certificates()
                .and_then(|c| c.first())
                .map(|c| c.as_ref()),
        );
        match (
            admission::admit(
                Transport::Tls,
                negotiated.as_deref(),
                &peer,
                &self.shared.config.cluster,
            ),
            peer,
        ) {
            (Admission::Tunnel { .. } | Admission::LeafTunnel, Ok(id)) => {
                self.place_tunnel(tls, remote, id)
            }
            (Admission::Session(kind), Ok(id)) => {
                Box::pin(self.serve_session(tls, remote, id, kind)).await
            }
            (Admission::Browser, _) => self.serve_browser(tls, remote, negotiated.as_deref()),
            (decision, peer) => {
                let alpn = alpn_name(negotiated.as_deref());
                self.refused(remote, &alpn, &alpn, decision, &peer);
            }
        }
    }

    /// Bridge a browser's connection to the web UI (see [`super::browsers`]).
    fn serve_browser(&self, tls: TlsStream, remote: SocketAddr, alpn: Option<&[u8]>) {
        let Some(web) = self.shared.browsers.get() else {
            tracing::info!(%remote, "proxy: browser refused: the web UI is not serving yet");
            self.shared.metrics.refuse(&alpn_name(alpn), "no_web_ui");
            return;
        };
        let (ours, theirs) = tokio::io::duplex(super::browsers::PIPE_BYTES);
        web.accept(super::browsers::BrowserConn {
            io: theirs,
            remote,
            http2: alpn == Some(super::admission::HTTP2),
        });
        tokio::task::spawn_local(super::browsers::bridge(tls, ours));
    }

    /// The verified identity in a peer's certificate (DER).
    pub(super) fn peer_identity(&self, cert: Option<&[u8]>) -> Result<Identity, Unverified> {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
            .unwrap_or(0);
        let leaves = &self.shared.config.leaves;
        parsed_identity(cert).and_then(|id| {
            verify(
                id,
                &self.shared.config.cluster,
                |c| leaves.is_trusted(c),
                now,
            )
        })
    }

    /// Log and count a connection [`admission::admit`] refused (`label`: the metric's ALPN label).
    pub(super) fn refused(
        &self,
        remote: SocketAddr,
        alpn: &str,
        label: &str,
        decision: Admission,
        peer: &Result<Identity, Unverified>,
    ) {
        let reason = match decision {
            Admission::Refuse { reason } => reason,
            _ => "identity",
        };
        tracing::info!(%remote, %alpn, who = %who(peer), "proxy: connection refused: wrong identity for this protocol");
        self.shared.metrics.refuse(label, reason);
    }

    /// Splice the connection to Auth, starting with the bytes already read from it (`hello`).
    async fn pass_to_auth(&self, mut tcp: Socket, remote: SocketAddr, hello: &[u8]) {
        let mut upstream = match gatehouse_controlplane::client::connect_any(
            &self.shared.config.auth_addr,
            gatehouse_controlplane::client::PER_ADDRESS_CONNECT_TIMEOUT,
        )
        .await
        {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(%remote, auth = %self.shared.config.auth_addr, error = %e, "proxy: cannot reach Auth for pass-through");
                self.shared.metrics.dial_failure("auth_unreachable");
                return;
            }
        };
        let _ = upstream.set_nodelay(true);
        // The client's address, signed, before its first byte (Auth verifies it).
        if let Some(asserter) = self.shared.config.client_addr.load_full() {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
                .unwrap_or(0);
            let preamble = asserter.preamble(remote, now, rand::random());
            if upstream.write_all(&preamble).await.is_err() {
                return;
            }
        }
        if upstream.write_all(hello).await.is_err() {
            return;
        }
        let _ = tokio::io::copy_bidirectional(&mut tcp, &mut upstream).await;
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
}
