//! Dynamic resources: users, roles (and the documents that describe them), with parsing from TOML
//! or JSON files that names the offending field on error.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Kinds of resource that RBAC rules talk about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, PartialOrd, Ord)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum ResourceKind {
    User,
    Role,
    Token,
    Node,
    Event,
    CertAuthority,
    /// Session recordings (and live sessions to join).
    Session,
    /// Machine ID bots.
    Bot,
    /// Trust between clusters (a leaf's link to its root, a root's record of a leaf).
    TrustedCluster,
    /// Locks on users, bots, nodes and roles.
    Lock,
    #[serde(rename = "*")]
    Any,
}

impl ResourceKind {
    pub fn parse(s: &str) -> Option<Self> {
        serde_json::from_value(serde_json::Value::String(s.to_owned())).ok()
    }
    pub fn as_str(self) -> &'static str {
        match self {
            ResourceKind::User => "user",
            ResourceKind::Role => "role",
            ResourceKind::Token => "token",
            ResourceKind::Node => "node",
            ResourceKind::Event => "event",
            ResourceKind::CertAuthority => "cert_authority",
            ResourceKind::Session => "session",
            ResourceKind::Bot => "bot",
            ResourceKind::TrustedCluster => "trusted_cluster",
            ResourceKind::Lock => "lock",
            ResourceKind::Any => "*",
        }
    }
}

/// What a caller wants to do with a resource.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum Verb {
    List,
    Read,
    Create,
    Update,
    Delete,
    #[serde(rename = "*")]
    Any,
}

impl Verb {
    pub fn as_str(self) -> &'static str {
        match self {
            Verb::List => "list",
            Verb::Read => "read",
            Verb::Create => "create",
            Verb::Update => "update",
            Verb::Delete => "delete",
            Verb::Any => "*",
        }
    }
}

/// A duration written as `12h`, `30m`, `1h30m` in resource files.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HumanDuration(pub Duration);

impl Serialize for HumanDuration {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_duration(self.0).to_string())
    }
}

impl<'de> Deserialize<'de> for HumanDuration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        let dur = humantime::parse_duration(&s).map_err(|e| {
            serde::de::Error::custom(format!("invalid duration `{s}`: {e} (use e.g. 30m, 12h)"))
        })?;
        if dur.is_zero() {
            return Err(serde::de::Error::custom(
                "duration must be greater than zero",
            ));
        }
        Ok(HumanDuration(dur))
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Metadata {
    pub name: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub description: String,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
}

/// One value or a list of values (`env = "prod"` or `env = ["prod", "staging"]`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    pub fn values(&self) -> &[String] {
        match self {
            OneOrMany::One(s) => std::slice::from_ref(s),
            OneOrMany::Many(v) => v,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    pub resources: Vec<ResourceKind>,
    pub verbs: Vec<Verb>,
    /// In an allow rule: only what the caller owns (sessions they took part in). A deny rule
    /// denies everything it names whatever this says.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub own: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RoleConditions {
    /// OpenSSH logins; may hold templates such as `{{internal.logins}}`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub logins: Vec<String>,
    /// Label selector for nodes: every key must match; `"*" = "*"` matches every node.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_labels: BTreeMap<String, OneOrMany>,
    /// Label selector for TCP apps, matched like `node_labels` against the app's own labels.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub app_labels: BTreeMap<String, OneOrMany>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rules: Vec<Rule>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RoleOptions {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_session_ttl: Option<HumanDuration>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub permit_pty: Option<bool>,
    /// Port forwarding (`ssh -L`, `-R`, `-D`); also spelt `port_forwarding`.
    #[serde(
        default,
        alias = "port_forwarding",
        skip_serializing_if = "Option::is_none"
    )]
    pub permit_port_forwarding: Option<bool>,
    /// Agent forwarding (`ssh -A`), off unless a role turns it on; also spelt `forward_agent`.
    #[serde(
        default,
        alias = "forward_agent",
        skip_serializing_if = "Option::is_none"
    )]
    pub permit_agent_forwarding: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub permit_x11_forwarding: Option<bool>,
    /// Where a remote forward (`ssh -R`) listens on the node: `loopback` (the default) or the
    /// address the client asks for (`any`). Any role saying `loopback` wins.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remote_forward_bind: Option<RemoteForwardBind>,
    /// Watch other users' live sessions (`gsh join`), as far as the `session` rules reach.
    /// Off unless a role turns it on; any role saying false wins.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub join_sessions: Option<bool>,
    /// Logins of users with this role need a second factor (a TOTP code), whatever the
    /// cluster's `second_factor` says. Any role saying true wins.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub require_mfa: Option<bool>,
}

