//! Durable grabs (`--durable-replicas`) through the real `seckill-worker
//! command` binary, against a real master and replica pair of redis-server
//! processes: a grant is answered 200 only once the replica holds it; with the
//! replica stalled the grab answers 503 (maybe recorded, retry), and the retry
//! after it recovers answers the same coupon, and the wait holds up nobody
//! else's grab. The worker refuses to start when the replica wait does not
//! fit in the Redis timeout.

use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use seckill_testkit::process::{binary, WORKER};
use seckill_testkit::promotions::{id, spec_from_now};
use seckill_testkit::redis::{connect, redis, RedisServer};
use seckill_testkit::stream::grants_of;
use seckill_testkit::{eventually, Reply, Worker};
use seckill_workers::protocol::{self, PromotionId};
use seckill_workers::redis_connection::RedisConnection;

/// Bounds every wait for something that must happen.
const WITHIN: Duration = Duration::from_secs(30);

async fn info_replication(con: &mut RedisConnection) -> String {
    redis::cmd("INFO")
        .arg("replication")
        .query_async(con)
        .await
        .unwrap()
}

/// A master and a replica attached to it, link up and in sync.
async fn master_and_replica() -> (RedisServer, RedisServer, RedisConnection) {
    let (master, replica) = (redis(), redis());
    let master_con = connect(&master);
    let replica_con = connect(&replica);
    let _: () = redis::cmd("REPLICAOF")
        .arg("127.0.0.1")
        .arg(master.port())
        .query_async(&mut replica_con.clone())
        .await
        .unwrap();
    eventually(WITHIN, || {
        let (mut master_con, mut replica_con) = (master_con.clone(), replica_con.clone());
        async move {
            let r = info_replication(&mut replica_con).await;
            let m = info_replication(&mut master_con).await;
            if r.contains("master_link_status:up") && m.contains("connected_slaves:1") {
                Ok(())
            } else {
                Err(format!("replica not synced:\n{r}\n{m}"))
            }
        }
    })
    .await;
    (master, replica, master_con)
}

/// Schedules `shop/sale` (100 coupons, open now for an hour) on `con`.
async fn schedule_sale(con: &mut RedisConnection) -> PromotionId {
    let id = id("sale");
    let spec = spec_from_now(0.8, 100, -1000, 3_601_000);
    protocol::schedule(con, &id, &spec).await.unwrap();
    id
}

/// Coupon id per customer, from the CouponGrabbed events of the stream.
async fn grants_in_stream(con: &mut RedisConnection, id: &PromotionId) -> Vec<(String, String)> {
    grants_of(con, id)
        .await
        .into_iter()
        .map(|g| (g.customer_id, g.coupon_id))
        .collect()
}

