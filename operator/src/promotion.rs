//! The `Promotion` custom resource: what a platform team declares, and the
//! status the operator reports back.
//!
//! The Rust types are the single source of the CRD: the OpenAPI schema
//! (including the admission rules) is derived from them, and their doc
//! comments become the `kubectl explain` text. [`validate`] applies the same
//! rules to a spec in Rust, for manifests that never reach an API server
//! (`seckill up`).

use chrono::{DateTime, Utc};
use kube::CustomResource;
use schemars::{json_schema, JsonSchema, Schema, SchemaGenerator};
use seckill_workers::protocol::{self, FinishReason};
use serde::{Deserialize, Serialize};

/// The status' phase is the Redis data model's own (one definition, in
/// `seckill_workers::protocol`); only its schema is the CRD's (see `phase`).
pub use seckill_workers::protocol::Phase;

/// The CEL rule the API server evaluates on every spec; [`validate`] is its
/// Rust twin.
pub const FINISH_AFTER_PUBLISH_RULE: &str =
    "timestamp(self.finishTime) > timestamp(self.publishTime)";

/// The CEL rule that every shard starts with at least one coupon (each
/// shard is dealt a block of the numbers 1..numberOfCoupons; an empty shard
/// could never grant). A numberOfCoupons below 1 is refused by its own
/// rule, so this one stays silent then (one error per broken rule).
/// [`validate`] is its Rust twin.
pub const SHARDS_WITHIN_COUPONS_RULE: &str =
    "!has(self.shards) || self.numberOfCoupons < 1 || self.shards <= self.numberOfCoupons";

/// Most shards a promotion may have (the protocol's placement bound).
pub const MAX_SHARDS: u32 = 1024;

/// A flash sale: from `publishTime` to `finishTime`, customers may grab one
/// coupon each, `numberOfCoupons` in total, each worth `discount` off.
// clippy reads the repeated `type_ = ...` of the printer columns as duplicated
// attributes; they are arguments of distinct columns. PUBLISH and FINISH are
// strings, the timestamps as declared: a `date` column renders an age, and a
// time in the future has none (kubectl prints `<invalid>` for it, just when
// people look most: before the sale). AGE stays the object's age.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "seckill.io",
    version = "v1",
    kind = "Promotion",
    plural = "promotions",
    shortname = "promo",
    namespaced,
    status = "PromotionStatus",
    doc = "A flash sale of a fixed number of coupons between a publish and a finish time. The seckill operator registers it in Redis, starts it at publishTime and finishes it at finishTime, when sold out, or when it is deleted.",
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase"),
    printcolumn(name = "Discount", type_ = "number", json_path = ".spec.discount"),
    printcolumn(
        name = "Coupons",
        type_ = "integer",
        json_path = ".spec.numberOfCoupons"
    ),
    printcolumn(name = "Granted", type_ = "integer", json_path = ".status.granted"),
    printcolumn(name = "Remaining", type_ = "integer", json_path = ".status.remaining"),
    printcolumn(name = "Publish", type_ = "string", json_path = ".spec.publishTime"),
    printcolumn(name = "Finish", type_ = "string", json_path = ".spec.finishTime"),
    printcolumn(
        name = "Shards",
        type_ = "integer",
        json_path = ".spec.shards",
        priority = "1"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [{
    "rule": FINISH_AFTER_PUBLISH_RULE,
    "message": "finishTime must be after publishTime",
    "fieldPath": ".finishTime",
    "reason": "FieldValueInvalid",
}, {
    "rule": SHARDS_WITHIN_COUPONS_RULE,
    "message": "shards must be at most numberOfCoupons",
    "fieldPath": ".shards",
    "reason": "FieldValueInvalid",
}]))]
pub struct PromotionSpec {
    /// When coupons can first be grabbed (RFC 3339, e.g. 2026-11-26T10:00:00Z).
    /// The time is judged by Redis' clock. May change until the promotion starts.
    #[schemars(schema_with = "date_time")]
    pub publish_time: DateTime<Utc>,