/// Where a remote forward may listen on the node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RemoteForwardBind {
    /// 127.0.0.1 only, whatever the client asks (OpenSSH's `GatewayPorts no`).
    Loopback,
    /// The address the client asks for (`GatewayPorts clientspecified`).
    Any,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RoleSpec {
    #[serde(default)]
    pub options: RoleOptions,
    #[serde(default)]
    pub allow: RoleConditions,
    #[serde(default)]
    pub deny: RoleConditions,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Role {
    pub kind: String,
    #[serde(default = "v1")]
    pub version: String,
    pub metadata: Metadata,
    #[serde(default)]
    pub spec: RoleSpec,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct UserSpec {
    #[serde(default)]
    pub roles: Vec<String>,
    /// Traits such as `logins`, used by role templates (`{{internal.logins}}`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub traits: BTreeMap<String, Vec<String>>,
}

/// A local user. The password hash is stored beside it and never appears in this document.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct User {
    pub kind: String,
    #[serde(default = "v1")]
    pub version: String,
    pub metadata: Metadata,
    #[serde(default)]
    pub spec: UserSpec,
}

fn v1() -> String {
    "v1".into()
}

/// A leaf's trust in a root cluster (`gctl create -f trusted_cluster.toml` on the leaf).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrustedClusterSpec {
    /// The root's proxy (`host:port`): the only address of the root the leaf needs to reach.
    pub proxy_addr: String,
    /// The root's `trusted_cluster` token: used once to establish trust, never stored.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub token: String,
    /// `sha256:…` of the root's X.509 CA.
    pub ca_pin: String,
    /// Which local roles the root's users get, by their roles.
    #[serde(default)]
    pub role_map: Vec<crate::role_map::RoleMapping>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrustedCluster {
    pub kind: String,
    #[serde(default = "v1")]
    pub version: String,
    /// `metadata.name` is the root cluster's name.
    pub metadata: Metadata,
    pub spec: TrustedClusterSpec,
}

/// A parsed resource document of any kind.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Resource {
    Role(Role),
    User(User),
    TrustedCluster(TrustedCluster),
}

impl Resource {
    pub fn kind(&self) -> ResourceKind {
        match self {
            Resource::Role(_) => ResourceKind::Role,
            Resource::User(_) => ResourceKind::User,
            Resource::TrustedCluster(_) => ResourceKind::TrustedCluster,
        }
    }
    pub fn name(&self) -> &str {
        match self {
            Resource::Role(r) => &r.metadata.name,
            Resource::User(u) => &u.metadata.name,
            Resource::TrustedCluster(t) => &t.metadata.name,
        }
    }
    pub fn to_json(&self) -> String {
        match self {
            Resource::Role(r) => serde_json::to_string(r),
            Resource::User(u) => serde_json::to_string(u),
            Resource::TrustedCluster(t) => serde_json::to_string(t),
        }
        .unwrap_or_default()
    }
}

/// Why a resource document was refused. `field` is the path of the offending field
/// (`spec.allow.rules[0].verbs[1]`), empty when the document as a whole is at fault.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ResourceError {
    #[error("syntax error: {0}")]
    Syntax(String),
    #[error("{field}: {message}")]
    Field { field: String, message: String },
}

impl ResourceError {
    pub fn field(field: impl Into<String>, message: impl Into<String>) -> Self {
        ResourceError::Field {
            field: field.into(),
            message: message.into(),
        }
    }
}

