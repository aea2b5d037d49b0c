//! `RunPodProvider`: a RunPod account and its network volume.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::common::NamespacedSecretKeyRef;

/// Desired state of a provider: the account's API, credentials and network volume.
#[derive(CustomResource, KubeSchema, Clone, Debug, PartialEq, Serialize, Deserialize)]
#[kube(
    group = "ep.dev",
    version = "v1alpha1",
    kind = "RunPodProvider",
    cel,
    status = "RunPodProviderStatus",
    shortname = "rpp",
    category = "ep",
    doc = "A RunPod account, its API endpoint and the network volume experiments run on.",
    printcolumn(name = "Ready", type_ = "string", json_path = ".status.conditions[?(@.type==\"Ready\")].status"),
    printcolumn(name = "Data Center", type_ = "string", json_path = ".spec.networkVolume.dataCenter"),
    printcolumn(name = "Volume", type_ = "string", json_path = ".spec.networkVolume.id"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[serde(rename_all = "camelCase")]
pub struct RunPodProviderSpec {
    /// RunPod API endpoint and credentials.
    pub api: ApiEndpoint,
    /// The network volume mounted by every pod of this provider.
    pub network_volume: NetworkVolumeRef,
    /// The volume's S3 API.
    pub s3: S3Endpoint,
}

/// Which RunPod API to speak.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum Transport {
    /// `POST <endpoint>/graphql`: rate-limited since 2026-09-17, retired by RunPod in early 2027.
    Graphql,
    /// `<endpoint>/v2/...` (REST v2, the default).
    #[default]
    RestV2,
}

/// RunPod API endpoint.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ApiEndpoint {
    /// restV2 (the default) or graphql (retiring).
    #[serde(default)]
    pub transport: Transport,
    /// Base URL, e.g. `https://api.runpod.io`.
    #[schemars(extend("x-kubernetes-validations" = [{"rule": "self.startsWith('https://') || self.startsWith('http://')", "message": "api.endpoint must be an http(s) URL"}]))]
    pub endpoint: String,
    /// Secret key holding the RunPod API key.
    pub api_key_secret_ref: NamespacedSecretKeyRef,
}

/// A RunPod network volume.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NetworkVolumeRef {
    /// Network volume id (also the S3 bucket name), e.g. `tgb8bx6fwl`.
    #[schemars(length(min = 1))]
    pub id: String,
    /// Data center of the volume (upper case, e.g. `EU-RO-1`); pods are placed there.
    #[schemars(regex(pattern = r"^[A-Z]{2,3}-[A-Z]{2,3}-[0-9]+$"))]
    pub data_center: String,
    /// Where pods mount the volume.
    #[serde(default = "default_mount_path")]
    #[schemars(extend("x-kubernetes-validations" = [{"rule": "self.startsWith('/')", "message": "networkVolume.mountPath must be absolute"}]))]
    pub mount_path: String,
}

fn default_mount_path() -> String {
    "/workspace".to_owned()
}

/// The S3 API of the network volume.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct S3Endpoint {
    /// Endpoint URL, e.g. `https://s3api-eu-ro-1.runpod.io`.
    #[schemars(extend("x-kubernetes-validations" = [{"rule": "self.startsWith('https://') || self.startsWith('http://')", "message": "s3.endpoint must be an http(s) URL"}]))]
    pub endpoint: String,
    /// Secret with the S3 API key (separate from the RunPod API key).
    pub credentials_secret_ref: S3CredentialsRef,
}

/// Secret holding S3 credentials.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct S3CredentialsRef {
    /// Namespace of the Secret.
    pub namespace: String,
    /// Name of the Secret.
    pub name: String,
    /// Key of the access key id (RunPod: the `user_...` id).
    #[serde(default = "default_access_key")]
    pub access_key_id_key: String,
    /// Key of the secret access key (RunPod: `rps_...`).
    #[serde(default = "default_secret_key")]
    pub secret_access_key_key: String,
}

fn default_access_key() -> String {
    "accessKeyId".to_owned()
}

fn default_secret_key() -> String {
    "secretAccessKey".to_owned()
}

/// Observed state of a provider.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RunPodProviderStatus {
    /// Standard conditions; `Ready` says whether the account and volume answer.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Volume size in GB as RunPod reports it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume_size_gb: Option<i64>,
    /// Pods the account holds that no order owns (reported, terminated only if settings say so).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub orphan_pods: Vec<String>,
    /// RunPod's GPU catalog as this provider sees it (`kubectl ep gpus` prints it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub catalog: Option<ProviderCatalog>,
}

/// RunPod's GPU catalog, refreshed about once a minute.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ProviderCatalog {
    /// When RunPod was asked.
    pub observed_at: k8s_openapi::apimachinery::pkg::apis::meta::v1::Time,
    /// Every GPU type of the catalog.
    #[serde(default)]
    pub gpus: Vec<CatalogGpu>,
}

/// One GPU type of RunPod's catalog.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CatalogGpu {
    /// RunPod's gpu type id, e.g. `NVIDIA L4`.
    pub id: String,
    /// RunPod's display name, e.g. `L4`.
    pub display_name: String,
    /// The operator's aliases for it (settings `gpuAliases`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub aliases: Vec<String>,
    /// GPU memory in GB.
    pub memory_gb: i32,
    /// On-demand USD per GPU-hour in the secure cloud, when offered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secure_price: Option<f64>,
    /// On-demand USD per GPU-hour in the community cloud, when offered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub community_price: Option<f64>,
    /// Stock at the volume's data center, where this provider's pods run: High, Medium, Low, None
    /// or Unknown.
    pub stock: String,
    /// Data centers with stock (REST v2 only; GraphQL reports the volume's data center alone).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub data_centers: Vec<String>,
    /// Policies that may rent it here: the policy's cloud offers it, within its maxCostPerHour.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub policies: Vec<String>,
}
