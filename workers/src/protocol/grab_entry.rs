//! CouponGrabbed version 2: the stream entry of one grant, plain fields and
//! no JSON, so that the grab function writes it without cjson:
//! `type CouponGrabbed version 2 customerId <id> seq <n> grantedAtMs <ms>`.
//! The promotion is the stream's own, the couponId `<ns/name>#<seq>`, the
//! discount the promotion's. Named here once; `functions/grab.lua` spells the
//! same literals, which a test below checks.

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
/// The value of [`TYPE_FIELD`].
pub const TYPE: &str = "CouponGrabbed";
/// The value of [`VERSION_FIELD`].
pub const VERSION: u32 = 2;

#[cfg(test)]
mod tests {
    use super::*;

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
