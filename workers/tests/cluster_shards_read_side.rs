//! The read side of a sharded promotion (issue 14) on a real 3-master Redis
//! Cluster started by each test: sales with S = 3 driven through
//! `protocol::shards` (grabs at home, refills by stock moves, the sold-out
//! double collect), with customers arriving skewed towards one shard so that
//! stock moves happen, projected by real projectors. Every test checks the
//! read model against the streams themselves: granted = the CouponGrabbed
//! entries of every shard's stream = PromotionFinished's total.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use redis::Value;
use seckill_testkit::eventually;
use seckill_testkit::promotions::{
    customer, id, index_for_projectors, open_promotion, spec_from_now,
};
use seckill_testkit::redis::scan_keys;
use seckill_testkit::redis_cluster::{cluster, RedisCluster};
use seckill_testkit::shards::planned;
use seckill_testkit::shuffle::shuffle;
use seckill_testkit::stream::{entries_at, grants_in};
use seckill_workers::projector::{self, entries_of, Projector, ProjectorMetrics, ProjectorOptions};
use seckill_workers::protocol::shards::{self, ShardAnswer, ShardMap};
use seckill_workers::protocol::Phase;
use seckill_workers::protocol::{
    self, read_model as rm_keys, CustomerId, Event, PromotionId, EVENT_FIELD, PROJECTOR_GROUP,
};
use seckill_workers::read_model::{self, ShardStream};
use seckill_workers::redis_connection::RedisConnection;
use tokio_util::sync::CancellationToken;

/// Bounds every wait for something that must happen.
const WITHIN: Duration = Duration::from_secs(60);

const SHARDS: u32 = 3;

/// `shop/<name>` with `coupons` over [`SHARDS`] shards placed on the masters
/// of `c`, open since a second ago for ten minutes, started, and in the
/// index projectors discover promotions by.
async fn sharded(
    c: &RedisCluster,
    con: &mut RedisConnection,
    name: &str,
    coupons: u64,
) -> ShardMap {
    let p = id(name);
    let map = planned(c, con, &p, SHARDS).await;
    let spec = spec_from_now(0.7, coupons, -1000, 601_000);
    shards::schedule(con, &map, &spec, None)
        .await
        .expect("schedule");
    let started = shards::start(con, &map, None).await.expect("start");
    assert!(
        matches!(started, shards::Start::Started { .. }),
        "{started:?}"
    );
    index_for_projectors(con, &p).await;
    map
}

/// `n` customers of `prefix`, `skew` of them homed on shard 0 and the rest
/// spread over the others, 10% arriving twice, in a repeatable shuffled
/// order: shard 0 runs dry long before the others, so stock moves to it.
fn skewed_arrivals(map: &ShardMap, prefix: &str, n: usize, skew: f64) -> Vec<CustomerId> {
    let on_zero = (n as f64 * skew) as usize;
    let (mut zero, mut rest) = (Vec::new(), Vec::new());
    let mut i = 0;
    while zero.len() < on_zero || rest.len() < n - on_zero {
        let c = customer(format!("{prefix}-{i}"));
        i += 1;
        if map.home(&c) == 0 {
            if zero.len() < on_zero {
                zero.push(c);
            }
        } else if rest.len() < n - on_zero {
            rest.push(c);
        }
    }
    let mut all: Vec<CustomerId> = zero.into_iter().chain(rest).collect();
    let again: Vec<CustomerId> = all.iter().step_by(10).cloned().collect();
    all.extend(again);
    shuffle(&mut all, 0x9e37_79b9_7f4a_7c15);
    all
}

/// `workers` tasks act as command workers until `arrivals` are all
/// answered (testkit's crowd: batches by home shard through `shards::grab`,
/// failed batches retried). Answers how many were granted.
async fn crowd(
    con: &RedisConnection,
    map: &ShardMap,
    arrivals: Vec<CustomerId>,
    workers: usize,
) -> usize {
    seckill_testkit::shards::crowd(con, map, arrivals, workers, None)
        .await
        .iter()
        .filter(|(_, a, _)| matches!(a, ShardAnswer::Granted(_)))
        .count()
}

/// What every shard's stream says: per shard, its CouponGrabbed entries as
/// (customer, coupon number); its stock moves out; the one Finished's
/// (reason, total) if any.
#[derive(Debug, Default)]
struct Streams {
    grabs: Vec<Vec<(String, u64)>>,
    moves: usize,
    finished: Option<(String, u64)>,
}

