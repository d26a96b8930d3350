//! Checks a raw Promotion manifest the way the API server's admission does:
//! against the generated CRD's openAPIV3Schema (the subset of OpenAPI the
//! schema uses: type, required, properties, items, enum, minimum/maximum
//! with OpenAPI 3.0's boolean exclusive flags, nullable, format date-time),
//! then the CEL rule through [`validate`]. `seckill up` uses it to report
//! invalid manifest files by field and reason; the tests use it to prove the
//! example manifests are accepted or refused for the field they name.

use serde_json::Value;

use crate::crdgen;
use crate::promotion::{validate, FieldError, Promotion};

/// The openAPIV3Schema of the generated CRD, as JSON.
pub fn openapi_schema() -> Value {
    crdgen::crd()
        .spec
        .versions
        .first()
        .and_then(|v| v.schema.as_ref())
        .and_then(|s| s.open_api_v3_schema.as_ref())
        .and_then(|s| serde_json::to_value(s).ok())
        .unwrap_or(Value::Null)
}

fn error(field: &str, reason: impl Into<String>) -> FieldError {
    FieldError {
        field: field.to_owned(),
        reason: reason.into(),
    }
}

fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_owned()
    } else {
        format!("{path}.{key}")
    }
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(n) if n.is_i64() || n.is_u64() => "integer",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

fn is_date_time(s: &str) -> bool {
    chrono::DateTime::parse_from_rfc3339(s).is_ok()
}

/// Checks `value` at `path` against `schema`, appending what is wrong.
pub fn check_schema(schema: &Value, value: &Value, path: &str, errors: &mut Vec<FieldError>) {
    if value.is_null() {
        if schema.get("nullable") != Some(&Value::Bool(true)) {
            errors.push(error(path, "must not be null"));
        }
        return;
    }
    let expected = schema.get("type").and_then(Value::as_str);
    let actual = type_name(value);
    let type_ok = match expected {
        None => true,
        Some("number") => matches!(actual, "number" | "integer"),
        Some(t) => t == actual,
    };
    if !type_ok {
        errors.push(error(
            path,
            format!(
                "must be of type {}, got {actual} {value}",
                expected.unwrap_or("?")
            ),
        ));
        return;
    }
    if let Some(allowed) = schema.get("enum").and_then(Value::as_array) {
        if !allowed.contains(value) {
            errors.push(error(
                path,
                format!(
                    "must be one of {}, got {value}",
                    Value::Array(allowed.clone())
                ),
            ));
        }
    }
    if let Some(n) = value.as_f64() {
        if let Some(min) = schema.get("minimum").and_then(Value::as_f64) {
            let exclusive = schema.get("exclusiveMinimum") == Some(&Value::Bool(true));
            if n < min || (exclusive && n == min) {
                let bound = if exclusive { "more than" } else { "at least" };
                errors.push(error(path, format!("must be {bound} {min}, got {value}")));
            }
        }
        if let Some(max) = schema.get("maximum").and_then(Value::as_f64) {
            let exclusive = schema.get("exclusiveMaximum") == Some(&Value::Bool(true));
            if n > max || (exclusive && n == max) {
                let bound = if exclusive { "less than" } else { "at most" };
                errors.push(error(path, format!("must be {bound} {max}, got {value}")));
            }
        }
    }
    if let (Some(s), Some("date-time")) =
        (value.as_str(), schema.get("format").and_then(Value::as_str))
    {
        if !is_date_time(s) {
            errors.push(error(
                path,
                format!("must be an RFC 3339 date-time such as 2026-11-26T10:00:00Z, got {s:?}"),
            ));
        }
    }
    if let Some(obj) = value.as_object() {
        if let Some(required) = schema.get("required").and_then(Value::as_array) {
            for key in required.iter().filter_map(Value::as_str) {
                if !obj.contains_key(key) {
                    errors.push(error(&join(path, key), "is required"));
                }
            }
        }
        if let Some(props) = schema.get("properties").and_then(Value::as_object) {
            for (key, sub) in props {
                if let Some(v) = obj.get(key) {
                    check_schema(sub, v, &join(path, key), errors);
                }
            }
        }
    }
    if let (Some(items), Some(arr)) = (schema.get("items"), value.as_array()) {
        for (i, v) in arr.iter().enumerate() {
            check_schema(items, v, &format!("{path}[{i}]"), errors);
        }
    }
}

/// Checks a whole manifest (apiVersion, kind, metadata.name, the schema,
/// then the CEL rule) and returns the typed object when it is acceptable.
pub fn check_manifest(manifest: &Value) -> Result<Promotion, Vec<FieldError>> {
    let mut errors = Vec::new();
    if manifest.get("apiVersion").and_then(Value::as_str) != Some("seckill.io/v1") {
        errors.push(error("apiVersion", "must be seckill.io/v1"));
    }
    if manifest.get("kind").and_then(Value::as_str) != Some("Promotion") {
        errors.push(error("kind", "must be Promotion"));
    }
    if manifest
        .pointer("/metadata/name")
        .and_then(Value::as_str)
        .is_none_or(str::is_empty)
    {
        errors.push(error("metadata.name", "is required"));
    }
    check_schema(&openapi_schema(), manifest, "", &mut errors);
    if !errors.is_empty() {
        return Err(errors);
    }
    let promotion: Promotion =
        serde_json::from_value(manifest.clone()).map_err(|e| vec![error("", e.to_string())])?;
    validate(&promotion.spec)?;
    Ok(promotion)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn manifest(spec: Value) -> Value {
        json!({"apiVersion": "seckill.io/v1", "kind": "Promotion", "metadata": {"name": "sale"}, "spec": spec})
    }

    fn good() -> Value {
        json!({"publishTime": "2026-11-26T10:00:00Z", "finishTime": "2026-11-26T11:00:00Z", "numberOfCoupons": 100, "discount": 0.2})
    }

    fn fields(v: Value) -> Vec<String> {
        check_manifest(&v)
            .err()
            .unwrap_or_default()
            .into_iter()
            .map(|e| e.field)
            .collect()
    }

    #[test]
    fn a_manifest_within_the_schema_is_accepted() {
        let p = check_manifest(&manifest(good())).unwrap();
        assert_eq!(p.spec.number_of_coupons, 100);
    }

    #[test]
    fn the_schema_rules_are_enforced_with_the_field_named() {
        let with = |k: &str, v: Value| {
            let mut s = good();
            s[k] = v;
            manifest(s)
        };
        assert_eq!(
            fields(with("numberOfCoupons", json!(0))),
            ["spec.numberOfCoupons"]
        );
        assert_eq!(
            fields(with("numberOfCoupons", json!("ten"))),
            ["spec.numberOfCoupons"]
        );
        assert_eq!(
            fields(with("numberOfCoupons", json!(1.5))),
            ["spec.numberOfCoupons"]
        );
        assert_eq!(fields(with("discount", json!(0))), ["spec.discount"]);
        assert_eq!(fields(with("discount", json!(1.5))), ["spec.discount"]);
        assert_eq!(
            fields(with("publishTime", json!("tomorrow"))),
            ["spec.publishTime"]
        );
        assert_eq!(
            fields(with("finishTime", json!("2026-11-26T09:00:00Z"))),
            ["spec.finishTime"]
        );
        let mut missing = good();
        missing.as_object_mut().unwrap().remove("discount");
        assert_eq!(fields(manifest(missing)), ["spec.discount"]);
        assert_eq!(
            fields(
                json!({"apiVersion": "seckill.io/v1", "kind": "Promotion", "metadata": {"name": "x"}})
            ),
            ["spec"]
        );
    }
}
