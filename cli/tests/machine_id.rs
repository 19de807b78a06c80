//! Machine ID end to end, with real processes and the real tools: a bot added with `gctl bots
//! add`, `gbot` joining through the proxy and renewing (TTL 1 min, every 20 s), the real
//! `ssh -F DIR/ssh_config`, `openssl` and Python's `ssl` on its outputs, `gctl`/`gsh` acting as
//! the bot; readers that never see a torn file or a mismatched pair; a copied identity locking
//! the bot; `--oneshot` success and failures; bad destinations refused before anything is
//! written.

// Test code: a failing unwrap or panic is a failing test, which is the point.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{Fleet, Output, bin, http_get, mode, openssh, run};

/// A role for bots: log in as the test's user on every node, list nodes.
fn bot_role(f: &Fleet) {
    let path = f.dir.path().join("ci-bot.toml");
    std::fs::write(
        &path,
        format!(
            "kind = \"role\"\n[metadata]\nname = \"ci-bot\"\n[spec.allow]\nlogins = [\"{}\"]\nnode_labels = {{ \"*\" = \"*\" }}\n[[spec.allow.rules]]\nresources = [\"node\"]\nverbs = [\"list\", \"read\"]\n",
            f.login
        ),
    )
    .unwrap();
    f.gctl(&["create", "-f", path.to_str().unwrap()]).ok();
}

/// `gctl bots add NAME --roles ci-bot`: the token it prints.
fn add_bot(f: &Fleet, name: &str) -> String {
    let out = f.gctl(&["bots", "add", name, "--roles", "ci-bot"]).ok();
    token_in(&out.stdout)
}

fn token_in(text: &str) -> String {
    let mut lines = text.lines().skip_while(|l| !l.contains("shown only now:"));
    lines.next();
    lines
        .map(str::trim)
        .find(|l| !l.is_empty())
        .unwrap_or_else(|| panic!("no token in:\n{text}"))
        .to_string()
}

/// A running `gbot start`, killed on drop; its log in a file.
struct Gbot {
    child: Child,
    log: PathBuf,
}

