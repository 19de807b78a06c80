//! The cluster's CAs in the forms the standard tools take (a `TrustedUserCAKeys` file for sshd,
//! `@cert-authority` lines for `known_hosts`, the X.509 CA as PEM), and their rotation.
//!
//! A rotation (`RotateCertAuthority`) makes a new key the signer at once and keeps the one it
//! replaces trusted for a grace period: exports, credentials and the watch stream list both, so
//! agents, proxies and the real OpenSSH tools trust certificates of either; agents renew their
//! host certificates on hearing of it. When the grace ends the old key is dropped everywhere. A
//! rollback before then makes the previous key the signer again, the rotated-to key trusted for
//! a grace of its own. Every Auth swaps keys on hearing the change (`reload_cas`).
//!
//! The X.509 CA rotates the same way ([`crate::tls_authority`]): during the grace the new CA's
//! certificates carry a cross-signed copy of it, so parties that trust only the old CA accept
//! them; Auth re-issues its own server certificate and the admin identity, and proxies and
//! agents renew theirs on hearing of it.

use std::sync::Arc;

use tonic::Status;

use super::call::{Audit, Call, Done, Failure};
use super::{AuthState, internal, now_secs, store_status};
use crate::ca::{CaKind, SshCa, TlsCa};
use crate::proto;
use crate::tls_authority::TlsAuthority;

/// How long Auth's own server certificate is valid.
pub(crate) const SERVER_CERT_TTL: std::time::Duration =
    std::time::Duration::from_secs(365 * 24 * 3600);

/// What Auth serves its API with: re-made when the X.509 CA changes (a rotation, its grace
/// ending).
#[derive(Debug)]
pub struct ServedTls {
    pub cert: Arc<crate::tls::ReloadableCert>,
    pub verifier: Arc<crate::leaf_trust::ClusterClientVerifier>,
    /// The server certificate's extra names.
    pub sans: Vec<String>,
    /// Where the admin identity (for `gctl` on this host) is written.
    pub admin_dir: std::path::PathBuf,
    /// The trusted bundle the above were made for.
    applied: std::sync::Mutex<String>,
}

impl ServedTls {
    pub fn new(
        cert: Arc<crate::tls::ReloadableCert>,
        verifier: Arc<crate::leaf_trust::ClusterClientVerifier>,
        sans: Vec<String>,
        admin_dir: std::path::PathBuf,
        applied: String,
    ) -> Self {
        Self {
            cert,
            verifier,
            sans,
            admin_dir,
            applied: std::sync::Mutex::new(applied),
        }
    }
}

/// The SSH CAs a rotation concerns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SshKind {
    User,
    Host,
}

impl SshKind {
    fn ca_kind(self) -> CaKind {
        match self {
            SshKind::User => CaKind::SshUser,
            SshKind::Host => CaKind::SshHost,
        }
    }

    fn parse(s: &str) -> Option<Self> {
        match s {
            "user" => Some(SshKind::User),
            "host" => Some(SshKind::Host),
            _ => None,
        }
    }
}

/// Keys replaced by a rotation: (public line, trusted until).
#[derive(Debug, Clone, Default)]
pub(crate) struct Previous {
    pub(crate) user: Option<(String, i64)>,
    pub(crate) host: Option<(String, i64)>,
}

impl AuthState {
    fn ssh_slot(&self, kind: SshKind) -> &arc_swap::ArcSwap<SshCa> {
        match kind {
            SshKind::User => &self.user_ca,
            SshKind::Host => &self.host_ca,
        }
    }

    /// The public lines of the CA's keys trusted now: the signer first, then the previous one
    /// while its grace lasts.
    pub(crate) fn trusted_ssh(&self, kind: SshKind) -> Vec<String> {
        let mut lines = vec![self.ssh_slot(kind).load().public_line()];
        let previous = self.previous_cas.load();
        let prev = match kind {
            SshKind::User => &previous.user,
            SshKind::Host => &previous.host,
        };
        if let Some((line, until)) = prev
            && *until > now_secs()
        {
            lines.push(line.clone());
        }
        lines
    }

    /// When the previous key of `kind` stops being trusted (0: none).
    pub(crate) fn previous_until(&self, kind: SshKind) -> i64 {
        let previous = self.previous_cas.load();
        match kind {
            SshKind::User => previous.user.as_ref(),
            SshKind::Host => previous.host.as_ref(),
        }
        .map_or(0, |(_, until)| *until)
    }

