//! Key names. Command-side keys of one promotion share the hash tag
//! `{namespace/name}`; read-model keys of one customer share `{customer}`.

use super::{CustomerId, PromotionId};

/// Set of every promotion id ever scheduled, so projectors find new streams
/// without scanning the keyspace of every master.
pub const PROMOTION_INDEX_KEY: &str = "seckill:promotions";

/// Consumer group through which projectors share every promotion stream.
pub const PROJECTOR_GROUP: &str = "seckill-projector";

/// The command-side keys of one promotion.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PromotionKeys {
    /// Hash: spec, phase, granted, start and finish times.
    pub state: String,
    /// Hash: customer id -> JSON of the coupon they hold.
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

/// Read-model keys, written only by projectors and read only by query workers.
pub mod read_model {
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

    /// Hash: promotion id -> JSON of the coupon the customer holds in it.
    pub fn customer_coupons(customer: &CustomerId) -> String {
        format!("seckill:rm:customer:{{{}}}:coupons", customer.as_str())
    }

    /// Hash: projection bookkeeping (last applied event time per stream).
    pub const PROGRESS: &str = "seckill:rm:progress";
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
        let c = CustomerId::parse("alice").unwrap();
        assert_eq!(
            read_model::customer_coupons(&c),
            "seckill:rm:customer:{alice}:coupons"
        );
        assert!(read_model::customer_coupons(&c).starts_with(read_model::PREFIX));
    }
}
