//! REQUESTED -> PROVISIONED: the order contract (policy, spot, approval, budget) and the capability
//! sensor (the author's GPU choices against RunPod's live catalog, where the volume lives).

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use ep_api::order::OrderPhase;
use ep_api::{RunPodOrder, RunPodOrderSpec};

use super::pass::{Pass, is_terminal};
use super::world::World;
use crate::error::Error;
use crate::reason::{Blocked, Reason};
use crate::runpod::{GpuOffer, GpuQuery, RunPodApi};
use crate::settings::{Policy, Settings};
use crate::time;

/// What the namespace already holds (for the budget gate).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct BudgetUsage {
    /// GPUs held by other active orders of the namespace.
    pub active_gpus: u32,
    /// USD spent by orders of the namespace in the last 24 hours.
    pub spent_last_day: f64,
}

/// An admitted order: its policy and the price ceiling that applies.
#[derive(Clone, Debug, PartialEq)]
pub struct Admitted {
    pub policy_name: String,
    pub policy: Policy,
    pub max_price: Option<f64>,
}

/// GPUs held and money spent by the other orders of the namespace.
pub fn budget_usage(orders: &[Arc<RunPodOrder>], me: &str, now: DateTime<Utc>) -> BudgetUsage {
    let day_ago = now - chrono::Duration::hours(24);
    let mut usage = BudgetUsage::default();
    for o in orders.iter().filter(|o| o.metadata.name.as_deref() != Some(me)) {
        let Some(st) = &o.status else { continue };
        if st.phase.is_some_and(|p| p != OrderPhase::Requested) && !is_terminal(st.phase) {
            usage.active_gpus += u32::try_from(o.spec.gpu.count).unwrap_or(0);
        }
        if o.metadata.creation_timestamp.as_ref().is_some_and(|t| time::from_k8s(t) > day_ago) {
            usage.spent_last_day += st.accrued_cost_usd.unwrap_or(0.0);
        }
    }
    usage
}

/// The order-contract gates: policy known, spot refused, approval present, budget allows.
pub fn admit(
    namespace: &str,
    spec: &RunPodOrderSpec,
    settings: &Settings,
    usage: &BudgetUsage,
) -> Result<Admitted, Blocked> {
    let (name, policy) =
        settings.policy(&spec.policy).map_err(|e| Blocked::new(Reason::UnknownPolicy, format!("spec.policy: {e}")))?;
    if spec.gpu.interruptible {
        return Err(Blocked::new(
            Reason::SpotUnavailable,
            "spec.gpu.interruptible: RunPod no longer offers interruptible (spot) pods; set it to false",
        ));
    }
    if spec.gpu.cloud_type != policy.cloud_type && policy.cloud_type != ep_api::CloudType::All {
        return Err(Blocked::new(
            Reason::PolicyViolation,
            format!(
                "spec.gpu.cloudType is {} but policy {name} allows only {}",
                spec.gpu.cloud_type.as_runpod(),
                policy.cloud_type.as_runpod()
            ),
        ));
    }
    if policy.requires_approval && spec.approved != Some(true) {
        return Err(Blocked::new(
            Reason::AwaitingApproval,
            format!(
                "policy {name} requires approval before money is spent: an approver sets spec.approved (kubectl ep approve)"
            ),
        ));
    }
    check_budget(namespace, spec, settings, usage)?;
    let max_price = match (spec.max_cost_per_hour, policy.max_cost_per_hour) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    };
    Ok(Admitted { policy_name: name.to_owned(), policy: policy.clone(), max_price })
}

fn check_budget(
    namespace: &str,
    spec: &RunPodOrderSpec,
    settings: &Settings,
    usage: &BudgetUsage,
) -> Result<(), Blocked> {
    let Some(b) = settings.budget_for(namespace) else { return Ok(()) };
    let want = u32::try_from(spec.gpu.count).unwrap_or(u32::MAX);
    if usage.active_gpus.saturating_add(want) > b.max_concurrent_gpus {
        return Err(Blocked::new(
            Reason::BudgetExceeded,
            format!(
                "namespace {namespace} holds {} GPUs and may hold {}: this order waits for one to end",
                usage.active_gpus, b.max_concurrent_gpus
            ),
        ));
    }
    if usage.spent_last_day >= b.max_usd_per_day {
        return Err(Blocked::new(
            Reason::BudgetExceeded,
            format!(
                "namespace {namespace} spent ${:.2} in the last 24 hours; its budget is ${:.2}",
                usage.spent_last_day, b.max_usd_per_day
            ),
        ));
    }
    Ok(())
}

