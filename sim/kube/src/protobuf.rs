//! Protobuf request bodies (`application/vnd.kubernetes.protobuf`), as kubectl's imperative
//! generators send them (`kubectl create namespace|secret|configmap|serviceaccount|rolebinding`,
//! `kubectl auth can-i`, `kubectl auth whoami`).
//!
//! The wire format ("Kubernetes API Concepts › Alternate representations of resources"): the
//! four bytes `k8s\0`, then a `runtime.Unknown` whose `typeMeta` names the kind and whose `raw`
//! holds the object's own message. The messages are decoded with k8s-pb (kube-rs' generated
//! bindings); they carry no serde, so each kind kubectl sends is turned into the JSON the API
//! server would store here, field by field. Responses stay JSON, which clients accept.

use std::collections::BTreeMap;

use base64::Engine as _;
use k8s_pb::api::authentication::v1 as authn;
use k8s_pb::api::authorization::v1 as authz;
use k8s_pb::api::core::v1 as core;
use k8s_pb::api::rbac::v1 as rbac;
use k8s_pb::apimachinery::pkg::apis::meta::v1 as meta;
use k8s_pb::apimachinery::pkg::runtime::Unknown;
use prost::Message;
use serde_json::{Map, Value, json};

use crate::errors::ApiError;

const MAGIC: &[u8] = b"k8s\0";

/// A JSON object built from optional protobuf fields: absent and empty values are left out, as
/// the API server's JSON encoding leaves out `omitempty` fields.
#[derive(Default)]
struct Obj(Map<String, Value>);

impl Obj {
    fn put(mut self, key: &str, v: Value) -> Self {
        let empty = match &v {
            Value::Null => true,
            Value::Array(a) => a.is_empty(),
            Value::Object(o) => o.is_empty(),
            _ => false,
        };
        if !empty {
            self.0.insert(key.to_owned(), v);
        }
        self
    }

    fn s(self, key: &str, v: Option<String>) -> Self {
        self.put(key, v.map_or(Value::Null, Value::String))
    }

    fn b(self, key: &str, v: Option<bool>) -> Self {
        self.put(key, v.map_or(Value::Null, Value::Bool))
    }

    fn done(self) -> Value {
        Value::Object(self.0)
    }
}

fn strings(v: Vec<String>) -> Value {
    Value::Array(v.into_iter().map(Value::String).collect())
}

fn map(m: BTreeMap<String, String>) -> Value {
    Value::Object(m.into_iter().map(|(k, v)| (k, Value::String(v))).collect())
}

fn bytes_map(m: BTreeMap<String, Vec<u8>>) -> Value {
    let b64 = base64::engine::general_purpose::STANDARD;
    Value::Object(m.into_iter().map(|(k, v)| (k, Value::String(b64.encode(v)))).collect())
}

fn object_meta(m: Option<meta::ObjectMeta>) -> Value {
    let Some(m) = m else { return json!({}) };
    let owners: Vec<Value> = m
        .owner_references
        .into_iter()
        .map(|o| {
            Obj::default()
                .s("apiVersion", o.api_version)
                .s("kind", o.kind)
                .s("name", o.name)
                .s("uid", o.uid)
                .b("controller", o.controller)
                .b("blockOwnerDeletion", o.block_owner_deletion)
                .done()
        })
        .collect();
    Obj::default()
        .s("name", m.name)
        .s("generateName", m.generate_name)
        .s("namespace", m.namespace)
        .s("resourceVersion", m.resource_version)
        .put("labels", map(m.labels))
        .put("annotations", map(m.annotations))
        .put("ownerReferences", Value::Array(owners))
        .put("finalizers", strings(m.finalizers))
        .done()
}

fn rules(rules: Vec<rbac::PolicyRule>) -> Value {
    Value::Array(
        rules
            .into_iter()
            .map(|r| {
                // `apiGroups` is kept even when it holds only the core group's "".
                let groups = if r.api_groups.is_empty() { Value::Null } else { strings(r.api_groups) };
                Obj::default()
                    .put("verbs", strings(r.verbs))
                    .put("apiGroups", groups)
                    .put("resources", strings(r.resources))
                    .put("resourceNames", strings(r.resource_names))
                    .put("nonResourceURLs", strings(r.non_resource_ur_ls))
                    .done()
            })
            .collect(),
    )
}

fn label_selector(s: meta::LabelSelector) -> Value {
    let exprs: Vec<Value> = s
        .match_expressions
        .into_iter()
        .map(|e| Obj::default().s("key", e.key).s("operator", e.operator).put("values", strings(e.values)).done())
        .collect();
    Obj::default().put("matchLabels", map(s.match_labels)).put("matchExpressions", Value::Array(exprs)).done()
}

