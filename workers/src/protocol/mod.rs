//! The Redis data model of seckill: the one place that names keys, streams,
//! consumer groups, event types and the Redis Functions library. Every component (command,
//! query and projector workers, the operator, `seckill up`) imports this module;
//! nobody else spells a key.
//!
//! Layout, for a promotion `ns/name` (hash tag `{ns/name}`, so every key one
//! script touches lives in a single Redis Cluster slot):
//!
//! | key | type | written by |
//! |---|---|---|
//! | `seckill:{ns/name}:state` | hash: spec, phase, granted, times | functions only |
//! | `seckill:{ns/name}:customers` | hash: customer id -> `<seq>:<grantedAtMs>` (v1: coupon JSON) | `grab` |
//! | `seckill:{ns/name}:events` | stream: the event log, source of truth | functions only |
//! | `seckill:promotions` | set of promotion ids (discovery) | operator, after `schedule` |
//! | `seckill:rm:*` | read models ([`read_model`]) | projectors only |
//!
//! A sharded promotion (S > 1, [`shards`]) adds `seckill:{ns/name}:shards`
//! (the shard map), per shard `moves-out` and `moves-in` hashes, and the
//! keys of shards 1.. under their own tags `{ns/name~i~salt}` ([`ShardKeys`]).

mod durability;
mod events;
pub mod functions;
mod grab;
pub mod grab_entry;
mod ids;
mod keys;
mod lifecycle;
mod phase;
pub mod placement;
mod projection;
pub mod ranges;
pub mod shards;

pub use durability::{
    acknowledged, confirmed, grab_batch_durable, grab_durable, replication_probe_key, Durability,
    DurableGrabError,
};
pub use events::{
    rfc3339, rfc3339_ms, stock_move_entry, CouponGrabbed, DecodeError, Event, FinishReason,
    PromotionFinished, PromotionStarted, EVENT_FIELD, EVENT_VERSION, STOCK_MOVE_TYPES,
    STOCK_MOVE_VERSION,
};
pub use grab::{decode_reply, grab, grab_batch, holders, Coupon, GrabOutcome};
pub use ids::{coupon_id, CustomerId, IdError, PromotionId};
pub use keys::{
    customer_hash, read_model, shard_map_key, shard_tag, PromotionKeys, ShardKeys, GRANTED_FIELD,
    PROJECTOR_GROUP, PROMOTION_INDEX_KEY,
};
pub use lifecycle::{
    finish, schedule, snapshot, snapshots, PromotionSpec, ScheduleResult, ScriptError, Snapshot,
};
pub use phase::Phase;
pub use placement::home_shard;
pub use projection::{PROJECT, PROJECT_SOURCE};
