//! `Accept: application/json;as=Table;v=v1;g=meta.k8s.io`: rows from a CRD's printer columns.

use jsonpath_rust::JsonPath;
use serde_json::{Value, json};

use crate::registry::Resource;

/// Age as kubectl shows it (`45s`, `12m`, `3h`, `5d`).
pub fn human_age(rfc3339: &str) -> String {
    let Ok(t) = chrono::DateTime::parse_from_rfc3339(rfc3339) else { return "<invalid>".into() };
    let secs = (chrono::Utc::now() - t.with_timezone(&chrono::Utc)).num_seconds().max(0);
    match secs {
        s if s < 120 => format!("{s}s"),
        s if s < 3 * 3600 => format!("{}m", s / 60),
        s if s < 2 * 86_400 => format!("{}h", s / 3600),
        s => format!("{}d", s / 86_400),
    }
}

/// Evaluates a printer column's JSONPath (Kubernetes writes them without the leading `$`).
pub fn cell(obj: &Value, json_path: &str, ty: &str) -> Value {
    let path = format!("${json_path}");
    let found: Vec<&Value> = obj.query(&path).unwrap_or_default();
    let Some(v) = found.first() else { return Value::Null };
    match (ty, v) {
        ("date", Value::String(s)) => json!(human_age(s)),
        (_, v) => (*v).clone(),
    }
}

/// A `meta.k8s.io/v1` Table of `items`.
pub fn table(res: &Resource, items: &[Value], rv: &str) -> Value {
    let mut columns = vec![
        json!({"name": "Name", "type": "string", "format": "name", "description": "Name must be unique within a namespace.", "priority": 0}),
    ];
    let printer: Vec<Value> = if res.printer_columns.is_empty() {
        vec![json!({"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"})]
    } else {
        res.printer_columns.clone()
    };
    for c in &printer {
        columns.push(json!({
            "name": c["name"], "type": c["type"], "format": c.get("format").cloned().unwrap_or(json!("")),
            "description": c.get("description").cloned().unwrap_or(json!("")), "priority": c.get("priority").cloned().unwrap_or(json!(0)),
        }));
    }
    let rows: Vec<Value> = items
        .iter()
        .map(|o| {
            let mut cells = vec![o["metadata"]["name"].clone()];
            for c in &printer {
                cells.push(cell(o, c["jsonPath"].as_str().unwrap_or(""), c["type"].as_str().unwrap_or("string")));
            }
            json!({"cells": cells, "object": {"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1", "metadata": o["metadata"]}})
        })
        .collect();
    json!({"kind": "Table", "apiVersion": "meta.k8s.io/v1", "metadata": {"resourceVersion": rv}, "columnDefinitions": columns, "rows": rows})
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn printer_column_paths_evaluate_like_kubectl() {
        let o = json!({"status": {"phase": "Running", "results": {"f1": 0.9}, "conditions": [{"type": "Other", "status": "False"}, {"type": "Ready", "status": "True"}]}});
        assert_eq!(cell(&o, ".status.phase", "string"), json!("Running"));
        assert_eq!(cell(&o, ".status.results.f1", "number"), json!(0.9));
        assert_eq!(cell(&o, ".status.conditions[?(@.type==\"Ready\")].status", "string"), json!("True"));
        assert_eq!(cell(&o, ".status.missing", "string"), Value::Null);
        let five_min_ago = (chrono::Utc::now() - chrono::Duration::minutes(5)).to_rfc3339();
        assert_eq!(
            cell(&json!({"metadata": {"creationTimestamp": five_min_ago}}), ".metadata.creationTimestamp", "date"),
            json!("5m")
        );
    }
}
