//! VERIFIED -> RUNNER_ONLINE -> DRAINING -> DELETED: the paid part.

use std::collections::BTreeMap;
use std::time::Duration;

use ep_api::Experiment;
use ep_api::experiment::{ArtifactRef, RetentionClass, UsageSummary, VerifiedArtifacts};
use ep_api::order::{HeartbeatStatus, ObtainedGpu, OrderPhase, RunOutcome};
use ep_api::volume::{self, Heartbeat, Progress, RunSpec, keys};
use ep_volume::VolumeStore;
use ep_volume::collect::{CollectError, collect};
use k8s_openapi::api::core::v1::Secret;
use kube::{Api, ResourceExt};

use super::Pass;
use super::decide::{Block, Evidence, RunView, Verdict, outcome, watch};
use super::sync::{attempt_row, provider};
use crate::context::Error;
use crate::mirror::Write;
use crate::names::{ENV_ORDER, ENV_OWNER_UID, ENV_RUN_ID};
use crate::provider::Conn;
use crate::registry::{HeartbeatRow, ProgressRow, SessionRow};
use crate::runpod::{Pod, PodSpec, PodStatus, RunPodApi, RunPodError};
use crate::time;

/// How long a create whose answer was lost may take to show up in the pod list.
const CREATE_SETTLE: Duration = Duration::from_secs(30);
/// How often a starting or draining pod is looked at.
const FAST: Duration = Duration::from_secs(2);
/// Extra wait for terminal.json after the runner's own stop grace.
const DRAIN_MARGIN: Duration = Duration::from_secs(15);

/// Requeue of a running order: the shared pod-list refresh wakes every order each poll interval,
/// so its own timer is only a backstop (a second wake-up per interval would double the S3 reads).
fn backstop(poll: Duration) -> Duration {
    poll * 5
}

/// Pods of this run in `pods`: by the derived name or the run id tag; terminated ones excluded.
fn matching<'p>(pods: &'p [Pod], pod_name: &str, run_id: &str) -> Vec<&'p Pod> {
    pods.iter()
        .filter(|p| p.status != PodStatus::Terminated)
        .filter(|p| p.name == pod_name || p.env.get(ENV_RUN_ID).is_some_and(|r| r == run_id))
        .collect()
}

/// Keeps one pod of the run (the recorded one, else the first listed); terminates the others.
async fn dedupe<'p>(pass: &mut Pass<'_>, conn: &Conn, found: Vec<&'p Pod>) -> Result<Option<&'p Pod>, Error> {
    let keep = found.iter().find(|p| pass.st.pod_id.as_deref() == Some(p.id.as_str())).or(found.first()).copied();
    for p in found.iter().filter(|p| Some(p.id.as_str()) != keep.map(|k| k.id.as_str())) {
        tracing::warn!(order = %pass.name, pod = %p.id, "a second pod for one run: terminating the duplicate");
        conn.api.terminate_pod(&p.id).await?;
        pass.event(true, "DuplicatePodTerminated", format!("pod {} duplicated run {}; terminated", p.id, p.name));
        conn.invalidate().await;
    }
    Ok(keep)
}

fn record_pod(pass: &mut Pass<'_>, pod: &Pod) {
    let adopted = pass.st.pod_id.as_deref() != Some(pod.id.as_str());
    pass.st.pod_id = Some(pod.id.clone());
    pass.st.machine_id.clone_from(&pod.machine_id);
    pass.st.cost_per_hour = Some(pod.cost_per_hr);
    if let Some(t) = &pod.gpu_type_id {
        pass.st.gpu = Some(ObtainedGpu {
            type_id: t.clone(),
            display_name: pod.gpu_display_name.clone().unwrap_or_else(|| t.clone()),
            count: pod.gpu_count,
        });
    }
    if pod.data_center_id.is_some() {
        pass.st.data_center.clone_from(&pod.data_center_id);
    }
    if adopted {
        pass.event(
            false,
            "PodBound",
            format!("pod {} ({}) serves run {}", pod.id, pod.name, pass.st.run_id.clone().unwrap_or_default()),
        );
    }
}

