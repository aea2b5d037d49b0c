//! ep-runner as a local process on the quickstart payload, synced through runpod-sim's S3 exactly
//! as the operator syncs it, then verified by result collection.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers panic on setup failure by design

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use ep_api::volume::{
    self, CheckpointSpec, Heartbeat, ObjectIdentity, ResourceUsage, ResultsSpec, RunSpec, RunnerState, Terminal,
    TerminalState, Verified, keys,
};

use ep_testkit::volume::SimVolume;
use ep_volume::collect::{CollectError, collect};
use ep_volume::sync::{SyncOptions, push};
use ep_volume::{Payload, PayloadSource, VolumeStore};
use serde_json::Value;

const TOKEN: u64 = 7;

fn quickstart() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/quickstart")
}

fn contract() -> ResultsSpec {
    ResultsSpec { file: "results.json".into(), metrics: vec!["f1".into(), "auc".into()] }
}

fn spec(run_id: &str, payload_id: &str, args: &[&str]) -> RunSpec {
    RunSpec {
        version: volume::FORMAT_VERSION,
        run_id: run_id.into(),
        attempt: 1,
        experiment: ObjectIdentity { namespace: "default".into(), name: "quickstart".into(), uid: "uid-1".into() },
        fencing_token: TOKEN,
        payload_id: payload_id.into(),
        command: vec!["python3".into(), "train.py".into()],
        args: args.iter().map(|s| (*s).to_owned()).collect(),
        env: BTreeMap::from([("PYTHONDONTWRITEBYTECODE".into(), "1".into())]),
        heartbeat_interval_seconds: 1,
        max_runtime_seconds: None,
        stop_grace_seconds: 3,
        results: contract(),
        checkpoints: CheckpointSpec {
            retention: ep_api::experiment::RetentionClass::KeepLast,
            dir: "checkpoints".into(),
            resume_from: None,
        },
    }
}

/// Syncs the quickstart payload and writes the run spec, as the operator does (through S3).
async fn prepare(v: &SimVolume, s: &RunSpec) {
    let bytes = serde_json::to_vec(s).unwrap();
    v.store.put_bytes(&keys::run_file(&s.run_id, keys::SPEC), bytes.into(), "").await.unwrap();
}

async fn payload(v: &SimVolume) -> Payload {
    let p = Payload::build(&PayloadSource {
        root: quickstart(),
        excludes: vec!["*.yaml".into(), "__pycache__/".into()],
        ..PayloadSource::default()
    })
    .unwrap();
    push(&v.store, &p, &SyncOptions::default(), &|_| {}).await.unwrap();
    p
}

fn runner(workspace: &Path, run_id: &str) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ep-runner"))
        .args(["run", "--run-id", run_id])
        .env("EP_WORKSPACE", workspace)
        .output()
        .unwrap()
}

fn read<T: for<'de> serde::Deserialize<'de> + volume::Versioned>(dir: &Path, name: &str) -> T {
    volume::parse(name, &std::fs::read(dir.join(name)).unwrap()).unwrap()
}

fn tree_hashes(dir: &Path) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for e in walk(dir) {
        let bytes = std::fs::read(&e).unwrap();
        out.insert(e.strip_prefix(dir).unwrap().display().to_string(), format!("{:x}", md5_sum(&bytes)));
    }
    out
}

fn md5_sum(b: &[u8]) -> u128 {
    // A cheap fingerprint is enough to see any change.
    b.iter().fold(0xcbf29ce484222325u128, |h, x| (h ^ u128::from(*x)).wrapping_mul(0x100000001b3))
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut v = Vec::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() { v.extend(walk(&p)) } else { v.push(p) }
    }
    v.sort();
    v
}

