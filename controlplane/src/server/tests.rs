//! In-memory tests of the one path (authenticate → authorize → act → audit): every RPC called
//! as every kind of caller against a real store in a temporary directory, no network.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeMap;
use std::sync::Arc;

use tonic::{Code, Request, Status};

use super::call::{Access, Rpc};
use super::*;
use crate::ca::{SshCa, TlsCa};
use crate::identity::{Identity, IdentityKind};
use crate::resources::{
    Metadata, ResourceKind, Role, RoleConditions, RoleSpec, Rule, Verb, preset_roles,
};

const CLUSTER: &str = "c1";

pub(super) struct Fixture {
    pub(super) service: AuthService,
    _dir: tempfile::TempDir,
}

pub(super) async fn fixture() -> Fixture {
    fixture_with(crate::role::SecondFactor::Off).await
}

async fn fixture_with(second_factor: crate::role::SecondFactor) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("gatehouse.db")).await.unwrap();
    let now = time::OffsetDateTime::now_utc();
    let mut roles = preset_roles();
    // Allows everything on users, roles and tokens, and denies users: deny wins.
    roles.push(Role {
        kind: "role".into(),
        version: "v1".into(),
        metadata: Metadata {
            name: "no-users".into(),
            ..Default::default()
        },
        spec: RoleSpec {
            allow: RoleConditions {
                rules: vec![Rule {
                    resources: vec![ResourceKind::User],
                    verbs: vec![Verb::Any],
                    own: false,
                }],
                ..Default::default()
            },
            deny: RoleConditions {
                rules: vec![Rule {
                    resources: vec![ResourceKind::User],
                    verbs: vec![Verb::Any],
                    own: false,
                }],
                ..Default::default()
            },
            ..Default::default()
        },
    });
    for role in roles {
        store
            .upsert_role(&role, true, now.unix_timestamp())
            .await
            .unwrap();
    }
    let state = AuthState::new(
        CLUSTER.into(),
        store,
        SshCa::generate().unwrap(),
        SshCa::generate().unwrap(),
        TlsCa::generate(CLUSTER, now).unwrap(),
    )
    .unwrap()
    .with_second_factor(second_factor);
    Fixture {
        service: AuthService::new(Arc::new(state)),
        _dir: dir,
    }
}

pub(super) fn identity(kind: IdentityKind, name: &str, roles: &[&str], cluster: &str) -> Identity {
    Identity {
        kind,
        name: name.into(),
        roles: roles.iter().map(|r| r.to_string()).collect(),
        logins: vec![],
        traits: BTreeMap::new(),
        cluster: cluster.into(),
        route_to_cluster: cluster.into(),
        bot: None,
        expires: i64::MAX,
    }
}

/// The callers of the table, by name.
fn callers() -> Vec<(&'static str, Option<Identity>)> {
    use IdentityKind::{Bot, Builtin, Node, User};
    vec![
        ("anonymous", None),
        (
            "foreign",
            Some(identity(User, "mallory", &["editor"], "c2")),
        ),
        (
            "access",
            Some(identity(User, "alice", &["access"], CLUSTER)),
        ),
        ("editor", Some(identity(User, "erin", &["editor"], CLUSTER))),
        (
            "auditor",
            Some(identity(User, "ada", &["auditor"], CLUSTER)),
        ),
        (
            "denied-editor",
            Some(identity(User, "dan", &["editor", "no-users"], CLUSTER)),
        ),
        ("agent", Some(identity(Node, "host-1", &["@node"], CLUSTER))),
        (
            "proxy",
            Some(identity(Node, "proxy-1", &["@proxy"], CLUSTER)),
        ),
        (
            "admin",
            Some(identity(Builtin, "admin", &["@admin"], CLUSTER)),
        ),
        ("bot", Some(identity(Bot, "ci", &["access"], CLUSTER))),
    ]
}

