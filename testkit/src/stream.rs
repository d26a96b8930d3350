//! Reading a promotion's stream, the source of truth every test checks its
//! answers against: every entry decoded ([`stream_events`]), sorted into
//! [`StreamFacts`], and the projector group's pending entries.

use std::collections::{HashMap, HashSet};

use redis::streams::{StreamId, StreamRangeReply};
use seckill_workers::protocol::{
    grab_entry, CouponGrabbed, Event, PromotionFinished, PromotionId, PromotionKeys,
    PromotionStarted, EVENT_FIELD, PROJECTOR_GROUP,
};
use seckill_workers::read_model::coupon_sequence;
use seckill_workers::redis_connection::RedisConnection;

/// Every entry of `id`'s stream (XRANGE - +).
pub async fn stream_entries(con: &mut RedisConnection, id: &PromotionId) -> Vec<StreamId> {
    let page: StreamRangeReply = redis::cmd("XRANGE")
        .arg(PromotionKeys::new(id).events)
        .arg("-")
        .arg("+")
        .query_async(con)
        .await
        .expect("XRANGE answers");
    page.ids
}

/// The field names of `fields`, sorted.
fn sorted_names(fields: &[(&'static str, String)]) -> Vec<&'static str> {
    let mut names: Vec<&str> = fields.iter().map(|(name, _)| *name).collect();
    names.sort_unstable();
    names
}

/// Every event of `id`'s stream with its entry id, in stream order (the
/// grants of a version 3 CouponGrabbed entry share its id, in coupon
/// order). Each entry holds either the event field only (version 1 JSON)
/// or exactly the fields of a version 3 (or, written by an earlier
/// release, version 2) grab, and every entry decodes (by the protocol's own
/// decoder, as projectors do).
pub async fn stream_events(con: &mut RedisConnection, id: &PromotionId) -> Vec<(String, Event)> {
    let v3 = sorted_names(&grab_entry::fields(&["c"], 1, 0));
    let v2 = sorted_names(&grab_entry::fields_v2("c", 1, 0));
    stream_entries(con, id)
        .await
        .iter()
        .flat_map(|entry| {
            let mut names: Vec<&str> = entry.map.keys().map(String::as_str).collect();
            names.sort_unstable();
            assert!(
                names == [EVENT_FIELD] || names == v3 || names == v2,
                "unexpected fields {names:?} in {entry:?}"
            );
            let fields: Vec<(&[u8], Vec<u8>)> = entry
                .map
                .iter()
                .map(|(name, value)| {
                    let bytes: Vec<u8> =
                        redis::from_redis_value(value.clone()).expect("a field value is a string");
                    (name.as_bytes(), bytes)
                })
                .collect();
            let events = Event::decode_entry(id, fields.iter().map(|(k, v)| (*k, v.as_slice())))
                .expect("every entry decodes");
            events
                .into_iter()
                .map(|event| (entry.id.clone(), event))
                .collect::<Vec<_>>()
        })
        .collect()
}

/// Every event of `id`'s stream, in stream order.
pub async fn events_of(con: &mut RedisConnection, id: &PromotionId) -> Vec<Event> {
    stream_events(con, id)
        .await
        .into_iter()
        .map(|(_, event)| event)
        .collect()
}

/// The type names of `events`, to compare with a list.
pub fn types(events: &[Event]) -> Vec<&'static str> {
    events.iter().map(Event::type_name).collect()
}

/// The CouponGrabbed events of `id`'s stream, in stream order.
pub async fn grants_of(con: &mut RedisConnection, id: &PromotionId) -> Vec<CouponGrabbed> {
    events_of(con, id)
        .await
        .into_iter()
        .filter_map(|event| match event {
            Event::CouponGrabbed(g) => Some(g),
            _ => None,
        })
        .collect()
}

/// A promotion's stream sorted by event type, each event with the time of
/// its entry id (XADD's reading of Redis' clock, epoch ms).
#[derive(Debug, Default)]
pub struct StreamFacts {
    pub started: Vec<(i64, PromotionStarted)>,
    pub grabs: Vec<(i64, CouponGrabbed)>,
    pub finished: Vec<(i64, PromotionFinished)>,
}

impl StreamFacts {
    /// customer -> coupon id of every grant.
    pub fn coupons(&self) -> HashMap<String, String> {
        self.grabs
            .iter()
            .map(|(_, g)| (g.customer_id.clone(), g.coupon_id.clone()))
            .collect()
    }
}

/// The answered grants (customer -> coupon) that the stream's grants do
/// not hold: each one a grant answered and then lost.
pub fn answered_not_in_stream<'a, 'b>(
    answered: impl IntoIterator<Item = (&'a String, &'a String)>,
    in_stream: impl IntoIterator<Item = (&'b String, &'b String)>,
) -> Vec<(String, String)> {
    let in_stream: HashSet<(&String, &String)> = in_stream.into_iter().collect();
    answered
        .into_iter()
        .filter(|grant| !in_stream.contains(grant))
        .map(|(customer, coupon)| (customer.clone(), coupon.clone()))
        .collect()
}

/// The facts of `id`'s stream.
pub async fn stream_facts(con: &mut RedisConnection, id: &PromotionId) -> StreamFacts {
    let mut facts = StreamFacts::default();
    for (entry_id, event) in stream_events(con, id).await {
        let ms: i64 = entry_id
            .split('-')
            .next()
            .and_then(|ms| ms.parse().ok())
            .expect("an entry id starts with its time");
        match event {
            Event::PromotionStarted(s) => facts.started.push((ms, s)),
            Event::CouponGrabbed(g) => facts.grabs.push((ms, g)),
            Event::PromotionFinished(f) => facts.finished.push((ms, f)),
        }
    }
    facts
}

/// XPENDING's summary: count, smallest id, greatest id, (consumer, count).
type PendingSummary = (
    i64,
    Option<String>,
    Option<String>,
    Option<Vec<(String, String)>>,
);

async fn pending_summary(
    con: &mut RedisConnection,
    id: &PromotionId,
) -> redis::RedisResult<PendingSummary> {
    redis::cmd("XPENDING")
        .arg(PromotionKeys::new(id).events)
        .arg(PROJECTOR_GROUP)
        .query_async(con)
        .await
}

/// Pending entries of the projector group on `id`'s stream.
pub async fn pending_total(con: &mut RedisConnection, id: &PromotionId) -> i64 {
    pending_summary(con, id).await.expect("XPENDING answers").0
}

/// Entries of `id`'s stream that `consumer` of the projector group holds;
/// an error when Redis cannot say (no group yet, Redis down).
pub async fn pending_of(
    con: &mut RedisConnection,
    id: &PromotionId,
    consumer: &str,
) -> redis::RedisResult<i64> {
    Ok(pending_summary(con, id)
        .await?
        .3
        .unwrap_or_default()
        .iter()
        .filter(|(c, _)| c == consumer)
        .filter_map(|(_, n)| n.parse::<i64>().ok())
        .sum())
}

/// The grants of one CouponGrabbed entry of `promotion`'s stream (its
/// fields as [`entries_at`] reads them), decoded by the protocol's own
/// decoder: (customer, coupon number, the shard's count after it for a
/// sharded promotion's grab), in coupon order. A version 3 entry holds a
/// grab call's batch, a version 2 entry one grant.
pub fn grants_in(
    promotion: &PromotionId,
    fields: &HashMap<String, String>,
) -> Vec<(String, u64, Option<u64>)> {
    grab_entry::decode(
        promotion,
        fields.iter().map(|(k, v)| (k.as_bytes(), v.as_bytes())),
    )
    .expect("a CouponGrabbed entry decodes")
    .into_iter()
    .map(|g| {
        let seq = coupon_sequence(&g.coupon_id).expect("couponId ends in its number");
        (g.customer_id, seq, g.shard_granted)
    })
    .collect()
}

/// Every entry of the stream at `key` (any stream, a shard's included), as
/// (entry id, fields as strings).
pub async fn entries_at(
    con: &mut RedisConnection,
    key: &str,
) -> Vec<(String, HashMap<String, String>)> {
    let page: StreamRangeReply = redis::cmd("XRANGE")
        .arg(key)
        .arg("-")
        .arg("+")
        .query_async(con)
        .await
        .expect("XRANGE");
    page.ids
        .into_iter()
        .map(|e| {
            let fields = e
                .map
                .into_iter()
                .map(|(k, v)| (k, redis::from_redis_value(v).expect("a string field")))
                .collect();
            (e.id, fields)
        })
        .collect()
}

/// The hash at `key`, every field as a string.
pub async fn hash_at(con: &mut RedisConnection, key: &str) -> HashMap<String, String> {
    redis::cmd("HGETALL")
        .arg(key)
        .query_async(con)
        .await
        .expect("HGETALL")
}
