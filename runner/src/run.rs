//! One attempt, start to finish.

use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use chrono::Utc;
use ep_api::volume::{
    self, FORMAT_VERSION, Heartbeat, Mismatch, MismatchKind, Owner, PayloadManifest, ResourceUsage, Results, RunSpec,
    RunnerIdentity, RunnerState, Terminal, TerminalState, Verified, keys,
};
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use sha2::{Digest, Sha256};

use crate::files::{copy_hashing, manifest_of, write_json};
use crate::usage::{GpuStats, gpus, tree_rss};

/// How a call ended.
#[derive(Debug)]
pub enum Outcome {
    Succeeded,
    AlreadyFinished,
    Ended(TerminalState),
}

/// A run that cannot even start (its terminal state is still written where possible).
#[derive(Debug)]
pub struct RunError(String);

impl std::fmt::Display for RunError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

fn err(what: impl std::fmt::Display) -> RunError {
    RunError(what.to_string())
}

/// The heartbeat: written on every change of state and, from its own thread, every interval
/// whatever the runner is doing (verifying a large payload, hashing a large artifact), so a slow
/// phase never reads as a dead runner.
#[derive(Clone)]
struct Beat {
    path: PathBuf,
    run_id: String,
    fencing_token: u64,
    last: Arc<Mutex<Heartbeat>>,
    done: Arc<AtomicBool>,
}

impl Beat {
    fn new(dir: &Path, spec: &RunSpec, me: &RunnerIdentity) -> Self {
        let hb = Heartbeat {
            version: FORMAT_VERSION,
            run_id: spec.run_id.clone(),
            seq: 0,
            time: Utc::now(),
            pid: None,
            fencing_token: spec.fencing_token,
            state: RunnerState::Verifying,
            gpus: Vec::new(),
            runner: Some(me.clone()),
        };
        Self {
            path: dir.join(keys::HEARTBEAT),
            run_id: spec.run_id.clone(),
            fencing_token: spec.fencing_token,
            last: Arc::new(Mutex::new(hb)),
            done: Arc::new(AtomicBool::new(false)),
        }
    }

    /// Writes a heartbeat now with this state.
    fn set(&self, pid: Option<u32>, state: RunnerState, gpus: Vec<volume::GpuSample>) {
        let mut last = self.last.lock().unwrap_or_else(PoisonError::into_inner);
        last.pid = pid;
        last.state = state;
        last.gpus = gpus;
        self.write(&mut last);
    }

    fn write(&self, hb: &mut Heartbeat) {
        hb.seq += 1;
        hb.time = Utc::now();
        debug_assert_eq!((hb.run_id.as_str(), hb.fencing_token), (self.run_id.as_str(), self.fencing_token));
        if let Err(e) = write_json(&self.path, &*hb) {
            eprintln!("ep-runner: heartbeat not written: {e}");
        }
    }

    /// Beats every `interval` until `stop`.
    fn start(&self, interval: Duration) -> std::thread::JoinHandle<()> {
        let me = self.clone();
        std::thread::spawn(move || {
            let tick = Duration::from_millis(50).min(interval);
            let mut next = Instant::now() + interval;
            while !me.done.load(Ordering::Relaxed) {
                std::thread::sleep(tick);
                if Instant::now() >= next {
                    let mut last = me.last.lock().unwrap_or_else(PoisonError::into_inner);
                    // A heartbeat written by a change of state counts as this interval's.
                    let since = (Utc::now() - last.time).to_std().unwrap_or_default();
                    if since + tick >= interval {
                        if !me.done.load(Ordering::Relaxed) {
                            me.write(&mut last);
                        }
                        next = Instant::now() + interval;
                    } else {
                        next = Instant::now() + (interval - since);
                    }
                }
            }
        })
    }

    /// The last heartbeat (Finished), after which the thread writes nothing.
    fn stop(&self) {
        self.done.store(true, Ordering::Relaxed);
        self.set(None, RunnerState::Finished, Vec::new());
    }
}

struct Run {
    dir: PathBuf,
    spec: RunSpec,
    beat: Beat,
    started: chrono::DateTime<Utc>,
    me: RunnerIdentity,
}

