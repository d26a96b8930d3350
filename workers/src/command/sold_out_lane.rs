//! The sold-out lane: a grab of a promotion that is over, from a customer
//! who holds none of its coupons, answered before axum's router.
//!
//! Once a sale is over, nearly every grab is that one: the same 410 from
//! memory, at the rate of a crowd refreshing a page. Through the router it
//! cost about 19.8k instructions (callgrind), 8.5k more than hyper alone
//! answering it (`workers/examples/hyper_floor.rs`): the route match and
//! the copies of its path parameters, the layers' futures, the handler's
//! glue. Answered here it costs about 15.3k, which took the sold-out rate
//! from 0.73 to 0.85-0.89 of nginx's static 410 on a machine with cheap
//! loopback TCP, where 0.8 had been out of reach (docs/BENCHMARKS.md,
//! "The sold-out target and the machine"). Every other request pays the
//! check: about 870 instructions more per granted grab (27.3k to 28.1k).
//!
//! The lane claims a request only when the answer cannot differ from the
//! router's: a `POST` to the grab route's path as the route table spells
//! it ([`GRAB_ROUTE`], segments without `%`), no declared length past
//! [`MAX_BODY_BYTES`] (and a declared one when the customer comes from the
//! body, which is then read here), and a promotion this worker knows is over
//! ([`Known::Finished`](super::memory::Known) is final) with its holders
//! loaded. It decides with the handler's own
//! `CommandApi::closed_customer`: a non-holder gets the 410 and a
//! customer that cannot be read the same client error, both recorded under
//! the grab route as [`Observe`](crate::http::layers::Observe) records
//! them. Anything else, holders included, goes on to the router, the body
//! put back, and is answered there as before.
//!
//! What the lane's answers skip, on purpose: the in-flight limit (an answer
//! from memory takes no permit, so a sale's tail is never shed). It keeps
//! the body deadline: a body that does not arrive within the header read
//! timeout gets the same 408. When the rate limit by IP is on the lane is
//! off: that limit must see every grab.

use std::future::Future;
use std::pin::pin;
use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::header::{CONTENT_LENGTH, TRANSFER_ENCODING};
use axum::http::{Method, Request};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use hyper::body::Incoming;

use super::handler::{ClosedGrab, CommandApi};
use super::memory::Closed;
use crate::http::extract::read_body;
use crate::http::layers::{Layers, ObservedRoute};
use crate::http::routes::GRAB_ROUTE;
use crate::http::{ApiError, MAX_BODY_BYTES};

/// The lane of one server; see the module.
pub struct SoldOutLane {
    api: Arc<CommandApi>,
    /// [`GRAB_ROUTE`] before its `{namespace}` and after its `{name}`.
    prefix: &'static str,
    suffix: &'static str,
    observed: ObservedRoute,
    body_deadline: Duration,
}

/// A request the lane answers: its promotion, over.
pub struct Claim(Closed);

impl SoldOutLane {
    /// The lane in front of a router serving `api` in `layers`; `None`
    /// when the rate limit by IP is on.
    pub fn new(api: Arc<CommandApi>, layers: &Layers) -> Option<Self> {
        if api.ip_rate_limit().is_some() {
            return None;
        }
        let (prefix, suffix) = segments_around(GRAB_ROUTE)?;
        Some(Self {
            api,
            prefix,
            suffix,
            observed: layers.observed(GRAB_ROUTE),
            body_deadline: layers.body_deadline(),
        })
    }

    /// Whether the lane answers `request`: see the module.
    pub fn claim(&self, request: &Request<Incoming>) -> Option<Claim> {
        if request.method() != Method::POST {
            return None;
        }
        let (namespace, name) = promotion_of(self.prefix, self.suffix, request.uri().path())?;
        // A declared length past the limit is the router's 413. The body is
        // read here only when its length is declared (a chunked one is the
        // router's to bound); with the customer in a header it is not read.
        let headers = request.headers();
        let declared = match headers.get(CONTENT_LENGTH) {
            Some(value) => Some(value.to_str().ok()?.parse::<usize>().ok()?),
            None => None,
        };
        if declared.is_some_and(|length| length > MAX_BODY_BYTES) {
            return None;
        }
        if !self.api.customer_from_header()
            && (declared.is_none() || headers.contains_key(TRANSFER_ENCODING))
        {
            return None;
        }
        self.api.closed_with_holders(namespace, name).map(Claim)
    }

