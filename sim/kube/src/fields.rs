//! Field ownership for server-side apply (Kubernetes docs: "Server-Side Apply", sections
//! "Field management" and "Conflicts"): every field belongs to the managers that set it; an apply
//! that would change a field another manager owns is a conflict (409) unless forced, in which case
//! the field changes hands. Maps are owned field by field, lists and scalars whole.

use serde_json::{Map, Value, json};

/// A field's path from the object's root (`["spec", "holderIdentity"]`).
pub type Path = Vec<String>;

/// Paths no manager owns: identity and bookkeeping the server keeps.
fn unowned(path: &[String]) -> bool {
    match path {
        [a] => a == "apiVersion" || a == "kind",
        [m, f, ..] if m == "metadata" => {
            matches!(
                f.as_str(),
                "resourceVersion" | "managedFields" | "uid" | "creationTimestamp" | "generation" | "name" | "namespace"
            )
        }
        _ => false,
    }
}

/// The leaf paths of a value: maps are entered, anything else (lists, scalars, empty maps) is a leaf.
pub fn leaves(v: &Value) -> Vec<Path> {
    fn walk(v: &Value, at: &mut Path, out: &mut Vec<Path>) {
        match v {
            Value::Object(m) if !m.is_empty() => {
                for (k, sub) in m {
                    at.push(k.clone());
                    walk(sub, at, out);
                    at.pop();
                }
            }
            _ => out.push(at.clone()),
        }
    }
    let mut out = Vec::new();
    walk(v, &mut Vec::new(), &mut out);
    out.retain(|p| !p.is_empty() && !unowned(p));
    out
}

/// The value at a path, if present.
pub fn at<'a>(v: &'a Value, path: &[String]) -> Option<&'a Value> {
    path.iter().try_fold(v, |v, k| v.get(k))
}

/// A fieldsV1 set from paths.
pub fn to_fields_v1(paths: &[Path]) -> Value {
    let mut root = Map::new();
    for p in paths {
        let mut node = &mut root;
        for k in p {
            let entry = node.entry(format!("f:{k}")).or_insert_with(|| json!({}));
            let Some(m) = entry.as_object_mut() else { break };
            node = m;
        }
    }
    Value::Object(root)
}

/// The paths of a fieldsV1 set (its leaves).
pub fn from_fields_v1(set: &Value) -> Vec<Path> {
    fn walk(v: &Value, at: &mut Path, out: &mut Vec<Path>) {
        let Some(m) = v.as_object().filter(|m| !m.is_empty()) else {
            out.push(at.clone());
            return;
        };
        for (k, sub) in m {
            let Some(field) = k.strip_prefix("f:") else { continue };
            at.push(field.to_owned());
            walk(sub, at, out);
            at.pop();
        }
    }
    let mut out = Vec::new();
    walk(set, &mut Vec::new(), &mut out);
    out.retain(|p| !p.is_empty());
    out
}

/// Whether `owned` covers `path` (the same field, or a field that contains it).
fn covers(owned: &[String], path: &[String]) -> bool {
    path.starts_with(owned) || owned.starts_with(path)
}

/// The conflicts an apply by `manager` would cause: fields it changes that another manager owns,
/// as `(manager, ".path")`.
pub fn conflicts(current: &Value, manager: &str, applied: &Value) -> Vec<(String, String)> {
    let entries = current["metadata"]["managedFields"].as_array().cloned().unwrap_or_default();
    let mut out = Vec::new();
    for path in leaves(applied) {
        if at(current, &path) == at(applied, &path) {
            continue;
        }
        for e in entries.iter().filter(|e| e["manager"].as_str() != Some(manager)) {
            let owner = e["manager"].as_str().unwrap_or_default().to_owned();
            if from_fields_v1(&e["fieldsV1"]).iter().any(|o| covers(o, &path)) {
                let shown = format!(".{}", path.join("."));
                if !out.contains(&(owner.clone(), shown.clone())) {
                    out.push((owner, shown));
                }
            }
        }
    }
    out
}

