//! The operator's side of stock shards (issue 14) on a real Redis Cluster
//! started by the test (3 masters): `lifecycle::drive_with` and
//! `lifecycle::finish_deleted_with`, the Redis-facing layer the controller's
//! reconcile runs, driving S = 3 promotions while grabs are made through
//! `protocol::shards::grab`, as a worker makes them.

use std::collections::HashMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use seckill_operator::lifecycle::{
    drive_with, finish_deleted_with, Driven, ShardSettings, SHARDS_COLOCATED,
    SHARDS_NEED_DURABLE_STEPS,
};
use seckill_operator::promotion::{Phase, PromotionSpec, PromotionStatus};
use seckill_testkit::promotions::{customer, id, redis_now_ms};
use seckill_testkit::redis::Fsync;
use seckill_testkit::redis_cluster::{RedisCluster, RedisClusterOptions};
use seckill_testkit::stream::entries_at as entries;
use seckill_workers::protocol::placement::key_slot;
use seckill_workers::protocol::shards::{
    self, MoveOut, ShardAnswer, ShardMap, ShardPhase, StockView,
};
use seckill_workers::protocol::{
    shard_map_key, Durability, FinishReason, PromotionId, ScheduleResult,
};
use seckill_workers::redis_connection::{RedisArgs, RedisConnection};

/// The operator as these tests run it: no replicas, every master on
/// `appendfsync always` (the cluster below), acknowledged by the flag; a
/// move is stale after 300 ms so the test need not wait 2 s.
fn settings() -> ShardSettings {
    ShardSettings {
        durable: None,
        fsync_always: true,
        move_stale_ms: 300,
    }
}

/// 3 masters with `replicas` replicas each, every node on `appendfsync
/// always`.
fn cluster(replicas: usize) -> RedisCluster {
    RedisCluster::start(RedisClusterOptions {
        masters: 3,
        replicas_per_master: replicas,
        node_timeout: Duration::from_millis(1000),
        appendfsync: Some(Fsync::Always),
        extra: Vec::new(),
    })
    .expect("redis cluster starts")
}

/// A 3 s command timeout: 9 nodes fsyncing every write on a loaded 2-core
/// machine answer slowly at times.
fn connect(c: &RedisCluster) -> RedisConnection {
    RedisArgs {
        redis_timeout_ms: 3_000,
        ..RedisArgs::for_cluster(c.seed_nodes())
    }
    .connect()
    .expect("cluster connection")
}

fn at(ms: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_millis(ms).expect("a representable time")
}

fn spec(coupons: u64, shards: u32, publish_ms: i64, finish_ms: i64) -> PromotionSpec {
    PromotionSpec {
        publish_time: at(publish_ms),
        finish_time: at(finish_ms),
        number_of_coupons: coupons,
        discount: 0.3,
        description: None,
        shards,
    }
}

