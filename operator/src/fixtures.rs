//! Test scenarios in the style of kube-rs' controller-rs: the Kubernetes API
//! server is a `tower_test` mock whose every request is checked (method,
//! path, query, content type, body) and answered by the test; Redis is a
//! real `redis-server` started for each test.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use http::{Request, Response};
use kube::client::Body;
use kube::runtime::controller::Action;
use kube::{Client, Resource};
use seckill_testkit::promotions::move_window;
use seckill_testkit::redis::{redis_args, RedisServer};
use seckill_testkit::stream::events_of;
use seckill_workers::metrics::MetricsRegistry;
use seckill_workers::protocol::{self, Event, FinishReason, PromotionFinished, PromotionId};
use seckill_workers::redis_connection::{RedisArgs, RedisConnection};
use serde_json::{json, Value};
use tower_test::mock::{Handle, SendResponse};

use crate::controller::{error_policy, reconcile, Context, Intervals, FINALIZER};
use crate::lifecycle::{self, ShardSettings};
use crate::metrics::Metrics;
use crate::promotion::{Phase, Promotion, PromotionSpec, PromotionStatus};
use crate::Error;

const NS: &str = "shop";
const NAME: &str = "sale";

impl Promotion {
    /// `shop/sale`, generation 1, no finalizer yet.
    fn test(publish: DateTime<Utc>, finish: DateTime<Utc>) -> Self {
        let mut p = Promotion::new(
            NAME,
            PromotionSpec {
                publish_time: publish,
                finish_time: finish,
                number_of_coupons: 3,
                discount: 0.25,
                description: None,
                shards: 1,
            },
        );
        p.meta_mut().namespace = Some(NS.into());
        p.meta_mut().uid = Some("5a1e0000-0000-0000-0000-000000000001".into());
        p.meta_mut().generation = Some(1);
        p.meta_mut().resource_version = Some("1".into());
        p
    }

    /// [`Promotion::test`] with `shards` shards of 6 coupons.
    fn sharded(publish: DateTime<Utc>, finish: DateTime<Utc>, shards: u32) -> Self {
        let mut p = Self::test(publish, finish);
        p.spec.number_of_coupons = 6;
        p.spec.shards = shards;
        p
    }

    /// Opened a second ago, finishing in a minute.
    fn due() -> Self {
        Self::test(Utc::now() - secs(1), Utc::now() + secs(60))
    }

    /// Opening in a minute, finishing in two.
    fn in_a_minute() -> Self {
        Self::test(Utc::now() + secs(60), Utc::now() + secs(120))
    }

    fn finalized(mut self) -> Self {
        self.meta_mut().finalizers = Some(vec![FINALIZER.into()]);
        self
    }

    fn being_deleted(mut self) -> Self {
        self.meta_mut().deletion_timestamp =
            Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                k8s_openapi::jiff::Timestamp::now(),
            ));
        self
    }

    fn with_status(mut self, status: PromotionStatus) -> Self {
        self.status = Some(status);
        self
    }
}

fn id() -> PromotionId {
    PromotionId::new(NS, NAME).unwrap()
}

/// A private redis-server, and a test's connection to it.
fn redis() -> (RedisServer, RedisConnection) {
    let server = seckill_testkit::redis::redis();
    let con = seckill_testkit::redis::connect(&server);
    (server, con)
}

/// The usual scenario: a private redis-server, the test's connection to it,
/// and a Context on it whose API server is the mock.
fn scenario() -> (
    RedisServer,
    RedisConnection,
    Arc<Context>,
    ApiServerVerifier,
) {
    let (server, con) = redis();
    let (ctx, api) = test_context(con.clone());
    (server, con, ctx, api)
}

/// The Redis flags of `server` with a `timeout_ms` command timeout.
fn with_timeout(server: &RedisServer, timeout_ms: u64) -> RedisArgs {
    RedisArgs {
        redis_timeout_ms: timeout_ms,
        ..redis_args(server)
    }
}

/// The mocked API server's side of the client.
struct ApiServerVerifier(Handle<Request<Body>, Response<Body>>);

fn test_context(redis: RedisConnection) -> (Arc<Context>, ApiServerVerifier) {
    test_context_with(redis, Intervals::default())
}

