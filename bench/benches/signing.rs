//! Certificate signing and the per-login CPU costs: SSH user/host certificates (Ed25519),
//! X.509 certificates (ECDSA P-256), parsing the identity back out, and argon2id verification
//! (the dominant cost of a password login).
// Benchmark set-up: a failure to build fixtures is a broken benchmark, so panicking is right.
#![allow(clippy::panic)]

use std::collections::BTreeMap;
use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use gatehouse_controlplane::ca::{SshCa, SshUserCertRequest, TlsCa, TlsUsage};
use gatehouse_controlplane::identity::{Identity, IdentityKind};
use gatehouse_controlplane::password;

fn identity(expires: i64) -> Identity {
    Identity {
        kind: IdentityKind::User,
        name: "alice".into(),
        roles: vec!["access".into(), "editor".into()],
        logins: vec!["alice".into(), "root".into()],
        traits: BTreeMap::from([(
            "logins".to_string(),
            vec!["alice".to_string(), "root".to_string()],
        )]),
        cluster: "bench".into(),
        route_to_cluster: "bench".into(),
        bot: None,
        expires,
    }
}

fn signing(c: &mut Criterion) {
    let now = time::OffsetDateTime::now_utc();
    let id = identity(now.unix_timestamp() + 12 * 3600);
    let ssh_ca = SshCa::generate().unwrap_or_else(|e| panic!("{e}"));
    let user_key =
        ssh_key::PrivateKey::random(&mut ssh_key::rand_core::OsRng, ssh_key::Algorithm::Ed25519)
            .unwrap_or_else(|e| panic!("{e}"));
    let req = SshUserCertRequest {
        identity: &id,
        permit_pty: true,
        permit_port_forwarding: true,
        permit_agent_forwarding: false,
        permit_x11_forwarding: false,
        remote_forward_any: false,
    };
    c.bench_function("ssh_user_cert_sign_ed25519", |b| {
        b.iter(|| {
            black_box(ssh_ca.sign_user(user_key.public_key(), &req, now.unix_timestamp() as u64))
        })
    });
    let principals = vec!["node1".to_string(), "10.0.0.1".to_string()];
    c.bench_function("ssh_host_cert_sign_ed25519", |b| {
        b.iter(|| {
            black_box(ssh_ca.sign_host(
                user_key.public_key(),
                "host-id",
                "bench",
                &principals,
                now.unix_timestamp() as u64,
                now.unix_timestamp() as u64 + 3600,
            ))
        })
    });
    let cert = ssh_ca
        .sign_user(user_key.public_key(), &req, now.unix_timestamp() as u64)
        .unwrap_or_else(|e| panic!("{e}"));
    let fp = ssh_ca.public_key().fingerprint(Default::default());
    c.bench_function("ssh_user_cert_verify", |b| {
        b.iter(|| black_box(cert.validate_at(now.unix_timestamp() as u64, [&fp])))
    });

    let tls_ca = TlsCa::generate("bench", now).unwrap_or_else(|e| panic!("{e}"));
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
        .unwrap_or_else(|e| panic!("{e}"));
    let spki = rcgen::PublicKeyData::subject_public_key_info(&key);
    c.bench_function("x509_client_cert_sign_p256", |b| {
        b.iter(|| black_box(tls_ca.sign(&spki, &id, TlsUsage::Client, &[], now)))
    });
    let der = tls_ca
        .sign(&spki, &id, TlsUsage::Client, &[], now)
        .unwrap_or_else(|e| panic!("{e}"));
    let der = der.der().to_vec();
    c.bench_function("x509_identity_parse", |b| {
        b.iter(|| black_box(Identity::from_cert_der(&der)))
    });
}

fn login_cost(c: &mut Criterion) {
    let hash = password::hash("correct horse battery staple").unwrap_or_else(|e| panic!("{e}"));
    let mut g = c.benchmark_group("login");
    g.sample_size(20);
    g.bench_function("argon2id_verify", |b| {
        b.iter(|| black_box(password::verify("correct horse battery staple", &hash)))
    });
    g.finish();
}

criterion_group!(benches, signing, login_cost);
criterion_main!(benches);
