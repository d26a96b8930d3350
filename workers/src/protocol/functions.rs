//! The `seckill_v3` Redis Functions library: every Lua function of the
//! protocol, assembled at compile time from `functions/*.lua` (one file per
//! concern) into one library, loaded once per master with
//! `FUNCTION LOAD REPLACE` instead of a prelude sent and run with every call.
//!
//! [`call`] is the one place that spells `FCALL`: it loads the library and
//! retries once when Redis answers that the function does not exist (a
//! restart without persistence, or a new master that never had it; functions
//! are persisted in RDB/AOF and replicated, so this is rare). On a Redis
//! Cluster, `FUNCTION LOAD` goes to every master (the cluster client routes it
//! to all primaries), so the one that owns a promotion's slot has it.

use redis::aio::ConnectionLike;
use redis::{Cmd, ErrorKind, FromRedisValue, RedisError, ServerErrorKind};

/// The library's name: the protocol version. Two releases with different
/// versions can be loaded side by side during a rolling upgrade.
pub const LIBRARY_NAME: &str = "seckill_v3";

/// The library source: a head of shared helpers, then the functions by concern.
pub const LIBRARY: &str = concat!(
    include_str!("functions/library_head.lua"),
    "\n",
    include_str!("functions/lifecycle.lua"),
    "\n",
    include_str!("functions/grab.lua"),
    "\n",
    include_str!("functions/read_model.lua"),
    "\n",
    include_str!("functions/shards.lua"),
);

/// A function of the library, by its registered name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Function(&'static str);

impl Function {
    pub const fn name(self) -> &'static str {
        self.0
    }
}

/// Registers or updates a promotion, starts it when due.
pub const SCHEDULE: Function = Function("seckill_v3_schedule");
/// Expired or Deleted.
pub const FINISH: Function = Function("seckill_v3_finish");
/// Read-only state and Redis' clock.
pub const SNAPSHOT: Function = Function("seckill_v3_snapshot");
/// A batch of customers grab one coupon each (the hot path).
pub const GRAB: Function = Function("seckill_v3_grab");

/// A batch of customers of one home shard grab on that shard (S > 1).
pub const SHARD_GRAB: Function = Function("seckill_v3_shard_grab");
/// Records the shard map (salts) of a sharded promotion; the first plan wins.
pub const SHARD_PLAN: Function = Function("seckill_v3_shard_plan");
/// Replaces the shard map of a promotion that has not started (a changed
/// `spec.shards`).
pub const SHARD_REPLAN: Function = Function("seckill_v3_shard_replan");
/// Every shard is scheduled: shard 0 may start.
pub const SHARD_READY: Function = Function("seckill_v3_shard_ready");
/// Registers one shard: spec, index, S and its initial numbers.
pub const SHARD_SCHEDULE: Function = Function("seckill_v3_shard_schedule");
/// Appends the one PromotionStarted on shard 0.
pub const SHARD_START: Function = Function("seckill_v3_shard_start");
/// Opens shard i >= 1 once Started is durable.
pub const SHARD_OPEN: Function = Function("seckill_v3_shard_open");
/// Step 1 of a stock move, on the donor.
pub const MOVE_OUT: Function = Function("seckill_v3_move_out");
/// Step 2 of a stock move, on the recipient (idempotent; grants the waiting).
pub const MOVE_IN: Function = Function("seckill_v3_move_in");
/// Step 3 of a stock move, on the donor (idempotent).
pub const MOVE_DONE: Function = Function("seckill_v3_move_done");
/// Read-only: the donor's pending moves out.
pub const MOVES_PENDING: Function = Function("seckill_v3_moves_pending");
/// Read-only: one shard's phase, stock, pending moves, epoch and grants.
pub const SHARD_COLLECT: Function = Function("seckill_v3_shard_collect");
/// The sold-out double collect's second part on shard 0; appends Finished.
pub const FINISH_SOLDOUT: Function = Function("seckill_v3_finish_soldout");
/// Phase 1 of an Expired/Deleted finish, on shard 0.
pub const FINISH_BEGIN: Function = Function("seckill_v3_finish_begin");
/// Phase 2: closes shard i >= 1, freezing its count.
pub const SHARD_CLOSE: Function = Function("seckill_v3_shard_close");
/// Phase 3, on shard 0: appends Finished with the total.
pub const FINISH_COMMIT: Function = Function("seckill_v3_finish_commit");

