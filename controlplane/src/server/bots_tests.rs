//! Bots in memory: the join token is single-use, each renewal is one generation later, a copied
//! identity locks the bot (both copies refused, `bot.locked` with both addresses), hosts renew
//! with the same host id, users cannot renew.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::sync::Arc;

use tonic::{Code, Request};

use super::*;
use crate::identity::{Identity, IdentityKind};
use crate::proto as p;

async fn service(dir: &std::path::Path) -> AuthService {
    let store = Store::open(&dir.join("gatehouse.db")).await.unwrap();
    let now = time::OffsetDateTime::now_utc();
    for role in crate::resources::preset_roles() {
        store
            .upsert_role(&role, true, now.unix_timestamp())
            .await
            .unwrap();
    }
    let state = AuthState::new(
        "c1".into(),
        store,
        SshCa::generate().unwrap(),
        SshCa::generate().unwrap(),
        TlsCa::generate("c1", now).unwrap(),
    )
    .unwrap();
    AuthService::new(Arc::new(state))
}

fn req<T>(peer: Option<Identity>, addr: &str, msg: T) -> Request<T> {
    let mut r = Request::new(msg);
    r.extensions_mut().insert(PeerInfo {
        remote: Some(addr.parse().unwrap()),
        identity: peer.map(Arc::new),
        key: None,
    });
    r
}

fn admin() -> Option<Identity> {
    Some(Identity {
        kind: IdentityKind::Builtin,
        name: "admin".into(),
        roles: vec![],
        logins: vec![],
        traits: Default::default(),
        cluster: "c1".into(),
        route_to_cluster: "c1".into(),
        bot: None,
        expires: i64::MAX,
    })
}

fn keys() -> (String, Vec<u8>) {
    let ssh =
        ssh_key::PrivateKey::random(&mut rand::rngs::OsRng, ssh_key::Algorithm::Ed25519).unwrap();
    let tls = crate::ca::generate_leaf_key().unwrap();
    (
        ssh.public_key().to_openssh().unwrap(),
        rcgen::PublicKeyData::subject_public_key_info(&tls),
    )
}

/// The identity a credentials' X.509 certificate carries.
fn identity_of(c: &p::Credentials) -> Identity {
    let der = pem::parse(&c.tls_cert).unwrap();
    Identity::from_cert_der(der.contents()).unwrap()
}

async fn renew(svc: &AuthService, who: &Identity, addr: &str) -> Result<Identity, tonic::Status> {
    let (ssh, tls) = keys();
    let resp = svc
        .renew(req(
            Some(who.clone()),
            addr,
            p::RenewRequest {
                ssh_public_key: ssh,
                tls_public_key: tls,
                ..Default::default()
            },
        ))
        .await?
        .into_inner();
    Ok(identity_of(resp.credentials.as_ref().unwrap()))
}

/// A renewal on a connection that authenticated as `conn` with key `spki`, presenting
/// `current` (PEM) as the identity to renew.
async fn renew_on(
    svc: &AuthService,
    conn: &Identity,
    spki: &[u8],
    current: &str,
) -> Result<(Identity, String), tonic::Status> {
    let (ssh, _) = keys();
    let mut r = Request::new(p::RenewRequest {
        ssh_public_key: ssh,
        tls_public_key: spki.to_vec(),
        current_cert: pem::parse(current).unwrap().contents().to_vec(),
        ..Default::default()
    });
    r.extensions_mut().insert(PeerInfo {
        remote: Some("10.0.0.1:1".parse().unwrap()),
        identity: Some(Arc::new(conn.clone())),
        key: Some(Arc::from(spki)),
    });
    let c = svc.renew(r).await?.into_inner().credentials.unwrap();
    Ok((identity_of(&c), c.tls_cert))
}

