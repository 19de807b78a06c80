//! The calls agents make with the identity they got from `join`: heartbeat their own node
//! (and only their own), emit audit events in batches (deduplicated by event id), and nothing
//! beyond their built-in role. Plus a user with the preset `auditor` role reading the log.

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

fn event(id: &str, ty: &str) -> proto::AuditEvent {
    proto::AuditEvent {
        event_id: id.into(),
        r#type: ty.into(),
        time_nanos: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as i64,
        actor: "alice".into(),
        source_addr: "127.0.0.9".into(),
        data_json: r#"{"login":"root"}"#.into(),
        id: 0,
        cluster: String::new(),
    }
}

#[test]
fn node_identity_heartbeats_itself_and_emits_deduplicated_event_batches() {
    let c = Cluster::start("nodes");
    let out = c.gctl(&["tokens", "add", "--type", "node"]).ok().stdout;
    let token = out
        .split("Join token (shown once): ")
        .nth(1)
        .unwrap()
        .lines()
        .next()
        .unwrap()
        .trim()
        .to_string();
    let rt = rt();
    let ssh_key =
        ssh_key::PrivateKey::random(&mut ssh_key::rand_core::OsRng, ssh_key::Algorithm::Ed25519)
            .unwrap();
    let tls_key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let joined = rt
        .block_on(async {
            let endpoint = AuthEndpoint {
                addr: c.auth.clone(),
                trust: Trust::Pin(c.pin.clone()),
                identity: None,
            };
            endpoint
                .connect()
                .await
                .unwrap()
                .join(proto::JoinRequest {
                    token,
                    host_name: "web1".into(),
                    addresses: vec![],
                    ssh_public_key: ssh_key.public_key().to_openssh().unwrap(),
                    tls_public_key: rcgen::PublicKeyData::subject_public_key_info(&tls_key),
                    ..Default::default()
                })
                .await
        })
        .unwrap()
        .into_inner();
    let creds = joined.credentials.unwrap();
    let node = AuthEndpoint {
        addr: c.auth.clone(),
        trust: Trust::CaPem(creds.tls_ca.clone()),
        identity: Some((creds.tls_cert.clone(), tls_key.serialize_pem())),
    };
    rt.block_on(async {
        let mut client = node.connect().await.unwrap();
        let me = |name: &str, host_id: &str| proto::Node {
            host_id: host_id.into(),
            name: name.into(),
            labels: [("env".to_string(), "dev".to_string())].into(),
            addresses: vec!["127.0.0.9:3022".into()],
            services: vec!["ssh".into()],
            apps: vec![],
            last_seen: 0,
            expires: 0,
        };
        client
            .upsert_nodes(proto::UpsertNodesRequest {
                nodes: vec![me("web1", &joined.host_id)],
                ttl_seconds: 60,
            })
            .await
            .unwrap();
        let err = client
            .upsert_nodes(proto::UpsertNodesRequest {
                nodes: vec![me("evil", "someone-else")],
                ttl_seconds: 60,
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err:?}");

        let batch = vec![
            event("e1", "session.start"),
            event("e2", "exec"),
            event("e1", "session.start"),
        ];
        let r = client
            .emit_events(proto::EmitEventsRequest {
                events: batch.clone(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!((r.accepted, r.duplicates), (2, 1));
        // A retry of the whole batch (e.g. after a lost answer) stores nothing twice.
        let r = client
            .emit_events(proto::EmitEventsRequest { events: batch })
            .await
            .unwrap()
            .into_inner();
        assert_eq!((r.accepted, r.duplicates), (0, 3));
        let bad = client
            .emit_events(proto::EmitEventsRequest {
                events: vec![proto::AuditEvent {
                    data_json: "[1,2]".into(),
                    ..event("e3", "x")
                }],
            })
            .await
            .unwrap_err();
        assert_eq!(bad.code(), tonic::Code::InvalidArgument);
        assert!(bad.message().contains("events[0].data_json"), "{bad:?}");

        // Nothing beyond the built-in node role.
        for err in [
            client
                .list_resources(proto::ListResourcesRequest {
                    kind: "user".into(),
                })
                .await
                .unwrap_err(),
            client
                .search_events(proto::SearchEventsRequest::default())
                .await
                .unwrap_err(),
            client
                .create_token(proto::CreateTokenRequest {
                    r#type: "node".into(),
                    ..Default::default()
                })
                .await
                .unwrap_err(),
        ] {
            assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err:?}");
        }
    });

    let nodes = c.gctl(&["get", "nodes"]).ok().stdout;
    assert!(
        nodes.contains("web1") && nodes.contains("env=dev") && nodes.contains(&joined.host_id),
        "{nodes}"
    );
    assert!(!nodes.contains("evil"));
    let starts = c.events("session.start");
    assert_eq!(starts.len(), 1);
    assert_eq!(starts[0]["data"]["emitted_by"], joined.host_id.as_str());
    assert_eq!(starts[0]["source_addr"], "127.0.0.9");

    // An auditor reads the log through gctl with their own login, and cannot manage users.
    let home = tempfile::tempdir().unwrap();
    let pw = c.add_user("audrey", "auditor", "");
    c.login(home.path(), "audrey", &pw, &[]).ok();
    let mut cmd = std::process::Command::new(common::bin("gctl"));
    cmd.args([
        "--data-dir",
        "/nonexistent",
        "events",
        "--type",
        "exec",
        "--format",
        "json",
    ])
    .env("GATEHOUSE_HOME", home.path());
    let out = common::run(cmd, None).ok();
    assert_eq!(out.stdout.lines().count(), 1, "{}", out.stdout);
    let mut cmd = std::process::Command::new(common::bin("gctl"));
    cmd.args([
        "--data-dir",
        "/nonexistent",
        "users",
        "add",
        "x",
        "--roles",
        "access",
    ])
    .env("GATEHOUSE_HOME", home.path());
    let err = common::run(cmd, None).failed().stderr;
    assert!(err.contains("no role allows create on user"), "{err}");
}
