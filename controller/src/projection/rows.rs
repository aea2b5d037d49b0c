//! The registry rows of one object, derived from what the cluster holds (spec and status) and
//! nothing else: re-deriving them after a crash, or into an empty database, gives the rows of an
//! uninterrupted run.

use chrono::{DateTime, Utc};
use ep_api::experiment::ExperimentPhase;
use ep_api::order::{OrderPhase, OutcomeState};
use ep_api::{Experiment, RunPodOrder, RunPodOrderStatus};
use kube::ResourceExt;
use serde_json::{Value, json};

use crate::reason::Reason;
use crate::registry::{
    AttemptRow, AttemptState, ExperimentRow, OrderRow, PhaseChange, ProgressRow, RegistryStatus, Row, SessionRow,
    status,
};
use crate::time;

/// What one order says about its worker, for the worker's heartbeat row.
#[derive(Clone, Debug, PartialEq)]
pub struct WorkerBeat {
    pub worker_id: String,
    pub run_id: Option<String>,
    pub pod_id: Option<String>,
    pub last_seen: DateTime<Utc>,
    pub seq: Option<i64>,
    pub pid: Option<i32>,
    pub gpu_ids: Option<String>,
    pub fencing_token: Option<i64>,
    /// The run is live on the worker (its runner online and not ended).
    pub running: bool,
}

/// PostgreSQL cannot store U+0000 in text or jsonb: it becomes U+FFFD.
pub fn clean(s: &str) -> String {
    if s.contains('\0') { s.replace('\0', "\u{FFFD}") } else { s.to_owned() }
}

/// [`clean`] on every string and key of a JSON value.
pub fn clean_json(v: Value) -> Value {
    match v {
        Value::String(s) if s.contains('\0') => Value::String(clean(&s)),
        Value::Array(a) => Value::Array(a.into_iter().map(clean_json).collect()),
        Value::Object(m) => Value::Object(m.into_iter().map(|(k, v)| (clean(&k), clean_json(v))).collect()),
        v => v,
    }
}

fn phase_word(p: ExperimentPhase) -> String {
    format!("{p:?}")
}

/// The experiment's row and its phase log. `deleted_at`: the experiment is being deleted (it is
/// recorded as ended, never left RUNNING).
pub fn experiment(exp: &Experiment, deleted_at: Option<DateTime<Utc>>) -> Vec<Row> {
    let st = exp.status.clone().unwrap_or_default();
    let last = st.current_attempt.as_ref().or(st.history.last());
    let results = st.results.as_ref();
    let done = matches!(st.phase, Some(ExperimentPhase::Succeeded | ExperimentPhase::Failed));
    let not_ready = ep_api::find_condition(&st.conditions, ep_api::CONDITION_READY).filter(|c| c.status != "True");
    let mut row = ExperimentRow {
        namespace: exp.namespace().unwrap_or_default(),
        name: exp.name_any(),
        uid: exp.uid().unwrap_or_default(),
        status: st.registry_status.clone().unwrap_or_else(|| status::READY.to_owned()),
        phase: st.phase.map(phase_word),
        worker_id: last.and_then(|a| a.worker_id.clone()).or_else(|| Some(exp.spec.order.worker_id.clone())),
        current_run_id: last.map(|a| a.run_id.clone()),
        attempts: st.attempts,
        gpu: st.gpu.clone(),
        result_f1: results.and_then(|r| r.get("f1").copied()),
        result_auc: results.and_then(|r| r.get("auc").copied()),
        cost_usd: st.cost_usd,
        started_at: last.and_then(|a| a.started_at.as_ref()).map(time::from_k8s),
        finished_at: if done {
            st.history.last().and_then(|a| a.finished_at.as_ref()).map(time::from_k8s)
        } else {
            None
        },
        created_at: exp.metadata.creation_timestamp.as_ref().map(time::from_k8s),
        approved_by: st.approval.as_ref().map(|a| a.approved_by.clone()),
        approved_at: st.approval.as_ref().map(|a| time::from_k8s(&a.approved_at)),
        approval_envelope: st.approval.as_ref().and_then(|a| serde_json::to_value(&a.envelope).ok()),
        extra: clean_json(json!({
            "results": results,
            "receipt": st.artifacts.as_ref().map(|a| a.receipt.clone()),
            // Why it is not ready (a NEEDS_RERUN says what to fix), as the Ready condition says.
            "reason": not_ready.map(|c| c.reason.clone()),
            "message": not_ready.map(|c| c.message.clone()),
        })),
    };
    let mut rows = Vec::new();
    let mut from = None;
    for t in &st.transitions {
        rows.push(Row::Phase(PhaseChange {
            kind: "Experiment".into(),
            namespace: row.namespace.clone(),
            name: row.name.clone(),
            uid: row.uid.clone(),
            from_phase: from.map(phase_word),
            to_phase: phase_word(t.phase),
            reason: t.reason.clone(),
            message: None,
            at: time::from_micro(&t.at),
        }));
        from = Some(t.phase);
    }
    if let Some(at) = deleted_at {
        let final_status = [RegistryStatus::Completed, RegistryStatus::Failed, RegistryStatus::FailedStatusDivergence]
            .iter()
            .any(|s| s.as_str() == row.status);
        if !final_status {
            status::FAILED.clone_into(&mut row.status);
            row.finished_at = Some(at);
        }
        row.extra["deleted"] = json!(true);
        rows.push(Row::Phase(PhaseChange {
            kind: "Experiment".into(),
            namespace: row.namespace.clone(),
            name: row.name.clone(),
            uid: row.uid.clone(),
            from_phase: from.map(phase_word),
            to_phase: "Deleted".into(),
            reason: Some(Reason::ExperimentDeleted.as_str().into()),
            message: None,
            at,
        }));
    }
    rows.insert(0, Row::Experiment(row));
    rows
}

