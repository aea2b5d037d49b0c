//! kubectl 1.35 against kube-sim, as a user drives it: apply CRDs and an Experiment, get with the
//! printer columns, get -o yaml, patch, delete waiting on a finalizer, and an invalid apply.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers panic on setup failure by design

use std::path::Path;
use std::process::{Command, Output};

use ep_testkit::tools;

struct Kubectl {
    bin: std::path::PathBuf,
    kubeconfig: std::path::PathBuf,
}

impl Kubectl {
    fn run(&self, args: &[&str]) -> Output {
        Command::new(&self.bin).env("KUBECONFIG", &self.kubeconfig).args(args).output().unwrap()
    }
    fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "kubectl {args:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }
}

const EXPERIMENT: &str = r#"
apiVersion: ep.dev/v1alpha1
kind: Experiment
metadata: {name: gnn-fraud-baseline, namespace: fraud-detect}
spec:
  entry: {command: [python3, scripts/train.py], args: [--epochs, "20"]}
  payload: {digest: "sha256:9f2c0000000000000000000000000000000000000000000000000000000000aa"}
  image: runpod/pytorch:1.0.2-cu1281-torch280-ubuntu2404
  gpu: {types: [rtx-pro-4500, "NVIDIA A100 80GB PCIe"], count: 1, cloudType: SECURE}
  order: {policy: paper-train, workerId: runpod-1, providerRef: default}
  limits: {maxRuntime: 6h, maxCostUsd: 25}
  retry: {maxAttempts: 3, backoff: 10m}
  checkpoints: {retention: KeepLast, path: checkpoints/}
  results: {file: results.json, metrics: [f1, auc]}
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_applies_gets_patches_and_deletes() {
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    let sim =
        kube_sim::start(kube_sim::Options { kubeconfig_out: Some(kubeconfig.clone()), ..kube_sim::Options::default() })
            .await
            .unwrap();
    let k = Kubectl { bin: tools::kubectl().unwrap(), kubeconfig };
    let crds = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../crds");

    let out = k.ok(&["apply", "-f", crds.to_str().unwrap()]);
    assert!(out.contains("customresourcedefinition.apiextensions.k8s.io/experiments.ep.dev created"), "{out}");
    k.ok(&["wait", "--for", "condition=Established", "crd/experiments.ep.dev", "--timeout", "10s"]);
    let ns = dir.path().join("ns.yaml");
    std::fs::write(&ns, "apiVersion: v1\nkind: Namespace\nmetadata: {name: fraud-detect}\n").unwrap();
    k.ok(&["apply", "-f", ns.to_str().unwrap()]);
    let exp = dir.path().join("exp.yaml");
    std::fs::write(&exp, EXPERIMENT).unwrap();
    assert!(k.ok(&["apply", "-f", exp.to_str().unwrap()]).contains("experiment.ep.dev/gnn-fraud-baseline created"));
    // Applying the same file again is a no-op.
    assert!(k.ok(&["apply", "-f", exp.to_str().unwrap()]).contains("unchanged"));

    let table = k.ok(&["get", "exp", "-n", "fraud-detect"]);
    let header: Vec<&str> = table.lines().next().unwrap().split_whitespace().collect();
    assert_eq!(
        header,
        ["NAME", "PHASE", "REASON", "GPU", "ATTEMPT", "PROGRESS", "COST", "F1", "AUC", "AGE"],
        "{table}"
    );
    assert!(table.lines().nth(1).unwrap().starts_with("gnn-fraud-baseline"));

    let yaml = k.ok(&["get", "exp", "gnn-fraud-baseline", "-n", "fraud-detect", "-o", "yaml"]);
    assert!(yaml.contains("generation: 1") && yaml.contains("uid: "), "{yaml}");
    assert!(
        yaml.contains("providerRef: default") && yaml.contains("interruptible: false"),
        "schema defaults applied: {yaml}"
    );

    // The status subresource through kubectl, then the columns show it.
    k.ok(&["patch", "exp", "gnn-fraud-baseline", "-n", "fraud-detect", "--subresource=status", "--type", "merge", "-p",
           r#"{"status":{"phase":"Succeeded","gpu":"RTX PRO 4500","attempts":2,"costUsd":4.31,"results":{"f1":0.912,"auc":0.968}}}"#]);
    let row = k.ok(&["get", "exp", "-n", "fraud-detect", "--no-headers"]);
    let cells: Vec<&str> = row.split_whitespace().collect();
    assert_eq!(
        &cells[..9],
        ["gnn-fraud-baseline", "Succeeded", "RTX", "PRO", "4500", "2", "4.31", "0.912", "0.968"],
        "{row}"
    );

    // A merge patch changes the spec and bumps the generation.
    k.ok(&[
        "patch",
        "exp",
        "gnn-fraud-baseline",
        "-n",
        "fraud-detect",
        "--type",
        "merge",
        "-p",
        r#"{"spec":{"suspend":true},"metadata":{"finalizers":["ep.dev/cleanup"]}}"#,
    ]);
    let generation = k.ok(&[
        "get",
        "exp",
        "gnn-fraud-baseline",
        "-n",
        "fraud-detect",
        "-o",
        "jsonpath={.metadata.generation} {.spec.suspend}",
    ]);
    assert_eq!(generation, "2 true");

    // An invalid Experiment is refused with the CEL rule's message.
    let bad = dir.path().join("bad.yaml");
    std::fs::write(
        &bad,
        EXPERIMENT
            .replace("gnn-fraud-baseline", "no-retention")
            .replace("  checkpoints: {retention: KeepLast, path: checkpoints/}\n", ""),
    )
    .unwrap();
    let out = k.run(&["apply", "-f", bad.to_str().unwrap()]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(r#"The Experiment "no-retention" is invalid"#)
            && err.contains("spec.checkpoints.retention is required before any launch"),
        "{err}"
    );
    let bad_count = EXPERIMENT.replace("gnn-fraud-baseline", "nine-gpus").replace("count: 1", "count: 9");
    std::fs::write(&bad, bad_count).unwrap();
    let err = String::from_utf8(k.run(&["apply", "-f", bad.to_str().unwrap()]).stderr).unwrap();
    assert!(err.contains("gpu count must be between 1 and 8"), "{err}");
    // A name longer than the operator can serve (it becomes a label value) is refused with the limit.
    let long = "x".repeat(64);
    std::fs::write(&bad, EXPERIMENT.replace("gnn-fraud-baseline", &long)).unwrap();
    let err = String::from_utf8(k.run(&["apply", "-f", bad.to_str().unwrap()]).stderr).unwrap();
    assert!(err.contains("metadata.name must be at most 63 characters"), "{err}");
    std::fs::write(&bad, EXPERIMENT.replace("gnn-fraud-baseline", &long[..63])).unwrap();
    k.ok(&["apply", "-f", bad.to_str().unwrap()]);
    k.ok(&["delete", "-f", bad.to_str().unwrap()]);
    // A misspelt field is refused by server-side field validation (kubectl's default).
    std::fs::write(&bad, EXPERIMENT.replace("gnn-fraud-baseline", "typo").replace("image:", "imagee: x\n  image:"))
        .unwrap();
    let err = String::from_utf8(k.run(&["apply", "-f", bad.to_str().unwrap()]).stderr).unwrap();
    assert!(err.contains(r#"unknown field "spec.imagee""#), "{err}");
    let listed = k.ok(&["get", "exp", "-n", "fraud-detect", "-o", "name"]);
    assert_eq!(listed.trim(), "experiment.ep.dev/gnn-fraud-baseline", "nothing invalid was stored");

    // Delete waits on the finalizer, and finishes once it is removed.
    let bin = k.bin.clone();
    let kc = k.kubeconfig.clone();
    let deleting = std::thread::spawn(move || {
        Command::new(bin)
            .env("KUBECONFIG", kc)
            .args(["delete", "exp", "gnn-fraud-baseline", "-n", "fraud-detect", "--timeout=30s"])
            .output()
            .unwrap()
    });
    let mut marked = String::new();
    for _ in 0..100 {
        marked = k.ok(&[
            "get",
            "exp",
            "gnn-fraud-baseline",
            "-n",
            "fraud-detect",
            "-o",
            "jsonpath={.metadata.deletionTimestamp}",
        ]);
        if !marked.is_empty() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert!(!marked.is_empty(), "the object stays, marked for deletion");
    assert!(!deleting.is_finished(), "kubectl delete is still waiting on the finalizer");
    k.ok(&[
        "patch",
        "exp",
        "gnn-fraud-baseline",
        "-n",
        "fraud-detect",
        "--type",
        "json",
        "-p",
        r#"[{"op":"remove","path":"/metadata/finalizers"}]"#,
    ]);
    let out = deleting.join().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let out = k.run(&["get", "exp", "gnn-fraud-baseline", "-n", "fraud-detect"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains(r#"experiments.ep.dev "gnn-fraud-baseline" not found"#));
    // The quickstart applies as it is: namespaces, Secrets, the provider, the Experiment, its code.
    let quickstart = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/quickstart");
    let out = k.ok(&["apply", "-f", quickstart.to_str().unwrap()]);
    for created in [
        "namespace/ep-quickstart created",
        "secret/runpod created",
        "runpodprovider.ep.dev/default created",
        "experiment.ep.dev/quickstart created",
        "configmap/quickstart-code created",
    ] {
        assert!(out.contains(created), "{created} in {out}");
    }
    assert!(k.ok(&["get", "rpp"]).contains("EU-RO-1"));
    drop(sim);
}