#[tokio::test]
async fn quickstart_runs_heartbeats_and_its_results_verify() {
    let v = SimVolume::start(|_, _| {}).await.unwrap();
    let p = payload(&v).await;
    let s = spec("r-quick-a1", &p.id, &["--epochs", "5", "--epoch-sleep", "0.4"]);
    prepare(&v, &s).await;
    let out = tokio::task::spawn_blocking({
        let ws = v.workspace.clone();
        move || runner(&ws, "r-quick-a1")
    })
    .await
    .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let dir = v.workspace.join(keys::run_prefix("r-quick-a1"));
    let verified: Verified = read(&dir, keys::VERIFIED);
    assert!(verified.ok && verified.files_checked >= 1, "{verified:?}");
    let hb: Heartbeat = read(&dir, keys::HEARTBEAT);
    assert!(hb.seq >= 3, "heartbeats while it ran: {hb:?}");
    assert_eq!((hb.state, hb.fencing_token), (RunnerState::Finished, TOKEN));
    let progress: Value = serde_json::from_slice(&std::fs::read(dir.join(keys::PROGRESS)).unwrap()).unwrap();
    assert_eq!((progress["step"].as_u64(), progress["total"].as_u64()), (Some(5), Some(5)));
    for e in 1..=5 {
        assert!(dir.join(format!("artifacts/checkpoints/epoch-{e:03}.json")).exists(), "checkpoint {e}");
    }
    let results: Value = serde_json::from_slice(&std::fs::read(dir.join("artifacts/results.json")).unwrap()).unwrap();
    let usage: ResourceUsage = read(&dir, keys::RESOURCE_USAGE);
    assert!(usage.wall_seconds >= 2.0 && usage.cpu_user_seconds > 0.0 && usage.peak_rss_bytes > 1 << 20, "{usage:?}");
    assert!(usage.gpus.is_empty(), "no GPU here, and that is fine");
    let terminal: Terminal = read(&dir, keys::TERMINAL);
    assert_eq!((terminal.state, terminal.exit_code), (TerminalState::Succeeded, Some(0)));
    assert!(std::fs::read_to_string(dir.join("logs/stdout.log")).unwrap().contains("epoch 5/5"));

    // Result collection over S3: artifacts by head_object, results fetched and parsed.
    let c = collect(&v.store, "r-quick-a1", TOKEN, &contract()).await.unwrap();
    assert_eq!(c.metrics["f1"], results["f1"].as_f64().unwrap());
    assert_eq!(c.metrics["auc"], results["auc"].as_f64().unwrap());
    assert!(c.metrics["auc"] > 0.8 && c.metrics["f1"] > 0.5, "it really learned: {:?}", c.metrics);
    assert_eq!(c.receipt.len(), 64);
    assert_eq!(c.usage.run_id, "r-quick-a1");
    assert!(c.terminal.artifacts.iter().any(|a| a.path == "checkpoints/epoch-005.json"));

    // A stale writer's token does not verify.
    let err = collect(&v.store, "r-quick-a1", TOKEN + 1, &contract()).await.unwrap_err();
    assert!(err.to_string().contains("stale writer"), "{err}");
}

#[tokio::test]
async fn a_corrupted_payload_is_refused_and_nothing_runs() {
    let v = SimVolume::start(|_, _| {}).await.unwrap();
    let p = payload(&v).await;
    let train = p.manifest.files.iter().find(|f| f.path == "train.py").unwrap();
    let blob = v.workspace.join(keys::payload_blob(&train.sha256));
    let mut bytes = std::fs::read(&blob).unwrap();
    bytes[10] ^= 1;
    std::fs::write(&blob, bytes).unwrap();
    prepare(&v, &spec("r-bad", &p.id, &["--epochs", "1"])).await;
    let out = runner(&v.workspace, "r-bad");
    assert_eq!(out.status.code(), Some(1));
    let dir = v.workspace.join(keys::run_prefix("r-bad"));
    let verified: Verified = read(&dir, keys::VERIFIED);
    let m = verified.mismatch.unwrap();
    assert!(!verified.ok);
    assert_eq!(
        (m.path.as_str(), m.kind, m.expected.as_str()),
        ("train.py", volume::MismatchKind::Sha256, train.sha256.as_str())
    );
    let terminal: Terminal = read(&dir, keys::TERMINAL);
    assert_eq!(terminal.state, TerminalState::VerificationFailed);
    assert!(!dir.join("logs/stdout.log").exists(), "the command never ran");
}

