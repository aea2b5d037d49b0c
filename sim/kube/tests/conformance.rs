//! kube-sim against the Kubernetes API documentation, one test per semantic, over raw HTTP.
//! Each test names the documentation section it follows (kubernetes.io/docs/reference/using-api/
//! api-concepts, the API conventions in kubernetes/community, and the CRD task pages).

#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers panic on setup failure by design

use std::time::Duration;

use futures::StreamExt;
use serde_json::{Value, json};

struct Http {
    base: String,
    c: reqwest::Client,
    _sim: kube_sim::RunningKubeSim,
}

impl Http {
    async fn start(history: usize) -> Self {
        let sim = kube_sim::start(kube_sim::Options { history, ..kube_sim::Options::default() }).await.unwrap();
        let h = Self { base: sim.url.clone(), c: reqwest::Client::new(), _sim: sim };
        let (code, _) = h
            .send("POST", "/apis/apiextensions.k8s.io/v1/customresourcedefinitions", "application/json", &widget_crd())
            .await;
        assert_eq!(code, 201);
        h
    }
    async fn send(&self, method: &str, path: &str, ct: &str, body: &Value) -> (u16, Value) {
        let m = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        let mut r = self.c.request(m, format!("{}{path}", self.base));
        if !body.is_null() {
            r = r.header("content-type", ct).body(body.to_string());
        }
        let resp = r.send().await.unwrap();
        let code = resp.status().as_u16();
        let text = resp.text().await.unwrap();
        (code, serde_json::from_str(&text).unwrap_or(Value::String(text)))
    }
    async fn get(&self, path: &str) -> (u16, Value) {
        self.send("GET", path, "", &Value::Null).await
    }
    async fn post(&self, path: &str, body: Value) -> (u16, Value) {
        self.send("POST", path, "application/json", &body).await
    }
    async fn put(&self, path: &str, body: Value) -> (u16, Value) {
        self.send("PUT", path, "application/json", &body).await
    }
    async fn patch(&self, path: &str, ct: &str, body: Value) -> (u16, Value) {
        self.send("PATCH", path, ct, &body).await
    }
    async fn delete(&self, path: &str) -> (u16, Value) {
        self.send("DELETE", path, "", &Value::Null).await
    }
    /// Reads a watch stream until `n` events arrived or the stream ended.
    async fn watch(&self, path: &str, n: usize) -> Vec<Value> {
        let resp = self.c.get(format!("{}{path}", self.base)).send().await.unwrap();
        let mut stream = resp.bytes_stream();
        let mut buf = Vec::new();
        let mut events = Vec::new();
        while events.len() < n {
            match tokio::time::timeout(Duration::from_secs(5), stream.next()).await {
                Ok(Some(Ok(chunk))) => {
                    buf.extend_from_slice(&chunk);
                    while let Some(pos) = buf.iter().position(|b| *b == b'\n') {
                        let line: Vec<u8> = buf.drain(..=pos).collect();
                        events.push(serde_json::from_slice(&line).unwrap());
                    }
                }
                _ => break,
            }
        }
        events
    }
}

const W: &str = "/apis/example.dev/v1/namespaces/default/widgets";

fn widget_crd() -> Value {
    json!({
        "apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
        "metadata": {"name": "widgets.example.dev"},
        "spec": {
            "group": "example.dev", "scope": "Namespaced",
            "names": {"plural": "widgets", "singular": "widget", "kind": "Widget", "shortNames": ["wd"], "categories": ["all"]},
            "versions": [{
                "name": "v1", "served": true, "storage": true,
                "subresources": {"status": {}},
                "additionalPrinterColumns": [
                    {"name": "Size", "type": "integer", "jsonPath": ".spec.size"},
                    {"name": "Ready", "type": "string", "jsonPath": ".status.conditions[?(@.type==\"Ready\")].status"},
                    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"}
                ],
                "schema": {"openAPIV3Schema": {"type": "object", "properties": {
                    "spec": {"type": "object", "required": ["size"],
                        "x-kubernetes-validations": [{"rule": "self.size <= self.limit", "message": "size must not exceed limit"}],
                        "properties": {
                            "size": {"type": "integer", "minimum": 1},
                            "limit": {"type": "integer", "default": 10},
                            "color": {"type": "string", "enum": ["red", "blue"]},
                            "code": {"type": "string", "pattern": "^[A-Z]{3}$"},
                            "owner": {"type": "string", "x-kubernetes-validations": [{"rule": "self == oldSelf", "message": "owner is immutable"}]},
                            "note": {"type": "string", "nullable": true},
                            "extra": {"type": "object", "x-kubernetes-preserve-unknown-fields": true}
                        }},
                    "status": {"type": "object", "properties": {
                        "phase": {"type": "string"},
                        "conditions": {"type": "array", "items": {"type": "object", "properties": {"type": {"type": "string"}, "status": {"type": "string"}}}}
                    }}
                }}}
            }]
        }
    })
}