async fn drive(
    con: &mut RedisConnection,
    p: &PromotionId,
    spec: &PromotionSpec,
    previous: Option<&PromotionStatus>,
    settings: &ShardSettings,
) -> Driven {
    // As the controller does: a reconcile that met a Redis error (here a
    // timeout on a loaded machine) is run again; every step is idempotent
    // or recorded, which the counts of events checked after it prove.
    let mut attempt = 0;
    loop {
        attempt += 1;
        match drive_with(con, p, spec, Some(1), previous, settings).await {
            Ok(driven) => return driven,
            Err(e) if e.kind() == "RedisUnavailable" && attempt < 3 => {
                eprintln!("drive attempt {attempt} failed ({e}): run again");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(e) => panic!("drive: {e:?}"),
        }
    }
}

/// Waits until Redis' clock reaches `ms`.
async fn until_redis(con: &mut RedisConnection, ms: i64) {
    loop {
        let now = redis_now_ms(con).await;
        if now >= ms {
            return;
        }
        tokio::time::sleep(Duration::from_millis((ms - now).clamp(1, 200) as u64)).await;
    }
}

/// The type of a stream entry: its `type` field, or the `type` inside its
/// JSON `event` field (PromotionStarted, PromotionFinished).
fn kind_of(fields: &HashMap<String, String>) -> String {
    fields.get("type").cloned().unwrap_or_else(|| {
        fields
            .get("event")
            .and_then(|e| serde_json::from_str::<serde_json::Value>(e).ok())
            .and_then(|e| e["type"].as_str().map(str::to_owned))
            .unwrap_or_default()
    })
}

/// The entries of `kind` in every shard's stream, by shard.
async fn events_by_shard(
    con: &mut RedisConnection,
    map: &ShardMap,
    kind: &str,
) -> Vec<Vec<HashMap<String, String>>> {
    let mut out = Vec::new();
    for i in 0..map.shards() {
        let all = entries(con, &map.keys(i).unwrap().events).await;
        out.push(
            all.into_iter()
                .map(|(_, f)| f)
                .filter(|f| kind_of(f) == kind)
                .collect(),
        );
    }
    out
}

fn counts(by_shard: &[Vec<HashMap<String, String>>]) -> Vec<usize> {
    by_shard.iter().map(Vec::len).collect()
}

/// The JSON of the one PromotionFinished in shard 0's stream.
fn finished_event(by_shard: &[Vec<HashMap<String, String>>]) -> serde_json::Value {
    assert_eq!(counts(by_shard)[0], 1, "one PromotionFinished in shard 0");
    serde_json::from_str(&by_shard[0][0]["event"]).expect("Finished is JSON")
}

async fn collects(con: &mut RedisConnection, map: &ShardMap) -> Vec<shards::ShardCollect> {
    let mut out = Vec::new();
    for i in 0..map.shards() {
        out.push(shards::collect(con, map, i, None).await.expect("collect"));
    }
    out
}

/// `shop/<name>` with `coupons` over 3 shards, open since a second ago by
/// Redis' clock for a minute, driven once (so Active) with the default
/// settings: its id, spec, the drive and its shard map.
async fn driven_active(
    con: &mut RedisConnection,
    name: &str,
    coupons: u64,
) -> (PromotionId, PromotionSpec, Driven, ShardMap) {
    let p = id(name);
    let publish = redis_now_ms(con).await - 1_000;
    let s = spec(coupons, 3, publish, publish + 60_000);
    let driven = drive(con, &p, &s, None, &settings()).await;
    assert_eq!(driven.status.phase, Some(Phase::Active));
    let map = shards::load_map(con, &p).await.unwrap();
    (p, s, driven, map)
}

/// Asserts that every shard's collect reports `phase`.
async fn assert_every_shard(con: &mut RedisConnection, map: &ShardMap, phase: ShardPhase) {
    let phases: Vec<ShardPhase> = collects(con, map).await.iter().map(|f| f.phase).collect();
    assert!(phases.iter().all(|p| *p == phase), "{phases:?}");
}

/// The reasons of `driven`'s transitions, in order.
fn reasons(driven: &Driven) -> Vec<&'static str> {
    driven.transitions.iter().map(|t| t.reason).collect()
}

fn condition<'a>(s: &'a PromotionStatus, t: &str) -> (&'a str, &'a str) {
    let c = s.condition(t).unwrap_or_else(|| panic!("no {t} in {s:?}"));
    (c.status.as_str(), c.reason.as_str())
}

#[tokio::test]
async fn an_s3_promotion_is_placed_one_shard_per_master_started_once_summed_recovered_and_expired_with_one_finish(
) {
    let c = cluster(0);
    life_of_an_s3_promotion(&c, settings()).await;
}

/// The same life with durable steps (WAIT for 1 replica) on 3 masters with
/// one replica each: every step the operator takes on the strength of
/// another (open after Started, recovery's move_in after the record, the
/// closes after the begin, the commit after the closes) goes through
/// probe + WAIT and is acknowledged.
#[tokio::test]
async fn the_same_life_with_durable_steps_on_replicated_masters() {
    let c = cluster(1);
    let durable = ShardSettings {
        durable: Some(Durability {
            replicas: 1,
            timeout: Duration::from_millis(300),
        }),
        fsync_always: false,
        move_stale_ms: 300,
    };
    assert!(durable.allows_shards());
    life_of_an_s3_promotion(&c, durable).await;
}

