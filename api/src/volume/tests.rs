use super::*;

fn at(s: &str) -> DateTime<Utc> {
    s.parse().unwrap()
}

fn entry(path: &str) -> ManifestEntry {
    ManifestEntry { path: path.into(), size: 3, sha256: "ab".repeat(32), mode: 0o644, md5: None }
}

fn round_trip<T>(name: &str, value: &T)
where
    T: Serialize + for<'de> Deserialize<'de> + Versioned + PartialEq + std::fmt::Debug,
{
    let bytes = serde_json::to_vec_pretty(value).unwrap();
    let back: T = parse(name, &bytes).unwrap();
    assert_eq!(&back, value, "{name} round trip");
    // Strict: an unknown (e.g. misspelt) field is an error naming the field.
    let mut obj: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
    obj.as_object_mut().unwrap().insert("fencingTokn".into(), 1.into());
    let err = parse::<T>(name, &serde_json::to_vec(&obj).unwrap()).unwrap_err().to_string();
    assert!(err.contains(name) && err.contains("fencingTokn"), "{err}");
    // A version from the future is refused, not half-read.
    obj.as_object_mut().unwrap().remove("fencingTokn");
    obj["version"] = 2.into();
    let err = parse::<T>(name, &serde_json::to_vec(&obj).unwrap()).unwrap_err().to_string();
    assert!(err.contains("format version 2 is not supported"), "{err}");
}

#[test]
fn run_spec_round_trips() {
    round_trip(
        "spec.json",
        &RunSpec {
            version: FORMAT_VERSION,
            run_id: "r-3f9a2c1b-a2".into(),
            attempt: 2,
            experiment: ObjectIdentity { namespace: "fraud".into(), name: "gnn".into(), uid: "u-1".into() },
            fencing_token: 7,
            payload_id: "cd".repeat(32),
            command: vec!["python3".into(), "train.py".into()],
            args: vec!["--epochs".into(), "20".into()],
            env: BTreeMap::from([("SEED".into(), "1".into())]),
            heartbeat_interval_seconds: 5,
            max_runtime_seconds: Some(3600),
            stop_grace_seconds: 30,
            results: ResultsSpec { file: "results.json".into(), metrics: vec!["f1".into(), "auc".into()] },
            checkpoints: CheckpointSpec {
                retention: RetentionClass::KeepLast,
                dir: "checkpoints".into(),
                resume_from: None,
            },
        },
    );
}

#[test]
fn manifest_round_trips() {
    let m = PayloadManifest { version: FORMAT_VERSION, files: vec![entry("a.py"), entry("data/b.csv")] };
    assert_eq!(m.total_bytes(), 6);
    round_trip("manifest.json", &m);
}

#[test]
fn heartbeat_round_trips() {
    round_trip(
        "heartbeat.json",
        &Heartbeat {
            version: FORMAT_VERSION,
            run_id: "r1".into(),
            seq: 42,
            time: at("2026-11-30T05:00:00Z"),
            pid: Some(4242),
            fencing_token: 7,
            state: RunnerState::Running,
            gpus: vec![GpuSample {
                id: "GPU-e0488b7e".into(),
                name: "NVIDIA RTX PRO 4500 Blackwell".into(),
                util_percent: 97.0,
                memory_used_mib: 20_000.0,
                memory_total_mib: 32_000.0,
            }],
            runner: Some(RunnerIdentity {
                host: "5xpma5eg46tqjq".into(),
                pid: 17,
                started_at: at("2026-11-30T04:59:58Z"),
            }),
        },
    );
}

#[test]
fn verified_round_trips() {
    round_trip(
        "verified.json",
        &Verified {
            version: FORMAT_VERSION,
            run_id: "r1".into(),
            payload_id: "cd".repeat(32),
            ok: false,
            files_checked: 3,
            mismatch: Some(Mismatch {
                path: "a.py".into(),
                kind: MismatchKind::Sha256,
                expected: "aa".into(),
                actual: "bb".into(),
            }),
            time: at("2026-11-30T05:00:00Z"),
        },
    );
}

#[test]
fn resource_usage_round_trips() {
    round_trip(
        "resource_usage.json",
        &ResourceUsage {
            version: FORMAT_VERSION,
            run_id: "r1".into(),
            wall_seconds: 12.5,
            cpu_user_seconds: 10.0,
            cpu_system_seconds: 0.5,
            peak_rss_bytes: 50 << 20,
            samples: 3,
            gpus: vec![GpuUsage {
                id: "GPU-1".into(),
                name: "L4".into(),
                util_percent_mean: 50.0,
                memory_peak_mib: 1000.0,
            }],
        },
    );
}

#[test]
fn terminal_round_trips() {
    round_trip(
        "terminal.json",
        &Terminal {
            version: FORMAT_VERSION,
            run_id: "r1".into(),
            attempt: 1,
            fencing_token: 7,
            state: TerminalState::Succeeded,
            exit_code: Some(0),
            signal: None,
            reason: "exited 0".into(),
            started_at: at("2026-11-30T05:00:00Z"),
            finished_at: at("2026-11-30T05:10:00Z"),
            artifacts: vec![entry("results.json")],
            metrics: BTreeMap::from([("f1".into(), 0.9), ("auc".into(), 0.95)]),
        },
    );
}

