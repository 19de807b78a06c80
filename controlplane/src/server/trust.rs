//! Trusted clusters. On the leaf, `gctl create -f trusted_cluster.toml` reaches the root's Auth
//! through the root's proxy (the CA pinned, the token as credential) and calls
//! `ValidateTrustedCluster`: the root checks everything, uses the token, stores the leaf's CAs
//! and answers with its own; the leaf checks the answer and stores the root's CAs with the role
//! map. Either side refuses with the reason and stores nothing.

use serde::{Deserialize, Serialize};
use serde_json::json;
use tonic::Status;

use super::call::{Audit, Call, Done, Event, Failure};
use super::tokens::token_hash;
use super::{AuthState, internal, now_secs, store_status};
use crate::audit::{self, types};
use crate::proto;
use crate::resources::{self, Metadata, TrustedCluster, TrustedClusterSpec};
use crate::role_map::RoleMapping;
use crate::storage::{TokenRejection, TrustRow};

/// What this cluster knows of a root it trusts (`side = root`) or a leaf that trusts it
/// (`side = leaf`), as stored and as the watch stream carries it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrustDoc {
    pub user_ca_ssh: String,
    pub host_ca_ssh: String,
    pub tls_ca_pem: String,
    /// Every user and host CA key trusted now (two during a rotation of the other cluster's);
    /// empty: only the ones above.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub user_ca_ssh_trusted: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub host_ca_ssh_trusted: Vec<String>,
    /// Root only: where the leaf's proxies dial, the pin it was established with, the role map.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub proxy_addr: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub ca_pin: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub role_map: Vec<RoleMapping>,
}

pub(crate) const ROOT: &str = "root";
pub(crate) const LEAF: &str = "leaf";

/// This cluster's CAs (public parts).
pub(super) fn own_cas(state: &AuthState) -> proto::ClusterCas {
    use super::authorities::SshKind;
    proto::ClusterCas {
        user_ca_ssh: state.user_ca.load().public_line(),
        host_ca_ssh: state.host_ca.load().public_line(),
        tls_ca_pem: state.tls.load().trusted_pem(super::now_secs()),
        user_ca_ssh_trusted: state.trusted_ssh(SshKind::User),
        host_ca_ssh_trusted: state.trusted_ssh(SshKind::Host),
    }
}

/// The other cluster's CAs, checked: two OpenSSH public keys and one X.509 CA certificate.
fn check_cas(cas: Option<&proto::ClusterCas>, whose: &str) -> Result<TrustDoc, Status> {
    let cas = cas.ok_or_else(|| Status::invalid_argument(format!("{whose} CAs missing")))?;
    let keys = [("user", &cas.user_ca_ssh), ("host", &cas.host_ca_ssh)]
        .into_iter()
        .chain(cas.user_ca_ssh_trusted.iter().map(|k| ("user", k)))
        .chain(cas.host_ca_ssh_trusted.iter().map(|k| ("host", k)));
    for (what, key) in keys {
        crate::ca::parse_ssh_public_key(key).map_err(|e| {
            Status::invalid_argument(format!(
                "{whose} {what} CA is not an OpenSSH public key: {e}"
            ))
        })?;
    }
    let certs = crate::tls::certs_from_pem(&cas.tls_ca_pem)
        .map_err(|e| Status::invalid_argument(format!("{whose} X.509 CA: {e}")))?;
    // One, or two during a rotation's grace.
    if certs.is_empty()
        || certs.len() > 2
        || cas.user_ca_ssh_trusted.len() > 2
        || cas.host_ca_ssh_trusted.len() > 2
    {
        return Err(Status::invalid_argument(format!(
            "{whose} CAs: one or two of each expected, got {} X.509 certificates, {} user and {} host keys",
            certs.len(),
            cas.user_ca_ssh_trusted.len(),
            cas.host_ca_ssh_trusted.len()
        )));
    }
    let trimmed = |keys: &[String]| keys.iter().map(|k| k.trim().to_owned()).collect();
    Ok(TrustDoc {
        user_ca_ssh: cas.user_ca_ssh.trim().to_owned(),
        host_ca_ssh: cas.host_ca_ssh.trim().to_owned(),
        tls_ca_pem: cas.tls_ca_pem.clone(),
        user_ca_ssh_trusted: trimmed(&cas.user_ca_ssh_trusted),
        host_ca_ssh_trusted: trimmed(&cas.host_ca_ssh_trusted),
        proxy_addr: String::new(),
        ca_pin: String::new(),
        role_map: vec![],
    })
}

