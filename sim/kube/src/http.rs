//! The HTTP face: discovery, OpenAPI, and the resource verbs at the real API server's paths.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use crate::admission;
use crate::auth::UserInfo;
use crate::errors::ApiError;
use crate::protobuf;
use crate::rbac::{self, Attributes};
use crate::registry::{Registry, Resource};
use crate::selectors::{FieldSelector, LabelSelector};
use crate::store::{State as Api, Via, WriteOptions};
use crate::table;

pub type Shared = Arc<Mutex<Api>>;

fn lock(s: &Shared) -> std::sync::MutexGuard<'_, Api> {
    s.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn json_response(code: StatusCode, v: &Value, warnings: &[String]) -> Response {
    let mut r = (code, [(header::CONTENT_TYPE, "application/json")], v.to_string()).into_response();
    for w in warnings {
        if let Ok(h) = header::HeaderValue::from_str(&format!("299 - \"{}\"", w.replace('"', "'"))) {
            r.headers_mut().append(header::WARNING, h);
        }
    }
    r
}

/// A request for a resource.
struct Target {
    res: Resource,
    namespace: Option<String>,
    name: Option<String>,
    sub: Option<String>,
    watch: bool,
}

fn parse_target(api: &Api, segs: &[&str]) -> Result<Option<Target>, ApiError> {
    let (group, version, rest) = match segs {
        ["api", v, rest @ ..] => ("", *v, rest),
        ["apis", g, v, rest @ ..] => (*g, *v, rest),
        _ => return Ok(None),
    };
    let (watch, rest) = match rest {
        ["watch", r @ ..] => (true, r),
        r => (false, r),
    };
    let find = |plural: &str| api.registry.get(group, version, plural).cloned();
    let not_found = || ApiError::not_found_path(&segs.join("/"));
    // `{plural}[/{name}[/{subresource}]]`, namespaced or not.
    let name_sub = |more: &[&str]| match more {
        [] => Ok((None, None)),
        [n] => Ok((Some((*n).to_owned()), None)),
        [n, s] => Ok((Some((*n).to_owned()), Some((*s).to_owned()))),
        _ => Err(not_found()),
    };
    let t = match rest {
        ["namespaces", ns, plural, more @ ..] if find(plural).is_some_and(|r| r.namespaced) => {
            let res = find(plural).ok_or_else(not_found)?;
            let (name, sub) = name_sub(more)?;
            Target { res, namespace: Some((*ns).to_owned()), name, sub, watch }
        }
        [plural, more @ ..] => {
            let res = find(plural).ok_or_else(not_found)?;
            let (name, sub) = name_sub(more)?;
            if res.namespaced && name.is_some() {
                return Err(not_found());
            }
            Target { res, namespace: None, name, sub, watch }
        }
        [] => return Ok(None),
    };
    if let Some(s) = &t.sub
        && !(s == "status" && t.res.status_subresource)
    {
        return Err(not_found());
    }
    Ok(Some(t))
}

fn wants_table(headers: &HeaderMap) -> bool {
    headers.get(header::ACCEPT).and_then(|v| v.to_str().ok()).is_some_and(|a| a.contains("as=Table"))
}

fn parse_body(headers: &HeaderMap, body: &Bytes) -> Result<Value, ApiError> {
    let ct = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("application/json");
    if ct.contains("protobuf") {
        return protobuf::decode(body);
    }
    if ct.contains("cbor") {
        return Err(ApiError {
            code: 415,
            reason: "UnsupportedMediaType",
            message: format!("kube-sim accepts JSON, YAML and protobuf bodies, not {ct}"),
            details: None,
        });
    }
    // JSON is YAML: a YAML body that parses as JSON (kube-rs's server-side apply) is read as JSON.
    if ct.contains("yaml") {
        if body.trim_ascii_start().starts_with(b"{")
            && let Ok(v) = serde_json::from_slice(body)
        {
            return Ok(v);
        }
        serde_saphyr::from_slice(body).map_err(|e| ApiError::bad_request(format!("error decoding YAML: {e}")))
    } else {
        serde_json::from_slice(body).map_err(|e| ApiError::bad_request(format!("error decoding JSON: {e}")))
    }
}

