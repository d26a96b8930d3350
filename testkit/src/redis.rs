//! A private `redis-server` per test ([`RedisServer`] of `seckill_workers`,
//! on a free loopback port in a temporary directory; the test may kill, stop
//! and restart it), connections to it the way the components open them, and
//! the keys it holds.

use seckill_workers::redis_connection::{RedisArgs, RedisConnection};
pub use seckill_workers::redis_server::{
    free_port, Fsync, RedisServer, RedisServerOptions, TlsFiles,
};

/// A private redis-server with the default options (AOF, `everysec`).
pub fn redis() -> RedisServer {
    redis_started(RedisServerOptions::default())
}

/// A private redis-server with `appendfsync` (`None`: no AOF).
pub fn redis_with(appendfsync: Option<Fsync>) -> RedisServer {
    redis_started(RedisServerOptions {
        appendfsync,
        ..RedisServerOptions::default()
    })
}

/// A private redis-server with `options`.
pub fn redis_started(options: RedisServerOptions) -> RedisServer {
    RedisServer::start(options).expect("redis-server starts")
}

/// How long a test's own Redis command may take: it only bounds a hang (a
/// busy machine, an fsync under `appendfsync always`, can make Redis answer
/// slowly; a test's reads must not fail for that).
pub const TEST_COMMAND_TIMEOUT_MS: u64 = 30_000;

/// The flags for a test's own connection to `server` (the defaults
/// otherwise, but [`TEST_COMMAND_TIMEOUT_MS`]), to adjust before connecting.
pub fn redis_args(server: &RedisServer) -> RedisArgs {
    RedisArgs {
        redis_timeout_ms: TEST_COMMAND_TIMEOUT_MS,
        ..RedisArgs::for_url(server.url())
    }
}

/// A connection to the command side (streams, promotion state).
pub fn connect(server: &RedisServer) -> RedisConnection {
    redis_args(server).connect().expect("connection")
}

/// A connection to the read models (their own database, as the workers
/// open it by default).
pub fn connect_read_models(server: &RedisServer) -> RedisConnection {
    redis_args(server)
        .connect_read_models()
        .expect("connection")
}

/// `INFO <section>` of the server behind `con`, as `field -> value`.
pub async fn info(
    con: &mut RedisConnection,
    section: &str,
) -> redis::RedisResult<Vec<(String, String)>> {
    let text: String = redis::cmd("INFO").arg(section).query_async(con).await?;
    Ok(text
        .lines()
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.to_owned(), v.trim().to_owned()))
        .collect())
}

/// One field of [`info`], parsed; `None` when Redis did not answer (a busy
/// server may time out) or has no such field.
pub async fn info_field<T: std::str::FromStr>(
    con: &mut RedisConnection,
    section: &str,
    field: &str,
) -> Option<T> {
    info(con, section)
        .await
        .ok()?
        .into_iter()
        .find(|(k, _)| k == field)
        .and_then(|(_, v)| v.parse().ok())
}

/// Every key matching `pattern` on the one server behind `con` (`SCAN`,
/// page by page: a node of a cluster answers for its own keys only).
pub async fn scan_keys(con: &mut impl redis::aio::ConnectionLike, pattern: &str) -> Vec<String> {
    let mut keys = Vec::new();
    let mut cursor = 0u64;
    loop {
        let (next, page): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(pattern)
            .arg("COUNT")
            .arg(1000)
            .query_async(con)
            .await
            .expect("SCAN answers");
        keys.extend(page);
        if next == 0 {
            return keys;
        }
        cursor = next;
    }
}

/// `KEYS pattern` on the server behind `con`: for a test's small database
/// only (it blocks the server while it walks every key).
pub async fn keys(con: &mut impl redis::aio::ConnectionLike, pattern: &str) -> Vec<String> {
    redis::cmd("KEYS")
        .arg(pattern)
        .query_async(con)
        .await
        .expect("KEYS answers")
}
