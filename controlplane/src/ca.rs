//! The cluster's three certificate authorities: SSH user CA, SSH host CA (Ed25519, OpenSSH
//! certificates via `ssh-key`) and the X.509 CA (ECDSA P-256 via `rcgen`), which certifies
//! Ed25519 and ECDSA P-256/P-384 keys; every leaf key Gatehouse generates is Ed25519
//! ([`generate_leaf_key`]).
//!
//! Everything here is pure: keys and `now` in, certificates out. Storage and policy live elsewhere.

use std::time::Duration;

use rand::RngCore;
use rcgen::{
    BasicConstraints, CertificateParams, CustomExtension, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use sha2::{Digest, Sha256};
use ssh_key::certificate::{Builder as SshCertBuilder, CertType};
use ssh_key::{Algorithm, LineEnding, PrivateKey, PublicKey};

use crate::identity::{AUTH_SERVER_NAME, Identity};

/// Certificates are back-dated this much to tolerate clock skew between hosts.
pub const CLOCK_SKEW_ALLOWANCE: Duration = Duration::from_secs(60);

/// Always present in user certificates so the principal list is never empty: OpenSSH treats a
/// certificate with no principals as valid for *every* login. A leading dash is not a valid
/// Unix user name, so this principal can never match a real account.
pub const NO_LOGIN_PRINTCIPAL: &str = "-gatehouse-nologin";

/// OpenSSH certificate extensions that carry the Gatehouse identity (ignored by sshd).
pub mod ssh_ext {
    pub const ROLES: &str = "roles@gatehouse.dev";
    pub const TRAITS: &str = "traits@gatehouse.dev";
    pub const ROUTE_TO_CLUSTER: &str = "route-to-cluster@gatehouse.dev";
    pub const CLUSTER: &str = "cluster@gatehouse.dev";
    /// Present when the roles let remote forwards listen where the client asks.
    pub const REMOTE_FORWARD_ANY: &str = "remote-forward-any@gatehouse.dev";
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CaError {
    #[error("ssh: {0}")]
    Ssh(#[from] ssh_key::Error),
    #[error("x509: {0}")]
    X509(#[from] rcgen::Error),
    #[error("public key is not usable: {0}")]
    BadPublicKey(String),
    #[error("stored CA is corrupt: {0}")]
    Corrupt(String),
    #[error("certificate refused: {0}")]
    BadCertificate(String),
}

/// Generate the key of a new TLS leaf certificate: users (`gsh`), hosts and bots joining, the
/// in-process Proxy, the Auth server and the admin identity.
///
/// Ed25519, because the Proxy checks a client's `CertificateVerify` signature on every new
/// session and makes its own on every full handshake: aws-lc-rs verifies Ed25519 in 25 µs and
/// signs in 6 µs on this project's benchmark machine, against 36 µs and 12 µs for ECDSA P-256,
/// about a sixth of the Proxy's CPU per full handshake. Every client and server here is rustls
/// (or OpenSSL in tests), which take Ed25519 certificates; the CA itself stays ECDSA P-256,
/// and keys made before (P-256) keep working: [`check_tls_public_key`] accepts both.
pub fn generate_leaf_key() -> Result<KeyPair, CaError> {
    Ok(KeyPair::generate_for(&rcgen::PKCS_ED25519)?)
}

/// A self-signed certificate for the web UI's browsers (ECDSA P-256, a year) where no cluster
/// CA key is at hand (a proxy joined to a remote Auth, without `proxy.tls_cert`): browsers warn
/// either way until an operator's certificate is configured. Returns (cert PEM, key PEM).
pub fn self_signed_browser_cert(sans: &[String]) -> Result<(String, String), CaError> {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let mut params = CertificateParams::new(sans.to_vec())?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, "Gatehouse web UI (self-signed)");
    params.distinguished_name = dn;
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - CLOCK_SKEW_ALLOWANCE;
    params.not_after = now + time::Duration::days(365);
    params.serial_number = Some(random_serial());
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let cert = params.self_signed(&key)?;
    Ok((cert.pem(), key.serialize_pem()))
}

/// The TLS public keys the CA certifies: Ed25519, ECDSA P-256 and P-384 (DER
/// SubjectPublicKeyInfo). RSA and other curves are refused, so a client cannot get a weak or
/// slow-to-verify key certified; the request is checked before any password or token work.
pub fn check_tls_public_key(spki_der: &[u8]) -> Result<rcgen::SubjectPublicKeyInfo, CaError> {
    let public = rcgen::SubjectPublicKeyInfo::from_der(spki_der)
        .map_err(|e| CaError::BadPublicKey(e.to_string()))?;
    let alg = rcgen::PublicKeyData::algorithm(&public);
    let accepted = [
        &rcgen::PKCS_ED25519,
        &rcgen::PKCS_ECDSA_P256_SHA256,
        &rcgen::PKCS_ECDSA_P384_SHA384,
    ];
    if !accepted.contains(&alg) {
        return Err(CaError::BadPublicKey(
            "only Ed25519 and ECDSA P-256/P-384 keys are certified".into(),
        ));
    }
    Ok(public)
}

/// Which CA. Stored under these names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CaKind {
    SshUser,
    SshHost,
    Tls,
}

impl CaKind {
    pub fn as_str(self) -> &'static str {
        match self {
            CaKind::SshUser => "ssh_user",
            CaKind::SshHost => "ssh_host",
            CaKind::Tls => "tls",
        }
    }
}

/// An Ed25519 OpenSSH CA.
pub struct SshCa {
    key: PrivateKey,
    signer: CaSigner,
}

/// The CA key as aws-lc-rs holds it, built once: `ssh-key` rebuilds the Ed25519 signing key
/// (a SHA-512 and a scalar multiplication) for every signature, most of a certificate's cost.
struct CaSigner {
    pair: aws_lc_rs::signature::Ed25519KeyPair,
    public: ssh_key::public::KeyData,
}

impl CaSigner {
    fn new(key: &PrivateKey) -> Result<Self, CaError> {
        let ed = key
            .key_data()
            .ed25519()
            .ok_or_else(|| CaError::Corrupt("the SSH CA key is not Ed25519".into()))?;
        let seed: &[u8; 32] = ed.private.as_ref();
        let public: &[u8; 32] = ed.public.as_ref();
        let pair = aws_lc_rs::signature::Ed25519KeyPair::from_seed_and_public_key(seed, public)
            .map_err(|e| CaError::Corrupt(format!("the SSH CA key: {e}")))?;
        Ok(Self {
            pair,
            public: key.public_key().key_data().clone(),
        })
    }
}

impl signature::Signer<ssh_key::Signature> for CaSigner {
    fn try_sign(&self, msg: &[u8]) -> Result<ssh_key::Signature, signature::Error> {
        let sig = self.pair.sign(msg);
        ssh_key::Signature::new(Algorithm::Ed25519, sig.as_ref().to_vec())
            .map_err(|_| signature::Error::new())
    }
}

impl From<&CaSigner> for ssh_key::public::KeyData {
    fn from(s: &CaSigner) -> Self {
        s.public.clone()
    }
}

impl std::fmt::Debug for SshCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SshCa")
            .field("public", &self.public_line())
            .finish()
    }
}