fn test_context_with(
    redis: RedisConnection,
    intervals: Intervals,
) -> (Arc<Context>, ApiServerVerifier) {
    let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let client = Client::new(service, "default");
    let metrics = Metrics::register(&MetricsRegistry::new());
    (
        Context::new(
            client,
            redis,
            metrics,
            Some("test-operator".into()),
            intervals,
        ),
        ApiServerVerifier(handle),
    )
}

/// An action requeuing within [`lifecycle::ACTIVE_REFRESH`] (less the time
/// the reconcile took after deciding).
fn refreshed(action: &Action) -> bool {
    (0..=lifecycle::ACTIVE_REFRESH.as_millis() as u64)
        .any(|ms| *action == requeue(Duration::from_millis(ms)))
}

/// A Context whose operator runs sharded promotions without replicas,
/// acknowledging `appendfsync always` (a test's redis-server: one master).
fn sharding_context(redis: RedisConnection) -> (Arc<Context>, ApiServerVerifier) {
    let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let client = Client::new(service, "default");
    let metrics = Metrics::register(&MetricsRegistry::new());
    let shards = ShardSettings {
        fsync_always: true,
        ..ShardSettings::default()
    };
    (
        Context::with_shards(
            client,
            redis,
            metrics,
            Some("test-operator".into()),
            Intervals::default(),
            shards,
        ),
        ApiServerVerifier(handle),
    )
}

/// Runs a reconcile that must not send a single request to the API server:
/// the mock answers nothing, so a request would hold it until the timeout.
async fn reconcile_quietly(p: &Promotion, ctx: &Arc<Context>) -> Action {
    tokio::time::timeout(
        Duration::from_secs(10),
        reconcile(Arc::new(p.clone()), ctx.clone()),
    )
    .await
    .expect("the reconcile waited on the API server: it sent a request")
    .unwrap()
}

/// An action requeuing at `deadline`, give or take the time the test took.
fn requeued_for(action: &Action, deadline: DateTime<Utc>) -> bool {
    let left = (deadline - Utc::now()).num_milliseconds();
    (left - 100..=left + 5_000)
        .filter(|ms| *ms >= 0)
        .any(|ms| *action == requeue(Duration::from_millis(ms as u64)))
}

fn respond(send: SendResponse<Response<Body>>, body: &impl serde::Serialize) {
    let bytes = serde_json::to_vec(body).unwrap();
    send.send_response(Response::builder().body(Body::from(bytes)).unwrap());
}

async fn body_json(request: Request<Body>) -> Value {
    let bytes = request.into_body().collect_bytes().await.unwrap();
    serde_json::from_slice(&bytes).unwrap()
}

impl ApiServerVerifier {
    async fn next(&mut self) -> (Request<Body>, SendResponse<Response<Body>>) {
        // Only a hang bound: the reconcile under test always sends one.
        tokio::time::timeout(Duration::from_secs(60), self.0.next_request())
            .await
            .expect("no request to the API server within a minute")
            .expect("the client was dropped")
    }

    /// The next request, checked: its method, path with query, and content type.
    async fn next_checked(
        &mut self,
        method: http::Method,
        uri: &str,
        content_type: &str,
    ) -> (Request<Body>, SendResponse<Response<Body>>) {
        let (request, send) = self.next().await;
        assert_eq!(request.method(), method);
        assert_eq!(request.uri().to_string(), uri);
        assert_eq!(request.headers()["content-type"], content_type);
        (request, send)
    }

    /// The next request, checked to be a JSON patch of the promotion.
    async fn json_patch(&mut self) -> (Request<Body>, SendResponse<Response<Body>>) {
        let uri = format!("/apis/seckill.io/v1/namespaces/{NS}/promotions/{NAME}?");
        self.next_checked(http::Method::PATCH, &uri, "application/json-patch+json")
            .await
    }

    /// The finalizer is added by a JSON patch guarded by a `test` op.
    async fn finalizer_added(&mut self, p: &Promotion) {
        let (request, send) = self.json_patch().await;
        let patch = body_json(request).await;
        assert_eq!(
            patch,
            json!([
                {"op": "test", "path": "/metadata/finalizers", "value": null},
                {"op": "add", "path": "/metadata/finalizers", "value": [FINALIZER]},
            ])
        );
        respond(send, &p.clone().finalized());
    }