fn widget(name: &str, size: i64) -> Value {
    json!({"apiVersion": "example.dev/v1", "kind": "Widget", "metadata": {"name": name, "labels": {"tier": "gpu"}}, "spec": {"size": size}})
}

/// Docs: API Concepts › "Discovery"; kubectl's OpenAPI v3 use (API Concepts › "OpenAPI").
#[tokio::test]
async fn discovery_and_openapi() {
    let h = Http::start(100).await;
    assert_eq!(h.get("/version").await.1["minor"], "35");
    assert_eq!(h.get("/api").await.1["versions"], json!(["v1"]));
    let apis = h.get("/apis").await.1;
    assert!(apis["groups"].as_array().unwrap().iter().any(|g| g["name"] == "example.dev"));
    let list = h.get("/apis/example.dev/v1").await.1;
    let names: Vec<&str> = list["resources"].as_array().unwrap().iter().map(|r| r["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["widgets", "widgets/status"]);
    assert_eq!(list["resources"][0]["shortNames"], json!(["wd"]));
    let core = h.get("/api/v1").await.1;
    assert!(core["resources"].as_array().unwrap().iter().any(|r| r["name"] == "configmaps" && r["namespaced"] == true));
    let root = h.get("/openapi/v3").await.1;
    let url = root["paths"]["apis/example.dev/v1"]["serverRelativeURL"].as_str().unwrap().to_owned();
    let doc = h.get(&url).await.1;
    assert!(doc["components"]["schemas"]["dev.example.v1.Widget"]["properties"]["spec"].is_object());
    assert_eq!(h.get("/apis/nope/v1").await.0, 404);
}

/// Docs: API Conventions › "Metadata" (name, generateName, uid, creationTimestamp,
/// resourceVersion, generation) and Object Names and IDs.
#[tokio::test]
async fn create_sets_server_metadata() {
    let h = Http::start(100).await;
    let (code, o) = h.post(W, widget("a", 2)).await;
    assert_eq!(code, 201);
    let m = &o["metadata"];
    assert_eq!(m["generation"], 1);
    assert_eq!(m["uid"].as_str().unwrap().len(), 36);
    assert!(m["resourceVersion"].as_str().unwrap().parse::<u64>().is_ok());
    assert!(chrono::DateTime::parse_from_rfc3339(m["creationTimestamp"].as_str().unwrap()).is_ok());
    assert_eq!(m["namespace"], "default");
    let mut g = widget("x", 1);
    g["metadata"] = json!({"generateName": "w-"});
    let (code, o) = h.post(W, g).await;
    assert_eq!(code, 201);
    let name = o["metadata"]["name"].as_str().unwrap();
    assert!(name.starts_with("w-") && name.len() == 7, "{name}");
    assert_eq!(h.post(W, widget("a", 2)).await.0, 409, "AlreadyExists");
    assert_eq!(h.post(W, widget("Bad_Name", 2)).await.0, 422);
    let (code, s) = h.post("/apis/example.dev/v1/namespaces/nowhere/widgets", widget("b", 1)).await;
    assert_eq!((code, s["message"].as_str().unwrap()), (404, "namespaces \"nowhere\" not found"));
}

/// Docs: Labels and Selectors › "API" (equality- and set-based); Field Selectors.
#[tokio::test]
async fn list_with_label_and_field_selectors() {
    let h = Http::start(100).await;
    for (n, tier) in [("a", "gpu"), ("b", "cpu"), ("c", "gpu")] {
        let mut w = widget(n, 1);
        w["metadata"]["labels"]["tier"] = json!(tier);
        h.post(W, w).await;
    }
    let names = |v: &Value| {
        v["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| i["metadata"]["name"].as_str().unwrap().to_owned())
            .collect::<Vec<_>>()
    };
    assert_eq!(names(&h.get(&format!("{W}?labelSelector=tier%3Dgpu")).await.1), ["a", "c"]);
    assert_eq!(names(&h.get(&format!("{W}?labelSelector=tier%20notin%20(gpu)")).await.1), ["b"]);
    assert_eq!(names(&h.get(&format!("{W}?fieldSelector=metadata.name%3Db")).await.1), ["b"]);
    let all = h.get("/apis/example.dev/v1/widgets").await.1;
    assert_eq!(all["kind"], "WidgetList");
    assert!(all["metadata"]["resourceVersion"].as_str().unwrap().parse::<u64>().unwrap() > 0);
    assert_eq!(h.get(&format!("{W}?fieldSelector=spec.size%3D1")).await.0, 400, "only metadata fields are selectable");
}

/// Docs: API Concepts › "Efficient detection of changes" (watch from a resourceVersion),
/// "Watch bookmarks", "Resource versions" (410 Gone) and timeoutSeconds.
#[tokio::test]
async fn watch_semantics() {
    let h = Http::start(4).await;
    let (_, a) = h.post(W, widget("a", 1)).await;
    let rv = a["metadata"]["resourceVersion"].as_str().unwrap().to_owned();
    h.patch(&format!("{W}/a"), "application/merge-patch+json", json!({"spec": {"size": 2}})).await;
    h.delete(&format!("{W}/a")).await;
    let evs = h.watch(&format!("{W}?watch=true&resourceVersion={rv}"), 2).await;
    let kinds: Vec<&str> = evs.iter().map(|e| e["type"].as_str().unwrap()).collect();
    assert_eq!(kinds, ["MODIFIED", "DELETED"], "events after the given resourceVersion");
    // Without a resourceVersion: the current state as ADDED, then live events.
    h.post(W, widget("b", 1)).await;
    let evs = h.watch(&format!("{W}?watch=true"), 1).await;
    assert_eq!((evs[0]["type"].as_str(), evs[0]["object"]["metadata"]["name"].as_str()), (Some("ADDED"), Some("b")));
    // Bookmarks when asked; the stream ends at timeoutSeconds.
    let evs =
        h.watch(&format!("{W}?watch=true&allowWatchBookmarks=true&timeoutSeconds=2&resourceVersion=999999"), 10).await;
    assert!(evs.iter().any(|e| e["type"] == "BOOKMARK"), "{evs:?}");
    // Streaming list: initial events end with the annotated bookmark.
    let evs = h
        .watch(
            &format!(
                "{W}?watch=true&sendInitialEvents=true&allowWatchBookmarks=true&resourceVersionMatch=NotOlderThan"
            ),
            2,
        )
        .await;
    assert_eq!(evs[1]["object"]["metadata"]["annotations"]["k8s.io/initial-events-end"], "true");
    // Too old: history holds 4 events here.
    for i in 0..6 {
        h.post(W, widget(&format!("n{i}"), 1)).await;
    }
    let evs = h.watch(&format!("{W}?watch=true&resourceVersion=2"), 1).await;
    assert_eq!((evs[0]["type"].as_str(), evs[0]["object"]["code"].as_u64()), (Some("ERROR"), Some(410)));
}

/// Docs: API Concepts › "Resource versions" and API Conventions › "Concurrency Control and
/// Consistency": an update with a stale resourceVersion is refused with 409 Conflict.
#[tokio::test]
async fn optimistic_concurrency() {
    let h = Http::start(100).await;
    let (_, a) = h.post(W, widget("a", 1)).await;
    let mut first = a.clone();
    first["spec"]["size"] = json!(2);
    assert_eq!(h.put(&format!("{W}/a"), first).await.0, 200);
    let mut stale = a.clone();
    stale["spec"]["size"] = json!(3);
    let (code, s) = h.put(&format!("{W}/a"), stale).await;
    assert_eq!((code, s["reason"].as_str()), (409, Some("Conflict")));
    let mut no_rv = a;
    no_rv["metadata"].as_object_mut().unwrap().remove("resourceVersion");
    assert_eq!(h.put(&format!("{W}/a"), no_rv).await.0, 422, "an update must carry a resourceVersion");
}

/// Docs: API Conventions › "Metadata" (generation increments on spec changes only) and
/// CRD › "Status subresource" (main endpoint ignores status, /status ignores all but status).
#[tokio::test]
async fn generation_and_status_subresource() {
    let h = Http::start(100).await;
    let mut w = widget("a", 1);
    w["status"] = json!({"phase": "Ignored"});
    let (_, a) = h.post(W, w).await;
    assert!(a.get("status").is_none(), "status on create is ignored");
    let (_, s) = h
        .patch(
            &format!("{W}/a/status"),
            "application/merge-patch+json",
            json!({"status": {"phase": "Ready"}, "spec": {"size": 5}}),
        )
        .await;
    assert_eq!(
        (s["status"]["phase"].as_str(), s["spec"]["size"].as_i64(), s["metadata"]["generation"].as_i64()),
        (Some("Ready"), Some(1), Some(1))
    );
    let (_, s) = h
        .patch(
            &format!("{W}/a"),
            "application/merge-patch+json",
            json!({"status": {"phase": "Hacked"}, "metadata": {"labels": {"x": "y"}}}),
        )
        .await;
    assert_eq!(
        (s["status"]["phase"].as_str(), s["metadata"]["generation"].as_i64()),
        (Some("Ready"), Some(1)),
        "labels do not bump generation"
    );
    let (_, s) = h.patch(&format!("{W}/a"), "application/merge-patch+json", json!({"spec": {"size": 3}})).await;
    assert_eq!(s["metadata"]["generation"], 2);
    let rv = s["metadata"]["resourceVersion"].clone();
    let (_, same) = h.patch(&format!("{W}/a"), "application/merge-patch+json", json!({"spec": {"size": 3}})).await;
    assert_eq!(same["metadata"]["resourceVersion"], rv, "a no-op write keeps the resourceVersion");
}

/// Docs: API Concepts › "Patch" (JSON merge, JSON patch) and "Server-Side Apply" (fieldManager,
/// managedFields, create-on-apply).
#[tokio::test]
async fn patches_and_server_side_apply() {
    let h = Http::start(100).await;
    h.post(W, widget("a", 1)).await;
    let (code, p) = h.patch(&format!("{W}/a"), "application/json-patch+json", json!([{"op": "replace", "path": "/spec/size", "value": 4}, {"op": "add", "path": "/spec/color", "value": "red"}])).await;
    assert_eq!((code, p["spec"]["size"].as_i64(), p["spec"]["color"].as_str()), (200, Some(4), Some("red")));
    let (code, _) = h
        .patch(
            &format!("{W}/a"),
            "application/json-patch+json",
            json!([{"op": "test", "path": "/spec/size", "value": 9}]),
        )
        .await;
    assert_eq!(code, 422, "a failed test op refuses the patch");
    let (code, p) = h.patch(&format!("{W}/a"), "application/merge-patch+json", json!({"spec": {"color": null}})).await;
    assert_eq!((code, p["spec"].get("color")), (200, None), "null deletes in a merge patch");
    let applied =
        json!({"apiVersion": "example.dev/v1", "kind": "Widget", "metadata": {"name": "b"}, "spec": {"size": 2}});
    assert_eq!(
        h.patch(&format!("{W}/b"), "application/apply-patch+yaml", applied.clone()).await.0,
        400,
        "fieldManager is required"
    );
    let (code, b) = h.patch(&format!("{W}/b?fieldManager=me"), "application/apply-patch+yaml", applied).await;
    assert_eq!(code, 201, "apply creates");
    let mf = &b["metadata"]["managedFields"][0];
    assert_eq!((mf["manager"].as_str(), mf["operation"].as_str()), (Some("me"), Some("Apply")));
    assert!(mf["fieldsV1"]["f:spec"]["f:size"].is_object());
    let (code, b) = h
        .patch(
            &format!("{W}/b?fieldManager=me"),
            "application/apply-patch+yaml",
            json!({"apiVersion": "example.dev/v1", "kind": "Widget", "metadata": {"name": "b"}, "spec": {"size": 3}}),
        )
        .await;
    assert_eq!((code, b["spec"]["size"].as_i64()), (200, Some(3)));
    // Applying the same configuration again (what a controller does every pass) changes nothing:
    // same resourceVersion, one Apply entry for the manager, no watch event.
    let rv = b["metadata"]["resourceVersion"].as_str().unwrap().to_owned();
    let config =
        json!({"apiVersion": "example.dev/v1", "kind": "Widget", "metadata": {"name": "b"}, "spec": {"size": 3}});
    let (_, again) = h.patch(&format!("{W}/b?fieldManager=me"), "application/apply-patch+yaml", config).await;
    assert_eq!(again["metadata"]["resourceVersion"], rv.as_str());
    let mine: Vec<&Value> =
        again["metadata"]["managedFields"].as_array().unwrap().iter().filter(|e| e["manager"] == "me").collect();
    assert_eq!(mine.len(), 1);
    assert_eq!(mine[0]["operation"], "Apply");
    let (_, same) = h
        .patch(&format!("{W}/b?fieldManager=kubectl"), "application/merge-patch+json", json!({"spec": {"size": 3}}))
        .await;
    assert_eq!(same["metadata"]["resourceVersion"], rv.as_str(), "a no-op patch with a fieldManager is still a no-op");
    assert!(
        h.watch(&format!("{W}?watch=true&resourceVersion={rv}&timeoutSeconds=1"), 1).await.is_empty(),
        "no event for no-op writes"
    );
    let (code, _) = h.patch(&format!("{W}/a"), "application/xml", json!({})).await;
    assert_eq!(code, 415);
}

/// Docs: Finalizers and API Concepts › "Deletion": an object with finalizers gets a
/// deletionTimestamp and stays until the last finalizer is removed, then DELETED is sent.
#[tokio::test]
async fn finalizers_hold_deletion() {
    let h = Http::start(100).await;
    let mut w = widget("a", 1);
    w["metadata"]["finalizers"] = json!(["example.dev/cleanup"]);
    let (_, a) = h.post(W, w).await;
    let rv = a["metadata"]["resourceVersion"].as_str().unwrap().to_owned();
    let (code, d) = h.delete(&format!("{W}/a")).await;
    assert_eq!(code, 200);
    assert!(d["metadata"]["deletionTimestamp"].is_string());
    assert_eq!(h.get(&format!("{W}/a")).await.0, 200, "still there while finalizers remain");
    let (code, _) = h
        .patch(
            &format!("{W}/a"),
            "application/merge-patch+json",
            json!({"metadata": {"finalizers": ["example.dev/cleanup", "new"]}}),
        )
        .await;
    assert_eq!(code, 422, "no new finalizers on an object being deleted");
    h.patch(&format!("{W}/a"), "application/merge-patch+json", json!({"metadata": {"finalizers": null}})).await;
    assert_eq!(h.get(&format!("{W}/a")).await.0, 404);
    let evs = h.watch(&format!("{W}?watch=true&resourceVersion={rv}"), 2).await;
    let kinds: Vec<&str> = evs.iter().map(|e| e["type"].as_str().unwrap()).collect();
    assert_eq!(kinds, ["MODIFIED", "DELETED"]);
}

/// Docs: Garbage Collection › "Owners and dependents" (background cascading deletion) and
/// "Orphaned dependents".
#[tokio::test]
async fn owner_references_are_garbage_collected() {
    let h = Http::start(100).await;
    let (_, owner) = h.post(W, widget("owner", 1)).await;
    let uid = owner["metadata"]["uid"].clone();
    let mut child = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "child", "ownerReferences": [{"apiVersion": "example.dev/v1", "kind": "Widget", "name": "owner", "uid": uid, "controller": true}]}});
    h.post("/api/v1/namespaces/default/configmaps", child.clone()).await;
    child["metadata"]["name"] = json!("kept");
    h.post("/api/v1/namespaces/default/configmaps", child).await;
    h.send("DELETE", "/api/v1/namespaces/default/configmaps/kept", "application/json", &Value::Null).await;
    h.delete(&format!("{W}/owner")).await;
    assert_eq!(h.get("/api/v1/namespaces/default/configmaps/child").await.0, 404, "dependent deleted with its owner");

    let (_, owner) = h.post(W, widget("owner2", 1)).await;
    let child = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "orphan", "ownerReferences": [{"apiVersion": "example.dev/v1", "kind": "Widget", "name": "owner2", "uid": owner["metadata"]["uid"]}]}});
    h.post("/api/v1/namespaces/default/configmaps", child).await;
    h.delete(&format!("{W}/owner2?propagationPolicy=Orphan")).await;
    let (code, o) = h.get("/api/v1/namespaces/default/configmaps/orphan").await;
    assert_eq!(code, 200);
    assert_eq!(o["metadata"]["ownerReferences"], json!([]), "orphaned, not deleted");
}

