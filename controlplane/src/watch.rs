//! The watcher's side of the watch stream: a cache of what Auth holds for some kinds, kept
//! current by [`follow`], which reconnects and resumes from the last cursor applied.
//!
//! [`WatchCache::apply`] is the pure part (events in, state out): a snapshot replaces what the
//! cache holds, a put or delete changes one item, every event moves the cursor. An event is
//! applied whole or not at all, so a stream cut in the middle of one resumes from the one
//! before it.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::client::AuthEndpoint;
use crate::proto::{self, watch_event::Type};

/// How long a stream may stay silent (keepalives come every 5 s) before it is taken for dead.
pub const SILENCE_LIMIT: Duration = Duration::from_secs(20);

/// Why an event cannot be applied.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WatchError {
    #[error("watch event of unknown type {0}")]
    UnknownType(i32),
    #[error("a {0} event carries {1} items; it carries one")]
    Items(&'static str, usize),
    #[error("a change arrived before the first snapshot")]
    NoSnapshot,
}

/// What the watcher holds: items by (kind, name), as JSON documents.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct WatchCache {
    items: BTreeMap<(String, String), String>,
    cursor: String,
    /// Snapshots applied (the first, and each after a resume that could not replay).
    pub snapshots: u64,
    /// Puts and deletes applied.
    pub changes: u64,
    /// Events applied, keepalives included (a stream that is alive moves it every 5 s).
    pub events: u64,
}

