//! `seckill-worker projector`: applies every promotion stream to the read
//! models through the consumer group [`protocol::PROJECTOR_GROUP`], so that
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
//! `--rebuild` drops every read-model key and replays all streams from the
//! start with XRANGE (leaving the consumer groups alone, so live replicas may
//! keep running: what they apply meanwhile is idempotent), then exits.

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use redis::aio::ConnectionLike;
use redis::streams::{StreamAutoClaimReply, StreamId, StreamRangeReply, StreamReadReply};
use redis::Value;
use tokio_util::sync::CancellationToken;

use crate::http::{self, HealthApi, ServerLimits};
use crate::metrics::{MetricsRegistry, WorkerMetrics};
use crate::protocol::{
    self, DecodeError, Event, PromotionId, PromotionKeys, EVENT_FIELD, PROJECTOR_GROUP,
    PROMOTION_INDEX_KEY,
};
use crate::read_model::{self, ProjectionError, ReadModelError};
use crate::redis_connection::{RedisArgs, RedisConnection, RedisSetupError};

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

    /// Drop every read model, replay all streams from the start, and exit.
    #[arg(long, env = "SECKILL_REBUILD")]
    pub rebuild: bool,

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

/// The projector failed in a way it cannot continue from.
#[derive(Debug, thiserror::Error)]
pub enum ProjectorError {
    #[error("redis setup: {0}")]
    Setup(#[from] RedisSetupError),
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("read model: {0}")]
    ReadModel(#[from] ReadModelError),
    #[error("http: {0}")]
    Http(#[from] http::HttpError),
}

/// Bucket bounds of `projector_lag_seconds`, in seconds.
pub const LAG_BUCKETS: [f64; 18] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.5, 1.0, 2.5, 5.0, 10.0,
    30.0, 60.0,
];

/// Labels by event type.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EventTypeLabels {
    pub r#type: &'static str,
}

/// Labels by why an entry was skipped.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SkipKindLabels {
    pub kind: &'static str,
}

/// What projectors report; registered into the process' shared registry.
#[derive(Clone, Debug)]
pub struct ProjectorMetrics {
    pub applied: Family<EventTypeLabels, Counter>,
    pub lag: Histogram,
    pub pending: Gauge,
    pub reclaimed: Counter,
    pub decode_failures: Family<SkipKindLabels, Counter>,
}

impl ProjectorMetrics {
    /// Creates the projector metrics and registers them into `registry`.
    pub fn register(registry: &MetricsRegistry) -> Self {
        let m = Self {
            applied: Family::default(),
            // XADD to applied; fine around the 250 ms lag target so that a
            // p99 can be read off the buckets.
            lag: Histogram::new(LAG_BUCKETS.iter().copied()),
            pending: Gauge::default(),
            reclaimed: Counter::default(),
            decode_failures: Family::default(),
        };
        registry.register(
            "projector_events_applied",
            "Events applied to the read models, by type (redeliveries included)",
            m.applied.clone(),
        );
        registry.register(
            "projector_lag_seconds",
            "Time from an event's XADD to its application to the read models",
            m.lag.clone(),
        );
        registry.register(
            "projector_pending_entries",
            "Entries delivered to some projector and not acknowledged, over all streams",
            m.pending.clone(),
        );
        registry.register(
            "projector_reclaimed_entries",
            "Entries claimed from a projector that held them idle too long",
            m.reclaimed.clone(),
        );
        registry.register(
            "projector_decode_failures",
            "Entries skipped (left pending) because they could not be decoded or projected, by kind",
            m.decode_failures.clone(),
        );
        m
    }

