//! The simulated world's configuration (YAML, `--config FILE`), with a useful default.

use serde::{Deserialize, Serialize};

/// Everything that shapes the simulated RunPod account.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WorldConfig {
    /// API key accepted by GraphQL and REST (`--api-key` overrides).
    #[serde(default = "default_api_key")]
    pub api_key: String,
    /// S3 credentials of the network volumes.
    #[serde(default)]
    pub s3: S3Credentials,
    /// Simulated seconds per real second (billing, delays and terminateAfter follow it).
    #[serde(default = "one")]
    pub clock_speed: f64,
    #[serde(default)]
    pub account: Account,
    #[serde(default)]
    pub gpu_types: Vec<GpuTypeConfig>,
    #[serde(default)]
    pub data_centers: Vec<DataCenterConfig>,
    /// GPUs free per (gpu type, data center, cloud type).
    #[serde(default)]
    pub stock: Vec<StockConfig>,
    #[serde(default)]
    pub volumes: Vec<VolumeConfig>,
    #[serde(default)]
    pub pods: PodTiming,
    /// Whether `podRentInterruptable` works; RunPod refuses spot pods today.
    #[serde(default)]
    pub spot_enabled: bool,
    /// Largest single PUT the volume S3 API accepts (RunPod: under 500 MB).
    #[serde(default = "max_put")]
    pub s3_max_put_bytes: i64,
    #[serde(default)]
    pub faults: Faults,
    /// REST v2's account-wide rate limit (none when empty): windows answered in the `RateLimit`
    /// headers and enforced with 429.
    #[serde(default)]
    pub rate_limit: Vec<crate::ratelimit::RatePolicy>,
}

fn max_put() -> i64 {
    crate::s3::MAX_PUT_BYTES
}

fn default_api_key() -> String {
    "rpa_SIMULATOR0000000000000000000000".into()
}
fn one() -> f64 {
    1.0
}

/// S3 API key pair (RunPod: access key = user id, secret = `rps_...`).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct S3Credentials {
    pub access_key: String,
    pub secret_key: String,
}

impl Default for S3Credentials {
    fn default() -> Self {
        Self { access_key: "user_2simulator000000000000".into(), secret_key: "rps_SIMULATORSECRET000000000000".into() }
    }
}

/// The account.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Account {
    pub id: String,
    pub email: String,
    /// USD.
    pub balance: f64,
    /// USD per hour across all pods.
    pub spend_limit: f64,
}

impl Default for Account {
    fn default() -> Self {
        Self {
            id: "user_2simulator000000000000".into(),
            email: "sim@example.com".into(),
            balance: 500.0,
            spend_limit: 80.0,
        }
    }
}

/// One GPU type of the catalog.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GpuTypeConfig {
    pub id: String,
    pub display_name: String,
    #[serde(default = "nvidia")]
    pub manufacturer: String,
    pub memory_in_gb: i32,
    /// On-demand price per GPU-hour on Secure Cloud (None: not offered there).
    pub secure_price: Option<f64>,
    /// On-demand price per GPU-hour on Community Cloud (None: not offered there).
    pub community_price: Option<f64>,
    #[serde(default = "eight")]
    pub max_gpu_count: i32,
}

fn nvidia() -> String {
    "Nvidia".into()
}
fn eight() -> i32 {
    8
}

/// A data center.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DataCenterConfig {
    pub id: String,
    pub name: String,
    pub location: String,
}

/// Free GPUs of one type in one data center and cloud tier.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct StockConfig {
    pub gpu_type_id: String,
    pub data_center_id: String,
    /// SECURE or COMMUNITY.
    #[serde(default = "secure")]
    pub cloud_type: String,
    pub count: u32,
}

fn secure() -> String {
    "SECURE".into()
}

/// A network volume.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct VolumeConfig {
    pub id: String,
    pub name: String,
    /// GB; writes beyond it get HTTP 507.
    pub size_gb: u64,
    pub data_center_id: String,
}

