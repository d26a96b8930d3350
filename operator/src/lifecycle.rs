//! The life of a promotion, decided without Kubernetes.
//!
//! [`decide`] is a pure function of the declared spec, the last reported
//! status, the promotion's state in Redis (a [`Snapshot`], which carries
//! Redis' clock) and the time: it says which Redis writes to make, what the
//! status is, which transitions to announce and when to look again. The
//! deadlines are judged on Redis' clock, the same clock the Lua scripts use,
//! so a host whose clock is skewed neither starts nor finishes anything early.
//!
//! [`drive`] and [`finish_deleted`] are the thin I/O layer around it: they run
//! the decided scripts against a [`RedisConnection`] and hand back the new
//! status. The Kubernetes controller patches that status onto the object;
//! `seckill up` (file manifests, no Kubernetes) keeps it in memory. Both make
//! the same decisions.

use std::time::Duration;

use chrono::{DateTime, Utc};
use seckill_workers::protocol::functions::{self, SNAPSHOT};
use seckill_workers::protocol::placement::{self, key_slot, SlotMap, SLOTS};
use seckill_workers::protocol::shards::{
    self, Replan, ShardCollect, ShardError, ShardMap, ShardPhase, StockView,
};
use seckill_workers::protocol::{
    self, Durability, FinishReason, PromotionId, PromotionKeys, ScheduleResult, ScriptError,
    Snapshot, PROMOTION_INDEX_KEY,
};
use seckill_workers::redis_connection::RedisConnection;

use crate::promotion::{
    validate, Condition, Phase, PromotionSpec, PromotionStatus, ShardPlacement,
};
use crate::Error;

/// How often `seckill up`, which has nothing but its own timers, looks at an
/// Active promotion again, so that coupons granted and a sell-out show on its
/// board within a second. The Kubernetes controller does not refresh on a
/// timer: it reads the running sales from Redis in one batch per interval
/// and reconciles those whose numbers moved (see [`crate::sales`]).
pub const ACTIVE_REFRESH: Duration = Duration::from_secs(1);

/// Condition type: the status reflects Redis as of the last reconcile.
pub const READY: &str = "Ready";
/// Condition type: a spec change made after the start was refused.
pub const SPEC_LOCKED: &str = "SpecLocked";
/// Condition type (sharded promotions): two shards share a master, so the
/// promotion gets fewer cores than shards (docs/SHARDING.md, topology drift).
pub const SHARDS_COLOCATED: &str = "ShardsColocated";
/// Ready's reason when S > 1 is refused for want of durable steps.
pub const SHARDS_NEED_DURABLE_STEPS: &str = "ShardsNeedDurableSteps";

/// How the operator runs sharded promotions (S > 1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShardSettings {
    /// Durable steps: a step another slot builds on is taken only once this
    /// many replicas hold the earlier one (probe write and WAIT).
    pub durable: Option<Durability>,
    /// The operator was told that every master runs `appendfsync always`:
    /// without replicas, that is what keeps an acknowledged step.
    pub fsync_always: bool,
    /// Stock moves pending at least this long (on their donor's clock) are
    /// completed by the reconcile; younger ones are left to their mover.
    pub move_stale_ms: u64,
}

impl Default for ShardSettings {
    fn default() -> Self {
        Self {
            durable: None,
            fsync_always: false,
            move_stale_ms: 2_000,
        }
    }
}

impl ShardSettings {
    /// Whether S > 1 may run (docs/SHARDING.md): a step acknowledged by one
    /// master and lost in its restart or failover, while another master
    /// keeps what was built on it, oversells. Only replicas that hold every
    /// step (WAIT) or a master that fsyncs every write prevent that.
    pub fn allows_shards(&self) -> bool {
        self.durable.is_some_and(|d| d.replicas >= 1) || self.fsync_always
    }
}

/// What the shards of a sharded promotion report: the part of the input of
/// [`decide_with`] an unsharded promotion does not have.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ShardsReport {
    /// S as the shard map records it; `None`: no map (never planned).
    pub planned: Option<u32>,
    /// The map says every shard is scheduled.
    pub ready: bool,
    /// Each shard's figures (index = shard), read once the map is ready.
    pub figures: Vec<ShardCollect>,
    /// Each shard's slot and current master.
    pub placement: Vec<ShardPlacement>,
}

impl ShardsReport {
    /// Stock moves not yet completed (pending records), over every shard.
    pub fn pending(&self) -> u64 {
        self.figures.iter().map(|f| f.pending).sum()
    }

    /// Stock left, over every shard.
    pub fn stock(&self) -> u64 {
        self.figures.iter().map(|f| f.stock).sum()
    }

    /// Grants over every shard (final once every shard is closed).
    pub fn granted(&self) -> u64 {
        self.figures.iter().map(|f| f.granted).sum()
    }

    /// The reason of a half-done Expired or Deleted finish (shard 0 Closing).
    pub fn closing(&self) -> Option<FinishReason> {
        self.figures
            .first()
            .filter(|f| f.phase == ShardPhase::Closing)
            .map(|f| f.finish_reason.unwrap_or(FinishReason::Expired))
    }

    /// Shard 0 started but some shard >= 1 is still Pending: the start was
    /// interrupted before it opened them all.
    fn unopened(&self) -> bool {
        self.figures
            .iter()
            .skip(1)
            .any(|f| f.phase == ShardPhase::Pending)
    }

    /// Pairs of shards on one master, as "1+2 on host:port".
    pub fn colocated(&self) -> Vec<String> {
        let mut by_master: Vec<(&str, Vec<u32>)> = Vec::new();
        for p in &self.placement {
            match by_master.iter_mut().find(|(m, _)| *m == p.master) {
                Some((_, shards)) => shards.push(p.shard),
                None => by_master.push((&p.master, vec![p.shard])),
            }
        }
        by_master
            .into_iter()
            .filter(|(_, shards)| shards.len() > 1)
            .map(|(m, shards)| {
                let list: Vec<String> = shards.iter().map(u32::to_string).collect();
                format!("{} on {m}", list.join("+"))
            })
            .collect()
    }
}

/// A Redis write the promotion needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Run `schedule`: register the spec, take a change made before the
    /// start, and start the promotion when its publish time has come.
    Schedule,
    /// Run `finish` with this reason (for a sharded promotion, the three
    /// phases: begin on shard 0, close the others, commit the total).
    Finish(FinishReason),
    /// Sharded, no map or one not ready: place the shards on the masters
    /// (the first plan wins: a recorded plan is continued), schedule every
    /// shard, then mark the map ready.
    PlanShards,
    /// Sharded, before the start: `spec.shards` differs from the plan.
    ReplanShards,
    /// Sharded: the one PromotionStarted on shard 0, then open the others.
    StartShards,
    /// Sharded and Active, no stock left in any shard and no move in
    /// flight: the double collect, so that a quiet sale still closes.
    CheckSoldOut,
    /// Sharded and Active with moves in flight: complete the stale ones (a
    /// mover that died between its steps).
    RecoverMoves,
}

/// A change worth telling people about (a Kubernetes Event, a log line).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transition {
    /// Scheduled, Started, SoldOut, Finished or SpecLocked.
    pub reason: &'static str,
    /// A sentence for people.
    pub note: String,
    /// True for what needs attention (a refused spec change).
    pub warning: bool,
}

/// What [`decide`] concluded.
#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    /// Redis writes to make, in this order; empty when Redis is as it should be.
    pub actions: Vec<Action>,
    /// The status as of the snapshot decided on.
    pub status: PromotionStatus,
    /// Announcements: what changed since `previous`.
    pub transitions: Vec<Transition>,
    /// When to decide again without outside news: exactly at the next
    /// deadline (publishTime, then finishTime), at most [`ACTIVE_REFRESH`]
    /// while Active, never once Finished (only a change of the object brings
    /// it back). For a driver that has no other way to see grabs.
    pub requeue_after: Option<Duration>,
    /// Exactly the time until the next deadline: publishTime while Pending,
    /// finishTime while Active, none once Finished. The controller requeues
    /// on this alone, and learns about grabs and sell-outs from
    /// [`crate::sales`].
    pub deadline: Option<Duration>,
}

fn millis(t: DateTime<Utc>) -> i64 {
    t.timestamp_millis()
}

fn from_millis(ms: i64) -> Option<DateTime<Utc>> {
    DateTime::from_timestamp_millis(ms)
}

/// Whether `now` has reached `t`.
fn past(now: DateTime<Utc>, t: DateTime<Utc>) -> bool {
    millis(now) >= millis(t)
}

/// Finish(Expired) once `now` has reached the spec's finishTime: for a
/// promotion not yet started, whose times Redis may not hold yet.
fn expired_by_spec(spec: &PromotionSpec, now: DateTime<Utc>) -> Option<Action> {
    past(now, spec.finish_time).then_some(Action::Finish(FinishReason::Expired))
}

