//! VERIFIED -> RUNNER_ONLINE -> DRAINING: the paid pod created (or adopted), then watched until
//! the run finishes, is stopped, or a limit or a loss ends it.

use std::collections::BTreeMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use ep_api::order::{HeartbeatStatus, ObtainedGpu, OrderPhase, ProgressStatus, RunTemplate};
use ep_api::volume::{self, Heartbeat, Progress, keys};
use ep_volume::VolumeStore;

use super::pass::Pass;
use super::pod::{self, Identity, Observed};
use super::world::World;
use crate::error::Error;
use crate::names::{ENV_ORDER, ENV_OWNER_UID, ENV_RUN_ID};
use crate::pool::Conn;
use crate::reason::{Blocked, FAST, Reason};
use crate::runpod::{Pod, PodSpec, PodStatus, RunPodApi, RunPodError};
use crate::settings::{Policy, Settings};
use crate::time;

/// What is known about a launched run at one poll.
#[derive(Clone, Debug)]
pub struct RunView<'a> {
    /// The run's pod in a list fetched after the create returned (None: RunPod does not list it).
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
    /// USD this attempt has cost so far plus what earlier attempts cost.
    pub spent_usd: f64,
    pub max_cost_usd: Option<f64>,
}

/// The verdict on a launched run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Not online yet; the reason says what it waits for.
    Starting(Reason),
    /// The first heartbeat arrived with the pod's runtime up.
    Online,
    /// Online and heartbeating.
    Healthy,
    /// Collect results and end the pod, for this reason.
    Drain(Reason),
}

fn elapsed(from: DateTime<Utc>, now: DateTime<Utc>) -> Duration {
    (now - from).to_std().unwrap_or_default()
}

/// Decides what a poll means for a launched run.
pub fn watch(v: &RunView<'_>, now: DateTime<Utc>) -> Verdict {
    if v.deleting {
        return Verdict::Drain(Reason::OrderDeleted);
    }
    if v.stop_requested {
        return Verdict::Drain(Reason::StopRequested);
    }
    if v.terminal_present {
        return Verdict::Drain(Reason::RunFinished);
    }
    let Some(pod) = v.pod else {
        return Verdict::Drain(if v.online_at.is_some() { Reason::PodVanished } else { Reason::PodGone });
    };
    if matches!(pod.status, PodStatus::Exited | PodStatus::Terminated) {
        return Verdict::Drain(Reason::PodExited);
    }
    if let Some(hb) = v.heartbeat
        && hb.fencing_token != v.fencing_token
    {
        return Verdict::Drain(Reason::FencingTokenMismatch);
    }
    if elapsed(v.pod_requested_at, now) >= v.max_lifetime
        || v.online_at.zip(v.max_runtime).is_some_and(|(t, max)| elapsed(t, now) >= max)
    {
        return Verdict::Drain(Reason::LifetimeReached);
    }
    if v.max_cost_usd.is_some_and(|max| v.spent_usd >= max) {
        return Verdict::Drain(Reason::CostLimitReached);
    }
    match (v.online_at, v.heartbeat) {
        (None, Some(_)) if pod.runtime.is_some() => Verdict::Online,
        (None, _) if elapsed(v.pod_requested_at, now) >= v.start_deadline => {
            Verdict::Drain(Reason::RuntimeNeverAppeared)
        }
        (None, _) if pod.runtime.is_none() => Verdict::Starting(Reason::WaitingForRuntime),
        (None, _) => Verdict::Starting(Reason::WaitingForHeartbeat),
        (Some(_), Some(hb)) if elapsed(hb.time, now) > v.heartbeat_timeout => Verdict::Drain(Reason::HeartbeatLost),
        (Some(_), Some(_)) => Verdict::Healthy,
        (Some(t), None) if elapsed(t, now) > v.heartbeat_timeout => Verdict::Drain(Reason::HeartbeatLost),
        (Some(_), None) => Verdict::Healthy,
    }
}

