//! Role evaluation: pure functions over roles, traits and labels. Nothing is allowed unless a
//! role allows it; deny rules always win; a login must come from the same role whose node labels
//! matched. Agents evaluate node access where the node is; Auth evaluates API rules.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use crate::resources::{ResourceKind, Role, RoleConditions, Verb};
use crate::template::expand;

/// Default and upper bound of a user certificate's TTL when no role says otherwise.
pub const DEFAULT_SESSION_TTL: Duration = Duration::from_secs(12 * 3600);
pub const DEFAULT_MAX_SESSION_TTL: Duration = Duration::from_secs(30 * 3600);

/// Why access was refused, in words a user can act on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("access denied: {0}")]
pub struct AccessDenied(pub String);

/// Certificate permissions derived from the roles (deny wins: any role setting `false` wins).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CertPermissions {
    pub permit_pty: bool,
    pub permit_port_forwarding: bool,
    pub permit_agent_forwarding: bool,
    pub permit_x11_forwarding: bool,
    /// Remote forwards may listen where the client asks, not only on loopback.
    pub remote_forward_any: bool,
    /// May watch live sessions (`gsh join`).
    pub join_sessions: bool,
}

/// The roles of one identity, ready to answer questions.
#[derive(Debug, Clone, Default)]
pub struct RoleSet {
    roles: Vec<Role>,
}

fn labels_match(
    selector: &BTreeMap<String, crate::resources::OneOrMany>,
    labels: &BTreeMap<String, String>,
) -> bool {
    if selector.is_empty() {
        return false;
    }
    selector.iter().all(|(key, wanted)| {
        let wanted = wanted.values();
        if key == "*" {
            return wanted.iter().any(|w| w == "*");
        }
        match labels.get(key) {
            Some(v) => wanted.iter().any(|w| w == "*" || w == v),
            None => false,
        }
    })
}

fn show_labels(labels: &BTreeMap<String, String>) -> String {
    if labels.is_empty() {
        return "none".into();
    }
    labels
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

fn rule_matches(cond: &RoleConditions, kind: ResourceKind, verb: Verb) -> bool {
    matching_rules(cond, kind, verb).next().is_some()
}

fn matching_rules(
    cond: &RoleConditions,
    kind: ResourceKind,
    verb: Verb,
) -> impl Iterator<Item = &crate::resources::Rule> {
    cond.rules.iter().filter(move |r| {
        r.resources
            .iter()
            .any(|k| *k == ResourceKind::Any || *k == kind)
            && r.verbs.iter().any(|v| *v == Verb::Any || *v == verb)
    })
}

/// How much of a kind an allowed verb reaches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    All,
    /// Only what the caller owns (a rule with `own = true`).
    Own,
}

impl RoleSet {
    pub fn new(roles: Vec<Role>) -> Self {
        Self { roles }
    }

    pub fn names(&self) -> Vec<String> {
        self.roles.iter().map(|r| r.metadata.name.clone()).collect()
    }

    /// May the holder do `verb` on `kind`? Deny rules in any role win over allow rules.
    pub fn check_access(&self, kind: ResourceKind, verb: Verb) -> Result<(), AccessDenied> {
        if let Some(role) = self
            .roles
            .iter()
            .find(|r| rule_matches(&r.spec.deny, kind, verb))
        {
            return Err(AccessDenied(format!(
                "role `{}` denies {verb} on {kind}",
                role.metadata.name
            )));
        }
        if self
            .roles
            .iter()
            .any(|r| rule_matches(&r.spec.allow, kind, verb))
        {
            return Ok(());
        }
        Err(AccessDenied(format!("no role allows {verb} on {kind}")))
    }

    /// Like [`RoleSet::check_access`], and how far the allowing rules reach: every resource
    /// of the kind, or only the caller's own (when every allowing rule says `own`).
    pub fn scope(&self, kind: ResourceKind, verb: Verb) -> Result<Scope, AccessDenied> {
        self.check_access(kind, verb)?;
        let all = self
            .roles
            .iter()
            .any(|r| matching_rules(&r.spec.allow, kind, verb).any(|rule| !rule.own));
        Ok(if all { Scope::All } else { Scope::Own })
    }

