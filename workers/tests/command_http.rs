//! The grab endpoint of the real `seckill-worker command` binary, against a
//! real redis-server: every answer it promises, the sold-out fast path, Redis
//! failing under load, and graceful termination.

use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use seckill_testkit::client::{body, call, get, grab_path};
use seckill_testkit::process::unread_bytes;
use seckill_testkit::promotions::{id, spec_from_now};
use seckill_testkit::redis::{connect, redis, redis_with, Fsync, RedisServer};
use seckill_testkit::stream::{grants_of, stream_facts};
use seckill_testkit::{eventually, Reply, Worker, JSON};
use seckill_workers::protocol::{self, FinishReason, PromotionId};
use seckill_workers::redis_connection::RedisConnection;

/// Bounds every wait of these tests for something that must happen.
const WITHIN: Duration = Duration::from_secs(30);

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

/// A redis-server with `shop/sale` open (10 coupons), a connection to it,
/// and a command worker on it started with `worker_args`.
async fn open_sale(worker_args: &[&str]) -> (RedisServer, RedisConnection, PromotionId, Worker) {
    let server = redis();
    let mut con = connect(&server);
    let id = schedule(&mut con, "sale", 10, -1000).await;
    let worker = Worker::command(&server.url(), worker_args).await;
    (server, con, id, worker)
}

/// `POST` to the grab route of `shop/<name>`, with `headers` and `body`.
async fn post_grab(worker: &Worker, name: &str, headers: &[(&str, &str)], body: Vec<u8>) -> Reply {
    call(worker.port, "POST", &grab_path("shop", name), headers, body)
        .await
        .unwrap()
}

/// `POST` to the grab route of `shop/sale`, with `headers` and `body`.
async fn post_to_sale(worker: &Worker, headers: &[(&str, &str)], body: Vec<u8>) -> Reply {
    post_grab(worker, "sale", headers, body).await
}

