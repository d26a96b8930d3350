//! docs/openapi.yaml documents exactly the routes the workers serve: every
//! route of the route table, with the command, query and health APIs all
//! mounted, is in the document, and every operation of the document is
//! served by one of them.

use std::collections::BTreeSet;
use std::sync::LazyLock;
use std::time::Duration;

use clap::Parser;
use seckill_workers::command::{CommandApi, CommandArgs};
use seckill_workers::http::{Apis, HealthApi};
use seckill_workers::metrics::MetricsRegistry;
use seckill_workers::query::{QueryApi, QueryArgs};
use seckill_workers::redis_connection::RedisArgs;

const METHODS: [&str; 8] = [
    "get", "put", "post", "delete", "options", "head", "patch", "trace",
];

/// The flags of each role, parsed as its binary parses them (defaults from clap).
#[derive(Parser)]
struct CommandRole {
    #[command(flatten)]
    command: CommandArgs,
}

#[derive(Parser)]
struct QueryRole {
    #[command(flatten)]
    query: QueryArgs,
}

fn served_routes() -> BTreeSet<(String, String)> {
    let url = "redis://127.0.0.1:1/";
    let command = CommandRole::parse_from(["command", "--redis-url", url]).command;
    let query = QueryRole::parse_from(["query", "--redis-url", url]).query;
    // Connections are lazy: nothing is dialled to list routes.
    let redis = RedisArgs::for_url(url).connect().unwrap();
    let apis = Apis {
        command: Some(CommandApi::new(redis.clone(), command.options().unwrap())),
        query: Some(QueryApi::new(redis.clone(), query.options())),
        health: HealthApi::new(redis, Duration::from_secs(1), MetricsRegistry::new()),
    };
    apis.routes()
        .into_iter()
        .map(|(m, p)| (m.as_str().to_ascii_lowercase(), p.to_owned()))
        .collect()
}

fn documented_routes() -> BTreeSet<(String, String)> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/openapi.yaml");
    let text = std::fs::read_to_string(path).expect("docs/openapi.yaml is readable");
    let doc: serde_yaml::Value = serde_yaml::from_str(&text).expect("docs/openapi.yaml is YAML");
    assert!(
        doc["openapi"]
            .as_str()
            .is_some_and(|v| v.starts_with("3.0")),
        "an OpenAPI 3.0 document"
    );
    let paths = doc["paths"].as_mapping().expect("a paths object");
    let mut out = BTreeSet::new();
    for (route, item) in paths {
        let route = route.as_str().expect("path keys are strings");
        let item = item.as_mapping().expect("path items are objects");
        for (method, _) in item {
            let method = method.as_str().unwrap_or_default();
            if METHODS.contains(&method) {
                out.insert((method.to_owned(), route.to_owned()));
            }
        }
    }
    out
}

#[tokio::test]
async fn every_served_route_is_documented_and_every_documented_route_is_served() {
    let served = served_routes();
    let documented = documented_routes();
    let undocumented: Vec<_> = served.difference(&documented).collect();
    let unserved: Vec<_> = documented.difference(&served).collect();
    assert!(
        undocumented.is_empty() && unserved.is_empty(),
        "served but not in docs/openapi.yaml: {undocumented:?}; documented but not served: {unserved:?}"
    );
    assert!(served.len() >= 7, "{served:?}");
}

/// A string parameter's constraints as docs/openapi.yaml states them.
struct Documented {
    pattern: regex::Regex,
    min: usize,
    max: usize,
}

impl Documented {
    /// The schema of `components/<section>/<name>` (a parameter's `schema`,
    /// or the schema itself).
    fn of(section: &str, name: &str) -> Self {
        static DOC: LazyLock<serde_yaml::Value> = LazyLock::new(|| {
            let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/openapi.yaml");
            let text = std::fs::read_to_string(path).expect("docs/openapi.yaml is readable");
            serde_yaml::from_str(&text).expect("docs/openapi.yaml is YAML")
        });
        let item = &DOC["components"][section][name];
        let schema = if section == "parameters" {
            &item["schema"]
        } else {
            item
        };
        let field = |key: &str| {
            schema[key]
                .as_u64()
                .unwrap_or_else(|| panic!("{section}/{name} has no {key}")) as usize
        };
        let pattern = schema["pattern"]
            .as_str()
            .unwrap_or_else(|| panic!("{section}/{name} has no pattern"));
        Self {
            pattern: regex::Regex::new(pattern).expect("the pattern is a regular expression"),
            min: field("minLength"),
            max: field("maxLength"),
        }
    }

