//! Stock shards (issue 14) at protocol level on a real Redis Cluster started
//! by each test (3 masters; 3 + 3 for the failover): the functions are called
//! directly through `protocol::shards`, step by step where a test stops a
//! mover between steps. Every test ends with the invariants read straight
//! from every shard: conservation number by number (every shard's ranges ∪
//! every holder's number ∪ the ranges of moves not yet received = exactly
//! 1..N), every holder on their home shard and in one shard only, per-shard
//! counts equal to the streams, one Started and one Finished in shard 0's
//! stream only.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use redis::streams::StreamRangeReply;
use seckill_testkit::eventually;
use seckill_testkit::promotions::{customer, id, redis_now_ms, spec_from_now};
use seckill_testkit::redis_cluster::cluster;
use seckill_testkit::redis_cluster::RedisCluster;
use seckill_testkit::shard_audit::{
    assert_conserved, audit, conservation, field, read_all, Audit, Conservation, ShardRead,
};
use seckill_testkit::shards::{at_home, crowd, planned, set_finish_ms, start_crowd, Answered};
use seckill_testkit::shuffle::shuffle;
use seckill_testkit::stream::{entries_at, grants_in};
use seckill_workers::protocol::placement::{self, key_slot};
use seckill_workers::protocol::ranges::NumberRanges;
use seckill_workers::protocol::shards::{
    self, MoveOut, ShardAnswer, ShardError, ShardMap, SoldOutCheck, SoldOutDecision, StockView,
};
use seckill_workers::protocol::{
    self, grab_entry, shard_map_key, CustomerId, Durability, FinishReason, PromotionId,
    PromotionKeys, ScheduleResult, ShardKeys, EVENT_FIELD,
};
use seckill_workers::read_model;
use seckill_workers::redis_connection::RedisConnection;

/// Bounds every wait for something that must happen.
const WITHIN: Duration = Duration::from_secs(60);

/// Every step waits for one replica (at most 300 ms) before it counts: the
/// durability the failover tests run with.
const ONE_REPLICA: Durability = Durability {
    replicas: 1,
    timeout: Duration::from_millis(300),
};

/// `shop/<name>` with `coupons` over `shards` shards placed on the masters of
/// `c`, open since a second ago for `length_ms`, started.
async fn sharded(
    c: &RedisCluster,
    con: &mut RedisConnection,
    name: &str,
    coupons: u64,
    shards: u32,
    length_ms: i64,
    durable: Option<Durability>,
) -> ShardMap {
    let p = id(name);
    let map = planned(c, con, &p, shards).await;
    let spec = spec_from_now(0.7, coupons, -1000, length_ms + 1000);
    shards::schedule(con, &map, &spec, durable)
        .await
        .expect("schedule");
    let started = shards::start(con, &map, durable).await.expect("start");
    assert!(
        matches!(started, shards::Start::Started { .. }),
        "{started:?}"
    );
    assert_eq!(shards::load_map(con, &p).await.unwrap(), map);
    map
}

/// The master (`host:port`) of each shard of `map`.
fn masters_of(c: &RedisCluster, map: &ShardMap) -> Vec<String> {
    (0..map.shards())
        .map(|i| {
            c.master_for_slot(key_slot(&map.keys(i).unwrap().state))
                .expect("master of a shard")
        })
        .collect()
}

/// `n` customers, 10% of them arriving twice, in random order.
fn arrivals(prefix: &str, n: usize, seed: u64) -> Vec<CustomerId> {
    let mut all: Vec<CustomerId> = (0..n).map(|i| customer(format!("{prefix}-{i}"))).collect();
    all.extend((0..n / 10).map(|i| customer(format!("{prefix}-{}", i * 7 % n))));
    shuffle(&mut all, seed);
    all
}

/// (customer, answer, host ms when the answer came back)
/// Every promise of a coupon in `answered` is the coupon held; answers
/// counted by kind.
fn check_answers(
    answered: &Answered,
    holders: &BTreeMap<String, u64>,
) -> BTreeMap<&'static str, usize> {
    let mut kinds = BTreeMap::new();
    for (c, a, _) in answered {
        let kind = match a {
            ShardAnswer::Granted(_) => "granted",
            ShardAnswer::AlreadyGranted(_) => "already",
            ShardAnswer::SoldOut => "sold_out",
            ShardAnswer::Finished(_) => "finished",
            other => panic!("{c:?} was left with {other:?}"),
        };
        *kinds.entry(kind).or_default() += 1;
        if let Some(coupon) = a.coupon() {
            let n: u64 = coupon
                .coupon_id
                .rsplit('#')
                .next()
                .unwrap()
                .parse()
                .unwrap();
            assert_eq!(
                holders.get(c.as_str()),
                Some(&n),
                "{c:?} answered {coupon:?}"
            );
        }
    }
    kinds
}

