//! Reconciles `RunPodOrder` through the lifecycle of DESIGN section 4:
//! REQUESTED -> PROVISIONED -> SYNCED -> VERIFIED -> RUNNER_ONLINE -> DRAINING -> DELETED (or FAILED).
//!
//! Each transition lives in its own file (provision, payload, claim, launch, drain): observe,
//! decide with pure functions, act, and record status. The order carries everything its attempt
//! needs (`spec.run`, or `status.binding` for an order made by hand) and never reads its
//! experiment. Anything that could open a paid pod is preceded by a durable status write, so a
//! crash at any line is followed by adoption, never by a second pod.

pub mod claim;
pub mod drain;
pub mod entry;
pub mod launch;
pub mod ledger;
pub mod owner;
pub mod pass;
pub mod payload;
pub mod pod;
pub mod provision;
pub mod supervise;
pub mod world;

#[cfg(test)]
mod tests;

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use ep_api::RunPodOrder;
use ep_api::order::{DeletionPolicy, OrderPhase};
use kube::runtime::controller::Action;
use kube::runtime::finalizer::{Event as Finalizer, finalizer};
use kube::{Api, Resource, ResourceExt};

use self::pass::{Pass, pod_may_exist};
use self::world::{KubeWorld, World};
use crate::context::Context;
use crate::error::Error;
use crate::metrics::Standing;
use crate::names::FINALIZER;
use crate::reason::Reason;
use crate::runpod::RunPodError;
use crate::time;

pub const KIND: &str = "RunPodOrder";

/// What one pass did: when to look again and what to tell people.
#[derive(Debug, Default)]
pub struct Done {
    /// None: wait for a change.
    pub requeue: Option<Duration>,
    pub events: Vec<(Reason, String)>,
    /// Phases entered, in order.
    pub entered: Vec<OrderPhase>,
    /// The order ended (DELETED or FAILED): nothing more will happen to it.
    pub terminal: bool,
}

/// One pass over one order: the phase's step, then status if it changed.
pub async fn step<W: World>(w: &W, order: &RunPodOrder, deleting: bool, now: DateTime<Utc>) -> Result<Done, Error> {
    let poll = w.settings().poll_interval.get();
    let mut pass = Pass::new(order, now, poll);
    let before = pass.st.transitions.len();
    let stopping = deleting || order.spec.stop.is_some();
    tracing::debug!(phase = ?pass.phase(), deleting, "order pass");
    let stepped = match pass.phase() {
        None => {
            pass.enter(OrderPhase::Requested, Reason::Accepted, "the order is durable; nothing is paid for yet");
            pass.ready(false, Reason::Requested, "checking the order against live RunPod state");
            Ok(Some(Duration::ZERO))
        }
        // No pod can exist before VERIFIED: a stop or a deletion ends the order at once.
        Some(OrderPhase::Requested | OrderPhase::Provisioned | OrderPhase::Synced) if stopping => {
            pass.enter(OrderPhase::Deleted, Reason::StoppedBeforeLaunch, "ended before any pod was created");
            Ok(None)
        }
        Some(OrderPhase::Requested) => provision::run(w, &mut pass).await,
        Some(OrderPhase::Provisioned) => payload::run(w, &mut pass).await,
        Some(OrderPhase::Synced) => claim::run(w, &mut pass).await,
        Some(OrderPhase::Verified | OrderPhase::RunnerOnline) => launch::run(w, &mut pass, deleting).await,
        Some(OrderPhase::Draining) => drain::run(w, &mut pass).await,
        Some(OrderPhase::Deleted | OrderPhase::Failed) => Ok(None),
    };
    let requeue = match stepped {
        Ok(r) => r,
        // RunPod down or rate limiting: the order says so in its status and looks again; a pod
        // whose create may have applied is still found by name first (podRequestedAt is durable).
        Err(Error::RunPod(e)) if e.is_retryable() => runpod_wait(&mut pass, &e),
        Err(e) => return Err(e),
    };
    pass.finish(w).await?;
    let entered: Vec<OrderPhase> =
        pass.st.transitions.get(before..).unwrap_or_default().iter().map(|t| t.phase).collect();
    let terminal = pass::is_terminal(pass.st.phase);
    if terminal && entered.iter().any(|p| pass::is_terminal(Some(*p))) {
        settle(w, order, &pass.st).await?;
    }
    tracing::debug!(phase = ?pass.phase(), ?requeue, "order pass done");
    Ok(Done { requeue, events: std::mem::take(&mut pass.events), entered, terminal })
}

/// Records a RunPod outage or rate limit as the order's wait reason; looks again at the next poll,
/// or after RunPod's Retry-After when that is later.
fn runpod_wait(pass: &mut Pass<'_>, e: &RunPodError) -> Option<Duration> {
    let (reason, after) = match e {
        RunPodError::RateLimited { retry_after, .. } => (Reason::RunPodRateLimited, *retry_after),
        _ => (Reason::RunPodUnavailable, None),
    };
    let b = crate::reason::Blocked::new(reason, format!("RunPod's API: {e}; trying again"));
    let wait = pass.block(b);
    wait.map(|w| w.max(after.unwrap_or_default()))
}