/// Pods run where their volume is: an order that names another data center waits.
pub fn check_data_center(spec: &RunPodOrderSpec, provider: &str, volume: &str, volume_dc: &str) -> Result<(), Blocked> {
    match &spec.data_center {
        Some(dc) if !dc.eq_ignore_ascii_case(volume_dc) => Err(Blocked::new(
            Reason::DataCenterMismatch,
            format!(
                "spec.dataCenter is {dc} but the network volume {volume} of provider {provider} is in {volume_dc}: pods run where their volume is"
            ),
        )),
        _ => Ok(()),
    }
}

/// The capability sensor: the author's GPU choices, resolved through the alias table and kept in
/// order when RunPod's live catalog lists them, with stock, within the price ceiling.
pub fn choose_gpus(
    requested: &[String],
    settings: &Settings,
    offers: &[GpuOffer],
    max_price: Option<f64>,
) -> Result<Vec<String>, Blocked> {
    let (mut chosen, mut unknown, mut no_stock, mut too_dear) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for choice in requested {
        let id = settings.resolve_gpu(choice);
        let Some(offer) = offers.iter().find(|o| o.id == id || o.id.eq_ignore_ascii_case(id)) else {
            unknown.push(if id == choice { choice.clone() } else { format!("{choice} ({id})") });
            continue;
        };
        if !offer.stock.available() {
            no_stock.push(offer.id.clone());
        } else if let (Some(max), Some(price)) = (max_price, offer.price_per_hour)
            && price > max
        {
            too_dear.push(format!("{} at ${price:.2}/h", offer.id));
        } else if !chosen.contains(&offer.id) {
            chosen.push(offer.id.clone());
        }
    }
    if !chosen.is_empty() {
        return Ok(chosen);
    }
    if unknown.len() == requested.len() {
        let mut known: Vec<&str> = settings.gpu_aliases.keys().map(String::as_str).collect();
        known.sort_unstable();
        return Err(Blocked::new(
            Reason::UnknownGpuType,
            format!(
                "spec.gpu.types: RunPod's catalog lists none of {}; use a RunPod gpu type id or an alias ({})",
                unknown.join(", "),
                known.join(", ")
            ),
        ));
    }
    if !too_dear.is_empty() && no_stock.is_empty() {
        return Err(Blocked::new(
            Reason::OverPriceLimit,
            format!(
                "every GPU choice costs more than ${:.2}/h: {}",
                max_price.unwrap_or_default(),
                too_dear.join(", ")
            ),
        ));
    }
    let all: Vec<String> = no_stock.into_iter().chain(too_dear).chain(unknown).collect();
    Err(Blocked::new(Reason::NoStock, format!("no GPU choice is available now: {}", all.join(", "))))
}

/// REQUESTED -> PROVISIONED.
pub async fn run<W: World>(w: &W, pass: &mut Pass<'_>) -> Result<Option<Duration>, Error> {
    let settings = w.settings();
    let spec = &pass.order.spec;
    let usage = budget_usage(&w.orders(&pass.ns), &pass.name, pass.now);
    let admitted = match admit(&pass.ns, spec, &settings, &usage) {
        Ok(a) => a,
        Err(b) => return Ok(pass.block(b)),
    };
    let conn = match w.provider(&spec.provider_ref).await {
        Ok(c) => c,
        Err(b) => return Ok(pass.block(b)),
    };
    if let Err(b) = check_data_center(spec, &conn.name, &conn.volume_id, &conn.data_center) {
        return Ok(pass.block(b));
    }
    let query = GpuQuery {
        id: None,
        gpu_count: spec.gpu.count,
        cloud_type: spec.gpu.cloud_type,
        data_center_id: Some(conn.data_center.clone()),
    };
    let offers = conn.api.gpu_types(&query).await?;
    let candidates = match choose_gpus(&spec.gpu.types, &settings, &offers, admitted.max_price) {
        Ok(c) => c,
        Err(b) => return Ok(pass.block(b)),
    };
    let msg = format!(
        "policy {}; GPU choices {}; data center {}",
        admitted.policy_name,
        candidates.join(", "),
        conn.data_center
    );
    pass.st.gpu_candidates = candidates;
    pass.st.gpu_choice = Some(0);
    pass.st.data_center = Some(conn.data_center.clone());
    pass.enter(OrderPhase::Provisioned, Reason::Provisioned, &msg);
    pass.ready(false, Reason::Provisioned, &msg);
    Ok(Some(Duration::ZERO))
}
