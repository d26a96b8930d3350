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
//! out or finished (final states: they never reopen) and answers a prepared
//! 410 without Redis and without reading the body, and remembers unknown promotions for one second, which absorbs
//! typos and scans without hiding a promotion created a moment later.
//! "Not started" is never remembered: only Redis' clock may open a sale.
//!
//! Optional, off by default: a rate limit per client (429 before any Redis
//! call) and durable grabs (`--durable-replicas`: a grant is answered 200
//! only once replicas hold it, else 503 "maybe recorded, retry").

use std::borrow::Cow;
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::future::BoxFuture;
use http_body_util::Full;
use hyper::header::{HeaderName, HeaderValue, CONTENT_TYPE};
use hyper::{HeaderMap, Method, Response, StatusCode};
use serde::{Deserialize, Serialize};

use crate::http::{
    self, json_response, Api, ApiError, ApiRequest, HeadAnswer, HealthApi, HttpResponse, Outcome,
    RequestHead, ServerLimitArgs,
};
use crate::metrics::{CommandMetrics, RedisMetrics, WorkerMetrics};
use crate::protocol::{
    self, Coupon, CustomerId, Durability, DurableGrabError, FinishReason, GrabOutcome, PromotionId,
    ScriptError,
};
use crate::query::{QueryApi, QueryOptions};
use crate::rate_limit::{self, RateLimitArgs, RateLimitKey, RateLimiter};
use crate::redis_connection::{RedisArgs, RedisConnection, RedisSetupError};

/// The route of the grab endpoint, as an OpenAPI path template.
pub const GRAB_ROUTE: &str = "/api/v1/promotions/{namespace}/{name}/grab";

const PATH_PREFIX: &str = "/api/v1/promotions/";
const PATH_SUFFIX: &str = "/grab";

const JSON: HeaderValue = HeaderValue::from_static("application/json");

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

    #[command(flatten)]
    pub durable: DurableGrabArgs,

    #[command(flatten)]
    pub rate_limit: RateLimitArgs,

    #[command(flatten)]
    pub limits: ServerLimitArgs,
}

/// Flags of durable grabs on replicated Redis (see `protocol::grab_durable`).
#[derive(clap::Args, Debug, Clone)]
pub struct DurableGrabArgs {
    /// Answer a grant 200 only once this many replicas of the promotion's
    /// master hold it (Redis WAIT); a grant not confirmed in time is answered
    /// 503 and its retry returns the same coupon. 0 = plain grab.
    #[arg(long, env = "SECKILL_DURABLE_REPLICAS", default_value_t = 0)]
    pub durable_replicas: u32,

    /// Longest wait for those replicas, in milliseconds; must be below
    /// --redis-timeout-ms.
    #[arg(long, env = "SECKILL_DURABLE_TIMEOUT_MS", default_value_t = 200)]
    pub durable_timeout_ms: u64,
}

impl Default for DurableGrabArgs {
    fn default() -> Self {
        Self {
            durable_replicas: 0,
            durable_timeout_ms: 200,
        }
    }
}

