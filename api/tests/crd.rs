//! Schema facts users rely on, and every CEL rule evaluated on a passing and a failing object.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers panic on setup failure by design

use ep_api::{Experiment, RunPodOrder, RunPodProvider};
use kube::CustomResourceExt;
use serde_json::{Value, json};

fn experiment(patch: impl FnOnce(&mut Value)) -> Experiment {
    let mut v = json!({
        "apiVersion": "ep.dev/v1alpha1", "kind": "Experiment",
        "metadata": {"name": "gnn-fraud-baseline", "namespace": "fraud-detect"},
        "spec": {
            "entry": {"command": ["python3", "train.py"], "args": ["--epochs", "20"]},
            "payload": {"digest": format!("sha256:{}", "a".repeat(64)), "locations": ["train.py", "lib/"]},
            "image": "runpod/pytorch:1.0.2-cu1281-torch280-ubuntu2404",
            "gpu": {"types": ["rtx-pro-4500", "NVIDIA A100 80GB PCIe"], "count": 1, "cloudType": "SECURE"},
            "order": {"policy": "paper-train", "workerId": "runpod-1", "providerRef": "default", "maxCostPerHour": 1.5},
            "limits": {"maxRuntime": "6h", "maxCostUsd": 25},
            "retry": {"maxAttempts": 3, "backoff": "10m"},
            "checkpoints": {"retention": "KeepLast", "path": "checkpoints/"},
            "results": {"file": "results.json", "metrics": ["f1", "auc"]},
            "dependsOn": ["gnn-fraud-features"]
        }
    });
    patch(&mut v);
    serde_json::from_value(v).unwrap()
}

fn order(patch: impl FnOnce(&mut Value)) -> RunPodOrder {
    let mut v = json!({
        "apiVersion": "ep.dev/v1alpha1", "kind": "RunPodOrder",
        "metadata": {"name": "gnn-fraud-baseline-a2", "namespace": "fraud-detect"},
        "spec": {
            "experimentRef": {"name": "gnn-fraud-baseline"},
            "providerRef": "default", "policy": "paper-train", "workerId": "runpod-1",
            "gpu": {"types": ["rtx-pro-4500"], "count": 1},
            "maxLifetime": "8h", "maxCostPerHour": 1.5, "deletionPolicy": "Terminate"
        }
    });
    patch(&mut v);
    serde_json::from_value(v).unwrap()
}

/// Asserts `result` failed with an error mentioning `message`.
fn assert_refused(result: Result<(), impl std::fmt::Display>, message: &str) {
    match result {
        Ok(()) => panic!("expected refusal with {message:?}, but the object passed"),
        Err(e) => assert!(e.to_string().contains(message), "expected {message:?} in: {e}"),
    }
}

#[test]
fn valid_objects_pass_every_rule() {
    experiment(|_| {}).validate_cel().unwrap();
    order(|_| {}).validate_cel().unwrap();
    let o = order(|_| {});
    o.validate_cel_update(&o).unwrap();
}

#[test]
fn payload_needs_exactly_one_source() {
    let both = experiment(|v| v["spec"]["payload"]["configMap"] = json!({"name": "scripts"}));
    assert_refused(both.validate_cel(), "set exactly one of digest");
    let neither = experiment(|v| {
        v["spec"]["payload"].as_object_mut().unwrap().remove("digest");
    });
    assert_refused(neither.validate_cel(), "set exactly one of digest");
    experiment(|v| v["spec"]["payload"] = json!({"configMap": {"name": "scripts"}})).validate_cel().unwrap();
}

#[test]
fn payload_locations_stay_inside_the_root() {
    for bad in ["/etc/passwd", "../secrets", "lib/../../x"] {
        let e = experiment(|v| v["spec"]["payload"]["locations"] = json!([bad]));
        assert_refused(e.validate_cel(), "relative paths inside the payload root");
    }
    experiment(|v| v["spec"]["payload"]["locations"] = json!(["a..b/c.py"])).validate_cel().unwrap();
}