/// Docs: API Conventions › "Response Status Kind": failures carry a Status with reason, code,
/// details and causes.
#[tokio::test]
async fn error_bodies_are_status_objects() {
    let h = Http::start(100).await;
    let (code, s) = h.get(&format!("{W}/missing")).await;
    assert_eq!(code, 404);
    assert_eq!(
        s,
        json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": "widgets.example.dev \"missing\" not found", "reason": "NotFound",
        "details": {"name": "missing", "group": "example.dev", "kind": "widgets"}, "code": 404})
    );
    let (code, s) = h
        .post(
            W,
            json!({"apiVersion": "example.dev/v1", "kind": "Widget", "metadata": {"name": "v"}, "spec": {"size": 0}}),
        )
        .await;
    assert_eq!((code, s["reason"].as_str()), (422, Some("Invalid")));
    assert_eq!(
        s["message"],
        "Widget.example.dev \"v\" is invalid: spec.size: Invalid value: 0: spec.size in body should be greater than or equal to 1"
    );
    assert_eq!(
        s["details"]["causes"][0],
        json!({"reason": "FieldValueInvalid", "field": "spec.size", "message": "Invalid value: 0: spec.size in body should be greater than or equal to 1"})
    );
}

/// Docs: CRD › "Validation" (types, required, enum, pattern, nullable, preserve-unknown),
/// "Defaulting", "Pruning", and "Validation rules" incl. transition rules with oldSelf.
#[tokio::test]
async fn crd_schema_defaults_pruning_and_cel() {
    let h = Http::start(100).await;
    let mut w = widget("a", 2);
    w["spec"]["typo"] = json!(1);
    w["spec"]["extra"] = json!({"anything": {"goes": true}});
    w["spec"]["note"] = Value::Null;
    w["spec"]["owner"] = json!("alice");
    let (code, a) = h.post(W, w.clone()).await;
    assert_eq!(code, 201);
    assert_eq!(a["spec"]["limit"], 10, "default applied");
    assert!(a["spec"].get("typo").is_none(), "unknown field pruned");
    assert_eq!(a["spec"]["extra"]["anything"]["goes"], true, "preserved");
    assert!(a["spec"]["note"].is_null() && a["spec"].as_object().unwrap().contains_key("note"), "nullable keeps null");
    let mut strict = w.clone();
    strict["metadata"]["name"] = json!("s");
    let (code, s) = h.post(&format!("{W}?fieldValidation=Strict"), strict).await;
    assert_eq!(code, 400);
    assert!(s["message"].as_str().unwrap().contains("unknown field \"spec.typo\""), "{s}");
    for (patch, want) in [
        (
            json!({"spec": {"color": "green"}}),
            "spec.color: Unsupported value: \"green\": supported values: \"red\", \"blue\"",
        ),
        (json!({"spec": {"code": "abc"}}), "spec.code in body should match '^[A-Z]{3}$'"),
        (json!({"spec": {"size": "big"}}), "spec.size in body must be of type integer: \"string\""),
        (json!({"spec": {"size": 20}}), "spec: Invalid value: \"object\": size must not exceed limit"),
        (json!({"spec": {"owner": "mallory"}}), "spec.owner: Invalid value: \"string\": owner is immutable"),
    ] {
        let (code, s) = h.patch(&format!("{W}/a"), "application/merge-patch+json", patch.clone()).await;
        assert_eq!(code, 422, "{patch}");
        assert!(s["message"].as_str().unwrap().contains(want), "{patch}: {}", s["message"]);
    }
    let (code, s) = h
        .post(W, json!({"apiVersion": "example.dev/v1", "kind": "Widget", "metadata": {"name": "r"}, "spec": {}}))
        .await;
    assert_eq!(code, 422);
    assert!(s["message"].as_str().unwrap().contains("spec.size: Required value"));
}

