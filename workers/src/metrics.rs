//! Prometheus metrics of a worker, exposed in the OpenMetrics text format at
//! `/metrics`. One [`MetricsRegistry`] per process: the HTTP layer, the Redis
//! callers and every role (query, projector, ...) register into the same one,
//! so a single scrape shows all of them.

use std::sync::{Arc, OnceLock, RwLock};
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::{Metric, Registry};

/// Prefix of every metric name of seckill.
pub const PREFIX: &str = "seckill";

/// A cheap-to-clone handle to the process' metric registry.
///
/// Registration takes a write lock and happens at startup; encoding takes a
/// read lock for the length of a scrape. Recording a value never touches the
/// lock: metrics are shared atomics held by whoever registered them.
#[derive(Clone, Debug)]
pub struct MetricsRegistry {
    registry: Arc<RwLock<Registry>>,
}

impl Default for MetricsRegistry {
    fn default() -> Self {
        Self::new()
    }
}

impl MetricsRegistry {
    /// An empty registry whose metric names start with `seckill_`.
    pub fn new() -> Self {
        Self {
            registry: Arc::new(RwLock::new(Registry::with_prefix(PREFIX))),
        }
    }

    /// Registers `metric` under `seckill_<name>`; keep a clone of the metric
    /// to record into it.
    pub fn register(&self, name: &str, help: &str, metric: impl Metric) {
        // A poisoned lock only means another registration panicked; the
        // registry itself is still consistent.
        let mut registry = self.registry.write().unwrap_or_else(|e| e.into_inner());
        registry.register(name, help, metric);
    }

    /// Gives direct access to the underlying registry, for sub-registries,
    /// units or collectors.
    pub fn with_registry<T>(&self, f: impl FnOnce(&mut Registry) -> T) -> T {
        let mut registry = self.registry.write().unwrap_or_else(|e| e.into_inner());
        f(&mut registry)
    }

    /// The OpenMetrics text exposition of every registered metric.
    pub fn encode(&self) -> Result<String, std::fmt::Error> {
        let registry = self.registry.read().unwrap_or_else(|e| e.into_inner());
        let mut text = String::with_capacity(4096);
        prometheus_client::encoding::text::encode(&mut text, &registry)?;
        Ok(text)
    }
}

/// Labels of one HTTP request: the route template it matched (or
/// `unmatched`), its status code and its outcome (the error code of the
/// envelope, or what the handler says it did, e.g. `granted`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub route: &'static str,
    pub status: u16,
    pub outcome: &'static str,
}

/// Labels of the latency histogram: the route template only, so that the
/// number of series stays small.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabels {
    pub route: &'static str,
}

/// HTTP request counts and latencies, recorded by the server's
/// [`Observe`](crate::http::layers::Observe) layer.
#[derive(Clone, Debug)]
pub struct HttpMetrics {
    requests: Family<RequestLabels, Counter>,
    latency: Family<RouteLabels, Histogram, fn() -> Histogram>,
}

fn latency_histogram() -> Histogram {
    // 100 µs .. ~3.3 s: a grab is one Redis round trip, well under 1 ms on a
    // quiet loopback, but a slow Redis must still show up in the tail.
    Histogram::new(exponential_buckets(0.0001, 2.0, 16))
}

impl HttpMetrics {
    /// Creates the HTTP metrics and registers them into `registry`. Call once
    /// per registry (the server of `seckill up` shares one for every API).
    pub fn register(registry: &MetricsRegistry) -> Self {
        let requests = Family::<RequestLabels, Counter>::default();
        let latency =
            Family::<RouteLabels, Histogram>::new_with_constructor(latency_histogram as fn() -> _);
        registry.register(
            "http_requests",
            "HTTP requests answered, by route template, status and outcome",
            requests.clone(),
        );
        registry.register(
            "http_request_duration_seconds",
            "Time from the request head to the response, by route template",
            latency.clone(),
        );
        Self { requests, latency }
    }

    /// The metrics of `route`, for a caller that records many requests of
    /// it (see [`RouteMetrics`]).
    pub fn route(&self, route: &'static str) -> RouteMetrics {
        RouteMetrics {
            route,
            http: self.clone(),
            latency: OnceLock::new(),
            requests: RwLock::new(Vec::new()),
        }
    }

    /// Counts one answered request and records how long it took.
    pub fn observe(&self, route: &'static str, status: u16, outcome: &'static str, took: Duration) {
        self.requests
            .get_or_create(&RequestLabels {
                route,
                status,
                outcome,
            })
            .inc();
        self.latency
            .get_or_create(&RouteLabels { route })
            .observe(took.as_secs_f64());
    }
}

/// Distinct (status, outcome) pairs a [`RouteMetrics`] keeps handles for;
/// past it (never in practice: both come from fixed sets) requests are
/// counted through the family lookup.
const MAX_CACHED_OUTCOMES: usize = 64;

