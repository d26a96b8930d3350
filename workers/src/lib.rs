//! seckill workers: the Redis protocol and the command, query and projector
//! roles of `seckill-worker`.

pub mod command;
pub mod http;
pub mod metrics;
pub mod projector;
pub mod protocol;
pub mod query;
pub mod rate_limit;
pub mod read_model;
pub mod redis_cluster;
pub mod redis_connection;
pub mod redis_server;
pub mod telemetry;
