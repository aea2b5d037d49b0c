//! A provider's live connections: the RunPod client (instrumented), the volume's S3 store, and the
//! pod list shared by every order of the provider, ordered by a monotonic sequence.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex as SyncMutex, PoisonError};
use std::time::Duration;

use chrono::{DateTime, Utc};
use ep_api::RunPodProvider;
use ep_volume::S3Volume;
use ep_volume::store::S3Settings;
use k8s_openapi::api::core::v1::Secret;
use kube::{Api, ResourceExt};
use tokio::sync::{Mutex, RwLock};

use crate::metrics::Metrics;
use crate::reason::Reason;
use crate::runpod::{
    CatalogEntry, ClientOptions, GpuOffer, GpuQuery, NetworkVolume, Pod, PodSpec, RunPodApi, RunPodClient, RunPodError,
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
    #[error("reading RunPodProvider Secrets: {0}")]
    Kube(#[from] kube::Error),
}

impl ProviderError {
    pub fn reason(&self) -> Reason {
        match self {
            Self::Missing(_) => Reason::ProviderMissing,
            Self::Secret { .. } => Reason::SecretMissing,
            Self::Client { .. } => Reason::InvalidEndpoint,
            Self::Kube(_) => Reason::KubernetesUnavailable,
        }
    }
}

/// How long one catalog answer serves the orders of a provider. Many orders provisioned together
/// ask the same question; one answer a few seconds old is as good (a GPU that sold out meanwhile
/// fails its create with a capacity error and the next choice is tried).
const CATALOG_FRESH: Duration = Duration::from_secs(10);

/// The RunPod client with a metric per call and a short-lived catalog.
pub struct Instrumented {
    inner: RunPodClient,
    metrics: Arc<Metrics>,
    catalog: SyncMutex<Vec<(GpuQuery, std::time::Instant, Vec<GpuOffer>)>>,
    volumes: SyncMutex<Option<(std::time::Instant, Vec<NetworkVolume>)>>,
    catalog_asked: SyncMutex<Option<std::time::Instant>>,
}

impl Instrumented {
    async fn call<T>(
        &self,
        op: &'static str,
        f: impl Future<Output = Result<T, RunPodError>>,
    ) -> Result<T, RunPodError> {
        let start = std::time::Instant::now();
        let r = f.await;
        self.metrics.runpod_call(op, r.as_ref().map_or_else(RunPodError::category, |_| "ok"), start.elapsed());
        self.metrics.rate_limits();
        r
    }

    /// Whether the catalog shown in status is due for a refresh (at most once per `every`,
    /// counted here rather than from status, so a status that cannot hold it costs no calls).
    pub fn catalog_due(&self, every: Duration) -> bool {
        let mut at = self.catalog_asked.lock().unwrap_or_else(PoisonError::into_inner);
        if at.is_some_and(|t| t.elapsed() < every) {
            return false;
        }
        *at = Some(std::time::Instant::now());
        true
    }

    /// The account's network volumes, from an answer at most `max_age` old.
    pub async fn network_volumes_within(&self, max_age: Duration) -> Result<Vec<NetworkVolume>, RunPodError> {
        if let Some((at, v)) = &*self.volumes.lock().unwrap_or_else(PoisonError::into_inner)
            && at.elapsed() < max_age
        {
            return Ok(v.clone());
        }
        let v = self.call("network_volumes", self.inner.network_volumes()).await?;
        *self.volumes.lock().unwrap_or_else(PoisonError::into_inner) = Some((std::time::Instant::now(), v.clone()));
        Ok(v)
    }
}

impl RunPodApi for Instrumented {
    async fn create_pod(&self, spec: &PodSpec) -> Result<Pod, RunPodError> {
        self.call("create_pod", self.inner.create_pod(spec)).await
    }
    async fn get_pod(&self, id: &str) -> Result<Option<Pod>, RunPodError> {
        self.call("get_pod", self.inner.get_pod(id)).await
    }
    async fn list_pods(&self) -> Result<Vec<Pod>, RunPodError> {
        self.call("list_pods", self.inner.list_pods()).await
    }
    async fn stop_pod(&self, id: &str) -> Result<(), RunPodError> {
        self.call("stop_pod", self.inner.stop_pod(id)).await
    }
    async fn resume_pod(&self, id: &str, gpu_count: i32) -> Result<(), RunPodError> {
        self.call("resume_pod", self.inner.resume_pod(id, gpu_count)).await
    }
    async fn terminate_pod(&self, id: &str) -> Result<(), RunPodError> {
        self.call("terminate_pod", self.inner.terminate_pod(id)).await
    }
    async fn gpu_types(&self, query: &GpuQuery) -> Result<Vec<GpuOffer>, RunPodError> {
        let fresh = |c: &mut Vec<(GpuQuery, std::time::Instant, Vec<GpuOffer>)>| {
            c.retain(|(_, at, _)| at.elapsed() < CATALOG_FRESH);
            c.iter().find(|(q, _, _)| q == query).map(|(_, _, offers)| offers.clone())
        };
        if let Some(offers) = fresh(&mut self.catalog.lock().unwrap_or_else(PoisonError::into_inner)) {
            return Ok(offers);
        }
        let offers = self.call("gpu_types", self.inner.gpu_types(query)).await?;
        let mut c = self.catalog.lock().unwrap_or_else(PoisonError::into_inner);
        c.push((query.clone(), std::time::Instant::now(), offers.clone()));
        Ok(offers)
    }
    async fn network_volumes(&self) -> Result<Vec<NetworkVolume>, RunPodError> {
        self.call("network_volumes", self.inner.network_volumes()).await
    }
    fn supports_terminate_after(&self) -> bool {
        self.inner.supports_terminate_after()
    }
    fn self_terminate_base(&self) -> Option<String> {
        self.inner.self_terminate_base()
    }
    async fn container_logs(&self, id: &str) -> Result<Option<String>, RunPodError> {
        self.call("container_logs", self.inner.container_logs(id)).await
    }
    async fn turn(&self) {
        self.inner.turn().await;
    }
    fn spacing(&self, share: f64) -> Duration {
        self.inner.spacing(share)
    }
    async fn catalog(&self, data_center: &str) -> Result<Vec<CatalogEntry>, RunPodError> {
        self.call("catalog", self.inner.catalog(data_center)).await
    }
}

/// One process-wide sequence that orders pod-list fetches against creates: a list is trusted for
/// a create only when its fetch started after the create call returned. Wall-clock times are not
/// used for this (status times are whole seconds, list times are not).
#[derive(Debug, Default)]
pub struct Sequence {
    next: AtomicU64,
    /// The sequence number taken when each order's last create returned (by order uid).
    creates: SyncMutex<HashMap<String, u64>>,
}

impl Sequence {
    fn tick(&self) -> u64 {
        self.next.fetch_add(1, Ordering::SeqCst) + 1
    }

    /// Records that the create of `order_uid` returned now.
    pub fn created(&self, order_uid: &str) {
        let n = self.tick();
        self.creates.lock().unwrap_or_else(PoisonError::into_inner).insert(order_uid.to_owned(), n);
    }

    /// The mark a list must be newer than to be trusted for `order_uid` (0: any list of this
    /// process; a create made by an earlier process returned before this one started).
    pub fn mark(&self, order_uid: &str) -> u64 {
        self.creates.lock().unwrap_or_else(PoisonError::into_inner).get(order_uid).copied().unwrap_or(0)
    }

    /// Forgets an order that ended.
    pub fn forget(&self, order_uid: &str) {
        self.creates.lock().unwrap_or_else(PoisonError::into_inner).remove(order_uid);
    }
}

/// The account's pods as of one list call.
#[derive(Clone, Debug)]
pub struct PodList {
    pub pods: Arc<Vec<Pod>>,
    pub fetched_at: DateTime<Utc>,
    /// Sequence number taken when the fetch started.
    pub seq: u64,
}

/// One provider, connected: its RunPod API, its volume and the shared pod list.
pub struct Conn<A, S> {
    pub name: String,
    pub api: A,
    pub store: S,
    pub volume_id: String,
    pub data_center: String,
    pub mount_path: String,
    pub sequence: Arc<Sequence>,
    fingerprint: String,
    pods: Mutex<Option<PodList>>,
}

impl<A: RunPodApi, S> Conn<A, S> {
    pub fn new(name: &str, api: A, store: S, volume: (&str, &str, &str), sequence: Arc<Sequence>) -> Self {
        let (volume_id, data_center, mount_path) = volume;
        Self {
            name: name.to_owned(),
            api,
            store,
            volume_id: volume_id.to_owned(),
            data_center: data_center.to_owned(),
            mount_path: mount_path.to_owned(),
            sequence,
            fingerprint: String::new(),
            pods: Mutex::new(None),
        }
    }

    /// The shared pod list, refreshed with one list call when it is older than `max_age` or not
    /// newer than `after`. Concurrent callers wait for the same call instead of making their own.
    ///
    /// Under RunPod's rate limit the list takes at most half of what the account has left: a
    /// list younger than that spacing serves every caller that can use it, and a caller that
    /// needs a newer one (after its create) waits for the spacing to pass.
    pub async fn pods(&self, max_age: Duration, after: u64) -> Result<PodList, RunPodError> {
        let mut slot = self.pods.lock().await;
        let spacing = self.api.spacing(0.5);
        if let Some(list) = slot.as_ref() {
            let age = (Utc::now() - list.fetched_at).to_std().unwrap_or_default();
            if list.seq > after && age < max_age.max(spacing) {
                return Ok(list.clone());
            }
            if age < spacing {
                tokio::time::sleep(spacing - age).await;
            }
        }
        let seq = self.sequence.tick();
        let list = PodList { pods: Arc::new(self.api.list_pods().await?), fetched_at: Utc::now(), seq };
        *slot = Some(list.clone());
        Ok(list)
    }

    /// A list fetched after the last create of `order_uid` returned, at most `max_age` old.
    pub async fn pods_for(&self, order_uid: &str, max_age: Duration) -> Result<PodList, RunPodError> {
        self.pods(max_age, self.sequence.mark(order_uid)).await
    }

    /// Forgets the shared list (after a create or terminate, so the next look is fresh).
    pub async fn invalidate(&self) {
        *self.pods.lock().await = None;
    }
}

/// The connection type of a real provider.
pub type ProviderConn = Conn<Instrumented, S3Volume>;

/// A provider's secret values: the RunPod API key, the S3 access key id and secret.
pub struct Credentials {
    api_key: String,
    s3_access_key: String,
    s3_secret_key: String,
}

/// Reads a provider's Secrets as `client` is allowed to (the operator's service account, or a
/// person's own kubeconfig in the kubectl plugin). Also returns a fingerprint of the spec and the
/// Secrets' resourceVersions, so a rotated Secret is noticed.
pub async fn credentials(
    client: &kube::Client,
    provider: &RunPodProvider,
) -> Result<(Credentials, String), ProviderError> {
    let name = provider.name_any();
    let spec = &provider.spec;
    let k = &spec.api.api_key_secret_ref;
    let (mut api, rv1) =
        read_secret(client, &name, "spec.api.apiKeySecretRef", &k.namespace, &k.name, &[&k.key]).await?;
    let c = &spec.s3.credentials_secret_ref;
    let field = "spec.s3.credentialsSecretRef";
    let keys = [c.access_key_id_key.as_str(), c.secret_access_key_key.as_str()];
    let (mut s3, rv2) = read_secret(client, &name, field, &c.namespace, &c.name, &keys).await?;
    let fingerprint = format!("{}|{rv1}|{rv2}", serde_json::to_string(spec).unwrap_or_default());
    let s3_secret_key = s3.pop().unwrap_or_default();
    let s3_access_key = s3.pop().unwrap_or_default();
    Ok((Credentials { api_key: api.pop().unwrap_or_default(), s3_access_key, s3_secret_key }, fingerprint))
}

/// The network volume of a provider, read with its S3 Secret alone: what people who push code or
/// read a run's files need, without the RunPod API key (which can rent pods).
pub async fn volume(client: &kube::Client, provider: &RunPodProvider) -> Result<S3Volume, ProviderError> {
    let (spec, name) = (&provider.spec, provider.name_any());
    let c = &spec.s3.credentials_secret_ref;
    let keys = [c.access_key_id_key.as_str(), c.secret_access_key_key.as_str()];
    let (mut s3, _) = read_secret(client, &name, "spec.s3.credentialsSecretRef", &c.namespace, &c.name, &keys).await?;
    let secret = s3.pop().unwrap_or_default();
    let access = s3.pop().unwrap_or_default();
    let vol = &spec.network_volume;
    Ok(S3Volume::new(S3Settings::new(&spec.s3.endpoint, &vol.data_center, &vol.id, &access, &secret)))
}

/// The RunPod client and the volume store of a provider.
pub fn clients(provider: &RunPodProvider, creds: &Credentials) -> Result<(RunPodClient, S3Volume), ProviderError> {
    let spec = &provider.spec;
    let inner = RunPodClient::new(spec.api.transport, &spec.api.endpoint, &creds.api_key, ClientOptions::default())
        .map_err(|e| ProviderError::Client { provider: provider.name_any(), message: e.to_string() })?;
    let vol = &spec.network_volume;
    let store = S3Volume::new(S3Settings::new(
        &spec.s3.endpoint,
        &vol.data_center,
        &vol.id,
        &creds.s3_access_key,
        &creds.s3_secret_key,
    ));
    Ok((inner, store))
}

/// Connections per provider name, rebuilt when the provider or its Secrets change.
#[derive(Default)]
pub struct ProviderPool {
    conns: RwLock<HashMap<String, Arc<ProviderConn>>>,
    sequence: Arc<Sequence>,
}

/// A key of a Secret's `data` (the API server merges `stringData` into `data` on write and never
/// returns `stringData`).
fn secret_value(secret: &Secret, key: &str) -> Option<String> {
    secret.data.as_ref().and_then(|d| d.get(key)).and_then(|v| String::from_utf8(v.0.clone()).ok())
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
    /// The sequence shared by every connection of the pool.
    pub fn sequence(&self) -> Arc<Sequence> {
        self.sequence.clone()
    }

    /// The connection for `provider`, reading its Secrets (values never leave this function except
    /// into the clients). The provider reconciler calls this every poll, so rotated Secrets apply.
    pub async fn connect(
        &self,
        client: &kube::Client,
        provider: &RunPodProvider,
        metrics: &Arc<Metrics>,
    ) -> Result<Arc<ProviderConn>, ProviderError> {
        let name = provider.name_any();
        let spec = &provider.spec;
        let (creds, fingerprint) = credentials(client, provider).await?;
        if let Some(c) = self.conns.read().await.get(&name)
            && c.fingerprint == fingerprint
        {
            return Ok(c.clone());
        }
        let (inner, store) = clients(provider, &creds)?;
        let vol = &spec.network_volume;
        let api = Instrumented {
            inner,
            metrics: metrics.clone(),
            catalog: SyncMutex::default(),
            volumes: SyncMutex::default(),
            catalog_asked: SyncMutex::default(),
        };
        let mut conn =
            Conn::new(&name, api, store, (&vol.id, &vol.data_center, &vol.mount_path), self.sequence.clone());
        conn.fingerprint = fingerprint;
        let conn = Arc::new(conn);
        self.conns.write().await.insert(name, conn.clone());
        Ok(conn)
    }

    /// The connection of provider `name` as the provider reconciler last made it, else one made
    /// now. Orders use this: no Secret reads per pass.
    pub async fn get(
        &self,
        client: &kube::Client,
        provider: &RunPodProvider,
        metrics: &Arc<Metrics>,
    ) -> Result<Arc<ProviderConn>, ProviderError> {
        if let Some(c) = self.conns.read().await.get(&provider.name_any()) {
            return Ok(c.clone());
        }
        self.connect(client, provider, metrics).await
    }

    /// Every connection made so far.
    pub async fn all(&self) -> Vec<Arc<ProviderConn>> {
        self.conns.read().await.values().cloned().collect()
    }
}

/// Pods each provider's account held at the provider's last pass (to record the ones that went away).
#[derive(Default)]
pub struct SeenPods(SyncMutex<HashMap<String, HashMap<String, crate::registry::InstanceRow>>>);

impl SeenPods {
    /// Records the pods seen now for `provider`; returns the ones seen last time and gone now.
    pub fn replace(
        &self,
        provider: &str,
        now: HashMap<String, crate::registry::InstanceRow>,
    ) -> Vec<crate::registry::InstanceRow> {
        let mut seen = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        let prev = seen.remove(provider).unwrap_or_default();
        let gone = prev.into_iter().filter(|(id, _)| !now.contains_key(id)).map(|(_, r)| r).collect();
        seen.insert(provider.to_owned(), now);
        gone
    }
}
