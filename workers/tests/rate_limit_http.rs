//! Rate limiting of the grab endpoint, through the real `seckill-worker
//! command` binary against a real redis-server: a client over its rate is
//! answered 429 with `Retry-After` before any Redis call, other clients are
//! served meanwhile, the client is served again after waiting, and with
//! limiting off (the default) nobody is ever answered 429.

use std::time::Duration;

use seckill_testkit::client::call;
use seckill_testkit::promotions::{id, spec_from_now};
use seckill_testkit::redis::{connect, redis, RedisServer};
use seckill_testkit::{CommandOptions, Worker, JSON};
use seckill_workers::protocol;
use seckill_workers::redis_connection::RedisConnection;

/// A `seckill-worker command` with a 500 ms Redis timeout.
async fn start_worker(redis_url: &str, extra: &[&str]) -> Worker {
    let options = CommandOptions {
        redis_timeout_ms: Some("500"),
        ..CommandOptions::default()
    };
    Worker::command_with(redis_url, extra, options).await
}

/// A redis-server with `shop/sale` open (1,000 coupons).
async fn redis_with_sale() -> (RedisServer, RedisConnection) {
    let server = redis();
    let mut con = connect(&server);
    let spec = spec_from_now(0.8, 1000, -1000, 3_601_000);
    protocol::schedule(&mut con, &id("sale"), &spec)
        .await
        .unwrap();
    (server, con)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_customer_over_the_limit_gets_429_before_redis_while_others_are_served_then_is_served_again(
) {
    let (server, _con) = redis_with_sale().await;
    let worker = start_worker(
        &server.url(),
        &[
            "--rate-limit-per-sec",
            "0.5",
            "--rate-limit-burst",
            "3",
            "--rate-limit-key",
            "customer",
        ],
    )
    .await;

    // The burst: three grabs of alice are served (one grant, two repeats).
    for i in 0..3 {
        let r = worker.grab("shop", "sale", "alice").await;
        assert_eq!(r.status, 200, "grab {i}: {r:?}");
    }
    let limited = worker.grab("shop", "sale", "alice").await;
    assert_eq!(limited.status, 429, "{limited:?}");
    assert_eq!(limited.error(), "rate_limited");
    assert!(!limited.json["message"].as_str().unwrap().is_empty());
    let retry = limited.retry_after();
    assert_eq!(retry, 2, "one token per 2 s");

    // Other customers have buckets of their own.
    for c in ["bob", "carol"] {
        let r = worker.grab("shop", "sale", c).await;
        assert_eq!(r.status, 200, "{c}: {r:?}");
    }

    // The 429 is decided before any Redis call: with Redis stalled it is
    // still a 429 (a grab that asks Redis waits for the 500 ms timeout and
    // is answered 503, as dave's shows).
    server.pause();
    let limited = worker.grab("shop", "sale", "alice").await;
    let stalled = worker.grab("shop", "sale", "dave").await;
    server.resume();
    assert_eq!(limited.status, 429, "{limited:?}");
    assert_eq!(
        stalled.status, 503,
        "a served grab does ask Redis: {stalled:?}"
    );

    // After waiting as told, alice is served again: the same coupon.
    let limited = worker.grab("shop", "sale", "alice").await;
    assert_eq!(limited.status, 429, "{limited:?}");
    tokio::time::sleep(Duration::from_secs(limited.retry_after())).await;
    let again = worker.grab("shop", "sale", "alice").await;
    assert_eq!(again.status, 200, "{again:?}");
    assert_eq!(again.json["alreadyGranted"], true, "{again:?}");

    let metrics = worker.metrics().await;
    assert!(
        metrics.contains(r#"seckill_grab_rate_limited_total{key="customer"} 3"#),
        "{metrics}"
    );
    assert!(
        metrics.contains(r#"status="429",outcome="rate_limited"} 3"#),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn by_ip_the_forwarded_address_counts_only_when_trusted() {
    let (server, _con) = redis_with_sale().await;
    let limits = [
        "--rate-limit-per-sec",
        "0.5",
        "--rate-limit-burst",
        "2",
        "--rate-limit-key",
        "ip",
    ];

    // Trusted: each forwarded address has its own bucket, whatever the customer.
    let mut trusted_args = limits.to_vec();
    trusted_args.push("--trust-forwarded-for");
    let trusted = start_worker(&server.url(), &trusted_args).await;
    let a = [("x-forwarded-for", "203.0.113.7, 10.0.0.1")];
    let b = [("x-forwarded-for", "198.51.100.9")];
    assert_eq!(
        trusted
            .grab_with_headers("shop", "sale", "a1", &a)
            .await
            .status,
        200
    );
    assert_eq!(
        trusted
            .grab_with_headers("shop", "sale", "a2", &a)
            .await
            .status,
        200
    );
    let limited = trusted.grab_with_headers("shop", "sale", "a3", &a).await;
    assert_eq!(limited.status, 429, "{limited:?}");
    assert!(limited.retry_after() >= 1);
    // A bad body from a limited client is still 429: the IP is checked first.
    let garbage = call(
        trusted.port,
        "POST",
        "/api/v1/promotions/shop/sale/grab",
        &[("content-type", JSON), a[0]],
        b"{".to_vec(),
    )
    .await
    .unwrap();
    assert_eq!(garbage.status, 429, "{garbage:?}");
    assert_eq!(
        trusted
            .grab_with_headers("shop", "sale", "b1", &b)
            .await
            .status,
        200
    );
    assert_eq!(
        trusted
            .grab_with_headers("shop", "sale", "b2", &b)
            .await
            .status,
        200
    );
    drop(trusted);

    // Not trusted: the header is ignored; every request is 127.0.0.1.
    let untrusted = start_worker(&server.url(), &limits).await;
    assert_eq!(
        untrusted
            .grab_with_headers("shop", "sale", "c1", &a)
            .await
            .status,
        200
    );
    assert_eq!(
        untrusted
            .grab_with_headers("shop", "sale", "c2", &b)
            .await
            .status,
        200
    );
    let limited = untrusted
        .grab_with_headers("shop", "sale", "c3", &[("x-forwarded-for", "192.0.2.1")])
        .await;
    assert_eq!(limited.status, 429, "{limited:?}");
    let metrics = untrusted.metrics().await;
    assert!(
        metrics.contains(r#"seckill_grab_rate_limited_total{key="ip"} 1"#),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_limiting_off_by_default_a_hammering_client_is_never_429() {
    let (server, _con) = redis_with_sale().await;
    let worker = start_worker(&server.url(), &[]).await;
    let mut statuses = Vec::new();
    for _ in 0..60 {
        statuses.push(worker.grab("shop", "sale", "hammer").await.status);
    }
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    // Nothing registered a limit either.
    assert!(!worker.metrics().await.contains("rate_limited_total{"));
}
