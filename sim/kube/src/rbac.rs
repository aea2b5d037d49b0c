//! RBAC authorization as the API server evaluates it ("Using RBAC Authorization"): Roles and
//! ClusterRoles granted by RoleBindings and ClusterRoleBindings, verbs on resources and
//! subresources, resourceNames, nonResourceURLs, ClusterRole aggregation by label, and the
//! bootstrap roles every cluster has (`cluster-admin`, `admin`, `edit`, `view`, discovery and the
//! self reviews for every authenticated user).

use std::borrow::Cow;

use serde_json::{Value, json};

use crate::auth::UserInfo;
use crate::errors::ApiError;

pub const GROUP: &str = "rbac.authorization.k8s.io";

/// What a request asks to do.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Attributes {
    pub verb: String,
    pub group: String,
    pub resource: String,
    pub subresource: String,
    pub namespace: String,
    pub name: String,
    /// Set for a non-resource request (`/apis`, `/healthz`, ...).
    pub path: Option<String>,
}

/// The RBAC objects in force: every ClusterRole and ClusterRoleBinding, and the Roles and
/// RoleBindings of the request's namespace.
/// The objects are borrowed from the store (a request is authorized on every call; copying every
/// ClusterRole per request was most of kube-sim's time at a thousand objects).
#[derive(Clone, Debug, Default)]
pub struct Policy<'a> {
    pub cluster_roles: Vec<Cow<'a, Value>>,
    pub cluster_role_bindings: Vec<Cow<'a, Value>>,
    pub roles: Vec<Cow<'a, Value>>,
    pub role_bindings: Vec<Cow<'a, Value>>,
}

fn strs(v: &Value) -> impl Iterator<Item = &str> {
    v.as_array().into_iter().flatten().filter_map(Value::as_str)
}

fn has(list: &Value, want: &str) -> bool {
    strs(list).any(|s| s == "*" || s == want)
}

fn label_selector_matches(sel: &Value, labels: &Value) -> bool {
    let label = |k: &str| labels.get(k).and_then(Value::as_str);
    let by_value = sel["matchLabels"].as_object().is_none_or(|m| m.iter().all(|(k, v)| label(k) == v.as_str()));
    by_value
        && sel["matchExpressions"].as_array().is_none_or(|es| {
            es.iter().all(|e| {
                let key = e["key"].as_str().unwrap_or_default();
                let in_values = label(key).is_some_and(|l| strs(&e["values"]).any(|v| v == l));
                match e["operator"].as_str() {
                    Some("In") => in_values,
                    Some("NotIn") => !in_values,
                    Some("Exists") => label(key).is_some(),
                    Some("DoesNotExist") => label(key).is_none(),
                    _ => false,
                }
            })
        })
}

