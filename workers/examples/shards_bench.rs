//! Stock shards (issue 14) on a three-master Redis Cluster started here, in
//! one run on this machine: Redis CPU per granted grab with S = 3 beside
//! S = 1 at the same per-call batch, the same three shards placed on one
//! master (the control that isolates the protocol's own cost from three
//! redis-servers time-sharing the machine's cores), stock moves per 1,000
//! grabs and their estimated share of Redis CPU in sales where customers
//! arrive uniformly at random, how evenly grants and Redis CPU spread over
//! the masters, and the per-core grant rate of the capacity model
//! (docs/SHARDING.md).
//!
//! Each sale: `protocol::shards` plan, schedule, ready, start, then `TASKS`
//! concurrent tasks act as command workers: each takes the next
//! `BATCH × S` arrivals, splits them by home shard and serves each home's
//! group with `protocol::shards::grab` (grab at home, refill by stock
//! moves, sold out by the double collect), so every call carries customers
//! of one home shard, `BATCH` of them on average, as group commit keyed by
//! (promotion, shard) sends them. Once a task has seen the promotion sold
//! out, the remaining arrivals are answered from memory, as a worker does.
//! Redis CPU is read from every master before and after each sale: INFO
//! cpu (main thread, user + sys) and INFO commandstats (FCALL usec).
//!
//! `cargo run --release -p seckill-workers --example shards_bench [-- REPS PER_SHARD SMALL TASKS]`
//! (defaults: 5 repetitions, 20,000 coupons per shard, a small sale of
//! 1,000 coupons, 16 tasks). Loopback only.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::future::join_all;

use chrono::{TimeZone, Utc};
use redis::aio::{ConnectionLike, MultiplexedConnection};
use redis::{Cmd, Pipeline, RedisFuture, Value};
use seckill_testkit::redis_cluster::{RedisCluster, RedisClusterOptions};
use seckill_testkit::shuffle::shuffle;
use seckill_workers::protocol::placement::{self, home_shard, key_slot, SlotMap};
use seckill_workers::protocol::shards::{self, MoveOut, ShardAnswer, ShardMap, StockView};
use seckill_workers::protocol::{CustomerId, PromotionId, PromotionSpec};
use seckill_workers::redis_connection::{RedisArgs, RedisConnection};

/// A cluster connection that counts the FCALLs sent through it by function
/// name: how many moves, collects and finishes a sale took.
#[derive(Clone)]
struct Counted {
    inner: RedisConnection,
    calls: Arc<Mutex<HashMap<String, u64>>>,
}

impl Counted {
    fn count(&self, cmd: &Cmd) {
        let mut args = cmd.args_iter();
        let is_fcall =
            matches!(args.next(), Some(redis::Arg::Simple(a)) if a.eq_ignore_ascii_case(b"FCALL"));
        if !is_fcall {
            return;
        }
        if let Some(redis::Arg::Simple(name)) = args.next() {
            let name = String::from_utf8_lossy(name).into_owned();
            *self.calls.lock().unwrap().entry(name).or_default() += 1;
        }
    }

    fn take(&self) -> HashMap<String, u64> {
        std::mem::take(&mut *self.calls.lock().unwrap())
    }
}

impl ConnectionLike for Counted {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        self.count(cmd);
        self.inner.req_packed_command(cmd)
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        for cmd in pipeline.cmd_iter() {
            self.count(cmd);
        }
        self.inner.req_packed_commands(pipeline, offset, count)
    }

    fn get_db(&self) -> i64 {
        self.inner.get_db()
    }
}

/// One master: its address and a direct connection for INFO.
struct Master {
    address: String,
    con: MultiplexedConnection,
}

/// What one master had spent so far.
#[derive(Clone, Copy, Default, Debug)]
struct Spent {
    /// Main thread CPU, user + sys, µs.
    cpu_us: f64,
    /// INFO commandstats: FCALL usec and calls.
    fcall_us: f64,
    fcall_calls: f64,
}

fn info_field(info: &str, name: &str) -> f64 {
    info.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}

fn cmdstat(info: &str, command: &str, field: &str) -> f64 {
    let prefix = format!("cmdstat_{command}:");
    info.lines()
        .find_map(|l| l.strip_prefix(prefix.as_str()))
        .and_then(|rest| {
            rest.split(',')
                .find_map(|kv| kv.strip_prefix(field)?.strip_prefix('='))
                .and_then(|v| v.trim().parse().ok())
        })
        .unwrap_or(0.0)
}

async fn spent(m: &mut Master) -> Spent {
    let info: String = redis::cmd("INFO")
        .arg("cpu")
        .arg("commandstats")
        .query_async(&mut m.con)
        .await
        .expect("INFO");
    Spent {
        cpu_us: (info_field(&info, "used_cpu_user_main_thread")
            + info_field(&info, "used_cpu_sys_main_thread"))
            * 1e6,
        fcall_us: cmdstat(&info, "fcall", "usec"),
        fcall_calls: cmdstat(&info, "fcall", "calls"),
    }
}

/// Runs `call` and answers its result with the FCALL usec it cost on
/// `master` (the master's commandstats before and after).
async fn fcall_cost<T>(
    master: &mut Master,
    call: impl std::future::Future<Output = T>,
) -> (T, f64) {
    let (out, spent) = cost(master, call).await;
    (out, spent.fcall_us)
}

