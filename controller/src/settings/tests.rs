use std::time::Duration;

use super::*;

const VALID: &str = r#"
pollInterval: 10s
heartbeatTimeout: 60s
runtimeStartDeadline: 20m
gpuAliases: {rtx-pro-4500: NVIDIA RTX PRO 4500 Blackwell, a100-80g: NVIDIA A100 80GB PCIe}
policies:
  paper-train: {aliases: [paper_train], cloudType: SECURE, containerDiskGb: 50,
                requiresApproval: true, maxLifetime: 12h}
budgets: {namespaces: {fraud-detect: {maxUsdPerDay: 200, maxConcurrentGpus: 4}}}
orphans: {action: Report}
"#;

fn invalid(text: &str) -> String {
    Settings::from_yaml("settings.yaml", text).unwrap_err().to_string()
}

#[test]
fn an_empty_file_or_one_without_policies_is_refused() {
    for text in ["", "  \n", "# nothing here\n"] {
        let err = invalid(text);
        assert!(err.contains("settings.yaml") && err.contains("empty"), "{text:?}: {err}");
    }
    let err = invalid("pollInterval: 10s\n");
    assert!(err.contains("policies: no order policy is defined"), "{err}");
}

#[test]
fn intervals_below_one_second_are_refused() {
    for field in ["pollInterval", "heartbeatInterval", "runtimeStartDeadline"] {
        let err = invalid(&format!("{field}: 1ms\npolicies: {{a: {{}}}}\n"));
        assert!(err.contains(&format!("{field}: 1ms is below the floor of 1s")), "{err}");
    }
    assert!(Settings::from_yaml("s", "pollInterval: 1s\npolicies: {a: {}}\n").is_ok());
}

#[test]
fn design_example_parses() {
    let s = Settings::from_yaml("settings.yaml", VALID).unwrap();
    assert_eq!(s.poll_interval.get(), Duration::from_secs(10));
    assert_eq!(s.resolve_gpu("rtx-pro-4500"), "NVIDIA RTX PRO 4500 Blackwell");
    assert_eq!(s.resolve_gpu("NVIDIA L4"), "NVIDIA L4", "ids pass through for the live catalog check");
    assert_eq!(s.budget_for("fraud-detect").unwrap().max_concurrent_gpus, 4);
    assert!(s.budget_for("other").is_none());
    assert_eq!(s.orphans.action, OrphanAction::Report);
}

#[test]
fn embedded_default_is_valid_and_complete() {
    let s = Settings::embedded_default();
    assert_eq!(s.resolve_gpu("rtx-pro-4500"), "NVIDIA RTX PRO 4500 Blackwell");
    assert!(s.policy("paper-train").unwrap().1.requires_approval);
    assert!(s.budget_for("anything").is_some());
}

#[test]
fn policies_resolve_by_canonical_name_or_alias() {
    let s = Settings::from_yaml("s", VALID).unwrap();
    assert_eq!(s.policy("paper-train").unwrap().0, "paper-train");
    assert_eq!(s.policy("paper_train").unwrap().0, "paper-train");
    let err = s.policy("paper-trian").unwrap_err().to_string();
    assert_eq!(err, "unknown order policy \"paper-trian\"; known policies: paper-train (aliases: paper_train)");
}

#[test]
fn unknown_fields_are_refused_with_their_name() {
    let err = invalid("pollIntervall: 10s\n");
    assert!(err.contains("settings.yaml") && err.contains("pollIntervall"), "{err}");
    let err = invalid("policies: {p: {maxLifetme: 1h}}\n");
    assert!(err.contains("maxLifetme"), "{err}");
}

