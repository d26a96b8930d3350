//! The Lua scripts and their typed calls. Each call is one atomic round trip
//! (EVALSHA, falling back to EVAL once after a Redis restart flushed the script
//! cache) that touches the keys of one promotion only, hence one cluster slot.
//! Every script answers one JSON document, decoded here.

use std::sync::LazyLock;

use chrono::{DateTime, SecondsFormat, Utc};
use redis::aio::ConnectionLike;
use redis::Script;
use serde::{Deserialize, Deserializer, Serialize};

use super::{CustomerId, FinishReason, Phase, PromotionId, PromotionKeys};

macro_rules! script {
    ($file:literal) => {
        concat!(include_str!("lua/prelude.lua"), "\n", include_str!($file))
    };
}

/// Source of `schedule` (register, update before start, start when due).
pub const SCHEDULE_SOURCE: &str = script!("lua/schedule.lua");
/// Source of `grab` (the hot path).
pub const GRAB_SOURCE: &str = script!("lua/grab.lua");
/// Source of `finish` (Expired or Deleted).
pub const FINISH_SOURCE: &str = script!("lua/finish.lua");
/// Source of `snapshot` (read-only state and Redis clock).
pub const SNAPSHOT_SOURCE: &str = script!("lua/snapshot.lua");

pub static SCHEDULE: LazyLock<Script> = LazyLock::new(|| Script::new(SCHEDULE_SOURCE));
pub static GRAB: LazyLock<Script> = LazyLock::new(|| Script::new(GRAB_SOURCE));
pub static FINISH: LazyLock<Script> = LazyLock::new(|| Script::new(FINISH_SOURCE));
pub static SNAPSHOT: LazyLock<Script> = LazyLock::new(|| Script::new(SNAPSHOT_SOURCE));

/// A script call failed: Redis could not be reached or answered an error, or
/// the answer was not what the script writes.
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

/// A coupon as held by a customer; the same JSON the stream's CouponGrabbed has.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Coupon {
    pub coupon_id: String,
    pub customer_id: String,
    pub promotion: String,
    pub discount: f64,
    /// RFC 3339 on Redis' clock, exactly as written into the stream.
    pub granted_at: String,
}

/// The answer of `grab`.
#[derive(Debug, Clone, PartialEq)]
pub enum GrabOutcome {
    /// A coupon was taken and CouponGrabbed appended. `sold_out` is true for the
    /// grab that took the last one (PromotionFinished{SoldOut} appended too).
    Granted {
        coupon: Coupon,
        sold_out: bool,
    },
    /// The customer already holds this coupon; nothing was written.
    AlreadyGranted {
        coupon: Coupon,
    },
    UnknownPromotion,
    /// Redis' clock is before the publish time.
    NotStarted {
        opens_in_ms: u64,
        publish_time: String,
    },
    SoldOut,
    /// Finished for a reason other than selling out (Expired, Deleted).
    Finished {
        reason: FinishReason,
    },
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct GrabReply {
    outcome: String,
    coupon: Option<Coupon>,
    #[serde(default)]
    sold_out: bool,
    opens_in_ms: Option<u64>,
    publish_time: Option<String>,
    reason: Option<String>,
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

fn rfc3339(t: &DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Millis, true)
}

/// Registers `id` with `spec` (or updates it before the start) and starts it
/// when Redis' clock has reached the publish time. Idempotent.
pub async fn schedule<C: ConnectionLike>(
    con: &mut C,
    id: &PromotionId,
    spec: &PromotionSpec,
) -> Result<Snapshot, ScriptError> {
    let keys = PromotionKeys::new(id);
    let reply: String = SCHEDULE
        .key(&keys.state)
        .key(&keys.events)
        .arg(id.to_string())
        .arg(spec.discount.to_string())
        .arg(spec.number_of_coupons)
        .arg(spec.publish_time.timestamp_millis())
        .arg(spec.finish_time.timestamp_millis())
        .arg(rfc3339(&spec.publish_time))
        .arg(rfc3339(&spec.finish_time))
        .invoke_async(con)
        .await?;
    decode(&reply)
}

/// One customer grabs one coupon of `id`: one round trip.
pub async fn grab<C: ConnectionLike>(
    con: &mut C,
    id: &PromotionId,
    customer: &CustomerId,
) -> Result<GrabOutcome, ScriptError> {
    let keys = PromotionKeys::new(id);
    let reply: String = GRAB
        .key(&keys.state)
        .key(&keys.customers)
        .key(&keys.events)
        .arg(customer.as_str())
        .invoke_async(con)
        .await?;
    decode_grab(&reply)
}

/// Decodes the JSON answer of the `grab` script.
pub(super) fn decode_grab(reply: &str) -> Result<GrabOutcome, ScriptError> {
    let r: GrabReply = decode(reply)?;
    let missing = || ScriptError::BadReply(format!("{} without coupon", r.outcome));
    Ok(match r.outcome.as_str() {
        "granted" => GrabOutcome::Granted {
            coupon: r.coupon.clone().ok_or_else(missing)?,
            sold_out: r.sold_out,
        },
        "already_granted" => GrabOutcome::AlreadyGranted {
            coupon: r.coupon.clone().ok_or_else(missing)?,
        },
        "unknown_promotion" => GrabOutcome::UnknownPromotion,
        "not_started" => GrabOutcome::NotStarted {
            opens_in_ms: r.opens_in_ms.unwrap_or(0),
            publish_time: r.publish_time.unwrap_or_default(),
        },
        "sold_out" => GrabOutcome::SoldOut,
        "finished" => GrabOutcome::Finished {
            reason: r
                .reason
                .as_deref()
                .and_then(FinishReason::parse)
                .unwrap_or(FinishReason::Expired),
        },
        other => return Err(ScriptError::BadReply(format!("unknown outcome {other}"))),
    })
}

/// Finishes `id` for `reason` (Expired is refused before the finish time by
/// Redis' clock). Idempotent: PromotionFinished is appended once.
pub async fn finish<C: ConnectionLike>(
    con: &mut C,
    id: &PromotionId,
    reason: FinishReason,
) -> Result<Snapshot, ScriptError> {
    let keys = PromotionKeys::new(id);
    let reply: String = FINISH
        .key(&keys.state)
        .key(&keys.events)
        .arg(reason.as_str())
        .invoke_async(con)
        .await?;
    decode(&reply)
}

/// Reads the command-side state of `id` and Redis' clock; writes nothing.
pub async fn snapshot<C: ConnectionLike>(
    con: &mut C,
    id: &PromotionId,
) -> Result<Snapshot, ScriptError> {
    let keys = PromotionKeys::new(id);
    let reply: String = SNAPSHOT.key(&keys.state).invoke_async(con).await?;
    decode(&reply)
}
