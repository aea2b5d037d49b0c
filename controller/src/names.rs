//! Names derived from identities, never random: a crash at any line finds the same names again.

use sha2::{Digest, Sha256};

/// Label carrying the experiment an order serves.
pub const LABEL_EXPERIMENT: &str = "ep.dev/experiment";
/// Label carrying the attempt number of an order.
pub const LABEL_ATTEMPT: &str = "ep.dev/attempt";
/// Finalizer that makes deleting an order drain and terminate its pod first.
pub const FINALIZER: &str = "ep.dev/pod-cleanup";
/// The field manager of every write the operator makes.
pub const MANAGER: &str = "ep-operator";
/// The field manager of the binding an experiment writes into the status of an order made by hand.
pub const BINDING_MANAGER: &str = "ep-operator-binding";

/// Pod env tag: uid of the order that owns the pod.
pub const ENV_OWNER_UID: &str = "EP_OWNER_UID";
/// Pod env tag: the run the pod serves.
pub const ENV_RUN_ID: &str = "EP_RUN_ID";
/// Pod env tag: `namespace/name` of the owning order, for people reading RunPod's console.
pub const ENV_ORDER: &str = "EP_ORDER";
/// When the pod must be gone (the runner's own dead-man's switch on REST v2).
pub use ep_api::volume::ENV_POD_DEADLINE;

/// Run id of attempt `attempt` of the experiment with `uid`: unique across namespaces and attempts
/// (the uid hash), readable (the name), and short enough for a pod name.
pub fn run_id(experiment: &str, uid: &str, attempt: i32) -> String {
    let digest = hex::encode(Sha256::digest(uid.as_bytes()));
    let mut stem: String = experiment.chars().take(40).collect();
    while stem.ends_with('-') || stem.ends_with('.') {
        stem.pop();
    }
    format!("{}-{}-a{attempt}", stem.replace('.', "-"), &digest[..8])
}

/// RunPod pod name of a run.
pub fn pod_name(run_id: &str) -> String {
    format!("ep-{run_id}")
}

/// Name of the order the operator creates for attempt `attempt`.
pub fn order_name(experiment: &str, attempt: i32) -> String {
    let suffix = format!("-a{attempt}");
    let stem: String = experiment.chars().take(253 - suffix.len()).collect();
    format!("{stem}{suffix}")
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn run_ids_are_stable_and_distinct_per_uid_and_attempt() {
        let a = run_id("gnn-fraud-baseline", "uid-1", 1);
        assert_eq!(a, run_id("gnn-fraud-baseline", "uid-1", 1));
        assert_ne!(a, run_id("gnn-fraud-baseline", "uid-1", 2));
        assert_ne!(a, run_id("gnn-fraud-baseline", "uid-2", 1), "same name in another namespace differs");
        assert!(a.starts_with("gnn-fraud-baseline-") && a.ends_with("-a1"));
        let long = run_id(&"x".repeat(200), "u", 12);
        assert!(pod_name(&long).len() <= 63, "{long}");
    }
}
