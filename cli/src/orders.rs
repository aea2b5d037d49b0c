//! `kubectl ep approve` and `kubectl ep stop`: the two order edits people make by hand.

use ep_api::{Experiment, RunPodOrder};
use kube::api::{Patch, PatchParams};
use kube::{Api, Client};
use serde_json::json;

const MANAGER: &str = "kubectl-ep";

/// Which cluster and identity, as kubectl's own flags choose them.
#[derive(clap::Args, Clone, Debug, Default)]
pub struct Target {
    /// The kubeconfig context to use (as `kubectl --context`).
    #[arg(long, global = true)]
    pub context: Option<String>,
    /// The kubeconfig file (as `kubectl --kubeconfig`; default KUBECONFIG, then ~/.kube/config).
    #[arg(long, global = true)]
    pub kubeconfig: Option<std::path::PathBuf>,
}

/// A client, the namespace (the flag, else the context's) and who the API server says we are.
pub async fn connect(namespace: Option<String>, target: &Target) -> Result<(Client, String, String), String> {
    let opts = kube::config::KubeConfigOptions { context: target.context.clone(), ..Default::default() };
    let config = match (&target.kubeconfig, &target.context) {
        (Some(path), _) => {
            let kc = kube::config::Kubeconfig::read_from(path).map_err(|e| format!("{}: {e}", path.display()))?;
            kube::Config::from_custom_kubeconfig(kc, &opts).await.map_err(|e| e.to_string())?
        }
        (None, Some(_)) => kube::Config::from_kubeconfig(&opts).await.map_err(|e| e.to_string())?,
        (None, None) => kube::Config::infer().await.map_err(|e| format!("no Kubernetes configuration: {e}"))?,
    };
    let ns = namespace.unwrap_or_else(|| config.default_namespace.clone());
    let client = Client::try_from(config).map_err(|e| e.to_string())?;
    let user = whoami(&client).await?;
    Ok((client, ns, user))
}

/// The user name the API server authenticates this client as (`kubectl auth whoami`), so what the
/// plugin records as a person is who the cluster says sent the request, not a kubeconfig label.
async fn whoami(client: &Client) -> Result<String, String> {
    use k8s_openapi::api::authentication::v1::SelfSubjectReview;
    let review = kube::Api::<SelfSubjectReview>::all(client.clone())
        .create(&kube::api::PostParams::default(), &SelfSubjectReview::default())
        .await
        .map_err(|e| format!("asking the API server who this is (SelfSubjectReview): {e}"))?;
    review
        .status
        .and_then(|s| s.user_info)
        .and_then(|u| u.username)
        .ok_or_else(|| "the API server's SelfSubjectReview named no user".to_owned())
}

/// An API error as the API server worded it (kubectl prints the Status message alone).
pub fn api_error(e: kube::Error) -> String {
    match e {
        kube::Error::Api(s) if !s.message.is_empty() => format!("Error from server ({}): {}", s.reason, s.message),
        other => other.to_string(),
    }
}

/// Sets `spec.approved` (and who approved) on an order.
pub async fn approve(client: Client, ns: &str, order: &str, by: &str) -> Result<(), String> {
    let api = Api::<RunPodOrder>::namespaced(client, ns);
    let current =
        api.get_opt(order).await.map_err(api_error)?.ok_or_else(|| {
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
    api.patch(order, &PatchParams::apply(MANAGER), &Patch::Merge(&patch)).await.map_err(api_error)?;
    println!("runpodorder.ep.dev/{order} approved by {by}");
    Ok(())
}

/// Asks an order (or the current order of an experiment) to drain.
pub async fn stop(client: Client, ns: &str, name: &str, reason: &str) -> Result<(), String> {
    let orders = Api::<RunPodOrder>::namespaced(client.clone(), ns);
    let order = match orders.get_opt(name).await.map_err(api_error)? {
        Some(_) => name.to_owned(),
        None => {
            let exp = Api::<Experiment>::namespaced(client, ns)
                .get_opt(name)
                .await
                .map_err(api_error)?
                .ok_or_else(|| format!("neither a RunPodOrder nor an Experiment named {name} exists in {ns}"))?;
            exp.status
                .and_then(|s| s.current_attempt)
                .and_then(|a| a.order)
                .ok_or_else(|| format!("experiment {ns}/{name} has no attempt running"))?
        }
    };
    let patch = json!({"spec": {"stop": {"reason": reason}}});
    orders.patch(&order, &PatchParams::apply(MANAGER), &Patch::Merge(&patch)).await.map_err(api_error)?;
    println!("runpodorder.ep.dev/{order} stopping: {reason}");
    Ok(())
}
