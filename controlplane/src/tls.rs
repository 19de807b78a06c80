//! rustls configurations for the Auth API: the server (client certificates optional, verified
//! against the cluster's X.509 CA), clients that trust a stored CA, and clients that bootstrap
//! by pinning the CA's public key (`sha256:…`): no trust on first use.

use std::sync::Arc;

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme};

use crate::ca::spki_pin;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    #[error("tls configuration: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("client verifier: {0}")]
    Verifier(String),
    #[error("PEM: {0}")]
    Pem(String),
    #[error("no {0} found in PEM")]
    Missing(&'static str),
}

/// aws-lc-rs with TLS 1.3 AES-128-GCM-SHA256 preferred (as Go's crypto/tls does on AES-NI
/// hardware): AES-128 runs 10 rounds to AES-256's 14, and SHA-256 has hardware help here
/// (SHA-NI) where the SHA-384 key schedule does not. AES-256-GCM and ChaCha20 stay available.
pub fn provider() -> Arc<CryptoProvider> {
    let mut p = rustls::crypto::aws_lc_rs::default_provider();
    p.cipher_suites.sort_by_key(|s| match s.suite() {
        rustls::CipherSuite::TLS13_AES_128_GCM_SHA256 => 0,
        rustls::CipherSuite::TLS13_AES_256_GCM_SHA384 => 1,
        _ => 2,
    });
    Arc::new(p)
}

pub fn certs_from_pem(pem: &str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = rustls_pemfile::certs(&mut pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Pem(e.to_string()))?;
    if certs.is_empty() {
        return Err(TlsError::Missing("certificate"));
    }
    Ok(certs)
}

pub fn key_from_pem(pem: &str) -> Result<PrivateKeyDer<'static>, TlsError> {
    rustls_pemfile::private_key(&mut pem.as_bytes())
        .map_err(|e| TlsError::Pem(e.to_string()))?
        .ok_or(TlsError::Missing("private key"))
}

pub(crate) fn roots(ca_pem: &str) -> Result<Arc<RootCertStore>, TlsError> {
    let mut roots = RootCertStore::empty();
    for c in certs_from_pem(ca_pem)? {
        roots.add(c)?;
    }
    Ok(Arc::new(roots))
}

/// Server config for the Auth API: TLS 1.3, ALPN h2, client certificates from the cluster CA
/// verified when presented and optional (login, join and ping need none; every other call
/// checks the identity itself).
/// A private key as PEM that OpenSSL 3.0, curl and Python's `ssl` load: an Ed25519 key in
/// PKCS#8 v1 (RFC 8410's `OneAsymmetricKey` version 0, without the public key), which is what
/// they read; rcgen writes v2 (with the public key), which OpenSSL 3.0 refuses. Other keys are
/// left as rcgen writes them.
pub fn key_pem_for_tools(key: &rcgen::KeyPair) -> String {
    // SEQUENCE { INTEGER 1, SEQUENCE { OID 1.3.101.112 }, OCTET STRING { OCTET STRING seed } ...
    const V2_PREFIX: [u8; 16] = [
        0x30, 0x51, 0x02, 0x01, 0x01, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04,
        0x20,
    ];
    const V1_PREFIX: [u8; 16] = [
        0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04,
        0x20,
    ];
    let der = key.serialize_der();
    match (der.get(..16), der.get(16..48)) {
        (Some(prefix), Some(seed)) if prefix == V2_PREFIX => {
            let mut v1 = V1_PREFIX.to_vec();
            v1.extend_from_slice(seed);
            pem::encode_config(
                &pem::Pem::new("PRIVATE KEY", v1),
                pem::EncodeConfig::new().set_line_ending(pem::LineEnding::LF),
            )
        }
        _ => key.serialize_pem(),
    }
}

