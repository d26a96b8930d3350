//! The read models: what projectors write from the promotion streams and what
//! the query endpoints answer from. Every key comes from
//! [`protocol::read_model`]; every write is idempotent and order-tolerant (see
//! `protocol/lua/project.lua`), because projectors deliver at least once and,
//! across replicas, in any order.
//!
//! | key | holds |
//! |---|---|
//! | `seckill:rm:promotion:{ns/name}` | hash: phase, discount, numberOfCoupons, granted, times, finishReason; a sharded promotion (S > 1) also `shards`, `granted:<i>` per shard, `grantedShards`, `finishedGranted` |
//! | `seckill:rm:coupons:{bucket}` | hash: `<customerId>\|<ns/name>` -> `<seq>:<grantedAtMs>`, the customers of one of 65,536 buckets |
//! | `seckill:rm:layout` | string: the layout version the read models are complete in (`2`) |
//! | `seckill:rm:active` | set: promotion ids believed active (an index; readers filter by phase) |
//! | `seckill:rm:progress` | hash: consumer name -> `lagMs:atMs` (freshness) |
//!
//! On a standalone Redis they live in a logical database of their own
//! (`--redis-read-model-db`, see [`RedisArgs::connect_read_models`]), so a
//! rebuild can build new ones in another database and swap them in
//! ([`swap_databases`]), and drop a whole database at once
//! ([`drop_database`]); sharing the streams' database (a cluster has no
//! other) they are deleted key by key.
//!
//! [`RedisArgs::connect_read_models`]: crate::redis_connection::RedisArgs::connect_read_models

use std::collections::{BTreeMap, HashMap};

use crate::redis_connection::RedisConnection;
use redis::aio::ConnectionLike;
use serde::{Deserialize, Serialize};

use crate::protocol::{
    self, read_model as keys, rfc3339, rfc3339_ms, CustomerId, Event, Phase, PromotionId,
};

/// How long a projector's progress report counts as live; older reports are
/// from a replica that stopped, and are used only when no live one exists.
const PROGRESS_LIVE_MS: i64 = 60_000;

/// A read-model operation failed.
#[derive(Debug, thiserror::Error)]
pub enum ReadModelError {
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("read model holds unexpected data: {0}")]
    BadData(String),
    #[error("the read-model database {db} holds {key:?}, which is not a read model: refusing to empty it (give --redis-read-model-db a database of its own, or empty it yourself)")]
    ForeignKey { db: i64, key: String },
}

/// `GET /api/v1/promotions/{ns}/{name}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PromotionView {
    pub promotion: String,
    pub phase: Phase,
    pub discount: f64,
    pub number_of_coupons: u64,
    pub granted: u64,
    pub remaining: u64,
    pub publish_time: String,
    pub finish_time: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finish_reason: Option<String>,
    /// How many stock shards the promotion has (1: unsharded); `granted` is
    /// already the sum over them.
    #[serde(default = "one_shard")]
    pub shards: u32,
}

fn one_shard() -> u32 {
    1
}

/// Which stream of its promotion a batch of events was read from: shard
/// `shard` of `shards`. An unsharded promotion (S = 1) has one stream,
/// [`ShardStream::UNSHARDED`], projected exactly as before sharding existed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ShardStream {
    pub shard: u32,
    pub shards: u32,
}

impl ShardStream {
    /// The one stream of an unsharded promotion.
    pub const UNSHARDED: Self = Self {
        shard: 0,
        shards: 1,
    };

    pub fn is_sharded(&self) -> bool {
        self.shards > 1
    }
}

/// One item of `GET /api/v1/promotions`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ActivePromotion {
    pub promotion: String,
    pub discount: f64,
    pub number_of_coupons: u64,
    pub publish_time: String,
    pub finish_time: String,
}

/// One item of `GET /api/v1/customers/{customerId}/coupons`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CustomerCoupon {
    pub coupon_id: String,
    pub promotion: String,
    pub discount: f64,
    pub granted_at: String,
}

