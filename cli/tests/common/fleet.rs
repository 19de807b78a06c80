//! The fleet: Auth, a Proxy and agents as separate processes (more Auths and proxies for the HA
//! tests), joined with real tokens, and what the tests ask of them.

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::{Daemon, Output, bin, http_get, run};

/// Auth, a Proxy and agents as separate processes on 127.0.0.x, joined with real tokens.
pub struct Fleet {
    pub dir: tempfile::TempDir,
    pub auth: Daemon,
    /// More Auth servers on the same database (`start_ha`), in order.
    pub more_auths: Vec<Daemon>,
    pub proxy: Daemon,
    pub agents: Vec<Daemon>,
    pub auth_addr: String,
    pub proxy_addr: String,
    pub pin: String,
    pub cluster: String,
    /// The OS login the tests use (the user running them).
    pub login: String,
    /// A `proxy` join token (many uses), for more proxies.
    pub proxy_token: String,
    /// Every Auth's address, comma-separated, as proxies are given them.
    pub all_auths: String,
}

pub fn whoami() -> String {
    let out = Command::new("id").arg("-un").output().unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

pub fn token(data_dir: &Path, ty: &str) -> String {
    let mut cmd = Command::new(bin("gctl"));
    cmd.arg("--data-dir")
        .arg(data_dir)
        .args(["tokens", "add", "--type", ty, "--uses", "0", "--ttl", "1h"]);
    let out = run(cmd, None).ok().stdout;
    out.split("Join token (shown once): ")
        .nth(1)
        .unwrap()
        .lines()
        .next()
        .unwrap()
        .trim()
        .to_string()
}

impl Fleet {
    /// `agents`: (node name, labels, extra args) for each agent process.
    pub fn start(cluster: &str, agents: &[(&str, &str, Vec<String>)]) -> Self {
        Self::start_with(cluster, &[], agents)
    }

    /// [`Fleet::start`] with extra arguments for the proxy.
    pub fn start_with(
        cluster: &str,
        proxy_args: &[&str],
        agents: &[(&str, &str, Vec<String>)],
    ) -> Self {
        Self::start_via(cluster, proxy_args, agents, |proxy| proxy.to_string())
    }

    /// [`Fleet::start_with`], the agents dialling the address `via` returns for the proxy's
    /// (a relay in between, say).
    pub fn start_via(
        cluster: &str,
        proxy_args: &[&str],
        agents: &[(&str, &str, Vec<String>)],
        via: impl FnOnce(&str) -> String,
    ) -> Self {
        Self::start_custom(cluster, "", &[], proxy_args, agents, via)
    }

    /// The most general start: Auth with `auth_config` (TOML, written to a file; empty: none)
    /// and extra environment variables (for every daemon of the fleet).
    pub fn start_custom(
        cluster: &str,
        auth_config: &str,
        auth_env: &[(String, String)],
        proxy_args: &[&str],
        agents: &[(&str, &str, Vec<String>)],
        via: impl FnOnce(&str) -> String,
    ) -> Self {
        Self::start_full(cluster, auth_config, auth_env, 1, proxy_args, agents, via)
    }

    /// `auths` Auth servers on one database (`auth_config` names it: `[auth] storage`), the
    /// proxy given all their addresses.
    pub fn start_ha(
        cluster: &str,
        auth_config: &str,
        auths: usize,
        agents: &[(&str, &str, Vec<String>)],
    ) -> Self {
        Self::start_full(cluster, auth_config, &[], auths, &[], agents, |p| {
            p.to_string()
        })
    }

    /// [`Fleet::start_ha`] with environment variables for the Auths (e.g. S3 credentials).
    pub fn start_ha_env(
        cluster: &str,
        auth_config: &str,
        auth_env: &[(String, String)],
        auths: usize,
        agents: &[(&str, &str, Vec<String>)],
    ) -> Self {
        Self::start_full(cluster, auth_config, auth_env, auths, &[], agents, |p| {
            p.to_string()
        })
    }

    /// Start an Auth server like the fleet's others (its data dir `auth{n}`), on `auth_config`,
    /// listening on `listen` (`127.0.0.1:0`: any port; a restarted Auth takes its old one).
    pub fn start_auth(
        dir: &Path,
        n: usize,
        cluster: &str,
        auth_config: &str,
        env: &[(String, String)],
        listen: &str,
    ) -> Daemon {
        let data = if n == 0 {
            "auth".to_owned()
        } else {
            format!("auth{n}")
        };
        let mut args: Vec<String> = vec![
            "--roles".into(),
            "auth".into(),
            "--cluster-name".into(),
            cluster.into(),
            "--auth-addr".into(),
            listen.into(),
            "--diag-addr".into(),
            "127.0.0.1:0".into(),
            "--data-dir".into(),
            dir.join(&data).display().to_string(),
        ];
        if !auth_config.is_empty() {
            let path = dir.join("auth.toml");
            std::fs::write(&path, auth_config).unwrap();
            args.extend(["--config".into(), path.display().to_string()]);
        }
        Daemon::start_env(&args, env, dir.join(format!("{data}.log")))
    }

    #[allow(clippy::too_many_arguments)]
    fn start_full(
        cluster: &str,
        auth_config: &str,
        auth_env: &[(String, String)],
        auths: usize,
        proxy_args: &[&str],
        agents: &[(&str, &str, Vec<String>)],
        via: impl FnOnce(&str) -> String,
    ) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let d = |p: &str| dir.path().join(p).display().to_string();
        let any = "127.0.0.1:0";
        let auth = Self::start_auth(dir.path(), 0, cluster, auth_config, auth_env, any);
        let more_auths: Vec<Daemon> = (1..auths)
            .map(|n| Self::start_auth(dir.path(), n, cluster, auth_config, auth_env, any))
            .collect();
        let auth_addr = auth.field("Auth API:");
        let all_auths = std::iter::once(&auth)
            .chain(&more_auths)
            .map(|a| a.field("Auth API:"))
            .collect::<Vec<_>>()
            .join(",");
        let pin = auth.field("CA pin:");
        let proxy_token = token(&dir.path().join("auth"), "proxy");
        let node_token = token(&dir.path().join("auth"), "node");
        let mut args: Vec<String> = proxy_args.iter().map(|a| a.to_string()).collect();
        args.extend([
            "--roles".into(),
            "proxy".into(),
            "--auth".into(),
            all_auths.clone(),
            "--token".into(),
            proxy_token.clone(),
            "--ca-pin".into(),
            pin.clone(),
            "--proxy-addr".into(),
            "127.0.0.2:0".into(),
            "--diag-addr".into(),
            "127.0.0.2:0".into(),
            "--data-dir".into(),
            d("proxy"),
            "--node-name".into(),
            "proxy1".into(),
        ]);
        let proxy = Daemon::start_env(&args, auth_env, dir.path().join("proxy.log"));
        let proxy_addr = proxy.field("Proxy:");
        let agents_dial = via(&proxy_addr);
        let mut fleet = Fleet {
            auth,
            more_auths,
            proxy,
            agents: vec![],
            auth_addr,
            proxy_addr,
            pin,
            cluster: cluster.into(),
            login: whoami(),
            proxy_token,
            all_auths,
            dir,
        };
        for (i, (name, labels, extra)) in agents.iter().enumerate() {
            let ip = format!("127.0.0.{}", 3 + i);
            let mut args: Vec<String> = vec![
                "--roles".into(),
                "agent".into(),
                "--proxy".into(),
                agents_dial.clone(),
                "--token".into(),
                node_token.clone(),
                "--ca-pin".into(),
                fleet.pin.clone(),
                "--node-name".into(),
                name.to_string(),
                "--labels".into(),
                labels.to_string(),
                "--diag-addr".into(),
                format!("{ip}:0"),
                "--data-dir".into(),
                fleet.dir.path().join(name).display().to_string(),
            ];
            args.extend(extra.iter().cloned());
            let agent = Daemon::start_env(
                &args,
                auth_env,
                fleet.dir.path().join(format!("{name}.log")),
            );
            fleet.agents.push(agent);
        }
        fleet
    }

    /// Start another proxy (data dir `proxy{n}`, node name `proxy{n}`) joined to the fleet's
    /// Auths.
    pub fn start_proxy(&self, n: usize) -> Daemon {
        let d = |p: &str| self.dir.path().join(p).display().to_string();
        let args: Vec<String> = [
            "--roles",
            "proxy",
            "--auth",
            &self.all_auths,
            "--token",
            &self.proxy_token,
            "--ca-pin",
            &self.pin,
            "--proxy-addr",
            "127.0.0.2:0",
            "--diag-addr",
            "127.0.0.2:0",
            "--data-dir",
            &d(&format!("proxy{n}")),
            "--node-name",
            &format!("proxy{n}"),
        ]
        .iter()
        .map(|a| a.to_string())
        .collect();
        Daemon::start(&args, self.dir.path().join(format!("proxy{n}.log")))
    }

    /// The proxy's Prometheus metrics, as text.
    pub fn proxy_metrics(&self) -> String {
        metrics_of(&self.proxy)
    }
}

