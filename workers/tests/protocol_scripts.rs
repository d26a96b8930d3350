//! Every branch of every protocol script, against a real redis-server.

use std::collections::{HashMap, HashSet};

use chrono::{DateTime, TimeZone, Utc};
use redis::AsyncCommands;
use seckill_testkit::concurrent::{count, finish_at_once, schedule_at_once};
use seckill_testkit::promotions::{customer, id, move_window, redis_now_ms, spec_from_now};
use seckill_testkit::redis::{connect, redis as server, RedisServer};
use seckill_testkit::stream::{events_of as events, types};
use seckill_workers::protocol::{
    self, CustomerId, Event, FinishReason, GrabOutcome, Phase, PromotionId, PromotionKeys,
    PromotionSpec, ScheduleResult, Snapshot,
};
use seckill_workers::redis_connection::RedisConnection;

/// A spec whose window is [now + open_in, now + open_in + length).
fn spec(coupons: u64, open_in_ms: i64, length_ms: i64) -> PromotionSpec {
    spec_from_now(0.8, coupons, open_in_ms, length_ms)
}

/// A private redis-server, a connection to it, and `shop/<name>`
/// scheduled with `spec` (so started when its window is open).
async fn scheduled(name: &str, spec: PromotionSpec) -> (RedisServer, RedisConnection, PromotionId) {
    let s = server();
    let mut con = connect(&s);
    let p = id(name);
    protocol::schedule(&mut con, &p, &spec).await.unwrap();
    (s, con, p)
}

/// `protocol::grab`'s outcome for `customer`.
async fn grab(con: &mut RedisConnection, p: &PromotionId, customer: &CustomerId) -> GrabOutcome {
    protocol::grab(con, p, customer).await.unwrap()
}

/// `protocol::finish`'s snapshot.
async fn finish(con: &mut RedisConnection, p: &PromotionId, reason: FinishReason) -> Snapshot {
    protocol::finish(con, p, reason).await.unwrap()
}

#[tokio::test]
async fn schedule_registers_then_is_unchanged_then_updates_before_start() {
    let s = server();
    let mut con = connect(&s);
    let p = id("later");
    let first = spec(10, 60_000, 60_000);
    let snap = protocol::schedule(&mut con, &p, &first).await.unwrap();
    assert_eq!(snap.result, ScheduleResult::Scheduled);
    assert_eq!(snap.phase, Some(Phase::Pending));
    assert!(!snap.started);
    assert_eq!(snap.remaining(), 10);

    let again = protocol::schedule(&mut con, &p, &first).await.unwrap();
    assert_eq!(again.result, ScheduleResult::Unchanged);

    let changed = PromotionSpec {
        number_of_coupons: 20,
        ..first
    };
    let updated = protocol::schedule(&mut con, &p, &changed).await.unwrap();
    assert_eq!(updated.result, ScheduleResult::Updated);
    assert_eq!(updated.number_of_coupons, Some(20));
    assert!(
        events(&mut con, &p).await.is_empty(),
        "no event before the start"
    );
}

