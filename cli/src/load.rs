//! `seckill load`: a flash-crowd generator. Many distinct customers hit the
//! grab endpoint at once, a share of them retrying; customers told
//! `not_started` (409) come back after a short pause, as real ones refresh the
//! page. At the end it verifies the promises through the query API: grants
//! equal min(coupons, distinct customers), no customer holds two coupons of the
//! promotion, no coupon went to two customers, and every 200 shows up in the
//! read model within a bounded wait.
//!
//! With `--report FILE.html` it also samples the run (answers by outcome and
//! latency per interval, see [`crate::timeline`]; the promotion as the query
//! API reports it, polled at the same interval) and writes the page of
//! [`crate::report`].

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::StreamExt;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request, StatusCode};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use seckill_workers::protocol::PromotionId;
use serde::Serialize;
use serde_json::Value;

use crate::report::{self, LoadReport, Marker, OutcomeSeries, Percentiles};
use crate::timeline::{self, Timeline};

type HttpClient = Client<HttpConnector, Full<Bytes>>;

/// Flags of `seckill load`.
#[derive(clap::Args, Debug, Clone)]
pub struct LoadArgs {
    /// Base URL of the HTTP API (command workers, or the ingress).
    #[arg(long, env = "SECKILL_TARGET", default_value = "http://127.0.0.1:8080")]
    pub target: String,
    /// The promotion to grab from, namespace/name.
    #[arg(long)]
    pub promotion: String,
    /// Number of distinct customers.
    #[arg(long, default_value_t = 10_000)]
    pub customers: usize,
    /// Requests in flight at once.
    #[arg(long, default_value_t = 64)]
    pub concurrency: usize,
    /// Stop sending after this long (e.g. 30s, 2m) even if customers remain.
    #[arg(long, default_value = "60s")]
    pub duration: humantime::Duration,
    /// Share of customers who send their grab a second time (0 to 1).
    #[arg(long, default_value_t = 0.1)]
    pub repeat_ratio: f64,
    /// Customer ids are PREFIX-N; a fresh prefix per run by default.
    #[arg(long)]
    pub customer_prefix: Option<String>,
    /// How long a 200 may take to show in the read model.
    #[arg(long, default_value = "10s")]
    pub verify_timeout: humantime::Duration,
    /// Print the summary as JSON.
    #[arg(long)]
    pub json: bool,
    /// Also write a self-contained HTML report to this file: requests/s by
    /// outcome, latency percentiles and coupons remaining over the run's
    /// time (in about 300 intervals, none shorter than 100 ms), the publish and
    /// sell-out instants, and the verification verdict.
    #[arg(long, value_name = "FILE.html")]
    pub report: Option<PathBuf>,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "camelCase")]
enum Outcome {
    Granted,
    AlreadyGranted,
    NotStarted,
    SoldOut,
    Finished,
    UnknownPromotion,
    RateLimited,
    Unavailable,
    ClientError,
    #[default]
    TransportError,
    Other,
}

