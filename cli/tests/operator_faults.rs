//! Operator fault scenarios (issue 7) with real processes: `seckill up
//! --roles operator` (the reconcile core the Kubernetes controller runs,
//! `lifecycle::drive`) on manifest files and a real redis-server, while
//! `seckill up --roles command,projector` serves a crowd of customers.
//!
//! * the operator killed -9 right at publishTime and right at finishTime and
//!   started again;
//! * two operators at once (no leader election: `seckill up` has none);
//! * an operator whose host clock is five minutes ahead or behind
//!   (libfaketime).
//!
//! Each ends with exactly one PromotionStarted and one PromotionFinished in
//! the stream, at or after their deadlines on Redis' clock, at most
//! numberOfCoupons grants, no customer twice, and every 200 in the stream.
//! `SECKILL_FAULTS_LONG=1` (used by `make faults`) runs more rounds.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use chrono::{SecondsFormat, Utc};
use seckill_testkit::client::{self, body, grab_path, JSON};
use seckill_testkit::eventually;
use seckill_testkit::process::long;
use seckill_testkit::promotions::{at_ms, redis_now_ms};
use seckill_testkit::redis::{connect, redis_with, Fsync, RedisServer};
use seckill_testkit::stream::{stream_facts, StreamFacts};
use seckill_testkit::up::Up;
use seckill_workers::protocol::{self, FinishReason, PromotionId};
use seckill_workers::redis_connection::RedisConnection;

/// Bounds every wait for something that must happen. It is also below the
/// five-minute clock skews of scenario 7: an operator that waited for its
/// own clock would miss it.
const WITHIN: Duration = Duration::from_secs(60);

fn rfc3339(ms: i64) -> String {
    at_ms(ms).to_rfc3339_opts(SecondsFormat::Millis, true)
}

fn write_manifest(dir: &Path, name: &str, coupons: u64, publish_ms: i64, finish_ms: i64) {
    std::fs::write(
        dir.join(format!("{name}.yaml")),
        format!(
            "apiVersion: seckill.io/v1\nkind: Promotion\nmetadata:\n  name: {name}\n  namespace: shop\nspec:\n  publishTime: \"{}\"\n  finishTime: \"{}\"\n  numberOfCoupons: {coupons}\n  discount: 0.5\n",
            rfc3339(publish_ms),
            rfc3339(finish_ms)
        ),
    )
    .unwrap();
}

/// `seckill up --roles <roles> --redis-url <url> [-f dir]`, with its wall
/// clock skewed by libfaketime when `skew` is given (e.g. `+5m`). Does not
/// wait for it.
fn spawn_up(roles: &str, redis_url: &str, files: Option<&Path>, skew: Option<&str>) -> Up {
    let mut args = vec!["--roles", roles, "--redis-url", redis_url];
    let dir = files.map(|d| d.to_str().unwrap().to_owned());
    if let Some(dir) = &dir {
        args.extend(["-f", dir.as_str()]);
    }
    Up::spawn(&args, skew)
}

/// [`spawn_up`], once ready.
async fn start_up(roles: &str, redis_url: &str, files: Option<&Path>, skew: Option<&str>) -> Up {
    let up = spawn_up(roles, redis_url, files, skew);
    up.ready().await;
    up
}

/// A crowd grabbing every promotion in `names` from `port`, each customer
/// retrying 409 (not yet open) and 503 until a final answer (200 or 410) or
/// until stopped; new customers keep arriving until stopped.
struct Crowd {
    stop: Arc<AtomicBool>,
    /// Answers 409 so far (customers there before the opening).
    not_started: Arc<AtomicUsize>,
    tasks: Vec<tokio::task::JoinHandle<Vec<CrowdAnswer>>>,
}

/// One answer: (promotion, customer, status, couponId of a 200).
type CrowdAnswer = (String, String, u16, Option<String>);

