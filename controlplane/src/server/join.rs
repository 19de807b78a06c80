//! Hosts joining the cluster (public: the token is the credential). A `node` token makes an
//! agent, a `proxy` token a proxy; either gets an SSH host certificate and an X.509 certificate
//! carrying its identity, valid for `[auth] host_cert_ttl` (7 days by default; hosts renew
//! before it ends, see `bots::renew`). A `bot` token makes a bot identity (`bots::join`). Everything is validated before the
//! token is touched, so bad input never uses one up.

use std::collections::BTreeMap;

use serde_json::json;
use tonic::Status;

use super::call::{Audit, Call, Done, Event, Failure};
use super::tokens::token_hash;
use super::{AuthState, KindLabel, ResultLabel, internal, now_secs, store_status};
use crate::audit::{self, types};
use crate::ca::{TlsUsage, parse_ssh_public_key};
use crate::identity::{AUTH_SERVER_NAME, Identity, IdentityKind, PROXY_SERVER_NAME};
use crate::proto;
use crate::resources;
use crate::storage::TokenRejection;

pub(super) async fn join(
    call: Call,
    r: proto::JoinRequest,
) -> Result<Done<proto::JoinResponse>, Failure> {
    let state = &call.state;
    if r.token.is_empty() || r.token.len() > 256 {
        return Err(Status::invalid_argument("token must be 1-256 characters").into());
    }
    resources::validate_name(&r.host_name)
        .map_err(|m| Status::invalid_argument(format!("host_name: {m}")))?;
    if r.addresses.len() > 32 {
        return Err(Status::invalid_argument("at most 32 addresses").into());
    }
    for a in &r.addresses {
        validate_host_address(a)?;
    }
    let ssh_key = parse_ssh_public_key(&r.ssh_public_key)
        .map_err(|e| Status::invalid_argument(format!("ssh_public_key: {e}")))?;
    crate::ca::check_tls_public_key(&r.tls_public_key)
        .map_err(|e| Status::invalid_argument(format!("tls_public_key: {e}")))?;
    let token = match state
        .store
        .consume_token(&token_hash(&r.token), &["node", "proxy", "bot"], now_secs())
        .await
        .map_err(store_status)?
    {
        Ok(t) => t,
        Err(rejection) => {
            state
                .metrics
                .joins
                .get_or_create(&ResultLabel { result: "failure" })
                .inc();
            let msg = match rejection {
                TokenRejection::NotFound => "join token not recognized",
                TokenRejection::WrongType => {
                    "this token is not for joining hosts or bots (it is a trusted_cluster token)"
                }
                TokenRejection::Expired => {
                    "join token has expired; ask an admin for a new one (gctl tokens add)"
                }
                TokenRejection::UsedUp => {
                    "join token is used up; ask an admin for a new one (gctl tokens add)"
                }
            };
            return Err(Failure::audited(
                Status::permission_denied(msg),
                Event::new(
                    types::JOIN,
                    &r.host_name,
                    audit::failure(&rejection.to_string(), json!({ "host_name": r.host_name })),
                ),
            ));
        }
    };
    if token.token_type == "bot" {
        return super::bots::join(&call, &r, &ssh_key, &token).await;
    }
    let is_proxy = token.token_type == "proxy";
    if token.token_type != "node" && !is_proxy {
        return Err(Status::unimplemented(format!(
            "joining with a `{}` token is not supported by this Auth version yet",
            token.token_type
        ))
        .into());
    }
    Ok(issue_host(state, &r, &ssh_key, is_proxy, &token.id).await?)
}

/// Addresses a joining host may claim: IPs or DNS-like names, never the Auth server's name.
fn validate_host_address(a: &str) -> Result<(), Status> {
    if a.parse::<std::net::IpAddr>().is_ok() {
        return Ok(());
    }
    let ok = !a.is_empty()
        && a.len() <= 253
        && a.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.')
        && !a.starts_with('-')
        && !a.eq_ignore_ascii_case(AUTH_SERVER_NAME)
        && !a.to_ascii_lowercase().ends_with(".gatehouse.cluster.local");
    if ok {
        Ok(())
    } else {
        Err(Status::invalid_argument(format!(
            "invalid host address `{a}`"
        )))
    }
}

