//! Machine ID bots and renewals.
//!
//! A bot is a name and ordinary roles. `CreateBot` adds one and makes its single-use join token;
//! a `Join` with that token starts a new *instance* of the bot's identity at generation 1.
//! `Renew` takes the caller's current certificate (mutual TLS, no token) and gives a new one:
//! for bots one generation later, for agents and proxies a new host certificate with the same
//! host id. A bot renewal presenting an older generation of the current instance means two
//! copies of the identity exist: the bot is locked, both copies are refused, and `bot.locked`
//! names both addresses. An expired certificate cannot reach this code (the TLS handshake
//! refuses it), and the handler checks expiry again.
//!
//! Bot renewals are written by one task in batches: every renewal waiting is one transaction
//! (its generation and its audit event), so a renewal is durable before its answer leaves and
//! the database's fsync is shared by all renewals of the batch.

use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use tonic::Status;

use super::call::{Audit, Call, Done, Event, Failure};
use super::join::{Host, sign_host};
use super::login::sign_client;
use super::tokens::{NewToken, insert_new};
use super::{AuthState, KindLabel, internal, now_nanos, now_secs, store_status, ttl_from};
use crate::audit::{self, types};
use crate::ca::parse_ssh_public_key;
use crate::identity::{BotLineage, Identity, IdentityKind};
use crate::proto;
use crate::rbac::RoleSet;
use crate::resources;
use crate::storage::{BotRow, RenewOp, RenewOutcome, StoredEvent, TokenRecord};

/// A bot's certificate lifetime unless it asks for another (capped by its roles).
pub const DEFAULT_BOT_TTL: Duration = Duration::from_secs(3600);
/// The shortest bot certificate Auth issues.
pub const MIN_BOT_TTL: Duration = Duration::from_secs(60);
/// How long the join token `CreateBot` prints stays usable unless the admin says otherwise.
const DEFAULT_BOT_TOKEN_TTL: Duration = Duration::from_secs(3600);
/// Most renewals written in one transaction.
const MAX_BATCH: usize = 1024;

fn bot_proto(b: &BotRow) -> proto::Bot {
    proto::Bot {
        name: b.name.clone(),
        roles: b.roles.clone(),
        created: b.created,
        created_by: b.created_by.clone(),
        generation: b.generation,
        last_seen: b.last_seen,
        last_addr: b.last_addr.clone(),
        locked: b.locked,
        lock_reason: b.lock_reason.clone(),
    }
}

pub(super) async fn create(
    call: Call,
    r: proto::CreateBotRequest,
) -> Result<Done<proto::CreateBotResponse>, Failure> {
    let caller = call.caller()?;
    let state = &call.state;
    resources::validate_name(&r.name)
        .map_err(|m| Status::invalid_argument(format!("name: {m}")))?;
    if r.roles.is_empty() {
        return Err(Status::invalid_argument("a bot needs at least one role (--roles)").into());
    }
    state.check_roles_exist(&r.roles).await?;
    let row = BotRow {
        name: r.name.clone(),
        roles: r.roles.clone(),
        created: now_secs(),
        created_by: caller.identity.name.clone(),
        instance: String::new(),
        generation: 0,
        last_seen: 0,
        last_addr: String::new(),
        locked: false,
        lock_reason: String::new(),
    };
    state.store.create_bot(&row).await.map_err(store_status)?;
    let (secret, token) = insert_new(
        state,
        NewToken {
            token_type: "bot",
            ttl: ttl_from(r.token_ttl_seconds, DEFAULT_BOT_TOKEN_TTL),
            max_uses: 1,
            bot_name: &r.name,
            labels: &[],
            created_by: &caller.identity.name,
        },
    )
    .await?;
    Ok(Done::audited(
        proto::CreateBotResponse {
            token: secret,
            bot: Some(bot_proto(&row)),
        },
        Audit::Events(vec![
            Event::new(
                types::BOT_CREATE,
                &caller.identity.name,
                json!({ "bot": r.name, "roles": r.roles }),
            ),
            Event::new(
                types::TOKEN_CREATE,
                &caller.identity.name,
                json!({ "token_id": token.id, "type": "bot", "bot": r.name, "expires": token.expires, "max_uses": 1 }),
            ),
        ]),
    ))
}

