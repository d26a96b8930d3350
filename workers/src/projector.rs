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
//! Throughput (see docs/bench-read-side.md): a step reads the next batch of
//! every stream (XREADGROUP) while it decodes and applies the current one, so
//! Redis and this process work at the same time; a batch's writes are one
//! round trip, its XACK and the progress report another; stream replies are
//! read as raw values (no per-entry field map) and events decoded without a
//! JSON tree. Discovery, XPENDING and the Redis clock are refreshed once a
//! second, XAUTOCLAIM every quarter of `--claim-idle-ms`, not every step.
//!
//! `--rebuild` replays all streams from the start with XRANGE into fresh
//! read models, built aside and swapped in on a standalone Redis (see
//! [`rebuild`]), then exits. It leaves the consumer groups alone, so live
//! replicas may keep running: what they apply meanwhile is idempotent.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::{StreamExt, TryStreamExt};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use redis::aio::ConnectionLike;
use redis::streams::{StreamId, StreamRangeReply};
use redis::Value;
use tokio_util::sync::CancellationToken;

use crate::http::{self, Apis, HealthApi, ServerLimitArgs};
use crate::metrics::{MetricsRegistry, WorkerMetrics};
use crate::protocol::{
    self, DecodeError, Event, PromotionId, PromotionKeys, EVENT_FIELD, PROJECTOR_GROUP,
    PROMOTION_INDEX_KEY,
};
use crate::read_model::{self, Phase, ProjectionError, ReadModelError};
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
    #[error("--rebuild-db {0} must be a database of its own, neither the streams' nor the read models' (--redis-read-model-db)")]
    RebuildDatabase(i64),
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
    /// The phase this replica last wrote into the active index for this
    /// promotion; the index is written again only when the phase the read
    /// model answers differs (phases only rise, so that is at most twice per
    /// promotion and process, not once per batch).
    indexed: Option<Phase>,
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

/// One stream entry as projectors need it: its id and the raw bytes of its
/// event field (`None` when it has none, or was deleted while pending).
/// Read straight from the Redis answer, without building a field map.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RawEntry {
    pub id: String,
    pub event: Option<Vec<u8>>,
}

/// The entries read from one stream, for one promotion.
type Batch = (PromotionId, Vec<RawEntry>);

/// XREADGROUP of the next batch of every stream, started while the previous
/// batch is applied so that Redis reads while this process decodes.
struct ReadAhead {
    /// Promotions in the order of the answers.
    ids: Vec<PromotionId>,
    answers: redis::RedisResult<Vec<Value>>,
}

/// One projector replica.
pub struct Projector {
    /// The command side: streams, consumer groups, the promotion index.
    con: RedisConnection,
    /// The read models (their own database on a standalone Redis).
    models: RedisConnection,
    options: ProjectorOptions,
    metrics: ProjectorMetrics,
    streams: BTreeMap<PromotionId, StreamCursor>,
    /// Entries already reported as skipped by this process (reported once).
    skipped: HashSet<(String, String)>,
    last_discovery: Option<Instant>,
    last_claim: Option<Instant>,
    last_progress: Option<Instant>,
    /// Redis' clock minus this host's, in ms, measured at each discovery:
    /// lags are on Redis' clock without a TIME round trip per step.
    clock_offset_ms: i64,
    read_ahead: Option<ReadAhead>,
    ready: Arc<AtomicBool>,
}

/// An entry id's XADD time, epoch ms.
fn entry_ms(id: &str) -> Option<i64> {
    id.split_once('-').map_or(id, |(ms, _)| ms).parse().ok()
}

/// This host's clock, epoch ms.
fn local_now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

fn unexpected(what: &'static str, value: &Value) -> redis::RedisError {
    redis::RedisError::from((
        redis::ErrorKind::UnexpectedReturnType,
        what,
        format!("{value:?}"),
    ))
}

fn into_bytes(value: Value) -> Option<Vec<u8>> {
    match value {
        Value::BulkString(b) => Some(b),
        Value::SimpleString(s) => Some(s.into_bytes()),
        _ => None,
    }
}

