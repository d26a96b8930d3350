//! The query endpoints: what customers and platform teams read, answered
//! from the read models the projectors maintain (never from the command-side
//! keys, so a flood of reads cannot slow grabs down).
//!
//! | route | answer |
//! |---|---|
//! | `GET /api/v1/promotions` | the active promotions |
//! | `GET /api/v1/promotions/{namespace}/{name}` | one promotion; 404 `unknown_promotion` |
//! | `GET /api/v1/customers/{customerId}/coupons` | the coupons a customer holds |
//!
//! Every answer carries `X-Seckill-Projection-Lag-Ms`: how far behind the
//! streams the read models may be (`-1` when no projector has reported yet).
//! With `--customer-id-header NAME`, the coupons of a customer are shown only
//! to a request whose header NAME holds that customer id (set by the
//! authenticating gateway; read by [`customer_header::caller`]): absent,
//! empty or not one valid id → 401 `unauthenticated`, another id → 403
//! `forbidden`.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::header::{HeaderName, HeaderValue};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use crate::http::customer_header::{self, CustomerIdHeaderArgs};
use crate::http::extract::PromotionPath;
use crate::http::{self, json, ApiError, Apis, HealthApi, ServerLimitArgs};
use crate::metrics::{RedisMetrics, WorkerMetrics};
use crate::protocol::CustomerId;
use crate::read_model::{self, ActivePromotion, CustomerCoupon, ReadModelError};
use crate::redis_connection::{RedisArgs, RedisConnection, RedisSetupError};

/// Header of every query answer: milliseconds the read models may lag the
/// streams.
pub const LAG_HEADER: &str = "x-seckill-projection-lag-ms";

/// Flags of `seckill-worker query`.
#[derive(clap::Args, Debug, Clone)]
pub struct QueryArgs {
    #[command(flatten)]
    pub redis: RedisArgs,

    /// Address of the HTTP API (and /healthz, /readyz, /metrics).
    #[arg(long, env = "SECKILL_LISTEN", default_value = "0.0.0.0:8080")]
    pub listen: String,

    #[command(flatten)]
    pub customer: CustomerIdHeaderArgs,

    /// After SIGTERM, in-flight requests get this long to finish (seconds).
    #[arg(long, env = "SECKILL_DRAIN_TIMEOUT_SECS", default_value_t = 20)]
    pub drain_timeout_secs: u64,

    #[command(flatten)]
    pub limits: ServerLimitArgs,
}

impl QueryArgs {
    /// How the query endpoints behave, as these flags say.
    pub fn options(&self) -> QueryOptions {
        QueryOptions {
            customer_id_header: self.customer.customer_id_header.clone(),
            redis_timeout: self.redis.timeout(),
        }
    }
}

/// The query role could not run.
#[derive(Debug, thiserror::Error)]
pub enum QueryError {
    #[error("redis setup: {0}")]
    Setup(#[from] RedisSetupError),
    #[error("http: {0}")]
    Http(#[from] http::HttpError),
}

/// How the query endpoints behave.
#[derive(Debug, Clone)]
pub struct QueryOptions {
    /// When set, only the customer named in this header may read their coupons.
    pub customer_id_header: Option<HeaderName>,
    /// Bound on each read; past it the answer is 503 `unavailable`.
    pub redis_timeout: Duration,
}

/// The query endpoints' state, served by `seckill-worker query` and
/// mounted on `seckill-worker command` (unless `--no-query`).
pub struct QueryApi {
    redis: RedisConnection,
    options: QueryOptions,
    redis_metrics: Option<RedisMetrics>,
}

#[derive(Serialize)]
struct Items<T> {
    items: Vec<T>,
}

impl QueryApi {
    pub fn new(redis: RedisConnection, options: QueryOptions) -> Self {
        Self {
            redis,
            options,
            redis_metrics: None,
        }
    }

    /// Counts failed reads as Redis errors (operation `query`).
    pub fn with_redis_metrics(mut self, metrics: RedisMetrics) -> Self {
        self.redis_metrics = Some(metrics);
        self
    }

    /// Runs one read-model read with the lag beside it, bounded in time; a
    /// failure becomes 503 `unavailable`.
    async fn read<T, F, Fut>(&self, f: F) -> Result<(T, i64), ApiError>
    where
        F: FnOnce(RedisConnection) -> Fut,
        Fut: std::future::Future<Output = Result<T, ReadModelError>>,
    {
        let mut lag_con = self.redis.clone();
        let both = async {
            tokio::join!(
                f(self.redis.clone()),
                read_model::projection_lag_ms(&mut lag_con)
            )
        };
        let failure = match tokio::time::timeout(self.options.redis_timeout, both).await {
            Ok((Ok(value), Ok(lag))) => return Ok((value, lag.unwrap_or(-1))),
            Ok((Err(e), _)) | Ok((_, Err(e))) => match e {
                ReadModelError::BadData(_) | ReadModelError::ForeignKey { .. } => {
                    tracing::error!(error = %e, "read model holds unexpected data");
                    return Err(ApiError::internal(format!(
                        "the read model is damaged: {e}"
                    )));
                }
                ReadModelError::Redis(r) => {
                    let kind = if r.is_timeout() {
                        "timeout"
                    } else {
                        "connection"
                    };
                    (kind, format!("the read models could not be read: {r}"))
                }
            },
            Err(_) => (
                "timeout",
                format!(
                    "the read models did not answer within {:?}",
                    self.options.redis_timeout
                ),
            ),
        };
        if let Some(m) = &self.redis_metrics {
            m.error("query", failure.0);
        }
        tracing::warn!(reason = %failure.1, "query failed");
        Err(ApiError::unavailable(failure.1))
    }

    /// 401 unless the caller is `customer` (when `--customer-id-header` is
    /// set; see [`customer_header::caller`]), 403 when it is someone else.
    fn authorize(&self, headers: &HeaderMap, customer: &CustomerId) -> Result<(), ApiError> {
        let Some(header) = &self.options.customer_id_header else {
            return Ok(());
        };
        match customer_header::caller(headers, header) {
            Ok(caller) if caller == *customer => Ok(()),
            Ok(_) => Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "forbidden",
                "customers may read only their own coupons",
            )),
            // Absent, empty or not one valid id: nobody is authenticated.
            Err(e) => Err(ApiError::new(
                StatusCode::UNAUTHORIZED,
                "unauthenticated",
                e.to_string(),
            )),
        }
    }
}