    /// The status is applied server-side on the status subresource; returns it.
    async fn status_applied(&mut self, p: &Promotion) -> PromotionStatus {
        let uri = format!("/apis/seckill.io/v1/namespaces/{NS}/promotions/{NAME}/status?&force=true&fieldManager=seckill-operator");
        let (request, send) = self
            .next_checked(http::Method::PATCH, &uri, "application/apply-patch+yaml")
            .await;
        let body = body_json(request).await;
        assert_eq!(body["apiVersion"], "seckill.io/v1");
        assert_eq!(body["kind"], "Promotion");
        assert_eq!(
            body.as_object().unwrap().len(),
            3,
            "only apiVersion, kind and status: {body}"
        );
        let status: PromotionStatus = serde_json::from_value(body["status"].clone()).unwrap();
        respond(send, &p.clone().with_status(status.clone()));
        status
    }

    /// An events.k8s.io/v1 Event about the promotion; returns its reason.
    async fn event_posted(&mut self) -> Value {
        let uri = format!("/apis/events.k8s.io/v1/namespaces/{NS}/events?");
        let (request, send) = self
            .next_checked(http::Method::POST, &uri, "application/json")
            .await;
        let event = body_json(request).await;
        assert_eq!(event["regarding"]["kind"], "Promotion");
        assert_eq!(event["regarding"]["name"], NAME);
        assert_eq!(event["reportingController"], "seckill-operator");
        respond(send, &event);
        event
    }

    async fn events_posted(&mut self, reasons: &[&str]) -> Vec<Value> {
        let mut events = Vec::new();
        for reason in reasons {
            let e = self.event_posted().await;
            assert_eq!(e["reason"], *reason, "{e}");
            events.push(e);
        }
        events
    }

    /// The finalizer is removed by a JSON patch guarded by a `test` op.
    async fn finalizer_removed(&mut self, p: &Promotion) {
        let (request, send) = self.json_patch().await;
        assert_eq!(
            body_json(request).await,
            json!([
                {"op": "test", "path": "/metadata/finalizers/0", "value": FINALIZER},
                {"op": "remove", "path": "/metadata/finalizers/0"},
            ])
        );
        let mut gone = p.clone();
        gone.meta_mut().finalizers = None;
        respond(send, &gone);
    }
}

/// The first reconcile of `p`, due and finalized: it schedules and starts it
/// in Redis, applies the status and posts Scheduled then Started. Returns
/// that status and the reconcile's action.
async fn first_reconcile_starts(
    p: &Promotion,
    ctx: &Arc<Context>,
    api: &mut ApiServerVerifier,
) -> (PromotionStatus, Action) {
    let task = tokio::spawn(reconcile(Arc::new(p.clone()), ctx.clone()));
    let status = api.status_applied(p).await;
    api.events_posted(&["Scheduled", "Started"]).await;
    (status, task.await.unwrap().unwrap())
}

/// Deletes `p`, which `driven` left Active, and reconciles it: the
/// controller finishes the sale (a Finished event whose note names the
/// deletion), then removes the finalizer and waits for the next change.
/// Answers the stream's one PromotionFinished, its last event.
async fn delete_active(
    p: Promotion,
    driven: lifecycle::Driven,
    ctx: Arc<Context>,
    api: &mut ApiServerVerifier,
    con: &mut RedisConnection,
) -> PromotionFinished {
    assert_eq!(driven.status.phase, Some(Phase::Active));
    let p = p.with_status(driven.status).being_deleted();
    let task = tokio::spawn(reconcile(Arc::new(p.clone()), ctx));
    let events = api.events_posted(&["Finished"]).await;
    assert!(events[0]["note"].as_str().unwrap().contains("Deleted"));
    api.finalizer_removed(&p).await;
    assert_eq!(task.await.unwrap().unwrap(), Action::await_change());
    let events = stream(con).await;
    assert_eq!(count(&events, "PromotionFinished"), 1);
    match events.last() {
        Some(Event::PromotionFinished(f)) => f.clone(),
        other => panic!("{other:?}"),
    }
}

/// The promotion's stream, decoded.
async fn stream(con: &mut RedisConnection) -> Vec<Event> {
    events_of(con, &id()).await
}