/// Why an event that decoded cannot be projected (it is skipped like an
/// undecodable one: counted, logged, left pending).
#[derive(Debug, thiserror::Error)]
pub enum ProjectionError {
    #[error("couponId {0:?} does not end in #N")]
    CouponSequence(String),
    #[error("customerId {0:?} is invalid: {1}")]
    Customer(String, protocol::IdError),
    /// A grab in a sharded promotion's stream without its shard's count:
    /// it cannot be counted (coupon numbers are not in arrival order there).
    #[error("grab {0:?} in a stream of a sharded promotion has no shardGranted")]
    NoShardCount(String),
}

impl ProjectionError {
    /// A short label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::CouponSequence(_) => "bad_coupon_id",
            Self::Customer(..) => "bad_customer_id",
            Self::NoShardCount(_) => "no_shard_granted",
        }
    }
}

/// The sequence number N of a couponId `ns/name#N`: how many coupons of the
/// promotion had been granted when this one was.
pub fn coupon_sequence(coupon_id: &str) -> Option<u64> {
    coupon_id.rsplit_once('#')?.1.parse().ok()
}

/// Checks that `event` can be projected, before anything is written.
pub fn check(event: &Event) -> Result<(), ProjectionError> {
    if let Event::CouponGrabbed(g) = event {
        coupon_sequence(&g.coupon_id)
            .ok_or_else(|| ProjectionError::CouponSequence(g.coupon_id.clone()))?;
        CustomerId::parse(&g.customer_id)
            .map_err(|e| ProjectionError::Customer(g.customer_id.clone(), e))?;
    }
    Ok(())
}

/// [`check`], for an event read from `stream`: a sharded promotion's grab
/// must carry its shard's count.
pub fn check_in(event: &Event, stream: ShardStream) -> Result<(), ProjectionError> {
    check(event)?;
    match event {
        Event::CouponGrabbed(g) if stream.is_sharded() && g.shard_granted.is_none() => {
            Err(ProjectionError::NoShardCount(g.coupon_id.clone()))
        }
        _ => Ok(()),
    }
}

/// The `project` script call of `event` on the promotion's read model (one
/// key, so one cluster slot), as a plain EVALSHA so that it can travel in
/// the same round trip as the customer writes; a NOSCRIPT answer is handled
/// by [`apply_to_models`]. Events must have passed [`check`].
fn projection_call(rm: &str, promotion: &str, stream: ShardStream, event: &Event) -> redis::Cmd {
    let mut call = redis::cmd("EVALSHA");
    call.arg(protocol::PROJECT.get_hash())
        .arg(1)
        .arg(rm)
        .arg(event.type_name());
    match event {
        Event::PromotionStarted(s) => {
            call.arg(promotion)
                .arg(s.discount.to_string())
                .arg(s.number_of_coupons)
                .arg(rfc3339(&s.publish_time))
                .arg(rfc3339(&s.finish_time))
                .arg(s.started_at.as_ref().map(rfc3339).unwrap_or_default());
            // S from the event, or from the map the stream was found by.
            let shards = s
                .shards
                .or(stream.is_sharded().then_some(stream.shards))
                .filter(|s| *s > 1);
            if let Some(shards) = shards {
                call.arg(shards);
            }
        }
        Event::CouponGrabbed(g) => {
            call.arg(promotion)
                .arg(coupon_sequence(&g.coupon_id).unwrap_or(0))
                .arg(g.discount.map(|d| d.to_string()).unwrap_or_default());
        }
        Event::PromotionFinished(f) => {
            call.arg(promotion)
                .arg(f.reason.as_str())
                .arg(f.granted)
                .arg(f.finished_at.as_ref().map(rfc3339).unwrap_or_default());
            if stream.is_sharded() {
                call.arg("sharded");
            }
        }
    }
    call
}

/// The `project` script call counting a batch of shard `stream.shard`'s
/// grabs: its highest `shardGranted` (the shard's count only rises, so the
/// highest of a batch says all the batch says).
fn shard_grabs_call(rm: &str, promotion: &str, stream: ShardStream, highest: u64) -> redis::Cmd {
    let mut call = redis::cmd("EVALSHA");
    call.arg(protocol::PROJECT.get_hash())
        .arg(1)
        .arg(rm)
        .arg("ShardGrabs")
        .arg(promotion)
        .arg(stream.shard)
        .arg(highest);
    call
}

