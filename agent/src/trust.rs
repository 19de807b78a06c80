//! The root clusters this agent's cluster trusts, from Auth's watch stream (`trusted_cluster`
//! records of side `root`): their user CAs and role maps, used by the SSH service to accept
//! their users' certificates. Trust removed is gone from the next check on.

use std::sync::Arc;

use arc_swap::ArcSwap;
use gatehouse_controlplane::role_map::{RoleMap, RoleMapping};
use gatehouse_controlplane::watch::WatchCache;

use crate::ssh::auth::TrustedRoot;

/// The trusted roots in `cache`; a record that cannot be used is left out (and logged).
pub(crate) fn roots(cache: &WatchCache) -> Vec<TrustedRoot> {
    cache
        .of("trusted_cluster")
        .filter_map(|(name, doc)| {
            let v: serde_json::Value = serde_json::from_str(doc).ok()?;
            if v.get("side")?.as_str()? != "root" {
                return None;
            }
            let spec = v.get("spec")?;
            // Every key the root trusts now (its Auth refreshes them), else the one exchanged.
            let mut keys: Vec<&str> = spec
                .get("user_ca_ssh_trusted")
                .and_then(|k| k.as_array())
                .map(|a| a.iter().filter_map(|k| k.as_str()).collect())
                .unwrap_or_default();
            if keys.is_empty() {
                keys.push(spec.get("user_ca_ssh")?.as_str()?);
            }
            let mut user_cas = Vec::with_capacity(keys.len());
            for key in keys {
                match ssh_key::PublicKey::from_openssh(key) {
                    Ok(k) => user_cas.push(k),
                    Err(e) => {
                        tracing::warn!(cluster = name, error = %e, "agent: a trusted root's user CA cannot be read");
                        return None;
                    }
                }
            }
            let mappings: Vec<RoleMapping> = spec
                .get("role_map")
                .map(|m| serde_json::from_value(m.clone()).unwrap_or_default())
                .unwrap_or_default();
            let role_map = match RoleMap::compile(&mappings) {
                Ok(m) => m,
                Err(e) => {
                    tracing::warn!(cluster = name, error = %e, "agent: a trusted root's role map cannot be used");
                    return None;
                }
            };
            Some(TrustedRoot {
                cluster: name.to_owned(),
                user_cas,
                role_map,
            })
        })
        .collect()
}

/// Follow the watch stream through `endpoint` for ever (each connection set up by `setup`, as
/// the agent's other connections to the proxy), keeping `into` current.
pub(crate) async fn follow_roots<E>(
    endpoint: E,
    setup: gatehouse_controlplane::client::SocketSetup,
    into: Arc<ArcSwap<Vec<TrustedRoot>>>,
) where
    E: Fn() -> Option<gatehouse_controlplane::client::AuthEndpoint>,
{
    let cache = Arc::new(std::sync::Mutex::new(WatchCache::default()));
    gatehouse_controlplane::watch::follow_with(
        endpoint,
        Some(setup),
        vec!["trusted_cluster".into()],
        cache,
        move |c| into.store(Arc::new(roots(c))),
    )
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use gatehouse_controlplane::proto::{WatchEvent, WatchItem, watch_event::Type};

    #[test]
    fn roots_with_usable_keys_and_maps_only() {
        let key = ssh_key::PrivateKey::random(&mut rand::rngs::OsRng, ssh_key::Algorithm::Ed25519)
            .unwrap();
        let line = key.public_key().to_openssh().unwrap();
        let doc = |side: &str, key: &str, map: &str| {
            format!(r#"{{"side":"{side}","spec":{{"user_ca_ssh":"{key}","role_map":{map}}}}}"#)
        };
        let good_map = r#"[{"remote":"access","local":["dev"]}]"#;
        let item = |name: &str, resource: String| WatchItem {
            kind: "trusted_cluster".into(),
            name: name.into(),
            resource,
        };
        let mut c = WatchCache::default();
        c.apply(&WatchEvent {
            r#type: Type::Snapshot as i32,
            items: vec![
                item("root", doc("root", &line, good_map)),
                item("a-leaf", doc("leaf", &line, good_map)),
                item("bad-key", doc("root", "nope", good_map)),
                item(
                    "bad-map",
                    doc("root", &line, r#"[{"remote":"^(","local":["x"]}]"#),
                ),
            ],
            cursor: "e:0".into(),
        })
        .unwrap();
        let r = roots(&c);
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].cluster, "root");
        assert_eq!(r[0].role_map.map(&["access".into()]), ["dev"]);
    }
}