fn count(events: &[Event], type_name: &str) -> usize {
    events.iter().filter(|e| e.type_name() == type_name).count()
}

fn requeue(after: Duration) -> Action {
    Action::requeue(after)
}

fn secs(s: i64) -> chrono::Duration {
    chrono::Duration::seconds(s)
}

#[tokio::test]
async fn a_new_promotion_gets_the_finalizer_before_anything_touches_redis() {
    let (_server, mut con, ctx, mut api) = scenario();
    let p = Promotion::in_a_minute();
    let task = tokio::spawn(reconcile(Arc::new(p.clone()), ctx));
    api.finalizer_added(&p).await;
    assert_eq!(task.await.unwrap().unwrap(), Action::await_change());
    assert!(!protocol::snapshot(&mut con, &id()).await.unwrap().exists);
}

#[tokio::test]
async fn a_pending_promotion_is_scheduled_indexed_reported_and_requeued_at_publish_time() {
    let (_server, mut con, ctx, mut api) = scenario();
    let publish = Utc::now() + secs(60);
    let p = Promotion::test(publish, publish + secs(60)).finalized();
    let before = Utc::now();
    let task = tokio::spawn(reconcile(Arc::new(p.clone()), ctx));
    let status = api.status_applied(&p).await;
    api.events_posted(&["Scheduled"]).await;
    let action = task.await.unwrap().unwrap();
    let after = Utc::now();

    assert_eq!(status.phase, Some(Phase::Pending));
    assert_eq!((status.granted, status.remaining), (0, 3));
    assert_eq!(status.observed_generation, Some(1));
    assert_eq!(status.condition("Ready").unwrap().status, "True");
    assert_eq!(status.condition("SpecLocked").unwrap().status, "False");
    // Requeued at publishTime, from Redis' clock when it reconciled (which
    // read between `before` and `after`).
    let left = |at: DateTime<Utc>| (publish - at).num_milliseconds();
    let in_range = (left(after)..=left(before))
        .map(|ms| requeue(Duration::from_millis(ms as u64)))
        .any(|a| a == action);
    assert!(in_range, "{action:?}");
    let snap = protocol::snapshot(&mut con, &id()).await.unwrap();
    assert_eq!(snap.phase, Some(Phase::Pending));
    let indexed: bool = redis::cmd("SISMEMBER")
        .arg(protocol::PROMOTION_INDEX_KEY)
        .arg("shop/sale")
        .query_async(&mut con)
        .await
        .unwrap();
    assert!(indexed);
    assert!(stream(&mut con).await.is_empty());
}

#[tokio::test]
async fn a_due_promotion_is_started_once_however_often_it_is_reconciled() {
    let (_server, mut con, ctx, mut api) = scenario();
    let mut p = Promotion::due().finalized();

    let (status, action) = first_reconcile_starts(&p, &ctx, &mut api).await;
    // Requeued for its finish time, not on a refresh timer.
    assert!(requeued_for(&action, p.spec.finish_time), "{action:?}");
    assert_eq!(status.phase, Some(Phase::Active));
    assert!(status.started_at.is_some());

    // The watch brings the object back with its status: nothing to write,
    // no new events, no new stream entries.
    p.status = Some(status);
    p.meta_mut().resource_version = Some("2".into());
    for _ in 0..3 {
        let action = reconcile_quietly(&p, &ctx).await;
        assert!(requeued_for(&action, p.spec.finish_time), "{action:?}");
    }
    assert_eq!(ctx.metrics.status_updates("unchanged"), 3);
    let events = stream(&mut con).await;
    assert_eq!(count(&events, "PromotionStarted"), 1, "{events:?}");
    assert_eq!(events.len(), 1);
}

#[tokio::test]
async fn a_sell_out_shows_in_the_status_and_is_announced() {
    let (_server, mut con, ctx, mut api) = scenario();
    let mut p = Promotion::due().finalized();
    p.status = Some(first_reconcile_starts(&p, &ctx, &mut api).await.0);

    for customer in ["ann", "bob", "cid"] {
        let c = protocol::CustomerId::parse(customer).unwrap();
        protocol::grab(&mut con, &id(), &c).await.unwrap();
    }
    let task = tokio::spawn(reconcile(Arc::new(p.clone()), ctx));
    let status = api.status_applied(&p).await;
    api.events_posted(&["SoldOut", "Finished"]).await;
    assert_eq!(task.await.unwrap().unwrap(), Action::await_change());
    assert_eq!(status.phase, Some(Phase::Finished));
    assert_eq!(status.finish_reason, Some(FinishReason::SoldOut));
    assert_eq!((status.granted, status.remaining), (3, 0));
}

