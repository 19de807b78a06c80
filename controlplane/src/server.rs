//! The Auth gRPC service: handlers that authenticate the caller from its verified X.509
//! identity, authorize it with RBAC, and call into the CAs and the store.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use serde_json::json;
use sha2::{Digest, Sha256};
use tonic::{Request, Response, Status};

use crate::audit::{self, types};
use crate::ca::{SshCa, SshUserCertRequest, TlsCa, TlsUsage, parse_ssh_public_key};
use crate::identity::{AUTH_SERVER_NAME, Identity, IdentityKind};
use crate::password;
use crate::proto;
use crate::proto::auth_server::Auth;
use crate::ratelimit::LoginLimiter;
use crate::rbac::{DEFAULT_SESSION_TTL, RoleSet};
use crate::resources::{
    self, Metadata, Resource, ResourceKind, Role, RoleConditions, RoleSpec, Rule, User, UserSpec,
    Verb,
};
use crate::storage::{EventFilter, Store, StoreError, StoredEvent, TokenRecord, TokenRejection};

pub const HOST_CERT_TTL: Duration = Duration::from_secs(365 * 24 * 3600);
pub const DEFAULT_TOKEN_TTL: Duration = Duration::from_secs(30 * 60);
const MAX_TOKEN_TTL: Duration = Duration::from_secs(365 * 24 * 3600);
const MAX_EVENT_BATCH: usize = 1000;
const MAX_EVENT_DATA: usize = 64 * 1024;

/// A node's heartbeat as stored.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct NodeRecord {
    host_id: String,
    name: String,
    #[serde(default)]
    labels: std::collections::HashMap<String, String>,
    #[serde(default)]
    addresses: Vec<String>,
    #[serde(default)]
    services: Vec<String>,
    last_seen: i64,
    expires: i64,
}

impl From<proto::Node> for NodeRecord {
    fn from(n: proto::Node) -> Self {
        Self {
            host_id: n.host_id,
            name: n.name,
            labels: n.labels,
            addresses: n.addresses,
            services: n.services,
            last_seen: n.last_seen,
            expires: n.expires,
        }
    }
}

impl From<NodeRecord> for proto::Node {
    fn from(n: NodeRecord) -> Self {
        Self {
            host_id: n.host_id,
            name: n.name,
            labels: n.labels,
            addresses: n.addresses,
            services: n.services,
            last_seen: n.last_seen,
            expires: n.expires,
        }
    }
}

/// The verified peer of one connection, attached to every request on it.
#[derive(Debug, Clone)]
pub struct PeerInfo {
    pub remote: Option<SocketAddr>,
    pub identity: Option<Arc<Identity>>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabel {
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabel {
    kind: &'static str,
}

/// Auth metrics, registered under `gatehouse_auth_*`.
#[derive(Debug, Default)]
pub struct AuthMetrics {
    logins: Family<ResultLabel, Counter>,
    joins: Family<ResultLabel, Counter>,
    certs_issued: Family<KindLabel, Counter>,
    audit_events: Counter,
    audit_duplicates: Counter,
}

impl AuthMetrics {
    pub fn register(self: &Arc<Self>, registry: &mut Registry) {
        let r = registry.sub_registry_with_prefix("gatehouse_auth");
        r.register(
            "logins",
            "Login attempts by result (success, failure, rate_limited)",
            self.logins.clone(),
        );
        r.register("joins", "Join attempts by result", self.joins.clone());
        r.register(
            "certs_issued",
            "Certificates issued by kind",
            self.certs_issued.clone(),
        );
        r.register(
            "audit_events",
            "Audit events durably stored",
            self.audit_events.clone(),
        );
        r.register(
            "audit_duplicates",
            "Audit events ignored as duplicates of stored ones",
            self.audit_duplicates.clone(),
        );
    }
}

pub struct AuthState {
    pub cluster: String,
    pub store: Store,
    pub user_ca: SshCa,
    pub host_ca: SshCa,
    pub tls_ca: TlsCa,
    pub metrics: Arc<AuthMetrics>,
    limiter: Mutex<LoginLimiter>,
    /// One argon2 thread per core: bounds the CPU and memory password guessing can take.
    hasher: password::HasherPool,
    /// Verified against when the user does not exist, so both cases cost the same.
    dummy_hash: String,
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
            user_ca,
            host_ca,
            tls_ca,
            metrics: Arc::default(),
            limiter: Mutex::new(LoginLimiter::default()),
            hasher: password::HasherPool::new(cpus)
                .map_err(|e| password::PasswordError::Hash(e.to_string()))?,
            dummy_hash: password::hash(&password::generate())?,
        })
    }
}

/// The tonic service.
#[derive(Debug, Clone)]
pub struct AuthService {
    state: Arc<AuthState>,
}

/// An authenticated caller with its roles resolved.
struct Caller {
    identity: Arc<Identity>,
    roles: RoleSet,
    addr: String,
}

fn now_secs() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

fn now_nanos() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0)
}

fn internal(e: impl std::fmt::Display) -> Status {
    tracing::error!(error = %e, "internal error");
    Status::internal("internal error; see the Auth server log")
}

fn store_status(e: StoreError) -> Status {
    match e {
        StoreError::AlreadyExists { .. } => Status::already_exists(e.to_string()),
        StoreError::NotFound { .. } => Status::not_found(e.to_string()),
        other => internal(other),
    }
}

/// Built-in role for the admin identity written to the data dir for `gctl`.
fn admin_role() -> Role {
    Role {
        kind: "role".into(),
        version: "v1".into(),
        metadata: Metadata {
            name: "@admin".into(),
            ..Default::default()
        },
        spec: RoleSpec {
            allow: RoleConditions {
                rules: vec![Rule {
                    resources: vec![ResourceKind::Any],
                    verbs: vec![Verb::Any],
                }],
                ..Default::default()
            },
            ..Default::default()
        },
    }
}

