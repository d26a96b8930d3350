//! `seckill-worker projector`: applies every promotion stream to the read
//! models through the consumer group [`crate::protocol::PROJECTOR_GROUP`], so that
//! several replicas share the streams and each entry is applied by one of
//! them at a time.
//!
//! Delivery is at least once: an entry is acknowledged only after its writes
//! to the read models succeeded, and a replica that died holding entries has
//! them claimed by the others (XAUTOCLAIM) once they are idle for
//! `--claim-idle-ms`. The read-model writes are idempotent and order-tolerant
//! (see [`crate::read_model`]), so redelivery and replicas applying in
//! different orders both converge to the same read model.
//!
//! An entry that does not decode (unknown type, newer version, malformed) is
//! skipped with a metric and a log line and is NOT acknowledged: it stays in
//! the group's pending list, visible (XPENDING) until a projector that knows
//! it is deployed. It never stops the projector.
//!
//! Throughput (docs/BENCHMARKS.md, "Read side"): a step reads the next
//! batch of every stream (XREADGROUP) while it decodes and applies the
//! current one, so Redis and this process work at the same time; a batch's
//! writes are one round trip, its XACK and the progress report another;
//! stream replies are read as raw values (no per-entry field map) and events
//! decoded without a JSON tree. Discovery, XPENDING and the Redis clock are refreshed once a
//! second, XAUTOCLAIM every quarter of `--claim-idle-ms`, not every step.
//!
//! A sharded promotion (issue 14) has a stream per stock shard; projectors
//! follow each of them once its shard map is locked (see `discovery`),
//! with a consumer group per stream as for any stream. Its read model counts
//! grants per shard (`lua/project.lua`), so it converges however the
//! shards' batches interleave.
//!
//! `--rebuild` replays all streams from the start with XRANGE into fresh
//! read models, built aside and swapped in on a standalone Redis (see
//! [`rebuild()`]), then exits. It leaves the consumer groups alone, so live
//! replicas may keep running: what they apply meanwhile is idempotent.
//!
//! Module map:
//! - [`args`]: the flags, and the options of one replica derived from them.
//! - [`metrics`]: what projectors report to Prometheus.
//! - [`entries`]: raw reply decoding (stream entries without a field map)
//!   and an entry's event, or why it is skipped.
//! - `discovery`: which streams a promotion has (one, or one per shard).
//! - [`group`]: the consumer-group loop of one replica ([`Projector`]).
//! - [`rebuild`](mod@rebuild): the replay of every stream into fresh read models.
//! - [`run`] (here): the role, from its flags to a running replica or a
//!   rebuild, with /healthz, /readyz and /metrics served beside it.

pub mod args;
mod discovery;
pub mod entries;
pub mod group;
pub mod metrics;
pub mod rebuild;

use std::time::{Duration, Instant};

pub use args::{default_consumer_name, ProjectorArgs, ProjectorOptions};
pub use entries::{entries_of, RawEntry};
pub use group::{Projector, StepReport};
pub use metrics::{EventTypeLabels, ProjectorMetrics, SkipKindLabels, LAG_BUCKETS};
pub use rebuild::{
    connect_rebuild_database, rebuild, upgrade_layout, LayoutUpgrade, RebuildReport, REBUILD_PAGE,
};

use crate::http::{self, Apis, HealthApi, ServerLimitArgs};
use crate::metrics::WorkerMetrics;
use crate::read_model::ReadModelError;
use crate::redis_connection::RedisSetupError;

/// The projector failed in a way it cannot continue from.
#[derive(Debug, thiserror::Error)]
pub enum ProjectorError {
    #[error("redis setup: {0}")]
    Setup(#[from] RedisSetupError),
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("read model: {0}")]
    ReadModel(#[from] ReadModelError),
    #[error("shard map: {0}")]
    Shards(#[from] crate::protocol::shards::ShardError),
    #[error("http: {0}")]
    Http(#[from] http::HttpError),
    #[error("--rebuild-db {0} must be a database of its own, neither the streams' nor the read models' (--redis-read-model-db)")]
    RebuildDatabase(i64),
}

/// Runs the role until SIGTERM (or, with `--rebuild`, until the replay ends).
pub async fn run(args: ProjectorArgs) -> Result<(), ProjectorError> {
    let con = args.redis.connect()?;
    let models = args.redis.connect_read_models()?;
    let worker_metrics = WorkerMetrics::new();
    let metrics = ProjectorMetrics::register(&worker_metrics.registry);
    if args.rebuild {
        let (mut con, mut models) = (con, models);
        let mut scratch = connect_rebuild_database(&args.redis, args.rebuild_db)?;
        let started = Instant::now();
        let report = rebuild(
            &mut con,
            &mut models,
            scratch.as_mut(),
            &metrics,
            args.batch_size.max(REBUILD_PAGE),
        )
        .await?;
        tracing::info!(?report, took = ?started.elapsed(), "read models rebuilt");
        return Ok(());
    }
    let consumer = args
        .consumer_name
        .clone()
        .unwrap_or_else(default_consumer_name);
    let options = ProjectorOptions::from_args(&args, consumer);
    let shutdown = http::shutdown_on_signal();
    let listener = http::bind(&args.metrics_listen).await?;
    let health = HealthApi::new(
        con.clone(),
        args.redis.timeout(),
        worker_metrics.registry.clone(),
    )
    .with_redis_metrics(worker_metrics.redis.clone());
    let limits = ServerLimitArgs::from_env_or_defaults()?
        .limits(Duration::from_secs(5), Some(worker_metrics.http.clone()));
    let app = Apis::health(health).router(&limits);
    let server = {
        let shutdown = shutdown.clone();
        tokio::spawn(async move { http::serve(listener, app, &limits, shutdown).await })
    };
    Projector::new(con, models, options, metrics)
        .run(shutdown.clone())
        .await;
    shutdown.cancel();
    match server.await {
        Ok(r) => r?,
        Err(e) => tracing::warn!(error = %e, "metrics server task failed"),
    }
    Ok(())
}
