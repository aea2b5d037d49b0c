//! The install path: the Helm chart and the kustomize manifests render, lint and validate against
//! the oldest and newest supported Kubernetes; the operator started exactly as the rendered
//! Deployment starts it reconciles the quickstart; and its RBAC covers every call it makes.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use ep_testkit::postgres::TempPostgres;
use ep_testkit::sim::{KubeSimProcess, RunPodSimProcess, workspace_bin};
use ep_testkit::stack::{kubectl, tail};
use ep_testkit::{free_port, tools, workspace_root};
use serde_json::Value;

const NS: &str = "ep-system";
/// The oldest Kubernetes the project supports, and the newest kubernetes-validate knows.
const VERSIONS: [&str; 2] = ["1.30.0", "1.37.0"];

fn chart() -> PathBuf {
    workspace_root().join("charts/ep-operator")
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn helm(args: &[&str]) -> String {
    run(Command::new(tools::helm().unwrap()).args(args))
}

fn render(sets: &[&str]) -> String {
    let c = chart();
    let mut args = vec!["template", "ep-operator", c.to_str().unwrap(), "--namespace", NS];
    for s in sets {
        args.extend(["--set", s]);
    }
    helm(&args)
}

fn docs(yaml: &str) -> Vec<Value> {
    let all: Vec<Value> = serde_saphyr::from_str_multiple(yaml).unwrap();
    all.into_iter().filter(|d| !d.is_null()).collect()
}

/// kubernetes-validate in strict mode against each supported version; fails on any error.
fn validate(name: &str, yaml: &str) {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join(format!("{name}.yaml"));
    std::fs::write(&file, yaml).unwrap();
    let bin = tools::python().unwrap().with_file_name("kubernetes-validate");
    for v in VERSIONS {
        let out = Command::new(&bin).args(["--strict", "--quiet", "-k", v]).arg(&file).output().unwrap();
        let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(out.status.success() && !text.contains("ERROR"), "{name} against Kubernetes {v}:\n{text}");
        // Only kinds no schema is published for (ours, the Prometheus Operator's) may be skipped.
        for line in text.lines().filter(|l| l.contains("Couldn't find schema")) {
            assert!(line.contains("ep.dev/") || line.contains("monitoring.coreos.com/"), "{name}: {line}");
        }
    }
}

#[test]
fn the_chart_lints_strictly_and_renders_valid_manifests_with_every_feature() {
    let c = chart();
    helm(&["lint", "--strict", c.to_str().unwrap()]);
    let default = render(&[]);
    validate("chart-default", &default);
    let all = render(&[
        "metrics.serviceMonitor.enabled=true",
        "metrics.prometheusRule.enabled=true",
        "metrics.dashboard.enabled=true",
        "networkPolicy.enabled=true",
        "database.existingSecret=ep-registry",
        "replicas=2",
        "crds.keep=false",
    ]);
    validate("chart-all-features", &all);
    let kinds: Vec<String> = docs(&all).iter().map(|d| d["kind"].as_str().unwrap().to_owned()).collect();
    for k in [
        "CustomResourceDefinition",
        "ServiceAccount",
        "ClusterRole",
        "ClusterRoleBinding",
        "Role",
        "RoleBinding",
        "ConfigMap",
        "Deployment",
        "Service",
        "ServiceMonitor",
        "PrometheusRule",
        "NetworkPolicy",
        "ValidatingAdmissionPolicy",
        "ValidatingAdmissionPolicyBinding",
    ] {
        assert!(kinds.iter().any(|x| x == k), "{k} missing from {kinds:?}");
    }
    // CRDs are kept on uninstall unless asked otherwise; off entirely behind the switch.
    let crd = docs(&default).into_iter().find(|d| d["kind"] == "CustomResourceDefinition").unwrap();
    assert_eq!(crd["metadata"]["annotations"]["helm.sh/resource-policy"], "keep");
    assert!(!render(&["crds.install=false"]).contains("kind: CustomResourceDefinition"));
}

#[test]
fn a_wrong_value_fails_at_install_time() {
    let c = chart();
    for (set, expect) in [
        ("replicas=0", "replicas"),
        ("image.pullPolicy=Sometimes", "pullPolicy"),
        ("metrics.port=70000", "port"),
        ("settings.orphans.action=Delete", "action"),
        ("databse.url=x", "databse"),
        // The settings tree is the operator's own schema: what it would refuse, helm refuses.
        // helm names the field as a JSON pointer.
        ("settings.policies.smoke.requiresApproval=maybe", "/settings/policies/smoke/requiresApproval"),
        ("settings.concurrency.reconciles=0", "/settings/concurrency/reconciles"),
        ("settings.policies.smoke.cloudTyp=SECURE", "cloudTyp"),
        ("settings.policies.Bad_Name.cloudType=SECURE", "Bad_Name"),
        ("settings.budgets.default.maxUsdPerDay=-5", "/settings/budgets/default/maxUsdPerDay"),
        ("settings.pollInterval=soon", "/settings/pollInterval"),
        ("settings.orphans.action=Delete", "/settings/orphans/action"),
    ] {
        let out = Command::new(tools::helm().unwrap())
            .args(["template", "ep-operator", c.to_str().unwrap(), "--set", set])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && err.contains("values don't meet the specifications of the schema"),
            "{set}: {err}"
        );
        assert!(err.contains(expect), "{set}: the error names {expect}: {err}");
    }
}

