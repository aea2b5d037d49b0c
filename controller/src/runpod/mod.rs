//! The RunPod API client: one trait, two transports (GraphQL and REST v2) chosen per provider.
//!
//! Rules that hold for both transports: values travel as GraphQL variables or JSON bodies, never
//! pasted into query text; the API key goes only in the Authorization header and never into logs
//! or errors; every request has a timeout and a User-Agent; transient failures are retried with
//! capped, jittered exponential backoff honouring Retry-After; a create that may have reached
//! RunPod is never retried automatically (the caller lists pods and adopts first).

mod error;
mod graphql;
mod http;
pub mod pace;
mod rest;

use std::collections::BTreeMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use ep_api::CloudType;

pub use error::RunPodError;
pub use graphql::GraphqlTransport;
pub use http::{ClientOptions, RetryPolicy};
pub use rest::RestTransport;

/// What a new pod should look like.
#[derive(Clone, Debug, PartialEq)]
pub struct PodSpec {
    /// Deterministic name derived from the run id (RunPod names are not unique; the operator
    /// adopts by name before it creates).
    pub name: String,
    pub image: String,
    pub gpu_type_id: String,
    pub gpu_count: i32,
    pub cloud_type: CloudType,
    pub data_center_id: Option<String>,
    pub network_volume_id: Option<String>,
    pub volume_mount_path: String,
    pub container_disk_gb: i32,
    pub env: BTreeMap<String, String>,
    /// e.g. `22/tcp`; empty for none.
    pub ports: Vec<String>,
    /// argv of the container's start command; None keeps the image default.
    pub start_command: Option<Vec<String>>,
    /// RunPod terminates the pod at this time even if nobody asks (dead-man's switch).
    pub terminate_after: Option<DateTime<Utc>>,
}

/// RunPod's `desiredStatus` (GraphQL) or `status` (REST v2).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PodStatus {
    Running,
    Exited,
    Terminated,
    Other(String),
}

impl PodStatus {
    fn parse(s: &str) -> Self {
        match s {
            "RUNNING" => Self::Running,
            "EXITED" => Self::Exited,
            "TERMINATED" => Self::Terminated,
            other => Self::Other(other.to_owned()),
        }
    }
}

/// A pod as RunPod reports it.
#[derive(Clone, Debug, PartialEq)]
pub struct Pod {
    pub id: String,
    pub name: String,
    pub status: PodStatus,
    pub image: String,
    pub env: BTreeMap<String, String>,
    pub gpu_type_id: Option<String>,
    pub gpu_display_name: Option<String>,
    pub gpu_count: i32,
    pub cost_per_hr: f64,
    pub machine_id: Option<String>,
    pub data_center_id: Option<String>,
    pub network_volume_id: Option<String>,
    /// None until the container runs (RunPod reads RUNNING from the moment of creation).
    pub runtime: Option<Runtime>,
}

/// A running container.
#[derive(Clone, Debug, PartialEq)]
pub struct Runtime {
    pub uptime_seconds: i64,
    /// None until the ports are mapped (they can lag the runtime).
    pub ports: Option<Vec<PortMapping>>,
    pub gpu_ids: Vec<String>,
}

/// A port of a running container.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PortMapping {
    pub ip: String,
    pub is_public: bool,
    pub private_port: i32,
    pub public_port: i32,
    pub kind: String,
}

/// What to ask the catalog.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct GpuQuery {
    /// One gpu type id, or every type.
    pub id: Option<String>,
    pub gpu_count: i32,
    pub cloud_type: CloudType,
    pub data_center_id: Option<String>,
}

/// A GPU type with its live price and stock for a query.
#[derive(Clone, Debug, PartialEq)]
pub struct GpuOffer {
    pub id: String,
    pub display_name: String,
    pub memory_gb: i32,
    pub max_gpu_count: i32,
    /// USD per hour for the whole request (all GPUs), on-demand.
    pub price_per_hour: Option<f64>,
    /// High, Medium, Low, None, or unknown.
    pub stock: Stock,
}

/// One GPU type of the catalog: prices per cloud and where it is in stock.
#[derive(Clone, Debug, PartialEq)]
pub struct CatalogEntry {
    pub id: String,
    pub display_name: String,
    pub memory_gb: i32,
    /// USD per GPU-hour, on-demand.
    pub secure_price: Option<f64>,
    pub community_price: Option<f64>,
    /// Stock per data center and cloud.
    pub availability: Vec<Availability>,
}

