//! `seckill up` and `seckill load` as a user runs them: real binaries, a real
//! redis-server, manifest files on disk.

mod support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use chrono::Utc;
use seckill_workers::protocol::{self, PromotionId};
use seckill_workers::redis_connection::RedisArgs;
use seckill_workers::redis_server::{free_port, RedisServer, RedisServerOptions};
use serde_json::Value;
use support::{Up, SECKILL};

fn manifest(
    namespace: &str,
    name: &str,
    opens_in_secs: i64,
    coupons: u64,
    discount: f64,
) -> String {
    let publish = Utc::now() + chrono::Duration::seconds(opens_in_secs);
    let finish = publish + chrono::Duration::minutes(10);
    format!(
        "apiVersion: seckill.io/v1\nkind: Promotion\nmetadata:\n  name: {name}\n  namespace: {namespace}\nspec:\n  publishTime: \"{}\"\n  finishTime: \"{}\"\n  numberOfCoupons: {coupons}\n  discount: {discount}\n",
        publish.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        finish.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
    )
}

/// What only these tests ask of `seckill up`.
impl Up {
    fn start(files: &Path, extra: &[&str]) -> Self {
        let port = free_port().unwrap();
        let mut command = Command::new(SECKILL);
        command
            .arg("up")
            .arg("-f")
            .arg(files)
            .args([
                "--listen",
                &format!("127.0.0.1:{port}"),
                "--watch-interval-ms",
                "100",
            ])
            .args(extra)
            .stderr(Stdio::null());
        let up = Self::spawn(command, port);
        up.wait_for(Duration::from_secs(20), || up.get("/readyz").0 == 200);
        up
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn get(&self, path: &str) -> (u16, Value) {
        let Ok(mut s) = TcpStream::connect(("127.0.0.1", self.port)) else {
            return (0, Value::Null);
        };
        let _ = write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        );
        let mut text = String::new();
        let _ = s.read_to_string(&mut text);
        let status = text
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        let body = text.split("\r\n\r\n").nth(1).unwrap_or("");
        (status, serde_json::from_str(body).unwrap_or(Value::Null))
    }

