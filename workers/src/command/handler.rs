//! The grab handler and its state, [`CommandApi`]: what a grab costs, from
//! the cheapest answer to the dearest.
//!
//! 1. By IP, the rate limit runs before the handler (a layer on the route).
//! 2. The request is read and parsed ([`parse_grab`]) and the rate limit by
//!    customer applies.
//! 3. A promotion remembered over answers its prepared 410 at once to
//!    everyone its holders' set says holds nothing (most of the load after
//!    a sale); a promotion remembered unknown is answered from memory.
//! 4. Anything else joins its lane of the group commit ([`GroupCommit`]):
//!    the promotion's one lane, or for a promotion sharded over S shards
//!    (its map read once, [`ShardMaps`]) the lane of the customer's home
//!    shard. Sent at once when no call of that lane is in flight, else with
//!    the next batch: one Redis round trip for the whole batch (a sharded
//!    batch whose home shard is empty also moves stock, see [`sharded`]).
//!
//! The handler never answers 200 unless the grab function said granted or
//! already granted, i.e. the coupon is in the stream.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderName, StatusCode};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use serde::Serialize;

use super::group_commit::{
    BatchCall, BatchFuture, GrabAnswer, GrabFailure, GroupCommit, Home, Sent,
};
use super::holders::{HolderSet, HolderSetBuilder};
use super::memory::{Closed, Known, PromotionMemory};
use super::replica_acks::ReplicaAcks;
use super::request::{grab_customer, parse_grab, GrabRequest};
use super::shard_maps::{Route, ShardMaps};
use super::sharded::{self, Opening};
use crate::http::extract::{read_body, PromotionPath};
use crate::http::{json_response, ApiError, Outcome};
use crate::metrics::{CommandMetrics, RedisMetrics};
use crate::protocol::shards::{self, ShardError};
use crate::protocol::{
    self, Coupon, CustomerId, Durability, FinishReason, GrabOutcome, PromotionId, ScriptError,
};
use crate::rate_limit::{self, ClientLimiter, IpRateLimit, RateLimitArgs, RateLimitKey};
use crate::redis_connection::RedisConnection;

/// How a [`CommandApi`] behaves.
#[derive(Debug, Clone)]
pub struct CommandOptions {
    /// Take the customer id from this header only, ignoring the body.
    pub customer_id_header: Option<HeaderName>,
    /// Bound on one grab round trip; past it the answer is 503.
    pub redis_timeout: Duration,
    /// Answer grants 200 only once replicas hold them ([`ReplicaAcks`] for
    /// an unsharded promotion, `protocol::grab_batch_durable` per step of a
    /// sharded one); `None` is the plain grab.
    pub durability: Option<Durability>,
    /// Most customers in one grab call (group commit); 1 = no batching.
    pub batch_max: usize,
    /// How long a grab of a sharded promotion whose shard's clock has
    /// passed the finish time waits for shard 0's clock to get there too
    /// (`protocol::shards::FINISH_SKEW_WAIT` by default); past it, 503.
    pub finish_skew_wait: Duration,
}

/// The default of `--grab-batch-max`.
pub const DEFAULT_BATCH_MAX: usize = 64;

/// A sharded batch may take several calls (a stock move is two before its
/// customers are answered; the sold-out check 2S - 1 reads, a finish and S -
/// 1 closes), each bounded by the Redis timeout: the batch as a whole gets
/// this many timeouts. Past it the batch is answered 503 (outcome unknown);
/// every step it left half done is completed by whoever meets it next.
pub const SHARDED_BATCH_TIMEOUTS: u32 = 4;

/// The rate limit of the grab path, by what it tells clients apart.
enum GrabRateLimit {
    ByIp {
        limiter: Arc<ClientLimiter<std::net::IpAddr>>,
        trust_forwarded_for: bool,
    },
    ByCustomer(Arc<ClientLimiter<CustomerId>>),
}