#[tokio::test]
async fn an_operator_restarted_between_publish_time_and_the_first_reconcile_starts_once() {
    let (server, mut con) = redis();
    let publish = Utc::now() + secs(3600);
    let mut p = Promotion::test(publish, publish + secs(60)).finalized();
    {
        let (ctx, mut api) = test_context(con.clone());
        let task = tokio::spawn(reconcile(Arc::new(p.clone()), ctx));
        p.status = Some(api.status_applied(&p).await);
        api.events_posted(&["Scheduled"]).await;
        task.await.unwrap().unwrap();
    } // the first operator is gone: its Context, client and Redis handle
    assert_eq!(p.status.as_ref().unwrap().phase, Some(Phase::Pending));

    // Its requeue at publishTime is lost with it, and the publish time
    // passes: the registered window (and the promotion's spec) now opened a
    // second ago, with no operator running.
    let publish = Utc::now() - secs(1);
    p.spec.publish_time = publish;
    p.spec.finish_time = publish + secs(60);
    move_window(
        &mut con,
        &id(),
        publish.timestamp_millis(),
        p.spec.finish_time.timestamp_millis(),
    )
    .await;

    let (ctx, mut api) = test_context(seckill_testkit::redis::connect(&server));
    let task = tokio::spawn(reconcile(Arc::new(p.clone()), ctx));
    let status = api.status_applied(&p).await;
    api.events_posted(&["Started"]).await;
    task.await.unwrap().unwrap();
    assert_eq!(status.phase, Some(Phase::Active));
    let started_at = status.started_at.unwrap();
    assert!(started_at >= publish, "{started_at} before {publish}");
    assert_eq!(count(&stream(&mut con).await, "PromotionStarted"), 1);
}

#[tokio::test]
async fn a_spec_changed_after_the_start_is_refused_with_a_warning() {
    let (_server, mut con, ctx, mut api) = scenario();
    let mut p = Promotion::due().finalized();
    p.status = Some(first_reconcile_starts(&p, &ctx, &mut api).await.0);

    p.spec.discount = 0.9;
    p.meta_mut().generation = Some(2);
    let task = tokio::spawn(reconcile(Arc::new(p.clone()), ctx));
    let status = api.status_applied(&p).await;
    let events = api.events_posted(&["SpecLocked"]).await;
    task.await.unwrap().unwrap();
    assert_eq!(events[0]["type"], "Warning");
    let locked = status.condition("SpecLocked").unwrap();
    assert_eq!(
        (locked.status.as_str(), locked.observed_generation),
        ("True", Some(2))
    );
    let snap = protocol::snapshot(&mut con, &id()).await.unwrap();
    assert_eq!(
        snap.discount,
        Some(0.25),
        "the running promotion keeps its spec"
    );
}

#[tokio::test]
async fn deleting_an_active_promotion_finishes_it_before_the_finalizer_goes() {
    let (_server, mut con, ctx, mut api) = scenario();
    let p = Promotion::due().finalized();
    let driven = lifecycle::drive(&mut con, &id(), &p.spec, Some(1), None)
        .await
        .unwrap();
    let finished = delete_active(p, driven, ctx, &mut api, &mut con).await;
    assert_eq!(finished.reason, FinishReason::Deleted);
}

#[tokio::test]
async fn deleting_a_promotion_unknown_to_redis_just_removes_the_finalizer() {
    let (_server, mut con, ctx, mut api) = scenario();
    let p = Promotion::in_a_minute().finalized().being_deleted();
    let task = tokio::spawn(reconcile(Arc::new(p.clone()), ctx));
    api.finalizer_removed(&p).await;
    assert_eq!(task.await.unwrap().unwrap(), Action::await_change());
    assert!(!protocol::snapshot(&mut con, &id()).await.unwrap().exists);
}

