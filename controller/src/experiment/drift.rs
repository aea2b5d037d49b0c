//! An edit to an Experiment while an attempt runs. The attempt's order carries a copy of what it
//! started with (`spec.run`), so the live run is never changed under it. Under `onSpecChange:
//! NextAttempt` the edit applies from the next attempt, and until then the condition
//! `SpecChangePending` names the fields that wait; under `Restart` the live attempt's order is
//! asked to stop (results collected, checkpoints kept) and its end starts the next attempt.

use chrono::{DateTime, Utc};
use ep_api::experiment::OnSpecChange;
use ep_api::{Experiment, ExperimentStatus, RunPodOrder, set_condition};
use kube::ResourceExt;

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
    let message = match exp.spec.on_spec_change {
        OnSpecChange::NextAttempt => format!(
            "{} changed while attempt {attempt} runs: the live attempt keeps what it started with; the change applies from attempt {}",
            fields.join(", "),
            attempt + 1
        ),
        OnSpecChange::Restart => format!(
            "{} changed while attempt {attempt} runs: onSpecChange is Restart, so attempt {attempt} stops and attempt {} starts with the change",
            fields.join(", "),
            attempt + 1
        ),
    };
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

/// Under `onSpecChange: Restart`, the stop to ask of the live attempt's order (name, why) when the
/// spec changed under it; marks the attempt as restarting so its end starts the next one. None
/// when the policy is NextAttempt, nothing changed, or the order is already stopping for another
/// reason (a person's stop is theirs: the attempt ends as they asked).
pub fn restart(
    st: &mut ExperimentStatus,
    exp: &Experiment,
    order: &RunPodOrder,
    attempt: i32,
) -> Option<(String, String)> {
    if exp.spec.on_spec_change != OnSpecChange::Restart {
        return None;
    }
    let ours = st.restarting == Some(attempt);
    if order.spec.stop.is_some() && !ours {
        return None;
    }
    let fields = pending(exp, order);
    if fields.is_empty() && !ours {
        return None;
    }
    st.restarting = Some(attempt);
    let why = format!("restart for the spec change ({}): onSpecChange is Restart", fields.join(", "));
    order.spec.stop.is_none().then(|| (order.name_any(), why))
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

    #[test]
    fn under_restart_an_edit_stops_the_live_attempt_once() {
        let mut exp = crate::fixtures::quickstart();
        let mut order = crate::fixtures::quickstart_order("quickstart-a1", 1);
        let mut st = ExperimentStatus::default();
        exp.spec.image = "runpod/pytorch:2".into();
        assert_eq!(restart(&mut st, &exp, &order, 1), None, "NextAttempt never stops the live attempt");
        exp.spec.on_spec_change = OnSpecChange::Restart;
        let (name, why) = restart(&mut st, &exp, &order, 1).unwrap();
        assert_eq!(name, "quickstart-a1");
        assert!(why.contains("spec.image"), "{why}");
        assert_eq!(st.restarting, Some(1));
        let note = report(&mut st, &exp, &order, 1, chrono::Utc::now()).unwrap();
        assert!(note.contains("attempt 1 stops and attempt 2 starts with the change"), "{note}");
        order.spec.stop = Some(ep_api::order::StopRequest { reason: why });
        assert_eq!(restart(&mut st, &exp, &order, 1), None, "asked once");
        assert_eq!(st.restarting, Some(1), "still restarting");
        let mut other = ExperimentStatus::default();
        assert_eq!(restart(&mut other, &exp, &order, 1), None, "a stop already asked is not ours");
        assert_eq!(other.restarting, None);
    }
}
