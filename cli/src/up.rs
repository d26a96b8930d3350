//! `seckill up`: the whole system in one process, without Kubernetes. The
//! operator's reconcile core drives the promotions declared in manifest
//! files; command, query and projector workers serve the HTTP API from one
//! listener. Without `--redis-url` a private `redis-server` (AOF on) is
//! started and stopped with it.

use std::collections::{BTreeMap, HashMap};
use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use seckill_operator::controller::ShardRunArgs;
use seckill_operator::lifecycle::{self, Driven, ShardSettings};
use seckill_operator::metrics::Metrics as OperatorMetrics;
use seckill_operator::promotion::PromotionStatus;
use seckill_workers::command::{CommandApi, CommandOptions, GrabBatchArgs, ShardGrabArgs};
use seckill_workers::http::customer_header::CustomerIdHeaderArgs;
use seckill_workers::http::{self, Apis, HealthApi, ServerLimitArgs};
use seckill_workers::metrics::{CommandMetrics, WorkerMetrics};
use seckill_workers::projector::{Projector, ProjectorMetrics, ProjectorOptions};
use seckill_workers::protocol::{self, PromotionId};
use seckill_workers::query::{QueryApi, QueryOptions};
use seckill_workers::rate_limit::RateLimitArgs;
use seckill_workers::redis_connection::{DurableArgs, RedisArgs, RedisConnection};
use seckill_workers::redis_server::{Fsync, RedisServer, RedisServerOptions};
use tokio_util::sync::CancellationToken;

use crate::manifests::{self, Declared};

/// A part of the system `seckill up` can run.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The operator's reconcile core, on the manifest files.
    Operator,
    /// The grab endpoint.
    Command,
    /// The query endpoints.
    Query,
    /// The projector, into the read models.
    Projector,
}

impl std::fmt::Display for Role {
    /// Its name, as `--roles` spells it.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        use clap::ValueEnum;
        match self.to_possible_value() {
            Some(value) => f.write_str(value.get_name()),
            None => write!(f, "{self:?}"),
        }
    }
}

/// Flags of `seckill up`.
#[derive(clap::Args, Debug, Clone)]
pub struct UpArgs {
    /// Promotion manifest files or directories (read one level deep); repeatable.
    #[arg(short = 'f', long = "file", value_name = "FILE_OR_DIR")]
    pub files: Vec<PathBuf>,

    /// Address of the HTTP API, /healthz, /readyz and /metrics.
    #[arg(long, env = "SECKILL_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: String,

    /// Parts to run here, comma-separated.
    #[arg(
        long,
        env = "SECKILL_ROLES",
        value_enum,
        value_delimiter = ',',
        default_value = "operator,command,query,projector"
    )]
    pub roles: Vec<Role>,

    /// Data directory of the private redis-server (default: a new one under
    /// the system's temporary directory). Unused with --redis-url.
    #[arg(long, env = "SECKILL_DATA_DIR")]
    pub data_dir: Option<PathBuf>,

    #[command(flatten)]
    pub customer: CustomerIdHeaderArgs,

    /// How often manifest files are checked for changes, in milliseconds; a
    /// changed file is read once it stood still for one interval.
    #[arg(long, default_value_t = 500)]
    pub watch_interval_ms: u64,

    #[command(flatten)]
    pub redis: RedisArgs,

    #[command(flatten)]
    pub rate_limit: RateLimitArgs,

    #[command(flatten)]
    pub durable: DurableArgs,

    /// Sharded promotions (`spec.shards` > 1): their steps are durable as
    /// grabs are (--durable-replicas); with the private redis-server,
    /// --shards-without-replicas-needs-fsync-always also runs it with
    /// `appendfsync always`, which makes that acknowledgement true.
    #[command(flatten)]
    pub shards: ShardRunArgs,

    #[command(flatten)]
    pub batch: GrabBatchArgs,

    #[command(flatten)]
    pub shard_grabs: ShardGrabArgs,

    #[command(flatten)]
    pub limits: ServerLimitArgs,
}

