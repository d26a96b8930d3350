//! The lifecycle functions of the library and their typed calls: schedule,
//! finish and snapshot, what the operator and `seckill up` call. Each call is
//! one atomic `FCALL` (see [`functions::call`]) that touches the keys of one
//! promotion only, hence one cluster slot, and answers one JSON document,
//! decoded here (they are rare: JSON costs nothing that matters there).

use chrono::{DateTime, Utc};
use redis::aio::ConnectionLike;
use serde::{Deserialize, Deserializer};

use super::functions::{self, FINISH, SCHEDULE, SNAPSHOT};
use super::{rfc3339, FinishReason, Phase, PromotionId, PromotionKeys};
use crate::redis_connection::RedisConnection;

/// A function call failed: Redis could not be reached or answered an error,
/// or the answer was not what the function writes.
#[derive(Debug, thiserror::Error)]
pub enum ScriptError {
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("unexpected script reply: {0}")]
    BadReply(String),
}

/// What a promotion is, as far as the command side needs to know.
#[derive(Debug, Clone, PartialEq)]
pub struct PromotionSpec {
    pub discount: f64,
    pub number_of_coupons: u64,
    pub publish_time: DateTime<Utc>,
    pub finish_time: DateTime<Utc>,
}

/// How `schedule` treated the spec it was given.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ScheduleResult {
    /// First registration.
    Scheduled,
    /// Spec changed before the start and was taken.
    Updated,
    /// Same spec as registered.
    Unchanged,
    /// This call appended PromotionStarted.
    Started,
    /// The promotion has started; a different spec was refused.
    Locked,
    /// The key is a shard of a sharded promotion, which the unsharded
    /// functions leave alone (see `protocol::shards`).
    Sharded,
    /// Answers of other scripts: finish and snapshot.
    Finished,
    AlreadyFinished,
    NotDue,
    Unknown,
    Snapshot,
}

fn false_as_none<'de, D, T>(d: D) -> Result<Option<T>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de>,
{
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OrFalse<T> {
        Value(T),
        #[allow(dead_code)]
        Bool(bool),
    }
    Ok(match Option::<OrFalse<T>>::deserialize(d)? {
        Some(OrFalse::Value(v)) => Some(v),
        _ => None,
    })
}

/// The command-side state of a promotion with Redis' clock, as every
/// non-grab script answers it. `exists` is false for an unknown promotion.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Snapshot {
    pub result: ScheduleResult,
    pub exists: bool,
    /// Redis' clock, epoch milliseconds.
    pub now: i64,
    #[serde(default)]
    pub phase: Option<Phase>,
    #[serde(default)]
    pub started: bool,
    #[serde(default)]
    pub discount: Option<f64>,
    #[serde(default)]
    pub number_of_coupons: Option<u64>,
    #[serde(default)]
    pub granted: u64,
    #[serde(default)]
    pub publish_ms: Option<i64>,
    #[serde(default)]
    pub finish_ms: Option<i64>,
    #[serde(default, deserialize_with = "false_as_none")]
    pub started_at: Option<String>,
    #[serde(default, deserialize_with = "false_as_none")]
    pub finished_at: Option<String>,
    #[serde(default, deserialize_with = "false_as_none")]
    pub finish_reason: Option<FinishReason>,
}

impl Snapshot {
    pub fn is_finished(&self) -> bool {
        self.phase == Some(Phase::Finished)
    }

    pub fn remaining(&self) -> u64 {
        self.number_of_coupons
            .unwrap_or(0)
            .saturating_sub(self.granted)
    }
}

fn decode<T: for<'de> Deserialize<'de>>(reply: &str) -> Result<T, ScriptError> {
    serde_json::from_str(reply).map_err(|e| ScriptError::BadReply(format!("{e}: {reply}")))
}

/// The spec as every schedule function takes it, sharded or not: promotion
/// id, discount, numberOfCoupons, publish and finish time in ms, then both
/// times in RFC 3339.
pub(super) fn spec_args(id: &PromotionId, spec: &PromotionSpec) -> [String; 7] {
    [
        id.to_string(),
        spec.discount.to_string(),
        spec.number_of_coupons.to_string(),
        spec.publish_time.timestamp_millis().to_string(),
        spec.finish_time.timestamp_millis().to_string(),
        rfc3339(&spec.publish_time),
        rfc3339(&spec.finish_time),
    ]
}

/// Registers `id` with `spec` (or updates it before the start) and starts it
/// when Redis' clock has reached the publish time. Idempotent.
pub async fn schedule<C: ConnectionLike>(
    con: &mut C,
    id: &PromotionId,
    spec: &PromotionSpec,
) -> Result<Snapshot, ScriptError> {
    let keys = PromotionKeys::new(id);
    let args = spec_args(id, spec);
    let cmd = functions::command(
        SCHEDULE,
        &[&keys.state, &keys.events],
        args.iter().map(String::as_str),
    );
    let reply: String = functions::call(con, &cmd).await?;
    decode(&reply)
}

/// Finishes `id` for `reason` (Expired is refused before the finish time by
/// Redis' clock). Idempotent: PromotionFinished is appended once.
pub async fn finish<C: ConnectionLike>(
    con: &mut C,
    id: &PromotionId,
    reason: FinishReason,
) -> Result<Snapshot, ScriptError> {
    let keys = PromotionKeys::new(id);
    let cmd = functions::command(FINISH, &[&keys.state, &keys.events], [reason.as_str()]);
    let reply: String = functions::call(con, &cmd).await?;
    decode(&reply)
}

/// Reads the command-side state of `id` and Redis' clock; writes nothing.
pub async fn snapshot<C: ConnectionLike>(
    con: &mut C,
    id: &PromotionId,
) -> Result<Snapshot, ScriptError> {
    let reply: String = functions::call(con, &snapshot_command(id)).await?;
    decode(&reply)
}

pub(super) fn snapshot_command(id: &PromotionId) -> redis::Cmd {
    functions::command(SNAPSHOT, &[&PromotionKeys::new(id).state], [])
}

/// Reads the state of every promotion of `ids` in one batch (the operator's
/// poll of its running sales): one pipeline on a standalone Redis, all at
/// once on a cluster (see [`RedisConnection::query_each`]). Loads the
/// library once when Redis lacks it (a restart without persistence).
pub async fn snapshots(
    con: &mut RedisConnection,
    ids: &[PromotionId],
) -> Result<Vec<Snapshot>, ScriptError> {
    let commands = || ids.iter().map(snapshot_command).collect::<Vec<_>>();
    let replies: Vec<String> = match con.query_each(commands()).await {
        Err(e) if functions::is_not_loaded(&e) => {
            functions::load(con).await?;
            con.query_each(commands()).await?
        }
        other => other?,
    };
    replies.iter().map(|reply| decode(reply)).collect()
}
