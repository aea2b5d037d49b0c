//! Files exchanged through the network volume, and where they live (DESIGN section 6).
//!
//! The operator writes `spec.json` and payload manifests; the runner writes the rest. Every file the
//! project writes carries `version` and is parsed strictly (unknown fields refused) so a typo or a
//! format drift is an error instead of a silently ignored value. `results.json` and `progress.json`
//! are written by the training script, so they accept extra fields.

use std::collections::BTreeMap;
use std::fmt;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::experiment::RetentionClass;

/// Format version of every file this module defines.
pub const FORMAT_VERSION: u32 = 1;

/// Key layout under the volume root (S3 key = path under the mount path).
pub mod keys {
    /// Root of everything ep-operator writes.
    pub const ROOT: &str = "ep";

    /// The runner binary of a version.
    pub fn runner_binary(version: &str) -> String {
        format!("{ROOT}/bin/ep-runner-{version}")
    }
    /// Content-addressed store of payload files, shared by every payload: a file changed in a
    /// new payload is the only object a re-sync writes (besides the new manifest).
    pub fn payload_blob(sha256: &str) -> String {
        format!("{ROOT}/payloads/sha256/{sha256}")
    }
    /// The sealed manifest of a payload (`id` is the manifest's hex sha256): written last, after
    /// every blob it names was verified; its presence makes the payload usable.
    pub fn payload_manifest(id: &str) -> String {
        format!("{ROOT}/payloads/{id}.manifest.json")
    }
    /// Prefix of one run; a run never writes outside it.
    pub fn run_prefix(run_id: &str) -> String {
        format!("{ROOT}/runs/{run_id}/")
    }
    /// A file of a run, e.g. `run_file(id, "heartbeat.json")`.
    pub fn run_file(run_id: &str, name: &str) -> String {
        format!("{ROOT}/runs/{run_id}/{name}")
    }
    pub const SPEC: &str = "spec.json";
    pub const VERIFIED: &str = "verified.json";
    pub const HEARTBEAT: &str = "heartbeat.json";
    pub const PROGRESS: &str = "progress.json";
    pub const RESOURCE_USAGE: &str = "resource_usage.json";
    pub const TERMINAL: &str = "terminal.json";
    /// Written by the operator when two runners heartbeat for one run: the one it names keeps the
    /// run, every other one stops.
    pub const OWNER: &str = "owner.json";
    pub const LOGS_DIR: &str = "logs";
    pub const ARTIFACTS_DIR: &str = "artifacts";
    /// Where the runner materializes the payload inside its run.
    pub const PAYLOAD_DIR: &str = "payload";
}

/// Refuses a file whose `version` this build does not understand.
pub fn check_version(file: &str, version: u32) -> Result<(), FormatError> {
    if version == FORMAT_VERSION {
        Ok(())
    } else {
        Err(FormatError::Version { file: file.to_owned(), found: version, supported: FORMAT_VERSION })
    }
}

/// A volume file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum FormatError {
    #[error("{file}: {source}")]
    Parse { file: String, source: serde_json::Error },
    #[error("{file}: format version {found} is not supported (this build reads version {supported})")]
    Version { file: String, found: u32, supported: u32 },
}

/// Parses one of the versioned files, naming the file in the error.
pub fn parse<T: for<'de> Deserialize<'de> + Versioned>(file: &str, bytes: &[u8]) -> Result<T, FormatError> {
    let value: T =
        serde_json::from_slice(bytes).map_err(|source| FormatError::Parse { file: file.to_owned(), source })?;
    check_version(file, value.version())?;
    Ok(value)
}

/// Files that carry a format version.
pub trait Versioned {
    /// The file's `version` field.
    fn version(&self) -> u32;
}

macro_rules! versioned {
    ($($t:ty),*) => {$(impl Versioned for $t { fn version(&self) -> u32 { self.version } })*};
}
versioned!(RunSpec, PayloadManifest, Heartbeat, Verified, ResourceUsage, Terminal, Owner);