/// Stock of one GPU type in one data center and cloud.
#[derive(Clone, Debug, PartialEq)]
pub struct Availability {
    pub data_center_id: String,
    pub cloud: CloudType,
    pub stock: Stock,
}

/// Stock as RunPod reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stock {
    High,
    Medium,
    Low,
    None,
    Unknown,
}

impl Stock {
    fn parse(s: Option<&str>) -> Self {
        match s.map(str::to_ascii_uppercase).as_deref() {
            Some("HIGH") => Self::High,
            Some("MEDIUM") => Self::Medium,
            Some("LOW") => Self::Low,
            Some("NONE") => Self::None,
            _ => Self::Unknown,
        }
    }
    /// Whether a create can be expected to succeed (stock is advisory either way).
    pub fn available(self) -> bool {
        matches!(self, Self::High | Self::Medium | Self::Low)
    }
    /// Higher is more.
    pub fn rank(self) -> u8 {
        match self {
            Self::High => 4,
            Self::Medium => 3,
            Self::Low => 2,
            Self::None => 1,
            Self::Unknown => 0,
        }
    }
    pub fn as_str(self) -> &'static str {
        match self {
            Self::High => "High",
            Self::Medium => "Medium",
            Self::Low => "Low",
            Self::None => "None",
            Self::Unknown => "Unknown",
        }
    }
}

/// A network volume.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetworkVolume {
    pub id: String,
    pub name: String,
    pub size_gb: i64,
    pub data_center_id: String,
}

/// The operations the operator needs, whatever the transport.
pub trait RunPodApi: Send + Sync {
    /// Creates an on-demand pod. Never retried automatically once it may have reached RunPod.
    fn create_pod(&self, spec: &PodSpec) -> impl Future<Output = Result<Pod, RunPodError>> + Send;
    /// One pod; `None` when RunPod does not know it (gone).
    fn get_pod(&self, id: &str) -> impl Future<Output = Result<Option<Pod>, RunPodError>> + Send;
    /// Every pod of the account, in one call.
    fn list_pods(&self) -> impl Future<Output = Result<Vec<Pod>, RunPodError>> + Send;
    fn stop_pod(&self, id: &str) -> impl Future<Output = Result<(), RunPodError>> + Send;
    fn resume_pod(&self, id: &str, gpu_count: i32) -> impl Future<Output = Result<(), RunPodError>> + Send;
    /// Terminates a pod; a pod that is already gone counts as success.
    fn terminate_pod(&self, id: &str) -> impl Future<Output = Result<(), RunPodError>> + Send;
    /// GPU types with live price and stock for a request.
    fn gpu_types(&self, query: &GpuQuery) -> impl Future<Output = Result<Vec<GpuOffer>, RunPodError>> + Send;
    fn network_volumes(&self) -> impl Future<Output = Result<Vec<NetworkVolume>, RunPodError>> + Send;
    /// Whether a create can carry `terminateAfter` (REST v2 has no such field).
    fn supports_terminate_after(&self) -> bool;
    /// Where a pod reaches this API to end itself with its own pod-scoped RUNPOD_API_KEY, on the
    /// transports without terminateAfter (the REST base, e.g. `https://rest.runpod.io`).
    fn self_terminate_base(&self) -> Option<String>;
    /// The pod's container log (REST v2 `GET /v2/pods/{id}/logs`); None where the transport has none.
    fn container_logs(&self, _id: &str) -> impl Future<Output = Result<Option<String>, RunPodError>> + Send {
        async { Ok(None) }
    }
    /// Waits for the account's next turn under RunPod's rate limit; a call made right after,
    /// inside [`pace::prepaid`], does not queue again. Lets a time-bounded call (the create)
    /// spend its bound on RunPod's answer only.
    fn turn(&self) -> impl Future<Output = ()> + Send {
        async {}
    }
    /// The interval at which one kind of request uses at most `share` of what the account's
    /// rate limit has left (zero when RunPod sent no limit).
    fn spacing(&self, _share: f64) -> Duration {
        Duration::ZERO
    }
    /// The whole GPU catalog with prices per cloud and stock per data center. Built from two
    /// `gpu_types` questions (secure, community) at `data_center` where the transport has no
    /// catalog of its own (GraphQL).
    fn catalog(&self, data_center: &str) -> impl Future<Output = Result<Vec<CatalogEntry>, RunPodError>> + Send {
        async move {
            let ask = |cloud| GpuQuery {
                id: None,
                gpu_count: 1,
                cloud_type: cloud,
                data_center_id: Some(data_center.to_owned()),
            };
            let secure = self.gpu_types(&ask(CloudType::Secure)).await?;
            let community = self.gpu_types(&ask(CloudType::Community)).await?;
            Ok(secure
                .into_iter()
                .map(|s| {
                    let c = community.iter().find(|c| c.id == s.id);
                    let mut availability = vec![Availability {
                        data_center_id: data_center.to_owned(),
                        cloud: CloudType::Secure,
                        stock: s.stock,
                    }];
                    if let Some(c) = c {
                        availability.push(Availability {
                            data_center_id: data_center.to_owned(),
                            cloud: CloudType::Community,
                            stock: c.stock,
                        });
                    }
                    CatalogEntry {
                        id: s.id,
                        display_name: s.display_name,
                        memory_gb: s.memory_gb,
                        secure_price: s.price_per_hour,
                        community_price: c.and_then(|c| c.price_per_hour),
                        availability,
                    }
                })
                .collect())
        }
    }
}