/// Built-in role for agents (node identities).
/// Built-in role for proxies: they batch their agents' heartbeats to Auth.
fn proxy_role() -> Role {
    let rule = |resources: Vec<ResourceKind>, verbs: Vec<Verb>| Rule { resources, verbs };
    Role {
        kind: "role".into(),
        version: "v1".into(),
        metadata: Metadata {
            name: "@proxy".into(),
            ..Default::default()
        },
        spec: RoleSpec {
            allow: RoleConditions {
                rules: vec![
                    rule(
                        vec![ResourceKind::Node],
                        vec![Verb::Create, Verb::Update, Verb::List, Verb::Read],
                    ),
                    rule(vec![ResourceKind::Event], vec![Verb::Create]),
                    rule(vec![ResourceKind::CertAuthority], vec![Verb::Read]),
                ],
                ..Default::default()
            },
            ..Default::default()
        },
    }
}

fn node_role() -> Role {
    Role {
        kind: "role".into(),
        version: "v1".into(),
        metadata: Metadata {
            name: "@node".into(),
            ..Default::default()
        },
        spec: RoleSpec {
            allow: RoleConditions {
                rules: vec![
                    Rule {
                        resources: vec![ResourceKind::Node],
                        verbs: vec![Verb::Create, Verb::Update],
                    },
                    Rule {
                        resources: vec![ResourceKind::Event],
                        verbs: vec![Verb::Create],
                    },
                    Rule {
                        resources: vec![ResourceKind::CertAuthority],
                        verbs: vec![Verb::Read],
                    },
                    // Agents evaluate node access locally from the roles in user certificates.
                    Rule {
                        resources: vec![ResourceKind::Role],
                        verbs: vec![Verb::Read, Verb::List],
                    },
                ],
                ..Default::default()
            },
            ..Default::default()
        },
    }
}

fn token_hash(secret: &str) -> String {
    hex::encode(Sha256::digest(secret.as_bytes()))
}

fn token_id(secret: &str) -> String {
    let digest = hex::encode(Sha256::digest(
        format!("gatehouse-token-id:{secret}").as_bytes(),
    ));
    digest.get(..16).unwrap_or_default().to_owned()
}

fn token_proto(t: &TokenRecord) -> proto::Token {
    proto::Token {
        id: t.id.clone(),
        r#type: t.token_type.clone(),
        expires: t.expires,
        max_uses: t.max_uses,
        uses: t.uses,
        created: t.created,
        created_by: t.created_by.clone(),
        bot_name: t.bot_name.clone(),
    }
}

fn event_proto(e: StoredEvent) -> proto::AuditEvent {
    proto::AuditEvent {
        event_id: e.event_id,
        r#type: e.event_type,
        time_nanos: e.time_nanos,
        actor: e.actor,
        source_addr: e.source_addr,
        data_json: e.data,
        id: e.id,
        cluster: e.cluster,
    }
}

/// Addresses a joining host may claim: IPs or DNS-like names, never the Auth server's name.
fn validate_host_address(a: &str) -> Result<(), Status> {
    if a.parse::<std::net::IpAddr>().is_ok() {
        return Ok(());
    }
    let ok = !a.is_empty()
        && a.len() <= 253
        && a.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.')
        && !a.starts_with('-')
        && !a.eq_ignore_ascii_case(AUTH_SERVER_NAME)
        && !a.to_ascii_lowercase().ends_with(".gatehouse.cluster.local");
    if ok {
        Ok(())
    } else {
        Err(Status::invalid_argument(format!(
            "invalid host address `{a}`"
        )))
    }
}

impl AuthService {
    pub fn new(state: Arc<AuthState>) -> Self {
        Self { state }
    }

    pub fn state(&self) -> &Arc<AuthState> {
        &self.state
    }

    fn peer<T>(req: &Request<T>) -> PeerInfo {
        req.extensions()
            .get::<PeerInfo>()
            .cloned()
            .unwrap_or(PeerInfo {
                remote: None,
                identity: None,
            })
    }

    fn addr_of(peer: &PeerInfo) -> String {
        peer.remote.map(|a| a.ip().to_string()).unwrap_or_default()
    }

    async fn roles_of(&self, identity: &Identity) -> Result<RoleSet, Status> {
        match identity.kind {
            IdentityKind::Builtin if identity.name == "admin" => {
                Ok(RoleSet::new(vec![admin_role()]))
            }
            IdentityKind::Node if identity.roles.iter().any(|r| r == "@proxy") => {
                Ok(RoleSet::new(vec![proxy_role()]))
            }
            IdentityKind::Node => Ok(RoleSet::new(vec![node_role()])),
            IdentityKind::User | IdentityKind::Bot => {
                let mut roles = Vec::with_capacity(identity.roles.len());
                for name in &identity.roles {
                    // A role deleted since the certificate was issued grants nothing.
                    if let Some(role) = self
                        .state
                        .store
                        .get_role(name)
                        .await
                        .map_err(store_status)?
                    {
                        roles.push(role);
                    }
                }
                Ok(RoleSet::new(roles))
            }
            _ => Ok(RoleSet::default()),
        }
    }

