//! The events of a promotion's stream, in the entry layouts readers
//! decode:
//!
//! * version 1: one field, [`EVENT_FIELD`], holding a JSON object with
//!   `type` and `version` (PromotionStarted, PromotionFinished, and the
//!   CouponGrabbed entries written before version 2);
//! * CouponGrabbed version 3 and 2: plain fields ([`grab_entry`]), no JSON,
//!   so the grab functions write them without cjson. Version 3, what they
//!   write: `type CouponGrabbed version 3 firstSeq <n> grantedAtMs <epoch
//!   ms> customerIds <c1 c2 ...>`, every grant of one grab call in one
//!   entry; version 2, earlier: one grant per entry. The promotion is the
//!   stream's own, the couponId `<ns/name>#<seq>`, and the discount the
//!   promotion's (not repeated in every grab).
//!
//! The Lua functions write them; these types are the schema every reader
//! decodes with ([`Event::decode_entry`]): one entry, one or more events.

use chrono::{DateTime, SecondsFormat, Utc};
use serde::{Deserialize, Serialize};

use super::{grab_entry, PromotionId};

/// The stream entry field that holds the event JSON (version 1 entries).
pub const EVENT_FIELD: &str = "event";

/// How the data model writes a time: RFC 3339, UTC, with milliseconds
/// (`2026-12-01T14:00:00.750Z`), in events, read models and API answers.
pub fn rfc3339(t: &DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Millis, true)
}

/// [`rfc3339`] of epoch milliseconds (Redis' clock); `None` out of range.
pub fn rfc3339_ms(epoch_ms: i64) -> Option<String> {
    DateTime::from_timestamp_millis(epoch_ms).map(|t| rfc3339(&t))
}

/// The schema version of the JSON events (the [`EVENT_FIELD`] entries).
pub const EVENT_VERSION: u32 = 1;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PromotionStarted {
    pub promotion: String,
    pub discount: f64,
    pub number_of_coupons: u64,
    pub publish_time: DateTime<Utc>,
    pub finish_time: DateTime<Utc>,
    /// When the start was recorded (Redis clock); at or after publishTime.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<DateTime<Utc>>,
    /// S of a sharded promotion (issue 14); absent for an unsharded one
    /// (S = 1), whose Started is unchanged.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shards: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CouponGrabbed {
    pub coupon_id: String,
    pub promotion: String,
    pub customer_id: String,
    /// Carried by version 1 grabs only; a later grab's discount is its
    /// promotion's (PromotionStarted, the read model), joined by readers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub discount: Option<f64>,
    /// Millisecond precision in every version.
    pub granted_at: DateTime<Utc>,
    /// A sharded promotion's grab only (from the plain field
    /// [`grab_entry::SHARD_GRANTED_FIELD`]): the granting shard's count of
    /// grants after this one. Coupon numbers of a sharded promotion are not
    /// in arrival order, so the read model counts grants per shard from
    /// this instead. Never in version 1 JSON.
    #[serde(skip)]
    pub shard_granted: Option<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum FinishReason {
    SoldOut,
    Expired,
    Deleted,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::SoldOut => "SoldOut",
            Self::Expired => "Expired",
            Self::Deleted => "Deleted",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "SoldOut" => Some(Self::SoldOut),
            "Expired" => Some(Self::Expired),
            "Deleted" => Some(Self::Deleted),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PromotionFinished {
    pub promotion: String,
    pub reason: FinishReason,
    pub granted: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<DateTime<Utc>>,
}

/// The types of the audit entries of a stock move (S > 1), appended by the
/// move's steps in `functions/shards.lua`: plain fields `type <T> version 1
/// move <id> to|from <shard> count <n> ranges <lo-hi,...>`. They change no
/// read model (the promotion's counts come from the grabs), so they are not
/// [`Event`]s: readers acknowledge and count them ([`stock_move_entry`]).
pub const STOCK_MOVE_TYPES: [&str; 2] = ["StockMovedOut", "StockMovedIn"];

/// The version of the stock move entries.
pub const STOCK_MOVE_VERSION: u32 = 1;

/// Whether an entry (its fields, name and value) is a stock move's audit
/// entry: `Ok(Some(type))` for one of [`STOCK_MOVE_TYPES`] in
/// [`STOCK_MOVE_VERSION`], `Ok(None)` for any other entry, and an
/// unsupported version reported as such (readers leave it pending).
pub fn stock_move_entry<'a>(
    fields: impl IntoIterator<Item = (&'a [u8], &'a [u8])>,
) -> Result<Option<&'static str>, DecodeError> {
    let (mut kind, mut version) = (None, None);
    for (name, value) in fields {
        match name {
            b"type" => kind = Some(value),
            b"version" => version = Some(value),
            _ => {}
        }
    }
    let Some(kind) = kind.and_then(|k| STOCK_MOVE_TYPES.into_iter().find(|t| t.as_bytes() == k))
    else {
        return Ok(None);
    };
    let version: u64 = version
        .and_then(|v| std::str::from_utf8(v).ok())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    if version != u64::from(STOCK_MOVE_VERSION) {
        return Err(DecodeError::UnsupportedVersion {
            kind: kind.to_owned(),
            version,
        });
    }
    Ok(Some(kind))
}