/// The transport a provider speaks, chosen at run time.
#[derive(Clone, Debug)]
pub enum RunPodClient {
    Graphql(GraphqlTransport),
    Rest(RestTransport),
}

impl RunPodClient {
    /// A client for `transport` at `endpoint` (e.g. `https://api.runpod.io`).
    pub fn new(
        transport: ep_api::provider::Transport,
        endpoint: &str,
        api_key: &str,
        opts: ClientOptions,
    ) -> Result<Self, RunPodError> {
        Ok(match transport {
            ep_api::provider::Transport::Graphql => Self::Graphql(GraphqlTransport::new(endpoint, api_key, opts)?),
            ep_api::provider::Transport::RestV2 => Self::Rest(RestTransport::new(endpoint, api_key, opts)?),
        })
    }
}

macro_rules! delegate {
    ($self:ident, $c:ident => $e:expr) => {
        match $self {
            RunPodClient::Graphql($c) => $e,
            RunPodClient::Rest($c) => $e,
        }
    };
}

impl RunPodApi for RunPodClient {
    async fn create_pod(&self, spec: &PodSpec) -> Result<Pod, RunPodError> {
        delegate!(self, c => c.create_pod(spec).await)
    }
    async fn get_pod(&self, id: &str) -> Result<Option<Pod>, RunPodError> {
        delegate!(self, c => c.get_pod(id).await)
    }
    async fn list_pods(&self) -> Result<Vec<Pod>, RunPodError> {
        delegate!(self, c => c.list_pods().await)
    }
    async fn stop_pod(&self, id: &str) -> Result<(), RunPodError> {
        delegate!(self, c => c.stop_pod(id).await)
    }
    async fn resume_pod(&self, id: &str, gpu_count: i32) -> Result<(), RunPodError> {
        delegate!(self, c => c.resume_pod(id, gpu_count).await)
    }
    async fn terminate_pod(&self, id: &str) -> Result<(), RunPodError> {
        delegate!(self, c => c.terminate_pod(id).await)
    }
    async fn gpu_types(&self, query: &GpuQuery) -> Result<Vec<GpuOffer>, RunPodError> {
        delegate!(self, c => c.gpu_types(query).await)
    }
    async fn network_volumes(&self) -> Result<Vec<NetworkVolume>, RunPodError> {
        delegate!(self, c => c.network_volumes().await)
    }
    fn supports_terminate_after(&self) -> bool {
        delegate!(self, c => c.supports_terminate_after())
    }
    fn self_terminate_base(&self) -> Option<String> {
        delegate!(self, c => c.self_terminate_base())
    }
    async fn container_logs(&self, id: &str) -> Result<Option<String>, RunPodError> {
        delegate!(self, c => c.container_logs(id).await)
    }
    async fn turn(&self) {
        delegate!(self, c => c.http.turn().await);
    }
    fn spacing(&self, share: f64) -> Duration {
        delegate!(self, c => c.http.spacing(share))
    }
    async fn catalog(&self, data_center: &str) -> Result<Vec<CatalogEntry>, RunPodError> {
        delegate!(self, c => c.catalog(data_center).await)
    }
}

/// Default per-request timeout; creation is slower on RunPod's side.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);
