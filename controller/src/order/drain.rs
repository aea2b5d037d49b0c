//! DRAINING -> DELETED: the run's results verified and recorded before the pod is terminated, the
//! checkpoint retention applied, then the pod's absence confirmed.

use std::collections::BTreeMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use ep_api::experiment::{ArtifactRef, RetentionClass, UsageSummary, VerifiedArtifacts};
use ep_api::order::{OrderPhase, OutcomeState, RunOutcome};
use ep_api::volume::{self, RunSpec, TerminalState, keys};
use ep_volume::VolumeStore;
use ep_volume::collect::{CollectError, Collected, collect};

use super::launch::accrued;
use super::pass::Pass;
use super::pod::{self, Identity, Observed};
use super::world::World;
use crate::error::Error;
use crate::pool::Conn;
use crate::reason::{FAST, Reason};
use crate::runpod::{Pod, PodStatus, RunPodApi};
use crate::time;

/// Extra wait for terminal.json after the runner's own stop grace.
pub const DRAIN_MARGIN: Duration = Duration::from_secs(15);

/// How long the volume is left to settle before files that disagree are read again.
pub const RECHECK: Duration = Duration::from_secs(3);

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

/// Outcome state, reason and detail of a drained run.
pub fn outcome(drain_reason: Reason, evidence: &Evidence) -> (OutcomeState, Reason, Option<String>) {
    match evidence {
        Evidence::Verified { state: TerminalState::Succeeded, .. } => {
            (OutcomeState::Succeeded, Reason::RunFinished, None)
        }
        Evidence::Verified { state: TerminalState::Stopped, reason, .. } => {
            (OutcomeState::Stopped, drain_reason, Some(reason.clone()))
        }
        Evidence::Verified { state, reason, exit_code, .. } => {
            let r = match state {
                TerminalState::TimedOut => Reason::TimedOut,
                TerminalState::VerificationFailed => Reason::PayloadVerificationFailed,
                _ if exit_code.is_some_and(|c| c != 0) => Reason::NonZeroExit,
                _ => Reason::ResultsContractBroken,
            };
            (OutcomeState::Failed, r, Some(reason.clone()))
        }
        Evidence::NoTerminal => (
            OutcomeState::Failed,
            drain_reason,
            Some("the runner left no terminal.json: the run did not finish".to_owned()),
        ),
        Evidence::Untrusted(why) => {
            (OutcomeState::FailedStatusDivergence, Reason::TerminalDivergence, Some(why.clone()))
        }
    }
}

/// Whether to wait for terminal.json before judging the run: a stopped pod reads EXITED at once
/// while its runner still has its grace period to write it, so wait as long as RunPod still lists
/// the pod, a runner was heard from, and the grace has not passed.
pub fn wait_for_terminal(
    terminal_present: bool,
    pod_listed: bool,
    heard: bool,
    waited: Duration,
    grace: Duration,
) -> bool {
    !terminal_present && pod_listed && heard && waited < grace
}

/// Whether evidence that the run's files disagree is final: a file still being written or a
/// listing not yet consistent reads differently the next time, so the pod is kept and the volume
/// read again; only the same evidence twice is trusted.
pub fn untrusted_is_final(evidence: &Evidence, seen_before: Option<&str>) -> bool {
    match evidence {
        Evidence::Untrusted(why) => seen_before == Some(why.as_str()),
        _ => true,
    }
}

/// The checkpoints to delete under a retention class (known keys from terminal.json: the volume
/// is never listed), and the summary kept in status.
pub fn retention(class: RetentionClass, dir: &str, artifacts: &[String]) -> (String, Vec<String>) {
    let dir = dir.trim_matches('/');
    let mut ckpts: Vec<&String> = artifacts.iter().filter(|p| p.starts_with(&format!("{dir}/"))).collect();
    ckpts.sort();
    let delete: Vec<String> = match class {
        RetentionClass::Keep => vec![],
        RetentionClass::KeepLast => ckpts.iter().rev().skip(1).map(|s| (*s).clone()).collect(),
        RetentionClass::Discard => ckpts.iter().map(|s| (*s).clone()).collect(),
    };
    (format!("{class:?}: kept {}, deleted {}", ckpts.len() - delete.len(), delete.len()), delete)
}

