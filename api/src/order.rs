//! `RunPodOrder`: one paid pod (a worker) and its lifecycle.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, MicroTime, Time};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::common::GpuRequest;
use crate::duration::GoDuration;
use crate::experiment::{
    CheckpointPolicy, Entry, EnvVar, Limits, PayloadSource, ResultsContract, UsageSummary, VerifiedArtifacts,
    WorkerAffinity, default_provider,
};

/// Desired state of an order: which GPU pod to rent for whom, and under which limits.
#[derive(CustomResource, KubeSchema, Clone, Debug, PartialEq, Serialize, Deserialize)]
#[kube(
    group = "ep.dev",
    version = "v1alpha1",
    kind = "RunPodOrder",
    namespaced,
    cel,
    status = "RunPodOrderStatus",
    shortname = "rpo",
    category = "ep",
    doc = "One paid RunPod pod and its lifecycle, from request to confirmed deletion.",
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase"),
    printcolumn(name = "Pod", type_ = "string", json_path = ".status.podId"),
    printcolumn(name = "GPU", type_ = "string", json_path = ".status.gpu.displayName"),
    printcolumn(name = "$/H", type_ = "number", json_path = ".status.costPerHour"),
    printcolumn(name = "Spent", type_ = "number", json_path = ".status.accruedCostUsd"),
    printcolumn(name = "Reason", type_ = "string", json_path = ".status.reason"),
    printcolumn(name = "Domain", type_ = "string", json_path = ".status.domain", priority = "1"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[x_kube(validation = Rule::new("has(self.experimentRef) == has(oldSelf.experimentRef) && (!has(self.experimentRef) || self.experimentRef.name == oldSelf.experimentRef.name)")
    .message("spec.experimentRef is immutable: create a new order for another experiment"))]
#[x_kube(validation = Rule::new("!has(oldSelf.approved) || !oldSelf.approved || (has(self.approved) && self.approved)")
    .message("spec.approved cannot be withdrawn once true: set spec.stop to end the order"))]
#[x_kube(validation = Rule::new("!has(oldSelf.approvedBy) || (has(self.approvedBy) && self.approvedBy == oldSelf.approvedBy)")
    .message("spec.approvedBy cannot be changed or removed once set"))]
#[x_kube(validation = Rule::new("!has(oldSelf.run) || (has(self.run) && self.run == oldSelf.run)")
    .message("spec.run is written by the operator when it creates the order and never changes"))]
#[serde(rename_all = "camelCase")]
pub struct RunPodOrderSpec {
    /// The experiment this order serves (immutable).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub experiment_ref: Option<ExperimentRef>,
    /// Attempt number of the experiment this order serves, set by the operator.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attempt: Option<i32>,
    /// Name of the cluster-scoped `RunPodProvider`.
    #[serde(default = "default_provider")]
    pub provider_ref: String,
    /// Order policy name (canonical or alias) from the operator settings.
    pub policy: String,
    /// Worker id of this pod (immutable).
    #[x_kube(validation = Rule::new("self == oldSelf").message("spec.workerId is immutable"))]
    pub worker_id: String,
    /// GPU request.
    pub gpu: GpuRequest,
    /// Data center; defaults to the provider's network volume data center (they must agree).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_center: Option<String>,
    /// Approval to spend money. Only the approver group may set it; once true it stays true.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub approved: Option<bool>,
    /// Who approved (filled by `kubectl ep approve`); immutable once set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub approved_by: Option<String>,
    /// Longest the pod may live; also sets RunPod's terminateAfter (plus a grace period).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_lifetime: Option<GoDuration>,
    /// Highest acceptable price in USD per hour.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("x-kubernetes-validations" = [{"rule": "double(self) >= 0.0", "message": "spec.maxCostPerHour must not be negative"}]))]
    pub max_cost_per_hour: Option<f64>,
    /// What deleting the order does to the pod.
    #[serde(default)]
    pub deletion_policy: DeletionPolicy,
    /// Ask the order to drain now (results are collected, then the pod is deleted).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop: Option<StopRequest>,
    /// What the attempt runs, written by the operator when it creates the order for an experiment
    /// (immutable). An order made by hand leaves it out and is bound in `status.binding`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run: Option<RunTemplate>,
}