/// A daemon's Prometheus metrics, as text.
pub fn metrics_of(daemon: &Daemon) -> String {
    let diag = daemon
        .field("Diagnostics:")
        .trim_start_matches("http://")
        .trim_end_matches("/metrics")
        .to_string();
    http_get(&diag, "/metrics").1
}

impl Fleet {
    pub fn auth_data(&self) -> PathBuf {
        self.dir.path().join("auth")
    }

    pub fn gctl(&self, args: &[&str]) -> Output {
        let mut cmd = Command::new(bin("gctl"));
        cmd.arg("--data-dir")
            .arg(self.auth_data())
            .args(args)
            .env_remove("GATEHOUSE_AUTH");
        run(cmd, None)
    }

    /// `gctl` as the admin of the Auth whose data dir is `auth_dir` (`auth1`, …).
    pub fn gctl_in(&self, auth_dir: &str, args: &[&str]) -> Output {
        let mut cmd = Command::new(bin("gctl"));
        cmd.arg("--data-dir")
            .arg(self.dir.path().join(auth_dir))
            .args(args)
            .env_remove("GATEHOUSE_AUTH");
        run(cmd, None)
    }

    pub fn gsh(&self, home: &Path, args: &[&str], stdin: Option<&str>) -> Output {
        let mut cmd = Command::new(bin("gsh"));
        cmd.args(args)
            .env("GATEHOUSE_HOME", home)
            .env_remove("GATEHOUSE_AUTH")
            .env_remove("GATEHOUSE_PROXY");
        run(cmd, stdin)
    }