async fn life_of_an_s3_promotion(c: &RedisCluster, settings: ShardSettings) {
    let mut con = connect(c);
    let durable = settings.durable;
    let p = id("big-sale");
    let now = redis_now_ms(&mut con).await;
    let publish = now + 2_500;
    // Room for the Active part on a loaded machine (it takes 1-3 s).
    let finish = publish + 10_000;
    let s = spec(30, 3, publish, finish);

    // Before the publish time: planned, every shard scheduled, one per master.
    let first = drive(&mut con, &p, &s, None, &settings).await;
    assert_eq!(first.status.phase, Some(Phase::Pending));
    let map = shards::load_map(&mut con, &p).await.expect("a ready map");
    assert_eq!(map.shards(), 3);
    let masters: Vec<String> = (0..3)
        .map(|i| {
            c.master_for_slot(key_slot(&map.keys(i).unwrap().state))
                .unwrap()
        })
        .collect();
    let mut distinct = masters.clone();
    distinct.sort();
    distinct.dedup();
    assert_eq!(distinct.len(), 3, "one shard per master: {masters:?}");
    let reported: Vec<&str> = first
        .status
        .shards
        .iter()
        .map(|s| s.master.as_str())
        .collect();
    assert_eq!(reported, masters, "the status names each shard's master");
    assert_eq!(
        condition(&first.status, SHARDS_COLOCATED),
        ("False", "OneMasterPerShard")
    );
    assert_every_shard(&mut con, &map, ShardPhase::Pending).await;
    assert_eq!(
        counts(&events_by_shard(&mut con, &map, "PromotionStarted").await),
        [0, 0, 0]
    );
    let again = drive(&mut con, &p, &s, Some(&first.status), &settings).await;
    assert!(again.transitions.is_empty(), "{:?}", again.transitions);
    assert_eq!(
        shards::load_map(&mut con, &p).await.unwrap(),
        map,
        "first plan wins"
    );

    // At the publish time: exactly one PromotionStarted, every shard open.
    until_redis(&mut con, publish).await;
    let started = drive(&mut con, &p, &s, Some(&again.status), &settings).await;
    assert_eq!(started.status.phase, Some(Phase::Active));
    assert_eq!(reasons(&started), ["Started"]);
    assert_every_shard(&mut con, &map, ShardPhase::Active).await;
    let after = drive(&mut con, &p, &s, Some(&started.status), &settings).await;
    assert!(after.transitions.is_empty());
    assert_eq!(
        counts(&events_by_shard(&mut con, &map, "PromotionStarted").await),
        [1, 0, 0]
    );

    // Grabs as a worker makes them: the status sums the shards.
    let mut view = StockView::new(3);
    let mut granted = 0;
    for n in 0..12 {
        let who = customer(n);
        let home = map.home(&who);
        let answers = shards::grab(&mut con, &map, home, &[who], &mut view, durable)
            .await
            .expect("grab");
        granted += answers
            .iter()
            .filter(|a| matches!(a, ShardAnswer::Granted(_)))
            .count() as u64;
    }
    assert_eq!(granted, 12);
    let summed = drive(&mut con, &p, &s, Some(&after.status), &settings).await;
    let per_shard: Vec<u64> = collects(&mut con, &map)
        .await
        .iter()
        .map(|f| f.granted)
        .collect();
    assert!(
        per_shard.iter().filter(|g| **g > 0).count() >= 2,
        "{per_shard:?}"
    );
    assert_eq!((summed.status.granted, summed.status.remaining), (12, 18));
    assert_eq!(summed.status.stock_moves_in_flight, Some(0));

    // A mover killed after move_out: young, left to it; stale, completed.
    let donor = (0..3u32)
        .max_by_key(|&i| {
            let f = &per_shard;
            (30 / 3) as i64 - f[i as usize] as i64
        })
        .unwrap();
    let to = (donor + 1) % 3;
    let MoveOut::Moved { pending, .. } = shards::move_out(&mut con, &map, donor, to, 1, durable)
        .await
        .expect("move out")
    else {
        panic!("the donor had stock");
    };
    let moving = pending.ranges.len();
    assert!(moving >= 1);
    let young = drive(&mut con, &p, &s, Some(&summed.status), &settings).await;
    assert_eq!(
        young.status.stock_moves_in_flight,
        Some(1),
        "one move of {moving} coupons"
    );
    assert_eq!(
        shards::moves_pending(&mut con, &map, donor, None)
            .await
            .unwrap()
            .len(),
        1,
        "a young move is left to its mover"
    );
    tokio::time::sleep(Duration::from_millis(400)).await;
    let recovered = drive(&mut con, &p, &s, Some(&young.status), &settings).await;
    assert!(shards::moves_pending(&mut con, &map, donor, None)
        .await
        .unwrap()
        .is_empty());
    let figures = collects(&mut con, &map).await;
    assert_eq!(figures.iter().map(|f| f.pending).sum::<u64>(), 0);
    assert_eq!(
        figures.iter().map(|f| f.stock + f.granted).sum::<u64>(),
        30,
        "stock + granted = numberOfCoupons once the move is completed: {figures:?}"
    );
    assert_eq!(recovered.status.stock_moves_in_flight, Some(0));
    assert_eq!(recovered.status.granted, 12);
    assert_eq!(
        counts(&events_by_shard(&mut con, &map, "StockMovedIn").await)[to as usize],
        1
    );

    // At the finish time: every shard closed, one Finished with the sum.
    until_redis(&mut con, finish).await;
    let expired = drive(&mut con, &p, &s, Some(&recovered.status), &settings).await;
    assert_eq!(expired.status.phase, Some(Phase::Finished));
    assert_eq!(expired.status.finish_reason, Some(FinishReason::Expired));
    assert_eq!((expired.status.granted, expired.status.remaining), (12, 18));
    assert_eq!(reasons(&expired), ["Finished"]);
    assert_every_shard(&mut con, &map, ShardPhase::Finished).await;
    let finishes = events_by_shard(&mut con, &map, "PromotionFinished").await;
    assert_eq!(counts(&finishes), [1, 0, 0]);
    let event = finished_event(&finishes);
    assert_eq!(event["granted"], 12);
    assert_eq!(event["reason"], "Expired");
    let last = drive(&mut con, &p, &s, Some(&expired.status), &settings).await;
    assert!(last.transitions.is_empty());
    assert_eq!(last.deadline, None);
    assert_eq!(
        counts(&events_by_shard(&mut con, &map, "PromotionFinished").await),
        [1, 0, 0]
    );
}