async fn read_spec<S: VolumeStore>(store: &S, run_id: &str) -> Result<Option<RunSpec>, Error> {
    let Some(bytes) = store.get(&keys::run_file(run_id, keys::SPEC)).await? else { return Ok(None) };
    Ok(volume::parse::<RunSpec>(keys::SPEC, &bytes).ok())
}

/// Reads and verifies the run's terminal files.
async fn evidence<S: VolumeStore>(
    store: &S,
    run_id: &str,
    token: u64,
    spec: Option<&RunSpec>,
    terminal_present: bool,
) -> Result<(Evidence, Option<Collected>), Error> {
    Ok(match (spec, terminal_present) {
        (Some(s), true) => match collect(store, run_id, token, &s.results).await {
            Ok(c) => {
                let t = &c.terminal;
                let ev = Evidence::Verified {
                    state: t.state,
                    reason: t.reason.clone(),
                    exit_code: t.exit_code,
                    metrics: c.metrics.clone(),
                };
                (ev, Some(c))
            }
            Err(CollectError::Store(e)) => return Err(e.into()),
            Err(e) => (Evidence::Untrusted(e.to_string()), None),
        },
        (None, true) => (Evidence::Untrusted(format!("{} is missing while terminal.json exists", keys::SPEC)), None),
        (_, false) => (Evidence::NoTerminal, None),
    })
}

/// The verified artifacts and usage of a collected run, after retention deleted what it must.
fn verified(run_id: &str, c: &Collected, deleted: &[String]) -> (VerifiedArtifacts, UsageSummary) {
    let prefix = format!("{}{}/", keys::run_prefix(run_id), keys::ARTIFACTS_DIR);
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
    let artifacts = VerifiedArtifacts {
        receipt: c.receipt.clone(),
        prefix,
        omitted: i64::try_from(kept.len().saturating_sub(100)).unwrap_or(0),
        items: kept.into_iter().take(100).collect(),
    };
    let u = &c.usage;
    let usage = UsageSummary {
        wall_seconds: u.wall_seconds,
        cpu_seconds: u.cpu_user_seconds + u.cpu_system_seconds,
        peak_rss_bytes: i64::try_from(u.peak_rss_bytes).unwrap_or(i64::MAX),
        gpu_util_percent: (!u.gpus.is_empty())
            .then(|| u.gpus.iter().map(|g| g.util_percent_mean).sum::<f64>() / u.gpus.len() as f64),
        gpu_memory_peak_mib: u.gpus.iter().map(|g| g.memory_peak_mib).reduce(f64::max),
    };
    (artifacts, usage)
}

