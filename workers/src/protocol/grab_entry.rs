//! CouponGrabbed in plain fields (no JSON, so the grab functions write it
//! without cjson), in two versions readers decode:
//!
//! * **version 3** (what the grab functions write): one entry per grab call,
//!   holding every grant of its batch that took consecutive coupon numbers:
//!   `type CouponGrabbed version 3 firstSeq <n> grantedAtMs <ms>
//!   customerIds "<c1> <c2> ..."`. The k-th customer (from 0) holds coupon
//!   `n + k`. One XADD per batch instead of one per grant halves what Redis
//!   spends per grant (docs/BENCHMARKS.md) and lets projectors read and
//!   acknowledge a batch as one entry. A customer id never holds a space
//!   ([`super::CustomerId`]), so a space separates them;
//! * **version 2** (earlier releases): one entry per grant,
//!   `type CouponGrabbed version 2 customerId <id> seq <n> grantedAtMs <ms>`.
//!
//! A sharded promotion's grabs (S > 1, `functions/shards.lua`) add
//! `shardGranted`: the granting shard's count of grants after the entry's
//! last grant (after its one grant in version 2).
//!
//! The promotion is the stream's own, the couponId `<ns/name>#<seq>`, the
//! discount the promotion's. Named here once; the Lua functions spell the
//! same literals, which tests below check.

use chrono::{DateTime, Utc};

use super::{CouponGrabbed, DecodeError, PromotionId};

/// Field holding the event type, [`TYPE`].
pub const TYPE_FIELD: &str = "type";
/// Field holding the event version, [`VERSION`] or [`VERSION_2`].
pub const VERSION_FIELD: &str = "version";
/// Version 3: the coupon number of the entry's first customer.
pub const FIRST_SEQ_FIELD: &str = "firstSeq";
/// Version 3: the customers, in coupon order, separated by [`CUSTOMER_SEPARATOR`].
pub const CUSTOMER_IDS_FIELD: &str = "customerIds";
/// What separates the customers of [`CUSTOMER_IDS_FIELD`].
pub const CUSTOMER_SEPARATOR: char = ' ';
/// Version 2: the one customer.
pub const CUSTOMER_ID_FIELD: &str = "customerId";
/// Version 2: the coupon's number N (couponId `<ns/name>#N`), from 1.
pub const SEQ_FIELD: &str = "seq";
/// Field holding when the coupons were granted: Redis' clock, epoch ms.
pub const GRANTED_AT_MS_FIELD: &str = "grantedAtMs";
/// Field of a sharded promotion's grab only (S > 1, `functions/shards.lua`):
/// the granting shard's count of grants after the entry's last one.
pub const SHARD_GRANTED_FIELD: &str = "shardGranted";
/// The value of [`TYPE_FIELD`].
pub const TYPE: &str = "CouponGrabbed";
/// The version the grab functions write: one entry per batch.
pub const VERSION: u32 = 3;
/// The earlier version, one entry per grant, still read.
pub const VERSION_2: u32 = 2;

/// The fields of one version 3 entry, in the order the grab function writes
/// them (for tools and tests that append grabs as it does): `customers`
/// took coupons `first_seq`, `first_seq + 1`, ...
pub fn fields(
    customers: &[&str],
    first_seq: u64,
    granted_at_ms: i64,
) -> Vec<(&'static str, String)> {
    let sep = CUSTOMER_SEPARATOR.to_string();
    vec![
        (TYPE_FIELD, TYPE.to_owned()),
        (VERSION_FIELD, VERSION.to_string()),
        (FIRST_SEQ_FIELD, first_seq.to_string()),
        (GRANTED_AT_MS_FIELD, granted_at_ms.to_string()),
        (CUSTOMER_IDS_FIELD, customers.join(&sep)),
    ]
}

/// The fields of one version 2 entry (one grant), as earlier releases wrote
/// them: for tests and benchmarks of streams written before version 3.
pub fn fields_v2(customer_id: &str, seq: u64, granted_at_ms: i64) -> [(&'static str, String); 5] {
    [
        (TYPE_FIELD, TYPE.to_owned()),
        (VERSION_FIELD, VERSION_2.to_string()),
        (CUSTOMER_ID_FIELD, customer_id.to_owned()),
        (SEQ_FIELD, seq.to_string()),
        (GRANTED_AT_MS_FIELD, granted_at_ms.to_string()),
    ]
}

/// The plain fields of an entry, by name.
#[derive(Default)]
struct Plain<'a> {
    kind: Option<&'a str>,
    version: Option<&'a str>,
    first_seq: Option<&'a str>,
    customers: Option<&'a str>,
    customer: Option<&'a str>,
    seq: Option<&'a str>,
    at: Option<&'a str>,
    shard_granted: Option<&'a str>,
}

fn malformed(what: &str) -> DecodeError {
    DecodeError::Malformed {
        kind: TYPE.to_owned(),
        source: serde::de::Error::custom(what),
    }
}

