//! Contract tests: every client operation against runpod-sim over real HTTP, for both transports,
//! including every error class, retries, Retry-After, and adoption after a create that timed out.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers panic on setup failure by design

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use ep_api::CloudType;
use ep_api::provider::Transport;
use ep_operator::runpod::{
    ClientOptions, GpuQuery, PodSpec, PodStatus, RetryPolicy, RunPodApi, RunPodClient, RunPodError, Stock,
};
use runpod_sim::{RunningSim, WorldConfig};
use serde_json::{Value, json};

const CAPACITY: &str =
    "There are no longer any instances available with the requested specifications. Please refresh and try again.";
const BALANCE: &str = "Your account balance is too low to rent a pod. Please add funds to your account.";
const PRO4500: &str = "NVIDIA RTX PRO 4500 Blackwell";

struct Env {
    sim: RunningSim,
    client: RunPodClient,
    transport: Transport,
    _dir: tempfile::TempDir,
}

fn fast_retries() -> ClientOptions {
    ClientOptions {
        retry: RetryPolicy {
            max_attempts: 4,
            base_delay: Duration::from_millis(20),
            max_delay: Duration::from_millis(100),
            max_retry_after: Duration::from_secs(5),
        },
        ..ClientOptions::default()
    }
}

async fn env(transport: Transport, patch: impl FnOnce(&mut WorldConfig)) -> Env {
    let mut config = WorldConfig::default();
    config.pods.start_delay_seconds = 0.3;
    config.pods.ports_delay_seconds = 0.2;
    config.pods.stop_grace_seconds = 1.0;
    patch(&mut config);
    let (sim, dir) = ep_testkit::volume::start_runpod_sim(config).await.unwrap();
    let client = RunPodClient::new(transport, &sim.endpoints.api, &sim.endpoints.api_key, fast_retries()).unwrap();
    Env { sim, client, transport, _dir: dir }
}

