//! Roles as last read, kept in memory: every authenticated call and every renewal reads its
//! caller's roles, and roles change rarely. Writes through this `Store` (the only writer of a
//! database) clear the cache; a read that raced a write does not store what it read.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use crate::resources::Role;

/// A read in flight remembers the epoch it started in; a write moves the epoch on.
#[derive(Debug, Default)]
pub(super) struct RoleCache {
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    epoch: u64,
    roles: HashMap<String, Option<Arc<Role>>>,
}

/// Most role names kept; past it the cache starts again (names come from certificates).
const MAX_ENTRIES: usize = 4096;

impl RoleCache {
    /// The cached answer for `name` (`Some(None)`: known not to exist), or the epoch to hand
    /// back to [`RoleCache::store`] after reading the database.
    pub(super) fn get(&self, name: &str) -> Result<Option<Arc<Role>>, u64> {
        let inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        match inner.roles.get(name) {
            Some(hit) => Ok(hit.clone()),
            None => Err(inner.epoch),
        }
    }

    /// Keep what a read that started at `epoch` found, unless a write happened since.
    pub(super) fn store(&self, epoch: u64, name: &str, role: Option<Arc<Role>>) {
        let mut inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        if inner.epoch != epoch {
            return;
        }
        if inner.roles.len() >= MAX_ENTRIES {
            inner.roles.clear();
        }
        inner.roles.insert(name.to_owned(), role);
    }

    /// A role was written or removed: forget everything read before.
    pub(super) fn invalidate(&self) {
        let mut inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        inner.epoch += 1;
        inner.roles.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn role(name: &str) -> Arc<Role> {
        let mut r: Role = serde_json::from_value(serde_json::json!({
            "kind": "role", "version": "v1", "metadata": { "name": name }, "spec": {}
        }))
        .unwrap();
        r.metadata.name = name.into();
        Arc::new(r)
    }

    #[test]
    fn a_read_that_raced_a_write_is_not_kept() {
        let c = RoleCache::default();
        let epoch = c.get("dev").unwrap_err();
        c.invalidate();
        c.store(epoch, "dev", Some(role("dev")));
        assert!(c.get("dev").is_err(), "stale read must not be cached");
        let epoch = c.get("dev").unwrap_err();
        c.store(epoch, "dev", Some(role("dev")));
        assert_eq!(c.get("dev").unwrap().unwrap().metadata.name, "dev");
        c.store(epoch, "ghost", None);
        assert!(c.get("ghost").unwrap().is_none());
        c.invalidate();
        assert!(c.get("dev").is_err());
    }
}