/// Host credentials (SSH host certificate and X.509 node or proxy certificate) for a validated
/// join request, and the join's audit events.
pub(super) async fn issue_host(
    state: &AuthState,
    r: &proto::JoinRequest,
    ssh_key: &ssh_key::PublicKey,
    is_proxy: bool,
    token_id: &str,
) -> Result<Done<proto::JoinResponse>, Status> {
    let host_id = uuid::Uuid::new_v4().to_string();
    let host = Host {
        host_id: &host_id,
        host_name: &r.host_name,
        addresses: &r.addresses,
        is_proxy,
    };
    let issued = sign_host(state, &host, ssh_key, &r.tls_public_key)?;
    state
        .metrics
        .joins
        .get_or_create(&ResultLabel { result: "success" })
        .inc();
    let role = host.role();
    let audit = Audit::Events(vec![
        Event::new(
            types::JOIN,
            &r.host_name,
            audit::success(
                json!({ "host_id": host_id, "host_name": r.host_name, "token_id": token_id, "role": role }),
            ),
        ),
        issued.event(&host_id),
    ]);
    Ok(Done::audited(
        proto::JoinResponse {
            credentials: Some(issued.credentials),
            host_id,
            role: role.into(),
        },
        audit,
    ))
}

/// A host (agent or proxy) to certify.
pub(super) struct Host<'a> {
    pub(super) host_id: &'a str,
    pub(super) host_name: &'a str,
    pub(super) addresses: &'a [String],
    pub(super) is_proxy: bool,
}

impl Host<'_> {
    fn role(&self) -> &'static str {
        if self.is_proxy { "proxy" } else { "node" }
    }
}

/// Certificates issued to a host.
pub(super) struct IssuedHost {
    pub(super) credentials: proto::Credentials,
    principals: Vec<String>,
    expires: i64,
}

impl IssuedHost {
    /// The `cert.issued` audit event.
    pub(super) fn event(&self, host_id: &str) -> Event {
        Event::new(
            types::CERT_ISSUED,
            host_id,
            json!({ "kind": "host", "host_id": host_id, "principals": self.principals, "expires": self.expires }),
        )
    }
}

/// Sign a host's SSH host certificate and X.509 certificate, valid for the cluster's host
/// certificate lifetime (`[auth] host_cert_ttl`).
pub(super) fn sign_host(
    state: &AuthState,
    host: &Host<'_>,
    ssh_key: &ssh_key::PublicKey,
    tls_public_key: &[u8],
) -> Result<IssuedHost, Status> {
    let now = now_secs();
    let expires = now + state.host_cert_ttl.as_secs() as i64;
    // `<name>.<cluster>` lets OpenSSH users write `ssh node.cluster` with a config block.
    let mut principals = vec![
        host.host_name.to_owned(),
        format!("{}.{}", host.host_name, state.cluster),
    ];
    principals.extend(host.addresses.iter().cloned());
    let ssh_cert = state
        .host_ca
        .load()
        .sign_host(
            ssh_key,
            host.host_id,
            &state.cluster,
            &principals,
            now as u64,
            expires as u64,
        )
        .map_err(internal)?;
    let mut traits = BTreeMap::from([("host_name".to_string(), vec![host.host_name.to_owned()])]);
    if !host.addresses.is_empty() {
        traits.insert("addresses".to_string(), host.addresses.to_vec());
    }
    let identity = Identity {
        kind: IdentityKind::Node,
        name: host.host_id.to_owned(),
        roles: vec![format!("@{}", host.role())],
        logins: vec![],
        traits,
        cluster: state.cluster.clone(),
        route_to_cluster: state.cluster.clone(),
        bot: None,
        expires,
    };
    let mut sans = vec![
        host.host_id.to_owned(),
        format!("{}.{}", host.host_id, state.cluster),
        host.host_name.to_owned(),
    ];
    sans.extend(host.addresses.iter().cloned());
    if host.is_proxy {
        sans.push(PROXY_SERVER_NAME.to_string());
    }
    let tls_cert = state
        .tls
        .load()
        .sign(
            tls_public_key,
            &identity,
            TlsUsage::ServerAndClient,
            &sans,
            time::OffsetDateTime::now_utc(),
        )
        .map_err(|e| Status::invalid_argument(format!("tls_public_key or address: {e}")))?;
    state
        .metrics
        .certs_issued
        .get_or_create(&KindLabel { kind: "host" })
        .inc();
    Ok(IssuedHost {
        credentials: state.credentials(ssh_cert.to_openssh().map_err(internal)?, tls_cert, expires),
        principals,
        expires,
    })
}
