//! The agent's SSH node service: an SSH server (russh) that serves connections over any byte
//! stream (a reverse-tunnel stream in production, a TCP socket in tests), one
//! [`SshNode::serve`] call per connection.
//!
//! * Host authentication: the server presents its OpenSSH **host certificate** (signed by the
//!   cluster's host CA), so a client with `@cert-authority * <host CA>` connects without a prompt.
//! * User authentication: OpenSSH **user certificates only**. A certificate is accepted when it is
//!   a user certificate, signed by one of the cluster's user CA keys, valid now, carries no critical
//!   option, lists the requested login among its principals, and the roles named in its
//!   `roles@gatehouse.dev` extension allow that login on this node's labels
//!   ([`gatehouse_controlplane::rbac::RoleSet::check_node_login`]). The login must exist on the
//!   host, and an agent that is not root can only serve its own user.
//! * Sessions: shell and exec, with or without a PTY (`pty-req` needs `permit-pty`), `env`,
//!   `window-change`, `signal`, `exit-status` / `exit-signal`.
//! * Audit: `session.rejected`, `session.start`, `exec`, `session.end` through [`AuditSink`].
//!
//! russh (0.65) refuses an expired or not-yet-valid certificate, or one whose signature does not
//! verify, inside its own authentication code, before any handler callback sees it. Such a
//! connection is audited once when it ends, with a reason that names these cases, since the node
//! never learns which one it was. Every other refusal names its exact cause.
//!
//! Sessions get `HOME`, `USER`, `LOGNAME`, `SHELL`, `PATH`, `MAIL`, `GATEHOUSE_SESSION_ID`, and
//! `TERM` with a PTY; `exec` runs `<shell> -c <command>`, `shell` runs `<shell> -l`, both in the
//! user's home directory (or `/`), in a new process group (a new session with a PTY).
//!
//! Environment variables sent by the client (`env` requests, `ssh -o SetEnv=…`) are accepted when
//! the name is a plain identifier (`[A-Za-z_][A-Za-z0-9_]*`, at most 128 bytes), the value has no
//! NUL and is at most 16 KiB, there are at most 64 of them, and the name is not one the node sets
//! itself or one that changes how programs are loaded or shells start: `HOME`, `USER`, `LOGNAME`,
//! `SHELL`, `PATH`, `MAIL`, `IFS`, `ENV`, `BASH_ENV`, `SHELLOPTS`, `BASHOPTS`, `PS4`,
//! `GLIBC_TUNABLES`, `GCONV_PATH`, `LOCPATH`, `NLSPATH`, `HOSTALIASES`, `RES_OPTIONS`,
//! `LOCALDOMAIN`, and anything starting with `LD_`, `MALLOC_` or `BASH_FUNC_`. Client variables
//! never reach a process running as root on behalf of another user: when the node switches user
//! it runs `setpriv` (which sets uid, gid and the supplementary groups) with an empty environment,
//! and the environment is applied by `env -i` after privileges are dropped.

mod agent_forward;
pub(crate) mod auth;
pub use auth::TrustedRoot;
mod forward;
mod handler;
mod process;
mod session;
mod signals;

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use gatehouse_controlplane::resources::Role;

use self::handler::{AuthTrace, ConnHandler};

/// The algorithms the node offers: what a hardened OpenSSH offers, nothing older. Post-quantum
/// hybrid and curve25519 key exchange (with strict key exchange, against prefix truncation);
/// AEAD ciphers only, AES-GCM first (AES-NI makes it the cheapest per byte); encrypt-then-MAC
/// MACs (unused with those ciphers, offered for completeness); Ed25519 host keys; no
/// compression (compressing before authentication gives unauthenticated peers a decompressor
/// to attack; after it, a few percent of bandwidth is not worth a CPU pass per byte here).
pub(crate) const ALGORITHMS: russh::Preferred = russh::Preferred {
    kex: Cow::Borrowed(&[
        russh::kex::MLKEM768X25519_SHA256,
        russh::kex::CURVE25519,
        russh::kex::CURVE25519_PRE_RFC_8731,
        russh::kex::EXTENSION_SUPPORT_AS_SERVER,
        russh::kex::EXTENSION_OPENSSH_STRICT_KEX_AS_SERVER,
    ]),
    key: Cow::Borrowed(&[russh::keys::Algorithm::Ed25519]),
    host_key_certificates: Cow::Borrowed(&[]),
    cipher: Cow::Borrowed(&[
        russh::cipher::AES_128_GCM,
        russh::cipher::AES_256_GCM,
        russh::cipher::CHACHA20_POLY1305,
    ]),
    mac: Cow::Borrowed(&[russh::mac::HMAC_SHA256_ETM, russh::mac::HMAC_SHA512_ETM]),
    compression: Cow::Borrowed(&[russh::compression::NONE]),
};