    /// When the promotion ends if it has not sold out before (RFC 3339); must
    /// be after publishTime.
    #[schemars(schema_with = "date_time")]
    pub finish_time: DateTime<Utc>,

    /// How many coupons there are in total (at least 1). Each customer gets at
    /// most one.
    #[schemars(schema_with = "coupon_count")]
    pub number_of_coupons: u64,

    /// The fraction taken off the price by a coupon: more than 0, at most 1
    /// (0.2 is 20% off).
    #[schemars(schema_with = "discount_fraction")]
    pub discount: f64,

    /// Free text for people; the operator ignores it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,

    /// Stock shards (1 to 1024, at most numberOfCoupons; default 1): the
    /// stock is split over this many shards, each on its own Redis Cluster
    /// slot, so one promotion's grabs spread over that many masters. Use the
    /// number of masters, and only when one promotion's peak exceeds what
    /// one Redis core serves. Needs durable steps (see the operator's
    /// --durable-replicas). Locked once the promotion starts.
    #[serde(default = "one_shard")]
    #[schemars(schema_with = "shard_count")]
    pub shards: u32,
}

fn one_shard() -> u32 {
    1
}

/// What the operator observed, from the promotion's state in Redis.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PromotionStatus {
    /// Where a promotion is in its life.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "phase")]
    pub phase: Option<Phase>,

    /// Coupons granted so far.
    #[serde(default)]
    #[schemars(schema_with = "count")]
    pub granted: u64,

    /// Coupons still available.
    #[serde(default)]
    #[schemars(schema_with = "count")]
    pub remaining: u64,

    /// When the promotion started, by Redis' clock.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "optional_date_time")]
    pub started_at: Option<DateTime<Utc>>,

    /// When the promotion finished, by Redis' clock.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "optional_date_time")]
    pub finished_at: Option<DateTime<Utc>>,

    /// Why it finished: SoldOut, Expired or Deleted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "optional_finish_reason")]
    pub finish_reason: Option<FinishReason>,

    /// The metadata.generation this status was computed from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "optional_generation")]
    pub observed_generation: Option<i64>,

    /// Stock moves between shards not yet completed (sharded promotions
    /// only; a count of moves, each carrying one or more coupons): the reconcile completes those older than
    /// --move-stale-ms, so a lasting non-zero value means Redis refuses the
    /// recovery (see the Ready condition and the operator's log).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "optional_count")]
    pub stock_moves_in_flight: Option<u64>,

    /// Where each shard lives now (sharded promotions only): the master
    /// serving its slot. Slots move in a failover or a resharding; tags do
    /// not, so this is read afresh on every reconcile.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub shards: Vec<ShardPlacement>,

    /// Ready (the operator reached Redis and the status is current),
    /// SpecLocked (a spec change after the start was refused) and, for a
    /// sharded promotion, ShardsColocated (two shards share a master).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "conditions")]
    pub conditions: Vec<Condition>,
}

/// One shard of a sharded promotion and where it lives.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ShardPlacement {
    /// The shard's index (0 holds the promotion's stream and its finish).
    #[schemars(schema_with = "shard_index")]
    pub shard: u32,
    /// The cluster slot of the shard's hash tag.
    #[schemars(schema_with = "cluster_slot")]
    pub slot: u16,
    /// The master serving that slot (host:port), as the slot map says.
    pub master: String,
}

impl PromotionStatus {
    pub fn condition(&self, type_: &str) -> Option<&Condition> {
        self.conditions.iter().find(|c| c.type_ == type_)
    }
}

/// A condition as the Kubernetes API conventions define it.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    /// Ready or SpecLocked.
    #[serde(rename = "type")]
    pub type_: String,
    /// True, False or Unknown.
    #[schemars(schema_with = "condition_status")]
    pub status: String,
    /// A CamelCase word for programs.
    pub reason: String,
    /// A sentence for people.
    pub message: String,
    /// When status last changed.
    #[schemars(schema_with = "date_time")]
    pub last_transition_time: DateTime<Utc>,
    /// The metadata.generation the condition was set for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "optional_generation")]
    pub observed_generation: Option<i64>,
}

