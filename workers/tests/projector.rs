//! Projectors against a real redis-server: idempotence, order tolerance,
//! replicas sharing streams, a replica killed with pending entries, rebuild,
//! and entries that cannot be decoded.

use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;
use std::time::{Duration, Instant};

use seckill_testkit::client::{metric_value, metrics_of};
use seckill_testkit::process::{binary, WORKER};
use seckill_testkit::promotions::id as promotion;
use seckill_testkit::redis::{
    connect, connect_read_models, keys as keys_matching, redis_with, scan_keys, RedisServer,
    TEST_COMMAND_TIMEOUT_MS,
};
use seckill_testkit::shuffle::shuffle;
use seckill_testkit::stream::{events_of, pending_of, pending_total, stream_entries};
use seckill_testkit::{eventually, Worker};
use seckill_workers::metrics::MetricsRegistry;
use seckill_workers::projector::{Projector, ProjectorMetrics, ProjectorOptions};
use seckill_workers::protocol::{
    self, read_model as keys, CustomerId, Event, Phase, PromotionId, PromotionKeys, EVENT_FIELD,
    PROJECTOR_GROUP,
};
use seckill_workers::read_model;
use seckill_workers::redis_connection::{RedisArgs, RedisConnection};

/// Bounds every wait for something that must happen.
const WITHIN: Duration = Duration::from_secs(60);

fn server() -> RedisServer {
    redis_with(None)
}

/// A private redis-server, a connection to its streams, and a promotion
/// `shop/<name>` for each of `names`, started with `coupons` coupons and
/// grabbed by customers `0..grabs`.
async fn sales_with_grabs(
    names: &[&str],
    coupons: u64,
    grabs: usize,
) -> (RedisServer, RedisConnection, Vec<PromotionId>) {
    let s = server();
    let mut con = connect(&s);
    let ids: Vec<PromotionId> = names.iter().map(|name| promotion(name)).collect();
    start_with_grabs(&mut con, &ids, coupons, grabs).await;
    (s, con, ids)
}

/// [`sales_with_grabs`] of the one promotion `shop/<name>`.
async fn sale_with_grabs(
    name: &str,
    coupons: u64,
    grabs: usize,
) -> (RedisServer, RedisConnection, PromotionId) {
    let (s, con, mut ids) = sales_with_grabs(&[name], coupons, grabs).await;
    (s, con, ids.remove(0))
}

/// Registers `id` with `coupons` coupons, open since a second ago for an
/// hour (so `schedule` starts it), and indexes it for projectors.
/// A private redis-server, a connection to its streams and one to its
/// read models.
fn server_and_connections() -> (RedisServer, RedisConnection, RedisConnection) {
    let s = server();
    let (con, rm) = (connect(&s), connect_read_models(&s));
    (s, con, rm)
}

async fn start_promotion(con: &mut RedisConnection, id: &PromotionId, coupons: u64) {
    seckill_testkit::promotions::start_promotion(con, id, 0.75, coupons).await;
}

/// `seckill-worker projector --rebuild --redis-url <url>`, as a command
/// (more flags may follow). Its Redis timeout is the test kit's hang bound:
/// a rebuild's big pipelines, FLUSHDB and SWAPDB may take a busy machine
/// longer than the worker's default second, and that is not what these
/// tests are about.
fn rebuild_command(url: &str) -> Command {
    let timeout = TEST_COMMAND_TIMEOUT_MS.to_string();
    let mut command = Command::new(binary(WORKER));
    command
        .args(["projector", "--rebuild", "--redis-url", url])
        .args(["--redis-timeout-ms", &timeout]);
    command
}

/// Starts each of `ids` with `coupons` coupons and has customers `c-0` ..
/// `c-{grabs}` grab one coupon of each.
async fn start_with_grabs(
    con: &mut RedisConnection,
    ids: &[PromotionId],
    coupons: u64,
    grabs: usize,
) {
    for id in ids {
        start_promotion(con, id, coupons).await;
        grab_many(con, id, 0, grabs).await;
    }
}

/// Customers `c-{from}` .. `c-{to}` each grab one coupon of `id`, through the
/// real grab function, 1000 a batch (one stream entry each).
async fn grab_many(con: &mut RedisConnection, id: &PromotionId, from: usize, to: usize) {
    grab_in_batches(con, id, from, to, 1000).await;
}

/// [`grab_many`], `per_call` customers a grab call (and stream entry).
async fn grab_in_batches(
    con: &mut RedisConnection,
    id: &PromotionId,
    from: usize,
    to: usize,
    per_call: usize,
) {
    let mut n = from;
    while n < to {
        let batch: Vec<CustomerId> = (n..(n + per_call).min(to))
            .map(|c| CustomerId::parse(&format!("c-{c}")).unwrap())
            .collect();
        protocol::grab_batch(con, id, &batch).await.unwrap();
        n = (n + per_call).min(to);
    }
}

