//! Establishing trust between two clusters' Auths on loopback (the leaf reaches the root's Auth
//! API as it would through the root's proxy, which passes `gatehouse-auth` through untouched):
//! the happy path, and every refusal leaving nothing stored on either side.

// Test code: a failing unwrap or panic is a failing test, which is the point.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use gatehouse_controlplane::client::{AuthEndpoint, Client};
use gatehouse_controlplane::proto;
use gatehouse_controlplane::role::{AuthConfig, AuthHandle, start};
use gatehouse_controlplane::tls::Trust;

struct Side {
    handle: AuthHandle,
    _dir: tempfile::TempDir,
}

async fn auth(cluster: &str) -> Side {
    let dir = tempfile::tempdir().unwrap();
    let config = AuthConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        ..Default::default()
    };
    let mut registry = prometheus_client::registry::Registry::default();
    let handle = start(dir.path(), Some(cluster), &config, &mut registry)
        .await
        .unwrap();
    Side { handle, _dir: dir }
}

impl Side {
    async fn admin(&self) -> Client {
        let admin = &self.handle.info.admin_dir;
        let read = |n: &str| std::fs::read_to_string(admin.join(n)).unwrap();
        AuthEndpoint {
            addr: self.handle.info.listen.to_string(),
            trust: Trust::CaPem(read("ca.pem")),
            identity: Some((read("tls.crt"), read("tls.key"))),
        }
        .connect()
        .await
        .unwrap()
    }

