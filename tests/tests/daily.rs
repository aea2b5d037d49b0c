//! The ML engineer's daily loop as a person sees it through kubectl: what an experiment waits for,
//! how far it is, what it declared, and why a failed attempt failed, without opening a log.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use ep_testkit::e2e::{NS, condition as cond, exp, quickstart_stack};
use ep_testkit::stack::StackOptions;

const LONG: Duration = Duration::from_secs(120);

/// The row of `kubectl get` below its header, with the header.
fn table(out: &str) -> (String, String) {
    let (head, row) = out.split_once('\n').unwrap();
    (head.to_owned(), row.to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_script_error_is_not_retried_and_its_stderr_is_shown_where_people_look() {
    let stack = quickstart_stack(&StackOptions::default()).await.unwrap();
    let yaml = exp("typo").attempts(3, Some("1s")).yaml().replace(r#"--epochs, "3""#, r#"--epochs, "three""#);
    stack.apply(&yaml).unwrap();
    let e = stack.wait_phase("exp", "typo", &["Failed", "Succeeded"]).unwrap();
    let st = &e["status"];
    assert_eq!(st["phase"], "Failed", "{st}");
    assert_eq!(st["reason"], "NotRetried", "a script error is not paid for three times: {st}");
    let msg = cond(Some(&e), "Ready").unwrap()["message"].as_str().unwrap().to_owned();
    assert!(msg.contains("stderr ends:") && msg.contains("invalid int value: 'three'"), "{msg}");
    assert!(stack.get("rpo", Some(NS), "typo-a2").unwrap().is_none(), "no second attempt");
    let (head, row) = table(&stack.kubectl(&["get", "exp", "typo", "-n", NS]).unwrap());
    assert!(head.contains("REASON") && row.contains("NotRetried"), "{head}\n{row}");
    let (head, row) = table(&stack.kubectl(&["get", "exp", "typo", "-n", NS, "-o", "wide"]).unwrap());
    assert!(head.contains("MESSAGE") && row.contains("invalid int value"), "{head}\n{row}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_get_shows_what_an_experiment_waits_for_and_how_far_it_is() {
    let stack = quickstart_stack(&StackOptions::default()).await.unwrap();
    stack.apply(&exp("slow").policy("paper_train").epochs(40, 0.4).gpus(&["rtx-pro-4500"]).yaml()).unwrap();
    // No pod while approval is missing: the experiment says Waiting, and why, in its row.
    let e = stack
        .wait_for("exp", Some(NS), "slow", LONG, "Waiting", |o| {
            o.is_some_and(|o| o["status"]["phase"] == "Waiting" && o["status"]["reason"] == "AwaitingApproval")
        })
        .unwrap()
        .unwrap();
    assert!(e["status"]["message"].as_str().unwrap().contains("requires approval"), "{}", e["status"]);
    let (head, row) = table(&stack.kubectl(&["get", "exp", "slow", "-n", NS]).unwrap());
    assert!(head.contains("REASON") && row.contains("Waiting") && row.contains("AwaitingApproval"), "{row}");
    // Approved for two attempts: the rerun below is the second.
    stack.kubectl_ep_as("aster", &["approve", "slow", "-n", NS, "--yes", "--max-attempts", "2"]).unwrap();
    stack.wait_phase("rpo", "slow-a1", &["RUNNER_ONLINE"]).unwrap();
    // `kubectl ep logs -f` prints while the run is live and returns when it ends.
    let follow = std::thread::scope(|s| {
        let follower = s.spawn(|| stack.kubectl_ep(&["logs", "slow", "-f", "-n", NS]));
        progress_shows(&stack);
        follower.join().unwrap()
    })
    .unwrap();
    assert!(follow.contains("epoch 1/40") && follow.contains("epoch 40/40"), "{follow}");
    // Once done: the declared metrics with their values in -o wide.
    let e = stack.wait_phase("exp", "slow", &["Succeeded", "Failed"]).unwrap();
    assert_eq!(e["status"]["phase"], "Succeeded");
    let metrics = e["status"]["metrics"].as_str().unwrap();
    assert!(metrics.starts_with("f1=") && metrics.contains(" auc="), "{metrics}");
    assert!(cond(Some(&e), "SpecChangePending").is_none(), "the attempt is over: {}", e["status"]);
    let (head, row) = table(&stack.kubectl(&["get", "exp", "slow", "-n", NS, "-o", "wide"]).unwrap());
    assert!(head.contains("METRICS") && row.contains(metrics), "{head}\n{row}");
    // Its files, verified against the receipt, with no keys copied from anywhere.
    let into = tempfile::tempdir().unwrap();
    let dir = into.path().join("slow");
    let out = stack.kubectl_ep(&["pull", "slow", dir.to_str().unwrap(), "-n", NS]).unwrap();
    assert!(out.contains("verified into"), "{out}");
    let results: serde_json::Value = serde_json::from_slice(&std::fs::read(dir.join("results.json")).unwrap()).unwrap();
    assert!(results["f1"].is_f64(), "{results}");
    // A finished experiment runs again on request, as attempt 2; a running one is not rerun.
    let out = stack.kubectl_ep(&["rerun", "slow", "-n", NS]).unwrap();
    assert!(out.contains("experiment.ep.dev/slow rerun: attempt 2 follows"), "{out}");
    stack.wait_phase("rpo", "slow-a2", &["RUNNER_ONLINE"]).unwrap();
    let err = stack.kubectl_ep(&["rerun", "slow", "-n", NS]).unwrap_err().to_string();
    assert!(err.contains("only a Succeeded or Failed experiment is rerun"), "{err}");
    let e = stack.wait_phase("exp", "slow", &["Succeeded", "Failed"]).unwrap();
    assert_eq!((e["status"]["phase"].as_str(), e["status"]["attempts"].as_i64()), (Some("Succeeded"), Some(2)));
    let logs = stack.kubectl_ep(&["logs", "slow", "--attempt", "1", "--tail", "1", "-n", NS]).unwrap();
    assert!(logs.contains("\"f1\""), "attempt 1's last line is its results: {logs}");
}

/// While the run trains: progress in status and in the PROGRESS column.
fn progress_shows(stack: &ep_testkit::stack::Stack) {
    let e = stack
        .wait_for("exp", Some(NS), "slow", LONG, "progress", |o| {
            o.is_some_and(|o| o["status"]["progress"]["summary"].as_str().is_some_and(|s| s.contains("/40 (")))
        })
        .unwrap()
        .unwrap();
    assert_eq!(e["status"]["phase"], "Running", "{}", e["status"]);
    let (head, row) = table(&stack.kubectl(&["get", "exp", "slow", "-n", NS]).unwrap());
    assert!(head.contains("PROGRESS") && row.contains("/40 ("), "{head}\n{row}");
    // An edit while the attempt runs is named, and waits for the next attempt.
    stack.merge_patch("exp", Some(NS), "slow", r#"{"spec":{"limits":{"maxCostUsd":3}}}"#).unwrap();
    let e = stack
        .wait_for("exp", Some(NS), "slow", LONG, "SpecChangePending", |o| cond(o, "SpecChangePending").is_some())
        .unwrap();
    let msg = cond(e.as_ref(), "SpecChangePending").unwrap()["message"].as_str().unwrap().to_owned();
    assert!(msg.starts_with("spec.limits changed while attempt 1 runs") && msg.contains("attempt 2"), "{msg}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_ep_run_pushes_the_code_applies_and_follows_to_the_end() {
    let stack = quickstart_stack(&StackOptions::default()).await.unwrap();
    // The user's own experiment file: no digest, no ConfigMap; run fills the digest in.
    let yaml =
        exp("mine").yaml().replace("payload: {configMap: {name: quickstart-code}}", "payload: {locations: [train.py]}");
    assert!(yaml.contains("locations: [train.py]"));
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("mine.yaml");
    std::fs::write(&file, yaml).unwrap();
    let code = ep_testkit::workspace_root().join("examples/quickstart");
    // As Wren, an experiment author: the volume's S3 keys are hers to use, RunPod's API key is not.
    let args = ["run", code.to_str().unwrap(), "-f", file.to_str().unwrap(), "-n", NS];
    let out = stack.kubectl_ep_as("wren", &args).unwrap();
    assert!(out.contains("experiment.ep.dev/mine applied in ep-quickstart with payload sha256:"), "{out}");
    assert!(out.contains("epoch 3/3"), "the script's output is followed: {out}");
    assert!(out.contains("mine: f1="), "it ends with the declared metrics: {out}");
    let e = stack.get("exp", Some(NS), "mine").unwrap().unwrap();
    assert_eq!(e["status"]["phase"], "Succeeded");
    assert!(e["spec"]["payload"]["digest"].as_str().unwrap().starts_with("sha256:"), "{}", e["spec"]);
    let denied = stack.kubectl_as("wren", &["get", "secret", "runpod", "-n", "ep-system"]).unwrap_err();
    assert!(denied.to_string().contains("forbidden"), "{denied}");
    let logs = stack.kubectl_ep_as("wren", &["logs", "mine", "-n", NS, "--tail", "1"]).unwrap();
    assert!(logs.contains("\"f1\""), "{logs}");
    // A file that is not an Experiment is refused with the file and the field named.
    std::fs::write(&file, "apiVersion: ep.dev/v1alpha1\nkind: Experiment\nmetadata: {name: bad}\nspec: {image: 5}\n")
        .unwrap();
    let err = stack.kubectl_ep(&["run", code.to_str().unwrap(), "-f", file.to_str().unwrap(), "-n", NS]).unwrap_err();
    assert!(err.to_string().contains("mine.yaml"), "{err}");
    // A typo costs nothing: Python that does not compile, or an entry the payload lacks, is
    // refused before anything is pushed or applied.
    let broken = tempfile::tempdir().unwrap();
    std::fs::write(broken.path().join("train.py"), "import sys\ndef main(:\n    pass\n").unwrap();
    let mine = exp("typo2")
        .yaml()
        .replace("payload: {configMap: {name: quickstart-code}}", "payload: {locations: [train.py]}");
    std::fs::write(&file, &mine).unwrap();
    let run = |dir: &std::path::Path| {
        stack
            .kubectl_ep(&["run", dir.to_str().unwrap(), "-f", file.to_str().unwrap(), "-n", NS])
            .unwrap_err()
            .to_string()
    };
    let err = run(broken.path());
    assert!(err.contains("train.py:2: ") && err.contains("def main(:") && err.contains("nothing pushed"), "{err}");
    std::fs::write(broken.path().join("train.py"), "print('fixed')\n").unwrap();
    std::fs::write(&file, mine.replace("[python3, train.py]", "[python3, trian.py]")).unwrap();
    let err = run(broken.path());
    assert!(err.contains("mine.yaml: spec.entry runs trian.py") && err.contains("nothing pushed"), "{err}");
    assert!(stack.get("exp", Some(NS), "typo2").unwrap().is_none(), "nothing applied");
}

/// kubectl's own completion (`kubectl __complete ...`, what the shell script kubectl generates
/// calls) with this workspace's plugin and `kubectl_complete-ep` on PATH.
fn kubectl_completes(stack: &ep_testkit::stack::Stack, words: &[&str]) -> Vec<String> {
    let bin = ep_testkit::sim::workspace_bin("kubectl_complete-ep").unwrap();
    let path = format!("{}:{}", bin.parent().unwrap().display(), std::env::var("PATH").unwrap_or_default());
    let out = std::process::Command::new(ep_testkit::tools::kubectl().unwrap())
        .env("KUBECONFIG", stack.kubeconfig())
        .env("PATH", path)
        .arg("__complete")
        .args(words)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).lines().map(str::to_owned).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn describe_tells_the_story_and_completion_reaches_the_plugin() {
    let stack = quickstart_stack(&StackOptions::default()).await.unwrap();
    stack.apply(&exp("told").yaml()).unwrap();
    stack.wait_phase("exp", "told", &["Succeeded", "Failed"]).unwrap();
    let out = stack.kubectl_ep(&["describe", "told", "-n", NS]).unwrap();
    for want in
        ["Phase:      Succeeded", "Metrics:", "Attempts:", "told-a1", "Timeline:", "order/told-a1", "RUNNER_ONLINE"]
    {
        assert!(out.contains(want), "{want} missing from:\n{out}");
    }
    let story: serde_json::Value =
        serde_json::from_str(&stack.kubectl_ep(&["describe", "told", "-n", NS, "-o", "json"]).unwrap()).unwrap();
    assert_eq!((story["phase"].as_str(), story["attempts"][0]["order"].as_str()), (Some("Succeeded"), Some("told-a1")));
    assert!(story["timeline"].as_array().unwrap().iter().any(|m| m["phase"] == "RUNNER_ONLINE"), "{story}");
    let yaml: serde_json::Value =
        serde_saphyr::from_str(&stack.kubectl_ep(&["describe", "told", "-n", NS, "-o", "yaml"]).unwrap()).unwrap();
    assert_eq!(yaml["attempts"], story["attempts"]);
    let into = tempfile::tempdir().unwrap();
    let pulled = stack.kubectl_ep(&["pull", "told", into.path().to_str().unwrap(), "-n", NS, "-o", "json"]).unwrap();
    let pulled: serde_json::Value = serde_json::from_str(&pulled).unwrap();
    let results = pulled.as_array().unwrap().iter().find(|f| f["path"] == "results.json").unwrap();
    let sum = std::process::Command::new("sha256sum").arg(into.path().join("results.json")).output().unwrap();
    let sum = String::from_utf8(sum.stdout).unwrap();
    assert!(sum.starts_with(results["sha256"].as_str().unwrap()), "{pulled} vs {sum}");
    // kubectl completes the plugin's subcommands, then the namespace's experiments.
    let subs = kubectl_completes(&stack, &["ep", "re"]);
    assert!(subs.contains(&"rerun".to_owned()), "{subs:?}");
    let names = kubectl_completes(&stack, &["ep", "describe", "-n", NS, "to"]);
    assert!(names.contains(&"told".to_owned()) && names.last().is_some_and(|d| d == ":4"), "{names:?}");
    let script = stack.kubectl_ep(&["completion", "bash"]).unwrap();
    assert!(script.contains("kubectl-ep") && script.contains("complete"), "{script}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_pod_costs_only_the_epochs_since_its_last_checkpoint() {
    let stack = quickstart_stack(&StackOptions::default()).await.unwrap();
    let yaml = exp("resumed").epochs(16, 0.5).attempts(2, Some("1s")).retention("Keep").yaml().replace(
        "checkpoints: {retention: Keep, path: checkpoints/}",
        "checkpoints: {retention: Keep, path: checkpoints/, resume: true}",
    );
    assert!(yaml.contains("resume: true"), "{yaml}");
    stack.apply(&yaml).unwrap();
    // The pod is lost once the script is past epoch 5.
    let o = stack
        .wait_for("rpo", Some(NS), "resumed-a1", LONG, "epoch 5", |o| {
            o.is_some_and(|o| o["status"]["progress"]["step"].as_i64().is_some_and(|s| s >= 5))
        })
        .unwrap()
        .unwrap();
    let pod = o["status"]["podId"].as_str().unwrap().to_owned();
    stack.admin_post(&format!("pods/{pod}/vanish"), serde_json::json!({})).await.unwrap();
    let e = stack.wait_phase("exp", "resumed", &["Succeeded", "Failed"]).unwrap();
    let st = &e["status"];
    assert_eq!((st["phase"].as_str(), st["attempts"].as_i64()), (Some("Succeeded"), Some(2)), "{st}");
    let from =
        st["history"][1]["resumeFrom"].as_str().unwrap_or_else(|| panic!("attempt 2 resumed from nothing: {st}"));
    let k: u32 = from.rsplit("epoch-").next().unwrap().trim_end_matches(".json").parse().unwrap();
    assert!(k >= 5, "{from}");
    let first = stack.kubectl_ep(&["logs", "resumed", "--attempt", "1", "-n", NS]).unwrap();
    let second = stack.kubectl_ep(&["logs", "resumed", "--attempt", "2", "-n", NS]).unwrap();
    assert!(second.contains(&format!("resuming from epoch {k}")), "{second}");
    assert!(second.contains(&format!("epoch {}/16", k + 1)) && !second.contains(&format!("epoch {k}/16 ")), "{second}");
    let epochs = |log: &str| log.lines().filter(|l| l.starts_with("epoch ")).count();
    let run = epochs(&first) + epochs(&second);
    assert!(run <= 16 + 1, "{run} epochs run for 16 planned:\n{first}\n{second}");
    // Nothing of attempt 1 was written by attempt 2: its checkpoint is where it was.
    assert!(from.contains(st["history"][0]["runId"].as_str().unwrap()), "{from}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_one_clock_the_operators_cost_agrees_with_runpods_billing() {
    ep_testkit::e2e::init_tls();
    // runpod-sim in real time, as the sandbox runs it: a minute of training is a minute billed.
    let opts = StackOptions { clock_speed: 1.0, ..StackOptions::default() };
    let stack = ep_testkit::stack::Stack::start(&opts).await.unwrap();
    stack.apply_quickstart(false).unwrap();
    let before = stack.world().await.unwrap()["balance"].as_f64().unwrap();
    stack.apply(&exp("clock").epochs(45, 1.0).yaml()).unwrap();
    let e = stack
        .wait_for("exp", Some(NS), "clock", Duration::from_secs(300), "Succeeded", |o| {
            o.is_some_and(|o| matches!(o["status"]["phase"].as_str(), Some("Succeeded" | "Failed")))
        })
        .unwrap()
        .unwrap();
    assert_eq!(e["status"]["phase"], "Succeeded", "{}", e["status"]);
    let order = stack.wait_phase("rpo", "clock-a1", &["DELETED"]).unwrap();
    let counted = order["status"]["accruedCostUsd"].as_f64().unwrap();
    // Billing stops when the pod is terminated, which DELETED confirms.
    let billed = before - stack.world().await.unwrap()["balance"].as_f64().unwrap();
    assert!(billed > 0.0, "runpod-sim billed nothing");
    let off = (counted - billed).abs() / billed;
    assert!(off < 0.05, "operator ${counted:.6} vs runpod-sim ${billed:.6}: {:.1}% apart", off * 100.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_restart_an_edit_stops_the_live_attempt_and_the_next_one_runs_it() {
    let stack = quickstart_stack(&StackOptions::default()).await.unwrap();
    // One attempt allowed: the restart must not spend it.
    let yaml = format!("{}  onSpecChange: Restart\n", exp("edited").epochs(60, 0.3).yaml());
    stack.apply(&yaml).unwrap();
    stack
        .wait_for("rpo", Some(NS), "edited-a1", LONG, "epoch 2", |o| {
            o.is_some_and(|o| o["status"]["progress"]["step"].as_i64().is_some_and(|s| s >= 2))
        })
        .unwrap();
    // Sixty epochs was a mistake: three will do.
    let edit = r#"{"spec":{"entry":{"args":["--epochs","3","--epoch-sleep","0"]}}}"#;
    stack.merge_patch("exp", Some(NS), "edited", edit).unwrap();
    let e = stack.wait_phase("exp", "edited", &["Succeeded", "Failed"]).unwrap();
    let st = &e["status"];
    assert_eq!((st["phase"].as_str(), st["attempts"].as_i64()), (Some("Succeeded"), Some(2)), "{st}");
    assert_eq!(st["history"][0]["outcome"], "Stopped", "{st}");
    let stop = stack.get("rpo", Some(NS), "edited-a1").unwrap().unwrap()["spec"]["stop"]["reason"].clone();
    assert!(stop.as_str().unwrap().contains("spec.entry"), "{stop}");
    let second = stack.kubectl_ep(&["logs", "edited", "--attempt", "2", "-n", NS]).unwrap();
    assert!(second.contains("epoch 3/3"), "attempt 2 ran the edit: {second}");
    let first = stack.kubectl_ep(&["logs", "edited", "--attempt", "1", "-n", NS]).unwrap();
    assert!(!first.contains("epoch 60/60"), "attempt 1 was stopped, not run out: {first}");
    let events = stack.kubectl(&["get", "events", "-n", NS, "--field-selector", "involvedObject.name=edited"]).unwrap();
    assert!(events.contains("Restarted"), "{events}");
}
