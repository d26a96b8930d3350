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
use seckill_workers::protocol::{
    self, FinishReason, PromotionId, ScheduleResult, Snapshot, PROMOTION_INDEX_KEY,
};
use seckill_workers::redis_connection::RedisConnection;

use crate::promotion::{validate, Condition, Phase, PromotionSpec, PromotionStatus};
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

/// A Redis write the promotion needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Run `schedule`: register the spec, take a change made before the
    /// start, and start the promotion when its publish time has come.
    Schedule,
    /// Run `finish` with this reason.
    Finish(FinishReason),
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
/// reported, used for transitions and condition times.
pub fn decide(
    spec: &PromotionSpec,
    generation: Option<i64>,
    previous: Option<&PromotionStatus>,
    snap: &Snapshot,
    now: DateTime<Utc>,
) -> Decision {
    let phase = phase_of(snap);
    let changed = snap.exists && differs(spec, snap);
    let now_ms = millis(now);
    let mut actions = Vec::new();
    let mut locked = snap.result == ScheduleResult::Locked;
    if !snap.exists {
        actions.push(Action::Schedule);
        if now_ms >= millis(spec.finish_time) {
            actions.push(Action::Finish(FinishReason::Expired));
        }
    } else {
        match phase {
            Phase::Pending if !snap.started => {
                if changed || now_ms >= millis(spec.publish_time) {
                    actions.push(Action::Schedule);
                }
                if now_ms >= millis(spec.finish_time) {
                    actions.push(Action::Finish(FinishReason::Expired));
                }
            }
            Phase::Finished => locked |= changed,
            // Active (or a Pending state with the started flag, which the
            // scripts never leave behind): the spec is locked.
            _ => {
                locked |= changed;
                if snap.finish_ms.is_some_and(|f| now_ms >= f) {
                    actions.push(Action::Finish(FinishReason::Expired));
                }
            }
        }
    }

    let status = status_of(spec, generation, previous, snap, locked, now);
    let transitions = transitions(previous, &status);
    // `running`: Active (or a Pending state with the started flag, which the
    // scripts never leave behind), where grabs move the numbers.
    let (deadline, running) = match phase {
        _ if !snap.exists => (Some(until(now, millis(spec.publish_time))), false),
        Phase::Finished => (None, false),
        Phase::Pending if !snap.started => (
            Some(until(
                now,
                snap.publish_ms.unwrap_or(millis(spec.publish_time)),
            )),
            false,
        ),
        _ => (
            Some(until(
                now,
                snap.finish_ms.unwrap_or(millis(spec.finish_time)),
            )),
            true,
        ),
    };
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

/// What to do when the object is deleted: finish it (Deleted) unless Redis
/// does not know it or it is already over.
pub fn decide_deletion(snap: &Snapshot) -> Option<Action> {
    (snap.exists && !snap.is_finished()).then_some(Action::Finish(FinishReason::Deleted))
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
/// Refuses a spec that breaks [`validate`] without touching Redis.
pub async fn drive(
    con: &mut RedisConnection,
    id: &PromotionId,
    spec: &PromotionSpec,
    generation: Option<i64>,
    previous: Option<&PromotionStatus>,
) -> Result<Driven, Error> {
    validate(spec).map_err(Error::InvalidSpec)?;
    let wire = spec.to_protocol();
    let mut snap = protocol::snapshot(con, id).await?;
    let mut rounds = 0;
    loop {
        let now = from_millis(snap.now).unwrap_or_else(Utc::now);
        let decision = decide(spec, generation, previous, &snap, now);
        rounds += 1;
        if decision.actions.is_empty() || rounds >= MAX_ROUNDS {
            // Writes still wanted after the last round: look again soon.
            let settled = decision.actions.is_empty();
            return Ok(Driven {
                status: decision.status,
                transitions: decision.transitions,
                requeue_after: if settled {
                    decision.requeue_after
                } else {
                    Some(ACTIVE_REFRESH)
                },
                deadline: if settled {
                    decision.deadline
                } else {
                    Some(ACTIVE_REFRESH)
                },
                snapshot: snap,
            });
        }
        for action in decision.actions {
            snap = match action {
                Action::Schedule => {
                    let s = protocol::schedule(con, id, &wire).await?;
                    index(con, id).await?;
                    s
                }
                Action::Finish(reason) => protocol::finish(con, id, reason).await?,
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
        assert!(d
            .transitions
            .iter()
            .any(|t| t.reason == "SpecLocked" && t.warning));
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
}