/// What the crowd got: (promotion, customer) -> last status, couponIds of 200s.
#[derive(Default)]
struct CrowdLog {
    answers: Vec<CrowdAnswer>,
}

impl CrowdLog {
    fn granted(&self, promotion: &str) -> HashMap<String, HashSet<String>> {
        let mut out: HashMap<String, HashSet<String>> = HashMap::new();
        for (p, customer, status, coupon) in &self.answers {
            if p == promotion && *status == 200 {
                out.entry(customer.clone())
                    .or_default()
                    .insert(coupon.clone().expect("a 200 has a couponId"));
            }
        }
        out
    }

    fn count(&self, status: u16) -> usize {
        self.answers.iter().filter(|a| a.2 == status).count()
    }
}

impl Crowd {
    fn start(port: u16, names: &[&str], concurrency: usize) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let not_started = Arc::new(AtomicUsize::new(0));
        let names: Arc<Vec<String>> = Arc::new(names.iter().map(|n| n.to_string()).collect());
        let tasks = (0..concurrency)
            .map(|t| {
                let (stop, not_started) = (stop.clone(), not_started.clone());
                let names = names.clone();
                tokio::spawn(async move {
                    let mut log = Vec::new();
                    let mut sender = None;
                    let mut n = 0;
                    'customers: while !stop.load(Ordering::Relaxed) {
                        n += 1;
                        let name = &names[n % names.len()];
                        let customer = format!("c{t}-{n}");
                        let path = grab_path("shop", name);
                        let body = body(&customer);
                        loop {
                            if stop.load(Ordering::Relaxed) {
                                break 'customers;
                            }
                            if sender.is_none() {
                                sender = client::connect(port, false).await.ok();
                            }
                            let headers = [("content-type", JSON)];
                            let answer = match sender.as_mut() {
                                Some(s) => {
                                    client::send(s, port, "POST", &path, &headers, body.clone())
                                        .await
                                        .ok()
                                }
                                None => None,
                            };
                            let Some(reply) = answer else {
                                sender = None;
                                tokio::time::sleep(Duration::from_millis(20)).await;
                                continue;
                            };
                            let status = reply.status;
                            if status == 409 {
                                not_started.fetch_add(1, Ordering::Relaxed);
                            }
                            let coupon = reply.json["couponId"].as_str().map(str::to_owned);
                            log.push((format!("shop/{name}"), customer.clone(), status, coupon));
                            if status == 200 || status == 410 {
                                break;
                            }
                            tokio::time::sleep(Duration::from_millis(20)).await;
                        }
                    }
                    log
                })
            })
            .collect();
        Self {
            stop,
            not_started,
            tasks,
        }
    }

    /// Waits until a customer was told "not yet" (409).
    async fn told_not_started(&self) {
        eventually(WITHIN, || {
            let seen = self.not_started.load(Ordering::Relaxed);
            async move { (seen > 0).then_some(()).ok_or("no 409 yet") }
        })
        .await;
    }

    async fn stop(self) -> CrowdLog {
        self.stop.store(true, Ordering::Relaxed);
        let mut log = CrowdLog::default();
        for t in self.tasks {
            log.answers.extend(t.await.unwrap());
        }
        log
    }
}

/// Waits until the stream of `id` has its PromotionFinished.
async fn wait_finished(con: &RedisConnection, id: &PromotionId) {
    eventually(WITHIN, || {
        let mut con = con.clone();
        async move {
            let finished = stream_facts(&mut con, id).await.finished.len();
            (finished > 0)
                .then_some(())
                .ok_or(format!("{id} not finished"))
        }
    })
    .await;
}

/// Waits until `id` is registered in Redis with a publish time of
/// `publish_ms`, or has already started.
async fn wait_registered(con: &RedisConnection, id: &PromotionId, publish_ms: i64) {
    eventually(WITHIN, || {
        let mut con = con.clone();
        async move {
            let snap = protocol::snapshot(&mut con, id).await.unwrap();
            if snap.started || snap.publish_ms == Some(publish_ms) {
                Ok(())
            } else {
                Err(format!("{id}: {snap:?}"))
            }
        }
    })
    .await;
}

