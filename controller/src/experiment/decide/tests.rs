#![allow(clippy::unwrap_used, clippy::expect_used)]

use chrono::TimeZone;
use ep_api::RunPodOrderStatus;
use ep_api::experiment::ExperimentPhase as P;
use ep_api::experiment::RetryCause;
use ep_api::order::{OrderPhase, OutcomeState, RunOutcome};

use super::*;

fn t(secs: i64) -> DateTime<Utc> {
    Utc.timestamp_opt(1_800_000_000 + secs, 0).unwrap()
}

fn exp() -> Experiment {
    crate::fixtures::quickstart()
}

/// The operator's own order for the attempt, with the given status.
fn order(name: &str, attempt: i32, st: RunPodOrderStatus) -> RunPodOrder {
    let mut o = crate::fixtures::quickstart_order(name, attempt);
    o.status = Some(st);
    o
}

fn ended(state: OutcomeState, at: i64, cost: f64) -> RunPodOrderStatus {
    RunPodOrderStatus {
        phase: Some(OrderPhase::Deleted),
        accrued_cost_usd: Some(cost),
        outcome: Some(RunOutcome {
            state,
            reason: if state == OutcomeState::Succeeded { "RunFinished".into() } else { "HeartbeatLost".into() },
            message: None,
            exit_code: None,
            metrics: [("f1".to_owned(), 0.8), ("auc".to_owned(), 0.95)].into_iter().collect(),
            artifacts: None,
            usage: None,
            retention: None,
            finished_at: time::to_k8s(t(at)),
        }),
        ..RunPodOrderStatus::default()
    }
}

fn run(e: &Experiment, orders: &[RunPodOrder], deps: Vec<(String, Option<P>)>, now: i64) -> Plan {
    let settings = Settings::embedded_default();
    decide(&Observed {
        exp: e,
        orders: orders.iter().collect(),
        deps,
        settings: &settings,
        registry: None,
        busy: BTreeMap::new(),
        now: t(now),
    })
}

/// The order a plan creates: its name and attempt.
fn created(p: &Plan) -> Option<(String, i32)> {
    p.create_order.as_ref().map(|(n, t)| (n.clone(), t.attempt))
}

/// Applies a plan's status to the experiment, as the API server would.
fn with(mut e: Experiment, p: &Plan) -> Experiment {
    e.status = Some(p.status.clone());
    e
}

#[test]
fn the_first_pass_claims_attempt_one_before_its_order_exists() {
    let p = run(&exp(), &[], vec![], 0);
    let cur = p.status.current_attempt.clone().unwrap();
    assert_eq!(cur.attempt, 1);
    assert_eq!(cur.run_id, names::run_id("quickstart", "uid-1", 1));
    assert_eq!(cur.order.as_deref(), Some("quickstart-a1"));
    assert_eq!(created(&p), Some(("quickstart-a1".to_owned(), 1)));
    assert_eq!(p.status.phase, Some(P::Running));
    // Claimed, no runner yet: READY in the pipeline's words.
    assert_eq!(p.status.registry_status.as_deref(), Some("READY"));
}

#[test]
fn a_failed_attempt_with_attempts_left_needs_a_rerun_after_the_backoff() {
    let e = with(exp(), &run(&exp(), &[], vec![], 0));
    let failed = [order("quickstart-a1", 1, ended(OutcomeState::Failed, 100, 0.01))];
    let p = run(&e, &failed, vec![], 101);
    assert_eq!(p.status.phase, Some(P::NeedsRerun));
    assert_eq!(p.status.registry_status.as_deref(), Some("NEEDS_RERUN"));
    assert_eq!(created(&p), None, "backoff 30s: not yet");
    assert_eq!(p.requeue, Some(Duration::from_secs(29)));
    assert_eq!(p.status.history.len(), 1);
    let e = with(e, &p);
    let p = run(&e, &failed, vec![], 130);
    let cur = p.status.current_attempt.clone().unwrap();
    assert_eq!(cur.attempt, 2);
    assert_ne!(cur.run_id, p.status.history[0].run_id, "a new run id per attempt");
    assert!(cur.fencing_token > p.status.history[0].fencing_token, "fencing tokens grow");
    assert_eq!(created(&p), Some(("quickstart-a2".to_owned(), 2)));
}