/// `seckill up` could not run.
#[derive(Debug, thiserror::Error)]
pub enum UpError {
    #[error(transparent)]
    RedisServer(#[from] seckill_workers::redis_server::RedisServerError),
    #[error(transparent)]
    Redis(#[from] seckill_workers::redis_connection::RedisSetupError),
    #[error(transparent)]
    Http(#[from] http::HttpError),
    #[error(transparent)]
    Command(#[from] seckill_workers::command::CommandError),
    #[error(transparent)]
    Durable(#[from] seckill_workers::redis_connection::DurableTimeoutError),
    #[error("cannot create the data directory {path:?}: {source}")]
    DataDir {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// One promotion the operator core looks after.
struct Tracked {
    declared: Declared,
    generation: i64,
    status: Option<PromotionStatus>,
    due: Instant,
}

/// Where lines for people go: a live table on a terminal keeps the last
/// few, plain output prints them as they come.
struct Board {
    live: bool,
    recent: Vec<String>,
}

impl Board {
    fn say(&mut self, line: String) {
        if self.live {
            self.recent.push(line);
            let excess = self.recent.len().saturating_sub(8);
            self.recent.drain(..excess);
        } else {
            println!("{line}");
        }
    }
}

fn stamp() -> String {
    chrono::Utc::now().format("%H:%M:%S").to_string()
}

pub async fn run(args: UpArgs) -> Result<(), UpError> {
    let has = |r: Role| args.roles.contains(&r);
    let live = std::io::stdout().is_terminal();
    let mut board = Board {
        live,
        recent: Vec::new(),
    };

    // Redis: the one given, or a private one.
    let mut private = None;
    let redis_args = if args.redis.redis_url.is_none() && args.redis.redis_cluster_nodes.is_empty()
    {
        let dir = match &args.data_dir {
            Some(d) => d.clone(),
            None => std::env::temp_dir().join(format!("seckill-up-{}", std::process::id())),
        };
        std::fs::create_dir_all(&dir).map_err(|source| UpError::DataDir {
            path: dir.clone(),
            source,
        })?;
        let fsync = if args.shards.shards_without_replicas_needs_fsync_always {
            Fsync::Always
        } else {
            Fsync::EverySec
        };
        let server = RedisServer::start(RedisServerOptions {
            appendfsync: Some(fsync),
            dir: Some(dir.clone()),
            ..RedisServerOptions::default()
        })?;
        println!(
            "{} private redis-server on 127.0.0.1:{} (AOF on, appendfsync {}), data directory {}",
            stamp(),
            server.port(),
            fsync.as_str(),
            dir.display()
        );
        let redis = RedisArgs {
            redis_url: Some(server.url()),
            ..args.redis.clone()
        };
        private = Some(server);
        redis
    } else {
        println!("{} using Redis at {}", stamp(), args.redis.describe());
        args.redis.clone()
    };
    let redis = redis_args.connect()?;
    seckill_workers::protocol::functions::load_at_setup(redis.clone());
    let read_models = redis_args.connect_read_models()?;
    let timeout = redis_args.timeout();
    let shutdown = http::shutdown_on_signal();
    let metrics = WorkerMetrics::new();
    // The operator role reports as the operator does (seckill_operator_*),
    // leading for as long as it runs: it is the only one reconciling.
    let operator_metrics =
        has(Role::Operator).then(|| OperatorMetrics::register(&metrics.registry));
    let _leading = operator_metrics.as_ref().map(OperatorMetrics::leading);
    let mut tasks = Vec::new();

    // HTTP: command and query APIs with health and metrics.
    let header = args.customer.customer_id_header.clone();
    let command = if has(Role::Command) {
        let options = CommandOptions {
            customer_id_header: header.clone(),
            redis_timeout: timeout,
            durability: args.durable.durability(timeout)?,
            batch_max: args.batch.grab_batch_max as usize,
            finish_skew_wait: args.shard_grabs.finish_skew_wait(),
        };
        Some(
            CommandApi::new(redis.clone(), options)
                .with_rate_limit(&args.rate_limit)
                .with_metrics(
                    metrics.redis.clone(),
                    CommandMetrics::register(&metrics.registry),
                ),
        )
    } else {
        None
    };
    let query = has(Role::Query).then(|| {
        let options = QueryOptions {
            customer_id_header: header,
            redis_timeout: timeout,
        };
        QueryApi::new(read_models.clone(), options).with_redis_metrics(metrics.redis.clone())
    });
    let listener = http::bind(&args.listen).await?;
    println!(
        "{} serving {} on http://{} (/healthz, /readyz, /metrics)",
        stamp(),
        args.roles
            .iter()
            .map(Role::to_string)
            .collect::<Vec<_>>()
            .join(", "),
        args.listen
    );
    let health = HealthApi::new(redis.clone(), timeout, metrics.registry.clone())
        .with_redis_metrics(metrics.redis.clone());
    {
        let shutdown = shutdown.clone();
        let limits = args
            .limits
            .limits(Duration::from_secs(5), Some(metrics.http.clone()));
        let app = Apis {
            command,
            query,
            health,
        }
        .router(&limits);
        tasks.push(tokio::spawn(async move {
            if let Err(e) = http::serve(listener, app, &limits, shutdown).await {
                tracing::error!(error = %e, "HTTP server stopped");
            }
        }));
    }

    if has(Role::Projector) {
        let projector = Projector::new(
            redis.clone(),
            read_models.clone(),
            ProjectorOptions::new(format!("seckill-up-{}", std::process::id())),
            ProjectorMetrics::register(&metrics.registry),
        );
        let shutdown = shutdown.clone();
        tasks.push(tokio::spawn(projector.run(shutdown)));
    }

    let shards = args.shards.settings(args.durable.durability(timeout)?);
    operate(
        &args,
        &shards,
        operator_metrics.as_ref(),
        redis.clone(),
        &mut board,
        shutdown.clone(),
    )
    .await;

    for t in tasks {
        let _ = t.await;
    }
    if live {
        println!();
    }
    if let Some(mut server) = private {
        server.stop();
        println!(
            "{} stopped; the private Redis data (AOF) stays in {}",
            stamp(),
            server.dir().display()
        );
    } else {
        println!("{} stopped", stamp());
    }
    Ok(())
}

/// The operator core on manifest files (when `operator` holds its metrics),
/// plus the table: runs until shutdown.
async fn operate(
    args: &UpArgs,
    shards: &ShardSettings,
    operator: Option<&OperatorMetrics>,
    mut redis: RedisConnection,
    board: &mut Board,
    shutdown: CancellationToken,
) {
    let watch = Duration::from_millis(args.watch_interval_ms.max(50));
    // The files as last read, and as they looked at the previous check.
    let mut fingerprint = None;
    let mut looked = None;
    let mut tracked: BTreeMap<PromotionId, Tracked> = BTreeMap::new();
    let mut rates: HashMap<PromotionId, (Instant, u64, f64)> = HashMap::new();
    let mut last_files = Instant::now() - watch;
    let mut last_table = Instant::now() - Duration::from_secs(1);
    loop {
        // Manifests: re-read when a file changed, was added or removed.
        if last_files.elapsed() >= watch {
            last_files = Instant::now();
            let now_print = manifests::fingerprint(&args.files);
            // Once something was read, read again only files that stood
            // still for a whole interval: one caught between an editor's
            // truncate and its write reads as empty, and its promotions
            // would be finished as removed. The first read is at once
            // (nothing can be removed yet).
            let settled = fingerprint.is_none() || looked.as_ref() == Some(&now_print);
            looked = Some(now_print.clone());
            if settled && fingerprint.as_ref() != Some(&now_print) {
                fingerprint = Some(now_print);
                let declared = manifests::load(&args.files);
                for refused in &declared.refused {
                    board.say(format!(
                        "{} INVALID {}: {}",
                        stamp(),
                        refused.source,
                        refused.problems.join("; ")
                    ));
                }
                let removed: Vec<PromotionId> = tracked
                    .keys()
                    .filter(|id| !declared.promotions.contains_key(id))
                    .cloned()
                    .collect();
                for id in removed {
                    let Some(gone) = tracked.remove(&id) else {
                        continue;
                    };
                    if let Some(metrics) = operator {
                        metrics.set_phase(&id.to_string(), None);
                        let finished = lifecycle::finish_deleted_with(
                            &mut redis,
                            &id,
                            &gone.declared.spec,
                            gone.status.as_ref(),
                            shards,
                        )
                        .await;
                        match finished {
                            Ok(snap) => board.say(format!(
                                "{} {id}: manifest removed; finished (Deleted) with {} granted",
                                stamp(),
                                snap.granted
                            )),
                            Err(e) => board.say(format!(
                                "{} {id}: manifest removed but could not finish it: {e}",
                                stamp()
                            )),
                        }
                    }
                }
                for (id, d) in declared.promotions {
                    match tracked.get_mut(&id) {
                        Some(t) if t.declared.spec == d.spec => {}
                        Some(t) => {
                            t.declared = d;
                            t.generation += 1;
                            t.due = Instant::now();
                            board.say(format!(
                                "{} {id}: manifest changed (generation {})",
                                stamp(),
                                t.generation
                            ));
                        }
                        None => {
                            tracked.insert(
                                id,
                                Tracked {
                                    declared: d,
                                    generation: 1,
                                    status: None,
                                    due: Instant::now(),
                                },
                            );
                        }
                    }
                }
            }
        }

        // Reconcile what is due, exactly as the controller does.
        for (id, t) in tracked.iter_mut() {
            if Instant::now() < t.due {
                continue;
            }
            let Some(metrics) = operator else {
                t.due = Instant::now() + Duration::from_secs(1);
                if let Ok(snap) = protocol::snapshot(&mut redis, id).await {
                    t.status = Some(PromotionStatus {
                        granted: snap.granted,
                        remaining: snap.remaining(),
                        ..t.status.clone().unwrap_or_default()
                    });
                }
                continue;
            };
            let timer = metrics.reconcile_started();
            let result: Result<Driven, _> = lifecycle::drive_with(
                &mut redis,
                id,
                &t.declared.spec,
                Some(t.generation),
                t.status.as_ref(),
                shards,
            )
            .await;
            drop(timer);
            match result {
                Ok(driven) => {
                    metrics.observe_promotion(&id.to_string(), &t.declared.spec, &driven.status);
                    for tr in &driven.transitions {
                        let level = if tr.warning { "WARNING " } else { "" };
                        board.say(format!(
                            "{} {level}{id}: {}: {}",
                            stamp(),
                            tr.reason,
                            tr.note
                        ));
                    }
                    t.status = Some(driven.status);
                    t.due = Instant::now()
                        + driven
                            .requeue_after
                            .unwrap_or(Duration::from_secs(3600))
                            .min(Duration::from_secs(3600));
                }
                Err(e) => {
                    metrics.failed(&e);
                    board.say(format!(
                        "{} {id}: reconcile failed, retrying in 1 s: {e}",
                        stamp()
                    ));
                    t.due = Instant::now() + Duration::from_secs(1);
                }
            }
        }

        // Grab rates from the granted counts.
        for (id, t) in &tracked {
            let granted = t.status.as_ref().map_or(0, |s| s.granted);
            let entry = rates
                .entry(id.clone())
                .or_insert((Instant::now(), granted, 0.0));
            let dt = entry.0.elapsed().as_secs_f64();
            if dt >= 1.0 {
                entry.2 = granted.saturating_sub(entry.1) as f64 / dt;
                *entry = (Instant::now(), granted, entry.2);
            }
        }
        if board.live && last_table.elapsed() >= Duration::from_millis(500) {
            last_table = Instant::now();
            draw(&tracked, &rates, board);
        }

        let next_due = tracked
            .values()
            .map(|t| t.due)
            .min()
            .unwrap_or_else(|| Instant::now() + watch);
        let wait = next_due
            .saturating_duration_since(Instant::now())
            .min(watch)
            .min(Duration::from_millis(250));
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

fn draw(
    tracked: &BTreeMap<PromotionId, Tracked>,
    rates: &HashMap<PromotionId, (Instant, u64, f64)>,
    board: &Board,
) {
    let mut out = String::from("\x1b[H\x1b[2J");
    out.push_str(&format!(
        "seckill up   {}   (Ctrl-C stops everything)\n\n",
        chrono::Utc::now().format("%Y-%m-%d %H:%M:%S UTC")
    ));
    out.push_str(&format!(
        "{:<36} {:<9} {:>10} {:>10} {:>9}  {:<8}\n",
        "PROMOTION", "PHASE", "GRANTED", "REMAINING", "GRABS/S", "REASON"
    ));
    for (id, t) in tracked {
        let s = t.status.clone().unwrap_or_default();
        let phase = s.phase.map(|p| p.to_string()).unwrap_or_else(|| "-".into());
        let reason = s.finish_reason.map(|r| r.as_str()).unwrap_or("");
        let rate = rates.get(id).map_or(0.0, |r| r.2);
        out.push_str(&format!(
            "{:<36} {:<9} {:>10} {:>10} {:>9.0}  {:<8}\n",
            id.to_string(),
            phase,
            s.granted,
            s.remaining,
            rate,
            reason
        ));
    }
    out.push('\n');
    for line in &board.recent {
        out.push_str(line);
        out.push('\n');
    }
    let mut stdout = std::io::stdout().lock();
    let _ = stdout.write_all(out.as_bytes());
    let _ = stdout.flush();
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        up: UpArgs,
    }

    #[test]
    fn every_role_runs_by_default_and_is_named_as_the_flag_spells_it() {
        let cli = Cli::parse_from(["up"]);
        assert_eq!(
            cli.up.roles,
            [Role::Operator, Role::Command, Role::Query, Role::Projector]
        );
        let names: Vec<String> = cli.up.roles.iter().map(Role::to_string).collect();
        assert_eq!(names, ["operator", "command", "query", "projector"]);
        let some = Cli::parse_from(["up", "--roles", "command,projector"]);
        assert_eq!(some.up.roles, [Role::Command, Role::Projector]);
        assert!(Cli::try_parse_from(["up", "--roles", "frobnicator"]).is_err());
    }
}