/// The customers' coupon writes of a batch of `promotion`'s events: one
/// HSET per bucket touched, field `<customerId>|<ns/name>`, value
/// `<seq>:<grantedAtMs>` (the same for a version 1 and a version 2 grab, so
/// a stream holding both replays to one read model). A coupon never
/// changes, so writing it again is harmless: idempotent, order-tolerant.
fn coupon_writes(promotion: &str, events: &[Event]) -> Vec<redis::Cmd> {
    let mut buckets: HashMap<u32, redis::Cmd> = HashMap::new();
    for event in events {
        let Event::CouponGrabbed(g) = event else {
            continue;
        };
        let (Ok(customer), Some(seq)) = (
            CustomerId::parse(&g.customer_id),
            coupon_sequence(&g.coupon_id),
        ) else {
            continue;
        };
        let bucket = keys::coupon_bucket(&customer);
        let held = keys::HeldCoupon {
            seq,
            granted_at_ms: g.granted_at.timestamp_millis(),
        };
        buckets
            .entry(bucket)
            .or_insert_with(|| {
                let mut cmd = redis::cmd("HSET");
                cmd.arg(keys::coupon_bucket_key(bucket));
                cmd
            })
            .arg(keys::coupon_field(customer.as_str(), promotion))
            .arg(held.encode());
    }
    buckets.into_values().collect()
}

fn is_noscript(e: &redis::RedisError) -> bool {
    e.code() == Some("NOSCRIPT")
}

/// Applies `events` (all of `promotion`, each passed [`check`]) to the read
/// models in one round trip, then updates the active index from the phase
/// the read model reached. Idempotent and order-tolerant; returns that phase
/// (`None` for an empty batch).
pub async fn apply(
    con: &mut RedisConnection,
    promotion: &PromotionId,
    events: &[Event],
) -> Result<Option<Phase>, ReadModelError> {
    apply_stream(con, promotion, ShardStream::UNSHARDED, events).await
}

/// [`apply`] of events read from `stream` (each passed [`check_in`]).
pub async fn apply_stream(
    con: &mut RedisConnection,
    promotion: &PromotionId,
    stream: ShardStream,
    events: &[Event],
) -> Result<Option<Phase>, ReadModelError> {
    let phase = apply_stream_to_models(con, promotion, stream, events).await?;
    if let Some(phase) = phase {
        index_phase(con, promotion, phase).await?;
    }
    Ok(phase)
}

/// The write part of [`apply`], without the active index: the customers'
/// coupons and the promotion's read model, all in one round trip (one
/// pipeline on a standalone Redis; on a cluster, one command per key sent
/// together). Returns the phase the promotion's read model reached.
pub async fn apply_to_models(
    con: &mut RedisConnection,
    promotion: &PromotionId,
    events: &[Event],
) -> Result<Option<Phase>, ReadModelError> {
    apply_stream_to_models(con, promotion, ShardStream::UNSHARDED, events).await
}