pub(super) async fn list(
    call: Call,
    _r: proto::ListBotsRequest,
) -> Result<Done<proto::ListBotsResponse>, Failure> {
    let bots = call.state.store.list_bots().await.map_err(store_status)?;
    Ok(Done::read(proto::ListBotsResponse {
        bots: bots.iter().map(bot_proto).collect(),
    }))
}

pub(super) async fn delete(
    call: Call,
    r: proto::DeleteBotRequest,
) -> Result<Done<proto::DeleteBotResponse>, Failure> {
    let caller = call.caller()?;
    call.state
        .store
        .delete_bot(&r.name)
        .await
        .map_err(store_status)?;
    Ok(Done::audited(
        proto::DeleteBotResponse {},
        Audit::one(
            types::BOT_DELETE,
            &caller.identity.name,
            json!({ "bot": r.name }),
        ),
    ))
}

pub(super) async fn unlock(
    call: Call,
    r: proto::UnlockBotRequest,
) -> Result<Done<proto::UnlockBotResponse>, Failure> {
    let caller = call.caller()?;
    let was_locked = call
        .state
        .store
        .unlock_bot(&r.name)
        .await
        .map_err(store_status)?;
    Ok(Done::audited(
        proto::UnlockBotResponse { was_locked },
        Audit::one(
            types::BOT_UNLOCK,
            &caller.identity.name,
            json!({ "bot": r.name, "was_locked": was_locked }),
        ),
    ))
}

/// The identity of bot `bot` (roles from the stored bot), valid for the requested lifetime
/// capped by its roles, one generation into `lineage`.
fn bot_identity(
    state: &AuthState,
    bot: &str,
    roles: &RoleSet,
    ttl_seconds: u64,
    lineage: BotLineage,
) -> Identity {
    let ttl = ttl_from(ttl_seconds, DEFAULT_BOT_TTL)
        .max(MIN_BOT_TTL)
        .min(roles.max_session_ttl());
    let traits = Default::default();
    Identity {
        kind: IdentityKind::Bot,
        name: bot.to_owned(),
        roles: roles.names(),
        logins: roles.logins(&traits),
        traits,
        cluster: state.cluster.clone(),
        route_to_cluster: state.cluster.clone(),
        bot: Some(lineage),
        expires: now_secs() + ttl.as_secs() as i64,
    }
}

async fn role_set(state: &AuthState, names: &[String]) -> Result<RoleSet, Status> {
    let mut roles = Vec::with_capacity(names.len());
    for name in names {
        if let Some(role) = state.store.get_role(name).await.map_err(store_status)? {
            roles.push(role);
        }
    }
    Ok(RoleSet::new(roles))
}

/// A join with a `bot` token (already used up by the caller): a new instance at generation 1.
pub(super) async fn join(
    call: &Call,
    r: &proto::JoinRequest,
    ssh_key: &ssh_key::PublicKey,
    token: &TokenRecord,
) -> Result<Done<proto::JoinResponse>, Failure> {
    let state = &call.state;
    let instance = uuid::Uuid::new_v4().to_string();
    let bot = match state
        .store
        .join_bot(&token.bot_name, &instance, now_secs(), &call.addr)
        .await
    {
        Ok(b) => b,
        Err(crate::storage::StoreError::NotFound { .. }) => {
            return Err(Status::failed_precondition(format!(
                "bot `{}` was removed after this token was made",
                token.bot_name
            ))
            .into());
        }
        Err(e) => return Err(store_status(e).into()),
    };
    let roles = role_set(state, &bot.roles).await?;
    let identity = bot_identity(
        state,
        &bot.name,
        &roles,
        r.ttl_seconds,
        BotLineage {
            instance,
            generation: 1,
        },
    );
    state.check_lock(super::locks::subject(&identity)).await?;
    let (ssh_cert, tls_cert) = sign_client(state, &identity, &roles, ssh_key, &r.tls_public_key)?;
    state
        .metrics
        .certs_issued
        .get_or_create(&KindLabel { kind: "bot" })
        .inc();
    let audit = Audit::Events(vec![
        Event::new(
            types::JOIN,
            &bot.name,
            audit::success(
                json!({ "bot": bot.name, "token_id": token.id, "role": "bot", "locked": bot.locked }),
            ),
        ),
        Event::new(
            types::CERT_ISSUED,
            &bot.name,
            json!({ "kind": "bot", "bot": bot.name, "roles": identity.roles, "generation": 1, "expires": identity.expires }),
        ),
    ]);
    Ok(Done::audited(
        proto::JoinResponse {
            credentials: Some(state.credentials(
                ssh_cert.to_openssh().map_err(internal)?,
                tls_cert,
                identity.expires,
            )),
            host_id: bot.name,
            role: "bot".into(),
        },
        audit,
    ))
}

