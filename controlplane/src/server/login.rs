//! What a person does for themselves: ping (public: the cluster's name and CA pin), password
//! login (public, rate limited: a short-lived SSH and X.509 certificate pair), who-am-i and
//! password change.

use std::time::Instant;

use serde_json::json;
use tonic::Status;

use super::call::{Audit, Call, Done, Event, Failure};
use super::{KindLabel, ResultLabel, internal, now_secs, store_status, ttl_from};
use crate::audit::{self, types};
use crate::ca::{SshUserCertRequest, TlsUsage, parse_ssh_public_key};
use crate::identity::{Identity, IdentityKind};
use crate::password;
use crate::proto;
use crate::rbac::{DEFAULT_SESSION_TTL, RoleSet};

pub(super) async fn ping(
    call: Call,
    _r: proto::PingRequest,
) -> Result<Done<proto::PingResponse>, Failure> {
    Ok(Done::read(proto::PingResponse {
        cluster_name: call.state.cluster.clone(),
        server_version: env!("CARGO_PKG_VERSION").into(),
        ca_pin: call.state.tls.load().pin(),
        authorities: Some(super::trust::own_cas(&call.state)),
    }))
}

pub(super) async fn login(
    call: Call,
    r: proto::LoginRequest,
) -> Result<Done<proto::LoginResponse>, Failure> {
    let state = &call.state;
    let addr = call.addr.as_str();
    if r.user.is_empty() || r.user.len() > 128 || r.password.len() > password::MAX_PASSWORD_LEN {
        return Err(Status::invalid_argument(
            "user name must be 1-128 characters and password at most 1024 bytes",
        )
        .into());
    }
    let ssh_key = parse_ssh_public_key(&r.ssh_public_key)
        .map_err(|e| Status::invalid_argument(format!("ssh_public_key: {e}")))?;
    crate::ca::check_tls_public_key(&r.tls_public_key)
        .map_err(|e| Status::invalid_argument(format!("tls_public_key: {e}")))?;

    let now_instant = Instant::now();
    let limited = state
        .limiter
        .lock()
        .map_err(internal)?
        .check(&r.user, addr, now_instant);
    if let Err(retry) = limited {
        state
            .metrics
            .logins
            .get_or_create(&ResultLabel {
                result: "rate_limited",
            })
            .inc();
        return Err(Failure::audited(
            Status::resource_exhausted(format!(
                "too many failed login attempts; try again in {}s",
                retry.as_secs().max(1)
            )),
            Event::new(
                types::USER_LOGIN,
                &r.user,
                audit::failure("rate limited", json!({ "user": r.user })),
            ),
        ));
    }

    let stored = state.store.get_user(&r.user).await.map_err(store_status)?;
    let hash = stored.as_ref().and_then(|(_, h)| h.clone());
    let ok = state.verify_password(r.password.clone(), hash).await?;
    let Some((user, _)) = stored.filter(|_| ok) else {
        return Err(failed(
            state,
            &r.user,
            addr,
            now_instant,
            Status::unauthenticated("invalid user name or password"),
            audit::failure("invalid user name or password", json!({ "user": r.user })),
        ));
    };
    let mut role_docs = Vec::new();
    for name in &user.spec.roles {
        if let Some(role) = state.store.get_role(name).await.map_err(store_status)? {
            role_docs.push(role);
        }
    }
    let roles = RoleSet::new(role_docs);
    let method = match super::mfa::check_login(state, &r.user, &roles, &r.otp).await? {
        Ok(method) => method,
        Err(super::mfa::SecondStep::Missing(status)) => return Err(status.into()),
        Err(super::mfa::SecondStep::Refused(status, reason)) => {
            return Err(failed(
                state,
                &r.user,
                addr,
                now_instant,
                status,
                audit::failure(reason, json!({ "user": r.user, "method": "password+otp" })),
            ));
        }
    };
    state
        .limiter
        .lock()
        .map_err(internal)?
        .record_success(&r.user);
    let ttl = ttl_from(r.ttl_seconds, DEFAULT_SESSION_TTL).min(roles.max_session_ttl());
    let now = now_secs();
    let expires = now + ttl.as_secs() as i64;
    let identity = Identity {
        kind: IdentityKind::User,
        name: user.metadata.name.clone(),
        roles: roles.names(),
        logins: roles.logins(&user.spec.traits),
        traits: user.spec.traits.clone(),
        cluster: state.cluster.clone(),
        route_to_cluster: state.cluster.clone(),
        bot: None,
        expires,
    };
    // A locked user (or one holding a locked role) gets no certificate; the password was right,
    // so this is not a failure the limiter counts.
    if let Err(status) = state.check_lock(super::locks::subject(&identity)).await {
        return Err(Failure::audited(
            status.clone(),
            Event::new(
                types::USER_LOGIN,
                &r.user,
                audit::failure(
                    status.message(),
                    json!({ "user": r.user, "method": method.as_str() }),
                ),
            ),
        ));
    }
    let (ssh_cert, tls_cert) = sign_client(state, &identity, &roles, &ssh_key, &r.tls_public_key)?;
    state
        .metrics
        .logins
        .get_or_create(&ResultLabel { result: "success" })
        .inc();
    state
        .metrics
        .certs_issued
        .get_or_create(&KindLabel { kind: "user" })
        .inc();
    let ssh_line = ssh_cert.to_openssh().map_err(internal)?;
    // The login and the certificate it produced are one durable write (one fsync).
    let audit = Audit::Events(vec![
        Event::new(
            types::USER_LOGIN,
            &identity.name,
            audit::success(json!({
                "user": identity.name,
                "method": method.as_str(),
                "via": if r.via == "web" { "web" } else { "api" },
            })),
        ),
        Event::new(
            types::CERT_ISSUED,
            &identity.name,
            json!({
                "kind": "user",
                "user": identity.name,
                "roles": identity.roles,
                "logins": identity.logins,
                "expires": expires,
                "ssh_serial": ssh_cert.serial(),
            }),
        ),
    ]);
    Ok(Done::audited(
        proto::LoginResponse {
            credentials: Some(state.credentials(ssh_line, tls_cert, expires)),
            roles: identity.roles,
            logins: identity.logins,
        },
        audit,
    ))
}

