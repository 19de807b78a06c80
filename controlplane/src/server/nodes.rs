//! The node inventory: heartbeats upserted in batches (by proxies for their agents, or by an
//! agent for itself only), listed while they are fresh.

use std::time::Duration;

use tonic::Status;

use super::call::{Audit, Call, Done, Failure};
use super::{internal, now_secs, store_status, ttl_from};
use crate::identity::IdentityKind;
use crate::proto;
use crate::resources;

/// A node's heartbeat as stored.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct NodeRecord {
    host_id: String,
    name: String,
    #[serde(default)]
    labels: std::collections::HashMap<String, String>,
    #[serde(default)]
    addresses: Vec<String>,
    #[serde(default)]
    services: Vec<String>,
    #[serde(default)]
    apps: Vec<AppRecord>,
    last_seen: i64,
    expires: i64,
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct AppRecord {
    name: String,
    #[serde(default)]
    labels: std::collections::HashMap<String, String>,
}

impl From<proto::Node> for NodeRecord {
    fn from(n: proto::Node) -> Self {
        Self {
            host_id: n.host_id,
            name: n.name,
            labels: n.labels,
            addresses: n.addresses,
            services: n.services,
            apps: n
                .apps
                .into_iter()
                .map(|a| AppRecord {
                    name: a.name,
                    labels: a.labels,
                })
                .collect(),
            last_seen: n.last_seen,
            expires: n.expires,
        }
    }
}

impl From<NodeRecord> for proto::Node {
    fn from(n: NodeRecord) -> Self {
        Self {
            host_id: n.host_id,
            name: n.name,
            labels: n.labels,
            addresses: n.addresses,
            services: n.services,
            apps: n
                .apps
                .into_iter()
                .map(|a| proto::App {
                    name: a.name,
                    labels: a.labels,
                })
                .collect(),
            last_seen: n.last_seen,
            expires: n.expires,
        }
    }
}

pub(super) async fn upsert(
    call: Call,
    r: proto::UpsertNodesRequest,
) -> Result<Done<proto::UpsertNodesResponse>, Failure> {
    let caller = call.caller()?;
    let ttl = ttl_from(r.ttl_seconds, Duration::from_secs(600)).min(Duration::from_secs(3600));
    let now = now_secs();
    let mut rows = Vec::with_capacity(r.nodes.len());
    for mut n in r.nodes {
        // An agent may only speak for itself.
        if caller.identity.kind == IdentityKind::Node
            && !caller.identity.roles.iter().any(|r| r == "@proxy")
            && n.host_id != caller.identity.name
        {
            return Err(Status::permission_denied(format!(
                "node `{}` cannot upsert node `{}`",
                caller.identity.name, n.host_id
            ))
            .into());
        }
        resources::validate_name(&n.name)
            .map_err(|m| Status::invalid_argument(format!("node name: {m}")))?;
        n.last_seen = now;
        n.expires = now + ttl.as_secs() as i64;
        let spec = serde_json::to_string(&NodeRecord::from(n.clone())).map_err(internal)?;
        rows.push((n.host_id.clone(), spec));
    }
    call.state
        .store
        .upsert_nodes(&rows, now + ttl.as_secs() as i64)
        .await
        .map_err(store_status)?;
    let metrics = &call.state.metrics;
    metrics.heartbeat_calls.inc();
    metrics.heartbeat_rows.inc_by(rows.len() as u64);
    Ok(Done::audited(
        proto::UpsertNodesResponse {},
        Audit::Nothing("heartbeats are inventory, not actions"),
    ))
}

pub(super) async fn list(
    call: Call,
    _r: proto::ListNodesRequest,
) -> Result<Done<proto::ListNodesResponse>, Failure> {
    let caller = call.caller()?;
    // Users and bots see the nodes their roles reach, and of each node's apps those their
    // roles reach (a node serving only apps they may not use is not shown); proxies and admins
    // see everything.
    let narrowed = matches!(
        caller.identity.kind,
        crate::identity::IdentityKind::User | crate::identity::IdentityKind::Bot
    );
    let rows = call
        .state
        .store
        .list_nodes(now_secs())
        .await
        .map_err(store_status)?;
    let nodes = rows
        .iter()
        .filter_map(|s| serde_json::from_str::<NodeRecord>(s).ok())
        .map(proto::Node::from)
        .filter_map(|n| {
            if narrowed {
                narrow(n, &caller.roles)
            } else {
                Some(n)
            }
        })
        .collect();
    Ok(Done::read(proto::ListNodesResponse { nodes }))
}

/// What of `node` a user or bot with `roles` may see: `ssh` when a role reaches the node, each
/// app a role reaches; nothing when neither.
fn narrow(mut node: proto::Node, roles: &crate::rbac::RoleSet) -> Option<proto::Node> {
    let sorted = |m: &std::collections::HashMap<String, String>| -> std::collections::BTreeMap<String, String> {
        m.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
    };
    let node_ok = roles.node_visible(&sorted(&node.labels));
    node.apps.retain(|a| roles.app_visible(&sorted(&a.labels)));
    // An app without a labels entry (an agent older than app labels) has no labels.
    let apps: Vec<String> = node
        .apps
        .iter()
        .map(|a| format!("tcp:{}", a.name))
        .collect();
    node.services.retain(|s| match s.strip_prefix("tcp:") {
        Some(_) => apps.contains(s),
        None => node_ok,
    });
    (node_ok || !node.apps.is_empty()).then_some(node)
}