/// The sale of `map` as every shard holds it once sold out: the numbers
/// conserved with every coupon granted, the audit passed with one
/// Finished{SoldOut, coupons}, and every coupon `answered` promised the one
/// held. Answers the conservation, the audit and the answers by kind.
fn assert_sold_out(
    map: &ShardMap,
    reads: &[ShardRead],
    coupons: u64,
    answered: &Answered,
) -> (Conservation, Audit, BTreeMap<&'static str, usize>) {
    let cons = assert_conserved(reads, coupons);
    assert_eq!(cons.granted, coupons);
    let audit = audit(map, reads);
    assert_eq!(
        audit.finished.map(|f| (f.0, f.1)),
        Some((FinishReason::SoldOut, coupons))
    );
    let kinds = check_answers(answered, &audit.holders);
    (cons, audit, kinds)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crowd_on_three_shards_grants_exactly_the_stock_and_every_number_once() {
    let c = cluster(3, 0);
    let mut con = c.connect();
    let coupons = 600;
    let map = sharded(&c, &mut con, "crowd", coupons, 3, 600_000, None).await;
    let masters: BTreeSet<String> = masters_of(&c, &map).into_iter().collect();
    assert_eq!(masters.len(), 3, "with S = 3 each master holds one shard");

    let answered = crowd(&con, &map, arrivals("crowd", 1800, 7), 6, None).await;

    let reads = read_all(&mut con, &map).await;
    let (cons, audit, kinds) = assert_sold_out(&map, &reads, coupons, &answered);
    assert_eq!((cons.stock, cons.in_flight), (0, 0));
    let (_, _, finished_ms) = audit.finished.expect("the sale finished");
    assert_eq!(kinds.get("granted"), Some(&(coupons as usize)), "{kinds:?}");
    // No false sold-out: every 410 came after PromotionFinished{SoldOut}.
    let early: Vec<_> = answered
        .iter()
        .filter(|(_, a, at)| *a == ShardAnswer::SoldOut && *at < finished_ms)
        .collect();
    assert!(early.is_empty(), "sold_out before Finished: {early:?}");
    let per_shard: Vec<usize> = reads.iter().map(|r| r.customers.len()).collect();
    // Homes are uneven (the same customers every run): some shard sold more
    // than its 200, so the refill path moved stock to it.
    assert!(per_shard.iter().any(|&n| n > 200), "{per_shard:?}");
    assert!(audit.moves > 0, "the refill path ran");
    eprintln!(
        "crowd: {kinds:?}, grants per shard {per_shard:?}, {} moves ({:.1} per 1,000 grabs)",
        audit.moves,
        audit.moves as f64 * 1000.0 / audit.grabs as f64
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiting_customer_granted_meanwhile_elsewhere_gets_their_coupon_not_the_sold_out() {
    // The same customer in two batches at once: one batch finds home empty
    // and waits for a refill while the other is granted the last coupon;
    // the waiting batch's sold-out check then finishes the promotion. Its
    // refill is called here in that state: home empty, every shard known
    // empty, the customer a holder.
    let c = cluster(3, 0);
    let mut con = c.connect();
    let map = sharded(&c, &mut con, "meanwhile", 3, 3, 600_000, None).await;
    let mut view = StockView::new(3);
    let everyone: Vec<CustomerId> = (0..60).map(|i| customer(format!("m-{i}"))).collect();
    let mut holder = None;
    for who in &everyone {
        let home = map.home(who);
        let answers = shards::grab(
            &mut con,
            &map,
            home,
            std::slice::from_ref(who),
            &mut view,
            None,
        )
        .await
        .unwrap();
        if let ShardAnswer::Granted(coupon) = &answers[0] {
            holder = Some((who.clone(), coupon.clone()));
        }
    }
    let (holder, coupon) = holder.expect("three coupons granted");
    let home = map.home(&holder);
    let other = everyone
        .iter()
        .find(|c| map.home(c) == home && **c != holder)
        .unwrap()
        .clone();
    let mut all_empty = StockView::new(3);
    for i in 0..3 {
        all_empty.saw(i, 0);
    }
    let answers = shards::refill(
        &mut con,
        &map,
        home,
        &[holder.clone(), other],
        &mut all_empty,
        None,
    )
    .await
    .unwrap();
    assert_eq!(
        answers,
        [ShardAnswer::AlreadyGranted(coupon), ShardAnswer::SoldOut],
        "the holder gets their coupon, the other the sold-out"
    );
    let reads = read_all(&mut con, &map).await;
    assert_conserved(&reads, 3);
    let (reason, total, _) = audit(&map, &reads).finished.expect("finished");
    assert_eq!((reason, total), (FinishReason::SoldOut, 3));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_that_uses_up_its_range_and_goes_on_in_a_moved_one_appends_one_entry_per_run() {
    // 30 coupons on 3 shards: shard 0 holds one range of 10. Numbers of
    // shard 1 moved to it make a second range; one batch of 12 of shard 0's
    // customers takes its 10 and 2 of the moved: two CouponGrabbed entries,
    // one per run of consecutive numbers, each grant with the shard's count.
    let c = cluster(3, 0);
    let mut con = c.connect();
    let map = sharded(&c, &mut con, "runs", 30, 3, 600_000, None).await;
    let shard_zero = &read_all(&mut con, &map).await[0].state;
    let own = NumberRanges::span(field(shard_zero, "next"), field(shard_zero, "upto"));
    assert_eq!(own.len(), 10, "{own:?}");
    let mv = move_until(&mut con, &map, 1, 0, &[], 3).await;
    let moved = mv.ranges.ranges().to_vec();
    assert_eq!(moved.len(), 1, "{mv:?}");
    let (lo, hi) = own.ranges()[0];
    assert!(
        moved[0].0 > hi + 1 || moved[0].1 + 1 < lo,
        "the moved numbers {moved:?} do not continue {own:?}"
    );
    let batch = homed(&map, 0, "r", 12);
    let mut view = StockView::new(3);
    let answers = shards::grab(&mut con, &map, 0, &batch, &mut view, None)
        .await
        .unwrap();
    let numbers: Vec<u64> = answers
        .iter()
        .map(|a| match a {
            ShardAnswer::Granted(coupon) => {
                read_model::coupon_sequence(&coupon.coupon_id).expect("a coupon number")
            }
            other => panic!("not granted: {other:?}"),
        })
        .collect();
    let entries: Vec<Vec<(String, u64, Option<u64>)>> =
        entries_at(&mut con, &map.keys(0).unwrap().events)
            .await
            .iter()
            .filter(|(_, f)| {
                f.get(grab_entry::TYPE_FIELD).map(String::as_str) == Some(grab_entry::TYPE)
            })
            .map(|(_, f)| grants_in(map.id(), f))
            .collect();
    assert_eq!(entries.len(), 2, "{entries:?}");
    assert_eq!(entries[0].len(), 10, "{entries:?}");
    assert_eq!(entries[1].len(), 2, "{entries:?}");
    let in_stream: Vec<(String, u64)> = entries
        .iter()
        .flatten()
        .map(|(c, n, _)| (c.clone(), *n))
        .collect();
    let answered: Vec<(String, u64)> = batch
        .iter()
        .map(|c| c.as_str().to_owned())
        .zip(numbers)
        .collect();
    assert_eq!(
        in_stream, answered,
        "the stream holds the answers, in order"
    );
    let counts: Vec<Option<u64>> = entries.iter().flatten().map(|(_, _, k)| *k).collect();
    assert_eq!(counts, (1..=12).map(Some).collect::<Vec<_>>());
    let runs: Vec<u64> = entries
        .iter()
        .map(|e| e[e.len() - 1].1 - e[0].1 + 1)
        .collect();
    assert_eq!(runs, [10, 2], "each entry is a run of consecutive numbers");
    let reads = read_all(&mut con, &map).await;
    assert_conserved(&reads, 30);
    assert_eq!(audit(&map, &reads).grabs, 12);
}

/// Takes a move of `map` from shard `from` to shard `to` (grants `waiting`
/// in step 2) up to step `stop_after` (1, 2 or 3), as a mover killed there
/// would leave it; returns the move.
async fn move_until(
    con: &mut RedisConnection,
    map: &ShardMap,
    from: u32,
    to: u32,
    waiting: &[CustomerId],
    stop_after: u32,
) -> shards::PendingMove {
    let MoveOut::Moved { pending: mv, .. } =
        shards::move_out(con, map, from, to, waiting.len() as u64, None)
            .await
            .unwrap()
    else {
        panic!("the donor has stock");
    };
    if stop_after >= 2 {
        let b = shards::move_in(con, map, &mv, waiting, None).await.unwrap();
        assert!(b.applied);
        assert!(
            b.answers
                .iter()
                .all(|a| matches!(a, ShardAnswer::Granted(_))),
            "{b:?}"
        );
    }
    if stop_after >= 3 {
        assert!(shards::move_done(con, map, from, &mv.id, None)
            .await
            .unwrap());
    }
    mv
}

/// Customers whose home is `shard`, named `<prefix>-<n>`.
fn homed(map: &ShardMap, shard: u32, prefix: &str, n: usize) -> Vec<CustomerId> {
    (0..)
        .map(|i| customer(format!("{prefix}-{i}")))
        .filter(|c| map.home(c) == shard)
        .take(n)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mover_stopped_after_each_step_leaves_stock_conserved_and_recovery_completes_the_move() {
    let c = cluster(3, 0);
    let mut con = c.connect();
    let coupons = 30;
    for stop_after in 1..=3 {
        let map = sharded(
            &c,
            &mut con,
            &format!("stop-{stop_after}"),
            coupons,
            3,
            600_000,
            None,
        )
        .await;
        let waiting = homed(&map, 1, &format!("w{stop_after}"), 2);
        let mv = move_until(&mut con, &map, 2, 1, &waiting, stop_after).await;

        // At the stop: every number is somewhere, the moved ones in flight
        // until step 2 ran.
        let reads = read_all(&mut con, &map).await;
        let cons = assert_conserved(&reads, coupons);
        let moved = mv.ranges.len();
        assert_eq!(moved, 5, "half the donor's 10 (at least the 2 waiting)");
        let expected_in_flight = if stop_after == 1 { moved } else { 0 };
        assert_eq!(
            cons.in_flight, expected_in_flight,
            "after step {stop_after}"
        );
        let pending = shards::moves_pending(&mut con, &map, 2, None)
            .await
            .unwrap();
        assert_eq!(pending.len(), usize::from(stop_after < 3));

        // Another caller (its own connection) finds and completes it: not
        // while the move is younger than the age asked for, then at once.
        let mut other = c.connect();
        let young = shards::recover_stale(&mut other, &map, 3_600_000, None)
            .await
            .unwrap();
        assert_eq!(young, 0, "a move seconds old is left to its mover");
        assert_eq!(
            shards::moves_pending(&mut con, &map, 2, None)
                .await
                .unwrap(),
            pending
        );
        let done = shards::recover_stale(&mut other, &map, 0, None)
            .await
            .unwrap();
        assert_eq!(done, usize::from(stop_after < 3), "after step {stop_after}");
        assert_eq!(shards::recover(&mut other, &map, None).await.unwrap(), 0);
        let reads = read_all(&mut con, &map).await;
        let cons = assert_conserved(&reads, coupons);
        assert_eq!(cons.in_flight, 0);
        assert!(reads.iter().all(|r| r.moves_out.is_empty()));
        let donor: u64 = field(&reads[2].state, "stock");
        let home: u64 = field(&reads[1].state, "stock");
        let granted_at_home = if stop_after >= 2 { 2 } else { 0 };
        assert_eq!(
            (donor, home),
            (5, 10 + 5 - granted_at_home),
            "after step {stop_after}"
        );
        assert_eq!(reads[1].moves_in.len(), 1, "the move reached shard 1 once");

        // The rest sells out exactly.
        let answered = crowd(
            &con,
            &map,
            arrivals(&format!("s{stop_after}"), 90, 3),
            3,
            None,
        )
        .await;
        let reads = read_all(&mut con, &map).await;
        assert_sold_out(&map, &reads, coupons, &answered);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn double_collect_refuses_to_finish_while_a_move_brings_stock_between_reads() {
    let c = cluster(3, 0);
    let mut con = c.connect();
    let map = sharded(&c, &mut con, "double", 3, 3, 600_000, None).await;
    // One coupon per shard; shards 0 and 1 sell theirs.
    for shard in [0, 1] {
        let who = homed(&map, shard, "early", 1);
        let b = shards::shard_grab(&mut con, &map, shard, &who, None)
            .await
            .unwrap();
        assert!(matches!(b.answers[0], ShardAnswer::Granted(_)), "{b:?}");
    }
    // The interleaving that fools a single collect: shard 0 read empty, then
    // a whole move 2 -> 0, then shards 1 and 2 read empty.
    let mut first = vec![shards::collect(&mut con, &map, 0, None).await.unwrap()];
    let mv = move_until(&mut con, &map, 2, 0, &[], 3).await;
    assert_eq!(mv.ranges.len(), 1);
    for shard in [1, 2] {
        first.push(shards::collect(&mut con, &map, shard, None).await.unwrap());
    }
    assert!(
        first.iter().all(|c| c.stock == 0 && c.pending == 0),
        "every figure of one collect says nothing is left: {first:?}"
    );
    assert_eq!(
        shards::sold_out_decision(&first, None),
        SoldOutDecision::CollectAgain
    );
    let mut second = Vec::new();
    for shard in [1, 2] {
        second.push(shards::collect(&mut con, &map, shard, None).await.unwrap());
    }
    let SoldOutDecision::Finish {
        epoch0,
        others_granted,
    } = shards::sold_out_decision(&first, Some(&second))
    else {
        panic!("shards 1 and 2 did not change between the reads");
    };
    // Shard 0's own second read, atomic with the append, refuses.
    let verdict = shards::finish_soldout(&mut con, &map, epoch0, others_granted, None)
        .await
        .unwrap();
    assert_eq!(verdict, shards::FinishSoldOut::Retry);
    let reads = read_all(&mut con, &map).await;
    assert!(
        audit(&map, &reads).finished.is_none(),
        "no Finished while a coupon exists"
    );

    // The coupon is granted, and then the check finishes with all three.
    let who = homed(&map, 0, "late", 1);
    let mut view = StockView::new(3);
    let answers = shards::grab(&mut con, &map, 0, &who, &mut view, None)
        .await
        .unwrap();
    assert!(matches!(answers[0], ShardAnswer::Granted(_)), "{answers:?}");
    let check = shards::check_sold_out(&mut con, &map, &mut view, None)
        .await
        .unwrap();
    assert_eq!(
        check,
        SoldOutCheck::Finished {
            reason: FinishReason::SoldOut,
            total: 3
        }
    );
    let reads = read_all(&mut con, &map).await;
    assert_conserved(&reads, 3);
    assert_eq!(audit(&map, &reads).finished.map(|f| f.1), Some(3));
}

/// Sets every shard's finish time to Redis' clock now, once that clock is
/// past every grant made so far (`last_grant_ms`): as if the window had just
/// ended, without waiting for it.
async fn end_window_now(con: &mut RedisConnection, map: &ShardMap, last_grant_ms: i64) -> i64 {
    let now = eventually(WITHIN, || {
        let mut con = con.clone();
        async move {
            let now = redis_now_ms(&mut con).await;
            (now > last_grant_ms).then_some(now).ok_or(now)
        }
    })
    .await;
    for i in 0..map.shards() {
        set_finish_ms(con, map, i, now).await;
    }
    now
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_with_stock_left_finishes_once_with_the_summed_total_and_grants_nothing_after() {
    let c = cluster(3, 0);
    let mut con = c.connect();
    let coupons = 90;
    let map = sharded(&c, &mut con, "expired", coupons, 3, 600_000, None).await;
    let sold = crowd(&con, &map, arrivals("before", 40, 5), 3, None).await;
    assert!(sold
        .iter()
        .all(|(_, a, _)| matches!(a, ShardAnswer::Granted(_) | ShardAnswer::AlreadyGranted(_))));

    let last_grant_ms = read_all(&mut con, &map)
        .await
        .iter()
        .flat_map(|r| {
            r.events
                .iter()
                .filter_map(|(_, f)| f.get("grantedAtMs")?.parse().ok())
        })
        .max()
        .unwrap_or(0);
    let finish_ms = end_window_now(&mut con, &map, last_grant_ms).await;
    // Customers of every shard arrive after the end, several workers at
    // once: each drives the three-phase finish, one Finished results.
    let after = crowd(&con, &map, arrivals("after", 60, 9), 6, None).await;
    assert!(
        after
            .iter()
            .all(|(_, a, _)| *a == ShardAnswer::Finished(FinishReason::Expired)),
        "{:?}",
        after
            .iter()
            .find(|(_, a, _)| *a != ShardAnswer::Finished(FinishReason::Expired))
    );

    let reads = read_all(&mut con, &map).await;
    let cons = assert_conserved(&reads, coupons);
    assert_eq!(cons.granted, 40, "the 40 before the end, none after");
    assert_eq!(cons.stock, coupons - 40, "stock left");
    let audit = audit(&map, &reads);
    assert_eq!(
        audit.finished.map(|f| (f.0, f.1)),
        Some((FinishReason::Expired, 40))
    );
    for (i, r) in reads.iter().enumerate() {
        assert_eq!(
            r.state.get("phase").map(String::as_str),
            Some("Finished"),
            "shard {i}"
        );
        for (_, f) in &r.events {
            if let Some(at) = f.get("grantedAtMs") {
                assert!(
                    at.parse::<i64>().unwrap() < finish_ms,
                    "grant at/after the finish"
                );
            }
        }
    }
    // A late finish by anyone answers the recorded one.
    let again = shards::finish(&mut con, &map, FinishReason::Deleted, None)
        .await
        .unwrap();
    assert_eq!(
        again,
        shards::Finish::Finished {
            reason: FinishReason::Expired,
            total: 40
        }
    );
}

/// A fresh `shop/<name>` whose shard 1 reaches its end now while shards 0
/// and 2 are `behind_ms` from theirs (as if their clocks were that far
/// behind), and a customer of shard 1 grabbing it: their answer, and the
/// audit of every shard right after.
async fn grab_with_shard_zero_behind(
    c: &RedisCluster,
    con: &mut RedisConnection,
    name: &str,
    behind_ms: i64,
) -> (Vec<ShardAnswer>, Audit, i64) {
    let map = sharded(c, con, name, 90, 3, 600_000, None).await;
    let now = redis_now_ms(con).await;
    set_finish_ms(con, &map, 1, now).await;
    for i in [0, 2] {
        set_finish_ms(con, &map, i, now + behind_ms).await;
    }
    let who = at_home(&map, "late", 1).next().unwrap();
    let mut view = StockView::new(map.shards());
    let answers = shards::grab(con, &map, 1, &[who], &mut view, None)
        .await
        .unwrap();
    let audit = audit(&map, &read_all(con, &map).await);
    (answers, audit, now)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shard_whose_clock_passed_the_end_first_waits_for_shard_zeros_and_answers_the_finish() {
    let c = cluster(3, 0);
    let mut con = c.connect();
    // Shard 0's clock 300 ms behind shard 1's: the grab waits for it and
    // answers the finish, not a retry (Closing).
    let (answers, first, now) = grab_with_shard_zero_behind(&c, &mut con, "skew", 300).await;
    assert_eq!(answers, [ShardAnswer::Finished(FinishReason::Expired)]);
    let (reason, total, at) = first.finished.expect("PromotionFinished appended");
    assert_eq!((reason, total), (FinishReason::Expired, 0));
    assert!(at >= now + 300, "finished at {at}, before shard 0's end");

    // Further behind than FINISH_SKEW_WAIT: the customer is told to retry
    // (Closing, a 503), and nothing finishes early.
    let behind = shards::FINISH_SKEW_WAIT.as_millis() as i64 + 5_000;
    let (answers, far, _) = grab_with_shard_zero_behind(&c, &mut con, "skew-far", behind).await;
    assert_eq!(answers, [ShardAnswer::Closing(FinishReason::Expired)]);
    assert_eq!(far.finished, None, "finished before shard 0's end");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_starts_sold_out_checks_and_deletes_append_one_started_and_one_finished_in_shard_zero(
) {
    let c = cluster(3, 0);
    let mut con = c.connect();
    let p = id("once");
    let coupons = 30;
    let placement = placement::place(&p, 3, &c.placement_slots().expect("slot map")).unwrap();
    let map = shards::plan(&mut con, &p, &placement).await.unwrap();
    // A second planner with other salts: the first plan wins.
    let mut other = placement.clone();
    other.salts = vec![placement.salts[0] + 1, placement.salts[1] + 1];
    assert_eq!(shards::plan(&mut con, &p, &other).await.unwrap(), map);
    let spec = spec_from_now(0.7, coupons, -1000, 601_000);
    // Before every shard is scheduled, nothing can start.
    let early = shards::start(&mut con, &map, None).await;
    assert!(matches!(early, Err(ShardError::Unknown(0))), "{early:?}");
    shards::schedule(&mut con, &map, &spec, None).await.unwrap();
    let starts = futures::future::join_all((0..8).map(|_| {
        let (mut con, map) = (con.clone(), map.clone());
        async move { shards::start(&mut con, &map, None).await.unwrap() }
    }))
    .await;
    assert!(starts
        .iter()
        .all(|s| matches!(s, shards::Start::Started { .. })));
    let answered = crowd(&con, &map, arrivals("first", coupons as usize, 2), 3, None).await;
    assert!(answered.iter().all(|(_, a, _)| a.coupon().is_some()));

    // Sold out by now, not yet known to be: sold-out checks race deletes.
    let race = futures::future::join_all((0..8).map(|i| {
        let (mut con, map) = (con.clone(), map.clone());
        async move {
            if i % 2 == 0 {
                let mut view = StockView::new(map.shards());
                loop {
                    match shards::check_sold_out(&mut con, &map, &mut view, None)
                        .await
                        .unwrap()
                    {
                        SoldOutCheck::Finished { reason, total } => return (reason, total),
                        _ => continue,
                    }
                }
            } else {
                match shards::finish(&mut con, &map, FinishReason::Deleted, None)
                    .await
                    .unwrap()
                {
                    shards::Finish::Finished { reason, total } => (reason, total),
                    other => panic!("{other:?}"),
                }
            }
        }
    }))
    .await;
    let reads = read_all(&mut con, &map).await;
    assert_conserved(&reads, coupons);
    let audit = audit(&map, &reads);
    let (reason, total, _) = audit.finished.expect("finished");
    assert_eq!(total, coupons);
    assert!(
        race.iter().all(|r| *r == (reason, total)),
        "every racer answers the one finish: {race:?}"
    );
    for (i, r) in reads.iter().enumerate().skip(1) {
        assert!(
            r.events.iter().all(|(_, f)| !f.contains_key(EVENT_FIELD)),
            "shard {i} has a lifecycle event"
        );
    }
}

/// Every key of `tag`'s slot on its master with `tag` replaced by `{X}`,
/// with its type and, for hashes, fields (values of fields not naming a time
/// or a seq), and for streams, each entry's field names.
async fn layout(c: &RedisCluster, tag: &str) -> BTreeMap<String, String> {
    let master = c.master_for_slot(key_slot(tag)).unwrap();
    let mut direct = redis::Client::open(format!("redis://{master}/"))
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("*{tag}*"))
        .query_async(&mut direct)
        .await
        .unwrap();
    let mut out = BTreeMap::new();
    for key in keys {
        let kind: String = redis::cmd("TYPE")
            .arg(&key)
            .query_async(&mut direct)
            .await
            .unwrap();
        let described = match kind.as_str() {
            "hash" => {
                let h: BTreeMap<String, String> = redis::cmd("HGETALL")
                    .arg(&key)
                    .query_async(&mut direct)
                    .await
                    .unwrap();
                let fields: Vec<String> = h
                    .into_iter()
                    .map(|(f, v)| {
                        if f.contains("ms")
                            || f.contains("_at")
                            || f.contains("time")
                            || f.starts_with("c-")
                        {
                            f
                        } else {
                            format!("{f}={}", v.replace(&tag[1..tag.len() - 1], "X"))
                        }
                    })
                    .collect();
                format!("hash {fields:?}")
            }
            "stream" => {
                let page: StreamRangeReply = redis::cmd("XRANGE")
                    .arg(&key)
                    .arg("-")
                    .arg("+")
                    .query_async(&mut direct)
                    .await
                    .unwrap();
                let shapes: Vec<Vec<String>> = page
                    .ids
                    .iter()
                    .map(|e| {
                        let mut names: Vec<String> = e.map.keys().cloned().collect();
                        names.sort();
                        names
                    })
                    .collect();
                format!("stream {shapes:?}")
            }
            other => other.to_owned(),
        };
        out.insert(key.replace(tag, "{X}"), described);
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shards_one_writes_exactly_the_unsharded_keys_and_fields() {
    let c = cluster(3, 0);
    let mut con = c.connect();
    let spec = spec_from_now(0.7, 5, -1000, 601_000);
    let who: Vec<CustomerId> = (0..8).map(|i| customer(format!("s1-{i}"))).collect();

    // One promotion through the sharded entry points with S = 1...
    let one = id("s1-sharded-api");
    let placement = placement::place(&one, 1, &c.placement_slots().expect("slot map")).unwrap();
    assert!(placement.salts.is_empty());
    let map = shards::load_map(&mut con, &one).await.unwrap();
    assert!(!map.is_sharded(), "no map key: S = 1");
    shards::schedule(&mut con, &map, &spec, None).await.unwrap();
    let mut view = StockView::new(1);
    let answers = shards::grab(&mut con, &map, 0, &who, &mut view, None)
        .await
        .unwrap();
    assert_eq!(
        answers
            .iter()
            .filter(|a| matches!(a, ShardAnswer::Granted(_)))
            .count(),
        5
    );
    assert_eq!(answers[7], ShardAnswer::SoldOut);

    // ...and one through the unsharded functions.
    let plain = id("s1-plain");
    protocol::schedule(&mut con, &plain, &spec).await.unwrap();
    protocol::grab_batch(&mut con, &plain, &who).await.unwrap();

    let sharded_layout = layout(&c, &one.hash_tag()).await;
    let plain_layout = layout(&c, &plain.hash_tag()).await;
    assert_eq!(sharded_layout, plain_layout);
    let names: Vec<&str> = sharded_layout.keys().map(String::as_str).collect();
    assert_eq!(
        names,
        [
            "seckill:{X}:customers",
            "seckill:{X}:events",
            "seckill:{X}:state"
        ],
        "{sharded_layout:?}"
    );
    let exists: bool = redis::cmd("EXISTS")
        .arg(shard_map_key(&one))
        .query_async(&mut con)
        .await
        .unwrap();
    assert!(!exists);
    assert_eq!(
        PromotionKeys::new(&one).state,
        ShardKeys::new(&one, 0, 0).state
    );
}

async fn info_field(address: &str, field: &str) -> Result<i64, String> {
    let mut con = redis::Client::open(format!("redis://{address}/"))
        .map_err(|e| e.to_string())?
        .get_multiplexed_async_connection()
        .await
        .map_err(|e| e.to_string())?;
    let info: String = redis::cmd("INFO")
        .arg("replication")
        .query_async(&mut con)
        .await
        .map_err(|e| e.to_string())?;
    info.lines()
        .find_map(|l| {
            l.strip_prefix(field)?
                .strip_prefix(':')?
                .trim()
                .parse()
                .ok()
        })
        .ok_or_else(|| format!("{address}: no {field}"))
}

/// Waits until `replica` has processed every write of `master` so far.
async fn replica_caught_up(master: &str, replica: &str) {
    eventually(WITHIN, || async move {
        let at_master = info_field(master, "master_repl_offset").await?;
        let at_replica = info_field(replica, "slave_repl_offset").await?;
        (at_replica >= at_master)
            .then_some(())
            .ok_or(format!("replica at {at_replica}, master at {at_master}"))
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shard_refuses_unsharded_functions_a_stale_map_and_customers_of_another_home() {
    let c = cluster(3, 0);
    let mut con = c.connect();
    let map = sharded(&c, &mut con, "refusals", 30, 3, 600_000, None).await;
    let p = map.id().clone();
    let before = read_all(&mut con, &map).await;

    // The unsharded functions on shard 0's keys (a stale worker, an old
    // operator) touch nothing.
    let grab = protocol::grab(&mut con, &p, &customer("old-worker")).await;
    assert!(grab.is_err(), "{grab:?}");
    let spec = spec_from_now(0.5, 99, -1000, 60_000);
    let schedule = protocol::schedule(&mut con, &p, &spec).await.unwrap();
    assert_eq!(schedule.result, ScheduleResult::Sharded);
    let finish = protocol::finish(&mut con, &p, FinishReason::Deleted)
        .await
        .unwrap();
    assert_eq!(finish.result, ScheduleResult::Sharded);

    // A caller whose map says S = 2 homes customers differently: refused.
    let stale = ShardMap::new(&p, &map.salts()[..1]);
    let who = homed(&stale, 1, "stale", 1);
    let refused = shards::shard_grab(&mut con, &stale, 1, &who, None).await;
    assert!(
        matches!(
            refused,
            Err(ShardError::StaleMap {
                recorded: 3,
                known: 2,
                ..
            })
        ),
        "{refused:?}"
    );
    // A customer of shard 2 is never granted on shard 1.
    let away = homed(&map, 2, "away", 1);
    let refused = shards::shard_grab(&mut con, &map, 1, &away, None).await;
    assert!(
        matches!(refused, Err(ShardError::NotHome { shard: 1, .. })),
        "{refused:?}"
    );

    // Fewer coupons than shards is refused before anything is written.
    let tiny = ShardMap::new(&id("tiny"), &[0, 0]);
    let two_coupons = spec_from_now(0.5, 2, -1000, 60_000);
    let refused = shards::schedule(&mut con, &tiny, &two_coupons, None).await;
    assert!(
        matches!(refused, Err(ShardError::Map { .. })),
        "{refused:?}"
    );
    let tiny_state: bool = redis::cmd("EXISTS")
        .arg(&tiny.keys(0).unwrap().state)
        .query_async(&mut con)
        .await
        .unwrap();
    assert!(!tiny_state);

    let after = read_all(&mut con, &map).await;
    for (i, (a, b)) in before.iter().zip(&after).enumerate() {
        assert_eq!(a.state, b.state, "shard {i}");
        assert_eq!(a.customers, b.customers, "shard {i}");
        assert_eq!(a.events, b.events, "shard {i}");
    }
}

/// The shard of `map` whose master is `master`.
fn shard_on(c: &RedisCluster, map: &ShardMap, master: &str) -> u32 {
    masters_of(c, map)
        .iter()
        .position(|m| m == master)
        .expect("a shard on every master") as u32
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn move_step_lost_in_a_failover_is_never_built_upon() {
    let mut c = cluster(3, 1);
    let mut con = c.connect();
    let durable = Some(ONE_REPLICA);
    let coupons = 60;
    let guarded = sharded(&c, &mut con, "lost-guarded", coupons, 3, 600_000, durable).await;
    let control = sharded(&c, &mut con, "lost-control", coupons, 3, 600_000, None).await;

    // The master of guarded's shard 1 is the donor's master for both.
    let donor_master = masters_of(&c, &guarded)[1].clone();
    let slot = key_slot(&guarded.keys(1).unwrap().state);
    let range = c
        .slot_map()
        .unwrap()
        .into_iter()
        .find(|r| r.master == donor_master)
        .unwrap();
    let (m, r) = (
        c.node_index(&donor_master).unwrap(),
        c.node_index(&range.replicas[0]).unwrap(),
    );
    let g_donor = 1;
    let c_donor = shard_on(&c, &control, &donor_master);
    let (g_to, c_to) = ((g_donor + 1) % 3, (c_donor + 1) % 3);

    // The replica has everything so far; then the donor master's
    // replication is cut: it acknowledges writes no replica has.
    replica_caught_up(&donor_master, &range.replicas[0]).await;
    c.cut_replication(&donor_master, r).unwrap();

    // Without the rule, step 2 builds on a step 1 only the master holds.
    let MoveOut::Moved { pending: lost, .. } =
        shards::move_out(&mut con, &control, c_donor, c_to, 1, None)
            .await
            .unwrap()
    else {
        panic!("control donor has stock");
    };
    let applied = shards::move_in(&mut con, &control, &lost, &[], None)
        .await
        .unwrap();
    assert!(applied.applied);
    // With it, the mover stops after step 1: WAIT fell short.
    let stopped = shards::move_out(&mut con, &guarded, g_donor, g_to, 1, durable).await;
    assert!(
        matches!(stopped, Err(ShardError::NotDurable { acked: 0, .. })),
        "{stopped:?}"
    );

    // kill -9 of the donor's master; its stale replica takes over.
    c.kill(m);
    c.resume(r);
    tokio::task::block_in_place(|| {
        c.wait_for_failover(slot, &donor_master, Duration::from_secs(20))
    })
    .unwrap();
    eventually(WITHIN, || {
        let (mut con, key) = (con.clone(), guarded.keys(g_donor).unwrap().state.clone());
        async move {
            redis::cmd("HGET")
                .arg(key)
                .arg("stock")
                .query_async::<Option<u64>>(&mut con)
                .await
        }
    })
    .await;

    // The control duplicated the moved numbers: in the donor (step 1 lost)
    // and in the recipient (step 2 kept). This is what the rule prevents.
    let control_reads = read_all(&mut con, &control).await;
    let broken = conservation(&control_reads, coupons);
    assert_eq!(
        broken.twice.len() as u64,
        lost.ranges.len(),
        "the control shows the failure the rule prevents: {broken:?}"
    );
    // The guarded promotion lost a step that nothing built upon.
    let reads = read_all(&mut con, &guarded).await;
    let cons = assert_conserved(&reads, coupons);
    assert_eq!(cons.in_flight, 0);
    assert!(reads[g_to as usize].moves_in.is_empty());

    // The killed node rejoins as a replica; recovery finds nothing to
    // build on, and a durable crowd sells the rest exactly.
    tokio::task::block_in_place(|| {
        c.restart(m).unwrap();
        c.wait_until_ready(Duration::from_secs(30)).unwrap();
    });
    let recovered = eventually(WITHIN, || {
        let (mut con, guarded) = (con.clone(), guarded.clone());
        async move { shards::recover(&mut con, &guarded, durable).await }
    })
    .await;
    assert_eq!(recovered, 0);
    let answered = crowd(
        &con,
        &guarded,
        arrivals("after-failover", 150, 11),
        3,
        durable,
    )
    .await;
    let reads = read_all(&mut con, &guarded).await;
    assert_sold_out(&guarded, &reads, coupons, &answered);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_shard_zeros_master_mid_sale_loses_no_answered_grant_and_keeps_every_number_once()
{
    let mut c = cluster(3, 1);
    let mut con = c.connect();
    let durable = Some(ONE_REPLICA);
    let coupons = 3000;
    let map = sharded(&c, &mut con, "kill-mid-sale", coupons, 3, 600_000, durable).await;
    let sale = start_crowd(&con, &map, arrivals("kill", 6000, 13), 6, durable);
    eventually(WITHIN, || {
        let granted = sale.granted();
        async move { (granted >= 1000).then_some(()).ok_or(granted) }
    })
    .await;

    // kill -9 of the master of shard 0 (Started, Finished, a third of the
    // stock) while workers grab and move on every shard.
    let victim = masters_of(&c, &map)[0].clone();
    let slot = key_slot(&map.keys(0).unwrap().state);
    let m = c.node_index(&victim).unwrap();
    c.kill(m);
    let granted_at_kill = sale.granted();
    tokio::task::block_in_place(|| {
        c.wait_for_failover(slot, &victim, Duration::from_secs(20))
            .unwrap();
        // It rejoins as a replica: until then no grant there is confirmed.
        c.restart(m).unwrap();
        c.wait_until_ready(Duration::from_secs(30)).unwrap();
    });
    let answered = sale.answers().await;
    assert!(
        granted_at_kill < coupons as usize,
        "the kill came before the sale's end ({granted_at_kill} granted)"
    );

    let reads = read_all(&mut con, &map).await;
    // Every grant answered (durably) is the coupon its customer holds.
    let (cons, audit, kinds) = assert_sold_out(&map, &reads, coupons, &answered);
    assert_eq!(cons.in_flight, 0);
    eprintln!(
        "kill mid-sale: {granted_at_kill} granted at the kill, {kinds:?}, {} moves",
        audit.moves
    );
}

#[test]
fn placement_follows_the_servers_own_keyslot() {
    // The CRC16 of protocol::placement agrees with CLUSTER KEYSLOT.
    let c = cluster(3, 0);
    let p: PromotionId = id("slots");
    for i in 0..50u32 {
        let key = ShardKeys::new(&p, i % 5, i).state;
        assert_eq!(key_slot(&key), c.keyslot(&key).unwrap(), "{key}");
    }
}
