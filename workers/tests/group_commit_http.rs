//! The group commit of the real `seckill-worker command` binary, against a
//! real redis-server: thousands of customers through batches, Redis stopped
//! in the middle of a batch, and the holders' retry after a sale from a
//! worker that never saw it. (What one batch answers each customer is
//! tested exactly in `grab_batches.rs`; that a grab never waits behind
//! another promotion's call is proved on the group commit's structure in
//! `command::group_commit`.)

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use futures::StreamExt;
use seckill_testkit::client::metric_value;
use seckill_testkit::promotions::{id, open_promotion};
use seckill_testkit::redis::{connect, redis};
use seckill_testkit::stream::grants_of;
use seckill_testkit::{eventually, CommandOptions, Reply, Worker};

/// Bounds every wait for something that must happen.
const WITHIN: Duration = Duration::from_secs(60);

/// The coupon number N of `ns/name#N`.
fn seq(coupon_id: &str) -> u64 {
    coupon_id.rsplit_once('#').unwrap().1.parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn race_of_4000_customers_through_batches_grants_exactly_1000_in_order_of_first_appearance() {
    let server = redis();
    let mut con = connect(&server);
    let p = open_promotion(&mut con, "race", 1000).await;
    let worker = Worker::command(&server.url(), &["--grab-batch-max", "64"]).await;
    // 3000 distinct customers, 1000 of them trying twice.
    let attempts: Vec<String> = (0..4000)
        .map(|i| format!("c{}", (i * 7919) % 3000))
        .collect();
    let replies: Vec<(String, Reply)> = futures::stream::iter(attempts)
        .map(|c| {
            let worker = &worker;
            async move {
                let r = worker.grab("shop", "race", &c).await;
                (c, r)
            }
        })
        .buffer_unordered(256)
        .collect()
        .await;

    let mut granted: HashMap<String, String> = HashMap::new();
    for (c, r) in &replies {
        match (r.status, r.error()) {
            (200, _) => {
                let coupon = r.json["couponId"].as_str().unwrap().to_owned();
                if let Some(before) = granted.insert(c.clone(), coupon.clone()) {
                    assert_eq!(before, coupon, "{c} got two coupons");
                }
            }
            (410, "sold_out") => {}
            other => panic!("{c}: unexpected {other:?}: {r:?}"),
        }
    }
    assert_eq!(granted.len(), 1000, "exactly the stock, nobody twice");
    let grants = grants_of(&mut con, &p).await;
    assert_eq!(grants.len(), 1000);
    let in_stream: HashMap<String, String> = grants
        .iter()
        .map(|g| (g.customer_id.clone(), g.coupon_id.clone()))
        .collect();
    assert_eq!(
        in_stream, granted,
        "every 200 is in the stream, and only they"
    );
    // Coupons are numbered in the order the grants were appended.
    let numbers: Vec<u64> = grants.iter().map(|g| seq(&g.coupon_id)).collect();
    assert_eq!(numbers, (1..=1000).collect::<Vec<_>>());
    // And they went in batches.
    let metrics = worker.metrics().await;
    let calls = metric_value(&metrics, "seckill_grab_batch_size_count");
    let customers = metric_value(&metrics, "seckill_grab_batch_size_sum");
    // (Once the worker knows the sale is over, non-holders are answered
    // from memory: not every request is in a batch.)
    assert!(calls >= 1.0 && customers >= 1000.0, "{metrics}");
    assert!(
        customers > calls,
        "no call carried more than one customer: {calls} calls for {customers} grabs"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_stopped_mid_batch_answers_503_to_the_batch_then_the_retry_tells_the_truth() {
    let server = redis();
    let mut con = connect(&server);
    let p = open_promotion(&mut con, "stall", 100).await;
    let worker = Worker::command_with(
        &server.url(),
        &[],
        CommandOptions {
            redis_timeout_ms: Some("300"),
            ..CommandOptions::default()
        },
    )
    .await;
    server.pause();
    let customers: Vec<String> = (0..40).map(|i| format!("s{i}")).collect();
    let replies: Vec<Reply> =
        futures::future::join_all(customers.iter().map(|c| worker.grab("shop", "stall", c))).await;
    for r in &replies {
        assert_eq!(r.status, 503, "{r:?}");
        let message = r.json["message"].as_str().unwrap_or_default();
        assert!(
            message.contains("unknown") && message.contains("retry is safe"),
            "{r:?}"
        );
    }
    server.resume();
    // The calls sent while Redis was stopped may have run once it resumed:
    // each customer's retry answers its coupon, granted then or now, once.
    let mut answered = HashMap::new();
    for c in &customers {
        let r = eventually(WITHIN, || async {
            let r = worker.grab("shop", "stall", c).await;
            if r.status == 200 {
                Ok(r)
            } else {
                Err(format!("{c}: {r:?}"))
            }
        })
        .await;
        answered.insert(c.clone(), r.json["couponId"].as_str().unwrap().to_owned());
    }
    let grants = grants_of(&mut con, &p).await;
    let in_stream: HashMap<String, String> = grants
        .iter()
        .map(|g| (g.customer_id.clone(), g.coupon_id.clone()))
        .collect();
    assert_eq!(grants.len(), customers.len(), "nobody twice");
    assert_eq!(in_stream, answered);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_holders_retry_after_the_sell_out_gets_its_coupon_from_every_worker_others_the_410() {
    let server = redis();
    let mut con = connect(&server);
    open_promotion(&mut con, "over", 2).await;
    let first = Worker::command(&server.url(), &[]).await;
    let alice = first.grab("shop", "over", "alice").await;
    assert_eq!(alice.status, 200, "{alice:?}");
    let coupon = alice.json["couponId"].as_str().unwrap().to_owned();
    assert_eq!(first.grab("shop", "over", "bob").await.status, 200);
    assert_eq!(
        first.grab("shop", "over", "carol").await.error(),
        "sold_out"
    );
    // A worker that never saw the sale, and the one that did, once each
    // has loaded the holders (and before: Redis answers meanwhile).
    let fresh = Worker::command(&server.url(), &[]).await;
    for worker in [&first, &fresh] {
        for _ in 0..2 {
            let again = worker.grab("shop", "over", "alice").await;
            assert_eq!(again.status, 200, "{again:?}");
            assert_eq!(again.json["couponId"], coupon.as_str());
            assert_eq!(again.json["alreadyGranted"], true);
            let other = worker.grab("shop", "over", "dave").await;
            assert_eq!(
                (other.status, other.error()),
                (410, "sold_out"),
                "{other:?}"
            );
        }
    }
    // Once the holders are loaded the 410 comes from memory: a stopped
    // Redis does not change the answers of holders' non-holders.
    eventually(WITHIN, || async {
        server.pause();
        let other = fresh.grab("shop", "over", "erin").await;
        server.resume();
        if other.status == 410 {
            Ok(())
        } else {
            Err(format!("{other:?}"))
        }
    })
    .await;
    let coupons: HashSet<String> = grants_of(&mut con, &id("over"))
        .await
        .into_iter()
        .map(|g| g.coupon_id)
        .collect();
    assert_eq!(coupons.len(), 2);
    assert!(coupons.contains(&coupon));
}
