//! Grabs that are answered only once replicas hold them.
//!
//! Redis replication is asynchronous: a master answers the grab function
//! before its replicas have the write, so a master killed right after a grant
//! can be replaced by a replica that never saw it. The coupon would be handed
//! out again and the customer would hold a 200 for a grant the stream no longer
//! has. [`grab_batch_durable`] closes that gap with `WAIT`, once per batch: the
//! `FCALL` of the batch, a one-byte
//! write to a probe key of the same slot and `WAIT n timeout` go in one
//! pipeline over one connection to the master of the promotion's slot. `WAIT`
//! blocks until `n` replicas acknowledged every write this connection made so
//! far, the probe included, hence the grant (written by this call) or the
//! earlier grant an `already_granted` answer read (written before the probe).
//!
//! The command worker sends the `WAIT` apart instead ([`acknowledged`], on a
//! connection of its own once the batch's `FCALL` returned, then
//! [`confirmed`]): the probe write still comes after the grant, and neither
//! the promotion's next batch nor any other command waits behind the `WAIT`
//! (`command::replica_acks`).
//!
//! A granted or already-granted outcome that fewer than `n` replicas
//! acknowledged is returned as [`DurableGrabError::NotReplicated`]: the grant
//! exists on the master but may be lost in a failover, so the caller answers
//! "unavailable, retry" (the retry is idempotent: it finds the grant or, after
//! a failover that lost it, grabs again) and never 200.
//!
//! What this does not cover: a replica that acknowledged and then dies together
//! with its master (use more replicas), and, with more than one replica per
//! master, a failover that elects a replica other than the ones that
//! acknowledged (Redis Cluster prefers the replica with the largest replication
//! offset, so with `n` = all replicas the elected one has the write).

use std::time::Duration;

use redis::aio::ConnectionLike;
use redis::{Cmd, RedisResult, Value};

use super::grab::{batch_command, decode_reply};
use super::lifecycle::snapshot_command;
use super::{functions, CustomerId, GrabOutcome, PromotionId, ScriptError};

/// How many replicas must acknowledge a grant before it is answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Durability {
    /// Replicas that must hold the write (`WAIT numreplicas`); at least 1.
    pub replicas: u32,
    /// Longest wait for them (`WAIT timeout`); keep it below the Redis
    /// response timeout so the pipeline is not abandoned first.
    pub timeout: Duration,
}

impl Durability {
    /// Replicas `WAIT` asks for: at least one.
    pub fn wanted(self) -> u32 {
        self.replicas.max(1)
    }

    /// `WAIT`'s timeout in ms: at least one (0 would wait forever).
    fn timeout_ms(self) -> u64 {
        (self.timeout.as_millis() as u64).max(1)
    }

    /// Adds the probe write and `WAIT` to `pipe`: `SET <probe> 1 PX 1000`,
    /// then `WAIT n timeout`, which counts from that write.
    fn probe_then_wait(self, pipe: &mut redis::Pipeline, probe: &str) {
        pipe.cmd("SET").arg(probe).arg(1).arg("PX").arg(1000);
        pipe.cmd("WAIT").arg(self.wanted()).arg(self.timeout_ms());
    }
}

/// A durable grab failed.
#[derive(Debug, thiserror::Error)]
pub enum DurableGrabError {
    /// Redis failed or answered nonsense: the outcome is unknown.
    #[error(transparent)]
    Script(#[from] ScriptError),
    /// The master granted (or holds) the coupon, but fewer than `wanted`
    /// replicas acknowledged it in time: a failover now may lose it. Answer
    /// 503 (maybe granted, retry), never 200.
    #[error(
        "grant acknowledged by {acked} of {wanted} replica(s) within {timeout_ms} ms; \
         it may be lost if the master fails now"
    )]
    NotReplicated {
        outcome: GrabOutcome,
        wanted: u32,
        acked: u32,
        timeout_ms: u64,
    },
}

/// The probe key of a promotion: written (with a one-second expiry) in every
/// durable grab pipeline so that `WAIT` also covers grants the call only read.
pub fn replication_probe_key(id: &PromotionId) -> String {
    format!("seckill:{}:replication-probe", id.hash_tag())
}

/// Like [`grab`](super::grab), but answers a grant only once `durability`
/// replicas acknowledged it; see the module documentation. Other outcomes
/// (sold out, not started, ...) are returned whatever the acknowledgements,
/// since none of them promises a coupon.
// The outcome inside NotReplicated makes the error large; it is matched on
// by callers (what the master said), and a grab is not a hot loop of Results.
#[allow(clippy::result_large_err)]
pub async fn grab_durable<C: ConnectionLike>(
    con: &mut C,
    id: &PromotionId,
    customer: &CustomerId,
    durability: Durability,
) -> Result<GrabOutcome, DurableGrabError> {
    grab_batch_durable(con, id, std::slice::from_ref(customer), durability)
        .await?
        .pop()
        .unwrap_or_else(|| Err(ScriptError::BadReply("durable grab: no outcome".into()).into()))
}