/// How long a connection may take from its first byte to a successful authentication.
pub const LOGIN_GRACE: Duration = Duration::from_secs(60);

/// A connection up: what its handler learned, and the handle to end it.
type LiveConn = (Arc<Mutex<AuthTrace>>, russh::server::Handle);

/// Whether a lock in `view` stops `key_id` (a user or a bot: certificates name either by key
/// id) with `roles` on the node `node` at `now`; strict mode's stale state stops everyone.
pub(crate) fn locked_out(
    view: &gatehouse_controlplane::locks::LockView,
    node: &str,
    key_id: &str,
    roles: &[String],
    now: i64,
) -> Result<(), String> {
    use gatehouse_controlplane::locks::Subject;
    if let Some(lock) = view.locks.find(
        &Subject::Node {
            host_id: "",
            name: node,
        },
        now,
    ) {
        return Err(lock.reason());
    }
    if let Some(lock) = view.locks.find(
        &Subject::Bot {
            name: key_id,
            roles,
        },
        now,
    ) {
        return Err(lock.reason());
    }
    view.check(
        &Subject::User {
            name: key_id,
            roles,
        },
        now,
    )
}

/// A boxed future, so that [`RoleSource`] stays object safe (`Arc<dyn RoleSource>`).
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// What the node needs to know about itself.
#[derive(Clone)]
pub struct SshNodeConfig {
    /// The agent's host private key (Ed25519).
    pub host_key: ssh_key::PrivateKey,
    /// Its OpenSSH host certificate, signed by the cluster's host CA.
    pub host_cert: ssh_key::Certificate,
    /// Trusted SSH user CA public keys (the cluster's).
    pub user_ca_keys: Vec<ssh_key::PublicKey>,
    /// Root clusters this cluster trusts (their user CAs and role maps), kept current from
    /// Auth's watch stream.
    pub trusted_roots: std::sync::Arc<arc_swap::ArcSwap<Vec<auth::TrustedRoot>>>,
    /// The locks in force, kept current from Auth's watch stream.
    pub locks: std::sync::Arc<arc_swap::ArcSwap<gatehouse_controlplane::locks::LockView>>,
    pub cluster: String,
    pub node_name: String,
    pub labels: BTreeMap<String, String>,
}

impl std::fmt::Debug for SshNodeConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SshNodeConfig")
            .field("host_cert_key_id", &self.host_cert.key_id())
            .field("user_ca_keys", &self.user_ca_keys.len())
            .field("cluster", &self.cluster)
            .field("node_name", &self.node_name)
            .field("labels", &self.labels)
            .finish_non_exhaustive()
    }
}

/// Resolves role names (from the certificate's `roles@gatehouse.dev` extension) to roles.
pub trait RoleSource: Send + Sync + 'static {
    fn roles<'a>(&'a self, names: &'a [String]) -> BoxFuture<'a, Result<Vec<Role>, String>>;
}

/// Receives audit events (the caller batches and spools them). Must not block.
pub trait AuditSink: Send + Sync + 'static {
    fn emit(&self, event_type: &str, actor: &str, data: serde_json::Value);
}

