//! Stock shards (issue 14): one promotion's stock split over S shards, each a
//! full copy of the command-side keys under its own hash tag
//! ([`ShardKeys`]), so that one hot promotion spreads over the masters of a
//! Redis Cluster. The Lua side is `functions/shards.lua`; this module is its
//! typed caller, one function per step, so that the worker, the operator and
//! the tests all take the same steps (and a test can stop between any two).
//!
//! What holds it together:
//! * stock is a set of coupon numbers, each at all times in exactly one
//!   place: a shard's ranges, a customer's coupon, or one pending move;
//! * a customer is granted only on their home shard ([`home_shard`]), so the
//!   one-coupon rule stays one slot's HSETNX;
//! * a stock move takes three one-slot steps ([`move_out`], [`move_in`],
//!   [`move_done`]), recorded so that anyone completes an interrupted one
//!   ([`recover`]): always rolled forward, never undone;
//! * the durability rule: a step on one slot is taken on the strength of a
//!   step on another only once the earlier is on `n` replicas (FCALL, probe
//!   write and `WAIT` in one pipeline: pass `Some(Durability)`), so a
//!   failover can never lose a step another slot already built upon;
//! * exactly one PromotionStarted and one PromotionFinished, both in shard
//!   0's stream: the start is decided on shard 0 ([`start`]), a sell-out by
//!   the double collect ([`sold_out_decision`], [`check_sold_out`]), Expired
//!   and Deleted in three resumable phases ([`finish`]).
//!
//! S = 1 is the unsharded promotion, keys and functions unchanged: the
//! composed calls ([`schedule`], [`grab`], [`finish`]) take the unsharded
//! path when the promotion has no shard map.

use std::sync::Arc;

use redis::aio::ConnectionLike;
use redis::{Cmd, Value};

use super::durability::call_then_wait;
use super::functions::{
    self, Function, FINISH_BEGIN, FINISH_COMMIT, FINISH_SOLDOUT, MOVES_PENDING, MOVE_DONE, MOVE_IN,
    MOVE_OUT, SHARD_CLOSE, SHARD_COLLECT, SHARD_GRAB, SHARD_OPEN, SHARD_PLAN, SHARD_READY,
    SHARD_REPLAN, SHARD_SCHEDULE, SHARD_START,
};
use super::grab::{bad, coupon, customers_of, granted_at, held_coupon, int, text};
use super::keys::shard_map_key;
use super::lifecycle::spec_args;
use super::placement::{home_shard, Placement};
use super::ranges::{initial_deal, NumberRanges};
use super::{
    Coupon, CustomerId, Durability, FinishReason, GrabOutcome, PromotionId, PromotionSpec,
    ScheduleResult, ScriptError, ShardKeys,
};

/// The donor gives max(waiting, ⌈stock / MOVE_DIVISOR⌉) numbers: half its
/// stock, so a drained shard is refilled for a while, not per customer.
pub const MOVE_DIVISOR: u64 = 2;

/// Most refill rounds one batch of waiting customers goes through before its
/// caller is told to retry. Every move with a waiting customer grants at
/// least one coupon, so this bounds only a storm of concurrent finishers.
const MAX_REFILL_ROUNDS: usize = 64;

/// A step failed or could not be taken safely.
#[derive(Debug, thiserror::Error)]
pub enum ShardError {
    /// Redis failed or answered nonsense: the step's outcome is unknown
    /// (every step is safe to retry or to recover).
    #[error(transparent)]
    Script(#[from] ScriptError),
    /// The step ran on the master but fewer replicas than asked
    /// acknowledged it: nothing on another slot may build on it yet. A
    /// move step is left for [`recover`]; the caller answers 503.
    #[error("{step} on shard {shard} acknowledged by {acked} of {wanted} replica(s)")]
    NotDurable {
        step: &'static str,
        shard: u32,
        acked: u32,
        wanted: u32,
    },
    /// The shard records another S than the caller's map: re-read the map.
    #[error("shard {shard} has {recorded} shards, the caller's map {known}")]
    StaleMap {
        shard: u32,
        recorded: u32,
        known: u32,
    },
    /// No such shard (or promotion) in Redis.
    #[error("shard {0} does not exist")]
    Unknown(u32),
    /// The caller named a shard its map does not have.
    #[error("shard {shard} is not one of {shards}")]
    NoSuchShard { shard: u32, shards: u32 },
    /// The caller passed a customer whose home is another shard.
    #[error("customer {customer} does not live on shard {shard}")]
    NotHome { customer: String, shard: u32 },
    /// The shard is Pending past its publish time: start the promotion
    /// ([`start`]) and try again.
    #[error("shard {shard} is not open yet (publish {publish_ms}, now {now_ms})")]
    NotOpen {
        shard: u32,
        publish_ms: i64,
        now_ms: i64,
    },
    /// The shard map cannot be used (not ready, unreadable).
    #[error("shard map of {id}: {detail}")]
    Map { id: PromotionId, detail: String },
    /// A batch's waiting customers found no stock and no verdict within
    /// `MAX_REFILL_ROUNDS`: the caller answers 503 (retry).
    #[error("no stock and no sold-out verdict after {0} rounds")]
    NoProgress(usize),
}

impl From<redis::RedisError> for ShardError {
    fn from(e: redis::RedisError) -> Self {
        Self::Script(e.into())
    }
}

/// The shard map of one promotion as callers hold it: S, each shard's salt
/// and keys. Locked once the promotion has started, so it is cached for the
/// promotion's life.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardMap {
    id: PromotionId,
    /// Salt of every shard (0 for shard 0).
    salts: Vec<u32>,
    keys: Vec<ShardKeys>,
}

impl ShardMap {
    /// The map of an unsharded promotion (S = 1): shard 0 only.
    pub fn unsharded(id: &PromotionId) -> Self {
        Self::new(id, &[])
    }

    /// The map with shards 1.. salted `salts` (S = salts + 1).
    pub fn new(id: &PromotionId, salts: &[u32]) -> Self {
        let salts: Vec<u32> = std::iter::once(0).chain(salts.iter().copied()).collect();
        let keys = salts
            .iter()
            .enumerate()
            .map(|(i, &salt)| ShardKeys::new(id, i as u32, salt))
            .collect();
        Self {
            id: id.clone(),
            salts,
            keys,
        }
    }

    pub fn id(&self) -> &PromotionId {
        &self.id
    }

    /// S.
    pub fn shards(&self) -> u32 {
        self.salts.len() as u32
    }

    pub fn is_sharded(&self) -> bool {
        self.shards() > 1
    }

    /// The keys of shard `shard`, if it is one of this map's.
    pub fn keys(&self, shard: u32) -> Option<&ShardKeys> {
        self.keys.get(shard as usize)
    }

    /// [`keys`](Self::keys), or the error every step answers for a shard
    /// the map does not have.
    fn shard(&self, shard: u32) -> Result<&ShardKeys, ShardError> {
        self.keys(shard).ok_or(ShardError::NoSuchShard {
            shard,
            shards: self.shards(),
        })
    }

    /// Refuses a customer whose home is not `shard`: a grant there would
    /// put them beyond the one-slot check of the one-coupon rule. (Lua does
    /// not recompute homes: a 64-bit hash in Lua 5.1 costs more than the
    /// grab it guards.)
    fn check_homes(&self, shard: u32, customers: &[CustomerId]) -> Result<(), ShardError> {
        match customers.iter().find(|c| self.home(c) != shard) {
            Some(c) => Err(ShardError::NotHome {
                customer: c.as_str().to_owned(),
                shard,
            }),
            None => Ok(()),
        }
    }

    /// The salts of shards 1.. as the map records them.
    pub fn salts(&self) -> &[u32] {
        &self.salts[1..]
    }

    /// The home shard of `customer`.
    pub fn home(&self, customer: &CustomerId) -> u32 {
        home_shard(customer, self.shards())
    }
}

/// Runs `function` on one shard: a plain `FCALL`, or with `durable` the
/// durability rule's pipeline. Answers the reply and whether it is durable
/// (always, without `durable`).
async fn run<C: ConnectionLike>(
    con: &mut C,
    keys: &ShardKeys,
    function: Function,
    fkeys: &[&str],
    args: &[String],
    durable: Option<Durability>,
) -> Result<(Value, Option<(u32, u32)>), ShardError> {
    let cmd = functions::command(function, fkeys, args.iter().map(String::as_str));
    match durable {
        None => Ok((functions::call(con, &cmd).await?, None)),
        Some(d) => {
            let mut refresh = Cmd::new();
            refresh.arg("EXISTS").arg(&keys.probe);
            let (reply, acked) = call_then_wait(con, cmd, &keys.probe, &refresh, d).await?;
            Ok((reply, Some((acked, d.wanted()))))
        }
    }
}

/// [`run`] for a step whose effect another slot relies on: short of the
/// replicas asked for, it is [`ShardError::NotDurable`].
async fn run_step<C: ConnectionLike>(
    con: &mut C,
    shard: u32,
    keys: &ShardKeys,
    function: Function,
    fkeys: &[&str],
    args: &[String],
    durable: Option<Durability>,
) -> Result<Value, ShardError> {
    let (reply, acks) = run(con, keys, function, fkeys, args, durable).await?;
    match acks {
        Some((acked, wanted)) if acked < wanted => Err(ShardError::NotDurable {
            step: function.name(),
            shard,
            acked,
            wanted,
        }),
        _ => Ok(reply),
    }
}

fn items(v: Value, what: &str) -> Result<Vec<Value>, ShardError> {
    match v {
        Value::Array(items) => Ok(items),
        other => Err(bad(format!("{what}: {other:?}")).into()),
    }
}

