//! Reconciles `RunPodOrder` through the lifecycle of DESIGN section 4:
//! REQUESTED -> PROVISIONED -> SYNCED -> VERIFIED -> RUNNER_ONLINE -> DRAINING -> DELETED (or FAILED).
//!
//! Each pass observes (Kubernetes, the shared pod list, known keys on the volume), decides with the
//! pure functions of [`decide`], acts, and writes status with server-side apply. Anything that could
//! open a paid pod is preceded by a durable status write, so a crash at any line is followed by
//! adoption, never by a second pod.

mod decide;
mod launch;
mod sync;

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use ep_api::order::{OrderPhase, PhaseTransition};
use ep_api::{CONDITION_READY, Experiment, RunPodOrder, RunPodOrderStatus, find_condition, set_condition};
use kube::api::{Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::{Api, Resource, ResourceExt};
use serde_json::json;

pub use decide::{Admitted, Block, BudgetUsage, Evidence, RunView, Verdict, admit, choose_gpus, outcome, watch};

use crate::context::{Context, Error, has_finalizer, set_finalizer};
use crate::mirror::Write;
use crate::names::{FINALIZER, MANAGER};
use crate::registry::{OrderRow, PhaseChange};
use crate::time;

pub const KIND: &str = "RunPodOrder";
const MAX_TRANSITIONS: usize = 32;

/// The wire name of a phase (`RUNNER_ONLINE`).
pub fn phase_name(p: OrderPhase) -> String {
    serde_json::to_value(p).ok().and_then(|v| v.as_str().map(str::to_owned)).unwrap_or_default()
}

/// Whether the order is over (nothing more will happen to it).
pub fn is_terminal(p: Option<OrderPhase>) -> bool {
    matches!(p, Some(OrderPhase::Deleted | OrderPhase::Failed))
}

/// One reconcile pass over one order.
pub(crate) struct Pass<'a> {
    pub ctx: &'a Context,
    pub order: &'a RunPodOrder,
    pub ns: String,
    pub name: String,
    pub st: RunPodOrderStatus,
    pub now: DateTime<Utc>,
    events: Vec<(bool, String, String)>,
    phases: Vec<PhaseChange>,
}

impl<'a> Pass<'a> {
    fn new(ctx: &'a Context, order: &'a RunPodOrder) -> Self {
        Self {
            ctx,
            order,
            ns: order.namespace().unwrap_or_default(),
            name: order.name_any(),
            st: order.status.clone().unwrap_or_default(),
            now: time::now(),
            events: Vec::new(),
            phases: Vec::new(),
        }
    }

    pub fn phase(&self) -> Option<OrderPhase> {
        self.st.phase
    }

    /// Enters `phase`, recording the transition (status, registry, event, metric).
    pub fn enter(&mut self, phase: OrderPhase, reason: &str, message: &str) {
        let from = self.st.phase;
        if from == Some(phase) {
            return;
        }
        self.st.phase = Some(phase);
        self.st.transitions.push(PhaseTransition {
            phase,
            at: time::to_k8s(self.now),
            reason: Some(reason.to_owned()),
        });
        if self.st.transitions.len() > MAX_TRANSITIONS {
            let extra = self.st.transitions.len() - MAX_TRANSITIONS;
            self.st.transitions.drain(..extra);
        }
        let to = phase_name(phase);
        self.ctx.metrics.transition(KIND, &to);
        self.phases.push(PhaseChange {
            kind: KIND.into(),
            namespace: self.ns.clone(),
            name: self.name.clone(),
            uid: self.order.uid().unwrap_or_default(),
            from_phase: from.map(phase_name),
            to_phase: to.clone(),
            reason: Some(reason.to_owned()),
            message: (!message.is_empty()).then(|| message.to_owned()),
            at: self.now,
        });
        let warning = phase == OrderPhase::Failed;
        let note = if message.is_empty() { format!("entered {to}") } else { format!("entered {to}: {message}") };
        self.events.push((warning, reason.to_owned(), note));
        if phase == OrderPhase::Failed {
            self.st.reason = Some(reason.to_owned());
            self.st.message = Some(message.to_owned());
            self.ready(false, reason, message);
        }
    }

