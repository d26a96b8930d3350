//! The Kubernetes side: a kube-runtime Controller that watches Promotions
//! (all namespaces or one), runs the [`lifecycle`] decisions against Redis,
//! and reports back through the status subresource (server-side apply),
//! Kubernetes Events and metrics. A finalizer makes sure a deleted Active
//! promotion is finished (reason Deleted) before the object goes away.
//!
//! Quiet when nothing changes, on time when something does. A promotion is
//! reconciled when its spec, its finalizers or its deletion change (the
//! watch, filtered: the operator's own status writes do not come back as
//! work), exactly at its publish and finish times (requeues), and when Redis
//! moved its numbers ([`sales::changes`], one batched read of every running
//! sale per `--redis-poll-interval`, fed to `Controller::reconcile_on`). A
//! status is written only when its content changed, and new numbers alone at
//! most once per `--status-interval` ([`lifecycle::status_write`]).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::Utc;
use futures::StreamExt;
use kube::api::{ListParams, Patch, PatchParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::finalizer::{finalizer, Event as FinalizerEvent};
use kube::runtime::reflector::{self, ObjectRef};
use kube::runtime::{predicates, watcher, Predicate, WatchStreamExt};
use kube::{Api, Client, Resource, ResourceExt};
use seckill_workers::http::{self, Apis, HealthApi, ServerLimitArgs};
use seckill_workers::metrics::MetricsRegistry;
use seckill_workers::protocol::{Durability, PromotionId, ScheduleResult};
use seckill_workers::redis_connection::{DurableArgs, RedisArgs, RedisConnection};
use serde_json::json;
use tokio::time::Instant;

use crate::leader::{self, LeaseConfig};
use crate::lifecycle::{self, ShardSettings, StatusWrite, Transition};
use crate::metrics::Metrics;
use crate::promotion::{Phase, Promotion, PromotionStatus};
use crate::sales::{self, Reported, RunningSales};
use crate::Error;

/// The finalizer that holds a deleted promotion until Redis has finished it.
pub const FINALIZER: &str = "seckill.io/finalizer";
/// Field manager of the status (server-side apply) and the Event reporter.
pub const FIELD_MANAGER: &str = "seckill-operator";

/// Backoff after failures of one promotion: doubled from this ...
const BACKOFF_BASE: Duration = Duration::from_millis(500);
/// ... up to this.
const BACKOFF_MAX: Duration = Duration::from_secs(60);

/// How often the operator writes and reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Intervals {
    /// The shortest time between two status writes of one promotion when
    /// only its numbers (granted, remaining) moved.
    pub status: Duration,
    /// How often the running sales are read from Redis.
    pub redis_poll: Duration,
}

impl Default for Intervals {
    fn default() -> Self {
        Self {
            status: Duration::from_secs(2),
            redis_poll: Duration::from_millis(500),
        }
    }
}

/// A duration flag such as `2s` or `500ms`; zero is refused.
fn positive_duration(s: &str) -> Result<Duration, String> {
    match humantime::parse_duration(s) {
        Ok(d) if d.is_zero() => Err("must be more than zero".to_owned()),
        Ok(d) => Ok(d),
        Err(e) => Err(e.to_string()),
    }
}

/// `seckill-operator run` flags (see the CLI contract).
#[derive(clap::Args, Debug, Clone)]
pub struct RunArgs {
    /// Namespace to watch; empty watches all namespaces.
    #[arg(long, env = "SECKILL_NAMESPACE", default_value = "")]
    pub namespace: String,

    /// Name of the coordination.k8s.io/v1 Lease used for leader election.
    #[arg(long, env = "SECKILL_LEASE_NAME", default_value = "seckill-operator")]
    pub lease_name: String,

    /// Namespace of the Lease (default: POD_NAMESPACE, else the service
    /// account's namespace in a cluster, else the kubeconfig namespace).
    #[arg(long, env = "SECKILL_LEASE_NAMESPACE")]
    pub lease_namespace: Option<String>,

    /// Seconds the Lease stays valid without renewal; a standby takes over
    /// within it.
    #[arg(long, env = "SECKILL_LEASE_DURATION_SECS", default_value_t = 15)]
    pub lease_duration_secs: u64,

