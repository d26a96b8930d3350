//! seckill on a real Redis Cluster: keys are slot-aligned, the grab race and
//! the operator's start/finish stay exact across masters, and grants answered
//! by the durable grab survive the kill -9 of the master holding them.
//!
//! `SECKILL_CLUSTER_FAILOVER_ROUNDS=N` (used by `make faults`) repeats the
//! failover during a sale N times, restarting the killed node each round.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use redis::AsyncCommands;
use seckill_testkit::concurrent::{count, finish_at_once, schedule_at_once};
use seckill_testkit::promotions::{customer, id, spec_from_now};
use seckill_testkit::redis_cluster::{cluster, RedisCluster};
use seckill_testkit::stream::{answered_not_in_stream, events_of};
use seckill_testkit::{client, eventually, Worker};
use seckill_workers::protocol::{
    self, read_model, replication_probe_key, CustomerId, Durability, DurableGrabError, Event,
    FinishReason, GrabOutcome, PromotionId, PromotionKeys, PromotionSpec, ScheduleResult, PROJECT,
};
use seckill_workers::redis_connection::{RedisArgs, RedisConnection};

/// Bounds every wait for something that must happen.
const WITHIN: Duration = Duration::from_secs(60);

fn connect(c: &RedisCluster) -> RedisConnection {
    let con = RedisArgs::for_cluster(c.seed_nodes())
        .connect()
        .expect("cluster connection");
    assert!(con.is_cluster());
    con
}

/// A promotion open since a second ago for `length_ms` more.
fn open_spec(coupons: u64, length_ms: i64) -> PromotionSpec {
    spec_from_now(0.7, coupons, -1000, length_ms + 1000)
}

/// Schedules `shop/<name>` with `coupons`, open for the next two minutes.
async fn open(con: &mut RedisConnection, name: &str, coupons: u64) -> PromotionId {
    let p = id(name);
    protocol::schedule(con, &p, &open_spec(coupons, 120_000))
        .await
        .unwrap();
    p
}

/// `per_master` promotions `<prefix>-<n>` on each of the three masters of
/// `c`, by master address.
fn on_every_master(
    c: &RedisCluster,
    prefix: &str,
    per_master: usize,
) -> BTreeMap<String, Vec<PromotionId>> {
    let mut by_master: BTreeMap<String, Vec<PromotionId>> = BTreeMap::new();
    for i in 0.. {
        let p = id(&format!("{prefix}-{i}"));
        let m = c.master_for_key(&PromotionKeys::new(&p).state).unwrap();
        let list = by_master.entry(m).or_default();
        if list.len() < per_master {
            list.push(p);
        }
        if by_master.len() == 3 && by_master.values().all(|l| l.len() >= per_master) {
            break;
        }
    }
    by_master
}

async fn events(con: &mut RedisConnection, id: &PromotionId) -> Vec<Event> {
    events_of(con, id).await
}

