//! Key names. Command-side keys of one promotion share the hash tag
//! `{namespace/name}`; a customer's coupons live in one bucket hash tagged
//! `{bucket}`.

use super::{CustomerId, PromotionId};

/// Set of every promotion id ever scheduled, so projectors find new streams
/// without scanning the keyspace of every master.
pub const PROMOTION_INDEX_KEY: &str = "seckill:promotions";

/// Consumer group through which projectors share every promotion stream.
pub const PROJECTOR_GROUP: &str = "seckill-projector";

/// The field of a promotion's state hash ([`PromotionKeys::state`]) that
/// holds how many coupons it has granted (the Lua functions spell the same
/// literal, which a test of `functions.rs` checks): what tools read to count
/// grants now that one stream entry holds a whole batch of them.
pub const GRANTED_FIELD: &str = "granted";

/// The command-side keys of one promotion.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PromotionKeys {
    /// Hash: spec, phase, granted, start and finish times.
    pub state: String,
    /// Hash: customer id -> the coupon they hold, `<seq>:<grantedAtMs>`.
    pub customers: String,
    /// Stream: the promotion's events.
    pub events: String,
}

impl PromotionKeys {
    pub fn new(id: &PromotionId) -> Self {
        let tag = id.hash_tag();
        Self {
            state: format!("seckill:{tag}:state"),
            customers: format!("seckill:{tag}:customers"),
            events: format!("seckill:{tag}:events"),
        }
    }
}

/// The command-side keys of one shard of a sharded promotion (S > 1; see
/// `protocol::shards`). Shard 0 keeps the promotion's own tag, so its keys
/// are exactly [`PromotionKeys`]' (stream and state stay where an unsharded
/// promotion has them) plus the moves keys and the shard map. Shard i >= 1 is
/// tagged `{ns/name~i~salt}`: `~` cannot occur in a promotion id, so no shard
/// tag equals another promotion's or another shard's, and the salt is what
/// places the shard on the master wanted for it (`protocol::placement`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardKeys {
    /// Hash: spec, phase, this shard's numbers, counts and epoch.
    pub state: String,
    /// Hash: customer id -> `<seq>:<grantedAtMs>`, the customers whose home
    /// this shard is.
    pub customers: String,
    /// Stream: this shard's grants and moves (shard 0's also holds the one
    /// Started and the one Finished).
    pub events: String,
    /// Hash: move id -> `<to>|<ranges>|<ms>`, this shard's moves out not yet
    /// done.
    pub moves_out: String,
    /// Hash: move id -> `<from>|<ranges>`, every move this shard received
    /// (kept for the promotion's life: it makes a replayed step 2 a no-op).
    pub moves_in: String,
    /// String written with every durable step, so that `WAIT` also covers
    /// what a step only read.
    pub probe: String,
}

impl ShardKeys {
    /// The keys of shard `shard` (salt `salt`, ignored for shard 0) of `id`.
    pub fn new(id: &PromotionId, shard: u32, salt: u32) -> Self {
        let tag = shard_tag(id, shard, salt);
        let base = PromotionKeys::new(id);
        let (state, customers, events) = if shard == 0 {
            (base.state, base.customers, base.events)
        } else {
            (
                format!("seckill:{tag}:state"),
                format!("seckill:{tag}:customers"),
                format!("seckill:{tag}:events"),
            )
        };
        Self {
            state,
            customers,
            events,
            moves_out: format!("seckill:{tag}:moves-out"),
            moves_in: format!("seckill:{tag}:moves-in"),
            probe: format!("seckill:{tag}:replication-probe"),
        }
    }
}

/// The hash tag of shard `shard` of `id`: the promotion's own for shard 0,
/// `{ns/name~shard~salt}` otherwise.
pub fn shard_tag(id: &PromotionId, shard: u32, salt: u32) -> String {
    if shard == 0 {
        id.hash_tag()
    } else {
        format!("{{{id}~{shard}~{salt}}}")
    }
}

/// Hash in shard 0's slot: `count` S, `salts` "k1,...,k(S-1)", `ready` 0/1,
/// `placement` (status only). Absent for an unsharded promotion (S = 1).
pub fn shard_map_key(id: &PromotionId) -> String {
    format!("seckill:{}:shards", id.hash_tag())
}

