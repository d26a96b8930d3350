//! Group commit: grabs of one promotion share Redis calls.
//!
//! Every promotion has a lane. A grab that finds its lane idle starts a
//! driver and is sent at once, alone (no timer: no added latency when the
//! load is light). Grabs that arrive while a call of their promotion is in
//! flight queue in the lane and go together in the next call, up to
//! `max` customers, in arrival order. A flash sale is one hot promotion on
//! one Redis core, so this is what moves its ceiling: one call, one state
//! read and one clock reading serve a whole batch.
//!
//! Each lane has its own driver task, so a grab never waits behind another
//! promotion's batch; only behind the one call of its own promotion in
//! flight. The driver, not the request, owns the call: a client that
//! disconnects cannot cancel a batch other customers are in.
//!
//! Every customer gets its own answer from the batch's reply; when the call
//! fails or times out, every customer of the batch gets the same failure
//! (the outcome is unknown, and the grab's idempotence makes a retry safe).

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use tokio::sync::oneshot;

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
}

/// One customer's answer.
pub type GrabAnswer = Result<GrabOutcome, GrabFailure>;

/// What runs one batch: its answers, one per customer in order, or the
/// failure of the whole batch.
pub type BatchFuture = Pin<Box<dyn Future<Output = Result<Vec<GrabAnswer>, GrabFailure>> + Send>>;

/// Sends one batch of one promotion to Redis.
pub type BatchCall = Arc<dyn Fn(PromotionId, Vec<CustomerId>) -> BatchFuture + Send + Sync>;

struct Waiter {
    customer: CustomerId,
    answer: oneshot::Sender<GrabAnswer>,
}

/// The grabs of one promotion waiting for the call in flight to return.
#[derive(Default)]
struct Lane {
    waiting: Vec<Waiter>,
}

/// The lanes of every promotion with a call in flight; a promotion without
/// one has no lane.
struct Lanes {
    by_promotion: Mutex<HashMap<PromotionId, Lane>>,
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
                by_promotion: Mutex::new(HashMap::new()),
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

    /// `customer` grabs a coupon of `promotion`: sent at once when no call
    /// of that promotion is in flight, else with the next batch.
    pub async fn grab(&self, promotion: &PromotionId, customer: CustomerId) -> GrabAnswer {
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
            match lanes.get_mut(promotion) {
                Some(lane) => {
                    lane.waiting.push(waiter);
                    false
                }
                None => {
                    lanes.insert(
                        promotion.clone(),
                        Lane {
                            waiting: vec![waiter],
                        },
                    );
                    true
                }
            }
        };
        if start {
            tokio::spawn(drive(self.lanes.clone(), promotion.clone()));
        }
        // The driver always answers (or drops the sender only if the
        // runtime shuts down under it).
        rx.await.unwrap_or(Err(GrabFailure::Timeout))
    }
}

/// Sends the lane's waiting grabs, `max` at a time, until none is left; then
/// removes the lane, so that the next grab starts a new driver.
async fn drive(lanes: Arc<Lanes>, promotion: PromotionId) {
    loop {
        let batch: Vec<Waiter> = {
            let mut by_promotion = lanes.by_promotion.lock().unwrap_or_else(|e| e.into_inner());
            let Some(lane) = by_promotion.get_mut(&promotion) else {
                return;
            };
            if lane.waiting.is_empty() {
                by_promotion.remove(&promotion);
                return;
            }
            let n = lane.waiting.len().min(lanes.max);
            lane.waiting.drain(..n).collect()
        };
        if let Some(observe) = &lanes.on_batch {
            observe(batch.len());
        }
        let customers = batch.iter().map(|w| w.customer.clone()).collect();
        match (lanes.call)(promotion.clone(), customers).await {
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

    /// A fake store: each call of promotion "held" waits for its gate;
    /// others answer at once. Every customer is granted its position in
    /// the call, and every batch is recorded.
    struct Fake {
        batches: Mutex<Vec<(String, Vec<String>)>>,
        gates: Mutex<Vec<oneshot::Sender<()>>>,
        calls: AtomicUsize,
    }

    fn fake() -> (Arc<Fake>, BatchCall) {
        let f = Arc::new(Fake {
            batches: Mutex::new(Vec::new()),
            gates: Mutex::new(Vec::new()),
            calls: AtomicUsize::new(0),
        });
        let g = f.clone();
        let call: BatchCall = Arc::new(move |p: PromotionId, cs: Vec<CustomerId>| {
            let g = g.clone();
            Box::pin(async move {
                g.calls.fetch_add(1, Ordering::SeqCst);
                let names: Vec<String> = cs.iter().map(|c| c.as_str().to_owned()).collect();
                g.batches
                    .lock()
                    .unwrap()
                    .push((p.name().to_owned(), names.clone()));
                if p.name() == "held" {
                    let (tx, rx) = oneshot::channel();
                    g.gates.lock().unwrap().push(tx);
                    let _ = rx.await;
                }
                if p.name() == "broken" {
                    return Err(GrabFailure::Timeout);
                }
                Ok(names.iter().map(|_| Ok(GrabOutcome::SoldOut)).collect())
            }) as BatchFuture
        });
        (f, call)
    }

    async fn until(what: impl Fn() -> bool) {
        while !what() {
            tokio::task::yield_now().await;
        }
    }

    /// Spawns customer 0's grab of "held" and waits until its call waits
    /// at its gate (the only one).
    async fn held_at_its_gate(gc: &GroupCommit, f: &Fake) -> tokio::task::JoinHandle<GrabAnswer> {
        let held = tokio::spawn({
            let gc = gc.clone();
            async move { gc.grab(&id("held"), customer(0)).await }
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
                gc.grab(&id("held"), customer(n)).await
            }));
        }
        until(|| {
            gc.lanes.by_promotion.lock().unwrap()[&id("held")]
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
        let sizes: Vec<Vec<String>> = batches.into_iter().map(|(_, b)| b).collect();
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
        let other = gc.grab(&id("other"), customer(1)).await;
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
            async move { gc.grab(&id("broken"), customer(n)).await }
        }))
        .await;
        assert!(answers
            .iter()
            .all(|a| matches!(a, Err(GrabFailure::Timeout))));
        assert!(f.calls.load(Ordering::SeqCst) >= 1);
        assert!(gc.lanes.by_promotion.lock().unwrap().is_empty());
        assert!(gc.grab(&id("fine"), customer(9)).await.is_ok());
    }
}