/// Every read-model key except the progress bookkeeping, with its content
/// in a comparable form.
async fn dump(con: &mut RedisConnection) -> BTreeMap<String, Vec<(String, String)>> {
    let found = scan_keys(con, &format!("{}*", keys::PREFIX)).await;
    let mut out = BTreeMap::new();
    for batch in found.chunks(1000) {
        let batch: Vec<&String> = batch.iter().filter(|k| *k != keys::PROGRESS).collect();
        let mut types = redis::pipe();
        for key in &batch {
            types.cmd("TYPE").arg(key);
        }
        let kinds: Vec<String> = types.query_async(con).await.unwrap();
        let mut reads = redis::pipe();
        for (key, kind) in batch.iter().zip(&kinds) {
            match kind.as_str() {
                "hash" => reads.hgetall(key),
                "set" => reads.smembers(key),
                "string" => reads.get(key),
                other => panic!("unexpected read-model key type {other} for {key}"),
            };
        }
        let values: Vec<redis::Value> = reads.query_async(con).await.unwrap();
        for ((key, kind), value) in batch.into_iter().zip(&kinds).zip(values) {
            let mut content: Vec<(String, String)> = if kind == "hash" {
                redis::from_redis_value(value).unwrap()
            } else if kind == "string" {
                vec![(redis::from_redis_value(value).unwrap(), String::new())]
            } else {
                let members: Vec<String> = redis::from_redis_value(value).unwrap();
                members.into_iter().map(|m| (m, String::new())).collect()
            };
            content.sort();
            out.insert(key.clone(), content);
        }
    }
    out
}

/// How many coupon buckets customers `c-{n}` for `n` in `range` fill.
fn buckets_of(range: std::ops::Range<usize>) -> usize {
    range
        .map(|n| keys::coupon_bucket(&CustomerId::parse(&format!("c-{n}")).unwrap()))
        .collect::<std::collections::HashSet<_>>()
        .len()
}

fn options(consumer: &str) -> ProjectorOptions {
    ProjectorOptions {
        batch_size: 200,
        ..ProjectorOptions::new(consumer)
    }
}

/// A projector of `s`'s streams into `models`, with [`options`] and
/// metrics registered nowhere.
fn projector(s: &RedisServer, models: RedisConnection, consumer: &str) -> Projector {
    Projector::new(
        connect(s),
        models,
        options(consumer),
        ProjectorMetrics::unregistered(),
    )
}

#[tokio::test]
async fn applying_every_event_twice_leaves_the_read_models_as_applying_once() {
    let (s, mut con, id) = sale_with_grabs("twice", 5, 7).await; // 5 granted, sold out, 2 refused
    let events = events_of(&mut con, &id).await;
    assert_eq!(events.len(), 1 + 5 + 1, "{events:?}");

    let mut rm = connect_read_models(&s);
    read_model::apply(&mut rm, &id, &events).await.unwrap();
    let once = dump(&mut rm).await;
    for chunk in events.chunks(2) {
        read_model::apply(&mut rm, &id, chunk).await.unwrap();
    }
    read_model::apply(&mut rm, &id, &events).await.unwrap();
    assert_eq!(dump(&mut rm).await, once);

    let view = read_model::promotion(&mut rm, &id).await.unwrap().unwrap();
    assert_eq!(view.phase, Phase::Finished);
    assert_eq!((view.granted, view.remaining), (5, 0));
    assert_eq!(view.finish_reason.as_deref(), Some("SoldOut"));
    let coupons = read_model::customer_coupons(&mut rm, &CustomerId::parse("c-0").unwrap())
        .await
        .unwrap();
    assert_eq!(coupons.len(), 1);
    assert_eq!(coupons[0].coupon_id, "shop/twice#1");
    assert!(read_model::active_promotions(&mut rm)
        .await
        .unwrap()
        .is_empty());
}

#[tokio::test]
async fn events_in_any_order_across_two_projectors_converge_to_the_in_order_read_models() {
    let (s, mut con, mut rm) = server_and_connections();
    let mut other = connect_read_models(&s);
    let id = promotion("order");
    start_promotion(&mut con, &id, 6).await;
    grab_many(&mut con, &id, 0, 6).await;
    let events = events_of(&mut con, &id).await;
    assert_eq!(
        events.first().map(Event::type_name),
        Some("PromotionStarted")
    );
    assert_eq!(
        events.last().map(Event::type_name),
        Some("PromotionFinished")
    );

    read_model::apply(&mut rm, &id, &events).await.unwrap();
    let in_order = dump(&mut rm).await;
    assert!(in_order.contains_key(&keys::promotion(&id)));

    // Finished first, then the grabs newest first, Started last; then random
    // orders. Each event is applied on its own, alternating between two
    // connections, as two replicas would.
    let mut orders = vec![events.iter().rev().cloned().collect::<Vec<_>>()];
    for seed in 1..=8u64 {
        let mut order = events.clone();
        shuffle(&mut order, seed * 0x9E37_79B9);
        orders.push(order);
    }
    for order in orders {
        read_model::drop_all_scanned(&mut rm).await.unwrap();
        for (i, event) in order.iter().enumerate() {
            let replica = if i % 2 == 0 { &mut rm } else { &mut other };
            read_model::apply(replica, &id, std::slice::from_ref(event))
                .await
                .unwrap();
        }
        let names: Vec<_> = order.iter().map(Event::type_name).collect();
        assert_eq!(dump(&mut rm).await, in_order, "order {names:?}");
    }

    // A grab seen before Started, alone, already marks the promotion active;
    // Finished before Started keeps it finished and out of the active set.
    read_model::drop_all_scanned(&mut rm).await.unwrap();
    read_model::apply(&mut rm, &id, &events[1..2])
        .await
        .unwrap();
    let members: Vec<String> = redis::cmd("SMEMBERS")
        .arg(keys::ACTIVE)
        .query_async(&mut rm)
        .await
        .unwrap();
    assert_eq!(members, vec![id.to_string()]);
    read_model::apply(&mut other, &id, &events[events.len() - 1..])
        .await
        .unwrap();
    read_model::apply(&mut rm, &id, &events[..1]).await.unwrap();
    let view = read_model::promotion(&mut rm, &id).await.unwrap().unwrap();
    assert_eq!(view.phase, Phase::Finished);
    assert_eq!(view.granted, 6);
    assert!(read_model::active_promotions(&mut rm)
        .await
        .unwrap()
        .is_empty());
}

