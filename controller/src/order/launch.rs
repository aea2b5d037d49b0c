//! VERIFIED -> RUNNER_ONLINE: the paid pod created (or adopted) with its dead-man's switch; the
//! running pod is then watched by [`super::supervise`].

use std::collections::BTreeMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use ep_api::order::{ObtainedGpu, OrderPhase, RunTemplate};
use ep_api::volume::{self, Heartbeat, keys};
use ep_volume::VolumeStore;

use super::pass::Pass;
use super::pod::{self, Identity, Observed};
use super::world::World;
use crate::error::Error;
use crate::names::{ENV_ORDER, ENV_OWNER_UID, ENV_POD_DEADLINE, ENV_RUN_ID};
use crate::pool::Conn;
use crate::reason::{Blocked, FAST, Reason};
use crate::runpod::{Pod, PodSpec, RunPodApi, RunPodError};
use crate::settings::Policy;
use crate::time;

/// The longest this order's pod may live: the order's own maxLifetime, else its policy's.
pub fn max_lifetime(spec: &ep_api::RunPodOrderSpec, policy: &Policy) -> Duration {
    spec.max_lifetime.as_ref().map_or(policy.max_lifetime.get(), ep_api::GoDuration::get)
}

/// How soon an order that found every create slot taken looks again.
pub const CREATE_SLOT_WAIT: Duration = Duration::from_secs(1);

/// The longest a reconcile waits for RunPod's answer to a create: a few polls, at least 5 s, at
/// most 30 s. A create still unanswered then is treated as one whose answer was lost.
pub fn create_bound(poll: Duration) -> Duration {
    (poll * 3).clamp(Duration::from_secs(5), Duration::from_secs(30))
}

/// How long after its create the pod may live before RunPod terminates it on its own: the pod's
/// lifetime cap plus the policy's grace, or, when the run has a maxRuntime, the time to start
/// (runtimeStartDeadline), the run, the runner's stop grace and the drain (drainGrace), whichever
/// is sooner.
pub fn pod_deadline(
    lifetime_cap: Duration,
    max_runtime: Option<Duration>,
    start: Duration,
    drain: Duration,
) -> Duration {
    let by_runtime = max_runtime.map(|r| {
        start
            + r
            + Duration::from_secs(u64::from(super::claim::STOP_GRACE_SECONDS))
            + super::drain::DRAIN_MARGIN
            + drain
    });
    by_runtime.map_or(lifetime_cap, |r| r.min(lifetime_cap))
}

