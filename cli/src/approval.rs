//! `kubectl ep approve EXPERIMENT`: an approval envelope on an Experiment, after the approver has
//! read what it lets the experiment spend and what the namespace has left.

use ep_api::Experiment;
use ep_api::experiment::{Envelope, ExperimentPhase};
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Patch, PatchParams};
use kube::{Api, Client};
use serde_json::{Value, json};

use crate::orders::{EnvelopeArgs, api_error, confirm};

/// The envelope the approver gives: the flags, else the experiment's own bounds.
fn envelope(exp: &Experiment, b: &EnvelopeArgs) -> Envelope {
    let s = &exp.spec;
    Envelope {
        gpu_types: if b.gpu_types.is_empty() { s.gpu.types.clone() } else { b.gpu_types.clone() },
        max_cost_per_hour: b.max_cost_per_hour.or(s.order.max_cost_per_hour),
        max_total_usd: b.max_total_usd.or_else(|| s.limits.as_ref()?.max_cost_usd),
        max_attempts: b.max_attempts.or(Some(s.retry.as_ref().map_or(1, |r| r.max_attempts.max(1)))),
    }
}

/// Why `exp` cannot be approved any more, if it cannot.
fn ended(exp: &Experiment) -> Option<String> {
    let name = exp.metadata.name.as_deref().unwrap_or_default();
    if exp.metadata.deletion_timestamp.is_some() {
        return Some(format!("experiment.ep.dev/{name} is being deleted: there is nothing to approve"));
    }
    let st = exp.status.as_ref()?;
    match st.phase {
        Some(p @ (ExperimentPhase::Succeeded | ExperimentPhase::Failed)) => Some(format!(
            "experiment.ep.dev/{name} already ended ({p:?}{}): there is nothing to approve; a new Experiment makes new work",
            st.conditions.iter().find(|c| c.type_ == "Ready").map(|c| format!(", {}", c.reason)).unwrap_or_default()
        )),
        _ => None,
    }
}

fn usd(x: f64) -> String {
    if x > 0.0 && x < 0.01 { format!("${x:.4}") } else { format!("${x:.2}") }
}

/// What the namespace's spend ledger says: spent or reserved today against the daily budget.
async fn namespace_line(client: &Client, ns: &str) -> Result<String, String> {
    let cm = match Api::<ConfigMap>::namespaced(client.clone(), ns).get_opt("ep-spend-ledger").await {
        Ok(Some(cm)) => cm,
        Ok(None) => return Ok(format!("no spend ledger in {ns} yet (nothing admitted under a budget)")),
        Err(kube::Error::Api(e)) if e.code == 403 => {
            return Ok(format!("the spend ledger configmap/ep-spend-ledger in {ns} is not readable to you"));
        }
        Err(e) => return Err(api_error(e)),
    };
    let today = &k8s_openapi::jiff::Timestamp::now().to_string()[..10];
    let (mut used, mut gpus) = (0.0, 0);
    for v in cm.data.unwrap_or_default().values() {
        let Ok(e) = serde_json::from_str::<Value>(v) else { continue };
        let (reserved, spent) = (e["reservedUsd"].as_f64().unwrap_or(0.0), e["spentUsd"].as_f64().unwrap_or(0.0));
        let open = e["open"].as_bool().unwrap_or(false);
        if open {
            gpus += e["gpus"].as_u64().unwrap_or(0);
        }
        if e["admittedAt"].as_str().is_some_and(|t| t.starts_with(today)) {
            used += if open { reserved.max(spent) } else { spent };
        }
    }
    let budget: Value = cm
        .metadata
        .annotations
        .and_then(|a| a.get("ep.dev/budget").and_then(|b| serde_json::from_str(b).ok()))
        .unwrap_or(Value::Null);
    Ok(match budget["maxUsdPerDay"].as_f64() {
        Some(max) => format!(
            "{} spent or reserved today of its {} daily budget ({} left); {gpus} of {} GPUs held",
            usd(used),
            usd(max),
            usd((max - used).max(0.0)),
            budget["maxConcurrentGpus"].as_u64().unwrap_or(0)
        ),
        None => format!("{} spent or reserved today; {gpus} GPUs held", usd(used)),
    })
}

