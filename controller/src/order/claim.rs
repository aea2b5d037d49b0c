//! SYNCED -> VERIFIED: the attempt claimed on the volume: the worker may take it, and its run spec
//! is written once and never over another claim's.

use std::sync::Arc;
use std::time::Duration;

use ep_api::experiment::RetentionClass;
use ep_api::order::{OrderPhase, RunTemplate};
use ep_api::volume::{self, CheckpointSpec, FORMAT_VERSION, ObjectIdentity, ResultsSpec, RunSpec, keys};
use ep_api::{RunPodOrder, RunPodOrderSpec};
use ep_volume::VolumeStore;
use sha2::{Digest, Sha256};

use super::pass::Pass;
use super::payload::{store_block, unbound_in};
use super::world::World;
use crate::error::Error;
use crate::reason::{Blocked, Reason};
use crate::settings::Settings;
use crate::time;
use kube::ResourceExt;

/// How long the runner waits between SIGTERM and SIGKILL when a run is stopped.
pub const STOP_GRACE_SECONDS: u32 = 20;

/// What the volume holds under the run's spec.json.
#[derive(Clone, Debug, PartialEq)]
pub enum Existing {
    None,
    Spec(Box<RunSpec>),
    Unreadable(String),
}

/// What to do about spec.json.
#[derive(Clone, Debug, PartialEq)]
pub enum ClaimStep {
    /// Write it (nothing there yet).
    Write,
    /// This claim wrote it already (a pass that crashed after the write).
    AlreadyClaimed,
}

/// The worker-affinity gate and attempt isolation: a run id is claimed once; a spec of another
/// claim is never overwritten.
pub fn claim_gate(spec: &RunPodOrderSpec, run: &RunTemplate, existing: &Existing) -> Result<ClaimStep, Blocked> {
    if let Some(aff) = &run.worker_affinity {
        if aff.runtime != "runpod" {
            return Err(Blocked::new(
                Reason::WorkerMismatch,
                format!("spec.run.workerAffinity.runtime {:?} is not runpod", aff.runtime),
            ));
        }
        if let Some(node) = &aff.node_type
            && !spec.gpu.types.contains(node)
        {
            return Err(Blocked::new(
                Reason::WorkerMismatch,
                format!(
                    "spec.gpu.types ({}) do not include the experiment's workerAffinity.nodeType {node}",
                    spec.gpu.types.join(", ")
                ),
            ));
        }
        if !aff.workers.is_empty() && !aff.workers.contains(&spec.worker_id) {
            return Err(Blocked::new(
                Reason::WorkerMismatch,
                format!(
                    "spec.workerId {} is not among the experiment's workers ({})",
                    spec.worker_id,
                    aff.workers.join(", ")
                ),
            ));
        }
    }
    let key = keys::run_file(&run.run_id, keys::SPEC);
    match existing {
        Existing::None => Ok(ClaimStep::Write),
        Existing::Spec(old) if i64::try_from(old.fencing_token).ok() == Some(run.fencing_token) => {
            Ok(ClaimStep::AlreadyClaimed)
        }
        Existing::Spec(old) => Err(Blocked::new(
            Reason::RunIdCollision,
            format!(
                "{key} already holds a claim with fencing token {} (this claim: {}): refusing to overwrite another attempt",
                old.fencing_token, run.fencing_token
            ),
        )),
        Existing::Unreadable(e) => {
            Err(Blocked::new(Reason::RunIdCollision, format!("{key} exists and does not parse: {e}")))
        }
    }
}

/// The claim's lease gate: while another attempt of the same experiment has not ended and its
/// runner's lease (last heartbeat + heartbeatTimeout) has not passed, no new attempt is claimed: a
/// runner that may still be alive keeps its run to itself.
pub fn lease_gate(
    this: &RunPodOrder,
    siblings: &[Arc<RunPodOrder>],
    now: chrono::DateTime<chrono::Utc>,
) -> Result<(), Blocked> {
    let Some(exp) = this.spec.experiment_ref.as_ref() else { return Ok(()) };
    for o in siblings {
        if o.metadata.uid == this.metadata.uid || o.spec.experiment_ref.as_ref().is_none_or(|e| e.name != exp.name) {
            continue;
        }
        let Some(st) = o.status.as_ref() else { continue };
        if st.outcome.is_some() || st.phase == Some(OrderPhase::Deleted) {
            continue;
        }
        let Some(until) = st.heartbeat.as_ref().and_then(|h| h.lease_expires_at.as_ref()).map(time::from_k8s) else {
            continue;
        };
        if until > now {
            return Err(Blocked::new(
                Reason::LeaseHeld,
                format!(
                    "order {} (run {}) has not ended and its runner's lease holds until {}: this attempt is claimed \
                     after it ends or the lease passes",
                    o.name_any(),
                    st.run_id.as_deref().unwrap_or("?"),
                    until.to_rfc3339()
                ),
            ));
        }
    }
    Ok(())
}

