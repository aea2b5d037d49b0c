//! The pipeline's own registry, adopted as it is: the operator starts on the database people already
//! query, keeps every row, adds its columns, and the pipeline's four queries answer the old rows
//! unchanged plus the operator's experiments. One it cannot adopt without converting data is
//! refused, and the refusal shows on every Experiment.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use ep_testkit::e2e::{NS, condition, init_tls};
use ep_testkit::registry::{rows, wait_registry};
use ep_testkit::stack::{Stack, StackOptions, seed_database};

const PIPELINE: &str = include_str!("../fixtures/pipeline/registry.sql");

/// The four queries of DESIGN.md section 7, as people type them.
const QUERIES: [&str; 4] = [
    "SELECT name, status FROM exp_registry.experiments WHERE name = 'gnn-fraud-baseline'",
    "SELECT name, status, result_f1, result_auc FROM exp_registry.experiments ORDER BY name",
    "SELECT name, worker_id, started_at FROM exp_registry.experiments WHERE status = 'RUNNING'",
    "SELECT worker_id, last_seen, running_jobs FROM exp_registry.worker_heartbeats",
];

async fn answers(url: &str) -> Vec<Vec<Vec<String>>> {
    let mut out = Vec::new();
    for q in QUERIES {
        let mut r = rows(url, q).await;
        r.sort();
        out.push(r);
    }
    out
}

