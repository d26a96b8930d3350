//! `seckill up` and `seckill load` as a user runs them: real binaries, a real
//! redis-server, manifest files on disk. Each sale window is set once
//! `seckill up` reports ready, relative to that moment.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use chrono::{DateTime, Utc};
use seckill_testkit::eventually;
use seckill_testkit::process::{binary, SECKILL};
use seckill_testkit::redis::{connect, redis};
use seckill_testkit::up::Up;
use seckill_workers::protocol::{self, PromotionId};
use serde_json::Value;

/// Bounds every wait for something that must happen.
const WITHIN: Duration = Duration::from_secs(60);

/// A Promotion manifest.
fn manifest_at(
    namespace: &str,
    name: &str,
    publish: DateTime<Utc>,
    finish: DateTime<Utc>,
    coupons: u64,
    discount: f64,
) -> String {
    format!(
        "apiVersion: seckill.io/v1\nkind: Promotion\nmetadata:\n  name: {name}\n  namespace: {namespace}\nspec:\n  publishTime: \"{}\"\n  finishTime: \"{}\"\n  numberOfCoupons: {coupons}\n  discount: {discount}\n",
        publish.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        finish.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
    )
}

/// A manifest opening `opens_in_secs` from now, for ten minutes.
fn manifest(
    namespace: &str,
    name: &str,
    opens_in_secs: i64,
    coupons: u64,
    discount: f64,
) -> String {
    let publish = Utc::now() + chrono::Duration::seconds(opens_in_secs);
    manifest_at(
        namespace,
        name,
        publish,
        publish + chrono::Duration::minutes(10),
        coupons,
        discount,
    )
}

/// `seckill up -f <files> <extra>`, once ready.
async fn up(files: &Path, extra: &[&str]) -> Up {
    let files = files.to_str().unwrap();
    let mut args = vec!["-f", files];
    args.extend(extra);
    Up::start(&args, None).await
}

/// Writes the manifest `text` as `dir/file`.
fn write_manifest(dir: &Path, file: &str, text: &str) {
    std::fs::write(dir.join(file), text).unwrap();
}

/// Waits until `GET path` on `up`'s listener answers `field` = `want`.
async fn wait_read<V: Copy>(up: &Up, path: &str, field: &str, want: V)
where
    Value: PartialEq<V>,
{
    eventually(WITHIN, || async move {
        let (_, body) = read(up, path).await;
        (body[field] == want).then_some(()).ok_or(body)
    })
    .await;
}

/// The body of `GET path` on `up`'s listener.
async fn read(up: &Up, path: &str) -> (u16, Value) {
    let reply = up.get(path).await;
    (reply.status, reply.json)
}

