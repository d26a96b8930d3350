//! The operator's Prometheus metrics, registered in the process registry of
//! `seckill_workers` and served at `/metrics` next to `/healthz` and
//! `/readyz` (see [`crate::controller::run`]).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Instant;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use seckill_workers::metrics::MetricsRegistry;

use crate::promotion::Phase;
use crate::Error;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    pub error: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PhaseLabels {
    pub phase: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    pub outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WorkLabels {
    pub work: String,
}

/// Counters and gauges of the controller; clones share the same values.
#[derive(Clone)]
pub struct Metrics {
    pub reconciles: Counter,
    pub failures: Family<ErrorLabels, Counter>,
    pub duration: Histogram,
    pub promotions: Family<PhaseLabels, Gauge>,
    /// Statuses decided, by what became of them: written, unchanged (equal to
    /// the reported one) or held (new numbers within the status interval).
    pub status_updates: Family<OutcomeLabels, Counter>,
    /// Reads of the running sales from Redis, and how long each took.
    pub redis_polls: Histogram,
    pub redis_poll_failures: Counter,
    /// Reconciles the reads of the running sales asked for.
    pub poll_triggers: Counter,
    /// Running sales watched in Redis.
    pub watched_sales: Gauge,
    /// Reconciles and Redis reads under way.
    pub in_flight: Family<WorkLabels, Gauge>,
    /// The last phase seen of every promotion, from which the gauge is
    /// recomputed (so a deleted or re-phased promotion is not counted twice).
    phases: std::sync::Arc<Mutex<HashMap<String, Phase>>>,
}

impl Metrics {
    /// Registers the metrics as `seckill_operator_*`.
    pub fn register(registry: &MetricsRegistry) -> Self {
        let metrics = Self {
            reconciles: Counter::default(),
            failures: Family::default(),
            duration: Histogram::new(exponential_buckets(0.001, 2.0, 14)),
            promotions: Family::default(),
            status_updates: Family::default(),
            redis_polls: Histogram::new(exponential_buckets(0.0005, 2.0, 12)),
            redis_poll_failures: Counter::default(),
            poll_triggers: Counter::default(),
            watched_sales: Gauge::default(),
            in_flight: Family::default(),
            phases: Default::default(),
        };
        registry.register(
            "operator_reconciles",
            "Promotion reconciliations started",
            metrics.reconciles.clone(),
        );
        registry.register(
            "operator_reconcile_failures",
            "Promotion reconciliations that failed, by error kind",
            metrics.failures.clone(),
        );
        registry.register(
            "operator_reconcile_duration_seconds",
            "Time a Promotion reconciliation took",
            metrics.duration.clone(),
        );
        registry.register(
            "operator_promotions",
            "Promotions by phase, as last reconciled",
            metrics.promotions.clone(),
        );
        registry.register(
            "operator_status_updates",
            "Promotion statuses decided, by outcome: written to the API server, unchanged, or held (new numbers within --status-interval)",
            metrics.status_updates.clone(),
        );
        registry.register(
            "operator_redis_poll_duration_seconds",
            "Time one read of every running sale from Redis took",
            metrics.redis_polls.clone(),
        );
        registry.register(
            "operator_redis_poll_failures",
            "Reads of the running sales from Redis that failed",
            metrics.redis_poll_failures.clone(),
        );
        registry.register(
            "operator_poll_triggers",
            "Reconciles asked for by the reads of the running sales (numbers or phase moved in Redis)",
            metrics.poll_triggers.clone(),
        );
        registry.register(
            "operator_watched_sales",
            "Running sales read from Redis every --redis-poll-interval",
            metrics.watched_sales.clone(),
        );
        registry.register(
            "operator_in_flight",
            "Work under way, by kind: reconcile, redis_poll",
            metrics.in_flight.clone(),
        );
        metrics
    }

    fn in_flight(&self, work: &str) -> Gauge {
        self.in_flight
            .get_or_create(&WorkLabels {
                work: work.to_owned(),
            })
            .clone()
    }

    /// Counts a reconciliation and times it until the guard is dropped.
    pub fn reconcile_started(&self) -> WorkTimer<'_> {
        self.reconciles.inc();
        WorkTimer::start(&self.duration, self.in_flight("reconcile"))
    }

    /// Times one read of the running sales until the guard is dropped.
    pub fn redis_poll_started(&self) -> WorkTimer<'_> {
        WorkTimer::start(&self.redis_polls, self.in_flight("redis_poll"))
    }

    pub fn redis_poll_failed(&self) {
        self.redis_poll_failures.inc();
    }

    /// Reconciles and Redis reads under way now.
    pub fn work_in_flight(&self) -> i64 {
        self.in_flight("reconcile").get() + self.in_flight("redis_poll").get()
    }

    /// Counts a status decided: `written`, `unchanged` or `held`.
    pub fn status_update(&self, outcome: &str) {
        self.status_updates
            .get_or_create(&OutcomeLabels {
                outcome: outcome.to_owned(),
            })
            .inc();
    }

    /// How many statuses had `outcome` so far.
    pub fn status_updates(&self, outcome: &str) -> u64 {
        self.status_updates
            .get_or_create(&OutcomeLabels {
                outcome: outcome.to_owned(),
            })
            .get()
    }

    pub fn failed(&self, error: &Error) {
        self.failures
            .get_or_create(&ErrorLabels {
                error: error.kind().to_owned(),
            })
            .inc();
    }

    /// Records the phase of `promotion` (`None`: it is gone).
    pub fn set_phase(&self, promotion: &str, phase: Option<Phase>) {
        let mut phases = self.phases.lock().unwrap_or_else(|e| e.into_inner());
        match phase {
            Some(p) => phases.insert(promotion.to_owned(), p),
            None => phases.remove(promotion),
        };
        for p in [Phase::Pending, Phase::Active, Phase::Finished] {
            let n = phases.values().filter(|v| **v == p).count();
            self.promotions
                .get_or_create(&PhaseLabels {
                    phase: p.as_str().to_owned(),
                })
                .set(n as i64);
        }
    }
}

/// Counts a piece of work as under way, and observes its duration, until
/// dropped.
pub struct WorkTimer<'a> {
    histogram: &'a Histogram,
    in_flight: Gauge,
    started: Instant,
}

impl<'a> WorkTimer<'a> {
    fn start(histogram: &'a Histogram, in_flight: Gauge) -> Self {
        in_flight.inc();
        Self {
            histogram,
            in_flight,
            started: Instant::now(),
        }
    }
}

impl Drop for WorkTimer<'_> {
    fn drop(&mut self) {
        self.in_flight.dec();
        self.histogram.observe(self.started.elapsed().as_secs_f64());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn promotions_by_phase_count_each_promotion_once() {
        let registry = MetricsRegistry::new();
        let m = Metrics::register(&registry);
        m.set_phase("a/x", Some(Phase::Pending));
        m.set_phase("a/x", Some(Phase::Active));
        m.set_phase("a/y", Some(Phase::Active));
        m.set_phase("a/y", None);
        let text = registry.encode().unwrap();
        assert!(
            text.contains(r#"seckill_operator_promotions{phase="Active"} 1"#),
            "{text}"
        );
        assert!(
            text.contains(r#"seckill_operator_promotions{phase="Pending"} 0"#),
            "{text}"
        );
    }
}