/// Runs `call` and answers its result with what `master` spent meanwhile.
async fn cost<T>(master: &mut Master, call: impl std::future::Future<Output = T>) -> (T, Spent) {
    let before = spent(master).await;
    let out = call.await;
    let after = spent(master).await;
    (out, delta(&[after], &[before])[0])
}

async fn spent_all(masters: &mut [Master]) -> Vec<Spent> {
    let mut out = Vec::new();
    for m in masters.iter_mut() {
        out.push(spent(m).await);
    }
    out
}

fn delta(after: &[Spent], before: &[Spent]) -> Vec<Spent> {
    after
        .iter()
        .zip(before)
        .map(|(a, b)| Spent {
            cpu_us: a.cpu_us - b.cpu_us,
            fcall_us: a.fcall_us - b.fcall_us,
            fcall_calls: a.fcall_calls - b.fcall_calls,
        })
        .collect()
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Layout {
    /// S = 1: the unsharded promotion.
    Unsharded,
    /// S = 3, one shard per master (placement as the operator makes it).
    Spread,
    /// S = 3, every shard on shard 0's master (the control).
    OneMaster,
    /// Three unsharded promotions, one on each master, sold at once: the
    /// unsharded figure with all three masters busy, as they are with S = 3
    /// spread (same time-sharing of the machine's cores).
    ThreeUnsharded,
}

impl Layout {
    fn name(self) -> &'static str {
        match self {
            Layout::Unsharded => "S=1",
            Layout::Spread => "S=3 on 3 masters",
            Layout::OneMaster => "S=3 on 1 master",
            Layout::ThreeUnsharded => "3 x S=1, 3 masters",
        }
    }
}

/// Numbers the promotions so every sale starts on fresh ones.
static SALE: AtomicU64 = AtomicU64::new(0);

/// The started promotions of a sale of `coupons` laid out as `layout`: one,
/// or for [`Layout::ThreeUnsharded`] three of `coupons / 3`, each on its own
/// master.
async fn promotions(
    c: &RedisCluster,
    con: &mut Counted,
    layout: Layout,
    coupons: u64,
) -> Vec<ShardMap> {
    if layout != Layout::ThreeUnsharded {
        return vec![promotion(c, con, layout, coupons).await];
    }
    let mut used = Vec::new();
    let mut maps = Vec::new();
    while maps.len() < 3 {
        let id = next_id();
        let master = c
            .master_for_slot(key_slot(&id.hash_tag()))
            .expect("master of a promotion");
        if used.contains(&master) {
            continue;
        }
        used.push(master);
        maps.push(start(con, &id, Layout::Unsharded, coupons / 3, c).await);
    }
    maps
}

/// A fresh promotion id (every sale starts on new keys).
fn next_id() -> PromotionId {
    let n = SALE.fetch_add(1, Ordering::Relaxed);
    PromotionId::new("bench", &format!("shards-{n}")).expect("promotion id")
}

/// A started promotion of `coupons` laid out as `layout`.
async fn promotion(c: &RedisCluster, con: &mut Counted, layout: Layout, coupons: u64) -> ShardMap {
    start(con, &next_id(), layout, coupons, c).await
}

/// `id` planned (as `layout` says), scheduled and started.
async fn start(
    con: &mut Counted,
    id: &PromotionId,
    layout: Layout,
    coupons: u64,
    c: &RedisCluster,
) -> ShardMap {
    let id = id.clone();
    let now = Utc::now().timestamp_millis();
    let spec = PromotionSpec {
        discount: 0.5,
        number_of_coupons: coupons,
        publish_time: Utc.timestamp_millis_opt(now - 1000).unwrap(),
        finish_time: Utc.timestamp_millis_opt(now + 3_600_000).unwrap(),
    };
    let map = match layout {
        Layout::Unsharded | Layout::ThreeUnsharded => ShardMap::unsharded(&id),
        Layout::Spread | Layout::OneMaster => {
            let mut slots = c.slot_map().expect("slot map");
            if layout == Layout::OneMaster {
                let home = c
                    .master_for_slot(key_slot(&id.hash_tag()))
                    .expect("master of shard 0");
                slots.retain(|r| r.master == home);
            }
            let slots = SlotMap::new(slots.into_iter().map(|r| (r.start, r.end, r.master)));
            let placement = placement::place(&id, 3, &slots).expect("placement");
            shards::plan(con, &id, &placement).await.expect("plan")
        }
    };
    shards::schedule(con, &map, &spec, None)
        .await
        .expect("schedule");
    if map.is_sharded() {
        let started = shards::start(con, &map, None).await.expect("start");
        assert!(
            matches!(started, shards::Start::Started { .. }),
            "{started:?}"
        );
    }
    map
}

/// `distinct` customers plus 10% arriving twice, in a random order (uniform:
/// every home shard equally likely at every point of the sale).
fn arrivals(sale: u64, distinct: usize, seed: u64) -> Vec<CustomerId> {
    let mut all: Vec<CustomerId> = (0..distinct)
        .map(|i| CustomerId::parse(&format!("s{sale}-c{i}")).unwrap())
        .collect();
    let repeats: Vec<CustomerId> = (0..distinct / 10)
        .map(|i| all[i * 7 % distinct].clone())
        .collect();
    all.extend(repeats);
    shuffle(&mut all, seed | 1);
    all
}

