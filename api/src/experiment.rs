//! `Experiment`: what to run, with which GPU, limits, retries and results contract.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, MicroTime, Time};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::common::{GpuRequest, SecretKeyRef};
use crate::duration::GoDuration;

/// Desired state of an experiment: what to run, on which GPUs, within which limits.
#[derive(CustomResource, KubeSchema, Clone, Debug, PartialEq, Serialize, Deserialize)]
#[kube(
    group = "ep.dev",
    version = "v1alpha1",
    kind = "Experiment",
    namespaced,
    cel,
    status = "ExperimentStatus",
    shortname = "exp",
    category = "ep",
    doc = "An ML training experiment run on RunPod GPU pods, one attempt at a time.",
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase"),
    printcolumn(name = "Reason", type_ = "string", json_path = ".status.reason"),
    printcolumn(name = "GPU", type_ = "string", json_path = ".status.gpu"),
    printcolumn(name = "Attempt", type_ = "integer", json_path = ".status.attempts"),
    printcolumn(name = "Progress", type_ = "string", json_path = ".status.progress.summary"),
    printcolumn(name = "Cost", type_ = "number", json_path = ".status.costUsd"),
    printcolumn(name = "F1", type_ = "number", json_path = ".status.results.f1"),
    printcolumn(name = "AUC", type_ = "number", json_path = ".status.results.auc"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp"),
    printcolumn(name = "Metrics", type_ = "string", json_path = ".status.metrics", priority = "1"),
    printcolumn(name = "Message", type_ = "string", json_path = ".status.message", priority = "1"),
    validation = Rule::new("!has(self.spec.dependsOn) || !(self.metadata.name in self.spec.dependsOn)")
        .message("spec.dependsOn must not name the experiment itself"),
    validation = Rule::new("size(self.metadata.name) <= 63")
        .message("metadata.name must be at most 63 characters: it labels the experiment's orders (ep.dev/experiment, a label value) and names its runs")
)]
#[x_kube(validation = Rule::new("has(self.checkpoints) && has(self.checkpoints.retention)")
    .message("spec.checkpoints.retention is required before any launch: choose Keep, KeepLast or Discard"))]
#[serde(rename_all = "camelCase")]
pub struct ExperimentSpec {
    /// The training command, run in the payload directory inside the pod.
    pub entry: Entry,
    /// Where the code comes from: exactly one of `digest` or `configMap`.
    pub payload: PayloadSource,
    /// Container image of the pod, e.g. `runpod/pytorch:1.0.2-cu1281-torch280-ubuntu2404`.
    #[schemars(length(min = 1))]
    pub image: String,
    /// Environment variables for the training command.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub env: Vec<EnvVar>,
    /// GPU request: preferred types in order, count, cloud tier.
    pub gpu: GpuRequest,
    /// How paid orders are made for each attempt.
    pub order: OrderTemplate,
    /// Limits that end an attempt.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limits: Option<Limits>,
    /// How failed attempts are retried.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry: Option<RetryPolicy>,
    /// Checkpoint retention class. Required: no attempt launches without one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpoints: Option<CheckpointPolicy>,
    /// Which file holds the results and which metrics it must contain.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub results: Option<ResultsContract>,
    /// Experiments (in the same namespace) that must have succeeded before this one starts.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub depends_on: Vec<String>,
    /// Where the experiment may run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub worker_affinity: Option<WorkerAffinity>,
    /// Hold the experiment: no new attempt starts while true (a running one is not stopped).
    #[serde(default)]
    pub suspend: bool,
    /// An approver's consent to spend, within an envelope: every attempt's order inside it
    /// (retries included) launches without a new approval. Set by `kubectl ep approve EXPERIMENT`;
    /// the chart's admission policy lets only approvers set it, with `approvedBy` their own name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub approval: Option<Approval>,
    /// Asks a finished experiment (Succeeded or Failed) for a new attempt: any value it has not
    /// served yet starts one, with retries counted afresh (`kubectl ep rerun` sets the time).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rerun: Option<String>,
    /// What an edit to this spec does while an attempt runs: `NextAttempt` (the default) lets the
    /// live attempt finish as it started and applies the edit from the next attempt; `Restart`
    /// stops the live attempt (its results collected, checkpoints kept) and starts the next one
    /// with the edit, without counting it against `retry.maxAttempts`.
    #[serde(default, skip_serializing_if = "OnSpecChange::is_default")]
    pub on_spec_change: OnSpecChange,
}

/// What an edit to a running Experiment does.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum OnSpecChange {
    /// The live attempt keeps what it started with; the edit applies from the next attempt.
    #[default]
    NextAttempt,
    /// The live attempt is stopped and the next one starts with the edit (not counted as a retry).
    Restart,
}

impl OnSpecChange {
    fn is_default(&self) -> bool {
        *self == Self::NextAttempt
    }
}

