//! What the API server's strategies do to built-in kinds on every write, where clients see it:
//! a Secret's `stringData` merged into `data` and never stored ("Secrets › Secret types",
//! "Editing a Secret"), a Secret's type defaulted, validated and immutable, and the keys of
//! Secrets and ConfigMaps checked.

use base64::Engine as _;
use serde_json::{Value, json};

use crate::validate::FieldError;

fn valid_key(k: &str) -> bool {
    !k.is_empty()
        && k.len() <= 253
        && k != "."
        && k != ".."
        && k.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

fn check_keys(obj: &Value, field: &str, errors: &mut Vec<FieldError>) {
    let Some(m) = obj.get(field).and_then(Value::as_object) else { return };
    for k in m.keys().filter(|k| !valid_key(k)) {
        errors.push(FieldError {
            field: format!("{field}[{k}]"),
            reason: "FieldValueInvalid",
            message: format!(
                "{field}[{k}]: Invalid value: {k:?}: a valid config key must consist of alphanumeric characters, '-', '_' or '.' (e.g. 'key.name',  or 'KEY_NAME',  or 'key-name', regex used for validation is '[-._a-zA-Z0-9]+')"
            ),
        });
    }
}

/// The keys each well-known Secret type must hold.
fn required_keys(kind: &str) -> Option<&'static [&'static str]> {
    Some(match kind {
        "Opaque" | "kubernetes.io/basic-auth" | "bootstrap.kubernetes.io/token" => &[],
        "kubernetes.io/service-account-token" => &[],
        "kubernetes.io/dockercfg" => &[".dockercfg"],
        "kubernetes.io/dockerconfigjson" => &[".dockerconfigjson"],
        "kubernetes.io/ssh-auth" => &["ssh-privatekey"],
        "kubernetes.io/tls" => &["tls.crt", "tls.key"],
        _ => return None,
    })
}

fn required(field: String) -> FieldError {
    FieldError { message: format!("{field}: Required value"), field, reason: "FieldValueRequired" }
}

/// Merges `stringData` into `data` (base64, overwriting), defaults and validates the type.
fn secret(obj: &mut Value, old: Option<&Value>) -> Vec<FieldError> {
    let mut errors = Vec::new();
    if let Some(Value::Object(strings)) = obj.as_object_mut().and_then(|m| m.remove("stringData")) {
        let b64 = base64::engine::general_purpose::STANDARD;
        if !obj.get("data").is_some_and(Value::is_object) {
            obj["data"] = json!({});
        }
        for (k, v) in strings {
            obj["data"][&k] = json!(b64.encode(v.as_str().unwrap_or_default()));
        }
    }
    if obj.get("type").and_then(Value::as_str).is_none_or(str::is_empty) {
        obj["type"] = json!("Opaque");
    }
    check_keys(obj, "data", &mut errors);
    let kind = obj["type"].as_str().unwrap_or_default().to_owned();
    for key in required_keys(&kind).unwrap_or(&[]) {
        if obj.pointer("/data").and_then(|d| d.get(*key)).is_none() {
            errors.push(required(format!("data[{key}]")));
        }
    }
    if kind == "kubernetes.io/service-account-token"
        && obj.pointer("/metadata/annotations/kubernetes.io~1service-account.name").is_none()
    {
        errors.push(required("metadata.annotations[kubernetes.io/service-account.name]".into()));
    }
    if let Some(old) = old {
        if old["type"] != obj["type"] {
            errors.push(FieldError {
                field: "type".into(),
                reason: "FieldValueInvalid",
                message: format!("type: Invalid value: {kind:?}: field is immutable"),
            });
        }
        immutable(obj, old, &["data"], &mut errors);
    }
    errors
}

/// An object marked `immutable: true` keeps its data and the mark.
fn immutable(obj: &Value, old: &Value, fields: &[&str], errors: &mut Vec<FieldError>) {
    if old["immutable"] != json!(true) {
        return;
    }
    if obj["immutable"] != json!(true) {
        errors.push(FieldError {
            field: "immutable".into(),
            reason: "FieldValueForbidden",
            message: "immutable: Forbidden: field is immutable when `immutable` is set".into(),
        });
    }
    for f in fields.iter().filter(|f| obj.get(**f) != old.get(**f)) {
        errors.push(FieldError {
            field: (*f).into(),
            reason: "FieldValueForbidden",
            message: format!("{f}: Forbidden: field is immutable when `immutable` is set"),
        });
    }
}