#[test]
fn the_last_attempt_failing_fails_the_experiment() {
    let mut e = exp();
    e.spec.retry =
        Some(ep_api::experiment::RetryPolicy { max_attempts: 1, backoff: None, when: vec![RetryCause::Any] });
    let e = with(e.clone(), &run(&e, &[], vec![], 0));
    let p = run(&e, &[order("quickstart-a1", 1, ended(OutcomeState::Failed, 10, 0.0))], vec![], 11);
    assert_eq!(p.status.phase, Some(P::Failed));
    assert_eq!(p.status.registry_status.as_deref(), Some("FAILED"));
    let stalled = find_condition(&p.status.conditions, CONDITION_STALLED).unwrap();
    assert_eq!((stalled.status.as_str(), stalled.reason.as_str()), ("True", "RetriesExhausted"));
}

#[test]
fn a_divergent_terminal_state_is_reported_in_the_pipelines_words() {
    let e = with(exp(), &run(&exp(), &[], vec![], 0));
    let p = run(&e, &[order("quickstart-a1", 1, ended(OutcomeState::FailedStatusDivergence, 10, 0.0))], vec![], 11);
    assert_eq!(p.status.phase, Some(P::Failed));
    assert_eq!(p.status.registry_status.as_deref(), Some("FAILED_STATUS_DIVERGENCE"));
}

#[test]
fn success_folds_results_and_cost() {
    let e = with(exp(), &run(&exp(), &[], vec![], 0));
    let p = run(&e, &[order("quickstart-a1", 1, ended(OutcomeState::Succeeded, 10, 0.25))], vec![], 11);
    assert_eq!(p.status.phase, Some(P::Succeeded));
    assert_eq!(p.status.registry_status.as_deref(), Some("COMPLETED"));
    assert_eq!(p.status.results.as_ref().unwrap()["f1"], 0.8);
    assert_eq!(p.status.cost_usd, Some(0.25));
    assert!(p.status.current_attempt.is_none());
    let ready = find_condition(&p.status.conditions, CONDITION_READY).unwrap();
    assert_eq!(ready.status, "True");
    // Nothing more happens to a finished experiment.
    let again = run(&with(e, &p), &[order("quickstart-a1", 1, ended(OutcomeState::Succeeded, 10, 0.25))], vec![], 50);
    assert_eq!(created(&again), None);
    assert_eq!(again.status.attempts, 1);
}

#[test]
fn dependencies_and_suspend_hold_the_first_attempt() {
    let mut e = exp();
    e.spec.depends_on = vec!["features".into()];
    let p = run(&e, &[], vec![("features".into(), Some(P::Running))], 0);
    assert_eq!(p.status.phase, Some(P::Waiting));
    assert_eq!(created(&p), None);
    assert_eq!(find_condition(&p.status.conditions, CONDITION_READY).unwrap().reason, "DependencyPending");
    let p = run(&e, &[], vec![("features".into(), None)], 0);
    assert!(find_condition(&p.status.conditions, CONDITION_READY).unwrap().message.contains("features (missing)"));
    let p = run(&e, &[], vec![("features".into(), Some(P::Succeeded))], 0);
    assert!(p.create_order.is_some());
    let mut s = exp();
    s.spec.suspend = true;
    let p = run(&s, &[], vec![], 0);
    assert_eq!((p.status.phase, created(&p)), (Some(P::Waiting), None));
}

#[test]
fn intake_refuses_what_the_schema_cannot_see() {
    let mut e = exp();
    e.spec.order.policy = "nope".into();
    let p = run(&e, &[], vec![], 0);
    assert_eq!(created(&p), None);
    assert_eq!(find_condition(&p.status.conditions, CONDITION_READY).unwrap().reason, "UnknownPolicy");
    let mut w = exp();
    w.spec.worker_affinity =
        Some(ep_api::experiment::WorkerAffinity { workers: vec!["runpod-2".into()], ..Default::default() });
    let p = run(&w, &[], vec![], 0);
    assert_eq!(created(&p), None);
    assert_eq!(find_condition(&p.status.conditions, CONDITION_READY).unwrap().reason, "WorkerMismatch");
}