    /// Identity in the Lease (default: POD_NAME, else the hostname).
    #[arg(long, env = "SECKILL_IDENTITY")]
    pub identity: Option<String>,

    /// Address of /metrics, /healthz and /readyz.
    #[arg(long, env = "SECKILL_METRICS_LISTEN", default_value = "0.0.0.0:9090")]
    pub metrics_listen: String,

    /// Reconcile without leader election (tests, single-replica development).
    #[arg(long)]
    pub no_leader_election: bool,

    /// Shortest time between two status writes of one promotion when only
    /// its numbers (granted, remaining) moved; a new phase, a sell-out or a
    /// condition is written at once. Bounds the operator's writes while
    /// sales run to one per running sale per interval.
    #[arg(long, env = "SECKILL_STATUS_INTERVAL", default_value = "2s", value_parser = positive_duration)]
    pub status_interval: Duration,

    /// How often the running sales are read from Redis, all in one batch
    /// (one pipeline per Redis node); a sell-out shows in the status within
    /// about this long.
    #[arg(long, env = "SECKILL_REDIS_POLL_INTERVAL", default_value = "500ms", value_parser = positive_duration)]
    pub redis_poll_interval: Duration,

    #[command(flatten)]
    pub redis: RedisArgs,

    #[command(flatten)]
    pub shards: ShardArgs,
}

/// Flags of sharded promotions (`spec.shards` > 1, docs/SHARDING.md). Unsharded
/// promotions ignore them.
#[derive(clap::Args, Debug, Clone)]
pub struct ShardArgs {
    /// Durable steps: the command workers' durable-grab flags, whose
    /// replicas a step another shard builds on waits for.
    #[command(flatten)]
    pub durable: DurableArgs,

    #[command(flatten)]
    pub run: ShardRunArgs,
}

/// The flags of sharded promotions besides their durable steps, shared with
/// `seckill up` (which takes its durable steps from its grab's flags).
#[derive(clap::Args, Debug, Clone)]
pub struct ShardRunArgs {
    /// Run sharded promotions without replicas (--durable-replicas 0),
    /// acknowledging that EVERY master runs `appendfsync always`: then an
    /// acknowledged step survives a restart, and with no replica there is no
    /// failover to lose one. The operator cannot check this (CONFIG is
    /// usually outside its ACL): with `everysec`, a crash loses up to a
    /// second of one master's steps while the others keep what followed
    /// them, which can oversell; so without replicas they are refused by default.
    #[arg(long, env = "SECKILL_SHARDS_WITHOUT_REPLICAS_NEEDS_FSYNC_ALWAYS")]
    pub shards_without_replicas_needs_fsync_always: bool,

    /// A stock move pending this long (milliseconds, on its donor's clock)
    /// is taken as abandoned by its mover (killed between its steps) and
    /// completed by the reconcile of its Active promotion; younger ones are
    /// left to their mover (a move normally takes a few milliseconds).
    #[arg(long, env = "SECKILL_MOVE_STALE_MS", default_value_t = 2_000)]
    pub move_stale_ms: u64,
}

impl ShardRunArgs {
    /// The settings these flags ask for, with `durable` steps.
    pub fn settings(&self, durable: Option<Durability>) -> ShardSettings {
        ShardSettings {
            durable,
            fsync_always: self.shards_without_replicas_needs_fsync_always,
            move_stale_ms: self.move_stale_ms,
        }
    }
}

impl ShardArgs {
    /// The settings these flags ask for. Refused when the replica wait does
    /// not fit in the Redis timeout: the pipeline would be abandoned before
    /// WAIT answers, and every step would fail.
    pub fn settings(&self, redis_timeout: Duration) -> Result<ShardSettings, Error> {
        let durable = self
            .durable
            .durability(redis_timeout)
            .map_err(|e| Error::Config(e.to_string()))?;
        Ok(self.run.settings(durable))
    }
}

