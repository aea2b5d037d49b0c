//! REQUESTED -> PROVISIONED -> SYNCED -> VERIFIED: nothing here spends money.

use std::collections::BTreeMap;
use std::time::Duration;

use ep_api::experiment::{PayloadSource as PayloadSpec, RetentionClass};
use ep_api::order::OrderPhase;
use ep_api::volume::{
    self, CheckpointSpec, FORMAT_VERSION, ObjectIdentity, PayloadManifest, ResultsSpec, RunSpec, keys,
};
use ep_api::{CONDITION_READY, Experiment, RunPodOrder, RunPodProvider, find_condition};
use ep_volume::sync::{SyncOptions, push};
use ep_volume::{Payload, PayloadSource, VolumeStore};
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::ConfigMap;
use kube::{Api, ResourceExt};
use sha2::{Digest, Sha256};

use super::Pass;
use super::decide::{Block, BudgetUsage, admit, choose_gpus};
use crate::context::Error;
use crate::mirror::Write;
use crate::provider::Conn;
use crate::registry::AttemptRow;
use crate::runpod::{GpuQuery, RunPodApi};
use crate::time;

fn wait(reason: &'static str, message: String) -> Block {
    Block { reason, message, fatal: false }
}

/// GPUs held and money spent by the other orders of the namespace.
async fn budget_usage(pass: &Pass<'_>) -> Result<BudgetUsage, Error> {
    let orders = Api::<RunPodOrder>::namespaced(pass.ctx.client.clone(), &pass.ns).list(&Default::default()).await?;
    let mut usage = BudgetUsage::default();
    let day_ago = pass.now - chrono::Duration::hours(24);
    for o in orders.items.iter().filter(|o| o.name_any() != pass.name) {
        let Some(st) = &o.status else { continue };
        let active = matches!(
            st.phase,
            Some(
                OrderPhase::Provisioned
                    | OrderPhase::Synced
                    | OrderPhase::Verified
                    | OrderPhase::RunnerOnline
                    | OrderPhase::Draining
            )
        );
        if active {
            usage.active_gpus += u32::try_from(o.spec.gpu.count).unwrap_or(0);
        }
        if o.creation_timestamp().is_some_and(|t| time::from_k8s(&t) > day_ago) {
            usage.spent_last_day += st.accrued_cost_usd.unwrap_or(0.0);
        }
    }
    Ok(usage)
}

/// The provider of the order, connected, if it reports Ready.
pub(super) async fn provider(pass: &mut Pass<'_>) -> Result<Result<std::sync::Arc<Conn>, Block>, Error> {
    let name = &pass.order.spec.provider_ref;
    let Some(p) = Api::<RunPodProvider>::all(pass.ctx.client.clone()).get_opt(name).await? else {
        return Ok(Err(wait("ProviderMissing", format!("spec.providerRef: RunPodProvider {name} does not exist"))));
    };
    let ready = p.status.as_ref().and_then(|s| find_condition(&s.conditions, CONDITION_READY));
    if let Some(c) = ready.filter(|c| c.status != "True") {
        return Ok(Err(wait("ProviderNotReady", format!("RunPodProvider {name} is not ready: {}", c.message))));
    }
    match pass.ctx.providers.get(&pass.ctx.client, name, &pass.ctx.metrics).await {
        Ok(c) => Ok(Ok(c)),
        Err(e) => Ok(Err(wait(e.reason(), e.to_string()))),
    }
}