/// The longest this order's pod may live: the order's own maxLifetime, else its policy's.
pub fn max_lifetime(spec: &ep_api::RunPodOrderSpec, policy: &Policy) -> Duration {
    spec.max_lifetime.as_ref().map_or(policy.max_lifetime.get(), ep_api::GoDuration::get)
}

/// The pod's start command: copy the runner off the volume (S3 objects carry no exec bit) and run
/// it. The copy is named by the run id: pods sharing a host's /tmp must not overwrite each other's
/// running binary.
pub fn start_command(mount: &str, runner_key: &str, run_id: &str) -> Vec<String> {
    let script = format!(
        "set -e; b=/tmp/ep-runner-{run_id}; cp '{mount}/{runner_key}' \"$b\"; chmod 0755 \"$b\"; exec \"$b\" run --run-id '{run_id}' --workspace '{mount}'"
    );
    vec!["/bin/sh".into(), "-c".into(), script]
}

/// What the pod is asked to be: the derived name, the ownership tags, the volume, the start
/// command, and the dead-man's switch (terminateAfter) wherever the transport carries it.
pub struct PodPlan<'a> {
    pub run: &'a RunTemplate,
    pub gpu: &'a str,
    pub policy: &'a Policy,
    pub order: &'a ep_api::RunPodOrderSpec,
    pub owner_uid: &'a str,
    pub order_key: String,
    pub volume: (&'a str, &'a str, &'a str),
    pub runner_key: &'a str,
    pub env: BTreeMap<String, String>,
    pub terminate_after_supported: bool,
}

/// The create request for a plan (pure: `now` is given).
pub fn pod_spec(p: PodPlan<'_>, now: DateTime<Utc>) -> PodSpec {
    let (volume_id, data_center, mount) = p.volume;
    let mut env = p.env;
    env.insert(ENV_OWNER_UID.into(), p.owner_uid.to_owned());
    env.insert(ENV_RUN_ID.into(), p.run.run_id.clone());
    env.insert(ENV_ORDER.into(), p.order_key);
    let lifetime = max_lifetime(p.order, p.policy) + p.policy.terminate_grace.get();
    let terminate_after =
        p.terminate_after_supported.then(|| now + chrono::Duration::from_std(lifetime).unwrap_or_default());
    PodSpec {
        name: crate::names::pod_name(&p.run.run_id),
        image: p.run.image.clone(),
        gpu_type_id: p.gpu.to_owned(),
        gpu_count: p.order.gpu.count,
        cloud_type: p.order.gpu.cloud_type,
        data_center_id: Some(data_center.to_owned()),
        network_volume_id: Some(volume_id.to_owned()),
        volume_mount_path: mount.to_owned(),
        container_disk_gb: i32::try_from(p.policy.container_disk_gb).unwrap_or(20),
        env,
        ports: vec![],
        start_command: Some(start_command(mount, p.runner_key, &p.run.run_id)),
        terminate_after,
    }
}

/// What a create call's result means for the order.
#[derive(Clone, Debug, PartialEq)]
pub enum CreateStep {
    Created,
    /// No machine for this choice: try the next one.
    TryNext(usize),
    /// Capacity, balance or a refusal: the order blocks (the request did not open a pod).
    Block(Blocked),
    /// The create may have reached RunPod: the next pass lists pods and adopts before any retry.
    OutcomeUnknown,
    /// A transient failure before RunPod acted: retry with backoff.
    Retry,
}

/// Capacity falls through the author's choices in order; every other failure is classified.
pub fn after_create(result: &Result<Pod, RunPodError>, choice: usize, candidates: &[String]) -> CreateStep {
    match result {
        Ok(_) => CreateStep::Created,
        Err(RunPodError::Capacity { .. }) if choice + 1 < candidates.len() => CreateStep::TryNext(choice + 1),
        Err(e @ RunPodError::Capacity { .. }) => CreateStep::Block(Blocked::new(
            Reason::NoCapacity,
            format!("no capacity for any GPU choice ({}); last: {}", candidates.join(", "), e.message()),
        )),
        Err(e @ RunPodError::InsufficientBalance { .. }) => {
            CreateStep::Block(Blocked::new(Reason::InsufficientBalance, e.to_string()))
        }
        Err(RunPodError::Transient { may_have_applied: true, .. }) => CreateStep::OutcomeUnknown,
        Err(e) if e.is_retryable() => CreateStep::Retry,
        Err(e) => CreateStep::Block(Blocked::new(Reason::CreateRejected, format!("RunPod refused the pod: {e}"))),
    }
}