/// `customer`'s grab of shop/sale, retried as a client retries a 503 until
/// it is answered 200; each 503 is counted in `not_replicated`.
async fn granted_after_retries(
    worker: &Worker,
    customer: &str,
    not_replicated: &AtomicU64,
) -> Reply {
    eventually(WITHIN, || async {
        let r = worker.grab("shop", "sale", customer).await;
        match r.status {
            200 => Ok(r),
            503 => {
                not_replicated.fetch_add(1, Ordering::Relaxed);
                Err(r)
            }
            _ => panic!("{r:?}"),
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grant_the_replica_cannot_confirm_is_503_and_its_retry_returns_the_same_coupon() {
    let (master, replica, mut con) = master_and_replica().await;
    let id = schedule_sale(&mut con).await;
    let worker = Worker::command(
        &master.url(),
        &[
            "--durable-replicas",
            "1",
            "--durable-timeout-ms",
            "200",
            "--redis-timeout-ms",
            "1000",
        ],
    )
    .await;

    // Every grant the worker answers 503 for want of the replica, as the
    // test sees them.
    let not_replicated = AtomicU64::new(0);
    // Replica healthy: granted, 200 (retried, as a client retries a 503,
    // while the replica's acknowledgement is slower than the 200 ms wait).
    let alice = granted_after_retries(&worker, "alice", &not_replicated).await;
    assert_eq!(alice.status, 200, "{alice:?}");

    // Replica stalled: the master grants but WAIT times out: 503, never 200.
    replica.pause();
    let started = Instant::now();
    let bob = worker.grab("shop", "sale", "bob").await;
    let took = started.elapsed();
    // A customer who already holds a coupon is not confirmed either.
    let alice_again = worker.grab("shop", "sale", "alice").await;
    replica.resume();
    assert_eq!(bob.status, 503, "{bob:?}");
    assert_eq!(bob.json["error"], "unavailable", "{bob:?}");
    assert_eq!(bob.headers["retry-after"], "1");
    let message = bob.json["message"].as_str().unwrap();
    assert!(
        message.contains("may have been recorded") && message.contains("same coupon"),
        "{message}"
    );
    // The worker waited for the replica before giving up (how much longer
    // it took is a benchmark's business, not a test's).
    assert!(
        took >= Duration::from_millis(190),
        "answered after {took:?}: the replica wait is 200 ms"
    );
    assert_eq!(alice_again.status, 503, "{alice_again:?}");

    // The grant is on the master; after the replica recovers the retry is
    // 200 with that same coupon, and nothing was granted twice.
    let grants = grants_in_stream(&mut con, &id).await;
    let bob_coupon = grants
        .iter()
        .find(|(c, _)| c == "bob")
        .map(|(_, coupon)| coupon.clone())
        .expect("the 503 grab was recorded on the master");
    // Retried as a client would: answered 503 (not replicated) again until
    // the resumed replica has caught up.
    not_replicated.fetch_add(2, Ordering::Relaxed);
    let retry = granted_after_retries(&worker, "bob", &not_replicated).await;
    assert_eq!(retry.status, 200, "{retry:?}");
    assert_eq!(retry.json["alreadyGranted"], true, "{retry:?}");
    assert_eq!(retry.json["couponId"], bob_coupon.as_str(), "{retry:?}");
    let grants = grants_in_stream(&mut con, &id).await;
    assert_eq!(grants.len(), 2, "{grants:?}");

    // Every grant answered 503 for want of the replica is counted.
    let n = not_replicated.load(Ordering::Relaxed);
    let metrics = worker.metrics().await;
    assert!(
        metrics.contains(&format!("seckill_grab_not_replicated_total {n}")),
        "{n}: {metrics}"
    );
    assert!(
        metrics.contains(&format!(r#"status="503",outcome="not_replicated"}} {n}"#)),
        "{n}: {metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_replica_holds_up_only_the_grants_waiting_for_it() {
    let (master, replica, mut con) = master_and_replica().await;
    schedule_sale(&mut con).await;
    // Another promotion, not open yet, that this worker has never seen: its
    // first grab has to ask Redis.
    let later = id("later");
    protocol::schedule(
        &mut con,
        &later,
        &spec_from_now(0.5, 10, 3_600_000, 3_600_000),
    )
    .await
    .unwrap();
    let worker = Worker::command(
        &master.url(),
        &[
            "--durable-replicas",
            "1",
            "--durable-timeout-ms",
            "2000",
            "--redis-timeout-ms",
            "3000",
        ],
    )
    .await;

    // Bob's grant waits for the stalled replica (up to 2 s, then 503);
    // meanwhile carol's grab of the other promotion goes to Redis and is
    // answered at once: nothing of hers queues behind bob's WAIT.
    replica.pause();
    let (bob, carol) = tokio::join!(
        async {
            let r = worker.grab("shop", "sale", "bob").await;
            (r, Instant::now())
        },
        async {
            tokio::time::sleep(Duration::from_millis(200)).await;
            let r = worker.grab("shop", "later", "carol").await;
            (r, Instant::now())
        },
    );
    replica.resume();
    let ((bob, bob_answered), (carol, carol_answered)) = (bob, carol);
    assert_eq!(bob.status, 503, "{bob:?}");
    assert_eq!(carol.status, 409, "{carol:?}");
    assert_eq!(carol.json["error"], "not_started", "{carol:?}");
    assert!(
        carol_answered < bob_answered,
        "carol was answered {:?} after bob, whose grant waited for the replica",
        carol_answered - bob_answered
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_durable_replicas_a_grant_is_200_even_while_the_replica_lags() {
    let (master, replica, mut con) = master_and_replica().await;
    schedule_sale(&mut con).await;
    let worker = Worker::command(&master.url(), &["--redis-timeout-ms", "1000"]).await;
    replica.pause();
    let carol = worker.grab("shop", "sale", "carol").await;
    replica.resume();
    // The plain grab does not wait for replicas (the gap durable grabs close).
    assert_eq!(carol.status, 200, "{carol:?}");
}

#[test]
fn the_worker_refuses_a_replica_wait_that_does_not_fit_in_the_redis_timeout() {
    let output = Command::new(binary(WORKER))
        .args(["command", "--listen", "127.0.0.1:0"])
        .args(["--redis-url", "redis://127.0.0.1:1/"])
        .args(["--durable-replicas", "1", "--durable-timeout-ms", "1000"])
        .args(["--redis-timeout-ms", "1000"])
        .env("RUST_LOG", "off")
        .stdin(Stdio::null())
        .output()
        .expect("seckill-worker runs");
    assert!(!output.status.success(), "{output:?}");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("--durable-timeout-ms 1000 must be below --redis-timeout-ms 1000"),
        "{stderr}"
    );
}