/// This runner: RunPod's pod id (else the host name), its pid, now.
fn identity() -> RunnerIdentity {
    let host = std::env::var("RUNPOD_POD_ID")
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok().map(|h| h.trim().to_owned()))
        .unwrap_or_else(|| "unknown-host".into());
    RunnerIdentity { host, pid: std::process::id(), started_at: Utc::now() }
}

/// The split-brain guard at start: another runner that heartbeats for this run now (within three
/// intervals), or an owner.json naming another runner, means this one must not run it.
fn another_runner(dir: &Path, spec: &RunSpec, me: &RunnerIdentity) -> Option<String> {
    if let Some(owner) = owner(dir).filter(|o| o.runner != *me) {
        return Some(format!("{} owns run {} ({})", owner.runner, spec.run_id, owner.reason));
    }
    let bytes = std::fs::read(dir.join(keys::HEARTBEAT)).ok()?;
    let hb: Heartbeat = volume::parse(keys::HEARTBEAT, &bytes).ok()?;
    let other = hb.runner.filter(|r| r != me)?;
    let fresh = chrono::Duration::seconds(i64::from(spec.heartbeat_interval_seconds.max(1)) * 3 + 5);
    (hb.state != RunnerState::Finished && Utc::now() - hb.time < fresh)
        .then(|| format!("{other} heartbeats for run {} (seq {}, {})", spec.run_id, hb.seq, hb.time.to_rfc3339()))
}

/// owner.json of a run, when the operator wrote one.
fn owner(dir: &Path) -> Option<Owner> {
    let bytes = std::fs::read(dir.join(keys::OWNER)).ok()?;
    volume::parse(keys::OWNER, &bytes).ok()
}

impl Run {
    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// The runner owner.json names instead of this one: this one must stop and write nothing more.
    fn displaced_by(&self) -> Option<RunnerIdentity> {
        owner(&self.dir).map(|o| o.runner).filter(|r| *r != self.me)
    }

    fn heartbeat(&self, pid: Option<u32>, state: RunnerState, gpus: Vec<volume::GpuSample>) {
        self.beat.set(pid, state, gpus);
    }

    /// Ends a run whose command never started: no usage, the terminal state, a last heartbeat.
    fn end_unstarted(&self, state: TerminalState, reason: String) -> Result<Outcome, RunError> {
        let usage = ResourceUsage {
            version: FORMAT_VERSION,
            run_id: self.spec.run_id.clone(),
            wall_seconds: 0.0,
            cpu_user_seconds: 0.0,
            cpu_system_seconds: 0.0,
            peak_rss_bytes: 0,
            samples: 0,
            gpus: Vec::new(),
        };
        write_json(&self.path(keys::RESOURCE_USAGE), &usage)
            .map_err(|e| err(format!("writing resource_usage.json: {e}")))?;
        self.finish(state, None, None, reason, Default::default())?;
        Ok(Outcome::Ended(state))
    }

    /// Hashes the artifacts and writes terminal.json (still heartbeating), then the last heartbeat.
    fn finish(
        &self,
        state: TerminalState,
        exit_code: Option<i32>,
        signal: Option<i32>,
        reason: String,
        metrics: std::collections::BTreeMap<String, f64>,
    ) -> Result<(), RunError> {
        if let Some(other) = self.displaced_by() {
            self.beat.done.store(true, Ordering::Relaxed);
            return Err(err(format!("displaced by {other}: the run's files are left to it")));
        }
        self.heartbeat(None, RunnerState::Finishing, Vec::new());
        let written = self.terminal(state, exit_code, signal, reason, metrics);
        self.beat.stop();
        written
    }

    fn terminal(
        &self,
        state: TerminalState,
        exit_code: Option<i32>,
        signal: Option<i32>,
        reason: String,
        metrics: std::collections::BTreeMap<String, f64>,
    ) -> Result<(), RunError> {
        let artifacts =
            manifest_of(&self.path(keys::ARTIFACTS_DIR)).map_err(|e| err(format!("listing artifacts: {e}")))?;
        let t = Terminal {
            version: FORMAT_VERSION,
            run_id: self.spec.run_id.clone(),
            attempt: self.spec.attempt,
            fencing_token: self.spec.fencing_token,
            state,
            exit_code,
            signal,
            reason,
            started_at: self.started,
            finished_at: Utc::now(),
            artifacts,
            metrics,
        };
        // Written last: its presence says every other file of the run is final.
        write_json(&self.path(keys::TERMINAL), &t).map_err(|e| err(format!("writing terminal.json: {e}")))
    }
}

