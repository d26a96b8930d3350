//! Checks a raw Promotion manifest the way the API server's admission does:
//! against the generated CRD's openAPIV3Schema (the subset of OpenAPI the
//! schema uses: type, required, properties, items, enum, minimum/maximum
//! with OpenAPI 3.0's boolean exclusive flags, nullable, format date-time),
//! with strict field validation (a field the schema does not declare is
//! refused as `unknown field "spec.coupns"`, as `kubectl apply` against a
//! real API server refuses it), then the CEL rule through [`validate`].
//! `seckill up` uses it to report invalid manifest files by field and
//! reason; `seckill new` to check what it prints; the tests to prove the
//! example manifests are accepted or refused for the field they name.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde_json::{json, Map, Value};

use seckill_workers::protocol::PromotionId;

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

/// The schema the API server checks a whole object against: the CRD's
/// openAPIV3Schema, plus the fields every object has at its root
/// (`apiVersion`, `kind`, and `metadata`, which the CRD leaves open and the
/// server decodes as an ObjectMeta: see [`unknown_metadata_fields`]).
fn object_schema() -> Value {
    let mut schema = openapi_schema();
    if let Some(props) = schema.get_mut("properties").and_then(Value::as_object_mut) {
        props.insert("apiVersion".into(), json!({"type": "string"}));
        props.insert("kind".into(), json!({"type": "string"}));
        props.insert(
            "metadata".into(),
            json!({"type": "object", "x-kubernetes-preserve-unknown-fields": true}),
        );
    }
    schema
}

/// The error of a field no schema declares, in the API server's words.
fn unknown_field(path: &str) -> FieldError {
    error(path, format!("unknown field \"{path}\""))
}

/// The keys of `metadata` that are not fields of an ObjectMeta, as
/// `metadata.<key>` (nested, e.g. `metadata.ownerReferences[0].x`): the
/// keys a round trip through k8s-openapi's ObjectMeta loses. A key whose
/// value is null is not judged (a round trip drops a null known field too).
/// Type errors are left to the schema check and the typed decoding.
fn unknown_metadata_fields(metadata: &Value) -> Vec<FieldError> {
    let Ok(typed) = serde_json::from_value::<ObjectMeta>(metadata.clone()) else {
        return Vec::new();
    };
    let Ok(known) = serde_json::to_value(typed) else {
        return Vec::new();
    };
    let mut errors = Vec::new();
    lost_keys(metadata, &known, "metadata", &mut errors);
    errors
}

/// Appends, as unknown fields, the keys of `sent` (not null) that `kept`
/// does not have, down through objects and arrays.
fn lost_keys(sent: &Value, kept: &Value, path: &str, errors: &mut Vec<FieldError>) {
    match (sent, kept) {
        (Value::Object(sent), Value::Object(kept)) => {
            for (key, value) in sent.iter().filter(|(_, v)| !v.is_null()) {
                let at = join(path, key);
                match kept.get(key) {
                    Some(k) => lost_keys(value, k, &at, errors),
                    None => errors.push(unknown_field(&at)),
                }
            }
        }
        (Value::Array(sent), Value::Array(kept)) => {
            for (i, (s, k)) in sent.iter().zip(kept).enumerate() {
                lost_keys(s, k, &format!("{path}[{i}]"), errors);
            }
        }
        _ => {}
    }
}

/// Whether an object schema keeps fields it does not declare.
fn preserves_unknown_fields(schema: &Value) -> bool {
    schema.get("x-kubernetes-preserve-unknown-fields") == Some(&Value::Bool(true))
}

/// Checks `value` at `path` against `schema`, appending what is wrong.
/// An object whose schema declares `properties` (and does not preserve
/// unknown fields) may hold no other field: strict field validation.
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
            if !preserves_unknown_fields(schema) {
                unknown_keys(obj, props, path, errors);
            }
        }
    }
    if let (Some(items), Some(arr)) = (schema.get("items"), value.as_array()) {
        for (i, v) in arr.iter().enumerate() {
            check_schema(items, v, &format!("{path}[{i}]"), errors);
        }
    }
}

/// Appends the keys of `obj` that `props` does not declare.
fn unknown_keys(
    obj: &Map<String, Value>,
    props: &Map<String, Value>,
    path: &str,
    errors: &mut Vec<FieldError>,
) {
    for key in obj.keys().filter(|k| !props.contains_key(*k)) {
        errors.push(unknown_field(&join(path, key)));
    }
}

