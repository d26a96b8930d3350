//! `seckill new promotion` as a user runs it: the real binary, its stdout
//! piped to what `kubectl apply -f -` would read, its exit status and
//! stderr when a value is refused.

use std::process::{Command, Output};

use chrono::{DateTime, Utc};
use seckill_operator::admission::check_manifest;
use seckill_testkit::process::{binary, SECKILL};
use serde_json::Value;

fn seckill_new(flags: &[&str]) -> Output {
    Command::new(binary(SECKILL))
        .args(["new", "promotion"])
        .args(flags)
        .output()
        .expect("seckill runs")
}

const SALE: &[&str] = &[
    "black-friday",
    "--namespace",
    "shop",
    "--opens-in",
    "10m",
    "--lasts",
    "1h",
    "--coupons",
    "1000",
    "--discount",
    "0.2",
];

fn time(manifest: &Value, field: &str) -> DateTime<Utc> {
    manifest["spec"][field]
        .as_str()
        .unwrap_or_else(|| panic!("{field} is a string: {manifest}"))
        .parse()
        .unwrap()
}

#[test]
fn the_issue_s_command_prints_yaml_the_crd_rules_accept_opening_ten_minutes_from_now() {
    let before = Utc::now();
    let out = seckill_new(SALE);
    let after = Utc::now();
    assert!(out.status.success(), "{out:?}");
    assert!(out.stderr.is_empty(), "{out:?}");
    let yaml = String::from_utf8(out.stdout).unwrap();
    assert!(yaml.starts_with("apiVersion: seckill.io/v1\n"), "{yaml}");
    let manifest: Value = serde_yaml::from_str(&yaml).unwrap();
    let promotion = check_manifest(&manifest).unwrap_or_else(|e| panic!("{e:?}\n{yaml}"));
    assert_eq!(manifest["metadata"]["name"], "black-friday");
    assert_eq!(manifest["metadata"]["namespace"], "shop");
    assert_eq!(promotion.spec.number_of_coupons, 1000);
    assert_eq!(promotion.spec.discount, 0.2);
    let publish = time(&manifest, "publishTime");
    let ten = chrono::Duration::minutes(10);
    // Whole seconds: publishTime is at most a second before now + 10 min.
    assert!(
        publish > before + ten - chrono::Duration::seconds(1) && publish <= after + ten,
        "{publish} vs {before}..{after}"
    );
    assert_eq!(
        time(&manifest, "finishTime") - publish,
        chrono::Duration::hours(1)
    );
}

#[test]
fn output_json_prints_the_same_manifest_as_json() {
    let mut flags = SALE.to_vec();
    flags.extend(["-o", "json", "--description", "Black Friday: 20% off"]);
    let out = seckill_new(&flags);
    assert!(out.status.success(), "{out:?}");
    let manifest: Value = serde_json::from_slice(&out.stdout).expect("JSON");
    check_manifest(&manifest).unwrap();
    assert_eq!(manifest["kind"], "Promotion");
    assert_eq!(manifest["spec"]["description"], "Black Friday: 20% off");
}

#[test]
fn refused_values_print_nothing_on_stdout_and_every_field_with_its_reason_on_stderr() {
    let mut flags = SALE.to_vec();
    let at = |flags: &[&str], flag: &str| flags.iter().position(|f| *f == flag).unwrap() + 1;
    let (c, d) = (at(&flags, "--coupons"), at(&flags, "--discount"));
    flags[c] = "0";
    flags[d] = "1.5";
    let out = seckill_new(&flags);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(out.stdout.is_empty(), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("spec.numberOfCoupons: must be at least 1, got 0")
            && err.contains("spec.discount: must be at most 1, got 1.5"),
        "{err}"
    );

    let mut flags = SALE.to_vec();
    flags[0] = "Black_Friday";
    let err = String::from_utf8_lossy(&seckill_new(&flags).stderr).into_owned();
    assert!(err.contains("metadata.name: "), "{err}");
}
