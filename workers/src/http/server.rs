//! The accept loop: what serving an axum [`Router`](axum::Router) (and the
//! sold-out lane in front of it, [`App`]) needs beyond axum.
//! `axum::serve` has no header read timeout, no bound on the request head
//! and no connection cap, so connections are served here with hyper's
//! HTTP/1 builder: a client gets [`ServerLimits::header_read_timeout`] to
//! send each request head (slowloris), a head over [`MAX_HEADER_BYTES`] is
//! answered 431 by hyper and the connection closed, a connection past
//! [`ServerLimits::max_connections`] is closed at once, and on shutdown the
//! listener is dropped, idle keep-alive connections are closed and
//! in-flight requests get [`ServerLimits::drain_timeout`] to finish.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use axum::extract::{ConnectInfo, Request};
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use pin_project_lite::pin_project;
use tokio::net::TcpListener;
use tokio::sync::futures::OwnedNotified;
use tokio::sync::{Notify, Semaphore};
use tokio_util::either::Either;
use tokio_util::sync::CancellationToken;
use tower::{Service, ServiceExt};

use crate::http::App;
use crate::metrics::HttpMetrics;

/// Largest request head (request line and headers) read; past it hyper
/// answers 431 Request Header Fields Too Large and closes the connection,
/// so a client cannot make the worker hold a head of its choosing (hyper's
/// own bound is its ~400 KB read buffer).
pub const MAX_HEADER_BYTES: usize = 16 * 1024;

/// Bounds that keep the server alive under load and abuse, built by
/// [`ServerLimitArgs::limits`].
#[derive(Debug, Clone)]
pub struct ServerLimits {
    /// Connections served at once; a connection past it is closed at once.
    pub max_connections: usize,
    /// Time a client has to send a request head, and then its body; past
    /// it the connection is closed (head) or the request answered 408 (body).
    pub header_read_timeout: Duration,
    /// API requests (grabs, queries) handled at once; one past it is
    /// answered 503 at once without being attempted. Probes and `/metrics`
    /// are not counted, so a busy worker still reports itself alive, nor
    /// are the grabs the sold-out lane answers from memory.
    pub max_in_flight: usize,
    /// After shutdown is asked, in-flight requests get this long to finish.
    pub drain_timeout: Duration,
    /// Where request counts and latencies go; none recorded when `None`.
    pub metrics: Option<HttpMetrics>,
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

    /// API requests (grabs and queries) handled at once; one past it is
    /// answered 503 with Retry-After at once, nothing attempted, rather
    /// than queued behind a slow Redis. Probes, /metrics and the grabs a
    /// worker answers from memory after a sale are not counted.
    #[arg(long, env = "SECKILL_MAX_IN_FLIGHT", default_value_t = 1024)]
    pub max_in_flight: usize,
}

/// The flags of [`ServerLimitArgs`] alone, to read them where a role has
/// no such flags of its own.
#[derive(clap::Parser)]
struct LimitFlags {
    #[command(flatten)]
    limits: ServerLimitArgs,
}

impl ServerLimitArgs {
    /// The limits of a role that takes none of these flags (the operator's
    /// and the projector's probe servers): each flag's environment
    /// variable, else its default. Err when a variable is set to nonsense.
    pub fn from_env_or_defaults() -> Result<Self, HttpError> {
        use clap::Parser;
        LimitFlags::try_parse_from(["seckill"])
            .map(|flags| flags.limits)
            .map_err(|e| HttpError::Flags(e.to_string()))
    }

