//! The command worker's grab path over stock shards (issue 14), end to end:
//! real `seckill-worker command` processes on a real 3-master Redis Cluster
//! started by each test, customers over HTTP, a promotion sharded over
//! S = 3 (one shard per master) scheduled and made ready through
//! `protocol::shards` as the operator does (the workers start it: the
//! first grab past its publish time opens it). Every test ends with what
//! every shard holds, read straight from Redis: each number 1..N in exactly
//! one place, every holder on their home shard only, one Started and one
//! Finished in shard 0's stream, and every 200 a grant of some stream.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use seckill_testkit::client::{self, metric_value};
use seckill_testkit::eventually;
use seckill_testkit::promotions::{id, spec_from_now};
use seckill_testkit::redis_cluster::RedisCluster;
use seckill_testkit::shard_audit::{assert_conserved, audit, read_all};
use seckill_testkit::shards::{at_home, host_ms, planned, set_finish_ms};
use seckill_testkit::shuffle::shuffle;
use seckill_testkit::stream::{entries_at as entries, grants_in};
use seckill_testkit::worker::Worker;
use seckill_workers::protocol::placement::{self, key_slot};
use seckill_workers::protocol::shards::{self, ShardMap};
use seckill_workers::protocol::{self, shard_map_key, CustomerId, FinishReason, PromotionId};
use seckill_workers::redis_connection::RedisConnection;

/// Bounds every wait for something that must happen.
const WITHIN: Duration = Duration::from_secs(60);

/// Requests a client has in flight at once, over all workers.
const IN_FLIGHT: usize = 24;

fn cluster() -> RedisCluster {
    cluster_with(0)
}

fn cluster_with(replicas: usize) -> RedisCluster {
    seckill_testkit::redis_cluster::cluster(3, replicas)
}

/// `seckill-worker command` pointed at the cluster, as `cluster.rs` does.
async fn worker(c: &RedisCluster) -> Worker {
    worker_with(c, &[]).await
}

async fn worker_with(c: &RedisCluster, extra: &[&str]) -> Worker {
    let nodes = c.seed_nodes().join(",");
    // A busy 2-core machine: a grab expecting 200 must not get a 503 for
    // being slow (see testkit's CommandOptions).
    let mut args = vec![
        "--redis-cluster-nodes",
        &nodes,
        "--redis-timeout-ms",
        "5000",
    ];
    args.extend(extra);
    Worker::serving("command", &args, Some("warn"), None).await
}

/// `shop/<name>` with `coupons` over 3 shards placed one per master, open
/// since a second ago (not started: the workers start it), as the operator
/// schedules it: plan, schedule every shard, ready.
async fn sharded(
    c: &RedisCluster,
    con: &mut RedisConnection,
    name: &str,
    coupons: u64,
) -> ShardMap {
    sharded_from(c, con, name, coupons, -1000).await
}

async fn sharded_from(
    c: &RedisCluster,
    con: &mut RedisConnection,
    name: &str,
    coupons: u64,
    open_in_ms: i64,
) -> ShardMap {
    sharded_window(c, con, name, coupons, open_in_ms, 600_000).await
}

/// [`sharded`] open from now + `open_in_ms` for `length_ms`.
async fn sharded_window(
    c: &RedisCluster,
    con: &mut RedisConnection,
    name: &str,
    coupons: u64,
    open_in_ms: i64,
    length_ms: i64,
) -> ShardMap {
    let p = id(name);
    let map = planned(c, con, &p, 3).await;
    let spec = spec_from_now(0.7, coupons, open_in_ms, length_ms);
    shards::schedule(con, &map, &spec, None)
        .await
        .expect("schedule");
    let masters: BTreeSet<String> = (0..3)
        .map(|i| {
            c.master_for_slot(key_slot(&map.keys(i).unwrap().state))
                .expect("master of a shard")
        })
        .collect();
    assert_eq!(masters.len(), 3, "one shard per master");
    map
}

/// One customer's final answer (200 or 410) over HTTP.
#[derive(Debug, Clone)]
struct Answer {
    customer: String,
    status: u16,
    /// `error` of an error answer.
    error: String,
    coupon: Option<String>,
    already: bool,
    /// Host ms when it came back.
    at_ms: i64,
}