/// One connection kept across renewals: each presents the newest certificate; one for
/// another key, or not from this CA, is refused.
#[tokio::test]
async fn renewals_on_one_connection_present_the_newest_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let svc = service(dir.path()).await;
    let token = svc
        .create_bot(req(
            admin(),
            "127.0.0.1:1",
            p::CreateBotRequest {
                name: "fast".into(),
                roles: vec!["access".into()],
                token_ttl_seconds: 0,
            },
        ))
        .await
        .unwrap()
        .into_inner()
        .token;
    let (ssh, spki) = keys();
    let joined = svc
        .join(req(
            None,
            "10.0.0.1:1",
            p::JoinRequest {
                token,
                host_name: "fast".into(),
                ssh_public_key: ssh,
                tls_public_key: spki.clone(),
                ..Default::default()
            },
        ))
        .await
        .unwrap()
        .into_inner();
    let creds = joined.credentials.unwrap();
    let conn = identity_of(&creds);
    let mut current = creds.tls_cert;
    for generation in 2..=5 {
        let (id, cert) = renew_on(&svc, &conn, &spki, &current).await.unwrap();
        assert_eq!(id.bot.unwrap().generation, generation);
        current = cert;
    }
    let (_, other_key) = keys();
    let e = renew_on(&svc, &conn, &other_key, &current)
        .await
        .unwrap_err();
    assert!(
        e.message().contains("not a certificate of this connection"),
        "{}",
        e.message()
    );
    let other = TlsCa::generate("c1", time::OffsetDateTime::now_utc()).unwrap();
    let mut forged = conn.clone();
    forged.expires = now_secs() + 600;
    let foreign_key = crate::ca::generate_leaf_key().unwrap();
    let foreign = other
        .sign(
            &rcgen::PublicKeyData::subject_public_key_info(&foreign_key),
            &forged,
            crate::ca::TlsUsage::Client,
            &[],
            time::OffsetDateTime::now_utc(),
        )
        .unwrap()
        .pem();
    let e = renew_on(&svc, &conn, &spki, &foreign).await.unwrap_err();
    assert!(
        e.message().contains("not issued by this cluster"),
        "{}",
        e.message()
    );
}