#[tokio::test]
async fn two_replicas_share_the_streams_find_new_ones_and_complete_the_read_models() {
    let (s, mut con, mut rm) = server_and_connections();
    let shutdown = tokio_util::sync::CancellationToken::new();
    let mut tasks = Vec::new();
    for name in ["r1", "r2"] {
        let p = Projector::new(
            connect(&s),
            connect_read_models(&s),
            ProjectorOptions {
                batch_size: 20,
                discovery_interval: Duration::from_millis(200),
                ..ProjectorOptions::new(name)
            },
            ProjectorMetrics::unregistered(),
        );
        tasks.push(tokio::spawn(p.run(shutdown.clone())));
    }
    // Scheduled after the replicas started: found by re-reading the index.
    let ids = [promotion("a"), promotion("b"), promotion("c")];
    let first_event = Instant::now();
    start_with_grabs(&mut con, &ids, 300, 250).await;
    eventually(WITHIN, || {
        let (mut con, mut rm, ids) = (con.clone(), rm.clone(), &ids);
        async move {
            for id in ids {
                let v = read_model::promotion(&mut rm, id).await.unwrap();
                if !v
                    .as_ref()
                    .is_some_and(|v| v.granted == 250 && v.remaining == 50)
                {
                    return Err(format!("{id}: {v:?}"));
                }
                let pending = pending_total(&mut con, id).await;
                if pending > 0 {
                    return Err(format!("{id}: {pending} pending"));
                }
            }
            Ok(())
        }
    })
    .await;
    let active = read_model::active_promotions(&mut rm).await.unwrap();
    assert_eq!(active.len(), 3);
    for c in [0, 123, 249] {
        let coupons =
            read_model::customer_coupons(&mut rm, &CustomerId::parse(&format!("c-{c}")).unwrap())
                .await
                .unwrap();
        assert_eq!(coupons.len(), 3, "c-{c}: {coupons:?}");
    }
    // Both replicas took part (the group has two consumers that read).
    let consumers: Vec<Vec<redis::Value>> = redis::cmd("XINFO")
        .arg("CONSUMERS")
        .arg(PromotionKeys::new(&ids[0]).events)
        .arg(PROJECTOR_GROUP)
        .query_async(&mut con)
        .await
        .unwrap();
    assert_eq!(consumers.len(), 2);
    // The lag reported is XADD to applied: no more than the events' age.
    let lag = read_model::projection_lag_ms(&mut rm).await.unwrap();
    let age = first_event.elapsed().as_millis() as i64;
    assert!(
        lag.is_some_and(|l| (0..=age).contains(&l)),
        "{lag:?} of events {age} ms old"
    );
    shutdown.cancel();
    for t in tasks {
        t.await.unwrap();
    }
}

/// The read model's `granted` of `id` (0 before it exists).
async fn granted(rm: &mut RedisConnection, id: &PromotionId) -> u64 {
    read_model::promotion(rm, id)
        .await
        .unwrap()
        .map_or(0, |v| v.granted)
}

#[tokio::test]
async fn a_projector_killed_holding_pending_entries_has_them_claimed_and_applied_by_another() {
    let (s, mut con, mut rm) = server_and_connections();
    let id = promotion("killed");
    start_promotion(&mut con, &id, 3000).await;
    // 300 entries of 10 grants each.
    grab_in_batches(&mut con, &id, 0, 3000, 10).await;
    let url = s.url();
    // A reads 100 entries, waits 300 ms, applies and acknowledges them.
    let mut a = Worker::projector(
        &url,
        "a",
        &["--batch-size", "100", "--test-apply-delay-ms", "300"],
    );
    eventually(WITHIN, || {
        let (mut con, mut rm, a, id) = (con.clone(), rm.clone(), &a, &id);
        async move {
            let granted = granted(&mut rm, id).await;
            if granted < 300 {
                return Err(format!("projector a applied {granted}"));
            }
            // Freeze it, and kill it only while it holds entries.
            a.signal("STOP");
            if pending_of(&mut con, id, "a").await.unwrap() > 0 {
                return Ok(());
            }
            a.signal("CONT");
            Err("projector a holds no entry".to_owned())
        }
    })
    .await;
    a.signal("KILL");
    let _ = a.child.wait();
    let held = pending_of(&mut con, &id, "a").await.unwrap();
    assert!(held > 0);
    let before = read_model::promotion(&mut rm, &id).await.unwrap().unwrap();
    assert!(before.granted < 3000, "{before:?}");

    let mut b = Worker::projector(&url, "b", &["--claim-idle-ms", "300"]);
    eventually(WITHIN, || {
        let (mut con, mut rm, id) = (con.clone(), rm.clone(), &id);
        async move {
            let view = read_model::promotion(&mut rm, id).await.unwrap();
            let done = view
                .as_ref()
                .is_some_and(|v| v.granted == 3000 && v.phase == Phase::Finished);
            let pending = if done {
                pending_total(&mut con, id).await
            } else {
                -1
            };
            if pending == 0 {
                Ok(())
            } else {
                Err(format!(
                    "b did not finish a's entries: {view:?}, {pending} pending"
                ))
            }
        }
    })
    .await;
    let exposition = metrics_of(b.port).await;
    b.signal("TERM");
    let _ = b.child.wait();
    // Every customer's coupon was projected, the ones a held included.
    let mut pipe = redis::pipe();
    for c in 0..3000 {
        let customer = CustomerId::parse(&format!("c-{c}")).unwrap();
        pipe.hexists(
            keys::customer_coupons(&customer),
            keys::coupon_field(customer.as_str(), &id.to_string()),
        );
    }
    let exists: Vec<bool> = pipe.query_async(&mut rm).await.unwrap();
    assert!(
        exists.iter().all(|e| *e),
        "{} customers missing",
        exists.iter().filter(|e| !**e).count()
    );
    let reclaimed = metric_value(&exposition, "seckill_projector_reclaimed_entries_total");
    assert!(
        reclaimed >= held as f64,
        "reclaimed {reclaimed} < held {held}\n{exposition}"
    );
}

