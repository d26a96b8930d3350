//! A real `seckill up` child process whose output lines are collected, killed
//! when dropped; for the tests of `seckill-cli`, whose binary it is.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use seckill_workers::redis_server::free_port;

use crate::client::{self, Reply};
use crate::eventually::eventually;
use crate::process::{self, SECKILL};

/// How long `seckill up` may take to report ready, or to say a line a test
/// waits for, before the test fails.
pub const WITHIN: Duration = Duration::from_secs(30);

/// A running `seckill up` whose stdout lines are collected; killed when
/// dropped.
pub struct Up {
    pub child: Child,
    /// Its `--listen` port.
    pub port: u16,
    lines: Arc<Mutex<Vec<String>>>,
    /// Processes it started that a kill -9 left running (see [`Up::kill9`]).
    private_redis: Vec<u32>,
}

impl Up {
    /// `seckill up --listen 127.0.0.1:<free port> --watch-interval-ms 100
    /// <args>`, its wall clock skewed by `skew` when given (see
    /// [`process::skew_clock`]), `RUST_LOG=warn`; stderr is the test's.
    /// Does not wait for it: see [`Up::ready`].
    pub fn spawn(args: &[&str], skew: Option<&str>) -> Self {
        let port = free_port().expect("a free port");
        let mut command = Command::new(process::binary(SECKILL));
        command
            .args(["up", "--listen", &format!("127.0.0.1:{port}")])
            .args(["--watch-interval-ms", "100"])
            .args(args)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        if let Some(skew) = skew {
            process::skew_clock(&mut command, skew);
        }
        let mut child = command.spawn().expect("seckill up starts");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let out = child.stdout.take().expect("piped stdout");
        let sink = lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                sink.lock().unwrap_or_else(|e| e.into_inner()).push(line);
            }
        });
        Self {
            child,
            port,
            lines,
            private_redis: Vec::new(),
        }
    }

    /// [`Up::spawn`], then waits until it reports ready.
    pub async fn start(args: &[&str], skew: Option<&str>) -> Self {
        let up = Self::spawn(args, skew);
        up.ready().await;
        up
    }

    /// Waits until /readyz answers 200 (Redis reached, the listener up).
    pub async fn ready(&self) {
        let port = self.port;
        let lines = self.lines.clone();
        eventually(WITHIN, || {
            let lines = lines.clone();
            async move {
                match client::get(port, "/readyz").await {
                    Ok(r) if r.status == 200 => Ok(()),
                    other => Err(format!(
                        "/readyz: {:?}; seckill up said:\n{}",
                        other.map(|r| r.status),
                        lines.lock().unwrap_or_else(|e| e.into_inner()).join("\n")
                    )),
                }
            }
        })
        .await;
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// `GET path` on its listener.
    pub async fn get(&self, path: &str) -> Reply {
        client::get(self.port, path)
            .await
            .expect("seckill up answers")
    }

    /// Everything it printed so far.
    pub fn output(&self) -> String {
        self.lines
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .join("\n")
    }

    /// Whether a line it printed contains `text`.
    pub fn said(&self, text: &str) -> bool {
        self.lines
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .any(|l| l.contains(text))
    }

    /// Waits until a line it printed contains `text`.
    pub async fn wait_said(&self, text: &str) {
        eventually(WITHIN, || async {
            if self.said(text) {
                Ok(())
            } else {
                Err(format!(
                    "no line with {text:?}; it said:\n{}",
                    self.output()
                ))
            }
        })
        .await;
    }

    /// kill -9, and reap. Its private redis-server, if it runs one, is
    /// left running, as after a real crash; [`Drop`] kills it.
    pub fn kill9(&mut self) {
        self.private_redis
            .extend(process::children(self.child.id()));
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, then the exit status.
    pub async fn stop(mut self) -> ExitStatus {
        process::signal(self.child.id(), "TERM");
        process::wait_exit(&mut self.child, WITHIN).await
    }
}

impl Drop for Up {
    /// kill -9 of the process and of what it started (its private
    /// redis-server would otherwise outlive the test).
    fn drop(&mut self) {
        self.private_redis
            .extend(process::children(self.child.id()));
        let _ = self.child.kill();
        let _ = self.child.wait();
        for pid in self.private_redis.drain(..) {
            process::try_signal(pid, "KILL");
        }
    }
}
