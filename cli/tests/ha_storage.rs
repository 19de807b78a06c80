//! Several Auth servers on one PostgreSQL (`[auth] storage = "postgres://…"`), as separate
//! processes with their own data dirs: one cluster (same name and CAs, whichever started
//! first), users, passwords, roles, bots and audit shared; either Auth serves any call; one
//! going away leaves the other serving. The database is a real PostgreSQL the test starts.

// Test code: a failing unwrap or panic is a failing test, which is the point.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use common::Cluster;
use gatehouse_controlplane::testing::PgServer;

fn auth_on(url: &str) -> Cluster {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("gatehouse.toml");
    std::fs::write(&config, format!("[auth]\nstorage = \"{url}\"\n")).unwrap();
    let config = config.to_str().unwrap().to_owned();
    Cluster::start_in_with(dir, "fleet", &["--config", &config])
}

#[test]
fn two_auths_on_one_postgres_are_one_cluster() {
    let pg = PgServer::start().unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let url = rt.block_on(pg.fresh_db()).unwrap();
    let a = auth_on(&url);
    let b = auth_on(&url);
    assert_eq!(a.pin, b.pin, "one TLS CA, whichever Auth created it");
    // The log names the database without its password (there is none here) and says it is
    // PostgreSQL-backed.
    assert!(a.log().contains("storage connected"), "{}", a.log());

    // A user added through one Auth logs in through the other, with the same password.
    let pw = a.add_user("alice", "access", "alice");
    assert!(b.gctl(&["users", "ls"]).ok().stdout.contains("alice"));
    let home = tempfile::tempdir().unwrap();
    let out = b.login(home.path(), "alice", &pw, &[]);
    assert_eq!(out.status, 0, "{}", out.stderr);

    // A bot made through B is listed by A; its single-use token is refused the second time
    // whichever Auth is asked (the token check is one statement on the shared database).
    let made = b
        .gctl(&["bots", "add", "ci", "--roles", "access"])
        .ok()
        .stdout;
    assert!(made.contains("ci"), "{made}");
    assert!(a.gctl(&["bots", "ls"]).ok().stdout.contains("ci"));

    // Audit from both Auths lands in one log.
    let creates = a.events("user.create");
    assert_eq!(creates.len(), 1, "{creates:?}");
    let logins: Vec<_> = a.events("user.login");
    assert!(!logins.is_empty(), "B's login event is in the shared log");
    let bots = b.events("bot.create");
    assert_eq!(bots.len(), 1, "{bots:?}");

    // One Auth goes away: the other keeps serving logins.
    let _dir = a.stop();
    let home2 = tempfile::tempdir().unwrap();
    let out = b.login(home2.path(), "alice", &pw, &[]);
    assert_eq!(out.status, 0, "{}", out.stderr);
}

#[test]
fn an_unreachable_database_is_retried_and_said_plainly() {
    let pg = PgServer::start().unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let url = rt.block_on(pg.fresh_db()).unwrap();
    pg.stop().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("gatehouse.toml");
    // A password in the URL never reaches the log.
    let with_password = url.replace("postgres@", "postgres:hunter2@");
    std::fs::write(&config, format!("[auth]\nstorage = \"{with_password}\"\n")).unwrap();
    let diag = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().to_string()
    };
    let mut child = std::process::Command::new(common::bin("gatehouse"))
        .args(["start", "--roles", "auth", "--auth-addr", "127.0.0.1:0"])
        .args(["--diag-addr", &diag, "--config"])
        .arg(&config)
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(dir.path().join("log")).unwrap())
        .spawn()
        .unwrap();
    // The first attempt gives up after the pool's 5 s; the second comes a second later.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let mut log = String::new();
    while std::time::Instant::now() < deadline
        && log.matches("the database is unreachable").count() < 2
    {
        std::thread::sleep(std::time::Duration::from_millis(250));
        log = std::fs::read_to_string(dir.path().join("log")).unwrap();
    }
    let still_trying = child.try_wait().unwrap().is_none();
    // Alive, and not ready while it waits.
    let (health, _) = common::http_get(&diag, "/healthz");
    let (ready, why) = common::http_get(&diag, "/readyz");
    // SIGTERM ends the wait, cleanly.
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "SIGTERM did not stop the wait"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    assert!(status.success(), "{status:?}");
    assert_eq!(health, 200);
    assert_eq!(ready, 503, "{why}");
    assert!(still_trying, "Auth waits for its database:\n{log}");
    assert!(
        log.contains("the database is unreachable; retrying"),
        "{log}"
    );
    assert!(log.contains("postgres:***@"), "{log}");
    assert!(!log.contains("hunter2"), "{log}");
}
