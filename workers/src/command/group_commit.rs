//! Group commit: grabs of one promotion share Redis calls.
//!
//! Every promotion has a lane per home shard ([`Home`]): one lane for an
//! unsharded promotion, S for one sharded over S shards, since a batch must
//! be one shard's customers to be one slot's atomic call. A grab that finds
//! its lane idle starts a
//! driver and is sent at once, alone (no timer: no added latency when the
//! load is light). Grabs that arrive while a call of their promotion is in
//! flight queue in the lane and go together in the next call, up to
//! `max` customers, in arrival order. A flash sale is one hot promotion on
//! one Redis core, so this is what moves its ceiling: one call, one state
//! read and one clock reading serve a whole batch.
//!
//! Each lane has its own driver task, so a grab never waits behind another
//! promotion's batch, nor behind another shard's of its own promotion; only
//! behind the one call of its own lane in flight. The driver, not the request, owns the call: a client that
//! disconnects cannot cancel a batch other customers are in.
//!
//! Every customer gets its own answer from the batch's reply; when the call
//! fails or times out, every customer of the batch gets the same failure
//! (the outcome is unknown, and the grab's idempotence makes a retry safe).
//!
//! A call may come back with answers still to confirm ([`Sent::Confirming`]:
//! durable grabs, whose grants are answered once replicas acknowledge
//! them). The lane does not wait for that: its next batch is sent while the
//! confirmation of the one before is pending, so a replica's round trip is
//! not added to every batch's. It stays at most one batch ahead, though:
//! the batch after that waits until the first is confirmed (or given up),
//! so a stalled replica slows the lane instead of letting it grant batch
//! after batch that nobody can confirm (each answered 503), and grabs that
//! arrive meanwhile gather into a larger batch. Coupons are still numbered
//! in arrival order (the calls of a lane still go one at a time), and no
//! customer is answered before its batch is confirmed.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use foldhash::fast::RandomState;
use tokio::sync::{oneshot, Notify};
use tokio::task::JoinHandle;

use crate::protocol::shards::ShardError;
use crate::protocol::{CustomerId, DurableGrabError, GrabOutcome, PromotionId, ScriptError};

/// Why a customer's grab has no outcome.
#[derive(Debug, Clone)]
pub enum GrabFailure {
    /// No answer within the Redis timeout: the batch may or may not be recorded.
    Timeout,
    /// Redis failed or answered nonsense, for the whole batch.
    Store(Arc<ScriptError>),
    /// Granted (or held) on the master, but too few replicas confirmed it.
    NotReplicated(Arc<DurableGrabError>),
    /// The same, from a shard of a sharded promotion.
    Unconfirmed,
    /// A shard's window ended on its own clock but the promotion's finish
    /// is not recorded yet (shard clocks skewed): nothing was granted, retry.
    Closing,
    /// A grab of a sharded promotion failed for the whole batch (see
    /// [`ShardError`]: Redis, a step not durable, a stale map...).
    Shards(Arc<ShardError>),
}

/// One customer's answer.
pub type GrabAnswer = Result<GrabOutcome, GrabFailure>;

/// A batch's answers, one per customer in order, or the failure of the
/// whole batch.
pub type AnswersFuture = Pin<Box<dyn Future<Output = Result<Vec<GrabAnswer>, GrabFailure>> + Send>>;

/// What a batch's call came back with.
pub enum Sent {
    /// Every customer's answer.
    Answered(Vec<GrabAnswer>),
    /// The call is done in Redis; its answers wait for a confirmation that
    /// does not hold up the lane (replicas acknowledging its writes).
    Confirming(AnswersFuture),
}

/// What runs one batch: what it [`Sent`] back, or the failure of the whole
/// batch.
pub type BatchFuture = Pin<Box<dyn Future<Output = Result<Sent, GrabFailure>> + Send>>;

/// Sends one batch of one lane (promotion and home shard) to Redis.
pub type BatchCall = Arc<dyn Fn(PromotionId, Home, Vec<CustomerId>) -> BatchFuture + Send + Sync>;

