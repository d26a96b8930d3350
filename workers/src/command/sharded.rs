//! One batch of a sharded promotion (issue 14): customers of one home shard,
//! served by `protocol::shards::grab` (the grab at home, the start when the
//! shard is not open, the refill by stock moves when home is empty, the
//! sold-out double collect, the finish settled before anyone is told it is
//! over). Each answer is then put in the unsharded grab's terms
//! ([`answer`]), so the HTTP contract is one whatever S.

use std::sync::Arc;
use std::time::Instant;

use redis::aio::ConnectionLike;

use super::group_commit::{GrabAnswer, GrabFailure};
use super::shard_maps::Sharded;
use crate::protocol::shards::{self, ShardAnswer, ShardError};
use crate::protocol::{
    self, rfc3339_ms, CustomerId, Durability, FinishReason, GrabOutcome, PromotionId, ScriptError,
};

/// When a promotion not started yet opens, as its not-started answer says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Opening {
    pub opens_in_ms: u64,
    pub publish_time: String,
}

impl Opening {
    /// Opening at `publish_ms`, as seen at `now_ms` (both on Redis' clock).
    pub fn at(publish_ms: i64, now_ms: i64) -> Self {
        Self {
            opens_in_ms: (publish_ms - now_ms).max(0) as u64,
            publish_time: rfc3339_ms(publish_ms).unwrap_or_default(),
        }
    }
}

/// `customers` (all of home shard `home`, arrival order) grab a coupon of
/// `sharded`'s promotion: one answer each, or the failure of the whole
/// batch. The batch works on a copy of the promotion's stock view and
/// merges back what it saw, so lanes never wait for each other's view.
pub async fn grab_batch<C: ConnectionLike>(
    con: &mut C,
    sharded: &Sharded,
    home: u32,
    customers: &[CustomerId],
    durability: Option<Durability>,
) -> Result<Vec<GrabAnswer>, GrabFailure> {
    let before = sharded.view();
    let mut view = before.clone();
    let started = Instant::now();
    let answers = shards::grab(con, &sharded.map, home, customers, &mut view, durability).await;
    sharded.saw(&before, &view);
    let moves = view.moves_made() - before.moves_made();
    if let (Some(metrics), true) = (&sharded.metrics, moves > 0) {
        metrics.stock_moved(moves, started.elapsed());
    }
    let answers = answers.map_err(|e| GrabFailure::Shards(Arc::new(e)))?;
    // A shard's "not started" carries no time: shard 0's state has it
    // (rare: only grabs before the opening pay this read).
    let opening = if answers.contains(&ShardAnswer::NotStarted) {
        Some(opening(con, sharded.map.id()).await?)
    } else {
        None
    };
    Ok(answers
        .into_iter()
        .map(|a| answer(a, opening.as_ref()))
        .collect())
}

async fn opening<C: ConnectionLike>(con: &mut C, id: &PromotionId) -> Result<Opening, GrabFailure> {
    let store = |e: ScriptError| GrabFailure::Store(Arc::new(e));
    let snap = protocol::snapshot(con, id).await.map_err(store)?;
    let publish_ms = snap.publish_ms.ok_or_else(|| {
        store(ScriptError::BadReply(format!(
            "shard 0 of {id} has no publish time"
        )))
    })?;
    Ok(Opening::at(publish_ms, snap.now))
}

/// One shard answer in the unsharded grab's terms. `opening` is needed
/// only for [`ShardAnswer::NotStarted`].
///
/// A sold-out or finished answer is final here: `shards::grab` answers it
/// only once PromotionFinished is in shard 0's stream. A shard whose window
/// ended on its own clock while the finish is not recorded yet is
/// [`GrabFailure::Closing`] (503, retry), never a 410 ahead of the event.
pub fn answer(a: ShardAnswer, opening: Option<&Opening>) -> GrabAnswer {
    match a {
        // Which batch took the last coupon is known only to the sold-out
        // check, so a grant never says it sold the promotion out; the next
        // grab's 410 does.
        ShardAnswer::Granted(coupon) => Ok(GrabOutcome::Granted {
            coupon,
            sold_out: false,
        }),
        ShardAnswer::AlreadyGranted(coupon) => Ok(GrabOutcome::AlreadyGranted { coupon }),
        ShardAnswer::Unconfirmed(_) => Err(GrabFailure::Unconfirmed),
        ShardAnswer::SoldOut | ShardAnswer::Finished(FinishReason::SoldOut) => {
            Ok(GrabOutcome::SoldOut)
        }
        ShardAnswer::Finished(reason) => Ok(GrabOutcome::Finished { reason }),
        ShardAnswer::Closing(_) => Err(GrabFailure::Closing),
        ShardAnswer::NotStarted => match opening {
            Some(o) => Ok(GrabOutcome::NotStarted {
                opens_in_ms: o.opens_in_ms,
                publish_time: o.publish_time.clone(),
            }),
            None => Err(bad("not started, opening time unknown")),
        },
        // `shards::grab` refills every customer its home turned away.
        ShardAnswer::Empty => Err(bad("a shard answered empty after its refill")),
    }
}

