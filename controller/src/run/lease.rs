//! Leader election on a Lease (kube-lease-manager): only the holder acts; a replica that loses
//! the lease stops, so two replicas never both act.

use std::sync::Arc;

use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::{BoxError, RunOptions};
use crate::metrics::Metrics;

/// Waits for leadership. Returns the lease's task once leading, or None when asked to stop first.
pub async fn lead(
    client: &kube::Client,
    opts: &RunOptions,
    metrics: &Arc<Metrics>,
    stop_tx: &watch::Sender<bool>,
    stop_rx: &watch::Receiver<bool>,
) -> Result<Option<JoinHandle<kube_lease_manager::Result<kube_lease_manager::LeaseManager>>>, BoxError> {
    let duration = opts.lease_duration.as_secs().max(2);
    // Renew well before expiry: a third of the lease is left when the holder renews.
    let grace = (duration / 3).max(1);
    metrics.leader.set(0);
    let mut stop = stop_rx.clone();
    // The Lease's namespace may not exist yet (an install still being applied): wait for it.
    let manager = loop {
        let built = kube_lease_manager::LeaseManagerBuilder::new(client.clone(), &opts.lease_name)
            .with_namespace(&opts.lease_namespace)
            .with_identity(&opts.identity)
            .with_duration(duration)
            .with_grace(grace)
            .build()
            .await;
        match built {
            Ok(m) => break m,
            Err(e) => {
                tracing::warn!(lease = %opts.lease_name, namespace = %opts.lease_namespace, error = %e, "cannot use the lease yet; retrying");
                tokio::select! {
                    () = tokio::time::sleep(std::time::Duration::from_secs(2)) => {}
                    _ = stop.wait_for(|v| *v) => return Ok(None),
                }
            }
        }
    };
    let (mut leader, task) = manager.watch().await;
    tracing::info!(lease = %opts.lease_name, namespace = %opts.lease_namespace, identity = %opts.identity, "waiting for leadership");
    tokio::select! {
        r = leader.wait_for(|v| *v) => { r?; }
        _ = stop.wait_for(|v| *v) => { task.abort(); return Ok(None); }
    }
    tracing::info!("leading");
    let (stop_tx, metrics) = (stop_tx.clone(), metrics.clone());
    tokio::spawn(async move {
        let _ = leader.wait_for(|v| !*v).await;
        metrics.leader.set(0);
        tracing::error!("leader lease lost: stopping so that only one replica acts");
        let _ = stop_tx.send(true);
        // Keep the receiver alive until the process ends so the lease is not released twice.
        std::future::pending::<()>().await;
    });
    Ok(Some(task))
}
