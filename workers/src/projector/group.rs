//! One replica of the consumer group: each step discovers new streams,
//! claims what other replicas left idle, reads the next batch of every
//! stream while applying the current one, and acknowledges what it applied
//! together with its progress report.
//!
//! A stream is one shard's of one promotion: an unsharded promotion has one
//! (shard 0 of 1), a sharded one (issue 14) one per shard, found through its
//! shard map once the promotion has started (`super::discovery`). Each has
//! its own consumer group and cursor; one XREADGROUP per stream, never one
//! naming several (a cluster refuses keys of different slots in one
//! command), all sent at once: the cluster client pipelines those of one
//! node over its connection to that node.

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use redis::Value;
use tokio_util::sync::CancellationToken;

use super::args::ProjectorOptions;
use super::discovery;
use super::entries::{auto_claim_of, decode_in, read_group_entries, Decoded, RawEntry};
use super::metrics::{EventTypeLabels, ProjectorMetrics, SkipKindLabels};
use super::rebuild::upgrade_layout;
use super::ProjectorError;
use crate::protocol::shards::ShardMap;
use crate::protocol::{Phase, PromotionId, PromotionKeys, PROJECTOR_GROUP, PROMOTION_INDEX_KEY};
use crate::read_model::{self, ReadModelError, ShardStream};
use crate::redis_connection::RedisConnection;

/// One stream: shard `.1` of promotion `.0` (0 for an unsharded one).
type StreamId = (PromotionId, u32);

/// Where this replica stands on one stream.
#[derive(Debug)]
struct StreamCursor {
    id: PromotionId,
    /// The shard whose stream this is (0: the promotion's own stream).
    shard: u32,
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

impl StreamCursor {
    /// A stream this replica has not read yet: its own pending entries
    /// first (a restart under the same name), then new ones.
    fn new(id: PromotionId, shard: u32, stream: String) -> Self {
        Self {
            id,
            shard,
            stream,
            group_ready: false,
            own_pending_from: Some("0".to_owned()),
            claim_from: "0-0".to_owned(),
            indexed: None,
        }
    }
}

/// What one [`Projector::step`] did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct StepReport {
    /// Entries applied and acknowledged.
    pub applied: usize,
    /// The events those entries held: every grant of a version 3 grab
    /// entry counts, as `projector_events_applied` does.
    pub events: usize,
    /// Entries skipped and left pending.
    pub skipped: usize,
    /// Entries read by XREADGROUP (own pending re-reads included).
    pub read: usize,
    /// Entries claimed from other consumers (not counting ones already
    /// known to be unappliable).
    pub claimed: usize,
}

/// The entries read from one stream.
type Batch = (StreamId, Vec<RawEntry>);

/// XREADGROUP of the next batch of every stream, started while the previous
/// batch is applied so that Redis reads while this process decodes.
struct ReadAhead {
    /// Streams in the order of the answers.
    ids: Vec<StreamId>,
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
    streams: BTreeMap<StreamId, StreamCursor>,
    /// Per promotion of the index: S once its shard map is locked (it has
    /// started), `None` before, while only its stream 0 is followed.
    shards: BTreeMap<PromotionId, Option<u32>>,
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
    /// The read models are known to be in this layout (checked, and
    /// upgraded if need be, before the first projection; see
    /// [`upgrade_layout`]).
    layout_ready: bool,
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
    /// models through `models` (see [`crate::redis_connection::RedisArgs::connect_read_models`]).
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
            shards: BTreeMap::new(),
            skipped: HashSet::new(),
            last_discovery: None,
            last_claim: None,
            last_progress: None,
            clock_offset_ms: 0,
            read_ahead: None,
            ready: Arc::new(AtomicBool::new(false)),
            layout_ready: false,
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
            total.events += r.events;
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

    /// One round (the first checks the read models' layout, see
    /// [`upgrade_layout`]): discover new streams (at most once per discovery
    /// interval), claim idle entries of others (at most every claim check),
    /// take a batch per stream (read ahead by the previous step, or read
    /// now), read the next batches while applying this one, acknowledge and
    /// report progress in one round trip.
    pub async fn step(&mut self) -> Result<StepReport, ProjectorError> {
        if !self.layout_ready {
            let page = self.options.batch_size.max(super::REBUILD_PAGE);
            upgrade_layout(&mut self.con, &mut self.models, page).await?;
            self.layout_ready = true;
        }
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
        report.events += done
            .types
            .iter()
            .flatten()
            .map(|(_, events)| *events as usize)
            .sum::<usize>();
        report.skipped += done.skipped;
        self.acknowledge(done).await?;
        Ok(report)
    }