fn bad(what: &str) -> GrabFailure {
    GrabFailure::Store(Arc::new(ScriptError::BadReply(what.into())))
}

/// Whether `e` says this worker's map of the promotion is wrong or gone:
/// the map is then read again for the next grab.
pub fn map_is_wrong(e: &ShardError) -> bool {
    matches!(
        e,
        ShardError::StaleMap { .. }
            | ShardError::Map { .. }
            | ShardError::Unknown(_)
            | ShardError::NoSuchShard { .. }
            | ShardError::NotHome { .. }
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::Coupon;

    fn coupon(n: u64) -> Coupon {
        Coupon {
            coupon_id: format!("shop/sale#{n}"),
            customer_id: "alice".into(),
            promotion: "shop/sale".into(),
            discount: 0.5,
            granted_at: "2026-12-01T21:00:00.000Z".into(),
        }
    }

    #[test]
    fn grants_and_holdings_are_the_unsharded_outcomes_and_unconfirmed_ones_the_503() {
        assert_eq!(
            answer(ShardAnswer::Granted(coupon(7)), None).unwrap(),
            GrabOutcome::Granted {
                coupon: coupon(7),
                sold_out: false
            }
        );
        assert_eq!(
            answer(ShardAnswer::AlreadyGranted(coupon(3)), None).unwrap(),
            GrabOutcome::AlreadyGranted { coupon: coupon(3) }
        );
        assert!(matches!(
            answer(ShardAnswer::Unconfirmed(coupon(3)), None),
            Err(GrabFailure::Unconfirmed)
        ));
    }

    #[test]
    fn over_is_the_unsharded_410_and_closing_is_a_retry_not_a_410() {
        assert_eq!(
            answer(ShardAnswer::SoldOut, None).unwrap(),
            GrabOutcome::SoldOut
        );
        assert_eq!(
            answer(ShardAnswer::Finished(FinishReason::SoldOut), None).unwrap(),
            GrabOutcome::SoldOut
        );
        assert_eq!(
            answer(ShardAnswer::Finished(FinishReason::Expired), None).unwrap(),
            GrabOutcome::Finished {
                reason: FinishReason::Expired
            }
        );
        assert!(matches!(
            answer(ShardAnswer::Closing(FinishReason::Expired), None),
            Err(GrabFailure::Closing)
        ));
        assert!(matches!(
            answer(ShardAnswer::Empty, None),
            Err(GrabFailure::Store(_))
        ));
    }

    #[test]
    fn not_started_says_when_it_opens_on_redis_clock() {
        let opening = Opening::at(1_764_622_800_000, 1_764_622_797_500);
        assert_eq!(
            opening,
            Opening {
                opens_in_ms: 2_500,
                publish_time: "2025-12-01T21:00:00.000Z".into()
            }
        );
        assert_eq!(Opening::at(10_000, 12_000).opens_in_ms, 0, "due already");
        assert_eq!(
            answer(ShardAnswer::NotStarted, Some(&opening)).unwrap(),
            GrabOutcome::NotStarted {
                opens_in_ms: 2_500,
                publish_time: "2025-12-01T21:00:00.000Z".into()
            }
        );
        assert!(answer(ShardAnswer::NotStarted, None).is_err());
    }

    #[test]
    fn only_errors_about_the_map_or_the_promotion_make_the_map_read_again() {
        let id = PromotionId::new("shop", "sale").unwrap();
        assert!(map_is_wrong(&ShardError::StaleMap {
            shard: 1,
            recorded: 4,
            known: 3
        }));
        assert!(map_is_wrong(&ShardError::Map {
            id,
            detail: "not ready".into()
        }));
        assert!(map_is_wrong(&ShardError::Unknown(0)));
        assert!(!map_is_wrong(&ShardError::NoProgress(64)));
        assert!(!map_is_wrong(&ShardError::NotDurable {
            step: "move_in",
            shard: 1,
            acked: 0,
            wanted: 1
        }));
    }
}
