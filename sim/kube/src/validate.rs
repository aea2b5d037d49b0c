//! Custom resource validation as the API server does it (structural schema, pruning, defaulting,
//! CEL), worded as the API server words it.
//!
//! Written here rather than with the jsonschema crate: the API server prunes unknown fields, drops
//! nulls of non-nullable fields and applies defaults in the same walk that validates, and its
//! messages (`spec.x: Invalid value: 0: spec.x in body should be greater than or equal to 1`) are
//! what kubectl users read; a generic JSON Schema validator does neither.

use serde_json::{Map, Value};

/// One field error, formatted like the API server's `field.Error`.
#[derive(Clone, Debug, PartialEq)]
pub struct FieldError {
    pub field: String,
    pub reason: &'static str,
    pub message: String,
}

impl FieldError {
    fn invalid(field: &str, value: &Value, detail: &str) -> Self {
        Self {
            field: field.into(),
            reason: "FieldValueInvalid",
            message: format!("{field}: Invalid value: {}: {detail}", show(value)),
        }
    }
}

fn show(v: &Value) -> String {
    match v {
        Value::String(s) => format!("{s:?}"),
        Value::Object(_) => "\"object\"".into(),
        Value::Array(_) => "\"array\"".into(),
        other => other.to_string(),
    }
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(n) if n.is_i64() || n.is_u64() => "integer",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

/// What a walk found.
#[derive(Debug, Default)]
pub struct Outcome {
    pub errors: Vec<FieldError>,
    /// Paths of fields the schema does not know (pruned).
    pub unknown: Vec<String>,
}

/// Validates `obj` against a CRD's openAPIV3Schema, pruning unknown fields and applying defaults
/// in place. `metadata`, `apiVersion` and `kind` are left to the caller.
pub fn structural(schema: &Value, obj: &mut Value) -> Outcome {
    let mut out = Outcome::default();
    if let (Some(props), Value::Object(map)) = (schema.get("properties"), obj) {
        for (key, value) in map.iter_mut() {
            if matches!(key.as_str(), "apiVersion" | "kind" | "metadata") {
                continue;
            }
            match props.get(key) {
                Some(s) => walk(s, value, key, &mut out),
                None => out.unknown.push(key.clone()),
            }
        }
        let unknown: Vec<String> = out.unknown.iter().filter(|k| !k.contains('.')).cloned().collect();
        for k in unknown {
            map.remove(&k);
        }
    }
    out.unknown.sort();
    out
}

fn walk(schema: &Value, value: &mut Value, path: &str, out: &mut Outcome) {
    if value.is_null() {
        return;
    }
    let int_or_string = schema.get("x-kubernetes-int-or-string").and_then(Value::as_bool) == Some(true);
    if let Some(ty) = schema.get("type").and_then(Value::as_str) {
        let ok = match ty {
            "integer" => value.is_i64() || value.is_u64(),
            "number" => value.is_number(),
            "string" => value.is_string() || (int_or_string && (value.is_i64() || value.is_u64())),
            "boolean" => value.is_boolean(),
            "object" => value.is_object(),
            "array" => value.is_array(),
            _ => true,
        };
        if !ok {
            out.errors.push(FieldError::invalid(
                path,
                value,
                &format!("{path} in body must be of type {ty}: {:?}", type_name(value)),
            ));
            return;
        }
    }
    if let Some(allowed) = schema.get("enum").and_then(Value::as_array)
        && !allowed.contains(value)
    {
        let list: Vec<String> = allowed.iter().map(show).collect();
        out.errors.push(FieldError {
            field: path.into(),
            reason: "FieldValueNotSupported",
            message: format!("{path}: Unsupported value: {}: supported values: {}", show(value), list.join(", ")),
        });
    }
    if let Some(n) = value.as_f64() {
        if let Some(min) = schema.get("minimum").and_then(Value::as_f64)
            && n < min
        {
            out.errors.push(FieldError::invalid(
                path,
                value,
                &format!("{path} in body should be greater than or equal to {}", num(min)),
            ));
        }
        if let Some(max) = schema.get("maximum").and_then(Value::as_f64)
            && n > max
        {
            out.errors.push(FieldError::invalid(
                path,
                value,
                &format!("{path} in body should be less than or equal to {}", num(max)),
            ));
        }
    }
    if let Some(s) = value.as_str() {
        let len = s.chars().count() as u64;
        if let Some(min) = schema.get("minLength").and_then(Value::as_u64)
            && len < min
        {
            out.errors.push(FieldError::invalid(
                path,
                value,
                &format!("{path} in body should be at least {min} chars long"),
            ));
        }
        if let Some(max) = schema.get("maxLength").and_then(Value::as_u64)
            && len > max
        {
            out.errors.push(FieldError {
                field: path.into(),
                reason: "FieldValueTooLong",
                message: format!("{path}: Too long: may not be more than {max} bytes"),
            });
        }
        if let Some(p) = schema.get("pattern").and_then(Value::as_str)
            && pattern(p).is_some_and(|re| !re.is_match(s))
        {
            out.errors.push(FieldError::invalid(path, value, &format!("{path} in body should match '{p}'")));
        }
    }
    match value {
        Value::Array(items) => {
            let n = items.len() as u64;
            if let Some(max) = schema.get("maxItems").and_then(Value::as_u64)
                && n > max
            {
                out.errors.push(FieldError {
                    field: path.into(),
                    reason: "FieldValueTooMany",
                    message: format!("{path}: Too many: {n}: must have at most {max} items"),
                });
            }
            if let Some(min) = schema.get("minItems").and_then(Value::as_u64)
                && n < min
            {
                out.errors.push(FieldError::invalid(
                    path,
                    &Value::Array(Vec::new()),
                    &format!("{path} in body should have at least {min} items"),
                ));
            }
            if let Some(item) = schema.get("items") {
                for (i, v) in items.iter_mut().enumerate() {
                    walk(item, v, &format!("{path}[{i}]"), out);
                }
            }
        }
        Value::Object(map) => object(schema, map, path, out),
        _ => {}
    }
}

fn num(f: f64) -> String {
    if f.fract() == 0.0 { format!("{f:.0}") } else { f.to_string() }
}

fn object(schema: &Value, map: &mut Map<String, Value>, path: &str, out: &mut Outcome) {
    let preserve = schema.get("x-kubernetes-preserve-unknown-fields").and_then(Value::as_bool) == Some(true);
    let props = schema.get("properties").and_then(Value::as_object);
    // Nulls of non-nullable fields are dropped before defaulting, as the API server does.
    map.retain(|k, v| {
        !(v.is_null()
            && props.and_then(|p| p.get(k)).is_some_and(|s| s.get("nullable").and_then(Value::as_bool) != Some(true)))
    });
    if let Some(props) = props {
        for (k, s) in props {
            if !map.contains_key(k)
                && let Some(d) = s.get("default")
            {
                map.insert(k.clone(), d.clone());
            }
        }
    }
    if let Some(required) = schema.get("required").and_then(Value::as_array) {
        for r in required.iter().filter_map(Value::as_str) {
            if !map.contains_key(r) {
                let field = format!("{path}.{r}");
                out.errors.push(FieldError {
                    message: format!("{field}: Required value"),
                    field,
                    reason: "FieldValueRequired",
                });
            }
        }
    }
    let additional = schema.get("additionalProperties").filter(|a| a.is_object());
    let mut unknown = Vec::new();
    for (k, v) in map.iter_mut() {
        let child = format!("{path}.{k}");
        match (props.and_then(|p| p.get(k)), additional) {
            (Some(s), _) | (None, Some(s)) => walk(s, v, &child, out),
            (None, None) if preserve => {}
            (None, None) => unknown.push(k.clone()),
        }
    }
    for k in unknown {
        map.remove(&k);
        out.unknown.push(format!("{path}.{k}"));
    }
}

/// A schema pattern, compiled once per thread.
fn pattern(p: &str) -> Option<regex::Regex> {
    thread_local! {
        static PATTERNS: std::cell::RefCell<std::collections::HashMap<String, Option<regex::Regex>>> =
            std::cell::RefCell::new(std::collections::HashMap::new());
    }
    PATTERNS.with(|c| c.borrow_mut().entry(p.to_owned()).or_insert_with(|| regex::Regex::new(p).ok()).clone())
}

/// Evaluates the schema's `x-kubernetes-validations` (with `oldSelf` on update).
///
/// On update, a top-level field the write left unchanged is not evaluated again, as the API
/// server's validation ratcheting ignores errors on unchanged values (a status write does not
/// re-run the spec's rules). Rules on the root object see the whole object and always run.
pub fn cel(rules: &kube::core::cel::CompiledSchema, obj: &Value, old: Option<&Value>) -> Vec<FieldError> {
    let Some(old) = old.filter(|_| rules.validations.is_empty()) else {
        return cel_at(rules, obj, old, "");
    };
    let mut errors = Vec::new();
    for (field, sub) in &rules.properties {
        let (now, before) = (obj.get(field), old.get(field));
        if let Some(now) = now
            && before != Some(now)
        {
            errors.extend(cel_at(sub, now, before, field));
        }
    }
    errors
}

/// The rules of `rules` on `obj`, which sits at `prefix` (dotted) in the object.
fn cel_at(rules: &kube::core::cel::CompiledSchema, obj: &Value, old: Option<&Value>, prefix: &str) -> Vec<FieldError> {
    thread_local! {
        // Registering the Kubernetes CEL library is itself work: once per thread.
        static VALIDATOR: kube::core::cel::Validator = kube::core::cel::Validator::new();
    }
    match VALIDATOR.with(|v| v.validate_compiled(rules, obj, old)) {
        Ok(()) => Vec::new(),
        Err(errors) => errors
            .into_vec()
            .into_iter()
            .map(|e| {
                let at = pointer_at(obj, &e.field_path);
                let path = match (prefix, e.field_path.as_str()) {
                    ("", p) => p.to_owned(),
                    (pre, "") => pre.to_owned(),
                    (pre, p) if p.starts_with('[') => format!("{pre}{p}"),
                    (pre, p) => format!("{pre}.{p}"),
                };
                let field = if path.is_empty() { "<nil>".to_owned() } else { path };
                FieldError {
                    message: format!(
                        "{field}: Invalid value: {:?}: {}",
                        type_name(at.unwrap_or(&Value::Null)),
                        e.message
                    ),
                    field,
                    reason: "FieldValueInvalid",
                }
            })
            .collect(),
    }
}

/// The value at a field path such as `spec.items[0].name`.
fn pointer_at<'a>(obj: &'a Value, dotted: &str) -> Option<&'a Value> {
    dotted.split('.').filter(|s| !s.is_empty()).try_fold(obj, |v, segment| {
        let mut parts = segment.split('[');
        let name = parts.next().unwrap_or_default();
        let v = if name.is_empty() { v } else { v.get(name)? };
        parts.try_fold(v, |v, index| v.get(index.trim_end_matches(']').parse::<usize>().ok()?))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn schema() -> Value {
        json!({"type": "object", "properties": {
            "spec": {"type": "object", "required": ["count"], "properties": {
                "count": {"type": "integer", "minimum": 1, "maximum": 8},
                "mode": {"type": "string", "enum": ["A", "B"], "default": "A"},
                "name": {"type": "string", "pattern": "^[a-z]+$", "maxLength": 5},
                "tags": {"type": "array", "maxItems": 2, "items": {"type": "string"}},
                "labels": {"type": "object", "additionalProperties": {"type": "string"}},
                "free": {"type": "object", "x-kubernetes-preserve-unknown-fields": true},
                "opt": {"type": "string", "nullable": true}
            }},
            "status": {"type": "object", "properties": {"phase": {"type": "string"}}}
        }})
    }

    #[test]
    fn errors_are_worded_like_the_api_server() {
        let mut o =
            json!({"spec": {"count": 0, "mode": "C", "name": "ABC", "tags": ["a", "b", "c"], "labels": {"x": 1}}});
        let out = structural(&schema(), &mut o);
        let msgs: Vec<&str> = out.errors.iter().map(|e| e.message.as_str()).collect();
        assert!(
            msgs.contains(&"spec.count: Invalid value: 0: spec.count in body should be greater than or equal to 1"),
            "{msgs:?}"
        );
        assert!(msgs.contains(&"spec.mode: Unsupported value: \"C\": supported values: \"A\", \"B\""), "{msgs:?}");
        assert!(
            msgs.contains(&"spec.name: Invalid value: \"ABC\": spec.name in body should match '^[a-z]+$'"),
            "{msgs:?}"
        );
        assert!(msgs.contains(&"spec.tags: Too many: 3: must have at most 2 items"), "{msgs:?}");
        assert!(
            msgs.contains(
                &"spec.labels.x: Invalid value: 1: spec.labels.x in body must be of type string: \"integer\""
            ),
            "{msgs:?}"
        );
        let mut o = json!({"spec": {}});
        let out = structural(&schema(), &mut o);
        assert_eq!(out.errors[0].message, "spec.count: Required value");
    }

    #[test]
    fn prunes_unknown_fields_applies_defaults_and_drops_nulls() {
        let mut o = json!({"apiVersion": "x/v1", "kind": "K", "metadata": {"name": "n", "anything": 1},
                           "spec": {"count": 2, "typo": true, "free": {"kept": 1}, "opt": null, "name": null}, "extra": 1});
        let out = structural(&schema(), &mut o);
        assert!(out.errors.is_empty(), "{:?}", out.errors);
        assert_eq!(out.unknown, ["extra", "spec.typo"]);
        assert_eq!(o["spec"], json!({"count": 2, "mode": "A", "free": {"kept": 1}, "opt": null}));
        assert_eq!(o["metadata"]["anything"], 1, "metadata is not pruned here");
        assert!(o.get("extra").is_none());
    }

    #[test]
    fn cel_rules_report_field_and_message() {
        let s = json!({"type": "object", "properties": {"spec": {"type": "object",
            "x-kubernetes-validations": [{"rule": "self.max >= self.min", "message": "max must be >= min"}],
            "properties": {"min": {"type": "integer"}, "max": {"type": "integer"},
                           "id": {"type": "string", "x-kubernetes-validations": [{"rule": "self == oldSelf", "message": "id is immutable"}]}}}}});
        let s = kube::core::cel::compile_schema(&s);
        let errs = cel(&s, &json!({"spec": {"min": 3, "max": 1, "id": "a"}}), None);
        assert_eq!(errs[0].message, "spec: Invalid value: \"object\": max must be >= min");
        let errs = cel(
            &s,
            &json!({"spec": {"min": 1, "max": 1, "id": "b"}}),
            Some(&json!({"spec": {"min": 1, "max": 1, "id": "a"}})),
        );
        assert_eq!(errs[0].message, "spec.id: Invalid value: \"string\": id is immutable");
    }

    #[test]
    fn an_update_leaving_a_field_unchanged_does_not_rerun_its_rules() {
        let s = kube::core::cel::compile_schema(&json!({"type": "object", "properties": {
            "spec": {"type": "object", "x-kubernetes-validations": [{"rule": "self.n <= 2", "message": "n at most 2"}],
                     "properties": {"n": {"type": "integer"}}},
            "status": {"type": "object", "properties": {"items": {"type": "array", "items": {"type": "object",
                       "x-kubernetes-validations": [{"rule": "self.a != 'bad'", "message": "not bad"}],
                       "properties": {"a": {"type": "string"}}}}}}}}));
        // Stored before the rule was tightened: a status write is not refused for the spec.
        let old = json!({"spec": {"n": 5}, "status": {"items": []}});
        assert!(cel(&s, &json!({"spec": {"n": 5}, "status": {"items": [{"a": "ok"}]}}), Some(&old)).is_empty());
        // A changed field is checked, with its full path.
        let errs = cel(&s, &json!({"spec": {"n": 5}, "status": {"items": [{"a": "bad"}]}}), Some(&old));
        assert_eq!(errs.len(), 1);
        assert_eq!(errs[0].message, "status.items[0]: Invalid value: \"object\": not bad");
        assert_eq!(
            cel(&s, &json!({"spec": {"n": 6}}), Some(&old))[0].message,
            "spec: Invalid value: \"object\": n at most 2"
        );
        // On create everything runs.
        assert_eq!(cel(&s, &json!({"spec": {"n": 5}}), None).len(), 1);
    }
}
