//! Fixtures shared by the unit tests: the quickstart experiment as a user applies it, and the
//! order the operator makes for it.

use ep_api::{Experiment, RunPodOrder};

const QUICKSTART: &str = include_str!("../../examples/quickstart/30-experiment.yaml");

/// `examples/quickstart/30-experiment.yaml`, as the API server returns it (uid, generation 1).
pub fn quickstart() -> Experiment {
    let mut e: Experiment = serde_saphyr::from_str(QUICKSTART).unwrap_or_else(|e| panic!("quickstart: {e}"));
    e.metadata.uid = Some("uid-1".into());
    e.metadata.generation = Some(1);
    e
}

/// The order the experiment reconciler creates for attempt `attempt` of the quickstart.
pub fn quickstart_order(name: &str, attempt: i32) -> RunPodOrder {
    crate::experiment::order_for(&quickstart(), name, attempt)
}
