//! kubectl 1.35 against kube-sim as several people: the imperative verbs (protobuf bodies),
//! Secrets written with stringData, static-token users, RBAC with aggregation, `kubectl auth
//! whoami`, `can-i` and `can-i --list`, and the API server's 401 and 403.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers panic on setup failure by design

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use base64::Engine as _;
use ep_testkit::tools;
use serde_json::Value;

struct Kubectl {
    bin: PathBuf,
    kubeconfig: PathBuf,
}

impl Kubectl {
    fn new(kubeconfig: PathBuf) -> Self {
        Self { bin: tools::kubectl().unwrap(), kubeconfig }
    }
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
    fn fails(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(!out.status.success(), "kubectl {args:?} should have failed: {}", String::from_utf8_lossy(&out.stdout));
        String::from_utf8(out.stderr).unwrap()
    }
    fn json(&self, args: &[&str]) -> Value {
        serde_json::from_str(&self.ok(&[args, &["-o", "json"]].concat())).unwrap()
    }
}

fn decoded(secret: &Value, key: &str) -> String {
    let b = base64::engine::general_purpose::STANDARD.decode(secret["data"][key].as_str().unwrap()).unwrap();
    String::from_utf8(b).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectls_imperative_verbs_and_string_data_work() {
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    let _sim =
        kube_sim::start(kube_sim::Options { kubeconfig_out: Some(kubeconfig.clone()), ..kube_sim::Options::default() })
            .await
            .unwrap();
    let k = Kubectl::new(kubeconfig);
    assert!(k.ok(&["create", "namespace", "ml"]).contains("namespace/ml created"));
    k.ok(&[
        "create",
        "secret",
        "generic",
        "runpod",
        "-n",
        "ml",
        "--from-literal=apiKey=rp_123",
        "--from-literal=s3Secret=x",
    ]);
    let s = k.json(&["get", "secret", "runpod", "-n", "ml"]);
    assert_eq!((decoded(&s, "apiKey").as_str(), s["type"].as_str()), ("rp_123", Some("Opaque")));

    let file = dir.path().join("settings.yaml");
    std::fs::write(&file, "pollInterval: 5s\n").unwrap();
    k.ok(&["create", "configmap", "ep-settings", "-n", "ml", &format!("--from-file={}", file.display())]);
    assert_eq!(k.json(&["get", "cm", "ep-settings", "-n", "ml"])["data"]["settings.yaml"], "pollInterval: 5s\n");
    k.ok(&["create", "serviceaccount", "runner", "-n", "ml"]);
    k.ok(&["create", "rolebinding", "alice-edit", "-n", "ml", "--clusterrole=edit", "--user=alice"]);
    k.ok(&["create", "clusterrolebinding", "finch-view", "--clusterrole=view", "--group=ep:viewers"]);
    let rb = k.json(&["get", "rolebinding", "alice-edit", "-n", "ml"]);
    assert_eq!((rb["roleRef"]["name"].as_str(), rb["subjects"][0]["name"].as_str()), (Some("edit"), Some("alice")));
    let err = k.fails(&[
        "patch",
        "rolebinding",
        "alice-edit",
        "-n",
        "ml",
        "--type=merge",
        "-p",
        r#"{"roleRef":{"name":"admin"}}"#,
    ]);
    assert!(err.contains("cannot change roleRef"), "{err}");

    // stringData is merged into data on write and never stored or returned.
    let yaml = dir.path().join("s.yaml");
    std::fs::write(&yaml, "apiVersion: v1\nkind: Secret\nmetadata: {name: s3, namespace: ml}\nstringData: {accessKey: AK, secretKey: SK}\n").unwrap();
    k.ok(&["apply", "-f", yaml.to_str().unwrap()]);
    let s = k.json(&["get", "secret", "s3", "-n", "ml"]);
    assert_eq!((decoded(&s, "accessKey").as_str(), decoded(&s, "secretKey").as_str()), ("AK", "SK"));
    assert!(s.get("stringData").is_none(), "{s}");
    std::fs::write(&yaml, "apiVersion: v1\nkind: Secret\nmetadata: {name: tls, namespace: ml}\ntype: kubernetes.io/tls\nstringData: {tls.crt: c}\n").unwrap();
    let err = k.fails(&["apply", "-f", yaml.to_str().unwrap()]);
    assert!(err.contains("data[tls.key]: Required value"), "{err}");
}

const USERS: &str = r#"
users:
  - {name: alice, token: alice-token, groups: ["ep:authors"]}
  - {name: finch, token: finch-token, groups: ["ep:viewers"]}
  - {name: root, token: root-token, groups: ["system:masters"]}
  - {name: "system:serviceaccount:ep-system:ep-operator", token: operator-token}
"#;

const PERSONA: &str = r#"
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata:
  name: ep-author
  labels: {rbac.authorization.k8s.io/aggregate-to-edit: "true"}
rules:
  - {apiGroups: [ep.dev], resources: [experiments], verbs: [create, get, list, watch, patch, delete]}
  - {apiGroups: [ep.dev], resources: [runpodorders], verbs: [get, list, watch]}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata: {name: authors, namespace: ml}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: edit}