    /// Authenticate from the connection's verified certificate and resolve roles.
    async fn caller<T>(&self, req: &Request<T>) -> Result<Caller, Status> {
        let peer = Self::peer(req);
        let identity = peer.identity.clone().ok_or_else(|| {
            Status::unauthenticated(
                "this call needs a client certificate from the cluster; log in first (gsh login)",
            )
        })?;
        if identity.cluster != self.state.cluster {
            return Err(Status::unauthenticated(format!(
                "certificate was issued by cluster `{}`, not `{}`",
                identity.cluster, self.state.cluster
            )));
        }
        let roles = self.roles_of(&identity).await?;
        Ok(Caller {
            identity,
            roles,
            addr: Self::addr_of(&peer),
        })
    }

    async fn authorize<T>(
        &self,
        req: &Request<T>,
        kind: ResourceKind,
        verb: Verb,
    ) -> Result<Caller, Status> {
        let caller = self.caller(req).await?;
        caller.roles.check_access(kind, verb).map_err(|e| {
            Status::permission_denied(format!(
                "{} `{}`: {e}",
                kind_label(&caller.identity),
                caller.identity.name
            ))
        })?;
        Ok(caller)
    }

    async fn audit(
        &self,
        event_type: &str,
        actor: &str,
        addr: &str,
        data: serde_json::Value,
    ) -> Result<(), Status> {
        self.audit_all(addr, vec![(event_type, actor, data)]).await
    }

    /// Store several events in one transaction: all durable, or none.
    async fn audit_all(
        &self,
        addr: &str,
        events: Vec<(&str, &str, serde_json::Value)>,
    ) -> Result<(), Status> {
        let now = now_nanos();
        let batch: Vec<StoredEvent> = events
            .into_iter()
            .map(|(event_type, actor, data)| {
                audit::event(event_type, actor, addr, &self.state.cluster, now, data)
            })
            .collect();
        self.state
            .store
            .append_events(&batch)
            .await
            .map_err(store_status)?;
        self.state.metrics.audit_events.inc_by(batch.len() as u64);
        Ok(())
    }

    async fn hash_password(&self, password: String) -> Result<String, Status> {
        self.state.hasher.hash(password).await.map_err(internal)
    }

    async fn verify_password(
        &self,
        password: String,
        hash: Option<String>,
    ) -> Result<bool, Status> {
        let (hash, real) = match hash {
            Some(h) => (h, true),
            None => (self.state.dummy_hash.clone(), false),
        };
        let ok = self
            .state
            .hasher
            .verify(password, hash)
            .await
            .map_err(internal)?;
        Ok(ok && real)
    }

    fn credentials(&self, ssh_cert: String, tls_cert: String, expires: i64) -> proto::Credentials {
        proto::Credentials {
            ssh_cert,
            tls_cert,
            tls_ca: self.state.tls_ca.cert_pem().to_owned(),
            ssh_host_ca: vec![self.state.host_ca.public_line()],
            ssh_user_ca: vec![self.state.user_ca.public_line()],
            cluster_name: self.state.cluster.clone(),
            expires,
        }
    }

    /// Check a user's roles exist and their logins are well-formed.
    async fn check_roles_exist(&self, roles: &[String]) -> Result<(), Status> {
        for (i, r) in roles.iter().enumerate() {
            if self
                .state
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

    /// Issue host credentials (SSH host cert + X.509 node or proxy cert) for a validated join
    /// request. Used by `Join` and by roles that run inside the Auth process.
    pub async fn issue_host(
        &self,
        r: &proto::JoinRequest,
        ssh_key: &ssh_key::PublicKey,
        is_proxy: bool,
        token_id: &str,
        addr: &str,
    ) -> Result<proto::JoinResponse, Status> {
        let now = now_secs();
        let addr = addr.to_owned();
        let ssh_key = ssh_key.clone();
        let host_id = uuid::Uuid::new_v4().to_string();
        let expires = now + HOST_CERT_TTL.as_secs() as i64;
        // `<name>.<cluster>` lets OpenSSH users write `ssh node.cluster` with a config block.
        let mut principals = vec![
            r.host_name.clone(),
            format!("{}.{}", r.host_name, self.state.cluster),
        ];
        principals.extend(r.addresses.iter().cloned());
        let ssh_cert = self
            .state
            .host_ca
            .sign_host(
                &ssh_key,
                &host_id,
                &self.state.cluster,
                &principals,
                now as u64,
                expires as u64,
            )
            .map_err(internal)?;
        let identity = Identity {
            kind: IdentityKind::Node,
            name: host_id.clone(),
            roles: vec![if is_proxy {
                "@proxy".into()
            } else {
                "@node".into()
            }],
            logins: vec![],
            traits: BTreeMap::from([("host_name".to_string(), vec![r.host_name.clone()])]),
            cluster: self.state.cluster.clone(),
            route_to_cluster: self.state.cluster.clone(),
            expires,
        };
        let mut sans = vec![
            host_id.clone(),
            format!("{host_id}.{}", self.state.cluster),
            r.host_name.clone(),
        ];
        sans.extend(r.addresses.iter().cloned());
        if is_proxy {
            sans.push(crate::identity::PROXY_SERVER_NAME.to_string());
        }
        let tls_cert = self
            .state
            .tls_ca
            .sign(
                &r.tls_public_key,
                &identity,
                TlsUsage::ServerAndClient,
                &sans,
                time::OffsetDateTime::now_utc(),
            )
            .map_err(|e| Status::invalid_argument(format!("tls_public_key or address: {e}")))?;
        self.state
            .metrics
            .joins
            .get_or_create(&ResultLabel { result: "success" })
            .inc();
        self.state
            .metrics
            .certs_issued
            .get_or_create(&KindLabel { kind: "host" })
            .inc();
        self.audit_all(
            &addr,
            vec![
                (
                    types::JOIN,
                    r.host_name.as_str(),
                    audit::success(json!({ "host_id": host_id, "host_name": r.host_name, "token_id": token_id, "role": if is_proxy { "proxy" } else { "node" } })),
                ),
                (
                    types::CERT_ISSUED,
                    host_id.as_str(),
                    json!({ "kind": "host", "host_id": host_id, "principals": principals, "expires": expires }),
                ),
            ],
        )
        .await?;
        Ok(proto::JoinResponse {
            credentials: Some(self.credentials(
                ssh_cert.to_openssh().map_err(internal)?,
                tls_cert.pem(),
                expires,
            )),
            host_id,
            role: if is_proxy {
                "proxy".into()
            } else {
                "node".into()
            },
        })
    }
}

fn kind_label(id: &Identity) -> &'static str {
    match id.kind {
        IdentityKind::User => "user",
        IdentityKind::Node => "node",
        IdentityKind::Bot => "bot",
        _ => "identity",
    }
}

fn ttl_from(seconds: u64, default: Duration) -> Duration {
    if seconds == 0 {
        default
    } else {
        Duration::from_secs(seconds)
    }
}

#[tonic::async_trait]
impl Auth for AuthService {
    async fn ping(
        &self,
        _req: Request<proto::PingRequest>,
    ) -> Result<Response<proto::PingResponse>, Status> {
        Ok(Response::new(proto::PingResponse {
            cluster_name: self.state.cluster.clone(),
            server_version: env!("CARGO_PKG_VERSION").into(),
            ca_pin: self.state.tls_ca.pin(),
        }))
    }

