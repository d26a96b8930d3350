//! Replica acknowledgements of durable grabs, each `WAIT` on a connection
//! of its own.
//!
//! A durable batch is answered once replicas hold its writes
//! (`protocol::durability`). Sending the batch's `FCALL` and its `WAIT` in
//! one pipeline made every batch of a promotion pay a replica's round trip
//! before the next could go, and, on a connection shared by every
//! promotion, made every command behind a `WAIT` wait too (Redis serves a
//! connection's commands in order, and `WAIT` blocks it).
//!
//! Here the `WAIT` goes apart, after the batch's `FCALL` returned, while the
//! lane sends its next batch ([`Sent::Confirming`](super::group_commit::Sent);
//! a lane is at most one batch ahead, so at most two `WAIT`s per lane are
//! out). Its probe write comes after the batch's call, so the `WAIT` covers
//! it (`protocol::acknowledged`). Each `WAIT` has a connection of its own,
//! taken from a pool that opens one when none is idle and keeps a few idle
//! ones, so that a `WAIT` never queues behind another.
//!
//! Batches whose confirmations are asked while a `WAIT` of their promotion
//! is out could share the next one instead (one `WAIT` for several
//! batches). Measured on the bench (docs/BENCHMARKS.md, "Durable grabs
//! apart from the grab call"), sharing cost more than it saved: a batch
//! waited for the `WAIT` before its own to end, the rounds were as many
//! (about one per batch at 64 connections), and the batches smaller.

use std::sync::{Arc, Mutex};

use crate::protocol::{self, Durability, ScriptError};
use crate::redis_connection::RedisConnection;

/// Idle connections kept for the next `WAIT`s; more are opened when more
/// promotions wait at once, and closed once idle past this count.
const IDLE_KEPT: usize = 8;

/// How many replicas acknowledged, or why nobody knows.
pub type Acked = Result<u32, Arc<ScriptError>>;

/// The acknowledgements of one worker's durable grabs.
pub struct ReplicaAcks {
    durability: Durability,
    /// What the pool's connections are opened from (never used itself).
    redis: RedisConnection,
    idle: Mutex<Vec<RedisConnection>>,
}

impl ReplicaAcks {
    /// Acknowledgements as `durability` asks, on connections opened like
    /// `redis`.
    pub fn new(redis: RedisConnection, durability: Durability) -> Arc<Self> {
        Arc::new(Self {
            durability,
            redis,
            idle: Mutex::new(Vec::new()),
        })
    }

    pub fn durability(&self) -> Durability {
        self.durability
    }

    /// How many replicas hold every write Redis executed before this call
    /// (the caller's batch included): a `WAIT` of its own, sent at once on
    /// a connection of its own. The caller bounds it (the batch's Redis
    /// deadline): a connection whose `WAIT` failed, or was given up when
    /// the caller dropped this future, is dropped, not pooled, as Redis may
    /// still be holding it.
    pub async fn acked(&self, probe: &str) -> Acked {
        let mut con = match self.take_idle() {
            Some(con) => con,
            None => self.redis.independent().map_err(|e| Arc::new(e.into()))?,
        };
        let n = protocol::acknowledged(&mut con, probe, self.durability)
            .await
            .map_err(Arc::new)?;
        self.keep_idle(con);
        Ok(n)
    }

    fn take_idle(&self) -> Option<RedisConnection> {
        self.idle.lock().unwrap_or_else(|e| e.into_inner()).pop()
    }

    fn keep_idle(&self, con: RedisConnection) {
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        if idle.len() < IDLE_KEPT {
            idle.push(con);
        }
    }
}
