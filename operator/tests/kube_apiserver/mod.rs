//! What the tests and the benchmark that talk to a real kube-apiserver
//! share: the control plane (etcd and kube-apiserver on loopback), the
//! server's own count of requests, and a fleet of Promotions.
//! `tests/apiserver_fleet.rs` and `tests/apiserver_shards.rs` have it as
//! `mod kube_apiserver;`,
//! `examples/fleet_bench.rs` by path; each uses part of it.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use chrono::{DateTime, SubsecRound, Utc};
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::Namespace;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{ListParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Api, Client, Config, ResourceExt};
use seckill_operator::crdgen;
use seckill_operator::promotion::{Phase, Promotion, PromotionSpec};
use seckill_workers::protocol::{self, CustomerId, GrabOutcome, PromotionId, ScriptError};
use seckill_workers::redis_connection::RedisConnection;
use seckill_workers::redis_server::free_port;

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

/// One grab in each of `busy` at once, all by customer `c<round>`: the
/// grabs a fleet's running sales get while the operator watches them.
/// Answers each grab's result, in `busy`'s order.
pub async fn grab_in_each(
    con: &RedisConnection,
    busy: &[PromotionId],
    round: u64,
) -> Vec<Result<GrabOutcome, ScriptError>> {
    let customer = CustomerId::parse(&format!("c{round}")).unwrap();
    let grabs = busy.iter().map(|id| {
        let (mut con, customer) = (con.clone(), customer.clone());
        async move { protocol::grab(&mut con, id, &customer).await }
    });
    futures::future::join_all(grabs).await
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

pub const TOKEN: &str = "seckill-test-token";

/// etcd and kube-apiserver on loopback, in a temporary directory.
pub struct ControlPlane {
    // Dropped in this order: the API server before its etcd.
    _apiserver: Process,
    _etcd: Process,
    pub dir: tempfile::TempDir,
    pub kubeconfig: PathBuf,
}

pub fn on_path(program: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|dir| dir.join(program).is_file()))
}

pub fn spawn_logged(command: &mut Command, log: &Path) -> Process {
    let file = std::fs::File::create(log).unwrap();
    Process(
        command
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {command:?}: {e}")),
    )
}

impl ControlPlane {
    /// Starts etcd and the API server, or says why the test is skipped.
    pub fn start() -> Result<Self, String> {
        let apiserver = std::env::var("SECKILL_KUBE_APISERVER")
            .ok()
            .filter(|s| !s.is_empty())
            .ok_or("SECKILL_KUBE_APISERVER is not set (the path of a kube-apiserver v1.26 binary, e.g. ../shared/kube/kube-apiserver)")?;
        if !Path::new(&apiserver).is_file() {
            return Err(format!("SECKILL_KUBE_APISERVER={apiserver} is not a file"));
        }
        if !on_path("etcd") {
            return Err("no etcd on PATH (apt-get install etcd-server)".into());
        }
        if !on_path("openssl") {
            return Err("no openssl on PATH (for the service-account key)".into());
        }
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let (client_port, peer_port, api_port) = (
            free_port().unwrap(),
            free_port().unwrap(),
            free_port().unwrap(),
        );
        let etcd = spawn_logged(
            Command::new("etcd")
                .arg("--data-dir")
                .arg(d.join("etcd"))
                .arg(format!(
                    "--listen-client-urls=http://127.0.0.1:{client_port}"
                ))
                .arg(format!(
                    "--advertise-client-urls=http://127.0.0.1:{client_port}"
                ))
                .arg(format!("--listen-peer-urls=http://127.0.0.1:{peer_port}"))
                .arg(format!(
                    "--initial-advertise-peer-urls=http://127.0.0.1:{peer_port}"
                ))
                .arg(format!(
                    "--initial-cluster=default=http://127.0.0.1:{peer_port}"
                )),
            &d.join("etcd.log"),
        );
        let key = d.join("sa.key");
        let made = Command::new("openssl")
            .args(["genrsa", "-out"])
            .arg(&key)
            .arg("2048")
            .stderr(Stdio::null())
            .status()
            .unwrap();
        assert!(made.success(), "openssl genrsa failed");
        std::fs::write(
            d.join("tokens.csv"),
            format!("{TOKEN},admin,admin,\"system:masters\"\n"),
        )
        .unwrap();
        let server = spawn_logged(
            Command::new(&apiserver)
                .arg(format!("--etcd-servers=http://127.0.0.1:{client_port}"))
                .arg(format!("--service-account-key-file={}", key.display()))
                .arg(format!(
                    "--service-account-signing-key-file={}",
                    key.display()
                ))
                .arg("--service-account-issuer=https://kubernetes.default.svc")
                .arg(format!(
                    "--token-auth-file={}",
                    d.join("tokens.csv").display()
                ))
                .arg("--authorization-mode=RBAC")
                .arg(format!("--secure-port={api_port}"))
                .arg("--bind-address=127.0.0.1")
                .arg(format!("--cert-dir={}", d.join("certs").display()))
                .arg("--service-cluster-ip-range=10.0.0.0/24")
                .arg("--disable-admission-plugins=ServiceAccount"),
            &d.join("apiserver.log"),
        );
        let kubeconfig = d.join("kubeconfig");
        std::fs::write(
            &kubeconfig,
            format!(
                "apiVersion: v1
kind: Config
clusters: [{{name: local, cluster: {{server: \"https://127.0.0.1:{api_port}\", insecure-skip-tls-verify: true}}}}]
users: [{{name: admin, user: {{token: {TOKEN}}}}}]
contexts: [{{name: local, context: {{cluster: local, user: admin, namespace: default}}}}]
current-context: local
"
            ),
        )
        .unwrap();
        Ok(Self {
            _apiserver: server,
            _etcd: etcd,
            dir,
            kubeconfig,
        })
    }

    pub async fn client(&self) -> Client {
        client(&self.kubeconfig).await
    }

    pub fn log_tail(&self) -> String {
        let log =
            std::fs::read_to_string(self.dir.path().join("apiserver.log")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(10)..].join("\n")
    }

    /// Starts the control plane, waits until it is ready and creates the
    /// Promotion CRD (a plain POST: 1.26 drops the CEL rule fields it does
    /// not know, where a server-side apply would be refused), then waits
    /// until Promotions are served. `None`, with the reason printed, when the
    /// test is skipped.
    pub async fn with_crd() -> Option<(Self, Client)> {
        let plane = match Self::start() {
            Ok(plane) => plane,
            Err(why) => {
                println!("skipped: {why}");
                return None;
            }
        };
        let client = plane.ready().await;
        let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
        crds.create(&PostParams::default(), &crdgen::crd())
            .await
            .unwrap();
        let promotions: Api<Promotion> = Api::all(client.clone());
        seckill_testkit::eventually(Duration::from_secs(60), || {
            let promotions = promotions.clone();
            async move { promotions.list(&ListParams::default().limit(1)).await }
        })
        .await;
        Some((plane, client))
    }

    /// Waits for /readyz (at most two minutes: a loaded 2-core machine).
    pub async fn ready(&self) -> Client {
        let client = self.client().await;
        let started = Instant::now();
        loop {
            let request = http::Request::get("/readyz").body(Vec::new()).unwrap();
            if let Ok(text) = client.request_text(request).await {
                if text.starts_with("ok") {
                    return client;
                }
            }
            assert!(
                started.elapsed() < Duration::from_secs(120),
                "kube-apiserver not ready within two minutes:\n{}",
                self.log_tail()
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
}
