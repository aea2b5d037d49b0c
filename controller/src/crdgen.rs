//! CRD YAML generated from the Rust types in `ep-api` (the single source of truth for `crds/`).

/// Header of every generated file.
pub const HEADER: &str = "# Generated from the types in api/ by `make crds` (ep-operator crd). Do not edit.\n";

/// One `(file name, YAML)` per CRD, in the order `ep-operator crd` prints them.
pub fn crd_files() -> Result<Vec<(String, String)>, serde_saphyr::ser_error::Error> {
    ep_api::crds()
        .into_iter()
        .map(|crd| {
            let name = crd.metadata.name.clone().unwrap_or_default();
            Ok((format!("{name}.yaml"), format!("{HEADER}{}", serde_saphyr::to_string(&crd)?)))
        })
        .collect()
}

/// All CRDs as one multi-document YAML stream.
pub fn crd_stream() -> Result<String, serde_saphyr::ser_error::Error> {
    Ok(crd_files()?.into_iter().map(|(_, yaml)| yaml).collect::<Vec<_>>().join("---\n"))
}

/// The chart's values.schema.json (given as text) with its `settings` replaced by the settings
/// schema generated from the operator's types.
pub fn values_schema(existing: &str) -> Result<String, serde_json::Error> {
    let mut root: serde_json::Value = serde_json::from_str(existing)?;
    if let Some(props) = root.get_mut("properties").and_then(|p| p.as_object_mut()) {
        props.insert("settings".into(), crate::settings::Settings::json_schema());
    }
    Ok(serde_json::to_string_pretty(&root)? + "\n")
}

/// docs/api.md: the reference of every kind, generated from the CRD schemas (each field with its
/// type, default, description and validation, and the CEL rules with their messages).
pub fn api_reference() -> String {
    let mut out = String::from(
        "# API reference\n\n<!-- Generated from the CRD schemas by `make crds` (ep-operator api-reference); a test keeps it in sync. Do not edit. -->\n\n\
         Group `ep.dev`, version `v1alpha1`. `kubectl explain` shows the same fields; the examples in `examples/`\n\
         and the chart's `values.yaml` show them in use.\n",
    );
    for crd in ep_api::crds() {
        let names = &crd.spec.names;
        let Some(version) = crd.spec.versions.first() else { continue };
        let Some(schema) = version.schema.as_ref().and_then(|s| s.open_api_v3_schema.as_ref()) else { continue };
        let schema = serde_json::to_value(schema).unwrap_or_default();
        out.push_str(&format!("\n## {}\n\n", names.kind));
        out.push_str(&format!(
            "`{}` ({}; short names: {}). {}\n",
            crd.metadata.name.clone().unwrap_or_default(),
            if crd.spec.scope == "Cluster" { "cluster-scoped" } else { "namespaced" },
            names
                .short_names
                .clone()
                .unwrap_or_default()
                .iter()
                .map(|n| format!("`{n}`"))
                .collect::<Vec<_>>()
                .join(", "),
            schema["description"].as_str().unwrap_or_default()
        ));
        if let Some(cols) = &version.additional_printer_columns {
            out.push_str("\n`kubectl get` columns: ");
            out.push_str(
                &cols.iter().map(|c| format!("{} (`{}`)", c.name, c.json_path)).collect::<Vec<_>>().join(", "),
            );
            out.push_str(".\n");
        }
        for part in ["spec", "status"] {
            let Some(node) = schema["properties"].get(part) else { continue };
            out.push_str(&format!("\n### {} {part}\n\n", names.kind));
            rules(&mut out, part, node);
            out.push_str("| field | type | default | validation | description |\n| --- | --- | --- | --- | --- |\n");
            fields(&mut out, part, node);
        }
    }
    out
}

/// The CEL rules of a node, with their messages.
fn rules(out: &mut String, path: &str, node: &serde_json::Value) {
    for r in node["x-kubernetes-validations"].as_array().into_iter().flatten() {
        out.push_str(&format!(
            "- Rule on `{path}`: `{}`; refused with \"{}\"\n",
            r["rule"].as_str().unwrap_or_default(),
            r["message"].as_str().unwrap_or_default()
        ));
    }
    if node["x-kubernetes-validations"].as_array().is_some_and(|v| !v.is_empty()) {
        out.push('\n');
    }
}

