use super::*;
use crate::identity::IdentityKind;

fn alice(expires: i64) -> Identity {
    Identity {
        kind: IdentityKind::User,
        name: "alice".into(),
        roles: vec!["access".into()],
        logins: vec!["alice".into(), "root".into()],
        traits: [("logins".to_string(), vec!["alice".to_string()])].into(),
        cluster: "example".into(),
        bot: None,
        route_to_cluster: "example".into(),
        expires,
    }
}

#[test]
fn ssh_user_cert_has_principals_extensions_and_verifies() {
    let ca = SshCa::generate().unwrap();
    let user = PrivateKey::random(&mut rand::rngs::OsRng, Algorithm::Ed25519).unwrap();
    let now = 1_700_000_000;
    let id = alice(now as i64 + 3600);
    let req = SshUserCertRequest {
        identity: &id,
        permit_pty: true,
        permit_port_forwarding: false,
        permit_agent_forwarding: false,
        permit_x11_forwarding: false,
        remote_forward_any: false,
    };
    let cert = ca.sign_user(user.public_key(), &req, now).unwrap();
    assert_eq!(cert.key_id(), "alice");
    assert_eq!(
        cert.valid_principals(),
        ["alice", "root", NO_LOGIN_PRINTCIPAL]
    );
    assert!(cert.extensions().contains_key("permit-pty"));
    assert!(!cert.extensions().contains_key("permit-port-forwarding"));
    assert_eq!(
        cert.extensions().get(ssh_ext::ROLES).map(String::as_str),
        Some("[\"access\"]")
    );
    assert_eq!(cert.valid_before(), now + 3600);
    assert_eq!(cert.valid_after(), now - 60);
    let fp = ca.public_key().fingerprint(Default::default());
    cert.validate_at(now, [&fp]).unwrap();
    assert!(cert.validate_at(now + 3601, [&fp]).is_err());
    let other = SshCa::generate().unwrap();
    let other_fp = other.public_key().fingerprint(Default::default());
    assert!(cert.validate_at(now, [&other_fp]).is_err());
}

#[test]
fn ssh_ca_roundtrips_through_openssh_pem() {
    let ca = SshCa::generate().unwrap();
    let again = SshCa::from_openssh(&ca.private_openssh().unwrap()).unwrap();
    assert_eq!(ca.public_line(), again.public_line());
}

fn client_cert(
    ca: &TlsCa,
    key: &KeyPair,
    id: &Identity,
    now: time::OffsetDateTime,
) -> rcgen::Certificate {
    let spki = rcgen::PublicKeyData::subject_public_key_info(key);
    ca.sign(&spki, id, TlsUsage::Client, &[], now).unwrap()
}

fn assert_issued_by(cert: &x509_parser::certificate::X509Certificate<'_>, ca: &TlsCa) {
    let (_, ca_parsed) = x509_parser::parse_x509_certificate(ca.cert_der()).unwrap();
    cert.verify_signature(Some(ca_parsed.public_key())).unwrap();
}

#[test]
fn tls_cert_carries_identity_and_chains_to_ca() {
    let now = time::OffsetDateTime::now_utc();
    let ca = TlsCa::generate("example", now).unwrap();
    let ca = TlsCa::from_pem(ca.cert_pem(), &ca.key_pem()).unwrap();
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let id = alice((now + time::Duration::hours(1)).unix_timestamp());
    let cert = client_cert(&ca, &key, &id, now);
    assert_eq!(Identity::from_cert_der(cert.der()).unwrap(), id);
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.der()).unwrap();
    assert_issued_by(&parsed, &ca);
    assert!(ca.pin().starts_with("sha256:") && ca.pin().len() == 7 + 64);
}

#[test]
fn tls_leaf_keys_are_ed25519_and_the_ca_certifies_them() {
    let now = time::OffsetDateTime::now_utc();
    let ca = TlsCa::generate("example", now).unwrap();
    let key = generate_leaf_key().unwrap();
    assert_eq!(key.algorithm(), &rcgen::PKCS_ED25519);
    let id = alice((now + time::Duration::hours(1)).unix_timestamp());
    let cert = client_cert(&ca, &key, &id, now);
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.der()).unwrap();
    assert_eq!(
        parsed.public_key().algorithm.algorithm,
        x509_parser::oid_registry::OID_SIG_ED25519
    );
    assert_issued_by(&parsed, &ca);
    // The in-process Proxy's and the Auth server's own keys are leaf keys too.
    let (proxy, proxy_key) = ca
        .issue_with_new_key(&id, TlsUsage::ServerAndClient, &[], now)
        .unwrap();
    assert_eq!(proxy_key.algorithm(), &rcgen::PKCS_ED25519);
    assert!(Identity::from_cert_der(proxy.der()).is_ok());
    let (_, auth_key) = ca
        .issue_server_cert("example", &[], Duration::from_secs(60), now)
        .unwrap();
    assert_eq!(auth_key.algorithm(), &rcgen::PKCS_ED25519);
}