/// The grab endpoint's state: the route table mounts [`grab`] with it.
pub struct CommandApi {
    redis: RedisConnection,
    options: CommandOptions,
    group: GroupCommit,
    /// The replica acknowledgements of unsharded durable grabs.
    acks: Option<Arc<ReplicaAcks>>,
    memory: PromotionMemory,
    maps: Arc<ShardMaps>,
    rate_limit: Option<GrabRateLimit>,
    redis_metrics: Option<RedisMetrics>,
    metrics: Option<CommandMetrics>,
}

impl CommandApi {
    pub fn new(redis: RedisConnection, options: CommandOptions) -> Self {
        let maps = Arc::new(ShardMaps::new(options.finish_skew_wait));
        let acks = options
            .durability
            .map(|d| ReplicaAcks::new(redis.clone(), d));
        let group = GroupCommit::new(
            options.batch_max,
            batch_call(&redis, &options, &maps, acks.clone()),
        );
        Self {
            redis,
            options,
            group,
            acks,
            memory: PromotionMemory::default(),
            maps,
            rate_limit: None,
            redis_metrics: None,
            metrics: None,
        }
    }

    /// Limits grabs per client as `args` say (nothing when they turn it
    /// off): a client over its rate is answered 429 with `Retry-After`
    /// before any Redis call. Call within a tokio runtime (see
    /// [`ClientLimiter::new`]).
    pub fn with_rate_limit(mut self, args: &RateLimitArgs) -> Self {
        self.rate_limit = args.quota().map(|quota| match args.rate_limit_key {
            RateLimitKey::Ip => GrabRateLimit::ByIp {
                limiter: ClientLimiter::new(quota),
                trust_forwarded_for: args.trust_forwarded_for,
            },
            RateLimitKey::Customer => GrabRateLimit::ByCustomer(ClientLimiter::new(quota)),
        });
        self
    }

    /// Counts failed Redis calls (operation `grab`), and rate-limited and
    /// unreplicated grabs.
    pub fn with_metrics(mut self, redis: RedisMetrics, command: CommandMetrics) -> Self {
        let observed = command.clone();
        self.maps =
            Arc::new(ShardMaps::new(self.options.finish_skew_wait).observed(command.clone()));
        self.group = GroupCommit::observing(
            self.options.batch_max,
            batch_call(&self.redis, &self.options, &self.maps, self.acks.clone()),
            Arc::new(move |n| observed.batch(n)),
        );
        self.redis_metrics = Some(redis);
        self.metrics = Some(command);
        self
    }

    /// The state of the by-IP rate limit layer of the grab route, when the
    /// limit is by IP.
    pub fn ip_rate_limit(&self) -> Option<Arc<IpRateLimit>> {
        match &self.rate_limit {
            Some(GrabRateLimit::ByIp {
                limiter,
                trust_forwarded_for,
            }) => Some(Arc::new(IpRateLimit {
                limiter: limiter.clone(),
                trust_forwarded_for: *trust_forwarded_for,
                metrics: self.metrics.clone(),
            })),
            _ => None,
        }
    }

    fn by_customer(&self) -> Option<&ClientLimiter<CustomerId>> {
        match &self.rate_limit {
            Some(GrabRateLimit::ByCustomer(limiter)) => Some(limiter),
            _ => None,
        }
    }

    /// Reads and parses the request, then applies the rate limit by
    /// customer. The body is not read when the customer id comes from a
    /// header.
    async fn parse(&self, path: &PromotionPath, request: Request) -> Result<GrabRequest, ApiError> {
        let (headers, body) = self.read(request).await?;
        self.parse_read(path, &headers, &body)
    }

    /// The request's headers and body; the body is not read when the
    /// customer id comes from a header.
    async fn read(&self, request: Request) -> Result<(HeaderMap, Bytes), ApiError> {
        let (parts, body) = request.into_parts();
        let body = match self.options.customer_id_header {
            Some(_) => Bytes::new(),
            None => read_body(body).await?,
        };
        Ok((parts.headers, body))
    }

    /// [`CommandApi::parse`] of a request already read.
    fn parse_read(
        &self,
        path: &PromotionPath,
        headers: &HeaderMap,
        body: &[u8],
    ) -> Result<GrabRequest, ApiError> {
        let header = self.options.customer_id_header.as_ref();
        self.admit(parse_grab(
            path.namespace(),
            path.name(),
            headers,
            body,
            header,
        )?)
    }

