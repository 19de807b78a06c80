//! Which tunnel serves a target. Pure: a table of live tunnels in, a route or a clear error out.
//! The Proxy keeps one table shared by all cores, replaced copy-on-write when a tunnel comes,
//! goes, or changes its inventory (read-mostly: sessions only read it).

use std::collections::BTreeMap;

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

/// Tunnels by id, plus the newest tunnel per host and the hosts per name. Persistent maps
/// (imbl): a copy shares structure with the original, so the copy-on-write update of a table of
/// 15k tunnels costs O(log n), not a full clone.
#[derive(Debug, Clone, Default)]
pub struct RouteTable {
    entries: imbl::HashMap<u64, TunnelEntry>,
    /// host id → its tunnels (the newest, the largest id, serves it).
    hosts: imbl::HashMap<String, imbl::OrdSet<u64>>,
    /// node name → host ids.
    names: imbl::HashMap<String, imbl::OrdSet<String>>,
}

fn label(e: &TunnelEntry) -> String {
    if e.name.is_empty() {
        e.host_id.clone()
    } else {
        format!("{} ({})", e.name, e.host_id)
    }
}

impl RouteTable {
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    fn newest(&self, host_id: &str) -> Option<&TunnelEntry> {
        self.hosts
            .get(host_id)
            .and_then(|ids| ids.get_max())
            .and_then(|id| self.entries.get(id))
    }

    fn unname(&mut self, name: &str, host_id: &str) {
        if let Some(set) = self.names.get(name) {
            let set = set.without(host_id);
            if set.is_empty() {
                self.names.remove(name);
            } else {
                self.names.insert(name.to_owned(), set);
            }
        }
    }

    /// A copy with `entry` added or replaced (by tunnel id).
    pub fn with(&self, entry: TunnelEntry) -> Self {
        let mut t = self.clone();
        if let Some(old) = t.entries.insert(entry.tunnel_id, entry.clone())
            && old.name != entry.name
        {
            t.unname(&old.name, &old.host_id);
        }
        let ids = t
            .hosts
            .get(&entry.host_id)
            .cloned()
            .unwrap_or_default()
            .update(entry.tunnel_id);
        t.hosts.insert(entry.host_id.clone(), ids);
        if !entry.name.is_empty() {
            let set = t
                .names
                .get(&entry.name)
                .cloned()
                .unwrap_or_default()
                .update(entry.host_id.clone());
            t.names.insert(entry.name.clone(), set);
        }
        t
    }

    pub fn without(&self, tunnel_id: u64) -> Self {
        let mut t = self.clone();
        if let Some(old) = t.entries.remove(&tunnel_id) {
            let ids = t
                .hosts
                .get(&old.host_id)
                .cloned()
                .unwrap_or_default()
                .without(&tunnel_id);
            if ids.is_empty() {
                t.hosts.remove(&old.host_id);
                t.unname(&old.name, &old.host_id);
            } else {
                t.hosts.insert(old.host_id.clone(), ids);
            }
        }
        t
    }

    pub fn get(&self, tunnel_id: u64) -> Option<&TunnelEntry> {
        self.entries.get(&tunnel_id)
    }

    /// The newest tunnel per host (a reconnecting agent briefly has two).
    fn live(&self) -> Vec<&TunnelEntry> {
        let mut v: Vec<&TunnelEntry> = self.hosts.keys().filter_map(|h| self.newest(h)).collect();
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
        let live = if target.contains('=') {
            self.live()
        } else {
            Vec::new()
        };
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
            live.into_iter()
                .filter(|e| {
                    selector
                        .iter()
                        .all(|(k, v)| e.labels.get(*k).map(String::as_str) == Some(*v))
                })
                .collect()
        } else {
            drop(live);
            match self.newest(target) {
                Some(e) => vec![e],
                None => self
                    .names
                    .get(target)
                    .map(|hosts| hosts.iter().filter_map(|h| self.newest(h)).collect())
                    .unwrap_or_default(),
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
            None => self.live(),
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
}
