//! The pure part of the experiment reconciler: from what is observed to the next status and the
//! order to create. No clients, no clock.

use std::time::Duration;

use chrono::{DateTime, Utc};
use ep_api::experiment::{AttemptStatus, ExperimentPhase};
use ep_api::order::OrderPhase;
use ep_api::{CONDITION_READY, Experiment, ExperimentStatus, RunPodOrder, find_condition, set_condition};
use kube::ResourceExt;

use crate::names;
use crate::registry::status as reg;
use crate::settings::Settings;
use crate::time;

const MAX_HISTORY: usize = 20;
pub const CONDITION_STALLED: &str = "Stalled";
pub const CONDITION_RECONCILING: &str = "Reconciling";
pub const CONDITION_REGISTRY: &str = "RegistrySynced";

/// Everything a decision needs.
pub struct Observed<'a> {
    pub exp: &'a Experiment,
    /// Orders whose `spec.experimentRef` names this experiment.
    pub orders: Vec<&'a RunPodOrder>,
    /// Each `dependsOn` name with the phase it has (None when it does not exist).
    pub deps: Vec<(String, Option<ExperimentPhase>)>,
    pub settings: &'a Settings,
    /// Why the registry is behind, when it is.
    pub registry_behind: Option<String>,
    pub now: DateTime<Utc>,
}

/// What to do.
#[derive(Clone, Debug, PartialEq)]
pub struct Plan {
    pub status: ExperimentStatus,
    /// Order to create (name, attempt) once the status holding its claim is saved.
    pub create_order: Option<(String, i32)>,
    /// Events: (warning, reason, note).
    pub events: Vec<(bool, String, String)>,
    pub requeue: Option<Duration>,
}

/// Checks what the schema cannot: names resolve against the settings in force.
pub fn intake(exp: &Experiment, settings: &Settings) -> Result<(), (&'static str, String)> {
    let s = &exp.spec;
    if let Err(e) = settings.policy(&s.order.policy) {
        return Err(("UnknownPolicy", format!("spec.order.policy: {e}")));
    }
    if s.gpu.interruptible {
        return Err((
            "SpotUnavailable",
            "spec.gpu.interruptible: RunPod no longer offers interruptible (spot) pods; set it to false".into(),
        ));
    }
    if s.checkpoints.as_ref().and_then(|c| c.retention).is_none() {
        return Err(("RetentionMissing", "spec.checkpoints.retention is required: Keep, KeepLast or Discard".into()));
    }
    if let Some(a) = &s.worker_affinity {
        if a.runtime != "runpod" {
            return Err(("WorkerMismatch", format!("spec.workerAffinity.runtime {:?}: only runpod exists", a.runtime)));
        }
        if !a.workers.is_empty() && !a.workers.contains(&s.order.worker_id) {
            return Err((
                "WorkerMismatch",
                format!(
                    "spec.order.workerId {} is not among spec.workerAffinity.workers ({})",
                    s.order.worker_id,
                    a.workers.join(", ")
                ),
            ));
        }
    }
    Ok(())
}

/// The registry's status word for a phase.
pub fn registry_status(phase: ExperimentPhase, divergent: bool) -> &'static str {
    match phase {
        ExperimentPhase::Pending | ExperimentPhase::Waiting => reg::READY,
        ExperimentPhase::Running => reg::RUNNING,
        ExperimentPhase::NeedsRerun => reg::NEEDS_RERUN,
        ExperimentPhase::Succeeded => reg::COMPLETED,
        ExperimentPhase::Failed if divergent => reg::FAILED_STATUS_DIVERGENCE,
        ExperimentPhase::Failed => reg::FAILED,
    }
}

struct Builder<'a> {
    o: &'a Observed<'a>,
    st: ExperimentStatus,
    events: Vec<(bool, String, String)>,
    create_order: Option<(String, i32)>,
}

