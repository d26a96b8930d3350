//! What the integration tests of `seckill-workers` share: a real
//! `seckill-worker` child process, a one-request HTTP client, a private
//! redis-server and promotions on it, and readers of a promotion's stream.
//!
//! Every test file compiles this module on its own (`mod support;`) and uses
//! only part of it, hence the `dead_code` allowance.
#![allow(dead_code)]

use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use chrono::{TimeZone, Utc};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper::{HeaderMap, Request};
use hyper_util::rt::TokioIo;
use seckill_workers::projector;
use seckill_workers::protocol::{
    self, CouponGrabbed, CustomerId, Event, PromotionId, PromotionKeys, PromotionSpec, EVENT_FIELD,
    PROJECTOR_GROUP, PROMOTION_INDEX_KEY,
};
use seckill_workers::redis_connection::{RedisArgs, RedisConnection};
use seckill_workers::redis_server::{free_port, Fsync, RedisServer, RedisServerOptions};
use serde_json::Value;

pub const WORKER: &str = env!("CARGO_BIN_EXE_seckill-worker");
pub const JSON: &str = "application/json";

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// True for the long versions of the fault tests (`SECKILL_FAULTS_LONG=1`,
/// used by `make faults`).
pub fn long() -> bool {
    std::env::var("SECKILL_FAULTS_LONG").is_ok_and(|v| v == "1")
}

// ---------------------------------------------------------------- processes

/// A `seckill-worker` child process (command or projector); killed when
/// dropped, even when a test left it stopped.
pub struct Worker {
    pub child: Child,
    /// Its HTTP port (the API of a command worker, the metrics of a projector).
    pub port: u16,
}

/// How [`Worker::command_with`] starts a command worker.
pub struct CommandOptions<'a> {
    /// `RUST_LOG` of the worker.
    pub log: &'a str,
    /// `--redis-timeout-ms` unless the extra arguments give one.
    pub redis_timeout_ms: Option<&'a str>,
    /// A wall-clock skew for libfaketime (e.g. `+5m`).
    pub skew: Option<&'a str>,
}

impl Default for CommandOptions<'_> {
    fn default() -> Self {
        Self {
            log: "warn",
            redis_timeout_ms: Some("300"),
            skew: None,
        }
    }
}

impl Worker {
    /// Spawns `seckill-worker args` serving on `port`, with `RUST_LOG=log`
    /// when given (else the test's own), and with its wall clock skewed by
    /// `skew` (e.g. `+5m`) under libfaketime, preloaded directly (the
    /// `faketime` wrapper would stay the parent, and killing it would orphan
    /// the worker). Does not wait for it.
    pub fn spawn(args: &[&str], log: Option<&str>, skew: Option<&str>, port: u16) -> Self {
        let mut command = Command::new(WORKER);
        if let Some(skew) = skew {
            command
                .env("LD_PRELOAD", libfaketime())
                .env("FAKETIME", skew)
                // Shift the wall clock only; timers keep real time.
                .env("FAKETIME_DONT_FAKE_MONOTONIC", "1");
        }
        if let Some(log) = log {
            command.env("RUST_LOG", log);
        }
        let child = command
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("seckill-worker starts");
        Self { child, port }
    }

    /// `seckill-worker command` on a free port with the default
    /// [`CommandOptions`]; returns once /healthz answers 200.
    pub async fn command(redis_url: &str, extra: &[&str]) -> Self {
        Self::command_with(redis_url, extra, CommandOptions::default()).await
    }