/// Finish(Expired) once `now` has reached the finish time Redis holds: for
/// a started promotion, whose times are locked there.
fn expired_in_redis(snap: &Snapshot, now: DateTime<Utc>) -> Option<Action> {
    snap.finish_ms
        .is_some_and(|f| millis(now) >= f)
        .then_some(Action::Finish(FinishReason::Expired))
}

fn until(now: DateTime<Utc>, deadline_ms: i64) -> Duration {
    Duration::from_millis(deadline_ms.saturating_sub(millis(now)).max(0) as u64)
}

/// The registered spec differs from the declared one. Discounts are compared
/// with a tolerance because the scripts' JSON encoder prints 14 significant
/// digits.
fn differs(spec: &PromotionSpec, snap: &Snapshot) -> bool {
    let discount_differs = match snap.discount {
        Some(d) => (d - spec.discount).abs() > 1e-9,
        None => true,
    };
    discount_differs
        || snap.number_of_coupons != Some(spec.number_of_coupons)
        || snap.publish_ms != Some(millis(spec.publish_time))
        || snap.finish_ms != Some(millis(spec.finish_time))
}

/// The phase Redis' state says the promotion is in (Pending when Redis does
/// not know it).
pub fn phase_of(snap: &Snapshot) -> Phase {
    if !snap.exists {
        return Phase::Pending;
    }
    snap.phase.unwrap_or(Phase::Pending)
}

fn parse_time(s: Option<&str>) -> Option<DateTime<Utc>> {
    s.and_then(|s| DateTime::parse_from_rfc3339(s).ok())
        .map(|t| t.with_timezone(&Utc))
}

/// Sets a condition, keeping its lastTransitionTime when its status did not
/// change (Kubernetes API conventions).
fn condition(
    previous: Option<&PromotionStatus>,
    type_: &str,
    status: bool,
    reason: &str,
    message: String,
    generation: Option<i64>,
    now: DateTime<Utc>,
) -> Condition {
    let status = if status { "True" } else { "False" };
    let last_transition_time = previous
        .and_then(|p| p.condition(type_))
        .filter(|c| c.status == status)
        .map(|c| c.last_transition_time)
        .unwrap_or(now);
    Condition {
        type_: type_.to_owned(),
        status: status.to_owned(),
        reason: reason.to_owned(),
        message,
        last_transition_time,
        observed_generation: generation,
    }
}

/// Decides what `spec` needs given Redis' `snap` at `now` (Redis' clock:
/// pass `snap.now`), and what its status is. `previous` is the status last
/// reported, used for transitions and condition times. An unsharded
/// promotion: [`decide_with`] without shards.
pub fn decide(
    spec: &PromotionSpec,
    generation: Option<i64>,
    previous: Option<&PromotionStatus>,
    snap: &Snapshot,
    now: DateTime<Utc>,
) -> Decision {
    decide_with(
        spec,
        generation,
        previous,
        snap,
        &ShardsReport::default(),
        true,
        now,
    )
}

/// [`decide`] with what the shards report: `snap` is shard 0's state (the
/// promotion's stream and its start and finish live there), `shards` the
/// map and every shard's figures. `shards_allowed`: the operator's
/// durability allows S > 1 ([`ShardSettings::allows_shards`]). A spec with
/// one shard and no map is decided exactly as before sharding existed.
pub fn decide_with(
    spec: &PromotionSpec,
    generation: Option<i64>,
    previous: Option<&PromotionStatus>,
    snap: &Snapshot,
    shards: &ShardsReport,
    shards_allowed: bool,
    now: DateTime<Utc>,
) -> Decision {
    if spec.shards > 1 || shards.planned.is_some() {
        return decide_sharded(
            spec,
            generation,
            previous,
            snap,
            shards,
            shards_allowed,
            now,
        );
    }
    let phase = phase_of(snap);
    let changed = snap.exists && differs(spec, snap);
    let mut actions = Vec::new();
    let mut locked = snap.result == ScheduleResult::Locked;
    if !snap.exists {
        actions.push(Action::Schedule);
        actions.extend(expired_by_spec(spec, now));
    } else {
        match phase {
            Phase::Pending if !snap.started => {
                if changed || past(now, spec.publish_time) {
                    actions.push(Action::Schedule);
                }
                actions.extend(expired_by_spec(spec, now));
            }
            Phase::Finished => locked |= changed,
            // Active (or a Pending state with the started flag, which the
            // scripts never leave behind): the spec is locked.
            _ => {
                locked |= changed;
                actions.extend(expired_in_redis(snap, now));
            }
        }
    }

    let status = status_of(spec, generation, previous, snap, locked, now);
    let transitions = transitions(previous, &status);
    let (deadline, running) = next_deadline(spec, snap, phase, now);
    Decision::new(actions, status, transitions, deadline, running)
}

/// The time until the next deadline of the promotion as Redis holds it
/// (publishTime while Pending, finishTime once started, none once
/// Finished), and whether it is running: started and not finished, so
/// grabs move its numbers meanwhile.
fn next_deadline(
    spec: &PromotionSpec,
    snap: &Snapshot,
    phase: Phase,
    now: DateTime<Utc>,
) -> (Option<Duration>, bool) {
    match phase {
        _ if !snap.exists => (Some(until(now, millis(spec.publish_time))), false),
        Phase::Finished => (None, false),
        Phase::Pending if !snap.started => (
            Some(until(
                now,
                snap.publish_ms.unwrap_or(millis(spec.publish_time)),
            )),
            false,
        ),
        // Active (or a Pending state with the started flag, which the
        // scripts never leave behind).
        _ => (
            Some(until(
                now,
                snap.finish_ms.unwrap_or(millis(spec.finish_time)),
            )),
            true,
        ),
    }
}

impl Decision {
    /// A decision that requeues at `deadline`, and at most every
    /// [`ACTIVE_REFRESH`] while `running`.
    fn new(
        actions: Vec<Action>,
        status: PromotionStatus,
        transitions: Vec<Transition>,
        deadline: Option<Duration>,
        running: bool,
    ) -> Self {
        let requeue_after = if running {
            deadline.map(|d| d.min(ACTIVE_REFRESH))
        } else {
            deadline
        };
        Decision {
            actions,
            status,
            transitions,
            requeue_after,
            deadline,
        }
    }
}

/// What to do when the object is deleted: finish it (Deleted) unless Redis
/// does not know it or it is already over.
pub fn decide_deletion(snap: &Snapshot) -> Option<Action> {
    (snap.exists && !snap.is_finished()).then_some(Action::Finish(FinishReason::Deleted))
}

fn decide_sharded(
    spec: &PromotionSpec,
    generation: Option<i64>,
    previous: Option<&PromotionStatus>,
    snap: &Snapshot,
    shards: &ShardsReport,
    allowed: bool,
    now: DateTime<Utc>,
) -> Decision {
    let phase = phase_of(snap);
    let changed = snap.exists && differs(spec, snap);
    let started = snap.exists && (snap.started || phase != Phase::Pending);
    let mut actions = Vec::new();
    let mut locked = snap.result == ScheduleResult::Locked;
    let mut refused = false;
    match shards.planned {
        None if !allowed => refused = true,
        None => actions.push(Action::PlanShards),
        // A changed shard count: replanned before the start (docs/SHARDING.md),
        // locked after it like the rest of the spec.
        Some(s) if s != spec.shards => {
            if started {
                locked = true;
            } else if spec.shards > 1 && !allowed {
                refused = true;
            } else {
                actions.push(Action::ReplanShards);
            }
        }
        Some(_) if !shards.ready => actions.push(Action::PlanShards),
        Some(_) => match phase {
            Phase::Pending if !started => {
                if changed {
                    actions.push(Action::Schedule);
                }
                if past(now, spec.publish_time) {
                    actions.push(Action::StartShards);
                }
                actions.extend(expired_by_spec(spec, now));
            }
            Phase::Finished => locked |= changed,
            _ => {
                locked |= changed;
                if let Some(reason) = shards.closing() {
                    actions.push(Action::Finish(reason));
                } else if let Some(expired) = expired_in_redis(snap, now) {
                    actions.push(expired);
                } else {
                    if shards.unopened() {
                        actions.push(Action::StartShards);
                    }
                    if shards.pending() > 0 {
                        actions.push(Action::RecoverMoves);
                    } else if !shards.figures.is_empty() && shards.stock() == 0 {
                        actions.push(Action::CheckSoldOut);
                    }
                }
            }
        },
    }

    let mut status = status_of(spec, generation, previous, snap, locked, now);
    sharded_status(&mut status, spec, generation, previous, snap, shards, now);
    if refused {
        status.phase = Some(Phase::Pending);
        let message = format!(
            "refused {} shards: sharding needs durable steps (--durable-replicas >= 1 with replicas, \
             or --shards-without-replicas-needs-fsync-always on masters that all run appendfsync always); \
             the promotion is not scheduled",
            spec.shards
        );
        let ready = condition(
            previous,
            READY,
            false,
            SHARDS_NEED_DURABLE_STEPS,
            message,
            generation,
            now,
        );
        status.conditions.retain(|c| c.type_ != READY);
        status.conditions.insert(0, ready);
    }
    let mut transitions = transitions(previous, &status);
    if refused && !snap.exists {
        // Nothing was registered in Redis.
        transitions.retain(|t| t.reason != "Scheduled");
    }
    let (deadline, running) = match next_deadline(spec, snap, phase, now) {
        _ if refused => (None, false),
        // Running: no stream tells the operator about grabs on shards >= 1,
        // so it looks again every ACTIVE_REFRESH (recovery of stale moves,
        // the sold-out check, the summed numbers), whatever the controller
        // does with the deadline.
        (deadline, true) => (deadline.map(|d| d.min(ACTIVE_REFRESH)), true),
        other => other,
    };
    Decision::new(actions, status, transitions, deadline, running)
}

