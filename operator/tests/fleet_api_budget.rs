//! Issue 16's request budget, counted: the operator's controller runs over a
//! fleet of 1,000 Promotions (300 Pending, 600 Active, 100 Finished, in ten
//! namespaces) whose state is in a real redis-server, against a mocked API
//! server (tower_test) that serves the list, the watch, status applies and
//! Events, and records every request at the time it arrives. tokio's clock
//! is paused and moved by the test in steps (100 ms while customers act, one
//! poll interval while nobody does): minutes pass in seconds, and each step
//! waits until the operator's Redis reads and reconciles are done, so
//! simulated time never runs ahead of the work.
//!
//! Redis judges deadlines on its own (real) clock, so within the simulated
//! minutes no promotion reaches its publish or finish time: the deadlines are
//! covered by the lifecycle's unit tests, the real-API-server test and
//! `make bench`. What changes here is what customers do: grabs in 200 of the
//! running sales, and ten sell-outs.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use chrono::Utc;
use futures::channel::mpsc::{unbounded, UnboundedSender};
use http::{Method, Request, Response, StatusCode};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Frame;
use kube::client::Body;
use kube::{Client, Resource, ResourceExt};
use seckill_operator::controller::{self, Context, Intervals, FINALIZER};
use seckill_operator::lifecycle;
use seckill_operator::metrics::Metrics;
use seckill_operator::promotion::{Phase, Promotion, PromotionSpec, PromotionStatus};
use seckill_workers::metrics::MetricsRegistry;
use seckill_workers::protocol::{self, CustomerId, FinishReason, PromotionId};
use seckill_workers::redis_connection::{RedisArgs, RedisConnection};
use seckill_workers::redis_server::{RedisServer, RedisServerOptions};
use serde_json::{json, Value};
use tokio::time::Instant;

type ResponseBody = UnsyncBoxBody<Bytes, Infallible>;
type WatchFrame = Result<Frame<Bytes>, Infallible>;

const STEP: Duration = Duration::from_millis(100);
const NAMESPACES: usize = 10;

/// What a request to the mocked API server was.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    List,
    Watch,
    StatusApply,
    EventPost,
    Other,
}

#[derive(Debug, Clone)]
struct Served {
    at: Instant,
    kind: Kind,
    /// `namespace/name` of the promotion, for status applies.
    promotion: String,
    /// The applied status, or the Event's reason.
    status: Option<PromotionStatus>,
    reason: Option<String>,
    what: String,
}

/// The mocked API server: the objects, their resourceVersions, the open
/// watches, and every request served.
#[derive(Default)]
struct FakeApi {
    objects: BTreeMap<String, Value>,
    resource_version: u64,
    watches: Vec<UnboundedSender<WatchFrame>>,
    served: Vec<Served>,
}

fn full(status: StatusCode, body: &Value) -> Response<ResponseBody> {
    let bytes = Bytes::from(serde_json::to_vec(body).unwrap());
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(bytes).boxed_unsync())
        .unwrap()
}

