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

fn roots(ca_pem: &str) -> Result<Arc<RootCertStore>, TlsError> {
    let mut roots = RootCertStore::empty();
    for c in certs_from_pem(ca_pem)? {
        roots.add(c)?;
    }
    Ok(Arc::new(roots))
}

/// Server config for the Auth API: TLS 1.3, ALPN h2, client certificates from the cluster CA
/// verified when presented and optional (login, join and ping need none; every other call
/// checks the identity itself).
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

/// Server config with the given ALPN protocols (the Proxy's public port uses its own).
pub fn server_config_with_alpn(
    ca_pem: &str,
    cert_chain_pem: &str,
    key_pem: &str,
    alpn: &[&[u8]],
) -> Result<Arc<ServerConfig>, TlsError> {
    let provider = provider();
    let verifier = WebPkiClientVerifier::builder_with_provider(roots(ca_pem)?, provider.clone())
        .allow_unauthenticated()
        .build()
        .map_err(|e| TlsError::Verifier(e.to_string()))?;
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs_from_pem(cert_chain_pem)?, key_from_pem(key_pem)?)?;
    config.alpn_protocols = alpn.iter().map(|a| a.to_vec()).collect();
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
            .with_custom_certificate_verifier(Arc::new(PinnedCaVerifier {
                pin: pin.clone(),
                provider,
            })),
    };
    let mut config = match identity {
        Some((cert, key)) => {
            builder.with_client_auth_cert(certs_from_pem(cert)?, key_from_pem(key)?)?
        }
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = alpn.iter().map(|a| a.to_vec()).collect();
    Ok(Arc::new(config))
}

/// Trusts a server whose chain includes a CA certificate with the pinned SubjectPublicKeyInfo,
/// and whose leaf is valid under that CA (signature, validity, name: full webpki checks).
#[derive(Debug)]
pub struct PinnedCaVerifier {
    pin: String,
    provider: Arc<CryptoProvider>,
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
        let inner =
            WebPkiServerVerifier::builder_with_provider(Arc::new(roots), self.provider.clone())
                .build()
                .map_err(|e| rustls::Error::General(e.to_string()))?;
        inner.verify_server_cert(end_entity, &[], server_name, ocsp_response, now)
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
