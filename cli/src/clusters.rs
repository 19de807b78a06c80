//! Trusted clusters from the user's side: `gsh clusters`, and the leaf clusters' host CAs in
//! the profile's `known_hosts` so that OpenSSH checks leaf nodes as it checks this cluster's.

use std::path::Path;

use gatehouse_controlplane::proto;

use crate::{Profile, connect, identity_endpoint, print_table, rpc_error};

/// This cluster and the clusters it trusts or is trusted by.
pub async fn list(dir: &Path, profile: &Profile) -> anyhow::Result<Vec<proto::ClusterInfo>> {
    let mut client = connect(&identity_endpoint(dir, &profile.auth_addr)?).await?;
    Ok(client
        .list_clusters(proto::ListClustersRequest {})
        .await
        .map_err(rpc_error)?
        .into_inner()
        .clusters)
}

/// The leaf clusters (reachable through this cluster's proxy).
pub async fn leaves(dir: &Path, profile: &Profile) -> anyhow::Result<Vec<proto::ClusterInfo>> {
    Ok(list(dir, profile)
        .await?
        .into_iter()
        .filter(|c| c.relation == "leaf")
        .collect())
}

/// `gsh clusters`.
pub async fn clusters(dir: &Path, format: &str) -> anyhow::Result<()> {
    let profile = Profile::load(dir)?;
    let all = list(dir, &profile).await?;
    if format == "json" {
        let v: Vec<serde_json::Value> = all
            .iter()
            .map(|c| {
                serde_json::json!({
                    "name": c.name,
                    "relation": c.relation,
                    "online": c.online,
                })
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    let rows: Vec<Vec<String>> = all
        .iter()
        .map(|c| {
            let status = match c.relation.as_str() {
                "self" => "this cluster",
                "leaf" if c.online => "online",
                "leaf" => "offline",
                _ => "trusted root",
            };
            vec![c.name.clone(), c.relation.clone(), status.to_owned()]
        })
        .collect();
    print_table(&["Cluster", "Relation", "Status"], &rows);
    Ok(())
}

/// `known_hosts` with this cluster's host CA lines (as login wrote them) and one line per leaf
/// cluster's host CA.
pub fn known_hosts(current: &str, own_cluster: &str, leaves: &[proto::ClusterInfo]) -> String {
    let own_suffix = format!(" {own_cluster} host CA");
    let mut out: String = current
        .lines()
        .filter(|l| l.ends_with(&own_suffix))
        .map(|l| format!("{l}\n"))
        .collect();
    for leaf in leaves.iter().filter(|l| !l.host_ca_ssh.is_empty()) {
        out.push_str(&format!(
            "@cert-authority * {} {} host CA\n",
            leaf.host_ca_ssh.trim(),
            leaf.name
        ));
    }
    out
}

/// `known_hosts` with this cluster's host CA lines replaced by `keys`; other clusters' lines
/// kept.
pub fn with_own_host_cas(current: &str, own_cluster: &str, keys: &[String]) -> String {
    let own_suffix = format!(" {own_cluster} host CA");
    let mut out: String = keys
        .iter()
        .map(|k| format!("@cert-authority * {} {own_cluster} host CA\n", k.trim()))
        .collect();
    for l in current.lines().filter(|l| !l.ends_with(&own_suffix)) {
        out.push_str(l);
        out.push('\n');
    }
    out
}

/// Write this cluster's host CA keys, as the proxy told them, into the profile's `known_hosts`
/// (only when they changed).
pub fn trust_own_hosts(dir: &Path, profile: &Profile, keys: &[String]) -> anyhow::Result<()> {
    let path = dir.join("known_hosts");
    let current = std::fs::read_to_string(&path).unwrap_or_default();
    let next = with_own_host_cas(&current, &profile.cluster, keys);
    if next != current {
        gatehouse_controlplane::files::write_private(&path, next.as_bytes())?;
    }
    Ok(())
}

/// Write the leaves' host CAs into the profile's `known_hosts`.
pub fn trust_leaf_hosts(
    dir: &Path,
    profile: &Profile,
    leaves: &[proto::ClusterInfo],
) -> anyhow::Result<()> {
    let path = dir.join("known_hosts");
    let current = std::fs::read_to_string(&path).unwrap_or_default();
    let next = known_hosts(&current, &profile.cluster, leaves);
    if next != current {
        gatehouse_controlplane::files::write_private(&path, next.as_bytes())?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leaf_host_cas_join_the_clusters_own() {
        let current = "@cert-authority * ssh-ed25519 AAAA root host CA\n@cert-authority * ssh-ed25519 OLD gone host CA\n";
        let leaf = proto::ClusterInfo {
            name: "leaf".into(),
            relation: "leaf".into(),
            host_ca_ssh: "ssh-ed25519 BBBB".into(),
            ..Default::default()
        };
        assert_eq!(
            known_hosts(current, "root", &[leaf]),
            "@cert-authority * ssh-ed25519 AAAA root host CA\n@cert-authority * ssh-ed25519 BBBB leaf host CA\n"
        );
    }
}