/// The promises: one Started at or after publishTime, one Finished (at or
/// after finishTime unless sold out), at most `coupons` grants inside the
/// window, no customer twice, every 200 in the stream.
async fn verify(
    con: &mut RedisConnection,
    id: &PromotionId,
    coupons: u64,
    publish_ms: i64,
    finish_ms: i64,
    crowd: &CrowdLog,
) -> StreamFacts {
    let facts = stream_facts(con, id).await;
    assert_eq!(facts.started.len(), 1, "{id}: {:?}", facts.started);
    assert_eq!(facts.finished.len(), 1, "{id}: {:?}", facts.finished);
    let (started_ms, started) = &facts.started[0];
    assert!(
        *started_ms >= publish_ms,
        "{id} started {started_ms} before {publish_ms}"
    );
    assert!(started.started_at.unwrap().timestamp_millis() >= publish_ms);
    let (finished_ms, finished) = &facts.finished[0];
    if finished.reason != FinishReason::SoldOut {
        assert!(
            *finished_ms >= finish_ms,
            "{id} finished {finished_ms} before {finish_ms}"
        );
    }
    assert!(facts.grabs.len() as u64 <= coupons);
    let mut customers = HashSet::new();
    for (ms, g) in &facts.grabs {
        // Entry ids order the stream; the window is checked on grantedAt, the
        // TIME the script decided on (XADD's id may read the clock a
        // millisecond later).
        assert!(*ms >= *started_ms && ms <= finished_ms, "{g:?} at {ms}");
        assert!(g.granted_at.timestamp_millis() < finish_ms, "{g:?} at {ms}");
        assert!(
            customers.insert(g.customer_id.clone()),
            "{} twice",
            g.customer_id
        );
    }
    let in_stream: HashMap<&str, &str> = facts
        .grabs
        .iter()
        .map(|(_, g)| (g.customer_id.as_str(), g.coupon_id.as_str()))
        .collect();
    for (customer, answered) in crowd.granted(&id.to_string()) {
        assert_eq!(
            answered.len(),
            1,
            "{customer} answered two coupons: {answered:?}"
        );
        let coupon = answered.iter().next().unwrap();
        assert_eq!(
            in_stream.get(customer.as_str()).copied(),
            Some(coupon.as_str()),
            "{customer} was answered {coupon}, not in the stream"
        );
    }
    facts
}

fn redis() -> (RedisServer, RedisConnection) {
    let server = redis_with(Some(Fsync::EverySec));
    let con = connect(&server);
    (server, con)
}

/// This machine's wall clock (which Redis reads), epoch ms.
fn now_ms() -> i64 {
    Utc::now().timestamp_millis()
}

/// Sleeps until the wall clock reads `ms` (epoch ms) plus `offset_ms`.
async fn sleep_until_ms(ms: i64, offset_ms: i64) {
    let wait = ms + offset_ms - now_ms();
    if wait > 0 {
        tokio::time::sleep(Duration::from_millis(wait as u64)).await;
    }
}