fn date_time(_: &mut SchemaGenerator) -> Schema {
    json_schema!({ "type": "string", "format": "date-time" })
}

fn optional_date_time(_: &mut SchemaGenerator) -> Schema {
    json_schema!({ "type": "string", "format": "date-time", "nullable": true })
}

fn shard_count(_: &mut SchemaGenerator) -> Schema {
    json_schema!({
        "type": "integer",
        "format": "int32",
        "minimum": 1,
        "maximum": MAX_SHARDS,
        "default": 1,
    })
}

fn shard_index(_: &mut SchemaGenerator) -> Schema {
    json_schema!({ "type": "integer", "format": "int32", "minimum": 0, "maximum": MAX_SHARDS - 1 })
}

fn cluster_slot(_: &mut SchemaGenerator) -> Schema {
    json_schema!({ "type": "integer", "format": "int32", "minimum": 0, "maximum": 16383 })
}

fn coupon_count(_: &mut SchemaGenerator) -> Schema {
    json_schema!({ "type": "integer", "format": "int64", "minimum": 1 })
}

/// The phases of the Redis data model ([`Phase::ALL`]), as the status shows
/// them.
fn phase(_: &mut SchemaGenerator) -> Schema {
    let phases: Vec<&str> = Phase::ALL.iter().map(|p| p.as_str()).collect();
    json_schema!({ "type": "string", "enum": phases, "nullable": true })
}

fn count(_: &mut SchemaGenerator) -> Schema {
    json_schema!({ "type": "integer", "format": "int64", "minimum": 0 })
}

fn optional_count(_: &mut SchemaGenerator) -> Schema {
    json_schema!({ "type": "integer", "format": "int64", "minimum": 0, "nullable": true })
}

fn optional_generation(_: &mut SchemaGenerator) -> Schema {
    json_schema!({ "type": "integer", "format": "int64", "nullable": true })
}

/// OpenAPI v3.0 as Kubernetes reads it: `exclusiveMinimum` is a boolean
/// qualifying `minimum`.
fn discount_fraction(_: &mut SchemaGenerator) -> Schema {
    json_schema!({
        "type": "number",
        "format": "double",
        "minimum": 0,
        "exclusiveMinimum": true,
        "maximum": 1,
    })
}

fn optional_finish_reason(_: &mut SchemaGenerator) -> Schema {
    json_schema!({
        "type": "string",
        "enum": ["SoldOut", "Expired", "Deleted"],
        "nullable": true,
    })
}

fn condition_status(_: &mut SchemaGenerator) -> Schema {
    json_schema!({ "type": "string", "enum": ["True", "False", "Unknown"] })
}

/// A list keyed by `type`, so server-side apply merges conditions per type.
fn conditions(generator: &mut SchemaGenerator) -> Schema {
    let item = generator.subschema_for::<Condition>();
    json_schema!({
        "type": "array",
        "items": item,
        "x-kubernetes-list-type": "map",
        "x-kubernetes-list-map-keys": ["type"],
    })
}

impl PromotionSpec {
    /// The spec as the Redis protocol takes it.
    pub fn to_protocol(&self) -> protocol::PromotionSpec {
        protocol::PromotionSpec {
            discount: self.discount,
            number_of_coupons: self.number_of_coupons,
            publish_time: self.publish_time,
            finish_time: self.finish_time,
        }
    }
}

/// One broken rule of a spec: which field (JSON path under the object, e.g.
/// `spec.discount`) and why, in words meant for the author of the manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FieldError {
    pub field: String,
    pub reason: String,
}

impl std::fmt::Display for FieldError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.field, self.reason)
    }
}