/// [`apply_to_models`] of events read from `stream` (each passed
/// [`check_in`]). For a sharded promotion's stream the batch's grabs are
/// counted by their shard's `shardGranted` (see `lua/project.lua`); the
/// customers' coupons are written as for any grab.
pub async fn apply_stream_to_models(
    con: &mut RedisConnection,
    promotion: &PromotionId,
    stream: ShardStream,
    events: &[Event],
) -> Result<Option<Phase>, ReadModelError> {
    if events.is_empty() {
        return Ok(None);
    }
    let id = promotion.to_string();
    let rm = keys::promotion(promotion);
    // The promotion's read model: granted is the highest coupon number seen
    // (unsharded) or the shard's highest count, so of a batch's grabs only
    // the highest needs the script; a start and a finish are applied as
    // they are. The result equals applying them all.
    let shard_count = if stream.is_sharded() {
        events
            .iter()
            .filter_map(|e| match e {
                Event::CouponGrabbed(g) => g.shard_granted,
                _ => None,
            })
            .max()
            .map(|n| shard_grabs_call(&rm, &id, stream, n))
    } else {
        events
            .iter()
            .filter_map(|e| match e {
                Event::CouponGrabbed(g) => coupon_sequence(&g.coupon_id).map(|n| (n, e)),
                _ => None,
            })
            .max_by_key(|(n, _)| *n)
            .map(|(_, e)| projection_call(&rm, &id, stream, e))
    };
    let scripted: Vec<redis::Cmd> = events
        .iter()
        .filter(|e| !matches!(e, Event::CouponGrabbed(_)))
        .map(|e| projection_call(&rm, &id, stream, e))
        .chain(shard_count)
        .collect();
    // Customer writes first (one per bucket), then the script calls.
    let commands = || -> Vec<redis::Cmd> {
        coupon_writes(&id, events)
            .into_iter()
            .chain(scripted.iter().cloned())
            .collect()
    };
    let answers: Vec<redis::Value> = match con.query_each(commands()).await {
        Ok(a) => a,
        Err(e) if is_noscript(&e) => {
            // Redis restarted and lost its script cache: load, then redo the
            // whole batch (every write in it is idempotent).
            protocol::PROJECT.prepare_invoke().load_async(con).await?;
            con.query_each(commands()).await?
        }
        Err(e) => return Err(e.into()),
    };
    let scripts_from = answers.len().saturating_sub(scripted.len());
    // Phases only rise, so the highest answer is the phase after the batch.
    // Not the last one: on a cluster the calls go out concurrently, and two
    // calls on the promotion's key (a Finished and the batch's count) may run
    // in either order, the later-sent one answering the lower phase.
    let phases: Option<Vec<Phase>> = answers[scripts_from..]
        .iter()
        .map(|p| match p {
            redis::Value::BulkString(b) => std::str::from_utf8(b).ok().and_then(Phase::parse),
            redis::Value::SimpleString(s) => Phase::parse(s),
            _ => None,
        })
        .collect();
    let phase = phases.and_then(|p| p.into_iter().max()).ok_or_else(|| {
        ReadModelError::BadData(format!("project answered {:?}", &answers[scripts_from..]))
    })?;
    Ok(Some(phase))
}

/// Keeps the active index in line with `phase`: an active promotion is in
/// it, a finished one is not.
pub async fn index_phase(
    con: &mut RedisConnection,
    promotion: &PromotionId,
    phase: Phase,
) -> Result<(), ReadModelError> {
    let id = promotion.to_string();
    match phase {
        Phase::Active => {
            redis::cmd("SADD")
                .arg(keys::ACTIVE)
                .arg(&id)
                .exec_async(con)
                .await?;
            // Another replica may have applied the finish (and removed the
            // id) between our apply and this SADD: look again, so the index
            // never keeps a finished promotion. Its SREM follows its finish,
            // our check follows our SADD, so one of the two removes it.
            let now: Option<String> = redis::cmd("HGET")
                .arg(keys::promotion(promotion))
                .arg("phase")
                .query_async(con)
                .await?;
            if now.as_deref().and_then(Phase::parse) == Some(Phase::Finished) {
                redis::cmd("SREM")
                    .arg(keys::ACTIVE)
                    .arg(&id)
                    .exec_async(con)
                    .await?
            }
        }
        Phase::Finished => {
            redis::cmd("SREM")
                .arg(keys::ACTIVE)
                .arg(&id)
                .exec_async(con)
                .await?
        }
        Phase::Pending => {}
    }
    Ok(())
}

fn field<'a>(map: &'a HashMap<String, String>, name: &str) -> Option<&'a str> {
    map.get(name).map(String::as_str)
}

/// Builds the view from a read-model hash; `None` while the promotion's
/// PromotionStarted has not been projected (its spec is unknown), which is
/// also the case of a promotion deleted before it ever started.
fn view_of(map: &HashMap<String, String>) -> Option<PromotionView> {
    let number_of_coupons: u64 = field(map, "numberOfCoupons")?.parse().ok()?;
    let granted: u64 = field(map, "granted")
        .and_then(|g| g.parse().ok())
        .unwrap_or(0);
    let phase = field(map, "phase").and_then(Phase::parse)?;
    let shards = field(map, "shards")
        .and_then(|s| s.parse().ok())
        .unwrap_or(1);
    Some(PromotionView {
        promotion: field(map, "promotion")?.to_owned(),
        phase,
        discount: field(map, "discount")?.parse().ok()?,
        number_of_coupons,
        granted,
        remaining: number_of_coupons.saturating_sub(granted),
        publish_time: field(map, "publishTime")?.to_owned(),
        finish_time: field(map, "finishTime")?.to_owned(),
        finish_reason: if phase == Phase::Finished {
            field(map, "finishReason").map(str::to_owned)
        } else {
            None
        },
        shards,
    })
}

