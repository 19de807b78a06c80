//! The Auth gRPC service. Every RPC goes through one path (`call`): authenticate the caller
//! from its verified X.509 identity, check the RPC's access rule, run the handler, store what it
//! asks the audit log to keep. Handlers live by resource:
//!
//! - `login`: ping, login, who-am-i, password change (what a person does for themselves);
//! - `join`: hosts (agents, proxies) joining with a token, and their host certificates;
//! - `users`, `documents` (roles and users as TOML/JSON resources), `tokens`, `authorities`,
//!   `events` (the audit log), `nodes` (inventory from heartbeats), `recordings` (session
//!   recordings and the cluster's recording settings), `bots` (Machine ID bots and the renewal
//!   of every identity but users').

mod authorities;
pub mod bots;
#[cfg(test)]
mod bots_tests;
pub(crate) mod call;
mod documents;
mod events;
mod group_commit;
mod join;
mod locks;
mod login;
mod metrics;
mod mfa;
mod nodes;
mod recordings;
#[cfg(test)]
mod security_tests;
#[cfg(test)]
mod tests;
mod tokens;
mod trust;
mod users;
mod watch;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tonic::{Request, Response, Status};

use crate::audit;
use crate::ca::{SshCa, TlsCa};
use crate::identity::Identity;
use crate::password;
use crate::proto;
use crate::proto::auth_server::Auth;
use crate::ratelimit::LoginLimiter;
use crate::storage::{Store, StoreError, StoredEvent};
use crate::tls_authority::TlsAuthority;
pub use authorities::ServedTls;
use call::{Access, Audit, Call, Caller, Done, Event, Failure, Rpc};
pub use metrics::AuthMetrics;
pub(crate) use metrics::{KindLabel, ResultLabel};
pub use trust::refresh_every as trust_refresh_every;

/// Lifetime of agents' and proxies' certificates unless `[auth] host_cert_ttl` says otherwise;
/// hosts renew them at two thirds of it.
pub const DEFAULT_HOST_CERT_TTL: Duration = Duration::from_secs(7 * 24 * 3600);
pub const DEFAULT_TOKEN_TTL: Duration = Duration::from_secs(30 * 60);

/// The verified peer of one connection, attached to every request on it.
#[derive(Debug, Clone)]
pub struct PeerInfo {
    pub remote: Option<SocketAddr>,
    pub identity: Option<Arc<Identity>>,
    /// The SubjectPublicKeyInfo (DER) of the certificate the TLS handshake proved the peer
    /// holds the key of.
    pub key: Option<Arc<[u8]>>,
}

pub struct AuthState {
    pub cluster: String,
    pub store: Store,
    /// The SSH CAs' signing keys (swapped by a rotation; `authorities.rs`).
    pub user_ca: arc_swap::ArcSwap<SshCa>,
    pub host_ca: arc_swap::ArcSwap<SshCa>,
    /// Keys replaced by a rotation, trusted until their grace period ends.
    pub(crate) previous_cas: arc_swap::ArcSwap<authorities::Previous>,
    /// The X.509 CA (swapped by a rotation; `authorities.rs`).
    pub tls: arc_swap::ArcSwap<TlsAuthority>,
    /// Auth's own server certificate and client verifier, re-made when the X.509 CA changes.
    pub(crate) served: std::sync::OnceLock<authorities::ServedTls>,
    pub metrics: Arc<AuthMetrics>,
    pub(crate) limiter: Mutex<LoginLimiter>,
    /// One argon2 thread per core: bounds the CPU and memory password guessing can take.
    pub(crate) hasher: password::HasherPool,
    /// Verified against when the user does not exist, so both cases cost the same.
    pub(crate) dummy_hash: String,
    /// How agents record sessions (`[auth.recording]`).
    pub recording_config: crate::recordings::RecordingConfig,
    /// Where recordings are kept (none: this Auth refuses uploads).
    pub recording_store: Option<crate::recordings::RecordingStore>,
    /// One upload at a time per recording.
    upload_locks: Mutex<std::collections::HashMap<String, recordings::RecordingLock>>,
    /// Who is watching which live session (`gsh join`), and when they last asked.
    watchers: Mutex<recordings::Watchers>,
    /// Lifetime of host certificates (agents, proxies).
    pub host_cert_ttl: Duration,
    /// Whether every login needs a TOTP code (`[auth] second_factor`).
    pub second_factor: crate::role::SecondFactor,
    /// Bot renewals waiting to be written (the writer starts with the first).
    renewals: std::sync::OnceLock<bots::Renewals>,
    /// Emitted audit events waiting to be written (the writer starts with the first).
    audit_writer: std::sync::OnceLock<events::AuditWriter>,
    /// The log of changes watch streams are served from (started with the first stream).
    watch_hub: std::sync::OnceLock<Arc<watch::WatchHub>>,
    /// Set when the API stops: streams end so that the graceful stop does not wait for them.
    stopping: tokio::sync::watch::Sender<bool>,
    /// The locks in force, as this Auth last read them.
    pub(crate) locks: locks::LockCache,
    /// How proxies and agents treat lock state they cannot refresh (`[auth] locking_mode`).
    pub locking_mode: crate::locks::LockingMode,
}

