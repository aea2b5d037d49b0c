//! `kubectl ep approve` and `kubectl ep stop`: the two order edits people make by hand.

use ep_api::order::OrderPhase;
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

/// The order `name` names: itself, else the current (or last) order of the Experiment `name`.
async fn resolve(client: &Client, ns: &str, name: &str) -> Result<RunPodOrder, String> {
    let orders = Api::<RunPodOrder>::namespaced(client.clone(), ns);
    if let Some(o) = orders.get_opt(name).await.map_err(api_error)? {
        return Ok(o);
    }
    let exp = Api::<Experiment>::namespaced(client.clone(), ns)
        .get_opt(name)
        .await
        .map_err(api_error)?
        .ok_or_else(|| format!("neither a RunPodOrder nor an Experiment named {name} exists in {ns}"))?;
    let st = exp.status.unwrap_or_default();
    let order = st
        .current_attempt
        .and_then(|a| a.order)
        .or_else(|| st.history.last().and_then(|a| a.order.clone()))
        .ok_or_else(|| format!("experiment {ns}/{name} has no order yet"))?;
    orders.get_opt(&order).await.map_err(api_error)?.ok_or_else(|| format!("RunPodOrder {ns}/{order} is gone"))
}

/// Why `order` cannot be approved any more, if it cannot.
fn ended(order: &RunPodOrder) -> Option<String> {
    let name = order.metadata.name.as_deref().unwrap_or_default();
    if order.metadata.deletion_timestamp.is_some() {
        return Some(format!("runpodorder.ep.dev/{name} is being deleted: there is nothing to approve"));
    }
    if let Some(stop) = &order.spec.stop {
        return Some(format!("runpodorder.ep.dev/{name} was stopped ({}): there is nothing to approve", stop.reason));
    }
    let st = order.status.as_ref()?;
    match st.phase {
        Some(p @ (OrderPhase::Deleted | OrderPhase::Failed)) => Some(format!(
            "runpodorder.ep.dev/{name} already ended ({p:?}{}): there is nothing to approve; \
             `kubectl ep rerun` or a new Experiment makes a new order",
            st.reason.as_deref().map(|r| format!(", {r}")).unwrap_or_default()
        )),
        _ => None,
    }
}

/// What approving `order` lets it spend, as the approver reads it before saying yes.
fn spend_summary(order: &RunPodOrder, spent_today: (f64, usize)) -> String {
    let s = &order.spec;
    let name = order.metadata.name.as_deref().unwrap_or_default();
    let exp =
        s.experiment_ref.as_ref().map(|e| format!(" (experiment {}, attempt {})", e.name, s.attempt.unwrap_or(1)));
    let candidates = order.status.as_ref().map(|st| st.gpu_candidates.clone()).filter(|c| !c.is_empty());
    let gpus = candidates.unwrap_or_else(|| s.gpu.types.clone()).join(" or ");
    let lifetime = s.max_lifetime.clone().or_else(|| s.run.as_ref()?.limits.as_ref()?.max_runtime.clone());
    let rate = s.max_cost_per_hour;
    let projected = match (rate, &lifetime) {
        (Some(r), Some(l)) => format!("at most ${:.2} (max $/h x lifetime)", r * l.get().as_secs_f64() / 3600.0),
        _ => "bounded by the policy's caps".to_owned(),
    };
    let cap = s.run.as_ref().and_then(|r| r.limits.as_ref()?.max_cost_usd).map(|c| format!(", experiment cap ${c:.2}"));
    format!(
        "runpodorder.ep.dev/{name}{} asks to spend:\n  GPU           {} x {gpus} ({:?} cloud, policy {})\n  max $/h       {}\n  lifetime      {}\n  projected     {projected}{}\n  namespace     ${:.2} spent in the last 24 h by {} orders\n",
        exp.unwrap_or_default(),
        s.gpu.count,
        s.gpu.cloud_type,
        s.policy,
        rate.map_or_else(|| "the policy's cap".to_owned(), |r| format!("{r:.2}")),
        lifetime.map_or_else(|| "the policy's maxLifetime".to_owned(), |l| l.to_string()),
        cap.unwrap_or_default(),
        spent_today.0,
        spent_today.1,
    )
}

