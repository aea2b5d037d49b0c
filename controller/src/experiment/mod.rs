//! Reconciles `Experiment`: intake, `dependsOn` and `suspend`, the next attempt (run id, fencing
//! token, retry budget and backoff), the attempt's `RunPodOrder` as an owned child carrying
//! everything the attempt runs, and the order's outcome folded back into status. The experiment
//! reads only its children's status; they never read it.

mod admit;
mod decide;
pub mod display;
mod drift;
mod resume;

use std::sync::Arc;
use std::time::Duration;

use ep_api::order::{DeletionPolicy, ExperimentRef, RunTemplate};
use ep_api::{Experiment, RunPodOrder, RunPodOrderSpec};
use kube::api::{ObjectMeta, Patch, PatchParams, PostParams};
use kube::runtime::controller::Action;
use kube::runtime::finalizer::{Event as Finalizer, finalizer};
use kube::{Api, Resource, ResourceExt};
use serde_json::json;

pub use decide::{CONDITION_REGISTRY, Observed, Plan, decide, intake, registry_status, template};

use crate::context::Context;
use crate::error::Error;
use crate::names::{BINDING_MANAGER, LABEL_ATTEMPT, LABEL_EXPERIMENT, MANAGER};
use crate::time;

pub const KIND: &str = "Experiment";

/// Finalizer that lets the registry record an experiment's deletion.
pub const FINALIZER_REGISTRY: &str = "ep.dev/registry";

/// The order for an attempt of `exp`, owned by it and carrying what the attempt runs.
pub fn order_for(exp: &Experiment, name: &str, run: RunTemplate, worker: Option<&str>) -> RunPodOrder {
    let t = &exp.spec.order;
    let mut gpu = exp.spec.gpu.clone();
    if let Some(node) = run.worker_affinity.as_ref().and_then(|a| a.node_type.clone()) {
        gpu.types = vec![node];
    }
    let mut labels = std::collections::BTreeMap::new();
    labels.insert(LABEL_EXPERIMENT.to_owned(), exp.name_any());
    labels.insert(LABEL_ATTEMPT.to_owned(), run.attempt.to_string());
    RunPodOrder {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            namespace: exp.namespace(),
            labels: Some(labels),
            owner_references: exp.controller_owner_ref(&()).map(|r| vec![r]),
            ..ObjectMeta::default()
        },
        spec: RunPodOrderSpec {
            experiment_ref: Some(ExperimentRef { name: exp.name_any() }),
            attempt: Some(run.attempt),
            provider_ref: t.provider_ref.clone(),
            policy: t.policy.clone(),
            worker_id: worker.map_or_else(|| t.worker_id.clone(), str::to_owned),
            gpu,
            data_center: None,
            approved: None,
            approved_by: None,
            max_lifetime: None,
            max_cost_per_hour: t.max_cost_per_hour,
            deletion_policy: DeletionPolicy::Terminate,
            stop: None,
            run: Some(run),
        },
        status: None,
    }
}

/// Each `dependsOn` name with the phase that experiment has (None when it does not exist).
type Deps = Vec<(String, Option<ep_api::experiment::ExperimentPhase>)>;

/// The experiment's orders and dependencies, from the controllers' caches.
fn observe(ctx: &Context, exp: &Experiment) -> (Vec<Arc<RunPodOrder>>, Deps) {
    let ns = exp.namespace().unwrap_or_default();
    let orders = ctx.stores.orders_of(&ns, &exp.name_any());
    let deps = exp
        .spec
        .depends_on
        .iter()
        .map(|d| {
            let dep = ctx.stores.experiment(&ns, d);
            (d.clone(), dep.and_then(|e| e.status.as_ref().and_then(|s| s.phase)))
        })
        .collect();
    (orders, deps)
}

/// Writes what the plan says: status first (the claim is durable before its order exists), then
/// the order to create or the order made by hand to bind.
async fn apply(ctx: &Context, exp: &Experiment, plan: &Plan) -> Result<(), Error> {
    let ns = exp.namespace().unwrap_or_default();
    let name = exp.name_any();
    if exp.status.as_ref() != Some(&plan.status) {
        // Decided on this version of the experiment: if it changed meanwhile (a claim already
        // written by the previous pass, say), the write fails and the next pass decides again.
        let body = json!({
            "apiVersion": "ep.dev/v1alpha1",
            "kind": KIND,
            "metadata": {"resourceVersion": exp.resource_version()},
            "status": plan.status,
        });
        Api::<Experiment>::namespaced(ctx.client.clone(), &ns)
            .patch_status(&name, &PatchParams::apply(MANAGER).force(), &Patch::Apply(&body))
            .await
            .map_err(Error::write)?;
    }
    let orders = Api::<RunPodOrder>::namespaced(ctx.client.clone(), &ns);
    if let Some((order_name, run)) = &plan.create_order {
        let pp = PostParams { field_manager: Some(MANAGER.into()), ..Default::default() };
        let worker = plan.status.current_attempt.as_ref().and_then(|a| a.worker_id.as_deref());
        match orders.create(&pp, &order_for(exp, order_name, run.clone(), worker)).await {
            Ok(_) => {}
            Err(kube::Error::Api(e)) if e.code == 409 => {}
            Err(e) => return Err(e.into()),
        }
    }
    if let Some((order_name, run)) = &plan.bind {
        // The binding is the experiment's field in the order's status, under its own manager.
        let body = json!({"apiVersion": "ep.dev/v1alpha1", "kind": "RunPodOrder", "status": {"binding": run}});
        orders.patch_status(order_name, &PatchParams::apply(BINDING_MANAGER).force(), &Patch::Apply(&body)).await?;
    }
    if let Some((order_name, why)) = &plan.stop {
        // The same request `kubectl ep stop` makes: the order drains and collects what the run left.
        let body = json!({"spec": {"stop": {"reason": why}}});
        orders.patch(order_name, &PatchParams::apply(MANAGER), &Patch::Merge(&body)).await?;
    }
    Ok(())
}

