//! The whole lifecycle across real processes: PostgreSQL, runpod-sim, kube-sim, the ep-operator
//! binary and kubectl. Each test starts its own stack on free ports.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use ep_testkit::e2e::{NS, exp, init_tls, quickstart_stack};
use ep_testkit::registry::{shape, wait_registry};
use ep_testkit::stack::{Stack, StackOptions};
use serde_json::{Value, json};
use sqlx::Row;

const VOLUME: &str = "tgb8bx6fwl";
const LONG: Duration = Duration::from_secs(180);

/// A quickstart-like experiment with two attempts, a short backoff and KeepLast checkpoints.
fn quick(name: &str, epochs: u32, sleep: f64) -> String {
    exp(name).epochs(epochs, sleep).attempts(2, Some("2s")).retention("KeepLast").yaml()
}

/// sha256 of every file under a run's prefix on the volume.
fn snapshot(dir: &Path) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if !p.to_string_lossy().contains(".ep-") {
                let rel = p.strip_prefix(dir).unwrap().display().to_string();
                out.insert(rel, ep_volume::manifest::sha256_file(&p).unwrap());
            }
        }
    }
    out
}

async fn query(url: &str, sql: &str) -> Vec<Vec<String>> {
    let pool = sqlx::PgPool::connect(url).await.unwrap();
    let rows = sqlx::query(sqlx::AssertSqlSafe(sql.to_owned())).fetch_all(&pool).await.unwrap();
    pool.close().await;
    rows.iter()
        .map(|r| {
            (0..r.len())
                .map(|i| {
                    r.try_get::<Option<String>, _>(i)
                        .map(Option::unwrap_or_default)
                        .or_else(|_| {
                            r.try_get::<Option<f64>, _>(i).map(|v| v.map(|x| x.to_string()).unwrap_or_default())
                        })
                        .or_else(|_| {
                            r.try_get::<Option<i32>, _>(i).map(|v| v.map(|x| x.to_string()).unwrap_or_default())
                        })
                        .or_else(|_| {
                            r.try_get::<Option<i64>, _>(i).map(|v| v.map(|x| x.to_string()).unwrap_or_default())
                        })
                        .or_else(|_| {
                            r.try_get::<Option<chrono::DateTime<chrono::Utc>>, _>(i)
                                .map(|v| v.map(|x| x.to_rfc3339()).unwrap_or_default())
                        })
                        .unwrap_or_else(|_| "?".into())
                })
                .collect()
        })
        .collect()
}