async fn pod_env(pass: &Pass<'_>, exp: &Experiment) -> Result<Result<BTreeMap<String, String>, Block>, Error> {
    let mut env = BTreeMap::new();
    let secrets = Api::<Secret>::namespaced(pass.ctx.client.clone(), &pass.ns);
    for e in &exp.spec.env {
        match (&e.value, &e.secret_key_ref) {
            (Some(v), _) => {
                env.insert(e.name.clone(), v.clone());
            }
            (None, Some(r)) => {
                let value = secrets.get_opt(&r.name).await?.and_then(|s| {
                    s.data.and_then(|d| d.get(&r.key).map(|b| String::from_utf8_lossy(&b.0).into_owned()))
                });
                let Some(v) = value else {
                    return Ok(Err(Block {
                        reason: "SecretMissing",
                        message: format!("spec.env {}: Secret {}/{} has no key {:?}", e.name, pass.ns, r.name, r.key),
                        fatal: false,
                    }));
                };
                env.insert(e.name.clone(), v);
            }
            (None, None) => {}
        }
    }
    Ok(Ok(env))
}

/// The pod's start command: copy the runner off the volume (S3 objects carry no exec bit) and run it.
/// The copy is named by the run id: `$$` is 1 in every container, and pods sharing a host's /tmp
/// must not overwrite each other's running binary.
fn start_command(mount: &str, runner_key: &str, run_id: &str) -> Vec<String> {
    let script = format!(
        "set -e; b=/tmp/ep-runner-{run_id}; cp '{mount}/{runner_key}' \"$b\"; chmod 0755 \"$b\"; exec \"$b\" run --run-id '{run_id}' --workspace '{mount}'"
    );
    vec!["/bin/sh".into(), "-c".into(), script]
}

/// Creates the pod for the current GPU choice. The status write before the call is what makes a
/// crash here safe: the next pass finds `podRequestedAt` and adopts by name.
async fn create(pass: &mut Pass<'_>, conn: &Conn) -> Result<Option<Duration>, Error> {
    let run_id = pass.st.run_id.clone().unwrap_or_default();
    let pod_name = pass.st.pod_name.clone().unwrap_or_else(|| crate::names::pod_name(&run_id));
    let settings = pass.ctx.settings.current();
    let Ok((_, policy)) = settings.policy(&pass.order.spec.policy) else {
        return Ok(pass.block(&Block {
            reason: "UnknownPolicy",
            message: "spec.policy is no longer known".into(),
            fatal: false,
        }));
    };
    let policy = policy.clone();
    let choice = usize::try_from(pass.st.gpu_choice.unwrap_or(0)).unwrap_or(0);
    let Some(gpu) = pass.st.gpu_candidates.get(choice).cloned() else {
        return Ok(pass.block(&Block { reason: "NoCapacity", message: "no GPU choice left".into(), fatal: false }));
    };
    let Some(exp) = pass.experiment().await? else {
        let b = Block {
            reason: "NothingRunnable",
            message: "spec.experimentRef names no existing experiment".into(),
            fatal: false,
        };
        return Ok(pass.block(&b));
    };
    let mut env = match pod_env(pass, &exp).await? {
        Ok(e) => e,
        Err(b) => return Ok(pass.block(&b)),
    };
    env.insert(ENV_OWNER_UID.into(), pass.order.uid().unwrap_or_default());
    env.insert(ENV_RUN_ID.into(), run_id.clone());
    env.insert(ENV_ORDER.into(), format!("{}/{}", pass.ns, pass.name));
    let lifetime = pass.order.spec.max_lifetime.as_ref().map_or(policy.max_lifetime.get(), ep_api::GoDuration::get);
    let terminate_after = conn
        .api
        .supports_terminate_after()
        .then(|| pass.now + chrono::Duration::from_std(lifetime + policy.terminate_grace.get()).unwrap_or_default());
    let spec = PodSpec {
        name: pod_name.clone(),
        image: exp.spec.image.clone(),
        gpu_type_id: gpu.clone(),
        gpu_count: pass.order.spec.gpu.count,
        cloud_type: pass.order.spec.gpu.cloud_type,
        data_center_id: Some(conn.data_center.clone()),
        network_volume_id: Some(conn.volume_id.clone()),
        volume_mount_path: conn.mount_path.clone(),
        container_disk_gb: i32::try_from(policy.container_disk_gb).unwrap_or(20),
        env,
        ports: vec![],
        start_command: Some(start_command(&conn.mount_path, &pass.ctx.runner.key(), &run_id)),
        terminate_after,
    };
    pass.st.pod_requested_at = Some(time::to_k8s(pass.now));
    pass.save().await?;
    let result = conn.api.create_pod(&spec).await;
    conn.invalidate().await;
    match result {
        Ok(pod) => {
            pass.unblock();
            record_pod(pass, &pod);
            pass.ready(false, "WaitingForRuntime", &format!("pod {} created on {gpu}; waiting for the runner", pod.id));
            Ok(Some(FAST))
        }
        Err(e @ RunPodError::Capacity { .. }) => {
            pass.st.pod_requested_at = None;
            let next = choice + 1;
            if next < pass.st.gpu_candidates.len() {
                let to = pass.st.gpu_candidates[next].clone();
                pass.st.gpu_choice = i32::try_from(next).ok();
                pass.event(true, "TryingNextGpu", format!("{gpu}: {}; trying {to}", e.message()));
                Ok(Some(Duration::ZERO))
            } else {
                pass.st.gpu_choice = Some(0);
                let msg = format!(
                    "no capacity for any GPU choice ({}); last: {}",
                    pass.st.gpu_candidates.join(", "),
                    e.message()
                );
                let wait = pass.block(&Block { reason: "NoCapacity", message: msg, fatal: false });
                Ok(wait.map(|d| d.max(Duration::from_secs(30))))
            }
        }
        Err(e @ RunPodError::InsufficientBalance { .. }) => {
            pass.st.pod_requested_at = None;
            Ok(pass.block(&Block { reason: "InsufficientBalance", message: e.to_string(), fatal: false }))
        }
        Err(RunPodError::Transient { may_have_applied: true, message }) => {
            // The create may have landed: the next pass lists pods and adopts before trying again.
            tracing::warn!(order = %pass.name, %message, "create outcome unknown; will adopt by name");
            Ok(Some(FAST))
        }
        Err(e) if e.is_retryable() => {
            pass.st.pod_requested_at = None;
            Err(e.into())
        }
        Err(e) => {
            pass.st.pod_requested_at = None;
            Ok(pass.block(&Block {
                reason: "CreateRejected",
                message: format!("RunPod refused the pod: {e}"),
                fatal: true,
            }))
        }
    }
}