#[test]
fn verify_issued_checks_by_digest_here_and_by_signature_elsewhere() {
    let now = time::OffsetDateTime::now_utc();
    let t = now.unix_timestamp();
    let ca = TlsCa::generate("example", now).unwrap();
    let key = generate_leaf_key().unwrap();
    let cert = client_cert(&ca, &key, &alice(t + 60), now);
    let der = cert.der().to_vec();
    // Signed here: known by digest.
    assert!(ca.issued.contains(&der));
    let (id, spki) = ca.verify_issued(&der, t).unwrap();
    assert_eq!(id.name, "alice");
    assert_eq!(spki, rcgen::PublicKeyData::subject_public_key_info(&key));
    // The same CA loaded elsewhere (another Auth, a restart): checked by signature.
    let other = TlsCa::from_pem(ca.cert_pem(), &ca.key_pem()).unwrap();
    assert!(!other.issued.contains(&der));
    assert_eq!(other.verify_issued(&der, t).unwrap().0.name, "alice");
    // A flipped bit in the signed part fails both ways; a foreign CA's certificate too.
    let (_, parsed) = x509_parser::parse_x509_certificate(&der).unwrap();
    let tbs_len = parsed.tbs_certificate.as_ref().len();
    let mut bad = der.clone();
    let i = bad.len() - tbs_len / 2 - 80;
    bad[i] ^= 1;
    assert!(ca.verify_issued(&bad, t).is_err());
    assert!(other.verify_issued(&bad, t).is_err());
    let foreign = TlsCa::generate("example", now).unwrap();
    let theirs = client_cert(&foreign, &key, &alice(t + 60), now);
    assert!(ca.verify_issued(theirs.der(), t).is_err());
    // Expiry is checked on both paths.
    assert!(ca.verify_issued(&der, t + 61).is_err());
    assert!(other.verify_issued(&der, t + 61).is_err());
}

#[test]
fn tls_sign_refuses_rsa_and_other_curves() {
    let now = time::OffsetDateTime::now_utc();
    let ca = TlsCa::generate("example", now).unwrap();
    let id = alice(now.unix_timestamp() + 60);
    // DER SubjectPublicKeyInfos made with `openssl genrsa 2048` and `openssl ecparam -name
    // secp521r1`: well-formed keys of kinds the CA does not certify.
    let rsa = hex::decode("30820122300d06092a864886f70d01010105000382010f003082010a0282010100e73fee067bb9940dcc8bddd093577a8c465e56949fab53d43ea7b46f96a59dca3a9789e2c20c90cbd12ba30341c4df0677da0d602b70887e7727f647ba85e69b67d067e4ae5d3becc92dd27b078d344f405d9590fac38602e69c397836c9dace6dbd80f8bd235e78d44c2de9009373d13d046bf34915a03350ad1ac23eb13e9fe4897a159da3457630f72897c46c2ef57771add163336f15aef71e6b18c5e2b9cbea68099e9ffb9de4e603eb5a0c38a8151ab72476f9c3cccfc0715f35c3ec30560621b571ff65787ea55997df2fc61087a9a9cec7472e32cdd8a46fc1c67c25b11f7c9f0475f9031b47a708e58d361fe2fa0c04e8e05155de321871f758700f0203010001").unwrap();
    let p521 = hex::decode("30819b301006072a8648ce3d020106052b8104002303818600040118535f19a1808ca8daf70e90dd035b62750b68de0c0ee851374c5d9ee749bf6669bd767f8a1ed7a7d82cac21c4f1877a852dda1c6c65e75edbebaeddb850ca59a900bf0b8d926e7d0225b00f0de35bc3ed32351f69020050445c6c3faaefe10a064d5ff74a0be2b83415faa2f22121c49ebb1d97221a2af121cb68e70897fae76a4c71").unwrap();
    for spki in [rsa, p521] {
        match ca.sign(&spki, &id, TlsUsage::Client, &[], now) {
            Err(CaError::BadPublicKey(m)) => assert!(m.contains("Ed25519"), "{m}"),
            other => panic!("expected a refusal, got {:?}", other.map(|c| c.pem())),
        }
        assert!(check_tls_public_key(&spki).is_err());
    }
    let p384 = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).unwrap();
    assert!(check_tls_public_key(&rcgen::PublicKeyData::subject_public_key_info(&p384)).is_ok());
}

#[test]
fn tls_sign_rejects_garbage_public_key() {
    let now = time::OffsetDateTime::now_utc();
    let ca = TlsCa::generate("example", now).unwrap();
    let id = alice(now.unix_timestamp() + 60);
    assert!(matches!(
        ca.sign(b"not a key", &id, TlsUsage::Client, &[], now),
        Err(CaError::BadPublicKey(_))
    ));
}
