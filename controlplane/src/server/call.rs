//! The one path every RPC takes: authenticate → authorize → act → audit.
//!
//! Each RPC has one entry in [`Rpc`], and its [`Access`] rule lives there and nowhere else;
//! `AuthService::handle` looks it up, authenticates the caller and checks the rule before the
//! handler runs. A handler cannot answer without saying what the audit log gets: it returns a
//! [`Done`], whose [`Audit`] is either events (stored durably, all or none, before the response
//! leaves) or the reason there are none. A refusal worth recording carries its event in
//! [`Failure`]. A new RPC therefore cannot forget authorization (no entry, no dispatch; the
//! `authorization_table` test calls every RPC as every kind of caller) nor audit (no `Done`, no
//! response).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use serde_json::Value;
use tonic::Status;

use super::AuthState;
use crate::identity::{Identity, IdentityKind};
use crate::rbac::RoleSet;
use crate::resources::{Metadata, ResourceKind, Role, RoleConditions, RoleSpec, Rule, Verb};

/// Who may call an RPC.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Access {
    /// Anyone, before authenticating: how a client gets its first certificate.
    Public,
    /// Any identity of this cluster, acting on itself (the handler checks the kind).
    Authenticated,
    /// A fixed rule: the caller's roles must allow `verb` on `kind` (deny wins).
    Rule(ResourceKind, Verb),
    /// A rule that depends on the request (its kind, or whether the resource exists): the
    /// handler calls [`Call::authorize`] before it acts, or the call fails closed.
    PerRequest,
}

/// Every RPC of the Auth service. Names are the protobuf service's method names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Rpc {
    Ping,
    Login,
    AddMfaDevice,
    Join,
    WhoAmI,
    ChangePassword,
    CreateUser,
    ResetPassword,
    UpsertResource,
    GetResource,
    ListResources,
    DeleteResource,
    CreateToken,
    ListTokens,
    DeleteToken,
    ExportAuthorities,
    EmitEvents,
    SearchEvents,
    UpsertNodes,
    ListNodes,
    GetClusterSettings,
    UploadRecording,
    ListRecordings,
    ReadRecording,
    CreateBot,
    ListBots,
    DeleteBot,
    UnlockBot,
    Renew,
    Watch,
    HeartbeatProxy,
    ValidateTrustedCluster,
    ListClusters,
    CreateLock,
    ListLocks,
    DeleteLock,
    RotateCertAuthority,
}

impl Rpc {
    #[cfg(test)]
    pub(crate) const ALL: [Rpc; 37] = [
        Rpc::Ping,
        Rpc::Login,
        Rpc::AddMfaDevice,
        Rpc::Join,
        Rpc::WhoAmI,
        Rpc::ChangePassword,
        Rpc::CreateUser,
        Rpc::ResetPassword,
        Rpc::UpsertResource,
        Rpc::GetResource,
        Rpc::ListResources,
        Rpc::DeleteResource,
        Rpc::CreateToken,
        Rpc::ListTokens,
        Rpc::DeleteToken,
        Rpc::ExportAuthorities,
        Rpc::EmitEvents,
        Rpc::SearchEvents,
        Rpc::UpsertNodes,
        Rpc::ListNodes,
        Rpc::GetClusterSettings,
        Rpc::UploadRecording,
        Rpc::ListRecordings,
        Rpc::ReadRecording,
        Rpc::CreateBot,
        Rpc::ListBots,
        Rpc::DeleteBot,
        Rpc::UnlockBot,
        Rpc::Renew,
        Rpc::Watch,
        Rpc::HeartbeatProxy,
        Rpc::ValidateTrustedCluster,
        Rpc::ListClusters,
        Rpc::CreateLock,
        Rpc::ListLocks,
        Rpc::DeleteLock,
        Rpc::RotateCertAuthority,
    ];