    /// Whether a grab read as `headers` and `body` (empty when the
    /// customer comes from a header) may be from a holder of `closed`, a
    /// promotion that is over with its `holders` known. The handler and
    /// the sold-out lane both decide here.
    pub(crate) fn closed_customer(
        &self,
        closed: &Closed,
        holders: &HolderSet,
        headers: &HeaderMap,
        body: &[u8],
    ) -> ClosedGrab {
        let header = self.options.customer_id_header.as_ref();
        match grab_customer(headers, body, header) {
            Ok(customer) if !holders.may_hold(&customer) => ClosedGrab::Answered(closed.response()),
            Ok(customer) => ClosedGrab::MayHold(customer),
            Err(e) => ClosedGrab::Answered(e.into_response()),
        }
    }

    /// Whether grabs take their customer from a header (the body unread).
    pub(crate) fn customer_from_header(&self) -> bool {
        self.options.customer_id_header.is_some()
    }

    /// The promotion `namespace`/`name` if this worker knows it is over
    /// and has its holders loaded: then a grab of it is answered from
    /// memory unless it may be from a holder.
    pub(crate) fn closed_with_holders(&self, namespace: &str, name: &str) -> Option<Closed> {
        match self.memory.get(namespace, name)? {
            Known::Finished(closed) if closed.holders().get().is_some() => Some(closed),
            _ => None,
        }
    }

    /// `grab` past the rate limit by customer (when there is one).
    fn admit(&self, grab: GrabRequest) -> Result<GrabRequest, ApiError> {
        if let Some(limiter) = self.by_customer() {
            limiter.check(&grab.customer).map_err(|wait| {
                rate_limit::refusal(RateLimitKey::Customer, wait, self.metrics.as_ref())
            })?;
        }
        Ok(grab)
    }

    /// The grab through its promotion's group commit, the answer mapped to
    /// HTTP and remembered when it is final.
    async fn grab_in_redis(&self, grab: &GrabRequest) -> Response {
        let GrabRequest {
            promotion,
            customer,
        } = grab;
        let home = match self.home(promotion, customer).await {
            Ok(home) => home,
            Err(response) => return response,
        };
        let outcome = match self.group.grab(promotion, home, customer.clone()).await {
            Ok(outcome) => outcome,
            Err(GrabFailure::Timeout) => {
                return self.redis_failed(
                    "timeout",
                    promotion,
                    format!("no answer within {:?}", self.options.redis_timeout),
                )
            }
            Err(GrabFailure::Store(e)) => return self.store_failed(promotion, &e),
            Err(GrabFailure::NotReplicated(e)) => return self.not_replicated(promotion, &*e),
            Err(GrabFailure::Unconfirmed) => {
                return self
                    .not_replicated(promotion, &"a shard's grant is not on its replicas yet")
            }
            Err(GrabFailure::Closing) => {
                // Left Closing by `shards::grab` only when shard 0's clock
                // stayed behind for longer than the skew wait
                // (--finish-skew-wait-ms).
                if let Some(m) = &self.metrics {
                    m.finish_clock_skew();
                }
                return closing(promotion);
            }
            Err(GrabFailure::Shards(e)) => return self.shards_failed(promotion, &e),
        };
        match outcome {
            GrabOutcome::Granted { coupon, sold_out } => {
                if sold_out {
                    self.over(promotion, FinishReason::SoldOut);
                }
                grabbed(&coupon, false)
            }
            GrabOutcome::AlreadyGranted { coupon } => grabbed(&coupon, true),
            GrabOutcome::UnknownPromotion => {
                self.memory.unknown(promotion);
                unknown(promotion.namespace(), promotion.name())
            }
            GrabOutcome::NotStarted {
                opens_in_ms,
                publish_time,
            } => {
                self.memory.forget_unknown(promotion);
                not_started(promotion, opens_in_ms, &publish_time)
            }
            GrabOutcome::SoldOut => self.over(promotion, FinishReason::SoldOut).response(),
            GrabOutcome::Finished { reason } => self.over(promotion, reason).response(),
        }
    }