#[test]
fn a_claimed_attempt_whose_order_is_missing_recreates_the_same_order() {
    let e = with(exp(), &run(&exp(), &[], vec![], 0));
    let run_id = e.status.as_ref().unwrap().current_attempt.as_ref().unwrap().run_id.clone();
    let p = run(&e, &[], vec![], 5);
    assert_eq!(created(&p), Some(("quickstart-a1".to_owned(), 1)));
    assert_eq!(p.status.current_attempt.unwrap().run_id, run_id, "same claim, same run id: the order adopts");
}

#[test]
fn the_registry_lag_shows_as_a_condition() {
    let settings = Settings::embedded_default();
    let e = exp();
    let p = decide(&Observed {
        exp: &e,
        orders: vec![],
        deps: vec![],
        settings: &settings,
        registry: Some(Blocked::new(Reason::RegistryUnavailable, "3 writes wait")),
        busy: BTreeMap::new(),
        now: t(0),
    });
    let c = find_condition(&p.status.conditions, CONDITION_REGISTRY).unwrap();
    assert_eq!((c.status.as_str(), c.reason.as_str()), ("False", "RegistryUnavailable"));
}

/// An order made by hand (no spec.run) for `attempt`, with `st`.
fn by_hand(name: &str, attempt: Option<i32>, st: RunPodOrderStatus) -> RunPodOrder {
    let mut o = order(name, attempt.unwrap_or(1), st);
    o.spec.run = None;
    o.spec.attempt = attempt;
    o
}

#[test]
fn a_stale_binding_is_cleared_and_the_order_re_bound_to_the_attempt_claimed() {
    // Attempt 1 failed in the operator's own order; a person's order still names attempt 1 and
    // holds its old binding, and has claimed nothing.
    let mut e = exp();
    e.spec.retry =
        Some(ep_api::experiment::RetryPolicy { max_attempts: 3, backoff: None, when: vec![RetryCause::Any] });
    let first = run(&e, &[], vec![], 0);
    let e = with(e, &first);
    let own = order("quickstart-a1", 1, ended(OutcomeState::Failed, 10, 0.01));
    let stale_binding = crate::fixtures::quickstart_order("x", 1).spec.run;
    let mut stale = by_hand(
        "by-hand",
        Some(1),
        RunPodOrderStatus { phase: Some(OrderPhase::Synced), binding: stale_binding, ..Default::default() },
    );
    stale.metadata.uid = Some("hand".into());
    let p = run(&e, &[own.clone(), stale.clone()], vec![], 20);
    let cur = p.status.current_attempt.clone().unwrap();
    assert_eq!(cur.attempt, 2);
    assert_eq!(cur.order.as_deref(), Some("by-hand"), "the stale order serves attempt 2: no second order");
    assert!(p.create_order.is_none());
    let (bound, t) = p.bind.clone().unwrap();
    assert_eq!((bound.as_str(), t.attempt, t.fencing_token), ("by-hand", 2, cur.fencing_token));
    let action = t.reconcile_action.clone().unwrap();
    assert!(action.contains("by-hand was bound to attempt 1") && action.contains("attempt 2"), "{action}");
    assert!(p.events.iter().any(|(r, m)| *r == Reason::BindingRepaired && *m == action));
    // An order that already claimed its run keeps its binding; a new order is made instead.
    stale.status.as_mut().unwrap().phase = Some(OrderPhase::RunnerOnline);
    let p = run(&e, &[own, stale], vec![], 20);
    assert!(p.bind.is_none());
    assert_eq!(created(&p), Some(("quickstart-a2".to_owned(), 2)));
}

