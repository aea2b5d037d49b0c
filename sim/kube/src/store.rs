//! Objects, resource versions and the event history watches replay from.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::Arc;

use serde_json::{Value, json};
use tokio::sync::broadcast;

use crate::auth::{Authenticator, UserInfo};
use crate::errors::ApiError;
use crate::registry::{Registry, Resource};
use crate::{admission, builtin, rbac, validate};

/// Where an object lives.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Key {
    pub group: String,
    pub plural: String,
    /// Empty for cluster-scoped objects.
    pub namespace: String,
    pub name: String,
}

/// A change, as watches deliver it.
#[derive(Clone, Debug)]
pub struct Event {
    pub rv: u64,
    /// ADDED, MODIFIED or DELETED.
    pub kind: &'static str,
    pub key: Key,
    pub object: Value,
}

/// How many past events a watch can resume from; older resource versions get 410 Gone.
pub const HISTORY: usize = 10_000;

/// The whole API state.
pub struct State {
    pub registry: Registry,
    pub objects: BTreeMap<Key, Value>,
    pub rv: u64,
    pub history: VecDeque<Arc<Event>>,
    pub tx: broadcast::Sender<Arc<Event>>,
    history_cap: usize,
    /// Where every resource request is recorded as one JSON line (see `Options::audit_log`).
    pub audit: Option<std::fs::File>,
    /// Who may call (see `Options::users`); everyone is an administrator without a users file.
    pub auth: Authenticator,
    /// Set while the ClusterRole aggregation writes the aggregated roles.
    aggregating: bool,
    /// Every stored object's key by uid, and the dependents of each owner uid: garbage collection
    /// looks up an owner's dependents instead of walking every object (events included) per delete.
    uids: HashMap<String, Key>,
    dependents: HashMap<String, BTreeSet<Key>>,
}

/// Request options that shape a write.
#[derive(Clone, Debug, Default)]
pub struct WriteOptions {
    pub field_manager: Option<String>,
    /// Strict, Warn or Ignore.
    pub field_validation: Option<String>,
    pub dry_run: bool,
    /// The configuration a server-side apply sent: recorded as an `Apply` entry owning its fields.
    pub applied: Option<Value>,
    /// A server-side apply takes fields other managers own instead of failing with a conflict.
    pub force: bool,
    /// Who writes: admission policies run for requests from users (never for kube-sim's own writes).
    pub user: Option<UserInfo>,
    /// The subresource written (`status`), as admission matches it.
    pub subresource: String,
}

/// How an update arrived.
#[derive(Clone, Copy, Debug)]
pub struct Via {
    /// Through the /status subresource: only status changes.
    pub status_only: bool,
    /// A PUT must carry the resourceVersion it read; a patch applies to the latest.
    pub require_rv: bool,
}

/// The result of a write: the object and warnings for the client.
pub struct Written {
    pub object: Value,
    pub warnings: Vec<String>,
    pub created: bool,
}

fn now() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

fn uid() -> String {
    let h = |n: usize| (0..n).map(|_| char::from(b"0123456789abcdef"[fastrand::usize(..16)])).collect::<String>();
    format!("{}-{}-4{}-{}-{}", h(8), h(4), h(3), h(4), h(12))
}

/// Why `name` is not a valid path segment name (the rule for RBAC object names), if it is not.
fn path_segment_problem(name: &str) -> Option<String> {
    if name == "." || name == ".." {
        return Some(format!("may not be '{name}'"));
    }
    ["/", "%"].iter().find(|c| name.contains(**c)).map(|c| format!("may not contain '{c}'"))
}

fn dns_subdomain(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        && s.as_bytes().first().is_some_and(u8::is_ascii_alphanumeric)
        && s.as_bytes().last().is_some_and(u8::is_ascii_alphanumeric)
}

/// Everything outside metadata and status: a change there bumps `metadata.generation`.
fn spec_part(obj: &Value) -> Value {
    let mut v = obj.clone();
    if let Some(m) = v.as_object_mut() {
        m.remove("metadata");
        m.remove("status");
        m.remove("apiVersion");
        m.remove("kind");
    }
    v
}

fn finalizers(obj: &Value) -> Vec<String> {
    obj.pointer("/metadata/finalizers")
        .and_then(Value::as_array)
        .map(|a| a.iter().filter_map(|v| v.as_str().map(str::to_owned)).collect())
        .unwrap_or_default()
}

