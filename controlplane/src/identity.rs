//! The identity a certificate carries, and how it is encoded in X.509 and OpenSSH certificates.
//!
//! X.509: subject CN = the identity's name, O = the cluster name, and one non-critical extension
//! ([`IDENTITY_OID`]) whose value is a DER `UTF8String` holding the JSON of [`Identity`]. The
//! extension is authoritative; CN/O are for humans and tools such as `openssl x509 -text`.
//! OpenSSH: see [`crate::ca::ssh_ext`] for the extensions that carry roles, traits and route.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Unregistered experimental arc (the same family Teleport uses for its identity extensions).
/// To be replaced with a registered private enterprise number before a stable release; clients
/// and servers of one cluster always agree because both come from this crate.
pub const IDENTITY_OID: &[u64] = &[1, 3, 9999, 7001, 1];

/// The DNS name every Auth server certificate carries, and the server name clients verify.
/// The CA is private to the cluster and pinned, so a constant name is as strong as a host name
/// and lets clients reach Auth through any address (loopback, load balancer, proxy pass-through).
pub const AUTH_SERVER_NAME: &str = "auth.gatehouse.cluster.local";

/// The DNS name every Proxy server certificate carries (same reasoning as [`AUTH_SERVER_NAME`]).
pub const PROXY_SERVER_NAME: &str = "proxy.gatehouse.cluster.local";

/// ALPN for Auth API connections; the Proxy passes these through to Auth unterminated.
pub const ALPN_AUTH: &[u8] = b"gatehouse-auth";

/// What kind of principal an identity is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum IdentityKind {
    /// A human who logged in with a password.
    User,
    /// An agent host that joined with a node token.
    Node,
    /// A Machine ID bot.
    Bot,
    /// A built-in system identity (`admin` for gctl on the Auth host, `auth` for the server).
    Builtin,
}

/// Who a certificate speaks for. Encoded in every X.509 cert the cluster issues.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Identity {
    pub kind: IdentityKind,
    /// User name, host id, bot name, or built-in role name.
    pub name: String,
    #[serde(default)]
    pub roles: Vec<String>,
    #[serde(default)]
    pub logins: Vec<String>,
    #[serde(default)]
    pub traits: BTreeMap<String, Vec<String>>,
    /// The cluster that issued the certificate.
    pub cluster: String,
    /// The cluster the holder wants to reach (trusted clusters); the issuing cluster by default.
    #[serde(default)]
    pub route_to_cluster: String,
    /// Bots only: which join this identity descends from and how many renewals it has had.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bot: Option<BotLineage>,
    /// Unix seconds.
    pub expires: i64,
}

/// A bot identity's place in its line of renewals. Auth keeps the current one per bot; a
/// renewal presenting an older generation means the identity was copied (theft detection).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BotLineage {
    /// Set at each join (a rejoin starts a new line; the old one can never renew again).
    pub instance: String,
    /// 1 at the join, +1 at every renewal.
    pub generation: u64,
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum IdentityError {
    #[error("certificate is not valid X.509: {0}")]
    X509(String),
    #[error("certificate carries no Gatehouse identity extension")]
    Missing,
    #[error("identity extension is malformed: {0}")]
    Malformed(String),
}

impl Identity {
    /// The JSON value of the identity extension.
    pub fn to_extension_der(&self) -> Vec<u8> {
        // Serializing a struct of strings and maps cannot fail.
        let json = serde_json::to_vec(self).unwrap_or_default();
        der_utf8_string(&json)
    }

    /// Parse the identity out of a DER X.509 certificate (already verified by the caller).
    pub fn from_cert_der(der: &[u8]) -> Result<Self, IdentityError> {
        let (_, cert) = x509_parser::parse_x509_certificate(der)
            .map_err(|e| IdentityError::X509(e.to_string()))?;
        Self::from_parsed(&cert)
    }

    /// The identity and the certificate's SubjectPublicKeyInfo (DER) of a DER certificate.
    pub fn with_key_from_cert_der(der: &[u8]) -> Result<(Self, Vec<u8>), IdentityError> {
        let (_, cert) = x509_parser::parse_x509_certificate(der)
            .map_err(|e| IdentityError::X509(e.to_string()))?;
        Ok((
            Self::from_parsed(&cert)?,
            cert.tbs_certificate.subject_pki.raw.to_vec(),
        ))
    }

    pub(crate) fn from_parsed(
        cert: &x509_parser::certificate::X509Certificate<'_>,
    ) -> Result<Self, IdentityError> {
        let oid = x509_parser::oid_registry::Oid::from(IDENTITY_OID)
            .map_err(|_| IdentityError::Malformed("bad oid".into()))?;
        let ext = cert
            .extensions()
            .iter()
            .find(|e| e.oid == oid)
            .ok_or(IdentityError::Missing)?;
        let json = parse_der_utf8_string(ext.value)
            .ok_or_else(|| IdentityError::Malformed("not a DER UTF8String".into()))?;
        serde_json::from_slice(json).map_err(|e| IdentityError::Malformed(e.to_string()))
    }

    pub fn is_builtin(&self, role: &str) -> bool {
        self.kind == IdentityKind::Builtin && self.name == role
    }
}

/// DER `UTF8String` (tag 0x0C) with a definite length.
fn der_utf8_string(content: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(content.len() + 6);
    out.push(0x0C);
    let len = content.len();
    if len < 0x80 {
        out.push(len as u8);
    } else {
        let bytes = (len as u64).to_be_bytes();
        let skip = bytes.iter().take_while(|b| **b == 0).count();
        let significant = bytes.get(skip..).unwrap_or_default();
        out.push(0x80 | significant.len() as u8);
        out.extend_from_slice(significant);
    }
    out.extend_from_slice(content);
    out
}

fn parse_der_utf8_string(der: &[u8]) -> Option<&[u8]> {
    let (&tag, rest) = der.split_first()?;
    if tag != 0x0C {
        return None;
    }
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (first as usize, rest)
    } else {
        let n = (first & 0x7F) as usize;
        if n == 0 || n > 4 {
            return None;
        }
        let len_bytes = rest.get(..n)?;
        let len = len_bytes
            .iter()
            .fold(0usize, |acc, b| (acc << 8) | *b as usize);
        (len, rest.get(n..)?)
    };
    if rest.len() != len {
        return None;
    }
    Some(rest)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn der_string_roundtrip_short_and_long() {
        for n in [0usize, 1, 127, 128, 255, 256, 70_000] {
            let content = vec![b'a'; n];
            let der = der_utf8_string(&content);
            assert_eq!(parse_der_utf8_string(&der), Some(&content[..]), "len {n}");
        }
    }

    #[test]
    fn der_string_rejects_garbage() {
        assert_eq!(parse_der_utf8_string(&[]), None);
        assert_eq!(parse_der_utf8_string(&[0x04, 0x01, 0x41]), None);
        assert_eq!(parse_der_utf8_string(&[0x0C, 0x05, 0x41]), None);
        assert_eq!(parse_der_utf8_string(&[0x0C, 0x85, 1, 1, 1, 1, 1]), None);
        assert_eq!(parse_der_utf8_string(&[0x0C, 0x80]), None);
    }
}