#[test]
fn progress_accepts_script_fields() {
    let p: Progress =
        serde_json::from_str(r#"{"step": 3, "total": 20, "metrics": {"loss": 0.4}, "phase": "train"}"#).unwrap();
    assert_eq!(p.step, 3);
    assert_eq!(p.metrics["loss"], 0.4);
    assert_eq!(p.extra["phase"], "train");
    let back: Progress = serde_json::from_str(&serde_json::to_string(&p).unwrap()).unwrap();
    assert_eq!(back, p);
}

#[test]
fn results_contract_checks_required_metrics() {
    let r: Results = serde_json::from_str(r#"{"f1": 0.91, "auc": 0.97, "epochs": 20, "note": "ok"}"#).unwrap();
    let m = r.metrics(&["f1".into(), "auc".into()]).unwrap();
    assert_eq!((m["f1"], m["auc"], m["epochs"]), (0.91, 0.97, 20.0));
    assert!(!m.contains_key("note"));
    let err = r.metrics(&["f1".into(), "precision".into()]).unwrap_err();
    assert!(err.contains("\"precision\" is missing"), "{err}");
    let r: Results = serde_json::from_str(r#"{"f1": "high"}"#).unwrap();
    assert!(r.metrics(&["f1".into()]).is_err());
    let back: Results = serde_json::from_str(&serde_json::to_string(&r).unwrap()).unwrap();
    assert_eq!(back, r);
}

#[test]
fn results_the_registry_cannot_store_are_refused_with_the_place() {
    let r: Results = serde_json::from_str(r#"{"f1": 0.9, "auc": 0.9, "f1\u0000x": 1}"#).unwrap();
    let err = r.metrics(&["f1".into()]).unwrap_err();
    assert!(err.contains("U+0000") && err.contains(r#"key "f1\0x""#), "{err}");
    let r: Results = serde_json::from_str(r#"{"f1": 0.9, "notes": {"run": ["a\u0000"]}}"#).unwrap();
    let err = r.metrics(&["f1".into()]).unwrap_err();
    assert!(err.contains("notes.run[0]"), "{err}");
}

#[test]
fn key_layout_matches_design() {
    assert_eq!(keys::runner_binary("0.1.0"), "ep/bin/ep-runner-0.1.0");
    assert_eq!(keys::payload_blob("abc"), "ep/payloads/sha256/abc");
    assert_eq!(keys::payload_manifest("abc"), "ep/payloads/abc.manifest.json");
    assert_eq!(keys::run_file("r1", keys::TERMINAL), "ep/runs/r1/terminal.json");
    assert!(keys::run_file("r1", keys::HEARTBEAT).starts_with(&keys::run_prefix("r1")));
}

#[test]
fn python_non_finite_words_lose_only_their_metric() {
    // What Python's json.dump writes for float('nan') and float('inf').
    let text =
        br#"{"f1": 0.9, "auc": 0.8, "val_loss": NaN, "grad": -Infinity, "lr": Infinity, "note": "NaN stays text"}"#;
    let r = Results::parse(text).unwrap();
    let m = r.metrics(&["f1".into(), "auc".into()]).unwrap();
    assert_eq!((m["f1"], m["auc"]), (0.9, 0.8));
    assert!(!m.contains_key("val_loss") && !m.contains_key("grad") && !m.contains_key("lr"), "{m:?}");
    assert_eq!(r.0["note"], "NaN stays text");
    let err = r.metrics(&["val_loss".into()]).unwrap_err();
    assert_eq!(err, "metric \"val_loss\" is not finite (NaN)");
    let err = r.metrics(&["grad".into()]).unwrap_err();
    assert_eq!(err, "metric \"grad\" is not finite (-Infinity)");
    // A file that is broken for another reason still says where.
    let err = Results::parse(br#"{"f1": 0.9,"#).unwrap_err();
    assert!(err.contains("line 1"), "{err}");
    // Escaped quotes inside strings do not confuse the quoting.
    let r = Results::parse(br#"{"s": "a \" NaN", "x": NaN}"#).unwrap();
    assert_eq!(r.0["s"], "a \" NaN");
}

#[test]
fn metrics_with_many_digits_read_back_exactly() {
    // A long decimal a script may print (found by the parsers' fuzzing): read, written, read
    // again, it must be the same number, or terminal.json and results.json disagree.
    for text in ["0.918446744073709551616", "0.1000000000000000055511151231257827", "2.2250738585072011e-308"] {
        let v: f64 = serde_json::from_str(text).unwrap();
        let again: f64 = serde_json::from_str(&serde_json::to_string(&v).unwrap()).unwrap();
        assert_eq!(v.to_bits(), again.to_bits(), "{text}");
        assert_eq!(v, text.parse::<f64>().unwrap(), "{text} is read as the nearest double");
    }
}
