//! The russh handler of one connection: authentication and the session channels' requests.
//!
//! Channel requests are answered synchronously from these callbacks: russh keeps one
//! "wants reply" flag per channel, so a reply sent later from another task could be lost when the
//! client pipelines requests (OpenSSH sends `pty-req`, `env` and `exec` back to back).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use gatehouse_controlplane::rbac::RoleSet;
use russh::server::{Auth, Msg, Session};
use russh::{Channel, ChannelId, ChannelOpenFailure, ChannelWriteHalf, Pty, Sig};

use super::SshNode;
use super::agent_forward::AgentSocket;
use super::auth::{self, CertIdentity, Refusal};
use super::forward::{ForwardCtx, ForwardPermits, ForwardWho, Forwards};
use super::process::{self, LoginUser, MAX_ENV_VARS, Program};
use super::session::{self, PtyParams, Running, SessionInfo, StartRequest};

/// Session channels one connection may hold open.
const MAX_CHANNELS: usize = 10;
/// How long the role source may take to answer.
const ROLE_LOOKUP_TIMEOUT: Duration = Duration::from_secs(10);

/// What happened during authentication, shared with [`SshNode::serve`] for the final audit.
#[derive(Debug, Default)]
pub(crate) struct AuthTrace {
    pub login: Option<String>,
    pub authenticated: bool,
    pub rejection_audited: bool,
    pub plain_keys_offered: u32,
    /// Once authenticated: the certificate's key id and roles (as mapped here), for locks.
    pub who: Option<(String, Vec<String>)>,
    /// The session channels opened, to tell each why a lock ended it.
    pub channels: Vec<ChannelId>,
}

struct Authed {
    identity: CertIdentity,
    login: String,
    user: LoginUser,
}

#[derive(Default)]
struct SessionChannel {
    write: Option<ChannelWriteHalf<Msg>>,
    env: Vec<(String, String)>,
    pty: Option<PtyParams>,
    running: Option<Running>,
    /// The forwarded agent's socket (`ssh -A`), removed with the channel.
    agent: Option<AgentSocket>,
}

pub(crate) struct ConnHandler {
    node: Arc<SshNode>,
    source_addr: String,
    trace: Arc<Mutex<AuthTrace>>,
    authed: Option<Arc<Authed>>,
    channels: HashMap<ChannelId, SessionChannel>,
    forwards: Forwards,
}

impl ConnHandler {
    pub(crate) fn new(
        node: Arc<SshNode>,
        source_addr: String,
        trace: Arc<Mutex<AuthTrace>>,
    ) -> Self {
        Self {
            node,
            source_addr,
            trace,
            authed: None,
            channels: HashMap::new(),
            forwards: Forwards::default(),
        }
    }

    /// What the verified certificate allows for forwarding, and who it is for the audit trail.
    fn forwarding(&self) -> Option<ForwardCtx> {
        let a = self.authed.as_ref()?;
        Some(ForwardCtx {
            node: Arc::clone(&self.node),
            permits: ForwardPermits {
                port_forwarding: a.identity.permit_port_forwarding,
                remote_any: a.identity.remote_forward_any,
                root_login: a.user.uid == 0,
            },
            who: ForwardWho {
                key_id: a.identity.key_id.clone(),
                login: a.login.clone(),
                source_addr: self.source_addr.clone(),
            },
        })
    }

    fn with_trace(&self, f: impl FnOnce(&mut AuthTrace)) {
        if let Ok(mut t) = self.trace.lock() {
            f(&mut t);
        }
    }

    fn note_login(&self, login: &str) {
        self.with_trace(|t| t.login = Some(login.chars().take(256).collect()));
    }