/// The experiment's registry status while its order says `reason` (Ready = `ready`).
fn registry_while(reason: &str, ready: bool, online: bool) -> String {
    let e = exp();
    let e = with(e.clone(), &run(&e, &[], vec![], 0));
    let mut st = RunPodOrderStatus { phase: Some(OrderPhase::Provisioned), ..Default::default() };
    if online {
        st.phase = Some(OrderPhase::RunnerOnline);
        st.online_at = Some(time::to_k8s(t(5)));
    }
    let status = if ready { "True" } else { "False" };
    set_condition(&mut st.conditions, CONDITION_READY, ready, reason, "why", Some(1), time::to_k8s(t(5)));
    assert_eq!(find_condition(&st.conditions, CONDITION_READY).unwrap().status, status);
    let p = run(&e, &[order("quickstart-a1", 1, st)], vec![], 10);
    p.status.registry_status.unwrap()
}

#[test]
fn the_registry_says_running_only_once_the_runner_is_online_and_needs_rerun_when_a_person_must_fix_it() {
    assert_eq!(registry_while("AwaitingApproval", false, false), "READY");
    assert_eq!(registry_while("NoStock", false, false), "READY");
    assert_eq!(registry_while("NotBound", false, false), "READY");
    for blocked in ["PayloadMissing", "UnknownGpuType", "SecretMissing", "WorkerMismatch", "NothingRunnable"] {
        assert_eq!(registry_while(blocked, false, false), "NEEDS_RERUN", "{blocked}");
    }
    assert_eq!(registry_while("RunnerOnline", true, true), "RUNNING");
    assert_eq!(registry_while("HeartbeatLost", false, true), "RUNNING", "draining: the runner may still write");
}

fn affine(a: ep_api::experiment::WorkerAffinity) -> Experiment {
    let mut e = exp();
    e.spec.worker_affinity = Some(a);
    e
}

#[test]
fn worker_affinity_prefers_a_worker_keeps_exclusive_workers_to_one_run_and_pins_the_node_type() {
    use ep_api::experiment::WorkerAffinity;
    let settings = Settings::embedded_default();
    // Preferred worker: attempts go there, and it must be an allowed one.
    let e = affine(WorkerAffinity { preferred_worker: Some("w2".into()), ..Default::default() });
    assert_eq!(choose_worker(&e, &BTreeMap::new()).unwrap(), "w2");
    let e = affine(WorkerAffinity {
        preferred_worker: Some("w9".into()),
        workers: vec!["w1".into(), "w2".into()],
        ..Default::default()
    });
    let b = intake(&e, &settings).unwrap_err();
    assert!(b.reason == Reason::WorkerMismatch && b.message.contains("preferredWorker w9"), "{}", b.message);
    // Exclusive: a busy preferred worker passes the attempt to the next free one, or it waits.
    let e = affine(WorkerAffinity {
        preferred_worker: Some("w1".into()),
        workers: vec!["w1".into(), "w2".into()],
        exclusive: true,
        ..Default::default()
    });
    let busy = BTreeMap::from([("w1".to_owned(), "other-a1".to_owned())]);
    assert_eq!(choose_worker(&e, &busy).unwrap(), "w2");
    let busy = BTreeMap::from([("w1".to_owned(), "other-a1".to_owned()), ("w2".to_owned(), "x-a3".to_owned())]);
    let b = choose_worker(&e, &busy).unwrap_err();
    assert_eq!(b.reason, Reason::WorkerBusy);
    assert!(b.message.contains("w1 (order other-a1)") && b.message.contains("w2 (order x-a3)"), "{}", b.message);
    let p = decide(&Observed {
        exp: &e,
        orders: vec![],
        deps: vec![],
        settings: &settings,
        registry: None,
        busy,
        now: t(0),
    });
    assert_eq!(p.status.phase, Some(P::Waiting));
    assert!(
        p.create_order.is_none() && p.status.current_attempt.is_none(),
        "nothing claimed while every worker is busy"
    );
    // Not exclusive: the preferred worker, busy or not.
    let e = affine(WorkerAffinity { preferred_worker: Some("w1".into()), ..Default::default() });
    assert_eq!(choose_worker(&e, &BTreeMap::from([("w1".to_owned(), "o".to_owned())])).unwrap(), "w1");
    // Node type: one of the GPU choices, and the order asks for it alone.
    let e = affine(WorkerAffinity { node_type: Some("h100".into()), ..Default::default() });
    let b = intake(&e, &settings).unwrap_err();
    assert!(b.reason == Reason::WorkerMismatch && b.message.contains("nodeType h100"), "{}", b.message);
    let e = affine(WorkerAffinity { node_type: Some("l4".into()), ..Default::default() });
    assert!(intake(&e, &settings).is_ok());
    let p = run(&e, &[], vec![], 0);
    let (name, t) = p.create_order.clone().unwrap();
    let order = crate::experiment::order_for(&e, &name, t, Some("w7"));
    assert_eq!(order.spec.gpu.types, ["l4"]);
    assert_eq!(order.spec.worker_id, "w7");
}

