//! The Redis data model of seckill: the one place that names keys, streams,
//! consumer groups, event types and Lua scripts. Every component (command,
//! query and projector workers, the operator, `seckill up`) imports this module;
//! nobody else spells a key.
//!
//! Layout, for a promotion `ns/name` (hash tag `{ns/name}`, so every key one
//! script touches lives in a single Redis Cluster slot):
//!
//! | key | type | written by |
//! |---|---|---|
//! | `seckill:{ns/name}:state` | hash: spec, phase, granted, times | scripts only |
//! | `seckill:{ns/name}:customers` | hash: customer id -> coupon JSON | `grab` |
//! | `seckill:{ns/name}:events` | stream: the event log, source of truth | scripts only |
//! | `seckill:promotions` | set of promotion ids (discovery) | operator, after `schedule` |
//! | `seckill:rm:*` | read models ([`read_model`]) | projectors only |

mod durability;
mod events;
mod ids;
mod keys;
mod phase;
mod projection;
mod scripts;

pub use durability::{grab_durable, replication_probe_key, Durability, DurableGrabError};
pub use events::{
    grab_entry, CouponGrabbed, DecodeError, Event, FinishReason, PromotionFinished,
    PromotionStarted, EVENT_FIELD, EVENT_VERSION,
};
pub use ids::{CustomerId, IdError, PromotionId};
pub use keys::{read_model, PromotionKeys, PROJECTOR_GROUP, PROMOTION_INDEX_KEY};
pub use phase::Phase;
pub use projection::{PROJECT, PROJECT_SOURCE};
pub use scripts::{
    finish, grab, schedule, snapshot, Coupon, GrabOutcome, PromotionSpec, ScheduleResult,
    ScriptError, Snapshot, FINISH, GRAB, SCHEDULE, SNAPSHOT,
};