/// Who gets past authorization, per RPC: written out here by hand (not derived from
/// `Rpc::access`), so a rule that changes must change here too.
fn allowed(rpc: Rpc) -> &'static [&'static str] {
    const EVERYONE: &[&str] = &[
        "anonymous",
        "foreign",
        "access",
        "editor",
        "auditor",
        "denied-editor",
        "agent",
        "proxy",
        "admin",
        "bot",
    ];
    const USER_ADMINS: &[&str] = &["editor", "admin"];
    const TOKEN_ADMINS: &[&str] = &["editor", "denied-editor", "admin"];
    match rpc {
        Rpc::Ping | Rpc::Login | Rpc::AddMfaDevice | Rpc::Join | Rpc::ValidateTrustedCluster => {
            EVERYONE
        }
        Rpc::WhoAmI | Rpc::GetClusterSettings | Rpc::ListClusters => &[
            "access",
            "editor",
            "auditor",
            "denied-editor",
            "agent",
            "proxy",
            "admin",
            "bot",
        ],
        // Any identity may call it; only users have passwords.
        Rpc::ChangePassword => &["access", "editor", "auditor", "denied-editor"],
        Rpc::CreateUser | Rpc::ResetPassword | Rpc::GetResource => USER_ADMINS,
        Rpc::UpsertResource => TOKEN_ADMINS,
        Rpc::ListResources => &["editor", "denied-editor", "agent", "admin"],
        Rpc::DeleteResource => &["admin"],
        Rpc::CreateToken | Rpc::ListTokens | Rpc::DeleteToken => TOKEN_ADMINS,
        Rpc::ExportAuthorities => &[
            "access",
            "editor",
            "denied-editor",
            "agent",
            "proxy",
            "admin",
            "bot",
        ],
        Rpc::EmitEvents | Rpc::UpsertNodes => &["agent", "proxy", "admin"],
        Rpc::SearchEvents => &["auditor", "admin"],
        Rpc::ListNodes | Rpc::Watch => {
            &["access", "editor", "denied-editor", "proxy", "admin", "bot"]
        }
        Rpc::HeartbeatProxy => &["proxy"],
        Rpc::UploadRecording => &["agent", "admin"],
        // `access` reaches only its user's own recordings (the handler narrows it).
        Rpc::ListRecordings | Rpc::ReadRecording => &["access", "auditor", "admin", "bot"],
        Rpc::CreateBot | Rpc::ListBots | Rpc::DeleteBot | Rpc::UnlockBot => TOKEN_ADMINS,
        // Users renew by logging in; the admin identity is re-issued by Auth itself.
        Rpc::Renew => &["agent", "proxy", "bot"],
        Rpc::CreateLock | Rpc::DeleteLock => TOKEN_ADMINS,
        // Proxies and agents follow locks to end what they stop.
        Rpc::ListLocks => &["editor", "denied-editor", "agent", "proxy", "admin"],
        Rpc::RotateCertAuthority => &["admin"],
    }
}

pub(super) fn request<T>(peer: &Option<Identity>, msg: T) -> Request<T> {
    let mut req = Request::new(msg);
    req.extensions_mut().insert(PeerInfo {
        remote: Some("127.0.0.9:4000".parse().unwrap()),
        identity: peer.clone().map(Arc::new),
        key: None,
    });
    req
}

