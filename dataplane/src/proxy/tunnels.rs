//! Agents' tunnels on the Proxy: each tunnel is placed on the core holding the fewest (handed
//! over right after its handshake, as sessions are), served in a task of its own for as long as
//! it lives, and published in the shared route table with the inventory its heartbeats carry.
//! Route changes a worker makes in one tick are published together; inventories go on to Auth.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use bytes::Bytes;
use gatehouse_controlplane::identity::Identity;
use gatehouse_proto::tunnel::{Side, code};

use super::Shared;
use super::admission::{self, Admission, Transport, alpn_name};
use super::router::{Inventory, RouteChange, RouteTable, TunnelEntry};
use super::worker::{HANDSHAKE_TIMEOUT, Handover, Worker};
use crate::mux::{Tunnel, TunnelEvent};
use crate::tls::TlsStream;

/// The core a new tunnel should live on: the one holding the fewest tunnels, unless this one
/// holds no more than that (ties stay where they were accepted, so nothing moves needlessly).
fn choose_core(counts: &[usize], here: usize) -> usize {
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
pub(super) struct TunnelPlace {
    shared: Arc<Shared>,
    core: usize,
}

impl TunnelPlace {
    pub(super) fn take(shared: &Arc<Shared>, core: usize) -> Self {
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

/// Route table changes waiting to be published together, and the inventories that go to Auth
/// once they are (Auth lists a node only after this proxy can route to it).
#[derive(Default)]
pub(super) struct RouteChanges {
    changes: Vec<RouteChange>,
    inventories: Vec<Inventory>,
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

impl Worker {
    /// An agent tunnel over QUIC: the same identity rules as over TLS, then the tunnel protocol
    /// on the first bidirectional stream the agent opens, and each session on a stream of its
    /// own where the agent offered that (`ALPN_TUNNEL_STREAMS`).
    pub(super) async fn serve_quic(&self, incoming: quinn::Incoming) {
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
        let (alpn, cert) = crate::io::quic::peer(&conn);
        let peer = self.peer_identity(cert.as_deref());
        let (id, session_streams) = match (
            admission::admit(
                Transport::Quic,
                alpn.as_deref(),
                &peer,
                &self.shared.config.cluster,
            ),
            peer,
        ) {
            (Admission::Tunnel { session_streams }, Ok(id)) => (id, session_streams),
            (decision, peer) => {
                self.refused(remote, &alpn_name(alpn.as_deref()), "quic", decision, &peer);
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
        let sessions = session_streams.then(|| conn.clone());
        self.serve_tunnel(Box::new(stream), remote, id, place, sessions)
            .await;
        conn.close(quinn::VarInt::from_u32(0), b"tunnel closed");
    }

    /// A new tunnel lives on the core holding the fewest tunnels (`SO_REUSEPORT` spreads
    /// connections by a hash of their addresses, which a few heavy agents can leave uneven); it is
    /// handed over right after its handshake, the way sessions are.
    pub(super) fn place_tunnel(&self, tls: TlsStream, remote: SocketAddr, id: Identity) {
        let shared = &self.shared;
        let counts: Vec<usize> = shared
            .tunnel_counts
            .iter()
            .map(|n| usize::try_from(n.get()).unwrap_or(0))
            .collect();
        let core = choose_core(&counts, self.core);
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
    pub(super) fn spawn_tunnel(
        &self,
        tls: TlsStream,
        remote: SocketAddr,
        id: Identity,
        place: TunnelPlace,
    ) {
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
        // A trusted leaf cluster's proxy: filed under its cluster, not a node.
        let leaf = (id.cluster != shared.config.cluster).then(|| id.cluster.clone());
        let (host_id, host_name) = match &leaf {
            Some(cluster) => (super::router::leaf_host_id(cluster), String::new()),
            None => host_of(id),
        };
        // A locked node is told why and closed before it is placed anywhere (no route, no count).
        if leaf.is_none()
            && let Some(reason) = shared.config.locks.node_locked(&host_id, &host_name)
        {
            let (tunnel, _events) = Tunnel::new(Side::Listener, shared.config.tunnel.clone());
            tunnel.go_away(&reason);
            let _ =
                tokio::time::timeout(std::time::Duration::from_millis(200), tunnel.run(tls)).await;
            shared.metrics.refuse("gatehouse-tunnel", "locked");
            tracing::info!(%remote, %host_id, %reason, "proxy: tunnel of a locked node refused");
            return;
        }
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
        // The proxies the agent keeps tunnels to: now, and after each change with the agent's
        // next heartbeat.
        let mut proxies_sent = 0;
        if let Some(cluster) = &leaf {
            shared.config.leaves.tunnel_up(cluster);
            // Leaf proxies hold no tunnel to this cluster's other proxies: nothing to announce.
            proxies_sent = u64::MAX;
        }
        if let Some((v, set)) = shared.config.proxies.newer_than(proxies_sent) {
            tunnel.send_heartbeat(set);
            proxies_sent = v;
        }
        let lock_names = (host_id.clone(), entry.name.clone());
        // The tunnel's events are handled in the same task as its I/O (one task per tunnel).
        let inventory = {
            let (w, tunnel, host_id, leaf) =
                (self.clone(), tunnel.clone(), host_id.clone(), leaf.clone());
            async move {
                while let Some(ev) = events.recv().await {
                    match ev {
                        // A leaf's heartbeat: the tunnel stays while the leaf is trusted.
                        TunnelEvent::Heartbeat(_) if leaf.is_some() => {
                            if let Some(cluster) = &leaf
                                && !w.shared.config.leaves.is_trusted(cluster)
                            {
                                tracing::info!(%cluster, "proxy: trust in the leaf was removed; its tunnel ends");
                                return;
                            }
                        }
                        TunnelEvent::Heartbeat(bytes) => {
                            if let Some((v, set)) = w.shared.config.proxies.newer_than(proxies_sent)
                            {
                                tunnel.send_heartbeat(set);
                                proxies_sent = v;
                            }
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
        // A lock on this node (now or later) tells the agent why and ends the tunnel.
        let locked = {
            let (locks, tunnel) = (Arc::clone(&shared.config.locks), tunnel.clone());
            let (host_id, name) = lock_names;
            let is_leaf = leaf.is_some();
            async move {
                let mut changes = locks.subscribe();
                loop {
                    if !is_leaf && let Some(reason) = locks.node_locked(&host_id, &name) {
                        tunnel.go_away(&reason);
                        // The go-away goes out while the tunnel still runs.
                        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
                        return reason;
                    }
                    if changes.changed().await.is_err() {
                        std::future::pending::<()>().await;
                    }
                }
            }
        };
        let reason = tokio::select! {
            reason = tunnel.run(tls) => reason,
            () = inventory => String::new(),
            reason = locked => {
                shared.metrics.refuse("gatehouse-tunnel", "locked");
                reason
            }
        };
        self.tunnels.borrow_mut().remove(&tunnel_id);
        self.change_routes(Some(RouteChange::Remove(tunnel_id)), None);
        if let Some(cluster) = &leaf {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
                .unwrap_or(0);
            shared.config.leaves.tunnel_down(cluster, now);
        }
        shared.metrics.tunnels.dec();
        if native {
            shared.metrics.quic_stream_tunnels.dec();
        }
        tracing::info!(%remote, %host_id, %reason, "proxy: tunnel closed");
    }
}

#[cfg(test)]
mod tests {
    use super::choose_core;

    #[test]
    fn a_new_tunnel_goes_to_the_core_holding_the_fewest_and_ties_stay() {
        assert_eq!(
            choose_core(&[0, 0, 0, 0], 2),
            2,
            "a tie stays where it was accepted"
        );
        assert_eq!(choose_core(&[1, 0, 0, 0], 0), 1);
        assert_eq!(choose_core(&[1, 1, 0, 1], 0), 2);
        assert_eq!(choose_core(&[3, 1, 1, 2], 3), 1);
        assert_eq!(
            choose_core(&[1, 1, 2, 1], 1),
            1,
            "no fewer elsewhere: stays"
        );
        assert_eq!(choose_core(&[5], 0), 0);
        // A core index out of range (cannot happen) keeps the tunnel where it is.
        assert_eq!(choose_core(&[0, 0], 7), 7);
    }
}