/// What one sale did.
struct Sale {
    layout: Layout,
    coupons: u64,
    arrivals: usize,
    batch: usize,
    granted: u64,
    grab_calls: u64,
    grab_customers: u64,
    /// Completed moves: the recipients' `moves-in` records.
    moves: u64,
    /// FCALLs by function.
    calls: HashMap<String, u64>,
    /// Per master (in slot order): Redis spent, grants on it.
    spent: Vec<Spent>,
    grants_on: Vec<u64>,
    seconds: f64,
    /// Each grab call's time (ms), and whether it completed a stock move.
    call_ms: Vec<(bool, f64)>,
    /// Per master: customers sent to a shard (or promotion) on it, the
    /// grabs' load, whatever their answer.
    grabs_on: Vec<u64>,
}

impl Sale {
    fn cpu_us(&self) -> f64 {
        self.spent.iter().map(|s| s.cpu_us).sum()
    }
    fn fcall_us(&self) -> f64 {
        self.spent.iter().map(|s| s.fcall_us).sum()
    }
    fn cpu_per_grant(&self) -> f64 {
        self.cpu_us() / self.granted as f64
    }
    fn fcall_per_grant(&self) -> f64 {
        self.fcall_us() / self.granted as f64
    }
    fn call(&self, f: &str) -> u64 {
        self.calls
            .get(&format!("seckill_v3_{f}"))
            .copied()
            .unwrap_or(0)
    }
}

