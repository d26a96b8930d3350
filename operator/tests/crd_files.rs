//! The committed CRD files are exactly what `seckill-operator crd` prints,
//! and the example manifests are accepted or refused by the generated schema
//! (plus the CEL rule) for the field they name.

use std::path::{Path, PathBuf};

use seckill_operator::admission::check_manifest;
use seckill_operator::crdgen::crd_yaml;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn assert_same_as_generated(relative: &str) {
    let path = repo().join(relative);
    let generated = crd_yaml().unwrap();
    let on_disk = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{relative} is missing ({e}); generate it with `make crds`"));
    assert!(
        on_disk == generated,
        "{relative} differs from `seckill-operator crd`; regenerate it with `make crds`"
    );
}

#[test]
fn crds_file_is_the_generated_crd() {
    assert_same_as_generated("crds/promotions.seckill.io.yaml");
}

#[test]
fn chart_crd_is_the_same_bytes_as_the_generated_crd() {
    assert_same_as_generated("charts/seckill/crds/promotions.seckill.io.yaml");
}

#[test]
fn the_crd_binary_prints_the_generated_crd() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_seckill-operator"))
        .arg("crd")
        .output()
        .unwrap();
    assert!(out.status.success());
    assert_eq!(String::from_utf8(out.stdout).unwrap(), crd_yaml().unwrap());
}

fn load(path: &Path) -> serde_json::Value {
    let text = std::fs::read_to_string(path).unwrap();
    serde_yaml::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

#[test]
fn the_example_promotion_is_valid() {
    let path = repo().join("examples/promotion.yaml");
    let promotion = check_manifest(&load(&path)).unwrap_or_else(|e| panic!("{e:?}"));
    assert_eq!(promotion.spec.number_of_coupons, 100);
    assert_eq!(promotion.spec.shards, 1, "shards defaults to 1");
}

#[test]
fn the_example_sharded_promotion_is_valid_with_three_shards() {
    let path = repo().join("examples/sharded-promotion.yaml");
    let promotion = check_manifest(&load(&path)).unwrap_or_else(|e| panic!("{e:?}"));
    assert_eq!(promotion.spec.shards, 3);
}

#[test]
fn each_invalid_example_is_refused_for_the_field_it_names() {
    let dir = repo().join("examples/invalid");
    let mut seen = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().and_then(|e| e.to_str()) != Some("yaml") {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap();
        let named = text
            .lines()
            .find_map(|l| l.strip_prefix("# invalid-field: "))
            .unwrap_or_else(|| panic!("{} names no field (# invalid-field: ...)", path.display()))
            .trim()
            .to_owned();
        let errors = match check_manifest(&load(&path)) {
            Ok(_) => panic!("{} was accepted", path.display()),
            Err(errors) => errors,
        };
        let fields: Vec<&str> = errors.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(fields, [named.as_str()], "{}: {errors:?}", path.display());
        seen += 1;
    }
    assert!(seen >= 7, "only {seen} invalid examples");
}