/// `ValidateTrustedCluster`, on the root: the token is the credential.
pub(super) async fn validate(
    call: Call,
    r: proto::ValidateTrustedClusterRequest,
) -> Result<Done<proto::ValidateTrustedClusterResponse>, Failure> {
    let state = &call.state;
    if r.token.is_empty() || r.token.len() > 256 {
        return Err(Status::invalid_argument("token must be 1-256 characters").into());
    }
    resources::validate_name(&r.leaf_cluster)
        .map_err(|m| Status::invalid_argument(format!("leaf cluster name: {m}")))?;
    if r.root_cluster != state.cluster {
        return Err(Status::failed_precondition(format!(
            "this is cluster `{}`, not `{}`: check metadata.name in the trusted_cluster resource",
            state.cluster, r.root_cluster
        ))
        .into());
    }
    if r.leaf_cluster == state.cluster {
        return Err(Status::invalid_argument(format!(
            "a leaf cannot be named `{}`: that is this cluster's own name",
            state.cluster
        ))
        .into());
    }
    let doc = check_cas(r.leaf_cas.as_ref(), "the leaf's")?;
    if let Some(existing) = state
        .store
        .get_trust(&r.leaf_cluster)
        .await
        .map_err(store_status)?
        && existing.side == ROOT
    {
        return Err(Status::already_exists(format!(
            "`{}` is this cluster's root; a cluster cannot be both",
            r.leaf_cluster
        ))
        .into());
    }
    let token = match state
        .store
        .consume_token(&token_hash(&r.token), &["trusted_cluster"], now_secs())
        .await
        .map_err(store_status)?
    {
        Ok(t) => t,
        Err(rejection) => {
            let msg = match rejection {
                TokenRejection::NotFound => "trusted_cluster token not recognized",
                TokenRejection::WrongType => {
                    "this token is not a trusted_cluster token (gctl tokens add --type trusted_cluster)"
                }
                TokenRejection::Expired => "trusted_cluster token has expired",
                TokenRejection::UsedUp => "trusted_cluster token is used up",
            };
            return Err(Failure::audited(
                Status::permission_denied(msg),
                Event::new(
                    types::TRUSTED_CLUSTER_CREATE,
                    &r.leaf_cluster,
                    audit::failure(&rejection.to_string(), json!({ "leaf": r.leaf_cluster })),
                ),
            ));
        }
    };
    let spec = serde_json::to_string(&doc).map_err(internal)?;
    state
        .store
        .put_trust(
            &TrustRow {
                name: r.leaf_cluster.clone(),
                side: LEAF.into(),
                spec,
            },
            now_secs(),
        )
        .await
        .map_err(store_status)?;
    Ok(Done::audited(
        proto::ValidateTrustedClusterResponse {
            root_cluster: state.cluster.clone(),
            root_cas: Some(own_cas(state)),
        },
        Audit::one(
            types::TRUSTED_CLUSTER_CREATE,
            &r.leaf_cluster,
            json!({ "cluster": r.leaf_cluster, "side": LEAF, "token": token.id }),
        ),
    ))
}