/// Two releases (say, one per team, CRDs from one of them) share no cluster-scoped name.
#[test]
fn two_releases_share_no_cluster_scoped_name() {
    let c = chart();
    let names = |release: &str, crds: &str| -> Vec<String> {
        let yaml = helm(&["template", release, c.to_str().unwrap(), "--namespace", release, "--set", crds]);
        docs(&yaml)
            .iter()
            .filter(|d| d["metadata"]["namespace"].is_null())
            .map(|d| format!("{} {}", d["kind"].as_str().unwrap(), d["metadata"]["name"].as_str().unwrap()))
            .collect()
    };
    let a = names("team-a", "crds.install=true");
    let b = names("team-b", "crds.install=false");
    assert!(a.iter().any(|n| n.ends_with("team-a-ep-operator-experiment-author")), "{a:?}");
    let shared: Vec<&String> = b.iter().filter(|n| a.contains(n)).collect();
    assert!(shared.is_empty(), "both releases create {shared:?}");
}

#[test]
fn the_checked_in_rendering_and_the_chart_settings_are_in_sync() {
    let rendered = render(&[]);
    let on_disk = std::fs::read_to_string(workspace_root().join("manifests/base/ep-operator.yaml")).unwrap();
    let body: String = on_disk.lines().skip_while(|l| l.starts_with('#')).collect::<Vec<_>>().join("\n");
    assert_eq!(body.trim(), rendered.trim(), "manifests/base/ep-operator.yaml is stale: run `make manifests`");
    // The chart's default settings are the operator's embedded default settings.
    let cm = docs(&rendered).into_iter().find(|d| d["kind"] == "ConfigMap").unwrap();
    let text = cm["data"]["settings.yaml"].as_str().unwrap();
    let from_chart = ep_operator::settings::Settings::from_yaml("chart", text).unwrap();
    assert_eq!(from_chart, ep_operator::settings::Settings::embedded_default());
}

#[test]
fn each_kustomize_overlay_builds_and_validates() {
    let kubectl = tools::kubectl().unwrap();
    for overlay in ["base", "overlays/cluster", "overlays/sandbox"] {
        let dir = workspace_root().join("manifests").join(overlay);
        let yaml = run(Command::new(&kubectl).env("KUBECONFIG", "/dev/null").arg("kustomize").arg(&dir));
        validate(&overlay.replace('/', "-"), &yaml);
        let deploy = docs(&yaml).into_iter().find(|d| d["kind"] == "Deployment").unwrap();
        let sec = &deploy["spec"]["template"]["spec"]["containers"][0]["securityContext"];
        assert_eq!(sec["readOnlyRootFilesystem"], true, "{overlay}");
        assert_eq!(sec["capabilities"]["drop"][0], "ALL", "{overlay}");
        assert_eq!(deploy["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"], true, "{overlay}");
    }
}

/// One recorded API call.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Call {
    verb: String,
    group: String,
    resource: String,
    namespace: Option<String>,
}

/// The calls RBAC rules (from rendered ClusterRoles and Roles bound to the operator) do not allow.
fn uncovered(calls: &[Call], cluster_rules: &[Value], ns_rules: &[(String, Value)]) -> Vec<Call> {
    let allows = |r: &Value, c: &Call| {
        let has =
            |field: &str, want: &str| r[field].as_array().is_some_and(|l| l.iter().any(|x| x == want || x == "*"));
        has("apiGroups", &c.group) && has("resources", &c.resource) && has("verbs", &c.verb)
    };
    calls
        .iter()
        .filter(|c| {
            !cluster_rules.iter().any(|r| allows(r, c))
                && !ns_rules.iter().any(|(ns, r)| c.namespace.as_deref() == Some(ns.as_str()) && allows(r, c))
        })
        .cloned()
        .collect()
}

