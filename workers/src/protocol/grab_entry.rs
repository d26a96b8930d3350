//! CouponGrabbed version 2: the stream entry of one grant, plain fields and
//! no JSON, so that the grab function writes it without cjson:
//! `type CouponGrabbed version 2 customerId <id> seq <n> grantedAtMs <ms>`.
//! The promotion is the stream's own, the couponId `<ns/name>#<seq>`, the
//! discount the promotion's. Named here once; `functions/grab.lua` spells the
//! same literals, which a test below checks.

use chrono::DateTime;

use super::{CouponGrabbed, DecodeError, PromotionId};

/// Field holding the event type, [`TYPE`].
pub const TYPE_FIELD: &str = "type";
/// Field holding the event version, [`VERSION`].
pub const VERSION_FIELD: &str = "version";
/// Field holding the customer id.
pub const CUSTOMER_ID_FIELD: &str = "customerId";
/// Field holding the coupon's number N (couponId `<ns/name>#N`), from 1.
pub const SEQ_FIELD: &str = "seq";
/// Field holding when the coupon was granted: Redis' clock, epoch ms.
pub const GRANTED_AT_MS_FIELD: &str = "grantedAtMs";
/// Field of a sharded promotion's grab only (S > 1, `functions/shards.lua`):
/// the granting shard's count of grants after this one.
pub const SHARD_GRANTED_FIELD: &str = "shardGranted";
/// The value of [`TYPE_FIELD`].
pub const TYPE: &str = "CouponGrabbed";
/// The value of [`VERSION_FIELD`].
pub const VERSION: u32 = 2;