impl Streams {
    fn granted(&self) -> u64 {
        self.grabs.iter().map(|g| g.len() as u64).sum()
    }
}

/// The events of one stream entry's `fields`, as a projector decodes them
/// (a version 3 grab entry holds several); none for a stock move, which
/// projectors leave out.
fn event_of(map: &ShardMap, fields: &[(&[u8], &[u8])]) -> Vec<Event> {
    let stock_move = protocol::stock_move_entry(fields.iter().copied()).unwrap();
    if stock_move.is_some() {
        return Vec::new();
    }
    Event::decode_entry(map.id(), fields.iter().copied()).expect("an event")
}

async fn read_streams(con: &mut RedisConnection, map: &ShardMap) -> Streams {
    let mut out = Streams::default();
    for shard in 0..map.shards() {
        let mut grabs = Vec::new();
        for (_, f) in entries_at(con, &map.keys(shard).unwrap().events).await {
            if let Some(json) = f.get(EVENT_FIELD) {
                if let Ok(Event::PromotionFinished(f)) = Event::decode(json.as_bytes()) {
                    assert!(out.finished.is_none(), "two PromotionFinished");
                    out.finished = Some((f.reason.as_str().to_owned(), f.granted));
                }
                continue;
            }
            match f.get("type").map(String::as_str) {
                Some("CouponGrabbed") => grabs.extend(
                    grants_in(map.id(), &f)
                        .into_iter()
                        .map(|(customer, seq, _)| (customer, seq)),
                ),
                Some("StockMovedOut") => out.moves += 1,
                _ => {}
            }
        }
        out.grabs.push(grabs);
    }
    out
}

/// A read-model key's value, whatever its type.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Stored {
    Hash(BTreeMap<String, String>),
    Set(BTreeSet<String>),
    Text(String),
}

/// Every `seckill:rm:*` key of the cluster (SCAN on every master) with its
/// value.
async fn read_models(c: &RedisCluster, con: &mut RedisConnection) -> BTreeMap<String, Stored> {
    let masters: BTreeSet<String> = c
        .slot_map()
        .expect("slot map")
        .into_iter()
        .map(|r| r.master)
        .collect();
    let mut keys = BTreeSet::new();
    for master in masters {
        let client = redis::Client::open(format!("redis://{master}/")).expect("a client");
        let mut node = client
            .get_multiplexed_async_connection()
            .await
            .expect("a node connection");
        keys.extend(scan_keys(&mut node, &format!("{}*", rm_keys::PREFIX)).await);
    }
    let mut out = BTreeMap::new();
    for key in keys {
        let kind: String = answer(con, "TYPE", &key).await;
        let value = match kind.as_str() {
            "hash" => Stored::Hash(answer(con, "HGETALL", &key).await),
            "set" => Stored::Set(answer(con, "SMEMBERS", &key).await),
            "string" => Stored::Text(answer(con, "GET", &key).await),
            other => panic!("{key} is a {other}"),
        };
        out.insert(key, value);
    }
    out
}

/// `command key`'s answer (TYPE, HGETALL, SMEMBERS, GET), as `T`.
async fn answer<T: redis::FromRedisValue>(
    con: &mut RedisConnection,
    command: &str,
    key: &str,
) -> T {
    redis::cmd(command)
        .arg(key)
        .query_async(con)
        .await
        .unwrap_or_else(|e| panic!("{command} {key}: {e}"))
}

fn projector(con: &RedisConnection, consumer: &str) -> Projector {
    let mut options = ProjectorOptions::new(consumer);
    // Small batches: many of them, from every shard, interleaved.
    options.batch_size = 25;
    Projector::new(
        con.clone(),
        con.clone(),
        options,
        ProjectorMetrics::unregistered(),
    )
}

/// The promotion's read-model hash.
async fn promotion_hash(con: &mut RedisConnection, p: &PromotionId) -> BTreeMap<String, String> {
    answer(con, "HGETALL", &rm_keys::promotion(p)).await
}

/// Waits until the read model shows the promotion Finished with `total`.
async fn finished_with(con: &RedisConnection, p: &PromotionId, total: u64) {
    eventually(WITHIN, || {
        let (mut con, p) = (con.clone(), p.clone());
        async move {
            match read_model::promotion(&mut con, &p).await {
                Ok(Some(v)) if v.phase == Phase::Finished && v.granted == total => Ok(v),
                other => Err(format!("{other:?}")),
            }
        }
    })
    .await;
}

