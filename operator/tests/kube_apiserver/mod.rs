//! What the tests and the benchmark that talk to a real kube-apiserver
//! share: the server's own count of requests, and a fleet of Promotions.
//! `tests/apiserver_fleet.rs` has it as `mod kube_apiserver;`,
//! `examples/fleet_bench.rs` by path; each uses part of it.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Child;
use std::time::{Duration, Instant};

use chrono::{DateTime, SubsecRound, Utc};
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::Namespace;
use kube::api::{ListParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Api, Client, Config, ResourceExt};
use seckill_operator::promotion::{Phase, Promotion, PromotionSpec};

/// A child process (etcd, kube-apiserver, the operator) killed and reaped
/// when dropped.
pub struct Process(pub Child);

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A client of the server `kubeconfig` names.
pub async fn client(kubeconfig: &Path) -> Client {
    let kubeconfig = Kubeconfig::read_from(kubeconfig).unwrap();
    let config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .unwrap();
    Client::try_from(config).unwrap()
}

/// Namespaces shop-0 to shop-`n - 1`.
pub async fn create_namespaces(client: &Client, n: usize) {
    let namespaces: Api<Namespace> = Api::all(client.clone());
    for i in 0..n {
        let ns: Namespace =
            serde_json::from_value(serde_json::json!({"metadata": {"name": format!("shop-{i}")}}))
                .unwrap();
        namespaces
            .create(&PostParams::default(), &ns)
            .await
            .unwrap();
    }
}

/// The phase a fleet promotion is in by its name: pending-N, active-N,
/// finished-N.
pub fn expected_phase(p: &Promotion) -> Phase {
    let name = p.name_any();
    if name.starts_with("pending") {
        Phase::Pending
    } else if name.starts_with("active") {
        Phase::Active
    } else {
        Phase::Finished
    }
}

pub fn phase_of(p: &Promotion) -> Option<Phase> {
    p.status.as_ref().and_then(|s| s.phase)
}

/// Polls the Promotions until `done` holds for the list (at most `limit`).
pub async fn wait_for(
    api: &Api<Promotion>,
    limit: Duration,
    what: &str,
    done: impl Fn(&[Promotion]) -> bool,
) -> Vec<Promotion> {
    let started = Instant::now();
    loop {
        let list = api.list(&ListParams::default()).await.unwrap().items;
        if done(&list) {
            return list;
        }
        assert!(started.elapsed() < limit, "not within {limit:?}: {what}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// `apiserver_request_total` summed by (group, resource, subresource, verb).
pub type Totals = BTreeMap<(String, String, String, String), f64>;

/// Reads `apiserver_request_total` from the server's /metrics.
pub async fn request_totals(client: &Client) -> Totals {
    let request = http::Request::get("/metrics").body(Vec::new()).unwrap();
    let text = client.request_text(request).await.unwrap();
    let mut totals = BTreeMap::new();
    for line in text.lines() {
        let Some((labels, value)) = line
            .strip_prefix("apiserver_request_total{")
            .and_then(|rest| rest.split_once("} "))
        else {
            continue;
        };
        let labels: BTreeMap<&str, &str> = labels
            .split(',')
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (k, v.trim_matches('"')))
            .collect();
        let key = ["group", "resource", "subresource", "verb"]
            .map(|k| labels.get(k).copied().unwrap_or_default().to_owned());
        *totals.entry(key.into()).or_insert(0.0) += value.trim().parse::<f64>().unwrap_or(0.0);
    }
    totals
}

/// Requests counted between two readings, of the (group, resource,
/// subresource, verb) that `keep` accepts.
pub fn delta(
    before: &Totals,
    after: &Totals,
    keep: impl Fn(&(String, String, String, String)) -> bool,
) -> f64 {
    after
        .iter()
        .filter(|(k, _)| keep(k))
        .map(|(k, n)| n - before.get(k).copied().unwrap_or(0.0))
        .sum()
}

/// A Promotion `ns/name` with whole-second times (as people write them, and
/// as `kubectl get` then prints them).
pub fn promotion(
    ns: &str,
    name: &str,
    publish: DateTime<Utc>,
    finish: DateTime<Utc>,
    coupons: u64,
) -> Promotion {
    let mut p = Promotion::new(
        name,
        PromotionSpec {
            publish_time: publish.trunc_subsecs(0),
            finish_time: finish.trunc_subsecs(0),
            number_of_coupons: coupons,
            discount: 0.25,
            description: None,
            shards: 1,
        },
    );
    p.metadata.namespace = Some(ns.into());
    p
}

/// `n` Promotions over `namespaces` namespaces (shop-0, ...): the first 30%
/// Pending (publishTime in an hour), the next 60% Active (opened a minute
/// ago, closing in an hour), the last 10% Finished (closed an hour ago);
/// named pending-I, active-I, finished-I.
pub fn fleet(n: usize, namespaces: usize, coupons: u64) -> Vec<Promotion> {
    let now = Utc::now();
    let hour = chrono::Duration::hours(1);
    let (pending, active) = (n * 3 / 10, n * 9 / 10);
    (0..n)
        .map(|i| {
            let ns = format!("shop-{}", i % namespaces);
            let (kind, publish, finish) = if i < pending {
                ("pending", now + hour, now + hour * 2)
            } else if i < active {
                ("active", now - chrono::Duration::minutes(1), now + hour)
            } else {
                ("finished", now - hour * 2, now - hour)
            };
            promotion(&ns, &format!("{kind}-{i}"), publish, finish, coupons)
        })
        .collect()
}

/// Creates `promotions`, sixteen at a time.
pub async fn create_all(client: &Client, promotions: &[Promotion]) {
    futures::stream::iter(promotions.iter().cloned())
        .map(|p| {
            let api: Api<Promotion> =
                Api::namespaced(client.clone(), p.metadata.namespace.as_deref().unwrap());
            async move { api.create(&PostParams::default(), &p).await.map(|_| ()) }
        })
        .buffer_unordered(16)
        .try_collect::<Vec<()>>()
        .await
        .expect("promotions created");
}
