//! The user's real address, asserted by a proxy. A proxy passes `gatehouse-auth` connections to
//! Auth unterminated (the client's TLS is end to end with Auth), so Auth would see the proxy's
//! address. Before the client's first byte, the proxy writes a *preamble*: the client's address,
//! the time and a nonce, signed with the proxy's own key, and the proxy's certificate. Auth
//! believes it only if the certificate is a proxy's of this cluster (issued by the cluster CA,
//! valid, `@proxy`), the signature verifies, the time is within [`MAX_SKEW`] and the nonce was
//! not seen before; otherwise the preamble is ignored (the socket's address stands) and the TLS
//! that follows goes on. A client cannot forge one: it holds no proxy key.
//!
//! Sans-IO: bytes and `now` in; the address or why not out.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;

use rcgen::SigningKey as _;
use serde::{Deserialize, Serialize};

use crate::identity::IdentityKind;
use crate::tls_authority::TlsAuthority;

/// What a preamble starts with: never the first byte of a TLS record (0x16).
pub const MAGIC: &[u8; 8] = b"GHADDR1\n";
/// Largest preamble body accepted.
pub const MAX_BODY: usize = 8 * 1024;
/// How far the preamble's time may be from Auth's.
pub const MAX_SKEW: i64 = 60;
const CONTEXT: &[u8] = b"gatehouse client address v1\n";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Body {
    /// `client|at|nonce`, the signed claim.
    claim: String,
    /// The proxy's certificate (PEM).
    cert: String,
    /// Ed25519 signature over `CONTEXT || claim`, hex.
    sig: String,
}

/// Why a preamble was not believed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AddrError {
    #[error("preamble is malformed: {0}")]
    Malformed(String),
    #[error("preamble body of {0} bytes is over the limit")]
    TooLarge(usize),
    #[error("preamble certificate: {0}")]
    Certificate(String),
    #[error("preamble certificate is not a proxy's (kind {0:?})")]
    NotAProxy(String),
    #[error("preamble signature does not verify")]
    Signature,
    #[error("preamble is {0} s away from now")]
    Skew(i64),
    #[error("preamble was seen before (a replay)")]
    Replay,
}

/// Signs preambles for one proxy identity (its certificate and key).
pub struct Asserter {
    cert_pem: String,
    key: rcgen::KeyPair,
}

impl std::fmt::Debug for Asserter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Asserter").finish_non_exhaustive()
    }
}

impl Asserter {
    /// From the proxy's certificate and private key (PEM).
    pub fn new(cert_pem: &str, key_pem: &str) -> Result<Self, AddrError> {
        let key = rcgen::KeyPair::from_pem(key_pem)
            .map_err(|e| AddrError::Certificate(format!("key: {e}")))?;
        Ok(Self {
            cert_pem: cert_pem.to_owned(),
            key,
        })
    }

    /// The preamble asserting `client`, at `now` (unix seconds) with `nonce`.
    pub fn preamble(&self, client: SocketAddr, now: i64, nonce: [u8; 16]) -> Vec<u8> {
        let claim = format!("{client}|{now}|{}", hex::encode(nonce));
        let mut msg = CONTEXT.to_vec();
        msg.extend_from_slice(claim.as_bytes());
        let sig = self.key.sign(&msg).map(hex::encode).unwrap_or_default();
        let body = serde_json::to_vec(&Body {
            claim,
            cert: self.cert_pem.clone(),
            sig,
        })
        .unwrap_or_default();
        let mut out = Vec::with_capacity(MAGIC.len() + 4 + body.len());
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&u32::try_from(body.len()).unwrap_or(u32::MAX).to_be_bytes());
        out.extend_from_slice(&body);
        out
    }
}

/// Whether `first` (the connection's first bytes, any length) may start a preamble.
pub fn starts_preamble(first: &[u8]) -> bool {
    let n = first.len().min(MAGIC.len());
    n > 0 && first.get(..n) == MAGIC.get(..n)
}