    /// Auth's server certificate chain and key (PEM) from the X.509 CA as it is now.
    pub fn issue_server_chain(&self, sans: &[String]) -> Result<(String, String), Status> {
        let tls = self.tls.load();
        let now = time::OffsetDateTime::now_utc();
        let (cert, key) = tls
            .signer()
            .issue_server_cert(&self.cluster, sans, SERVER_CERT_TTL, now)
            .map_err(internal)?;
        Ok((
            tls.server_chain(&cert.pem(), now.unix_timestamp()),
            key.serialize_pem(),
        ))
    }

    /// Bring what Auth serves with up to the X.509 CA's state (no-op when it is current).
    fn refresh_served_tls(&self) -> Result<(), Status> {
        let Some(served) = self.served.get() else {
            return Ok(());
        };
        let trusted = self.tls.load().trusted_pem(now_secs());
        let mut applied = served
            .applied
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if *applied == trusted {
            return Ok(());
        }
        let (chain, key) = self.issue_server_chain(&served.sans)?;
        served.cert.set(&chain, &key).map_err(internal)?;
        served.verifier.set_own(&trusted).map_err(internal)?;
        crate::role::issue_admin_identity(&self.tls.load(), &self.cluster, &served.admin_dir)
            .map_err(internal)?;
        tracing::info!(
            signer = %self.tls.load().pin(),
            trusted = crate::tls::certs_from_pem(&trusted).map_or(0, |c| c.len()),
            "auth: TLS server certificate, client trust and admin identity re-made for the X.509 CA"
        );
        *applied = trusted;
        Ok(())
    }

    /// Load the X.509 CA and its rotation from the store; swap only when they changed.
    async fn reload_tls(&self) -> Result<(), Status> {
        let name = CaKind::Tls.as_str();
        let (public, private) = self
            .store
            .get_ca(name)
            .await
            .map_err(store_status)?
            .ok_or_else(|| Status::internal("no tls CA"))?;
        let rotation = self.store.get_rotation(name).await.map_err(store_status)?;
        let current = self.tls.load();
        let same_previous = match &rotation {
            Some(r) => r.trusted_until == current.previous_until(),
            None => current.previous_until() == 0,
        };
        if current.signer().cert_pem() != public || !same_previous {
            let signer = TlsCa::from_pem(&public, &private).map_err(internal)?;
            let next = match rotation {
                Some(r) => {
                    let previous = TlsCa::from_pem(&r.previous_public, &r.previous_private)
                        .map_err(internal)?;
                    TlsAuthority::with_previous(
                        signer,
                        previous,
                        r.trusted_until,
                        time::OffsetDateTime::now_utc(),
                    )
                    .map_err(internal)?
                }
                None => TlsAuthority::new(signer),
            };
            self.tls.store(Arc::new(next));
        }
        self.refresh_served_tls()
    }

    /// The earliest end of a grace still to come (Unix seconds), if any.
    pub fn next_grace_end(&self) -> Option<i64> {
        let now = now_secs();
        let previous = self.previous_cas.load();
        [
            previous.user.as_ref().map(|p| p.1),
            previous.host.as_ref().map(|p| p.1),
            Some(self.tls.load().previous_until()),
        ]
        .into_iter()
        .flatten()
        .filter(|until| *until > now)
        .min()
    }

    /// Tell every Auth and watcher that the CAs' trust changed (a grace ended).
    pub async fn announce_cas(&self) -> Result<(), Status> {
        for kind in [CaKind::SshUser, CaKind::SshHost, CaKind::Tls] {
            self.store
                .announce(crate::storage::Change::CertAuthority(
                    kind.as_str().to_owned(),
                ))
                .await
                .map_err(store_status)?;
        }
        Ok(())
    }

    /// Load the CAs' keys and rotations from the store (at start, and when any Auth rotated
    /// one).
    pub async fn reload_cas(&self) -> Result<(), Status> {
        self.reload_tls().await?;
        let mut previous = Previous::default();
        for kind in [SshKind::User, SshKind::Host] {
            let name = kind.ca_kind().as_str();
            let (_, private) = self
                .store
                .get_ca(name)
                .await
                .map_err(store_status)?
                .ok_or_else(|| Status::internal(format!("no {name} CA")))?;
            let ca = SshCa::from_openssh(&private).map_err(internal)?;
            if ca.public_line() != self.ssh_slot(kind).load().public_line() {
                self.ssh_slot(kind).store(Arc::new(ca));
            }
            let rotation = self.store.get_rotation(name).await.map_err(store_status)?;
            let prev = rotation.map(|r| {
                let line = r.previous_public.trim().to_owned();
                (line, r.trusted_until)
            });
            match kind {
                SshKind::User => previous.user = prev,
                SshKind::Host => previous.host = prev,
            }
        }
        self.previous_cas.store(Arc::new(previous));
        Ok(())
    }
}