/// The training command's environment, secrets resolved.
async fn pod_env<W: World>(
    w: &W,
    ns: &str,
    run: &RunTemplate,
) -> Result<Result<BTreeMap<String, String>, Blocked>, Error> {
    let mut env = BTreeMap::new();
    for e in &run.env {
        match (&e.value, &e.secret_key_ref) {
            (Some(v), _) => {
                env.insert(e.name.clone(), v.clone());
            }
            (None, Some(r)) => match w.secret_key(ns, &r.name, &r.key).await? {
                Some(v) => {
                    env.insert(e.name.clone(), v);
                }
                None => {
                    let msg = format!("spec.run.env {}: Secret {ns}/{} has no key {:?}", e.name, r.name, r.key);
                    return Ok(Err(Blocked::new(Reason::SecretMissing, msg)));
                }
            },
            (None, None) => {}
        }
    }
    Ok(Ok(env))
}

fn record_pod(pass: &mut Pass<'_>, pod: &Pod) {
    let bound = pass.st.pod_id.as_deref() != Some(pod.id.as_str());
    pass.st.pod_id = Some(pod.id.clone());
    pass.st.machine_id.clone_from(&pod.machine_id);
    pass.st.cost_per_hour = Some(pod.cost_per_hr);
    if let Some(t) = &pod.gpu_type_id {
        let display_name = pod.gpu_display_name.clone().unwrap_or_else(|| t.clone());
        pass.st.gpu = Some(ObtainedGpu { type_id: t.clone(), display_name, count: pod.gpu_count });
    }
    if pod.data_center_id.is_some() {
        pass.st.data_center.clone_from(&pod.data_center_id);
    }
    if bound {
        let run = pass.st.run_id.clone().unwrap_or_default();
        pass.notice(Reason::PodBound, format!("pod {} ({}) serves run {run}", pod.id, pod.name));
    }
}

/// Creates the pod for the current GPU choice. The status write before the call is what makes a
/// crash here safe: the next pass finds `podRequestedAt` and adopts by name.
async fn create<W: World>(
    w: &W,
    pass: &mut Pass<'_>,
    conn: &Conn<W::Api, W::Store>,
    run: &RunTemplate,
) -> Result<Option<Duration>, Error> {
    let settings = w.settings();
    let Ok((_, policy)) = settings.policy(&pass.order.spec.policy) else {
        let msg = format!("spec.policy {:?} is no longer in the settings", pass.order.spec.policy);
        return Ok(pass.block(Blocked::new(Reason::UnknownPolicy, msg)));
    };
    let choice = usize::try_from(pass.st.gpu_choice.unwrap_or(0)).unwrap_or(0);
    let Some(gpu) = pass.st.gpu_candidates.get(choice).cloned() else {
        return Ok(pass.block(Blocked::new(Reason::NoCapacity, "no GPU choice left")));
    };
    let env = match pod_env(w, &pass.ns, run).await? {
        Ok(e) => e,
        Err(b) => return Ok(pass.block(b)),
    };
    let runner_key = w.runner().key();
    let plan = PodPlan {
        run,
        gpu: &gpu,
        policy,
        order: &pass.order.spec,
        owner_uid: &pass.uid,
        order_key: format!("{}/{}", pass.ns, pass.name),
        volume: (&conn.volume_id, &conn.data_center, &conn.mount_path),
        runner_key: &runner_key,
        env,
        terminate_after_supported: conn.api.supports_terminate_after(),
    };
    let spec = pod_spec(plan, pass.now);
    pass.st.pod_requested_at = Some(time::to_k8s(pass.now));
    pass.save(w).await?;
    crate::failpoint::hit("order.create.before");
    let result = conn.api.create_pod(&spec).await;
    conn.sequence.created(&pass.uid);
    conn.invalidate().await;
    crate::failpoint::hit("order.create.after");
    match after_create(&result, choice, &pass.st.gpu_candidates) {
        CreateStep::Created => {
            let pod = result.map_err(Error::RunPod)?;
            pass.unblock();
            record_pod(pass, &pod);
            pass.ready(
                false,
                Reason::WaitingForRuntime,
                &format!("pod {} created on {gpu}; waiting for the runner", pod.id),
            );
            Ok(Some(FAST))
        }
        CreateStep::TryNext(next) => {
            pass.st.pod_requested_at = None;
            let to = pass.st.gpu_candidates[next].clone();
            pass.st.gpu_choice = i32::try_from(next).ok();
            let why = result.err().map(|e| e.message().to_owned()).unwrap_or_default();
            pass.notice(Reason::TryingNextGpu, format!("{gpu}: {why}; trying {to}"));
            Ok(Some(Duration::ZERO))
        }
        CreateStep::Block(b) => {
            pass.st.pod_requested_at = None;
            pass.st.gpu_choice = Some(0);
            Ok(pass.block(b))
        }
        CreateStep::OutcomeUnknown => {
            tracing::warn!(order = %pass.name, "create outcome unknown; the next pass adopts by name");
            Ok(Some(FAST))
        }
        CreateStep::Retry => {
            pass.st.pod_requested_at = None;
            Err(result.err().map_or(Error::ShuttingDown, Error::RunPod))
        }
    }
}

