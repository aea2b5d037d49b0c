//! The pure part of the experiment reconciler: from what is observed (the experiment, its orders'
//! status, its dependencies, the registry) to the next status, the order to create and the order
//! to bind. No clients, no clock.

use std::collections::BTreeMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use ep_api::experiment::{AttemptStatus, ExperimentPhase, ExperimentTransition, RetryCause};
use ep_api::order::{OrderPhase, OutcomeState, RunTemplate};
use ep_api::{CONDITION_READY, Experiment, ExperimentStatus, RunPodOrder, find_condition, set_condition};
use kube::ResourceExt;

pub use super::admit::{choose_worker, intake};
use super::display;
pub use super::display::registry_status;
use crate::names;
use crate::reason::{Blocked, Reason};
use crate::settings::Settings;
use crate::time;

const MAX_HISTORY: usize = 20;
const MAX_TRANSITIONS: usize = 32;
pub use ep_api::{CONDITION_RECONCILING, CONDITION_STALLED};
pub const CONDITION_REGISTRY: &str = "RegistrySynced";

/// Everything a decision needs.
pub struct Observed<'a> {
    pub exp: &'a Experiment,
    /// Orders whose `spec.experimentRef` names this experiment.
    pub orders: Vec<&'a RunPodOrder>,
    /// Each `dependsOn` name with the phase it has (None when it does not exist).
    pub deps: Vec<(String, Option<ExperimentPhase>)>,
    pub settings: &'a Settings,
    /// Why the registry does not hold this experiment's rows, when it does not.
    pub registry: Option<Blocked>,
    /// Workers a live order of the namespace holds (worker -> order), for exclusive affinities.
    pub busy: BTreeMap<String, String>,
    pub now: DateTime<Utc>,
}

/// What to do.
#[derive(Clone, Debug, PartialEq)]
pub struct Plan {
    pub status: ExperimentStatus,
    /// Order to create (name, what its attempt runs) once the status holding its claim is saved.
    pub create_order: Option<(String, RunTemplate)>,
    /// An order made by hand to bind to the claimed attempt (name, what the attempt runs).
    pub bind: Option<(String, RunTemplate)>,
    /// Events: (reason, note).
    pub events: Vec<(Reason, String)>,
    pub requeue: Option<Duration>,
    /// An order to stop (name, why): the live attempt under `onSpecChange: Restart`.
    pub stop: Option<(String, String)>,
}

/// What attempt `cur` of `exp` runs, as written into its order.
pub fn template(exp: &Experiment, cur: &AttemptStatus, spent_before: f64) -> RunTemplate {
    let s = &exp.spec;
    RunTemplate {
        attempt: cur.attempt,
        run_id: cur.run_id.clone(),
        fencing_token: cur.fencing_token,
        experiment_uid: exp.uid().unwrap_or_default(),
        image: s.image.clone(),
        entry: s.entry.clone(),
        env: s.env.clone(),
        payload: s.payload.clone(),
        limits: s.limits.clone(),
        results: s.results.clone(),
        checkpoints: s.checkpoints.clone(),
        worker_affinity: s.worker_affinity.clone(),
        spent_before_usd: (spent_before > 0.0).then_some(spent_before),
        reconcile_action: cur.reconcile_action.clone(),
        resume_from: cur.resume_from.clone(),
    }
}

struct Builder<'a> {
    o: &'a Observed<'a>,
    st: ExperimentStatus,
    events: Vec<(Reason, String)>,
    create_order: Option<(String, RunTemplate)>,
    bind: Option<(String, RunTemplate)>,
    stop: Option<(String, String)>,
    /// The current attempt's runner came online.
    online: bool,
}