/// One event of a promotion stream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type")]
pub enum Event {
    PromotionStarted(PromotionStarted),
    CouponGrabbed(CouponGrabbed),
    PromotionFinished(PromotionFinished),
}

/// The `type` and `version` of an event, read before the rest so that an
/// unknown or newer event is reported as such. Any other JSON value in those
/// fields counts as absent (as with a missing field), never as "not JSON".
#[derive(Deserialize)]
struct EventHead<'a> {
    #[serde(rename = "type", default, borrow, deserialize_with = "lenient_str")]
    kind: Option<std::borrow::Cow<'a, str>>,
    #[serde(default, deserialize_with = "lenient_number")]
    version: Option<serde_json::Number>,
}

/// A string field that may hold any JSON value; non-strings read as `None`.
fn lenient_str<'de, D>(d: D) -> Result<Option<std::borrow::Cow<'de, str>>, D::Error>
where
    D: serde::Deserializer<'de>,
{
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Field<'a> {
        Str(#[serde(borrow)] std::borrow::Cow<'a, str>),
        Other(serde::de::IgnoredAny),
    }
    Ok(match Field::deserialize(d)? {
        Field::Str(s) => Some(s),
        Field::Other(_) => None,
    })
}

/// A number field that may hold any JSON value; non-numbers read as `None`.
fn lenient_number<'de, D>(d: D) -> Result<Option<serde_json::Number>, D::Error>
where
    D: serde::Deserializer<'de>,
{
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Field {
        Number(serde_json::Number),
        Other(serde::de::IgnoredAny),
    }
    Ok(match Field::deserialize(d)? {
        Field::Number(n) => Some(n),
        Field::Other(_) => None,
    })
}

/// Why a stream entry could not be decoded. Readers skip such entries with a
/// metric and a log line; they never crash on them.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("entry has no '{EVENT_FIELD}' field")]
    MissingField,
    #[error("event is not JSON: {0}")]
    NotJson(serde_json::Error),
    #[error("unknown event type {0:?}")]
    UnknownType(String),
    #[error("unsupported version {version} of event type {kind}")]
    UnsupportedVersion { kind: String, version: u64 },
    #[error("malformed {kind} event: {source}")]
    Malformed {
        kind: String,
        source: serde_json::Error,
    },
}

impl DecodeError {
    /// A short label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::MissingField => "missing_field",
            Self::NotJson(_) => "not_json",
            Self::UnknownType(_) => "unknown_type",
            Self::UnsupportedVersion { .. } => "unsupported_version",
            Self::Malformed { .. } => "malformed",
        }
    }
}

