//! What changed in the cluster database, for every Auth on it: a write through any `Store`
//! announces itself (`role:NAME`); each `Store` hears all announcements, its own and other
//! Auths', and drops what it cached. On PostgreSQL the announcements are `NOTIFY`s on one
//! channel, heard through a `LISTEN` connection that reconnects by itself; when it was cut,
//! notifications may have been missed, so everything cached is dropped. On SQLite (one Auth)
//! they stay in the process.

use std::time::Duration;

use tokio::sync::broadcast;

use super::role_cache::RoleCache;

/// The PostgreSQL channel announcements travel on.
pub(super) const CHANNEL: &str = "gatehouse_changes";

/// One announcement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// A role was created, changed or removed.
    Role(String),
    /// A proxy announced itself, or left.
    Proxy(String),
    /// Trust with another cluster was established, changed or removed.
    TrustedCluster(String),
    /// A lock was created, changed or removed.
    Lock(String),
    /// A CA rotated or rolled back (`user`, `host`, `tls`).
    CertAuthority(String),
    /// Announcements may have been missed (the listening connection was cut): assume that
    /// anything changed.
    Everything,
}

impl Change {
    pub(super) fn payload(&self) -> String {
        match self {
            Change::Role(name) => format!("role:{name}"),
            Change::Proxy(name) => format!("proxy:{name}"),
            Change::TrustedCluster(name) => format!("trusted_cluster:{name}"),
            Change::Lock(name) => format!("lock:{name}"),
            Change::CertAuthority(kind) => format!("cert_authority:{kind}"),
            Change::Everything => "*".into(),
        }
    }

    fn parse(payload: &str) -> Change {
        match payload.split_once(':') {
            Some(("role", name)) => Change::Role(name.to_owned()),
            Some(("proxy", name)) => Change::Proxy(name.to_owned()),
            Some(("trusted_cluster", name)) => Change::TrustedCluster(name.to_owned()),
            Some(("lock", name)) => Change::Lock(name.to_owned()),
            Some(("cert_authority", kind)) => Change::CertAuthority(kind.to_owned()),
            _ => Change::Everything,
        }
    }
}

/// Apply `change` to this process's caches and pass it on to watchers.
pub(super) fn apply(roles: &RoleCache, watchers: &broadcast::Sender<Change>, change: Change) {
    // Roles are the only cache so far.
    if !matches!(
        change,
        Change::Proxy(_) | Change::TrustedCluster(_) | Change::Lock(_) | Change::CertAuthority(_)
    ) {
        roles.invalidate();
    }
    let _ = watchers.send(change);
}

/// Listen on PostgreSQL for other Auths' announcements until `watchers` has no sender left
/// but this task's (the `Store` is gone). Reconnects with backoff.
pub(super) async fn listen_postgres(
    url: String,
    roles: std::sync::Weak<RoleCache>,
    watchers: broadcast::Sender<Change>,
) {
    let mut wait = Duration::from_millis(200);
    loop {
        let Some(cache) = roles.upgrade() else { return };
        drop(cache);
        let listener = async {
            let mut l = sqlx::postgres::PgListener::connect(&url).await?;
            l.listen(CHANNEL).await?;
            Ok::<_, sqlx::Error>(l)
        }
        .await;
        let mut listener = match listener {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(error = %e, retry_in = ?wait, "storage: cannot listen for changes; retrying");
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(Duration::from_secs(10));
                continue;
            }
        };
        wait = Duration::from_millis(200);
        // Whatever happened while nobody listened is unknown.
        if let Some(cache) = roles.upgrade() {
            apply(&cache, &watchers, Change::Everything);
        }
        loop {
            match listener.try_recv().await {
                Ok(Some(n)) => {
                    let Some(cache) = roles.upgrade() else { return };
                    apply(&cache, &watchers, Change::parse(n.payload()));
                }
                // The connection was cut: reconnect (try_recv does) and assume anything changed.
                Ok(None) => {
                    let Some(cache) = roles.upgrade() else { return };
                    apply(&cache, &watchers, Change::Everything);
                }
                Err(e) => {
                    tracing::warn!(error = %e, "storage: the change listener failed; reconnecting");
                    break;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_round_trip_and_unknown_ones_mean_everything() {
        for c in [
            Change::Role("dev".into()),
            Change::Role("a:b".into()),
            Change::Proxy("p1".into()),
            Change::TrustedCluster("leaf".into()),
        ] {
            assert_eq!(Change::parse(&c.payload()), c);
        }
        assert_eq!(Change::parse("*"), Change::Everything);
        assert_eq!(Change::parse("bot:x"), Change::Everything);
        assert_eq!(Change::parse(""), Change::Everything);
    }
}