/// Call `rpc` as `peer` with a request that gets past authorization without side effects that
/// matter (bad arguments, missing names): only the status code is kept.
async fn call(svc: &AuthService, rpc: Rpc, peer: &Option<Identity>) -> Result<(), Status> {
    use crate::proto as p;
    let r = |m| request(peer, m);
    match rpc {
        Rpc::Ping => svc.ping(r(p::PingRequest {})).await.map(drop),
        Rpc::Login => svc
            .login(request(peer, p::LoginRequest::default()))
            .await
            .map(drop),
        Rpc::AddMfaDevice => svc
            .add_mfa_device(request(peer, p::AddMfaDeviceRequest::default()))
            .await
            .map(drop),
        Rpc::Join => svc
            .join(request(peer, p::JoinRequest::default()))
            .await
            .map(drop),
        Rpc::WhoAmI => svc
            .who_am_i(request(peer, p::WhoAmIRequest {}))
            .await
            .map(drop),
        Rpc::ChangePassword => svc
            .change_password(request(
                peer,
                p::ChangePasswordRequest {
                    old_password: "old".into(),
                    new_password: "x".into(),
                },
            ))
            .await
            .map(drop),
        Rpc::CreateUser => svc
            .create_user(request(
                peer,
                p::CreateUserRequest {
                    name: "Not A Name!".into(),
                    ..Default::default()
                },
            ))
            .await
            .map(drop),
        Rpc::ResetPassword => svc
            .reset_password(request(
                peer,
                p::ResetPasswordRequest {
                    name: "nobody".into(),
                },
            ))
            .await
            .map(drop),
        Rpc::UpsertResource => svc
            .upsert_resource(request(
                peer,
                p::UpsertResourceRequest {
                    kind: "role".into(),
                    json: r#"{"kind":"role","metadata":{"name":"t-role"},"spec":{}}"#.into(),
                    create_only: false,
                },
            ))
            .await
            .map(drop),
        Rpc::GetResource => svc
            .get_resource(request(
                peer,
                p::GetResourceRequest {
                    kind: "user".into(),
                    name: "nobody".into(),
                },
            ))
            .await
            .map(drop),
        Rpc::ListResources => svc
            .list_resources(request(
                peer,
                p::ListResourcesRequest {
                    kind: "role".into(),
                },
            ))
            .await
            .map(drop),
        Rpc::DeleteResource => svc
            .delete_resource(request(
                peer,
                p::DeleteResourceRequest {
                    kind: "node".into(),
                    name: "nothing".into(),
                },
            ))
            .await
            .map(drop),
        Rpc::CreateToken => svc
            .create_token(request(
                peer,
                p::CreateTokenRequest {
                    r#type: "bogus".into(),
                    ..Default::default()
                },
            ))
            .await
            .map(drop),
        Rpc::ListTokens => svc
            .list_tokens(request(peer, p::ListTokensRequest {}))
            .await
            .map(drop),
        Rpc::DeleteToken => svc
            .delete_token(request(
                peer,
                p::DeleteTokenRequest {
                    id: "0123456789abcdef".into(),
                },
            ))
            .await
            .map(drop),
        Rpc::ExportAuthorities => svc
            .export_authorities(request(
                peer,
                p::ExportAuthoritiesRequest {
                    r#type: "user".into(),
                },
            ))
            .await
            .map(drop),
        Rpc::CreateLock => svc
            .create_lock(request(
                peer,
                p::CreateLockRequest {
                    kind: "bogus".into(),
                    ..Default::default()
                },
            ))
            .await
            .map(drop),
        Rpc::RotateCertAuthority => svc
            .rotate_cert_authority(request(
                peer,
                p::RotateCertAuthorityRequest {
                    r#type: "bogus".into(),
                    ..Default::default()
                },
            ))
            .await
            .map(drop),
        Rpc::ListLocks => svc
            .list_locks(request(peer, p::ListLocksRequest {}))
            .await
            .map(drop),
        Rpc::DeleteLock => svc
            .delete_lock(request(
                peer,
                p::DeleteLockRequest {
                    name: "user:nobody".into(),
                },
            ))
            .await
            .map(drop),
        Rpc::EmitEvents => svc
            .emit_events(request(peer, p::EmitEventsRequest { events: vec![] }))
            .await
            .map(drop),
        Rpc::SearchEvents => svc
            .search_events(request(peer, p::SearchEventsRequest::default()))
            .await
            .map(drop),
        Rpc::UpsertNodes => svc
            .upsert_nodes(request(peer, p::UpsertNodesRequest::default()))
            .await
            .map(drop),
        Rpc::ListNodes => svc
            .list_nodes(request(peer, p::ListNodesRequest {}))
            .await
            .map(drop),
        Rpc::GetClusterSettings => svc
            .get_cluster_settings(request(peer, p::GetClusterSettingsRequest {}))
            .await
            .map(drop),
        Rpc::UploadRecording => svc
            .upload_recording(request(peer, p::UploadRecordingRequest::default()))
            .await
            .map(drop),
        Rpc::ListRecordings => svc
            .list_recordings(request(peer, p::ListRecordingsRequest::default()))
            .await
            .map(drop),
        Rpc::ReadRecording => svc
            .read_recording(request(peer, p::ReadRecordingRequest::default()))
            .await
            .map(drop),
        Rpc::CreateBot => svc
            .create_bot(request(
                peer,
                p::CreateBotRequest {
                    name: "Not A Name!".into(),
                    ..Default::default()
                },
            ))
            .await
            .map(drop),
        Rpc::ListBots => svc
            .list_bots(request(peer, p::ListBotsRequest {}))
            .await
            .map(drop),
        Rpc::DeleteBot => svc
            .delete_bot(request(
                peer,
                p::DeleteBotRequest {
                    name: "nobody".into(),
                },
            ))
            .await
            .map(drop),
        Rpc::UnlockBot => svc
            .unlock_bot(request(
                peer,
                p::UnlockBotRequest {
                    name: "nobody".into(),
                },
            ))
            .await
            .map(drop),
        Rpc::Renew => svc
            .renew(request(peer, p::RenewRequest::default()))
            .await
            .map(drop),
        Rpc::Watch => svc
            .watch(request(
                peer,
                p::WatchRequest {
                    kinds: vec!["proxy".into()],
                    resume: String::new(),
                },
            ))
            .await
            .map(drop),
        Rpc::HeartbeatProxy => svc
            .heartbeat_proxy(request(
                peer,
                p::HeartbeatProxyRequest {
                    addr: "127.0.0.1:3080".into(),
                    ttl_seconds: 30,
                    leaving: false,
                    leaves: vec![],
                },
            ))
            .await
            .map(drop),
        Rpc::ValidateTrustedCluster => svc
            .validate_trusted_cluster(request(peer, p::ValidateTrustedClusterRequest::default()))
            .await
            .map(drop),
        Rpc::ListClusters => svc
            .list_clusters(request(peer, p::ListClustersRequest {}))
            .await
            .map(drop),
    }
}