impl Builder<'_> {
    fn cond(&mut self, type_: &str, ok: bool, reason: Reason, message: &str) {
        let generation = self.o.exp.metadata.generation;
        let now = time::to_k8s(self.o.now);
        set_condition(&mut self.st.conditions, type_, ok, reason.as_str(), message, generation, now);
    }

    fn phase(&mut self, phase: ExperimentPhase, reason: Reason, message: &str) {
        let before = self.st.phase;
        self.st.phase = Some(phase);
        self.st.registry_status = Some(registry_status(phase, reason, self.online).as_str().to_owned());
        let done = matches!(phase, ExperimentPhase::Succeeded | ExperimentPhase::Failed);
        let ready =
            phase == ExperimentPhase::Succeeded || (phase == ExperimentPhase::Running && reason == Reason::Running);
        self.cond(CONDITION_READY, ready, reason, message);
        (self.st.reason, self.st.message) = (Some(reason.as_str().to_owned()), Some(message.to_owned()));
        self.cond(CONDITION_RECONCILING, !done, if done { Reason::Done } else { reason }, message);
        let stalled = phase == ExperimentPhase::Failed;
        let (why, msg) = if stalled { (reason, message) } else { (Reason::Progressing, "") };
        self.cond(CONDITION_STALLED, stalled, why, msg);
        if before != Some(phase) {
            self.events.push((reason, format!("{phase:?}: {message}")));
            self.st.transitions.push(ExperimentTransition {
                phase,
                at: time::to_micro(self.o.now),
                reason: Some(reason.as_str().to_owned()),
            });
            if self.st.transitions.len() > MAX_TRANSITIONS {
                let extra = self.st.transitions.len() - MAX_TRANSITIONS;
                self.st.transitions.drain(..extra);
            }
        }
    }
}

fn ended(p: Option<OrderPhase>) -> bool {
    matches!(p, Some(OrderPhase::Deleted | OrderPhase::Failed))
}

fn round(x: f64) -> f64 {
    (x * 10_000.0).round() / 10_000.0
}

fn plan(b: &mut Builder<'_>, requeue: Option<Duration>) -> Plan {
    b.st.metrics = display::metrics(b.o.exp, &b.st);
    Plan {
        status: std::mem::take(&mut b.st),
        create_order: b.create_order.take(),
        bind: b.bind.take(),
        events: std::mem::take(&mut b.events),
        requeue,
        stop: b.stop.take(),
    }
}

/// Spend of the attempts already over.
fn spent_before(st: &ExperimentStatus) -> f64 {
    st.history.iter().filter_map(|a| a.cost_usd).sum()
}

/// Decides the next status of an experiment.
pub fn decide(o: &Observed<'_>) -> Plan {
    let exp = o.exp;
    let mut b = Builder {
        o,
        st: exp.status.clone().unwrap_or_default(),
        events: vec![],
        create_order: None,
        bind: None,
        stop: None,
        online: false,
    };
    b.st.observed_generation = exp.metadata.generation;
    if let Some(note) = display::record_approval(&mut b.st, exp.spec.approval.as_ref(), o.now) {
        b.events.push((Reason::Approved, note));
    }
    match &o.registry {
        Some(why) => b.cond(CONDITION_REGISTRY, false, why.reason, &why.message),
        None => b.cond(CONDITION_REGISTRY, true, Reason::Mirrored, "the registry holds this status"),
    }
    if let Some(cur) = b.st.current_attempt.clone() {
        let order = cur.order.as_ref().and_then(|n| o.orders.iter().find(|x| x.name_any() == *n)).copied();
        match order {
            None => {
                // Claimed in status but the order is missing (a crash after the claim, or a person
                // deleted it): create it again under the same name; it adopts any pod of the run.
                let t = template(exp, &cur, spent_before(&b.st));
                b.create_order = cur.order.clone().map(|n| (n, t));
                let msg = format!("attempt {} ordered", cur.attempt);
                b.phase(ExperimentPhase::Running, Reason::OrderCreated, &msg);
                return plan(&mut b, Some(o.settings.poll_interval.get()));
            }
            Some(order) => {
                if let Some(p) = follow(&mut b, &cur, order) {
                    return p;
                }
            }
        }
    }
    next_attempt(b)
}