fn item_text(items: &[Value], i: usize, what: &str) -> Result<String, ShardError> {
    items
        .get(i)
        .and_then(text)
        .map(str::to_owned)
        .ok_or_else(|| bad(format!("{what}: item {i} of {items:?}")).into())
}

fn item_int(items: &[Value], i: usize, what: &str) -> Result<i64, ShardError> {
    items
        .get(i)
        .and_then(int)
        .ok_or_else(|| bad(format!("{what}: item {i} of {items:?}")).into())
}

fn item_u64(items: &[Value], i: usize, what: &str) -> Result<u64, ShardError> {
    Ok(item_int(items, i, what)?.max(0) as u64)
}

fn reason(s: &str) -> Result<FinishReason, ShardError> {
    FinishReason::parse(s).ok_or_else(|| bad(format!("finish reason {s:?}")).into())
}

// ---------------------------------------------------------------- the map

/// A shard map as recorded on shard 0's slot, ready or not.
#[derive(Debug, Clone)]
pub struct RecordedMap {
    pub map: ShardMap,
    /// Every shard is scheduled: shard 0 may start the promotion.
    pub ready: bool,
}

/// Reads the shard map of `id` as recorded (one HMGET on shard 0's slot):
/// `None` when there is none (an unsharded promotion).
pub async fn read_map<C: ConnectionLike>(
    con: &mut C,
    id: &PromotionId,
) -> Result<Option<RecordedMap>, ShardError> {
    let (count, salts, ready): (Option<u32>, Option<String>, Option<String>) = redis::cmd("HMGET")
        .arg(shard_map_key(id))
        .arg("count")
        .arg("salts")
        .arg("ready")
        .query_async(con)
        .await
        .map_err(ScriptError::from)?;
    let Some(count) = count else {
        return Ok(None);
    };
    Ok(Some(RecordedMap {
        map: map_from(id, count, salts.as_deref().unwrap_or_default())?,
        ready: ready.as_deref() == Some("1"),
    }))
}

/// Reads the shard map of `id` to serve it: the unsharded map when there
/// is none. A map not yet `ready` is an error: its promotion cannot be
/// served until every shard is scheduled.
pub async fn load_map<C: ConnectionLike>(
    con: &mut C,
    id: &PromotionId,
) -> Result<ShardMap, ShardError> {
    match read_map(con, id).await? {
        None => Ok(ShardMap::unsharded(id)),
        Some(RecordedMap { ready: false, .. }) => Err(ShardError::Map {
            id: id.clone(),
            detail: "not ready: shards are being scheduled".into(),
        }),
        Some(RecordedMap { map, .. }) => Ok(map),
    }
}

fn map_from(id: &PromotionId, count: u32, salts: &str) -> Result<ShardMap, ShardError> {
    let salts: Vec<u32> = salts
        .split(',')
        .filter(|s| !s.is_empty())
        .map(str::parse)
        .collect::<Result<_, _>>()
        .map_err(|_| ShardError::Map {
            id: id.clone(),
            detail: format!("salts {salts:?}"),
        })?;
    if salts.len() + 1 != count as usize {
        return Err(ShardError::Map {
            id: id.clone(),
            detail: format!("count {count} with {} salts", salts.len()),
        });
    }
    Ok(ShardMap::new(id, &salts))
}

/// Records `placement`'s salts as `id`'s shard map, unless a map is
/// recorded already: the first plan wins, and every caller continues with
/// the recorded one (two operators that saw different topologies agree).
pub async fn plan<C: ConnectionLike>(
    con: &mut C,
    id: &PromotionId,
    placement: &Placement,
) -> Result<ShardMap, ShardError> {
    let shards = placement.salts.len() + 1;
    let salts = placement
        .salts
        .iter()
        .map(u32::to_string)
        .collect::<Vec<_>>()
        .join(",");
    let map_key = shard_map_key(id);
    let cmd = functions::command(
        SHARD_PLAN,
        &[&map_key],
        [
            shards.to_string().as_str(),
            salts.as_str(),
            placement.describe(id).as_str(),
        ],
    );
    let reply: Vec<Option<String>> = functions::call(con, &cmd).await?;
    let count = reply
        .first()
        .cloned()
        .flatten()
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| bad(format!("shard plan: {reply:?}")))?;
    map_from(
        id,
        count,
        reply.get(1).cloned().flatten().as_deref().unwrap_or(""),
    )
}

/// What [`replan`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Replan {
    /// The map was replaced (`ready` 0 until [`schedule`] runs again; for
    /// S = 1 the map and shard 0's state are gone, and the unsharded
    /// schedule registers it afresh). `dropped` old shards the new plan does
    /// not keep were deleted.
    Replanned { dropped: u32 },
    /// The promotion has started: its shards are locked.
    Started,
    /// No map is recorded: [`plan`] instead.
    Unplanned,
}

/// Replaces `id`'s shard map before the start (a changed `spec.shards`,
/// docs/SHARDING.md): atomically on shard 0's slot, refused once shard 0 has
/// started; then deletes the keys of the old shards >= 1 the new plan does
/// not keep (Pending, so nothing was granted and no stock moved: they hold
/// a spec and a block of numbers only). `placement` None means S = 1.
/// Shards the new plan keeps are rewritten by the next [`schedule`]
/// (`updated`, as their S differs).
pub async fn replan<C: ConnectionLike>(
    con: &mut C,
    id: &PromotionId,
    placement: Option<&Placement>,
) -> Result<Replan, ShardError> {
    let (shards, salts, describe) = match placement {
        Some(p) => (
            p.salts.len() + 1,
            p.salts
                .iter()
                .map(u32::to_string)
                .collect::<Vec<_>>()
                .join(","),
            p.describe(id),
        ),
        None => (1, String::new(), String::new()),
    };
    let map_key = shard_map_key(id);
    let state0 = ShardKeys::new(id, 0, 0).state;
    let cmd = functions::command(
        SHARD_REPLAN,
        &[&map_key, &state0],
        [
            shards.to_string().as_str(),
            salts.as_str(),
            describe.as_str(),
        ],
    );
    let reply: Value = functions::call(con, &cmd).await?;
    let it = items(reply, "shard replan")?;
    match item_text(&it, 0, "shard replan")?.as_str() {
        "replanned" => {}
        "started" => return Ok(Replan::Started),
        "unplanned" => return Ok(Replan::Unplanned),
        other => return Err(bad(format!("shard replan: {other:?}")).into()),
    }
    let count: u32 = item_text(&it, 1, "shard replan")?
        .parse()
        .map_err(|_| bad(format!("shard replan: {it:?}")))?;
    let old = map_from(id, count, &item_text(&it, 2, "shard replan")?)?;
    let kept = placement.map_or(&[][..], |p| &p.salts[..]);
    let mut dropped = 0;
    for (i, salt) in old.salts().iter().enumerate() {
        if kept.get(i) == Some(salt) {
            continue;
        }
        let k = ShardKeys::new(id, i as u32 + 1, *salt);
        redis::cmd("DEL")
            .arg(&k.state)
            .arg(&k.customers)
            .arg(&k.events)
            .arg(&k.moves_out)
            .arg(&k.moves_in)
            .arg(&k.probe)
            .query_async::<i64>(con)
            .await?;
        dropped += 1;
    }
    Ok(Replan::Replanned { dropped })
}

/// How a shard treated the spec it was given.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShardScheduled {
    Scheduled,
    Unchanged,
    /// Pending, nothing granted: spec and numbers rewritten.
    Updated,
    /// Started: a different spec was refused.
    Locked,
}

/// Registers every shard of `map` with `spec`: shards 1.. first, then
/// shard 0, then `ready`, so shard 0 cannot start before every shard exists.
/// Each shard gets its block of the initial deal. For S = 1 this is the
/// unsharded schedule (which also starts the promotion when due). Answers
/// each shard's result, shard 0 first.
pub async fn schedule<C: ConnectionLike>(
    con: &mut C,
    map: &ShardMap,
    spec: &PromotionSpec,
    durable: Option<Durability>,
) -> Result<Vec<ShardScheduled>, ShardError> {
    if !map.is_sharded() {
        let snap = super::schedule(con, map.id(), spec).await?;
        return Ok(vec![match snap.result {
            ScheduleResult::Locked => ShardScheduled::Locked,
            ScheduleResult::Updated => ShardScheduled::Updated,
            ScheduleResult::Unchanged => ShardScheduled::Unchanged,
            ScheduleResult::Sharded => {
                return Err(ShardError::Map {
                    id: map.id().clone(),
                    detail: "the promotion is sharded: re-read its map".into(),
                })
            }
            _ => ShardScheduled::Scheduled,
        }]);
    }
    let s = map.shards();
    if spec.number_of_coupons < u64::from(s) {
        return Err(ShardError::Map {
            id: map.id().clone(),
            detail: format!(
                "{s} shards for {} coupons: every shard needs one",
                spec.number_of_coupons
            ),
        });
    }
    let deal = initial_deal(spec.number_of_coupons, s);
    let mut results = vec![ShardScheduled::Unchanged; s as usize];
    for shard in (1..s).chain([0]) {
        let keys = map.shard(shard)?;
        let mut args = Vec::from(spec_args(map.id(), spec));
        args.extend([
            shard.to_string(),
            s.to_string(),
            deal[shard as usize].to_string(),
        ]);
        let reply = run_step(
            con,
            shard,
            keys,
            SHARD_SCHEDULE,
            &[&keys.state],
            &args,
            durable,
        )
        .await?;
        results[shard as usize] = match text(&reply).unwrap_or_default() {
            "scheduled" => ShardScheduled::Scheduled,
            "unchanged" => ShardScheduled::Unchanged,
            "updated" => ShardScheduled::Updated,
            "locked" => ShardScheduled::Locked,
            other => return Err(bad(format!("shard schedule: {other:?}")).into()),
        };
    }
    let map_key = shard_map_key(map.id());
    functions::call::<_, Value>(con, &functions::command(SHARD_READY, &[&map_key], [])).await?;
    Ok(results)
}

