//! The layers every endpoint is served in ([`Layers::around`]), outermost
//! first: [`Observe`], which gives the layers' bare error answers the
//! envelope and counts every request by route template ([`MatchedPath`]),
//! status and outcome; then the request-body bounds: tower-http's size
//! limit (a declared length over [`MAX_BODY_BYTES`] is 413 before the
//! handler runs, a longer chunked body fails while read) and
//! [`BodyDeadline`] (the whole body must arrive within the header read
//! timeout). The 404 and 405 answers are endpoints
//! in the same layers ([`Layers::router`], [`Layers::endpoint`]). The API
//! endpoints (grab, queries; [`Layers::api_endpoint`]) sit inside one more,
//! [`Admitted`]: at most [`ServerLimits::max_in_flight`] of them run at
//! once, shared by the whole server, and one past it is shed at once with a
//! 503 ([`ApiError::overloaded`]) instead of waiting in a queue behind a
//! slow Redis; probes and `/metrics` are never shed.
//!
//! Each endpoint gets its own copy of the stack, rather than
//! `Router::layer` wrapping the routes once more: axum boxes each layer of
//! a router, and one box and one indirection less per request is a tenth
//! of the work of a sold-out answer.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Instant;

use std::time::Duration;

use axum::body::{Body, HttpBody};
use axum::extract::{MatchedPath, Request};
use axum::handler::HandlerWithoutStateExt;
use axum::response::{IntoResponse, Response};
use axum::routing::{MethodFilter, MethodRouter};
use axum::Router;
use bytes::Bytes;
use pin_project_lite::pin_project;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tower::{BoxError, Layer, Service, ServiceBuilder};
use tower_http::limit::{RequestBodyLimit, RequestBodyLimitLayer};

use crate::http::error::{method_not_allowed, no_route};
use crate::http::{ApiError, Outcome, ServerLimits, MAX_BODY_BYTES};
use crate::metrics::{HttpMetrics, RouteMetrics};

/// The `route` label of requests no route matched.
pub const UNMATCHED: &str = "unmatched";

/// A service in the layers of [`Layers::around`].
pub type Layered<S> = Observe<RequestBodyLimit<BodyDeadline<S>>>;

/// What axum's router needs of a service to serve it as an endpoint: one
/// name for the bounds every endpoint in the layers must meet.
pub trait Endpoint:
    Service<Request, Response = Response, Error = Infallible, Future: Send + 'static>
    + Clone
    + Send
    + Sync
    + 'static
{
}

impl<T> Endpoint for T where
    T: Service<Request, Response = Response, Error = Infallible, Future: Send + 'static>
        + Clone
        + Send
        + Sync
        + 'static
{
}

/// An API service admitted only while fewer than the server's
/// `max_in_flight` API requests run; else answered 503
/// ([`ApiError::overloaded`]) at once, without calling it.
///
/// This is what tower's `GlobalConcurrencyLimit` inside `LoadShed` inside
/// axum's `HandleError` did, on the same tokio semaphore, but without
/// their two boxed futures and three wrappers per request: replacing them
/// took 1,300 instructions off a sold-out answer under callgrind (26.3k to
/// 25.0k, docs/BENCHMARKS.md).
#[derive(Debug, Clone)]
pub struct Admitted<S> {
    inner: S,
    in_flight: Arc<Semaphore>,
}

impl<S, B> Service<axum::http::Request<B>> for Admitted<S>
where
    S: Service<axum::http::Request<B>, Response = Response, Error = Infallible>,
{
    type Response = Response;
    type Error = Infallible;
    type Future = AdmittedFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: axum::http::Request<B>) -> Self::Future {
        match self.in_flight.clone().try_acquire_owned() {
            Ok(permit) => AdmittedFuture::Running {
                inner: self.inner.call(request),
                permit,
            },
            Err(_) => AdmittedFuture::Shed,
        }
    }
}

