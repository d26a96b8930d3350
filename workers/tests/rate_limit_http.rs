//! Rate limiting of the grab endpoint, through the real `seckill-worker
//! command` binary against a real redis-server: a client over its rate is
//! answered 429 with `Retry-After` before any Redis call, other clients are
//! served meanwhile, the client is served again after waiting, and with
//! limiting off (the default) nobody is ever answered 429.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use chrono::{TimeZone, Utc};
use http_body_util::{BodyExt, Full};
use hyper::{HeaderMap, Request};
use hyper_util::rt::TokioIo;
use seckill_workers::protocol::{self, PromotionId, PromotionSpec};
use seckill_workers::redis_connection::{RedisArgs, RedisConnection};
use seckill_workers::redis_server::{free_port, RedisServer, RedisServerOptions};
use serde_json::Value;

/// A `seckill-worker command` child process; killed when dropped.
struct Worker {
    child: Child,
    port: u16,
}

impl Worker {
    async fn start(redis_url: &str, extra: &[&str]) -> Self {
        let port = free_port().unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_seckill-worker"))
            .args(["command", "--listen", &format!("127.0.0.1:{port}")])
            .args(["--redis-url", redis_url, "--redis-timeout-ms", "500"])
            .args(extra)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .expect("seckill-worker starts");
        let worker = Self { child, port };
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if let Ok(r) = call(port, "GET", "/healthz", &[], Vec::new()).await {
                if r.status == 200 {
                    return worker;
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("worker did not answer /healthz on port {port}");
    }

    async fn grab(&self, customer: &str, headers: &[(&str, &str)]) -> Reply {
        let mut all = vec![("content-type", "application/json")];
        all.extend_from_slice(headers);
        call(
            self.port,
            "POST",
            "/api/v1/promotions/shop/sale/grab",
            &all,
            format!(r#"{{"customerId":"{customer}"}}"#).into_bytes(),
        )
        .await
        .expect("worker answers")
    }

    async fn metrics(&self) -> String {
        let stream = tokio::net::TcpStream::connect(("127.0.0.1", self.port))
            .await
            .unwrap();
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .unwrap();
        tokio::spawn(connection);
        let request = Request::get("/metrics")
            .header("host", "x")
            .body(Full::new(Bytes::new()))
            .unwrap();
        let response = sender.send_request(request).await.unwrap();
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        String::from_utf8_lossy(&bytes).into_owned()
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[derive(Debug)]
struct Reply {
    status: u16,
    headers: HeaderMap,
    json: Value,
}

impl Reply {
    fn error(&self) -> &str {
        self.json["error"].as_str().unwrap_or_default()
    }

    fn retry_after(&self) -> u64 {
        self.headers["retry-after"]
            .to_str()
            .unwrap()
            .parse()
            .unwrap()
    }
}

/// One request on a fresh connection.
async fn call(
    port: u16,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Vec<u8>,
) -> Result<Reply, Box<dyn std::error::Error + Send + Sync>> {
    let stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(connection);
    let mut request = Request::builder()
        .method(method)
        .uri(path)
        .header("host", format!("127.0.0.1:{port}"));
    for (k, v) in headers {
        request = request.header(*k, *v);
    }
    let response = sender
        .send_request(request.body(Full::new(Bytes::from(body)))?)
        .await?;
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let bytes = response.into_body().collect().await?.to_bytes();
    let json = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    Ok(Reply {
        status,
        headers,
        json,
    })
}

/// A redis-server with `shop/sale` open (1,000 coupons).
async fn redis_with_sale() -> (RedisServer, RedisConnection) {
    let server = RedisServer::start(RedisServerOptions::default()).expect("redis-server starts");
    let mut con = RedisArgs::for_url(server.url()).connect().unwrap();
    let now = Utc::now().timestamp_millis();
    let spec = PromotionSpec {
        discount: 0.8,
        number_of_coupons: 1000,
        publish_time: Utc.timestamp_millis_opt(now - 1000).unwrap(),
        finish_time: Utc.timestamp_millis_opt(now + 3_600_000).unwrap(),
    };
    protocol::schedule(&mut con, &PromotionId::new("shop", "sale").unwrap(), &spec)
        .await
        .unwrap();
    (server, con)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_customer_over_the_limit_gets_429_before_redis_while_others_are_served_then_is_served_again(
) {
    let (server, _con) = redis_with_sale().await;
    let worker = Worker::start(
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
        let r = worker.grab("alice", &[]).await;
        assert_eq!(r.status, 200, "grab {i}: {r:?}");
    }
    let limited = worker.grab("alice", &[]).await;
    assert_eq!(limited.status, 429, "{limited:?}");
    assert_eq!(limited.error(), "rate_limited");
    assert!(!limited.json["message"].as_str().unwrap().is_empty());
    let retry = limited.retry_after();
    assert_eq!(retry, 2, "one token per 2 s");

    // Other customers have buckets of their own.
    for c in ["bob", "carol"] {
        let r = worker.grab(c, &[]).await;
        assert_eq!(r.status, 200, "{c}: {r:?}");
    }

    // The 429 is decided before any Redis call: with Redis stalled it still
    // comes at once (a Redis call would wait for the 500 ms timeout, then 503).
    server.pause();
    let started = Instant::now();
    let limited = worker.grab("alice", &[]).await;
    let took = started.elapsed();
    let stalled = worker.grab("dave", &[]).await;
    server.resume();
    assert_eq!(limited.status, 429, "{limited:?}");
    assert!(took < Duration::from_millis(300), "429 took {took:?}");
    assert_eq!(
        stalled.status, 503,
        "a served grab does ask Redis: {stalled:?}"
    );

    // After waiting as told, alice is served again: the same coupon.
    let limited = worker.grab("alice", &[]).await;
    assert_eq!(limited.status, 429, "{limited:?}");
    tokio::time::sleep(Duration::from_secs(limited.retry_after())).await;
    let again = worker.grab("alice", &[]).await;
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
    let trusted = Worker::start(&server.url(), &trusted_args).await;
    let a = [("x-forwarded-for", "203.0.113.7, 10.0.0.1")];
    let b = [("x-forwarded-for", "198.51.100.9")];
    assert_eq!(trusted.grab("a1", &a).await.status, 200);
    assert_eq!(trusted.grab("a2", &a).await.status, 200);
    let limited = trusted.grab("a3", &a).await;
    assert_eq!(limited.status, 429, "{limited:?}");
    assert!(limited.retry_after() >= 1);
    // A bad body from a limited client is still 429: the IP is checked first.
    let garbage = call(
        trusted.port,
        "POST",
        "/api/v1/promotions/shop/sale/grab",
        &[("content-type", "application/json"), a[0]],
        b"{".to_vec(),
    )
    .await
    .unwrap();
    assert_eq!(garbage.status, 429, "{garbage:?}");
    assert_eq!(trusted.grab("b1", &b).await.status, 200);
    assert_eq!(trusted.grab("b2", &b).await.status, 200);
    drop(trusted);

    // Not trusted: the header is ignored; every request is 127.0.0.1.
    let untrusted = Worker::start(&server.url(), &limits).await;
    assert_eq!(untrusted.grab("c1", &a).await.status, 200);
    assert_eq!(untrusted.grab("c2", &b).await.status, 200);
    let limited = untrusted
        .grab("c3", &[("x-forwarded-for", "192.0.2.1")])
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
    let worker = Worker::start(&server.url(), &[]).await;
    let mut statuses = Vec::new();
    for _ in 0..60 {
        statuses.push(worker.grab("hammer", &[]).await.status);
    }
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    // Nothing registered a limit either.
    assert!(!worker.metrics().await.contains("rate_limited_total{"));
}
