//! Property tests (run in CI) for everything that parses bytes or text a peer or user sent:
//! arbitrary input yields a value or an error, never a panic.

// Test code: a failing unwrap or panic is a failing test, which is the point.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use gatehouse_controlplane::identity::Identity;
use gatehouse_controlplane::resources::{parse_document, parse_value};
use gatehouse_controlplane::template::{expand, parse_template};
use proptest::prelude::*;

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn identity_from_arbitrary_der(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
        let _ = Identity::from_cert_der(&bytes);
    }

    #[test]
    fn resource_documents_from_arbitrary_text(text in "\\PC{0,400}") {
        let _ = parse_document(&text);
    }

    #[test]
    fn resource_documents_from_near_valid_toml(
        name in "[a-z\\- ]{0,12}",
        verb in "[a-z*]{0,8}",
        ttl in "[0-9a-z ]{0,6}",
        login in "[{}a-z._ ]{0,24}",
    ) {
        let doc = format!(
            "kind = \"role\"\n[metadata]\nname = \"{name}\"\n[spec.options]\nmax_session_ttl = \"{ttl}\"\n[spec.allow]\nlogins = [\"{login}\"]\n[[spec.allow.rules]]\nresources = [\"user\"]\nverbs = [\"{verb}\"]\n"
        );
        let _ = parse_document(&doc);
    }

    #[test]
    fn resource_values_from_arbitrary_json(v in arb_json()) {
        let _ = parse_value(v);
    }

    #[test]
    fn templates_from_arbitrary_text(text in "\\PC{0,64}", t in "\\PC{0,16}") {
        let _ = parse_template(&text);
        let traits = [("logins".to_string(), vec![t])].into();
        let _ = expand(&text, &traits);
    }
}

fn arb_json() -> impl Strategy<Value = serde_json::Value> {
    let leaf = prop_oneof![
        Just(serde_json::Value::Null),
        any::<bool>().prop_map(serde_json::Value::Bool),
        any::<i64>().prop_map(|n| serde_json::json!(n)),
        prop_oneof![
            Just("role".to_string()),
            Just("user".to_string()),
            "\\PC{0,12}"
        ]
        .prop_map(serde_json::Value::String),
    ];
    leaf.prop_recursive(4, 64, 8, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..6).prop_map(serde_json::Value::Array),
            proptest::collection::btree_map(
                prop_oneof![
                    Just("kind".to_string()),
                    Just("metadata".to_string()),
                    Just("name".to_string()),
                    Just("spec".to_string()),
                    Just("allow".to_string()),
                    Just("logins".to_string()),
                    Just("roles".to_string()),
                    "[a-z_]{1,8}"
                ],
                inner,
                0..6
            )
            .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
        ]
    })
}
