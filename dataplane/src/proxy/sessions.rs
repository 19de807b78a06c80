//! Users' sessions on the Proxy: read the session request, resolve its target in the route
//! table, move the session to the core that owns the target's tunnel, open a stream there,
//! answer the client and splice. The answer is built here and nowhere else.

use std::net::SocketAddr;
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use gatehouse_controlplane::identity::Identity;
use gatehouse_proto::session::{self, SessionRequest, SessionResponse};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::admission::SessionKind;
use super::router::{RouteError, RouteTable, TunnelEntry};
use super::worker::{HANDSHAKE_TIMEOUT, Handover, Worker};
use crate::mux::OpenError;
use crate::tls::TlsStream;

/// A session's route, decided where it was accepted, carried to the tunnel's core.
#[derive(Debug, Clone)]
pub(super) struct SessionPlan {
    tunnel_id: u64,
    stream_target: String,
    metadata: Bytes,
    node: String,
    host_id: String,
    pub(super) remote: SocketAddr,
    user: String,
}

/// Which tunnel serves a session's target, and the stream target the agent is asked for (`ssh`
/// or `tcp:APP`).
fn resolve(
    routes: &RouteTable,
    kind: SessionKind,
    target: &str,
) -> Result<(TunnelEntry, String), RouteError> {
    match kind {
        SessionKind::Ssh => routes
            .resolve_node(target)
            .map(|e| (e.clone(), "ssh".to_string())),
        SessionKind::Tcp => routes
            .resolve_app(target)
            .map(|(e, app)| (e.clone(), format!("tcp:{app}"))),
    }
}

/// The stream a leaf cluster's proxy is asked for: `session:ssh:TARGET`, `session:tcp:APP`,
/// or `list:nodes` (the target `@nodes`: the leaf's nodes, for `gsh ls --cluster`).
pub(crate) fn leaf_stream_target(kind: SessionKind, target: &str) -> String {
    match kind {
        SessionKind::Ssh if target == NODES => "list:nodes".into(),
        SessionKind::Ssh => format!("session:ssh:{target}"),
        SessionKind::Tcp => format!("session:tcp:{target}"),
    }
}

/// The session target that lists a leaf cluster's nodes.
pub const NODES: &str = "@nodes";

/// The targets a user may have meant, for the refusal.
fn candidates(e: &RouteError) -> Vec<String> {
    match e {
        RouteError::Unknown { candidates, .. }
        | RouteError::Ambiguous { candidates, .. }
        | RouteError::UnknownApp { candidates, .. }
        | RouteError::AmbiguousApp { candidates, .. } => candidates.clone(),
        _ => vec![],
    }
}

/// The Proxy's answer to a session request: accepted (no `error`) or refused, with the node
/// that serves (or would have served) it.
fn response(
    error: Option<String>,
    candidates: Vec<String>,
    node: &str,
    host_id: &str,
) -> SessionResponse {
    SessionResponse {
        ok: error.is_none(),
        error: error.unwrap_or_default(),
        candidates,
        node: node.to_owned(),
        host_id: host_id.to_owned(),
        host_ca: vec![],
    }
}

/// Send a refusal and close (best effort: the client may be gone).
async fn answer(tls: &mut TlsStream, resp: &SessionResponse) {
    let _ = tls.write_all(&session::encode(resp)).await;
    let _ = tls.shutdown().await;
}