    /// Sets the Ready condition; a new reason on a not-ready order is also an event.
    pub fn ready(&mut self, ready: bool, reason: &str, message: &str) {
        let prev = find_condition(&self.st.conditions, CONDITION_READY).map(|c| c.reason.clone());
        let generation = self.order.meta().generation;
        set_condition(
            &mut self.st.conditions,
            CONDITION_READY,
            ready,
            reason,
            message,
            generation,
            time::to_k8s(self.now),
        );
        if !ready && prev.as_deref() != Some(reason) && self.st.phase != Some(OrderPhase::Failed) {
            self.events.push((true, reason.to_owned(), message.to_owned()));
        }
    }

    /// Records a gate that blocks: waits (Ready False with the reason) or, when fatal, fails.
    pub fn block(&mut self, b: &Block) -> Option<Duration> {
        tracing::info!(order = %self.name, reason = b.reason, message = %b.message, "order blocked");
        if b.fatal {
            self.enter(OrderPhase::Failed, b.reason, &b.message);
            return None;
        }
        self.st.reason = Some(b.reason.to_owned());
        self.st.message = Some(b.message.clone());
        self.ready(false, b.reason, &b.message);
        Some(match b.reason {
            // Waits on a person (spec, approval, settings): the watch wakes us; poll slowly meanwhile.
            "UnknownPolicy" | "AwaitingApproval" | "PolicyViolation" | "UnknownGpuType" | "DataCenterMismatch"
            | "NotBound" | "NothingRunnable" | "WorkerMismatch" | "PayloadMissing" => Duration::from_secs(60),
            "InsufficientBalance" => Duration::from_secs(120),
            _ => self.ctx.poll(),
        })
    }

    /// Clears a wait reason once the gate passes.
    pub fn unblock(&mut self) {
        self.st.reason = None;
        self.st.message = None;
    }

    pub fn event(&mut self, warning: bool, reason: &str, note: String) {
        self.events.push((warning, reason.to_owned(), note));
    }

    /// Writes status now (a durable step: before a paid call).
    pub async fn save(&mut self) -> Result<(), Error> {
        self.st.observed_generation = self.order.meta().generation;
        let body = json!({"apiVersion": "ep.dev/v1alpha1", "kind": KIND, "status": self.st});
        Api::<RunPodOrder>::namespaced(self.ctx.client.clone(), &self.ns)
            .patch_status(&self.name, &PatchParams::apply(MANAGER).force(), &Patch::Apply(&body))
            .await?;
        Ok(())
    }

    /// Saves status if it changed, then publishes events and registry rows.
    async fn finish(mut self) -> Result<(), Error> {
        if Some(&self.st) != self.order.status.as_ref() {
            self.save().await?;
        }
        let reference = self.order.object_ref(&());
        for (warning, reason, note) in std::mem::take(&mut self.events) {
            self.ctx.event(&reference, warning, &reason, "Reconcile", note).await;
        }
        for p in std::mem::take(&mut self.phases) {
            self.ctx.mirror.send(Write::Phase(p));
        }
        self.ctx.mirror.send(Write::Order(self.row()));
        Ok(())
    }

    fn row(&self) -> OrderRow {
        let spec = &self.order.spec;
        let gpu = self.st.gpu.as_ref();
        OrderRow {
            namespace: self.ns.clone(),
            name: self.name.clone(),
            uid: self.order.uid().unwrap_or_default(),
            experiment: spec.experiment_ref.as_ref().map(|e| e.name.clone()),
            run_id: self.st.run_id.clone(),
            attempt: spec.attempt,
            policy: spec.policy.clone(),
            worker_id: spec.worker_id.clone(),
            provider: spec.provider_ref.clone(),
            phase: self.st.phase.map(phase_name).unwrap_or_default(),
            reason: self.st.reason.clone().or_else(|| self.st.drain_reason.clone()),
            approved: spec.approved == Some(true),
            pod_id: self.st.pod_id.clone(),
            gpu_type_id: gpu.map(|g| g.type_id.clone()),
            gpu_display_name: gpu.map(|g| g.display_name.clone()),
            data_center: self.st.data_center.clone(),
            cost_per_hr: self.st.cost_per_hour,
            accrued_usd: self.st.accrued_cost_usd,
            deleted_at: self.order.meta().deletion_timestamp.as_ref().map(time::from_k8s).or_else(|| {
                // The DELETED transition's time: stable across passes, so the row is written once.
                self.st.transitions.iter().rev().find(|t| t.phase == OrderPhase::Deleted).map(|t| time::from_k8s(&t.at))
            }),
            extra: json!({}),
        }
    }