    async fn authorize(
        &self,
        login: &str,
        cert: &russh::keys::Certificate,
    ) -> Result<Authed, Refusal> {
        let cert = auth::from_russh(cert)?;
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let config = &self.node.config;
        let identity = auth::verify_user_cert_in(
            &cert,
            login,
            &self.node.user_ca_keys(),
            &config.trusted_roots.load(),
            &config.cluster,
            now,
        )?;
        let refuse = |reason: String| Refusal {
            key_id: identity.key_id.clone(),
            reason,
        };
        let roles =
            match tokio::time::timeout(ROLE_LOOKUP_TIMEOUT, self.node.roles.roles(&identity.roles))
                .await
            {
                Ok(Ok(roles)) => roles,
                Ok(Err(e)) => return Err(refuse(format!("could not load roles: {e}"))),
                Err(_) => return Err(refuse("timed out loading roles".into())),
            };
        if let Some(reason) = self.node.lock_reason(&identity.key_id, &identity.roles) {
            return Err(refuse(reason));
        }
        RoleSet::new(roles)
            .check_node_login(&identity.traits, &self.node.config.labels, login)
            .map_err(|denied| refuse(denied.to_string()))?;
        let name = login.to_owned();
        let user = tokio::task::spawn_blocking(move || process::resolve_login(&name))
            .await
            .map_err(|e| refuse(format!("user lookup failed: {e}")))?
            .map_err(refuse)?;
        Ok(Authed {
            identity,
            login: login.to_owned(),
            user,
        })
    }

    fn start(
        &mut self,
        channel: ChannelId,
        program: Program,
        session: &mut Session,
    ) -> Result<(), russh::Error> {
        let Some(authed) = self.authed.clone() else {
            return session.channel_failure(channel);
        };
        let Some(ch) = self.channels.get_mut(&channel) else {
            return session.channel_failure(channel);
        };
        if ch.running.is_some() {
            return session.channel_failure(channel);
        }
        let Some(write) = ch.write.take() else {
            return session.channel_failure(channel);
        };
        let info = SessionInfo {
            key_id: authed.identity.key_id.clone(),
            login: authed.login.clone(),
            source_addr: self.source_addr.clone(),
            session_id: uuid::Uuid::new_v4().to_string(),
        };
        let req = StartRequest {
            node: Arc::clone(&self.node),
            info: info.clone(),
            user: &authed.user,
            program,
            pty: ch.pty.as_ref(),
            client_env: &ch.env,
            write,
            handle: session.handle(),
            channel,
        };
        match session::start(req) {
            Ok(running) => {
                ch.running = Some(running);
                session.channel_success(channel)
            }
            Err(session::StartError::Failed(reason)) => {
                tracing::warn!(
                    user = %info.key_id,
                    login = %info.login,
                    "ssh: could not start session: {reason}"
                );
                session.channel_failure(channel)
            }
            Err(session::StartError::Refused(reason)) => {
                tracing::warn!(
                    user = %info.key_id,
                    login = %info.login,
                    "ssh: session refused: {reason}"
                );
                session.channel_success(channel)?;
                session.extended_data(
                    channel,
                    1,
                    bytes::Bytes::from(format!("gatehouse: {reason}\r\n")),
                )?;
                session.exit_status_request(channel, 254)?;
                session.eof(channel)?;
                session.close(channel)
            }
        }
    }
}

impl russh::server::Handler for ConnHandler {
    type Error = russh::Error;

    async fn auth_none(&mut self, user: &str) -> Result<Auth, Self::Error> {
        self.note_login(user);
        Ok(Auth::reject())
    }

    async fn auth_password(&mut self, user: &str, _password: &str) -> Result<Auth, Self::Error> {
        self.note_login(user);
        Ok(Auth::reject())
    }

    async fn auth_publickey(
        &mut self,
        user: &str,
        _key: russh::server::VerifiedPublicKey<'_>,
    ) -> Result<Auth, Self::Error> {
        self.note_login(user);
        self.with_trace(|t| t.plain_keys_offered = t.plain_keys_offered.saturating_add(1));
        tracing::debug!(login = user, "ssh: refusing a plain public key");
        Ok(Auth::reject())
    }

    async fn auth_openssh_certificate(
        &mut self,
        user: &str,
        certificate: &russh::keys::Certificate,
    ) -> Result<Auth, Self::Error> {
        self.note_login(user);
        match self.authorize(user, certificate).await {
            Ok(authed) => {
                tracing::info!(
                    user = %authed.identity.key_id,
                    login = %authed.login,
                    source_addr = %self.source_addr,
                    "ssh: authenticated"
                );
                let who = (
                    authed.identity.key_id.clone(),
                    authed.identity.roles.clone(),
                );
                self.authed = Some(Arc::new(authed));
                self.with_trace(|t| {
                    t.authenticated = true;
                    t.who = Some(who);
                });
                Ok(Auth::Accept)
            }
            Err(refusal) => {
                self.node
                    .reject_event(&refusal.key_id, user, &refusal.reason, &self.source_addr);
                self.with_trace(|t| t.rejection_audited = true);
                Ok(Auth::reject())
            }
        }
    }