/// Where a connection came from (filled by the caller from the tunnel stream).
#[derive(Debug, Clone, Default)]
pub struct ConnMeta {
    pub source_addr: String,
    /// The Gatehouse user the Proxy authenticated (from the X.509 certificate), if any: named
    /// in rejections that happen before the SSH certificate could be read.
    pub proxy_user: String,
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SshError {
    #[error("ssh node configuration: {0}")]
    Config(String),
    #[error("ssh: {0}")]
    Ssh(#[from] russh::Error),
    #[error("connection was not authenticated within {0:?}")]
    LoginTimeout(Duration),
}

/// A client that closes its socket without a disconnect message is not an error of ours.
fn peer_went_away(e: &russh::Error) -> bool {
    match e {
        russh::Error::Disconnect | russh::Error::HUP => true,
        russh::Error::IO(io) => matches!(
            io.kind(),
            std::io::ErrorKind::UnexpectedEof
                | std::io::ErrorKind::ConnectionReset
                | std::io::ErrorKind::BrokenPipe
        ),
        _ => false,
    }
}

/// russh's server configuration presenting `host_key` with `host_cert`.
fn russh_config(
    host_key: &ssh_key::PrivateKey,
    host_cert: &ssh_key::Certificate,
) -> Result<russh::server::Config, SshError> {
    let key_text = host_key
        .to_openssh(ssh_key::LineEnding::LF)
        .map_err(|e| SshError::Config(format!("host key: {e}")))?;
    let key = russh::keys::PrivateKey::from_openssh(key_text.as_bytes())
        .map_err(|e| SshError::Config(format!("host key: {e}")))?;
    let cert_text = host_cert
        .to_openssh()
        .map_err(|e| SshError::Config(format!("host certificate: {e}")))?;
    let cert = russh::keys::Certificate::from_openssh(&cert_text)
        .map_err(|e| SshError::Config(format!("host certificate: {e}")))?;
    let mut methods = russh::MethodSet::empty();
    methods.push(russh::MethodKind::PublicKey);
    Ok(russh::server::Config {
        server_id: russh::SshId::Standard(Cow::Borrowed("SSH-2.0-Gatehouse")),
        methods,
        auth_rejection_time: Duration::from_millis(500),
        // OpenSSH probes with "none" first: answer that at once.
        auth_rejection_time_initial: Some(Duration::ZERO),
        keys: vec![key],
        certificates: vec![cert],
        // Idle interactive sessions must survive: dead peers are found by keepalives instead.
        inactivity_timeout: None,
        keepalive_interval: Some(Duration::from_secs(30)),
        keepalive_max: 3,
        nodelay: true,
        preferred: ALGORITHMS,
        ..Default::default()
    })
}

/// The SSH node service. Cheap to share: wrap it in an `Arc` and call [`SshNode::serve`] once per
/// incoming connection, each in its own task.
pub struct SshNode {
    config: SshNodeConfig,
    /// Rebuilt when the host certificate is renewed; connections keep the one they began with.
    russh_config: arc_swap::ArcSwap<russh::server::Config>,
    roles: Arc<dyn RoleSource>,
    audit: Arc<dyn AuditSink>,
    /// Where shell and exec sessions are recorded (none: not recorded).
    recordings: Option<Arc<crate::recording::Recordings>>,
    /// The user CA keys trusted now: the config's, then as a rotation changes them.
    user_ca_keys: arc_swap::ArcSwap<Vec<ssh_key::PublicKey>>,
    /// Connections up, so a lock can end them.
    live: Mutex<std::collections::HashMap<u64, LiveConn>>,
    next_conn: std::sync::atomic::AtomicU64,
}

impl std::fmt::Debug for SshNode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SshNode")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl SshNode {
    pub fn new(
        config: SshNodeConfig,
        roles: Arc<dyn RoleSource>,
        audit: Arc<dyn AuditSink>,
    ) -> Result<Self, SshError> {
        if config.user_ca_keys.is_empty() {
            return Err(SshError::Config("no trusted user CA key".into()));
        }
        if config.host_cert.cert_type() != ssh_key::certificate::CertType::Host {
            return Err(SshError::Config(
                "the host certificate is a user certificate".into(),
            ));
        }
        if config.host_cert.public_key() != config.host_key.public_key().key_data() {
            return Err(SshError::Config(
                "the host certificate does not certify the host key".into(),
            ));
        }
        let russh_config = russh_config(&config.host_key, &config.host_cert)?;
        let user_ca_keys = arc_swap::ArcSwap::from_pointee(config.user_ca_keys.clone());
        Ok(Self {
            user_ca_keys,
            config,
            russh_config: arc_swap::ArcSwap::from_pointee(russh_config),
            roles,
            audit,
            recordings: None,
            live: Mutex::default(),
            next_conn: std::sync::atomic::AtomicU64::new(1),
        })
    }

    /// Present `cert` (a renewed host certificate for the same host key) to new connections.
    pub fn set_host_cert(&self, cert: &ssh_key::Certificate) -> Result<(), SshError> {
        if cert.public_key() != self.config.host_key.public_key().key_data() {
            return Err(SshError::Config(
                "the renewed host certificate does not certify the host key".into(),
            ));
        }
        let config = russh_config(&self.config.host_key, cert)?;
        self.russh_config.store(Arc::new(config));
        Ok(())
    }

    /// Trust these user CA keys from now on (a rotation: both keys during its grace period).
    /// An empty list is ignored: a node never trusts no CA.
    pub fn set_user_ca_keys(&self, keys: Vec<ssh_key::PublicKey>) {
        if !keys.is_empty() && **self.user_ca_keys.load() != keys {
            tracing::info!(keys = keys.len(), "ssh: trusted user CA keys changed");
            self.user_ca_keys.store(Arc::new(keys));
        }
    }

    pub(crate) fn user_ca_keys(&self) -> Arc<Vec<ssh_key::PublicKey>> {
        self.user_ca_keys.load_full()
    }

    /// Record the shell and exec sessions this node serves.
    pub fn with_recordings(mut self, recordings: Arc<crate::recording::Recordings>) -> Self {
        self.recordings = Some(recordings);
        self
    }

    pub fn node_name(&self) -> &str {
        &self.config.node_name
    }

    /// Who a lock would stop on this node for a certificate with `key_id` and `roles` (the
    /// roles as mapped here): `None` when nothing does. The node's own lock stops everyone.
    pub(crate) fn lock_reason(&self, key_id: &str, roles: &[String]) -> Option<String> {
        let view = self.config.locks.load();
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        locked_out(&view, &self.config.node_name, key_id, roles, now).err()
    }

    /// End every connection a lock now stops: each session channel hears the lock's message on
    /// stderr and exit status 255, then the connection is closed with it. Returns how many.
    pub fn end_locked(&self) -> usize {
        let conns: Vec<LiveConn> = match self.live.lock() {
            Ok(live) => live.values().cloned().collect(),
            Err(_) => return 0,
        };
        let mut ended = 0;
        for (trace, handle) in conns {
            let (who, channels) = match trace.lock() {
                Ok(t) => (t.who.clone(), t.channels.clone()),
                Err(_) => continue,
            };
            let Some((key_id, roles)) = who else { continue };
            let Some(reason) = self.lock_reason(&key_id, &roles) else {
                continue;
            };
            ended += 1;
            tracing::warn!(user = %key_id, %reason, "ssh: ending a locked user's connection");
            self.audit.emit(
                "session.locked",
                &key_id,
                serde_json::json!({ "user": key_id, "node": self.config.node_name, "reason": reason }),
            );
            tokio::spawn(async move {
                let line = format!("\r\nGatehouse: session ended: {reason}\r\n");
                for ch in channels {
                    let _ = handle
                        .extended_data(ch, 1, bytes::Bytes::from(line.clone().into_bytes()))
                        .await;
                    let _ = handle.exit_status_request(ch, 255).await;
                    let _ = handle.eof(ch).await;
                    let _ = handle.close(ch).await;
                }
                let _ = handle
                    .disconnect(russh::Disconnect::ByApplication, reason, "en".into())
                    .await;
            });
        }
        ended
    }

    /// Serve one SSH connection over `stream` until it ends. Errors concern this connection only.
    pub async fn serve<S>(self: &Arc<Self>, stream: S, meta: ConnMeta) -> Result<(), SshError>
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let trace = Arc::new(Mutex::new(AuthTrace::default()));
        let handler = ConnHandler::new(Arc::clone(self), meta.source_addr.clone(), trace.clone());
        let started = tokio::time::Instant::now();
        // run_stream reads the client's identification line: bound it by the login grace time.
        let running = match tokio::time::timeout(
            LOGIN_GRACE,
            russh::server::run_stream(self.russh_config.load_full(), stream, handler),
        )
        .await
        {
            Ok(r) => r?,
            Err(_) => return Err(SshError::LoginTimeout(LOGIN_GRACE)),
        };
        let handle = running.handle();
        let conn_id = self
            .next_conn
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if let Ok(mut live) = self.live.lock() {
            live.insert(conn_id, (trace.clone(), handle.clone()));
        }
        let grace_trace = trace.clone();
        let grace = tokio::spawn(async move {
            tokio::time::sleep_until(started + LOGIN_GRACE).await;
            let authenticated = grace_trace.lock().map(|t| t.authenticated).unwrap_or(false);
            if !authenticated {
                tracing::info!("ssh: closing a connection that did not authenticate in time");
                let _ = handle
                    .disconnect(
                        russh::Disconnect::ByApplication,
                        "authentication timed out".into(),
                        "en".into(),
                    )
                    .await;
            }
        });
        let result = running.await;
        grace.abort();
        if let Ok(mut live) = self.live.lock() {
            live.remove(&conn_id);
        }
        self.audit_unexplained_rejection(&trace, &meta);
        match result {
            Ok(()) => Ok(()),
            Err(e) if peer_went_away(&e) => Ok(()),
            Err(e) => Err(SshError::from(e)),
        }
    }