/// How pods behave over time (simulated seconds).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PodTiming {
    /// Seconds from create (or resume) until `runtime` appears and the start command runs.
    #[serde(default = "five")]
    pub start_delay_seconds: f64,
    /// Further seconds until `runtime.ports` appears.
    #[serde(default = "two")]
    pub ports_delay_seconds: f64,
    /// How long a terminated pod still shows in lists as TERMINATED.
    #[serde(default)]
    pub terminated_visible_seconds: f64,
    /// Grace between SIGTERM and SIGKILL when a pod stops (docker's default is 10 s).
    #[serde(default = "ten")]
    pub stop_grace_seconds: f64,
}

fn five() -> f64 {
    5.0
}
fn two() -> f64 {
    2.0
}
fn ten() -> f64 {
    10.0
}

impl Default for PodTiming {
    fn default() -> Self {
        Self {
            start_delay_seconds: 5.0,
            ports_delay_seconds: 2.0,
            terminated_visible_seconds: 0.0,
            stop_grace_seconds: 10.0,
        }
    }
}

/// Injected faults. Counts are consumed one per matching request (deterministic for tests);
/// rates are probabilities per request.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Faults {
    /// Next N API requests answer HTTP 502.
    #[serde(default)]
    pub http5xx: u32,
    /// Share of API requests answering HTTP 502.
    #[serde(default)]
    pub http5xx_rate: f64,
    /// Next N GraphQL requests answer `INTERNAL_SERVER_ERROR` (HTTP 200).
    #[serde(default)]
    pub internal_errors: u32,
    /// Next N API requests answer 429 with Retry-After.
    #[serde(default)]
    pub rate_limited: u32,
    #[serde(default = "one_u32")]
    pub retry_after_seconds: u32,
    /// Added to every API request, milliseconds (real time).
    #[serde(default)]
    pub latency_ms: u64,
    /// Next N creates succeed on RunPod's side but answer only after `createTimeoutSeconds`.
    #[serde(default)]
    pub create_timeouts: u32,
    #[serde(default = "sixty")]
    pub create_timeout_seconds: u64,
    /// Next N creates succeed on RunPod's side but their answer is lost: GraphQL answers
    /// `INTERNAL_SERVER_ERROR`, REST v2 answers HTTP 502.
    #[serde(default)]
    pub create_lost_answers: u32,
    /// Next N creates fail with the capacity message even with stock (stock is advisory).
    #[serde(default)]
    pub capacity_failures: u32,
    /// Next N resumes fail with "not enough free GPUs on the host machine".
    #[serde(default)]
    pub resume_failures: u32,
    /// Images whose pods never start: no runtime, and the container log says the pull failed.
    #[serde(default)]
    pub failing_images: Vec<String>,
    /// Pods created from now on never get a runtime.
    #[serde(default)]
    pub runtime_never_appears: bool,
    /// Pods created from now on get a runtime without ports.
    #[serde(default)]
    pub starts_without_ports: bool,
    /// Next N CompleteMultipartUpload calls finish the upload but answer HTTP 524.
    #[serde(default)]
    pub s3_complete_timeouts: u32,
    /// Next N PutObject calls answer HTTP 502 without writing.
    #[serde(default)]
    pub s3_put_502: u32,
    /// Next N PutObject calls answer 200 but write nothing (a request a proxy lost after
    /// answering for it).
    #[serde(default)]
    pub s3_put_lost: u32,
    /// Next N CompleteMultipartUpload calls answer HTTP 502 without completing.
    #[serde(default)]
    pub s3_complete_502: u32,
    /// Listings omit files that were not written through S3 (e.g. by a pod).
    #[serde(default)]
    pub s3_hide_pod_files: bool,
    /// Paged listings hand out the same continuation token twice.
    #[serde(default)]
    pub s3_repeat_continuation_token: bool,
}

fn one_u32() -> u32 {
    1
}
fn sixty() -> u64 {
    60
}

impl WorldConfig {
    /// Parses a YAML world.
    pub fn from_yaml(text: &str) -> Result<Self, String> {
        serde_saphyr::from_str(text).map_err(|e| e.to_string())
    }
}

impl Default for WorldConfig {
    fn default() -> Self {
        // The default world: real RunPod gpu type ids, prices of 2026, limited stock.
        Self::from_yaml(DEFAULT_WORLD).unwrap_or_else(|e| unreachable!("default world is invalid: {e}"))
    }
}

/// The world `runpod-sim` starts with when no `--config` is given.
pub const DEFAULT_WORLD: &str = include_str!("default-world.yaml");
