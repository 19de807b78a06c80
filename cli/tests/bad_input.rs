//! Bad input gets a clear error and writes nothing: wrong passwords (same answer as an unknown
//! user, rate limited), expired and used-up join tokens, malformed role files, API calls with
//! no client certificate or with one from another cluster's CA, and a wrong CA pin.
// Test code: a failing unwrap or panic is a failing test, which is the point.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use common::Cluster;
use gatehouse_controlplane::client::AuthEndpoint;
use gatehouse_controlplane::proto;
use gatehouse_controlplane::tls::Trust;

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

#[test]
fn wrong_password_looks_like_unknown_user_and_is_rate_limited() {
    let c = Cluster::start("bad-pw");
    let home = tempfile::tempdir().unwrap();
    let pw = c.add_user("alice", "access", "alice");

    let wrong = c
        .login(home.path(), "alice", "not the password", &[])
        .failed()
        .stderr;
    let unknown = c
        .login(home.path(), "mallory", "not the password", &[])
        .failed()
        .stderr;
    assert!(wrong.contains("invalid user name or password"), "{wrong}");
    assert_eq!(
        wrong, unknown,
        "wrong password and unknown user must answer alike"
    );
    assert!(
        !home.path().join("profile.toml").exists(),
        "a failed login wrote a profile"
    );

    // Five failures for alice in the window: even the right password is now refused.
    for _ in 0..4 {
        c.login(home.path(), "alice", "not the password", &[])
            .failed();
    }
    let limited = c.login(home.path(), "alice", &pw, &[]).failed().stderr;
    assert!(
        limited.contains("too many failed login attempts"),
        "{limited}"
    );
    // Unknown users are limited the same way (no user enumeration through the limiter).
    for _ in 0..4 {
        c.login(home.path(), "mallory", "x", &[]).failed();
    }
    let limited_unknown = c.login(home.path(), "mallory", "x", &[]).failed().stderr;
    assert!(
        limited_unknown.contains("too many failed login attempts"),
        "{limited_unknown}"
    );
    assert!(!home.path().join("tls.crt").exists());

    let failures = c.events("user.login");
    assert!(failures.iter().all(|e| e["data"]["success"] == false));
    assert!(
        failures
            .iter()
            .any(|e| e["data"]["reason"] == "rate limited")
    );
    assert!(
        c.events("cert.issued").is_empty(),
        "no certificate may be issued"
    );
    let log = serde_json::to_string(&failures).unwrap();
    assert!(
        !log.contains("not the password") && !log.contains(&pw),
        "a password reached the audit log"
    );
}

fn join(c: &Cluster, token: &str, host: &str) -> Result<proto::JoinResponse, tonic::Status> {
    let tls_key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    join_with_tls_key(
        c,
        token,
        host,
        rcgen::PublicKeyData::subject_public_key_info(&tls_key),
    )
}

/// A DER SubjectPublicKeyInfo of an RSA-2048 key (`openssl genrsa 2048 | openssl rsa -pubout`):
/// well formed, of a kind Auth does not certify.
const RSA_SPKI_HEX: &str = "30820122300d06092a864886f70d01010105000382010f003082010a0282010100e73fee067bb9940dcc8bddd093577a8c465e56949fab53d43ea7b46f96a59dca3a9789e2c20c90cbd12ba30341c4df0677da0d602b70887e7727f647ba85e69b67d067e4ae5d3becc92dd27b078d344f405d9590fac38602e69c397836c9dace6dbd80f8bd235e78d44c2de9009373d13d046bf34915a03350ad1ac23eb13e9fe4897a159da3457630f72897c46c2ef57771add163336f15aef71e6b18c5e2b9cbea68099e9ffb9de4e603eb5a0c38a8151ab72476f9c3cccfc0715f35c3ec30560621b571ff65787ea55997df2fc61087a9a9cec7472e32cdd8a46fc1c67c25b11f7c9f0475f9031b47a708e58d361fe2fa0c04e8e05155de321871f758700f0203010001";

fn join_with_tls_key(
    c: &Cluster,
    token: &str,
    host: &str,
    tls_public_key: Vec<u8>,
) -> Result<proto::JoinResponse, tonic::Status> {
    let ssh_key =
        ssh_key::PrivateKey::random(&mut ssh_key::rand_core::OsRng, ssh_key::Algorithm::Ed25519)
            .unwrap();
    let endpoint = AuthEndpoint {
        addr: c.auth.clone(),
        trust: Trust::Pin(c.pin.clone()),
        identity: None,
    };
    rt().block_on(async {
        let mut client = endpoint.connect().await.unwrap();
        client
            .join(proto::JoinRequest {
                token: token.into(),
                host_name: host.into(),
                addresses: vec!["127.0.0.5".into()],
                ssh_public_key: ssh_key.public_key().to_openssh().unwrap(),
                tls_public_key,
                ..Default::default()
            })
            .await
            .map(|r| r.into_inner())
    })
}