    async fn login(
        &self,
        req: Request<proto::LoginRequest>,
    ) -> Result<Response<proto::LoginResponse>, Status> {
        let peer = Self::peer(&req);
        let addr = Self::addr_of(&peer);
        let r = req.into_inner();
        if r.user.is_empty() || r.user.len() > 128 || r.password.len() > password::MAX_PASSWORD_LEN
        {
            return Err(Status::invalid_argument(
                "user name must be 1-128 characters and password at most 1024 bytes",
            ));
        }
        let ssh_key = parse_ssh_public_key(&r.ssh_public_key)
            .map_err(|e| Status::invalid_argument(format!("ssh_public_key: {e}")))?;
        crate::ca::check_tls_public_key(&r.tls_public_key)
            .map_err(|e| Status::invalid_argument(format!("tls_public_key: {e}")))?;

        let now_instant = Instant::now();
        let limited =
            self.state
                .limiter
                .lock()
                .map_err(internal)?
                .check(&r.user, &addr, now_instant);
        if let Err(retry) = limited {
            self.state
                .metrics
                .logins
                .get_or_create(&ResultLabel {
                    result: "rate_limited",
                })
                .inc();
            self.audit(
                types::USER_LOGIN,
                &r.user,
                &addr,
                audit::failure("rate limited", json!({ "user": r.user })),
            )
            .await?;
            return Err(Status::resource_exhausted(format!(
                "too many failed login attempts; try again in {}s",
                retry.as_secs().max(1)
            )));
        }

        let stored = self
            .state
            .store
            .get_user(&r.user)
            .await
            .map_err(store_status)?;
        let hash = stored.as_ref().and_then(|(_, h)| h.clone());
        let ok = self.verify_password(r.password.clone(), hash).await?;
        let Some((user, _)) = stored.filter(|_| ok) else {
            self.state.limiter.lock().map_err(internal)?.record_failure(
                &r.user,
                &addr,
                now_instant,
            );
            self.state
                .metrics
                .logins
                .get_or_create(&ResultLabel { result: "failure" })
                .inc();
            self.audit(
                types::USER_LOGIN,
                &r.user,
                &addr,
                audit::failure("invalid user name or password", json!({ "user": r.user })),
            )
            .await?;
            return Err(Status::unauthenticated("invalid user name or password"));
        };
        self.state
            .limiter
            .lock()
            .map_err(internal)?
            .record_success(&r.user);

        let mut role_docs = Vec::new();
        for name in &user.spec.roles {
            if let Some(role) = self
                .state
                .store
                .get_role(name)
                .await
                .map_err(store_status)?
            {
                role_docs.push(role);
            }
        }
        let roles = RoleSet::new(role_docs);
        let ttl = ttl_from(r.ttl_seconds, DEFAULT_SESSION_TTL).min(roles.max_session_ttl());
        let now = now_secs();
        let expires = now + ttl.as_secs() as i64;
        let identity = Identity {
            kind: IdentityKind::User,
            name: user.metadata.name.clone(),
            roles: roles.names(),
            logins: roles.logins(&user.spec.traits),
            traits: user.spec.traits.clone(),
            cluster: self.state.cluster.clone(),
            route_to_cluster: self.state.cluster.clone(),
            expires,
        };
        let perms = roles.cert_permissions();
        let ssh_cert = self
            .state
            .user_ca
            .sign_user(
                &ssh_key,
                &SshUserCertRequest {
                    identity: &identity,
                    permit_pty: perms.permit_pty,
                    permit_port_forwarding: perms.permit_port_forwarding,
                    permit_agent_forwarding: perms.permit_agent_forwarding,
                    permit_x11_forwarding: perms.permit_x11_forwarding,
                },
                now as u64,
            )
            .map_err(internal)?;
        let tls_cert = self
            .state
            .tls_ca
            .sign(
                &r.tls_public_key,
                &identity,
                TlsUsage::Client,
                &[],
                time::OffsetDateTime::now_utc(),
            )
            .map_err(|e| Status::invalid_argument(format!("tls_public_key: {e}")))?;
        self.state
            .metrics
            .logins
            .get_or_create(&ResultLabel { result: "success" })
            .inc();
        self.state
            .metrics
            .certs_issued
            .get_or_create(&KindLabel { kind: "user" })
            .inc();
        // The login and the certificate it produced are one durable write (one fsync).
        self.audit_all(
            &addr,
            vec![
                (
                    types::USER_LOGIN,
                    identity.name.as_str(),
                    audit::success(json!({ "user": identity.name, "method": "password" })),
                ),
                (
                    types::CERT_ISSUED,
                    identity.name.as_str(),
                    json!({
                        "kind": "user",
                        "user": identity.name,
                        "roles": identity.roles,
                        "logins": identity.logins,
                        "expires": expires,
                        "ssh_serial": ssh_cert.serial(),
                    }),
                ),
            ],
        )
        .await?;
        let ssh_line = ssh_cert.to_openssh().map_err(internal)?;
        Ok(Response::new(proto::LoginResponse {
            credentials: Some(self.credentials(ssh_line, tls_cert.pem(), expires)),
            roles: identity.roles,
            logins: identity.logins,
        }))
    }

