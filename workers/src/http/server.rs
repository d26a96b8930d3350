//! The HTTP layer every worker API is served by: the command endpoint, the
//! query endpoints, the probes and `/metrics`, alone or all together in
//! `seckill up`.
//!
//! An [`Api`] answers the routes it owns and nothing else; [`serve`] runs the
//! accept loop, reads and bounds the request body once, asks each API in
//! turn, answers 404/405 in the error envelope when none claims the request,
//! records metrics, and drains in-flight requests on shutdown. The limits
//! that keep a worker alive under abuse (slow headers, too many connections,
//! large bodies) are enforced here, before any handler runs.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::future::{BoxFuture, Either};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Body as _, Incoming};
use hyper::header::{HeaderValue, CONTENT_LENGTH, CONTENT_TYPE, RETRY_AFTER};
use hyper::{HeaderMap, Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use serde::Serialize;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::metrics::{HttpMetrics, MetricsRegistry, RedisMetrics, RouteMetrics};
use crate::redis_connection::RedisConnection;

/// Every response body is small and built in one piece.
pub type HttpResponse = Response<Full<Bytes>>;

/// Largest request body accepted; a larger one is answered 413.
pub const MAX_BODY_BYTES: usize = 4 * 1024;

const JSON: HeaderValue = HeaderValue::from_static("application/json");

/// A request as handlers see it: the head, the body already read (at most
/// [`MAX_BODY_BYTES`]) and the client address.
#[derive(Debug, Clone)]
pub struct ApiRequest {
    pub method: Method,
    pub path: String,
    pub query: Option<String>,
    pub headers: HeaderMap,
    pub body: Bytes,
    pub peer: SocketAddr,
}

/// What a request led to, for the `outcome` label of the request counter.
/// Set as a response extension by [`ApiError::into_response`] (the error
/// code) or by a handler (e.g. `granted`); `ok` / `error` otherwise.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outcome(pub &'static str);

/// An error answer: a status and the envelope `{"error": code, "message": text}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    /// Seconds for a `Retry-After` header, when retrying later may succeed.
    pub retry_after_secs: Option<u64>,
}

#[derive(Serialize)]
struct ErrorEnvelope<'a> {
    error: &'a str,
    message: &'a str,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            retry_after_secs: None,
        }
    }

    /// Adds a `Retry-After` header of `secs` seconds.
    pub fn retry_after(mut self, secs: u64) -> Self {
        self.retry_after_secs = Some(secs);
        self
    }

    /// 400 `invalid_request`.
    pub fn invalid_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request", message)
    }

    /// 404 `not_found`.
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", message)
    }

    /// 405 `method_not_allowed`.
    pub fn method_not_allowed(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            message,
        )
    }

    /// 413 `payload_too_large`.
    pub fn payload_too_large() -> Self {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            format!("the request body must be at most {MAX_BODY_BYTES} bytes"),
        )
    }

    /// 415 `unsupported_media_type`.
    pub fn unsupported_media_type(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            message,
        )
    }

    /// 503 `unavailable` with `Retry-After: 1`: a dependency (Redis) did not
    /// answer in time; nothing was promised, so retrying is safe.
    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", message).retry_after(1)
    }

    /// 429 `rate_limited` with `Retry-After`: this client sent more than its
    /// share; nothing was attempted.
    pub fn rate_limited(retry_after_secs: u64) -> Self {
        Self::new(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limited",
            format!(
                "too many requests from this client; nothing was attempted, retry in {retry_after_secs} s"
            ),
        )
        .retry_after(retry_after_secs.max(1))
    }

    /// 500 `internal_error`.
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "internal_error", message)
    }

    /// The envelope alone, serialized: for answers prepared once and then
    /// only shared (see the sold-out fast path of the command API).
    pub fn envelope(&self) -> Bytes {
        let envelope = ErrorEnvelope {
            error: self.code,
            message: &self.message,
        };
        match serde_json::to_vec(&envelope) {
            Ok(bytes) => Bytes::from(bytes),
            Err(e) => {
                tracing::error!(error = %e, "cannot serialize an error envelope");
                Bytes::from_static(
                    br#"{"error":"internal_error","message":"the response could not be encoded"}"#,
                )
            }
        }
    }

    pub fn into_response(self) -> HttpResponse {
        let mut response = json_response(
            self.status,
            &ErrorEnvelope {
                error: self.code,
                message: &self.message,
            },
        );
        if let Some(secs) = self.retry_after_secs {
            response
                .headers_mut()
                .insert(RETRY_AFTER, HeaderValue::from(secs));
        }
        response.extensions_mut().insert(Outcome(self.code));
        response
    }
}