/// Judges the run and records the verdict (durably, before the pod is ended). Returns false when
/// it must wait for terminal.json first.
async fn judge<W: World>(
    w: &W,
    pass: &mut Pass<'_>,
    store: &W::Store,
    pod_listed: bool,
    started: DateTime<Utc>,
) -> Result<bool, Error> {
    let run_id = pass.st.run_id.clone().unwrap_or_default();
    let drain_reason = pass.st.drain_reason.as_deref().and_then(|r| r.parse().ok()).unwrap_or(Reason::Draining);
    let spec = read_spec(store, &run_id).await?;
    let terminal_present = store.head(&keys::run_file(&run_id, keys::TERMINAL)).await?.is_some();
    let grace = Duration::from_secs(u64::from(spec.as_ref().map_or(20, |s| s.stop_grace_seconds))) + DRAIN_MARGIN;
    let waited = (pass.now - started).to_std().unwrap_or_default();
    if wait_for_terminal(terminal_present, pod_listed, pass.st.heartbeat.is_some(), waited, grace) {
        pass.ready(false, Reason::Draining, "waiting for the runner's terminal.json");
        return Ok(false);
    }
    let token = u64::try_from(pass.st.fencing_token.unwrap_or(0)).unwrap_or(0);
    let (ev, collected) = evidence(store, &run_id, token, spec.as_ref(), terminal_present).await?;
    if !untrusted_is_final(&ev, pass.st.suspect_evidence.as_deref()) {
        if let Evidence::Untrusted(why) = &ev {
            pass.st.suspect_evidence = Some(why.clone());
            pass.ready(false, Reason::Draining, &format!("the run's files disagree ({why}); reading them again"));
        }
        return Ok(false);
    }
    let (state, reason, mut message) = outcome(drain_reason, &ev);
    // The run's last progress, read now: the newest checkpoint a later attempt resumes from.
    let bytes = store.get(&keys::run_file(&run_id, keys::PROGRESS)).await.ok().flatten();
    if let Some(p) = bytes.and_then(|b| serde_json::from_slice::<volume::Progress>(&b).ok()) {
        pass.st.progress = Some(super::supervise::progress_status(&p, pass.now));
    }
    if let (Evidence::NoTerminal, Some(log)) = (&ev, &pass.st.container_log) {
        message = Some(format!("{}; the container log ends: {log}", message.unwrap_or_default()));
    }
    if state == OutcomeState::Failed
        && let Some(tail) = stderr_tail(store, &run_id).await
    {
        message = Some(format!("{}; stderr ends: {tail}", message.unwrap_or_default()));
    }
    let mut out = RunOutcome {
        state,
        reason: reason.as_str().to_owned(),
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
        let (summary, delete) = retention(s.checkpoints.retention, &s.checkpoints.dir, &paths);
        let (artifacts, usage) = verified(&run_id, c, &delete);
        (out.artifacts, out.usage, out.retention) = (Some(artifacts), Some(usage), Some(summary));
    }
    let requested = pass.st.pod_requested_at.as_ref().map(time::from_k8s);
    pass.st.accrued_cost_usd = Some(accrued(pass.st.cost_per_hour, requested, pass.now, pass.st.accrued_cost_usd));
    let note = format!(
        "run {run_id} {state:?} ({}){}",
        out.reason,
        out.message.as_ref().map(|m| format!(": {m}")).unwrap_or_default()
    );
    let event = if state == OutcomeState::Succeeded { Reason::Succeeded } else { reason };
    pass.notice(event, note);
    pass.st.outcome = Some(out);
    pass.st.suspect_evidence = None;
    // The verdict is durable before the pod is ended and before any checkpoint is deleted: a pass
    // that judges again after a lost write must find every file terminal.json names.
    pass.save(w).await?;
    crate::failpoint::hit("order.drain.judged");
    apply_retention(store, &run_id).await?;
    Ok(true)
}

/// Deletes the checkpoints the run's retention class drops (known keys from terminal.json: the
/// volume is never listed). Idempotent: run again before the order ends, it finishes what a crash
/// interrupted.
async fn apply_retention<S: VolumeStore>(store: &S, run_id: &str) -> Result<(), Error> {
    let Some(spec) = read_spec(store, run_id).await? else { return Ok(()) };
    let Some(bytes) = store.get(&keys::run_file(run_id, keys::TERMINAL)).await? else { return Ok(()) };
    let Ok(t) = volume::parse::<volume::Terminal>(keys::TERMINAL, &bytes) else { return Ok(()) };
    let paths: Vec<String> = t.artifacts.iter().map(|a| a.path.clone()).collect();
    let (_, delete) = retention(spec.checkpoints.retention, &spec.checkpoints.dir, &paths);
    for p in &delete {
        store.delete(&format!("{}{}/{p}", keys::run_prefix(run_id), keys::ARTIFACTS_DIR)).await?;
    }
    Ok(())
}