    /// Sends the XREADGROUP of every stream; the answers are taken by
    /// [`Self::take_read`].
    fn start_read(&self) -> impl std::future::Future<Output = ReadAhead> + 'static {
        let mut con = self.con.clone();
        let ids: Vec<StreamId> = self.streams.keys().cloned().collect();
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
        for (entries, (_, ids)) in done.types.iter().zip(&done.acks) {
            for ((kind, events), id) in entries.iter().zip(ids) {
                self.metrics
                    .applied
                    .get_or_create(&EventTypeLabels { r#type: kind })
                    .inc_by(*events);
                if let Some(ms) = entry_ms(id) {
                    // Once per event: the grants of a batch entry waited alike.
                    let lag = (now_ms - ms).max(0) as f64 / 1000.0;
                    for _ in 0..*events {
                        self.metrics.lag.observe(lag);
                    }
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
            if !self.shards.contains_key(&id) {
                tracing::info!(promotion = %id, "projecting a new promotion stream");
                let stream = PromotionKeys::new(&id).events;
                self.streams
                    .entry((id.clone(), 0))
                    .or_insert_with(|| StreamCursor::new(id.clone(), 0, stream));
                self.shards.insert(id, None);
            }
        }
        // Promotions whose shard map may still change: those that started
        // since have a locked one, and their other shards' streams (if any)
        // are followed from now on.
        let unsettled: Vec<PromotionId> = self
            .shards
            .iter()
            .filter(|(_, s)| s.is_none())
            .map(|(id, _)| id.clone())
            .collect();
        for map in discovery::locked_maps(&mut self.con, &unsettled)
            .await?
            .into_iter()
            .flatten()
        {
            self.settle(&map);
        }
        self.update_pending_gauge().await
    }

    /// Records `map` (locked) as its promotion's and follows each of its
    /// streams not followed yet.
    fn settle(&mut self, map: &ShardMap) {
        let id = map.id();
        self.shards.insert(id.clone(), Some(map.shards()));
        if map.is_sharded() {
            tracing::info!(promotion = %id, shards = map.shards(), "projecting every shard's stream");
        }
        for (stream, key) in discovery::streams_of(map) {
            self.streams
                .entry((id.clone(), stream.shard))
                .or_insert_with(|| StreamCursor::new(id.clone(), stream.shard, key));
        }
    }

    /// S of promotion `id`, one of whose streams delivered entries: its
    /// shard map is locked then (entries follow the start), so it is read
    /// now if discovery has not yet.
    async fn shards_of(&mut self, id: &PromotionId) -> Result<u32, ProjectorError> {
        if let Some(Some(shards)) = self.shards.get(id) {
            return Ok(*shards);
        }
        let map = discovery::locked_map(&mut self.con, id).await?;
        self.settle(&map);
        Ok(map.shards())
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
                out.push(((cursor.id.clone(), cursor.shard), claimed));
            }
        }
        Ok((out, total_fresh))
    }

    /// Decodes and applies the entries of one stream, and notes them for
    /// acknowledgement (stock move entries too: they change no read model);
    /// the undecodable ones are reported and left pending.
    async fn apply_entries(
        &mut self,
        key: &StreamId,
        entries: Vec<RawEntry>,
        done: &mut Applied,
    ) -> Result<(), ProjectorError> {
        let Some(stream_key) = self.streams.get(key).map(|c| c.stream.clone()) else {
            return Ok(());
        };
        if entries.is_empty() {
            return Ok(());
        }
        let (id, shard) = (&key.0, key.1);
        let shards = self.shards_of(id).await?;
        let stream = ShardStream { shard, shards };
        let mut events = Vec::with_capacity(entries.len());
        let mut types = Vec::with_capacity(entries.len());
        let mut ack = Vec::with_capacity(entries.len());
        for entry in entries {
            match decode_in(id, stream, &entry) {
                Ok(decoded) => {
                    types.push(decoded.counted());
                    if let Decoded::Events(decoded) = decoded {
                        events.extend(decoded);
                    }
                    ack.push(entry.id);
                }
                Err(reason) => {
                    done.skipped += 1;
                    if self.skipped.insert((stream_key.clone(), entry.id.clone())) {
                        self.metrics
                            .decode_failures
                            .get_or_create(&SkipKindLabels {
                                kind: reason.kind(),
                            })
                            .inc();
                        tracing::warn!(promotion = %id, shard, entry = %entry.id, kind = reason.kind(), error = %reason,
                            "skipping an entry this projector cannot apply; it stays pending");
                    }
                }
            }
        }
        if ack.is_empty() {
            return Ok(());
        }
        let written = async {
            let phase =
                read_model::apply_stream_to_models(&mut self.models, id, stream, &events).await?;
            let indexed = self.streams.get(key).and_then(|c| c.indexed);
            if let Some(phase) = phase.filter(|p| Some(*p) != indexed) {
                read_model::index_phase(&mut self.models, id, phase).await?;
                if let Some(c) = self.streams.get_mut(key) {
                    c.indexed = Some(phase);
                }
            }
            Ok::<(), ReadModelError>(())
        }
        .await;
        if let Err(e) = written {
            // Nothing acknowledged: re-read our own pending entries next time.
            if let Some(c) = self.streams.get_mut(key) {
                c.own_pending_from = Some("0".to_owned());
            }
            return Err(e.into());
        }
        done.types.push(types);
        done.acks.push((stream_key, ack));
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
    /// Per stream, parallel to `acks`: each entry's event type and how many
    /// events it held.
    types: Vec<Vec<(&'static str, u64)>>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entry_ids_carry_their_xadd_time() {
        assert_eq!(entry_ms("1700000000123-4"), Some(1_700_000_000_123));
        assert_eq!(entry_ms("garbage"), None);
    }
}