/// On the leaf: establish trust in the root `tc` names (or, already established and without a
/// token, change its role map). Returns what to store.
pub(super) async fn establish(state: &AuthState, tc: &TrustedCluster) -> Result<TrustDoc, Status> {
    let name = &tc.metadata.name;
    if *name == state.cluster {
        return Err(Status::invalid_argument(format!(
            "metadata.name: `{name}` is this cluster's own name; name the root cluster"
        )));
    }
    let existing = state.store.get_trust(name).await.map_err(store_status)?;
    if let Some(row) = &existing
        && row.side == LEAF
    {
        return Err(Status::already_exists(format!(
            "`{name}` is a leaf of this cluster; a cluster cannot be both"
        )));
    }
    if tc.spec.token.is_empty() {
        // Already trusted: only the role map (and where to dial) may change.
        let Some(row) = existing else {
            return Err(Status::invalid_argument(
                "spec.token: the root's trusted_cluster token (gctl tokens add --type trusted_cluster, on the root)",
            ));
        };
        let mut doc: TrustDoc = serde_json::from_str(&row.spec).map_err(internal)?;
        doc.role_map.clone_from(&tc.spec.role_map);
        doc.proxy_addr.clone_from(&tc.spec.proxy_addr);
        return Ok(doc);
    }
    let endpoint = crate::client::AuthEndpoint {
        addr: tc.spec.proxy_addr.clone(),
        trust: crate::tls::Trust::Pin(tc.spec.ca_pin.clone()),
        identity: None,
    };
    let reach = |e: String| {
        Status::unavailable(format!(
            "cannot reach the root's Auth through its proxy at {}: {e}",
            tc.spec.proxy_addr
        ))
    };
    let mut client = tokio::time::timeout(std::time::Duration::from_secs(15), endpoint.connect())
        .await
        .map_err(|_| reach("no answer in 15 s".into()))?
        .map_err(|e| {
            let chain = crate::client::error_chain(&e);
            if chain.contains("pin") {
                Status::failed_precondition(format!(
                    "the root's CA at {} does not match spec.ca_pin: {chain}",
                    tc.spec.proxy_addr
                ))
            } else {
                reach(chain)
            }
        })?;
    let answer = client
        .validate_trusted_cluster(proto::ValidateTrustedClusterRequest {
            token: tc.spec.token.clone(),
            leaf_cluster: state.cluster.clone(),
            root_cluster: name.clone(),
            leaf_cas: Some(own_cas(state)),
        })
        .await
        .map_err(|s| {
            let msg = format!("the root refused: {}", s.message());
            match s.code() {
                tonic::Code::PermissionDenied => Status::permission_denied(msg),
                tonic::Code::Unavailable => reach(s.message().to_owned()),
                _ => Status::failed_precondition(msg),
            }
        })?
        .into_inner();
    if answer.root_cluster != *name {
        return Err(Status::failed_precondition(format!(
            "the cluster at {} is `{}`, not `{name}`",
            tc.spec.proxy_addr, answer.root_cluster
        )));
    }
    let mut doc = check_cas(answer.root_cas.as_ref(), "the root's")?;
    doc.proxy_addr.clone_from(&tc.spec.proxy_addr);
    doc.ca_pin.clone_from(&tc.spec.ca_pin);
    doc.role_map.clone_from(&tc.spec.role_map);
    Ok(doc)
}

/// How often a leaf's Auth refreshes its copy of each root's CAs (the hidden
/// `GATEHOUSE_TRUST_REFRESH_SECS` shortens it for tests).
pub fn refresh_every() -> std::time::Duration {
    std::env::var("GATEHOUSE_TRUST_REFRESH_SECS")
        .ok()
        .and_then(|s| s.parse::<u64>().ok())
        .filter(|s| *s > 0)
        .map_or(
            std::time::Duration::from_secs(60),
            std::time::Duration::from_secs,
        )
}

impl AuthState {
    /// Refresh this (leaf) cluster's copy of each root's CAs from the root's Auth, reached
    /// through the root's proxy and verified with the CAs held (during a root's TLS rotation
    /// the cross-signed chain verifies): a root's CA rotation reaches this cluster's agents and
    /// proxies through the watch stream. Returns how many roots' CAs changed.
    pub async fn refresh_roots(&self) -> Result<usize, Status> {
        let mut changed = 0;
        let rows = self.store.list_trust().await.map_err(store_status)?;
        for row in rows.into_iter().filter(|r| r.side == ROOT) {
            let Ok(mut doc) = serde_json::from_str::<TrustDoc>(&row.spec) else {
                continue;
            };
            let fresh = match fetch_cas(&row.name, &doc).await {
                Ok(f) => f,
                Err(e) => {
                    tracing::debug!(root = %row.name, error = %e, "trust: cannot refresh the root's CAs");
                    continue;
                }
            };
            let same = fresh.user_ca_ssh == doc.user_ca_ssh
                && fresh.host_ca_ssh == doc.host_ca_ssh
                && crate::tls_authority::same_certs(&fresh.tls_ca_pem, &doc.tls_ca_pem)
                && fresh.user_ca_ssh_trusted == doc.user_ca_ssh_trusted
                && fresh.host_ca_ssh_trusted == doc.host_ca_ssh_trusted;
            if same {
                continue;
            }
            doc.user_ca_ssh = fresh.user_ca_ssh;
            doc.host_ca_ssh = fresh.host_ca_ssh;
            doc.tls_ca_pem = fresh.tls_ca_pem;
            doc.user_ca_ssh_trusted = fresh.user_ca_ssh_trusted;
            doc.host_ca_ssh_trusted = fresh.host_ca_ssh_trusted;
            let spec = serde_json::to_string(&doc).map_err(internal)?;
            self.store
                .put_trust(
                    &TrustRow {
                        name: row.name.clone(),
                        side: row.side.clone(),
                        spec,
                    },
                    now_secs(),
                )
                .await
                .map_err(store_status)?;
            tracing::info!(root = %row.name, "trust: the root's CAs changed; this cluster's copy is updated");
            changed += 1;
        }
        Ok(changed)
    }
}

