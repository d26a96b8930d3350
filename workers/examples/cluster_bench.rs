//! Grab throughput of one Redis beside a three-master Redis Cluster, in the
//! same run on the same machine: one hot promotion, then twenty promotions at
//! once (spread over the masters), then the durable grab (`WAIT 1`) on a
//! cluster with one replica per master.
//!
//! `cargo run --release -p seckill-workers --example cluster_bench [-- SECONDS TASKS]`
//! (defaults: 5 s per scenario, 128 concurrent tasks). Loopback only.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{TimeZone, Utc};
use seckill_testkit::redis_cluster::{RedisCluster, RedisClusterOptions};
use seckill_workers::protocol::{
    self, CustomerId, Durability, GrabOutcome, PromotionId, PromotionSpec,
};
use seckill_workers::redis_connection::{RedisArgs, RedisConnection};
use seckill_workers::redis_server::{RedisServer, RedisServerOptions};

/// Numbers the promotions so every scenario starts on fresh ones.
static SCENARIO: AtomicU64 = AtomicU64::new(0);

#[derive(Clone, Copy)]
enum Mode {
    Plain,
    Durable,
}

/// Grants per second over `duration` with `tasks` concurrent grabbers
/// spread over `promotions`.
async fn run(
    con: &RedisConnection,
    label: &str,
    promotions: usize,
    mode: Mode,
    duration: Duration,
    tasks: usize,
) -> f64 {
    let now = Utc::now().timestamp_millis();
    let spec = PromotionSpec {
        discount: 0.5,
        number_of_coupons: 100_000_000,
        publish_time: Utc.timestamp_millis_opt(now - 1000).unwrap(),
        finish_time: Utc.timestamp_millis_opt(now + 3_600_000).unwrap(),
    };
    let ids: Vec<PromotionId> = (0..promotions)
        .map(|i| {
            let scenario = SCENARIO.fetch_add(1, Ordering::Relaxed);
            PromotionId::new("bench", &format!("s{scenario}-{i}")).expect("promotion id")
        })
        .collect();
    for id in &ids {
        protocol::schedule(&mut con.clone(), id, &spec)
            .await
            .expect("schedule");
    }
    let ids = Arc::new(ids);
    let stop = Arc::new(AtomicBool::new(false));
    let granted = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let mut handles = Vec::new();
    for t in 0..tasks {
        let (mut con, ids, stop, granted, failed) = (
            con.clone(),
            ids.clone(),
            stop.clone(),
            granted.clone(),
            failed.clone(),
        );
        handles.push(tokio::spawn(async move {
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                let id = &ids[(t + n as usize) % ids.len()];
                let who = CustomerId::parse(&format!("t{t}-{n}")).expect("customer id");
                let ok = match mode {
                    Mode::Plain => matches!(
                        protocol::grab(&mut con, id, &who).await,
                        Ok(GrabOutcome::Granted { .. })
                    ),
                    Mode::Durable => matches!(
                        protocol::grab_durable(
                            &mut con,
                            id,
                            &who,
                            Durability {
                                replicas: 1,
                                timeout: Duration::from_millis(500)
                            }
                        )
                        .await,
                        Ok(GrabOutcome::Granted { .. })
                    ),
                };
                if ok {
                    granted.fetch_add(1, Ordering::Relaxed);
                } else {
                    failed.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    let started = Instant::now();
    tokio::time::sleep(duration).await;
    stop.store(true, Ordering::Relaxed);
    for h in handles {
        let _ = h.await;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let rate = granted.load(Ordering::Relaxed) as f64 / elapsed;
    println!(
        "{label:<34} promotions={promotions:<3} grants/s={rate:>9.0}  failed={}",
        failed.load(Ordering::Relaxed)
    );
    rate
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let secs: u64 = args.next().and_then(|a| a.parse().ok()).unwrap_or(5);
    let tasks: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(128);
    let duration = Duration::from_secs(secs);
    println!(
        "grab throughput, {secs} s per scenario, {tasks} concurrent tasks, {} CPUs, AOF off",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );

    let single = RedisServer::start(RedisServerOptions {
        appendfsync: None,
        ..RedisServerOptions::default()
    })?;
    let single_con = RedisArgs::for_url(single.url()).connect()?;
    let cluster = RedisCluster::start(RedisClusterOptions::default())?;
    let cluster_con = RedisArgs::for_cluster(cluster.seed_nodes()).connect()?;

    let s1 = run(
        &single_con,
        "single redis, one promotion",
        1,
        Mode::Plain,
        duration,
        tasks,
    )
    .await;
    let c1 = run(
        &cluster_con,
        "cluster 3 masters, one promotion",
        1,
        Mode::Plain,
        duration,
        tasks,
    )
    .await;
    let s20 = run(
        &single_con,
        "single redis, twenty",
        20,
        Mode::Plain,
        duration,
        tasks,
    )
    .await;
    let c20 = run(
        &cluster_con,
        "cluster 3 masters, twenty",
        20,
        Mode::Plain,
        duration,
        tasks,
    )
    .await;
    drop(cluster_con);
    drop(cluster);

    let replicated = RedisCluster::start(RedisClusterOptions {
        replicas_per_master: 1,
        ..RedisClusterOptions::default()
    })?;
    let replicated_con = RedisArgs::for_cluster(replicated.seed_nodes()).connect()?;
    let r20 = run(
        &replicated_con,
        "cluster 3+3 replicas, twenty",
        20,
        Mode::Plain,
        duration,
        tasks,
    )
    .await;
    let d20 = run(
        &replicated_con,
        "cluster 3+3, twenty, WAIT 1",
        20,
        Mode::Durable,
        duration,
        tasks,
    )
    .await;

    println!("ratio cluster/single, one promotion: {:.2}", c1 / s1);
    println!("ratio cluster/single, twenty:        {:.2}", c20 / s20);
    println!("ratio durable/plain (3+3), twenty:   {:.2}", d20 / r20);
    Ok(())
}