/// Length of every promotion stream and whether its state hash exists: the
/// command side, which a rebuild must leave alone.
async fn command_side(con: &mut RedisConnection, ids: &[PromotionId]) -> Vec<(u64, bool)> {
    let mut out = Vec::new();
    for id in ids {
        let keys = PromotionKeys::new(id);
        let (len, state): (u64, bool) = redis::pipe()
            .cmd("XLEN")
            .arg(&keys.events)
            .exists(&keys.state)
            .query_async(con)
            .await
            .unwrap();
        out.push((len, state));
    }
    out
}

/// Projects `ids` live, scrambles the read models, runs `seckill-worker
/// projector --rebuild` with `extra` flags, and checks the result equals the
/// live read models key by key and the command side is untouched.
async fn live_then_rebuild(
    s: &RedisServer,
    ids: &[PromotionId],
    models: RedisConnection,
    extra: &[&str],
) -> (usize, Duration, Duration) {
    let mut con = connect(s);
    let mut rm = models.clone();
    let started = Instant::now();
    let mut live = Projector::new(
        connect(s),
        models,
        ProjectorOptions {
            batch_size: 1000,
            ..ProjectorOptions::new("live")
        },
        ProjectorMetrics::unregistered(),
    );
    let report = live.run_until_idle().await.unwrap();
    let projected = started.elapsed();
    let live_models = dump(&mut rm).await;
    let command_before = command_side(&mut con, ids).await;

    // Scramble: a stray key, a wrong count, a lost customer.
    let _: () = redis::pipe()
        .hset(keys::promotion(&ids[0]), "granted", 1)
        .del(keys::customer_coupons(&CustomerId::parse("c-7").unwrap()))
        .sadd(keys::ACTIVE, "shop/gone")
        .query_async(&mut rm)
        .await
        .unwrap();
    assert_ne!(dump(&mut rm).await, live_models);

    let started = Instant::now();
    let status = rebuild_command(&s.url()).args(extra).status().unwrap();
    assert!(status.success());
    let rebuilt_in = started.elapsed();
    let rebuilt = dump(&mut rm).await;
    assert_eq!(rebuilt.len(), live_models.len());
    for (key, content) in &live_models {
        assert_eq!(rebuilt.get(key), Some(content), "key {key}");
    }
    assert_eq!(command_side(&mut con, ids).await, command_before);
    (report.events, projected, rebuilt_in)
}

#[tokio::test]
async fn rebuild_reproduces_the_live_read_models_key_by_key_on_100000_events() {
    let s = server();
    let mut con = connect(&s);
    let ids = [
        promotion("r1"),
        promotion("r2"),
        promotion("r3"),
        promotion("r4"),
    ];
    let started = Instant::now();
    // 25,000 grabs each (every customer in every promotion), plus Started
    // and Finished{SoldOut}: 100,008 events.
    start_with_grabs(&mut con, &ids, 25_000, 25_000).await;
    let generated = started.elapsed();
    // The read models' own database (the default): emptied by FLUSHDB.
    let mut rm = connect_read_models(&s);
    let (applied, projected, rebuilt_in) = live_then_rebuild(&s, &ids, rm.clone(), &[]).await;
    assert_eq!(applied, 100_008);
    assert_eq!(
        dump(&mut rm).await.len(),
        4 + buckets_of(0..25_000) + 1,
        "4 promotions, the buckets of 25,000 customers, the layout marker"
    );
    // Nothing of the read models is in the streams' database.
    let in_streams_db = keys_matching(&mut con, &format!("{}*", keys::PREFIX)).await;
    assert!(in_streams_db.is_empty(), "{in_streams_db:?}");
    eprintln!(
        "100,008 events: generated in {generated:?}, projected live in {projected:?}, rebuilt in {rebuilt_in:?}"
    );
}

/// The `report=RebuildReport { .. }` line a `projector --rebuild` logs.
fn rebuild_report_line(stderr: &[u8]) -> String {
    String::from_utf8_lossy(stderr)
        .lines()
        .find(|l| l.contains("RebuildReport"))
        .unwrap_or_default()
        .to_owned()
}