    /// The answer to a claimed request: from memory, or from `router` (a
    /// holder's, the body put back).
    pub async fn answer<R, F>(
        &self,
        claim: Claim,
        request: Request<Incoming>,
        router: R,
    ) -> Response
    where
        R: FnOnce(Request<Body>) -> F,
        F: Future<Output = Response>,
    {
        let started = Instant::now();
        let Claim(closed) = claim;
        let Some(holders) = closed.holders().get() else {
            return router(request.map(Body::new)).await;
        };
        if self.api.customer_from_header() {
            return match self
                .api
                .closed_customer(&closed, holders, request.headers(), &[])
            {
                ClosedGrab::MayHold(_) => router(request.map(Body::new)).await,
                ClosedGrab::Answered(answer) => self.observed.answered(answer, started),
            };
        }
        let (parts, body) = request.into_parts();
        let body = match self.read(Body::new(body)).await {
            Ok(body) => body,
            Err(e) => return self.observed.answered(e.into_response(), started),
        };
        match self
            .api
            .closed_customer(&closed, holders, &parts.headers, &body)
        {
            ClosedGrab::MayHold(_) => router(Request::from_parts(parts, Body::from(body))).await,
            ClosedGrab::Answered(answer) => self.observed.answered(answer, started),
        }
    }

    /// The body, within the body deadline ([`ApiError::request_timeout`]
    /// past it, as the router's layers answer); no timer is set when it
    /// has already arrived, as a grab's small body nearly always has.
    async fn read(&self, body: Body) -> Result<Bytes, ApiError> {
        let mut read = pin!(read_body(body));
        if let Poll::Ready(done) =
            std::future::poll_fn(|cx| Poll::Ready(read.as_mut().poll(cx))).await
        {
            return done;
        }
        tokio::time::timeout(self.body_deadline, read)
            .await
            .unwrap_or_else(|_| Err(ApiError::request_timeout()))
    }
}

/// The `{namespace}` and `{name}` of `path` if it is `prefix`, two
/// segments and `suffix`, as the router would match the grab route; `None`
/// for any other path, and for one with a `%` (the router then refuses it
/// with 400).
fn promotion_of<'p>(prefix: &str, suffix: &str, path: &'p str) -> Option<(&'p str, &'p str)> {
    let inner = path.strip_prefix(prefix)?.strip_suffix(suffix)?;
    let (namespace, name) = inner.split_once('/')?;
    let plain = |s: &str| !s.is_empty() && !s.contains(['/', '%']);
    (plain(namespace) && plain(name)).then_some((namespace, name))
}

/// `template` before `{namespace}` and after `{name}`, when it names a
/// promotion by those two adjacent segments.
fn segments_around(template: &'static str) -> Option<(&'static str, &'static str)> {
    template.split_once("{namespace}/{name}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_grab_route_is_split_around_its_promotion_segments() {
        assert_eq!(
            segments_around(GRAB_ROUTE),
            Some(("/api/v1/promotions/", "/grab"))
        );
        assert_eq!(
            segments_around("/api/v1/customers/{customerId}/coupons"),
            None
        );
    }

    #[test]
    fn only_a_plain_two_segment_grab_path_names_a_promotion_for_the_lane() {
        let (prefix, suffix) = segments_around(GRAB_ROUTE).unwrap();
        let of = |path| promotion_of(prefix, suffix, path);
        assert_eq!(
            of("/api/v1/promotions/shop/sale/grab"),
            Some(("shop", "sale"))
        );
        // Left to the router: encoded, missing, extra or empty segments,
        // another route, a trailing slash.
        for path in [
            "/api/v1/promotions/shop/sa%6ce/grab",
            "/api/v1/promotions/sale/grab",
            "/api/v1/promotions/a/shop/sale/grab",
            "/api/v1/promotions//sale/grab",
            "/api/v1/promotions/shop//grab",
            "/api/v1/promotions/shop/sale",
            "/api/v1/promotions/shop/sale/grab/",
            "/api/v1/customers/shop/sale/grab",
        ] {
            assert_eq!(of(path), None, "{path}");
        }
    }
}