fn denied(r: &Result<(), Status>) -> bool {
    matches!(r, Err(s) if matches!(s.code(), Code::PermissionDenied | Code::Unauthenticated))
}

/// Every RPC × every kind of caller: allowed exactly where the table says, refused (permission
/// denied or unauthenticated) everywhere else; deny rules win over allow rules; calls without a
/// certificate reach only ping, login and join.
#[tokio::test]
async fn authorization_table_every_rpc_by_every_caller() {
    let f = fixture().await;
    let mut checked = 0;
    for rpc in Rpc::ALL {
        for (who, peer) in callers() {
            let result = call(&f.service, rpc, &peer).await;
            let want = allowed(rpc).contains(&who);
            assert_eq!(
                !denied(&result),
                want,
                "{} as {who}: {result:?}",
                rpc.name()
            );
            checked += 1;
        }
    }
    assert_eq!(checked, Rpc::ALL.len() * callers().len());
}

#[test]
fn only_ping_login_enrollment_join_and_trust_requests_are_public() {
    let public: Vec<&str> = Rpc::ALL
        .iter()
        .filter(|r| r.access() == Access::Public)
        .map(|r| r.name())
        .collect();
    // A trust request carries a trusted_cluster token, as a join carries a join token; a second
    // factor's enrollment carries the password (and a code of the device it replaces).
    assert_eq!(
        public,
        [
            "Ping",
            "Login",
            "AddMfaDevice",
            "Join",
            "ValidateTrustedCluster"
        ]
    );
}

/// A method added to the protobuf service without an entry in `Rpc` (and so without an access
/// rule) fails here.
#[test]
fn every_rpc_of_the_service_has_an_access_rule() {
    let proto = include_str!("../../proto/gatehouse/auth/v1/auth.proto");
    let in_proto: Vec<&str> = proto
        .lines()
        .filter_map(|l| l.trim().strip_prefix("rpc "))
        .filter_map(|l| l.split('(').next())
        .map(str::trim)
        .collect();
    let in_table: Vec<&str> = Rpc::ALL.iter().map(|r| r.name()).collect();
    assert_eq!(in_proto, in_table);
}

/// A handler of a per-request rule that answers without checking it fails closed.
#[tokio::test]
async fn a_handler_that_skips_its_check_fails_closed() {
    let f = fixture().await;
    let admin = Some(identity(
        IdentityKind::Builtin,
        "admin",
        &["@admin"],
        CLUSTER,
    ));
    let r = f
        .service
        .handle(Rpc::GetResource, request(&admin, ()), |_call, ()| async {
            Ok(Done::read(()))
        })
        .await;
    assert_eq!(r.err().map(|s| s.code()), Some(Code::Internal));
}

