//! The batched grab function (`seckill_v3_grab`) against a real
//! redis-server: what each customer of a batch is answered, and what the
//! stream holds afterwards. Batches are built by hand here, so every case
//! (a sell-out inside a batch, a customer twice, the window's edges) is
//! exact; the worker's group commit that forms them is tested over HTTP in
//! `group_commit_http.rs`.

use seckill_testkit::promotions::{id, move_window, open_promotion, redis_now_ms, spec_between};
use seckill_testkit::redis::{connect, redis, redis_with};
use seckill_testkit::stream::{events_of, grants_of, types};
use seckill_workers::protocol::{
    self, functions, CustomerId, Event, FinishReason, GrabOutcome, PromotionKeys,
};

fn one(name: &str) -> CustomerId {
    CustomerId::parse(name).unwrap()
}

fn names(list: &[&str]) -> Vec<CustomerId> {
    list.iter().map(|n| CustomerId::parse(n).unwrap()).collect()
}

fn coupon_of(outcome: &GrabOutcome) -> &str {
    match outcome {
        GrabOutcome::Granted { coupon, .. } | GrabOutcome::AlreadyGranted { coupon } => {
            &coupon.coupon_id
        }
        other => panic!("no coupon: {other:?}"),
    }
}

#[tokio::test]
async fn a_batch_straddling_the_sell_out_grants_in_arrival_order_then_answers_sold_out() {
    let server = redis();
    let mut con = connect(&server);
    let p = open_promotion(&mut con, "sale", 3).await;
    let batch = names(&["ann", "bob", "ann", "cid", "dan", "bob", "eve"]);
    let out = protocol::grab_batch(&mut con, &p, &batch).await.unwrap();
    assert!(matches!(
        &out[0],
        GrabOutcome::Granted { sold_out: true, .. }
    ));
    assert_eq!(coupon_of(&out[0]), "shop/sale#1");
    assert_eq!(coupon_of(&out[1]), "shop/sale#2");
    assert!(
        matches!(&out[2], GrabOutcome::AlreadyGranted { coupon } if coupon.coupon_id == "shop/sale#1"),
        "the same customer twice in one batch: the second gets the first's coupon: {:?}",
        out[2]
    );
    assert_eq!(coupon_of(&out[3]), "shop/sale#3");
    assert_eq!(out[4], GrabOutcome::SoldOut, "past the last coupon");
    assert!(
        matches!(&out[5], GrabOutcome::AlreadyGranted { coupon } if coupon.coupon_id == "shop/sale#2"),
        "a holder past the last coupon still gets its own: {:?}",
        out[5]
    );
    assert_eq!(out[6], GrabOutcome::SoldOut);
    // The grant answers carry the batch's Redis time and the promotion's discount.
    let GrabOutcome::Granted { coupon, .. } = &out[0] else {
        unreachable!()
    };
    assert_eq!((coupon.discount, coupon.customer_id.as_str()), (0.8, "ann"));

    let events = events_of(&mut con, &p).await;
    assert_eq!(
        types(&events),
        [
            "PromotionStarted",
            "CouponGrabbed",
            "CouponGrabbed",
            "CouponGrabbed",
            "PromotionFinished"
        ]
    );
    let Event::PromotionFinished(f) = &events[4] else {
        unreachable!()
    };
    assert_eq!((f.reason, f.granted), (FinishReason::SoldOut, 3));
    let grants = grants_of(&mut con, &p).await;
    let in_stream: Vec<(&str, &str)> = grants
        .iter()
        .map(|g| (g.customer_id.as_str(), g.coupon_id.as_str()))
        .collect();
    assert_eq!(
        in_stream,
        [
            ("ann", "shop/sale#1"),
            ("bob", "shop/sale#2"),
            ("cid", "shop/sale#3")
        ]
    );
    assert_eq!(
        grants[0]
            .granted_at
            .to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        coupon.granted_at,
        "the 200's grantedAt is the stream's"
    );
    let snap = protocol::snapshot(&mut con, &p).await.unwrap();
    assert_eq!(snap.granted, 3);
}

#[tokio::test]
async fn a_batch_just_before_the_publish_time_is_all_not_started_and_just_after_all_served() {
    let server = redis();
    let mut con = connect(&server);
    let p = id("later");
    let now = redis_now_ms(&mut con).await;
    protocol::schedule(
        &mut con,
        &p,
        &spec_between(0.5, 10, now + 60_000, now + 3_600_000),
    )
    .await
    .unwrap();
    let batch = names(&["a", "b", "a", "c"]);
    let out = protocol::grab_batch(&mut con, &p, &batch).await.unwrap();
    assert_eq!(out.len(), 4);
    for o in &out {
        assert!(
            matches!(o, GrabOutcome::NotStarted { opens_in_ms, .. } if *opens_in_ms > 0 && *opens_in_ms <= 60_000),
            "{o:?}"
        );
    }
    assert!(events_of(&mut con, &p).await.is_empty(), "nothing written");

    // The publish time has just passed by Redis' clock, the operator has
    // not started it: the batch starts it and is served in arrival order.
    let now = redis_now_ms(&mut con).await;
    move_window(&mut con, &p, now - 1, now + 3_600_000).await;
    let out = protocol::grab_batch(&mut con, &p, &batch).await.unwrap();
    let coupons: Vec<&str> = out.iter().map(coupon_of).collect();
    assert_eq!(
        coupons,
        [
            "shop/later#1",
            "shop/later#2",
            "shop/later#1",
            "shop/later#3"
        ]
    );
    assert!(matches!(out[2], GrabOutcome::AlreadyGranted { .. }));
    assert_eq!(
        types(&events_of(&mut con, &p).await),
        [
            "PromotionStarted",
            "CouponGrabbed",
            "CouponGrabbed",
            "CouponGrabbed"
        ]
    );
}