    /// The lane of `customer`'s grab of `promotion`: the one lane of an
    /// unsharded promotion, else their home shard's. The map is in memory
    /// after a promotion's first grab; reading it (once, however many grabs
    /// wait for it) is bounded by the Redis timeout.
    async fn home(&self, promotion: &PromotionId, customer: &CustomerId) -> Result<Home, Response> {
        if let Some(route) = self.maps.cached(promotion) {
            return Ok(route.home(customer));
        }
        let mut con = self.redis.clone();
        let read = self.maps.route(&mut con, promotion);
        match tokio::time::timeout(self.options.redis_timeout, read).await {
            Ok(Ok(route)) => Ok(route.home(customer)),
            Ok(Err(e)) => Err(self.shards_failed(promotion, &e)),
            Err(_) => Err(self.redis_failed(
                "timeout",
                promotion,
                format!(
                    "shard map: no answer within {:?}",
                    self.options.redis_timeout
                ),
            )),
        }
    }

    /// The answer to a Redis failure of the whole batch: 503 when Redis did
    /// not answer (outcome unknown), 500 when it answered nonsense.
    fn store_failed(&self, promotion: &PromotionId, e: &ScriptError) -> Response {
        match e {
            ScriptError::Redis(e) => {
                let kind = if e.is_timeout() {
                    "timeout"
                } else {
                    "connection"
                };
                self.redis_failed(kind, promotion, e.to_string())
            }
            e @ ScriptError::BadReply(_) => {
                if let Some(m) = &self.redis_metrics {
                    m.error("grab", "reply");
                }
                tracing::error!(%promotion, error = %e, "grab function answered unexpectedly");
                ApiError::internal(
                    "the coupon store answered unexpectedly, so whether this grab was recorded \
                     is unknown; a retry is safe and answers your coupon if you got one",
                )
                .into_response()
            }
        }
    }

    /// The answer to a sharded batch that failed as a whole. Whatever it
    /// left half done (a stock move) is completed by whoever meets it next,
    /// so every one of these is safe to retry.
    fn shards_failed(&self, promotion: &PromotionId, e: &ShardError) -> Response {
        match e {
            ShardError::Script(e) => self.store_failed(promotion, e),
            // A step (a move's, or the finish's) not on the replicas yet:
            // its customers may have been granted on the master.
            ShardError::NotDurable { .. } => self.not_replicated(promotion, e),
            ShardError::Unknown(0) => {
                self.memory.unknown(promotion);
                unknown(promotion.namespace(), promotion.name())
            }
            // Due on a shard's clock, not yet on shard 0's (skewed clocks).
            ShardError::NotOpen {
                publish_ms, now_ms, ..
            } => {
                let o = Opening::at(*publish_ms, *now_ms);
                not_started(promotion, o.opens_in_ms, &o.publish_time)
            }
            ShardError::Unknown(_)
            | ShardError::StaleMap { .. }
            | ShardError::Map { .. }
            | ShardError::NoSuchShard { .. }
            | ShardError::NotHome { .. }
            | ShardError::NoProgress(_) => {
                tracing::debug!(%promotion, error = %e, "sharded grab to retry");
                ApiError::unavailable(format!(
                    "promotion {promotion} could not take this grab now ({e}); nothing was \
                     granted by it: retry in a moment"
                ))
                .into_response()
            }
        }
    }

    /// Remembers `promotion` over and starts loading its holders (once).
    fn over(&self, promotion: &PromotionId, reason: FinishReason) -> Closed {
        let closed = self.memory.finished(promotion, reason);
        self.load_holders(promotion, &closed);
        closed
    }