#[tokio::test]
async fn redis_down_reports_ready_false_and_backs_off_exponentially() {
    let (mut server, _con) = redis();
    let (ctx, mut api) = test_context(with_timeout(&server, 200).connect().unwrap());
    server.kill();

    let p = Promotion::in_a_minute().finalized();
    let task = tokio::spawn(reconcile(Arc::new(p.clone()), ctx.clone()));
    let status = api.status_applied(&p).await;
    let error = task.await.unwrap().unwrap_err();
    let ready = status.condition("Ready").unwrap();
    assert_eq!(
        (ready.status.as_str(), ready.reason.as_str()),
        ("False", "RedisUnavailable")
    );
    assert_eq!(error.kind(), "RedisUnavailable");

    let p = Arc::new(p);
    let delays: Vec<Action> = (0..3)
        .map(|_| error_policy(p.clone(), &error, ctx.clone()))
        .collect();
    assert_eq!(
        delays,
        [
            requeue(Duration::from_millis(500)),
            requeue(Duration::from_secs(1)),
            requeue(Duration::from_secs(2))
        ]
    );

    // Deleting while Redis is down keeps the finalizer: the reconcile fails
    // without a single API request (the mock would have blocked it).
    let deleting = Arc::new(Promotion::clone(&p).being_deleted());
    let result = reconcile(deleting, ctx).await;
    assert!(matches!(result, Err(Error::Finalizer(_))), "{result:?}");
}

#[tokio::test]
async fn new_numbers_within_the_status_interval_are_held_then_written() {
    let (_server, mut con) = redis();
    let intervals = Intervals {
        status: Duration::from_millis(400),
        ..Intervals::default()
    };
    let (ctx, mut api) = test_context_with(con.clone(), intervals);
    let mut p = Promotion::due().finalized();
    p.status = Some(first_reconcile_starts(&p, &ctx, &mut api).await.0);
    p.meta_mut().resource_version = Some("2".into());

    let ann = protocol::CustomerId::parse("ann").unwrap();
    protocol::grab(&mut con, &id(), &ann).await.unwrap();
    // Just written: the new count waits.
    reconcile_quietly(&p, &ctx).await;
    assert_eq!(ctx.metrics.status_updates("held"), 1);

    // The interval is over: written, numbers only, no event.
    tokio::time::sleep(intervals.status).await;
    let task = tokio::spawn(reconcile(Arc::new(p.clone()), ctx.clone()));
    let status = api.status_applied(&p).await;
    task.await.unwrap().unwrap();
    assert_eq!((status.granted, status.remaining), (1, 2));
    assert_eq!(status.phase, Some(Phase::Active));
    assert_eq!(ctx.metrics.status_updates("written"), 2);
}

#[tokio::test]
async fn a_copy_of_the_object_from_before_a_write_neither_writes_nor_announces_again() {
    let (_server, _con, ctx, mut api) = scenario();
    let p = Promotion::due().finalized();
    let (status, _) = first_reconcile_starts(&p, &ctx, &mut api).await;
    assert_eq!(status.phase, Some(Phase::Active));

    // The watch has not delivered the written status yet: the store still
    // holds the version without it.
    reconcile_quietly(&p, &ctx).await;
    assert_eq!(ctx.metrics.status_updates("written"), 1);
    assert_eq!(ctx.metrics.status_updates("unchanged"), 1);
}

#[tokio::test]
async fn the_publish_time_requeue_counts_from_redis_answer_not_from_a_slow_api_server() {
    let (_server, _con, ctx, mut api) = scenario();
    let p = Promotion::test(Utc::now() + secs(30), Utc::now() + secs(60)).finalized();
    let task = tokio::spawn(reconcile(Arc::new(p.clone()), ctx));
    // The API server takes 1.5 s to answer the status write.
    let (request, send) = api.next().await;
    let body = body_json(request).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let status: PromotionStatus = serde_json::from_value(body["status"].clone()).unwrap();
    respond(send, &p.clone().with_status(status));
    api.events_posted(&["Scheduled"]).await;
    let action = task.await.unwrap().unwrap();
    // Counted from the end of the reconcile, the requeue lands on the
    // publish time: not 1.5 s after it.
    let left = (p.spec.publish_time - Utc::now()).num_milliseconds();
    let late =
        (left + 750..left + 5_000).any(|ms| action == requeue(Duration::from_millis(ms as u64)));
    assert!(!late, "{action:?}, {left} ms left");
    assert!(requeued_for(&action, p.spec.publish_time), "{action:?}");
}