/// The root `name`'s CAs as its Auth answers `Ping` through its proxy, checked.
async fn fetch_cas(name: &str, doc: &TrustDoc) -> Result<TrustDoc, String> {
    let endpoint = crate::client::AuthEndpoint {
        addr: doc.proxy_addr.clone(),
        trust: crate::tls::Trust::CaPem(doc.tls_ca_pem.clone()),
        identity: None,
    };
    let mut client = tokio::time::timeout(std::time::Duration::from_secs(15), endpoint.connect())
        .await
        .map_err(|_| "no answer in 15 s".to_owned())?
        .map_err(|e| crate::client::error_chain(&e))?;
    let ping = client
        .ping(proto::PingRequest {})
        .await
        .map_err(|s| s.message().to_owned())?
        .into_inner();
    if ping.cluster_name != name {
        return Err(format!(
            "the cluster at {} is `{}`, not `{name}`",
            doc.proxy_addr, ping.cluster_name
        ));
    }
    check_cas(ping.authorities.as_ref(), "the root's").map_err(|s| s.message().to_owned())
}

/// A root record as the resource a leaf's admin wrote (without the token).
pub(super) fn as_resource(row: &TrustRow) -> Option<TrustedCluster> {
    if row.side != ROOT {
        return None;
    }
    let doc: TrustDoc = serde_json::from_str(&row.spec).ok()?;
    Some(TrustedCluster {
        kind: "trusted_cluster".into(),
        version: "v1".into(),
        metadata: Metadata {
            name: row.name.clone(),
            ..Default::default()
        },
        spec: TrustedClusterSpec {
            proxy_addr: doc.proxy_addr,
            token: String::new(),
            ca_pin: doc.ca_pin,
            role_map: doc.role_map,
        },
    })
}

/// `ListClusters`: this cluster, its roots and leaves; a leaf is online while a live proxy of
/// this cluster reports holding its tunnel.
pub(super) async fn list(
    call: Call,
    _r: proto::ListClustersRequest,
) -> Result<Done<proto::ListClustersResponse>, Failure> {
    call.caller()?;
    let state = &call.state;
    let now = now_secs();
    let held: Vec<String> = state
        .store
        .list_proxies(now)
        .await
        .map_err(store_status)?
        .iter()
        .filter_map(|(_, spec)| serde_json::from_str::<serde_json::Value>(spec).ok())
        .flat_map(|v| {
            v.get("leaves")
                .and_then(|l| l.as_array())
                .map(|l| {
                    l.iter()
                        .filter_map(|s| s.as_str().map(str::to_owned))
                        .collect::<Vec<_>>()
                })
                .unwrap_or_default()
        })
        .collect();
    let mut clusters = vec![proto::ClusterInfo {
        name: state.cluster.clone(),
        relation: "self".into(),
        online: true,
        last_seen: now,
        host_ca_ssh: state.host_ca.load().public_line(),
    }];
    for row in state.store.list_trust().await.map_err(store_status)? {
        let online = row.side == LEAF && held.contains(&row.name);
        let host_ca_ssh = if row.side == LEAF {
            serde_json::from_str::<TrustDoc>(&row.spec)
                .map(|d| d.host_ca_ssh)
                .unwrap_or_default()
        } else {
            String::new()
        };
        clusters.push(proto::ClusterInfo {
            name: row.name,
            relation: row.side,
            online,
            last_seen: if online { now } else { 0 },
            host_ca_ssh,
        });
    }
    Ok(Done::read(proto::ListClustersResponse { clusters }))
}
