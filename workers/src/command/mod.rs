//! The command side: `POST /api/v1/promotions/{namespace}/{name}/grab`.
//!
//! Grabs of one promotion share Redis round trips (the group commit): one
//! `FCALL seckill_v3_grab` per batch decides everything atomically on Redis'
//! clock: stock, one coupon per customer, the window. The worker only
//! validates input, maps each customer's answer to HTTP, and remembers what
//! saves Redis a round trip.
//!
//! A promotion sharded over S shards (issue 14) has a lane per home shard:
//! a batch is one shard's customers, one `FCALL seckill_v3_shard_grab` on
//! one slot, plus the stock moves and the sold-out check of
//! `protocol::shards` when that shard runs dry. Its answers are put in the
//! unsharded terms, so the HTTP contract does not depend on S.
//!
//! | module | holds |
//! |---|---|
//! | [`request`] | parsing a grab (pure, property-tested and fuzzed) |
//! | [`memory`] | the promotions remembered over or unknown, and the 410 |
//! | [`holders`] | who holds a coupon of a promotion that is over |
//! | [`group_commit`] | grabs of one promotion (one home shard) batched into one Redis call |
//! | [`shard_maps`] | each promotion's shard map, read once (S = 1 when it has none) |
//! | [`sharded`] | a batch of a sharded promotion, its answers in the unsharded terms |
//! | [`handler`] | [`CommandApi`] and the [`grab`] handler |
//! | this one | the flags of `seckill-worker command` and [`run`] |
//!
//! Optional, off by default: a rate limit per client (429 before any Redis
//! call, see [`crate::rate_limit`]) and durable grabs
//! (`--durable-replicas`: a grant is answered 200 only once replicas hold
//! it, else 503 "maybe recorded, retry").

pub mod group_commit;
pub mod handler;
pub mod holders;
pub mod memory;
pub mod replica_acks;
pub mod request;
pub mod shard_maps;
pub mod sharded;
pub mod sold_out_lane;

use std::time::Duration;

pub use handler::{grab, CommandApi, CommandOptions, DEFAULT_BATCH_MAX};
pub use request::{grab_customer, parse_grab, GrabRequest};

use crate::http::customer_header::CustomerIdHeaderArgs;
use crate::http::{self, Apis, HealthApi, ServerLimitArgs};
use crate::metrics::{CommandMetrics, WorkerMetrics};
use crate::protocol::shards::FINISH_SKEW_WAIT;
use crate::query::{QueryApi, QueryOptions};
use crate::rate_limit::RateLimitArgs;
use crate::redis_connection::{DurableArgs, DurableTimeoutError, RedisArgs, RedisSetupError};

/// Flags of `seckill-worker command`.
#[derive(clap::Args, Debug, Clone)]
pub struct CommandArgs {
    /// Address to serve HTTP on (API, /healthz, /readyz, /metrics).
    #[arg(long, env = "SECKILL_LISTEN", default_value = "0.0.0.0:8080")]
    pub listen: String,

    #[command(flatten)]
    pub customer: CustomerIdHeaderArgs,

    /// Do not mount the query endpoints on this server.
    #[arg(long, env = "SECKILL_NO_QUERY")]
    pub no_query: bool,

    /// After SIGTERM, in-flight requests get this many seconds to finish.
    #[arg(long, env = "SECKILL_DRAIN_TIMEOUT_SECS", default_value_t = 20)]
    pub drain_timeout_secs: u64,

    #[command(flatten)]
    pub redis: RedisArgs,

    #[command(flatten)]
    pub durable: DurableArgs,

    #[command(flatten)]
    pub batch: GrabBatchArgs,

    #[command(flatten)]
    pub shards: ShardGrabArgs,

    #[command(flatten)]
    pub rate_limit: RateLimitArgs,

    #[command(flatten)]
    pub limits: ServerLimitArgs,
}

