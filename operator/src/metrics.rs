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

/// Counters and gauges of the controller; clones share the same values.
#[derive(Clone)]
pub struct Metrics {
    pub reconciles: Counter,
    pub failures: Family<ErrorLabels, Counter>,
    pub duration: Histogram,
    pub promotions: Family<PhaseLabels, Gauge>,
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
        metrics
    }

    /// Counts a reconciliation and times it until the guard is dropped.
    pub fn reconcile_started(&self) -> ReconcileTimer<'_> {
        self.reconciles.inc();
        ReconcileTimer {
            histogram: &self.duration,
            started: Instant::now(),
        }
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

/// Observes the duration of one reconciliation when dropped.
pub struct ReconcileTimer<'a> {
    histogram: &'a Histogram,
    started: Instant,
}

impl Drop for ReconcileTimer<'_> {
    fn drop(&mut self) {
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