/// The read model of one promotion, or `None` when it is not (yet) known.
pub async fn promotion<C: ConnectionLike>(
    con: &mut C,
    id: &PromotionId,
) -> Result<Option<PromotionView>, ReadModelError> {
    let map: HashMap<String, String> = redis::cmd("HGETALL")
        .arg(keys::promotion(id))
        .query_async(con)
        .await?;
    Ok(view_of(&map))
}

/// The active promotions, sorted by id. The active set is only an index that
/// may briefly hold a finished promotion (two replicas racing); the phase in
/// each promotion's hash decides.
pub async fn active_promotions(
    con: &mut RedisConnection,
) -> Result<Vec<ActivePromotion>, ReadModelError> {
    let mut ids: Vec<String> = redis::cmd("SMEMBERS")
        .arg(keys::ACTIVE)
        .query_async(con)
        .await?;
    ids.sort();
    let ids: Vec<PromotionId> = ids
        .iter()
        .filter_map(|i| PromotionId::parse(i).ok())
        .collect();
    if ids.is_empty() {
        return Ok(Vec::new());
    }
    let commands = ids
        .iter()
        .map(|id| {
            let mut cmd = redis::cmd("HGETALL");
            cmd.arg(keys::promotion(id));
            cmd
        })
        .collect();
    let maps: Vec<HashMap<String, String>> = con.query_each(commands).await?;
    Ok(maps
        .iter()
        .filter_map(view_of)
        .filter(|v| v.phase == Phase::Active)
        .map(|v| ActivePromotion {
            promotion: v.promotion,
            discount: v.discount,
            number_of_coupons: v.number_of_coupons,
            publish_time: v.publish_time,
            finish_time: v.finish_time,
        })
        .collect())
}

/// HSCAN of the coupon fields of a customer in its bucket, from `cursor`
/// (a listpack bucket answers in one page).
fn coupon_scan(bucket: &str, pattern: &str, cursor: u64) -> redis::Cmd {
    let mut cmd = redis::cmd("HSCAN");
    cmd.arg(bucket)
        .arg(cursor)
        .arg("MATCH")
        .arg(pattern)
        .arg("COUNT")
        .arg(1000);
    cmd
}

