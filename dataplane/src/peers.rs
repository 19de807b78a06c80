//! The proxy's place among the cluster's proxies: it announces itself to Auth every few
//! seconds (`HeartbeatProxy`: the address agents dial, a 30 s lifetime) and follows Auth's
//! watch stream for the others, so that its agents keep a tunnel to every live proxy. What the
//! stream delivered stays cached while Auth is away: the proxy goes on announcing the proxies
//! it last knew, and entries expire only while the stream is alive.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use gatehouse_controlplane::client::AuthEndpoint;
use gatehouse_controlplane::proto;
use gatehouse_controlplane::watch::{WatchCache, follow};

use crate::proxy::ProxySet;

/// How often the proxy announces itself, and how long an announcement lives.
const ANNOUNCE_EVERY: Duration = Duration::from_secs(5);
const ANNOUNCE_TTL: u32 = 30;

/// The tasks that announce this proxy and follow the others.
#[derive(Debug)]
pub(crate) struct PeersHandle {
    announce: tokio::task::JoinHandle<()>,
    follow: tokio::task::JoinHandle<()>,
    endpoint: Arc<Mutex<AuthEndpoint>>,
}

impl PeersHandle {
    pub(crate) fn stop(&self) {
        self.announce.abort();
        self.follow.abort();
    }

    /// Remove this proxy from the cluster's set now (best effort, 2 s).
    pub(crate) async fn leave(&self) {
        self.announce.abort();
        let Some(endpoint) = self.endpoint.lock().ok().map(|e| e.clone()) else {
            return;
        };
        let leave = async {
            let mut c = endpoint.connect().await.ok()?;
            c.heartbeat_proxy(proto::HeartbeatProxyRequest {
                addr: String::new(),
                ttl_seconds: 0,
                leaving: true,
                leaves: vec![],
            })
            .await
            .ok()
        };
        if tokio::time::timeout(Duration::from_secs(2), leave)
            .await
            .ok()
            .flatten()
            .is_none()
        {
            tracing::warn!("proxy: could not tell Auth it is leaving; its entry expires by itself");
        }
    }
}

/// The live proxies' addresses in `cache` at `now` (unix seconds).
pub(crate) fn live_addrs(cache: &WatchCache, now: i64) -> Vec<String> {
    cache
        .of("proxy")
        .filter_map(|(_, doc)| serde_json::from_str::<serde_json::Value>(doc).ok())
        .filter(|v| {
            v.get("expires")
                .and_then(serde_json::Value::as_i64)
                .unwrap_or(0)
                > now
        })
        .filter_map(|v| v.get("addr").and_then(|a| a.as_str()).map(str::to_owned))
        .collect()
}

fn unix_now() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp()
}

/// What the watch stream keeps current on this proxy.
pub(crate) struct Shared {
    pub(crate) proxies: Arc<ProxySet>,
    pub(crate) metrics: Arc<crate::proxy::ProxyMetrics>,
    pub(crate) leaves: Arc<crate::proxy::Leaves>,
    pub(crate) verifier: Arc<gatehouse_controlplane::leaf_trust::ClusterClientVerifier>,
    /// Wakes the certificate renewal (the X.509 CA changed).
    pub(crate) renew_now: Arc<tokio::sync::Notify>,
    /// The roots this (leaf) cluster trusts: the leaf links dial them; and their role maps.
    pub(crate) roots: tokio::sync::watch::Sender<Vec<crate::leaf_link::RootTarget>>,
    pub(crate) role_maps: crate::leaf_link::RoleMaps,
    /// The host CA keys SSH clients are told.
    pub(crate) host_cas: Arc<crate::proxy::HostCas>,
}

/// The role maps of the roots in `cache`.
fn role_maps(
    cache: &WatchCache,
) -> std::collections::BTreeMap<String, gatehouse_controlplane::role_map::RoleMap> {
    cache
        .of("trusted_cluster")
        .filter_map(|(name, doc)| {
            let v: serde_json::Value = serde_json::from_str(doc).ok()?;
            (v.get("side")?.as_str()? == "root").then_some(())?;
            let mappings: Vec<gatehouse_controlplane::role_map::RoleMapping> =
                serde_json::from_value(v.get("spec")?.get("role_map")?.clone()).ok()?;
            let map = gatehouse_controlplane::role_map::RoleMap::compile(&mappings).ok()?;
            Some((name.to_owned(), map))
        })
        .collect()
}

/// The roots in `cache` (records of side `root`).
pub(crate) fn trusted_roots(cache: &WatchCache) -> Vec<crate::leaf_link::RootTarget> {
    cache
        .of("trusted_cluster")
        .filter_map(|(name, doc)| {
            let v: serde_json::Value = serde_json::from_str(doc).ok()?;
            (v.get("side")?.as_str()? == "root").then_some(())?;
            let spec = v.get("spec")?;
            Some(crate::leaf_link::RootTarget {
                name: name.to_owned(),
                proxy_addr: spec.get("proxy_addr")?.as_str()?.to_owned(),
                ca_pem: spec.get("tls_ca_pem")?.as_str()?.to_owned(),
            })
        })
        .collect()
}

/// Trusted leaves in `cache` (records of side `leaf`): (name, X.509 CA PEM).
pub(crate) fn trusted_leaves(cache: &WatchCache) -> Vec<(String, String)> {
    cache
        .of("trusted_cluster")
        .filter_map(|(name, doc)| {
            let v: serde_json::Value = serde_json::from_str(doc).ok()?;
            (v.get("side")?.as_str()? == "leaf").then_some(())?;
            let pem = v.get("spec")?.get("tls_ca_pem")?.as_str()?;
            Some((name.to_owned(), pem.to_owned()))
        })
        .collect()
}