pub fn server_config(
    ca_pem: &str,
    cert_chain_pem: &str,
    key_pem: &str,
) -> Result<Arc<ServerConfig>, TlsError> {
    // gRPC runs over h2 either way; `gatehouse-auth` is what clients offer so that a Proxy can
    // recognise and pass the connection through.
    server_config_with_alpn(
        ca_pem,
        cert_chain_pem,
        key_pem,
        &[crate::identity::ALPN_AUTH, b"h2"],
    )
}

/// Check a client certificate (PEM, leaf first) the way Auth will: issued by the CA in
/// `ca_pem`, for client authentication, valid now. Lets a client say what is wrong before a
/// server can only close the connection.
pub fn verify_client_cert(ca_pem: &str, cert_pem: &str) -> Result<(), TlsError> {
    let verifier = WebPkiClientVerifier::builder_with_provider(roots(ca_pem)?, provider())
        .build()
        .map_err(|e| TlsError::Verifier(e.to_string()))?;
    let certs = certs_from_pem(cert_pem)?;
    let (leaf, rest) = certs
        .split_first()
        .ok_or(TlsError::Missing("certificate"))?;
    verifier.verify_client_cert(leaf, rest, UnixTime::now())?;
    Ok(())
}

/// The validity of the first certificate in `pem` (Unix seconds: not before, not after).
pub fn cert_validity(pem: &str) -> Option<(i64, i64)> {
    let der = certs_from_pem(pem).ok()?;
    let (_, cert) = x509_parser::parse_x509_certificate(der.first()?.as_ref()).ok()?;
    let v = cert.validity();
    Some((v.not_before.timestamp(), v.not_after.timestamp()))
}

/// A server certificate that is replaced while the server runs (a renewed proxy certificate):
/// handshakes from then on present the new one; connections up keep theirs. A proxy may also
/// hold a certificate for browsers (the operator's, e.g. ACME-issued: `proxy.tls_cert`):
/// a client offering any `gatehouse-*` ALPN gets the cluster's, every other client that one.
#[derive(Debug)]
pub struct ReloadableCert {
    cluster: arc_swap::ArcSwap<rustls::sign::CertifiedKey>,
    browsers: arc_swap::ArcSwapOption<rustls::sign::CertifiedKey>,
}

impl ReloadableCert {
    pub fn new(cert_chain_pem: &str, key_pem: &str) -> Result<Arc<Self>, TlsError> {
        Ok(Arc::new(Self {
            cluster: arc_swap::ArcSwap::from_pointee(certified_key(cert_chain_pem, key_pem)?),
            browsers: arc_swap::ArcSwapOption::empty(),
        }))
    }

    /// Present this certificate (chain) and key from now on.
    pub fn set(&self, cert_chain_pem: &str, key_pem: &str) -> Result<(), TlsError> {
        self.cluster
            .store(Arc::new(certified_key(cert_chain_pem, key_pem)?));
        Ok(())
    }

    /// Present this certificate (chain) and key to browsers from now on.
    pub fn set_for_browsers(&self, cert_chain_pem: &str, key_pem: &str) -> Result<(), TlsError> {
        self.browsers
            .store(Some(Arc::new(certified_key(cert_chain_pem, key_pem)?)));
        Ok(())
    }
}

impl rustls::server::ResolvesServerCert for ReloadableCert {
    fn resolve(
        &self,
        hello: rustls::server::ClientHello<'_>,
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        let ours = hello
            .alpn()
            .is_some_and(|mut offered| offered.any(|a| a.starts_with(b"gatehouse-")));
        if !ours && let Some(browsers) = self.browsers.load_full() {
            return Some(browsers);
        }
        Some(self.cluster.load_full())
    }
}

fn certified_key(
    cert_chain_pem: &str,
    key_pem: &str,
) -> Result<rustls::sign::CertifiedKey, TlsError> {
    let certs = certs_from_pem(cert_chain_pem)?;
    let key = provider()
        .key_provider
        .load_private_key(key_from_pem(key_pem)?)?;
    let ck = rustls::sign::CertifiedKey::new(certs, key);
    ck.keys_match()?;
    Ok(ck)
}