/// What one request taught us.
struct Answer {
    outcome: Outcome,
    coupon_id: Option<String>,
    retry_after: Option<Duration>,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Latency {
    p50: f64,
    p90: f64,
    p99: f64,
    max: f64,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Verification {
    passed: bool,
    complete: bool,
    number_of_coupons: u64,
    distinct_customers: usize,
    expected_granted: Option<u64>,
    granted_by_responses: usize,
    granted_in_read_model: u64,
    customers_with_two_coupons: usize,
    coupons_given_twice: usize,
    missing_in_read_model: usize,
    problems: Vec<String>,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Summary {
    target: String,
    promotion: String,
    requests: u64,
    duration_secs: f64,
    requests_per_sec: f64,
    latency_ms: Latency,
    outcomes: BTreeMap<Outcome, u64>,
    verification: Verification,
}

impl Verification {
    /// The grants counted both ways, against the stock and the crowd: one
    /// line of the printed summary and of the report.
    fn granted_counts(&self) -> String {
        format!(
            "{} by responses, {} in the read model, {} coupons, {} distinct customers{}",
            self.granted_by_responses,
            self.granted_in_read_model,
            self.number_of_coupons,
            self.distinct_customers,
            if self.complete {
                ""
            } else {
                " (stopped by --duration)"
            }
        )
    }
}

/// Tiny deterministic PRNG (splitmix64): the crowd's order and retries.
struct SplitMix(u64);

impl Outcome {
    /// The outcome as the summary names it (its JSON name).
    fn label(self) -> String {
        serde_json::to_string(&self)
            .unwrap_or_default()
            .trim_matches('"')
            .to_owned()
    }
}

impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

/// The crowd: each entry is a customer number; repeaters appear twice.
fn crowd(customers: usize, repeat_ratio: f64, seed: u64) -> Vec<usize> {
    let mut rng = SplitMix(seed);
    let mut order: Vec<usize> = (0..customers).collect();
    let repeats = ((customers as f64) * repeat_ratio.clamp(0.0, 1.0)).round() as usize;
    order.extend(0..repeats.min(customers));
    for i in (1..order.len()).rev() {
        let j = (rng.next() % (i as u64 + 1)) as usize;
        order.swap(i, j);
    }
    order
}

async fn send(
    client: &HttpClient,
    method: Method,
    url: &str,
    body: Option<String>,
) -> Result<(StatusCode, hyper::HeaderMap, Bytes), String> {
    let mut req = Request::builder().method(method).uri(url);
    if body.is_some() {
        req = req.header("content-type", "application/json");
    }
    let req = req
        .body(Full::new(Bytes::from(body.unwrap_or_default())))
        .map_err(|e| e.to_string())?;
    let resp = client.request(req).await.map_err(|e| e.to_string())?;
    let (parts, body) = resp.into_parts();
    let bytes = body.collect().await.map_err(|e| e.to_string())?.to_bytes();
    Ok((parts.status, parts.headers, bytes))
}

async fn grab(client: &HttpClient, url: &str, customer: &str) -> Answer {
    let body = serde_json::json!({ "customerId": customer }).to_string();
    let (status, headers, bytes) = match send(client, Method::POST, url, Some(body)).await {
        Ok(r) => r,
        Err(_) => {
            return Answer {
                outcome: Outcome::TransportError,
                coupon_id: None,
                retry_after: None,
            }
        }
    };
    let json: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    let retry_after = headers
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        .map(Duration::from_secs);
    let code = json.get("error").and_then(Value::as_str).unwrap_or("");
    let outcome = match status.as_u16() {
        200 if json.get("alreadyGranted").and_then(Value::as_bool) == Some(true) => {
            Outcome::AlreadyGranted
        }
        200 => Outcome::Granted,
        409 => Outcome::NotStarted,
        410 if code == "sold_out" => Outcome::SoldOut,
        410 => Outcome::Finished,
        404 => Outcome::UnknownPromotion,
        429 => Outcome::RateLimited,
        503 => Outcome::Unavailable,
        400..=499 => Outcome::ClientError,
        _ => Outcome::Other,
    };
    let coupon_id = if status == StatusCode::OK {
        json.get("couponId")
            .and_then(Value::as_str)
            .map(str::to_owned)
    } else {
        None
    };
    Answer {
        outcome,
        coupon_id,
        retry_after,
    }
}

struct Shared {
    histogram: Mutex<hdrhistogram::Histogram<u64>>,
    outcomes: Mutex<BTreeMap<Outcome, u64>>,
    /// customer number -> coupon id from every 200 answer.
    grants: Mutex<HashMap<usize, HashSet<String>>>,
    attempted: Mutex<HashSet<usize>>,
    requests: AtomicUsize,
    /// With `--report`: the answers per interval, and the first and last
    /// `granted` answer (microseconds since the start; 0 = none yet).
    timeline: Option<Timeline<Outcome>>,
    first_grant_micros: AtomicU64,
    last_grant_micros: AtomicU64,
}

/// The promotion as the query API answered it during the run.
#[derive(Debug, Clone, Default, PartialEq)]
struct Poll {
    /// Seconds since the start.
    at_secs: f64,
    remaining: Option<u64>,
    number_of_coupons: Option<u64>,
    publish_time: Option<chrono::DateTime<chrono::Utc>>,
}

impl Poll {
    fn from_answer(at_secs: f64, body: &Value) -> Self {
        Self {
            at_secs,
            remaining: body.get("remaining").and_then(Value::as_u64),
            number_of_coupons: body.get("numberOfCoupons").and_then(Value::as_u64),
            publish_time: body
                .get("publishTime")
                .and_then(Value::as_str)
                .and_then(|t| t.parse().ok()),
        }
    }
}

/// Polls `url` (the promotion on the query API) every `every` until
/// `stop`: what the report's coupons-remaining plot shows beside the
/// answers, and where it learns publishTime.
async fn poll_promotion(
    client: HttpClient,
    url: String,
    started: Instant,
    every: Duration,
    stop: Arc<AtomicBool>,
) -> Vec<Poll> {
    let mut polls = Vec::new();
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    while !stop.load(Ordering::Relaxed) {
        tick.tick().await;
        if let Ok((StatusCode::OK, _, body)) = send(&client, Method::GET, &url, None).await {
            let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
            polls.push(Poll::from_answer(started.elapsed().as_secs_f64(), &body));
        }
    }
    polls
}

/// Runs the load, prints the summary; Ok(false) when the verification failed.
pub async fn run(args: LoadArgs) -> Result<bool, String> {
    let promotion = PromotionId::parse(&args.promotion).map_err(|e| e.to_string())?;
    let base = args.target.trim_end_matches('/').to_owned();
    let grab_url = format!(
        "{base}/api/v1/promotions/{}/{}/grab",
        promotion.namespace(),
        promotion.name()
    );
    let prefix = args.customer_prefix.clone().unwrap_or_else(|| {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis())
            .unwrap_or(0);
        format!("load-{t:x}")
    });
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    let client: HttpClient = Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(args.concurrency)
        .build(connector);

    let order = Arc::new(crowd(args.customers, args.repeat_ratio, 0x5EC_C111));
    let next = Arc::new(AtomicUsize::new(0));
    let started_at = chrono::Utc::now();
    let started = Instant::now();
    let bucket = timeline::bucket_for(*args.duration);
    let shared = Arc::new(Shared {
        histogram: Mutex::new(
            hdrhistogram::Histogram::new_with_bounds(1, 60_000_000, 3)
                .map_err(|e| e.to_string())?,
        ),
        outcomes: Mutex::new(BTreeMap::new()),
        grants: Mutex::new(HashMap::new()),
        attempted: Mutex::new(HashSet::new()),
        requests: AtomicUsize::new(0),
        timeline: args
            .report
            .is_some()
            .then(|| Timeline::new(started, bucket)),
        first_grant_micros: AtomicU64::new(0),
        last_grant_micros: AtomicU64::new(0),
    });
    let deadline = Instant::now() + *args.duration;
    let timed_out = Arc::new(AtomicBool::new(false));
    let bar = if std::io::stderr().is_terminal() && !args.json {
        let bar = indicatif::ProgressBar::new(order.len() as u64);
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{spinner} [{elapsed_precise}] {bar:40} {pos}/{len} customers' requests {msg}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        Some(bar)
    } else {
        None
    };

    let stop_polling = Arc::new(AtomicBool::new(false));
    let poller = args.report.is_some().then(|| {
        let url = format!(
            "{base}/api/v1/promotions/{}/{}",
            promotion.namespace(),
            promotion.name()
        );
        tokio::spawn(poll_promotion(
            client.clone(),
            url,
            started,
            bucket,
            stop_polling.clone(),
        ))
    });
    let mut workers = Vec::new();
    for _ in 0..args.concurrency.max(1) {
        let (client, order, next, shared, url, prefix, timed_out, bar) = (
            client.clone(),
            order.clone(),
            next.clone(),
            shared.clone(),
            grab_url.clone(),
            prefix.clone(),
            timed_out.clone(),
            bar.clone(),
        );
        workers.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(&n) = order.get(i) else { break };
                let customer = format!("{prefix}-{n}");
                // A customer told "not yet" (or "busy") comes back until the
                // sale opens or the run's time is up.
                loop {
                    if Instant::now() >= deadline {
                        timed_out.store(true, Ordering::Relaxed);
                        return;
                    }
                    let t0 = Instant::now();
                    let answer = grab(&client, &url, &customer).await;
                    let done = Instant::now();
                    let micros = done.duration_since(t0).as_micros() as u64;
                    if let Some(timeline) = &shared.timeline {
                        timeline.record(done, answer.outcome, done.duration_since(t0));
                        if answer.outcome == Outcome::Granted {
                            let at = (done.duration_since(started).as_micros() as u64).max(1);
                            let _ = shared.first_grant_micros.compare_exchange(
                                0,
                                at,
                                Ordering::Relaxed,
                                Ordering::Relaxed,
                            );
                            shared.last_grant_micros.fetch_max(at, Ordering::Relaxed);
                        }
                    }
                    shared.requests.fetch_add(1, Ordering::Relaxed);
                    if let Ok(mut h) = shared.histogram.lock() {
                        let _ = h.record(micros.max(1));
                    }
                    if let Ok(mut o) = shared.outcomes.lock() {
                        *o.entry(answer.outcome).or_default() += 1;
                    }
                    if let Ok(mut a) = shared.attempted.lock() {
                        a.insert(n);
                    }
                    if let Some(coupon) = answer.coupon_id {
                        if let Ok(mut g) = shared.grants.lock() {
                            g.entry(n).or_default().insert(coupon);
                        }
                    }
                    match answer.outcome {
                        Outcome::NotStarted
                        | Outcome::Unavailable
                        | Outcome::RateLimited
                        | Outcome::TransportError => {
                            let pause = answer
                                .retry_after
                                .unwrap_or(Duration::from_millis(50))
                                .min(Duration::from_millis(200));
                            tokio::time::sleep(pause).await;
                        }
                        _ => break,
                    }
                }
                if let Some(bar) = &bar {
                    bar.inc(1);
                }
            }
        }));
    }
    for w in workers {
        let _ = w.await;
    }
    let elapsed = started.elapsed();
    stop_polling.store(true, Ordering::Relaxed);
    let polls = match poller {
        Some(task) => task.await.unwrap_or_default(),
        None => Vec::new(),
    };
    if let Some(bar) = &bar {
        bar.finish_and_clear();
    }

    let requests = shared.requests.load(Ordering::Relaxed) as u64;
    let latency = {
        let h = shared.histogram.lock().map_err(|e| e.to_string())?;
        let ms = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
        Latency {
            p50: ms(0.5),
            p90: ms(0.9),
            p99: ms(0.99),
            max: h.max() as f64 / 1000.0,
        }
    };
    let outcomes = shared.outcomes.lock().map_err(|e| e.to_string())?.clone();
    let grants = shared.grants.lock().map_err(|e| e.to_string())?.clone();
    let attempted = shared.attempted.lock().map_err(|e| e.to_string())?.len();
    let complete = !timed_out.load(Ordering::Relaxed);
    let verification = verify(
        &client,
        &base,
        &promotion,
        &prefix,
        &grants,
        attempted,
        complete,
        *args.verify_timeout,
    )
    .await;
    let passed = verification.passed;
    let summary = Summary {
        target: base,
        promotion: promotion.to_string(),
        requests,
        duration_secs: elapsed.as_secs_f64(),
        requests_per_sec: requests as f64 / elapsed.as_secs_f64().max(1e-9),
        latency_ms: latency,
        outcomes,
        verification,
    };
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&summary).map_err(|e| e.to_string())?
        );
    } else {
        print_summary(&summary);
    }
    if let (Some(path), Some(timeline)) = (&args.report, &shared.timeline) {
        let grants = GrantInstants {
            first: micros_to_secs(shared.first_grant_micros.load(Ordering::Relaxed)),
            last: micros_to_secs(shared.last_grant_micros.load(Ordering::Relaxed)),
        };
        let page = report::render(&load_report(&summary, timeline, &polls, grants, started_at));
        std::fs::write(path, page)
            .map_err(|e| format!("cannot write the report {}: {e}", path.display()))?;
        // stderr: with --json, stdout is the summary alone.
        eprintln!("seckill load: report written to {}", path.display());
    }
    Ok(passed)
}

