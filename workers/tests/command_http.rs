//! The grab endpoint of the real `seckill-worker command` binary, against a
//! real redis-server: every answer it promises, the sold-out fast path, Redis
//! failing under load, and graceful termination.

mod support;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use seckill_workers::protocol::{self, FinishReason, PromotionId};
use seckill_workers::redis_connection::RedisConnection;
use support::{
    body, call, connect, grab_path, grants_of, id, redis, spec_from_now, Reply, Worker, JSON,
};

/// Schedules `shop/<name>` with `coupons`, open from now + `open_in_ms` for an hour.
async fn schedule(
    con: &mut RedisConnection,
    name: &str,
    coupons: u64,
    open_in_ms: i64,
) -> PromotionId {
    let id = id(name);
    let spec = spec_from_now(0.8, coupons, open_in_ms, 3_600_000);
    protocol::schedule(con, &id, &spec).await.unwrap();
    id
}

/// Coupon ids of the CouponGrabbed events in the stream of `id`.
async fn granted_in_stream(con: &mut RedisConnection, id: &PromotionId) -> HashSet<String> {
    grants_of(con, id)
        .await
        .into_iter()
        .map(|g| g.coupon_id)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grab_is_granted_once_and_the_same_customer_gets_the_same_coupon_again() {
    let server = redis();
    let mut con = connect(&server);
    let id = schedule(&mut con, "sale", 10, -1000).await;
    let worker = Worker::command(&server.url(), &[]).await;

    let first = worker.grab("shop", "sale", "alice").await;
    assert_eq!(first.status, 200, "{first:?}");
    assert_eq!(first.headers["content-type"], JSON);
    assert_eq!(first.json["customerId"], "alice");
    assert_eq!(first.json["promotion"], "shop/sale");
    assert_eq!(first.json["discount"], 0.8);
    assert!(first.json["grantedAt"].as_str().unwrap().ends_with('Z'));
    assert!(first.json.get("alreadyGranted").is_none(), "{first:?}");
    let coupon = first.json["couponId"].as_str().unwrap().to_owned();

    let again = worker.grab("shop", "sale", "alice").await;
    assert_eq!(again.status, 200);
    assert_eq!(again.json["couponId"], coupon.as_str());
    assert_eq!(again.json["alreadyGranted"], true);

    let stream = granted_in_stream(&mut con, &id).await;
    assert_eq!(stream, HashSet::from([coupon]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_its_status_and_error_code_and_grants_nothing() {
    let server = redis();
    let mut con = connect(&server);
    let id = schedule(&mut con, "sale", 10, -1000).await;
    let worker = Worker::command(&server.url(), &[]).await;
    let port = worker.port;
    let path = grab_path("shop", "sale");
    let json = [("content-type", JSON)];

    let cases: Vec<(&str, Reply, u16, &str)> = vec![
        (
            "malformed JSON",
            call(port, "POST", &path, &json, b"{\"customerId\":".to_vec())
                .await
                .unwrap(),
            400,
            "invalid_request",
        ),
        (
            "not an object",
            call(port, "POST", &path, &json, b"[1]".to_vec())
                .await
                .unwrap(),
            400,
            "invalid_request",
        ),
        (
            "missing customerId",
            call(port, "POST", &path, &json, b"{}".to_vec())
                .await
                .unwrap(),
            400,
            "invalid_request",
        ),
        (
            "empty body",
            call(port, "POST", &path, &json, Vec::new()).await.unwrap(),
            400,
            "invalid_request",
        ),
        (
            "customerId not a string",
            call(port, "POST", &path, &json, b"{\"customerId\":7}".to_vec())
                .await
                .unwrap(),
            400,
            "invalid_request",
        ),
        (
            "customerId with a brace",
            call(port, "POST", &path, &json, body("a{b}"))
                .await
                .unwrap(),
            400,
            "invalid_request",
        ),
        (
            "customerId too long",
            call(port, "POST", &path, &json, body(&"a".repeat(65)))
                .await
                .unwrap(),
            400,
            "invalid_request",
        ),
        (
            "invalid UTF-8",
            call(
                port,
                "POST",
                &path,
                &json,
                b"{\"customerId\":\"a\xff\"}".to_vec(),
            )
            .await
            .unwrap(),
            400,
            "invalid_request",
        ),
        (
            "upper-case namespace",
            call(port, "POST", &grab_path("Shop", "sale"), &json, body("bob"))
                .await
                .unwrap(),
            400,
            "invalid_request",
        ),
        (
            "name with a colon",
            call(port, "POST", &grab_path("shop", "a:b"), &json, body("bob"))
                .await
                .unwrap(),
            400,
            "invalid_request",
        ),
        (
            "text/plain",
            call(
                port,
                "POST",
                &path,
                &[("content-type", "text/plain")],
                body("bob"),
            )
            .await
            .unwrap(),
            415,
            "unsupported_media_type",
        ),
        (
            "no content type",
            call(port, "POST", &path, &[], body("bob")).await.unwrap(),
            415,
            "unsupported_media_type",
        ),
        (
            "body over 4 KiB",
            call(
                port,
                "POST",
                &path,
                &json,
                format!(r#"{{"customerId":"bob","pad":"{}"}}"#, "x".repeat(5000)).into_bytes(),
            )
            .await
            .unwrap(),
            413,
            "payload_too_large",
        ),
        (
            "unknown promotion",
            worker.grab("shop", "nothing", "bob").await,
            404,
            "unknown_promotion",
        ),
        (
            "unknown route",
            call(port, "GET", "/api/v1/nothing", &[], Vec::new())
                .await
                .unwrap(),
            404,
            "not_found",
        ),
        (
            "GET on the grab route",
            call(port, "GET", &path, &[], Vec::new()).await.unwrap(),
            405,
            "method_not_allowed",
        ),
    ];
    for (what, reply, status, code) in &cases {
        assert_eq!(reply.status, *status, "{what}: {reply:?}");
        assert_eq!(reply.error(), *code, "{what}: {reply:?}");
        assert!(
            !reply.json["message"]
                .as_str()
                .unwrap_or_default()
                .is_empty(),
            "{what}: no message: {reply:?}"
        );
    }
    assert!(
        granted_in_stream(&mut con, &id).await.is_empty(),
        "bad input granted a coupon"
    );

    // Media-type parameters are fine.
    let ok = call(
        port,
        "POST",
        &path,
        &[("content-type", "application/json; charset=utf-8")],
        body("bob"),
    )
    .await
    .unwrap();
    assert_eq!(ok.status, 200, "{ok:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn before_the_publish_time_a_grab_is_409_with_retry_after_and_opens_on_time() {
    let server = redis();
    let mut con = connect(&server);
    schedule(&mut con, "later", 10, 1500).await;
    let worker = Worker::command(&server.url(), &[]).await;

    let early = worker.grab("shop", "later", "alice").await;
    assert_eq!(early.status, 409, "{early:?}");
    assert_eq!(early.error(), "not_started");
    let retry: u64 = early.headers["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=2).contains(&retry), "Retry-After {retry}");

    // not_started is never remembered: once Redis' clock passes, it opens.
    tokio::time::sleep(Duration::from_millis(1700)).await;
    let open = worker.grab("shop", "later", "alice").await;
    assert_eq!(open.status, 200, "{open:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sold_out_and_finished_promotions_answer_410_and_sold_out_needs_no_redis() {
    let server = redis();
    let mut con = connect(&server);
    let small = schedule(&mut con, "small", 2, -1000).await;
    let withdrawn = schedule(&mut con, "withdrawn", 5, -1000).await;
    schedule(&mut con, "other", 5, -1000).await;
    protocol::finish(&mut con, &withdrawn, FinishReason::Deleted)
        .await
        .unwrap();
    let worker = Worker::command(&server.url(), &[]).await;

    assert_eq!(worker.grab("shop", "small", "a").await.status, 200);
    assert_eq!(worker.grab("shop", "small", "b").await.status, 200);
    let late = worker.grab("shop", "small", "c").await;
    assert_eq!(late.status, 410, "{late:?}");
    assert_eq!(late.error(), "sold_out");
    assert!(
        late.json["message"]
            .as_str()
            .unwrap()
            .contains("GET /api/v1/customers/{customerId}/coupons"),
        "{late:?}"
    );
    let gone = worker.grab("shop", "withdrawn", "a").await;
    assert_eq!(gone.status, 410, "{gone:?}");
    assert_eq!(gone.error(), "finished");
    assert_eq!(granted_in_stream(&mut con, &small).await.len(), 2);

    // Redis stalls: the sold-out answer still comes, from memory, at once;
    // a grab that needs Redis is 503 within the Redis timeout.
    server.pause();
    // (Were Redis asked, the answer would be 503 after the 300 ms timeout.)
    let fast = worker.grab("shop", "small", "d").await;
    assert_eq!(fast.status, 410, "{fast:?}");
    assert_eq!(fast.error(), "sold_out");
    let fast = worker.grab("shop", "withdrawn", "d").await;
    assert_eq!(fast.status, 410, "{fast:?}");
    assert_eq!(fast.error(), "finished");
    // Once a promotion is known over, everyone gets the same 410 without
    // the body being read: it promises nothing and asks nothing of Redis.
    let unread = call(
        worker.port,
        "POST",
        &grab_path("shop", "small"),
        &[("content-type", JSON)],
        b"{not json".to_vec(),
    )
    .await
    .unwrap();
    assert_eq!(unread.status, 410, "{unread:?}");
    assert_eq!(unread.json, late.json, "the same answer for everyone");

    let started = Instant::now();
    let stalled = worker.grab("shop", "other", "d").await;
    assert_eq!(stalled.status, 503, "{stalled:?}");
    assert_eq!(stalled.error(), "unavailable");
    assert_eq!(stalled.headers["retry-after"], "1");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    let ready = call(worker.port, "GET", "/readyz", &[], Vec::new())
        .await
        .unwrap();
    assert_eq!(ready.status, 503, "{ready:?}");
    server.resume();

    let metrics = call(worker.port, "GET", "/metrics", &[], Vec::new())
        .await
        .unwrap();
    assert_eq!(metrics.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_promotion_is_remembered_for_one_second_only() {
    let server = redis();
    let mut con = connect(&server);
    let worker = Worker::command(&server.url(), &[]).await;

    assert_eq!(worker.grab("shop", "soon", "a").await.status, 404);
    schedule(&mut con, "soon", 5, -1000).await;
    // Within the second, the worker answers from memory.
    let remembered = worker.grab("shop", "soon", "a").await;
    assert_eq!(remembered.status, 404, "{remembered:?}");
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let now_known = worker.grab("shop", "soon", "a").await;
    assert_eq!(now_known.status, 200, "{now_known:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_customer_id_header_the_id_comes_from_the_header_only() {
    let server = redis();
    let mut con = connect(&server);
    let id = schedule(&mut con, "sale", 10, -1000).await;
    let worker = Worker::command(&server.url(), &["--customer-id-header", "X-Customer-Id"]).await;
    let path = grab_path("shop", "sale");

    let from_header = call(
        worker.port,
        "POST",
        &path,
        &[("x-customer-id", "carol")],
        Vec::new(),
    )
    .await
    .unwrap();
    assert_eq!(from_header.status, 200, "{from_header:?}");
    assert_eq!(from_header.json["customerId"], "carol");

    let body_ignored = call(
        worker.port,
        "POST",
        &path,
        &[("x-customer-id", "dave"), ("content-type", JSON)],
        body("mallory"),
    )
    .await
    .unwrap();
    assert_eq!(body_ignored.status, 200, "{body_ignored:?}");
    assert_eq!(body_ignored.json["customerId"], "dave");

    let with_empty_object = call(
        worker.port,
        "POST",
        &path,
        &[("x-customer-id", "erin"), ("content-type", JSON)],
        b"{}".to_vec(),
    )
    .await
    .unwrap();
    assert_eq!(with_empty_object.status, 200, "{with_empty_object:?}");

    let missing = call(
        worker.port,
        "POST",
        &path,
        &[("content-type", JSON)],
        body("mallory"),
    )
    .await
    .unwrap();
    assert_eq!(missing.status, 400, "{missing:?}");
    assert_eq!(missing.error(), "invalid_request");
    let bad = call(
        worker.port,
        "POST",
        &path,
        &[("x-customer-id", "a b")],
        Vec::new(),
    )
    .await
    .unwrap();
    assert_eq!(bad.status, 400, "{bad:?}");

    let granted: HashSet<String> = granted_in_stream(&mut con, &id).await;
    assert_eq!(granted.len(), 3, "{granted:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_killed_under_load_yields_only_200_or_503_and_every_200_is_in_the_stream() {
    let mut server = redis();
    let mut con = connect(&server);
    let id = schedule(&mut con, "big", 1_000_000, -1000).await;
    let worker = Arc::new(Worker::command(&server.url(), &[]).await);

    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut clients = Vec::new();
    for c in 0..32 {
        let worker = worker.clone();
        let stop = stop.clone();
        clients.push(tokio::spawn(async move {
            let mut coupons = Vec::new();
            let mut statuses = Vec::new();
            let mut n = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                n += 1;
                let reply = worker.grab("shop", "big", &format!("c{c}-{n}")).await;
                if reply.status == 200 {
                    coupons.push(reply.json["couponId"].as_str().unwrap().to_owned());
                }
                statuses.push(reply.status);
            }
            (coupons, statuses)
        }));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    server.kill();
    tokio::time::sleep(Duration::from_millis(700)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);

    let mut coupons = Vec::new();
    let mut statuses = HashSet::new();
    let mut unavailable = 0;
    for client in clients {
        let (c, s) = client.await.unwrap();
        coupons.extend(c);
        unavailable += s.iter().filter(|s| **s == 503).count();
        statuses.extend(s);
    }
    assert!(
        statuses.iter().all(|s| *s == 200 || *s == 503),
        "statuses {statuses:?}"
    );
    assert!(!coupons.is_empty(), "no grab succeeded before the kill");
    assert!(unavailable > 0, "no 503 while Redis was down");

    server.restart().unwrap();
    let mut con = connect(&server);
    let stream = granted_in_stream(&mut con, &id).await;
    let missing: Vec<_> = coupons.iter().filter(|c| !stream.contains(*c)).collect();
    assert!(
        missing.is_empty(),
        "200 answered for coupons not in the stream: {missing:?}"
    );
    let unique: HashSet<_> = coupons.iter().collect();
    assert_eq!(unique.len(), coupons.len(), "a coupon id was given twice");

    // The same worker recovers without a restart.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let reply = worker.grab("shop", "big", "after-restart").await;
        if reply.status == 200 {
            break;
        }
        assert_eq!(reply.status, 503, "{reply:?}");
        assert!(
            Instant::now() < deadline,
            "worker did not recover: {reply:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let ready = call(worker.port, "GET", "/readyz", &[], Vec::new())
        .await
        .unwrap();
    assert_eq!(ready.status, 200, "{ready:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_finishes_the_in_flight_grab_then_exits_0() {
    let server = redis();
    let mut con = connect(&server);
    let id = schedule(&mut con, "sale", 10, -1000).await;
    let worker = Worker::command(&server.url(), &["--redis-timeout-ms", "5000"]).await;
    // Warm the connection so the in-flight grab is blocked on Redis only.
    assert_eq!(worker.grab("shop", "sale", "warm").await.status, 200);

    server.pause();
    let port = worker.port;
    let in_flight = tokio::spawn(async move {
        call(
            port,
            "POST",
            &grab_path("shop", "sale"),
            &[("content-type", JSON)],
            body("late"),
        )
        .await
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    worker.signal("TERM");
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Stopped accepting: a new connection is refused while the grab is still open.
    assert!(
        tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_err(),
        "still accepting after SIGTERM"
    );
    server.resume();

    let reply = in_flight
        .await
        .unwrap()
        .expect("the in-flight grab is answered");
    assert_eq!(reply.status, 200, "{reply:?}");
    let coupon = reply.json["couponId"].as_str().unwrap().to_owned();
    let mut worker = worker;
    let status = worker.wait_exit(Duration::from_secs(10)).await;
    assert!(status.success(), "exit status {status:?}");
    assert!(granted_in_stream(&mut con, &id).await.contains(&coupon));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_customer_id_header_an_empty_or_repeated_value_names_no_one_and_grants_nothing() {
    let server = redis();
    let mut con = connect(&server);
    let id = schedule(&mut con, "sale", 10, -1000).await;
    let worker = Worker::command(&server.url(), &["--customer-id-header", "X-Customer-Id"]).await;
    let path = grab_path("shop", "sale");

    // Empty: the same answer as an absent header (the header is required).
    let empty = call(
        worker.port,
        "POST",
        &path,
        &[("x-customer-id", ""), ("content-type", JSON)],
        body("mallory"),
    )
    .await
    .unwrap();
    let absent = call(
        worker.port,
        "POST",
        &path,
        &[("content-type", JSON)],
        body("mallory"),
    )
    .await
    .unwrap();
    assert_eq!(empty.status, 400, "{empty:?}");
    assert_eq!(empty.error(), "invalid_request");
    assert_eq!(empty.json, absent.json, "empty is absent");
    // Twice: which value the gateway set cannot be told.
    let twice = call(
        worker.port,
        "POST",
        &path,
        &[("x-customer-id", "carol"), ("x-customer-id", "dave")],
        Vec::new(),
    )
    .await
    .unwrap();
    assert_eq!(twice.status, 400, "{twice:?}");
    assert_eq!(twice.error(), "invalid_request");
    assert!(granted_in_stream(&mut con, &id).await.is_empty());
}