/// Docs: API Concepts › "Receiving resources as Tables" with the CRD's additionalPrinterColumns.
#[tokio::test]
async fn table_output_from_printer_columns() {
    let h = Http::start(100).await;
    h.post(W, widget("a", 7)).await;
    h.patch(
        &format!("{W}/a/status"),
        "application/merge-patch+json",
        json!({"status": {"conditions": [{"type": "Ready", "status": "True"}]}}),
    )
    .await;
    let t =
        h.c.get(format!("{}{W}", h.base))
            .header("accept", "application/json;as=Table;v=v1;g=meta.k8s.io,application/json")
            .send()
            .await
            .unwrap()
            .json::<Value>()
            .await
            .unwrap();
    assert_eq!(t["kind"], "Table");
    let cols: Vec<&str> =
        t["columnDefinitions"].as_array().unwrap().iter().map(|c| c["name"].as_str().unwrap()).collect();
    assert_eq!(cols, ["Name", "Size", "Ready", "Age"]);
    let cells = &t["rows"][0]["cells"];
    assert_eq!((cells[0].as_str(), cells[1].as_i64(), cells[2].as_str()), (Some("a"), Some(7), Some("True")));
    assert!(cells[3].as_str().unwrap().ends_with('s'), "age is human-readable: {}", cells[3]);
    assert_eq!(t["rows"][0]["object"]["kind"], "PartialObjectMetadata");
}

