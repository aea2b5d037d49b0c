//! RunPod's own Python SDK and boto3 against the runpod-sim binary, unmodified.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers panic on setup failure by design

use std::process::Command;

use ep_testkit::sim::RunPodSimProcess;
use ep_testkit::tools;
use serde_json::Value;

fn run_python(script: &str, envs: &[(&str, String)]) -> Value {
    let python = tools::python().unwrap();
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests").join(script);
    let mut cmd = Command::new(python);
    cmd.arg(path);
    for (k, v) in envs {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{script} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{script} printed no JSON ({e}): {}", String::from_utf8_lossy(&out.stdout)))
}

#[test]
fn runpod_python_sdk_runs_unmodified_against_the_sim() {
    let sim = RunPodSimProcess::start(None, &["--clock-speed", "5"]).unwrap();
    let volume = "tgb8bx6fwl".to_owned();
    let out = run_python(
        "sdk.py",
        &[
            ("RUNPOD_API_BASE_URL", sim.get("api")),
            ("RUNPOD_API_KEY", sim.get("api_key")),
            ("SIM_VOLUME_ID", volume.clone()),
        ],
    );
    assert!(out["gpu_ids"].as_array().unwrap().iter().any(|g| g == "NVIDIA RTX PRO 4500 Blackwell"), "{out}");
    assert!(out["gpu_price"].as_f64().unwrap() > 0.0);
    assert!(out["unknown_gpu"].as_str().unwrap().contains("No GPU found with the specified ID"), "{out}");

    let created = &out["created"];
    let id = created["id"].as_str().unwrap();
    assert_eq!(id.len(), 14);
    assert!(id.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit()));
    assert!(created["machine"]["podHostId"].as_str().unwrap().starts_with(&format!("{id}-")));
    assert_eq!(created["env"], serde_json::json!(["EP_RUN_ID=r-sdk", "QUOTE=it's"]), "env comes back as K=V strings");

    // RUNNING from the first moment, runtime null until the container starts.
    assert_eq!(out["get_immediately"]["desiredStatus"], "RUNNING");
    assert!(out["get_immediately"]["runtime"].is_null(), "{}", out["get_immediately"]);
    let running = &out["get_running"];
    assert_eq!(running["runtime"]["ports"][0]["privatePort"], 22);
    assert_eq!(running["machine"]["gpuDisplayName"], "RTX PRO 4500");
    assert_eq!(running["volumeMountPath"], "/workspace");
    assert!(out["listed_ids"].as_array().unwrap().iter().any(|p| p == id));

    assert_eq!(out["stopped"]["desiredStatus"], "EXITED");
    assert!(out["after_stop"]["runtime"].is_null());
    assert_eq!(out["resumed"]["desiredStatus"], "RUNNING");
    assert!(out["after_terminate"].is_null(), "pod(input) is null once terminated");
    assert!(!out["listed_after_terminate"].as_array().unwrap().iter().any(|p| p == id));
    assert_eq!(out["second_terminate"], "pod not found to terminate");
    assert_eq!(out["bad_key"], "Unauthorized request, please check your API key.");

    // The pod's start command wrote into /workspace, which is the volume; boto3 sees it by key.
    let s3 = run_python(
        "boto3_s3.py",
        &[
            ("SIM_S3", sim.get("s3")),
            ("SIM_S3_KEY", sim.get("s3_access_key")),
            ("SIM_S3_SECRET", sim.get("s3_secret_key")),
            ("SIM_VOLUME_ID", volume),
            ("POD_FILE", "1".into()),
        ],
    );
    assert_eq!(s3["buckets"], serde_json::json!(["tgb8bx6fwl"]));
    assert_eq!(s3["put_etag"], format!("\"{}\"", md5_hex(b"hello from boto3")), "ETag is the MD5");
    assert_eq!(s3["head"]["size"], 16);
    assert_eq!(s3["head"]["meta"]["sha256"], "abc");
    assert_eq!(s3["get"], "hello from boto3");
    assert_eq!(s3["list"], serde_json::json!(["boto/empty-dir/", "boto/hello.txt"]), "empty directories are listed");
    assert_eq!(s3["pod_file_head"], "from-pod\n".len());
    assert_eq!(s3["delete_objects"], "NotImplemented", "RunPod has no batch delete");
    assert_eq!(s3["after_delete"], "404");
}

fn md5_hex(data: &[u8]) -> String {
    use md5::Digest;
    hex::encode(md5::Md5::digest(data))
}