#[tokio::test]
async fn schedule_starts_when_due_and_locks_a_changed_spec_after_start() {
    let s = server();
    let mut con = connect(&s);
    let p = id("now");
    let running = spec(5, -1_000, 60_000);
    let snap = protocol::schedule(&mut con, &p, &running).await.unwrap();
    assert_eq!(snap.result, ScheduleResult::Started);
    assert_eq!(snap.phase, Some(Phase::Active));
    assert!(snap.started_at.is_some());

    let changed = PromotionSpec {
        number_of_coupons: 500,
        ..running.clone()
    };
    let locked = protocol::schedule(&mut con, &p, &changed).await.unwrap();
    assert_eq!(locked.result, ScheduleResult::Locked);
    assert_eq!(locked.number_of_coupons, Some(5), "running spec untouched");

    let same = protocol::schedule(&mut con, &p, &running).await.unwrap();
    assert_eq!(same.result, ScheduleResult::Unchanged);
    let evs = events(&mut con, &p).await;
    assert_eq!(types(&evs), ["PromotionStarted"]);
    match &evs[0] {
        Event::PromotionStarted(e) => {
            assert_eq!(e.promotion, "shop/now");
            assert_eq!(e.number_of_coupons, 5);
            assert!((e.discount - 0.8).abs() < 1e-12);
            assert_eq!(
                e.publish_time.timestamp_millis(),
                running.publish_time.timestamp_millis()
            );
            assert_eq!(
                e.finish_time.timestamp_millis(),
                running.finish_time.timestamp_millis()
            );
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn promotion_started_is_appended_once_under_concurrent_schedules() {
    let s = server();
    let mut con = connect(&s);
    let p = id("concurrent-start");
    let results = schedule_at_once(&con, &p, &spec(5, -10, 60_000), 50).await;
    assert_eq!(
        count(&results, ScheduleResult::Started),
        1,
        "exactly one call reports the start: {results:?}"
    );
    assert_eq!(types(&events(&mut con, &p).await), ["PromotionStarted"]);
}

#[tokio::test]
async fn grab_answers_unknown_and_not_started_without_writing() {
    let s = server();
    let mut con = connect(&s);
    let p = id("soon");
    assert_eq!(
        grab(&mut con, &p, &customer(1)).await,
        GrabOutcome::UnknownPromotion
    );
    let registered = spec(3, 30_000, 60_000);
    protocol::schedule(&mut con, &p, &registered).await.unwrap();
    // Redis' clock reads between `before` and `after` when the script runs.
    let before = redis_now_ms(&mut con).await;
    let outcome = grab(&mut con, &p, &customer(1)).await;
    let after = redis_now_ms(&mut con).await;
    match outcome {
        GrabOutcome::NotStarted {
            opens_in_ms,
            publish_time,
        } => {
            let publish_ms = registered.publish_time.timestamp_millis();
            assert!(
                (publish_ms - after..=publish_ms - before).contains(&(opens_in_ms as i64)),
                "{opens_in_ms} not in [{}, {}]",
                publish_ms - after,
                publish_ms - before
            );
            assert!(publish_time.ends_with('Z'));
        }
        other => panic!("{other:?}"),
    }
    assert!(events(&mut con, &p).await.is_empty());
}

#[tokio::test]
async fn grab_opens_exactly_at_publish_time_even_without_the_operator_start() {
    let s = server();
    let mut con = connect(&s);
    let p = id("lazy-start");
    // Registered before its publish time; nobody calls schedule again.
    let registered = spec(3, 3_600_000, 60_000);
    protocol::schedule(&mut con, &p, &registered).await.unwrap();
    assert!(matches!(
        grab(&mut con, &p, &customer(1)).await,
        GrabOutcome::NotStarted { .. }
    ));
    // The publish time arrives (by Redis' clock, which the script reads):
    // a minute ahead it is still closed, at the very millisecond it opens.
    let now = redis_now_ms(&mut con).await;
    move_window(&mut con, &p, now + 60_000, now + 120_000).await;
    assert!(matches!(
        grab(&mut con, &p, &customer(1)).await,
        GrabOutcome::NotStarted { .. }
    ));
    let now = redis_now_ms(&mut con).await;
    move_window(&mut con, &p, now, now + 60_000).await;
    let granted = grab(&mut con, &p, &customer(1)).await;
    assert!(
        matches!(
            granted,
            GrabOutcome::Granted {
                sold_out: false,
                ..
            }
        ),
        "{granted:?}"
    );
    assert_eq!(
        types(&events(&mut con, &p).await),
        ["PromotionStarted", "CouponGrabbed"],
        "Started precedes the first grab"
    );
    // The late operator start appends nothing more.
    let snap = protocol::schedule(&mut con, &p, &registered).await;
    assert!(snap.is_ok());
    assert_eq!(
        types(&events(&mut con, &p).await),
        ["PromotionStarted", "CouponGrabbed"]
    );
}

#[tokio::test]
async fn grab_grants_once_per_customer_and_retries_get_the_same_coupon() {
    let (_server, mut con, p) = scheduled("dedupe", spec(3, -1, 60_000)).await;
    let before = redis_now_ms(&mut con).await;
    let outcome = grab(&mut con, &p, &customer("a")).await;
    let after = redis_now_ms(&mut con).await;
    let first = match outcome {
        GrabOutcome::Granted { coupon, sold_out } => {
            assert!(!sold_out);
            coupon
        }
        other => panic!("{other:?}"),
    };
    assert_eq!(first.coupon_id, "shop/dedupe#1");
    assert_eq!(first.customer_id, "c-a");
    assert_eq!(first.promotion, "shop/dedupe");
    let granted_at: DateTime<Utc> = first.granted_at.parse().expect("RFC 3339 grantedAt");
    assert!(
        (before..=after).contains(&granted_at.timestamp_millis()),
        "grantedAt {granted_at} is Redis' clock when the script ran"
    );
    for _ in 0..3 {
        assert_eq!(
            grab(&mut con, &p, &customer("a")).await,
            GrabOutcome::AlreadyGranted {
                coupon: first.clone()
            }
        );
    }
    let evs = events(&mut con, &p).await;
    assert_eq!(types(&evs), ["PromotionStarted", "CouponGrabbed"]);
    match &evs[1] {
        Event::CouponGrabbed(g) => {
            assert_eq!(g.coupon_id, first.coupon_id);
            assert_eq!(g.customer_id, "c-a");
            assert_eq!(g.granted_at, granted_at);
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn the_last_coupon_sells_out_once_and_later_grabs_are_refused() {
    let (_server, mut con, p) = scheduled("two", spec(2, -1, 60_000)).await;
    assert!(matches!(
        grab(&mut con, &p, &customer(1)).await,
        GrabOutcome::Granted {
            sold_out: false,
            ..
        }
    ));
    assert!(matches!(
        grab(&mut con, &p, &customer(2)).await,
        GrabOutcome::Granted { sold_out: true, .. }
    ));
    for n in 3..6 {
        assert_eq!(grab(&mut con, &p, &customer(n)).await, GrabOutcome::SoldOut);
    }
    // A winner retrying after the sell-out still gets their coupon.
    assert!(matches!(
        grab(&mut con, &p, &customer(2)).await,
        GrabOutcome::AlreadyGranted { .. }
    ));
    // Finishing afterwards changes nothing.
    let snap = finish(&mut con, &p, FinishReason::Expired).await;
    assert_eq!(snap.result, ScheduleResult::AlreadyFinished);
    assert_eq!(snap.finish_reason, Some(FinishReason::SoldOut));
    let evs = events(&mut con, &p).await;
    assert_eq!(
        types(&evs),
        [
            "PromotionStarted",
            "CouponGrabbed",
            "CouponGrabbed",
            "PromotionFinished"
        ]
    );
    match evs.last() {
        Some(Event::PromotionFinished(f)) => {
            assert_eq!(f.reason, FinishReason::SoldOut);
            assert_eq!(f.granted, 2);
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn grab_after_the_finish_time_expires_the_promotion_once() {
    let (_server, mut con, p) = scheduled("short", spec(5, -1, 3_600_000)).await;
    assert!(matches!(
        grab(&mut con, &p, &customer(1)).await,
        GrabOutcome::Granted { .. }
    ));
    // The finish time arrives (by Redis' clock): at that very millisecond
    // the promotion is over.
    let now = redis_now_ms(&mut con).await;
    move_window(&mut con, &p, now - 60_000, now).await;
    for n in 2..5 {
        assert_eq!(
            grab(&mut con, &p, &customer(n)).await,
            GrabOutcome::Finished {
                reason: FinishReason::Expired
            }
        );
    }
    let snap = finish(&mut con, &p, FinishReason::Expired).await;
    assert_eq!(snap.result, ScheduleResult::AlreadyFinished);
    let evs = events(&mut con, &p).await;
    assert_eq!(
        types(&evs),
        ["PromotionStarted", "CouponGrabbed", "PromotionFinished"]
    );
}

#[tokio::test]
async fn finish_expired_is_refused_before_the_finish_time_by_redis_clock() {
    let (_server, mut con, p) = scheduled("not-due", spec(5, -1, 60_000)).await;
    let snap = finish(&mut con, &p, FinishReason::Expired).await;
    assert_eq!(snap.result, ScheduleResult::NotDue);
    assert_eq!(snap.phase, Some(Phase::Active));
    assert_eq!(types(&events(&mut con, &p).await), ["PromotionStarted"]);
}

#[tokio::test]
async fn finish_appends_finished_once_under_concurrent_calls() {
    let (_server, mut c, p) = scheduled("concurrent-finish", spec(5, -1, 60_000)).await;
    let results = finish_at_once(&c, &p, FinishReason::Deleted, 50).await;
    assert_eq!(count(&results, ScheduleResult::Finished), 1, "{results:?}");
    assert_eq!(
        count(&results, ScheduleResult::AlreadyFinished),
        49,
        "{results:?}"
    );
    let evs = events(&mut c, &p).await;
    assert_eq!(types(&evs), ["PromotionStarted", "PromotionFinished"]);
    assert_eq!(
        grab(&mut c, &p, &customer(1)).await,
        GrabOutcome::Finished {
            reason: FinishReason::Deleted
        }
    );
}

#[tokio::test]
async fn finish_of_a_window_that_passed_unstarted_starts_then_finishes() {
    // Registered with a window already in the past (operator was down
    // throughout). Register without starting: schedule would start it, so
    // register a future window first, then move the window into the past.
    let (_server, mut con, p) = scheduled("missed", spec(5, 60_000, 1_000)).await;
    let now = redis_now_ms(&mut con).await;
    move_window(&mut con, &p, now - 10_000, now - 5_000).await;
    let snap = finish(&mut con, &p, FinishReason::Expired).await;
    assert_eq!(snap.result, ScheduleResult::Finished);
    assert_eq!(snap.finish_reason, Some(FinishReason::Expired));
    assert_eq!(
        types(&events(&mut con, &p).await),
        ["PromotionStarted", "PromotionFinished"]
    );
}

#[tokio::test]
async fn deleting_before_the_publish_time_finishes_without_a_start() {
    let (_server, mut con, p) = scheduled("cancelled", spec(5, 60_000, 60_000)).await;
    let snap = finish(&mut con, &p, FinishReason::Deleted).await;
    assert_eq!(snap.result, ScheduleResult::Finished);
    assert!(!snap.started);
    assert_eq!(types(&events(&mut con, &p).await), ["PromotionFinished"]);
    // A later schedule of the same spec neither restarts nor reopens it.
    let again = protocol::schedule(&mut con, &p, &spec(5, -1, 60_000))
        .await
        .unwrap();
    assert_eq!(again.phase, Some(Phase::Finished));
    assert_eq!(types(&events(&mut con, &p).await), ["PromotionFinished"]);
}

#[tokio::test]
async fn finish_and_snapshot_of_an_unknown_promotion_write_nothing() {
    let s = server();
    let mut con = connect(&s);
    let p = id("ghost");
    let snap = finish(&mut con, &p, FinishReason::Deleted).await;
    assert_eq!(snap.result, ScheduleResult::Unknown);
    assert!(!snap.exists);
    let snap = protocol::snapshot(&mut con, &p).await.unwrap();
    assert!(!snap.exists);
    let n: u64 = con.exists(PromotionKeys::new(&p).events).await.unwrap();
    assert_eq!(n, 0);
}

#[tokio::test]
async fn snapshot_reports_state_and_redis_clock() {
    let (_server, mut con, p) = scheduled("snap", spec(4, -1, 60_000)).await;
    grab(&mut con, &p, &customer(1)).await;
    let before = redis_now_ms(&mut con).await;
    let snap = protocol::snapshot(&mut con, &p).await.unwrap();
    let after = redis_now_ms(&mut con).await;
    assert_eq!(snap.result, ScheduleResult::Snapshot);
    assert_eq!(snap.granted, 1);
    assert_eq!(snap.remaining(), 3);
    assert!(
        (before..=after).contains(&snap.now),
        "{} not in [{before}, {after}]",
        snap.now
    );
}

#[tokio::test]
async fn lua_timestamps_match_chrono_rfc3339_across_centuries() {
    let s = server();
    let mut con = connect(&s);
    // The library's shared helpers without its shebang line, as a script.
    let head = include_str!("../src/protocol/functions/library_head.lua");
    let helpers = head.split_once('\n').map(|(_, rest)| rest).unwrap_or(head);
    let probe = redis::Script::new(&format!("{helpers}\nreturn rfc3339(tonumber(ARGV[1]))"));
    let mut ms: i64 = 0;
    let mut samples = vec![0, 951_782_400_000, 1_709_164_800_999, 4_107_542_399_999];
    for _ in 0..300 {
        ms = (ms
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407))
        .abs()
            % 4_102_444_800_000;
        samples.push(ms);
    }
    for ms in samples {
        let lua: String = probe.arg(ms).invoke_async(&mut con).await.unwrap();
        let expected = Utc
            .timestamp_millis_opt(ms)
            .unwrap()
            .to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
        assert_eq!(lua, expected, "{ms}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn race_of_5000_customers_for_1000_coupons_grants_exactly_1000() {
    let s = server();
    let p = id("race");
    let mut admin = connect(&s);
    protocol::schedule(&mut admin, &p, &spec(1_000, -1, 600_000))
        .await
        .unwrap();
    // Many tasks over several independent connections; each customer asks
    // once and a third of them retry.
    let connections: Vec<RedisConnection> = (0..8).map(|_| connect(&s)).collect();
    let mut tasks = Vec::new();
    for t in 0..64usize {
        let mut con = connections[t % connections.len()].clone();
        let p = p.clone();
        tasks.push(tokio::spawn(async move {
            let mut seen = Vec::new();
            for n in (t..5_000).step_by(64) {
                let attempts = if n % 3 == 0 { 2 } else { 1 };
                for _ in 0..attempts {
                    let c = customer(n);
                    seen.push((c.clone(), protocol::grab(&mut con, &p, &c).await.unwrap()));
                }
            }
            seen
        }));
    }
    let mut granted: HashMap<String, String> = HashMap::new();
    let mut refused = 0;
    for t in tasks {
        for (c, outcome) in t.await.unwrap() {
            match outcome {
                GrabOutcome::Granted { coupon, .. } => {
                    assert!(
                        granted.insert(c.to_string(), coupon.coupon_id).is_none(),
                        "{c} twice"
                    );
                }
                GrabOutcome::AlreadyGranted { coupon } => {
                    assert_eq!(granted.get(c.as_str()), Some(&coupon.coupon_id));
                }
                GrabOutcome::SoldOut => refused += 1,
                other => panic!("{other:?}"),
            }
        }
    }
    assert_eq!(granted.len(), 1_000);
    assert!(refused >= 4_000);
    let evs = events(&mut admin, &p).await;
    assert_eq!(evs.len(), 1_002);
    assert_eq!(types(&evs[..1]), ["PromotionStarted"]);
    assert_eq!(types(&evs[1_001..]), ["PromotionFinished"]);
    let mut customers = HashSet::new();
    let mut coupons = HashSet::new();
    for e in &evs[1..1_001] {
        match e {
            Event::CouponGrabbed(g) => {
                assert!(
                    customers.insert(g.customer_id.clone()),
                    "{} twice in stream",
                    g.customer_id
                );
                assert!(coupons.insert(g.coupon_id.clone()));
                assert_eq!(granted.get(&g.customer_id), Some(&g.coupon_id));
            }
            other => panic!("expected CouponGrabbed, got {other:?}"),
        }
    }
    match &evs[1_001] {
        Event::PromotionFinished(f) => {
            assert_eq!(f.reason, FinishReason::SoldOut);
            assert_eq!(f.granted, 1_000);
        }
        other => panic!("{other:?}"),
    }
}
