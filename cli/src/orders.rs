//! `kubectl ep approve` and `kubectl ep stop`: the two order edits people make by hand.

use ep_api::{Experiment, RunPodOrder};
use kube::api::{Patch, PatchParams};
use kube::{Api, Client};
use serde_json::json;

const MANAGER: &str = "kubectl-ep";

/// A client and namespace from the kubeconfig (KUBECONFIG, ~/.kube/config or in-cluster).
pub async fn connect(namespace: Option<String>) -> Result<(Client, String, String), String> {
    let config = kube::Config::infer().await.map_err(|e| format!("no Kubernetes configuration: {e}"))?;
    let ns = namespace.unwrap_or_else(|| config.default_namespace.clone());
    let user = kube::config::Kubeconfig::read()
        .ok()
        .and_then(|kc| {
            let ctx = kc.current_context.clone()?;
            kc.contexts.iter().find(|c| c.name == ctx)?.context.as_ref()?.user.clone()
        })
        .or_else(|| std::env::var("USER").ok())
        .unwrap_or_else(|| "unknown".into());
    let client = Client::try_from(config).map_err(|e| e.to_string())?;
    Ok((client, ns, user))
}

/// Sets `spec.approved` (and who approved) on an order.
pub async fn approve(client: Client, ns: &str, order: &str, by: &str) -> Result<(), String> {
    let api = Api::<RunPodOrder>::namespaced(client, ns);
    let current =
        api.get_opt(order).await.map_err(|e| e.to_string())?.ok_or_else(|| {
            format!("RunPodOrder {ns}/{order} does not exist (kubectl get rpo -n {ns} lists the orders)")
        })?;
    if current.spec.approved == Some(true) {
        println!(
            "runpodorder.ep.dev/{order} already approved by {}",
            current.spec.approved_by.as_deref().unwrap_or("someone")
        );
        return Ok(());
    }
    let patch = json!({"spec": {"approved": true, "approvedBy": by}});
    api.patch(order, &PatchParams::apply(MANAGER), &Patch::Merge(&patch)).await.map_err(|e| e.to_string())?;
    println!("runpodorder.ep.dev/{order} approved by {by}");
    Ok(())
}

/// Asks an order (or the current order of an experiment) to drain.
pub async fn stop(client: Client, ns: &str, name: &str, reason: &str) -> Result<(), String> {
    let orders = Api::<RunPodOrder>::namespaced(client.clone(), ns);
    let order = match orders.get_opt(name).await.map_err(|e| e.to_string())? {
        Some(_) => name.to_owned(),
        None => {
            let exp = Api::<Experiment>::namespaced(client, ns)
                .get_opt(name)
                .await
                .map_err(|e| e.to_string())?
                .ok_or_else(|| format!("neither a RunPodOrder nor an Experiment named {name} exists in {ns}"))?;
            exp.status
                .and_then(|s| s.current_attempt)
                .and_then(|a| a.order)
                .ok_or_else(|| format!("experiment {ns}/{name} has no attempt running"))?
        }
    };
    let patch = json!({"spec": {"stop": {"reason": reason}}});
    orders.patch(&order, &PatchParams::apply(MANAGER), &Patch::Merge(&patch)).await.map_err(|e| e.to_string())?;
    println!("runpodorder.ep.dev/{order} stopping: {reason}");
    Ok(())
}
