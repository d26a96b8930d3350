//! The sales that run, watched from Redis.
//!
//! While a promotion is Active, customers move its numbers (coupons granted,
//! a sell-out) in Redis, and Kubernetes hears nothing of it. Rather than a
//! timer per promotion, the controller registers every running sale here with
//! what its status reports, and [`changes`] reads all of them at once every
//! poll interval: the length of each one's event stream (every grab, start
//! and finish appends to it), then the state of those whose stream grew.
//! Each is one pipeline on a standalone Redis; on a Redis Cluster every read
//! in flight at once, multiplexed over the connection to each node. It yields
//! only the promotions whose numbers moved, which the controller feeds to
//! `Controller::reconcile_on`. A quiet fleet costs one cheap read per
//! interval and no request to the API server.
//!
//! When numbers alone moved (granted, remaining), a sale is yielded once its
//! status interval since the last write is over, so a busy sale's status is
//! written at most once per interval; a new phase (a sell-out, an expiry
//! seen by a grab, a promotion Redis lost) is yielded at once. Redis turning
//! unreachable yields every sale whose status says Ready, once, so that their
//! Ready condition turns False; the first successful read after it yields
//! those that say it is not.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use futures::{Stream, StreamExt};
use kube::runtime::reflector::{ObjectRef, Store};
use seckill_workers::protocol::{
    self, FinishReason, PromotionId, PromotionKeys, ScriptError, Snapshot,
};
use seckill_workers::redis_connection::RedisConnection;
use tokio::time::{Instant, MissedTickBehavior};

use crate::lifecycle::{self, READY};
use crate::metrics::Metrics;
use crate::promotion::{Phase, Promotion, PromotionStatus};

/// What the poll compares: the numbers and the phase of a sale, as a status
/// reports them or as Redis has them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tally {
    pub phase: Option<Phase>,
    pub started: bool,
    pub finish_reason: Option<FinishReason>,
    pub granted: u64,
}

impl Tally {
    /// As `status` reports it.
    pub fn reported(status: &PromotionStatus) -> Self {
        Self {
            phase: status.phase,
            started: status.started_at.is_some(),
            finish_reason: status.finish_reason,
            granted: status.granted,
        }
    }

    /// As Redis has it (what [`lifecycle::decide`] would report from `snap`).
    pub fn seen(snap: &Snapshot) -> Self {
        Self {
            phase: Some(lifecycle::phase_of(snap)),
            started: snap.started_at.is_some(),
            finish_reason: snap.finish_reason,
            granted: if snap.exists { snap.granted } else { 0 },
        }
    }
}

/// What the controller last reported about one running sale.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reported {
    pub tally: Tally,
    /// The status says Ready=True.
    pub ready: bool,
    /// Until then, new numbers alone do not call for a reconcile: the last
    /// status write plus the status interval.
    pub quiet_until: Instant,
}

impl Reported {
    pub fn new(status: &PromotionStatus, quiet_until: Instant) -> Self {
        Self {
            tally: Tally::reported(status),
            ready: status.condition(READY).is_some_and(|c| c.status == "True"),
            quiet_until,
        }
    }
}

/// What one read of Redis found about one sale.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Seen {
    /// Redis could not be read.
    Unreachable,
    /// Redis answered; `recovered` when the read before this one failed.
    Tally { tally: Tally, recovered: bool },
}

/// Whether the sale must be reconciled now, given what its status reports
/// and what Redis has, at `now`.
pub fn is_due(reported: &Reported, seen: Seen, now: Instant) -> bool {
    match seen {
        Seen::Unreachable => reported.ready,
        Seen::Tally {
            recovered: true, ..
        } if !reported.ready => true,
        Seen::Tally { tally, .. } if tally == reported.tally => false,
        Seen::Tally { tally, .. } => {
            let numbers_only = Tally {
                granted: tally.granted,
                ..reported.tally
            } == tally;
            !(numbers_only && now < reported.quiet_until)
        }
    }
}

struct Watched {
    id: PromotionId,
    reported: Reported,
    /// The length of the promotion's event stream when its state was last
    /// read here; `None`: not read since the last reconcile.
    length: Option<u64>,
    /// That read found numbers the status does not show yet (held for the
    /// quiet time).
    moved: bool,
}