#[test]
fn by_default_a_lost_pod_is_retried_and_a_script_error_is_not() {
    let mut e = exp();
    e.spec.retry =
        Some(ep_api::experiment::RetryPolicy { max_attempts: 3, backoff: None, when: vec![RetryCause::PodLost] });
    let e = with(e.clone(), &run(&e, &[], vec![], 0));
    let lost = order("quickstart-a1", 1, ended(OutcomeState::Failed, 10, 0.01));
    let p = run(&e, &[lost], vec![], 20);
    assert_eq!(created(&p), Some(("quickstart-a2".to_owned(), 2)), "HeartbeatLost is a lost pod: retried");
    let mut crashed = ended(OutcomeState::Failed, 10, 0.01);
    crashed.outcome.as_mut().unwrap().reason = "NonZeroExit".into();
    let p = run(&e, &[order("quickstart-a1", 1, crashed)], vec![], 20);
    assert_eq!(p.status.phase, Some(P::Failed));
    assert_eq!(p.status.reason.as_deref(), Some("NotRetried"));
    let msg = p.status.message.unwrap_or_default();
    assert!(msg.contains("retry.when does not name NonZeroExit"), "{msg}");
}

#[test]
fn under_restart_an_edit_stops_the_attempt_and_the_next_one_runs_it_without_spending_a_retry() {
    let mut e = exp();
    e.spec.retry = None; // one attempt: a restart must not spend it
    e.spec.on_spec_change = ep_api::experiment::OnSpecChange::Restart;
    let e = with(e.clone(), &run(&e, &[], vec![], 0));
    let live = RunPodOrderStatus { phase: Some(OrderPhase::RunnerOnline), ..RunPodOrderStatus::default() };
    let p = run(&e, &[order("quickstart-a1", 1, live.clone())], vec![], 10);
    assert_eq!(p.stop, None, "nothing changed: nothing stops");
    let mut edited = e.clone();
    edited.spec.env.push(ep_api::experiment::EnvVar {
        name: "LR".into(),
        value: Some("0.1".into()),
        secret_key_ref: None,
    });
    let p = run(&edited, &[order("quickstart-a1", 1, live)], vec![], 20);
    let (name, why) = p.stop.clone().expect("the live attempt is asked to stop");
    assert_eq!(name, "quickstart-a1");
    assert!(why.contains("spec.env"), "{why}");
    assert_eq!(p.status.restarting, Some(1));
    let edited = with(edited, &p);
    let mut stopped = ended(OutcomeState::Stopped, 30, 0.02);
    stopped.outcome.as_mut().unwrap().reason = "StopRequested".into();
    let p = run(&edited, &[order("quickstart-a1", 1, stopped.clone())], vec![], 31);
    assert_eq!(created(&p), Some(("quickstart-a2".to_owned(), 2)), "the next attempt starts at once");
    assert_eq!(p.status.restarting, None);
    assert_eq!(p.status.rerun_from, 1, "the restarted attempt is not counted");
    assert!(p.events.iter().any(|(r, _)| *r == Reason::Restarted));
    // The same stop under NextAttempt (a person's `kubectl ep stop`) ends the experiment.
    let mut asked = edited.clone();
    asked.status.as_mut().unwrap().restarting = None;
    let p = run(&asked, &[order("quickstart-a1", 1, stopped)], vec![], 31);
    assert_eq!(p.status.phase, Some(P::Failed));
    assert_eq!(created(&p), None);
}