/// Checks a whole manifest (apiVersion, kind, metadata.name, the schema
/// with strict field validation, then the CEL rule) and returns the typed
/// object when it is acceptable.
pub fn check_manifest(manifest: &Value) -> Result<Promotion, Vec<FieldError>> {
    let mut errors = Vec::new();
    if manifest.get("apiVersion").and_then(Value::as_str) != Some("seckill.io/v1") {
        errors.push(error("apiVersion", "must be seckill.io/v1"));
    }
    if manifest.get("kind").and_then(Value::as_str) != Some("Promotion") {
        errors.push(error("kind", "must be Promotion"));
    }
    match manifest.pointer("/metadata/name").and_then(Value::as_str) {
        None | Some("") => errors.push(error("metadata.name", "is required")),
        Some(name) => {
            if let Err(e) = PromotionId::new("default", name) {
                errors.push(error("metadata.name", e.0));
            }
        }
    }
    if let Some(namespace) = manifest
        .pointer("/metadata/namespace")
        .and_then(Value::as_str)
    {
        if let Err(e) = PromotionId::new(namespace, "x") {
            errors.push(error("metadata.namespace", e.0));
        }
    }
    check_schema(&object_schema(), manifest, "", &mut errors);
    if let Some(metadata) = manifest.get("metadata") {
        errors.extend(unknown_metadata_fields(metadata));
    }
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

    #[test]
    fn a_name_or_namespace_kubernetes_would_refuse_is_refused_naming_it() {
        let mut object = manifest(good());
        object["metadata"]["name"] = json!("Black_Friday");
        assert_eq!(fields(object.clone()), ["metadata.name"]);
        object["metadata"]["name"] = json!("black-friday.2026");
        object["metadata"]["namespace"] = json!("shop.eu");
        assert_eq!(fields(object.clone()), ["metadata.namespace"]);
        object["metadata"]["namespace"] = json!("shop");
        assert_eq!(fields(object), Vec::<String>::new());
    }

    #[test]
    fn a_misspelt_spec_field_is_refused_as_the_api_server_refuses_it() {
        let mut spec = good();
        spec["coupns"] = json!(500);
        let errors = check_manifest(&manifest(spec)).unwrap_err();
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert_eq!(errors[0].field, "spec.coupns");
        assert_eq!(
            errors[0].to_string(),
            r#"spec.coupns: unknown field "spec.coupns""#
        );
    }

    #[test]
    fn unknown_fields_are_refused_at_the_root_in_metadata_and_in_status_all_at_once() {
        // The fields kube-apiserver v1.26.1 names for this very object
        // (`kubectl create --dry-run=server --validate=strict`, run by hand
        // against ../shared/kube): "strict decoding error: unknown field
        // "metadata.foo", unknown field "metadata.ownerReferences[0].bogus",
        // unknown field "bogus", unknown field "status.bogus", unknown field
        // "status.conditions[0].extra"".
        let object = json!({
            "apiVersion": "seckill.io/v1",
            "kind": "Promotion",
            "metadata": {
                "name": "sale",
                "foo": "bar",
                "ownerReferences": [{"apiVersion": "v1", "kind": "X", "name": "x", "uid": "u", "bogus": 1}],
            },
            "spec": good(),
            "status": {"granted": 1, "bogus": 1, "conditions": [{
                "type": "Ready", "status": "True", "reason": "R", "message": "m",
                "lastTransitionTime": "2026-11-26T10:00:00Z", "extra": true,
            }]},
            "bogus": 2,
        });
        let mut got = fields(object);
        got.sort();
        assert_eq!(
            got,
            [
                "bogus",
                "metadata.foo",
                "metadata.ownerReferences[0].bogus",
                "status.bogus",
                "status.conditions[0].extra",
            ]
        );
    }

    #[test]
    fn every_field_an_object_may_carry_is_known() {
        let object = json!({
            "apiVersion": "seckill.io/v1",
            "kind": "Promotion",
            "metadata": {
                "name": "sale", "namespace": "shop", "labels": {"app": "x"},
                "annotations": {"a": "b"}, "finalizers": ["seckill.io/x"],
                "generateName": "sale-", "resourceVersion": "1", "uid": "u", "generation": 2,
                "creationTimestamp": "2026-11-26T10:00:00Z", "ownerReferences": null,
            },
            "spec": {"description": "d", "publishTime": "2026-11-26T10:00:00Z",
                     "finishTime": "2026-11-26T11:00:00Z", "numberOfCoupons": 1, "discount": 1},
            "status": {"phase": "Active", "granted": 0, "remaining": 1, "observedGeneration": 2,
                       "startedAt": "2026-11-26T10:00:00Z", "finishReason": null},
        });
        assert_eq!(fields(object), Vec::<String>::new());
    }

    #[test]
    fn a_schema_that_preserves_unknown_fields_keeps_them() {
        let schema = json!({"type": "object", "properties": {"a": {"type": "string"}},
                            "x-kubernetes-preserve-unknown-fields": true});
        let mut errors = Vec::new();
        check_schema(&schema, &json!({"a": "x", "b": 1}), "spec", &mut errors);
        assert_eq!(errors, []);
        let strict = json!({"type": "object", "properties": {"a": {"type": "string"}}});
        check_schema(&strict, &json!({"a": "x", "b": 1}), "spec", &mut errors);
        assert_eq!(errors, [unknown_field("spec.b")]);
    }
}
