//! Which resources exist: built-in kinds and every kind registered by a CRD, with the documents
//! clients discover them through (`/api`, `/apis`, `/apis/{g}/{v}`, `/openapi/v3`).

use std::collections::BTreeMap;
use std::sync::Arc;

use serde_json::{Value, json};

/// A CRD version's compiled CEL rules. Equal whenever the schemas they came from are (a
/// [`Resource`] compares its schema), so they take no part in comparisons.
#[derive(Clone)]
pub struct CompiledRules(pub Arc<kube::core::cel::CompiledSchema>);

impl CompiledRules {
    fn compile(schema: &Value) -> Self {
        Self(Arc::new(kube::core::cel::compile_schema(schema)))
    }
}

impl PartialEq for CompiledRules {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl std::fmt::Debug for CompiledRules {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CompiledRules")
    }
}

/// One resource type served at `/api(s)/{group}/{version}/.../{plural}`.
#[derive(Clone, Debug, PartialEq)]
pub struct Resource {
    pub group: String,
    pub version: String,
    pub kind: String,
    pub plural: String,
    pub singular: String,
    pub namespaced: bool,
    pub short_names: Vec<String>,
    pub categories: Vec<String>,
    pub status_subresource: bool,
    /// openAPIV3Schema of the version, for custom resources.
    /// Shared: a Resource is copied for every request.
    pub schema: Option<Arc<Value>>,
    /// The schema's CEL rules, compiled once when the CRD is stored (not on every write).
    pub rules: Option<CompiledRules>,
    pub printer_columns: Vec<Value>,
    /// Fields a fieldSelector may use besides metadata.name and metadata.namespace.
    pub selectable_fields: Vec<String>,
    /// Whether this kind came from a CRD (validated against its schema).
    pub custom: bool,
    /// A review (SelfSubjectAccessReview, ...): create only, answered and never stored.
    pub review: bool,
}

impl Resource {
    pub fn api_version(&self) -> String {
        if self.group.is_empty() { self.version.clone() } else { format!("{}/{}", self.group, self.version) }
    }
    /// `experiments.ep.dev`, or `configmaps` for the core group (as error messages name it).
    pub fn qualified(&self) -> String {
        if self.group.is_empty() { self.plural.clone() } else { format!("{}.{}", self.plural, self.group) }
    }
    /// `Experiment.ep.dev` (as Invalid messages name it).
    pub fn group_kind(&self) -> String {
        if self.group.is_empty() { self.kind.clone() } else { format!("{}.{}", self.kind, self.group) }
    }

    /// Printer columns (name, type, jsonPath) for `kubectl get`.
    #[must_use]
    fn with_columns(mut self, columns: &[(&str, &str, &str)]) -> Self {
        self.printer_columns =
            columns.iter().map(|(n, t, p)| serde_json::json!({"name": n, "type": t, "jsonPath": p})).collect();
        self
    }

    fn builtin(
        group: &str,
        version: &str,
        kind: &str,
        plural: &str,
        namespaced: bool,
        short: &[&str],
        status: bool,
    ) -> Self {
        Self {
            group: group.into(),
            version: version.into(),
            kind: kind.into(),
            plural: plural.into(),
            singular: kind.to_ascii_lowercase(),
            namespaced,
            short_names: short.iter().map(|s| (*s).to_owned()).collect(),
            categories: Vec::new(),
            status_subresource: status,
            schema: None,
            rules: None,
            printer_columns: Vec::new(),
            // Events are found by what they are about (kubectl describe does this).
            selectable_fields: if kind == "Event" {
                [
                    "involvedObject.kind",
                    "involvedObject.namespace",
                    "involvedObject.name",
                    "involvedObject.uid",
                    "involvedObject.apiVersion",
                    "involvedObject.resourceVersion",
                    "involvedObject.fieldPath",
                    "regarding.kind",
                    "regarding.namespace",
                    "regarding.name",
                    "regarding.uid",
                    "reason",
                    "reportingController",
                    "type",
                    "source",
                ]
                .map(String::from)
                .to_vec()
            } else {
                Vec::new()
            },
            custom: false,
            review: false,
        }
    }