/// managedFields' `fieldsV1` for the fields of `v` (maps field by field, lists whole).
fn fields_v1(v: &Value) -> Value {
    match v {
        Value::Object(m) => Value::Object(
            m.iter()
                .filter(|(k, _)| !matches!(k.as_str(), "apiVersion" | "kind"))
                .map(|(k, v)| (format!("f:{k}"), if v.is_object() { fields_v1(v) } else { json!({}) }))
                .collect(),
        ),
        _ => json!({}),
    }
}

/// The core/v1 view of an events.k8s.io/v1 Event (the API server stores both as one resource).
fn core_event(ev: &Value) -> Value {
    let time = ev["eventTime"].as_str().map(|t| {
        // core/v1 timestamps have whole seconds.
        let secs = t.split('.').next().unwrap_or(t).trim_end_matches('Z');
        json!(format!("{secs}Z"))
    });
    let last = ev.pointer("/series/lastObservedTime").cloned().or_else(|| time.clone()).unwrap_or(Value::Null);
    let count = ev.pointer("/series/count").and_then(Value::as_i64).unwrap_or(1);
    json!({
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": {"name": ev["metadata"]["name"], "namespace": ev["metadata"]["namespace"]},
        "involvedObject": ev["regarding"],
        "related": ev["related"],
        "reason": ev["reason"],
        "message": ev["note"],
        "type": ev["type"],
        "action": ev["action"],
        "eventTime": ev["eventTime"],
        "firstTimestamp": time.unwrap_or(Value::Null),
        "lastTimestamp": last,
        "count": count,
        "source": {"component": ev["reportingController"]},
        "reportingComponent": ev["reportingController"],
        "reportingInstance": ev["reportingInstance"],
    })
}

/// Removes from `obj` every field owned in `before` (a fieldsV1 set) that `now` no longer owns.
fn prune_unapplied(obj: &mut Value, before: &Value, now: &Value) {
    let (Some(before), Some(target)) = (before.as_object(), obj.as_object_mut()) else { return };
    for (k, sub) in before {
        let Some(field) = k.strip_prefix("f:") else { continue };
        if field == "metadata" {
            continue;
        }
        match now.get(k) {
            None => {
                target.remove(field);
            }
            Some(now_sub) => {
                if let Some(child) = target.get_mut(field) {
                    prune_unapplied(child, sub, now_sub);
                }
            }
        }
    }
}