#[tokio::test]
async fn sharding_is_refused_without_durable_steps_replanned_before_the_start_a_quiet_sale_closed_and_deleted_in_three_phases(
) {
    let c = cluster(0);
    let mut con = connect(&c);
    let now = redis_now_ms(&mut con).await;

    // No replicas and no fsync acknowledgement: refused, nothing written.
    let refused_id = id("refused");
    let s = spec(10, 3, now + 60_000, now + 120_000);
    let refused = drive_with(
        &mut con,
        &refused_id,
        &s,
        Some(1),
        None,
        &ShardSettings::default(),
    )
    .await
    .expect("drive");
    assert_eq!(
        condition(&refused.status, "Ready"),
        ("False", SHARDS_NEED_DURABLE_STEPS)
    );
    assert!(refused
        .transitions
        .iter()
        .any(|t| t.reason == "ShardsRefused"));
    let map: Option<String> = redis::cmd("HGET")
        .arg(shard_map_key(&refused_id))
        .arg("count")
        .query_async(&mut con)
        .await
        .unwrap();
    assert_eq!(map, None, "not planned");
    assert!(!refused.snapshot.exists, "not scheduled");

    // Replanned before the start: 3 -> 2 drops shard 2; 2 -> 1 unshards.
    let p = id("replanned");
    let three = spec(10, 3, now + 60_000, now + 120_000);
    let d3 = drive(&mut con, &p, &three, None, &settings()).await;
    let map3 = shards::load_map(&mut con, &p).await.unwrap();
    assert_eq!(map3.shards(), 3);
    let two = PromotionSpec {
        shards: 2,
        ..three.clone()
    };
    let d2 = drive(&mut con, &p, &two, Some(&d3.status), &settings()).await;
    let map2 = shards::load_map(&mut con, &p).await.unwrap();
    assert_eq!(map2.shards(), 2);
    assert_eq!(d2.status.shards.len(), 2);
    let gone: i64 = redis::cmd("EXISTS")
        .arg(&map3.keys(2).unwrap().state)
        .query_async(&mut con)
        .await
        .unwrap();
    assert_eq!(gone, 0, "the dropped shard's state is deleted");
    let figures = collects(&mut con, &map2).await;
    assert_eq!(
        figures.iter().map(|f| f.stock).sum::<u64>(),
        10,
        "the new deal covers every coupon: {figures:?}"
    );
    assert!(figures.iter().all(|f| f.phase == ShardPhase::Pending));
    let one = PromotionSpec {
        shards: 1,
        ..three.clone()
    };
    let d1 = drive(&mut con, &p, &one, Some(&d2.status), &settings()).await;
    assert!(!shards::load_map(&mut con, &p).await.unwrap().is_sharded());
    assert_eq!(d1.status.stock_moves_in_flight, None, "an unsharded status");
    assert!(d1.status.shards.is_empty());
    assert_eq!(d1.snapshot.number_of_coupons, Some(10));
    assert_eq!(d1.status.phase, Some(Phase::Pending));

    // A quiet sale: every shard granted its last coupon on its own (no
    // customer met an empty home, so no worker ran the sold-out check);
    // the reconcile's double collect closes it.
    let (quiet, s, open, map) = driven_active(&mut con, "quiet", 3).await;
    for shard in 0..3 {
        let who = (0..).map(customer).find(|c| map.home(c) == shard).unwrap();
        let batch = shards::shard_grab(&mut con, &map, shard, &[who], None)
            .await
            .expect("shard grab");
        assert!(matches!(batch.answers[..], [ShardAnswer::Granted(_)]));
    }
    assert_eq!(
        counts(&events_by_shard(&mut con, &map, "PromotionFinished").await),
        [0, 0, 0],
        "nobody has closed it yet"
    );
    let sold = drive(&mut con, &quiet, &s, Some(&open.status), &settings()).await;
    assert_eq!(sold.status.phase, Some(Phase::Finished));
    assert_eq!(sold.status.finish_reason, Some(FinishReason::SoldOut));
    assert_eq!((sold.status.granted, sold.status.remaining), (3, 0));
    assert_eq!(reasons(&sold), ["SoldOut", "Finished"]);
    let finishes = events_by_shard(&mut con, &map, "PromotionFinished").await;
    assert_eq!(finished_event(&finishes)["granted"], 3);

    // Deleted while Active: the three phases, one Finished with the sum.
    let (del, s, active, map) = driven_active(&mut con, "deleted", 9).await;
    let mut view = StockView::new(3);
    for n in 0..5 {
        let who = customer(n);
        let home = map.home(&who);
        shards::grab(&mut con, &map, home, &[who], &mut view, None)
            .await
            .expect("grab");
    }
    let snap = finish_deleted_with(&mut con, &del, &s, Some(&active.status), &settings())
        .await
        .expect("finish deleted");
    assert_eq!(snap.result, ScheduleResult::Finished);
    assert_eq!(snap.granted, 5);
    let finishes = events_by_shard(&mut con, &map, "PromotionFinished").await;
    let event = finished_event(&finishes);
    assert_eq!(
        (event["granted"].as_u64(), event["reason"].as_str()),
        (Some(5), Some("Deleted"))
    );
    assert_every_shard(&mut con, &map, ShardPhase::Finished).await;
    let twice = finish_deleted_with(&mut con, &del, &s, Some(&active.status), &settings())
        .await
        .unwrap();
    assert_ne!(twice.result, ScheduleResult::Finished, "finished once");
    assert_eq!(
        counts(&events_by_shard(&mut con, &map, "PromotionFinished").await),
        [1, 0, 0]
    );
}