    /// The access rule: the one table of who may call what.
    pub(crate) fn access(self) -> Access {
        use Access::{Authenticated, PerRequest, Public, Rule};
        use ResourceKind as K;
        match self {
            // ValidateTrustedCluster: a leaf's Auth with a trusted_cluster token.
            // AddMfaDevice: the password is the credential (limited like Login).
            Rpc::Ping
            | Rpc::Login
            | Rpc::AddMfaDevice
            | Rpc::Join
            | Rpc::ValidateTrustedCluster => Public,
            // Renew: the caller's own identity, by kind (bots, agents, proxies; not users).
            // HeartbeatProxy: proxies only (the handler checks the kind).
            Rpc::WhoAmI
            | Rpc::ChangePassword
            | Rpc::GetClusterSettings
            | Rpc::Renew
            | Rpc::HeartbeatProxy
            | Rpc::ListClusters => Authenticated,
            Rpc::CreateUser => Rule(K::User, Verb::Create),
            Rpc::ResetPassword => Rule(K::User, Verb::Update),
            // Watch: each kind asked for is checked.
            Rpc::UpsertResource
            | Rpc::GetResource
            | Rpc::ListResources
            | Rpc::DeleteResource
            | Rpc::Watch => PerRequest,
            Rpc::CreateToken => Rule(K::Token, Verb::Create),
            Rpc::ListTokens => Rule(K::Token, Verb::List),
            Rpc::DeleteToken => Rule(K::Token, Verb::Delete),
            Rpc::ExportAuthorities => Rule(K::CertAuthority, Verb::Read),
            Rpc::EmitEvents => Rule(K::Event, Verb::Create),
            Rpc::SearchEvents => Rule(K::Event, Verb::List),
            Rpc::UpsertNodes => Rule(K::Node, Verb::Update),
            Rpc::ListNodes => Rule(K::Node, Verb::List),
            Rpc::UploadRecording => Rule(K::Session, Verb::Create),
            // Narrowed to the caller's own sessions by the handler when the rules say `own`.
            Rpc::ListRecordings => Rule(K::Session, Verb::List),
            Rpc::ReadRecording => Rule(K::Session, Verb::Read),
            Rpc::CreateBot => Rule(K::Bot, Verb::Create),
            Rpc::ListBots => Rule(K::Bot, Verb::List),
            Rpc::DeleteBot => Rule(K::Bot, Verb::Delete),
            Rpc::UnlockBot => Rule(K::Bot, Verb::Update),
            Rpc::CreateLock => Rule(K::Lock, Verb::Create),
            Rpc::ListLocks => Rule(K::Lock, Verb::List),
            Rpc::DeleteLock => Rule(K::Lock, Verb::Delete),
            Rpc::RotateCertAuthority => Rule(K::CertAuthority, Verb::Update),
        }
    }

    /// The protobuf method name.
    pub(crate) fn name(self) -> &'static str {
        match self {
            Rpc::Ping => "Ping",
            Rpc::Login => "Login",
            Rpc::AddMfaDevice => "AddMfaDevice",
            Rpc::Join => "Join",
            Rpc::WhoAmI => "WhoAmI",
            Rpc::ChangePassword => "ChangePassword",
            Rpc::CreateUser => "CreateUser",
            Rpc::ResetPassword => "ResetPassword",
            Rpc::UpsertResource => "UpsertResource",
            Rpc::GetResource => "GetResource",
            Rpc::ListResources => "ListResources",
            Rpc::DeleteResource => "DeleteResource",
            Rpc::CreateToken => "CreateToken",
            Rpc::ListTokens => "ListTokens",
            Rpc::DeleteToken => "DeleteToken",
            Rpc::ExportAuthorities => "ExportAuthorities",
            Rpc::EmitEvents => "EmitEvents",
            Rpc::SearchEvents => "SearchEvents",
            Rpc::UpsertNodes => "UpsertNodes",
            Rpc::ListNodes => "ListNodes",
            Rpc::GetClusterSettings => "GetClusterSettings",
            Rpc::UploadRecording => "UploadRecording",
            Rpc::ListRecordings => "ListRecordings",
            Rpc::ReadRecording => "ReadRecording",
            Rpc::CreateBot => "CreateBot",
            Rpc::ListBots => "ListBots",
            Rpc::DeleteBot => "DeleteBot",
            Rpc::UnlockBot => "UnlockBot",
            Rpc::Renew => "Renew",
            Rpc::Watch => "Watch",
            Rpc::HeartbeatProxy => "HeartbeatProxy",
            Rpc::ValidateTrustedCluster => "ValidateTrustedCluster",
            Rpc::ListClusters => "ListClusters",
            Rpc::CreateLock => "CreateLock",
            Rpc::ListLocks => "ListLocks",
            Rpc::DeleteLock => "DeleteLock",
            Rpc::RotateCertAuthority => "RotateCertAuthority",
        }
    }
}

