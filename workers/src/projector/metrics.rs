//! What projectors report to Prometheus: events applied by type, the lag
//! from XADD to applied, pending and reclaimed entries, and decode failures.
//! A sharded promotion's stock move entries (`StockMovedOut`,
//! `StockMovedIn`) change no read model; they are acknowledged and counted
//! under their type in `projector_events_applied`, which is how many moves
//! the projectors saw.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;

use crate::metrics::MetricsRegistry;

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
