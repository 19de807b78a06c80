//! TCP apps: the agent authorizes each app session itself, from the roles the Proxy read off the
//! user's verified certificate (the stream's metadata) and the app's own labels — the Proxy only
//! routes. Sessions are audited (`app.session.start`, `app.session.end` with bytes,
//! `app.session.rejected` with the reason) and kept in a live table so a lock can end them.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use gatehouse_controlplane::rbac::RoleSet;

use crate::ssh::{AuditSink, RoleSource, TrustedRoot};

const ROLE_LOOKUP_TIMEOUT: Duration = Duration::from_secs(10);

/// One app an agent serves.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct App {
    /// `host:port` on the agent's network.
    pub addr: String,
    pub labels: BTreeMap<String, String>,
}

/// Who asks for an app session, as the Proxy's stream metadata says.
#[derive(Debug, Clone, Default, serde::Deserialize)]
#[serde(default)]
pub struct AppRequester {
    pub user: String,
    pub roles: Vec<String>,
    /// The cluster the user belongs to (a trusted root's users have their roles mapped).
    pub cluster: String,
    pub source_addr: String,
}

impl AppRequester {
    /// From the stream's JSON metadata; anything unreadable is an empty requester (refused).
    pub fn parse(metadata: &[u8]) -> Self {
        serde_json::from_slice(metadata).unwrap_or_default()
    }
}

/// A session that was allowed: what its end event and a lock need.
#[derive(Debug)]
pub struct Allowed {
    pub addr: String,
    id: u64,
    started: Instant,
    user: String,
    roles: Vec<String>,
    source_addr: String,
    app: String,
    /// In the live table (a lock may have taken it out since).
    opened: std::sync::atomic::AtomicBool,
}

/// The agent's apps, and the sessions open to them.
pub struct AppService {
    apps: BTreeMap<String, App>,
    roles: Arc<dyn RoleSource>,
    audit: Arc<dyn AuditSink>,
    node_name: String,
    cluster: String,
    roots: Arc<arc_swap::ArcSwap<Vec<TrustedRoot>>>,
    locks: Arc<arc_swap::ArcSwap<gatehouse_controlplane::locks::LockView>>,
    live: Mutex<HashMap<u64, (Allowed, tokio::task::AbortHandle)>>,
    next_id: std::sync::atomic::AtomicU64,
}

impl std::fmt::Debug for AppService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AppService")
            .field("apps", &self.apps)
            .field("node_name", &self.node_name)
            .finish_non_exhaustive()
    }
}

impl AppService {
    pub fn new(
        apps: BTreeMap<String, App>,
        roles: Arc<dyn RoleSource>,
        audit: Arc<dyn AuditSink>,
        node_name: String,
        cluster: String,
        roots: Arc<arc_swap::ArcSwap<Vec<TrustedRoot>>>,
        locks: Arc<arc_swap::ArcSwap<gatehouse_controlplane::locks::LockView>>,
    ) -> Self {
        Self {
            apps,
            roles,
            audit,
            node_name,
            cluster,
            roots,
            locks,
            live: Mutex::new(HashMap::new()),
            next_id: std::sync::atomic::AtomicU64::new(1),
        }
    }

    pub fn apps(&self) -> &BTreeMap<String, App> {
        &self.apps
    }

    /// Decide on a session to `app` for `who`: the app must exist and the requester's roles
    /// (mapped, for a trusted root's user) must reach its labels. A refusal is audited and its
    /// reason is what the user reads.
    pub async fn authorize(&self, app: &str, who: &AppRequester) -> Result<Allowed, String> {
        let result = self.decide(app, who).await;
        match &result {
            Ok(allowed) => {
                tracing::info!(user = %who.user, app, source_addr = %who.source_addr, "app: session started");
                self.audit.emit(
                    "app.session.start",
                    &who.user,
                    serde_json::json!({
                        "user": who.user,
                        "app": app,
                        "node": self.node_name,
                        "roles": allowed.roles,
                        "source_addr": who.source_addr,
                    }),
                );
            }
            Err(reason) => {
                tracing::warn!(user = %who.user, app, source_addr = %who.source_addr, "app: session refused: {reason}");
                self.audit.emit(
                    "app.session.rejected",
                    &who.user,
                    serde_json::json!({
                        "user": who.user,
                        "app": app,
                        "node": self.node_name,
                        "reason": reason,
                        "source_addr": who.source_addr,
                    }),
                );
            }
        }
        result
    }