/// The event field of an entry's field list (`[field, value, ...]`, or a
/// map in RESP3; `Nil` for an entry deleted while pending).
fn event_field(fields: Value) -> Option<Vec<u8>> {
    let pairs: Vec<(Value, Value)> = match fields {
        Value::Array(items) => {
            let mut it = items.into_iter();
            let mut pairs = Vec::with_capacity(1);
            while let (Some(k), Some(v)) = (it.next(), it.next()) {
                pairs.push((k, v));
            }
            pairs
        }
        Value::Map(pairs) => pairs,
        _ => return None,
    };
    pairs.into_iter().find_map(|(k, v)| {
        let is_event = match &k {
            Value::BulkString(b) => b == EVENT_FIELD.as_bytes(),
            Value::SimpleString(s) => s == EVENT_FIELD,
            _ => false,
        };
        if is_event {
            into_bytes(v)
        } else {
            None
        }
    })
}

/// The entries of an XRANGE answer, or of one stream in an XREADGROUP or
/// XAUTOCLAIM answer: `[[id, fields], ...]`.
pub fn entries_of(value: Value) -> redis::RedisResult<Vec<RawEntry>> {
    let items = match value {
        Value::Array(items) => items,
        Value::Nil => return Ok(Vec::new()),
        other => return Err(unexpected("stream entries are not an array", &other)),
    };
    items
        .into_iter()
        .map(|item| match item {
            Value::Array(pair) if pair.len() == 2 => {
                let mut pair = pair.into_iter();
                let id = pair.next().and_then(into_bytes);
                let fields = pair.next().unwrap_or(Value::Nil);
                let id = id
                    .and_then(|b| String::from_utf8(b).ok())
                    .ok_or_else(|| unexpected("stream entry id is not a string", &fields))?;
                Ok(RawEntry {
                    id,
                    event: event_field(fields),
                })
            }
            other => Err(unexpected("stream entry is not [id, fields]", &other)),
        })
        .collect()
}

/// The entries of an XREADGROUP answer on one stream (`Nil` when none).
fn read_group_entries(value: Value) -> redis::RedisResult<Vec<RawEntry>> {
    let streams: Vec<Value> = match value {
        Value::Nil => return Ok(Vec::new()),
        // RESP2: [[name, entries]]; RESP3: {name: entries}.
        Value::Array(streams) => streams
            .into_iter()
            .map(|s| match s {
                Value::Array(mut pair) if pair.len() == 2 => pair.pop().unwrap_or(Value::Nil),
                other => other,
            })
            .collect(),
        Value::Map(pairs) => pairs.into_iter().map(|(_, v)| v).collect(),
        other => return Err(unexpected("XREADGROUP answer", &other)),
    };
    let mut out = Vec::new();
    for entries in streams {
        out.extend(entries_of(entries)?);
    }
    Ok(out)
}

/// An XAUTOCLAIM answer: `[next cursor, entries, deleted ids]`.
fn auto_claim_of(value: Value) -> redis::RedisResult<(String, Vec<RawEntry>)> {
    match value {
        Value::Array(items) if items.len() >= 2 => {
            let mut it = items.into_iter();
            let next = it
                .next()
                .and_then(into_bytes)
                .and_then(|b| String::from_utf8(b).ok())
                .unwrap_or_else(|| "0-0".to_owned());
            let entries = entries_of(it.next().unwrap_or(Value::Nil))?;
            Ok((next, entries))
        }
        other => Err(unexpected("XAUTOCLAIM answer", &other)),
    }
}

