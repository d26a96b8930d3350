//! A crowd of command workers on a sharded promotion, at the protocol level:
//! tasks that take arrivals in batches, split them by home shard and serve
//! each group with `protocol::shards::grab`, retrying what has no outcome
//! as clients retry a 503; and the plan such a promotion starts from.
//! Shared by the shard tests of the protocol, of the read side and of the
//! command workers over HTTP.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use seckill_workers::protocol::placement;
use seckill_workers::protocol::shards::{self, ShardAnswer, ShardMap, StockView};
use seckill_workers::protocol::{CustomerId, Durability, PromotionId};
use seckill_workers::redis_connection::RedisConnection;

use crate::redis_cluster::RedisCluster;

/// Customers `<prefix>-0`, `<prefix>-1`, ... whose home is `shard` of
/// `map`: what a test needs to aim grabs at one shard.
pub fn at_home<'a>(
    map: &'a ShardMap,
    prefix: &'a str,
    shard: u32,
) -> impl Iterator<Item = CustomerId> + 'a {
    (0..)
        .map(move |i| CustomerId::parse(&format!("{prefix}-{i}")).expect("customer id"))
        .filter(move |c| map.home(c) == shard)
}

/// `p` planned over `shards` shards placed on the masters of `c`, as the
/// operator plans it (`placement::place`, then `shards::plan`).
pub async fn planned(
    c: &RedisCluster,
    con: &mut RedisConnection,
    p: &PromotionId,
    shards: u32,
) -> ShardMap {
    let slots = c.placement_slots().expect("slot map");
    let placement = placement::place(p, shards, &slots).expect("placement");
    shards::plan(con, p, &placement).await.expect("plan")
}

/// Sets shard `i`'s finish time to `finish_ms`, as its own clock sees it:
/// a shard whose clock runs ahead of shard 0's reaches the end first.
pub async fn set_finish_ms(con: &mut RedisConnection, map: &ShardMap, i: u32, finish_ms: i64) {
    let _: () = redis::cmd("HSET")
        .arg(&map.keys(i).expect("shard keys").state)
        .arg("finish_ms")
        .arg(finish_ms)
        .query_async(con)
        .await
        .expect("HSET finish_ms");
}

/// Every answer of a crowd: the customer, its answer, and when it came
/// (host clock, ms).
pub type Answered = Vec<(CustomerId, ShardAnswer, i64)>;

/// The host clock in ms, the time of an answer.
pub fn host_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// A crowd under way: its answers so far and its worker tasks.
pub struct Crowd {
    answered: Arc<Mutex<Answered>>,
    workers: Vec<tokio::task::JoinHandle<()>>,
}

impl Crowd {
    /// How many answers so far were grants.
    pub fn granted(&self) -> usize {
        self.answered
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, a, _)| matches!(a, ShardAnswer::Granted(_)))
            .count()
    }

    /// Waits for every arrival's answer.
    pub async fn answers(self) -> Answered {
        for w in self.workers {
            w.await.expect("a worker task");
        }
        let out = self.answered.lock().unwrap().clone();
        out
    }
}

/// `workers` tasks act as command workers: each takes batches of up to 16
/// arrivals, splits them by home shard and serves each group with
/// `shards::grab` (its own stock view: grab at home, refill by moves,
/// sold-out by the double collect). Unknown outcomes (errors, grants not yet
/// on enough replicas) are retried, as clients retry a 503.
pub fn start_crowd(
    con: &RedisConnection,
    map: &ShardMap,
    arrivals: Vec<CustomerId>,
    workers: usize,
    durable: Option<Durability>,
) -> Crowd {
    let queue = Arc::new(Mutex::new(
        arrivals
            .into_iter()
            .map(|c| (c, 0))
            .collect::<VecDeque<_>>(),
    ));
    let answered = Arc::new(Mutex::new(Vec::new()));
    let mut tasks = Vec::new();
    for _ in 0..workers {
        let (mut con, map, queue, answered) =
            (con.clone(), map.clone(), queue.clone(), answered.clone());
        tasks.push(tokio::spawn(async move {
            let mut view = StockView::new(map.shards());
            loop {
                let batch: Vec<(CustomerId, u32)> = {
                    let mut q = queue.lock().unwrap();
                    let n = q.len().min(16);
                    q.drain(..n).collect()
                };
                if batch.is_empty() {
                    return;
                }
                let mut by_home: BTreeMap<u32, Vec<(CustomerId, u32)>> = BTreeMap::new();
                for (c, tries) in batch {
                    by_home.entry(map.home(&c)).or_default().push((c, tries));
                }
                for (home, group) in by_home {
                    let who: Vec<CustomerId> = group.iter().map(|(c, _)| c.clone()).collect();
                    match shards::grab(&mut con, &map, home, &who, &mut view, durable).await {
                        Ok(answers) => {
                            let at = host_ms();
                            let mut retry = Vec::new();
                            let mut a = answered.lock().unwrap();
                            for ((c, tries), answer) in group.into_iter().zip(answers) {
                                if matches!(answer, ShardAnswer::Unconfirmed(_)) {
                                    retry.push((c, tries + 1));
                                } else {
                                    a.push((c, answer, at));
                                }
                            }
                            queue.lock().unwrap().extend(retry);
                        }
                        Err(e) => {
                            assert!(
                                group.iter().all(|(_, tries)| *tries < 500),
                                "a batch failed 500 times: {e}"
                            );
                            // A client's pause before retrying a 503.
                            tokio::time::sleep(Duration::from_millis(20)).await;
                            queue
                                .lock()
                                .unwrap()
                                .extend(group.into_iter().map(|(c, t)| (c, t + 1)));
                        }
                    }
                }
            }
        }));
    }
    Crowd {
        answered,
        workers: tasks,
    }
}

/// [`start_crowd`] to its end.
pub async fn crowd(
    con: &RedisConnection,
    map: &ShardMap,
    arrivals: Vec<CustomerId>,
    workers: usize,
    durable: Option<Durability>,
) -> Answered {
    start_crowd(con, map, arrivals, workers, durable)
        .answers()
        .await
}