/// The coupons `customer` holds, sorted by promotion: its fields in its
/// bucket (HSCAN MATCH `<customerId>|*`), each with its promotion's
/// discount from the promotion's read model. A coupon whose promotion's
/// start is not projected yet (replicas apply in any order) is left out
/// until it is: its discount is not known.
///
/// While the layout marker is missing (an upgrade from the version 1
/// layout that has not replayed every stream yet), the customer's version 1
/// key is read too, so customers never see less than before the upgrade.
pub async fn customer_coupons(
    con: &mut RedisConnection,
    customer: &CustomerId,
) -> Result<Vec<CustomerCoupon>, ReadModelError> {
    let bucket = keys::customer_coupons(customer);
    let pattern = keys::coupon_field_pattern(customer);
    let mut layout = redis::cmd("GET");
    layout.arg(keys::LAYOUT);
    let mut answers: Vec<redis::Value> = con
        .query_each(vec![coupon_scan(&bucket, &pattern, 0), layout])
        .await?;
    let layout: Option<String> = redis::from_redis_value(answers.pop().unwrap_or_default())
        .map_err(redis::RedisError::from)?;
    let (mut cursor, mut fields): (u64, Vec<(String, String)>) =
        redis::from_redis_value(answers.pop().unwrap_or_default())
            .map_err(redis::RedisError::from)?;
    while cursor != 0 {
        let (next, more): (u64, Vec<(String, String)>) = coupon_scan(&bucket, &pattern, cursor)
            .query_async(con)
            .await?;
        fields.extend(more);
        cursor = next;
    }
    let mut held: BTreeMap<PromotionId, keys::HeldCoupon> = BTreeMap::new();
    for (field, value) in &fields {
        let Some(promotion) = keys::promotion_of_field(customer, field) else {
            continue;
        };
        let promotion = PromotionId::parse(promotion)
            .map_err(|e| ReadModelError::BadData(format!("coupon field {field:?}: {e}")))?;
        let coupon = keys::HeldCoupon::parse(value)
            .ok_or_else(|| ReadModelError::BadData(format!("coupon {field:?} = {value:?}")))?;
        held.insert(promotion, coupon);
    }
    let mut coupons = Vec::with_capacity(held.len());
    if !held.is_empty() {
        let discounts: Vec<Option<f64>> = con
            .query_each(
                held.keys()
                    .map(|id| {
                        let mut cmd = redis::cmd("HGET");
                        cmd.arg(keys::promotion(id)).arg("discount");
                        cmd
                    })
                    .collect(),
            )
            .await?;
        for ((id, coupon), discount) in held.iter().zip(discounts) {
            let (Some(discount), Some(granted_at)) = (discount, rfc3339_ms(coupon.granted_at_ms))
            else {
                continue;
            };
            let promotion = id.to_string();
            coupons.push(CustomerCoupon {
                coupon_id: protocol::coupon_id(&promotion, coupon.seq),
                promotion,
                discount,
                granted_at,
            });
        }
    }
    if layout.as_deref() != Some(keys::LAYOUT_VERSION) {
        let legacy: HashMap<String, String> = redis::cmd("HGETALL")
            .arg(keys::legacy_customer_coupons(customer))
            .query_async(con)
            .await?;
        for json in legacy.values() {
            let coupon = serde_json::from_str::<CustomerCoupon>(json)
                .map_err(|e| ReadModelError::BadData(format!("coupon {json:?}: {e}")))?;
            if !coupons.iter().any(|c| c.promotion == coupon.promotion) {
                coupons.push(coupon);
            }
        }
    }
    coupons.sort_by(|a, b| a.promotion.cmp(&b.promotion));
    Ok(coupons)
}

/// Whether the read models are complete in this layout (the marker a
/// rebuild or the upgrade writes, see [`keys::LAYOUT`]).
pub async fn layout_complete<C: ConnectionLike>(con: &mut C) -> Result<bool, ReadModelError> {
    let layout: Option<String> = redis::cmd("GET").arg(keys::LAYOUT).query_async(con).await?;
    Ok(layout.as_deref() == Some(keys::LAYOUT_VERSION))
}

/// Marks the read models complete in this layout.
pub async fn mark_layout_complete<C: ConnectionLike>(con: &mut C) -> Result<(), ReadModelError> {
    redis::cmd("SET")
        .arg(keys::LAYOUT)
        .arg(keys::LAYOUT_VERSION)
        .exec_async(con)
        .await?;
    Ok(())
}

/// Records that projector `consumer` was, at Redis time `at_ms`, `lag_ms`
/// behind the streams (0 when it found nothing left to apply); a command to
/// send along with the acknowledgements.
pub fn progress_write(consumer: &str, lag_ms: i64, at_ms: i64) -> redis::Cmd {
    let mut cmd = redis::cmd("HSET");
    cmd.arg(keys::PROGRESS)
        .arg(consumer)
        .arg(format!("{}:{at_ms}", lag_ms.max(0)));
    cmd
}

/// Removes the progress report of a projector that stops cleanly.
pub async fn forget_progress<C: ConnectionLike>(
    con: &mut C,
    consumer: &str,
) -> Result<(), ReadModelError> {
    redis::cmd("HDEL")
        .arg(keys::PROGRESS)
        .arg(consumer)
        .exec_async(con)
        .await?;
    Ok(())
}

/// How stale the read models may be, in milliseconds, from the progress
/// reports: for each projector, the lag it last reported plus the time since
/// it reported; the worst live projector counts (or, when none reported in
/// the last minute, the freshest stale one). `None` when no projector ever
/// reported.
pub fn lag_from_reports(reports: &HashMap<String, String>, now_ms: i64) -> Option<i64> {
    let lags: Vec<(i64, i64)> = reports
        .values()
        .filter_map(|v| {
            let (lag, at) = v.split_once(':')?;
            let (lag, at): (i64, i64) = (lag.parse().ok()?, at.parse().ok()?);
            Some((lag + (now_ms - at).max(0), at))
        })
        .collect();
    let live = lags
        .iter()
        .filter(|(_, at)| now_ms - at <= PROGRESS_LIVE_MS)
        .map(|(lag, _)| *lag)
        .max();
    live.or_else(|| lags.iter().map(|(lag, _)| *lag).min())
}

