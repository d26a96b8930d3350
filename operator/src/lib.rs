//! The seckill operator: reconciles `Promotion` custom resources against the
//! Redis protocol of `seckill_workers`. Only what runs in the cluster; the
//! `seckill` CLI (`seckill up`, `seckill load`) is the `seckill-cli` package.
//!
//! Module map, one concern each in the style of kube-rs' controller-rs:
//! - [`promotion`]: the CRD types (spec, status) and [`promotion::validate`].
//! - [`crdgen`]: the CRD YAML (`seckill-operator crd`, `crds/`).
//! - [`admission`]: checking a raw manifest as the API server would.
//! - [`lifecycle`]: the pure decisions, and the kube-free executor that
//!   `seckill up` shares.
//! - [`controller`]: the Kubernetes controller (reconcile, error policy,
//!   finalizer, status, events).
//! - [`sales`]: the running sales, read from Redis in batches (what
//!   moved triggers a reconcile).
//! - [`metrics`]: what the operator reports to Prometheus.
//! - [`leader`]: leader election on a Lease.
//! - `fixtures` (tests only): the controller's test scenarios.

pub mod admission;
pub mod controller;
pub mod crdgen;
#[cfg(test)]
mod fixtures;
pub mod leader;
pub mod lifecycle;
pub mod metrics;
pub mod promotion;
pub mod sales;

use promotion::FieldError;
use seckill_workers::http::HttpError;
use seckill_workers::protocol::placement::PlacementError;
use seckill_workers::protocol::shards::ShardError;
use seckill_workers::protocol::{IdError, ScriptError};
use seckill_workers::redis_connection::RedisSetupError;

/// Everything that can go wrong in the operator.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot render the CRD as YAML: {0}")]
    Yaml(#[source] serde_yaml::Error),

    /// Redis could not be reached or answered an error: retried with backoff.
    #[error("redis unavailable: {0}")]
    Redis(#[from] ScriptError),

    /// A step of a sharded promotion failed or could not be taken safely
    /// (e.g. not acknowledged by the replicas asked for): retried with
    /// backoff; every step is idempotent or recorded for recovery.
    #[error("shards: {0}")]
    Shard(#[from] ShardError),

    /// The shards cannot be placed on the cluster's masters.
    #[error("shard placement: {0}")]
    Placement(#[from] PlacementError),

    /// The spec breaks a rule of the CRD (only possible where admission did
    /// not run: an API server without the CEL rule, or file manifests).
    #[error("invalid spec: {}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))]
    InvalidSpec(Vec<FieldError>),

    #[error("invalid promotion id: {0}")]
    InvalidId(#[from] IdError),

    #[error("promotion has no namespace")]
    MissingNamespace,

    #[error("kubernetes: {0}")]
    Kube(#[from] kube::Error),

    #[error("cannot list promotions (is the CRD promotions.seckill.io installed?): {0}")]
    CrdNotInstalled(#[source] kube::Error),

    #[error("finalizer: {0}")]
    Finalizer(#[source] Box<kube::runtime::finalizer::Error<Error>>),

    #[error("leader election: {0}")]
    Lease(#[from] kube_lease_manager::LeaseManagerError),

    #[error("{0}")]
    RedisSetup(#[from] RedisSetupError),

    #[error("{0}")]
    Http(#[from] HttpError),

    /// The operator's flags contradict each other.
    #[error("{0}")]
    Config(String),
}

impl Error {
    /// A short label for metrics and condition reasons.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Yaml(_) => "yaml",
            Self::Redis(_) => "RedisUnavailable",
            Self::Shard(ShardError::Script(_)) => "RedisUnavailable",
            Self::Shard(ShardError::NotDurable { .. }) => "ShardStepNotDurable",
            Self::Shard(_) => "ShardError",
            Self::Placement(_) => "ShardPlacement",
            Self::InvalidSpec(_) => "InvalidSpec",
            Self::InvalidId(_) => "InvalidId",
            Self::MissingNamespace => "MissingNamespace",
            Self::Kube(_) | Self::CrdNotInstalled(_) => "KubernetesError",
            Self::Finalizer(e) => match e.as_ref() {
                kube::runtime::finalizer::Error::ApplyFailed(inner)
                | kube::runtime::finalizer::Error::CleanupFailed(inner) => inner.kind(),
                _ => "FinalizerError",
            },
            Self::Lease(_) => "LeaseError",
            Self::RedisSetup(_) => "RedisSetup",
            Self::Http(_) => "HttpError",
            Self::Config(_) => "Config",
        }
    }
}