/// What approving `exp` within `env` lets it spend, as the approver reads it before saying yes.
fn summary(exp: &Experiment, env: &Envelope, namespace: &str) -> String {
    let s = &exp.spec;
    let name = exp.metadata.name.as_deref().unwrap_or_default();
    let spent = exp.status.as_ref().and_then(|st| st.cost_usd).unwrap_or(0.0);
    let lifetime = s.limits.as_ref().and_then(|l| l.max_runtime.clone());
    let projected = match (env.max_cost_per_hour, &lifetime) {
        (Some(r), Some(l)) => {
            format!("at most {} an attempt (max $/h x maxRuntime)", usd(r * l.get().as_secs_f64() / 3600.0))
        }
        _ => "bounded by the policy's caps".to_owned(),
    };
    format!(
        "experiment.ep.dev/{name} asks to spend:\n  GPU           {} x {} ({:?} cloud, policy {})\n  max $/h       {}\n  projected     {projected}\n  in all        {} across at most {} attempts ({} spent so far)\n  namespace     {namespace}\n",
        s.gpu.count,
        env.gpu_types.join(" or "),
        s.gpu.cloud_type,
        s.order.policy,
        env.max_cost_per_hour.map_or_else(|| "the policy's cap".to_owned(), |r| format!("{r:.2}")),
        env.max_total_usd.map_or_else(|| "no cap".to_owned(), usd),
        env.max_attempts.unwrap_or(1),
        usd(spent),
    )
}

/// Sets `spec.approval` on an experiment: approver = the authenticated user, the envelope from the
/// flags or the experiment's bounds. Its orders inside the envelope launch without another approval.
pub async fn approve_experiment(
    client: Client,
    ns: &str,
    exp: &Experiment,
    by: &str,
    yes: bool,
    bounds: &EnvelopeArgs,
) -> Result<(), String> {
    let name = exp.metadata.name.clone().unwrap_or_default();
    if let Some(why) = ended(exp) {
        return Err(why);
    }
    let env = envelope(exp, bounds);
    if exp.spec.approval.as_ref().is_some_and(|a| a.approved_by == by && a.envelope == env) {
        println!("experiment.ep.dev/{name} already approved by {by} within the same envelope");
        return Ok(());
    }
    print!("{}", summary(exp, &env, &namespace_line(&client, ns).await?));
    if !yes && !confirm(&format!("approve as {by}? [y/N] "))? {
        return Err("not approved (answer y, or pass --yes)".into());
    }
    // Every envelope field is written, null where unbounded, so a merge patch leaves no earlier bound.
    let patch = json!({"spec": {"approval": {"approvedBy": by, "envelope": {
        "gpuTypes": env.gpu_types,
        "maxCostPerHour": env.max_cost_per_hour,
        "maxTotalUsd": env.max_total_usd,
        "maxAttempts": env.max_attempts,
    }}}});
    Api::<Experiment>::namespaced(client, ns)
        .patch(&name, &PatchParams::apply("kubectl-ep"), &Patch::Merge(&patch))
        .await
        .map_err(api_error)?;
    let parts = [
        Some(format!("GPUs {}", env.gpu_types.join(", "))),
        env.max_cost_per_hour.map(|p| format!("${p:.2}/h")),
        env.max_total_usd.map(|t| format!("{} in all", usd(t))),
        env.max_attempts.map(|n| format!("{n} attempts")),
    ];
    let within: Vec<String> = parts.into_iter().flatten().collect();
    println!("experiment.ep.dev/{name} approved by {by} within {}", within.join(", "));
    Ok(())
}

/// Asks a finished experiment for a new attempt (spec.rerun = now): refused while an attempt is
/// under way or before the experiment ended.
pub async fn rerun(client: Client, ns: &str, name: &str) -> Result<(), String> {
    let api = Api::<Experiment>::namespaced(client, ns);
    let exp = api.get_opt(name).await.map_err(api_error)?.ok_or_else(|| format!("no Experiment {ns}/{name}"))?;
    let st = exp.status.clone().unwrap_or_default();
    match st.phase {
        Some(ExperimentPhase::Succeeded | ExperimentPhase::Failed) if st.current_attempt.is_none() => {}
        p => {
            return Err(format!(
                "experiment.ep.dev/{name} is {}: only a Succeeded or Failed experiment is rerun",
                p.map_or_else(|| "new".to_owned(), |p| format!("{p:?}"))
            ));
        }
    }
    let token = k8s_openapi::jiff::Timestamp::now().to_string();
    let patch = json!({"spec": {"rerun": token}});
    api.patch(name, &PatchParams::apply("kubectl-ep"), &Patch::Merge(&patch)).await.map_err(api_error)?;
    println!("experiment.ep.dev/{name} rerun: attempt {} follows", st.attempts + 1);
    Ok(())
}