fn new_token(c: &Cluster, args: &[&str]) -> String {
    let mut all = vec!["tokens", "add", "--type", "node"];
    all.extend_from_slice(args);
    let out = c.gctl(&all).ok().stdout;
    out.split("Join token (shown once): ")
        .nth(1)
        .unwrap()
        .lines()
        .next()
        .unwrap()
        .trim()
        .to_string()
}

#[test]
fn join_tokens_expired_used_up_and_unknown_are_refused_without_writes() {
    let c = Cluster::start("bad-join");
    let single = new_token(&c, &["--uses", "1"]);
    // An RSA key is refused before the token is looked at: the single use is still there.
    let rsa =
        join_with_tls_key(&c, &single, "node1", hex::decode(RSA_SPKI_HEX).unwrap()).unwrap_err();
    assert_eq!(rsa.code(), tonic::Code::InvalidArgument, "{rsa:?}");
    assert!(rsa.message().contains("Ed25519"), "{rsa:?}");
    let ok = join(&c, &single, "node1").unwrap();
    let creds = ok.credentials.unwrap();
    assert!(
        creds
            .ssh_cert
            .starts_with("ssh-ed25519-cert-v01@openssh.com ")
    );
    // Host cert principals: host id, host id.cluster, host name, address.
    let cert = ssh_key::Certificate::from_openssh(&creds.ssh_cert).unwrap();
    assert_eq!(cert.cert_type(), ssh_key::certificate::CertType::Host);
    assert!(cert.valid_principals().contains(&"node1".to_string()));
    assert!(cert.valid_principals().contains(&ok.host_id));
    assert!(cert.valid_principals().contains(&"127.0.0.5".to_string()));

    let used = join(&c, &single, "node2").unwrap_err();
    assert_eq!(used.code(), tonic::Code::PermissionDenied);
    assert!(used.message().contains("used up"), "{used:?}");

    let brief = new_token(&c, &["--ttl", "1s", "--uses", "0"]);
    std::thread::sleep(std::time::Duration::from_millis(2100));
    let expired = join(&c, &brief, "node3").unwrap_err();
    assert!(expired.message().contains("expired"), "{expired:?}");

    let unknown = join(&c, "0123456789abcdef", "node4").unwrap_err();
    assert!(unknown.message().contains("not recognized"), "{unknown:?}");

    // Bad input before the token is touched does not use it up.
    let fresh = new_token(&c, &["--uses", "1"]);
    let bad_name = join(&c, &fresh, "bad host name").unwrap_err();
    assert_eq!(bad_name.code(), tonic::Code::InvalidArgument);
    assert!(bad_name.message().contains("host_name"), "{bad_name:?}");
    join(&c, &fresh, "node5").unwrap();

    let tokens = c.gctl(&["tokens", "ls"]).ok().stdout;
    assert!(
        tokens.contains("1/1") && tokens.contains("used up"),
        "{tokens}"
    );
    assert!(
        tokens.contains("0/∞") && tokens.contains("expired"),
        "{tokens}"
    );
    // Exactly two host certificates were issued: node1 and node5.
    let issued = c.events("cert.issued");
    assert_eq!(issued.len(), 2, "{issued:?}");
    let joins = c.events("join");
    assert_eq!(
        joins
            .iter()
            .filter(|e| e["data"]["success"] == false)
            .count(),
        3
    );
}

