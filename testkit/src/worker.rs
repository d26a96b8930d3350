//! A real `seckill-worker` child process (command, query or projector) on a
//! free port, killed when dropped; for the tests of `seckill-workers`, whose
//! binary it is.

use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

use seckill_workers::redis_server::free_port;

use crate::client::{self, Reply};
use crate::eventually::eventually;
use crate::process::{self, WORKER};

/// How long a worker may take to report ready before the test fails.
pub const READY_WITHIN: Duration = Duration::from_secs(30);

/// A `seckill-worker` child process; killed when dropped, even when a test
/// left it stopped.
pub struct Worker {
    pub child: Child,
    /// Its HTTP port (the API of a command worker, the metrics of a projector).
    pub port: u16,
}

/// How [`Worker::command_with`] starts a command worker.
pub struct CommandOptions<'a> {
    /// `RUST_LOG` of the worker.
    pub log: &'a str,
    /// `--redis-timeout-ms` unless the extra arguments give one.
    pub redis_timeout_ms: Option<&'a str>,
    /// A wall-clock skew for libfaketime (e.g. `+5m`).
    pub skew: Option<&'a str>,
}

impl Default for CommandOptions<'_> {
    /// `RUST_LOG=warn`, a 5 s Redis timeout, no skew. The timeout is longer
    /// than a worker's default second: on a busy machine a grab may take
    /// that long, and a test expecting 200 must not get a 503 for it; a
    /// test about a stalled Redis asks for a short one.
    fn default() -> Self {
        Self {
            log: "warn",
            redis_timeout_ms: Some("5000"),
            skew: None,
        }
    }
}

impl Worker {
    /// Spawns `seckill-worker args` serving on `port`, with `RUST_LOG=log`
    /// when given (else the test's own) and its wall clock skewed by `skew`
    /// (see [`process::skew_clock`]). Does not wait for it.
    pub fn spawn(args: &[&str], log: Option<&str>, skew: Option<&str>, port: u16) -> Self {
        let mut command = Command::new(process::binary(WORKER));
        if let Some(skew) = skew {
            process::skew_clock(&mut command, skew);
        }
        if let Some(log) = log {
            command.env("RUST_LOG", log);
        }
        let child = command
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("seckill-worker starts");
        Self { child, port }
    }

    /// `seckill-worker command` on a free port with the default
    /// [`CommandOptions`]; returns once it reports ready.
    pub async fn command(redis_url: &str, extra: &[&str]) -> Self {
        Self::command_with(redis_url, extra, CommandOptions::default()).await
    }

    /// `seckill-worker command --redis-url <redis_url> <extra>` on a free
    /// port; returns once /readyz answers 200.
    pub async fn command_with(
        redis_url: &str,
        extra: &[&str],
        options: CommandOptions<'_>,
    ) -> Self {
        let mut args = vec!["--redis-url", redis_url];
        if let Some(timeout) = options.redis_timeout_ms {
            if !extra.contains(&"--redis-timeout-ms") {
                args.extend(["--redis-timeout-ms", timeout]);
            }
        }
        args.extend(extra);
        Self::serving("command", &args, Some(options.log), options.skew).await
    }

    /// `seckill-worker <role> --listen 127.0.0.1:<free port> <args>`;
    /// returns once /readyz answers 200.
    pub async fn serving(role: &str, args: &[&str], log: Option<&str>, skew: Option<&str>) -> Self {
        let port = free_port().expect("a free port");
        let listen = format!("127.0.0.1:{port}");
        let mut all = vec![role, "--listen", &listen];
        all.extend(args);
        let worker = Self::spawn(&all, log, skew, port);
        worker.ready().await;
        worker
    }

    /// `seckill-worker projector --redis-url <url> --consumer-name
    /// <consumer> <extra>`, metrics on a free port, `RUST_LOG` from
    /// `SECKILL_TEST_PROJECTOR_LOG` (default `warn`: set it to see what a
    /// projector did in a failing test). Does not wait for it.
    pub fn projector(redis_url: &str, consumer: &str, extra: &[&str]) -> Self {
        let port = free_port().expect("a free port");
        let metrics = format!("127.0.0.1:{port}");
        let mut args = vec![
            "projector",
            "--redis-url",
            redis_url,
            "--consumer-name",
            consumer,
            "--metrics-listen",
            &metrics,
            "--redis-timeout-ms",
            "1000",
        ];
        args.extend(extra);
        let log = std::env::var("SECKILL_TEST_PROJECTOR_LOG").unwrap_or_else(|_| "warn".into());
        Self::spawn(&args, Some(&log), None, port)
    }

    /// Waits until /readyz answers 200 (the worker reached Redis).
    pub async fn ready(&self) {
        let port = self.port;
        eventually(READY_WITHIN, || async move {
            match client::get(port, "/readyz").await {
                Ok(r) if r.status == 200 => Ok(()),
                Ok(r) => Err(format!("/readyz on {port}: {}", r.status)),
                Err(e) => Err(format!("/readyz on {port}: {e}")),
            }
        })
        .await;
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// `kill -<sig>`; the signal must be delivered.
    pub fn signal(&self, sig: &str) {
        process::signal(self.pid(), sig);
    }

    /// kill -9, and reap.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Waits for the process to exit by itself (`within` bounds a hang).
    pub async fn wait_exit(&mut self, within: Duration) -> ExitStatus {
        process::wait_exit(&mut self.child, within).await
    }

    /// `POST /api/v1/promotions/{ns}/{name}/grab` as `customer` (JSON body).
    pub async fn grab(&self, ns: &str, name: &str, customer: &str) -> Reply {
        self.grab_with_headers(ns, name, customer, &[]).await
    }

    /// [`Worker::grab`] with more request headers.
    pub async fn grab_with_headers(
        &self,
        ns: &str,
        name: &str,
        customer: &str,
        headers: &[(&str, &str)],
    ) -> Reply {
        let mut all = vec![("content-type", client::JSON)];
        all.extend_from_slice(headers);
        client::call(
            self.port,
            "POST",
            &client::grab_path(ns, name),
            &all,
            client::body(customer),
        )
        .await
        .expect("worker answers")
    }

    /// The Prometheus exposition of its `/metrics`.
    pub async fn metrics(&self) -> String {
        client::metrics_of(self.port).await
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            // A stopped process dies of SIGKILL only once continued.
            process::try_signal(self.child.id(), "CONT");
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