fn fields(out: &mut String, path: &str, node: &serde_json::Value) {
    let required: Vec<&str> = node["required"].as_array().into_iter().flatten().filter_map(|v| v.as_str()).collect();
    for (name, child) in node["properties"].as_object().into_iter().flatten() {
        let here = format!("{path}.{name}");
        let mut checks = Vec::new();
        if required.contains(&name.as_str()) {
            checks.push("required".to_owned());
        }
        checks.extend(validation(child));
        for r in child["x-kubernetes-validations"].as_array().into_iter().flatten() {
            checks.push(format!(
                "`{}` (\"{}\")",
                r["rule"].as_str().unwrap_or_default(),
                r["message"].as_str().unwrap_or_default()
            ));
        }
        let default = child.get("default").map(|d| format!("`{d}`")).unwrap_or_default();
        out.push_str(&format!(
            "| `{here}` | {} | {default} | {} | {} |\n",
            type_of(child),
            cell(&checks.join("; ")),
            cell(child["description"].as_str().unwrap_or_default())
        ));
        let inner = if child["type"] == "array" { &child["items"] } else { child };
        let inner_path = if child["type"] == "array" { format!("{here}[]") } else { here.clone() };
        if inner["properties"].is_object() {
            fields(out, &inner_path, inner);
        } else if let Some(values) = inner.get("additionalProperties").filter(|v| v["properties"].is_object()) {
            fields(out, &format!("{inner_path}.<name>"), values);
        }
    }
}

fn type_of(node: &serde_json::Value) -> String {
    if node["x-kubernetes-int-or-string"] == true {
        return "int or string".into();
    }
    if node["x-kubernetes-preserve-unknown-fields"] == true && node["type"].is_null() {
        return "any".into();
    }
    match node["type"].as_str() {
        Some("array") => format!("[]{}", type_of(&node["items"])),
        Some("object") if node["additionalProperties"].is_object() => {
            format!("map[string]{}", type_of(&node["additionalProperties"]))
        }
        Some(t) => match node["format"].as_str() {
            Some(f) => format!("{t} ({f})"),
            None => t.to_owned(),
        },
        None if node["anyOf"].is_array() || node["oneOf"].is_array() => "one of several".into(),
        None => "any".into(),
    }
}

/// Enum, bounds, lengths and patterns of a node.
fn validation(node: &serde_json::Value) -> Vec<String> {
    let mut v = Vec::new();
    if let Some(e) = node["enum"].as_array() {
        v.push(format!(
            "one of {}",
            e.iter()
                .map(|x| format!("`{}`", x.as_str().map_or(x.to_string(), str::to_owned)))
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    for (key, word) in [
        ("minimum", ">="),
        ("maximum", "<="),
        ("exclusiveMinimum", ">"),
        ("exclusiveMaximum", "<"),
        ("minLength", "length >="),
        ("maxLength", "length <="),
        ("minItems", "items >="),
        ("maxItems", "items <="),
    ] {
        if let Some(x) = node.get(key).filter(|x| x.is_number()) {
            v.push(format!("{word} {x}"));
        }
    }
    if let Some(p) = node["pattern"].as_str() {
        v.push(format!("matches `{p}`"));
    }
    if node["nullable"] == true {
        v.push("nullable".into());
    }
    v
}

/// Text fit for a Markdown table cell.
fn cell(s: &str) -> String {
    s.replace('|', "\\|").replace('\n', " ")
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    /// `make crds` writes the settings schema into the chart; this fails when the types moved on.
    #[test]
    fn the_charts_settings_schema_is_the_one_the_types_generate() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../charts/ep-operator/values.schema.json");
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(super::values_schema(&text).unwrap() == text, "{} is stale: run `make crds`", path.display());
    }

    #[test]
    fn docs_api_md_is_the_reference_the_crds_generate() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/api.md");
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(super::api_reference() == text, "{} is stale: run `make crds`", path.display());
    }
}