/// Server config with the given ALPN protocols (the Proxy's public port uses its own).
pub fn server_config_with_alpn(
    ca_pem: &str,
    cert_chain_pem: &str,
    key_pem: &str,
    alpn: &[&[u8]],
) -> Result<Arc<ServerConfig>, TlsError> {
    server_config_with_resolver(ca_pem, ReloadableCert::new(cert_chain_pem, key_pem)?, alpn)
}

/// [`server_config_with_alpn`] presenting whatever `cert` holds (see [`ReloadableCert`]).
pub fn server_config_with_resolver(
    ca_pem: &str,
    cert: Arc<ReloadableCert>,
    alpn: &[&[u8]],
) -> Result<Arc<ServerConfig>, TlsError> {
    let verifier = WebPkiClientVerifier::builder_with_provider(roots(ca_pem)?, provider())
        .allow_unauthenticated()
        .build()
        .map_err(|e| TlsError::Verifier(e.to_string()))?;
    server_config_with_verifier(Arc::new(CachingClientVerifier::new(verifier)), cert, alpn)
}

/// A server config checking client certificates with `verifier` (e.g. a proxy's
/// [`crate::leaf_trust::ClusterClientVerifier`]), presenting whatever `cert` holds.
pub fn server_config_with_verifier(
    verifier: Arc<dyn rustls::server::danger::ClientCertVerifier>,
    cert: Arc<ReloadableCert>,
    alpn: &[&[u8]],
) -> Result<Arc<ServerConfig>, TlsError> {
    let provider = provider();
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(cert);
    config.alpn_protocols = alpn.iter().map(|a| a.to_vec()).collect();
    // The data plane's TLS stream takes the records over from rustls after the handshake
    // (gatehouse-dataplane's `tls_records`); rustls hands the traffic keys only to a config
    // that allows it. Nothing else extracts them.
    config.enable_secret_extraction = true;
    Ok(Arc::new(config))
}

/// How a client decides to trust the server.
#[derive(Debug, Clone)]
pub enum Trust {
    /// First contact: the server's chain must contain a CA whose public key has this pin.
    Pin(String),
    /// The cluster's CA certificate(s), PEM.
    CaPem(String),
}

/// Client config for the Auth API, with an optional client identity (cert chain PEM, key PEM).
pub fn client_config(
    trust: &Trust,
    identity: Option<(&str, &str)>,
) -> Result<Arc<ClientConfig>, TlsError> {
    client_config_with_alpn(trust, identity, &[crate::identity::ALPN_AUTH])
}

/// Client config offering the given ALPN protocols (the Proxy's tunnel, ssh and tcp ports).
pub fn client_config_with_alpn(
    trust: &Trust,
    identity: Option<(&str, &str)>,
    alpn: &[&[u8]],
) -> Result<Arc<ClientConfig>, TlsError> {
    let provider = provider();
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])?;
    let builder = match trust {
        Trust::CaPem(pem) => builder.with_root_certificates(roots(pem)?),
        Trust::Pin(pin) => builder
            .dangerous() // not dangerous: the pin verifier delegates to webpki with the pinned root
            .with_custom_certificate_verifier(Arc::new(PinnedCaVerifier::new(pin))),
    };
    let mut config = match identity {
        Some((cert, key)) => {
            builder.with_client_auth_cert(certs_from_pem(cert)?, key_from_pem(key)?)?
        }
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = alpn.iter().map(|a| a.to_vec()).collect();
    // The data plane's TLS stream takes the records over from rustls after the handshake
    // (gatehouse-dataplane's `tls_records`); rustls hands the traffic keys only to a config
    // that allows it. Nothing else extracts them.
    config.enable_secret_extraction = true;
    Ok(Arc::new(config))
}