#[test]
fn malformed_role_file_names_the_field_and_writes_nothing() {
    let c = Cluster::start("bad-role");
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        (
            "unknown-field.toml",
            "kind = \"role\"\n[metadata]\nname = \"r1\"\n[spec.allow]\nlogns = [\"x\"]\n",
            "spec.allow",
        ),
        (
            "bad-verb.toml",
            "kind = \"role\"\n[metadata]\nname = \"r2\"\n[[spec.allow.rules]]\nresources = [\"user\"]\nverbs = [\"list\", \"reed\"]\n",
            "spec.allow.rules[0].verbs[1]",
        ),
        (
            "bad-ttl.json",
            "{\"kind\":\"role\",\"metadata\":{\"name\":\"r3\"},\"spec\":{\"options\":{\"max_session_ttl\":\"forever\"}}}",
            "spec.options.max_session_ttl",
        ),
        (
            "bad-template.toml",
            "kind = \"role\"\n[metadata]\nname = \"r4\"\n[spec.allow]\nlogins = [\"{{internal.logins\"]\n",
            "spec.allow.logins[0]",
        ),
        (
            "no-name.toml",
            "kind = \"role\"\n[metadata]\ndescription = \"x\"\n",
            "metadata",
        ),
        ("syntax.toml", "kind = \"role\"\n[metadata\n", "TOML"),
    ];
    for (file, body, field) in cases {
        let path = dir.path().join(file);
        std::fs::write(&path, body).unwrap();
        let err = c
            .gctl(&["create", "-f", path.to_str().unwrap()])
            .failed()
            .stderr;
        assert!(
            err.contains(field),
            "{file}: error does not name `{field}`: {err}"
        );
    }
    let roles = c.gctl(&["get", "roles", "--format", "json"]).ok().stdout;
    let names: Vec<String> = serde_json::from_str::<Vec<serde_json::Value>>(&roles)
        .unwrap()
        .iter()
        .map(|r| r["metadata"]["name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(names, ["access", "auditor", "editor"]);
    assert!(c.events("role.create").is_empty());

    // The server validates too: a hand-made request with a bad role is refused the same way.
    let endpoint = gatehouse_cli::identity_endpoint(&c.data_dir().join("admin"), &c.auth).unwrap();
    let status = rt()
        .block_on(async {
            let mut client = endpoint.connect().await.unwrap();
            client
                .upsert_resource(proto::UpsertResourceRequest {
                    kind: "role".into(),
                    json: r#"{"kind":"role","metadata":{"name":"r5"},"spec":{"allow":{"rules":[{"resources":["usr"],"verbs":["list"]}]}}}"#.into(),
                    create_only: true,
                })
                .await
        })
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert!(
        status
            .message()
            .contains("spec.allow.rules[0].resources[0]"),
        "{status:?}"
    );
}

#[test]
fn api_calls_without_a_cert_or_with_a_foreign_cert_are_refused() {
    let c = Cluster::start("home");
    let other = Cluster::start("other");

    // No client certificate: ping works (unauthenticated), everything else is refused.
    let endpoint = AuthEndpoint {
        addr: c.auth.clone(),
        trust: Trust::Pin(c.pin.clone()),
        identity: None,
    };
    let (ping, err) = rt().block_on(async {
        let mut client = endpoint.connect().await.unwrap();
        let ping = client
            .ping(proto::PingRequest {})
            .await
            .unwrap()
            .into_inner();
        let err = client
            .list_resources(proto::ListResourcesRequest {
                kind: "user".into(),
            })
            .await
            .unwrap_err();
        (ping, err)
    });
    assert_eq!(ping.cluster_name, "home");
    assert_eq!(ping.ca_pin, c.pin);
    assert_eq!(err.code(), tonic::Code::Unauthenticated);
    assert!(err.message().contains("client certificate"), "{err:?}");

    // Another cluster's admin certificate: the TLS handshake itself is refused.
    let mut cmd = std::process::Command::new(common::bin("gctl"));
    cmd.arg("--identity")
        .arg(other.data_dir().join("admin"))
        .args(["--auth", &c.auth, "users", "ls"]);
    let out = common::run(cmd, None).failed();
    // The other cluster's CA does not vouch for this server, so gctl refuses it first.
    assert!(
        out.stderr.contains("UnknownIssuer") || out.stderr.contains("certificate"),
        "{}",
        out.stderr
    );
    // Now trust the right CA but present the foreign cert, as an attacker holding another
    // cluster's certificate would: the server refuses the handshake.
    let foreign_cert = std::fs::read_to_string(other.data_dir().join("admin/tls.crt")).unwrap();
    let foreign_key = std::fs::read_to_string(other.data_dir().join("admin/tls.key")).unwrap();
    let right_ca = std::fs::read_to_string(c.data_dir().join("admin/ca.pem")).unwrap();
    let endpoint = AuthEndpoint {
        addr: c.auth.clone(),
        trust: Trust::CaPem(right_ca),
        identity: Some((foreign_cert, foreign_key)),
    };
    let result = rt().block_on(async {
        match endpoint.connect().await {
            Err(e) => Err(gatehouse_controlplane::client::error_chain(&e)),
            Ok(mut client) => client
                .list_resources(proto::ListResourcesRequest {
                    kind: "user".into(),
                })
                .await
                .map(|_| ())
                .map_err(|s| format!("{s:?}")),
        }
    });
    let err = result.unwrap_err();
    // TLS 1.3: the client learns of the refusal as the server's alert (UnknownCA) or, when the
    // connection is torn down first, as a closed/reset connection. Either way the call failed;
    // the server log below carries the reason.
    assert!(
        [
            "Cancelled",
            "UnknownCA",
            "Unavailable",
            "reset",
            "closed",
            "broken pipe"
        ]
        .iter()
        .any(|w| err.contains(w)),
        "unexpected error: {err}"
    );
    std::thread::sleep(std::time::Duration::from_millis(300));
    let log = c.log();
    assert!(
        log.contains("TLS handshake failed") && log.contains("UnknownIssuer"),
        "server did not log the refused handshake:\n{log}"
    );
    assert!(c.events("user.create").is_empty());

    // A wrong pin: gsh refuses to talk to the server at all.
    let home = tempfile::tempdir().unwrap();
    let out = c
        .gsh(
            home.path(),
            &[
                "login",
                "--auth",
                &c.auth,
                "--user",
                "x",
                "--password-stdin",
                "--ca-pin",
                &other.pin,
            ],
            Some("whatever-password\n"),
        )
        .failed();
    assert!(
        out.stderr.contains("does not match the pinned"),
        "{}",
        out.stderr
    );
    // And no pin at all on first login is refused with advice, not trusted on first use.
    let out = c
        .gsh(
            home.path(),
            &[
                "login",
                "--auth",
                &c.auth,
                "--user",
                "x",
                "--password-stdin",
            ],
            Some("pw\n"),
        )
        .failed();
    assert!(out.stderr.contains("--ca-pin"), "{}", out.stderr);
}