    /// A connection that tried to authenticate, failed, and never showed us a certificate to
    /// blame: say so once.
    fn audit_unexplained_rejection(&self, trace: &Mutex<AuthTrace>, meta: &ConnMeta) {
        let Ok(trace) = trace.lock() else {
            return;
        };
        if trace.authenticated || trace.rejection_audited {
            return;
        }
        let Some(login) = trace.login.clone() else {
            return;
        };
        let reason = if trace.plain_keys_offered > 0 {
            "no valid certificate presented: plain public keys are not accepted, and an expired \
             or not-yet-valid certificate (or one whose signature does not verify) is refused \
             during SSH authentication before the node can inspect it"
        } else {
            "no certificate presented (only OpenSSH user certificates are accepted; an expired \
             or not-yet-valid certificate is refused during SSH authentication)"
        };
        self.reject_event(&meta.proxy_user, &login, reason, &meta.source_addr);
    }

    /// `agent.forward`: a session asked for agent forwarding; `refused`: why it got none.
    pub(crate) fn agent_forward_event(
        &self,
        user: &str,
        login: &str,
        source_addr: &str,
        refused: Option<&str>,
    ) {
        let mut data = serde_json::json!({
            "user": user,
            "login": login,
            "node": self.config.node_name,
            "source_addr": source_addr,
            "success": refused.is_none(),
        });
        if let (Some(reason), Some(obj)) = (refused, data.as_object_mut()) {
            tracing::warn!(user, login, "ssh: agent forwarding refused: {reason}");
            obj.insert("reason".into(), serde_json::json!(reason));
        }
        self.audit.emit("agent.forward", user, data);
    }

    pub(crate) fn reject_event(&self, user: &str, login: &str, reason: &str, source_addr: &str) {
        tracing::warn!(
            user,
            login,
            source_addr,
            node = %self.config.node_name,
            "ssh: session rejected: {reason}"
        );
        self.audit.emit(
            "session.rejected",
            user,
            serde_json::json!({
                "user": user,
                "login": login,
                "reason": reason,
                "source_addr": source_addr,
                "node": self.config.node_name,
            }),
        );
    }
}
