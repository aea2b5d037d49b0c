//! Gates and failure modes across real processes (PostgreSQL, runpod-sim, kube-sim, ep-operator,
//! kubectl): each test fails if the protection it names is removed.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::time::Duration;

use ep_operator::runpod::{ClientOptions, PodSpec, RunPodApi, RunPodClient};
use ep_testkit::e2e::{NS, condition as cond, exp, init_tls, phase, quickstart_stack};
use ep_testkit::stack::{FAST_SETTINGS, Stack, StackOptions};
use serde_json::json;

const LONG: Duration = Duration::from_secs(120);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn provider_readiness_names_the_problem_and_never_the_secret() {
    let stack = quickstart_stack(&StackOptions::default()).await.unwrap();
    let ready = stack
        .wait_for("rpp", None, "default", LONG, "Ready", |o| cond(o, "Ready").is_some_and(|c| c["status"] == "True"))
        .unwrap()
        .unwrap();
    assert!(cond(Some(&ready), "Ready").unwrap()["message"].as_str().unwrap().contains("tgb8bx6fwl"));
    // A wrong API key.
    stack.merge_patch("secret", Some("ep-system"), "runpod", r#"{"stringData":{"apiKey":"rpa_WRONGKEY123"}}"#).unwrap();
    let bad = stack
        .wait_for("rpp", None, "default", LONG, "BadApiKey", |o| {
            cond(o, "Ready").is_some_and(|c| c["reason"] == "BadApiKey")
        })
        .unwrap()
        .unwrap();
    let text = serde_json::to_string(&bad).unwrap();
    assert!(
        !text.contains("rpa_WRONGKEY123") && !text.contains(&stack.runpod.get("api_key")),
        "a secret leaked: {text}"
    );
    let msg = cond(Some(&bad), "Ready").unwrap()["message"].as_str().unwrap().to_owned();
    assert!(msg.contains("ep-system/runpod"), "{msg}");
    // The right key, but a volume the account does not have.
    let key = stack.runpod.get("api_key");
    stack
        .merge_patch("secret", Some("ep-system"), "runpod", &format!(r#"{{"stringData":{{"apiKey":"{key}"}}}}"#))
        .unwrap();
    stack.merge_patch("rpp", None, "default", r#"{"spec":{"networkVolume":{"id":"nosuchvol"}}}"#).unwrap();
    let missing = stack
        .wait_for("rpp", None, "default", LONG, "VolumeMissing", |o| {
            cond(o, "Ready").is_some_and(|c| c["reason"] == "VolumeMissing")
        })
        .unwrap()
        .unwrap();
    let msg = cond(Some(&missing), "Ready").unwrap()["message"].as_str().unwrap().to_owned();
    assert!(
        msg.contains("nosuchvol") && msg.contains("tgb8bx6fwl"),
        "names the wrong id and the ones that exist: {msg}"
    );
    // An order for a provider that is not ready waits without spending.
    stack.apply(&exp("waits").policy("smoke").epochs(2, 0.0).attempts(1, None).gpus(&["rtx-pro-4500"]).yaml()).unwrap();
    let order = stack
        .wait_for("rpo", Some(NS), "waits-a1", LONG, "ProviderNotReady", |o| {
            cond(o, "Ready").is_some_and(|c| c["reason"] == "ProviderNotReady")
        })
        .unwrap()
        .unwrap();
    assert_eq!(order["status"]["phase"], "REQUESTED");
    assert!(stack.live_pods().await.unwrap().is_empty());
}

async fn a_paid_launch_waits_for_approval_and_a_stop_drains(transport: &'static str) {
    let stack = quickstart_stack(&StackOptions { transport, ..StackOptions::default() }).await.unwrap();
    stack
        .apply(&exp("gated").policy("paper_train").epochs(200, 0.2).attempts(1, None).gpus(&["rtx-pro-4500"]).yaml())
        .unwrap();
    let order = stack
        .wait_for("rpo", Some(NS), "gated-a1", LONG, "AwaitingApproval", |o| {
            cond(o, "Ready").is_some_and(|c| c["reason"] == "AwaitingApproval")
        })
        .unwrap()
        .unwrap();
    assert_eq!(order["status"]["phase"], "REQUESTED");
    // Who acts on the wait is visible where people look: the REASON column, the DOMAIN column of
    // -o wide, the status and the Event.
    assert_eq!(order["status"]["domain"], "paid");
    let wide = stack.kubectl(&["get", "rpo", "gated-a1", "-n", NS, "-o", "wide"]).unwrap();
    let (head, row) = wide.split_once('\n').unwrap();
    assert!(
        head.contains("REASON") && head.contains("DOMAIN") && row.contains("AwaitingApproval") && row.contains("paid"),
        "{wide}"
    );
    let events = stack
        .kubectl(&["get", "events", "-n", NS, "--field-selector", "reason=AwaitingApproval", "-o", "json"])
        .unwrap();
    assert!(events.contains("(failure domain: paid)"), "{events}");
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(stack.live_pods().await.unwrap().is_empty(), "nothing is paid for before approval");
    let exp = stack.get("exp", Some(NS), "gated").unwrap();
    assert_eq!(cond(exp.as_ref(), "Ready").unwrap()["reason"], "AwaitingApproval", "the experiment says why it waits");

    // Only an approver may approve: the author's RBAC does not let her edit orders, and the
    // chart's admission policy refuses the platform admin, whose RBAC does.
    let err = stack.kubectl_ep_as("wren", &["approve", "gated-a1", "-n", NS, "--yes"]).unwrap_err().to_string();
    assert!(err.contains(r#"User "wren" cannot patch resource "runpodorders" in API group "ep.dev""#), "{err}");
    let err = stack.kubectl_ep_as("lark", &["approve", "gated-a1", "-n", NS, "--yes"]).unwrap_err().to_string();
    assert!(err.contains("only members of ep:approvers may approve spending; lark is not"), "{err}");
    // Without --yes and without a terminal answer, nothing is approved.
    let err = stack.kubectl_ep_as("aster", &["approve", "gated", "-n", NS]).unwrap_err().to_string();
    assert!(err.contains("not approved (answer y, or pass --yes)"), "{err}");
    // The author may edit her experiment, but not approve it: admission refuses her.
    let err = stack.kubectl_ep_as("wren", &["approve", "gated", "-n", NS, "--yes"]).unwrap_err().to_string();
    assert!(err.contains("spec.approval: only members of ep:approvers may approve spending; wren is not"), "{err}");
    // The approver names the experiment and reads what it may spend before it is approved.
    let out = stack.kubectl_ep_as("aster", &["approve", "gated", "-n", NS, "--yes"]).unwrap();
    assert!(out.contains("experiment.ep.dev/gated asks to spend:"), "{out}");
    assert!(out.contains("1 x rtx-pro-4500") && out.contains("policy paper"), "{out}");
    assert!(out.contains("of its $50.00 daily budget") || out.contains("no spend ledger"), "{out}");
    assert!(out.contains("experiment.ep.dev/gated approved by aster within GPUs rtx-pro-4500"), "{out}");
    let exp = stack.get("exp", Some(NS), "gated").unwrap().unwrap();
    assert_eq!(exp["spec"]["approval"]["approvedBy"], "aster");
    let order = stack
        .wait_for("rpo", Some(NS), "gated-a1", LONG, "RUNNER_ONLINE", |o| phase(o) == "RUNNER_ONLINE")
        .unwrap()
        .unwrap();
    assert_eq!(order["status"]["approvedBy"], "aster (experiment envelope)", "{}", order["status"]);
    assert_eq!(stack.live_pods().await.unwrap().len(), 1);
    let exp = stack.get("exp", Some(NS), "gated").unwrap().unwrap();
    assert_eq!(exp["status"]["approval"]["approvedBy"], "aster", "the approval and its time are kept in status");
    assert!(exp["status"]["approval"]["approvedAt"].is_string(), "{}", exp["status"]);
    // An order approved by itself keeps its approval.
    let out = stack.kubectl_ep_as("aster", &["approve", "gated-a1", "-n", NS, "--yes"]).unwrap();
    assert!(out.contains("runpodorder.ep.dev/gated-a1 approved by aster"), "{out}");
    // The live pod's container log: on REST v2 from RunPod; GraphQL has none and says so.
    match transport {
        "restV2" => {
            let log = stack.kubectl_ep(&["logs", "gated", "--container", "-n", NS]).unwrap();
            assert!(log.contains("ep-runner") && log.contains("starting"), "{log}");
        }
        _ => {
            let err = stack.kubectl_ep(&["logs", "gated", "--container", "-n", NS]).unwrap_err().to_string();
            assert!(err.contains("GraphQL, which has no container logs") && err.contains("restV2"), "{err}");
        }
    }
    let err = stack.merge_patch("rpo", Some(NS), "gated-a1", r#"{"spec":{"approved":false}}"#).unwrap_err();
    assert!(err.to_string().contains("cannot be withdrawn"), "{err}");

    let out = stack.kubectl_ep(&["stop", "gated", "-n", NS, "--reason", "wrong learning rate"]).unwrap();
    assert!(out.contains("runpodorder.ep.dev/gated-a1 stopping"), "an experiment name stops its current order: {out}");
    let order =
        stack.wait_for("rpo", Some(NS), "gated-a1", LONG, "DELETED", |o| phase(o) == "DELETED").unwrap().unwrap();
    assert_eq!(order["status"]["drainReason"], "StopRequested");
    assert_eq!(order["status"]["outcome"]["state"], "Stopped", "{}", order["status"]);
    assert!(stack.live_pods().await.unwrap().is_empty());
    let exp = stack.wait_for("exp", Some(NS), "gated", LONG, "Failed", |o| phase(o) == "Failed").unwrap().unwrap();
    assert_eq!(exp["status"]["history"][0]["outcome"], "Stopped");
    assert_eq!(cond(Some(&exp), "Ready").unwrap()["reason"], "Stopped");

    // An order stopped before anyone approved it cannot be approved afterwards.
    stack
        .apply(
            &ep_testkit::e2e::exp("gated2")
                .policy("paper_train")
                .epochs(200, 0.2)
                .attempts(1, None)
                .gpus(&["rtx-pro-4500"])
                .yaml(),
        )
        .unwrap();
    stack
        .wait_for("rpo", Some(NS), "gated2-a1", LONG, "AwaitingApproval", |o| {
            cond(o, "Ready").is_some_and(|c| c["reason"] == "AwaitingApproval")
        })
        .unwrap();
    stack.kubectl_ep(&["stop", "gated2-a1", "-n", NS, "--reason", "not needed"]).unwrap();
    let err = stack.kubectl_ep_as("aster", &["approve", "gated2-a1", "-n", NS, "--yes"]).unwrap_err().to_string();
    assert!(
        err.contains("runpodorder.ep.dev/gated2-a1 was stopped (not needed): there is nothing to approve"),
        "{err}"
    );
    assert!(stack.live_pods().await.unwrap().is_empty());
}
ep_testkit::on_both_transports!(a_paid_launch_waits_for_approval_and_a_stop_drains);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_whose_runtime_never_appears_is_terminated_at_the_deadline() {
    init_tls();
    let settings = FAST_SETTINGS.replace("runtimeStartDeadline: 2m", "runtimeStartDeadline: 4s");
    let stack = Stack::start(&StackOptions { settings, ..StackOptions::default() }).await.unwrap();
    stack.apply_quickstart(false).unwrap();
    stack.faults(json!({"runtimeNeverAppears": true})).await.unwrap();
    stack.apply(&exp("stuck").policy("smoke").epochs(2, 0.0).attempts(1, None).gpus(&["rtx-pro-4500"]).yaml()).unwrap();
    let order =
        stack.wait_for("rpo", Some(NS), "stuck-a1", LONG, "DELETED", |o| phase(o) == "DELETED").unwrap().unwrap();
    assert_eq!(order["status"]["drainReason"], "RuntimeNeverAppeared", "{}", order["status"]);
    assert_eq!(order["status"]["outcome"]["state"], "Failed");
    assert!(stack.live_pods().await.unwrap().is_empty(), "the stuck pod was terminated");
    let exp = stack.wait_for("exp", Some(NS), "stuck", LONG, "Failed", |o| phase(o) == "Failed").unwrap().unwrap();
    assert_eq!(exp["status"]["registryStatus"], "FAILED");
}

/// A pod created straight through RunPod's API, as a person would for a notebook: no run id, no owner.
async fn pod_by_hand(stack: &Stack) -> ep_operator::runpod::Pod {
    let client = RunPodClient::new(
        ep_api::provider::Transport::Graphql,
        &stack.runpod.get("api"),
        &stack.runpod.get("api_key"),
        ClientOptions::default(),
    )
    .unwrap();
    client
        .create_pod(&PodSpec {
            name: "notebook-by-hand".into(),
            image: "runpod/pytorch".into(),
            gpu_type_id: "NVIDIA L4".into(),
            gpu_count: 1,
            cloud_type: ep_api::CloudType::Secure,
            data_center_id: Some("EU-RO-1".into()),
            network_volume_id: None,
            volume_mount_path: "/workspace".into(),
            container_disk_gb: 20,
            env: BTreeMap::new(),
            ports: vec![],
            start_command: None,
            terminate_after: None,
        })
        .await
        .unwrap()
}

async fn pods_made_by_hand_are_reported_as_orphans_and_never_adopted(transport: &'static str) {
    let stack = quickstart_stack(&StackOptions { transport, ..StackOptions::default() }).await.unwrap();
    let by_hand = pod_by_hand(&stack).await;
    let provider = stack
        .wait_for("rpp", None, "default", LONG, "orphan reported", |o| {
            o.and_then(|o| o["status"]["orphanPods"].as_array().cloned())
                .unwrap_or_default()
                .iter()
                .any(|p| p == by_hand.id.as_str())
        })
        .unwrap()
        .unwrap();
    assert_eq!(provider["status"]["orphanPods"].as_array().unwrap().len(), 1);
    // An experiment runs beside it; its own pod is never counted as an orphan and the orphan is never adopted.
    stack
        .apply(&exp("beside").policy("smoke").epochs(3, 0.0).attempts(1, None).gpus(&["rtx-pro-4500"]).yaml())
        .unwrap();
    let exp =
        stack.wait_for("exp", Some(NS), "beside", LONG, "Succeeded", |o| phase(o) == "Succeeded").unwrap().unwrap();
    assert_ne!(exp["status"]["history"][0]["podId"], by_hand.id.as_str());
    let live = stack.live_pods().await.unwrap();
    assert_eq!(live.len(), 1, "the orphan is reported, not terminated (orphans.action: Report)");
    let pool = sqlx::PgPool::connect(&stack.database_url).await.unwrap();
    let deadline = std::time::Instant::now() + LONG;
    loop {
        let orphan: Option<bool> =
            sqlx::query_scalar("SELECT orphan FROM exp_registry.provider_instances WHERE pod_id = $1")
                .bind(&by_hand.id)
                .fetch_optional(&pool)
                .await
                .unwrap();
        if orphan == Some(true) {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "the orphan never reached the registry");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
ep_testkit::on_both_transports!(pods_made_by_hand_are_reported_as_orphans_and_never_adopted);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pushed_payload_runs_and_a_digest_never_pushed_waits() {
    let stack = quickstart_stack(&StackOptions::default()).await.unwrap();
    // `kubectl ep push` of the quickstart directory, as a user does it.
    let out = std::process::Command::new(ep_testkit::sim::workspace_bin("kubectl-ep").unwrap())
        .arg("push")
        .arg(ep_testkit::workspace_root().join("examples/quickstart"))
        .args(["--exclude", "*.yaml"])
        .env("EP_S3_ENDPOINT", stack.runpod.get("s3"))
        .env("EP_S3_REGION", "EU-RO-1")
        .env("EP_VOLUME_ID", "tgb8bx6fwl")
        .env("EP_S3_ACCESS_KEY_ID", stack.runpod.get("s3_access_key"))
        .env("EP_S3_SECRET_ACCESS_KEY", stack.runpod.get("s3_secret_key"))
        .env("EP_CACHE_DIR", stack.dir.path().join("cache"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let digest = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    assert!(digest.starts_with("sha256:"), "{digest}");
    let pushed =
        exp("pushed").yaml().replace("{configMap: {name: quickstart-code}}", &format!("{{digest: \"{digest}\"}}"));
    stack.apply(&pushed).unwrap();
    let e = stack.wait_phase("exp", "pushed", &["Succeeded", "Failed"]).unwrap();
    assert_eq!(e["status"]["phase"], "Succeeded", "{}", e["status"]);
    let order = stack.get("rpo", Some(NS), "pushed-a1").unwrap().unwrap();
    assert_eq!(format!("sha256:{}", order["status"]["payloadId"].as_str().unwrap()), digest);

    // A digest nobody pushed: the order waits before any money is spent, and says what to do.
    let missing = format!("sha256:{}", "0".repeat(64));
    let never =
        exp("never").yaml().replace("{configMap: {name: quickstart-code}}", &format!("{{digest: \"{missing}\"}}"));
    stack.apply(&never).unwrap();
    let order = stack
        .wait_for("rpo", Some(NS), "never-a1", LONG, "PayloadMissing", |o| {
            cond(o, "Ready").is_some_and(|c| c["reason"] == "PayloadMissing")
        })
        .unwrap()
        .unwrap();
    assert_eq!(order["status"]["phase"], "PROVISIONED");
    let msg = cond(Some(&order), "Ready").unwrap()["message"].as_str().unwrap().to_owned();
    assert!(msg.contains(&missing) && msg.contains("kubectl ep push"), "{msg}");
    assert!(stack.live_pods().await.unwrap().is_empty());
    // Preflight blocked, nothing runnable until a person pushes: NEEDS_RERUN with the reason, not a
    // READY nobody will pick up.
    ep_testkit::registry::wait_registry(&stack.database_url, "never", "NEEDS_RERUN").await;
    let why = ep_testkit::registry::rows(
        &stack.database_url,
        "SELECT extra->>'reason' AS reason FROM exp_registry.experiments WHERE name = 'never'",
    )
    .await;
    assert_eq!(why, vec![vec!["reason=\"PayloadMissing\""]]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_provider_on_graphql_is_told_once_that_graphql_retires_and_one_on_rest_v2_is_not() {
    let stack = quickstart_stack(&StackOptions { transport: "graphql", ..StackOptions::default() }).await.unwrap();
    let retiring = |o: Option<&serde_json::Value>| cond(o, "GraphqlRetiring").is_some_and(|c| c["status"] == "True");
    let p = stack.wait_for("rpp", None, "default", LONG, "GraphqlRetiring", retiring).unwrap();
    let c = cond(p.as_ref(), "GraphqlRetiring").unwrap();
    assert!(c["message"].as_str().unwrap().contains("set spec.api.transport to restV2"), "{c}");
    // Several passes later, still one Event.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let events = stack
        .kubectl(&[
            "get",
            "events",
            "-A",
            "--field-selector",
            "involvedObject.name=default,reason=GraphqlRetiring",
            "-o",
            "json",
        ])
        .unwrap();
    let events: serde_json::Value = serde_json::from_str(&events).unwrap();
    let count: u64 = events["items"].as_array().unwrap().iter().map(|e| e["count"].as_u64().unwrap_or(1)).sum();
    assert_eq!(count, 1, "{events}");
    stack.merge_patch("rpp", None, "default", r#"{"spec":{"api":{"transport":"restV2"}}}"#).unwrap();
    stack
        .wait_for("rpp", None, "default", LONG, "no GraphqlRetiring on REST v2", |o| {
            o.is_some_and(|o| o["metadata"]["generation"] == o["status"]["observedGeneration"]) && !retiring(o)
        })
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_image_that_cannot_start_fails_with_the_container_logs_last_lines() {
    init_tls();
    let settings = FAST_SETTINGS.replace("runtimeStartDeadline: 2m", "runtimeStartDeadline: 4s");
    let stack = Stack::start(&StackOptions { settings, ..StackOptions::default() }).await.unwrap();
    stack.apply_quickstart(false).unwrap();
    let image = "ghcr.io/acme/trainer:does-not-exist";
    stack.faults(json!({"failingImages": [image]})).await.unwrap();
    let yaml = exp("noimage").attempts(1, None).yaml();
    let yaml = yaml.replace("image: runpod/pytorch:1.0.2-cu1281-torch280-ubuntu2404", &format!("image: {image}"));
    stack.apply(&yaml).unwrap();
    let e = stack.wait_phase("exp", "noimage", &["Succeeded", "Failed"]).unwrap();
    assert_eq!(e["status"]["phase"], "Failed", "{}", e["status"]);
    let ready = cond(Some(&e), "Ready").unwrap();
    let message = ready["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("pull access denied for ghcr.io/acme/trainer"),
        "the container log is in the message: {ready}"
    );
    let order = stack.get("rpo", Some(NS), "noimage-a1").unwrap().unwrap();
    assert_eq!(order["status"]["drainReason"], "RuntimeNeverAppeared", "{}", order["status"]);
    assert!(order["status"]["containerLog"].as_str().unwrap_or_default().contains("error pulling image"));
    assert!(stack.live_pods().await.unwrap().is_empty(), "the pod was terminated");
    // The pod is gone; `kubectl ep logs --container` shows what the operator kept of its log.
    let out = stack.kubectl_ep(&["logs", "noimage", "--container", "-n", NS]).unwrap();
    assert!(out.contains("pull access denied for ghcr.io/acme/trainer"), "{out}");
    // The runner never ran: no script log, and the error says where to look instead.
    let err = stack.kubectl_ep(&["logs", "noimage", "-n", NS]).unwrap_err().to_string();
    assert!(err.contains("has written no log yet") && err.contains("--container"), "{err}");
}

/// `kubectl ep gpus`: RunPod's catalog as the provider sees it, with aliases, prices, stock where
/// the volume is, and the policies that may rent each GPU; filters narrow it.
async fn kubectl_ep_gpus_shows_the_catalog_the_provider_sees(transport: &'static str) {
    let stack = quickstart_stack(&StackOptions { transport, ..StackOptions::default() }).await.unwrap();
    let provider = stack
        .wait_for("rpp", None, "default", LONG, "a catalog", |o| {
            o.is_some_and(|p| p["status"]["catalog"]["gpus"].is_array())
        })
        .unwrap()
        .unwrap();
    let table = stack.kubectl_ep(&["gpus"]).unwrap();
    let lines: Vec<&str> = table.lines().collect();
    assert!(lines[0].starts_with("ALIAS") && lines[0].contains("POLICIES"), "{table}");
    let pro = lines.iter().find(|l| l.contains("NVIDIA RTX PRO 4500 Blackwell")).unwrap_or_else(|| panic!("{table}"));
    assert!(pro.starts_with("rtx-pro-4500"), "the alias comes first: {pro}");
    // The price is runpod-sim's, to the cent.
    let sim_price: f64 = runpod_sim::config::DEFAULT_WORLD
        .lines()
        .find(|l| l.contains("{id: NVIDIA RTX PRO 4500 Blackwell,"))
        .and_then(|l| l.split("securePrice: ").nth(1))
        .and_then(|p| p.split([',', '}']).next())
        .unwrap()
        .parse()
        .unwrap();
    assert!(pro.contains(&format!("{sim_price:.2}")), "price {sim_price}: {pro}");
    assert!(pro.contains("smoke"), "the smoke policy may rent it: {pro}");
    // Cheapest first.
    let json: serde_json::Value = serde_json::from_str(&stack.kubectl_ep(&["gpus", "-o", "json"]).unwrap()).unwrap();
    let rows = json.as_array().unwrap();
    let price = |r: &serde_json::Value| {
        let g = &r["gpu"];
        [g["securePrice"].as_f64(), g["communityPrice"].as_f64()].into_iter().flatten().fold(f64::MAX, f64::min)
    };
    assert!(rows.windows(2).all(|w| price(&w[0]) <= price(&w[1])), "sorted by price: {json}");
    assert_eq!(rows.len(), provider["status"]["catalog"]["gpus"].as_array().unwrap().len());
    let yaml: serde_json::Value = serde_saphyr::from_str(&stack.kubectl_ep(&["gpus", "-o", "yaml"]).unwrap()).unwrap();
    assert_eq!(yaml, json, "-o yaml says what -o json says");
    // Filters.
    // The cheaper cloud counts: the PRO 4500 is 0.59 in the community cloud.
    let cheap = stack.kubectl_ep(&["gpus", "--max-price", "0.5"]).unwrap();
    assert!(!cheap.contains("RTX PRO 4500") && cheap.contains("NVIDIA L4"), "{cheap}");
    let big = stack.kubectl_ep(&["gpus", "--min-vram", "32", "-o", "json"]).unwrap();
    let big: serde_json::Value = serde_json::from_str(&big).unwrap();
    assert!(big.as_array().unwrap().iter().all(|r| r["gpu"]["memoryGb"].as_i64().unwrap() >= 32), "{big}");
    assert!(big.as_array().unwrap().len() < rows.len() && !big.as_array().unwrap().is_empty(), "{big}");
    let wide = stack.kubectl_ep(&["gpus", "-o", "wide"]).unwrap();
    assert!(wide.lines().next().unwrap().contains("IN STOCK AT"), "{wide}");
    assert!(wide.contains("EU-RO-1"), "{wide}");
    let err = stack.kubectl_ep(&["gpus", "--provider", "nope"]).unwrap_err().to_string();
    assert!(err.contains("RunPodProvider nope does not exist"), "{err}");
}

ep_testkit::on_both_transports!(kubectl_ep_gpus_shows_the_catalog_the_provider_sees);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_settings_edit_is_applied_live_and_an_invalid_one_is_refused_visibly() {
    let stack = quickstart_stack(&StackOptions::default()).await.unwrap();
    let op = stack.operator.as_ref().unwrap();
    // An invalid edit: refused, counted, and an event on the operator's pod says why.
    std::fs::write(stack.settings_path(), FAST_SETTINGS.replace("pollInterval: 1s", "pollInterval: soon")).unwrap();
    ep_testkit::e2e::wait_until("the refusal is counted", LONG, || {
        op.metric("ep_settings_rejections_total") == Some(1.0)
    })
    .unwrap();
    let deadline = std::time::Instant::now() + LONG;
    let event = loop {
        let list: serde_json::Value =
            serde_json::from_str(&stack.kubectl(&["get", "events", "-n", "ep-system", "-o", "json"]).unwrap()).unwrap();
        if let Some(e) = list["items"].as_array().unwrap().iter().find(|e| e["reason"] == "SettingsRejected") {
            break e.clone();
        }
        assert!(std::time::Instant::now() < deadline, "no SettingsRejected event: {list}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let note = event["message"].as_str().unwrap();
    assert!(note.contains("pollInterval") && note.contains("last good settings"), "{note}");
    assert_eq!(event["involvedObject"]["kind"], "Pod");
    // The last good settings stay in force: an experiment still runs.
    stack.apply(&exp("still").yaml()).unwrap();
    let e = stack.wait_phase("exp", "still", &["Succeeded", "Failed"]).unwrap();
    assert_eq!(e["status"]["phase"], "Succeeded");
    // A valid edit applies without a restart: the smoke policy now needs approval.
    // (and the concurrency limits follow the file).
    let reconciles = "ep_concurrency_limit{limit=\"reconciles\"}";
    assert_eq!(op.metric(reconciles), Some(4.0));
    let stricter = FAST_SETTINGS
        .replace(
            "smoke: {aliases: [smoke_test], cloudType: SECURE, containerDiskGb: 20, requiresApproval: false",
            "smoke: {aliases: [smoke_test], cloudType: SECURE, containerDiskGb: 20, requiresApproval: true",
        )
        .replace("concurrency: {reconciles: 4, syncs: 2}", "concurrency: {reconciles: 7, syncs: 3}");
    assert_ne!(stricter, FAST_SETTINGS);
    std::fs::write(stack.settings_path(), stricter).unwrap();
    ep_testkit::e2e::wait_until("the new limits apply", LONG, || op.metric(reconciles) == Some(7.0)).unwrap();
    assert_eq!(op.metric("ep_concurrency_limit{limit=\"syncs\"}"), Some(3.0));
    assert!(stack.operator_log(5000).contains("concurrency changed"), "{}", stack.operator_log(50));
    stack.apply(&exp("later").yaml()).unwrap();
    stack
        .wait_for("rpo", Some(NS), "later-a1", LONG, "AwaitingApproval", |o| {
            cond(o, "Ready").is_some_and(|c| c["reason"] == "AwaitingApproval")
        })
        .unwrap();
    assert_eq!(op.metric("ep_settings_rejections_total"), Some(1.0), "the valid edit was not refused");
    let rows = sqlx::PgPool::connect(&stack.database_url).await.unwrap();
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM exp_registry.settings").fetch_one(&rows).await.unwrap();
    assert_eq!(n, 2, "both applied settings files are recorded, the refused one is not");
}

async fn orphans_are_terminated_only_when_the_settings_say_so_and_owned_pods_never(transport: &'static str) {
    init_tls();
    let settings = FAST_SETTINGS.replace("orphans: {action: Report}", "orphans: {action: Terminate}");
    assert_ne!(settings, FAST_SETTINGS);
    let stack = Stack::start(&StackOptions { settings, transport, ..StackOptions::default() }).await.unwrap();
    stack.apply_quickstart(false).unwrap();
    stack.apply(&exp("owned").epochs(8, 0.5).yaml()).unwrap();
    let order = stack.wait_phase("rpo", "owned-a1", &["RUNNER_ONLINE"]).unwrap();
    let owned_pod = order["status"]["podId"].as_str().unwrap().to_owned();
    let by_hand = pod_by_hand(&stack).await;
    let deadline = std::time::Instant::now() + LONG;
    loop {
        let live = stack.live_pods().await.unwrap();
        if live.iter().all(|p| p["id"] != by_hand.id.as_str()) {
            assert!(live.iter().any(|p| p["id"] == owned_pod.as_str()), "the owned pod still runs: {live:?}");
            break;
        }
        assert!(std::time::Instant::now() < deadline, "the orphan was never terminated");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let e = stack.wait_phase("exp", "owned", &["Succeeded", "Failed"]).unwrap();
    assert_eq!(e["status"]["phase"], "Succeeded", "the experiment's own pod was left alone: {}", e["status"]);
    assert_eq!(e["status"]["attempts"], 1);
}
ep_testkit::on_both_transports!(orphans_are_terminated_only_when_the_settings_say_so_and_owned_pods_never);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rest_v2_pod_whose_operator_is_gone_ends_itself_at_its_deadline() {
    // A short deadline: 5 s to start, a 4 s maxRuntime, the runner's 20 s stop grace, the 15 s
    // drain margin and a 1 s drain grace.
    let settings = FAST_SETTINGS.replace("runtimeStartDeadline: 2m", "runtimeStartDeadline: 5s\ndrainGrace: 1s");
    let mut stack = quickstart_stack(&StackOptions { settings, ..StackOptions::default() }).await.unwrap();
    stack.merge_patch("rpp", None, "default", r#"{"spec":{"api":{"transport":"restV2"}}}"#).unwrap();
    stack
        .wait_for("rpp", None, "default", LONG, "Ready over REST v2", |o| {
            o.is_some_and(|o| o["metadata"]["generation"] == o["status"]["observedGeneration"])
                && cond(o, "Ready").is_some_and(|c| c["status"] == "True")
        })
        .unwrap();
    stack.apply(&exp("orphan").epochs(600, 1.0).yaml().replace("maxRuntime: 30m", "maxRuntime: 4s")).unwrap();
    let order = stack.wait_phase("rpo", "orphan-a1", &["RUNNER_ONLINE"]).unwrap();
    // The operator is gone for good: nobody will drain this run or end its pod.
    stack.operator.take().unwrap().kill();
    let pod_id = order["status"]["podId"].as_str().unwrap().to_owned();
    let world = stack.world().await.unwrap();
    let pod = &world["pods"][&pod_id];
    assert!(pod["terminateAfter"].is_null(), "REST v2 has no terminateAfter: {pod}");
    let env: std::collections::BTreeMap<String, String> = serde_json::from_value(pod["env"].clone())
        .or_else(|_| {
            serde_json::from_value::<Vec<(String, String)>>(pod["env"].clone()).map(|v| v.into_iter().collect())
        })
        .unwrap();
    let deadline: chrono::DateTime<chrono::Utc> = env["EP_POD_DEADLINE"].parse().unwrap();
    assert!(env.contains_key("EP_RUNPOD_REST_URL"), "{env:?}");
    let ended = stack
        .wait_for_world(Duration::from_secs(120), |w| {
            w["pods"].get(&pod_id).is_none_or(|p| p.is_null() || p["desiredStatus"] == "TERMINATED")
        })
        .await;
    assert!(ended, "the pod still bills past its deadline {deadline}");
    let now = chrono::Utc::now();
    assert!(now >= deadline, "ended at {now}, before its deadline {deadline}");
    let requests = stack.world().await.unwrap()["requests"].clone();
    assert!(
        requests.as_object().unwrap().keys().any(|k| k.contains("deletePod")),
        "ended through the REST API with the pod's own key: {requests}"
    );
}
