//! The batched read of the running sales (`sales::read`) on a Redis Cluster
//! of three masters: the promotions' state hashes live in many slots on
//! every master, so no pipeline may cross them; the read still answers every
//! promotion, in order, and loads the script again on every node that lost
//! it.

use chrono::{Duration as Span, Utc};
use seckill_operator::lifecycle::drive;
use seckill_operator::promotion::PromotionSpec;
use seckill_operator::sales;
use seckill_testkit::redis_cluster::{RedisCluster, RedisClusterOptions};
use seckill_workers::protocol::{self, CustomerId, PromotionId};
use seckill_workers::redis_connection::RedisArgs;

#[tokio::test]
async fn the_running_sales_are_read_in_one_batch_across_the_masters_of_a_cluster() {
    let cluster = RedisCluster::start(RedisClusterOptions::default()).expect("redis cluster");
    let mut con = RedisArgs::for_cluster(cluster.seed_nodes())
        .connect()
        .unwrap();
    let spec = PromotionSpec {
        publish_time: Utc::now() - Span::seconds(5),
        finish_time: Utc::now() + Span::hours(1),
        number_of_coupons: 100,
        discount: 0.1,
        description: None,
        shards: 1,
    };
    let ids: Vec<PromotionId> = (0..40)
        .map(|i| PromotionId::new(&format!("shop-{}", i % 4), &format!("sale-{i}")).unwrap())
        .collect();
    let mut masters = std::collections::BTreeSet::new();
    for (i, id) in ids.iter().enumerate() {
        drive(&mut con, id, &spec, Some(1), None).await.unwrap();
        for c in 0..i % 3 {
            let customer = CustomerId::parse(&format!("c{c}")).unwrap();
            protocol::grab(&mut con, id, &customer).await.unwrap();
        }
        masters.insert(
            cluster
                .master_for_key(&protocol::PromotionKeys::new(id).state)
                .unwrap(),
        );
    }
    assert_eq!(masters.len(), 3, "the sales are spread over every master");

    // Every node forgets the scripts (as after a restart).
    for node in cluster.nodes() {
        let mut direct = redis::Client::open(node.url())
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap();
        redis::cmd("SCRIPT")
            .arg("FLUSH")
            .query_async::<()>(&mut direct)
            .await
            .unwrap();
    }

    let read = sales::read(&mut con, &ids).await.unwrap();
    let granted: Vec<u64> = read.iter().map(|s| s.granted).collect();
    let expected: Vec<u64> = (0..40).map(|i| (i % 3) as u64).collect();
    assert_eq!(granted, expected);
    assert!(read
        .iter()
        .all(|s| s.phase == Some(seckill_workers::protocol::Phase::Active)));
}
