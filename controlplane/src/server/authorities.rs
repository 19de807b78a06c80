//! The cluster's CAs in the forms the standard tools take (a `TrustedUserCAKeys` file for sshd,
//! `@cert-authority` lines for `known_hosts`, the X.509 CA as PEM), and their rotation.
//!
//! A rotation (`RotateCertAuthority`) makes a new key the signer at once and keeps the one it
//! replaces trusted for a grace period: exports, credentials and the watch stream list both, so
//! agents, proxies and the real OpenSSH tools trust certificates of either; agents renew their
//! host certificates on hearing of it. When the grace ends the old key is dropped everywhere. A
//! rollback before then makes the previous key the signer again, the rotated-to key trusted for
//! a grace of its own. Every Auth swaps keys on hearing the change (`reload_cas`).

use std::sync::Arc;

use tonic::Status;

use super::call::{Audit, Call, Done, Failure};
use super::{AuthState, internal, now_secs, store_status};
use crate::ca::{CaKind, SshCa};
use crate::proto;

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

    /// Load the SSH CAs' keys and rotations from the store (at start, and when any Auth
    /// rotated one).
    pub async fn reload_cas(&self) -> Result<(), Status> {
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
        "tls" => state.tls_ca.cert_pem().to_owned(),
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
    let kind = match SshKind::parse(&r.r#type) {
        Some(k) => k,
        None if r.r#type == "tls" => {
            return Err(Status::unimplemented(
                "rotating the TLS CA is not supported yet; the user and host CAs rotate",
            )
            .into());
        }
        None => {
            return Err(Status::invalid_argument(format!(
                "type: unknown CA type `{}`; expected user, host or tls",
                r.r#type
            ))
            .into());
        }
    };
    let name = kind.ca_kind().as_str();
    let now = now_secs();
    let grace = i64::try_from(r.grace_seconds).unwrap_or(i64::MAX);
    let until = now.saturating_add(grace);
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
    let trusted = state.trusted_ssh(kind);
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