    #[must_use]
    fn create_only(mut self) -> Self {
        self.review = true;
        self
    }

    /// Whether a fieldSelector may use `field` on this kind.
    pub fn selectable(&self, field: &str) -> bool {
        matches!(field, "metadata.name" | "metadata.namespace") || self.selectable_fields.iter().any(|f| f == field)
    }
}

/// Every served resource, by (group, version, plural).
#[derive(Clone, Debug, Default)]
pub struct Registry {
    pub resources: BTreeMap<(String, String, String), Resource>,
}

impl Registry {
    /// The built-in kinds the operator and its users need.
    pub fn with_builtins() -> Self {
        let mut r = Self::default();
        for res in [
            Resource::builtin("", "v1", "Namespace", "namespaces", false, &["ns"], true),
            Resource::builtin("", "v1", "Secret", "secrets", true, &[], false),
            Resource::builtin("", "v1", "ConfigMap", "configmaps", true, &["cm"], false),
            Resource::builtin("", "v1", "Event", "events", true, &["ev"], false).with_columns(&[
                // The columns the API server prints for `kubectl get events`.
                ("Last Seen", "date", ".lastTimestamp"),
                ("Type", "string", ".type"),
                ("Reason", "string", ".reason"),
                ("Object", "string", ".involvedObject.name"),
                ("Message", "string", ".message"),
            ]),
            Resource::builtin("", "v1", "ServiceAccount", "serviceaccounts", true, &["sa"], false),
            Resource::builtin("events.k8s.io", "v1", "Event", "events", true, &["ev"], false),
            Resource::builtin("coordination.k8s.io", "v1", "Lease", "leases", true, &[], false),
            Resource::builtin("rbac.authorization.k8s.io", "v1", "Role", "roles", true, &[], false),
            Resource::builtin("rbac.authorization.k8s.io", "v1", "ClusterRole", "clusterroles", false, &[], false),
            Resource::builtin("rbac.authorization.k8s.io", "v1", "RoleBinding", "rolebindings", true, &[], false),
            Resource::builtin(
                "rbac.authorization.k8s.io",
                "v1",
                "ClusterRoleBinding",
                "clusterrolebindings",
                false,
                &[],
                false,
            ),
            Resource::builtin(
                "admissionregistration.k8s.io",
                "v1",
                "ValidatingAdmissionPolicy",
                "validatingadmissionpolicies",
                false,
                &[],
                true,
            ),
            Resource::builtin(
                "admissionregistration.k8s.io",
                "v1",
                "ValidatingAdmissionPolicyBinding",
                "validatingadmissionpolicybindings",
                false,
                &[],
                false,
            ),
            Resource::builtin(
                "authorization.k8s.io",
                "v1",
                "SelfSubjectAccessReview",
                "selfsubjectaccessreviews",
                false,
                &[],
                false,
            )
            .create_only(),
            Resource::builtin(
                "authorization.k8s.io",
                "v1",
                "SelfSubjectRulesReview",
                "selfsubjectrulesreviews",
                false,
                &[],
                false,
            )
            .create_only(),
            Resource::builtin(
                "authentication.k8s.io",
                "v1",
                "SelfSubjectReview",
                "selfsubjectreviews",
                false,
                &[],
                false,
            )
            .create_only(),
            Resource::builtin(
                "apiextensions.k8s.io",
                "v1",
                "CustomResourceDefinition",
                "customresourcedefinitions",
                false,
                &["crd", "crds"],
                true,
            ),
        ] {
            r.insert(res);
        }
        r
    }

    pub fn insert(&mut self, res: Resource) {
        self.resources.insert((res.group.clone(), res.version.clone(), res.plural.clone()), res);
    }

    pub fn get(&self, group: &str, version: &str, plural: &str) -> Option<&Resource> {
        self.resources.get(&(group.to_owned(), version.to_owned(), plural.to_owned()))
    }