/// What goes into an SSH user certificate.
#[derive(Debug, Clone)]
pub struct SshUserCertRequest<'a> {
    pub identity: &'a Identity,
    pub permit_pty: bool,
    pub permit_port_forwarding: bool,
    pub permit_agent_forwarding: bool,
    pub permit_x11_forwarding: bool,
    pub remote_forward_any: bool,
}

impl SshCa {
    pub fn generate() -> Result<Self, CaError> {
        Self::from_key(PrivateKey::random(
            &mut rand::rngs::OsRng,
            Algorithm::Ed25519,
        )?)
    }

    pub fn from_openssh(private: &str) -> Result<Self, CaError> {
        Self::from_key(PrivateKey::from_openssh(private)?)
    }

    fn from_key(key: PrivateKey) -> Result<Self, CaError> {
        let signer = CaSigner::new(&key)?;
        Ok(Self { key, signer })
    }

    pub fn private_openssh(&self) -> Result<zeroize::Zeroizing<String>, CaError> {
        Ok(self.key.to_openssh(LineEnding::LF)?)
    }

    /// `ssh-ed25519 AAAA…` (no comment).
    pub fn public_line(&self) -> String {
        self.key.public_key().to_openssh().unwrap_or_default()
    }

    pub fn public_key(&self) -> &PublicKey {
        self.key.public_key()
    }

