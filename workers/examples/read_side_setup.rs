//! Prepares a Redis for the projection-lag run of `scripts/bench-read-side.sh`,
//! through the protocol module so that the script spells no key of its own:
//! schedules `bench/lag` (open since a second ago, for an hour, `COUPONS`
//! coupons) and registers it in the promotion index, as the operator does, so
//! that projectors find its stream.
//!
//! Usage: `cargo run --release -p seckill-workers --example read_side_setup -- REDIS_URL COUPONS`

use chrono::{Duration, Utc};
use seckill_workers::protocol::{self, PromotionId, PromotionSpec, PROMOTION_INDEX_KEY};
use seckill_workers::redis_connection::RedisArgs;

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let usage = "usage: read_side_setup REDIS_URL COUPONS";
    let url = args.next().ok_or(usage)?;
    let coupons: u64 = args.next().ok_or(usage)?.parse()?;
    let mut con = RedisArgs::for_url(url).connect()?;
    let now = Utc::now();
    let id = PromotionId::new("bench", "lag")?;
    let spec = PromotionSpec {
        discount: 0.8,
        number_of_coupons: coupons,
        publish_time: now - Duration::seconds(1),
        finish_time: now + Duration::hours(1),
    };
    let scheduled = protocol::schedule(&mut con, &id, &spec).await?;
    if !scheduled.started {
        return Err(format!("bench/lag did not start: {scheduled:?}").into());
    }
    let _: () = redis::cmd("SADD")
        .arg(PROMOTION_INDEX_KEY)
        .arg(id.to_string())
        .query_async(&mut con)
        .await?;
    println!("{id}");
    Ok(())
}