impl Policy<'_> {
    fn cluster_role(&self, name: &str) -> Option<&Value> {
        self.cluster_roles.iter().map(AsRef::as_ref).find(|r| r["metadata"]["name"] == name)
    }

    /// A ClusterRole's rules; an aggregated one's are those of every ClusterRole its selectors
    /// pick, as the aggregation controller would have written them.
    pub fn cluster_role_rules(&self, role: &Value, depth: usize) -> Vec<Value> {
        let Some(selectors) = role.pointer("/aggregationRule/clusterRoleSelectors").and_then(Value::as_array) else {
            return role["rules"].as_array().cloned().unwrap_or_default();
        };
        if depth > 8 {
            return Vec::new();
        }
        let mut rules = Vec::new();
        for other in self.cluster_roles.iter().filter(|o| o["metadata"]["name"] != role["metadata"]["name"]) {
            let labels = &other["metadata"]["labels"];
            if selectors.iter().any(|s| label_selector_matches(s, labels)) {
                for r in self.cluster_role_rules(other, depth + 1) {
                    if !rules.contains(&r) {
                        rules.push(r);
                    }
                }
            }
        }
        rules
    }

    fn binds(binding: &Value, user: &UserInfo) -> bool {
        strs_subjects(&binding["subjects"]).any(|s| match s["kind"].as_str() {
            Some("User") => s["name"] == user.name.as_str(),
            Some("Group") => s["name"].as_str().is_some_and(|g| user.groups.iter().any(|ug| ug == g)),
            Some("ServiceAccount") => {
                let ns = s["namespace"].as_str().or_else(|| binding["metadata"]["namespace"].as_str()).unwrap_or("");
                format!("system:serviceaccount:{ns}:{}", s["name"].as_str().unwrap_or("")) == user.name
            }
            _ => false,
        })
    }

    fn role_rules(&self, binding: &Value) -> Vec<Value> {
        let name = binding["roleRef"]["name"].as_str().unwrap_or_default();
        match binding["roleRef"]["kind"].as_str() {
            Some("ClusterRole") => self.cluster_role(name).map(|r| self.cluster_role_rules(r, 0)).unwrap_or_default(),
            Some("Role") => self
                .roles
                .iter()
                .find(|r| {
                    r["metadata"]["name"] == name && r["metadata"]["namespace"] == binding["metadata"]["namespace"]
                })
                .and_then(|r| r["rules"].as_array().cloned())
                .unwrap_or_default(),
            _ => Vec::new(),
        }
    }

    /// Every rule granted to `user`: cluster-wide ones, then those of `namespace`'s bindings.
    pub fn rules_for(&self, user: &UserInfo, namespace: &str) -> (Vec<Value>, Vec<Value>) {
        let cluster: Vec<Value> = self
            .cluster_role_bindings
            .iter()
            .filter(|b| Self::binds(b, user))
            .flat_map(|b| self.role_rules(b))
            .collect();
        let local: Vec<Value> = self
            .role_bindings
            .iter()
            .filter(|b| !namespace.is_empty() && b["metadata"]["namespace"] == namespace && Self::binds(b, user))
            .flat_map(|b| self.role_rules(b))
            .collect();
        (cluster, local)
    }

    /// Whether RBAC allows the request.
    pub fn allows(&self, user: &UserInfo, a: &Attributes) -> bool {
        if user.is_master() {
            return true;
        }
        let (cluster, local) = self.rules_for(user, &a.namespace);
        // A RoleBinding never grants non-resource URLs.
        let local = if a.path.is_some() { Vec::new() } else { local };
        cluster.iter().chain(&local).any(|r| rule_allows(r, a))
    }
}

fn strs_subjects(v: &Value) -> impl Iterator<Item = &Value> {
    v.as_array().into_iter().flatten()
}

fn rule_allows(rule: &Value, a: &Attributes) -> bool {
    if !has(&rule["verbs"], &a.verb) {
        return false;
    }
    if let Some(path) = &a.path {
        return strs(&rule["nonResourceURLs"])
            .any(|u| u == "*" || u == path || u.strip_suffix('*').is_some_and(|p| path.starts_with(p)));
    }
    let combined =
        if a.subresource.is_empty() { a.resource.clone() } else { format!("{}/{}", a.resource, a.subresource) };
    let resource = strs(&rule["resources"])
        .any(|r| r == "*" || r == combined || (!a.subresource.is_empty() && r == format!("*/{}", a.subresource)));
    let names = rule["resourceNames"].as_array().is_none_or(Vec::is_empty)
        || (!a.name.is_empty() && strs(&rule["resourceNames"]).any(|n| n == a.name));
    has(&rule["apiGroups"], &a.group) && resource && names
}

