//! The watch stream through a real Auth on loopback, with a relay in between that cuts the
//! connection in the middle of an event: the watcher resumes from its cursor and ends up with
//! exactly what the database holds, by replay (no new snapshot) while the Auth is the same, by
//! a new snapshot after the Auth restarted.

// Test code: a failing unwrap or panic is a failing test, which is the point.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicI64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use gatehouse_controlplane::client::AuthEndpoint;
use gatehouse_controlplane::resources::{Resource, Role, parse_document};
use gatehouse_controlplane::role::{AuthConfig, AuthHandle, start};
use gatehouse_controlplane::storage::Store;
use gatehouse_controlplane::tls::Trust;
use gatehouse_controlplane::watch::{WatchCache, follow};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn role(name: &str, logins: usize) -> Role {
    let logins: Vec<String> = (0..logins).map(|i| format!("\"login-{i:06}\"")).collect();
    let doc = format!(
        "kind = \"role\"\n[metadata]\nname = \"{name}\"\n[spec.allow]\nlogins = [{}]\n",
        logins.join(", ")
    );
    let Ok(Resource::Role(r)) = parse_document(&doc) else {
        panic!("role document")
    };
    r
}

/// A TCP relay to `target`; server-to-client bytes stop (both sides closed) once `cut` bytes
/// more have passed, when `cut` is armed (≥ 0).
struct Relay {
    addr: std::net::SocketAddr,
    cut: Arc<AtomicI64>,
    connections: Arc<AtomicUsize>,
}

async fn relay(target: std::net::SocketAddr) -> Relay {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let cut = Arc::new(AtomicI64::new(-1));
    let connections = Arc::new(AtomicUsize::new(0));
    let (c, n) = (Arc::clone(&cut), Arc::clone(&connections));
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            n.fetch_add(1, Ordering::SeqCst);
            let Ok(server) = tokio::net::TcpStream::connect(target).await else {
                continue;
            };
            let cut = Arc::clone(&c);
            tokio::spawn(async move {
                let (mut cr, mut cw) = client.into_split();
                let (mut sr, mut sw) = server.into_split();
                let up = async {
                    let _ = tokio::io::copy(&mut cr, &mut sw).await;
                };
                let down = async {
                    let mut buf = vec![0u8; 4096];
                    loop {
                        let Ok(n) = sr.read(&mut buf).await else {
                            return;
                        };
                        if n == 0 {
                            return;
                        }
                        let budget = cut.load(Ordering::SeqCst);
                        let pass = if budget < 0 {
                            n
                        } else {
                            n.min(usize::try_from(budget).unwrap_or(0))
                        };
                        if cw.write_all(&buf[..pass]).await.is_err() {
                            return;
                        }
                        if budget >= 0 {
                            if pass < n || budget == i64::try_from(pass).unwrap() {
                                // Cut here: one shot.
                                cut.store(-1, Ordering::SeqCst);
                                return;
                            }
                            cut.store(budget - i64::try_from(pass).unwrap(), Ordering::SeqCst);
                        }
                    }
                };
                tokio::select! { () = up => {}, () = down => {} }
            });
        }
    });
    Relay {
        addr,
        cut,
        connections,
    }
}

async fn auth(dir: &std::path::Path, listen: std::net::SocketAddr) -> AuthHandle {
    let config = AuthConfig {
        listen,
        ..Default::default()
    };
    let mut registry = prometheus_client::registry::Registry::default();
    start(dir, Some("watch.test"), &config, &mut registry)
        .await
        .unwrap()
}

/// The roles as the database holds them, as the cache holds items.
async fn roles_in(store: &Store) -> BTreeMap<(String, String), String> {
    store
        .list_roles()
        .await
        .unwrap()
        .into_iter()
        .map(|r| {
            (
                ("role".to_owned(), r.metadata.name.clone()),
                serde_json::to_string(&r).unwrap(),
            )
        })
        .collect()
}

async fn until(what: &str, secs: u64, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_cut_mid_event_resumes_without_a_gap() {
    let dir = tempfile::tempdir().unwrap();
    let first = auth(dir.path(), "127.0.0.1:0".parse().unwrap()).await;
    let auth_addr = first.info.listen;
    let admin = &first.info.admin_dir;
    let endpoint = AuthEndpoint {
        addr: String::new(),
        trust: Trust::CaPem(std::fs::read_to_string(admin.join("ca.pem")).unwrap()),
        identity: Some((
            std::fs::read_to_string(admin.join("tls.crt")).unwrap(),
            std::fs::read_to_string(admin.join("tls.key")).unwrap(),
        )),
    };
    let relay = relay(auth_addr).await;
    let cache = Arc::new(Mutex::new(WatchCache::default()));
    let via = relay.addr.to_string();
    let follower = tokio::spawn(follow(
        move || {
            Some(AuthEndpoint {
                addr: via.clone(),
                ..endpoint.clone()
            })
        },
        vec!["role".into(), "proxy".into()],
        Arc::clone(&cache),
        |_| {},
    ));
    let store = first.service().state().store.clone();
    let snapshot = |c: &Arc<Mutex<WatchCache>>| c.lock().unwrap().clone();
    until("the first snapshot", 10, || snapshot(&cache).snapshots == 1).await;
    store.upsert_role(&role("r0", 1), false, 1).await.unwrap();
    let want = roles_in(&store).await;
    until("r0", 10, || snapshot(&cache).items() == &want).await;
    assert_eq!(relay.connections.load(Ordering::SeqCst), 1);

    // Cut 60 bytes into what comes next: the big role's event (20 KB) cannot arrive whole.
    relay.cut.store(60, Ordering::SeqCst);
    store
        .upsert_role(&role("big", 2000), false, 2)
        .await
        .unwrap();
    until("the cut", 10, || {
        relay.connections.load(Ordering::SeqCst) >= 2
    })
    .await;
    // Changes while the watcher reconnects.
    for i in 1..=5 {
        store
            .upsert_role(&role(&format!("r{i}"), i), false, 3)
            .await
            .unwrap();
    }
    store.delete("role", "r0").await.unwrap();
    let want = roles_in(&store).await;
    assert!(want.contains_key(&("role".to_owned(), "big".to_owned())));
    until("every change after the cut", 20, || {
        snapshot(&cache).items() == &want
    })
    .await;
    let after_cut = snapshot(&cache);
    assert_eq!(
        after_cut.snapshots, 1,
        "the same Auth replays what was missed: no new snapshot"
    );
    assert!(after_cut.changes >= 8, "{after_cut:?}");

    // The Auth restarts (a new epoch: its log is gone); a role written while it was down
    // arrives in the snapshot the resumed stream gets.
    first.shutdown().await.unwrap();
    {
        let db = Store::open(&dir.path().join("gatehouse.db")).await.unwrap();
        db.upsert_role(&role("while-down", 1), false, 4)
            .await
            .unwrap();
        db.close().await;
    }
    let second = auth(dir.path(), auth_addr).await;
    let store = second.service().state().store.clone();
    let want = roles_in(&store).await;
    until("the snapshot from the restarted Auth", 30, || {
        snapshot(&cache).items() == &want
    })
    .await;
    assert_eq!(snapshot(&cache).snapshots, 2);
    follower.abort();
    second.shutdown().await.unwrap();
}
