//! The pure part of the order lifecycle: admission, GPU choice, the verdict on a running pod and
//! the outcome of a drain. No clients, no clock: everything arrives as arguments.

use std::collections::BTreeMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use ep_api::RunPodOrderSpec;
use ep_api::volume::{Heartbeat, TerminalState};

use crate::runpod::{GpuOffer, Pod, PodStatus};
use crate::settings::{Policy, Settings};

/// Why an order cannot move on. `fatal` blocks end the order (FAILED); the rest wait for a
/// change of spec, settings, approval or live state.
#[derive(Clone, Debug, PartialEq)]
pub struct Block {
    pub reason: &'static str,
    pub message: String,
    pub fatal: bool,
}

fn wait(reason: &'static str, message: String) -> Block {
    Block { reason, message, fatal: false }
}

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

/// The order-contract gates: policy known, spot refused, approval present, budget allows.
pub fn admit(
    namespace: &str,
    spec: &RunPodOrderSpec,
    settings: &Settings,
    usage: &BudgetUsage,
) -> Result<Admitted, Block> {
    let (name, policy) =
        settings.policy(&spec.policy).map_err(|e| wait("UnknownPolicy", format!("spec.policy: {e}")))?;
    if spec.gpu.interruptible {
        return Err(Block {
            reason: "SpotUnavailable",
            message: "spec.gpu.interruptible: RunPod no longer offers interruptible (spot) pods; set it to false"
                .into(),
            fatal: true,
        });
    }
    if spec.gpu.cloud_type != policy.cloud_type && policy.cloud_type != ep_api::CloudType::All {
        return Err(wait(
            "PolicyViolation",
            format!(
                "spec.gpu.cloudType is {} but policy {name} allows only {}",
                spec.gpu.cloud_type.as_runpod(),
                policy.cloud_type.as_runpod()
            ),
        ));
    }
    if policy.requires_approval && spec.approved != Some(true) {
        return Err(wait(
            "AwaitingApproval",
            format!(
                "policy {name} requires approval before money is spent: an approver sets spec.approved (kubectl ep approve)"
            ),
        ));
    }
    if let Some(b) = settings.budget_for(namespace) {
        let want = u32::try_from(spec.gpu.count).unwrap_or(u32::MAX);
        if usage.active_gpus.saturating_add(want) > b.max_concurrent_gpus {
            return Err(wait(
                "BudgetExceeded",
                format!(
                    "namespace {namespace} holds {} GPUs and may hold {}: this order waits for one to end",
                    usage.active_gpus, b.max_concurrent_gpus
                ),
            ));
        }
        if usage.spent_last_day >= b.max_usd_per_day {
            return Err(wait(
                "BudgetExceeded",
                format!(
                    "namespace {namespace} spent ${:.2} in the last 24 hours; its budget is ${:.2}",
                    usage.spent_last_day, b.max_usd_per_day
                ),
            ));
        }
    }
    let max_price = match (spec.max_cost_per_hour, policy.max_cost_per_hour) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    };
    Ok(Admitted { policy_name: name.to_owned(), policy: policy.clone(), max_price })
}

/// The capability sensor: the author's GPU choices, resolved through the alias table and kept in
/// order when RunPod's live catalog lists them, with stock, within the price ceiling.
pub fn choose_gpus(
    requested: &[String],
    settings: &Settings,
    offers: &[GpuOffer],
    max_price: Option<f64>,
) -> Result<Vec<String>, Block> {
    let mut chosen = Vec::new();
    let mut unknown = Vec::new();
    let mut no_stock = Vec::new();
    let mut too_dear = Vec::new();
    for choice in requested {
        let id = settings.resolve_gpu(choice);
        let Some(offer) = offers.iter().find(|o| o.id == id || o.id.eq_ignore_ascii_case(id)) else {
            unknown.push(if id == choice { choice.clone() } else { format!("{choice} ({id})") });
            continue;
        };
        if !offer.stock.available() {
            no_stock.push(offer.id.clone());
            continue;
        }
        if let (Some(max), Some(price)) = (max_price, offer.price_per_hour)
            && price > max
        {
            too_dear.push(format!("{} at ${price:.2}/h", offer.id));
            continue;
        }
        if !chosen.contains(&offer.id) {
            chosen.push(offer.id.clone());
        }
    }
    if !chosen.is_empty() {
        return Ok(chosen);
    }
    if unknown.len() == requested.len() {
        let mut known: Vec<&str> = settings.gpu_aliases.keys().map(String::as_str).collect();
        known.sort_unstable();
        return Err(wait(
            "UnknownGpuType",
            format!(
                "spec.gpu.types: RunPod's catalog lists none of {}; use a RunPod gpu type id or an alias ({})",
                unknown.join(", "),
                known.join(", ")
            ),
        ));
    }
    if !too_dear.is_empty() && no_stock.is_empty() {
        return Err(wait(
            "OverPriceLimit",
            format!(
                "every GPU choice costs more than ${:.2}/h: {}",
                max_price.unwrap_or_default(),
                too_dear.join(", ")
            ),
        ));
    }
    let mut all = no_stock;
    all.extend(too_dear);
    all.extend(unknown);
    Err(wait("NoStock", format!("no GPU choice is available now: {}", all.join(", "))))
}

