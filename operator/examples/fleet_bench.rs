//! The operator at fleet scale (issue 16), measured against a real API
//! server: `scripts/bench-operator.sh` starts kube-apiserver and etcd,
//! installs the CRD and a redis-server, then runs this once per operator
//! binary to compare. It creates 1,000 Promotions (300 Pending, 600 Active,
//! 100 Finished, in ten namespaces), starts the given `seckill-operator run`
//! (with leader election, as in a cluster), waits until every status is
//! reported, and measures three windows:
//!
//! 1. nothing changing: the API server's requests per second (its own
//!    `apiserver_request_total`: all of it, and the groups the operator
//!    uses), the operator's CPU (from /proc) and RSS;
//! 2. grabs in all 600 running sales (two a second each): status writes per
//!    second (`APPLY` on promotions/status);
//! 3. deadlines: 20 more promotions open at the same instant and close at
//!    the same instant eight seconds later; how long after publishTime and
//!    finishTime a watch sees startedAt and finishedAt in their status.
//!
//! Prints one `key value` line per figure, for the script's table.
//!
//! Usage: fleet_bench OPERATOR_BIN KUBECONFIG REDIS_URL [QUIET_SECS] [GRAB_SECS]

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, SubsecRound, Utc};
use futures::StreamExt;
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Api, ResourceExt};
use seckill_operator::promotion::Promotion;
use seckill_workers::protocol::PromotionId;
use seckill_workers::redis_connection::{RedisArgs, RedisConnection};
use seckill_workers::redis_server::free_port;

#[path = "../tests/kube_apiserver/mod.rs"]
mod kube_apiserver;

use kube_apiserver::{
    create_all, create_namespaces, delta, expected_phase, grab_in_each, phase_of, request_totals,
    wait_for, Process,
};

const NAMESPACES: usize = 10;
/// Never sold out within the bench.
const COUPONS: u64 = 100_000_000;

fn promotion(ns: &str, name: &str, publish: DateTime<Utc>, finish: DateTime<Utc>) -> Promotion {
    kube_apiserver::promotion(ns, name, publish, finish, COUPONS)
}

struct Operator(Process);

impl Operator {
    /// utime + stime in seconds, and the resident set in MiB (now, peak).
    fn usage(&self) -> (f64, f64, f64) {
        let pid = self.0 .0.id();
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        // Fields after the command name (which may hold spaces) in parentheses.
        let after = stat.rsplit_once(") ").map_or("", |(_, rest)| rest);
        let fields: Vec<&str> = after.split_whitespace().collect();
        let ticks = |i: usize| {
            fields
                .get(i)
                .and_then(|f| f.parse::<f64>().ok())
                .unwrap_or(0.0)
        };
        // utime and stime are fields 14 and 15 of stat, 12 and 13 after the name.
        let cpu = (ticks(11) + ticks(12)) / clock_ticks();
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        let kib = |name: &str| {
            status
                .lines()
                .find(|l| l.starts_with(name))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<f64>().ok())
                .unwrap_or(0.0)
        };
        (cpu, kib("VmRSS:") / 1024.0, kib("VmHWM:") / 1024.0)
    }
}

fn clock_ticks() -> f64 {
    let out = Command::new("getconf").arg("CLK_TCK").output();
    out.ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100.0)
}

fn id_of(p: &Promotion) -> PromotionId {
    PromotionId::new(&p.namespace().unwrap(), &p.name_any()).unwrap()
}

/// What a watch saw of each promotion: when its status first showed
/// startedAt ("Started") and finishedAt ("Finished").
type Seen = Arc<Mutex<HashMap<String, HashMap<&'static str, Instant>>>>;

fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() - 1) as f64 * q).round() as usize]
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 4 {
        eprintln!("usage: fleet_bench OPERATOR_BIN KUBECONFIG REDIS_URL [QUIET_SECS] [GRAB_SECS]");
        std::process::exit(2);
    }
    let operator_bin = PathBuf::from(&args[1]);
    let kubeconfig = PathBuf::from(&args[2]);
    let redis_url = args[3].clone();
    let quiet = Duration::from_secs(args.get(4).and_then(|s| s.parse().ok()).unwrap_or(30));
    let grab_span = Duration::from_secs(args.get(5).and_then(|s| s.parse().ok()).unwrap_or(30));

    let client = kube_apiserver::client(&kubeconfig).await;
    let con: RedisConnection = RedisArgs::for_url(redis_url.clone()).connect().unwrap();

    // The API server alone, before anything of ours: its own background.
    let before = request_totals(&client).await;
    tokio::time::sleep(Duration::from_secs(10)).await;
    let after = request_totals(&client).await;
    let background = delta(&before, &after, |_| true) / 10.0;
    println!("apiserver_background_rps {background:.2}");

    create_namespaces(&client, NAMESPACES).await;
    let fleet = kube_apiserver::fleet(1000, NAMESPACES, COUPONS);
    let created = Instant::now();
    create_all(&client, &fleet).await;
    println!("fleet_created_secs {:.1}", created.elapsed().as_secs_f64());

    let metrics_port = free_port().unwrap();
    let log = std::fs::File::create(
        std::env::var("FLEET_BENCH_LOG").unwrap_or_else(|_| "/dev/null".into()),
    )
    .unwrap();
    let operator = Operator(Process(
        Command::new(&operator_bin)
            .args(["run", "--redis-url", &redis_url])
            .arg(format!("--metrics-listen=127.0.0.1:{metrics_port}"))
            .args(["--identity", "bench", "--lease-namespace", "default"])
            .env("KUBECONFIG", &kubeconfig)
            .env("RUST_LOG", "warn")
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .stdin(Stdio::null())
            .spawn()
            .expect("operator starts"),
    ));
    let all: Api<Promotion> = Api::all(client.clone());
    let started = Instant::now();
    wait_for(
        &all,
        Duration::from_secs(300),
        "every status reported",
        |list| list.iter().all(|p| phase_of(p) == Some(expected_phase(p))),
    )
    .await;
    println!("fleet_reported_secs {:.1}", started.elapsed().as_secs_f64());
    tokio::time::sleep(Duration::from_secs(5)).await;

    // 1. Nothing changing.
    let (cpu0, _, _) = operator.usage();
    let before = request_totals(&client).await;
    let t = Instant::now();
    tokio::time::sleep(quiet).await;
    let after = request_totals(&client).await;
    let secs = t.elapsed().as_secs_f64();
    let (cpu1, rss, _) = operator.usage();
    let total = delta(&before, &after, |_| true) / secs;
    let ours = delta(&before, &after, |(g, ..)| {
        g == "seckill.io" || g == "events.k8s.io"
    }) / secs;
    let leases = delta(&before, &after, |(g, ..)| g == "coordination.k8s.io") / secs;
    let idle_writes = delta(&before, &after, |(g, _, s, v)| {
        g == "seckill.io" && s == "status" && v == "APPLY"
    }) / secs;
    println!("quiet_apiserver_rps {total:.2}");
    println!("quiet_promotions_events_rps {ours:.2}");
    println!("quiet_leases_rps {leases:.2}");
    println!("quiet_status_writes_per_s {idle_writes:.2}");
    println!("quiet_operator_cpu_cores {:.4}", (cpu1 - cpu0) / secs);
    println!("quiet_operator_rss_mib {rss:.1}");

    // 2. Grabs in all 600 running sales, two a second each.
    let busy: Vec<PromotionId> = fleet[300..900].iter().map(id_of).collect();
    let (cpu0, _, _) = operator.usage();
    let before = request_totals(&client).await;
    let t = Instant::now();
    let mut round = 0u64;
    let mut grabs = 0u64;
    while t.elapsed() < grab_span {
        grabs += grab_in_each(&con, &busy, round)
            .await
            .iter()
            .filter(|grabbed| grabbed.is_ok())
            .count() as u64;
        round += 1;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let after = request_totals(&client).await;
    let secs = t.elapsed().as_secs_f64();
    let (cpu1, rss, _) = operator.usage();
    let writes = delta(&before, &after, |(g, _, s, v)| {
        g == "seckill.io" && s == "status" && v == "APPLY"
    }) / secs;
    println!("grabs_per_s {:.0}", grabs as f64 / secs);
    println!("grabs_status_writes_per_s {writes:.1}");
    println!(
        "grabs_apiserver_rps {:.1}",
        delta(&before, &after, |_| true) / secs
    );
    println!("grabs_operator_cpu_cores {:.3}", (cpu1 - cpu0) / secs);
    println!("grabs_operator_rss_mib {rss:.1}");
    tokio::time::sleep(Duration::from_secs(3)).await;

    // 3. Deadlines: 20 promotions open at one instant and close at one
    // instant; a watch notes when each status shows it.
    let seen: Seen = Arc::default();
    let watch_seen = seen.clone();
    let watch_api = all.clone();
    let watching = tokio::spawn(async move {
        let stream = watcher(watch_api, watcher::Config::default()).applied_objects();
        futures::pin_mut!(stream);
        while let Some(Ok(p)) = stream.next().await {
            let Some(status) = p.status.as_ref() else {
                continue;
            };
            let mut seen = watch_seen.lock().unwrap();
            let entry = seen.entry(p.name_any()).or_default();
            if status.started_at.is_some() {
                entry.entry("Started").or_insert_with(Instant::now);
            }
            if status.finished_at.is_some() {
                entry.entry("Finished").or_insert_with(Instant::now);
            }
        }
    });
    // The Instant of a wall-clock time (this host's clock is Redis' clock),
    // by one reading of both clocks taken before anything can be slow.
    let (wall, mono) = (Utc::now(), Instant::now());
    let instant_of = |t: DateTime<Utc>| {
        let ahead = (t - wall).to_std().expect("a time after the reading");
        mono + ahead
    };
    let opens = (Utc::now() + chrono::Duration::seconds(8)).trunc_subsecs(0);
    let closes = opens + chrono::Duration::seconds(8);
    let deadline: Vec<Promotion> = (0..20)
        .map(|i| {
            promotion(
                &format!("shop-{}", i % NAMESPACES),
                &format!("deadline-{i}"),
                opens,
                closes,
            )
        })
        .collect();
    create_all(&client, &deadline).await;
    let (open_at, close_at) = (instant_of(opens), instant_of(closes));
    let waited = Instant::now();
    loop {
        let done = {
            let seen = seen.lock().unwrap();
            deadline.iter().all(|p| {
                seen.get(&p.name_any())
                    .is_some_and(|s| s.contains_key("Finished"))
            })
        };
        if done {
            break;
        }
        assert!(
            waited.elapsed() < Duration::from_secs(120),
            "deadline promotions not finished"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    watching.abort();
    let seen = seen.lock().unwrap().clone();
    let lags = |phase: &str, at: Instant| {
        let mut v: Vec<f64> = deadline
            .iter()
            .filter_map(|p| seen.get(&p.name_any()).and_then(|s| s.get(phase)))
            .map(|t| t.saturating_duration_since(at).as_secs_f64())
            .collect();
        v.sort_by(f64::total_cmp);
        v
    };
    let started_lag = lags("Started", open_at);
    let finished_lag = lags("Finished", close_at);
    println!(
        "started_shown_after_publish_p50_s {:.3}",
        percentile(&started_lag, 0.5)
    );
    println!(
        "started_shown_after_publish_max_s {:.3}",
        percentile(&started_lag, 1.0)
    );
    println!(
        "finished_shown_after_finish_p50_s {:.3}",
        percentile(&finished_lag, 0.5)
    );
    println!(
        "finished_shown_after_finish_max_s {:.3}",
        percentile(&finished_lag, 1.0)
    );
    // When Redis started them, by the status' own startedAt (this host's
    // clock is Redis' clock): how late the operator's start was, apart from
    // how late the status showed it.
    let mut redis_lag: Vec<f64> = Vec::new();
    for p in &deadline {
        let api: Api<Promotion> = Api::namespaced(client.clone(), &p.namespace().unwrap());
        let status = api
            .get(&p.name_any())
            .await
            .unwrap()
            .status
            .unwrap_or_default();
        if let Some(at) = status.started_at {
            redis_lag.push((at - opens).num_milliseconds() as f64 / 1000.0);
        }
    }
    redis_lag.sort_by(f64::total_cmp);
    println!(
        "started_at_after_publish_max_s {:.3}",
        percentile(&redis_lag, 1.0)
    );
    let (_, rss, peak) = operator.usage();
    println!("operator_rss_mib {rss:.1}");
    println!("operator_rss_peak_mib {peak:.1}");
}