/// An authenticated caller with its roles resolved.
#[derive(Debug)]
pub(crate) struct Caller {
    pub(crate) identity: Arc<Identity>,
    pub(crate) roles: RoleSet,
    /// The public key (SubjectPublicKeyInfo DER) the connection proved it holds.
    pub(crate) key: Option<Arc<[u8]>>,
}

/// One call on its way through the path: what a handler knows about it.
#[derive(Debug)]
pub(crate) struct Call {
    pub(crate) state: Arc<AuthState>,
    /// The caller's address (IP), for audit and rate limits.
    pub(crate) addr: String,
    caller: Option<Caller>,
    /// Set once the call's access rule has been checked.
    authorized: Arc<AtomicBool>,
}

impl Call {
    pub(crate) fn new(
        state: Arc<AuthState>,
        addr: String,
        caller: Option<Caller>,
        authorized: Arc<AtomicBool>,
    ) -> Self {
        Self {
            state,
            addr,
            caller,
            authorized,
        }
    }

    /// The authenticated caller (every RPC but the public ones has one).
    pub(crate) fn caller(&self) -> Result<&Caller, Status> {
        self.caller.as_ref().ok_or_else(not_authenticated)
    }

    /// Check a rule that depends on the request (for [`Access::PerRequest`] RPCs).
    pub(crate) fn authorize(&self, kind: ResourceKind, verb: Verb) -> Result<&Caller, Status> {
        let caller = self.caller()?;
        check(caller, kind, verb)?;
        self.authorized.store(true, Ordering::Release);
        Ok(caller)
    }
}

/// The status an RPC without a usable certificate gets.
pub(crate) fn not_authenticated() -> Status {
    Status::unauthenticated(
        "this call needs a client certificate from the cluster; log in first (gsh login)",
    )
}

/// `verb` on `kind` by `caller`'s roles, or a refusal naming who was refused.
pub(crate) fn check(caller: &Caller, kind: ResourceKind, verb: Verb) -> Result<(), Status> {
    caller.roles.check_access(kind, verb).map_err(|e| {
        Status::permission_denied(format!(
            "{} `{}`: {e}",
            kind_label(&caller.identity),
            caller.identity.name
        ))
    })
}

fn kind_label(id: &Identity) -> &'static str {
    match id.kind {
        IdentityKind::User => "user",
        IdentityKind::Node => "node",
        IdentityKind::Bot => "bot",
        _ => "identity",
    }
}

/// One audit event a handler asks for (the address and cluster are the call's).
#[derive(Debug)]
pub(crate) struct Event {
    pub(crate) event_type: &'static str,
    pub(crate) actor: String,
    pub(crate) data: Value,
}

impl Event {
    pub(crate) fn new(event_type: &'static str, actor: &str, data: Value) -> Self {
        Self {
            event_type,
            actor: actor.to_owned(),
            data,
        }
    }
}

/// What the audit log gets from a call that succeeded.
#[derive(Debug)]
pub(crate) enum Audit {
    /// Stored durably in one transaction before the response leaves.
    Events(Vec<Event>),
    /// Nothing, and why: a read, or a call whose act is itself the record.
    Nothing(&'static str),
}

impl Audit {
    pub(crate) fn one(event_type: &'static str, actor: &str, data: Value) -> Self {
        Self::Events(vec![Event::new(event_type, actor, data)])
    }
}

/// A handler's success: the response and its audit.
#[derive(Debug)]
pub(crate) struct Done<T> {
    pub(crate) response: T,
    pub(crate) audit: Audit,
}

impl<T> Done<T> {
    pub(crate) fn audited(response: T, audit: Audit) -> Self {
        Self { response, audit }
    }