/// A batch of grabs (see [`grab_batch`](super::grab_batch)) followed by one
/// `WAIT` for the whole batch: one answer per customer, a grant that too
/// few replicas acknowledged as [`DurableGrabError::NotReplicated`]. The
/// outer error is the batch's: Redis failed, nobody's outcome is known.
#[allow(clippy::result_large_err)]
pub async fn grab_batch_durable<C: ConnectionLike>(
    con: &mut C,
    id: &PromotionId,
    customers: &[CustomerId],
    durability: Durability,
) -> Result<Vec<Result<GrabOutcome, DurableGrabError>>, ScriptError> {
    let (reply, acked) = call_then_wait(
        con,
        batch_command(id, customers),
        &replication_probe_key(id),
        &snapshot_command(id),
        durability,
    )
    .await?;
    Ok(confirmed(
        decode_reply(id, customers, reply)?,
        acked,
        durability,
    ))
}

/// The answers of a batch whose writes `acked` replicas acknowledged:
/// each outcome that promises a coupon (granted, already granted) as
/// [`DurableGrabError::NotReplicated`] when fewer than the wanted replicas
/// did, every other outcome as it is.
#[allow(clippy::result_large_err)]
pub fn confirmed(
    outcomes: Vec<GrabOutcome>,
    acked: u32,
    durability: Durability,
) -> Vec<Result<GrabOutcome, DurableGrabError>> {
    let (wanted, timeout_ms) = (durability.wanted(), durability.timeout_ms());
    outcomes
        .into_iter()
        .map(|outcome| {
            if outcome.promises_coupon() && acked < wanted {
                Err(DurableGrabError::NotReplicated {
                    outcome,
                    wanted,
                    acked,
                    timeout_ms,
                })
            } else {
                Ok(outcome)
            }
        })
        .collect()
}

/// How many replicas acknowledged every write that Redis executed before
/// this call is sent: `SET <probe> 1 PX 1000` and `WAIT n timeout` in one
/// pipeline over `con`, which must reach the master of the probe's slot
/// and should be a connection of its own (`WAIT` blocks it; see
/// `RedisConnection::independent`). The probe's write is what `WAIT`
/// counts from (a connection's own last write), and it comes after every
/// call whose reply was received before this one was sent: this is how
/// the command worker confirms one batch while the next one is in Redis
/// (`command::replica_acks`).
pub async fn acknowledged<C: ConnectionLike>(
    con: &mut C,
    probe: &str,
    durability: Durability,
) -> Result<u32, ScriptError> {
    let mut pipe = redis::pipe();
    durability.probe_then_wait(&mut pipe, probe);
    let (_, acked): ((), u32) = pipe.query_async(con).await?;
    Ok(acked)
}

/// The durability rule's pipeline, for any one-slot call: `call` (an
/// `FCALL`), `SET <probe> 1 PX 1000` and `WAIT n timeout` over one
/// connection to the master of the probe's slot (which must be `call`'s).
/// Answers the call's reply and how many replicas acknowledged every write
/// of that connection so far: the call's own, and through the probe whatever
/// the call only read. A missing library is loaded and the call sent again;
/// a cluster redirection inside the pipeline (not followed by the cluster
/// client) is sent again after `refresh`, a routed read of the same slot
/// that makes the client learn the slot's new owner.
pub(super) async fn call_then_wait<C: ConnectionLike>(
    con: &mut C,
    call: Cmd,
    probe: &str,
    refresh: &Cmd,
    durability: Durability,
) -> Result<(Value, u32), ScriptError> {
    let mut pipe = redis::pipe();
    pipe.add_command(call);
    durability.probe_then_wait(&mut pipe, probe);
    pipe.ignore_errors();
    let mut attempts = 0;
    loop {
        attempts += 1;
        let replies: Vec<RedisResult<Value>> = pipe.query_async(con).await?;
        let mut replies = replies.into_iter();
        let (Some(call), Some(_probe), Some(wait)) =
            (replies.next(), replies.next(), replies.next())
        else {
            return Err(ScriptError::BadReply(
                "durable call: short pipeline reply".into(),
            ));
        };
        match call {
            Ok(v) => {
                let acked: u32 = match wait {
                    Ok(v) => redis::from_redis_value(v).unwrap_or(0),
                    Err(_) => 0,
                };
                return Ok((v, acked));
            }
            Err(e) if attempts < 3 && functions::is_not_loaded(&e) => {
                // Redis lost the library (restart without persistence, a
                // new master): load it, send the call again.
                functions::load(con).await?;
            }
            Err(e) if attempts < 3 && e.is_cluster_error() => {
                // MOVED/ASK/TRYAGAIN/CLUSTERDOWN inside a pipeline: the call
                // did not run. One routed read teaches the client the owner.
                let _ = refresh.query_async::<Value>(con).await;
                tokio::time::sleep(Duration::from_millis(50 * attempts as u64)).await;
            }
            Err(e) => return Err(e.into()),
        }
    }
}