/// Follows the current attempt's order: the plan, or None when the attempt failed with attempts
/// left (the next attempt may start now).
fn follow(b: &mut Builder<'_>, cur: &AttemptStatus, order: &RunPodOrder) -> Option<Plan> {
    let o = b.o;
    let ost = order.status.clone().unwrap_or_default();
    b.online = ost.online_at.is_some();
    let mut a = cur.clone();
    a.pod_id.clone_from(&ost.pod_id);
    a.pid = ost.heartbeat.as_ref().and_then(|h| h.pid);
    a.gpu_id = ost.heartbeat.as_ref().and_then(|h| h.gpu_ids.clone());
    let timeout = chrono::Duration::from_std(o.settings.heartbeat_timeout.get()).unwrap_or_default();
    a.lease_expiry = ost.heartbeat.as_ref().map(|h| time::to_k8s(time::from_k8s(&h.time) + timeout));
    a.cost_usd = ost.accrued_cost_usd;
    if let Some(g) = &ost.gpu {
        b.st.gpu = Some(g.display_name.clone());
    }
    let before = spent_before(&b.st);
    b.st.cost_usd = Some(round(before + ost.accrued_cost_usd.unwrap_or(0.0)));
    if !ended(ost.phase) {
        if order.spec.run.is_none()
            && ost.binding.as_ref().map(|t| t.fencing_token) != Some(cur.fencing_token)
            && !claimed(ost.phase)
        {
            b.bind = Some((order.name_any(), template(o.exp, cur, before)));
        }
        b.st.current_attempt = Some(a);
        let (reason, msg) = match find_condition(&ost.conditions, CONDITION_READY) {
            Some(c) if c.status == "True" => {
                (Reason::Running, format!("attempt {} running in order {}", cur.attempt, order.name_any()))
            }
            Some(c) => {
                (c.reason.parse().unwrap_or(Reason::OrderCreated), format!("order {}: {}", order.name_any(), c.message))
            }
            None => (Reason::OrderCreated, format!("order {} accepted", order.name_any())),
        };
        // No pod yet and the order held at a gate: the experiment waits, and says for what.
        let gated = reason.kind() == crate::reason::Kind::Wait && !claimed(ost.phase);
        b.phase(if gated { ExperimentPhase::Waiting } else { ExperimentPhase::Running }, reason, &msg);
        display::show_progress(&mut b.st, cur.attempt, &ost);
        if let Some(note) = super::drift::report(&mut b.st, o.exp, order, cur.attempt, o.now) {
            b.events.push((Reason::SpecChangePending, note));
        }
        b.stop = super::drift::restart(&mut b.st, o.exp, order, cur.attempt);
        return Some(plan(b, None));
    }
    fold(b, cur, order, a, before)
}

