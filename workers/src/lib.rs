//! seckill workers: the Redis protocol and the command, query and projector
//! roles of `seckill-worker`.
//!
//! Module map:
//! - [`protocol`]: the Redis data model, the only one: keys, streams, events,
//!   phases, the Lua scripts and their answers.
//! - [`command`]: the grab endpoint (`seckill-worker command`).
//! - [`query`]: the query endpoints (`seckill-worker query`).
//! - [`projector`]: streams into read models through a consumer group, and
//!   their rebuild (`seckill-worker projector`).
//! - [`read_model`]: what projectors write and queries read.
//! - [`http`]: the HTTP server every role is served by: routes, limits,
//!   probes, graceful drain.
//! - [`rate_limit`]: abuse control of the grab endpoint.
//! - [`metrics`]: the process' Prometheus registry and the shared metrics.
//! - [`redis_connection`]: the Redis flags and connections (standalone or
//!   cluster, TLS, ACL).
//! - [`redis_server`]: a private `redis-server` child process (`seckill up`
//!   runs one; the tests' fixtures wrap it).
//! - [`runtime`]: the binaries' tokio runtime (single-threaded on one CPU).
//! - [`telemetry`]: how logs are written (text or JSON lines).
//! - [`flags`]: clap flag structs as values (their defaults, never retyped).
//! - [`allocator`]: the binaries' global allocator (mimalloc).

pub mod allocator;
pub mod command;
pub mod flags;
pub mod http;
pub mod metrics;
pub mod projector;
pub mod protocol;
pub mod query;
pub mod rate_limit;
pub mod read_model;
pub mod redis_connection;
pub mod redis_server;
pub mod runtime;
pub mod telemetry;
