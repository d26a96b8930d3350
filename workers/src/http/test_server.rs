//! A server of test routes on a free loopback port, and a raw client, for
//! the unit tests of the server and its layers. The routes:
//! `GET /hello` (answers after the delay given, telling the test when it
//! started), `POST /gone/{id}` (410, outcome `gone`, without reading the
//! body, as the sold-out answer does), `POST /echo` (reads the body, answers
//! it) and `GET /held`, an API endpoint (behind the in-flight limit) that
//! answers once the test opens [`Hello::release`].

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::State;
use axum::handler::{Handler, HandlerWithoutStateExt};
use axum::http::header::CONTENT_TYPE;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::MethodFilter;
use axum::Extension;
use axum::Router;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::http::extract::read_body;
use crate::http::layers::Layers;
use crate::http::{serve, Outcome, ServerLimitArgs, ServerLimits};

/// Long enough that a test waiting this long has found the behaviour it
/// waits for missing, not slow: a guard against hanging, never a measure.
pub const HANG: Duration = Duration::from_secs(60);

/// The routes' templates, as the route table would list them.
pub const TEMPLATES: [&str; 4] = ["/hello", "/gone/{id}", "/echo", "/held"];

/// The limits of the flags' defaults, with a drain timeout of 20 s.
pub fn default_limits() -> ServerLimits {
    ServerLimitArgs::from_env_or_defaults()
        .unwrap()
        .limits(Duration::from_secs(20), None)
}

/// What `GET /hello` does.
pub struct Hello {
    pub delay: Duration,
    /// Notified when a `/hello` or `/held` request has started.
    pub started: Notify,
    /// `/held` answers once this has a permit (none at first).
    pub release: tokio::sync::Semaphore,
}

async fn held(State(hello): State<Arc<Hello>>) -> Response {
    hello.started.notify_one();
    let _open = hello.release.acquire().await;
    (StatusCode::OK, "released").into_response()
}

async fn say_hello(State(hello): State<Arc<Hello>>) -> Response {
    hello.started.notify_one();
    tokio::time::sleep(hello.delay).await;
    (StatusCode::OK, "hello").into_response()
}

async fn gone() -> Response {
    (
        StatusCode::GONE,
        [(CONTENT_TYPE, "application/json")],
        Extension(Outcome("gone")),
        "{}",
    )
        .into_response()
}

async fn echo(body: Body) -> Response {
    match read_body(body).await {
        Ok(bytes) => (StatusCode::OK, bytes).into_response(),
        Err(e) => e.into_response(),
    }
}

/// A running test server.
pub struct TestServer {
    pub addr: SocketAddr,
    pub shutdown: CancellationToken,
    pub task: tokio::task::JoinHandle<()>,
    pub hello: Arc<Hello>,
}

/// Serves the test routes with `limits`; `/hello` answers after `delay`.
pub async fn start(limits: ServerLimits, delay: Duration) -> TestServer {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let shutdown = CancellationToken::new();
    let hello = Arc::new(Hello {
        delay,
        started: Notify::new(),
        release: tokio::sync::Semaphore::new(0),
    });
    let layers = Layers::new(&TEMPLATES, &limits);
    let router = Router::new()
        .route(
            "/hello",
            layers.endpoint(MethodFilter::GET, say_hello.with_state(hello.clone())),
        )
        .route(
            "/gone/{id}",
            layers.endpoint(MethodFilter::POST, gone.into_service()),
        )
        .route(
            "/echo",
            layers.endpoint(MethodFilter::POST, echo.into_service()),
        )
        .route(
            "/held",
            layers.api_endpoint(MethodFilter::GET, held.with_state(hello.clone())),
        );
    let app = layers.router(router);
    let token = shutdown.clone();
    let task = tokio::spawn(async move { serve(listener, app, &limits, token).await.unwrap() });
    TestServer {
        addr,
        shutdown,
        task,
        hello,
    }
}

/// Sends raw bytes on `stream` and reads until the server closes it.
pub async fn exchange(stream: &mut TcpStream, bytes: &[u8]) -> String {
    stream.write_all(bytes).await.unwrap();
    read_until_closed(stream).await
}

/// Reads until the server closes `stream` (panics after [`HANG`]).
pub async fn read_until_closed(stream: &mut TcpStream) -> String {
    let mut answer = Vec::new();
    tokio::time::timeout(HANG, stream.read_to_end(&mut answer))
        .await
        .expect("the server never closed the connection")
        .unwrap_or_default();
    String::from_utf8_lossy(&answer).into_owned()
}

/// One request on a new connection, `Connection: close` expected in it.
pub async fn ask(addr: SocketAddr, bytes: &[u8]) -> String {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    exchange(&mut stream, bytes).await
}

/// Reads one answer of a kept-alive connection (its head and a short body).
pub async fn read_answer(stream: &mut TcpStream) -> String {
    let mut buf = [0u8; 4096];
    let n = tokio::time::timeout(HANG, stream.read(&mut buf))
        .await
        .expect("no answer")
        .unwrap();
    String::from_utf8_lossy(&buf[..n]).into_owned()
}