/// Workers a live order of the namespace holds, read only for an exclusive affinity (the one case
/// that needs the namespace's orders).
fn busy_workers(ctx: &Context, exp: &Experiment) -> std::collections::BTreeMap<String, String> {
    if !exp.spec.worker_affinity.as_ref().is_some_and(|a| a.exclusive) {
        return std::collections::BTreeMap::new();
    }
    let live = |o: &RunPodOrder| {
        !matches!(
            o.status.as_ref().and_then(|s| s.phase),
            Some(ep_api::order::OrderPhase::Deleted | ep_api::order::OrderPhase::Failed)
        )
    };
    ctx.stores
        .orders_in(&exp.namespace().unwrap_or_default())
        .iter()
        .filter(|o| live(o))
        .map(|o| (o.spec.worker_id.clone(), o.name_any()))
        .collect()
}

/// One pass while the experiment exists.
async fn step(ctx: &Context, exp: &Experiment) -> Result<Action, Error> {
    let (orders, deps) = observe(ctx, exp);
    let settings = ctx.settings.current();
    let observed = Observed {
        exp,
        orders: orders.iter().map(AsRef::as_ref).collect(),
        deps,
        settings: &settings,
        registry: ctx.projector.health(&exp.namespace().unwrap_or_default(), &exp.name_any()),
        busy: busy_workers(ctx, exp),
        now: time::precise_now(),
    };
    let plan = decide(&observed);
    apply(ctx, exp, &plan).await?;
    let reference = exp.object_ref(&());
    for (reason, note) in &plan.events {
        ctx.events.publish(&reference, *reason, "Reconcile", note).await;
    }
    let before = exp.status.as_ref().and_then(|s| s.phase);
    if let Some(p) = plan.status.phase.filter(|p| Some(*p) != before) {
        ctx.metrics.transition(KIND, &format!("{p:?}"));
    }
    Ok(match plan.requeue {
        Some(d) => Action::requeue(d.max(Duration::from_millis(200))),
        // Running attempts are followed through their order's events; a slow requeue is a backstop.
        None => Action::requeue(Duration::from_secs(300)),
    })
}

/// Where the experiment stands, for the metrics.
fn standing(exp: &Experiment) -> crate::metrics::Standing {
    use ep_api::experiment::ExperimentPhase;
    let st = exp.status.clone().unwrap_or_default();
    let phase = st.phase.unwrap_or_default();
    crate::metrics::Standing {
        kind: KIND,
        namespace: exp.namespace().unwrap_or_default(),
        phase: format!("{phase:?}"),
        since: st.transitions.last().map(|t| time::from_micro(&t.at).timestamp_micros() as f64 / 1e6),
        blocked: None,
        terminal: matches!(phase, ExperimentPhase::Succeeded | ExperimentPhase::Failed),
        // The experiment's pod is its order's: counted there.
        usd_per_hour: 0.0,
    }
}

/// Deletion: its orders are owned children (garbage collection deletes them and their own
/// finalizers drain their pods). What is left here is the registry: an experiment deleted before
/// it finished is recorded as ended before the finalizer goes.
fn cleanup(ctx: &Context, exp: &Experiment) -> Result<Action, Error> {
    if ctx.projector.experiment_deleted(exp, time::precise_now()) {
        Ok(Action::await_change())
    } else {
        Err(Error::CleanupPending(Duration::from_millis(500)))
    }
}

/// The experiment controller's reconcile.
#[tracing::instrument(skip_all, fields(kind = KIND, namespace = exp.namespace().unwrap_or_default(), name = exp.name_any()))]
pub async fn reconcile(exp: Arc<Experiment>, ctx: Arc<Context>) -> Result<Action, Error> {
    ctx.metrics.reconciled(KIND);
    let metrics_key = format!("{KIND}/{}/{}", exp.namespace().unwrap_or_default(), exp.name_any());
    if exp.meta().deletion_timestamp.is_none() {
        ctx.projector.experiment(&exp);
        ctx.metrics.observe(metrics_key.clone(), standing(&exp));
    } else {
        ctx.metrics.forget(&metrics_key);
    }
    let api = Api::<Experiment>::namespaced(ctx.client.clone(), &exp.namespace().unwrap_or_default());
    finalizer(&api, FINALIZER_REGISTRY, exp, |event| async {
        match event {
            Finalizer::Apply(e) => step(&ctx, &e).await,
            Finalizer::Cleanup(e) => cleanup(&ctx, &e),
        }
    })
    .await
    .map_err(crate::error::from_finalizer)
}