/// Which lane of its promotion a grab joins: the customer's home shard
/// under the shard map of `shards` shards it was placed with. The count is
/// part of the key so that customers placed with two different maps (a map
/// re-read before the start) never share a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Home {
    pub shards: u32,
    pub shard: u32,
}

impl Home {
    /// The one lane of an unsharded promotion (S = 1).
    pub const UNSHARDED: Home = Home {
        shards: 1,
        shard: 0,
    };

    pub fn is_sharded(self) -> bool {
        self.shards > 1
    }
}

struct Waiter {
    customer: CustomerId,
    answer: oneshot::Sender<GrabAnswer>,
}

/// The grabs of one home shard of one promotion waiting for the call in
/// flight to return.
struct Lane {
    home: Home,
    waiting: Vec<Waiter>,
    /// Told of every grab that joins `waiting`: wakes a driver that waits
    /// for a confirmation with nothing to send.
    arrived: Arc<Notify>,
}

/// The lanes of every promotion with a call in flight or a batch awaiting
/// confirmation; a lane with neither is removed. A promotion's lanes are
/// few (at most S, and only those busy), so they are found by a scan, which costs the
/// unsharded promotion's one lane nothing. Hashed with foldhash (seeded at
/// random per process), as the worker's other per-grab maps: SipHash cost
/// more than the rest of the lookup.
struct Lanes {
    by_promotion: Mutex<HashMap<PromotionId, Vec<Lane>, RandomState>>,
    max: usize,
    call: BatchCall,
    on_batch: Option<Arc<dyn Fn(usize) + Send + Sync>>,
}

/// The group commit of a command worker.
#[derive(Clone)]
pub struct GroupCommit {
    lanes: Arc<Lanes>,
}

impl GroupCommit {
    /// Batches of at most `max` customers (1 = every grab on its own), each
    /// sent with `call`.
    pub fn new(max: usize, call: BatchCall) -> Self {
        Self {
            lanes: Arc::new(Lanes {
                by_promotion: Mutex::new(HashMap::default()),
                max: max.max(1),
                call,
                on_batch: None,
            }),
        }
    }

    /// Calls `observe` with the size of every batch sent (a metric).
    pub fn observing(
        max: usize,
        call: BatchCall,
        observe: Arc<dyn Fn(usize) + Send + Sync>,
    ) -> Self {
        let mut this = Self::new(max, call);
        if let Some(lanes) = Arc::get_mut(&mut this.lanes) {
            lanes.on_batch = Some(observe);
        }
        this
    }

    /// `customer`, whose home shard is `home`, grabs a coupon of
    /// `promotion`: sent at once when no call of that lane is in flight,
    /// else with the lane's next batch.
    pub async fn grab(
        &self,
        promotion: &PromotionId,
        home: Home,
        customer: CustomerId,
    ) -> GrabAnswer {
        let (tx, rx) = oneshot::channel();
        let start = {
            let mut lanes = self
                .lanes
                .by_promotion
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            let waiter = Waiter {
                customer,
                answer: tx,
            };
            let lane = Lane {
                home,
                waiting: Vec::new(),
                arrived: Arc::new(Notify::new()),
            };
            match lanes.get_mut(promotion) {
                Some(of_promotion) => match of_promotion.iter_mut().find(|l| l.home == home) {
                    Some(lane) => {
                        lane.waiting.push(waiter);
                        lane.arrived.notify_one();
                        false
                    }
                    None => {
                        of_promotion.push(Lane {
                            waiting: vec![waiter],
                            ..lane
                        });
                        true
                    }
                },
                None => {
                    lanes.insert(
                        promotion.clone(),
                        vec![Lane {
                            waiting: vec![waiter],
                            ..lane
                        }],
                    );
                    true
                }
            }
        };
        if start {
            tokio::spawn(drive(self.lanes.clone(), promotion.clone(), home));
        }
        // The driver always answers (or drops the sender only if the
        // runtime shuts down under it).
        rx.await.unwrap_or(Err(GrabFailure::Timeout))
    }
}