/// The current projection lag (see [`lag_from_reports`]).
pub async fn projection_lag_ms<C: ConnectionLike>(
    con: &mut C,
) -> Result<Option<i64>, ReadModelError> {
    let (reports, (secs, micros)): (HashMap<String, String>, (i64, i64)) = redis::pipe()
        .hgetall(keys::PROGRESS)
        .cmd("TIME")
        .query_async(con)
        .await?;
    Ok(lag_from_reports(&reports, secs * 1000 + micros / 1000))
}

/// Keys of the read-model database looked at before it is emptied: one SCAN
/// page and this many RANDOMKEYs.
const FOREIGN_KEY_SAMPLE: usize = 16;

/// Looks at a sample of the keys of a database meant for read models only
/// (one SCAN page and `FOREIGN_KEY_SAMPLE` RANDOMKEYs) and fails, naming
/// it, on the first key that is not a read model: FLUSHDB or SWAPDB would
/// turn that misconfiguration into data loss. A sample cannot prove there is
/// none; the flags' help says these databases are given to nothing else.
pub async fn ensure_only_read_models(con: &mut RedisConnection) -> Result<(), ReadModelError> {
    let (_, mut keys_seen): (u64, Vec<String>) = redis::cmd("SCAN")
        .arg(0)
        .arg("COUNT")
        .arg(1000)
        .query_async(con)
        .await?;
    let mut random = redis::pipe();
    for _ in 0..FOREIGN_KEY_SAMPLE {
        random.cmd("RANDOMKEY");
    }
    let random: Vec<Option<String>> = random.query_async(con).await?;
    keys_seen.extend(random.into_iter().flatten());
    match keys_seen.into_iter().find(|k| !k.starts_with(keys::PREFIX)) {
        Some(key) => Err(ReadModelError::ForeignKey {
            db: con.get_db(),
            key,
        }),
        None => Ok(()),
    }
}

/// Empties the read models' own database (a standalone server's
/// `--redis-read-model-db`) with one FLUSHDB ASYNC: Redis hands the keys to a
/// background thread, so this costs its main thread next to nothing however
/// many customers there are, where deleting them key by key costs a few
/// microseconds each. Returns how many keys the database held.
///
/// Refused, naming a key, when [`ensure_only_read_models`] finds one that
/// is not a read model. When the ACL user may not run FLUSHDB
/// (`-@dangerous`), the keys are deleted one SCAN page at a time instead.
pub async fn drop_database(con: &mut RedisConnection) -> Result<u64, ReadModelError> {
    ensure_only_read_models(con).await?;
    let flushed: redis::RedisResult<(u64, ())> = redis::pipe()
        .atomic()
        .cmd("DBSIZE")
        .cmd("FLUSHDB")
        .arg("ASYNC")
        .query_async(con)
        .await;
    match flushed {
        Ok((size, ())) => Ok(size),
        Err(e) if matches!(e.code(), Some("NOPERM") | Some("EXECABORT")) => {
            tracing::warn!(error = %e, "FLUSHDB is not allowed; deleting the read models key by key");
            drop_all_scanned(con).await
        }
        Err(e) => Err(e.into()),
    }
}

/// Whether this connection's user may swap databases (SWAPDB is in
/// `@dangerous`, which ACL users are often denied): swapping a database with
/// itself changes nothing and is refused exactly when the user may not.
pub async fn may_swap_databases(con: &mut RedisConnection) -> Result<bool, ReadModelError> {
    let db = con.get_db();
    let probe: redis::RedisResult<()> = redis::cmd("SWAPDB").arg(db).arg(db).query_async(con).await;
    match probe {
        Ok(()) => Ok(true),
        Err(e) if e.code() == Some("NOPERM") => Ok(false),
        Err(e) => Err(e.into()),
    }
}