impl WatchCache {
    /// Apply one event; true if an item changed.
    pub fn apply(&mut self, ev: &proto::WatchEvent) -> Result<bool, WatchError> {
        let kind = Type::try_from(ev.r#type).map_err(|_| WatchError::UnknownType(ev.r#type))?;
        let changed = match kind {
            Type::Snapshot => {
                let items: BTreeMap<(String, String), String> = ev
                    .items
                    .iter()
                    .map(|i| ((i.kind.clone(), i.name.clone()), i.resource.clone()))
                    .collect();
                let changed = items != self.items;
                self.items = items;
                self.snapshots += 1;
                changed
            }
            Type::Put | Type::Delete => {
                if self.cursor.is_empty() {
                    return Err(WatchError::NoSnapshot);
                }
                let [item] = ev.items.as_slice() else {
                    let what = if kind == Type::Put { "put" } else { "delete" };
                    return Err(WatchError::Items(what, ev.items.len()));
                };
                let key = (item.kind.clone(), item.name.clone());
                self.changes += 1;
                if kind == Type::Put {
                    self.items.insert(key, item.resource.clone()) != Some(item.resource.clone())
                } else {
                    self.items.remove(&key).is_some()
                }
            }
            Type::Keepalive => false,
            Type::Unspecified => return Err(WatchError::UnknownType(ev.r#type)),
        };
        if !ev.cursor.is_empty() {
            self.cursor.clone_from(&ev.cursor);
        }
        self.events += 1;
        Ok(changed)
    }

    /// Where a new stream resumes (empty before the first snapshot).
    pub fn cursor(&self) -> &str {
        &self.cursor
    }

    /// The items of `kind`: (name, JSON document), by name.
    pub fn of<'a>(&'a self, kind: &'a str) -> impl Iterator<Item = (&'a str, &'a str)> + 'a {
        self.items
            .iter()
            .filter(move |((k, _), _)| k == kind)
            .map(|((_, n), doc)| (n.as_str(), doc.as_str()))
    }

    /// Every item: ((kind, name), JSON document).
    pub fn items(&self) -> &BTreeMap<(String, String), String> {
        &self.items
    }
}

/// Follow the watch stream of `kinds` for ever: connect with the endpoint `endpoint` gives at
/// the time, resume from the cache's cursor after a cut, back off while Auth is away. Each
/// applied event that changed something calls `changed` with the cache (under its lock).
pub async fn follow<E, F>(
    endpoint: E,
    kinds: Vec<String>,
    cache: std::sync::Arc<std::sync::Mutex<WatchCache>>,
    changed: F,
) where
    E: Fn() -> Option<AuthEndpoint>,
    F: FnMut(&WatchCache),
{
    follow_with(endpoint, None, kinds, cache, changed).await;
}

/// [`follow`], with `setup` applied to each TCP socket it opens (e.g. congestion control).
pub async fn follow_with<E, F>(
    endpoint: E,
    setup: Option<crate::client::SocketSetup>,
    kinds: Vec<String>,
    cache: std::sync::Arc<std::sync::Mutex<WatchCache>>,
    mut changed: F,
) where
    E: Fn() -> Option<AuthEndpoint>,
    F: FnMut(&WatchCache),
{
    follow_each(endpoint, setup, kinds, cache, |c, did_change| {
        if did_change {
            changed(c);
        }
    })
    .await;
}

/// Follow the locks (and the cluster's locking mode) into `view` for ever: every event heard,
/// keepalives included, marks the view fresh; a change of the locks calls `changed` with the
/// new view (to end what the locks now stop).
pub async fn follow_locks<E, F>(
    endpoint: E,
    setup: Option<crate::client::SocketSetup>,
    view: std::sync::Arc<arc_swap::ArcSwap<crate::locks::LockView>>,
    mut changed: F,
) where
    E: Fn() -> Option<AuthEndpoint>,
    F: FnMut(&crate::locks::LockView),
{
    let cache = std::sync::Arc::new(std::sync::Mutex::new(WatchCache::default()));
    let kinds = vec!["lock".to_owned(), "cluster_settings".to_owned()];
    let stale_after = crate::locks::stale_after_from_env();
    follow_each(endpoint, setup, kinds, cache, |c, did_change| {
        let mut next = (**view.load()).clone();
        next.heard_at = Some(time::OffsetDateTime::now_utc().unix_timestamp());
        next.stale_after = stale_after;
        if did_change {
            next.locks = crate::locks::LockSet::from_documents(c.of("lock").map(|(_, doc)| doc));
            next.mode = c
                .of("cluster_settings")
                .filter_map(|(_, doc)| serde_json::from_str::<serde_json::Value>(doc).ok())
                .find_map(|v| serde_json::from_value(v.get("locking_mode")?.clone()).ok())
                .unwrap_or_default();
        }
        let next = std::sync::Arc::new(next);
        view.store(std::sync::Arc::clone(&next));
        if did_change {
            changed(&next);
        }
    })
    .await;
}

/// The loop under [`follow_with`]: `each` is called for every event applied, with whether it
/// changed an item.
pub async fn follow_each<E, F>(
    endpoint: E,
    setup: Option<crate::client::SocketSetup>,
    kinds: Vec<String>,
    cache: std::sync::Arc<std::sync::Mutex<WatchCache>>,
    mut each: F,
) where
    E: Fn() -> Option<AuthEndpoint>,
    F: FnMut(&WatchCache, bool),
{
    let mut wait = Duration::from_millis(200);
    loop {
        let resume = cache.lock().map(|c| c.cursor.clone()).unwrap_or_default();
        let outcome = async {
            let endpoint = endpoint().ok_or_else(|| "no Auth endpoint".to_owned())?;
            let connected = match &setup {
                Some(s) => endpoint.connect_with(std::sync::Arc::clone(s)).await,
                None => endpoint.connect().await,
            };
            let mut client = connected.map_err(|e| e.to_string())?;
            let mut stream = client
                .watch(proto::WatchRequest {
                    kinds: kinds.clone(),
                    resume,
                })
                .await
                .map_err(|s| s.message().to_owned())?
                .into_inner();
            loop {
                let next = tokio::time::timeout(SILENCE_LIMIT, stream.message()).await;
                let ev = match next {
                    Err(_) => return Err(format!("no event for {SILENCE_LIMIT:?}")),
                    Ok(Err(status)) => return Err(status.message().to_owned()),
                    Ok(Ok(None)) => return Err("Auth ended the stream".to_owned()),
                    Ok(Ok(Some(ev))) => ev,
                };
                let mut c = cache
                    .lock()
                    .map_err(|_| "the watch cache is poisoned".to_owned())?;
                match c.apply(&ev) {
                    Ok(did_change) => each(&c, did_change),
                    Err(e) => return Err(e.to_string()),
                }
                // A stream that delivered something is a success: the backoff starts over.
                wait = Duration::from_millis(200);
            }
            #[allow(unreachable_code)]
            Ok::<(), String>(())
        }
        .await;
        if let Err(reason) = outcome {
            tracing::warn!(%reason, retry_in = ?wait, "watch: stream from Auth lost; resuming");
        }
        tokio::time::sleep(wait).await;
        wait = (wait * 2).min(Duration::from_secs(10));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(t: Type, items: &[(&str, &str, &str)], cursor: &str) -> proto::WatchEvent {
        proto::WatchEvent {
            r#type: t as i32,
            items: items
                .iter()
                .map(|(k, n, r)| proto::WatchItem {
                    kind: (*k).into(),
                    name: (*n).into(),
                    resource: (*r).into(),
                })
                .collect(),
            cursor: cursor.into(),
        }
    }

    #[test]
    fn snapshot_then_changes_then_a_new_snapshot_replaces_all() {
        let mut c = WatchCache::default();
        assert_eq!(
            c.apply(&ev(Type::Put, &[("proxy", "a", "{}")], "e:1")),
            Err(WatchError::NoSnapshot)
        );
        assert_eq!(
            c.apply(&ev(
                Type::Snapshot,
                &[("proxy", "a", "1"), ("role", "r", "x")],
                "e:0"
            )),
            Ok(true)
        );
        assert_eq!(c.cursor(), "e:0");
        assert_eq!(
            c.apply(&ev(Type::Put, &[("proxy", "b", "2")], "e:1")),
            Ok(true)
        );
        assert_eq!(
            c.apply(&ev(Type::Put, &[("proxy", "b", "2")], "e:2")),
            Ok(false)
        );
        assert_eq!(
            c.apply(&ev(Type::Delete, &[("proxy", "a", "")], "e:3")),
            Ok(true)
        );
        assert_eq!(c.apply(&ev(Type::Keepalive, &[], "e:3")), Ok(false));
        assert_eq!(c.of("proxy").collect::<Vec<_>>(), [("b", "2")]);
        assert_eq!(c.cursor(), "e:3");
        assert_eq!(
            c.apply(&ev(Type::Snapshot, &[("proxy", "z", "9")], "f:0")),
            Ok(true)
        );
        assert_eq!(c.items().len(), 1);
        assert_eq!((c.snapshots, c.changes), (2, 3));
    }

    #[test]
    fn malformed_events_change_nothing() {
        let mut c = WatchCache::default();
        c.apply(&ev(Type::Snapshot, &[("proxy", "a", "1")], "e:0"))
            .unwrap();
        let before = c.clone();
        assert!(c.apply(&ev(Type::Put, &[], "e:1")).is_err());
        assert!(
            c.apply(&ev(
                Type::Delete,
                &[("proxy", "a", ""), ("proxy", "b", "")],
                "e:1"
            ))
            .is_err()
        );
        let mut unknown = ev(Type::Put, &[("proxy", "a", "2")], "e:1");
        unknown.r#type = 99;
        assert!(c.apply(&unknown).is_err());
        assert_eq!(c, before);
    }
}