mod running_sales {
    use futures::StreamExt;
    use kube::runtime::reflector::{self, ObjectRef};
    use kube::runtime::watcher::Event as WatchEvent;
    use kube::ResourceExt;
    use tokio::time::Instant;

    use super::*;
    use crate::sales::{self, Reported, RunningSales};

    /// A store holding `promotions`, as the controller's watch fills it.
    fn store_of(promotions: &[&Promotion]) -> reflector::Store<Promotion> {
        let (reader, mut writer) = reflector::store();
        writer.apply_watcher_event(&WatchEvent::Init);
        for p in promotions {
            writer.apply_watcher_event(&WatchEvent::InitApply((*p).clone()));
        }
        writer.apply_watcher_event(&WatchEvent::InitDone);
        reader
    }

    fn named(name: &str, p: &Promotion) -> Promotion {
        let mut p = p.clone();
        p.meta_mut().name = Some(name.into());
        p
    }

    /// Registers each promotion in Redis, running, and watches its sale as
    /// reported long ago (no quiet time left).
    async fn running(con: &mut RedisConnection, promotions: &[&Promotion]) -> Arc<RunningSales> {
        let sales = Arc::new(RunningSales::default());
        for p in promotions {
            let id = PromotionId::new(NS, &p.name_any()).unwrap();
            let driven = lifecycle::drive(con, &id, &p.spec, Some(1), None)
                .await
                .unwrap();
            assert_eq!(driven.status.phase, Some(Phase::Active));
            sales.watch(
                ObjectRef::from_obj(*p),
                id,
                Reported::new(&driven.status, Instant::now()),
            );
        }
        sales
    }

    /// The first promotion the poll (every 50 ms, over a store holding
    /// `present`) yields.
    async fn first_yielded(
        sales: &Arc<RunningSales>,
        con: &RedisConnection,
        present: &[&Promotion],
        metrics: &Metrics,
    ) -> ObjectRef<Promotion> {
        let mut moved = Box::pin(sales::changes(
            sales.clone(),
            con.clone(),
            Duration::from_millis(50),
            store_of(present),
            metrics.clone(),
        ));
        tokio::time::timeout(Duration::from_secs(10), moved.next())
            .await
            .expect("the poll yielded within 10 s")
            .unwrap()
    }

    fn grab(con: &RedisConnection, name: &str) -> impl std::future::Future<Output = ()> {
        let mut con = con.clone();
        let id = PromotionId::new(NS, name).unwrap();
        async move {
            let ann = protocol::CustomerId::parse("ann").unwrap();
            protocol::grab(&mut con, &id, &ann).await.unwrap();
        }
    }

    #[tokio::test]
    async fn the_poll_yields_the_running_sale_whose_numbers_moved_and_no_other() {
        let (_server, mut con) = redis();
        let template = Promotion::due();
        let busy = named("busy", &template);
        let calm = named("calm", &template);
        let sales = running(&mut con, &[&busy, &calm]).await;
        grab(&con, "busy").await;
        let metrics = Metrics::register(&MetricsRegistry::new());
        let first = first_yielded(&sales, &con, &[&busy, &calm], &metrics).await;
        assert_eq!(first, ObjectRef::from_obj(&busy));
        assert_eq!(metrics.poll_triggers.get(), 1);
        assert_eq!(metrics.watched_sales.get(), 2);
    }

    #[tokio::test]
    async fn the_poll_reads_on_after_redis_lost_its_scripts_and_forgets_deleted_objects() {
        let (_server, mut con) = redis();
        let p = Promotion::due();
        let gone = named("gone", &p);
        let sales = running(&mut con, &[&p, &gone]).await;
        redis::cmd("SCRIPT")
            .arg("FLUSH")
            .query_async::<()>(&mut con)
            .await
            .unwrap();
        let ids = [id(), PromotionId::new(NS, "gone").unwrap()];
        let read = sales::read(&mut con, &ids).await.unwrap();
        assert_eq!(read.len(), 2);
        assert!(read.iter().all(|s| s.phase == Some(Phase::Active)));

        // A watched sale whose object left the store is not read again.
        grab(&con, "gone").await;
        grab(&con, NAME).await;
        let metrics = Metrics::register(&MetricsRegistry::new());
        let first = first_yielded(&sales, &con, &[&p], &metrics).await;
        assert_eq!(first, ObjectRef::from_obj(&p));
        assert_eq!(sales.len(), 1);
    }
}

