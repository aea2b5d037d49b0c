//! The claim's gates: the lease of an earlier attempt, the worker's affinity, one claim per run id.

use std::sync::Arc;

use chrono::{DateTime, TimeZone, Utc};
use ep_api::order::{HeartbeatStatus, OrderPhase};
use ep_api::{RunPodOrder, RunPodOrderStatus};

use crate::fixtures::quickstart_order;
use crate::order::claim::lease_gate;
use crate::reason::Reason;
use crate::time;

fn t(secs: i64) -> DateTime<Utc> {
    Utc.timestamp_opt(1_800_000_000 + secs, 0).unwrap()
}

/// Attempt 1 of the quickstart, its runner last heard at `beat` with a 60 s lease.
fn first_attempt(beat: i64, phase: OrderPhase, ended: bool) -> Arc<RunPodOrder> {
    let mut o = quickstart_order("quickstart-a1", 1);
    o.status = Some(RunPodOrderStatus {
        phase: Some(phase),
        run_id: Some("run-a1".into()),
        heartbeat: Some(HeartbeatStatus {
            time: time::to_k8s(t(beat)),
            seq: 9,
            pid: Some(7),
            gpu_ids: None,
            lease_expires_at: Some(time::to_k8s(t(beat + 60))),
            runner: None,
        }),
        outcome: ended.then(|| {
            serde_json::from_value(serde_json::json!({
                "state": "Failed", "reason": "HeartbeatLost", "finishedAt": "2027-01-15T08:00:00Z"
            }))
            .unwrap()
        }),
        ..RunPodOrderStatus::default()
    });
    Arc::new(o)
}

#[test]
fn a_new_attempt_is_not_claimed_while_the_earlier_runners_lease_holds() {
    let second = quickstart_order("quickstart-a2", 2);
    let earlier = first_attempt(0, OrderPhase::Draining, false);
    let b = lease_gate(&second, &[earlier.clone(), Arc::new(second.clone())], t(30)).unwrap_err();
    assert_eq!(b.reason, Reason::LeaseHeld);
    assert!(b.message.contains("quickstart-a1") && b.message.contains("run-a1"), "{}", b.message);
    // The lease passed, or the earlier attempt ended: the claim goes ahead.
    assert!(lease_gate(&second, &[earlier], t(61)).is_ok());
    assert!(lease_gate(&second, &[first_attempt(0, OrderPhase::Draining, true)], t(30)).is_ok());
    assert!(lease_gate(&second, &[first_attempt(0, OrderPhase::Deleted, false)], t(30)).is_ok());
    // Another experiment's live run is not this one's business.
    let mut other = (*first_attempt(0, OrderPhase::RunnerOnline, false)).clone();
    other.spec.experiment_ref.as_mut().unwrap().name = "other".into();
    assert!(lease_gate(&second, &[Arc::new(other)], t(30)).is_ok());
}

#[test]
fn the_claim_refuses_a_worker_or_node_type_outside_the_experiments_affinity() {
    use crate::order::claim::{ClaimStep, Existing, claim_gate};
    let o = quickstart_order("quickstart-a1", 1);
    let mut t = o.spec.run.clone().unwrap();
    assert_eq!(claim_gate(&o.spec, &t, &Existing::None), Ok(ClaimStep::Write));
    t.worker_affinity = Some(ep_api::experiment::WorkerAffinity { runtime: "slurm".into(), ..Default::default() });
    let b = claim_gate(&o.spec, &t, &Existing::None).unwrap_err();
    assert!(b.reason == Reason::WorkerMismatch && b.message.contains("runtime \"slurm\""), "{}", b.message);
    t.worker_affinity = Some(ep_api::experiment::WorkerAffinity { workers: vec!["w9".into()], ..Default::default() });
    let b = claim_gate(&o.spec, &t, &Existing::None).unwrap_err();
    assert!(b.reason == Reason::WorkerMismatch && b.message.contains("not among"), "{}", b.message);
    t.worker_affinity =
        Some(ep_api::experiment::WorkerAffinity { node_type: Some("a100-80g".into()), ..Default::default() });
    let b = claim_gate(&o.spec, &t, &Existing::None).unwrap_err();
    assert!(b.reason == Reason::WorkerMismatch && b.message.contains("nodeType a100-80g"), "{}", b.message);
}