pub(super) async fn renew(
    call: Call,
    r: proto::RenewRequest,
) -> Result<Done<proto::RenewResponse>, Failure> {
    let caller = call.caller()?;
    let id = if r.current_cert.is_empty() {
        Arc::clone(&caller.identity)
    } else {
        // The TLS handshake proved the key; the certificate proves the generation.
        let (current, key) = call
            .state
            .tls
            .load()
            .verify_issued(&r.current_cert, now_secs())
            .map_err(|e| Status::invalid_argument(format!("current_cert: {e}")))?;
        if current.kind != caller.identity.kind
            || current.name != caller.identity.name
            || caller.key.as_deref() != Some(key.as_slice())
        {
            return Err(Status::permission_denied(
                "current_cert: not a certificate of this connection's identity and key",
            )
            .into());
        }
        Arc::new(current)
    };
    match id.kind {
        IdentityKind::Bot | IdentityKind::Node => {}
        IdentityKind::User => {
            return Err(Status::permission_denied(
                "users renew their certificates by logging in (gsh login)",
            )
            .into());
        }
        _ => return Err(Status::permission_denied("this identity does not renew").into()),
    }
    let ssh_key = parse_ssh_public_key(&r.ssh_public_key)
        .map_err(|e| Status::invalid_argument(format!("ssh_public_key: {e}")))?;
    crate::ca::check_tls_public_key(&r.tls_public_key)
        .map_err(|e| Status::invalid_argument(format!("tls_public_key: {e}")))?;
    if id.expires <= now_secs() {
        return Err(refused(
            &id.name,
            "the identity has expired: join again with a new token",
        ));
    }
    if id.kind == IdentityKind::Bot {
        renew_bot(&call, &id, &caller.roles, &r, &ssh_key).await
    } else {
        renew_host(&call, &id, &r, &ssh_key)
    }
}

fn refused(actor: &str, why: &str) -> Failure {
    Failure::audited(
        Status::permission_denied(why.to_owned()),
        Event::new(
            types::RENEW_REFUSED,
            actor,
            audit::failure(why, json!({ "identity": actor })),
        ),
    )
}

fn renew_host(
    call: &Call,
    id: &Identity,
    r: &proto::RenewRequest,
    ssh_key: &ssh_key::PublicKey,
) -> Result<Done<proto::RenewResponse>, Failure> {
    let trait_of = |k: &str| id.traits.get(k).cloned().unwrap_or_default();
    let host_name = trait_of("host_name").into_iter().next().unwrap_or_default();
    let addresses = trait_of("addresses");
    let host = Host {
        host_id: &id.name,
        host_name: &host_name,
        addresses: &addresses,
        is_proxy: id.roles.iter().any(|r| r == "@proxy"),
    };
    let issued = sign_host(&call.state, &host, ssh_key, &r.tls_public_key)?;
    let event = issued.event(&id.name);
    Ok(Done::audited(
        proto::RenewResponse {
            credentials: Some(issued.credentials),
            generation: 0,
        },
        Audit::Events(vec![event]),
    ))
}

