//! Leader election on a `coordination.k8s.io/v1` Lease (kube-lease-manager):
//! of several operator replicas, only the holder of the Lease reconciles.
//! A standby takes the Lease over once the holder stopped renewing it for
//! the lease duration; a holder that loses the Lease stops reconciling at
//! once. (Reconciling twice for a moment would still be safe: every Redis
//! script is idempotent. The election avoids the wasted work and the
//! interleaved status patches.)

use std::future::Future;

use kube::Client;
use kube_lease_manager::{LeaseManagerBuilder, LeaseParams};

use crate::Error;

/// Which Lease, and who we are.
#[derive(Debug, Clone)]
pub struct LeaseConfig {
    pub name: String,
    pub namespace: String,
    pub identity: String,
    /// How long the Lease stays ours without a renewal.
    pub duration_secs: u64,
}

impl LeaseConfig {
    /// The duration (at least 2 s) and the grace period before expiry at
    /// which the holder renews (a third of the duration, at least 1 s).
    pub fn params(&self) -> LeaseParams {
        let duration = self.duration_secs.max(2);
        let grace = (duration / 3).max(1);
        LeaseParams::new(self.identity.clone(), duration, grace)
    }
}

/// Runs `work` while we hold the Lease, dropping it (which stops it) when
/// the Lease is lost and starting it again when regained, until `shutdown`
/// resolves; the Lease is then released, so a standby takes it at its next
/// look (kube-lease-manager looks when the last renewal it saw would have
/// expired) without first waiting out the expiry and forcing a release.
/// A holder notices a lost Lease at its next renewal.
/// Returns early only if `work` fails or the Lease watcher ends.
pub async fn run_as_leader<W, Fut>(
    client: Client,
    config: LeaseConfig,
    mut work: W,
    shutdown: impl Future<Output = ()>,
) -> Result<(), Error>
where
    W: FnMut() -> Fut,
    Fut: Future<Output = Result<(), Error>>,
{
    let manager = LeaseManagerBuilder::new(client, config.name.clone())
        .with_namespace(config.namespace.clone())
        .with_parameters(config.params())
        .build()
        .await?;
    let (mut leading, task) = manager.watch().await;
    tracing::info!(lease = %config.name, namespace = %config.namespace, identity = %config.identity, "waiting for the lease");
    tokio::pin!(shutdown);
    let result = loop {
        // Standby until the Lease is ours.
        let became_leader = loop {
            if *leading.borrow_and_update() {
                break true;
            }
            tokio::select! {
                changed = leading.changed() => if changed.is_err() { break false },
                _ = &mut shutdown => break false,
            }
        };
        if !became_leader {
            break Ok(());
        }
        tracing::info!(identity = %config.identity, "acquired the lease; reconciling");
        let running = work();
        tokio::pin!(running);
        let lost = async {
            loop {
                if leading.changed().await.is_err() || !*leading.borrow_and_update() {
                    return;
                }
            }
        };
        tokio::select! {
            r = &mut running => break r,
            _ = lost => tracing::warn!(identity = %config.identity, "lost the lease; stopped reconciling"),
            _ = &mut shutdown => break Ok(()),
        }
    };
    // Closing the channel makes the watcher release the Lease and end.
    drop(leading);
    match task.await {
        Ok(Ok(_)) => tracing::info!("released the lease"),
        Ok(Err(e)) => tracing::warn!(error = %e, "could not release the lease"),
        Err(e) => tracing::warn!(error = %e, "lease watcher ended abnormally"),
    }
    result
}
