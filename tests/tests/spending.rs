//! Spending governance across real processes (kube-sim with the chart's RBAC and admission
//! policies, runpod-sim, PostgreSQL, ep-operator, kubectl and kubectl-ep as the chart's personas):
//! approval envelopes bound to identity, and namespace budgets that cannot be overrun.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use ep_testkit::e2e::{NS, condition as cond, exp, init_tls, phase};
use ep_testkit::stack::{FAST_SETTINGS, Stack, StackOptions};
use serde_json::{Value, json};

const LONG: Duration = Duration::from_secs(120);

fn waits_with(o: Option<&Value>, reason: &str) -> bool {
    cond(o, "Ready").is_some_and(|c| c["reason"] == reason)
}

/// Vanishes the pod of `order` once its runner is online: the attempt fails and is retried.
async fn lose_the_pod(stack: &Stack, order: &str) {
    let o = stack.wait_for("rpo", Some(NS), order, LONG, "RUNNER_ONLINE", |o| phase(o) == "RUNNER_ONLINE").unwrap();
    let pod = o.unwrap()["status"]["podId"].as_str().unwrap().to_owned();
    stack.admin_post(&format!("pods/{pod}/vanish"), json!({})).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_inside_the_approved_envelope_launches_and_one_past_it_waits() {
    init_tls();
    let stack = Stack::start(&StackOptions::default()).await.unwrap();
    stack.apply_quickstart(false).unwrap();
    let e = exp("env").policy("paper_train").epochs(400, 0.5).attempts(3, Some("1s")).gpus(&["rtx-pro-4500"]);
    stack.apply(&e.yaml()).unwrap();
    stack.wait_for("rpo", Some(NS), "env-a1", LONG, "AwaitingApproval", |o| waits_with(o, "AwaitingApproval")).unwrap();
    // While it waits for approval the registry says READY, and the pipeline's query for running
    // work does not list it.
    let pool = sqlx::PgPool::connect(&stack.database_url).await.unwrap();
    registry_says(&pool, "env", "READY").await;
    let running: Vec<String> = sqlx::query_scalar("SELECT name FROM exp_registry.experiments WHERE status = 'RUNNING'")
        .fetch_all(&pool)
        .await
        .unwrap();
    assert!(running.is_empty(), "{running:?}");
    // An approver cannot approve in someone else's name: admission binds approvedBy to the
    // authenticated user, whatever the client sends.
    let forged = r#"{"spec":{"approval":{"approvedBy":"wren","envelope":{"maxAttempts":9}}}}"#;
    let err = stack
        .kubectl_as("aster", &["patch", "exp", "env", "-n", NS, "--type=merge", "-p", forged])
        .unwrap_err()
        .to_string();
    assert!(err.contains("spec.approval.approvedBy: must be the approving user aster"), "{err}");
    let out = stack.kubectl_ep_as("aster", &["approve", "env", "-n", NS, "--yes", "--max-attempts", "2"]).unwrap();
    assert!(out.contains("approved by aster within GPUs rtx-pro-4500") && out.contains("2 attempts"), "{out}");

    // Attempts 1 and 2 launch inside the envelope: no one approves their orders. Once the runner
    // is online the registry says RUNNING.
    stack.wait_for("rpo", Some(NS), "env-a1", LONG, "RUNNER_ONLINE", |o| phase(o) == "RUNNER_ONLINE").unwrap();
    registry_says(&pool, "env", "RUNNING").await;
    lose_the_pod(&stack, "env-a1").await;
    lose_the_pod(&stack, "env-a2").await;
    let a2 = stack.get("rpo", Some(NS), "env-a2").unwrap().unwrap();
    assert!(a2["spec"].get("approved").is_none(), "the retry's order was never approved by itself");
    assert_eq!(a2["status"]["approvedBy"], "aster (experiment envelope)");
    // Attempt 3 is past the envelope: it waits for a person, and nothing is paid for.
    let a3 = stack
        .wait_for("rpo", Some(NS), "env-a3", LONG, "AwaitingApproval", |o| waits_with(o, "AwaitingApproval"))
        .unwrap()
        .unwrap();
    let msg = cond(Some(&a3), "Ready").unwrap()["message"].as_str().unwrap().to_owned();
    assert!(msg.contains("attempt 3 is past the 2 attempts approved") && msg.contains("aster"), "{msg}");
    assert!(stack.live_pods().await.unwrap().is_empty(), "nothing runs outside the envelope");

    // The registry keeps who approved, when, and the envelope.
    let (by, at, envelope): (Option<String>, Option<chrono::DateTime<chrono::Utc>>, Option<Value>) = sqlx::query_as(
        "SELECT approved_by, approved_at, approval_envelope FROM exp_registry.experiments WHERE name = 'env'",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(by.as_deref(), Some("aster"));
    assert!(at.is_some());
    assert_eq!(envelope.unwrap()["maxAttempts"], 2);

    // Approving again with room for one more attempt lets attempt 3 run.
    let out = stack.kubectl_ep_as("aster", &["approve", "env", "-n", NS, "--yes", "--max-attempts", "3"]).unwrap();
    assert!(out.contains("3 attempts"), "{out}");
    stack.wait_for("rpo", Some(NS), "env-a3", LONG, "RUNNER_ONLINE", |o| phase(o) == "RUNNER_ONLINE").unwrap();
    stack.kubectl_ep(&["stop", "env", "-n", NS, "--reason", "test over"]).unwrap();
    stack.wait_for("rpo", Some(NS), "env-a3", LONG, "DELETED", |o| phase(o) == "DELETED").unwrap();
}

/// Waits until the registry's row of experiment `name` has `status`.
async fn registry_says(pool: &sqlx::PgPool, name: &str, status: &str) {
    let deadline = std::time::Instant::now() + LONG;
    loop {
        let now: Option<String> = sqlx::query_scalar("SELECT status FROM exp_registry.experiments WHERE name = $1")
            .bind(name)
            .fetch_optional(pool)
            .await
            .unwrap();
        if now.as_deref() == Some(status) {
            return;
        }
        assert!(std::time::Instant::now() < deadline, "registry says {now:?} for {name}, not {status}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The namespace's ledger entries (ConfigMap ep-spend-ledger), parsed.
fn ledger(stack: &Stack) -> Vec<Value> {
    let cm = stack.get("configmap", Some(NS), "ep-spend-ledger").unwrap().expect("the spend ledger exists");
    cm["data"].as_object().unwrap().values().map(|v| serde_json::from_str(v.as_str().unwrap()).unwrap()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_orders_at_once_fit_one_at_a_time_and_deleted_work_still_counts() {
    init_tls();
    let one_gpu = "default: {maxUsdPerDay: 50, maxConcurrentGpus: 4}\n  namespaces: {ep-quickstart: {maxUsdPerDay: 50, maxConcurrentGpus: 1}}";
    let settings = FAST_SETTINGS.replace("default: {maxUsdPerDay: 50, maxConcurrentGpus: 4}", one_gpu);
    assert_ne!(settings, FAST_SETTINGS);
    let stack = Stack::start(&StackOptions { settings: settings.clone(), ..StackOptions::default() }).await.unwrap();
    stack.apply_quickstart(false).unwrap();
    // Both in one apply: their orders are admitted at the same moment into room for one GPU.
    let both = format!("{}---\n{}", exp("left").epochs(12, 0.5).yaml(), exp("right").epochs(12, 0.5).yaml());
    stack.apply(&both).unwrap();
    let mut waiting = None;
    let deadline = std::time::Instant::now() + LONG;
    while waiting.is_none() {
        assert!(std::time::Instant::now() < deadline, "neither order waited for the budget");
        for name in ["left-a1", "right-a1"] {
            let o = stack.get("rpo", Some(NS), name).unwrap();
            if waits_with(o.as_ref(), "BudgetExceeded") {
                waiting = Some((name, cond(o.as_ref(), "Ready").unwrap()["message"].as_str().unwrap().to_owned()));
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (held, msg) = waiting.unwrap();
    assert!(msg.contains("namespace ep-quickstart holds 1 GPUs and may hold 1"), "the figures: {msg}");
    let other = if held == "left-a1" { "right" } else { "left" };
    stack
        .wait_for("rpo", Some(NS), &format!("{other}-a1"), LONG, "RUNNER_ONLINE", |o| phase(o) == "RUNNER_ONLINE")
        .unwrap();
    assert_eq!(stack.live_pods().await.unwrap().len(), 1, "exactly one launched");
    // When the first ends, the second gets the GPU.
    let first = stack.wait_phase("exp", other, &["Succeeded", "Failed"]).unwrap();
    assert_eq!(first["status"]["phase"], "Succeeded");
    let second = held.trim_end_matches("-a1");
    assert_eq!(stack.wait_phase("exp", second, &["Succeeded", "Failed"]).unwrap()["status"]["phase"], "Succeeded");

    // Deleting the experiments (and so their orders) keeps their spend in the ledger.
    stack.kubectl(&["delete", "exp", "left", "right", "-n", NS, "--wait=true"]).unwrap();
    wait_gone(&stack, "left-a1");
    wait_gone(&stack, "right-a1");
    let entries = ledger(&stack);
    // An entry per order, or a day's entry summing the closed orders that ended ("orders").
    let orders: u64 = entries.iter().map(|e| e["orders"].as_u64().unwrap_or(1)).sum();
    assert_eq!(orders, 2, "{entries:?}");
    let spent: f64 = entries.iter().map(|e| e["spentUsd"].as_f64().unwrap()).sum();
    assert!(entries.iter().all(|e| e["open"] == false) && spent > 0.0, "{entries:?}");
    // A budget below what the deleted work spent leaves no room today: it still counts.
    let tight = format!("namespaces: {{ep-quickstart: {{maxUsdPerDay: {:.6}, maxConcurrentGpus: 1}}}}", spent / 2.0);
    let loose = "namespaces: {ep-quickstart: {maxUsdPerDay: 50, maxConcurrentGpus: 1}}";
    std::fs::write(stack.settings_path(), settings.replace(loose, &tight)).unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    stack.apply(&exp("after").yaml()).unwrap();
    let o = stack
        .wait_for("rpo", Some(NS), "after-a1", LONG, "BudgetExceeded", |o| waits_with(o, "BudgetExceeded"))
        .unwrap();
    let msg = cond(o.as_ref(), "Ready").unwrap()["message"].as_str().unwrap().to_owned();
    assert!(msg.contains("spent or reserved today (UTC)") && msg.contains("daily budget"), "{msg}");
    assert!(stack.live_pods().await.unwrap().is_empty());

    // The registry's ledger answers what the namespace spent, in one query, deleted work included.
    let pool = sqlx::PgPool::connect(&stack.database_url).await.unwrap();
    let (rows, total): (i64, Option<f64>) = sqlx::query_as(
        "SELECT count(*), sum(spent_usd) FROM exp_registry.spend_ledger \
         WHERE namespace = 'ep-quickstart' AND day >= date_trunc('month', now() AT TIME ZONE 'UTC')::date",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert!(rows >= 2, "one row per order and day");
    assert!((total.unwrap_or(0.0) - spent).abs() < 0.01, "registry {total:?} vs ledger {spent}");
}

fn wait_gone(stack: &Stack, order: &str) {
    ep_testkit::e2e::wait_until(&format!("{order} gone"), LONG, || {
        stack.get("rpo", Some(NS), order).unwrap().is_none()
    })
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_that_reaches_the_approved_total_is_drained_with_its_checkpoints_kept() {
    init_tls();
    let stack = Stack::start(&StackOptions::default()).await.unwrap();
    stack.apply_quickstart(false).unwrap();
    let e = exp("capped").policy("paper_train").epochs(400, 0.5).attempts(2, Some("1s")).gpus(&["rtx-pro-4500"]);
    stack.apply(&e.retention("Keep").yaml()).unwrap();
    // At $0.72/h the run reaches a tenth of a cent within seconds of its pod being asked for.
    let out =
        stack.kubectl_ep_as("aster", &["approve", "capped", "-n", NS, "--yes", "--max-total-usd", "0.001"]).unwrap();
    assert!(out.contains("$0.0010 in all"), "{out}");
    let o = stack.wait_for("rpo", Some(NS), "capped-a1", LONG, "DELETED", |o| phase(o) == "DELETED").unwrap().unwrap();
    let st = &o["status"];
    assert_eq!(st["drainReason"], "CostLimitReached", "{st}");
    assert_eq!(st["outcome"]["state"], "Stopped", "drained through the runner's stop, not killed: {st}");
    assert!(st["outcome"]["artifacts"]["receipt"].is_string(), "what the run wrote is verified and kept: {st}");
    assert!(stack.live_pods().await.unwrap().is_empty());
    // The experiment is out of approved money: it ends, and no further attempt is ordered.
    let exp = stack.wait_phase("exp", "capped", &["Failed", "Succeeded"]).unwrap();
    assert_eq!(exp["status"]["phase"], "Failed", "{}", exp["status"]);
    assert_eq!(exp["status"]["history"][0]["outcome"], "Stopped");
    assert!(stack.get("rpo", Some(NS), "capped-a2").unwrap().is_none());
}