/// A number from 1, or `what` is malformed.
fn from_one(value: Option<&str>, what: &str) -> Result<u64, DecodeError> {
    value
        .and_then(|s| s.parse().ok())
        .filter(|n| *n > 0)
        .ok_or_else(|| malformed(what))
}

/// Decodes an entry of `promotion`'s stream that has no JSON `event` field
/// from its plain fields (name, value): the grants of a CouponGrabbed
/// version 3 (one or more, in coupon order) or version 2 (one), or the
/// reason it is not one.
pub fn decode<'a>(
    promotion: &PromotionId,
    fields: impl IntoIterator<Item = (&'a [u8], &'a [u8])>,
) -> Result<Vec<CouponGrabbed>, DecodeError> {
    let mut p = Plain::default();
    for (name, value) in fields {
        let slot = match std::str::from_utf8(name).unwrap_or_default() {
            TYPE_FIELD => &mut p.kind,
            VERSION_FIELD => &mut p.version,
            FIRST_SEQ_FIELD => &mut p.first_seq,
            CUSTOMER_IDS_FIELD => &mut p.customers,
            CUSTOMER_ID_FIELD => &mut p.customer,
            SEQ_FIELD => &mut p.seq,
            GRANTED_AT_MS_FIELD => &mut p.at,
            SHARD_GRANTED_FIELD => &mut p.shard_granted,
            _ => continue,
        };
        *slot = std::str::from_utf8(value).ok();
    }
    let kind = p.kind.ok_or(DecodeError::MissingField)?;
    if kind != TYPE {
        return Err(DecodeError::UnknownType(kind.to_owned()));
    }
    let version: u64 = p.version.and_then(|v| v.parse().ok()).unwrap_or(0);
    let (first_seq, customers): (u64, Vec<&str>) = if version == u64::from(VERSION) {
        let customers: Vec<&str> = p
            .customers
            .ok_or_else(|| malformed("no customerIds"))?
            .split(CUSTOMER_SEPARATOR)
            .collect();
        if customers.iter().any(|c| c.is_empty()) {
            return Err(malformed("customerIds holds an empty id"));
        }
        (
            from_one(p.first_seq, "firstSeq is not a number from 1")?,
            customers,
        )
    } else if version == u64::from(VERSION_2) {
        let customer = p
            .customer
            .filter(|c| !c.is_empty())
            .ok_or_else(|| malformed("no customerId"))?;
        (
            from_one(p.seq, "seq is not a number from 1")?,
            vec![customer],
        )
    } else {
        return Err(DecodeError::UnsupportedVersion {
            kind: kind.to_owned(),
            version,
        });
    };
    let granted_at: DateTime<Utc> =
        p.at.and_then(|ms| ms.parse().ok())
            .and_then(DateTime::from_timestamp_millis)
            .ok_or_else(|| malformed("grantedAtMs is not epoch milliseconds"))?;
    let last = customers.len() as u64 - 1;
    first_seq
        .checked_add(last)
        .ok_or_else(|| malformed("firstSeq + customers overflows"))?;
    // The shard's count after the entry's last grant; the k-th grant's is
    // `last_count - (last - k)`, so it must be at least the entry's grants.
    let shard_granted =
        match p.shard_granted {
            None => None,
            Some(k) => Some(k.parse().ok().filter(|k: &u64| *k > last).ok_or_else(|| {
                malformed("shardGranted is not a number from the entry's grants")
            })?),
        };
    let promotion = promotion.to_string();
    Ok(customers
        .into_iter()
        .zip(0u64..)
        .map(|(customer, k)| CouponGrabbed {
            coupon_id: super::coupon_id(&promotion, first_seq + k),
            promotion: promotion.clone(),
            customer_id: customer.to_owned(),
            discount: None,
            granted_at,
            shard_granted: shard_granted.map(|n| n - (last - k)),
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode_pairs(pairs: &[(&str, &str)]) -> Result<Vec<CouponGrabbed>, DecodeError> {
        let id = PromotionId::parse("a/b").unwrap();
        decode(&id, pairs.iter().map(|(k, v)| (k.as_bytes(), v.as_bytes())))
    }

    fn decode_owned(fields: &[(&str, String)]) -> Result<Vec<CouponGrabbed>, DecodeError> {
        let pairs: Vec<(&str, &str)> = fields.iter().map(|(k, v)| (*k, v.as_str())).collect();
        decode_pairs(&pairs)
    }

    #[test]
    fn a_version_3_entry_decodes_to_one_grant_per_customer_numbered_from_first_seq() {
        let grants =
            decode_owned(&fields(&["carol", "dave", "erin"], 41, 1_764_583_200_123)).unwrap();
        let coupons: Vec<(&str, &str)> = grants
            .iter()
            .map(|g| (g.customer_id.as_str(), g.coupon_id.as_str()))
            .collect();
        assert_eq!(
            coupons,
            [("carol", "a/b#41"), ("dave", "a/b#42"), ("erin", "a/b#43")]
        );
        for g in &grants {
            assert_eq!(g.promotion, "a/b");
            assert_eq!(g.discount, None);
            assert_eq!(g.granted_at.timestamp_millis(), 1_764_583_200_123);
            assert_eq!(g.shard_granted, None);
        }
    }

    #[test]
    fn a_version_2_grab_decodes_with_its_streams_promotion() {
        let g = decode_owned(&fields_v2("carol", 42, 1_764_583_200_123)).unwrap();
        assert_eq!(g.len(), 1);
        let g = &g[0];
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
    fn a_sharded_grab_carries_its_shards_count_per_grant_and_a_bad_one_is_malformed() {
        let v3 = |k: &str| {
            let mut f = fields(&["c", "d", "e"], 900, 1);
            f.push((SHARD_GRANTED_FIELD, k.to_owned()));
            decode_owned(&f)
        };
        let counts: Vec<Option<u64>> = v3("17").unwrap().iter().map(|g| g.shard_granted).collect();
        assert_eq!(counts, [Some(15), Some(16), Some(17)]);
        assert_eq!(v3("3").unwrap()[0].shard_granted, Some(1));
        for k in ["2", "0", "x", ""] {
            assert!(matches!(v3(k), Err(DecodeError::Malformed { .. })), "{k}");
        }
        let v2 = |k: &str| {
            let mut f: Vec<(&str, String)> = fields_v2("c", 900, 1).into();
            f.push((SHARD_GRANTED_FIELD, k.to_owned()));
            decode_owned(&f)
        };
        assert_eq!(v2("17").unwrap()[0].shard_granted, Some(17));
        for k in ["0", "x", ""] {
            assert!(matches!(v2(k), Err(DecodeError::Malformed { .. })), "{k}");
        }
    }

    #[test]
    fn other_types_versions_and_shapes_are_reported() {
        assert!(matches!(decode_pairs(&[]), Err(DecodeError::MissingField)));
        assert!(matches!(
            decode_pairs(&[(TYPE_FIELD, "CouponRefunded")]),
            Err(DecodeError::UnknownType(_))
        ));
        for version in ["1", "4", "x"] {
            assert!(matches!(
                decode_pairs(&[(TYPE_FIELD, TYPE), (VERSION_FIELD, version)]),
                Err(DecodeError::UnsupportedVersion { .. })
            ));
        }
        for seq in ["0", "x", ""] {
            let mut v2: Vec<(&str, String)> = fields_v2("c", 1, 1).into();
            v2[3].1 = seq.to_owned();
            assert!(
                matches!(decode_owned(&v2), Err(DecodeError::Malformed { .. })),
                "{seq}"
            );
            let mut v3 = fields(&["c"], 1, 1);
            v3[2].1 = seq.to_owned();
            assert!(
                matches!(decode_owned(&v3), Err(DecodeError::Malformed { .. })),
                "{seq}"
            );
        }
        for customers in ["", "a  b", " a", "a "] {
            let mut v3 = fields(&["c"], 1, 1);
            v3[4].1 = customers.to_owned();
            assert!(
                matches!(decode_owned(&v3), Err(DecodeError::Malformed { .. })),
                "{customers:?}"
            );
        }
        let mut v3 = fields(&["c", "d"], u64::MAX, 1);
        assert!(matches!(
            decode_owned(&v3),
            Err(DecodeError::Malformed { .. })
        ));
        v3.retain(|(k, _)| *k != CUSTOMER_IDS_FIELD);
        assert!(matches!(
            decode_owned(&v3),
            Err(DecodeError::Malformed { .. })
        ));
    }

    #[test]
    fn the_grab_functions_write_exactly_these_field_names_and_values() {
        let head = include_str!("functions/library_head.lua");
        let xadd = format!(
            "'XADD', stream, '*', '{TYPE_FIELD}', '{TYPE}', '{VERSION_FIELD}', '{VERSION}',\n      \
             '{FIRST_SEQ_FIELD}', first_seq, '{GRANTED_AT_MS_FIELD}', now, '{CUSTOMER_IDS_FIELD}', ids"
        );
        assert_eq!(
            head.matches(&xadd).count(),
            2,
            "library_head.lua no longer writes:\n{xadd}"
        );
        assert!(head.contains(&format!(
            "ids = table.concat(customers, '{CUSTOMER_SEPARATOR}')"
        )));
        assert!(head.contains(&format!(
            "ids,\n      '{SHARD_GRANTED_FIELD}', shard_granted)"
        )));
        for (file, lua) in [
            ("grab.lua", include_str!("functions/grab.lua")),
            ("shards.lua", include_str!("functions/shards.lua")),
        ] {
            assert!(
                lua.contains("append_grants("),
                "{file} does not append with append_grants"
            );
            assert!(
                !lua.contains("'XADD', stream, '*', 'type', 'CouponGrabbed'"),
                "{file}"
            );
        }
    }
}