/// A JSON response of `status` with `body` serialized.
pub fn json_response(status: StatusCode, body: &impl Serialize) -> HttpResponse {
    match serde_json::to_vec(body) {
        Ok(bytes) => {
            let mut response = Response::new(Full::new(Bytes::from(bytes)));
            *response.status_mut() = status;
            response.headers_mut().insert(CONTENT_TYPE, JSON);
            response
        }
        Err(e) => {
            tracing::error!(error = %e, "cannot serialize a response body");
            let mut response = Response::new(Full::new(Bytes::from_static(
                br#"{"error":"internal_error","message":"the response could not be encoded"}"#,
            )));
            *response.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
            response.headers_mut().insert(CONTENT_TYPE, JSON);
            response.extensions_mut().insert(Outcome("internal_error"));
            response
        }
    }
}

/// The head of a request, borrowed from it before its body is read: what
/// [`Api::answer_head`] decides on.
#[derive(Debug, Clone, Copy)]
pub struct RequestHead<'a> {
    pub method: &'a Method,
    pub path: &'a str,
    pub headers: &'a HeaderMap,
    pub peer: SocketAddr,
}

/// An answer given from the request head (see [`Api::answer_head`]), with
/// its `outcome` label beside it rather than as a response extension (an
/// extension costs three allocations, a large share of such an answer).
#[derive(Debug)]
pub struct HeadAnswer {
    pub response: HttpResponse,
    pub outcome: &'static str,
}

/// A set of endpoints. [`serve`] asks each API in turn; the first that
/// answers `Some` owns the request.
pub trait Api: Send + Sync + 'static {
    /// Answers `req` if it is one of this API's routes (any method: return
    /// `None` for a method the route does not take, the server answers 405).
    fn handle<'a>(&'a self, req: &'a ApiRequest) -> BoxFuture<'a, Option<HttpResponse>>;

    /// Answers from the head alone, before the body is read, when the answer
    /// cannot depend on the body (a sold-out promotion's 410). Asked of
    /// every API, in order, before [`Api::handle`], unless the declared body
    /// is over [`MAX_BODY_BYTES`] (that stays a 413). The cheapest answer
    /// the server gives: the body is never read (hyper discards it, or
    /// closes the connection when it has not fully arrived), no
    /// [`ApiRequest`] is built and no future is created. `None` (the
    /// default) lets the request go the usual way.
    fn answer_head(&self, _head: &RequestHead<'_>) -> Option<HeadAnswer> {
        None
    }

    /// The routes as OpenAPI path templates, e.g.
    /// `(POST, "/api/v1/promotions/{namespace}/{name}/grab")`.
    fn routes(&self) -> Vec<(Method, &'static str)>;
}

/// Does `path` fit `template`, where `{x}` stands for one non-empty segment?
pub fn route_matches(template: &str, path: &str) -> bool {
    let mut t = template.split('/');
    let mut p = path.split('/');
    loop {
        match (t.next(), p.next()) {
            (None, None) => return true,
            (Some(ts), Some(ps)) => {
                if is_parameter(ts) {
                    if ps.is_empty() {
                        return false;
                    }
                } else if ts != ps {
                    return false;
                }
            }
            _ => return false,
        }
    }
}

/// Is this template segment a parameter (`{name}`)?
fn is_parameter(segment: &str) -> bool {
    segment.len() >= 2 && segment.starts_with('{') && segment.ends_with('}')
}

/// A route template prepared for matching many paths: the same answers as
/// [`route_matches`], in a form that costs a few comparisons per request
/// (every request is matched, for the metrics' `route` label): the fixed
/// text between parameters, slashes included, is compared in one piece.
#[derive(Debug, Clone, PartialEq, Eq)]
struct RouteTemplate {
    pieces: Vec<RoutePiece>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum RoutePiece {
    /// Text the path must hold here, e.g. `/api/v1/promotions/`.
    Text(String),
    /// One non-empty segment: anything up to the next `/` or the end.
    Parameter,
}

impl RouteTemplate {
    fn new(template: &str) -> Self {
        let mut pieces = Vec::new();
        let mut text = String::new();
        for (i, segment) in template.split('/').enumerate() {
            if i > 0 {
                text.push('/');
            }
            if is_parameter(segment) {
                if !text.is_empty() {
                    pieces.push(RoutePiece::Text(std::mem::take(&mut text)));
                }
                pieces.push(RoutePiece::Parameter);
            } else {
                text.push_str(segment);
            }
        }
        if !text.is_empty() {
            pieces.push(RoutePiece::Text(text));
        }
        Self { pieces }
    }