    /// Metrics registered into a throwaway registry (tests, tools).
    pub fn unregistered() -> Self {
        Self::register(&MetricsRegistry::new())
    }
}

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
    pub fn new(consumer: impl Into<String>) -> Self {
        Self {
            consumer: consumer.into(),
            claim_idle: Duration::from_secs(30),
            batch_size: 500,
            poll_interval: Duration::from_millis(50),
            discovery_interval: Duration::from_secs(1),
            apply_delay: Duration::ZERO,
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

/// Where this replica stands on one stream.
#[derive(Debug)]
struct StreamCursor {
    id: PromotionId,
    stream: String,
    /// The consumer group is known to exist.
    group_ready: bool,
    /// While `Some`, this replica re-reads its own pending entries from that
    /// id (after a restart under the same name, or a failed apply) before
    /// taking new ones with `>`.
    own_pending_from: Option<String>,
    /// XAUTOCLAIM cursor, so that entries left pending on purpose
    /// (undecodable) do not hide the ones behind them.
    claim_from: String,
}

/// What one [`Projector::step`] did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct StepReport {
    /// Entries applied and acknowledged.
    pub applied: usize,
    /// Entries skipped and left pending.
    pub skipped: usize,
    /// Entries read by XREADGROUP (own pending re-reads included).
    pub read: usize,
    /// Entries claimed from other consumers (not counting ones already
    /// known to be unappliable).
    pub claimed: usize,
}

/// One projector replica.
pub struct Projector {
    con: RedisConnection,
    options: ProjectorOptions,
    metrics: ProjectorMetrics,
    streams: BTreeMap<PromotionId, StreamCursor>,
    /// Entries already reported as skipped by this process (reported once).
    skipped: HashSet<(String, String)>,
    last_discovery: Option<Instant>,
    last_claim: Option<Instant>,
    last_progress: Option<Instant>,
    ready: Arc<AtomicBool>,
}

/// An entry id's XADD time, epoch ms.
fn entry_ms(id: &str) -> Option<i64> {
    id.split_once('-').map_or(id, |(ms, _)| ms).parse().ok()
}

/// Decodes one entry as the projector needs it.
fn decode_entry(entry: &StreamId) -> Result<Event, SkipReason> {
    let event = match entry.map.get(EVENT_FIELD) {
        Some(Value::BulkString(bytes)) => Event::decode(bytes).map_err(SkipReason::Decode)?,
        Some(Value::SimpleString(s)) => Event::decode(s.as_bytes()).map_err(SkipReason::Decode)?,
        _ => return Err(SkipReason::Decode(DecodeError::MissingField)),
    };
    read_model::check(&event).map_err(SkipReason::Project)?;
    Ok(event)
}

#[derive(Debug, thiserror::Error)]
enum SkipReason {
    #[error("{0}")]
    Decode(DecodeError),
    #[error("{0}")]
    Project(ProjectionError),
}

impl SkipReason {
    fn kind(&self) -> &'static str {
        match self {
            Self::Decode(e) => e.kind(),
            Self::Project(e) => e.kind(),
        }
    }
}

fn code_of(e: &redis::RedisError) -> Option<&str> {
    e.code()
}

impl Projector {
    pub fn new(con: RedisConnection, options: ProjectorOptions, metrics: ProjectorMetrics) -> Self {
        Self {
            con,
            options,
            metrics,
            streams: BTreeMap::new(),
            skipped: HashSet::new(),
            last_discovery: None,
            last_claim: None,
            last_progress: None,
            ready: Arc::new(AtomicBool::new(false)),
        }
    }

    /// True once the last step reached Redis.
    pub fn ready_flag(&self) -> Arc<AtomicBool> {
        self.ready.clone()
    }

    pub fn consumer(&self) -> &str {
        &self.options.consumer
    }

