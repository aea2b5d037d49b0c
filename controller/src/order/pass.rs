//! One reconcile pass over one order: the status being built, the phase changes it records and
//! the Events it will publish.

use std::time::Duration;

use chrono::{DateTime, Utc};
use ep_api::order::{OrderPhase, PhaseTransition, RunTemplate};
use ep_api::{CONDITION_READY, Progress, RunPodOrder, RunPodOrderStatus, find_condition, set_condition, set_progress};
use kube::{Resource, ResourceExt};

use super::world::World;
use crate::error::Error;
use crate::reason::{Blocked, Reason};
use crate::time;

const MAX_TRANSITIONS: usize = 32;

/// Whether the order is over (nothing more will happen to it).
pub fn is_terminal(p: Option<OrderPhase>) -> bool {
    matches!(p, Some(OrderPhase::Deleted | OrderPhase::Failed))
}

/// Whether a pod could exist for this order (a create was asked for and no drain confirmed it gone).
pub fn pod_may_exist(st: &RunPodOrderStatus) -> bool {
    st.pod_requested_at.is_some() && !is_terminal(st.phase)
}

/// The status being built in one pass.
pub struct Pass<'a> {
    pub order: &'a RunPodOrder,
    pub ns: String,
    pub name: String,
    pub uid: String,
    pub st: RunPodOrderStatus,
    pub now: DateTime<Utc>,
    pub poll: Duration,
    /// Events to publish once the pass is over: (reason, note).
    pub events: Vec<(Reason, String)>,
    /// The status as last written (what the API server holds).
    saved: Option<RunPodOrderStatus>,
    /// The order's resourceVersion this pass decides on: a write on a changed order fails.
    resource_version: Option<String>,
}

impl<'a> Pass<'a> {
    pub fn new(order: &'a RunPodOrder, now: DateTime<Utc>, poll: Duration) -> Self {
        let mut st = order.status.clone().unwrap_or_default();
        // Why a live order waits is decided again every pass: a gate that still blocks says so again.
        if !is_terminal(st.phase) {
            st.reason = None;
            st.message = None;
            st.domain = None;
        }
        Self {
            order,
            ns: order.namespace().unwrap_or_default(),
            name: order.name_any(),
            uid: order.uid().unwrap_or_default(),
            st,
            now,
            poll,
            events: Vec::new(),
            saved: order.status.clone(),
            resource_version: order.resource_version(),
        }
    }

    pub fn phase(&self) -> Option<OrderPhase> {
        self.st.phase
    }

    /// The attempt this order runs, if it is bound to one.
    pub fn template(&self) -> Option<&'a RunTemplate> {
        self.order.spec.template(self.order.status.as_ref())
    }

    /// Enters `phase`, recording the transition and an Event.
    pub fn enter(&mut self, phase: OrderPhase, reason: Reason, message: &str) {
        if self.st.phase == Some(phase) {
            return;
        }
        self.st.phase = Some(phase);
        self.st.transitions.push(PhaseTransition {
            phase,
            at: time::to_micro(self.now),
            reason: Some(reason.as_str().to_owned()),
        });
        if self.st.transitions.len() > MAX_TRANSITIONS {
            let extra = self.st.transitions.len() - MAX_TRANSITIONS;
            self.st.transitions.drain(..extra);
        }
        let to = phase.as_str();
        let note = if message.is_empty() { format!("entered {to}") } else { format!("entered {to}: {message}") };
        self.events.push((reason, note));
        if phase == OrderPhase::Failed {
            self.set_reason(reason, message.to_owned());
            self.ready(false, reason, message);
        }
    }

    /// Sets the Ready condition; a new wait reason on a not-ready order is also an Event.
    pub fn ready(&mut self, ready: bool, reason: Reason, message: &str) {
        let prev = find_condition(&self.st.conditions, CONDITION_READY).map(|c| c.reason.clone());
        let generation = self.order.meta().generation;
        let now = time::to_k8s(self.now);
        set_condition(&mut self.st.conditions, CONDITION_READY, ready, reason.as_str(), message, generation, now);
        let new_wait = prev.as_deref() != Some(reason.as_str()) && reason.is_warning();
        if !ready && new_wait && self.st.phase != Some(OrderPhase::Failed) {
            self.events.push((reason, format!("{message} (failure domain: {})", reason.domain().as_str())));
        }
    }

    /// Why the order waits or failed, with the failure domain that says who acts on it.
    fn set_reason(&mut self, reason: Reason, message: String) {
        self.st.reason = Some(reason.as_str().to_owned());
        self.st.message = Some(message);
        self.st.domain = Some(reason.domain().as_str().to_owned());
    }

    /// Records a gate that blocks: waits (Ready False with the reason) or, when fatal, fails.
    /// Returns when to look again.
    pub fn block(&mut self, b: Blocked) -> Option<Duration> {
        tracing::info!(order = %self.name, reason = %b.reason, message = %b.message, "order blocked");
        if b.reason.is_fatal() {
            self.enter(OrderPhase::Failed, b.reason, &b.message);
            return None;
        }
        self.ready(false, b.reason, &b.message);
        self.set_reason(b.reason, b.message);
        b.reason.requeue().after(self.poll)
    }

    /// An Event to publish.
    pub fn notice(&mut self, reason: Reason, note: String) {
        self.events.push((reason, note));
    }

    /// Writes status now (a durable step: before a paid call or an irreversible one).
    pub async fn save<W: World>(&mut self, w: &W) -> Result<(), Error> {
        self.st.observed_generation = self.order.meta().generation;
        self.progress();
        self.resource_version = w.save_status(self.order, self.resource_version.as_deref(), &self.st).await?;
        self.saved = Some(self.st.clone());
        Ok(())
    }

    /// Reconciling and Stalled from the phase and Ready: an ended order is settled (stalled when it
    /// ended without a result), a ready one is settled, anything else is still being worked on.
    fn progress(&mut self) {
        let ready = find_condition(&self.st.conditions, CONDITION_READY)
            .map(|c| (c.status == "True", c.reason.clone(), c.message.clone()));
        let (ok, reason, message) = ready.unwrap_or_default();
        let progress = match self.st.phase {
            Some(OrderPhase::Failed) => Progress::Stalled(&reason, &message),
            Some(OrderPhase::Deleted) if !ok => Progress::Stalled(&reason, &message),
            _ if ok => Progress::Settled,
            Some(OrderPhase::Deleted) => Progress::Settled,
            _ => Progress::Working,
        };
        let generation = self.order.meta().generation;
        set_progress(&mut self.st.conditions, progress, generation, time::to_k8s(self.now));
    }

    /// Saves status if it changed.
    pub async fn finish<W: World>(&mut self, w: &W) -> Result<(), Error> {
        self.st.observed_generation = self.order.meta().generation;
        self.progress();
        if Some(&self.st) != self.saved.as_ref() {
            self.save(w).await?;
        }
        Ok(())
    }
}