#[allow(clippy::too_many_arguments)]
async fn sale(
    c: &RedisCluster,
    con: &Counted,
    masters: &mut [Master],
    layout: Layout,
    coupons: u64,
    distinct: usize,
    batch: usize,
    tasks: usize,
    seed: u64,
) -> Sale {
    let mut setup = con.clone();
    let maps = Arc::new(promotions(c, &mut setup, layout, coupons).await);
    let sale_no = SALE.load(Ordering::Relaxed);
    let crowd = arrivals(sale_no, distinct, seed);
    let n_arrivals = crowd.len();
    let queue = Arc::new(Mutex::new(crowd.into_iter().collect::<VecDeque<_>>()));
    // Per promotion: once a task has seen it sold out, its arrivals are
    // answered from memory.
    let over: Arc<Vec<AtomicBool>> =
        Arc::new(maps.iter().map(|_| AtomicBool::new(false)).collect());
    let granted = Arc::new(AtomicU64::new(0));
    // Customers sent per shard, shards numbered promotion after promotion.
    let first_shard: Vec<usize> = maps
        .iter()
        .scan(0usize, |next, m| {
            let first = *next;
            *next += m.shards() as usize;
            Some(first)
        })
        .collect();
    let all_shards: usize = maps.iter().map(|m| m.shards() as usize).sum();
    let sent: Arc<Vec<AtomicU64>> = Arc::new((0..all_shards).map(|_| AtomicU64::new(0)).collect());
    let grab_calls = Arc::new(AtomicU64::new(0));
    let grab_customers = Arc::new(AtomicU64::new(0));
    con.take();
    let before = spent_all(masters).await;
    let t0 = Instant::now();
    let mut handles = Vec::new();
    for task in 0..tasks {
        let (mut con, maps, queue, over, granted, grab_calls, grab_customers) = (
            con.clone(),
            maps.clone(),
            queue.clone(),
            over.clone(),
            granted.clone(),
            grab_calls.clone(),
            grab_customers.clone(),
        );
        let (sent, first_shard) = (sent.clone(), first_shard.clone());
        handles.push(tokio::spawn(async move {
            let mut call_ms: Vec<(bool, f64)> = Vec::new();
            let mut chunks_sent = 0usize;
            let mut views: Vec<StockView> =
                maps.iter().map(|m| StockView::new(m.shards())).collect();
            // Every layout takes BATCH per shard or promotion: 3 x BATCH
            // but for S = 1.
            let take = batch * maps.iter().map(|m| m.shards() as usize).sum::<usize>();
            loop {
                let chunk: Vec<CustomerId> = {
                    let mut q = queue.lock().unwrap();
                    let n = q.len().min(take);
                    q.drain(..n).collect()
                };
                if chunk.is_empty() {
                    return call_ms;
                }
                // (promotion, home shard): one promotion but for
                // ThreeUnsharded, whose customers each go to one of the
                // three by the same stable hash as a home shard.
                let mut by_home: BTreeMap<(usize, u32), Vec<CustomerId>> = BTreeMap::new();
                for who in chunk {
                    let key = if maps.len() == 1 {
                        (0, maps[0].home(&who))
                    } else {
                        (home_shard(&who, maps.len() as u32) as usize, 0)
                    };
                    by_home.entry(key).or_default().push(who);
                }
                // A worker serves its lanes at once (a driver task each);
                // this task sends a chunk's groups one after the other, so
                // it starts each chunk at a different group: a fixed order
                // would serve shard 0's customers first in every chunk and
                // hand it the end of a short sale (the last coupons, and
                // the arrivals sent before the sell-out stops the tasks).
                let mut groups: Vec<_> = by_home.into_iter().collect();
                let n = groups.len().max(1);
                groups.rotate_left((task + chunks_sent) % n);
                chunks_sent += 1;
                for ((p, home), who) in groups {
                    if over[p].load(Ordering::Relaxed) {
                        continue; // answered 410 from memory
                    }
                    grab_calls.fetch_add(1, Ordering::Relaxed);
                    grab_customers.fetch_add(who.len() as u64, Ordering::Relaxed);
                    sent[first_shard[p] + home as usize]
                        .fetch_add(who.len() as u64, Ordering::Relaxed);
                    let (map, view) = (&maps[p], &mut views[p]);
                    let (moves_before, started) = (view.moves_made(), Instant::now());
                    let grabbed = shards::grab(&mut con, map, home, &who, view, None).await;
                    call_ms.push((
                        view.moves_made() > moves_before,
                        started.elapsed().as_secs_f64() * 1000.0,
                    ));
                    match grabbed {
                        Ok(answers) => {
                            for a in answers {
                                match a {
                                    ShardAnswer::Granted(_) => {
                                        granted.fetch_add(1, Ordering::Relaxed);
                                    }
                                    ShardAnswer::AlreadyGranted(_) => {}
                                    ShardAnswer::SoldOut | ShardAnswer::Finished(_) => {
                                        over[p].store(true, Ordering::Relaxed)
                                    }
                                    other => panic!("unexpected answer {other:?}"),
                                }
                            }
                        }
                        Err(e) => {
                            eprintln!("retrying a batch of shard {home}: {e}");
                            tokio::time::sleep(Duration::from_millis(20)).await;
                            queue.lock().unwrap().extend(who);
                        }
                    }
                }
            }
        }));
    }
    let mut call_ms = Vec::new();
    for h in handles {
        call_ms.extend(h.await.expect("a task"));
    }
    let seconds = t0.elapsed().as_secs_f64();
    let after = spent_all(masters).await;
    let calls = con.take();
    let granted = granted.load(Ordering::Relaxed);
    assert_eq!(granted, coupons, "{layout:?}: every coupon granted");

    // Grants and completed moves per shard, shards mapped to their masters.
    let mut grants_on = vec![0u64; masters.len()];
    let mut grabs_on = vec![0u64; masters.len()];
    let mut moves = 0;
    let mut read = con.inner.clone();
    for (flat, (map, shard)) in maps
        .iter()
        .flat_map(|m| (0..m.shards()).map(move |shard| (m, shard)))
        .enumerate()
    {
        let keys = map.keys(shard).expect("shard keys");
        let master = c
            .master_for_slot(key_slot(&keys.state))
            .expect("master of a shard");
        let m = masters
            .iter()
            .position(|x| x.address == master)
            .expect("a known master");
        let on_shard: u64 = redis::cmd("HLEN")
            .arg(&keys.customers)
            .query_async(&mut read)
            .await
            .expect("HLEN customers");
        grants_on[m] += on_shard;
        grabs_on[m] += sent[flat].load(Ordering::Relaxed);
        if map.is_sharded() {
            let n: u64 = redis::cmd("HLEN")
                .arg(&keys.moves_in)
                .query_async(&mut read)
                .await
                .expect("HLEN moves-in");
            moves += n;
            let collected = shards::collect(&mut read, map, shard, None)
                .await
                .expect("collect");
            assert_eq!(collected.stock, 0, "shard {shard} sold out");
            assert_eq!(collected.pending, 0, "shard {shard}: no move in flight");
        }
    }
    assert_eq!(grants_on.iter().sum::<u64>(), coupons, "holders = coupons");
    Sale {
        layout,
        coupons,
        arrivals: n_arrivals,
        batch,
        granted,
        grab_calls: grab_calls.load(Ordering::Relaxed),
        grab_customers: grab_customers.load(Ordering::Relaxed),
        moves,
        calls,
        spent: delta(&after, &before),
        grants_on,
        seconds,
        call_ms,
        grabs_on,
    }
}

fn print_sale(s: &Sale) {
    let per_master = |f: &dyn Fn(&Spent) -> f64| {
        s.spent
            .iter()
            .map(|x| format!("{:.0}", f(x) / 1000.0))
            .collect::<Vec<_>>()
            .join("/")
    };
    println!(
        "  {:<18} N={:<6} arrivals={:<6} batch={:<3} mean/call={:>5.1} grants/s={:>6.0}  \
         redis µs/grant: cpu {:>5.2} fcall {:>5.2}  (cpu ms per master {}; grants per master {})  \
         moves={} ({:.2}/1000)",
        s.layout.name(),
        s.coupons,
        s.arrivals,
        s.batch,
        s.grab_customers as f64 / s.grab_calls as f64,
        s.granted as f64 / s.seconds,
        s.cpu_per_grant(),
        s.fcall_per_grant(),
        per_master(&|x| x.cpu_us),
        s.grants_on
            .iter()
            .map(u64::to_string)
            .collect::<Vec<_>>()
            .join("/"),
        s.moves,
        s.moves as f64 * 1000.0 / s.granted as f64,
    );
}