/// What starting a sharded promotion found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Start {
    /// PromotionStarted is in shard 0's stream (by this call or an earlier
    /// one) and every shard is open.
    Started { started_at: String },
    /// Shard 0's clock has not reached the publish time.
    NotDue { ms_left: i64 },
    /// Not every shard is scheduled yet.
    NotReady,
    /// Finished before it started (Deleted).
    Finished(FinishReason),
}

/// Starts `map`'s promotion on shard 0's clock (the one PromotionStarted,
/// once `ready`), then, once Started is durable, opens shards 1.. (Pending
/// -> Active). Idempotent: the operator at publish time and any worker
/// answered [`ShardError::NotOpen`] run it.
pub async fn start<C: ConnectionLike>(
    con: &mut C,
    map: &ShardMap,
    durable: Option<Durability>,
) -> Result<Start, ShardError> {
    let k0 = map.shard(0)?;
    let map_key = shard_map_key(map.id());
    let reply = run_step(
        con,
        0,
        k0,
        SHARD_START,
        &[&k0.state, &k0.events, &map_key],
        &[],
        durable,
    )
    .await?;
    let it = items(reply, "shard start")?;
    let started_at = match item_text(&it, 0, "shard start")?.as_str() {
        "started" => item_text(&it, 1, "shard start")?,
        "not_due" => {
            return Ok(Start::NotDue {
                ms_left: item_int(&it, 1, "shard start")?,
            })
        }
        "not_ready" => return Ok(Start::NotReady),
        "finished" => return Ok(Start::Finished(reason(&item_text(&it, 1, "start")?)?)),
        "unknown" => return Err(ShardError::Unknown(0)),
        other => return Err(bad(format!("shard start: {other:?}")).into()),
    };
    for shard in 1..map.shards() {
        let keys = map.shard(shard)?;
        let args = [started_at.clone()];
        run(con, keys, SHARD_OPEN, &[&keys.state], &args, None).await?;
    }
    Ok(Start::Started { started_at })
}

// ---------------------------------------------------------------- the grab

/// A shard's phase (shard 0 also passes through Closing).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShardPhase {
    Pending,
    Active,
    Closing,
    Finished,
}

impl ShardPhase {
    fn parse(s: &str) -> Result<Self, ShardError> {
        Ok(match s {
            "Pending" => Self::Pending,
            "Active" => Self::Active,
            "Closing" => Self::Closing,
            "Finished" => Self::Finished,
            other => return Err(bad(format!("shard phase {other:?}")).into()),
        })
    }
}

/// One customer's answer from a shard.
#[derive(Debug, Clone, PartialEq)]
pub enum ShardAnswer {
    /// Granted by this call (CouponGrabbed appended on this shard).
    Granted(Coupon),
    /// The customer already holds this coupon.
    AlreadyGranted(Coupon),
    /// Granted or held on the master, but fewer replicas than asked
    /// acknowledged it: answer 503 (retry), never 200.
    Unconfirmed(Coupon),
    /// This shard has no stock; the promotion may still have some (refill).
    Empty,
    SoldOut,
    Finished(FinishReason),
    /// The window ended on this shard's clock, or shard 0 is closing: the
    /// caller drives the finish and answers once PromotionFinished exists.
    Closing(FinishReason),
    NotStarted,
}

impl ShardAnswer {
    /// The coupon this answer promises (a 200), if any.
    pub fn coupon(&self) -> Option<&Coupon> {
        match self {
            Self::Granted(c) | Self::AlreadyGranted(c) => Some(c),
            _ => None,
        }
    }
}

/// What a shard's grab (or a move's step 2) answered: the shard's figures
/// after the call and one answer per customer, in order.
#[derive(Debug, Clone, PartialEq)]
pub struct ShardBatch {
    /// For step 2: whether this call added the move's numbers (`false`: a
    /// replay, nothing added). Always `false` for a grab.
    pub applied: bool,
    /// The shard's clock, epoch ms.
    pub now_ms: i64,
    pub stock: u64,
    pub granted: u64,
    pub epoch: u64,
    pub pending: u64,
    pub phase: ShardPhase,
    pub answers: Vec<ShardAnswer>,
    /// With the durability rule: (replicas that acknowledged, replicas
    /// asked for). Grants of a batch short of them are
    /// [`ShardAnswer::Unconfirmed`].
    pub acks: Option<(u32, u32)>,
}

impl ShardBatch {
    /// Whether the replicas asked for acknowledged the call (always without
    /// the durability rule).
    pub fn durable(&self) -> bool {
        acked_enough(self.acks)
    }

    /// The error of a step that another slot would build on while it is not
    /// durable.
    fn not_durable(&self, step: Function, shard: u32) -> ShardError {
        let (acked, wanted) = self.acks.unwrap_or((0, 0));
        ShardError::NotDurable {
            step: step.name(),
            shard,
            acked,
            wanted,
        }
    }
}

/// Decodes the lines of a shard grab or step 2 (see `functions/shards.lua`).
fn decode_batch(
    map: &ShardMap,
    shard: u32,
    customers: &[CustomerId],
    reply: Value,
    acks: Option<(u32, u32)>,
) -> Result<ShardBatch, ShardError> {
    let durable = acked_enough(acks);
    let lines = match reply {
        Value::BulkString(b) => String::from_utf8(b).map_err(|_| bad("shard grab: not UTF-8"))?,
        Value::Array(items) => {
            return Err(match items.first().and_then(text).unwrap_or_default() {
                "unknown" => ShardError::Unknown(shard),
                "stale_map" => ShardError::StaleMap {
                    shard,
                    recorded: items.get(1).and_then(int).unwrap_or(0) as u32,
                    known: map.shards(),
                },
                "not_open" => ShardError::NotOpen {
                    shard,
                    publish_ms: items.get(1).and_then(int).unwrap_or(0),
                    now_ms: items.get(2).and_then(int).unwrap_or(0),
                },
                other => bad(format!("shard grab: {other:?}")).into(),
            })
        }
        other => return Err(bad(format!("shard grab: {other:?}")).into()),
    };
    let mut it = lines.split('\n');
    let mut head = |what: &str| {
        it.next()
            .ok_or_else(|| ShardError::from(bad(format!("shard grab: no {what}"))))
    };
    let kind = head("kind")?;
    let num = |s: &str, what: &str| -> Result<i64, ShardError> {
        s.parse()
            .map_err(|_| bad(format!("shard grab: {what} {s:?}")).into())
    };
    let applied = match kind {
        "ok" | "replayed" => false,
        "applied" => true,
        other => return Err(bad(format!("shard grab: kind {other:?}")).into()),
    };
    let now_ms = num(head("time")?, "time")?;
    let stock = num(head("stock")?, "stock")?.max(0) as u64;
    let granted = num(head("granted")?, "granted")?.max(0) as u64;
    let epoch = num(head("epoch")?, "epoch")?.max(0) as u64;
    let pending = num(head("pending")?, "pending")?.max(0) as u64;
    let phase = ShardPhase::parse(head("phase")?)?;
    let discount_text = head("discount")?;
    let discount: f64 = if discount_text.is_empty() {
        0.0
    } else {
        discount_text
            .parse()
            .map_err(|_| bad(format!("shard grab: discount {discount_text:?}")))?
    };
    let promotion = map.id().to_string();
    let granted_now = granted_at(now_ms)?;
    let mut answers = Vec::with_capacity(customers.len());
    let mut customer_of = customers.iter();
    for line in it {
        let customer = customer_of
            .next()
            .ok_or_else(|| bad(format!("shard grab: more answers than {}", customers.len())))?;
        let answer = match line.split_at_checked(1) {
            Some(("g", n)) => {
                let n: u64 = n
                    .parse()
                    .map_err(|_| bad(format!("shard grab: seq {n:?}")))?;
                ShardAnswer::Granted(coupon(
                    &promotion,
                    customer,
                    discount,
                    n,
                    granted_now.clone(),
                ))
            }
            Some(("a", held)) => {
                ShardAnswer::AlreadyGranted(held_coupon(&promotion, customer, discount, held)?)
            }
            Some(("e", "")) => ShardAnswer::Empty,
            Some(("s", "")) => ShardAnswer::SoldOut,
            Some(("n", "")) => ShardAnswer::NotStarted,
            Some(("f", r)) => ShardAnswer::Finished(reason(r)?),
            Some(("c", r)) => ShardAnswer::Closing(reason(r)?),
            _ => return Err(bad(format!("shard grab: answer {line:?}")).into()),
        };
        answers.push(match answer {
            ShardAnswer::Granted(c) | ShardAnswer::AlreadyGranted(c) if !durable => {
                ShardAnswer::Unconfirmed(c)
            }
            other => other,
        });
    }
    if answers.len() != customers.len() {
        return Err(bad(format!(
            "shard grab: {} answers for {} customers",
            answers.len(),
            customers.len()
        ))
        .into());
    }
    Ok(ShardBatch {
        applied,
        now_ms,
        stock,
        granted,
        epoch,
        pending,
        phase,
        answers,
        acks,
    })
}

fn acked_enough(acks: Option<(u32, u32)>) -> bool {
    acks.is_none_or(|(acked, wanted)| acked >= wanted)
}