/// What reconcile and error_policy share.
pub struct Context {
    pub client: Client,
    pub redis: RedisConnection,
    pub recorder: Recorder,
    pub metrics: Metrics,
    pub intervals: Intervals,
    /// How sharded promotions are run.
    pub shards: ShardSettings,
    /// The running sales, read from Redis by [`sales::changes`].
    pub sales: Arc<RunningSales>,
    /// Consecutive failures per promotion, for the backoff.
    failures: Mutex<HashMap<String, u32>>,
    /// The last status this process wrote, per promotion.
    written: Mutex<HashMap<String, Written>>,
}

/// A status this process wrote.
struct Written {
    /// The object it was decided for: while the watch still delivers that
    /// version, this status is newer than the one on the object.
    uid: Option<String>,
    resource_version: Option<String>,
    status: PromotionStatus,
    at: Instant,
}

impl Context {
    pub fn new(
        client: Client,
        redis: RedisConnection,
        metrics: Metrics,
        identity: Option<String>,
        intervals: Intervals,
    ) -> Arc<Self> {
        Self::with_shards(
            client,
            redis,
            metrics,
            identity,
            intervals,
            ShardSettings::default(),
        )
    }

    /// [`Context::new`] with the settings of sharded promotions.
    pub fn with_shards(
        client: Client,
        redis: RedisConnection,
        metrics: Metrics,
        identity: Option<String>,
        intervals: Intervals,
        shards: ShardSettings,
    ) -> Arc<Self> {
        let reporter = Reporter {
            controller: FIELD_MANAGER.to_owned(),
            instance: identity,
        };
        Arc::new(Self {
            recorder: Recorder::new(client.clone(), reporter),
            client,
            redis,
            metrics,
            intervals,
            shards,
            sales: Arc::new(RunningSales::default()),
            failures: Mutex::new(HashMap::new()),
            written: Mutex::new(HashMap::new()),
        })
    }

    fn failures(&self) -> std::sync::MutexGuard<'_, HashMap<String, u32>> {
        self.failures.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn written(&self) -> std::sync::MutexGuard<'_, HashMap<String, Written>> {
        self.written.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The status `p` reports, and how long ago this process last wrote it.
    /// A status written a moment ago may not have come back through the
    /// watch yet: while the object is still the version it was decided for,
    /// the written status stands for it (so that neither the write nor its
    /// Events are repeated).
    fn reported(&self, p: &Promotion) -> (Option<PromotionStatus>, Option<Duration>) {
        let written = self.written();
        match written.get(&key(p)).filter(|w| w.uid == p.metadata.uid) {
            Some(w) if w.resource_version == p.metadata.resource_version => {
                (Some(w.status.clone()), Some(w.at.elapsed()))
            }
            Some(w) => (p.status.clone(), Some(w.at.elapsed())),
            None => (p.status.clone(), None),
        }
    }
}

fn key(p: &Promotion) -> String {
    format!("{}/{}", p.namespace().unwrap_or_default(), p.name_any())
}

fn promotion_id(p: &Promotion) -> Result<PromotionId, Error> {
    let namespace = p.namespace().ok_or(Error::MissingNamespace)?;
    Ok(PromotionId::new(&namespace, &p.name_any())?)
}

/// Reconciles one Promotion: adds the finalizer, then drives it in Redis and
/// applies its status; or, when it is being deleted, finishes it in Redis and
/// removes the finalizer.
pub async fn reconcile(promotion: Arc<Promotion>, ctx: Arc<Context>) -> Result<Action, Error> {
    let _timer = ctx.metrics.reconcile_started();
    let namespace = promotion.namespace().ok_or(Error::MissingNamespace)?;
    let api: Api<Promotion> = Api::namespaced(ctx.client.clone(), &namespace);
    let k = key(&promotion);
    let action = finalizer(&api, FINALIZER, promotion, |event| async {
        match event {
            FinalizerEvent::Apply(p) => apply(&p, &api, &ctx).await,
            FinalizerEvent::Cleanup(p) => cleanup(&p, &ctx).await,
        }
    })
    .await
    .map_err(|e| Error::Finalizer(Box::new(e)))?;
    ctx.failures().remove(&k);
    Ok(action)
}