/// The pod's start command: copy the runner off the volume (S3 objects carry no exec bit) and run
/// it. The copy goes to `$TMPDIR` (the container's /tmp when unset, as on RunPod) and is named by
/// the run id: pods sharing a host's temporary directory must not overwrite each other's running
/// binary.
pub fn start_command(mount: &str, runner_key: &str, run_id: &str) -> Vec<String> {
    let script = format!(
        "set -e; b=\"${{TMPDIR:-/tmp}}/ep-runner-{run_id}\"; cp '{mount}/{runner_key}' \"$b\"; chmod 0755 \"$b\"; exec \"$b\" run --run-id '{run_id}' --workspace '{mount}'"
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
    /// Where the runner ends its own pod at the deadline (transports without terminateAfter).
    pub self_terminate_base: Option<String>,
    /// The settings' runtimeStartDeadline and drainGrace.
    pub start_deadline: Duration,
    pub drain_grace: Duration,
}

/// The create request for a plan (pure: `now` is given).
pub fn pod_spec(p: PodPlan<'_>, now: DateTime<Utc>) -> PodSpec {
    let (volume_id, data_center, mount) = p.volume;
    let mut env = p.env;
    env.insert(ENV_OWNER_UID.into(), p.owner_uid.to_owned());
    env.insert(ENV_RUN_ID.into(), p.run.run_id.clone());
    env.insert(ENV_ORDER.into(), p.order_key);
    let cap = max_lifetime(p.order, p.policy) + p.policy.terminate_grace.get();
    let max_runtime = p.run.limits.as_ref().and_then(|l| l.max_runtime.as_ref()).map(ep_api::GoDuration::get);
    let deadline = now
        + chrono::Duration::from_std(pod_deadline(cap, max_runtime, p.start_deadline, p.drain_grace))
            .unwrap_or_default();
    // The runner reads the deadline too: where the transport has no terminateAfter (REST v2), it
    // ends its own pod when the deadline passes.
    env.insert(ENV_POD_DEADLINE.into(), deadline.to_rfc3339_opts(chrono::SecondsFormat::Secs, true));
    let terminate_after = p.terminate_after_supported.then_some(deadline);
    if let Some(base) = p.self_terminate_base.filter(|_| !p.terminate_after_supported) {
        env.insert(ep_api::volume::ENV_SELF_TERMINATE_URL.into(), base);
    }
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

/// One create call, given up after `bound`: the request may have reached RunPod, so the next
/// pass lists pods and adopts before any retry. The bound starts once the account's rate limit
/// gives the create its turn (a queue at RunPod's door is not a create that hangs).
async fn bounded_create<A: RunPodApi>(api: &A, spec: &PodSpec, bound: Duration) -> Result<Pod, RunPodError> {
    api.turn().await;
    let call = crate::runpod::pace::prepaid(api.create_pod(spec));
    tokio::time::timeout(bound, call).await.unwrap_or_else(|_| {
        Err(RunPodError::Transient {
            message: format!("no answer to the create within {}s", bound.as_secs()),
            may_have_applied: true,
        })
    })
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
        self_terminate_base: conn.api.self_terminate_base(),
        start_deadline: settings.runtime_start_deadline.get(),
        drain_grace: settings.drain_grace.get(),
    };
    let spec = pod_spec(plan, pass.now);
    let Ok(_slot) = w.create_slots().try_acquire() else {
        // Every create slot is taken (RunPod answers slowly): look again soon without holding a
        // reconcile slot.
        pass.ready(false, Reason::WaitingForRuntime, "waiting for a free create slot: other pod creates are in flight");
        return Ok(Some(CREATE_SLOT_WAIT));
    };
    pass.st.pod_requested_at = Some(time::to_k8s(pass.now));
    pass.save(w).await?;
    crate::failpoint::hit("order.create.before");
    let result = bounded_create(&conn.api, &spec, create_bound(pass.poll)).await;
    conn.sequence.created(&pass.uid);
    conn.invalidate().await;
    crate::failpoint::hit("order.create.after");
    after_create_call(pass, result, choice, &gpu)
}

/// Applies what a create call's result means to the order.
fn after_create_call(
    pass: &mut Pass<'_>,
    result: Result<Pod, RunPodError>,
    choice: usize,
    gpu: &str,
) -> Result<Option<Duration>, Error> {
    match after_create(&result, choice, &pass.st.gpu_candidates) {
        CreateStep::Created => {
            let pod = result.map_err(Error::RunPod)?;
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
            let why = result.err().map(|e| e.message().to_owned()).unwrap_or_default();
            tracing::warn!(order = %pass.name, %why, "create outcome unknown; the next pass adopts by name");
            let msg = format!(
                "the create of a {gpu} pod got no usable answer ({why}); looking for the pod by name in RunPod's list before any other create"
            );
            pass.ready(false, Reason::CreateOutcomeUnknown, &msg);
            Ok(Some(FAST))
        }
        CreateStep::Retry => {
            pass.st.pod_requested_at = None;
            Err(result.err().map_or(Error::ShuttingDown, Error::RunPod))
        }
    }
}

pub(super) async fn read<T, S>(store: &S, run_id: &str, file: &str) -> Result<Option<T>, Error>
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

pub(super) fn gpu_ids(hb: &Heartbeat) -> Option<String> {
    (!hb.gpus.is_empty()).then(|| hb.gpus.iter().map(|g| g.id.clone()).collect::<Vec<_>>().join(","))
}

/// VERIFIED and RUNNER_ONLINE: create or adopt the pod, then watch it.
pub async fn run<W: World>(w: &W, pass: &mut Pass<'_>, deleting: bool) -> Result<Option<Duration>, Error> {
    let Some(run) = pass.template() else {
        return Ok(pass.block(super::payload::unbound_in(w, pass)));
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
    let observed = pod::observe(&list.pods, &who, pass.now);
    tracing::debug!(list_seq = list.seq, mark = conn.sequence.mark(&pass.uid), fetched = %list.fetched_at, pods = list.pods.len(), ?recorded, observed = ?observed, "pod observed");
    let pod = match observed {
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
    super::supervise::run(w, pass, &conn, run, pod.as_ref(), deleting).await
}