/// `customers` (all of home `shard`, in arrival order, repeats allowed)
/// grab on that shard: one atomic call. With `durable`, grants are answered
/// [`ShardAnswer::Unconfirmed`] unless the replicas acknowledged the batch.
pub async fn shard_grab<C: ConnectionLike>(
    con: &mut C,
    map: &ShardMap,
    shard: u32,
    customers: &[CustomerId],
    durable: Option<Durability>,
) -> Result<ShardBatch, ShardError> {
    let keys = map.shard(shard)?;
    map.check_homes(shard, customers)?;
    let args: Vec<String> = std::iter::once(map.shards().to_string())
        .chain(customers.iter().map(|c| c.as_str().to_owned()))
        .collect();
    let (reply, acks) = run(
        con,
        keys,
        SHARD_GRAB,
        &[&keys.state, &keys.customers, &keys.events],
        &args,
        durable,
    )
    .await?;
    decode_batch(map, shard, customers, reply, acks)
}

// ---------------------------------------------------------------- stock moves

/// A stock move between step 1 and step 3: the donor's pending record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingMove {
    /// `"<donor>.<n>"`, unique per promotion.
    pub id: String,
    pub from: u32,
    pub to: u32,
    pub ranges: NumberRanges,
    /// When step 1 ran, on the donor's clock (0 when unknown).
    pub at_ms: i64,
}

/// What step 1 did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MoveOut {
    /// Numbers taken off the donor into a pending record.
    Moved {
        pending: PendingMove,
        stock_left: u64,
        epoch: u64,
    },
    /// The donor has no stock.
    Empty { epoch: u64 },
    /// The donor is not Active (Pending, Closing, Finished).
    Closed,
}

/// Step 1 of a stock move, on `donor`: at least `at_least` numbers (and
/// half its stock, up to all of it) from the top of its ranges into a
/// pending record for `to`. Not idempotent: a retry after a lost answer
/// makes a second move, recorded and completed like the first.
pub async fn move_out<C: ConnectionLike>(
    con: &mut C,
    map: &ShardMap,
    donor: u32,
    to: u32,
    at_least: u64,
    durable: Option<Durability>,
) -> Result<MoveOut, ShardError> {
    let keys = map.shard(donor)?;
    let args = [
        to.to_string(),
        at_least.to_string(),
        MOVE_DIVISOR.to_string(),
    ];
    let reply = run_step(
        con,
        donor,
        keys,
        MOVE_OUT,
        &[&keys.state, &keys.moves_out, &keys.events],
        &args,
        durable,
    )
    .await?;
    let it = items(reply, "move out")?;
    match item_text(&it, 0, "move out")?.as_str() {
        "moved" => Ok(MoveOut::Moved {
            pending: PendingMove {
                id: item_text(&it, 1, "move out")?,
                from: donor,
                to,
                ranges: NumberRanges::parse(&item_text(&it, 2, "move out")?)
                    .map_err(|e| bad(e.to_string()))?,
                at_ms: 0,
            },
            stock_left: item_u64(&it, 4, "move out")?,
            epoch: item_u64(&it, 5, "move out")?,
        }),
        "empty" => Ok(MoveOut::Empty {
            epoch: item_u64(&it, 1, "move out")?,
        }),
        "closed" => Ok(MoveOut::Closed),
        other => Err(bad(format!("move out: {other:?}")).into()),
    }
}

/// Step 2 of `mv`, on its recipient: adds its numbers once per move id (a
/// replay adds nothing), then grants to `waiting` (customers of that shard
/// who found it empty) in the same atomic call. With `durable` the answer
/// is durable only once the replicas acknowledged; step 3 must wait for it.
pub async fn move_in<C: ConnectionLike>(
    con: &mut C,
    map: &ShardMap,
    mv: &PendingMove,
    waiting: &[CustomerId],
    durable: Option<Durability>,
) -> Result<ShardBatch, ShardError> {
    let keys = map.shard(mv.to)?;
    map.check_homes(mv.to, waiting)?;
    let args: Vec<String> = [
        mv.id.clone(),
        mv.from.to_string(),
        mv.ranges.to_string(),
        map.shards().to_string(),
    ]
    .into_iter()
    .chain(waiting.iter().map(|c| c.as_str().to_owned()))
    .collect();
    let (reply, acks) = run(
        con,
        keys,
        MOVE_IN,
        &[&keys.state, &keys.customers, &keys.events, &keys.moves_in],
        &args,
        durable,
    )
    .await?;
    decode_batch(map, mv.to, waiting, reply, acks)
}

/// Step 3 of move `move_id`, on `donor`: clears the pending record. Run only
/// once step 2 is durable. Idempotent: answers whether this call cleared it.
pub async fn move_done<C: ConnectionLike>(
    con: &mut C,
    map: &ShardMap,
    donor: u32,
    move_id: &str,
    durable: Option<Durability>,
) -> Result<bool, ShardError> {
    let keys = map.shard(donor)?;
    let reply = run_step(
        con,
        donor,
        keys,
        MOVE_DONE,
        &[&keys.state, &keys.moves_out],
        &[move_id.to_owned()],
        durable,
    )
    .await?;
    Ok(text(&reply) == Some("done"))
}

/// The pending moves out of `donor` (read-only). With `durable`, answered
/// only once the replicas hold what was read: recovery acts on it.
pub async fn moves_pending<C: ConnectionLike>(
    con: &mut C,
    map: &ShardMap,
    donor: u32,
    durable: Option<Durability>,
) -> Result<Vec<PendingMove>, ShardError> {
    let keys = map.shard(donor)?;
    let reply = run_step(
        con,
        donor,
        keys,
        MOVES_PENDING,
        &[&keys.moves_out],
        &[],
        durable,
    )
    .await?;
    let flat = items(reply, "moves pending")?;
    flat.chunks(2)
        .map(|pair| {
            let id = item_text(pair, 0, "moves pending")?;
            let record = item_text(pair, 1, "moves pending")?;
            let mut parts = record.split('|');
            let (Some(to), Some(ranges), at) = (parts.next(), parts.next(), parts.next()) else {
                return Err(bad(format!("move record {record:?}")).into());
            };
            Ok(PendingMove {
                id,
                from: donor,
                to: to
                    .parse()
                    .map_err(|_| bad(format!("move record {record:?}")))?,
                ranges: NumberRanges::parse(ranges).map_err(|e| bad(e.to_string()))?,
                at_ms: at.and_then(|a| a.parse().ok()).unwrap_or(0),
            })
        })
        .collect()
}

/// Completes `mv` (steps 2 and 3, both idempotent): what anyone who finds a
/// pending record does, whatever state its mover left.
pub async fn complete_move<C: ConnectionLike>(
    con: &mut C,
    map: &ShardMap,
    mv: &PendingMove,
    durable: Option<Durability>,
) -> Result<(), ShardError> {
    let applied = move_in(con, map, mv, &[], durable).await?;
    if !applied.durable() {
        return Err(applied.not_durable(MOVE_IN, mv.to));
    }
    move_done(con, map, mv.from, &mv.id, None).await?;
    Ok(())
}

/// Rolls forward every pending move of every shard (records read with
/// `durable`, so nothing is built on a record a failover could still
/// lose). Answers how many it completed. What the sold-out check runs: it
/// cannot conclude anything while numbers are in flight.
pub async fn recover<C: ConnectionLike>(
    con: &mut C,
    map: &ShardMap,
    durable: Option<Durability>,
) -> Result<usize, ShardError> {
    let mut done = 0;
    for donor in 0..map.shards() {
        for mv in moves_pending(con, map, donor, durable).await? {
            complete_move(con, map, &mv, durable).await?;
            done += 1;
        }
    }
    Ok(done)
}

/// [`recover`] of the moves at least `min_age_ms` old on their donor's
/// clock only: what the operator's reconcile runs (workers complete pending
/// moves in the sold-out check, [`recover`]), so that a
/// mover a few milliseconds between its steps is left to finish its own
/// move. (Racing it would be safe, both later steps being idempotent; it
/// would only cost calls.) Shards without pending moves cost one collect.
pub async fn recover_stale<C: ConnectionLike>(
    con: &mut C,
    map: &ShardMap,
    min_age_ms: u64,
    durable: Option<Durability>,
) -> Result<usize, ShardError> {
    let mut done = 0;
    for donor in 0..map.shards() {
        let figures = collect(con, map, donor, None).await?;
        if figures.pending == 0 {
            continue;
        }
        for mv in moves_pending(con, map, donor, durable).await? {
            if figures.now_ms.saturating_sub(mv.at_ms) >= min_age_ms as i64 {
                complete_move(con, map, &mv, durable).await?;
                done += 1;
            }
        }
    }
    Ok(done)
}

// ---------------------------------------------------------------- sold out

/// One shard's figures, read atomically with its clock.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardCollect {
    pub phase: ShardPhase,
    pub stock: u64,
    pub pending: u64,
    pub epoch: u64,
    pub granted: u64,
    pub now_ms: i64,
    pub finish_reason: Option<FinishReason>,
    /// Shard 0, once finished: the promotion's total.
    pub total_granted: Option<u64>,
}