impl FakeApi {
    fn answer(&mut self, parts: &http::request::Parts, body: &[u8]) -> Response<ResponseBody> {
        let path = parts.uri.path();
        let query = parts.uri.query().unwrap_or("");
        let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
        let mut served = Served {
            at: Instant::now(),
            kind: Kind::Other,
            promotion: String::new(),
            status: None,
            reason: None,
            what: format!("{} {}", parts.method, parts.uri),
        };
        let response = match (&parts.method, segments.as_slice()) {
            (&Method::GET, ["apis", "seckill.io", "v1", "promotions"]) => {
                if query.split('&').any(|kv| kv == "watch=true") {
                    served.kind = Kind::Watch;
                    let (tx, rx) = unbounded::<WatchFrame>();
                    self.watches.push(tx);
                    Response::builder()
                        .header("content-type", "application/json")
                        .body(StreamBody::new(rx).boxed_unsync())
                        .unwrap()
                } else {
                    served.kind = Kind::List;
                    let items: Vec<&Value> = self.objects.values().collect();
                    full(
                        StatusCode::OK,
                        &json!({
                            "apiVersion": "seckill.io/v1",
                            "kind": "PromotionList",
                            "metadata": {"resourceVersion": self.resource_version.to_string()},
                            "items": items,
                        }),
                    )
                }
            }
            (
                &Method::PATCH,
                ["apis", "seckill.io", "v1", "namespaces", ns, "promotions", name, "status"],
            ) => {
                served.kind = Kind::StatusApply;
                served.promotion = format!("{ns}/{name}");
                let patch: Value = serde_json::from_slice(body).unwrap();
                served.status = Some(serde_json::from_value(patch["status"].clone()).unwrap());
                self.resource_version += 1;
                let rv = self.resource_version.to_string();
                let object = self
                    .objects
                    .get_mut(&served.promotion)
                    .expect("status applied to a known promotion");
                object["status"] = patch["status"].clone();
                object["metadata"]["resourceVersion"] = json!(rv);
                let object = object.clone();
                let line = serde_json::to_vec(&json!({"type": "MODIFIED", "object": object}))
                    .unwrap()
                    .into_iter()
                    .chain([b'\n'])
                    .collect::<Vec<u8>>();
                self.watches.retain(|w| {
                    w.unbounded_send(Ok(Frame::data(Bytes::from(line.clone()))))
                        .is_ok()
                });
                full(StatusCode::OK, &object)
            }
            (&Method::POST, ["apis", "events.k8s.io", "v1", "namespaces", _, "events"]) => {
                served.kind = Kind::EventPost;
                let event: Value = serde_json::from_slice(body).unwrap();
                served.reason = event["reason"].as_str().map(str::to_owned);
                served.promotion = format!(
                    "{}/{}",
                    event["regarding"]["namespace"].as_str().unwrap_or_default(),
                    event["regarding"]["name"].as_str().unwrap_or_default()
                );
                full(StatusCode::CREATED, &event)
            }
            _ => full(
                StatusCode::NOT_FOUND,
                &json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "code": 404}),
            ),
        };
        self.served.push(served);
        response
    }
}

#[derive(Clone, Default)]
struct SharedApi(Arc<Mutex<FakeApi>>);

impl SharedApi {
    fn lock(&self) -> MutexGuard<'_, FakeApi> {
        self.0.lock().unwrap()
    }

    /// A client whose every request this fake answers.
    fn client(&self) -> Client {
        let (service, mut handle) =
            tower_test::mock::pair::<Request<Body>, Response<ResponseBody>>();
        let api = self.clone();
        tokio::spawn(async move {
            while let Some((request, send)) = handle.next_request().await {
                let (parts, body) = request.into_parts();
                let bytes = body.collect_bytes().await.unwrap_or_default();
                let response = api.lock().answer(&parts, &bytes);
                send.send_response(response);
            }
        });
        Client::new(service, "default")
    }

    fn served_between(&self, from: Instant, to: Instant) -> Vec<Served> {
        self.lock()
            .served
            .iter()
            .filter(|s| s.at >= from && s.at < to)
            .cloned()
            .collect()
    }
}

/// Keeps tokio's paused clock from jumping ahead on its own while a Redis
/// answer is on its way (a runtime with only I/O pending advances a paused
/// clock to the next timer; a blocking task in flight inhibits that): only
/// the test's `advance` moves it.
struct HeldClock(std::sync::mpsc::Sender<()>);

impl HeldClock {
    fn hold() -> Self {
        let (release, held) = std::sync::mpsc::channel::<()>();
        tokio::task::spawn_blocking(move || {
            let _ = held.recv();
        });
        Self(release)
    }
}

impl Drop for HeldClock {
    fn drop(&mut self) {
        let _ = self.0.send(());
    }
}

/// Lets the runtime run every task that can run and Redis answer: a
/// millisecond of real time, on a blocking thread.
async fn real_pause() {
    tokio::task::spawn_blocking(|| std::thread::sleep(Duration::from_millis(1)))
        .await
        .unwrap();
}