#[test]
fn bad_values_name_their_field() {
    let cases = [
        ("pollInterval: 10x\n", "10x"),
        ("pollInterval: 0s\n", "pollInterval: must be greater than zero"),
        (
            "heartbeatInterval: 30s\nheartbeatTimeout: 45s\n",
            "heartbeatTimeout: 45s is shorter than two heartbeat intervals",
        ),
        ("policies: {Paper_Train: {}}\n", "policies.Paper_Train: a canonical policy name must be lower case"),
        (
            "policies: {a: {aliases: [x]}, b: {aliases: [x]}}\n",
            "policies.b.aliases: alias \"x\" is already used by policy a",
        ),
        ("policies: {a: {}, b: {aliases: [a]}}\n", "policies.b.aliases: alias \"a\" is already used by policy a"),
        ("policies: {a: {containerDiskGb: 0}}\n", "policies.a.containerDiskGb: 0 is outside 1..4000"),
        ("policies: {a: {maxCostPerHour: -1}}\n", "policies.a.maxCostPerHour: -1 must be a non-negative number"),
        (
            "budgets: {namespaces: {ml: {maxUsdPerDay: -5, maxConcurrentGpus: 1}}}\n",
            "budgets.namespaces.ml.maxUsdPerDay: -5 must be a non-negative number",
        ),
        ("gpuAliases: {l4: ''}\n", "gpuAliases.l4: maps to an empty gpu type id"),
        ("concurrency: {reconciles: 0}\n", "concurrency.reconciles: must be at least 1"),
        ("orphans: {action: Delete}\n", "Delete"),
    ];
    for (text, want) in cases {
        let err = invalid(text);
        assert!(err.contains(want), "for {text:?}: expected {want:?} in {err:?}");
    }
}

#[test]
fn every_problem_is_reported_at_once() {
    let err = invalid("pollInterval: 0s\npolicies: {a: {containerDiskGb: 0}}\n");
    assert!(err.contains("pollInterval") && err.contains("policies.a.containerDiskGb"), "{err}");
}

#[tokio::test]
async fn invalid_edit_is_refused_then_valid_edit_applies() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("settings.yaml");
    std::fs::write(&path, VALID).unwrap();
    let (watcher, handle) = SettingsWatcher::load(&path).unwrap();
    let task = watcher.spawn(Duration::from_millis(10));
    let mut status = handle.subscribe_status();
    let first = handle.current();

    // An invalid edit: refused, the previous settings stay in force.
    std::fs::write(&path, VALID.replace("pollInterval: 10s", "pollInterval: soon")).unwrap();
    let st = tokio::time::timeout(Duration::from_secs(5), status.wait_for(|s| s.rejections == 1))
        .await
        .unwrap()
        .unwrap()
        .clone();
    assert!(st.last_rejection.as_ref().unwrap().error.contains("soon"), "{st:?}");
    assert_eq!(handle.current(), first, "last good settings stay in force");
    assert_eq!(st.reloads, 0);

    // A valid edit afterwards: applied, the refusal cleared.
    std::fs::write(&path, VALID.replace("pollInterval: 10s", "pollInterval: 3s")).unwrap();
    let st = tokio::time::timeout(Duration::from_secs(5), status.wait_for(|s| s.reloads == 1))
        .await
        .unwrap()
        .unwrap()
        .clone();
    assert_eq!(handle.current().poll_interval.get(), Duration::from_secs(3));
    assert!(st.last_rejection.is_none());
    assert_eq!(st.active_sha256, content_hash(VALID.replace("pollInterval: 10s", "pollInterval: 3s").as_bytes()));
    task.abort();
}

#[test]
fn change_detection_is_by_content() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("settings.yaml");
    std::fs::write(&path, VALID).unwrap();
    let (mut watcher, handle) = SettingsWatcher::load(&path).unwrap();
    // Rewriting the same bytes (new mtime) is not a change.
    std::fs::write(&path, VALID).unwrap();
    assert!(!watcher.check());
    // A ConfigMap-style update: the path becomes a symlink to a new file.
    let next = dir.path().join("..data-2");
    std::fs::write(&next, VALID.replace("60s", "90s")).unwrap();
    std::fs::remove_file(&path).unwrap();
    std::os::unix::fs::symlink(&next, &path).unwrap();
    assert!(watcher.check());
    assert_eq!(handle.current().heartbeat_timeout.get(), Duration::from_secs(90));
    // A vanished file is refused once, and the settings stay.
    std::fs::remove_file(&path).unwrap();
    assert!(watcher.check());
    assert!(!watcher.check(), "the same read error is reported once");
    assert_eq!(handle.status().rejections, 1);
    assert_eq!(handle.current().heartbeat_timeout.get(), Duration::from_secs(90));
}

#[test]
fn invalid_file_at_start_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("settings.yaml");
    std::fs::write(&path, "policies: {a: {containerDiskGb: 0}}\n").unwrap();
    let err = SettingsWatcher::load(&path).err().unwrap().to_string();
    assert!(err.contains("policies.a.containerDiskGb"), "{err}");
}
