//! Which tunnel serves a target. Pure: a table of live tunnels in, a route or a clear error out.
//! The Proxy keeps one table shared by all cores, replaced copy-on-write when tunnels come, go,
//! or change their inventory, with the changes a worker made in one tick applied together
//! (read-mostly: sessions only read it).

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

/// A tunnel's identity and inventory, as the table holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TunnelEntry {
    /// Unique per proxy process, increasing: newer tunnels of the same host win.
    pub tunnel_id: u64,
    /// The worker (core) that owns the tunnel.
    pub core: usize,
    pub host_id: String,
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub apps: Vec<String>,
}

/// One change to a [`RouteTable`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RouteChange {
    /// A tunnel came, or its inventory changed (by tunnel id).
    Upsert(Arc<TunnelEntry>),
    /// A tunnel went.
    Remove(u64),
}

/// Inventory an agent sends in its heartbeats.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Inventory {
    pub host_id: String,
    pub name: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub addresses: Vec<String>,
    /// Services: `ssh`, and `tcp:NAME` per app.
    #[serde(default)]
    pub services: Vec<String>,
    /// App name → the app's labels (what roles' `app_labels` match).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub app_labels: BTreeMap<String, BTreeMap<String, String>>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RouteError {
    #[error("no node matches `{target}`{}", candidates_hint(.candidates))]
    Unknown {
        target: String,
        candidates: Vec<String>,
    },
    #[error("`{target}` matches {} nodes: {}; use a host id or more labels", .candidates.len(), .candidates.join(", "))]
    Ambiguous {
        target: String,
        candidates: Vec<String>,
    },
    #[error("no app named `{app}`{}", candidates_hint(.candidates))]
    UnknownApp {
        app: String,
        candidates: Vec<String>,
    },
    #[error("app `{app}` is served by {} nodes: {}; pick one with APP@NODE", .candidates.len(), .candidates.join(", "))]
    AmbiguousApp {
        app: String,
        candidates: Vec<String>,
    },
    #[error(
        "invalid target `{0}`: expected a node name, a host id, or labels like env=prod,team=db"
    )]
    Invalid(String),
}

fn candidates_hint(c: &[String]) -> String {
    if c.is_empty() {
        "; no nodes are connected".to_string()
    } else {
        format!("; connected nodes: {}", c.join(", "))
    }
}

/// Tunnels by id, the tunnels of each host (its newest serves it), and indexes from node name,
/// app and label to the tunnels that carry them, so no lookup walks the fleet.
/// Persistent maps (imbl): a copy shares structure with the original, so the copy-on-write update
/// of a table of 15k tunnels costs O(log n), not a full clone. An update copies the map nodes on
/// its path, and a node holds up to 32 slots, so what a slot holds is shared, not cloned: entries
/// behind an `Arc`, keys as `Arc<str>` (with entries inline, a node copy cloned 32 entries'
/// strings, label maps and app lists, and the old table's drop freed them again: ≈ 30 % of the
/// proxy's CPU while 15,000 agents connected and left).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RouteTable {
    entries: imbl::HashMap<u64, Arc<TunnelEntry>>,
    /// host id → its tunnels (the newest, the largest id, serves it).
    hosts: imbl::HashMap<Arc<str>, imbl::OrdSet<u64>>,
    /// node name → the tunnels that carry it, and app name → the tunnels whose inventory lists
    /// it. Both index tunnels, not hosts: a host's tunnels may briefly disagree (a reconnect
    /// after a rename), and its newest tunnel decides.
    names: imbl::HashMap<Arc<str>, imbl::OrdSet<u64>>,
    apps: imbl::HashMap<Arc<str>, imbl::OrdSet<u64>>,
    /// `key\0value` → the tunnels carrying that label: a selector starts from its rarest label.
    labels: imbl::HashMap<Arc<str>, imbl::OrdSet<u64>>,
}

/// The `labels` index's key for one label.
fn label_key(k: &str, v: &str) -> String {
    format!("{k}\0{v}")
}