/// 403 worded as the API server words it.
pub fn forbidden(user: &UserInfo, a: &Attributes) -> ApiError {
    let who = &user.name;
    let verb = &a.verb;
    if let Some(path) = &a.path {
        return ApiError {
            code: 403,
            reason: "Forbidden",
            message: format!("forbidden: User {who:?} cannot {verb} path {path:?}"),
            details: None,
        };
    }
    let resource =
        if a.subresource.is_empty() { a.resource.clone() } else { format!("{}/{}", a.resource, a.subresource) };
    let group = &a.group;
    let scope = if a.namespace.is_empty() {
        "at the cluster scope".to_owned()
    } else {
        format!("in the namespace {:?}", a.namespace)
    };
    let why = format!("User {who:?} cannot {verb} resource {resource:?} in API group {group:?} {scope}");
    let qualified = if group.is_empty() { a.resource.clone() } else { format!("{}.{group}", a.resource) };
    let message = if a.name.is_empty() {
        format!("{qualified} is forbidden: {why}")
    } else {
        format!("{qualified} {:?} is forbidden: {why}", a.name)
    };
    ApiError {
        code: 403,
        reason: "Forbidden",
        message,
        details: Some(json!({"name": a.name, "group": group, "kind": a.resource})),
    }
}

/// The `status` of a SelfSubjectRulesReview: what the user may do in `namespace`.
pub fn rules_review(policy: &Policy<'_>, user: &UserInfo, namespace: &str) -> Value {
    let rules: Vec<Value> = if user.is_master() {
        vec![
            json!({"verbs": ["*"], "apiGroups": ["*"], "resources": ["*"]}),
            json!({"verbs": ["*"], "nonResourceURLs": ["*"]}),
        ]
    } else {
        let (cluster, local) = policy.rules_for(user, namespace);
        cluster.into_iter().chain(local.into_iter().filter(|r| r.get("nonResourceURLs").is_none())).collect()
    };
    let mut resource_rules = Vec::new();
    let mut non_resource_rules = Vec::new();
    for r in rules {
        if r.get("nonResourceURLs").and_then(Value::as_array).is_some_and(|u| !u.is_empty()) {
            non_resource_rules.push(json!({"verbs": r["verbs"], "nonResourceURLs": r["nonResourceURLs"]}));
        } else {
            let mut rr = json!({"verbs": r["verbs"], "apiGroups": r["apiGroups"], "resources": r["resources"]});
            if let Some(n) = r.get("resourceNames") {
                rr["resourceNames"] = n.clone();
            }
            resource_rules.push(rr);
        }
    }
    json!({"resourceRules": resource_rules, "nonResourceRules": non_resource_rules, "incomplete": false})
}

fn cluster_role(name: &str, labels: Value, rules: Value, aggregate: Option<&str>) -> Value {
    let mut r = json!({"apiVersion": format!("{GROUP}/v1"), "kind": "ClusterRole",
                       "metadata": {"name": name, "annotations": {"rbac.authorization.kubernetes.io/autoupdate": "true"}}});
    r["metadata"]["labels"] = labels;
    r["rules"] = rules;
    if let Some(to) = aggregate {
        r["aggregationRule"] = json!({"clusterRoleSelectors": [{"matchLabels": {format!("rbac.authorization.k8s.io/aggregate-to-{to}"): "true"}}]});
        r["rules"] = json!([]);
    }
    r
}

fn cluster_binding(name: &str, role: &str, groups: &[&str]) -> Value {
    let subjects: Vec<Value> = groups.iter().map(|g| json!({"kind": "Group", "apiGroup": GROUP, "name": g})).collect();
    json!({"apiVersion": format!("{GROUP}/v1"), "kind": "ClusterRoleBinding",
           "metadata": {"name": name, "annotations": {"rbac.authorization.kubernetes.io/autoupdate": "true"}},
           "roleRef": {"apiGroup": GROUP, "kind": "ClusterRole", "name": role}, "subjects": subjects})
}