    async fn decide(&self, app: &str, who: &AppRequester) -> Result<Allowed, String> {
        let Some(def) = self.apps.get(app) else {
            return Err(format!("this agent serves no app named `{app}`"));
        };
        if who.user.is_empty() {
            return Err("the proxy named no user for this session".into());
        }
        let role_names = if who.cluster.is_empty() || who.cluster == self.cluster {
            who.roles.clone()
        } else {
            let roots = self.roots.load();
            let Some(root) = roots.iter().find(|r| r.cluster == who.cluster) else {
                return Err(format!(
                    "cluster `{}` is not trusted by cluster `{}`",
                    who.cluster, self.cluster
                ));
            };
            let mapped = root.role_map.map(&who.roles);
            if mapped.is_empty() {
                return Err(format!(
                    "none of your roles ({}) maps to a role in cluster {}",
                    who.roles.join(", "),
                    self.cluster
                ));
            }
            mapped
        };
        let roles =
            match tokio::time::timeout(ROLE_LOOKUP_TIMEOUT, self.roles.roles(&role_names)).await {
                Ok(Ok(roles)) => roles,
                Ok(Err(e)) => return Err(format!("could not load roles: {e}")),
                Err(_) => return Err("timed out loading roles".into()),
            };
        RoleSet::new(roles)
            .check_app(app, &def.labels)
            .map_err(|denied| denied.to_string())?;
        Ok(Allowed {
            addr: def.addr.clone(),
            id: self
                .next_id
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            started: Instant::now(),
            user: who.user.clone(),
            roles: role_names,
            source_addr: who.source_addr.clone(),
            app: app.to_owned(),
            opened: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// The reason a lock stops `user` with `roles` here, if one does.
    fn lock_reason(&self, user: &str, roles: &[String]) -> Option<String> {
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        crate::ssh::locked_out(&self.locks.load(), &self.node_name, user, roles, now).err()
    }

    /// End the live sessions the locks now stop, each with its lock's reason; returns how many.
    pub fn end_locked(&self) -> usize {
        let reasons: Vec<(u64, String)> = match self.live.lock() {
            Ok(live) => live
                .iter()
                .filter_map(|(id, (a, _))| Some((*id, self.lock_reason(&a.user, &a.roles)?)))
                .collect(),
            Err(_) => return 0,
        };
        reasons
            .iter()
            .filter(|(id, reason)| self.end_live(*id, reason))
            .count()
    }

    /// Take one live session out of the table, stop its task and audit its end with `reason`;
    /// false if it had ended already.
    fn end_live(&self, id: u64, reason: &str) -> bool {
        let ended = self.live.lock().ok().and_then(|mut l| l.remove(&id));
        match ended {
            Some((allowed, task)) => {
                task.abort();
                self.end_event(&allowed, None, reason);
                true
            }
            None => false,
        }
    }

    /// Remember a running session (its task, to end it on a lock).
    pub fn opened(&self, allowed: &Allowed, task: tokio::task::AbortHandle) {
        if let Ok(mut live) = self.live.lock() {
            live.insert(allowed.id, (allowed.clone_meta(), task));
        }
    }

    /// A session ended (or could not start): forget it and audit its end, unless a lock
    /// already ended it (and audited that).
    pub fn ended(&self, allowed: &Allowed, to_app: u64, from_app: u64, reason: &str) {
        let was_live = self
            .live
            .lock()
            .map(|mut live| live.remove(&allowed.id).is_some())
            .unwrap_or(false);
        let opened = allowed.opened.load(std::sync::atomic::Ordering::Relaxed);
        if was_live || !opened {
            self.end_event(allowed, Some((to_app, from_app)), reason);
        }
    }

    fn end_event(&self, allowed: &Allowed, bytes: Option<(u64, u64)>, reason: &str) {
        let mut data = serde_json::json!({
            "user": allowed.user,
            "app": allowed.app,
            "node": self.node_name,
            "source_addr": allowed.source_addr,
            "duration_ms": u64::try_from(allowed.started.elapsed().as_millis()).unwrap_or(u64::MAX),
            "reason": reason,
        });
        if let (Some((to_app, from_app)), Some(map)) = (bytes, data.as_object_mut()) {
            map.insert("bytes_in".into(), to_app.into());
            map.insert("bytes_out".into(), from_app.into());
        }
        self.audit.emit("app.session.end", &allowed.user, data);
    }

    /// End the live sessions `matches` picks (user name, role names) with `reason` (audited);
    /// returns how many.
    pub fn end_where(&self, matches: impl Fn(&str, &[String]) -> bool, reason: &str) -> usize {
        let ids: Vec<u64> = match self.live.lock() {
            Ok(live) => live
                .iter()
                .filter(|(_, (a, _))| matches(&a.user, &a.roles))
                .map(|(id, _)| *id)
                .collect(),
            Err(_) => return 0,
        };
        ids.iter().filter(|id| self.end_live(**id, reason)).count()
    }
}

impl Allowed {
    fn clone_meta(&self) -> Allowed {
        self.opened
            .store(true, std::sync::atomic::Ordering::Relaxed);
        Allowed {
            addr: self.addr.clone(),
            id: self.id,
            started: self.started,
            user: self.user.clone(),
            roles: self.roles.clone(),
            source_addr: self.source_addr.clone(),
            app: self.app.clone(),
            opened: std::sync::atomic::AtomicBool::new(true),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ssh::BoxFuture;
    use gatehouse_controlplane::resources::{Resource, Role, parse_document};

    struct Roles(Vec<Role>);
    impl RoleSource for Roles {
        fn roles<'a>(&'a self, names: &'a [String]) -> BoxFuture<'a, Result<Vec<Role>, String>> {
            let found = self
                .0
                .iter()
                .filter(|r| names.contains(&r.metadata.name))
                .cloned()
                .collect();
            Box::pin(async move { Ok(found) })
        }
    }

    #[derive(Default)]
    struct Events(Mutex<Vec<(String, serde_json::Value)>>);
    impl AuditSink for Events {
        fn emit(&self, event_type: &str, _actor: &str, data: serde_json::Value) {
            self.0.lock().unwrap().push((event_type.into(), data));
        }
    }

    fn role(toml: &str) -> Role {
        match parse_document(toml).unwrap() {
            Resource::Role(r) => r,
            other => panic!("{other:?}"),
        }
    }

    fn service(events: Arc<Events>) -> AppService {
        let app = |addr: &str, env: &str| App {
            addr: addr.into(),
            labels: [("env".to_string(), env.to_string())].into(),
        };
        AppService::new(
            [
                ("grafana".to_string(), app("127.0.0.1:1", "dev")),
                ("billing".to_string(), app("127.0.0.1:2", "prod")),
            ]
            .into(),
            Arc::new(Roles(vec![role(
                "kind='role'\n[metadata]\nname='dev'\n[spec.allow]\napp_labels={env='dev'}",
            )])),
            events,
            "node1".into(),
            "c1".into(),
            Arc::new(arc_swap::ArcSwap::from_pointee(Vec::new())),
            Arc::default(),
        )
    }

    #[tokio::test]
    async fn roles_decide_and_every_decision_is_audited() {
        let events = Arc::new(Events::default());
        let apps = service(Arc::clone(&events));
        let alice = AppRequester::parse(
            br#"{"user":"alice","roles":["dev"],"cluster":"c1","source_addr":"10.0.0.7:5000"}"#,
        );
        let ok = apps.authorize("grafana", &alice).await.unwrap();
        assert_eq!(ok.addr, "127.0.0.1:1");
        let err = apps.authorize("billing", &alice).await.unwrap_err();
        assert!(
            err.contains("no role's app labels match app `billing`"),
            "{err}"
        );
        let err = apps.authorize("nope", &alice).await.unwrap_err();
        assert!(err.contains("no app named `nope`"), "{err}");
        // Unreadable metadata names nobody and is refused; another cluster is not trusted.
        assert!(
            apps.authorize("grafana", &AppRequester::parse(b"{garbage"))
                .await
                .is_err()
        );
        let other = AppRequester {
            cluster: "elsewhere".into(),
            ..alice.clone()
        };
        let err = apps.authorize("grafana", &other).await.unwrap_err();
        assert!(err.contains("not trusted"), "{err}");
        apps.ended(&ok, 10, 20, "closed");
        let ev = events.0.lock().unwrap();
        let types: Vec<&str> = ev.iter().map(|(t, _)| t.as_str()).collect();
        assert_eq!(
            types,
            [
                "app.session.start",
                "app.session.rejected",
                "app.session.rejected",
                "app.session.rejected",
                "app.session.rejected",
                "app.session.end"
            ]
        );
        assert_eq!(ev[0].1["source_addr"], "10.0.0.7:5000");
        assert_eq!(ev[5].1["bytes_in"], 10);
        assert_eq!(ev[5].1["bytes_out"], 20);
    }

    #[tokio::test]
    async fn a_lock_ends_the_matching_live_sessions() {
        let events = Arc::new(Events::default());
        let apps = service(Arc::clone(&events));
        let who = |user: &str| AppRequester {
            user: user.into(),
            roles: vec!["dev".into()],
            ..Default::default()
        };
        let a = apps.authorize("grafana", &who("alice")).await.unwrap();
        let b = apps.authorize("grafana", &who("bob")).await.unwrap();
        let ta = tokio::spawn(std::future::pending::<()>());
        let tb = tokio::spawn(std::future::pending::<()>());
        apps.opened(&a, ta.abort_handle());
        apps.opened(&b, tb.abort_handle());
        assert_eq!(apps.end_where(|user, _| user == "alice", "locked: gone"), 1);
        assert!(ta.await.unwrap_err().is_cancelled());
        assert!(!tb.is_finished());
        apps.ended(&b, 0, 0, "closed");
        assert_eq!(apps.end_where(|_, _| true, "locked"), 0);
        // alice's task, ending after the lock, does not audit a second end.
        apps.ended(&a, 0, 0, "reset");
        let ends: Vec<String> = events
            .0
            .lock()
            .unwrap()
            .iter()
            .filter(|(t, _)| t == "app.session.end")
            .map(|(_, d)| format!("{} {}", d["user"], d["reason"]))
            .collect();
        assert_eq!(ends, [r#""alice" "locked: gone""#, r#""bob" "closed""#]);
    }
}
