//! HTTP abuse against a real `seckill-worker command` (issue 7): slow
//! headers, 1 MB bodies, invalid UTF-8, 100 KB paths, thousands of idle
//! connections, odd characters in namespace, name and customer id. Each gets
//! a clear 4xx or a closed connection, and meanwhile a stream of legitimate
//! customers keeps being granted coupons: every one of their grabs answered
//! during the abuse is a 200. Their count and latencies are printed
//! (`[abuse]` lines); how fast is a benchmark's business, not a test's.
//!
//! The slow-header timeout is set with `--header-read-timeout-ms` when the
//! worker has that flag; without it the 10 s default is waited for only in
//! the long version (`SECKILL_FAULTS_LONG=1`).

use std::collections::HashSet;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use seckill_testkit::client::{self, BoxError, Connection};
use seckill_testkit::process::{binary, long, WORKER};
use seckill_testkit::promotions::{id, spec_from_now};
use seckill_testkit::redis::{connect, redis_with, RedisServer};
use seckill_testkit::stream::grants_of;
use seckill_testkit::{eventually, CommandOptions, Worker, JSON};
use seckill_workers::protocol::{self, PromotionId};
use seckill_workers::redis_connection::RedisConnection;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const GRAB: &str = "/api/v1/promotions/shop/sale/grab";

/// Bounds a hang: how long a connection may stay unanswered, or a condition
/// unmet, before the test fails.
const WITHIN: Duration = Duration::from_secs(30);

/// Does `seckill-worker command` take `flag`?
fn worker_has_flag(flag: &str) -> bool {
    let out = Command::new(binary(WORKER))
        .args(["command", "--help"])
        .output()
        .expect("seckill-worker runs");
    String::from_utf8_lossy(&out.stdout).contains(flag)
}

/// What the server did with raw bytes: its status line, body, and whether
/// it closed the connection, and when.
#[derive(Debug)]
struct RawAnswer {
    status: Option<u16>,
    text: String,
    closed: bool,
    elapsed: Duration,
}

impl RawAnswer {
    /// A clear 4xx or a closed connection (never 2xx, never 5xx, never a hang).
    fn is_refusal(&self) -> bool {
        match self.status {
            Some(s) => (400..500).contains(&s),
            None => self.closed,
        }
    }

    fn body(&self) -> &str {
        self.text.split_once("\r\n\r\n").map_or("", |(_, b)| b)
    }
}