/// The RBAC verb of a resource request ("Authorization › Determine the request verb").
fn verb(method: &Method, t: &Target, q: &HashMap<String, String>) -> &'static str {
    let watching = t.watch || q.get("watch").is_some_and(|w| w == "true" || w == "1");
    match (method, &t.name) {
        (&Method::GET, _) if watching => "watch",
        (&Method::GET, None) => "list",
        (&Method::GET, Some(_)) => "get",
        (&Method::POST, _) => "create",
        (&Method::PUT, _) => "update",
        (&Method::PATCH, _) => "patch",
        (&Method::DELETE, None) => "deletecollection",
        (&Method::DELETE, Some(_)) => "delete",
        _ => "unknown",
    }
}

/// What RBAC is asked about a resource request. A list or watch of one object by
/// `fieldSelector=metadata.name=X` is authorized for that name, as the API server does.
fn attributes(method: &Method, t: &Target, q: &HashMap<String, String>) -> Attributes {
    let verb = verb(method, t, q);
    let by_field = q
        .get("fieldSelector")
        .and_then(|f| f.strip_prefix("metadata.name="))
        .filter(|n| !n.contains(',') && matches!(verb, "list" | "watch"));
    Attributes {
        verb: verb.into(),
        group: t.res.group.clone(),
        resource: t.res.plural.clone(),
        subresource: t.sub.clone().unwrap_or_default(),
        namespace: t.namespace.clone().unwrap_or_default(),
        name: t.name.clone().or_else(|| by_field.map(str::to_owned)).unwrap_or_default(),
        path: None,
    }
}

/// Records one resource request as the API server's audit log would: the user, the RBAC verb,
/// group, resource, subresource, namespace, name, the client's User-Agent and whether RBAC
/// allowed it (`authorization.k8s.io/decision`).
fn audit(state: &Shared, user: &UserInfo, a: &Attributes, t: &Target, headers: &HeaderMap, allowed: bool) {
    let mut api = lock(state);
    let Some(file) = api.audit.as_mut() else { return };
    let agent = headers.get(header::USER_AGENT).and_then(|v| v.to_str().ok()).unwrap_or("");
    let line = json!({
        "user": user.name, "verb": a.verb, "apiGroup": t.res.group, "resource": t.res.plural, "subresource": t.sub,
        "namespace": t.namespace, "name": t.name, "userAgent": agent,
        "decision": if allowed { "allow" } else { "forbid" },
    });
    let _ = std::io::Write::write_all(file, format!("{line}\n").as_bytes());
}

/// The request's user; health checks need none (as with anonymous access to the health endpoints).
fn authenticate(state: &Shared, method: &Method, segs: &[&str], headers: &HeaderMap) -> Result<UserInfo, ApiError> {
    let found = lock(state).auth.authenticate(headers);
    match found {
        Err(_) if method == Method::GET && matches!(segs, ["healthz" | "livez" | "readyz"]) => Ok(UserInfo::admin()),
        other => other,
    }
}

/// 403 unless RBAC allows the request (always allowed without a users file).
fn authorize(state: &Shared, user: &UserInfo, a: &Attributes) -> Result<(), ApiError> {
    let api = lock(state);
    if !api.auth.enforcing() || user.is_master() || api.policy(&a.namespace).allows(user, a) {
        return Ok(());
    }
    Err(rbac::forbidden(user, a))
}

/// SelfSubjectAccessReview, SelfSubjectRulesReview and SelfSubjectReview: answered for the
/// caller, returned with their status, never stored.
fn review(state: &Shared, user: &UserInfo, t: &Target, body: &Value) -> Result<Response, ApiError> {
    let mut out = body.clone();
    out["apiVersion"] = json!(t.res.api_version());
    out["kind"] = json!(t.res.kind);
    let api = lock(state);
    out["status"] = match t.res.kind.as_str() {
        "SelfSubjectAccessReview" => {
            let spec = &body["spec"];
            let s = |v: &Value| v.as_str().unwrap_or_default().to_owned();
            let a = if let Some(r) = spec.get("resourceAttributes").filter(|r| r.is_object()) {
                Attributes {
                    verb: s(&r["verb"]),
                    group: s(&r["group"]),
                    resource: s(&r["resource"]),
                    subresource: s(&r["subresource"]),
                    namespace: s(&r["namespace"]),
                    name: s(&r["name"]),
                    path: None,
                }
            } else if let Some(n) = spec.get("nonResourceAttributes").filter(|n| n.is_object()) {
                Attributes { verb: s(&n["verb"]), path: Some(s(&n["path"])), ..Attributes::default() }
            } else {
                return Err(ApiError::bad_request(
                    "spec: exactly one of resourceAttributes or nonResourceAttributes must be set".into(),
                ));
            };
            let allowed = !api.auth.enforcing() || api.policy(&a.namespace).allows(user, &a);
            if allowed { json!({"allowed": true, "reason": "RBAC: allowed"}) } else { json!({"allowed": false}) }
        }
        "SelfSubjectRulesReview" => {
            let ns = body.pointer("/spec/namespace").and_then(Value::as_str).unwrap_or_default();
            let viewer = if api.auth.enforcing() { user.clone() } else { UserInfo::admin() };
            rbac::rules_review(&api.policy(ns), &viewer, ns)
        }
        _ => json!({"userInfo": user.to_json()}),
    };
    Ok(json_response(StatusCode::CREATED, &out, &[]))
}