/// The rules bound to the operator's ServiceAccount in a rendering.
fn operator_rules(yaml: &str) -> (Vec<Value>, Vec<(String, Value)>) {
    let all = docs(yaml);
    let sa = "ep-operator";
    let bound = |kind: &str| -> Vec<String> {
        all.iter()
            .filter(|d| d["kind"] == kind)
            .filter(|d| {
                d["subjects"]
                    .as_array()
                    .is_some_and(|s| s.iter().any(|x| x["kind"] == "ServiceAccount" && x["name"] == sa))
            })
            .map(|d| d["roleRef"]["name"].as_str().unwrap().to_owned())
            .collect()
    };
    let cluster_roles = bound("ClusterRoleBinding");
    let roles = bound("RoleBinding");
    let cluster = all
        .iter()
        .filter(|d| d["kind"] == "ClusterRole" && cluster_roles.iter().any(|n| d["metadata"]["name"] == n.as_str()))
        .flat_map(|d| d["rules"].as_array().cloned().unwrap_or_default())
        .collect();
    let namespaced = all
        .iter()
        .filter(|d| d["kind"] == "Role" && roles.iter().any(|n| d["metadata"]["name"] == n.as_str()))
        .flat_map(|d| {
            let ns = d["metadata"]["namespace"].as_str().unwrap().to_owned();
            d["rules"].as_array().cloned().unwrap_or_default().into_iter().map(move |r| (ns.clone(), r))
        })
        .collect();
    (cluster, namespaced)
}

