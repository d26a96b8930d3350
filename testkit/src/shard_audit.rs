//! What every shard of a sharded promotion holds, read straight from Redis
//! ([`read_all`]), and the invariants of DESIGN-14 §7 on it: conservation
//! number by number ([`conservation`], [`assert_conserved`]) and the
//! per-shard agreement of holders, counts and streams ([`audit`]). Shared by
//! the shard tests of the protocol and of the command workers over HTTP.

use std::collections::{BTreeMap, HashMap};

use seckill_workers::protocol::ranges::NumberRanges;
use seckill_workers::protocol::shards::ShardMap;
use seckill_workers::protocol::{
    home_shard, CustomerId, Event, FinishReason, ShardKeys, EVENT_FIELD,
};
use seckill_workers::redis_connection::RedisConnection;

use crate::stream::{entries_at as entries, grants_in, hash_at as hash};

/// Everything the invariants are about, read from one shard.
#[derive(Debug, Default)]
pub struct ShardRead {
    pub state: HashMap<String, String>,
    pub customers: HashMap<String, String>,
    pub moves_out: HashMap<String, String>,
    pub moves_in: HashMap<String, String>,
    /// (entry id, fields)
    pub events: Vec<(String, HashMap<String, String>)>,
}

/// Every shard of `map`, in shard order.
pub async fn read_all(con: &mut RedisConnection, map: &ShardMap) -> Vec<ShardRead> {
    let mut out = Vec::new();
    for i in 0..map.shards() {
        let k: &ShardKeys = map.keys(i).unwrap();
        out.push(ShardRead {
            state: hash(con, &k.state).await,
            customers: hash(con, &k.customers).await,
            moves_out: hash(con, &k.moves_out).await,
            moves_in: hash(con, &k.moves_in).await,
            events: entries(con, &k.events).await,
        });
    }
    out
}

/// Field `name` of `h`, parsed; panics naming the hash when absent or
/// unparsable.
pub fn field<T: std::str::FromStr>(h: &HashMap<String, String>, name: &str) -> T {
    h.get(name)
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("field {name} of {h:?}"))
}

/// Coupon numbers by where they are.
#[derive(Debug, PartialEq, Eq)]
pub struct Conservation {
    pub stock: u64,
    pub granted: u64,
    pub in_flight: u64,
    /// Numbers seen more than once (never, unless a step was lost and built upon).
    pub twice: Vec<u64>,
    pub missing: Vec<u64>,
}

/// Invariant 4, number by number, without asserting it (a failover test
/// also shows what breaks it).
pub fn conservation(reads: &[ShardRead], coupons: u64) -> Conservation {
    let mut seen: BTreeMap<u64, u32> = BTreeMap::new();
    let (mut stock, mut granted, mut in_flight) = (0, 0, 0);
    for (i, r) in reads.iter().enumerate() {
        let mut left = NumberRanges::span(field(&r.state, "next"), field(&r.state, "upto"));
        left.extend(&NumberRanges::parse(r.state.get("more").map_or("", String::as_str)).unwrap());
        assert_eq!(
            left.len(),
            field::<u64>(&r.state, "stock"),
            "shard {i}: stock field against its ranges"
        );
        stock += left.len();
        for n in left.numbers() {
            *seen.entry(n).or_default() += 1;
        }
        for held in r.customers.values() {
            let n: u64 = held.split(':').next().unwrap().parse().unwrap();
            granted += 1;
            *seen.entry(n).or_default() += 1;
        }
        for (move_id, record) in &r.moves_out {
            let mut parts = record.split('|');
            let to: usize = parts.next().unwrap().parse().unwrap();
            if !reads[to].moves_in.contains_key(move_id) {
                let moving = NumberRanges::parse(parts.next().unwrap()).unwrap();
                in_flight += moving.len();
                for n in moving.numbers() {
                    *seen.entry(n).or_default() += 1;
                }
            }
        }
    }
    Conservation {
        stock,
        granted,
        in_flight,
        twice: seen
            .iter()
            .filter(|(_, k)| **k > 1)
            .map(|(n, _)| *n)
            .collect(),
        missing: (1..=coupons).filter(|n| !seen.contains_key(n)).collect(),
    }
}