/// Docs: CRD › "Delete a CustomResourceDefinition" (its objects go with it) and namespace deletion.
#[tokio::test]
async fn deleting_a_crd_or_namespace_removes_what_it_holds() {
    let h = Http::start(100).await;
    h.post("/api/v1/namespaces", json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "team"}})).await;
    h.post("/apis/example.dev/v1/namespaces/team/widgets", widget("a", 1)).await;
    h.post(
        "/api/v1/namespaces/team/configmaps",
        json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c"}}),
    )
    .await;
    h.delete("/api/v1/namespaces/team").await;
    assert_eq!(h.get("/api/v1/namespaces/team/configmaps/c").await.0, 404);
    h.post(W, widget("b", 1)).await;
    h.delete("/apis/apiextensions.k8s.io/v1/customresourcedefinitions/widgets.example.dev").await;
    assert_eq!(h.get(W).await.0, 404, "the resource is no longer served");
}

/// Docs: API Concepts › "Receiving resources as Tables" applies to watches too (kubectl get -w):
/// each event carries a one-row Table.
#[tokio::test]
async fn watch_as_table() {
    let h = Http::start(100).await;
    h.post(W, widget("a", 3)).await;
    let resp =
        h.c.get(format!("{}{W}?watch=true", h.base))
            .header("accept", "application/json;as=Table;v=v1;g=meta.k8s.io,application/json")
            .send()
            .await
            .unwrap();
    let mut stream = resp.bytes_stream();
    let chunk = tokio::time::timeout(Duration::from_secs(5), stream.next()).await.unwrap().unwrap().unwrap();
    let ev: Value = serde_json::from_slice(chunk.split(|b| *b == b'\n').next().unwrap()).unwrap();
    assert_eq!((ev["type"].as_str(), ev["object"]["kind"].as_str()), (Some("ADDED"), Some("Table")));
    assert_eq!(ev["object"]["rows"][0]["cells"][0], "a");
    assert_eq!(ev["object"]["rows"][0]["cells"][1], 3);
}