async fn read<T: serde::de::DeserializeOwned + volume::Versioned, S: VolumeStore>(
    store: &S,
    run_id: &str,
    file: &str,
) -> Result<Option<T>, Error> {
    let Some(bytes) = store.get(&keys::run_file(run_id, file)).await? else { return Ok(None) };
    match volume::parse::<T>(file, &bytes) {
        Ok(v) => Ok(Some(v)),
        Err(e) => {
            tracing::warn!(run = run_id, file, error = %e, "unreadable run file ignored");
            Ok(None)
        }
    }
}

fn accrued(pass: &Pass<'_>) -> f64 {
    let (Some(rate), Some(from)) = (pass.st.cost_per_hour, pass.st.pod_requested_at.as_ref()) else {
        return pass.st.accrued_cost_usd.unwrap_or(0.0);
    };
    let hours = (pass.now - time::from_k8s(from)).num_seconds().max(0) as f64 / 3600.0;
    (rate * hours * 10_000.0).round() / 10_000.0
}

fn mirror_run(pass: &Pass<'_>, hb: Option<&Heartbeat>, running: bool) {
    let worker = pass.order.spec.worker_id.clone();
    let run_id = pass.st.run_id.clone().unwrap_or_default();
    if let Some(hb) = hb {
        pass.ctx.mirror.send(Write::Heartbeat(HeartbeatRow {
            worker_id: worker.clone(),
            last_seen: hb.time,
            running_jobs: i32::from(running),
            run_id: Some(run_id.clone()),
            pod_id: pass.st.pod_id.clone(),
            seq: i64::try_from(hb.seq).ok(),
            pid: hb.pid.and_then(|p| i32::try_from(p).ok()),
            gpu_ids: gpu_ids(hb),
            fencing_token: i64::try_from(hb.fencing_token).ok(),
        }));
    }
    if let Some(online) = pass.st.online_at.as_ref() {
        pass.ctx.mirror.send(Write::Session(SessionRow {
            worker_id: worker,
            run_id,
            pod_id: pass.st.pod_id.clone(),
            started_at: time::from_k8s(online),
            ended_at: pass.st.outcome.as_ref().map(|o| time::from_k8s(&o.finished_at)),
            end_reason: pass.st.outcome.as_ref().map(|o| o.reason.clone()),
        }));
    }
}