/// Swaps the read models' database (`models`) with `built`, in which a
/// rebuild wrote them: one atomic step, after which every reader of the
/// read models' database sees the rebuilt ones and `built` holds the old.
pub async fn swap_databases(
    models: &mut RedisConnection,
    built: &RedisConnection,
) -> Result<(), ReadModelError> {
    redis::cmd("SWAPDB")
        .arg(models.get_db())
        .arg(built.get_db())
        .exec_async(models)
        .await?;
    Ok(())
}

/// Deletes every read-model key (`seckill:rm:*`) of a standalone server,
/// SCANning so the server is never blocked; returns how many were deleted.
pub async fn drop_all_scanned(con: &mut RedisConnection) -> Result<u64, ReadModelError> {
    let pattern = format!("{}*", keys::PREFIX);
    let mut cursor: u64 = 0;
    let mut dropped = 0;
    loop {
        let (next, batch): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(&pattern)
            .arg("COUNT")
            .arg(10_000)
            .query_async(con)
            .await?;
        // One UNLINK per page: a standalone server takes many keys at once.
        if !batch.is_empty() {
            let n: u64 = redis::cmd("UNLINK").arg(&batch).query_async(con).await?;
            dropped += n;
        }
        if next == 0 {
            return Ok(dropped);
        }
        cursor = next;
    }
}

/// Deletes the given keys (one command each, so a cluster routes them by slot).
pub async fn drop_keys(
    con: &mut RedisConnection,
    keys_to_drop: &[String],
) -> Result<u64, ReadModelError> {
    if keys_to_drop.is_empty() {
        return Ok(0);
    }
    let commands = keys_to_drop
        .iter()
        .map(|key| {
            let mut cmd = redis::cmd("UNLINK");
            cmd.arg(key);
            cmd
        })
        .collect();
    let counts: Vec<u64> = con.query_each(commands).await?;
    Ok(counts.iter().sum())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grab(shard_granted: Option<u64>) -> Event {
        Event::CouponGrabbed(protocol::CouponGrabbed {
            coupon_id: "a/b#7".into(),
            promotion: "a/b".into(),
            customer_id: "c".into(),
            discount: None,
            granted_at: chrono::DateTime::from_timestamp_millis(1).unwrap_or_default(),
            shard_granted,
        })
    }

    #[test]
    fn a_grab_of_a_sharded_stream_needs_its_shards_count_and_an_unsharded_one_does_not() {
        let sharded = ShardStream {
            shard: 2,
            shards: 3,
        };
        assert_eq!(
            check_in(&grab(None), sharded).unwrap_err().kind(),
            "no_shard_granted"
        );
        assert!(check_in(&grab(Some(4)), sharded).is_ok());
        assert!(check_in(&grab(None), ShardStream::UNSHARDED).is_ok());
    }

    fn hash(fields: &[(&str, &str)]) -> HashMap<String, String> {
        fields
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn the_view_shows_the_summed_granted_the_rest_remaining_and_how_many_shards() {
        let base = [
            ("promotion", "a/b"),
            ("phase", "Active"),
            ("discount", "0.5"),
            ("numberOfCoupons", "300"),
            ("publishTime", "2026-12-01T10:00:00.000Z"),
            ("finishTime", "2026-12-01T11:00:00.000Z"),
        ];
        let unsharded = view_of(&hash(&[&base[..], &[("granted", "12")]].concat())).unwrap();
        assert_eq!(
            (unsharded.granted, unsharded.remaining, unsharded.shards),
            (12, 288, 1)
        );
        let sharded = view_of(&hash(
            &[
                &base[..],
                &[
                    ("granted", "120"),
                    ("granted:0", "100"),
                    ("granted:1", "15"),
                    ("granted:2", "5"),
                    ("grantedShards", "120"),
                    ("shards", "3"),
                ],
            ]
            .concat(),
        ))
        .unwrap();
        assert_eq!(
            (sharded.granted, sharded.remaining, sharded.shards),
            (120, 180, 3)
        );
        let json = serde_json::to_value(&sharded).unwrap();
        assert_eq!(json["shards"], 3);
        assert_eq!(json["granted"], 120);
    }
}