    /// Whether a value is valid per the document (lengths in characters, as
    /// JSON Schema counts them).
    fn accepts(&self, value: &str) -> bool {
        let len = value.chars().count();
        self.min <= len && len <= self.max && self.pattern.is_match(value)
    }
}

mod documented_ids {
    use super::Documented;
    use proptest::prelude::*;
    use seckill_workers::protocol::{CustomerId, PromotionId};

    fn namespace_ok(s: &str) -> bool {
        PromotionId::new(s, "x").is_ok()
    }

    fn name_ok(s: &str) -> bool {
        PromotionId::new("x", s).is_ok()
    }

    #[test]
    fn the_documented_patterns_draw_the_server_s_lines_at_the_label_and_length_limits() {
        let namespace = Documented::of("parameters", "Namespace");
        let name = Documented::of("parameters", "Name");
        let customer = Documented::of("schemas", "CustomerId");
        let label = |n: usize| "a".repeat(n);
        // The longest subdomain: three 63-character labels and one of 61.
        let longest = [label(63), label(63), label(63), label(61)].join(".");
        assert_eq!(longest.len(), 253);
        let cases: Vec<(String, bool, bool)> = vec![
            // (value, valid namespace, valid name)
            (label(63), true, true),
            (label(64), false, false),
            ("0".repeat(252), false, false),
            (longest.clone(), false, true),
            (format!("{longest}a"), false, false),
            (format!("{}.{}", label(63), label(64)), false, false),
            ("a.b".into(), false, true),
            ("-a".into(), false, false),
            ("a-".into(), false, false),
            ("a..b".into(), false, false),
            (".a".into(), false, false),
            ("A".into(), false, false),
            ("".into(), false, false),
            ("a\n".into(), false, false),
        ];
        for (value, ns_valid, name_valid) in cases {
            assert_eq!(
                namespace_ok(&value),
                ns_valid,
                "server, namespace {value:?}"
            );
            assert_eq!(
                namespace.accepts(&value),
                ns_valid,
                "document, namespace {value:?}"
            );
            assert_eq!(name_ok(&value), name_valid, "server, name {value:?}");
            assert_eq!(name.accepts(&value), name_valid, "document, name {value:?}");
        }
        for (value, valid) in [
            ("a".repeat(64), true),
            ("a".repeat(65), false),
            ("alice.smith_01:x@shop-1".into(), true),
            ("a b".into(), false),
            ("a\n".into(), false),
            ("é".into(), false),
        ] {
            assert_eq!(CustomerId::parse(&value).is_ok(), valid, "server {value:?}");
            assert_eq!(customer.accepts(&value), valid, "document {value:?}");
        }
    }

    proptest! {
        #[test]
        fn the_documented_promotion_id_patterns_accept_exactly_what_the_server_accepts(
            value in prop_oneof![
                "([a-z0-9-]{0,66}\\.){0,4}[a-z0-9-]{0,66}",
                "[a-z0-9.A_:{}/ -]{0,260}",
            ],
        ) {
            let namespace = Documented::of("parameters", "Namespace");
            let name = Documented::of("parameters", "Name");
            prop_assert_eq!(namespace.accepts(&value), namespace_ok(&value), "namespace {:?}", value);
            prop_assert_eq!(name.accepts(&value), name_ok(&value), "name {:?}", value);
        }

        #[test]
        fn the_documented_customer_id_pattern_accepts_exactly_what_the_server_accepts(
            value in "\\PC{0,70}|[A-Za-z0-9._:@-]{0,70}",
        ) {
            let customer = Documented::of("schemas", "CustomerId");
            prop_assert_eq!(customer.accepts(&value), CustomerId::parse(&value).is_ok(), "{:?}", value);
        }
    }
}
