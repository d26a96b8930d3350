//! Operator fault scenarios (issue 7) with real processes: `seckill up
//! --roles operator` (the reconcile core the Kubernetes controller runs,
//! `lifecycle::drive`) on manifest files and a real redis-server, while
//! `seckill up --roles command,projector` serves a crowd of customers.
//!
//! * the operator killed -9 right at publishTime and right at finishTime and
//!   started again;
//! * two operators at once (no leader election: `seckill up` has none);
//! * an operator whose host clock is five minutes ahead or behind
//!   (libfaketime).
//!
//! Each ends with exactly one PromotionStarted and one PromotionFinished in
//! the stream, at or after their deadlines on Redis' clock, at most
//! numberOfCoupons grants, no customer twice, and every 200 in the stream.
//! `SECKILL_FAULTS_LONG=1` (used by `make faults`) runs more rounds.

mod support;

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use chrono::{SecondsFormat, TimeZone, Utc};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper::Request;
use hyper_util::rt::TokioIo;
use seckill_workers::projector;
use seckill_workers::protocol::{
    CouponGrabbed, Event, FinishReason, PromotionFinished, PromotionId, PromotionStarted,
    EVENT_FIELD,
};
use seckill_workers::redis_connection::{RedisArgs, RedisConnection};
use seckill_workers::redis_server::{free_port, Fsync, RedisServer, RedisServerOptions};
use support::{Up, SECKILL};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

fn long() -> bool {
    std::env::var("SECKILL_FAULTS_LONG").is_ok_and(|v| v == "1")
}

fn rfc3339(ms: i64) -> String {
    Utc.timestamp_millis_opt(ms)
        .unwrap()
        .to_rfc3339_opts(SecondsFormat::Millis, true)
}

fn write_manifest(dir: &Path, name: &str, coupons: u64, publish_ms: i64, finish_ms: i64) {
    std::fs::write(
        dir.join(format!("{name}.yaml")),
        format!(
            "apiVersion: seckill.io/v1\nkind: Promotion\nmetadata:\n  name: {name}\n  namespace: shop\nspec:\n  publishTime: \"{}\"\n  finishTime: \"{}\"\n  numberOfCoupons: {coupons}\n  discount: 0.5\n",
            rfc3339(publish_ms),
            rfc3339(finish_ms)
        ),
    )
    .unwrap();
}

/// libfaketime's preload library (Debian package `faketime`).
fn libfaketime() -> std::path::PathBuf {
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

/// Starting `seckill up` with the roles these scenarios need.
impl Up {
    /// `seckill up --roles <roles> --redis-url <url> [-f dir]`, with its wall
    /// clock skewed by libfaketime when `skew` is given (e.g. `+5m`).
    fn start(roles: &str, redis_url: &str, files: Option<&Path>, skew: Option<&str>) -> Self {
        let port = free_port().unwrap();
        let mut command = Command::new(SECKILL);
        command.args([
            "up",
            "--roles",
            roles,
            "--redis-url",
            redis_url,
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--watch-interval-ms",
            "100",
        ]);
        if let Some(dir) = files {
            command.arg("-f").arg(dir);
        }
        if let Some(skew) = skew {
            command
                .env("LD_PRELOAD", libfaketime())
                .env("FAKETIME", skew)
                .env("FAKETIME_DONT_FAKE_MONOTONIC", "1");
        }
        command
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stderr(Stdio::inherit());
        Self::spawn(command, port)
    }

    /// Waits until /readyz answers 200.
    async fn ready(self) -> Self {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(mut s) = connect_http(self.port).await {
                if let Ok((200, _)) = send(&mut s, "GET", "/readyz", Vec::new()).await {
                    return self;
                }
            }
            assert!(Instant::now() < deadline, "seckill up never became ready");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

async fn connect_http(port: u16) -> Result<SendRequest<Full<Bytes>>, BoxError> {
    let stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(connection);
    Ok(sender)
}

async fn send(
    sender: &mut SendRequest<Full<Bytes>>,
    method: &str,
    path: &str,
    body: Vec<u8>,
) -> Result<(u16, serde_json::Value), BoxError> {
    sender.ready().await?;
    let request = Request::builder()
        .method(method)
        .uri(path)
        .header("host", "127.0.0.1")
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body)))?;
    let response = sender.send_request(request).await?;
    let status = response.status().as_u16();
    let bytes = response.into_body().collect().await?.to_bytes();
    Ok((status, serde_json::from_slice(&bytes).unwrap_or_default()))
}