    async fn channel_open_session(
        &mut self,
        channel: Channel<Msg>,
        reply: russh::server::ChannelOpenHandle,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        if self.authed.is_none() {
            reply
                .reject(ChannelOpenFailure::AdministrativelyProhibited)
                .await;
            return Ok(());
        }
        self.channels
            .retain(|_, c| !c.running.as_ref().is_some_and(Running::finished));
        if self.channels.len() >= MAX_CHANNELS {
            reply.reject(ChannelOpenFailure::ResourceShortage).await;
            return Ok(());
        }
        let id = channel.id();
        self.with_trace(|t| {
            t.channels.retain(|c| *c != id);
            t.channels.push(id);
        });
        // Requests and data arrive through this handler; the read half is not needed (dropping
        // it makes russh skip it instead of queueing for it).
        let (_read, write) = channel.split();
        self.channels.insert(
            id,
            SessionChannel {
                write: Some(write),
                ..Default::default()
            },
        );
        reply.accept().await;
        Ok(())
    }

    async fn pty_request(
        &mut self,
        channel: ChannelId,
        term: &str,
        col_width: u32,
        row_height: u32,
        _pix_width: u32,
        _pix_height: u32,
        _modes: &[(Pty, u32)],
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        let permitted = self.authed.as_ref().is_some_and(|a| a.identity.permit_pty);
        let Some(ch) = self.channels.get_mut(&channel) else {
            return session.channel_failure(channel);
        };
        if !permitted {
            tracing::warn!(source_addr = %self.source_addr, "ssh: pty-req refused: certificate lacks permit-pty");
            return session.channel_failure(channel);
        }
        if ch.running.is_some() || ch.pty.is_some() {
            return session.channel_failure(channel);
        }
        ch.pty = Some(PtyParams {
            term: term.chars().take(64).collect(),
            cols: col_width,
            rows: row_height,
        });
        session.channel_success(channel)
    }

    async fn env_request(
        &mut self,
        channel: ChannelId,
        variable_name: &str,
        variable_value: &str,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        let Some(ch) = self.channels.get_mut(&channel) else {
            return session.channel_failure(channel);
        };
        let verdict = if ch.running.is_some() {
            Err("the session has started".to_string())
        } else if ch.env.len() >= MAX_ENV_VARS {
            Err("too many variables".to_string())
        } else {
            process::check_env(variable_name, variable_value)
        };
        match verdict {
            Ok(()) => {
                ch.env.retain(|(k, _)| k != variable_name);
                ch.env
                    .push((variable_name.to_owned(), variable_value.to_owned()));
                session.channel_success(channel)
            }
            Err(why) => {
                let name: String = variable_name.chars().take(128).collect();
                tracing::debug!("ssh: env request for `{name}` refused: {why}");
                session.channel_failure(channel)
            }
        }
    }

    async fn shell_request(
        &mut self,
        channel: ChannelId,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        self.start(channel, Program::Shell, session)
    }

    async fn exec_request(
        &mut self,
        channel: ChannelId,
        data: &[u8],
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        self.start(channel, Program::Exec(data.to_vec()), session)
    }

    /// `sftp` (what OpenSSH 9's `scp` and `sftp` ask for) runs the node's own `sftp-server` as
    /// the login user, as sshd does: the kernel applies the user's permissions and umask to every
    /// file operation, and no file is touched by a root process (decision 0015).
    async fn channel_open_direct_tcpip(
        &mut self,
        channel: Channel<Msg>,
        host_to_connect: &str,
        port_to_connect: u32,
        _originator_address: &str,
        _originator_port: u32,
        reply: russh::server::ChannelOpenHandle,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        let Some(ctx) = self.forwarding() else {
            reply
                .reject(ChannelOpenFailure::AdministrativelyProhibited)
                .await;
            return Ok(());
        };
        self.forwards
            .open_local(ctx, channel, host_to_connect, port_to_connect, reply);
        Ok(())
    }