    fn matches(&self, path: &str) -> bool {
        let mut rest = path.as_bytes();
        for piece in &self.pieces {
            match piece {
                RoutePiece::Text(text) => match rest.strip_prefix(text.as_bytes()) {
                    Some(after) => rest = after,
                    None => return false,
                },
                RoutePiece::Parameter => {
                    let end = rest.iter().position(|&b| b == b'/').unwrap_or(rest.len());
                    if end == 0 {
                        return false;
                    }
                    rest = &rest[end..];
                }
            }
        }
        rest.is_empty()
    }
}

/// Bounds that keep the server alive under load and abuse.
#[derive(Debug, Clone)]
pub struct ServerLimits {
    /// Connections served at once; a connection past it is closed at once.
    pub max_connections: usize,
    /// Time a client has to send a request head (and then its body); past
    /// it the connection is closed (slowloris).
    pub header_read_timeout: Duration,
    /// After shutdown is asked, in-flight requests get this long to finish.
    pub drain_timeout: Duration,
    /// Where request counts and latencies go; none recorded when `None`.
    pub metrics: Option<HttpMetrics>,
}

impl Default for ServerLimits {
    fn default() -> Self {
        Self {
            max_connections: 4096,
            header_read_timeout: Duration::from_secs(10),
            drain_timeout: Duration::from_secs(20),
            metrics: None,
        }
    }
}

/// Flags of the limits of [`ServerLimits`], shared by every role that serves
/// HTTP (`command`, `query`, `seckill up`).
#[derive(clap::Args, Debug, Clone)]
pub struct ServerLimitArgs {
    /// Connections served at once; a connection past it is closed at once.
    #[arg(long, env = "SECKILL_MAX_CONNECTIONS", default_value_t = 4096)]
    pub max_connections: usize,

