//! seckill workers: the Redis protocol and the command, query and projector
//! roles of `seckill-worker`.

pub mod protocol;
pub mod redis_connection;
pub mod redis_server;