/// `index[key]` with `value` added.
fn index_add<V: Ord + Clone>(
    index: &mut imbl::HashMap<Arc<str>, imbl::OrdSet<V>>,
    key: &str,
    value: V,
) {
    match index.get_mut(key) {
        Some(set) => {
            set.insert(value);
        }
        None => {
            index.insert(Arc::from(key), imbl::OrdSet::unit(value));
        }
    }
}

/// `index[key]` without `value`; a key whose set empties goes. Whether `key` is gone.
fn index_remove<V: Ord + Clone>(
    index: &mut imbl::HashMap<Arc<str>, imbl::OrdSet<V>>,
    key: &str,
    value: &V,
) -> bool {
    let Some(set) = index.get_mut(key) else {
        return true;
    };
    set.remove(value);
    if set.is_empty() {
        index.remove(key);
        return true;
    }
    false
}

fn label(e: &TunnelEntry) -> String {
    if e.name.is_empty() {
        e.host_id.clone()
    } else {
        format!("{} ({})", e.name, e.host_id)
    }
}

/// The host id a trusted leaf cluster's tunnel is filed under: never a node's (those are the
/// names in agents' certificates, which cannot contain `/`), never resolved as one.
pub(crate) fn leaf_host_id(cluster: &str) -> String {
    format!("{LEAF_PREFIX}{cluster}")
}

const LEAF_PREFIX: &str = "cluster/";

impl RouteTable {
    /// The newest tunnel of the leaf cluster `cluster` (its proxies dial this one).
    pub fn resolve_cluster(&self, cluster: &str) -> Option<&TunnelEntry> {
        self.newest(&leaf_host_id(cluster))
    }

    fn newest(&self, host_id: &str) -> Option<&TunnelEntry> {
        self.hosts
            .get(host_id)
            .and_then(|ids| ids.get_max())
            .and_then(|id| self.get(*id))
    }

    /// A copy with `entry` added or replaced (by tunnel id).
    #[cfg(test)]
    pub fn with(&self, entry: TunnelEntry) -> Self {
        let mut t = self.clone();
        t.apply(&RouteChange::Upsert(Arc::new(entry)));
        t
    }

    /// A copy without the tunnel `tunnel_id`.
    #[cfg(test)]
    pub fn without(&self, tunnel_id: u64) -> Self {
        let mut t = self.clone();
        t.apply(&RouteChange::Remove(tunnel_id));
        t
    }

    /// Make `change` in place. Of the nodes this table shares with its copies, the ones on the
    /// change's path are copied the first time a change touches them and written in place after
    /// that: a batch of changes to one copy costs far less than one copy per change.
    pub fn apply(&mut self, change: &RouteChange) {
        match change {
            RouteChange::Upsert(entry) => {
                let old = self.entries.insert(entry.tunnel_id, Arc::clone(entry));
                // The same tunnel with a new inventory: only what changed moves in the
                // indexes (an index left alone is not copied).
                let was = |f: &dyn Fn(&TunnelEntry) -> bool| old.as_deref().is_some_and(f);
                if !was(&|o| o.host_id == entry.host_id) {
                    if let Some(o) = &old {
                        index_remove(&mut self.hosts, &o.host_id, &o.tunnel_id);
                    }
                    index_add(&mut self.hosts, &entry.host_id, entry.tunnel_id);
                }
                if !was(&|o| o.name == entry.name) {
                    if let Some(o) = &old {
                        index_remove(&mut self.names, &o.name, &o.tunnel_id);
                    }
                    if !entry.name.is_empty() {
                        index_add(&mut self.names, &entry.name, entry.tunnel_id);
                    }
                }
                let id = entry.tunnel_id;
                for app in old.iter().flat_map(|o| &o.apps) {
                    if !entry.apps.contains(app) {
                        index_remove(&mut self.apps, app, &id);
                    }
                }
                for app in &entry.apps {
                    if !was(&|o| o.apps.contains(app)) {
                        index_add(&mut self.apps, app, id);
                    }
                }
                for (k, v) in old.iter().flat_map(|o| &o.labels) {
                    if entry.labels.get(k) != Some(v) {
                        index_remove(&mut self.labels, &label_key(k, v), &id);
                    }
                }
                for (k, v) in &entry.labels {
                    if !was(&|o| o.labels.get(k) == Some(v)) {
                        index_add(&mut self.labels, &label_key(k, v), id);
                    }
                }
            }
            RouteChange::Remove(tunnel_id) => {
                if let Some(old) = self.entries.remove(tunnel_id) {
                    index_remove(&mut self.hosts, &old.host_id, tunnel_id);
                    self.unindex(&old);
                }
            }
        }
    }