#[test]
fn gpu_count_is_one_to_eight() {
    for bad in [0, 9, -1] {
        assert_refused(
            experiment(|v| v["spec"]["gpu"]["count"] = json!(bad)).validate_cel(),
            "gpu count must be between 1 and 8",
        );
        assert_refused(
            order(|v| v["spec"]["gpu"]["count"] = json!(bad)).validate_cel(),
            "gpu count must be between 1 and 8",
        );
    }
    experiment(|v| v["spec"]["gpu"]["count"] = json!(8)).validate_cel().unwrap();
}

#[test]
fn checkpoint_retention_is_required() {
    let none = experiment(|v| {
        v["spec"].as_object_mut().unwrap().remove("checkpoints");
    });
    assert_refused(none.validate_cel(), "spec.checkpoints.retention is required");
    let no_class = experiment(|v| v["spec"]["checkpoints"] = json!({"path": "ckpt/"}));
    assert_refused(no_class.validate_cel(), "spec.checkpoints.retention is required");
}

#[test]
fn max_attempts_at_least_one() {
    assert_refused(
        experiment(|v| v["spec"]["retry"]["maxAttempts"] = json!(0)).validate_cel(),
        "retry.maxAttempts must be at least 1",
    );
    experiment(|v| v["spec"]["retry"]["maxAttempts"] = json!(1)).validate_cel().unwrap();
}

#[test]
fn budgets_are_not_negative() {
    assert_refused(
        experiment(|v| v["spec"]["limits"]["maxCostUsd"] = json!(-1)).validate_cel(),
        "limits.maxCostUsd must not be negative",
    );
    assert_refused(
        experiment(|v| v["spec"]["limits"]["maxCostUsd"] = json!(-0.5)).validate_cel(),
        "limits.maxCostUsd must not be negative",
    );
    assert_refused(
        experiment(|v| v["spec"]["order"]["maxCostPerHour"] = json!(-2)).validate_cel(),
        "order.maxCostPerHour must not be negative",
    );
    assert_refused(
        order(|v| v["spec"]["maxCostPerHour"] = json!(-0.1)).validate_cel(),
        "spec.maxCostPerHour must not be negative",
    );
    experiment(|v| v["spec"]["limits"]["maxCostUsd"] = json!(0)).validate_cel().unwrap();
}

#[test]
fn depends_on_must_not_name_itself() {
    let e = experiment(|v| v["spec"]["dependsOn"] = json!(["gnn-fraud-baseline"]));
    assert_refused(e.validate_cel(), "spec.dependsOn must not name the experiment itself");
}

#[test]
fn env_value_or_secret_not_both() {
    let e = experiment(|v| {
        v["spec"]["env"] = json!([{"name": "K", "value": "v", "secretKeyRef": {"name": "s", "key": "k"}}])
    });
    assert_refused(e.validate_cel(), "set value or secretKeyRef, not both");
    experiment(|v| v["spec"]["env"] = json!([{"name": "K", "secretKeyRef": {"name": "s", "key": "k"}}]))
        .validate_cel()
        .unwrap();
}

#[test]
fn approval_cannot_be_withdrawn() {
    let approved = order(|v| {
        v["spec"]["approved"] = json!(true);
        v["spec"]["approvedBy"] = json!("alice");
    });
    let unset = order(|_| {});
    assert_refused(unset.validate_cel_update(&approved), "spec.approved cannot be withdrawn");
    let falsed = order(|v| {
        v["spec"]["approved"] = json!(false);
        v["spec"]["approvedBy"] = json!("alice");
    });
    assert_refused(falsed.validate_cel_update(&approved), "spec.approved cannot be withdrawn");
    let other = order(|v| {
        v["spec"]["approved"] = json!(true);
        v["spec"]["approvedBy"] = json!("mallory");
    });
    assert_refused(other.validate_cel_update(&approved), "spec.approvedBy cannot be changed");
    // Granting approval is a normal update.
    approved.validate_cel_update(&unset).unwrap();
}

