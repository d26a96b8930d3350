//! A private `redis-server` child process on a free loopback port, in a data
//! directory of its own. `seckill up` runs one when no `--redis-url` is given,
//! and every test starts its own (tests may kill, stop or restart it).

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Why the server could not be started.
#[derive(Debug, thiserror::Error)]
pub enum RedisServerError {
    #[error(
        "redis-server is not installed; install it with `sudo apt-get install redis-server` \
         (Debian/Ubuntu) or `brew install redis` (macOS), or pass --redis-url"
    )]
    NotInstalled,
    #[error("could not start redis-server: {0}")]
    Io(#[from] std::io::Error),
    #[error("redis-server did not accept connections on port {port} within {waited:?}: {log}")]
    NotReady {
        port: u16,
        waited: Duration,
        log: String,
    },
}

/// `appendfsync` policy of the AOF.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fsync {
    Always,
    EverySec,
    No,
}

impl Fsync {
    /// The policy as redis.conf spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Always => "always",
            Self::EverySec => "everysec",
            Self::No => "no",
        }
    }
}

/// How to run the server.
#[derive(Debug, Clone)]
pub struct RedisServerOptions {
    /// AOF on with this policy, or off.
    pub appendfsync: Option<Fsync>,
    /// Data directory; a fresh temporary one when `None`.
    pub dir: Option<PathBuf>,
    /// Further `--name value` arguments, e.g. `("requirepass", "secret")`.
    pub extra: Vec<(String, String)>,
    /// Serve TLS only (no plain port) with these PEM files.
    pub tls: Option<TlsFiles>,
}

/// PEM files of a TLS-only server.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub ca: PathBuf,
}

impl Default for RedisServerOptions {
    fn default() -> Self {
        Self {
            appendfsync: Some(Fsync::EverySec),
            dir: None,
            extra: Vec::new(),
            tls: None,
        }
    }
}

/// A running `redis-server`; killed when dropped.
pub struct RedisServer {
    child: Option<Child>,
    port: u16,
    dir: PathBuf,
    _tempdir: Option<tempfile::TempDir>,
    options: RedisServerOptions,
}

/// A free TCP port on loopback (bound then released).
pub fn free_port() -> std::io::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

impl RedisServer {
    /// Starts a server on a free loopback port and waits until it answers.
    pub fn start(options: RedisServerOptions) -> Result<Self, RedisServerError> {
        let (dir, tempdir) = match &options.dir {
            Some(d) => {
                std::fs::create_dir_all(d)?;
                (d.clone(), None)
            }
            None => {
                let t = tempfile::Builder::new()
                    .prefix("seckill-redis-")
                    .tempdir()?;
                (t.path().to_path_buf(), Some(t))
            }
        };
        let mut server = Self {
            child: None,
            port: 0,
            dir,
            _tempdir: tempdir,
            options,
        };
        // A port found free may be taken by the time redis binds it: retry.
        let mut last = None;
        for _ in 0..5 {
            server.port = free_port()?;
            match server.spawn() {
                Ok(()) => return Ok(server),
                Err(e @ RedisServerError::NotInstalled) => return Err(e),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or(RedisServerError::NotInstalled))
    }

    fn spawn(&mut self) -> Result<(), RedisServerError> {
        let log = self.dir.join("redis.log");
        // Keep the previous run's log aside so readiness is read from this run.
        if log.exists() {
            std::fs::rename(&log, self.dir.join("redis.log.1"))?;
        }
        let mut cmd = Command::new("redis-server");
        match &self.options.tls {
            None => cmd.arg("--port").arg(self.port.to_string()),
            Some(tls) => cmd
                .args(["--port", "0", "--tls-port"])
                .arg(self.port.to_string())
                .arg("--tls-cert-file")
                .arg(&tls.cert)
                .arg("--tls-key-file")
                .arg(&tls.key)
                .arg("--tls-ca-cert-file")
                .arg(&tls.ca)
                .args(["--tls-auth-clients", "no"]),
        };
        cmd.args(["--bind", "127.0.0.1", "--save", "", "--daemonize", "no"])
            .arg("--dir")
            .arg(&self.dir)
            .arg("--logfile")
            .arg(&log);
        match self.options.appendfsync {
            Some(p) => cmd.args(["--appendonly", "yes", "--appendfsync", p.as_str()]),
            None => cmd.args(["--appendonly", "no"]),
        };
        for (k, v) in &self.options.extra {
            cmd.arg(format!("--{k}")).arg(v);
        }
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let child = cmd.spawn().map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                RedisServerError::NotInstalled
            } else {
                RedisServerError::Io(e)
            }
        })?;
        self.child = Some(child);
        let started = Instant::now();
        let waited = Duration::from_secs(10);
        while started.elapsed() < waited {
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(_)) = child.try_wait() {
                    break;
                }
            }
            if std::fs::read_to_string(&log)
                .map(|l| l.contains("Ready to accept connections"))
                .unwrap_or(false)
            {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.kill();
        Err(RedisServerError::NotReady {
            port: self.port,
            waited,
            log: std::fs::read_to_string(&log)
                .unwrap_or_default()
                .lines()
                .rev()
                .take(5)
                .collect::<Vec<_>>()
                .join(" | "),
        })
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `redis://127.0.0.1:PORT/` (`rediss://` for TLS), with the password
    /// when `requirepass` is set.
    pub fn url(&self) -> String {
        let scheme = if self.options.tls.is_some() {
            "rediss"
        } else {
            "redis"
        };
        match self.options.extra.iter().find(|(k, _)| k == "requirepass") {
            Some((_, pass)) => format!("{scheme}://:{pass}@127.0.0.1:{}/", self.port),
            None => format!("{scheme}://127.0.0.1:{}/", self.port),
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    fn signal(&self, sig: &str) {
        if let Some(pid) = self.pid() {
            let _ = Command::new("kill")
                .arg(format!("-{sig}"))
                .arg(pid.to_string())
                .status();
        }
    }

    /// kill -9: no shutdown, no final fsync.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGSTOP: the process stalls, connections stay open.
    pub fn pause(&self) {
        self.signal("STOP");
    }

    /// SIGCONT after [`pause`](Self::pause).
    pub fn resume(&self) {
        self.signal("CONT");
    }

    /// Graceful stop (SIGTERM), as an orderly shutdown would.
    pub fn stop(&mut self) {
        self.signal("TERM");
        if let Some(mut child) = self.child.take() {
            let _ = child.wait();
        }
    }

    /// Starts the server again on the same port and data directory (the AOF
    /// is replayed). Retries while the old socket is still being released.
    pub fn restart(&mut self) -> Result<(), RedisServerError> {
        self.kill();
        let mut last = None;
        for _ in 0..20 {
            match self.spawn() {
                Ok(()) => return Ok(()),
                Err(e) => last = Some(e),
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Err(last.unwrap_or(RedisServerError::NotInstalled))
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.resume();
        self.kill();
    }
}