/// The sharded part of a status: numbers summed over the shards (the
/// promotion's total from shard 0 once finished), moves in flight, where
/// each shard lives, and ShardsColocated.
fn sharded_status(
    status: &mut PromotionStatus,
    spec: &PromotionSpec,
    generation: Option<i64>,
    previous: Option<&PromotionStatus>,
    snap: &Snapshot,
    shards: &ShardsReport,
    now: DateTime<Utc>,
) {
    let coupons = snap.number_of_coupons.unwrap_or(spec.number_of_coupons);
    let granted = if !snap.exists {
        0
    } else if status.phase == Some(Phase::Finished) {
        shards
            .figures
            .first()
            .and_then(|f| f.total_granted)
            .unwrap_or_else(|| shards.granted())
    } else {
        shards.granted()
    };
    status.granted = granted;
    status.remaining = coupons.saturating_sub(granted);
    status.stock_moves_in_flight = Some(shards.pending());
    status.shards.clone_from(&shards.placement);
    if let Some(ready) = status.conditions.iter_mut().find(|c| c.type_ == READY) {
        ready.message = match status.phase {
            Some(Phase::Active) => format!(
                "{granted} of {coupons} coupons granted over {} shards",
                shards.planned.unwrap_or(spec.shards)
            ),
            Some(Phase::Finished) => format!(
                "finished ({}) with {granted} coupons granted",
                status
                    .finish_reason
                    .map(FinishReason::as_str)
                    .unwrap_or("unknown")
            ),
            _ => ready.message.clone(),
        };
    }
    if let Some(locked) = status
        .conditions
        .iter_mut()
        .find(|c| c.type_ == SPEC_LOCKED && c.status == "True")
    {
        if let Some(s) = shards.planned {
            locked.message = format!("{}, shards {s}", locked.message);
        }
    }
    if !shards.placement.is_empty() {
        let together = shards.colocated();
        let c = if together.is_empty() {
            condition(
                previous,
                SHARDS_COLOCATED,
                false,
                "OneMasterPerShard",
                format!(
                    "each of the {} shards has a master of its own",
                    shards.placement.len()
                ),
                generation,
                now,
            )
        } else {
            condition(
                previous,
                SHARDS_COLOCATED,
                true,
                "SharedMaster",
                format!(
                    "shards share a master ({}): fewer cores than shards serve this promotion; \
                     move a slot (CLUSTER SETSLOT) to spread them",
                    together.join("; ")
                ),
                generation,
                now,
            )
        };
        status.conditions.push(c);
    }
}

fn status_of(
    spec: &PromotionSpec,
    generation: Option<i64>,
    previous: Option<&PromotionStatus>,
    snap: &Snapshot,
    locked: bool,
    now: DateTime<Utc>,
) -> PromotionStatus {
    let phase = phase_of(snap);
    let (granted, remaining) = if snap.exists {
        (snap.granted, snap.remaining())
    } else {
        (0, spec.number_of_coupons)
    };
    let finish_reason = snap.finish_reason;
    let ready_message = match phase {
        Phase::Pending => format!("waiting for publishTime {}", spec.publish_time.to_rfc3339()),
        Phase::Active => format!(
            "{granted} of {} coupons granted",
            snap.number_of_coupons.unwrap_or(spec.number_of_coupons)
        ),
        Phase::Finished => format!(
            "finished ({}) with {granted} coupons granted",
            finish_reason.map(FinishReason::as_str).unwrap_or("unknown")
        ),
    };
    let lock_message = if locked {
        format!(
            "the spec changed after the start and was refused; the promotion keeps discount {}, numberOfCoupons {}, publishTime {}, finishTime {}",
            snap.discount.unwrap_or_default(),
            snap.number_of_coupons.unwrap_or_default(),
            snap.publish_ms.and_then(from_millis).map(|t| t.to_rfc3339()).unwrap_or_default(),
            snap.finish_ms.and_then(from_millis).map(|t| t.to_rfc3339()).unwrap_or_default(),
        )
    } else {
        "the declared spec is the one in effect".to_owned()
    };
    PromotionStatus {
        phase: Some(phase),
        granted,
        remaining,
        stock_moves_in_flight: None,
        shards: Vec::new(),
        started_at: parse_time(snap.started_at.as_deref()),
        finished_at: parse_time(snap.finished_at.as_deref()),
        finish_reason,
        observed_generation: generation,
        conditions: vec![
            condition(
                previous,
                READY,
                true,
                phase.as_str(),
                ready_message,
                generation,
                now,
            ),
            condition(
                previous,
                SPEC_LOCKED,
                locked,
                if locked {
                    "ChangedAfterStart"
                } else {
                    "SpecInEffect"
                },
                lock_message,
                generation,
                now,
            ),
        ],
    }
}

/// The status to report when Redis could not be reached: what was last known,
/// with Ready=False saying why.
pub fn unavailable_status(
    previous: Option<&PromotionStatus>,
    generation: Option<i64>,
    reason: &str,
    message: String,
    now: DateTime<Utc>,
) -> PromotionStatus {
    let mut status = previous.cloned().unwrap_or_default();
    let ready = condition(previous, READY, false, reason, message, generation, now);
    status.conditions.retain(|c| c.type_ != READY);
    status.conditions.insert(0, ready);
    status
}

/// Whether a status just decided goes to the API server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StatusWrite {
    /// The same content as reported: nothing to write.
    Unchanged,
    /// Write it now.
    Now,
    /// Only the running numbers moved (granted, remaining and the Ready
    /// message that counts them) and the last write is more recent than the
    /// status interval: keep the reported status for this much longer.
    Hold(Duration),
}

/// Decides [`StatusWrite`] for `status` given the one `reported` (on the
/// object), how long ago this process last wrote the promotion's status, and
/// the `interval` below which numbers alone do not justify a write. Anything
/// else (phase, times, finish reason, conditions, observedGeneration) is
/// written at once: those are the changes people and tools wait for.
pub fn status_write(
    reported: Option<&PromotionStatus>,
    status: &PromotionStatus,
    since_last_write: Option<Duration>,
    interval: Duration,
) -> StatusWrite {
    let Some(reported) = reported else {
        return StatusWrite::Now;
    };
    if reported == status {
        return StatusWrite::Unchanged;
    }
    match since_last_write {
        Some(since) if since < interval && only_numbers_differ(reported, status) => {
            StatusWrite::Hold(interval - since)
        }
        _ => StatusWrite::Now,
    }
}

/// Whether `a` and `b` differ in the running numbers only.
fn only_numbers_differ(a: &PromotionStatus, b: &PromotionStatus) -> bool {
    let mut b = b.clone();
    b.granted = a.granted;
    b.remaining = a.remaining;
    b.stock_moves_in_flight = a.stock_moves_in_flight;
    if let (Some(ready_a), Some(ready_b)) = (
        a.condition(READY),
        b.conditions.iter_mut().find(|c| c.type_ == READY),
    ) {
        ready_b.message.clone_from(&ready_a.message);
    }
    *a == b
}