    async fn join(
        &self,
        req: Request<proto::JoinRequest>,
    ) -> Result<Response<proto::JoinResponse>, Status> {
        let peer = Self::peer(&req);
        let addr = Self::addr_of(&peer);
        let r = req.into_inner();
        // Validate everything before touching the token, so bad input never uses it up.
        if r.token.is_empty() || r.token.len() > 256 {
            return Err(Status::invalid_argument("token must be 1-256 characters"));
        }
        resources::validate_name(&r.host_name)
            .map_err(|m| Status::invalid_argument(format!("host_name: {m}")))?;
        if r.addresses.len() > 32 {
            return Err(Status::invalid_argument("at most 32 addresses"));
        }
        for a in &r.addresses {
            validate_host_address(a)?;
        }
        let ssh_key = parse_ssh_public_key(&r.ssh_public_key)
            .map_err(|e| Status::invalid_argument(format!("ssh_public_key: {e}")))?;
        crate::ca::check_tls_public_key(&r.tls_public_key)
            .map_err(|e| Status::invalid_argument(format!("tls_public_key: {e}")))?;
        let hash = token_hash(&r.token);
        let now = now_secs();
        let token = match self
            .state
            .store
            .consume_token(&hash, now)
            .await
            .map_err(store_status)?
        {
            Ok(t) => t,
            Err(rejection) => {
                self.state
                    .metrics
                    .joins
                    .get_or_create(&ResultLabel { result: "failure" })
                    .inc();
                self.audit(
                    types::JOIN,
                    &r.host_name,
                    &addr,
                    audit::failure(&rejection.to_string(), json!({ "host_name": r.host_name })),
                )
                .await?;
                let msg = match rejection {
                    TokenRejection::NotFound => "join token not recognized".to_string(),
                    TokenRejection::Expired => {
                        "join token has expired; ask an admin for a new one (gctl tokens add)"
                            .to_string()
                    }
                    TokenRejection::UsedUp => {
                        "join token is used up; ask an admin for a new one (gctl tokens add)"
                            .to_string()
                    }
                };
                return Err(Status::permission_denied(msg));
            }
        };
        let is_proxy = token.token_type == "proxy";
        if token.token_type != "node" && !is_proxy {
            return Err(Status::unimplemented(format!(
                "joining with a `{}` token is not supported by this Auth version yet",
                token.token_type
            )));
        }
        let resp = self
            .issue_host(&r, &ssh_key, is_proxy, &token.id, &addr)
            .await?;
        Ok(Response::new(resp))
    }

    async fn who_am_i(
        &self,
        req: Request<proto::WhoAmIRequest>,
    ) -> Result<Response<proto::WhoAmIResponse>, Status> {
        let caller = self.caller(&req).await?;
        Ok(Response::new(proto::WhoAmIResponse {
            identity_json: serde_json::to_string(&*caller.identity).map_err(internal)?,
        }))
    }

    async fn change_password(
        &self,
        req: Request<proto::ChangePasswordRequest>,
    ) -> Result<Response<proto::ChangePasswordResponse>, Status> {
        let caller = self.caller(&req).await?;
        if caller.identity.kind != IdentityKind::User {
            return Err(Status::permission_denied("only users have passwords"));
        }
        let r = req.into_inner();
        password::check_policy(&r.new_password)
            .map_err(|e| Status::invalid_argument(format!("new password: {e}")))?;
        let name = caller.identity.name.clone();
        let now_instant = Instant::now();
        if let Err(retry) =
            self.state
                .limiter
                .lock()
                .map_err(internal)?
                .check(&name, &caller.addr, now_instant)
        {
            return Err(Status::resource_exhausted(format!(
                "too many failed attempts; try again in {}s",
                retry.as_secs().max(1)
            )));
        }
        let stored = self
            .state
            .store
            .get_user(&name)
            .await
            .map_err(store_status)?;
        let hash = stored.and_then(|(_, h)| h);
        if !self.verify_password(r.old_password, hash).await? {
            self.state.limiter.lock().map_err(internal)?.record_failure(
                &name,
                &caller.addr,
                now_instant,
            );
            self.audit(
                types::USER_PASSWORD_CHANGE,
                &name,
                &caller.addr,
                audit::failure("wrong current password", json!({ "user": name })),
            )
            .await?;
            return Err(Status::unauthenticated("current password is wrong"));
        }
        let new_hash = self.hash_password(r.new_password).await?;
        self.state
            .store
            .set_password_hash(&name, &new_hash, now_secs())
            .await
            .map_err(store_status)?;
        self.audit(
            types::USER_PASSWORD_CHANGE,
            &name,
            &caller.addr,
            audit::success(json!({ "user": name })),
        )
        .await?;
        Ok(Response::new(proto::ChangePasswordResponse {}))
    }

