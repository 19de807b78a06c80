//! Audit event types and construction. Events never carry secrets: no passwords, hashes, token
//! secrets or private keys, only names, ids and outcomes.

use serde_json::{Value, json};

use crate::storage::StoredEvent;

/// Event type names, as they appear in the log and in `gctl events --type`.
pub mod types {
    pub const USER_LOGIN: &str = "user.login";
    pub const MFA_ADD: &str = "mfa.add";
    pub const USER_CREATE: &str = "user.create";
    pub const USER_UPDATE: &str = "user.update";
    pub const USER_DELETE: &str = "user.delete";
    pub const USER_PASSWORD_CHANGE: &str = "user.password_change";
    pub const USER_PASSWORD_RESET: &str = "user.password_reset";
    pub const ROLE_CREATE: &str = "role.create";
    pub const ROLE_UPDATE: &str = "role.update";
    pub const ROLE_DELETE: &str = "role.delete";
    pub const TOKEN_CREATE: &str = "token.create";
    pub const TOKEN_DELETE: &str = "token.delete";
    pub const NODE_DELETE: &str = "node.delete";
    pub const JOIN: &str = "join";
    pub const CERT_ISSUED: &str = "cert.issued";
    pub const BOT_CREATE: &str = "bot.create";
    pub const BOT_DELETE: &str = "bot.delete";
    pub const BOT_LOCKED: &str = "bot.locked";
    pub const BOT_UNLOCK: &str = "bot.unlock";
    pub const TRUSTED_CLUSTER_CREATE: &str = "trusted_cluster.create";
    pub const TRUSTED_CLUSTER_UPDATE: &str = "trusted_cluster.update";
    pub const TRUSTED_CLUSTER_DELETE: &str = "trusted_cluster.delete";
    /// A renewal refused (expired, superseded, locked, deleted bot).
    pub const RENEW_REFUSED: &str = "renew.refused";
}

/// Build an event with a fresh time-ordered id (UUIDv7), `now` in Unix nanoseconds.
pub fn event(
    event_type: &str,
    actor: &str,
    source_addr: &str,
    cluster: &str,
    now_nanos: i64,
    data: Value,
) -> StoredEvent {
    StoredEvent {
        id: 0,
        event_id: uuid::Uuid::now_v7().to_string(),
        time_nanos: now_nanos,
        event_type: event_type.to_owned(),
        actor: actor.to_owned(),
        source_addr: source_addr.to_owned(),
        cluster: cluster.to_owned(),
        data: data.to_string(),
    }
}

pub fn success(extra: Value) -> Value {
    merge(json!({ "success": true }), extra)
}

pub fn failure(reason: &str, extra: Value) -> Value {
    merge(json!({ "success": false, "reason": reason }), extra)
}

fn merge(mut base: Value, extra: Value) -> Value {
    if let (Some(b), Value::Object(e)) = (base.as_object_mut(), extra) {
        b.extend(e);
    }
    base
}
