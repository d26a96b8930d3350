//! Many callers at once on one promotion, over clones of one connection (so
//! the calls are in flight together): the start and finish races that the
//! standalone and the Redis Cluster tests both run.

use seckill_workers::protocol::{self, FinishReason, PromotionId, PromotionSpec, ScheduleResult};
use seckill_workers::redis_connection::RedisConnection;

/// `callers` concurrent `schedule` calls of `spec`; their results.
pub async fn schedule_at_once(
    con: &RedisConnection,
    id: &PromotionId,
    spec: &PromotionSpec,
    callers: usize,
) -> Vec<ScheduleResult> {
    let calls = (0..callers).map(|_| {
        let (mut con, id, spec) = (con.clone(), id.clone(), spec.clone());
        tokio::spawn(async move {
            protocol::schedule(&mut con, &id, &spec)
                .await
                .expect("schedule answers")
                .result
        })
    });
    collect(calls).await
}

/// `callers` concurrent `finish` calls with `reason`; their results.
pub async fn finish_at_once(
    con: &RedisConnection,
    id: &PromotionId,
    reason: FinishReason,
    callers: usize,
) -> Vec<ScheduleResult> {
    let calls = (0..callers).map(|_| {
        let (mut con, id) = (con.clone(), id.clone());
        tokio::spawn(async move {
            protocol::finish(&mut con, &id, reason)
                .await
                .expect("finish answers")
                .result
        })
    });
    collect(calls).await
}

async fn collect(
    calls: impl Iterator<Item = tokio::task::JoinHandle<ScheduleResult>>,
) -> Vec<ScheduleResult> {
    let mut results = Vec::new();
    for call in calls.collect::<Vec<_>>() {
        results.push(call.await.expect("the call's task"));
    }
    results
}

/// How many of `results` are `wanted`.
pub fn count(results: &[ScheduleResult], wanted: ScheduleResult) -> usize {
    results.iter().filter(|r| **r == wanted).count()
}