fn transitions(previous: Option<&PromotionStatus>, status: &PromotionStatus) -> Vec<Transition> {
    let before = previous.cloned().unwrap_or_default();
    let mut out = Vec::new();
    let mut say = |reason, note: String, warning| {
        out.push(Transition {
            reason,
            note,
            warning,
        })
    };
    if before.phase.is_none() {
        say("Scheduled", "registered in Redis".to_owned(), false);
    }
    if before.started_at.is_none() {
        if let Some(at) = status.started_at {
            say(
                "Started",
                format!("coupons can be grabbed since {}", at.to_rfc3339()),
                false,
            );
        }
    }
    if status.finish_reason == Some(FinishReason::SoldOut)
        && before.finish_reason != Some(FinishReason::SoldOut)
    {
        say(
            "SoldOut",
            format!("all {} coupons granted", status.granted),
            false,
        );
    }
    if before.finished_at.is_none() {
        if let Some(at) = status.finished_at {
            let reason = status
                .finish_reason
                .map(FinishReason::as_str)
                .unwrap_or("unknown");
            say(
                "Finished",
                format!(
                    "finished ({reason}) at {} with {} coupons granted",
                    at.to_rfc3339(),
                    status.granted
                ),
                false,
            );
        }
    }
    let was_locked = before
        .condition(SPEC_LOCKED)
        .is_some_and(|c| c.status == "True");
    if let Some(c) = status.condition(SPEC_LOCKED).filter(|c| c.status == "True") {
        if !was_locked {
            say("SpecLocked", c.message.clone(), true);
        }
    }
    let refused = |s: &PromotionStatus| {
        s.condition(READY)
            .is_some_and(|c| c.reason == SHARDS_NEED_DURABLE_STEPS)
    };
    if refused(status) && !refused(&before) {
        if let Some(c) = status.condition(READY) {
            say("ShardsRefused", c.message.clone(), true);
        }
    }
    let was_colocated = before
        .condition(SHARDS_COLOCATED)
        .is_some_and(|c| c.status == "True");
    if let Some(c) = status
        .condition(SHARDS_COLOCATED)
        .filter(|c| c.status == "True")
    {
        if !was_colocated {
            say("ShardsColocated", c.message.clone(), true);
        }
    }
    out
}

/// The outcome of [`drive`].
#[derive(Debug, Clone, PartialEq)]
pub struct Driven {
    pub status: PromotionStatus,
    pub transitions: Vec<Transition>,
    /// See [`Decision::requeue_after`].
    pub requeue_after: Option<Duration>,
    /// See [`Decision::deadline`].
    pub deadline: Option<Duration>,
    /// The last state read from or written to Redis.
    pub snapshot: Snapshot,
}

impl Driven {
    /// What a drive leaves after its last `decision`: its status, and when
    /// to look again; a drive that stopped with writes still wanted
    /// (`settled` false) looks again soon.
    fn after(decision: Decision, settled: bool, snapshot: Snapshot) -> Self {
        let soon = |then: Option<Duration>| if settled { then } else { Some(ACTIVE_REFRESH) };
        Self {
            status: decision.status,
            transitions: decision.transitions,
            requeue_after: soon(decision.requeue_after),
            deadline: soon(decision.deadline),
            snapshot,
        }
    }
}

/// At most this many rounds of decide-then-write per call; two suffice
/// (register and start, then finish an expired window), the rest is margin.
const MAX_ROUNDS: usize = 4;

/// Brings Redis in line with `spec` and returns the new status: reads the
/// promotion's snapshot, runs the scripts [`decide`] asks for, and decides
/// again on their answer until nothing is left to do. After a successful
/// `schedule` the promotion id is added to the promotion index, through
/// which projectors discover its stream. Idempotent: scripts append each
/// event once however often this runs, from however many processes.
///
/// Refuses a spec that breaks [`validate`] without touching Redis. A
/// sharded spec is refused with a status (Ready=False,
/// ShardsNeedDurableSteps), as [`ShardSettings::default`] has no durable
/// steps: see [`drive_with`].
pub async fn drive(
    con: &mut RedisConnection,
    id: &PromotionId,
    spec: &PromotionSpec,
    generation: Option<i64>,
    previous: Option<&PromotionStatus>,
) -> Result<Driven, Error> {
    drive_with(
        con,
        id,
        spec,
        generation,
        previous,
        &ShardSettings::default(),
    )
    .await
}

/// Whether `previous` reports a sharded promotion: a spec changed back to
/// one shard must still meet its shard map (to replan it).
fn was_sharded(previous: Option<&PromotionStatus>) -> bool {
    previous.is_some_and(|p| p.stock_moves_in_flight.is_some())
}

/// [`drive`] with the operator's settings for sharded promotions. A spec
/// with one shard (never sharded) makes exactly the Redis calls it made
/// before sharding existed; S > 1 reads shard 0's state, the shard map and
/// every shard's figures, decides ([`decide_with`]) and runs the protocol's
/// shard steps.
pub async fn drive_with(
    con: &mut RedisConnection,
    id: &PromotionId,
    spec: &PromotionSpec,
    generation: Option<i64>,
    previous: Option<&PromotionStatus>,
    settings: &ShardSettings,
) -> Result<Driven, Error> {
    validate(spec).map_err(Error::InvalidSpec)?;
    let goal = Goal {
        id,
        spec,
        generation,
        previous,
    };
    if spec.shards > 1 || was_sharded(previous) {
        return drive_sharded(con, &goal, settings).await;
    }
    let driven = drive_unsharded(con, &goal).await?;
    if driven.snapshot.result == ScheduleResult::Sharded {
        // Redis holds a sharded promotion this status never reported (a
        // status lost, or a spec changed back to one shard): replan it.
        return drive_sharded(con, &goal, settings).await;
    }
    Ok(driven)
}

/// What one drive brings Redis in line with.
struct Goal<'a> {
    id: &'a PromotionId,
    spec: &'a PromotionSpec,
    generation: Option<i64>,
    /// The status last reported, for transitions and condition times.
    previous: Option<&'a PromotionStatus>,
}

/// The time Redis answered `snap` at: every decision of a drive is taken
/// on Redis' clock, not on this process'.
fn redis_now(snap: &Snapshot) -> DateTime<Utc> {
    from_millis(snap.now).unwrap_or_else(Utc::now)
}

async fn drive_unsharded(con: &mut RedisConnection, goal: &Goal<'_>) -> Result<Driven, Error> {
    let Goal { id, spec, .. } = *goal;
    let wire = spec.to_protocol();
    let mut snap = protocol::snapshot(con, id).await?;
    let mut rounds = 0;
    loop {
        let decision = decide(
            spec,
            goal.generation,
            goal.previous,
            &snap,
            redis_now(&snap),
        );
        rounds += 1;
        if decision.actions.is_empty() || rounds >= MAX_ROUNDS {
            // Writes still wanted after the last round: look again soon.
            let settled = decision.actions.is_empty();
            return Ok(Driven::after(decision, settled, snap));
        }
        for action in decision.actions {
            snap = match action {
                Action::Schedule => {
                    let s = protocol::schedule(con, id, &wire).await?;
                    index(con, id).await?;
                    s
                }
                Action::Finish(reason) => protocol::finish(con, id, reason).await?,
                // [`decide`] asks for shard steps only with a shard map,
                // which this path never reads.
                Action::PlanShards
                | Action::ReplanShards
                | Action::StartShards
                | Action::CheckSoldOut
                | Action::RecoverMoves => return Err(no_map(id)),
            };
        }
    }
}

async fn index(con: &mut RedisConnection, id: &PromotionId) -> Result<(), Error> {
    redis::cmd("SADD")
        .arg(PROMOTION_INDEX_KEY)
        .arg(id.to_string())
        .query_async::<i64>(con)
        .await
        .map_err(|e| Error::Redis(protocol::ScriptError::Redis(e)))?;
    Ok(())
}

/// Rounds of a sharded drive: plan (or replan, then plan), start, finish an
/// expired window, with margin.
const MAX_SHARDED_ROUNDS: usize = 6;

/// What one read of a sharded promotion found.
struct ShardedRead {
    /// Shard 0's state (a Closing shard 0 reads as Active: the finish it
    /// began is still to complete).
    snapshot: Snapshot,
    report: ShardsReport,
    /// The recorded map (ready or not); `None`: no map.
    map: Option<ShardMap>,
}

async fn drive_sharded(
    con: &mut RedisConnection,
    goal: &Goal<'_>,
    settings: &ShardSettings,
) -> Result<Driven, Error> {
    let Goal { id, spec, .. } = *goal;
    let wire = spec.to_protocol();
    // A maintenance action (recovery of young moves, a sold-out check that
    // saw a change) may be asked for again at once: each runs once per
    // drive, the next reconcile takes it up.
    let mut done: Vec<Action> = Vec::new();
    let mut rounds = 0;
    loop {
        let read = read_sharded(con, id).await?;
        let decision = decide_with(
            spec,
            goal.generation,
            goal.previous,
            &read.snapshot,
            &read.report,
            settings.allows_shards(),
            redis_now(&read.snapshot),
        );
        rounds += 1;
        let todo: Vec<Action> = decision
            .actions
            .iter()
            .copied()
            .filter(|a| !done.contains(a))
            .collect();
        if todo.is_empty() || rounds >= MAX_SHARDED_ROUNDS {
            let settled = todo.is_empty();
            return Ok(Driven::after(decision, settled, read.snapshot));
        }
        for action in todo {
            run_sharded(con, id, spec, &wire, read.map.as_ref(), action, settings).await?;
            done.push(action);
        }
    }
}