/// The answer with the lag header.
fn with_lag(mut response: Response, lag: i64) -> Response {
    response
        .headers_mut()
        .insert(HeaderName::from_static(LAG_HEADER), HeaderValue::from(lag));
    response
}

/// `GET /api/v1/promotions`: the active promotions.
pub async fn promotions(State(api): State<Arc<QueryApi>>) -> Result<Response, ApiError> {
    let (items, lag) = api
        .read(|mut con| async move { read_model::active_promotions(&mut con).await })
        .await?;
    let body: Items<ActivePromotion> = Items { items };
    Ok(with_lag(json(StatusCode::OK, &body), lag))
}

/// `GET /api/v1/promotions/{namespace}/{name}`: one promotion; 404
/// `unknown_promotion`.
pub async fn promotion(
    State(api): State<Arc<QueryApi>>,
    path: PromotionPath,
) -> Result<Response, ApiError> {
    let id = path.id()?;
    let (view, lag) = api
        .read(|mut con| {
            let id = id.clone();
            async move { read_model::promotion(&mut con, &id).await }
        })
        .await?;
    let response = match view {
        Some(view) => json(StatusCode::OK, &view),
        None => ApiError::new(
            StatusCode::NOT_FOUND,
            "unknown_promotion",
            format!("promotion {id} is not known (not started yet, or never scheduled)"),
        )
        .into_response(),
    };
    Ok(with_lag(response, lag))
}

/// `GET /api/v1/customers/{customerId}/coupons`: the coupons a customer
/// holds (the path segment is percent-decoded: `@` and `:` may come
/// encoded).
pub async fn customer_coupons(
    State(api): State<Arc<QueryApi>>,
    customer: Result<Path<String>, axum::extract::rejection::PathRejection>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let Path(customer) = customer.map_err(|e| ApiError::invalid_request(e.body_text()))?;
    let customer = CustomerId::parse(&customer).map_err(|e| ApiError::invalid_request(e.0))?;
    api.authorize(&headers, &customer)?;
    let (items, lag) = api
        .read(|mut con| {
            let customer = customer.clone();
            async move { read_model::customer_coupons(&mut con, &customer).await }
        })
        .await?;
    let body: Items<CustomerCoupon> = Items { items };
    Ok(with_lag(json(StatusCode::OK, &body), lag))
}

/// Runs the role until SIGTERM.
pub async fn run(args: QueryArgs) -> Result<(), QueryError> {
    let con = args.redis.connect_read_models()?;
    let metrics = WorkerMetrics::new();
    let query =
        QueryApi::new(con.clone(), args.options()).with_redis_metrics(metrics.redis.clone());
    let health = HealthApi::new(con, args.redis.timeout(), metrics.registry.clone())
        .with_redis_metrics(metrics.redis.clone());
    let limits = args.limits.limits(
        Duration::from_secs(args.drain_timeout_secs),
        Some(metrics.http.clone()),
    );
    let app = Apis {
        command: None,
        query: Some(query),
        health,
    }
    .router(&limits);
    let listener = http::bind(&args.listen).await?;
    http::serve(listener, app, &limits, http::shutdown_on_signal()).await?;
    Ok(())
}
