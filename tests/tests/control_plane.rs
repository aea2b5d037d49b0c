//! The control plane across real processes: the registry as a projection of cluster state (rebuilt
//! into an empty database, unchanged by a crash in the middle of a drain, never blocked by one row
//! PostgreSQL refuses) and one actor at a time (two operators started alike).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ep_testkit::e2e::{NS, exp, init_tls, phase, quickstart_stack, wait_until};
use ep_testkit::registry::{rows, shape, wait_registry};
use ep_testkit::stack::{Stack, StackOptions};
use serde_json::Value;

const LONG: Duration = Duration::from_secs(180);

/// The experiments, attempts and orders tables: every column but surrogate ids (experiment ids
/// become names) and `updated_at` (when the row was last written, which a rebuild changes).
async fn tables(url: &str) -> Vec<Vec<String>> {
    let mut out = rows(
        url,
        "SELECT namespace, name, uid, status, phase, worker_id, current_run_id, attempts, gpu, result_f1, result_auc, \
         cost_usd, started_at, finished_at, created_at, extra FROM exp_registry.experiments ORDER BY namespace, name",
    )
    .await;
    out.extend(
        rows(
            url,
            "SELECT e.name AS experiment, a.run_id, a.attempt, a.fencing_token, a.status, a.order_name, a.worker_id, \
             a.pod_id, a.pid, a.gpu_id, a.exit_code, a.reason, a.result_f1, a.result_auc, a.receipt, a.cost_usd, \
             a.started_at, a.finished_at, a.extra FROM exp_registry.attempts a \
             JOIN exp_registry.experiments e ON e.id = a.experiment_id ORDER BY a.run_id",
        )
        .await,
    );
    out.extend(
        rows(
            url,
            "SELECT o.namespace, o.name, o.uid, e.name AS experiment, o.run_id, o.attempt, o.policy, o.worker_id, \
             o.provider, o.phase, o.reason, o.approved, o.pod_id, o.gpu_type_id, o.gpu_display_name, o.data_center, \
             o.cost_per_hr, o.accrued_usd, o.created_at, o.deleted_at, o.extra FROM exp_registry.orders o \
             LEFT JOIN exp_registry.experiments e ON e.id = o.experiment_id ORDER BY o.namespace, o.name",
        )
        .await,
    );
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_empty_database_is_rebuilt_from_the_cluster_to_what_the_old_one_held() {
    let mut stack = quickstart_stack(&StackOptions::default()).await.unwrap();
    stack.apply(&exp("rebuilt-ok").epochs(3, 0.0).yaml()).unwrap();
    let failing = exp("rebuilt-fail").yaml().replace("[python3, train.py]", "[python3, -c, 'import sys; sys.exit(3)']");
    stack.apply(&failing).unwrap();
    stack.wait_phase("exp", "rebuilt-ok", &["Succeeded"]).unwrap();
    stack.wait_phase("exp", "rebuilt-fail", &["Failed"]).unwrap();
    wait_registry(&stack.database_url, "rebuilt-ok", "COMPLETED").await;
    wait_registry(&stack.database_url, "rebuilt-fail", "FAILED").await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let before = tables(&stack.database_url).await;
    assert!(before.len() >= 6, "{before:#?}");

    // The same cluster, an empty database: the operator rebuilds every row.
    stack.operator.take().unwrap().stop();
    stack.database_url = stack.pg.create_database("fresh").await.unwrap();
    stack.start_operator().unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let after = tables(&stack.database_url).await;
        if after == before {
            break;
        }
        assert!(Instant::now() < deadline, "rebuilt:\n{after:#?}\nexpected:\n{before:#?}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// The rows of one experiment, its attempts, order, worker session and phase log, with its own
/// name, ids and every time taken out: what an uninterrupted run and an interrupted one share.
/// One case of the crash matrix.
struct Case {
    point: &'static str,
    /// The operator reached the point and died there (a run that ends within one poll skips
    /// RUNNER_ONLINE, say).
    reached: bool,
    succeeded: bool,
    creates: u32,
    leaked: usize,
    registry_equal: bool,
    /// The experiment's and the order's status at the end, for a failure message.
    detail: String,
}

/// Pods runpod-sim created with this name, ever.
async fn creates_of(stack: &Stack, pod_name: &str) -> u32 {
    let world = stack.world().await.unwrap();
    world["createdByName"][pod_name].as_u64().map_or(0, |n| u32::try_from(n).unwrap_or(u32::MAX))
}

/// Writes the crash matrix into docs/reliability.md between its markers.
fn write_matrix(cases: &[Case], repeats: usize) {
    let mut table = format!(
        "Each crash point, {repeats} run(s) each: the operator SIGKILLed there, restarted, the run finished.\n\n\
         | Crash point | Runs | Crashed there | Succeeded | Pods created per run | Leaked pods | Registry equal to an uninterrupted run |\n\
         |---|---|---|---|---|---|---|\n"
    );
    for point in ep_operator::failpoint::POINTS {
        let of: Vec<&Case> = cases.iter().filter(|c| c.point == *point).collect();
        if of.is_empty() {
            continue;
        }
        let creates: BTreeSet<u32> = of.iter().map(|c| c.creates).collect();
        table.push_str(&format!(
            "| `{point}` | {} | {} | {} | {} | {} | {} |\n",
            of.len(),
            of.iter().filter(|c| c.reached).count(),
            of.iter().filter(|c| c.succeeded).count(),
            creates.iter().map(u32::to_string).collect::<Vec<_>>().join(", "),
            of.iter().map(|c| c.leaked).sum::<usize>(),
            of.iter().filter(|c| c.registry_equal).count(),
        ));
    }
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/reliability.md");
    let doc = std::fs::read_to_string(&path).unwrap();
    let (begin, end) = ("<!-- crash-matrix:begin -->\n", "<!-- crash-matrix:end -->");
    let (i, j) = (doc.find(begin).unwrap() + begin.len(), doc.find(end).unwrap());
    std::fs::write(&path, format!("{}{table}{}", &doc[..i], &doc[j..])).unwrap();
}

/// The crash matrix: the operator SIGKILLed at every crash point (each phase entered, before and
/// after the pod create, after the verdict and after the terminate), `EP_CRASH_REPEATS` times each
/// (2 by default), then restarted: every run succeeds with exactly one pod created, nothing is
/// left billing, and the registry rows equal those of an uninterrupted run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_at_every_point_leaves_no_duplicate_no_leak_and_the_registry_of_an_uninterrupted_run() {
    let repeats: usize = std::env::var("EP_CRASH_REPEATS").ok().and_then(|v| v.parse().ok()).unwrap_or(2);
    let mut stack = quickstart_stack(&StackOptions::default()).await.unwrap();
    // Runs long enough (3 epochs of 1 s) that every phase, RUNNER_ONLINE included, is seen.
    stack.apply(&exp("steady").epochs(3, 1.0).yaml()).unwrap();
    stack.wait_phase("exp", "steady", &["Succeeded"]).unwrap();
    wait_registry(&stack.database_url, "steady", "COMPLETED").await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let expected = shape(&stack.database_url, "steady").await;
    let only = std::env::var("EP_CRASH_POINTS").unwrap_or_default();
    let points = ep_operator::failpoint::POINTS.iter().filter(|p| only.is_empty() || only.split(',').any(|o| o == **p));
    let mut cases = Vec::new();
    for (n, point) in points.flat_map(|p| std::iter::repeat_n(*p, repeats)).enumerate() {
        let name = format!("crash{n}");
        stack.operator.take().unwrap().stop();
        stack.start_operator_env(&[("EP_CRASH_AT", point)]).unwrap();
        stack.apply(&exp(&name).epochs(3, 1.0).yaml()).unwrap();
        let deadline = Instant::now() + Duration::from_secs(60);
        let done = |s: &Stack| phase(s.get("exp", Some(NS), &name).ok().flatten().as_ref()) == "Succeeded";
        while stack.operator.as_mut().unwrap().running() && Instant::now() < deadline && !done(&stack) {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let reached = !stack.operator.as_mut().unwrap().running();
        stack.operator.take().unwrap().stop();
        stack.start_operator().unwrap();
        let e = stack.wait_phase("exp", &name, &["Succeeded", "Failed"]).unwrap();
        let succeeded = e["status"]["phase"] == "Succeeded";
        wait_registry(&stack.database_url, &name, if succeeded { "COMPLETED" } else { "FAILED" }).await;
        let deadline = Instant::now() + Duration::from_secs(15);
        let registry_equal = loop {
            if shape(&stack.database_url, &name).await == expected {
                break true;
            }
            if Instant::now() > deadline {
                break false;
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        };
        let order = stack.get("rpo", Some(NS), &format!("{name}-a1")).unwrap().unwrap();
        let pod_name = order["status"]["podName"].as_str().unwrap_or_default().to_owned();
        let creates = creates_of(&stack, &pod_name).await;
        let leaked = stack.live_pods().await.unwrap().len();
        let detail =
            format!("experiment: {}\norder: {}\nlog:\n{}", e["status"], order["status"], stack.operator_log(40));
        cases.push(Case { point, reached, succeeded, creates, leaked, registry_equal, detail });
    }
    write_matrix(&cases, repeats);
    for c in &cases {
        assert!(c.reached, "{}: the operator never reached the point", c.point);
        assert!(c.succeeded, "{}: the run did not succeed\n{}", c.point, c.detail);
        assert_eq!(c.creates, 1, "{}: pods created for one run\n{}", c.point, c.detail);
        assert_eq!(c.leaked, 0, "{}: a pod was left billing", c.point);
        assert!(
            c.registry_equal,
            "{}: the registry differs from an uninterrupted run:\n{:#?}",
            c.point,
            shape(&stack.database_url, "crash0").await
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_results_key_postgres_cannot_store_fails_that_run_and_keeps_no_other_out() {
    let stack = quickstart_stack(&StackOptions::default()).await.unwrap();
    let script = r#"import json, os; json.dump({"f1": 0.5, "auc": 0.5, "f1\u0000": 1}, open(os.path.join(os.environ["EP_OUTPUT_DIR"], "results.json"), "w"))"#;
    let poisoned = exp("poisoned")
        .yaml()
        .replace("[python3, train.py]", &format!("[python3, -c, {}]", serde_json::to_string(script).unwrap()));
    stack.apply(&poisoned).unwrap();
    stack.apply(&exp("clean").epochs(3, 0.0).yaml()).unwrap();
    let bad = stack.wait_phase("exp", "poisoned", &["Failed", "Succeeded"]).unwrap();
    assert_eq!(bad["status"]["phase"], "Failed", "{}", bad["status"]);
    let order = stack.get("rpo", Some(NS), "poisoned-a1").unwrap().unwrap();
    assert_eq!(order["status"]["outcome"]["reason"], "ResultsContractBroken", "{}", order["status"]);
    assert!(order["status"]["outcome"]["message"].as_str().unwrap().contains("U+0000"), "{}", order["status"]);
    stack.wait_phase("exp", "clean", &["Succeeded"]).unwrap();
    wait_registry(&stack.database_url, "clean", "COMPLETED").await;
    wait_registry(&stack.database_url, "poisoned", "FAILED").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_operators_started_alike_act_one_at_a_time_and_make_no_duplicate_pod() {
    init_tls();
    // The production lease (15 s): two replicas started with the very same arguments.
    let opts = StackOptions { lease_duration: "15s".into(), ..StackOptions::default() };
    let mut stack = Stack::start(&opts).await.unwrap();
    stack.apply_quickstart(false).unwrap();
    let first = stack.operator.take().unwrap();
    let second = stack.spawn_operator(&[]).unwrap();
    let leads = |op: &ep_testkit::stack::OperatorProcess| op.metric("ep_leader");
    wait_until("one leads", Duration::from_secs(60), || leads(&first) == Some(1.0) || leads(&second) == Some(1.0))
        .unwrap();
    wait_until("both answer", Duration::from_secs(30), || leads(&first).is_some() && leads(&second).is_some()).unwrap();
    // Both replicas are past start-up: a second acting replica would say so by now.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(leads(&first).unwrap() + leads(&second).unwrap(), 1.0, "exactly one acts");
    // Every pod id RunPod shows for a run, sampled every 50 ms while several experiments run.
    let admin = stack.runpod.get("admin");
    let seen = Arc::new(Mutex::new(BTreeSet::<(String, String)>::new()));
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
                            p["name"].as_str().unwrap_or_default().into(),
                            p["id"].as_str().unwrap_or_default().into(),
                        ));
                    }
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
    };
    let names = ["pair-1", "pair-2", "pair-3", "pair-4"];
    for n in names {
        stack.apply(&exp(n).epochs(4, 0.2).yaml()).unwrap();
    }
    for n in names {
        let e = stack.wait_for("exp", Some(NS), n, LONG, "Succeeded", |o| phase(o) == "Succeeded").unwrap().unwrap();
        assert_eq!(e["status"]["attempts"], 1);
    }
    sampler.abort();
    let seen = seen.lock().unwrap().clone();
    let mut per_name = std::collections::BTreeMap::<String, usize>::new();
    for (name, _) in &seen {
        *per_name.entry(name.clone()).or_default() += 1;
    }
    assert_eq!(per_name.len(), names.len(), "{seen:?}");
    assert!(per_name.values().all(|n| *n == 1), "a duplicate pod: {seen:?}");
    assert_eq!(leads(&first).unwrap() + leads(&second).unwrap(), 1.0, "still exactly one");
    let acted = |op: &ep_testkit::stack::OperatorProcess| {
        op.metric("ep_reconciles_total{kind=\"RunPodOrder\"}").unwrap_or(0.0) > 0.0
    };
    assert!(acted(&first) != acted(&second), "only the leader reconciled");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_object_that_does_not_decode_is_reported_and_every_other_one_still_runs() {
    let stack = quickstart_stack(&StackOptions::default()).await.unwrap();
    // A schema loosened (as a newer or hand-edited CRD might be) lets an object in that the
    // operator's types cannot read.
    let mut crd: Value =
        serde_json::from_str(&stack.kubectl(&["get", "crd", "experiments.ep.dev", "-o", "json"]).unwrap()).unwrap();
    crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"] =
        serde_json::json!({"type": "object", "x-kubernetes-preserve-unknown-fields": true});
    let path = stack.dir.path().join("loose-crd.json");
    std::fs::write(&path, crd.to_string()).unwrap();
    stack.kubectl(&["replace", "-f", &path.display().to_string()]).unwrap();
    stack
        .apply(&format!(
            "apiVersion: ep.dev/v1alpha1\nkind: Experiment\nmetadata: {{name: garbled, namespace: {NS}}}\nspec: {{entry: not-a-command, image: 7}}\n"
        ))
        .unwrap();
    stack.apply(&exp("intact").epochs(3, 0.0).yaml()).unwrap();
    let e = stack.wait_phase("exp", "intact", &["Succeeded", "Failed"]).unwrap();
    assert_eq!(e["status"]["phase"], "Succeeded", "{}", e["status"]);
    let deadline = Instant::now() + Duration::from_secs(30);
    let event = loop {
        let list: Value = serde_json::from_str(
            &stack
                .kubectl(&["get", "events", "-n", NS, "--field-selector", "involvedObject.name=garbled", "-o", "json"])
                .unwrap(),
        )
        .unwrap();
        if let Some(e) = list["items"].as_array().unwrap().iter().find(|e| e["reason"] == "Undecodable") {
            break e.clone();
        }
        assert!(Instant::now() < deadline, "no Undecodable event: {list}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(event["type"], "Warning");
    let msg = event["message"].as_str().unwrap();
    assert!(msg.contains("spec.entry") || msg.contains("spec.image"), "names the field: {msg}");
}

/// Forty long runs supervised each second while more orders arrive: every order gets its first
/// pass within seconds. Each pass of a running order used to write its status (heartbeat, cost and
/// progress move every second), the write woke the order again, and the queue stayed full of
/// running orders: kube-runtime takes held messages in no particular order, and new orders waited
/// for minutes without any status.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forty_running_orders_leave_room_for_every_first_pass() {
    const N: usize = 40;
    let world = runpod_sim::config::DEFAULT_WORLD
        .replace("balance: 500.0, spendLimit: 80.0", "balance: 10000.0, spendLimit: 1000.0")
        .replace("cloudType: SECURE, count: 4}", "cloudType: SECURE, count: 60}");
    let settings = ep_testkit::stack::FAST_SETTINGS
        .replace("maxConcurrentGpus: 4", "maxConcurrentGpus: 60")
        .replace("maxUsdPerDay: 50", "maxUsdPerDay: 5000")
        .replace("reconciles: 4", "reconciles: 16")
        .replace("heartbeatTimeout: 6s", "heartbeatTimeout: 60s");
    let stack =
        quickstart_stack(&StackOptions { world: Some(world), settings, ..StackOptions::default() }).await.unwrap();
    let applied = Instant::now();
    let docs: Vec<String> =
        (0..N).map(|n| exp(&format!("busy{n:02}")).epochs(45, 1.0).gpus(&["rtx-pro-4500"]).yaml()).collect();
    let file = stack.dir.path().join("busy.yaml");
    std::fs::write(&file, docs.join("---\n")).unwrap();
    stack.kubectl(&["apply", "-f", &file.display().to_string()]).unwrap();
    let first_passes = |stack: &Stack| -> Vec<String> {
        let out = stack.kubectl(&["get", "rpo", "-n", NS, "-o", "json"]).unwrap();
        let list: Value = serde_json::from_str(&out).unwrap();
        list["items"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|o| !phase(Some(o)).is_empty())
            .map(|o| o["metadata"]["name"].as_str().unwrap().to_owned())
            .collect()
    };
    let mut seen = BTreeSet::new();
    while seen.len() < N && applied.elapsed() < Duration::from_secs(45) {
        seen.extend(first_passes(&stack));
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let missing: Vec<String> = (0..N)
        .map(|n| format!("busy{n:02}-a1"))
        .filter(|n| !seen.contains(n))
        .map(|n| {
            let o = stack.get("rpo", Some(NS), &n).unwrap();
            let created = o.as_ref().map(|o| o["metadata"]["creationTimestamp"].clone());
            let finalizers = o.as_ref().map(|o| o["metadata"]["finalizers"].clone());
            format!("{n} (created {created:?}, finalizers {finalizers:?})")
        })
        .collect();
    assert!(missing.is_empty(), "no first pass 45 s after the apply: {missing:#?}\n{}", stack.operator_log(30));
    eprintln!("{N} orders: every first pass within {:.1} s", applied.elapsed().as_secs_f64());
    for n in 0..N {
        let e = stack.wait_phase("exp", &format!("busy{n:02}"), &["Succeeded", "Failed"]).unwrap();
        assert_eq!(e["status"]["phase"], "Succeeded", "busy{n:02}: {}", e["status"]);
    }
    assert!(stack.live_pods().await.unwrap().is_empty());
}
