//! Trait templates in role values: `{{internal.logins}}` or `{{external.NAME}}`, with a literal
//! prefix and suffix, expanded from a user's traits. Parsed where roles are validated
//! (`resources`) and expanded where they are evaluated (`rbac`): a room of its own, so neither
//! imports the other.

use std::collections::BTreeMap;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TemplateError {
    #[error("unterminated template: missing `}}}}`")]
    Unterminated,
    #[error(
        "unknown template namespace in `{0}`; use {{{{internal.NAME}}}} or {{{{external.NAME}}}}"
    )]
    UnknownNamespace(String),
    #[error("only one template per value is supported")]
    TooMany,
}

/// A value that may contain one `{{internal.x}}` / `{{external.x}}` variable with a literal
/// prefix and suffix (`{{internal.logins}}-admin`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Template<'a> {
    Literal(&'a str),
    Trait {
        prefix: &'a str,
        name: &'a str,
        suffix: &'a str,
    },
}

pub fn parse_template(value: &str) -> Result<Template<'_>, TemplateError> {
    let Some(start) = value.find("{{") else {
        if value.contains("}}") {
            return Err(TemplateError::Unterminated);
        }
        return Ok(Template::Literal(value));
    };
    let (prefix, rest) = value.split_at(start);
    let rest = rest.get(2..).unwrap_or_default();
    let end = rest.find("}}").ok_or(TemplateError::Unterminated)?;
    let (var, suffix) = rest.split_at(end);
    let suffix = suffix.get(2..).unwrap_or_default();
    if suffix.contains("{{") || suffix.contains("}}") {
        return Err(TemplateError::TooMany);
    }
    let var = var.trim();
    let name = var
        .strip_prefix("internal.")
        .or_else(|| var.strip_prefix("external."))
        .filter(|n| {
            !n.is_empty()
                && n.chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        })
        .ok_or_else(|| TemplateError::UnknownNamespace(var.to_owned()))?;
    Ok(Template::Trait {
        prefix,
        name,
        suffix,
    })
}

/// Expand a (validated) template against a user's traits. A missing trait expands to nothing;
/// a malformed template expands to nothing too (roles are validated when stored).
pub fn expand(value: &str, traits: &BTreeMap<String, Vec<String>>) -> Vec<String> {
    match parse_template(value) {
        Ok(Template::Literal(s)) => vec![s.to_owned()],
        Ok(Template::Trait {
            prefix,
            name,
            suffix,
        }) => traits
            .get(name)
            .map(|vals| {
                vals.iter()
                    .filter(|v| !v.is_empty() && !v.contains("{{"))
                    .map(|v| format!("{prefix}{v}{suffix}"))
                    .collect()
            })
            .unwrap_or_default(),
        Err(_) => vec![],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn traits(logins: &[&str]) -> BTreeMap<String, Vec<String>> {
        BTreeMap::from([(
            "logins".to_string(),
            logins.iter().map(|l| l.to_string()).collect(),
        )])
    }

    #[test]
    fn templates() {
        let t = traits(&["alice", "root"]);
        assert_eq!(expand("{{internal.logins}}", &t), ["alice", "root"]);
        assert_eq!(
            expand("x-{{ external.logins }}-y", &t),
            ["x-alice-y", "x-root-y"]
        );
        assert_eq!(expand("{{internal.missing}}", &t), Vec::<String>::new());
        assert_eq!(expand("plain", &t), ["plain"]);
        assert_eq!(
            parse_template("{{foo.bar}}"),
            Err(TemplateError::UnknownNamespace("foo.bar".into()))
        );
        assert_eq!(
            parse_template("{{internal.a}}{{internal.b}}"),
            Err(TemplateError::TooMany)
        );
        assert_eq!(
            parse_template("{{internal.a"),
            Err(TemplateError::Unterminated)
        );
    }
}
