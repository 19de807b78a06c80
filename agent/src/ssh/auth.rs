//! User certificate checks: pure functions, certificate and `now` in, identity or reason out.

use std::collections::BTreeMap;

use gatehouse_controlplane::ca::ssh_ext;
use ssh_key::certificate::CertType;
use ssh_key::{Certificate, HashAlg, PublicKey};

/// A root cluster this (leaf) cluster trusts: its users' certificates are accepted here with
/// their roles mapped to this cluster's.
#[derive(Debug, Clone)]
pub struct TrustedRoot {
    pub cluster: String,
    /// The root's user CA keys trusted now (two during its rotation's grace).
    pub user_cas: Vec<PublicKey>,
    pub role_map: gatehouse_controlplane::role_map::RoleMap,
}

/// What an accepted certificate says about its holder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct CertIdentity {
    /// The certificate's key id: the Gatehouse user name.
    pub key_id: String,
    pub roles: Vec<String>,
    pub traits: BTreeMap<String, Vec<String>>,
    pub permit_pty: bool,
    /// `permit-port-forwarding`: `-L`, `-R`, `-D`.
    pub permit_port_forwarding: bool,
    /// `permit-agent-forwarding`: `-A`.
    pub permit_agent_forwarding: bool,
    /// Remote forwards may listen where the client asks, not only on loopback.
    pub remote_forward_any: bool,
    /// The root cluster that issued the certificate (its roles were mapped), if not this one.
    pub from_cluster: Option<String>,
}

/// Why a certificate was refused, with the key id when the certificate could be read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Refusal {
    pub key_id: String,
    pub reason: String,
}

impl Refusal {
    fn new(cert: &Certificate, reason: impl Into<String>) -> Self {
        Self {
            key_id: cert.key_id().to_owned(),
            reason: reason.into(),
        }
    }
}

/// Convert russh's certificate type (its own ssh-key fork) to ssh-key 0.6 through the OpenSSH
/// text encoding.
pub(crate) fn from_russh(cert: &russh::keys::Certificate) -> Result<Certificate, Refusal> {
    let unreadable = |e: String| Refusal {
        key_id: cert.key_id().to_owned(),
        reason: format!("certificate could not be read: {e}"),
    };
    let text = cert.to_openssh().map_err(|e| unreadable(e.to_string()))?;
    Certificate::from_openssh(&text).map_err(|e| unreadable(e.to_string()))
}

/// A login the node can serve at all: a plausible Unix user name. The CA's no-login guard
/// principal starts with a dash, so it can never be requested as a login.
pub(crate) fn check_login_name(login: &str) -> Result<(), String> {
    let valid = !login.is_empty()
        && login.len() <= 64
        && !login.starts_with('-')
        && login
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | '$'))
        && login != "."
        && login != "..";
    if valid {
        Ok(())
    } else {
        Err(format!("login `{login}` is not a valid user name"))
    }
}

fn format_time(unix: u64) -> String {
    i64::try_from(unix)
        .ok()
        .and_then(|t| time::OffsetDateTime::from_unix_timestamp(t).ok())
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| unix.to_string())
}

/// Check a user certificate for `login` at `now` (Unix seconds) against the trusted user CAs.
/// Role evaluation (RBAC) comes after this, with the roles this returns.
#[cfg(test)]
pub(crate) fn verify_user_cert(
    cert: &Certificate,
    login: &str,
    user_cas: &[PublicKey],
    now: u64,
) -> Result<CertIdentity, Refusal> {
    verify_user_cert_in(cert, login, user_cas, &[], "", now)
}