/// Consent to spend on an experiment's attempts, within an envelope.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Approval {
    /// The approving user, as the API server authenticated them.
    #[schemars(length(min = 1))]
    pub approved_by: String,
    /// What the approval covers; an order outside it waits for a new approval.
    #[serde(default)]
    pub envelope: Envelope,
}

/// The bounds of an approval. A field left out does not bound.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Envelope {
    /// GPU types (RunPod ids or aliases) an attempt may run on; empty: any.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub gpu_types: Vec<String>,
    /// Highest price of the whole pod, USD per hour.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("x-kubernetes-validations" = [{"rule": "double(self) >= 0.0", "message": "approval.envelope.maxCostPerHour must not be negative"}]))]
    pub max_cost_per_hour: Option<f64>,
    /// Most all attempts together may spend, USD.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("x-kubernetes-validations" = [{"rule": "double(self) >= 0.0", "message": "approval.envelope.maxTotalUsd must not be negative"}]))]
    pub max_total_usd: Option<f64>,
    /// Highest attempt number the approval covers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub max_attempts: Option<i32>,
}

/// An approval as the operator recorded it: who, the envelope, and when it was first seen.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ApprovalRecord {
    pub approved_by: String,
    /// When the operator first saw this approval.
    pub approved_at: Time,
    pub envelope: Envelope,
}

/// The command to run.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Entry {
    /// Executable and leading arguments, e.g. `[python3, scripts/train.py]`.
    #[schemars(length(min = 1))]
    pub command: Vec<String>,
    /// Further arguments appended to `command`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub args: Vec<String>,
}

/// Where the code payload comes from.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [{"rule": "has(self.digest) != has(self.configMap)", "message": "spec.payload: set exactly one of digest (printed by `kubectl ep push`) or configMap"}]))]
pub struct PayloadSource {
    /// Payload id printed by `kubectl ep push DIR`: `sha256:` and 64 hex digits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^sha256:[0-9a-f]{64}$"))]
    pub digest: Option<String>,
    /// A ConfigMap in the experiment's namespace whose keys are file names (for small scripts).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_map: Option<ConfigMapPayload>,
    /// Paths (relative to the payload root) to include; empty means the whole root.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-validations" = [{"rule": "self.all(p, !p.startsWith('/') && !p.split('/').exists(s, s == '..'))", "message": "spec.payload.locations must be relative paths inside the payload root (no leading / and no ..)"}]))]
    pub locations: Vec<String>,
    /// Gitignore-style patterns excluded from the payload.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub excludes: Vec<String>,
}

/// A ConfigMap holding the payload files.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ConfigMapPayload {
    /// Name of the ConfigMap.
    pub name: String,
}

/// One environment variable.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [{"rule": "!(has(self.value) && has(self.secretKeyRef))", "message": "env: set value or secretKeyRef, not both"}]))]
pub struct EnvVar {
    /// Variable name.
    #[schemars(regex(pattern = r"^[A-Za-z_][A-Za-z0-9_]*$"))]
    pub name: String,
    /// Literal value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,
    /// Value taken from a Secret in the experiment's namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_key_ref: Option<SecretKeyRef>,
}

/// How the operator makes the paid order for each attempt.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct OrderTemplate {
    /// Order policy name (canonical or alias) from the operator settings, e.g. `paper-train`.
    pub policy: String,
    /// Worker id the attempt is bound to, e.g. `runpod-1`.
    pub worker_id: String,
    /// Name of the cluster-scoped `RunPodProvider` to use.
    #[serde(default = "default_provider")]
    pub provider_ref: String,
    /// Highest acceptable price in USD per hour for the whole pod.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("x-kubernetes-validations" = [{"rule": "double(self) >= 0.0", "message": "order.maxCostPerHour must not be negative"}]))]
    pub max_cost_per_hour: Option<f64>,
}

pub(crate) fn default_provider() -> String {
    "default".to_owned()
}

/// Limits on one attempt and on the whole experiment.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Limits {
    /// Longest an attempt may run once the runner is online, e.g. `6h`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_runtime: Option<GoDuration>,
    /// Most the experiment may spend across all attempts, in USD.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("x-kubernetes-validations" = [{"rule": "double(self) >= 0.0", "message": "limits.maxCostUsd must not be negative"}]))]
    pub max_cost_usd: Option<f64>,
}

