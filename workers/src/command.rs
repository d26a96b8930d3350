//! The command side: `POST /api/v1/promotions/{namespace}/{name}/grab`.
//!
//! A grab is one Redis round trip (the `grab` script), which decides
//! everything atomically on Redis' clock: stock, one coupon per customer,
//! the window. This handler only validates input, maps the script's answer to
//! HTTP, and never answers 200 unless the script said `granted` or
//! `already_granted`, i.e. the coupon is in the stream.
//!
//! Once a flash sale is over, the load does not stop: customers keep
//! pressing the button. So the worker remembers promotions it has seen sold
//! out or finished (final states: they never reopen) and answers 410 without
//! Redis, and remembers unknown promotions for one second, which absorbs
//! typos and scans without hiding a promotion created a moment later.
//! "Not started" is never remembered: only Redis' clock may open a sale.

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use hyper::header::{HeaderName, CONTENT_TYPE};
use hyper::{Method, StatusCode};
use serde::{Deserialize, Serialize};

use crate::http::{
    self, json_response, Api, ApiError, ApiRequest, HealthApi, HttpResponse, Outcome, ServerLimits,
};
use crate::metrics::{RedisMetrics, WorkerMetrics};
use crate::protocol::{self, Coupon, CustomerId, FinishReason, GrabOutcome, PromotionId};
use crate::query::{QueryApi, QueryOptions};
use crate::redis_connection::{RedisArgs, RedisConnection, RedisSetupError};

/// The route of the grab endpoint, as an OpenAPI path template.
pub const GRAB_ROUTE: &str = "/api/v1/promotions/{namespace}/{name}/grab";

const PATH_PREFIX: &str = "/api/v1/promotions/";
const PATH_SUFFIX: &str = "/grab";

/// How long an unknown promotion is answered 404 without asking Redis.
const UNKNOWN_MEMORY: Duration = Duration::from_secs(1);

/// Bound on remembered unknown promotions, so that requests for random
/// names cannot grow the worker's memory without limit.
const MAX_REMEMBERED_UNKNOWN: usize = 10_000;

/// Flags of `seckill-worker command`.
#[derive(clap::Args, Debug, Clone)]
pub struct CommandArgs {
    /// Address to serve HTTP on (API, /healthz, /readyz, /metrics).
    #[arg(long, env = "SECKILL_LISTEN", default_value = "0.0.0.0:8080")]
    pub listen: String,

    /// Take the customer id from this request header only (set by an
    /// authenticating gateway); the body's customerId is then ignored.
    #[arg(long, env = "SECKILL_CUSTOMER_ID_HEADER")]
    pub customer_id_header: Option<String>,

    /// Do not mount the query endpoints on this server.
    #[arg(long, env = "SECKILL_NO_QUERY")]
    pub no_query: bool,

    /// After SIGTERM, in-flight requests get this many seconds to finish.
    #[arg(long, env = "SECKILL_DRAIN_TIMEOUT_SECS", default_value_t = 20)]
    pub drain_timeout_secs: u64,

    #[command(flatten)]
    pub redis: RedisArgs,
}