/// REQUESTED -> PROVISIONED: the order contract and the capability sensor.
pub(super) async fn provision(pass: &mut Pass<'_>, deleting: bool) -> Result<Option<Duration>, Error> {
    if deleting || pass.order.spec.stop.is_some() {
        pass.enter(OrderPhase::Deleted, "StoppedBeforeLaunch", "ended before any pod was created");
        return Ok(None);
    }
    let settings = pass.ctx.settings.current();
    let usage = budget_usage(pass).await?;
    let admitted = match admit(&pass.ns, &pass.order.spec, &settings, &usage) {
        Ok(a) => a,
        Err(b) => return Ok(pass.block(&b)),
    };
    let conn = match provider(pass).await? {
        Ok(c) => c,
        Err(b) => return Ok(pass.block(&b)),
    };
    if let Some(dc) = &pass.order.spec.data_center
        && !dc.eq_ignore_ascii_case(&conn.data_center)
    {
        let b = wait(
            "DataCenterMismatch",
            format!(
                "spec.dataCenter is {dc} but the network volume {} of provider {} is in {}: pods run where their volume is",
                conn.volume_id, conn.name, conn.data_center
            ),
        );
        return Ok(pass.block(&b));
    }
    let gpu = &pass.order.spec.gpu;
    let query = GpuQuery {
        id: None,
        gpu_count: gpu.count,
        cloud_type: gpu.cloud_type,
        data_center_id: Some(conn.data_center.clone()),
    };
    let offers = conn.api.gpu_types(&query).await?;
    let candidates = match choose_gpus(&gpu.types, &settings, &offers, admitted.max_price) {
        Ok(c) => c,
        Err(b) => return Ok(pass.block(&b)),
    };
    pass.unblock();
    let msg = format!(
        "policy {}; GPU choices {}; data center {}",
        admitted.policy_name,
        candidates.join(", "),
        conn.data_center
    );
    pass.st.gpu_candidates = candidates;
    pass.st.gpu_choice = Some(0);
    pass.st.data_center = Some(conn.data_center.clone());
    pass.enter(OrderPhase::Provisioned, "Provisioned", &msg);
    pass.ready(false, "Provisioned", &msg);
    Ok(Some(Duration::ZERO))
}

/// Checks a pushed payload: its manifest is sealed and hashes to its id, and every file it names
/// is on the volume with the right size and sha256.
async fn verify_sealed<S: VolumeStore>(store: &S, id: &str) -> Result<Result<u64, Block>, Error> {
    let missing = |m: String| Ok(Err(wait("PayloadMissing", m)));
    let Some(bytes) = store.get(&keys::payload_manifest(id)).await? else {
        return missing(format!(
            "spec.payload.digest sha256:{id} is not sealed on the volume: run `kubectl ep push DIR` against this provider"
        ));
    };
    if hex::encode(Sha256::digest(&bytes)) != id {
        return missing(format!("the sealed manifest of payload sha256:{id} does not hash to its id"));
    }
    let manifest: PayloadManifest = match volume::parse(keys::PAYLOAD_DIR, &bytes) {
        Ok(m) => m,
        Err(e) => return missing(format!("the manifest of payload sha256:{id} does not parse: {e}")),
    };
    let heads: Vec<_> = manifest.files.iter().map(|f| blob_missing(store, f)).collect();
    let checks: Vec<Option<String>> = futures::stream::iter(heads).buffer_unordered(16).try_collect().await?;
    let bad: Vec<String> = checks.into_iter().flatten().collect();
    if !bad.is_empty() {
        return missing(format!("payload sha256:{id}: the volume lacks or holds a different {}", bad.join(", ")));
    }
    Ok(Ok(manifest.files.len() as u64))
}

/// The file's path when the volume lacks its blob or holds another content under its key.
async fn blob_missing<S: VolumeStore>(store: &S, f: &ep_api::volume::ManifestEntry) -> Result<Option<String>, Error> {
    let info = store.head(&keys::payload_blob(&f.sha256)).await?;
    let ok = info.is_some_and(|i| i.size == f.size && i.sha256.as_deref().is_none_or(|s| s == f.sha256));
    Ok((!ok).then(|| f.path.clone()))
}

