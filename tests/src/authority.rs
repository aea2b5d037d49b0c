//! Who is who in the stack: the operator runs as the chart's ServiceAccount with the chart's RBAC,
//! and people act through the chart's persona roles, as on a cluster installed with Helm.
//!
//! kube-sim authenticates the tokens below (`--users`), so every call the chart's RBAC does not
//! grant fails here as it would on a cluster, and the chart's approval ValidatingAdmissionPolicy
//! decides who may set `spec.approved`. The administrator context (`kube-sim`, in
//! `system:masters`) stays the kubeconfig's default, as a cluster admin's would.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

use crate::{HarnessError, tools, workspace_root};

/// The release namespace and the operator's ServiceAccount user, as the chart names them.
pub const RELEASE_NAMESPACE: &str = "ep-system";
pub const OPERATOR_USER: &str = "system:serviceaccount:ep-system:ep-operator";

/// The operator's token and the pipeline's people with their groups (DESIGN's roles): Wren
/// writes experiments, Aster approves spending, Lark runs the platform, Finch watches.
pub const USERS: &str = r#"users:
  - {name: "system:serviceaccount:ep-system:ep-operator", token: ep-operator-token}
  - {name: wren, token: wren-token, groups: ["ep:authors"]}
  - {name: aster, token: aster-token, groups: ["ep:approvers"]}
  - {name: lark, token: lark-token, groups: ["ep:platform-admins"]}
  - {name: finch, token: finch-token, groups: ["ep:viewers"]}
"#;

/// Each persona group bound cluster-wide to its chart role (a team would often bind per namespace).
const PERSONA_BINDINGS: [(&str, &str); 4] = [
    ("ep:authors", "ep-operator-experiment-author"),
    ("ep:approvers", "ep-operator-spend-approver"),
    ("ep:platform-admins", "ep-operator-platform-admin"),
    ("ep:viewers", "ep-operator-viewer"),
];

/// The chart's templates that carry authority: the operator's ServiceAccount and RBAC, the
/// persona roles and the approval policy, rendered by helm as `helm install` would.
pub fn render_chart_authority() -> Result<String, HarnessError> {
    let chart = workspace_root().join("charts/ep-operator");
    let mut cmd = Command::new(tools::helm()?);
    cmd.args(["template", "ep-operator"]).arg(&chart).args(["--namespace", RELEASE_NAMESPACE]);
    for t in ["serviceaccount", "rbac", "personas", "admission-policy"] {
        cmd.args(["--show-only", &format!("templates/{t}.yaml")]);
    }
    let out = cmd.output().map_err(HarnessError::io("run helm template"))?;
    if !out.status.success() {
        return Err(HarnessError::Setup(format!("helm template: {}", String::from_utf8_lossy(&out.stderr).trim())));
    }
    let mut yaml = String::from_utf8_lossy(&out.stdout).into_owned();
    for (group, role) in PERSONA_BINDINGS {
        let name = group.replace(':', "-");
        yaml.push_str(&format!(
            "\n---\napiVersion: rbac.authorization.k8s.io/v1\nkind: ClusterRoleBinding\nmetadata: {{name: {name}}}\n\
             roleRef: {{apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: {role}}}\n\
             subjects: [{{kind: Group, apiGroup: rbac.authorization.k8s.io, name: \"{group}\"}}]\n"
        ));
    }
    Ok(yaml)
}

/// Creates the release namespace and applies [`render_chart_authority`] as the administrator.
pub fn install(kubeconfig: &Path, scratch: &Path) -> Result<(), HarnessError> {
    let ns = format!("apiVersion: v1\nkind: Namespace\nmetadata: {{name: {RELEASE_NAMESPACE}}}\n---\n");
    let file = scratch.join("chart-authority.yaml");
    std::fs::write(&file, ns + &render_chart_authority()?).map_err(HarnessError::io("write chart authority"))?;
    crate::stack::kubectl(kubeconfig, &["apply", "-f", &file.display().to_string()])?;
    Ok(())
}

/// Writes a copy of `kubeconfig` whose current context is `user`'s (kube-sim names each user's
/// context after the user) and returns its path.
pub fn kubeconfig_as(kubeconfig: &Path, user: &str, dir: &Path) -> Result<PathBuf, HarnessError> {
    let text = std::fs::read_to_string(kubeconfig).map_err(HarnessError::io("read kubeconfig"))?;
    let mut config: Value =
        serde_json::from_str(&text).map_err(|e| HarnessError::Setup(format!("kube-sim's kubeconfig: {e}")))?;
    let known = config["contexts"].as_array().is_some_and(|cs| cs.iter().any(|c| c["name"] == user));
    if !known {
        return Err(HarnessError::Setup(format!("kube-sim has no context for user {user}")));
    }
    config["current-context"] = Value::from(user);
    let path = dir.join(format!("kubeconfig-{}", user.replace(':', "-")));
    std::fs::write(&path, config.to_string()).map_err(HarnessError::io("write kubeconfig"))?;
    Ok(path)
}