impl DurableGrabArgs {
    /// The durability asked for, `None` for plain grabs. Refused when the
    /// replica wait does not fit in the Redis timeout: the pipeline would be
    /// abandoned before `WAIT` answers, turning every grab into a 503.
    pub fn durability(&self, redis_timeout: Duration) -> Result<Option<Durability>, CommandError> {
        if self.durable_replicas == 0 {
            return Ok(None);
        }
        let timeout = Duration::from_millis(self.durable_timeout_ms.max(1));
        if timeout >= redis_timeout {
            return Err(CommandError::DurableTimeout {
                durable_ms: self.durable_timeout_ms,
                redis_ms: redis_timeout.as_millis() as u64,
            });
        }
        Ok(Some(Durability {
            replicas: self.durable_replicas,
            timeout,
        }))
    }
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
    #[error(
        "--durable-timeout-ms {durable_ms} must be below --redis-timeout-ms {redis_ms}: \
         the replica wait has to fit in the Redis response timeout"
    )]
    DurableTimeout { durable_ms: u64, redis_ms: u64 },
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
#[derive(Debug, Clone)]
enum Known {
    /// Final: a promotion never reopens. `answer` is the 410 body, built
    /// once, so that answering it costs no serialization.
    Finished { reason: FinishReason, answer: Bytes },
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
            other => other.cloned(),
        }
    }

    /// Remembers `id` as over and returns its 410 body.
    fn finished(&self, id: &str, reason: FinishReason) -> Bytes {
        let mut known = self.known.write().unwrap_or_else(|e| e.into_inner());
        if let Some(Known::Finished { answer, .. }) = known.get(id) {
            return answer.clone();
        }
        let answer = closed_body(id, reason);
        known.insert(
            id.into(),
            Known::Finished {
                reason,
                answer: answer.clone(),
            },
        );
        answer
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

/// The rate limiter of the grab path and how it tells clients apart.
struct GrabRateLimit {
    limiter: RateLimiter,
    key: RateLimitKey,
    trust_forwarded_for: bool,
}

/// The grab endpoint, mountable on any [`http::serve`] (the command role,
/// `seckill up`).
pub struct CommandApi {
    redis: RedisConnection,
    options: CommandOptions,
    memory: PromotionMemory,
    rate_limit: Option<GrabRateLimit>,
    durability: Option<Durability>,
    metrics: Option<CommandMetrics>,
}

/// The JSON body of a grab.
#[derive(Deserialize)]
struct GrabBody<'a> {
    #[serde(rename = "customerId", borrow, default)]
    customer_id: Option<Cow<'a, str>>,
}

/// A grab request, validated: what the grab script is called with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GrabRequest {
    pub promotion: PromotionId,
    pub customer: CustomerId,
}

/// The promotion a grab path names, borrowed from the path and not validated
/// yet: `id` is `namespace/name`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GrabTarget<'a> {
    pub id: &'a str,
    pub namespace: &'a str,
    pub name: &'a str,
}

impl GrabTarget<'_> {
    /// The validated promotion id; 400 `invalid_request` otherwise.
    pub fn promotion(&self) -> Result<PromotionId, ApiError> {
        PromotionId::new(self.namespace, self.name).map_err(|e| ApiError::invalid_request(e.0))
    }
}

/// The target of a grab path, or `None` when `path` is another route.
pub fn grab_target(path: &str) -> Option<GrabTarget<'_>> {
    let id = path.strip_prefix(PATH_PREFIX)?.strip_suffix(PATH_SUFFIX)?;
    // Byte scans rather than `split_once` / `contains`: this runs on every
    // grab, sold-out ones included, and the ids are short.
    let slash = id.bytes().position(|b| b == b'/')?;
    let (namespace, name) = (&id[..slash], &id[slash + 1..]);
    if namespace.is_empty() || name.is_empty() || name.bytes().any(|b| b == b'/') {
        return None;
    }
    Some(GrabTarget {
        id,
        namespace,
        name,
    })
}

/// Is the `Content-Type` JSON (parameters such as `charset` allowed)?
fn is_json(headers: &HeaderMap) -> bool {
    headers
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

/// The customer of a grab: from the `customer_id_header` only when one is
/// configured (the body is then ignored), else from the JSON body
/// `{"customerId": "..."}`. Every refusal is a 400 or 415 in the envelope.
pub fn grab_customer(
    headers: &HeaderMap,
    body: &[u8],
    customer_id_header: Option<&HeaderName>,
) -> Result<CustomerId, ApiError> {
    if let Some(header) = customer_id_header {
        let value = headers.get(header).ok_or_else(|| {
            ApiError::invalid_request(format!("the {header} header (customer id) is required"))
        })?;
        let text = value.to_str().map_err(|_| {
            ApiError::invalid_request(format!("the {header} header is not visible ASCII"))
        })?;
        return CustomerId::parse(text).map_err(|e| ApiError::invalid_request(e.0));
    }
    if !is_json(headers) {
        return Err(ApiError::unsupported_media_type(
            "the request body must be JSON (Content-Type: application/json)",
        ));
    }
    let body: GrabBody<'_> = serde_json::from_slice(body).map_err(|e| {
        ApiError::invalid_request(format!(
            r#"the body must be a JSON object {{"customerId": "..."}}: {e}"#
        ))
    })?;
    let id = body
        .customer_id
        .ok_or_else(|| ApiError::invalid_request("customerId is required"))?;
    CustomerId::parse(&id).map_err(|e| ApiError::invalid_request(e.0))
}