/// Docs: Field Selectors › "Supported fields" (Events by involvedObject; kubectl describe uses it)
/// and CRD › "Field selectors for custom resources" (selectableFields).
#[tokio::test]
async fn field_selectors_per_kind() {
    let h = Http::start(100).await;
    for (n, about) in [("e1", "widget-a"), ("e2", "widget-b")] {
        let ev = json!({"apiVersion": "v1", "kind": "Event", "metadata": {"name": n}, "involvedObject": {"kind": "Widget", "name": about}, "reason": "Created", "type": "Normal"});
        assert_eq!(h.post("/api/v1/namespaces/default/events", ev).await.0, 201);
    }
    let (code, l) = h.get("/api/v1/namespaces/default/events?fieldSelector=involvedObject.name%3Dwidget-b,involvedObject.kind%3DWidget").await;
    assert_eq!(code, 200);
    let names: Vec<&str> =
        l["items"].as_array().unwrap().iter().map(|i| i["metadata"]["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["e2"]);
    // A CRD opts fields in with selectableFields.
    let mut crd = widget_crd();
    crd["metadata"]["name"] = json!("gadgets.example.dev");
    crd["spec"]["names"] = json!({"plural": "gadgets", "singular": "gadget", "kind": "Gadget"});
    crd["spec"]["versions"][0]["selectableFields"] = json!([{"jsonPath": ".spec.color"}]);
    assert_eq!(h.post("/apis/apiextensions.k8s.io/v1/customresourcedefinitions", crd).await.0, 201);
    let g = "/apis/example.dev/v1/namespaces/default/gadgets";
    for (n, c) in [("g1", "red"), ("g2", "blue")] {
        h.post(g, json!({"apiVersion": "example.dev/v1", "kind": "Gadget", "metadata": {"name": n}, "spec": {"size": 1, "color": c}})).await;
    }
    let (_, l) = h.get(&format!("{g}?fieldSelector=spec.color%3Dblue")).await;
    assert_eq!(l["items"].as_array().unwrap().len(), 1);
    assert_eq!(h.get(&format!("{g}?fieldSelector=spec.size%3D1")).await.0, 400, "not declared selectable");
}

/// Docs: Server-Side Apply › "Merge strategy": a field the manager applied before and leaves out
/// of its next apply is removed (a controller that stops setting a status field clears it).
#[tokio::test]
async fn apply_removes_fields_the_manager_no_longer_sets() {
    let h = Http::start(100).await;
    h.post(W, widget("s", 1)).await;
    let status = |phase: Option<&str>| {
        let mut st = json!({"conditions": [{"type": "Ready", "status": "True"}]});
        if let Some(p) = phase {
            st["phase"] = json!(p);
        }
        json!({"apiVersion": "example.dev/v1", "kind": "Widget", "metadata": {"name": "s"}, "status": st})
    };
    let url = format!("{W}/s/status?fieldManager=op&force=true");
    let (code, o) = h.patch(&url, "application/apply-patch+yaml", status(Some("Running"))).await;
    assert_eq!((code, o["status"]["phase"].as_str()), (200, Some("Running")));
    let (_, o) = h.patch(&url, "application/apply-patch+yaml", status(None)).await;
    assert_eq!(o["status"].get("phase"), None, "dropped from the applied configuration, so removed");
    assert_eq!(o["status"]["conditions"][0]["type"], "Ready");
    assert_eq!(o["spec"]["size"], 1, "fields the manager never applied stay");
}

/// Docs: Server-Side Apply › Conflicts: an apply that changes a field another manager owns fails
/// with 409 naming the manager and the field, unless forced (the field then changes hands); the
/// same value is shared without conflict; a resourceVersion in the applied object is a precondition.
#[tokio::test]
async fn apply_conflicts_between_managers() {
    let h = Http::start(100).await;
    let body = |holder: &str| json!({"apiVersion": "example.dev/v1", "kind": "Widget", "metadata": {"name": "l"}, "spec": {"size": 1, "color": holder}});
    let apply = |who: &str, force: bool| format!("{W}/l?fieldManager={who}&force={force}");
    let (code, _) = h.patch(&apply("a", false), "application/apply-patch+yaml", body("red")).await;
    assert_eq!(code, 201);
    let (code, err) = h.patch(&apply("b", false), "application/apply-patch+yaml", body("blue")).await;
    assert_eq!(code, 409, "{err}");
    assert_eq!(err["reason"], "Conflict");
    assert_eq!(err["message"], "Apply failed with 1 conflict: conflict with \"a\": .spec.color");
    let (code, _) = h.patch(&apply("b", false), "application/apply-patch+yaml", body("red")).await;
    assert_eq!(code, 200, "the same value is shared");
    let (code, o) = h.patch(&apply("b", true), "application/apply-patch+yaml", body("blue")).await;
    assert_eq!((code, o["spec"]["color"].as_str()), (200, Some("blue")), "forced: the field changes hands");
    let (code, _) = h.patch(&apply("a", false), "application/apply-patch+yaml", body("red")).await;
    assert_eq!(code, 409, "now b owns it");
    let mut stale = body("blue");
    stale["metadata"]["resourceVersion"] = json!("1");
    let (code, err) = h.patch(&apply("b", true), "application/apply-patch+yaml", stale).await;
    assert_eq!(code, 409, "{err}");
    assert!(err["message"].as_str().unwrap().contains("the object has been modified"));
}

/// Docs: Event v1 (events.k8s.io) › the API server stores one Event resource served in both
/// groups: an event written through events.k8s.io/v1 is listed by `kubectl get events` (core/v1)
/// with involvedObject, reason, message and type.
#[tokio::test]
async fn events_written_through_events_k8s_io_show_in_core_v1() {
    let h = Http::start(100).await;
    let ev = json!({
        "apiVersion": "events.k8s.io/v1", "kind": "Event",
        "metadata": {"name": "w.1", "namespace": "default"},
        "eventTime": "2026-11-30T07:00:00.123456Z",
        "reportingController": "ep-operator", "reportingInstance": "ep-operator-0",
        "action": "Reconcile", "reason": "PodBound", "note": "pod 1 serves run r", "type": "Normal",
        "regarding": {"kind": "Widget", "name": "w", "namespace": "default", "apiVersion": "example.dev/v1"}
    });
    let (code, _) = h.post("/apis/events.k8s.io/v1/namespaces/default/events", ev).await;
    assert_eq!(code, 201);
    let (_, list) = h.get("/api/v1/namespaces/default/events?fieldSelector=involvedObject.name%3Dw").await;
    let items = list["items"].as_array().unwrap();
    assert_eq!(items.len(), 1, "{list}");
    let e = &items[0];
    assert_eq!(
        (e["reason"].as_str(), e["message"].as_str(), e["type"].as_str()),
        (Some("PodBound"), Some("pod 1 serves run r"), Some("Normal"))
    );
    assert_eq!(e["involvedObject"]["kind"], "Widget");
    assert_eq!(e["firstTimestamp"], "2026-11-30T07:00:00Z");
    assert_eq!(e["source"]["component"], "ep-operator");
}
