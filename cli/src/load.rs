//! `seckill load`: a flash-crowd generator. Many distinct customers hit the
//! grab endpoint at once, a share of them retrying; customers told
//! `not_started` (409) come back after a short pause, as real ones refresh the
//! page. At the end it verifies the promises through the query API: grants
//! equal min(coupons, distinct customers), no customer holds two coupons of the
//! promotion, no coupon went to two customers, and every 200 shows up in the
//! read model within a bounded wait.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::IsTerminal;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
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

/// Tiny deterministic PRNG (splitmix64): the crowd's order and retries.
struct SplitMix(u64);

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
    let shared = Arc::new(Shared {
        histogram: Mutex::new(
            hdrhistogram::Histogram::new_with_bounds(1, 60_000_000, 3)
                .map_err(|e| e.to_string())?,
        ),
        outcomes: Mutex::new(BTreeMap::new()),
        grants: Mutex::new(HashMap::new()),
        attempted: Mutex::new(HashSet::new()),
        requests: AtomicUsize::new(0),
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

    let started = Instant::now();
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
                    let micros = t0.elapsed().as_micros() as u64;
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
    Ok(passed)
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
        .map(|(k, v)| {
            format!(
                "{}: {v}",
                serde_json::to_string(k)
                    .unwrap_or_default()
                    .trim_matches('"')
            )
        })
        .collect();
    println!("  outcomes: {}", outcomes.join(", "));
    let v = &s.verification;
    println!(
        "  granted: {} by responses, {} in the read model, {} coupons, {} distinct customers{}",
        v.granted_by_responses,
        v.granted_in_read_model,
        v.number_of_coupons,
        v.distinct_customers,
        if v.complete {
            ""
        } else {
            " (stopped by --duration)"
        }
    );
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
}