    fn builder(
        &self,
        subject: &PublicKey,
        now: u64,
        valid_before: u64,
    ) -> Result<SshCertBuilder, CaError> {
        let valid_after = now.saturating_sub(CLOCK_SKEW_ALLOWANCE.as_secs());
        let mut b = SshCertBuilder::new_with_random_nonce(
            &mut rand::rngs::OsRng,
            subject.key_data().clone(),
            valid_after,
            valid_before,
        )?;
        b.serial(rand::rngs::OsRng.next_u64())?;
        Ok(b)
    }

    /// Sign a user certificate for `subject`. Principals are the identity's logins (plus the
    /// no-login guard); validity ends at `identity.expires`.
    pub fn sign_user(
        &self,
        subject: &PublicKey,
        req: &SshUserCertRequest<'_>,
        now: u64,
    ) -> Result<ssh_key::Certificate, CaError> {
        let id = req.identity;
        let mut b = self.builder(subject, now, id.expires.max(0) as u64)?;
        b.cert_type(CertType::User)?;
        b.key_id(id.name.clone())?;
        for login in &id.logins {
            b.valid_principal(login.clone())?;
        }
        b.valid_principal(NO_LOGIN_PRINTCIPAL)?;
        if req.permit_pty {
            b.extension("permit-pty", "")?;
        }
        if req.permit_port_forwarding {
            b.extension("permit-port-forwarding", "")?;
        }
        if req.permit_agent_forwarding {
            b.extension("permit-agent-forwarding", "")?;
        }
        if req.permit_x11_forwarding {
            b.extension("permit-X11-forwarding", "")?;
        }
        if req.remote_forward_any {
            b.extension(ssh_ext::REMOTE_FORWARD_ANY, "")?;
        }
        let roles = serde_json::to_string(&id.roles).unwrap_or_default();
        let traits = serde_json::to_string(&id.traits).unwrap_or_default();
        b.extension(ssh_ext::ROLES, roles)?;
        b.extension(ssh_ext::TRAITS, traits)?;
        b.extension(ssh_ext::CLUSTER, id.cluster.clone())?;
        b.extension(ssh_ext::ROUTE_TO_CLUSTER, id.route_to_cluster.clone())?;
        b.comment(format!("{}@{}", id.name, id.cluster))?;
        Ok(b.sign(&self.signer)?)
    }

    /// Sign a host certificate: principals are the host id, `<host id>.<cluster>`, the host name
    /// and its addresses.
    pub fn sign_host(
        &self,
        subject: &PublicKey,
        host_id: &str,
        cluster: &str,
        principals: &[String],
        now: u64,
        valid_before: u64,
    ) -> Result<ssh_key::Certificate, CaError> {
        let mut b = self.builder(subject, now, valid_before)?;
        b.cert_type(CertType::Host)?;
        b.key_id(host_id)?;
        b.valid_principal(host_id)?;
        b.valid_principal(format!("{host_id}.{cluster}"))?;
        for p in principals {
            b.valid_principal(p.clone())?;
        }
        b.comment(format!("{host_id}.{cluster}"))?;
        Ok(b.sign(&self.signer)?)
    }
}

/// The cluster's X.509 CA (ECDSA P-256).
pub struct TlsCa {
    cert_der: Vec<u8>,
    cert_pem: String,
    issuer: Issuer<'static, KeyPair>,
    /// The CA's public key (an uncompressed P-256 point), to check certificates it issued.
    public: Vec<u8>,
    /// Digests of the certificates this process signed, so that checking one of them back
    /// (a renewal's `current_cert`) costs a hash instead of an ECDSA verification.
    issued: IssuedDigests,
}