/// The HTTP metrics of one route template, with the series handles kept once
/// looked up: recording a request then hashes no labels and takes no family
/// lock, which matters on the cheapest answers (a sold-out 410 costs a few
/// microseconds). Series are still created on the first request that needs
/// them, exactly as through [`HttpMetrics::observe`], so the exposition is
/// the same.
#[derive(Debug)]
pub struct RouteMetrics {
    route: &'static str,
    http: HttpMetrics,
    latency: OnceLock<Histogram>,
    requests: RwLock<Vec<(u16, &'static str, Counter)>>,
}

impl RouteMetrics {
    /// Counts one answered request of this route and records how long it took.
    pub fn observe(&self, status: u16, outcome: &'static str, took: Duration) {
        if !self.count_cached(status, outcome) {
            let counter = self
                .http
                .requests
                .get_or_create(&RequestLabels {
                    route: self.route,
                    status,
                    outcome,
                })
                .clone();
            counter.inc();
            let mut requests = self.requests.write().unwrap_or_else(|e| e.into_inner());
            let known = requests
                .iter()
                .any(|(s, o, _)| *s == status && *o == outcome);
            if !known && requests.len() < MAX_CACHED_OUTCOMES {
                requests.push((status, outcome, counter));
            }
        }
        self.latency
            .get_or_init(|| {
                self.http
                    .latency
                    .get_or_create(&RouteLabels { route: self.route })
                    .clone()
            })
            .observe(took.as_secs_f64());
    }

    /// Increments the cached counter of (`status`, `outcome`), if there is one.
    fn count_cached(&self, status: u16, outcome: &'static str) -> bool {
        let requests = self.requests.read().unwrap_or_else(|e| e.into_inner());
        match requests
            .iter()
            .find(|(s, o, _)| *s == status && *o == outcome)
        {
            Some((_, _, counter)) => {
                counter.inc();
                true
            }
            None => false,
        }
    }
}

/// Labels of a failed Redis call: what was attempted and how it failed
/// (`timeout`, `connection`, `reply`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RedisErrorLabels {
    pub operation: &'static str,
    pub kind: &'static str,
}

/// Redis calls that failed, by operation and kind.
#[derive(Clone, Debug)]
pub struct RedisMetrics {
    errors: Family<RedisErrorLabels, Counter>,
}

impl RedisMetrics {
    /// Creates the Redis error counter and registers it; call once per registry.
    pub fn register(registry: &MetricsRegistry) -> Self {
        let errors = Family::<RedisErrorLabels, Counter>::default();
        registry.register(
            "redis_errors",
            "Redis calls that failed, by operation and kind (timeout, connection, reply)",
            errors.clone(),
        );
        Self { errors }
    }

    pub fn error(&self, operation: &'static str, kind: &'static str) {
        self.errors
            .get_or_create(&RedisErrorLabels { operation, kind })
            .inc();
    }
}

/// Labels of a rate-limited grab: what identified the client (`ip`, `customer`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RateLimitLabels {
    pub key: &'static str,
}

/// Grab answers the command role decides on its own, beside the request
/// counter: requests refused by the rate limiter (no Redis call was made) and
/// grants the master made but too few replicas confirmed (answered 503).
#[derive(Clone, Debug)]
pub struct CommandMetrics {
    rate_limited: Family<RateLimitLabels, Counter>,
    not_replicated: Counter,
    finish_clock_skew: Counter,
    batch_size: Histogram,
    stock_moves: Counter,
    stock_move_batch: Histogram,
}

impl CommandMetrics {
    /// Creates the command metrics and registers them; call once per registry.
    pub fn register(registry: &MetricsRegistry) -> Self {
        let rate_limited = Family::<RateLimitLabels, Counter>::default();
        let not_replicated = Counter::default();
        let finish_clock_skew = Counter::default();
        // 1, 2, 4, ... 128 customers: the group commit's batches (at most
        // --grab-batch-max, 64 by default).
        let batch_size = Histogram::new(exponential_buckets(1.0, 2.0, 8));
        registry.register(
            "grab_batch_size",
            "Customers per grab call to Redis (the group commit's batches)",
            batch_size.clone(),
        );
        // Stock moves of sharded promotions (issue 14): how many, and how
        // long the batches that waited on one took (three more Redis calls
        // than a batch served from its home shard's stock).
        let stock_moves = Counter::default();
        let stock_move_batch = latency_histogram();
        registry.register(
            "grab_stock_moves",
            "Stock moves this worker completed for sharded promotions (a customer's home shard \
             ran dry while another shard had stock)",
            stock_moves.clone(),
        );
        registry.register(
            "grab_stock_move_batch_duration_seconds",
            "Duration of the grab calls of a sharded promotion that completed a stock move \
             (the customers of that batch waited on it)",
            stock_move_batch.clone(),
        );
        registry.register(
            "grab_rate_limited",
            "Grabs answered 429 by the rate limiter before any Redis call, by client key",
            rate_limited.clone(),
        );
        registry.register(
            "grab_not_replicated",
            "Grabs granted by the master but not confirmed by enough replicas in time (answered 503)",
            not_replicated.clone(),
        );
        registry.register(
            "grab_finish_clock_skew",
            "Grabs of a sharded promotion answered 503 because their shard's clock had passed the \
             finish time and shard 0's had not reached it within the skew wait (--finish-skew-wait-ms)",
            finish_clock_skew.clone(),
        );
        Self {
            rate_limited,
            not_replicated,
            finish_clock_skew,
            batch_size,
            stock_moves,
            stock_move_batch,
        }
    }