async fn renew_bot(
    call: &Call,
    id: &Identity,
    roles: &RoleSet,
    r: &proto::RenewRequest,
    ssh_key: &ssh_key::PublicKey,
) -> Result<Done<proto::RenewResponse>, Failure> {
    let state = &call.state;
    let Some(lineage) = id.bot.clone() else {
        return Err(refused(
            &id.name,
            "this bot certificate carries no generation: join again with a new token",
        ));
    };
    let presented = lineage.generation;
    let identity = bot_identity(
        state,
        &id.name,
        roles,
        r.ttl_seconds,
        BotLineage {
            instance: lineage.instance.clone(),
            generation: presented.saturating_add(1),
        },
    );
    // Sign first (on this task, in parallel with other renewals); the generation is written,
    // with the audit event, before the certificates leave.
    let (ssh_cert, tls_cert) = sign_client(state, &identity, roles, ssh_key, &r.tls_public_key)?;
    let ssh_line = ssh_cert.to_openssh().map_err(internal)?;
    let op = RenewOp {
        name: id.name.clone(),
        instance: lineage.instance,
        generation: i64::try_from(presented).unwrap_or(i64::MAX),
        addr: call.addr.clone(),
        now: now_secs(),
    };
    let outcome = state
        .renewals()
        .submit(Pending {
            op,
            expires: identity.expires,
        })
        .await?;
    let name = &id.name;
    match outcome {
        RenewOutcome::Renewed(g) => {
            state
                .metrics
                .certs_issued
                .get_or_create(&KindLabel { kind: "bot" })
                .inc();
            Ok(Done::audited(
                proto::RenewResponse {
                    credentials: Some(state.credentials(ssh_line, tls_cert, identity.expires)),
                    generation: u64::try_from(g).unwrap_or(0),
                },
                Audit::Nothing("written with the renewal's generation, in its batch"),
            ))
        }
        RenewOutcome::Stolen { .. } => Err(Status::permission_denied(format!(
            "bot `{name}` is now locked: an older copy of its identity was presented (stolen or copied?). \
             An admin joins it again with a new token and runs `gctl bots unlock {name}`"
        ))
        .into()),
        RenewOutcome::Locked(reason) => Err(Status::permission_denied(format!(
            "bot `{name}` is locked ({reason}); an admin joins it again with a new token and runs `gctl bots unlock {name}`"
        ))
        .into()),
        RenewOutcome::Superseded => Err(Status::permission_denied(format!(
            "this identity of bot `{name}` was replaced by a later join; it cannot renew"
        ))
        .into()),
        RenewOutcome::NoBot => {
            Err(Status::permission_denied(format!("bot `{name}` no longer exists")).into())
        }
    }
}

/// A bot renewal waiting for its batch.
pub(crate) struct Pending {
    op: RenewOp,
    expires: i64,
}

/// The queue of bot renewals and the task that writes them in batches.
pub(crate) type Renewals = super::group_commit::GroupCommit<Pending, RenewOutcome>;

/// Start the renewal writer on the current runtime.
pub(crate) fn renewals(state: std::sync::Weak<AuthState>) -> Renewals {
    Renewals::start(MAX_BATCH, move |batch: Vec<Pending>| {
        let state = state.upgrade();
        async move {
            let state = state?;
            let now = now_nanos();
            let ops: Vec<RenewOp> = batch.iter().map(|p| p.op.clone()).collect();
            let mut index = 0usize;
            let result = state
                .store
                .renew_bots(&ops, |op, outcome| {
                    let exp = batch.get(index).map(|p| p.expires).unwrap_or_default();
                    index += 1;
                    renewal_events(&state, op, outcome, exp, now)
                })
                .await
                .map_err(|e| e.to_string());
            if let Ok(outcomes) = &result {
                state.metrics.audit_events.inc_by(outcomes.len() as u64);
            }
            Some(result)
        }
    })
}

/// The audit events of one renewal's outcome.
fn renewal_events(
    state: &AuthState,
    op: &RenewOp,
    outcome: &RenewOutcome,
    expires: i64,
    now: i64,
) -> Vec<StoredEvent> {
    let ev = |t: &str, data| audit::event(t, &op.name, &op.addr, &state.cluster, now, data);
    match outcome {
        RenewOutcome::Renewed(g) => vec![ev(
            types::CERT_ISSUED,
            json!({ "kind": "bot", "bot": op.name, "renewal": true, "generation": g, "expires": expires }),
        )],
        RenewOutcome::Stolen { last_addr, current } => vec![ev(
            types::BOT_LOCKED,
            json!({
                "bot": op.name,
                "reason": "an older generation of the identity was presented: two copies exist",
                "presented_generation": op.generation,
                "current_generation": current,
                "source_addrs": [last_addr, op.addr],
            }),
        )],
        RenewOutcome::Locked(reason) => vec![ev(
            types::RENEW_REFUSED,
            audit::failure(
                "bot is locked",
                json!({ "bot": op.name, "lock_reason": reason }),
            ),
        )],
        RenewOutcome::Superseded => vec![ev(
            types::RENEW_REFUSED,
            audit::failure(
                "identity replaced by a later join",
                json!({ "bot": op.name, "generation": op.generation }),
            ),
        )],
        RenewOutcome::NoBot => vec![ev(
            types::RENEW_REFUSED,
            audit::failure("bot no longer exists", json!({ "bot": op.name })),
        )],
    }
}