/// A binding names an existing kind of role, and its roleRef never changes ("Using RBAC
/// Authorization › RoleBinding and ClusterRoleBinding": to change it, delete and recreate).
fn binding(kind: &str, obj: &Value, old: Option<&Value>) -> Vec<FieldError> {
    let role_ref = &obj["roleRef"];
    let allowed: &[&str] = if kind == "ClusterRoleBinding" { &["ClusterRole"] } else { &["Role", "ClusterRole"] };
    let mut errors = Vec::new();
    if role_ref["name"].as_str().is_none_or(str::is_empty) {
        errors.push(required("roleRef.name".into()));
    }
    match role_ref["kind"].as_str() {
        Some(k) if allowed.contains(&k) => {}
        other => errors.push(FieldError {
            field: "roleRef.kind".into(),
            reason: "FieldValueNotSupported",
            message: format!(
                "roleRef.kind: Unsupported value: {:?}: supported values: {}",
                other.unwrap_or_default(),
                allowed.iter().map(|a| format!("\"{a}\"")).collect::<Vec<_>>().join(", ")
            ),
        }),
    }
    if let Some(old) = old
        && old["roleRef"] != *role_ref
    {
        errors.push(FieldError {
            field: "roleRef".into(),
            reason: "FieldValueInvalid",
            message: format!("roleRef: Invalid value: {role_ref}: cannot change roleRef"),
        });
    }
    errors
}

/// Applies the built-in kind's strategy to an object about to be stored; errors are 422 causes.
pub fn prepare(group: &str, kind: &str, obj: &mut Value, old: Option<&Value>) -> Vec<FieldError> {
    match (group, kind) {
        ("", "Secret") => secret(obj, old),
        ("", "ConfigMap") => {
            let mut errors = Vec::new();
            check_keys(obj, "data", &mut errors);
            check_keys(obj, "binaryData", &mut errors);
            if let Some(old) = old {
                immutable(obj, old, &["data", "binaryData"], &mut errors);
            }
            errors
        }
        ("rbac.authorization.k8s.io", "RoleBinding" | "ClusterRoleBinding") => binding(kind, obj, old),
        _ => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn string_data_is_merged_into_data_and_never_kept() {
        let mut s =
            json!({"metadata": {"name": "k"}, "data": {"a": "eA==", "b": "eA=="}, "stringData": {"b": "hello"}});
        assert!(prepare("", "Secret", &mut s, None).is_empty());
        assert_eq!(s, json!({"metadata": {"name": "k"}, "type": "Opaque", "data": {"a": "eA==", "b": "aGVsbG8="}}));
    }

    #[test]
    fn secret_types_need_their_keys_and_keep_their_type() {
        let mut tls = json!({"metadata": {"name": "t"}, "type": "kubernetes.io/tls", "stringData": {"tls.crt": "c"}});
        let errs = prepare("", "Secret", &mut tls, None);
        assert_eq!(errs.iter().map(|e| e.message.as_str()).collect::<Vec<_>>(), ["data[tls.key]: Required value"]);
        let old = json!({"type": "Opaque", "data": {}});
        let mut changed = json!({"type": "kubernetes.io/basic-auth", "data": {}});
        assert!(prepare("", "Secret", &mut changed, Some(&old))[0].message.contains("field is immutable"));
        let mut bad = json!({"data": {"no spaces": "eA=="}});
        assert!(prepare("", "Secret", &mut bad, None)[0].message.contains("a valid config key"));
    }

    #[test]
    fn an_immutable_config_map_keeps_its_data() {
        let old = json!({"immutable": true, "data": {"a": "1"}});
        let mut new = json!({"immutable": true, "data": {"a": "2"}});
        let errs = prepare("", "ConfigMap", &mut new, Some(&old));
        assert_eq!(errs[0].message, "data: Forbidden: field is immutable when `immutable` is set");
    }
}