/// Waits (in real time) until the operator has no reconcile and no Redis
/// read under way, twice in a row.
async fn settle(metrics: &Metrics) {
    let mut quiet = 0;
    for _ in 0..60_000 {
        real_pause().await;
        if metrics.work_in_flight() == 0 {
            quiet += 1;
            if quiet == 2 {
                return;
            }
        } else {
            quiet = 0;
        }
    }
    panic!("the operator did not settle within a minute of real time");
}

/// Moves the paused clock by `span` in steps, settling after each, and runs
/// `each_second` at every whole simulated second.
async fn run_for<F, Fut>(span: Duration, metrics: &Metrics, mut each_second: F)
where
    F: FnMut(u32) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let steps = (span.as_millis() / STEP.as_millis()) as u32;
    let per_second = (1000 / STEP.as_millis()) as u32;
    for step in 0..steps {
        if step % per_second == 0 {
            each_second(step / per_second).await;
        }
        tokio::time::advance(STEP).await;
        settle(metrics).await;
    }
}

/// Moves the paused clock by `span` while nobody does anything, in steps of
/// one poll interval (nothing happens between two polls), settling after
/// each.
async fn idle_for(span: Duration, metrics: &Metrics) {
    let step = Intervals::default().redis_poll;
    for _ in 0..(span.as_millis() / step.as_millis()) {
        tokio::time::advance(step).await;
        settle(metrics).await;
    }
}

struct Fleet {
    objects: Vec<Promotion>,
    /// Active with a million coupons: customers grab in these.
    busy: Vec<PromotionId>,
    /// Active with five coupons: sold out during the test.
    selling_out: Vec<PromotionId>,
}

fn promotion(ns: &str, name: &str, spec: PromotionSpec, index: usize) -> Promotion {
    let mut p = Promotion::new(name, spec);
    p.meta_mut().namespace = Some(ns.into());
    p.meta_mut().uid = Some(format!("00000000-0000-0000-0000-{index:012}"));
    p.meta_mut().generation = Some(1);
    p.meta_mut().resource_version = Some("1".into());
    p.meta_mut().finalizers = Some(vec![FINALIZER.into()]);
    p
}

/// 300 Pending, 600 Active (200 busy, 10 to sell out), 100 Finished, each
/// registered in Redis and carrying the status the operator reported before
/// it restarted.
async fn fleet(con: &mut RedisConnection) -> Fleet {
    let now = Utc::now();
    let hour = chrono::Duration::hours(1);
    let mut objects = Vec::new();
    let mut busy = Vec::new();
    let mut selling_out = Vec::new();
    for i in 0..1000 {
        let ns = format!("shop-{}", i % NAMESPACES);
        let (name, publish, finish, coupons) = match i {
            0..300 => (format!("pending-{i}"), now + hour, now + hour * 2, 100),
            300..900 => {
                let coupons = if i < 310 { 5 } else { 1_000_000 };
                (
                    format!("active-{i}"),
                    now - chrono::Duration::minutes(1),
                    now + hour,
                    coupons,
                )
            }
            _ => (format!("finished-{i}"), now - hour * 2, now - hour, 100),
        };
        let spec = PromotionSpec {
            publish_time: publish,
            finish_time: finish,
            number_of_coupons: coupons,
            discount: 0.3,
            description: None,
            shards: 1,
        };
        let id = PromotionId::new(&ns, &name).unwrap();
        let driven = lifecycle::drive(con, &id, &spec, Some(1), None)
            .await
            .unwrap();
        let mut p = promotion(&ns, &name, spec, i);
        p.status = Some(driven.status);
        match i {
            300..310 => selling_out.push(id),
            310..510 => busy.push(id),
            _ => {}
        }
        objects.push(p);
    }
    Fleet {
        objects,
        busy,
        selling_out,
    }
}

fn count(served: &[Served], kind: Kind) -> usize {
    served.iter().filter(|s| s.kind == kind).count()
}

fn per_second(n: usize, span: Duration) -> f64 {
    n as f64 / span.as_secs_f64()
}