impl Event {
    pub fn type_name(&self) -> &'static str {
        match self {
            Self::PromotionStarted(_) => "PromotionStarted",
            Self::CouponGrabbed(_) => "CouponGrabbed",
            Self::PromotionFinished(_) => "PromotionFinished",
        }
    }

    /// Decodes the JSON of one stream entry, checking type and version first so
    /// that an event from a newer writer is reported as such, not as garbage.
    ///
    /// Two passes straight over the bytes (projectors decode every entry, so
    /// this is on their hot path): the first reads only `type` and `version`,
    /// skipping the other fields without building anything; the second
    /// deserializes the event's own struct, which ignores those two fields.
    /// Neither builds a `serde_json::Value` tree.
    pub fn decode(json: &[u8]) -> Result<Self, DecodeError> {
        let head: EventHead<'_> = match serde_json::from_slice(json) {
            Ok(head) => head,
            // Valid JSON that is not an event object (an array, a string):
            // an event of no known type, as before this fast path existed.
            Err(_) if serde_json::from_slice::<serde::de::IgnoredAny>(json).is_ok() => {
                return Err(DecodeError::UnknownType(String::new()))
            }
            Err(e) => return Err(DecodeError::NotJson(e)),
        };
        let kind = head.kind.as_deref().unwrap_or_default();
        let known = matches!(
            kind,
            "PromotionStarted" | "CouponGrabbed" | "PromotionFinished"
        );
        if !known {
            return Err(DecodeError::UnknownType(kind.to_owned()));
        }
        let version = head.version.and_then(|v| v.as_u64()).unwrap_or(0);
        if version != u64::from(EVENT_VERSION) {
            return Err(DecodeError::UnsupportedVersion {
                kind: kind.to_owned(),
                version,
            });
        }
        let malformed = |source| DecodeError::Malformed {
            kind: kind.to_owned(),
            source,
        };
        match kind {
            "PromotionStarted" => serde_json::from_slice(json)
                .map(Self::PromotionStarted)
                .map_err(malformed),
            "CouponGrabbed" => serde_json::from_slice(json)
                .map(Self::CouponGrabbed)
                .map_err(malformed),
            _ => serde_json::from_slice(json)
                .map(Self::PromotionFinished)
                .map_err(malformed),
        }
    }

    /// Decodes one entry of `promotion`'s stream from its fields (name,
    /// value), in any layout: an [`EVENT_FIELD`] holds a version 1 JSON
    /// event ([`Event::decode`]); otherwise the plain fields of a
    /// [`grab_entry`], version 3 (every grant of a batch, in coupon order)
    /// or 2 (one grant). Unknown types and versions are reported as such,
    /// so readers skip and count them (the whole entry).
    pub fn decode_entry<'a>(
        promotion: &PromotionId,
        fields: impl IntoIterator<Item = (&'a [u8], &'a [u8])>,
    ) -> Result<Vec<Self>, DecodeError> {
        let mut plain = Vec::with_capacity(6);
        for (name, value) in fields {
            if name == EVENT_FIELD.as_bytes() {
                return Self::decode(value).map(|e| vec![e]);
            }
            plain.push((name, value));
        }
        grab_entry::decode(promotion, plain)
            .map(|grants| grants.into_iter().map(Self::CouponGrabbed).collect())
    }

    /// Encodes as the scripts do (with `version`); used by tests and tools.
    pub fn encode(&self) -> String {
        let mut value = serde_json::to_value(self).unwrap_or_default();
        if let Some(obj) = value.as_object_mut() {
            obj.insert("version".into(), EVENT_VERSION.into());
        }
        value.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn decodes_the_json_the_scripts_write() {
        let e = Event::decode(br#"{"type":"CouponGrabbed","version":1,"couponId":"a/b#1","promotion":"a/b","customerId":"c","discount":0.8,"grantedAt":"2026-11-26T10:00:00.123Z"}"#).unwrap();
        match e {
            Event::CouponGrabbed(g) => {
                assert_eq!(g.coupon_id, "a/b#1");
                assert_eq!(g.granted_at.timestamp_millis() % 1000, 123);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn unknown_type_and_version_are_reported_not_guessed() {
        assert!(matches!(
            Event::decode(br#"{"type":"CouponRefunded","version":1}"#),
            Err(DecodeError::UnknownType(t)) if t == "CouponRefunded"
        ));
        assert!(matches!(
            Event::decode(br#"{"type":"PromotionFinished","version":2,"promotion":"a/b","reason":"SoldOut","granted":1}"#),
            Err(DecodeError::UnsupportedVersion { version: 2, .. })
        ));
        assert!(matches!(
            Event::decode(b"\xff"),
            Err(DecodeError::NotJson(_))
        ));
        assert!(matches!(
            Event::decode(br#"{"type":"PromotionFinished","version":1,"reason":"Bored"}"#),
            Err(DecodeError::Malformed { .. })
        ));
    }

    #[test]
    fn encode_then_decode_is_identity() {
        let e = Event::PromotionFinished(PromotionFinished {
            promotion: "a/b".into(),
            reason: FinishReason::SoldOut,
            granted: 3,
            finished_at: None,
        });
        assert_eq!(Event::decode(e.encode().as_bytes()).unwrap(), e);
    }

    #[test]
    fn json_that_is_not_an_event_object_is_an_unknown_type() {
        for json in [&br#"[1,2]"#[..], br#""x""#, br#"{"type":7,"version":1}"#] {
            assert!(
                matches!(Event::decode(json), Err(DecodeError::UnknownType(t)) if t.is_empty()),
                "{}",
                String::from_utf8_lossy(json)
            );
        }
    }

    fn promotion() -> PromotionId {
        PromotionId::parse("a/b").unwrap()
    }

    #[test]
    fn stock_move_entries_are_recognised_by_type_and_version_and_nothing_else_is() {
        let entry = |kind: &'static str, version: &'static str| {
            [
                (&b"type"[..], kind.as_bytes()),
                (&b"version"[..], version.as_bytes()),
                (&b"move"[..], &b"1.1"[..]),
            ]
        };
        assert_eq!(
            stock_move_entry(entry("StockMovedOut", "1")).unwrap(),
            Some("StockMovedOut")
        );
        assert_eq!(
            stock_move_entry(entry("StockMovedIn", "1")).unwrap(),
            Some("StockMovedIn")
        );
        assert!(matches!(
            stock_move_entry(entry("StockMovedIn", "2")),
            Err(DecodeError::UnsupportedVersion { version: 2, .. })
        ));
        assert_eq!(stock_move_entry(entry("CouponGrabbed", "2")).unwrap(), None);
        assert_eq!(
            stock_move_entry([(EVENT_FIELD.as_bytes(), &b"{}"[..])]).unwrap(),
            None
        );
    }

    #[test]
    fn the_shard_functions_append_started_with_shards_and_moves_of_these_types() {
        let lua = include_str!("functions/shards.lua");
        assert!(lua.contains("startedAt = at, shards = s.shards,"));
        for kind in STOCK_MOVE_TYPES {
            let xadd =
                format!("'XADD', stream, '*', 'type', '{kind}', 'version', '{STOCK_MOVE_VERSION}'");
            assert!(lua.contains(&xadd), "shards.lua no longer writes {xadd}");
        }
        let started = Event::decode(
            br#"{"type":"PromotionStarted","version":1,"promotion":"a/b","discount":0.5,"numberOfCoupons":9,"publishTime":"2026-12-01T10:00:00Z","finishTime":"2026-12-01T11:00:00Z","shards":3}"#,
        )
        .unwrap();
        assert!(matches!(started, Event::PromotionStarted(s) if s.shards == Some(3)));
    }

    fn decode_all(fields: &[(&str, &str)]) -> Result<Vec<Event>, DecodeError> {
        Event::decode_entry(
            &promotion(),
            fields.iter().map(|(k, v)| (k.as_bytes(), v.as_bytes())),
        )
    }

    /// The one event of an entry that holds one.
    fn decode_fields(fields: &[(&str, &str)]) -> Result<Event, DecodeError> {
        decode_all(fields).map(|mut events| {
            assert_eq!(events.len(), 1, "{events:?}");
            events.remove(0)
        })
    }

    #[test]
    fn a_version_3_entry_decodes_to_every_grant_of_its_batch_in_coupon_order() {
        let fields = grab_entry::fields(&["carol", "dave"], 42, 1_764_583_200_123);
        let pairs: Vec<(&str, &str)> = fields.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let grants: Vec<(String, String)> = decode_all(&pairs)
            .unwrap()
            .into_iter()
            .map(|e| match e {
                Event::CouponGrabbed(g) => {
                    assert_eq!(g.promotion, "a/b");
                    assert_eq!(g.granted_at.timestamp_millis(), 1_764_583_200_123);
                    (g.customer_id, g.coupon_id)
                }
                other => panic!("not a grab: {other:?}"),
            })
            .collect();
        assert_eq!(
            grants,
            [
                ("carol".to_owned(), "a/b#42".to_owned()),
                ("dave".to_owned(), "a/b#43".to_owned())
            ]
        );
    }

    #[test]
    fn a_version_2_grab_decodes_from_plain_fields_with_its_streams_promotion() {
        let fields = grab_entry::fields_v2("carol", 42, 1_764_583_200_123);
        let pairs: Vec<(&str, &str)> = fields.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let Event::CouponGrabbed(g) = decode_fields(&pairs).unwrap() else {
            panic!("not a grab");
        };
        assert_eq!(g.promotion, "a/b");
        assert_eq!(g.coupon_id, "a/b#42");
        assert_eq!(g.customer_id, "carol");
        assert_eq!(g.discount, None);
        assert_eq!(g.granted_at.timestamp_millis(), 1_764_583_200_123);
    }

    #[test]
    fn an_entry_with_the_event_field_decodes_as_version_1_json() {
        let json = r#"{"type":"CouponGrabbed","version":1,"couponId":"a/b#1","promotion":"a/b","customerId":"c","discount":0.8,"grantedAt":"2026-11-26T10:00:00.123Z"}"#;
        let e = decode_fields(&[(EVENT_FIELD, json)]).unwrap();
        assert_eq!(e, Event::decode(json.as_bytes()).unwrap());
        let Event::CouponGrabbed(g) = e else {
            panic!("not a grab")
        };
        assert_eq!(g.discount, Some(0.8));
    }

    #[test]
    fn plain_field_entries_of_unknown_types_versions_or_shapes_are_reported() {
        let grab = |version: &str, seq: &str| {
            decode_fields(&[
                ("type", "CouponGrabbed"),
                ("version", version),
                ("customerId", "c"),
                ("seq", seq),
                ("grantedAtMs", "1"),
            ])
        };
        assert!(matches!(
            decode_fields(&[("type", "CouponRefunded"), ("version", "2")]),
            Err(DecodeError::UnknownType(t)) if t == "CouponRefunded"
        ));
        assert!(matches!(
            grab("4", "1"),
            Err(DecodeError::UnsupportedVersion { version: 4, .. })
        ));
        // Version 3 fields are others: a customerId and seq are not enough.
        assert!(matches!(grab("3", "1"), Err(DecodeError::Malformed { .. })));
        assert!(matches!(
            grab("1", "1"),
            Err(DecodeError::UnsupportedVersion { version: 1, .. })
        ));
        assert!(matches!(
            decode_fields(&[("type", "PromotionStarted"), ("version", "2")]),
            Err(DecodeError::UnknownType(t)) if t == "PromotionStarted"
        ));
        for seq in ["0", "x", "-1"] {
            assert!(
                matches!(grab("2", seq), Err(DecodeError::Malformed { .. })),
                "{seq}"
            );
        }
        assert!(matches!(
            decode_fields(&[("type", "CouponGrabbed"), ("version", "2"), ("seq", "1")]),
            Err(DecodeError::Malformed { .. })
        ));
        assert!(matches!(
            decode_fields(&[("other", "x")]),
            Err(DecodeError::MissingField)
        ));
        assert!(matches!(decode_fields(&[]), Err(DecodeError::MissingField)));
    }

    proptest! {
        #[test]
        fn decoding_arbitrary_plain_fields_never_panics(fields in proptest::collection::vec(("(type|version|customerId|customerIds|firstSeq|seq|grantedAtMs|shardGranted|x)", "\\PC{0,12}"), 0..8)) {
            let pairs: Vec<(&str, &str)> = fields.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
            let _ = decode_fields(&pairs);
        }

        #[test]
        fn every_version_3_entry_decodes_to_what_was_written(customers in proptest::collection::vec("[A-Za-z0-9._:@-]{1,64}", 1..40), first in 1u64..u64::MAX / 2, ms in 0i64..8_000_000_000_000) {
            let ids: Vec<&str> = customers.iter().map(String::as_str).collect();
            let fields = grab_entry::fields(&ids, first, ms);
            let pairs: Vec<(&str, &str)> = fields.iter().map(|(k, v)| (*k, v.as_str())).collect();
            let events = decode_all(&pairs).unwrap();
            prop_assert_eq!(events.len(), customers.len());
            for ((event, customer), seq) in events.into_iter().zip(&customers).zip(first..) {
                let Event::CouponGrabbed(g) = event else { panic!("not a grab") };
                prop_assert_eq!(&g.customer_id, customer);
                prop_assert_eq!(g.coupon_id, format!("a/b#{seq}"));
                prop_assert_eq!(g.granted_at.timestamp_millis(), ms);
            }
        }

        #[test]
        fn every_version_2_grab_decodes_to_what_was_written(customer in "[A-Za-z0-9._:@-]{1,64}", seq in 1u64.., ms in 0i64..8_000_000_000_000) {
            let fields = grab_entry::fields_v2(&customer, seq, ms);
            let pairs: Vec<(&str, &str)> = fields.iter().map(|(k, v)| (*k, v.as_str())).collect();
            let Ok(Event::CouponGrabbed(g)) = decode_fields(&pairs) else {
                panic!("{pairs:?} did not decode");
            };
            prop_assert_eq!(g.customer_id, customer);
            prop_assert_eq!(g.coupon_id, format!("a/b#{seq}"));
            prop_assert_eq!(g.granted_at.timestamp_millis(), ms);
        }

        #[test]
        fn decoding_arbitrary_bytes_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = Event::decode(&bytes);
        }

        #[test]
        fn decoding_arbitrary_objects_never_panics(kind in "(PromotionStarted|CouponGrabbed|PromotionFinished|x)", version in 0u64..3, body in "\\PC{0,40}") {
            let json = format!(r#"{{"type":"{kind}","version":{version},"promotion":{body:?}}}"#);
            let _ = Event::decode(json.as_bytes());
        }
    }
}