/// The command role could not start or serve.
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    #[error(transparent)]
    Redis(#[from] RedisSetupError),
    #[error(transparent)]
    Http(#[from] http::HttpError),
    #[error("--customer-id-header {name:?} is not a valid header name")]
    HeaderName { name: String },
}

/// How a [`CommandApi`] behaves.
#[derive(Debug, Clone)]
pub struct CommandOptions {
    /// Take the customer id from this header only, ignoring the body.
    pub customer_id_header: Option<HeaderName>,
    /// Bound on one grab round trip; past it the answer is 503.
    pub redis_timeout: Duration,
    /// Where failed Redis calls are counted.
    pub redis_metrics: Option<RedisMetrics>,
}

impl Default for CommandOptions {
    fn default() -> Self {
        Self {
            customer_id_header: None,
            redis_timeout: Duration::from_secs(1),
            redis_metrics: None,
        }
    }
}

impl CommandOptions {
    /// Parses the header name of `--customer-id-header`.
    pub fn customer_id_header(name: Option<&str>) -> Result<Option<HeaderName>, CommandError> {
        name.filter(|n| !n.is_empty())
            .map(|n| {
                HeaderName::from_bytes(n.as_bytes())
                    .map_err(|_| CommandError::HeaderName { name: n.to_owned() })
            })
            .transpose()
    }
}

/// What this worker knows without asking Redis about a promotion.
#[derive(Debug, Clone, Copy)]
enum Known {
    /// Final: a promotion never reopens.
    Finished(FinishReason),
    /// Answered unknown by Redis; trusted until `until`.
    Unknown { until: Instant },
}

/// The promotions this worker has seen closed or missing, keyed by
/// `namespace/name`. Read on every grab, written rarely; the lock is never
/// held across an await.
#[derive(Debug, Default)]
struct PromotionMemory {
    known: RwLock<HashMap<Box<str>, Known>>,
}

impl PromotionMemory {
    fn get(&self, id: &str) -> Option<Known> {
        let known = self.known.read().unwrap_or_else(|e| e.into_inner());
        match known.get(id) {
            Some(Known::Unknown { until }) if *until <= Instant::now() => None,
            other => other.copied(),
        }
    }

    fn finished(&self, id: &str, reason: FinishReason) {
        let mut known = self.known.write().unwrap_or_else(|e| e.into_inner());
        known.insert(id.into(), Known::Finished(reason));
    }

    fn unknown(&self, id: &str) {
        let now = Instant::now();
        let mut known = self.known.write().unwrap_or_else(|e| e.into_inner());
        if known.len() >= MAX_REMEMBERED_UNKNOWN {
            known.retain(|_, k| !matches!(k, Known::Unknown { until } if *until <= now));
            if known.len() >= MAX_REMEMBERED_UNKNOWN {
                return;
            }
        }
        known.insert(
            id.into(),
            Known::Unknown {
                until: now + UNKNOWN_MEMORY,
            },
        );
    }

    fn forget(&self, id: &str) {
        let mut known = self.known.write().unwrap_or_else(|e| e.into_inner());
        if matches!(known.get(id), Some(Known::Unknown { .. })) {
            known.remove(id);
        }
    }
}

/// The grab endpoint, mountable on any [`http::serve`] (the command role,
/// `seckill up`).
pub struct CommandApi {
    redis: RedisConnection,
    options: CommandOptions,
    memory: PromotionMemory,
}

#[derive(Deserialize)]
struct GrabRequest<'a> {
    #[serde(rename = "customerId", borrow, default)]
    customer_id: Option<Cow<'a, str>>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct GrabbedBody<'a> {
    coupon_id: &'a str,
    customer_id: &'a str,
    promotion: &'a str,
    discount: f64,
    granted_at: &'a str,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    already_granted: bool,
}

fn grabbed(coupon: &Coupon, already_granted: bool) -> HttpResponse {
    let mut response = json_response(
        StatusCode::OK,
        &GrabbedBody {
            coupon_id: &coupon.coupon_id,
            customer_id: &coupon.customer_id,
            promotion: &coupon.promotion,
            discount: coupon.discount,
            granted_at: &coupon.granted_at,
            already_granted,
        },
    );
    response
        .extensions_mut()
        .insert(Outcome(if already_granted {
            "already_granted"
        } else {
            "granted"
        }));
    response
}

fn closed(id: &str, customer: &CustomerId, reason: FinishReason) -> HttpResponse {
    let (code, what) = match reason {
        FinishReason::SoldOut => ("sold_out", "is sold out"),
        FinishReason::Expired => ("finished", "has ended"),
        FinishReason::Deleted => ("finished", "was withdrawn"),
    };
    ApiError::new(
        StatusCode::GONE,
        code,
        format!(
            "promotion {id} {what}; coupons you already hold are listed under GET /api/v1/customers/{customer}/coupons"
        ),
    )
    .into_response()
}

fn unknown(id: &str) -> HttpResponse {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "unknown_promotion",
        format!("promotion {id} does not exist"),
    )
    .into_response()
}

/// `namespace/name` of a grab path, or `None` when `path` is another route.
fn grab_target(path: &str) -> Option<(&str, &str, &str)> {
    let id = path.strip_prefix(PATH_PREFIX)?.strip_suffix(PATH_SUFFIX)?;
    let (namespace, name) = id.split_once('/')?;
    if name.contains('/') {
        return None;
    }
    Some((id, namespace, name))
}

fn is_json(req: &ApiRequest) -> bool {
    req.headers
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|v| {
            v.split(';')
                .next()
                .unwrap_or_default()
                .trim()
                .eq_ignore_ascii_case("application/json")
        })
        .unwrap_or(false)
}

