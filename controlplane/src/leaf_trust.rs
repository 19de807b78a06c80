//! Which client certificates a root cluster's proxy accepts: this cluster's (through the caching
//! WebPKI verifier), and those of trusted leaf clusters. A certificate whose identity names leaf
//! cluster X is checked against X's CA alone, so a leaf's CA can never vouch for an identity of
//! this cluster or of another leaf (the admission code then takes only leaf proxies). The set of
//! leaves changes at run time (trust established or removed: the watch stream).

use std::collections::HashMap;
use std::sync::Arc;

use arc_swap::ArcSwap;
use rustls::client::danger::HandshakeSignatureValid;
use rustls::pki_types::{CertificateDer, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, SignatureScheme};

use crate::identity::Identity;
use crate::tls::{CachingClientVerifier, TlsError};

type Verifiers = HashMap<String, Arc<dyn ClientCertVerifier>>;

/// This cluster's client certificates, and trusted leaves' by their own CAs.
#[derive(Debug)]
pub struct ClusterClientVerifier {
    own: ArcSwap<CachingClientVerifier>,
    leaves: ArcSwap<Verifiers>,
}

impl ClusterClientVerifier {
    /// Trusting this cluster's CA (`ca_pem`) and no leaf yet; clients without a certificate
    /// get through the handshake (each ALPN decides what it needs).
    pub fn new(ca_pem: &str) -> Result<Self, TlsError> {
        Ok(Self {
            own: ArcSwap::from_pointee(CachingClientVerifier::new(verifier(ca_pem)?)),
            leaves: ArcSwap::from_pointee(HashMap::new()),
        })
    }

    /// Trust this cluster's CAs in `ca_pem` from now on (a TLS CA rotation, its grace ending);
    /// connections up keep the trust they were accepted with.
    pub fn set_own(&self, ca_pem: &str) -> Result<(), TlsError> {
        self.own
            .store(Arc::new(CachingClientVerifier::new(verifier(ca_pem)?)));
        Ok(())
    }

    /// Trust exactly these leaves: (cluster name, its X.509 CA PEM). A leaf whose CA cannot be
    /// read is left out (and named in the error); the others are trusted.
    pub fn set_leaves(&self, leaves: &[(String, String)]) -> Result<(), TlsError> {
        let mut map: Verifiers = HashMap::new();
        let mut bad = Vec::new();
        for (name, pem) in leaves {
            match verifier(pem) {
                Ok(v) => {
                    map.insert(name.clone(), v);
                }
                Err(e) => bad.push(format!("{name}: {e}")),
            }
        }
        self.leaves.store(Arc::new(map));
        if bad.is_empty() {
            Ok(())
        } else {
            Err(TlsError::Verifier(bad.join("; ")))
        }
    }

    /// The leaves trusted now.
    pub fn leaves(&self) -> Vec<String> {
        let mut v: Vec<String> = self.leaves.load().keys().cloned().collect();
        v.sort();
        v
    }
}

fn verifier(ca_pem: &str) -> Result<Arc<dyn ClientCertVerifier>, TlsError> {
    let provider = crate::tls::provider();
    WebPkiClientVerifier::builder_with_provider(crate::tls::roots(ca_pem)?, provider)
        .allow_unauthenticated()
        .build()
        .map_err(|e| TlsError::Verifier(e.to_string()))
}

impl ClientCertVerifier for ClusterClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        false
    }

    fn root_hint_subjects(&self) -> &[rustls::DistinguishedName] {
        // No hints: clients present the one identity they have.
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        match self
            .own
            .load()
            .verify_client_cert(end_entity, intermediates, now)
        {
            Ok(v) => Ok(v),
            Err(own_error) => {
                let Ok(id) = Identity::from_cert_der(end_entity.as_ref()) else {
                    return Err(own_error);
                };
                let leaf = self.leaves.load().get(&id.cluster).cloned();
                match leaf {
                    Some(v) => v.verify_client_cert(end_entity, intermediates, now),
                    None => Err(own_error),
                }
            }
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.own.load().verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.own.load().verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.own.load().supported_verify_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ca::{TlsCa, TlsUsage};
    use crate::identity::IdentityKind;

    fn cert(ca: &TlsCa, cluster: &str, name: &str) -> CertificateDer<'static> {
        let now = time::OffsetDateTime::now_utc();
        let id = Identity {
            kind: IdentityKind::Node,
            name: name.into(),
            roles: vec!["@proxy".into()],
            logins: vec![],
            traits: Default::default(),
            cluster: cluster.into(),
            route_to_cluster: cluster.into(),
            bot: None,
            expires: (now + time::Duration::hours(1)).unix_timestamp(),
        };
        let (c, _) = ca
            .issue_with_new_key(&id, TlsUsage::Client, &[], now)
            .unwrap();
        crate::tls::certs_from_pem(&c.pem()).unwrap().remove(0)
    }

    #[test]
    fn a_leaf_ca_vouches_only_for_its_own_cluster() {
        let now = time::OffsetDateTime::now_utc();
        let root = TlsCa::generate("root", now).unwrap();
        let leaf = TlsCa::generate("leaf", now).unwrap();
        let v = ClusterClientVerifier::new(root.cert_pem()).unwrap();
        let t = UnixTime::now();
        assert!(
            v.verify_client_cert(&cert(&root, "root", "p"), &[], t)
                .is_ok()
        );
        let leaf_proxy = cert(&leaf, "leaf", "p");
        assert!(
            v.verify_client_cert(&leaf_proxy, &[], t).is_err(),
            "not trusted yet"
        );
        v.set_leaves(&[("leaf".into(), leaf.cert_pem().into())])
            .unwrap();
        assert_eq!(v.leaves(), ["leaf"]);
        assert!(v.verify_client_cert(&leaf_proxy, &[], t).is_ok());
        // The leaf's CA signing a certificate that claims the root, or another leaf: refused.
        assert!(
            v.verify_client_cert(&cert(&leaf, "root", "admin"), &[], t)
                .is_err()
        );
        assert!(
            v.verify_client_cert(&cert(&leaf, "other", "p"), &[], t)
                .is_err()
        );
        // Trust removed: refused again.
        v.set_leaves(&[]).unwrap();
        assert!(v.verify_client_cert(&leaf_proxy, &[], t).is_err());
        assert!(v.set_leaves(&[("bad".into(), "not pem".into())]).is_err());
    }
}
