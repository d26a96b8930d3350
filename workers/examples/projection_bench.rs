//! Read-side benchmark for `make bench` (docs/BENCHMARKS.md):
//!
//! 1. appends one PromotionStarted, `N` CouponGrabbed (distinct customers)
//!    and one PromotionFinished to one promotion stream (pipelined XADD,
//!    through the protocol's types and field names). The grabs go as the
//!    grab function writes them: version 3 entries of `BATCH` grants each
//!    (default 32, about the mean batch of `make bench`'s grab run at 64
//!    connections); `BATCH` 0 writes version 2 entries, one per grant, as
//!    releases before version 3 did,
//! 2. reads the whole stream raw with XRANGE (the ceiling: what any reader
//!    pays just to get the entries),
//! 3. projects it with one projector, then (read models dropped, group
//!    reset) with two projectors sharing the consumer group,
//! 4. rebuilds the read models from the stream (`projector --rebuild`),
//!
//! and prints one JSON object with the rates and their ratios. Rates and
//! costs are per event (each grant one, whatever the entries that hold
//! them). Every run checks the read model it produced (granted = N, the last
//! customer's coupon present), so a fast wrong projection cannot pass.
//!
//! Usage: `cargo run --release -p seckill-workers --example projection_bench -- REDIS_URL [N [BATCH]]`

use std::time::Instant;

use chrono::{Duration, Utc};
use seckill_workers::projector::{self, Projector, ProjectorMetrics, ProjectorOptions};
use seckill_workers::protocol::{
    grab_entry, CustomerId, Event, FinishReason, PromotionFinished, PromotionId, PromotionKeys,
    PromotionStarted, EVENT_FIELD, PROJECTOR_GROUP, PROMOTION_INDEX_KEY,
};
use seckill_workers::read_model;
use seckill_workers::redis_connection::{RedisArgs, RedisConnection};

type Error = Box<dyn std::error::Error + Send + Sync>;

/// An entry to append: a JSON event (version 1), a version 3 grab entry
/// (customers from coupon `first`) or a version 2 grab (one customer).
enum Entry {
    Json(Event),
    Grabs {
        customers: Vec<String>,
        first: u64,
        ms: i64,
    },
    Grab {
        customer: String,
        seq: u64,
        ms: i64,
    },
}

async fn append(con: &mut RedisConnection, stream: &str, entries: &[Entry]) -> Result<(), Error> {
    let mut pipe = redis::pipe();
    for e in entries {
        let xadd = pipe.cmd("XADD").arg(stream).arg("*");
        match e {
            Entry::Json(e) => xadd.arg(EVENT_FIELD).arg(e.encode()),
            Entry::Grabs {
                customers,
                first,
                ms,
            } => {
                let ids: Vec<&str> = customers.iter().map(String::as_str).collect();
                for (name, value) in grab_entry::fields(&ids, *first, *ms) {
                    xadd.arg(name).arg(value);
                }
                xadd
            }
            Entry::Grab { customer, seq, ms } => {
                for (name, value) in grab_entry::fields_v2(customer, *seq, *ms) {
                    xadd.arg(name).arg(value);
                }
                xadd
            }
        }
        .ignore();
    }
    pipe.query_async::<()>(con).await?;
    Ok(())
}

async fn check(con: &mut RedisConnection, id: &PromotionId, n: u64) -> Result<(), Error> {
    let view = read_model::promotion(con, id)
        .await?
        .ok_or("the promotion is missing from the read model")?;
    if view.granted != n {
        return Err(format!("read model says {} granted, expected {n}", view.granted).into());
    }
    let last = CustomerId::parse(&format!("c-{}", n - 1))?;
    if read_model::customer_coupons(con, &last).await?.len() != 1 {
        return Err("the last customer's coupon is missing".into());
    }
    Ok(())
}

async fn reset(
    con: &mut RedisConnection,
    models: &mut RedisConnection,
    stream: &str,
) -> Result<(), Error> {
    let _: () = redis::cmd("XGROUP")
        .arg("DESTROY")
        .arg(stream)
        .arg(PROJECTOR_GROUP)
        .query_async(con)
        .await?;
    // Drop the read models, so the next projectors start from nothing.
    read_model::drop_database(models).await?;
    Ok(())
}

/// CPU seconds used so far by this process and by the Redis server: where
/// the time of each phase went, on a machine where both share the cores.
async fn cpu_seconds(con: &mut RedisConnection) -> Result<(f64, f64), Error> {
    let stat = std::fs::read_to_string("/proc/self/stat")?;
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // utime and stime are fields 14 and 15 of /proc/[pid]/stat (here 11, 12).
    let client = (ticks(11) + ticks(12)) / 100.0;
    let info: String = redis::cmd("INFO").arg("cpu").query_async(con).await?;
    let server: f64 = info
        .lines()
        .filter(|l| l.starts_with("used_cpu_user:") || l.starts_with("used_cpu_sys:"))
        .filter_map(|l| {
            l.split_once(':')
                .and_then(|(_, v)| v.trim().parse::<f64>().ok())
        })
        .sum();
    Ok((client, server))
}