    async fn create_user(
        &self,
        req: Request<proto::CreateUserRequest>,
    ) -> Result<Response<proto::CreateUserResponse>, Status> {
        let caller = self
            .authorize(&req, ResourceKind::User, Verb::Create)
            .await?;
        let r = req.into_inner();
        let mut traits = BTreeMap::new();
        if !r.logins.is_empty() {
            traits.insert("logins".to_string(), r.logins.clone());
        }
        let user = User {
            kind: "user".into(),
            version: "v1".into(),
            metadata: Metadata {
                name: r.name.clone(),
                ..Default::default()
            },
            spec: UserSpec {
                roles: r.roles.clone(),
                traits,
            },
        };
        let value = serde_json::to_value(&user).map_err(internal)?;
        resources::parse_value(value).map_err(|e| Status::invalid_argument(e.to_string()))?;
        self.check_roles_exist(&user.spec.roles).await?;
        let initial = password::generate();
        let hash = self.hash_password(initial.clone()).await?;
        self.state
            .store
            .create_user(&user, &hash, now_secs())
            .await
            .map_err(store_status)?;
        self.audit(
            types::USER_CREATE,
            &caller.identity.name,
            &caller.addr,
            json!({ "user": user.metadata.name, "roles": user.spec.roles, "logins": r.logins }),
        )
        .await?;
        Ok(Response::new(proto::CreateUserResponse {
            initial_password: initial,
        }))
    }

    async fn reset_password(
        &self,
        req: Request<proto::ResetPasswordRequest>,
    ) -> Result<Response<proto::ResetPasswordResponse>, Status> {
        let caller = self
            .authorize(&req, ResourceKind::User, Verb::Update)
            .await?;
        let name = req.into_inner().name;
        if self
            .state
            .store
            .get_user(&name)
            .await
            .map_err(store_status)?
            .is_none()
        {
            return Err(Status::not_found(format!("user `{name}` not found")));
        }
        let new_password = password::generate();
        let hash = self.hash_password(new_password.clone()).await?;
        self.state
            .store
            .set_password_hash(&name, &hash, now_secs())
            .await
            .map_err(store_status)?;
        self.audit(
            types::USER_PASSWORD_RESET,
            &caller.identity.name,
            &caller.addr,
            json!({ "user": name }),
        )
        .await?;
        Ok(Response::new(proto::ResetPasswordResponse {
            password: new_password,
        }))
    }

    async fn upsert_resource(
        &self,
        req: Request<proto::UpsertResourceRequest>,
    ) -> Result<Response<proto::UpsertResourceResponse>, Status> {
        let r = req.get_ref();
        let value: serde_json::Value = serde_json::from_str(&r.json)
            .map_err(|e| Status::invalid_argument(format!("resource is not valid JSON: {e}")))?;
        let resource =
            resources::parse_value(value).map_err(|e| Status::invalid_argument(e.to_string()))?;
        let kind = resource.kind();
        let exists = match &resource {
            Resource::Role(role) => self
                .state
                .store
                .get_role(&role.metadata.name)
                .await
                .map_err(store_status)?
                .is_some(),
            Resource::User(user) => self
                .state
                .store
                .get_user(&user.metadata.name)
                .await
                .map_err(store_status)?
                .is_some(),
        };
        let verb = if exists { Verb::Update } else { Verb::Create };
        let caller = self.authorize(&req, kind, verb).await?;
        let create_only = req.get_ref().create_only;
        let now = now_secs();
        let (created, event_type) = match &resource {
            Resource::Role(role) => {
                let created = self
                    .state
                    .store
                    .upsert_role(role, create_only, now)
                    .await
                    .map_err(store_status)?;
                (
                    created,
                    if created {
                        types::ROLE_CREATE
                    } else {
                        types::ROLE_UPDATE
                    },
                )
            }
            Resource::User(user) => {
                self.check_roles_exist(&user.spec.roles).await?;
                let created = self
                    .state
                    .store
                    .upsert_user(user, create_only, now)
                    .await
                    .map_err(store_status)?;
                (
                    created,
                    if created {
                        types::USER_CREATE
                    } else {
                        types::USER_UPDATE
                    },
                )
            }
        };
        self.audit(
            event_type,
            &caller.identity.name,
            &caller.addr,
            json!({ "kind": kind.as_str(), "name": resource.name() }),
        )
        .await?;
        Ok(Response::new(proto::UpsertResourceResponse { created }))
    }

    async fn get_resource(
        &self,
        req: Request<proto::GetResourceRequest>,
    ) -> Result<Response<proto::GetResourceResponse>, Status> {
        let kind = ResourceKind::parse(&req.get_ref().kind)
            .ok_or_else(|| Status::invalid_argument("unknown kind"))?;
        self.authorize(&req, kind, Verb::Read).await?;
        let name = &req.get_ref().name;
        let json = match kind {
            ResourceKind::Role => self
                .state
                .store
                .get_role(name)
                .await
                .map_err(store_status)?
                .map(|r| Resource::Role(r).to_json()),
            ResourceKind::User => self
                .state
                .store
                .get_user(name)
                .await
                .map_err(store_status)?
                .map(|(u, _)| Resource::User(u).to_json()),
            _ => {
                return Err(Status::invalid_argument(format!(
                    "get is not supported for {kind}"
                )));
            }
        };
        let json = json.ok_or_else(|| Status::not_found(format!("{kind} `{name}` not found")))?;
        Ok(Response::new(proto::GetResourceResponse { json }))
    }