    /// Reads the holders of a promotion that is over into its [`Closed`], in
    /// the background, unless they are loaded or being loaded. Meanwhile its
    /// grabs go to Redis, which answers holders and others alike.
    fn load_holders(&self, promotion: &PromotionId, closed: &Closed) {
        let holders = closed.holders().clone();
        if !holders.start_loading() {
            return;
        }
        let mut con = self.redis.clone();
        let promotion = promotion.clone();
        let maps = self.maps.clone();
        tokio::spawn(async move {
            let mut builder = HolderSetBuilder::default();
            let add = |id: &[u8]| builder.add(id);
            // A sharded promotion's holders are in every shard's hash: a set
            // of shard 0's alone would turn the others' holders away.
            let read = match maps.route(&mut con, &promotion).await {
                Ok(Route::Sharded(s)) => shards::holders(&mut con, &s.map, add)
                    .await
                    .map_err(|e| e.to_string()),
                Ok(Route::Unsharded) => protocol::holders(&mut con, &promotion, add)
                    .await
                    .map_err(|e| e.to_string()),
                Err(e) => Err(e.to_string()),
            };
            match read {
                Ok(()) => {
                    let set = builder.build();
                    tracing::info!(%promotion, bytes = set.bytes(), "holders of a finished promotion loaded");
                    holders.loaded(set);
                }
                Err(e) => {
                    tracing::warn!(%promotion, error = %e, "cannot load the holders of a finished promotion; will retry");
                    holders.failed();
                }
            }
        });
    }

    fn redis_failed(
        &self,
        kind: &'static str,
        promotion: &PromotionId,
        detail: String,
    ) -> Response {
        if let Some(m) = &self.redis_metrics {
            m.error("grab", kind);
        }
        // One line per failed request would flood the log during an outage;
        // the redis_errors metric and /readyz tell the story at warn level.
        tracing::debug!(%promotion, kind, error = %detail, "grab failed on Redis");
        ApiError::unavailable(
            "the coupon store did not answer in time, so whether this grab was recorded is \
             unknown; retry in a moment: a retry is safe and answers your coupon if you got one",
        )
        .into_response()
    }

