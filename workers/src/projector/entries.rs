//! Stream entries as Redis answers them, decoded without building a field
//! map: XRANGE, XREADGROUP and XAUTOCLAIM replies (RESP2 or RESP3) into
//! [`RawEntry`], and an entry's fields into an [`Event`] (by
//! [`Event::decode_entry`], either layout, or a stock move's audit entry), or
//! the reason it is skipped (and left pending).

use redis::Value;

use crate::protocol::{self, grab_entry, Event, PromotionId};
use crate::read_model::{self, ProjectionError, ShardStream};

/// One stream entry as projectors need it: its id and its fields, name and
/// value, as Redis sent them (none when the entry was deleted while
/// pending). Read straight from the Redis answer, without a map.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RawEntry {
    pub id: String,
    pub fields: Vec<(Vec<u8>, Vec<u8>)>,
}

impl RawEntry {
    /// The fields as byte slices, for [`Event::decode_entry`].
    pub fn field_slices(&self) -> impl Iterator<Item = (&[u8], &[u8])> {
        self.fields
            .iter()
            .map(|(k, v)| (k.as_slice(), v.as_slice()))
    }
}

fn unexpected(what: &'static str, value: &Value) -> redis::RedisError {
    redis::RedisError::from((
        redis::ErrorKind::UnexpectedReturnType,
        what,
        format!("{value:?}"),
    ))
}

fn into_bytes(value: Value) -> Option<Vec<u8>> {
    match value {
        Value::BulkString(b) => Some(b),
        Value::SimpleString(s) => Some(s.into_bytes()),
        _ => None,
    }
}

/// The fields of an entry's field list (`[field, value, ...]`, or a map in
/// RESP3; `Nil` for an entry deleted while pending, which has none).
fn fields_of(fields: Value) -> Vec<(Vec<u8>, Vec<u8>)> {
    let pairs: Vec<(Value, Value)> = match fields {
        Value::Array(items) => {
            let mut it = items.into_iter();
            let mut pairs = Vec::with_capacity(it.len() / 2);
            while let (Some(k), Some(v)) = (it.next(), it.next()) {
                pairs.push((k, v));
            }
            pairs
        }
        Value::Map(pairs) => pairs,
        _ => return Vec::new(),
    };
    pairs
        .into_iter()
        .filter_map(|(k, v)| Some((into_bytes(k)?, into_bytes(v)?)))
        .collect()
}

/// The entries of an XRANGE answer, or of one stream in an XREADGROUP or
/// XAUTOCLAIM answer: `[[id, fields], ...]`.
pub fn entries_of(value: Value) -> redis::RedisResult<Vec<RawEntry>> {
    let items = match value {
        Value::Array(items) => items,
        Value::Nil => return Ok(Vec::new()),
        other => return Err(unexpected("stream entries are not an array", &other)),
    };
    items
        .into_iter()
        .map(|item| match item {
            Value::Array(pair) if pair.len() == 2 => {
                let mut pair = pair.into_iter();
                let id = pair.next().and_then(into_bytes);
                let fields = pair.next().unwrap_or(Value::Nil);
                let id = id
                    .and_then(|b| String::from_utf8(b).ok())
                    .ok_or_else(|| unexpected("stream entry id is not a string", &fields))?;
                Ok(RawEntry {
                    id,
                    fields: fields_of(fields),
                })
            }
            other => Err(unexpected("stream entry is not [id, fields]", &other)),
        })
        .collect()
}

/// The entries of an XREADGROUP answer on one stream (`Nil` when none).
pub(super) fn read_group_entries(value: Value) -> redis::RedisResult<Vec<RawEntry>> {
    let streams: Vec<Value> = match value {
        Value::Nil => return Ok(Vec::new()),
        // RESP2: [[name, entries]]; RESP3: {name: entries}.
        Value::Array(streams) => streams
            .into_iter()
            .map(|s| match s {
                Value::Array(mut pair) if pair.len() == 2 => pair.pop().unwrap_or(Value::Nil),
                other => other,
            })
            .collect(),
        Value::Map(pairs) => pairs.into_iter().map(|(_, v)| v).collect(),
        other => return Err(unexpected("XREADGROUP answer", &other)),
    };
    let mut out = Vec::new();
    for entries in streams {
        out.extend(entries_of(entries)?);
    }
    Ok(out)
}