    /// `seckill-worker command --redis-url <redis_url> <extra>` on a free
    /// port; returns once /healthz answers 200 (15 s at most).
    pub async fn command_with(
        redis_url: &str,
        extra: &[&str],
        options: CommandOptions<'_>,
    ) -> Self {
        let port = free_port().unwrap();
        let listen = format!("127.0.0.1:{port}");
        let mut args = vec!["command", "--listen", &listen, "--redis-url", redis_url];
        if let Some(timeout) = options.redis_timeout_ms {
            if !extra.contains(&"--redis-timeout-ms") {
                args.extend(["--redis-timeout-ms", timeout]);
            }
        }
        args.extend(extra);
        let worker = Self::spawn(&args, Some(options.log), options.skew, port);
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

    /// `kill -<sig>`; the signal must be delivered.
    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.child.id().to_string())
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -{sig}");
    }

    /// kill -9, and reap.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Waits for the process to exit by itself.
    pub async fn wait_exit(&mut self, within: Duration) -> ExitStatus {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "worker did not exit within {within:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// `POST /api/v1/promotions/{ns}/{name}/grab` as `customer` (JSON body).
    pub async fn grab(&self, ns: &str, name: &str, customer: &str) -> Reply {
        self.grab_with_headers(ns, name, customer, &[]).await
    }

    /// [`Worker::grab`] with more request headers.
    pub async fn grab_with_headers(
        &self,
        ns: &str,
        name: &str,
        customer: &str,
        headers: &[(&str, &str)],
    ) -> Reply {
        let mut all = vec![("content-type", JSON)];
        all.extend_from_slice(headers);
        call(
            self.port,
            "POST",
            &grab_path(ns, name),
            &all,
            body(customer),
        )
        .await
        .expect("worker answers")
    }

    /// The Prometheus exposition of its `/metrics`.
    pub async fn metrics(&self) -> String {
        metrics_of(self.port).await
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            // A stopped process dies of SIGKILL only once continued.
            let _ = Command::new("kill")
                .arg("-CONT")
                .arg(self.child.id().to_string())
                .stderr(Stdio::null())
                .status();
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// libfaketime's preload library (Debian package `faketime`).
pub fn libfaketime() -> std::path::PathBuf {
    let mut candidates = vec![std::path::PathBuf::from(
        "/usr/lib/faketime/libfaketime.so.1",
    )];
    if let Ok(dirs) = std::fs::read_dir("/usr/lib") {
        for d in dirs.flatten() {
            candidates.push(d.path().join("faketime/libfaketime.so.1"));
        }
    }
    candidates.into_iter().find(|p| p.exists()).expect(
        "libfaketime is not installed: apt-get install faketime (scripts/install-deps.sh redis)",
    )
}

// ---------------------------------------------------------------- HTTP

pub fn grab_path(ns: &str, name: &str) -> String {
    format!("/api/v1/promotions/{ns}/{name}/grab")
}

/// A grab request body.
pub fn body(customer: &str) -> Vec<u8> {
    format!(r#"{{"customerId":"{customer}"}}"#).into_bytes()
}

/// An HTTP answer: status, headers, the body as JSON (`Null` when it is
/// not) and as text.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub headers: HeaderMap,
    pub json: Value,
    pub text: String,
}

impl Reply {
    /// The `error` code of an error envelope ("" when there is none).
    pub fn error(&self) -> &str {
        self.json["error"].as_str().unwrap_or_default()
    }

    /// The `Retry-After` header, in seconds.
    pub fn retry_after(&self) -> u64 {
        self.headers["retry-after"]
            .to_str()
            .unwrap()
            .parse()
            .unwrap()
    }
}

/// An HTTP/1.1 connection to `127.0.0.1:port`, with Nagle's algorithm off
/// when `nodelay`.
pub async fn connect_http(port: u16, nodelay: bool) -> Result<SendRequest<Full<Bytes>>, BoxError> {
    let stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    if nodelay {
        let _ = stream.set_nodelay(true);
    }
    let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(connection);
    Ok(sender)
}

/// One request on `sender` (a keep-alive connection to `port`).
pub async fn send(
    sender: &mut SendRequest<Full<Bytes>>,
    port: u16,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Vec<u8>,
) -> Result<Reply, BoxError> {
    sender.ready().await?;
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
    Ok(Reply {
        status,
        headers,
        json: serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        text: String::from_utf8_lossy(&bytes).into_owned(),
    })
}

/// One request on a fresh connection.
pub async fn call(
    port: u16,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Vec<u8>,
) -> Result<Reply, BoxError> {
    let mut sender = connect_http(port, false).await?;
    send(&mut sender, port, method, path, headers, body).await
}

/// The Prometheus exposition served on `port`.
pub async fn metrics_of(port: u16) -> String {
    call(port, "GET", "/metrics", &[], Vec::new())
        .await
        .expect("metrics answer")
        .text
}

/// The value of the first sample of `name` in a Prometheus exposition (0
/// when there is none).
pub fn metric_value(exposition: &str, name: &str) -> f64 {
    exposition
        .lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with([' ', '{']))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

// ---------------------------------------------------------------- Redis side

/// A private redis-server with the default options.
pub fn redis() -> RedisServer {
    RedisServer::start(RedisServerOptions::default()).expect("redis-server starts")
}

/// A private redis-server with `appendfsync` (`None`: no AOF).
pub fn redis_with(appendfsync: Option<Fsync>) -> RedisServer {
    RedisServer::start(RedisServerOptions {
        appendfsync,
        ..RedisServerOptions::default()
    })
    .expect("redis-server starts")
}

pub fn connect(server: &RedisServer) -> RedisConnection {
    RedisArgs::for_url(server.url())
        .connect()
        .expect("connection")
}

/// A connection to the read models (their own database, as the workers
/// open it by default).
pub fn connect_read_models(server: &RedisServer) -> RedisConnection {
    RedisArgs::for_url(server.url())
        .connect_read_models()
        .expect("connection")
}

/// `shop/<name>`.
pub fn id(name: &str) -> PromotionId {
    PromotionId::new("shop", name).unwrap()
}

/// Customer `c-<n>`.
pub fn customer(n: impl std::fmt::Display) -> CustomerId {
    CustomerId::parse(&format!("c-{n}")).unwrap()
}

/// A spec whose window is [now + open_in, now + open_in + length), on this
/// machine's clock.
pub fn spec_from_now(
    discount: f64,
    coupons: u64,
    open_in_ms: i64,
    length_ms: i64,
) -> PromotionSpec {
    let now = Utc::now().timestamp_millis();
    PromotionSpec {
        discount,
        number_of_coupons: coupons,
        publish_time: Utc.timestamp_millis_opt(now + open_in_ms).unwrap(),
        finish_time: Utc
            .timestamp_millis_opt(now + open_in_ms + length_ms)
            .unwrap(),
    }
}

/// Adds `id` to the promotion index projectors read, as the operator does.
pub async fn index_for_projectors(con: &mut RedisConnection, id: &PromotionId) {
    let _: () = redis::cmd("SADD")
        .arg(PROMOTION_INDEX_KEY)
        .arg(id.to_string())
        .query_async(con)
        .await
        .unwrap();
}

/// Registers `id` with `coupons` coupons at `discount`, open since a second
/// ago for an hour (so `schedule` starts it), and indexes it for projectors.
pub async fn start_promotion(
    con: &mut RedisConnection,
    id: &PromotionId,
    discount: f64,
    coupons: u64,
) {
    let spec = spec_from_now(discount, coupons, -1_000, 3_601_000);
    let snap = protocol::schedule(con, id, &spec).await.unwrap();
    assert!(snap.started, "{snap:?}");
    index_for_projectors(con, id).await;
}

/// Every event of `id`'s stream with its entry id, in stream order. Each
/// entry holds the event field only, and every event decodes.
pub async fn stream_events(con: &mut RedisConnection, id: &PromotionId) -> Vec<(String, Event)> {
    projector::stream_entries(con, id)
        .await
        .unwrap()
        .iter()
        .map(|entry| {
            for field in entry.map.keys() {
                assert_eq!(field, EVENT_FIELD, "{entry:?}");
            }
            let raw: Vec<u8> = entry.get(EVENT_FIELD).expect("event field");
            let event = Event::decode(&raw).expect("every event decodes");
            (entry.id.clone(), event)
        })
        .collect()
}

/// Every event of `id`'s stream, in stream order.
pub async fn events_of(con: &mut RedisConnection, id: &PromotionId) -> Vec<Event> {
    stream_events(con, id)
        .await
        .into_iter()
        .map(|(_, event)| event)
        .collect()
}

/// The CouponGrabbed events of `id`'s stream, in stream order.
pub async fn grants_of(con: &mut RedisConnection, id: &PromotionId) -> Vec<CouponGrabbed> {
    events_of(con, id)
        .await
        .into_iter()
        .filter_map(|event| match event {
            Event::CouponGrabbed(g) => Some(g),
            _ => None,
        })
        .collect()
}

/// XPENDING's summary: count, smallest id, greatest id, (consumer, count).
type PendingSummary = (
    i64,
    Option<String>,
    Option<String>,
    Option<Vec<(String, String)>>,
);

async fn pending_summary(
    con: &mut RedisConnection,
    id: &PromotionId,
) -> redis::RedisResult<PendingSummary> {
    redis::cmd("XPENDING")
        .arg(PromotionKeys::new(id).events)
        .arg(PROJECTOR_GROUP)
        .query_async(con)
        .await
}

/// Pending entries of the projector group on `id`'s stream.
pub async fn pending_total(con: &mut RedisConnection, id: &PromotionId) -> i64 {
    pending_summary(con, id).await.unwrap().0
}

/// Entries of `id`'s stream that `consumer` of the projector group holds;
/// an error when Redis cannot say (no group yet, Redis down).
pub async fn pending_of(
    con: &mut RedisConnection,
    id: &PromotionId,
    consumer: &str,
) -> redis::RedisResult<i64> {
    Ok(pending_summary(con, id)
        .await?
        .3
        .unwrap_or_default()
        .iter()
        .filter(|(c, _)| c == consumer)
        .map(|(_, n)| n.parse::<i64>().unwrap())
        .sum())
}
