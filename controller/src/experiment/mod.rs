//! Reconciles `Experiment`: intake, `dependsOn` and `suspend`, the next attempt (run id, fencing
//! token, retry budget and backoff), the attempt's `RunPodOrder` as an owned child, and the
//! order's outcome folded back into status and the registry.

mod decide;

use std::sync::Arc;
use std::time::Duration;

use ep_api::order::{DeletionPolicy, ExperimentRef};
use ep_api::{Experiment, RunPodOrder, RunPodOrderSpec};
use kube::api::{ObjectMeta, Patch, PatchParams, PostParams};
use kube::runtime::controller::Action;
use kube::{Api, Resource, ResourceExt};
use serde_json::json;

pub use decide::{CONDITION_REGISTRY, Observed, Plan, decide, intake, registry_status};

use crate::context::{Context, Error, has_finalizer, set_finalizer};
use crate::mirror::Write;
use crate::names::{LABEL_ATTEMPT, LABEL_EXPERIMENT, MANAGER};
use crate::registry::{ExperimentRow, PhaseChange, status as reg};
use crate::time;

pub const KIND: &str = "Experiment";

/// The order for attempt `attempt` of `exp`, owned by it.
pub(crate) fn order_for(exp: &Experiment, name: &str, attempt: i32) -> RunPodOrder {
    let t = &exp.spec.order;
    let mut labels = std::collections::BTreeMap::new();
    labels.insert(LABEL_EXPERIMENT.to_owned(), exp.name_any());
    labels.insert(LABEL_ATTEMPT.to_owned(), attempt.to_string());
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
            attempt: Some(attempt),
            provider_ref: t.provider_ref.clone(),
            policy: t.policy.clone(),
            worker_id: t.worker_id.clone(),
            gpu: exp.spec.gpu.clone(),
            data_center: None,
            approved: None,
            approved_by: None,
            max_lifetime: None,
            max_cost_per_hour: t.max_cost_per_hour,
            deletion_policy: DeletionPolicy::Terminate,
            stop: None,
        },
        status: None,
    }
}

/// Finalizer that lets the registry record an experiment's deletion.
pub const FINALIZER_REGISTRY: &str = "ep.dev/registry";

fn row(exp: &Experiment) -> ExperimentRow {
    let st = exp.status.clone().unwrap_or_default();
    let cur = st.current_attempt.as_ref();
    let last = cur.or(st.history.last());
    let results = st.results.as_ref();
    ExperimentRow {
        namespace: exp.namespace().unwrap_or_default(),
        name: exp.name_any(),
        uid: exp.uid().unwrap_or_default(),
        status: st.registry_status.clone().unwrap_or_else(|| crate::registry::status::READY.to_owned()),
        phase: st.phase.map(|p| format!("{p:?}")),
        worker_id: last.and_then(|a| a.worker_id.clone()).or_else(|| Some(exp.spec.order.worker_id.clone())),
        current_run_id: last.map(|a| a.run_id.clone()),
        attempts: st.attempts,
        gpu: st.gpu.clone(),
        result_f1: results.and_then(|r| r.get("f1").copied()),
        result_auc: results.and_then(|r| r.get("auc").copied()),
        cost_usd: st.cost_usd,
        started_at: last.and_then(|a| a.started_at.as_ref()).map(time::from_k8s),
        finished_at: match st.phase {
            Some(ep_api::experiment::ExperimentPhase::Succeeded | ep_api::experiment::ExperimentPhase::Failed) => {
                st.history.last().and_then(|a| a.finished_at.as_ref()).map(time::from_k8s)
            }
            _ => None,
        },
        extra: json!({"results": results, "receipt": st.artifacts.as_ref().map(|a| a.receipt.clone())}),
    }
}

