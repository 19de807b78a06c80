//! A trusted cluster's role map: which local roles a user of the other cluster gets for the
//! roles their certificate names. Pure: entries are compiled once (an invalid one is named),
//! then roles in, roles out.
//!
//! `remote` is an exact role name, `*` (any role), or an anchored regular expression
//! (`^admin-(.*)$`) whose captures `local` may use (`$1`, `${name}`). Every entry that matches a
//! remote role adds its local roles; the result is sorted and without duplicates.

use serde::{Deserialize, Serialize};

/// One entry, as written in a `trusted_cluster` resource.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoleMapping {
    pub remote: String,
    pub local: Vec<String>,
}

/// Why a role map cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RoleMapError {
    #[error("role_map[{index}].remote `{remote}`: {reason}")]
    Remote {
        index: usize,
        remote: String,
        reason: String,
    },
    #[error("role_map[{index}].local: {reason}")]
    Local { index: usize, reason: String },
}

#[derive(Debug, Clone)]
enum Matcher {
    Exact(String),
    Any,
    Pattern(regex::Regex),
}

/// A compiled role map.
#[derive(Debug, Clone)]
pub struct RoleMap {
    entries: Vec<(Matcher, Vec<String>)>,
}

/// Patterns are small; bound what one may cost to compile.
const MAX_PATTERN: usize = 1024;

impl RoleMap {
    pub fn compile(mappings: &[RoleMapping]) -> Result<Self, RoleMapError> {
        let mut entries = Vec::with_capacity(mappings.len());
        for (index, m) in mappings.iter().enumerate() {
            let remote_err = |reason: String| RoleMapError::Remote {
                index,
                remote: m.remote.clone(),
                reason,
            };
            let matcher = if m.remote == "*" {
                Matcher::Any
            } else if m.remote.starts_with('^') || m.remote.ends_with('$') {
                if !(m.remote.starts_with('^') && m.remote.ends_with('$')) {
                    return Err(remote_err(
                        "a regular expression is anchored at both ends (^…$)".into(),
                    ));
                }
                if m.remote.len() > MAX_PATTERN {
                    return Err(remote_err(format!("longer than {MAX_PATTERN} bytes")));
                }
                let re = regex::RegexBuilder::new(&m.remote)
                    .size_limit(1 << 20)
                    .build()
                    .map_err(|e| {
                        remote_err(format!(
                            "invalid regular expression: {}",
                            e.to_string().lines().last().unwrap_or_default().trim()
                        ))
                    })?;
                Matcher::Pattern(re)
            } else {
                crate::resources::validate_name(&m.remote).map_err(remote_err)?;
                Matcher::Exact(m.remote.clone())
            };
            if m.local.is_empty() {
                return Err(RoleMapError::Local {
                    index,
                    reason: "name at least one local role".into(),
                });
            }
            for l in &m.local {
                let fixed = !l.contains('$');
                if l.is_empty() || (fixed && crate::resources::validate_name(l).is_err()) {
                    return Err(RoleMapError::Local {
                        index,
                        reason: format!("`{l}` is not a role name"),
                    });
                }
                if !fixed && !matches!(matcher, Matcher::Pattern(_)) {
                    return Err(RoleMapError::Local {
                        index,
                        reason: format!(
                            "`{l}` uses a capture, but `{}` is not a regular expression",
                            m.remote
                        ),
                    });
                }
            }
            entries.push((matcher, m.local.clone()));
        }
        Ok(Self { entries })
    }

    /// The local roles for `remote_roles`: sorted, without duplicates; names a capture made
    /// invalid (empty, or not a role name) are dropped.
    pub fn map(&self, remote_roles: &[String]) -> Vec<String> {
        let mut out = Vec::new();
        for remote in remote_roles {
            for (matcher, locals) in &self.entries {
                match matcher {
                    Matcher::Exact(name) if name == remote => out.extend(locals.iter().cloned()),
                    Matcher::Any => out.extend(locals.iter().cloned()),
                    Matcher::Pattern(re) => {
                        if let Some(caps) = re.captures(remote) {
                            for l in locals {
                                let mut expanded = String::new();
                                caps.expand(l, &mut expanded);
                                if crate::resources::validate_name(&expanded).is_ok() {
                                    out.push(expanded);
                                }
                            }
                        }
                    }
                    Matcher::Exact(_) => {}
                }
            }
        }
        out.sort();
        out.dedup();
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(remote: &str, local: &[&str]) -> RoleMapping {
        RoleMapping {
            remote: remote.into(),
            local: local.iter().map(|s| (*s).into()).collect(),
        }
    }

    fn roles(r: &[&str]) -> Vec<String> {
        r.iter().map(|s| (*s).into()).collect()
    }

    #[test]
    fn exact_names_patterns_with_captures_and_wildcards() {
        let map = RoleMap::compile(&[
            m("access", &["access"]),
            m("^admin-(.*)$", &["$1", "auditor"]),
            m("^team-(?P<team>[a-z]+)-dev$", &["dev-${team}"]),
        ])
        .unwrap();
        assert_eq!(map.map(&roles(&["access"])), ["access"]);
        assert_eq!(map.map(&roles(&["admin-editor"])), ["auditor", "editor"]);
        assert_eq!(
            map.map(&roles(&["team-web-dev", "access"])),
            ["access", "dev-web"]
        );
        assert!(map.map(&roles(&["editor", "xadmin-editor"])).is_empty());
        // A capture that makes no role name (empty) adds nothing.
        assert_eq!(map.map(&roles(&["admin-"])), ["auditor"]);
        let any = RoleMap::compile(&[m("*", &["guest"])]).unwrap();
        assert_eq!(any.map(&roles(&["whatever"])), ["guest"]);
        assert!(any.map(&[]).is_empty());
    }

    #[test]
    fn invalid_entries_are_named() {
        let e =
            RoleMap::compile(&[m("access", &["access"]), m("^admin-(.*$", &["$1"])]).unwrap_err();
        let text = e.to_string();
        assert!(
            text.starts_with("role_map[1].remote `^admin-(.*$`: invalid regular expression"),
            "{text}"
        );
        assert!(
            RoleMap::compile(&[m("^admin", &["x"])])
                .unwrap_err()
                .to_string()
                .contains("anchored")
        );
        assert!(
            RoleMap::compile(&[m("access", &[])])
                .unwrap_err()
                .to_string()
                .contains("role_map[0].local")
        );
        assert!(
            RoleMap::compile(&[m("access", &["$1"])])
                .unwrap_err()
                .to_string()
                .contains("capture")
        );
        assert!(RoleMap::compile(&[m("bad name!", &["x"])]).is_err());
        assert!(RoleMap::compile(&[m("x", &["bad name!"])]).is_err());
    }

    proptest::proptest! {
        /// Any pattern text compiles or is refused; any roles map without a panic, and every
        /// role out is a valid name.
        #[test]
        fn never_panics(remote in ".{0,40}", local in "[a-z$0-9{}]{0,12}", role in ".{0,30}") {
            if let Ok(map) = RoleMap::compile(&[m(&remote, &[&local])]) {
                for r in map.map(&[role]) {
                    proptest::prop_assert!(crate::resources::validate_name(&r).is_ok());
                }
            }
        }
    }
}