fn attempt_state(phase: Option<OrderPhase>, outcome: Option<OutcomeState>) -> Option<AttemptState> {
    Some(match (phase, outcome) {
        (_, Some(OutcomeState::Succeeded)) => AttemptState::Succeeded,
        (_, Some(OutcomeState::Stopped)) => AttemptState::Stopped,
        (_, Some(OutcomeState::Failed | OutcomeState::FailedStatusDivergence)) => AttemptState::Failed,
        (Some(OrderPhase::Verified), None) => AttemptState::Claimed,
        (Some(OrderPhase::RunnerOnline), None) => AttemptState::Running,
        (Some(OrderPhase::Draining), None) => AttemptState::Draining,
        (Some(OrderPhase::Deleted), None) => AttemptState::Stopped,
        (Some(OrderPhase::Failed), None) => AttemptState::Failed,
        _ => return None,
    })
}

/// When the order's pod was confirmed gone (or the order was deleted).
fn order_deleted_at(o: &RunPodOrder, st: &RunPodOrderStatus) -> Option<DateTime<Utc>> {
    o.metadata.deletion_timestamp.as_ref().map(time::from_k8s).or_else(|| {
        st.transitions.iter().rev().find(|t| t.phase == OrderPhase::Deleted).map(|t| time::from_micro(&t.at))
    })
}

fn order_row(o: &RunPodOrder, st: &RunPodOrderStatus) -> OrderRow {
    let spec = &o.spec;
    let gpu = st.gpu.as_ref();
    OrderRow {
        namespace: o.namespace().unwrap_or_default(),
        name: o.name_any(),
        uid: o.uid().unwrap_or_default(),
        experiment: spec.experiment_ref.as_ref().map(|e| e.name.clone()),
        run_id: st.run_id.clone(),
        attempt: spec.attempt,
        policy: spec.policy.clone(),
        worker_id: spec.worker_id.clone(),
        provider: spec.provider_ref.clone(),
        phase: st.phase.map(OrderPhase::as_str).unwrap_or_default().to_owned(),
        reason: st.reason.clone().or_else(|| st.drain_reason.clone()),
        approved: spec.approved == Some(true) || st.approved_by.is_some(),
        approved_by: st.approved_by.clone(),
        reserved_usd: st.reserved_usd,
        pod_id: st.pod_id.clone(),
        gpu_type_id: gpu.map(|g| g.type_id.clone()),
        gpu_display_name: gpu.map(|g| g.display_name.clone()),
        data_center: st.data_center.clone(),
        cost_per_hr: st.cost_per_hour,
        accrued_usd: st.accrued_cost_usd,
        deleted_at: order_deleted_at(o, st),
        created_at: o.metadata.creation_timestamp.as_ref().map(time::from_k8s),
        extra: json!({}),
    }
}