/// Checks the rules the CRD schema enforces beyond the Rust types: ranges
/// and the CEL rules (finishTime after publishTime, shards at most
/// numberOfCoupons). Types, required
/// fields and date-time formats are guaranteed by deserialization (see
/// [`crate::admission`] to check a raw manifest the way the API server does).
pub fn validate(spec: &PromotionSpec) -> Result<(), Vec<FieldError>> {
    let mut errors = Vec::new();
    if spec.number_of_coupons < 1 {
        errors.push(FieldError {
            field: "spec.numberOfCoupons".into(),
            reason: format!("must be at least 1, got {}", spec.number_of_coupons),
        });
    }
    if !(spec.discount > 0.0 && spec.discount <= 1.0) {
        errors.push(FieldError {
            field: "spec.discount".into(),
            reason: format!("must be more than 0 and at most 1, got {}", spec.discount),
        });
    }
    if !(1..=MAX_SHARDS).contains(&spec.shards) {
        errors.push(FieldError {
            field: "spec.shards".into(),
            reason: format!("must be 1 to {MAX_SHARDS}, got {}", spec.shards),
        });
    } else if spec.number_of_coupons >= 1 && u64::from(spec.shards) > spec.number_of_coupons {
        errors.push(FieldError {
            field: "spec.shards".into(),
            reason: format!(
                "must be at most numberOfCoupons ({}), got {}",
                spec.number_of_coupons, spec.shards
            ),
        });
    }
    if spec.finish_time <= spec.publish_time {
        errors.push(FieldError {
            field: "spec.finishTime".into(),
            reason: format!(
                "must be after publishTime ({}), got {}",
                spec.publish_time.to_rfc3339(),
                spec.finish_time.to_rfc3339()
            ),
        });
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(errors)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> PromotionSpec {
        PromotionSpec {
            publish_time: "2026-11-26T10:00:00Z".parse().unwrap(),
            finish_time: "2026-11-26T11:00:00Z".parse().unwrap(),
            number_of_coupons: 100,
            discount: 0.2,
            description: None,
            shards: 1,
        }
    }

    fn fields(r: Result<(), Vec<FieldError>>) -> Vec<String> {
        r.err()
            .unwrap_or_default()
            .into_iter()
            .map(|e| e.field)
            .collect()
    }

    #[test]
    fn a_spec_within_every_rule_is_valid() {
        assert_eq!(validate(&spec()), Ok(()));
        let edge = PromotionSpec {
            number_of_coupons: 1,
            discount: 1.0,
            ..spec()
        };
        assert_eq!(validate(&edge), Ok(()));
    }

    #[test]
    fn each_broken_rule_names_its_field() {
        let zero = PromotionSpec {
            number_of_coupons: 0,
            ..spec()
        };
        assert_eq!(fields(validate(&zero)), ["spec.numberOfCoupons"]);
        for d in [0.0, -0.1, 1.5, f64::NAN] {
            let bad = PromotionSpec {
                discount: d,
                ..spec()
            };
            assert_eq!(fields(validate(&bad)), ["spec.discount"], "discount {d}");
        }
        let same = PromotionSpec {
            finish_time: spec().publish_time,
            ..spec()
        };
        assert_eq!(fields(validate(&same)), ["spec.finishTime"]);
        for shards in [0, 1025] {
            let bad = PromotionSpec { shards, ..spec() };
            assert_eq!(fields(validate(&bad)), ["spec.shards"], "shards {shards}");
        }
    }

    #[test]
    fn more_shards_than_coupons_is_refused_and_as_many_is_accepted() {
        let many = PromotionSpec {
            number_of_coupons: 3,
            shards: 4,
            ..spec()
        };
        assert_eq!(fields(validate(&many)), ["spec.shards"]);
        let same = PromotionSpec { shards: 3, ..many };
        assert_eq!(validate(&same), Ok(()));
    }

    #[test]
    fn a_manifest_without_shards_reads_as_one_shard() {
        let spec: PromotionSpec = serde_json::from_value(serde_json::json!({
            "publishTime": "2026-11-26T10:00:00Z",
            "finishTime": "2026-11-26T11:00:00Z",
            "numberOfCoupons": 5,
            "discount": 0.5,
        }))
        .unwrap();
        assert_eq!(spec.shards, 1);
    }

    #[test]
    fn every_broken_rule_is_reported_at_once() {
        let bad = PromotionSpec {
            number_of_coupons: 0,
            discount: 2.0,
            finish_time: "2026-11-26T09:00:00Z".parse().unwrap(),
            ..spec()
        };
        assert_eq!(fields(validate(&bad)).len(), 3);
    }
}