/// Retry policy for failed attempts.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RetryPolicy {
    /// Attempts allowed in total, the first one included (at least 1).
    #[schemars(extend("x-kubernetes-validations" = [{"rule": "self >= 1", "message": "retry.maxAttempts must be at least 1"}]))]
    pub max_attempts: i32,
    /// Wait between a failed attempt and the next one, e.g. `10m`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backoff: Option<GoDuration>,
    /// Which failures are retried. Default: `[PodLost]`, the machine's failures (the pod vanished,
    /// exited under the runner, never started, or its heartbeat stopped), not the script's: a
    /// script error fails the same way again and would pay again. (Named `when`, not `on`:
    /// kubectl reads YAML 1.1, where an unquoted `on` is the boolean true.)
    #[serde(default = "default_retry_on")]
    pub when: Vec<RetryCause>,
}

#[allow(clippy::trivially_copy_pass_by_ref)] // serde's skip_serializing_if passes a reference
fn is_zero(n: &i32) -> bool {
    *n == 0
}

fn default_retry_on() -> Vec<RetryCause> {
    vec![RetryCause::PodLost]
}

/// A kind of attempt failure, as `retry.when` names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum RetryCause {
    /// The pod vanished, exited under the runner, never started, or its heartbeat stopped.
    PodLost,
    /// The attempt reached its maxRuntime or the order's lifetime.
    LifetimeReached,
    /// The script exited with a non-zero code.
    NonZeroExit,
    /// The script exited 0 but left no valid results (the results contract).
    ResultsContractBroken,
    /// Any failure.
    Any,
}

/// What happens to checkpoints when an attempt drains.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum RetentionClass {
    /// Keep every checkpoint.
    Keep,
    /// Keep only the newest checkpoint.
    KeepLast,
    /// Delete checkpoints once results are verified.
    Discard,
}

/// Checkpoint handling, declared before any launch.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CheckpointPolicy {
    /// Retention class applied at drain: Keep, KeepLast or Discard.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retention: Option<RetentionClass>,
    /// Directory under the run's artifacts where the script writes checkpoints.
    #[serde(default = "default_checkpoint_path")]
    pub path: String,
    /// Give each attempt the newest complete checkpoint an earlier attempt reported (progress.json
    /// `checkpoint`), read-only, its path in `EP_RESUME_FROM`: a lost pod costs the epochs since
    /// that checkpoint, not the whole run. Nothing of an earlier attempt is ever written.
    #[serde(default)]
    pub resume: bool,
}

fn default_checkpoint_path() -> String {
    "checkpoints/".to_owned()
}

/// The results the training script must leave behind.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ResultsContract {
    /// Results file, relative to the run's artifacts directory.
    #[serde(default = "default_results_file")]
    pub file: String,
    /// Metrics that must be present as numbers, e.g. `[f1, auc]`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub metrics: Vec<String>,
}

fn default_results_file() -> String {
    "results.json".to_owned()
}

/// Where an experiment may run.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct WorkerAffinity {
    /// Runtime target. Only `runpod` exists today.
    #[serde(default = "default_runtime")]
    pub runtime: String,
    /// Worker ids allowed to take the experiment; empty means any.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub workers: Vec<String>,
    /// The worker attempts go to first (default: spec.order.workerId). With `exclusive`, an attempt
    /// whose preferred worker is busy takes the first free one of `workers`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preferred_worker: Option<String>,
    /// The node type (GPU alias or RunPod GPU type id) the worker must be: it must be one of
    /// spec.gpu.types, and the attempt's order asks for that GPU only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_type: Option<String>,
    /// A worker takes one run at a time: while an order of the namespace is live on it, an attempt
    /// waits for it (WorkerBusy) or takes another free worker of `workers`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub exclusive: bool,
}

fn default_runtime() -> String {
    "runpod".to_owned()
}

impl Default for WorkerAffinity {
    fn default() -> Self {
        Self { runtime: default_runtime(), workers: vec![], preferred_worker: None, node_type: None, exclusive: false }
    }
}

/// Lifecycle phase of an experiment.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum ExperimentPhase {
    /// Accepted, waiting for its first attempt.
    #[default]
    Pending,
    /// Blocked by a dependency, suspension, budget or backoff; see the conditions.
    Waiting,
    /// An attempt is under way.
    Running,
    /// The last attempt failed and attempts remain.
    NeedsRerun,
    /// An attempt succeeded and its results are verified.
    Succeeded,
    /// No attempts remain, or the spec cannot run.
    Failed,
}