/// Copies every payload blob into the run, verifying size and sha256 on the way.
fn materialize(workspace: &Path, spec: &RunSpec, into: &Path) -> Result<u64, Mismatch> {
    let mismatch =
        |path: &str, kind, expected: String, actual: String| Mismatch { path: path.into(), kind, expected, actual };
    let mkey = keys::payload_manifest(&spec.payload_id);
    let bytes = std::fs::read(workspace.join(&mkey))
        .map_err(|e| mismatch(&mkey, MismatchKind::Missing, "sealed manifest".into(), e.to_string()))?;
    let actual = hex::encode(Sha256::digest(&bytes));
    if actual != spec.payload_id {
        return Err(mismatch(&mkey, MismatchKind::Manifest, spec.payload_id.clone(), actual));
    }
    let manifest: PayloadManifest = volume::parse(&mkey, &bytes)
        .map_err(|e| mismatch(&mkey, MismatchKind::Manifest, "a valid manifest".into(), e.to_string()))?;
    for f in &manifest.files {
        if f.path.split('/').any(|p| p == ".." || p.is_empty()) || f.path.starts_with('/') {
            return Err(mismatch(&f.path, MismatchKind::Manifest, "a relative path".into(), f.path.clone()));
        }
        let blob = workspace.join(keys::payload_blob(&f.sha256));
        let dest = into.join(&f.path);
        let (size, sha) = copy_hashing(&blob, &dest)
            .map_err(|e| mismatch(&f.path, MismatchKind::Missing, f.sha256.clone(), e.to_string()))?;
        if size != f.size {
            return Err(mismatch(&f.path, MismatchKind::Size, f.size.to_string(), size.to_string()));
        }
        if sha != f.sha256 {
            return Err(mismatch(&f.path, MismatchKind::Sha256, f.sha256.clone(), sha));
        }
        let _ = std::fs::set_permissions(&dest, std::fs::Permissions::from_mode(f.mode & 0o777));
    }
    Ok(manifest.files.len() as u64)
}

/// Runs the attempt `run_id` under `workspace`.
pub fn run(workspace: &Path, run_id: &str, pod_deadline: &AtomicBool) -> Result<Outcome, RunError> {
    if run_id.is_empty() || run_id.contains('/') || run_id.contains("..") {
        return Err(err(format!("invalid run id {run_id:?}")));
    }
    let dir = workspace.join(keys::run_prefix(run_id));
    if dir.join(keys::TERMINAL).exists() {
        return Ok(Outcome::AlreadyFinished);
    }
    let spec_bytes =
        std::fs::read(dir.join(keys::SPEC)).map_err(|e| err(format!("{}: {e}", dir.join(keys::SPEC).display())))?;
    let spec: RunSpec = volume::parse(keys::SPEC, &spec_bytes).map_err(err)?;
    if spec.run_id != run_id {
        return Err(err(format!("spec.json names run {} instead", spec.run_id)));
    }
    let me = identity();
    if let Some(other) = another_runner(&dir, &spec, &me) {
        return Err(err(format!("{other}: refusing to run it twice (this is {me})")));
    }
    let beat = Beat::new(&dir, &spec, &me);
    let run = Run { dir, spec, beat, started: Utc::now(), me };
    let term = Arc::new(AtomicBool::new(false));
    signal_hook::flag::register(signal_hook::consts::SIGTERM, term.clone()).map_err(err)?;
    signal_hook::flag::register(signal_hook::consts::SIGINT, term.clone()).map_err(err)?;
    run.heartbeat(None, RunnerState::Verifying, gpus());
    let interval = Duration::from_secs(u64::from(run.spec.heartbeat_interval_seconds.max(1)));
    let beating = run.beat.start(interval);
    let result = attempt(workspace, run_id, &run, &term, pod_deadline);
    // Whatever happened, the heartbeat thread ends with the run.
    run.beat.done.store(true, Ordering::Relaxed);
    let _ = beating.join();
    result
}