    /// The experiment this order serves, if it still exists.
    pub async fn experiment(&self) -> Result<Option<Experiment>, Error> {
        let Some(r) = &self.order.spec.experiment_ref else { return Ok(None) };
        Ok(Api::<Experiment>::namespaced(self.ctx.client.clone(), &self.ns).get_opt(&r.name).await?)
    }
}

fn orders_api(ctx: &Context, o: &RunPodOrder) -> Api<RunPodOrder> {
    Api::namespaced(ctx.client.clone(), &o.namespace().unwrap_or_default())
}

/// Whether a pod could exist for this order (a create was asked for and no drain confirmed it gone).
fn pod_may_exist(st: &RunPodOrderStatus) -> bool {
    st.pod_requested_at.is_some() && !is_terminal(st.phase)
}

/// One pass of the order reconciler.
pub async fn reconcile(order: Arc<RunPodOrder>, ctx: Arc<Context>) -> Result<Action, Error> {
    ctx.metrics.reconciled(KIND);
    let deleting = order.meta().deletion_timestamp.is_some();
    if deleting {
        let st = order.status.clone().unwrap_or_default();
        let orphan = order.spec.deletion_policy == ep_api::order::DeletionPolicy::Orphan;
        if !pod_may_exist(&st) || orphan {
            if has_finalizer(order.as_ref(), FINALIZER) {
                if orphan && pod_may_exist(&st) {
                    tracing::warn!(order = %order.name_any(), pod = ?st.pod_id, "order deleted with deletionPolicy Orphan: the pod is left to terminateAfter");
                }
                set_finalizer(&orders_api(&ctx, &order), order.as_ref(), FINALIZER, false).await?;
            }
            let pass = Pass::new(&ctx, &order);
            ctx.mirror.send(Write::Order(pass.row()));
            return Ok(Action::await_change());
        }
    } else if !has_finalizer(order.as_ref(), FINALIZER) && !is_terminal(order.status.as_ref().and_then(|s| s.phase)) {
        // The finalizer lands before anything is paid for: deletion must pass through DRAINING.
        set_finalizer(&orders_api(&ctx, &order), order.as_ref(), FINALIZER, true).await?;
        return Ok(Action::await_change());
    }
    let mut pass = Pass::new(&ctx, &order);
    let next = match pass.phase() {
        None => {
            pass.enter(OrderPhase::Requested, "Accepted", "the order is durable; nothing is paid for yet");
            pass.ready(false, "Requested", "checking the order against live RunPod state");
            Some(Duration::ZERO)
        }
        Some(OrderPhase::Requested) => sync::provision(&mut pass, deleting).await?,
        Some(OrderPhase::Provisioned) => sync::sync(&mut pass).await?,
        Some(OrderPhase::Synced) => sync::claim(&mut pass).await?,
        Some(OrderPhase::Verified | OrderPhase::RunnerOnline) => launch::run(&mut pass, deleting).await?,
        Some(OrderPhase::Draining) => launch::drain(&mut pass).await?,
        Some(OrderPhase::Deleted | OrderPhase::Failed) => None,
    };
    pass.finish().await?;
    Ok(match next {
        Some(d) if d.is_zero() => Action::requeue(Duration::from_millis(50)),
        Some(d) => Action::requeue(d),
        None => Action::await_change(),
    })
}