#[tokio::test]
async fn a_finished_run_is_not_run_again_and_attempts_are_isolated() {
    let v = SimVolume::start(|_, _| {}).await.unwrap();
    let p = payload(&v).await;
    prepare(&v, &spec("r-iso-a1", &p.id, &["--epochs", "2"])).await;
    assert!(runner(&v.workspace, "r-iso-a1").status.success());
    let first = v.workspace.join(keys::run_prefix("r-iso-a1"));
    let before = tree_hashes(&first);
    let again = runner(&v.workspace, "r-iso-a1");
    assert!(again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("has finished already"));
    assert_eq!(tree_hashes(&first), before, "a re-run of a finished run id changes nothing");

    let mut second = spec("r-iso-a2", &p.id, &["--epochs", "3"]);
    second.attempt = 2;
    prepare(&v, &second).await;
    assert!(runner(&v.workspace, "r-iso-a2").status.success());
    assert_eq!(tree_hashes(&first), before, "the second attempt never touched the first one's prefix");
    let t2: Terminal = read(&v.workspace.join(keys::run_prefix("r-iso-a2")), keys::TERMINAL);
    assert_eq!((t2.attempt, t2.state), (2, TerminalState::Succeeded));
}

#[tokio::test]
async fn a_tampered_artifact_fails_collection() {
    let v = SimVolume::start(|_, _| {}).await.unwrap();
    let p = payload(&v).await;
    prepare(&v, &spec("r-tamper", &p.id, &["--epochs", "2"])).await;
    assert!(runner(&v.workspace, "r-tamper").status.success());
    let results = v.workspace.join(keys::run_prefix("r-tamper")).join("artifacts/results.json");
    let text = std::fs::read_to_string(&results).unwrap();
    // Same size, different content: only the MD5 can tell.
    let tampered: String = text
        .chars()
        .map(|c| {
            if c == '7' {
                '8'
            } else if c == '8' {
                '7'
            } else {
                c
            }
        })
        .collect();
    assert_ne!(tampered, text);
    std::fs::write(&results, &tampered).unwrap();
    let err = collect(&v.store, "r-tamper", TOKEN, &contract()).await.unwrap_err();
    assert!(matches!(&err, CollectError::Tampered { path, .. } if path == "results.json"), "{err}");
    std::fs::write(&results, &text).unwrap();
    // A checkpoint (never downloaded) changed in place, same size: its MD5 ETag tells.
    let ckpt = v.workspace.join(keys::run_prefix("r-tamper")).join("artifacts/checkpoints/epoch-002.json");
    let original = std::fs::read(&ckpt).unwrap();
    let mut changed = original.clone();
    let last = changed.len() - 2;
    changed[last] = if changed[last] == b'0' { b'1' } else { b'0' };
    std::fs::write(&ckpt, &changed).unwrap();
    let err = collect(&v.store, "r-tamper", TOKEN, &contract()).await.unwrap_err();
    assert!(matches!(&err, CollectError::Tampered { path, .. } if path == "checkpoints/epoch-002.json"), "{err}");
    std::fs::write(&ckpt, &original).unwrap();
    std::fs::remove_file(v.workspace.join(keys::run_prefix("r-tamper")).join("artifacts/checkpoints/epoch-001.json"))
        .unwrap();
    let err = collect(&v.store, "r-tamper", TOKEN, &contract()).await.unwrap_err();
    assert!(err.to_string().contains("checkpoints/epoch-001.json") && err.to_string().contains("nothing"), "{err}");
}