/// A failed login: counted against the user and the address, and audited.
fn failed(
    state: &super::AuthState,
    user: &str,
    addr: &str,
    now: Instant,
    status: Status,
    data: serde_json::Value,
) -> Failure {
    if let Ok(mut l) = state.limiter.lock() {
        l.record_failure(user, addr, now);
    }
    state
        .metrics
        .logins
        .get_or_create(&ResultLabel { result: "failure" })
        .inc();
    Failure::audited(status, Event::new(types::USER_LOGIN, user, data))
}

/// Sign the SSH user certificate and the X.509 client certificate (PEM) of a user or bot
/// identity, with the permissions its roles give.
pub(super) fn sign_client(
    state: &super::AuthState,
    identity: &Identity,
    roles: &RoleSet,
    ssh_key: &ssh_key::PublicKey,
    tls_public_key: &[u8],
) -> Result<(ssh_key::Certificate, String), Status> {
    let perms = roles.cert_permissions();
    let ssh_cert = state
        .user_ca
        .load()
        .sign_user(
            ssh_key,
            &SshUserCertRequest {
                identity,
                permit_pty: perms.permit_pty,
                permit_port_forwarding: perms.permit_port_forwarding,
                permit_agent_forwarding: perms.permit_agent_forwarding,
                permit_x11_forwarding: perms.permit_x11_forwarding,
                remote_forward_any: perms.remote_forward_any,
            },
            now_secs() as u64,
        )
        .map_err(internal)?;
    let tls_cert = state
        .tls
        .load()
        .sign(
            tls_public_key,
            identity,
            TlsUsage::Client,
            &[],
            time::OffsetDateTime::now_utc(),
        )
        .map_err(|e| Status::invalid_argument(format!("tls_public_key: {e}")))?;
    Ok((ssh_cert, tls_cert))
}

pub(super) async fn who_am_i(
    call: Call,
    _r: proto::WhoAmIRequest,
) -> Result<Done<proto::WhoAmIResponse>, Failure> {
    let caller = call.caller()?;
    Ok(Done::read(proto::WhoAmIResponse {
        identity_json: serde_json::to_string(&*caller.identity).map_err(internal)?,
    }))
}

pub(super) async fn change_password(
    call: Call,
    r: proto::ChangePasswordRequest,
) -> Result<Done<proto::ChangePasswordResponse>, Failure> {
    let caller = call.caller()?;
    let state = &call.state;
    if caller.identity.kind != IdentityKind::User {
        return Err(Status::permission_denied("only users have passwords").into());
    }
    password::check_policy(&r.new_password)
        .map_err(|e| Status::invalid_argument(format!("new password: {e}")))?;
    let name = caller.identity.name.clone();
    let now_instant = Instant::now();
    if let Err(retry) =
        state
            .limiter
            .lock()
            .map_err(internal)?
            .check(&name, &call.addr, now_instant)
    {
        return Err(Status::resource_exhausted(format!(
            "too many failed attempts; try again in {}s",
            retry.as_secs().max(1)
        ))
        .into());
    }
    let stored = state.store.get_user(&name).await.map_err(store_status)?;
    let hash = stored.and_then(|(_, h)| h);
    if !state.verify_password(r.old_password, hash).await? {
        state
            .limiter
            .lock()
            .map_err(internal)?
            .record_failure(&name, &call.addr, now_instant);
        return Err(Failure::audited(
            Status::unauthenticated("current password is wrong"),
            Event::new(
                types::USER_PASSWORD_CHANGE,
                &name,
                audit::failure("wrong current password", json!({ "user": name })),
            ),
        ));
    }
    let new_hash = state.hash_password(r.new_password).await?;
    state
        .store
        .set_password_hash(&name, &new_hash, now_secs())
        .await
        .map_err(store_status)?;
    Ok(Done::audited(
        proto::ChangePasswordResponse {},
        Audit::one(
            types::USER_PASSWORD_CHANGE,
            &name,
            audit::success(json!({ "user": name })),
        ),
    ))
}