/// Parse a resource document, TOML or JSON (detected from the content), and validate it.
pub fn parse_document(text: &str) -> Result<Resource, ResourceError> {
    let value: serde_json::Value = if text.trim_start().starts_with('{') {
        serde_json::from_str(text).map_err(|e| ResourceError::Syntax(format!("JSON: {e}")))?
    } else {
        let table: toml::Table =
            toml::from_str(text).map_err(|e| ResourceError::Syntax(format!("TOML: {e}")))?;
        serde_json::to_value(table).map_err(|e| ResourceError::Syntax(e.to_string()))?
    };
    parse_value(value)
}

/// Validate a resource given as a JSON value.
pub fn parse_value(value: serde_json::Value) -> Result<Resource, ResourceError> {
    let kind = value
        .get("kind")
        .and_then(|k| k.as_str())
        .ok_or_else(|| {
            ResourceError::field(
                "kind",
                "missing; expected \"role\", \"user\" or \"trusted_cluster\"",
            )
        })?
        .to_owned();
    let resource = match kind.as_str() {
        "role" => Resource::Role(deserialize_at_path(value)?),
        "user" => Resource::User(deserialize_at_path(value)?),
        "trusted_cluster" => Resource::TrustedCluster(deserialize_at_path(value)?),
        other => {
            return Err(ResourceError::field(
                "kind",
                format!(
                    "unknown kind `{other}`; expected \"role\", \"user\" or \"trusted_cluster\""
                ),
            ));
        }
    };
    validate(&resource)?;
    Ok(resource)
}

fn deserialize_at_path<T: serde::de::DeserializeOwned>(
    value: serde_json::Value,
) -> Result<T, ResourceError> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        let field = if path == "." { String::new() } else { path };
        ResourceError::Field {
            field,
            message: e.into_inner().to_string(),
        }
    })
}

/// Names of users, roles and nodes: 1–128 of `[A-Za-z0-9._@-]`, not starting with `-`.
pub fn validate_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > 128 {
        return Err("must be 1 to 128 characters".into());
    }
    if name.starts_with('-') {
        return Err("must not start with '-'".into());
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '@')))
    {
        return Err(format!(
            "invalid character {c:?}; use letters, digits, '.', '_', '-', '@'"
        ));
    }
    Ok(())
}

/// Unix login names and login templates: no whitespace or control characters, not starting
/// with '-', at most 256 characters.
fn validate_login(login: &str) -> Result<(), String> {
    if login.is_empty() || login.len() > 256 {
        return Err("must be 1 to 256 characters".into());
    }
    if login.starts_with('-') {
        return Err("must not start with '-'".into());
    }
    if login
        .chars()
        .any(|c| c.is_whitespace() || c.is_control() || c == ',')
    {
        return Err("must not contain whitespace, control characters or ','".into());
    }
    crate::template::parse_template(login)
        .map(|_| ())
        .map_err(|e| e.to_string())
}

