//! A provider's live connections: the RunPod client (instrumented), the volume's S3 store, and the
//! pod list shared by every order of the provider.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use ep_api::RunPodProvider;
use ep_volume::S3Volume;
use ep_volume::store::S3Settings;
use k8s_openapi::api::core::v1::Secret;
use kube::{Api, ResourceExt};
use tokio::sync::{Mutex, RwLock};

use crate::metrics::Metrics;
use crate::runpod::{
    ClientOptions, GpuOffer, GpuQuery, NetworkVolume, Pod, PodSpec, RunPodApi, RunPodClient, RunPodError,
};

/// Why a provider cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ProviderError {
    #[error("RunPodProvider {0} does not exist")]
    Missing(String),
    #[error("RunPodProvider {provider}: {field} names Secret {namespace}/{name}, which {problem}")]
    Secret { provider: String, field: &'static str, namespace: String, name: String, problem: String },
    #[error("RunPodProvider {provider}: {message}")]
    Client { provider: String, message: String },
    #[error(transparent)]
    Kube(#[from] kube::Error),
}

impl ProviderError {
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Missing(_) => "ProviderMissing",
            Self::Secret { .. } => "SecretMissing",
            Self::Client { .. } => "InvalidEndpoint",
            Self::Kube(_) => "KubernetesError",
        }
    }
}

/// The RunPod client with a metric per call.
pub struct Instrumented {
    inner: RunPodClient,
    metrics: Arc<Metrics>,
}

impl Instrumented {
    fn record<T>(&self, op: &'static str, r: &Result<T, RunPodError>) {
        self.metrics.runpod_call(op, r.as_ref().map_or_else(RunPodError::category, |_| "ok"));
    }
}

impl RunPodApi for Instrumented {
    async fn create_pod(&self, spec: &PodSpec) -> Result<Pod, RunPodError> {
        let r = self.inner.create_pod(spec).await;
        self.record("create_pod", &r);
        r
    }
    async fn get_pod(&self, id: &str) -> Result<Option<Pod>, RunPodError> {
        let r = self.inner.get_pod(id).await;
        self.record("get_pod", &r);
        r
    }
    async fn list_pods(&self) -> Result<Vec<Pod>, RunPodError> {
        let r = self.inner.list_pods().await;
        self.record("list_pods", &r);
        r
    }
    async fn stop_pod(&self, id: &str) -> Result<(), RunPodError> {
        let r = self.inner.stop_pod(id).await;
        self.record("stop_pod", &r);
        r
    }
    async fn resume_pod(&self, id: &str, gpu_count: i32) -> Result<(), RunPodError> {
        let r = self.inner.resume_pod(id, gpu_count).await;
        self.record("resume_pod", &r);
        r
    }
    async fn terminate_pod(&self, id: &str) -> Result<(), RunPodError> {
        let r = self.inner.terminate_pod(id).await;
        self.record("terminate_pod", &r);
        r
    }
    async fn gpu_types(&self, query: &GpuQuery) -> Result<Vec<GpuOffer>, RunPodError> {
        let r = self.inner.gpu_types(query).await;
        self.record("gpu_types", &r);
        r
    }
    async fn network_volumes(&self) -> Result<Vec<NetworkVolume>, RunPodError> {
        let r = self.inner.network_volumes().await;
        self.record("network_volumes", &r);
        r
    }
    fn supports_terminate_after(&self) -> bool {
        self.inner.supports_terminate_after()
    }
}

/// The account's pods as of one list call.
#[derive(Clone, Debug)]
pub struct PodList {
    pub pods: Arc<Vec<Pod>>,
    pub fetched_at: DateTime<Utc>,
}

/// One provider, connected.
pub struct Conn {
    pub name: String,
    pub api: Instrumented,
    pub store: S3Volume,
    pub volume_id: String,
    pub data_center: String,
    pub mount_path: String,
    fingerprint: String,
    pods: Mutex<Option<PodList>>,
}

impl Conn {
    /// The shared pod list, refreshed with one list call when it is older than `max_age`.
    /// Concurrent callers wait for the same call instead of making their own.
    pub async fn pods(&self, max_age: Duration) -> Result<PodList, RunPodError> {
        let mut slot = self.pods.lock().await;
        if let Some(list) = slot.as_ref()
            && (Utc::now() - list.fetched_at).to_std().unwrap_or_default() < max_age
        {
            return Ok(list.clone());
        }
        let list = PodList { pods: Arc::new(self.api.list_pods().await?), fetched_at: Utc::now() };
        *slot = Some(list.clone());
        Ok(list)
    }

    /// A list fetched after `after` (forcing a call if the shared one is older).
    pub async fn pods_since(&self, after: DateTime<Utc>, max_age: Duration) -> Result<PodList, RunPodError> {
        let list = self.pods(max_age).await?;
        if list.fetched_at > after {
            return Ok(list);
        }
        self.pods(Duration::ZERO).await
    }