impl std::fmt::Debug for AuthState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuthState")
            .field("cluster", &self.cluster)
            .finish_non_exhaustive()
    }
}

impl AuthState {
    pub fn new(
        cluster: String,
        store: Store,
        user_ca: SshCa,
        host_ca: SshCa,
        tls_ca: TlsCa,
    ) -> Result<Self, password::PasswordError> {
        let cpus = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(2);
        Ok(Self {
            cluster,
            store,
            user_ca: arc_swap::ArcSwap::from_pointee(user_ca),
            host_ca: arc_swap::ArcSwap::from_pointee(host_ca),
            previous_cas: arc_swap::ArcSwap::default(),
            tls: arc_swap::ArcSwap::from_pointee(TlsAuthority::new(tls_ca)),
            served: std::sync::OnceLock::new(),
            metrics: Arc::default(),
            limiter: Mutex::new(LoginLimiter::default()),
            hasher: password::HasherPool::new(cpus)
                .map_err(|e| password::PasswordError::Hash(e.to_string()))?,
            dummy_hash: password::hash(&password::generate())?,
            recording_config: Default::default(),
            recording_store: None,
            upload_locks: Mutex::default(),
            watchers: Mutex::default(),
            host_cert_ttl: DEFAULT_HOST_CERT_TTL,
            second_factor: crate::role::SecondFactor::Off,
            renewals: std::sync::OnceLock::new(),
            audit_writer: std::sync::OnceLock::new(),
            watch_hub: std::sync::OnceLock::new(),
            stopping: tokio::sync::watch::Sender::new(false),
            locks: locks::LockCache::default(),
            locking_mode: crate::locks::LockingMode::default(),
        })
    }

    /// Issue host certificates valid for `ttl`.
    pub fn with_host_cert_ttl(mut self, ttl: Duration) -> Self {
        self.host_cert_ttl = ttl;
        self
    }

    /// How proxies and agents treat lock state they cannot refresh.
    pub fn with_locking_mode(mut self, mode: crate::locks::LockingMode) -> Self {
        self.locking_mode = mode;
        self
    }

    /// Whether every login needs a TOTP code.
    pub fn with_second_factor(mut self, second_factor: crate::role::SecondFactor) -> Self {
        self.second_factor = second_factor;
        self
    }

    /// The bot renewal writer (started on first use, on the caller's runtime).
    pub(crate) fn renewals(self: &Arc<Self>) -> &bots::Renewals {
        self.renewals
            .get_or_init(|| bots::renewals(Arc::downgrade(self)))
    }

    /// The writer of emitted audit events (started on first use, on the caller's runtime).
    pub(crate) fn audit_writer(self: &Arc<Self>) -> &events::AuditWriter {
        self.audit_writer
            .get_or_init(|| events::audit_writer(Arc::downgrade(self)))
    }

    /// The log of changes watch streams are served from (started on first use).
    pub(crate) fn watch_hub(self: &Arc<Self>) -> Arc<watch::WatchHub> {
        Arc::clone(
            self.watch_hub
                .get_or_init(|| watch::WatchHub::start(Arc::downgrade(self))),
        )
    }

    /// End the streams served (watches): the API is stopping.
    pub fn end_streams(&self) {
        self.stopping.send_replace(true);
    }

    /// Resolves when the API is stopping.
    pub(crate) fn stopping(&self) -> tokio::sync::watch::Receiver<bool> {
        self.stopping.subscribe()
    }

