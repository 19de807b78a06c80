//! Test harness for the SSH node service: an `SshNode` on loopback with in-memory roles and
//! audit, user certificates from a throwaway CA, and the real OpenSSH client to drive it.
// Test code: a failing unwrap or panic is a failing test, which is the point.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use gatehouse_agent::ssh::{AuditSink, BoxFuture, ConnMeta, RoleSource, SshNode, SshNodeConfig};
use gatehouse_controlplane::ca::{SshCa, SshUserCertRequest};
use gatehouse_controlplane::identity::{Identity, IdentityKind};
use gatehouse_controlplane::resources::{Resource, Role, parse_value};
use serde_json::{Value, json};
use ssh_key::{Algorithm, LineEnding, PrivateKey};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;

pub const HOST_ALIAS: &str = "node-1.example";
pub const SSH_TIMEOUT: Duration = Duration::from_secs(30);

pub struct MemRoles(pub BTreeMap<String, Role>);

impl RoleSource for MemRoles {
    fn roles<'a>(&'a self, names: &'a [String]) -> BoxFuture<'a, Result<Vec<Role>, String>> {
        Box::pin(async move {
            Ok(names
                .iter()
                .filter_map(|n| self.0.get(n).cloned())
                .collect())
        })
    }
}

#[derive(Default)]
pub struct MemAudit(pub Mutex<Vec<(String, String, Value)>>);

impl AuditSink for MemAudit {
    fn emit(&self, event_type: &str, actor: &str, data: Value) {
        self.0
            .lock()
            .unwrap()
            .push((event_type.to_string(), actor.to_string(), data));
    }
}

impl MemAudit {
    pub fn events(&self, event_type: &str) -> Vec<Value> {
        self.0
            .lock()
            .unwrap()
            .iter()
            .filter(|(t, _, _)| t == event_type)
            .map(|(_, _, d)| d.clone())
            .collect()
    }

