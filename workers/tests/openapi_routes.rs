//! docs/openapi.yaml documents exactly the routes the workers serve: every
//! route of the route table, with the command, query and health APIs all
//! mounted, is in the document, and every operation of the document is
//! served by one of them.

use std::collections::BTreeSet;
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
