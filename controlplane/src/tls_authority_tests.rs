use rustls::client::danger::ServerCertVerifier;
use rustls::pki_types::{ServerName, UnixTime};

use super::*;
use crate::ca::generate_leaf_key;
use crate::identity::IdentityKind;
use crate::tls::{PinnedCaVerifier, certs_from_pem, provider, roots};

fn identity(now: time::OffsetDateTime) -> Identity {
    Identity {
        kind: IdentityKind::Node,
        name: "proxy-a".into(),
        roles: vec!["@proxy".into()],
        logins: vec![],
        traits: Default::default(),
        cluster: "example".into(),
        route_to_cluster: "example".into(),
        bot: None,
        expires: (now + time::Duration::hours(1)).unix_timestamp(),
    }
}

fn issue(authority: &TlsAuthority, now: time::OffsetDateTime) -> String {
    let key = generate_leaf_key().unwrap();
    let spki = rcgen::PublicKeyData::subject_public_key_info(&key);
    authority
        .sign(
            &spki,
            &identity(now),
            TlsUsage::ServerAndClient,
            &["proxy.example".into()],
            now,
        )
        .unwrap()
}

/// Verify `chain` (leaf first) as a server for `proxy.example` against the CAs in `ca_pem`.
fn verify(ca_pem: &str, chain: &str, now: time::OffsetDateTime) -> Result<(), rustls::Error> {
    let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
        roots(ca_pem).unwrap(),
        provider(),
    )
    .build()
    .unwrap();
    let certs = certs_from_pem(chain).unwrap();
    let at =
        UnixTime::since_unix_epoch(std::time::Duration::from_secs(now.unix_timestamp() as u64));
    verifier
        .verify_server_cert(
            &certs[0],
            &certs[1..],
            &ServerName::try_from("proxy.example").unwrap(),
            &[],
            at,
        )
        .map(|_| ())
}

fn rotated(now: time::OffsetDateTime, until: i64) -> (TlsCa, TlsAuthority) {
    let old = TlsCa::generate("example", now).unwrap();
    let old_copy = TlsCa::from_pem(old.cert_pem(), &old.key_pem()).unwrap();
    let new = TlsCa::generate_named("example", "example Gatehouse CA 2", now).unwrap();
    (
        old_copy,
        TlsAuthority::with_previous(new, old, until, now).unwrap(),
    )
}

#[test]
fn during_the_grace_a_party_trusting_either_ca_accepts_the_new_signers_certificates() {
    let now = time::OffsetDateTime::now_utc();
    let until = now.unix_timestamp() + 60;
    let (old, authority) = rotated(now, until);
    let chain = issue(&authority, now);
    assert_eq!(certs_from_pem(&chain).unwrap().len(), 2, "leaf and cross");
    // Trusting only the previous CA: through the cross-signed copy.
    verify(old.cert_pem(), &chain, now).unwrap();
    // Trusting only the new CA, and the bundle clients now get.
    verify(authority.signer().cert_pem(), &chain, now).unwrap();
    let bundle = authority.trusted_pem(now.unix_timestamp());
    assert_eq!(certs_from_pem(&bundle).unwrap().len(), 2);
    verify(&bundle, &chain, now).unwrap();
    // Auth checks certificates of either CA back.
    let der = certs_from_pem(&chain).unwrap()[0].to_vec();
    authority.verify_issued(&der, now.unix_timestamp()).unwrap();
    let before = TlsAuthority::new(TlsCa::from_pem(old.cert_pem(), &old.key_pem()).unwrap());
    let old_chain = issue(&before, now);
    let old_der = certs_from_pem(&old_chain).unwrap()[0].to_vec();
    authority
        .verify_issued(&old_der, now.unix_timestamp())
        .unwrap();
    verify(&bundle, &old_chain, now).unwrap();
    assert!(issued_by_first(&chain, &bundle));
    assert!(!issued_by_first(&old_chain, &bundle));
}

#[test]
fn after_the_grace_only_the_new_ca_is_trusted_or_attached() {
    let now = time::OffsetDateTime::now_utc();
    let until = now.unix_timestamp() + 60;
    let (old, authority) = rotated(now, until);
    let later = now + time::Duration::seconds(61);
    let chain = issue(&authority, later);
    assert_eq!(
        certs_from_pem(&chain).unwrap().len(),
        1,
        "no cross after the grace"
    );
    assert!(verify(old.cert_pem(), &chain, later).is_err());
    verify(authority.signer().cert_pem(), &chain, later).unwrap();
    let bundle = authority.trusted_pem(later.unix_timestamp());
    assert!(same_certs(&bundle, authority.signer().cert_pem()));
    // A certificate of the previous CA is no longer taken back.
    let before = TlsAuthority::new(TlsCa::from_pem(old.cert_pem(), &old.key_pem()).unwrap());
    let old_der = certs_from_pem(&issue(&before, later)).unwrap()[0].to_vec();
    assert!(
        authority
            .verify_issued(&old_der, later.unix_timestamp())
            .is_err()
    );
}

#[test]
fn a_client_pinning_either_key_accepts_the_servers_chain_during_the_grace() {
    let now = time::OffsetDateTime::now_utc();
    let (old, authority) = rotated(now, now.unix_timestamp() + 60);
    let leaf = issue(&authority, now);
    let leaf = leaf
        .split_inclusive("-----END CERTIFICATE-----\n")
        .next()
        .unwrap();
    let chain = authority.server_chain(leaf, now.unix_timestamp());
    let certs = certs_from_pem(&chain).unwrap();
    for pin in [old.pin(), authority.pin()] {
        let v = PinnedCaVerifier::new(&pin);
        v.verify_server_cert(
            &certs[0],
            &certs[1..],
            &ServerName::try_from("proxy.example").unwrap(),
            &[],
            UnixTime::now(),
        )
        .unwrap_or_else(|e| panic!("pin {pin}: {e}"));
    }
    let stranger = TlsCa::generate("example", now).unwrap().pin();
    assert!(
        PinnedCaVerifier::new(&stranger)
            .verify_server_cert(
                &certs[0],
                &certs[1..],
                &ServerName::try_from("proxy.example").unwrap(),
                &[],
                UnixTime::now(),
            )
            .is_err()
    );
}

#[test]
fn bundles_compare_by_their_certificates() {
    let now = time::OffsetDateTime::now_utc();
    let a = TlsCa::generate("example", now).unwrap();
    let b = TlsCa::generate("example", now).unwrap();
    let ab = format!("{}{}", a.cert_pem(), b.cert_pem());
    let ba = format!("{}{}", b.cert_pem(), a.cert_pem());
    assert!(same_certs(&ab, &ba));
    assert!(!same_certs(&ab, a.cert_pem()));
    assert!(!issued_by_first("garbage", a.cert_pem()));
}