/// What a lane's driver does next.
enum Next {
    Send(Vec<Waiter>),
    /// Nothing waiting, a confirmation pending: wait for either to change.
    Idle(Arc<Notify>),
}

/// Sends the lane's waiting grabs, `max` at a time, until none is left and
/// no batch awaits confirmation; then removes the lane, so that the next
/// grab starts a new driver.
async fn drive(lanes: Arc<Lanes>, promotion: PromotionId, home: Home) {
    // The confirmation of the last batch sent, if it has one pending: the
    // next batch may go meanwhile, and once its call is done this one is
    // awaited before a third is sent.
    let mut confirming: Option<JoinHandle<()>> = None;
    loop {
        if confirming.as_ref().is_some_and(JoinHandle::is_finished) {
            confirming = None;
        }
        let next = {
            let mut by_promotion = lanes.by_promotion.lock().unwrap_or_else(|e| e.into_inner());
            let Some(of_promotion) = by_promotion.get_mut(&promotion) else {
                return;
            };
            let Some(i) = of_promotion.iter().position(|l| l.home == home) else {
                return;
            };
            let lane = &mut of_promotion[i];
            if lane.waiting.is_empty() {
                if confirming.is_some() {
                    Next::Idle(lane.arrived.clone())
                } else {
                    of_promotion.swap_remove(i);
                    if of_promotion.is_empty() {
                        by_promotion.remove(&promotion);
                    }
                    return;
                }
            } else {
                let n = lane.waiting.len().min(lanes.max);
                Next::Send(lane.waiting.drain(..n).collect())
            }
        };
        let batch = match next {
            Next::Send(batch) => batch,
            Next::Idle(arrived) => {
                if let Some(pending) = confirming.as_mut() {
                    tokio::select! {
                        _ = pending => confirming = None,
                        _ = arrived.notified() => {}
                    }
                }
                continue;
            }
        };
        if let Some(observe) = &lanes.on_batch {
            observe(batch.len());
        }
        let customers = batch.iter().map(|w| w.customer.clone()).collect();
        match (lanes.call)(promotion.clone(), home, customers).await {
            Ok(Sent::Answered(answers)) => answer(batch, Ok(answers)),
            Ok(Sent::Confirming(answers)) => {
                let this = tokio::spawn(async move { answer(batch, answers.await) });
                if let Some(before) = confirming.replace(this) {
                    let _ = before.await;
                }
            }
            Err(failure) => answer(batch, Err(failure)),
        }
    }
}