/// Prints `title` and each step's median [min-max] of `measured`, then a
/// whole move's cost; answers the medians.
fn print_step_costs(
    title: &str,
    measured: &BTreeMap<&'static str, Vec<f64>>,
) -> BTreeMap<&'static str, f64> {
    let mut cost = BTreeMap::new();
    print!("{title}");
    for (step, v) in measured {
        let m = median(v.clone());
        print!(
            " {step} {m:.1} [{:.1}-{:.1}]",
            min(v),
            v.iter().copied().fold(0.0, f64::max)
        );
        cost.insert(*step, m);
    }
    println!(
        "; a whole move {:.1} us",
        cost["move_out"] + cost["move_in"] + cost["move_done"]
    );
    cost
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn min(v: &[f64]) -> f64 {
    v.iter().copied().fold(f64::INFINITY, f64::min)
}

/// A fresh S = 3 promotion with a million coupons a shard for the step
/// measurements, and its two legs between shards 1 and 2: (from, to, the
/// donor's master, the recipient's master), 1 to 2 then 2 to 1.
async fn mover(
    c: &RedisCluster,
    con: &mut Counted,
    masters: &[Master],
) -> (ShardMap, [(u32, u32, usize, usize); 2]) {
    let map = promotion(c, con, Layout::Spread, 3_000_000).await;
    let master_of = |shard: u32| {
        let a = c
            .master_for_slot(key_slot(&map.keys(shard).unwrap().state))
            .unwrap();
        masters.iter().position(|m| m.address == a).unwrap()
    };
    let (m1, m2) = (master_of(1), master_of(2));
    (map, [(1, 2, m1, m2), (2, 1, m2, m1)])
}

/// Redis usec (commandstats, on the master the call ran on) of each step of
/// a move and of a collect, measured one call at a time on an otherwise idle
/// cluster: `moves` moves between shards 1 and 2 of a fresh S = 3 sale, back
/// and forth, without waiting customers.
async fn step_costs(
    c: &RedisCluster,
    con: &Counted,
    masters: &mut [Master],
    moves: usize,
) -> BTreeMap<&'static str, Vec<f64>> {
    let mut con = con.clone();
    let (map, legs) = mover(c, &mut con, masters).await;
    let mut costs: BTreeMap<&'static str, Vec<f64>> = BTreeMap::new();
    for i in 0..moves {
        let (from, to, mf, mt) = legs[i % 2];
        let (out, us) = fcall_cost(
            &mut masters[mf],
            shards::move_out(&mut con, &map, from, to, 1, None),
        )
        .await;
        costs.entry("move_out").or_default().push(us);
        let out = out.expect("move out");
        let MoveOut::Moved { pending, .. } = out else {
            panic!("move out: {out:?}")
        };
        let (moved_in, us) = fcall_cost(
            &mut masters[mt],
            shards::move_in(&mut con, &map, &pending, &[], None),
        )
        .await;
        moved_in.expect("move in");
        costs.entry("move_in").or_default().push(us);
        let (done, us) = fcall_cost(
            &mut masters[mf],
            shards::move_done(&mut con, &map, from, &pending.id, None),
        )
        .await;
        done.expect("move done");
        costs.entry("move_done").or_default().push(us);
        let (collected, us) = fcall_cost(
            &mut masters[mf],
            shards::collect(&mut con, &map, from, None),
        )
        .await;
        collected.expect("collect");
        costs.entry("collect").or_default().push(us);
    }
    costs
}

/// The same steps measured in blocks, as they run inside a sale (between
/// grabs, not alone after an idle pause, which costs a call more: its code
/// and data are out of the caches): `blocks` blocks of `per_block` calls of
/// one step on one master, either sent at once (`at_once`: pipelined on the
/// shared connection, so the master runs them back to back, as a busy Redis
/// does) or in a row (one round trip each). Main-thread CPU (the unit of
/// the sale's figures, request parsing and reply included) and commandstats
/// usec are read before and after each block; in a row, main-thread CPU
/// would also charge the calls with the server's periodic work between
/// them. A block of move_outs (shard 1 to 2, or back in the next block),
/// then their move_ins, their move_dones and as many collects. Answers each
/// block's per-call cost: [main-thread CPU, commandstats].
async fn block_step_costs(
    c: &RedisCluster,
    con: &Counted,
    masters: &mut [Master],
    blocks: usize,
    per_block: usize,
    at_once: bool,
) -> [BTreeMap<&'static str, Vec<f64>>; 2] {
    let (map, legs) = mover(c, &mut con.clone(), masters).await;
    let mut cpu: BTreeMap<&'static str, Vec<f64>> = BTreeMap::new();
    let mut fcall: BTreeMap<&'static str, Vec<f64>> = BTreeMap::new();
    let n = per_block as f64;
    let mut record = |step: &'static str, spent: Spent| {
        cpu.entry(step).or_default().push(spent.cpu_us / n);
        fcall.entry(step).or_default().push(spent.fcall_us / n);
    };
    let map = &map;
    for b in 0..blocks {
        let (from, to, mf, mt) = legs[b % 2];
        // One block: `per_block` calls of `step` on master `m`, each made
        // by `call` on its own handle of the shared connection.
        macro_rules! block {
            ($step:literal, $m:expr, |$con:ident, $i:ident| $call:expr) => {{
                let (out, spent) = cost(
                    &mut masters[$m],
                    run_all(
                        at_once,
                        (0..per_block).map(|$i| {
                            let mut $con = con.clone();
                            async move { $call.await }
                        }),
                    ),
                )
                .await;
                record($step, spent);
                out.into_iter().map(|r| r.expect($step)).collect::<Vec<_>>()
            }};
        }
        let pending: Vec<_> = block!("move_out", mf, |con, _i| shards::move_out(
            &mut con, map, from, to, 1, None
        ))
        .into_iter()
        .map(|o| match o {
            MoveOut::Moved { pending, .. } => pending,
            other => panic!("move out: {other:?}"),
        })
        .collect();
        let pending = &pending;
        let _answers = block!("move_in", mt, |con, i| shards::move_in(
            &mut con,
            map,
            &pending[i],
            &[],
            None
        ));
        let _answers = block!("move_done", mf, |con, i| shards::move_done(
            &mut con,
            map,
            from,
            &pending[i].id,
            None
        ));
        let _answers = block!("collect", mf, |con, _i| shards::collect(
            &mut con, map, from, None
        ));
    }
    [cpu, fcall]
}