/// Reads shard `shard`'s figures (read-only; with `durable`, answered once
/// the replicas hold what was read).
pub async fn collect<C: ConnectionLike>(
    con: &mut C,
    map: &ShardMap,
    shard: u32,
    durable: Option<Durability>,
) -> Result<ShardCollect, ShardError> {
    let keys = map.shard(shard)?;
    let reply = run_step(
        con,
        shard,
        keys,
        SHARD_COLLECT,
        &[&keys.state],
        &[],
        durable,
    )
    .await?;
    let it = items(reply, "collect")?;
    let phase = item_text(&it, 0, "collect")?;
    if phase == "unknown" {
        return Err(ShardError::Unknown(shard));
    }
    let finish_reason = item_text(&it, 6, "collect")?;
    let total = item_int(&it, 7, "collect")?;
    Ok(ShardCollect {
        phase: ShardPhase::parse(&phase)?,
        stock: item_u64(&it, 1, "collect")?,
        pending: item_u64(&it, 2, "collect")?,
        epoch: item_u64(&it, 3, "collect")?,
        granted: item_u64(&it, 4, "collect")?,
        now_ms: item_int(&it, 5, "collect")?,
        finish_reason: if finish_reason.is_empty() {
            None
        } else {
            Some(reason(&finish_reason)?)
        },
        total_granted: (total >= 0).then_some(total as u64),
    })
}

/// What the double collect concludes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SoldOutDecision {
    /// Shard 0 is finished: the promotion's finish is known.
    AlreadyFinished { reason: FinishReason, total: u64 },
    /// Shard 0 is closing (Expired or Deleted): complete that finish.
    Closing(FinishReason),
    /// These shards have stock: not sold out.
    Stock(Vec<u32>),
    /// These shards have moves in flight: complete them, then start again.
    PendingMoves(Vec<u32>),
    /// The first collect shows no stock and no move anywhere: read shards
    /// 1.. again, durably.
    CollectAgain,
    /// A shard changed between the two collects: start again.
    Changed(Vec<u32>),
    /// Sold out unless shard 0 changed: run `finish_soldout` with shard 0's
    /// epoch of the first collect and the others' granted of the second.
    Finish { epoch0: u64, others_granted: u64 },
}

/// The double collect's decision over the first collect of every shard
/// (index = shard) and, once taken, the second collect of shards 1..
///
/// Why two: shard 0 can be read empty, then a whole move bring it stock from
/// shard 2, then shards 1 and 2 be read empty; every figure read is 0 while a
/// coupon exists. A shard's stock rises only through step 2, which bumps its
/// epoch and needs a pending record that shows in the donor's `pending`; so
/// when both reads of every shard show the same (stock 0, pending 0,
/// epoch), there was an instant between them with no stock anywhere, and
/// nothing creates stock: the counts read are final. Shard 0's second read
/// is `finish_soldout` itself, atomic with the append.
pub fn sold_out_decision(
    first: &[ShardCollect],
    second: Option<&[ShardCollect]>,
) -> SoldOutDecision {
    let Some(zero) = first.first() else {
        return SoldOutDecision::CollectAgain;
    };
    match zero.phase {
        ShardPhase::Finished => {
            return SoldOutDecision::AlreadyFinished {
                reason: zero.finish_reason.unwrap_or(FinishReason::SoldOut),
                total: zero.total_granted.unwrap_or(zero.granted),
            }
        }
        ShardPhase::Closing => {
            return SoldOutDecision::Closing(zero.finish_reason.unwrap_or(FinishReason::Expired))
        }
        _ => {}
    }
    let with = |f: fn(&ShardCollect) -> bool| -> Vec<u32> {
        (0..first.len() as u32)
            .filter(|&i| f(&first[i as usize]))
            .collect()
    };
    let stocked = with(|c| c.stock > 0);
    if !stocked.is_empty() {
        return SoldOutDecision::Stock(stocked);
    }
    let moving = with(|c| c.pending > 0);
    if !moving.is_empty() {
        return SoldOutDecision::PendingMoves(moving);
    }
    let Some(second) = second else {
        return SoldOutDecision::CollectAgain;
    };
    let same = |a: &ShardCollect, b: &ShardCollect| {
        (a.phase, a.stock, a.pending, a.epoch, a.granted)
            == (b.phase, b.stock, b.pending, b.epoch, b.granted)
    };
    let changed: Vec<u32> = (1..first.len())
        .filter(|&i| second.get(i - 1).is_none_or(|b| !same(&first[i], b)))
        .map(|i| i as u32)
        .collect();
    if !changed.is_empty() {
        return SoldOutDecision::Changed(changed);
    }
    SoldOutDecision::Finish {
        epoch0: zero.epoch,
        others_granted: second.iter().map(|c| c.granted).sum(),
    }
}

/// What `finish_soldout` did on shard 0.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FinishSoldOut {
    /// This call appended PromotionFinished{SoldOut, total}.
    Finished {
        total: u64,
    },
    AlreadyFinished {
        reason: FinishReason,
        total: u64,
    },
    /// Shard 0 is closing for another reason: complete that finish.
    Closing(FinishReason),
    /// Shard 0 has stock, a pending move, or another epoch: check again.
    Retry,
}

/// The double collect's last step, on shard 0: appends
/// PromotionFinished{SoldOut, granted = own + `others_granted`} when shard
/// 0 is still Active, empty, without pending moves and at `epoch0`.
pub async fn finish_soldout<C: ConnectionLike>(
    con: &mut C,
    map: &ShardMap,
    epoch0: u64,
    others_granted: u64,
    durable: Option<Durability>,
) -> Result<FinishSoldOut, ShardError> {
    let k0 = map.shard(0)?;
    let args = [epoch0.to_string(), others_granted.to_string()];
    let reply = run_step(
        con,
        0,
        k0,
        FINISH_SOLDOUT,
        &[&k0.state, &k0.events],
        &args,
        durable,
    )
    .await?;
    let it = items(reply, "finish soldout")?;
    Ok(match item_text(&it, 0, "finish soldout")?.as_str() {
        "finished" => FinishSoldOut::Finished {
            total: item_u64(&it, 1, "finish soldout")?,
        },
        "already_finished" => FinishSoldOut::AlreadyFinished {
            reason: reason(&item_text(&it, 1, "finish soldout")?)?,
            total: item_u64(&it, 2, "finish soldout")?,
        },
        "closing" => FinishSoldOut::Closing(reason(&item_text(&it, 1, "finish soldout")?)?),
        "retry" => FinishSoldOut::Retry,
        other => return Err(bad(format!("finish soldout: {other:?}")).into()),
    })
}

/// What a sold-out check found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SoldOutCheck {
    /// The promotion is finished (by this check or before it).
    Finished { reason: FinishReason, total: u64 },
    /// Some shard has stock (the view now says which).
    Stock,
    /// Pending moves were completed: check again.
    Recovered(usize),
    /// A shard changed between the collects: check again.
    Changed,
}

/// The sold-out check (double collect): collect every shard; on stock,
/// answer so; on pending moves, complete them; else collect shards 1..
/// again (durably) and let shard 0 decide atomically with the append. After
/// a sell-out, closes shards 1.. so their refusals need not ask shard 0.
pub async fn check_sold_out<C: ConnectionLike>(
    con: &mut C,
    map: &ShardMap,
    view: &mut StockView,
    durable: Option<Durability>,
) -> Result<SoldOutCheck, ShardError> {
    let mut first = Vec::with_capacity(map.shards() as usize);
    for shard in 0..map.shards() {
        let c = collect(con, map, shard, None).await?;
        view.saw(shard, c.stock);
        first.push(c);
    }
    let mut second = Vec::new();
    let mut decision = sold_out_decision(&first, None);
    if decision == SoldOutDecision::CollectAgain {
        for shard in 1..map.shards() {
            second.push(collect(con, map, shard, durable).await?);
        }
        decision = sold_out_decision(&first, Some(&second));
    }
    match decision {
        SoldOutDecision::AlreadyFinished { reason, total } => {
            Ok(SoldOutCheck::Finished { reason, total })
        }
        SoldOutDecision::Closing(reason) => finished(finish(con, map, reason, durable).await?),
        SoldOutDecision::Stock(_) => Ok(SoldOutCheck::Stock),
        SoldOutDecision::PendingMoves(_) => {
            Ok(SoldOutCheck::Recovered(recover(con, map, durable).await?))
        }
        SoldOutDecision::CollectAgain | SoldOutDecision::Changed(_) => Ok(SoldOutCheck::Changed),
        SoldOutDecision::Finish {
            epoch0,
            others_granted,
        } => match finish_soldout(con, map, epoch0, others_granted, durable).await? {
            FinishSoldOut::Finished { total } => {
                for shard in 1..map.shards() {
                    shard_close(con, map, shard, FinishReason::SoldOut, None).await?;
                }
                Ok(SoldOutCheck::Finished {
                    reason: FinishReason::SoldOut,
                    total,
                })
            }
            FinishSoldOut::AlreadyFinished { reason, total } => {
                Ok(SoldOutCheck::Finished { reason, total })
            }
            FinishSoldOut::Closing(reason) => finished(finish(con, map, reason, durable).await?),
            FinishSoldOut::Retry => Ok(SoldOutCheck::Changed),
        },
    }
}

fn finished(f: Finish) -> Result<SoldOutCheck, ShardError> {
    match f {
        Finish::Finished { reason, total } => Ok(SoldOutCheck::Finished { reason, total }),
        Finish::NotDue { .. } => Ok(SoldOutCheck::Changed),
    }
}

// ---------------------------------------------------------------- Expired / Deleted

/// What phase 1 of a finish found on shard 0.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FinishBegin {
    /// Shard 0 stopped granting for this reason (the first finish's).
    Closing(FinishReason),
    AlreadyFinished {
        reason: FinishReason,
        total: u64,
    },
    /// Expired before the finish time on shard 0's clock.
    NotDue {
        ms_left: i64,
    },
}

