//! Auth's metrics, registered under `gatehouse_auth_*`.

use std::sync::Arc;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct ResultLabel {
    pub(crate) result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct KindLabel {
    pub(crate) kind: &'static str,
}

/// Auth metrics, registered under `gatehouse_auth_*`.
#[derive(Debug, Default)]
pub struct AuthMetrics {
    pub(crate) logins: Family<ResultLabel, Counter>,
    pub(crate) joins: Family<ResultLabel, Counter>,
    pub(crate) certs_issued: Family<KindLabel, Counter>,
    pub(crate) audit_events: Counter,
    pub(crate) audit_duplicates: Counter,
    /// Node heartbeats written (rows), and the calls that carried them.
    pub(crate) heartbeat_rows: Counter,
    pub(crate) heartbeat_calls: Counter,
    /// Connections to the Auth API accepted (TCP), before TLS.
    pub connections: Counter,
    /// Calls refused because a lock stops the caller.
    pub(crate) locked_calls: Counter,
}

impl AuthMetrics {
    pub fn register(self: &Arc<Self>, registry: &mut Registry) {
        let r = registry.sub_registry_with_prefix("gatehouse_auth");
        r.register(
            "logins",
            "Login attempts by result (success, failure, rate_limited)",
            self.logins.clone(),
        );
        r.register("joins", "Join attempts by result", self.joins.clone());
        r.register(
            "certs_issued",
            "Certificates issued by kind",
            self.certs_issued.clone(),
        );
        r.register(
            "audit_events",
            "Audit events durably stored",
            self.audit_events.clone(),
        );
        r.register(
            "heartbeat_rows",
            "Node heartbeats written to the database",
            self.heartbeat_rows.clone(),
        );
        r.register(
            "heartbeat_calls",
            "UpsertNodes calls (a proxy's batch, or one agent)",
            self.heartbeat_calls.clone(),
        );
        r.register(
            "connections",
            "Connections to the Auth API accepted",
            self.connections.clone(),
        );
        r.register(
            "locked_calls",
            "Calls refused because a lock stops the caller",
            self.locked_calls.clone(),
        );
        r.register(
            "audit_duplicates",
            "Audit events ignored as duplicates of stored ones",
            self.audit_duplicates.clone(),
        );
    }
}