/// Parses a grab request: the promotion from `path`, the customer from the
/// header or the body. Pure (no I/O, no state), so it can be property-tested
/// and fuzzed; a path that is not the grab route is 404 `not_found`.
pub fn parse_grab(
    path: &str,
    headers: &HeaderMap,
    body: &[u8],
    customer_id_header: Option<&HeaderName>,
) -> Result<GrabRequest, ApiError> {
    let target =
        grab_target(path).ok_or_else(|| ApiError::not_found(format!("no route for {path}")))?;
    let promotion = target.promotion()?;
    let customer = grab_customer(headers, body, customer_id_header)?;
    Ok(GrabRequest {
        promotion,
        customer,
    })
}

/// The address a client is limited by: the peer's, or with
/// `trust_forwarded_for` the first `X-Forwarded-For` address when it is one.
fn client_ip(headers: &HeaderMap, peer: SocketAddr, trust_forwarded_for: bool) -> IpAddr {
    if trust_forwarded_for {
        let forwarded = headers
            .get("x-forwarded-for")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(',').next())
            .and_then(|first| first.trim().parse::<IpAddr>().ok());
        if let Some(ip) = forwarded {
            return ip;
        }
    }
    peer.ip()
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

/// The `error` code of a 410 for `reason`.
fn closed_code(reason: FinishReason) -> &'static str {
    match reason {
        FinishReason::SoldOut => "sold_out",
        FinishReason::Expired | FinishReason::Deleted => "finished",
    }
}

/// The body of the 410 of promotion `id`: the same for every customer, so
/// it is serialized once per promotion and then only shared.
fn closed_body(id: &str, reason: FinishReason) -> Bytes {
    let what = match reason {
        FinishReason::SoldOut => "is sold out",
        FinishReason::Expired => "has ended",
        FinishReason::Deleted => "was withdrawn",
    };
    ApiError::new(
        StatusCode::GONE,
        closed_code(reason),
        format!(
            "promotion {id} {what}; coupons you already hold are listed under GET /api/v1/customers/{{customerId}}/coupons"
        ),
    )
    .envelope()
}

/// 410 with a prepared body, its outcome set.
fn closed(reason: FinishReason, body: Bytes) -> HttpResponse {
    let mut response = closed_response(body);
    response
        .extensions_mut()
        .insert(Outcome(closed_code(reason)));
    response
}

/// 410 with a prepared body, without the outcome extension (see
/// [`HeadAnswer`]).
fn closed_response(body: Bytes) -> HttpResponse {
    let mut response = Response::new(Full::new(body));
    *response.status_mut() = StatusCode::GONE;
    response.headers_mut().insert(CONTENT_TYPE, JSON);
    response
}

fn unknown(id: &str) -> HttpResponse {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "unknown_promotion",
        format!("promotion {id} does not exist"),
    )
    .into_response()
}

impl CommandApi {
    pub fn new(redis: RedisConnection, options: CommandOptions) -> Self {
        Self {
            redis,
            options,
            memory: PromotionMemory::default(),
            rate_limit: None,
            durability: None,
            metrics: None,
        }
    }

    /// Limits grabs per client as `args` say (nothing when they turn it off):
    /// a client over its rate is answered 429 with `Retry-After` before any
    /// Redis call.
    pub fn with_rate_limit(mut self, args: &RateLimitArgs) -> Self {
        self.rate_limit = RateLimiter::from_args(args).map(|limiter| GrabRateLimit {
            limiter,
            key: args.rate_limit_key,
            trust_forwarded_for: args.trust_forwarded_for,
        });
        self
    }