/// Seconds from microseconds since the start; `None` for 0 (never).
fn micros_to_secs(micros: u64) -> Option<f64> {
    (micros > 0).then(|| micros as f64 / 1e6)
}

/// When the first and the last `granted` answer came, in seconds since
/// the start.
#[derive(Debug, Clone, Copy, Default)]
struct GrantInstants {
    first: Option<f64>,
    last: Option<f64>,
}

/// What the report shows of a run: its summary, its timeline, the polls of
/// the query API and the grant instants.
fn load_report(
    summary: &Summary,
    timeline: &Timeline<Outcome>,
    polls: &[Poll],
    grants: GrantInstants,
    started_at: chrono::DateTime<chrono::Utc>,
) -> LoadReport {
    let bucket_secs = timeline.bucket().as_secs_f64();
    let duration_secs = summary.duration_secs;
    let n = timeline
        .len()
        .max((duration_secs / bucket_secs).ceil() as usize);
    let v = &summary.verification;
    let coupons = polls
        .iter()
        .rev()
        .find_map(|p| p.number_of_coupons)
        .or((v.number_of_coupons > 0).then_some(v.number_of_coupons));

    // Coupons remaining as the answers tell it: every `granted` answer is
    // one coupon fewer.
    let mut remaining_by_answers = Vec::new();
    if let Some(total) = coupons {
        let mut left = total as f64;
        remaining_by_answers.push((0.0, left));
        for (i, granted) in timeline.counts(Outcome::Granted, n).iter().enumerate() {
            left -= *granted as f64;
            remaining_by_answers.push(((i + 1) as f64 * bucket_secs, left.max(0.0)));
        }
    }
    let remaining_by_query: Vec<(f64, f64)> = polls
        .iter()
        .filter_map(|p| p.remaining.map(|r| (p.at_secs, r as f64)))
        .collect();

    let publish = polls.iter().find_map(|p| p.publish_time);
    let opened_at = match publish {
        Some(t) => {
            let secs = (t - started_at).num_milliseconds() as f64 / 1000.0;
            (secs >= 0.0).then(|| Marker {
                at_secs: secs,
                label: "publishTime".into(),
            })
        }
        None => grants.first.map(|at| Marker {
            at_secs: at,
            label: "first grant".into(),
        }),
    };
    let sold_out_by_answers = coupons.is_some_and(|c| c > 0 && v.granted_by_responses as u64 == c);
    let sold_out_at = match grants.last {
        Some(at) if sold_out_by_answers => Some(Marker {
            at_secs: at,
            label: "sold out (last coupon granted)".into(),
        }),
        _ => polls
            .iter()
            .find(|p| p.remaining == Some(0))
            .map(|p| Marker {
                at_secs: p.at_secs,
                label: "sold out (query API)".into(),
            }),
    };

    let quantiles = timeline.quantiles(n);
    let pick = |k: usize| quantiles.iter().map(|q| q.map(|q| q[k])).collect();
    let latency = Percentiles {
        p50: pick(0),
        p90: pick(1),
        p99: pick(2),
    };
    let throughput = timeline
        .rates(n)
        .into_iter()
        .map(|(outcome, per_sec)| OutcomeSeries {
            outcome: outcome.label(),
            per_sec,
        })
        .collect();

    let outcomes: Vec<String> = summary
        .outcomes
        .iter()
        .map(|(k, n)| format!("{} {n}", k.label()))
        .collect();
    let mut figures = vec![
        (
            "requests".to_owned(),
            format!(
                "{} in {:.2} s ({:.0}/s)",
                summary.requests, summary.duration_secs, summary.requests_per_sec
            ),
        ),
        (
            "latency p50 / p90 / p99 / max".to_owned(),
            format!(
                "{:.2} / {:.2} / {:.2} / {:.2} ms",
                summary.latency_ms.p50,
                summary.latency_ms.p90,
                summary.latency_ms.p99,
                summary.latency_ms.max
            ),
        ),
        ("answers".to_owned(), outcomes.join(" · ")),
        ("granted".to_owned(), v.granted_counts()),
    ];
    if let Some(t) = publish {
        figures.push((
            "publishTime".to_owned(),
            format!(
                "{} ({:+.1} s from the start)",
                t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
                (t - started_at).num_milliseconds() as f64 / 1000.0
            ),
        ));
    }
    let reasons = if v.passed {
        let mut proven = vec![
            format!(
                "no oversell: {} granted of {} coupons",
                v.granted_in_read_model, v.number_of_coupons
            ),
            "no customer got two coupons, no coupon went to two customers".to_owned(),
            "every 200 answered is in the read model".to_owned(),
        ];
        if let Some(expected) = v.expected_granted {
            proven.insert(
                1,
                format!("exactly min(coupons, customers) = {expected} granted"),
            );
        }
        proven
    } else {
        v.problems.clone()
    };
    LoadReport {
        promotion: summary.promotion.clone(),
        target: summary.target.clone(),
        started_at: started_at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        bucket_secs,
        duration_secs,
        figures,
        throughput,
        latency,
        remaining_by_answers,
        remaining_by_query,
        number_of_coupons: coupons,
        opened_at,
        sold_out_at,
        verdict: report::Verdict {
            passed: v.passed,
            reasons,
        },
    }
}