/// Apply what the cache holds: the proxies to announce, the leaves to trust.
fn apply(cache: &WatchCache, now: i64, shared: &Shared, endpoint: &Mutex<AuthEndpoint>) {
    let lags = endpoint
        .lock()
        .ok()
        .is_some_and(|e| match (&e.identity, &e.trust) {
            (Some((cert, _)), gatehouse_controlplane::tls::Trust::CaPem(trusted)) => cache
                .of("cert_authority")
                .find(|(n, _)| *n == "tls")
                .is_some_and(|(_, doc)| {
                    gatehouse_controlplane::tls_authority::lags(doc, cert, trusted)
                }),
            _ => false,
        });
    if lags {
        shared.renew_now.notify_one();
    }
    shared.proxies.set(live_addrs(cache, now));
    if let Some(host) = cache
        .of("cert_authority")
        .find(|(n, _)| *n == "host")
        .and_then(|(_, doc)| serde_json::from_str::<serde_json::Value>(doc).ok())
    {
        let keys: Vec<String> = host
            .get("ssh_public_keys")
            .and_then(|k| serde_json::from_value(k.clone()).ok())
            .unwrap_or_default();
        let until = host
            .get("previous_until")
            .and_then(serde_json::Value::as_i64)
            .unwrap_or(0);
        shared.host_cas.set(keys, until);
    }
    let leaves = trusted_leaves(cache);
    if let Err(e) = shared.verifier.set_leaves(&leaves) {
        tracing::warn!(error = %e, "proxy: a trusted leaf's CA cannot be used");
    }
    shared
        .leaves
        .set_trusted(leaves.into_iter().map(|(name, _)| name));
    if let Ok(mut m) = shared.role_maps.lock() {
        *m = role_maps(cache);
    }
    let roots = trusted_roots(cache);
    shared.roots.send_if_modified(|known| {
        let new = *known != roots;
        if new {
            *known = roots;
        }
        new
    });
}

pub(crate) fn start(
    advertise: String,
    endpoint: Arc<Mutex<AuthEndpoint>>,
    shared: Shared,
) -> PeersHandle {
    let shared = Arc::new(shared);
    let proxies = Arc::clone(&shared.proxies);
    let metrics = Arc::clone(&shared.metrics);
    let cache = Arc::new(Mutex::new(WatchCache::default()));
    let announce = {
        let (endpoint, cache, proxies, held) = (
            Arc::clone(&endpoint),
            Arc::clone(&cache),
            Arc::clone(&proxies),
            Arc::clone(&shared.leaves),
        );
        tokio::spawn(async move {
            let mut client = None;
            let (mut heard, mut alive_at) = (0, unix_now());
            let mut tick = tokio::time::interval(ANNOUNCE_EVERY);
            loop {
                tick.tick().await;
                if client.is_none() {
                    let e = endpoint.lock().ok().map(|e| e.clone());
                    if let Some(e) = e {
                        client = e.connect().await.ok();
                    }
                }
                if let Some(c) = client.as_mut() {
                    let sent = c
                        .heartbeat_proxy(proto::HeartbeatProxyRequest {
                            addr: advertise.clone(),
                            ttl_seconds: ANNOUNCE_TTL,
                            leaving: false,
                            leaves: held.held(),
                        })
                        .await;
                    if let Err(e) = sent {
                        tracing::warn!(error = %e.message(), "proxy: cannot announce itself to Auth; will retry");
                        client = None;
                    }
                }
                // Entries expire without an event: look again at each tick. Only while the
                // stream is alive (it delivers a keepalive every 5 s): while Auth is away, the
                // proxies last known stay announced.
                if let Ok(c) = cache.lock() {
                    if c.events != heard {
                        heard = c.events;
                        alive_at = unix_now();
                    }
                    let live = live_addrs(&c, alive_at);
                    metrics.cluster_proxies.set(live.len() as i64);
                    let silent = unix_now() - alive_at;
                    let up = c.snapshots > 0
                        && silent < gatehouse_controlplane::watch::SILENCE_LIMIT.as_secs() as i64;
                    metrics.auth_stream_up.set(i64::from(up));
                    proxies.set(live);
                }
            }
        })
    };
    let follow = {
        let (endpoint, applying) = (Arc::clone(&endpoint), Arc::clone(&endpoint));
        tokio::spawn(follow(
            move || endpoint.lock().ok().map(|e| e.clone()),
            vec![
                "proxy".into(),
                "cert_authority".into(),
                "cluster_settings".into(),
                "trusted_cluster".into(),
            ],
            cache,
            move |c| apply(c, unix_now(), &shared, &applying),
        ))
    };
    PeersHandle {
        announce,
        follow,
        endpoint,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use gatehouse_controlplane::proto::{WatchEvent, WatchItem, watch_event::Type};

    #[test]
    fn expired_and_malformed_entries_are_not_announced() {
        let mut c = WatchCache::default();
        let item = |name: &str, doc: &str| WatchItem {
            kind: "proxy".into(),
            name: name.into(),
            resource: doc.into(),
        };
        c.apply(&WatchEvent {
            r#type: Type::Snapshot as i32,
            items: vec![
                item("a", r#"{"addr":"a:1","expires":100}"#),
                item("b", r#"{"addr":"b:1","expires":50}"#),
                item("c", "not json"),
                item("d", r#"{"expires":100}"#),
            ],
            cursor: "e:0".into(),
        })
        .unwrap();
        assert_eq!(live_addrs(&c, 60), ["a:1"]);
        assert!(live_addrs(&c, 100).is_empty());
    }
}