#[tokio::test]
async fn a_rebuild_while_grabs_and_a_live_projector_run_swaps_in_complete_read_models() {
    let (s, con, ids) = sales_with_grabs(&["busy1", "busy2"], 1_000_000, 20_000).await;
    let shutdown = tokio_util::sync::CancellationToken::new();
    let live = projector(&s, connect_read_models(&s), "live");
    let live = tokio::spawn(live.run(shutdown.clone()));
    // Grabs go on, in small steps, until the rebuild has ended.
    let rebuilding = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let grabbing = {
        let (mut con, ids, rebuilding) = (connect(&s), ids.clone(), rebuilding.clone());
        tokio::spawn(async move {
            let mut next = 20_000;
            while rebuilding.load(std::sync::atomic::Ordering::Relaxed) {
                for id in &ids {
                    grab_many(&mut con, id, next, next + 50).await;
                }
                next += 50;
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            next
        })
    };
    let url = s.url();
    let out = tokio::task::spawn_blocking(move || rebuild_command(&url).output().unwrap())
        .await
        .unwrap();
    rebuilding.store(false, std::sync::atomic::Ordering::Relaxed);
    let customers = grabbing.await.unwrap() as u64;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line = rebuild_report_line(&out.stderr);
    assert!(line.contains("swapped: true"), "{line}");
    assert!(
        !line.contains("caught_up: 0 "),
        "grabs during the rebuild were caught up: {line}"
    );

    // Once the live projector has caught up, every grab of each stream is in
    // the read models: none was lost to the swap.
    let mut rm = connect_read_models(&s);
    for id in &ids {
        eventually(WITHIN, || {
            let (mut con, mut rm) = (con.clone(), rm.clone());
            async move {
                let granted = granted(&mut rm, id).await;
                if granted != customers {
                    return Err(format!("{id}: {granted} of {customers}"));
                }
                let pending = pending_total(&mut con, id).await;
                (pending == 0)
                    .then_some(())
                    .ok_or(format!("{id}: {pending} pending"))
            }
        })
        .await;
    }
    shutdown.cancel();
    live.await.unwrap();
    let after_live = dump(&mut rm).await;
    // Two promotions, the active set, the customers' buckets, the marker.
    assert_eq!(
        after_live.len(),
        2 + 1 + buckets_of(0..customers as usize) + 1
    );
    // And they equal a rebuild on a quiet system, key by key.
    let status = rebuild_command(&s.url()).status().unwrap();
    assert!(status.success());
    assert_eq!(dump(&mut rm).await, after_live);
}

#[tokio::test]
async fn a_rebuild_killed_halfway_leaves_the_live_read_models_as_they_were() {
    let (s, _con, _ids) = sales_with_grabs(&["k1", "k2", "k3"], 40_000, 30_000).await;
    let mut rm = connect_read_models(&s);
    let mut live = projector(&s, rm.clone(), "live");
    live.run_until_idle().await.unwrap();
    let before = dump(&mut rm).await;
    assert_eq!(
        before.len(),
        3 + 1 + buckets_of(0..30_000) + 1,
        "promotions, active set, customers' buckets, layout marker"
    );

    // Killed once it has written part of the new read models aside.
    let mut scratch = RedisArgs::for_url(s.url())
        .connect_database(2)
        .unwrap()
        .unwrap();
    let mut rebuild = rebuild_command(&s.url())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    eventually(WITHIN, || {
        let mut scratch = scratch.clone();
        let running = rebuild.try_wait().unwrap().is_none();
        async move {
            let aside: u64 = redis::cmd("DBSIZE")
                .query_async(&mut scratch)
                .await
                .unwrap();
            assert!(running, "the rebuild ended before it could be killed");
            (aside > 100).then_some(()).ok_or(aside)
        }
    })
    .await;
    rebuild.kill().unwrap();
    rebuild.wait().unwrap();
    assert_eq!(dump(&mut rm).await, before);

    // The next rebuild starts from a clean scratch database and completes.
    let out = rebuild_command(&s.url()).output().unwrap();
    assert!(out.status.success());
    assert!(rebuild_report_line(&out.stderr).contains("swapped: true"));
    assert_eq!(dump(&mut rm).await, before);
    let left: u64 = redis::cmd("DBSIZE")
        .query_async(&mut scratch)
        .await
        .unwrap();
    assert_eq!(left, 0, "the old read models were dropped after the swap");
}

#[tokio::test]
async fn rebuild_in_the_streams_database_deletes_only_read_model_keys() {
    let (s, con, ids) = sales_with_grabs(&["s1", "s2"], 2_000, 1_500).await;
    // --redis-read-model-db 0: the read models share database 0 with the
    // streams, so the rebuild must delete them key by key.
    let shared = RedisArgs {
        redis_read_model_db: Some(0),
        ..RedisArgs::for_url(s.url())
    }
    .connect_read_models()
    .unwrap();
    assert!(!shared.other_database_than(&con));
    let (applied, _, _) =
        live_then_rebuild(&s, &ids, shared, &["--redis-read-model-db", "0"]).await;
    assert_eq!(applied, 2 * (1 + 1_500));
    let in_own_db = dump(&mut connect_read_models(&s)).await;
    assert!(in_own_db.is_empty(), "{in_own_db:?}");
}

#[tokio::test]
async fn rebuild_refuses_to_empty_a_read_model_database_holding_other_data() {
    let (s, _con, id) = sale_with_grabs("guarded", 10, 3).await;
    // A rebuild database that is the read models' own is refused at once.
    let out = rebuild_command(&s.url())
        .args(["--rebuild-db", "1"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("--rebuild-db 1 must be a database of its own"),
        "{stderr}"
    );

    let mut rm = connect_read_models(&s);
    let _: () = redis::cmd("SET")
        .arg("sessions:42")
        .arg("someone else's data")
        .query_async(&mut rm)
        .await
        .unwrap();
    let out = rebuild_command(&s.url()).output().unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("sessions:42") && stderr.contains("--redis-read-model-db"),
        "{stderr}"
    );
    let kept: Option<String> = redis::cmd("GET")
        .arg("sessions:42")
        .query_async(&mut rm)
        .await
        .unwrap();
    assert_eq!(kept.as_deref(), Some("someone else's data"));
    // Nothing was projected either: the refusal comes before the replay.
    assert!(read_model::promotion(&mut rm, &id).await.unwrap().is_none());
}

/// XADDs `event` to `id`'s stream as it is, past the protocol's scripts (an
/// event this projector does not know); its entry id.
async fn append_raw(con: &mut RedisConnection, id: &PromotionId, event: &str) -> String {
    redis::cmd("XADD")
        .arg(PromotionKeys::new(id).events)
        .arg("*")
        .arg(EVENT_FIELD)
        .arg(event)
        .query_async(con)
        .await
        .unwrap()
}

#[tokio::test]
async fn an_unknown_event_is_skipped_counted_and_left_pending_without_stopping_the_projector() {
    let (s, mut con, id) = sale_with_grabs("future", 10, 3).await;
    let refunded = append_raw(
        &mut con,
        &id,
        r#"{"type":"CouponRefunded","version":1,"couponId":"shop/future#1"}"#,
    )
    .await;
    let newer = append_raw(
        &mut con,
        &id,
        r#"{"type":"CouponGrabbed","version":2,"couponId":"shop/future#9"}"#,
    )
    .await;
    grab_many(&mut con, &id, 3, 5).await;

    let registry = MetricsRegistry::new();
    let metrics = ProjectorMetrics::register(&registry);
    let mut p = Projector::new(
        connect(&s),
        connect_read_models(&s),
        ProjectorOptions {
            claim_idle: Duration::ZERO,
            ..options("p")
        },
        metrics,
    );
    let report = p.run_until_idle().await.unwrap();
    // Started, grants 1-3 (one grab call, one entry) and 4-5 (another).
    assert_eq!((report.applied, report.events), (3, 6), "{report:?}");
    assert!(report.skipped >= 2, "{report:?}");
    // Claimed again and again (idle 0) by the next steps: still counted once.
    p.run_until_idle().await.unwrap();
    p.run_until_idle().await.unwrap();

    let view = read_model::promotion(&mut connect_read_models(&s), &id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(view.granted, 5);
    let text = registry.encode().unwrap();
    assert_eq!(
        metric_value(
            &text,
            r#"seckill_projector_decode_failures_total{kind="unknown_type"}"#
        ),
        1.0,
        "{text}"
    );
    assert_eq!(
        metric_value(
            &text,
            r#"seckill_projector_decode_failures_total{kind="unsupported_version"}"#
        ),
        1.0,
        "{text}"
    );
    assert_eq!(
        metric_value(
            &text,
            r#"seckill_projector_events_applied_total{type="CouponGrabbed"}"#
        ),
        5.0
    );
    // All stay in the stream: started, five grabs in two grab calls' entries,
    // and the two unknown.
    assert_eq!(stream_entries(&mut con, &id).await.len(), 1 + 2 + 2);
    let rows: (i64, String, String) = {
        let v: (i64, Option<String>, Option<String>, redis::Value) = redis::cmd("XPENDING")
            .arg(PromotionKeys::new(&id).events)
            .arg(PROJECTOR_GROUP)
            .query_async(&mut con)
            .await
            .unwrap();
        (v.0, v.1.unwrap(), v.2.unwrap())
    };
    assert_eq!(rows, (2, refunded, newer));
}

/// One grab of a stream written by hand: customer, coupon number, time.
type Grab = (String, u64, i64);

/// How a test writes a grab into a stream.
#[derive(Debug, Clone, Copy, PartialEq)]
enum GrabVersion {
    /// JSON in the `event` field, as releases before issue 15 wrote it.
    V1,
    /// Plain fields, one grant per entry (`protocol::grab_entry::fields_v2`),
    /// as releases before the batch entry wrote it.
    V2,
    /// Plain fields, the grants of a batch in one entry
    /// (`protocol::grab_entry::fields`), as the grab function writes it: a
    /// run of consecutive V3 grabs with the same grant time, up to four.
    V3,
}

/// Replaces `id`'s stream by PromotionStarted, `grabs` (the i-th written as
/// `version_of(i)`; consecutive V3 grabs of one grant time share an entry,
/// up to four) and PromotionFinished{SoldOut}, and indexes it.
async fn write_stream(
    con: &mut RedisConnection,
    id: &PromotionId,
    grabs: &[Grab],
    version_of: impl Fn(usize) -> GrabVersion,
) {
    let stream = PromotionKeys::new(id).events;
    let promotion = id.to_string();
    let t0 = grabs.first().map_or(0, |g| g.2);
    let at = |ms: i64| chrono::DateTime::from_timestamp_millis(ms).unwrap();
    let started = Event::PromotionStarted(protocol::PromotionStarted {
        promotion: promotion.clone(),
        discount: 0.75,
        number_of_coupons: grabs.len() as u64,
        publish_time: at(t0 - 1_000),
        finish_time: at(t0 + 3_600_000),
        started_at: Some(at(t0 - 1_000)),
        shards: None,
    });
    let finished = Event::PromotionFinished(protocol::PromotionFinished {
        promotion: promotion.clone(),
        reason: protocol::FinishReason::SoldOut,
        granted: grabs.len() as u64,
        finished_at: grabs.last().map(|g| at(g.2)),
    });
    let mut pipe = redis::pipe();
    pipe.del(&stream).ignore();
    pipe.cmd("XADD")
        .arg(&stream)
        .arg("*")
        .arg(EVENT_FIELD)
        .arg(started.encode())
        .ignore();
    let mut i = 0;
    while i < grabs.len() {
        let (customer, seq, ms) = &grabs[i];
        let xadd = pipe.cmd("XADD").arg(&stream).arg("*");
        let version = version_of(i);
        i += 1;
        match version {
            GrabVersion::V1 => {
                let grab = Event::CouponGrabbed(protocol::CouponGrabbed {
                    coupon_id: format!("{promotion}#{seq}"),
                    promotion: promotion.clone(),
                    customer_id: customer.clone(),
                    discount: Some(0.75),
                    granted_at: at(*ms),
                    shard_granted: None,
                });
                xadd.arg(EVENT_FIELD).arg(grab.encode());
            }
            GrabVersion::V2 => {
                for (name, value) in protocol::grab_entry::fields_v2(customer, *seq, *ms) {
                    xadd.arg(name).arg(value);
                }
            }
            GrabVersion::V3 => {
                let mut batch = vec![customer.as_str()];
                while i < grabs.len()
                    && batch.len() < 4
                    && version_of(i) == GrabVersion::V3
                    && grabs[i].2 == *ms
                    && grabs[i].1 == seq + batch.len() as u64
                {
                    batch.push(&grabs[i].0);
                    i += 1;
                }
                for (name, value) in protocol::grab_entry::fields(&batch, *seq, *ms) {
                    xadd.arg(name).arg(value);
                }
            }
        }
        xadd.ignore();
    }
    pipe.cmd("XADD")
        .arg(&stream)
        .arg("*")
        .arg(EVENT_FIELD)
        .arg(finished.encode())
        .ignore();
    pipe.sadd(protocol::PROMOTION_INDEX_KEY, &promotion)
        .ignore();
    let _: () = pipe.query_async(con).await.unwrap();
}

/// Empties the read models, projects every stream with a fresh projector,
/// and dumps the result.
async fn project_afresh(
    s: &RedisServer,
    rm: &mut RedisConnection,
) -> BTreeMap<String, Vec<(String, String)>> {
    read_model::drop_database(rm).await.unwrap();
    let mut p = projector(s, rm.clone(), "fresh");
    let report = p.run_until_idle().await.unwrap();
    assert_eq!(report.skipped, 0, "{report:?}");
    dump(rm).await
}

#[tokio::test]
async fn a_stream_mixing_v1_v2_and_v3_grabs_projects_and_rebuilds_to_the_read_models_of_any_one_version(
) {
    let (s, mut con, mut rm) = server_and_connections();
    let id = promotion("mixed");
    let t0 = 1_764_583_200_000;
    // Grabs come in batches of three that share a grant time, as a grab
    // call's do.
    let grabs: Vec<Grab> = (0..300)
        .map(|n| (format!("c-{n}"), n as u64 + 1, t0 + 7 * (n / 3) as i64))
        .collect();

    write_stream(&mut con, &id, &grabs, |_| GrabVersion::V1).await;
    let all_v1 = project_afresh(&s, &mut rm).await;
    write_stream(&mut con, &id, &grabs, |_| GrabVersion::V2).await;
    let all_v2 = project_afresh(&s, &mut rm).await;
    write_stream(&mut con, &id, &grabs, |_| GrabVersion::V3).await;
    assert!(stream_entries(&mut con, &id).await.len() < 300 / 2);
    let all_v3 = project_afresh(&s, &mut rm).await;
    // Alternating runs of versions, as rolling upgrades of the command
    // workers write them.
    let mixed = |i: usize| match (i / 7) % 3 {
        0 => GrabVersion::V1,
        1 => GrabVersion::V2,
        _ => GrabVersion::V3,
    };
    write_stream(&mut con, &id, &grabs, mixed).await;
    let versions: BTreeSet<String> = stream_entries(&mut con, &id)
        .await
        .iter()
        .map(|e| match e.map.get("version") {
            None => "v1".to_owned(),
            Some(v) => format!("v{}", redis::from_redis_value::<String>(v.clone()).unwrap()),
        })
        .collect();
    assert_eq!(
        versions,
        BTreeSet::from(["v1", "v2", "v3"].map(String::from))
    );
    let mixed_live = project_afresh(&s, &mut rm).await;

    assert_eq!(all_v1.len(), 1 + buckets_of(0..300) + 1, "{all_v1:?}");
    assert_eq!(all_v2, all_v1);
    assert_eq!(all_v3, all_v1);
    assert_eq!(mixed_live, all_v1);
    // The same through `--rebuild`.
    let status = rebuild_command(&s.url()).status().unwrap();
    assert!(status.success());
    assert_eq!(dump(&mut rm).await, all_v1);

    // What the query side answers from it: the promotion's discount joined
    // to the coupon, grantedAt from the grab's milliseconds.
    let held = read_model::customer_coupons(&mut rm, &CustomerId::parse("c-10").unwrap())
        .await
        .unwrap();
    assert_eq!(held.len(), 1, "{held:?}");
    assert_eq!(held[0].coupon_id, "shop/mixed#11");
    assert_eq!(held[0].promotion, "shop/mixed");
    assert_eq!(held[0].discount, 0.75);
    assert_eq!(held[0].granted_at, "2025-12-01T10:00:00.021Z");
}

/// Writes the read models of `id` as a release before issue 15 left them:
/// the promotion's hash and active index as today, and one key per
/// customer holding its coupon's JSON; no bucket, no layout marker.
async fn write_v1_read_models(
    s: &RedisServer,
    rm: &mut RedisConnection,
    id: &PromotionId,
) -> usize {
    let mut con = connect(s);
    let events = events_of(&mut con, id).await;
    let mut pipe = redis::pipe();
    let promotion_only: Vec<Event> = events
        .iter()
        .filter(|e| !matches!(e, Event::CouponGrabbed(_)))
        .cloned()
        .collect();
    read_model::apply(rm, id, &promotion_only).await.unwrap();
    let _: () = redis::cmd("DEL")
        .arg(keys::LAYOUT)
        .query_async(rm)
        .await
        .unwrap();
    let mut customers = 0;
    for event in &events {
        let Event::CouponGrabbed(g) = event else {
            continue;
        };
        let coupon = read_model::CustomerCoupon {
            coupon_id: g.coupon_id.clone(),
            promotion: id.to_string(),
            discount: 0.75,
            granted_at: g
                .granted_at
                .to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        };
        pipe.hset(
            keys::legacy_customer_coupons(&CustomerId::parse(&g.customer_id).unwrap()),
            id.to_string(),
            serde_json::to_string(&coupon).unwrap(),
        )
        .ignore();
        customers += 1;
    }
    let _: () = pipe.query_async(rm).await.unwrap();
    customers
}

#[tokio::test]
async fn upgrading_from_the_v1_layout_keeps_every_coupon_visible_then_replays_into_buckets() {
    let (s, mut con, mut rm) = server_and_connections();
    let ids = [promotion("old1"), promotion("old2")];
    start_with_grabs(&mut con, &ids, 500, 400).await;
    for id in &ids {
        assert_eq!(write_v1_read_models(&s, &mut rm, id).await, 400);
    }
    let customers: Vec<CustomerId> = [0, 17, 399]
        .iter()
        .map(|n| CustomerId::parse(&format!("c-{n}")).unwrap())
        .collect();
    // Before any projector of this release ran: the marker is missing, so
    // the query side reads the version 1 keys.
    let mut before = Vec::new();
    for c in &customers {
        let held = read_model::customer_coupons(&mut rm, c).await.unwrap();
        assert_eq!(held.len(), 2, "{c}: {held:?}");
        before.push(held);
    }
    assert!(!read_model::layout_complete(&mut rm).await.unwrap());

    // The first projector finds the version 1 read models without a marker
    // and replays every stream into buckets before it projects.
    let upgraded = seckill_workers::projector::upgrade_layout(&mut con, &mut rm, 1000)
        .await
        .unwrap();
    assert_eq!(
        upgraded,
        seckill_workers::projector::LayoutUpgrade::Replayed { applied: 2 * 401 }
    );
    assert!(read_model::layout_complete(&mut rm).await.unwrap());
    for (c, held) in customers.iter().zip(&before) {
        let bucket: Vec<(String, String)> = redis::cmd("HGETALL")
            .arg(keys::customer_coupons(c))
            .query_async(&mut rm)
            .await
            .unwrap();
        assert!(
            bucket
                .iter()
                .filter(|(f, _)| f.starts_with(&format!("{c}|")))
                .count()
                == 2,
            "{c} in its bucket: {bucket:?}"
        );
        // From the buckets now, the same answer.
        assert_eq!(
            &read_model::customer_coupons(&mut rm, c).await.unwrap(),
            held
        );
    }
    // Done once: a projector starting afterwards finds the marker.
    assert_eq!(
        seckill_workers::projector::upgrade_layout(&mut con, &mut rm, 1000)
            .await
            .unwrap(),
        seckill_workers::projector::LayoutUpgrade::Complete
    );

    // The version 1 keys stay for workers of the old release until
    // `--rebuild`, which leaves exactly the read models of this layout.
    let legacy = keys::legacy_customer_coupons(&customers[0]);
    let exists: bool = redis::cmd("EXISTS")
        .arg(&legacy)
        .query_async(&mut rm)
        .await
        .unwrap();
    assert!(exists);
    let mut p = projector(&s, rm.clone(), "live");
    p.run_until_idle().await.unwrap();
    let status = rebuild_command(&s.url()).status().unwrap();
    assert!(status.success());
    let rebuilt = dump(&mut rm).await;
    assert!(!rebuilt.contains_key(&legacy));
    assert_eq!(
        rebuilt.len(),
        2 + 1 + buckets_of(0..400) + 1,
        "promotions, active set, buckets, marker"
    );
    for (c, held) in customers.iter().zip(&before) {
        assert_eq!(
            &read_model::customer_coupons(&mut rm, c).await.unwrap(),
            held
        );
    }
}

#[tokio::test]
async fn a_projector_on_empty_read_models_marks_the_layout_without_replaying() {
    let (_s, mut con, mut rm) = server_and_connections();
    start_with_grabs(&mut con, &[promotion("fresh")], 10, 3).await;
    assert_eq!(
        seckill_workers::projector::upgrade_layout(&mut con, &mut rm, 1000)
            .await
            .unwrap(),
        seckill_workers::projector::LayoutUpgrade::Marked
    );
    assert!(read_model::layout_complete(&mut rm).await.unwrap());
    assert!(read_model::promotion(&mut rm, &promotion("fresh"))
        .await
        .unwrap()
        .is_none());
}