/// The run spec the runner executes.
pub fn run_spec(ns: &str, exp_name: &str, run: &RunTemplate, payload_id: &str, settings: &Settings) -> RunSpec {
    let results = run
        .results
        .clone()
        .unwrap_or(ep_api::experiment::ResultsContract { file: "results.json".into(), metrics: vec![] });
    let ck = run.checkpoints.clone();
    RunSpec {
        version: FORMAT_VERSION,
        run_id: run.run_id.clone(),
        attempt: u32::try_from(run.attempt).unwrap_or(0),
        experiment: ObjectIdentity {
            namespace: ns.to_owned(),
            name: exp_name.to_owned(),
            uid: run.experiment_uid.clone(),
        },
        fencing_token: u64::try_from(run.fencing_token).unwrap_or(0),
        payload_id: payload_id.to_owned(),
        command: run.entry.command.clone(),
        args: run.entry.args.clone(),
        env: run.env.iter().filter_map(|e| e.value.clone().map(|v| (e.name.clone(), v))).collect(),
        heartbeat_interval_seconds: u32::try_from(settings.heartbeat_interval.get().as_secs()).unwrap_or(10).max(1),
        max_runtime_seconds: run.limits.as_ref().and_then(|l| l.max_runtime.as_ref()).map(|d| d.get().as_secs()),
        stop_grace_seconds: STOP_GRACE_SECONDS,
        results: ResultsSpec { file: results.file, metrics: results.metrics },
        checkpoints: CheckpointSpec {
            retention: ck.as_ref().and_then(|c| c.retention).unwrap_or(RetentionClass::Keep),
            dir: ck.map_or_else(|| "checkpoints/".to_owned(), |c| c.path),
            resume_from: run.resume_from.clone(),
        },
    }
}

async fn existing<S: VolumeStore>(store: &S, key: &str) -> Result<Existing, ep_volume::StoreError> {
    Ok(match store.get(key).await? {
        None => Existing::None,
        Some(bytes) => match volume::parse::<RunSpec>(keys::SPEC, &bytes) {
            Ok(s) => Existing::Spec(Box::new(s)),
            Err(e) => Existing::Unreadable(e.to_string()),
        },
    })
}

/// SYNCED -> VERIFIED.
pub async fn run<W: World>(w: &W, pass: &mut Pass<'_>) -> Result<Option<Duration>, Error> {
    let Some(t) = pass.template() else { return Ok(pass.block(unbound_in(w, pass))) };
    let Some(payload_id) = pass.st.payload_id.clone() else {
        return Ok(pass.block(Blocked::new(Reason::PayloadMissing, "no payload was synced")));
    };
    let conn = match w.provider(&pass.order.spec.provider_ref).await {
        Ok(c) => c,
        Err(b) => return Ok(pass.block(b)),
    };
    if let Err(b) = lease_gate(pass.order, &w.orders(&pass.ns), pass.now) {
        return Ok(pass.block(b));
    }
    let key = keys::run_file(&t.run_id, keys::SPEC);
    let found = match existing(&conn.store, &key).await {
        Ok(f) => f,
        Err(e) => return store_block(&e).map(|b| pass.block(b)).ok_or(Error::Store(e)),
    };
    match claim_gate(&pass.order.spec, t, &found) {
        Err(b) => return Ok(pass.block(b)),
        Ok(ClaimStep::AlreadyClaimed) => {}
        Ok(ClaimStep::Write) => {
            let exp = pass.order.spec.experiment_ref.as_ref().map_or("", |e| e.name.as_str());
            let spec = run_spec(&pass.ns, exp, t, &payload_id, &w.settings());
            let body = serde_json::to_vec_pretty(&spec).map_err(Error::json("run spec"))?;
            let sha = hex::encode(Sha256::digest(&body));
            if let Err(e) = conn.store.put_bytes(&key, body.into(), &sha).await {
                return store_block(&e).map(|b| pass.block(b)).ok_or(Error::Store(e));
            }
        }
    }
    pass.st.run_id = Some(t.run_id.clone());
    pass.st.fencing_token = Some(t.fencing_token);
    pass.st.pod_name = Some(crate::names::pod_name(&t.run_id));
    let msg = format!("attempt {} claimed as run {} (fencing token {})", t.attempt, t.run_id, t.fencing_token);
    pass.enter(OrderPhase::Verified, Reason::Claimed, &msg);
    pass.ready(false, Reason::Launching, "creating the pod");
    Ok(Some(Duration::ZERO))
}