    /// A read: nothing for the audit log.
    pub(crate) fn read(response: T) -> Self {
        Self {
            response,
            audit: Audit::Nothing("a read"),
        }
    }
}

/// A handler's refusal, with the event it leaves in the audit log, if any (a failed login, a
/// refused join).
#[derive(Debug)]
pub(crate) struct Failure {
    pub(crate) status: Status,
    pub(crate) event: Option<Event>,
}

impl Failure {
    pub(crate) fn audited(status: Status, event: Event) -> Self {
        Self {
            status,
            event: Some(event),
        }
    }
}

impl From<Status> for Failure {
    fn from(status: Status) -> Self {
        Self {
            status,
            event: None,
        }
    }
}

/// The roles of an identity: built-in ones for the admin, proxies and agents; stored ones for
/// users and bots (a role deleted since the certificate was issued grants nothing).
pub(crate) async fn roles_of(state: &AuthState, identity: &Identity) -> Result<RoleSet, Status> {
    match identity.kind {
        IdentityKind::Builtin if identity.name == "admin" => Ok(RoleSet::new(vec![admin_role()])),
        IdentityKind::Node if identity.roles.iter().any(|r| r == "@proxy") => {
            Ok(RoleSet::new(vec![proxy_role()]))
        }
        IdentityKind::Node => Ok(RoleSet::new(vec![node_role()])),
        IdentityKind::User | IdentityKind::Bot => {
            let mut roles = Vec::with_capacity(identity.roles.len());
            for name in &identity.roles {
                if let Some(role) = state
                    .store
                    .get_role(name)
                    .await
                    .map_err(super::store_status)?
                {
                    roles.push(role);
                }
            }
            Ok(RoleSet::new(roles))
        }
        _ => Ok(RoleSet::default()),
    }
}

fn builtin_role(name: &str, rules: Vec<Rule>) -> Role {
    Role {
        kind: "role".into(),
        version: "v1".into(),
        metadata: Metadata {
            name: name.into(),
            ..Default::default()
        },
        spec: RoleSpec {
            allow: RoleConditions {
                rules,
                ..Default::default()
            },
            ..Default::default()
        },
    }
}

fn rule(resources: Vec<ResourceKind>, verbs: Vec<Verb>) -> Rule {
    Rule {
        resources,
        verbs,
        own: false,
    }
}

/// Built-in role for the admin identity written to the data dir for `gctl`.
fn admin_role() -> Role {
    builtin_role(
        "@admin",
        vec![rule(vec![ResourceKind::Any], vec![Verb::Any])],
    )
}

/// Built-in role for proxies: they batch their agents' heartbeats to Auth.
fn proxy_role() -> Role {
    builtin_role(
        "@proxy",
        vec![
            rule(
                vec![ResourceKind::Node],
                vec![Verb::Create, Verb::Update, Verb::List, Verb::Read],
            ),
            rule(vec![ResourceKind::Event], vec![Verb::Create]),
            rule(
                vec![ResourceKind::CertAuthority, ResourceKind::TrustedCluster],
                vec![Verb::Read],
            ),
            // Proxies end what a lock stops.
            rule(vec![ResourceKind::Lock], vec![Verb::List, Verb::Read]),
        ],
    )
}

/// Built-in role for agents (node identities).
fn node_role() -> Role {
    builtin_role(
        "@node",
        vec![
            rule(vec![ResourceKind::Node], vec![Verb::Create, Verb::Update]),
            rule(vec![ResourceKind::Event], vec![Verb::Create]),
            rule(
                vec![ResourceKind::CertAuthority, ResourceKind::TrustedCluster],
                vec![Verb::Read],
            ),
            // Agents upload the recordings of the sessions they serve (their own only: the
            // handler checks the recording names the calling host).
            rule(vec![ResourceKind::Session], vec![Verb::Create]),
            // Agents evaluate node access locally from the roles in user certificates, and end
            // what a lock stops.
            rule(
                vec![ResourceKind::Role, ResourceKind::Lock],
                vec![Verb::Read, Verb::List],
            ),
        ],
    )
}
