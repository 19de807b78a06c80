//! The agent's view of the cluster's SSH CAs, followed from Auth's watch stream (kind
//! `cert_authority`): during a user CA rotation the SSH service trusts both keys until the
//! grace period ends; when the host CA's signing key is not the one that signed this node's host
//! certificate (a host CA rotation or rollback), or the X.509 CA's signer or trusted bundle is not
//! the node's (a TLS CA rotation, its grace ending), the certificates are renewed at once.

use std::sync::Arc;

use arc_swap::ArcSwap;
use gatehouse_controlplane::host::HostIdentity;
use gatehouse_controlplane::watch::WatchCache;

use crate::ssh::SshNode;

/// An SSH CA as the watch stream says: the signer first, then the keys trusted now, and when
/// the previous one stops being trusted.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(default)]
pub(crate) struct SshAuthority {
    pub ssh_public_key: String,
    pub ssh_public_keys: Vec<String>,
    pub previous_until: i64,
}

impl SshAuthority {
    /// The keys trusted at `now` (the signer, and the previous key while its grace lasts).
    pub fn trusted(&self, now: i64) -> Vec<ssh_key::PublicKey> {
        self.ssh_public_keys
            .iter()
            .enumerate()
            .filter(|(i, _)| *i == 0 || self.previous_until > now)
            .filter_map(|(_, l)| ssh_key::PublicKey::from_openssh(l).ok())
            .collect()
    }

    /// The signing key.
    pub fn signer(&self) -> Option<ssh_key::PublicKey> {
        ssh_key::PublicKey::from_openssh(&self.ssh_public_key).ok()
    }
}

fn authority(cache: &WatchCache, name: &str) -> Option<SshAuthority> {
    cache
        .of("cert_authority")
        .find(|(n, _)| *n == name)
        .and_then(|(_, doc)| serde_json::from_str(doc).ok())
}

/// Whether `identity`'s host certificate was signed by a key other than `signer`.
pub(crate) fn signed_by_other(identity: &HostIdentity, signer: &ssh_key::PublicKey) -> bool {
    match ssh_key::Certificate::from_openssh(identity.ssh_cert.trim()) {
        Ok(cert) => cert.signature_key() != signer.key_data(),
        Err(_) => false,
    }
}

/// Follow the CAs for ever: keep the SSH service's user CA keys current (re-checked on every
/// event, keepalives included, so an expired grace drops the old key within seconds), and
/// wake the host certificate renewal when the host CA's signer changed.
pub(crate) async fn follow<E>(
    endpoint: E,
    setup: gatehouse_controlplane::client::SocketSetup,
    ssh: Option<Arc<SshNode>>,
    identity: Arc<ArcSwap<HostIdentity>>,
    renew_now: Arc<tokio::sync::Notify>,
) where
    E: Fn() -> Option<gatehouse_controlplane::client::AuthEndpoint>,
{
    let cache = Arc::new(std::sync::Mutex::new(WatchCache::default()));
    gatehouse_controlplane::watch::follow_each(
        endpoint,
        Some(setup),
        vec!["cert_authority".into()],
        cache,
        move |c, _| {
            let now = time::OffsetDateTime::now_utc().unix_timestamp();
            if let (Some(ssh), Some(user)) = (&ssh, authority(c, "user")) {
                ssh.set_user_ca_keys(user.trusted(now));
            }
            let id = identity.load();
            let host_lags = authority(c, "host")
                .and_then(|h| h.signer())
                .is_some_and(|signer| signed_by_other(&id, &signer));
            let tls_lags = c
                .of("cert_authority")
                .find(|(n, _)| *n == "tls")
                .is_some_and(|(_, doc)| {
                    gatehouse_controlplane::tls_authority::lags(doc, &id.tls_cert, &id.ca_pem)
                });
            if host_lags || tls_lags {
                renew_now.notify_one();
            }
        },
    )
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_previous_key_is_trusted_only_during_its_grace() {
        let a = gatehouse_controlplane::ca::SshCa::generate()
            .unwrap()
            .public_line();
        let b = gatehouse_controlplane::ca::SshCa::generate()
            .unwrap()
            .public_line();
        let auth = SshAuthority {
            ssh_public_key: b.clone(),
            ssh_public_keys: vec![b.clone(), a.clone()],
            previous_until: 100,
        };
        assert_eq!(auth.trusted(99).len(), 2);
        let after = auth.trusted(100);
        assert_eq!(after.len(), 1);
        assert_eq!(after[0].to_openssh().unwrap(), b);
        assert_eq!(auth.signer().unwrap().to_openssh().unwrap(), b);
        // Unreadable documents trust nothing new (the node keeps what it had).
        assert!(SshAuthority::default().trusted(0).is_empty());
    }
}