#[tokio::test]
async fn sigterm_is_forwarded_and_the_run_ends_stopped() {
    let v = SimVolume::start(|_, _| {}).await.unwrap();
    let p = payload(&v).await;
    prepare(&v, &spec("r-stop", &p.id, &["--epochs", "200", "--epoch-sleep", "0.2"])).await;
    let mut child = Command::new(env!("CARGO_BIN_EXE_ep-runner"))
        .args(["run", "--run-id", "r-stop"])
        .env("EP_WORKSPACE", &v.workspace)
        .spawn()
        .unwrap();
    let dir = v.workspace.join(keys::run_prefix("r-stop"));
    let started = Instant::now();
    while !dir.join(keys::PROGRESS).exists() {
        assert!(started.elapsed() < Duration::from_secs(20), "training never started");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let hb: Heartbeat = read(&dir, keys::HEARTBEAT);
    let pid = hb.pid.unwrap();
    Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(1));
    let t: Terminal = read(&dir, keys::TERMINAL);
    assert_eq!(t.state, TerminalState::Stopped);
    assert!(t.reason.contains("SIGTERM"), "{}", t.reason);
    assert!(!Path::new(&format!("/proc/{pid}")).exists(), "the training process was stopped with the runner");
}

#[tokio::test]
async fn a_broken_results_contract_and_a_timeout_fail_the_run() {
    let v = SimVolume::start(|_, _| {}).await.unwrap();
    let p = payload(&v).await;
    let mut s = spec("r-contract", &p.id, &["--epochs", "1"]);
    s.results.metrics.push("precision".into());
    prepare(&v, &s).await;
    assert_eq!(runner(&v.workspace, "r-contract").status.code(), Some(1));
    let t: Terminal = read(&v.workspace.join(keys::run_prefix("r-contract")), keys::TERMINAL);
    assert_eq!(t.state, TerminalState::Failed);
    assert!(t.reason.contains("\"precision\" is missing"), "{}", t.reason);

    let mut s = spec("r-slow", &p.id, &["--epochs", "100", "--epoch-sleep", "0.5"]);
    s.max_runtime_seconds = Some(1);
    prepare(&v, &s).await;
    assert_eq!(runner(&v.workspace, "r-slow").status.code(), Some(1));
    let t: Terminal = read(&v.workspace.join(keys::run_prefix("r-slow")), keys::TERMINAL);
    assert_eq!(t.state, TerminalState::TimedOut);
    // Collection of a failed run still verifies what is there (and reports no metrics).
    let c = collect(&v.store, "r-slow", TOKEN, &contract()).await.unwrap();
    assert!(c.metrics.is_empty());
}