impl Builder<'_> {
    fn cond(&mut self, type_: &str, ok: bool, reason: &str, message: &str) {
        let generation = self.o.exp.metadata.generation;
        set_condition(&mut self.st.conditions, type_, ok, reason, message, generation, time::to_k8s(self.o.now));
    }

    fn phase(&mut self, phase: ExperimentPhase, reason: &str, message: &str) {
        let before = self.st.phase;
        self.st.phase = Some(phase);
        let divergent = reason == "StatusDivergence";
        self.st.registry_status = Some(registry_status(phase, divergent).to_owned());
        let done = matches!(phase, ExperimentPhase::Succeeded | ExperimentPhase::Failed);
        let ready = phase == ExperimentPhase::Succeeded || (phase == ExperimentPhase::Running && reason == "Running");
        self.cond(CONDITION_READY, ready, reason, message);
        self.cond(CONDITION_RECONCILING, !done, if done { "Done" } else { reason }, message);
        let stalled = phase == ExperimentPhase::Failed;
        self.cond(
            CONDITION_STALLED,
            stalled,
            if stalled { reason } else { "Progressing" },
            if stalled { message } else { "" },
        );
        if before != Some(phase) {
            let warning = matches!(phase, ExperimentPhase::Failed | ExperimentPhase::NeedsRerun);
            self.events.push((warning, reason.to_owned(), format!("{phase:?}: {message}")));
        }
    }
}

fn ended(p: Option<OrderPhase>) -> bool {
    matches!(p, Some(OrderPhase::Deleted | OrderPhase::Failed))
}