async fn read<T, S>(store: &S, run_id: &str, file: &str) -> Result<Option<T>, Error>
where
    T: serde::de::DeserializeOwned + volume::Versioned,
    S: VolumeStore,
{
    let Some(bytes) = store.get(&keys::run_file(run_id, file)).await? else { return Ok(None) };
    match volume::parse::<T>(file, &bytes) {
        Ok(v) => Ok(Some(v)),
        Err(e) => {
            tracing::warn!(run = run_id, file, error = %e, "unreadable run file ignored");
            Ok(None)
        }
    }
}

/// USD this order's pod has cost: its price times the time since the create was asked for.
pub fn accrued(rate: Option<f64>, since: Option<DateTime<Utc>>, now: DateTime<Utc>, before: Option<f64>) -> f64 {
    let (Some(rate), Some(from)) = (rate, since) else { return before.unwrap_or(0.0) };
    let hours = (now - from).num_seconds().max(0) as f64 / 3600.0;
    (rate * hours * 10_000.0).round() / 10_000.0
}

fn gpu_ids(hb: &Heartbeat) -> Option<String> {
    (!hb.gpus.is_empty()).then(|| hb.gpus.iter().map(|g| g.id.clone()).collect::<Vec<_>>().join(","))
}

/// VERIFIED and RUNNER_ONLINE: create or adopt the pod, then watch it.
pub async fn run<W: World>(w: &W, pass: &mut Pass<'_>, deleting: bool) -> Result<Option<Duration>, Error> {
    let Some(run) = pass.template() else {
        return Ok(pass.block(super::payload::unbound(&pass.order.spec)));
    };
    let conn = match w.provider(&pass.order.spec.provider_ref).await {
        Ok(c) => c,
        Err(b) => return Ok(pass.block(b)),
    };
    let requested = pass.st.pod_requested_at.as_ref().map(time::from_k8s);
    // Before a create the list must be fresh; afterwards the shared one will do.
    let max_age = if requested.is_some() { pass.poll } else { Duration::ZERO };
    let list = conn.pods_for(&pass.uid, max_age).await?;
    let pod_name = crate::names::pod_name(&run.run_id);
    let recorded = pass.st.pod_id.clone();
    let who =
        Identity { pod_name: &pod_name, run_id: &run.run_id, recorded: recorded.as_deref(), requested_at: requested };
    let pod = match pod::observe(&list.pods, &who, pass.now) {
        Observed::Absent if deleting || pass.order.spec.stop.is_some() => {
            pass.enter(OrderPhase::Deleted, Reason::StoppedBeforeLaunch, "ended before any pod was created");
            return Ok(None);
        }
        Observed::Absent => return create(w, pass, &conn, run).await,
        Observed::CreatePending { .. } => {
            pass.ready(false, Reason::Launching, "waiting for RunPod to list the pod just created");
            return Ok(Some(FAST));
        }
        Observed::CreateLost { since } => {
            pass.st.pod_requested_at = None;
            let note = format!("RunPod never listed the pod asked for at {since}; creating it again");
            pass.notice(Reason::CreateLost, note);
            return Ok(Some(Duration::ZERO));
        }
        Observed::Duplicates { keep, extra } => {
            pod::delete(&conn.api, &extra).await?;
            conn.invalidate().await;
            for p in &extra {
                let note = format!("pod {} duplicated run {}; terminated, {} kept", p.id, run.run_id, keep.id);
                pass.notice(Reason::DuplicatePodTerminated, note);
            }
            Some(keep)
        }
        Observed::Exists(p) => Some(p),
        Observed::Gone { .. } => None,
    };
    if let Some(p) = &pod {
        if requested.is_none() {
            pass.notice(
                Reason::PodAdopted,
                format!("found pod {} of run {}; adopted instead of creating", p.id, run.run_id),
            );
            pass.st.pod_requested_at = Some(time::to_k8s(pass.now));
        }
        record_pod(pass, p);
    }
    supervise(w, pass, &conn, run, pod.as_ref(), deleting).await
}