/// What a call asks the audit log to keep is there once it answers: the event of an action,
/// the event of an audited refusal; a read leaves nothing.
#[tokio::test]
async fn actions_and_audited_refusals_reach_the_audit_log() {
    use crate::proto as p;
    let f = fixture().await;
    let editor = Some(identity(IdentityKind::User, "erin", &["editor"], CLUSTER));
    f.service
        .create_user(request(
            &editor,
            p::CreateUserRequest {
                name: "bob".into(),
                roles: vec!["access".into()],
                logins: vec!["bob".into()],
            },
        ))
        .await
        .unwrap();
    f.service
        .list_tokens(request(&editor, p::ListTokensRequest {}))
        .await
        .unwrap();
    let (ssh_key, tls_key) = client_keys();
    let refused = f
        .service
        .login(request(
            &None,
            p::LoginRequest {
                user: "bob".into(),
                password: "wrong".into(),
                ssh_public_key: ssh_key,
                tls_public_key: tls_key,
                ..Default::default()
            },
        ))
        .await;
    assert_eq!(refused.err().map(|s| s.code()), Some(Code::Unauthenticated));
    let events = f
        .service
        .state()
        .store
        .search_events(&crate::storage::EventFilter {
            limit: 100,
            ..Default::default()
        })
        .await
        .unwrap();
    let seen: Vec<(String, String, String)> = events
        .iter()
        .map(|e| (e.event_type.clone(), e.actor.clone(), e.source_addr.clone()))
        .collect();
    assert_eq!(
        seen,
        [
            ("user.create".into(), "erin".into(), "127.0.0.9".into()),
            ("user.login".into(), "bob".into(), "127.0.0.9".into()),
        ]
    );
    assert!(
        events[1].data.contains(r#""success":false"#),
        "{}",
        events[1].data
    );
}

/// Public keys in the forms a login carries: OpenSSH text and a DER SubjectPublicKeyInfo.
fn client_keys() -> (String, Vec<u8>) {
    let ssh =
        ssh_key::PrivateKey::random(&mut rand::rngs::OsRng, ssh_key::Algorithm::Ed25519).unwrap();
    let tls = crate::ca::generate_leaf_key().unwrap();
    (
        ssh.public_key().to_openssh().unwrap(),
        rcgen::PublicKeyData::subject_public_key_info(&tls),
    )
}

/// A second factor: enrolled with the password and a code of the device; then a login without
/// a code is asked for one (not a failed attempt), a wrong or replayed code is refused and
/// audited, the next step's code logs in; replacing the device needs a code of the current one.
#[tokio::test]
async fn logins_with_a_second_factor() {
    use crate::otp;
    use crate::proto as p;
    let f = fixture_with(crate::role::SecondFactor::Otp).await;
    let state = f.service.state();
    let user = crate::resources::User {
        kind: "user".into(),
        version: "v1".into(),
        metadata: crate::resources::Metadata {
            name: "carol".into(),
            ..Default::default()
        },
        spec: crate::resources::UserSpec {
            roles: vec!["access".into()],
            traits: BTreeMap::new(),
        },
    };
    let hash = crate::password::hash("correct horse battery").unwrap();
    state.store.create_user(&user, &hash, 0).await.unwrap();
    let secret = otp::new_secret();
    // Codes from one instant: a step boundary passing mid-test changes nothing.
    let t0 = u64::try_from(now_secs()).unwrap();
    let now = || t0;
    let add = |code: String, current: &str| p::AddMfaDeviceRequest {
        user: "carol".into(),
        password: "correct horse battery".into(),
        secret: otp::base32_encode(&secret),
        code,
        current_code: current.into(),
    };
    let wrong = f
        .service
        .add_mfa_device(request(&None, add("000000".into(), "")))
        .await;
    if otp::code_at(&secret, now()) != "000000" {
        assert_eq!(wrong.err().map(|s| s.code()), Some(Code::InvalidArgument));
    }
    // The enrolling code's step is used: a login in the same 30 s needs the next step's code.
    f.service
        .add_mfa_device(request(&None, add(otp::code_at(&secret, now()), "")))
        .await
        .unwrap();
    let login = |code: String| {
        let (ssh_public_key, tls_public_key) = client_keys();
        p::LoginRequest {
            user: "carol".into(),
            password: "correct horse battery".into(),
            ssh_public_key,
            tls_public_key,
            otp: code,
            ..Default::default()
        }
    };
    let missing = f.service.login(request(&None, login(String::new()))).await;
    let missing = missing.err().unwrap();
    assert_eq!(missing.code(), Code::FailedPrecondition);
    assert!(missing.message().contains("one-time code required"));
    let replay = f
        .service
        .login(request(&None, login(otp::code_at(&secret, now()))))
        .await;
    assert_eq!(replay.err().map(|s| s.code()), Some(Code::Unauthenticated));
    let next = otp::code_at(&secret, now() + otp::STEP_SECS);
    let ok = f.service.login(request(&None, login(next.clone()))).await;
    assert!(ok.is_ok(), "{:?}", ok.err());
    let again = f.service.login(request(&None, login(next))).await;
    assert_eq!(again.err().map(|s| s.code()), Some(Code::Unauthenticated));
    // Replacing the device needs a code of the current one.
    let no_current = f
        .service
        .add_mfa_device(request(&None, add(otp::code_at(&secret, now()), "")))
        .await;
    assert_eq!(
        no_current.err().map(|s| s.code()),
        Some(Code::FailedPrecondition)
    );
    let events = state
        .store
        .search_events(&crate::storage::EventFilter {
            limit: 100,
            ..Default::default()
        })
        .await
        .unwrap();
    let logins: Vec<&str> = events
        .iter()
        .filter(|e| e.event_type == "user.login")
        .map(|e| e.data.as_str())
        .collect();
    assert_eq!(logins.len(), 3, "{logins:?}");
    assert!(logins[0].contains("replayed"), "{}", logins[0]);
    assert!(
        logins[1].contains(r#""method":"password+otp""#),
        "{}",
        logins[1]
    );
    assert!(logins[2].contains(r#""success":false"#), "{}", logins[2]);
}