/// The bootstrap policy: (plural, object) in the order they are created. The rules cover the
/// kinds kube-sim serves, following the upstream bootstrap roles for them.
pub fn bootstrap() -> Vec<(&'static str, Value)> {
    let label = |to: &str| json!({format!("rbac.authorization.k8s.io/aggregate-to-{to}"): "true"});
    let write = json!(["create", "delete", "deletecollection", "patch", "update"]);
    let read = json!(["get", "list", "watch"]);
    let roles = [
        cluster_role(
            "cluster-admin",
            json!({"kubernetes.io/bootstrapping": "rbac-defaults"}),
            json!([{"apiGroups": ["*"], "resources": ["*"], "verbs": ["*"]}, {"nonResourceURLs": ["*"], "verbs": ["*"]}]),
            None,
        ),
        cluster_role("admin", json!({"kubernetes.io/bootstrapping": "rbac-defaults"}), json!([]), Some("admin")),
        cluster_role("edit", label("admin"), json!([]), Some("edit")),
        cluster_role("view", label("edit"), json!([]), Some("view")),
        cluster_role(
            "system:aggregate-to-admin",
            label("admin"),
            json!([
                {"apiGroups": [GROUP], "resources": ["roles", "rolebindings"], "verbs": ["create", "delete", "deletecollection", "get", "list", "patch", "update", "watch"]},
                {"apiGroups": ["authorization.k8s.io"], "resources": ["localsubjectaccessreviews"], "verbs": ["create"]},
            ]),
            None,
        ),
        cluster_role(
            "system:aggregate-to-edit",
            label("edit"),
            json!([
                {"apiGroups": [""], "resources": ["configmaps", "secrets", "serviceaccounts"], "verbs": write},
                {"apiGroups": [""], "resources": ["secrets"], "verbs": read},
                {"apiGroups": [""], "resources": ["serviceaccounts"], "verbs": ["impersonate"]},
                {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "verbs": write},
            ]),
            None,
        ),
        cluster_role(
            "system:aggregate-to-view",
            label("view"),
            json!([
                {"apiGroups": [""], "resources": ["configmaps", "events", "serviceaccounts", "namespaces", "namespaces/status"], "verbs": read},
                {"apiGroups": ["events.k8s.io"], "resources": ["events"], "verbs": read},
                {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "verbs": read},
            ]),
            None,
        ),
        cluster_role(
            "system:basic-user",
            json!({"kubernetes.io/bootstrapping": "rbac-defaults"}),
            json!([
                {"apiGroups": ["authorization.k8s.io"], "resources": ["selfsubjectaccessreviews", "selfsubjectrulesreviews"], "verbs": ["create"]},
                {"apiGroups": ["authentication.k8s.io"], "resources": ["selfsubjectreviews"], "verbs": ["create"]},
            ]),
            None,
        ),
        cluster_role(
            "system:discovery",
            json!({"kubernetes.io/bootstrapping": "rbac-defaults"}),
            json!([
                {"nonResourceURLs": ["/api", "/api/*", "/apis", "/apis/*", "/healthz", "/livez", "/openapi", "/openapi/*", "/readyz", "/version", "/version/"], "verbs": ["get"]},
            ]),
            None,
        ),
    ];
    let bindings = [
        cluster_binding("cluster-admin", "cluster-admin", &["system:masters"]),
        cluster_binding("system:basic-user", "system:basic-user", &["system:authenticated"]),
        cluster_binding("system:discovery", "system:discovery", &["system:authenticated"]),
    ];
    roles
        .into_iter()
        .map(|r| ("clusterroles", r))
        .chain(bindings.into_iter().map(|b| ("clusterrolebindings", b)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> Policy<'static> {
        let mut p = Policy::default();
        for (plural, o) in bootstrap() {
            match plural {
                "clusterroles" => p.cluster_roles.push(Cow::Owned(o)),
                _ => p.cluster_role_bindings.push(Cow::Owned(o)),
            }
        }
        p
    }

    fn user(name: &str, groups: &[&str]) -> UserInfo {
        UserInfo { name: name.into(), uid: String::new(), groups: groups.iter().map(|g| (*g).to_owned()).collect() }
    }

    fn req(verb: &str, group: &str, resource: &str, ns: &str) -> Attributes {
        Attributes {
            verb: verb.into(),
            group: group.into(),
            resource: resource.into(),
            namespace: ns.into(),
            ..Attributes::default()
        }
    }

    #[test]
    fn a_persona_role_labelled_aggregate_to_edit_reaches_edit_and_admin_but_not_view() {
        let mut p = policy();
        p.cluster_roles.push(Cow::Owned(
            json!({"metadata": {"name": "ep-author", "labels": {"rbac.authorization.k8s.io/aggregate-to-edit": "true"}},
            "rules": [{"apiGroups": ["ep.dev"], "resources": ["experiments"], "verbs": ["create", "patch"]}]}),
        ));
        p.role_bindings.push(Cow::Owned(
            json!({"metadata": {"name": "b", "namespace": "ml"}, "roleRef": {"kind": "ClusterRole", "name": "edit"},
            "subjects": [{"kind": "User", "name": "alice"}]}),
        ));
        p.role_bindings.push(Cow::Owned(
            json!({"metadata": {"name": "v", "namespace": "ml"}, "roleRef": {"kind": "ClusterRole", "name": "view"},
            "subjects": [{"kind": "Group", "name": "viewers"}]}),
        ));
        let alice = user("alice", &["system:authenticated"]);
        let finch = user("finch", &["viewers", "system:authenticated"]);
        assert!(p.allows(&alice, &req("create", "ep.dev", "experiments", "ml")));
        assert!(p.allows(&alice, &req("get", "", "secrets", "ml")), "edit holds view's and its own rules");
        assert!(!p.allows(&alice, &req("create", "ep.dev", "experiments", "other")), "a RoleBinding is one namespace");
        assert!(!p.allows(&finch, &req("create", "ep.dev", "experiments", "ml")));
        assert!(p.allows(&finch, &req("list", "", "configmaps", "ml")));
        assert!(!p.allows(&finch, &req("get", "", "secrets", "ml")), "view never reads Secrets");
    }

    #[test]
    fn subresources_resource_names_and_paths_match_as_the_api_server_matches_them() {
        let mut p = policy();
        p.cluster_roles.push(Cow::Owned(json!({"metadata": {"name": "r"}, "rules": [
            {"apiGroups": ["ep.dev"], "resources": ["runpodorders/status"], "verbs": ["patch"]},
            {"apiGroups": [""], "resources": ["secrets"], "resourceNames": ["runpod"], "verbs": ["get"]},
            {"nonResourceURLs": ["/metrics"], "verbs": ["get"]}]})));
        p.cluster_role_bindings
            .push(Cow::Owned(json!({"metadata": {"name": "r"}, "roleRef": {"kind": "ClusterRole", "name": "r"},
            "subjects": [{"kind": "ServiceAccount", "name": "op", "namespace": "ep-system"}]})));
        let op = user("system:serviceaccount:ep-system:op", &["system:authenticated"]);
        let status = Attributes { subresource: "status".into(), ..req("patch", "ep.dev", "runpodorders", "ml") };
        assert!(p.allows(&op, &status));
        assert!(!p.allows(&op, &req("patch", "ep.dev", "runpodorders", "ml")), "status is not the object");
        let named = Attributes { name: "runpod".into(), ..req("get", "", "secrets", "ml") };
        assert!(p.allows(&op, &named));
        assert!(!p.allows(&op, &req("list", "", "secrets", "ml")), "resourceNames never grant a list");
        let path = |p: &str| Attributes { verb: "get".into(), path: Some(p.into()), ..Attributes::default() };
        assert!(p.allows(&op, &path("/metrics")) && p.allows(&op, &path("/apis/ep.dev/v1")));
        assert!(!p.allows(&op, &path("/logs")));
    }

    #[test]
    fn a_denial_reads_like_the_api_servers() {
        let alice = user("x", &[]);
        let a = Attributes { name: "o1".into(), ..req("patch", "ep.dev", "runpodorders", "y") };
        assert_eq!(
            forbidden(&alice, &a).message,
            "runpodorders.ep.dev \"o1\" is forbidden: User \"x\" cannot patch resource \"runpodorders\" in API group \"ep.dev\" in the namespace \"y\""
        );
        let list = req("list", "", "namespaces", "");
        assert_eq!(
            forbidden(&alice, &list).message,
            "namespaces is forbidden: User \"x\" cannot list resource \"namespaces\" in API group \"\" at the cluster scope"
        );
    }
}