impl CommandArgs {
    /// How the grab endpoint behaves, as these flags say.
    pub fn options(&self) -> Result<CommandOptions, CommandError> {
        let redis_timeout = self.redis.timeout();
        Ok(CommandOptions {
            customer_id_header: self.customer.customer_id_header.clone(),
            redis_timeout,
            durability: self.durable.durability(redis_timeout)?,
            batch_max: self.batch.grab_batch_max as usize,
            finish_skew_wait: self.shards.finish_skew_wait(),
        })
    }
}

/// Flags of the group commit (see [`group_commit`]).
#[derive(clap::Args, Debug, Clone)]
pub struct GrabBatchArgs {
    /// Most grabs of one promotion sent to Redis in one call: grabs that
    /// arrive while a call of their promotion is in flight go together in
    /// the next one (a lone grab is sent at once). 1 = no batching.
    #[arg(long, env = "SECKILL_GRAB_BATCH_MAX", default_value_t = DEFAULT_BATCH_MAX as u64,
          value_parser = clap::value_parser!(u64).range(1..=4096))]
    pub grab_batch_max: u64,
}

/// Flags of the grabs of sharded promotions (`spec.shards` > 1).
#[derive(clap::Args, Debug, Clone)]
pub struct ShardGrabArgs {
    /// When a shard's clock has passed a sharded promotion's finish time
    /// but shard 0's (the one that records PromotionFinished) has not yet
    /// (each master has its own clock), its customers wait up to this long
    /// for the finish to be recorded and are then answered 410; past it they
    /// get a 503 to retry, counted by seckill_grab_finish_clock_skew_total.
    /// Raise it when that counter moves (masters' clocks further apart than
    /// NTP keeps them); 0 answers 503 at once.
    #[arg(long, env = "SECKILL_FINISH_SKEW_WAIT_MS", default_value_t = FINISH_SKEW_WAIT.as_millis() as u64,
          value_parser = clap::value_parser!(u64).range(0..=60_000))]
    pub finish_skew_wait_ms: u64,
}

impl ShardGrabArgs {
    pub fn finish_skew_wait(&self) -> Duration {
        Duration::from_millis(self.finish_skew_wait_ms)
    }
}

/// The command role could not start or serve.
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    #[error(transparent)]
    Redis(#[from] RedisSetupError),
    #[error(transparent)]
    Http(#[from] http::HttpError),
    #[error(transparent)]
    DurableTimeout(#[from] DurableTimeoutError),
}

/// Runs the command role until SIGTERM or Ctrl-C, then drains and returns.
pub async fn run(args: CommandArgs) -> Result<(), CommandError> {
    let redis = args.redis.connect()?;
    crate::protocol::functions::load_at_setup(redis.clone());
    let metrics = WorkerMetrics::new();
    tracing::info!(redis = %args.redis.describe(), listen = %args.listen, "starting the command role");

    let options = args.options()?;
    if let Some(d) = options.durability {
        tracing::info!(replicas = d.replicas, timeout = ?d.timeout, "durable grabs: a grant is answered only once replicas hold it");
    }
    let command = CommandApi::new(redis.clone(), options)
        .with_rate_limit(&args.rate_limit)
        .with_metrics(
            metrics.redis.clone(),
            CommandMetrics::register(&metrics.registry),
        );
    let query = if args.no_query {
        None
    } else {
        let options = QueryOptions {
            customer_id_header: args.customer.customer_id_header.clone(),
            redis_timeout: args.redis.timeout(),
        };
        let read_models = args.redis.connect_read_models()?;
        Some(QueryApi::new(read_models, options).with_redis_metrics(metrics.redis.clone()))
    };
    let health = HealthApi::new(redis, args.redis.timeout(), metrics.registry.clone())
        .with_redis_metrics(metrics.redis.clone());
    let limits = args.limits.limits(
        Duration::from_secs(args.drain_timeout_secs),
        Some(metrics.http),
    );
    let app = Apis {
        command: Some(command),
        query,
        health,
    }
    .router(&limits);

    let listener = http::bind(&args.listen).await?;
    http::serve(listener, app, &limits, http::shutdown_on_signal()).await?;
    tracing::info!("command role stopped");
    Ok(())
}
