//! `kubectl ep push` against runpod-sim: prints the digest, re-pushes only what changed.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers panic on setup failure by design

use std::process::Command;

use ep_api::volume::keys;
use ep_testkit::volume::SimVolume;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn push_prints_the_digest_and_repushes_only_changes() {
    let v = SimVolume::start(|_, _| {}).await.unwrap();
    let dir = tempfile_dir();
    for i in 0..20 {
        std::fs::write(dir.path().join(format!("m{i}.py")), format!("x = {i}\n")).unwrap();
    }
    std::fs::write(dir.path().join("secret.env"), "TOKEN=1").unwrap();
    let cache = tempfile_dir();
    let e = &v.sim.endpoints;
    let push = || {
        Command::new(env!("CARGO_BIN_EXE_kubectl-ep"))
            .args(["push", dir.path().to_str().unwrap(), "--exclude", "*.env"])
            .env("EP_S3_ENDPOINT", &e.s3)
            .env("EP_S3_REGION", "EU-RO-1")
            .env("EP_VOLUME_ID", "tgb8bx6fwl")
            .env("EP_S3_ACCESS_KEY_ID", &e.s3_access_key)
            .env("EP_S3_SECRET_ACCESS_KEY", &e.s3_secret_key)
            .env("EP_CACHE_DIR", cache.path())
            .output()
            .unwrap()
    };
    let out = push();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let digest = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    let id = digest.strip_prefix("sha256:").unwrap();
    assert_eq!(id.len(), 64);
    assert!(v.workspace.join(keys::payload_manifest(id)).exists(), "sealed on the volume");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("uploaded 20 of 20 files"), "the excluded file stays home: {err}");

    std::fs::write(dir.path().join("m3.py"), "x = 'new'\n").unwrap();
    let out = push();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("uploaded 1 of 20 files") && err.contains("19 already on the volume"), "{err}");
    let again = push();
    assert!(String::from_utf8_lossy(&again.stderr).contains("nothing to upload"));
    let json = Command::new(env!("CARGO_BIN_EXE_kubectl-ep"))
        .args(["push", dir.path().to_str().unwrap(), "--exclude", "*.env", "-o", "json"])
        .env("EP_S3_ENDPOINT", &e.s3)
        .env("EP_S3_REGION", "EU-RO-1")
        .env("EP_VOLUME_ID", "tgb8bx6fwl")
        .env("EP_S3_ACCESS_KEY_ID", &e.s3_access_key)
        .env("EP_S3_SECRET_ACCESS_KEY", &e.s3_secret_key)
        .env("EP_CACHE_DIR", cache.path())
        .output()
        .unwrap();
    let json: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    assert_eq!((json["files"].as_u64(), json["uploadedFiles"].as_u64()), (Some(20), Some(0)), "{json}");
    assert!(json["digest"].as_str().unwrap().starts_with("sha256:"), "{json}");

    // Bad input names the path and loses nothing.
    let bad = Command::new(env!("CARGO_BIN_EXE_kubectl-ep"))
        .args(["push", dir.path().to_str().unwrap(), "--location", "../elsewhere"])
        .env("EP_S3_ENDPOINT", &e.s3)
        .env("EP_S3_REGION", "EU-RO-1")
        .env("EP_VOLUME_ID", "tgb8bx6fwl")
        .env("EP_S3_ACCESS_KEY_ID", &e.s3_access_key)
        .env("EP_S3_SECRET_ACCESS_KEY", &e.s3_secret_key)
        .output()
        .unwrap();
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("payload location \"../elsewhere\": must not contain '..'"));
}

fn tempfile_dir() -> tempfile::TempDir {
    tempfile::tempdir().unwrap()
}