    /// The limits these flags set, with the given drain timeout and metrics.
    pub fn limits(&self, drain_timeout: Duration, metrics: Option<HttpMetrics>) -> ServerLimits {
        ServerLimits {
            max_connections: self.max_connections.clamp(1, Semaphore::MAX_PERMITS),
            header_read_timeout: Duration::from_millis(self.header_read_timeout_ms.max(1)),
            max_in_flight: self.max_in_flight.clamp(1, Semaphore::MAX_PERMITS),
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
    #[error("server limits: {0}")]
    Flags(String),
}

/// How every connection is served: hyper's HTTP/1 with the header read
/// timeout of `limits`, [`MAX_HEADER_BYTES`], keep-alive, and no vectored
/// writes. (Also the `hyper_floor` example's, the floor it measures.)
pub fn http1_builder(limits: &ServerLimits) -> hyper::server::conn::http1::Builder {
    let mut http1 = hyper::server::conn::http1::Builder::new();
    http1
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_header_size(MAX_HEADER_BYTES)
        .keep_alive(true)
        // Responses are a few hundred bytes: copying the body behind the
        // head and sending one buffer costs less than a vectored write of
        // the two (measured on the sold-out path).
        .writev(false);
    http1
}

/// Serves `app` on `listener` until `shutdown` is cancelled; then stops
/// accepting, lets in-flight requests finish (idle keep-alive connections
/// are closed at once) for at most `limits.drain_timeout`, and returns.
///
/// Handlers find the client's address as `ConnectInfo<SocketAddr>`.
pub async fn serve(
    listener: TcpListener,
    app: impl Into<App>,
    limits: &ServerLimits,
    shutdown: CancellationToken,
) -> Result<(), HttpError> {
    let app: App = app.into();
    let max_connections = limits.max_connections.clamp(1, Semaphore::MAX_PERMITS);
    let connections = Arc::new(Semaphore::new(max_connections));
    let http1 = http1_builder(limits);
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(%addr, "serving HTTP");
    }

    let stopping = Arc::new(ShutdownSignal::default());
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
        let app = app.clone();
        let http1 = http1.clone();
        let stopping = stopping.clone();
        tokio::spawn(async move {
            let App { router, sold_out } = app;
            let service = hyper::service::service_fn(move |mut request: Request<Incoming>| {
                request.extensions_mut().insert(ConnectInfo(peer));
                // A sold-out grab the lane answers before routing, or
                // the router.
                match sold_out
                    .as_ref()
                    .and_then(|lane| Some((lane.claim(&request)?, lane.clone())))
                {
                    Some((claim, lane)) => {
                        let router = router.clone();
                        Either::Left(async move {
                            let to_router = |request| async move {
                                let Ok(response) = router.oneshot(request).await;
                                response
                            };
                            Ok::<_, Infallible>(lane.answer(claim, request, to_router).await)
                        })
                    }
                    None => Either::Right(router.clone().call(request)),
                }
            });
            let connection = http1.serve_connection(TokioIo::new(stream), service);
            if let Err(e) = stopping.until_shutdown(connection).await {
                tracing::debug!(%peer, error = %e, "connection ended with an error");
            }
            drop(permit);
        });
    }

    drop(listener);
    stopping.start();
    let drain_timeout = limits.drain_timeout;
    tracing::info!(
        ?drain_timeout,
        "stopped accepting; draining in-flight requests"
    );
    let all = u32::try_from(max_connections).unwrap_or(u32::MAX);
    match tokio::time::timeout(drain_timeout, connections.acquire_many(all)).await {
        Ok(_) => tracing::info!("drained"),
        Err(_) => tracing::warn!(
            open = max_connections - connections.available_permits(),
            "drain timeout reached; dropping the connections still open"
        ),
    }
    Ok(())
}

/// Tells every connection of [`serve`] that the server is shutting down.
///
/// A connection checks it each time its task is woken, which for a busy
/// connection is twice a request or more. A `select!` on the
/// [`CancellationToken`] took two mutex locks per check (its `is_cancelled`
/// and its `Notify`), about 2 % of a sold-out answer's instructions
/// (callgrind, docs/BENCHMARKS.md); here a check is one atomic load, and
/// the waker is registered with the [`Notify`] once, not at every poll.
#[derive(Debug, Default)]
struct ShutdownSignal {
    started: AtomicBool,
    notify: Arc<Notify>,
}