/// A CA certificate's parameters: named `common_name` of `organization` (encoded the same way
/// each time: path building matches names byte for byte), at most `path_len` CAs below it.
fn ca_params(
    common_name: &str,
    organization: &str,
    path_len: u8,
    not_before: time::OffsetDateTime,
    not_after: time::OffsetDateTime,
) -> CertificateParams {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, common_name);
    dn.push(DnType::OrganizationName, organization);
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(path_len));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.not_before = not_before;
    params.not_after = not_after;
    params.serial_number = Some(random_serial());
    params
}

/// SHA-256 digests of DER certificates signed here, with their expiry (Unix seconds). A
/// certificate whose digest is here was signed by this CA (SHA-256 is collision resistant);
/// one that is not (another Auth's, or from before a restart) is verified by signature.
#[derive(Default)]
struct IssuedDigests {
    inner: std::sync::Mutex<std::collections::HashMap<[u8; 32], i64>>,
}

/// Most digests kept (about 50 bytes each): past it the expired ones go, then all.
const MAX_ISSUED_DIGESTS: usize = 1 << 20;

impl IssuedDigests {
    fn digest(der: &[u8]) -> [u8; 32] {
        let d = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, der);
        let mut out = [0u8; 32];
        out.copy_from_slice(d.as_ref());
        out
    }

    fn remember(&self, der: &[u8], expires: i64, now: i64) {
        let key = Self::digest(der);
        let mut map = self
            .inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if map.len() >= MAX_ISSUED_DIGESTS {
            map.retain(|_, e| *e > now);
            if map.len() >= MAX_ISSUED_DIGESTS {
                map.clear();
            }
        }
        map.insert(key, expires);
    }

    fn contains(&self, der: &[u8]) -> bool {
        let key = Self::digest(der);
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .contains_key(&key)
    }
}

impl std::fmt::Debug for TlsCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsCa").field("pin", &self.pin()).finish()
    }
}

/// What an X.509 certificate is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsUsage {
    /// Client authentication only (users, bots, admin).
    Client,
    /// Server and client (Auth, proxies, agents).
    ServerAndClient,
}

impl TlsCa {
    /// Create a new self-signed CA for `cluster`, valid for ten years.
    pub fn generate(cluster: &str, now: time::OffsetDateTime) -> Result<Self, CaError> {
        Self::generate_named(cluster, &format!("{cluster} Gatehouse CA"), now)
    }