/// [`conservation`], asserted: no number twice or missing, and stock +
/// granted + in flight = `coupons`.
pub fn assert_conserved(reads: &[ShardRead], coupons: u64) -> Conservation {
    let c = conservation(reads, coupons);
    assert!(
        c.twice.is_empty() && c.missing.is_empty(),
        "conservation broken: {c:?}"
    );
    assert_eq!(c.stock + c.granted + c.in_flight, coupons, "{c:?}");
    c
}

/// What every shard's stream says, after the per-shard checks.
#[derive(Debug)]
pub struct Audit {
    pub grabs: u64,
    pub moves: usize,
    /// Finished{reason, granted} with its entry id's time, if any.
    pub finished: Option<(FinishReason, u64, i64)>,
    /// customer -> coupon number
    pub holders: BTreeMap<String, u64>,
}

/// Invariants 1, 2 and 5 from every shard: every holder on their home shard
/// and in one shard only; each shard's `granted`, customers hash and stream
/// agree; one Started and at most one Finished, in shard 0's stream only,
/// whose total is the number of CouponGrabbed of every stream.
pub fn audit(map: &ShardMap, reads: &[ShardRead]) -> Audit {
    let mut holders = BTreeMap::new();
    let mut grabs = 0;
    let mut moves = 0;
    let mut started = Vec::new();
    let mut finished = Vec::new();
    for (i, r) in reads.iter().enumerate() {
        for (c, held) in &r.customers {
            let cust = CustomerId::parse(c).unwrap();
            assert_eq!(
                home_shard(&cust, map.shards()),
                i as u32,
                "{c} holds a coupon away from home"
            );
            let n: u64 = held.split(':').next().unwrap().parse().unwrap();
            assert!(holders.insert(c.clone(), n).is_none(), "{c} in two shards");
        }
        let mut on_shard = 0;
        let mut last_shard_granted = 0;
        for (entry, f) in &r.events {
            if let Some(json) = f.get(EVENT_FIELD) {
                match Event::decode(json.as_bytes()).expect("a lifecycle event") {
                    Event::PromotionStarted(_) => started.push(i),
                    Event::PromotionFinished(e) => {
                        let ms = entry.split('-').next().unwrap().parse().unwrap();
                        finished.push((i, e.reason, e.granted, ms));
                    }
                    other => panic!("unexpected JSON event {other:?}"),
                }
                continue;
            }
            match f.get("type").map(String::as_str) {
                Some("CouponGrabbed") => {
                    for (c, seq, k) in grants_in(map.id(), f) {
                        on_shard += 1;
                        assert_eq!(
                            k,
                            Some(last_shard_granted + 1),
                            "shardGranted counts this shard's grants"
                        );
                        last_shard_granted += 1;
                        assert_eq!(
                            r.customers.get(&c).map(|h| h.split(':').next().unwrap()),
                            Some(seq.to_string().as_str()),
                            "the stream's grant is the held coupon"
                        );
                    }
                }
                Some("StockMovedOut") => moves += 1,
                Some("StockMovedIn") => {}
                other => panic!("unexpected entry type {other:?}"),
            }
        }
        assert_eq!(
            on_shard,
            r.customers.len() as u64,
            "shard {i}: stream against holders"
        );
        assert_eq!(
            field::<u64>(&r.state, "granted"),
            on_shard,
            "shard {i}: granted against its stream"
        );
        grabs += on_shard;
    }
    assert_eq!(started, [0], "one PromotionStarted, in shard 0's stream");
    assert!(
        finished.len() <= 1,
        "one PromotionFinished at most: {finished:?}"
    );
    let finished = finished.pop().map(|(shard, reason, total, ms)| {
        assert_eq!(shard, 0, "PromotionFinished in shard 0's stream");
        assert_eq!(total, grabs, "Finished.granted is every stream's grabs");
        (reason, total, ms)
    });
    Audit {
        grabs,
        moves,
        finished,
        holders,
    }
}