/// One pass of the experiment reconciler.
pub async fn reconcile(exp: Arc<Experiment>, ctx: Arc<Context>) -> Result<Action, Error> {
    ctx.metrics.reconciled(KIND);
    let ns = exp.namespace().unwrap_or_default();
    let name = exp.name_any();
    let api = Api::<Experiment>::namespaced(ctx.client.clone(), &ns);
    let finalized = has_finalizer(exp.as_ref(), FINALIZER_REGISTRY);
    if exp.meta().deletion_timestamp.is_some() {
        // Its orders are owned children: garbage collection deletes them and their own finalizers
        // drain their pods. What is left here is the registry: an experiment deleted before it
        // finished must not stay RUNNING there.
        if finalized {
            let now = time::now();
            let mut r = row(&exp);
            if !matches!(r.status.as_str(), reg::COMPLETED | reg::FAILED | reg::FAILED_STATUS_DIVERGENCE) {
                reg::FAILED.clone_into(&mut r.status);
                r.finished_at = Some(now);
            }
            r.extra["deleted"] = json!(true);
            ctx.mirror.send(Write::Experiment(r));
            ctx.mirror.send(Write::Phase(PhaseChange {
                kind: KIND.into(),
                namespace: ns.clone(),
                name: name.clone(),
                uid: exp.uid().unwrap_or_default(),
                from_phase: exp.status.as_ref().and_then(|s| s.phase).map(|p| format!("{p:?}")),
                to_phase: "Deleted".into(),
                reason: Some("ExperimentDeleted".into()),
                message: None,
                at: now,
            }));
            set_finalizer(&api, exp.as_ref(), FINALIZER_REGISTRY, false).await?;
        }
        return Ok(Action::await_change());
    }
    if !finalized {
        set_finalizer(&api, exp.as_ref(), FINALIZER_REGISTRY, true).await?;
        return Ok(Action::await_change());
    }
    let orders_api = Api::<RunPodOrder>::namespaced(ctx.client.clone(), &ns);
    let all = orders_api.list(&Default::default()).await?;
    let orders: Vec<&RunPodOrder> =
        all.items.iter().filter(|o| o.spec.experiment_ref.as_ref().is_some_and(|r| r.name == name)).collect();
    let exps = api;
    let mut deps = Vec::new();
    for d in &exp.spec.depends_on {
        let phase = exps.get_opt(d).await?.and_then(|e| e.status.and_then(|s| s.phase));
        deps.push((d.clone(), phase));
    }
    let settings = ctx.settings.current();
    let lag = ctx.mirror.lag();
    let registry_behind = lag.behind_since.map(|since| {
        format!(
            "{} registry writes wait since {}: {}",
            lag.pending,
            since.to_rfc3339(),
            lag.error.clone().unwrap_or_default()
        )
    });
    let now = time::now();
    let observed = Observed { exp: &exp, orders, deps, settings: &settings, registry_behind, now };
    let plan = decide(&observed);
    let before = exp.status.as_ref().and_then(|s| s.phase);
    let mut updated = (*exp).clone();
    updated.status = Some(plan.status.clone());
    if exp.status.as_ref() != Some(&plan.status) {
        let body = json!({"apiVersion": "ep.dev/v1alpha1", "kind": KIND, "status": plan.status});
        exps.patch_status(&name, &PatchParams::apply(MANAGER).force(), &Patch::Apply(&body)).await?;
    }
    if let Some((order_name, attempt)) = &plan.create_order {
        match orders_api
            .create(
                &PostParams { field_manager: Some(MANAGER.into()), ..Default::default() },
                &order_for(&exp, order_name, *attempt),
            )
            .await
        {
            Ok(_) => {}
            Err(kube::Error::Api(e)) if e.code == 409 => {}
            Err(e) => return Err(e.into()),
        }
    }
    let reference = exp.object_ref(&());
    for (warning, reason, note) in &plan.events {
        ctx.event(&reference, *warning, reason, "Reconcile", note.clone()).await;
    }
    let after = plan.status.phase;
    if after != before
        && let Some(p) = after
    {
        ctx.metrics.transition(KIND, &format!("{p:?}"));
        let cond = ep_api::find_condition(&plan.status.conditions, ep_api::CONDITION_READY);
        ctx.mirror.send(Write::Phase(PhaseChange {
            kind: KIND.into(),
            namespace: ns.clone(),
            name: name.clone(),
            uid: exp.uid().unwrap_or_default(),
            from_phase: before.map(|p| format!("{p:?}")),
            to_phase: format!("{p:?}"),
            reason: cond.map(|c| c.reason.clone()),
            message: cond.map(|c| c.message.clone()),
            at: now,
        }));
    }
    ctx.mirror.send(Write::Experiment(row(&updated)));
    Ok(match plan.requeue {
        Some(d) => Action::requeue(d.max(Duration::from_millis(200))),
        // Running attempts are followed through their order's events; a slow requeue is a backstop.
        None => Action::requeue(Duration::from_secs(300)),
    })
}