    /// Runs until `shutdown` is cancelled. Redis failures are logged and
    /// retried with a pause; the projector never gives up on its own.
    pub async fn run(mut self, shutdown: CancellationToken) {
        tracing::info!(consumer = %self.options.consumer, "projector started");
        let mut backoff = self.options.poll_interval;
        while !shutdown.is_cancelled() {
            let pause = match self.step().await {
                Ok(report) => {
                    self.ready.store(true, Ordering::Relaxed);
                    backoff = self.options.poll_interval;
                    // Claimed entries already known to be unappliable are
                    // not progress: do not spin on them.
                    if report.read + report.claimed > 0 {
                        Duration::ZERO
                    } else {
                        self.options.poll_interval
                    }
                }
                Err(e) => {
                    self.ready.store(false, Ordering::Relaxed);
                    tracing::warn!(error = %e, "projection step failed; retrying");
                    self.forget_groups();
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                    backoff
                }
            };
            if !pause.is_zero() {
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tokio::time::sleep(pause) => {}
                }
            }
        }
        let _ = read_model::forget_progress(&mut self.con, &self.options.consumer).await;
        tracing::info!(consumer = %self.options.consumer, "projector stopped");
    }

    /// After an error (Redis restarted, a stream deleted) the groups may be
    /// gone and entries may have been delivered but not applied: recreate
    /// the groups and re-read this replica's own pending entries.
    fn forget_groups(&mut self) {
        for cursor in self.streams.values_mut() {
            cursor.group_ready = false;
            cursor.own_pending_from = Some("0".to_owned());
        }
    }

    /// Applies whatever is waiting until a step finds nothing; for tests and
    /// tools. Returns the totals.
    pub async fn run_until_idle(&mut self) -> Result<StepReport, ProjectorError> {
        let mut total = StepReport::default();
        loop {
            // Force discovery and claiming on every step.
            self.last_discovery = None;
            self.last_claim = None;
            let rereading = self.streams.is_empty()
                || self.streams.values().any(|c| c.own_pending_from.is_some());
            let r = self.step().await?;
            total.applied += r.applied;
            total.skipped += r.skipped;
            total.claimed += r.claimed;
            total.read += r.read;
            let rereading =
                rereading || self.streams.values().any(|c| c.own_pending_from.is_some());
            if r.read == 0 && r.claimed == 0 && r.applied == 0 && !rereading {
                return Ok(total);
            }
        }
    }

    /// One round: discover new streams (at most once per discovery
    /// interval), claim idle entries of others (at most every claim check),
    /// read and apply a batch per stream, acknowledge, report progress.
    pub async fn step(&mut self) -> Result<StepReport, ProjectorError> {
        let due =
            |last: Option<Instant>, every: Duration| last.is_none_or(|t| t.elapsed() >= every);
        if due(self.last_discovery, self.options.discovery_interval) {
            self.discover().await?;
            self.last_discovery = Some(Instant::now());
        }
        self.ensure_groups().await?;
        let now_ms = read_model::redis_now_ms(&mut self.con).await?;
        let mut report = StepReport::default();
        let mut max_lag_ms = 0i64;
        let claim_every =
            (self.options.claim_idle / 4).clamp(Duration::from_millis(20), Duration::from_secs(5));
        if due(self.last_claim, claim_every) {
            let (claimed, fresh) = self.claim().await?;
            self.last_claim = Some(Instant::now());
            report.claimed += fresh;
            for (id, entries) in claimed {
                let r = self
                    .apply_entries(&id, entries, now_ms, &mut max_lag_ms)
                    .await?;
                report.applied += r.0;
                report.skipped += r.1;
            }
        }
        let batches = self.read().await?;
        if !batches.is_empty() && !self.options.apply_delay.is_zero() {
            tokio::time::sleep(self.options.apply_delay).await;
        }
        for (id, entries) in batches {
            report.read += entries.len();
            let r = self
                .apply_entries(&id, entries, now_ms, &mut max_lag_ms)
                .await?;
            report.applied += r.0;
            report.skipped += r.1;
        }
        let idle_report_due = due(self.last_progress, Duration::from_secs(1));
        if report.applied > 0 || idle_report_due {
            read_model::record_progress(&mut self.con, &self.options.consumer, max_lag_ms, now_ms)
                .await?;
            self.last_progress = Some(Instant::now());
        }
        Ok(report)
    }

    /// Re-reads the promotion index; a new promotion gets a cursor.
    async fn discover(&mut self) -> Result<(), ProjectorError> {
        let ids: Vec<String> = redis::cmd("SMEMBERS")
            .arg(PROMOTION_INDEX_KEY)
            .query_async(&mut self.con)
            .await?;
        for raw in ids {
            let Ok(id) = PromotionId::parse(&raw) else {
                tracing::warn!(promotion = %raw, "promotion index holds an invalid id; ignored");
                continue;
            };
            if !self.streams.contains_key(&id) {
                tracing::info!(promotion = %id, "projecting a new promotion stream");
                let stream = PromotionKeys::new(&id).events;
                self.streams.insert(
                    id.clone(),
                    StreamCursor {
                        id,
                        stream,
                        group_ready: false,
                        own_pending_from: Some("0".to_owned()),
                        claim_from: "0-0".to_owned(),
                    },
                );
            }
        }
        self.update_pending_gauge().await
    }

    async fn update_pending_gauge(&mut self) -> Result<(), ProjectorError> {
        let ready: Vec<&StreamCursor> = self.streams.values().filter(|c| c.group_ready).collect();
        if ready.is_empty() {
            return Ok(());
        }
        let commands = ready
            .iter()
            .map(|c| {
                let mut cmd = redis::cmd("XPENDING");
                cmd.arg(&c.stream).arg(PROJECTOR_GROUP);
                cmd
            })
            .collect();
        let summaries: Vec<Value> = self.con.query_each(commands).await?;
        let total: i64 = summaries
            .iter()
            .map(|v| match v {
                Value::Array(items) => match items.first() {
                    Some(Value::Int(n)) => *n,
                    _ => 0,
                },
                _ => 0,
            })
            .sum();
        self.metrics.pending.set(total);
        Ok(())
    }

    /// Creates the consumer group of every stream not known to have one
    /// (from 0, so nothing appended before is missed; an existing group is
    /// left as it is).
    async fn ensure_groups(&mut self) -> Result<(), ProjectorError> {
        for cursor in self.streams.values_mut().filter(|c| !c.group_ready) {
            let created: redis::RedisResult<()> = redis::cmd("XGROUP")
                .arg("CREATE")
                .arg(&cursor.stream)
                .arg(PROJECTOR_GROUP)
                .arg("0")
                .arg("MKSTREAM")
                .exec_async(&mut self.con)
                .await;
            match created {
                Ok(()) => {}
                Err(e) if code_of(&e) == Some("BUSYGROUP") => {}
                Err(e) => return Err(e.into()),
            }
            cursor.group_ready = true;
        }
        Ok(())
    }

    /// XAUTOCLAIM on every stream: entries idle past `claim_idle` become
    /// ours. Returns them with how many were not already known to be
    /// unappliable (those keep being claimed back and forth, harmlessly).
    async fn claim(
        &mut self,
    ) -> Result<(Vec<(PromotionId, Vec<StreamId>)>, usize), ProjectorError> {
        if self.streams.is_empty() {
            return Ok((Vec::new(), 0));
        }
        let commands = self
            .streams
            .values()
            .map(|c| {
                let mut cmd = redis::cmd("XAUTOCLAIM");
                cmd.arg(&c.stream)
                    .arg(PROJECTOR_GROUP)
                    .arg(&self.options.consumer)
                    .arg(self.options.claim_idle.as_millis() as u64)
                    .arg(&c.claim_from)
                    .arg("COUNT")
                    .arg(self.options.batch_size.max(1));
                cmd
            })
            .collect();
        let replies: Vec<StreamAutoClaimReply> = self.con.query_each(commands).await?;
        let mut out = Vec::new();
        let mut total_fresh = 0;
        for (cursor, reply) in self.streams.values_mut().zip(replies) {
            cursor.claim_from = reply.next_stream_id.clone();
            let fresh = reply
                .claimed
                .iter()
                .filter(|e| {
                    !self
                        .skipped
                        .contains(&(cursor.stream.clone(), e.id.clone()))
                })
                .count();
            if fresh > 0 {
                total_fresh += fresh;
                self.metrics.reclaimed.inc_by(fresh as u64);
                tracing::info!(promotion = %cursor.id, entries = fresh, consumer = %self.options.consumer,
                    "claimed entries another projector held idle");
            }
            if !reply.claimed.is_empty() {
                out.push((cursor.id.clone(), reply.claimed));
            }
        }
        Ok((out, total_fresh))
    }

    /// One XREADGROUP per stream, pipelined: this replica's own pending
    /// entries first when it has to re-read them, new entries otherwise.
    async fn read(&mut self) -> Result<Vec<(PromotionId, Vec<StreamId>)>, ProjectorError> {
        if self.streams.is_empty() {
            return Ok(Vec::new());
        }
        let commands = self
            .streams
            .values()
            .map(|c| {
                let mut cmd = redis::cmd("XREADGROUP");
                cmd.arg("GROUP")
                    .arg(PROJECTOR_GROUP)
                    .arg(&self.options.consumer)
                    .arg("COUNT")
                    .arg(self.options.batch_size.max(1))
                    .arg("STREAMS")
                    .arg(&c.stream)
                    .arg(c.own_pending_from.as_deref().unwrap_or(">"));
                cmd
            })
            .collect();
        let replies: Vec<Option<StreamReadReply>> = match self.con.query_each(commands).await {
            Ok(r) => r,
            Err(e) if code_of(&e) == Some("NOGROUP") => {
                tracing::warn!(error = %e, "a consumer group is gone (Redis lost data?); recreating");
                self.forget_groups();
                return Ok(Vec::new());
            }
            Err(e) => return Err(e.into()),
        };
        let mut out = Vec::new();
        for (cursor, reply) in self.streams.values_mut().zip(replies) {
            let entries: Vec<StreamId> = reply
                .map(|r| r.keys.into_iter().flat_map(|k| k.ids).collect())
                .unwrap_or_default();
            if cursor.own_pending_from.is_some() {
                cursor.own_pending_from = entries.last().map(|e| e.id.clone());
            }
            if !entries.is_empty() {
                out.push((cursor.id.clone(), entries));
            }
        }
        Ok(out)
    }

    /// Decodes, applies and acknowledges the entries of one stream; the
    /// undecodable ones are reported and left pending. Returns (applied,
    /// skipped).
    async fn apply_entries(
        &mut self,
        id: &PromotionId,
        entries: Vec<StreamId>,
        now_ms: i64,
        max_lag_ms: &mut i64,
    ) -> Result<(usize, usize), ProjectorError> {
        let stream = PromotionKeys::new(id).events;
        let mut events = Vec::with_capacity(entries.len());
        let mut ack = Vec::with_capacity(entries.len());
        let mut skipped = 0;
        for entry in &entries {
            match decode_entry(entry) {
                Ok(event) => {
                    events.push(event);
                    ack.push(entry.id.clone());
                }
                Err(reason) => {
                    skipped += 1;
                    if self.skipped.insert((stream.clone(), entry.id.clone())) {
                        self.metrics
                            .decode_failures
                            .get_or_create(&SkipKindLabels {
                                kind: reason.kind(),
                            })
                            .inc();
                        tracing::warn!(promotion = %id, entry = %entry.id, kind = reason.kind(), error = %reason,
                            "skipping an entry this projector cannot apply; it stays pending");
                    }
                }
            }
        }
        if events.is_empty() {
            return Ok((0, skipped));
        }
        if let Err(e) = read_model::apply(&mut self.con, id, &events).await {
            // Nothing acknowledged: re-read our own pending entries next time.
            if let Some(c) = self.streams.get_mut(id) {
                c.own_pending_from = Some("0".to_owned());
            }
            return Err(e.into());
        }
        let mut xack = redis::cmd("XACK");
        xack.arg(&stream).arg(PROJECTOR_GROUP).arg(&ack);
        xack.exec_async(&mut self.con).await?;
        for (event, entry_id) in events.iter().zip(&ack) {
            self.metrics
                .applied
                .get_or_create(&EventTypeLabels {
                    r#type: event.type_name(),
                })
                .inc();
            if let Some(ms) = entry_ms(entry_id) {
                let lag = (now_ms - ms).max(0);
                *max_lag_ms = (*max_lag_ms).max(lag);
                self.metrics.lag.observe(lag as f64 / 1000.0);
            }
        }
        Ok((events.len(), skipped))
    }
}

