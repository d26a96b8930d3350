//! Which streams a promotion has, for the live projector and `--rebuild`
//! alike: one (S = 1: no shard map, the stream of today) or one per stock
//! shard (S > 1, issue 14: shard 0's is the promotion's own stream, shard
//! i's `seckill:{ns/name~i~salt}:events`), read from the shard map
//! ([`shards::load_map`]).
//!
//! A shard map may be replanned until its promotion starts and is locked
//! from then on, so it is trusted (and cached for the promotion's life) only
//! once the promotion has started, which is also when shards other than 0
//! can first have entries (they open only after PromotionStarted). Until
//! then only shard 0's stream is followed, as for any promotion.

use redis::Value;

use crate::protocol::shards::{self, ShardError, ShardMap};
use crate::protocol::{PromotionId, ShardKeys};
use crate::read_model::ShardStream;
use crate::redis_connection::RedisConnection;

/// Every stream of `map`'s promotion, shard 0's first, with the stream key.
pub(super) fn streams_of(map: &ShardMap) -> Vec<(ShardStream, String)> {
    (0..map.shards())
        .filter_map(|shard| {
            let keys = map.keys(shard)?;
            Some((
                ShardStream {
                    shard,
                    shards: map.shards(),
                },
                keys.events.clone(),
            ))
        })
        .collect()
}

/// The map of a promotion known to have started, or finished, or to have
/// entries in shard 0's stream (so its map can no longer change). A map
/// that is not ready belongs to a promotion finished (deleted) while its
/// shards were being scheduled: nothing was granted on any shard, and its
/// one stream is shard 0's, as for an unsharded promotion.
pub(super) async fn locked_map(
    con: &mut RedisConnection,
    id: &PromotionId,
) -> Result<ShardMap, ShardError> {
    match shards::load_map(con, id).await {
        Err(ShardError::Map { detail, .. }) => {
            tracing::warn!(promotion = %id, %detail,
                "shard map not ready for a promotion past its start; following its stream 0 only");
            Ok(ShardMap::unsharded(id))
        }
        other => other,
    }
}

/// Whether a promotion's shard-0 state (`HMGET state started phase`) says
/// it has started or finished, so that its shard map is locked.
fn past_start(answer: &Value) -> bool {
    let Value::Array(fields) = answer else {
        return false;
    };
    let text = |v: Option<&Value>| match v {
        Some(Value::BulkString(b)) => std::str::from_utf8(b).ok().map(str::to_owned),
        Some(Value::SimpleString(s)) => Some(s.clone()),
        _ => None,
    };
    let started = text(fields.first());
    let phase = text(fields.get(1));
    started.as_deref() == Some("1")
        || matches!(phase.as_deref(), Some("Active" | "Closing" | "Finished"))
}

/// For each of `ids`, its locked shard map ([`locked_map`]) when its
/// state shows it started or finished, `None` while it has not (its map may
/// still be replanned). One HMGET of each state (all sent at once), then
/// one of each map found locked.
pub(super) async fn locked_maps(
    con: &mut RedisConnection,
    ids: &[PromotionId],
) -> Result<Vec<Option<ShardMap>>, ShardError> {
    if ids.is_empty() {
        return Ok(Vec::new());
    }
    let reads = ids
        .iter()
        .map(|id| {
            let mut cmd = redis::cmd("HMGET");
            cmd.arg(ShardKeys::new(id, 0, 0).state)
                .arg("started")
                .arg("phase");
            cmd
        })
        .collect();
    let states: Vec<Value> = con.query_each(reads).await?;
    let started: Vec<PromotionId> = ids
        .iter()
        .zip(&states)
        .filter(|(_, state)| past_start(state))
        .map(|(id, _)| id.clone())
        .collect();
    let mut maps = locked_maps_of(con, &started).await?.into_iter();
    Ok(states
        .iter()
        .map(|state| if past_start(state) { maps.next() } else { None })
        .collect())
}

/// [`locked_map`] of each of `ids`, all read at once (the connection
/// multiplexes them).
pub(super) async fn locked_maps_of(
    con: &RedisConnection,
    ids: &[PromotionId],
) -> Result<Vec<ShardMap>, ShardError> {
    futures::future::try_join_all(ids.iter().map(|id| {
        let mut con = con.clone();
        async move { locked_map(&mut con, id).await }
    }))
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bulk(s: &str) -> Value {
        Value::BulkString(s.as_bytes().to_vec())
    }

    #[test]
    fn a_promotion_is_past_its_start_once_started_or_no_longer_pending() {
        let state = |started: Value, phase: Value| Value::Array(vec![started, phase]);
        assert!(!past_start(&state(Value::Nil, Value::Nil)));
        assert!(!past_start(&state(bulk("0"), bulk("Pending"))));
        assert!(past_start(&state(bulk("1"), bulk("Active"))));
        assert!(past_start(&state(bulk("1"), bulk("Closing"))));
        // Deleted before its publish time: finished without a start.
        assert!(past_start(&state(bulk("0"), bulk("Finished"))));
        assert!(!past_start(&Value::Nil));
    }

    #[test]
    fn an_unsharded_promotion_has_its_one_stream_and_a_sharded_one_a_stream_per_shard() {
        let id = PromotionId::parse("shop/sale").unwrap();
        assert_eq!(
            streams_of(&ShardMap::unsharded(&id)),
            [(
                ShardStream::UNSHARDED,
                "seckill:{shop/sale}:events".to_owned()
            )]
        );
        let streams = streams_of(&ShardMap::new(&id, &[4, 11]));
        let keys: Vec<&str> = streams.iter().map(|(_, k)| k.as_str()).collect();
        assert_eq!(
            keys,
            [
                "seckill:{shop/sale}:events",
                "seckill:{shop/sale~1~4}:events",
                "seckill:{shop/sale~2~11}:events"
            ]
        );
        assert!(streams.iter().enumerate().all(|(i, (s, _))| *s
            == ShardStream {
                shard: i as u32,
                shards: 3
            }));
    }
}
