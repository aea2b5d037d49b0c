//! The experiment's own gates before an attempt is claimed: what the schema cannot check (policy,
//! spot, retention, worker affinity and node type), and which worker the attempt goes to.

use std::collections::BTreeMap;

use ep_api::Experiment;

use crate::reason::{Blocked, Reason};
use crate::settings::Settings;

/// Checks what the schema cannot: names resolve against the settings in force.
pub fn intake(exp: &Experiment, settings: &Settings) -> Result<(), Blocked> {
    let s = &exp.spec;
    if let Err(e) = settings.policy(&s.order.policy) {
        return Err(Blocked::new(Reason::UnknownPolicy, format!("spec.order.policy: {e}")));
    }
    if s.gpu.interruptible {
        return Err(Blocked::new(
            Reason::SpotUnavailable,
            "spec.gpu.interruptible: RunPod no longer offers interruptible (spot) pods; set it to false",
        ));
    }
    if s.checkpoints.as_ref().and_then(|c| c.retention).is_none() {
        return Err(Blocked::new(
            Reason::RetentionMissing,
            "spec.checkpoints.retention is required: Keep, KeepLast or Discard",
        ));
    }
    if let Some(a) = &s.worker_affinity {
        if a.runtime != "runpod" {
            let msg = format!("spec.workerAffinity.runtime {:?}: only runpod exists", a.runtime);
            return Err(Blocked::new(Reason::WorkerMismatch, msg));
        }
        let first = a.preferred_worker.as_ref().unwrap_or(&s.order.worker_id);
        if !a.workers.is_empty() && !a.workers.contains(first) {
            let field = if a.preferred_worker.is_some() {
                "spec.workerAffinity.preferredWorker"
            } else {
                "spec.order.workerId"
            };
            let msg = format!("{field} {first} is not among spec.workerAffinity.workers ({})", a.workers.join(", "));
            return Err(Blocked::new(Reason::WorkerMismatch, msg));
        }
        if let Some(node) = &a.node_type
            && !s.gpu.types.contains(node)
        {
            let msg =
                format!("spec.workerAffinity.nodeType {node} is not among spec.gpu.types ({})", s.gpu.types.join(", "));
            return Err(Blocked::new(Reason::WorkerMismatch, msg));
        }
    }
    Ok(())
}

/// The worker an attempt goes to: the preferred one (spec.workerAffinity.preferredWorker, else
/// spec.order.workerId); for an exclusive affinity the first of it and `workers` that no live order
/// holds (`busy`: worker -> the order holding it), else why the attempt waits.
pub fn choose_worker(exp: &Experiment, busy: &BTreeMap<String, String>) -> Result<String, Blocked> {
    let s = &exp.spec;
    let preferred = s.worker_affinity.as_ref().and_then(|a| a.preferred_worker.clone());
    let preferred = preferred.unwrap_or_else(|| s.order.worker_id.clone());
    let Some(a) = s.worker_affinity.as_ref().filter(|a| a.exclusive) else { return Ok(preferred) };
    let mut candidates = vec![preferred];
    candidates.extend(a.workers.iter().filter(|w| !candidates.contains(w)).cloned().collect::<Vec<_>>());
    if let Some(free) = candidates.iter().find(|w| !busy.contains_key(*w)) {
        return Ok(free.clone());
    }
    let held: Vec<String> = candidates.iter().map(|w| format!("{w} (order {})", busy[w])).collect();
    Err(Blocked::new(
        Reason::WorkerBusy,
        format!("spec.workerAffinity.exclusive: every allowed worker runs another order: {}", held.join(", ")),
    ))
}