    /// Wait (bounded) for an event of `event_type` matching `pred`.
    pub async fn wait_for(&self, event_type: &str, pred: impl Fn(&Value) -> bool) -> Value {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(e) = self.events(event_type).into_iter().find(|e| pred(e)) {
                return e;
            }
            if tokio::time::Instant::now() > deadline {
                panic!(
                    "no matching {event_type} event; have: {:#?}",
                    self.0.lock().unwrap()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

pub fn role(value: Value) -> Role {
    match parse_value(value).unwrap() {
        Resource::Role(r) => r,
        other => panic!("{other:?}"),
    }
}

pub fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

pub fn current_user() -> String {
    let out = std::process::Command::new("id")
        .arg("-un")
        .output()
        .unwrap();
    assert!(out.status.success());
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

pub fn is_root() -> bool {
    let out = std::process::Command::new("id").arg("-u").output().unwrap();
    String::from_utf8_lossy(&out.stdout).trim() == "0"
}

pub struct Fixture {
    pub dir: tempfile::TempDir,
    pub user_ca: SshCa,
    pub addr: SocketAddr,
    pub audit: Arc<MemAudit>,
    pub login: String,
    pub known_hosts: PathBuf,
    pub accept: tokio::task::JoinHandle<()>,
    pub files: AtomicUsize,
}

impl Drop for Fixture {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

/// A certificate on disk for the ssh client.
pub struct ClientCert {
    pub key: PathBuf,
    pub cert: PathBuf,
}

pub struct CertSpec<'a> {
    pub logins: Vec<String>,
    pub roles: &'a [&'a str],
    pub pty: bool,
    /// Signing time and expiry, relative to now (seconds).
    pub signed_at: i64,
    pub expires_in: i64,
}

impl CertSpec<'_> {
    pub fn for_login(login: &str) -> CertSpec<'static> {
        CertSpec {
            logins: vec![login.to_string()],
            roles: &["node-access"],
            pty: true,
            signed_at: 0,
            expires_in: 3600,
        }
    }
}

impl Fixture {
    pub async fn start() -> Self {
        let user_ca = SshCa::generate().unwrap();
        let host_ca = SshCa::generate().unwrap();
        let host_key = PrivateKey::random(&mut rand::rngs::OsRng, Algorithm::Ed25519).unwrap();
        let host_cert = host_ca
            .sign_host(
                host_key.public_key(),
                "node-1",
                "example",
                &[],
                now(),
                now() + 3600,
            )
            .unwrap();
        let roles: BTreeMap<String, Role> = [
            role(json!({
                "kind": "role",
                "metadata": {"name": "node-access"},
                "spec": {"allow": {
                    "logins": ["{{internal.logins}}"],
                    "node_labels": {"env": "test"},
                }},
            })),
            role(json!({
                "kind": "role",
                "metadata": {"name": "prod-only"},
                "spec": {"allow": {
                    "logins": ["{{internal.logins}}"],
                    "node_labels": {"env": "prod"},
                }},
            })),
        ]
        .into_iter()
        .map(|r| (r.metadata.name.clone(), r))
        .collect();
        let audit = Arc::new(MemAudit::default());
        let config = SshNodeConfig {
            trusted_roots: Default::default(),
            locks: Default::default(),
            host_key,
            host_cert,
            user_ca_keys: vec![user_ca.public_key().clone()],
            cluster: "example".into(),
            node_name: "node-1".into(),
            labels: [("env".to_string(), "test".to_string())].into(),
        };
        let node =
            Arc::new(SshNode::new(config, Arc::new(MemRoles(roles)), audit.clone()).unwrap());

        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accept = tokio::spawn(async move {
            while let Ok((sock, peer)) = listener.accept().await {
                let node = node.clone();
                tokio::spawn(async move {
                    let meta = ConnMeta {
                        source_addr: peer.to_string(),
                        ..Default::default()
                    };
                    if let Err(e) = node.serve(sock, meta).await {
                        eprintln!("serve: {e}");
                    }
                });
            }
        });

        let dir = tempfile::tempdir().unwrap();
        let known_hosts = dir.path().join("known_hosts");
        std::fs::write(
            &known_hosts,
            format!("@cert-authority * {}\n", host_ca.public_line()),
        )
        .unwrap();
        Fixture {
            dir,
            user_ca,
            addr,
            audit,
            login: current_user(),
            known_hosts,
            accept,
            files: AtomicUsize::new(0),
        }
    }

    pub fn cert(&self, spec: &CertSpec<'_>) -> ClientCert {
        self.cert_from(&self.user_ca, spec)
    }

    pub fn cert_from(&self, ca: &SshCa, spec: &CertSpec<'_>) -> ClientCert {
        let (key, cert) = self.sign(ca, spec);
        let n = self.files.fetch_add(1, Ordering::Relaxed);
        let key_path = self.dir.path().join(format!("id_{n}"));
        let cert_path = self.dir.path().join(format!("id_{n}-cert.pub"));
        std::fs::write(
            &key_path,
            key.to_openssh(LineEnding::LF).unwrap().as_bytes(),
        )
        .unwrap();
        std::fs::set_permissions(&key_path, std::fs::Permissions::from_mode(0o600)).unwrap();
        std::fs::write(&cert_path, cert.to_openssh().unwrap()).unwrap();
        ClientCert {
            key: key_path,
            cert: cert_path,
        }
    }

    pub fn sign(&self, ca: &SshCa, spec: &CertSpec<'_>) -> (PrivateKey, ssh_key::Certificate) {
        let key = PrivateKey::random(&mut rand::rngs::OsRng, Algorithm::Ed25519).unwrap();
        let now = now() as i64;
        let identity = Identity {
            kind: IdentityKind::User,
            name: "alice".into(),
            roles: spec.roles.iter().map(|r| r.to_string()).collect(),
            logins: spec.logins.clone(),
            traits: [("logins".to_string(), spec.logins.clone())].into(),
            cluster: "example".into(),
            route_to_cluster: "example".into(),
            bot: None,
            expires: now + spec.expires_in,
        };
        let req = SshUserCertRequest {
            identity: &identity,
            permit_pty: spec.pty,
            permit_port_forwarding: false,
            permit_agent_forwarding: false,
            permit_x11_forwarding: false,
            remote_forward_any: false,
        };
        let cert = ca
            .sign_user(key.public_key(), &req, (now + spec.signed_at) as u64)
            .unwrap();
        (key, cert)
    }

    pub fn ssh_command(
        &self,
        cert: &ClientCert,
        login: &str,
        extra: &[&str],
    ) -> tokio::process::Command {
        let mut cmd = tokio::process::Command::new("ssh");
        let opt = |k: &str, v: &Path| format!("{k}={}", v.display());
        cmd.arg("-F")
            .arg("/dev/null")
            .args(["-o", "BatchMode=yes"])
            .args(["-o", "StrictHostKeyChecking=yes"])
            .args(["-o", &opt("UserKnownHostsFile", &self.known_hosts)])
            .args(["-o", "GlobalKnownHostsFile=/dev/null"])
            .args(["-o", &format!("HostKeyAlias={HOST_ALIAS}")])
            .args(["-o", "CheckHostIP=no"])
            .args(["-o", &opt("IdentityFile", &cert.key)])
            .args(["-o", &opt("CertificateFile", &cert.cert)])
            .args(["-o", "IdentitiesOnly=yes"])
            .args(["-o", "ConnectTimeout=10"])
            .args(["-o", "LogLevel=ERROR"])
            .args(["-p", &self.addr.port().to_string()])
            .args(["-l", login])
            .args(extra)
            .arg(self.addr.ip().to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        cmd
    }

    /// Run `ssh … <remote>` with `stdin` fed to it; bounded in time.
    pub async fn ssh(
        &self,
        cert: &ClientCert,
        login: &str,
        extra: &[&str],
        remote: &str,
        stdin: Option<&[u8]>,
    ) -> Output {
        let mut cmd = self.ssh_command(cert, login, extra);
        cmd.arg(remote);
        if stdin.is_some() {
            cmd.stdin(Stdio::piped());
        }
        let mut child = cmd.spawn().unwrap();
        if let Some(input) = stdin {
            let mut w = child.stdin.take().unwrap();
            w.write_all(input).await.unwrap();
            drop(w);
        }
        let out = tokio::time::timeout(SSH_TIMEOUT, child.wait_with_output())
            .await
            .expect("ssh did not finish in time")
            .unwrap();
        let out = Output {
            code: out.status.code(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        };
        eprintln!("ssh {remote:?} -> {out:?}");
        out
    }

    pub async fn rejected_reason(&self, cert: &ClientCert, login: &str) -> String {
        let out = self
            .ssh(cert, login, &[], "echo should-not-run", None)
            .await;
        assert_eq!(out.code, Some(255), "{out:?}");
        assert!(!out.stdout.contains("should-not-run"));
        assert!(out.stderr.contains("Permission denied"), "{out:?}");
        let event = self
            .audit
            .wait_for("session.rejected", |e| e["login"] == login)
            .await;
        assert_eq!(event["node"], "node-1");
        assert!(
            event["source_addr"]
                .as_str()
                .unwrap()
                .starts_with("127.0.0.1:")
        );
        assert!(self.audit.events("session.start").is_empty());
        event["reason"].as_str().unwrap().to_string()
    }
}

pub struct Output {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl std::fmt::Debug for Output {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let short = |s: &str| {
            if s.len() > 300 {
                format!(
                    "{:?}… ({} bytes)",
                    s.chars().take(300).collect::<String>(),
                    s.len()
                )
            } else {
                format!("{s:?}")
            }
        };
        write!(
            f,
            "Output {{ code: {:?}, stdout: {}, stderr: {} }}",
            self.code,
            short(&self.stdout),
            short(&self.stderr)
        )
    }
}
