//! Promotions as tests set them up: ids and customers by short names,
//! windows relative to now, and registration through the protocol's own
//! scripts (tests never write the command side by hand).

use chrono::{DateTime, TimeZone, Utc};
use seckill_workers::protocol::{
    self, CustomerId, PromotionId, PromotionSpec, PROMOTION_INDEX_KEY,
};
use seckill_workers::redis_connection::RedisConnection;

/// `shop/<name>`.
pub fn id(name: &str) -> PromotionId {
    PromotionId::new("shop", name).expect("a valid promotion name")
}

/// Customer `c-<n>`.
pub fn customer(n: impl std::fmt::Display) -> CustomerId {
    CustomerId::parse(&format!("c-{n}")).expect("a valid customer id")
}

/// Epoch milliseconds as a time.
pub fn at_ms(ms: i64) -> DateTime<Utc> {
    Utc.timestamp_millis_opt(ms)
        .single()
        .expect("a representable time")
}

/// A spec whose window is [`publish_ms`, `finish_ms`) (epoch ms).
pub fn spec_between(discount: f64, coupons: u64, publish_ms: i64, finish_ms: i64) -> PromotionSpec {
    PromotionSpec {
        discount,
        number_of_coupons: coupons,
        publish_time: at_ms(publish_ms),
        finish_time: at_ms(finish_ms),
    }
}

/// A spec whose window is [now + open_in, now + open_in + length), on this
/// machine's clock.
pub fn spec_from_now(
    discount: f64,
    coupons: u64,
    open_in_ms: i64,
    length_ms: i64,
) -> PromotionSpec {
    let publish = Utc::now().timestamp_millis() + open_in_ms;
    spec_between(discount, coupons, publish, publish + length_ms)
}

/// Adds `id` to the promotion index projectors read, as the operator does.
pub async fn index_for_projectors(con: &mut RedisConnection, id: &PromotionId) {
    let _: () = redis::cmd("SADD")
        .arg(PROMOTION_INDEX_KEY)
        .arg(id.to_string())
        .query_async(con)
        .await
        .expect("SADD to the promotion index");
}

/// Registers `id` with `spec` and indexes it for projectors, as the
/// operator does.
pub async fn register(con: &mut RedisConnection, id: &PromotionId, spec: &PromotionSpec) {
    protocol::schedule(con, id, spec)
        .await
        .expect("schedule answers");
    index_for_projectors(con, id).await;
}

/// Registers `id` with `coupons` coupons at `discount`, open since a second
/// ago for an hour (so `schedule` starts it), and indexes it for projectors.
pub async fn start_promotion(
    con: &mut RedisConnection,
    id: &PromotionId,
    discount: f64,
    coupons: u64,
) {
    let spec = spec_from_now(discount, coupons, -1_000, 3_601_000);
    let snap = protocol::schedule(con, id, &spec)
        .await
        .expect("schedule answers");
    assert!(snap.started, "{snap:?}");
    index_for_projectors(con, id).await;
}

/// [`start_promotion`] of `shop/<name>` at 0.8: the promotion the grab
/// tests sell.
pub async fn open_promotion(con: &mut RedisConnection, name: &str, coupons: u64) -> PromotionId {
    let id = id(name);
    start_promotion(con, &id, 0.8, coupons).await;
    id
}

/// Redis' own clock (`TIME`), epoch ms: the clock every window is judged on.
pub async fn redis_now_ms(con: &mut RedisConnection) -> i64 {
    let (secs, micros): (i64, i64) = redis::cmd("TIME")
        .query_async(con)
        .await
        .expect("TIME answers");
    secs * 1000 + micros / 1000
}

/// Rewrites the window `id` was registered with (the state hash's
/// `publish_ms` and `finish_ms`), as if time had passed: how a test puts a
/// registered promotion on either side of a deadline of Redis' clock without
/// waiting for it.
pub async fn move_window(
    con: &mut RedisConnection,
    id: &PromotionId,
    publish_ms: i64,
    finish_ms: i64,
) {
    let _: () = redis::cmd("HSET")
        .arg(seckill_workers::protocol::PromotionKeys::new(id).state)
        .arg("publish_ms")
        .arg(publish_ms)
        .arg("finish_ms")
        .arg(finish_ms)
        .query_async(con)
        .await
        .expect("HSET of the window");
}