#[tokio::test]
async fn a_sharded_promotion_without_durable_steps_is_refused_with_a_warning_and_redis_untouched() {
    let (_server, mut con, ctx, mut api) = scenario();
    let publish = Utc::now() - secs(1);
    let p = Promotion::sharded(publish, publish + secs(60), 3).finalized();
    let task = tokio::spawn(reconcile(Arc::new(p.clone()), ctx.clone()));
    let status = api.status_applied(&p).await;
    let events = api.events_posted(&["ShardsRefused"]).await;
    assert_eq!(events[0]["type"], "Warning");
    assert_eq!(task.await.unwrap().unwrap(), Action::await_change());
    let ready = status.condition("Ready").unwrap();
    assert_eq!(
        (ready.status.as_str(), ready.reason.as_str()),
        ("False", lifecycle::SHARDS_NEED_DURABLE_STEPS)
    );
    assert!(!protocol::snapshot(&mut con, &id()).await.unwrap().exists);
    let keys = seckill_testkit::redis::keys(&mut con, "*").await;
    assert!(keys.is_empty(), "{keys:?}");
    assert!(ctx.sales.is_empty());
}

#[tokio::test]
async fn a_due_sharded_promotion_is_planned_started_once_placed_and_refreshed_on_a_timer() {
    let (_server, mut con) = redis();
    let (ctx, mut api) = sharding_context(con.clone());
    let mut p = Promotion::sharded(Utc::now() - secs(1), Utc::now() + secs(60), 3).finalized();

    let task = tokio::spawn(reconcile(Arc::new(p.clone()), ctx.clone()));
    let status = api.status_applied(&p).await;
    // One redis-server: every shard on one master.
    api.events_posted(&["Scheduled", "Started", "ShardsColocated"])
        .await;
    let action = task.await.unwrap().unwrap();
    assert!(refreshed(&action), "{action:?}");
    assert_eq!(status.phase, Some(Phase::Active));
    assert_eq!((status.granted, status.remaining), (0, 6));
    assert_eq!(status.stock_moves_in_flight, Some(0));
    let masters: Vec<&str> = status.shards.iter().map(|s| s.master.as_str()).collect();
    assert_eq!(masters, [lifecycle::STANDALONE; 3]);
    assert_eq!(
        status
            .condition(lifecycle::SHARDS_COLOCATED)
            .unwrap()
            .status,
        "True"
    );
    // Not on the poll of running sales: shard 0's stream does not see the
    // grabs of shards 1 and 2.
    assert!(ctx.sales.is_empty());

    p.status = Some(status);
    p.meta_mut().resource_version = Some("2".into());
    for _ in 0..2 {
        let action = reconcile_quietly(&p, &ctx).await;
        assert!(refreshed(&action), "{action:?}");
    }
    let events = stream(&mut con).await;
    assert_eq!(count(&events, "PromotionStarted"), 1, "{events:?}");
    assert_eq!(events.len(), 1);
}

#[tokio::test]
async fn deleting_an_active_sharded_promotion_finishes_it_once_through_the_three_phases() {
    let (_server, mut con) = redis();
    let (ctx, mut api) = sharding_context(con.clone());
    let p = Promotion::sharded(Utc::now() - secs(1), Utc::now() + secs(60), 3).finalized();
    let shards = ShardSettings {
        fsync_always: true,
        ..ShardSettings::default()
    };
    let driven = lifecycle::drive_with(&mut con, &id(), &p.spec, Some(1), None, &shards)
        .await
        .unwrap();
    let finished = delete_active(p, driven, ctx, &mut api, &mut con).await;
    assert_eq!(
        (finished.reason, finished.granted),
        (FinishReason::Deleted, 0)
    );
}