impl Worker {
    /// Read the session request, resolve its target, and run the session on the core that
    /// owns the target's tunnel (this one, or another by hand-over).
    pub(super) async fn serve_session(
        &self,
        mut tls: TlsStream,
        remote: SocketAddr,
        id: Identity,
        kind: SessionKind,
    ) {
        let shared = &self.shared;
        // The web UI's terminal on a browser's behalf: the session is the browser's.
        let remote = shared
            .config
            .local_clients
            .client_of(remote)
            .unwrap_or(remote);
        let alpn = kind.alpn();
        let mut buf = BytesMut::with_capacity(1024);
        let request = tokio::time::timeout(HANDSHAKE_TIMEOUT, async {
            loop {
                match session::decode::<SessionRequest>(&mut buf) {
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
        let throttled = (kind == SessionKind::Ssh)
            .then(|| {
                let mut t = shared
                    .throttle
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                t.admit(remote.ip(), Instant::now()).err()
            })
            .flatten();
        if let Some(wait) = throttled {
            shared.metrics.refuse(alpn, "rate_limited");
            tracing::info!(%remote, user = %id.name, "proxy: SSH session refused: too many new sessions from this address");
            let error = format!(
                "too many new SSH sessions from {}; try again in {} ms",
                remote.ip(),
                wait.as_millis().max(1)
            );
            answer(&mut tls, &response(Some(error), vec![], "", "")).await;
            return;
        }
        // A session for a trusted leaf cluster goes through the leaf's tunnel, whose proxy
        // resolves the target among its own nodes.
        let leaf = (!request.cluster.is_empty() && request.cluster != shared.config.cluster)
            .then(|| request.cluster.clone());
        let resolved = match &leaf {
            Some(cluster) => match shared.routes.load().resolve_cluster(cluster) {
                // Trust removed: refused at once, before the leaf's tunnel ends.
                Some(e) if shared.config.leaves.is_trusted(cluster) => {
                    Ok((e.clone(), leaf_stream_target(kind, &request.target)))
                }
                _ => {
                    shared.metrics.dial_failure("leaf_offline");
                    let error = shared.config.leaves.offline(cluster);
                    answer(&mut tls, &response(Some(error), vec![], "", "")).await;
                    return;
                }
            },
            None => resolve(&shared.routes.load(), kind, &request.target),
        };
        let (entry, stream_target) = match resolved {
            Ok(r) => r,
            Err(e) => {
                shared.metrics.dial_failure(match e {
                    RouteError::Ambiguous { .. } | RouteError::AmbiguousApp { .. } => {
                        "ambiguous_target"
                    }
                    _ => "unknown_target",
                });
                let candidates = candidates(&e);
                answer(&mut tls, &response(Some(e.to_string()), candidates, "", "")).await;
                return;
            }
        };
        // A proxy of this cluster opens a session only for a trusted root's user, named in
        // the request; anyone else's `on_behalf` is ignored.
        // A lock (or, in strict mode, lock state that cannot be refreshed) refuses the session.
        let lock = match &request.on_behalf {
            Some(who) if super::admission::is_own_proxy(&id, &shared.config.cluster) => {
                shared.config.locks.check_remote_user(&who.user, &who.roles)
            }
            _ => shared.config.locks.check_session(&id),
        };
        if let Err(reason) = lock {
            shared.metrics.refuse(alpn, "locked");
            tracing::info!(%remote, user = %id.name, %reason, "proxy: session refused by a lock");
            answer(&mut tls, &response(Some(reason), vec![], "", "")).await;
            return;
        }
        let metadata = if super::admission::is_own_proxy(&id, &shared.config.cluster) {
            let Some(who) = &request.on_behalf else {
                shared.metrics.refuse(alpn, "identity");
                let error = "a proxy opens sessions only on behalf of a trusted cluster's user";
                answer(&mut tls, &response(Some(error.into()), vec![], "", "")).await;
                return;
            };
            serde_json::json!({
                "user": who.user,
                "login": request.login,
                "source_addr": who.source_addr,
                "roles": who.roles,
                "cluster": who.cluster,
                "via": id.name,
            })
        } else {
            serde_json::json!({
                "user": id.name,
                "login": request.login,
                "source_addr": remote.to_string(),
                "roles": id.roles,
                "cluster": shared.config.cluster,
            })
        };
        if let Some(cluster) = &leaf {
            tracing::info!(%remote, user = %id.name, %cluster, target = %request.target, "proxy: session routed to a leaf cluster");
            if let Some(audit) = &shared.config.audit {
                let _ = audit.send(gatehouse_controlplane::proto::AuditEvent {
                    event_id: uuid::Uuid::new_v4().to_string(),
                    r#type: "session.route".into(),
                    time_nanos: i64::try_from(
                        std::time::SystemTime::now()
                            .duration_since(std::time::UNIX_EPOCH)
                            .map(|d| d.as_nanos())
                            .unwrap_or(0),
                    )
                    .unwrap_or(i64::MAX),
                    actor: id.name.clone(),
                    source_addr: remote.ip().to_string(),
                    data_json: serde_json::json!({
                        "cluster": cluster,
                        "target": request.target,
                        "login": request.login,
                        "kind": alpn,
                    })
                    .to_string(),
                    ..Default::default()
                });
            }
        }
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

    /// On the tunnel's core: open the stream, answer the client, splice.
    pub(super) async fn run_session(&self, mut tls: TlsStream, leftover: Bytes, plan: SessionPlan) {
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
                let resp = response(Some(e.to_string()), vec![], &plan.node, &plan.host_id);
                answer(&mut tls, &resp).await;
                return;
            }
        };
        let mut resp = response(None, vec![], &plan.node, &plan.host_id);
        if plan.stream_target == "ssh" {
            resp.host_ca = shared.config.host_cas.trusted();
        }
        if tls.write_all(&session::encode(&resp)).await.is_err() {
            return;
        }
        shared.metrics.sessions.inc();
        shared.metrics.streams.inc();
        let stats = stream.splice(tls, leftover).await;
        shared.metrics.streams.dec();
        shared
            .metrics
            .session_bytes(stats.to_tunnel, stats.from_tunnel);
        tracing::debug!(remote = %plan.remote, user = %plan.user, node = %plan.node, to_agent = stats.to_tunnel, to_user = stats.from_tunnel, "proxy: session ended");
    }
}
