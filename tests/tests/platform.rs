//! The operator as a platform team runs it: the chart's alerts checked and unit-tested by promtool,
//! the Argo CD health scripts run by lua5.1 against statuses taken from real runs, and the first
//! experiment of the chart's NOTES pasted into a running stack: it must end Healthy in Argo CD's
//! eyes, raise no Warning event, and leave every metric the alerts and the dashboard query in a
//! /metrics exposition that prometheus-client's OpenMetrics parser accepts.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use ep_testkit::e2e::{NS, condition, exp, init_tls};
use ep_testkit::platform::{argocd_health, metric_names, parse_openmetrics, queries, rendered_rules};
use ep_testkit::stack::{Stack, StackOptions};
use ep_testkit::{tools, workspace_root};
use serde_json::Value;

fn fixtures(dir: &str) -> PathBuf {
    workspace_root().join("tests/fixtures").join(dir)
}

fn promtool(args: &[&str]) -> String {
    let out = Command::new("promtool").args(args).output().expect("promtool (make deps installs prometheus)");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "promtool {args:?}:\n{text}");
    text
}

#[test]
fn the_alerts_pass_promtool_and_each_one_fires_in_its_unit_test() {
    let dir = tempfile::tempdir().unwrap();
    let rules = rendered_rules().unwrap();
    std::fs::write(dir.path().join("rules.yaml"), serde_json::to_string_pretty(&rules).unwrap()).unwrap();
    let tests = std::fs::read_to_string(fixtures("alerts").join("alerts-test.yaml")).unwrap();
    std::fs::write(dir.path().join("alerts-test.yaml"), &tests).unwrap();
    let rules_file = dir.path().join("rules.yaml").display().to_string();
    let checked = promtool(&["check", "rules", &rules_file]);
    let alerts: Vec<String> = rules["groups"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|g| g["rules"].as_array().unwrap().iter().filter_map(|r| r["alert"].as_str().map(str::to_owned)))
        .collect();
    assert!(checked.contains(&format!("SUCCESS: {} rules found", alerts.len())), "{checked}");
    assert!(alerts.len() >= 6, "{alerts:?}");
    // Every failure domain has an alert, and every alert with a domain names the persona role it
    // is for (a ClusterRole the chart makes), so Alertmanager can route on it.
    let rules_of = |domain: &str| -> Vec<Value> {
        rules["groups"][0]["rules"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|r| r["labels"]["domain"] == domain)
            .cloned()
            .collect()
    };
    for domain in ep_operator::reason::Domain::ALL {
        let these = rules_of(domain.as_str());
        assert!(!these.is_empty(), "no alert for the {} domain", domain.as_str());
        for r in these {
            let route = r["labels"]["route"].as_str().unwrap_or_default();
            let role = route.strip_prefix("ep-ep-operator-").unwrap_or_default();
            assert!(
                ["experiment-author", "spend-approver", "platform-admin", "viewer"].contains(&role),
                "{}: route {route:?} names no persona role",
                r["alert"]
            );
        }
    }
    promtool(&["test", "rules", &dir.path().join("alerts-test.yaml").display().to_string()]);

    // Each alert has a case where it fires (and one where it does not).
    let cases: Value = serde_saphyr::from_str(&tests).unwrap();
    for alert in &alerts {
        let evals: Vec<&Value> = cases["tests"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|t| t["alert_rule_test"].as_array().unwrap())
            .filter(|e| e["alertname"] == alert.as_str())
            .collect();
        let fires = evals.iter().any(|e| e["exp_alerts"].as_array().is_some_and(|a| !a.is_empty()));
        let quiet = evals.iter().any(|e| e["exp_alerts"].as_array().is_some_and(Vec::is_empty));
        assert!(fires && quiet, "{alert}: a case that fires ({fires}) and one that stays quiet ({quiet})");
    }
}

