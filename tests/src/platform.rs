//! What a platform's own tools see of the operator: Argo CD's health of an object (the chart's Lua
//! health scripts, run by Debian's lua5.1 as Argo CD runs them), the metrics the chart's alerts and
//! dashboard query, and the operator's /metrics read by prometheus-client's OpenMetrics parser.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::process::Command;

use serde_json::Value;

use crate::{HarnessError, tools, workspace_root};

/// Argo CD's verdict on an object.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Health {
    pub status: String,
    pub message: String,
}

/// The chart's health script for a kind.
pub fn health_script(kind: &str) -> PathBuf {
    workspace_root().join("charts/ep-operator/argocd").join(format!("{kind}.lua"))
}

/// Runs the chart's health script of the object's kind with the object as the global `obj`, as
/// Argo CD does (the script is a chunk that returns `hs`).
pub fn argocd_health(obj: &Value) -> Result<Health, HarnessError> {
    let kind = obj["kind"].as_str().ok_or_else(|| HarnessError::Setup("object without kind".into()))?;
    let script = health_script(kind);
    let program = format!(
        "obj = {}\nlocal hs = dofile({})\nio.write(tostring(hs.status), \"\\n\", tostring(hs.message or \"\"))\n",
        lua_literal(obj),
        lua_string(&script.display().to_string())
    );
    let out = Command::new("lua5.1")
        .args(["-e", &program])
        .output()
        .map_err(HarnessError::io("run lua5.1 (make deps installs it)"))?;
    if !out.status.success() {
        return Err(HarnessError::Setup(format!(
            "{} failed: {}",
            script.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (status, message) = text.split_once('\n').unwrap_or((&text, ""));
    Ok(Health { status: status.to_owned(), message: message.to_owned() })
}

/// A JSON value as a Lua table constructor (Argo CD hands scripts the object decoded the same way:
/// objects and arrays as tables, arrays indexed from 1).
fn lua_literal(v: &Value) -> String {
    match v {
        Value::Null => "nil".into(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => n.to_string(),
        Value::String(s) => lua_string(s),
        Value::Array(items) => format!("{{{}}}", items.iter().map(lua_literal).collect::<Vec<_>>().join(", ")),
        Value::Object(map) => format!(
            "{{{}}}",
            map.iter()
                .filter(|(_, v)| !v.is_null())
                .map(|(k, v)| format!("[{}] = {}", lua_string(k), lua_literal(v)))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

fn lua_string(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\{:03}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// The chart's PrometheusRule rendered by helm (release `ep` in `ep-system`, default thresholds):
/// its `spec`, which is a Prometheus rule file.
pub fn rendered_rules() -> Result<Value, HarnessError> {
    let chart = workspace_root().join("charts/ep-operator");
    let out = Command::new(tools::helm()?)
        .args(["template", "ep"])
        .arg(&chart)
        .args(["--namespace", "ep-system", "--set", "metrics.prometheusRule.enabled=true"])
        .args(["--show-only", "templates/prometheusrule.yaml"])
        .output()
        .map_err(HarnessError::io("run helm template"))?;
    if !out.status.success() {
        return Err(HarnessError::Setup(format!("helm template: {}", String::from_utf8_lossy(&out.stderr))));
    }
    let doc: Value = serde_saphyr::from_str(&String::from_utf8_lossy(&out.stdout))
        .map_err(|e| HarnessError::Setup(format!("the rendered PrometheusRule does not parse: {e}")))?;
    Ok(doc["spec"].clone())
}

/// The chart's Grafana dashboard.
pub fn dashboard() -> Result<Value, HarnessError> {
    let path = workspace_root().join("charts/ep-operator/files/dashboard.json");
    let text = std::fs::read_to_string(&path).map_err(HarnessError::io(format!("read {}", path.display())))?;
    serde_json::from_str(&text).map_err(|e| HarnessError::Setup(format!("{}: {e}", path.display())))
}

/// Every PromQL expression of the alerts and of the dashboard's panels and variables.
pub fn queries() -> Result<Vec<String>, HarnessError> {
    let mut out = Vec::new();
    for group in rendered_rules()?["groups"].as_array().into_iter().flatten() {
        for rule in group["rules"].as_array().into_iter().flatten() {
            out.extend(rule["expr"].as_str().map(str::to_owned));
        }
    }
    let d = dashboard()?;
    for panel in d["panels"].as_array().into_iter().flatten() {
        for t in panel["targets"].as_array().into_iter().flatten() {
            out.extend(t["expr"].as_str().map(str::to_owned));
        }
    }
    for var in d["templating"]["list"].as_array().into_iter().flatten() {
        out.extend(var["definition"].as_str().filter(|s| s.contains("ep_")).map(str::to_owned));
    }
    Ok(out)
}

/// The operator's metric names (`ep_...`) a set of queries use, as sample names
/// (`ep_reconciles_total`, `ep_runpod_call_duration_seconds_bucket`).
pub fn metric_names(queries: &[String]) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for q in queries {
        let bytes = q.as_bytes();
        let mut i = 0;
        while let Some(at) = q[i..].find("ep_").map(|p| p + i) {
            let boundary = at == 0 || !(bytes[at - 1].is_ascii_alphanumeric() || bytes[at - 1] == b'_');
            let end = q[at..].find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).map_or(q.len(), |e| at + e);
            if boundary {
                names.insert(q[at..end].to_owned());
            }
            i = end;
        }
    }
    names
}

/// One sample of an exposition.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

/// An OpenMetrics exposition parsed by prometheus-client's parser (strict: it refuses anything
/// that is not valid OpenMetrics, `# EOF` included): samples by sample name, and each family's
/// type by family name.
pub struct Exposition {
    pub samples: BTreeMap<String, Vec<Sample>>,
    pub types: BTreeMap<String, String>,
}

/// Parses the text with prometheus-client's OpenMetrics parser.
pub fn parse_openmetrics(text: &str) -> Result<Exposition, HarnessError> {
    const PROGRAM: &str = r#"
import json, sys
from prometheus_client.openmetrics.parser import text_string_to_metric_families
out = {"samples": {}, "types": {}}
for fam in text_string_to_metric_families(sys.stdin.read()):
    out["types"][fam.name] = fam.type
    for s in fam.samples:
        out["samples"].setdefault(s.name, []).append({"labels": s.labels, "value": s.value})
json.dump(out, sys.stdout)
"#;
    let mut child = Command::new(tools::python()?)
        .args(["-c", PROGRAM])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(HarnessError::io("run the OpenMetrics parser"))?;
    if let Some(mut stdin) = child.stdin.take() {
        use std::io::Write;
        stdin.write_all(text.as_bytes()).map_err(HarnessError::io("feed the OpenMetrics parser"))?;
    }
    let out = child.wait_with_output().map_err(HarnessError::io("run the OpenMetrics parser"))?;
    if !out.status.success() {
        return Err(HarnessError::Setup(format!(
            "the exposition is not valid OpenMetrics: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    let v: Value = serde_json::from_slice(&out.stdout).map_err(|e| HarnessError::Setup(e.to_string()))?;
    let samples = v["samples"]
        .as_object()
        .into_iter()
        .flatten()
        .map(|(name, list)| {
            let list = list
                .as_array()
                .into_iter()
                .flatten()
                .map(|s| Sample {
                    labels: s["labels"]
                        .as_object()
                        .into_iter()
                        .flatten()
                        .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_owned()))
                        .collect(),
                    value: s["value"].as_f64().unwrap_or(f64::NAN),
                })
                .collect();
            (name.clone(), list)
        })
        .collect();
    let types = v["types"]
        .as_object()
        .into_iter()
        .flatten()
        .map(|(k, t)| (k.clone(), t.as_str().unwrap_or_default().to_owned()))
        .collect();
    Ok(Exposition { samples, types })
}

impl Exposition {
    /// Whether a sample name (`ep_x_total`, `ep_y_bucket`) belongs to a family the operator
    /// declares, with the type the suffix implies.
    pub fn declares(&self, sample: &str) -> bool {
        let family = |suffix: &str, kinds: &[&str]| {
            sample.strip_suffix(suffix).and_then(|f| self.types.get(f)).is_some_and(|t| kinds.contains(&t.as_str()))
        };
        self.types.get(sample).is_some_and(|t| t == "gauge" || t == "unknown")
            || family("_total", &["counter"])
            || family("_bucket", &["histogram"])
            || family("_sum", &["histogram"])
            || family("_count", &["histogram"])
    }
}
