//! Trusted leaf clusters as a root's proxy sees them: which are trusted now (from Auth's watch
//! stream; the TLS verifier takes their CAs), which hold a tunnel here, and since when one's
//! last tunnel is down, for the refusal a user gets.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Mutex;

use arc_swap::ArcSwap;

#[derive(Debug, Default)]
pub struct Leaves {
    trusted: ArcSwap<BTreeSet<String>>,
    /// Tunnels up per leaf, and when each leaf's last tunnel went down (Unix seconds).
    state: Mutex<(BTreeMap<String, usize>, BTreeMap<String, i64>)>,
}

impl Leaves {
    /// Trust exactly these leaves from now on.
    pub fn set_trusted(&self, names: impl IntoIterator<Item = String>) {
        self.trusted
            .store(std::sync::Arc::new(names.into_iter().collect()));
    }

    pub fn is_trusted(&self, name: &str) -> bool {
        self.trusted.load().contains(name)
    }

    pub(crate) fn tunnel_up(&self, name: &str) {
        if let Ok(mut s) = self.state.lock() {
            *s.0.entry(name.to_owned()).or_default() += 1;
        }
    }

    pub(crate) fn tunnel_down(&self, name: &str, now: i64) {
        if let Ok(mut s) = self.state.lock() {
            let left = s.0.get(name).copied().unwrap_or(1).saturating_sub(1);
            if left == 0 {
                s.0.remove(name);
                s.1.insert(name.to_owned(), now);
            } else {
                s.0.insert(name.to_owned(), left);
            }
        }
    }

    /// Leaves with a tunnel up here.
    pub fn held(&self) -> Vec<String> {
        self.state
            .lock()
            .map(|s| s.0.keys().cloned().collect())
            .unwrap_or_default()
    }

    /// Why a session to `name` cannot be routed (no tunnel of it here).
    pub(crate) fn offline(&self, name: &str) -> String {
        if !self.is_trusted(name) {
            return format!(
                "no cluster `{name}` is trusted by this cluster (gsh clusters lists them)"
            );
        }
        let since = self.state.lock().ok().and_then(|s| s.1.get(name).copied());
        match since {
            Some(t) => format!(
                "cluster {name} is offline (its tunnel to this proxy is down since {})",
                rfc3339(t)
            ),
            None => format!(
                "cluster {name} is offline (its tunnel has not reached this proxy since it started)"
            ),
        }
    }
}

fn rfc3339(t: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(t)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| t.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offline_says_since_when_and_untrusted_says_so() {
        let l = Leaves::default();
        assert!(l.offline("leaf").contains("no cluster `leaf` is trusted"));
        l.set_trusted(["leaf".to_string()]);
        assert!(l.offline("leaf").contains("has not reached this proxy"));
        l.tunnel_up("leaf");
        l.tunnel_up("leaf");
        assert_eq!(l.held(), ["leaf"]);
        l.tunnel_down("leaf", 1_800_000_000);
        assert_eq!(l.held(), ["leaf"], "one tunnel still up");
        l.tunnel_down("leaf", 1_800_000_000);
        assert!(l.held().is_empty());
        assert_eq!(
            l.offline("leaf"),
            "cluster leaf is offline (its tunnel to this proxy is down since 2027-01-15T08:00:00Z)"
        );
    }
}