/// The attempt an order ran, once it was claimed (VERIFIED).
fn attempt_row(o: &RunPodOrder, st: &RunPodOrderStatus) -> Option<AttemptRow> {
    let spec = &o.spec;
    let outcome = st.outcome.as_ref();
    let claimed = st.transitions.iter().find(|t| t.phase == OrderPhase::Verified).map(|t| time::from_micro(&t.at))?;
    let state = attempt_state(st.phase, outcome.map(|x| x.state))?;
    Some(AttemptRow {
        namespace: o.namespace().unwrap_or_default(),
        experiment: spec.experiment_ref.as_ref()?.name.clone(),
        run_id: st.run_id.clone()?,
        attempt: spec.template(o.status.as_ref()).map_or(spec.attempt.unwrap_or(1), |t| t.attempt),
        fencing_token: st.fencing_token.unwrap_or(0),
        status: state.as_str().to_owned(),
        order_name: Some(o.name_any()),
        worker_id: Some(spec.worker_id.clone()),
        pod_id: st.pod_id.clone(),
        pid: st.heartbeat.as_ref().and_then(|h| h.pid).and_then(|p| i32::try_from(p).ok()),
        gpu_id: st.heartbeat.as_ref().and_then(|h| h.gpu_ids.clone()),
        lease_expires_at: st.heartbeat.as_ref().and_then(|h| h.lease_expires_at.as_ref()).map(time::from_k8s),
        exit_code: outcome.and_then(|x| x.exit_code),
        reason: outcome.map(|x| x.reason.clone()).or_else(|| st.drain_reason.clone()),
        result_f1: outcome.and_then(|x| x.metrics.get("f1").copied()),
        result_auc: outcome.and_then(|x| x.metrics.get("auc").copied()),
        receipt: outcome.and_then(|x| x.artifacts.as_ref().map(|a| a.receipt.clone())),
        cost_usd: st.accrued_cost_usd,
        started_at: claimed,
        finished_at: outcome.map(|x| time::from_k8s(&x.finished_at)),
        extra: json!({}),
        reconcile_action: spec.template(o.status.as_ref()).and_then(|t| t.reconcile_action.clone()),
        heartbeat_at: st.heartbeat.as_ref().map(|h| time::from_k8s(&h.time)),
        heartbeat_seq: st.heartbeat.as_ref().map(|h| h.seq),
    })
}

/// The worker's session (once the runner came online) and the latest progress of the run.
fn run_rows(o: &RunPodOrder, st: &RunPodOrderStatus) -> Vec<Row> {
    let mut rows = Vec::new();
    let Some(run_id) = &st.run_id else { return rows };
    let outcome = st.outcome.as_ref();
    if let Some(online) = &st.online_at {
        rows.push(Row::Session(SessionRow {
            worker_id: o.spec.worker_id.clone(),
            run_id: run_id.clone(),
            pod_id: st.pod_id.clone(),
            started_at: time::from_k8s(online),
            ended_at: outcome.map(|x| time::from_k8s(&x.finished_at)),
            end_reason: outcome.map(|x| x.reason.clone()),
        }));
    }
    if let Some(p) = &st.progress {
        rows.push(Row::Progress(ProgressRow {
            run_id: run_id.clone(),
            step: p.step,
            total: p.total,
            metrics: clean_json(serde_json::to_value(&p.metrics).unwrap_or_default()),
            reported_at: time::from_k8s(&p.reported_at),
        }));
    }
    rows
}

/// The order's phase log, from the transitions status keeps.
fn order_phases(o: &RunPodOrder, st: &RunPodOrderStatus) -> Vec<Row> {
    let mut from = None;
    st.transitions
        .iter()
        .map(|t| {
            let row = Row::Phase(PhaseChange {
                kind: "RunPodOrder".into(),
                namespace: o.namespace().unwrap_or_default(),
                name: o.name_any(),
                uid: o.uid().unwrap_or_default(),
                from_phase: from.map(|p: OrderPhase| p.as_str().to_owned()),
                to_phase: t.phase.as_str().to_owned(),
                reason: t.reason.clone(),
                message: None,
                at: time::from_micro(&t.at),
            });
            from = Some(t.phase);
            row
        })
        .collect()
}

/// The order's rows: the order, its attempt (once claimed), the worker's session, the latest
/// progress and the phase log; plus what it says about its worker's heartbeat.
pub fn order(o: &RunPodOrder) -> (Vec<Row>, Option<WorkerBeat>) {
    let st = o.status.clone().unwrap_or_default();
    let mut rows = vec![Row::Order(order_row(o, &st))];
    if let Some(a) = attempt_row(o, &st) {
        rows.push(Row::Attempt(a));
        rows.extend(run_rows(o, &st));
    }
    rows.extend(order_phases(o, &st));
    let beat = st.heartbeat.as_ref().map(|h| WorkerBeat {
        worker_id: o.spec.worker_id.clone(),
        run_id: st.run_id.clone(),
        pod_id: st.pod_id.clone(),
        last_seen: time::from_k8s(&h.time),
        seq: Some(h.seq),
        pid: h.pid.and_then(|p| i32::try_from(p).ok()),
        gpu_ids: h.gpu_ids.clone(),
        fencing_token: st.fencing_token,
        running: st.phase == Some(OrderPhase::RunnerOnline) && order_deleted_at(o, &st).is_none(),
    });
    (rows.into_iter().map(clean_row).collect(), beat)
}

/// [`clean`] on the free text of a row.
fn clean_row(row: Row) -> Row {
    match row {
        Row::Order(mut r) => {
            r.reason = r.reason.as_deref().map(clean);
            Row::Order(r)
        }
        Row::Attempt(mut r) => {
            r.reason = r.reason.as_deref().map(clean);
            Row::Attempt(r)
        }
        r => r,
    }
}