impl CommandApi {
    pub fn new(redis: RedisConnection, options: CommandOptions) -> Self {
        Self {
            redis,
            options,
            memory: PromotionMemory::default(),
        }
    }

    fn customer(&self, req: &ApiRequest) -> Result<CustomerId, ApiError> {
        if let Some(header) = &self.options.customer_id_header {
            let value = req.headers.get(header).ok_or_else(|| {
                ApiError::invalid_request(format!("the {header} header (customer id) is required"))
            })?;
            let text = value.to_str().map_err(|_| {
                ApiError::invalid_request(format!("the {header} header is not visible ASCII"))
            })?;
            return CustomerId::parse(text).map_err(|e| ApiError::invalid_request(e.0));
        }
        if !is_json(req) {
            return Err(ApiError::unsupported_media_type(
                "the request body must be JSON (Content-Type: application/json)",
            ));
        }
        let body: GrabRequest<'_> = serde_json::from_slice(&req.body).map_err(|e| {
            ApiError::invalid_request(format!(
                r#"the body must be a JSON object {{"customerId": "..."}}: {e}"#
            ))
        })?;
        let id = body
            .customer_id
            .ok_or_else(|| ApiError::invalid_request("customerId is required"))?;
        CustomerId::parse(&id).map_err(|e| ApiError::invalid_request(e.0))
    }

    fn redis_failed(&self, kind: &'static str, id: &str, detail: String) -> HttpResponse {
        if let Some(m) = &self.options.redis_metrics {
            m.error("grab", kind);
        }
        // One line per failed request would flood the log during an outage;
        // the redis_errors metric and /readyz tell the story at warn level.
        tracing::debug!(promotion = id, kind, error = %detail, "grab failed on Redis");
        ApiError::unavailable(
            "the coupon store is unavailable; nothing was granted, retry in a moment",
        )
        .into_response()
    }

    /// Handles a grab of `namespace/name` (`id`).
    pub async fn grab(
        &self,
        req: &ApiRequest,
        id: &str,
        namespace: &str,
        name: &str,
    ) -> HttpResponse {
        // Only valid ids are ever remembered, so the memory is asked with the
        // raw path segment first: an answer from memory builds no id.
        let promotion = match self.memory.get(id) {
            Some(known) => {
                let customer = match self.customer(req) {
                    Ok(c) => c,
                    Err(e) => return e.into_response(),
                };
                return match known {
                    Known::Finished(reason) => closed(id, &customer, reason),
                    Known::Unknown { .. } => unknown(id),
                };
            }
            None => match PromotionId::new(namespace, name) {
                Ok(p) => p,
                Err(e) => return ApiError::invalid_request(e.0).into_response(),
            },
        };
        let customer = match self.customer(req) {
            Ok(c) => c,
            Err(e) => return e.into_response(),
        };
        let mut con = self.redis.clone();
        let call = protocol::grab(&mut con, &promotion, &customer);
        let outcome = match tokio::time::timeout(self.options.redis_timeout, call).await {
            Err(_) => {
                return self.redis_failed(
                    "timeout",
                    id,
                    format!("no answer within {:?}", self.options.redis_timeout),
                )
            }
            Ok(Err(protocol::ScriptError::Redis(e))) => {
                let kind = if e.is_timeout() {
                    "timeout"
                } else {
                    "connection"
                };
                return self.redis_failed(kind, id, e.to_string());
            }
            Ok(Err(e @ protocol::ScriptError::BadReply(_))) => {
                if let Some(m) = &self.options.redis_metrics {
                    m.error("grab", "reply");
                }
                tracing::error!(promotion = id, error = %e, "grab script answered unexpectedly");
                return ApiError::internal(
                    "the coupon store answered unexpectedly; nothing was granted",
                )
                .into_response();
            }
            Ok(Ok(outcome)) => outcome,
        };
        match outcome {
            GrabOutcome::Granted { coupon, sold_out } => {
                if sold_out {
                    self.memory.finished(id, FinishReason::SoldOut);
                }
                grabbed(&coupon, false)
            }
            GrabOutcome::AlreadyGranted { coupon } => grabbed(&coupon, true),
            GrabOutcome::UnknownPromotion => {
                self.memory.unknown(id);
                unknown(id)
            }
            GrabOutcome::NotStarted {
                opens_in_ms,
                publish_time,
            } => {
                self.memory.forget(id);
                ApiError::new(
                    StatusCode::CONFLICT,
                    "not_started",
                    format!("promotion {id} opens at {publish_time}, in {opens_in_ms} ms"),
                )
                .retry_after(opens_in_ms.div_ceil(1000).max(1))
                .into_response()
            }
            GrabOutcome::SoldOut => {
                self.memory.finished(id, FinishReason::SoldOut);
                closed(id, &customer, FinishReason::SoldOut)
            }
            GrabOutcome::Finished { reason } => {
                self.memory.finished(id, reason);
                closed(id, &customer, reason)
            }
        }
    }
}