/// Every function the library registers.
pub const ALL: [Function; 20] = [
    SCHEDULE,
    FINISH,
    SNAPSHOT,
    GRAB,
    SHARD_GRAB,
    SHARD_PLAN,
    SHARD_REPLAN,
    SHARD_READY,
    SHARD_SCHEDULE,
    SHARD_START,
    SHARD_OPEN,
    MOVE_OUT,
    MOVE_IN,
    MOVE_DONE,
    MOVES_PENDING,
    SHARD_COLLECT,
    FINISH_SOLDOUT,
    FINISH_BEGIN,
    SHARD_CLOSE,
    FINISH_COMMIT,
];

/// The `FCALL` command of `function` with `keys` (all of one promotion,
/// hence one cluster slot) and `args`, for callers that pipeline it.
pub fn command<'a>(
    function: Function,
    keys: &[&str],
    args: impl IntoIterator<Item = &'a str>,
) -> Cmd {
    let mut cmd = redis::cmd("FCALL");
    cmd.arg(function.name()).arg(keys.len()).arg(keys);
    for a in args {
        cmd.arg(a);
    }
    cmd
}

/// Loads (or replaces) the library: on every master of a cluster.
pub async fn load<C: ConnectionLike>(con: &mut C) -> Result<(), RedisError> {
    redis::cmd("FUNCTION")
        .arg("LOAD")
        .arg("REPLACE")
        .arg(LIBRARY)
        .query_async::<redis::Value>(con)
        .await
        .map(drop)
}

/// Loads the library when a component sets up its connection, in the
/// background: Redis may not be up yet (components start while it is down),
/// and then the first call loads it ([`call`]).
pub fn load_at_setup<C: ConnectionLike + Send + 'static>(mut con: C) {
    tokio::spawn(async move {
        match load(&mut con).await {
            Ok(()) => tracing::debug!(library = LIBRARY_NAME, "functions library loaded"),
            Err(e) => tracing::info!(library = LIBRARY_NAME, error = %e,
                "functions library not loaded at setup; the first call will load it"),
        }
    });
}

/// Whether `e` says the function called is not loaded on that server.
pub fn is_not_loaded(e: &RedisError) -> bool {
    e.kind() == ErrorKind::Server(ServerErrorKind::ResponseError)
        && e.detail()
            .is_some_and(|d| d.to_ascii_lowercase().contains("function not found"))
}

/// Runs `cmd` (an `FCALL` built by [`command`]); when the function is not
/// loaded, loads the library and runs it once more.
pub async fn call<C: ConnectionLike, T: FromRedisValue>(
    con: &mut C,
    cmd: &Cmd,
) -> Result<T, RedisError> {
    match cmd.query_async(con).await {
        Err(e) if is_not_loaded(&e) => {
            tracing::info!(
                library = LIBRARY_NAME,
                "Redis lacks the functions library; loading it"
            );
            load(con).await?;
            cmd.query_async(con).await
        }
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_library_is_named_after_the_protocol_version_and_registers_every_function() {
        let first_line = LIBRARY.lines().next().unwrap_or_default();
        assert_eq!(first_line, format!("#!lua name={LIBRARY_NAME}"));
        for f in ALL {
            assert!(f.name().starts_with(&format!("{LIBRARY_NAME}_")), "{f:?}");
            assert!(
                LIBRARY.contains(&format!("'{}'", f.name())),
                "{} is not registered in the library",
                f.name()
            );
        }
        assert_eq!(LIBRARY.matches("#!lua").count(), 1, "one shebang only");
    }

    #[test]
    fn the_grab_keeps_its_count_in_the_state_field_tools_read() {
        let field = super::super::GRANTED_FIELD;
        let grab = include_str!("functions/grab.lua");
        assert!(grab.contains(&format!("redis.call('HSET', key, '{field}', granted)")));
        let head = include_str!("functions/library_head.lua");
        assert!(head.contains(&format!("'{field}',")));
    }

    #[test]
    fn fcall_names_the_function_then_the_key_count() {
        let cmd = command(GRAB, &["s", "c", "e"], ["alice", "bob"]);
        let args: Vec<Vec<u8>> = cmd
            .args_iter()
            .map(|a| match a {
                redis::Arg::Simple(b) => b.to_vec(),
                _ => Vec::new(),
            })
            .collect();
        let text: Vec<&str> = args
            .iter()
            .map(|a| std::str::from_utf8(a).unwrap())
            .collect();
        assert_eq!(
            text,
            [
                "FCALL",
                "seckill_v3_grab",
                "3",
                "s",
                "c",
                "e",
                "alice",
                "bob"
            ]
        );
    }
}