/// The ports of the workers clients send to; a restarted worker replaces
/// a killed one.
type Ports = Arc<Mutex<Vec<u16>>>;

/// `customer` grabs `shop/<name>` from the worker `pick` names among
/// `ports`, retrying as a client does a 503 or a connection that failed
/// (a worker killed), on the next worker, until a final answer.
/// `unanswered` counts the requests that got no HTTP answer at all.
async fn grab_until_final(
    ports: Ports,
    mut pick: usize,
    name: String,
    customer: String,
    unanswered: &AtomicUsize,
) -> Answer {
    for _ in 0..1000 {
        let port = {
            let p = ports.lock().unwrap();
            p[pick % p.len()]
        };
        match client::grab(port, "shop", &name, &customer).await {
            Ok(r) if r.status == 503 => {}
            Ok(r) => {
                assert!(
                    r.status == 200 || r.status == 410,
                    "{customer}: HTTP {} {}",
                    r.status,
                    r.text
                );
                return Answer {
                    customer,
                    status: r.status,
                    error: r.error().to_owned(),
                    coupon: r.json["couponId"].as_str().map(str::to_owned),
                    already: r.json["alreadyGranted"].as_bool() == Some(true),
                    at_ms: host_ms(),
                };
            }
            Err(_) => {
                unanswered.fetch_add(1, Ordering::SeqCst);
            }
        }
        pick += 1;
        // A client's pause before retrying a 503.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("{customer}: no final answer after 1000 tries");
}

/// `arrivals` (in order; repeats allowed) grab `shop/<name>`, at most
/// [`IN_FLIGHT`] at a time, spread over `ports`, each retrying until final.
fn start_crowd(ports: &Ports, name: &str, arrivals: Vec<String>) -> Crowd {
    let limit = Arc::new(tokio::sync::Semaphore::new(IN_FLIGHT));
    let answered = Arc::new(Mutex::new(Vec::new()));
    let unanswered = Arc::new(AtomicUsize::new(0));
    let tasks = arrivals
        .into_iter()
        .enumerate()
        .map(|(n, customer)| {
            let (ports, limit, answered) = (ports.clone(), limit.clone(), answered.clone());
            let unanswered = unanswered.clone();
            let name = name.to_owned();
            tokio::spawn(async move {
                let _permit = limit
                    .acquire_owned()
                    .await
                    .expect("the semaphore stays open");
                let a = grab_until_final(ports, n, name, customer, &unanswered).await;
                answered.lock().unwrap().push(a);
            })
        })
        .collect();
    Crowd {
        answered,
        unanswered,
        tasks,
    }
}

struct Crowd {
    answered: Arc<Mutex<Vec<Answer>>>,
    /// Requests that got no HTTP answer (their worker died under them).
    unanswered: Arc<AtomicUsize>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Crowd {
    fn granted(&self) -> usize {
        let answered = self.answered.lock().unwrap();
        answered
            .iter()
            .filter(|a| a.status == 200 && !a.already)
            .count()
    }

    async fn answers(self) -> Vec<Answer> {
        for t in self.tasks {
            t.await.expect("a client task");
        }
        let out = self.answered.lock().unwrap().clone();
        out
    }
}

/// The customers `<prefix>-i` for i < n that `keep` keeps, 10% of them
/// arriving twice: half of those right after their first arrival (in quick
/// succession, likely in one batch or on two workers at once), half much
/// later. Deterministic order.
fn arrivals(prefix: &str, n: usize, keep: impl Fn(usize, &str) -> bool) -> Vec<String> {
    let mut all: Vec<String> = (0..n)
        .map(|i| format!("{prefix}-{i}"))
        .enumerate()
        .filter(|(i, c)| keep(*i, c))
        .map(|(_, c)| c)
        .collect();
    // Interleave deterministically so homes and repeats are mixed.
    shuffle(&mut all, 0x9e37_79b9_7f4a_7c15);
    let mut out = Vec::with_capacity(n + n / 10);
    for (i, c) in all.iter().enumerate() {
        out.push(c.clone());
        if i % 20 == 0 {
            out.push(c.clone());
        }
    }
    for (i, c) in all.iter().enumerate() {
        if i % 20 == 10 {
            out.push(c.clone());
        }
    }
    out
}

/// What every shard of a sale holds, checked by testkit's shard audit:
/// conservation number by number (DESIGN-14 §7 row 4: every shard's ranges,
/// every holder's number and the ranges of moves not yet received are
/// exactly 1..N, none twice), every holder on their home shard and in one
/// shard only, each shard's stream granting exactly its holders their
/// numbers, one Started and at most one Finished, in shard 0's stream, the
/// Finished total every stream's grants.
#[derive(Debug)]
struct Sale {
    /// customer -> coupon number: the holders, which the audit found to be
    /// exactly the grants of the streams.
    grants: BTreeMap<String, u64>,
    stock: u64,
    in_flight: u64,
    /// (reason, total, entry id ms) of the one PromotionFinished.
    finished: Option<(FinishReason, u64, i64)>,
}

async fn sale(con: &mut RedisConnection, map: &ShardMap, coupons: u64) -> Sale {
    let reads = read_all(con, map).await;
    let conserved = assert_conserved(&reads, coupons);
    let audit = audit(map, &reads);
    Sale {
        grants: audit.holders,
        stock: conserved.stock,
        in_flight: conserved.in_flight,
        finished: audit.finished,
    }
}

/// [`sale`] once sold out through the workers: every coupon granted, none
/// left or moving, one Finished{SoldOut} of them all; every 200 of
/// `answered` checked by [`check_200s`]. Answers the sale, the time of its
/// Finished and the customers answered granted (not alreadyGranted).
async fn sold_out(
    con: &mut RedisConnection,
    map: &ShardMap,
    coupons: u64,
    answered: &[Answer],
) -> (Sale, i64, BTreeSet<String>) {
    let s = sale(con, map, coupons).await;
    assert_eq!(
        (s.grants.len() as u64, s.stock, s.in_flight),
        (coupons, 0, 0)
    );
    let (reason, total, finished_ms) = s.finished.expect("the sale finished");
    assert_eq!((reason, total), (FinishReason::SoldOut, coupons));
    let granted_now = check_200s(answered, &s.grants);
    (s, finished_ms, granted_now)
}

/// Every 410 of `answered` is sold_out and came back after the
/// PromotionFinished at `finished_ms` (invariant 3: no false sold-out).
fn assert_sold_out_only_after(answered: &[Answer], finished_ms: i64) {
    for a in answered.iter().filter(|a| a.status == 410) {
        assert_eq!(a.error, "sold_out", "{}", a.customer);
        assert!(
            a.at_ms >= finished_ms,
            "{}: 410 before Finished",
            a.customer
        );
    }
}

/// The customers answered 200 (granted or alreadyGranted) at least once.
fn answered_200(answered: &[Answer]) -> BTreeSet<&String> {
    answered
        .iter()
        .filter(|a| a.status == 200)
        .map(|a| &a.customer)
        .collect()
}

/// The number of a coupon id `ns/name#n`.
fn number(coupon: &str) -> u64 {
    coupon.rsplit('#').next().unwrap().parse().unwrap()
}

/// Every 200 in `answered` is the customer's grant in some shard's stream
/// (none that no stream has), a customer is granted at most once, and a
/// repeat is answered the same coupon. Answers the customers granted now.
fn check_200s(answered: &[Answer], grants: &BTreeMap<String, u64>) -> BTreeSet<String> {
    let mut granted_now = BTreeSet::new();
    for a in answered.iter().filter(|a| a.status == 200) {
        let coupon = a.coupon.as_deref().expect("a 200 names its coupon");
        assert_eq!(
            grants.get(&a.customer),
            Some(&number(coupon)),
            "{}'s 200 ({coupon}) is not their grant in a stream",
            a.customer
        );
        if !a.already {
            assert!(
                granted_now.insert(a.customer.clone()),
                "{} answered granted twice",
                a.customer
            );
        }
    }
    granted_now
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crowd_over_http_on_three_shards_grants_exactly_the_stock_once_and_sold_out_only_after_finished(
) {
    let c = cluster();
    let mut con = c.connect();
    let coupons = 90;
    let map = sharded(&c, &mut con, "crowd", coupons).await;
    // An unsharded promotion on the same cluster, through the same workers.
    let plain = id("plain");
    protocol::schedule(&mut con, &plain, &spec_from_now(0.5, 20, -1000, 600_000))
        .await
        .expect("schedule");
    // And a sharded one not open yet.
    sharded_from(&c, &mut con, "later", 30, 600_000).await;
    let (a, b) = (worker(&c).await, worker(&c).await);
    let ports: Ports = Arc::new(Mutex::new(vec![a.port, b.port]));

    let r = a.grab("shop", "later", "early-bird").await;
    assert_eq!((r.status, r.error()), (409, "not_started"), "{}", r.text);
    assert!(
        r.retry_after() >= 500,
        "opens in about ten minutes: {}",
        r.text
    );

    // Few customers live on shard 2: fewer than its 30 coupons, so the
    // sale sells out only if stock moves from it to the others.
    let arriving = arrivals("c", 300, |i, c| home_of(c, &map) != 2 || i % 6 == 0);
    let home_2: BTreeSet<&String> = arriving.iter().filter(|c| home_of(c, &map) == 2).collect();
    assert!(home_2.len() < 30, "{} customers of shard 2", home_2.len());
    let arrived = arriving.len();
    let crowd = start_crowd(&ports, "crowd", arriving);
    let plain_crowd = start_crowd(&ports, "plain", arrivals("p", 60, |_, _| true));
    let answered = crowd.answers().await;
    let plain_answered = plain_crowd.answers().await;

    let (s, finished_ms, granted_now) = sold_out(&mut con, &map, coupons, &answered).await;
    assert_eq!(
        granted_now.len() as u64,
        coupons,
        "exactly N answered granted"
    );
    let numbers: BTreeSet<u64> = s.grants.values().copied().collect();
    assert_eq!(numbers, (1..=coupons).collect(), "every number once");
    // Every customer who arrived twice got one answer per arrival; holders'
    // repeats are their coupon again, nobody else's is a 200.
    assert_eq!(answered.len(), arrived);
    for a in answered.iter().filter(|a| a.status == 410) {
        assert_eq!(a.error, "sold_out", "{a:?}");
        assert!(
            !s.grants.contains_key(&a.customer),
            "a holder answered 410: {a:?} (Finished at {finished_ms}; their answers {:?})",
            answered
                .iter()
                .filter(|b| b.customer == a.customer)
                .collect::<Vec<_>>()
        );
        assert!(
            a.at_ms >= finished_ms,
            "sold_out answered before PromotionFinished{{SoldOut}}: {a:?} < {finished_ms}"
        );
    }
    let per_shard: Vec<usize> = (0..3)
        .map(|i| s.grants.keys().filter(|c| home_of(c, &map) == i).count())
        .collect();
    assert_eq!(per_shard.iter().sum::<usize>(), coupons as usize);
    assert!(per_shard[2] < 30, "stock moved off shard 2: {per_shard:?}");

    // After the sale: each holder (of every shard) asks again on both
    // workers and gets their coupon; a customer who holds none gets 410.
    let holders: Vec<(&String, &u64)> = s.grants.iter().collect();
    for w in [&a, &b] {
        let r = w.grab("shop", "crowd", "latecomer").await;
        assert_eq!((r.status, r.error()), (410, "sold_out"), "{}", r.text);
    }
    // Once a worker holds the holders' set, a non-holder costs it no batch.
    for w in [&a, &b] {
        eventually(WITHIN, || async move {
            let before = metric_value(&w.metrics().await, "seckill_grab_batch_size_count");
            let r = w.grab("shop", "crowd", "latecomer").await;
            let after = metric_value(&w.metrics().await, "seckill_grab_batch_size_count");
            match (r.status, after - before) {
                (410, batches) if batches < 0.5 => Ok(()),
                other => Err(format!("{other:?}")),
            }
        })
        .await;
    }
    for w in [&a, &b] {
        for (who, n) in &holders {
            let r = w.grab("shop", "crowd", who).await;
            assert_eq!(r.status, 200, "{who}: {}", r.text);
            assert_eq!(r.json["alreadyGranted"], true, "{who}: {}", r.text);
            assert_eq!(r.json["couponId"], format!("shop/crowd#{n}"), "{who}");
        }
    }

    // S = 1 on the same cluster, through the same workers, as before: no
    // shard map, coupons 1..20, the stream's grants are the 200s.
    assert!(!key_exists(&mut con, &shard_map_key(&plain)).await);
    let plain_grants = plain_stream_grants(&mut con, &plain).await;
    let plain_now = check_200s(&plain_answered, &plain_grants);
    assert_eq!(plain_now.len(), 20);
    let plain_numbers: BTreeSet<u64> = plain_grants.values().copied().collect();
    assert_eq!(plain_numbers, (1..=20).collect());
    assert!(plain_answered
        .iter()
        .filter(|a| a.status == 410)
        .all(|a| a.error == "sold_out" && !plain_grants.contains_key(&a.customer)));
    eprintln!("crowd: grants per shard {per_shard:?}");
}

fn home_of(customer: &str, map: &ShardMap) -> u32 {
    map.home(&CustomerId::parse(customer).unwrap())
}

async fn key_exists(con: &mut RedisConnection, key: &str) -> bool {
    redis::cmd("EXISTS")
        .arg(key)
        .query_async::<i64>(con)
        .await
        .expect("EXISTS")
        == 1
}

/// customer -> coupon number of an unsharded promotion's stream.
async fn plain_stream_grants(con: &mut RedisConnection, p: &PromotionId) -> BTreeMap<String, u64> {
    let key = protocol::PromotionKeys::new(p).events;
    let mut grants = BTreeMap::new();
    for (_, f) in entries(con, &key).await {
        if f.get("type").map(String::as_str) == Some("CouponGrabbed") {
            for (customer, n, _) in grants_in(p, &f) {
                assert!(grants.insert(customer, n).is_none());
            }
        }
    }
    grants
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_killed_mid_sale_and_restarted_loses_and_duplicates_nothing_once_everyone_retries() {
    let c = cluster();
    let mut con = c.connect();
    let coupons = 120;
    let map = sharded(&c, &mut con, "kill", coupons).await;
    let (mut a, b) = (worker(&c).await, worker(&c).await);
    let ports: Ports = Arc::new(Mutex::new(vec![a.port, b.port]));

    // Skewed homes as in the crowd test, so that stock moves mid-sale.
    let arriving = arrivals("k", 360, |i, c| home_of(c, &map) != 2 || i % 6 == 0);
    let crowd = start_crowd(&ports, "kill", arriving);
    // Mid-sale: some coupons granted, most not.
    let so_far = &crowd;
    eventually(WITHIN, || async move {
        match so_far.granted() {
            n if n >= 20 => Ok(()),
            n => Err(n),
        }
    })
    .await;
    let unanswered_before = crowd.unanswered.load(Ordering::SeqCst);
    a.kill9();
    assert!(
        crowd.granted() < coupons as usize,
        "the kill came before the end of the sale"
    );
    // Clients of the dead worker see their connection fail and retry on
    // the other; a new worker takes the dead one's place.
    let restarted = worker(&c).await;
    ports.lock().unwrap()[0] = restarted.port;
    let unanswered = crowd.unanswered.clone();
    let answered = crowd.answers().await;

    let (s, _, _) = sold_out(&mut con, &map, coupons, &answered).await;
    // Everyone retried until final: every holder was answered their coupon
    // (granted, or alreadyGranted when the grant's answer died with the
    // worker), nobody else a 200.
    let holders: BTreeSet<&String> = s.grants.keys().collect();
    assert_eq!(answered_200(&answered), holders);
    let numbers: BTreeSet<u64> = s.grants.values().copied().collect();
    assert_eq!(numbers.len() as u64, coupons, "no number twice");
    let unanswered = unanswered.load(Ordering::SeqCst) - unanswered_before;
    assert!(unanswered > 0, "the kill left requests unanswered");
    let already = answered.iter().filter(|a| a.already).count();
    eprintln!(
        "kill: {unanswered} requests unanswered by the kill, {already} alreadyGranted answers"
    );
    drop(b);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sharded_promotion_past_its_finish_time_answers_410_finished_once_the_one_finish_is_recorded(
) {
    let c = cluster();
    let mut con = c.connect();
    // Open for about two seconds, far more coupons than grabs.
    let map = sharded_window(&c, &mut con, "brief", 3000, -1000, 3000).await;
    let w = worker(&c).await;
    // Customers keep arriving until the window closes on them.
    let (n, w) = (&AtomicUsize::new(0), &w);
    let over = eventually(WITHIN, || async move {
        let who = format!("late-{}", n.fetch_add(1, Ordering::SeqCst));
        let r = w.grab("shop", "brief", &who).await;
        match r.status {
            410 => Ok((who, r.error().to_owned(), host_ms())),
            status => Err(format!("{who}: {status} {}", r.text)),
        }
    })
    .await;
    let (who, error, at_ms) = over;
    assert_eq!(error, "finished", "{who}");
    let s = sale(&mut con, &map, 3000).await;
    let (reason, total, finished_ms) = s.finished.expect("one PromotionFinished");
    assert_eq!(reason, FinishReason::Expired);
    assert_eq!(total, s.grants.len() as u64);
    assert!(at_ms >= finished_ms, "410 before PromotionFinished");
    assert!(
        !s.grants.is_empty(),
        "customers were granted before the end"
    );
    // Holders of every shard still get their coupon; the stock left stays.
    for (holder, n) in &s.grants {
        let r = w.grab("shop", "brief", holder).await;
        assert_eq!(r.status, 200, "{holder}: {}", r.text);
        assert_eq!(r.json["couponId"], format!("shop/brief#{n}"));
    }
    assert_eq!(s.stock + s.grants.len() as u64, 3000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn durable_workers_on_three_shards_with_replicas_answer_200_only_for_grants_in_the_streams() {
    // 3 masters + 3 replicas; every worker waits for one replica before a
    // 200 and takes every move step only once the step before it is on a
    // replica (DESIGN-14 §3.2).
    let c = cluster_with(1);
    let mut con = c.connect();
    let coupons = 60;
    let map = sharded(&c, &mut con, "durable", coupons).await;
    let durable = ["--durable-replicas", "1", "--durable-timeout-ms", "1000"];
    let (a, b) = (
        worker_with(&c, &durable).await,
        worker_with(&c, &durable).await,
    );
    let ports: Ports = Arc::new(Mutex::new(vec![a.port, b.port]));
    let arriving = arrivals("d", 200, |i, c| home_of(c, &map) != 2 || i % 6 == 0);
    let answered = start_crowd(&ports, "durable", arriving).answers().await;

    let (s, finished_ms, granted_now) = sold_out(&mut con, &map, coupons, &answered).await;
    // A grant whose replica ack came late was answered 503 and its retry
    // alreadyGranted: every holder has one 200 at least, nobody else any.
    assert_eq!(answered_200(&answered), s.grants.keys().collect());
    assert!(granted_now.len() as u64 <= coupons);
    assert_sold_out_only_after(&answered, finished_ms);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn durable_workers_on_a_cluster_with_replicas_sell_an_unsharded_promotion_exactly_with_every_200_in_its_stream(
) {
    // The unsharded durable path on a cluster: each batch's WAIT goes on a
    // connection of its own, routed by the probe key to the promotion's
    // master, while the lane sends its next batch.
    let c = cluster_with(1);
    let mut con = c.connect();
    let coupons = 60;
    let p = id("durable-one");
    protocol::schedule(&mut con, &p, &spec_from_now(0.7, coupons, -1000, 600_000))
        .await
        .expect("schedule");
    let durable = ["--durable-replicas", "1", "--durable-timeout-ms", "1000"];
    let (a, b) = (
        worker_with(&c, &durable).await,
        worker_with(&c, &durable).await,
    );
    let ports: Ports = Arc::new(Mutex::new(vec![a.port, b.port]));
    let answered = start_crowd(&ports, "durable-one", arrivals("u", 200, |_, _| true))
        .answers()
        .await;

    let grants = plain_stream_grants(&mut con, &p).await;
    let numbers: BTreeSet<u64> = grants.values().copied().collect();
    assert_eq!(numbers, (1..=coupons).collect(), "every coupon once");
    // Every 200 is its customer's grant in the stream; every holder, who
    // retried until final, was answered 200; everyone else sold_out.
    check_200s(&answered, &grants);
    assert_eq!(answered_200(&answered), grants.keys().collect());
    for a in answered.iter().filter(|a| a.status != 200) {
        assert_eq!(
            (a.status, a.error.as_str()),
            (410, "sold_out"),
            "{}",
            a.customer
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_holding_the_map_of_before_a_replan_reads_the_new_one_and_sells_exactly_its_stock()
{
    let c = cluster();
    let mut con = c.connect();
    let coupons = 60;
    // Three shards, opening in a minute: the worker reads this map on a
    // first grab and keeps it.
    let old = sharded_from(&c, &mut con, "replan", coupons, 60_000).await;
    let (a, b) = (worker(&c).await, worker(&c).await);
    for w in [&a, &b] {
        let r = w.grab("shop", "replan", "early-bird").await;
        assert_eq!((r.status, r.error()), (409, "not_started"), "{}", r.text);
    }

    // Replanned to two shards before the start, as the operator does when
    // spec.shards changes (then planned and scheduled again), and opened now.
    let p = id("replan");
    let slots = c.placement_slots().expect("slot map");
    let two = placement::place(&p, 2, &slots).expect("placement");
    let replanned = shards::replan(&mut con, &p, Some(&two))
        .await
        .expect("replan");
    assert!(
        matches!(replanned, shards::Replan::Replanned { .. }),
        "{replanned:?}"
    );
    let new = shards::plan(&mut con, &p, &two).await.expect("plan");
    assert_eq!(new.shards(), 2);
    shards::schedule(
        &mut con,
        &new,
        &spec_from_now(0.7, coupons, -1000, 600_000),
        None,
    )
    .await
    .expect("schedule");
    assert!(
        !key_exists(&mut con, &old.keys(2).unwrap().state).await,
        "the dropped shard's keys are gone"
    );

    // Both workers still hold the three-shard map: Redis refuses it
    // (stale_map), they read the new one and sell exactly its stock.
    let ports: Ports = Arc::new(Mutex::new(vec![a.port, b.port]));
    let answered = start_crowd(&ports, "replan", arrivals("r", 150, |_, _| true))
        .answers()
        .await;
    let (s, finished_ms, _) = sold_out(&mut con, &new, coupons, &answered).await;
    for holder in s.grants.keys() {
        let home = home_of(holder, &new);
        assert!(home < 2, "{holder} holds on shard {home}");
    }
    assert_sold_out_only_after(&answered, finished_ms);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shard_past_its_end_while_shard_zeros_clock_stays_behind_answers_503_and_counts_the_skew()
{
    let c = cluster();
    let mut con = c.connect();
    let map = sharded(&c, &mut con, "skewed", 30).await;
    let w = worker(&c).await;
    let of_shard_1 = |prefix: &str| at_home(&map, prefix, 1).next().unwrap().to_string();
    // The workers start the promotion with a first grab.
    let first = w.grab("shop", "skewed", &of_shard_1("first")).await;
    assert_eq!(first.status, 200, "{}", first.text);
    // Shard 1's clock at the end, shard 0's (and 2's) far behind it: more
    // than FINISH_SKEW_WAIT.
    let now = seckill_testkit::promotions::redis_now_ms(&mut con).await;
    set_finish_ms(&mut con, &map, 1, now).await;
    for i in [0, 2] {
        set_finish_ms(&mut con, &map, i, now + 60_000).await;
    }
    let late = w.grab("shop", "skewed", &of_shard_1("late")).await;
    assert_eq!(
        (late.status, late.error()),
        (503, "unavailable"),
        "{}",
        late.text
    );
    assert_eq!(
        metric_value(&w.metrics().await, "seckill_grab_finish_clock_skew_total"),
        1.0
    );
    assert_eq!(sale(&mut con, &map, 30).await.finished, None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_given_a_longer_finish_skew_wait_answers_the_finish_where_the_default_answers_503()
{
    let c = cluster();
    let mut con = c.connect();
    let map = sharded(&c, &mut con, "skew-flag", 30).await;
    let default = worker(&c).await;
    let patient = worker_with(&c, &["--finish-skew-wait-ms", "10000"]).await;
    let of_shard_1 = |prefix: &str| at_home(&map, prefix, 1).next().unwrap().to_string();
    let first = default
        .grab("shop", "skew-flag", &of_shard_1("first"))
        .await;
    assert_eq!(first.status, 200, "{}", first.text);
    // Shard 1's clock at the end; shard 0's (and 2's) 2.5 s behind it: more
    // than the default wait (FINISH_SKEW_WAIT), less than the patient
    // worker's 10 s.
    let skew_ms = 2_500;
    assert!(skew_ms > shards::FINISH_SKEW_WAIT.as_millis() as i64);
    let now = seckill_testkit::promotions::redis_now_ms(&mut con).await;
    set_finish_ms(&mut con, &map, 1, now).await;
    for i in [0, 2] {
        set_finish_ms(&mut con, &map, i, now + skew_ms).await;
    }

    let hurried = default
        .grab("shop", "skew-flag", &of_shard_1("hurried"))
        .await;
    assert_eq!(
        (hurried.status, hurried.error()),
        (503, "unavailable"),
        "{}",
        hurried.text
    );
    assert_eq!(sale(&mut con, &map, 30).await.finished, None);

    let waited = patient
        .grab("shop", "skew-flag", &of_shard_1("waited"))
        .await;
    assert_eq!(
        (waited.status, waited.error()),
        (410, "finished"),
        "{}",
        waited.text
    );
    let s = sale(&mut con, &map, 30).await;
    let (reason, total, finished_ms) = s.finished.expect("the patient grab recorded the finish");
    assert_eq!((reason, total), (FinishReason::Expired, 1));
    assert!(finished_ms >= now + skew_ms, "Finished on shard 0's clock");
    assert_eq!(
        metric_value(
            &patient.metrics().await,
            "seckill_grab_finish_clock_skew_total"
        ),
        0.0
    );
    assert_eq!(
        metric_value(
            &default.metrics().await,
            "seckill_grab_finish_clock_skew_total"
        ),
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_counts_and_times_the_stock_moves_its_grabs_complete() {
    let c = cluster();
    let mut con = c.connect();
    let map = sharded(&c, &mut con, "moves-metric", 30).await;
    let w = worker(&c).await;
    // 25 customers at home on shard 1, which holds 10 of the 30 coupons:
    // the 11th onwards are served by moving stock to shard 1.
    let at_home_on_1: Vec<String> = at_home(&map, "m", 1)
        .take(25)
        .map(|c| c.to_string())
        .collect();
    let text = w.metrics().await;
    assert_eq!(metric_value(&text, "seckill_grab_stock_moves_total"), 0.0);
    for customer in &at_home_on_1 {
        let r = w.grab("shop", "moves-metric", customer).await;
        assert_eq!(r.status, 200, "{customer}: {}", r.text);
    }
    let moves_in: usize = read_all(&mut con, &map)
        .await
        .iter()
        .map(|s| s.moves_in.len())
        .sum();
    assert!(moves_in >= 1, "shard 1 ran dry: stock moved to it");
    let text = w.metrics().await;
    assert_eq!(
        metric_value(&text, "seckill_grab_stock_moves_total"),
        moves_in as f64,
        "every completed move counted once"
    );
    let timed = metric_value(
        &text,
        "seckill_grab_stock_move_batch_duration_seconds_count",
    );
    assert!(
        timed >= 1.0 && timed <= moves_in as f64,
        "{timed} batches timed for {moves_in} moves"
    );
    assert_eq!(sale(&mut con, &map, 30).await.grants.len(), 25);
}