/// Redis' own accounting of the commands it ran since the last CONFIG
/// RESETSTAT (INFO commandstats): command -> (calls, microseconds), the
/// bench's own INFO and CONFIG left out.
async fn command_stats(
    con: &mut RedisConnection,
) -> Result<std::collections::BTreeMap<String, (u64, u64)>, Error> {
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(con)
        .await?;
    let mut out = std::collections::BTreeMap::new();
    for line in info.lines() {
        let Some((name, stats)) = line
            .strip_prefix("cmdstat_")
            .and_then(|l| l.split_once(':'))
        else {
            continue;
        };
        if name == "info" || name.starts_with("config") {
            continue;
        }
        let stat = |key: &str| {
            stats
                .split(',')
                .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0)
        };
        out.insert(name.to_owned(), (stat("calls"), stat("usec")));
    }
    Ok(out)
}

/// A phase's wall time and CPU use (client, Redis), in seconds, and what
/// Redis' commandstats say each command cost.
struct Phase {
    secs: f64,
    client_cpu: f64,
    redis_cpu: f64,
    commands: std::collections::BTreeMap<String, (u64, u64)>,
}

impl Phase {
    async fn start(con: &mut RedisConnection) -> Result<(Instant, (f64, f64)), Error> {
        let _: () = redis::cmd("CONFIG")
            .arg("RESETSTAT")
            .query_async(con)
            .await?;
        Ok((Instant::now(), cpu_seconds(con).await?))
    }

    async fn end(con: &mut RedisConnection, start: (Instant, (f64, f64))) -> Result<Self, Error> {
        let secs = start.0.elapsed().as_secs_f64();
        let (c, r) = cpu_seconds(con).await?;
        Ok(Self {
            secs,
            client_cpu: c - start.1 .0,
            redis_cpu: r - start.1 .1,
            commands: command_stats(con).await?,
        })
    }

    fn json(&self, events: f64) -> serde_json::Value {
        let per_event = |usec: u64| usec as f64 / events.max(1.0);
        let total: u64 = self.commands.values().map(|(_, usec)| usec).sum();
        let commands: serde_json::Map<String, serde_json::Value> = self
            .commands
            .iter()
            .map(|(name, (calls, usec))| {
                (
                    name.clone(),
                    serde_json::json!({ "calls": calls, "usecPerEvent": per_event(*usec) }),
                )
            })
            .collect();
        serde_json::json!({
            "secs": self.secs,
            "eventsPerSec": events / self.secs.max(1e-9),
            "clientCpuMicrosPerEvent": self.client_cpu * 1e6 / events.max(1.0),
            "redisCpuMicrosPerEvent": self.redis_cpu * 1e6 / events.max(1.0),
            "redisCommandMicrosPerEvent": per_event(total),
            "commands": commands,
        })
    }
}

async fn project(
    con: &RedisConnection,
    models: &RedisConnection,
    replicas: usize,
) -> Result<usize, Error> {
    let mut tasks = Vec::new();
    for r in 0..replicas {
        // A connection of its own per replica, as separate processes would have.
        let (con, models) = (con.clone(), models.clone());
        tasks.push(tokio::spawn(async move {
            let mut p = Projector::new(
                con,
                models,
                ProjectorOptions::new(format!("bench-{r}")),
                ProjectorMetrics::unregistered(),
            );
            p.run_until_idle().await.map(|r| r.events)
        }));
    }
    let mut applied = 0;
    for t in tasks {
        applied += t.await??;
    }
    Ok(applied)
}