    /// A batch of a sharded promotion that completed `moves` stock moves
    /// (at least one) and took `took` in all.
    pub fn stock_moved(&self, moves: u64, took: Duration) {
        self.stock_moves.inc_by(moves);
        self.stock_move_batch.observe(took.as_secs_f64());
    }

    /// One grab call to Redis for `customers` customers.
    pub fn batch(&self, customers: usize) {
        self.batch_size.observe(customers as f64);
    }

    pub fn rate_limited(&self, key: &'static str) {
        self.rate_limited
            .get_or_create(&RateLimitLabels { key })
            .inc();
    }

    pub fn not_replicated(&self) {
        self.not_replicated.inc();
    }

    /// A grab left Closing: shard clocks further apart than the skew wait.
    pub fn finish_clock_skew(&self) {
        self.finish_clock_skew.inc();
    }
}

/// The metrics every worker process has, registered once: the registry the
/// roles add theirs to, plus the HTTP and Redis metrics.
#[derive(Clone, Debug)]
pub struct WorkerMetrics {
    pub registry: MetricsRegistry,
    pub http: HttpMetrics,
    pub redis: RedisMetrics,
}

impl Default for WorkerMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl WorkerMetrics {
    pub fn new() -> Self {
        let registry = MetricsRegistry::new();
        let http = HttpMetrics::register(&registry);
        let redis = RedisMetrics::register(&registry);
        Self {
            registry,
            http,
            redis,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposition_lists_requests_latency_and_redis_errors() {
        let m = WorkerMetrics::new();
        m.http
            .observe("/healthz", 200, "ok", Duration::from_micros(300));
        m.redis.error("grab", "timeout");
        let text = m.registry.encode().unwrap();
        assert!(
            text.contains(
                r#"seckill_http_requests_total{route="/healthz",status="200",outcome="ok"} 1"#
            ),
            "{text}"
        );
        assert!(
            text.contains("seckill_http_request_duration_seconds_bucket"),
            "{text}"
        );
        assert!(
            text.contains(r#"seckill_redis_errors_total{operation="grab",kind="timeout"} 1"#),
            "{text}"
        );
        assert!(text.ends_with("# EOF\n"));
    }

    #[test]
    fn route_metrics_record_the_same_series_as_observe() {
        let direct = WorkerMetrics::new();
        let cached = WorkerMetrics::new();
        let route = cached.http.route("/grab");
        for (status, outcome) in [(410, "sold_out"), (200, "granted"), (410, "sold_out")] {
            direct
                .http
                .observe("/grab", status, outcome, Duration::from_micros(150));
            route.observe(status, outcome, Duration::from_micros(150));
        }
        // Same lines; a family lists its series in hash order, so sort them.
        let sorted = |text: String| {
            let mut lines: Vec<String> = text.lines().map(str::to_owned).collect();
            lines.sort();
            lines
        };
        let text = cached.registry.encode().unwrap();
        assert_eq!(
            sorted(text.clone()),
            sorted(direct.registry.encode().unwrap())
        );
        assert!(
            text.contains(
                r#"seckill_http_requests_total{route="/grab",status="410",outcome="sold_out"} 2"#
            ),
            "{text}"
        );
        assert!(
            text.contains(r#"seckill_http_request_duration_seconds_count{route="/grab"} 3"#),
            "{text}"
        );
        let unused = cached.http.route("/unused");
        drop(unused);
        assert!(!cached.registry.encode().unwrap().contains("/unused"));
    }

    #[test]
    fn command_metrics_count_rate_limited_and_unreplicated_grabs() {
        let m = WorkerMetrics::new();
        let c = CommandMetrics::register(&m.registry);
        c.rate_limited("ip");
        c.rate_limited("ip");
        c.not_replicated();
        c.batch(3);
        let text = m.registry.encode().unwrap();
        assert!(text.contains("seckill_grab_batch_size_count 1"), "{text}");
        assert!(
            text.contains(r#"seckill_grab_rate_limited_total{key="ip"} 2"#),
            "{text}"
        );
        assert!(
            text.contains("seckill_grab_not_replicated_total 1"),
            "{text}"
        );
    }

    #[test]
    fn roles_can_add_their_own_metrics_to_the_same_registry() {
        let m = WorkerMetrics::new();
        let c: Counter = Counter::default();
        m.registry
            .register("projector_events_applied", "events", c.clone());
        c.inc_by(3);
        assert!(m
            .registry
            .encode()
            .unwrap()
            .contains("seckill_projector_events_applied_total 3"));
    }
}