/// The paths whose value differs between two versions of an object.
fn changed(before: &Value, after: &Value) -> Vec<Path> {
    let mut paths = leaves(after);
    paths.extend(leaves(before));
    paths.sort();
    paths.dedup();
    paths.retain(|p| at(before, p) != at(after, p));
    paths
}

/// Records a write in `obj`'s managedFields. An apply owns exactly what it applied; an update owns
/// what it changed. Whatever changed leaves its former owners, and fields no longer in the object
/// leave everyone.
pub fn record(obj: &mut Value, before: &Value, manager: &str, applied: Option<&Value>, time: &str) {
    let operation = if applied.is_some() { "Apply" } else { "Update" };
    let moved = changed(before, obj);
    let mut mine: Vec<Path> = match applied {
        Some(a) => leaves(a),
        None => entry_paths(obj, manager, operation).into_iter().chain(moved.iter().cloned()).collect(),
    };
    mine.retain(|p| at(obj, p).is_some());
    mine.sort();
    mine.dedup();
    let snapshot = obj.clone();
    let mut list: Vec<Value> = Vec::new();
    for mut e in obj["metadata"]["managedFields"].as_array().cloned().unwrap_or_default() {
        if e["manager"] == manager && e["operation"] == operation {
            continue;
        }
        let kept: Vec<Path> = from_fields_v1(&e["fieldsV1"])
            .into_iter()
            .filter(|o| at(&snapshot, o).is_some() && !moved.iter().any(|m| covers(o, m)))
            .collect();
        if !kept.is_empty() {
            e["fieldsV1"] = to_fields_v1(&kept);
            list.push(e);
        }
    }
    list.push(json!({
        "manager": manager,
        "operation": operation,
        "apiVersion": obj["apiVersion"],
        "time": time,
        "fieldsType": "FieldsV1",
        "fieldsV1": to_fields_v1(&mine),
    }));
    obj["metadata"]["managedFields"] = json!(list);
}

fn entry_paths(obj: &Value, manager: &str, operation: &str) -> Vec<Path> {
    obj["metadata"]["managedFields"]
        .as_array()
        .and_then(|l| l.iter().find(|e| e["manager"] == manager && e["operation"] == operation))
        .map(|e| from_fields_v1(&e["fieldsV1"]))
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_manager(obj: Value, manager: &str, applied: &Value) -> Value {
        let mut o = obj;
        let before = o.clone();
        json_patch::merge(&mut o, applied);
        record(&mut o, &before, manager, Some(applied), "t");
        o
    }

    #[test]
    fn an_apply_changing_a_field_another_manager_owns_conflicts_unless_the_value_is_the_same() {
        let lease =
            json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease", "metadata": {"name": "l"}, "spec": {}});
        let a = json!({"spec": {"holderIdentity": "a", "renewTime": "1"}});
        let held = with_manager(lease, "lm-a", &a);
        let b = json!({"spec": {"holderIdentity": "b", "renewTime": "2"}});
        let c = conflicts(&held, "lm-b", &b);
        assert!(c.contains(&("lm-a".into(), ".spec.holderIdentity".into())), "{c:?}");
        assert!(conflicts(&held, "lm-b", &json!({"spec": {"holderIdentity": "a"}})).is_empty(), "same value: shared");
        assert!(conflicts(&held, "lm-a", &b).is_empty(), "a manager never conflicts with itself");
    }

    #[test]
    fn a_field_removed_by_an_update_leaves_its_owner() {
        let lease = json!({"apiVersion": "v1", "kind": "Lease", "metadata": {"name": "l"}, "spec": {}});
        let held = with_manager(lease, "lm-a", &json!({"spec": {"holderIdentity": "a"}}));
        let mut released = held.clone();
        released["spec"].as_object_mut().unwrap().remove("holderIdentity");
        record(&mut released, &held, "lm-b", None, "t");
        assert!(conflicts(&released, "lm-b", &json!({"spec": {"holderIdentity": "b"}})).is_empty());
    }
}