    /// Milliseconds a client has to send its request head (and then its
    /// body); past it the connection is closed.
    #[arg(long, env = "SECKILL_HEADER_READ_TIMEOUT_MS", default_value_t = 10_000)]
    pub header_read_timeout_ms: u64,
}

impl Default for ServerLimitArgs {
    fn default() -> Self {
        Self {
            max_connections: 4096,
            header_read_timeout_ms: 10_000,
        }
    }
}

impl ServerLimitArgs {
    /// The limits these flags set, with the given drain timeout and metrics.
    pub fn limits(&self, drain_timeout: Duration, metrics: Option<HttpMetrics>) -> ServerLimits {
        ServerLimits {
            max_connections: self.max_connections.max(1),
            header_read_timeout: Duration::from_millis(self.header_read_timeout_ms.max(1)),
            drain_timeout,
            metrics,
        }
    }
}

/// The server could not run.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("cannot bind {address}: {source}")]
    Bind {
        address: String,
        source: std::io::Error,
    },
    #[error("listener: {0}")]
    Listener(#[source] std::io::Error),
}

/// The APIs and the route table, shared by every connection.
struct Router {
    apis: Vec<Arc<dyn Api>>,
    routes: Vec<(Method, &'static str)>,
    /// The distinct templates of `routes`, in order.
    templates: Vec<&'static str>,
    /// `templates` prepared for matching (same index).
    matchers: Vec<RouteTemplate>,
    /// Where requests are recorded: one [`RouteMetrics`] per template of
    /// `templates` (same index), then the one of `unmatched`.
    metrics: Option<Vec<RouteMetrics>>,
    limits: ServerLimits,
}

impl Router {
    fn new(apis: Vec<Arc<dyn Api>>, limits: ServerLimits) -> Self {
        let routes: Vec<(Method, &'static str)> = apis.iter().flat_map(|a| a.routes()).collect();
        let mut templates: Vec<&'static str> = Vec::new();
        for (_, t) in &routes {
            if !templates.contains(t) {
                templates.push(t);
            }
        }
        let metrics = limits.metrics.as_ref().map(|m| {
            templates
                .iter()
                .chain(std::iter::once(&"unmatched"))
                .map(|t| m.route(t))
                .collect()
        });
        Self {
            apis,
            routes,
            matchers: templates.iter().map(|t| RouteTemplate::new(t)).collect(),
            templates,
            metrics,
            limits,
        }
    }

    /// The index in `templates` of the template `path` matches, if any, for
    /// metrics and 404/405.
    fn template_of(&self, path: &str) -> Option<usize> {
        self.matchers.iter().position(|t| t.matches(path))
    }

    /// Answers a request the usual way: body read, then each API's
    /// [`Api::handle`] (after [`Router::answer_head`] gave nothing).
    async fn respond(&self, request: Request<Incoming>, peer: SocketAddr) -> HttpResponse {
        let started = Instant::now();
        let route = self.template_of(request.uri().path());
        let response = match self.read(request, peer).await {
            Ok(req) => self.dispatch(&req, route.map(|i| self.templates[i])).await,
            Err(e) => e.into_response(),
        };
        let status = response.status();
        let outcome = match response.extensions().get::<Outcome>() {
            Some(o) => o.0,
            None if status.is_success() => "ok",
            None => "error",
        };
        self.record(route, status, outcome, started);
        response
    }

    /// The first answer an API gives from the head alone (see
    /// [`Api::answer_head`]), recorded in the metrics; never for a declared
    /// body over the limit, which [`Router::read`] answers 413 as for every
    /// route. The body is dropped unread with the request.
    fn answer_head(&self, request: &Request<Incoming>, peer: SocketAddr) -> Option<HttpResponse> {
        let started = Instant::now();
        // The declared length as hyper parsed it (it has validated
        // `Content-Length`, and dropped it beside `Transfer-Encoding`): the
        // same test as in `read`, without a header lookup.
        if request.body().size_hint().lower() > MAX_BODY_BYTES as u64 {
            return None;
        }
        let head = RequestHead {
            method: request.method(),
            path: request.uri().path(),
            headers: request.headers(),
            peer,
        };
        let answer = self.apis.iter().find_map(|api| api.answer_head(&head))?;
        let route = self.template_of(head.path);
        self.record(route, answer.response.status(), answer.outcome, started);
        Some(answer.response)
    }

    /// Counts a request of template `route` (index in `templates`, `None`
    /// for `unmatched`) and the time since `started`.
    fn record(
        &self,
        route: Option<usize>,
        status: StatusCode,
        outcome: &'static str,
        started: Instant,
    ) {
        if let Some(metrics) = &self.metrics {
            // The last entry is `unmatched`.
            let index = route.unwrap_or(self.templates.len());
            if let Some(m) = metrics.get(index) {
                m.observe(status.as_u16(), outcome, started.elapsed());
            }
        }
    }

    /// Reads the body (bounded in size and time) into an [`ApiRequest`].
    async fn read(
        &self,
        request: Request<Incoming>,
        peer: SocketAddr,
    ) -> Result<ApiRequest, ApiError> {
        let (parts, body) = request.into_parts();
        let declared = declared_length(&parts.headers);
        if declared.is_some_and(|n| n > MAX_BODY_BYTES as u64) {
            return Err(ApiError::payload_too_large());
        }
        let body = if declared == Some(0) {
            Bytes::new()
        } else {
            let collect = Limited::new(body, MAX_BODY_BYTES).collect();
            match tokio::time::timeout(self.limits.header_read_timeout, collect).await {
                Err(_) => {
                    return Err(ApiError::new(
                        StatusCode::REQUEST_TIMEOUT,
                        "request_timeout",
                        "the request body was not received in time",
                    ))
                }
                Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => {
                    return Err(ApiError::payload_too_large())
                }
                Ok(Err(e)) => {
                    return Err(ApiError::invalid_request(format!(
                        "the request body could not be read: {e}"
                    )))
                }
                Ok(Ok(collected)) => collected.to_bytes(),
            }
        };
        Ok(ApiRequest {
            method: parts.method,
            path: parts.uri.path().to_owned(),
            query: parts.uri.query().map(str::to_owned),
            headers: parts.headers,
            body,
            peer,
        })
    }

    async fn dispatch(&self, req: &ApiRequest, route: Option<&'static str>) -> HttpResponse {
        for api in &self.apis {
            if let Some(response) = api.handle(req).await {
                return response;
            }
        }
        let allowed: Vec<&str> = self
            .routes
            .iter()
            .filter(|(_, t)| Some(*t) == route)
            .map(|(m, _)| m.as_str())
            .collect();
        if allowed.is_empty() {
            ApiError::not_found(format!("no route for {}", req.path)).into_response()
        } else {
            let allow = allowed.join(", ");
            let mut response = ApiError::method_not_allowed(format!(
                "{} does not take {}; allowed: {allow}",
                req.path, req.method
            ))
            .into_response();
            if let Ok(v) = HeaderValue::from_str(&allow) {
                response.headers_mut().insert(hyper::header::ALLOW, v);
            }
            response
        }
    }
}

/// The `Content-Length` of a request, when it declares a valid one.
fn declared_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
}

/// Serves `apis` on `listener` until `shutdown` is cancelled; then stops
/// accepting, lets in-flight requests finish (idle keep-alive connections
/// are closed at once) for at most `limits.drain_timeout`, and returns.
pub async fn serve(
    listener: TcpListener,
    apis: Vec<Arc<dyn Api>>,
    limits: ServerLimits,
    shutdown: CancellationToken,
) -> Result<(), HttpError> {
    let max_connections = limits.max_connections.clamp(1, Semaphore::MAX_PERMITS) as u32;
    let header_read_timeout = limits.header_read_timeout;
    let drain_timeout = limits.drain_timeout;
    let router = Arc::new(Router::new(apis, limits));
    let connections = Arc::new(Semaphore::new(max_connections as usize));
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(%addr, "serving HTTP");
    }