async fn apply(p: &Promotion, api: &Api<Promotion>, ctx: &Context) -> Result<Action, Error> {
    let id = promotion_id(p)?;
    let promotion = ObjectRef::from_obj(p);
    let generation = p.metadata.generation;
    let (previous, since_write) = ctx.reported(p);
    let previous = previous.as_ref();
    let mut redis = ctx.redis.clone();
    match lifecycle::drive_with(&mut redis, &id, &p.spec, generation, previous, &ctx.shards).await {
        Ok(driven) => {
            // The deadline counts from Redis' answer; kube-runtime counts a
            // requeue from the end of the reconcile, after the status write
            // and the Events, which a busy API server can make slow.
            let decided = Instant::now();
            let reported = report(ctx, api, p, previous, since_write, &driven.status).await?;
            for t in &driven.transitions {
                publish(ctx, p, t, "Reconcile").await;
            }
            ctx.metrics
                .observe_promotion(&id.to_string(), &p.spec, &driven.status);
            // A sharded sale is not watched: its grabs on shards >= 1 do
            // not grow shard 0's stream, so its drive requeues every
            // ACTIVE_REFRESH instead (sums, stale moves, sold-out check).
            let sharded = driven.status.stock_moves_in_flight.is_some();
            if driven.status.phase == Some(Phase::Active) && !sharded {
                ctx.sales.watch(promotion, id.clone(), reported);
            } else {
                ctx.sales.forget(&promotion);
            }
            tracing::debug!(promotion = %id, phase = ?driven.status.phase, requeue = ?driven.deadline, "reconciled");
            Ok(match driven.deadline {
                Some(after) => {
                    Action::requeue(whole_millis(after.saturating_sub(decided.elapsed())))
                }
                None => Action::await_change(),
            })
        }
        Err(e) => {
            let status = lifecycle::unavailable_status(
                previous,
                generation,
                e.kind(),
                e.to_string(),
                Utc::now(),
            );
            if let Error::InvalidSpec(_) = e {
                // Waiting will not fix it; a new generation brings it back.
                report(ctx, api, p, previous, since_write, &status).await?;
                ctx.sales.forget(&promotion);
                tracing::warn!(promotion = %id, error = %e, "spec refused");
                return Ok(Action::await_change());
            }
            match report(ctx, api, p, previous, since_write, &status).await {
                Ok(reported) => ctx.sales.reported(&promotion, reported),
                Err(pe) => {
                    tracing::warn!(promotion = %id, error = %pe, "cannot report Ready=False")
                }
            }
            Err(e)
        }
    }
}

/// `d` rounded up to a whole millisecond (Redis' clock has no finer grain):
/// a requeue never falls before the deadline it is for.
fn whole_millis(d: Duration) -> Duration {
    Duration::from_millis(d.as_micros().div_ceil(1000) as u64)
}

/// Writes `status` when [`lifecycle::status_write`] says so, and returns
/// what the object's status reports afterwards, for the poll of the running
/// sales.
async fn report(
    ctx: &Context,
    api: &Api<Promotion>,
    p: &Promotion,
    previous: Option<&PromotionStatus>,
    since_write: Option<Duration>,
    status: &PromotionStatus,
) -> Result<Reported, Error> {
    let interval = ctx.intervals.status;
    let now = Instant::now();
    let kept = || previous.cloned().unwrap_or_default();
    match lifecycle::status_write(previous, status, since_write, interval) {
        StatusWrite::Now => {
            patch_status(api, &p.name_any(), status).await?;
            ctx.metrics.status_update("written");
            ctx.written().insert(
                key(p),
                Written {
                    uid: p.metadata.uid.clone(),
                    resource_version: p.metadata.resource_version.clone(),
                    status: status.clone(),
                    at: now,
                },
            );
            Ok(Reported::new(status, now + interval))
        }
        StatusWrite::Unchanged => {
            ctx.metrics.status_update("unchanged");
            let rest = since_write.map_or(Duration::ZERO, |s| interval.saturating_sub(s));
            Ok(Reported::new(&kept(), now + rest))
        }
        StatusWrite::Hold(rest) => {
            ctx.metrics.status_update("held");
            Ok(Reported::new(&kept(), now + rest))
        }
    }
}