/// `seckill load --json` against `up`'s workers on `promotion`: `customers`
/// distinct customers, `repeat_ratio` of them asking again, `concurrency`
/// requests at once. Asserts it exited successfully with its verification
/// passed, and answers its summary.
async fn load(
    up: &Up,
    promotion: &str,
    customers: u64,
    concurrency: u64,
    repeat_ratio: f64,
) -> Value {
    let (url, promotion) = (up.url(), promotion.to_owned());
    let args = [
        "--customers".to_owned(),
        customers.to_string(),
        "--concurrency".to_owned(),
        concurrency.to_string(),
        "--repeat-ratio".to_owned(),
        repeat_ratio.to_string(),
    ];
    let load = tokio::task::spawn_blocking(move || {
        Command::new(binary(SECKILL))
            .args(["load", "--target", &url, "--promotion", &promotion])
            .args(&args)
            // Hang bounds, not speed requirements: how fast is make bench's.
            .args(["--duration", "120s", "--verify-timeout", "60s", "--json"])
            .output()
            .expect("seckill load runs")
    })
    .await
    .unwrap();
    let summary: Value = serde_json::from_slice(&load.stdout).unwrap_or_else(|e| {
        panic!(
            "load printed no JSON ({e}): {}\n{}\n{}",
            String::from_utf8_lossy(&load.stdout),
            String::from_utf8_lossy(&load.stderr),
            up.output()
        )
    });
    assert!(load.status.success(), "{summary:#}\n{}", up.output());
    assert_eq!(summary["verification"]["passed"], true, "{summary:#}");
    summary
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn up_then_load_of_10000_customers_for_1000_coupons_verifies_and_stops_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let data = tempfile::tempdir().unwrap();
    let up = up(dir.path(), &["--data-dir", data.path().to_str().unwrap()]).await;
    assert!(
        up.said("private redis-server on 127.0.0.1:"),
        "{}",
        up.output()
    );
    let redis_port: u16 = up
        .output()
        .split("private redis-server on 127.0.0.1:")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|p| p.parse().ok())
        .expect("the private Redis port is printed");

    // Declared once it is ready, opening two seconds later.
    write_manifest(
        dir.path(),
        "flash.yaml",
        &manifest("demo", "flash", 2, 1_000, 0.7),
    );
    up.wait_said("demo/flash: Scheduled").await;

    let summary = load(&up, "demo/flash", 10_000, 64, 0.2).await;
    let v = &summary["verification"];
    assert_eq!(v["complete"], true);
    assert_eq!(v["grantedInReadModel"], 1_000);
    assert_eq!(v["grantedByResponses"], 1_000);
    assert_eq!(v["expectedGranted"], 1_000);
    assert_eq!(v["distinctCustomers"], 10_000);
    assert_eq!(summary["outcomes"]["granted"], 1_000);
    assert!(summary["requests"].as_u64().unwrap() >= 12_000);
    assert!(summary["latencyMs"]["p99"].as_f64().unwrap() > 0.0);

    up.wait_said("demo/flash: SoldOut").await;
    let status = up.stop().await;
    assert!(status.success(), "{status:?}");
    // The private Redis went with it, and its AOF stays in the data directory.
    assert!(std::net::TcpStream::connect(("127.0.0.1", redis_port)).is_err());
    assert!(std::fs::read_dir(data.path()).unwrap().next().is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn manifest_edits_apply_before_the_start_and_are_locked_after_it() {
    let redis = redis();
    let mut con = connect(&redis);
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("sale.yaml");
    let up = up(dir.path(), &["--redis-url", &redis.url()]).await;
    let id = PromotionId::parse("shop/sale").unwrap();
    // Opening in an hour: every edit below comes before the start.
    let publish = Utc::now() + chrono::Duration::hours(1);
    let finish = publish + chrono::Duration::minutes(10);
    std::fs::write(&file, manifest_at("shop", "sale", publish, finish, 10, 0.5)).unwrap();
    up.wait_said("shop/sale: Scheduled").await;

    // Before the start: the change is taken.
    std::fs::write(&file, manifest_at("shop", "sale", publish, finish, 20, 0.5)).unwrap();
    up.wait_said("shop/sale: manifest changed").await;
    eventually(WITHIN, || {
        let (mut con, id) = (con.clone(), &id);
        async move {
            let coupons = protocol::snapshot(&mut con, id)
                .await
                .unwrap()
                .number_of_coupons;
            (coupons == Some(20)).then_some(()).ok_or(coupons)
        }
    })
    .await;

    // Moved to open now: it starts.
    let publish = Utc::now() - chrono::Duration::seconds(1);
    let finish = publish + chrono::Duration::minutes(10);
    std::fs::write(&file, manifest_at("shop", "sale", publish, finish, 20, 0.5)).unwrap();
    up.wait_said("shop/sale: Started").await;

    // After the start: the change is refused and the sale runs on as it was.
    std::fs::write(&file, manifest_at("shop", "sale", publish, finish, 99, 0.5)).unwrap();
    up.wait_said("SpecLocked").await;
    let snap = protocol::snapshot(&mut con, &id).await.unwrap();
    assert_eq!(snap.number_of_coupons, Some(20));
    wait_read(&up, "/api/v1/promotions/shop/sale", "numberOfCoupons", 20).await;
    assert!(up.stop().await.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_manifest_is_reported_by_field_while_valid_ones_run_and_removal_finishes() {
    let dir = tempfile::tempdir().unwrap();
    write_manifest(
        dir.path(),
        "good.yaml",
        &manifest("shop", "good", -1, 5, 0.5),
    );
    write_manifest(dir.path(), "bad.yaml", &manifest("shop", "bad", -1, 5, 1.5));
    let up = up(dir.path(), &[]).await;
    up.wait_said("INVALID").await;
    let out = up.output();
    assert!(
        out.contains("bad.yaml") && out.contains("spec.discount"),
        "{out}"
    );
    wait_read(&up, "/api/v1/promotions/shop/good", "phase", "Active").await;
    assert_eq!(read(&up, "/api/v1/promotions/shop/bad").await.0, 404);

    // Removing the file finishes the promotion (reason Deleted).
    std::fs::remove_file(dir.path().join("good.yaml")).unwrap();
    wait_read(
        &up,
        "/api/v1/promotions/shop/good",
        "finishReason",
        "Deleted",
    )
    .await;
    assert!(up.stop().await.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_misspelt_field_is_refused_naming_it_as_the_api_server_does_and_the_promotion_never_runs()
{
    let dir = tempfile::tempdir().unwrap();
    let misspelt = manifest("shop", "typo", -1, 5, 0.5).replace(
        "  numberOfCoupons: 5\n",
        "  numberOfCoupons: 5\n  coupns: 500\n",
    );
    assert!(misspelt.contains("coupns: 500"), "{misspelt}");
    write_manifest(dir.path(), "typo.yaml", &misspelt);
    write_manifest(
        dir.path(),
        "good.yaml",
        &manifest("shop", "good", -1, 5, 0.5),
    );
    let up = up(dir.path(), &[]).await;
    up.wait_said("INVALID").await;
    let out = up.output();
    assert!(
        out.contains("typo.yaml") && out.contains(r#"unknown field "spec.coupns""#),
        "{out}"
    );
    wait_read(&up, "/api/v1/promotions/shop/good", "phase", "Active").await;
    assert_eq!(read(&up, "/api/v1/promotions/shop/typo").await.0, 404);
    assert!(up.stop().await.success());
}

/// `seckill <args>` with `PATH` set to `path` when given: it must fail,
/// and its stderr.
fn failing_seckill(args: &[&str], path: Option<&str>) -> String {
    let mut command = Command::new(binary(SECKILL));
    command.args(args);
    if let Some(path) = path {
        command.env("PATH", path);
    }
    let out = command.output().unwrap();
    assert!(!out.status.success(), "{out:?}");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn roles_are_checked_and_a_missing_redis_server_is_explained() {
    let listen = ["--listen", "127.0.0.1:0"];
    let err = failing_seckill(
        &[&["up", "--roles", "operator,frobnicator"][..], &listen].concat(),
        None,
    );
    assert!(
        err.contains("invalid value 'frobnicator'")
            && err.contains("[possible values: operator, command, query, projector]"),
        "{err}"
    );

    let err = failing_seckill(&[&["up"][..], &listen].concat(), Some("/nonexistent"));
    assert!(
        err.contains("redis-server is not installed")
            && err.contains("apt-get install redis-server"),
        "{err}"
    );
}

/// The README's sharded sale, as a user runs it: `seckill up` on a
/// three-master Redis Cluster (every node `appendfsync always`, which the
/// flag acknowledges), a manifest with `shards: 3`, and `seckill load`
/// verifying every coupon through the query API.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sharded_manifest_on_a_redis_cluster_sells_exactly_its_coupons_one_shard_per_master() {
    use seckill_testkit::redis_cluster::{RedisCluster, RedisClusterOptions};
    use seckill_workers::protocol::ShardKeys;
    use seckill_workers::redis_connection::RedisArgs;
    use seckill_workers::redis_server::Fsync;

    let cluster = RedisCluster::start(RedisClusterOptions {
        appendfsync: Some(Fsync::Always),
        ..RedisClusterOptions::default()
    })
    .unwrap();
    let nodes = cluster.seed_nodes().join(",");
    let dir = tempfile::tempdir().unwrap();
    let up = up(
        dir.path(),
        &[
            "--redis-cluster-nodes",
            &nodes,
            "--shards-without-replicas-needs-fsync-always",
        ],
    )
    .await;
    write_manifest(
        dir.path(),
        "sharded.yaml",
        &format!("{}  shards: 3\n", manifest("demo", "sharded", 2, 600, 0.7)),
    );
    up.wait_said("demo/sharded: Scheduled").await;

    let summary = load(&up, "demo/sharded", 3_000, 32, 0.1).await;
    let v = &summary["verification"];
    assert_eq!(v["grantedInReadModel"], 600, "{summary:#}");
    assert_eq!(v["grantedByResponses"], 600, "{summary:#}");
    assert_eq!(summary["outcomes"]["granted"], 600, "{summary:#}");
    up.wait_said("demo/sharded: SoldOut").await;

    // One shard per master: the operator core chose the tags for that.
    wait_read(&up, "/api/v1/promotions/demo/sharded", "granted", 600).await;
    let (_, promotion) = read(&up, "/api/v1/promotions/demo/sharded").await;
    assert_eq!(promotion["shards"], 3, "{promotion:#}");
    assert_eq!(promotion["remaining"], 0, "{promotion:#}");
    let id = PromotionId::parse("demo/sharded").unwrap();
    let mut con = RedisArgs::for_cluster(cluster.seed_nodes())
        .connect()
        .unwrap();
    let map = protocol::shards::load_map(&mut con, &id).await.unwrap();
    assert_eq!(map.shards(), 3);
    let masters: std::collections::BTreeSet<String> = (0..3)
        .map(|i| {
            let keys: &ShardKeys = map.keys(i).unwrap();
            cluster.master_for_key(&keys.state).unwrap()
        })
        .collect();
    assert_eq!(masters.len(), 3, "{masters:?}");
    let status = up.stop().await;
    assert!(status.success(), "{status:?}");
}