    loop {
        let (stream, peer) = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors and the like: back off a little
                    // rather than spin; the listener itself stays usable.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Ok(permit) = connections.clone().try_acquire_owned() else {
            tracing::warn!(%peer, max_connections, "connection limit reached; closing a new connection");
            drop(stream);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let router = router.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |request: Request<Incoming>| {
                // An answer from the head is ready at once: no future to
                // build, move and poll for the cheapest requests.
                if let Some(response) = router.answer_head(&request, peer) {
                    return Either::Left(std::future::ready(Ok::<_, Infallible>(response)));
                }
                let router = router.clone();
                // Boxed, so that the future hyper stores for every request
                // (this `Either`) stays small for the answers from the head;
                // one allocation is nothing beside a body read and a handler.
                Either::Right(Box::pin(async move {
                    Ok::<_, Infallible>(router.respond(request, peer).await)
                }))
            });
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(header_read_timeout)
                .keep_alive(true)
                // Responses are a few hundred bytes: copying the body
                // behind the head and sending one buffer costs less than a
                // vectored write of the two (measured on the sold-out path).
                .writev(false)
                .serve_connection(TokioIo::new(stream), service);
            tokio::pin!(connection);
            let result = tokio::select! {
                r = connection.as_mut() => r,
                _ = shutdown.cancelled() => {
                    connection.as_mut().graceful_shutdown();
                    connection.await
                }
            };
            if let Err(e) = result {
                tracing::debug!(%peer, error = %e, "connection ended with an error");
            }
            drop(permit);
        });
    }

    drop(listener);
    tracing::info!(
        ?drain_timeout,
        "stopped accepting; draining in-flight requests"
    );
    match tokio::time::timeout(drain_timeout, connections.acquire_many(max_connections)).await {
        Ok(_) => tracing::info!("drained"),
        Err(_) => tracing::warn!(
            open = max_connections as usize - connections.available_permits(),
            "drain timeout reached; dropping the connections still open"
        ),
    }
    Ok(())
}

/// Binds `address` (e.g. `0.0.0.0:8080`).
pub async fn bind(address: &str) -> Result<TcpListener, HttpError> {
    TcpListener::bind(address)
        .await
        .map_err(|source| HttpError::Bind {
            address: address.to_owned(),
            source,
        })
}

/// Resolves when SIGTERM or Ctrl-C arrives.
pub async fn termination_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => tracing::info!("SIGTERM received"),
                    _ = tokio::signal::ctrl_c() => tracing::info!("interrupt received"),
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGTERM; Ctrl-C only");
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// A token cancelled on SIGTERM or Ctrl-C: what every role's `run` hands to
/// [`serve`].
pub fn shutdown_on_signal() -> CancellationToken {
    let token = CancellationToken::new();
    let cancel = token.clone();
    tokio::spawn(async move {
        termination_signal().await;
        cancel.cancel();
    });
    token
}

