//! Types shared by several resources: GPU requests, secret references, conditions.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// RunPod's cloud tiers (`CloudTypeEnum` in its GraphQL API).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum CloudType {
    /// Secure Cloud: RunPod's own data centers (the only tier with network-volume S3).
    #[default]
    Secure,
    /// Community Cloud: third-party hosts.
    Community,
    /// Either tier.
    All,
}

impl CloudType {
    /// The value RunPod's API expects.
    pub fn as_runpod(self) -> &'static str {
        match self {
            Self::Secure => "SECURE",
            Self::Community => "COMMUNITY",
            Self::All => "ALL",
        }
    }
}

/// Which GPUs a pod needs.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct GpuRequest {
    /// GPU choices in the order the author prefers: aliases from the operator settings
    /// (e.g. `rtx-pro-4500`) or RunPod gpu type ids (e.g. `NVIDIA A100 80GB PCIe`). Each is checked
    /// against RunPod's live catalog; on a capacity error the next choice is tried.
    #[schemars(length(min = 1, max = 8))]
    pub types: Vec<String>,
    /// Number of GPUs, all on one machine (1 to 8).
    #[serde(default = "default_gpu_count")]
    #[schemars(extend("x-kubernetes-validations" = [{"rule": "self >= 1 && self <= 8", "message": "gpu count must be between 1 and 8: RunPod places every GPU of a pod on one machine"}]))]
    pub count: i32,
    /// Cloud tier to rent from. Defaults to SECURE.
    #[serde(default)]
    pub cloud_type: CloudType,
    /// Ask for an interruptible (spot) pod. RunPod no longer offers spot pods, so the operator
    /// refuses `true` with reason `SpotUnavailable` for as long as RunPod does.
    #[serde(default)]
    pub interruptible: bool,
}

fn default_gpu_count() -> i32 {
    1
}

/// A key of a Secret in a named namespace (used by cluster-scoped objects).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NamespacedSecretKeyRef {
    /// Namespace of the Secret.
    pub namespace: String,
    /// Name of the Secret.
    pub name: String,
    /// Key within the Secret's data.
    pub key: String,
}

/// A key of a Secret in the object's own namespace.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SecretKeyRef {
    /// Name of the Secret.
    pub name: String,
    /// Key within the Secret's data.
    pub key: String,
}

/// The condition type every ep resource carries.
pub const CONDITION_READY: &str = "Ready";
/// True while the operator is still working towards Ready (kstatus's `Reconciling`).
pub const CONDITION_RECONCILING: &str = "Reconciling";
/// True when the object stopped short of Ready and needs a person (kstatus's `Stalled`).
pub const CONDITION_STALLED: &str = "Stalled";

/// Sets or updates the condition `type_` in `conditions`, following the Kubernetes conventions:
/// `lastTransitionTime` changes only when `status` changes. Returns true when anything changed.
pub fn set_condition(
    conditions: &mut Vec<Condition>,
    type_: &str,
    status: bool,
    reason: &str,
    message: &str,
    observed_generation: Option<i64>,
    now: Time,
) -> bool {
    let status = if status { "True" } else { "False" };
    if let Some(c) = conditions.iter_mut().find(|c| c.type_ == type_) {
        let transitioned = c.status != status;
        let changed =
            transitioned || c.reason != reason || c.message != message || c.observed_generation != observed_generation;
        if transitioned {
            c.last_transition_time = now;
        }
        c.status = status.to_owned();
        c.reason = reason.to_owned();
        c.message = message.to_owned();
        c.observed_generation = observed_generation;
        changed
    } else {
        conditions.push(Condition {
            type_: type_.to_owned(),
            status: status.to_owned(),
            reason: reason.to_owned(),
            message: message.to_owned(),
            observed_generation,
            last_transition_time: now,
        });
        true
    }
}

/// Where an object stands for GitOps tools (kstatus, Argo CD, Flux), beside its Ready condition.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Progress<'a> {
    /// Still working towards Ready (or keeping it): Reconciling True.
    Working,
    /// Nothing more will happen without a change: Reconciling False, Stalled False.
    Settled,
    /// Stopped short and needs a person: Stalled True with this reason and message.
    Stalled(&'a str, &'a str),
}

/// Sets `Reconciling` and `Stalled` from `progress`; Reconciling copies the Ready condition's reason
/// and message so a person sees what the operator is waiting for.
pub fn set_progress(
    conditions: &mut Vec<Condition>,
    progress: Progress<'_>,
    observed_generation: Option<i64>,
    now: Time,
) -> bool {
    let (why, what) = find_condition(conditions, CONDITION_READY)
        .map(|c| (c.reason.clone(), c.message.clone()))
        .unwrap_or_else(|| ("Pending".to_owned(), String::new()));
    let (reconciling, stalled) = match progress {
        Progress::Working => ((true, why.as_str(), what.as_str()), (false, "Progressing", "")),
        Progress::Settled => ((false, "Settled", ""), (false, "Progressing", "")),
        Progress::Stalled(r, m) => ((false, "Stalled", ""), (true, r, m)),
    };
    let a = set_condition(
        conditions,
        CONDITION_RECONCILING,
        reconciling.0,
        reconciling.1,
        reconciling.2,
        observed_generation,
        now.clone(),
    );
    let b = set_condition(conditions, CONDITION_STALLED, stalled.0, stalled.1, stalled.2, observed_generation, now);
    a || b
}

/// The condition `type_`, if present.
pub fn find_condition<'a>(conditions: &'a [Condition], type_: &str) -> Option<&'a Condition> {
    conditions.iter().find(|c| c.type_ == type_)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(secs: i64) -> Time {
        Time(k8s_openapi::jiff::Timestamp::from_second(secs).unwrap())
    }

    #[test]
    fn transition_time_moves_only_on_status_change() {
        let mut cs = Vec::new();
        assert!(set_condition(&mut cs, CONDITION_READY, false, "Pending", "waiting", Some(1), t(10)));
        assert!(set_condition(&mut cs, CONDITION_READY, false, "AwaitingApproval", "needs approval", Some(2), t(20)));
        assert_eq!(cs[0].last_transition_time, t(10), "same status keeps the transition time");
        assert!(!set_condition(&mut cs, CONDITION_READY, false, "AwaitingApproval", "needs approval", Some(2), t(30)));
        assert!(set_condition(&mut cs, CONDITION_READY, true, "Running", "ok", Some(2), t(40)));
        assert_eq!(cs[0].last_transition_time, t(40));
        assert_eq!(cs.len(), 1);
        assert_eq!(find_condition(&cs, CONDITION_READY).unwrap().reason, "Running");
    }
}