    /// Drop what `old` put in the name, app and label indexes.
    fn unindex(&mut self, old: &TunnelEntry) {
        index_remove(&mut self.names, &old.name, &old.tunnel_id);
        for app in &old.apps {
            index_remove(&mut self.apps, app, &old.tunnel_id);
        }
        for (k, v) in &old.labels {
            index_remove(&mut self.labels, &label_key(k, v), &old.tunnel_id);
        }
    }

    /// The hosts of `tunnels` (in host id order), each by its newest tunnel, where that one
    /// passes `keep`.
    fn newest_of<'a>(
        &'a self,
        tunnels: Option<&imbl::OrdSet<u64>>,
        keep: impl Fn(&TunnelEntry) -> bool,
    ) -> Vec<&'a TunnelEntry> {
        let mut hosts: Vec<&str> = tunnels
            .into_iter()
            .flatten()
            .filter_map(|id| self.get(*id))
            .map(|e| e.host_id.as_str())
            .collect();
        hosts.sort_unstable();
        hosts.dedup();
        hosts
            .into_iter()
            .filter_map(|h| self.newest(h))
            .filter(|e| keep(e))
            .collect()
    }

    pub fn get(&self, tunnel_id: u64) -> Option<&TunnelEntry> {
        self.entries.get(&tunnel_id).map(|e| &**e)
    }

    /// The newest tunnel per host (a reconnecting agent briefly has two); leaf clusters' tunnels
    /// are not nodes.
    fn live(&self) -> Vec<&TunnelEntry> {
        let mut v: Vec<&TunnelEntry> = self
            .hosts
            .keys()
            .filter(|h| !h.starts_with(LEAF_PREFIX))
            .filter_map(|h| self.newest(h))
            .collect();
        v.sort_by(|a, b| a.host_id.cmp(&b.host_id));
        v
    }

    fn all_names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.live().into_iter().map(label).take(50).collect();
        names.sort();
        names
    }

    /// Resolve a node target: a host id, a node name, or a label selector `k=v[,k=v]`.
    pub fn resolve_node(&self, target: &str) -> Result<&TunnelEntry, RouteError> {
        let target = target.trim();
        if target.is_empty() || target.len() > 512 {
            return Err(RouteError::Invalid(target.to_owned()));
        }
        let matches: Vec<&TunnelEntry> = if target.contains('=') {
            let mut selector = Vec::new();
            for pair in target.split(',') {
                let (k, v) = pair
                    .split_once('=')
                    .ok_or_else(|| RouteError::Invalid(target.to_owned()))?;
                if k.trim().is_empty() {
                    return Err(RouteError::Invalid(target.to_owned()));
                }
                selector.push((k.trim(), v.trim()));
            }
            // The tunnels of the selector's rarest label, from the index (a label nobody has:
            // no match); each host's newest tunnel must carry every label.
            let mut rarest: Option<&imbl::OrdSet<u64>> = None;
            for (k, v) in &selector {
                match self.labels.get(label_key(k, v).as_str()) {
                    None => {
                        rarest = None;
                        break;
                    }
                    Some(set) if rarest.is_none_or(|r| set.len() < r.len()) => rarest = Some(set),
                    Some(_) => {}
                }
            }
            self.newest_of(rarest, |e| {
                selector
                    .iter()
                    .all(|(k, v)| e.labels.get(*k).map(String::as_str) == Some(*v))
            })
        } else if target.starts_with(LEAF_PREFIX) {
            vec![]
        } else {
            match self.newest(target) {
                Some(e) => vec![e],
                None => self.newest_of(self.names.get(target), |e| e.name == target),
            }
        };
        match matches.as_slice() {
            [one] => Ok(one),
            [] => Err(RouteError::Unknown {
                target: target.to_owned(),
                candidates: self.all_names(),
            }),
            many => Err(RouteError::Ambiguous {
                target: target.to_owned(),
                candidates: many.iter().map(|e| label(e)).collect(),
            }),
        }
    }

    /// Resolve an app: `NAME` (served by exactly one node) or `NAME@NODE`.
    pub fn resolve_app(&self, app: &str) -> Result<(&TunnelEntry, String), RouteError> {
        let (name, node) = match app.split_once('@') {
            Some((a, n)) => (a, Some(n)),
            None => (app, None),
        };
        let serving: Vec<&TunnelEntry> = match node {
            Some(n) => vec![self.resolve_node(n)?],
            // From the index, not a scan of the fleet.
            None => self.newest_of(self.apps.get(name), |_| true),
        }
        .into_iter()
        .filter(|e| e.apps.iter().any(|a| a == name))
        .collect();
        match serving.as_slice() {
            [one] => Ok((one, name.to_owned())),
            [] => {
                let mut all: Vec<String> = self
                    .live()
                    .iter()
                    .flat_map(|e| e.apps.iter().map(move |a| format!("{a}@{}", e.name)))
                    .collect();
                all.sort();
                Err(RouteError::UnknownApp {
                    app: app.to_owned(),
                    candidates: all,
                })
            }
            many => Err(RouteError::AmbiguousApp {
                app: app.to_owned(),
                candidates: many.iter().map(|e| label(e)).collect(),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(
        id: u64,
        host: &str,
        name: &str,
        labels: &[(&str, &str)],
        apps: &[&str],
    ) -> TunnelEntry {
        TunnelEntry {
            tunnel_id: id,
            core: 0,
            host_id: host.into(),
            name: name.into(),
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            apps: apps.iter().map(|s| s.to_string()).collect(),
        }
    }

    fn table() -> RouteTable {
        RouteTable::default()
            .with(entry(
                1,
                "h-1",
                "web1",
                &[("env", "prod"), ("role", "web")],
                &["api"],
            ))
            .with(entry(
                2,
                "h-2",
                "web2",
                &[("env", "prod"), ("role", "web")],
                &["api", "admin"],
            ))
            .with(entry(
                3,
                "h-3",
                "db1",
                &[("env", "prod"), ("role", "db")],
                &[],
            ))
            .with(entry(4, "h-4", "dup", &[], &[]))
            .with(entry(5, "h-5", "dup", &[], &[]))
    }

    #[test]
    fn by_name_host_id_and_labels() {
        let t = table();
        assert_eq!(t.resolve_node("web1").unwrap().host_id, "h-1");
        assert_eq!(t.resolve_node("h-2").unwrap().name, "web2");
        assert_eq!(t.resolve_node("role=db").unwrap().name, "db1");
        assert_eq!(t.resolve_node("env=prod, role=db").unwrap().name, "db1");
    }

    #[test]
    fn ambiguous_and_unknown_name_the_candidates() {
        let t = table();
        let err = t.resolve_node("role=web").unwrap_err();
        assert!(
            matches!(&err, RouteError::Ambiguous { candidates, .. } if candidates.len() == 2),
            "{err}"
        );
        assert!(
            err.to_string().contains("web1 (h-1)") && err.to_string().contains("web2 (h-2)"),
            "{err}"
        );
        let err = t.resolve_node("dup").unwrap_err();
        assert!(matches!(err, RouteError::Ambiguous { .. }));
        let err = t.resolve_node("web9").unwrap_err();
        assert!(
            err.to_string().contains("connected nodes: db1 (h-3)"),
            "{err}"
        );
        assert!(
            RouteTable::default()
                .resolve_node("x")
                .unwrap_err()
                .to_string()
                .contains("no nodes are connected")
        );
        assert!(matches!(t.resolve_node("=x"), Err(RouteError::Invalid(_))));
    }

    #[test]
    fn the_newest_tunnel_of_a_host_wins() {
        let t = table().with(entry(9, "h-1", "web1", &[("env", "prod")], &[]));
        assert_eq!(t.resolve_node("web1").unwrap().tunnel_id, 9);
        let t = t.without(9);
        assert_eq!(t.resolve_node("web1").unwrap().tunnel_id, 1);
    }

    #[test]
    fn a_leaf_clusters_tunnel_is_no_node() {
        let t = table().with(entry(90, &leaf_host_id("leaf"), "", &[], &[]));
        assert_eq!(t.resolve_cluster("leaf").map(|e| e.tunnel_id), Some(90));
        assert!(t.resolve_cluster("other").is_none());
        assert!(t.resolve_node("cluster/leaf").is_err());
        match t.resolve_node("nothing-here") {
            Err(RouteError::Unknown { candidates, .. }) => {
                assert!(
                    candidates.iter().all(|c| !c.contains("cluster/")),
                    "{candidates:?}"
                )
            }
            other => panic!("{other:?}"),
        }
        assert!(t.without(90).resolve_cluster("leaf").is_none());
    }

    #[test]
    fn apps() {
        let t = table();
        assert_eq!(t.resolve_app("admin").unwrap().0.name, "web2");
        assert!(matches!(
            t.resolve_app("api"),
            Err(RouteError::AmbiguousApp { .. })
        ));
        assert_eq!(t.resolve_app("api@web1").unwrap().0.name, "web1");
        let err = t.resolve_app("nope").unwrap_err();
        assert!(err.to_string().contains("admin@web2"), "{err}");
    }

    #[test]
    fn an_inventory_update_moves_names_and_apps() {
        let t = table().with(entry(2, "h-2", "web3", &[], &["api"]));
        assert!(matches!(
            t.resolve_node("web2"),
            Err(RouteError::Unknown { .. })
        ));
        assert_eq!(t.resolve_node("web3").unwrap().tunnel_id, 2);
        assert!(matches!(
            t.resolve_app("admin"),
            Err(RouteError::UnknownApp { .. })
        ));
        assert!(matches!(
            t.resolve_app("api"),
            Err(RouteError::AmbiguousApp { candidates, .. }) if candidates.len() == 2
        ));
        let t = t.without(1);
        assert_eq!(t.resolve_app("api").unwrap().0.name, "web3");
        let t = t.without(2);
        assert!(matches!(
            t.resolve_app("api"),
            Err(RouteError::UnknownApp { .. })
        ));
    }

    /// The indexes answer as a scan of every host's newest tunnel would, through random
    /// connects, inventory changes, reconnects and disconnects. The same changes published in
    /// batches of random size (applied in place to a copy of the table readers hold, as the
    /// proxy's workers do) give the same table, and leave what readers hold as it was; the
    /// indexes always equal ones built afresh from the entries.
    #[test]
    fn indexes_agree_with_a_scan_of_the_table() {
        let mut rng = 0x9e37_79b9_7f4a_7c15_u64;
        let mut next = move |n: u64| {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng % n
        };
        let names = ["a", "b", "c", "d"];
        let apps = ["x", "y", "z"];
        let mut t = RouteTable::default();
        let mut ids: Vec<u64> = Vec::new();
        let mut published = RouteTable::default();
        let mut batch: Vec<RouteChange> = Vec::new();
        for id in 1..=3_000u64 {
            if next(3) == 0 && !ids.is_empty() {
                let gone = ids.swap_remove(next(ids.len() as u64) as usize);
                t = t.without(gone);
                batch.push(RouteChange::Remove(gone));
            } else {
                // A new tunnel, or a heartbeat changing an existing one's inventory.
                let tunnel_id = match ids.get(next(4 * ids.len() as u64 + 1) as usize) {
                    Some(&existing) => existing,
                    None => {
                        ids.push(id);
                        id
                    }
                };
                let host = t
                    .get(tunnel_id)
                    .map(|e| e.host_id.clone())
                    .unwrap_or_else(|| format!("h-{}", next(40)));
                let served: Vec<&str> = apps.iter().copied().filter(|_| next(2) == 0).collect();
                let name = names[next(4) as usize];
                let labels: Vec<(&str, &str)> = [("env", ["prod", "dev"]), ("role", ["web", "db"])]
                    .into_iter()
                    .filter_map(|(k, vs)| {
                        let pick = next(6) as usize;
                        vs.get(pick).map(|v| (k, *v))
                    })
                    .collect();
                let e = entry(tunnel_id, &host, name, &labels, &served);
                batch.push(RouteChange::Upsert(Arc::new(e.clone())));
                t = t.with(e);
            }
            if next(6) == 0 {
                let held = published.clone();
                let before = format!("{held:?}");
                let mut next_table = published.clone();
                for c in batch.drain(..) {
                    next_table.apply(&c);
                }
                assert_eq!(
                    next_table, t,
                    "the batch gives the table one copy per change gives"
                );
                assert_eq!(
                    format!("{held:?}"),
                    before,
                    "a batch changed a table readers hold"
                );
                published = next_table;
                // The indexes hold exactly what the entries say: nothing left from an
                // inventory a tunnel no longer has.
                let mut fresh = RouteTable::default();
                for e in t.entries.values() {
                    fresh.apply(&RouteChange::Upsert(Arc::clone(e)));
                }
                assert_eq!(
                    fresh, t,
                    "the indexes differ from ones built from the entries"
                );
            }
            let live = t.live();
            for app in apps {
                let scan: Vec<&str> = live
                    .iter()
                    .filter(|e| e.apps.iter().any(|a| a == app))
                    .map(|e| e.host_id.as_str())
                    .collect();
                match (t.resolve_app(app), scan.as_slice()) {
                    (Ok((e, _)), [one]) => assert_eq!(e.host_id, *one),
                    (Err(RouteError::UnknownApp { .. }), []) => {}
                    (Err(RouteError::AmbiguousApp { candidates, .. }), many) => {
                        assert_eq!(candidates.len(), many.len())
                    }
                    (got, want) => panic!("app {app}: {got:?}, a scan says {want:?}"),
                }
            }
            for selector in ["env=prod", "role=db", "env=dev,role=web", "env=prod,role=x"] {
                let scan = live
                    .iter()
                    .filter(|e| {
                        selector.split(',').all(|kv| {
                            kv.split_once('=')
                                .is_some_and(|(k, v)| e.labels.get(k).is_some_and(|l| l == v))
                        })
                    })
                    .count();
                match (t.resolve_node(selector), scan) {
                    (Ok(_), 1) | (Err(RouteError::Unknown { .. }), 0) => {}
                    (Err(RouteError::Ambiguous { candidates, .. }), n) => {
                        assert_eq!(candidates.len(), n)
                    }
                    (got, want) => panic!("selector {selector}: {got:?}, a scan finds {want}"),
                }
            }
            for name in names {
                let scan = live.iter().filter(|e| e.name == name).count();
                match (t.resolve_node(name), scan) {
                    (Ok(e), 1) => assert_eq!(e.name, name),
                    (Err(RouteError::Unknown { .. }), 0) => {}
                    (Err(RouteError::Ambiguous { candidates, .. }), n) => {
                        assert_eq!(candidates.len(), n)
                    }
                    (got, want) => panic!("node {name}: {got:?}, a scan finds {want}"),
                }
            }
        }
    }
}