/// Checks the stream of a sold-out promotion: Started, `coupons` grabs by
/// distinct customers with distinct coupon ids, Finished{SoldOut}, in that
/// order. Returns customer -> coupon id.
fn assert_sold_out_stream(events: &[Event], coupons: usize) -> BTreeMap<String, String> {
    assert_eq!(events.len(), coupons + 2, "Started + grabs + Finished");
    assert!(matches!(events[0], Event::PromotionStarted(_)));
    let Event::PromotionFinished(f) = &events[coupons + 1] else {
        panic!("last event is not PromotionFinished: {:?}", events.last());
    };
    assert_eq!(f.reason, FinishReason::SoldOut);
    assert_eq!(f.granted, coupons as u64);
    let mut grants = BTreeMap::new();
    let mut coupon_ids = HashSet::new();
    for e in &events[1..=coupons] {
        let Event::CouponGrabbed(g) = e else {
            panic!("expected CouponGrabbed, got {e:?}");
        };
        assert!(coupon_ids.insert(g.coupon_id.clone()), "coupon id twice");
        assert!(
            grants
                .insert(g.customer_id.clone(), g.coupon_id.clone())
                .is_none(),
            "customer {} granted twice",
            g.customer_id
        );
    }
    grants
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_key_of_a_promotion_and_of_a_customer_hashes_to_one_slot_and_no_script_crosses_slots()
{
    let c = cluster(3, 0);
    let mut con = connect(&c);
    let names = [
        "sale",
        "a",
        "black-friday.2025",
        "x.y.z",
        &["n".repeat(63), "m".repeat(63), "o".repeat(63)].join("."),
        "0-9",
    ];
    let mut ids: Vec<PromotionId> = names.iter().map(|n| id(n)).collect();
    for i in 0..200 {
        ids.push(PromotionId::new(&format!("ns-{}", i % 7), &format!("promo-{i}")).unwrap());
    }
    let mut slots_seen = BTreeSet::new();
    for p in &ids {
        let k = PromotionKeys::new(p);
        let slot = c.keyslot(&k.state).unwrap();
        for key in [
            &k.customers,
            &k.events,
            &replication_probe_key(p),
            &read_model::promotion(p),
        ] {
            assert_eq!(c.keyslot(key).unwrap(), slot, "{key} vs {}", k.state);
        }
        slots_seen.insert(slot);
    }
    assert!(slots_seen.len() > 150, "promotions spread over slots");
    for n in 0..200 {
        let cust = customer(format!("{n}-x"));
        let key = read_model::customer_coupons(&cust);
        let tag = format!("{{{}}}", read_model::coupon_bucket(&cust));
        assert_eq!(c.keyslot(&key).unwrap(), c.keyslot(&tag).unwrap(), "{key}");
    }

    // Every script, through the cluster connection, on promotions of every
    // master: none answers CROSSSLOT (or anything but its normal result).
    let masters: BTreeSet<String> = ids[..30]
        .iter()
        .map(|p| c.master_for_key(&PromotionKeys::new(p).state).unwrap())
        .collect();
    assert_eq!(masters.len(), 3, "the first 30 promotions span all masters");
    for (i, p) in ids[..30].iter().enumerate() {
        let snap = protocol::schedule(&mut con, p, &open_spec(2, 60_000))
            .await
            .unwrap();
        assert_eq!(snap.result, ScheduleResult::Started, "{p}");
        assert!(protocol::snapshot(&mut con, p).await.unwrap().started);
        let g = protocol::grab(&mut con, p, &customer(i)).await.unwrap();
        assert!(matches!(g, GrabOutcome::Granted { .. }), "{p}: {g:?}");
        // No replicas here: the durable grab must refuse to answer the grant.
        let d =
            protocol::grab_durable(&mut con, p, &customer("durable"), one_replica_within(20)).await;
        assert!(
            matches!(
                d,
                Err(DurableGrabError::NotReplicated {
                    acked: 0,
                    outcome: GrabOutcome::Granted { .. },
                    ..
                })
            ),
            "{p}: {d:?}"
        );
        let f = protocol::finish(&mut con, p, FinishReason::Deleted)
            .await
            .unwrap();
        // Both coupons went: the promotion sold out before the delete.
        assert_eq!(f.result, ScheduleResult::AlreadyFinished, "{p}");
        let phase: String = PROJECT
            .key(read_model::promotion(p))
            .arg("PromotionStarted")
            .arg(p.to_string())
            .arg("0.7")
            .arg("2")
            .arg("2025-01-01T00:00:00.000Z")
            .arg("2025-01-02T00:00:00.000Z")
            .arg("2025-01-01T00:00:00.000Z")
            .invoke_async(&mut con)
            .await
            .unwrap();
        assert_eq!(phase, "Active");
        assert_eq!(events(&mut con, p).await.len(), 4, "{p}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grab_race_on_three_masters_grants_exactly_the_stock_once_per_customer() {
    let c = cluster(3, 0);
    let con = connect(&c);
    let p = id("race");
    protocol::schedule(&mut con.clone(), &p, &open_spec(300, 120_000))
        .await
        .unwrap();
    // 1,500 distinct customers, each trying twice, in shuffled order.
    let attempts: Vec<usize> = (0..3000).map(|i| (i * 7919) % 1500).collect();
    let attempts = Arc::new(attempts);
    let next = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..64 {
        let (mut con, p, attempts, next) = (con.clone(), p.clone(), attempts.clone(), next.clone());
        tasks.push(tokio::spawn(async move {
            let mut granted = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(&n) = attempts.get(i) else {
                    return granted;
                };
                match protocol::grab(&mut con, &p, &customer(n)).await.unwrap() {
                    GrabOutcome::Granted { coupon, .. } => granted.push(coupon),
                    GrabOutcome::AlreadyGranted { .. } | GrabOutcome::SoldOut => {}
                    other => panic!("unexpected {other:?}"),
                }
            }
        }));
    }
    let mut granted = Vec::new();
    for t in tasks {
        granted.extend(t.await.unwrap());
    }
    assert_eq!(granted.len(), 300, "exactly the stock is granted");
    let answered: BTreeMap<String, String> = granted
        .iter()
        .map(|g| (g.customer_id.clone(), g.coupon_id.clone()))
        .collect();
    assert_eq!(answered.len(), 300, "no customer granted twice");
    let mut con = con;
    let stream = assert_sold_out_stream(&events(&mut con, &p).await, 300);
    assert_eq!(
        stream, answered,
        "the stream holds exactly the answered grants"
    );
    let held: usize = con.hlen(PromotionKeys::new(&p).customers).await.unwrap();
    assert_eq!(held, 300);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_start_and_finish_happen_once_under_concurrent_calls_on_a_cluster() {
    let c = cluster(3, 0);
    let mut con = connect(&c);
    let p = id("once");
    let started = schedule_at_once(&con, &p, &open_spec(5, 120_000), 32).await;
    assert!(
        started.iter().all(|r| matches!(
            r,
            ScheduleResult::Started | ScheduleResult::Unchanged | ScheduleResult::Scheduled
        )),
        "{started:?}"
    );
    assert_eq!(
        count(&started, ScheduleResult::Started),
        1,
        "exactly one schedule call started it"
    );
    let finished = finish_at_once(&con, &p, FinishReason::Deleted, 32).await;
    assert_eq!(
        count(&finished, ScheduleResult::Finished),
        1,
        "exactly one finish call finished it: {finished:?}"
    );
    assert_eq!(
        count(&finished, ScheduleResult::AlreadyFinished),
        31,
        "{finished:?}"
    );
    let ev = events(&mut con, &p).await;
    assert_eq!(ev.len(), 2, "{ev:?}");
    assert!(matches!(ev[0], Event::PromotionStarted(_)));
    assert!(
        matches!(&ev[1], Event::PromotionFinished(f) if f.reason == FinishReason::Deleted && f.granted == 0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flash_sale_of_twenty_promotions_on_all_masters_grants_exactly_each_stock() {
    let c = cluster(3, 0);
    let con = connect(&c);
    // Pick names round-robin over the masters, so the sale spans all three.
    let by_master = on_every_master(&c, "flash", 7);
    assert_eq!(by_master.len(), 3, "promotions on all three masters");
    let promos: Vec<PromotionId> = by_master.values().flatten().take(20).cloned().collect();
    assert_eq!(promos.len(), 20);
    let placed: BTreeSet<String> = promos
        .iter()
        .map(|p| c.master_for_key(&PromotionKeys::new(p).events).unwrap())
        .collect();
    assert_eq!(
        placed.len(),
        3,
        "the twenty promotions use all three masters"
    );

    let stock = |i: usize| 20 + i as u64;
    for (i, p) in promos.iter().enumerate() {
        protocol::schedule(&mut con.clone(), p, &open_spec(stock(i), 120_000))
            .await
            .unwrap();
    }
    // 150 customers per promotion, some trying twice, all promotions at once.
    let pairs: Vec<(usize, usize)> = (0..2)
        .flat_map(|_| (0..20).flat_map(|pi| (0..150).map(move |n| (pi, n))))
        .collect();
    let attempts: Vec<(usize, usize)> = (0..pairs.len())
        .map(|i| pairs[(i * 7919) % pairs.len()])
        .collect();
    let attempts = Arc::new(attempts);
    let promos = Arc::new(promos);
    let next = Arc::new(AtomicUsize::new(0));
    let granted = Arc::new(Mutex::new(HashMap::<usize, BTreeMap<String, String>>::new()));
    let mut tasks = Vec::new();
    for _ in 0..64 {
        let (mut con, promos, attempts, next, granted) = (
            con.clone(),
            promos.clone(),
            attempts.clone(),
            next.clone(),
            granted.clone(),
        );
        tasks.push(tokio::spawn(async move {
            while let Some(&(pi, n)) = attempts.get(next.fetch_add(1, Ordering::Relaxed)) {
                let outcome = protocol::grab(&mut con, &promos[pi], &customer(n))
                    .await
                    .unwrap();
                match outcome {
                    GrabOutcome::Granted { coupon, .. } => {
                        let mut g = granted.lock().unwrap();
                        let prior = g
                            .entry(pi)
                            .or_default()
                            .insert(coupon.customer_id, coupon.coupon_id);
                        assert!(prior.is_none(), "customer granted twice");
                    }
                    GrabOutcome::AlreadyGranted { .. } | GrabOutcome::SoldOut => {}
                    other => panic!("unexpected {other:?}"),
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let granted = granted.lock().unwrap().clone();
    let mut con = con;
    for (i, p) in promos.iter().enumerate() {
        let answered = granted.get(&i).cloned().unwrap_or_default();
        assert_eq!(answered.len() as u64, stock(i), "{p}: exact grants");
        let stream = assert_sold_out_stream(&events(&mut con, p).await, stock(i) as usize);
        assert_eq!(stream, answered, "{p}: stream = answered grants");
    }
}

/// The master of `p`'s slot and its one replica, as node indexes.
fn master_and_replica(c: &RedisCluster, p: &PromotionId) -> (u16, String, usize, usize) {
    let slot = c.keyslot(&PromotionKeys::new(p).state).unwrap();
    let range = c
        .slot_map()
        .unwrap()
        .into_iter()
        .find(|r| r.start <= slot && slot <= r.end)
        .unwrap();
    assert_eq!(range.replicas.len(), 1, "one replica per master: {range:?}");
    (
        slot,
        range.master.clone(),
        c.node_index(&range.master).unwrap(),
        c.node_index(&range.replicas[0]).unwrap(),
    )
}

/// One replica's ack, waited for at most `timeout_ms`.
fn one_replica_within(timeout_ms: u64) -> Durability {
    Durability {
        replicas: 1,
        timeout: Duration::from_millis(timeout_ms),
    }
}

/// The durability the failover tests ask for: time enough for a live
/// replica's ack.
fn durability() -> Durability {
    one_replica_within(300)
}

/// Durable grab through a failover: retries unknown outcomes (Redis errors)
/// until an answer; returns grants, refusals and `NotReplicated`.
async fn grab_with_retries(
    con: &RedisConnection,
    p: &PromotionId,
    who: &CustomerId,
) -> Result<GrabOutcome, DurableGrabError> {
    eventually(WITHIN, || {
        let mut con = con.clone();
        async move {
            match protocol::grab_durable(&mut con, p, who, durability()).await {
                Err(DurableGrabError::Script(e)) => Err(e),
                answered => Ok(answered),
            }
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn durable_grab_never_answers_a_grant_its_replica_lacks_while_plain_grab_loses_one() {
    let mut c = cluster(3, 1);
    let mut con = connect(&c);
    let p = open(&mut con, "durable", 10).await;
    let (slot, master, m, r) = master_and_replica(&c, &p);

    // Confirmed by the healthy replica: retried, as a client retries a 503,
    // while the replica's acknowledgement is slower than the WAIT timeout.
    let kept = eventually(WITHIN, || {
        let (mut con, p) = (con.clone(), &p);
        async move {
            match protocol::grab_durable(&mut con, p, &customer(0), durability()).await? {
                GrabOutcome::Granted { coupon, .. } | GrabOutcome::AlreadyGranted { coupon } => {
                    Ok::<_, DurableGrabError>(coupon)
                }
                other => panic!("{other:?}"),
            }
        }
    })
    .await;

    // Cut replication: stop the replica and drop its link, so the master
    // keeps accepting writes that no replica has.
    c.cut_replication(&master, r).unwrap();

    // The plain grab answers a grant only the master holds...
    let plain = protocol::grab(&mut con, &p, &customer(1)).await.unwrap();
    assert!(matches!(plain, GrabOutcome::Granted { .. }), "{plain:?}");
    // ...the durable grab refuses to answer one, and also refuses to confirm
    // an earlier grant it cannot prove replicated.
    let durable = protocol::grab_durable(&mut con, &p, &customer(2), durability()).await;
    assert!(
        matches!(
            durable,
            Err(DurableGrabError::NotReplicated {
                acked: 0,
                wanted: 1,
                outcome: GrabOutcome::Granted { .. },
                ..
            })
        ),
        "{durable:?}"
    );
    let again = protocol::grab_durable(&mut con, &p, &customer(1), durability()).await;
    assert!(
        matches!(
            again,
            Err(DurableGrabError::NotReplicated {
                outcome: GrabOutcome::AlreadyGranted { .. },
                ..
            })
        ),
        "{again:?}"
    );

    // Fail over: kill -9 the master, let the stale replica take over.
    c.kill(m);
    c.resume(r);
    let new_master =
        tokio::task::block_in_place(|| c.wait_for_failover(slot, &master, Duration::from_secs(20)))
            .unwrap();
    assert_eq!(c.node_index(&new_master), Some(r));

    eventually(WITHIN, || {
        let (mut con, stream) = (con.clone(), PromotionKeys::new(&p).events);
        async move {
            con.xrange_all::<_, redis::streams::StreamRangeReply>(stream)
                .await
                .map(drop)
        }
    })
    .await;
    let ev = events(&mut con, &p).await;
    let in_stream: BTreeMap<String, String> = ev
        .iter()
        .filter_map(|e| match e {
            Event::CouponGrabbed(g) => Some((g.customer_id.clone(), g.coupon_id.clone())),
            _ => None,
        })
        .collect();
    // The durably answered grant survived; the plainly answered one is gone
    // (asynchronous replication), which is why the durable grab exists.
    assert_eq!(in_stream.get("c-0"), Some(&kept.coupon_id), "{ev:?}");
    assert!(!in_stream.contains_key("c-1"), "{ev:?}");
    assert!(!in_stream.contains_key("c-2"), "{ev:?}");

    // Its only replica gone, the new master cannot confirm a grant: the
    // durable grab grants but answers "not replicated" (503, retry).
    let alone = grab_with_retries(&con, &p, &customer(2)).await;
    let Err(DurableGrabError::NotReplicated {
        outcome: GrabOutcome::Granted { coupon, .. },
        acked: 0,
        ..
    }) = alone
    else {
        panic!("{alone:?}");
    };
    // The killed node rejoins as a replica (its AOF still has c-1's grant;
    // the full resync from the new master drops it); the retry is confirmed.
    tokio::task::block_in_place(|| {
        c.restart(m).unwrap();
        c.wait_until_ready(Duration::from_secs(30)).unwrap();
    });
    // A retry answered "not replicated" (503) while the replica's link
    // comes back is retried, as a client would.
    let retry = eventually(WITHIN, || {
        let (mut con, p) = (con.clone(), &p);
        async move { protocol::grab_durable(&mut con, p, &customer(2), durability()).await }
    })
    .await;
    assert_eq!(
        retry,
        GrabOutcome::AlreadyGranted {
            coupon: coupon.clone()
        }
    );
    let ev = events(&mut con, &p).await;
    let grabbed: Vec<&str> = ev
        .iter()
        .filter_map(|e| match e {
            Event::CouponGrabbed(g) => Some(g.customer_id.as_str()),
            _ => None,
        })
        .collect();
    assert_eq!(grabbed, ["c-0", "c-2"], "{ev:?}");
}

fn failover_rounds() -> usize {
    std::env::var("SECKILL_CLUSTER_FAILOVER_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_the_promotion_master_mid_sale_loses_no_answered_grant_and_oversells_nothing() {
    let mut c = cluster(3, 1);
    let con = connect(&c);
    let p = id("failover");
    let rounds = failover_rounds();
    let coupons = 300 * rounds as u64 + 200;
    protocol::schedule(&mut con.clone(), &p, &open_spec(coupons, 600_000))
        .await
        .unwrap();

    let next = Arc::new(AtomicUsize::new(0));
    let answered = Arc::new(Mutex::new(BTreeMap::<String, String>::new()));
    let unknown = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..16 {
        let (mut con, p, next, answered, unknown) = (
            con.clone(),
            p.clone(),
            next.clone(),
            answered.clone(),
            unknown.clone(),
        );
        tasks.push(tokio::spawn(async move {
            loop {
                // Every customer tries twice in a row: the second is a retry.
                let n = next.fetch_add(1, Ordering::Relaxed) / 2;
                match protocol::grab_durable(&mut con, &p, &customer(n), durability()).await {
                    Ok(GrabOutcome::Granted { coupon, .. })
                    | Ok(GrabOutcome::AlreadyGranted { coupon }) => {
                        let mut a = answered.lock().unwrap();
                        if let Some(prior) =
                            a.insert(coupon.customer_id.clone(), coupon.coupon_id.clone())
                        {
                            // Answering the same customer twice is fine only
                            // with the same coupon.
                            assert_eq!(
                                prior, coupon.coupon_id,
                                "customer {n} answered two coupons"
                            );
                        }
                    }
                    Ok(GrabOutcome::SoldOut) => return,
                    Ok(other) => panic!("unexpected {other:?}"),
                    Err(_) => {
                        unknown.fetch_add(1, Ordering::Relaxed);
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                }
            }
        }));
    }

    let wait_answers = |at_least: usize| {
        let answered = answered.clone();
        eventually(WITHIN, move || {
            let have = answered.lock().unwrap().len();
            async move {
                (have >= at_least)
                    .then_some(())
                    .ok_or(format!("grants stalled at {have}, below {at_least}"))
            }
        })
    };
    for round in 0..rounds {
        let before = answered.lock().unwrap().len();
        wait_answers(before + 100).await;
        let (slot, master, m, _) = master_and_replica(&c, &p);
        c.kill(m);
        let killed_at = answered.lock().unwrap().len();
        let new_master = tokio::task::block_in_place(|| {
            c.wait_for_failover(slot, &master, Duration::from_secs(20))
        })
        .unwrap_or_else(|e| panic!("round {round}: {e}"));
        assert_ne!(new_master, master);
        // The killed node rejoins as a replica of the new master (until then
        // no grant can be confirmed), and the sale goes on.
        tokio::task::block_in_place(|| {
            c.restart(m).unwrap();
            c.wait_until_ready(Duration::from_secs(30)).unwrap();
        });
        wait_answers(killed_at + 100).await;
    }
    // The sale runs on to its end.
    for t in tasks {
        tokio::time::timeout(WITHIN, t)
            .await
            .expect("the sale sells out")
            .unwrap();
    }

    let mut con = con;
    let ev = events(&mut con, &p).await;
    assert!(matches!(ev[0], Event::PromotionStarted(_)));
    assert_eq!(
        ev.iter()
            .filter(|e| matches!(e, Event::PromotionStarted(_)))
            .count(),
        1
    );
    // Exactly the stock, once per customer, then SoldOut: no oversell even
    // though grants unanswered at the kill were lost and granted again.
    let in_stream = assert_sold_out_stream(&ev, coupons as usize);
    let answered = answered.lock().unwrap().clone();
    let lost = answered_not_in_stream(&answered, &in_stream);
    assert!(
        lost.is_empty(),
        "{} answered grants missing from the stream: {:?}",
        lost.len(),
        lost.iter().take(5).collect::<Vec<_>>()
    );
    let snap = protocol::snapshot(&mut con, &p).await.unwrap();
    assert_eq!(
        snap.granted,
        in_stream.len() as u64,
        "state agrees with stream"
    );
    let held: usize = con.hlen(PromotionKeys::new(&p).customers).await.unwrap();
    assert_eq!(held, in_stream.len(), "customers hash agrees with stream");
    eprintln!(
        "failover: {} answered grants, {} in stream, {} unknown (retryable) answers",
        answered.len(),
        in_stream.len(),
        unknown.load(Ordering::Relaxed)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grabs_follow_a_promotion_whose_slot_moves_to_another_master_mid_sale() {
    let c = cluster(3, 0);
    let mut con = connect(&c);
    let p = open(&mut con, "moving", 60).await;
    let slot = c.keyslot(&PromotionKeys::new(&p).state).unwrap();
    let mut answered = BTreeMap::new();
    for n in 0..30 {
        let GrabOutcome::Granted { coupon, .. } =
            protocol::grab(&mut con, &p, &customer(n)).await.unwrap()
        else {
            panic!("grant {n}");
        };
        answered.insert(coupon.customer_id, coupon.coupon_id);
    }
    let from = c.master_for_slot(slot).unwrap();
    let to = c
        .slot_map()
        .unwrap()
        .into_iter()
        .map(|r| r.master)
        .find(|m| *m != from)
        .unwrap();
    tokio::task::block_in_place(|| c.move_slot(slot, &to)).unwrap();
    assert_eq!(c.master_for_slot(slot).unwrap(), to);
    // The same connection, whose slot map still says `from`: MOVED is followed.
    for n in 30..80 {
        match protocol::grab(&mut con, &p, &customer(n)).await.unwrap() {
            GrabOutcome::Granted { coupon, .. } => {
                answered.insert(coupon.customer_id, coupon.coupon_id);
            }
            GrabOutcome::SoldOut => {}
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(answered.len(), 60);
    let stream = assert_sold_out_stream(&events(&mut con, &p).await, 60);
    assert_eq!(stream, answered);
    // The durable grab (a pipeline) is routed to the new owner too.
    let d = protocol::grab_durable(&mut con, &p, &customer(0), one_replica_within(10)).await;
    assert!(
        matches!(
            d,
            Err(DurableGrabError::NotReplicated {
                outcome: GrabOutcome::AlreadyGranted { .. },
                ..
            })
        ),
        "{d:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seckill_worker_command_on_a_cluster_answers_200_exactly_for_the_stock() {
    let c = cluster(3, 0);
    let mut con = connect(&c);
    let p = open(&mut con, "http", 40).await;
    let nodes = c.seed_nodes().join(",");
    let worker = Worker::serving(
        "command",
        &["--redis-cluster-nodes", &nodes],
        Some("warn"),
        None,
    )
    .await;
    let mut tasks = Vec::new();
    for n in 0..100 {
        let port = worker.port;
        tasks.push(tokio::spawn(async move {
            let who = format!("c-{n}");
            let reply = client::grab(port, "shop", "http", &who).await.unwrap();
            (who, reply.status)
        }));
    }
    let mut ok = BTreeSet::new();
    for t in tasks {
        let (who, status) = t.await.unwrap();
        match status {
            200 => {
                ok.insert(who);
            }
            409 | 410 => {}
            other => panic!("{who}: HTTP {other}"),
        }
    }
    assert_eq!(ok.len(), 40, "exactly the stock answered 200");
    let stream = assert_sold_out_stream(&events(&mut con, &p).await, 40);
    assert_eq!(stream.keys().cloned().collect::<BTreeSet<_>>(), ok);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_on_promotions_of_every_master_at_once_grant_exactly_each_stock() {
    let c = cluster(3, 0);
    let con = connect(&c);
    // Two promotions per master; the library is on no master yet: the first
    // call on each finds no function and loads it on every master.
    let promos: Vec<PromotionId> = on_every_master(&c, "batch", 2)
        .into_values()
        .flatten()
        .collect();
    for p in &promos {
        protocol::schedule(&mut con.clone(), p, &open_spec(50, 120_000))
            .await
            .unwrap();
    }
    // Per promotion, 8 batches of 16 customers (87 distinct, many coming
    // back in a later batch), every promotion's batches at once.
    let calls = promos.iter().flat_map(|p| {
        (0..8).map(move |b| {
            let batch: Vec<CustomerId> = (0..16).map(|i| customer((b * 11 + i * 3) % 90)).collect();
            (p.clone(), batch)
        })
    });
    let answers = futures::future::join_all(calls.map(|(p, batch)| {
        let mut con = con.clone();
        async move {
            let out = protocol::grab_batch(&mut con, &p, &batch).await.unwrap();
            (p, batch, out)
        }
    }))
    .await;
    let mut granted: HashMap<PromotionId, BTreeMap<String, String>> = HashMap::new();
    for (p, batch, out) in answers {
        assert_eq!(batch.len(), out.len());
        for (who, outcome) in batch.iter().zip(out) {
            match outcome {
                GrabOutcome::Granted { coupon, .. } => {
                    let prior = granted
                        .entry(p.clone())
                        .or_default()
                        .insert(who.as_str().to_owned(), coupon.coupon_id);
                    assert!(prior.is_none(), "{who} granted twice in {p}");
                }
                GrabOutcome::AlreadyGranted { .. } | GrabOutcome::SoldOut => {}
                other => panic!("unexpected {other:?}"),
            }
        }
    }
    let mut con = con;
    for p in &promos {
        let answered = granted.remove(p).unwrap_or_default();
        assert_eq!(answered.len(), 50, "{p}: exactly the stock");
        let stream = assert_sold_out_stream(&events(&mut con, p).await, 50);
        assert_eq!(stream, answered, "{p}: stream = answered grants");
    }
}