#[test]
fn the_argocd_health_scripts_judge_every_fixture_as_expected() {
    let mut seen = std::collections::BTreeMap::<(String, String), usize>::new();
    let mut files: Vec<PathBuf> = std::fs::read_dir(fixtures("argocd"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    files.sort();
    assert!(!files.is_empty());
    for file in &files {
        let case: Value = serde_json::from_slice(&std::fs::read(file).unwrap()).unwrap();
        let obj = &case["object"];
        let got = argocd_health(obj).unwrap();
        let want = case["health"].as_str().unwrap();
        assert_eq!(got.status, want, "{}: {got:?}", file.display());
        if let Some(part) = case["messageContains"].as_str() {
            assert!(got.message.contains(part), "{}: message {:?} lacks {part:?}", file.display(), got.message);
        }
        *seen.entry((obj["kind"].as_str().unwrap().to_owned(), want.to_owned())).or_default() += 1;
    }
    // Every health each kind can take is covered by at least one fixture.
    for (kind, states) in [
        ("Experiment", &["Progressing", "Healthy", "Degraded", "Suspended"][..]),
        ("RunPodOrder", &["Progressing", "Healthy", "Degraded", "Suspended"][..]),
        ("RunPodProvider", &["Progressing", "Healthy", "Degraded"][..]),
    ] {
        for s in states {
            assert!(seen.contains_key(&(kind.to_owned(), (*s).to_owned())), "no {kind} fixture is {s}: {seen:?}");
        }
    }
}

/// The `kubectl apply -f - <<YAML ... YAML` of step 3 of the chart's NOTES, as a person pastes it.
fn notes_first_experiment() -> String {
    let chart = workspace_root().join("charts/ep-operator");
    let out = Command::new(tools::helm().unwrap())
        .args(["install", "ep-operator"])
        .arg(&chart)
        .args(["--namespace", "ep-system", "--dry-run=client"])
        .env("KUBECONFIG", "/dev/null")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let notes = &text[text.find("NOTES:").expect("helm prints NOTES")..];
    let step = &notes[notes.find("3. ").expect("step 3")..];
    let body = &step[step.find("<<YAML\n").unwrap() + 7..];
    let body = &body[..body.find("\n   YAML").unwrap()];
    body.lines().map(|l| l.strip_prefix("   ").unwrap_or(l)).collect::<Vec<_>>().join("\n") + "\n"
}

#[tokio::test(flavor = "multi_thread")]
async fn the_notes_first_experiment_ends_healthy_with_no_warning_and_every_queried_metric_exported() {
    init_tls();
    // RunPod's REST v2 answers with RateLimit headers; the simulated account has a generous policy.
    let world = runpod_sim::config::DEFAULT_WORLD
        .replace("stock:\n", "rateLimit:\n  - {name: minute, quota: 600, windowSeconds: 60}\nstock:\n");
    let stack = Stack::start(&StackOptions { world: Some(world), ..StackOptions::default() }).await.unwrap();
    stack.apply_quickstart(false).unwrap();
    // A second experiment waits for an approver: a blocked order, as the alerts and Argo CD see it.
    stack.apply(&exp("needs-approval").policy("paper-train").yaml()).unwrap();
    // A provider whose API key RunPod refuses: Degraded, not Ready, and its refused calls counted.
    stack
        .apply(&format!(
            "apiVersion: v1\nkind: Secret\nmetadata: {{name: runpod-wrong, namespace: ep-system}}\nstringData: {{apiKey: rpa_wrong}}\n---\n\
             apiVersion: ep.dev/v1alpha1\nkind: RunPodProvider\nmetadata: {{name: wrong-key}}\nspec:\n  \
             api: {{transport: restV2, endpoint: \"{}\", apiKeySecretRef: {{namespace: ep-system, name: runpod-wrong, key: apiKey}}}}\n  \
             networkVolume: {{id: tgb8bx6fwl, dataCenter: EU-RO-1, mountPath: /workspace}}\n  \
             s3: {{endpoint: \"{}\", credentialsSecretRef: {{namespace: ep-system, name: runpod-s3}}}}\n",
            stack.runpod.get("api"),
            stack.runpod.get("s3")
        ))
        .unwrap();
    let manifest = stack.dir.path().join("notes-step-3.yaml");
    std::fs::write(&manifest, notes_first_experiment()).unwrap();
    let applied = stack.kubectl(&["apply", "-f", &manifest.display().to_string()]).unwrap();
    assert!(applied.contains("experiment.ep.dev/hello created"), "{applied}");
    let exp = stack
        .wait_for("exp", Some("ml-demo"), "hello", Duration::from_secs(240), "Succeeded or Failed", |o| {
            matches!(o.and_then(|o| o["status"]["phase"].as_str()), Some("Succeeded" | "Failed"))
        })
        .unwrap()
        .unwrap();
    assert_eq!(exp["status"]["phase"], "Succeeded", "{}\n{}", exp["status"], stack.operator_log(40));

    // Argo CD: every object of the run is Healthy once it is done.
    let order_name = exp["status"]["history"][0]["order"].as_str().unwrap().to_owned();
    let order = stack.get("rpo", Some("ml-demo"), &order_name).unwrap().unwrap();
    let provider = stack.get("rpp", None, "default").unwrap().unwrap();
    for obj in [&exp, &order, &provider] {
        let h = argocd_health(obj).unwrap();
        assert_eq!(h.status, "Healthy", "{} {}: {h:?}", obj["kind"], obj["metadata"]["name"]);
    }
    let wrong = stack
        .wait_for("rpp", None, "wrong-key", Duration::from_secs(60), "Stalled", |o| {
            condition(o, "Stalled").is_some_and(|c| c["status"] == "True")
        })
        .unwrap()
        .unwrap();
    let h = argocd_health(&wrong).unwrap();
    assert_eq!((h.status.as_str(), h.message.starts_with("BadApiKey: ")), ("Degraded", true), "{h:?}");
    // The one awaiting approval is Suspended, experiment and order alike, with the reason.
    let waiting = stack
        .wait_for("rpo", Some(NS), "needs-approval-a1", Duration::from_secs(60), "AwaitingApproval", |o| {
            condition(o, "Ready").is_some_and(|c| c["reason"] == "AwaitingApproval")
        })
        .unwrap()
        .unwrap();
    let waiting_exp = stack
        .wait_for("exp", Some(NS), "needs-approval", Duration::from_secs(60), "AwaitingApproval", |o| {
            condition(o, "Ready").is_some_and(|c| c["reason"] == "AwaitingApproval")
        })
        .unwrap()
        .unwrap();
    for obj in [&waiting, &waiting_exp] {
        let h = argocd_health(obj).unwrap();
        assert_eq!(h.status, "Suspended", "{} {}: {h:?}", obj["kind"], obj["metadata"]["name"]);
        assert!(h.message.starts_with("AwaitingApproval: "), "{h:?}");
    }

    // A run where nothing went wrong raises no Warning event, and each transition is one Normal event.
    let events: Value =
        serde_json::from_str(&stack.kubectl(&["get", "events", "-n", "ml-demo", "-o", "json"]).unwrap()).unwrap();
    let events = events["items"].as_array().unwrap();
    let warnings: Vec<String> = events
        .iter()
        .filter(|e| e["type"] == "Warning")
        .map(|e| format!("{} {}: {}", e["involvedObject"]["name"], e["reason"], e["message"]))
        .collect();
    assert!(warnings.is_empty(), "a clean run raised Warnings: {warnings:#?}");
    assert!(events.iter().any(|e| e["reason"] == "Succeeded"), "{events:?}");
    let mut per_reason = std::collections::BTreeMap::<String, u64>::new();
    for e in events.iter().filter(|e| e["involvedObject"]["name"] == order_name.as_str()) {
        *per_reason.entry(e["reason"].as_str().unwrap().to_owned()).or_default() += e["count"].as_u64().unwrap_or(1);
    }
    for reason in ["Accepted", "Provisioned", "Synced", "Claimed", "RunnerOnline", "RunFinished", "Succeeded"] {
        assert_eq!(per_reason.get(reason), Some(&1), "order events by reason: {per_reason:?}");
    }

    // /metrics is valid OpenMetrics, and every metric the alerts and the dashboard query is exported.
    let op = stack.operator.as_ref().unwrap();
    let (status, body) = op.get("/metrics").unwrap();
    assert_eq!(status, 200);
    let exposition = parse_openmetrics(&body).unwrap();
    let queried = metric_names(&queries().unwrap());
    assert!(queried.len() >= 15, "{queried:?}");
    let missing: Vec<&String> = queried.iter().filter(|n| !exposition.declares(n)).collect();
    assert!(missing.is_empty(), "queried but not exported: {missing:?}\n{body}");
    // After this run these carry samples (not only a declaration).
    for name in [
        "ep_build_info",
        "ep_objects",
        "ep_provider_ready",
        "ep_reconciles_total",
        "ep_runpod_calls_total",
        "ep_runpod_call_duration_seconds_bucket",
        "ep_reconcile_duration_seconds_bucket",
        "ep_spent_usd_total",
        "ep_spend_usd_per_hour",
        "ep_budget_usd_per_day",
        "ep_registry_lag_seconds",
        "ep_orders_blocked",
        "ep_phase_age_max_seconds",
        "ep_runpod_ratelimit_remaining",
        "ep_reconcile_errors_total",
    ] {
        assert!(exposition.samples.get(name).is_some_and(|s| !s.is_empty()), "no sample of {name}:\n{body}");
    }
    let objects = &exposition.samples["ep_objects"];
    let succeeded = objects.iter().find(|s| {
        s.labels.get("kind").map(String::as_str) == Some("Experiment")
            && s.labels.get("namespace").map(String::as_str) == Some("ml-demo")
            && s.labels.get("phase").map(String::as_str) == Some("Succeeded")
    });
    assert_eq!(succeeded.map(|s| s.value), Some(1.0), "{objects:?}");
    let blocked = exposition.samples["ep_orders_blocked"].iter().find(|s| s.labels["namespace"] == NS);
    let blocked = blocked.map(|s| (s.labels["domain"].as_str(), s.labels["reason"].as_str(), s.value));
    assert_eq!(blocked, Some(("paid", "AwaitingApproval", 1.0)));
    let ready = exposition.samples["ep_provider_ready"].iter().find(|s| s.labels["provider"] == "default");
    assert_eq!(ready.map(|s| s.value), Some(1.0));
    let not_ready = exposition.samples["ep_provider_ready"].iter().find(|s| s.labels["provider"] == "wrong-key");
    assert_eq!(not_ready.map(|s| s.value), Some(0.0));
    let refused: f64 = exposition.samples["ep_runpod_calls_total"]
        .iter()
        .filter(|s| s.labels["outcome"] == "Unauthorized")
        .map(|s| s.value)
        .sum();
    assert!(refused >= 1.0, "the refused key's calls are counted: {:?}", exposition.samples["ep_runpod_calls_total"]);
    let version = &exposition.samples["ep_build_info"][0];
    assert_eq!(version.labels["version"], env!("CARGO_PKG_VERSION"));
    // No label carries an object's name.
    for (name, samples) in &exposition.samples {
        for s in samples {
            let named = |v: &String| v == "hello" || *v == order_name || v.starts_with("needs-approval");
            assert!(!s.labels.values().any(named), "{name} {:?}", s.labels);
        }
    }
}
