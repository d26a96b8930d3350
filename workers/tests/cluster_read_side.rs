//! The read side on a real 3-master Redis Cluster: projection of promotions
//! spread over every master, then `--rebuild`, give the same read models.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use seckill_testkit::promotions::{index_for_projectors, spec_from_now};
use seckill_testkit::redis_cluster::{RedisCluster, RedisClusterOptions};
use seckill_workers::projector::{self, Projector, ProjectorMetrics, ProjectorOptions};
use seckill_workers::protocol::{
    self, CustomerId, GrabOutcome, PromotionId, PromotionKeys, PromotionSpec,
};
use seckill_workers::read_model::{self, CustomerCoupon, PromotionView};
use seckill_workers::redis_connection::{RedisArgs, RedisConnection};

const PROMOTIONS: usize = 12;
const COUPONS: u64 = 25;
const CUSTOMERS: usize = 60;

fn spec() -> PromotionSpec {
    spec_from_now(0.6, COUPONS, -1_000, 601_000)
}

async fn read_back(
    con: &mut RedisConnection,
    ids: &[PromotionId],
    customers: &[CustomerId],
) -> (
    BTreeMap<String, PromotionView>,
    BTreeMap<String, Vec<CustomerCoupon>>,
) {
    let mut promotions = BTreeMap::new();
    for id in ids {
        let view = read_model::promotion(con, id)
            .await
            .unwrap()
            .expect("projected");
        promotions.insert(id.to_string(), view);
    }
    let mut coupons = BTreeMap::new();
    for c in customers {
        let mut held = read_model::customer_coupons(con, c).await.unwrap();
        held.sort_by(|a, b| a.promotion.cmp(&b.promotion));
        coupons.insert(c.to_string(), held);
    }
    (promotions, coupons)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn projection_and_rebuild_on_three_masters_give_the_same_exact_read_models() {
    let cluster = RedisCluster::start(RedisClusterOptions {
        masters: 3,
        replicas_per_master: 0,
        node_timeout: Duration::from_millis(1000),
        appendfsync: None,
        extra: Vec::new(),
    })
    .expect("cluster starts");
    let mut con: RedisConnection = RedisArgs::for_cluster(cluster.seed_nodes())
        .connect()
        .unwrap();
    let ids: Vec<PromotionId> = (0..PROMOTIONS)
        .map(|n| PromotionId::new("shop", &format!("sale-{n}")).unwrap())
        .collect();
    let masters: BTreeSet<String> = ids
        .iter()
        .map(|id| {
            cluster
                .master_for_key(&PromotionKeys::new(id).events)
                .unwrap()
        })
        .collect();
    assert_eq!(masters.len(), 3, "the streams spread over every master");
    let customers: Vec<CustomerId> = (0..CUSTOMERS)
        .map(|n| CustomerId::parse(&format!("cust-{n}")).unwrap())
        .collect();

    let mut granted = BTreeMap::new();
    for id in &ids {
        protocol::schedule(&mut con, id, &spec()).await.unwrap();
        index_for_projectors(&mut con, id).await;
        for c in &customers {
            if let GrabOutcome::Granted { coupon, .. } =
                protocol::grab(&mut con, id, c).await.unwrap()
            {
                granted.insert((id.to_string(), c.to_string()), coupon.coupon_id);
            }
        }
    }
    assert_eq!(granted.len(), PROMOTIONS * COUPONS as usize);

    // A cluster has one database: the read models live beside the streams.
    let mut models = con.clone();
    let mut projector = Projector::new(
        con.clone(),
        models.clone(),
        ProjectorOptions::new("cluster-test"),
        ProjectorMetrics::unregistered(),
    );
    let report = projector.run_until_idle().await.unwrap();
    // Started + 25 grabs + Finished{SoldOut} per promotion.
    assert_eq!(report.applied, PROMOTIONS * (COUPONS as usize + 2));
    assert_eq!(report.skipped, 0);

    let live = read_back(&mut con, &ids, &customers).await;
    for (id, view) in &live.0 {
        assert_eq!(view.granted, COUPONS, "{id}");
        assert_eq!(view.remaining, 0, "{id}");
        assert_eq!(view.finish_reason.as_deref(), Some("SoldOut"), "{id}");
    }
    let held: usize = live.1.values().map(Vec::len).sum();
    assert_eq!(held, granted.len());
    for (customer, coupons) in &live.1 {
        for c in coupons {
            assert_eq!(
                granted.get(&(c.promotion.clone(), customer.clone())),
                Some(&c.coupon_id)
            );
        }
    }
    assert!(read_model::active_promotions(&mut con)
        .await
        .unwrap()
        .is_empty());

    let rebuilt_report = projector::rebuild(
        &mut con,
        &mut models,
        None,
        &ProjectorMetrics::unregistered(),
        100,
    )
    .await
    .unwrap();
    assert_eq!(rebuilt_report.streams, PROMOTIONS);
    assert!(rebuilt_report.keys_dropped > 0);
    let rebuilt = read_back(&mut con, &ids, &customers).await;
    assert_eq!(rebuilt, live);
}