/// The watched sales in a fixed order, with the command that reads the
/// length of each one's event stream: rebuilt only when sales come or go.
#[derive(Default)]
struct Batch {
    order: Vec<ObjectRef<Promotion>>,
    lengths: Vec<redis::Cmd>,
}

#[derive(Default)]
struct State {
    watched: HashMap<ObjectRef<Promotion>, Watched>,
    batch: Option<Arc<Batch>>,
}

/// The running sales the controller watches, shared between the reconciles
/// (which register and forget) and the poll (which reads them).
#[derive(Default)]
pub struct RunningSales {
    state: Mutex<State>,
}

impl RunningSales {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Watches (or updates) the sale of `promotion`, whose status now says
    /// what `reported` holds. The next poll reads its state again.
    pub fn watch(&self, promotion: ObjectRef<Promotion>, id: PromotionId, reported: Reported) {
        let mut state = self.lock();
        if let Some(w) = state.watched.get_mut(&promotion) {
            w.reported = reported;
            w.length = None;
            w.moved = false;
            return;
        }
        state.watched.insert(
            promotion,
            Watched {
                id,
                reported,
                length: None,
                moved: false,
            },
        );
        state.batch = None;
    }

    /// Records what the status of a watched `promotion` now reports (a
    /// failed reconcile); a promotion not watched stays so.
    pub fn reported(&self, promotion: &ObjectRef<Promotion>, reported: Reported) {
        if let Some(w) = self.lock().watched.get_mut(promotion) {
            w.reported = reported;
            w.length = None;
        }
    }

    /// Stops watching `promotion` (not running, or gone).
    pub fn forget(&self, promotion: &ObjectRef<Promotion>) {
        let mut state = self.lock();
        if state.watched.remove(promotion).is_some() {
            state.batch = None;
        }
    }

    pub fn clear(&self) {
        let mut state = self.lock();
        state.watched.clear();
        state.batch = None;
    }

    pub fn len(&self) -> usize {
        self.lock().watched.len()
    }

    pub fn is_empty(&self) -> bool {
        self.lock().watched.is_empty()
    }

    /// The sales to read, forgetting those whose object left the store.
    fn batch(&self, present: impl Fn(&ObjectRef<Promotion>) -> bool) -> Arc<Batch> {
        let mut state = self.lock();
        let before = state.watched.len();
        state.watched.retain(|promotion, _| present(promotion));
        if state.watched.len() != before {
            state.batch = None;
        }
        let State { watched, batch } = &mut *state;
        batch
            .get_or_insert_with(|| {
                let (order, lengths) = watched
                    .iter()
                    .map(|(promotion, w)| {
                        let mut xlen = redis::cmd("XLEN");
                        xlen.arg(PromotionKeys::new(&w.id).events);
                        (promotion.clone(), xlen)
                    })
                    .unzip();
                Arc::new(Batch { order, lengths })
            })
            .clone()
    }

    /// The sales of `batch` whose event stream is not as long as when their
    /// state was last read: their state is to be read again.
    fn grown(&self, batch: &Batch, lengths: &[u64]) -> Vec<(usize, PromotionId)> {
        let state = self.lock();
        batch
            .order
            .iter()
            .zip(lengths)
            .enumerate()
            .filter_map(|(i, (promotion, length))| {
                let w = state.watched.get(promotion)?;
                (w.length != Some(*length)).then(|| (i, w.id.clone()))
            })
            .collect()
    }

    /// The sales due for a reconcile after one poll: `lengths` of every
    /// sale's stream (`None`: Redis could not be read), `read` the state of
    /// those whose stream grew (by index in the batch).
    fn due(
        &self,
        batch: &Batch,
        lengths: Option<&[u64]>,
        read: &HashMap<usize, Tally>,
        recovered: bool,
        now: Instant,
    ) -> Vec<ObjectRef<Promotion>> {
        let mut state = self.lock();
        let mut due = Vec::new();
        for (i, promotion) in batch.order.iter().enumerate() {
            let Some(w) = state.watched.get_mut(promotion) else {
                continue;
            };
            let is = match (lengths, read.get(&i)) {
                (None, _) => is_due(&w.reported, Seen::Unreachable, now),
                (Some(lengths), Some(tally)) => {
                    w.length = Some(lengths[i]);
                    w.moved = *tally != w.reported.tally;
                    let seen = Seen::Tally {
                        tally: *tally,
                        recovered,
                    };
                    is_due(&w.reported, seen, now)
                }
                // Nothing new in Redis: due only when Redis is back for a
                // status that says it was not, or when held numbers have
                // waited out their quiet time.
                (Some(_), None) => {
                    (recovered && !w.reported.ready) || (w.moved && now >= w.reported.quiet_until)
                }
            };
            if is {
                due.push(promotion.clone());
            }
        }
        due
    }
}