/// The attempt is over: folds its outcome into status.
fn fold(
    b: &mut Builder<'_>,
    cur: &AttemptStatus,
    order: &RunPodOrder,
    mut a: AttemptStatus,
    before: f64,
) -> Option<Plan> {
    let o = b.o;
    let ost = order.status.clone().unwrap_or_default();
    let out = ost.outcome.clone();
    let parse = |r: Option<&String>, default: Reason| r.and_then(|r| r.parse().ok()).unwrap_or(default);
    let (state, reason, message) = match &out {
        Some(x) => (x.state, parse(Some(&x.reason), Reason::RunFailed), x.message.clone().unwrap_or_default()),
        // An order that ended DELETED without an outcome was stopped before any pod ran.
        None if ost.phase == Some(OrderPhase::Deleted) => {
            (OutcomeState::Stopped, parse(ost.reason.as_ref(), Reason::StoppedBeforeLaunch), String::new())
        }
        None => (
            OutcomeState::Failed,
            parse(ost.reason.as_ref(), Reason::RunFailed),
            ost.message.clone().unwrap_or_default(),
        ),
    };
    a.finished_at = out.as_ref().map(|x| x.finished_at.clone()).or_else(|| Some(time::to_k8s(o.now)));
    a.outcome = Some(state);
    a.reason = Some(reason.as_str().to_owned());
    b.st.conditions.retain(|c| c.type_ != super::drift::CONDITION);
    b.st.current_attempt = None;
    b.st.history.push(a.clone());
    if b.st.history.len() > MAX_HISTORY {
        let extra = b.st.history.len() - MAX_HISTORY;
        b.st.history.drain(..extra);
    }
    let spent = round(before + a.cost_usd.unwrap_or(0.0));
    b.st.cost_usd = Some(spent);
    let detail = if message.is_empty() { reason.to_string() } else { format!("{reason}: {message}") };
    let n = cur.attempt;
    if b.st.restarting.take() == Some(n) && state != OutcomeState::Succeeded {
        // Stopped for a spec change under onSpecChange: Restart: the next attempt starts now with
        // the change, and the stopped one does not count against retry.maxAttempts.
        b.st.rerun_from += 1;
        b.events
            .push((Reason::Restarted, format!("attempt {n} stopped for the spec change; attempt {} runs it", n + 1)));
        return None;
    }
    match state {
        OutcomeState::Succeeded => {
            if let Some(x) = &out {
                b.st.results = Some(x.metrics.clone());
                b.st.artifacts.clone_from(&x.artifacts);
                b.st.usage.clone_from(&x.usage);
            }
            b.st.next_attempt_at = None;
            let receipt = out.as_ref().and_then(|x| x.artifacts.as_ref()).map_or("none", |r| r.receipt.as_str());
            let m = format!("attempt {n} succeeded; results verified (receipt {receipt})");
            b.phase(ExperimentPhase::Succeeded, Reason::Succeeded, &m);
        }
        OutcomeState::FailedStatusDivergence => {
            b.phase(ExperimentPhase::Failed, Reason::StatusDivergence, &format!("attempt {n}: {detail}"));
        }
        OutcomeState::Stopped => {
            b.phase(ExperimentPhase::Failed, Reason::Stopped, &format!("attempt {n} stopped: {detail}"));
        }
        OutcomeState::Failed => return retry(b, n, &a, spent, &detail),
    }
    Some(plan(b, None))
}

/// A failed attempt: the experiment fails when no attempt or money is left, else it needs a rerun.
fn retry(b: &mut Builder<'_>, n: i32, a: &AttemptStatus, spent: f64, detail: &str) -> Option<Plan> {
    let o = b.o;
    let retry = o.exp.spec.retry.clone();
    let max_attempts = retry.as_ref().map_or(1, |r| r.max_attempts.max(1));
    let backoff = retry.and_then(|r| r.backoff).map_or(Duration::ZERO, |d| d.get());
    let max_cost = o.exp.spec.limits.as_ref().and_then(|l| l.max_cost_usd);
    if b.st.attempts - b.st.rerun_from >= max_attempts {
        let m = format!("attempt {n} of {max_attempts} failed ({detail}); no attempts left");
        b.phase(ExperimentPhase::Failed, Reason::RetriesExhausted, &m);
        return Some(plan(b, None));
    }
    let on = o.exp.spec.retry.as_ref().map_or_else(|| vec![RetryCause::PodLost], |r| r.when.clone());
    let cause = a.reason.as_deref().and_then(|r| r.parse().ok()).and_then(retry_cause);
    if !on.contains(&RetryCause::Any) && !cause.is_some_and(|c| on.contains(&c)) {
        let named = cause.map_or_else(|| "this failure".to_owned(), |c| format!("{c:?}"));
        let m = format!("attempt {n} failed ({detail}); not retried: retry.when does not name {named}");
        b.phase(ExperimentPhase::Failed, Reason::NotRetried, &m);
        return Some(plan(b, None));
    }
    if let Some(max) = max_cost.filter(|m| spent >= *m) {
        let m = format!("attempt {n} failed ({detail}) and ${spent:.2} of ${max:.2} is spent");
        b.phase(ExperimentPhase::Failed, Reason::CostLimitReached, &m);
        return Some(plan(b, None));
    }
    let finished = a.finished_at.as_ref().map_or(o.now, time::from_k8s);
    let next = finished + chrono::Duration::from_std(backoff).unwrap_or_default();
    b.st.next_attempt_at = Some(time::to_k8s(next));
    let m = format!("attempt {n} failed ({detail}); attempt {} after {}", n + 1, next.to_rfc3339());
    b.phase(ExperimentPhase::NeedsRerun, Reason::AttemptFailed, &m);
    None
}