    async fn list_resources(
        &self,
        req: Request<proto::ListResourcesRequest>,
    ) -> Result<Response<proto::ListResourcesResponse>, Status> {
        let kind = ResourceKind::parse(&req.get_ref().kind)
            .ok_or_else(|| Status::invalid_argument("unknown kind"))?;
        self.authorize(&req, kind, Verb::List).await?;
        let json = match kind {
            ResourceKind::Role => self
                .state
                .store
                .list_roles()
                .await
                .map_err(store_status)?
                .into_iter()
                .map(|r| Resource::Role(r).to_json())
                .collect(),
            ResourceKind::User => self
                .state
                .store
                .list_users()
                .await
                .map_err(store_status)?
                .into_iter()
                .map(|u| Resource::User(u).to_json())
                .collect(),
            _ => {
                return Err(Status::invalid_argument(format!(
                    "list is not supported for {kind}; use the kind's own call"
                )));
            }
        };
        Ok(Response::new(proto::ListResourcesResponse { json }))
    }

    async fn delete_resource(
        &self,
        req: Request<proto::DeleteResourceRequest>,
    ) -> Result<Response<proto::DeleteResourceResponse>, Status> {
        let kind = ResourceKind::parse(&req.get_ref().kind)
            .ok_or_else(|| Status::invalid_argument("unknown kind"))?;
        let caller = self.authorize(&req, kind, Verb::Delete).await?;
        let name = req.get_ref().name.clone();
        let (table, event_type) = match kind {
            ResourceKind::Role => ("role", types::ROLE_DELETE),
            ResourceKind::User => ("user", types::USER_DELETE),
            ResourceKind::Node => ("node", types::NODE_DELETE),
            _ => {
                return Err(Status::invalid_argument(format!(
                    "delete is not supported for {kind}"
                )));
            }
        };
        self.state
            .store
            .delete(table, &name)
            .await
            .map_err(store_status)?;
        self.audit(
            event_type,
            &caller.identity.name,
            &caller.addr,
            json!({ "kind": kind.as_str(), "name": name }),
        )
        .await?;
        Ok(Response::new(proto::DeleteResourceResponse {}))
    }