    /// The logins the roles allow (templates expanded), less any a role denies. Sorted.
    pub fn logins(&self, traits: &BTreeMap<String, Vec<String>>) -> Vec<String> {
        let denied: BTreeSet<String> = self
            .roles
            .iter()
            .flat_map(|r| r.spec.deny.logins.iter().flat_map(|l| expand(l, traits)))
            .collect();
        let allowed: BTreeSet<String> = self
            .roles
            .iter()
            .flat_map(|r| r.spec.allow.logins.iter().flat_map(|l| expand(l, traits)))
            .collect();
        allowed.difference(&denied).cloned().collect()
    }

    /// The shortest `max_session_ttl` of the roles (or the default cap).
    pub fn max_session_ttl(&self) -> Duration {
        self.roles
            .iter()
            .filter_map(|r| r.spec.options.max_session_ttl.map(|d| d.0))
            .min()
            .unwrap_or(DEFAULT_MAX_SESSION_TTL)
    }

    /// Whether any role requires a second factor at login (`require_mfa`).
    pub fn require_mfa(&self) -> bool {
        self.roles
            .iter()
            .any(|r| r.spec.options.require_mfa == Some(true))
    }

    pub fn cert_permissions(&self) -> CertPermissions {
        let all = |get: fn(&crate::resources::RoleOptions) -> Option<bool>, default: bool| {
            let mut any_set = false;
            for r in &self.roles {
                match get(&r.spec.options) {
                    Some(false) => return false,
                    Some(true) => any_set = true,
                    None => {}
                }
            }
            any_set || default
        };
        CertPermissions {
            permit_pty: all(|o| o.permit_pty, true),
            permit_port_forwarding: all(|o| o.permit_port_forwarding, true),
            permit_agent_forwarding: all(|o| o.permit_agent_forwarding, false),
            permit_x11_forwarding: all(|o| o.permit_x11_forwarding, false),
            remote_forward_any: all(
                |o| {
                    o.remote_forward_bind
                        .map(|b| b == crate::resources::RemoteForwardBind::Any)
                },
                false,
            ),
            join_sessions: all(|o| o.join_sessions, false),
        }
    }

    /// Whether a node with `labels` is one the holder may reach at all (some role's node labels
    /// match it, no deny role's do): what node listings show a user or a bot.
    pub fn node_visible(&self, labels: &BTreeMap<String, String>) -> bool {
        !self
            .roles
            .iter()
            .any(|r| labels_match(&r.spec.deny.node_labels, labels))
            && self
                .roles
                .iter()
                .any(|r| labels_match(&r.spec.allow.node_labels, labels))
    }

    /// Whether an app with `labels` is one the holder may reach: some role's app labels match
    /// it and no deny role's do. Listings show these apps.
    pub fn app_visible(&self, labels: &BTreeMap<String, String>) -> bool {
        self.check_app("", labels).is_ok()
    }

    /// May the holder open a session to the app `app` with `labels`? Deny wins.
    pub fn check_app(
        &self,
        app: &str,
        labels: &BTreeMap<String, String>,
    ) -> Result<(), AccessDenied> {
        let named = if app.is_empty() {
            String::from("this app")
        } else {
            format!("app `{app}`")
        };
        if let Some(role) = self
            .roles
            .iter()
            .find(|r| labels_match(&r.spec.deny.app_labels, labels))
        {
            return Err(AccessDenied(format!(
                "role `{}` denies {named} (labels {})",
                role.metadata.name,
                show_labels(labels)
            )));
        }
        if self
            .roles
            .iter()
            .any(|r| labels_match(&r.spec.allow.app_labels, labels))
        {
            return Ok(());
        }
        Err(AccessDenied(format!(
            "no role's app labels match {named} (labels {})",
            show_labels(labels)
        )))
    }

