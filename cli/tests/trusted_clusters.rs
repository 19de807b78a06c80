//! Two clusters as separate processes (each its own Auth, proxy, data dirs and ports): the leaf
//! trusts the root with a role map; the leaf's proxy keeps a tunnel to the root's proxy; root
//! users reach leaf nodes with the real OpenSSH client through the root's proxy, by mapped roles
//! (exact and regular expression); a user whose roles map to nothing is refused saying so;
//! removing the trust cuts access; the leaf going offline is said plainly and its return heals.

// Test code: a failing unwrap or panic is a failing test, which is the point.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use std::time::{Duration, Instant};

use common::{Fleet, openssh};

fn create(f: &Fleet, dir: &std::path::Path, name: &str, doc: &str) -> common::Output {
    let p = dir.join(format!("{name}.toml"));
    std::fs::write(&p, doc).unwrap();
    f.gctl(&["create", "-f", p.to_str().unwrap()])
}

/// A root user logged in through the root's proxy, with an ssh config from `gsh config`.
fn root_user(root: &Fleet, name: &str, roles: &str) -> (tempfile::TempDir, std::path::PathBuf) {
    let home = tempfile::tempdir().unwrap();
    root.user(home.path(), name, roles, &root.login, &[]);
    let config = root.ssh_config(home.path());
    (home, config)
}

fn until(what: &str, secs: u64, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !f() {
        assert!(Instant::now() < deadline, "timed out: {what}");
        std::thread::sleep(Duration::from_millis(300));
    }
}

#[test]
fn root_users_reach_leaf_nodes_by_mapped_roles() {
    let root = Fleet::start("root", &[]);
    let mut leaf = Fleet::start("leaf", &[("web", "env=dev", vec![])]);
    let files = tempfile::tempdir().unwrap();
    // On the root: roles whose users the leaf maps (by name, by pattern) or does not.
    let any_node =
        "[spec.allow]\nlogins = [\"{{internal.logins}}\"]\nnode_labels = { \"*\" = \"*\" }\n";
    for name in ["admin-access", "ops"] {
        create(
            &root,
            files.path(),
            name,
            &format!("kind = \"role\"\n[metadata]\nname = \"{name}\"\n{any_node}"),
        )
        .ok();
    }
    let token = common::token(&root.auth_data(), "trusted_cluster");
    let trust = |token: &str, pin: &str| {
        format!(
            "kind = \"trusted_cluster\"\n[metadata]\nname = \"root\"\n[spec]\nproxy_addr = \"{}\"\ntoken = \"{token}\"\nca_pin = \"{pin}\"\nrole_map = [ {{ remote = \"access\", local = [\"access\"] }}, {{ remote = \"^admin-(.*)$\", local = [\"$1\"] }} ]\n",
            root.proxy_addr
        )
    };
    // A wrong CA pin: said plainly, nothing stored.
    let wrong = format!("sha256:{}", "0".repeat(64));
    let out = create(&leaf, files.path(), "bad", &trust(&token, &wrong));
    assert_ne!(out.status, 0);
    assert!(out.stderr.contains("ca_pin"), "{}", out.stderr);
    create(&leaf, files.path(), "trust", &trust(&token, &root.pin)).ok();

    // The leaf's proxy tunnels to the root's proxy: the root lists the leaf online.
    let (alice, alice_config) = root_user(&root, "alice", "access");
    until("the leaf online at the root", 30, || {
        let out = root.gsh(alice.path(), &["clusters", "--format", "json"], None);
        let v: Vec<serde_json::Value> = serde_json::from_str(&out.stdout).unwrap_or_default();
        v.iter().any(|c| c["name"] == "leaf" && c["online"] == true)
    });
    let clusters = root.gsh(alice.path(), &["clusters"], None).ok().stdout;
    eprintln!("gsh clusters:\n{clusters}");
    assert!(
        clusters.contains("leaf") && clusters.contains("online"),
        "{clusters}"
    );

    // The real OpenSSH client with `gsh config`: a leaf node through the root's proxy.
    let config = root.ssh_config(alice.path());
    let text = std::fs::read_to_string(&config).unwrap();
    assert!(text.contains("Host *.leaf"), "{text}");
    let dest = format!("{}@web.leaf", root.login);
    let run =
        |config: &std::path::Path| openssh(config, &[], &dest, &["echo", "from-the-leaf"], None);
    let _ = alice_config;
    let out = run(&config);
    assert_eq!(out.status, 0, "{}", out.stderr);
    assert_eq!(out.stdout.trim(), "from-the-leaf");
    // gsh ssh --cluster too.
    let out = root.gsh(
        alice.path(),
        &[
            "ssh",
            "--cluster",
            "leaf",
            &format!("{}@web", root.login),
            "echo",
            "via-gsh",
        ],
        None,
    );
    assert_eq!(out.status, 0, "{}", out.stderr);
    assert!(out.stdout.contains("via-gsh"));

    // gsh ls --cluster: the leaf's nodes through the root.
    let ls_leaf = || {
        root.gsh(alice.path(), &["ls", "--cluster", "leaf"], None)
            .ok()
            .stdout
    };
    until("the leaf's node listed through the root", 30, || {
        ls_leaf().contains("web")
    });
    let ls = ls_leaf();
    eprintln!("gsh ls --cluster leaf:\n{ls}");
    assert!(ls.contains("web") && ls.contains("env=dev"), "{ls}");

    // By pattern: admin-access → access.
    let (_bob, bob_config) = root_user(&root, "bob", "admin-access");
    let bob_config = {
        let _ = bob_config;
        root.ssh_config(_bob.path())
    };
    let out = run(&bob_config);
    assert_eq!(out.status, 0, "{}", out.stderr);
    // A role that maps to nothing: refused, and the leaf's audit says why.
    let (carol, _) = root_user(&root, "carol", "ops");
    let carol_config = root.ssh_config(carol.path());
    assert_ne!(run(&carol_config).status, 0);
    let out = root.gsh(carol.path(), &["ls", "--cluster", "leaf"], None);
    assert_ne!(out.status, 0);
    assert!(
        out.stderr
            .contains("none of your roles (ops) maps to a role in cluster leaf"),
        "{}",
        out.stderr
    );
    until("carol's refusal in the leaf's audit", 20, || {
        leaf.events("session.rejected").iter().any(|e| {
            e.to_string()
                .contains("none of your roles (ops) maps to a role in cluster leaf")
        })
    });
    // The root records that it routed sessions to the leaf.
    until("the root's session.route events", 20, || {
        root.events("session.route")
            .iter()
            .any(|e| e["actor"] == "alice" && e.to_string().contains("leaf"))
    });
    // The session's audit stays in the leaf: alice's exec is there.
    until("alice's session in the leaf's audit", 20, || {
        leaf.events("exec")
            .iter()
            .any(|e| e["actor"] == "alice" || e.to_string().contains("from-the-leaf"))
    });

    // The leaf offline (its proxy gone): said plainly at the root; back: sessions go again.
    leaf.proxy.kill_hard();
    until("the root saying the leaf is offline", 20, || {
        let out = run(&config);
        out.status != 0
            && out
                .stderr
                .contains("cluster leaf is offline (its tunnel to this proxy is down since")
    });
    leaf.proxy.restart();
    until("the leaf back", 60, || run(&config).status == 0);

    // Trust removed on the leaf: new sessions stop within 10 s.
    leaf.gctl(&["rm", "trusted_cluster/root"]).ok();
    let removed = Instant::now();
    until("access cut after removal", 20, || run(&config).status != 0);
    eprintln!(
        "access cut {:?} after removal on the leaf",
        removed.elapsed()
    );
    assert!(removed.elapsed() < Duration::from_secs(12));

    // Trust again (a new token), then removed on the root: cut within 10 s too.
    let token = common::token(&root.auth_data(), "trusted_cluster");
    create(&leaf, files.path(), "again", &trust(&token, &root.pin)).ok();
    until("access back after trust again", 60, || {
        run(&config).status == 0
    });
    root.gctl(&["rm", "trusted_cluster/leaf"]).ok();
    let removed = Instant::now();
    until("access cut after removal on the root", 20, || {
        let out = run(&config);
        out.status != 0 && out.stderr.contains("no cluster `leaf` is trusted")
    });
    eprintln!(
        "access cut {:?} after removal on the root",
        removed.elapsed()
    );
    assert!(removed.elapsed() < Duration::from_secs(12));
}