/// Scenario 4: the operator is killed -9 right around publishTime and right
/// around finishTime (offsets in ms from the instant), and started again at
/// once. The crowd is there from before the opening: the window is set only
/// once customers have been told 409. It leaves shortly before finishTime,
/// so the finish is the restarted operator's to make.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_killed_at_the_publish_and_finish_instants_starts_and_finishes_once() {
    let offsets: &[i64] = if long() {
        &[-100, -10, 0, 10, 100]
    } else {
        &[0]
    };
    let (server, mut con) = redis();
    let url = server.url();
    let workers = start_up("command,projector", &url, None, None).await;
    for (round, offset) in offsets.iter().enumerate() {
        let dir = tempfile::tempdir().unwrap();
        let name = format!("restart-{round}");
        let id = PromotionId::new("shop", &name).unwrap();
        let coupons = 1_000_000;
        // Registered to open in an hour; the crowd arrives and is told 409.
        let far = now_ms() + 3_600_000;
        write_manifest(dir.path(), &name, coupons, far, far + 3000);
        let operator = start_up("operator", &url, Some(dir.path()), None).await;
        wait_registered(&con, &id, far).await;
        let crowd = Crowd::start(workers.port, &[&name], 24);
        crowd.told_not_started().await;
        // Now the window: opening two seconds from now, for three.
        let publish_ms = redis_now_ms(&mut con).await + 2000;
        let finish_ms = publish_ms + 3000;
        write_manifest(dir.path(), &name, coupons, publish_ms, finish_ms);
        wait_registered(&con, &id, publish_ms).await;
        let mut operator = operator;

        sleep_until_ms(publish_ms, *offset).await;
        operator.kill9();
        let mut operator = spawn_up("operator", &url, Some(dir.path()), None);
        sleep_until_ms(finish_ms, -300).await;
        let log = crowd.stop().await;
        sleep_until_ms(finish_ms, *offset).await;
        operator.kill9();
        let before_restart = stream_facts(&mut con, &id).await.finished.len();
        let operator = spawn_up("operator", &url, Some(dir.path()), None);
        wait_finished(&con, &id).await;

        let facts = verify(&mut con, &id, coupons, publish_ms, finish_ms, &log).await;
        let (finished_ms, finished) = &facts.finished[0];
        eprintln!(
            "[operator-faults] killed at publish{offset:+} ms and finish{offset:+} ms: {} grants, {} answers 409, started {} ms after publishTime, finished ({:?}) {} ms after finishTime{}",
            facts.grabs.len(),
            log.count(409),
            facts.started[0].0 - publish_ms,
            finished.reason,
            finished_ms - finish_ms,
            if before_restart == 0 { " by the restarted operator" } else { "" }
        );
        assert!(facts.grabs.len() > 10, "the crowd got almost nothing");
        assert!(
            log.count(409) > 0,
            "the crowd was not there before the opening"
        );
        assert_eq!(finished.reason, FinishReason::Expired);
        drop(operator);
    }
    drop(workers);
}

/// Scenario 5: two operators at once on the same manifests and Redis (no
/// leader election), with a crowd on every promotion; one promotion sells
/// out (its window lasts an hour: the crowd stays until it has), the others
/// expire. Each still has exactly one Started and one Finished.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_operators_without_leader_election_start_and_finish_each_promotion_once() {
    let (server, mut con) = redis();
    let url = server.url();
    let dir = tempfile::tempdir().unwrap();
    let count = if long() { 12 } else { 4 };
    let workers = start_up("command,projector", &url, None, None).await;
    let a = start_up("operator", &url, Some(dir.path()), None).await;
    let b = start_up("operator", &url, Some(dir.path()), None).await;
    // Declared once both operators are ready.
    let publish_ms = now_ms() + 3000;
    let finish_ms = publish_ms + 3000;
    let mut names = Vec::new();
    for i in 0..count {
        let name = format!("twin-{i}");
        // The first sells out under the crowd; the others expire.
        let (coupons, finish) = if i == 0 {
            (200, publish_ms + 3_600_000)
        } else {
            (1_000_000, finish_ms)
        };
        write_manifest(dir.path(), &name, coupons, publish_ms, finish);
        names.push((name, coupons, finish));
    }
    let refs: Vec<&str> = names.iter().map(|(n, _, _)| n.as_str()).collect();
    let crowd = Crowd::start(workers.port, &refs, 24);
    wait_finished(&con, &PromotionId::new("shop", "twin-0").unwrap()).await;
    sleep_until_ms(finish_ms, -300).await;
    let log = crowd.stop().await;
    for (name, coupons, finish) in &names {
        let id = PromotionId::new("shop", name).unwrap();
        wait_finished(&con, &id).await;
        let facts = verify(&mut con, &id, *coupons, publish_ms, *finish, &log).await;
        let reason = facts.finished[0].1.reason;
        eprintln!(
            "[operator-faults] two operators: {id}: {} grants, finished {reason:?}",
            facts.grabs.len()
        );
        if *coupons == 200 {
            assert_eq!(reason, FinishReason::SoldOut);
            assert_eq!(facts.grabs.len(), 200);
        } else {
            assert_eq!(reason, FinishReason::Expired);
        }
    }
    // Both operators took part: each printed the transitions it observed.
    for (who, op) in [("a", &a), ("b", &b)] {
        assert!(
            op.output().contains("Started") || op.output().contains("Finished"),
            "operator {who} announced nothing:\n{}",
            op.output()
        );
    }
}