#[allow(clippy::too_many_arguments)]
async fn verify(
    client: &HttpClient,
    base: &str,
    promotion: &PromotionId,
    prefix: &str,
    grants: &HashMap<usize, HashSet<String>>,
    distinct_customers: usize,
    complete: bool,
    wait: Duration,
) -> Verification {
    let mut problems = Vec::new();
    let promotion_url = format!(
        "{base}/api/v1/promotions/{}/{}",
        promotion.namespace(),
        promotion.name()
    );
    let deadline = Instant::now() + wait;
    let customers_with_two = grants.values().filter(|c| c.len() > 1).count();
    let mut owners: HashMap<&str, usize> = HashMap::new();
    for coupons in grants.values() {
        for c in coupons {
            *owners.entry(c.as_str()).or_default() += 1;
        }
    }
    let coupons_twice = owners.values().filter(|n| **n > 1).count();
    if customers_with_two > 0 {
        problems.push(format!(
            "{customers_with_two} customers got two different coupons"
        ));
    }
    if coupons_twice > 0 {
        problems.push(format!("{coupons_twice} coupons went to two customers"));
    }

    // Wait for the read model to catch up with what we were granted.
    let mut read_model = Value::Null;
    loop {
        if let Ok((StatusCode::OK, _, body)) = send(client, Method::GET, &promotion_url, None).await
        {
            read_model = serde_json::from_slice(&body).unwrap_or(Value::Null);
            let granted = read_model
                .get("granted")
                .and_then(Value::as_u64)
                .unwrap_or(0);
            if granted as usize >= grants.len() || Instant::now() >= deadline {
                break;
            }
        } else if Instant::now() >= deadline {
            problems.push("the promotion is not readable through the query API".into());
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let coupons = read_model
        .get("numberOfCoupons")
        .and_then(Value::as_u64)
        .unwrap_or(0);
    let granted_rm = read_model
        .get("granted")
        .and_then(Value::as_u64)
        .unwrap_or(0);
    let expected = complete.then(|| coupons.min(distinct_customers as u64));
    if let Some(expected) = expected {
        if granted_rm != expected {
            problems.push(format!(
                "read model says {granted_rm} granted, expected min({coupons} coupons, {distinct_customers} customers) = {expected}"
            ));
        }
        if grants.len() as u64 != expected {
            problems.push(format!(
                "{} customers got a 200, expected {expected}",
                grants.len()
            ));
        }
    } else if (grants.len() as u64) > granted_rm {
        problems.push(format!(
            "{} customers got a 200 but the read model shows {granted_rm}",
            grants.len()
        ));
    }
    if granted_rm > coupons {
        problems.push(format!("oversold: {granted_rm} > {coupons}"));
    }

    // Every 200 visible in the customer's coupons, exactly once for this promotion.
    let mut missing = 0;
    let mut two_in_read_model = 0;
    let promotion_text = promotion.to_string();
    let checks = grants.iter().map(|(n, coupons)| {
        let url = format!("{base}/api/v1/customers/{prefix}-{n}/coupons");
        let promotion_text = promotion_text.clone();
        async move {
            loop {
                let held: Vec<String> = match send(client, Method::GET, &url, None).await {
                    Ok((StatusCode::OK, _, body)) => serde_json::from_slice::<Value>(&body)
                        .ok()
                        .and_then(|v| v.get("items").cloned())
                        .and_then(|v| v.as_array().cloned())
                        .unwrap_or_default()
                        .iter()
                        .filter(|i| {
                            i.get("promotion").and_then(Value::as_str)
                                == Some(promotion_text.as_str())
                        })
                        .filter_map(|i| i.get("couponId").and_then(Value::as_str))
                        .map(str::to_owned)
                        .collect(),
                    _ => Vec::new(),
                };
                let visible = coupons.iter().all(|c| held.contains(c));
                if (visible && !held.is_empty()) || Instant::now() >= deadline {
                    return (visible, held.len() > 1);
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    });
    let results: Vec<(bool, bool)> = futures::stream::iter(checks)
        .buffer_unordered(64)
        .collect()
        .await;
    for (visible, two) in results {
        if !visible {
            missing += 1;
        }
        if two {
            two_in_read_model += 1;
        }
    }
    if missing > 0 {
        problems.push(format!(
            "{missing} granted coupons not visible in the read model within {wait:?}"
        ));
    }
    if two_in_read_model > 0 {
        problems.push(format!(
            "{two_in_read_model} customers hold two coupons of the promotion in the read model"
        ));
    }
    Verification {
        passed: problems.is_empty(),
        complete,
        number_of_coupons: coupons,
        distinct_customers,
        expected_granted: expected,
        granted_by_responses: grants.len(),
        granted_in_read_model: granted_rm,
        customers_with_two_coupons: customers_with_two.max(two_in_read_model),
        coupons_given_twice: coupons_twice,
        missing_in_read_model: missing,
        problems,
    }
}

fn print_summary(s: &Summary) {
    println!("seckill load: {} against {}", s.promotion, s.target);
    println!(
        "  {} requests in {:.2} s = {:.0} requests/s",
        s.requests, s.duration_secs, s.requests_per_sec
    );
    println!(
        "  latency ms: p50 {:.2}  p90 {:.2}  p99 {:.2}  max {:.2}",
        s.latency_ms.p50, s.latency_ms.p90, s.latency_ms.p99, s.latency_ms.max
    );
    let outcomes: Vec<String> = s
        .outcomes
        .iter()
        .map(|(k, v)| format!("{}: {v}", k.label()))
        .collect();
    println!("  outcomes: {}", outcomes.join(", "));
    let v = &s.verification;
    println!("  granted: {}", v.granted_counts());
    if v.passed {
        println!(
            "  verification: PASSED (no oversell, no customer twice, every 200 in the read model)"
        );
    } else {
        println!("  verification: FAILED");
        for p in &v.problems {
            println!("    - {p}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crowd_holds_every_customer_once_plus_the_repeaters() {
        let c = crowd(1_000, 0.25, 7);
        assert_eq!(c.len(), 1_250);
        let distinct: HashSet<_> = c.iter().collect();
        assert_eq!(distinct.len(), 1_000);
        assert_ne!(&c[..10], &(0..10).collect::<Vec<_>>()[..], "shuffled");
    }

    /// A run of 4 s against 3 coupons, 5 customers: 2 s of notStarted,
    /// then the 3 grants at 2.05, 2.15 and 2.25 s, then soldOut.
    fn sale(passed: bool, granted_by_responses: usize) -> (Summary, Timeline<Outcome>) {
        let started = Instant::now();
        let timeline = Timeline::new(started, Duration::from_millis(100));
        let at = |ms: u64| started + Duration::from_millis(ms);
        for ms in [500, 1_000, 1_500] {
            timeline.record(at(ms), Outcome::NotStarted, Duration::from_millis(1));
        }
        for ms in [2_050, 2_150, 2_250] {
            timeline.record(at(ms), Outcome::Granted, Duration::from_millis(4));
        }
        for ms in [2_300, 3_950] {
            timeline.record(at(ms), Outcome::SoldOut, Duration::from_millis(2));
        }
        let summary = Summary {
            target: "http://127.0.0.1:1".into(),
            promotion: "demo/sale".into(),
            requests: 8,
            duration_secs: 4.0,
            requests_per_sec: 2.0,
            latency_ms: Latency {
                p50: 2.0,
                p90: 4.0,
                p99: 4.0,
                max: 4.0,
            },
            outcomes: [
                (Outcome::NotStarted, 3),
                (Outcome::Granted, 3),
                (Outcome::SoldOut, 2),
            ]
            .into(),
            verification: Verification {
                passed,
                complete: true,
                number_of_coupons: 3,
                distinct_customers: 5,
                expected_granted: Some(3),
                granted_by_responses,
                granted_in_read_model: 3,
                customers_with_two_coupons: 0,
                coupons_given_twice: 0,
                missing_in_read_model: 0,
                problems: if passed {
                    vec![]
                } else {
                    vec!["1 granted in the read model without a 200".into()]
                },
            },
        };
        (summary, timeline)
    }

    fn started_at() -> chrono::DateTime<chrono::Utc> {
        "2026-12-01T14:00:00Z".parse().unwrap()
    }

    fn polls() -> Vec<Poll> {
        let body = |remaining: u64| {
            serde_json::json!({"remaining": remaining, "numberOfCoupons": 3,
                               "publishTime": "2026-12-01T14:00:02Z"})
        };
        vec![
            Poll::from_answer(1.0, &body(3)),
            Poll::from_answer(2.2, &body(1)),
            Poll::from_answer(2.4, &body(0)),
        ]
    }

    /// The report of `sale` whose first grant came at 2.05 s and the last at `last_grant`.
    fn report_of((summary, timeline): (Summary, Timeline<Outcome>), last_grant: f64) -> LoadReport {
        let grants = GrantInstants {
            first: Some(2.05),
            last: Some(last_grant),
        };
        load_report(&summary, &timeline, &polls(), grants, started_at())
    }

    #[test]
    fn the_report_of_a_sale_marks_its_publish_time_and_the_last_grant_as_the_sell_out() {
        let r = report_of(sale(true, 3), 2.25);
        assert_eq!(r.bucket_secs, 0.1);
        assert_eq!(r.number_of_coupons, Some(3));
        assert_eq!(
            r.opened_at,
            Some(Marker {
                at_secs: 2.0,
                label: "publishTime".into()
            })
        );
        assert_eq!(
            r.sold_out_at,
            Some(Marker {
                at_secs: 2.25,
                label: "sold out (last coupon granted)".into()
            })
        );
        // 40 buckets of 100 ms; the grants answered take the stock down.
        let remaining: Vec<f64> = r.remaining_by_answers.iter().map(|p| p.1).collect();
        assert_eq!(remaining.len(), 41);
        assert_eq!(remaining[..=20], [3.0; 21]);
        assert_eq!(remaining[21..24], [2.0, 1.0, 0.0]);
        assert_eq!(remaining[24..], [0.0; 17]);
        let times: Vec<f64> = r.remaining_by_answers.iter().map(|p| p.0).collect();
        assert!(
            times
                .iter()
                .enumerate()
                .all(|(i, t)| (t - i as f64 * 0.1).abs() < 1e-9),
            "{times:?}"
        );
        assert_eq!(r.remaining_by_query, [(1.0, 3.0), (2.2, 1.0), (2.4, 0.0)]);
        let granted = r.throughput.iter().find(|s| s.outcome == "granted");
        let granted = granted.expect("a granted series");
        assert_eq!(granted.per_sec.len(), 40);
        assert_eq!(
            granted.per_sec.iter().sum::<f64>(),
            30.0,
            "3 answers in 0.1 s buckets"
        );
        let outcomes: Vec<&str> = r.throughput.iter().map(|s| s.outcome.as_str()).collect();
        assert_eq!(outcomes, ["granted", "notStarted", "soldOut"]);
        let p50 = r.latency.p50[20].expect("answers in 2.0-2.1 s");
        assert!(
            (p50 - 4.0).abs() < 0.05,
            "p50 {p50} ms, recorded 4 ms (2 digits kept)"
        );
        assert_eq!(r.latency.p50[11], None, "no answer in 1.1-1.2 s");
        assert!(r.verdict.passed);
        assert!(
            r.verdict
                .reasons
                .contains(&"exactly min(coupons, customers) = 3 granted".to_owned()),
            "{:?}",
            r.verdict.reasons
        );
    }

    #[test]
    fn without_every_grant_answered_the_sell_out_is_where_the_query_api_said_zero() {
        let r = report_of(sale(false, 2), 2.15);
        assert_eq!(
            r.sold_out_at,
            Some(Marker {
                at_secs: 2.4,
                label: "sold out (query API)".into()
            })
        );
        assert!(!r.verdict.passed);
        assert_eq!(
            r.verdict.reasons,
            ["1 granted in the read model without a 200"]
        );
    }

    #[test]
    fn without_the_query_api_the_first_grant_stands_for_the_opening() {
        let (summary, timeline) = sale(true, 3);
        let grants = GrantInstants {
            first: Some(2.05),
            last: Some(2.25),
        };
        let r = load_report(&summary, &timeline, &[], grants, started_at());
        assert_eq!(
            r.opened_at,
            Some(Marker {
                at_secs: 2.05,
                label: "first grant".into()
            })
        );
        assert!(r.remaining_by_query.is_empty());
        assert_eq!(r.remaining_by_answers.last(), Some(&(4.0, 0.0)));
    }
}