    /// Keep session recordings in `store`, recorded as `config` says.
    pub fn with_recordings(
        mut self,
        config: crate::recordings::RecordingConfig,
        store: crate::recordings::RecordingStore,
    ) -> Self {
        self.recording_config = config;
        self.recording_store = Some(store);
        self
    }

    /// `user` is watching the live session `id` (refreshed by each read).
    pub(crate) fn watch(&self, id: &str, user: &str) {
        if let Ok(mut w) = self.watchers.lock() {
            w.watch(id, user, std::time::Instant::now());
        }
    }

    /// Who is watching the live session `id` now.
    pub(crate) fn watchers_of(&self, id: &str) -> Vec<String> {
        self.watchers
            .lock()
            .map(|mut w| w.of(id, std::time::Instant::now()))
            .unwrap_or_default()
    }

    /// The lock of one recording's uploads (entries of idle recordings are dropped).
    pub(crate) fn recording_lock(&self, id: &str) -> recordings::RecordingLock {
        let Ok(mut locks) = self.upload_locks.lock() else {
            return Arc::default();
        };
        locks.retain(|_, l| Arc::strong_count(l) > 1);
        Arc::clone(locks.entry(id.to_owned()).or_default())
    }
}

/// The tonic service.
#[derive(Debug, Clone)]
pub struct AuthService {
    state: Arc<AuthState>,
}

pub(crate) fn now_secs() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

pub(crate) fn now_nanos() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0)
}

pub(crate) fn internal(e: impl std::fmt::Display) -> Status {
    tracing::error!(error = %e, "internal error");
    Status::internal("internal error; see the Auth server log")
}

pub(crate) fn store_status(e: StoreError) -> Status {
    match e {
        StoreError::AlreadyExists { .. } => Status::already_exists(e.to_string()),
        StoreError::NotFound { .. } => Status::not_found(e.to_string()),
        other => internal(other),
    }
}

pub(crate) fn ttl_from(seconds: u64, default: Duration) -> Duration {
    if seconds == 0 {
        default
    } else {
        Duration::from_secs(seconds)
    }
}

impl AuthState {
    /// Store `events` from `addr` in one transaction: all durable, or none.
    pub(crate) async fn record(&self, addr: &str, events: Vec<Event>) -> Result<(), Status> {
        if events.is_empty() {
            return Ok(());
        }
        let now = now_nanos();
        let batch: Vec<StoredEvent> = events
            .into_iter()
            .map(|e| audit::event(e.event_type, &e.actor, addr, &self.cluster, now, e.data))
            .collect();
        self.store
            .append_events(&batch)
            .await
            .map_err(store_status)?;
        self.metrics.audit_events.inc_by(batch.len() as u64);
        Ok(())
    }

    pub(crate) async fn hash_password(&self, password: String) -> Result<String, Status> {
        self.hasher.hash(password).await.map_err(internal)
    }

    /// Whether `password` matches `hash`; without a hash (no such user) a dummy one is verified,
    /// so both cases cost the same.
    pub(crate) async fn verify_password(
        &self,
        password: String,
        hash: Option<String>,
    ) -> Result<bool, Status> {
        let (hash, real) = match hash {
            Some(h) => (h, true),
            None => (self.dummy_hash.clone(), false),
        };
        let ok = self.hasher.verify(password, hash).await.map_err(internal)?;
        Ok(ok && real)
    }

    /// A certificate pair with the cluster's CAs, as a client stores it.
    pub(crate) fn credentials(
        &self,
        ssh_cert: String,
        tls_cert: String,
        expires: i64,
    ) -> proto::Credentials {
        proto::Credentials {
            ssh_cert,
            tls_cert,
            tls_ca: self.tls.load().trusted_pem(now_secs()),
            ssh_host_ca: self.trusted_ssh(authorities::SshKind::Host),
            ssh_user_ca: self.trusted_ssh(authorities::SshKind::User),
            cluster_name: self.cluster.clone(),
            expires,
        }
    }

    /// Check that a user's roles exist.
    pub(crate) async fn check_roles_exist(&self, roles: &[String]) -> Result<(), Status> {
        for (i, r) in roles.iter().enumerate() {
            if self
                .store
                .get_role(r)
                .await
                .map_err(store_status)?
                .is_none()
            {
                return Err(Status::invalid_argument(format!(
                    "spec.roles[{i}]: role `{r}` does not exist"
                )));
            }
        }
        Ok(())
    }