/// Coupon ids of the CouponGrabbed events in the stream of `id`.
async fn granted_in_stream(con: &mut RedisConnection, id: &PromotionId) -> HashSet<String> {
    stream_facts(con, id)
        .await
        .coupons()
        .into_values()
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grab_is_granted_once_and_the_same_customer_gets_the_same_coupon_again() {
    let (_server, mut con, id, worker) = open_sale(&[]).await;

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
    let (_server, mut con, id, worker) = open_sale(&[]).await;
    let port = worker.port;
    let path = grab_path("shop", "sale");

    // A request: method, path, content type, body.
    let post = |content_type, body| ("POST", path.clone(), content_type, body);
    let as_json = |body: &[u8]| post(Some(JSON), body.to_vec());
    let bob_grabs = |ns, name| ("POST", grab_path(ns, name), Some(JSON), body("bob"));
    let get_path = |path: &str| ("GET", path.to_owned(), None, Vec::new());
    let too_big = format!(r#"{{"customerId":"bob","pad":"{}"}}"#, "x".repeat(5000));

    // Each error answer (status and code), with the requests that must get it.
    let cases = [
        (
            400,
            "invalid_request",
            vec![
                ("malformed JSON", as_json(b"{\"customerId\":")),
                ("not an object", as_json(b"[1]")),
                ("missing customerId", as_json(b"{}")),
                ("empty body", as_json(b"")),
                ("customerId not a string", as_json(b"{\"customerId\":7}")),
                ("customerId with a brace", as_json(&body("a{b}"))),
                ("customerId too long", as_json(&body(&"a".repeat(65)))),
                ("invalid UTF-8", as_json(b"{\"customerId\":\"a\xff\"}")),
                ("upper-case namespace", bob_grabs("Shop", "sale")),
                ("name with a colon", bob_grabs("shop", "a:b")),
            ],
        ),
        (
            415,
            "unsupported_media_type",
            vec![
                ("text/plain", post(Some("text/plain"), body("bob"))),
                ("no content type", post(None, body("bob"))),
            ],
        ),
        (
            413,
            "payload_too_large",
            vec![("body over 4 KiB", as_json(too_big.as_bytes()))],
        ),
        (
            404,
            "unknown_promotion",
            vec![("unknown promotion", bob_grabs("shop", "nothing"))],
        ),
        (
            404,
            "not_found",
            vec![("unknown route", get_path("/api/v1/nothing"))],
        ),
        (
            405,
            "method_not_allowed",
            vec![("GET on the grab route", get_path(&path))],
        ),
    ];
    for (status, code, requests) in cases {
        for (what, (method, path, content_type, body)) in requests {
            let headers: Vec<_> = content_type
                .map(|t| ("content-type", t))
                .into_iter()
                .collect();
            let reply = call(port, method, &path, &headers, body).await.unwrap();
            assert_eq!(reply.status, status, "{what}: {reply:?}");
            assert_eq!(reply.error(), code, "{what}: {reply:?}");
            assert!(
                !reply.json["message"]
                    .as_str()
                    .unwrap_or_default()
                    .is_empty(),
                "{what}: no message: {reply:?}"
            );
        }
    }
    assert!(
        granted_in_stream(&mut con, &id).await.is_empty(),
        "bad input granted a coupon"
    );

    // Media-type parameters are fine.
    let with_charset = [("content-type", "application/json; charset=utf-8")];
    let ok = post_to_sale(&worker, &with_charset, body("bob")).await;
    assert_eq!(ok.status, 200, "{ok:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn before_the_publish_time_a_grab_is_409_with_retry_after_and_opens_on_time() {
    let server = redis();
    let mut con = connect(&server);
    // The window is set once the worker is ready, relative to that moment.
    let worker = Worker::command(&server.url(), &[]).await;
    let scheduled_at = Utc::now();
    let spec = spec_from_now(0.8, 10, 2_000, 3_600_000);
    protocol::schedule(&mut con, &id("later"), &spec)
        .await
        .unwrap();

    let early = worker.grab("shop", "later", "alice").await;
    let asked_at = Utc::now();
    if asked_at < spec.publish_time {
        assert_eq!(early.status, 409, "{early:?}");
        assert_eq!(early.error(), "not_started");
        // Retry-After: the time left, rounded up to whole seconds.
        let retry = early.retry_after() as i64;
        let most = (spec.publish_time - scheduled_at).num_seconds() + 1;
        assert!((1..=most).contains(&retry), "Retry-After {retry}");
    }

    // not_started is never remembered: once Redis' clock passes the publish
    // time it opens; until then every answer is 409.
    let open = eventually(WITHIN, || async {
        let r = worker.grab("shop", "later", "alice").await;
        match r.status {
            200 => Ok(r),
            409 => Err(format!("still 409 at {}", Utc::now())),
            _ => panic!("neither 409 nor 200: {r:?}"),
        }
    })
    .await;
    let granted_at: chrono::DateTime<Utc> =
        open.json["grantedAt"].as_str().unwrap().parse().unwrap();
    assert!(granted_at >= spec.publish_time, "{open:?}");
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

    // Redis stalls: once the worker has read who holds the coupons of a
    // promotion that is over, the answer to anyone else still comes, from
    // memory (until then Redis tells holders from others); a grab that
    // needs Redis is 503 once the Redis timeout (the test kit's 5 s) has
    // passed.
    for (name, code) in [("small", "sold_out"), ("withdrawn", "finished")] {
        eventually(WITHIN, || async {
            server.pause();
            let fast = worker.grab("shop", name, "d").await;
            server.resume();
            match (fast.status, fast.error()) {
                (410, c) if c == code => Ok(()),
                _ => Err(format!("{name}: {fast:?}")),
            }
        })
        .await;
    }
    server.pause();
    let fast = worker.grab("shop", "small", "e").await;
    assert_eq!(
        fast.json, late.json,
        "the same 410 for everyone but holders"
    );
    // The customer id is read to tell holders apart: a request that names
    // no one is refused as such.
    let unread = post_grab(
        &worker,
        "small",
        &[("content-type", JSON)],
        b"{not json".to_vec(),
    )
    .await;
    assert_eq!(unread.status, 400, "{unread:?}");

    // Answered at all while Redis is still stopped: the timeout, not Redis.
    let stalled = worker.grab("shop", "other", "d").await;
    assert_eq!(stalled.status, 503, "{stalled:?}");
    assert_eq!(stalled.error(), "unavailable");
    assert_eq!(stalled.headers["retry-after"], "1");
    let ready = get(worker.port, "/readyz").await.unwrap();
    assert_eq!(ready.status, 503, "{ready:?}");
    server.resume();

    // A holder's retry after the sell-out gets its coupon.
    let holder = worker.grab("shop", "small", "a").await;
    assert_eq!(holder.status, 200, "{holder:?}");
    assert_eq!(holder.json["alreadyGranted"], true);

    let metrics = get(worker.port, "/metrics").await.unwrap();
    assert_eq!(metrics.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sold_out_grab_is_answered_before_routing_never_shed_counted_once_and_slow_bodies_get_408(
) {
    let server = redis();
    let mut con = connect(&server);
    schedule(&mut con, "small", 1, -1000).await;
    schedule(&mut con, "other", 5, -1000).await;
    let worker = Worker::command(
        &server.url(),
        &["--max-in-flight", "1", "--header-read-timeout-ms", "500"],
    )
    .await;
    assert_eq!(worker.grab("shop", "small", "a").await.status, 200);
    let late = worker.grab("shop", "small", "b").await;
    assert_eq!((late.status, late.error()), (410, "sold_out"), "{late:?}");
    // From memory once the holders are loaded: answered while Redis stalls.
    eventually(WITHIN, || async {
        server.pause();
        let fast = worker.grab("shop", "small", "c").await;
        server.resume();
        match (fast.status, fast.error()) {
            (410, "sold_out") => Ok(()),
            _ => Err(format!("{fast:?}")),
        }
    })
    .await;
    // The eventually above may have taken several tries: count from here.
    let counted = |text: &str| -> u64 {
        text.lines()
            .find(|l| {
                l.starts_with(r#"seckill_http_requests_total{route="/api/v1/promotions/{namespace}/{name}/grab",status="410",outcome="sold_out"}"#)
            })
            .and_then(|l| l.rsplit(' ').next()?.parse().ok())
            .unwrap_or(0)
    };
    let before = counted(&get(worker.port, "/metrics").await.unwrap().text);
    let mut sold_out_answers = 0;

    // The one in-flight permit taken by a grab stuck on a stalled Redis.
    server.pause();
    let stuck = {
        let port = worker.port;
        tokio::spawn(async move { seckill_testkit::client::grab(port, "shop", "other", "d").await })
    };
    // Through the router the same promotion's grab is shed; the lane answers it.
    let shed = eventually(WITHIN, || async {
        let routed = call(
            worker.port,
            "POST",
            "/api/v1/promotions/shop/smal%6c/grab",
            &[("content-type", JSON)],
            br#"{"customerId":"e"}"#.to_vec(),
        )
        .await
        .unwrap();
        match (routed.status, routed.text.contains("--max-in-flight")) {
            (503, true) => Ok(routed),
            _ => Err(format!("not shed yet: {routed:?}")),
        }
    })
    .await;
    assert_eq!(shed.status, 503);
    for customer in ["e", "f", "g"] {
        let fast = worker.grab("shop", "small", customer).await;
        assert_eq!((fast.status, fast.error()), (410, "sold_out"), "{fast:?}");
        assert_eq!(fast.json, late.json, "the same 410 as through the router");
        sold_out_answers += 1;
    }
    // A body past the limit is the router's (413), a malformed one the
    // handler's own answer (400), even with the permit taken.
    let big = post_grab(
        &worker,
        "small",
        &[("content-type", JSON)],
        vec![b' '; 8 * 1024],
    )
    .await;
    assert_eq!(big.status, 413, "{big:?}");
    let unread = post_grab(
        &worker,
        "small",
        &[("content-type", JSON)],
        b"{not json".to_vec(),
    )
    .await;
    assert_eq!(
        (unread.status, unread.error()),
        (400, "invalid_request"),
        "{unread:?}"
    );
    // A body that does not come within the header read timeout: 408.
    let mut slow = tokio::net::TcpStream::connect(("127.0.0.1", worker.port))
        .await
        .unwrap();
    let head = format!(
        "POST {} HTTP/1.1\r\nhost: seckill\r\ncontent-type: {JSON}\r\ncontent-length: 30\r\n\r\n{{\"customer",
        grab_path("shop", "small")
    );
    tokio::io::AsyncWriteExt::write_all(&mut slow, head.as_bytes())
        .await
        .unwrap();
    let mut answer = Vec::new();
    let read = tokio::time::timeout(
        WITHIN,
        tokio::io::AsyncReadExt::read_to_end(&mut slow, &mut answer),
    )
    .await;
    let answer = String::from_utf8_lossy(&answer);
    assert!(read.is_ok(), "no answer to a slow body: {answer}");
    assert!(
        answer.starts_with("HTTP/1.1 408") && answer.contains("request_timeout"),
        "{answer}"
    );
    server.resume();
    let stuck = stuck.await.unwrap().unwrap();
    assert!(matches!(stuck.status, 200 | 503), "{stuck:?}");

    // Each 410 counted once under the grab route, as the router counts it.
    let after = counted(&get(worker.port, "/metrics").await.unwrap().text);
    assert_eq!(
        after - before,
        sold_out_answers,
        "counted {before} then {after}"
    );
    // A holder's retry goes on to the router with its body, and Redis.
    let holder = worker.grab("shop", "small", "a").await;
    assert_eq!(holder.status, 200, "{holder:?}");
    assert_eq!(holder.json["alreadyGranted"], true);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_promotion_is_remembered_for_one_second_only() {
    let server = redis();
    let mut con = connect(&server);
    let worker = Worker::command(&server.url(), &[]).await;

    // The worker remembers "unknown" from the moment it answered the first
    // 404, which is after `asked`: an answer received less than a second
    // after `asked` must come from memory. A sample where this machine was
    // too slow to ask again within the second proves nothing and is taken
    // again with another promotion.
    let remembered = eventually(WITHIN, || async {
        let name = format!("soon-{}", Utc::now().timestamp_micros());
        let asked = Instant::now();
        assert_eq!(worker.grab("shop", &name, "a").await.status, 404);
        let id = schedule(&mut connect(&server), &name, 5, -1000).await;
        let again = worker.grab("shop", &name, "a").await;
        if asked.elapsed() < Duration::from_secs(1) {
            Ok((id, asked, again))
        } else {
            Err(format!("asked again only after {:?}", asked.elapsed()))
        }
    })
    .await;
    let (id, asked, again) = remembered;
    assert_eq!(again.status, 404, "answered from memory: {again:?}");

    // Once the second is over, the worker asks Redis again.
    let known = eventually(WITHIN, || async {
        let r = worker.grab(id.namespace(), id.name(), "a").await;
        match r.status {
            200 => Ok(r),
            404 => Err("still 404"),
            _ => panic!("{r:?}"),
        }
    })
    .await;
    assert!(
        asked.elapsed() >= Duration::from_secs(1),
        "forgotten before a second: {known:?}"
    );
    assert_eq!(grants_of(&mut con, &id).await.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_customer_id_header_the_id_comes_from_the_header_only() {
    let (_server, mut con, id, worker) =
        open_sale(&["--customer-id-header", "X-Customer-Id"]).await;

    let from_header = post_to_sale(&worker, &[("x-customer-id", "carol")], Vec::new()).await;
    assert_eq!(from_header.status, 200, "{from_header:?}");
    assert_eq!(from_header.json["customerId"], "carol");

    let body_ignored = post_to_sale(
        &worker,
        &[("x-customer-id", "dave"), ("content-type", JSON)],
        body("mallory"),
    )
    .await;
    assert_eq!(body_ignored.status, 200, "{body_ignored:?}");
    assert_eq!(body_ignored.json["customerId"], "dave");

    let with_empty_object = post_to_sale(
        &worker,
        &[("x-customer-id", "erin"), ("content-type", JSON)],
        b"{}".to_vec(),
    )
    .await;
    assert_eq!(with_empty_object.status, 200, "{with_empty_object:?}");

    let missing = post_to_sale(&worker, &[("content-type", JSON)], body("mallory")).await;
    assert_eq!(missing.status, 400, "{missing:?}");
    assert_eq!(missing.error(), "invalid_request");
    let bad = post_to_sale(&worker, &[("x-customer-id", "a b")], Vec::new()).await;
    assert_eq!(bad.status, 400, "{bad:?}");

    let granted: HashSet<String> = granted_in_stream(&mut con, &id).await;
    assert_eq!(granted.len(), 3, "{granted:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_killed_under_load_yields_only_200_or_503_and_every_200_is_in_the_stream() {
    // appendfsync always: only then does every answered grant survive a
    // kill -9 (with everysec the last ~2 s may not; docs/RELIABILITY.md).
    let mut server = redis_with(Some(Fsync::Always));
    let mut con = connect(&server);
    let id = schedule(&mut con, "big", 1_000_000, -1000).await;
    let worker = Arc::new(Worker::command(&server.url(), &[]).await);

    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (granted, unavailable_seen) =
        (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let mut clients = Vec::new();
    for c in 0..32 {
        let (worker, stop) = (worker.clone(), stop.clone());
        let (granted, unavailable_seen) = (granted.clone(), unavailable_seen.clone());
        clients.push(tokio::spawn(async move {
            let mut coupons = Vec::new();
            let mut statuses = Vec::new();
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                let reply = worker.grab("shop", "big", &format!("c{c}-{n}")).await;
                match reply.status {
                    200 => {
                        coupons.push(reply.json["couponId"].as_str().unwrap().to_owned());
                        granted.fetch_add(1, Ordering::Relaxed);
                    }
                    503 => {
                        unavailable_seen.fetch_add(1, Ordering::Relaxed);
                    }
                    _ => {}
                }
                statuses.push(reply.status);
            }
            (coupons, statuses)
        }));
    }
    // Killed once grabs are being granted; stopped once 503s come.
    let at_least = |counter: Arc<AtomicUsize>, n: usize| {
        eventually(WITHIN, move || {
            let seen = counter.load(Ordering::Relaxed);
            async move { (seen >= n).then_some(()).ok_or(seen) }
        })
    };
    at_least(granted.clone(), 100).await;
    server.kill();
    at_least(unavailable_seen.clone(), 32).await;
    stop.store(true, Ordering::Relaxed);

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
    eventually(WITHIN, || async {
        let reply = worker.grab("shop", "big", "after-restart").await;
        match reply.status {
            200 => Ok(()),
            503 => Err(reply),
            _ => panic!("neither 503 nor 200: {reply:?}"),
        }
    })
    .await;
    let ready = get(worker.port, "/readyz").await.unwrap();
    assert_eq!(ready.status, 200, "{ready:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_finishes_the_in_flight_grab_then_exits_0() {
    let (server, mut con, id, worker) = open_sale(&["--redis-timeout-ms", "5000"]).await;
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
    // In flight: the worker has sent the grab on to the stopped Redis (its
    // script waits, unread, in Redis' receive queue).
    eventually(WITHIN, || async {
        let queued = unread_bytes(server.port());
        (queued > 0).then_some(()).ok_or(queued)
    })
    .await;
    worker.signal("TERM");
    // Stopped accepting: a new connection is refused while the grab is still open.
    eventually(WITHIN, || async {
        match tokio::net::TcpStream::connect(("127.0.0.1", port)).await {
            Err(_) => Ok(()),
            Ok(_) => Err("still accepting after SIGTERM"),
        }
    })
    .await;
    assert!(
        !in_flight.is_finished(),
        "the grab was answered while Redis is stopped"
    );
    server.resume();

    let reply = in_flight
        .await
        .unwrap()
        .expect("the in-flight grab is answered");
    assert_eq!(reply.status, 200, "{reply:?}");
    let coupon = reply.json["couponId"].as_str().unwrap().to_owned();
    let mut worker = worker;
    let status = worker.wait_exit(WITHIN).await;
    assert!(status.success(), "exit status {status:?}");
    assert!(granted_in_stream(&mut con, &id).await.contains(&coupon));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_customer_id_header_an_empty_or_repeated_value_names_no_one_and_grants_nothing() {
    let (_server, mut con, id, worker) =
        open_sale(&["--customer-id-header", "X-Customer-Id"]).await;

    // Empty: the same answer as an absent header (the header is required).
    let empty = post_to_sale(
        &worker,
        &[("x-customer-id", ""), ("content-type", JSON)],
        body("mallory"),
    )
    .await;
    let absent = post_to_sale(&worker, &[("content-type", JSON)], body("mallory")).await;
    assert_eq!(empty.status, 400, "{empty:?}");
    assert_eq!(empty.error(), "invalid_request");
    assert_eq!(empty.json, absent.json, "empty is absent");
    // Twice: which value the gateway set cannot be told.
    let twice = post_to_sale(
        &worker,
        &[("x-customer-id", "carol"), ("x-customer-id", "dave")],
        Vec::new(),
    )
    .await;
    assert_eq!(twice.status, 400, "{twice:?}");
    assert_eq!(twice.error(), "invalid_request");
    assert!(granted_in_stream(&mut con, &id).await.is_empty());
}