/// Decides the next status of an experiment.
pub fn decide(o: &Observed<'_>) -> Plan {
    let exp = o.exp;
    let mut b = Builder { o, st: exp.status.clone().unwrap_or_default(), events: vec![], create_order: None };
    b.st.observed_generation = exp.metadata.generation;
    match &o.registry_behind {
        Some(why) => b.cond(CONDITION_REGISTRY, false, "RegistryUnavailable", why),
        None => b.cond(CONDITION_REGISTRY, true, "Mirrored", "the registry holds this status"),
    }
    let retry = exp.spec.retry.clone();
    let max_attempts = retry.as_ref().map_or(1, |r| r.max_attempts.max(1));
    let backoff = retry.and_then(|r| r.backoff).map_or(Duration::ZERO, |d| d.get());
    let max_cost = exp.spec.limits.as_ref().and_then(|l| l.max_cost_usd);
    let poll = o.settings.poll_interval.get();

    if let Some(cur) = b.st.current_attempt.clone() {
        let order = cur.order.as_ref().and_then(|n| o.orders.iter().find(|x| x.name_any() == *n));
        let spent_before: f64 = b.st.history.iter().filter_map(|a| a.cost_usd).sum();
        match order {
            None => {
                // Claimed in status but the order is missing (a crash after the claim, or a person
                // deleted it): create it again under the same name; it adopts any pod of the run.
                b.create_order = cur.order.clone().map(|n| (n, cur.attempt));
                b.phase(ExperimentPhase::Running, "OrderCreated", &format!("attempt {} ordered", cur.attempt));
                return plan(b, Some(poll));
            }
            Some(order) => {
                let ost = order.status.clone().unwrap_or_default();
                let mut a = cur.clone();
                a.pod_id.clone_from(&ost.pod_id);
                a.pid = ost.heartbeat.as_ref().and_then(|h| h.pid);
                a.gpu_id = ost.heartbeat.as_ref().and_then(|h| h.gpu_ids.clone());
                a.lease_expiry = ost.heartbeat.as_ref().map(|h| {
                    time::to_k8s(
                        time::from_k8s(&h.time)
                            + chrono::Duration::from_std(o.settings.heartbeat_timeout.get()).unwrap_or_default(),
                    )
                });
                a.cost_usd = ost.accrued_cost_usd;
                if let Some(g) = &ost.gpu {
                    b.st.gpu = Some(g.display_name.clone());
                }
                b.st.cost_usd = Some(round(spent_before + ost.accrued_cost_usd.unwrap_or(0.0)));
                if !ended(ost.phase) {
                    b.st.current_attempt = Some(a);
                    let order_ready = find_condition(&ost.conditions, CONDITION_READY);
                    let (reason, msg) = match order_ready {
                        Some(c) if c.status == "True" => (
                            "Running".to_owned(),
                            format!("attempt {} running in order {}", cur.attempt, order.name_any()),
                        ),
                        Some(c) => (c.reason.clone(), format!("order {}: {}", order.name_any(), c.message)),
                        None => ("OrderCreated".to_owned(), format!("order {} accepted", order.name_any())),
                    };
                    b.phase(ExperimentPhase::Running, &reason, &msg);
                    return plan(b, None);
                }
                // The attempt is over: fold its outcome.
                let out = ost.outcome.clone();
                let (state, reason, message) = match &out {
                    Some(x) => (x.state.clone(), x.reason.clone(), x.message.clone().unwrap_or_default()),
                    None if order.spec.stop.is_some() || ost.phase == Some(OrderPhase::Deleted) => (
                        "Stopped".into(),
                        ost.reason.clone().unwrap_or_else(|| "StoppedBeforeLaunch".into()),
                        String::new(),
                    ),
                    None => (
                        "Failed".into(),
                        ost.reason.clone().unwrap_or_else(|| "OrderFailed".into()),
                        ost.message.clone().unwrap_or_default(),
                    ),
                };
                a.finished_at = out.as_ref().map(|x| x.finished_at.clone()).or_else(|| Some(time::to_k8s(o.now)));
                a.outcome = Some(state.clone());
                a.reason = Some(reason.clone());
                b.st.current_attempt = None;
                b.st.history.push(a.clone());
                if b.st.history.len() > MAX_HISTORY {
                    let extra = b.st.history.len() - MAX_HISTORY;
                    b.st.history.drain(..extra);
                }
                let spent = round(spent_before + a.cost_usd.unwrap_or(0.0));
                b.st.cost_usd = Some(spent);
                let detail = if message.is_empty() { reason.clone() } else { format!("{reason}: {message}") };
                match state.as_str() {
                    "Succeeded" => {
                        if let Some(x) = &out {
                            b.st.results = Some(x.metrics.clone());
                            b.st.artifacts.clone_from(&x.artifacts);
                            b.st.usage.clone_from(&x.usage);
                        }
                        b.st.next_attempt_at = None;
                        let m = format!(
                            "attempt {} succeeded; results verified (receipt {})",
                            cur.attempt,
                            out.as_ref().and_then(|x| x.artifacts.as_ref()).map_or("none", |r| r.receipt.as_str())
                        );
                        b.phase(ExperimentPhase::Succeeded, "Succeeded", &m);
                        return plan(b, None);
                    }
                    "FailedStatusDivergence" => {
                        b.phase(
                            ExperimentPhase::Failed,
                            "StatusDivergence",
                            &format!("attempt {}: {detail}", cur.attempt),
                        );
                        return plan(b, None);
                    }
                    "Stopped" => {
                        b.phase(
                            ExperimentPhase::Failed,
                            "Stopped",
                            &format!("attempt {} stopped: {detail}", cur.attempt),
                        );
                        return plan(b, None);
                    }
                    _ => {
                        if b.st.attempts >= max_attempts {
                            let m = format!(
                                "attempt {} of {max_attempts} failed ({detail}); no attempts left",
                                cur.attempt
                            );
                            b.phase(ExperimentPhase::Failed, "RetriesExhausted", &m);
                            return plan(b, None);
                        }
                        if max_cost.is_some_and(|m| spent >= m) {
                            let m = format!(
                                "attempt {} failed ({detail}) and ${spent:.2} of ${:.2} is spent",
                                cur.attempt,
                                max_cost.unwrap_or_default()
                            );
                            b.phase(ExperimentPhase::Failed, "CostLimitReached", &m);
                            return plan(b, None);
                        }
                        let finished = a.finished_at.as_ref().map_or(o.now, time::from_k8s);
                        let next = finished + chrono::Duration::from_std(backoff).unwrap_or_default();
                        b.st.next_attempt_at = Some(time::to_k8s(next));
                        let m = format!(
                            "attempt {} failed ({detail}); attempt {} after {}",
                            cur.attempt,
                            cur.attempt + 1,
                            next.to_rfc3339()
                        );
                        b.phase(ExperimentPhase::NeedsRerun, "AttemptFailed", &m);
                        // Fall through: the next attempt may start now.
                    }
                }
            }
        }
    }

    match b.st.phase {
        Some(ExperimentPhase::Succeeded | ExperimentPhase::Failed) => return plan(b, None),
        Some(ExperimentPhase::NeedsRerun) => {
            if let Some(at) = b.st.next_attempt_at.as_ref().map(time::from_k8s)
                && o.now < at
            {
                let wait = (at - o.now).to_std().unwrap_or_default();
                return plan(b, Some(wait));
            }
        }
        _ => {}
    }
    if let Err((reason, msg)) = intake(exp, o.settings) {
        b.phase(ExperimentPhase::Waiting, reason, &msg);
        return plan(b, Some(Duration::from_secs(60)));
    }
    if exp.spec.suspend {
        b.phase(ExperimentPhase::Waiting, "Suspended", "spec.suspend is true: no new attempt starts");
        return plan(b, None);
    }
    let pending: Vec<String> = o
        .deps
        .iter()
        .filter(|(_, p)| *p != Some(ExperimentPhase::Succeeded))
        .map(|(n, p)| format!("{n} ({})", p.map_or_else(|| "missing".to_owned(), |p| format!("{p:?}"))))
        .collect();
    if !pending.is_empty() {
        let failed = o.deps.iter().any(|(_, p)| *p == Some(ExperimentPhase::Failed));
        let reason = if failed { "DependencyFailed" } else { "DependencyPending" };
        b.phase(ExperimentPhase::Waiting, reason, &format!("spec.dependsOn not succeeded: {}", pending.join(", ")));
        return plan(b, Some(poll));
    }
    // Runnable: claim the next attempt. The claim is saved before the order exists.
    let n = b.st.attempts + 1;
    let uid = exp.uid().unwrap_or_default();
    let run_id = names::run_id(&exp.name_any(), &uid, n);
    let by_hand =
        o.orders.iter().find(|x| x.spec.attempt == Some(n) && !ended(x.status.as_ref().and_then(|s| s.phase)));
    let order = by_hand.map_or_else(|| names::order_name(&exp.name_any(), n), |x| x.name_any());
    // Fencing tokens grow with every claim: the claim time in milliseconds, never below the last.
    let last = b.st.history.iter().map(|a| a.fencing_token).max().unwrap_or(0);
    let token = o.now.timestamp_millis().max(last + 1);
    b.st.current_attempt = Some(AttemptStatus {
        attempt: n,
        run_id: run_id.clone(),
        fencing_token: token,
        order: Some(order.clone()),
        worker_id: Some(exp.spec.order.worker_id.clone()),
        started_at: Some(time::to_k8s(o.now)),
        ..AttemptStatus::default()
    });
    b.st.attempts = n;
    b.st.next_attempt_at = None;
    if by_hand.is_none() {
        b.create_order = Some((order.clone(), n));
    }
    b.phase(ExperimentPhase::Running, "AttemptClaimed", &format!("attempt {n} claimed as run {run_id}; order {order}"));
    plan(b, None)
}

fn round(x: f64) -> f64 {
    (x * 10_000.0).round() / 10_000.0
}

fn plan(b: Builder<'_>, requeue: Option<Duration>) -> Plan {
    Plan { status: b.st, create_order: b.create_order, events: b.events, requeue }
}

#[cfg(test)]
mod tests;