    /// The caller of a connection with this verified peer, with its roles.
    async fn authenticate(&self, peer: &PeerInfo) -> Result<Option<Caller>, Status> {
        let Some(identity) = peer.identity.clone() else {
            return Ok(None);
        };
        if identity.cluster != self.cluster {
            return Err(Status::unauthenticated(format!(
                "certificate was issued by cluster `{}`, not `{}`",
                identity.cluster, self.cluster
            )));
        }
        self.check_lock(locks::subject(&identity)).await?;
        let roles = call::roles_of(self, &identity).await?;
        Ok(Some(Caller {
            identity,
            roles,
            key: peer.key.clone(),
        }))
    }
}

impl AuthService {
    pub fn new(state: Arc<AuthState>) -> Self {
        Self { state }
    }

    pub fn state(&self) -> &Arc<AuthState> {
        &self.state
    }

    /// The one path: authenticate, authorize by `rpc`'s rule, act, audit.
    async fn handle<Req, Resp, F, Fut>(
        &self,
        rpc: Rpc,
        req: Request<Req>,
        act: F,
    ) -> Result<Response<Resp>, Status>
    where
        F: FnOnce(Call, Req) -> Fut,
        Fut: Future<Output = Result<Done<Resp>, Failure>>,
    {
        let peer = req
            .extensions()
            .get::<PeerInfo>()
            .cloned()
            .unwrap_or(PeerInfo {
                remote: None,
                identity: None,
                key: None,
            });
        let addr = peer.remote.map(|a| a.ip().to_string()).unwrap_or_default();
        let access = rpc.access();
        let caller = match access {
            // A public call ignores whatever certificate came with it.
            Access::Public => None,
            _ => Some(
                self.state
                    .authenticate(&peer)
                    .await?
                    .ok_or_else(call::not_authenticated)?,
            ),
        };
        let authorized = Arc::new(AtomicBool::new(false));
        match (access, &caller) {
            (Access::Public | Access::Authenticated, _) => {
                authorized.store(true, Ordering::Release)
            }
            (Access::Rule(kind, verb), Some(c)) => {
                call::check(c, kind, verb)?;
                authorized.store(true, Ordering::Release);
            }
            // Checked by the handler (`Call::authorize`), before it acts.
            (Access::PerRequest, _) | (Access::Rule(..), None) => {}
        }
        let state = Arc::clone(&self.state);
        let call = Call::new(
            Arc::clone(&state),
            addr.clone(),
            caller,
            Arc::clone(&authorized),
        );
        match act(call, req.into_inner()).await {
            Ok(Done { response, audit }) => {
                if !authorized.load(Ordering::Acquire) {
                    // Fail closed: a handler that acted without checking its rule is a bug.
                    return Err(internal(format!(
                        "{} answered without an authorization check",
                        rpc.name()
                    )));
                }
                match audit {
                    Audit::Events(events) => state.record(&addr, events).await?,
                    Audit::Nothing(why) => {
                        tracing::trace!(rpc = rpc.name(), why, "auth api: nothing to audit")
                    }
                }
                Ok(Response::new(response))
            }
            Err(Failure { status, event }) => {
                if let Some(event) = event {
                    state.record(&addr, vec![event]).await?;
                }
                Err(status)
            }
        }
    }

    /// Issue host credentials for a host that runs in this process (a local agent), audited as a
    /// join would be.
    pub async fn issue_local_host(
        &self,
        r: &proto::JoinRequest,
        ssh_key: &ssh_key::PublicKey,
    ) -> Result<proto::JoinResponse, Status> {
        let done = join::issue_host(&self.state, r, ssh_key, false, "in-process").await?;
        if let Audit::Events(events) = done.audit {
            self.state.record("127.0.0.1", events).await?;
        }
        Ok(done.response)
    }
}

/// Each RPC: its entry in `call::Rpc` and its handler, through `AuthService::handle`.
#[tonic::async_trait]
impl Auth for AuthService {
    async fn ping(
        &self,
        req: Request<proto::PingRequest>,
    ) -> Result<Response<proto::PingResponse>, Status> {
        self.handle(Rpc::Ping, req, login::ping).await
    }

    async fn login(
        &self,
        req: Request<proto::LoginRequest>,
    ) -> Result<Response<proto::LoginResponse>, Status> {
        self.handle(Rpc::Login, req, login::login).await
    }