#[test]
fn a_roots_ca_rotations_reach_the_leaf() {
    // The leaf's Auth refreshes its copy of the root's CAs every 2 s here (60 s by default).
    let env = vec![("GATEHOUSE_TRUST_REFRESH_SECS".to_string(), "2".to_string())];
    let root = Fleet::start("rootrot", &[]);
    let leaf = Fleet::start_custom(
        "leafrot",
        "",
        &env,
        &[],
        &[("web", "env=dev", vec![])],
        |p| p.to_string(),
    );
    let files = tempfile::tempdir().unwrap();
    let token = common::token(&root.auth_data(), "trusted_cluster");
    let trust = format!(
        "kind = \"trusted_cluster\"\n[metadata]\nname = \"rootrot\"\n[spec]\nproxy_addr = \"{}\"\ntoken = \"{token}\"\nca_pin = \"{}\"\nrole_map = [ {{ remote = \"access\", local = [\"access\"] }} ]\n",
        root.proxy_addr, root.pin
    );
    create(&leaf, files.path(), "trust", &trust).ok();
    let (alice, _) = root_user(&root, "alice", "access");
    let dest = format!("{}@web.leafrot", root.login);
    let reach = || {
        let config = root.ssh_config(alice.path());
        openssh(&config, &[], &dest, &["echo", "from-the-leaf"], None)
    };
    until("a leaf node through the root", 60, || reach().status == 0);

    // The root rotates its user and X.509 CAs; alice's next login is signed by the new ones.
    root.gctl(&["auth", "rotate", "--type", "user", "--grace", "10m"])
        .ok();
    root.gctl(&["auth", "rotate", "--type", "tls", "--grace", "10m"])
        .ok();
    let pw = root.reset_password("alice");
    root.gsh(
        alice.path(),
        &["login", "--user", "alice", "--password-stdin"],
        Some(&format!("{pw}\n")),
    )
    .ok();
    // The leaf hears of it (its agent trusts the root's new user CA; its proxy's link to the
    // root stays up through the cross-signed grace): alice reaches the leaf node again.
    until("the new certificate accepted at the leaf", 60, || {
        reach().status == 0
    });
    assert!(
        leaf.auth.log().contains("the root's CAs changed"),
        "{}",
        leaf.auth.log()
    );
}
