//! Abuse control on `governor`'s keyed rate limiter (GCRA): a flash sale
//! attracts bots that hammer the grab endpoint, so each client (by IP or by
//! customer id) may burst a little and is then held to a steady rate,
//! answered 429 with `Retry-After` instead of costing a Redis round trip.
//!
//! By IP, the limit is a middleware on the grab route ([`LimitByIp`]),
//! before anything is parsed; by customer, the grab handler checks it right
//! after the customer id is. Who the client is behind a proxy is decided by
//! [`client_ip`], the one place that reads `X-Forwarded-For`.

use std::hash::Hash;
use std::net::{IpAddr, SocketAddr};
use std::num::NonZeroU32;
use std::sync::{Arc, Weak};
use std::time::Duration;

use std::future::{ready, Ready};
use std::task::{Context, Poll};

use axum::extract::ConnectInfo;
use axum::http::{HeaderMap, Request};
use axum::response::{IntoResponse, Response};
use futures::future::Either;
use governor::clock::{Clock, DefaultClock};
use governor::middleware::NoOpMiddleware;
use governor::state::keyed::DefaultKeyedStateStore;
use governor::{Quota, RateLimiter};
use tower::Service;

use crate::http::ApiError;
use crate::metrics::CommandMetrics;

/// How often clients whose allowance has fully come back are forgotten:
/// what bounds the limiter's memory (a client is kept for at most the time
/// its burst takes to refill, plus this).
pub const FORGET_IDLE_EVERY: Duration = Duration::from_secs(1);

/// What identifies a client for rate limiting.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum RateLimitKey {
    /// The peer IP address (or the first X-Forwarded-For hop when trusted).
    Ip,
    /// The customer id of the grab.
    Customer,
}

impl RateLimitKey {
    /// The flag value, also the `key` label of the rate-limit metric.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Ip => "ip",
            Self::Customer => "customer",
        }
    }
}

/// Rate-limit flags; off unless `--rate-limit-per-sec` is above zero.
#[derive(clap::Args, Debug, Clone)]
pub struct RateLimitArgs {
    /// Steady requests per second allowed per client; 0 turns limiting off.
    #[arg(long, env = "SECKILL_RATE_LIMIT_PER_SEC", default_value_t = 0.0)]
    pub rate_limit_per_sec: f64,
    /// Requests a client may send at once before the steady rate applies.
    #[arg(long, env = "SECKILL_RATE_LIMIT_BURST", default_value_t = 10)]
    pub rate_limit_burst: u32,
    /// What identifies a client.
    #[arg(long, env = "SECKILL_RATE_LIMIT_KEY", value_enum, default_value_t = RateLimitKey::Customer)]
    pub rate_limit_key: RateLimitKey,
    /// Key by the first X-Forwarded-For address (only behind a trusted ingress).
    #[arg(long, env = "SECKILL_TRUST_FORWARDED_FOR")]
    pub trust_forwarded_for: bool,
}

impl RateLimitArgs {
    /// The quota these flags ask for: one request per `1 / rate` seconds,
    /// in bursts of up to `burst` (at least 1). `None` when limiting is off
    /// (a rate of 0, below, or not a number).
    pub fn quota(&self) -> Option<Quota> {
        let rate = self.rate_limit_per_sec;
        if !(rate > 0.0 && rate.is_finite()) {
            return None;
        }
        // A rate past one per nanosecond is one per nanosecond.
        let period = Duration::try_from_secs_f64(1.0 / rate)
            .unwrap_or(Duration::MAX)
            .max(Duration::from_nanos(1));
        let burst = NonZeroU32::new(self.rate_limit_burst).unwrap_or(NonZeroU32::MIN);
        Quota::with_period(period).map(|q| q.allow_burst(burst))
    }
}

/// A rate limit per client `K` (an IP address, a customer id).
pub struct ClientLimiter<K: Hash + Eq + Clone, C: Clock = DefaultClock> {
    limiter: RateLimiter<K, DefaultKeyedStateStore<K>, C, NoOpMiddleware<C::Instant>>,
}

impl<K: Hash + Eq + Clone, C: Clock> ClientLimiter<K, C> {
    /// A limiter of `quota` per client on `clock`.
    pub fn with_clock(quota: Quota, clock: C) -> Self {
        Self {
            limiter: RateLimiter::new(quota, DefaultKeyedStateStore::default(), clock),
        }
    }