/// Observed state of an experiment.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ExperimentStatus {
    /// Lifecycle phase.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<ExperimentPhase>,
    /// Status in the registry's vocabulary: READY, RUNNING, NEEDS_RERUN, COMPLETED, FAILED,
    /// FAILED_STATUS_DIVERGENCE.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub registry_status: Option<String>,
    /// Standard conditions; `Ready` is always present once reconciled.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Number of attempts started so far.
    #[serde(default)]
    pub attempts: i32,
    /// GPU actually obtained by the current or last attempt (display name).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpu: Option<String>,
    /// The attempt under way, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current_attempt: Option<AttemptStatus>,
    /// Earlier attempts, newest last (bounded).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 20))]
    pub history: Vec<AttemptStatus>,
    /// Metrics of the successful attempt (f1, auc and the rest).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub results: Option<BTreeMap<String, f64>>,
    /// Artifacts verified on the volume before the pod was deleted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub artifacts: Option<VerifiedArtifacts>,
    /// Resource usage of the successful attempt.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<UsageSummary>,
    /// The next attempt does not start before this time (retry backoff).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_attempt_at: Option<Time>,
    /// Spend across all attempts, in USD.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cost_usd: Option<f64>,
    /// Every phase change, oldest first (bounded).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32))]
    pub transitions: Vec<ExperimentTransition>,
    /// The approval in force (spec.approval) and when it was given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub approval: Option<ApprovalRecord>,
    /// The Ready condition's reason: what the experiment waits for, or what happened last.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The Ready condition's message (`kubectl get exp -o wide`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// How far the current attempt's training is, as its script reports it (progress.json).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<ExperimentProgress>,
    /// The last `spec.rerun` served.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rerun: Option<String>,
    /// Attempts that do not count against `retry.maxAttempts`: those made before the last rerun,
    /// and attempts restarted for a spec change.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub rerun_from: i32,
    /// The attempt being stopped because the spec changed under `onSpecChange: Restart`; its end
    /// starts the next attempt, not counted as a retry.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restarting: Option<i32>,
    /// The metrics `spec.results.metrics` declares, with their latest values (`f1=0.81 auc=0.95`):
    /// the results of the successful attempt, else the running attempt's last progress.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics: Option<String>,
}

/// Training progress of the current attempt.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ExperimentProgress {
    /// Attempt the progress belongs to.
    pub attempt: i32,
    pub step: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total: Option<i64>,
    /// When the run should reach `total` at its rate so far.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eta: Option<Time>,
    /// The script's last metrics.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub metrics: BTreeMap<String, f64>,
    /// `step/total (percent%)`, for the PROGRESS column.
    pub summary: String,
}

/// One phase change of an experiment.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ExperimentTransition {
    /// Phase entered.
    pub phase: ExperimentPhase,
    /// When, to the microsecond (the registry's phase log keeps this order).
    pub at: MicroTime,
    /// Why (PascalCase).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// One attempt: its claim and, once over, its outcome.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AttemptStatus {
    /// Attempt number, starting at 1.
    pub attempt: i32,
    /// Run id: unique across namespaces and attempts; names the pod and the volume prefix.
    pub run_id: String,
    /// Fencing token of the claim; writers holding an older token are refused.
    pub fencing_token: i64,
    /// The `RunPodOrder` serving this attempt.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub order: Option<String>,
    /// RunPod pod id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_id: Option<String>,
    /// Worker id the attempt is bound to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub worker_id: Option<String>,
    /// Process id of the training command inside the pod.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<i64>,
    /// GPU id(s) reported by the runner.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpu_id: Option<String>,
    /// The claim lapses at this time unless heartbeats renew it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease_expiry: Option<Time>,
    /// When the attempt was claimed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<Time>,
    /// When the attempt ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<Time>,
    /// Outcome: Succeeded, Failed, Stopped, FailedStatusDivergence, or empty while running.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outcome: Option<crate::order::OutcomeState>,
    /// Why the attempt ended as it did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// What the attempt cost, in USD.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cost_usd: Option<f64>,
    /// What the operator repaired to bind this attempt (a stale binding cleared and re-bound).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reconcile_action: Option<String>,
    /// Volume key of the earlier attempt's checkpoint this attempt resumed from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resume_from: Option<String>,
}

/// Artifacts verified on the volume (size and sha256) before the pod was deleted.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct VerifiedArtifacts {
    /// sha256 over the verified artifact manifest.
    pub receipt: String,
    /// Volume key prefix of the run.
    pub prefix: String,
    /// Verified files.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 100))]
    pub items: Vec<ArtifactRef>,
    /// Files beyond the first 100, counted but not listed here.
    #[serde(default)]
    pub omitted: i64,
}

/// One verified file.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ArtifactRef {
    /// Volume key.
    pub key: String,
    /// Size in bytes.
    pub size: i64,
    /// Hex sha256 of the content.
    pub sha256: String,
}

/// Resource usage of an attempt.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct UsageSummary {
    /// Wall-clock seconds of the training command.
    pub wall_seconds: f64,
    /// CPU seconds (user + system) of its process tree.
    pub cpu_seconds: f64,
    /// Peak resident memory of the process tree, in bytes.
    pub peak_rss_bytes: i64,
    /// Mean GPU utilisation in percent, when a GPU was present.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpu_util_percent: Option<f64>,
    /// Peak GPU memory in MiB, when a GPU was present.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpu_memory_peak_mib: Option<f64>,
}