/// Phase 1 of an Expired or Deleted finish, on shard 0.
pub async fn finish_begin<C: ConnectionLike>(
    con: &mut C,
    map: &ShardMap,
    why: FinishReason,
    durable: Option<Durability>,
) -> Result<FinishBegin, ShardError> {
    let k0 = map.shard(0)?;
    let map_key = shard_map_key(map.id());
    let reply = run_step(
        con,
        0,
        k0,
        FINISH_BEGIN,
        &[&k0.state, &k0.events, &map_key],
        &[why.as_str().to_owned()],
        durable,
    )
    .await?;
    let it = items(reply, "finish begin")?;
    Ok(match item_text(&it, 0, "finish begin")?.as_str() {
        "closing" => FinishBegin::Closing(reason(&item_text(&it, 1, "finish begin")?)?),
        "already_finished" => FinishBegin::AlreadyFinished {
            reason: reason(&item_text(&it, 1, "finish begin")?)?,
            total: item_u64(&it, 2, "finish begin")?,
        },
        "not_due" => FinishBegin::NotDue {
            ms_left: item_int(&it, 1, "finish begin")?,
        },
        "unknown" => return Err(ShardError::Unknown(0)),
        other => return Err(bad(format!("finish begin: {other:?}")).into()),
    })
}

/// What closing a shard did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ShardClose {
    /// Finished for `reason` (by this call or before); `granted` is final.
    Closed { reason: FinishReason, granted: u64 },
    /// A SoldOut close of a shard that has stock or a pending move.
    Refused { stock: u64, pending: u64 },
}

/// Phase 2, on shard `shard` >= 1: it grants nothing after this, so its
/// count is final.
pub async fn shard_close<C: ConnectionLike>(
    con: &mut C,
    map: &ShardMap,
    shard: u32,
    why: FinishReason,
    durable: Option<Durability>,
) -> Result<ShardClose, ShardError> {
    let keys = map.shard(shard)?;
    let reply = run_step(
        con,
        shard,
        keys,
        SHARD_CLOSE,
        &[&keys.state],
        &[why.as_str().to_owned()],
        durable,
    )
    .await?;
    let it = items(reply, "shard close")?;
    Ok(match item_text(&it, 0, "shard close")?.as_str() {
        "closed" => ShardClose::Closed {
            reason: reason(&item_text(&it, 1, "shard close")?)?,
            granted: item_u64(&it, 2, "shard close")?,
        },
        "refused" => ShardClose::Refused {
            stock: item_u64(&it, 1, "shard close")?,
            pending: item_u64(&it, 2, "shard close")?,
        },
        "unknown" => return Err(ShardError::Unknown(shard)),
        other => return Err(bad(format!("shard close: {other:?}")).into()),
    })
}

/// What phase 3 did on shard 0.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FinishCommit {
    /// This call appended PromotionFinished with `total`.
    Finished {
        total: u64,
    },
    AlreadyFinished {
        reason: FinishReason,
        total: u64,
    },
    /// Shard 0 is not Closing (phase 1 has not run).
    NotClosing,
}

/// Phase 3, on shard 0: appends the one PromotionFinished of a Closing
/// promotion with own + `others_granted` (the closes' counts).
pub async fn finish_commit<C: ConnectionLike>(
    con: &mut C,
    map: &ShardMap,
    others_granted: u64,
    durable: Option<Durability>,
) -> Result<FinishCommit, ShardError> {
    let k0 = map.shard(0)?;
    let reply = run_step(
        con,
        0,
        k0,
        FINISH_COMMIT,
        &[&k0.state, &k0.events],
        &[others_granted.to_string()],
        durable,
    )
    .await?;
    let it = items(reply, "finish commit")?;
    Ok(match item_text(&it, 0, "finish commit")?.as_str() {
        "finished" => FinishCommit::Finished {
            total: item_u64(&it, 1, "finish commit")?,
        },
        "already_finished" => FinishCommit::AlreadyFinished {
            reason: reason(&item_text(&it, 1, "finish commit")?)?,
            total: item_u64(&it, 2, "finish commit")?,
        },
        "not_closing" => FinishCommit::NotClosing,
        "unknown" => return Err(ShardError::Unknown(0)),
        other => return Err(bad(format!("finish commit: {other:?}")).into()),
    })
}

/// The outcome of a whole finish.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Finish {
    Finished {
        reason: FinishReason,
        total: u64,
    },
    /// Expired before the finish time on shard 0's clock.
    NotDue {
        ms_left: i64,
    },
}

/// Finishes `map`'s promotion for `why` (Expired, Deleted; a SoldOut is the
/// double collect's): begin on shard 0, close every other shard, commit the
/// total. Every phase is idempotent and the reason recorded on shard 0, so
/// whoever notices a half-done finish completes it with this call. For
/// S = 1, the unsharded finish.
pub async fn finish<C: ConnectionLike>(
    con: &mut C,
    map: &ShardMap,
    why: FinishReason,
    durable: Option<Durability>,
) -> Result<Finish, ShardError> {
    if !map.is_sharded() {
        let snap = super::finish(con, map.id(), why).await?;
        return Ok(match snap.result {
            ScheduleResult::NotDue => Finish::NotDue {
                ms_left: snap.finish_ms.unwrap_or(snap.now) - snap.now,
            },
            _ => Finish::Finished {
                reason: snap.finish_reason.unwrap_or(why),
                total: snap.granted,
            },
        });
    }
    let why = match finish_begin(con, map, why, durable).await? {
        FinishBegin::Closing(reason) => reason,
        FinishBegin::AlreadyFinished { reason, total } => {
            return Ok(Finish::Finished { reason, total })
        }
        FinishBegin::NotDue { ms_left } => return Ok(Finish::NotDue { ms_left }),
    };
    let mut others = 0;
    for shard in 1..map.shards() {
        match shard_close(con, map, shard, why, durable).await? {
            ShardClose::Closed { granted, .. } => others += granted,
            ShardClose::Refused { stock, pending } => {
                return Err(bad(format!(
                    "close of shard {shard} for {why:?} refused: stock {stock}, pending {pending}"
                ))
                .into())
            }
        }
    }
    match finish_commit(con, map, others, durable).await? {
        FinishCommit::Finished { total } => Ok(Finish::Finished { reason: why, total }),
        FinishCommit::AlreadyFinished { reason, total } => Ok(Finish::Finished { reason, total }),
        FinishCommit::NotClosing => Err(bad("finish commit: shard 0 not closing").into()),
    }
}

// ---------------------------------------------------------------- the worker's path

/// A caller's last-known stock of each shard, from every reply: how it picks
/// donors. `None`: not yet seen. Copies of one view may share a
/// [`SoldOutGate`] ([`StockView::sharing_checks`]).
#[derive(Debug, Clone)]
pub struct StockView {
    stock: Vec<Option<u64>>,
    gate: Option<Arc<SoldOutGate>>,
    /// How long a finish waits for shard 0's clock (see [`FINISH_SKEW_WAIT`]).
    skew_wait: std::time::Duration,
    /// Stock moves completed by the grabs made with this view (a copy
    /// counts its own from where it was copied).
    moves_made: u64,
}

/// Lets the callers that share it (a worker's lanes of one promotion) run
/// one sold-out check at a time, and answers those that waited with a
/// verdict of Finished already reached: at a sell-out every lane whose home
/// runs dry would otherwise run its own double collect (2S − 1 collects and
/// more) for the same verdict. Only Finished is shared, as it is final;
/// any other verdict (stock somewhere, a move completed, a change between
/// the collects) sends each caller back to its donors with its own check.
#[derive(Debug, Default)]
pub struct SoldOutGate {
    finished: tokio::sync::Mutex<Option<(FinishReason, u64)>>,
}

impl StockView {
    pub fn new(shards: u32) -> Self {
        Self {
            stock: vec![None; shards as usize],
            gate: None,
            skew_wait: FINISH_SKEW_WAIT,
            moves_made: 0,
        }
    }

    /// Stock moves the grabs made with this view have completed (each one
    /// step 1, 2 and 3 of [`refill`]): what a worker counts and times.
    pub fn moves_made(&self) -> u64 {
        self.moves_made
    }

    /// A finish this view's grabs meet waits up to `wait` for shard 0's
    /// clock to reach the finish time (instead of [`FINISH_SKEW_WAIT`]).
    pub fn waiting_for_skew(mut self, wait: std::time::Duration) -> Self {
        self.skew_wait = wait;
        self
    }

    /// This view, and every copy of it, runs its sold-out checks through
    /// `gate`.
    pub fn sharing_checks(mut self, gate: Arc<SoldOutGate>) -> Self {
        self.gate = Some(gate);
        self
    }

    /// Records that `shard` had `stock`.
    pub fn saw(&mut self, shard: u32, stock: u64) {
        if let Some(s) = self.stock.get_mut(shard as usize) {
            *s = Some(stock);
        }
    }

    /// The last-known stock of `shard` (`None`: not yet seen), so that a
    /// caller sharing one view among concurrent batches can merge back what
    /// a batch saw.
    pub fn stock(&self, shard: u32) -> Option<u64> {
        self.stock.get(shard as usize).copied().flatten()
    }

    /// Whether `shard` is known to have stock.
    pub fn has_stock(&self, shard: u32) -> bool {
        matches!(self.stock.get(shard as usize), Some(Some(n)) if *n > 0)
    }

    /// Donors for `home`, best first: unknown stock first, then richest;
    /// shards known empty are left out.
    pub fn donors(&self, home: u32) -> Vec<u32> {
        let mut donors: Vec<u32> = (0..self.stock.len() as u32)
            .filter(|&d| d != home && self.stock[d as usize] != Some(0))
            .collect();
        donors.sort_by_key(|&d| std::cmp::Reverse(self.stock[d as usize].unwrap_or(u64::MAX)));
        donors
    }
}