/// Closes the order's entry in its namespace's spend ledger at what it actually spent (its
/// reservation stops counting; the spend keeps counting after the order is deleted).
async fn settle<W: World>(w: &W, order: &RunPodOrder, st: &ep_api::RunPodOrderStatus) -> Result<(), Error> {
    if st.reserved_usd.is_none() {
        return Ok(());
    }
    let (ns, uid) = (order.namespace().unwrap_or_default(), order.uid().unwrap_or_default());
    w.settle(&ns, &uid, st.accrued_cost_usd.unwrap_or(0.0)).await
}

/// Deletion: drain until no pod can exist, then let the finalizer go.
pub async fn cleanup<W: World>(w: &W, order: &RunPodOrder, now: DateTime<Utc>) -> Result<Done, Error> {
    let st = order.status.clone().unwrap_or_default();
    if order.spec.deletion_policy == DeletionPolicy::Orphan {
        if pod_may_exist(&st) {
            tracing::warn!(order = %order.name_any(), pod = ?st.pod_id, "order deleted with deletionPolicy Orphan: the pod is left to terminateAfter");
        }
        return Ok(Done { terminal: true, ..Done::default() });
    }
    if !pod_may_exist(&st)
        && !matches!(st.phase, Some(OrderPhase::Verified | OrderPhase::RunnerOnline | OrderPhase::Draining))
    {
        settle(w, order, &st).await?;
        return Ok(Done { terminal: true, ..Done::default() });
    }
    step(w, order, true, now).await
}

/// Where the order stands, for the metrics: phase and since when, the gate that holds it, and
/// the price of the pod it holds.
pub fn standing(order: &RunPodOrder) -> Standing {
    let st = order.status.clone().unwrap_or_default();
    let phase = st.phase.unwrap_or_default();
    let terminal = matches!(phase, OrderPhase::Deleted | OrderPhase::Failed);
    let blocked = ep_api::find_condition(&st.conditions, ep_api::CONDITION_READY)
        .filter(|c| c.status == "False")
        .and_then(|c| c.reason.parse::<Reason>().ok())
        .filter(|r| r.kind() == crate::reason::Kind::Wait && !terminal)
        .map(|r| (r.domain().as_str(), r.as_str().to_owned()));
    let holds_pod = st.pod_id.is_some() && !terminal;
    Standing {
        kind: KIND,
        namespace: order.namespace().unwrap_or_default(),
        phase: phase.as_str().to_owned(),
        since: st.transitions.last().map(|t| time::from_micro(&t.at).timestamp_micros() as f64 / 1e6),
        blocked,
        terminal,
        usd_per_hour: if holds_pod { st.cost_per_hour.unwrap_or(0.0) } else { 0.0 },
    }
}

fn crash_point(phase: OrderPhase) -> Option<&'static str> {
    match phase {
        OrderPhase::Provisioned => Some("order.provisioned"),
        OrderPhase::Synced => Some("order.synced"),
        OrderPhase::Verified => Some("order.claimed"),
        OrderPhase::RunnerOnline => Some("order.online"),
        _ => None,
    }
}

/// Publishes what a pass did: Events, transition metrics, crash points.
async fn report(ctx: &Context, order: &RunPodOrder, done: &mut Done) {
    let reference = order.object_ref(&());
    for (reason, note) in std::mem::take(&mut done.events) {
        ctx.events.publish(&reference, reason, "Reconcile", &note).await;
    }
    for phase in &done.entered {
        ctx.metrics.transition(KIND, phase.as_str());
        if let Some(point) = crash_point(*phase) {
            crate::failpoint::hit(point);
        }
    }
}

/// The order controller's reconcile: project the observed order into the registry, then one step.
#[tracing::instrument(skip_all, fields(kind = KIND, namespace = order.namespace().unwrap_or_default(), name = order.name_any()))]
pub async fn reconcile(order: Arc<RunPodOrder>, ctx: Arc<Context>) -> Result<Action, Error> {
    ctx.metrics.reconciled(KIND);
    ctx.projector.order(&order);
    let ns = order.namespace().unwrap_or_default();
    let metrics_key = format!("{KIND}/{ns}/{}", order.name_any());
    ctx.metrics.observe(metrics_key.clone(), standing(&order));
    ctx.metrics.budget(&ns, ctx.settings.current().budget_for(&ns).map(|b| b.max_usd_per_day));
    let api = Api::<RunPodOrder>::namespaced(ctx.client.clone(), &order.namespace().unwrap_or_default());
    let w = KubeWorld::new(&ctx);
    let now = time::precise_now();
    let result = finalizer(&api, FINALIZER, order.clone(), |event| async {
        let (obj, deleting) = match event {
            Finalizer::Apply(o) => (o, false),
            Finalizer::Cleanup(o) => (o, true),
        };
        let mut done = if deleting { cleanup(&w, &obj, now).await? } else { step(&w, &obj, false, now).await? };
        report(&ctx, &obj, &mut done).await;
        match done.requeue {
            // Deletion waits until no pod can exist: the finalizer stays until then.
            _ if deleting && done.terminal => {
                ctx.metrics.forget(&metrics_key);
                Ok(Action::await_change())
            }
            Some(d) if deleting => Err(Error::CleanupPending(d.max(Duration::from_millis(50)))),
            Some(d) if d.is_zero() => Ok(Action::requeue(Duration::from_millis(50))),
            Some(d) => Ok(Action::requeue(d)),
            None => Ok(Action::await_change()),
        }
    })
    .await;
    result.map_err(crate::error::from_finalizer)
}