/// What the runner must do: written by the operator to `ep/runs/<run-id>/spec.json`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RunSpec {
    pub version: u32,
    pub run_id: String,
    pub attempt: u32,
    /// Namespace, name and uid of the experiment.
    pub experiment: ObjectIdentity,
    /// The claim's fencing token; the runner copies it into every heartbeat.
    pub fencing_token: u64,
    /// Payload id (hex sha256 of its manifest).
    pub payload_id: String,
    pub command: Vec<String>,
    #[serde(default)]
    pub args: Vec<String>,
    /// Non-secret environment (secrets reach the pod through its env, never through the volume).
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    pub heartbeat_interval_seconds: u32,
    #[serde(default)]
    pub max_runtime_seconds: Option<u64>,
    pub stop_grace_seconds: u32,
    pub results: ResultsSpec,
    pub checkpoints: CheckpointSpec,
}

/// Identity of a Kubernetes object.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ObjectIdentity {
    pub namespace: String,
    pub name: String,
    pub uid: String,
}

/// The results contract as the runner checks it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ResultsSpec {
    /// Path relative to the artifacts directory.
    pub file: String,
    /// Metrics that must be finite numbers.
    #[serde(default)]
    pub metrics: Vec<String>,
}

/// Where checkpoints go and how they are kept.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CheckpointSpec {
    pub retention: RetentionClass,
    /// Relative to the artifacts directory.
    pub dir: String,
    /// Volume key (relative to the volume root) of an earlier attempt's checkpoint to resume from;
    /// the runner passes its path as `EP_RESUME_FROM`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resume_from: Option<String>,
}

/// A payload: every file with its size, sha256 and mode. Its id is the sha256 of its JSON.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PayloadManifest {
    pub version: u32,
    /// Files sorted by path.
    pub files: Vec<ManifestEntry>,
}

/// One file of a manifest.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ManifestEntry {
    /// Relative path with `/` separators, normalised, never leaving the root.
    pub path: String,
    pub size: u64,
    /// Lower-case hex sha256.
    pub sha256: String,
    /// Unix permission bits (e.g. 0o644 = 420).
    pub mode: u32,
    /// Lower-case hex MD5, for artifacts: RunPod's S3 ETag is the MD5 of the file, so head_object
    /// verifies a file written inside the pod without downloading it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub md5: Option<String>,
}

impl PayloadManifest {
    /// Total payload size in bytes.
    pub fn total_bytes(&self) -> u64 {
        self.files.iter().map(|f| f.size).sum()
    }
}

/// Rewritten by the runner every interval (write, then rename).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Heartbeat {
    pub version: u32,
    pub run_id: String,
    /// Increases by one with every heartbeat.
    pub seq: u64,
    pub time: DateTime<Utc>,
    /// Pid of the training command (None before it starts).
    pub pid: Option<u32>,
    pub fencing_token: u64,
    pub state: RunnerState,
    #[serde(default)]
    pub gpus: Vec<GpuSample>,
    /// Which runner wrote it: two runners of one run (a duplicate pod, a runner started by hand in
    /// the pod) tell themselves apart by it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runner: Option<RunnerIdentity>,
}

/// A runner process: the host (RunPod's pod id, else the host name), its pid and when it started.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RunnerIdentity {
    pub host: String,
    pub pid: u32,
    pub started_at: DateTime<Utc>,
}

impl fmt::Display for RunnerIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "runner pid {} on {} started {}", self.pid, self.host, self.started_at.to_rfc3339())
    }
}

/// `ep/runs/<run-id>/owner.json`: the runner that keeps the run when two heartbeat for it (the one
/// that started first); any other stops its command and writes nothing more.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Owner {
    pub version: u32,
    pub run_id: String,
    pub runner: RunnerIdentity,
    /// Why it was written.
    pub reason: String,
}

/// What the runner is doing.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum RunnerState {
    Verifying,
    Running,
    Stopping,
    /// The command ended; artifacts are being hashed and terminal.json written.
    Finishing,
    Finished,
}