    /// [`TlsCa::generate`] with its own common name: a rotation's new CA is named apart from
    /// the one it replaces, so that path building (and OpenSSL's lookup by name) never confuses
    /// the two.
    pub fn generate_named(
        cluster: &str,
        common_name: &str,
        now: time::OffsetDateTime,
    ) -> Result<Self, CaError> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        // Path length 1: a cross-signed copy of a rotated-to CA sits between this one and leaves.
        let params = ca_params(
            common_name,
            cluster,
            1,
            now - CLOCK_SKEW_ALLOWANCE,
            now + time::Duration::days(3650),
        );
        let cert = params.self_signed(&key)?;
        let cert_der = cert.der().to_vec();
        Ok(Self {
            cert_pem: cert.pem(),
            cert_der,
            public: key.public_key_raw().to_vec(),
            issuer: Issuer::new(params, key),
            issued: IssuedDigests::default(),
        })
    }

    /// Load from stored PEMs.
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Self, CaError> {
        let key = KeyPair::from_pem(key_pem)?;
        let parsed = pem::parse(cert_pem).map_err(|e| CaError::Corrupt(e.to_string()))?;
        let cert_der = parsed.contents().to_vec();
        let public = key.public_key_raw().to_vec();
        let issuer = Issuer::from_ca_cert_der(&cert_der.clone().into(), key)?;
        Ok(Self {
            cert_der,
            cert_pem: cert_pem.to_owned(),
            issuer,
            public,
            issued: IssuedDigests::default(),
        })
    }

    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// A certificate for `other`'s key and name issued by this CA (a cross-signature): a party
    /// that trusts only this CA accepts certificates `other` issues when this one follows them.
    pub fn cross_sign(&self, other: &TlsCa, now: time::OffsetDateTime) -> Result<String, CaError> {
        let bad = |m: String| CaError::Corrupt(format!("the CA to cross-sign: {m}"));
        let (_, cert) =
            x509_parser::parse_x509_certificate(&other.cert_der).map_err(|e| bad(e.to_string()))?;
        // The same name, encoded as `generate_named` encodes it (path building matches bytes).
        let name = |v: Option<&x509_parser::x509::AttributeTypeAndValue<'_>>| {
            v.and_then(|v| v.as_str().ok())
                .map(str::to_owned)
                .ok_or_else(|| bad("no common name or organization".into()))
        };
        let params = ca_params(
            &name(cert.subject().iter_common_name().next())?,
            &name(cert.subject().iter_organization().next())?,
            0,
            now - CLOCK_SKEW_ALLOWANCE,
            cert.validity().not_after.to_datetime(),
        );
        Ok(params.signed_by(other.issuer.key(), &self.issuer)?.pem())
    }

    pub fn cert_der(&self) -> &[u8] {
        &self.cert_der
    }

    pub fn key_pem(&self) -> zeroize::Zeroizing<String> {
        zeroize::Zeroizing::new(self.issuer.key().serialize_pem())
    }

    /// `sha256:<hex>` of the CA's SubjectPublicKeyInfo: what clients pin.
    pub fn pin(&self) -> String {
        spki_pin(&self.cert_der).unwrap_or_default()
    }

    /// Sign a certificate for `subject_spki` (DER SubjectPublicKeyInfo) carrying `identity`.
    pub fn sign(
        &self,
        subject_spki: &[u8],
        identity: &Identity,
        usage: TlsUsage,
        dns_or_ip_sans: &[String],
        now: time::OffsetDateTime,
    ) -> Result<rcgen::Certificate, CaError> {
        let public = check_tls_public_key(subject_spki)?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, identity.name.clone());
        dn.push(DnType::OrganizationName, identity.cluster.clone());
        params.distinguished_name = dn;
        params.not_before = now - CLOCK_SKEW_ALLOWANCE;
        params.not_after = time::OffsetDateTime::from_unix_timestamp(identity.expires)
            .map_err(|e| CaError::BadPublicKey(format!("expiry out of range: {e}")))?;
        params.serial_number = Some(random_serial());
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.use_authority_key_identifier_extension = true;
        params.extended_key_usages = match usage {
            TlsUsage::Client => vec![ExtendedKeyUsagePurpose::ClientAuth],
            TlsUsage::ServerAndClient => {
                vec![
                    ExtendedKeyUsagePurpose::ServerAuth,
                    ExtendedKeyUsagePurpose::ClientAuth,
                ]
            }
        };
        for san in dns_or_ip_sans {
            let san = match san.parse::<std::net::IpAddr>() {
                Ok(ip) => SanType::IpAddress(ip),
                Err(_) => SanType::DnsName(san.clone().try_into()?),
            };
            params.subject_alt_names.push(san);
        }
        params
            .custom_extensions
            .push(CustomExtension::from_oid_content(
                crate::identity::IDENTITY_OID,
                identity.to_extension_der(),
            ));
        let cert = params.signed_by(&public, &self.issuer)?;
        self.issued
            .remember(cert.der(), identity.expires, now.unix_timestamp());
        Ok(cert)
    }

    /// Check that this CA issued the DER certificate `der` and that it is valid at `now` (Unix
    /// seconds); its identity and SubjectPublicKeyInfo (DER). One ECDSA verification, or a
    /// SHA-256 digest for a certificate this process signed.
    pub fn verify_issued(&self, der: &[u8], now: i64) -> Result<(Identity, Vec<u8>), CaError> {
        let bad = |m: String| CaError::BadCertificate(m);
        let (_, cert) = x509_parser::parse_x509_certificate(der).map_err(|e| bad(e.to_string()))?;
        if !self.issued.contains(der) {
            aws_lc_rs::signature::UnparsedPublicKey::new(
                &aws_lc_rs::signature::ECDSA_P256_SHA256_ASN1,
                &self.public,
            )
            .verify(
                cert.tbs_certificate.as_ref(),
                cert.signature_value.data.as_ref(),
            )
            .map_err(|_| bad("not issued by this cluster's CA".into()))?;
        }
        let v = cert.validity();
        if now < v.not_before.timestamp() || now >= v.not_after.timestamp() {
            return Err(bad("expired or not yet valid".into()));
        }
        let id = Identity::from_parsed(&cert).map_err(|e| bad(e.to_string()))?;
        Ok((id, cert.tbs_certificate.subject_pki.raw.to_vec()))
    }

    /// Issue a certificate with a fresh key for `identity` (in-process roles: the Proxy).
    pub fn issue_with_new_key(
        &self,
        identity: &Identity,
        usage: TlsUsage,
        sans: &[String],
        now: time::OffsetDateTime,
    ) -> Result<(rcgen::Certificate, KeyPair), CaError> {
        let key = generate_leaf_key()?;
        let cert = self.sign(
            &rcgen::PublicKeyData::subject_public_key_info(&key),
            identity,
            usage,
            sans,
            now,
        )?;
        Ok((cert, key))
    }

    /// A certificate for the web UI's browsers (fresh ECDSA P-256 key: browsers do not take
    /// Ed25519), server use only, for `sans`, valid a year; returns (chain PEM, key PEM).
    pub fn issue_browser_cert(
        &self,
        cluster: &str,
        sans: &[String],
        now: time::OffsetDateTime,
    ) -> Result<(String, String), CaError> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let identity = Identity {
            kind: crate::identity::IdentityKind::Builtin,
            name: "web".into(),
            roles: vec![],
            logins: vec![],
            traits: Default::default(),
            cluster: cluster.into(),
            route_to_cluster: cluster.into(),
            bot: None,
            expires: (now + time::Duration::days(365)).unix_timestamp(),
        };
        let cert = self.sign(
            &rcgen::PublicKeyData::subject_public_key_info(&key),
            &identity,
            TlsUsage::ServerAndClient,
            sans,
            now,
        )?;
        Ok((
            format!("{}{}", cert.pem(), self.cert_pem()),
            key.serialize_pem(),
        ))
    }

    /// Issue the Auth server's own certificate (fresh key), valid for `ttl`.
    pub fn issue_server_cert(
        &self,
        cluster: &str,
        extra_sans: &[String],
        ttl: Duration,
        now: time::OffsetDateTime,
    ) -> Result<(rcgen::Certificate, KeyPair), CaError> {
        let key = generate_leaf_key()?;
        let identity = Identity {
            kind: crate::identity::IdentityKind::Builtin,
            name: "auth".into(),
            roles: vec![],
            logins: vec![],
            traits: Default::default(),
            cluster: cluster.into(),
            route_to_cluster: cluster.into(),
            bot: None,
            expires: (now + ttl).unix_timestamp(),
        };
        let mut sans = vec![
            AUTH_SERVER_NAME.to_string(),
            "localhost".into(),
            "127.0.0.1".into(),
        ];
        sans.extend(extra_sans.iter().cloned());
        sans.sort();
        sans.dedup();
        let cert = self.sign(
            &rcgen::PublicKeyData::subject_public_key_info(&key),
            &identity,
            TlsUsage::ServerAndClient,
            &sans,
            now,
        )?;
        Ok((cert, key))
    }
}

/// `sha256:<hex>` of the SubjectPublicKeyInfo of a DER certificate.
pub fn spki_pin(cert_der: &[u8]) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(cert_der).ok()?;
    Some(format!(
        "sha256:{}",
        hex::encode(Sha256::digest(cert.tbs_certificate.subject_pki.raw))
    ))
}

fn random_serial() -> rcgen::SerialNumber {
    let mut bytes = [0u8; 16];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    bytes[0] &= 0x7F; // positive
    rcgen::SerialNumber::from_slice(&bytes)
}

/// Parse an OpenSSH public key line (`ssh-ed25519 AAAA… comment`).
pub fn parse_ssh_public_key(line: &str) -> Result<PublicKey, CaError> {
    PublicKey::from_openssh(line.trim()).map_err(|e| CaError::BadPublicKey(e.to_string()))
}

#[cfg(test)]
#[path = "ca_tests.rs"]
mod tests;
