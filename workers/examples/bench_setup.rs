//! Prepares a Redis for `scripts/bench.sh`, through the protocol module so
//! that the benchmark spells no key and no script of its own:
//!
//! - schedules `bench/http`, `bench/durable`, `bench/up` and `bench/ceiling`
//!   (open now, `COUPONS` each: one per measured server, one for the
//!   unbatched function call by `redis-benchmark`),
//! - schedules `bench/sold-out` with one coupon and takes it,
//! - loads the functions library (FUNCTION LOAD) and prints, on one line,
//!   the arguments of the grab's `FCALL` for `bench/ceiling`:
//!   `<function> 3 <state> <customers> <events>`,
//! - prints, on the next lines, the stream keys of `bench/http`,
//!   `bench/durable` and `bench/up`,
//! - then, one line each, the redis-cli arguments that answer how many
//!   coupons `bench/http`, `bench/durable` and `bench/up` have granted
//!   (`HGET <state> granted`: to count their grants around each run, as a
//!   stream entry holds a whole batch of them),
//! - and last, on one line, the customers hashes of `bench/http`,
//!   `bench/durable`, `bench/up` and `bench/ceiling` (emptied before each
//!   measure, so that every measure grows them from nothing as a sale does).
//!
//! Usage: `cargo run --release -p seckill-workers --example bench_setup -- REDIS_URL COUPONS`

use chrono::{Duration, Utc};
use seckill_workers::protocol::{self, CustomerId, PromotionId, PromotionKeys, PromotionSpec};
use seckill_workers::redis_connection::RedisArgs;

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let url = args.next().ok_or("usage: bench_setup REDIS_URL COUPONS")?;
    let coupons: u64 = args
        .next()
        .ok_or("usage: bench_setup REDIS_URL COUPONS")?
        .parse()?;
    let mut con = RedisArgs::for_url(url).connect()?;
    let now = Utc::now();
    let spec = |coupons| PromotionSpec {
        discount: 0.8,
        number_of_coupons: coupons,
        publish_time: now - Duration::seconds(1),
        finish_time: now + Duration::hours(1),
    };
    for name in ["http", "durable", "up", "ceiling"] {
        protocol::schedule(&mut con, &PromotionId::new("bench", name)?, &spec(coupons)).await?;
    }
    let sold_out = PromotionId::new("bench", "sold-out")?;
    protocol::schedule(&mut con, &sold_out, &spec(1)).await?;
    protocol::grab(&mut con, &sold_out, &CustomerId::parse("first")?).await?;

    protocol::functions::load(&mut con).await?;
    let keys = PromotionKeys::new(&PromotionId::new("bench", "ceiling")?);
    println!(
        "{} 3 {} {} {}",
        protocol::functions::GRAB.name(),
        keys.state,
        keys.customers,
        keys.events
    );
    for name in ["http", "durable", "up"] {
        println!(
            "{}",
            PromotionKeys::new(&PromotionId::new("bench", name)?).events
        );
    }
    for name in ["http", "durable", "up"] {
        println!(
            "HGET {} {}",
            PromotionKeys::new(&PromotionId::new("bench", name)?).state,
            protocol::GRANTED_FIELD
        );
    }
    let mut customers = Vec::new();
    for name in ["http", "durable", "up", "ceiling"] {
        customers.push(PromotionKeys::new(&PromotionId::new("bench", name)?).customers);
    }
    println!("{}", customers.join(" "));
    Ok(())
}