/// Reads the state of every promotion of `ids` in one batch (see
/// [`protocol::snapshots`]).
pub async fn read(
    con: &mut RedisConnection,
    ids: &[PromotionId],
) -> Result<Vec<Snapshot>, ScriptError> {
    protocol::snapshots(con, ids).await
}

/// One poll: the length of every watched sale's event stream (every grab,
/// start and finish appends to it), in one batch; then the state of those
/// whose stream grew, in a second batch; compared with what their status
/// reports ([`is_due`]). A quiet fleet costs one cheap read (XLEN).
async fn poll(
    sales: &RunningSales,
    redis: &mut RedisConnection,
    store: &Store<Promotion>,
    metrics: &Metrics,
    last_ok: &mut bool,
) -> Vec<ObjectRef<Promotion>> {
    let batch = sales.batch(|p| store.get(p).is_some());
    metrics.watched_sales.set(batch.order.len() as i64);
    if batch.order.is_empty() {
        return Vec::new();
    }
    let _poll = metrics.redis_poll_started();
    let result = async {
        let lengths: Vec<u64> = redis.query_each(batch.lengths.clone()).await?;
        let grown = sales.grown(&batch, &lengths);
        let ids: Vec<PromotionId> = grown.iter().map(|(_, id)| id.clone()).collect();
        let snapshots = if ids.is_empty() {
            Vec::new()
        } else {
            read(redis, &ids).await?
        };
        let read: HashMap<usize, Tally> = grown
            .iter()
            .zip(&snapshots)
            .map(|((i, _), snap)| (*i, Tally::seen(snap)))
            .collect();
        Ok::<_, ScriptError>((lengths, read))
    }
    .await;
    let now = Instant::now();
    match result {
        Ok((lengths, read)) => {
            let recovered = !*last_ok;
            *last_ok = true;
            sales.due(&batch, Some(&lengths), &read, recovered, now)
        }
        Err(e) => {
            if *last_ok {
                tracing::warn!(error = %e, sales = batch.order.len(), "cannot read the running sales from Redis");
            }
            metrics.redis_poll_failed();
            *last_ok = false;
            sales.due(&batch, None, &HashMap::new(), false, now)
        }
    }
}

