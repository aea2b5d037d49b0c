//! What an order reconcile needs from outside the order: the settings, its provider's connection,
//! the other orders of its namespace, Secrets and ConfigMaps, a durable status write and the runner
//! binary. The controller uses the cluster ([`KubeWorld`]); reconcile tests use in-memory fakes.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use ep_api::experiment::{Approval, ExperimentPhase};
use ep_api::{CONDITION_READY, RunPodOrder, RunPodOrderStatus, find_condition};
use ep_volume::VolumeStore;
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::api::{Patch, PatchParams};
use kube::{Api, ResourceExt};
use serde_json::json;
use tokio::sync::Semaphore;

use super::ledger;
use crate::context::{Context, RunnerBinary};
use crate::error::Error;
use crate::names::MANAGER;
use crate::pool::Conn;
use crate::reason::{Blocked, Reason};
use crate::runpod::RunPodApi;
use crate::settings::{NamespaceBudget, Settings};

/// A provider's connection, or why the provider cannot be used.
pub type Connected<A, S> = Result<Arc<Conn<A, S>>, Blocked>;

/// The order reconciler's view of everything outside the order.
pub trait World: Send + Sync {
    type Api: RunPodApi;
    type Store: VolumeStore;

    /// The settings in force.
    fn settings(&self) -> Arc<Settings>;
    /// The connection of a Ready provider, else why it cannot be used.
    fn provider(&self, name: &str) -> impl Future<Output = Connected<Self::Api, Self::Store>> + Send;
    /// Every order of a namespace, as cached.
    fn orders(&self, namespace: &str) -> Vec<Arc<RunPodOrder>>;
    /// The phase of an experiment, as cached (None: there is no such experiment).
    fn experiment_phase(&self, namespace: &str, name: &str) -> Option<Option<ExperimentPhase>>;
    /// One key of a Secret, decoded.
    fn secret_key(
        &self,
        namespace: &str,
        name: &str,
        key: &str,
    ) -> impl Future<Output = Result<Option<String>, Error>> + Send;
    fn config_map(&self, namespace: &str, name: &str) -> impl Future<Output = Result<Option<ConfigMap>, Error>> + Send;
    /// Writes the order's status now (a durable step before a paid call), on condition that the
    /// order is still at `resource_version`; returns the new version.
    fn save_status(
        &self,
        order: &RunPodOrder,
        resource_version: Option<&str>,
        status: &RunPodOrderStatus,
    ) -> impl Future<Output = Result<Option<String>, Error>> + Send;
    fn runner(&self) -> &RunnerBinary;
    /// Where ConfigMap payloads are staged.
    fn staging(&self) -> &Path;
    /// Payload syncs running at once.
    fn sync_slots(&self) -> &Semaphore;
    /// Pod creates in flight at once: fewer than the reconcile slots, so creates that hang never
    /// hold every slot and supervision of running pods always has one.
    fn create_slots(&self) -> &Semaphore;
    /// Counts what an ended order cost.
    fn record_spend(&self, namespace: &str, usd: f64);
    /// The approval of an experiment (`spec.approval`), as cached.
    fn experiment_approval(&self, namespace: &str, name: &str) -> Option<Approval>;
    /// Admits order `uid` into its namespace's spend ledger under `budget`, serialized with every
    /// other admission of the namespace; the inner error says why the budget has no room.
    fn reserve(
        &self,
        namespace: &str,
        uid: &str,
        entry: ledger::Entry,
        budget: &NamespaceBudget,
    ) -> impl Future<Output = Result<Result<(), Blocked>, Error>> + Send;
    /// Closes order `uid`'s ledger entry at what it actually spent.
    fn settle(&self, namespace: &str, uid: &str, spent_usd: f64) -> impl Future<Output = Result<(), Error>> + Send;
}

/// The cluster, through the controller's caches and client.
pub struct KubeWorld<'a> {
    ctx: &'a Context,
}

impl<'a> KubeWorld<'a> {
    pub fn new(ctx: &'a Context) -> Self {
        Self { ctx }
    }
}

/// The status as the order controller applies it: without `binding`, which the experiment's
/// reconciler owns (server-side apply keeps the two managers' fields apart), and with the
/// resourceVersion it was decided on as a precondition.
pub fn status_body(status: &RunPodOrderStatus, resource_version: Option<&str>) -> Result<serde_json::Value, Error> {
    let mut st = serde_json::to_value(status).map_err(Error::json("order status"))?;
    if let Some(m) = st.as_object_mut() {
        m.remove("binding");
    }
    Ok(json!({
        "apiVersion": "ep.dev/v1alpha1",
        "kind": "RunPodOrder",
        "metadata": {"resourceVersion": resource_version},
        "status": st,
    }))
}