    async fn add_mfa_device(
        &self,
        req: Request<proto::AddMfaDeviceRequest>,
    ) -> Result<Response<proto::AddMfaDeviceResponse>, Status> {
        self.handle(Rpc::AddMfaDevice, req, mfa::add_device).await
    }

    async fn join(
        &self,
        req: Request<proto::JoinRequest>,
    ) -> Result<Response<proto::JoinResponse>, Status> {
        self.handle(Rpc::Join, req, join::join).await
    }

    async fn who_am_i(
        &self,
        req: Request<proto::WhoAmIRequest>,
    ) -> Result<Response<proto::WhoAmIResponse>, Status> {
        self.handle(Rpc::WhoAmI, req, login::who_am_i).await
    }

    async fn change_password(
        &self,
        req: Request<proto::ChangePasswordRequest>,
    ) -> Result<Response<proto::ChangePasswordResponse>, Status> {
        self.handle(Rpc::ChangePassword, req, login::change_password)
            .await
    }

    async fn create_user(
        &self,
        req: Request<proto::CreateUserRequest>,
    ) -> Result<Response<proto::CreateUserResponse>, Status> {
        self.handle(Rpc::CreateUser, req, users::create).await
    }

    async fn reset_password(
        &self,
        req: Request<proto::ResetPasswordRequest>,
    ) -> Result<Response<proto::ResetPasswordResponse>, Status> {
        self.handle(Rpc::ResetPassword, req, users::reset_password)
            .await
    }

    async fn upsert_resource(
        &self,
        req: Request<proto::UpsertResourceRequest>,
    ) -> Result<Response<proto::UpsertResourceResponse>, Status> {
        self.handle(Rpc::UpsertResource, req, documents::upsert)
            .await
    }

    async fn get_resource(
        &self,
        req: Request<proto::GetResourceRequest>,
    ) -> Result<Response<proto::GetResourceResponse>, Status> {
        self.handle(Rpc::GetResource, req, documents::get).await
    }

    async fn list_resources(
        &self,
        req: Request<proto::ListResourcesRequest>,
    ) -> Result<Response<proto::ListResourcesResponse>, Status> {
        self.handle(Rpc::ListResources, req, documents::list).await
    }

    async fn delete_resource(
        &self,
        req: Request<proto::DeleteResourceRequest>,
    ) -> Result<Response<proto::DeleteResourceResponse>, Status> {
        self.handle(Rpc::DeleteResource, req, documents::delete)
            .await
    }

    async fn create_token(
        &self,
        req: Request<proto::CreateTokenRequest>,
    ) -> Result<Response<proto::CreateTokenResponse>, Status> {
        self.handle(Rpc::CreateToken, req, tokens::create).await
    }

    async fn list_tokens(
        &self,
        req: Request<proto::ListTokensRequest>,
    ) -> Result<Response<proto::ListTokensResponse>, Status> {
        self.handle(Rpc::ListTokens, req, tokens::list).await
    }

    async fn delete_token(
        &self,
        req: Request<proto::DeleteTokenRequest>,
    ) -> Result<Response<proto::DeleteTokenResponse>, Status> {
        self.handle(Rpc::DeleteToken, req, tokens::delete).await
    }

    async fn export_authorities(
        &self,
        req: Request<proto::ExportAuthoritiesRequest>,
    ) -> Result<Response<proto::ExportAuthoritiesResponse>, Status> {
        self.handle(Rpc::ExportAuthorities, req, authorities::export)
            .await
    }

    async fn emit_events(
        &self,
        req: Request<proto::EmitEventsRequest>,
    ) -> Result<Response<proto::EmitEventsResponse>, Status> {
        self.handle(Rpc::EmitEvents, req, events::emit).await
    }

    async fn search_events(
        &self,
        req: Request<proto::SearchEventsRequest>,
    ) -> Result<Response<proto::SearchEventsResponse>, Status> {
        self.handle(Rpc::SearchEvents, req, events::search).await
    }

    async fn upsert_nodes(
        &self,
        req: Request<proto::UpsertNodesRequest>,
    ) -> Result<Response<proto::UpsertNodesResponse>, Status> {
        self.handle(Rpc::UpsertNodes, req, nodes::upsert).await
    }

    async fn list_nodes(
        &self,
        req: Request<proto::ListNodesRequest>,
    ) -> Result<Response<proto::ListNodesResponse>, Status> {
        self.handle(Rpc::ListNodes, req, nodes::list).await
    }

