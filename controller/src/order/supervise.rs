//! RUNNER_ONLINE -> DRAINING: a launched run watched until it finishes, is stopped, or a limit or
//! a loss ends it; then the runner is asked to stop and the order drains.

use std::time::Duration;

use chrono::{DateTime, Utc};
use ep_api::order::{HeartbeatStatus, OrderPhase, ProgressStatus, RunTemplate};
use ep_api::volume::{Heartbeat, Progress, keys};
use ep_volume::VolumeStore;

use super::launch::{accrued, gpu_ids, max_lifetime, read};
use super::pass::Pass;
use super::world::World;
use crate::error::Error;
use crate::pool::Conn;
use crate::reason::{FAST, Reason};
use crate::runpod::{Pod, PodStatus, RunPodApi};
use crate::settings::Settings;
use crate::time;

/// What is known about a launched run at one poll.
#[derive(Clone, Debug)]
pub struct RunView<'a> {
    /// The run's pod in a list fetched after the create returned (None: RunPod does not list it).
    pub pod: Option<&'a Pod>,
    pub heartbeat: Option<&'a Heartbeat>,
    /// The newest heartbeat time status holds: a read that finds no heartbeat (a write racing the
    /// read, an unreadable file) or an older one does not make a live runner look lost.
    pub last_heartbeat: Option<DateTime<Utc>>,
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
        (Some(t), hb) => {
            let newest = [Some(t), hb.map(|h| h.time), v.last_heartbeat].into_iter().flatten().max().unwrap_or(t);
            if elapsed(newest, now) > v.heartbeat_timeout {
                Verdict::Drain(Reason::HeartbeatLost)
            } else {
                Verdict::Healthy
            }
        }
    }
}

/// Watches a launched run: heartbeat, terminal file, progress, limits.
pub async fn run<W: World>(
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
    // What only moves with time reaches status coarsely: every status write wakes the experiment and
    // every watcher, and a write per poll per running order would fill the controller's queue.
    let coarse = coarse(settings.heartbeat_timeout.get());
    if pass.st.accrued_cost_usd.is_none_or(|c| (cost - c).abs() >= 0.01) {
        pass.st.accrued_cost_usd = Some(cost);
    }
    let (runner, foreign) = super::owner::check(pass, &conn.store, &run.run_id, hb.as_ref()).await?;
    if let Some(h) = hb.as_ref().filter(|_| !foreign) {
        record_beat(pass, h, runner, &settings);
    }
    let mut view = run_view(pass, &settings, run, pod, hb.as_ref(), terminal_present, deleting);
    // Limits are checked against the cost to the second, not the coarse figure in status.
    view.spent_usd = cost + run.spent_before_usd.unwrap_or(0.0);
    // An order launched inside its experiment's approval envelope stops at the envelope's total.
    if pass.order.spec.approved != Some(true)
        && let Some(e) = pass.order.spec.experiment_ref.as_ref()
        && let Some(max) = w.experiment_approval(&pass.ns, &e.name).and_then(|a| a.envelope.max_total_usd)
    {
        view.max_cost_usd = Some(view.max_cost_usd.map_or(max, |m| m.min(max)));
    }
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
            // Ready again after a wait the pod outlived (RunPod down, provider not ready).
            let msg = format!("runner heartbeating in pod {}", pass.st.pod_id.clone().unwrap_or_default());
            pass.ready(true, Reason::RunnerOnline, &msg);
            let bytes = conn.store.get(&keys::run_file(&run.run_id, keys::PROGRESS)).await.ok().flatten();
            if let Some(p) = bytes.and_then(|b| serde_json::from_slice::<Progress>(&b).ok()) {
                let new = progress_status(&p, pass.now);
                let changed = pass.st.progress.as_ref().is_none_or(|old| {
                    (old.step, old.total, &old.metrics) != (new.step, new.total, &new.metrics)
                        && elapsed(time::from_k8s(&old.reported_at), pass.now) >= coarse
                });
                if changed {
                    pass.st.progress = Some(new);
                }
            }
            Ok(Some(backstop(pass.poll)))
        }
        Verdict::Drain(reason) => {
            start_drain(pass, conn, pod, hb.as_ref(), terminal_present, reason).await;
            Ok(Some(Duration::ZERO))
        }
    }
}

/// The owner's heartbeat into status, coarsely (a new runner, pid or GPU at once).
fn record_beat(pass: &mut Pass<'_>, h: &Heartbeat, runner: Option<ep_api::order::RunnerRef>, settings: &Settings) {
    let timeout = settings.heartbeat_timeout.get();
    let beat = HeartbeatStatus {
        time: time::to_k8s(h.time),
        seq: i64::try_from(h.seq).unwrap_or(i64::MAX),
        pid: h.pid.map(i64::from),
        gpu_ids: gpu_ids(h),
        lease_expires_at: chrono::Duration::from_std(timeout).ok().map(|d| time::to_k8s(h.time + d)),
        runner,
    };
    let stale = pass.st.heartbeat.as_ref().is_none_or(|old| {
        old.pid != beat.pid
            || old.gpu_ids != beat.gpu_ids
            || old.runner != beat.runner
            || elapsed(time::from_k8s(&old.time), h.time) >= coarse(timeout)
    });
    if stale {
        pass.st.heartbeat = Some(beat);
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
        last_heartbeat: pass.st.heartbeat.as_ref().map(|h| time::from_k8s(&h.time)),
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

pub(super) fn progress_status(p: &Progress, now: DateTime<Utc>) -> ProgressStatus {
    ProgressStatus {
        step: i64::try_from(p.step).unwrap_or(i64::MAX),
        total: p.total.and_then(|t| i64::try_from(t).ok()),
        metrics: p.metrics.iter().filter(|(_, v)| v.is_finite()).map(|(k, v)| (k.clone(), *v)).collect(),
        // Only a plain relative path: it names a file inside the run's checkpoint directory.
        checkpoint: p.checkpoint.clone().filter(|c| {
            !c.is_empty() && std::path::Path::new(c).components().all(|x| matches!(x, std::path::Component::Normal(_)))
        }),
        reported_at: time::to_k8s(now),
    }
}

/// How stale the heartbeat, cost and progress in a running order's status may get: half the
/// heartbeat timeout, at most 30 s (the registry and the decisions use the fresh values).
pub fn coarse(heartbeat_timeout: Duration) -> Duration {
    (heartbeat_timeout / 2).min(Duration::from_secs(30))
}

/// Requeue of a running order: the shared pod-list refresh wakes every order each poll interval,
/// so its own timer is only a backstop (a second wake-up per interval would double the S3 reads).
fn backstop(poll: Duration) -> Duration {
    poll * 5
}

/// The last lines of a container log, at most 5 lines and 1,000 characters; None when empty.
pub fn log_tail(log: &str) -> Option<String> {
    let lines: Vec<&str> = log.lines().map(str::trim_end).filter(|l| !l.is_empty()).collect();
    let tail = lines[lines.len().saturating_sub(5)..].join("\n");
    let start = tail.char_indices().rev().nth(999).map_or(0, |(i, _)| i);
    (!tail.is_empty()).then(|| tail[start..].to_owned())
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
    if let Some(p) = pod.filter(|_| pass.st.online_at.is_none() && hb.is_none()) {
        // The runner never wrote to the volume: only the container log can say why.
        match conn.api.container_logs(&p.id).await {
            Ok(log) => pass.st.container_log = log.as_deref().and_then(log_tail),
            Err(e) => tracing::warn!(order = %pass.name, pod = %p.id, error = %e, "container log not read"),
        }
    }
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