pin_project! {
    /// The future of [`Admitted`]: the request running with its permit
    /// (given back when this future is dropped: once answered, or when the
    /// client goes away), or shed.
    #[project = AdmittedProjection]
    pub enum AdmittedFuture<F> {
        Running { #[pin] inner: F, permit: OwnedSemaphorePermit },
        Shed,
    }
}

impl<F> Future for AdmittedFuture<F>
where
    F: Future<Output = Result<Response, Infallible>>,
{
    type Output = Result<Response, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project() {
            AdmittedProjection::Running { inner, .. } => inner.poll(cx),
            AdmittedProjection::Shed => Poll::Ready(Ok(ApiError::overloaded())),
        }
    }
}

/// Gives a request's body a deadline: all of it must arrive within
/// `timeout` of the request reaching this layer, else reading it fails
/// with [`BodyTimedOut`] (answered 408 by the handlers' body reader).
///
/// tower-http's `RequestBodyDeadline` does the same but registers its timer
/// on the first read of every body, even one already received whole with
/// its head (a grab's always is): that registration and its removal were
/// about 700 of the 25,000 instructions of a sold-out answer (callgrind,
/// docs/BENCHMARKS.md). Here the timer is armed only when a read has to
/// wait for the client.
#[derive(Debug, Clone)]
pub struct BodyDeadline<S> {
    inner: S,
    timeout: Duration,
}

impl<S, B> Service<axum::http::Request<B>> for BodyDeadline<S>
where
    S: Service<axum::http::Request<DeadlineBody<B>>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: axum::http::Request<B>) -> Self::Future {
        let deadline = tokio::time::Instant::now() + self.timeout;
        self.inner.call(request.map(|body| DeadlineBody {
            body,
            deadline,
            timer: None,
        }))
    }
}

/// Reading a request body took longer than its deadline ([`BodyDeadline`]).
#[derive(Debug, thiserror::Error)]
#[error("the request body did not arrive in time")]
pub struct BodyTimedOut;

pin_project! {
    /// A request body under [`BodyDeadline`].
    pub struct DeadlineBody<B> {
        #[pin]
        body: B,
        deadline: tokio::time::Instant,
        #[pin]
        timer: Option<tokio::time::Sleep>,
    }
}