#[test]
fn experiment_ref_and_worker_id_are_immutable() {
    let old = order(|_| {});
    let moved = order(|v| v["spec"]["experimentRef"]["name"] = json!("other"));
    assert_refused(moved.validate_cel_update(&old), "spec.experimentRef is immutable");
    let dropped = order(|v| {
        v["spec"].as_object_mut().unwrap().remove("experimentRef");
    });
    assert_refused(dropped.validate_cel_update(&old), "spec.experimentRef is immutable");
    let rebound = order(|v| v["spec"]["workerId"] = json!("runpod-2"));
    assert_refused(rebound.validate_cel_update(&old), "spec.workerId is immutable");
    let stopped = order(|v| v["spec"]["stop"] = json!({"reason": "wrong learning rate"}));
    stopped.validate_cel_update(&old).unwrap();
}

fn crd_json<K: CustomResourceExt>() -> Value {
    serde_json::to_value(K::crd()).unwrap()
}

fn rules(schema: &Value, out: &mut Vec<String>) {
    match schema {
        Value::Object(m) => {
            if let Some(Value::Array(vs)) = m.get("x-kubernetes-validations") {
                out.extend(vs.iter().map(|r| r["rule"].as_str().unwrap().to_owned()));
                for r in vs {
                    assert!(r["message"].as_str().is_some_and(|m| !m.is_empty()), "rule without message: {r}");
                }
            }
            m.values().for_each(|v| rules(v, out));
        }
        Value::Array(vs) => vs.iter().for_each(|v| rules(v, out)),
        _ => {}
    }
}

#[test]
fn crds_have_what_kubectl_users_rely_on() {
    let cases = [
        (
            crd_json::<Experiment>(),
            "experiments",
            "exp",
            "Namespaced",
            vec!["Phase", "Reason", "GPU", "Attempt", "Progress", "Cost", "F1", "AUC", "Age", "Metrics", "Message"],
        ),
        (
            crd_json::<RunPodOrder>(),
            "runpodorders",
            "rpo",
            "Namespaced",
            vec!["Phase", "Pod", "GPU", "$/H", "Spent", "Reason", "Domain", "Age"],
        ),
        (
            crd_json::<RunPodProvider>(),
            "runpodproviders",
            "rpp",
            "Cluster",
            vec!["Ready", "Data Center", "Volume", "Age"],
        ),
    ];
    for (crd, plural, short, scope, columns) in cases {
        assert_eq!(crd["metadata"]["name"], format!("{plural}.ep.dev"));
        assert_eq!(crd["spec"]["scope"], scope);
        assert_eq!(crd["spec"]["names"]["shortNames"], json!([short]));
        assert_eq!(crd["spec"]["names"]["categories"], json!(["ep"]));
        let version = &crd["spec"]["versions"][0];
        assert_eq!(version["name"], "v1alpha1");
        assert_eq!(version["subresources"]["status"], json!({}), "{plural} has a status subresource");
        let names: Vec<&str> = version["additionalPrinterColumns"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["name"].as_str().unwrap())
            .collect();
        assert_eq!(names, columns, "{plural} printer columns");
        // Every spec field carries a description (it is what `kubectl explain` shows).
        let spec = &version["schema"]["openAPIV3Schema"]["properties"]["spec"];
        for (field, schema) in spec["properties"].as_object().unwrap() {
            assert!(
                schema["description"].as_str().is_some_and(|d| !d.is_empty()),
                "{plural}.spec.{field} has no description"
            );
        }
    }
}

#[test]
fn every_cel_rule_is_in_the_crds() {
    let mut all = Vec::new();
    rules(&crd_json::<Experiment>(), &mut all);
    rules(&crd_json::<RunPodOrder>(), &mut all);
    rules(&crd_json::<RunPodProvider>(), &mut all);
    for needle in [
        "has(self.digest) != has(self.configMap)",
        "self >= 1 && self <= 8",
        "has(self.checkpoints) && has(self.checkpoints.retention)",
        "self >= 1",
        "double(self) >= 0.0",
        "!oldSelf.approved",
        "self.experimentRef.name == oldSelf.experimentRef.name",
        "self == oldSelf",
        "!(self.metadata.name in self.spec.dependsOn)",
    ] {
        assert!(all.iter().any(|r| r.contains(needle)), "missing CEL rule containing {needle:?}; have {all:#?}");
    }
}