/// Every customer holding a coupon of `map`'s promotion, shard after shard
/// (HSCAN of each shard's customers hash), handed to `each`: what a worker
/// reads once the promotion is over. A customer holds on their home shard
/// only, so nobody is handed twice. For S = 1, [`super::holders`].
pub async fn holders<C: ConnectionLike>(
    con: &mut C,
    map: &ShardMap,
    mut each: impl FnMut(&[u8]),
) -> Result<(), ShardError> {
    for keys in &map.keys {
        customers_of(con, &keys.customers, &mut each).await?;
    }
    Ok(())
}

/// `customers` (all of home shard `home`, arrival order) grab on their
/// home shard, as a worker serves one batch: the shard's grab (starting the
/// promotion if the shard is due but not open); the customers who found
/// their home empty are served by moving stock to it ([`refill`]); those
/// answered closing or finished are answered once the finish is complete.
/// For S = 1, the unsharded grab. One answer per customer, in order.
pub async fn grab<C: ConnectionLike>(
    con: &mut C,
    map: &ShardMap,
    home: u32,
    customers: &[CustomerId],
    view: &mut StockView,
    durable: Option<Durability>,
) -> Result<Vec<ShardAnswer>, ShardError> {
    if !map.is_sharded() {
        return grab_unsharded(con, map.id(), customers, durable).await;
    }
    let batch = match shard_grab(con, map, home, customers, durable).await {
        Err(ShardError::NotOpen { .. }) => {
            start(con, map, durable).await?;
            shard_grab(con, map, home, customers, durable).await?
        }
        other => other?,
    };
    view.saw(home, batch.stock);
    let mut answers = batch.answers;
    let waiting: Vec<usize> = (0..answers.len())
        .filter(|&i| answers[i] == ShardAnswer::Empty)
        .collect();
    if !waiting.is_empty() {
        let who: Vec<CustomerId> = waiting.iter().map(|&i| customers[i].clone()).collect();
        let served = refill(con, map, home, &who, view, durable).await?;
        for (i, answer) in waiting.into_iter().zip(served) {
            answers[i] = answer;
        }
    }
    settle_finish(con, map, &mut answers, durable, view.skew_wait).await?;
    Ok(answers)
}

/// How long a grab waits, by default, for shard 0's clock to reach a finish
/// time its own shard's clock has passed (each master has its own clock;
/// NTP keeps them milliseconds apart). Within it the customers are answered
/// the finish, a 410 that follows the PromotionFinished event; beyond it
/// they are left Closing, a 503 to retry. A worker's
/// `--finish-skew-wait-ms` sets it ([`StockView::waiting_for_skew`]).
pub const FINISH_SKEW_WAIT: std::time::Duration = std::time::Duration::from_millis(500);

/// Answers closing and finished customers once PromotionFinished exists:
/// completes the finish (idempotent) and answers its reason, waiting up to
/// `skew_wait` ([`FINISH_SKEW_WAIT`] unless the worker says otherwise) for
/// shard 0's clock to reach the finish time.
async fn settle_finish<C: ConnectionLike>(
    con: &mut C,
    map: &ShardMap,
    answers: &mut [ShardAnswer],
    durable: Option<Durability>,
    skew_wait: std::time::Duration,
) -> Result<(), ShardError> {
    let why = answers.iter().find_map(|a| match a {
        ShardAnswer::Closing(r) | ShardAnswer::Finished(r) => Some(*r),
        _ => None,
    });
    let Some(why) = why else { return Ok(()) };
    let mut waited = std::time::Duration::ZERO;
    let reason = loop {
        match finish(con, map, why, durable).await? {
            Finish::Finished { reason, .. } => break reason,
            // Shard 0's clock is behind this shard's.
            Finish::NotDue { ms_left } => {
                let wait = std::time::Duration::from_millis(ms_left.max(1) as u64);
                if waited + wait > skew_wait {
                    // Too far behind: leave them Closing (503).
                    return Ok(());
                }
                tokio::time::sleep(wait).await;
                waited += wait;
            }
        }
    };
    for a in answers.iter_mut() {
        if matches!(a, ShardAnswer::Closing(_) | ShardAnswer::Finished(_)) {
            *a = finished_answer(reason);
        }
    }
    Ok(())
}

fn finished_answer(reason: FinishReason) -> ShardAnswer {
    match reason {
        FinishReason::SoldOut => ShardAnswer::SoldOut,
        other => ShardAnswer::Finished(other),
    }
}

/// Serves `waiting` (customers of `home`, which is empty) by moving stock to
/// `home` from the best donor `view` knows: step 1 on the donor, step 2 on
/// `home` (which grants to them atomically), step 3 on the donor. When every
/// donor is known empty, the sold-out check decides. One answer per waiting
/// customer; never `Empty`.
pub async fn refill<C: ConnectionLike>(
    con: &mut C,
    map: &ShardMap,
    home: u32,
    waiting: &[CustomerId],
    view: &mut StockView,
    durable: Option<Durability>,
) -> Result<Vec<ShardAnswer>, ShardError> {
    let mut answers: Vec<Option<ShardAnswer>> = vec![None; waiting.len()];
    for _ in 0..MAX_REFILL_ROUNDS {
        let open: Vec<usize> = (0..waiting.len())
            .filter(|&i| answers[i].is_none())
            .collect();
        if open.is_empty() {
            break;
        }
        let who: Vec<CustomerId> = open.iter().map(|&i| waiting[i].clone()).collect();
        if view.has_stock(home) {
            // Stock reached home meanwhile (another caller's move).
            let batch = shard_grab(con, map, home, &who, durable).await?;
            view.saw(home, batch.stock);
            for (i, answer) in open.into_iter().zip(batch.answers) {
                if answer != ShardAnswer::Empty {
                    answers[i] = Some(answer);
                }
            }
            continue;
        }
        let mut moved = None;
        for donor in view.donors(home) {
            match move_out(con, map, donor, home, open.len() as u64, durable).await? {
                MoveOut::Moved {
                    pending,
                    stock_left,
                    ..
                } => {
                    view.saw(donor, stock_left);
                    moved = Some(pending);
                    break;
                }
                MoveOut::Empty { .. } | MoveOut::Closed => view.saw(donor, 0),
            }
        }
        let Some(mv) = moved else {
            match check_sold_out_through_gate(con, map, view, durable).await? {
                SoldOutCheck::Finished { reason, .. } => {
                    // A waiting customer may have been granted meanwhile by
                    // another caller (the same customer in two batches at
                    // once): home answers a holder its coupon in every
                    // phase, so it is asked once more before any 410.
                    let batch = shard_grab(con, map, home, &who, durable).await?;
                    for (i, answer) in open.into_iter().zip(batch.answers) {
                        answers[i] = Some(match answer {
                            a @ (ShardAnswer::Granted(_)
                            | ShardAnswer::AlreadyGranted(_)
                            | ShardAnswer::Unconfirmed(_)) => a,
                            _ => finished_answer(reason),
                        });
                    }
                }
                SoldOutCheck::Stock | SoldOutCheck::Recovered(_) | SoldOutCheck::Changed => {}
            }
            continue;
        };
        let batch = move_in(con, map, &mv, &who, durable).await?;
        view.saw(home, batch.stock);
        if !batch.durable() {
            return Err(batch.not_durable(MOVE_IN, home));
        }
        move_done(con, map, mv.from, &mv.id, None).await?;
        view.moves_made += 1;
        for (i, answer) in open.into_iter().zip(batch.answers) {
            if answer != ShardAnswer::Empty {
                answers[i] = Some(answer);
            }
        }
    }
    answers
        .into_iter()
        .map(|a| a.ok_or(ShardError::NoProgress(MAX_REFILL_ROUNDS)))
        .collect()
}

/// [`check_sold_out`], through `view`'s [`SoldOutGate`] when it has one:
/// one check at a time among the views sharing it, and no Redis call at all
/// once one of them has seen the promotion finished.
async fn check_sold_out_through_gate<C: ConnectionLike>(
    con: &mut C,
    map: &ShardMap,
    view: &mut StockView,
    durable: Option<Durability>,
) -> Result<SoldOutCheck, ShardError> {
    let Some(gate) = view.gate.clone() else {
        return check_sold_out(con, map, view, durable).await;
    };
    let mut finished = gate.finished.lock().await;
    if let Some((reason, total)) = *finished {
        return Ok(SoldOutCheck::Finished { reason, total });
    }
    let check = check_sold_out(con, map, view, durable).await?;
    if let SoldOutCheck::Finished { reason, total } = check {
        *finished = Some((reason, total));
    }
    Ok(check)
}

