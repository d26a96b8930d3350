//! The query endpoints over real HTTP, against a real redis-server, with the
//! read models written by a real projector from real grabs.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use seckill_testkit::client::{self, JSON};
use seckill_testkit::redis::{connect, connect_read_models, redis_with, RedisServer};
use seckill_testkit::{eventually, Reply};
use seckill_workers::command::{CommandApi, CommandOptions};
use seckill_workers::http::{self, Apis, HealthApi, ServerLimitArgs};
use seckill_workers::metrics::MetricsRegistry;
use seckill_workers::projector::{Projector, ProjectorMetrics, ProjectorOptions};
use seckill_workers::protocol::{self, FinishReason, PromotionId};
use seckill_workers::query::{QueryApi, QueryOptions};
use seckill_workers::redis_connection::RedisConnection;
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

struct Stack {
    redis: RedisServer,
    con: RedisConnection,
    /// The read models' own database, as the workers open it.
    models: RedisConnection,
    addr: SocketAddr,
    shutdown: CancellationToken,
}

impl Drop for Stack {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// Redis, and an HTTP server with the grab and query endpoints.
async fn stack(customer_header: Option<&str>) -> Stack {
    let redis = redis_with(None);
    let con = connect(&redis);
    let models = connect_read_models(&redis);
    let header =
        customer_header.map(|h| hyper::header::HeaderName::from_bytes(h.as_bytes()).unwrap());
    let query = QueryApi::new(
        models.clone(),
        QueryOptions {
            customer_id_header: header.clone(),
            redis_timeout: Duration::from_millis(500),
        },
    );
    let command = CommandApi::new(
        con.clone(),
        CommandOptions {
            customer_id_header: None,
            redis_timeout: Duration::from_millis(500),
            durability: None,
            batch_max: seckill_workers::command::DEFAULT_BATCH_MAX,
            finish_skew_wait: seckill_workers::protocol::shards::FINISH_SKEW_WAIT,
        },
    );
    let health = HealthApi::new(
        con.clone(),
        Duration::from_millis(500),
        MetricsRegistry::new(),
    );
    let limits = ServerLimitArgs::from_env_or_defaults()
        .unwrap()
        .limits(Duration::from_secs(1), None);
    let app = Apis {
        command: Some(command),
        query: Some(query),
        health,
    }
    .router(&limits);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let shutdown = CancellationToken::new();
    {
        let shutdown = shutdown.clone();
        tokio::spawn(async move { http::serve(listener, app, &limits, shutdown).await });
    }
    Stack {
        redis,
        con,
        models,
        addr,
        shutdown,
    }
}

/// The projection lag a query answer reports.
fn lag(reply: &Reply) -> i64 {
    reply
        .header("x-seckill-projection-lag-ms")
        .expect("lag header")
        .parse()
        .expect("integer lag")
}

/// One request to the stack, with a JSON body when given.
async fn call(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<Value>,
) -> Reply {
    let mut all = headers.to_vec();
    if body.is_some() {
        all.push(("content-type", JSON));
    }
    let body = body.map(|b| b.to_string().into_bytes()).unwrap_or_default();
    client::call(addr.port(), method, path, &all, body)
        .await
        .expect("the stack answers")
}

async fn get(s: &Stack, path: &str) -> Reply {
    call(s.addr, "GET", path, &[], None).await
}

/// `POST path` with `customer`'s grab body.
async fn post_grab(s: &Stack, path: &str, customer: &str) -> Reply {
    call(
        s.addr,
        "POST",
        path,
        &[],
        Some(json!({ "customerId": customer })),
    )
    .await
}

async fn start_promotion(con: &mut RedisConnection, id: &PromotionId, coupons: u64) {
    seckill_testkit::promotions::start_promotion(con, id, 0.5, coupons).await;
}

async fn project(s: &Stack) {
    let mut p = Projector::new(
        s.con.clone(),
        s.models.clone(),
        ProjectorOptions::new("test"),
        ProjectorMetrics::unregistered(),
    );
    p.run_until_idle().await.unwrap();
}

#[tokio::test]
async fn a_grab_reads_back_through_the_promotion_list_promotion_and_customer_coupons() {
    let mut s = stack(None).await;
    let id = PromotionId::new("shop", "sale").unwrap();
    let first_event = Instant::now();
    start_promotion(&mut s.con, &id, 10).await;
    let grab = post_grab(&s, "/api/v1/promotions/shop/sale/grab", "alice").await;
    assert_eq!(grab.status, 200, "{}", grab.json);
    let coupon_id = grab.json["couponId"].as_str().unwrap().to_owned();

    // Before any projector ran: nothing known, and the lag says so.
    let before = get(&s, "/api/v1/promotions/shop/sale").await;
    assert_eq!(before.status, 404);
    assert_eq!(before.json["error"], "unknown_promotion");
    assert_eq!(lag(&before), -1);

    project(&s).await;
    let one = get(&s, "/api/v1/promotions/shop/sale").await;
    assert_eq!(one.status, 200, "{}", one.json);
    assert_eq!(one.header("content-type"), Some("application/json"));
    // XADD to applied: no more than the events' age.
    let age = first_event.elapsed().as_millis() as i64;
    assert!(
        (0..=age).contains(&lag(&one)),
        "{:?} of events {age} ms old",
        one.headers
    );
    assert_eq!(one.json["promotion"], "shop/sale");
    assert_eq!(one.json["phase"], "Active");
    assert_eq!(one.json["discount"], 0.5);
    assert_eq!(one.json["numberOfCoupons"], 10);
    assert_eq!(one.json["granted"], 1);
    assert_eq!(one.json["remaining"], 9);
    assert!(one.json.get("finishReason").is_none());
    assert!(one.json["publishTime"].as_str().unwrap().ends_with('Z'));

    let list = get(&s, "/api/v1/promotions").await;
    assert_eq!(list.status, 200);
    assert_eq!(list.json["items"].as_array().unwrap().len(), 1);
    assert_eq!(list.json["items"][0]["promotion"], "shop/sale");
    assert_eq!(list.json["items"][0]["numberOfCoupons"], 10);
    lag(&list);

    let mine = get(&s, "/api/v1/customers/alice/coupons").await;
    assert_eq!(mine.status, 200);
    assert_eq!(
        mine.json["items"],
        json!([{"couponId": coupon_id, "promotion": "shop/sale", "discount": 0.5,
                "grantedAt": grab.json["grantedAt"]}])
    );
    lag(&mine);
    let none = get(&s, "/api/v1/customers/bob/coupons").await;
    assert_eq!(
        (none.status, none.json.clone()),
        (200, json!({"items": []}))
    );

    // Finished: shows its reason, leaves the active list.
    protocol::finish(&mut s.con, &id, FinishReason::Deleted)
        .await
        .unwrap();
    project(&s).await;
    let done = get(&s, "/api/v1/promotions/shop/sale").await;
    assert_eq!(done.json["phase"], "Finished");
    assert_eq!(done.json["finishReason"], "Deleted");
    assert_eq!(
        get(&s, "/api/v1/promotions").await.json,
        json!({"items": []})
    );
}

#[tokio::test]
async fn bad_ids_are_400_unknown_promotions_404_and_other_methods_405_in_the_envelope() {
    let s = stack(None).await;
    for path in [
        "/api/v1/promotions/Shop/sale",
        "/api/v1/promotions/shop/sa%7Ble",
        "/api/v1/customers/al%20ice/coupons",
        &format!("/api/v1/customers/{}/coupons", "a".repeat(65)),
    ] {
        let r = get(&s, path).await;
        assert_eq!(r.status, 400, "{path}: {}", r.json);
        assert_eq!(r.json["error"], "invalid_request");
        assert!(r.json["message"].as_str().is_some_and(|m| !m.is_empty()));
    }
    // Percent-encoded characters of the alphabet are decoded.
    assert_eq!(get(&s, "/api/v1/customers/a%40b/coupons").await.status, 200);
    let r = get(&s, "/api/v1/promotions/shop/nope").await;
    assert_eq!(
        (r.status, r.json["error"].as_str()),
        (404, Some("unknown_promotion"))
    );
    let r = call(s.addr, "DELETE", "/api/v1/promotions", &[], None).await;
    assert_eq!(r.status, 405);
}

#[tokio::test]
async fn with_a_customer_header_only_that_customer_reads_their_coupons() {
    let s = stack(Some("x-customer-id")).await;
    let path = "/api/v1/customers/alice/coupons";
    let r = get(&s, path).await;
    assert_eq!(
        (r.status, r.json["error"].as_str()),
        (401, Some("unauthenticated"))
    );
    let r = call(s.addr, "GET", path, &[("X-Customer-Id", "bob")], None).await;
    assert_eq!(
        (r.status, r.json["error"].as_str()),
        (403, Some("forbidden"))
    );
    let r = call(s.addr, "GET", path, &[("X-Customer-Id", "alice")], None).await;
    assert_eq!(r.status, 200);
    // Promotions stay public.
    assert_eq!(get(&s, "/api/v1/promotions").await.status, 200);
}

#[tokio::test]
async fn redis_down_answers_503_unavailable_with_retry_after_then_recovers() {
    let mut s = stack(None).await;
    s.redis.kill();
    for path in [
        "/api/v1/promotions",
        "/api/v1/promotions/shop/sale",
        "/api/v1/customers/alice/coupons",
    ] {
        let r = get(&s, path).await;
        assert_eq!(r.status, 503, "{path}: {}", r.json);
        assert_eq!(r.json["error"], "unavailable");
        assert!(r.header("retry-after").is_some());
    }
    s.redis.restart().unwrap();
    eventually(Duration::from_secs(30), || async {
        match get(&s, "/api/v1/promotions").await.status {
            200 => Ok(()),
            other => Err(format!("queries answer {other} after Redis came back")),
        }
    })
    .await;
}

#[tokio::test]
async fn with_a_customer_header_an_empty_repeated_or_invalid_value_is_401_like_an_absent_one() {
    let s = stack(Some("x-customer-id")).await;
    let path = "/api/v1/customers/alice/coupons";
    for headers in [
        &[("X-Customer-Id", "")][..],
        &[("X-Customer-Id", "alice"), ("X-Customer-Id", "alice")][..],
        &[("X-Customer-Id", "al ice")][..],
    ] {
        let r = call(s.addr, "GET", path, headers, None).await;
        assert_eq!(
            (r.status, r.json["error"].as_str()),
            (401, Some("unauthenticated")),
            "{headers:?}: {}",
            r.json
        );
    }
}

#[tokio::test]
async fn promotion_ids_are_taken_as_sent_and_customer_ids_percent_decoded() {
    let mut s = stack(None).await;
    let id = PromotionId::new("shop", "sale").unwrap();
    start_promotion(&mut s.con, &id, 10).await;
    project(&s).await;
    assert_eq!(get(&s, "/api/v1/promotions/shop/sale").await.status, 200);
    // `sh%6Fp` means `shop`, but a DNS name needs no encoding: refused, as
    // the grab endpoint refuses it.
    let encoded = get(&s, "/api/v1/promotions/sh%6Fp/sale").await;
    assert_eq!(
        (encoded.status, encoded.json["error"].as_str()),
        (400, Some("invalid_request")),
        "{}",
        encoded.json
    );
    let grab = post_grab(&s, "/api/v1/promotions/sh%6Fp/sale/grab", "a@b").await;
    assert_eq!(grab.status, 400, "{}", grab.json);
    let grab = post_grab(&s, "/api/v1/promotions/shop/sale/grab", "a@b").await;
    assert_eq!(grab.status, 200, "{}", grab.json);
    project(&s).await;
    let mine = get(&s, "/api/v1/customers/a%40b/coupons").await;
    assert_eq!(mine.status, 200, "{}", mine.json);
    assert_eq!(mine.json["items"][0]["couponId"], grab.json["couponId"]);
}