/// [`verify_user_cert`], also accepting certificates of the root clusters `roots` (this is
/// cluster `here`): their roles are mapped to this cluster's by the root's role map, and a
/// certificate none of whose roles maps is refused.
pub(crate) fn verify_user_cert_in(
    cert: &Certificate,
    login: &str,
    user_cas: &[PublicKey],
    roots: &[TrustedRoot],
    here: &str,
    now: u64,
) -> Result<CertIdentity, Refusal> {
    if cert.cert_type() != CertType::User {
        return Err(Refusal::new(
            cert,
            "certificate is a host certificate, not a user certificate",
        ));
    }
    let signed_by = |ca: &PublicKey| ca.key_data() == cert.signature_key();
    let (ca, root) = match user_cas.iter().find(|ca| signed_by(ca)) {
        Some(ca) => (ca, None),
        None => match roots
            .iter()
            .find_map(|r| r.user_cas.iter().find(|ca| signed_by(ca)).map(|ca| (ca, r)))
        {
            Some((ca, r)) => (ca, Some(r)),
            None => {
                return Err(Refusal::new(
                    cert,
                    "certificate not signed by this cluster's user CA",
                ));
            }
        },
    };
    if now < cert.valid_after() {
        return Err(Refusal::new(
            cert,
            format!(
                "certificate not yet valid (valid after {})",
                format_time(cert.valid_after())
            ),
        ));
    }
    if now >= cert.valid_before() {
        return Err(Refusal::new(
            cert,
            format!(
                "certificate expired at {}",
                format_time(cert.valid_before())
            ),
        ));
    }
    let fingerprint = ca.fingerprint(HashAlg::Sha256);
    if cert.validate_at(now, [&fingerprint]).is_err() {
        return Err(Refusal::new(
            cert,
            "certificate signature does not verify against this cluster's user CA",
        ));
    }
    if let Some(option) = cert.critical_options().keys().next() {
        return Err(Refusal::new(
            cert,
            format!(
                "certificate carries critical option `{option}`, which this node does not enforce"
            ),
        ));
    }
    check_login_name(login).map_err(|reason| Refusal::new(cert, reason))?;
    if !cert.valid_principals().iter().any(|p| p == login) {
        return Err(Refusal::new(
            cert,
            format!("login `{login}` not in certificate principals"),
        ));
    }
    let extensions = cert.extensions();
    let Some(roles) = extensions.get(ssh_ext::ROLES) else {
        return Err(Refusal::new(
            cert,
            format!("certificate has no {} extension", ssh_ext::ROLES),
        ));
    };
    let roles: Vec<String> = serde_json::from_str(roles).map_err(|e| {
        Refusal::new(
            cert,
            format!(
                "certificate's {} extension is not a JSON array of role names: {e}",
                ssh_ext::ROLES
            ),
        )
    })?;
    let traits: BTreeMap<String, Vec<String>> = match extensions.get(ssh_ext::TRAITS) {
        None => BTreeMap::new(),
        Some(t) if t.is_empty() => BTreeMap::new(),
        Some(t) => serde_json::from_str(t).map_err(|e| {
            Refusal::new(
                cert,
                format!(
                    "certificate's {} extension is not a JSON map of lists: {e}",
                    ssh_ext::TRAITS
                ),
            )
        })?,
    };
    let (roles, from_cluster) = match root {
        None => (roles, None),
        Some(r) => {
            let mapped = r.role_map.map(&roles);
            if mapped.is_empty() {
                return Err(Refusal::new(
                    cert,
                    format!(
                        "none of your roles ({}) maps to a role in cluster {here}",
                        roles.join(", ")
                    ),
                ));
            }
            (mapped, Some(r.cluster.clone()))
        }
    };
    Ok(CertIdentity {
        key_id: cert.key_id().to_owned(),
        roles,
        traits,
        from_cluster,
        permit_pty: extensions.contains_key("permit-pty"),
        permit_port_forwarding: extensions.contains_key("permit-port-forwarding"),
        permit_agent_forwarding: extensions.contains_key("permit-agent-forwarding"),
        remote_forward_any: extensions.contains_key(ssh_ext::REMOTE_FORWARD_ANY),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use gatehouse_controlplane::ca::{SshCa, SshUserCertRequest};
    use gatehouse_controlplane::identity::{Identity, IdentityKind};
    use ssh_key::{Algorithm, PrivateKey};

    const NOW: u64 = 1_800_000_000;

    fn identity(expires: i64) -> Identity {
        Identity {
            kind: IdentityKind::User,
            name: "alice".into(),
            roles: vec!["access".into()],
            logins: vec!["alice".into()],
            traits: [("logins".to_string(), vec!["alice".to_string()])].into(),
            cluster: "example".into(),
            route_to_cluster: "example".into(),
            bot: None,
            expires,
        }
    }

    fn user_cert(ca: &SshCa, expires: i64, now: u64, pty: bool) -> Certificate {
        let key = PrivateKey::random(&mut rand::rngs::OsRng, Algorithm::Ed25519).unwrap();
        let id = identity(expires);
        let req = SshUserCertRequest {
            identity: &id,
            permit_pty: pty,
            permit_port_forwarding: false,
            permit_agent_forwarding: false,
            permit_x11_forwarding: false,
            remote_forward_any: false,
        };
        ca.sign_user(key.public_key(), &req, now).unwrap()
    }

    #[test]
    fn accepts_a_good_certificate() {
        let ca = SshCa::generate().unwrap();
        let cert = user_cert(&ca, NOW as i64 + 3600, NOW, true);
        let id = verify_user_cert(&cert, "alice", &[ca.public_key().clone()], NOW).unwrap();
        assert_eq!(id.key_id, "alice");
        assert_eq!(id.roles, ["access"]);
        assert_eq!(id.traits["logins"], ["alice"]);
        assert!(id.permit_pty);
    }

    /// A root cluster's user: its certificate is accepted with its roles mapped by the root's
    /// role map; one whose roles map to nothing is refused saying so.
    #[test]
    fn a_trusted_roots_users_get_their_mapped_roles() {
        use gatehouse_controlplane::role_map::{RoleMap, RoleMapping};
        let own = SshCa::generate().unwrap();
        let root_ca = SshCa::generate().unwrap();
        let root = |remote: &str, local: &str| TrustedRoot {
            cluster: "root".into(),
            user_cas: vec![root_ca.public_key().clone()],
            role_map: RoleMap::compile(&[RoleMapping {
                remote: remote.into(),
                local: vec![local.into()],
            }])
            .unwrap(),
        };
        let cert = user_cert(&root_ca, NOW as i64 + 3600, NOW, true);
        let own_cas = [own.public_key().clone()];
        // Not trusted: refused as any foreign certificate.
        let r = verify_user_cert_in(&cert, "alice", &own_cas, &[], "leaf", NOW).unwrap_err();
        assert!(
            r.reason.contains("not signed by this cluster's user CA"),
            "{}",
            r.reason
        );
        let id = verify_user_cert_in(
            &cert,
            "alice",
            &own_cas,
            &[root("^acc(.*)$", "dev$1")],
            "leaf",
            NOW,
        )
        .unwrap();
        assert_eq!(id.roles, ["devess"]);
        assert_eq!(id.from_cluster.as_deref(), Some("root"));
        let r = verify_user_cert_in(&cert, "alice", &own_cas, &[root("admin", "x")], "leaf", NOW)
            .unwrap_err();
        assert_eq!(
            r.reason,
            "none of your roles (access) maps to a role in cluster leaf"
        );
        // The cluster's own users are not mapped.
        let mine = user_cert(&own, NOW as i64 + 3600, NOW, true);
        let id = verify_user_cert_in(&mine, "alice", &own_cas, &[root("admin", "x")], "leaf", NOW)
            .unwrap();
        assert_eq!(
            (id.roles.as_slice(), id.from_cluster),
            (&["access".to_string()][..], None)
        );
    }

    #[test]
    fn refusals_say_why() {
        let ca = SshCa::generate().unwrap();
        let other = SshCa::generate().unwrap();
        let cas = [ca.public_key().clone()];
        let cert = user_cert(&ca, NOW as i64 + 3600, NOW, false);

        let r = verify_user_cert(&cert, "root", &cas, NOW).unwrap_err();
        assert_eq!(r.reason, "login `root` not in certificate principals");
        assert_eq!(r.key_id, "alice");

        let r = verify_user_cert(&cert, "alice", &cas, NOW + 7200).unwrap_err();
        assert!(r.reason.starts_with("certificate expired"), "{}", r.reason);

        let r = verify_user_cert(&cert, "alice", &cas, NOW - 3600).unwrap_err();
        assert!(
            r.reason.starts_with("certificate not yet valid"),
            "{}",
            r.reason
        );

        let r = verify_user_cert(&cert, "alice", &[other.public_key().clone()], NOW).unwrap_err();
        assert_eq!(r.reason, "certificate not signed by this cluster's user CA");

        let r = verify_user_cert(&cert, "-gatehouse-nologin", &cas, NOW).unwrap_err();
        assert!(r.reason.contains("not a valid user name"), "{}", r.reason);

        assert!(
            !verify_user_cert(&cert, "alice", &cas, NOW)
                .unwrap()
                .permit_pty
        );
    }

    #[test]
    fn host_certificates_are_not_user_certificates() {
        let ca = SshCa::generate().unwrap();
        let key = PrivateKey::random(&mut rand::rngs::OsRng, Algorithm::Ed25519).unwrap();
        let cert = ca
            .sign_host(key.public_key(), "node", "example", &[], NOW, NOW + 3600)
            .unwrap();
        let r = verify_user_cert(&cert, "node", &[ca.public_key().clone()], NOW).unwrap_err();
        assert!(r.reason.contains("not a user certificate"), "{}", r.reason);
    }

    #[test]
    fn login_names() {
        assert!(check_login_name("alice").is_ok());
        assert!(check_login_name("svc-app_1.x").is_ok());
        for bad in ["", "-x", "a b", "a/b", "..", "é"] {
            assert!(check_login_name(bad).is_err(), "{bad}");
        }
    }
}