#[tokio::test]
async fn bot_joins_once_renews_and_a_copy_locks_it() {
    let dir = tempfile::tempdir().unwrap();
    let svc = service(dir.path()).await;
    let created = svc
        .create_bot(req(
            admin(),
            "127.0.0.1:1",
            p::CreateBotRequest {
                name: "ci".into(),
                roles: vec!["access".into()],
                token_ttl_seconds: 0,
            },
        ))
        .await
        .unwrap()
        .into_inner();
    let (ssh, tls) = keys();
    let join = |token: String| p::JoinRequest {
        token,
        host_name: "ci".into(),
        ssh_public_key: ssh.clone(),
        tls_public_key: tls.clone(),
        ..Default::default()
    };
    let joined = svc
        .join(req(None, "10.0.0.1:5", join(created.token.clone())))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(joined.role, "bot");
    let first = identity_of(joined.credentials.as_ref().unwrap());
    assert_eq!(first.kind, IdentityKind::Bot);
    assert_eq!(first.bot.as_ref().unwrap().generation, 1);
    // Default TTL 1 h.
    let ttl = first.expires - now_secs();
    assert!((3500..=3600).contains(&ttl), "{ttl}");
    // The token was single-use.
    let again = svc
        .join(req(None, "10.0.0.1:5", join(created.token)))
        .await
        .unwrap_err();
    assert_eq!(again.code(), Code::PermissionDenied);
    assert!(again.message().contains("used up"), "{}", again.message());

    // Renewals: one generation each.
    let second = renew(&svc, &first, "10.0.0.1:6").await.unwrap();
    assert_eq!(second.bot.as_ref().unwrap().generation, 2);
    let third = renew(&svc, &second, "10.0.0.1:7").await.unwrap();
    assert_eq!(third.bot.as_ref().unwrap().generation, 3);

    // A copy of the second identity, renewed from elsewhere: the bot locks.
    let stolen = renew(&svc, &second, "10.9.9.9:1").await.unwrap_err();
    assert_eq!(stolen.code(), Code::PermissionDenied);
    assert!(stolen.message().contains("locked"), "{}", stolen.message());
    // Now the rightful holder is refused too.
    let rightful = renew(&svc, &third, "10.0.0.1:8").await.unwrap_err();
    assert!(
        rightful.message().contains("locked"),
        "{}",
        rightful.message()
    );
    let state = svc.state();
    let events = state
        .store
        .search_events(&crate::storage::EventFilter {
            types: vec!["bot.locked".into()],
            limit: 10,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(events.len(), 1);
    assert!(
        events[0].data.contains("10.0.0.1") && events[0].data.contains("10.9.9.9"),
        "{}",
        events[0].data
    );
    let renewals = state
        .store
        .search_events(&crate::storage::EventFilter {
            types: vec!["cert.issued".into()],
            limit: 10,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(renewals.len(), 3, "join + two renewals");

    // The admin rejoins it with a new token and unlocks it: the old line stays dead.
    let token = svc
        .create_token(req(
            admin(),
            "127.0.0.1:1",
            p::CreateTokenRequest {
                r#type: "bot".into(),
                bot_name: "ci".into(),
                max_uses: 1,
                ..Default::default()
            },
        ))
        .await
        .unwrap()
        .into_inner()
        .token;
    let rejoined = svc
        .join(req(None, "10.0.0.1:9", join(token)))
        .await
        .unwrap()
        .into_inner();
    let fresh = identity_of(rejoined.credentials.as_ref().unwrap());
    assert!(
        renew(&svc, &fresh, "10.0.0.1:9")
            .await
            .unwrap_err()
            .message()
            .contains("locked")
    );
    let unlocked = svc
        .unlock_bot(req(
            admin(),
            "127.0.0.1:1",
            p::UnlockBotRequest { name: "ci".into() },
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(unlocked.was_locked);
    let renewed = renew(&svc, &fresh, "10.0.0.1:9").await.unwrap();
    assert_eq!(renewed.bot.as_ref().unwrap().generation, 2);
    let old = renew(&svc, &third, "10.0.0.1:9").await.unwrap_err();
    assert!(old.message().contains("replaced"), "{}", old.message());

    // Removed: nothing renews.
    svc.delete_bot(req(
        admin(),
        "127.0.0.1:1",
        p::DeleteBotRequest { name: "ci".into() },
    ))
    .await
    .unwrap();
    let gone = renew(&svc, &renewed, "10.0.0.1:9").await.unwrap_err();
    assert!(
        gone.message().contains("no longer exists"),
        "{}",
        gone.message()
    );
}

#[tokio::test]
async fn expired_identities_users_and_unknown_bots_cannot_renew() {
    let dir = tempfile::tempdir().unwrap();
    let svc = service(dir.path()).await;
    let mut expired = admin().unwrap();
    expired.kind = IdentityKind::Bot;
    expired.name = "ci".into();
    expired.expires = now_secs() - 1;
    let e = renew(&svc, &expired, "10.0.0.1:1").await.unwrap_err();
    assert!(e.message().contains("expired"), "{}", e.message());
    let mut user = admin().unwrap();
    user.kind = IdentityKind::User;
    let e = renew(&svc, &user, "10.0.0.1:1").await.unwrap_err();
    assert!(e.message().contains("gsh login"), "{}", e.message());
    // A bot token for a bot that does not exist cannot be made.
    let e = svc
        .create_token(req(
            admin(),
            "127.0.0.1:1",
            p::CreateTokenRequest {
                r#type: "bot".into(),
                bot_name: "ghost".into(),
                ..Default::default()
            },
        ))
        .await
        .unwrap_err();
    assert!(e.message().contains("does not exist"), "{}", e.message());
}

#[tokio::test]
async fn a_host_renews_with_its_host_id_and_a_host_cert_ttl() {
    let dir = tempfile::tempdir().unwrap();
    let svc = service(dir.path()).await;
    let token = svc
        .create_token(req(
            admin(),
            "127.0.0.1:1",
            p::CreateTokenRequest {
                r#type: "node".into(),
                max_uses: 1,
                ..Default::default()
            },
        ))
        .await
        .unwrap()
        .into_inner()
        .token;
    let (ssh, tls) = keys();
    let joined = svc
        .join(req(
            None,
            "10.0.0.2:1",
            p::JoinRequest {
                token,
                host_name: "web-1".into(),
                addresses: vec!["10.0.0.2".into()],
                ssh_public_key: ssh,
                tls_public_key: tls,
                ..Default::default()
            },
        ))
        .await
        .unwrap()
        .into_inner();
    let host = identity_of(joined.credentials.as_ref().unwrap());
    let ttl = host.expires - now_secs();
    assert!((7 * 86400 - 100..=7 * 86400).contains(&ttl), "{ttl}");
    let renewed = renew(&svc, &host, "10.0.0.2:2").await.unwrap();
    assert_eq!(renewed.name, joined.host_id);
    assert_eq!(renewed.roles, ["@node"]);
    assert_eq!(renewed.traits, host.traits);
}
