//! The probes and the metrics every process serves: `/healthz` (the
//! process answers), `/readyz` (Redis answers PING within the timeout) and
//! `/metrics` (the OpenMetrics exposition of the process' registry).

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::State;
use axum::http::header::{HeaderValue, CONTENT_TYPE};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use crate::http::{json, ApiError};
use crate::metrics::{MetricsRegistry, RedisMetrics};
use crate::redis_connection::RedisConnection;

const OPENMETRICS: HeaderValue =
    HeaderValue::from_static("application/openmetrics-text; version=1.0.0; charset=utf-8");

/// What the probes and `/metrics` read: the Redis to ping and the registry
/// to expose. The state of their routes.
pub struct HealthApi {
    redis: RedisConnection,
    timeout: Duration,
    registry: MetricsRegistry,
    redis_metrics: Option<RedisMetrics>,
}

#[derive(Serialize)]
struct Status<'a> {
    status: &'a str,
}

impl HealthApi {
    pub fn new(redis: RedisConnection, timeout: Duration, registry: MetricsRegistry) -> Self {
        Self {
            redis,
            timeout,
            registry,
            redis_metrics: None,
        }
    }

    /// Counts failed readiness pings as Redis errors (operation `ping`).
    pub fn with_redis_metrics(mut self, metrics: RedisMetrics) -> Self {
        self.redis_metrics = Some(metrics);
        self
    }
}

/// `GET /healthz`: 200 while the process serves HTTP.
pub async fn healthz() -> Response {
    json(StatusCode::OK, &Status { status: "ok" })
}

/// `GET /readyz`: 200 when Redis answers PING within the timeout, else 503
/// `unavailable`.
pub async fn readyz(State(api): State<Arc<HealthApi>>) -> Response {
    let mut con = api.redis.clone();
    let cmd = redis::cmd("PING");
    let ping = cmd.query_async::<String>(&mut con);
    let (kind, message) = match tokio::time::timeout(api.timeout, ping).await {
        Ok(Ok(_)) => return json(StatusCode::OK, &Status { status: "ready" }),
        Ok(Err(e)) => ("connection", format!("Redis did not answer PING: {e}")),
        Err(_) => (
            "timeout",
            format!("Redis did not answer PING within {:?}", api.timeout),
        ),
    };
    if let Some(m) = &api.redis_metrics {
        m.error("ping", kind);
    }
    // Not retried by the caller (a probe), so no Retry-After.
    ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", message).into_response()
}

/// `GET /metrics`: the OpenMetrics text of every registered metric.
pub async fn metrics(State(api): State<Arc<HealthApi>>) -> Response {
    match api.registry.encode() {
        Ok(text) => {
            let mut response = Response::new(Body::from(text));
            response.headers_mut().insert(CONTENT_TYPE, OPENMETRICS);
            response
        }
        Err(e) => ApiError::internal(format!("cannot encode metrics: {e}")).into_response(),
    }
}