impl World for KubeWorld<'_> {
    type Api = crate::pool::Instrumented;
    type Store = ep_volume::S3Volume;

    fn settings(&self) -> Arc<Settings> {
        self.ctx.settings.current()
    }

    async fn provider(&self, name: &str) -> Connected<Self::Api, Self::Store> {
        let Some(p) = self.ctx.stores.provider(name) else {
            return Err(Blocked::new(
                Reason::ProviderMissing,
                format!("spec.providerRef: RunPodProvider {name} does not exist"),
            ));
        };
        let ready = p.status.as_ref().and_then(|s| find_condition(&s.conditions, CONDITION_READY));
        if let Some(c) = ready.filter(|c| c.status != "True") {
            // RunPod itself down or rate limiting: say so, not only that the provider is not ready.
            let outage =
                [Reason::RunPodUnavailable, Reason::RunPodRateLimited].into_iter().find(|r| r.as_str() == c.reason);
            if let Some(reason) = outage {
                return Err(Blocked::new(reason, format!("RunPodProvider {name}: {}", c.message)));
            }
            return Err(Blocked::new(
                Reason::ProviderNotReady,
                format!("RunPodProvider {name} is not ready ({}): {}", c.reason, c.message),
            ));
        }
        self.ctx
            .providers
            .get(&self.ctx.client, &p, &self.ctx.metrics)
            .await
            .map_err(|e| Blocked::new(e.reason(), e.to_string()))
    }

    fn orders(&self, namespace: &str) -> Vec<Arc<RunPodOrder>> {
        self.ctx.stores.orders_in(namespace)
    }

    fn experiment_phase(&self, namespace: &str, name: &str) -> Option<Option<ExperimentPhase>> {
        self.ctx.stores.experiment(namespace, name).map(|e| e.status.as_ref().and_then(|s| s.phase))
    }

    async fn secret_key(&self, namespace: &str, name: &str, key: &str) -> Result<Option<String>, Error> {
        let secret = Api::<Secret>::namespaced(self.ctx.client.clone(), namespace).get_opt(name).await?;
        // `data` only: the API server merges `stringData` into it and never returns `stringData`.
        Ok(secret.and_then(|s| s.data?.get(key).map(|b| String::from_utf8_lossy(&b.0).into_owned())))
    }

    async fn config_map(&self, namespace: &str, name: &str) -> Result<Option<ConfigMap>, Error> {
        Ok(Api::<ConfigMap>::namespaced(self.ctx.client.clone(), namespace).get_opt(name).await?)
    }

    async fn save_status(
        &self,
        order: &RunPodOrder,
        resource_version: Option<&str>,
        status: &RunPodOrderStatus,
    ) -> Result<Option<String>, Error> {
        let body = status_body(status, resource_version)?;
        let written = Api::<RunPodOrder>::namespaced(self.ctx.client.clone(), &order.namespace().unwrap_or_default())
            .patch_status(&order.name_any(), &PatchParams::apply(MANAGER).force(), &Patch::Apply(&body))
            .await
            .map_err(Error::write)?;
        Ok(written.resource_version())
    }

    fn runner(&self) -> &RunnerBinary {
        &self.ctx.runner
    }

    fn staging(&self) -> &Path {
        &self.ctx.staging
    }

    fn sync_slots(&self) -> &Semaphore {
        self.ctx.sync_slots.semaphore()
    }
    fn create_slots(&self) -> &Semaphore {
        self.ctx.create_slots.semaphore()
    }

    fn record_spend(&self, namespace: &str, usd: f64) {
        self.ctx.metrics.spent(namespace, usd);
    }

    fn experiment_approval(&self, namespace: &str, name: &str) -> Option<Approval> {
        self.ctx.stores.experiment(namespace, name)?.spec.approval.clone()
    }

    async fn reserve(
        &self,
        namespace: &str,
        uid: &str,
        entry: ledger::Entry,
        budget: &NamespaceBudget,
    ) -> Result<Result<(), Blocked>, Error> {
        let live = live_orders(&self.ctx.stores.orders_in(namespace));
        let api = Api::<ConfigMap>::namespaced(self.ctx.client.clone(), namespace);
        ledger::reserve(&api, namespace, uid, &entry, budget, &live).await
    }

    async fn settle(&self, namespace: &str, uid: &str, spent_usd: f64) -> Result<(), Error> {
        let api = Api::<ConfigMap>::namespaced(self.ctx.client.clone(), namespace);
        ledger::update(&api, None, |l| (l.settle(uid, spent_usd), ())).await
    }
}

/// What the cached orders of a namespace say about their ledger entries, by uid.
pub fn live_orders(orders: &[Arc<RunPodOrder>]) -> HashMap<String, ledger::Live> {
    orders
        .iter()
        .filter_map(|o| {
            let st = o.status.as_ref();
            let live = ledger::Live {
                spent_usd: st.and_then(|s| s.accrued_cost_usd).unwrap_or(0.0),
                ended: super::pass::is_terminal(st.and_then(|s| s.phase)),
            };
            Some((o.metadata.uid.clone()?, live))
        })
        .collect()
}

/// A staging directory for one order: named by a hash, so any object name fits a file name.
pub fn staging_dir(root: &Path, namespace: &str, name: &str) -> PathBuf {
    use sha2::{Digest, Sha256};
    let digest = hex::encode(Sha256::digest(format!("{namespace}/{name}").as_bytes()));
    root.join(&digest[..24])
}