/// A crowd grabbing every promotion in `names` from `port`, each customer
/// retrying 409 (not yet open) and 503 until a final answer (200 or 410) or
/// until stopped; new customers keep arriving until stopped.
struct Crowd {
    stop: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<Vec<CrowdAnswer>>>,
}

/// One answer: (promotion, customer, status, couponId of a 200).
type CrowdAnswer = (String, String, u16, Option<String>);

/// What the crowd got: (promotion, customer) -> last status, couponIds of 200s.
#[derive(Default)]
struct CrowdLog {
    answers: Vec<CrowdAnswer>,
}

impl CrowdLog {
    fn granted(&self, promotion: &str) -> HashMap<String, HashSet<String>> {
        let mut out: HashMap<String, HashSet<String>> = HashMap::new();
        for (p, customer, status, coupon) in &self.answers {
            if p == promotion && *status == 200 {
                out.entry(customer.clone())
                    .or_default()
                    .insert(coupon.clone().expect("a 200 has a couponId"));
            }
        }
        out
    }

    fn count(&self, status: u16) -> usize {
        self.answers.iter().filter(|a| a.2 == status).count()
    }
}

impl Crowd {
    fn start(port: u16, names: &[&str], concurrency: usize) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let names: Arc<Vec<String>> = Arc::new(names.iter().map(|n| n.to_string()).collect());
        let tasks = (0..concurrency)
            .map(|t| {
                let stop = stop.clone();
                let names = names.clone();
                tokio::spawn(async move {
                    let mut log = Vec::new();
                    let mut sender = None;
                    let mut n = 0;
                    'customers: while !stop.load(Ordering::Relaxed) {
                        n += 1;
                        let name = &names[n % names.len()];
                        let customer = format!("c{t}-{n}");
                        let path = format!("/api/v1/promotions/shop/{name}/grab");
                        let body = format!(r#"{{"customerId":"{customer}"}}"#).into_bytes();
                        loop {
                            if stop.load(Ordering::Relaxed) {
                                break 'customers;
                            }
                            if sender.is_none() {
                                sender = connect_http(port).await.ok();
                            }
                            let answer = match sender.as_mut() {
                                Some(s) => send(s, "POST", &path, body.clone()).await.ok(),
                                None => None,
                            };
                            let Some((status, json)) = answer else {
                                sender = None;
                                tokio::time::sleep(Duration::from_millis(20)).await;
                                continue;
                            };
                            let coupon = json["couponId"].as_str().map(str::to_owned);
                            log.push((format!("shop/{name}"), customer.clone(), status, coupon));
                            if status == 200 || status == 410 {
                                break;
                            }
                            tokio::time::sleep(Duration::from_millis(20)).await;
                        }
                    }
                    log
                })
            })
            .collect();
        Self { stop, tasks }
    }

    async fn stop(self) -> CrowdLog {
        self.stop.store(true, Ordering::Relaxed);
        let mut log = CrowdLog::default();
        for t in self.tasks {
            log.answers.extend(t.await.unwrap());
        }
        log
    }
}

#[derive(Debug, Default)]
struct StreamFacts {
    started: Vec<(i64, PromotionStarted)>,
    grabs: Vec<(i64, CouponGrabbed)>,
    finished: Vec<(i64, PromotionFinished)>,
}