/// `/healthz` (the process answers), `/readyz` (Redis answers PING within
/// the timeout) and `/metrics` (the OpenMetrics exposition).
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

    async fn ready(&self) -> HttpResponse {
        let mut con = self.redis.clone();
        let cmd = redis::cmd("PING");
        let ping = cmd.query_async::<String>(&mut con);
        let failure = match tokio::time::timeout(self.timeout, ping).await {
            Ok(Ok(_)) => return json_response(StatusCode::OK, &Status { status: "ready" }),
            Ok(Err(e)) => ("connection", format!("Redis did not answer PING: {e}")),
            Err(_) => (
                "timeout",
                format!("Redis did not answer PING within {:?}", self.timeout),
            ),
        };
        if let Some(m) = &self.redis_metrics {
            m.error("ping", failure.0);
        }
        ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", failure.1).into_response()
    }

    fn metrics(&self) -> HttpResponse {
        match self.registry.encode() {
            Ok(text) => {
                let mut response = Response::new(Full::new(Bytes::from(text)));
                response.headers_mut().insert(
                    CONTENT_TYPE,
                    HeaderValue::from_static(
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    ),
                );
                response
            }
            Err(e) => ApiError::internal(format!("cannot encode metrics: {e}")).into_response(),
        }
    }
}

impl Api for HealthApi {
    fn handle<'a>(&'a self, req: &'a ApiRequest) -> BoxFuture<'a, Option<HttpResponse>> {
        Box::pin(async move {
            if req.method != Method::GET {
                return None;
            }
            match req.path.as_str() {
                "/healthz" => Some(json_response(StatusCode::OK, &Status { status: "ok" })),
                "/readyz" => Some(self.ready().await),
                "/metrics" => Some(self.metrics()),
                _ => None,
            }
        })
    }

    fn routes(&self) -> Vec<(Method, &'static str)> {
        vec![
            (Method::GET, "/healthz"),
            (Method::GET, "/readyz"),
            (Method::GET, "/metrics"),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Answers `GET /hello` after `delay`.
    struct Hello {
        delay: Duration,
    }

    impl Api for Hello {
        fn handle<'a>(&'a self, req: &'a ApiRequest) -> BoxFuture<'a, Option<HttpResponse>> {
            Box::pin(async move {
                if req.method != Method::GET || req.path != "/hello" {
                    return None;
                }
                tokio::time::sleep(self.delay).await;
                Some(json_response(StatusCode::OK, &Status { status: "hello" }))
            })
        }

        /// `POST /gone/{id}` is answered from the head: 410, outcome `gone`.
        fn answer_head(&self, head: &RequestHead<'_>) -> Option<HeadAnswer> {
            if *head.method != Method::POST || !head.path.starts_with("/gone/") {
                return None;
            }
            let mut response = Response::new(Full::new(Bytes::from_static(b"{}")));
            *response.status_mut() = StatusCode::GONE;
            Some(HeadAnswer {
                response,
                outcome: "gone",
            })
        }

        fn routes(&self) -> Vec<(Method, &'static str)> {
            vec![(Method::GET, "/hello"), (Method::POST, "/gone/{id}")]
        }
    }

    async fn start(
        limits: ServerLimits,
        delay: Duration,
    ) -> (SocketAddr, CancellationToken, tokio::task::JoinHandle<()>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let token = CancellationToken::new();
        let apis: Vec<Arc<dyn Api>> = vec![Arc::new(Hello { delay })];
        let t = token.clone();
        let server = tokio::spawn(async move { serve(listener, apis, limits, t).await.unwrap() });
        (addr, token, server)
    }

    /// Sends raw bytes and reads until the server closes or `within` passes.
    async fn exchange(
        stream: &mut tokio::net::TcpStream,
        bytes: &[u8],
        within: Duration,
    ) -> String {
        stream.write_all(bytes).await.unwrap();
        let mut answer = Vec::new();
        let _ = tokio::time::timeout(within, stream.read_to_end(&mut answer)).await;
        String::from_utf8_lossy(&answer).into_owned()
    }

    #[tokio::test]
    async fn a_client_that_never_finishes_its_headers_is_disconnected() {
        let limits = ServerLimits {
            header_read_timeout: Duration::from_millis(200),
            ..ServerLimits::default()
        };
        let (addr, _token, _server) = start(limits, Duration::ZERO).await;
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        let started = Instant::now();
        stream
            .write_all(b"GET /hello HTTP/1.1\r\nHost: x\r\n")
            .await
            .unwrap();
        let mut buf = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(3), stream.read_to_end(&mut buf)).await;
        assert!(read.is_ok(), "connection still open after 3 s");
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "{:?}",
            started.elapsed()
        );
    }