/// Awaits `calls` at once (`at_once`) or one after the other.
async fn run_all<F: std::future::Future>(
    at_once: bool,
    calls: impl Iterator<Item = F>,
) -> Vec<F::Output> {
    if at_once {
        return join_all(calls).await;
    }
    let mut out = Vec::new();
    for call in calls {
        out.push(call.await);
    }
    out
}

/// The Redis usec of a sale's stock moves and of the rest of its non-grab
/// calls, estimated from the per-step costs measured alone: each completed
/// move at move_out + move_in + move_done; the other calls (step 1 answered
/// empty, collects, pending reads) at a collect's cost, being reads;
/// finish_soldout and closes at move_out's cost. Answers (moves' usec, the
/// other calls' usec).
fn estimate(s: &Sale, cost: &BTreeMap<&'static str, f64>) -> (f64, f64) {
    let moves = s.moves as f64 * (cost["move_out"] + cost["move_in"] + cost["move_done"]);
    let replays = (s.call("move_in") + s.call("move_done")).saturating_sub(2 * s.moves) as f64;
    let reads = s.call("move_out").saturating_sub(s.moves) as f64
        + s.call("shard_collect") as f64
        + s.call("moves_pending") as f64
        + replays;
    let others = reads * cost["collect"]
        + (s.call("finish_soldout") + s.call("shard_close")) as f64 * cost["move_out"];
    (moves, others)
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let reps: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(5);
    let per_shard: u64 = args.next().and_then(|a| a.parse().ok()).unwrap_or(20_000);
    let small: u64 = args.next().and_then(|a| a.parse().ok()).unwrap_or(1_000);
    let tasks: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(16);
    let batches = [16usize, 64];

    let cluster = RedisCluster::start(RedisClusterOptions::default())?;
    let con = Counted {
        inner: RedisArgs::for_cluster(cluster.seed_nodes()).connect()?,
        calls: Arc::default(),
    };
    let mut masters = Vec::new();
    for address in cluster.placement_slots().expect("slot map").masters() {
        let client = redis::Client::open(format!("redis://{address}/"))?;
        masters.push(Master {
            address: address.clone(),
            con: client.get_multiplexed_async_connection().await?,
        });
    }
    println!(
        "stock shards: 3-master Redis Cluster (redis-server, AOF off, no replicas), {} CPUs, \
         {tasks} tasks, {reps} repetitions alternating S=1 / 3 x S=1 (one promotion per master, sold at once) / \
         S=3 on 3 masters / S=3 on 1 master; S=1 sells {per_shard} coupons, the others {} ({per_shard} per \
         shard or promotion); arrivals 1.2 x N distinct \
         customers + 10% repeats, uniformly shuffled",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        per_shard * 3,
    );
    println!(
        "masters in slot order: {}",
        cluster
            .placement_slots()
            .expect("slot map")
            .masters()
            .join(", ")
    );

    // Warm up: the library loads, connections open.
    sale(
        &cluster,
        &con,
        &mut masters,
        Layout::Spread,
        3_000,
        3_600,
        16,
        tasks,
        1,
    )
    .await;
    sale(
        &cluster,
        &con,
        &mut masters,
        Layout::Unsharded,
        1_000,
        1_200,
        16,
        tasks,
        2,
    )
    .await;

    let mut rows: BTreeMap<(usize, &'static str), Vec<Sale>> = BTreeMap::new();
    for &batch in &batches {
        println!("per-call batch {batch} (S=1 tasks take {batch} arrivals, S=3 tasks {} split by home shard):", batch * 3);
        for rep in 0..reps {
            for layout in [
                Layout::Unsharded,
                Layout::ThreeUnsharded,
                Layout::Spread,
                Layout::OneMaster,
            ] {
                let coupons = if layout == Layout::Unsharded {
                    per_shard
                } else {
                    per_shard * 3
                };
                let s = sale(
                    &cluster,
                    &con,
                    &mut masters,
                    layout,
                    coupons,
                    (coupons as usize) * 6 / 5,
                    batch,
                    tasks,
                    100 + rep as u64 * 7 + batch as u64,
                )
                .await;
                print_sale(&s);
                rows.entry((batch, layout.name())).or_default().push(s);
            }
        }
    }

    println!("small sales (S=3 on 3 masters, N={small}, 3 x N distinct + 10% repeats, batch 16):");
    let mut smalls = Vec::new();
    for rep in 0..reps.max(3) + 2 {
        let s = sale(
            &cluster,
            &con,
            &mut masters,
            Layout::Spread,
            small,
            small as usize * 3,
            16,
            tasks,
            900 + rep as u64,
        )
        .await;
        print_sale(&s);
        smalls.push(s);
    }

    let alone = step_costs(&cluster, &con, &mut masters, 60).await;
    let cold = print_step_costs(
        "Redis usec per step alone, one call after an idle pause (commandstats, 60 moves back and forth, median [min-max]):",
        &alone,
    );
    let [_, in_a_row] = block_step_costs(&cluster, &con, &mut masters, 8, 16, false).await;
    let warm = print_step_costs(
        "Redis usec per step warm, 16 calls in a row (commandstats, 8 blocks alternating direction, median [min-max] of the blocks' means):",
        &in_a_row,
    );
    let [busy_cpu, busy_fcall] = block_step_costs(&cluster, &con, &mut masters, 8, 16, true).await;
    let cost = print_step_costs(
        "Redis main-thread CPU usec per step on a busy Redis, 16 calls sent at once (8 blocks alternating direction, median [min-max] of the blocks' means):",
        &busy_cpu,
    );
    print_step_costs("  the same blocks by commandstats usec:", &busy_fcall);

    println!();
    println!(
        "== Redis CPU per granted grab, summed over the 3 masters (min and median of {reps}) =="
    );
    for &batch in &batches {
        let get = |name: &str, f: &dyn Fn(&Sale) -> f64| -> Vec<f64> {
            rows[&(batch, name)].iter().map(f).collect()
        };
        for (what, f) in [
            (
                "main-thread cpu",
                &Sale::cpu_per_grant as &dyn Fn(&Sale) -> f64,
            ),
            ("commandstats fcall", &Sale::fcall_per_grant),
        ] {
            let s1 = get("S=1", f);
            let three = get("3 x S=1, 3 masters", f);
            let spread = get("S=3 on 3 masters", f);
            let one = get("S=3 on 1 master", f);
            println!(
                "batch {batch:>2}, {what:<19} 3 x S=1 on 3 masters {:.2}/{:.2} us; S=3 on 3 masters / that \
                 (every master busy in both) = {:.2}x/{:.2}x  (target <= 1.2x)",
                min(&three),
                median(three.clone()),
                min(&spread) / min(&three),
                median(spread.clone()) / median(three.clone()),
            );
            println!(
                "batch {batch:>2}, {what:<19} S=1 {:.2}/{:.2} us; S=3 on 3 masters {:.2}/{:.2} us = {:.2}x/{:.2}x; \
                 S=3 on 1 master (control) {:.2}/{:.2} us = {:.2}x/{:.2}x  (target <= 1.2x)",
                min(&s1),
                median(s1.clone()),
                min(&spread),
                median(spread.clone()),
                min(&spread) / min(&s1),
                median(spread.clone()) / median(s1.clone()),
                min(&one),
                median(one.clone()),
                min(&one) / min(&s1),
                median(one.clone()) / median(s1.clone()),
            );
        }
    }

    println!();
    println!("== Stock moves (uniform random arrivals, S=3 on 3 masters) ==");
    let mut sales_for_moves: Vec<&Sale> = smalls.iter().collect();
    for &batch in &batches {
        sales_for_moves.extend(rows[&(batch, "S=3 on 3 masters")].iter());
    }
    // Largest share among the small sales and among the large ones.
    // Estimated with the steps' main-thread CPU on a busy Redis (the unit of
    // the sale's own figure); with the warm commandstats costs over the
    // sale's FCALL usec; the cold ones (a step alone after an idle pause)
    // over main-thread CPU bound it from above.
    let mut worst_share = [0.0f64; 2];
    let mut worst_cold = [0.0f64; 2];
    let mut worst_tail = [0.0f64; 2];
    for s in &sales_for_moves {
        let k = usize::from(s.coupons > small);
        let (moves_us, others_us) = estimate(s, &cost);
        let share = moves_us / s.cpu_us();
        let cold_share = estimate(s, &cold).0 / s.cpu_us();
        worst_share[k] = worst_share[k].max(share);
        worst_cold[k] = worst_cold[k].max(cold_share);
        worst_tail[k] = worst_tail[k].max((moves_us + others_us) / s.cpu_us());
        println!(
            "N={:<6} batch {:>2}: {:>3} moves = {:>5.2} per 1,000 grabs, est. {:.0} us = {:.2} % of Redis main-thread cpu \
             ({:.2} % of FCALL usec; {:.2} % at the cold cost); with the other non-grab calls (move_out {}, move_in {}, move_done {}, collect {}, \
             moves_pending {}, finish_soldout {}, close {}) {:.2} % of cpu",
            s.coupons,
            s.batch,
            s.moves,
            s.moves as f64 * 1000.0 / s.granted as f64,
            moves_us,
            share * 100.0,
            estimate(s, &warm).0 / s.fcall_us() * 100.0,
            cold_share * 100.0,
            s.call("move_out"),
            s.call("move_in"),
            s.call("move_done"),
            s.call("shard_collect"),
            s.call("moves_pending"),
            s.call("finish_soldout"),
            s.call("shard_close"),
            (moves_us + others_us) / s.cpu_us() * 100.0,
        );
    }
    for (k, what) in [(1, "large sales"), (0, "small sales")] {
        println!(
            "largest estimated share of Redis cpu, {what}: moves {:.2} % (target <= 5 %; {:.2} % at the cold cost), \
             moves and the other non-grab calls {:.2} %",
            worst_share[k] * 100.0,
            worst_cold[k] * 100.0,
            worst_tail[k] * 100.0
        );
    }
    // What a customer whose home ran dry waits: the grab calls that
    // completed a move beside those served from their home's stock (every
    // sale above pooled; a busy 2-core machine, so read them side by side).
    let (mut with_move, mut without): (Vec<f64>, Vec<f64>) = (Vec::new(), Vec::new());
    for s in &sales_for_moves {
        for &(moved, ms) in &s.call_ms {
            if moved {
                with_move.push(ms)
            } else {
                without.push(ms)
            }
        }
    }
    let quantiles = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        let at = |q: f64| {
            v.get(((v.len() as f64 * q) as usize).min(v.len().saturating_sub(1)))
                .copied()
                .unwrap_or(0.0)
        };
        (v.len(), at(0.5), at(0.99), v.last().copied().unwrap_or(0.0))
    };
    let (n_m, p50_m, p99_m, max_m) = quantiles(&mut with_move);
    let (n_w, p50_w, p99_w, max_w) = quantiles(&mut without);
    println!(
        "grab call time, calls that completed a stock move: n={n_m} p50 {p50_m:.2} ms p99 {p99_m:.2} ms max {max_m:.2} ms; \
         calls served from their home's stock: n={n_w} p50 {p50_w:.2} ms p99 {p99_w:.2} ms max {max_w:.2} ms \
         (p50 with a move / without: {:.1}x)",
        if p50_w > 0.0 { p50_m / p50_w } else { 0.0 }
    );

    println!();
    println!("== Spread over the masters, S=3 on 3 masters (share / one third; target 0.8-1.2) ==");
    // Each master's share of a count, over a third of the total.
    let share = |v: &[u64]| {
        let total: u64 = v.iter().sum();
        v.iter()
            .map(|&x| x as f64 * 3.0 / total.max(1) as f64)
            .collect::<Vec<f64>>()
    };
    let fmt = |v: &[f64]| {
        v.iter()
            .map(|x| format!("{x:.3}"))
            .collect::<Vec<_>>()
            .join(" ")
    };
    let mut worst: f64 = 0.0;
    // The grabs' load by master (customers sent to each master's shard,
    // whatever the answer), [large sales, small sales].
    let mut worst_grabs = [0.0f64; 2];
    for &batch in &batches {
        for s in &rows[&(batch, "S=3 on 3 masters")] {
            let g = share(&s.grants_on);
            let cpu: Vec<f64> = s
                .spent
                .iter()
                .map(|x| x.cpu_us * 3.0 / s.cpu_us())
                .collect();
            for x in &g {
                worst = worst.max((x - 1.0).abs());
            }
            for x in share(&s.grabs_on) {
                worst_grabs[0] = worst_grabs[0].max((x - 1.0).abs());
            }
            println!(
                "batch {batch:>2} N={}: grants {}; main-thread cpu {}",
                s.coupons,
                fmt(&g),
                fmt(&cpu)
            );
        }
    }
    // Small sales: the grabs sent beside who won the coupons.
    for s in &smalls {
        let (g, a) = (share(&s.grants_on), share(&s.grabs_on));
        for x in &a {
            worst_grabs[1] = worst_grabs[1].max((x - 1.0).abs());
        }
        println!(
            "small N={}: grants {}; grabs (customers sent) {}",
            s.coupons,
            fmt(&g),
            fmt(&a)
        );
    }
    println!(
        "largest deviation of a master's share of the grabs (customers sent, until the sell-out stops \
         the callers) from a third: large sales {:.1} %, small sales {:.1} %",
        worst_grabs[0] * 100.0,
        worst_grabs[1] * 100.0
    );
    println!(
        "largest deviation of a master's grant share from a third (large sales): {:.1} %",
        worst * 100.0
    );

    println!();
    println!("== Per-core grant rate (capacity model: grabs/s ~ min(S, cores) x r_core x (1 - move share)) ==");
    for &batch in &batches {
        for name in [
            "S=1",
            "3 x S=1, 3 masters",
            "S=3 on 3 masters",
            "S=3 on 1 master",
        ] {
            let v: Vec<f64> = rows[&(batch, name)]
                .iter()
                .map(Sale::cpu_per_grant)
                .collect();
            println!(
                "batch {batch:>2} {name:<18}: r_core = 1 / main-thread µs per grant = {:.0}k/s (median), {:.0}k/s (best)",
                1e3 / median(v.clone()),
                1e3 / min(&v),
            );
        }
    }
    Ok(())
}
