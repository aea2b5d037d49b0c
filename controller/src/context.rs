//! What every reconciler shares: clients, settings, the provider pool, the registry mirror,
//! metrics, the event recorder and the runner binary, plus the reconcile error type.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use ep_api::volume::keys;
use ep_volume::{StoreError, VolumeStore};
use k8s_openapi::api::core::v1::ObjectReference;
use kube::runtime::events::{Event, EventType, Recorder};
use tokio::sync::Semaphore;

use crate::metrics::Metrics;
use crate::mirror::Mirror;
use crate::provider::{ProviderError, ProviderPool, Seen};
use crate::runpod::RunPodError;
use crate::settings::SettingsHandle;

/// Shared by every reconcile.
pub struct Context {
    pub client: kube::Client,
    pub settings: SettingsHandle,
    pub providers: ProviderPool,
    /// Pods each provider's account held at the last pass.
    pub seen_pods: Seen,
    pub mirror: Mirror,
    pub metrics: Arc<Metrics>,
    pub recorder: Recorder,
    pub runner: RunnerBinary,
    /// Payload syncs running at once (settings `concurrency.syncs` at start-up).
    pub sync_slots: Semaphore,
    /// Where ConfigMap payloads are staged before upload.
    pub staging: PathBuf,
}

impl Context {
    /// Publishes an event; a failure to publish is logged, never fatal.
    pub async fn event(&self, reference: &ObjectReference, warning: bool, reason: &str, action: &str, note: String) {
        let ev = Event {
            type_: if warning { EventType::Warning } else { EventType::Normal },
            reason: reason.to_owned(),
            note: Some(note.chars().take(1000).collect()),
            action: action.to_owned(),
            secondary: None,
        };
        if let Err(e) = self.recorder.publish(&ev, reference).await {
            tracing::debug!(error = %e, reason, "event not published");
        }
    }

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

/// Whether `obj` carries `finalizer`.
pub fn has_finalizer<K: kube::Resource>(obj: &K, finalizer: &str) -> bool {
    obj.meta().finalizers.as_ref().is_some_and(|l| l.iter().any(|f| f == finalizer))
}

/// Adds or removes one finalizer with a merge patch that carries the resourceVersion read, so a
/// concurrent change makes it fail (409) and the next pass decides again.
pub async fn set_finalizer<K>(api: &kube::Api<K>, obj: &K, finalizer: &str, present: bool) -> Result<(), Error>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let mut list: Vec<String> =
        obj.meta().finalizers.clone().unwrap_or_default().into_iter().filter(|f| f != finalizer).collect();
    if present {
        list.push(finalizer.to_owned());
    }
    let name = obj.meta().name.clone().unwrap_or_default();
    let patch = serde_json::json!({"metadata": {"finalizers": list, "resourceVersion": obj.meta().resource_version}});
    api.patch(&name, &kube::api::PatchParams::default(), &kube::api::Patch::Merge(&patch)).await?;
    Ok(())
}

/// Why a reconcile failed. A bad spec waits for a change; the rest retry with backoff.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Kube(#[from] kube::Error),
    #[error(transparent)]
    RunPod(#[from] RunPodError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Provider(#[from] ProviderError),
    #[error("{0}")]
    Other(String),
}

impl Error {
    /// Stable label for metrics.
    pub fn category(&self) -> &'static str {
        match self {
            Self::Kube(_) => "kubernetes",
            Self::RunPod(e) => match e {
                RunPodError::RateLimited { .. } => "runpod_rate_limited",
                RunPodError::Unauthorized { .. } => "runpod_unauthorized",
                _ => "runpod",
            },
            Self::Store(_) => "s3",
            Self::Provider(_) => "provider",
            Self::Other(_) => "other",
        }
    }
}