/// Gives each waiter of `batch` its answer, or the batch's failure to all.
fn answer(batch: Vec<Waiter>, answers: Result<Vec<GrabAnswer>, GrabFailure>) {
    match answers {
        Ok(answers) if answers.len() == batch.len() => {
            for (waiter, answer) in batch.into_iter().zip(answers) {
                let _ = waiter.answer.send(answer);
            }
        }
        Ok(answers) => {
            let e = ScriptError::BadReply(format!(
                "{} answers for a batch of {}",
                answers.len(),
                batch.len()
            ));
            let failure = GrabFailure::Store(Arc::new(e));
            for waiter in batch {
                let _ = waiter.answer.send(Err(failure.clone()));
            }
        }
        Err(failure) => {
            for waiter in batch {
                let _ = waiter.answer.send(Err(failure.clone()));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn id(name: &str) -> PromotionId {
        PromotionId::new("shop", name).unwrap()
    }

    fn customer(n: usize) -> CustomerId {
        CustomerId::parse(&format!("c{n}")).unwrap()
    }

    /// A fake store: each call of promotion "held" on shard 0 waits for its
    /// gate; a call of "confirming" is done at once but its answers wait for
    /// its confirmation gate; others answer at once. Every batch is recorded.
    struct Fake {
        batches: Mutex<Vec<(String, Home, Vec<String>)>>,
        gates: Mutex<Vec<oneshot::Sender<()>>>,
        confirmations: Mutex<Vec<oneshot::Sender<()>>>,
        calls: AtomicUsize,
    }

    fn fake() -> (Arc<Fake>, BatchCall) {
        let f = Arc::new(Fake {
            batches: Mutex::new(Vec::new()),
            gates: Mutex::new(Vec::new()),
            confirmations: Mutex::new(Vec::new()),
            calls: AtomicUsize::new(0),
        });
        let g = f.clone();
        let call: BatchCall = Arc::new(move |p: PromotionId, home: Home, cs: Vec<CustomerId>| {
            let g = g.clone();
            Box::pin(async move {
                g.calls.fetch_add(1, Ordering::SeqCst);
                let names: Vec<String> = cs.iter().map(|c| c.as_str().to_owned()).collect();
                g.batches
                    .lock()
                    .unwrap()
                    .push((p.name().to_owned(), home, names.clone()));
                if p.name() == "held" && home.shard == 0 {
                    let (tx, rx) = oneshot::channel();
                    g.gates.lock().unwrap().push(tx);
                    let _ = rx.await;
                }
                if p.name() == "broken" {
                    return Err(GrabFailure::Timeout);
                }
                let answers = names.iter().map(|_| Ok(GrabOutcome::SoldOut)).collect();
                if p.name() == "confirming" {
                    // Done in Redis; answered once its confirmation gate opens.
                    let (tx, rx) = oneshot::channel();
                    g.confirmations.lock().unwrap().push(tx);
                    return Ok(Sent::Confirming(Box::pin(async move {
                        let _ = rx.await;
                        Ok(answers)
                    })));
                }
                Ok(Sent::Answered(answers))
            }) as BatchFuture
        });
        (f, call)
    }

    async fn until(what: impl Fn() -> bool) {
        for _ in 0..100_000 {
            if what() {
                return;
            }
            tokio::task::yield_now().await;
        }
        panic!("never came true");
    }

    /// Spawns customer 0's grab of "held" and waits until its call waits
    /// at its gate (the only one).
    async fn held_at_its_gate(gc: &GroupCommit, f: &Fake) -> tokio::task::JoinHandle<GrabAnswer> {
        let held = tokio::spawn({
            let gc = gc.clone();
            async move { gc.grab(&id("held"), Home::UNSHARDED, customer(0)).await }
        });
        until(|| f.gates.lock().unwrap().len() == 1).await;
        held
    }

    #[tokio::test]
    async fn grabs_arriving_during_a_call_go_together_in_the_next_one_up_to_max() {
        let (f, call) = fake();
        let gc = GroupCommit::new(3, call);
        let first = held_at_its_gate(&gc, &f).await;
        let mut queued = Vec::new();
        for n in 1..=5 {
            let gc = gc.clone();
            queued.push(tokio::spawn(async move {
                gc.grab(&id("held"), Home::UNSHARDED, customer(n)).await
            }));
        }
        until(|| {
            gc.lanes.by_promotion.lock().unwrap()[&id("held")][0]
                .waiting
                .len()
                == 5
        })
        .await;
        // Release the lone first call, then each batch in turn.
        for released in 1..=3 {
            let gate = f.gates.lock().unwrap().pop().unwrap();
            gate.send(()).unwrap();
            if released < 3 {
                until(|| f.gates.lock().unwrap().len() == 1).await;
            }
        }
        assert!(first.await.unwrap().is_ok());
        for q in queued {
            assert!(q.await.unwrap().is_ok());
        }
        let batches = f.batches.lock().unwrap().clone();
        let sizes: Vec<Vec<String>> = batches.into_iter().map(|(_, _, b)| b).collect();
        assert_eq!(
            sizes,
            vec![
                vec!["c0".to_owned()],
                vec!["c1".into(), "c2".into(), "c3".into()],
                vec!["c4".into(), "c5".into()],
            ],
            "a lone grab alone, then arrival order, at most 3 a call"
        );
        assert!(
            gc.lanes.by_promotion.lock().unwrap().is_empty(),
            "no lane left behind"
        );
    }

    #[tokio::test]
    async fn a_grab_never_waits_behind_another_promotions_call() {
        let (f, call) = fake();
        let gc = GroupCommit::new(64, call);
        let held = held_at_its_gate(&gc, &f).await;
        // "held"'s call never returns until its gate opens, yet another
        // promotion's grab is answered meanwhile.
        let other = gc.grab(&id("other"), Home::UNSHARDED, customer(1)).await;
        assert!(other.is_ok());
        assert!(!held.is_finished());
        f.gates.lock().unwrap().pop().unwrap().send(()).unwrap();
        assert!(held.await.unwrap().is_ok());
    }

    #[tokio::test]
    async fn a_failed_call_fails_every_customer_of_its_batch_and_the_lane_recovers() {
        let (f, call) = fake();
        let gc = GroupCommit::new(64, call);
        let answers = futures::future::join_all((0..4).map(|n| {
            let gc = gc.clone();
            async move { gc.grab(&id("broken"), Home::UNSHARDED, customer(n)).await }
        }))
        .await;
        assert!(answers
            .iter()
            .all(|a| matches!(a, Err(GrabFailure::Timeout))));
        assert!(f.calls.load(Ordering::SeqCst) >= 1);
        assert!(gc.lanes.by_promotion.lock().unwrap().is_empty());
        assert!(gc
            .grab(&id("fine"), Home::UNSHARDED, customer(9))
            .await
            .is_ok());
    }

    /// Spawns customer `n`'s grab of "confirming".
    fn confirming_grab(gc: &GroupCommit, n: usize) -> tokio::task::JoinHandle<GrabAnswer> {
        let gc = gc.clone();
        tokio::spawn(async move {
            gc.grab(&id("confirming"), Home::UNSHARDED, customer(n))
                .await
        })
    }

    /// Customers 0 and 1 grab "confirming" one after the other, each once
    /// the batch before is done in Redis (not confirmed): answers when both
    /// batches await confirmation.
    async fn two_batches_awaiting_confirmation(
        gc: &GroupCommit,
        f: &Fake,
    ) -> (
        tokio::task::JoinHandle<GrabAnswer>,
        tokio::task::JoinHandle<GrabAnswer>,
    ) {
        let first = confirming_grab(gc, 0);
        until(|| f.confirmations.lock().unwrap().len() == 1).await;
        let second = confirming_grab(gc, 1);
        until(|| f.confirmations.lock().unwrap().len() == 2).await;
        (first, second)
    }

    #[tokio::test]
    async fn a_lane_sends_its_next_batch_while_the_one_before_awaits_confirmation() {
        let (f, call) = fake();
        let gc = GroupCommit::new(64, call);
        // The first batch is done in Redis, not confirmed: the next grabs
        // are sent (the lane is free), and nobody is answered yet.
        let (first, second) = two_batches_awaiting_confirmation(&gc, &f).await;
        assert_eq!(f.calls.load(Ordering::SeqCst), 2);
        tokio::task::yield_now().await;
        assert!(!first.is_finished() && !second.is_finished());
        // Each is answered when its own batch is confirmed, in any order.
        let second_gate = f.confirmations.lock().unwrap().pop().unwrap();
        second_gate.send(()).unwrap();
        assert!(second.await.unwrap().is_ok());
        assert!(!first.is_finished());
        f.confirmations
            .lock()
            .unwrap()
            .pop()
            .unwrap()
            .send(())
            .unwrap();
        assert!(first.await.unwrap().is_ok());
        let batches: Vec<Vec<String>> = f
            .batches
            .lock()
            .unwrap()
            .iter()
            .map(|(_, _, b)| b.clone())
            .collect();
        assert_eq!(batches, [vec!["c0"], vec!["c1"]]);
        // Nothing left to send or confirm: the lane is gone.
        until(|| gc.lanes.by_promotion.lock().unwrap().is_empty()).await;
    }

    #[tokio::test]
    async fn a_lane_is_never_more_than_one_batch_ahead_of_its_confirmations() {
        let (f, call) = fake();
        let gc = GroupCommit::new(64, call);
        let (first, second) = two_batches_awaiting_confirmation(&gc, &f).await;
        // Two batches unconfirmed: the third waits for the first's
        // confirmation (a stalled replica slows the lane, it does not let
        // it grant on unchecked).
        let third = confirming_grab(&gc, 2);
        for _ in 0..50 {
            tokio::task::yield_now().await;
        }
        assert_eq!(f.calls.load(Ordering::SeqCst), 2);
        let first_gate = f.confirmations.lock().unwrap().remove(0);
        first_gate.send(()).unwrap();
        assert!(first.await.unwrap().is_ok());
        until(|| f.calls.load(Ordering::SeqCst) == 3).await;
        for gate in f.confirmations.lock().unwrap().drain(..) {
            gate.send(()).unwrap();
        }
        assert!(second.await.unwrap().is_ok());
        assert!(third.await.unwrap().is_ok());
    }

    #[tokio::test]
    async fn each_home_shard_of_a_promotion_has_its_own_lane_and_batches_never_mix_shards() {
        let (f, call) = fake();
        let gc = GroupCommit::new(64, call);
        let shard = |shard| Home { shards: 3, shard };
        // Shard 0 of "held" is held at its gate: shards 1 and 2 of the same
        // promotion are answered meanwhile.
        let held = tokio::spawn({
            let gc = gc.clone();
            async move { gc.grab(&id("held"), shard(0), customer(0)).await }
        });
        until(|| f.gates.lock().unwrap().len() == 1).await;
        assert!(gc.grab(&id("held"), shard(1), customer(1)).await.is_ok());
        assert!(gc.grab(&id("held"), shard(2), customer(2)).await.is_ok());
        // Grabs of shard 0 queue behind its call; one of S = 1 has a lane of
        // its own (a map re-read before the start).
        let queued: Vec<_> = [(shard(0), 3), (Home::UNSHARDED, 4), (shard(0), 5)]
            .into_iter()
            .map(|(home, n)| {
                let gc = gc.clone();
                tokio::spawn(async move { gc.grab(&id("held"), home, customer(n)).await })
            })
            .collect();
        // The S = 1 lane starts its own call (held too: its shard is 0).
        until(|| {
            let lanes = gc.lanes.by_promotion.lock().unwrap();
            let waiting: usize = lanes[&id("held")].iter().map(|l| l.waiting.len()).sum();
            waiting == 2 && f.gates.lock().unwrap().len() == 2
        })
        .await;
        // Release calls until every grab is answered.
        while !(held.is_finished() && queued.iter().all(|q| q.is_finished())) {
            if let Some(gate) = f.gates.lock().unwrap().pop() {
                let _ = gate.send(());
            }
            tokio::task::yield_now().await;
        }
        assert!(held.await.unwrap().is_ok());
        for q in queued {
            assert!(q.await.unwrap().is_ok());
        }
        let batches = f.batches.lock().unwrap().clone();
        let of = |home: Home| -> Vec<Vec<String>> {
            batches
                .iter()
                .filter(|(_, h, _)| *h == home)
                .map(|(_, _, b)| b.clone())
                .collect()
        };
        assert_eq!(of(shard(0)), [vec!["c0"], vec!["c3", "c5"]]);
        assert_eq!(of(shard(1)), [vec!["c1"]]);
        assert_eq!(of(shard(2)), [vec!["c2"]]);
        assert_eq!(of(Home::UNSHARDED), [vec!["c4"]]);
        assert!(gc.lanes.by_promotion.lock().unwrap().is_empty());
    }
}