fn no_map(id: &PromotionId) -> Error {
    Error::Shard(ShardError::Map {
        id: id.clone(),
        detail: "no shard map".into(),
    })
}

/// Runs one decided action of a sharded promotion (or of one whose map is
/// gone after a replan to one shard: then the unsharded scripts).
async fn run_sharded(
    con: &mut RedisConnection,
    id: &PromotionId,
    spec: &PromotionSpec,
    wire: &protocol::PromotionSpec,
    map: Option<&ShardMap>,
    action: Action,
    settings: &ShardSettings,
) -> Result<(), Error> {
    let durable = settings.durable;
    match (action, map) {
        (Action::Schedule, None) => {
            protocol::schedule(con, id, wire).await?;
            index(con, id).await?;
        }
        (Action::Schedule, Some(map)) => {
            shards::schedule(con, map, wire, durable).await?;
        }
        (Action::Finish(reason), None) => {
            protocol::finish(con, id, reason).await?;
        }
        (Action::Finish(reason), Some(map)) => {
            shards::finish(con, map, reason, durable).await?;
        }
        (Action::PlanShards, _) => {
            let slots = slot_map(con).await?;
            let placement = placement::place(id, spec.shards, &slots)?;
            // The first plan wins: continue with the recorded one. One of
            // another S is replanned in the next round.
            let map = shards::plan(con, id, &placement).await?;
            if map.shards() == spec.shards {
                shards::schedule(con, &map, wire, durable).await?;
                index(con, id).await?;
            }
        }
        (Action::ReplanShards, _) => {
            let placement = if spec.shards > 1 {
                Some(placement::place(id, spec.shards, &slot_map(con).await?)?)
            } else {
                None
            };
            match shards::replan(con, id, placement.as_ref()).await? {
                Replan::Replanned { dropped } => {
                    tracing::info!(promotion = %id, shards = spec.shards, dropped, "shards replanned before the start");
                }
                // Started meanwhile (the next round reports it locked), or
                // the map is gone (the next round plans).
                Replan::Started | Replan::Unplanned => {}
            }
        }
        (Action::StartShards, Some(map)) => {
            shards::start(con, map, durable).await?;
        }
        (Action::CheckSoldOut, Some(map)) => {
            let mut view = StockView::new(map.shards());
            let check = shards::check_sold_out(con, map, &mut view, durable).await?;
            tracing::debug!(promotion = %id, ?check, "sold-out check");
        }
        (Action::RecoverMoves, Some(map)) => {
            let done = shards::recover_stale(con, map, settings.move_stale_ms, durable).await?;
            if done > 0 {
                tracing::info!(promotion = %id, moves = done, "completed stale stock moves");
            }
        }
        (Action::StartShards | Action::CheckSoldOut | Action::RecoverMoves, None) => {
            return Err(no_map(id))
        }
    }
    Ok(())
}

/// Shard 0's state, as the unsharded snapshot function reads it; a shard 0
/// Closing (a finish begun, not committed) reads as Active, the phase the
/// status keeps until the finish is committed.
async fn shard0_snapshot(con: &mut RedisConnection, id: &PromotionId) -> Result<Snapshot, Error> {
    let cmd = functions::command(SNAPSHOT, &[&PromotionKeys::new(id).state], []);
    let reply: String = functions::call(con, &cmd)
        .await
        .map_err(ScriptError::from)?;
    let bad = |e: serde_json::Error| Error::Redis(ScriptError::BadReply(format!("{e}: {reply}")));
    let mut value: serde_json::Value = serde_json::from_str(&reply).map_err(bad)?;
    if value.get("phase").and_then(serde_json::Value::as_str) == Some("Closing") {
        value["phase"] = Phase::Active.as_str().into();
    }
    serde_json::from_value(value).map_err(bad)
}

/// Reads a sharded promotion: shard 0's state, the shard map, every shard's
/// figures (all at once: on a cluster they multiplex over the connection
/// to each master) and where each shard lives now.
async fn read_sharded(con: &mut RedisConnection, id: &PromotionId) -> Result<ShardedRead, Error> {
    let snapshot = shard0_snapshot(con, id).await?;
    let Some(shards::RecordedMap { map, ready }) = shards::read_map(con, id).await? else {
        return Ok(ShardedRead {
            snapshot,
            report: ShardsReport::default(),
            map: None,
        });
    };
    let figures = if ready {
        let each = (0..map.shards()).map(|shard| {
            let mut c = con.clone();
            let map = &map;
            async move { shards::collect(&mut c, map, shard, None).await }
        });
        futures::future::try_join_all(each).await?
    } else {
        Vec::new()
    };
    let slots = slot_map(con).await?;
    let placement = placement_of(&map, &slots);
    Ok(ShardedRead {
        snapshot,
        report: ShardsReport {
            planned: Some(map.shards()),
            ready,
            figures,
            placement,
        },
        map: Some(map),
    })
}

/// Each shard of `map`: its slot and the master serving it in `slots`.
pub fn placement_of(map: &ShardMap, slots: &SlotMap) -> Vec<ShardPlacement> {
    (0..map.shards())
        .filter_map(|shard| {
            let slot = key_slot(&map.keys(shard)?.state);
            let master = slots
                .master_of(slot)
                .and_then(|m| slots.masters().get(m))
                .cloned()
                .unwrap_or_else(|| "unserved".to_owned());
            Some(ShardPlacement {
                shard,
                slot,
                master,
            })
        })
        .collect()
}

/// The master address a standalone Redis is reported as.
pub const STANDALONE: &str = "standalone";

/// The cluster's slot map (`CLUSTER SLOTS`, through the cluster connection);
/// a standalone Redis is one master serving every slot.
async fn slot_map(con: &mut RedisConnection) -> Result<SlotMap, Error> {
    if !con.is_cluster() {
        return Ok(SlotMap::new([(0, SLOTS - 1, STANDALONE.to_owned())]));
    }
    let reply: redis::Value = redis::cmd("CLUSTER")
        .arg("SLOTS")
        .query_async(con)
        .await
        .map_err(ScriptError::from)?;
    let ranges = parse_cluster_slots(&reply)
        .ok_or_else(|| Error::Redis(ScriptError::BadReply(format!("CLUSTER SLOTS: {reply:?}"))))?;
    Ok(SlotMap::new(ranges))
}

fn value_text(v: &redis::Value) -> Option<String> {
    match v {
        redis::Value::BulkString(b) => String::from_utf8(b.clone()).ok(),
        redis::Value::SimpleString(s) => Some(s.clone()),
        redis::Value::Int(i) => Some(i.to_string()),
        _ => None,
    }
}

fn value_int(v: &redis::Value) -> Option<i64> {
    match v {
        redis::Value::Int(i) => Some(*i),
        other => value_text(other)?.parse().ok(),
    }
}

/// `(first slot, last slot, "host:port" of the master)` from a `CLUSTER
/// SLOTS` reply: `[[first, last, [host, port, id, ...], replica...], ...]`.
pub fn parse_cluster_slots(reply: &redis::Value) -> Option<Vec<(u16, u16, String)>> {
    let redis::Value::Array(ranges) = reply else {
        return None;
    };
    ranges
        .iter()
        .map(|range| {
            let redis::Value::Array(fields) = range else {
                return None;
            };
            let first = u16::try_from(value_int(fields.first()?)?).ok()?;
            let last = u16::try_from(value_int(fields.get(1)?)?).ok()?;
            let redis::Value::Array(master) = fields.get(2)? else {
                return None;
            };
            let host = value_text(master.first()?)?;
            let port = value_int(master.get(1)?)?;
            Some((first, last, format!("{host}:{port}")))
        })
        .collect()
}

