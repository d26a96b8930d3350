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
//! authenticating gateway): absent → 401 `unauthenticated`, another id → 403
//! `forbidden`.

use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use hyper::header::{HeaderName, HeaderValue};
use hyper::{Method, StatusCode};
use serde::Serialize;

use crate::http::{
    self, json_response, Api, ApiError, ApiRequest, HealthApi, HttpResponse, ServerLimitArgs,
};
use crate::metrics::{RedisMetrics, WorkerMetrics};
use crate::protocol::{CustomerId, PromotionId};
use crate::read_model::{self, ActivePromotion, CustomerCoupon, ReadModelError};
use crate::redis_connection::{RedisArgs, RedisConnection, RedisSetupError};

/// Header of every query answer: milliseconds the read models may lag the
/// streams.
pub const LAG_HEADER: &str = "x-seckill-projection-lag-ms";

/// The routes of [`QueryApi`].
pub const PROMOTIONS_ROUTE: &str = "/api/v1/promotions";
pub const PROMOTION_ROUTE: &str = "/api/v1/promotions/{namespace}/{name}";
pub const CUSTOMER_COUPONS_ROUTE: &str = "/api/v1/customers/{customerId}/coupons";

/// Flags of `seckill-worker query`.
#[derive(clap::Args, Debug, Clone)]
pub struct QueryArgs {
    #[command(flatten)]
    pub redis: RedisArgs,

    /// Address of the HTTP API (and /healthz, /readyz, /metrics).
    #[arg(long, env = "SECKILL_LISTEN", default_value = "0.0.0.0:8080")]
    pub listen: String,

    /// Header naming the authenticated customer; when set, customers may
    /// read only their own coupons.
    #[arg(long, env = "SECKILL_CUSTOMER_ID_HEADER")]
    pub customer_id_header: Option<String>,

    /// After SIGTERM, in-flight requests get this long to finish (seconds).
    #[arg(long, env = "SECKILL_DRAIN_TIMEOUT_SECS", default_value_t = 20)]
    pub drain_timeout_secs: u64,

    #[command(flatten)]
    pub limits: ServerLimitArgs,
}

/// The query role could not run.
#[derive(Debug, thiserror::Error)]
pub enum QueryError {
    #[error("redis setup: {0}")]
    Setup(#[from] RedisSetupError),
    #[error("http: {0}")]
    Http(#[from] http::HttpError),
    #[error("--customer-id-header {0:?} is not a valid header name")]
    HeaderName(String),
}

/// How the query endpoints behave.
#[derive(Debug, Clone)]
pub struct QueryOptions {
    /// When set, only the customer named in this header may read their coupons.
    pub customer_id_header: Option<HeaderName>,
    /// Bound on each read; past it the answer is 503 `unavailable`.
    pub redis_timeout: Duration,
}

impl Default for QueryOptions {
    fn default() -> Self {
        Self {
            customer_id_header: None,
            redis_timeout: Duration::from_secs(1),
        }
    }
}

impl QueryOptions {
    /// Options from the flags shared by `query` and `command`.
    pub fn from_flags(
        customer_id_header: Option<&str>,
        redis: &RedisArgs,
    ) -> Result<Self, QueryError> {
        let header = match customer_id_header {
            None => None,
            Some(name) => Some(
                HeaderName::from_bytes(name.as_bytes())
                    .map_err(|_| QueryError::HeaderName(name.to_owned()))?,
            ),
        };
        Ok(Self {
            customer_id_header: header,
            redis_timeout: redis.timeout(),
        })
    }
}

/// The query endpoints, served by `seckill-worker query` and mounted on
/// `seckill-worker command` (unless `--no-query`).
pub struct QueryApi {
    redis: RedisConnection,
    options: QueryOptions,
    redis_metrics: Option<RedisMetrics>,
}

#[derive(Serialize)]
struct Items<T> {
    items: Vec<T>,
}

/// Percent-decodes one path segment; `None` when it is not valid UTF-8.
fn decode_segment(segment: &str) -> Option<String> {
    let bytes = segment.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).ok();
            if let Some(b) = hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                out.push(b);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8(out).ok()
}

enum Route {
    Promotions,
    Promotion(String, String),
    CustomerCoupons(String),
}

fn route_of(path: &str) -> Option<Route> {
    let rest = path.strip_prefix("/api/v1/")?;
    let segments: Vec<&str> = rest.split('/').collect();
    match segments.as_slice() {
        ["promotions"] => Some(Route::Promotions),
        ["promotions", ns, name] if !ns.is_empty() && !name.is_empty() => {
            Some(Route::Promotion((*ns).to_owned(), (*name).to_owned()))
        }
        ["customers", customer, "coupons"] if !customer.is_empty() => {
            Some(Route::CustomerCoupons((*customer).to_owned()))
        }
        _ => None,
    }
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

    fn with_lag(mut response: HttpResponse, lag: i64) -> HttpResponse {
        response
            .headers_mut()
            .insert(HeaderName::from_static(LAG_HEADER), HeaderValue::from(lag));
        response
    }

    async fn promotions(&self) -> Result<HttpResponse, ApiError> {
        let (items, lag) = self
            .read(|mut con| async move { read_model::active_promotions(&mut con).await })
            .await?;
        let body: Items<ActivePromotion> = Items { items };
        Ok(Self::with_lag(json_response(StatusCode::OK, &body), lag))
    }

    async fn promotion(&self, ns: &str, name: &str) -> Result<HttpResponse, ApiError> {
        let (ns, name) = match (decode_segment(ns), decode_segment(name)) {
            (Some(ns), Some(name)) => (ns, name),
            _ => {
                return Err(ApiError::invalid_request(
                    "the promotion id is not valid UTF-8",
                ))
            }
        };
        let id = PromotionId::new(&ns, &name).map_err(|e| ApiError::invalid_request(e.0))?;
        let (view, lag) = self
            .read(|mut con| {
                let id = id.clone();
                async move { read_model::promotion(&mut con, &id).await }
            })
            .await?;
        Ok(match view {
            Some(view) => Self::with_lag(json_response(StatusCode::OK, &view), lag),
            None => Self::with_lag(
                ApiError::new(
                    StatusCode::NOT_FOUND,
                    "unknown_promotion",
                    format!("promotion {id} is not known (not started yet, or never scheduled)"),
                )
                .into_response(),
                lag,
            ),
        })
    }

    async fn customer_coupons(
        &self,
        req: &ApiRequest,
        raw: &str,
    ) -> Result<HttpResponse, ApiError> {
        let text = decode_segment(raw)
            .ok_or_else(|| ApiError::invalid_request("the customerId is not valid UTF-8"))?;
        let customer = CustomerId::parse(&text).map_err(|e| ApiError::invalid_request(e.0))?;
        if let Some(header) = &self.options.customer_id_header {
            let caller = req.headers.get(header).and_then(|v| v.to_str().ok());
            match caller {
                None => {
                    return Err(ApiError::new(
                        StatusCode::UNAUTHORIZED,
                        "unauthenticated",
                        format!("the {header} header naming the calling customer is required"),
                    ))
                }
                Some(caller) if caller != customer.as_str() => {
                    return Err(ApiError::new(
                        StatusCode::FORBIDDEN,
                        "forbidden",
                        "customers may read only their own coupons",
                    ))
                }
                Some(_) => {}
            }
        }
        let (items, lag) = self
            .read(|mut con| {
                let customer = customer.clone();
                async move { read_model::customer_coupons(&mut con, &customer).await }
            })
            .await?;
        let body: Items<CustomerCoupon> = Items { items };
        Ok(Self::with_lag(json_response(StatusCode::OK, &body), lag))
    }
}

impl Api for QueryApi {
    fn handle<'a>(&'a self, req: &'a ApiRequest) -> BoxFuture<'a, Option<HttpResponse>> {
        Box::pin(async move {
            if req.method != Method::GET {
                return None;
            }
            let result = match route_of(&req.path)? {
                Route::Promotions => self.promotions().await,
                Route::Promotion(ns, name) => self.promotion(&ns, &name).await,
                Route::CustomerCoupons(c) => self.customer_coupons(req, &c).await,
            };
            Some(result.unwrap_or_else(ApiError::into_response))
        })
    }