    /// Registers (or re-registers) the served versions of a CRD object. Returns the resources.
    pub fn from_crd(crd: &Value) -> Result<Vec<Resource>, String> {
        let spec = crd.get("spec").ok_or("spec: Required value")?;
        let group = spec["group"].as_str().ok_or("spec.group: Required value")?;
        let names = &spec["names"];
        let plural = names["plural"].as_str().ok_or("spec.names.plural: Required value")?;
        let kind = names["kind"].as_str().ok_or("spec.names.kind: Required value")?;
        let expected = format!("{plural}.{group}");
        if crd.pointer("/metadata/name").and_then(Value::as_str) != Some(expected.as_str()) {
            return Err(format!(
                "metadata.name: Invalid value: must be spec.names.plural+\".\"+spec.group ({expected})"
            ));
        }
        let strings = |v: &Value| -> Vec<String> {
            v.as_array().map(|a| a.iter().filter_map(|s| s.as_str().map(str::to_owned)).collect()).unwrap_or_default()
        };
        let namespaced = spec["scope"].as_str() != Some("Cluster");
        let versions = spec["versions"].as_array().ok_or("spec.versions: Required value")?;
        Ok(versions
            .iter()
            .filter(|v| v["served"].as_bool().unwrap_or(true))
            .filter_map(|v| {
                Some(Resource {
                    group: group.into(),
                    version: v["name"].as_str()?.into(),
                    kind: kind.into(),
                    plural: plural.into(),
                    singular: names["singular"].as_str().map_or_else(|| kind.to_ascii_lowercase(), str::to_owned),
                    namespaced,
                    short_names: strings(&names["shortNames"]),
                    categories: strings(&names["categories"]),
                    status_subresource: v.pointer("/subresources/status").is_some(),
                    schema: v.pointer("/schema/openAPIV3Schema").cloned().map(Arc::new),
                    rules: v.pointer("/schema/openAPIV3Schema").map(CompiledRules::compile),
                    printer_columns: v["additionalPrinterColumns"].as_array().cloned().unwrap_or_default(),
                    selectable_fields: v["selectableFields"]
                        .as_array()
                        .map(|a| {
                            a.iter()
                                .filter_map(|f| f["jsonPath"].as_str().map(|p| p.trim_start_matches('.').to_owned()))
                                .collect()
                        })
                        .unwrap_or_default(),
                    custom: true,
                    review: false,
                })
            })
            .collect())
    }

    /// Drops every resource of a CRD.
    pub fn remove_crd(&mut self, group: &str, plural: &str) {
        self.resources.retain(|(g, _, p), _| !(g == group && p == plural));
    }

    /// Resolves a kind name, short name or plural within a group version.
    pub fn by_kind(&self, api_version: &str, kind: &str) -> Option<&Resource> {
        self.resources.values().find(|r| r.api_version() == api_version && r.kind == kind)
    }

