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

    /// Ready (the operator reached Redis and the status is current) and
    /// SpecLocked (a spec change after the start was refused).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "conditions")]
    pub conditions: Vec<Condition>,
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
/// and the CEL rule that finishTime is after publishTime. Types, required
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
