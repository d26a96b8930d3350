//! The binaries under test as child processes: where cargo put them, how a
//! test skews their wall clock (libfaketime), how it signals them.

use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

use crate::eventually::eventually;

/// `seckill-worker` (package `seckill-workers`).
pub const WORKER: &str = "seckill-worker";
/// `seckill` (package `seckill-cli`).
pub const SECKILL: &str = "seckill";
/// `seckill-operator` (package `seckill-operator`).
pub const OPERATOR: &str = "seckill-operator";

/// The path of binary `name` of the package whose integration tests run.
///
/// Cargo builds a package's binaries before its integration tests, next to
/// the `deps/` directory holding the test executable; that is where this
/// looks (cargo's own `CARGO_BIN_EXE_<name>` first, when it is set at run
/// time). A test may only ask for a binary of its own package: another
/// package's may be missing or stale.
pub fn binary(name: &str) -> PathBuf {
    if let Some(path) = std::env::var_os(format!("CARGO_BIN_EXE_{name}")) {
        return PathBuf::from(path);
    }
    let exe = std::env::current_exe().expect("the test executable's path");
    let dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("the test executable is in target/<profile>/deps");
    let path = dir.join(format!("{name}{}", std::env::consts::EXE_SUFFIX));
    assert!(
        path.exists(),
        "{} is not built; only a test of the package that owns {name} may run it",
        path.display()
    );
    path
}

/// libfaketime's preload library (Debian package `faketime`).
pub fn libfaketime() -> PathBuf {
    let mut candidates = vec![PathBuf::from("/usr/lib/faketime/libfaketime.so.1")];
    if let Ok(dirs) = std::fs::read_dir("/usr/lib") {
        for d in dirs.flatten() {
            candidates.push(d.path().join("faketime/libfaketime.so.1"));
        }
    }
    candidates.into_iter().find(|p| p.exists()).expect(
        "libfaketime is not installed: apt-get install faketime (scripts/install-deps.sh redis)",
    )
}

/// Runs `command` with its wall clock shifted by `skew` (libfaketime syntax,
/// e.g. `+5m`), the library preloaded directly (the `faketime` wrapper would
/// stay the parent, and killing it would orphan the process). Timers keep
/// real time: only the wall clock moves.
pub fn skew_clock(command: &mut Command, skew: &str) {
    command
        .env("LD_PRELOAD", libfaketime())
        .env("FAKETIME", skew)
        .env("FAKETIME_DONT_FAKE_MONOTONIC", "1");
}

/// `kill -<sig> <pid>`; panics when the signal could not be delivered.
pub fn signal(pid: u32, sig: &str) {
    assert!(try_signal(pid, sig), "kill -{sig} {pid}");
}

/// `kill -<sig> <pid>`: whether it was delivered (a process already gone
/// is not an error here, as in a `Drop`).
pub fn try_signal(pid: u32, sig: &str) -> bool {
    Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// The processes whose parent is `pid` (from /proc): what a process killed
/// with SIGKILL leaves behind, such as `seckill up`'s private redis-server.
pub fn children(pid: u32) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&child| {
            std::fs::read_to_string(format!("/proc/{child}/stat"))
                .ok()
                // "pid (comm) state ppid ...": comm may hold spaces, so
                // the fields are counted after its closing parenthesis.
                .and_then(|stat| {
                    let rest = &stat[stat.rfind(')')? + 1..];
                    rest.split_whitespace().nth(1)?.parse::<u32>().ok()
                })
                == Some(pid)
        })
        .collect()
}

/// Waits for `child` to exit by itself (`within` bounds a hang).
pub async fn wait_exit(child: &mut Child, within: Duration) -> ExitStatus {
    eventually(within, || {
        let status = child.try_wait();
        async move {
            match status {
                Ok(Some(status)) => Ok(status),
                other => Err(format!("still running: {other:?}")),
            }
        }
    })
    .await
}

/// True for the long versions of the fault tests (`SECKILL_FAULTS_LONG=1`,
/// used by `make faults`).
pub fn long() -> bool {
    std::env::var("SECKILL_FAULTS_LONG").is_ok_and(|v| v == "1")
}

/// Bytes that arrived on sockets bound to local `port` and that the process
/// behind them has not read yet (the receive queues of /proc/net/tcp and
/// tcp6): what a stopped server holds unanswered.
pub fn unread_bytes(port: u16) -> u64 {
    ["/proc/net/tcp", "/proc/net/tcp6"]
        .iter()
        .filter_map(|table| std::fs::read_to_string(table).ok())
        .flat_map(|text| {
            text.lines()
                .skip(1)
                .filter_map(|line| {
                    let fields: Vec<&str> = line.split_whitespace().collect();
                    let local_port = fields.get(1)?.rsplit(':').next()?;
                    let rx_queue = fields.get(4)?.split(':').nth(1)?;
                    (u16::from_str_radix(local_port, 16).ok()? == port)
                        .then(|| u64::from_str_radix(rx_queue, 16).ok())
                        .flatten()
                })
                .collect::<Vec<_>>()
        })
        .sum()
}