async fn cleanup(p: &Promotion, ctx: &Context) -> Result<Action, Error> {
    ctx.sales.forget(&ObjectRef::from_obj(p));
    ctx.written().remove(&key(p));
    let id = promotion_id(p)?;
    let mut redis = ctx.redis.clone();
    let snap =
        lifecycle::finish_deleted_with(&mut redis, &id, &p.spec, p.status.as_ref(), &ctx.shards)
            .await?;
    if snap.result == ScheduleResult::Finished {
        let t = Transition {
            reason: "Finished",
            note: format!("finished (Deleted) with {} coupons granted", snap.granted),
            warning: false,
        };
        publish(ctx, p, &t, "Delete").await;
    }
    tracing::info!(promotion = %id, result = ?snap.result, "deleted");
    ctx.metrics.set_phase(&id.to_string(), None);
    Ok(Action::await_change())
}

/// Applies `status` on the status subresource as its only field manager.
async fn patch_status(
    api: &Api<Promotion>,
    name: &str,
    status: &PromotionStatus,
) -> Result<(), Error> {
    let patch = Patch::Apply(json!({
        "apiVersion": "seckill.io/v1",
        "kind": "Promotion",
        "status": status,
    }));
    api.patch_status(name, &PatchParams::apply(FIELD_MANAGER).force(), &patch)
        .await?;
    Ok(())
}

/// Events are for people; failing to post one does not fail the reconcile.
async fn publish(ctx: &Context, p: &Promotion, t: &Transition, action: &str) {
    let event = Event {
        type_: if t.warning {
            EventType::Warning
        } else {
            EventType::Normal
        },
        reason: t.reason.to_owned(),
        note: Some(t.note.clone()),
        action: action.to_owned(),
        secondary: None,
    };
    if let Err(e) = ctx.recorder.publish(&event, &p.object_ref(&())).await {
        tracing::warn!(promotion = %key(p), reason = t.reason, error = %e, "cannot post event");
    }
}

/// The delay before retrying a promotion that failed `failures` times in a
/// row: 0.5 s doubled per failure, at most 60 s.
pub fn backoff(failures: u32) -> Duration {
    let factor = 2u32.saturating_pow(failures.saturating_sub(1).min(16));
    BACKOFF_BASE.saturating_mul(factor).min(BACKOFF_MAX)
}

/// Retries a failed promotion with a capped exponential backoff.
pub fn error_policy(promotion: Arc<Promotion>, error: &Error, ctx: Arc<Context>) -> Action {
    ctx.metrics.failed(error);
    let failures = {
        let mut map = ctx.failures();
        let n = map.entry(key(&promotion)).or_insert(0);
        *n = n.saturating_add(1);
        *n
    };
    let delay = backoff(failures);
    tracing::warn!(promotion = %key(&promotion), error = %error, failures, retry_in = ?delay, "reconcile failed");
    Action::requeue(delay)
}

/// Runs the controller until the watch ends (it does not on its own): the
/// caller stops it by dropping the future (lost lease, shutdown).
pub async fn run_controller(ctx: Arc<Context>, namespace: Option<String>) -> Result<(), Error> {
    let api: Api<Promotion> = match &namespace {
        Some(ns) => Api::namespaced(ctx.client.clone(), ns),
        None => Api::all(ctx.client.clone()),
    };
    // Fail fast with a clear message when the CRD is not installed.
    api.list(&ListParams::default().limit(1))
        .await
        .map_err(Error::CrdNotInstalled)?;
    tracing::info!(
        namespace = namespace.as_deref().unwrap_or("(all)"),
        "controller started"
    );
    // seckill_operator_leader is 1 until this future ends or is dropped (lost lease).
    let _leading = ctx.metrics.leading();
    // This term's reconciles register the running sales afresh.
    ctx.sales.clear();
    let (store, writer) = reflector::store();
    // Every version goes to the store, so reconciles see the latest status;
    // only changes of the spec (generation, bumped by a deletion too) and of
    // the finalizers trigger a reconcile, not the operator's status writes.
    let promotions = watcher(api, watcher::Config::default().any_semantic())
        .default_backoff()
        .reflect(writer)
        .applied_objects()
        .predicate_filter(
            predicates::generation.combine(predicates::finalizers),
            Default::default(),
        );
    let moved = sales::changes(
        ctx.sales.clone(),
        ctx.redis.clone(),
        ctx.intervals.redis_poll,
        store.clone(),
        ctx.metrics.clone(),
    );
    Controller::for_stream(promotions, store)
        .reconcile_on(moved)
        .run(reconcile, error_policy, ctx)
        .for_each(|result| async move {
            if let Err(e) = result {
                tracing::debug!(error = %e, "reconcile error");
            }
        })
        .await;
    Ok(())
}