fn binding(subjects: Vec<rbac::Subject>, role_ref: Option<rbac::RoleRef>) -> Obj {
    let subjects: Vec<Value> = subjects
        .into_iter()
        .map(|s| {
            Obj::default()
                .s("kind", s.kind)
                .s("apiGroup", s.api_group)
                .s("name", s.name)
                .s("namespace", s.namespace)
                .done()
        })
        .collect();
    let role_ref =
        role_ref.map(|r| Obj::default().s("apiGroup", r.api_group).s("kind", r.kind).s("name", r.name).done());
    Obj::default().put("subjects", Value::Array(subjects)).put("roleRef", role_ref.unwrap_or(Value::Null))
}

fn resource_attributes(a: authz::ResourceAttributes) -> Value {
    Obj::default()
        .s("namespace", a.namespace)
        .s("verb", a.verb)
        .s("group", a.group)
        .s("version", a.version)
        .s("resource", a.resource)
        .s("subresource", a.subresource)
        .s("name", a.name)
        .done()
}

fn decode_raw<M: Message + Default>(kind: &str, raw: &[u8]) -> Result<M, ApiError> {
    M::decode(raw).map_err(|e| ApiError::bad_request(format!("error decoding protobuf {kind}: {e}")))
}

/// The object's own fields (everything but apiVersion and kind), for the kinds kubectl sends.
fn fields(group: &str, kind: &str, raw: &[u8]) -> Result<Obj, ApiError> {
    let obj = match (group, kind) {
        ("", "Namespace") => {
            let n: core::Namespace = decode_raw(kind, raw)?;
            let spec = n.spec.map(|s| Obj::default().put("finalizers", strings(s.finalizers)).done());
            Obj::default().put("metadata", object_meta(n.metadata)).put("spec", spec.unwrap_or(Value::Null))
        }
        ("", "Secret") => {
            let s: core::Secret = decode_raw(kind, raw)?;
            Obj::default()
                .put("metadata", object_meta(s.metadata))
                .s("type", s.r#type)
                .b("immutable", s.immutable)
                .put("data", bytes_map(s.data))
                .put("stringData", map(s.string_data))
        }
        ("", "ConfigMap") => {
            let c: core::ConfigMap = decode_raw(kind, raw)?;
            Obj::default()
                .put("metadata", object_meta(c.metadata))
                .b("immutable", c.immutable)
                .put("data", map(c.data))
                .put("binaryData", bytes_map(c.binary_data))
        }
        ("", "ServiceAccount") => {
            let sa: core::ServiceAccount = decode_raw(kind, raw)?;
            let secrets: Vec<Value> = sa
                .secrets
                .into_iter()
                .map(|r| Obj::default().s("name", r.name).s("namespace", r.namespace).done())
                .collect();
            let pulls: Vec<Value> =
                sa.image_pull_secrets.into_iter().map(|r| Obj::default().s("name", r.name).done()).collect();
            Obj::default()
                .put("metadata", object_meta(sa.metadata))
                .put("secrets", Value::Array(secrets))
                .put("imagePullSecrets", Value::Array(pulls))
                .b("automountServiceAccountToken", sa.automount_service_account_token)
        }
        ("rbac.authorization.k8s.io", "Role") => {
            let r: rbac::Role = decode_raw(kind, raw)?;
            Obj::default().put("metadata", object_meta(r.metadata)).put("rules", rules(r.rules))
        }
        ("rbac.authorization.k8s.io", "ClusterRole") => {
            let r: rbac::ClusterRole = decode_raw(kind, raw)?;
            let aggregation = r.aggregation_rule.map(|a| {
                let selectors: Vec<Value> = a.cluster_role_selectors.into_iter().map(label_selector).collect();
                json!({"clusterRoleSelectors": selectors})
            });
            Obj::default()
                .put("metadata", object_meta(r.metadata))
                .put("rules", rules(r.rules))
                .put("aggregationRule", aggregation.unwrap_or(Value::Null))
        }
        ("rbac.authorization.k8s.io", "RoleBinding") => {
            let b: rbac::RoleBinding = decode_raw(kind, raw)?;
            binding(b.subjects, b.role_ref).put("metadata", object_meta(b.metadata))
        }
        ("rbac.authorization.k8s.io", "ClusterRoleBinding") => {
            let b: rbac::ClusterRoleBinding = decode_raw(kind, raw)?;
            binding(b.subjects, b.role_ref).put("metadata", object_meta(b.metadata))
        }
        ("authorization.k8s.io", "SelfSubjectAccessReview") => {
            let r: authz::SelfSubjectAccessReview = decode_raw(kind, raw)?;
            let spec = r.spec.unwrap_or_default();
            let non_resource =
                spec.non_resource_attributes.map(|n| Obj::default().s("path", n.path).s("verb", n.verb).done());
            let spec = Obj::default()
                .put("resourceAttributes", spec.resource_attributes.map_or(Value::Null, resource_attributes))
                .put("nonResourceAttributes", non_resource.unwrap_or(Value::Null))
                .done();
            Obj::default().put("metadata", object_meta(r.metadata)).put("spec", spec)
        }
        ("authorization.k8s.io", "SelfSubjectRulesReview") => {
            let r: authz::SelfSubjectRulesReview = decode_raw(kind, raw)?;
            let spec = Obj::default().s("namespace", r.spec.and_then(|s| s.namespace)).done();
            Obj::default().put("metadata", object_meta(r.metadata)).put("spec", spec)
        }
        ("authentication.k8s.io", "SelfSubjectReview") => {
            let r: authn::SelfSubjectReview = decode_raw(kind, raw)?;
            Obj::default().put("metadata", object_meta(r.metadata))
        }
        _ => {
            return Err(ApiError {
                code: 415,
                reason: "UnsupportedMediaType",
                message: format!(
                    "kube-sim decodes protobuf bodies of Namespace, Secret, ConfigMap, ServiceAccount, the RBAC kinds and the access reviews, not {kind} ({group}); send JSON or YAML (`kubectl apply -f`)"
                ),
                details: None,
            });
        }
    };
    Ok(obj)
}

/// Decodes a protobuf request body into the JSON object the API server would have received.
pub fn decode(body: &[u8]) -> Result<Value, ApiError> {
    let rest = body
        .strip_prefix(MAGIC)
        .ok_or_else(|| ApiError::bad_request("protobuf body without the \"k8s\\x00\" prefix".into()))?;
    let unknown = Unknown::decode(rest)
        .map_err(|e| ApiError::bad_request(format!("error decoding the protobuf envelope: {e}")))?;
    let tm = unknown.type_meta.unwrap_or_default();
    let api_version = tm.api_version.unwrap_or_default();
    let kind = tm.kind.unwrap_or_default();
    let group = api_version.rsplit_once('/').map_or("", |(g, _)| g);
    let raw = unknown.raw.unwrap_or_default();
    let Value::Object(mut out) = fields(group, &kind, &raw)?.done() else {
        return Err(ApiError::bad_request(format!("error decoding protobuf {kind}")));
    };
    out.insert("apiVersion".into(), Value::String(api_version));
    out.insert("kind".into(), Value::String(kind));
    Ok(Value::Object(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn envelope(api_version: &str, kind: &str, raw: Vec<u8>) -> Vec<u8> {
        let u = Unknown {
            type_meta: Some(k8s_pb::apimachinery::pkg::runtime::TypeMeta {
                api_version: Some(api_version.into()),
                kind: Some(kind.into()),
            }),
            raw: Some(raw),
            content_encoding: Some(String::new()),
            content_type: Some(String::new()),
        };
        [MAGIC.to_vec(), u.encode_to_vec()].concat()
    }

    #[test]
    fn a_secret_decodes_with_its_data_in_base64_and_its_string_data_kept_for_the_merge() {
        let s = core::Secret {
            metadata: Some(meta::ObjectMeta { name: Some("creds".into()), ..Default::default() }),
            data: BTreeMap::from([("key".into(), b"s3cr3t".to_vec())]),
            string_data: BTreeMap::from([("user".into(), "alice".into())]),
            r#type: Some("Opaque".into()),
            immutable: None,
        };
        let v = decode(&envelope("v1", "Secret", s.encode_to_vec())).unwrap();
        assert_eq!(
            v,
            json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "creds"}, "type": "Opaque",
                   "data": {"key": "czNjcjN0"}, "stringData": {"user": "alice"}})
        );
    }

    #[test]
    fn a_role_binding_decodes_its_subjects_and_role() {
        let b = rbac::RoleBinding {
            metadata: Some(meta::ObjectMeta {
                name: Some("rb".into()),
                namespace: Some("ml".into()),
                ..Default::default()
            }),
            subjects: vec![rbac::Subject {
                kind: Some("User".into()),
                api_group: Some("rbac.authorization.k8s.io".into()),
                name: Some("alice".into()),
                namespace: None,
            }],
            role_ref: Some(rbac::RoleRef {
                api_group: Some("rbac.authorization.k8s.io".into()),
                kind: Some("ClusterRole".into()),
                name: Some("edit".into()),
            }),
        };
        let v = decode(&envelope("rbac.authorization.k8s.io/v1", "RoleBinding", b.encode_to_vec())).unwrap();
        assert_eq!(v["subjects"][0]["name"], "alice");
        assert_eq!(v["roleRef"]["name"], "edit");
        assert_eq!(v["metadata"], json!({"name": "rb", "namespace": "ml"}));
    }

    #[test]
    fn a_body_without_the_prefix_or_of_another_kind_is_refused_by_name() {
        assert!(decode(b"{}").unwrap_err().message.contains("k8s\\x00"));
        let e = decode(&envelope("apps/v1", "Deployment", vec![])).unwrap_err();
        assert_eq!(e.code, 415);
        assert!(e.message.contains("Deployment"), "{}", e.message);
    }
}