async fn quickstart_completes_and_leaves_nothing_billing(transport: &'static str) {
    init_tls();
    let stack = Stack::start(&StackOptions { transport, audit: true, ..StackOptions::default() }).await.unwrap();
    let out = stack.apply_quickstart(true).unwrap();
    // The Secrets were made with `kubectl create secret generic --from-literal`, as by hand.
    assert!(out.contains("secret/runpod created") && out.contains("secret/runpod-s3 created"), "{out}");
    assert!(out.contains("experiment.ep.dev/quickstart created"), "{out}");
    let exp = stack.wait_phase("exp", "quickstart", &["Succeeded", "Failed"]).unwrap();
    let st = &exp["status"];
    assert_eq!(st["phase"], "Succeeded", "{}", serde_json::to_string_pretty(st).unwrap());
    assert_eq!(st["registryStatus"], "COMPLETED");

    // The operator did all of it as the chart's ServiceAccount, and RBAC refused none of its calls.
    let audit = std::fs::read_to_string(stack.audit_log()).unwrap();
    let calls: Vec<Value> = audit
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter(|c| c["userAgent"].as_str().is_some_and(|a| !a.starts_with("kubectl")))
        .collect();
    assert!(calls.len() > 20, "{} operator calls", calls.len());
    let strays: Vec<&Value> = calls
        .iter()
        .filter(|c| c["user"] != ep_testkit::authority::OPERATOR_USER || c["decision"] != "allow")
        .collect();
    assert!(strays.is_empty(), "{strays:?}");

    // f1 and auc in status are the ones the training script wrote.
    let run_id = st["history"][0]["runId"].as_str().unwrap();
    let results_path = stack.volume_dir(VOLUME).join(format!("ep/runs/{run_id}/artifacts/results.json"));
    let results: Value = serde_json::from_slice(&std::fs::read(&results_path).unwrap()).unwrap();
    assert_eq!(st["results"]["f1"], results["f1"]);
    assert_eq!(st["results"]["auc"], results["auc"]);
    assert!(st["artifacts"]["receipt"].as_str().unwrap().len() == 64);
    let ready = st["conditions"].as_array().unwrap().iter().find(|c| c["type"] == "Ready").unwrap();
    assert_eq!(ready["status"], "True");

    // The order went through every phase, in order, and ended DELETED.
    let order = stack.get("rpo", Some(NS), "quickstart-a1").unwrap().unwrap();
    let phases: Vec<&str> =
        order["status"]["transitions"].as_array().unwrap().iter().map(|t| t["phase"].as_str().unwrap()).collect();
    assert_eq!(phases, ["REQUESTED", "PROVISIONED", "SYNCED", "VERIFIED", "RUNNER_ONLINE", "DRAINING", "DELETED"]);
    assert_eq!(order["metadata"]["ownerReferences"][0]["name"], "quickstart");
    let pod_id = order["status"]["podId"].as_str().unwrap();

    // kubectl shows the printer columns filled.
    let table = stack.kubectl(&["get", "exp,rpo", "-n", NS]).unwrap();
    assert!(table.contains("Succeeded") && table.contains("RTX PRO 4500") && table.contains("DELETED"), "{table}");

    // The four registry queries of DESIGN section 7, verbatim.
    wait_registry(&stack.database_url, "quickstart", "COMPLETED").await;
    let url = &stack.database_url;
    let q1 = query(url, "SELECT name, status FROM exp_registry.experiments WHERE name = 'quickstart';").await;
    assert_eq!(q1, [["quickstart", "COMPLETED"]]);
    let q2 =
        query(url, "SELECT name, status, result_f1, result_auc FROM exp_registry.experiments ORDER BY name;").await;
    assert_eq!(q2[0][2], results["f1"].as_f64().unwrap().to_string());
    assert_eq!(q2[0][3], results["auc"].as_f64().unwrap().to_string());
    let q3 =
        query(url, "SELECT name, worker_id, started_at FROM exp_registry.experiments WHERE status = 'RUNNING';").await;
    assert!(q3.is_empty(), "{q3:?}");
    let q4 = query(url, "SELECT worker_id, last_seen, running_jobs FROM exp_registry.worker_heartbeats;").await;
    assert_eq!(q4.len(), 1);
    assert_eq!((q4[0][0].as_str(), q4[0][2].as_str()), ("runpod-1", "0"));
    let log =
        query(url, "SELECT to_phase FROM exp_registry.phase_log WHERE kind = 'RunPodOrder' ORDER BY at, id").await;
    assert_eq!(log.len(), 7, "{log:?}");

    // What the script printed, from the volume, by experiment name.
    let printed = stack.kubectl_ep(&["logs", "quickstart", "-n", NS]).unwrap();
    assert!(printed.lines().any(|l| l.starts_with("epoch 1/")), "{printed}");
    let last = stack.kubectl_ep(&["logs", "quickstart", "-n", NS, "--tail", "1"]).unwrap();
    assert_eq!(last.lines().count(), 1, "{last}");
    assert!(last.contains("\"f1\""), "the script's last line is its results: {last}");

    // The pod is gone on RunPod's side, and no pod without an owner remains.
    assert!(stack.live_pods().await.unwrap().is_empty(), "{:?}", stack.live_pods().await.unwrap());
    assert!(stack.live_pods().await.unwrap().iter().all(|p| p["id"] != pod_id));
    let provider = stack.get("rpp", None, "default").unwrap().unwrap();
    assert!(provider["status"]["orphanPods"].as_array().is_none_or(Vec::is_empty), "{provider}");

    // Metrics carry the story.
    let metrics = reqwest::get(format!("{}/metrics", stack.operator.as_ref().unwrap().metrics_url))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for needle in [
        "ep_phase_transitions_total{kind=\"RunPodOrder\",phase=\"DELETED\"} 1",
        "ep_runpod_calls_total{operation=\"create_pod\",outcome=\"ok\"} 1",
        "ep_registry_lag_seconds 0",
    ] {
        assert!(metrics.contains(needle), "{needle} not in\n{metrics}");
    }
}
ep_testkit::on_both_transports!(quickstart_completes_and_leaves_nothing_billing);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vanished_pod_fails_the_attempt_and_a_second_attempt_completes() {
    let stack = quickstart_stack(&StackOptions::default()).await.unwrap();
    stack.apply(&quick("hb", 12, 0.5)).unwrap();
    let order = stack.wait_phase("rpo", "hb-a1", &["RUNNER_ONLINE"]).unwrap();
    let pod_id = order["status"]["podId"].as_str().unwrap().to_owned();
    let run1 = order["status"]["runId"].as_str().unwrap().to_owned();
    // Let a checkpoint or two land, then the pod vanishes on RunPod's side.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let vanished = Instant::now();
    stack.admin_post(&format!("pods/{pod_id}/vanish"), json!({})).await.unwrap();
    // Watched from outside, as a user would: the order leaves RUNNER_ONLINE within one poll
    // interval (1 s here; the shared pod list refreshes every interval and wakes every order).
    // Measured about 0.9 s; the bound leaves room for kubectl and a loaded 2-core CI machine.
    let order = loop {
        let o = stack.get("rpo", Some(NS), "hb-a1").unwrap().unwrap();
        if o["status"]["phase"] != "RUNNER_ONLINE" {
            break o;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let detected = vanished.elapsed();
    eprintln!("pod loss detected after {detected:?}");
    assert!(
        detected <= Duration::from_secs(2),
        "detected after {detected:?}: {}",
        serde_json::to_string_pretty(&order["status"]).unwrap()
    );
    assert!(matches!(order["status"]["phase"].as_str(), Some("DRAINING" | "DELETED")), "{}", order["status"]);
    let order = stack.wait_phase("rpo", "hb-a1", &["DELETED"]).unwrap();
    assert_eq!(order["status"]["outcome"]["state"], "Failed");
    assert!(
        matches!(order["status"]["outcome"]["reason"].as_str(), Some("HeartbeatLost" | "PodGone" | "PodVanished")),
        "{}",
        order["status"]
    );

    let exp = stack.wait_phase("exp", "hb", &["NeedsRerun", "Running", "Succeeded"]).unwrap();
    let first_files = snapshot(&stack.volume_dir(VOLUME).join(format!("ep/runs/{run1}")));
    assert!(first_files.contains_key("spec.json") && first_files.contains_key("heartbeat.json"), "{first_files:?}");
    assert!(exp["status"]["history"][0]["outcome"] == "Failed", "{}", exp["status"]);

    let exp = stack.wait_phase("exp", "hb", &["Succeeded", "Failed"]).unwrap();
    let st = &exp["status"];
    assert_eq!(st["phase"], "Succeeded", "{}", serde_json::to_string_pretty(st).unwrap());
    assert_eq!(st["attempts"], 2);
    let run2 = st["history"][1]["runId"].as_str().unwrap();
    assert_ne!(run1, run2, "every attempt gets its own run id");
    assert!(st["history"][1]["fencingToken"].as_i64() > st["history"][0]["fencingToken"].as_i64());
    // The first attempt's files are exactly as they were.
    assert_eq!(snapshot(&stack.volume_dir(VOLUME).join(format!("ep/runs/{run1}"))), first_files);
    let events = stack.kubectl(&["get", "events", "-n", NS]).unwrap();
    assert!(events.contains("NeedsRerun") || events.contains("AttemptFailed"), "{events}");
    wait_registry(&stack.database_url, "hb", "COMPLETED").await;
    let attempts =
        query(&stack.database_url, "SELECT attempt, status FROM exp_registry.attempts ORDER BY attempt").await;
    assert_eq!(attempts, [["1", "FAILED"], ["2", "SUCCEEDED"]]);
    assert!(stack.live_pods().await.unwrap().is_empty());
}

async fn a_capacity_error_on_the_first_choice_uses_the_second(transport: &'static str) {
    let stack = quickstart_stack(&StackOptions { transport, ..StackOptions::default() }).await.unwrap();
    stack.faults(json!({"capacityFailures": 1})).await.unwrap();
    stack.apply(&quick("cap", 3, 0.0)).unwrap();
    let exp = stack.wait_phase("exp", "cap", &["Succeeded", "Failed"]).unwrap();
    assert_eq!(exp["status"]["phase"], "Succeeded", "{}", exp["status"]);
    let order = stack.get("rpo", Some(NS), "cap-a1").unwrap().unwrap();
    assert_eq!(order["status"]["gpu"]["typeId"], "NVIDIA L4", "{}", order["status"]);
    assert_eq!(order["status"]["gpuChoice"], 1);
    let events = stack.kubectl(&["get", "events", "-n", NS, "--field-selector", "involvedObject.name=cap-a1"]).unwrap();
    assert!(events.contains("TryingNextGpu"), "{events}");
}
ep_testkit::on_both_transports!(a_capacity_error_on_the_first_choice_uses_the_second);

async fn an_operator_killed_after_create_adopts_the_pod_instead_of_opening_another(transport: &'static str) {
    let mut stack = quickstart_stack(&StackOptions { transport, ..StackOptions::default() }).await.unwrap();
    // Every pod id runpod-sim shows during the test, sampled every 50 ms: a duplicate would live
    // at least until the operator's next pass, far longer than one sample.
    let admin = stack.runpod.get("admin");
    let seen = std::sync::Arc::new(std::sync::Mutex::new(std::collections::BTreeSet::<(String, String)>::new()));
    let sampler = {
        let seen = seen.clone();
        tokio::spawn(async move {
            loop {
                if let Ok(r) = reqwest::get(format!("{admin}/world")).await
                    && let Ok(w) = r.json::<Value>().await
                {
                    let mut pods: Vec<Value> =
                        w["pods"].as_object().cloned().unwrap_or_default().into_values().collect();
                    pods.extend(
                        w["gone"].as_array().cloned().unwrap_or_default().into_iter().map(|g| g["pod"].clone()),
                    );
                    let mut s = seen.lock().unwrap();
                    for p in pods {
                        s.insert((
                            p["name"].as_str().unwrap_or_default().to_owned(),
                            p["id"].as_str().unwrap_or_default().to_owned(),
                        ));
                    }
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
    };
    stack.apply(&quick("crash", 8, 0.5)).unwrap();
    // SIGKILL the moment RunPod holds the pod: before the operator can record the create.
    let deadline = Instant::now() + LONG;
    loop {
        if !stack.live_pods().await.unwrap().is_empty() {
            break;
        }
        assert!(Instant::now() < deadline, "no pod was ever created:\n{}", stack.operator_log(50));
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    stack.operator.as_mut().unwrap().kill();
    let before = stack.get("rpo", Some(NS), "crash-a1").unwrap().unwrap();
    assert!(before["status"]["podRequestedAt"].is_string(), "the create was recorded as asked for first");
    tokio::time::sleep(Duration::from_secs(1)).await;
    stack.start_operator().unwrap();
    let exp = stack.wait_phase("exp", "crash", &["Succeeded", "Failed"]).unwrap();
    assert_eq!(exp["status"]["phase"], "Succeeded", "{}", exp["status"]);
    assert_eq!(exp["status"]["attempts"], 1);
    sampler.abort();
    let order = stack.get("rpo", Some(NS), "crash-a1").unwrap().unwrap();
    let pod_name = order["status"]["podName"].as_str().unwrap().to_owned();
    let ids: Vec<String> =
        seen.lock().unwrap().iter().filter(|(n, _)| *n == pod_name).map(|(_, id)| id.clone()).collect();
    assert_eq!(ids, [order["status"]["podId"].as_str().unwrap().to_owned()], "exactly one pod for the run");
    assert!(stack.live_pods().await.unwrap().is_empty());
}
ep_testkit::on_both_transports!(an_operator_killed_after_create_adopts_the_pod_instead_of_opening_another);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_an_experiment_mid_run_drains_keeps_the_last_checkpoint_and_ends_the_pod() {
    let stack = quickstart_stack(&StackOptions::default()).await.unwrap();
    stack.apply(&quick("del", 60, 0.5)).unwrap();
    let order = stack.wait_phase("rpo", "del-a1", &["RUNNER_ONLINE"]).unwrap();
    let run_id = order["status"]["runId"].as_str().unwrap().to_owned();
    let ckpts = stack.volume_dir(VOLUME).join(format!("ep/runs/{run_id}/artifacts/checkpoints"));
    let deadline = Instant::now() + LONG;
    while std::fs::read_dir(&ckpts).map_or(0, Iterator::count) < 3 {
        assert!(Instant::now() < deadline, "no checkpoints appeared");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    stack.kubectl(&["delete", "exp", "del", "-n", NS, "--wait=false"]).unwrap();
    // Garbage collection deletes the order; its finalizer drains first.
    stack.wait_for("rpo", Some(NS), "del-a1", LONG, "gone", |o| o.is_none()).unwrap();
    assert!(
        stack.live_pods().await.unwrap().is_empty(),
        "nothing left billing: {:?}",
        stack.live_pods().await.unwrap()
    );
    let run_dir = stack.volume_dir(VOLUME).join(format!("ep/runs/{run_id}"));
    let terminal: Value = serde_json::from_slice(&std::fs::read(run_dir.join("terminal.json")).unwrap()).unwrap();
    assert_eq!(terminal["state"], "STOPPED", "{terminal}");
    let left: Vec<_> = std::fs::read_dir(&ckpts).unwrap().flatten().map(|e| e.file_name()).collect();
    assert_eq!(left.len(), 1, "KeepLast keeps one checkpoint: {left:?}\n{}", stack.operator_log(30));
    let newest = terminal["artifacts"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|a| a["path"].as_str())
        .filter(|p| p.starts_with("checkpoints/"))
        .max()
        .unwrap()
        .to_owned();
    assert_eq!(format!("checkpoints/{}", left[0].to_string_lossy()), newest);
    assert!(run_dir.join("logs").is_dir(), "logs so far are kept");
    // The registry trails the cluster by a flush (rows gather for 400 ms).
    let deadline = Instant::now() + LONG;
    loop {
        let rows = query(&stack.database_url, "SELECT status, reason FROM exp_registry.attempts").await;
        if rows[0][0] == "STOPPED" {
            break;
        }
        assert!(Instant::now() < deadline, "the attempt never reached STOPPED in the registry: {rows:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // The experiment is gone; the registry says it ended, not that it still runs.
    stack.wait_for("exp", Some(NS), "del", LONG, "gone", |o| o.is_none()).unwrap();
    wait_registry(&stack.database_url, "del", "FAILED").await;
    let running = query(
        &stack.database_url,
        "SELECT name, worker_id, started_at FROM exp_registry.experiments WHERE status = 'RUNNING';",
    )
    .await;
    assert!(running.is_empty(), "{running:?}");
    let deleted =
        query(&stack.database_url, "SELECT extra->>'deleted' FROM exp_registry.experiments WHERE name = 'del'").await;
    assert_eq!(deleted, [["true"]]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_postgres_outage_mid_run_leaves_the_registry_as_without_it() {
    let mut stack = quickstart_stack(&StackOptions::default()).await.unwrap();
    // Without an outage first.
    stack.apply(&quick("steady", 8, 0.3)).unwrap();
    stack.wait_phase("exp", "steady", &["Succeeded"]).unwrap();
    wait_registry(&stack.database_url, "steady", "COMPLETED").await;
    let expected = shape(&stack.database_url, "steady").await;

    stack.apply(&quick("outage", 8, 0.3)).unwrap();
    stack.wait_phase("rpo", "outage-a1", &["VERIFIED", "RUNNER_ONLINE"]).unwrap();
    stack.pg.stop().unwrap();
    // The operator keeps reconciling and says the registry is behind.
    let lagging = stack
        .wait_for("exp", Some(NS), "outage", LONG, "RegistrySynced False", |o| {
            o.and_then(|o| o["status"]["conditions"].as_array().cloned())
                .unwrap_or_default()
                .iter()
                .any(|c| c["type"] == "RegistrySynced" && c["status"] == "False")
        })
        .unwrap()
        .unwrap();
    let cond = lagging["status"]["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["type"] == "RegistrySynced")
        .unwrap()
        .clone();
    assert_eq!(cond["reason"], "RegistryUnavailable", "{cond}");
    let exp = stack.wait_phase("exp", "outage", &["Succeeded"]).unwrap();
    assert_eq!(exp["status"]["registryStatus"], "COMPLETED");
    let metrics = reqwest::get(format!("{}/metrics", stack.operator.as_ref().unwrap().metrics_url))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let lag_line = metrics.lines().find(|l| l.starts_with("ep_registry_lag_seconds ")).unwrap().to_owned();
    assert_ne!(lag_line, "ep_registry_lag_seconds 0", "the lag is exported while Postgres is down");
    stack.pg.restart().unwrap();
    wait_registry(&stack.database_url, "outage", "COMPLETED").await;
    stack
        .wait_for("exp", Some(NS), "outage", LONG, "RegistrySynced True", |o| {
            o.and_then(|o| o["status"]["conditions"].as_array().cloned())
                .unwrap_or_default()
                .iter()
                .any(|c| c["type"] == "RegistrySynced" && c["status"] == "True")
        })
        .unwrap();
    let got = shape(&stack.database_url, "outage").await;
    assert_eq!(got, expected);
    let progress = query(&stack.database_url, "SELECT count(*)::text FROM exp_registry.progress").await;
    assert_ne!(progress[0][0], "0", "progress rows were mirrored");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_that_writes_a_1_gib_artifact_succeeds_at_the_default_heartbeat_timeout() {
    // The operator's default heartbeat (every 10 s, lost after 60 s), not the fast test settings.
    let settings = ep_testkit::stack::FAST_SETTINGS
        .replace("heartbeatInterval: 1s", "heartbeatInterval: 10s")
        .replace("heartbeatTimeout: 6s", "heartbeatTimeout: 60s");
    let stack = quickstart_stack(&StackOptions { settings, ..StackOptions::default() }).await.unwrap();
    let script = r#"import json, os
out = os.environ["EP_OUTPUT_DIR"]
with open(os.path.join(out, "model.bin"), "wb") as f:
    for _ in range(16):
        f.write(b"\x01" * (64 << 20))
json.dump({"f1": 0.5, "auc": 0.6}, open(os.path.join(out, "results.json"), "w"))"#;
    let big = exp("big")
        .yaml()
        .replace("[python3, train.py]", &format!("[python3, -c, {}]", serde_json::to_string(script).unwrap()));
    stack.apply(&big).unwrap();
    let e = stack.wait_phase("exp", "big", &["Succeeded", "Failed"]).unwrap();
    assert_eq!(e["status"]["phase"], "Succeeded", "{}", e["status"]);
    let order = stack.get("rpo", Some(NS), "big-a1").unwrap().unwrap();
    let items = order["status"]["outcome"]["artifacts"]["items"].as_array().unwrap().clone();
    let model = items.iter().find(|a| a["key"].as_str().unwrap().ends_with("/model.bin")).unwrap();
    assert_eq!(model["size"], 1u64 << 30, "the artifact was verified on the volume: {model}");
    let run_id = order["status"]["runId"].as_str().unwrap();
    let _ = std::fs::remove_file(stack.volume_dir(VOLUME).join(format!("ep/runs/{run_id}/artifacts/model.bin")));
}