    async fn create_token(
        &self,
        req: Request<proto::CreateTokenRequest>,
    ) -> Result<Response<proto::CreateTokenResponse>, Status> {
        let caller = self
            .authorize(&req, ResourceKind::Token, Verb::Create)
            .await?;
        let r = req.into_inner();
        if !matches!(
            r.r#type.as_str(),
            "node" | "proxy" | "bot" | "trusted_cluster"
        ) {
            return Err(Status::invalid_argument(format!(
                "type: unknown token type `{}`; expected node, proxy, bot or trusted_cluster",
                r.r#type
            )));
        }
        if r.r#type == "bot" {
            resources::validate_name(&r.bot_name)
                .map_err(|m| Status::invalid_argument(format!("bot_name: {m}")))?;
        }
        let ttl = ttl_from(r.ttl_seconds, DEFAULT_TOKEN_TTL);
        if ttl > MAX_TOKEN_TTL {
            return Err(Status::invalid_argument("ttl: at most 365 days"));
        }
        let mut secret = [0u8; 32];
        rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut secret);
        let secret = hex::encode(secret);
        let now = now_secs();
        let record = TokenRecord {
            id: token_id(&secret),
            hash: token_hash(&secret),
            token_type: r.r#type.clone(),
            expires: now + ttl.as_secs() as i64,
            max_uses: r.max_uses,
            uses: 0,
            created: now,
            created_by: caller.identity.name.clone(),
            bot_name: r.bot_name.clone(),
            labels: r.labels.clone(),
        };
        self.state
            .store
            .insert_token(&record)
            .await
            .map_err(store_status)?;
        self.audit(
            types::TOKEN_CREATE,
            &caller.identity.name,
            &caller.addr,
            json!({ "token_id": record.id, "type": record.token_type, "expires": record.expires, "max_uses": record.max_uses }),
        )
        .await?;
        Ok(Response::new(proto::CreateTokenResponse {
            token: secret,
            info: Some(token_proto(&record)),
        }))
    }

    async fn list_tokens(
        &self,
        req: Request<proto::ListTokensRequest>,
    ) -> Result<Response<proto::ListTokensResponse>, Status> {
        self.authorize(&req, ResourceKind::Token, Verb::List)
            .await?;
        let tokens = self.state.store.list_tokens().await.map_err(store_status)?;
        Ok(Response::new(proto::ListTokensResponse {
            tokens: tokens.iter().map(token_proto).collect(),
        }))
    }

    async fn delete_token(
        &self,
        req: Request<proto::DeleteTokenRequest>,
    ) -> Result<Response<proto::DeleteTokenResponse>, Status> {
        let caller = self
            .authorize(&req, ResourceKind::Token, Verb::Delete)
            .await?;
        let id = req.into_inner().id;
        // Accept the public id or the secret itself.
        let (by_id, by_hash) = if id.len() == 16 {
            (id.clone(), String::new())
        } else {
            (token_id(&id), token_hash(&id))
        };
        self.state
            .store
            .delete_token(&by_id, &by_hash)
            .await
            .map_err(store_status)?;
        self.audit(
            types::TOKEN_DELETE,
            &caller.identity.name,
            &caller.addr,
            json!({ "token_id": by_id }),
        )
        .await?;
        Ok(Response::new(proto::DeleteTokenResponse {}))
    }

    async fn export_authorities(
        &self,
        req: Request<proto::ExportAuthoritiesRequest>,
    ) -> Result<Response<proto::ExportAuthoritiesResponse>, Status> {
        self.authorize(&req, ResourceKind::CertAuthority, Verb::Read)
            .await?;
        let cluster = &self.state.cluster;
        let text = match req.get_ref().r#type.as_str() {
            // One line for sshd's TrustedUserCAKeys file.
            "user" => format!("{} {cluster} user CA\n", self.state.user_ca.public_line()),
            // known_hosts: trust host certs for any host of the cluster.
            "host" => format!(
                "@cert-authority * {} {cluster} host CA\n",
                self.state.host_ca.public_line()
            ),
            "tls" => self.state.tls_ca.cert_pem().to_owned(),
            other => {
                return Err(Status::invalid_argument(format!(
                    "type: unknown CA type `{other}`; expected user, host or tls"
                )));
            }
        };
        Ok(Response::new(proto::ExportAuthoritiesResponse { text }))
    }

    async fn emit_events(
        &self,
        req: Request<proto::EmitEventsRequest>,
    ) -> Result<Response<proto::EmitEventsResponse>, Status> {
        let caller = self
            .authorize(&req, ResourceKind::Event, Verb::Create)
            .await?;
        let r = req.into_inner();
        if r.events.len() > MAX_EVENT_BATCH {
            return Err(Status::invalid_argument(format!(
                "at most {MAX_EVENT_BATCH} events per batch"
            )));
        }
        let mut batch = Vec::with_capacity(r.events.len());
        for (i, e) in r.events.into_iter().enumerate() {
            if e.event_id.is_empty()
                || e.event_id.len() > 128
                || e.r#type.is_empty()
                || e.r#type.len() > 64
            {
                return Err(Status::invalid_argument(format!(
                    "events[{i}]: event_id (1-128) and type (1-64) are required"
                )));
            }
            if e.data_json.len() > MAX_EVENT_DATA {
                return Err(Status::invalid_argument(format!(
                    "events[{i}].data_json: larger than 64 KiB"
                )));
            }
            let mut data: serde_json::Value = if e.data_json.is_empty() {
                json!({})
            } else {
                serde_json::from_str(&e.data_json).map_err(|err| {
                    Status::invalid_argument(format!("events[{i}].data_json: {err}"))
                })?
            };
            let Some(obj) = data.as_object_mut() else {
                return Err(Status::invalid_argument(format!(
                    "events[{i}].data_json: must be a JSON object"
                )));
            };
            // Who delivered the event is recorded by Auth, not claimed by the emitter.
            obj.insert("emitted_by".into(), json!(caller.identity.name));
            batch.push(StoredEvent {
                id: 0,
                event_id: e.event_id,
                time_nanos: e.time_nanos,
                event_type: e.r#type,
                actor: e.actor,
                source_addr: e.source_addr,
                cluster: self.state.cluster.clone(),
                data: data.to_string(),
            });
        }
        let (accepted, duplicates) = self
            .state
            .store
            .append_events(&batch)
            .await
            .map_err(store_status)?;
        self.state.metrics.audit_events.inc_by(accepted as u64);
        self.state
            .metrics
            .audit_duplicates
            .inc_by(duplicates as u64);
        Ok(Response::new(proto::EmitEventsResponse {
            accepted,
            duplicates,
        }))
    }

    async fn search_events(
        &self,
        req: Request<proto::SearchEventsRequest>,
    ) -> Result<Response<proto::SearchEventsResponse>, Status> {
        self.authorize(&req, ResourceKind::Event, Verb::List)
            .await?;
        let r = req.into_inner();
        let filter = EventFilter {
            from_nanos: r.from_nanos,
            to_nanos: r.to_nanos,
            types: r.types,
            after_id: r.after_id,
            limit: r.limit,
        };
        let events = self
            .state
            .store
            .search_events(&filter)
            .await
            .map_err(store_status)?;
        Ok(Response::new(proto::SearchEventsResponse {
            events: events.into_iter().map(event_proto).collect(),
        }))
    }

    async fn upsert_nodes(
        &self,
        req: Request<proto::UpsertNodesRequest>,
    ) -> Result<Response<proto::UpsertNodesResponse>, Status> {
        let caller = self
            .authorize(&req, ResourceKind::Node, Verb::Update)
            .await?;
        let r = req.into_inner();
        let ttl = ttl_from(r.ttl_seconds, Duration::from_secs(600)).min(Duration::from_secs(3600));
        let now = now_secs();
        let mut rows = Vec::with_capacity(r.nodes.len());
        for mut n in r.nodes {
            // An agent may only speak for itself.
            if caller.identity.kind == IdentityKind::Node
                && !caller.identity.roles.iter().any(|r| r == "@proxy")
                && n.host_id != caller.identity.name
            {
                return Err(Status::permission_denied(format!(
                    "node `{}` cannot upsert node `{}`",
                    caller.identity.name, n.host_id
                )));
            }
            resources::validate_name(&n.name)
                .map_err(|m| Status::invalid_argument(format!("node name: {m}")))?;
            n.last_seen = now;
            n.expires = now + ttl.as_secs() as i64;
            let spec = serde_json::to_string(&NodeRecord::from(n.clone())).map_err(internal)?;
            rows.push((n.host_id.clone(), spec));
        }
        self.state
            .store
            .upsert_nodes(&rows, now + ttl.as_secs() as i64)
            .await
            .map_err(store_status)?;
        Ok(Response::new(proto::UpsertNodesResponse {}))
    }

    async fn list_nodes(
        &self,
        req: Request<proto::ListNodesRequest>,
    ) -> Result<Response<proto::ListNodesResponse>, Status> {
        self.authorize(&req, ResourceKind::Node, Verb::List).await?;
        let rows = self
            .state
            .store
            .list_nodes(now_secs())
            .await
            .map_err(store_status)?;
        let nodes = rows
            .iter()
            .filter_map(|s| serde_json::from_str::<NodeRecord>(s).ok())
            .map(proto::Node::from)
            .collect();
        Ok(Response::new(proto::ListNodesResponse { nodes }))
    }
}