fn validate(resource: &Resource) -> Result<(), ResourceError> {
    match resource {
        Resource::Role(role) => {
            if role.kind != "role" {
                return Err(ResourceError::field("kind", "expected \"role\""));
            }
            check_version(&role.version)?;
            validate_name(&role.metadata.name)
                .map_err(|m| ResourceError::field("metadata.name", m))?;
            for (side, cond) in [("allow", &role.spec.allow), ("deny", &role.spec.deny)] {
                for (i, login) in cond.logins.iter().enumerate() {
                    validate_login(login)
                        .map_err(|m| ResourceError::field(format!("spec.{side}.logins[{i}]"), m))?;
                }
                for (field, selector) in [
                    ("node_labels", &cond.node_labels),
                    ("app_labels", &cond.app_labels),
                ] {
                    for (key, values) in selector {
                        if key.is_empty() || values.values().iter().any(String::is_empty) {
                            return Err(ResourceError::field(
                                format!("spec.{side}.{field}.{key}"),
                                "label keys and values must not be empty",
                            ));
                        }
                    }
                }
                for (i, rule) in cond.rules.iter().enumerate() {
                    if rule.resources.is_empty() {
                        return Err(ResourceError::field(
                            format!("spec.{side}.rules[{i}].resources"),
                            "must not be empty",
                        ));
                    }
                    if rule.verbs.is_empty() {
                        return Err(ResourceError::field(
                            format!("spec.{side}.rules[{i}].verbs"),
                            "must not be empty",
                        ));
                    }
                    if rule.own && rule.resources.iter().any(|k| *k != ResourceKind::Session) {
                        return Err(ResourceError::field(
                            format!("spec.{side}.rules[{i}].own"),
                            "only sessions have owners: use it with resources = [\"session\"]",
                        ));
                    }
                }
            }
            Ok(())
        }
        Resource::User(user) => {
            if user.kind != "user" {
                return Err(ResourceError::field("kind", "expected \"user\""));
            }
            check_version(&user.version)?;
            validate_name(&user.metadata.name)
                .map_err(|m| ResourceError::field("metadata.name", m))?;
            for (i, role) in user.spec.roles.iter().enumerate() {
                validate_name(role)
                    .map_err(|m| ResourceError::field(format!("spec.roles[{i}]"), m))?;
            }
            for (key, values) in &user.spec.traits {
                for (i, v) in values.iter().enumerate() {
                    if key == "logins" {
                        validate_login(v).map_err(|m| {
                            ResourceError::field(format!("spec.traits.logins[{i}]"), m)
                        })?;
                        if v.contains("{{") {
                            return Err(ResourceError::field(
                                format!("spec.traits.logins[{i}]"),
                                "templates are not allowed in traits",
                            ));
                        }
                    }
                }
            }
            Ok(())
        }
        Resource::TrustedCluster(t) => {
            check_version(&t.version)?;
            validate_name(&t.metadata.name)
                .map_err(|m| ResourceError::field("metadata.name", m))?;
            let addr_ok = t
                .spec
                .proxy_addr
                .rsplit_once(':')
                .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok());
            if !addr_ok || t.spec.proxy_addr.len() > 255 {
                return Err(ResourceError::field(
                    "spec.proxy_addr",
                    "the root's proxy as host:port",
                ));
            }
            let pin_ok = t
                .spec
                .ca_pin
                .strip_prefix("sha256:")
                .is_some_and(|h| h.len() == 64 && h.chars().all(|c| c.is_ascii_hexdigit()));
            if !pin_ok {
                return Err(ResourceError::field(
                    "spec.ca_pin",
                    "sha256: and 64 hex digits (printed by the root's Auth at start, or `gctl status`)",
                ));
            }
            if t.spec.token.len() > 256 {
                return Err(ResourceError::field("spec.token", "at most 256 characters"));
            }
            crate::role_map::RoleMap::compile(&t.spec.role_map)
                .map_err(|e| ResourceError::field("spec", e.to_string()))?;
            Ok(())
        }
    }
}

fn check_version(v: &str) -> Result<(), ResourceError> {
    if v != "v1" {
        return Err(ResourceError::field(
            "version",
            format!("unsupported version `{v}`; expected \"v1\""),
        ));
    }
    Ok(())
}