/// What is known about a launched run at one poll.
#[derive(Clone, Debug)]
pub struct RunView<'a> {
    /// The run's pod in a list fetched after the create was asked for (None: RunPod does not list it).
    pub pod: Option<&'a Pod>,
    pub heartbeat: Option<&'a Heartbeat>,
    pub terminal_present: bool,
    pub fencing_token: u64,
    pub pod_requested_at: DateTime<Utc>,
    pub online_at: Option<DateTime<Utc>>,
    pub stop_requested: bool,
    pub deleting: bool,
    pub heartbeat_timeout: Duration,
    pub start_deadline: Duration,
    pub max_runtime: Option<Duration>,
    pub max_lifetime: Duration,
    pub accrued_usd: f64,
    pub max_cost_usd: Option<f64>,
}

/// The verdict on a launched run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Not online yet; the reason says what it waits for.
    Starting(&'static str),
    /// The first heartbeat arrived with the pod's runtime up.
    Online,
    /// Online and heartbeating.
    Healthy,
    /// Collect results and end the pod, for this reason.
    Drain(&'static str),
}

fn elapsed(from: DateTime<Utc>, now: DateTime<Utc>) -> Duration {
    (now - from).to_std().unwrap_or_default()
}

/// Decides what a poll means for a launched run.
pub fn watch(v: &RunView<'_>, now: DateTime<Utc>) -> Verdict {
    if v.deleting {
        return Verdict::Drain("OrderDeleted");
    }
    if v.stop_requested {
        return Verdict::Drain("StopRequested");
    }
    if v.terminal_present {
        return Verdict::Drain("RunFinished");
    }
    let Some(pod) = v.pod else {
        return Verdict::Drain(if v.online_at.is_some() { "HeartbeatLost" } else { "PodGone" });
    };
    if matches!(pod.status, PodStatus::Exited | PodStatus::Terminated) {
        return Verdict::Drain("PodExited");
    }
    if let Some(hb) = v.heartbeat
        && hb.fencing_token != v.fencing_token
    {
        return Verdict::Drain("FencingTokenMismatch");
    }
    if elapsed(v.pod_requested_at, now) >= v.max_lifetime
        || v.online_at.zip(v.max_runtime).is_some_and(|(t, max)| elapsed(t, now) >= max)
    {
        return Verdict::Drain("LifetimeReached");
    }
    if v.max_cost_usd.is_some_and(|max| v.accrued_usd >= max) {
        return Verdict::Drain("CostLimitReached");
    }
    match (v.online_at, v.heartbeat) {
        (None, Some(_)) if pod.runtime.is_some() => Verdict::Online,
        (None, _) if elapsed(v.pod_requested_at, now) >= v.start_deadline => Verdict::Drain("RuntimeNeverAppeared"),
        (None, _) if pod.runtime.is_none() => Verdict::Starting("WaitingForRuntime"),
        (None, _) => Verdict::Starting("WaitingForHeartbeat"),
        (Some(_), Some(hb)) if elapsed(hb.time, now) > v.heartbeat_timeout => Verdict::Drain("HeartbeatLost"),
        (Some(_), Some(_)) => Verdict::Healthy,
        (Some(t), None) if elapsed(t, now) > v.heartbeat_timeout => Verdict::Drain("HeartbeatLost"),
        (Some(_), None) => Verdict::Healthy,
    }
}

/// What the volume showed at drain.
#[derive(Clone, Debug, PartialEq)]
pub enum Evidence {
    /// terminal.json and its artifacts verified.
    Verified { state: TerminalState, reason: String, exit_code: Option<i32>, metrics: BTreeMap<String, f64> },
    /// No terminal.json (the runner never finished: pod gone, killed, never started).
    NoTerminal,
    /// terminal.json or its artifacts disagree with each other or with the claim.
    Untrusted(String),
}

/// Outcome state and reason of a drained run.
pub fn outcome(drain_reason: &str, evidence: &Evidence) -> (&'static str, String, Option<String>) {
    match evidence {
        Evidence::Verified { state: TerminalState::Succeeded, .. } => ("Succeeded", "RunFinished".into(), None),
        Evidence::Verified { state: TerminalState::Stopped, reason, .. } => {
            ("Stopped", drain_reason.to_owned(), Some(reason.clone()))
        }
        Evidence::Verified { state, reason, exit_code, .. } => {
            let r = match state {
                TerminalState::TimedOut => "TimedOut",
                TerminalState::VerificationFailed => "PayloadVerificationFailed",
                _ if exit_code.is_some_and(|c| c != 0) => "NonZeroExit",
                _ => "ResultsContractBroken",
            };
            ("Failed", r.to_owned(), Some(reason.clone()))
        }
        Evidence::NoTerminal => (
            "Failed",
            drain_reason.to_owned(),
            Some("the runner left no terminal.json: the run did not finish".to_owned()),
        ),
        Evidence::Untrusted(why) => ("FailedStatusDivergence", "TerminalDivergence".into(), Some(why.clone())),
    }
}

#[cfg(test)]
mod tests;
