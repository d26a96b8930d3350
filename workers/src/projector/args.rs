//! The flags of `seckill-worker projector` and the options of one replica
//! derived from them; every default is the flag's own (see [`crate::flags`]).

use std::time::Duration;

use crate::redis_connection::RedisArgs;

/// Flags of `seckill-worker projector`.
#[derive(clap::Args, Debug, Clone)]
pub struct ProjectorArgs {
    #[command(flatten)]
    pub redis: RedisArgs,

    /// Address of /healthz, /readyz and /metrics.
    #[arg(long, env = "SECKILL_METRICS_LISTEN", default_value = "0.0.0.0:9090")]
    pub metrics_listen: String,

    /// Name of this replica in the consumer group (default: $POD_NAME, else
    /// hostname-pid). A replica restarted under the same name first finishes
    /// the entries it held.
    #[arg(long, env = "SECKILL_CONSUMER_NAME")]
    pub consumer_name: Option<String>,

    /// Entries another replica has held unacknowledged this long (ms) are
    /// claimed and applied here.
    #[arg(long, env = "SECKILL_CLAIM_IDLE_MS", default_value_t = 30_000)]
    pub claim_idle_ms: u64,

    /// Rebuild the read models from every stream's start (aside, then swapped
    /// in: see --rebuild-db), and exit.
    #[arg(long, env = "SECKILL_REBUILD")]
    pub rebuild: bool,

    /// Logical database a rebuild builds the read models in before swapping
    /// it with theirs (SWAPDB), so that readers keep the old read models until
    /// the new ones are complete [default: --redis-read-model-db + 1]. Give it
    /// to nothing else: it is emptied before and after. Only used on a
    /// standalone Redis whose read models have a database of their own (and
    /// an ACL user allowed SWAPDB); otherwise they are rebuilt in place.
    #[arg(long, env = "SECKILL_REBUILD_DB")]
    pub rebuild_db: Option<i64>,

    /// Entries read per stream per round trip.
    #[arg(long, env = "SECKILL_BATCH_SIZE", default_value_t = 500)]
    pub batch_size: usize,

    /// Pause between polls when every stream is drained (ms).
    #[arg(long, env = "SECKILL_POLL_INTERVAL_MS", default_value_t = 50)]
    pub poll_interval_ms: u64,

    /// Test hook: wait this long (ms) between reading a batch and applying
    /// it, so a test can kill a replica while it holds pending entries.
    #[arg(
        long,
        env = "SECKILL_TEST_APPLY_DELAY_MS",
        default_value_t = 0,
        hide = true
    )]
    pub test_apply_delay_ms: u64,
}

impl Default for ProjectorArgs {
    fn default() -> Self {
        crate::flags::defaults()
    }
}

/// How often a replica re-reads the promotion index for new streams.
pub const DISCOVERY_INTERVAL: Duration = Duration::from_secs(1);

/// How a projector replica behaves.
#[derive(Debug, Clone)]
pub struct ProjectorOptions {
    /// Name in the consumer group; unique per replica.
    pub consumer: String,
    /// Entries idle this long in another replica's pending list are claimed.
    pub claim_idle: Duration,
    /// Entries read per stream per round trip.
    pub batch_size: usize,
    /// Pause between polls when there was nothing to apply.
    pub poll_interval: Duration,
    /// How often the promotion index is re-read for new streams.
    pub discovery_interval: Duration,
    /// Test hook: pause between reading and applying a batch.
    pub apply_delay: Duration,
}

impl ProjectorOptions {
    /// A replica named `consumer` with the flags' defaults.
    pub fn new(consumer: impl Into<String>) -> Self {
        Self::from_args(&ProjectorArgs::default(), consumer)
    }

    /// A replica named `consumer` as `args` say.
    pub fn from_args(args: &ProjectorArgs, consumer: impl Into<String>) -> Self {
        Self {
            consumer: consumer.into(),
            claim_idle: Duration::from_millis(args.claim_idle_ms),
            batch_size: args.batch_size.max(1),
            poll_interval: Duration::from_millis(args.poll_interval_ms.max(1)),
            discovery_interval: DISCOVERY_INTERVAL,
            apply_delay: Duration::from_millis(args.test_apply_delay_ms),
        }
    }
}

/// The default consumer name: `$POD_NAME`, else `hostname-pid`.
pub fn default_consumer_name() -> String {
    if let Ok(pod) = std::env::var("POD_NAME") {
        if !pod.is_empty() {
            return pod;
        }
    }
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "projector".to_owned());
    format!("{host}-{}", std::process::id())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_without_flags_take_the_flags_defaults() {
        let o = ProjectorOptions::new("r1");
        assert_eq!(o.consumer, "r1");
        assert_eq!(o.claim_idle, Duration::from_secs(30));
        assert_eq!(o.batch_size, 500);
        assert_eq!(o.poll_interval, Duration::from_millis(50));
        assert_eq!(o.apply_delay, Duration::ZERO);
        let a = ProjectorArgs::default();
        assert_eq!(a.metrics_listen, "0.0.0.0:9090");
        assert!(!a.rebuild);
        assert_eq!(a.redis.redis_timeout_ms, 1000);
    }
}