/// Everything one attempt needs, copied from its experiment when the attempt is claimed, so the
/// order never reads its experiment again (a later edit of the experiment applies from the next attempt).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RunTemplate {
    /// Attempt number (starting at 1).
    pub attempt: i32,
    /// Run id: unique across namespaces and attempts; names the pod (`ep-<runId>`) and the volume prefix.
    pub run_id: String,
    /// Fencing token of the claim; heartbeats and terminal files carrying another token are refused.
    pub fencing_token: i64,
    /// Uid of the experiment that claimed the attempt.
    pub experiment_uid: String,
    /// Container image of the pod.
    pub image: String,
    /// The training command.
    pub entry: Entry,
    /// Environment of the training command.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub env: Vec<EnvVar>,
    /// Where the code comes from.
    pub payload: PayloadSource,
    /// Limits of the attempt (maxRuntime) and of the experiment (maxCostUsd).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limits: Option<Limits>,
    /// The results the script must leave.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub results: Option<ResultsContract>,
    /// Checkpoint retention, declared before launch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpoints: Option<CheckpointPolicy>,
    /// Where the attempt may run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub worker_affinity: Option<WorkerAffinity>,
    /// USD the experiment spent on earlier attempts (counts against `limits.maxCostUsd`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spent_before_usd: Option<f64>,
    /// What the operator repaired to bind this attempt (a stale binding cleared), for the registry.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reconcile_action: Option<String>,
    /// Volume key of the earlier attempt's checkpoint this attempt resumes from (checkpoints.resume).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resume_from: Option<String>,
}

/// Reference to an experiment in the same namespace.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ExperimentRef {
    /// Experiment name.
    pub name: String,
}

/// What deleting an order does to its pod.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum DeletionPolicy {
    /// Drain (collect and verify results), terminate the pod, confirm it is gone.
    #[default]
    Terminate,
    /// Leave the pod to RunPod's terminateAfter; it is then reported as an orphan.
    Orphan,
}

/// A request to drain.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct StopRequest {
    /// Why, as a person would say it; kept in status and the registry.
    #[schemars(length(min = 1))]
    pub reason: String,
}

/// Order lifecycle phases (DESIGN section 4).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum OrderPhase {
    /// Durable in the Kubernetes API; nothing paid yet.
    #[default]
    Requested,
    /// Inputs bound and checked against live truth.
    Provisioned,
    /// Payload and runner on the volume, verified.
    Synced,
    /// Attempt claimed, run spec written, manifest sealed.
    Verified,
    /// Pod created and the runner heartbeating.
    RunnerOnline,
    /// Results being collected before deletion.
    Draining,
    /// Pod terminated and confirmed gone.
    Deleted,
    /// Ended without a result; see the reason.
    Failed,
}

impl OrderPhase {
    /// The wire name (`RUNNER_ONLINE`), as status and the registry show it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Requested => "REQUESTED",
            Self::Provisioned => "PROVISIONED",
            Self::Synced => "SYNCED",
            Self::Verified => "VERIFIED",
            Self::RunnerOnline => "RUNNER_ONLINE",
            Self::Draining => "DRAINING",
            Self::Deleted => "DELETED",
            Self::Failed => "FAILED",
        }
    }
}

/// Observed state of an order.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RunPodOrderStatus {
    /// Lifecycle phase.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<OrderPhase>,
    /// Standard conditions; `Ready` is always present once reconciled.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Run id this order is bound to; the pod name derives from it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run_id: Option<String>,
    /// Fencing token of the attempt's claim.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fencing_token: Option<i64>,
    /// RunPod pod name (derived from the run id).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_name: Option<String>,
    /// RunPod pod id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_id: Option<String>,
    /// RunPod machine id of the host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub machine_id: Option<String>,
    /// GPU actually obtained.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpu: Option<ObtainedGpu>,
    /// Data center the pod runs in.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_center: Option<String>,
    /// Price RunPod bills, USD per hour.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cost_per_hour: Option<f64>,
    /// Spend so far, USD.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub accrued_cost_usd: Option<f64>,
    /// Payload id synced to the volume.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payload_id: Option<String>,
    /// Why the order failed or waits (a PascalCase reason).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Human-readable detail for `reason`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// The failure domain of `reason`, which says who acts on it: order or study (the author),
    /// paid (an approver), claim, split-brain or bypass (the platform team).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub domain: Option<String>,
    /// Who approved the spending in force: the order's own approver, or the approver of its
    /// experiment's envelope (`experiment envelope by <user>`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub approved_by: Option<String>,
    /// USD reserved against the namespace's budget at admission (price x max lifetime), held in
    /// the namespace's spend ledger until the order ends and its actual spend replaces it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reserved_usd: Option<f64>,
    /// GPU type ids to try, in the author's order, resolved and checked against RunPod's live catalog.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub gpu_candidates: Vec<String>,
    /// Index into `gpuCandidates` of the choice being tried (a capacity error moves to the next).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpu_choice: Option<i32>,
    /// Set just before the create call: a restart that finds it set adopts the pod by name instead
    /// of creating another.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_requested_at: Option<Time>,
    /// When the runner's first heartbeat arrived.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub online_at: Option<Time>,
    /// The newest heartbeat seen.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub heartbeat: Option<HeartbeatStatus>,
    /// The newest progress the training script reported (progress.json).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<ProgressStatus>,
    /// Why the order drains (RunFinished, StopRequested, HeartbeatLost, PodGone, LifetimeReached,
    /// CostLimitReached, OrderDeleted).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drain_reason: Option<String>,
    /// When draining started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drain_started_at: Option<Time>,
    /// The last lines of the pod's container log (REST v2), read when the runner never came
    /// online: why an image did not start, or why the runner died before writing to the volume.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container_log: Option<String>,
    /// Evidence that the run's files disagree, seen once while draining: the pod is kept and the
    /// volume read again, and only the same evidence seen twice makes FailedStatusDivergence.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub suspect_evidence: Option<String>,
    /// The run's outcome, verified on the volume before the pod was deleted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outcome: Option<RunOutcome>,
    /// Every phase change, oldest first (bounded).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32))]
    pub transitions: Vec<PhaseTransition>,
    /// For an order made by hand: the attempt its experiment bound it to (written by the
    /// experiment's reconciler; operator-made orders carry it in `spec.run`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub binding: Option<RunTemplate>,
}