fn container_of(yaml: &str) -> Value {
    let deploy = docs(yaml).into_iter().find(|d| d["kind"] == "Deployment").unwrap();
    deploy["spec"]["template"]["spec"]["containers"][0].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rendered_operator_reconciles_the_quickstart_within_its_rbac() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let dir = tempfile::tempdir().unwrap();
    let audit = dir.path().join("audit.jsonl");
    let pg = TempPostgres::start().unwrap();
    let db = pg.create_database("ep").await.unwrap();
    let runpod = RunPodSimProcess::start(None, &["--clock-speed", "60"]).unwrap();
    let kube = KubeSimProcess::start_audited(Some(&workspace_root().join("crds")), Some(&audit)).unwrap();
    let kc = kube.kubeconfig();

    // The chart as a user installs it, with the registry Secret and a free metrics port.
    let port = free_port().unwrap();
    let yaml = render(&["database.existingSecret=ep-registry", &format!("metrics.port={port}")]);
    let c = container_of(&yaml);
    let settings = docs(&yaml).into_iter().find(|d| d["kind"] == "ConfigMap").unwrap();
    // The ConfigMap volume, as the kubelet mounts it.
    let mount = c["volumeMounts"].as_array().unwrap().iter().find(|m| m["name"] == "settings").unwrap()["mountPath"]
        .as_str()
        .unwrap()
        .to_owned();
    let mounted = dir.path().join(mount.trim_start_matches('/'));
    std::fs::create_dir_all(&mounted).unwrap();
    for (k, v) in settings["data"].as_object().unwrap() {
        std::fs::write(mounted.join(k), v.as_str().unwrap()).unwrap();
    }
    let args: Vec<String> = c["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap().replace(&mount, mounted.to_str().unwrap()))
        .collect();
    // The environment the kubelet gives the container.
    let mut env: BTreeMap<String, String> = BTreeMap::new();
    for e in c["env"].as_array().unwrap() {
        let name = e["name"].as_str().unwrap().to_owned();
        let value = if let Some(v) = e["value"].as_str() {
            v.to_owned()
        } else if e["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name" {
            "ep-operator-7d9f8-x2x4q".to_owned()
        } else if e["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace" {
            NS.to_owned()
        } else if e["valueFrom"]["secretKeyRef"]["name"] == "ep-registry" {
            db.clone()
        } else {
            panic!("unexpected env source {e}")
        };
        env.insert(name, value);
    }
    assert!(env.contains_key("DATABASE_URL") && env.contains_key("POD_NAMESPACE"), "{env:?}");
    // `helm install --create-namespace` (or the kustomize base's Namespace) made the release namespace.
    kubectl(&kc, &["apply", "-f", workspace_root().join("manifests/base/namespace.yaml").to_str().unwrap()]).unwrap();
    let log = dir.path().join("operator.log");
    let mut op = Command::new(workspace_bin("ep-operator").unwrap())
        .args(&args)
        .env_clear()
        .envs(&env)
        // The one thing a cluster gives that a process here lacks: the in-cluster service account.
        .env("KUBECONFIG", &kc)
        .stdout(Stdio::from(std::fs::File::create(&log).unwrap()))
        .stderr(Stdio::from(std::fs::File::create(&log).unwrap()))
        .spawn()
        .unwrap();
    let probe = |path: &str| reqwest::get(format!("http://127.0.0.1:{port}{path}"));
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if probe("/readyz").await.is_ok_and(|r| r.status() == 200) {
            break;
        }
        assert!(op.try_wait().unwrap().is_none(), "the operator exited:\n{}", tail(&log, 40));
        assert!(Instant::now() < deadline, "never ready (it leads through a Lease first):\n{}", tail(&log, 40));
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(probe("/livez").await.unwrap().status(), 200);

    // The quickstart, pointed at runpod-sim, reaches COMPLETED.
    let staged = dir.path().join("quickstart");
    runpod.stage(&workspace_root().join("examples/quickstart"), &staged).unwrap();
    // Our CRs validate against our CRDs (server-side dry run) before they are applied.
    kubectl(&kc, &["apply", "-f", staged.join("00-namespaces.yaml").to_str().unwrap()]).unwrap();
    kubectl(&kc, &["apply", "--dry-run=server", "-f", staged.to_str().unwrap()]).unwrap();
    kubectl(&kc, &["apply", "-f", staged.to_str().unwrap()]).unwrap();
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let out = kubectl(
            &kc,
            &["get", "exp", "quickstart", "-n", "ep-quickstart", "-o", "jsonpath={.status.registryStatus}"],
        )
        .unwrap();
        if out == "COMPLETED" {
            break;
        }
        assert!(Instant::now() < deadline, "quickstart not COMPLETED ({out}):\n{}", tail(&log, 60));
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    // Deleting the experiment exercises the finalizer path too.
    kubectl(&kc, &["delete", "exp", "quickstart", "-n", "ep-quickstart", "--wait=true", "--timeout=60s"]).unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !kubectl(&kc, &["get", "rpo", "-n", "ep-quickstart", "-o", "name"]).unwrap().trim().is_empty() {
        assert!(Instant::now() < deadline, "the order never went away:\n{}", tail(&log, 40));
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let _ = Command::new("kill").arg("-TERM").arg(op.id().to_string()).status();
    let _ = op.wait();

    // Every call the operator made is allowed by the RBAC the chart gives it.
    let calls: Vec<Call> = {
        let mut v: Vec<Call> = std::fs::read_to_string(&audit)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str::<Value>(l).unwrap())
            .filter(|e| e["userAgent"].as_str().is_some_and(|a| a.starts_with("ep-operator/")))
            .map(|e| {
                let resource = match e["subresource"].as_str() {
                    Some(sub) => format!("{}/{sub}", e["resource"].as_str().unwrap()),
                    None => e["resource"].as_str().unwrap().to_owned(),
                };
                Call {
                    verb: e["verb"].as_str().unwrap().to_owned(),
                    group: e["apiGroup"].as_str().unwrap().to_owned(),
                    resource,
                    namespace: e["namespace"].as_str().map(str::to_owned),
                }
            })
            .collect();
        v.sort();
        v.dedup();
        v
    };
    assert!(calls.len() >= 10, "the audit log recorded the operator's calls: {calls:?}");
    let (cluster, namespaced) = operator_rules(&yaml);
    let missing = uncovered(&calls, &cluster, &namespaced);
    assert!(missing.is_empty(), "calls the chart's RBAC does not allow: {missing:#?}");

    // The check has teeth: without the events rule, the operator's event writes are reported.
    let no_events: Vec<Value> = cluster.iter().filter(|r| r["resources"][0] != "events").cloned().collect();
    let missing = uncovered(&calls, &no_events, &namespaced);
    assert!(missing.iter().any(|c| c.resource == "events" && c.verb == "create"), "{missing:?}");
    // And least privilege: every verb the operator's rules grant was used. The one grant a short
    // run does not exercise: patching an event, which the event recorder does when the same event
    // repeats (it becomes a series).
    let used = |group: &str, resource: &str, verb: &str| {
        (group, resource, verb) == ("events.k8s.io", "events", "patch")
            || calls.iter().any(|c| c.group == group && c.resource == resource && c.verb == verb)
    };
    for r in cluster.iter().chain(namespaced.iter().map(|(_, r)| r)) {
        for g in r["apiGroups"].as_array().unwrap() {
            for res in r["resources"].as_array().unwrap() {
                for v in r["verbs"].as_array().unwrap() {
                    assert!(
                        used(g.as_str().unwrap(), res.as_str().unwrap(), v.as_str().unwrap()),
                        "granted but never used: {v} {g}/{res}; calls: {calls:#?}"
                    );
                }
            }
        }
    }
    drop(kube);
    drop(runpod);
    drop(pg);
    let _: &Path = dir.path();
}