/// An XAUTOCLAIM answer: `[next cursor, entries, deleted ids]`.
pub(super) fn auto_claim_of(value: Value) -> redis::RedisResult<(String, Vec<RawEntry>)> {
    match value {
        Value::Array(items) if items.len() >= 2 => {
            let mut it = items.into_iter();
            let next = it
                .next()
                .and_then(into_bytes)
                .and_then(|b| String::from_utf8(b).ok())
                .unwrap_or_else(|| "0-0".to_owned());
            let entries = entries_of(it.next().unwrap_or(Value::Nil))?;
            Ok((next, entries))
        }
        other => Err(unexpected("XAUTOCLAIM answer", &other)),
    }
}

/// What an entry is to the projector.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum Decoded {
    /// Events of the read models: one, or every grant of a version 3
    /// CouponGrabbed entry (a grab call's batch), all of one type.
    Events(Vec<Event>),
    /// A stock move's audit entry (a sharded promotion's; its type): it
    /// changes no read model, so it is acknowledged and counted, not
    /// applied.
    StockMove(&'static str),
}

impl Decoded {
    /// The entry's type and how many events it counts as, for metrics
    /// (`projector_events_applied` counts grants, not entries).
    pub(super) fn counted(&self) -> (&'static str, u64) {
        match self {
            Self::Events(events) => (
                events.first().map_or(grab_entry::TYPE, Event::type_name),
                events.len() as u64,
            ),
            Self::StockMove(kind) => (kind, 1),
        }
    }
}

/// Decodes one entry read from `stream` of `promotion`: its events (each
/// checked for that stream, see [`read_model::check_in`]; one that fails
/// skips the whole entry) or a stock move's audit entry, or the reason it
/// is skipped.
pub(super) fn decode_in(
    promotion: &PromotionId,
    stream: ShardStream,
    entry: &RawEntry,
) -> Result<Decoded, SkipReason> {
    if let Some(kind) =
        protocol::stock_move_entry(entry.field_slices()).map_err(SkipReason::Decode)?
    {
        return Ok(Decoded::StockMove(kind));
    }
    let events =
        Event::decode_entry(promotion, entry.field_slices()).map_err(SkipReason::Decode)?;
    for event in &events {
        read_model::check_in(event, stream).map_err(SkipReason::Project)?;
    }
    Ok(Decoded::Events(events))
}

#[derive(Debug, thiserror::Error)]
pub(super) enum SkipReason {
    #[error("{0}")]
    Decode(crate::protocol::DecodeError),
    #[error("{0}")]
    Project(ProjectionError),
}