    /// Counts one request of `client`; `Err(wait)` when it is over its
    /// rate, with how long until it may send again.
    pub fn check(&self, client: &K) -> Result<(), Duration> {
        self.limiter
            .check_key(client)
            .map_err(|not_until| not_until.wait_time_from(self.limiter.clock().now()))
    }

    /// Forgets the clients whose allowance has fully come back (they would
    /// start afresh anyway) and gives the memory back.
    pub fn forget_idle(&self) {
        self.limiter.retain_recent();
        self.limiter.shrink_to_fit();
    }

    /// Clients remembered now.
    pub fn len(&self) -> usize {
        self.limiter.len()
    }

    /// No client remembered.
    pub fn is_empty(&self) -> bool {
        self.limiter.is_empty()
    }
}

impl<K> ClientLimiter<K>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
{
    /// A limiter of `quota` per client that forgets idle clients every
    /// [`FORGET_IDLE_EVERY`], from a task that ends with the limiter. Call
    /// it within a tokio runtime (outside one, idle clients are kept).
    pub fn new(quota: Quota) -> Arc<Self> {
        let limiter = Arc::new(Self::with_clock(quota, DefaultClock::default()));
        let weak: Weak<Self> = Arc::downgrade(&limiter);
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                runtime.spawn(async move {
                    let mut every = tokio::time::interval(FORGET_IDLE_EVERY);
                    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                    loop {
                        every.tick().await;
                        match weak.upgrade() {
                            Some(limiter) => limiter.forget_idle(),
                            None => break,
                        }
                    }
                });
            }
            Err(_) => tracing::warn!("no tokio runtime: the rate limiter keeps idle clients"),
        }
        limiter
    }
}

/// The answer to a client over its rate: 429 `rate_limited`, `Retry-After`
/// in whole seconds (at least 1), counted under `key`.
pub fn refusal(key: RateLimitKey, wait: Duration, metrics: Option<&CommandMetrics>) -> ApiError {
    if let Some(m) = metrics {
        m.rate_limited(key.as_str());
    }
    ApiError::rate_limited(retry_after_secs(wait))
}

/// Whole seconds for a `Retry-After` header, at least 1.
pub fn retry_after_secs(wait: Duration) -> u64 {
    wait.as_secs_f64().ceil().max(1.0) as u64
}