/// One GPU as nvidia-smi reports it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GpuSample {
    /// e.g. `GPU-e0488b7e-...`.
    pub id: String,
    pub name: String,
    pub util_percent: f64,
    pub memory_used_mib: f64,
    pub memory_total_mib: f64,
}

/// Written by the training script (optional); the runner and operator only read it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Progress {
    /// Step or epoch reached.
    pub step: u64,
    /// Steps or epochs planned.
    #[serde(default)]
    pub total: Option<u64>,
    /// Numbers worth plotting (loss, accuracy...).
    #[serde(default)]
    pub metrics: BTreeMap<String, f64>,
    /// The newest checkpoint written completely (renamed into place), relative to
    /// `EP_CHECKPOINT_DIR`: what a later attempt resumes from.
    #[serde(default)]
    pub checkpoint: Option<String>,
    /// Anything else the script wants to say.
    #[serde(flatten)]
    pub extra: BTreeMap<String, serde_json::Value>,
}

/// The runner's payload verdict.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Verified {
    pub version: u32,
    pub run_id: String,
    pub payload_id: String,
    pub ok: bool,
    pub files_checked: u64,
    /// The first mismatch found, when not ok.
    #[serde(default)]
    pub mismatch: Option<Mismatch>,
    pub time: DateTime<Utc>,
}

/// How a file differs from its manifest entry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Mismatch {
    pub path: String,
    pub kind: MismatchKind,
    pub expected: String,
    pub actual: String,
}

/// The kinds of manifest mismatch.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum MismatchKind {
    Missing,
    Size,
    Sha256,
    Manifest,
}

/// Resource usage of the training command's process tree.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ResourceUsage {
    pub version: u32,
    pub run_id: String,
    pub wall_seconds: f64,
    pub cpu_user_seconds: f64,
    pub cpu_system_seconds: f64,
    pub peak_rss_bytes: u64,
    /// Samples taken (heartbeat intervals).
    pub samples: u64,
    #[serde(default)]
    pub gpus: Vec<GpuUsage>,
}

/// Usage of one GPU over the run.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GpuUsage {
    pub id: String,
    pub name: String,
    pub util_percent_mean: f64,
    pub memory_peak_mib: f64,
}

/// Pod environment: when the pod must be gone (RFC 3339). The runner ends its own pod then where
/// the transport has no terminateAfter.
pub const ENV_POD_DEADLINE: &str = "EP_POD_DEADLINE";
/// Pod environment, on transports without terminateAfter: the RunPod REST base the runner calls
/// (`DELETE <base>/v2/pods/$RUNPOD_POD_ID` with the pod's own RUNPOD_API_KEY) at the deadline.
pub const ENV_SELF_TERMINATE_URL: &str = "EP_RUNPOD_REST_URL";

/// The bare words Python writes for non-finite floats.
const NON_FINITE: [&str; 3] = ["NaN", "Infinity", "-Infinity"];

/// Quotes the bare words NaN, Infinity and -Infinity outside strings; None when there are none.
/// Written by hand: no JSON crate reads Python's extension, and this is one pass over the bytes.
fn quote_non_finite(bytes: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(bytes.len() + 16);
    let (mut i, mut in_string, mut changed) = (0, false, false);
    while i < bytes.len() {
        let b = bytes[i];
        if in_string {
            out.push(b);
            if b == b'\\' && i + 1 < bytes.len() {
                out.push(bytes[i + 1]);
                i += 1;
            } else if b == b'"' {
                in_string = false;
            }
            i += 1;
            continue;
        }
        if b == b'"' {
            in_string = true;
        } else if let Some(word) = NON_FINITE.iter().find(|w| bytes[i..].starts_with(w.as_bytes())) {
            out.push(b'"');
            out.extend_from_slice(word.as_bytes());
            out.push(b'"');
            i += word.len();
            changed = true;
            continue;
        }
        out.push(b);
        i += 1;
    }
    changed.then_some(out)
}