#[tokio::test]
async fn holders_get_their_coupon_after_sold_out_expired_and_deleted_and_others_do_not() {
    let server = redis();
    let mut con = connect(&server);
    // Each way a sale ends: the last coupon taken, the finish time passed
    // (by Redis' clock, the batch finishes it), the promotion deleted.
    for (name, coupons, reason) in [
        ("sold", 1, FinishReason::SoldOut),
        ("expired", 5, FinishReason::Expired),
        ("deleted", 5, FinishReason::Deleted),
    ] {
        let p = open_promotion(&mut con, name, coupons).await;
        protocol::grab(&mut con, &p, &one("alice")).await.unwrap();
        let refused = match reason {
            FinishReason::SoldOut => GrabOutcome::SoldOut,
            FinishReason::Expired => {
                let now = redis_now_ms(&mut con).await;
                move_window(&mut con, &p, now - 60_000, now - 1).await;
                GrabOutcome::Finished { reason }
            }
            FinishReason::Deleted => {
                protocol::finish(&mut con, &p, reason).await.unwrap();
                GrabOutcome::Finished { reason }
            }
        };
        let out = protocol::grab_batch(&mut con, &p, &names(&["bob", "alice"]))
            .await
            .unwrap();
        assert_eq!(out[0], refused, "{name}");
        let held = format!("shop/{name}#1");
        assert!(
            matches!(&out[1], GrabOutcome::AlreadyGranted { coupon } if coupon.coupon_id == held),
            "{name}: {:?}",
            out[1]
        );
        assert!(
            matches!(
                events_of(&mut con, &p).await.last(),
                Some(Event::PromotionFinished(f)) if f.reason == reason && f.granted == 1
            ),
            "{name}"
        );
    }
}

#[tokio::test]
async fn a_coupon_held_in_the_version_1_json_layout_is_still_answered() {
    let server = redis();
    let mut con = connect(&server);
    let p = open_promotion(&mut con, "old", 5).await;
    let v1 = r#"{"couponId":"shop/old#9","customerId":"olga","promotion":"shop/old","discount":0.7,"grantedAt":"2026-11-26T10:00:00.123Z"}"#;
    let _: () = redis::cmd("HSET")
        .arg(PromotionKeys::new(&p).customers)
        .arg("olga")
        .arg(v1)
        .query_async(&mut con)
        .await
        .unwrap();
    let out = protocol::grab(&mut con, &p, &one("olga")).await.unwrap();
    let GrabOutcome::AlreadyGranted { coupon } = out else {
        panic!("{out:?}")
    };
    assert_eq!(coupon.coupon_id, "shop/old#9");
    assert_eq!(coupon.discount, 0.7);
    assert_eq!(coupon.granted_at, "2026-11-26T10:00:00.123Z");
}

#[tokio::test]
async fn the_library_is_loaded_again_after_a_redis_restart_without_persistence() {
    let mut server = redis_with(None);
    let mut con = connect(&server);
    let p = open_promotion(&mut con, "sale", 5).await;
    assert!(matches!(
        protocol::grab(&mut con, &p, &one("a")).await.unwrap(),
        GrabOutcome::Granted { .. }
    ));
    server.restart().unwrap();
    // Nothing survived, the library included: the first call finds no
    // function, loads the library and is answered.
    let snap = seckill_testkit::eventually(std::time::Duration::from_secs(30), || {
        let mut con = con.clone();
        let p = p.clone();
        async move { protocol::snapshot(&mut con, &p).await }
    })
    .await;
    assert!(!snap.exists, "the restart kept nothing");
    let list: redis::Value = redis::cmd("FUNCTION")
        .arg("LIST")
        .query_async(&mut con)
        .await
        .unwrap();
    assert!(
        format!("{list:?}").contains(functions::LIBRARY_NAME),
        "loaded again: {list:?}"
    );
    // The same holds for the grab itself, and the lifecycle functions.
    let _: () = redis::cmd("FUNCTION")
        .arg("FLUSH")
        .query_async(&mut con)
        .await
        .unwrap();
    let p = open_promotion(&mut con, "again", 5).await;
    let _: () = redis::cmd("FUNCTION")
        .arg("FLUSH")
        .query_async(&mut con)
        .await
        .unwrap();
    assert!(matches!(
        protocol::grab(&mut con, &p, &one("a")).await.unwrap(),
        GrabOutcome::Granted { .. }
    ));
}
