//! What people read in an experiment's status besides its phase: the approval in force, how far
//! training is (progress, ETA) and the declared metrics' latest values, and the registry's word
//! for where it stands.

use chrono::{DateTime, Utc};
use ep_api::experiment::{Approval, ApprovalRecord, Envelope, Experiment, ExperimentPhase, ExperimentProgress};
use ep_api::{ExperimentStatus, RunPodOrderStatus};

use crate::reason::Reason;
use crate::registry::RegistryStatus;
use crate::time;

/// Keeps the approval in force in status, with the time the operator first saw it; returns the
/// Event note when it is new, changed or withdrawn.
pub fn record_approval(st: &mut ExperimentStatus, spec: Option<&Approval>, now: DateTime<Utc>) -> Option<String> {
    let same = match (spec, &st.approval) {
        (Some(a), Some(r)) => a.approved_by == r.approved_by && a.envelope == r.envelope,
        (None, None) => true,
        _ => false,
    };
    if same {
        return None;
    }
    st.approval = spec.map(|a| ApprovalRecord {
        approved_by: a.approved_by.clone(),
        approved_at: time::to_k8s(now),
        envelope: a.envelope.clone(),
    });
    Some(match spec {
        Some(a) => format!("{} approved spending within {}", a.approved_by, describe_envelope(&a.envelope)),
        None => "the approval was withdrawn: orders that need one wait for an approver".to_owned(),
    })
}

/// An envelope as a person reads it.
pub fn describe_envelope(e: &Envelope) -> String {
    let mut parts = vec![];
    if !e.gpu_types.is_empty() {
        parts.push(format!("GPUs {}", e.gpu_types.join(", ")));
    }
    if let Some(p) = e.max_cost_per_hour {
        parts.push(format!("${p:.2}/h"));
    }
    if let Some(t) = e.max_total_usd {
        parts.push(format!("${t:.2} in all"));
    }
    if let Some(n) = e.max_attempts {
        parts.push(format!("{n} attempts"));
    }
    if parts.is_empty() { "no bounds".to_owned() } else { parts.join(", ") }
}

/// The current attempt's progress from its order: step/total, percent and an ETA at the rate since
/// the runner came online. An attempt that has reported nothing yet shows none (not the last one's).
pub fn show_progress(st: &mut ExperimentStatus, attempt: i32, order: &RunPodOrderStatus) {
    let Some(p) = &order.progress else {
        st.progress = st.progress.take().filter(|p| p.attempt == attempt);
        return;
    };
    let reported = time::from_k8s(&p.reported_at);
    let online = order.online_at.as_ref().map(time::from_k8s);
    let eta = match (p.total, online) {
        (Some(total), Some(start)) if p.step > 0 && total > p.step && reported > start => {
            let per_step = (reported - start) / i32::try_from(p.step).unwrap_or(i32::MAX);
            Some(reported + per_step * i32::try_from(total - p.step).unwrap_or(i32::MAX))
        }
        _ => None,
    };
    let mut summary = match p.total.filter(|t| *t > 0) {
        Some(t) => format!("{}/{t} ({}%)", p.step, p.step.saturating_mul(100) / t),
        None => format!("step {}", p.step),
    };
    if let Some(e) = eta {
        summary.push_str(&format!(" eta {}", e.format("%H:%MZ")));
    }
    st.progress = Some(ExperimentProgress {
        attempt,
        step: p.step,
        total: p.total,
        eta: eta.map(time::to_k8s),
        metrics: p.metrics.clone(),
        summary,
    });
}

/// The declared metrics (`spec.results.metrics`) with their latest values: the verified results
/// once there are some, else the running attempt's progress.
pub fn metrics(exp: &Experiment, st: &ExperimentStatus) -> Option<String> {
    let declared = &exp.spec.results.as_ref()?.metrics;
    let values = st.results.as_ref().or_else(|| st.progress.as_ref().map(|p| &p.metrics))?;
    let shown: Vec<String> = declared
        .iter()
        .filter_map(|m| values.get(m).map(|v| format!("{m}={}", (v * 10_000.0).round() / 10_000.0)))
        .collect();
    (!shown.is_empty()).then(|| shown.join(" "))
}