/// [`finish_deleted`] for any promotion: a sharded one is finished through
/// the three phases (begin on shard 0, close the others, commit the total).
/// The snapshot's `result` is `finished` when this call finished it, and
/// its `granted` the promotion's total.
pub async fn finish_deleted_with(
    con: &mut RedisConnection,
    id: &PromotionId,
    spec: &PromotionSpec,
    previous: Option<&PromotionStatus>,
    settings: &ShardSettings,
) -> Result<Snapshot, Error> {
    if spec.shards <= 1 && !was_sharded(previous) {
        return finish_deleted(con, id).await;
    }
    let read = read_sharded(con, id).await?;
    let Some(map) = read.map else {
        return finish_deleted(con, id).await;
    };
    if !read.snapshot.exists || read.snapshot.is_finished() {
        return Ok(read.snapshot);
    }
    match shards::finish(con, &map, FinishReason::Deleted, settings.durable).await {
        Ok(shards::Finish::Finished { reason, total }) => Ok(Snapshot {
            result: if reason == FinishReason::Deleted {
                ScheduleResult::Finished
            } else {
                ScheduleResult::AlreadyFinished
            },
            granted: total,
            finish_reason: Some(reason),
            ..read.snapshot
        }),
        Ok(shards::Finish::NotDue { .. }) => Ok(read.snapshot),
        // A plan whose shards were never all scheduled: nothing started.
        Err(ShardError::Unknown(_)) => Ok(read.snapshot),
        Err(e) => Err(e.into()),
    }
}