/// The promotions to reconcile because Redis moved their numbers: every
/// `every`, the watched sales are read (`poll`) and compared with what
/// their status reports. A sale whose object left `store` is forgotten. Runs
/// as long as the stream is polled: the controller polls it with its other
/// triggers and drops it when it stops.
pub fn changes(
    sales: Arc<RunningSales>,
    redis: RedisConnection,
    every: Duration,
    store: Store<Promotion>,
    metrics: Metrics,
) -> impl Stream<Item = ObjectRef<Promotion>> + Send + 'static {
    let mut ticks = tokio::time::interval(every);
    ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let state = (ticks, redis, true);
    futures::stream::unfold(state, move |(mut ticks, mut redis, mut last_ok)| {
        let sales = sales.clone();
        let store = store.clone();
        let metrics = metrics.clone();
        async move {
            ticks.tick().await;
            let due = poll(&sales, &mut redis, &store, &metrics, &mut last_ok).await;
            metrics.poll_triggers.inc_by(due.len() as u64);
            Some((due, (ticks, redis, last_ok)))
        }
    })
    .flat_map(futures::stream::iter)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tally(phase: Phase, granted: u64) -> Tally {
        Tally {
            phase: Some(phase),
            started: phase != Phase::Pending,
            finish_reason: (phase == Phase::Finished).then_some(FinishReason::SoldOut),
            granted,
        }
    }

    fn reported(granted: u64, ready: bool, quiet_for: Duration, now: Instant) -> Reported {
        Reported {
            tally: tally(Phase::Active, granted),
            ready,
            quiet_until: now + quiet_for,
        }
    }

    fn seen(phase: Phase, granted: u64) -> Seen {
        Seen::Tally {
            tally: tally(phase, granted),
            recovered: false,
        }
    }

    #[test]
    fn a_sale_is_read_again_only_when_its_stream_grew_and_held_numbers_wait_out_the_quiet_time() {
        let now = Instant::now();
        let sales = RunningSales::default();
        let sale = ObjectRef::<Promotion>::new("sale").within("shop");
        let id = PromotionId::new("shop", "sale").unwrap();
        sales.watch(
            sale.clone(),
            id.clone(),
            reported(3, true, Duration::from_secs(1), now),
        );
        let batch = sales.batch(|_| true);
        assert_eq!(batch.order, std::slice::from_ref(&sale));
        // Never read: read, whatever the length.
        assert_eq!(sales.grown(&batch, &[7]), [(0, id.clone())]);
        let read = HashMap::from([(0, tally(Phase::Active, 4))]);
        // New numbers in the quiet time: held.
        assert!(sales.due(&batch, Some(&[7]), &read, false, now).is_empty());
        // The stream did not grow: not read again, and due once the quiet
        // time is over.
        assert!(sales.grown(&batch, &[7]).is_empty());
        let none = HashMap::new();
        assert!(sales.due(&batch, Some(&[7]), &none, false, now).is_empty());
        assert_eq!(
            sales.due(
                &batch,
                Some(&[7]),
                &none,
                false,
                now + Duration::from_secs(1)
            ),
            std::slice::from_ref(&sale)
        );
        // A reconcile reported it: read again at the next poll.
        sales.watch(
            sale.clone(),
            id.clone(),
            reported(4, true, Duration::from_secs(2), now),
        );
        assert_eq!(sales.grown(&batch, &[7]), [(0, id)]);
        // Redis unreachable: due, since the status says Ready.
        assert_eq!(sales.due(&batch, None, &none, false, now), [sale]);
    }

    #[test]
    fn unchanged_numbers_call_for_nothing() {
        let now = Instant::now();
        assert!(!is_due(
            &reported(3, true, Duration::ZERO, now),
            seen(Phase::Active, 3),
            now
        ));
    }

    #[test]
    fn new_numbers_are_due_once_the_quiet_time_is_over() {
        let now = Instant::now();
        let r = reported(3, true, Duration::from_secs(1), now);
        assert!(!is_due(&r, seen(Phase::Active, 4), now));
        assert!(is_due(
            &r,
            seen(Phase::Active, 4),
            now + Duration::from_secs(1)
        ));
    }

    #[test]
    fn a_new_phase_is_due_at_once_even_in_the_quiet_time() {
        let now = Instant::now();
        let r = reported(3, true, Duration::from_secs(1), now);
        assert!(is_due(&r, seen(Phase::Finished, 10), now));
        // Redis lost the promotion: it reads as unknown (Pending, 0).
        assert!(is_due(&r, seen(Phase::Pending, 0), now));
    }

    #[test]
    fn redis_unreachable_is_due_once_for_what_says_ready_and_recovery_for_what_does_not() {
        let now = Instant::now();
        assert!(is_due(
            &reported(3, true, Duration::ZERO, now),
            Seen::Unreachable,
            now
        ));
        assert!(!is_due(
            &reported(3, false, Duration::ZERO, now),
            Seen::Unreachable,
            now
        ));
        let back = Seen::Tally {
            tally: tally(Phase::Active, 3),
            recovered: true,
        };
        assert!(is_due(&reported(3, false, Duration::ZERO, now), back, now));
        assert!(!is_due(&reported(3, true, Duration::ZERO, now), back, now));
        // A promotion that fails for its own reasons while Redis answers is
        // left to the error policy's backoff.
        assert!(!is_due(
            &reported(3, false, Duration::ZERO, now),
            seen(Phase::Active, 3),
            now
        ));
    }
}
