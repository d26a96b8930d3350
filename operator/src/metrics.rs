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

use crate::promotion::{Phase, PromotionSpec, PromotionStatus};
use crate::Error;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    pub error: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PhaseLabels {
    pub phase: String,
}

/// One promotion as `namespace/name`. Not a `namespace` label: Prometheus
/// already puts the scraped pod's namespace there.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PromotionLabels {
    pub promotion: String,
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
    /// Coupons still available, per promotion, as last reconciled.
    pub coupons_remaining: Family<PromotionLabels, Gauge>,
    /// finishTime (Unix seconds) of the promotions last reconciled Active:
    /// Prometheus compares it with its own clock, so a promotion left Active
    /// past its finish shows even when the operator is stuck.
    pub active_finish_time: Family<PromotionLabels, Gauge>,
    /// 1 while this replica runs the controller (holds the Lease), else 0.
    pub leader: Gauge,
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
            coupons_remaining: Family::default(),
            active_finish_time: Family::default(),
            leader: Gauge::default(),
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
            "operator_promotion_coupons_remaining",
            "Coupons still available per promotion (namespace/name), as last reconciled",
            metrics.coupons_remaining.clone(),
        );
        registry.register(
            "operator_active_promotion_finish_time_seconds",
            "spec.finishTime (Unix seconds) of each promotion last reconciled as Active",
            metrics.active_finish_time.clone(),
        );
        registry.register(
            "operator_leader",
            "1 while this replica holds the Lease and runs the controller, else 0",
            metrics.leader.clone(),
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

    /// Records a reconciled promotion: its phase, remaining coupons and,
    /// while it is Active, its finish time.
    pub fn observe_promotion(
        &self,
        promotion: &str,
        spec: &PromotionSpec,
        status: &PromotionStatus,
    ) {
        self.set_phase(promotion, status.phase);
        let labels = PromotionLabels {
            promotion: promotion.to_owned(),
        };
        if status.phase.is_some() {
            self.coupons_remaining
                .get_or_create(&labels)
                .set(i64::try_from(status.remaining).unwrap_or(i64::MAX));
        }
        if status.phase == Some(Phase::Active) {
            self.active_finish_time
                .get_or_create(&labels)
                .set(spec.finish_time.timestamp());
        } else {
            self.active_finish_time.remove(&labels);
        }
    }

    /// Marks this replica as the one reconciling until the guard is dropped
    /// (the Lease is lost or the controller stops); it then forgets every
    /// promotion, so a standby reports none of them stale.
    pub fn leading(&self) -> Leading {
        self.leader.set(1);
        Leading {
            metrics: self.clone(),
        }
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
            Some(p) => {
                phases.insert(promotion.to_owned(), p);
            }
            None => {
                phases.remove(promotion);
                let labels = PromotionLabels {
                    promotion: promotion.to_owned(),
                };
                self.coupons_remaining.remove(&labels);
                self.active_finish_time.remove(&labels);
            }
        };
        self.count_phases(&phases);
    }

    fn count_phases(&self, phases: &HashMap<String, Phase>) {
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

/// This replica reconciles while it lives; see [`Metrics::leading`].
pub struct Leading {
    metrics: Metrics,
}

impl Drop for Leading {
    fn drop(&mut self) {
        let m = &self.metrics;
        m.leader.set(0);
        let mut phases = m.phases.lock().unwrap_or_else(|e| e.into_inner());
        phases.clear();
        m.count_phases(&phases);
        m.coupons_remaining.clear();
        m.active_finish_time.clear();
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

    fn spec(finish: &str) -> PromotionSpec {
        PromotionSpec {
            publish_time: "2030-01-01T10:00:00Z".parse().unwrap(),
            finish_time: finish.parse().unwrap(),
            number_of_coupons: 10,
            discount: 0.2,
            description: None,
            shards: 1,
        }
    }

    fn status(phase: Phase, remaining: u64) -> PromotionStatus {
        PromotionStatus {
            phase: Some(phase),
            remaining,
            granted: 10 - remaining,
            ..PromotionStatus::default()
        }
    }

    /// The value of `seckill_operator_<metric>{promotion="shop/sale"}`, if exposed.
    fn sale(registry: &MetricsRegistry, metric: &str) -> Option<String> {
        let prefix = format!("seckill_operator_{metric}{{promotion=\"shop/sale\"}} ");
        let text = registry.encode().unwrap();
        text.lines()
            .find_map(|line| line.strip_prefix(&prefix).map(str::to_owned))
    }

    #[test]
    fn an_active_promotion_reports_its_finish_time_and_remaining_coupons_until_finished() {
        let registry = MetricsRegistry::new();
        let m = Metrics::register(&registry);
        let sale_spec = spec("2030-01-01T11:00:00Z");
        let remaining = |r: &MetricsRegistry| sale(r, "promotion_coupons_remaining");
        let finish = |r: &MetricsRegistry| sale(r, "active_promotion_finish_time_seconds");

        m.observe_promotion("shop/sale", &sale_spec, &status(Phase::Pending, 10));
        assert_eq!(remaining(&registry).as_deref(), Some("10"));
        assert_eq!(finish(&registry), None);

        m.observe_promotion("shop/sale", &sale_spec, &status(Phase::Active, 7));
        assert_eq!(remaining(&registry).as_deref(), Some("7"));
        // 2030-01-01T11:00:00Z
        assert_eq!(finish(&registry).as_deref(), Some("1893495600"));

        m.observe_promotion("shop/sale", &sale_spec, &status(Phase::Finished, 0));
        assert_eq!(remaining(&registry).as_deref(), Some("0"));
        assert_eq!(finish(&registry), None);

        m.set_phase("shop/sale", None);
        assert_eq!(remaining(&registry), None);
        let text = registry.encode().unwrap();
        assert!(!text.contains("shop/sale"), "{text}");
    }

    #[test]
    fn a_replica_that_stops_leading_reports_no_promotion_and_leader_zero() {
        let registry = MetricsRegistry::new();
        let m = Metrics::register(&registry);
        assert!(registry
            .encode()
            .unwrap()
            .contains("seckill_operator_leader 0"));
        {
            let _leading = m.leading();
            m.observe_promotion(
                "shop/sale",
                &spec("2030-01-01T11:00:00Z"),
                &status(Phase::Active, 4),
            );
            let text = registry.encode().unwrap();
            assert!(text.contains("seckill_operator_leader 1"), "{text}");
            assert!(
                text.contains(r#"seckill_operator_promotions{phase="Active"} 1"#),
                "{text}"
            );
        }
        let text = registry.encode().unwrap();
        assert!(text.contains("seckill_operator_leader 0"), "{text}");
        assert!(
            text.contains(r#"seckill_operator_promotions{phase="Active"} 0"#),
            "{text}"
        );
        assert!(!text.contains("shop/sale"), "{text}");
    }
}