impl ShutdownSignal {
    /// Every connection, idle or not, is woken and told to finish.
    fn start(&self) {
        self.started.store(true, Ordering::Release);
        self.notify.notify_waiters();
    }

    /// `connection`, asked to shut down gracefully (idle keep-alive closed
    /// at once, the request in flight answered first) once [`Self::start`]
    /// is called, even if that was before this connection was accepted.
    fn until_shutdown<C: Graceful>(self: &Arc<Self>, connection: C) -> UntilShutdown<C> {
        UntilShutdown {
            connection,
            // Created before the check of `started` in `poll`: a
            // `notify_waiters` after this line wakes it even unpolled.
            notified: self.notify.clone().notified_owned(),
            signal: self.clone(),
            registered: None,
            asked: false,
        }
    }
}

/// A connection that can be asked to finish what it is doing and close.
/// hyper-util's `GracefulConnection` says the same, but it is sealed (and
/// behind a feature this crate leaves off): the tests' stand-in connection
/// could not implement it.
trait Graceful: Future {
    fn graceful_shutdown(self: Pin<&mut Self>);
}

impl<I, S> Graceful for hyper::server::conn::http1::Connection<I, S>
where
    S: hyper::service::HttpService<Incoming>,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    I: hyper::rt::Read + hyper::rt::Write + Unpin + 'static,
    S::ResBody: 'static,
    <S::ResBody as hyper::body::Body>::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    fn graceful_shutdown(self: Pin<&mut Self>) {
        hyper::server::conn::http1::Connection::graceful_shutdown(self)
    }
}

pin_project! {
    /// A connection served until [`ShutdownSignal::start`], then asked to
    /// finish gracefully; see [`ShutdownSignal::until_shutdown`].
    struct UntilShutdown<C> {
        #[pin]
        connection: C,
        #[pin]
        notified: OwnedNotified,
        signal: Arc<ShutdownSignal>,
        // The waker `notified` was last polled with: it wakes that one, so
        // it is polled again only when the task's waker is another.
        registered: Option<Waker>,
        asked: bool,
    }
}

