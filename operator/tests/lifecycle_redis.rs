//! The kube-free executor (`lifecycle::drive`, `lifecycle::finish_deleted`),
//! as `seckill up` uses it, against a real redis-server.

use std::time::Duration;

use chrono::{Duration as Span, Utc};
use seckill_operator::lifecycle::{drive, finish_deleted, ACTIVE_REFRESH};
use seckill_operator::promotion::{Phase, PromotionSpec};
use seckill_operator::Error;
use seckill_testkit::eventually;
use seckill_testkit::redis::{connect, RedisServer};
use seckill_testkit::stream::{events_of, types};
use seckill_workers::protocol::{FinishReason, PromotionId};
use seckill_workers::redis_connection::RedisConnection;

fn redis() -> (RedisServer, RedisConnection) {
    let server = seckill_testkit::redis::redis();
    let con = connect(&server);
    (server, con)
}

fn spec(publish_in: Span, length: Span) -> PromotionSpec {
    let publish = Utc::now() + publish_in;
    PromotionSpec {
        publish_time: publish,
        finish_time: publish + length,
        number_of_coupons: 5,
        discount: 0.5,
        description: None,
        shards: 1,
    }
}

/// The type names of `id`'s events, in stream order.
async fn stream(con: &mut RedisConnection, id: &PromotionId) -> Vec<&'static str> {
    types(&events_of(con, id).await)
}

#[tokio::test]
async fn a_promotion_whose_window_passed_is_started_then_expired_in_one_call() {
    let (_server, mut con) = redis();
    let id = PromotionId::new("shop", "late").unwrap();
    let s = spec(Span::seconds(-120), Span::seconds(60));
    let driven = drive(&mut con, &id, &s, None, None).await.unwrap();
    assert_eq!(driven.status.phase, Some(Phase::Finished));
    assert_eq!(driven.status.finish_reason, Some(FinishReason::Expired));
    assert_eq!(driven.requeue_after, None);
    let reasons: Vec<_> = driven.transitions.iter().map(|t| t.reason).collect();
    assert_eq!(reasons, ["Scheduled", "Started", "Finished"]);
    assert_eq!(
        stream(&mut con, &id).await,
        ["PromotionStarted", "PromotionFinished"]
    );

    // Driving it again writes nothing more.
    let again = drive(&mut con, &id, &s, None, Some(&driven.status))
        .await
        .unwrap();
    assert!(again.transitions.is_empty());
    assert_eq!(stream(&mut con, &id).await.len(), 2);
}

#[tokio::test]
async fn an_active_promotion_expires_at_its_finish_time_when_driven_on_the_requeue() {
    let (_server, con) = redis();
    // Open since a second ago, finishing 1.8 s later. A run where this
    // machine was too slow to drive it before its finish time shows nothing
    // about the requeue: it is run again with another promotion.
    let mut attempt = 0;
    let (id, s, driven) = eventually(Duration::from_secs(60), || {
        attempt += 1;
        let mut con = con.clone();
        let id = PromotionId::new("shop", &format!("short-{attempt}")).unwrap();
        async move {
            let s = spec(Span::seconds(-1), Span::milliseconds(1800));
            let first = drive(&mut con, &id, &s, Some(1), None).await.unwrap();
            if first.status.phase != Some(Phase::Active) {
                return Err(format!(
                    "{id} was {:?} at its first drive",
                    first.status.phase
                ));
            }
            // Follow the requeues as a controller would, with a bound.
            let mut driven = first;
            for _ in 0..10 {
                let Some(after) = driven.requeue_after else {
                    break;
                };
                assert!(after <= ACTIVE_REFRESH);
                tokio::time::sleep(after).await;
                let status = driven.status.clone();
                driven = drive(&mut con, &id, &s, Some(1), Some(&status))
                    .await
                    .unwrap();
            }
            Ok((id, s, driven))
        }
    })
    .await;
    let mut con = con;
    assert_eq!(driven.status.phase, Some(Phase::Finished));
    assert_eq!(driven.status.finish_reason, Some(FinishReason::Expired));
    let finished_at = driven.status.finished_at.unwrap();
    assert!(
        finished_at >= s.finish_time,
        "{finished_at} before {}",
        s.finish_time
    );
    assert_eq!(
        stream(&mut con, &id).await,
        ["PromotionStarted", "PromotionFinished"]
    );
}

#[tokio::test]
async fn an_invalid_spec_is_refused_without_touching_redis() {
    let (_server, mut con) = redis();
    let id = PromotionId::new("shop", "bad").unwrap();
    let mut s = spec(Span::seconds(10), Span::seconds(10));
    s.number_of_coupons = 0;
    match drive(&mut con, &id, &s, None, None).await {
        Err(Error::InvalidSpec(errors)) => assert_eq!(errors[0].field, "spec.numberOfCoupons"),
        other => panic!("{other:?}"),
    }
    let keys = seckill_testkit::redis::keys(&mut con, "*").await;
    assert!(keys.is_empty(), "{keys:?}");
}

#[tokio::test]
async fn finishing_a_deleted_promotion_is_idempotent_and_a_no_op_when_unknown() {
    let (_server, mut con) = redis();
    let id = PromotionId::new("shop", "gone").unwrap();
    let unknown = finish_deleted(&mut con, &id).await.unwrap();
    assert!(!unknown.exists);
    let s = spec(Span::seconds(60), Span::seconds(60));
    drive(&mut con, &id, &s, None, None).await.unwrap();
    let first = finish_deleted(&mut con, &id).await.unwrap();
    assert_eq!(first.finish_reason, Some(FinishReason::Deleted));
    finish_deleted(&mut con, &id).await.unwrap();
    // Deleted before the publish time: finished without a start.
    assert_eq!(stream(&mut con, &id).await, ["PromotionFinished"]);
}