fn gpu_ids(hb: &Heartbeat) -> Option<String> {
    (!hb.gpus.is_empty()).then(|| hb.gpus.iter().map(|g| g.id.clone()).collect::<Vec<_>>().join(","))
}

/// VERIFIED and RUNNER_ONLINE: create or adopt the pod, then watch it.
pub(super) async fn run(pass: &mut Pass<'_>, deleting: bool) -> Result<Option<Duration>, Error> {
    let conn = match provider(pass).await? {
        Ok(c) => c,
        Err(b) => return Ok(pass.block(&b)),
    };
    let run_id = pass.st.run_id.clone().unwrap_or_default();
    let pod_name = pass.st.pod_name.clone().unwrap_or_default();
    let settings = pass.ctx.settings.current();
    let poll = settings.poll_interval.get();
    let Some(requested) = pass.st.pod_requested_at.as_ref().map(time::from_k8s) else {
        if pass.order.spec.stop.is_some() {
            pass.enter(OrderPhase::Deleted, "StoppedBeforeLaunch", "ended before any pod was created");
            return Ok(None);
        }
        // Adopt before create: a pod of this run may exist from a pass that never recorded it.
        let list = conn.pods(Duration::ZERO).await?;
        let found = matching(&list.pods, &pod_name, &run_id);
        if found.is_empty() {
            return create(pass, &conn).await;
        }
        let pod = dedupe(pass, &conn, found).await?;
        if let Some(pod) = pod {
            pass.event(
                false,
                "PodAdopted",
                format!("found pod {} of run {run_id}; adopted instead of creating", pod.id),
            );
            pass.st.pod_requested_at = Some(time::to_k8s(pass.now));
            record_pod(pass, pod);
        }
        return Ok(Some(FAST));
    };
    let list = conn.pods_since(requested, poll).await?;
    let found = matching(&list.pods, &pod_name, &run_id);
    let pod = dedupe(pass, &conn, found).await?.cloned();
    if pod.is_none() && pass.st.pod_id.is_none() {
        // A create whose answer was lost: wait for it to show up, then try again.
        if (pass.now - requested).to_std().unwrap_or_default() < CREATE_SETTLE {
            return Ok(Some(FAST));
        }
        pass.st.pod_requested_at = None;
        pass.event(
            true,
            "CreateLost",
            "RunPod never listed the pod of a create whose answer was lost; creating again".into(),
        );
        return Ok(Some(Duration::ZERO));
    }
    if let Some(p) = &pod {
        record_pod(pass, p);
    }
    let hb: Option<Heartbeat> = read(&conn.store, &run_id, keys::HEARTBEAT).await?;
    let terminal_present = conn.store.head(&keys::run_file(&run_id, keys::TERMINAL)).await?.is_some();
    pass.st.accrued_cost_usd = Some(accrued(pass));
    if let Some(h) = &hb {
        pass.st.heartbeat = Some(HeartbeatStatus {
            time: time::to_k8s(h.time),
            seq: i64::try_from(h.seq).unwrap_or(i64::MAX),
            pid: h.pid.map(i64::from),
            gpu_ids: gpu_ids(h),
        });
    }
    let exp = pass.experiment().await?;
    let max_runtime = exp
        .as_ref()
        .and_then(|e| e.spec.limits.as_ref())
        .and_then(|l| l.max_runtime.as_ref())
        .map(ep_api::GoDuration::get);
    let max_cost = exp.as_ref().and_then(|e| e.spec.limits.as_ref()).and_then(|l| l.max_cost_usd);
    let policy_lifetime = settings
        .policy(&pass.order.spec.policy)
        .map(|(_, p)| p.max_lifetime.get())
        .unwrap_or(Duration::from_secs(12 * 3600));
    let view = RunView {
        pod: pod.as_ref(),
        heartbeat: hb.as_ref(),
        terminal_present,
        fencing_token: u64::try_from(pass.st.fencing_token.unwrap_or(0)).unwrap_or(0),
        pod_requested_at: requested,
        online_at: pass.st.online_at.as_ref().map(time::from_k8s),
        stop_requested: pass.order.spec.stop.is_some(),
        deleting,
        heartbeat_timeout: settings.heartbeat_timeout.get(),
        start_deadline: settings.runtime_start_deadline.get(),
        max_runtime,
        max_lifetime: pass.order.spec.max_lifetime.as_ref().map_or(policy_lifetime, ep_api::GoDuration::get),
        accrued_usd: pass.st.accrued_cost_usd.unwrap_or(0.0),
        max_cost_usd: max_cost,
    };
    let verdict = watch(&view, pass.now);
    match verdict {
        Verdict::Starting(reason) => {
            pass.ready(false, reason, &format!("pod {} is starting", pass.st.pod_id.clone().unwrap_or_default()));
            Ok(Some(FAST))
        }
        Verdict::Online => {
            pass.st.online_at = Some(time::to_k8s(pass.now));
            let msg = format!("runner heartbeating in pod {}", pass.st.pod_id.clone().unwrap_or_default());
            pass.enter(OrderPhase::RunnerOnline, "RunnerOnline", &msg);
            pass.ready(true, "RunnerOnline", &msg);
            pass.ctx.mirror.send(Write::Attempt(attempt_row(pass, "RUNNING", None)));
            mirror_run(pass, hb.as_ref(), true);
            Ok(Some(backstop(poll)))
        }
        Verdict::Healthy => {
            mirror_run(pass, hb.as_ref(), true);
            pass.ctx.mirror.send(Write::Attempt(attempt_row(pass, "RUNNING", None)));
            let progress = conn.store.get(&keys::run_file(&run_id, keys::PROGRESS)).await.ok().flatten();
            if let Some(p) = progress.and_then(|b| serde_json::from_slice::<Progress>(&b).ok()) {
                pass.ctx.mirror.send(Write::Progress(ProgressRow {
                    run_id: run_id.clone(),
                    step: i64::try_from(p.step).unwrap_or(i64::MAX),
                    total: p.total.and_then(|t| i64::try_from(t).ok()),
                    metrics: serde_json::to_value(&p.metrics).unwrap_or_default(),
                    reported_at: pass.now,
                }));
            }
            Ok(Some(backstop(poll)))
        }
        Verdict::Drain(reason) => {
            pass.st.drain_reason = Some(reason.to_owned());
            pass.st.drain_started_at = Some(time::to_k8s(pass.now));
            if let Some(p) = pod.as_ref().filter(|p| p.status == PodStatus::Running && !terminal_present) {
                // SIGTERM through RunPod's stop: the runner writes terminal.json within its grace.
                if let Err(e) = conn.api.stop_pod(&p.id).await {
                    tracing::warn!(order = %pass.name, pod = %p.id, error = %e, "stop before drain failed");
                }
                conn.invalidate().await;
            }
            if pass.st.online_at.is_none()
                && let Some(h) = hb.as_ref().filter(|h| h.fencing_token == view.fencing_token)
            {
                // A short run can finish between two polls: its heartbeats prove it came online.
                pass.st.online_at = Some(time::to_k8s(h.time.min(pass.now)));
                let msg = format!("runner heartbeated in pod {}", pass.st.pod_id.clone().unwrap_or_default());
                pass.enter(OrderPhase::RunnerOnline, "RunnerOnline", &msg);
            }
            let warn = !matches!(reason, "RunFinished" | "StopRequested");
            let msg = format!("draining run {run_id}: {reason}");
            pass.enter(OrderPhase::Draining, reason, &msg);
            pass.ready(false, "Draining", &msg);
            if warn {
                pass.event(true, reason, msg);
            }
            pass.ctx.mirror.send(Write::Attempt(attempt_row(pass, "DRAINING", None)));
            Ok(Some(Duration::ZERO))
        }
    }
}

