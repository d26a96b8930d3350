//! The query endpoints over real HTTP, against a real redis-server, with the
//! read models written by a real projector from real grabs.

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use seckill_workers::command::{CommandApi, CommandOptions};
use seckill_workers::http::{self, Apis, HealthApi, ServerLimitArgs};
use seckill_workers::metrics::MetricsRegistry;
use seckill_workers::projector::{Projector, ProjectorMetrics, ProjectorOptions};
use seckill_workers::protocol::{self, FinishReason, PromotionId};
use seckill_workers::query::{QueryApi, QueryOptions};
use seckill_workers::redis_connection::RedisConnection;
use seckill_workers::redis_server::RedisServer;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
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
    let redis = support::redis_with(None);
    let con = support::connect(&redis);
    let models = support::connect_read_models(&redis);
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

struct Reply {
    status: u16,
    headers: Vec<(String, String)>,
    body: Value,
}

impl Reply {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    fn lag(&self) -> i64 {
        self.header("x-seckill-projection-lag-ms")
            .expect("lag header")
            .parse()
            .expect("integer lag")
    }
}

async fn call(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<Value>,
) -> Reply {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    if !body.is_empty() {
        head.push_str("Content-Type: application/json\r\n");
    }
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes()).await.unwrap();
    stream.write_all(body.as_bytes()).await.unwrap();
    let mut raw = String::new();
    stream.read_to_string(&mut raw).await.unwrap();
    let (head, body) = raw.split_once("\r\n\r\n").unwrap();
    let mut lines = head.lines();
    let status = lines
        .next()
        .unwrap()
        .split(' ')
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .collect();
    Reply {
        status,
        headers,
        body: serde_json::from_str(body).unwrap_or(Value::Null),
    }
}

async fn get(s: &Stack, path: &str) -> Reply {
    call(s.addr, "GET", path, &[], None).await
}

async fn start_promotion(con: &mut RedisConnection, id: &PromotionId, coupons: u64) {
    support::start_promotion(con, id, 0.5, coupons).await;
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
    start_promotion(&mut s.con, &id, 10).await;
    let grab = call(
        s.addr,
        "POST",
        "/api/v1/promotions/shop/sale/grab",
        &[],
        Some(json!({"customerId": "alice"})),
    )
    .await;
    assert_eq!(grab.status, 200, "{}", grab.body);
    let coupon_id = grab.body["couponId"].as_str().unwrap().to_owned();

    // Before any projector ran: nothing known, and the lag says so.
    let before = get(&s, "/api/v1/promotions/shop/sale").await;
    assert_eq!(before.status, 404);
    assert_eq!(before.body["error"], "unknown_promotion");
    assert_eq!(before.lag(), -1);

    project(&s).await;
    let one = get(&s, "/api/v1/promotions/shop/sale").await;
    assert_eq!(one.status, 200, "{}", one.body);
    assert_eq!(one.header("content-type"), Some("application/json"));
    assert!((0..5_000).contains(&one.lag()), "{:?}", one.headers);
    assert_eq!(one.body["promotion"], "shop/sale");
    assert_eq!(one.body["phase"], "Active");
    assert_eq!(one.body["discount"], 0.5);
    assert_eq!(one.body["numberOfCoupons"], 10);
    assert_eq!(one.body["granted"], 1);
    assert_eq!(one.body["remaining"], 9);
    assert!(one.body.get("finishReason").is_none());
    assert!(one.body["publishTime"].as_str().unwrap().ends_with('Z'));

    let list = get(&s, "/api/v1/promotions").await;
    assert_eq!(list.status, 200);
    assert_eq!(list.body["items"].as_array().unwrap().len(), 1);
    assert_eq!(list.body["items"][0]["promotion"], "shop/sale");
    assert_eq!(list.body["items"][0]["numberOfCoupons"], 10);
    list.lag();

    let mine = get(&s, "/api/v1/customers/alice/coupons").await;
    assert_eq!(mine.status, 200);
    assert_eq!(
        mine.body["items"],
        json!([{"couponId": coupon_id, "promotion": "shop/sale", "discount": 0.5,
                "grantedAt": grab.body["grantedAt"]}])
    );
    mine.lag();
    let none = get(&s, "/api/v1/customers/bob/coupons").await;
    assert_eq!(
        (none.status, none.body.clone()),
        (200, json!({"items": []}))
    );

    // Finished: shows its reason, leaves the active list.
    protocol::finish(&mut s.con, &id, FinishReason::Deleted)
        .await
        .unwrap();
    project(&s).await;
    let done = get(&s, "/api/v1/promotions/shop/sale").await;
    assert_eq!(done.body["phase"], "Finished");
    assert_eq!(done.body["finishReason"], "Deleted");
    assert_eq!(
        get(&s, "/api/v1/promotions").await.body,
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
        assert_eq!(r.status, 400, "{path}: {}", r.body);
        assert_eq!(r.body["error"], "invalid_request");
        assert!(r.body["message"].as_str().is_some_and(|m| !m.is_empty()));
    }
    // Percent-encoded characters of the alphabet are decoded.
    assert_eq!(get(&s, "/api/v1/customers/a%40b/coupons").await.status, 200);
    let r = get(&s, "/api/v1/promotions/shop/nope").await;
    assert_eq!(
        (r.status, r.body["error"].as_str()),
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
        (r.status, r.body["error"].as_str()),
        (401, Some("unauthenticated"))
    );
    let r = call(s.addr, "GET", path, &[("X-Customer-Id", "bob")], None).await;
    assert_eq!(
        (r.status, r.body["error"].as_str()),
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
        assert_eq!(r.status, 503, "{path}: {}", r.body);
        assert_eq!(r.body["error"], "unavailable");
        assert!(r.header("retry-after").is_some());
    }
    s.redis.restart().unwrap();
    let mut ok = false;
    for _ in 0..50 {
        if get(&s, "/api/v1/promotions").await.status == 200 {
            ok = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(ok, "queries did not recover after Redis came back");
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
            (r.status, r.body["error"].as_str()),
            (401, Some("unauthenticated")),
            "{headers:?}: {}",
            r.body
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
        (encoded.status, encoded.body["error"].as_str()),
        (400, Some("invalid_request")),
        "{}",
        encoded.body
    );
    let grab = call(
        s.addr,
        "POST",
        "/api/v1/promotions/sh%6Fp/sale/grab",
        &[],
        Some(json!({"customerId": "a@b"})),
    )
    .await;
    assert_eq!(grab.status, 400, "{}", grab.body);
    let grab = call(
        s.addr,
        "POST",
        "/api/v1/promotions/shop/sale/grab",
        &[],
        Some(json!({"customerId": "a@b"})),
    )
    .await;
    assert_eq!(grab.status, 200, "{}", grab.body);
    project(&s).await;
    let mine = get(&s, "/api/v1/customers/a%40b/coupons").await;
    assert_eq!(mine.status, 200, "{}", mine.body);
    assert_eq!(mine.body["items"][0]["couponId"], grab.body["couponId"]);
}