impl Gbot {
    fn start(f: &Fleet, args: &[&str]) -> Self {
        let log = f.dir.path().join(format!("gbot-{}.log", rand_suffix()));
        let mut child = Command::new(bin("gbot"))
            .args(["start", "--proxy", &f.proxy_addr, "--ca-pin", &f.pin])
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let path = log.clone();
        std::thread::spawn(move || {
            use std::io::Write;
            let mut file = std::fs::File::create(path).unwrap();
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let _ = writeln!(file, "{line}");
            }
        });
        Self { child, log }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The diagnostics address it printed.
    fn diag(&self) -> String {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(addr) = self
                .log()
                .lines()
                .find_map(|l| l.split("diagnostics on http://").nth(1))
            {
                return addr.trim().to_string();
            }
            assert!(
                Instant::now() < deadline,
                "no diagnostics line:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// `gatehouse_gbot_renewals_total` (joins included).
    fn renewals(&self, diag: &str) -> u64 {
        let (_, body) = http_get(diag, "/metrics");
        metric(&body, "gatehouse_gbot_renewals_total")
    }

    fn wait_renewals(&self, diag: &str, n: u64, within: Duration) {
        let deadline = Instant::now() + within;
        while self.renewals(diag) < n {
            assert!(
                Instant::now() < deadline,
                "fewer than {n} renewals in {within:?}:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Drop for Gbot {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn rand_suffix() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

fn metric(body: &str, name: &str) -> u64 {
    body.lines()
        .find_map(|l| {
            l.strip_prefix(name)
                .and_then(|v| v.trim().parse::<f64>().ok())
        })
        .map(|v| v as u64)
        .unwrap_or(0)
}

fn tool(program: &str, args: &[&str]) -> Output {
    let mut cmd = Command::new(program);
    cmd.args(args);
    run(cmd, None)
}

/// The must-show: TTL 1 min, renewal every 20 s; after three renewals the real OpenSSH client
/// reaches a node with the `ssh_config` output, `openssl` verifies the TLS output and Python's
/// `ssl` authenticates with it; `gctl` and `gsh` act as the bot; SIGHUP renews at once.
#[test]
fn gbot_renews_and_the_real_tools_use_its_outputs() {
    let f = Fleet::start("mid", &[("node1", "env=ci", vec![])]);
    bot_role(&f);
    let token = add_bot(&f, "ci");
    let data = f.dir.path().join("bot-data");
    let out = f.dir.path().join("machine-id");
    let bot = Gbot::start(
        &f,
        &[
            "--token",
            &token,
            "--data-dir",
            data.to_str().unwrap(),
            "--destination",
            out.to_str().unwrap(),
            "--ttl",
            "1m",
            "--renew-interval",
            "20s",
            "--diag-addr",
            "127.0.0.1:0",
        ],
    );
    let diag = bot.diag();
    // The join and three renewals.
    bot.wait_renewals(&diag, 4, Duration::from_secs(120));
    assert_eq!(http_get(&diag, "/healthz").0, 200);
    let (code, body) = http_get(&diag, "/readyz");
    assert_eq!(code, 200, "{body}");
    let (_, metrics) = http_get(&diag, "/metrics");
    let left = metric(&metrics, "gatehouse_gbot_seconds_to_expiry");
    assert!(
        (1..=60).contains(&left),
        "seconds to expiry {left}\n{metrics}"
    );
    let bots: serde_json::Value =
        serde_json::from_str(&f.gctl(&["bots", "ls", "--format", "json"]).ok().stdout).unwrap();
    assert!(bots[0]["generation"].as_i64().unwrap() >= 4, "{bots}");

    // Files 0600 in 0700 directories.
    assert_eq!(mode(&out), 0o700);
    assert_eq!(mode(&data), 0o700);
    assert_eq!(mode(&data.join("identity.json")), 0o600);
    for file in [
        "id_ed25519",
        "id_ed25519-cert.pub",
        "tls.key",
        "tls.crt",
        "ca.pem",
        "ssh_config",
        "known_hosts",
    ] {
        assert_eq!(mode(&out.join(file)), 0o600, "{file}");
    }

    // The real OpenSSH client with the ssh output.
    f.wait_for_nodes(&out, 1);
    let dest = format!("{}@node1.mid", f.login);
    let ssh = openssh(
        &out.join("ssh_config"),
        &[],
        &dest,
        &["echo", "bot-was-here"],
        None,
    )
    .ok();
    assert!(ssh.stdout.contains("bot-was-here"), "{ssh:?}");

    // openssl: the chain verifies, the key is the certificate's.
    let crt = out.join("tls.crt").display().to_string();
    let key = out.join("tls.key").display().to_string();
    let ca = out.join("ca.pem").display().to_string();
    let verify = tool("openssl", &["verify", "-CAfile", &ca, &crt]).ok();
    assert!(verify.stdout.contains(": OK"), "{verify:?}");
    let from_key = tool("openssl", &["pkey", "-in", &key, "-pubout"])
        .ok()
        .stdout;
    let from_cert = tool("openssl", &["x509", "-in", &crt, "-pubkey", "-noout"])
        .ok()
        .stdout;
    assert_eq!(from_key, from_cert);
    // Python's ssl loads the pair and Auth (through the proxy) accepts it: the server speaks
    // first (HTTP/2 SETTINGS) only to a client whose certificate it took.
    let (host, port) = f.proxy_addr.rsplit_once(':').unwrap();
    let py = format!(
        "import ssl, socket\n\
         ctx = ssl.create_default_context(cafile={ca:?})\n\
         ctx.load_cert_chain({crt:?}, {key:?})\n\
         ctx.set_alpn_protocols(['gatehouse-auth'])\n\
         s = ctx.wrap_socket(socket.create_connection(({host:?}, {port})), server_hostname='auth.gatehouse.cluster.local')\n\
         s.settimeout(10)\n\
         print('accepted', len(s.recv(9)) > 0)\n"
    );
    let python = tool("python3", &["-c", &py]).ok();
    assert!(python.stdout.contains("accepted True"), "{python:?}");

    // curl presents the pair to a TLS server that asks for a client certificate from the
    // cluster CA (OpenSSL's s_server), which shows the certificate it verified.
    let served = curl_with_client_cert(f.dir.path(), &ca, &crt, &key);
    assert!(
        served.contains("CN=ci") || served.contains("CN = ci"),
        "{served}"
    );

    // gctl and gsh act as the bot, limited by its roles.
    let nodes = run(
        {
            let mut c = Command::new(bin("gctl"));
            c.args(["--identity", out.to_str().unwrap(), "get", "nodes"]);
            c
        },
        None,
    )
    .ok();
    assert!(nodes.stdout.contains("node1"), "{nodes:?}");
    let users = run(
        {
            let mut c = Command::new(bin("gctl"));
            c.args(["--identity", out.to_str().unwrap(), "users", "ls"]);
            c
        },
        None,
    )
    .failed();
    assert!(users.stderr.contains("bot `ci`"), "{users:?}");
    let ls = run(
        {
            let mut c = Command::new(bin("gsh"));
            c.args(["--identity", out.to_str().unwrap(), "ls"]);
            c
        },
        None,
    )
    .ok();
    assert!(ls.stdout.contains("node1"), "{ls:?}");

    // SIGHUP renews at once.
    let before = bot.renewals(&diag);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(bot.child.id() as i32),
        nix::sys::signal::Signal::SIGHUP,
    )
    .unwrap();
    bot.wait_renewals(&diag, before + 1, Duration::from_secs(10));
}

/// `curl --cert --key` against `openssl s_server -Verify 1 -CAfile CA -www`: the page it served.
fn curl_with_client_cert(dir: &Path, ca: &str, crt: &str, key: &str) -> String {
    let (srv_crt, srv_key) = (dir.join("srv.crt"), dir.join("srv.key"));
    tool(
        "openssl",
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            srv_key.to_str().unwrap(),
            "-out",
            srv_crt.to_str().unwrap(),
            "-subj",
            "/CN=localhost",
            "-days",
            "1",
        ],
    )
    .ok();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut server = Command::new("openssl")
        .args(["s_server", "-accept", &format!("127.0.0.1:{port}")])
        .args([
            "-cert",
            srv_crt.to_str().unwrap(),
            "-key",
            srv_key.to_str().unwrap(),
        ])
        .args(["-CAfile", ca, "-Verify", "1", "-www"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let url = format!("https://127.0.0.1:{port}/");
    let deadline = Instant::now() + Duration::from_secs(15);
    let out = loop {
        let out = tool(
            "curl",
            &[
                "-sS",
                "-k",
                "--max-time",
                "10",
                "--cert",
                crt,
                "--key",
                key,
                &url,
            ],
        );
        if out.status == 0 || Instant::now() > deadline {
            break out;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let _ = server.kill();
    let _ = server.wait();
    out.ok().stdout
}

/// Whatever the moment a reader opens the files, it gets whole files and a key that matches
/// its certificate (TLS and SSH), across many renewals.
#[test]
fn a_reader_polling_during_renewals_never_sees_a_torn_file_or_a_wrong_key() {
    let f = Fleet::start("torn", &[]);
    bot_role(&f);
    let token = add_bot(&f, "poller");
    let data = f.dir.path().join("bot-data");
    let out = f.dir.path().join("out");
    let bot = Gbot::start(
        &f,
        &[
            "--token",
            &token,
            "--data-dir",
            data.to_str().unwrap(),
            "--destination",
            out.to_str().unwrap(),
            "--ttl",
            "1m",
            "--renew-interval",
            "1s",
            "--diag-addr",
            "127.0.0.1:0",
        ],
    );
    let diag = bot.diag();
    bot.wait_renewals(&diag, 1, Duration::from_secs(30));
    let started = bot.renewals(&diag);
    let mut certs = std::collections::HashSet::new();
    let mut reads = 0u64;
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        let tls_key = std::fs::read_to_string(out.join("tls.key")).unwrap();
        let tls_crt = std::fs::read_to_string(out.join("tls.crt")).unwrap();
        let key = rcgen::KeyPair::from_pem(&tls_key)
            .unwrap_or_else(|e| panic!("torn tls.key ({e}):\n{tls_key}"));
        let der = gatehouse_controlplane::tls::certs_from_pem(&tls_crt)
            .unwrap_or_else(|e| panic!("torn tls.crt ({e}):\n{tls_crt}"));
        assert_eq!(der.len(), 1, "{tls_crt}");
        let spki = rcgen::PublicKeyData::subject_public_key_info(&key);
        assert!(
            der[0].windows(spki.len()).any(|w| w == spki.as_slice()),
            "tls.crt does not certify tls.key"
        );
        let ssh_key = ssh_key::PrivateKey::from_openssh(
            std::fs::read_to_string(out.join("id_ed25519")).unwrap(),
        )
        .unwrap();
        let ssh_cert = ssh_key::Certificate::from_openssh(
            std::fs::read_to_string(out.join("id_ed25519-cert.pub"))
                .unwrap()
                .trim(),
        )
        .unwrap();
        assert_eq!(ssh_cert.public_key(), ssh_key.public_key().key_data());
        certs.insert(tls_crt);
        reads += 1;
    }
    let renewed = bot.renewals(&diag) - started;
    assert!(
        renewed >= 5,
        "only {renewed} renewals in 10 s:\n{}",
        bot.log()
    );
    assert!(
        certs.len() >= 5,
        "{} distinct certificates in {reads} reads",
        certs.len()
    );
    // No temporary files left behind.
    let leftovers: Vec<String> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".tmp"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

/// A copied identity renewed after the original: the bot locks, both copies are refused,
/// `bot.locked` names the addresses; the admin rejoins and unlocks it. `--oneshot` exits 0 on
/// success and non-zero with the reason otherwise: a token used twice, a bad token, an expired
/// identity, a certificate from a foreign CA.
#[test]
fn a_stolen_identity_locks_the_bot_and_oneshot_says_why() {
    let f = Fleet::start("theft", &[]);
    bot_role(&f);
    let token = add_bot(&f, "ci");
    let d = |n: &str| f.dir.path().join(n);
    f.gbot_oneshot(&d("data1"), &d("out1"), &["--token", &token])
        .ok();
    assert!(d("out1").join("tls.crt").exists());
    // The same token again (single use).
    let twice = f
        .gbot_oneshot(&d("data-x"), &d("out-x"), &["--token", &token])
        .failed();
    assert!(twice.stderr.contains("used up"), "{twice:?}");
    let bad = f
        .gbot_oneshot(&d("data-y"), &d("out-y"), &["--token", "nope"])
        .failed();
    assert!(bad.stderr.contains("not recognized"), "{bad:?}");

    // The thief copies the bot's data dir; the bot renews first.
    run(
        {
            let mut c = Command::new("cp");
            c.arg("-a").arg(d("data1")).arg(d("data2"));
            c
        },
        None,
    )
    .ok();
    f.gbot_oneshot(&d("data1"), &d("out1"), &[]).ok();
    let thief = f.gbot_oneshot(&d("data2"), &d("out2"), &[]).failed();
    assert!(thief.stderr.contains("locked"), "{thief:?}");
    let owner = f.gbot_oneshot(&d("data1"), &d("out1"), &[]).failed();
    assert!(owner.stderr.contains("locked"), "{owner:?}");
    let locked = f.events("bot.locked");
    assert_eq!(locked.len(), 1, "{locked:?}");
    let text = locked[0].to_string();
    assert!(
        text.contains("source_addrs") && text.contains("127.0.0.1"),
        "{text}"
    );
    let ls = f.gctl(&["bots", "ls"]).ok();
    assert!(ls.stdout.contains("LOCKED"), "{ls:?}");

    // The admin joins it again with a new token, then unlocks it.
    let out = f
        .gctl(&[
            "tokens",
            "add",
            "--type",
            "bot",
            "--bot-name",
            "ci",
            "--ttl",
            "10m",
        ])
        .ok();
    let fresh = out
        .stdout
        .split("Join token (shown once): ")
        .nth(1)
        .unwrap()
        .lines()
        .next()
        .unwrap()
        .trim()
        .to_string();
    f.gbot_oneshot(&d("data1"), &d("out1"), &["--token", &fresh])
        .ok();
    let still = f.gbot_oneshot(&d("data1"), &d("out1"), &[]).failed();
    assert!(still.stderr.contains("locked"), "{still:?}");
    f.gctl(&["bots", "unlock", "ci"]).ok();
    f.gbot_oneshot(&d("data1"), &d("out1"), &[]).ok();
    let old = f.gbot_oneshot(&d("data2"), &d("out2"), &[]).failed();
    assert!(old.stderr.contains("replaced"), "{old:?}");

    // A certificate from a foreign CA: refused, nothing written.
    let stored: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(d("data1").join("identity.json")).unwrap())
            .unwrap();
    let mut forged = stored.clone();
    let (cert, key) = foreign_cert();
    forged["tls_cert"] = cert.into();
    forged["tls_key"] = key.into();
    std::fs::create_dir_all(d("data3")).unwrap();
    std::fs::write(d("data3").join("identity.json"), forged.to_string()).unwrap();
    let foreign = f.gbot_oneshot(&d("data3"), &d("out3"), &[]).failed();
    assert!(foreign.stderr.contains("certificate"), "{foreign:?}");
    assert!(!d("out3").join("tls.crt").exists());

    // An expired identity cannot renew: the bot must join again.
    let mut expired = stored;
    expired["expires"] = 1.into();
    std::fs::write(d("data1").join("identity.json"), expired.to_string()).unwrap();
    let e = f.gbot_oneshot(&d("data1"), &d("out1"), &[]).failed();
    assert!(
        e.stderr.contains("expired") && e.stderr.contains("new --token"),
        "{e:?}"
    );
}

/// A certificate and key (PEM) from a CA the cluster never heard of.
fn foreign_cert() -> (String, String) {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca = rcgen::CertificateParams::new(vec![]).unwrap();
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::new(ca, ca_key);
    let leaf_key = rcgen::KeyPair::generate().unwrap();
    let leaf = rcgen::CertificateParams::new(vec!["ci".into()])
        .unwrap()
        .signed_by(&leaf_key, &issuer)
        .unwrap();
    drop(ca_cert);
    (leaf.pem(), leaf_key.serialize_pem())
}

/// A destination that is a symbolic link, not writable, or under a file: a clear error before
/// anything is written (the token is not even used).
#[test]
fn bad_destinations_are_refused_before_anything_is_written() {
    let f = Fleet::start("dests", &[]);
    bot_role(&f);
    let token = add_bot(&f, "ci");
    let d = |n: &str| f.dir.path().join(n);
    std::fs::create_dir(d("elsewhere")).unwrap();
    std::os::unix::fs::symlink(d("elsewhere"), d("link")).unwrap();
    let link = f
        .gbot_oneshot(&d("data"), &d("link"), &["--token", &token])
        .failed();
    assert!(link.stderr.contains("symbolic link"), "{link:?}");
    assert_eq!(std::fs::read_dir(d("elsewhere")).unwrap().count(), 0);
    assert!(!d("data").join("identity.json").exists());

    std::fs::write(d("a-file"), "x").unwrap();
    let under = f
        .gbot_oneshot(&d("data"), &d("a-file").join("out"), &["--token", &token])
        .failed();
    assert!(
        under.stderr.contains("cannot create destination"),
        "{under:?}"
    );

    let is_root = tool("id", &["-u"]).ok().stdout.trim() == "0";
    if !is_root {
        use std::os::unix::fs::PermissionsExt;
        std::fs::create_dir(d("ro")).unwrap();
        std::fs::set_permissions(d("ro"), std::fs::Permissions::from_mode(0o500)).unwrap();
        let ro = f
            .gbot_oneshot(&d("data"), &d("ro"), &["--token", &token])
            .failed();
        assert!(ro.stderr.contains("not writable"), "{ro:?}");
    }
    // The token was never used: it still joins.
    f.gbot_oneshot(&d("data"), &d("good"), &["--token", &token])
        .ok();
}