/// Applies the checkpoint retention class to the run's checkpoints (known keys from terminal.json:
/// the volume is never listed). Returns what was kept and deleted, and the deleted paths.
async fn apply_retention<S: VolumeStore>(
    store: &S,
    run_id: &str,
    spec: &RunSpec,
    artifacts: &[String],
) -> Result<(String, Vec<String>), Error> {
    let dir = spec.checkpoints.dir.trim_matches('/');
    let mut ckpts: Vec<&String> = artifacts.iter().filter(|p| p.starts_with(&format!("{dir}/"))).collect();
    ckpts.sort();
    let delete: Vec<String> = match spec.checkpoints.retention {
        RetentionClass::Keep => vec![],
        RetentionClass::KeepLast => ckpts.iter().rev().skip(1).map(|s| (*s).clone()).collect(),
        RetentionClass::Discard => ckpts.iter().map(|s| (*s).clone()).collect(),
    };
    for p in &delete {
        store.delete(&format!("{}{}/{p}", keys::run_prefix(run_id), keys::ARTIFACTS_DIR)).await?;
    }
    let class = format!("{:?}", spec.checkpoints.retention);
    Ok((format!("{class}: kept {}, deleted {}", ckpts.len() - delete.len(), delete.len()), delete))
}

/// DRAINING -> DELETED: results verified and recorded before the pod is terminated; then confirmed gone.
pub(super) async fn drain(pass: &mut Pass<'_>) -> Result<Option<Duration>, Error> {
    let conn = match provider(pass).await? {
        Ok(c) => c,
        Err(b) => return Ok(pass.block(&b)),
    };
    let run_id = pass.st.run_id.clone().unwrap_or_default();
    let pod_name = pass.st.pod_name.clone().unwrap_or_default();
    let drain_reason = pass.st.drain_reason.clone().unwrap_or_else(|| "Drain".into());
    let started = pass.st.drain_started_at.as_ref().map_or(pass.now, time::from_k8s);
    let list = conn.pods_since(started, pass.ctx.poll()).await?;
    let found = matching(&list.pods, &pod_name, &run_id);
    let pod = dedupe(pass, &conn, found).await?.cloned();
    if pass.st.outcome.is_none() {
        let spec: Option<RunSpec> = read(&conn.store, &run_id, keys::SPEC).await?;
        let terminal_present = conn.store.head(&keys::run_file(&run_id, keys::TERMINAL)).await?.is_some();
        // A stopped pod reads EXITED at once while its runner still has its grace period to write
        // terminal.json: wait for it as long as RunPod still lists the pod and a runner was heard from.
        let alive = pod.is_some() && pass.st.heartbeat.is_some();
        let grace = Duration::from_secs(u64::from(spec.as_ref().map_or(20, |s| s.stop_grace_seconds))) + DRAIN_MARGIN;
        if !terminal_present && alive && (pass.now - started).to_std().unwrap_or_default() < grace {
            pass.ready(false, "Draining", "waiting for the runner's terminal.json");
            return Ok(Some(FAST));
        }
        let (evidence, collected) = match (&spec, terminal_present) {
            (Some(s), true) => {
                let contract = &s.results;
                let token = u64::try_from(pass.st.fencing_token.unwrap_or(0)).unwrap_or(0);
                match collect(&conn.store, &run_id, token, contract).await {
                    Ok(c) => (
                        Evidence::Verified {
                            state: c.terminal.state,
                            reason: c.terminal.reason.clone(),
                            exit_code: c.terminal.exit_code,
                            metrics: c.metrics.clone(),
                        },
                        Some(c),
                    ),
                    Err(CollectError::Store(e)) => return Err(e.into()),
                    Err(e) => (Evidence::Untrusted(e.to_string()), None),
                }
            }
            (None, true) => {
                (Evidence::Untrusted(format!("{} is missing while terminal.json exists", keys::SPEC)), None)
            }
            (_, false) => (Evidence::NoTerminal, None),
        };
        let (state, reason, message) = outcome(&drain_reason, &evidence);
        let mut out = RunOutcome {
            state: state.to_owned(),
            reason,
            message,
            exit_code: collected.as_ref().and_then(|c| c.terminal.exit_code),
            metrics: collected.as_ref().map(|c| c.metrics.clone()).unwrap_or_default(),
            artifacts: None,
            usage: None,
            retention: None,
            finished_at: time::to_k8s(collected.as_ref().map_or(pass.now, |c| c.terminal.finished_at)),
        };
        if let (Some(c), Some(s)) = (&collected, &spec) {
            let paths: Vec<String> = c.terminal.artifacts.iter().map(|a| a.path.clone()).collect();
            let (retention, deleted) = apply_retention(&conn.store, &run_id, s, &paths).await?;
            let prefix = format!("{}{}/", keys::run_prefix(&run_id), keys::ARTIFACTS_DIR);
            let kept: Vec<ArtifactRef> = c
                .terminal
                .artifacts
                .iter()
                .filter(|a| !deleted.contains(&a.path))
                .map(|a| ArtifactRef {
                    key: format!("{prefix}{}", a.path),
                    size: i64::try_from(a.size).unwrap_or(i64::MAX),
                    sha256: a.sha256.clone(),
                })
                .collect();
            out.artifacts = Some(VerifiedArtifacts {
                receipt: c.receipt.clone(),
                prefix,
                omitted: i64::try_from(kept.len().saturating_sub(100)).unwrap_or(0),
                items: kept.into_iter().take(100).collect(),
            });
            out.retention = Some(retention);
            let u = &c.usage;
            out.usage = Some(UsageSummary {
                wall_seconds: u.wall_seconds,
                cpu_seconds: u.cpu_user_seconds + u.cpu_system_seconds,
                peak_rss_bytes: i64::try_from(u.peak_rss_bytes).unwrap_or(i64::MAX),
                gpu_util_percent: (!u.gpus.is_empty())
                    .then(|| u.gpus.iter().map(|g| g.util_percent_mean).sum::<f64>() / u.gpus.len() as f64),
                gpu_memory_peak_mib: u.gpus.iter().map(|g| g.memory_peak_mib).reduce(f64::max),
            });
        }
        pass.st.accrued_cost_usd = Some(accrued(pass));
        pass.ctx.metrics.spent_usd.inc_by(pass.st.accrued_cost_usd.unwrap_or(0.0));
        let warning = state != "Succeeded";
        let note = format!(
            "run {run_id} {state} ({}){}",
            out.reason,
            out.message.as_ref().map(|m| format!(": {m}")).unwrap_or_default()
        );
        pass.st.outcome = Some(out);
        pass.event(warning, if warning { "RunFailed" } else { "RunSucceeded" }, note);
        let status = match state {
            "Succeeded" => "SUCCEEDED",
            "Stopped" => "STOPPED",
            _ => "FAILED",
        };
        let exit = pass.st.outcome.as_ref().and_then(|o| o.exit_code);
        pass.ctx.mirror.send(Write::Attempt(attempt_row(pass, status, exit)));
        let hb: Option<Heartbeat> = read(&conn.store, &run_id, keys::HEARTBEAT).await?;
        mirror_run(pass, hb.as_ref(), false);
        // The verdict is durable before the pod is ended.
        pass.save().await?;
    }
    if let Some(p) = &pod {
        conn.api.terminate_pod(&p.id).await?;
        conn.invalidate().await;
        return Ok(Some(FAST));
    }
    let gone = match &pass.st.pod_id {
        Some(id) => conn.api.get_pod(id).await?.is_none_or(|p| p.status == PodStatus::Terminated),
        None => true,
    };
    if !gone {
        return Ok(Some(FAST));
    }
    let o = pass.st.outcome.clone();
    let msg = o.as_ref().map_or_else(String::new, |o| format!("pod terminated and gone; run {}", o.state));
    pass.enter(OrderPhase::Deleted, "PodGone", &msg);
    let ok = o.as_ref().is_some_and(|o| o.state == "Succeeded");
    let (reason, text) = if ok { ("Succeeded", msg.clone()) } else { ("RunFailed", msg.clone()) };
    pass.ready(ok, reason, &text);
    Ok(None)
}