/// No attempt under way: wait (finished, backoff, intake, suspend, dependencies) or claim the next.
fn next_attempt(mut b: Builder<'_>) -> Plan {
    let o = b.o;
    let exp = o.exp;
    let poll = o.settings.poll_interval.get();
    match b.st.phase {
        Some(ExperimentPhase::Succeeded | ExperimentPhase::Failed) => {
            // A finished experiment runs again when spec.rerun takes a value it has not served.
            let Some(token) = exp.spec.rerun.clone().filter(|r| b.st.rerun.as_ref() != Some(r)) else {
                return plan(&mut b, None);
            };
            let note = format!("rerun {token}: attempt {} follows, with retries counted afresh", b.st.attempts + 1);
            (b.st.rerun, b.st.rerun_from, b.st.next_attempt_at) = (Some(token), b.st.attempts, None);
            (b.st.results, b.st.artifacts, b.st.usage) = (None, None, None);
            b.events.push((Reason::RerunRequested, note));
        }
        Some(ExperimentPhase::NeedsRerun) => {
            if let Some(at) = b.st.next_attempt_at.as_ref().map(time::from_k8s)
                && o.now < at
            {
                return plan(&mut b, Some((at - o.now).to_std().unwrap_or_default()));
            }
        }
        _ => {}
    }
    if let Err(blocked) = intake(exp, o.settings) {
        b.phase(ExperimentPhase::Waiting, blocked.reason, &blocked.message);
        return plan(&mut b, blocked.reason.requeue().after(poll));
    }
    if exp.spec.suspend {
        b.phase(ExperimentPhase::Waiting, Reason::Suspended, "spec.suspend is true: no new attempt starts");
        return plan(&mut b, None);
    }
    let pending: Vec<String> = o
        .deps
        .iter()
        .filter(|(_, p)| *p != Some(ExperimentPhase::Succeeded))
        .map(|(n, p)| format!("{n} ({})", p.map_or_else(|| "missing".to_owned(), |p| format!("{p:?}"))))
        .collect();
    if !pending.is_empty() {
        let failed = o.deps.iter().any(|(_, p)| *p == Some(ExperimentPhase::Failed));
        let reason = if failed { Reason::DependencyFailed } else { Reason::DependencyPending };
        b.phase(ExperimentPhase::Waiting, reason, &format!("spec.dependsOn not succeeded: {}", pending.join(", ")));
        return plan(&mut b, Some(poll));
    }
    claim(b)
}

/// The `retry.when` kind of an attempt's failure reason.
fn retry_cause(r: Reason) -> Option<RetryCause> {
    Some(match r {
        Reason::PodVanished
        | Reason::PodGone
        | Reason::PodExited
        | Reason::HeartbeatLost
        | Reason::RuntimeNeverAppeared => RetryCause::PodLost,
        Reason::LifetimeReached | Reason::TimedOut => RetryCause::LifetimeReached,
        Reason::NonZeroExit => RetryCause::NonZeroExit,
        Reason::ResultsContractBroken => RetryCause::ResultsContractBroken,
        _ => return None,
    })
}

