//! Read-side benchmark for `make bench` (docs/BENCHMARKS.md):
//!
//! 1. appends one PromotionStarted, `N` CouponGrabbed (distinct customers) and
//!    one PromotionFinished to one promotion stream (pipelined XADD of the
//!    events the scripts write, through the protocol's types),
//! 2. reads the whole stream raw with XRANGE (the ceiling: what any reader
//!    pays just to get the entries),
//! 3. projects it with one projector, then (read models dropped, group
//!    reset) with two projectors sharing the consumer group,
//! 4. rebuilds the read models from the stream (`projector --rebuild`),
//!
//! and prints one JSON object with the rates and their ratios. Every run
//! checks the read model it produced (granted = N, the last customer's coupon
//! present), so a fast wrong projection cannot pass.
//!
//! Usage: `cargo run --release -p seckill-workers --example projection_bench -- REDIS_URL [N]`

use std::time::Instant;

use chrono::{Duration, Utc};
use seckill_workers::projector::{self, Projector, ProjectorMetrics, ProjectorOptions};
use seckill_workers::protocol::{
    CouponGrabbed, CustomerId, Event, FinishReason, PromotionFinished, PromotionId, PromotionKeys,
    PromotionStarted, EVENT_FIELD, PROJECTOR_GROUP, PROMOTION_INDEX_KEY,
};
use seckill_workers::read_model;
use seckill_workers::redis_connection::{RedisArgs, RedisConnection};

type Error = Box<dyn std::error::Error + Send + Sync>;

async fn append(con: &mut RedisConnection, stream: &str, events: &[Event]) -> Result<(), Error> {
    let mut pipe = redis::pipe();
    for e in events {
        pipe.cmd("XADD")
            .arg(stream)
            .arg("*")
            .arg(EVENT_FIELD)
            .arg(e.encode())
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

async fn reset(con: &mut RedisConnection, stream: &str) -> Result<(), Error> {
    let _: () = redis::cmd("XGROUP")
        .arg("DESTROY")
        .arg(stream)
        .arg(PROJECTOR_GROUP)
        .query_async(con)
        .await?;
    // Drop the read models, so the next projectors start from nothing.
    let keys: Vec<String> = {
        let mut out = Vec::new();
        let mut cursor = 0u64;
        loop {
            let (next, page): (u64, Vec<String>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(format!(
                    "{}*",
                    seckill_workers::protocol::read_model::PREFIX
                ))
                .arg("COUNT")
                .arg(10_000)
                .query_async(con)
                .await?;
            out.extend(page);
            if next == 0 {
                break out;
            }
            cursor = next;
        }
    };
    read_model::drop_keys(con, &keys).await?;
    Ok(())
}

async fn project(con: &RedisConnection, replicas: usize) -> Result<usize, Error> {
    let mut tasks = Vec::new();
    for r in 0..replicas {
        // A connection of its own per replica, as separate processes would have.
        let con = con.clone();
        tasks.push(tokio::spawn(async move {
            let mut p = Projector::new(
                con,
                ProjectorOptions::new(format!("bench-{r}")),
                ProjectorMetrics::unregistered(),
            );
            p.run_until_idle().await.map(|r| r.applied)
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
    let url = args.next().ok_or("usage: projection_bench REDIS_URL [N]")?;
    let n: u64 = args
        .next()
        .map(|a| a.parse())
        .transpose()?
        .unwrap_or(1_000_000);
    let args = RedisArgs {
        redis_timeout_ms: 30_000,
        ..RedisArgs::for_url(url)
    };
    let mut con = args.connect()?;
    let id = PromotionId::new("bench", "projection")?;
    let stream = PromotionKeys::new(&id).events;
    let promotion = id.to_string();
    let now = Utc::now();

    let t = Instant::now();
    let mut batch = vec![Event::PromotionStarted(PromotionStarted {
        promotion: promotion.clone(),
        discount: 0.8,
        number_of_coupons: n,
        publish_time: now,
        finish_time: now + Duration::hours(1),
        started_at: Some(now),
    })];
    for i in 0..n {
        batch.push(Event::CouponGrabbed(CouponGrabbed {
            coupon_id: format!("{promotion}#{}", i + 1),
            promotion: promotion.clone(),
            customer_id: format!("c-{i}"),
            discount: 0.8,
            granted_at: now,
        }));
        if batch.len() == 2_000 {
            append(&mut con, &stream, &batch).await?;
            batch.clear();
        }
    }
    batch.push(Event::PromotionFinished(PromotionFinished {
        promotion: promotion.clone(),
        reason: FinishReason::SoldOut,
        granted: n,
        finished_at: Some(now),
    }));
    append(&mut con, &stream, &batch).await?;
    let _: () = redis::cmd("SADD")
        .arg(PROMOTION_INDEX_KEY)
        .arg(&promotion)
        .query_async(&mut con)
        .await?;
    let events = n + 2;
    let generate_secs = t.elapsed().as_secs_f64();

    // Raw read: XRANGE pages of 1,000, no decoding.
    let t = Instant::now();
    let mut read = 0u64;
    let mut from = "-".to_owned();
    loop {
        let page: redis::streams::StreamRangeReply = redis::cmd("XRANGE")
            .arg(&stream)
            .arg(&from)
            .arg("+")
            .arg("COUNT")
            .arg(1_000)
            .query_async(&mut con)
            .await?;
        let Some(last) = page.ids.last() else { break };
        read += page.ids.len() as u64;
        from = format!("({}", last.id);
    }
    let xrange_secs = t.elapsed().as_secs_f64();
    if read != events {
        return Err(format!("XRANGE read {read} of {events} entries").into());
    }

    let t = Instant::now();
    let applied_one = project(&con, 1).await?;
    let one_secs = t.elapsed().as_secs_f64();
    check(&mut con, &id, n).await?;

    reset(&mut con, &stream).await?;
    let t = Instant::now();
    let applied_two = project(&con, 2).await?;
    let two_secs = t.elapsed().as_secs_f64();
    check(&mut con, &id, n).await?;

    let t = Instant::now();
    let rebuilt = projector::rebuild(&mut con, &ProjectorMetrics::unregistered(), 1_000).await?;
    let rebuild_secs = t.elapsed().as_secs_f64();
    check(&mut con, &id, n).await?;

    let rate = |count: f64, secs: f64| count / secs.max(1e-9);
    let xrange = rate(read as f64, xrange_secs);
    let one = rate(applied_one as f64, one_secs);
    let two = rate(applied_two as f64, two_secs);
    let rebuild = rate(rebuilt.applied as f64, rebuild_secs);
    println!(
        "{}",
        serde_json::json!({
            "events": events,
            "generateSecs": generate_secs,
            "xrangeEventsPerSec": xrange,
            "oneProjector": { "applied": applied_one, "secs": one_secs, "eventsPerSec": one, "ratioToXrange": one / xrange },
            "twoProjectors": { "applied": applied_two, "secs": two_secs, "eventsPerSec": two, "ratioToXrange": two / xrange, "ratioToOne": two / one },
            "rebuild": { "applied": rebuilt.applied, "secs": rebuild_secs, "eventsPerSec": rebuild, "ratioToTarget100k": rebuild / 100_000.0 },
        })
    );
    Ok(())
}