/// Finishes a deleted promotion (reason Deleted) unless Redis does not know
/// it or it is over already. Returns the snapshot after the call, whose
/// `result` is `finished` when this call finished it.
pub async fn finish_deleted(
    con: &mut RedisConnection,
    id: &PromotionId,
) -> Result<Snapshot, Error> {
    let snap = protocol::snapshot(con, id).await?;
    match decide_deletion(&snap) {
        Some(Action::Finish(reason)) => Ok(protocol::finish(con, id, reason).await?),
        _ => Ok(snap),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: i64 = 1_800_000_000_000; // publishTime
    const T1: i64 = T0 + 3_600_000; // finishTime

    fn at(ms: i64) -> DateTime<Utc> {
        from_millis(ms).unwrap()
    }

    fn spec() -> PromotionSpec {
        PromotionSpec {
            publish_time: at(T0),
            finish_time: at(T1),
            number_of_coupons: 10,
            discount: 0.2,
            description: None,
            shards: 1,
        }
    }

    fn unknown(now: i64) -> Snapshot {
        Snapshot {
            result: ScheduleResult::Snapshot,
            exists: false,
            now,
            phase: None,
            started: false,
            discount: None,
            number_of_coupons: None,
            granted: 0,
            publish_ms: None,
            finish_ms: None,
            started_at: None,
            finished_at: None,
            finish_reason: None,
        }
    }

    fn registered(now: i64, phase: &str) -> Snapshot {
        let started = phase != "Pending";
        Snapshot {
            exists: true,
            phase: Phase::parse(phase),
            started,
            discount: Some(0.2),
            number_of_coupons: Some(10),
            publish_ms: Some(T0),
            finish_ms: Some(T1),
            started_at: started.then(|| "2027-01-15T08:00:00.000Z".into()),
            ..unknown(now)
        }
    }

    fn finished(now: i64, reason: FinishReason, granted: u64) -> Snapshot {
        Snapshot {
            granted,
            finished_at: Some("2027-01-15T08:30:00.000Z".into()),
            finish_reason: Some(reason),
            ..registered(now, "Finished")
        }
    }

    fn decide_at(snap: &Snapshot, previous: Option<&PromotionStatus>) -> Decision {
        decide(&spec(), Some(1), previous, snap, at(snap.now))
    }

    fn reasons(d: &Decision) -> Vec<&'static str> {
        d.transitions.iter().map(|t| t.reason).collect()
    }

    /// Whether `d` announces `reason` as a warning.
    fn warned(d: &Decision, reason: &str) -> bool {
        d.transitions
            .iter()
            .any(|t| t.reason == reason && t.warning)
    }

    #[test]
    fn an_unknown_promotion_is_scheduled_and_requeued_exactly_at_publish_time() {
        let d = decide_at(&unknown(T0 - 5_000), None);
        assert_eq!(d.actions, [Action::Schedule]);
        assert_eq!(d.requeue_after, Some(Duration::from_millis(5_000)));
        assert_eq!(d.status.phase, Some(Phase::Pending));
        assert_eq!(d.status.remaining, 10);
    }

    #[test]
    fn an_unknown_promotion_whose_window_passed_is_scheduled_then_expired() {
        let d = decide_at(&unknown(T1 + 1), None);
        assert_eq!(
            d.actions,
            [Action::Schedule, Action::Finish(FinishReason::Expired)]
        );
    }

    #[test]
    fn a_pending_promotion_waits_for_exactly_its_publish_time() {
        let d = decide_at(&registered(T0 - 1_234, "Pending"), None);
        assert!(d.actions.is_empty());
        assert_eq!(d.requeue_after, Some(Duration::from_millis(1_234)));
        assert_eq!(reasons(&d), ["Scheduled"]);
        let again = decide_at(&registered(T0 - 1_000, "Pending"), Some(&d.status));
        assert!(again.transitions.is_empty(), "{:?}", again.transitions);
    }

    #[test]
    fn a_pending_promotion_is_started_at_publish_time_not_a_millisecond_before() {
        assert!(decide_at(&registered(T0 - 1, "Pending"), None)
            .actions
            .is_empty());
        assert_eq!(
            decide_at(&registered(T0, "Pending"), None).actions,
            [Action::Schedule]
        );
    }

    #[test]
    fn a_spec_changed_before_the_start_is_rescheduled() {
        let mut snap = registered(T0 - 10_000, "Pending");
        snap.number_of_coupons = Some(5);
        let d = decide_at(&snap, None);
        assert_eq!(d.actions, [Action::Schedule]);
        assert_eq!(d.status.condition(SPEC_LOCKED).unwrap().status, "False");
    }

    #[test]
    fn an_active_promotion_is_refreshed_every_second_then_finished_exactly_at_finish_time() {
        let d = decide_at(&registered(T0 + 10, "Active"), None);
        assert!(d.actions.is_empty());
        assert_eq!(d.requeue_after, Some(ACTIVE_REFRESH));
        let near = decide_at(&registered(T1 - 300, "Active"), None);
        assert_eq!(near.requeue_after, Some(Duration::from_millis(300)));
        assert!(decide_at(&registered(T1 - 1, "Active"), None)
            .actions
            .is_empty());
        assert_eq!(
            decide_at(&registered(T1, "Active"), None).actions,
            [Action::Finish(FinishReason::Expired)]
        );
    }

    #[test]
    fn an_active_promotion_reports_granted_and_remaining() {
        let mut snap = registered(T0 + 10, "Active");
        snap.granted = 3;
        let d = decide_at(&snap, None);
        assert_eq!((d.status.granted, d.status.remaining), (3, 7));
        assert_eq!(d.status.phase, Some(Phase::Active));
        assert!(d.status.started_at.is_some());
        assert_eq!(reasons(&d), ["Scheduled", "Started"]);
    }

    #[test]
    fn a_spec_changed_after_the_start_is_locked_not_rescheduled() {
        let mut snap = registered(T0 + 10, "Active");
        snap.discount = Some(0.5);
        let d = decide_at(&snap, None);
        assert!(d.actions.is_empty());
        let c = d.status.condition(SPEC_LOCKED).unwrap();
        assert_eq!(
            (c.status.as_str(), c.reason.as_str()),
            ("True", "ChangedAfterStart")
        );
        assert!(warned(&d, "SpecLocked"));
        // Announced once, not on every refresh.
        let again = decide_at(&snap, Some(&d.status));
        assert!(!reasons(&again).contains(&"SpecLocked"));
        assert_eq!(
            again
                .status
                .condition(SPEC_LOCKED)
                .unwrap()
                .last_transition_time,
            c.last_transition_time
        );
    }

    #[test]
    fn a_locked_answer_from_schedule_sets_spec_locked() {
        let mut snap = registered(T0 + 10, "Active");
        snap.result = ScheduleResult::Locked;
        let d = decide_at(&snap, None);
        assert_eq!(d.status.condition(SPEC_LOCKED).unwrap().status, "True");
    }

    #[test]
    fn a_sold_out_promotion_is_finished_and_never_requeued() {
        let active = decide_at(&registered(T0 + 10, "Active"), None).status;
        let d = decide_at(&finished(T0 + 20, FinishReason::SoldOut, 10), Some(&active));
        assert!(d.actions.is_empty());
        assert_eq!(d.requeue_after, None);
        assert_eq!(d.status.phase, Some(Phase::Finished));
        assert_eq!((d.status.granted, d.status.remaining), (10, 0));
        assert_eq!(reasons(&d), ["SoldOut", "Finished"]);
        let again = decide_at(
            &finished(T0 + 30, FinishReason::SoldOut, 10),
            Some(&d.status),
        );
        assert!(again.transitions.is_empty());
    }

    #[test]
    fn an_expired_promotion_announces_finished_not_sold_out() {
        let active = decide_at(&registered(T0 + 10, "Active"), None).status;
        let d = decide_at(&finished(T1, FinishReason::Expired, 4), Some(&active));
        assert_eq!(reasons(&d), ["Finished"]);
        assert_eq!(d.status.finish_reason, Some(FinishReason::Expired));
    }

    #[test]
    fn ready_keeps_its_transition_time_while_true_and_flips_on_unavailability() {
        let first = decide(
            &spec(),
            Some(1),
            None,
            &registered(T0 - 10, "Pending"),
            at(T0 - 10),
        );
        let second = decide(
            &spec(),
            Some(1),
            Some(&first.status),
            &registered(T0 + 5, "Active"),
            at(T0 + 5),
        );
        let t = |s: &PromotionStatus| s.condition(READY).unwrap().last_transition_time;
        assert_eq!(t(&first.status), t(&second.status));
        let down = unavailable_status(
            Some(&second.status),
            Some(1),
            "RedisUnavailable",
            "down".into(),
            at(T0 + 9),
        );
        let ready = down.condition(READY).unwrap();
        assert_eq!(
            (ready.status.as_str(), ready.reason.as_str()),
            ("False", "RedisUnavailable")
        );
        assert_eq!(ready.last_transition_time, at(T0 + 9));
        assert_eq!(down.granted, second.status.granted);
        assert_eq!(down.conditions.len(), 2);
    }

    #[test]
    fn the_deadline_is_exactly_publish_time_then_finish_time_then_none() {
        assert_eq!(
            decide_at(&unknown(T0 - 5_000), None).deadline,
            Some(Duration::from_millis(5_000))
        );
        assert_eq!(
            decide_at(&registered(T0 - 1_234, "Pending"), None).deadline,
            Some(Duration::from_millis(1_234))
        );
        // Active: the finish time, not a refresh a second later.
        let d = decide_at(&registered(T0 + 10, "Active"), None);
        assert_eq!(
            d.deadline,
            Some(Duration::from_millis((T1 - T0 - 10) as u64))
        );
        assert_eq!(d.requeue_after, Some(ACTIVE_REFRESH));
        assert_eq!(
            decide_at(&finished(T0 + 20, FinishReason::SoldOut, 10), None).deadline,
            None
        );
    }

    fn active_with(granted: u64, previous: Option<&PromotionStatus>) -> PromotionStatus {
        let mut snap = registered(T0 + 10, "Active");
        snap.granted = granted;
        decide_at(&snap, previous).status
    }

    const INTERVAL: Duration = Duration::from_secs(2);

    #[test]
    fn a_status_equal_to_the_reported_one_is_not_written() {
        let reported = active_with(3, None);
        let again = active_with(3, Some(&reported));
        assert_eq!(
            status_write(Some(&reported), &again, None, INTERVAL),
            StatusWrite::Unchanged
        );
        assert_eq!(
            status_write(
                Some(&reported),
                &again,
                Some(Duration::from_millis(1)),
                INTERVAL
            ),
            StatusWrite::Unchanged
        );
    }

    #[test]
    fn new_numbers_wait_for_the_status_interval_since_the_last_write() {
        let reported = active_with(3, None);
        let moved = active_with(5, Some(&reported));
        assert_eq!(
            status_write(
                Some(&reported),
                &moved,
                Some(Duration::from_millis(500)),
                INTERVAL
            ),
            StatusWrite::Hold(Duration::from_millis(1_500))
        );
        assert_eq!(
            status_write(Some(&reported), &moved, Some(INTERVAL), INTERVAL),
            StatusWrite::Now
        );
        // Nothing written by this process yet (a restart): written at once.
        assert_eq!(
            status_write(Some(&reported), &moved, None, INTERVAL),
            StatusWrite::Now
        );
        assert_eq!(status_write(None, &moved, None, INTERVAL), StatusWrite::Now);
    }

    #[test]
    fn a_new_phase_or_condition_is_written_at_once_even_within_the_interval() {
        let just = Some(Duration::from_millis(1));
        let reported = active_with(9, None);
        let sold_out = decide_at(
            &finished(T0 + 20, FinishReason::SoldOut, 10),
            Some(&reported),
        )
        .status;
        assert_eq!(
            status_write(Some(&reported), &sold_out, just, INTERVAL),
            StatusWrite::Now
        );
        let down = unavailable_status(
            Some(&reported),
            Some(1),
            "RedisUnavailable",
            "down".into(),
            at(T0 + 30),
        );
        assert_eq!(
            status_write(Some(&reported), &down, just, INTERVAL),
            StatusWrite::Now
        );
        let mut new_generation = reported.clone();
        new_generation.observed_generation = Some(2);
        assert_eq!(
            status_write(Some(&reported), &new_generation, just, INTERVAL),
            StatusWrite::Now
        );
    }

    #[test]
    fn deletion_finishes_only_what_is_registered_and_not_over() {
        assert_eq!(decide_deletion(&unknown(T0)), None);
        assert_eq!(
            decide_deletion(&registered(T0 - 1, "Pending")),
            Some(Action::Finish(FinishReason::Deleted))
        );
        assert_eq!(
            decide_deletion(&registered(T0 + 1, "Active")),
            Some(Action::Finish(FinishReason::Deleted))
        );
        assert_eq!(
            decide_deletion(&finished(T1, FinishReason::SoldOut, 10)),
            None
        );
    }

    // ------------------------------------------------------------ sharded

    fn sharded_spec(shards: u32) -> PromotionSpec {
        PromotionSpec { shards, ..spec() }
    }

    fn figures(phase: ShardPhase, stock: u64, pending: u64, granted: u64) -> ShardCollect {
        ShardCollect {
            phase,
            stock,
            pending,
            epoch: 0,
            granted,
            now_ms: T0,
            finish_reason: None,
            total_granted: None,
        }
    }

    fn placed(masters: &[&str]) -> Vec<ShardPlacement> {
        masters
            .iter()
            .enumerate()
            .map(|(i, m)| ShardPlacement {
                shard: i as u32,
                slot: i as u16,
                master: (*m).to_owned(),
            })
            .collect()
    }

    /// Three shards on three masters, each with these figures.
    fn report(each: &[ShardCollect]) -> ShardsReport {
        ShardsReport {
            planned: Some(each.len() as u32),
            ready: true,
            figures: each.to_vec(),
            placement: placed(&["a:1", "b:2", "c:3"][..each.len()]),
        }
    }

    /// `decide_with` for an operator whose settings do not allow shards,
    /// with no shard map in Redis.
    fn decide_unallowed(
        spec: &PromotionSpec,
        snap: &Snapshot,
        previous: Option<&PromotionStatus>,
    ) -> Decision {
        let no_map = ShardsReport::default();
        decide_with(spec, Some(1), previous, snap, &no_map, false, at(snap.now))
    }

    fn decide_sharded_at(
        shards: u32,
        snap: &Snapshot,
        report: &ShardsReport,
        previous: Option<&PromotionStatus>,
    ) -> Decision {
        decide_with(
            &sharded_spec(shards),
            Some(1),
            previous,
            snap,
            report,
            true,
            at(snap.now),
        )
    }

    /// Three planned shards holding 4, 3 and 3 coupons, not yet started.
    fn pending3() -> ShardsReport {
        report(&[
            figures(ShardPhase::Pending, 4, 0, 0),
            figures(ShardPhase::Pending, 3, 0, 0),
            figures(ShardPhase::Pending, 3, 0, 0),
        ])
    }

    fn active3(stock: [u64; 3], pending: [u64; 3], granted: [u64; 3]) -> ShardsReport {
        report(&[
            figures(ShardPhase::Active, stock[0], pending[0], granted[0]),
            figures(ShardPhase::Active, stock[1], pending[1], granted[1]),
            figures(ShardPhase::Active, stock[2], pending[2], granted[2]),
        ])
    }

    #[test]
    fn one_shard_without_a_map_is_decided_exactly_as_an_unsharded_promotion() {
        for snap in [
            unknown(T0 - 5_000),
            registered(T0 - 1_234, "Pending"),
            registered(T0 + 10, "Active"),
            registered(T1, "Active"),
            finished(T0 + 20, FinishReason::SoldOut, 10),
        ] {
            let plain = decide_at(&snap, None);
            let with = decide_unallowed(&spec(), &snap, None);
            assert_eq!(plain, with, "{snap:?}");
            assert_eq!(with.status.stock_moves_in_flight, None);
            assert!(with.status.shards.is_empty());
            assert!(with.status.condition(SHARDS_COLOCATED).is_none());
        }
    }

    #[test]
    fn an_unplanned_sharded_promotion_is_planned_first() {
        let d = decide_sharded_at(3, &unknown(T0 - 5_000), &ShardsReport::default(), None);
        assert_eq!(d.actions, [Action::PlanShards]);
        assert_eq!(d.deadline, Some(Duration::from_millis(5_000)));
        assert_eq!(d.status.remaining, 10);
    }

    #[test]
    fn a_plan_not_yet_ready_is_continued_not_replaced() {
        let half = ShardsReport {
            planned: Some(3),
            ready: false,
            ..ShardsReport::default()
        };
        let d = decide_sharded_at(3, &registered(T0 - 5_000, "Pending"), &half, None);
        assert_eq!(d.actions, [Action::PlanShards]);
    }

    #[test]
    fn sharding_without_durable_steps_is_refused_with_a_condition_and_an_event_and_nothing_scheduled(
    ) {
        let snap = unknown(T0 - 5_000);
        let d = decide_unallowed(&sharded_spec(3), &snap, None);
        assert!(d.actions.is_empty());
        assert_eq!(d.deadline, None);
        let ready = d.status.condition(READY).unwrap();
        assert_eq!(
            (ready.status.as_str(), ready.reason.as_str()),
            ("False", SHARDS_NEED_DURABLE_STEPS)
        );
        assert!(ready.message.contains("--durable-replicas"));
        assert_eq!(reasons(&d), ["ShardsRefused"], "not Scheduled: nothing was");
        assert!(d.transitions[0].warning);
        // Announced once.
        let again = decide_unallowed(&sharded_spec(3), &snap, Some(&d.status));
        assert!(!reasons(&again).contains(&"ShardsRefused"));
    }

    #[test]
    fn the_settings_allow_shards_only_with_replicas_or_an_fsync_always_acknowledgement() {
        let mut s = ShardSettings::default();
        assert!(!s.allows_shards());
        s.fsync_always = true;
        assert!(s.allows_shards());
        s.fsync_always = false;
        s.durable = Some(Durability {
            replicas: 1,
            timeout: Duration::from_millis(100),
        });
        assert!(s.allows_shards());
    }

    #[test]
    fn a_sharded_promotion_starts_at_publish_time_not_a_millisecond_before() {
        let pending = pending3();
        let before = decide_sharded_at(3, &registered(T0 - 1, "Pending"), &pending, None);
        assert!(before.actions.is_empty());
        assert_eq!(before.deadline, Some(Duration::from_millis(1)));
        let due = decide_sharded_at(3, &registered(T0, "Pending"), &pending, None);
        assert_eq!(due.actions, [Action::StartShards]);
    }

    #[test]
    fn a_start_interrupted_before_every_shard_opened_is_completed() {
        let mut r = active3([4, 3, 3], [0; 3], [0; 3]);
        r.figures[2].phase = ShardPhase::Pending;
        let d = decide_sharded_at(3, &registered(T0 + 10, "Active"), &r, None);
        assert_eq!(d.actions, [Action::StartShards]);
    }

    #[test]
    fn a_sharded_status_sums_the_shards_counts_moves_and_places_each_shard() {
        let mut snap = registered(T0 + 10, "Active");
        snap.granted = 2; // shard 0's own count
        let r = active3([1, 0, 2], [0, 1, 0], [2, 3, 1]);
        let d = decide_sharded_at(3, &snap, &r, None);
        assert_eq!((d.status.granted, d.status.remaining), (6, 4));
        assert_eq!(d.status.stock_moves_in_flight, Some(1));
        assert_eq!(d.status.shards, r.placement);
        let c = d.status.condition(SHARDS_COLOCATED).unwrap();
        assert_eq!(c.status, "False");
    }

    #[test]
    fn a_finished_sharded_promotion_reports_shard_zeros_total() {
        let mut r = report(&[
            figures(ShardPhase::Finished, 0, 0, 4),
            figures(ShardPhase::Finished, 0, 0, 3),
            figures(ShardPhase::Finished, 0, 0, 3),
        ]);
        r.figures[0].total_granted = Some(10);
        r.figures[0].finish_reason = Some(FinishReason::SoldOut);
        let snap = finished(T0 + 20, FinishReason::SoldOut, 4);
        let d = decide_sharded_at(3, &snap, &r, None);
        assert!(d.actions.is_empty());
        assert_eq!((d.status.granted, d.status.remaining), (10, 0));
        assert_eq!(d.deadline, None);
    }

    #[test]
    fn two_shards_on_one_master_set_shards_colocated_and_warn_once() {
        let mut r = active3([3, 3, 3], [0; 3], [0; 3]);
        r.placement = placed(&["a:1", "b:2", "a:1"]);
        let snap = registered(T0 + 10, "Active");
        let d = decide_sharded_at(3, &snap, &r, None);
        let c = d.status.condition(SHARDS_COLOCATED).unwrap();
        assert_eq!(
            (c.status.as_str(), c.reason.as_str()),
            ("True", "SharedMaster")
        );
        assert!(c.message.contains("0+2 on a:1"), "{}", c.message);
        assert!(warned(&d, "ShardsColocated"));
        let again = decide_sharded_at(3, &snap, &r, Some(&d.status));
        assert!(!reasons(&again).contains(&"ShardsColocated"));
    }

    #[test]
    fn an_active_sharded_promotion_recovers_moves_in_flight_before_any_sold_out_check() {
        let snap = registered(T0 + 10, "Active");
        let d = decide_sharded_at(3, &snap, &active3([0, 0, 0], [0, 2, 0], [4, 3, 1]), None);
        assert_eq!(d.actions, [Action::RecoverMoves]);
        // Active: looked at again every ACTIVE_REFRESH (no stream tells
        // about grabs on shards >= 1).
        assert_eq!(d.deadline, Some(ACTIVE_REFRESH));
    }

    #[test]
    fn a_quiet_sharded_sale_with_no_stock_anywhere_gets_the_sold_out_check() {
        let snap = registered(T0 + 10, "Active");
        let empty = decide_sharded_at(3, &snap, &active3([0; 3], [0; 3], [4, 3, 3]), None);
        assert_eq!(empty.actions, [Action::CheckSoldOut]);
        let stocked = decide_sharded_at(3, &snap, &active3([0, 1, 0], [0; 3], [4, 2, 3]), None);
        assert!(stocked.actions.is_empty());
    }

    #[test]
    fn a_sharded_promotion_expires_at_finish_time_and_a_half_done_finish_is_completed() {
        let r = active3([1, 1, 1], [0; 3], [1, 1, 1]);
        assert!(
            decide_sharded_at(3, &registered(T1 - 1, "Active"), &r, None)
                .actions
                .is_empty()
        );
        assert_eq!(
            decide_sharded_at(3, &registered(T1, "Active"), &r, None).actions,
            [Action::Finish(FinishReason::Expired)]
        );
        let mut closing = r.clone();
        closing.figures[0].phase = ShardPhase::Closing;
        closing.figures[0].finish_reason = Some(FinishReason::Deleted);
        assert_eq!(
            decide_sharded_at(3, &registered(T0 + 10, "Active"), &closing, None).actions,
            [Action::Finish(FinishReason::Deleted)]
        );
    }

    #[test]
    fn a_changed_shard_count_is_replanned_before_the_start_and_locked_after_it() {
        let pending = pending3();
        let d = decide_sharded_at(2, &registered(T0 - 10, "Pending"), &pending, None);
        assert_eq!(d.actions, [Action::ReplanShards]);
        let back_to_one = decide_sharded_at(1, &registered(T0 - 10, "Pending"), &pending, None);
        assert_eq!(back_to_one.actions, [Action::ReplanShards]);

        let running = active3([1, 1, 1], [0; 3], [1, 1, 1]);
        let d = decide_sharded_at(2, &registered(T0 + 10, "Active"), &running, None);
        assert!(d.actions.is_empty());
        let c = d.status.condition(SPEC_LOCKED).unwrap();
        assert_eq!(c.status, "True");
        assert!(c.message.contains("shards 3"), "{}", c.message);
    }

    #[test]
    fn the_master_of_each_range_is_read_from_cluster_slots() {
        use redis::Value;
        let node = |host: &str, port: i64, id: &str| {
            Value::Array(vec![
                Value::BulkString(host.as_bytes().to_vec()),
                Value::Int(port),
                Value::BulkString(id.as_bytes().to_vec()),
            ])
        };
        let reply = Value::Array(vec![
            Value::Array(vec![
                Value::Int(0),
                Value::Int(5460),
                node("127.0.0.1", 7000, "a"),
                node("127.0.0.1", 7003, "d"),
            ]),
            Value::Array(vec![
                Value::Int(5461),
                Value::Int(16383),
                node("127.0.0.1", 7001, "b"),
            ]),
        ]);
        assert_eq!(
            parse_cluster_slots(&reply).unwrap(),
            [
                (0, 5460, "127.0.0.1:7000".to_owned()),
                (5461, 16383, "127.0.0.1:7001".to_owned())
            ]
        );
        assert_eq!(parse_cluster_slots(&Value::Int(1)), None);
    }
}