/// The body length a complete header (`MAGIC` + 4 bytes) announces.
pub fn body_len(header: &[u8; 12]) -> Result<usize, AddrError> {
    if header.get(..8) != Some(MAGIC.as_slice()) {
        return Err(AddrError::Malformed("bad magic".into()));
    }
    let len = u32::from_be_bytes([header[8], header[9], header[10], header[11]]) as usize;
    if len > MAX_BODY {
        return Err(AddrError::TooLarge(len));
    }
    Ok(len)
}

/// Nonces seen lately (each lives `2 * MAX_SKEW`), at most `cap` of them.
#[derive(Debug)]
pub struct ReplayCache {
    seen: HashMap<String, i64>,
    order: VecDeque<(String, i64)>,
    cap: usize,
}

impl Default for ReplayCache {
    fn default() -> Self {
        Self {
            seen: HashMap::new(),
            order: VecDeque::new(),
            cap: 100_000,
        }
    }
}

impl ReplayCache {
    /// Record `nonce` at `now`: false if it was seen within its lifetime.
    fn fresh(&mut self, nonce: &str, now: i64) -> bool {
        while let Some((n, at)) = self.order.front() {
            if now - *at <= 2 * MAX_SKEW && self.order.len() < self.cap {
                break;
            }
            self.seen.remove(n);
            self.order.pop_front();
        }
        if self.seen.contains_key(nonce) {
            return false;
        }
        self.seen.insert(nonce.to_owned(), now);
        self.order.push_back((nonce.to_owned(), now));
        true
    }
}

