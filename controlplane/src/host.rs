//! A host's identity (an agent's or a proxy's): SSH host key and certificate, X.509 key and
//! certificate, the cluster CA and the user CA keys. Obtained once by joining with a token
//! (through Auth, or a Proxy that passes Auth's ALPN through), kept in the data dir (0600).

use std::path::Path;

use crate::client::{AuthEndpoint, error_chain};
use crate::files::{create_private_dir, write_private};
use crate::proto;
use crate::tls::Trust;
use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error)]
pub enum HostError {
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
    #[error("stored identity is unreadable: {0}")]
    Corrupt(String),
    #[error("join failed: {0}")]
    Join(String),
    #[error("key generation: {0}")]
    Keys(String),
}

/// How a role that does not run beside Auth gets its identity: a join token and the cluster's
/// CA pin (`sha256:…`), which the first contact verifies.
#[derive(Debug, Clone, Default)]
pub struct JoinParams {
    pub token: Option<String>,
    pub ca_pin: Option<String>,
}

/// Everything an agent (or a joined proxy) holds about itself.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HostIdentity {
    pub host_id: String,
    pub host_name: String,
    pub cluster: String,
    /// OpenSSH private key (PEM) and certificate line.
    pub ssh_key: String,
    pub ssh_cert: String,
    pub tls_cert: String,
    pub tls_key: String,
    pub ca_pem: String,
    pub ssh_user_ca: Vec<String>,
    pub ssh_host_ca: Vec<String>,
}

/// Fresh keys for a join request.
pub struct NewKeys {
    pub ssh: ssh_key::PrivateKey,
    pub tls: rcgen::KeyPair,
}

impl std::fmt::Debug for NewKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NewKeys").finish_non_exhaustive()
    }
}

impl NewKeys {
    pub fn generate() -> Result<Self, HostError> {
        let ssh = ssh_key::PrivateKey::random(
            &mut ssh_key::rand_core::OsRng,
            ssh_key::Algorithm::Ed25519,
        )
        .map_err(|e| HostError::Keys(e.to_string()))?;
        let tls = crate::ca::generate_leaf_key().map_err(|e| HostError::Keys(e.to_string()))?;
        Ok(Self { ssh, tls })
    }

    pub fn join_request(
        &self,
        token: &str,
        host_name: &str,
        addresses: &[String],
    ) -> Result<proto::JoinRequest, HostError> {
        Ok(proto::JoinRequest {
            token: token.to_owned(),
            host_name: host_name.to_owned(),
            addresses: addresses.to_vec(),
            ssh_public_key: self
                .ssh
                .public_key()
                .to_openssh()
                .map_err(|e| HostError::Keys(e.to_string()))?,
            tls_public_key: rcgen::PublicKeyData::subject_public_key_info(&self.tls),
            bot_name: String::new(),
            ttl_seconds: 0,
        })
    }

    /// Combine with Auth's answer.
    pub fn into_identity(
        self,
        host_name: &str,
        resp: proto::JoinResponse,
    ) -> Result<HostIdentity, HostError> {
        let creds = resp
            .credentials
            .ok_or_else(|| HostError::Join("Auth sent no credentials".into()))?;
        Ok(HostIdentity {
            host_id: resp.host_id,
            host_name: host_name.to_owned(),
            cluster: creds.cluster_name,
            ssh_key: self
                .ssh
                .to_openssh(ssh_key::LineEnding::LF)
                .map_err(|e| HostError::Keys(e.to_string()))?
                .to_string(),
            ssh_cert: creds.ssh_cert,
            tls_cert: creds.tls_cert,
            tls_key: self.tls.serialize_pem(),
            ca_pem: creds.tls_ca,
            ssh_user_ca: creds.ssh_user_ca,
            ssh_host_ca: creds.ssh_host_ca,
        })
    }
}

impl HostIdentity {
    const FILE: &'static str = "identity.json";

    pub fn load(dir: &Path) -> Result<Option<Self>, HostError> {
        match std::fs::read_to_string(dir.join(Self::FILE)) {
            Ok(text) => serde_json::from_str(&text)
                .map(Some)
                .map_err(|e| HostError::Corrupt(e.to_string())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    pub fn save(&self, dir: &Path) -> Result<(), HostError> {
        create_private_dir(dir)?;
        let json =
            serde_json::to_vec_pretty(self).map_err(|e| HostError::Corrupt(e.to_string()))?;
        write_private(&dir.join(Self::FILE), &json)?;
        Ok(())
    }

    /// Join through `addr` (Auth, or a Proxy that passes `gatehouse-auth` through), verifying
    /// the cluster by its CA pin.
    pub async fn join(
        addr: &str,
        pin: &str,
        token: &str,
        host_name: &str,
        addresses: &[String],
    ) -> Result<Self, HostError> {
        let keys = NewKeys::generate()?;
        let endpoint = AuthEndpoint {
            addr: addr.to_owned(),
            trust: Trust::Pin(pin.to_owned()),
            identity: None,
        };
        let mut client = endpoint
            .connect()
            .await
            .map_err(|e| HostError::Join(error_chain(&e)))?;
        let resp = client
            .join(keys.join_request(token, host_name, addresses)?)
            .await
            .map_err(|s| HostError::Join(format!("{} ({:?})", s.message(), s.code())))?
            .into_inner();
        keys.into_identity(host_name, resp)
    }

    /// The X.509 certificate's validity (Unix seconds: not before, not after).
    pub fn validity(&self) -> Option<(i64, i64)> {
        crate::tls::cert_validity(&self.tls_cert)
    }

    /// When to renew: at two thirds of the certificate's lifetime.
    pub fn renew_at(&self) -> i64 {
        match self.validity() {
            Some((from, to)) => from + (to - from) * 2 / 3,
            None => 0,
        }
    }

    /// A renewed identity: the same keys and host id, new certificates from Auth (`Renew`,
    /// authenticated by this identity's certificate).
    pub async fn renew(&self, client: &mut crate::client::Client) -> Result<Self, HostError> {
        let keys = |e: String| HostError::Keys(e);
        let ssh =
            ssh_key::PrivateKey::from_openssh(&self.ssh_key).map_err(|e| keys(e.to_string()))?;
        let tls = rcgen::KeyPair::from_pem(&self.tls_key).map_err(|e| keys(e.to_string()))?;
        let resp = client
            .renew(proto::RenewRequest {
                ssh_public_key: ssh
                    .public_key()
                    .to_openssh()
                    .map_err(|e| keys(e.to_string()))?,
                tls_public_key: rcgen::PublicKeyData::subject_public_key_info(&tls),
                ttl_seconds: 0,
                current_cert: Vec::new(),
            })
            .await
            .map_err(|s| HostError::Join(format!("renewal: {} ({:?})", s.message(), s.code())))?
            .into_inner();
        let creds = resp
            .credentials
            .ok_or_else(|| HostError::Join("Auth sent no credentials".into()))?;
        Ok(Self {
            ssh_cert: creds.ssh_cert,
            tls_cert: creds.tls_cert,
            ca_pem: creds.tls_ca,
            ssh_user_ca: creds.ssh_user_ca,
            ssh_host_ca: creds.ssh_host_ca,
            ..self.clone()
        })
    }

    /// An Auth client that authenticates as this host, through `addr`.
    pub fn auth_endpoint(&self, addr: &str) -> AuthEndpoint {
        AuthEndpoint {
            addr: addr.to_owned(),
            trust: Trust::CaPem(self.ca_pem.clone()),
            identity: Some((self.tls_cert.clone(), self.tls_key.clone())),
        }
    }
}
