//! docs/openapi.yaml documents exactly the routes the workers serve: every
//! `routes()` of the command, query and health APIs is in the document, and
//! every operation of the document is served by one of them.

use std::collections::BTreeSet;
use std::time::Duration;

use seckill_workers::command::{CommandApi, CommandOptions};
use seckill_workers::http::{Api, HealthApi};
use seckill_workers::metrics::MetricsRegistry;
use seckill_workers::query::{QueryApi, QueryOptions};
use seckill_workers::redis_connection::RedisArgs;

const METHODS: [&str; 8] = [
    "get", "put", "post", "delete", "options", "head", "patch", "trace",
];

fn served_routes() -> BTreeSet<(String, String)> {
    // Connections are lazy: nothing is dialled to list routes.
    let redis = RedisArgs::for_url("redis://127.0.0.1:1/")
        .connect()
        .unwrap();
    let apis: Vec<Box<dyn Api>> = vec![
        Box::new(CommandApi::new(redis.clone(), CommandOptions::default())),
        Box::new(QueryApi::new(redis.clone(), QueryOptions::default())),
        Box::new(HealthApi::new(
            redis,
            Duration::from_secs(1),
            MetricsRegistry::new(),
        )),
    ];
    apis.iter()
        .flat_map(|a| a.routes())
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
