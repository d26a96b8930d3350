//! seckill's test kit: the fixtures every test shares, real processes and
//! no mocks. A dev-dependency of the other crates only (`publish = false`).
//!
//! Module map:
//! - [`eventually`](mod@eventually): waiting for a condition, the one poll-until-deadline loop.
//! - [`redis`]: a private `redis-server` per test, connections to it, `INFO`.
//! - [`redis_cluster`]: a private Redis Cluster whose nodes a test kills,
//!   pauses, restarts and reshards.
//! - [`promotions`]: promotion ids, customers and windows; registration
//!   through the protocol's scripts.
//! - [`stream`]: the stream reader (every event of a promotion, sorted into
//!   facts) and the projector group's pending entries.
//! - [`shards`]: a crowd of command workers on a sharded promotion;
//!   [`shard_audit`]: what every shard holds, read from Redis, and the
//!   invariants on it.
//! - [`shuffle`]: the deterministic shuffle crowds arrive in.
//! - [`concurrent`]: the start and finish races, many callers at once.
//! - [`client`]: the one HTTP client, and the API shapes tests send and read.
//! - [`process`]: where the binaries under test are, libfaketime, signals.
//! - [`worker`]: a `seckill-worker` child process (tests of `seckill-workers`).
//! - [`up`]: a `seckill up` child process (tests of `seckill-cli`).

pub mod client;
pub mod concurrent;
pub mod eventually;
pub mod process;
pub mod promotions;
pub mod redis;
pub mod redis_cluster;
pub mod shard_audit;
pub mod shards;
pub mod shuffle;
pub mod stream;
pub mod up;
pub mod worker;

pub use client::{Reply, JSON};
pub use eventually::{eventually, eventually_blocking, try_eventually};
pub use worker::{CommandOptions, Worker};