/// The fields of one entry, in the order the grab function writes them
/// (for tools and tests that append grabs as it does).
pub fn fields(customer_id: &str, seq: u64, granted_at_ms: i64) -> [(&'static str, String); 5] {
    [
        (TYPE_FIELD, TYPE.to_owned()),
        (VERSION_FIELD, VERSION.to_string()),
        (CUSTOMER_ID_FIELD, customer_id.to_owned()),
        (SEQ_FIELD, seq.to_string()),
        (GRANTED_AT_MS_FIELD, granted_at_ms.to_string()),
    ]
}

/// Decodes an entry of `promotion`'s stream that has no JSON `event` field
/// from its plain fields (name, value): a CouponGrabbed version 2, or the
/// reason it is not one.
pub fn decode<'a>(
    promotion: &PromotionId,
    fields: impl IntoIterator<Item = (&'a [u8], &'a [u8])>,
) -> Result<CouponGrabbed, DecodeError> {
    let (mut kind, mut version, mut customer, mut seq, mut at) = (None, None, None, None, None);
    let mut shard_granted = None;
    for (name, value) in fields {
        let slot = match std::str::from_utf8(name).unwrap_or_default() {
            TYPE_FIELD => &mut kind,
            VERSION_FIELD => &mut version,
            CUSTOMER_ID_FIELD => &mut customer,
            SEQ_FIELD => &mut seq,
            GRANTED_AT_MS_FIELD => &mut at,
            SHARD_GRANTED_FIELD => &mut shard_granted,
            _ => continue,
        };
        *slot = std::str::from_utf8(value).ok();
    }
    let kind = kind.ok_or(DecodeError::MissingField)?;
    if kind != TYPE {
        return Err(DecodeError::UnknownType(kind.to_owned()));
    }
    let version: u64 = version.and_then(|v| v.parse().ok()).unwrap_or(0);
    if version != u64::from(VERSION) {
        return Err(DecodeError::UnsupportedVersion {
            kind: kind.to_owned(),
            version,
        });
    }
    let malformed = |what: &str| DecodeError::Malformed {
        kind: TYPE.to_owned(),
        source: serde::de::Error::custom(what),
    };
    let customer = customer
        .filter(|c| !c.is_empty())
        .ok_or_else(|| malformed("no customerId"))?;
    let seq: u64 = seq
        .and_then(|s| s.parse().ok())
        .filter(|n| *n > 0)
        .ok_or_else(|| malformed("seq is not a number from 1"))?;
    let granted_at = at
        .and_then(|ms| ms.parse().ok())
        .and_then(DateTime::from_timestamp_millis)
        .ok_or_else(|| malformed("grantedAtMs is not epoch milliseconds"))?;
    let shard_granted = match shard_granted {
        None => None,
        Some(k) => Some(
            k.parse()
                .ok()
                .filter(|k: &u64| *k > 0)
                .ok_or_else(|| malformed("shardGranted is not a number from 1"))?,
        ),
    };
    Ok(CouponGrabbed {
        coupon_id: format!("{promotion}#{seq}"),
        promotion: promotion.to_string(),
        customer_id: customer.to_owned(),
        discount: None,
        granted_at,
        shard_granted,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode_pairs(pairs: &[(&str, &str)]) -> Result<CouponGrabbed, DecodeError> {
        let id = PromotionId::parse("a/b").unwrap();
        decode(&id, pairs.iter().map(|(k, v)| (k.as_bytes(), v.as_bytes())))
    }

    #[test]
    fn a_version_2_grab_decodes_with_its_streams_promotion() {
        let g = decode_pairs(&[
            (TYPE_FIELD, TYPE),
            (VERSION_FIELD, "2"),
            (CUSTOMER_ID_FIELD, "carol"),
            (SEQ_FIELD, "42"),
            (GRANTED_AT_MS_FIELD, "1764583200123"),
        ])
        .unwrap();
        assert_eq!(
            (g.coupon_id.as_str(), g.promotion.as_str()),
            ("a/b#42", "a/b")
        );
        assert_eq!(g.customer_id, "carol");
        assert_eq!(g.discount, None);
        assert_eq!(g.granted_at.timestamp_millis(), 1_764_583_200_123);
        assert_eq!(g.shard_granted, None);
    }

    #[test]
    fn a_sharded_grab_carries_its_shards_count_and_a_bad_one_is_malformed() {
        let grab = |k: &str| {
            decode_pairs(&[
                (TYPE_FIELD, TYPE),
                (VERSION_FIELD, "2"),
                (CUSTOMER_ID_FIELD, "c"),
                (SEQ_FIELD, "900"),
                (GRANTED_AT_MS_FIELD, "1"),
                (SHARD_GRANTED_FIELD, k),
            ])
        };
        assert_eq!(grab("17").unwrap().shard_granted, Some(17));
        for k in ["0", "x", ""] {
            assert!(matches!(grab(k), Err(DecodeError::Malformed { .. })), "{k}");
        }
        let lua = include_str!("functions/shards.lua");
        assert!(lua.contains(&format!(
            "'{SEQ_FIELD}', n, '{GRANTED_AT_MS_FIELD}', now, '{SHARD_GRANTED_FIELD}', s.granted)"
        )));
    }

    #[test]
    fn other_types_versions_and_shapes_are_reported() {
        assert!(matches!(decode_pairs(&[]), Err(DecodeError::MissingField)));
        assert!(matches!(
            decode_pairs(&[(TYPE_FIELD, "CouponRefunded")]),
            Err(DecodeError::UnknownType(_))
        ));
        assert!(matches!(
            decode_pairs(&[(TYPE_FIELD, TYPE), (VERSION_FIELD, "3")]),
            Err(DecodeError::UnsupportedVersion { version: 3, .. })
        ));
        for seq in ["0", "x", ""] {
            let e = decode_pairs(&[
                (TYPE_FIELD, TYPE),
                (VERSION_FIELD, "2"),
                (CUSTOMER_ID_FIELD, "c"),
                (SEQ_FIELD, seq),
                (GRANTED_AT_MS_FIELD, "1"),
            ]);
            assert!(matches!(e, Err(DecodeError::Malformed { .. })), "{seq}");
        }
    }

    #[test]
    fn the_grab_function_writes_exactly_these_field_names_and_values() {
        let lua = include_str!("functions/grab.lua");
        let xadd = format!(
            "'XADD', stream, '*', '{TYPE_FIELD}', '{TYPE}', '{VERSION_FIELD}', '{VERSION}',\n          \
             '{CUSTOMER_ID_FIELD}', c, '{SEQ_FIELD}', seq, '{GRANTED_AT_MS_FIELD}', now)"
        );
        assert!(lua.contains(&xadd), "grab.lua no longer writes:\n{xadd}");
        for literal in [
            TYPE_FIELD,
            VERSION_FIELD,
            CUSTOMER_ID_FIELD,
            SEQ_FIELD,
            GRANTED_AT_MS_FIELD,
            TYPE,
        ] {
            assert!(lua.contains(&format!("'{literal}'")), "{literal}");
        }
    }
}