impl<B> HttpBody for DeadlineBody<B>
where
    B: HttpBody,
    B::Error: Into<BoxError>,
{
    type Data = B::Data;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<B::Data>, BoxError>>> {
        let mut this = self.project();
        if let Poll::Ready(frame) = this.body.poll_frame(cx) {
            return Poll::Ready(frame.map(|f| f.map_err(Into::into)));
        }
        if this.timer.is_none() {
            this.timer
                .set(Some(tokio::time::sleep_until(*this.deadline)));
        }
        match this.timer.as_pin_mut().map(|timer| timer.poll(cx)) {
            Some(Poll::Ready(())) => Poll::Ready(Some(Err(Box::new(BodyTimedOut)))),
            _ => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.body.size_hint()
    }
}

/// The layers of every endpoint of a server.
#[derive(Debug, Clone)]
pub struct Layers {
    observe: ObserveLayer,
    body_deadline: Duration,
    /// Permits of the API requests in flight, one set for the server.
    in_flight: Arc<Semaphore>,
}

impl Layers {
    /// The layers of a server of the path templates `templates` (its
    /// routes) with `limits`.
    pub fn new(templates: &[&'static str], limits: &ServerLimits) -> Self {
        Self {
            observe: ObserveLayer::new(templates, limits.metrics.as_ref()),
            body_deadline: limits.header_read_timeout,
            in_flight: Arc::new(Semaphore::new(limits.max_in_flight)),
        }
    }

    /// `service`, an API endpoint, behind the server's in-flight limit.
    pub fn admitted<S>(&self, service: S) -> Admitted<S> {
        Admitted {
            inner: service,
            in_flight: self.in_flight.clone(),
        }
    }

    /// [`Layers::endpoint`] of an API endpoint: `service` also behind the
    /// in-flight limit (a 405 is not counted against it).
    pub fn api_endpoint<S>(&self, filter: MethodFilter, service: S) -> MethodRouter
    where
        Layered<Admitted<S>>: Endpoint,
    {
        self.endpoint(filter, self.admitted(service))
    }

    /// `service` inside the layers.
    pub fn around<S>(&self, service: S) -> Layered<S> {
        ServiceBuilder::new()
            .layer(self.observe.clone())
            .layer(RequestBodyLimitLayer::new(MAX_BODY_BYTES))
            .service(BodyDeadline {
                inner: service,
                timeout: self.body_deadline,
            })
    }

    /// An endpoint: `service` answers the method of `filter`, other methods
    /// are answered 405 (with `Allow`), both inside the layers.
    pub fn endpoint<S>(&self, filter: MethodFilter, service: S) -> MethodRouter
    where
        Layered<S>: Endpoint,
    {
        MethodRouter::new()
            .on_service(filter, self.around(service))
            .fallback_service(self.around(method_not_allowed.into_service()))
    }

    /// `router` with the 404 of paths no route matches, inside the layers.
    pub fn router(&self, router: Router) -> Router {
        router.fallback_service(self.around(no_route.into_service()))
    }

    /// How [`Observe`] records the requests of route `template`, for an
    /// answer given before routing (the sold-out lane).
    pub fn observed(&self, template: &'static str) -> ObservedRoute {
        ObservedRoute {
            route: self.observe.routes.as_ref().map(|routes| {
                let index = routes
                    .templates
                    .iter()
                    .position(|t| *t == template)
                    .unwrap_or(routes.metrics.len() - 1);
                (routes.clone(), index)
            }),
        }
    }

    /// The time a request's body has to arrive ([`BodyDeadline`]).
    pub fn body_deadline(&self) -> Duration {
        self.body_deadline
    }
}

/// One route's metrics as [`Observe`] records them, for answers given
/// outside the router: [`ObservedRoute::answered`] is what [`Observe`] does
/// with an endpoint's answer.
#[derive(Debug, Clone)]
pub struct ObservedRoute {
    route: Option<(Arc<RouteTable>, usize)>,
}

impl ObservedRoute {
    /// `response` (given the envelope if it has no [`Outcome`] and is an
    /// error), recorded with the time since `started`.
    pub fn answered(&self, response: Response, started: Instant) -> Response {
        answered(response, started, self.route.as_ref())
    }
}

/// What [`Observe`] does with an answer: an error without an [`Outcome`]
/// gets the envelope of its status, and the request is recorded under its
/// route (the index in the table) with its status, outcome and latency.
fn answered<B>(
    response: Response<B>,
    started: Instant,
    route: Option<&(Arc<RouteTable>, usize)>,
) -> Response
where
    B: HttpBody<Data = Bytes> + Send + 'static,
    B::Error: Into<axum::BoxError>,
{
    let status = response.status();
    let outcome = response.extensions().get::<Outcome>().copied();
    let (response, outcome) = match outcome {
        Some(Outcome(o)) => (response.map(Body::new), o),
        None if status.is_client_error() || status.is_server_error() => {
            // Its own body and headers (a text body, its length) go.
            let error = ApiError::for_status(status);
            let code = error.code;
            (error.into_response(), code)
        }
        None if status.is_success() => (response.map(Body::new), "ok"),
        None => (response.map(Body::new), "error"),
    };
    if let Some((routes, index)) = route {
        if let Some(metrics) = routes.metrics.get(*index) {
            metrics.observe(status.as_u16(), outcome, started.elapsed());
        }
    }
    response
}

/// The metrics of each route template, looked up by the request's
/// [`MatchedPath`]; the last entry is [`UNMATCHED`].
#[derive(Debug)]
struct RouteTable {
    templates: Vec<&'static str>,
    metrics: Vec<RouteMetrics>,
}

impl RouteTable {
    fn new(templates: &[&'static str], http: &HttpMetrics) -> Self {
        let mut all: Vec<&'static str> = Vec::with_capacity(templates.len() + 1);
        for t in templates.iter().chain([&UNMATCHED]) {
            if !all.contains(t) {
                all.push(t);
            }
        }
        Self {
            metrics: all.iter().map(|t| http.route(t)).collect(),
            templates: all,
        }
    }

    /// The index of the metrics of `matched` (a path template of the
    /// router; `None` when no route matched).
    fn index_of(&self, matched: Option<&MatchedPath>) -> usize {
        let unmatched = self.metrics.len() - 1;
        matched
            .and_then(|m| self.templates.iter().position(|t| *t == m.as_str()))
            .unwrap_or(unmatched)
    }
}

/// Adds [`Observe`] to a service.
#[derive(Debug, Clone)]
pub struct ObserveLayer {
    routes: Option<Arc<RouteTable>>,
}

impl ObserveLayer {
    /// Counts requests into `metrics` by the templates of `templates` (and
    /// [`UNMATCHED`]); counts nothing when `metrics` is `None`.
    pub fn new(templates: &[&'static str], metrics: Option<&HttpMetrics>) -> Self {
        Self {
            routes: metrics.map(|m| Arc::new(RouteTable::new(templates, m))),
        }
    }
}

impl<S> Layer<S> for ObserveLayer {
    type Service = Observe<S>;

    fn layer(&self, inner: S) -> Observe<S> {
        Observe {
            inner,
            routes: self.routes.clone(),
        }
    }
}

/// Gives an error answer that carries no [`Outcome`] (a layer's, such as
/// tower-http's 413, which has a status and no envelope) the envelope of
/// its status, and records every request: its route template, status,
/// outcome (the [`Outcome`], else `ok` or `error`) and latency.
#[derive(Debug, Clone)]
pub struct Observe<S> {
    inner: S,
    routes: Option<Arc<RouteTable>>,
}

impl<S, B> Service<Request> for Observe<S>
where
    S: Service<Request, Response = Response<B>, Error = Infallible>,
    B: HttpBody<Data = Bytes> + Send + 'static,
    B::Error: Into<axum::BoxError>,
{
    type Response = Response;
    type Error = Infallible;
    type Future = ObserveFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request) -> Self::Future {
        let started = Instant::now();
        let route = self.routes.as_ref().map(|routes| {
            let index = routes.index_of(request.extensions().get::<MatchedPath>());
            (routes.clone(), index)
        });
        ObserveFuture {
            inner: self.inner.call(request),
            started,
            route,
        }
    }
}

pin_project! {
    /// The future of [`Observe`].
    pub struct ObserveFuture<F> {
        #[pin]
        inner: F,
        started: Instant,
        route: Option<(Arc<RouteTable>, usize)>,
    }
}

impl<F, B> Future for ObserveFuture<F>
where
    F: Future<Output = Result<Response<B>, Infallible>>,
    B: HttpBody<Data = Bytes> + Send + 'static,
    B::Error: Into<axum::BoxError>,
{
    type Output = Result<Response, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let Ok(response) = ready!(this.inner.poll(cx));
        let route = this.route.take();
        Poll::Ready(Ok(answered(response, *this.started, route.as_ref())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::test_server::{ask, default_limits, exchange, start, TestServer};
    use crate::http::ServerLimits;
    use crate::metrics::MetricsRegistry;
    use std::time::Duration;
    use tokio::io::AsyncWriteExt;
    use tokio::net::TcpStream;

    fn body_of(answer: &str) -> serde_json::Value {
        let body = answer.split_once("\r\n\r\n").map_or("", |(_, b)| b);
        serde_json::from_str(body).unwrap_or_else(|e| panic!("not JSON ({e}): {answer}"))
    }

    /// A request that closes its connection: `line` (method and path), more
    /// header lines (each ending in CRLF), then `body`.
    fn closing(line: &str, headers: &str, body: &str) -> Vec<u8> {
        format!("{line} HTTP/1.1\r\nHost: x\r\n{headers}Connection: close\r\n\r\n{body}")
            .into_bytes()
    }

    /// A connection to a test server whose requests must be read within
    /// `timeout` (the header read timeout, which bounds the body too).
    async fn connected_with_timeout(timeout: Duration) -> (TestServer, TcpStream) {
        let limits = ServerLimits {
            header_read_timeout: timeout,
            ..default_limits()
        };
        let server = start(limits, Duration::ZERO).await;
        let stream = TcpStream::connect(server.addr).await.unwrap();
        (server, stream)
    }

    /// `answer` has `status` and the error envelope with `code`.
    #[track_caller]
    fn assert_error(answer: &str, status: u16, code: &str) {
        assert!(
            answer.starts_with(&format!("HTTP/1.1 {status}")),
            "{answer}"
        );
        assert_eq!(body_of(answer)["error"], code, "{answer}");
    }

    #[tokio::test]
    async fn unknown_paths_other_methods_and_large_bodies_get_the_envelope() {
        let server = start(default_limits(), Duration::ZERO).await;
        let nope = ask(server.addr, &closing("GET /nope", "", "")).await;
        assert_error(&nope, 404, "not_found");
        let post = ask(
            server.addr,
            &closing("POST /hello", "Content-Length: 0\r\n", ""),
        )
        .await;
        assert_error(&post, 405, "method_not_allowed");
        assert!(post.to_ascii_lowercase().contains("allow: get"), "{post}");
        // A GET route answers HEAD too, as axum serves GET routes.
        let head = ask(server.addr, &closing("HEAD /hello", "", "")).await;
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        assert!(head.ends_with("\r\n\r\n"), "no body: {head}");
        let over = "x".repeat(5000);
        // Declared: refused before the handler, by tower-http, enveloped.
        let declared = closing("POST /echo", "Content-Length: 5000\r\n", &over);
        assert_error(&ask(server.addr, &declared).await, 413, "payload_too_large");
        // Chunked, so the size is only known while reading.
        let chunks = format!("1388\r\n{over}\r\n0\r\n\r\n");
        let chunked = closing("POST /echo", "Transfer-Encoding: chunked\r\n", &chunks);
        assert_error(&ask(server.addr, &chunked).await, 413, "payload_too_large");
        // At the limit, a body is read.
        let length = format!("Content-Length: {MAX_BODY_BYTES}\r\n");
        let fits = ask(
            server.addr,
            &closing("POST /echo", &length, &"x".repeat(MAX_BODY_BYTES)),
        )
        .await;
        assert!(fits.starts_with("HTTP/1.1 200"), "{fits}");
    }

    #[tokio::test]
    async fn a_body_that_does_not_arrive_within_the_header_timeout_is_408_in_the_envelope() {
        let (_server, mut stream) = connected_with_timeout(Duration::from_millis(200)).await;
        // Half the declared body, then nothing.
        let answer = exchange(
            &mut stream,
            b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n01234",
        )
        .await;
        assert_error(&answer, 408, "request_timeout");
    }

    #[tokio::test]
    async fn a_body_trickled_byte_by_byte_must_still_arrive_whole_within_the_timeout() {
        let (_server, mut stream) = connected_with_timeout(Duration::from_millis(300)).await;
        stream
            .write_all(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n")
            .await
            .unwrap();
        // One byte every 50 ms: each read gets data before the timeout
        // would pass since the last one, but the whole body needs 500 ms
        // (at least), past the 300 ms deadline of the request.
        for byte in b"0123456789" {
            tokio::time::sleep(Duration::from_millis(50)).await;
            if stream.write_all(&[*byte]).await.is_err() {
                break;
            }
        }
        let answer = exchange(&mut stream, b"").await;
        assert_error(&answer, 408, "request_timeout");
    }

    #[tokio::test]
    async fn a_handler_that_takes_no_body_answers_without_waiting_for_it_and_is_counted() {
        let registry = MetricsRegistry::new();
        // A body deadline far past the guard of `exchange`: an answer that
        // waited for the body would never come in time.
        let limits = ServerLimits {
            header_read_timeout: Duration::from_secs(3600),
            metrics: Some(HttpMetrics::register(&registry)),
            ..default_limits()
        };
        let server = start(limits, Duration::ZERO).await;
        // The body in the same packet: discarded, and the connection serves
        // the next request.
        let mut stream = TcpStream::connect(server.addr).await.unwrap();
        let answers = exchange(
            &mut stream,
            b"POST /gone/a HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n0123456789\
              GET /hello HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        )
        .await;
        assert!(answers.starts_with("HTTP/1.1 410"), "{answers}");
        assert!(answers.contains("HTTP/1.1 200"), "{answers}");
        // A declared body that never comes: answered, then the connection
        // is closed (its body was never read).
        let mut stream = TcpStream::connect(server.addr).await.unwrap();
        stream
            .write_all(b"POST /gone/a HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n")
            .await
            .unwrap();
        let answer = crate::http::test_server::read_until_closed(&mut stream).await;
        assert!(answer.starts_with("HTTP/1.1 410"), "{answer}");
        // A declared body over the limit is still 413, on every route.
        let big = ask(
            server.addr,
            &closing("POST /gone/a", "Content-Length: 5000\r\n", ""),
        )
        .await;
        assert!(big.starts_with("HTTP/1.1 413"), "{big}");
        ask(server.addr, &closing("GET /nope", "", "")).await;
        let text = registry.encode().unwrap();
        let counted = |route: &str, status: u16, outcome: &str, count: u32| {
            text.contains(&format!(
                "seckill_http_requests_total{{route=\"{route}\",status=\"{status}\",outcome=\"{outcome}\"}} {count}"
            ))
        };
        // The route label is the matched template, the outcome what the
        // handler said (a success without one is `ok`); a layer's 413 gets
        // the code of its envelope.
        assert!(counted("/gone/{id}", 410, "gone", 2), "{text}");
        assert!(counted("/gone/{id}", 413, "payload_too_large", 1), "{text}");
        assert!(counted("/hello", 200, "ok", 1), "{text}");
        assert!(counted(UNMATCHED, 404, "not_found", 1), "{text}");
    }

    #[tokio::test]
    async fn an_api_request_past_max_in_flight_is_shed_with_503_while_probes_still_answer() {
        let registry = MetricsRegistry::new();
        let limits = ServerLimits {
            max_in_flight: 1,
            metrics: Some(HttpMetrics::register(&registry)),
            ..default_limits()
        };
        let server = start(limits, Duration::ZERO).await;
        const HELD: &[u8] = b"GET /held HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";
        // The one permit, taken by a request that waits for the test.
        let started = server.hello.started.notified();
        let first = tokio::spawn(ask(server.addr, HELD));
        started.await;
        let shed = ask(server.addr, HELD).await;
        assert_error(&shed, 503, "unavailable");
        assert!(
            shed.to_ascii_lowercase().contains("retry-after: 1"),
            "{shed}"
        );
        // A route outside the API (as the probes are) is never shed.
        let hello = ask(server.addr, &closing("GET /hello", "", "")).await;
        assert!(hello.starts_with("HTTP/1.1 200"), "{hello}");
        // Once the first answers, its permit is back for the next one.
        server.hello.release.add_permits(1);
        let first = first.await.unwrap();
        assert!(first.starts_with("HTTP/1.1 200"), "{first}");
        let again = ask(server.addr, HELD).await;
        assert!(again.starts_with("HTTP/1.1 200"), "{again}");
        let text = registry.encode().unwrap();
        assert!(
            text.contains(
                "seckill_http_requests_total{route=\"/held\",status=\"503\",outcome=\"overloaded\"} 1"
            ),
            "{text}"
        );
    }
}