#[tokio::main]
async fn main() -> Result<(), Error> {
    let mut args = std::env::args().skip(1);
    let url = args
        .next()
        .ok_or("usage: projection_bench REDIS_URL [N [BATCH]]")?;
    let n: u64 = args
        .next()
        .map(|a| a.parse())
        .transpose()?
        .unwrap_or(1_000_000);
    let per_entry: u64 = args.next().map(|a| a.parse()).transpose()?.unwrap_or(32);
    let args = RedisArgs {
        redis_timeout_ms: 30_000,
        ..RedisArgs::for_url(url)
    };
    let mut con = args.connect()?;
    // The read models in their own database, as the workers open them.
    let mut models = args.connect_read_models()?;
    // Where `projector --rebuild` builds them before swapping them in.
    let mut scratch = projector::connect_rebuild_database(&args, None)?;
    let id = PromotionId::new("bench", "projection")?;
    let stream = PromotionKeys::new(&id).events;
    let promotion = id.to_string();
    let now = Utc::now();

    let t = std::time::Instant::now();
    let mut batch = vec![Entry::Json(Event::PromotionStarted(PromotionStarted {
        promotion: promotion.clone(),
        discount: 0.8,
        number_of_coupons: n,
        publish_time: now,
        finish_time: now + Duration::hours(1),
        started_at: Some(now),
        shards: None,
    }))];
    let ms = now.timestamp_millis();
    let mut i = 0;
    while i < n {
        if per_entry == 0 {
            batch.push(Entry::Grab {
                customer: format!("c-{i}"),
                seq: i + 1,
                ms,
            });
            i += 1;
        } else {
            let upto = (i + per_entry).min(n);
            batch.push(Entry::Grabs {
                customers: (i..upto).map(|k| format!("c-{k}")).collect(),
                first: i + 1,
                ms,
            });
            i = upto;
        }
        if batch.len() == 2_000 {
            append(&mut con, &stream, &batch).await?;
            batch.clear();
        }
    }
    batch.push(Entry::Json(Event::PromotionFinished(PromotionFinished {
        promotion: promotion.clone(),
        reason: FinishReason::SoldOut,
        granted: n,
        finished_at: Some(now),
    })));
    append(&mut con, &stream, &batch).await?;
    let _: () = redis::cmd("SADD")
        .arg(PROMOTION_INDEX_KEY)
        .arg(&promotion)
        .query_async(&mut con)
        .await?;
    let events = n + 2;
    let entries = if per_entry == 0 {
        events
    } else {
        n.div_ceil(per_entry) + 2
    };
    let generate_secs = t.elapsed().as_secs_f64();

    // Raw read: XRANGE pages as large as the rebuild's, answers parsed into
    // redis values and nothing more (no decoding): the ceiling.
    let page = projector::REBUILD_PAGE;
    let started = Phase::start(&mut con).await?;
    let mut read = 0u64;
    let mut from = "-".to_owned();
    loop {
        let answer: redis::Value = redis::cmd("XRANGE")
            .arg(&stream)
            .arg(&from)
            .arg("+")
            .arg("COUNT")
            .arg(page)
            .query_async(&mut con)
            .await?;
        let redis::Value::Array(entries) = answer else {
            return Err("XRANGE answered something else than an array".into());
        };
        let last_id = match entries.last() {
            Some(redis::Value::Array(pair)) => match pair.first() {
                Some(redis::Value::BulkString(id)) => String::from_utf8(id.clone())?,
                _ => return Err("XRANGE entry without an id".into()),
            },
            Some(_) => return Err("XRANGE entry is not an array".into()),
            None => break,
        };
        read += entries.len() as u64;
        from = format!("({last_id}");
    }
    let xrange = Phase::end(&mut con, started).await?;
    if read != entries {
        return Err(format!("XRANGE read {read} of {entries} entries").into());
    }

    let started = Phase::start(&mut con).await?;
    let applied_one = project(&con, &models, 1).await?;
    let one = Phase::end(&mut con, started).await?;
    check(&mut models, &id, n).await?;

    reset(&mut con, &mut models, &stream).await?;
    let started = Phase::start(&mut con).await?;
    let applied_two = project(&con, &models, 2).await?;
    let two = Phase::end(&mut con, started).await?;
    check(&mut models, &id, n).await?;

    let started = Phase::start(&mut con).await?;
    let rebuilt = projector::rebuild(
        &mut con,
        &mut models,
        scratch.as_mut(),
        &ProjectorMetrics::unregistered(),
        page,
    )
    .await?;
    let rebuild = Phase::end(&mut con, started).await?;
    check(&mut models, &id, n).await?;

    let rate = |count: f64, phase: &Phase| count / phase.secs.max(1e-9);
    let xrange_rate = rate(events as f64, &xrange);
    let one_rate = rate(applied_one as f64, &one);
    let two_rate = rate(applied_two as f64, &two);
    let rebuild_rate = rate(rebuilt.applied as f64, &rebuild);
    let with = |mut v: serde_json::Value, extra: serde_json::Value| {
        if let (Some(o), Some(e)) = (v.as_object_mut(), extra.as_object()) {
            o.extend(e.clone());
        }
        v
    };
    println!(
        "{}",
        serde_json::json!({
            "events": events,
            "entries": entries,
            "grantsPerEntry": per_entry,
            "page": page,
            "generateSecs": generate_secs,
            "xrange": xrange.json(events as f64),
            "oneProjector": with(one.json(applied_one as f64), serde_json::json!({ "applied": applied_one, "ratioToXrange": one_rate / xrange_rate })),
            "twoProjectors": with(two.json(applied_two as f64), serde_json::json!({ "applied": applied_two, "ratioToXrange": two_rate / xrange_rate, "ratioToOne": two_rate / one_rate })),
            "rebuild": with(rebuild.json(rebuilt.applied as f64), serde_json::json!({ "applied": rebuilt.applied, "ratioToXrange": rebuild_rate / xrange_rate, "ratioToTarget100k": rebuild_rate / 100_000.0 })),
        })
    );
    Ok(())
}
