//! What every reconciler shares: the Kubernetes client and the caches of the three kinds,
//! settings, the provider pool, the registry projection, metrics, the event recorder and the
//! runner binary.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use ep_api::volume::keys;
use ep_api::{Experiment, RunPodOrder, RunPodProvider};
use ep_volume::{StoreError, VolumeStore};
use kube::Resource;
use kube::runtime::reflector::{ObjectRef, Store};

use crate::events::Events;
use crate::lenient::Lenient;
use crate::metrics::Metrics;
use crate::pool::{ProviderPool, SeenPods};
use crate::projection::Projector;
use crate::settings::SettingsHandle;

/// The controllers' caches (kube-runtime reflectors): every read of the three kinds comes from
/// here, never from a list call per reconcile.
#[derive(Clone)]
pub struct Stores {
    pub experiments: Store<Lenient<Experiment>>,
    pub orders: Store<Lenient<RunPodOrder>>,
    pub providers: Store<Lenient<RunPodProvider>>,
    /// The orders of each experiment, fed by the orders' watch.
    pub orders_by_experiment: crate::index::OrdersByExperiment,
}

fn decoded<K>(items: &[Arc<Lenient<K>>]) -> Vec<Arc<K>> {
    items.iter().filter_map(|l| l.get().cloned()).collect()
}

impl Stores {
    /// Waits until every cache holds its initial list.
    pub async fn ready(&self) {
        let _ = tokio::join!(
            self.providers.wait_until_ready(),
            self.experiments.wait_until_ready(),
            self.orders.wait_until_ready()
        );
    }

    /// Every order of a namespace.
    pub fn orders_in(&self, namespace: &str) -> Vec<Arc<RunPodOrder>> {
        decoded(&self.orders.state_filter(|o| o.meta().namespace.as_deref() == Some(namespace)))
    }

    /// The orders whose `spec.experimentRef` names an experiment.
    pub fn orders_of(&self, namespace: &str, experiment: &str) -> Vec<Arc<RunPodOrder>> {
        self.orders_by_experiment
            .names(namespace, experiment)
            .iter()
            .filter_map(|name| self.orders.get(&ObjectRef::new(name).within(namespace)))
            .filter_map(|l| l.get().cloned())
            .filter(|o| o.spec.experiment_ref.as_ref().is_some_and(|r| r.name == experiment))
            .collect()
    }

    pub fn all_orders(&self) -> Vec<Arc<RunPodOrder>> {
        decoded(&self.orders.state())
    }

    pub fn all_experiments(&self) -> Vec<Arc<Experiment>> {
        decoded(&self.experiments.state())
    }

    pub fn experiment(&self, namespace: &str, name: &str) -> Option<Arc<Experiment>> {
        self.experiments.get(&ObjectRef::new(name).within(namespace)).and_then(|l| l.get().cloned())
    }

    pub fn provider(&self, name: &str) -> Option<Arc<RunPodProvider>> {
        self.providers.get(&ObjectRef::new(name)).and_then(|l| l.get().cloned())
    }
}

/// Shared by every reconcile.
pub struct Context {
    pub client: kube::Client,
    pub stores: Stores,
    pub settings: SettingsHandle,
    pub providers: ProviderPool,
    /// Pods each provider's account held at the last pass.
    pub seen_pods: SeenPods,
    pub projector: Projector,
    pub metrics: Arc<Metrics>,
    pub events: Events,
    pub runner: RunnerBinary,
    /// Payload syncs running at once (settings `concurrency.syncs`, hot-reloaded).
    pub sync_slots: crate::slots::Slots,
    /// Pod creates in flight at once (one fewer than the reconcile slots).
    pub create_slots: crate::slots::Slots,
    /// Where ConfigMap payloads are staged before upload.
    pub staging: PathBuf,
}

impl Context {
    /// The poll interval in force.
    pub fn poll(&self) -> Duration {
        self.settings.current().poll_interval.get()
    }
}

/// The ep-runner binary the operator uploads to every volume it uses.
#[derive(Clone, Debug)]
pub struct RunnerBinary {
    pub path: PathBuf,
    pub version: String,
    pub sha256: String,
    pub size: u64,
}

impl RunnerBinary {
    /// Reads and hashes the binary once at start-up.
    pub fn load(path: &Path) -> std::io::Result<Self> {
        let size = std::fs::metadata(path)?.len();
        let sha256 = ep_volume::manifest::sha256_file(path)?;
        // The version names the key; the hash keeps two builds of one version apart.
        let version = format!("{}-{}", env!("CARGO_PKG_VERSION"), &sha256[..12]);
        Ok(Self { path: path.to_owned(), version, sha256, size })
    }

    /// Volume key of the binary.
    pub fn key(&self) -> String {
        keys::runner_binary(&self.version)
    }

    /// Uploads the binary (and its `.sha256`) unless the volume holds it already; verified by head.
    pub async fn ensure_on<S: VolumeStore>(&self, store: &S) -> Result<bool, StoreError> {
        let key = self.key();
        let ok = |i: Option<ep_volume::ObjectInfo>| {
            i.is_some_and(|i| i.size == self.size && i.sha256.as_deref() == Some(self.sha256.as_str()))
        };
        if ok(store.head(&key).await?) {
            return Ok(false);
        }
        store.put_file(&key, &self.path, self.size, &self.sha256).await?;
        let line = format!("{}  ep-runner\n", self.sha256);
        let line_sha = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(line.as_bytes()));
        store.put_bytes(&format!("{key}.sha256"), line.into(), &line_sha).await?;
        let after = store.head(&key).await?;
        if !ok(after.clone()) {
            return Err(StoreError::Request {
                op: "HeadObject",
                key,
                status: None,
                message: format!("runner binary on the volume does not match after upload: {after:?}"),
            });
        }
        Ok(true)
    }
}