/// Trusts a server whose chain includes a CA certificate with the pinned SubjectPublicKeyInfo,
/// and whose leaf is valid under that CA (signature, validity, name: full webpki checks),
/// directly or through the chain's other certificates (during a TLS CA rotation, the new CA
/// cross-signed by the pinned one).
#[derive(Debug)]
pub struct PinnedCaVerifier {
    pin: String,
    provider: Arc<CryptoProvider>,
}

impl PinnedCaVerifier {
    pub fn new(pin: &str) -> Self {
        Self {
            pin: pin.to_owned(),
            provider: provider(),
        }
    }
}

impl ServerCertVerifier for PinnedCaVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let ca = intermediates
            .iter()
            .find(|c| spki_pin(c).as_deref() == Some(self.pin.as_str()))
            .ok_or_else(|| {
                rustls::Error::General(format!(
                    "the server's CA does not match the pinned {} (wrong --ca-pin, or not a Gatehouse Auth server)",
                    self.pin
                ))
            })?;
        let mut roots = RootCertStore::empty();
        roots.add(ca.clone().into_owned())?;
        let rest: Vec<CertificateDer<'_>> = intermediates
            .iter()
            .filter(|c| c.as_ref() != ca.as_ref())
            .cloned()
            .collect();
        let inner =
            WebPkiServerVerifier::builder_with_provider(Arc::new(roots), self.provider.clone())
                .build()
                .map_err(|e| rustls::Error::General(e.to_string()))?;
        inner.verify_server_cert(end_entity, &rest, server_name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// At most this many verified client chains are remembered (then the cache starts over).
const VERIFIED_CACHE: usize = 32 * 1024;

/// The WebPKI client verifier with a memory: a certificate chain that verified once (the exact
/// DER bytes, against this server's roots) is not verified again while it is within its
/// validity. Chain verification is an ECDSA verification per certificate, about a sixth of the
/// proxy's CPU per new session; users open many sessions with one certificate and agents
/// reconnect with theirs. The handshake signature (`CertificateVerify`, which proves the client
/// holds the key) is still checked every time, and validity is checked against `now` on every
/// use. Gatehouse has no revocation list; when one comes, it must be consulted here too.
#[derive(Debug)]
pub struct CachingClientVerifier {
    inner: Arc<dyn rustls::server::danger::ClientCertVerifier>,
    /// sha256 of the chain → (not before, not after) in Unix seconds.
    verified: std::sync::Mutex<std::collections::HashMap<[u8; 32], (u64, u64)>>,
    hits: std::sync::atomic::AtomicU64,
}

impl CachingClientVerifier {
    pub fn new(inner: Arc<dyn rustls::server::danger::ClientCertVerifier>) -> Self {
        Self {
            inner,
            verified: std::sync::Mutex::new(std::collections::HashMap::new()),
            hits: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// Verifications answered from memory so far.
    pub fn hits(&self) -> u64 {
        self.hits.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn key(end_entity: &CertificateDer<'_>, intermediates: &[CertificateDer<'_>]) -> [u8; 32] {
        use sha2::Digest;
        let mut h = sha2::Sha256::new();
        for cert in std::iter::once(end_entity).chain(intermediates) {
            h.update((cert.len() as u64).to_be_bytes());
            h.update(cert.as_ref());
        }
        h.finalize().into()
    }

    /// The window in which every certificate of the chain is valid.
    fn validity(
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
    ) -> Option<(u64, u64)> {
        let mut window = (0u64, u64::MAX);
        for cert in std::iter::once(end_entity).chain(intermediates) {
            let (_, c) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
            let from = u64::try_from(c.validity().not_before.timestamp()).ok()?;
            let to = u64::try_from(c.validity().not_after.timestamp()).ok()?;
            window = (window.0.max(from), window.1.min(to));
        }
        Some(window)
    }
}

impl rustls::server::danger::ClientCertVerifier for CachingClientVerifier {
    fn offer_client_auth(&self) -> bool {
        self.inner.offer_client_auth()
    }

    fn client_auth_mandatory(&self) -> bool {
        self.inner.client_auth_mandatory()
    }

    fn root_hint_subjects(&self) -> &[rustls::DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<rustls::server::danger::ClientCertVerified, rustls::Error> {
        let key = Self::key(end_entity, intermediates);
        let t = now.as_secs();
        let known = self.verified.lock().ok().and_then(|m| m.get(&key).copied());
        if let Some((from, to)) = known
            && from <= t
            && t <= to
        {
            self.hits.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            return Ok(rustls::server::danger::ClientCertVerified::assertion());
        }
        let verified = self
            .inner
            .verify_client_cert(end_entity, intermediates, now)?;
        if let (Some(window), Ok(mut m)) = (
            Self::validity(end_entity, intermediates),
            self.verified.lock(),
        ) {
            if m.len() >= VERIFIED_CACHE {
                m.clear();
            }
            m.insert(key, window);
        }
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

#[cfg(test)]
mod verifier_cache_tests {
    // Test code: a failing unwrap is a failing test.
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use rustls::server::danger::ClientCertVerifier;

    use super::*;

    fn ca(cn: &str) -> (rcgen::Issuer<'static, rcgen::KeyPair>, String) {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        p.distinguished_name.push(rcgen::DnType::CommonName, cn);
        let pem = p.self_signed(&key).unwrap().pem();
        (rcgen::Issuer::new(p, key), pem)
    }

    /// A client certificate valid from `from` to `to` (Unix seconds).
    fn leaf(
        issuer: &rcgen::Issuer<'static, rcgen::KeyPair>,
        from: i64,
        to: i64,
    ) -> CertificateDer<'static> {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut p = rcgen::CertificateParams::new(vec!["client".to_string()]).unwrap();
        p.distinguished_name
            .push(rcgen::DnType::CommonName, "client");
        p.not_before = time::OffsetDateTime::from_unix_timestamp(from).unwrap();
        p.not_after = time::OffsetDateTime::from_unix_timestamp(to).unwrap();
        p.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
        p.signed_by(&key, issuer).unwrap().der().clone()
    }

    fn verifier(ca_pem: &str) -> CachingClientVerifier {
        let inner = WebPkiClientVerifier::builder_with_provider(roots(ca_pem).unwrap(), provider())
            .build()
            .unwrap();
        CachingClientVerifier::new(inner)
    }

    fn at(secs: u64) -> UnixTime {
        UnixTime::since_unix_epoch(std::time::Duration::from_secs(secs))
    }

    #[test]
    fn a_verified_chain_is_remembered_only_within_its_validity() {
        let (issuer, pem) = ca("cache CA");
        let v = verifier(&pem);
        let now = 1_900_000_000;
        let cert = leaf(&issuer, now - 60, now + 3600);
        v.verify_client_cert(&cert, &[], at(now as u64)).unwrap();
        assert_eq!(v.hits(), 0);
        v.verify_client_cert(&cert, &[], at(now as u64 + 10))
            .unwrap();
        assert_eq!(
            v.hits(),
            1,
            "the second verification should come from memory"
        );
        // Past its expiry the remembered result does not apply and the chain fails.
        assert!(
            v.verify_client_cert(&cert, &[], at(now as u64 + 3601))
                .is_err()
        );
        // Before its start likewise.
        assert!(
            v.verify_client_cert(&cert, &[], at(now as u64 - 120))
                .is_err()
        );
        assert_eq!(v.hits(), 1);
    }

    #[test]
    fn a_chain_that_failed_is_never_remembered() {
        let (_, pem) = ca("cache CA");
        let (other, _) = ca("other CA");
        let v = verifier(&pem);
        let now = 1_900_000_000;
        let foreign = leaf(&other, now - 60, now + 3600);
        for _ in 0..3 {
            assert!(v.verify_client_cert(&foreign, &[], at(now as u64)).is_err());
        }
        assert_eq!(v.hits(), 0);
    }
}