impl Env {
    async fn admin(&self, path: &str, body: Value) -> Value {
        let r = reqwest::Client::new()
            .post(format!("{}/{path}", self.sim.endpoints.admin))
            .json(&body)
            .send()
            .await
            .unwrap();
        r.json().await.unwrap()
    }
    async fn world(&self) -> Value {
        reqwest::get(format!("{}/world", self.sim.endpoints.admin)).await.unwrap().json().await.unwrap()
    }
    fn spec(&self, name: &str) -> PodSpec {
        PodSpec {
            name: name.into(),
            image: "runpod/pytorch:1.0.2-cu1281-torch280-ubuntu2404".into(),
            gpu_type_id: PRO4500.into(),
            gpu_count: 1,
            cloud_type: CloudType::Secure,
            data_center_id: Some("EU-RO-1".into()),
            network_volume_id: Some("tgb8bx6fwl".into()),
            volume_mount_path: "/workspace".into(),
            container_disk_gb: 20,
            env: BTreeMap::from([("EP_RUN_ID".into(), "r-1".into()), ("EP_OWNER_UID".into(), "uid-1".into())]),
            ports: vec!["22/tcp".into()],
            start_command: None,
            terminate_after: None,
        }
    }
    async fn wait_for(&self, what: &str, mut check: impl AsyncFnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if check().await {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("{:?}: timed out waiting for {what}", self.transport);
    }
}

macro_rules! both_transports {
    ($($name:ident),* $(,)?) => {
        mod graphql {
            $(#[tokio::test] async fn $name() { super::$name(ep_api::provider::Transport::Graphql).await })*
        }
        mod rest_v2 {
            $(#[tokio::test] async fn $name() { super::$name(ep_api::provider::Transport::RestV2).await })*
        }
    };
}

both_transports!(
    catalog_prices_stock_and_volumes,
    pod_lifecycle_create_get_list_stop_resume_terminate,
    business_errors_are_typed_with_runpods_text,
    transient_failures_are_retried_and_429_waits,
    create_is_not_retried_and_a_timed_out_create_is_adopted,
    start_command_runs_with_the_volume_at_its_mount_path,
);

async fn catalog_prices_stock_and_volumes(t: Transport) {
    let e = env(t, |_| {}).await;
    let q = GpuQuery {
        gpu_count: 1,
        cloud_type: CloudType::Secure,
        data_center_id: Some("EU-RO-1".into()),
        ..GpuQuery::default()
    };
    let all = e.client.gpu_types(&q).await.unwrap();
    let pro = all.iter().find(|g| g.id == PRO4500).unwrap();
    assert_eq!((pro.display_name.as_str(), pro.price_per_hour, pro.stock), ("RTX PRO 4500", Some(0.72), Stock::High));
    let h100 = all.iter().find(|g| g.id == "NVIDIA H100 80GB HBM3").unwrap();
    assert_eq!(h100.stock, Stock::None, "no H100 in EU-RO-1");
    let two = e.client.gpu_types(&GpuQuery { id: Some(PRO4500.into()), gpu_count: 2, ..q.clone() }).await.unwrap();
    assert_eq!(two.len(), 1);
    assert!((two[0].price_per_hour.unwrap() - 1.44).abs() < 1e-9, "price covers every GPU");
    let unknown = e.client.gpu_types(&GpuQuery { id: Some("NVIDIA GeForce GTX 9999".into()), ..q }).await.unwrap();
    assert!(unknown.is_empty(), "an unknown id is an empty catalog, not an error");
    let vols = e.client.network_volumes().await.unwrap();
    assert_eq!((vols[0].id.as_str(), vols[0].data_center_id.as_str(), vols[0].size_gb), ("tgb8bx6fwl", "EU-RO-1", 50));
}

async fn pod_lifecycle_create_get_list_stop_resume_terminate(t: Transport) {
    let e = env(t, |_| {}).await;
    let pod = e.client.create_pod(&e.spec("ep-r-1")).await.unwrap();
    assert_eq!(pod.id.len(), 14);
    assert_eq!(pod.status, PodStatus::Running, "RUNNING from the moment of creation");
    assert!(pod.runtime.is_none(), "no runtime before the container starts");
    assert_eq!(pod.env["EP_RUN_ID"], "r-1");
    assert_eq!(pod.cost_per_hr, 0.72);
    let id = pod.id.clone();
    e.wait_for("runtime with ports", async || {
        e.client
            .get_pod(&id)
            .await
            .unwrap()
            .and_then(|p| p.runtime)
            .and_then(|r| r.ports)
            .is_some_and(|p| p[0].private_port == 22)
    })
    .await;
    let got = e.client.get_pod(&id).await.unwrap().unwrap();
    assert_eq!(got.gpu_type_id.as_deref(), Some(PRO4500));
    assert_eq!(got.data_center_id.as_deref(), Some("EU-RO-1"));
    assert_eq!(got.network_volume_id.as_deref(), Some("tgb8bx6fwl"));
    let listed = e.client.list_pods().await.unwrap();
    assert_eq!(listed.iter().filter(|p| p.name == "ep-r-1").count(), 1);

    e.client.stop_pod(&id).await.unwrap();
    let stopped = e.client.get_pod(&id).await.unwrap().unwrap();
    assert_eq!(stopped.status, PodStatus::Exited);
    assert!(stopped.runtime.is_none());
    e.client.resume_pod(&id, 1).await.unwrap();
    assert_eq!(e.client.get_pod(&id).await.unwrap().unwrap().status, PodStatus::Running);

    e.client.terminate_pod(&id).await.unwrap();
    assert!(e.client.get_pod(&id).await.unwrap().is_none(), "gone once terminated");
    assert!(e.client.list_pods().await.unwrap().is_empty());
    e.client.terminate_pod(&id).await.unwrap();
    let w = e.world().await;
    assert_eq!(w["stock"][format!("{PRO4500}|EU-RO-1|SECURE")], 4, "the GPU went back to the pool");
}

async fn business_errors_are_typed_with_runpods_text(t: Transport) {
    let e = env(t, |_| {}).await;
    e.admin("stock", json!({"gpuTypeId": PRO4500, "dataCenterId": "EU-RO-1", "cloudType": "SECURE", "count": 0})).await;
    let err = e.client.create_pod(&e.spec("no-stock")).await.unwrap_err();
    assert_eq!(err, RunPodError::Capacity { message: CAPACITY.into() });

    e.admin("stock", json!({"gpuTypeId": PRO4500, "dataCenterId": "EU-RO-1", "cloudType": "SECURE", "count": 4})).await;
    e.admin("balance", json!({"balance": 0.1})).await;
    let err = e.client.create_pod(&e.spec("no-money")).await.unwrap_err();
    assert_eq!(err, RunPodError::InsufficientBalance { message: BALANCE.into() });
    e.admin("balance", json!({"balance": 100.0})).await;

    let err = e.client.stop_pod("doesnotexist00").await.unwrap_err();
    assert_eq!(err.category(), "NotFound", "{err}");
    assert!(e.client.get_pod("doesnotexist00").await.unwrap().is_none());

    let bad = RunPodClient::new(t, &e.sim.endpoints.api, "rpa_WRONG", fast_retries()).unwrap();
    assert_eq!(bad.list_pods().await.unwrap_err().category(), "Unauthorized");

    // Resume on a host whose GPU was taken meanwhile.
    let pod = e.client.create_pod(&e.spec("pinned")).await.unwrap();
    e.client.stop_pod(&pod.id).await.unwrap();
    e.admin("faults", json!({"resumeFailures": 1})).await;
    let err = e.client.resume_pod(&pod.id, 1).await.unwrap_err();
    assert_eq!(
        err,
        RunPodError::Capacity {
            message: "There are not enough free GPUs on the host machine to start this pod.".into()
        }
    );
    if t == Transport::RestV2 {
        // Stopping a stopped pod is an action the current state does not allow (409).
        assert_eq!(e.client.stop_pod(&pod.id).await.unwrap_err().category(), "InvalidRequest");
    }
    e.client.terminate_pod(&pod.id).await.unwrap();
}

async fn transient_failures_are_retried_and_429_waits(t: Transport) {
    let e = env(t, |_| {}).await;
    e.admin("faults", json!({"http5xx": 2})).await;
    e.client.list_pods().await.unwrap();
    let op = if t == Transport::Graphql { "graphql" } else { "rest.listPods" };
    assert_eq!(e.world().await["requests"][op], 3, "two 502s, then success");

    e.admin("faults", json!({"rateLimited": 1, "retryAfterSeconds": 1})).await;
    let started = Instant::now();
    e.client.list_pods().await.unwrap();
    assert!(started.elapsed() >= Duration::from_secs(1), "Retry-After honoured: {:?}", started.elapsed());

    e.admin("faults", json!({"rateLimited": 10, "retryAfterSeconds": 0})).await;
    assert_eq!(e.client.list_pods().await.unwrap_err().category(), "RateLimited", "gives up after max attempts");
    e.admin("faults", json!({"rateLimited": 0})).await;

    if t == Transport::Graphql {
        e.admin("faults", json!({"internalErrors": 1})).await;
        e.client.list_pods().await.unwrap();
    }
}

async fn create_is_not_retried_and_a_timed_out_create_is_adopted(t: Transport) {
    let e = env(t, |_| {}).await;
    let op = if t == Transport::Graphql { "graphql" } else { "rest.createPod" };
    e.admin("faults", json!({"http5xx": 1})).await;
    let before = e.world().await["requests"][op].as_u64().unwrap_or(0);
    let err = e.client.create_pod(&e.spec("ep-r-2")).await.unwrap_err();
    assert!(matches!(err, RunPodError::Transient { may_have_applied: true, .. }), "{err}");
    assert_eq!(
        e.world().await["requests"][op].as_u64().unwrap(),
        before + 1,
        "a create that may have reached RunPod is not repeated"
    );

    // The create reaches RunPod but the answer comes after the caller's timeout.
    e.admin("faults", json!({"createTimeouts": 1, "createTimeoutSeconds": 3})).await;
    let impatient = RunPodClient::new(
        t,
        &e.sim.endpoints.api,
        &e.sim.endpoints.api_key,
        ClientOptions { create_timeout: Duration::from_millis(500), ..fast_retries() },
    )
    .unwrap();
    let err = impatient.create_pod(&e.spec("ep-r-3")).await.unwrap_err();
    assert!(matches!(err, RunPodError::Transient { may_have_applied: true, .. }), "{err}");
    // The caller's rule: list and adopt by the deterministic name before creating again.
    let found: Vec<_> = e.client.list_pods().await.unwrap().into_iter().filter(|p| p.name == "ep-r-3").collect();
    assert_eq!(found.len(), 1, "the pod exists on RunPod's side and is adopted, not created twice");
    let w = e.world().await;
    let pods = w["pods"].as_object().unwrap();
    assert_eq!(pods.values().filter(|p| p["name"] == "ep-r-3").count(), 1, "exactly one pod billed");
}

async fn start_command_runs_with_the_volume_at_its_mount_path(t: Transport) {
    let e = env(t, |_| {}).await;
    let mut spec = e.spec("ep-proc");
    spec.start_command =
        Some(vec!["sh".into(), "-c".into(), "echo \"run $EP_RUN_ID\" > /workspace/proof.txt; exec sleep 600".into()]);
    let pod = e.client.create_pod(&spec).await.unwrap();
    let volume = std::path::Path::new(&e.sim.endpoints.state_dir).join("volumes/tgb8bx6fwl/proof.txt");
    e.wait_for("the pod's file on the volume", async || {
        volume.exists() && std::fs::read_to_string(&volume).unwrap_or_default() == "run r-1\n"
    })
    .await;

    // Through S3, by key; hidden from listings when RunPod's quirk is on.
    let ep = &e.sim.endpoints;
    let conf = aws_sdk_s3::Config::builder()
        .behavior_version(aws_sdk_s3::config::BehaviorVersion::latest())
        .region(aws_sdk_s3::config::Region::new("eu-ro-1"))
        .endpoint_url(&ep.s3)
        .force_path_style(true)
        .credentials_provider(aws_sdk_s3::config::Credentials::new(
            &ep.s3_access_key,
            &ep.s3_secret_key,
            None,
            None,
            "t",
        ))
        .build();
    let s3 = aws_sdk_s3::Client::from_conf(conf);
    e.admin("faults", json!({"s3HidePodFiles": true})).await;
    let head = s3.head_object().bucket("tgb8bx6fwl").key("proof.txt").send().await.unwrap();
    assert_eq!(head.content_length(), Some(8));
    let listed = s3.list_objects_v2().bucket("tgb8bx6fwl").send().await.unwrap();
    assert!(
        listed.contents().iter().all(|o| o.key() != Some("proof.txt")),
        "pod-written files are missing from listings"
    );

    // Terminate kills the whole process tree.
    let pid = e.world().await["pods"][&pod.id]["pid"].as_u64().unwrap();
    assert!(std::path::Path::new(&format!("/proc/{pid}")).exists());
    e.client.terminate_pod(&pod.id).await.unwrap();
    e.wait_for("the container process to die", async || {
        std::fs::read_to_string(format!("/proc/{pid}/stat")).map_or(true, |s| s.split_whitespace().nth(2) == Some("Z"))
    })
    .await;

    // A container whose command exits leaves the pod EXITED.
    let mut spec = e.spec("ep-exit");
    spec.start_command = Some(vec!["sh".into(), "-c".into(), "exit 3".into()]);
    let pod = e.client.create_pod(&spec).await.unwrap();
    e.wait_for("EXITED", async || {
        e.client.get_pod(&pod.id).await.unwrap().is_some_and(|p| p.status == PodStatus::Exited)
    })
    .await;
    assert_eq!(e.world().await["pods"][&pod.id]["exitCode"], 3);
}

#[tokio::test]
async fn terminate_after_billing_and_runtime_that_never_appears() {
    // One simulated hour per real second.
    let e = env(Transport::Graphql, |c| c.clock_speed = 3600.0).await;
    let mut spec = e.spec("ep-deadman");
    // terminateAfter is the wall-clock instant the client means: three real seconds from now,
    // however fast the simulated clock bills (three simulated hours would be read as 3 h).
    spec.terminate_after = Some(chrono::Utc::now() + chrono::Duration::seconds(3));
    let pod = e.client.create_pod(&spec).await.unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let w = e.world().await;
    let spent = w["pods"][&pod.id]["accruedUsd"].as_f64().unwrap();
    assert!(spent > 0.5, "billing follows the clock: {spent}");
    assert!((500.0 - w["balance"].as_f64().unwrap() - w["spendUsd"].as_f64().unwrap()).abs() < 1e-6);
    e.wait_for("terminateAfter to end the pod", async || e.client.get_pod(&pod.id).await.unwrap().is_none()).await;

    e.admin("faults", json!({"runtimeNeverAppears": true})).await;
    let stuck = e.client.create_pod(&e.spec("ep-stuck")).await.unwrap();
    tokio::time::sleep(Duration::from_millis(800)).await;
    let p = e.client.get_pod(&stuck.id).await.unwrap().unwrap();
    assert_eq!(p.status, PodStatus::Running);
    assert!(p.runtime.is_none(), "RUNNING with runtime null for ever: the caller must time out");
    assert!(
        !RunPodClient::new(Transport::RestV2, "http://x", "k", ClientOptions::default())
            .unwrap()
            .supports_terminate_after()
    );
    assert!(e.client.supports_terminate_after());
}

#[tokio::test]
async fn graphql_validation_errors_are_http_400_and_values_travel_as_variables() {
    let e = env(Transport::Graphql, |_| {}).await;
    let http = reqwest::Client::new();
    let r = http
        .post(&e.sim.endpoints.graphql)
        .bearer_auth(&e.sim.endpoints.api_key)
        .json(&json!({"query": "mutation { podFindAndDeployOnDemand(input: {objectMounts: []}) { id } }"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 400, "an unknown input field fails before any capacity check");
    // A value with quotes and newlines goes through untouched: it is a variable, not query text.
    let mut spec = e.spec("ep-quote");
    spec.env.insert("NOTE".into(), "it's \"quoted\"\nand } braces {".into());
    let pod = e.client.create_pod(&spec).await.unwrap();
    assert_eq!(pod.env["NOTE"], "it's \"quoted\"\nand } braces {");
    // The legacy query-parameter key still authenticates, as on RunPod.
    let r = http
        .post(format!("{}?api_key={}", e.sim.endpoints.graphql, e.sim.endpoints.api_key))
        .json(&json!({"query": "{ myself { id } }"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let r = http.post(&e.sim.endpoints.graphql).json(&json!({"query": "{ myself { id } }"})).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 401);
    // Spot: the client has no spot create (the operator refuses interruptible), but RunPod's answer
    // to one is classified as SpotUnavailable.
    let r = http
        .post(&e.sim.endpoints.graphql)
        .bearer_auth(&e.sim.endpoints.api_key)
        .json(&json!({"query": "mutation($i: PodRentInterruptableInput!) { podRentInterruptable(input: $i) { id } }",
                      "variables": {"i": {"gpuTypeId": PRO4500, "bidPerGpu": 0.3, "cloudType": "SECURE"}}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let body: Value = r.json().await.unwrap();
    assert!(body["data"]["podRentInterruptable"].is_null());
    let msg = body["errors"][0]["message"].as_str().unwrap();
    assert_eq!(
        RunPodError::from_message(msg, None),
        RunPodError::SpotUnavailable { message: "Spot pods are no longer offered".into() }
    );
}