/// Watches a launched run: heartbeat, terminal file, progress, limits.
async fn supervise<W: World>(
    w: &W,
    pass: &mut Pass<'_>,
    conn: &Conn<W::Api, W::Store>,
    run: &RunTemplate,
    pod: Option<&Pod>,
    deleting: bool,
) -> Result<Option<Duration>, Error> {
    let settings = w.settings();
    let hb: Option<Heartbeat> = read(&conn.store, &run.run_id, keys::HEARTBEAT).await?;
    let terminal_present = conn.store.head(&keys::run_file(&run.run_id, keys::TERMINAL)).await?.is_some();
    let requested = pass.st.pod_requested_at.as_ref().map_or(pass.now, time::from_k8s);
    let cost = accrued(pass.st.cost_per_hour, Some(requested), pass.now, pass.st.accrued_cost_usd);
    pass.st.accrued_cost_usd = Some(cost);
    if let Some(h) = &hb {
        pass.st.heartbeat = Some(HeartbeatStatus {
            time: time::to_k8s(h.time),
            seq: i64::try_from(h.seq).unwrap_or(i64::MAX),
            pid: h.pid.map(i64::from),
            gpu_ids: gpu_ids(h),
        });
    }
    let view = run_view(pass, &settings, run, pod, hb.as_ref(), terminal_present, deleting);
    match watch(&view, pass.now) {
        Verdict::Starting(reason) => {
            let msg = format!("pod {} is starting", pass.st.pod_id.clone().unwrap_or_default());
            pass.ready(false, reason, &msg);
            Ok(Some(FAST))
        }
        Verdict::Online => {
            pass.st.online_at = Some(time::to_k8s(pass.now));
            let msg = format!("runner heartbeating in pod {}", pass.st.pod_id.clone().unwrap_or_default());
            pass.enter(OrderPhase::RunnerOnline, Reason::RunnerOnline, &msg);
            pass.ready(true, Reason::RunnerOnline, &msg);
            Ok(Some(backstop(pass.poll)))
        }
        Verdict::Healthy => {
            let bytes = conn.store.get(&keys::run_file(&run.run_id, keys::PROGRESS)).await.ok().flatten();
            if let Some(p) = bytes.and_then(|b| serde_json::from_slice::<Progress>(&b).ok()) {
                pass.st.progress = Some(progress_status(&p, pass.now));
            }
            Ok(Some(backstop(pass.poll)))
        }
        Verdict::Drain(reason) => {
            start_drain(pass, conn, pod, hb.as_ref(), terminal_present, reason).await;
            Ok(Some(Duration::ZERO))
        }
    }
}