/// A gate that blocks before any pod until a person fixes the spec or the cluster (the pipeline's
/// "preflight blocked, nothing runnable"): the registry shows NEEDS_RERUN with the reason, never a
/// READY that nothing will pick up. Approval is a normal wait, and NotBound passes by itself.
pub fn preflight_blocked(reason: Reason) -> bool {
    reason.kind() == crate::reason::Kind::Wait
        && reason.requeue() == crate::reason::Requeue::Person
        && reason.domain() != crate::reason::Domain::Paid
        && reason != Reason::NotBound
}

/// The registry's status word for a phase. `online`: the current attempt's runner came online
/// (RUNNING means the runner is online; a claimed attempt still waiting is READY).
pub fn registry_status(phase: ExperimentPhase, reason: Reason, online: bool) -> RegistryStatus {
    match phase {
        ExperimentPhase::Pending | ExperimentPhase::Waiting | ExperimentPhase::Running if preflight_blocked(reason) => {
            RegistryStatus::NeedsRerun
        }
        ExperimentPhase::Pending | ExperimentPhase::Waiting => RegistryStatus::Ready,
        ExperimentPhase::Running if online => RegistryStatus::Running,
        ExperimentPhase::Running => RegistryStatus::Ready,
        ExperimentPhase::NeedsRerun => RegistryStatus::NeedsRerun,
        ExperimentPhase::Succeeded => RegistryStatus::Completed,
        ExperimentPhase::Failed if reason == Reason::StatusDivergence => RegistryStatus::FailedStatusDivergence,
        ExperimentPhase::Failed => RegistryStatus::Failed,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ep_api::order::ProgressStatus;

    fn at(secs: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(1_800_000_000 + secs, 0).unwrap()
    }

    #[test]
    fn progress_shows_step_percent_and_an_eta_at_the_rate_so_far() {
        let mut st = ExperimentStatus::default();
        let order = RunPodOrderStatus {
            online_at: Some(time::to_k8s(at(0))),
            progress: Some(ProgressStatus {
                step: 100,
                total: Some(400),
                metrics: [("loss".to_owned(), 0.5)].into(),
                checkpoint: None,
                reported_at: time::to_k8s(at(600)),
            }),
            ..RunPodOrderStatus::default()
        };
        show_progress(&mut st, 2, &order);
        let p = st.progress.clone().unwrap();
        assert_eq!((p.attempt, p.step, p.total), (2, 100, Some(400)));
        assert_eq!(p.eta.map(|e| time::from_k8s(&e)), Some(at(2400)), "300 steps at 6 s a step");
        assert!(p.summary.starts_with("100/400 (25%) eta "), "{}", p.summary);
        // A new attempt that has reported nothing shows no progress of the last one.
        show_progress(&mut st, 3, &RunPodOrderStatus::default());
        assert!(st.progress.is_none());
    }

    #[test]
    fn the_declared_metrics_are_shown_results_first() {
        let mut exp = crate::fixtures::quickstart();
        exp.spec.results.as_mut().unwrap().metrics = vec!["f1".into(), "loss".into()];
        let mut st = ExperimentStatus {
            progress: Some(ExperimentProgress {
                attempt: 1,
                step: 1,
                total: None,
                eta: None,
                metrics: [("loss".to_owned(), 0.123_456), ("other".to_owned(), 1.0)].into(),
                summary: String::new(),
            }),
            ..ExperimentStatus::default()
        };
        assert_eq!(metrics(&exp, &st).as_deref(), Some("loss=0.1235"));
        st.results = Some([("f1".to_owned(), 0.8), ("loss".to_owned(), 0.1)].into());
        assert_eq!(metrics(&exp, &st).as_deref(), Some("f1=0.8 loss=0.1"));
    }
}
