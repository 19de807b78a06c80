//! Locks: an administrator's "stop this user, bot, node or role now". Pure: locks, who they
//! match, and what a proxy or agent that follows them from Auth may decide (`now` in).
//!
//! Auth refuses a locked identity's calls (logins, renewals, joins); proxies and agents follow
//! the `lock` kind of the watch stream and end what matches (sessions, tunnels) with the lock's
//! message. What they last heard stays in force while Auth is away; with `locking_mode =
//! "strict"` they refuse new sessions once they have not heard from Auth for [`STRICT_STALE`].

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// How long a follower in strict mode trusts lock state it cannot refresh.
pub const STRICT_STALE: Duration = Duration::from_secs(300);

/// What a lock stops.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LockKind {
    User,
    Bot,
    /// An agent or proxy host, by node name or host id.
    Node,
    /// Everyone holding the role.
    Role,
}

impl LockKind {
    pub fn as_str(self) -> &'static str {
        match self {
            LockKind::User => "user",
            LockKind::Bot => "bot",
            LockKind::Node => "node",
            LockKind::Role => "role",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        serde_json::from_value(serde_json::Value::String(s.to_owned())).ok()
    }
}

/// One lock as stored and as watchers get it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lock {
    pub name: String,
    pub kind: LockKind,
    /// The user, bot, node or role name.
    pub target: String,
    /// Node locks: the host ids of nodes of that name when the lock was made.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub host_ids: Vec<String>,
    #[serde(default)]
    pub message: String,
    /// Unix seconds; 0: until removed.
    #[serde(default)]
    pub expires: i64,
    pub created: i64,
    #[serde(default)]
    pub created_by: String,
}

impl Lock {
    pub fn in_force(&self, now: i64) -> bool {
        self.expires == 0 || now < self.expires
    }

    /// What the holder reads: `locked: MESSAGE` (or who locked what, without a message).
    pub fn reason(&self) -> String {
        if self.message.is_empty() {
            format!(
                "locked: {} `{}` is locked by an administrator",
                self.kind.as_str(),
                self.target
            )
        } else {
            format!("locked: {}", self.message)
        }
    }

    fn matches(&self, who: &Subject<'_>) -> bool {
        match (self.kind, who) {
            (LockKind::User, Subject::User { name, .. }) => self.target == *name,
            (LockKind::Bot, Subject::Bot { name, .. }) => self.target == *name,
            (LockKind::Role, Subject::User { roles, .. } | Subject::Bot { roles, .. }) => {
                roles.contains(&self.target)
            }
            (LockKind::Node, Subject::Node { host_id, name }) => {
                self.target == *host_id
                    || (!name.is_empty() && self.target == *name)
                    || self.host_ids.iter().any(|h| h == host_id)
            }
            _ => false,
        }
    }
}

/// Who is asking (or holding a session or a tunnel).
#[derive(Debug, Clone, Copy)]
pub enum Subject<'a> {
    User { name: &'a str, roles: &'a [String] },
    Bot { name: &'a str, roles: &'a [String] },
    Node { host_id: &'a str, name: &'a str },
}

/// The locks one knows of.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LockSet {
    locks: Vec<Lock>,
}

impl LockSet {
    pub fn new(locks: Vec<Lock>) -> Self {
        Self { locks }
    }

    /// From the watch cache's `lock` items (JSON documents); unreadable ones are skipped.
    pub fn from_documents<'a>(docs: impl Iterator<Item = &'a str>) -> Self {
        Self::new(docs.filter_map(|d| serde_json::from_str(d).ok()).collect())
    }

    pub fn locks(&self) -> &[Lock] {
        &self.locks
    }

    /// The lock in force that stops `who`, if any.
    pub fn find(&self, who: &Subject<'_>, now: i64) -> Option<&Lock> {
        self.locks
            .iter()
            .find(|l| l.in_force(now) && l.matches(who))
    }
}

/// How a follower treats lock state it cannot refresh.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LockingMode {
    /// Keep the locks last heard and go on.
    #[default]
    BestEffort,
    /// Refuse new sessions once the lock state is older than [`STRICT_STALE`].
    Strict,
}

impl LockingMode {
    pub fn as_str(self) -> &'static str {
        match self {
            LockingMode::BestEffort => "best_effort",
            LockingMode::Strict => "strict",
        }
    }
}

/// What a proxy or agent knows: the locks, the mode, and when it last heard from Auth.
#[derive(Debug, Clone, Default)]
pub struct LockView {
    pub locks: LockSet,
    pub mode: LockingMode,
    /// Unix seconds of the last event from Auth (keepalives included); `None`: never heard.
    pub heard_at: Option<i64>,
    /// How old the state may get in strict mode, in seconds (`None`: [`STRICT_STALE`]).
    pub stale_after: Option<i64>,
}