impl<C: Graceful> Future for UntilShutdown<C> {
    type Output = C::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<C::Output> {
        let mut this = self.project();
        if !*this.asked {
            let stale = this
                .registered
                .as_ref()
                .is_none_or(|waker| !waker.will_wake(cx.waker()));
            let mut notified = false;
            if stale {
                notified = this.notified.as_mut().poll(cx).is_ready();
                *this.registered = Some(cx.waker().clone());
            }
            if notified || this.signal.started.load(Ordering::Acquire) {
                *this.asked = true;
                this.connection.as_mut().graceful_shutdown();
            }
        }
        this.connection.poll(cx)
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::test_server::{
        ask, default_limits, exchange, read_answer, read_until_closed, start, HANG,
    };
    use std::time::Instant;
    use tokio::io::AsyncWriteExt;
    use tokio::net::TcpStream;

    const HELLO: &[u8] = b"GET /hello HTTP/1.1\r\nHost: x\r\n\r\n";

    #[tokio::test]
    async fn a_client_that_never_finishes_its_headers_is_disconnected() {
        let limits = ServerLimits {
            header_read_timeout: Duration::from_millis(200),
            ..default_limits()
        };
        let server = start(limits, Duration::ZERO).await;
        let mut stream = TcpStream::connect(server.addr).await.unwrap();
        // A head that never ends: closed once the header timeout passes
        // (read_until_closed fails after a minute otherwise).
        let answer = exchange(&mut stream, b"GET /hello HTTP/1.1\r\nHost: x\r\n").await;
        assert!(!answer.contains("200"), "{answer}");
    }

    #[tokio::test]
    async fn a_head_over_16_kib_is_answered_431_and_a_head_just_under_it_is_served() {
        let server = start(default_limits(), Duration::ZERO).await;
        let head = |header_bytes: usize| {
            format!(
                "GET /hello HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\nConnection: close\r\n\r\n",
                "h".repeat(header_bytes)
            )
            .into_bytes()
        };
        let big = ask(server.addr, &head(64 * 1024)).await;
        assert!(
            big.starts_with("HTTP/1.1 431 Request Header Fields Too Large"),
            "{big}"
        );
        let just_over = ask(server.addr, &head(MAX_HEADER_BYTES)).await;
        assert!(just_over.starts_with("HTTP/1.1 431"), "{just_over}");
        // The whole head, request line and blank line included, at the bound.
        let fits = head(0).len();
        let at_bound = ask(server.addr, &head(MAX_HEADER_BYTES - fits)).await;
        assert!(at_bound.starts_with("HTTP/1.1 200"), "{at_bound}");
        let one_over = ask(server.addr, &head(MAX_HEADER_BYTES - fits + 1)).await;
        assert!(one_over.starts_with("HTTP/1.1 431"), "{one_over}");
    }

    #[tokio::test]
    async fn connections_past_the_limit_are_closed_while_others_are_served() {
        let limits = ServerLimits {
            max_connections: 1,
            ..default_limits()
        };
        let server = start(limits, Duration::ZERO).await;
        let mut first = TcpStream::connect(server.addr).await.unwrap();
        first.write_all(HELLO).await.unwrap();
        assert!(read_answer(&mut first).await.starts_with("HTTP/1.1 200"));
        // The first connection is kept alive and holds the only slot: the
        // second is closed without an answer (not held until a timeout:
        // the header timeout is the default 10 s, the guard a minute).
        let mut second = TcpStream::connect(server.addr).await.unwrap();
        let answer = exchange(&mut second, HELLO).await;
        assert!(answer.is_empty(), "served past the limit: {answer}");
        // The kept-alive one is still served.
        first.write_all(HELLO).await.unwrap();
        assert!(read_answer(&mut first).await.starts_with("HTTP/1.1 200"));
    }

    #[tokio::test]
    async fn shutdown_lets_the_in_flight_request_finish_then_returns() {
        let server = start(default_limits(), Duration::from_millis(300)).await;
        let mut stream = TcpStream::connect(server.addr).await.unwrap();
        stream.write_all(HELLO).await.unwrap();
        server.hello.started.notified().await;
        server.shutdown.cancel();
        let answer = read_until_closed(&mut stream).await;
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        tokio::time::timeout(HANG, server.task)
            .await
            .expect("serve returned")
            .unwrap();
        assert!(TcpStream::connect(server.addr).await.is_err());
    }

    #[tokio::test]
    async fn an_idle_keep_alive_connection_is_closed_once_the_header_timeout_passes_not_before() {
        let timeout = Duration::from_millis(300);
        let limits = ServerLimits {
            header_read_timeout: timeout,
            ..default_limits()
        };
        let server = start(limits, Duration::ZERO).await;
        let mut stream = TcpStream::connect(server.addr).await.unwrap();
        // Requests on the same connection are each given the timeout anew.
        for _ in 0..3 {
            stream.write_all(HELLO).await.unwrap();
            assert!(read_answer(&mut stream).await.starts_with("HTTP/1.1 200"));
        }
        // The server starts counting after it has read the last request,
        // so no earlier than `timeout` after it was sent.
        let sent = Instant::now();
        stream.write_all(HELLO).await.unwrap();
        assert!(read_answer(&mut stream).await.starts_with("HTTP/1.1 200"));
        let rest = read_until_closed(&mut stream).await;
        assert!(rest.is_empty(), "closed with an answer: {rest}");
        let idle = sent.elapsed();
        assert!(idle >= timeout, "closed after {idle:?}, before {timeout:?}");
    }

    /// A stand-in connection: pending until asked to shut down.
    struct StandIn {
        asked: Arc<AtomicBool>,
    }

    impl Future for StandIn {
        type Output = ();
        fn poll(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<()> {
            if self.asked.load(Ordering::SeqCst) {
                Poll::Ready(())
            } else {
                Poll::Pending
            }
        }
    }

    impl Graceful for StandIn {
        fn graceful_shutdown(self: Pin<&mut Self>) {
            self.asked.store(true, Ordering::SeqCst);
        }
    }

    /// A waker that counts its wakes.
    struct Counting(std::sync::atomic::AtomicUsize);

    impl futures::task::ArcWake for Counting {
        fn wake_by_ref(arc_self: &Arc<Self>) {
            arc_self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn counting() -> (Arc<Counting>, Waker) {
        let count = Arc::new(Counting(Default::default()));
        (count.clone(), futures::task::waker(count))
    }

    fn stand_in(
        signal: &Arc<ShutdownSignal>,
    ) -> (Arc<AtomicBool>, Pin<Box<UntilShutdown<StandIn>>>) {
        let asked = Arc::new(AtomicBool::new(false));
        let future = signal.until_shutdown(StandIn {
            asked: asked.clone(),
        });
        (asked, Box::pin(future))
    }

    #[test]
    fn a_connection_is_woken_and_asked_to_finish_when_shutdown_starts() {
        let signal = Arc::new(ShutdownSignal::default());
        let (asked, mut connection) = stand_in(&signal);
        let (wakes, waker) = counting();
        let mut cx = Context::from_waker(&waker);
        for _ in 0..3 {
            assert!(connection.as_mut().poll(&mut cx).is_pending());
        }
        assert!(!asked.load(Ordering::SeqCst));
        signal.start();
        assert_eq!(wakes.0.load(Ordering::SeqCst), 1, "woken once");
        assert!(connection.as_mut().poll(&mut cx).is_ready());
        assert!(asked.load(Ordering::SeqCst));
    }

    #[test]
    fn a_connection_accepted_after_shutdown_started_is_asked_at_its_first_poll() {
        let signal = Arc::new(ShutdownSignal::default());
        signal.start();
        let (asked, mut connection) = stand_in(&signal);
        let (_, waker) = counting();
        assert!(connection
            .as_mut()
            .poll(&mut Context::from_waker(&waker))
            .is_ready());
        assert!(asked.load(Ordering::SeqCst));
    }

    #[test]
    fn shutdown_wakes_the_waker_a_connection_was_last_polled_with() {
        let signal = Arc::new(ShutdownSignal::default());
        let (_, mut connection) = stand_in(&signal);
        let (first, first_waker) = counting();
        let (second, second_waker) = counting();
        assert!(connection
            .as_mut()
            .poll(&mut Context::from_waker(&first_waker))
            .is_pending());
        assert!(connection
            .as_mut()
            .poll(&mut Context::from_waker(&second_waker))
            .is_pending());
        signal.start();
        assert_eq!(second.0.load(Ordering::SeqCst), 1);
        assert_eq!(first.0.load(Ordering::SeqCst), 0);
    }

    #[tokio::test]
    async fn shutdown_closes_idle_keep_alive_connections_at_once() {
        // A header timeout far past the guard: only shutdown can close it.
        let limits = ServerLimits {
            header_read_timeout: HANG * 10,
            ..default_limits()
        };
        let server = start(limits, Duration::ZERO).await;
        let mut stream = TcpStream::connect(server.addr).await.unwrap();
        stream.write_all(HELLO).await.unwrap();
        assert!(read_answer(&mut stream).await.starts_with("HTTP/1.1 200"));
        server.shutdown.cancel();
        assert!(read_until_closed(&mut stream).await.is_empty());
        tokio::time::timeout(HANG, server.task)
            .await
            .expect("serve returned")
            .unwrap();
    }
}