/// The address a client is limited by: the TCP peer's, unless
/// `trust_forwarded_for` says the worker runs behind a proxy that
/// overwrites `X-Forwarded-For`; then the first address of that header
/// (the client as the first proxy saw it), or the peer's when the header is
/// absent or does not start with an IP address.
///
/// Only trust the header behind such a proxy: otherwise every client
/// writes its own and picks its own allowance.
pub fn client_ip(headers: &HeaderMap, peer: SocketAddr, trust_forwarded_for: bool) -> IpAddr {
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

/// The rate limit by IP of a route: what [`LimitByIp`] checks.
pub struct IpRateLimit {
    pub limiter: Arc<ClientLimiter<IpAddr>>,
    pub trust_forwarded_for: bool,
    pub metrics: Option<CommandMetrics>,
}

impl IpRateLimit {
    /// `inner`, limited by this.
    pub fn layer<S>(self: Arc<Self>, inner: S) -> LimitByIp<S> {
        LimitByIp { inner, limit: self }
    }
}

/// Middleware: 429 for a client IP ([`client_ip`]) over its rate, before
/// the request goes any further. The peer is the [`ConnectInfo`] the
/// server puts on every request; a request without one (served by
/// something else than [`crate::http::serve`]) is not limited.
#[derive(Clone)]
pub struct LimitByIp<S> {
    inner: S,
    limit: Arc<IpRateLimit>,
}

impl<S, B> Service<Request<B>> for LimitByIp<S>
where
    S: Service<Request<B>, Response = Response>,
{
    type Response = Response;
    type Error = S::Error;
    type Future = Either<Ready<Result<Response, S::Error>>, S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        if let Some(ConnectInfo(peer)) = request.extensions().get::<ConnectInfo<SocketAddr>>() {
            let ip = client_ip(request.headers(), *peer, self.limit.trust_forwarded_for);
            if let Err(wait) = self.limit.limiter.check(&ip) {
                let refused = refusal(RateLimitKey::Ip, wait, self.limit.metrics.as_ref());
                return Either::Left(ready(Ok(refused.into_response())));
            }
        }
        Either::Right(self.inner.call(request))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;
    use governor::clock::FakeRelativeClock;

    #[derive(Parser)]
    struct Flags {
        #[command(flatten)]
        rate_limit: RateLimitArgs,
    }

    fn args(extra: &[&str]) -> RateLimitArgs {
        let argv = std::iter::once("t").chain(extra.iter().copied());
        Flags::try_parse_from(argv).unwrap().rate_limit
    }

    fn limiter(
        rate: &str,
        burst: &str,
    ) -> (
        ClientLimiter<&'static str, FakeRelativeClock>,
        FakeRelativeClock,
    ) {
        let quota = args(&["--rate-limit-per-sec", rate, "--rate-limit-burst", burst])
            .quota()
            .unwrap();
        let clock = FakeRelativeClock::default();
        (ClientLimiter::with_clock(quota, clock.clone()), clock)
    }

    #[test]
    fn a_client_may_burst_then_is_held_to_the_steady_rate() {
        let (limiter, clock) = limiter("2", "3");
        for _ in 0..3 {
            assert!(limiter.check(&"bot").is_ok());
        }
        let wait = limiter.check(&"bot").unwrap_err();
        assert_eq!(wait, Duration::from_millis(500));
        assert_eq!(retry_after_secs(wait), 1);
        // Half a second later one request is allowed again, and only one.
        clock.advance(Duration::from_millis(500));
        assert!(limiter.check(&"bot").is_ok());
        assert!(limiter.check(&"bot").is_err());
    }

    #[test]
    fn a_slow_rate_tells_the_client_to_wait_the_whole_period() {
        let (limiter, _clock) = limiter("0.5", "1");
        assert!(limiter.check(&"bot").is_ok());
        let wait = limiter.check(&"bot").unwrap_err();
        assert_eq!(retry_after_secs(wait), 2, "{wait:?}");
    }

    #[test]
    fn clients_do_not_share_an_allowance() {
        let (limiter, _clock) = limiter("1", "1");
        assert!(limiter.check(&"a").is_ok());
        assert!(limiter.check(&"a").is_err());
        assert!(limiter.check(&"b").is_ok());
    }

    #[test]
    fn limiting_is_off_by_default_and_for_rates_that_are_not_positive() {
        assert!(args(&[]).quota().is_none());
        for rate in ["0", "-1", "NaN", "inf"] {
            let flag = format!("--rate-limit-per-sec={rate}");
            assert!(args(&[&flag]).quota().is_none(), "{rate}");
        }
        let defaults = args(&[]);
        assert_eq!(defaults.rate_limit_key, RateLimitKey::Customer);
        assert!(!defaults.trust_forwarded_for);
    }

    #[test]
    fn idle_clients_are_forgotten_once_their_allowance_is_back() {
        let (limiter, clock) = limiter("10", "2");
        for client in ["a", "b", "c"] {
            assert!(limiter.check(&client).is_ok());
        }
        limiter.forget_idle();
        assert_eq!(limiter.len(), 3, "their allowance is not back yet");
        // Two requests' worth of time: everyone's burst has refilled.
        clock.advance(Duration::from_millis(200));
        assert!(limiter.check(&"c").is_ok());
        limiter.forget_idle();
        assert_eq!(limiter.len(), 1, "only the client seen just now stays");
    }

    #[test]
    fn the_forwarded_address_counts_only_when_trusted_and_only_when_it_is_one() {
        let peer: SocketAddr = "10.0.0.9:5000".parse().unwrap();
        let mut headers = HeaderMap::new();
        headers.insert("x-forwarded-for", "203.0.113.7, 10.0.0.1".parse().unwrap());
        assert_eq!(
            client_ip(&headers, peer, true),
            "203.0.113.7".parse::<IpAddr>().unwrap()
        );
        assert_eq!(client_ip(&headers, peer, false), peer.ip());
        headers.insert("x-forwarded-for", "unknown, 203.0.113.7".parse().unwrap());
        assert_eq!(client_ip(&headers, peer, true), peer.ip());
        assert_eq!(client_ip(&HeaderMap::new(), peer, true), peer.ip());
    }
}