/// Builds a ConfigMap payload (locations and excludes honoured) and pushes it.
async fn push_config_map(
    pass: &Pass<'_>,
    conn: &Conn,
    spec: &PayloadSpec,
    cm_name: &str,
) -> Result<Result<String, Block>, Error> {
    let Some(cm) = Api::<ConfigMap>::namespaced(pass.ctx.client.clone(), &pass.ns).get_opt(cm_name).await? else {
        return Ok(Err(wait(
            "PayloadMissing",
            format!("spec.payload.configMap: ConfigMap {}/{cm_name} does not exist", pass.ns),
        )));
    };
    let mut files: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    for (k, v) in cm.data.clone().unwrap_or_default() {
        files.insert(k, v.into_bytes());
    }
    for (k, v) in cm.binary_data.clone().unwrap_or_default() {
        files.insert(k, v.0);
    }
    let dir = pass.ctx.staging.join(format!("{}-{}", pass.ns, pass.name));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).map_err(|e| Error::Other(format!("staging {}: {e}", dir.display())))?;
    let raw = dir.join("files");
    let staged = Payload::from_memory(&files, &raw).and_then(|_| {
        Payload::build(&PayloadSource {
            root: raw.clone(),
            locations: spec.locations.clone(),
            excludes: spec.excludes.clone(),
            cache_dir: None,
        })
    });
    let payload = match staged {
        Ok(p) => p,
        Err(e) => return Ok(Err(wait("InvalidPayload", format!("spec.payload (ConfigMap {cm_name}): {e}")))),
    };
    let _permit = pass.ctx.sync_slots.acquire().await.map_err(|e| Error::Other(e.to_string()))?;
    let report = push(&conn.store, &payload, &SyncOptions::default(), &|_| {})
        .await
        .map_err(|e| Error::Other(format!("payload sync of ConfigMap {cm_name}: {e}")))?;
    let _ = std::fs::remove_dir_all(&dir);
    tracing::info!(order = %pass.name, payload = %report.payload_id, uploaded = report.uploaded_files, "payload synced");
    Ok(Ok(report.payload_id))
}

/// PROVISIONED -> SYNCED: the runner binary and the payload on the volume, verified.
pub(super) async fn sync(pass: &mut Pass<'_>) -> Result<Option<Duration>, Error> {
    let conn = match provider(pass).await? {
        Ok(c) => c,
        Err(b) => return Ok(pass.block(&b)),
    };
    if pass.ctx.runner.ensure_on(&conn.store).await? {
        let note = format!("uploaded {} to volume {}", pass.ctx.runner.key(), conn.volume_id);
        pass.event(false, "RunnerUploaded", note);
    }
    let Some(exp) = pass.experiment().await? else {
        let b = wait(
            "NothingRunnable",
            "spec.experimentRef names no existing experiment: there is no payload to sync".into(),
        );
        return Ok(pass.block(&b));
    };
    let payload = &exp.spec.payload;
    let id = match (&payload.digest, &payload.config_map) {
        (Some(d), _) => {
            let id = d.trim_start_matches("sha256:");
            match verify_sealed(&conn.store, id).await? {
                Ok(_) => id.to_owned(),
                Err(b) => return Ok(pass.block(&b)),
            }
        }
        (None, Some(cm)) => match push_config_map(pass, &conn, payload, &cm.name).await? {
            Ok(id) => id,
            Err(b) => return Ok(pass.block(&b)),
        },
        (None, None) => {
            let b = Block {
                reason: "InvalidPayload",
                message: format!("experiment {}: spec.payload names neither digest nor configMap", exp.name_any()),
                fatal: true,
            };
            return Ok(pass.block(&b));
        }
    };
    pass.unblock();
    let msg =
        format!("payload sha256:{id} and runner {} verified on volume {}", pass.ctx.runner.version, conn.volume_id);
    pass.st.payload_id = Some(id);
    pass.enter(OrderPhase::Synced, "Synced", &msg);
    Ok(Some(Duration::ZERO))
}