    /// May the holder log in as `login` on a node with `labels`? The login must be allowed by a
    /// role whose node labels match; a deny role whose labels match, or that denies the login,
    /// refuses.
    pub fn check_node_login(
        &self,
        traits: &BTreeMap<String, Vec<String>>,
        labels: &BTreeMap<String, String>,
        login: &str,
    ) -> Result<(), AccessDenied> {
        for role in &self.roles {
            let name = &role.metadata.name;
            if labels_match(&role.spec.deny.node_labels, labels) {
                return Err(AccessDenied(format!(
                    "role `{name}` denies access to nodes with these labels"
                )));
            }
            if role
                .spec
                .deny
                .logins
                .iter()
                .any(|l| expand(l, traits).iter().any(|x| x == login))
            {
                return Err(AccessDenied(format!(
                    "role `{name}` denies login `{login}`"
                )));
            }
        }
        let mut labels_matched = false;
        for role in &self.roles {
            if labels_match(&role.spec.allow.node_labels, labels) {
                labels_matched = true;
                if role
                    .spec
                    .allow
                    .logins
                    .iter()
                    .any(|l| expand(l, traits).iter().any(|x| x == login))
                {
                    return Ok(());
                }
            }
        }
        if labels_matched {
            Err(AccessDenied(format!(
                "login `{login}` is not allowed on this node by any role whose node labels match"
            )))
        } else {
            Err(AccessDenied("no role's node labels match this node".into()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resources::{Resource, parse_document, preset_roles};

    fn role(toml: &str) -> Role {
        match parse_document(toml).unwrap() {
            Resource::Role(r) => r,
            other => panic!("{other:?}"),
        }
    }

    fn traits(logins: &[&str]) -> BTreeMap<String, Vec<String>> {
        [(
            "logins".to_string(),
            logins.iter().map(|s| s.to_string()).collect(),
        )]
        .into()
    }

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn preset_access_editor_auditor() {
        let presets = preset_roles();
        let get = |n: &str| {
            presets
                .iter()
                .find(|r| r.metadata.name == n)
                .cloned()
                .unwrap()
        };
        let access = RoleSet::new(vec![get("access")]);
        assert_eq!(
            access.logins(&traits(&["alice", "root"])),
            ["alice", "root"]
        );
        assert!(
            access
                .check_access(ResourceKind::User, Verb::Create)
                .is_err()
        );
        let editor = RoleSet::new(vec![get("editor")]);
        assert!(
            editor
                .check_access(ResourceKind::User, Verb::Create)
                .is_ok()
        );
        assert!(
            editor
                .check_access(ResourceKind::Token, Verb::Delete)
                .is_ok()
        );
        assert!(
            editor
                .check_access(ResourceKind::Event, Verb::List)
                .is_err()
        );
        let auditor = RoleSet::new(vec![get("auditor")]);
        assert!(
            auditor
                .check_access(ResourceKind::Event, Verb::List)
                .is_ok()
        );
        assert!(
            auditor
                .check_access(ResourceKind::Role, Verb::Read)
                .is_err()
        );
    }

    #[test]
    fn deny_wins() {
        let allow_all = role(
            "kind='role'\n[metadata]\nname='all'\n[[spec.allow.rules]]\nresources=['*']\nverbs=['*']\n[spec.allow]\nlogins=['root','alice']\nnode_labels={'*'='*'}",
        );
        let deny = role(
            "kind='role'\n[metadata]\nname='no-users'\n[[spec.deny.rules]]\nresources=['user']\nverbs=['delete']\n[spec.deny]\nlogins=['root']",
        );
        let set = RoleSet::new(vec![allow_all, deny]);
        assert!(set.check_access(ResourceKind::User, Verb::Read).is_ok());
        let err = set
            .check_access(ResourceKind::User, Verb::Delete)
            .unwrap_err();
        assert!(err.0.contains("no-users"));
        assert_eq!(set.logins(&BTreeMap::new()), ["alice"]);
        assert!(
            set.check_node_login(&BTreeMap::new(), &labels(&[]), "root")
                .is_err()
        );
        assert!(
            set.check_node_login(&BTreeMap::new(), &labels(&[]), "alice")
                .is_ok()
        );
    }

    #[test]
    fn login_must_come_from_the_role_whose_labels_matched() {
        let prod = role(
            "kind='role'\n[metadata]\nname='prod'\n[spec.allow]\nlogins=['ops']\nnode_labels={env='prod'}",
        );
        let dev = role(
            "kind='role'\n[metadata]\nname='dev'\n[spec.allow]\nlogins=['dev']\nnode_labels={env=['dev','staging']}",
        );
        let set = RoleSet::new(vec![prod, dev]);
        let t = BTreeMap::new();
        assert!(
            set.check_node_login(&t, &labels(&[("env", "prod")]), "ops")
                .is_ok()
        );
        assert!(
            set.check_node_login(&t, &labels(&[("env", "staging")]), "dev")
                .is_ok()
        );
        // `dev` is allowed somewhere, but not by the role that matched a prod node.
        let err = set
            .check_node_login(&t, &labels(&[("env", "prod")]), "dev")
            .unwrap_err();
        assert!(err.0.contains("not allowed on this node"), "{err}");
        let err = set
            .check_node_login(&t, &labels(&[("env", "qa")]), "dev")
            .unwrap_err();
        assert!(err.0.contains("no role's node labels match"), "{err}");
    }

    #[test]
    fn deny_labels_refuse_the_node() {
        let all = role(
            "kind='role'\n[metadata]\nname='all'\n[spec.allow]\nlogins=['x']\nnode_labels={'*'='*'}",
        );
        let deny = role(
            "kind='role'\n[metadata]\nname='not-secret'\n[spec.deny]\nnode_labels={tier='secret'}",
        );
        let set = RoleSet::new(vec![all, deny]);
        let t = BTreeMap::new();
        assert!(
            set.check_node_login(&t, &labels(&[("tier", "web")]), "x")
                .is_ok()
        );
        assert!(
            set.check_node_login(&t, &labels(&[("tier", "secret")]), "x")
                .is_err()
        );
    }

    #[test]
    fn app_labels_allow_and_deny() {
        let dev = role(
            "kind='role'\n[metadata]\nname='dev-apps'\n[spec.allow]\napp_labels={env=['dev','staging']}",
        );
        let set = RoleSet::new(vec![dev.clone()]);
        assert!(set.check_app("grafana", &labels(&[("env", "dev")])).is_ok());
        let err = set
            .check_app("grafana", &labels(&[("env", "prod")]))
            .unwrap_err();
        assert!(
            err.0.contains("no role's app labels match app `grafana`"),
            "{err}"
        );
        assert!(err.0.contains("env=prod"), "{err}");
        // Node labels say nothing about apps, and an app without labels matches only `*`.
        let nodes = role("kind='role'\n[metadata]\nname='n'\n[spec.allow]\nnode_labels={'*'='*'}");
        assert!(
            RoleSet::new(vec![nodes])
                .check_app("a", &labels(&[]))
                .is_err()
        );
        let any = role("kind='role'\n[metadata]\nname='any'\n[spec.allow]\napp_labels={'*'='*'}");
        assert!(RoleSet::new(vec![any.clone()]).app_visible(&labels(&[])));
        // Deny wins over any allow.
        let deny =
            role("kind='role'\n[metadata]\nname='no-prod'\n[spec.deny]\napp_labels={env='prod'}");
        let set = RoleSet::new(vec![any, dev, deny]);
        let err = set
            .check_app("db", &labels(&[("env", "prod")]))
            .unwrap_err();
        assert!(err.0.contains("role `no-prod` denies app `db`"), "{err}");
        assert!(set.app_visible(&labels(&[("env", "dev")])));
        assert!(!set.app_visible(&labels(&[("env", "prod")])));
    }

    #[test]
    fn ttl_and_permissions() {
        let a = role(
            "kind='role'\n[metadata]\nname='a'\n[spec.options]\nmax_session_ttl='8h'\npermit_pty=false",
        );
        let b = role(
            "kind='role'\n[metadata]\nname='b'\n[spec.options]\nmax_session_ttl='1h'\npermit_agent_forwarding=true",
        );
        let set = RoleSet::new(vec![a, b]);
        assert_eq!(set.max_session_ttl(), Duration::from_secs(3600));
        let p = set.cert_permissions();
        assert!(
            !p.permit_pty
                && p.permit_port_forwarding
                && p.permit_agent_forwarding
                && !p.permit_x11_forwarding
        );
        assert_eq!(
            RoleSet::default().max_session_ttl(),
            DEFAULT_MAX_SESSION_TTL
        );
    }
}