    async fn token(&self, ty: &str, ttl: u64, uses: u32) -> String {
        self.admin()
            .await
            .create_token(proto::CreateTokenRequest {
                r#type: ty.into(),
                ttl_seconds: ttl,
                max_uses: uses,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .token
    }

    async fn clusters(&self) -> Vec<(String, String)> {
        let mut c = self
            .admin()
            .await
            .list_clusters(proto::ListClustersRequest {})
            .await
            .unwrap()
            .into_inner()
            .clusters
            .into_iter()
            .map(|c| (c.name, c.relation))
            .collect::<Vec<_>>();
        c.sort();
        c
    }

    async fn token_uses(&self) -> Vec<(String, u32)> {
        self.admin()
            .await
            .list_tokens(proto::ListTokensRequest {})
            .await
            .unwrap()
            .into_inner()
            .tokens
            .into_iter()
            .map(|t| (t.r#type, t.uses))
            .collect()
    }
}

fn trusted_cluster(root: &str, addr: &str, token: &str, pin: &str, role_map: &str) -> String {
    format!(
        r#"{{"kind":"trusted_cluster","metadata":{{"name":"{root}"}},"spec":{{"proxy_addr":"{addr}","token":"{token}","ca_pin":"{pin}","role_map":{role_map}}}}}"#
    )
}

async fn create(leaf: &Side, json: String) -> Result<(), tonic::Status> {
    leaf.admin()
        .await
        .upsert_resource(proto::UpsertResourceRequest {
            kind: "trusted_cluster".into(),
            json,
            create_only: false,
        })
        .await
        .map(drop)
}

const MAP: &str =
    r#"[{"remote":"access","local":["access"]},{"remote":"^admin-(.*)$","local":["$1"]}]"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trust_is_established_once_and_refusals_store_nothing() {
    let root = auth("root").await;
    let leaf = auth("leaf").await;
    let addr = root.handle.info.listen.to_string();
    let pin = root.handle.info.ca_pin.clone();
    let token = root.token("trusted_cluster", 3600, 1).await;
    let nothing = vec![("leaf".to_string(), "self".to_string())];

    // An invalid regular expression: the error names the entry; nothing was sent.
    let bad_map =
        r#"[{"remote":"access","local":["access"]},{"remote":"^admin-(.*$","local":["$1"]}]"#;
    let e = create(&leaf, trusted_cluster("root", &addr, &token, &pin, bad_map))
        .await
        .unwrap_err();
    assert!(
        e.message().contains("role_map[1].remote `^admin-(.*$`"),
        "{e:?}"
    );

    // A wrong CA pin: refused before anything is sent.
    let wrong_pin = format!("sha256:{}", "ab".repeat(32));
    let e = create(
        &leaf,
        trusted_cluster("root", &addr, &token, &wrong_pin, MAP),
    )
    .await
    .unwrap_err();
    assert!(e.message().contains("ca_pin"), "{e:?}");
    // A wrong token, a node token, the wrong root name.
    let e = create(
        &leaf,
        trusted_cluster("root", &addr, "not-a-token", &pin, MAP),
    )
    .await
    .unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
    assert!(
        e.message()
            .contains("the root refused: trusted_cluster token not recognized"),
        "{e:?}"
    );
    let node_token = root.token("node", 3600, 1).await;
    let e = create(
        &leaf,
        trusted_cluster("root", &addr, &node_token, &pin, MAP),
    )
    .await
    .unwrap_err();
    assert!(e.message().contains("not a trusted_cluster token"), "{e:?}");
    let e = create(
        &leaf,
        trusted_cluster("elsewhere", &addr, &token, &pin, MAP),
    )
    .await
    .unwrap_err();
    assert!(
        e.message()
            .contains("this is cluster `root`, not `elsewhere`"),
        "{e:?}"
    );
    // A leaf naming itself as its root.
    let e = create(&leaf, trusted_cluster("leaf", &addr, &token, &pin, MAP))
        .await
        .unwrap_err();
    assert!(e.message().contains("own name"), "{e:?}");
    assert_eq!(leaf.clusters().await, nothing);
    assert_eq!(
        root.clusters().await,
        [("root".to_string(), "self".to_string())]
    );
    // Neither token was used by the refusals.
    let uses = root.token_uses().await;
    assert!(uses.iter().all(|(_, u)| *u == 0), "{uses:?}");

    // A leaf claiming the root's own name, straight to the root's API.
    let mut anon = AuthEndpoint {
        addr: addr.clone(),
        trust: Trust::Pin(pin.clone()),
        identity: None,
    }
    .connect()
    .await
    .unwrap();
    let cas = |s: &str| proto::ClusterCas {
        user_ca_ssh: s.into(),
        host_ca_ssh: s.into(),
        tls_ca_pem: s.into(),
        ..Default::default()
    };
    let e = anon
        .validate_trusted_cluster(proto::ValidateTrustedClusterRequest {
            token: token.clone(),
            leaf_cluster: "root".into(),
            root_cluster: "root".into(),
            leaf_cas: Some(cas("x")),
        })
        .await
        .unwrap_err();
    assert!(e.message().contains("this cluster's own name"), "{e:?}");
    let e = anon
        .validate_trusted_cluster(proto::ValidateTrustedClusterRequest {
            token: token.clone(),
            leaf_cluster: "mallory".into(),
            root_cluster: "root".into(),
            leaf_cas: Some(cas("not a key")),
        })
        .await
        .unwrap_err();
    assert!(e.message().contains("not an OpenSSH public key"), "{e:?}");

    // Trust established: each side knows the other.
    create(&leaf, trusted_cluster("root", &addr, &token, &pin, MAP))
        .await
        .unwrap();
    assert_eq!(
        leaf.clusters().await,
        [
            ("leaf".to_string(), "self".to_string()),
            ("root".to_string(), "root".to_string())
        ]
    );
    assert_eq!(
        root.clusters().await,
        [
            ("leaf".to_string(), "leaf".to_string()),
            ("root".to_string(), "self".to_string())
        ]
    );
    // The resource reads back without its token.
    let got = leaf
        .admin()
        .await
        .get_resource(proto::GetResourceRequest {
            kind: "trusted_cluster".into(),
            name: "root".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .json;
    assert!(
        !got.contains(&token) && got.contains("^admin-(.*)$"),
        "{got}"
    );

    // The single-use token replayed by another leaf: refused.
    let other = auth("other").await;
    let e = create(&other, trusted_cluster("root", &addr, &token, &pin, MAP))
        .await
        .unwrap_err();
    assert!(e.message().contains("used up"), "{e:?}");
    // An expired token.
    let short = root.token("trusted_cluster", 1, 1).await;
    tokio::time::sleep(std::time::Duration::from_millis(2100)).await;
    let e = create(&other, trusted_cluster("root", &addr, &short, &pin, MAP))
        .await
        .unwrap_err();
    assert!(e.message().contains("expired"), "{e:?}");
    assert_eq!(
        other.clusters().await,
        [("other".to_string(), "self".to_string())]
    );

    // The role map changes without a token; removal on the root forgets the leaf.
    let only_access = r#"[{"remote":"access","local":["access"]}]"#;
    create(&leaf, trusted_cluster("root", &addr, "", &pin, only_access))
        .await
        .unwrap();
    let mut r = root.admin().await;
    r.delete_resource(proto::DeleteResourceRequest {
        kind: "trusted_cluster".into(),
        name: "leaf".into(),
    })
    .await
    .unwrap();
    assert_eq!(
        root.clusters().await,
        [("root".to_string(), "self".to_string())]
    );
    let events = r
        .search_events(proto::SearchEventsRequest {
            types: vec![
                "trusted_cluster.create".into(),
                "trusted_cluster.delete".into(),
            ],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .events;
    assert!(
        events.len() >= 4,
        "refusals and the create and delete are audited: {events:?}"
    );
}