    /// `GET /api`.
    pub fn core_versions() -> Value {
        json!({"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": ""}]})
    }

    /// `GET /apis`.
    pub fn groups(&self) -> Value {
        let mut groups: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
        for r in self.resources.values().filter(|r| !r.group.is_empty()) {
            let vs = groups.entry(&r.group).or_default();
            if !vs.contains(&r.version.as_str()) {
                vs.push(&r.version);
            }
        }
        let groups: Vec<Value> = groups
            .into_iter()
            .map(|(g, vs)| {
                let versions: Vec<Value> =
                    vs.iter().map(|v| json!({"groupVersion": format!("{g}/{v}"), "version": v})).collect();
                json!({"name": g, "versions": versions, "preferredVersion": versions[0]})
            })
            .collect();
        json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups})
    }

    /// `GET /api/v1` or `GET /apis/{g}/{v}`.
    pub fn resource_list(&self, group: &str, version: &str) -> Option<Value> {
        let rs: Vec<&Resource> = self.resources.values().filter(|r| r.group == group && r.version == version).collect();
        if rs.is_empty() {
            return None;
        }
        let mut list = Vec::new();
        for r in rs {
            let verbs = if r.review {
                json!(["create"])
            } else {
                json!(["create", "delete", "deletecollection", "get", "list", "patch", "update", "watch"])
            };
            let mut entry = json!({
                "name": r.plural, "singularName": r.singular, "namespaced": r.namespaced, "kind": r.kind, "verbs": verbs,
            });
            if !r.short_names.is_empty() {
                entry["shortNames"] = json!(r.short_names);
            }
            if !r.categories.is_empty() {
                entry["categories"] = json!(r.categories);
            }
            list.push(entry);
            if r.status_subresource {
                list.push(json!({"name": format!("{}/status", r.plural), "singularName": "", "namespaced": r.namespaced, "kind": r.kind, "verbs": ["get", "patch", "update"]}));
            }
        }
        let gv = if group.is_empty() { version.to_owned() } else { format!("{group}/{version}") };
        Some(json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": gv, "resources": list}))
    }

    /// `GET /openapi/v3`: one entry per group version.
    pub fn openapi_root(&self) -> Value {
        let mut paths = serde_json::Map::new();
        for r in self.resources.values() {
            let key = if r.group.is_empty() {
                format!("api/{}", r.version)
            } else {
                format!("apis/{}/{}", r.group, r.version)
            };
            paths.insert(key.clone(), json!({"serverRelativeURL": format!("/openapi/v3/{key}")}));
        }
        json!({"paths": paths})
    }

    /// `GET /openapi/v3/apis/{g}/{v}`: the kinds' schemas, and PATCH operations that declare the
    /// `fieldValidation` parameter (kubectl then validates fields server-side).
    pub fn openapi_doc(&self, group: &str, version: &str) -> Option<Value> {
        let rs: Vec<&Resource> = self.resources.values().filter(|r| r.group == group && r.version == version).collect();
        if rs.is_empty() {
            return None;
        }
        let mut paths = serde_json::Map::new();
        let mut schemas = serde_json::Map::new();
        for r in rs {
            let gvk = json!({"group": r.group, "version": r.version, "kind": r.kind});
            let prefix = if group.is_empty() { format!("/api/{version}") } else { format!("/apis/{group}/{version}") };
            let path = if r.namespaced {
                format!("{prefix}/namespaces/{{namespace}}/{}/{{name}}", r.plural)
            } else {
                format!("{prefix}/{}/{{name}}", r.plural)
            };
            let params = json!([
                {"name": "fieldValidation", "in": "query", "schema": {"type": "string", "uniqueItems": true}},
                {"name": "fieldManager", "in": "query", "schema": {"type": "string", "uniqueItems": true}},
                {"name": "dryRun", "in": "query", "schema": {"type": "string", "uniqueItems": true}},
            ]);
            let op = |action: &str| json!({"x-kubernetes-group-version-kind": gvk, "x-kubernetes-action": action, "parameters": params, "responses": {"200": {"description": "OK"}}});
            paths.insert(
                path,
                json!({"get": op("get"), "put": op("put"), "patch": op("patch"), "delete": op("delete")}),
            );
            let name = schema_name(r);
            let mut schema = r
                .schema
                .as_deref()
                .cloned()
                .unwrap_or_else(|| json!({"type": "object", "x-kubernetes-preserve-unknown-fields": true}));
            schema["x-kubernetes-group-version-kind"] = json!([gvk]);
            schemas.insert(name, schema);
        }
        Some(json!({
            "openapi": "3.0.0",
            "info": {"title": "Kubernetes", "version": "v1.35.0"},
            "paths": paths,
            "components": {"schemas": schemas},
        }))
    }
}

fn schema_name(r: &Resource) -> String {
    // The reverse-DNS name the real server uses, e.g. dev.ep.v1alpha1.Experiment.
    if r.group.is_empty() {
        format!("io.k8s.api.core.{}.{}", r.version, r.kind)
    } else {
        let rev: Vec<&str> = r.group.split('.').rev().collect();
        format!("{}.{}.{}", rev.join("."), r.version, r.kind)
    }
}