    /// Forgets the shared list (after a create or terminate, so the next look is fresh).
    pub async fn invalidate(&self) {
        *self.pods.lock().await = None;
    }
}

/// Connections per provider name, rebuilt when the provider or its Secrets change.
#[derive(Default)]
pub struct ProviderPool {
    conns: RwLock<HashMap<String, Arc<Conn>>>,
}

fn secret_value(secret: &Secret, key: &str) -> Option<String> {
    if let Some(v) = secret.data.as_ref().and_then(|d| d.get(key)) {
        return String::from_utf8(v.0.clone()).ok();
    }
    secret.string_data.as_ref().and_then(|d| d.get(key)).cloned()
}

/// Reads `keys` of one Secret. Returns their values (trimmed, in order) and the Secret's
/// resourceVersion; a missing Secret, key or value is an error naming the provider field.
async fn read_secret(
    client: &kube::Client,
    provider: &str,
    field: &'static str,
    namespace: &str,
    name: &str,
    keys: &[&str],
) -> Result<(Vec<String>, String), ProviderError> {
    let err = |problem: String| ProviderError::Secret {
        provider: provider.to_owned(),
        field,
        namespace: namespace.to_owned(),
        name: name.to_owned(),
        problem,
    };
    let secret = Api::<Secret>::namespaced(client.clone(), namespace)
        .get_opt(name)
        .await?
        .ok_or_else(|| err("does not exist".into()))?;
    let mut values = Vec::with_capacity(keys.len());
    for key in keys {
        let value = secret_value(&secret, key).ok_or_else(|| err(format!("has no key {key:?}")))?;
        if value.trim().is_empty() {
            return Err(err(format!("has an empty {key:?}")));
        }
        values.push(value.trim().to_owned());
    }
    Ok((values, secret.resource_version().unwrap_or_default()))
}

impl ProviderPool {
    /// The connection for `provider`, reading its Secrets (values never leave this function except
    /// into the clients).
    pub async fn connect(
        &self,
        client: &kube::Client,
        provider: &RunPodProvider,
        metrics: &Arc<Metrics>,
    ) -> Result<Arc<Conn>, ProviderError> {
        let name = provider.name_any();
        let spec = &provider.spec;
        let k = &spec.api.api_key_secret_ref;
        let (mut api, rv1) =
            read_secret(client, &name, "spec.api.apiKeySecretRef", &k.namespace, &k.name, &[&k.key]).await?;
        let api_key = api.pop().unwrap_or_default();
        let c = &spec.s3.credentials_secret_ref;
        let field = "spec.s3.credentialsSecretRef";
        let keys = [c.access_key_id_key.as_str(), c.secret_access_key_key.as_str()];
        let (s3, rv2) = read_secret(client, &name, field, &c.namespace, &c.name, &keys).await?;
        let (access, secret) = (&s3[0], &s3[1]);
        let fingerprint = format!("{}|{rv1}|{rv2}", serde_json::to_string(spec).unwrap_or_default());
        if let Some(c) = self.conns.read().await.get(&name)
            && c.fingerprint == fingerprint
        {
            return Ok(c.clone());
        }
        let inner = RunPodClient::new(spec.api.transport, &spec.api.endpoint, &api_key, ClientOptions::default())
            .map_err(|e| ProviderError::Client { provider: name.clone(), message: e.to_string() })?;
        let vol = &spec.network_volume;
        let store = S3Volume::new(S3Settings::new(&spec.s3.endpoint, &vol.data_center, &vol.id, access, secret));
        let conn = Arc::new(Conn {
            name: name.clone(),
            api: Instrumented { inner, metrics: metrics.clone() },
            store,
            volume_id: vol.id.clone(),
            data_center: vol.data_center.clone(),
            mount_path: vol.mount_path.clone(),
            fingerprint,
            pods: Mutex::new(None),
        });
        self.conns.write().await.insert(name, conn.clone());
        Ok(conn)
    }

    /// The connection of provider `name` as the provider reconciler last made it (it reconnects
    /// every poll, rereading the Secrets), else one made now. Orders use this: no Secret reads per pass.
    pub async fn get(
        &self,
        client: &kube::Client,
        name: &str,
        metrics: &Arc<Metrics>,
    ) -> Result<Arc<Conn>, ProviderError> {
        if let Some(c) = self.conns.read().await.get(name) {
            return Ok(c.clone());
        }
        let provider = Api::<RunPodProvider>::all(client.clone())
            .get_opt(name)
            .await?
            .ok_or_else(|| ProviderError::Missing(name.to_owned()))?;
        self.connect(client, &provider, metrics).await
    }
}
