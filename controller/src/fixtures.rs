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
    let exp = quickstart();
    let cur = ep_api::experiment::AttemptStatus {
        attempt,
        run_id: crate::names::run_id("quickstart", "uid-1", attempt),
        fencing_token: 1_800_000_000_000 + i64::from(attempt),
        order: Some(name.to_owned()),
        ..Default::default()
    };
    let mut order = crate::experiment::order_for(&exp, name, crate::experiment::template(&exp, &cur, 0.0), None);
    order.metadata.uid = Some(format!("order-uid-{attempt}"));
    order.metadata.generation = Some(1);
    order
}