/// Spend of the namespace's orders created in the last 24 hours: (USD, orders).
async fn spent_today(client: &Client, ns: &str) -> Result<(f64, usize), String> {
    let all = Api::<RunPodOrder>::namespaced(client.clone(), ns).list(&Default::default()).await.map_err(api_error)?;
    let since = k8s_openapi::jiff::Timestamp::now() - k8s_openapi::jiff::SignedDuration::from_hours(24);
    let recent: Vec<&RunPodOrder> =
        all.items.iter().filter(|o| o.metadata.creation_timestamp.as_ref().is_some_and(|t| t.0 >= since)).collect();
    let usd = recent.iter().filter_map(|o| o.status.as_ref()?.accrued_cost_usd).sum();
    Ok((usd, recent.len()))
}

/// Bounds an approver sets on an experiment's approval; what is not given comes from the
/// experiment itself (its GPU types, price ceiling, cost cap and attempts).
#[derive(clap::Args, Clone, Debug, Default)]
pub struct EnvelopeArgs {
    /// GPU types the attempts may run on (comma-separated; default: the experiment's).
    #[arg(long, value_delimiter = ',')]
    pub gpu_types: Vec<String>,
    /// Highest price of the pod, USD per hour (default: the experiment's order.maxCostPerHour).
    #[arg(long)]
    pub max_cost_per_hour: Option<f64>,
    /// Most all attempts together may spend, USD (default: the experiment's limits.maxCostUsd).
    #[arg(long)]
    pub max_total_usd: Option<f64>,
    /// Highest attempt number covered (default: the experiment's retry.maxAttempts).
    #[arg(long)]
    pub max_attempts: Option<i32>,
}

/// Approves the spending of an order (`spec.approved`), or of an Experiment within an envelope
/// (`spec.approval`, which covers its current order and its retries): shows what it may spend,
/// asks unless `yes`, and names as approver the user the API server authenticated (the chart's
/// admission policy refuses any other name).
pub async fn approve(
    client: Client,
    ns: &str,
    name: &str,
    by: &str,
    yes: bool,
    bounds: &EnvelopeArgs,
) -> Result<(), String> {
    let is_order = Api::<RunPodOrder>::namespaced(client.clone(), ns).get_opt(name).await.map_err(api_error)?.is_some();
    if !is_order
        && let Some(exp) = Api::<Experiment>::namespaced(client.clone(), ns).get_opt(name).await.map_err(api_error)?
    {
        return crate::approval::approve_experiment(client, ns, &exp, by, yes, bounds).await;
    }
    let order = resolve(&client, ns, name).await?;
    let order_name = order.metadata.name.clone().unwrap_or_default();
    if order.spec.approved == Some(true) {
        println!(
            "runpodorder.ep.dev/{order_name} already approved by {}",
            order.spec.approved_by.as_deref().unwrap_or("someone")
        );
        return Ok(());
    }
    if let Some(why) = ended(&order) {
        return Err(why);
    }
    print!("{}", spend_summary(&order, spent_today(&client, ns).await?));
    if !yes && !confirm(&format!("approve as {by}? [y/N] "))? {
        return Err("not approved (answer y, or pass --yes)".into());
    }
    let patch = json!({"spec": {"approved": true, "approvedBy": by}});
    Api::<RunPodOrder>::namespaced(client, ns)
        .patch(&order_name, &PatchParams::apply(MANAGER), &Patch::Merge(&patch))
        .await
        .map_err(api_error)?;
    println!("runpodorder.ep.dev/{order_name} approved by {by}");
    Ok(())
}

/// Asks on the terminal; an empty answer or end of input is no.
pub fn confirm(question: &str) -> Result<bool, String> {
    use std::io::Write as _;
    print!("{question}");
    std::io::stdout().flush().map_err(|e| e.to_string())?;
    let mut answer = String::new();
    std::io::stdin().read_line(&mut answer).map_err(|e| e.to_string())?;
    Ok(matches!(answer.trim().to_ascii_lowercase().as_str(), "y" | "yes"))
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
