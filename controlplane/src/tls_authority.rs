//! The cluster's X.509 CA across a rotation: the CA that signs, and the one it replaced while
//! that stays trusted (the grace period).
//!
//! During the grace every certificate the signer issues is followed by a cross-signed copy of
//! the signer (its name and key, issued by the previous CA), so a party that still trusts only
//! the previous CA accepts it: nothing has to learn of the rotation before the new CA signs.
//! Servers' chains also carry every trusted CA certificate, so a client that pins either CA's
//! key (`--ca-pin`) finds it. Parties learn the new bundle from the watch stream, renewals and
//! logins; after the grace the previous CA is trusted nowhere.
//!
//! Pure: CAs and `now` in, PEM out.

use rustls::pki_types::CertificateDer;

use crate::ca::{CaError, TlsCa, TlsUsage};
use crate::identity::Identity;

/// The signer, and the CA it replaced while that is trusted.
#[derive(Debug)]
pub struct TlsAuthority {
    signer: TlsCa,
    previous: Option<Previous>,
}

#[derive(Debug)]
struct Previous {
    ca: TlsCa,
    /// The signer's name and key, issued by the previous CA.
    cross_pem: String,
    until: i64,
}

impl TlsAuthority {
    /// A CA that never rotated (or whose previous CA is no longer trusted).
    pub fn new(signer: TlsCa) -> Self {
        Self {
            signer,
            previous: None,
        }
    }

    /// `signer`, with `previous` trusted until `until` (Unix seconds).
    pub fn with_previous(
        signer: TlsCa,
        previous: TlsCa,
        until: i64,
        now: time::OffsetDateTime,
    ) -> Result<Self, CaError> {
        let cross_pem = previous.cross_sign(&signer, now)?;
        Ok(Self {
            signer,
            previous: Some(Previous {
                ca: previous,
                cross_pem,
                until,
            }),
        })
    }

    /// The CA that signs.
    pub fn signer(&self) -> &TlsCa {
        &self.signer
    }

    fn previous_at(&self, now: i64) -> Option<&Previous> {
        self.previous.as_ref().filter(|p| p.until > now)
    }

    /// When the previous CA stops being trusted (0: there is none).
    pub fn previous_until(&self) -> i64 {
        self.previous.as_ref().map_or(0, |p| p.until)
    }

    /// The CA certificates trusted at `now` (PEM): the signer first, then the previous CA
    /// while its grace lasts. What clients store as `ca.pem`.
    pub fn trusted_pem(&self, now: i64) -> String {
        let mut pem = self.signer.cert_pem().to_owned();
        if let Some(p) = self.previous_at(now) {
            pem.push_str(p.ca.cert_pem());
        }
        pem
    }

    /// What follows a certificate the signer issued, at `now`: the cross-signed signer during
    /// the grace, else nothing.
    pub fn intermediates_pem(&self, now: i64) -> &str {
        self.previous_at(now).map_or("", |p| p.cross_pem.as_str())
    }

    /// A server's chain: its certificate, the intermediates, then every trusted CA.
    pub fn server_chain(&self, leaf_pem: &str, now: i64) -> String {
        format!(
            "{leaf_pem}{}{}",
            self.intermediates_pem(now),
            self.trusted_pem(now)
        )
    }

    /// Sign a certificate (see [`TlsCa::sign`]); returns it with its intermediates (PEM).
    pub fn sign(
        &self,
        subject_spki: &[u8],
        identity: &Identity,
        usage: TlsUsage,
        sans: &[String],
        now: time::OffsetDateTime,
    ) -> Result<String, CaError> {
        let cert = self.signer.sign(subject_spki, identity, usage, sans, now)?;
        Ok(format!(
            "{}{}",
            cert.pem(),
            self.intermediates_pem(now.unix_timestamp())
        ))
    }

    /// Issue a certificate with a fresh key (in-process roles: the Proxy); returns it with its
    /// intermediates, and the key (PEM).
    pub fn issue_with_new_key(
        &self,
        identity: &Identity,
        usage: TlsUsage,
        sans: &[String],
        now: time::OffsetDateTime,
    ) -> Result<(String, String), CaError> {
        let (cert, key) = self.signer.issue_with_new_key(identity, usage, sans, now)?;
        Ok((
            format!(
                "{}{}",
                cert.pem(),
                self.intermediates_pem(now.unix_timestamp())
            ),
            key.serialize_pem(),
        ))
    }

    /// Check that a trusted CA issued `der` and that it is valid at `now` (see
    /// [`TlsCa::verify_issued`]): the signer, or the previous CA during its grace.
    pub fn verify_issued(&self, der: &[u8], now: i64) -> Result<(Identity, Vec<u8>), CaError> {
        match self.signer.verify_issued(der, now) {
            Ok(v) => Ok(v),
            Err(e) => match self.previous_at(now) {
                Some(p) => p.ca.verify_issued(der, now).map_err(|_| e),
                None => Err(e),
            },
        }
    }

    /// `sha256:<hex>` of the signer's key: what new clients pin.
    pub fn pin(&self) -> String {
        self.signer.pin()
    }
}

/// Whether the first certificate in `cert_pem` names the first CA of `ca_pem` as its issuer
/// (a party holding a certificate of a replaced CA renews; a rotated CA has a name of its own).
pub fn issued_by_first(cert_pem: &str, ca_pem: &str) -> bool {
    let first = |pem: &str| -> Option<CertificateDer<'static>> {
        crate::tls::certs_from_pem(pem).ok()?.into_iter().next()
    };
    let (Some(cert), Some(ca)) = (first(cert_pem), first(ca_pem)) else {
        return false;
    };
    let (Ok((_, cert)), Ok((_, ca))) = (
        x509_parser::parse_x509_certificate(cert.as_ref()),
        x509_parser::parse_x509_certificate(ca.as_ref()),
    ) else {
        return false;
    };
    cert.issuer().as_raw() == ca.subject().as_raw()
}

/// Whether a party's certificate or trusted CAs (PEM) lag the X.509 CA as the watch stream
/// tells of it (`doc`: `cert_pem`, the signer; `trusted_pem`, the bundle): a certificate of
/// another CA, or another set of trusted certificates. Such a party renews.
pub fn lags(doc: &str, cert_pem: &str, trusted_pem: &str) -> bool {
    let Ok(doc) = serde_json::from_str::<serde_json::Value>(doc) else {
        return false;
    };
    let (Some(signer), Some(trusted)) = (
        doc.get("cert_pem").and_then(|v| v.as_str()),
        doc.get("trusted_pem").and_then(|v| v.as_str()),
    ) else {
        return false;
    };
    !issued_by_first(cert_pem, signer) || !same_certs(trusted_pem, trusted)
}

/// Whether two PEM bundles hold the same certificates (in any order).
pub fn same_certs(a: &str, b: &str) -> bool {
    let set = |pem: &str| -> std::collections::BTreeSet<Vec<u8>> {
        crate::tls::certs_from_pem(pem)
            .map(|v| v.into_iter().map(|c| c.as_ref().to_vec()).collect())
            .unwrap_or_default()
    };
    set(a) == set(b)
}

#[cfg(test)]
#[path = "tls_authority_tests.rs"]
mod tests;