    async fn get_cluster_settings(
        &self,
        req: Request<proto::GetClusterSettingsRequest>,
    ) -> Result<Response<proto::GetClusterSettingsResponse>, Status> {
        self.handle(Rpc::GetClusterSettings, req, recordings::settings)
            .await
    }

    async fn upload_recording(
        &self,
        req: Request<proto::UploadRecordingRequest>,
    ) -> Result<Response<proto::UploadRecordingResponse>, Status> {
        self.handle(Rpc::UploadRecording, req, recordings::upload)
            .await
    }

    async fn list_recordings(
        &self,
        req: Request<proto::ListRecordingsRequest>,
    ) -> Result<Response<proto::ListRecordingsResponse>, Status> {
        self.handle(Rpc::ListRecordings, req, recordings::list)
            .await
    }

    async fn read_recording(
        &self,
        req: Request<proto::ReadRecordingRequest>,
    ) -> Result<Response<proto::ReadRecordingResponse>, Status> {
        self.handle(Rpc::ReadRecording, req, recordings::read).await
    }

    async fn create_bot(
        &self,
        req: Request<proto::CreateBotRequest>,
    ) -> Result<Response<proto::CreateBotResponse>, Status> {
        self.handle(Rpc::CreateBot, req, bots::create).await
    }

    async fn list_bots(
        &self,
        req: Request<proto::ListBotsRequest>,
    ) -> Result<Response<proto::ListBotsResponse>, Status> {
        self.handle(Rpc::ListBots, req, bots::list).await
    }

    async fn delete_bot(
        &self,
        req: Request<proto::DeleteBotRequest>,
    ) -> Result<Response<proto::DeleteBotResponse>, Status> {
        self.handle(Rpc::DeleteBot, req, bots::delete).await
    }

    async fn unlock_bot(
        &self,
        req: Request<proto::UnlockBotRequest>,
    ) -> Result<Response<proto::UnlockBotResponse>, Status> {
        self.handle(Rpc::UnlockBot, req, bots::unlock).await
    }

    async fn renew(
        &self,
        req: Request<proto::RenewRequest>,
    ) -> Result<Response<proto::RenewResponse>, Status> {
        self.handle(Rpc::Renew, req, bots::renew).await
    }

    type WatchStream = watch::WatchStream;

    async fn watch(
        &self,
        req: Request<proto::WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        self.handle(Rpc::Watch, req, watch::watch).await
    }

    async fn validate_trusted_cluster(
        &self,
        req: Request<proto::ValidateTrustedClusterRequest>,
    ) -> Result<Response<proto::ValidateTrustedClusterResponse>, Status> {
        self.handle(Rpc::ValidateTrustedCluster, req, trust::validate)
            .await
    }

    async fn list_clusters(
        &self,
        req: Request<proto::ListClustersRequest>,
    ) -> Result<Response<proto::ListClustersResponse>, Status> {
        self.handle(Rpc::ListClusters, req, trust::list).await
    }

    async fn create_lock(
        &self,
        req: Request<proto::CreateLockRequest>,
    ) -> Result<Response<proto::CreateLockResponse>, Status> {
        self.handle(Rpc::CreateLock, req, locks::create).await
    }

    async fn list_locks(
        &self,
        req: Request<proto::ListLocksRequest>,
    ) -> Result<Response<proto::ListLocksResponse>, Status> {
        self.handle(Rpc::ListLocks, req, locks::list).await
    }

    async fn rotate_cert_authority(
        &self,
        req: Request<proto::RotateCertAuthorityRequest>,
    ) -> Result<Response<proto::RotateCertAuthorityResponse>, Status> {
        self.handle(Rpc::RotateCertAuthority, req, authorities::rotate)
            .await
    }

    async fn delete_lock(
        &self,
        req: Request<proto::DeleteLockRequest>,
    ) -> Result<Response<proto::DeleteLockResponse>, Status> {
        self.handle(Rpc::DeleteLock, req, locks::delete).await
    }

    async fn heartbeat_proxy(
        &self,
        req: Request<proto::HeartbeatProxyRequest>,
    ) -> Result<Response<proto::HeartbeatProxyResponse>, Status> {
        self.handle(Rpc::HeartbeatProxy, req, watch::heartbeat_proxy)
            .await
    }
}