    /// Answers grants 200 only once `durability` replicas hold them
    /// (`protocol::grab_durable`); `None` keeps the plain grab.
    pub fn with_durability(mut self, durability: Option<Durability>) -> Self {
        self.durability = durability;
        self
    }

    /// Counts rate-limited and unreplicated grabs.
    pub fn with_metrics(mut self, metrics: CommandMetrics) -> Self {
        self.metrics = Some(metrics);
        self
    }

    /// 429 when `client` is over its rate.
    fn limit(&self, limit: &GrabRateLimit, client: &str) -> Result<(), ApiError> {
        limit.limiter.check(client).map_err(|wait| {
            if let Some(m) = &self.metrics {
                m.rate_limited(limit.key.as_str());
            }
            ApiError::rate_limited(rate_limit::retry_after_secs(wait))
        })
    }

    /// 429 when the rate limit is by IP and this client is over its rate.
    fn limit_ip(&self, headers: &HeaderMap, peer: SocketAddr) -> Result<(), ApiError> {
        match &self.rate_limit {
            Some(limit) if limit.key == RateLimitKey::Ip => {
                let ip = client_ip(headers, peer, limit.trust_forwarded_for).to_string();
                self.limit(limit, &ip)
            }
            _ => Ok(()),
        }
    }

    /// The 410 of a grab of a promotion this worker knows is over, answered
    /// from the head: the same for every customer, so the body is not read
    /// (this is most of the load after a sale). `None` for anything else,
    /// and when the rate limit is by customer (it needs the body's
    /// customer id): [`CommandApi::grab`] answers those. The IP rate limit
    /// applies first, exactly as in [`CommandApi::grab`].
    fn answer_closed(&self, head: &RequestHead<'_>) -> Option<HeadAnswer> {
        if *head.method != Method::POST {
            return None;
        }
        if self
            .rate_limit
            .as_ref()
            .is_some_and(|l| l.key == RateLimitKey::Customer)
        {
            return None;
        }
        let target = grab_target(head.path)?;
        let Some(Known::Finished { reason, answer }) = self.memory.get(target.id) else {
            return None;
        };
        if let Err(e) = self.limit_ip(head.headers, head.peer) {
            return Some(HeadAnswer {
                outcome: e.code,
                response: e.into_response(),
            });
        }
        Some(HeadAnswer {
            response: closed_response(answer),
            outcome: closed_code(reason),
        })
    }

    /// The customer of `req`, then the rate limit when it is by customer.
    fn limited_customer(&self, req: &ApiRequest) -> Result<CustomerId, ApiError> {
        let customer = grab_customer(
            &req.headers,
            &req.body,
            self.options.customer_id_header.as_ref(),
        )?;
        if let Some(limit) = &self.rate_limit {
            if limit.key == RateLimitKey::Customer {
                self.limit(limit, customer.as_str())?;
            }
        }
        Ok(customer)
    }

    fn redis_failed(&self, kind: &'static str, id: &str, detail: String) -> HttpResponse {
        if let Some(m) = &self.options.redis_metrics {
            m.error("grab", kind);
        }
        // One line per failed request would flood the log during an outage;
        // the redis_errors metric and /readyz tell the story at warn level.
        tracing::debug!(promotion = id, kind, error = %detail, "grab failed on Redis");
        ApiError::unavailable(
            "the coupon store did not answer in time, so whether this grab was recorded is \
             unknown; retry in a moment: a retry is safe and answers your coupon if you got one",
        )
        .into_response()
    }