impl State {
    pub fn new(history_cap: usize) -> Self {
        let (tx, _) = broadcast::channel(4096);
        let mut s = Self {
            registry: Registry::with_builtins(),
            objects: BTreeMap::new(),
            rv: 1,
            history: VecDeque::new(),
            tx,
            history_cap,
            audit: None,
            auth: Authenticator::default(),
            aggregating: false,
            uids: HashMap::new(),
            dependents: HashMap::new(),
        };
        for ns in ["default", "kube-system", "kube-public"] {
            let body = json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}});
            if let Some(res) = s.registry.get("", "v1", "namespaces").cloned() {
                let _ = s.create(&res, "", body, &WriteOptions::default());
            }
        }
        for (plural, body) in rbac::bootstrap() {
            if let Some(res) = s.registry.get(rbac::GROUP, "v1", plural).cloned()
                && let Err(e) = s.create(&res, "", body, &WriteOptions::default())
            {
                // A bootstrap role that cannot be stored is a kube-sim bug: say so loudly.
                tracing::error!(plural, error = %e.message, "bootstrap RBAC object refused");
            }
        }
        s
    }

    /// The RBAC objects that decide a request in `namespace` (cluster-wide ones always).
    pub fn policy(&self, namespace: &str) -> rbac::Policy<'_> {
        // Keys sort by group, plural, namespace: each list is one range of the map.
        let list = |plural: &str, ns: Option<&str>| {
            let start = Key {
                group: rbac::GROUP.into(),
                plural: plural.into(),
                namespace: ns.unwrap_or_default().into(),
                name: String::new(),
            };
            self.objects
                .range(start..)
                .take_while(|(k, _)| {
                    k.group == rbac::GROUP && k.plural == plural && ns.is_none_or(|n| k.namespace == n)
                })
                .map(|(_, o)| std::borrow::Cow::Borrowed(o))
                .collect::<Vec<_>>()
        };
        let ns = (!namespace.is_empty()).then_some(namespace);
        rbac::Policy {
            cluster_roles: list("clusterroles", None),
            cluster_role_bindings: list("clusterrolebindings", None),
            roles: ns.map(|n| list("roles", Some(n))).unwrap_or_default(),
            role_bindings: ns.map(|n| list("rolebindings", Some(n))).unwrap_or_default(),
        }
    }

    /// Oldest resource version a watch can still resume from.
    pub fn oldest_resumable(&self) -> u64 {
        self.history.front().map_or(self.rv, |e| e.rv.saturating_sub(1))
    }

    fn emit(&mut self, kind: &'static str, key: Key, object: Value) {
        let roles_changed = key.group == rbac::GROUP && key.plural == "clusterroles";
        let e = Arc::new(Event { rv: self.rv, kind, key, object });
        self.history.push_back(e.clone());
        while self.history.len() > self.history_cap {
            self.history.pop_front();
        }
        let _ = self.tx.send(e);
        if roles_changed && !self.aggregating {
            self.aggregate_cluster_roles();
        }
    }

    /// The ClusterRole aggregation controller: every ClusterRole with an `aggregationRule` holds
    /// the rules of the ClusterRoles its selectors pick, rewritten whenever a ClusterRole changes
    /// (so `kubectl get clusterrole edit -o yaml` shows what `edit` grants).
    fn aggregate_cluster_roles(&mut self) {
        self.aggregating = true;
        let changed: Vec<(Key, Value)> = {
            let policy = self.policy("");
            policy
                .cluster_roles
                .iter()
                .filter(|r| r.get("aggregationRule").is_some())
                .filter_map(|role| {
                    let rules = Value::from(policy.cluster_role_rules(role, 0));
                    if role["rules"] == rules {
                        return None;
                    }
                    let key = Key {
                        group: rbac::GROUP.into(),
                        plural: "clusterroles".into(),
                        namespace: String::new(),
                        name: role["metadata"]["name"].as_str().unwrap_or_default().to_owned(),
                    };
                    let mut o = role.clone().into_owned();
                    o["rules"] = rules;
                    Some((key, o))
                })
                .collect()
        };
        for (key, mut o) in changed {
            let rv = self.next_rv();
            o["metadata"]["resourceVersion"] = json!(rv.to_string());
            self.put(key.clone(), o.clone());
            self.emit("MODIFIED", key, o);
        }
        self.aggregating = false;
    }

    fn next_rv(&mut self) -> u64 {
        self.rv += 1;
        self.rv
    }

    /// Stores `obj` at `key`, keeping the uid and owner indexes.
    fn put(&mut self, key: Key, obj: Value) {
        if let Some(old) = self.objects.remove(&key) {
            self.unindex(&key, &old);
        }
        if let Some(uid) = obj["metadata"]["uid"].as_str() {
            self.uids.insert(uid.to_owned(), key.clone());
        }
        for owner in owner_uids(&obj) {
            self.dependents.entry(owner.to_owned()).or_default().insert(key.clone());
        }
        self.objects.insert(key, obj);
    }

    /// Removes the object at `key` from the store and the indexes.
    fn take(&mut self, key: &Key) -> Option<Value> {
        let old = self.objects.remove(key)?;
        self.unindex(key, &old);
        Some(old)
    }

    fn unindex(&mut self, key: &Key, old: &Value) {
        if let Some(uid) = old["metadata"]["uid"].as_str()
            && self.uids.get(uid) == Some(key)
        {
            self.uids.remove(uid);
        }
        for owner in owner_uids(old) {
            if let Some(set) = self.dependents.get_mut(owner) {
                set.remove(key);
                if set.is_empty() {
                    self.dependents.remove(owner);
                }
            }
        }
    }

    /// The keys of objects owned by `owner_uid`.
    fn dependents_of(&self, owner_uid: &str) -> Vec<Key> {
        self.dependents.get(owner_uid).map(|s| s.iter().cloned().collect()).unwrap_or_default()
    }

    pub fn key(res: &Resource, namespace: &str, name: &str) -> Key {
        Key {
            group: res.group.clone(),
            plural: res.plural.clone(),
            namespace: if res.namespaced { namespace.to_owned() } else { String::new() },
            name: name.to_owned(),
        }
    }

    pub fn get(&self, res: &Resource, namespace: &str, name: &str) -> Result<Value, ApiError> {
        self.objects
            .get(&Self::key(res, namespace, name))
            .map(|o| with_version(o, res))
            .ok_or_else(|| ApiError::not_found(res, name))
    }

    pub fn list(&self, res: &Resource, namespace: Option<&str>) -> Vec<Value> {
        self.stored(res, namespace).map(|o| with_version(o, res)).collect()
    }

    /// The stored objects of `res` (in `namespace` when given), without copying: keys sort by
    /// group, plural, namespace, name, so they are one range of the map.
    pub fn stored<'a>(&'a self, res: &'a Resource, namespace: Option<&'a str>) -> impl Iterator<Item = &'a Value> + 'a {
        let scoped = namespace;
        let start = Key {
            group: res.group.clone(),
            plural: res.plural.clone(),
            namespace: scoped.unwrap_or_default().to_owned(),
            name: String::new(),
        };
        self.objects
            .range(start..)
            .take_while(move |(k, _)| {
                k.group == res.group && k.plural == res.plural && scoped.is_none_or(|ns| k.namespace == ns)
            })
            .map(|(_, o)| o)
    }

    /// Schema validation, pruning, defaulting and CEL for custom resources.
    fn admit(
        &self,
        res: &Resource,
        obj: &mut Value,
        old: Option<&Value>,
        opts: &WriteOptions,
    ) -> Result<Vec<String>, ApiError> {
        let name = obj.pointer("/metadata/name").and_then(Value::as_str).unwrap_or("").to_owned();
        let mut warnings = Vec::new();
        let errors = builtin::prepare(&res.group, &res.kind, obj, old);
        if !errors.is_empty() {
            return Err(ApiError::invalid(res, &name, &errors));
        }
        if let Some(schema) = res.schema.as_ref().filter(|_| res.custom) {
            let outcome = validate::structural(schema, obj);
            if !outcome.unknown.is_empty() {
                match opts.field_validation.as_deref() {
                    Some("Strict") => {
                        let fields: Vec<String> =
                            outcome.unknown.iter().map(|f| format!("unknown field \"{f}\"")).collect();
                        return Err(ApiError::bad_request(format!(
                            "{} in version \"{}\" cannot be handled as a {}: strict decoding error: {}",
                            res.kind,
                            res.api_version(),
                            res.kind,
                            fields.join(", ")
                        )));
                    }
                    Some("Ignore") => {}
                    _ => warnings.extend(outcome.unknown.iter().map(|f| format!("unknown field \"{f}\""))),
                }
            }
            let mut errors = outcome.errors;
            if errors.is_empty()
                && let Some(rules) = &res.rules
            {
                errors.extend(validate::cel(&rules.0, obj, old));
            }
            if !errors.is_empty() {
                return Err(ApiError::invalid(res, &name, &errors));
            }
        }
        if res.kind == "CustomResourceDefinition" {
            Registry::from_crd(obj).map_err(|m| {
                ApiError::invalid(
                    res,
                    &name,
                    &[validate::FieldError { field: "spec".into(), reason: "FieldValueInvalid", message: m }],
                )
            })?;
        }
        if let Some(user) = &opts.user {
            let namespace = obj.pointer("/metadata/namespace").and_then(Value::as_str).unwrap_or_default().to_owned();
            let req = admission::Request {
                operation: if old.is_some() { "UPDATE" } else { "CREATE" },
                user,
                res,
                subresource: &opts.subresource,
                namespace: &namespace,
                name: &name,
                dry_run: opts.dry_run,
            };
            warnings.extend(admission::validate(self, &req, Some(obj), old)?);
        }
        Ok(warnings)
    }

    pub fn create(
        &mut self,
        res: &Resource,
        namespace: &str,
        mut body: Value,
        opts: &WriteOptions,
    ) -> Result<Written, ApiError> {
        if !body.is_object() {
            return Err(ApiError::bad_request("the body of the request must be an object".into()));
        }
        if let Some(av) = body.get("apiVersion").and_then(Value::as_str)
            && av != res.api_version()
        {
            return Err(ApiError::bad_request(format!(
                "the API version in the data ({av}) does not match the expected API version ({})",
                res.api_version()
            )));
        }
        if let Some(k) = body.get("kind").and_then(Value::as_str)
            && k != res.kind
        {
            return Err(ApiError::bad_request(format!(
                "the kind in the data ({k}) does not match the expected kind ({})",
                res.kind
            )));
        }
        body["apiVersion"] = json!(res.api_version());
        body["kind"] = json!(res.kind);
        if !body.get("metadata").is_some_and(Value::is_object) {
            body["metadata"] = json!({});
        }
        if res.namespaced {
            match body.pointer("/metadata/namespace").and_then(Value::as_str) {
                Some(ns) if ns != namespace => {
                    return Err(ApiError::bad_request(
                        "the namespace of the provided object does not match the namespace sent on the request".into(),
                    ));
                }
                _ => body["metadata"]["namespace"] = json!(namespace),
            }
            let ns_res = self.registry.get("", "v1", "namespaces").cloned();
            if let Some(ns_res) = ns_res
                && !self.objects.contains_key(&Self::key(&ns_res, "", namespace))
            {
                return Err(ApiError::not_found(&ns_res, namespace));
            }
        } else if let Some(m) = body["metadata"].as_object_mut() {
            m.remove("namespace");
        }
        let name = match body.pointer("/metadata/name").and_then(Value::as_str) {
            Some(n) => n.to_owned(),
            None => match body.pointer("/metadata/generateName").and_then(Value::as_str) {
                Some(prefix) => format!(
                    "{prefix}{}",
                    (0..5)
                        .map(|_| char::from(b"bcdfghjklmnpqrstvwxz2456789"[fastrand::usize(..27)]))
                        .collect::<String>()
                ),
                None => {
                    return Err(ApiError::invalid(
                        res,
                        "",
                        &[validate::FieldError {
                            field: "metadata.name".into(),
                            reason: "FieldValueRequired",
                            message: "metadata.name: Required value: name or generateName is required".into(),
                        }],
                    ));
                }
            },
        };
        if res.group == rbac::GROUP {
            // RBAC names are path segments ("system:basic-user"), as ValidateRBACName allows.
            if let Some(why) = path_segment_problem(&name) {
                return Err(ApiError::invalid(
                    res,
                    &name,
                    &[validate::FieldError {
                        field: "metadata.name".into(),
                        reason: "FieldValueInvalid",
                        message: format!("metadata.name: Invalid value: {name:?}: {why}"),
                    }],
                ));
            }
        } else if !dns_subdomain(&name) {
            return Err(ApiError::invalid(
                res,
                &name,
                &[validate::FieldError {
                    field: "metadata.name".into(),
                    reason: "FieldValueInvalid",
                    message: format!(
                        "metadata.name: Invalid value: {name:?}: a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character"
                    ),
                }],
            ));
        }
        body["metadata"]["name"] = json!(name);
        let key = Self::key(res, namespace, &name);
        if self.objects.contains_key(&key) {
            return Err(ApiError::already_exists(res, &name));
        }
        if res.status_subresource
            && res.custom
            && let Some(m) = body.as_object_mut()
        {
            // The main endpoint ignores status (it is written through /status).
            m.remove("status");
        }
        let warnings = self.admit(res, &mut body, None, opts)?;
        if opts.dry_run {
            return Ok(Written { object: body, warnings, created: true });
        }
        let rv = self.next_rv();
        let meta = &mut body["metadata"];
        meta["uid"] = json!(uid());
        meta["creationTimestamp"] = json!(now());
        meta["resourceVersion"] = json!(rv.to_string());
        meta["generation"] = json!(1);
        if let Some(m) = meta.as_object_mut() {
            m.remove("deletionTimestamp");
        }
        record_manager(&mut body, &Value::Null, opts);
        match res.kind.as_str() {
            "Namespace" => body["status"] = json!({"phase": "Active"}),
            "CustomResourceDefinition" => self.register_crd(&mut body),
            _ => {}
        }
        self.put(key.clone(), body.clone());
        self.emit("ADDED", key, body.clone());
        Ok(Written { object: body, warnings, created: true })
    }

    fn register_crd(&mut self, crd: &mut Value) {
        if let Ok(resources) = Registry::from_crd(crd) {
            if let Some(first) = resources.first() {
                self.registry.remove_crd(&first.group, &first.plural);
            }
            for r in resources {
                self.registry.insert(r);
            }
            let names = crd["spec"]["names"].clone();
            let stored: Vec<Value> = crd["spec"]["versions"]
                .as_array()
                .map(|vs| vs.iter().filter(|v| v["storage"] == true).map(|v| v["name"].clone()).collect())
                .unwrap_or_default();
            let t = now();
            crd["status"] = json!({
                "acceptedNames": names,
                "storedVersions": stored,
                "conditions": [
                    {"type": "NamesAccepted", "status": "True", "reason": "NoConflicts", "message": "no conflicts found", "lastTransitionTime": t},
                    {"type": "Established", "status": "True", "reason": "InitialNamesAccepted", "message": "the initial names have been accepted", "lastTransitionTime": t},
                ],
            });
        }
    }

    /// PUT, or the result of a patch (see [`Via`]).
    pub fn update(
        &mut self,
        res: &Resource,
        namespace: &str,
        name: &str,
        mut body: Value,
        via: Via,
        opts: &WriteOptions,
    ) -> Result<Written, ApiError> {
        let Via { status_only, require_rv } = via;
        let key = Self::key(res, namespace, name);
        let old = self.objects.get(&key).cloned().ok_or_else(|| ApiError::not_found(res, name))?;
        let old_rv = old["metadata"]["resourceVersion"].as_str().unwrap_or("").to_owned();
        match body.pointer("/metadata/resourceVersion").and_then(Value::as_str) {
            Some(rv) if rv != old_rv => return Err(ApiError::conflict(res, name)),
            None if require_rv => {
                return Err(ApiError::invalid(
                    res,
                    name,
                    &[validate::FieldError {
                        field: "metadata.resourceVersion".into(),
                        reason: "FieldValueInvalid",
                        message: "metadata.resourceVersion: Invalid value: 0x0: must be specified for an update".into(),
                    }],
                ));
            }
            _ => {}
        }
        if body.pointer("/metadata/name").and_then(Value::as_str).is_some_and(|n| n != name) {
            return Err(ApiError::bad_request("the name of the object does not match the name on the URL".into()));
        }
        let mut new = if status_only {
            let mut n = old.clone();
            n["status"] = body.get("status").cloned().unwrap_or(Value::Null);
            if n["status"].is_null()
                && let Some(m) = n.as_object_mut()
            {
                m.remove("status");
            }
            n
        } else {
            body["apiVersion"] = json!(res.api_version());
            body["kind"] = json!(res.kind);
            if res.status_subresource {
                match old.get("status") {
                    Some(s) => body["status"] = s.clone(),
                    None => {
                        if let Some(m) = body.as_object_mut() {
                            m.remove("status");
                        }
                    }
                }
            }
            // Server-owned metadata survives whatever the client sent.
            let mut meta = body.get("metadata").cloned().filter(Value::is_object).unwrap_or_else(|| json!({}));
            for f in [
                "uid",
                "creationTimestamp",
                "deletionTimestamp",
                "deletionGracePeriodSeconds",
                "generation",
                "namespace",
                "name",
                "managedFields",
            ] {
                match old["metadata"].get(f) {
                    Some(v) => meta[f] = v.clone(),
                    None => {
                        if let Some(m) = meta.as_object_mut() {
                            m.remove(f);
                        }
                    }
                }
            }
            body["metadata"] = meta;
            body
        };
        let deleting = old.pointer("/metadata/deletionTimestamp").is_some();
        if deleting {
            let before = finalizers(&old);
            if finalizers(&new).iter().any(|f| !before.contains(f)) {
                return Err(ApiError::invalid(res, name, &[validate::FieldError {
                    field: "metadata.finalizers".into(),
                    reason: "FieldValueForbidden",
                    message: "metadata.finalizers: Forbidden: no new finalizers can be added if the object is being deleted".into(),
                }]));
            }
        }
        let warnings = self.admit(res, &mut new, Some(&old), opts)?;
        if opts.dry_run {
            return Ok(Written { object: new, warnings, created: false });
        }
        let mut generation = old["metadata"]["generation"].as_i64().unwrap_or(1);
        if spec_part(&new) != spec_part(&old) {
            generation += 1;
        }
        new["metadata"]["generation"] = json!(generation);
        new["metadata"]["resourceVersion"] = json!(old_rv);
        if new == old {
            // A write that changes nothing keeps its resourceVersion, its managedFields and makes no
            // event (controllers that patch the same status every pass must not wake themselves).
            return Ok(Written { object: with_version(&old, res), warnings, created: false });
        }
        record_manager(&mut new, &old, opts);
        if deleting && finalizers(&new).is_empty() {
            self.remove(&key, new.clone());
            return Ok(Written { object: with_version(&new, res), warnings, created: false });
        }
        let rv = self.next_rv();
        new["metadata"]["resourceVersion"] = json!(rv.to_string());
        if res.kind == "CustomResourceDefinition" {
            self.register_crd(&mut new);
        }
        self.put(key.clone(), new.clone());
        self.emit("MODIFIED", key, new.clone());
        Ok(Written { object: with_version(&new, res), warnings, created: false })
    }

    /// Server-side apply: creates the object if missing, otherwise merges the applied fields.
    pub fn apply(
        &mut self,
        res: &Resource,
        namespace: &str,
        name: &str,
        patch: &Value,
        status_only: bool,
        opts: &WriteOptions,
    ) -> Result<Written, ApiError> {
        if opts.field_manager.is_none() {
            return Err(ApiError::bad_request(
                "PATCH, application/apply-patch+yaml: fieldManager is required for apply requests".into(),
            ));
        }
        let opts = WriteOptions { applied: Some(patch.clone()), ..opts.clone() };
        let Some(current) = self.objects.get(&Self::key(res, namespace, name)).cloned() else {
            if status_only {
                return Err(ApiError::not_found(res, name));
            }
            return self.create(res, namespace, patch.clone(), &opts);
        };
        if !opts.force {
            let found = crate::fields::conflicts(&current, opts.field_manager.as_deref().unwrap_or_default(), patch);
            if !found.is_empty() {
                return Err(ApiError::apply_conflicts(&found));
            }
        }
        // A resourceVersion in the applied object is a precondition, as in the API server.
        if let Some(rv) = patch["metadata"]["resourceVersion"].as_str().filter(|rv| !rv.is_empty())
            && current["metadata"]["resourceVersion"].as_str() != Some(rv)
        {
            return Err(ApiError::conflict(res, name));
        }
        let mut merged = current.clone();
        json_patch::merge(&mut merged, patch);
        // Fields this manager applied before and leaves out now are removed, as the API server does.
        if let Some(before) = current["metadata"]["managedFields"].as_array().and_then(|l| {
            l.iter().find(|e| e["manager"].as_str() == opts.field_manager.as_deref() && e["operation"] == "Apply")
        }) {
            prune_unapplied(&mut merged, &before["fieldsV1"], &fields_v1(patch));
        }
        merged["metadata"]["resourceVersion"] = current["metadata"]["resourceVersion"].clone();
        self.update(res, namespace, name, merged, Via { status_only, require_rv: false }, &opts)
    }

    /// events.k8s.io/v1 and core/v1 Events are one resource in the API server: an Event written
    /// through the new API shows through the old one (`kubectl get events`, `kubectl describe`).
    pub fn mirror_event(&mut self, res: &Resource, written: &Value) {
        if res.group != "events.k8s.io" || res.plural != "events" {
            return;
        }
        let Some(core) = self.registry.get("", "v1", "events").cloned() else { return };
        let ns = written["metadata"]["namespace"].as_str().unwrap_or("default").to_owned();
        let name = written["metadata"]["name"].as_str().unwrap_or_default().to_owned();
        let body = core_event(written);
        let opts = WriteOptions::default();
        let result = if self.objects.contains_key(&Self::key(&core, &ns, &name)) {
            self.update(&core, &ns, &name, body, Via { status_only: false, require_rv: false }, &opts).map(|_| ())
        } else {
            self.create(&core, &ns, body, &opts).map(|_| ())
        };
        if let Err(e) = result {
            tracing::debug!(error = ?e, "core/v1 view of an event not stored");
        }
    }

    /// DELETE: with finalizers the object only gets a deletionTimestamp.
    pub fn delete(
        &mut self,
        res: &Resource,
        namespace: &str,
        name: &str,
        propagation: Option<&str>,
        precondition_rv: Option<&str>,
    ) -> Result<Value, ApiError> {
        let key = Self::key(res, namespace, name);
        let obj = self.objects.get(&key).cloned().ok_or_else(|| ApiError::not_found(res, name))?;
        if let Some(rv) = precondition_rv
            && obj["metadata"]["resourceVersion"].as_str() != Some(rv)
        {
            return Err(ApiError::conflict(res, name));
        }
        if propagation == Some("Orphan") {
            let uid = obj["metadata"]["uid"].as_str().unwrap_or("").to_owned();
            self.orphan_dependents(&uid);
        }
        if !finalizers(&obj).is_empty() {
            if obj.pointer("/metadata/deletionTimestamp").is_some() {
                return Ok(with_version(&obj, res));
            }
            let mut o = obj;
            o["metadata"]["deletionTimestamp"] = json!(now());
            o["metadata"]["deletionGracePeriodSeconds"] = json!(0);
            let rv = self.next_rv();
            o["metadata"]["resourceVersion"] = json!(rv.to_string());
            self.put(key.clone(), o.clone());
            self.emit("MODIFIED", key, o.clone());
            return Ok(with_version(&o, res));
        }
        self.remove(&key, obj.clone());
        Ok(with_version(&obj, res))
    }

    /// Removes an object for good, then what depended on it.
    fn remove(&mut self, key: &Key, mut last: Value) {
        if self.take(key).is_none() {
            return;
        }
        let rv = self.next_rv();
        last["metadata"]["resourceVersion"] = json!(rv.to_string());
        let uid = last["metadata"]["uid"].as_str().unwrap_or("").to_owned();
        let is_crd = last["kind"] == "CustomResourceDefinition";
        let is_ns = key.group.is_empty() && key.plural == "namespaces";
        self.emit("DELETED", key.clone(), last.clone());
        if is_crd {
            let group = last["spec"]["group"].as_str().unwrap_or("").to_owned();
            let plural = last["spec"]["names"]["plural"].as_str().unwrap_or("").to_owned();
            let owned: Vec<Key> =
                self.objects.keys().filter(|k| k.group == group && k.plural == plural).cloned().collect();
            for k in owned {
                if let Some(o) = self.objects.get(&k).cloned() {
                    self.remove(&k, o);
                }
            }
            self.registry.remove_crd(&group, &plural);
        }
        if is_ns {
            let contained: Vec<Key> = self.objects.keys().filter(|k| k.namespace == key.name).cloned().collect();
            for k in contained {
                if let Some(o) = self.objects.get(&k).cloned() {
                    self.remove(&k, o);
                }
            }
        }
        self.collect_garbage(&uid);
    }

    fn resource_of(&self, key: &Key) -> Option<Resource> {
        self.registry.resources.values().find(|r| r.group == key.group && r.plural == key.plural).cloned()
    }

    /// Deletes dependents whose every owner is gone (background propagation).
    fn collect_garbage(&mut self, owner_uid: &str) {
        if owner_uid.is_empty() {
            return;
        }
        let dependents: Vec<Key> = self
            .dependents_of(owner_uid)
            .into_iter()
            .filter(|k| self.objects.get(k).is_some_and(|o| owner_uids(o).all(|u| !self.uids.contains_key(u))))
            .collect();
        for k in dependents {
            if let Some(res) = self.resource_of(&k) {
                let _ = self.delete(&res, &k.namespace, &k.name, None, None);
            }
        }
    }

    fn orphan_dependents(&mut self, owner_uid: &str) {
        let keys = self.dependents_of(owner_uid);
        for k in keys {
            if let Some(mut o) = self.objects.get(&k).cloned() {
                let refs: Vec<Value> = o["metadata"]["ownerReferences"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default()
                    .into_iter()
                    .filter(|r| r["uid"] != owner_uid)
                    .collect();
                o["metadata"]["ownerReferences"] = json!(refs);
                let rv = self.next_rv();
                o["metadata"]["resourceVersion"] = json!(rv.to_string());
                self.put(k.clone(), o.clone());
                self.emit("MODIFIED", k, o);
            }
        }
    }
}

/// The uids of an object's owners.
fn owner_uids(obj: &Value) -> impl Iterator<Item = &str> {
    obj["metadata"]["ownerReferences"].as_array().into_iter().flatten().filter_map(|r| r["uid"].as_str())
}

/// Records the writer in managedFields (field ownership, see [`crate::fields`]).
fn record_manager(obj: &mut Value, before: &Value, opts: &WriteOptions) {
    let Some(manager) = opts.field_manager.clone() else { return };
    crate::fields::record(obj, before, &manager, opts.applied.as_ref(), &now());
}

/// The object as served at `res`'s version, copied only when its stored version differs.
pub fn at_version<'a>(obj: &'a Value, res: &Resource) -> std::borrow::Cow<'a, Value> {
    if obj["apiVersion"].as_str() == Some(res.api_version().as_str()) {
        std::borrow::Cow::Borrowed(obj)
    } else {
        std::borrow::Cow::Owned(with_version(obj, res))
    }
}

/// The object as served at `res`'s version.
pub fn with_version(obj: &Value, res: &Resource) -> Value {
    let mut o = obj.clone();
    o["apiVersion"] = json!(res.api_version());
    o
}
