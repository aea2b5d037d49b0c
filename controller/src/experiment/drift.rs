//! An edit to an Experiment while an attempt runs. The attempt's order carries a copy of what it
//! started with (`spec.run`), so the live run is never changed under it; the edit applies from
//! the next attempt, and until then the condition `SpecChangePending` names the fields that wait.

use chrono::{DateTime, Utc};
use ep_api::{Experiment, ExperimentStatus, RunPodOrder, set_condition};

use crate::reason::Reason;
use crate::time;

/// The condition type.
pub const CONDITION: &str = "SpecChangePending";

/// The fields of the experiment that differ from what its live attempt runs with.
pub fn pending(exp: &Experiment, order: &RunPodOrder) -> Vec<&'static str> {
    let Some(run) = order.spec.run.as_ref() else { return vec![] };
    let (s, o) = (&exp.spec, &order.spec);
    let node_type = run.worker_affinity.as_ref().is_some_and(|a| a.node_type.is_some());
    [
        ("spec.image", run.image != s.image),
        ("spec.entry", run.entry != s.entry),
        ("spec.env", run.env != s.env),
        ("spec.payload", run.payload != s.payload),
        ("spec.limits", run.limits != s.limits),
        ("spec.results", run.results != s.results),
        ("spec.checkpoints", run.checkpoints != s.checkpoints),
        ("spec.workerAffinity", run.worker_affinity != s.worker_affinity),
        ("spec.gpu", !node_type && o.gpu != s.gpu),
        ("spec.order.policy", o.policy != s.order.policy),
        ("spec.order.maxCostPerHour", o.max_cost_per_hour != s.order.max_cost_per_hour),
    ]
    .into_iter()
    .filter_map(|(f, differs)| differs.then_some(f))
    .collect()
}

/// Records in status which edits wait for the next attempt; returns the Event note when the set
/// of waiting fields changed.
pub fn report(
    st: &mut ExperimentStatus,
    exp: &Experiment,
    order: &RunPodOrder,
    attempt: i32,
    now: DateTime<Utc>,
) -> Option<String> {
    let fields = pending(exp, order);
    let before = st.conditions.iter().find(|c| c.type_ == CONDITION).map(|c| c.message.clone());
    if fields.is_empty() {
        st.conditions.retain(|c| c.type_ != CONDITION);
        return None;
    }
    let message = format!(
        "{} changed while attempt {attempt} runs: the live attempt keeps what it started with; the change applies from attempt {}",
        fields.join(", "),
        attempt + 1
    );
    let generation = exp.metadata.generation;
    set_condition(
        &mut st.conditions,
        CONDITION,
        true,
        Reason::SpecChangePending.as_str(),
        &message,
        generation,
        time::to_k8s(now),
    );
    (before.as_deref() != Some(message.as_str())).then_some(message)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_edit_while_an_attempt_runs_is_named_and_waits_for_the_next_one() {
        let mut exp = crate::fixtures::quickstart();
        let order = crate::fixtures::quickstart_order("quickstart-a1", 1);
        let mut st = ExperimentStatus::default();
        assert!(report(&mut st, &exp, &order, 1, chrono::Utc::now()).is_none(), "nothing changed");
        exp.spec.image = "runpod/pytorch:2".into();
        exp.spec.entry.args.push("--lr=0.1".into());
        let note = report(&mut st, &exp, &order, 1, chrono::Utc::now()).unwrap();
        assert!(note.starts_with("spec.image, spec.entry changed while attempt 1 runs"), "{note}");
        assert!(note.contains("applies from attempt 2"), "{note}");
        assert!(report(&mut st, &exp, &order, 1, chrono::Utc::now()).is_none(), "told once");
        assert!(st.conditions.iter().any(|c| c.type_ == CONDITION && c.reason == "SpecChangePending"));
    }
}
