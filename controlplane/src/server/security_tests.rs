//! In-memory tests of locks and CA rotation through the one path: a locked caller is refused
//! on every authenticated call with the lock's message, an unlocked one is served again; a
//! rotation signs with the new key and trusts both until the grace ends, a rollback signs with
//! the old one again.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use tonic::Code;

use super::tests::{fixture, identity, request};
use crate::identity::IdentityKind;
use crate::proto;
use crate::proto::auth_server::Auth;

#[tokio::test]
async fn a_lock_refuses_the_locked_callers_calls_until_it_is_removed() {
    let f = fixture().await;
    let svc = &f.service;
    let admin = Some(identity(IdentityKind::Builtin, "admin", &[], "c1"));
    let alice = Some(identity(IdentityKind::User, "alice", &["access"], "c1"));
    let bob = Some(identity(IdentityKind::User, "bob", &["access"], "c1"));
    let node = Some(identity(IdentityKind::Node, "host-1", &["@node"], "c1"));
    let whoami = |who: &Option<crate::identity::Identity>| {
        svc.who_am_i(request(who, proto::WhoAmIRequest {}))
    };
    assert!(whoami(&alice).await.is_ok());
    let lock = |kind: &str, target: &str| {
        svc.create_lock(request(
            &admin,
            proto::CreateLockRequest {
                kind: kind.into(),
                target: target.into(),
                message: "investigating".into(),
                ttl_seconds: 0,
            },
        ))
    };
    lock("user", "alice").await.unwrap();
    let refused = whoami(&alice).await.unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied);
    assert_eq!(refused.message(), "locked: investigating");
    assert!(
        whoami(&bob).await.is_ok(),
        "a user lock stops only that user"
    );
    // A role lock stops everyone holding it; a node lock, the node (renewals included).
    lock("role", "access").await.unwrap();
    assert!(whoami(&bob).await.is_err());
    lock("node", "host-1").await.unwrap();
    assert!(whoami(&node).await.is_err());
    // The admin is never locked out; bad kinds and names are refused.
    let listed = svc
        .list_locks(request(&admin, proto::ListLocksRequest {}))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.locks_json.len(), 3);
    assert_eq!(
        lock("group", "x").await.unwrap_err().code(),
        Code::InvalidArgument
    );
    assert_eq!(
        lock("user", "Not A Name!").await.unwrap_err().code(),
        Code::InvalidArgument
    );
    for name in ["user:alice", "role:access", "node:host-1"] {
        svc.delete_lock(request(
            &admin,
            proto::DeleteLockRequest { name: name.into() },
        ))
        .await
        .unwrap();
    }
    assert!(whoami(&alice).await.is_ok());
    assert!(whoami(&node).await.is_ok());
    let gone = svc
        .delete_lock(request(
            &admin,
            proto::DeleteLockRequest {
                name: "user:alice".into(),
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(gone.code(), Code::NotFound);
}

#[tokio::test]
async fn rotation_trusts_both_keys_for_the_grace_and_rollback_signs_with_the_old_one() {
    let f = fixture().await;
    let svc = &f.service;
    let admin = Some(identity(IdentityKind::Builtin, "admin", &[], "c1"));
    let state = svc.state();
    // The fixture's CAs, stored as a first start stores them.
    for (kind, ca) in [("ssh_user", &state.user_ca), ("ssh_host", &state.host_ca)] {
        let ca = ca.load();
        let private = ca.private_openssh().unwrap();
        state
            .store
            .init_ca(kind, &ca.public_line(), &private, 0)
            .await
            .unwrap();
    }
    let tls = state.tls.load();
    state
        .store
        .init_ca("tls", tls.signer().cert_pem(), &tls.signer().key_pem(), 0)
        .await
        .unwrap();
    let before = state.user_ca.load().public_line();
    let rotate = |rollback: bool, grace: u64| {
        svc.rotate_cert_authority(request(
            &admin,
            proto::RotateCertAuthorityRequest {
                r#type: "user".into(),
                grace_seconds: grace,
                rollback,
            },
        ))
    };
    // Nothing to roll back before a rotation.
    assert_eq!(
        rotate(true, 60).await.unwrap_err().code(),
        Code::FailedPrecondition
    );
    let r = rotate(false, 60).await.unwrap().into_inner();
    let after = state.user_ca.load().public_line();
    assert_ne!(after, before);
    assert_eq!(r.trusted, [after.clone(), before.clone()]);
    let export = svc
        .export_authorities(request(
            &admin,
            proto::ExportAuthoritiesRequest {
                r#type: "user".into(),
            },
        ))
        .await
        .unwrap()
        .into_inner()
        .text;
    assert_eq!(export.lines().count(), 2);
    let back = rotate(true, 60).await.unwrap().into_inner();
    assert_eq!(state.user_ca.load().public_line(), before);
    assert_eq!(back.trusted, [before.clone(), after]);
    // A rotation with no grace drops the replaced key at once.
    rotate(false, 0).await.unwrap();
    let now_trusted = state.trusted_ssh(super::authorities::SshKind::User);
    assert_eq!(now_trusted.len(), 1);
    assert_ne!(now_trusted[0], before);
    // The X.509 CA: a new signer, both trusted; no second rotation during the grace; a
    // rollback signs with the original again.
    let original = state.tls.load().pin();
    let rotate_tls = |rollback: bool| {
        svc.rotate_cert_authority(request(
            &admin,
            proto::RotateCertAuthorityRequest {
                r#type: "tls".into(),
                grace_seconds: 60,
                rollback,
            },
        ))
    };
    let pins = rotate_tls(false).await.unwrap().into_inner().trusted;
    assert_eq!(pins.len(), 2);
    assert_eq!(pins[1], original);
    assert_ne!(state.tls.load().pin(), original);
    let bundle = state.tls.load().trusted_pem(super::now_secs());
    assert_eq!(crate::tls::certs_from_pem(&bundle).unwrap().len(), 2);
    let again = rotate_tls(false).await.unwrap_err();
    assert_eq!(again.code(), Code::FailedPrecondition, "{again:?}");
    rotate_tls(true).await.unwrap();
    assert_eq!(state.tls.load().pin(), original);
    // Unknown types are refused.
    let unknown = svc
        .rotate_cert_authority(request(
            &admin,
            proto::RotateCertAuthorityRequest {
                r#type: "pgp".into(),
                ..Default::default()
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), Code::InvalidArgument);
}