/// Verifies the payload, runs the command and writes the run's files.
fn attempt(
    workspace: &Path,
    run_id: &str,
    run: &Run,
    term: &AtomicBool,
    pod_deadline: &AtomicBool,
) -> Result<Outcome, RunError> {
    // Verify and materialize the payload; refuse to run on any mismatch.
    let payload_dir = run.path(keys::PAYLOAD_DIR);
    let _ = std::fs::remove_dir_all(&payload_dir);
    let verdict = materialize(workspace, &run.spec, &payload_dir);
    let verified = Verified {
        version: FORMAT_VERSION,
        run_id: run_id.into(),
        payload_id: run.spec.payload_id.clone(),
        ok: verdict.is_ok(),
        files_checked: *verdict.as_ref().unwrap_or(&0),
        mismatch: verdict.as_ref().err().cloned(),
        time: Utc::now(),
    };
    write_json(&run.path(keys::VERIFIED), &verified).map_err(|e| err(format!("writing verified.json: {e}")))?;
    if let Err(m) = verdict {
        let reason = format!(
            "payload verification failed: {} {:?}: expected {}, found {}",
            m.path, m.kind, m.expected, m.actual
        );
        return run.end_unstarted(TerminalState::VerificationFailed, reason);
    }

    let artifacts = run.path(keys::ARTIFACTS_DIR);
    let checkpoints = artifacts.join(run.spec.checkpoints.dir.trim_matches('/'));
    let logs = run.path(keys::LOGS_DIR);
    for d in [&artifacts, &checkpoints, &logs] {
        std::fs::create_dir_all(d).map_err(|e| err(format!("{}: {e}", d.display())))?;
    }
    let open_log = |name: &str| {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(logs.join(name))
            .map_err(|e| err(format!("log {name}: {e}")))
    };
    // An earlier attempt's checkpoint (checkpoints.resume), read in place: the volume root is three
    // levels above this run's directory (ep/runs/<run-id>).
    let resume = run.spec.checkpoints.resume_from.as_ref().and_then(|key| {
        let path = run.dir.ancestors().nth(3)?.join(key);
        path.is_file().then_some(path)
    });
    let (program, rest) = run.spec.command.split_first().ok_or_else(|| err("spec.json: command is empty"))?;
    let mut cmd = Command::new(program);
    cmd.args(rest)
        .args(&run.spec.args)
        .current_dir(&payload_dir)
        .envs(&run.spec.env)
        .env("EP_RUN_ID", run_id)
        .env("EP_ATTEMPT", run.spec.attempt.to_string())
        .env("EP_OUTPUT_DIR", &artifacts)
        .env("EP_CHECKPOINT_DIR", &checkpoints)
        .env("EP_PROGRESS_FILE", run.path(keys::PROGRESS))
        .envs(resume.iter().map(|p| ("EP_RESUME_FROM", p)))
        .stdin(Stdio::null())
        .stdout(open_log("stdout.log")?)
        .stderr(open_log("stderr.log")?)
        .process_group(0);
    let started = Instant::now();
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => return run.end_unstarted(TerminalState::Failed, format!("could not start {program}: {e}")),
    };
    let pid = child.id();
    let group = Pid::from_raw(i32::try_from(pid).map_err(err)?);
    let interval = Duration::from_secs(u64::from(run.spec.heartbeat_interval_seconds.max(1)));
    run.heartbeat(Some(pid), RunnerState::Running, gpus());
    let grace = Duration::from_secs(u64::from(run.spec.stop_grace_seconds));
    let deadline = run.spec.max_runtime_seconds.map(|s| started + Duration::from_secs(s));
    let mut gpu_stats = GpuStats::default();
    let mut peak_rss = 0u64;
    let mut samples = 0u64;
    let mut next_beat = Instant::now();
    let mut stopping: Option<(Instant, TerminalState, String)> = None;
    let status = loop {
        if let Some(status) = child.try_wait().map_err(err)? {
            break status;
        }
        let now = Instant::now();
        if stopping.is_none() {
            if term.load(Ordering::Relaxed) {
                stopping = Some((now, TerminalState::Stopped, "stopped on request (SIGTERM)".into()));
            } else if pod_deadline.load(Ordering::Relaxed) {
                let why = "the pod reached its deadline (EP_POD_DEADLINE): the runner stops the run and ends its pod";
                stopping = Some((now, TerminalState::TimedOut, why.into()));
            } else if deadline.is_some_and(|d| now >= d) {
                stopping = Some((
                    now,
                    TerminalState::TimedOut,
                    format!("exceeded its maximum runtime of {}s", run.spec.max_runtime_seconds.unwrap_or(0)),
                ));
            }
            if stopping.is_some() {
                // Forwarded to the whole group: the script and whatever it started.
                let _ = killpg(group, Signal::SIGTERM);
            }
        } else if let Some((since, _, _)) = &stopping
            && now.duration_since(*since) >= grace
        {
            let _ = killpg(group, Signal::SIGKILL);
        }
        if now >= next_beat
            && let Some(other) = run.displaced_by()
        {
            // Another runner keeps the run: stop at once, write nothing more (no heartbeat, no
            // usage, no terminal file) and leave its files to it.
            run.beat.done.store(true, Ordering::Relaxed);
            let _ = killpg(group, Signal::SIGKILL);
            let _ = child.wait();
            return Err(err(format!("displaced by {other}: stopped; the run's files are left to it")));
        }
        if now >= next_beat {
            let g = gpus();
            gpu_stats.add(&g);
            peak_rss = peak_rss.max(tree_rss(pid));
            samples += 1;
            let state = if stopping.is_some() { RunnerState::Stopping } else { RunnerState::Running };
            run.heartbeat(Some(pid), state, g);
            next_beat = now + interval;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    // Whatever the script left running in its group goes with it.
    let _ = killpg(group, Signal::SIGKILL);
    let wall = started.elapsed().as_secs_f64();
    let ru = nix::sys::resource::getrusage(nix::sys::resource::UsageWho::RUSAGE_CHILDREN).map_err(err)?;
    let secs = |t: nix::sys::time::TimeVal| t.tv_sec() as f64 + t.tv_usec() as f64 / 1e6;
    let usage = ResourceUsage {
        version: FORMAT_VERSION,
        run_id: run_id.into(),
        wall_seconds: wall,
        cpu_user_seconds: secs(ru.user_time()),
        cpu_system_seconds: secs(ru.system_time()),
        // ru_maxrss is the largest single child; the sampled tree sum catches the rest.
        peak_rss_bytes: peak_rss.max(u64::try_from(ru.max_rss()).unwrap_or(0) * 1024),
        samples,
        gpus: gpu_stats.summary(),
    };
    write_json(&run.path(keys::RESOURCE_USAGE), &usage)
        .map_err(|e| err(format!("writing resource_usage.json: {e}")))?;
    let exit_code = status.code();
    let signal = status.signal();
    let (state, reason, metrics) = match (stopping, exit_code) {
        (Some((_, state, reason)), _) => (state, reason, Default::default()),
        (None, Some(0)) => match std::fs::read(artifacts.join(&run.spec.results.file)) {
            Err(e) => (
                TerminalState::Failed,
                format!("exited 0 but {} is missing: {e}", run.spec.results.file),
                Default::default(),
            ),
            Ok(bytes) => match Results::parse(&bytes).and_then(|r| r.metrics(&run.spec.results.metrics)) {
                Ok(m) => (TerminalState::Succeeded, "exited 0 and the results contract holds".into(), m),
                Err(e) => (
                    TerminalState::Failed,
                    format!("exited 0 but {} breaks the results contract: {e}", run.spec.results.file),
                    Default::default(),
                ),
            },
        },
        (None, Some(code)) => (TerminalState::Failed, format!("exited {code}"), Default::default()),
        (None, None) => {
            (TerminalState::Failed, format!("killed by signal {}", signal.unwrap_or(0)), Default::default())
        }
    };
    run.finish(state, exit_code, signal, reason, metrics)?;
    Ok(if state == TerminalState::Succeeded { Outcome::Succeeded } else { Outcome::Ended(state) })
}