/// [`STRICT_STALE`], unless the hidden `GATEHOUSE_LOCKS_STALE_SECS` says otherwise (tests show
/// strict mode without keeping Auth away for five minutes).
pub fn stale_after_from_env() -> Option<i64> {
    std::env::var("GATEHOUSE_LOCKS_STALE_SECS")
        .ok()?
        .parse::<i64>()
        .ok()
        .filter(|s| *s > 0)
}

impl LockView {
    /// May `who` start something new at `now`? A lock in force refuses with its reason; in
    /// strict mode, lock state older than [`STRICT_STALE`] (or never heard) refuses too.
    pub fn check(&self, who: &Subject<'_>, now: i64) -> Result<(), String> {
        if let Some(lock) = self.locks.find(who, now) {
            return Err(lock.reason());
        }
        if self.mode == LockingMode::Strict {
            let limit = self
                .stale_after
                .unwrap_or_else(|| i64::try_from(STRICT_STALE.as_secs()).unwrap_or(i64::MAX));
            match self.heard_at {
                Some(at) if now.saturating_sub(at) <= limit => {}
                Some(at) => {
                    return Err(format!(
                        "lock state could not be refreshed from Auth for {} s; locking_mode = \"strict\" refuses new sessions",
                        now.saturating_sub(at)
                    ));
                }
                None => {
                    return Err(
                        "lock state has not been heard from Auth yet; locking_mode = \"strict\" refuses new sessions"
                            .into(),
                    );
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lock(kind: LockKind, target: &str, expires: i64) -> Lock {
        Lock {
            name: format!("{}-{target}", kind.as_str()),
            kind,
            target: target.into(),
            host_ids: vec![],
            message: String::new(),
            expires,
            created: 0,
            created_by: "admin".into(),
        }
    }

    #[test]
    fn each_kind_matches_only_its_own_subjects() {
        let roles = vec!["dev".to_string()];
        let alice = Subject::User {
            name: "alice",
            roles: &roles,
        };
        let bot = Subject::Bot {
            name: "alice",
            roles: &[],
        };
        let node = Subject::Node {
            host_id: "h-1",
            name: "web1",
        };
        let set = LockSet::new(vec![lock(LockKind::User, "alice", 0)]);
        assert!(set.find(&alice, 10).is_some());
        assert!(
            set.find(&bot, 10).is_none(),
            "a user lock does not stop a bot of that name"
        );
        let set = LockSet::new(vec![lock(LockKind::Role, "dev", 0)]);
        assert!(set.find(&alice, 10).is_some());
        assert!(set.find(&bot, 10).is_none());
        for target in ["web1", "h-1"] {
            let set = LockSet::new(vec![lock(LockKind::Node, target, 0)]);
            assert!(set.find(&node, 10).is_some(), "{target}");
            assert!(set.find(&alice, 10).is_none());
        }
        let mut by_id = lock(LockKind::Node, "web1", 0);
        by_id.host_ids = vec!["h-1".into()];
        let renamed = Subject::Node {
            host_id: "h-1",
            name: "",
        };
        assert!(LockSet::new(vec![by_id]).find(&renamed, 10).is_some());
    }

    #[test]
    fn expired_locks_stop_nothing_and_messages_are_shown() {
        let mut l = lock(LockKind::User, "alice", 100);
        let who = Subject::User {
            name: "alice",
            roles: &[],
        };
        let set = LockSet::new(vec![l.clone()]);
        assert!(set.find(&who, 99).is_some());
        assert!(set.find(&who, 100).is_none());
        assert_eq!(
            l.reason(),
            "locked: user `alice` is locked by an administrator"
        );
        l.message = "laptop stolen, call security".into();
        assert_eq!(l.reason(), "locked: laptop stolen, call security");
    }

    #[test]
    fn strict_mode_refuses_on_stale_state_best_effort_does_not() {
        let who = Subject::User {
            name: "bob",
            roles: &[],
        };
        let mut view = LockView {
            heard_at: Some(1_000),
            ..Default::default()
        };
        assert!(view.check(&who, 1_000 + 3_600).is_ok());
        view.mode = LockingMode::Strict;
        assert!(view.check(&who, 1_000 + 300).is_ok());
        let err = view.check(&who, 1_000 + 301).unwrap_err();
        assert!(err.contains("strict"), "{err}");
        view.heard_at = None;
        assert!(view.check(&who, 0).is_err());
        // A lock wins in either mode, with its own reason.
        view.heard_at = Some(10);
        view.locks = LockSet::new(vec![lock(LockKind::User, "bob", 0)]);
        assert!(view.check(&who, 10).unwrap_err().starts_with("locked:"));
    }
}