/// Whether an order has claimed its run (from then on its binding is its own, never moved).
fn claimed(p: Option<OrderPhase>) -> bool {
    matches!(p, Some(OrderPhase::Verified | OrderPhase::RunnerOnline | OrderPhase::Draining))
}

/// The order made by hand for attempt `n`, if any. Else one made by hand whose binding is stale
/// (made for an earlier attempt, or for none) and that never claimed a run: it is re-bound to
/// attempt `n` rather than left waiting forever, and what was repaired is said.
fn by_hand<'a>(o: &Observed<'a>, n: i32) -> (Option<&'a RunPodOrder>, Option<String>) {
    let open = |x: &&&'a RunPodOrder| {
        let phase = x.status.as_ref().and_then(|s| s.phase);
        x.spec.run.is_none() && !ended(phase) && !claimed(phase)
    };
    if let Some(x) = o.orders.iter().filter(open).find(|x| x.spec.attempt == Some(n)) {
        return (Some(*x), None);
    }
    let stale = o
        .orders
        .iter()
        .filter(open)
        .filter(|x| x.spec.attempt.is_none_or(|a| a < n))
        .min_by_key(|x| (x.metadata.creation_timestamp.as_ref().map(|t| t.0), x.name_any()));
    let Some(x) = stale else { return (None, None) };
    let was = match x.status.as_ref().and_then(|s| s.binding.as_ref()) {
        Some(t) => format!("attempt {} (run {})", t.attempt, t.run_id),
        None => x.spec.attempt.map_or_else(|| "no attempt".to_owned(), |a| format!("attempt {a}")),
    };
    let action = format!("stale binding cleared: order {} was bound to {was}, re-bound to attempt {n}", x.name_any());
    (Some(*x), Some(action))
}

/// Claims the next attempt. The claim is saved before the order exists.
fn claim(mut b: Builder<'_>) -> Plan {
    let o = b.o;
    let exp = o.exp;
    let n = b.st.attempts + 1;
    let worker = match choose_worker(exp, &o.busy) {
        Ok(w) => w,
        Err(blocked) => {
            b.phase(ExperimentPhase::Waiting, blocked.reason, &blocked.message);
            return plan(&mut b, blocked.reason.requeue().after(o.settings.poll_interval.get()));
        }
    };
    let uid = exp.uid().unwrap_or_default();
    let run_id = names::run_id(&exp.name_any(), &uid, n);
    let (by_hand, repaired) = by_hand(o, n);
    let order = by_hand.map_or_else(|| names::order_name(&exp.name_any(), n), kube::ResourceExt::name_any);
    // Fencing tokens grow with every claim: the claim time in milliseconds, never below the last.
    let last = b.st.history.iter().map(|a| a.fencing_token).max().unwrap_or(0);
    let token = o.now.timestamp_millis().max(last + 1);
    let cur = AttemptStatus {
        attempt: n,
        run_id: run_id.clone(),
        fencing_token: token,
        order: Some(order.clone()),
        worker_id: Some(worker),
        started_at: Some(time::to_k8s(o.now)),
        reconcile_action: repaired.clone(),
        resume_from: super::resume::checkpoint(exp, &o.orders, &b.st.history),
        ..AttemptStatus::default()
    };
    if let Some(action) = repaired {
        b.events.push((Reason::BindingRepaired, action));
    }
    let t = template(exp, &cur, spent_before(&b.st));
    b.st.current_attempt = Some(cur);
    b.st.attempts = n;
    b.st.next_attempt_at = None;
    if by_hand.is_some() {
        b.bind = Some((order.clone(), t));
    } else {
        b.create_order = Some((order.clone(), t));
    }
    let msg = format!("attempt {n} claimed as run {run_id}; order {order}");
    b.phase(ExperimentPhase::Running, Reason::AttemptClaimed, &msg);
    plan(&mut b, None)
}

#[cfg(test)]
mod tests;