/// The results file written by the training script: metric names to values, plus anything else.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Results(pub BTreeMap<String, serde_json::Value>);

impl Results {
    /// Parses a results file. Python's `json.dump` writes `NaN`, `Infinity` and `-Infinity` as bare
    /// words, which JSON does not allow; they are read as the strings "NaN", "Infinity" and
    /// "-Infinity", so one diverged optional metric does not lose the whole file, and a required
    /// one is refused by name in `metrics`.
    pub fn parse(bytes: &[u8]) -> Result<Self, String> {
        match serde_json::from_slice(bytes) {
            Ok(r) => Ok(r),
            Err(first) => {
                let quoted = quote_non_finite(bytes).ok_or_else(|| first.to_string())?;
                serde_json::from_slice(&quoted).map_err(|_| first.to_string())
            }
        }
    }

    /// Checks that every required metric is present as a finite number; returns them. Text the
    /// registry cannot store (U+0000, which PostgreSQL refuses in text and jsonb) is refused too.
    pub fn metrics(&self, required: &[String]) -> Result<BTreeMap<String, f64>, String> {
        if let Some(at) = nul_in(&serde_json::Value::Object(self.0.clone().into_iter().collect()), "") {
            return Err(format!(
                "{at} holds a U+0000 (NUL) character, which the registry cannot store: remove it from the results"
            ));
        }
        let mut out = BTreeMap::new();
        for name in required {
            match self.0.get(name) {
                Some(serde_json::Value::Number(n)) if n.as_f64().is_some_and(f64::is_finite) => {
                    out.insert(name.clone(), n.as_f64().unwrap_or_default());
                }
                Some(serde_json::Value::String(w)) if NON_FINITE.contains(&w.as_str()) => {
                    return Err(format!("metric {name:?} is not finite ({w})"));
                }
                _ => return Err(format!("metric {name:?} is missing or not a number")),
            }
        }
        for (name, v) in &self.0 {
            if let Some(x) = v.as_f64().filter(|x| x.is_finite()) {
                out.entry(name.clone()).or_insert(x);
            }
        }
        Ok(out)
    }
}

/// The path of the first key or string holding U+0000 in a JSON value, if any.
fn nul_in(v: &serde_json::Value, at: &str) -> Option<String> {
    match v {
        serde_json::Value::String(s) if s.contains('\0') => Some(format!("the value at {at:?}")),
        serde_json::Value::Array(a) => a.iter().enumerate().find_map(|(i, x)| nul_in(x, &format!("{at}[{i}]"))),
        serde_json::Value::Object(m) => m.iter().find_map(|(k, x)| {
            let here = if at.is_empty() { k.clone() } else { format!("{at}.{k}") };
            if k.contains('\0') { Some(format!("the key {here:?}")) } else { nul_in(x, &here) }
        }),
        _ => None,
    }
}

/// Written last by the runner: how the run ended and what it left.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Terminal {
    pub version: u32,
    pub run_id: String,
    pub attempt: u32,
    pub fencing_token: u64,
    pub state: TerminalState,
    /// Exit code of the training command, when it exited.
    pub exit_code: Option<i32>,
    /// Signal that ended it, when one did.
    pub signal: Option<i32>,
    /// Why it ended, for people.
    pub reason: String,
    pub started_at: DateTime<Utc>,
    pub finished_at: DateTime<Utc>,
    /// Every file under the run's artifacts directory, paths relative to it.
    pub artifacts: Vec<ManifestEntry>,
    /// Metrics validated against the results contract (empty unless succeeded).
    #[serde(default)]
    pub metrics: BTreeMap<String, f64>,
}

/// Terminal states of a run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum TerminalState {
    /// Exit code 0 and the results contract holds.
    Succeeded,
    /// Non-zero exit, or results that break the contract.
    Failed,
    /// Stopped on request (SIGTERM).
    Stopped,
    /// Exceeded its maximum runtime.
    TimedOut,
    /// The payload did not match its manifest; nothing ran.
    VerificationFailed,
}

#[cfg(test)]
mod tests;