    /// Handles a grab of `target`. Rate limiting comes first (by IP before
    /// anything is parsed, by customer right after the customer id is), then
    /// what this worker remembers, then one Redis round trip.
    pub async fn grab(&self, req: &ApiRequest, target: GrabTarget<'_>) -> HttpResponse {
        let id = target.id;
        if let Err(e) = self.limit_ip(&req.headers, req.peer) {
            return e.into_response();
        }
        // Only valid ids are ever remembered, so the memory is asked with the
        // raw path segment first: an answer from memory builds no id.
        if let Some(known) = self.memory.get(id) {
            // A promotion that is over answers the same 410 to everyone: the
            // body is not even read (this is most of the load after a sale),
            // unless the rate limit needs the customer id.
            let by_customer = self
                .rate_limit
                .as_ref()
                .is_some_and(|l| l.key == RateLimitKey::Customer);
            if let (Known::Finished { reason, answer }, false) = (&known, by_customer) {
                return closed(*reason, answer.clone());
            }
            if let Err(e) = self.limited_customer(req) {
                return e.into_response();
            }
            return match known {
                Known::Finished { reason, answer } => closed(reason, answer),
                Known::Unknown { .. } => unknown(id),
            };
        }
        let promotion = match target.promotion() {
            Ok(p) => p,
            Err(e) => return e.into_response(),
        };
        let customer = match self.limited_customer(req) {
            Ok(c) => c,
            Err(e) => return e.into_response(),
        };
        let mut con = self.redis.clone();
        let call = async {
            match self.durability {
                None => protocol::grab(&mut con, &promotion, &customer)
                    .await
                    .map_err(DurableGrabError::from),
                Some(durability) => {
                    protocol::grab_durable(&mut con, &promotion, &customer, durability).await
                }
            }
        };
        let outcome = match tokio::time::timeout(self.options.redis_timeout, call).await {
            Err(_) => {
                return self.redis_failed(
                    "timeout",
                    id,
                    format!("no answer within {:?}", self.options.redis_timeout),
                )
            }
            Ok(Err(DurableGrabError::Script(ScriptError::Redis(e)))) => {
                let kind = if e.is_timeout() {
                    "timeout"
                } else {
                    "connection"
                };
                return self.redis_failed(kind, id, e.to_string());
            }
            Ok(Err(DurableGrabError::Script(e @ ScriptError::BadReply(_)))) => {
                if let Some(m) = &self.options.redis_metrics {
                    m.error("grab", "reply");
                }
                tracing::error!(promotion = id, error = %e, "grab script answered unexpectedly");
                return ApiError::internal(
                    "the coupon store answered unexpectedly, so whether this grab was recorded is \
                     unknown; a retry is safe and answers your coupon if you got one",
                )
                .into_response();
            }
            Ok(Err(e @ DurableGrabError::NotReplicated { .. })) => {
                return self.not_replicated(id, &e);
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
                let answer = self.memory.finished(id, FinishReason::SoldOut);
                closed(FinishReason::SoldOut, answer)
            }
            GrabOutcome::Finished { reason } => {
                let answer = self.memory.finished(id, reason);
                closed(reason, answer)
            }
        }
    }

    /// 503 for a grant the master holds but too few replicas confirmed: it
    /// may be lost in a failover, so it is not promised; the retry finds it
    /// (same coupon) or, if a failover lost it, grabs again.
    fn not_replicated(&self, id: &str, e: &DurableGrabError) -> HttpResponse {
        if let Some(m) = &self.metrics {
            m.not_replicated();
        }
        tracing::debug!(promotion = id, error = %e, "grant not confirmed by the replicas");
        let mut response = ApiError::unavailable(
            "the grab may have been recorded but is not yet confirmed by the coupon store's \
             replicas; retry in a moment: a retry returns the same coupon if it was recorded, \
             and never a second one",
        )
        .into_response();
        response.extensions_mut().insert(Outcome("not_replicated"));
        response
    }
}

impl Api for CommandApi {
    fn handle<'a>(&'a self, req: &'a ApiRequest) -> BoxFuture<'a, Option<HttpResponse>> {
        Box::pin(async move {
            if req.method != Method::POST {
                return None;
            }
            let target = grab_target(&req.path)?;
            Some(self.grab(req, target).await)
        })
    }