pub(super) async fn export(
    call: Call,
    r: proto::ExportAuthoritiesRequest,
) -> Result<Done<proto::ExportAuthoritiesResponse>, Failure> {
    let state = &call.state;
    let cluster = &state.cluster;
    let text = match r.r#type.as_str() {
        // sshd's TrustedUserCAKeys file: every key trusted now (both during a rotation).
        "user" => state
            .trusted_ssh(SshKind::User)
            .iter()
            .map(|l| format!("{l} {cluster} user CA\n"))
            .collect(),
        // known_hosts: trust host certs for any host of the cluster.
        "host" => state
            .trusted_ssh(SshKind::Host)
            .iter()
            .map(|l| format!("@cert-authority * {l} {cluster} host CA\n"))
            .collect(),
        "tls" => state.tls.load().trusted_pem(now_secs()),
        other => {
            return Err(Status::invalid_argument(format!(
                "type: unknown CA type `{other}`; expected user, host or tls"
            ))
            .into());
        }
    };
    Ok(Done::read(proto::ExportAuthoritiesResponse { text }))
}

/// `RotateCertAuthority`: a new key signs from now on and the old one stays trusted for the
/// grace period; or, with `rollback`, the previous key signs again.
pub(super) async fn rotate(
    call: Call,
    r: proto::RotateCertAuthorityRequest,
) -> Result<Done<proto::RotateCertAuthorityResponse>, Failure> {
    let caller = call.caller()?.identity.name.clone();
    let state = &call.state;
    // None: the X.509 CA.
    let kind = match SshKind::parse(&r.r#type) {
        Some(k) => Some(k),
        None if r.r#type == "tls" => None,
        None => {
            return Err(Status::invalid_argument(format!(
                "type: unknown CA type `{}`; expected user, host or tls",
                r.r#type
            ))
            .into());
        }
    };
    let name = kind.map_or(CaKind::Tls, SshKind::ca_kind).as_str();
    let now = now_secs();
    let grace = i64::try_from(r.grace_seconds).unwrap_or(i64::MAX);
    let until = now.saturating_add(grace);
    if kind.is_none() && !r.rollback {
        let until = state.tls.load().previous_until();
        if until > now {
            return Err(Status::failed_precondition(format!(
                "the tls CA's last rotation is in its grace period until {} (Unix {until}): certificates of the CA it replaced are still in use; roll it back (--rollback) or rotate after the grace",
                humantime::format_rfc3339_seconds(
                    std::time::UNIX_EPOCH + std::time::Duration::from_secs(until.unsigned_abs())
                )
            ))
            .into());
        }
    }
    let (new_public, new_private) = if r.rollback {
        let rotation = state.store.get_rotation(name).await.map_err(store_status)?;
        match rotation {
            Some(rot) if rot.trusted_until > now => (rot.previous_public, rot.previous_private),
            _ => {
                return Err(Status::failed_precondition(format!(
                    "the {} CA has no rotation to roll back (its previous key is no longer trusted, or it never rotated)",
                    r.r#type
                ))
                .into());
            }
        }
    } else if kind.is_none() {
        // Named apart from the CA it replaces (see `TlsCa::generate_named`).
        let at = time::OffsetDateTime::now_utc();
        let cn = format!("{} Gatehouse CA {now}", state.cluster);
        let ca = TlsCa::generate_named(&state.cluster, &cn, at).map_err(internal)?;
        (ca.cert_pem().to_owned(), ca.key_pem().to_string())
    } else {
        let ca = SshCa::generate().map_err(internal)?;
        let private = ca.private_openssh().map_err(internal)?;
        (ca.public_line(), private.to_string())
    };
    state
        .store
        .swap_ca(name, &new_public, &new_private, until, now, r.rollback)
        .await
        .map_err(store_status)?;
    state.reload_cas().await?;
    let trusted = match kind {
        Some(kind) => state.trusted_ssh(kind),
        None => crate::tls::certs_from_pem(&state.tls.load().trusted_pem(now))
            .map_err(internal)?
            .iter()
            .filter_map(|c| crate::ca::spki_pin(c))
            .collect(),
    };
    let what = if r.rollback { "rollback" } else { "rotation" };
    tracing::warn!(ca = %r.r#type, what, grace_seconds = grace, by = %caller, "auth: CA {what}");
    Ok(Done::audited(
        proto::RotateCertAuthorityResponse {
            trusted: trusted.clone(),
            previous_trusted_until: until,
        },
        Audit::one(
            "ca.rotate",
            &caller,
            serde_json::json!({
                "type": r.r#type,
                "rollback": r.rollback,
                "grace_seconds": grace,
                "trusted_until": until,
                "signing_key": trusted.first(),
            }),
        ),
    ))
}