    #[tokio::test]
    async fn connections_past_the_limit_are_closed_while_others_are_served() {
        let limits = ServerLimits {
            max_connections: 1,
            ..ServerLimits::default()
        };
        let (addr, _token, _server) = start(limits, Duration::ZERO).await;
        let mut first = tokio::net::TcpStream::connect(addr).await.unwrap();
        first
            .write_all(b"GET /hello HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let mut buf = [0u8; 512];
        let n = first.read(&mut buf).await.unwrap();
        assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
        // The first connection is kept alive and holds the only slot.
        let mut second = tokio::net::TcpStream::connect(addr).await.unwrap();
        let answer = exchange(
            &mut second,
            b"GET /hello HTTP/1.1\r\nHost: x\r\n\r\n",
            Duration::from_secs(2),
        )
        .await;
        assert!(answer.is_empty(), "served past the limit: {answer}");
    }

    #[tokio::test]
    async fn unknown_paths_and_methods_and_large_bodies_get_the_envelope() {
        let (addr, _token, _server) = start(ServerLimits::default(), Duration::ZERO).await;
        let ask = |raw: Vec<u8>| async move {
            let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
            exchange(&mut s, &raw, Duration::from_millis(500)).await
        };
        let nope =
            ask(b"GET /nope HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".to_vec()).await;
        assert!(nope.starts_with("HTTP/1.1 404"), "{nope}");
        assert!(nope.contains(r#"{"error":"not_found""#), "{nope}");
        let post = ask(
            b"POST /hello HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                .to_vec(),
        )
        .await;
        assert!(post.starts_with("HTTP/1.1 405"), "{post}");
        assert!(post.to_ascii_lowercase().contains("allow: get"), "{post}");
        let big = ask(format!(
            "GET /hello HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\nConnection: close\r\n\r\n{}",
            "x".repeat(5000)
        )
        .into_bytes())
        .await;
        assert!(big.starts_with("HTTP/1.1 413"), "{big}");
        assert!(big.contains(r#""error":"payload_too_large""#), "{big}");
        // Chunked, so the size is only known while reading.
        let chunked = ask(format!("GET /hello HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n1388\r\n{}\r\n0\r\n\r\n", "x".repeat(5000)).into_bytes()).await;
        assert!(chunked.starts_with("HTTP/1.1 413"), "{chunked}");
    }

    #[tokio::test]
    async fn shutdown_lets_the_in_flight_request_finish_then_returns() {
        let (addr, token, server) =
            start(ServerLimits::default(), Duration::from_millis(400)).await;
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        stream
            .write_all(b"GET /hello HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        token.cancel();
        let mut answer = Vec::new();
        tokio::time::timeout(Duration::from_secs(3), stream.read_to_end(&mut answer))
            .await
            .unwrap()
            .unwrap();
        assert!(String::from_utf8_lossy(&answer).starts_with("HTTP/1.1 200"));
        tokio::time::timeout(Duration::from_secs(3), server)
            .await
            .unwrap()
            .unwrap();
        assert!(tokio::net::TcpStream::connect(addr).await.is_err());
    }

    #[tokio::test]
    async fn answers_from_the_head_do_not_wait_for_the_body_and_are_counted_with_their_outcome() {
        let registry = MetricsRegistry::new();
        let limits = ServerLimits {
            metrics: Some(HttpMetrics::register(&registry)),
            ..ServerLimits::default()
        };
        let (addr, _token, _server) = start(limits, Duration::ZERO).await;
        // The body in the same packet: discarded, and the connection serves
        // the next request.
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        let answers = exchange(
            &mut stream,
            b"POST /gone/a HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n0123456789\
              GET /hello HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
            Duration::from_secs(2),
        )
        .await;
        assert!(answers.starts_with("HTTP/1.1 410"), "{answers}");
        assert!(answers.contains("HTTP/1.1 200"), "{answers}");
        // A declared body that never comes: the answer does not wait for it,
        // then the connection is closed (its body was never read).
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        let started = Instant::now();
        let answer = exchange(
            &mut stream,
            b"POST /gone/a HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n",
            Duration::from_secs(3),
        )
        .await;
        assert!(answer.starts_with("HTTP/1.1 410"), "{answer}");
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "{:?}",
            started.elapsed()
        );
        // A declared body over the limit is still 413, on every route.
        let mut big = tokio::net::TcpStream::connect(addr).await.unwrap();
        let answer = exchange(
            &mut big,
            b"POST /gone/a HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\nConnection: close\r\n\r\n",
            Duration::from_secs(2),
        )
        .await;
        assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
        let text = registry.encode().unwrap();
        let counted = |status: u16, outcome: &str, count: u32| {
            text.contains(&format!(
                "seckill_http_requests_total{{route=\"/gone/{{id}}\",status=\"{status}\",outcome=\"{outcome}\"}} {count}"
            ))
        };
        assert!(counted(410, "gone", 2), "{text}");
        assert!(counted(413, "payload_too_large", 1), "{text}");
    }

    #[tokio::test]
    async fn an_idle_keep_alive_connection_is_closed_once_the_header_timeout_passes_not_before() {
        let timeout = Duration::from_millis(400);
        let limits = ServerLimits {
            header_read_timeout: timeout,
            ..ServerLimits::default()
        };
        let (addr, _token, _server) = start(limits, Duration::ZERO).await;
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        let request = b"GET /hello HTTP/1.1\r\nHost: x\r\n\r\n";
        let mut buf = [0u8; 512];
        // Each request restarts the count: three heads, each 250 ms after
        // the previous answer, are all served on the same connection.
        for _ in 0..3 {
            stream.write_all(request).await.unwrap();
            let n = stream.read(&mut buf).await.unwrap();
            assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        stream.write_all(request).await.unwrap();
        let n = stream.read(&mut buf).await.unwrap();
        assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
        let idle_since = Instant::now();
        let mut rest = Vec::new();
        tokio::time::timeout(Duration::from_secs(3), stream.read_to_end(&mut rest))
            .await
            .expect("an idle connection outlived the header timeout")
            .unwrap();
        let idle = idle_since.elapsed();
        assert!(rest.is_empty(), "closed without an answer");
        // (The server starts counting as the answer leaves, a little before
        // the client has read it.)
        assert!(idle >= timeout - Duration::from_millis(20), "{idle:?}");
        assert!(idle < timeout * 2, "{idle:?}");
    }

    #[tokio::test]
    async fn shutdown_closes_idle_keep_alive_connections_at_once() {
        let (addr, token, server) = start(ServerLimits::default(), Duration::ZERO).await;
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        stream
            .write_all(b"GET /hello HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let mut buf = [0u8; 512];
        let n = stream.read(&mut buf).await.unwrap();
        assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
        token.cancel();
        let mut rest = Vec::new();
        tokio::time::timeout(Duration::from_secs(1), stream.read_to_end(&mut rest))
            .await
            .expect("the idle connection stayed open after shutdown")
            .unwrap();
        tokio::time::timeout(Duration::from_secs(2), server)
            .await
            .unwrap()
            .unwrap();
    }

    proptest::proptest! {
        /// The prepared templates the router matches with answer exactly as
        /// `route_matches` does.
        #[test]
        fn prepared_templates_match_exactly_what_route_matches_does(
            template in proptest::collection::vec(
                proptest::sample::select(vec!["/", "a", "b", "ab", "{x}", "{", "}", "{}"]), 0..8),
            path in proptest::collection::vec(
                proptest::sample::select(vec!["/", "a", "b", "ab", "{x}", "{", "}"]), 0..8),
        ) {
            let (template, path) = (template.concat(), path.concat());
            proptest::prop_assert_eq!(
                RouteTemplate::new(&template).matches(&path),
                route_matches(&template, &path),
                "template {:?}, path {:?}", template, path
            );
        }
    }

    #[test]
    fn templates_match_one_segment_per_parameter() {
        let t = "/api/v1/promotions/{namespace}/{name}/grab";
        assert!(route_matches(t, "/api/v1/promotions/shop/sale/grab"));
        assert!(!route_matches(t, "/api/v1/promotions/shop/grab"));
        assert!(!route_matches(t, "/api/v1/promotions//sale/grab"));
        assert!(!route_matches(t, "/api/v1/promotions/shop/sale/grab/x"));
        assert!(route_matches("/healthz", "/healthz"));
        assert!(!route_matches("/healthz", "/healthz/"));
        let prepared = RouteTemplate::new(t);
        assert!(prepared.matches("/api/v1/promotions/shop/sale/grab"));
        assert!(!prepared.matches("/api/v1/promotions/shop/grab"));
        assert!(!prepared.matches("/api/v1/promotions//sale/grab"));
        assert!(!prepared.matches("/api/v1/promotions/shop/sale/grab/x"));
    }

    #[test]
    fn errors_answer_the_envelope_with_retry_after_when_set() {
        let r = ApiError::unavailable("redis down").into_response();
        assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(r.headers()[RETRY_AFTER], "1");
        assert_eq!(r.headers()[CONTENT_TYPE], "application/json");
        assert_eq!(
            r.extensions().get::<Outcome>(),
            Some(&Outcome("unavailable"))
        );
    }
}
