//! What the integration tests of `seckill-operator` share: a `seckill up`
//! child process whose output lines are collected.
//!
//! Every test file compiles this module on its own (`mod support;`) and uses
//! only part of it, hence the `dead_code` allowance. A test file adds the
//! methods only it needs in an `impl Up` block of its own.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};

pub const SECKILL: &str = env!("CARGO_BIN_EXE_seckill");

/// A running `seckill up` whose stdout lines are collected; killed when
/// dropped.
pub struct Up {
    pub child: Child,
    /// Its `--listen` port.
    pub port: u16,
    lines: Arc<Mutex<Vec<String>>>,
}

impl Up {
    /// Spawns `command` (a `seckill up` listening on `port`) with its
    /// stdout piped into the collected lines.
    pub fn spawn(mut command: Command, port: u16) -> Self {
        let mut child = command
            .stdout(Stdio::piped())
            .spawn()
            .expect("seckill up starts");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let out = child.stdout.take().unwrap();
        let sink = lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                sink.lock().unwrap().push(line);
            }
        });
        Self { child, port, lines }
    }

    /// Everything it printed so far.
    pub fn output(&self) -> String {
        self.lines.lock().unwrap().join("\n")
    }

    /// Whether a line it printed contains `text`.
    pub fn said(&self, text: &str) -> bool {
        self.lines.lock().unwrap().iter().any(|l| l.contains(text))
    }

    /// kill -9, and reap.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Up {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