fn run_view<'a>(
    pass: &Pass<'_>,
    settings: &Settings,
    run: &RunTemplate,
    pod: Option<&'a Pod>,
    hb: Option<&'a Heartbeat>,
    terminal_present: bool,
    deleting: bool,
) -> RunView<'a> {
    let lifetime = settings
        .policy(&pass.order.spec.policy)
        .map_or(Duration::from_secs(12 * 3600), |(_, p)| max_lifetime(&pass.order.spec, p));
    let limits = run.limits.as_ref();
    RunView {
        pod,
        heartbeat: hb,
        terminal_present,
        fencing_token: u64::try_from(run.fencing_token).unwrap_or(0),
        pod_requested_at: pass.st.pod_requested_at.as_ref().map_or(pass.now, time::from_k8s),
        online_at: pass.st.online_at.as_ref().map(time::from_k8s),
        stop_requested: pass.order.spec.stop.is_some(),
        deleting,
        heartbeat_timeout: settings.heartbeat_timeout.get(),
        start_deadline: settings.runtime_start_deadline.get(),
        max_runtime: limits.and_then(|l| l.max_runtime.as_ref()).map(ep_api::GoDuration::get),
        max_lifetime: lifetime,
        spent_usd: pass.st.accrued_cost_usd.unwrap_or(0.0) + run.spent_before_usd.unwrap_or(0.0),
        max_cost_usd: limits.and_then(|l| l.max_cost_usd),
    }
}

fn progress_status(p: &Progress, now: DateTime<Utc>) -> ProgressStatus {
    ProgressStatus {
        step: i64::try_from(p.step).unwrap_or(i64::MAX),
        total: p.total.and_then(|t| i64::try_from(t).ok()),
        metrics: p.metrics.iter().filter(|(_, v)| v.is_finite()).map(|(k, v)| (k.clone(), *v)).collect(),
        reported_at: time::to_k8s(now),
    }
}

/// Requeue of a running order: the shared pod-list refresh wakes every order each poll interval,
/// so its own timer is only a backstop (a second wake-up per interval would double the S3 reads).
fn backstop(poll: Duration) -> Duration {
    poll * 5
}

/// Asks the runner to stop (SIGTERM through RunPod's stop) unless it finished, and enters DRAINING.
async fn start_drain<A: RunPodApi, S>(
    pass: &mut Pass<'_>,
    conn: &Conn<A, S>,
    pod: Option<&Pod>,
    hb: Option<&Heartbeat>,
    terminal_present: bool,
    reason: Reason,
) {
    pass.st.drain_reason = Some(reason.as_str().to_owned());
    pass.st.drain_started_at = Some(time::to_k8s(pass.now));
    if let Some(p) = pod.filter(|p| p.status == PodStatus::Running && !terminal_present) {
        if let Err(e) = conn.api.stop_pod(&p.id).await {
            tracing::warn!(order = %pass.name, pod = %p.id, error = %e, "stop before drain failed");
        }
        conn.invalidate().await;
    }
    let token = pass.st.fencing_token.and_then(|t| u64::try_from(t).ok());
    if pass.st.online_at.is_none()
        && let Some(h) = hb.filter(|h| Some(h.fencing_token) == token)
    {
        // A short run can finish between two polls: its heartbeats prove it came online.
        pass.st.online_at = Some(time::to_k8s(h.time.min(pass.now)));
        let msg = format!("runner heartbeated in pod {}", pass.st.pod_id.clone().unwrap_or_default());
        pass.enter(OrderPhase::RunnerOnline, Reason::RunnerOnline, &msg);
    }
    let run_id = pass.st.run_id.clone().unwrap_or_default();
    let msg = format!("draining run {run_id}: {reason}");
    pass.enter(OrderPhase::Draining, reason, &msg);
    pass.ready(false, Reason::Draining, &msg);
}