    /// Create a user and log them in through the proxy into `home`.
    /// `gctl users reset NAME`: the new password.
    pub fn reset_password(&self, name: &str) -> String {
        let out = self.gctl(&["users", "reset", name]).ok();
        out.stdout.lines().last().unwrap().trim().to_string()
    }

    pub fn user(&self, home: &Path, name: &str, roles: &str, logins: &str, extra: &[&str]) {
        let out = self
            .gctl(&["users", "add", name, "--roles", roles, "--logins", logins])
            .ok();
        let pw = out.stdout.lines().last().unwrap().trim().to_string();
        let mut args = vec![
            "login",
            "--proxy",
            &self.proxy_addr,
            "--user",
            name,
            "--password-stdin",
            "--ca-pin",
            &self.pin,
        ];
        args.extend_from_slice(extra);
        self.gsh(home, &args, Some(&format!("{pw}\n"))).ok();
    }

    /// Wait until Auth lists `n` nodes (heartbeats flow agent → proxy → Auth).
    pub fn wait_for_nodes(&self, home: &Path, n: usize) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let out = self.gsh(home, &["ls", "--format", "json"], None);
            if out.status == 0 {
                let v: Vec<serde_json::Value> =
                    serde_json::from_str(&out.stdout).unwrap_or_default();
                if v.len() >= n {
                    return;
                }
            }
            assert!(
                Instant::now() < deadline,
                "nodes did not show up: {}\n{}",
                out.stdout,
                out.stderr
            );
            std::thread::sleep(Duration::from_millis(300));
        }
    }

    pub fn events(&self, ty: &str) -> Vec<serde_json::Value> {
        let out = self
            .gctl(&["events", "--type", ty, "--format", "json"])
            .ok();
        out.stdout
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    /// Write the `gsh config` block for OpenSSH and return its path.
    pub fn ssh_config(&self, home: &Path) -> PathBuf {
        let out = self.gsh(home, &["config"], None).ok();
        let path = home.join("ssh_config");
        std::fs::write(&path, out.stdout).unwrap();
        path
    }

    /// `gsh ssh LOGIN@node1 'echo ready; sleep 120'`, started; returns once `ready` is read.
    pub fn long_ssh(
        &self,
        home: &Path,
    ) -> (std::process::Child, BufReader<std::process::ChildStdout>) {
        let mut child = Command::new(bin("gsh"))
            .args([
                "ssh",
                &format!("{}@node1", self.login),
                "echo ready; sleep 120",
            ])
            .env("GATEHOUSE_HOME", home)
            .env_remove("GATEHOUSE_AUTH")
            .env_remove("GATEHOUSE_PROXY")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut out = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        out.read_line(&mut line).unwrap();
        if line.trim() != "ready" {
            let _ = child.kill();
            let mut err = String::new();
            child
                .stderr
                .take()
                .unwrap()
                .read_to_string(&mut err)
                .unwrap();
            panic!("no `ready` from the session: {line:?}\n{err}");
        }
        (child, out)
    }

    /// `gbot start --oneshot` through this fleet's proxy with these extra arguments.
    pub fn gbot_oneshot(&self, data: &Path, out: &Path, extra: &[&str]) -> Output {
        let mut cmd = Command::new(bin("gbot"));
        cmd.args([
            "start",
            "--oneshot",
            "--proxy",
            &self.proxy_addr,
            "--ca-pin",
            &self.pin,
        ])
        .arg("--data-dir")
        .arg(data)
        .arg("--destination")
        .arg(out)
        .args(extra)
        .env_remove("GATEHOUSE_BOT_TOKEN");
        run(cmd, None)
    }
}

/// `gsh proxy tcp APP` on an ephemeral local port: the child and the address it listens on.
pub fn forward(home: &Path, app: &str) -> (std::process::Child, String) {
    let mut fwd = Command::new(bin("gsh"))
        .args(["proxy", "tcp", app, "--listen", "127.0.0.1:0"])
        .env("GATEHOUSE_HOME", home)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(fwd.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let local = line.split_whitespace().nth(1).unwrap().to_string();
    (fwd, local)
}
