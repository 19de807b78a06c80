//! One storage suite, run against every backend: SQLite in a temporary directory and a real
//! PostgreSQL the test starts (`initdb` + `pg_ctl` on loopback, see `crate::testing`).

use super::*;
use crate::testing::PgServer;

/// The stores a test runs on, with what keeps them alive.
struct Backends {
    _dir: tempfile::TempDir,
    pg: PgServer,
    stores: Vec<(&'static str, Store)>,
}

async fn backends() -> Backends {
    let dir = tempfile::tempdir().unwrap();
    let sqlite = Store::open(&dir.path().join("db.sqlite")).await.unwrap();
    let pg = PgServer::start().unwrap();
    let url = pg.fresh_db().await.unwrap();
    let postgres = Store::connect(&url).await.unwrap();
    assert_eq!(postgres.backend(), Backend::Postgres);
    assert_eq!(sqlite.backend(), Backend::Sqlite);
    Backends {
        _dir: dir,
        pg,
        stores: vec![("sqlite", sqlite), ("postgres", postgres)],
    }
}

fn token(hash: &str, expires: i64, max_uses: u32) -> TokenRecord {
    TokenRecord {
        id: format!("id-{hash}"),
        hash: hash.into(),
        token_type: "node".into(),
        expires,
        max_uses,
        uses: 0,
        created: 0,
        created_by: "test".into(),
        bot_name: String::new(),
        labels: vec!["env=dev".into()],
    }
}

fn event(id: &str, t: i64, ty: &str) -> StoredEvent {
    StoredEvent {
        id: 0,
        event_id: id.into(),
        time_nanos: t,
        event_type: ty.into(),
        actor: "a".into(),
        source_addr: "127.0.0.1".into(),
        cluster: "c".into(),
        data: "{}".into(),
    }
}

#[tokio::test]
async fn tokens_single_use_expired_and_unknown() {
    let b = backends().await;
    for (name, s) in &b.stores {
        s.insert_token(&token("a", 100, 1)).await.unwrap();
        s.insert_token(&token("b", 100, 0)).await.unwrap();
        assert!(
            s.consume_token("a", &["node"], 50).await.unwrap().is_ok(),
            "{name}"
        );
        assert_eq!(
            s.consume_token("a", &["node"], 50).await.unwrap(),
            Err(TokenRejection::UsedUp),
            "{name}"
        );
        // A token of another type is refused and left as it was.
        assert_eq!(
            s.consume_token("b", &["trusted_cluster"], 50)
                .await
                .unwrap(),
            Err(TokenRejection::WrongType),
            "{name}"
        );
        assert!(
            s.consume_token("b", &["proxy", "node"], 50)
                .await
                .unwrap()
                .is_ok()
        );
        let t = s.consume_token("b", &["node"], 51).await.unwrap().unwrap();
        assert_eq!(
            (t.uses, t.labels.as_slice()),
            (2, &["env=dev".to_owned()][..])
        );
        assert_eq!(
            s.consume_token("b", &["node"], 100).await.unwrap(),
            Err(TokenRejection::Expired)
        );
        assert_eq!(
            s.consume_token("zzz", &["node"], 1).await.unwrap(),
            Err(TokenRejection::NotFound)
        );
        let uses: Vec<u32> = s
            .list_tokens()
            .await
            .unwrap()
            .iter()
            .map(|t| t.uses)
            .collect();
        assert_eq!(uses, [1, 2], "{name}");
        s.delete_token("id-a", "").await.unwrap();
        assert!(s.delete_token("id-a", "").await.is_err());
        assert_eq!(s.reap_tokens(1000, 10).await.unwrap(), 1, "{name}");
    }
}

/// Two Auths on one PostgreSQL database race for a single-use token: it is used once.
#[tokio::test]
async fn a_single_use_token_raced_through_two_auths_is_used_once() {
    let pg = PgServer::start().unwrap();
    let url = pg.fresh_db().await.unwrap();
    let one = Store::connect(&url).await.unwrap();
    let two = Store::connect(&url).await.unwrap();
    for round in 0..20 {
        let hash = format!("race-{round}");
        one.insert_token(&token(&hash, 100, 1)).await.unwrap();
        let mut tries = tokio::task::JoinSet::new();
        for i in 0..8 {
            let s = if i % 2 == 0 { one.clone() } else { two.clone() };
            let hash = hash.clone();
            tries
                .spawn(async move { s.consume_token(&hash, &["node"], 50).await.unwrap().is_ok() });
        }
        let won = tries.join_all().await.into_iter().filter(|ok| *ok).count();
        assert_eq!(won, 1, "round {round}");
    }
}

#[tokio::test]
async fn events_are_ordered_deduplicated_and_filtered() {
    let b = backends().await;
    for (name, s) in &b.stores {
        assert_eq!(
            s.append_events(&[event("1", 10, "x"), event("2", 20, "y")])
                .await
                .unwrap(),
            (2, 0),
            "{name}"
        );
        // A duplicate inside one batch and one across batches are both dropped.
        assert_eq!(
            s.append_events(&[
                event("2", 20, "y"),
                event("3", 30, "x"),
                event("3", 30, "x")
            ])
            .await
            .unwrap(),
            (1, 2),
            "{name}"
        );
        let all = s.search_events(&EventFilter::default()).await.unwrap();
        assert_eq!(
            all.iter().map(|e| e.event_id.as_str()).collect::<Vec<_>>(),
            ["1", "2", "3"],
            "{name}"
        );
        assert!(all.windows(2).all(|w| w[0].id < w[1].id));
        let xs = s
            .search_events(&EventFilter {
                types: vec!["x".into(), "z".into()],
                from_nanos: 15,
                ..Default::default()
            })
            .await
            .unwrap();
        assert_eq!(xs.len(), 1, "{name}");
        assert_eq!(xs[0].event_id, "3");
        let after = s
            .search_events(&EventFilter {
                after_id: all[0].id,
                limit: 1,
                ..Default::default()
            })
            .await
            .unwrap();
        assert_eq!(after.len(), 1);
        assert_eq!(after[0].event_id, "2", "{name}");
        // One actor's events.
        let mut bobs = event("b1", 40, "x");
        bobs.actor = "bob".into();
        assert_eq!(s.append_events(&[bobs]).await.unwrap(), (1, 0));
        let only = s
            .search_events(&EventFilter {
                actor: Some("bob".into()),
                types: vec!["x".into()],
                from_nanos: 35,
                ..Default::default()
            })
            .await
            .unwrap();
        assert_eq!(only.len(), 1, "{name}");
        assert_eq!(only[0].event_id, "b1");
        // Several callers' batches in one transaction, each counted on its own.
        let groups = vec![
            vec![event("g1", 50, "g"), event("g2", 50, "g")],
            vec![event("g2", 50, "g"), event("g3", 50, "g")],
        ];
        assert_eq!(
            s.append_event_groups(&groups).await.unwrap(),
            [(2, 0), (1, 1)],
            "{name}"
        );
        // More events than one statement carries.
        let many: Vec<StoredEvent> = (0..2500)
            .map(|i| event(&format!("m{i}"), 100 + i, "m"))
            .collect();
        assert_eq!(s.append_events(&many).await.unwrap(), (2500, 0), "{name}");
    }
}

#[tokio::test]
async fn users_roles_meta_cas_and_nodes() {
    let b = backends().await;
    for (name, s) in &b.stores {
        assert_eq!(s.init_meta("cluster", "one").await.unwrap(), "one");
        assert_eq!(
            s.init_meta("cluster", "two").await.unwrap(),
            "one",
            "{name}"
        );
        assert_eq!(
            s.init_ca("user", "pub", "priv", 1).await.unwrap(),
            ("pub".to_owned(), "priv".to_owned())
        );
        assert_eq!(s.init_ca("user", "other", "x", 2).await.unwrap().0, "pub");
        let Ok(crate::resources::Resource::Role(role)) = crate::resources::parse_document(
            "kind = \"role\"\n[metadata]\nname = \"dev\"\n[spec.allow]\nlogins = [\"ubuntu\"]\n",
        ) else {
            panic!("role document")
        };
        assert!(s.upsert_role(&role, true, 1).await.unwrap());
        assert!(s.upsert_role(&role, true, 1).await.is_err(), "{name}");
        assert_eq!(s.get_role("dev").await.unwrap().unwrap(), role);
        assert!(s.get_role("nobody").await.unwrap().is_none());
        s.delete("role", "dev").await.unwrap();
        assert!(
            s.get_role("dev").await.unwrap().is_none(),
            "{name}: cache cleared"
        );
        let Ok(crate::resources::Resource::User(user)) = crate::resources::parse_document(
            "kind = \"user\"\n[metadata]\nname = \"alice\"\n[spec]\nroles = [\"dev\"]\n",
        ) else {
            panic!("user document")
        };
        s.create_user(&user, "hash1", 1).await.unwrap();
        assert!(s.create_user(&user, "hash2", 1).await.is_err());
        assert!(!s.upsert_user(&user, false, 2).await.unwrap());
        s.set_password_hash("alice", "hash3", 3).await.unwrap();
        let (back, hash) = s.get_user("alice").await.unwrap().unwrap();
        assert_eq!(
            (back, hash.as_deref()),
            (user.clone(), Some("hash3")),
            "{name}"
        );
        assert_eq!(s.list_users().await.unwrap().len(), 1);
        s.upsert_nodes(
            &[
                ("n1".into(), "{\"a\":1}".into()),
                ("n2".into(), "{}".into()),
            ],
            100,
        )
        .await
        .unwrap();
        s.upsert_nodes(&[("n1".into(), "{\"a\":2}".into())], 200)
            .await
            .unwrap();
        assert_eq!(s.list_nodes(150).await.unwrap(), ["{\"a\":2}"], "{name}");
    }
}

#[tokio::test]
async fn recordings_index_on_both_backends() {
    let b = backends().await;
    for (name, s) in &b.stores {
        let row = RecordingRow {
            id: "r1".into(),
            user: "alice".into(),
            login: "root".into(),
            node: "web".into(),
            node_id: "h1".into(),
            kind: "pty".into(),
            command: String::new(),
            started_ms: 10,
            updated_ms: 10,
            duration_ms: 0,
            state: "live".into(),
            next_offset: 0,
            next_seq: 0,
            reason: String::new(),
        };
        s.insert_recording(&row).await.unwrap();
        assert!(matches!(
            s.insert_recording(&row).await,
            Err(StoreError::AlreadyExists { .. })
        ));
        assert!(s.advance_recording("r1", 0, 100, 3, 50, 20).await.unwrap());
        assert!(
            !s.advance_recording("r1", 0, 200, 4, 60, 21).await.unwrap(),
            "{name}"
        );
        let by_user = s
            .list_recordings(&RecordingFilter {
                user: Some("alice".into()),
                node: Some("h1".into()),
                live_only: true,
                ..Default::default()
            })
            .await
            .unwrap();
        assert_eq!(by_user.len(), 1, "{name}");
        assert_eq!(by_user[0].next_offset, 100);
        s.finish_recording("r1", "complete", 70, "", 30)
            .await
            .unwrap();
        let got = s.get_recording("r1").await.unwrap().unwrap();
        assert_eq!(
            (got.state.as_str(), got.duration_ms),
            ("complete", 70),
            "{name}"
        );
    }
}

fn op(name: &str, instance: &str, generation: i64, addr: &str) -> RenewOp {
    RenewOp {
        name: name.into(),
        instance: instance.into(),
        generation,
        addr: addr.into(),
        now: 100,
    }
}

async fn bot(s: &Store, name: &str) {
    s.create_bot(&BotRow {
        name: name.into(),
        roles: vec!["r".into()],
        created: 1,
        created_by: "admin".into(),
        instance: String::new(),
        generation: 0,
        last_seen: 0,
        last_addr: String::new(),
        locked: false,
        lock_reason: String::new(),
    })
    .await
    .unwrap();
    s.join_bot(name, "i1", 1, "10.0.0.1").await.unwrap();
}

/// One batch holding every kind of renewal gives what one-at-a-time writes would.
#[tokio::test]
async fn a_batch_renews_like_one_renewal_at_a_time() {
    let b = backends().await;
    for (backend, s) in &b.stores {
        for name in ["a", "b", "c", "d", "e"] {
            bot(s, name).await;
        }
        // c is already at generation 2; e is locked.
        s.renew_bots(&[op("c", "i1", 1, "10.0.0.3")], |_, _| vec![])
            .await
            .unwrap();
        s.renew_bots(
            &[op("e", "i1", 1, "x"), op("e", "i1", 1, "y")],
            |_, _| vec![],
        )
        .await
        .unwrap();
        let batch = [
            op("a", "i1", 1, "10.0.0.1"),     // renewed
            op("b", "i1", 1, "10.0.0.2"),     // renewed …
            op("b", "i1", 1, "10.9.9.9"),     // … and its copy in the same batch: stolen
            op("c", "i1", 1, "10.0.0.8"),     // an old generation: stolen
            op("d", "old", 1, "10.0.0.4"),    // an earlier join: superseded
            op("e", "i1", 2, "10.0.0.5"),     // locked
            op("ghost", "i1", 1, "10.0.0.6"), // no such bot
            op("a", "i1", 2, "10.0.0.1"),     // as if after the first: current, renewed
        ];
        let mut seen = Vec::new();
        let out = s
            .renew_bots(&batch, |op, o| {
                seen.push((op.name.clone(), o.clone()));
                vec![event(&format!("ev-{}-{}", op.name, seen.len()), 1, "renew")]
            })
            .await
            .unwrap();
        assert_eq!(out[0], RenewOutcome::Renewed(2), "{backend}");
        assert_eq!(out[1], RenewOutcome::Renewed(2));
        assert_eq!(
            out[2],
            RenewOutcome::Stolen {
                last_addr: "10.0.0.2".into(),
                current: 2
            },
            "{backend}"
        );
        assert_eq!(
            out[3],
            RenewOutcome::Stolen {
                last_addr: "10.0.0.3".into(),
                current: 2
            }
        );
        assert_eq!(out[4], RenewOutcome::Superseded);
        assert!(matches!(&out[5], RenewOutcome::Locked(why) if why.contains("copied")));
        assert_eq!(out[6], RenewOutcome::NoBot);
        assert_eq!(out[7], RenewOutcome::Renewed(3), "{backend}");
        assert_eq!(seen.len(), batch.len(), "every renewal's events, in order");
        assert_eq!(seen[3].0, "c");
        let stored = s
            .search_events(&EventFilter {
                types: vec!["renew".into()],
                ..Default::default()
            })
            .await
            .unwrap();
        assert_eq!(
            stored.len(),
            batch.len(),
            "{backend}: events written with the batch"
        );
        for (name, locked, generation) in [
            ("a", false, 3),
            ("b", true, 2),
            ("c", true, 2),
            ("d", false, 1),
            ("e", true, 2),
        ] {
            let got = s.get_bot(name).await.unwrap().unwrap();
            assert_eq!(
                (got.locked, got.generation),
                (locked, generation),
                "{backend} {name}"
            );
        }
    }
}

/// A database migrated by a newer Gatehouse is refused with a clear error.
#[tokio::test]
async fn a_schema_newer_than_the_binary_is_refused() {
    let b = backends().await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("db.sqlite");
    let sqlite = Store::open(&path).await.unwrap();
    sqlx::query("INSERT INTO _sqlx_migrations (version, description, success, checksum, execution_time) VALUES (9999, 'from the future', TRUE, X'00', 0)")
        .execute(&sqlite.pool)
        .await
        .unwrap();
    sqlite.close().await;
    let err = Store::open(&path).await.unwrap_err();
    assert!(matches!(err, StoreError::SchemaNewer(9999)), "{err}");
    assert!(err.to_string().contains("newer than this binary"), "{err}");

    let url = b.pg.fresh_db().await.unwrap();
    let pg = Store::connect(&url).await.unwrap();
    sqlx::query("INSERT INTO _sqlx_migrations (version, description, success, checksum, execution_time) VALUES (9999, 'from the future', TRUE, '\\x00'::bytea, 0)")
        .execute(&pg.pool)
        .await
        .unwrap();
    pg.close().await;
    let err = Store::connect(&url).await.unwrap_err();
    assert!(matches!(err, StoreError::SchemaNewer(9999)), "{err}");
}

#[tokio::test]
async fn a_database_that_is_down_or_a_bad_url_is_a_clear_error() {
    let err = Store::connect("mysql://x").await.unwrap_err();
    assert!(err.to_string().contains("postgres://"), "{err}");
    let pg = PgServer::start().unwrap();
    let url = pg.fresh_db().await.unwrap();
    pg.stop().unwrap();
    let started = std::time::Instant::now();
    let err = Store::connect(&url).await.unwrap_err();
    assert!(matches!(err, StoreError::Db(_)), "{err}");
    assert!(started.elapsed() < std::time::Duration::from_secs(30));
}

#[test]
fn urls_in_logs_carry_no_password() {
    assert_eq!(
        redact_url("postgres://gh:s3cret@db.example:5432/gatehouse"),
        "postgres://gh:***@db.example:5432/gatehouse"
    );
    assert_eq!(redact_url("postgres://gh@db/x"), "postgres://gh@db/x");
    assert_eq!(
        redact_url("sqlite:///var/lib/g.db"),
        "sqlite:///var/lib/g.db"
    );
}

/// A role changed through one Auth reaches the other Auth's cache on the same PostgreSQL.
#[tokio::test]
async fn a_role_changed_through_one_auth_is_seen_by_the_other() {
    let pg = PgServer::start().unwrap();
    let url = pg.fresh_db().await.unwrap();
    let one = Store::connect(&url).await.unwrap();
    let two = Store::connect(&url).await.unwrap();
    let mut heard = two.changes();
    let role = |logins: &str| {
        let doc = format!(
            "kind = \"role\"\n[metadata]\nname = \"dev\"\n[spec.allow]\nlogins = [\"{logins}\"]\n"
        );
        let Ok(crate::resources::Resource::Role(r)) = crate::resources::parse_document(&doc) else {
            panic!("role document")
        };
        r
    };
    one.upsert_role(&role("ubuntu"), false, 1).await.unwrap();
    // Two reads and caches it.
    assert_eq!(two.get_role("dev").await.unwrap().unwrap(), role("ubuntu"));
    one.upsert_role(&role("admin"), false, 2).await.unwrap();
    // Two hears of it (its own announcements stay in its process: this came through
    // PostgreSQL) and reads the new role.
    let got = tokio::time::timeout(std::time::Duration::from_secs(5), async {
        loop {
            if let Ok(Change::Role(name)) = heard.recv().await {
                assert_eq!(name, "dev");
                if two.get_role("dev").await.unwrap().unwrap() == role("admin") {
                    return;
                }
            }
        }
    })
    .await;
    assert!(got.is_ok(), "the other Auth never saw the change");
    one.delete("role", "dev").await.unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while two.get_role("dev").await.unwrap().is_some() {
        assert!(
            std::time::Instant::now() < deadline,
            "deletion never reached the other Auth"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// Proxies announce themselves, expire when not renewed, leave; each write is a change.
#[tokio::test]
async fn proxies_announce_expire_and_leave() {
    let b = backends().await;
    for (name, s) in &b.stores {
        let mut heard = s.changes();
        s.upsert_proxy("p1", r#"{"addr":"10.0.0.1:3080"}"#, 100)
            .await
            .unwrap();
        s.upsert_proxy("p2", r#"{"addr":"10.0.0.2:3080"}"#, 50)
            .await
            .unwrap();
        assert_eq!(
            heard.recv().await.unwrap(),
            Change::Proxy("p1".into()),
            "{name}"
        );
        let all = s.list_proxies(10).await.unwrap();
        assert_eq!(
            all.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>(),
            ["p1", "p2"],
            "{name}"
        );
        // p2 expired at 50.
        assert_eq!(s.list_proxies(60).await.unwrap().len(), 1, "{name}");
        assert!(s.get_proxy("p2", 60).await.unwrap().is_none(), "{name}");
        // Renewed with a new address.
        s.upsert_proxy("p2", r#"{"addr":"10.0.0.3:3080"}"#, 200)
            .await
            .unwrap();
        assert_eq!(
            s.get_proxy("p2", 60).await.unwrap().as_deref(),
            Some(r#"{"addr":"10.0.0.3:3080"}"#),
            "{name}"
        );
        s.delete_proxy("p1").await.unwrap();
        s.delete_proxy("nobody").await.unwrap();
        assert_eq!(s.list_proxies(60).await.unwrap().len(), 1, "{name}");
    }
}

#[tokio::test]
async fn a_second_factor_step_is_used_once_and_only_forward() {
    let b = backends().await;
    for (name, s) in &b.stores {
        assert_eq!(s.get_mfa_device("alice").await.unwrap(), None, "{name}");
        s.put_mfa_device("alice", "MZXW6YTBOI", 100, 1)
            .await
            .unwrap();
        let d = s.get_mfa_device("alice").await.unwrap().unwrap();
        assert_eq!(
            (d.secret.as_str(), d.last_step),
            ("MZXW6YTBOI", 100),
            "{name}"
        );
        assert!(
            !s.use_mfa_step("alice", 100).await.unwrap(),
            "{name}: same step"
        );
        assert!(
            !s.use_mfa_step("alice", 99).await.unwrap(),
            "{name}: older step"
        );
        assert!(s.use_mfa_step("alice", 101).await.unwrap(), "{name}");
        assert!(
            !s.use_mfa_step("alice", 101).await.unwrap(),
            "{name}: replay"
        );
        assert!(
            !s.use_mfa_step("bob", 5).await.unwrap(),
            "{name}: no device"
        );
        assert!(s.delete_mfa_device("alice").await.unwrap(), "{name}");
        assert_eq!(s.get_mfa_device("alice").await.unwrap(), None, "{name}");
    }
}