    fn answer_head(&self, head: &RequestHead<'_>) -> Option<HeadAnswer> {
        self.answer_closed(head)
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

    let durability = args.durable.durability(args.redis.timeout())?;
    if let Some(d) = durability {
        tracing::info!(replicas = d.replicas, timeout = ?d.timeout, "durable grabs: a grant is answered only once replicas hold it");
    }
    let command = CommandApi::new(
        redis.clone(),
        CommandOptions {
            customer_id_header: customer_id_header.clone(),
            redis_timeout: args.redis.timeout(),
            redis_metrics: Some(metrics.redis.clone()),
        },
    )
    .with_rate_limit(&args.rate_limit)
    .with_durability(durability)
    .with_metrics(CommandMetrics::register(&metrics.registry));
    let mut apis: Vec<Arc<dyn Api>> = vec![Arc::new(command)];
    if !args.no_query {
        let options = QueryOptions {
            customer_id_header,
            redis_timeout: args.redis.timeout(),
        };
        let read_models = args.redis.connect_read_models()?;
        apis.push(Arc::new(
            QueryApi::new(read_models, options).with_redis_metrics(metrics.redis.clone()),
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
        args.limits.limits(
            Duration::from_secs(args.drain_timeout_secs),
            Some(metrics.http),
        ),
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
            Some(GrabTarget {
                id: "shop/sale",
                namespace: "shop",
                name: "sale"
            })
        );
        assert_eq!(grab_target("/api/v1/promotions//sale/grab"), None);
        assert_eq!(grab_target("/api/v1/promotions/shop//grab"), None);
        assert_eq!(grab_target("/api/v1/promotions/shop/grab"), None);
        assert_eq!(grab_target("/api/v1/promotions/a/b/c/grab"), None);
        assert_eq!(grab_target("/api/v1/promotions/shop/sale"), None);
    }

    fn json_headers() -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(CONTENT_TYPE, "application/json".parse().unwrap());
        headers
    }

    fn path_of(ns: &str, name: &str) -> String {
        format!("{PATH_PREFIX}{ns}/{name}{PATH_SUFFIX}")
    }

    #[test]
    fn the_parser_takes_the_customer_from_the_header_only_when_one_is_configured() {
        let header = HeaderName::from_static("x-customer-id");
        let mut headers = HeaderMap::new();
        headers.insert(&header, "alice".parse().unwrap());
        let parsed = parse_grab(
            &path_of("shop", "sale"),
            &headers,
            b"garbage",
            Some(&header),
        );
        assert_eq!(parsed.unwrap().customer.as_str(), "alice");
        let missing = parse_grab(
            &path_of("shop", "sale"),
            &json_headers(),
            br#"{"customerId":"bob"}"#,
            Some(&header),
        );
        assert_eq!(missing.unwrap_err().code, "invalid_request");
        let other_route = parse_grab("/api/v1/promotions", &json_headers(), b"{}", None);
        assert_eq!(other_route.unwrap_err().code, "not_found");
    }

    proptest::proptest! {
        /// Whatever arrives, the parser answers (no panic), refuses with a
        /// client error in the envelope, or yields ids that pass validation.
        #[test]
        fn arbitrary_requests_never_panic_and_never_yield_an_invalid_id(
            path_tail in proptest::collection::vec(proptest::num::u8::ANY, 0..80),
            body in proptest::collection::vec(proptest::num::u8::ANY, 0..200),
            content_type in proptest::collection::vec(proptest::num::u8::ANY, 0..40),
            with_suffix in proptest::bool::ANY,
        ) {
            let tail = String::from_utf8_lossy(&path_tail);
            let path = if with_suffix {
                format!("{PATH_PREFIX}{tail}{PATH_SUFFIX}")
            } else {
                format!("{PATH_PREFIX}{tail}")
            };
            let mut headers = HeaderMap::new();
            if let Ok(v) = hyper::header::HeaderValue::from_bytes(&content_type) {
                headers.insert(CONTENT_TYPE, v);
            }
            match parse_grab(&path, &headers, &body, None) {
                Ok(req) => {
                    proptest::prop_assert!(CustomerId::parse(req.customer.as_str()).is_ok());
                    let again = PromotionId::new(req.promotion.namespace(), req.promotion.name());
                    proptest::prop_assert_eq!(again.as_ref(), Ok(&req.promotion));
                    let text = req.promotion.to_string();
                    proptest::prop_assert_eq!(Some(text.as_str()), grab_target(&path).map(|t| t.id));
                }
                Err(e) => {
                    proptest::prop_assert!(e.status.is_client_error(), "{:?}", e);
                    proptest::prop_assert!(!e.message.is_empty());
                    proptest::prop_assert!(matches!(
                        e.code,
                        "invalid_request" | "unsupported_media_type" | "not_found"
                    ), "{:?}", e);
                }
            }
        }

        /// Valid promotion ids and customer ids come back out unchanged.
        #[test]
        fn valid_requests_round_trip(
            ns in "[a-z0-9]([a-z0-9-]{0,20}[a-z0-9])?",
            name in "[a-z0-9]([a-z0-9-]{0,10}[a-z0-9])?(\\.[a-z0-9]([a-z0-9-]{0,10}[a-z0-9])?){0,3}",
            customer in "[A-Za-z0-9._:@-]{1,64}",
            charset in proptest::option::of("; ?charset=(utf-8|UTF-8)"),
        ) {
            let mut headers = HeaderMap::new();
            let ct = format!("Application/JSON{}", charset.unwrap_or_default());
            headers.insert(CONTENT_TYPE, ct.parse().unwrap());
            let body = serde_json::to_vec(&serde_json::json!({ "customerId": customer })).unwrap();
            let req = parse_grab(&path_of(&ns, &name), &headers, &body, None).unwrap();
            proptest::prop_assert_eq!(req.promotion.namespace(), ns.as_str());
            proptest::prop_assert_eq!(req.promotion.name(), name.as_str());
            proptest::prop_assert_eq!(req.customer.as_str(), customer.as_str());
        }

        /// Any string as customerId is accepted exactly when `CustomerId::parse`
        /// accepts it, whatever JSON escaping it needed.
        #[test]
        fn the_body_customer_is_accepted_exactly_when_the_id_is_valid(customer in "\\PC{0,70}|[\\x00-\\x7f]{0,70}") {
            let body = serde_json::to_vec(&serde_json::json!({ "customerId": customer })).unwrap();
            let parsed = parse_grab(&path_of("shop", "sale"), &json_headers(), &body, None);
            match CustomerId::parse(&customer) {
                Ok(id) => proptest::prop_assert_eq!(parsed.unwrap().customer, id),
                Err(_) => proptest::prop_assert_eq!(parsed.unwrap_err().code, "invalid_request"),
            }
        }

        /// Only `application/json` (any case, any parameters) is taken as JSON;
        /// anything else is 415 whatever the body.
        #[test]
        fn only_json_content_types_are_read(content_type in "[ -~]{0,40}") {
            let mut headers = HeaderMap::new();
            headers.insert(CONTENT_TYPE, hyper::header::HeaderValue::from_str(&content_type).unwrap());
            let parsed = parse_grab(&path_of("shop", "sale"), &headers, br#"{"customerId":"bob"}"#, None);
            let main = content_type.split(';').next().unwrap_or_default().trim();
            if main.eq_ignore_ascii_case("application/json") {
                proptest::prop_assert!(parsed.is_ok(), "{:?}", parsed);
            } else {
                proptest::prop_assert_eq!(parsed.unwrap_err().code, "unsupported_media_type");
            }
        }
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
        let answer = m.finished("c/d", FinishReason::Expired);
        assert!(std::str::from_utf8(&answer)
            .unwrap()
            .starts_with(r#"{"error":"sold_out","message":"promotion c/d is sold out;"#));
        assert!(matches!(
            m.get("c/d"),
            Some(Known::Finished {
                reason: FinishReason::SoldOut,
                ..
            })
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
