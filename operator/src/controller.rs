//! The Kubernetes side: a kube-runtime Controller that watches Promotions
//! (all namespaces or one), runs the [`lifecycle`] decisions against Redis,
//! and reports back through the status subresource (server-side apply),
//! Kubernetes Events and metrics. A finalizer makes sure a deleted Active
//! promotion is finished (reason Deleted) before the object goes away.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::Utc;
use futures::StreamExt;
use kube::api::{ListParams, Patch, PatchParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::finalizer::{finalizer, Event as FinalizerEvent};
use kube::runtime::watcher;
use kube::{Api, Client, Resource, ResourceExt};
use seckill_workers::http::{self, Apis, HealthApi, ServerLimitArgs};
use seckill_workers::metrics::MetricsRegistry;
use seckill_workers::protocol::{PromotionId, ScheduleResult};
use seckill_workers::redis_connection::{RedisArgs, RedisConnection};
use serde_json::json;

use crate::leader::{self, LeaseConfig};
use crate::lifecycle::{self, Transition};
use crate::metrics::Metrics;
use crate::promotion::{Promotion, PromotionStatus};
use crate::Error;

/// The finalizer that holds a deleted promotion until Redis has finished it.
pub const FINALIZER: &str = "seckill.io/finalizer";
/// Field manager of the status (server-side apply) and the Event reporter.
pub const FIELD_MANAGER: &str = "seckill-operator";

/// Backoff after failures of one promotion: doubled from this ...
const BACKOFF_BASE: Duration = Duration::from_millis(500);
/// ... up to this.
const BACKOFF_MAX: Duration = Duration::from_secs(60);

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

    #[command(flatten)]
    pub redis: RedisArgs,
}

/// What reconcile and error_policy share.
pub struct Context {
    pub client: Client,
    pub redis: RedisConnection,
    pub recorder: Recorder,
    pub metrics: Metrics,
    /// Consecutive failures per promotion, for the backoff.
    failures: Mutex<HashMap<String, u32>>,
}

impl Context {
    pub fn new(
        client: Client,
        redis: RedisConnection,
        metrics: Metrics,
        identity: Option<String>,
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
            failures: Mutex::new(HashMap::new()),
        })
    }

    fn failures(&self) -> std::sync::MutexGuard<'_, HashMap<String, u32>> {
        self.failures.lock().unwrap_or_else(|e| e.into_inner())
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
    let generation = p.metadata.generation;
    let previous = p.status.as_ref();
    let mut redis = ctx.redis.clone();
    match lifecycle::drive(&mut redis, &id, &p.spec, generation, previous).await {
        Ok(driven) => {
            patch_status(api, &p.name_any(), &driven.status).await?;
            for t in &driven.transitions {
                publish(ctx, p, t, "Reconcile").await;
            }
            ctx.metrics
                .observe_promotion(&id.to_string(), &p.spec, &driven.status);
            tracing::debug!(promotion = %id, phase = ?driven.status.phase, requeue = ?driven.requeue_after, "reconciled");
            Ok(match driven.requeue_after {
                Some(after) => Action::requeue(after),
                None => Action::await_change(),
            })
        }
        Err(e @ Error::InvalidSpec(_)) => {
            // Waiting will not fix it; a new generation brings it back.
            let status = lifecycle::unavailable_status(
                previous,
                generation,
                e.kind(),
                e.to_string(),
                Utc::now(),
            );
            patch_status(api, &p.name_any(), &status).await?;
            tracing::warn!(promotion = %id, error = %e, "spec refused");
            Ok(Action::await_change())
        }
        Err(e) => {
            let status = lifecycle::unavailable_status(
                previous,
                generation,
                e.kind(),
                e.to_string(),
                Utc::now(),
            );
            if let Err(pe) = patch_status(api, &p.name_any(), &status).await {
                tracing::warn!(promotion = %id, error = %pe, "cannot report Ready=False");
            }
            Err(e)
        }
    }
}

async fn cleanup(p: &Promotion, ctx: &Context) -> Result<Action, Error> {
    let id = promotion_id(p)?;
    let mut redis = ctx.redis.clone();
    let snap = lifecycle::finish_deleted(&mut redis, &id).await?;
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
    Controller::new(api, watcher::Config::default().any_semantic())
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
    let ctx = Context::new(client.clone(), redis, metrics, Some(identity.clone()));

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