/// What a rebuild did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct RebuildReport {
    pub keys_dropped: u64,
    pub streams: usize,
    pub applied: usize,
    pub skipped: usize,
}

/// Drops every read-model key and replays every indexed stream from the
/// start. Safe while live projectors run: the keys are dropped before the
/// replay reads each stream, so an event applied live before the drop is
/// replayed, and one applied live after it is idempotent.
pub async fn rebuild(
    con: &mut RedisConnection,
    metrics: &ProjectorMetrics,
    batch_size: usize,
) -> Result<RebuildReport, ProjectorError> {
    let mut raw_ids: Vec<String> = redis::cmd("SMEMBERS")
        .arg(PROMOTION_INDEX_KEY)
        .query_async(con)
        .await?;
    raw_ids.sort();
    let ids: Vec<PromotionId> = raw_ids
        .iter()
        .filter_map(|r| PromotionId::parse(r).ok())
        .collect();
    let mut report = RebuildReport {
        streams: ids.len(),
        ..RebuildReport::default()
    };
    report.keys_dropped = if con.is_cluster() {
        // SCAN reaches one node of a cluster; the read-model keys that can
        // exist are known from the index and the streams instead.
        let keys = cluster_read_model_keys(con, &ids, batch_size).await?;
        read_model::drop_keys(con, &keys).await?
    } else {
        read_model::drop_all_scanned(con).await?
    };
    tracing::info!(
        keys = report.keys_dropped,
        streams = ids.len(),
        "read models dropped; replaying"
    );
    for id in &ids {
        let stream = PromotionKeys::new(id).events;
        let mut from = "-".to_owned();
        loop {
            let page: StreamRangeReply = redis::cmd("XRANGE")
                .arg(&stream)
                .arg(&from)
                .arg("+")
                .arg("COUNT")
                .arg(batch_size.max(1))
                .query_async(con)
                .await?;
            let Some(last) = page.ids.last() else { break };
            from = format!("({}", last.id);
            let mut events = Vec::with_capacity(page.ids.len());
            for entry in &page.ids {
                match decode_entry(entry) {
                    Ok(e) => events.push(e),
                    Err(reason) => {
                        report.skipped += 1;
                        metrics
                            .decode_failures
                            .get_or_create(&SkipKindLabels {
                                kind: reason.kind(),
                            })
                            .inc();
                        tracing::warn!(promotion = %id, entry = %entry.id, error = %reason,
                            "rebuild skips an entry it cannot apply");
                    }
                }
            }
            read_model::apply(con, id, &events).await?;
            for e in &events {
                metrics
                    .applied
                    .get_or_create(&EventTypeLabels {
                        r#type: e.type_name(),
                    })
                    .inc();
            }
            report.applied += events.len();
            if page.ids.len() < batch_size.max(1) {
                break;
            }
        }
    }
    Ok(report)
}