impl Api for CommandApi {
    fn handle<'a>(&'a self, req: &'a ApiRequest) -> BoxFuture<'a, Option<HttpResponse>> {
        Box::pin(async move {
            if req.method != Method::POST {
                return None;
            }
            let (id, namespace, name) = grab_target(&req.path)?;
            Some(self.grab(req, id, namespace, name).await)
        })
    }

    fn routes(&self) -> Vec<(Method, &'static str)> {
        vec![(Method::POST, GRAB_ROUTE)]
    }
}

/// Runs the command role until SIGTERM or Ctrl-C, then drains and returns.
pub async fn run(args: CommandArgs) -> Result<(), CommandError> {
    let customer_id_header =
        CommandOptions::customer_id_header(args.customer_id_header.as_deref())?;
    let redis = args.redis.connect()?;
    let metrics = WorkerMetrics::new();
    tracing::info!(redis = %args.redis.describe(), listen = %args.listen, "starting the command role");

    let command = CommandApi::new(
        redis.clone(),
        CommandOptions {
            customer_id_header: customer_id_header.clone(),
            redis_timeout: args.redis.timeout(),
            redis_metrics: Some(metrics.redis.clone()),
        },
    );
    let mut apis: Vec<Arc<dyn Api>> = vec![Arc::new(command)];
    if !args.no_query {
        let options = QueryOptions {
            customer_id_header,
            redis_timeout: args.redis.timeout(),
        };
        apis.push(Arc::new(
            QueryApi::new(redis.clone(), options).with_redis_metrics(metrics.redis.clone()),
        ));
    }
    apis.push(Arc::new(
        HealthApi::new(redis, args.redis.timeout(), metrics.registry.clone())
            .with_redis_metrics(metrics.redis.clone()),
    ));

    let listener = http::bind(&args.listen).await?;
    let shutdown = http::shutdown_on_signal();
    http::serve(
        listener,
        apis,
        ServerLimits {
            drain_timeout: Duration::from_secs(args.drain_timeout_secs),
            metrics: Some(metrics.http),
            ..ServerLimits::default()
        },
        shutdown,
    )
    .await?;
    tracing::info!("command role stopped");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grab_paths_are_recognised_and_others_left_alone() {
        assert_eq!(
            grab_target("/api/v1/promotions/shop/sale/grab"),
            Some(("shop/sale", "shop", "sale"))
        );
        assert_eq!(grab_target("/api/v1/promotions/shop/grab"), None);
        assert_eq!(grab_target("/api/v1/promotions/a/b/c/grab"), None);
        assert_eq!(grab_target("/api/v1/promotions/shop/sale"), None);
    }

    #[test]
    fn unknown_promotions_are_remembered_for_a_second_only_and_finished_ones_for_good() {
        let m = PromotionMemory::default();
        m.unknown("a/b");
        assert!(matches!(m.get("a/b"), Some(Known::Unknown { .. })));
        {
            let mut k = m.known.write().unwrap();
            k.insert(
                "a/b".into(),
                Known::Unknown {
                    until: Instant::now(),
                },
            );
        }
        assert!(m.get("a/b").is_none());
        m.finished("c/d", FinishReason::SoldOut);
        assert!(matches!(
            m.get("c/d"),
            Some(Known::Finished(FinishReason::SoldOut))
        ));
        m.forget("c/d");
        assert!(m.get("c/d").is_some(), "a final state is never forgotten");
    }

    #[test]
    fn remembered_unknown_promotions_are_bounded() {
        let m = PromotionMemory::default();
        for i in 0..MAX_REMEMBERED_UNKNOWN + 50 {
            m.unknown(&format!("ns/p{i}"));
        }
        assert!(m.known.read().unwrap().len() <= MAX_REMEMBERED_UNKNOWN);
    }
}