    fn wait_for(&self, within: Duration, mut done: impl FnMut() -> bool) {
        let start = Instant::now();
        while !done() {
            assert!(
                start.elapsed() < within,
                "timed out; seckill up said:\n{}",
                self.output()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// SIGTERM, then the exit status.
    fn stop(mut self) -> std::process::ExitStatus {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "seckill up did not stop"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

#[test]
fn up_then_load_of_10000_customers_for_1000_coupons_verifies_and_stops_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let data = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("flash.yaml"),
        manifest("demo", "flash", 2, 1_000, 0.7),
    )
    .unwrap();
    let up = Up::start(dir.path(), &["--data-dir", data.path().to_str().unwrap()]);
    assert!(
        up.said("private redis-server on 127.0.0.1:"),
        "{}",
        up.output()
    );
    let redis_port: u16 = up
        .output()
        .split("private redis-server on 127.0.0.1:")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|p| p.parse().ok())
        .expect("the private Redis port is printed");

    let load = Command::new(SECKILL)
        .args(["load", "--target", &up.url(), "--promotion", "demo/flash"])
        .args([
            "--customers",
            "10000",
            "--concurrency",
            "64",
            "--repeat-ratio",
            "0.2",
        ])
        .args(["--duration", "120s", "--json"])
        .output()
        .expect("seckill load runs");
    let summary: Value = serde_json::from_slice(&load.stdout).unwrap_or_else(|e| {
        panic!(
            "load printed no JSON ({e}): {}\n{}",
            String::from_utf8_lossy(&load.stdout),
            String::from_utf8_lossy(&load.stderr)
        )
    });
    assert!(load.status.success(), "{summary:#}");
    let v = &summary["verification"];
    assert_eq!(v["passed"], true, "{summary:#}");
    assert_eq!(v["complete"], true);
    assert_eq!(v["grantedInReadModel"], 1_000);
    assert_eq!(v["grantedByResponses"], 1_000);
    assert_eq!(v["expectedGranted"], 1_000);
    assert_eq!(v["distinctCustomers"], 10_000);
    assert_eq!(summary["outcomes"]["granted"], 1_000);
    assert!(summary["requests"].as_u64().unwrap() >= 12_000);
    assert!(summary["latencyMs"]["p99"].as_f64().unwrap() > 0.0);

    up.wait_for(Duration::from_secs(5), || up.said("demo/flash: SoldOut"));
    let status = up.stop();
    assert!(status.success(), "{status:?}");
    // The private Redis went with it, and its AOF stays in the data directory.
    assert!(TcpStream::connect(("127.0.0.1", redis_port)).is_err());
    assert!(std::fs::read_dir(data.path()).unwrap().next().is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn manifest_edits_apply_before_the_start_and_are_locked_after_it() {
    let redis = RedisServer::start(RedisServerOptions::default()).unwrap();
    let mut con = RedisArgs::for_url(redis.url()).connect().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("sale.yaml");
    std::fs::write(&file, manifest("shop", "sale", 4, 10, 0.5)).unwrap();
    let up = Up::start(dir.path(), &["--redis-url", &redis.url()]);
    let id = PromotionId::parse("shop/sale").unwrap();
    up.wait_for(Duration::from_secs(5), || up.said("shop/sale: Scheduled"));

    // Before the start: the change is taken.
    let text = std::fs::read_to_string(&file).unwrap();
    std::fs::write(
        &file,
        text.replace("numberOfCoupons: 10", "numberOfCoupons: 20"),
    )
    .unwrap();
    up.wait_for(Duration::from_secs(5), || {
        up.said("shop/sale: manifest changed")
    });
    let mut coupons = 0;
    for _ in 0..50 {
        coupons = protocol::snapshot(&mut con, &id)
            .await
            .unwrap()
            .number_of_coupons
            .unwrap();
        if coupons == 20 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(coupons, 20, "{}", up.output());

    // After the start: the change is refused and the sale runs on as it was.
    up.wait_for(Duration::from_secs(10), || up.said("shop/sale: Started"));
    let text = std::fs::read_to_string(&file).unwrap();
    std::fs::write(
        &file,
        text.replace("numberOfCoupons: 20", "numberOfCoupons: 99"),
    )
    .unwrap();
    up.wait_for(Duration::from_secs(5), || up.said("SpecLocked"));
    let snap = protocol::snapshot(&mut con, &id).await.unwrap();
    assert_eq!(snap.number_of_coupons, Some(20));
    up.wait_for(Duration::from_secs(5), || {
        up.get("/api/v1/promotions/shop/sale").1["numberOfCoupons"] == 20
    });
    assert!(up.stop().success());
}

#[test]
fn an_invalid_manifest_is_reported_by_field_while_valid_ones_run_and_removal_finishes() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("good.yaml"),
        manifest("shop", "good", -1, 5, 0.5),
    )
    .unwrap();
    std::fs::write(
        dir.path().join("bad.yaml"),
        manifest("shop", "bad", -1, 5, 1.5),
    )
    .unwrap();
    let up = Up::start(dir.path(), &[]);
    up.wait_for(Duration::from_secs(5), || up.said("INVALID"));
    let out = up.output();
    assert!(
        out.contains("bad.yaml") && out.contains("spec.discount"),
        "{out}"
    );
    up.wait_for(Duration::from_secs(10), || {
        up.get("/api/v1/promotions/shop/good").1["phase"] == "Active"
    });
    assert_eq!(up.get("/api/v1/promotions/shop/bad").0, 404);

    // Removing the file finishes the promotion (reason Deleted).
    std::fs::remove_file(dir.path().join("good.yaml")).unwrap();
    up.wait_for(Duration::from_secs(10), || {
        up.get("/api/v1/promotions/shop/good").1["finishReason"] == "Deleted"
    });
    assert!(up.stop().success());
}

#[test]
fn a_misspelt_field_is_refused_naming_it_as_the_api_server_does_and_the_promotion_never_runs() {
    let dir = tempfile::tempdir().unwrap();
    let misspelt = manifest("shop", "typo", -1, 5, 0.5).replace(
        "  numberOfCoupons: 5\n",
        "  numberOfCoupons: 5\n  coupns: 500\n",
    );
    assert!(misspelt.contains("coupns: 500"), "{misspelt}");
    std::fs::write(dir.path().join("typo.yaml"), misspelt).unwrap();
    std::fs::write(
        dir.path().join("good.yaml"),
        manifest("shop", "good", -1, 5, 0.5),
    )
    .unwrap();
    let up = Up::start(dir.path(), &[]);
    up.wait_for(Duration::from_secs(5), || up.said("INVALID"));
    let out = up.output();
    assert!(
        out.contains("typo.yaml") && out.contains(r#"unknown field "spec.coupns""#),
        "{out}"
    );
    up.wait_for(Duration::from_secs(10), || {
        up.get("/api/v1/promotions/shop/good").1["phase"] == "Active"
    });
    assert_eq!(up.get("/api/v1/promotions/shop/typo").0, 404);
    assert!(up.stop().success());
}

#[test]
fn roles_are_checked_and_a_missing_redis_server_is_explained() {
    let out = Command::new(SECKILL)
        .args([
            "up",
            "--roles",
            "operator,frobnicator",
            "--listen",
            "127.0.0.1:0",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown role \"frobnicator\""));

    let out = Command::new(SECKILL)
        .args(["up", "--listen", "127.0.0.1:0"])
        .env("PATH", "/nonexistent")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("redis-server is not installed")
            && err.contains("apt-get install redis-server"),
        "{err}"
    );
}