    async fn tcpip_forward(
        &mut self,
        address: &str,
        port: &mut u32,
        session: &mut Session,
    ) -> Result<bool, Self::Error> {
        let Some(ctx) = self.forwarding() else {
            return Ok(false);
        };
        Ok(self
            .forwards
            .listen_remote(ctx, address, port, session.handle())
            .await)
    }

    async fn cancel_tcpip_forward(
        &mut self,
        address: &str,
        port: u32,
        _session: &mut Session,
    ) -> Result<bool, Self::Error> {
        Ok(self.forwards.cancel_remote(address, port))
    }

    /// `ssh -A`: a socket on the node for the session's processes (`SSH_AUTH_SOCK`), if the
    /// certificate carries `permit-agent-forwarding`.
    async fn agent_request(
        &mut self,
        channel: ChannelId,
        session: &mut Session,
    ) -> Result<bool, Self::Error> {
        let Some(authed) = self.authed.clone() else {
            return Ok(false);
        };
        let Some(ch) = self.channels.get_mut(&channel) else {
            return Ok(false);
        };
        let refused = if !authed.identity.permit_agent_forwarding {
            Some("agent forwarding is not allowed by your roles (the certificate lacks permit-agent-forwarding)".to_string())
        } else if ch.running.is_some() || ch.agent.is_some() {
            Some("the session has started or already forwards an agent".to_string())
        } else {
            match AgentSocket::start(authed.user.uid, authed.user.gid, session.handle()) {
                Ok(socket) => {
                    ch.env.retain(|(k, _)| k != "SSH_AUTH_SOCK");
                    ch.env.push((
                        "SSH_AUTH_SOCK".into(),
                        socket.path().to_string_lossy().into_owned(),
                    ));
                    ch.agent = Some(socket);
                    None
                }
                Err(e) => Some(format!("could not set up the agent socket: {e}")),
            }
        };
        self.node.agent_forward_event(
            &authed.identity.key_id,
            &authed.login,
            &self.source_addr,
            refused.as_deref(),
        );
        Ok(refused.is_none())
    }

    async fn subsystem_request(
        &mut self,
        channel: ChannelId,
        name: &str,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        match process::subsystem(name) {
            Ok(program) => self.start(channel, program, session),
            Err(why) => {
                tracing::warn!(source_addr = %self.source_addr, "ssh: subsystem refused: {why}");
                session.channel_failure(channel)
            }
        }
    }

    async fn x11_request(
        &mut self,
        channel: ChannelId,
        _single_connection: bool,
        _x11_auth_protocol: &str,
        _x11_auth_cookie: &str,
        _x11_screen_number: u32,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        session.channel_failure(channel)
    }

    async fn window_change_request(
        &mut self,
        channel: ChannelId,
        col_width: u32,
        row_height: u32,
        _pix_width: u32,
        _pix_height: u32,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        let Some(ch) = self.channels.get_mut(&channel) else {
            return session.channel_failure(channel);
        };
        let ok = match (&ch.running, &mut ch.pty) {
            (Some(running), _) => running.resize(col_width, row_height),
            (None, Some(pty)) => {
                pty.cols = col_width;
                pty.rows = row_height;
                true
            }
            (None, None) => false,
        };
        if ok {
            session.channel_success(channel)
        } else {
            session.channel_failure(channel)
        }
    }

    async fn signal(
        &mut self,
        channel: ChannelId,
        signal: Sig,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        if let Some(running) = self.channels.get(&channel).and_then(|c| c.running.as_ref())
            && let Err(e) = running.signal(&signal)
        {
            tracing::debug!("ssh: signal {signal:?} not delivered: {e}");
        }
        Ok(())
    }

    async fn data(
        &mut self,
        channel: ChannelId,
        data: &[u8],
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        if let Some(running) = self.channels.get(&channel).and_then(|c| c.running.as_ref()) {
            running.send_data(data).await;
        }
        Ok(())
    }

    async fn channel_eof(
        &mut self,
        channel: ChannelId,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        if let Some(running) = self
            .channels
            .get_mut(&channel)
            .and_then(|c| c.running.as_mut())
        {
            running.eof();
        }
        Ok(())
    }

    async fn channel_close(
        &mut self,
        channel: ChannelId,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        // Dropping the session hangs its process up if it is still running.
        self.channels.remove(&channel);
        Ok(())
    }
}
