//! REQUESTED -> PROVISIONED: the order contract (policy, spot, approval, budget) and the capability
//! sensor (the author's GPU choices against RunPod's live catalog, where the volume lives).

use std::time::Duration;

use ep_api::RunPodOrderSpec;
use ep_api::experiment::Approval;
use ep_api::order::OrderPhase;

use super::ledger;
use super::pass::Pass;
use super::world::World;
use crate::error::Error;
use crate::reason::{Blocked, Reason};
use crate::runpod::{GpuOffer, GpuQuery, RunPodApi};
use crate::settings::{Policy, Settings};

/// An admitted order: its policy, the price ceiling that applies, and who approved the spending.
#[derive(Clone, Debug, PartialEq)]
pub struct Admitted {
    pub policy_name: String,
    pub policy: Policy,
    pub max_price: Option<f64>,
    /// The approver in force (None: the policy needs no approval).
    pub approved_by: Option<String>,
}

/// The order-contract gates: policy known, spot refused, cloud allowed, and approval present,
/// given by the order itself or by the envelope of its experiment's approval.
pub fn admit(spec: &RunPodOrderSpec, settings: &Settings, envelope: Option<&Approval>) -> Result<Admitted, Blocked> {
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
    let (approved_by, ceiling) = if !policy.requires_approval {
        (None, None)
    } else if spec.approved == Some(true) {
        (Some(spec.approved_by.clone().unwrap_or_else(|| "unknown".to_owned())), None)
    } else if let Some(a) = envelope.filter(|_| spec.experiment_ref.is_some()) {
        within_envelope(spec, settings, a)?;
        (Some(format!("{} (experiment envelope)", a.approved_by)), a.envelope.max_cost_per_hour)
    } else {
        return Err(Blocked::new(
            Reason::AwaitingApproval,
            format!(
                "policy {name} requires approval before money is spent: an approver runs `kubectl ep approve` on the order or its experiment"
            ),
        ));
    };
    let max_price = [spec.max_cost_per_hour, policy.max_cost_per_hour, ceiling].into_iter().flatten().reduce(f64::min);
    Ok(Admitted { policy_name: name.to_owned(), policy: policy.clone(), max_price, approved_by })
}

/// Whether an experiment's order lies inside the envelope its approver approved: its attempt
/// number, its GPU choices and what earlier attempts already spent. The price bound applies as
/// a ceiling on the GPU choice.
fn within_envelope(spec: &RunPodOrderSpec, settings: &Settings, a: &Approval) -> Result<(), Blocked> {
    let env = &a.envelope;
    let outside = |what: String| {
        Blocked::new(
            Reason::AwaitingApproval,
            format!(
                "{what}: outside the envelope {} approved; an approver approves again (kubectl ep approve)",
                a.approved_by
            ),
        )
    };
    let run = spec.run.as_ref();
    let attempt = run.map(|r| r.attempt).or(spec.attempt).unwrap_or(1);
    if let Some(max) = env.max_attempts.filter(|m| attempt > *m) {
        return Err(outside(format!("attempt {attempt} is past the {max} attempts approved")));
    }
    if !env.gpu_types.is_empty() {
        let allowed: Vec<&str> = env.gpu_types.iter().map(|g| settings.resolve_gpu(g)).collect();
        let extra: Vec<&str> = spec
            .gpu
            .types
            .iter()
            .map(String::as_str)
            .filter(|g| !allowed.iter().any(|a| a.eq_ignore_ascii_case(settings.resolve_gpu(g))))
            .collect();
        if !extra.is_empty() {
            return Err(outside(format!(
                "spec.gpu.types {} not among the approved {}",
                extra.join(", "),
                env.gpu_types.join(", ")
            )));
        }
    }
    let before = run.and_then(|r| r.spent_before_usd).unwrap_or(0.0);
    if let Some(max) = env.max_total_usd.filter(|m| before >= *m) {
        return Err(outside(format!("earlier attempts spent ${before:.2} of the ${max:.2} approved")));
    }
    Ok(())
}

/// The most an order can cost: its dearest GPU choice for its whole lifetime.
pub fn projected_cost(candidates: &[String], offers: &[GpuOffer], max_price: Option<f64>, lifetime: Duration) -> f64 {
    let dearest = candidates
        .iter()
        .filter_map(|id| offers.iter().find(|o| &o.id == id)?.price_per_hour)
        .chain(max_price)
        .fold(0.0, f64::max);
    dearest * lifetime.as_secs_f64() / 3600.0
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
    let envelope = spec.experiment_ref.as_ref().and_then(|e| w.experiment_approval(&pass.ns, &e.name));
    let admitted = match admit(spec, &settings, envelope.as_ref()) {
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
    let lifetime = super::launch::max_lifetime(spec, &admitted.policy);
    let reserved = projected_cost(&candidates, &offers, admitted.max_price, lifetime);
    if let Some(budget) = settings.budget_for(&pass.ns) {
        let entry = ledger::Entry {
            order: pass.name.clone(),
            experiment: spec.experiment_ref.as_ref().map(|e| e.name.clone()),
            admitted_at: pass.now,
            gpus: u32::try_from(spec.gpu.count).unwrap_or(u32::MAX),
            reserved_usd: (reserved * 100.0).ceil() / 100.0,
            spent_usd: 0.0,
            open: true,
            orders: 0,
        };
        if let Err(b) = w.reserve(&pass.ns, &pass.uid, entry, budget).await? {
            return Ok(pass.block(b));
        }
        pass.st.reserved_usd = Some((reserved * 100.0).ceil() / 100.0);
    }
    let msg = format!(
        "policy {}; GPU choices {}; data center {}{}",
        admitted.policy_name,
        candidates.join(", "),
        conn.data_center,
        admitted.approved_by.as_deref().map(|a| format!("; approved by {a}")).unwrap_or_default()
    );
    pass.st.gpu_candidates = candidates;
    pass.st.gpu_choice = Some(0);
    pass.st.data_center = Some(conn.data_center.clone());
    pass.st.approved_by = admitted.approved_by;
    pass.enter(OrderPhase::Provisioned, Reason::Provisioned, &msg);
    pass.ready(false, Reason::Provisioned, &msg);
    Ok(Some(Duration::ZERO))
}