/// Every read-model key that can exist in a cluster: the fixed ones, one per
/// indexed promotion, one per customer seen in a stream.
async fn cluster_read_model_keys(
    con: &mut RedisConnection,
    ids: &[PromotionId],
    batch_size: usize,
) -> Result<Vec<String>, ProjectorError> {
    let mut keys: HashSet<String> = [
        protocol::read_model::ACTIVE.to_owned(),
        protocol::read_model::PROGRESS.to_owned(),
    ]
    .into_iter()
    .collect();
    for id in ids {
        keys.insert(protocol::read_model::promotion(id));
        let stream = PromotionKeys::new(id).events;
        let mut from = "-".to_owned();
        loop {
            let page: StreamRangeReply = redis::cmd("XRANGE")
                .arg(&stream)
                .arg(&from)
                .arg("+")
                .arg("COUNT")
                .arg(batch_size.max(1))
                .query_async(con)
                .await?;
            let Some(last) = page.ids.last() else { break };
            from = format!("({}", last.id);
            for entry in &page.ids {
                if let Ok(Event::CouponGrabbed(g)) = decode_entry(entry) {
                    if let Ok(c) = protocol::CustomerId::parse(&g.customer_id) {
                        keys.insert(protocol::read_model::customer_coupons(&c));
                    }
                }
            }
        }
    }
    Ok(keys.into_iter().collect())
}