/// Decodes one entry as the projector needs it.
fn decode_entry(entry: &RawEntry) -> Result<Event, SkipReason> {
    let bytes = entry
        .event
        .as_deref()
        .ok_or(SkipReason::Decode(DecodeError::MissingField))?;
    let event = Event::decode(bytes).map_err(SkipReason::Decode)?;
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

/// The XREADGROUP of one stream: this replica's own pending entries from
/// `from` when it has to re-read them, new entries (`>`) otherwise.
fn read_group_cmd(consumer: &str, count: usize, stream: &str, from: Option<&str>) -> redis::Cmd {
    let mut cmd = redis::cmd("XREADGROUP");
    cmd.arg("GROUP")
        .arg(PROJECTOR_GROUP)
        .arg(consumer)
        .arg("COUNT")
        .arg(count.max(1))
        .arg("STREAMS")
        .arg(stream)
        .arg(from.unwrap_or(">"));
    cmd
}

impl Projector {
    /// A replica reading the streams through `con` and writing the read
    /// models through `models` (see [`RedisArgs::connect_read_models`]).
    pub fn new(
        con: RedisConnection,
        models: RedisConnection,
        options: ProjectorOptions,
        metrics: ProjectorMetrics,
    ) -> Self {
        Self {
            con,
            models,
            options,
            metrics,
            streams: BTreeMap::new(),
            skipped: HashSet::new(),
            last_discovery: None,
            last_claim: None,
            last_progress: None,
            clock_offset_ms: 0,
            read_ahead: None,
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
        let _ = read_model::forget_progress(&mut self.models, &self.options.consumer).await;
        tracing::info!(consumer = %self.options.consumer, "projector stopped");
    }

    /// After an error (Redis restarted, a stream deleted) the groups may be
    /// gone and entries may have been delivered but not applied: recreate
    /// the groups, re-read this replica's own pending entries (a read-ahead
    /// batch included) and rewrite the active index.
    fn forget_groups(&mut self) {
        self.read_ahead = None;
        for cursor in self.streams.values_mut() {
            cursor.group_ready = false;
            cursor.own_pending_from = Some("0".to_owned());
            cursor.indexed = None;
        }
    }

    /// Applies whatever is waiting until a step finds nothing; for tests and
    /// tools. Returns the totals. Discovery and claiming run on the first
    /// step and again once nothing is left, not on every step.
    pub async fn run_until_idle(&mut self) -> Result<StepReport, ProjectorError> {
        let mut total = StepReport::default();
        let mut force = true;
        loop {
            if force {
                self.last_discovery = None;
                self.last_claim = None;
            }
            let rereading = self.streams.is_empty()
                || self.streams.values().any(|c| c.own_pending_from.is_some());
            let r = match self.step().await {
                Ok(r) => r,
                Err(e) => {
                    self.forget_groups();
                    return Err(e);
                }
            };
            total.applied += r.applied;
            total.skipped += r.skipped;
            total.claimed += r.claimed;
            total.read += r.read;
            let rereading = rereading
                || self.streams.values().any(|c| c.own_pending_from.is_some())
                || self.read_ahead.is_some();
            let idle = r.read == 0 && r.claimed == 0 && r.applied == 0 && !rereading;
            if idle && force {
                return Ok(total);
            }
            force = idle;
        }
    }

    /// One round: discover new streams (at most once per discovery
    /// interval), claim idle entries of others (at most every claim check),
    /// take a batch per stream (read ahead by the previous step, or read
    /// now), read the next batches while applying this one, acknowledge and
    /// report progress in one round trip.
    pub async fn step(&mut self) -> Result<StepReport, ProjectorError> {
        let due =
            |last: Option<Instant>, every: Duration| last.is_none_or(|t| t.elapsed() >= every);
        if due(self.last_discovery, self.options.discovery_interval) {
            self.discover().await?;
            self.last_discovery = Some(Instant::now());
        }
        self.ensure_groups().await?;
        let mut report = StepReport::default();
        let mut done = Applied::default();
        let claim_every =
            (self.options.claim_idle / 4).clamp(Duration::from_millis(20), Duration::from_secs(5));
        if due(self.last_claim, claim_every) {
            let (claimed, fresh) = self.claim().await?;
            self.last_claim = Some(Instant::now());
            report.claimed += fresh;
            for (id, entries) in claimed {
                self.apply_entries(&id, entries, &mut done).await?;
            }
        }
        let batches = match self.read_ahead.take() {
            Some(ahead) => self.take_read(ahead)?,
            None => Vec::new(),
        };
        let batches = if batches.is_empty() {
            let ahead = self.start_read().await;
            self.take_read(ahead)?
        } else {
            batches
        };
        if !batches.is_empty() && !self.options.apply_delay.is_zero() {
            tokio::time::sleep(self.options.apply_delay).await;
        }
        if !batches.is_empty() {
            // Read the next batches while this one is decoded and applied:
            // Redis works on the read while this process decodes.
            let read_next = self.start_read();
            let (ahead, applied) = {
                let apply = self.apply_batches(batches, &mut done);
                tokio::join!(read_next, apply)
            };
            // Keep what was read ahead only when the batch was applied:
            // after a failure the entries are re-read from the pending list.
            match applied {
                Ok(()) => self.read_ahead = Some(ahead),
                Err(e) => {
                    self.forget_groups();
                    return Err(e);
                }
            }
        }
        report.read += done.read;
        report.applied += done.acks.iter().map(|(_, ids)| ids.len()).sum::<usize>();
        report.skipped += done.skipped;
        self.acknowledge(done).await?;
        Ok(report)
    }

    /// Sends the XREADGROUP of every stream; the answers are taken by
    /// [`Self::take_read`].
    fn start_read(&self) -> impl std::future::Future<Output = ReadAhead> + 'static {
        let mut con = self.con.clone();
        let ids: Vec<PromotionId> = self.streams.keys().cloned().collect();
        let commands: Vec<redis::Cmd> = self
            .streams
            .values()
            .map(|c| {
                read_group_cmd(
                    &self.options.consumer,
                    self.options.batch_size,
                    &c.stream,
                    c.own_pending_from.as_deref(),
                )
            })
            .collect();
        async move {
            let answers = if commands.is_empty() {
                Ok(Vec::new())
            } else {
                con.query_each(commands).await
            };
            ReadAhead { ids, answers }
        }
    }

    /// The batches of a read; moves each cursor re-reading its own pending
    /// entries past what it got (back to `>` once there is none left).
    fn take_read(&mut self, ahead: ReadAhead) -> Result<Vec<Batch>, ProjectorError> {
        let answers = match ahead.answers {
            Ok(a) => a,
            Err(e) if code_of(&e) == Some("NOGROUP") => {
                tracing::warn!(error = %e, "a consumer group is gone (Redis lost data?); recreating");
                self.forget_groups();
                return Ok(Vec::new());
            }
            Err(e) => return Err(e.into()),
        };
        let mut out = Vec::new();
        for (id, answer) in ahead.ids.into_iter().zip(answers) {
            let entries = read_group_entries(answer)?;
            let Some(cursor) = self.streams.get_mut(&id) else {
                continue;
            };
            if cursor.own_pending_from.is_some() {
                cursor.own_pending_from = entries.last().map(|e| e.id.clone());
            }
            if !entries.is_empty() {
                out.push((id, entries));
            }
        }
        Ok(out)
    }

    async fn apply_batches(
        &mut self,
        batches: Vec<Batch>,
        done: &mut Applied,
    ) -> Result<(), ProjectorError> {
        for (id, entries) in batches {
            done.read += entries.len();
            self.apply_entries(&id, entries, done).await?;
        }
        Ok(())
    }

    /// Acknowledges what the step applied (each stream's entries after their
    /// writes succeeded) together with this replica's progress report, in
    /// one round trip; then observes the lags.
    async fn acknowledge(&mut self, done: Applied) -> Result<(), ProjectorError> {
        let applied: usize = done.acks.iter().map(|(_, ids)| ids.len()).sum();
        let now_ms = local_now_ms() + self.clock_offset_ms;
        let mut max_lag_ms = 0i64;
        for (_, ids) in &done.acks {
            for ms in ids.iter().filter_map(|id| entry_ms(id)) {
                max_lag_ms = max_lag_ms.max(now_ms - ms);
            }
        }
        let idle_report_due = self
            .last_progress
            .is_none_or(|t| t.elapsed() >= Duration::from_secs(1));
        let mut acks: Vec<redis::Cmd> = done
            .acks
            .iter()
            .filter(|(_, ids)| !ids.is_empty())
            .map(|(stream, ids)| {
                let mut xack = redis::cmd("XACK");
                xack.arg(stream).arg(PROJECTOR_GROUP).arg(ids);
                xack
            })
            .collect();
        let progress = (applied > 0 || idle_report_due).then(|| {
            self.last_progress = Some(Instant::now());
            read_model::progress_write(&self.options.consumer, max_lag_ms, now_ms)
        });
        if self.models.other_database_than(&self.con) {
            // Two databases, two connections: both at once.
            let mut models = self.models.clone();
            let report = async move {
                match progress {
                    Some(p) => p.exec_async(&mut models).await,
                    None => Ok(()),
                }
            };
            let mut con = self.con.clone();
            let ack = async move {
                if acks.is_empty() {
                    return Ok(Vec::new());
                }
                con.query_each::<Value>(acks).await
            };
            futures::try_join!(ack, report)?;
        } else {
            acks.extend(progress);
            if !acks.is_empty() {
                let _: Vec<Value> = self.con.query_each(acks).await?;
            }
        }
        // Observed once acknowledged: the lag is XADD to applied and acked.
        let now_ms = local_now_ms() + self.clock_offset_ms;
        for (events, (_, ids)) in done.types.iter().zip(&done.acks) {
            for (kind, id) in events.iter().zip(ids) {
                self.metrics
                    .applied
                    .get_or_create(&EventTypeLabels { r#type: kind })
                    .inc();
                if let Some(ms) = entry_ms(id) {
                    self.metrics
                        .lag
                        .observe((now_ms - ms).max(0) as f64 / 1000.0);
                }
            }
        }
        Ok(())
    }

    /// Re-reads the promotion index; a new promotion gets a cursor. Also
    /// measures the offset of Redis' clock.
    async fn discover(&mut self) -> Result<(), ProjectorError> {
        let before = local_now_ms();
        let mut members = redis::cmd("SMEMBERS");
        members.arg(PROMOTION_INDEX_KEY);
        let mut answers: Vec<Value> = self
            .con
            .query_each(vec![members, redis::cmd("TIME")])
            .await?;
        let after = local_now_ms();
        let time = answers.pop().unwrap_or(Value::Nil);
        let ids: Vec<String> = redis::from_redis_value(answers.pop().unwrap_or(Value::Nil))
            .map_err(redis::RedisError::from)?;
        let (secs, micros): (i64, i64) =
            redis::from_redis_value(time).map_err(redis::RedisError::from)?;
        self.clock_offset_ms = secs * 1000 + micros / 1000 - (before + after) / 2;
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
                        indexed: None,
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
    async fn claim(&mut self) -> Result<(Vec<Batch>, usize), ProjectorError> {
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
        let replies: Vec<Value> = self.con.query_each(commands).await?;
        let mut out = Vec::new();
        let mut total_fresh = 0;
        for (cursor, reply) in self.streams.values_mut().zip(replies) {
            let (next, claimed) = auto_claim_of(reply)?;
            cursor.claim_from = next;
            let fresh = claimed
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
            if !claimed.is_empty() {
                out.push((cursor.id.clone(), claimed));
            }
        }
        Ok((out, total_fresh))
    }

    /// Decodes and applies the entries of one stream, and notes them for
    /// acknowledgement; the undecodable ones are reported and left pending.
    async fn apply_entries(
        &mut self,
        id: &PromotionId,
        entries: Vec<RawEntry>,
        done: &mut Applied,
    ) -> Result<(), ProjectorError> {
        let Some(stream) = self.streams.get(id).map(|c| c.stream.clone()) else {
            return Ok(());
        };
        let mut events = Vec::with_capacity(entries.len());
        let mut ack = Vec::with_capacity(entries.len());
        for entry in entries {
            match decode_entry(&entry) {
                Ok(event) => {
                    events.push(event);
                    ack.push(entry.id);
                }
                Err(reason) => {
                    done.skipped += 1;
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
            return Ok(());
        }
        let written = async {
            let phase = read_model::apply_to_models(&mut self.models, id, &events).await?;
            let indexed = self.streams.get(id).and_then(|c| c.indexed);
            if let Some(phase) = phase.filter(|p| Some(*p) != indexed) {
                read_model::index_phase(&mut self.models, id, phase).await?;
                if let Some(c) = self.streams.get_mut(id) {
                    c.indexed = Some(phase);
                }
            }
            Ok::<(), ReadModelError>(())
        }
        .await;
        if let Err(e) = written {
            // Nothing acknowledged: re-read our own pending entries next time.
            if let Some(c) = self.streams.get_mut(id) {
                c.own_pending_from = Some("0".to_owned());
            }
            return Err(e.into());
        }
        done.types
            .push(events.iter().map(Event::type_name).collect());
        done.acks.push((stream, ack));
        Ok(())
    }
}

/// What a step applied, to acknowledge.
#[derive(Debug, Default)]
struct Applied {
    /// Entries read (XREADGROUP).
    read: usize,
    /// Entries skipped and left pending.
    skipped: usize,
    /// Per stream: the ids of the entries applied.
    acks: Vec<(String, Vec<String>)>,
    /// Per stream, parallel to `acks`: the event type of each entry.
    types: Vec<Vec<&'static str>>,
}

/// What a rebuild did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct RebuildReport {
    /// Read-model keys deleted: the old read models (after a swap) or the
    /// ones dropped before replaying in place.
    pub keys_dropped: u64,
    pub streams: usize,
    /// Entries applied, the catch-up after a swap included.
    pub applied: usize,
    pub skipped: usize,
    /// Built aside and swapped in: readers kept the old read models until
    /// the new ones were complete.
    pub swapped: bool,
    /// Entries applied after the swap (appended while the rebuild ran).
    pub caught_up: usize,
}

/// Entries per XRANGE page of a rebuild (at least; `--batch-size` may ask
/// for more): large pages, few round trips.
pub const REBUILD_PAGE: usize = 2_000;

/// Streams a rebuild replays at the same time.
const REBUILD_STREAMS_AT_ONCE: usize = 4;

/// Pages of one stream a rebuild applies at the same time (while reading
/// the next one).
const REBUILD_PAGES_AT_ONCE: usize = 3;

/// Rebuilds the read models from every indexed stream, reading the streams
/// through `con`, and returns what it did. Safe while live projectors run:
/// every write is idempotent and order-tolerant.
///
/// With `scratch` (another logical database of a standalone server whose
/// read models have a database of their own, see `--rebuild-db`) the read
/// models are built there and swapped in with one SWAPDB, so readers keep
/// the old ones until the new ones are complete, a rebuild that dies halfway
/// leaves them untouched, and the old keys are freed after the replay, not
/// during it. What the streams received meanwhile (live projectors may have
/// applied it to the old read models only) is then replayed from where the
/// rebuild stopped, into the swapped-in ones; the old ones are dropped last.
///
/// Without it (a cluster, the read models sharing the streams' database, or
/// an ACL user denied SWAPDB) they are dropped in place, then replayed: one
/// FLUSHDB ASYNC of their own database, else key by key, found by SCAN on a
/// standalone server and from the streams on a cluster (where SCAN reaches
/// one node). Readers see them fill up meanwhile.
///
/// Fast because order does not matter to the read models: each stream is
/// read page after page (`page` entries per XRANGE) while the pages already
/// read are decoded and applied concurrently, several streams at once. The
/// active index of a promotion is written once, after its whole stream.
pub async fn rebuild(
    con: &mut RedisConnection,
    models: &mut RedisConnection,
    scratch: Option<&mut RedisConnection>,
    metrics: &ProjectorMetrics,
    page: usize,
) -> Result<RebuildReport, ProjectorError> {
    let page = page.max(1);
    let ids = indexed_promotions(con).await?;
    let mut report = RebuildReport {
        streams: ids.len(),
        ..RebuildReport::default()
    };
    let scratch = match scratch {
        Some(s) => can_swap(con, models, s).await?.then_some(s),
        None => None,
    };
    if let Some(scratch) = scratch {
        // Both databases change hands: neither may hold anything else.
        read_model::ensure_only_read_models(models).await?;
        // Leftovers of a rebuild that died halfway.
        read_model::drop_database(scratch).await?;
        tracing::info!(
            streams = ids.len(),
            db = scratch.get_db(),
            "replaying aside"
        );
        let replayed = replay_all(con, scratch, metrics, page, &ids, &HashMap::new()).await?;
        read_model::swap_databases(models, scratch).await?;
        report.swapped = true;
        report.applied += replayed.applied;
        report.skipped += replayed.skipped;
        // Entries appended since each stream was read, and new streams.
        let ids = indexed_promotions(con).await?;
        report.streams = ids.len();
        let caught = replay_all(con, models, metrics, page, &ids, &replayed.read_up_to).await?;
        report.caught_up = caught.applied;
        report.applied += caught.applied;
        report.skipped += caught.skipped;
        // The old read models, now in the scratch database.
        report.keys_dropped = read_model::drop_database(scratch).await?;
        return Ok(report);
    }
    report.keys_dropped = if models.other_database_than(con) {
        read_model::drop_database(models).await?
    } else if con.is_cluster() {
        // SCAN reaches one node of a cluster; the read-model keys that can
        // exist are known from the index and the streams instead.
        let keys = cluster_read_model_keys(con, &ids, page).await?;
        read_model::drop_keys(models, &keys).await?
    } else {
        read_model::drop_all_scanned(models).await?
    };
    tracing::info!(
        keys = report.keys_dropped,
        streams = ids.len(),
        "read models dropped; replaying"
    );
    let replayed = replay_all(con, models, metrics, page, &ids, &HashMap::new()).await?;
    report.applied = replayed.applied;
    report.skipped = replayed.skipped;
    Ok(report)
}

/// The database a rebuild builds aside in (`--rebuild-db`, by default the
/// read models' + 1); `None` on a cluster, which has database 0 only.
pub fn connect_rebuild_database(
    redis: &RedisArgs,
    rebuild_db: Option<i64>,
) -> Result<Option<RedisConnection>, RedisSetupError> {
    match redis.read_model_db() {
        Some(db) => redis.connect_database(rebuild_db.unwrap_or(db + 1)),
        None => Ok(None),
    }
}

/// Every promotion of the index, sorted.
async fn indexed_promotions(con: &mut RedisConnection) -> Result<Vec<PromotionId>, ProjectorError> {
    let mut raw_ids: Vec<String> = redis::cmd("SMEMBERS")
        .arg(PROMOTION_INDEX_KEY)
        .query_async(con)
        .await?;
    raw_ids.sort();
    Ok(raw_ids
        .iter()
        .filter_map(|r| PromotionId::parse(r).ok())
        .collect())
}

/// Whether a rebuild can build in `scratch` and swap it in: a database of
/// its own (neither the streams' nor the read models', which must have
/// their own too), and a user allowed SWAPDB. Anything else but the ACL
/// refusal is a misconfiguration worth stopping for.
async fn can_swap(
    con: &RedisConnection,
    models: &RedisConnection,
    scratch: &mut RedisConnection,
) -> Result<bool, ProjectorError> {
    if !models.other_database_than(con) {
        return Ok(false);
    }
    if !scratch.other_database_than(con) || !scratch.other_database_than(models) {
        return Err(ProjectorError::RebuildDatabase(scratch.get_db()));
    }
    if !read_model::may_swap_databases(scratch).await? {
        tracing::warn!("SWAPDB is not allowed; rebuilding the read models in place");
        return Ok(false);
    }
    Ok(true)
}

/// Totals of replaying several streams.
#[derive(Default)]
struct Replayed {
    applied: usize,
    skipped: usize,
    /// Per stream, the last entry id read.
    read_up_to: HashMap<PromotionId, String>,
}

/// Replays the streams of `ids` into `models`, each after the entry id
/// `after` holds for it (from the start when none), several at once.
async fn replay_all(
    con: &RedisConnection,
    models: &RedisConnection,
    metrics: &ProjectorMetrics,
    page: usize,
    ids: &[PromotionId],
    after: &HashMap<PromotionId, String>,
) -> Result<Replayed, ProjectorError> {
    let replays = futures::stream::iter(ids.iter().map(|id| {
        let (con, models) = (con.clone(), models.clone());
        let (metrics, id) = (metrics.clone(), id.clone());
        let from = after.get(&id).cloned();
        async move {
            let done = replay_stream(con, models, metrics, id.clone(), page, from).await?;
            Ok::<_, ProjectorError>((id, done))
        }
    }))
    .buffer_unordered(REBUILD_STREAMS_AT_ONCE);
    let totals: Vec<(PromotionId, StreamReplayed)> = replays.try_collect().await?;
    let mut out = Replayed::default();
    for (id, done) in totals {
        out.applied += done.applied;
        out.skipped += done.skipped;
        if let Some(last) = done.last_read {
            out.read_up_to.insert(id, last);
        }
    }
    Ok(out)
}

/// One XRANGE page of `stream` after `after` (`None`: from the start).
async fn read_page(
    con: &mut RedisConnection,
    stream: &str,
    after: Option<&str>,
    page: usize,
) -> Result<Vec<RawEntry>, ProjectorError> {
    let from = after.map_or_else(|| "-".to_owned(), |id| format!("({id}"));
    let answer: Value = redis::cmd("XRANGE")
        .arg(stream)
        .arg(from)
        .arg("+")
        .arg("COUNT")
        .arg(page)
        .query_async(con)
        .await?;
    Ok(entries_of(answer)?)
}

/// What replaying one stream did.
struct StreamReplayed {
    applied: usize,
    skipped: usize,
    /// The last entry id read (the `after` given when nothing was).
    last_read: Option<String>,
}

/// Replays one stream, after entry `after` (`None`: from the start).
async fn replay_stream(
    con: RedisConnection,
    models: RedisConnection,
    metrics: ProjectorMetrics,
    id: PromotionId,
    page: usize,
    after: Option<String>,
) -> Result<StreamReplayed, ProjectorError> {
    let stream = PromotionKeys::new(&id).events;
    let mut applying: tokio::task::JoinSet<Result<PageApplied, ProjectorError>> =
        tokio::task::JoinSet::new();
    let (mut applied, mut skipped, mut phase) = (0, 0, None::<Phase>);
    let mut collect = |r: Result<Result<PageApplied, ProjectorError>, tokio::task::JoinError>|
     -> Result<(), ProjectorError> {
        let page = r.map_err(|e| {
            ProjectorError::ReadModel(ReadModelError::BadData(format!("replay task: {e}")))
        })??;
        applied += page.applied;
        skipped += page.skipped;
        phase = phase.max(page.phase);
        Ok(())
    };
    let mut reader = con;
    let mut after = after;
    loop {
        let entries = read_page(&mut reader, &stream, after.as_deref(), page).await?;
        let Some(last) = entries.last() else { break };
        after = Some(last.id.clone());
        let full = entries.len() >= page;
        while applying.len() >= REBUILD_PAGES_AT_ONCE {
            if let Some(r) = applying.join_next().await {
                collect(r)?;
            }
        }
        let (mut models, metrics, id) = (models.clone(), metrics.clone(), id.clone());
        applying.spawn(async move { apply_page(&mut models, &metrics, &id, entries).await });
        if !full {
            break;
        }
    }
    while let Some(r) = applying.join_next().await {
        collect(r)?;
    }
    if let Some(phase) = phase {
        let mut models = models;
        read_model::index_phase(&mut models, &id, phase).await?;
    }
    Ok(StreamReplayed {
        applied,
        skipped,
        last_read: after,
    })
}

/// What applying one rebuild page did.
struct PageApplied {
    applied: usize,
    skipped: usize,
    /// The phase the promotion's read model answered.
    phase: Option<Phase>,
}

/// Decodes and applies one rebuild page.
async fn apply_page(
    con: &mut RedisConnection,
    metrics: &ProjectorMetrics,
    id: &PromotionId,
    entries: Vec<RawEntry>,
) -> Result<PageApplied, ProjectorError> {
    let mut events = Vec::with_capacity(entries.len());
    let mut skipped = 0;
    for entry in &entries {
        match decode_entry(entry) {
            Ok(e) => events.push(e),
            Err(reason) => {
                skipped += 1;
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
    drop(entries);
    let phase = read_model::apply_to_models(con, id, &events).await?;
    for e in &events {
        metrics
            .applied
            .get_or_create(&EventTypeLabels {
                r#type: e.type_name(),
            })
            .inc();
    }
    Ok(PageApplied {
        applied: events.len(),
        skipped,
        phase,
    })
}

/// Every read-model key that can exist in a cluster: the fixed ones, one per
/// indexed promotion, one per customer seen in a stream.
async fn cluster_read_model_keys(
    con: &mut RedisConnection,
    ids: &[PromotionId],
    page: usize,
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
        let mut after: Option<String> = None;
        loop {
            let entries = read_page(con, &stream, after.as_deref(), page).await?;
            let Some(last) = entries.last() else { break };
            after = Some(last.id.clone());
            for entry in &entries {
                if let Ok(Event::CouponGrabbed(g)) = decode_entry(entry) {
                    if let Ok(c) = protocol::CustomerId::parse(&g.customer_id) {
                        keys.insert(protocol::read_model::customer_coupons(&c));
                    }
                }
            }
            if entries.len() < page {
                break;
            }
        }
    }
    Ok(keys.into_iter().collect())
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
        let entry = RawEntry::default();
        assert_eq!(decode_entry(&entry).unwrap_err().kind(), "missing_field");
    }
}