/// The run spec the runner executes.
fn run_spec(
    exp: &Experiment,
    attempt: i32,
    run_id: &str,
    token: i64,
    payload_id: &str,
    settings: &crate::settings::Settings,
) -> RunSpec {
    let s = &exp.spec;
    let results = s
        .results
        .clone()
        .unwrap_or(ep_api::experiment::ResultsContract { file: "results.json".into(), metrics: vec![] });
    let ck = s.checkpoints.clone();
    RunSpec {
        version: FORMAT_VERSION,
        run_id: run_id.to_owned(),
        attempt: u32::try_from(attempt).unwrap_or(0),
        experiment: ObjectIdentity {
            namespace: exp.namespace().unwrap_or_default(),
            name: exp.name_any(),
            uid: exp.uid().unwrap_or_default(),
        },
        fencing_token: u64::try_from(token).unwrap_or(0),
        payload_id: payload_id.to_owned(),
        command: s.entry.command.clone(),
        args: s.entry.args.clone(),
        env: s.env.iter().filter_map(|e| e.value.clone().map(|v| (e.name.clone(), v))).collect(),
        heartbeat_interval_seconds: u32::try_from(settings.heartbeat_interval.get().as_secs()).unwrap_or(10).max(1),
        max_runtime_seconds: s.limits.as_ref().and_then(|l| l.max_runtime.as_ref()).map(|d| d.get().as_secs()),
        stop_grace_seconds: 20,
        results: ResultsSpec { file: results.file, metrics: results.metrics },
        checkpoints: CheckpointSpec {
            retention: ck.as_ref().and_then(|c| c.retention).unwrap_or(RetentionClass::Keep),
            dir: ck.map_or_else(|| "checkpoints/".to_owned(), |c| c.path),
        },
    }
}

/// SYNCED -> VERIFIED: a runnable workload for this worker, the attempt claimed, the run spec on
/// the volume (never overwriting another claim's).
pub(super) async fn claim(pass: &mut Pass<'_>) -> Result<Option<Duration>, Error> {
    if pass.order.spec.stop.is_some() {
        pass.enter(OrderPhase::Deleted, "StoppedBeforeLaunch", "ended before any pod was created");
        return Ok(None);
    }
    let Some(exp) = pass.experiment().await? else {
        return Ok(pass.block(&wait("NothingRunnable", "spec.experimentRef names no existing experiment".into())));
    };
    let spec = &pass.order.spec;
    let Some(cur) = exp.status.as_ref().and_then(|s| s.current_attempt.clone()) else {
        return Ok(pass.block(&wait(
            "NothingRunnable",
            format!("experiment {} has no attempt waiting for a worker", exp.name_any()),
        )));
    };
    if spec.attempt != Some(cur.attempt) || cur.order.as_deref() != Some(pass.name.as_str()) {
        let b = wait(
            "NotBound",
            format!(
                "experiment {} attempt {} is bound to order {}, not to this one (spec.attempt {:?})",
                exp.name_any(),
                cur.attempt,
                cur.order.as_deref().unwrap_or("none"),
                spec.attempt
            ),
        );
        return Ok(pass.block(&b));
    }
    if let Some(aff) = &exp.spec.worker_affinity {
        if aff.runtime != "runpod" {
            let b = Block {
                reason: "WorkerMismatch",
                message: format!(
                    "experiment {}: spec.workerAffinity.runtime {:?} is not runpod",
                    exp.name_any(),
                    aff.runtime
                ),
                fatal: true,
            };
            return Ok(pass.block(&b));
        }
        if !aff.workers.is_empty() && !aff.workers.contains(&spec.worker_id) {
            let b = wait(
                "WorkerMismatch",
                format!(
                    "spec.workerId {} is not among the experiment's workers ({})",
                    spec.worker_id,
                    aff.workers.join(", ")
                ),
            );
            return Ok(pass.block(&b));
        }
    }
    let Some(payload_id) = pass.st.payload_id.clone() else {
        return Ok(pass.block(&wait("PayloadMissing", "no payload was synced".into())));
    };
    let conn = match provider(pass).await? {
        Ok(c) => c,
        Err(b) => return Ok(pass.block(&b)),
    };
    let settings = pass.ctx.settings.current();
    let run = run_spec(&exp, cur.attempt, &cur.run_id, cur.fencing_token, &payload_id, &settings);
    let key = keys::run_file(&cur.run_id, keys::SPEC);
    // Attempt isolation: a run id is claimed once; a spec of another claim is never overwritten.
    if let Some(existing) = conn.store.get(&key).await? {
        match volume::parse::<RunSpec>(keys::SPEC, &existing) {
            Ok(old) if old.fencing_token == run.fencing_token => {}
            Ok(old) => {
                let b = Block {
                    reason: "RunIdCollision",
                    message: format!(
                        "{key} already holds a claim with fencing token {} (this claim: {}): refusing to overwrite another attempt",
                        old.fencing_token, run.fencing_token
                    ),
                    fatal: true,
                };
                return Ok(pass.block(&b));
            }
            Err(e) => {
                let b = Block {
                    reason: "RunIdCollision",
                    message: format!("{key} exists and does not parse: {e}"),
                    fatal: true,
                };
                return Ok(pass.block(&b));
            }
        }
    } else {
        let body = serde_json::to_vec_pretty(&run).map_err(|e| Error::Other(e.to_string()))?;
        let sha = hex::encode(Sha256::digest(&body));
        conn.store.put_bytes(&key, body.into(), &sha).await?;
    }
    pass.unblock();
    pass.st.run_id = Some(cur.run_id.clone());
    pass.st.fencing_token = Some(cur.fencing_token);
    pass.st.pod_name = Some(crate::names::pod_name(&cur.run_id));
    pass.ctx.mirror.send(Write::Attempt(attempt_row(pass, "CLAIMED", None)));
    let msg = format!("attempt {} claimed as run {} (fencing token {})", cur.attempt, cur.run_id, cur.fencing_token);
    pass.enter(OrderPhase::Verified, "Claimed", &msg);
    pass.ready(false, "Launching", "creating the pod");
    Ok(Some(Duration::ZERO))
}