/// Runs the role until SIGTERM (or, with `--rebuild`, until the replay ends).
pub async fn run(args: ProjectorArgs) -> Result<(), ProjectorError> {
    let con = args.redis.connect()?;
    let worker_metrics = WorkerMetrics::new();
    let metrics = ProjectorMetrics::register(&worker_metrics.registry);
    if args.rebuild {
        let mut con = con;
        let started = Instant::now();
        let report = rebuild(&mut con, &metrics, args.batch_size.max(1000)).await?;
        tracing::info!(?report, took = ?started.elapsed(), "read models rebuilt");
        return Ok(());
    }
    let consumer = args
        .consumer_name
        .clone()
        .unwrap_or_else(default_consumer_name);
    let options = ProjectorOptions {
        consumer,
        claim_idle: Duration::from_millis(args.claim_idle_ms),
        batch_size: args.batch_size.max(1),
        poll_interval: Duration::from_millis(args.poll_interval_ms.max(1)),
        discovery_interval: Duration::from_secs(1),
        apply_delay: Duration::from_millis(args.test_apply_delay_ms),
    };
    let shutdown = http::shutdown_on_signal();
    let listener = http::bind(&args.metrics_listen).await?;
    let health = HealthApi::new(
        con.clone(),
        args.redis.timeout(),
        worker_metrics.registry.clone(),
    )
    .with_redis_metrics(worker_metrics.redis.clone());
    let limits = ServerLimits {
        metrics: Some(worker_metrics.http.clone()),
        drain_timeout: Duration::from_secs(5),
        ..ServerLimits::default()
    };
    let server = tokio::spawn(http::serve(
        listener,
        vec![Arc::new(health)],
        limits,
        shutdown.clone(),
    ));
    Projector::new(con, options, metrics)
        .run(shutdown.clone())
        .await;
    shutdown.cancel();
    match server.await {
        Ok(r) => r?,
        Err(e) => tracing::warn!(error = %e, "metrics server task failed"),
    }
    Ok(())
}

/// Reads every entry of `promotion`'s stream (tests and tools).
pub async fn stream_entries<C: ConnectionLike>(
    con: &mut C,
    promotion: &PromotionId,
) -> Result<Vec<StreamId>, ProjectorError> {
    let page: StreamRangeReply = redis::cmd("XRANGE")
        .arg(PromotionKeys::new(promotion).events)
        .arg("-")
        .arg("+")
        .query_async(con)
        .await?;
    Ok(page.ids)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entry_ids_carry_their_xadd_time() {
        assert_eq!(entry_ms("1700000000123-4"), Some(1_700_000_000_123));
        assert_eq!(entry_ms("garbage"), None);
    }

    #[test]
    fn an_entry_without_the_event_field_is_skipped_as_missing_field() {
        let entry = StreamId::default();
        assert_eq!(decode_entry(&entry).unwrap_err().kind(), "missing_field");
    }
}
