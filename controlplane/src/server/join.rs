//! Hosts joining the cluster (public: the token is the credential). A `node` token makes an
//! agent, a `proxy` token a proxy; either gets an SSH host certificate and an X.509 certificate
//! carrying its identity, valid for [`super::HOST_CERT_TTL`]. Everything is validated before the
//! token is touched, so bad input never uses one up.

use std::collections::BTreeMap;

use serde_json::json;
use tonic::Status;

use super::call::{Audit, Call, Done, Event, Failure};
use super::tokens::token_hash;
use super::{AuthState, HOST_CERT_TTL, KindLabel, ResultLabel, internal, now_secs, store_status};
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
        .consume_token(&token_hash(&r.token), now_secs())
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
    let now = now_secs();
    let host_id = uuid::Uuid::new_v4().to_string();
    let expires = now + HOST_CERT_TTL.as_secs() as i64;
    // `<name>.<cluster>` lets OpenSSH users write `ssh node.cluster` with a config block.
    let mut principals = vec![
        r.host_name.clone(),
        format!("{}.{}", r.host_name, state.cluster),
    ];
    principals.extend(r.addresses.iter().cloned());
    let ssh_cert = state
        .host_ca
        .sign_host(
            ssh_key,
            &host_id,
            &state.cluster,
            &principals,
            now as u64,
            expires as u64,
        )
        .map_err(internal)?;
    let role = if is_proxy { "proxy" } else { "node" };
    let identity = Identity {
        kind: IdentityKind::Node,
        name: host_id.clone(),
        roles: vec![format!("@{role}")],
        logins: vec![],
        traits: BTreeMap::from([("host_name".to_string(), vec![r.host_name.clone()])]),
        cluster: state.cluster.clone(),
        route_to_cluster: state.cluster.clone(),
        expires,
    };
    let mut sans = vec![
        host_id.clone(),
        format!("{host_id}.{}", state.cluster),
        r.host_name.clone(),
    ];
    sans.extend(r.addresses.iter().cloned());
    if is_proxy {
        sans.push(PROXY_SERVER_NAME.to_string());
    }
    let tls_cert = state
        .tls_ca
        .sign(
            &r.tls_public_key,
            &identity,
            TlsUsage::ServerAndClient,
            &sans,
            time::OffsetDateTime::now_utc(),
        )
        .map_err(|e| Status::invalid_argument(format!("tls_public_key or address: {e}")))?;
    state
        .metrics
        .joins
        .get_or_create(&ResultLabel { result: "success" })
        .inc();
    state
        .metrics
        .certs_issued
        .get_or_create(&KindLabel { kind: "host" })
        .inc();
    let audit = Audit::Events(vec![
        Event::new(
            types::JOIN,
            &r.host_name,
            audit::success(
                json!({ "host_id": host_id, "host_name": r.host_name, "token_id": token_id, "role": role }),
            ),
        ),
        Event::new(
            types::CERT_ISSUED,
            &host_id,
            json!({ "kind": "host", "host_id": host_id, "principals": principals, "expires": expires }),
        ),
    ]);
    Ok(Done::audited(
        proto::JoinResponse {
            credentials: Some(state.credentials(
                ssh_cert.to_openssh().map_err(internal)?,
                tls_cert.pem(),
                expires,
            )),
            host_id,
            role: role.into(),
        },
        audit,
    ))
}