impl fmt::Display for ResourceKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Display for Verb {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The preset roles every cluster starts with.
pub fn preset_roles() -> Vec<Role> {
    let all = |name: &str, description: &str, spec: RoleSpec| Role {
        kind: "role".into(),
        version: v1(),
        metadata: Metadata {
            name: name.into(),
            description: description.into(),
            labels: BTreeMap::new(),
        },
        spec,
    };
    let rule = |resources: &[ResourceKind], verbs: &[Verb]| Rule {
        resources: resources.to_vec(),
        verbs: verbs.to_vec(),
        own: false,
    };
    let own = |resources: &[ResourceKind], verbs: &[Verb]| Rule {
        resources: resources.to_vec(),
        verbs: verbs.to_vec(),
        own: true,
    };
    use ResourceKind as K;
    use Verb as V;
    vec![
        all(
            "access",
            "The user's own logins on every node",
            RoleSpec {
                options: RoleOptions::default(),
                allow: RoleConditions {
                    logins: vec!["{{internal.logins}}".into()],
                    node_labels: [("*".to_string(), OneOrMany::One("*".into()))].into(),
                    app_labels: [("*".to_string(), OneOrMany::One("*".into()))].into(),
                    rules: vec![
                        rule(&[K::Node, K::CertAuthority], &[V::List, V::Read]),
                        own(&[K::Session], &[V::List, V::Read]),
                    ],
                },
                deny: RoleConditions::default(),
            },
        ),
        all(
            "editor",
            "Manage users, roles, join tokens, bots and locks",
            RoleSpec {
                options: RoleOptions::default(),
                allow: RoleConditions {
                    logins: vec![],
                    node_labels: BTreeMap::new(),
                    app_labels: BTreeMap::new(),
                    rules: vec![
                        rule(&[K::User, K::Role, K::Token, K::Bot, K::Lock], &[V::Any]),
                        rule(&[K::Node, K::CertAuthority], &[V::List, V::Read]),
                    ],
                },
                deny: RoleConditions::default(),
            },
        ),
        all(
            "auditor",
            "Read the audit log and every session recording; watch live sessions",
            RoleSpec {
                options: RoleOptions {
                    join_sessions: Some(true),
                    ..RoleOptions::default()
                },
                allow: RoleConditions {
                    logins: vec![],
                    node_labels: BTreeMap::new(),
                    app_labels: BTreeMap::new(),
                    rules: vec![rule(&[K::Event, K::Session], &[V::List, V::Read])],
                },
                deny: RoleConditions::default(),
            },
        ),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
kind = "role"
[metadata]
name = "dev"
[spec.options]
max_session_ttl = "8h"
[spec.allow]
logins = ["{{internal.logins}}", "dev"]
node_labels = { env = ["staging", "dev"], team = "core" }
[[spec.allow.rules]]
resources = ["node"]
verbs = ["list", "read"]
"#;

    #[test]
    fn parses_toml_role() {
        let Resource::Role(role) = parse_document(GOOD).unwrap() else {
            panic!("not a role")
        };
        assert_eq!(role.metadata.name, "dev");
        assert_eq!(
            role.spec.options.max_session_ttl,
            Some(HumanDuration(Duration::from_secs(8 * 3600)))
        );
        assert_eq!(
            role.spec.allow.node_labels["env"].values(),
            ["staging", "dev"]
        );
    }

    #[test]
    fn json_and_toml_agree() {
        let toml_role = parse_document(GOOD).unwrap();
        let json = toml_role.to_json();
        assert_eq!(parse_document(&json).unwrap(), toml_role);
    }

    #[test]
    fn errors_name_the_field() {
        let bad_verb = GOOD.replace("\"read\"]", "\"reed\"]");
        let err = parse_document(&bad_verb).unwrap_err();
        assert!(
            matches!(&err, ResourceError::Field { field, .. } if field == "spec.allow.rules[0].verbs[1]"),
            "{err}"
        );

        let unknown_field = GOOD.replace("logins =", "logns =");
        let err = parse_document(&unknown_field).unwrap_err();
        assert!(
            err.to_string().contains("spec.allow") && err.to_string().contains("logns"),
            "{err}"
        );

        let bad_ttl = GOOD.replace("\"8h\"", "\"eight hours\"");
        let err = parse_document(&bad_ttl).unwrap_err();
        assert!(
            matches!(&err, ResourceError::Field { field, .. } if field == "spec.options.max_session_ttl"),
            "{err}"
        );

        let bad_template = GOOD.replace("{{internal.logins}}", "{{internal.logins");
        let err = parse_document(&bad_template).unwrap_err();
        assert!(
            matches!(&err, ResourceError::Field { field, .. } if field == "spec.allow.logins[0]"),
            "{err}"
        );

        let bad_name = GOOD.replace("name = \"dev\"", "name = \"d v\"");
        let err = parse_document(&bad_name).unwrap_err();
        assert!(
            matches!(&err, ResourceError::Field { field, .. } if field == "metadata.name"),
            "{err}"
        );

        assert!(matches!(
            parse_document("kind = \"role\"\n[metadata"),
            Err(ResourceError::Syntax(_))
        ));
        assert!(
            matches!(parse_document("kind = \"nope\""), Err(ResourceError::Field { field, .. }) if field == "kind")
        );
    }

    #[test]
    fn presets_are_valid() {
        for role in preset_roles() {
            parse_value(serde_json::to_value(&role).unwrap()).unwrap();
        }
    }
}