/// Waits until a sharded promotion's read model has counted `total` grabs
/// over its shards and its Finished: `granted` alone shows the total as soon
/// as Finished is projected, maybe before the last grabs of another shard.
async fn all_counted(con: &RedisConnection, p: &PromotionId, total: u64) {
    finished_with(con, p, total).await;
    eventually(WITHIN, || {
        let (mut con, p) = (con.clone(), p.clone());
        async move {
            let hash = promotion_hash(&mut con, &p).await;
            match hash.get("grantedShards") {
                Some(n) if *n == total.to_string() => Ok(()),
                _ => Err(hash),
            }
        }
    })
    .await;
}

/// Entries delivered to the projectors' group and not acknowledged, over
/// every shard's stream.
async fn pending(con: &mut RedisConnection, map: &ShardMap) -> i64 {
    let mut total = 0;
    for shard in 0..map.shards() {
        let summary: Value = redis::cmd("XPENDING")
            .arg(&map.keys(shard).unwrap().events)
            .arg(PROJECTOR_GROUP)
            .query_async(con)
            .await
            .expect("XPENDING");
        if let Value::Array(items) = summary {
            if let Some(Value::Int(n)) = items.first() {
                total += n;
            }
        }
    }
    total
}

/// The read model of `map`'s promotion against its streams: granted and the
/// per-shard counts equal the streams' grabs and Finished's total, remaining
/// is the rest, and every holder's coupon is the one its customer reads.
async fn assert_read_model_is_the_streams(
    con: &mut RedisConnection,
    map: &ShardMap,
    coupons: u64,
) -> Streams {
    let p = map.id().clone();
    let streams = read_streams(con, map).await;
    let (reason, total) = streams.finished.clone().expect("the sale finished");
    assert_eq!(reason, "SoldOut");
    assert_eq!(
        total,
        streams.granted(),
        "Finished's total = the streams' grabs"
    );
    let view = read_model::promotion(con, &p)
        .await
        .unwrap()
        .expect("projected");
    assert_eq!(view.granted, streams.granted(), "{view:?}");
    assert_eq!(view.number_of_coupons, coupons);
    assert_eq!(view.remaining, coupons - view.granted);
    assert_eq!(view.shards, SHARDS);
    let hash = promotion_hash(con, &p).await;
    for (shard, grabs) in streams.grabs.iter().enumerate() {
        assert_eq!(
            hash.get(&format!("granted:{shard}")),
            Some(&grabs.len().to_string()),
            "shard {shard}'s count: {hash:?}"
        );
    }
    assert_eq!(hash.get("grantedShards"), Some(&total.to_string()));
    assert_eq!(hash.get("finishedGranted"), Some(&total.to_string()));
    for (c, n) in streams.grabs.iter().flatten() {
        let held = read_model::customer_coupons(con, &CustomerId::parse(c).unwrap())
            .await
            .unwrap();
        let ids: Vec<&str> = held.iter().map(|h| h.coupon_id.as_str()).collect();
        assert_eq!(ids, [format!("{p}#{n}")], "{c}");
    }
    streams
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sharded_sale_projected_live_shows_every_shards_grants_and_a_rebuild_is_equal_key_by_key()
{
    let c = cluster(3, 0);
    let mut con = c.connect();
    let coupons = 300;
    let map = sharded(&c, &mut con, "live", coupons).await;
    let p = map.id().clone();
    // An unsharded promotion beside it, projected by the same projector.
    let plain = open_promotion(&mut con, "plain", 5).await;

    // The projector follows the sales as they happen.
    let shutdown = CancellationToken::new();
    let live = tokio::spawn(projector(&con, "live").run(shutdown.clone()));
    for n in 0..7 {
        protocol::grab(&mut con, &plain, &customer(format!("plain-{n}")))
            .await
            .expect("an unsharded grab");
    }
    let granted = crowd(&con, &map, skewed_arrivals(&map, "live", 900, 0.6), 6).await;
    assert_eq!(granted as u64, coupons);
    all_counted(&con, &p, coupons).await;
    finished_with(&con, &plain, 5).await;
    shutdown.cancel();
    live.await.expect("the projector task");

    // S = 1 keeps exactly the unsharded read model's fields.
    let fields: BTreeSet<String> = promotion_hash(&mut con, &plain).await.into_keys().collect();
    let unsharded: BTreeSet<String> = [
        "promotion",
        "discount",
        "numberOfCoupons",
        "publishTime",
        "finishTime",
        "startedAt",
        "granted",
        "phase",
        "finishReason",
        "finishedAt",
    ]
    .into_iter()
    .map(str::to_owned)
    .collect();
    assert_eq!(fields, unsharded);
    let view = read_model::promotion(&mut con, &plain)
        .await
        .unwrap()
        .unwrap();
    assert_eq!((view.granted, view.remaining, view.shards), (5, 0, 1));

    let streams = assert_read_model_is_the_streams(&mut con, &map, coupons).await;
    assert!(streams.moves > 0, "stock moved during the sale");
    // Stock move entries are acknowledged like the rest, not left pending.
    assert_eq!(pending(&mut con, &map).await, 0);
    let projected = read_models(&c, &mut con).await;
    assert!(!read_model::active_promotions(&mut con)
        .await
        .unwrap()
        .iter()
        .any(|a| a.promotion == p.to_string()));

    let mut models = con.clone();
    let report = projector::rebuild(
        &mut con,
        &mut models,
        None,
        &ProjectorMetrics::unregistered(),
        50,
    )
    .await
    .unwrap();
    assert_eq!(report.streams, SHARDS as usize + 1, "{report:?}");
    assert_eq!(report.skipped, 0, "{report:?}");
    assert!(report.keys_dropped > 0, "{report:?}");
    let rebuilt = read_models(&c, &mut con).await;
    let differ: Vec<(&String, Option<&Stored>, Option<&Stored>)> = projected
        .keys()
        .chain(rebuilt.keys())
        .collect::<BTreeSet<_>>()
        .into_iter()
        .filter(|k| projected.get(*k) != rebuilt.get(*k))
        .map(|k| (k, projected.get(k), rebuilt.get(k)))
        .collect();
    assert!(differ.is_empty(), "live / rebuilt differ: {differ:?}");
    eprintln!(
        "live: {} grabs per shard {:?}, {} moves, {} read-model keys",
        streams.granted(),
        streams.grabs.iter().map(Vec::len).collect::<Vec<_>>(),
        streams.moves,
        projected.len()
    );
}

/// The batches of every shard's stream as a projector could be handed them:
/// chunks of `chunk` entries, decoded (stock moves left out), with their
/// stream.
async fn batches(
    con: &mut RedisConnection,
    map: &ShardMap,
    chunk: usize,
) -> Vec<(ShardStream, Vec<Event>)> {
    let mut out = Vec::new();
    for shard in 0..map.shards() {
        let stream = ShardStream {
            shard,
            shards: map.shards(),
        };
        let entries = entries_at(con, &map.keys(shard).unwrap().events).await;
        for page in entries.chunks(chunk) {
            let events: Vec<Event> = page
                .iter()
                .flat_map(|(_, f)| {
                    let fields: Vec<(&[u8], &[u8])> = f
                        .iter()
                        .map(|(k, v)| (k.as_bytes(), v.as_bytes()))
                        .collect();
                    event_of(map, &fields)
                })
                .collect();
            out.push((stream, events));
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shuffled_and_duplicated_batches_of_every_shard_converge_to_the_live_read_model() {
    let c = cluster(3, 0);
    let mut con = c.connect();
    let coupons = 200;
    let map = sharded(&c, &mut con, "shuffled", coupons).await;
    let p = map.id().clone();
    crowd(&con, &map, skewed_arrivals(&map, "shuffled", 500, 0.6), 4).await;
    projector(&con, "in-order")
        .run_until_idle()
        .await
        .expect("projected");
    let streams = assert_read_model_is_the_streams(&mut con, &map, coupons).await;
    assert!(streams.moves > 0, "stock moved during the sale");
    let mut live = read_models(&c, &mut con).await;
    // The projector's progress report is bookkeeping, not projected.
    live.remove(rm_keys::PROGRESS);

    // Three deliveries in different orders, each with half of its batches
    // delivered twice, each into read models dropped beforehand.
    for seed in [1u64, 2, 3] {
        let mut keys: Vec<String> = live.keys().cloned().collect();
        keys.push(rm_keys::PROGRESS.to_owned());
        read_model::drop_keys(&mut con, &keys).await.unwrap();
        read_model::mark_layout_complete(&mut con).await.unwrap();
        let mut calls = batches(&mut con, &map, 7 + seed as usize).await;
        let again: Vec<_> = calls.iter().step_by(2).cloned().collect();
        calls.extend(again);
        shuffle(&mut calls, seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
        // Finished before the last grabs in some orders: granted must not
        // depend on it.
        for (stream, events) in &calls {
            read_model::apply_stream(&mut con, &p, *stream, events)
                .await
                .unwrap();
        }
        let replayed = read_models(&c, &mut con).await;
        assert_eq!(replayed, live, "delivery order {seed}");
    }
}

/// Reads up to `count` entries of every shard's stream as projector
/// `consumer` (so they are delivered to it and pending), without
/// acknowledging them; answers them decoded per stream, stock moves left
/// out.
async fn deliver_without_ack(
    con: &mut RedisConnection,
    map: &ShardMap,
    consumer: &str,
    count: usize,
) -> Vec<(ShardStream, Vec<Event>)> {
    let mut out = Vec::new();
    for shard in 0..map.shards() {
        let key = &map.keys(shard).unwrap().events;
        let answer: Value = redis::cmd("XREADGROUP")
            .arg("GROUP")
            .arg(PROJECTOR_GROUP)
            .arg(consumer)
            .arg("COUNT")
            .arg(count)
            .arg("STREAMS")
            .arg(key)
            .arg(">")
            .query_async(con)
            .await
            .expect("XREADGROUP");
        // RESP2: [[name, entries]]; RESP3: {name: entries}; Nil: none.
        let entries: Vec<projector::RawEntry> = match answer {
            Value::Nil => Vec::new(),
            Value::Array(streams) => streams
                .into_iter()
                .flat_map(|s| match s {
                    Value::Array(mut pair) if pair.len() == 2 => {
                        entries_of(pair.swap_remove(1)).expect("entries")
                    }
                    other => panic!("XREADGROUP stream {other:?}"),
                })
                .collect(),
            Value::Map(pairs) => pairs
                .into_iter()
                .flat_map(|(_, v)| entries_of(v).expect("entries"))
                .collect(),
            other => panic!("XREADGROUP answered {other:?}"),
        };
        let events = entries
            .iter()
            .flat_map(|e| event_of(map, &e.field_slices().collect::<Vec<_>>()))
            .collect();
        out.push((
            ShardStream {
                shard,
                shards: map.shards(),
            },
            events,
        ));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_projector_restarted_mid_sale_resumes_every_shards_stream_without_double_counting() {
    let c = cluster(3, 0);
    let mut con = c.connect();
    let coupons = 300;
    let map = sharded(&c, &mut con, "restart", coupons).await;
    let p = map.id().clone();
    let mut arrivals = skewed_arrivals(&map, "restart", 900, 0.6);
    let second = arrivals.split_off(arrivals.len() / 5);

    // First part of the sale, projected live.
    let shutdown = CancellationToken::new();
    let first_run = tokio::spawn(projector(&con, "restarted").run(shutdown.clone()));
    crowd(&con, &map, arrivals, 4).await;
    let so_far = read_streams(&mut con, &map).await.granted();
    assert!(so_far > 0 && so_far < coupons, "mid-sale: {so_far}");
    eventually(WITHIN, || {
        let (mut con, p) = (con.clone(), p.clone());
        async move {
            match read_model::promotion(&mut con, &p).await {
                Ok(Some(v)) if v.granted == so_far => Ok(()),
                other => Err(format!("{other:?}")),
            }
        }
    })
    .await;
    // Killed: no clean stop.
    first_run.abort();
    let _ = first_run.await;

    // The rest of the sale while it is down. Then, as if it had died after
    // reading and applying a batch of each stream but before acknowledging
    // it: the entries are pending under its name, and applied once already.
    crowd(&con, &map, second, 4).await;
    for (stream, events) in deliver_without_ack(&mut con, &map, "restarted", 40).await {
        read_model::apply_stream(&mut con, &p, stream, &events)
            .await
            .unwrap();
    }
    assert!(pending(&mut con, &map).await > 0);

    // Restarted under the same name: it re-reads its pending entries, then
    // the rest, and the counts are the streams', not more.
    let shutdown = CancellationToken::new();
    let second_run = tokio::spawn(projector(&con, "restarted").run(shutdown.clone()));
    all_counted(&con, &p, coupons).await;
    eventually(WITHIN, || {
        let (mut con, map) = (con.clone(), map.clone());
        async move {
            match pending(&mut con, &map).await {
                0 => Ok(()),
                n => Err(format!("{n} entries pending")),
            }
        }
    })
    .await;
    shutdown.cancel();
    second_run.await.expect("the projector task");
    assert_read_model_is_the_streams(&mut con, &map, coupons).await;
}