/// Check a preamble's body against the cluster CA at `now` (either CA during a rotation's
/// grace): the client's address if believed.
pub fn verify(
    body: &[u8],
    ca: &TlsAuthority,
    cluster: &str,
    now: i64,
    replay: &mut ReplayCache,
) -> Result<SocketAddr, AddrError> {
    let body: Body =
        serde_json::from_slice(body).map_err(|e| AddrError::Malformed(e.to_string()))?;
    let mut parts = body.claim.split('|');
    let (Some(client), Some(at), Some(nonce), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(AddrError::Malformed(
            "claim is not client|time|nonce".into(),
        ));
    };
    let client: SocketAddr = client
        .parse()
        .map_err(|_| AddrError::Malformed(format!("`{client}` is not an address")))?;
    let at: i64 = at
        .parse()
        .map_err(|_| AddrError::Malformed("time is not a number".into()))?;
    let der = crate::tls::certs_from_pem(&body.cert)
        .ok()
        .and_then(|c| c.into_iter().next())
        .ok_or_else(|| AddrError::Certificate("no certificate".into()))?;
    let (id, _) = ca
        .verify_issued(&der, now)
        .map_err(|e| AddrError::Certificate(e.to_string()))?;
    if id.cluster != cluster
        || id.kind != IdentityKind::Node
        || !id.roles.iter().any(|r| r == "@proxy")
    {
        return Err(AddrError::NotAProxy(format!("{:?} {}", id.kind, id.name)));
    }
    let (_, cert) = x509_parser::parse_x509_certificate(&der)
        .map_err(|e| AddrError::Certificate(e.to_string()))?;
    let key = cert
        .tbs_certificate
        .subject_pki
        .subject_public_key
        .data
        .as_ref();
    let sig = hex::decode(&body.sig).map_err(|_| AddrError::Signature)?;
    let mut msg = CONTEXT.to_vec();
    msg.extend_from_slice(body.claim.as_bytes());
    aws_lc_rs::signature::UnparsedPublicKey::new(&aws_lc_rs::signature::ED25519, key)
        .verify(&msg, &sig)
        .map_err(|_| AddrError::Signature)?;
    if (now - at).abs() > MAX_SKEW {
        return Err(AddrError::Skew(now - at));
    }
    if !replay.fresh(nonce, now) {
        return Err(AddrError::Replay);
    }
    Ok(client)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ca::{TlsCa, TlsUsage};

    /// The authority of a CA that never rotated (a copy: the tests go on issuing with `ca`).
    fn auth(ca: &TlsCa) -> TlsAuthority {
        TlsAuthority::new(TlsCa::from_pem(ca.cert_pem(), &ca.key_pem()).unwrap())
    }
    use crate::identity::Identity;

    fn identity(kind: IdentityKind, roles: &[&str], expires: i64) -> Identity {
        Identity {
            kind,
            name: "p1".into(),
            roles: roles.iter().map(|r| r.to_string()).collect(),
            logins: vec![],
            traits: Default::default(),
            cluster: "example".into(),
            route_to_cluster: String::new(),
            bot: None,
            expires,
        }
    }

    fn asserter(ca: &TlsCa, id: &Identity, now: time::OffsetDateTime) -> Asserter {
        let (cert, key) = ca
            .issue_with_new_key(id, TlsUsage::ServerAndClient, &[], now)
            .unwrap();
        Asserter::new(&cert.pem(), &key.serialize_pem()).unwrap()
    }

    fn split(pre: &[u8]) -> &[u8] {
        let header: [u8; 12] = pre[..12].try_into().unwrap();
        let len = body_len(&header).unwrap();
        &pre[12..12 + len]
    }

    #[test]
    fn a_proxys_preamble_is_believed_once_and_nothing_else_is() {
        let now = time::OffsetDateTime::now_utc();
        let t = now.unix_timestamp();
        let ca = TlsCa::generate("example", now).unwrap();
        let proxy = asserter(
            &ca,
            &identity(IdentityKind::Node, &["@proxy"], t + 600),
            now,
        );
        let client: SocketAddr = "203.0.113.7:50000".parse().unwrap();
        let pre = proxy.preamble(client, t, [7; 16]);
        assert!(starts_preamble(&pre[..3]) && !starts_preamble(&[0x16, 3, 1]));
        let mut replay = ReplayCache::default();
        assert_eq!(
            verify(split(&pre), &auth(&ca), "example", t, &mut replay),
            Ok(client)
        );
        // The same preamble again is a replay.
        assert_eq!(
            verify(split(&pre), &auth(&ca), "example", t, &mut replay),
            Err(AddrError::Replay)
        );
        // Too old or from the future.
        let old = proxy.preamble(client, t - 61, [8; 16]);
        assert!(matches!(
            verify(split(&old), &auth(&ca), "example", t, &mut replay),
            Err(AddrError::Skew(_))
        ));
        // An agent's certificate (no @proxy) cannot assert addresses, nor can a user's.
        let agent = asserter(&ca, &identity(IdentityKind::Node, &["@node"], t + 600), now);
        let pre = agent.preamble(client, t, [9; 16]);
        assert!(matches!(
            verify(split(&pre), &auth(&ca), "example", t, &mut replay),
            Err(AddrError::NotAProxy(_))
        ));
        // Another cluster's proxy.
        let other = TlsCa::generate("example", now).unwrap();
        let foreign = asserter(
            &other,
            &identity(IdentityKind::Node, &["@proxy"], t + 600),
            now,
        );
        let pre = foreign.preamble(client, t, [10; 16]);
        assert!(matches!(
            verify(split(&pre), &auth(&ca), "example", t, &mut replay),
            Err(AddrError::Certificate(_))
        ));
        // A claim changed after signing (a client rewriting the address).
        let pre = proxy.preamble(client, t, [11; 16]);
        let forged = String::from_utf8(split(&pre).to_vec())
            .unwrap()
            .replace("203.0.113.7", "198.51.100.1");
        assert_eq!(
            verify(forged.as_bytes(), &auth(&ca), "example", t, &mut replay),
            Err(AddrError::Signature)
        );
        // Garbage and oversized headers.
        assert!(verify(b"{nonsense", &auth(&ca), "example", t, &mut replay).is_err());
        let mut big = *b"GHADDR1\n\0\0\0\0";
        big[8..].copy_from_slice(&(MAX_BODY as u32 + 1).to_be_bytes());
        assert_eq!(body_len(&big), Err(AddrError::TooLarge(MAX_BODY + 1)));
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_bodies_never_panic(body in proptest::collection::vec(proptest::num::u8::ANY, 0..512)) {
            let now = time::OffsetDateTime::now_utc();
            let ca = TlsCa::generate("example", now).unwrap();
            let _ = verify(&body, &auth(&ca), "example", now.unix_timestamp(), &mut ReplayCache::default());
        }
    }
}