/// The run's pod as listed now (duplicates terminated).
async fn listed<A: RunPodApi, S>(pass: &mut Pass<'_>, conn: &Conn<A, S>) -> Result<Option<Pod>, Error> {
    let list = conn.pods_for(&pass.uid, pass.poll).await?;
    let run_id = pass.st.run_id.clone().unwrap_or_default();
    let pod_name = pass.st.pod_name.clone().unwrap_or_else(|| crate::names::pod_name(&run_id));
    let recorded = pass.st.pod_id.clone();
    let requested = pass.st.pod_requested_at.as_ref().map(time::from_k8s);
    let who = Identity { pod_name: &pod_name, run_id: &run_id, recorded: recorded.as_deref(), requested_at: requested };
    Ok(match pod::observe(&list.pods, &who, pass.now) {
        Observed::Exists(p) => Some(p),
        Observed::Duplicates { keep, extra } => {
            pod::delete(&conn.api, &extra).await?;
            conn.invalidate().await;
            for p in &extra {
                pass.notice(
                    Reason::DuplicatePodTerminated,
                    format!("pod {} duplicated run {run_id}; terminated", p.id),
                );
            }
            Some(keep)
        }
        Observed::Absent | Observed::CreatePending { .. } | Observed::CreateLost { .. } | Observed::Gone { .. } => None,
    })
}

/// The last lines the script wrote to stderr (at most 5 lines, 600 bytes), for a failed run's
/// message: the cause is shown where people look, not only in the log on the volume.
async fn stderr_tail<S: VolumeStore>(store: &S, run_id: &str) -> Option<String> {
    let bytes = store.get(&keys::run_file(run_id, &format!("{}/stderr.log", keys::LOGS_DIR))).await.ok()??;
    let text = String::from_utf8_lossy(&bytes);
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    let tail = lines[lines.len().saturating_sub(5)..].join(" | ");
    let start = tail.len().saturating_sub(600);
    let start = (start..=tail.len()).find(|i| tail.is_char_boundary(*i)).unwrap_or(tail.len());
    (!tail.is_empty()).then(|| tail[start..].to_owned())
}

/// DRAINING -> DELETED.
pub async fn run<W: World>(w: &W, pass: &mut Pass<'_>) -> Result<Option<Duration>, Error> {
    let conn = match w.provider(&pass.order.spec.provider_ref).await {
        Ok(c) => c,
        Err(b) => return Ok(pass.block(b)),
    };
    let started = pass.st.drain_started_at.as_ref().map_or(pass.now, time::from_k8s);
    let pod = listed(pass, &conn).await?;
    if pass.st.outcome.is_none() && !judge(w, pass, &conn.store, pod.is_some(), started).await? {
        return Ok(Some(if pass.st.suspect_evidence.is_some() { RECHECK } else { FAST }));
    }
    if let Some(p) = &pod {
        pod::delete(&conn.api, std::slice::from_ref(p)).await?;
        conn.invalidate().await;
        crate::failpoint::hit("order.drain.terminated");
        return Ok(Some(FAST));
    }
    let gone = match &pass.st.pod_id {
        Some(id) => conn.api.get_pod(id).await?.is_none_or(|p| p.status == PodStatus::Terminated),
        None => true,
    };
    if !gone {
        return Ok(Some(FAST));
    }
    if pass.st.outcome.as_ref().is_some_and(|o| o.artifacts.is_some()) {
        apply_retention(&conn.store, pass.st.run_id.as_deref().unwrap_or_default()).await?;
    }
    conn.sequence.forget(&pass.uid);
    let o = pass.st.outcome.clone();
    let msg = o.as_ref().map_or_else(String::new, |o| format!("pod terminated and gone; run {:?}", o.state));
    pass.enter(OrderPhase::Deleted, Reason::PodTerminated, &msg);
    let ok = o.as_ref().is_some_and(|o| o.state == OutcomeState::Succeeded);
    pass.ready(ok, if ok { Reason::Succeeded } else { Reason::RunFailed }, &msg);
    w.record_spend(&pass.ns, pass.st.accrued_cost_usd.unwrap_or(0.0));
    Ok(None)
}