/// Scenario 7 (operator side): an operator whose host clock is five
/// minutes ahead starts and finishes nothing early; one five minutes behind
/// starts and finishes on time; both because deadlines are judged on Redis'
/// clock. No crowd here, so the operator alone writes Started and Finished.
/// Its printed timestamps prove the fake clock is in effect; that it does
/// finish within [`WITHIN`] (a minute) shows it did not wait for its own
/// clock, five minutes off. How late it was is printed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_with_its_clock_5_minutes_off_starts_and_finishes_on_redis_time() {
    let (server, mut con) = redis();
    let url = server.url();
    for (skew, skew_secs) in [("+5m", 300i64), ("-5m", -300i64)] {
        let dir = tempfile::tempdir().unwrap();
        let name = if skew_secs > 0 { "ahead" } else { "behind" };
        let id = PromotionId::new("shop", name).unwrap();
        let spawned = Utc::now();
        let operator = start_up("operator", &url, Some(dir.path()), Some(skew)).await;

        // The operator's clock is off: its first line starts with HH:MM:SS,
        // its clock between the spawn and now, shifted.
        operator.wait_said("using Redis at").await;
        let first = operator.output();
        let seen = Utc::now();
        let stamp = first.get(..8).unwrap_or_default();
        let printed = chrono::NaiveTime::parse_from_str(stamp, "%H:%M:%S")
            .unwrap_or_else(|e| panic!("no timestamp in {first:?}: {e}"));
        let shift = chrono::Duration::seconds(skew_secs);
        let earliest = (spawned + shift - chrono::Duration::seconds(1)).time();
        let latest = (seen + shift).time();
        let within = if earliest <= latest {
            earliest <= printed && printed <= latest
        } else {
            printed >= earliest || printed <= latest
        };
        assert!(
            within,
            "the operator printed {printed}, wanted between {earliest} and {latest} ({skew_secs} s off): {first}"
        );

        // Declared now that it runs: opening in 2.5 s for 2.5 s.
        let publish_ms = now_ms() + 2500;
        let finish_ms = publish_ms + 2500;
        write_manifest(dir.path(), name, 100, publish_ms, finish_ms);

        // Before publishTime (Redis' clock) nothing is started.
        sleep_until_ms(publish_ms, -300).await;
        assert!(
            stream_facts(&mut con, &id).await.started.is_empty(),
            "started before publishTime by an operator {skew}"
        );
        sleep_until_ms(finish_ms, -300).await;
        assert!(
            stream_facts(&mut con, &id).await.finished.is_empty(),
            "finished before finishTime by an operator {skew}"
        );
        wait_finished(&con, &id).await;
        let facts = verify(
            &mut con,
            &id,
            100,
            publish_ms,
            finish_ms,
            &CrowdLog::default(),
        )
        .await;
        let started_late = facts.started[0].0 - publish_ms;
        let finished_late = facts.finished[0].0 - finish_ms;
        eprintln!(
            "[operator-faults] operator clock {skew}: started {started_late} ms after publishTime, finished {finished_late} ms after finishTime"
        );
        assert_eq!(facts.finished[0].1.reason, FinishReason::Expired);
    }
}