/// The one stable hash of a customer id: FNV-1a (32 bits) of its bytes. It
/// places the customer's coupons in a read-model bucket and, for a sharded
/// promotion, picks the customer's home shard (`protocol::home_shard`).
/// Changing it is a new layout.
pub fn customer_hash(customer: &CustomerId) -> u32 {
    customer.as_str().bytes().fold(0x811c_9dc5_u32, |h, b| {
        (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
    })
}

pub mod read_model {
    //! Read-model keys, written only by projectors and read only by query workers.
    //!
    //! Layout version [`LAYOUT_VERSION`] (issue 15): the customers' coupons are
    //! not a key per customer (a key alone costs about 300 B of Redis memory)
    //! but [`COUPON_BUCKETS`] small hashes, which Redis stores as listpacks:
    //! field `<customerId>|<ns/name>` ([`coupon_field`]), value
    //! `<seq>:<grantedAtMs>` ([`HeldCoupon`]), in the bucket of the customer
    //! ([`customer_coupons`]). Neither id can hold `|` (see [`CustomerId`] and
    //! [`PromotionId`]), so a customer's coupons are the fields matching
    //! [`coupon_field_pattern`]. The discount is the promotion's, joined from
    //! [`promotion`] by readers.

    use super::{CustomerId, PromotionId};

    /// Prefix of every read-model key: what `--rebuild` drops when the read
    /// models share the streams' database, and what it expects every key of
    /// their own database to carry before emptying it.
    pub const PREFIX: &str = "seckill:rm:";

    /// Set of promotion ids that were started and are not known to be finished.
    pub const ACTIVE: &str = "seckill:rm:active";

    /// Hash: phase, discount, numberOfCoupons, granted, times, finish reason.
    pub fn promotion(id: &PromotionId) -> String {
        format!("seckill:rm:promotion:{}", id.hash_tag())
    }

    /// Hash: projection bookkeeping (last applied event time per stream).
    pub const PROGRESS: &str = "seckill:rm:progress";

    /// String: the layout the read models are complete in ([`LAYOUT_VERSION`]).
    /// Written by a rebuild, or by the first projector that finds it missing
    /// once it has replayed every stream into this layout (the upgrade from
    /// the layout of version 1, which had no marker; docs/RUNBOOK.md).
    /// Until it is there, readers also look at the version 1 keys.
    pub const LAYOUT: &str = "seckill:rm:layout";

    /// The value of [`LAYOUT`] for this layout.
    pub const LAYOUT_VERSION: &str = "2";

    /// How many hashes the customers' coupons are spread over: enough to
    /// keep each a listpack (Redis' `hash-max-listpack-entries`, 128 by
    /// default) up to about 8 million coupons at once; past that, buckets
    /// become ordinary hashes, still correct, just larger.
    pub const COUPON_BUCKETS: u32 = 65_536;

    /// The bucket of a customer: [`customer_hash`](super::customer_hash)
    /// of its id, modulo [`COUPON_BUCKETS`]. Stable across releases and
    /// processes: changing it is a new layout.
    pub fn coupon_bucket(customer: &CustomerId) -> u32 {
        super::customer_hash(customer) % COUPON_BUCKETS
    }

    /// Hash: the coupons of the customers of bucket `bucket`.
    pub fn coupon_bucket_key(bucket: u32) -> String {
        format!("seckill:rm:coupons:{{{bucket}}}")
    }

    /// The hash holding `customer`'s coupons (shared with the other
    /// customers of its bucket).
    pub fn customer_coupons(customer: &CustomerId) -> String {
        coupon_bucket_key(coupon_bucket(customer))
    }

    /// The field of `customer`'s coupon of `promotion` in its bucket.
    pub fn coupon_field(customer: &str, promotion: &str) -> String {
        format!("{customer}|{promotion}")
    }

    /// HSCAN MATCH pattern of every coupon field of `customer` (customer
    /// ids hold no glob character, see [`CustomerId`]).
    pub fn coupon_field_pattern(customer: &CustomerId) -> String {
        format!("{}|*", customer.as_str())
    }

    /// The promotion of a coupon field of `customer` (`None` when the field
    /// is another customer's).
    pub fn promotion_of_field<'a>(customer: &CustomerId, field: &'a str) -> Option<&'a str> {
        field
            .strip_prefix(customer.as_str())?
            .strip_prefix('|')
            .filter(|p| !p.is_empty())
    }

    /// A coupon as its bucket holds it: `<seq>:<grantedAtMs>`.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub struct HeldCoupon {
        /// N of couponId `<ns/name>#N`.
        pub seq: u64,
        /// Redis' clock when it was granted, epoch ms.
        pub granted_at_ms: i64,
    }

    impl HeldCoupon {
        pub fn encode(&self) -> String {
            format!("{}:{}", self.seq, self.granted_at_ms)
        }

        pub fn parse(value: &str) -> Option<Self> {
            let (seq, ms) = value.split_once(':')?;
            Some(Self {
                seq: seq.parse().ok()?,
                granted_at_ms: ms.parse().ok()?,
            })
        }
    }

    /// Hash of the version 1 layout: promotion id -> coupon JSON, one key per
    /// customer. Read only while [`LAYOUT`] is missing (an upgrade in
    /// progress), dropped by `--rebuild`.
    pub fn legacy_customer_coupons(customer: &CustomerId) -> String {
        format!("seckill:rm:customer:{{{}}}:coupons", customer.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn all_keys_of_a_promotion_share_one_hash_tag() {
        let id = PromotionId::parse("shop/sale").unwrap();
        let k = PromotionKeys::new(&id);
        for key in [&k.state, &k.customers, &k.events] {
            assert!(key.contains("{shop/sale}"), "{key}");
            assert_eq!(key.matches('{').count(), 1);
        }
        assert!(read_model::promotion(&id).contains("{shop/sale}"));
    }

    #[test]
    fn shard_zero_keys_are_the_promotions_own_and_other_shards_have_their_own_tag() {
        let id = PromotionId::parse("shop/sale").unwrap();
        let base = PromotionKeys::new(&id);
        let zero = ShardKeys::new(&id, 0, 99);
        assert_eq!(
            (zero.state, zero.customers, zero.events),
            (base.state, base.customers, base.events)
        );
        assert_eq!(zero.moves_out, "seckill:{shop/sale}:moves-out");
        assert_eq!(zero.probe, super::super::replication_probe_key(&id));
        let two = ShardKeys::new(&id, 2, 17);
        for key in [
            &two.state,
            &two.customers,
            &two.events,
            &two.moves_out,
            &two.moves_in,
            &two.probe,
        ] {
            assert!(key.contains("{shop/sale~2~17}"), "{key}");
            assert_eq!(key.matches('{').count(), 1);
        }
        assert_eq!(shard_map_key(&id), "seckill:{shop/sale}:shards");
    }

    #[test]
    fn a_customers_bucket_is_fnv1a_of_its_id_modulo_the_bucket_count() {
        // FNV-1a 32 of "a" is 0xe40c292c; of "foobar" 0xbf9cf968.
        let bucket = |s: &str| read_model::coupon_bucket(&CustomerId::parse(s).unwrap());
        assert_eq!(bucket("a"), 0xe40c_292c % 65_536);
        assert_eq!(bucket("foobar"), 0xbf9c_f968 % 65_536);
        let c = CustomerId::parse("alice").unwrap();
        let key = read_model::customer_coupons(&c);
        assert_eq!(key, format!("seckill:rm:coupons:{{{}}}", bucket("alice")));
        assert!(key.starts_with(read_model::PREFIX));
        assert!(read_model::legacy_customer_coupons(&c).starts_with(read_model::PREFIX));
    }

    #[test]
    fn coupon_fields_name_their_customer_and_promotion() {
        let alice = CustomerId::parse("alice").unwrap();
        let field = read_model::coupon_field("alice", "shop/sale");
        assert_eq!(field, "alice|shop/sale");
        assert_eq!(read_model::coupon_field_pattern(&alice), "alice|*");
        assert_eq!(
            read_model::promotion_of_field(&alice, &field),
            Some("shop/sale")
        );
        assert_eq!(
            read_model::promotion_of_field(&alice, "alicex|shop/sale"),
            None
        );
        assert_eq!(read_model::promotion_of_field(&alice, "alice|"), None);
        let held = read_model::HeldCoupon {
            seq: 7,
            granted_at_ms: 1_764_583_200_123,
        };
        assert_eq!(held.encode(), "7:1764583200123");
        assert_eq!(read_model::HeldCoupon::parse(&held.encode()), Some(held));
        assert_eq!(read_model::HeldCoupon::parse("{\"json\":1}"), None);
    }
}