#[tokio::test]
async fn the_runner_heartbeats_while_it_hashes_a_1_gib_artifact() {
    let v = SimVolume::start(|_, _| {}).await.unwrap();
    let p = payload(&v).await;
    let mut s = spec("r-big", &p.id, &[]);
    s.command = vec![
        "sh".into(),
        "-c".into(),
        "head -c 1073741824 /dev/zero > \"$EP_OUTPUT_DIR/big.bin\" && \
         echo '{\"f1\": 0.5, \"auc\": 0.6}' > \"$EP_OUTPUT_DIR/results.json\""
            .into(),
    ];
    prepare(&v, &s).await;
    let dir = v.workspace.join(keys::run_prefix("r-big"));
    let child = std::thread::spawn({
        let ws = v.workspace.clone();
        move || runner(&ws, "r-big")
    });
    // Watch the heartbeat as the operator does: the longest time it stood still, and what the
    // runner said it was doing meanwhile.
    let (mut last, mut longest, mut finishing) = (None::<Heartbeat>, Duration::ZERO, 0);
    let mut since = Instant::now();
    while !child.is_finished() {
        if let Ok(hb) =
            volume::parse::<Heartbeat>(keys::HEARTBEAT, &std::fs::read(dir.join(keys::HEARTBEAT)).unwrap_or_default())
            && last.as_ref().is_none_or(|l| l.seq != hb.seq)
        {
            longest = longest.max(since.elapsed());
            since = Instant::now();
            finishing += usize::from(hb.state == RunnerState::Finishing);
            last = Some(hb);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.join().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let t: Terminal = read(&dir, keys::TERMINAL);
    let big = t.artifacts.iter().find(|a| a.path == "big.bin").unwrap();
    assert_eq!(big.size, 1 << 30);
    assert!(finishing >= 2, "hashing took more than one heartbeat interval, and it heartbeat meanwhile: {finishing}");
    // The operator's floor for a timeout is two intervals; a beat's own write (an fsync behind a
    // gigabyte of dirty pages) may take a while, so allow one more.
    assert!(longest < Duration::from_secs(3), "the heartbeat stood still for {longest:?}");
    let hb: Heartbeat = read(&dir, keys::HEARTBEAT);
    assert_eq!(hb.state, RunnerState::Finished, "terminal.json, then the last heartbeat");
    std::fs::remove_file(dir.join("artifacts/big.bin")).unwrap();
}

/// Waits until the run's training has written progress.
async fn training(dir: &Path) {
    let started = Instant::now();
    while !dir.join(keys::PROGRESS).exists() {
        assert!(started.elapsed() < Duration::from_secs(20), "training never started");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_second_runner_for_a_live_run_refuses_and_one_displaced_by_owner_json_stops_writing_nothing() {
    let v = SimVolume::start(|_, _| {}).await.unwrap();
    let p = payload(&v).await;
    prepare(&v, &spec("r-twice", &p.id, &["--epochs", "200", "--epoch-sleep", "0.1"])).await;
    let mut first = Command::new(env!("CARGO_BIN_EXE_ep-runner"))
        .args(["run", "--run-id", "r-twice"])
        .env("EP_WORKSPACE", &v.workspace)
        .spawn()
        .unwrap();
    let dir = v.workspace.join(keys::run_prefix("r-twice"));
    training(&dir).await;
    let hb: Heartbeat = read(&dir, keys::HEARTBEAT);
    let me = hb.runner.clone().unwrap();
    assert_eq!(me.pid, first.id());

    // By hand (over SSH, or a duplicate pod): refused before it touches anything.
    let payload_before = tree_hashes(&dir.join(keys::PAYLOAD_DIR));
    let second = runner(&v.workspace, "r-twice");
    let err = String::from_utf8_lossy(&second.stderr);
    assert_eq!(second.status.code(), Some(2), "{err}");
    assert!(err.contains(&format!("runner pid {}", me.pid)) && err.contains("refusing to run it twice"), "{err}");
    assert_eq!(tree_hashes(&dir.join(keys::PAYLOAD_DIR)), payload_before);

    // The operator names another runner the owner: this one stops at its next beat, writes no
    // terminal file and no more heartbeats, and its training process is gone.
    let pid = hb.pid.unwrap();
    let other = volume::RunnerIdentity {
        host: "pod-b".into(),
        pid: 1,
        started_at: me.started_at - chrono::Duration::seconds(5),
    };
    let owner = volume::Owner {
        version: volume::FORMAT_VERSION,
        run_id: "r-twice".into(),
        runner: other,
        reason: "test".into(),
    };
    std::fs::write(dir.join(keys::OWNER), serde_json::to_vec(&owner).unwrap()).unwrap();
    let status = first.wait().unwrap();
    assert_eq!(status.code(), Some(2));
    assert!(!dir.join(keys::TERMINAL).exists(), "a displaced runner writes no terminal file");
    assert!(!Path::new(&format!("/proc/{pid}")).exists(), "its training process was stopped");
    let last: Heartbeat = read(&dir, keys::HEARTBEAT);
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let later: Heartbeat = read(&dir, keys::HEARTBEAT);
    assert_eq!(last.seq, later.seq, "no heartbeat after it stopped");
}