async fn grab_all(con: &RedisConnection, ids: &[PromotionId], customer: &str) {
    let grabs = ids.iter().map(|id| {
        let mut con = con.clone();
        let c = CustomerId::parse(customer).unwrap();
        async move { protocol::grab(&mut con, id, &c).await.unwrap() }
    });
    futures::future::join_all(grabs).await;
}

#[tokio::test(start_paused = true)]
async fn a_fleet_of_1000_promotions_stays_within_the_request_budget() {
    let _clock = HeldClock::hold();
    let server = RedisServer::start(RedisServerOptions::default()).expect("redis-server");
    let mut args = RedisArgs::for_url(server.url());
    // Only the test moves the clock; no Redis call is ever cut short by it.
    args.redis_timeout_ms = 3_600_000;
    let mut con = args.connect().unwrap();
    let fleet = fleet(&mut con).await;
    let api = SharedApi::default();
    {
        let mut state = api.lock();
        for p in &fleet.objects {
            state.objects.insert(
                format!("{}/{}", p.namespace().unwrap(), p.name_any()),
                serde_json::to_value(p).unwrap(),
            );
        }
        state.resource_version = 1;
    }
    let intervals = Intervals::default();
    let metrics = Metrics::register(&MetricsRegistry::new());
    let ctx = Context::new(
        api.client(),
        args.connect().unwrap(),
        metrics.clone(),
        Some("fleet-test".into()),
        intervals,
    );
    let operator = tokio::spawn(controller::run_controller(ctx.clone(), None));

    // Start: a restarted operator reconciles all 1,000 and finds every
    // status current.
    let t0 = Instant::now();
    run_for(Duration::from_secs(10), &metrics, |_| async {}).await;
    let start = api.served_between(t0, Instant::now());
    assert!(
        metrics.reconciles.get() >= 1000,
        "{} reconciles",
        metrics.reconciles.get()
    );
    assert_eq!(metrics.watched_sales.get(), 600);
    assert_eq!(count(&start, Kind::StatusApply), 0, "{start:#?}");
    assert_eq!(count(&start, Kind::EventPost), 0);
    let other: Vec<&str> = start
        .iter()
        .filter(|s| s.kind == Kind::Other)
        .map(|s| s.what.as_str())
        .collect();
    assert!(other.is_empty(), "unexpected requests: {other:?}");
    assert_eq!(count(&start, Kind::Watch), 1);

    // A minute with nothing happening: at most 2 requests a second.
    let quiet = Duration::from_secs(60);
    let t1 = Instant::now();
    idle_for(quiet, &metrics).await;
    let idle = api.served_between(t1, Instant::now());
    println!(
        "nothing changing: {} requests in {quiet:?} ({:.2}/s)",
        idle.len(),
        per_second(idle.len(), quiet)
    );
    assert!(per_second(idle.len(), quiet) <= 2.0, "{idle:#?}");
    assert_eq!(count(&idle, Kind::StatusApply), 0);

    // A minute of grabs in 200 sales, two a second in each; ten sales
    // sell out at second 10.
    let busy_span = Duration::from_secs(60);
    let t2 = Instant::now();
    let sold_out_at = Arc::new(Mutex::new(None));
    let mut customer = 0u64;
    let grabbing = con.clone();
    let selling_out = fleet.selling_out.clone();
    let busy = fleet.busy.clone();
    run_for(busy_span, &metrics, |second| {
        let grabbing = grabbing.clone();
        let busy = busy.clone();
        let selling_out = selling_out.clone();
        let sold_out_at = sold_out_at.clone();
        customer += 2;
        let first = customer;
        async move {
            grab_all(&grabbing, &busy, &format!("c{first}")).await;
            grab_all(&grabbing, &busy, &format!("c{}", first + 1)).await;
            if second == 10 {
                for n in 0..5 {
                    grab_all(&grabbing, &selling_out, &format!("s{n}")).await;
                }
                *sold_out_at.lock().unwrap() = Some(Instant::now());
            }
        }
    })
    .await;
    let t3 = Instant::now();
    let sales = api.served_between(t2, t3);
    let writes = count(&sales, Kind::StatusApply);
    println!(
        "600 sales running, 200 with grabs: {writes} status writes in {busy_span:?} ({:.1}/s), {} requests in all",
        per_second(writes, busy_span),
        sales.len()
    );
    // Within the budget: at most 600 / status-interval a second.
    let budget = 600.0 / intervals.status.as_secs_f64();
    assert!(per_second(writes, busy_span) <= budget);

    // Per promotion: new numbers at most once per status interval.
    let mut by_promotion: BTreeMap<&str, Vec<&Served>> = BTreeMap::new();
    for s in sales.iter().filter(|s| s.kind == Kind::StatusApply) {
        by_promotion.entry(&s.promotion).or_default().push(s);
    }
    for (promotion, writes) in &by_promotion {
        for pair in writes.windows(2) {
            let (a, b) = (&pair[0], &pair[1]);
            let same_phase = a.status.as_ref().unwrap().phase == b.status.as_ref().unwrap().phase;
            assert!(
                !same_phase || b.at - a.at >= intervals.status,
                "{promotion}: numbers written {:?} apart",
                b.at - a.at
            );
        }
    }
    // And still live: every busy sale's numbers were written all along
    // (at least once per status interval plus one poll and one step).
    let period = intervals.status + intervals.redis_poll + STEP;
    let least = (busy_span.as_secs_f64() / period.as_secs_f64()) as usize - 2;
    for id in &fleet.busy {
        let n = by_promotion
            .get(id.to_string().as_str())
            .map_or(0, Vec::len);
        assert!(n >= least, "{id}: {n} writes, expected at least {least}");
    }
    assert_eq!(by_promotion.len(), 210, "only the busy and sold-out sales");

    // The sell-outs: shown within a second (simulated), and announced.
    let sold_out_at = sold_out_at.lock().unwrap().unwrap();
    for id in &fleet.selling_out {
        let finished = sales
            .iter()
            .find(|s| {
                s.kind == Kind::StatusApply
                    && s.promotion == id.to_string()
                    && s.status.as_ref().unwrap().phase == Some(Phase::Finished)
            })
            .unwrap_or_else(|| panic!("{id}: no Finished status"));
        let status = finished.status.as_ref().unwrap();
        assert_eq!(status.finish_reason, Some(FinishReason::SoldOut));
        assert_eq!((status.granted, status.remaining), (5, 0));
        assert!(
            finished.at - sold_out_at <= Duration::from_secs(1),
            "{id}: Finished {:?} after the last grab",
            finished.at - sold_out_at
        );
        let reasons: Vec<&str> = sales
            .iter()
            .filter(|s| s.kind == Kind::EventPost && s.promotion == id.to_string())
            .filter_map(|s| s.reason.as_deref())
            .collect();
        assert_eq!(reasons, ["SoldOut", "Finished"], "{id}");
    }
    assert_eq!(count(&sales, Kind::EventPost), 20);
    assert_eq!(count(&sales, Kind::Other), 0);
    assert_eq!(metrics.watched_sales.get(), 590);

    // Grabs stop: within one status interval, one poll and a step (plus the
    // last second of grabs), every status shows the final numbers; then
    // quiet again.
    run_for(period + Duration::from_secs(1), &metrics, |_| async {}).await;
    for id in &fleet.busy {
        let snap = protocol::snapshot(&mut con, id).await.unwrap();
        let object = api.lock().objects[&id.to_string()].clone();
        let status: PromotionStatus = serde_json::from_value(object["status"].clone()).unwrap();
        assert_eq!(
            (status.granted, status.remaining),
            (snap.granted, snap.remaining()),
            "{id}"
        );
    }
    let t4 = Instant::now();
    idle_for(Duration::from_secs(30), &metrics).await;
    let after = api.served_between(t4, Instant::now());
    assert!(after.is_empty(), "{after:#?}");

    operator.abort();
}
