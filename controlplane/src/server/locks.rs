//! Locks: `CreateLock`, `ListLocks`, `DeleteLock`, and the check every authenticated call (and
//! a login, and a bot's join) goes through. Auth reads the locks in force at most once a second
//! ([`LockCache`]), so a lock made through any Auth stops calls to every Auth within a second.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tonic::Status;

use super::call::{Audit, Call, Done, Failure};
use super::{AuthState, internal, now_secs, store_status};
use crate::identity::{Identity, IdentityKind};
use crate::locks::{Lock, LockKind, LockSet, Subject};
use crate::proto;

/// How stale Auth's own view of the locks may be.
const REFRESH: Duration = Duration::from_secs(1);

/// The locks in force, re-read from the store at most every [`REFRESH`].
#[derive(Debug, Default)]
pub(crate) struct LockCache {
    cached: Mutex<Option<(Arc<LockSet>, Instant)>>,
}

impl LockCache {
    async fn current(&self, state: &AuthState) -> Result<Arc<LockSet>, Status> {
        if let Ok(c) = self.cached.lock()
            && let Some((set, at)) = c.as_ref()
            && at.elapsed() < REFRESH
        {
            return Ok(Arc::clone(set));
        }
        let docs = state
            .store
            .list_locks(now_secs())
            .await
            .map_err(store_status)?;
        let set = Arc::new(LockSet::from_documents(docs.iter().map(String::as_str)));
        if let Ok(mut c) = self.cached.lock() {
            *c = Some((Arc::clone(&set), Instant::now()));
        }
        Ok(set)
    }

    /// Forget what was read (a lock changed through this Auth).
    fn invalidate(&self) {
        if let Ok(mut c) = self.cached.lock() {
            *c = None;
        }
    }
}

/// Who `identity` is, as locks see it (the admin and Auth itself are never locked).
pub(crate) fn subject(identity: &Identity) -> Option<Subject<'_>> {
    match identity.kind {
        IdentityKind::User => Some(Subject::User {
            name: &identity.name,
            roles: &identity.roles,
        }),
        IdentityKind::Bot => Some(Subject::Bot {
            name: &identity.name,
            roles: &identity.roles,
        }),
        IdentityKind::Node => Some(Subject::Node {
            host_id: &identity.name,
            name: "",
        }),
        IdentityKind::Builtin => None,
    }
}

impl AuthState {
    /// Refuse `who` if a lock in force stops it.
    pub(crate) async fn check_lock(&self, who: Option<Subject<'_>>) -> Result<(), Status> {
        let Some(who) = who else { return Ok(()) };
        let set = self.locks.current(self).await?;
        match set.find(&who, now_secs()) {
            Some(lock) => {
                self.metrics.locked_calls.inc();
                Err(Status::permission_denied(lock.reason()))
            }
            None => Ok(()),
        }
    }
}

pub(super) async fn create(
    call: Call,
    r: proto::CreateLockRequest,
) -> Result<Done<proto::CreateLockResponse>, Failure> {
    let caller = call.caller()?;
    let kind = LockKind::parse(&r.kind).ok_or_else(|| {
        Status::invalid_argument(format!(
            "kind `{}`: expected user, bot, node or role",
            r.kind
        ))
    })?;
    crate::resources::validate_name(&r.target)
        .map_err(|m| Status::invalid_argument(format!("target: {m}")))?;
    if r.message.len() > 1024 || r.message.chars().any(char::is_control) {
        return Err(Status::invalid_argument(
            "message: at most 1024 bytes, one line without control characters",
        )
        .into());
    }
    let now = now_secs();
    // A node lock names a node; its host ids are kept too, so a renamed host stays locked.
    let host_ids = if kind == LockKind::Node {
        node_host_ids(&call.state, &r.target, now).await?
    } else {
        vec![]
    };
    let ttl = i64::try_from(r.ttl_seconds).unwrap_or(i64::MAX);
    let lock = Lock {
        name: format!("{}:{}", kind.as_str(), r.target),
        kind,
        target: r.target.clone(),
        host_ids,
        message: r.message.clone(),
        expires: if ttl == 0 { 0 } else { now.saturating_add(ttl) },
        created: now,
        created_by: caller.identity.name.clone(),
    };
    let doc = serde_json::to_string(&lock).map_err(internal)?;
    call.state
        .store
        .put_lock(&lock.name, &doc, lock.expires)
        .await
        .map_err(store_status)?;
    call.state.locks.invalidate();
    let actor = caller.identity.name.clone();
    Ok(Done::audited(
        proto::CreateLockResponse { lock_json: doc },
        Audit::one(
            "lock.create",
            &actor,
            serde_json::json!({
                "lock": lock.name,
                "kind": kind.as_str(),
                "target": lock.target,
                "message": lock.message,
                "expires": lock.expires,
            }),
        ),
    ))
}

async fn node_host_ids(state: &AuthState, target: &str, now: i64) -> Result<Vec<String>, Status> {
    let rows = state.store.list_nodes(now).await.map_err(store_status)?;
    Ok(rows
        .iter()
        .filter_map(|s| serde_json::from_str::<serde_json::Value>(s).ok())
        .filter(|n| n.get("name").and_then(|v| v.as_str()) == Some(target))
        .filter_map(|n| n.get("host_id").and_then(|v| v.as_str()).map(str::to_owned))
        .collect())
}

pub(super) async fn list(
    call: Call,
    _r: proto::ListLocksRequest,
) -> Result<Done<proto::ListLocksResponse>, Failure> {
    let locks_json = call
        .state
        .store
        .list_locks(now_secs())
        .await
        .map_err(store_status)?;
    Ok(Done::read(proto::ListLocksResponse { locks_json }))
}

pub(super) async fn delete(
    call: Call,
    r: proto::DeleteLockRequest,
) -> Result<Done<proto::DeleteLockResponse>, Failure> {
    let caller = call.caller()?;
    if !call
        .state
        .store
        .delete_lock(&r.name)
        .await
        .map_err(store_status)?
    {
        return Err(Status::not_found(format!(
            "no lock named `{}` (gctl locks ls lists them)",
            r.name
        ))
        .into());
    }
    call.state.locks.invalidate();
    let actor = caller.identity.name.clone();
    Ok(Done::audited(
        proto::DeleteLockResponse {},
        Audit::one("lock.delete", &actor, serde_json::json!({ "lock": r.name })),
    ))
}
