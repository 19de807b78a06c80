//! The locks this proxy enforces: a view kept current from Auth's watch stream by the role
//! (`gatehouse_controlplane::watch::follow_locks`), and a signal every tunnel task waits on so
//! that a locked node's tunnel ends as soon as the lock is heard.

use std::sync::Arc;

use arc_swap::ArcSwap;
use gatehouse_controlplane::identity::{Identity, IdentityKind};
use gatehouse_controlplane::locks::{LockView, Subject};

/// The locks in force as this proxy last heard them.
#[derive(Debug)]
pub struct Locks {
    view: Arc<ArcSwap<LockView>>,
    changed: tokio::sync::watch::Sender<()>,
}

impl Default for Locks {
    fn default() -> Self {
        Self {
            view: Arc::default(),
            changed: tokio::sync::watch::Sender::new(()),
        }
    }
}

fn now() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp()
}

impl Locks {
    /// The view the follower writes.
    pub fn view(&self) -> Arc<ArcSwap<LockView>> {
        Arc::clone(&self.view)
    }

    /// The locks changed: wake every tunnel to look.
    pub fn changed(&self) {
        self.changed.send_replace(());
    }

    pub(crate) fn subscribe(&self) -> tokio::sync::watch::Receiver<()> {
        self.changed.subscribe()
    }

    /// May `id` (a user or a bot) open a new session? A lock (or, in strict mode, stale lock
    /// state) refuses with the reason.
    pub(crate) fn check_session(&self, id: &Identity) -> Result<(), String> {
        let who = match id.kind {
            IdentityKind::User => Subject::User {
                name: &id.name,
                roles: &id.roles,
            },
            IdentityKind::Bot => Subject::Bot {
                name: &id.name,
                roles: &id.roles,
            },
            _ => return Ok(()),
        };
        self.view.load().check(&who, now())
    }

    /// A trusted root's user, opening a session through this (leaf) proxy.
    pub(crate) fn check_remote_user(&self, user: &str, roles: &[String]) -> Result<(), String> {
        self.view
            .load()
            .check(&Subject::User { name: user, roles }, now())
    }

    /// The reason a lock stops the node `host_id` / `name`, if one does (stale state alone
    /// does not end tunnels).
    pub(crate) fn node_locked(&self, host_id: &str, name: &str) -> Option<String> {
        self.view
            .load()
            .locks
            .find(&Subject::Node { host_id, name }, now())
            .map(|l| l.reason())
    }
}