subjects: [{kind: Group, apiGroup: rbac.authorization.k8s.io, name: "ep:authors"}]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata: {name: viewers, namespace: ml}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: view}
subjects: [{kind: Group, apiGroup: rbac.authorization.k8s.io, name: "ep:viewers"}]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata: {name: ep-operator}
rules:
  - {apiGroups: [ep.dev], resources: [runpodorders/status], verbs: [patch]}
  - {apiGroups: [""], resources: [secrets], resourceNames: [runpod], verbs: [get]}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata: {name: ep-operator}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: ep-operator}
subjects: [{kind: ServiceAccount, name: ep-operator, namespace: ep-system}]
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn users_are_authenticated_and_rbac_decides_as_on_a_cluster() {
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    let users = dir.path().join("users.yaml");
    std::fs::write(&users, USERS).unwrap();
    let _sim = kube_sim::start(kube_sim::Options {
        kubeconfig_out: Some(kubeconfig.clone()),
        users: Some(users),
        crds: Some(Path::new(env!("CARGO_MANIFEST_DIR")).join("../../crds")),
        ..kube_sim::Options::default()
    })
    .await
    .unwrap();
    let k = Kubectl::new(kubeconfig.clone());
    let who = k.ok(&["auth", "whoami", "--context", "alice", "-o", "json"]);
    let who: Value = serde_json::from_str(&who).unwrap();
    assert_eq!(who["status"]["userInfo"]["username"], "alice");
    assert_eq!(who["status"]["userInfo"]["groups"], serde_json::json!(["ep:authors", "system:authenticated"]));

    // An unknown token is 401 for everything but the health checks.
    let bad = dir.path().join("bad");
    let text = std::fs::read_to_string(&kubeconfig).unwrap().replace("\"alice-token\"", "\"stolen\"");
    std::fs::write(&bad, text).unwrap();
    let err = Kubectl::new(bad).fails(&["get", "ns", "--context", "alice"]);
    // kubectl words a 401 either way, depending on whether it reached discovery first.
    assert!(
        err.contains(
            "You must be logged in to the server (the server has asked for the client to provide credentials)"
        ) || err.contains("You must be logged in to the server (Unauthorized)"),
        "{err}"
    );

    k.ok(&["create", "namespace", "ml"]);
    let persona = dir.path().join("persona.yaml");
    std::fs::write(&persona, PERSONA).unwrap();
    k.ok(&["apply", "-f", persona.to_str().unwrap()]);

    let can = |user: &str, args: &[&str]| {
        let out = k.run(&[&["auth", "can-i", "--context", user, "-n", "ml"], args].concat());
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    };
    // The persona role reaches `edit` through its aggregation label, and only in its namespace.
    assert_eq!(can("alice", &["create", "experiments.ep.dev"]), "yes");
    assert_eq!(can("alice", &["get", "secrets"]), "yes", "edit holds view's rules and reads Secrets");
    assert_eq!(can("alice", &["patch", "runpodorders.ep.dev"]), "no");
    assert_eq!(can("alice", &["create", "experiments.ep.dev", "-n", "other"]), "no");
    assert_eq!(can("finch", &["list", "configmaps"]), "yes");
    assert_eq!(can("finch", &["get", "secrets"]), "no", "view never reads Secrets");
    assert_eq!(can("finch", &["create", "experiments.ep.dev"]), "no");
    let op = "system:serviceaccount:ep-system:ep-operator";
    assert_eq!(can(op, &["patch", "runpodorders.ep.dev", "--subresource=status"]), "yes");
    assert_eq!(can(op, &["patch", "runpodorders.ep.dev"]), "no");
    assert_eq!(can(op, &["get", "secret/runpod"]), "yes");
    assert_eq!(can(op, &["get", "secret/other"]), "no");
    assert_eq!(can("root", &["delete", "namespaces"]), "yes", "system:masters bypasses RBAC");

    // What can-i says is what the requests meet.
    let exp = dir.path().join("exp.yaml");
    std::fs::write(&exp, "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: notes, namespace: ml}\ndata: {a: b}\n")
        .unwrap();
    assert!(k.ok(&["apply", "-f", exp.to_str().unwrap(), "--context", "alice"]).contains("configmap/notes created"));
    let err = k.fails(&["delete", "cm", "notes", "-n", "ml", "--context", "finch"]);
    assert!(
        err.contains(r#"configmaps "notes" is forbidden: User "finch" cannot delete resource "configmaps" in API group "" in the namespace "ml""#),
        "{err}"
    );
    let err = k.fails(&["get", "secrets", "-n", "ml", "--context", "finch"]);
    assert!(
        err.contains(r#"User "finch" cannot list resource "secrets" in API group "" in the namespace "ml""#),
        "{err}"
    );
    let err = k.fails(&["get", "ns", "--context", "alice"]);
    assert!(err.contains("cannot list resource \"namespaces\" in API group \"\" at the cluster scope"), "{err}");

    // The aggregation is written into the stored roles, as the aggregation controller does, and
    // follows the persona role when it goes.
    let has_experiments = |role: &str| {
        let r = k.json(&["get", "clusterrole", role]);
        r["rules"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["resources"].as_array().unwrap().iter().any(|x| x == "experiments"))
    };
    assert!(has_experiments("edit") && has_experiments("admin") && !has_experiments("view"));

    // can-i --list prints the rules the user holds in the namespace.
    let list = k.ok(&["auth", "can-i", "--list", "--context", "finch", "-n", "ml"]);
    assert!(list.lines().any(|l| l.starts_with("configmaps ") && l.contains("[get list watch]")), "{list}");
    assert!(!list.lines().any(|l| l.starts_with("secrets ")), "{list}");
    assert!(list.contains("selfsubjectaccessreviews.authorization.k8s.io"), "{list}");
}

const APPROVAL_USERS: &str = r#"
users:
  - {name: wren, token: wren-token, groups: ["ep:authors"]}
  - {name: aster, token: aster-token, groups: ["ep:approvers"]}
"#;

const ORDER: &str = r#"
apiVersion: ep.dev/v1alpha1
kind: RunPodOrder
metadata: {name: o1, namespace: ml}
spec:
  policy: paper-train
  workerId: runpod-1
  gpu: {types: [rtx-pro-4500], count: 1}
"#;

fn chart_bindings(ns: &str) -> String {
    format!(
        r#"
---
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata: {{name: wren-orders, namespace: {ns}}}
roleRef: {{apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: ep-operator-platform-admin}}
subjects: [{{kind: User, apiGroup: rbac.authorization.k8s.io, name: wren}}]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata: {{name: approvers, namespace: {ns}}}
roleRef: {{apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: ep-operator-spend-approver}}
subjects: [{{kind: Group, apiGroup: rbac.authorization.k8s.io, name: "ep:approvers"}}]
"#
    )
}

/// The chart's approval policy, rendered by helm, refuses `spec.approved` from anyone outside the
/// approver groups even when RBAC lets them patch orders; an approver may set it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_charts_approval_policy_lets_only_approvers_approve() {
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    let users = dir.path().join("users.yaml");
    std::fs::write(&users, APPROVAL_USERS).unwrap();
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let _sim = kube_sim::start(kube_sim::Options {
        kubeconfig_out: Some(kubeconfig.clone()),
        users: Some(users),
        crds: Some(root.join("crds")),
        ..kube_sim::Options::default()
    })
    .await
    .unwrap();
    let k = Kubectl::new(kubeconfig);
    let rendered = Command::new(tools::helm().unwrap())
        .args([
            "template",
            "ep-operator",
            root.join("charts/ep-operator").to_str().unwrap(),
            "--namespace",
            "ep-system",
        ])
        .args(["--show-only", "templates/personas.yaml", "--show-only", "templates/admission-policy.yaml"])
        .output()
        .unwrap();
    assert!(rendered.status.success(), "{}", String::from_utf8_lossy(&rendered.stderr));
    let chart = dir.path().join("chart.yaml");
    std::fs::write(&chart, [rendered.stdout, chart_bindings("ml").into_bytes()].concat()).unwrap();
    k.ok(&["create", "namespace", "ml"]);
    // The release namespace holds the volume-reader Role the chart grants authors.
    k.ok(&["create", "namespace", "ep-system"]);
    let applied = k.ok(&["apply", "-f", chart.to_str().unwrap()]);
    for made in [
        "validatingadmissionpolicy.admissionregistration.k8s.io/ep-operator-order-approval created",
        "validatingadmissionpolicybinding.admissionregistration.k8s.io/ep-operator-order-approval created",
        "rolebinding.rbac.authorization.k8s.io/wren-orders created",
    ] {
        assert!(applied.contains(made), "{applied}");
    }

    let order = dir.path().join("order.yaml");
    std::fs::write(&order, ORDER).unwrap();
    k.ok(&["apply", "-f", order.to_str().unwrap(), "--context", "wren"]);
    let approve = ["patch", "rpo", "o1", "-n", "ml", "--type=merge", "-p", r#"{"spec":{"approved":true}}"#];
    let err = k.fails(&[&approve[..], &["--context", "wren"]].concat());
    assert!(
        err.contains("ValidatingAdmissionPolicy 'ep-operator-order-approval' with binding 'ep-operator-order-approval' denied request: spec.approved: only members of ep:approvers may approve spending; wren is not"),
        "{err}"
    );
    // Creating an order already approved is the same spend and is refused alike.
    std::fs::write(&order, ORDER.replace("o1", "o2").replace("count: 1}", "count: 1}\n  approved: true")).unwrap();
    let err = k.fails(&["apply", "-f", order.to_str().unwrap(), "--context", "wren"]);
    assert!(err.contains("wren is not"), "{err}");

    // An approver cannot put someone else's name on the approval, nor can anyone name an approver
    // on an order nobody approved.
    let forged =
        ["patch", "rpo", "o1", "-n", "ml", "--type=merge", "-p", r#"{"spec":{"approved":true,"approvedBy":"boss"}}"#];
    let err = k.fails(&[&forged[..], &["--context", "aster"]].concat());
    assert!(err.contains("spec.approvedBy: must be the approving user aster"), "{err}");
    let named = ["patch", "rpo", "o1", "-n", "ml", "--type=merge", "-p", r#"{"spec":{"approvedBy":"aster"}}"#];
    let err = k.fails(&[&named[..], &["--context", "wren"]].concat());
    assert!(err.contains("spec.approvedBy is set only together with spec.approved: true"), "{err}");
    let approve =
        ["patch", "rpo", "o1", "-n", "ml", "--type=merge", "-p", r#"{"spec":{"approved":true,"approvedBy":"aster"}}"#];
    assert!(k.ok(&[&approve[..], &["--context", "aster"]].concat()).contains("runpodorder.ep.dev/o1 patched"));
    assert_eq!(k.json(&["get", "rpo", "o1", "-n", "ml"])["spec"]["approved"], true);

    // Without the policy, RBAC alone lets wren approve: the refusal above was the policy's.
    k.ok(&["delete", "validatingadmissionpolicybinding", "ep-operator-order-approval"]);
    k.ok(&["apply", "-f", order.to_str().unwrap(), "--context", "wren"]);
    assert_eq!(k.json(&["get", "rpo", "o2", "-n", "ml"])["spec"]["approved"], true);
}

/// One thing a person (or the operator) does, as a kubectl request and as `kubectl auth can-i`.
struct Action {
    what: &'static str,
    request: &'static [&'static str],
    can_i: &'static [&'static str],
}

const ACTIONS: [Action; 6] = [
    Action {
        what: "create an Experiment",
        request: &["create", "-f", "EXP2", "--dry-run=server"],
        can_i: &["create", "experiments.ep.dev"],
    },
    Action {
        what: "patch an Experiment",
        request: &[
            "patch",
            "exp",
            "e1",
            "--type=merge",
            "-p",
            r#"{"metadata":{"labels":{"team":"vision"}}}"#,
            "--dry-run=server",
        ],
        can_i: &["patch", "experiments.ep.dev/e1"],
    },
    Action {
        what: "delete an Experiment",
        request: &["delete", "exp", "e1", "--dry-run=server"],
        can_i: &["delete", "experiments.ep.dev/e1"],
    },
    Action {
        what: "approve an order",
        request: &[
            "patch",
            "rpo",
            "o1",
            "--type=merge",
            "-p",
            r#"{"spec":{"approved":true,"approvedBy":"USER"}}"#,
            "--dry-run=server",
        ],
        can_i: &["patch", "runpodorders.ep.dev/o1"],
    },
    Action { what: "read a Secret", request: &["get", "secret", "runpod"], can_i: &["get", "secrets/runpod"] },
    Action {
        what: "patch an order's status",
        request: &[
            "patch",
            "rpo",
            "o1",
            "--subresource=status",
            "--type=merge",
            "-p",
            r#"{"status":{"phase":"REQUESTED"}}"#,
            "--dry-run=server",
        ],
        can_i: &["patch", "runpodorders.ep.dev/o1", "--subresource=status"],
    },
];

/// Who may do what, as the chart's roles grant it on a real cluster: (request allowed, can-i).
/// They differ only where RBAC allows a patch of spec.approved that the admission policy refuses.
const MATRIX: [(&str, [(bool, bool); 6]); 5] = [
    // create, patch, delete experiment, approve, read Secret, patch order status
    ("wren", [(true, true), (true, true), (true, true), (false, false), (false, false), (false, false)]),
    ("aster", [(false, false), (true, true), (false, false), (true, true), (false, false), (false, false)]),
    ("lark", [(true, true), (true, true), (true, true), (false, true), (false, false), (false, false)]),
    ("finch", [(false, false), (false, false), (false, false), (false, false), (false, false), (false, false)]),
    // The operator's token in kubectl: its patches need a get first, which its role does not hold.
    (
        ep_testkit::authority::OPERATOR_USER,
        [(false, false), (false, true), (false, false), (false, true), (true, true), (false, true)],
    ),
];

const OBJECTS: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: ml}
---
apiVersion: v1
kind: Secret
metadata: {name: runpod, namespace: ml}
stringData: {apiKey: rp_1}
---
apiVersion: ep.dev/v1alpha1
kind: Experiment
metadata: {name: e1, namespace: ml}
spec:
  entry: {command: [python3, train.py]}
  image: runpod/pytorch:1.0.2-cu1281-torch280-ubuntu2404
  payload: {digest: "sha256:0000000000000000000000000000000000000000000000000000000000000000"}
  gpu: {types: [l4], count: 1}
  order: {policy: smoke, workerId: runpod-1}
  checkpoints: {retention: KeepLast}
---
apiVersion: ep.dev/v1alpha1
kind: RunPodOrder
metadata: {name: o1, namespace: ml}
spec:
  policy: paper-train
  workerId: runpod-1
  gpu: {types: [rtx-pro-4500], count: 1}
"#;

/// The chart's personas and the operator's ServiceAccount, through kubectl 1.35: each request is
/// allowed or refused as on a cluster with the chart installed, and `kubectl auth can-i` agrees
/// with RBAC (the approval policy being admission, which can-i does not see).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_persona_of_the_chart_may_do_what_its_role_says_and_nothing_else() {
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    let users = dir.path().join("users.yaml");
    std::fs::write(&users, ep_testkit::authority::USERS).unwrap();
    let _sim = kube_sim::start(kube_sim::Options {
        kubeconfig_out: Some(kubeconfig.clone()),
        users: Some(users),
        crds: Some(Path::new(env!("CARGO_MANIFEST_DIR")).join("../../crds")),
        ..kube_sim::Options::default()
    })
    .await
    .unwrap();
    let k = Kubectl::new(kubeconfig);
    let chart = dir.path().join("chart.yaml");
    let ns = "apiVersion: v1\nkind: Namespace\nmetadata: {name: ep-system}\n---\n";
    std::fs::write(&chart, ns.to_owned() + &ep_testkit::authority::render_chart_authority().unwrap()).unwrap();
    k.ok(&["apply", "-f", chart.to_str().unwrap()]);
    let objects = dir.path().join("objects.yaml");
    std::fs::write(&objects, OBJECTS).unwrap();
    k.ok(&["apply", "-f", objects.to_str().unwrap()]);
    let exp2 = dir.path().join("exp2.yaml");
    let second = OBJECTS.split("---").nth(2).unwrap().replace("name: e1", "name: e2");
    std::fs::write(&exp2, second).unwrap();

    let mut wrong = Vec::new();
    for (user, expected) in MATRIX {
        for (action, (allowed, can)) in ACTIONS.iter().zip(expected) {
            let args: Vec<String> = action
                .request
                .iter()
                .map(|a| if *a == "EXP2" { exp2.to_str().unwrap().to_owned() } else { a.replace("USER", user) })
                .collect();
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            let out = k.run(&[&args[..], &["-n", "ml", "--context", user]].concat());
            let said = k.run(&[&["auth", "can-i"], action.can_i, &["-n", "ml", "--context", user]].concat());
            let said = String::from_utf8_lossy(&said.stdout).trim() == "yes";
            if out.status.success() != allowed || said != can {
                wrong.push(format!(
                    "{user} {}: request {} (want {}), can-i {said} (want {can}): {}",
                    action.what,
                    out.status.success(),
                    allowed,
                    String::from_utf8_lossy(&out.stderr).trim()
                ));
            }
            if !out.status.success() && allowed == can {
                // A refusal RBAC made reads as the API server's, naming the user and resource.
                let err = String::from_utf8_lossy(&out.stderr);
                assert!(err.contains(&format!("User \"{user}\" cannot")), "{user} {}: {err}", action.what);
            }
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
    // Nothing above changed anything: every write was a server-side dry run.
    let e1 = k.json(&["get", "exp", "e1", "-n", "ml"]);
    assert!(e1["metadata"]["labels"].get("team").is_none(), "{e1}");
    assert!(k.json(&["get", "rpo", "o1", "-n", "ml"])["spec"].get("approved").is_none());

    // The operator's own calls, through kube-rs as its ServiceAccount: what the chart grants works,
    // what it does not is refused.
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let kc = kube::config::Kubeconfig::read_from(&k.kubeconfig).unwrap();
    let opts = kube::config::KubeConfigOptions {
        context: Some(ep_testkit::authority::OPERATOR_USER.into()),
        ..Default::default()
    };
    let client = kube::Client::try_from(kube::Config::from_custom_kubeconfig(kc, &opts).await.unwrap()).unwrap();
    let exps = kube::Api::<ep_api::Experiment>::namespaced(client.clone(), "ml");
    let orders = kube::Api::<ep_api::RunPodOrder>::namespaced(client.clone(), "ml");
    let dry = kube::api::PatchParams { dry_run: true, ..Default::default() };
    let finalizer = serde_json::json!({"metadata": {"finalizers": ["ep.dev/registry"]}});
    exps.patch("e1", &dry, &kube::api::Patch::Merge(&finalizer)).await.unwrap();
    let status = serde_json::json!({"status": {"phase": "REQUESTED"}});
    orders.patch_status("o1", &dry, &kube::api::Patch::Merge(&status)).await.unwrap();
    let secrets = kube::Api::<k8s_openapi::api::core::v1::Secret>::namespaced(client, "ml");
    assert!(secrets.get("runpod").await.is_ok());
    for refused in [exps.get("e1").await.err(), secrets.list(&Default::default()).await.err()] {
        assert!(matches!(refused, Some(kube::Error::Api(ref s)) if s.code == 403), "{refused:?}");
    }
}