    /// 503 for a grant the master holds but too few replicas confirmed: it
    /// may be lost in a failover, so it is not promised; the retry finds it
    /// (same coupon) or, if a failover lost it, grabs again.
    fn not_replicated(&self, promotion: &PromotionId, e: &dyn std::fmt::Display) -> Response {
        if let Some(m) = &self.metrics {
            m.not_replicated();
        }
        tracing::debug!(%promotion, error = %e, "grant not confirmed by the replicas");
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

/// `POST /api/v1/promotions/{namespace}/{name}/grab`.
pub async fn grab(
    State(api): State<Arc<CommandApi>>,
    path: PromotionPath,
    request: Request,
) -> Response {
    let known = api.memory.get(path.namespace(), path.name());
    // A promotion that is over answers the same 410 to everyone but its
    // holders: the one path a sold-out grab takes once the holders are
    // known is reading the request and one lookup, no Redis.
    if let Some(Known::Finished(closed)) = &known {
        if let Some(holders) = closed.holders().get() {
            // Only the customer is needed to turn most away: the promotion
            // is known (it is in memory) and the rate limit by customer is
            // for what reaches Redis.
            let (headers, body) = match api.read(request).await {
                Ok(read) => read,
                Err(e) => return e.into_response(),
            };
            let customer = match api.closed_customer(closed, holders, &headers, &body) {
                ClosedGrab::MayHold(customer) => customer,
                ClosedGrab::Answered(answer) => return answer,
            };
            let grab = path.id().and_then(|promotion| {
                api.admit(GrabRequest {
                    promotion,
                    customer,
                })
            });
            let grab = match grab {
                Ok(grab) => grab,
                Err(e) => return e.into_response(),
            };
            return Box::pin(api.grab_in_redis(&grab)).await;
        }
    }
    // The rest is boxed: its state (a body read, a Redis call) is large,
    // and the future of every request, sold-out ones included, would
    // otherwise carry it.
    Box::pin(async move {
        let grab = match api.parse(&path, request).await {
            Ok(grab) => grab,
            Err(e) => return e.into_response(),
        };
        match known {
            Some(Known::Unknown { .. }) => unknown(path.namespace(), path.name()),
            // Over, holders not known yet: Redis tells holders from others
            // while they load.
            Some(Known::Finished(closed)) => {
                api.load_holders(&grab.promotion, &closed);
                api.grab_in_redis(&grab).await
            }
            None => api.grab_in_redis(&grab).await,
        }
    })
    .await
}

/// A grab of a promotion that is over, its holders known
/// ([`CommandApi::closed_customer`]).
pub(crate) enum ClosedGrab {
    /// Its customer may hold a coupon: Redis answers.
    MayHold(CustomerId),
    /// Answered from memory: the 410 for anyone who holds none of its
    /// coupons, a client error for a customer that cannot be read.
    Answered(Response),
}

/// What sends one batch: the group commit's call, bounded by the Redis
/// timeout. An unsharded durable batch is answered once replicas
/// acknowledge it ([`ReplicaAcks`], a `WAIT` on a connection of its own),
/// and its lane sends the next batch during that wait. A
/// sharded lane's batch is [`sharded_batch`], boxed apart so that its
/// larger state never weighs on the unsharded batch's future.
fn batch_call(
    redis: &RedisConnection,
    options: &CommandOptions,
    maps: &Arc<ShardMaps>,
    acks: Option<Arc<ReplicaAcks>>,
) -> BatchCall {
    let redis = redis.clone();
    let timeout = options.redis_timeout;
    let durability = options.durability;
    let maps = maps.clone();
    Arc::new(
        move |promotion: PromotionId, home: Home, customers: Vec<CustomerId>| -> BatchFuture {
            let (con, maps) = (redis.clone(), maps.clone());
            if home.is_sharded() {
                let bound = timeout * SHARDED_BATCH_TIMEOUTS;
                return Box::pin(async move {
                    sharded_batch(con, maps, promotion, home, customers, durability, bound)
                        .await
                        .map(Sent::Answered)
                });
            }
            Box::pin(unsharded_batch(
                con,
                maps,
                promotion,
                customers,
                acks.clone(),
                timeout,
            ))
        },
    )
}

/// One batch of an unsharded promotion: one `FCALL`; when durable, its
/// grants are answered once replicas acknowledge them, within the same
/// Redis timeout counted from the call's start.
async fn unsharded_batch(
    mut con: RedisConnection,
    maps: Arc<ShardMaps>,
    promotion: PromotionId,
    customers: Vec<CustomerId>,
    acks: Option<Arc<ReplicaAcks>>,
    timeout: Duration,
) -> Result<Sent, GrabFailure> {
    let deadline = tokio::time::Instant::now() + timeout;
    let call = protocol::grab_batch(&mut con, &promotion, &customers);
    let outcomes = match tokio::time::timeout_at(deadline, call).await {
        Err(_) => return Err(GrabFailure::Timeout),
        Ok(Err(e)) => {
            // Among the nonsense: "this promotion is sharded" (its map was
            // written after this worker read none). Read the map again.
            if matches!(e, ScriptError::BadReply(_)) {
                maps.forget(&promotion);
            }
            return Err(GrabFailure::Store(Arc::new(e)));
        }
        Ok(Ok(outcomes)) => outcomes,
    };
    if let Some(GrabOutcome::UnknownPromotion) = outcomes.first() {
        maps.forget(&promotion);
    }
    match acks {
        // Nothing promised (sold out, not started...): nothing to confirm.
        Some(acks) if outcomes.iter().any(GrabOutcome::promises_coupon) => Ok(Sent::Confirming(
            Box::pin(confirmed(acks, promotion, outcomes, deadline)),
        )),
        _ => Ok(Sent::Answered(outcomes.into_iter().map(Ok).collect())),
    }
}

/// A durable batch's answers: its outcomes once the replicas acknowledged
/// them; a grant that too few did by `deadline`, or whose acknowledgement
/// failed, is a 503 (maybe recorded, retry), never a 200.
async fn confirmed(
    acks: Arc<ReplicaAcks>,
    promotion: PromotionId,
    outcomes: Vec<GrabOutcome>,
    deadline: tokio::time::Instant,
) -> Result<Vec<GrabAnswer>, GrabFailure> {
    let probe = protocol::replication_probe_key(&promotion);
    let acked = match tokio::time::timeout_at(deadline, acks.acked(&probe)).await {
        Ok(Ok(acked)) => acked,
        Ok(Err(e)) => {
            tracing::warn!(%promotion, error = %e, "replica acknowledgement failed");
            0
        }
        Err(_) => 0,
    };
    Ok(protocol::confirmed(outcomes, acked, acks.durability())
        .into_iter()
        .map(|a| a.map_err(|e| GrabFailure::NotReplicated(Arc::new(e))))
        .collect())
}

/// One batch of a sharded lane: the customers of `home`'s shard, served
/// with the promotion's map and shared stock view (see [`sharded`]). A map
/// that turns out wrong (Redis refuses it, or it changed since these
/// customers were placed) is forgotten, so the next grab reads it again.
async fn sharded_batch(
    mut con: RedisConnection,
    maps: Arc<ShardMaps>,
    promotion: PromotionId,
    home: Home,
    customers: Vec<CustomerId>,
    durability: Option<Durability>,
    bound: Duration,
) -> Result<Vec<GrabAnswer>, GrabFailure> {
    let call = async {
        let route = maps
            .route(&mut con, &promotion)
            .await
            .map_err(|e| GrabFailure::Shards(Arc::new(e)))?;
        let recorded = match &route {
            Route::Sharded(s) if s.map.shards() == home.shards => {
                return sharded::grab_batch(&mut con, s, home.shard, &customers, durability).await
            }
            Route::Sharded(s) => s.map.shards(),
            Route::Unsharded => 1,
        };
        Err(GrabFailure::Shards(Arc::new(ShardError::StaleMap {
            shard: home.shard,
            recorded,
            known: home.shards,
        })))
    };
    let result = match tokio::time::timeout(bound, call).await {
        Err(_) => Err(GrabFailure::Timeout),
        Ok(result) => result,
    };
    if let Err(GrabFailure::Shards(e)) = &result {
        if sharded::map_is_wrong(e) {
            maps.forget(&promotion);
        }
    }
    result
}

/// The 200 of a grab: the coupon, and `alreadyGranted: true` when the
/// customer held it before this grab.
fn grabbed(coupon: &Coupon, already_granted: bool) -> Response {
    let mut response = json_response(StatusCode::OK, &grabbed_body(coupon, already_granted));
    response
        .extensions_mut()
        .insert(Outcome(if already_granted {
            "already_granted"
        } else {
            "granted"
        }));
    response
}

/// The body of [`grabbed`], written field by field: the same bytes
/// serde_json writes for the API's `Coupon` (docs/openapi.yaml; a test
/// holds them equal to a serde struct's), without its escaping pass over
/// every key and value. Ids and times need no
/// escape (a customer id is `[A-Za-z0-9._:@-]`), and the pass cost more than
/// the rest of the body (callgrind, docs/BENCHMARKS.md); a value that does
/// need one is still written by serde_json.
fn grabbed_body(coupon: &Coupon, already_granted: bool) -> Bytes {
    // Room for a grab's answer (about 180 bytes) without growing.
    let mut body = Vec::with_capacity(256);
    body.extend_from_slice(br#"{"couponId":"#);
    push_json_str(&mut body, &coupon.coupon_id);
    body.extend_from_slice(br#","customerId":"#);
    push_json_str(&mut body, &coupon.customer_id);
    body.extend_from_slice(br#","promotion":"#);
    push_json_str(&mut body, &coupon.promotion);
    body.extend_from_slice(br#","discount":"#);
    push_json_value(&mut body, &coupon.discount);
    body.extend_from_slice(br#","grantedAt":"#);
    push_json_str(&mut body, &coupon.granted_at);
    if already_granted {
        body.extend_from_slice(br#","alreadyGranted":true"#);
    }
    body.push(b'}');
    Bytes::from(body)
}

/// `s` as a JSON string: quoted as it is when nothing in it needs an escape
/// (what serde_json writes too), else by serde_json. The check folds over
/// every byte without stopping early, which the compiler turns into vector
/// instructions (a byte at a time, it cost more than serde's pass).
fn push_json_str(out: &mut Vec<u8>, s: &str) {
    let needs_escape = s.bytes().fold(false, |needs, b| {
        needs | (b < 0x20) | (b == b'"') | (b == b'\\')
    });
    if !needs_escape {
        out.push(b'"');
        out.extend_from_slice(s.as_bytes());
        out.push(b'"');
    } else {
        push_json_value(out, s);
    }
}

/// `value` as serde_json writes it (a float as `ryu` spells it, `null` when
/// not finite).
fn push_json_value(out: &mut Vec<u8>, value: &(impl Serialize + ?Sized)) {
    // Writing a string or a number into a Vec cannot fail.
    if let Err(e) = serde_json::to_writer(&mut *out, value) {
        tracing::error!(error = %e, "cannot write a JSON value");
        out.extend_from_slice(b"null");
    }
}

/// 409 `not_started`, with a `Retry-After` of the time left.
fn not_started(promotion: &PromotionId, opens_in_ms: u64, publish_time: &str) -> Response {
    ApiError::new(
        StatusCode::CONFLICT,
        "not_started",
        format!("promotion {promotion} opens at {publish_time}, in {opens_in_ms} ms"),
    )
    .retry_after(opens_in_ms.div_ceil(1000).max(1))
    .into_response()
}

/// 503 for a customer whose shard's window ended on its own clock while
/// the promotion's finish is not recorded yet (shard clocks apart): no 410
/// may precede PromotionFinished, and nothing was granted.
fn closing(promotion: &PromotionId) -> Response {
    ApiError::unavailable(format!(
        "promotion {promotion} is closing; retry in a moment for its final answer"
    ))
    .into_response()
}

fn unknown(namespace: &str, name: &str) -> Response {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "unknown_promotion",
        format!("promotion {namespace}/{name} does not exist"),
    )
    .into_response()
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    /// The body of a 200 as the API documents it (docs/openapi.yaml's
    /// `Coupon`), serialized by serde_json: what [`grabbed_body`] must equal.
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

    fn by_serde(coupon: &Coupon, already_granted: bool) -> Vec<u8> {
        serde_json::to_vec(&GrabbedBody {
            coupon_id: &coupon.coupon_id,
            customer_id: &coupon.customer_id,
            promotion: &coupon.promotion,
            discount: coupon.discount,
            granted_at: &coupon.granted_at,
            already_granted,
        })
        .expect("serializable")
    }

    #[test]
    fn a_grant_body_is_the_coupon_in_camel_case_json() {
        let coupon = Coupon {
            coupon_id: "shop/sale#7".into(),
            customer_id: "alice".into(),
            promotion: "shop/sale".into(),
            discount: 0.8,
            granted_at: "2026-12-02T09:00:00.123Z".into(),
        };
        assert_eq!(
            &grabbed_body(&coupon, false)[..],
            br#"{"couponId":"shop/sale#7","customerId":"alice","promotion":"shop/sale","discount":0.8,"grantedAt":"2026-12-02T09:00:00.123Z"}"#
        );
        assert_eq!(
            &grabbed_body(&coupon, true)[..],
            br#"{"couponId":"shop/sale#7","customerId":"alice","promotion":"shop/sale","discount":0.8,"grantedAt":"2026-12-02T09:00:00.123Z","alreadyGranted":true}"#
        );
    }

    proptest! {
        /// Any strings (quotes, backslashes, control and non-ASCII
        /// characters included) and any discount, finite or not: the same
        /// bytes as serde_json's.
        #[test]
        fn a_grant_body_is_what_serde_json_writes(
            coupon_id in any::<String>(),
            customer_id in "[A-Za-z0-9._:@-]{1,20}|.*",
            promotion in any::<String>(),
            discount in prop_oneof![any::<f64>(), Just(f64::NAN), Just(f64::INFINITY), Just(1.0), Just(0.85)],
            granted_at in any::<String>(),
            already_granted in any::<bool>(),
        ) {
            let coupon = Coupon { coupon_id, customer_id, promotion, discount, granted_at };
            let body = grabbed_body(&coupon, already_granted);
            let expected = by_serde(&coupon, already_granted);
            prop_assert_eq!(String::from_utf8_lossy(&body), String::from_utf8_lossy(&expected));
        }
    }
}