/// The registry row of this order's attempt.
pub(super) fn attempt_row(pass: &Pass<'_>, status: &str, exit_code: Option<i32>) -> AttemptRow {
    let st = &pass.st;
    let outcome = st.outcome.as_ref();
    let claimed =
        st.transitions.iter().find(|t| t.phase == OrderPhase::Verified).map_or(pass.now, |t| time::from_k8s(&t.at));
    AttemptRow {
        namespace: pass.ns.clone(),
        experiment: pass.order.spec.experiment_ref.as_ref().map(|e| e.name.clone()).unwrap_or_default(),
        run_id: st.run_id.clone().unwrap_or_default(),
        attempt: pass.order.spec.attempt.unwrap_or(1),
        fencing_token: st.fencing_token.unwrap_or(0),
        status: status.to_owned(),
        order_name: Some(pass.name.clone()),
        worker_id: Some(pass.order.spec.worker_id.clone()),
        pod_id: st.pod_id.clone(),
        pid: st.heartbeat.as_ref().and_then(|h| h.pid).and_then(|p| i32::try_from(p).ok()),
        gpu_id: st.heartbeat.as_ref().and_then(|h| h.gpu_ids.clone()),
        lease_expires_at: None,
        exit_code,
        reason: outcome.map(|o| o.reason.clone()).or_else(|| st.drain_reason.clone()),
        result_f1: outcome.and_then(|o| o.metrics.get("f1").copied()),
        result_auc: outcome.and_then(|o| o.metrics.get("auc").copied()),
        receipt: outcome.and_then(|o| o.artifacts.as_ref().map(|a| a.receipt.clone())),
        cost_usd: st.accrued_cost_usd,
        started_at: claimed,
        finished_at: outcome.map(|o| time::from_k8s(&o.finished_at)),
        extra: serde_json::json!({}),
    }
}