/// Sends `bytes` on a fresh connection (ignoring a write the server cut
/// short) and reads until the server closes or `within` passes.
async fn raw(port: u16, bytes: &[u8], within: Duration) -> RawAnswer {
    let started = Instant::now();
    let Ok(mut stream) = TcpStream::connect(("127.0.0.1", port)).await else {
        return RawAnswer {
            status: None,
            text: String::new(),
            closed: true,
            elapsed: started.elapsed(),
        };
    };
    let (mut read, mut write) = stream.split();
    let writer = async {
        let _ = write.write_all(bytes).await;
    };
    let mut buf = Vec::new();
    let reader = async {
        let mut chunk = [0u8; 8192];
        loop {
            match read.read(&mut chunk).await {
                Ok(0) | Err(_) => return true,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
    };
    let (closed, _) = tokio::join!(
        async { tokio::time::timeout(within, reader).await.unwrap_or(false) },
        writer
    );
    let text = String::from_utf8_lossy(&buf).into_owned();
    RawAnswer {
        status: text
            .strip_prefix("HTTP/1.1 ")
            .and_then(|r| r.get(..3))
            .and_then(|c| c.parse().ok()),
        text,
        closed,
        elapsed: started.elapsed(),
    }
}

/// Whether the server closed (or reset) `stream`; what it sent before (an
/// answer such as 408) is read and dropped. Never waits.
fn closed_by_peer(stream: &TcpStream) -> bool {
    let mut buf = [0u8; 1024];
    loop {
        match stream.try_read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return false,
            Err(_) => return true,
        }
    }
}

fn post(path: &[u8], content_type: &str, body: &[u8]) -> Vec<u8> {
    let mut out = b"POST ".to_vec();
    out.extend_from_slice(path);
    out.extend_from_slice(
        format!(
            " HTTP/1.1\r\nHost: x\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        )
        .as_bytes(),
    );
    out.extend_from_slice(body);
    out
}

/// Legitimate customers grabbing all along, on keep-alive connections.
struct Legit {
    stop: Arc<AtomicBool>,
    /// (when answered, latency, status or 0 for a failed request)
    log: Arc<Mutex<Vec<(Instant, Duration, u16)>>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

async fn legit_grab(
    sender: &mut Option<Connection>,
    port: u16,
    customer: &str,
) -> Result<u16, BoxError> {
    if sender.is_none() {
        *sender = Some(client::connect(port, false).await?);
    }
    let s = sender.as_mut().expect("connected");
    let headers = [("content-type", JSON)];
    let reply = client::send(s, port, "POST", GRAB, &headers, client::body(customer)).await?;
    Ok(reply.status)
}

impl Legit {
    /// `clients` customers grabbing on `port`; returns once one was answered.
    async fn start(port: u16, clients: usize) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let log = Arc::new(Mutex::new(Vec::new()));
        let tasks = (0..clients)
            .map(|c| {
                let stop = stop.clone();
                let log = log.clone();
                tokio::spawn(async move {
                    let mut sender = None;
                    let mut n = 0;
                    while !stop.load(Ordering::Relaxed) {
                        n += 1;
                        let customer = format!("legit-{c}-{n}");
                        let sent = Instant::now();
                        let status = match legit_grab(&mut sender, port, &customer).await {
                            Ok(s) => s,
                            Err(_) => {
                                sender = None;
                                0
                            }
                        };
                        log.lock()
                            .unwrap()
                            .push((Instant::now(), sent.elapsed(), status));
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                })
            })
            .collect();
        let legit = Self { stop, log, tasks };
        legit.served_since(Instant::now(), 1).await;
        legit
    }

    /// Legitimate grabs answered since `from`.
    fn answered_since(&self, from: Instant) -> usize {
        let log = self.log.lock().unwrap();
        log.iter().filter(|(at, _, _)| *at >= from).count()
    }

    /// Waits until `n` legitimate grabs have been answered since `from`.
    async fn served_since(&self, from: Instant, n: usize) {
        eventually(WITHIN, || async {
            let answered = self.answered_since(from);
            (answered >= n)
                .then_some(())
                .ok_or(format!("{answered} legitimate grabs answered"))
        })
        .await;
    }

    /// Checks the legitimate grabs answered in `[from, now)`, once at least
    /// a few were: all 200. Prints their count and latencies; returns
    /// (count, p50, max).
    async fn check_since(&self, what: &str, from: Instant) -> (usize, Duration, Duration) {
        self.served_since(from, 5).await;
        let log = self.log.lock().unwrap();
        let window: Vec<_> = log.iter().filter(|(at, _, _)| *at >= from).collect();
        let failed: Vec<_> = window.iter().filter(|(_, _, s)| *s != 200).collect();
        let mut latencies: Vec<Duration> = window.iter().map(|(_, l, _)| *l).collect();
        latencies.sort();
        let p50 = latencies
            .get(latencies.len() / 2)
            .copied()
            .unwrap_or_default();
        let max = latencies.last().copied().unwrap_or_default();
        eprintln!(
            "[abuse] {what}: {} legitimate grabs answered meanwhile, {} not 200, p50 {p50:.2?}, max {max:.2?}",
            window.len(),
            failed.len()
        );
        assert!(
            failed.is_empty(),
            "{what}: legitimate grabs failed: {:?}",
            failed.iter().map(|(_, _, s)| *s).collect::<HashSet<_>>()
        );
        (window.len(), p50, max)
    }

    async fn stop(self) -> usize {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.tasks {
            t.await.unwrap();
        }
        let n = self.log.lock().unwrap().len();
        n
    }
}

async fn setup(extra: &[&str]) -> (RedisServer, RedisConnection, PromotionId, Worker) {
    let server = redis_with(None);
    let mut con = connect(&server);
    let id = id("sale");
    let spec = spec_from_now(0.5, 10_000_000, -1000, 3_601_000);
    protocol::schedule(&mut con, &id, &spec).await.unwrap();
    let options = CommandOptions {
        log: "error",
        redis_timeout_ms: Some("1000"),
        skew: None,
    };
    let worker = Worker::command_with(&server.url(), extra, options).await;
    (server, con, id, worker)
}

/// Only the legitimate customers got coupons, each once.
async fn only_legit_granted(con: &mut RedisConnection, id: &PromotionId, legit_answers: usize) {
    let customers: Vec<String> = grants_of(con, id)
        .await
        .into_iter()
        .map(|g| g.customer_id)
        .collect();
    let odd: Vec<_> = customers
        .iter()
        .filter(|c| !c.starts_with("legit-"))
        .collect();
    assert!(odd.is_empty(), "abusive requests were granted: {odd:?}");
    let unique: HashSet<_> = customers.iter().collect();
    assert_eq!(
        unique.len(),
        customers.len(),
        "a customer was granted twice"
    );
    assert!(customers.len() <= legit_answers);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_headers_are_cut_off_while_legitimate_customers_keep_grabbing() {
    let timeout_flag = worker_has_flag("--header-read-timeout-ms");
    let extra: &[&str] = if timeout_flag {
        &["--header-read-timeout-ms", "1000"]
    } else {
        &[]
    };
    let (_server, mut con, id, worker) = setup(extra).await;
    let port = worker.port;
    let legit = Legit::start(port, 4).await;

    // 200 slowloris connections: a request line, then one header byte every
    // 200 ms, never the blank line. With a header timeout each must be cut
    // off (the hold only bounds a hang); without the flag the 10 s default
    // is waited for in the long version only.
    let cut_off_expected = timeout_flag || long();
    let hold = if cut_off_expected {
        WITHIN
    } else {
        Duration::from_millis(2500)
    };
    let from = Instant::now();
    let slow: Vec<_> = (0..200)
        .map(|_| {
            tokio::spawn(async move {
                let started = Instant::now();
                let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)).await else {
                    return Some(Duration::ZERO);
                };
                if s.write_all(format!("POST {GRAB} HTTP/1.1\r\nHost: x\r\nX-Slow: ").as_bytes())
                    .await
                    .is_err()
                {
                    return Some(started.elapsed());
                }
                while started.elapsed() < hold {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    if s.write_all(b"a").await.is_err() {
                        return Some(started.elapsed());
                    }
                    // A closed connection reads 0 (or fails) at once.
                    let mut buf = [0u8; 1024];
                    match tokio::time::timeout(Duration::from_millis(1), s.read(&mut buf)).await {
                        Ok(Ok(0)) | Ok(Err(_)) => return Some(started.elapsed()),
                        Ok(Ok(_)) => {
                            // An answer (408/400) then a close: still a cut-off.
                            return Some(started.elapsed());
                        }
                        Err(_) => {}
                    }
                }
                None
            })
        })
        .collect();
    let mut closed = Vec::new();
    for s in slow {
        closed.push(s.await.unwrap());
    }
    legit.check_since("slow headers", from).await;
    let cut = closed.iter().filter(|c| c.is_some()).count();
    let latest = closed.iter().flatten().max().copied().unwrap_or_default();
    eprintln!(
        "[abuse] slow headers: {cut} of 200 connections cut off (latest after {latest:.2?}); timeout flag present: {timeout_flag}"
    );
    if cut_off_expected {
        assert_eq!(cut, 200, "slowloris connections left open for {hold:?}");
    } else {
        eprintln!(
            "[abuse] slow headers: the worker has no --header-read-timeout-ms; the 10 s default is checked by the long version"
        );
    }
    let answers = legit.stop().await;
    only_legit_granted(&mut con, &id, answers).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_bodies_bad_bytes_long_paths_and_odd_ids_get_a_4xx_or_a_close_while_grabs_go_on() {
    let (_server, mut con, id, worker) = setup(&[]).await;
    let port = worker.port;
    let legit = Legit::start(port, 4).await;
    let from = Instant::now();
    let json = "application/json";
    // Only bounds a hang: each of these is answered or closed at once.
    let quick = WITHIN;

    // 1 MB bodies: declared, and chunked (size only known while reading).
    let megabyte = vec![b'x'; 1 << 20];
    let declared = raw(port, &post(GRAB.as_bytes(), json, &megabyte), quick).await;
    let mut chunked = format!(
        "POST {GRAB} HTTP/1.1\r\nHost: x\r\nContent-Type: {json}\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
    )
    .into_bytes();
    for piece in megabyte.chunks(64 * 1024) {
        chunked.extend_from_slice(format!("{:x}\r\n", piece.len()).as_bytes());
        chunked.extend_from_slice(piece);
        chunked.extend_from_slice(b"\r\n");
    }
    chunked.extend_from_slice(b"0\r\n\r\n");
    let streamed = raw(port, &chunked, quick).await;
    for (what, a) in [("1 MB declared", &declared), ("1 MB chunked", &streamed)] {
        eprintln!(
            "[abuse] {what}: status {:?}, closed {}, after {:.2?}",
            a.status, a.closed, a.elapsed
        );
        assert!(
            a.status == Some(413) || (a.status.is_none() && a.closed),
            "{what}: {a:?}"
        );
    }

    // Requests that must each be refused with a 4xx (or a closed connection).
    let long_path = format!("/api/v1/promotions/shop/{}/grab", "a".repeat(100_000));
    let long_other = format!("/{}", "b".repeat(100_000));
    let body = |c: &str| format!(r#"{{"customerId":"{c}"}}"#).into_bytes();
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("invalid UTF-8 in the body", post(GRAB.as_bytes(), json, b"{\"customerId\":\"a\xff\xfe\"}")),
        ("invalid UTF-8 in the path", post(b"/api/v1/promotions/shop/sa\xffle/grab", json, &body("x1"))),
        ("100 KB name", post(long_path.as_bytes(), json, &body("x2"))),
        ("100 KB unknown path", post(long_other.as_bytes(), json, &body("x3"))),
        ("1 MB header", format!("GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\nConnection: close\r\n\r\n", "h".repeat(1 << 20)).into_bytes()),
        ("percent-encoded namespace", post(b"/api/v1/promotions/sh%6Fp/sale/grab", json, &body("x4"))),
        ("percent-encoded slash in the name", post(b"/api/v1/promotions/shop/sa%2Fle/grab", json, &body("x5"))),
        ("NUL percent-encoded in the name", post(b"/api/v1/promotions/shop/sale%00/grab", json, &body("x6"))),
        ("raw NUL in the path", post(b"/api/v1/promotions/shop/sa\0le/grab", json, &body("x7"))),
        ("unicode name", post("/api/v1/promotions/shop/säle/grab".as_bytes(), json, &body("x8"))),
        ("braces in the name", post(b"/api/v1/promotions/shop/{sale}/grab", json, &body("x9"))),
        ("dot-dot as the name", post(b"/api/v1/promotions/shop/../grab", json, &body("x10"))),
        ("dot-dot in the namespace", post(b"/api/v1/promotions/../sale/grab", json, &body("x11"))),
        ("empty namespace", post(b"/api/v1/promotions//sale/grab", json, &body("x12"))),
        ("three segments", post(b"/api/v1/promotions/shop/sale/x/grab", json, &body("x13"))),
        ("customer with braces", post(GRAB.as_bytes(), json, &body("{x14}"))),
        ("customer with NUL", post(GRAB.as_bytes(), json, br#"{"customerId":"x15\u0000"}"#)),
        ("customer unicode", post(GRAB.as_bytes(), json, "{\"customerId\":\"x16ü\"}".as_bytes())),
        ("customer unicode escaped", post(GRAB.as_bytes(), json, br#"{"customerId":"x17\u00fc"}"#)),
        ("customer percent-encoded", post(GRAB.as_bytes(), json, &body("x18%41"))),
        ("customer dot-dot path", post(GRAB.as_bytes(), json, &body("../../x19"))),
        ("customer with a space", post(GRAB.as_bytes(), json, &body("x 20"))),
        ("customer 65 characters", post(GRAB.as_bytes(), json, &body(&"x".repeat(65)))),
        ("customer 100 KB", post(GRAB.as_bytes(), json, &body(&"x".repeat(100_000)))),
        ("customer empty", post(GRAB.as_bytes(), json, &body(""))),
        ("customer a number", post(GRAB.as_bytes(), json, br#"{"customerId":21}"#)),
        ("customer lone surrogate", post(GRAB.as_bytes(), json, br#"{"customerId":"x22\ud800"}"#)),
        ("duplicate customerId keys", post(GRAB.as_bytes(), json, br#"{"customerId":"x23","customerId":"x24"}"#)),
        ("deeply nested JSON", post(GRAB.as_bytes(), json, format!("{}{}", "[".repeat(2000), "]".repeat(2000)).as_bytes())),
        ("form body", post(GRAB.as_bytes(), "application/x-www-form-urlencoded", b"customerId=x25")),
        ("garbage request line", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03 hello\r\n\r\n".to_vec()),
        ("HTTP/0.9 style", b"GET /healthz\r\n\r\n".to_vec()),
        ("bad Content-Length", format!("POST {GRAB} HTTP/1.1\r\nHost: x\r\nContent-Type: {json}\r\nContent-Length: -5\r\n\r\n").into_bytes()),
        ("two Content-Lengths", format!("POST {GRAB} HTTP/1.1\r\nHost: x\r\nContent-Type: {json}\r\nContent-Length: 3\r\nContent-Length: 20\r\n\r\n{{}}").into_bytes()),
    ];
    let mut refused = 0;
    for (what, bytes) in &cases {
        let a = raw(port, bytes, quick).await;
        eprintln!(
            "[abuse] {what}: status {:?}, closed {} after {:.2?}, body {:?}",
            a.status,
            a.closed,
            a.elapsed,
            a.body().chars().take(100).collect::<String>()
        );
        assert!(a.is_refusal(), "{what}: not refused: {a:?}");
        // When the worker's own handler answered, it is the JSON envelope.
        if let Some(status) = a.status {
            let body = a.body();
            if body.starts_with('{') {
                let v: serde_json::Value = serde_json::from_str(body)
                    .unwrap_or_else(|e| panic!("{what}: body is not JSON ({e}): {body}"));
                assert!(
                    v["error"].is_string() && v["message"].is_string(),
                    "{what}: {body}"
                );
            } else {
                assert!(
                    status == 400 || status == 414 || status == 431 || status == 408,
                    "{what}: {status} without the envelope"
                );
            }
        }
        refused += 1;
    }
    legit
        .check_since("bodies, bytes, paths and ids", from)
        .await;
    // The worker still answers a well-formed grab on a fresh connection.
    let ok = raw(
        port,
        &post(GRAB.as_bytes(), json, &body("legit-after")),
        quick,
    )
    .await;
    assert_eq!(ok.status, Some(200), "{ok:?}");
    let answers = legit.stop().await + 1;
    eprintln!("[abuse] {refused} abusive requests refused");
    only_legit_granted(&mut con, &id, answers).await;
}

/// 2,000 connections that never send a byte. With the worker's limits
/// (`--max-connections 1000 --header-read-timeout-ms 1000`, when it has
/// them) those past the limit are closed at once and the rest once the
/// header timeout passes, so a fresh customer is served again; customers
/// already connected are served throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_thousand_idle_connections_are_shed_and_legitimate_grabs_go_on() {
    let limits =
        worker_has_flag("--max-connections") && worker_has_flag("--header-read-timeout-ms");
    let extra: &[&str] = if limits {
        &[
            "--max-connections",
            "1000",
            "--header-read-timeout-ms",
            "1000",
        ]
    } else {
        &[]
    };
    let (_server, mut con, id, worker) = setup(extra).await;
    let port = worker.port;
    // The legitimate clients connect first, as customers already shopping.
    let legit = Legit::start(port, 4).await;
    let from = Instant::now();
    let idle_count = 2000;
    let mut idle = Vec::with_capacity(idle_count);
    for _ in 0..idle_count {
        match TcpStream::connect(("127.0.0.1", port)).await {
            Ok(s) => idle.push(s),
            Err(e) => panic!("connect failed after {} idle connections: {e}", idle.len()),
        }
    }
    legit.check_since("2,000 idle connections", from).await;

    // The worker closes the idle connections: those past the limit at once,
    // the rest once the header timeout passed. (Without the limits, how
    // many it closed by now is only reported.)
    let mut closed = vec![false; idle_count];
    let mut count_closed = || {
        for (s, c) in idle.iter().zip(closed.iter_mut()) {
            *c = *c || closed_by_peer(s);
        }
        closed.iter().filter(|c| **c).count()
    };
    let closed = if limits {
        eventually(WITHIN, || {
            let n = count_closed();
            async move { (n == idle_count).then_some(n).ok_or(n) }
        })
        .await
    } else {
        count_closed()
    };
    eprintln!(
        "[abuse] {closed} of {idle_count} idle connections closed by the worker after {:.2?} (limits set: {limits})",
        from.elapsed()
    );
    // A new customer on a fresh connection is served, the idle ones still open.
    let fresh = raw(
        port,
        &post(
            GRAB.as_bytes(),
            "application/json",
            br#"{"customerId":"legit-fresh"}"#,
        ),
        WITHIN,
    )
    .await;
    eprintln!(
        "[abuse] a fresh customer beside the idle connections: {:?}",
        fresh.status
    );
    assert_eq!(fresh.status, Some(200), "{fresh:?}");
    drop(idle);
    let answers = legit.stop().await + 1;
    only_legit_granted(&mut con, &id, answers).await;
}

/// The request head is bounded (16 KiB): a grab with a 64 KiB header is
/// answered 431 and the connection closed, without a grant; one whose head
/// fits is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grab_with_a_64_kib_header_is_431_and_grants_nothing_while_one_that_fits_is_served() {
    let (_server, mut con, id, worker) = setup(&[]).await;
    let port = worker.port;
    let grab = |customer: &str, header_bytes: usize| {
        let body = format!(r#"{{"customerId":"{customer}"}}"#);
        format!(
            "POST {GRAB} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nX-Big: {}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            "h".repeat(header_bytes),
            body.len()
        )
        .into_bytes()
    };
    // (A guard against a hang, not a bound: the 431 closes at once.)
    let big = raw(
        port,
        &grab("big-header", 64 * 1024),
        Duration::from_secs(60),
    )
    .await;
    eprintln!(
        "[abuse] 64 KiB header: status {:?}, closed {}",
        big.status, big.closed
    );
    assert_eq!(big.status, Some(431), "{big:?}");
    assert!(big.closed, "{big:?}");
    let fits = raw(port, &grab("legit-15k", 15 * 1024), Duration::from_secs(60)).await;
    assert_eq!(fits.status, Some(200), "{fits:?}");
    only_legit_granted(&mut con, &id, 1).await;
    assert_eq!(
        grants_of(&mut con, &id)
            .await
            .into_iter()
            .map(|g| g.customer_id)
            .collect::<Vec<_>>(),
        vec!["legit-15k".to_owned()]
    );
}