/// The GPU a pod actually got.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ObtainedGpu {
    /// RunPod gpu type id, e.g. `NVIDIA RTX PRO 4500 Blackwell`.
    pub type_id: String,
    /// Display name RunPod shows, e.g. `RTX PRO 4500`.
    pub display_name: String,
    /// Number of GPUs.
    pub count: i32,
}

/// One phase change.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PhaseTransition {
    /// Phase entered.
    pub phase: OrderPhase,
    /// When, to the microsecond (the registry's phase log keeps this order).
    pub at: MicroTime,
    /// Why (PascalCase).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// The newest heartbeat of the runner.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct HeartbeatStatus {
    /// When the runner wrote it.
    pub time: Time,
    /// Sequence number (grows by one per heartbeat).
    pub seq: i64,
    /// Process id of the training command.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<i64>,
    /// GPU ids the runner sees.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpu_ids: Option<String>,
    /// Until when the run's claim holds without a newer heartbeat (heartbeat time + heartbeatTimeout).
    /// No other attempt of the experiment is claimed before it passes or the run has ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease_expires_at: Option<Time>,
    /// The runner that owns the run (the first to heartbeat; when two do, the one that started first).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runner: Option<RunnerRef>,
}

/// A runner process as heartbeats name it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RunnerRef {
    /// RunPod's pod id (or the host name) the runner runs on.
    pub host: String,
    /// The runner's process id.
    pub pid: i64,
    /// When the runner started, RFC 3339 to the nanosecond.
    pub started_at: String,
}

/// Progress reported by the training script.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ProgressStatus {
    /// Step or epoch reached.
    pub step: i64,
    /// Steps or epochs planned.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total: Option<i64>,
    /// The script's latest numbers (loss, accuracy...).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub metrics: BTreeMap<String, f64>,
    /// The newest complete checkpoint the script reported, relative to its checkpoint directory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpoint: Option<String>,
    /// When the operator read it.
    pub reported_at: Time,
}

/// How a run ended, as verified at DRAINING.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RunOutcome {
    /// Succeeded, Failed, Stopped or FailedStatusDivergence.
    pub state: OutcomeState,
    /// Why (PascalCase), e.g. `RunFinished`, `HeartbeatLost`, `NonZeroExit`.
    pub reason: String,
    /// Detail for people.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// Exit code of the training command.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    /// Metrics read from the verified results file.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub metrics: BTreeMap<String, f64>,
    /// Artifacts verified on the volume.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub artifacts: Option<VerifiedArtifacts>,
    /// Resource usage of the run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<UsageSummary>,
    /// Checkpoint retention applied at drain, e.g. `KeepLast: kept 1, deleted 4`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retention: Option<String>,
    /// When the run ended.
    pub finished_at: Time,
}

/// How a run ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
pub enum OutcomeState {
    /// The run succeeded and its results are verified.
    Succeeded,
    /// The run ended without a verified success.
    Failed,
    /// The run was stopped on request.
    Stopped,
    /// The run's terminal files could not be trusted.
    FailedStatusDivergence,
}

impl RunPodOrderSpec {
    /// The attempt this order runs: `spec.run` (operator-made orders) or the binding an experiment
    /// wrote into the status of an order made by hand.
    pub fn template<'a>(&'a self, status: Option<&'a RunPodOrderStatus>) -> Option<&'a RunTemplate> {
        self.run.as_ref().or_else(|| status.and_then(|s| s.binding.as_ref()))
    }
}