impl SkipReason {
    pub(super) fn kind(&self) -> &'static str {
        match self {
            Self::Decode(e) => e.kind(),
            Self::Project(e) => e.kind(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::EVENT_FIELD;

    fn promotion() -> PromotionId {
        PromotionId::parse("a/b").unwrap()
    }

    #[test]
    fn an_entry_without_the_event_field_is_skipped_as_missing_field() {
        let entry = RawEntry::default();
        assert_eq!(
            decode_in(&promotion(), ShardStream::UNSHARDED, &entry)
                .unwrap_err()
                .kind(),
            "missing_field"
        );
    }

    fn raw(fields: &[(&str, &str)]) -> RawEntry {
        RawEntry {
            id: "1-0".into(),
            fields: fields
                .iter()
                .map(|(k, v)| (k.as_bytes().to_vec(), v.as_bytes().to_vec()))
                .collect(),
        }
    }

    #[test]
    fn stock_moves_are_acknowledged_as_such_and_a_sharded_streams_grab_needs_its_count() {
        let sharded = ShardStream {
            shard: 1,
            shards: 3,
        };
        let moved = raw(&[("type", "StockMovedIn"), ("version", "1"), ("move", "0.1")]);
        assert_eq!(
            decode_in(&promotion(), sharded, &moved).unwrap(),
            Decoded::StockMove("StockMovedIn")
        );
        let newer = raw(&[("type", "StockMovedOut"), ("version", "2")]);
        assert_eq!(
            decode_in(&promotion(), sharded, &newer).unwrap_err().kind(),
            "unsupported_version"
        );
        let mut fields = grab_entry::fields(&["c", "d"], 9, 1);
        let uncounted = raw(&fields
            .iter()
            .map(|(k, v)| (*k, v.as_str()))
            .collect::<Vec<_>>());
        assert_eq!(
            decode_in(&promotion(), sharded, &uncounted)
                .unwrap_err()
                .kind(),
            "no_shard_granted"
        );
        assert!(decode_in(&promotion(), ShardStream::UNSHARDED, &uncounted).is_ok());
        fields.push((grab_entry::SHARD_GRANTED_FIELD, "4".into()));
        let counted = raw(&fields
            .iter()
            .map(|(k, v)| (*k, v.as_str()))
            .collect::<Vec<_>>());
        let decoded = decode_in(&promotion(), sharded, &counted).unwrap();
        assert_eq!(decoded.counted(), ("CouponGrabbed", 2));
        match decoded {
            Decoded::Events(events) => {
                let counts: Vec<Option<u64>> = events
                    .iter()
                    .map(|e| match e {
                        Event::CouponGrabbed(g) => g.shard_granted,
                        other => panic!("{other:?}"),
                    })
                    .collect();
                assert_eq!(counts, [Some(3), Some(4)]);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_version_3_entry_with_one_invalid_customer_is_skipped_whole() {
        let fields = grab_entry::fields(&["good", "b<d"], 1, 0);
        let entry = raw(&fields
            .iter()
            .map(|(k, v)| (*k, v.as_str()))
            .collect::<Vec<_>>());
        assert_eq!(
            decode_in(&promotion(), ShardStream::UNSHARDED, &entry)
                .unwrap_err()
                .kind(),
            "bad_customer_id"
        );
    }

    #[test]
    fn a_version_2_grab_with_an_invalid_customer_is_skipped_as_bad_customer_id() {
        let entry = RawEntry {
            id: "1-0".into(),
            fields: grab_entry::fields_v2("a b", 1, 0)
                .into_iter()
                .map(|(k, v)| (k.as_bytes().to_vec(), v.into_bytes()))
                .collect(),
        };
        assert_eq!(
            decode_in(&promotion(), ShardStream::UNSHARDED, &entry)
                .unwrap_err()
                .kind(),
            "bad_customer_id"
        );
    }

    #[test]
    fn entries_are_read_from_resp2_arrays_and_resp3_maps() {
        let field = |k: &str, v: &str| {
            (
                Value::BulkString(k.as_bytes().to_vec()),
                Value::BulkString(v.as_bytes().to_vec()),
            )
        };
        let (k, v) = field(EVENT_FIELD, "e1");
        let resp2 = Value::Array(vec![Value::Array(vec![
            Value::BulkString(b"1-0".to_vec()),
            Value::Array(vec![k, v]),
        ])]);
        let resp3 = Value::Array(vec![Value::Array(vec![
            Value::BulkString(b"2-0".to_vec()),
            Value::Map(vec![field("other", "x"), field(EVENT_FIELD, "e2")]),
        ])]);
        assert_eq!(
            entries_of(resp2).unwrap(),
            [RawEntry {
                id: "1-0".into(),
                fields: vec![(EVENT_FIELD.as_bytes().to_vec(), b"e1".to_vec())]
            }]
        );
        assert_eq!(
            entries_of(resp3).unwrap()[0].fields,
            [
                (b"other".to_vec(), b"x".to_vec()),
                (EVENT_FIELD.as_bytes().to_vec(), b"e2".to_vec())
            ]
        );
        assert!(entries_of(Value::Nil).unwrap().is_empty());
        assert!(entries_of(Value::Int(3)).is_err());
    }
}