async fn stream_facts(con: &mut RedisConnection, id: &PromotionId) -> StreamFacts {
    let mut facts = StreamFacts::default();
    for entry in projector::stream_entries(con, id).await.unwrap() {
        let ms: i64 = entry.id.split('-').next().unwrap().parse().unwrap();
        let raw: Vec<u8> = entry.get(EVENT_FIELD).expect("event field");
        match Event::decode(&raw).expect("every event decodes") {
            Event::PromotionStarted(s) => facts.started.push((ms, s)),
            Event::CouponGrabbed(g) => facts.grabs.push((ms, g)),
            Event::PromotionFinished(f) => facts.finished.push((ms, f)),
        }
    }
    facts
}

/// Waits until the stream of `id` has its PromotionFinished.
async fn wait_finished(con: &mut RedisConnection, id: &PromotionId, within: Duration) {
    let deadline = Instant::now() + within;
    while stream_facts(con, id).await.finished.is_empty() {
        assert!(Instant::now() < deadline, "{id} never finished");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The promises: one Started at or after publishTime, one Finished (at or
/// after finishTime unless sold out), at most `coupons` grants inside the
/// window, no customer twice, every 200 in the stream.
async fn verify(
    con: &mut RedisConnection,
    id: &PromotionId,
    coupons: u64,
    publish_ms: i64,
    finish_ms: i64,
    crowd: &CrowdLog,
) -> StreamFacts {
    let facts = stream_facts(con, id).await;
    assert_eq!(facts.started.len(), 1, "{id}: {:?}", facts.started);
    assert_eq!(facts.finished.len(), 1, "{id}: {:?}", facts.finished);
    let (started_ms, started) = &facts.started[0];
    assert!(
        *started_ms >= publish_ms,
        "{id} started {started_ms} before {publish_ms}"
    );
    assert!(started.started_at.unwrap().timestamp_millis() >= publish_ms);
    let (finished_ms, finished) = &facts.finished[0];
    if finished.reason != FinishReason::SoldOut {
        assert!(
            *finished_ms >= finish_ms,
            "{id} finished {finished_ms} before {finish_ms}"
        );
    }
    assert!(facts.grabs.len() as u64 <= coupons);
    let mut customers = HashSet::new();
    for (ms, g) in &facts.grabs {
        // Entry ids order the stream; the window is checked on grantedAt, the
        // TIME the script decided on (XADD's id may read the clock a
        // millisecond later).
        assert!(*ms >= *started_ms && ms <= finished_ms, "{g:?} at {ms}");
        assert!(g.granted_at.timestamp_millis() < finish_ms, "{g:?} at {ms}");
        assert!(
            customers.insert(g.customer_id.clone()),
            "{} twice",
            g.customer_id
        );
    }
    let in_stream: HashMap<&str, &str> = facts
        .grabs
        .iter()
        .map(|(_, g)| (g.customer_id.as_str(), g.coupon_id.as_str()))
        .collect();
    for (customer, answered) in crowd.granted(&id.to_string()) {
        assert_eq!(
            answered.len(),
            1,
            "{customer} answered two coupons: {answered:?}"
        );
        let coupon = answered.iter().next().unwrap();
        assert_eq!(
            in_stream.get(customer.as_str()).copied(),
            Some(coupon.as_str()),
            "{customer} was answered {coupon}, not in the stream"
        );
    }
    facts
}

fn redis() -> (RedisServer, RedisConnection) {
    let server = RedisServer::start(RedisServerOptions {
        appendfsync: Some(Fsync::EverySec),
        ..RedisServerOptions::default()
    })
    .expect("redis-server starts");
    let con = RedisArgs::for_url(server.url()).connect().unwrap();
    (server, con)
}

/// Sleeps until the wall clock reads `ms` (epoch ms) plus `offset_ms`.
async fn sleep_until_ms(ms: i64, offset_ms: i64) {
    let wait = ms + offset_ms - Utc::now().timestamp_millis();
    if wait > 0 {
        tokio::time::sleep(Duration::from_millis(wait as u64)).await;
    }
}

/// Scenario 4: the operator is killed -9 right around publishTime and right
/// around finishTime (offsets in ms from the instant), and started again at
/// once. The crowd is there from before the opening; it leaves shortly
/// before finishTime, so the finish is the restarted operator's to make.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_killed_at_the_publish_and_finish_instants_starts_and_finishes_once() {
    let offsets: &[i64] = if long() {
        &[-100, -10, 0, 10, 100]
    } else {
        &[0]
    };
    let (server, mut con) = redis();
    let url = server.url();
    let workers = Up::start("command,projector", &url, None, None)
        .ready()
        .await;
    for (round, offset) in offsets.iter().enumerate() {
        let dir = tempfile::tempdir().unwrap();
        let name = format!("restart-{round}");
        let id = PromotionId::new("shop", &name).unwrap();
        let publish_ms = Utc::now().timestamp_millis() + 3000;
        let finish_ms = publish_ms + 3000;
        let coupons = 1_000_000;
        write_manifest(dir.path(), &name, coupons, publish_ms, finish_ms);
        let mut operator = Up::start("operator", &url, Some(dir.path()), None)
            .ready()
            .await;
        let crowd = Crowd::start(workers.port, &[&name], 24);

        sleep_until_ms(publish_ms, *offset).await;
        operator.kill9();
        let mut operator = Up::start("operator", &url, Some(dir.path()), None);
        sleep_until_ms(finish_ms, -300).await;
        let log = crowd.stop().await;
        sleep_until_ms(finish_ms, *offset).await;
        operator.kill9();
        let before_restart = stream_facts(&mut con, &id).await.finished.len();
        let operator = Up::start("operator", &url, Some(dir.path()), None);
        wait_finished(&mut con, &id, Duration::from_secs(10)).await;

        let facts = verify(&mut con, &id, coupons, publish_ms, finish_ms, &log).await;
        let (finished_ms, finished) = &facts.finished[0];
        eprintln!(
            "[operator-faults] killed at publish{offset:+} ms and finish{offset:+} ms: {} grants, {} answers 409, started {} ms after publishTime, finished ({:?}) {} ms after finishTime{}",
            facts.grabs.len(),
            log.count(409),
            facts.started[0].0 - publish_ms,
            finished.reason,
            finished_ms - finish_ms,
            if before_restart == 0 { " by the restarted operator" } else { "" }
        );
        assert!(facts.grabs.len() > 10, "the crowd got almost nothing");
        assert!(
            log.count(409) > 0,
            "the crowd was not there before the opening"
        );
        assert_eq!(finished.reason, FinishReason::Expired);
        // Nobody else finishes it: the crowd left, so the operator did.
        assert!(finished_ms - finish_ms < 5000, "finished late");
        drop(operator);
    }
    drop(workers);
}

/// Scenario 5: two operators at once on the same manifests and Redis (no
/// leader election), with a crowd on every promotion; one promotion sells
/// out, the others expire. Each still has exactly one Started and one
/// Finished.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_operators_without_leader_election_start_and_finish_each_promotion_once() {
    let (server, mut con) = redis();
    let url = server.url();
    let dir = tempfile::tempdir().unwrap();
    let count = if long() { 12 } else { 4 };
    let publish_ms = Utc::now().timestamp_millis() + 3000;
    let finish_ms = publish_ms + 3000;
    let mut names = Vec::new();
    for i in 0..count {
        let name = format!("twin-{i}");
        // The first sells out under the crowd; the others expire.
        let coupons = if i == 0 { 200 } else { 1_000_000 };
        write_manifest(dir.path(), &name, coupons, publish_ms, finish_ms);
        names.push((name, coupons));
    }
    let workers = Up::start("command,projector", &url, None, None)
        .ready()
        .await;
    let a = Up::start("operator", &url, Some(dir.path()), None)
        .ready()
        .await;
    let b = Up::start("operator", &url, Some(dir.path()), None)
        .ready()
        .await;
    let refs: Vec<&str> = names.iter().map(|(n, _)| n.as_str()).collect();
    let crowd = Crowd::start(workers.port, &refs, 24);
    sleep_until_ms(finish_ms, -300).await;
    let log = crowd.stop().await;
    for (name, coupons) in &names {
        let id = PromotionId::new("shop", name).unwrap();
        wait_finished(&mut con, &id, Duration::from_secs(10)).await;
        let facts = verify(&mut con, &id, *coupons, publish_ms, finish_ms, &log).await;
        let reason = facts.finished[0].1.reason;
        eprintln!(
            "[operator-faults] two operators: {id}: {} grants, finished {reason:?}",
            facts.grabs.len()
        );
        if *coupons == 200 {
            assert_eq!(reason, FinishReason::SoldOut);
            assert_eq!(facts.grabs.len(), 200);
        } else {
            assert_eq!(reason, FinishReason::Expired);
        }
    }
    // Both operators took part: each printed its own transitions.
    for (who, op) in [("a", &a), ("b", &b)] {
        assert!(
            op.output().contains("Started") || op.output().contains("Finished"),
            "operator {who} announced nothing:\n{}",
            op.output()
        );
    }
}

/// Scenario 7 (operator side): an operator whose host clock is five
/// minutes ahead starts and finishes nothing early; one five minutes behind
/// starts and finishes on time; both because deadlines are judged on Redis'
/// clock. No crowd here, so the operator alone writes Started and Finished.
/// Its printed timestamps prove the fake clock is in effect.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_with_its_clock_5_minutes_off_starts_and_finishes_on_redis_time() {
    let (server, mut con) = redis();
    let url = server.url();
    for (skew, skew_secs) in [("+5m", 300i64), ("-5m", -300i64)] {
        let dir = tempfile::tempdir().unwrap();
        let name = if skew_secs > 0 { "ahead" } else { "behind" };
        let id = PromotionId::new("shop", name).unwrap();
        let publish_ms = Utc::now().timestamp_millis() + 2500;
        let finish_ms = publish_ms + 2500;
        write_manifest(dir.path(), name, 100, publish_ms, finish_ms);
        let operator = Up::start("operator", &url, Some(dir.path()), Some(skew))
            .ready()
            .await;

        // The operator's clock is off: its first line starts with HH:MM:SS.
        let deadline = Instant::now() + Duration::from_secs(5);
        while operator.output().is_empty() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let first = operator.output();
        let stamp = first.get(..8).unwrap_or_default();
        let now = Utc::now();
        let printed = chrono::NaiveTime::parse_from_str(stamp, "%H:%M:%S")
            .unwrap_or_else(|e| panic!("no timestamp in {first:?}: {e}"));
        let mut off = (printed - now.time()).num_seconds();
        if off > 43_200 {
            off -= 86_400;
        } else if off < -43_200 {
            off += 86_400;
        }
        assert!(
            (off - skew_secs).abs() <= 5,
            "the operator's clock is {off} s off, wanted {skew_secs}: {first}"
        );

        // Before publishTime (Redis' clock) nothing is started.
        sleep_until_ms(publish_ms, -300).await;
        assert!(
            stream_facts(&mut con, &id).await.started.is_empty(),
            "started before publishTime by an operator {skew}"
        );
        sleep_until_ms(finish_ms, -300).await;
        assert!(
            stream_facts(&mut con, &id).await.finished.is_empty(),
            "finished before finishTime by an operator {skew}"
        );
        wait_finished(&mut con, &id, Duration::from_secs(5)).await;
        let facts = verify(
            &mut con,
            &id,
            100,
            publish_ms,
            finish_ms,
            &CrowdLog::default(),
        )
        .await;
        let started_late = facts.started[0].0 - publish_ms;
        let finished_late = facts.finished[0].0 - finish_ms;
        eprintln!(
            "[operator-faults] operator clock {skew} (printed {off:+} s): started {started_late} ms after publishTime, finished {finished_late} ms after finishTime"
        );
        // Nor late: the operator wakes on time whatever its clock says.
        assert!(started_late < 1500, "started {started_late} ms late");
        assert!(finished_late < 1500, "finished {finished_late} ms late");
        assert_eq!(facts.finished[0].1.reason, FinishReason::Expired);
    }
}