/// Everything the operator could change: the schema's columns and indexes, the migrations applied,
/// and every row of the two tables the pipeline had (the time of the last write left out).
async fn snapshot(url: &str) -> Vec<Vec<String>> {
    let mut out = rows(
        url,
        "SELECT table_name, column_name, data_type, is_nullable, column_default FROM information_schema.columns \
         WHERE table_schema = 'exp_registry' ORDER BY table_name, column_name",
    )
    .await;
    out.extend(
        rows(url, "SELECT indexname, indexdef FROM pg_indexes WHERE schemaname = 'exp_registry' ORDER BY 1").await,
    );
    out.extend(rows(url, "SELECT version, checksum FROM _sqlx_migrations ORDER BY version").await);
    out.extend(
        rows(url, "SELECT to_jsonb(e) - 'updated_at' AS r FROM exp_registry.experiments e ORDER BY namespace, name")
            .await,
    );
    out.extend(rows(url, "SELECT * FROM exp_registry.worker_heartbeats ORDER BY worker_id").await);
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pipelines_registry_is_adopted_and_its_queries_answer_old_rows_and_new() {
    init_tls();
    let opts = StackOptions { registry_seed: Some(PIPELINE.to_owned()), ..StackOptions::default() };
    let mut stack = Stack::start(&opts).await.unwrap();
    // The same registry, untouched by any operator, answers what people saw before.
    let before_url = stack.pg.create_database("before").await.unwrap();
    seed_database(&before_url, PIPELINE).await.unwrap();
    let before = answers(&before_url).await;
    assert_eq!(before[1].len(), 4, "{before:?}");

    stack.apply_quickstart(true).unwrap();
    let exp = stack.wait_phase("exp", "quickstart", &["Succeeded", "Failed"]).unwrap();
    assert_eq!(exp["status"]["phase"], "Succeeded", "{}", stack.operator_log(40));
    wait_registry(&stack.database_url, "quickstart", "COMPLETED").await;
    let after = answers(&stack.database_url).await;

    // 1: the old row, unchanged.
    assert_eq!(after[0], before[0]);
    // 2: every old row unchanged, plus the operator's experiment with its results.
    let new: Vec<_> = after[1].iter().filter(|r| !before[1].contains(r)).collect();
    assert_eq!(after[1].len(), before[1].len() + 1, "{:?}", after[1]);
    assert_eq!(new.len(), 1, "{new:?}");
    // Columns come back by name, in alphabetical order: name, result_auc, result_f1, status.
    assert!(new[0][0] == "name=\"quickstart\"" && new[0][3] == "status=\"COMPLETED\"", "{new:?}");
    assert!(!new[0][1].ends_with('∅') && !new[0][2].ends_with('∅'), "results recorded: {new:?}");
    // 3: the pipeline's running row still answers (the operator's run is over).
    assert_eq!(after[2], before[2]);
    // 4: the old workers unchanged, plus the quickstart's worker with no run live.
    let new: Vec<_> = after[3].iter().filter(|r| !before[3].contains(r)).collect();
    assert_eq!(after[3].len(), before[3].len() + 1, "{:?}", after[3]);
    assert!(new[0][2] == "worker_id=\"runpod-1\"" && new[0][1] == "running_jobs=0", "{new:?}");

    // The old rows gained the operator's columns, in no namespace (they were never objects).
    let old = rows(
        &stack.database_url,
        "SELECT namespace, id IS NOT NULL AS has_id, attempts FROM exp_registry.experiments WHERE name = 'tabular-xgb'",
    )
    .await;
    assert_eq!(old, vec![vec!["attempts=0", "has_id=true", "namespace=\"\""]]);

    // A second start migrates again and changes nothing more.
    let first = snapshot(&stack.database_url).await;
    stack.operator.as_mut().unwrap().stop();
    stack.start_operator().unwrap();
    tokio::time::sleep(Duration::from_secs(4)).await;
    let second = snapshot(&stack.database_url).await;
    assert_eq!(first, second);
    assert_eq!(answers(&stack.database_url).await, after);
    let migrations = rows(&stack.database_url, "SELECT count(*) AS n FROM _sqlx_migrations").await;
    let n = ep_operator::registry::pg_migrations().len();
    assert_eq!(migrations, vec![vec![format!("n={n}")]]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registry_that_needs_converting_is_refused_on_every_experiment_and_keeps_its_rows() {
    init_tls();
    // The pipeline stored F1 as text: adopting it would mean rewriting the column.
    let seed = PIPELINE.replace("result_f1   double precision", "result_f1   text");
    let opts = StackOptions { registry_seed: Some(seed.clone()), ..StackOptions::default() };
    let stack = Stack::start(&opts).await.unwrap();
    stack.apply_quickstart(true).unwrap();
    ep_testkit::e2e::wait_until("the refusal on the experiment", Duration::from_secs(60), || {
        let exp = stack.get("exp", Some(NS), "quickstart").unwrap();
        condition(exp.as_ref(), "RegistrySynced").is_some_and(|c| c["reason"] == "RegistrySchemaRefused")
    })
    .unwrap();
    let exp = stack.get("exp", Some(NS), "quickstart").unwrap();
    let c = condition(exp.as_ref(), "RegistrySynced").unwrap();
    let msg = c["message"].as_str().unwrap();
    assert!(msg.contains("exp_registry.experiments.result_f1 is text"), "{msg}");
    let described = stack.kubectl(&["describe", "exp", "-n", NS, "quickstart"]).unwrap();
    assert!(described.contains("RegistrySchemaRefused"), "{described}");

    // Nothing was changed: the rows and columns are the pipeline's, and no migration ran.
    let pristine = stack.pg.create_database("pristine").await.unwrap();
    seed_database(&pristine, &seed).await.unwrap();
    let table = "SELECT to_jsonb(e) AS r FROM exp_registry.experiments e ORDER BY name";
    assert_eq!(rows(&stack.database_url, table).await, rows(&pristine, table).await);
    let migrations = rows(&stack.database_url, "SELECT count(*) AS n FROM _sqlx_migrations").await;
    assert!(migrations.is_empty() || migrations == vec![vec!["n=0"]], "{migrations:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_runs_on_one_worker_are_one_heartbeat_row_with_two_running_jobs_and_each_holds_a_lease() {
    let stack = ep_testkit::e2e::quickstart_stack(&StackOptions::default()).await.unwrap();
    for name in ["twin-a", "twin-b"] {
        stack.apply(&ep_testkit::e2e::exp(name).epochs(30, 1.0).yaml()).unwrap();
    }
    let url = stack.database_url.clone();
    let q = "SELECT worker_id, running_jobs FROM exp_registry.worker_heartbeats WHERE worker_id = 'runpod-1'";
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    loop {
        let r = rows(&url, q).await;
        if r == vec![vec!["running_jobs=2", "worker_id=\"runpod-1\""]] {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "never two running jobs on runpod-1: {r:?}\n{}",
            stack.operator_log(30)
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let leases = rows(
        &url,
        "SELECT run_id, lease_expires_at > now() AS live, heartbeat_seq > 0 AS beating FROM exp_registry.attempts \
         WHERE status = 'RUNNING' ORDER BY run_id",
    )
    .await;
    assert_eq!(leases.len(), 2, "{leases:?}");
    assert!(leases.iter().all(|r| r[1] == "live=true" && r[0] == "beating=true"), "{leases:?}");
    // Both end: the row stays one row, with nothing running.
    for name in ["twin-a", "twin-b"] {
        stack.kubectl_ep(&["stop", name, "-n", NS, "--reason", "enough"]).unwrap();
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    while rows(&url, q).await != vec![vec!["running_jobs=0", "worker_id=\"runpod-1\""]] {
        assert!(std::time::Instant::now() < deadline, "running_jobs never went back to 0");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_order_made_by_hand_for_a_stale_attempt_is_re_bound_to_the_next_and_the_repair_is_recorded() {
    let stack = ep_testkit::e2e::quickstart_stack(&StackOptions::default()).await.unwrap();
    // Attempt 1 fails at once (argparse refuses the epochs); attempt 2 comes after a 20 s backoff
    // (retry.when names the script's failure: by default only a lost pod is retried).
    let yaml = ep_testkit::e2e::exp("stale")
        .attempts(2, Some("20s"))
        .yaml()
        .replace(r#"--epochs, "3""#, r#"--epochs, "three""#)
        .replace("retry: {maxAttempts: 2, backoff: 20s}", "retry: {maxAttempts: 2, backoff: 20s, when: [NonZeroExit]}");
    assert!(yaml.contains("when: [NonZeroExit]"));
    stack.apply(&yaml).unwrap();
    stack.wait_phase("exp", "stale", &["NeedsRerun", "Failed"]).unwrap();
    // A person made an order for attempt 1, which is over: the binding it asks for is stale.
    let order = stack.get("rpo", Some(NS), "stale-a1").unwrap().unwrap();
    let mut spec = order["spec"].clone();
    spec.as_object_mut().unwrap().remove("run");
    let by_hand = serde_json::json!({
        "apiVersion": "ep.dev/v1alpha1", "kind": "RunPodOrder",
        "metadata": {"name": "stale-by-hand", "namespace": NS},
        "spec": spec,
    });
    stack.apply(&serde_json::to_string(&by_hand).unwrap()).unwrap();
    let exp = stack.wait_phase("exp", "stale", &["Failed"]).unwrap();
    let history = exp["status"]["history"].as_array().unwrap();
    assert_eq!(history.len(), 2, "{history:?}");
    assert_eq!(history[1]["order"], "stale-by-hand", "attempt 2 ran in the order made by hand: {history:?}");
    let orders = stack.kubectl(&["get", "rpo", "-n", NS, "-o", "name"]).unwrap();
    assert!(!orders.contains("stale-a2"), "no second order for attempt 2: {orders}");
    let events = stack.kubectl(&["get", "events", "-n", NS, "--field-selector", "reason=BindingRepaired"]).unwrap();
    assert!(events.contains("stale binding cleared: order stale-by-hand was bound to attempt 1"), "{events}");
    let url = stack.database_url.clone();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let q =
        "SELECT attempt, order_name, reconcile_action FROM exp_registry.attempts WHERE order_name = 'stale-by-hand'";
    loop {
        let r = rows(&url, q).await;
        if r.len() == 1 && r[0][2].contains("re-bound to attempt 2") {
            assert_eq!(r[0][0], "attempt=2");
            break;
        }
        assert!(std::time::Instant::now() < deadline, "registry never recorded the repair: {r:?}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// `kubectl ep push DIR` against the stack's volume, as a user runs it: the payload's digest.
fn push(stack: &Stack, dir: &std::path::Path) -> String {
    let out = std::process::Command::new(ep_testkit::sim::workspace_bin("kubectl-ep").unwrap())
        .arg("push")
        .arg(dir)
        .env("EP_S3_ENDPOINT", stack.runpod.get("s3"))
        .env("EP_S3_REGION", "EU-RO-1")
        .env("EP_VOLUME_ID", "tgb8bx6fwl")
        .env("EP_S3_ACCESS_KEY_ID", stack.runpod.get("s3_access_key"))
        .env("EP_S3_SECRET_ACCESS_KEY", stack.runpod.get("s3_secret_key"))
        .env("EP_CACHE_DIR", stack.dir.path().join("cache"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_payload_pushed_by_digest_runs_only_the_declared_locations_without_the_excludes() {
    let stack = ep_testkit::e2e::quickstart_stack(&StackOptions::default()).await.unwrap();
    // Pushed whole: train.py, the YAML files and a data directory nobody declared.
    let dir = tempfile::tempdir().unwrap();
    let src = ep_testkit::workspace_root().join("examples/quickstart");
    for e in std::fs::read_dir(&src).unwrap().flatten() {
        std::fs::copy(e.path(), dir.path().join(e.file_name())).unwrap();
    }
    std::fs::create_dir_all(dir.path().join("data")).unwrap();
    std::fs::write(dir.path().join("data/huge.csv"), "a,b\n1,2\n").unwrap();
    let digest = push(&stack, dir.path());
    let payload = format!("{{digest: \"{digest}\", locations: [train.py, data], excludes: [\"*.csv\"]}}");
    let yaml = ep_testkit::e2e::exp("declared").yaml().replace("{configMap: {name: quickstart-code}}", &payload);
    stack.apply(&yaml).unwrap();
    let e = stack.wait_phase("exp", "declared", &["Succeeded", "Failed"]).unwrap();
    assert_eq!(e["status"]["phase"], "Succeeded", "{}", e["status"]);
    let order = stack.get("rpo", Some(NS), "declared-a1").unwrap().unwrap();
    let run_id = order["status"]["runId"].as_str().unwrap();
    assert_ne!(format!("sha256:{}", order["status"]["payloadId"].as_str().unwrap()), digest, "narrowed");
    let copy = stack.volume_dir("tgb8bx6fwl").join("ep/runs").join(run_id).join("payload");
    let mut got: Vec<String> = walkdir(&copy);
    got.sort();
    assert_eq!(got, ["train.py"], "the run saw only what the experiment declares");

    // A declared location the pushed payload lacks: refused before any pod, with the reason.
    let payload = format!("{{digest: \"{digest}\", locations: [model/]}}");
    let yaml = ep_testkit::e2e::exp("undeclared").yaml().replace("{configMap: {name: quickstart-code}}", &payload);
    stack.apply(&yaml).unwrap();
    let order = stack
        .wait_for("rpo", Some(NS), "undeclared-a1", Duration::from_secs(60), "InvalidPayload", |o| {
            condition(o, "Ready").is_some_and(|c| c["reason"] == "InvalidPayload")
        })
        .unwrap()
        .unwrap();
    let msg = condition(Some(&order), "Ready").unwrap()["message"].as_str().unwrap().to_owned();
    assert!(msg.contains("\"model/\"") && msg.contains("is not in the pushed payload"), "{msg}");
    assert_eq!(stack.live_pods().await.unwrap().len(), 0);
}

fn walkdir(dir: &std::path::Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            if e.path().is_dir() {
                todo.push(e.path());
            } else {
                out.push(e.path().strip_prefix(dir).unwrap().display().to_string());
            }
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keep_keeps_every_checkpoint_and_discard_leaves_none_while_the_results_stay() {
    let stack = ep_testkit::e2e::quickstart_stack(&StackOptions::default()).await.unwrap();
    for (name, class) in [("keep", "Keep"), ("discard", "Discard")] {
        stack.apply(&ep_testkit::e2e::exp(name).epochs(4, 0.0).retention(class).yaml()).unwrap();
    }
    for (name, want) in [("keep", 4), ("discard", 0)] {
        let e = stack.wait_phase("exp", name, &["Succeeded", "Failed"]).unwrap();
        assert_eq!(e["status"]["phase"], "Succeeded", "{}", e["status"]);
        let order = stack.get("rpo", Some(NS), &format!("{name}-a1")).unwrap().unwrap();
        let run_id = order["status"]["runId"].as_str().unwrap();
        let run = stack.volume_dir("tgb8bx6fwl").join("ep/runs").join(run_id);
        let ckpts = walkdir(&run.join("artifacts/checkpoints"));
        assert_eq!(ckpts.len(), want, "{name}: {ckpts:?}");
        assert!(run.join("artifacts/results.json").is_file(), "{name}: results are never discarded");
        let said = order["status"]["outcome"]["retention"].as_str().unwrap_or_default().to_owned();
        assert!(said.starts_with(if name == "keep" { "Keep" } else { "Discard" }), "{name}: {said}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registry_row_that_disagrees_with_the_cluster_is_reported_both_ways_and_never_overwritten() {
    let stack = ep_testkit::e2e::quickstart_stack(&StackOptions::default()).await.unwrap();
    stack.apply(&ep_testkit::e2e::exp("audited").yaml()).unwrap();
    stack.wait_phase("exp", "audited", &["Succeeded"]).unwrap();
    let url = stack.database_url.clone();
    wait_registry(&url, "audited", "COMPLETED").await;
    // By hand: the finished run is marked RUNNING again, and a run the cluster never had appears.
    seed_database(
        &url,
        "UPDATE exp_registry.experiments SET status = 'RUNNING' WHERE name = 'audited';
         INSERT INTO exp_registry.experiments (namespace, name, status) VALUES ('ep-quickstart', 'ghost', 'RUNNING');",
    )
    .await
    .unwrap();
    ep_testkit::e2e::wait_until("the divergence on the experiment", Duration::from_secs(60), || {
        let exp = stack.get("exp", Some(NS), "audited").unwrap();
        condition(exp.as_ref(), "RegistrySynced").is_some_and(|c| c["reason"] == "RegistryDivergence")
    })
    .unwrap();
    let exp = stack.get("exp", Some(NS), "audited").unwrap();
    let c = condition(exp.as_ref(), "RegistrySynced").unwrap();
    assert!(c["message"].as_str().unwrap().contains("says RUNNING and the cluster says COMPLETED"), "{c}");
    let events = stack.kubectl(&["get", "events", "-n", NS, "--field-selector", "reason=RegistryDivergence"]).unwrap();
    assert!(events.contains("audited"), "{events}");
    let op = stack.operator.as_ref().unwrap();
    assert_eq!(op.metric("ep_registry_divergences"), Some(2.0), "the ghost row counts too");
    // Not overwritten, even across the operator's rewrites: a person decides.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(ep_testkit::registry::registry_status(&url, "audited").await.as_deref(), Some("RUNNING"));
    // Corrected by hand: the report goes.
    seed_database(
        &url,
        "UPDATE exp_registry.experiments SET status = 'COMPLETED' WHERE name = 'audited';
         DELETE FROM exp_registry.experiments WHERE name = 'ghost';",
    )
    .await
    .unwrap();
    ep_testkit::e2e::wait_until("the report to go", Duration::from_secs(60), || {
        let exp = stack.get("exp", Some(NS), "audited").unwrap();
        condition(exp.as_ref(), "RegistrySynced").is_some_and(|c| c["reason"] == "Mirrored")
    })
    .unwrap();
    assert_eq!(stack.operator.as_ref().unwrap().metric("ep_registry_divergences"), Some(0.0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_runner_heartbeating_with_the_same_claim_is_stopped_and_the_first_finishes_the_run() {
    let stack = ep_testkit::e2e::quickstart_stack(&StackOptions::default()).await.unwrap();
    stack.apply(&ep_testkit::e2e::exp("owned").epochs(12, 0.5).yaml()).unwrap();
    let order = stack.wait_phase("rpo", "owned-a1", &["RUNNER_ONLINE"]).unwrap();
    let run_id = order["status"]["runId"].as_str().unwrap().to_owned();
    let dir = stack.volume_dir("tgb8bx6fwl").join("ep/runs").join(&run_id);
    // Another runner (a duplicate pod, or one started by hand without the start guard) beats with
    // the same claim; it started after the pod's runner.
    let beat: serde_json::Value = serde_json::from_slice(&std::fs::read(dir.join("heartbeat.json")).unwrap()).unwrap();
    let owner_host = beat["runner"]["host"].as_str().unwrap().to_owned();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let mut seq = 1_000_000;
    loop {
        let events =
            stack.kubectl(&["get", "events", "-n", NS, "--field-selector", "reason=DuplicateRunnerStopped"]).unwrap();
        if events.contains("owned-a1") {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "the second runner was never noticed");
        let mut forged = beat.clone();
        seq += 1;
        forged["seq"] = seq.into();
        forged["time"] = chrono::Utc::now().to_rfc3339().into();
        forged["runner"] =
            serde_json::json!({"host": "intruder", "pid": 1, "startedAt": chrono::Utc::now().to_rfc3339()});
        let tmp = dir.join(".forged.tmp");
        std::fs::write(&tmp, serde_json::to_vec(&forged).unwrap()).unwrap();
        std::fs::rename(&tmp, dir.join("heartbeat.json")).unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let owner: serde_json::Value = serde_json::from_slice(&std::fs::read(dir.join("owner.json")).unwrap()).unwrap();
    assert_eq!(owner["runner"]["host"], owner_host.as_str(), "the pod's runner keeps the run: {owner}");
    let e = stack.wait_phase("exp", "owned", &["Succeeded", "Failed"]).unwrap();
    assert_eq!(e["status"]["phase"], "Succeeded", "{}", e["status"]);
    let order = stack.get("rpo", Some(NS), "owned-a1").unwrap().unwrap();
    assert_eq!(order["status"]["heartbeat"]["runner"]["host"], owner_host.as_str());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exclusive_worker_takes_one_run_at_a_time_and_the_next_waits_with_worker_busy() {
    let stack = ep_testkit::e2e::quickstart_stack(&StackOptions::default()).await.unwrap();
    let affinity = "  workerAffinity: {workers: [runpod-1], exclusive: true, nodeType: l4}\n";
    stack.apply(&(ep_testkit::e2e::exp("solo-a").epochs(8, 0.5).yaml() + affinity)).unwrap();
    stack.wait_phase("rpo", "solo-a-a1", &["RUNNER_ONLINE"]).unwrap();
    stack.apply(&(ep_testkit::e2e::exp("solo-b").epochs(2, 0.0).yaml() + affinity)).unwrap();
    ep_testkit::e2e::wait_until("solo-b waiting for the worker", Duration::from_secs(30), || {
        let e = stack.get("exp", Some(NS), "solo-b").unwrap();
        condition(e.as_ref(), "Ready").is_some_and(|c| c["reason"] == "WorkerBusy")
    })
    .unwrap();
    let e = stack.get("exp", Some(NS), "solo-b").unwrap().unwrap();
    let msg = condition(Some(&e), "Ready").unwrap()["message"].as_str().unwrap().to_owned();
    assert!(msg.contains("runpod-1 (order solo-a-a1)"), "{msg}");
    assert!(stack.get("rpo", Some(NS), "solo-b-a1").unwrap().is_none(), "nothing ordered while the worker is busy");
    // When the first run ends, the second takes the worker, on the node type alone.
    for name in ["solo-a", "solo-b"] {
        let e = stack.wait_phase("exp", name, &["Succeeded", "Failed"]).unwrap();
        assert_eq!(e["status"]["phase"], "Succeeded", "{name}: {}", e["status"]);
    }
    let b = stack.get("rpo", Some(NS), "solo-b-a1").unwrap().unwrap();
    assert_eq!(b["spec"]["gpu"]["types"], serde_json::json!(["l4"]));
    assert_eq!(b["status"]["gpu"]["typeId"], "NVIDIA L4");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_entry_script_the_payload_lacks_is_refused_before_any_pod_and_needs_a_rerun() {
    let stack = ep_testkit::e2e::quickstart_stack(&StackOptions::default()).await.unwrap();
    let yaml = ep_testkit::e2e::exp("typo").yaml().replace("[python3, train.py]", "[python3, trian.py]");
    stack.apply(&yaml).unwrap();
    let order = stack
        .wait_for("rpo", Some(NS), "typo-a1", Duration::from_secs(60), "InvalidPayload", |o| {
            condition(o, "Ready").is_some_and(|c| c["reason"] == "InvalidPayload")
        })
        .unwrap()
        .unwrap();
    let msg = condition(Some(&order), "Ready").unwrap()["message"].as_str().unwrap().to_owned();
    assert!(msg.contains("spec.entry runs trian.py") && msg.contains("train.py"), "{msg}");
    assert!(stack.live_pods().await.unwrap().is_empty());
    let world = stack.world().await.unwrap();
    let pods = world["pods"].as_object().expect("runpod-sim's world lists pods by id");
    assert!(pods.is_empty(), "runpod-sim never saw a create: {world}");
    wait_registry(&stack.database_url, "typo", "NEEDS_RERUN").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_whose_files_s3_listings_leave_out_is_still_collected_because_nothing_is_listed() {
    use ep_volume::VolumeStore;
    let stack = ep_testkit::e2e::quickstart_stack(&StackOptions::default()).await.unwrap();
    // RunPod's listings leave out (or are slow to show) files written inside the pod.
    stack.faults(serde_json::json!({"s3HidePodFiles": true})).await.unwrap();
    stack.apply(&ep_testkit::e2e::exp("unlisted").yaml()).unwrap();
    let e = stack.wait_phase("exp", "unlisted", &["Succeeded", "Failed"]).unwrap();
    assert_eq!(e["status"]["phase"], "Succeeded", "{}", e["status"]);
    assert!(e["status"]["results"]["f1"].is_f64(), "{}", e["status"]);
    let store = ep_volume::store::S3Volume::new(ep_volume::store::S3Settings::new(
        &stack.runpod.get("s3"),
        "EU-RO-1",
        "tgb8bx6fwl",
        &stack.runpod.get("s3_access_key"),
        &stack.runpod.get("s3_secret_key"),
    ));
    let hidden = store.usage().await.unwrap().unwrap().objects;
    stack.faults(serde_json::json!({"s3HidePodFiles": false})).await.unwrap();
    let all = store.usage().await.unwrap().unwrap().objects;
    assert!(hidden < all, "the listing hid the pod's files ({hidden} of {all} objects listed)");
}