/// Every request goes through here.
pub async fn dispatch(
    State(state): State<Shared>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let query: HashMap<String, String> = uri.query().map(url_decode_pairs).unwrap_or_default();
    let path = uri.path().trim_matches('/').to_owned();
    let segs: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    match handle(&state, &method, &segs, &query, &headers, &body).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

fn url_decode_pairs(q: &str) -> HashMap<String, String> {
    q.split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (decode(k), decode(v))
        })
        .collect()
}

fn decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                if let Ok(b) = u8::from_str_radix(&s[i + 1..i + 3], 16) {
                    out.push(b);
                    i += 2;
                } else {
                    out.push(b'%');
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

async fn handle(
    state: &Shared,
    method: &Method,
    segs: &[&str],
    q: &HashMap<String, String>,
    headers: &HeaderMap,
    body: &Bytes,
) -> Result<Response, ApiError> {
    let ok = |v: Value| Ok(json_response(StatusCode::OK, &v, &[]));
    let user = authenticate(state, method, segs, headers)?;
    if !matches!(segs, ["api", _, _, ..] | ["apis", _, _, _, ..]) {
        authorize(
            state,
            &user,
            &Attributes {
                verb: method.as_str().to_ascii_lowercase(),
                path: Some(format!("/{}", segs.join("/"))),
                ..Attributes::default()
            },
        )?;
    }
    // Discovery and OpenAPI.
    match (method, segs) {
        (&Method::GET, ["version"]) => {
            return ok(
                json!({"major": "1", "minor": "35", "gitVersion": "v1.35.0-kube-sim", "gitCommit": "", "gitTreeState": "clean",
                             "buildDate": "2026-01-01T00:00:00Z", "goVersion": "n/a", "compiler": "rustc", "platform": "linux/amd64"}),
            );
        }
        (&Method::GET, ["healthz" | "livez" | "readyz"]) => return Ok("ok".into_response()),
        (&Method::GET, ["api"]) => return ok(Registry::core_versions()),
        (&Method::GET, ["apis"]) => return ok(lock(state).registry.groups()),
        (&Method::GET, ["api", v]) => {
            return lock(state)
                .registry
                .resource_list("", v)
                .map_or_else(|| Err(ApiError::not_found_path(&segs.join("/"))), ok);
        }
        (&Method::GET, ["apis", g]) => {
            let groups = lock(state).registry.groups();
            let found = groups["groups"].as_array().and_then(|gs| gs.iter().find(|x| x["name"] == *g).cloned());
            return found.map_or_else(
                || Err(ApiError::not_found_path(&segs.join("/"))),
                |mut g| {
                    g["kind"] = json!("APIGroup");
                    g["apiVersion"] = json!("v1");
                    ok(g)
                },
            );
        }
        (&Method::GET, ["apis", g, v]) => {
            return lock(state)
                .registry
                .resource_list(g, v)
                .map_or_else(|| Err(ApiError::not_found_path(&segs.join("/"))), ok);
        }
        (&Method::GET, ["openapi", "v3"]) => return ok(lock(state).registry.openapi_root()),
        (&Method::GET, ["openapi", "v3", "api", v]) => {
            return lock(state)
                .registry
                .openapi_doc("", v)
                .map_or_else(|| Err(ApiError::not_found_path(&segs.join("/"))), ok);
        }
        (&Method::GET, ["openapi", "v3", "apis", g, v]) => {
            return lock(state)
                .registry
                .openapi_doc(g, v)
                .map_or_else(|| Err(ApiError::not_found_path(&segs.join("/"))), ok);
        }
        _ => {}
    }
    let target = {
        let api = lock(state);
        parse_target(&api, segs)?
    };
    let Some(t) = target else { return Err(ApiError::not_found_path(&segs.join("/"))) };
    let attrs = attributes(method, &t, q);
    let decision = authorize(state, &user, &attrs);
    audit(state, &user, &attrs, &t, headers, decision.is_ok());
    decision?;
    if t.res.review {
        return match method {
            &Method::POST => review(state, &user, &t, &parse_body(headers, body)?),
            _ => Err(ApiError::method_not_allowed(&format!("{method} {}", segs.join("/")))),
        };
    }
    let ns = t.namespace.clone().unwrap_or_default();
    let opts = WriteOptions {
        field_manager: q.get("fieldManager").cloned(),
        field_validation: q.get("fieldValidation").cloned(),
        dry_run: q.get("dryRun").is_some_and(|d| d == "All"),
        applied: None,
        force: q.get("force").is_some_and(|f| f == "true"),
        user: Some(user.clone()),
        subresource: t.sub.clone().unwrap_or_default(),
    };
    let status_only = t.sub.is_some();
    match (method, &t.name) {
        (&Method::GET, None) if t.watch || q.get("watch").is_some_and(|w| w == "true" || w == "1") => {
            watch(state, &t, q, wants_table(headers))
        }
        (&Method::GET, None) => {
            let labels = LabelSelector::parse(q.get("labelSelector").map_or("", String::as_str))
                .map_err(ApiError::bad_request)?;
            let fields =
                FieldSelector::parse(q.get("fieldSelector").map_or("", String::as_str), &|f| t.res.selectable(f))
                    .map_err(ApiError::bad_request)?;
            let api = lock(state);
            let items: Vec<Value> = api
                .stored(&t.res, t.namespace.as_deref())
                .filter(|o| labels.matches(o) && fields.matches(o))
                .map(|o| crate::store::with_version(o, &t.res))
                .collect();
            let rv = api.rv.to_string();
            if wants_table(headers) {
                return ok(table::table(&t.res, &items, &rv));
            }
            ok(
                json!({"kind": format!("{}List", t.res.kind), "apiVersion": t.res.api_version(), "metadata": {"resourceVersion": rv}, "items": items}),
            )
        }
        (&Method::GET, Some(name)) => {
            let api = lock(state);
            let obj = api.get(&t.res, &ns, name)?;
            if wants_table(headers) {
                return ok(table::table(&t.res, &[obj], &api.rv.to_string()));
            }
            ok(obj)
        }
        (&Method::POST, None) => {
            let body = parse_body(headers, body)?;
            let mut api = lock(state);
            let w = api.create(&t.res, &ns, body, &opts)?;
            if !opts.dry_run {
                api.mirror_event(&t.res, &w.object);
            }
            Ok(json_response(StatusCode::CREATED, &w.object, &w.warnings))
        }
        (&Method::PUT, Some(name)) => {
            let body = parse_body(headers, body)?;
            let w = lock(state).update(&t.res, &ns, name, body, Via { status_only, require_rv: true }, &opts)?;
            Ok(json_response(StatusCode::OK, &w.object, &w.warnings))
        }
        (&Method::PATCH, Some(name)) => {
            let ct = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("").to_owned();
            let patch = parse_body(headers, body)?;
            let mut api = lock(state);
            let w = if ct.starts_with("application/apply-patch") {
                api.apply(&t.res, &ns, name, &patch, status_only, &opts)?
            } else {
                let mut current = api.get(&t.res, &ns, name)?;
                let stored_rv = current["metadata"]["resourceVersion"].clone();
                if ct.starts_with("application/json-patch+json") {
                    let ops: json_patch::Patch = serde_json::from_value(patch)
                        .map_err(|e| ApiError::bad_request(format!("invalid JSON patch: {e}")))?;
                    // As the API server's JSON patch does: testing a missing path for null succeeds
                    // (kube-runtime's finalizer helper relies on it to add the first finalizer).
                    let ops = json_patch::Patch(
                        ops.0
                            .into_iter()
                            .filter(|op| match op {
                                json_patch::PatchOperation::Test(t) => {
                                    !(t.value.is_null() && current.pointer(t.path.as_str()).is_none())
                                }
                                _ => true,
                            })
                            .collect(),
                    );
                    json_patch::patch(&mut current, &ops).map_err(|e| ApiError {
                        code: 422,
                        reason: "Invalid",
                        message: format!("the server rejected our request due to an error in our request: {e}"),
                        details: None,
                    })?;
                } else if ct.starts_with("application/merge-patch+json")
                    || ct.starts_with("application/strategic-merge-patch+json")
                {
                    // Strategic merge is served with JSON merge semantics (lists replaced whole).
                    json_patch::merge(&mut current, &patch);
                } else {
                    return Err(ApiError::unsupported_media(&ct));
                }
                // A resourceVersion in the patch is a precondition; otherwise the patch applies to the latest.
                if current["metadata"]["resourceVersion"].is_null()
                    || current["metadata"]["resourceVersion"] == stored_rv
                {
                    current["metadata"]["resourceVersion"] = stored_rv;
                }
                api.update(&t.res, &ns, name, current, Via { status_only, require_rv: false }, &opts)?
            };
            if !opts.dry_run {
                api.mirror_event(&t.res, &w.object);
            }
            let code = if w.created { StatusCode::CREATED } else { StatusCode::OK };
            Ok(json_response(code, &w.object, &w.warnings))
        }
        (&Method::DELETE, Some(name)) => {
            let body_opts: Value =
                if body.is_empty() { json!({}) } else { serde_json::from_slice(body).unwrap_or_else(|_| json!({})) };
            let propagation = q
                .get("propagationPolicy")
                .cloned()
                .or_else(|| body_opts["propagationPolicy"].as_str().map(str::to_owned));
            let pre_rv = body_opts.pointer("/preconditions/resourceVersion").and_then(Value::as_str).map(str::to_owned);
            let mut api = lock(state);
            let old = api.get(&t.res, &ns, name)?;
            let req = admission::Request {
                operation: "DELETE",
                user: &user,
                res: &t.res,
                subresource: "",
                namespace: &ns,
                name,
                dry_run: opts.dry_run,
            };
            admission::validate(&api, &req, None, Some(&old))?;
            let dry_run = opts.dry_run || body_opts["dryRun"].as_array().is_some_and(|d| d.iter().any(|x| x == "All"));
            if dry_run {
                // Checked as a delete would be, and nothing changes.
                if pre_rv.as_deref().is_some_and(|rv| old["metadata"]["resourceVersion"] != rv) {
                    return Err(ApiError::conflict(&t.res, name));
                }
                return ok(old);
            }
            let obj = api.delete(&t.res, &ns, name, propagation.as_deref(), pre_rv.as_deref())?;
            ok(obj)
        }
        (&Method::DELETE, None) => {
            let labels = LabelSelector::parse(q.get("labelSelector").map_or("", String::as_str))
                .map_err(ApiError::bad_request)?;
            let mut api = lock(state);
            let items: Vec<Value> =
                api.list(&t.res, t.namespace.as_deref()).into_iter().filter(|o| labels.matches(o)).collect();
            let mut deleted = Vec::new();
            for o in items {
                let name = o["metadata"]["name"].as_str().unwrap_or("").to_owned();
                let onm = o["metadata"]["namespace"].as_str().unwrap_or("").to_owned();
                deleted.push(api.delete(&t.res, &onm, &name, None, None)?);
            }
            ok(
                json!({"kind": format!("{}List", t.res.kind), "apiVersion": t.res.api_version(), "metadata": {}, "items": deleted}),
            )
        }
        _ => Err(ApiError::method_not_allowed(&format!("{method} {}", segs.join("/")))),
    }
}

/// A watch: replays history after `resourceVersion` (or the current state when none is given),
/// then streams live events as newline-delimited JSON until `timeoutSeconds`.
fn watch(state: &Shared, t: &Target, q: &HashMap<String, String>, as_table: bool) -> Result<Response, ApiError> {
    let labels =
        LabelSelector::parse(q.get("labelSelector").map_or("", String::as_str)).map_err(ApiError::bad_request)?;
    let fields = FieldSelector::parse(q.get("fieldSelector").map_or("", String::as_str), &|f| t.res.selectable(f))
        .map_err(ApiError::bad_request)?;
    let bookmarks = q.get("allowWatchBookmarks").is_some_and(|b| b == "true");
    let timeout = q
        .get("timeoutSeconds")
        .and_then(|s| s.parse::<u64>().ok())
        .map_or(Duration::from_secs(1800), Duration::from_secs);
    // Streaming lists: the current state as ADDED events, then a bookmark marking their end.
    let send_initial = q.get("sendInitialEvents").is_some_and(|b| b == "true");
    let from =
        q.get("resourceVersion").filter(|rv| !rv.is_empty() && *rv != "0" && !send_initial).map(|rv| rv.parse::<u64>());
    let res = t.res.clone();
    let namespace = t.namespace.clone();
    let matches = move |ev_key: &crate::store::Key, obj: &Value| {
        ev_key.group == res.group
            && ev_key.plural == res.plural
            && namespace.as_ref().is_none_or(|ns| *ns == ev_key.namespace)
            && labels.matches(obj)
            && fields.matches(obj)
    };
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(256);
    // A watch that asks for Tables (kubectl get -w) gets each object as a one-row Table.
    let table_res = t.res.clone();
    // Each line is written straight from the stored object: no copy of it per watcher.
    let line = move |kind: &str, obj: &Value| {
        let mut out = Vec::with_capacity(1024);
        out.extend_from_slice(b"{\"type\":\"");
        out.extend_from_slice(kind.as_bytes());
        out.extend_from_slice(b"\",\"object\":");
        let written = if as_table && kind != "ERROR" && kind != "BOOKMARK" {
            let rv = obj["metadata"]["resourceVersion"].as_str().unwrap_or("").to_owned();
            serde_json::to_writer(&mut out, &table::table(&table_res, std::slice::from_ref(obj), &rv))
        } else {
            serde_json::to_writer(&mut out, obj)
        };
        if written.is_err() {
            tracing::error!(kind, "a watch event could not be serialised");
        }
        out.extend_from_slice(b"}\n");
        Bytes::from(out)
    };
    let (mut initial, mut live, mut last_rv) = {
        let api = lock(state);
        let live = api.tx.subscribe();
        let mut initial = Vec::new();
        let last_rv;
        match from {
            Some(Err(_)) => return Err(ApiError::bad_request("resourceVersion: invalid value".into())),
            Some(Ok(rv)) => {
                if rv < api.oldest_resumable() {
                    let gone = ApiError::gone(format!("too old resource version: {rv} ({})", api.oldest_resumable()));
                    initial.push(line("ERROR", &gone.status()));
                    let body = Body::from(initial.concat());
                    return Ok((StatusCode::OK, [(header::CONTENT_TYPE, "application/json")], body).into_response());
                }
                for e in api.history.iter().filter(|e| e.rv > rv && matches(&e.key, &e.object)) {
                    initial.push(line(e.kind, &crate::store::at_version(&e.object, &t.res)));
                }
                last_rv = api.rv;
            }
            None => {
                for o in api.stored(&t.res, t.namespace.as_deref()) {
                    let key = Api::key(
                        &t.res,
                        o["metadata"]["namespace"].as_str().unwrap_or(""),
                        o["metadata"]["name"].as_str().unwrap_or(""),
                    );
                    if matches(&key, o) {
                        initial.push(line("ADDED", &crate::store::at_version(o, &t.res)));
                    }
                }
                last_rv = api.rv;
                if send_initial {
                    let end = json!({"kind": t.res.kind, "apiVersion": t.res.api_version(),
                                     "metadata": {"resourceVersion": last_rv.to_string(), "annotations": {"k8s.io/initial-events-end": "true"}}});
                    initial.push(line("BOOKMARK", &end));
                }
            }
        }
        (initial, live, last_rv)
    };
    let res = t.res.clone();
    tokio::spawn(async move {
        for l in initial.drain(..) {
            if tx.send(l).await.is_err() {
                return;
            }
        }
        let deadline = tokio::time::Instant::now() + timeout;
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tokio::select! {
                _ = tokio::time::sleep_until(deadline) => return,
                _ = tick.tick(), if bookmarks => {
                    let bm = json!({"kind": res.kind, "apiVersion": res.api_version(), "metadata": {"resourceVersion": last_rv.to_string()}});
                    if tx.send(line("BOOKMARK", &bm)).await.is_err() { return; }
                }
                ev = live.recv() => match ev {
                    Ok(e) => {
                        if e.rv <= last_rv { continue; }
                        last_rv = e.rv;
                        if matches(&e.key, &e.object) && tx.send(line(e.kind, &crate::store::at_version(&e.object, &res))).await.is_err() {
                            return;
                        }
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                        let gone = ApiError::gone("watch fell behind; list again".into());
                        let _ = tx.send(line("ERROR", &gone.status())).await;
                        return;
                    }
                    Err(_) => return,
                }
            }
        }
    });
    let stream = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|b| (Ok::<_, std::convert::Infallible>(b), rx))
    });
    Ok((StatusCode::OK, [(header::CONTENT_TYPE, "application/json")], Body::from_stream(stream)).into_response())
}