/// S = 1: the unsharded grab (keys and function unchanged), its outcomes as
/// shard answers.
async fn grab_unsharded<C: ConnectionLike>(
    con: &mut C,
    id: &PromotionId,
    customers: &[CustomerId],
    durable: Option<Durability>,
) -> Result<Vec<ShardAnswer>, ShardError> {
    let outcomes: Vec<(GrabOutcome, bool)> = match durable {
        None => super::grab_batch(con, id, customers)
            .await?
            .into_iter()
            .map(|o| (o, true))
            .collect(),
        Some(d) => super::grab_batch_durable(con, id, customers, d)
            .await?
            .into_iter()
            .map(|r| match r {
                Ok(o) => Ok((o, true)),
                Err(super::DurableGrabError::NotReplicated { outcome, .. }) => Ok((outcome, false)),
                Err(super::DurableGrabError::Script(e)) => Err(e),
            })
            .collect::<Result<_, _>>()?,
    };
    outcomes
        .into_iter()
        .map(|(o, durable)| {
            Ok(match o {
                GrabOutcome::Granted { coupon, .. } if durable => ShardAnswer::Granted(coupon),
                GrabOutcome::AlreadyGranted { coupon } if durable => {
                    ShardAnswer::AlreadyGranted(coupon)
                }
                GrabOutcome::Granted { coupon, .. } | GrabOutcome::AlreadyGranted { coupon } => {
                    ShardAnswer::Unconfirmed(coupon)
                }
                GrabOutcome::UnknownPromotion => return Err(ShardError::Unknown(0)),
                GrabOutcome::NotStarted { .. } => ShardAnswer::NotStarted,
                GrabOutcome::SoldOut => ShardAnswer::SoldOut,
                GrabOutcome::Finished { reason } => ShardAnswer::Finished(reason),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(phase: ShardPhase, stock: u64, pending: u64, epoch: u64, granted: u64) -> ShardCollect {
        ShardCollect {
            phase,
            stock,
            pending,
            epoch,
            granted,
            now_ms: 0,
            finish_reason: None,
            total_granted: None,
        }
    }

    use ShardPhase::{Active, Closing, Finished};

    #[test]
    fn the_double_collect_finishes_only_when_both_reads_of_every_shard_agree_on_nothing_left() {
        let first = [
            c(Active, 0, 0, 4, 10),
            c(Active, 0, 0, 7, 12),
            c(Active, 0, 0, 2, 8),
        ];
        assert_eq!(
            sold_out_decision(&first, None),
            SoldOutDecision::CollectAgain
        );
        let second = [c(Active, 0, 0, 7, 12), c(Active, 0, 0, 2, 8)];
        assert_eq!(
            sold_out_decision(&first, Some(&second)),
            SoldOutDecision::Finish {
                epoch0: 4,
                others_granted: 20
            }
        );
        // A move landed on shard 2 between the reads: its epoch moved.
        let moved = [c(Active, 0, 0, 7, 12), c(Active, 0, 0, 3, 8)];
        assert_eq!(
            sold_out_decision(&first, Some(&moved)),
            SoldOutDecision::Changed(vec![2])
        );
        // A grant between the reads (stock that the first read missed).
        let granted = [c(Active, 0, 0, 7, 13), c(Active, 0, 0, 2, 8)];
        assert_eq!(
            sold_out_decision(&first, Some(&granted)),
            SoldOutDecision::Changed(vec![1])
        );
        // A second read missing a shard is no agreement.
        assert_eq!(
            sold_out_decision(&first, Some(&second[..1])),
            SoldOutDecision::Changed(vec![2])
        );
    }

    #[test]
    fn stock_or_moves_in_flight_anywhere_mean_not_sold_out() {
        let stock = [
            c(Active, 0, 0, 1, 5),
            c(Active, 3, 0, 1, 5),
            c(Active, 0, 0, 1, 5),
        ];
        assert_eq!(
            sold_out_decision(&stock, None),
            SoldOutDecision::Stock(vec![1])
        );
        let moving = [
            c(Active, 0, 1, 1, 5),
            c(Active, 0, 0, 1, 5),
            c(Active, 0, 2, 1, 5),
        ];
        assert_eq!(
            sold_out_decision(&moving, Some(&moving[1..])),
            SoldOutDecision::PendingMoves(vec![0, 2])
        );
    }

    #[test]
    fn a_finished_or_closing_shard_zero_decides_whatever_the_others_say() {
        let mut zero = c(Finished, 0, 0, 1, 5);
        zero.finish_reason = Some(FinishReason::Expired);
        zero.total_granted = Some(40);
        let first = [zero, c(Active, 9, 0, 1, 5)];
        assert_eq!(
            sold_out_decision(&first, None),
            SoldOutDecision::AlreadyFinished {
                reason: FinishReason::Expired,
                total: 40
            }
        );
        let mut closing = c(Closing, 0, 0, 1, 5);
        closing.finish_reason = Some(FinishReason::Deleted);
        assert_eq!(
            sold_out_decision(&[closing, c(Active, 9, 0, 1, 5)], None),
            SoldOutDecision::Closing(FinishReason::Deleted)
        );
    }

    #[test]
    fn donors_are_unknown_first_then_richest_and_never_home_or_known_empty() {
        let mut view = StockView::new(4);
        view.saw(1, 5);
        view.saw(2, 0);
        view.saw(3, 9);
        assert_eq!(
            (view.stock(1), view.stock(0), view.stock(7)),
            (Some(5), None, None)
        );
        assert_eq!(view.donors(1), [0, 3]);
        assert_eq!(view.donors(0), [3, 1]);
        view.saw(0, 0);
        view.saw(3, 0);
        assert_eq!(view.donors(1), Vec::<u32>::new());
    }

    fn lines(text: &str) -> Value {
        Value::BulkString(text.as_bytes().to_vec())
    }

    #[test]
    fn a_shard_batch_gives_each_customer_its_answer_and_unconfirms_grants_not_durable() {
        let id = PromotionId::parse("shop/sale").unwrap();
        let map = ShardMap::new(&id, &[3, 8]);
        let who: Vec<CustomerId> = ["a", "b", "c", "d", "e"]
            .iter()
            .map(|s| CustomerId::parse(s).unwrap())
            .collect();
        let reply = "applied\n1764583200123\n4\n9\n3\n1\nActive\n0.8\ng7\na5:1764583200000\ne\nfExpired\ncDeleted";
        let b = decode_batch(&map, 2, &who, lines(reply), None).unwrap();
        assert!(b.applied);
        assert_eq!((b.stock, b.granted, b.epoch, b.pending), (4, 9, 3, 1));
        assert_eq!(b.phase, ShardPhase::Active);
        let ShardAnswer::Granted(g) = &b.answers[0] else {
            panic!("{b:?}")
        };
        assert_eq!(g.coupon_id, "shop/sale#7");
        assert_eq!(g.discount, 0.8);
        assert!(
            matches!(&b.answers[1], ShardAnswer::AlreadyGranted(c) if c.coupon_id == "shop/sale#5")
        );
        assert_eq!(b.answers[2], ShardAnswer::Empty);
        assert_eq!(b.answers[3], ShardAnswer::Finished(FinishReason::Expired));
        assert_eq!(b.answers[4], ShardAnswer::Closing(FinishReason::Deleted));
        let not_durable = decode_batch(&map, 2, &who, lines(reply), Some((0, 1))).unwrap();
        assert!(matches!(
            not_durable.answers[0],
            ShardAnswer::Unconfirmed(_)
        ));
        assert!(matches!(
            not_durable.answers[1],
            ShardAnswer::Unconfirmed(_)
        ));
        assert!(decode_batch(&map, 2, &who[..4], lines(reply), None).is_err());
        let stale = Value::Array(vec![lines("stale_map"), Value::Int(4)]);
        assert!(matches!(
            decode_batch(&map, 1, &who, stale, None),
            Err(ShardError::StaleMap {
                recorded: 4,
                known: 3,
                ..
            })
        ));
    }

    #[test]
    fn a_map_has_one_salt_per_shard_beyond_zero() {
        let id = PromotionId::parse("shop/sale").unwrap();
        let map = map_from(&id, 3, "4,11").unwrap();
        assert_eq!(map.shards(), 3);
        assert_eq!(map.salts(), [4, 11]);
        assert!(map.keys(2).unwrap().state.contains("{shop/sale~2~11}"));
        assert!(map.keys(3).is_none());
        assert!(matches!(
            map.shard(3),
            Err(ShardError::NoSuchShard {
                shard: 3,
                shards: 3
            })
        ));
        assert!(map_from(&id, 3, "4").is_err());
        assert!(map_from(&id, 2, "x").is_err());
        assert!(!ShardMap::unsharded(&id).is_sharded());
    }

    /// A connection that fails the test if anything is sent on it.
    struct NoRedis;

    impl ConnectionLike for NoRedis {
        fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> redis::RedisFuture<'a, Value> {
            panic!("no Redis call expected, got {:?}", cmd.args_iter().next())
        }
        fn req_packed_commands<'a>(
            &'a mut self,
            _: &'a redis::Pipeline,
            _: usize,
            _: usize,
        ) -> redis::RedisFuture<'a, Vec<Value>> {
            panic!("no Redis pipeline expected")
        }
        fn get_db(&self) -> i64 {
            0
        }
    }

    #[tokio::test]
    async fn a_finished_verdict_seen_through_the_gate_answers_the_other_lanes_without_a_redis_call()
    {
        let id = PromotionId::new("shop", "gate").unwrap();
        let map = ShardMap::new(&id, &[11, 22]);
        let gate = Arc::new(SoldOutGate::default());
        *gate.finished.lock().await = Some((FinishReason::SoldOut, 30));
        let mut lane = StockView::new(3).sharing_checks(gate.clone());
        let mut copy = lane.clone();
        for view in [&mut lane, &mut copy] {
            let verdict = check_sold_out_through_gate(&mut NoRedis, &map, view, None)
                .await
                .unwrap();
            assert_eq!(
                verdict,
                SoldOutCheck::Finished {
                    reason: FinishReason::SoldOut,
                    total: 30
                }
            );
        }
    }

    #[tokio::test]
    #[should_panic(expected = "no Redis call expected")]
    async fn without_a_finished_verdict_the_gate_lets_the_check_ask_redis() {
        let id = PromotionId::new("shop", "gate").unwrap();
        let map = ShardMap::new(&id, &[11, 22]);
        let mut view = StockView::new(3).sharing_checks(Arc::default());
        let _ = check_sold_out_through_gate(&mut NoRedis, &map, &mut view, None).await;
    }
}