    fn routes(&self) -> Vec<(Method, &'static str)> {
        vec![
            (Method::GET, PROMOTIONS_ROUTE),
            (Method::GET, PROMOTION_ROUTE),
            (Method::GET, CUSTOMER_COUPONS_ROUTE),
        ]
    }
}

/// Runs the role until SIGTERM.
pub async fn run(args: QueryArgs) -> Result<(), QueryError> {
    let con = args.redis.connect_read_models()?;
    let metrics = WorkerMetrics::new();
    let options = QueryOptions::from_flags(args.customer_id_header.as_deref(), &args.redis)?;
    let query = QueryApi::new(con.clone(), options).with_redis_metrics(metrics.redis.clone());
    let health = HealthApi::new(con, args.redis.timeout(), metrics.registry.clone())
        .with_redis_metrics(metrics.redis.clone());
    let listener = http::bind(&args.listen).await?;
    let limits = args.limits.limits(
        Duration::from_secs(args.drain_timeout_secs),
        Some(metrics.http.clone()),
    );
    let shutdown = http::shutdown_on_signal();
    http::serve(
        listener,
        vec![Arc::new(query), Arc::new(health)],
        limits,
        shutdown,
    )
    .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn path_segments_are_percent_decoded() {
        assert_eq!(decode_segment("a%40b").as_deref(), Some("a@b"));
        assert_eq!(decode_segment("plain").as_deref(), Some("plain"));
        assert_eq!(decode_segment("bad%zz").as_deref(), Some("bad%zz"));
        assert_eq!(decode_segment("end%4").as_deref(), Some("end%4"));
        assert_eq!(decode_segment("%ff"), None);
    }

    #[test]
    fn routes_split_into_their_parameters() {
        assert!(matches!(
            route_of("/api/v1/promotions"),
            Some(Route::Promotions)
        ));
        assert!(
            matches!(route_of("/api/v1/promotions/a/b"), Some(Route::Promotion(a, b)) if a == "a" && b == "b")
        );
        assert!(
            matches!(route_of("/api/v1/customers/x/coupons"), Some(Route::CustomerCoupons(c)) if c == "x")
        );
        assert!(route_of("/api/v1/promotions/a/b/grab").is_none());
        assert!(route_of("/api/v1/promotions//b").is_none());
        assert!(route_of("/api/v1/customers//coupons").is_none());
    }
}