/// Who this replica is: `--identity`, else `$POD_NAME`, else the hostname.
pub fn identity(flag: Option<String>) -> String {
    flag.filter(|s| !s.is_empty())
        .or_else(|| std::env::var("POD_NAME").ok().filter(|s| !s.is_empty()))
        .or_else(|| std::env::var("HOSTNAME").ok().filter(|s| !s.is_empty()))
        .or_else(|| {
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .ok()
                .map(|s| s.trim().to_owned())
        })
        .unwrap_or_else(|| FIELD_MANAGER.to_owned())
}

/// `seckill-operator run`: serves the probes and metrics, then reconciles
/// (as the leader, unless `--no-leader-election`) until SIGTERM or Ctrl-C.
pub async fn run(args: RunArgs) -> Result<(), Error> {
    let client = Client::try_default().await?;
    let redis = args.redis.connect()?;
    seckill_workers::protocol::functions::load_at_setup(redis.clone());
    let registry = MetricsRegistry::new();
    let metrics = Metrics::register(&registry);
    let shutdown = http::shutdown_on_signal();

    let listener = http::bind(&args.metrics_listen).await?;
    let health = HealthApi::new(redis.clone(), args.redis.timeout(), registry.clone());
    let limits = ServerLimitArgs::from_env_or_defaults()?.limits(Duration::from_secs(2), None);
    let app = Apis::health(health).router(&limits);
    let server = {
        let shutdown = shutdown.clone();
        tokio::spawn(async move { http::serve(listener, app, &limits, shutdown).await })
    };

    let identity = identity(args.identity.clone());
    let namespace = (!args.namespace.is_empty()).then(|| args.namespace.clone());
    tracing::info!(redis = %args.redis.describe(), %identity, "seckill-operator starting");
    let intervals = Intervals {
        status: args.status_interval,
        redis_poll: args.redis_poll_interval,
    };
    let shards = args.shards.settings(args.redis.timeout())?;
    if shards.durable.is_none() {
        tracing::info!(
            fsync_always = shards.fsync_always,
            "no durable steps: sharded promotions (spec.shards > 1) are refused unless --shards-without-replicas-needs-fsync-always"
        );
    }
    let ctx = Context::with_shards(
        client.clone(),
        redis,
        metrics,
        Some(identity.clone()),
        intervals,
        shards,
    );

    let result = if args.no_leader_election {
        tokio::select! {
            r = run_controller(ctx, namespace) => r,
            _ = shutdown.cancelled() => Ok(()),
        }
    } else {
        let lease_namespace = args
            .lease_namespace
            .clone()
            .filter(|s| !s.is_empty())
            .or_else(|| {
                std::env::var("POD_NAMESPACE")
                    .ok()
                    .filter(|s| !s.is_empty())
            })
            .unwrap_or_else(|| client.default_namespace().to_owned());
        let config = LeaseConfig {
            name: args.lease_name.clone(),
            namespace: lease_namespace,
            identity,
            duration_secs: args.lease_duration_secs,
        };
        let token = shutdown.clone();
        leader::run_as_leader(
            client,
            config,
            || run_controller(ctx.clone(), namespace.clone()),
            async move { token.cancelled().await },
        )
        .await
    };
    shutdown.cancel();
    let _ = server.await;
    tracing::info!("seckill-operator stopped");
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_from_half_a_second_and_caps_at_a_minute() {
        assert_eq!(backoff(1), Duration::from_millis(500));
        assert_eq!(backoff(2), Duration::from_secs(1));
        assert_eq!(backoff(3), Duration::from_secs(2));
        assert_eq!(backoff(8), Duration::from_secs(60));
        assert_eq!(backoff(u32::MAX), Duration::from_secs(60));
    }
}
