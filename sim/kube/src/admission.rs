//! ValidatingAdmissionPolicy ("Validating Admission Policy"): every binding whose policy matches
//! a create, update or delete evaluates the policy's CEL with `object`, `oldObject`, `request`,
//! `params`, `namespaceObject` and `variables`, honouring matchConditions, messageExpression,
//! reason, validationActions (Deny, Warn, Audit) and failurePolicy.
//!
//! CEL is the `cel` crate with kube-cel's Kubernetes functions, the implementation the CRD rules
//! use. kube-cel's own VAP evaluator has no `variables` or match conditions, so the context is
//! bound here.

use std::collections::HashMap;
use std::sync::Arc;

use kube::core::cel::KubeCelExt;
use kube::core::cel::cel::{Context, Program, Value as Cel, objects::Key};
use serde_json::{Value, json};

use crate::auth::UserInfo;
use crate::errors::ApiError;
use crate::registry::Resource;
use crate::store::State;

/// The request as admission sees it.
pub struct Request<'a> {
    pub operation: &'static str,
    pub user: &'a UserInfo,
    pub res: &'a Resource,
    pub subresource: &'a str,
    pub namespace: &'a str,
    pub name: &'a str,
    pub dry_run: bool,
}

const GROUP: &str = "admissionregistration.k8s.io";

fn strs(v: &Value) -> impl Iterator<Item = &str> {
    v.as_array().into_iter().flatten().filter_map(Value::as_str)
}

fn any(list: &Value, want: &str) -> bool {
    strs(list).any(|s| s == "*" || s == want)
}

fn rule_matches(rule: &Value, r: &Request) -> bool {
    let resource =
        if r.subresource.is_empty() { r.res.plural.clone() } else { format!("{}/{}", r.res.plural, r.subresource) };
    let resources = strs(&rule["resources"]).any(|x| {
        x == "*" && r.subresource.is_empty()
            || x == "*/*"
            || x == resource
            || (!r.subresource.is_empty() && x == format!("*/{}", r.subresource))
            || (!r.subresource.is_empty() && x == format!("{}/*", r.res.plural))
    });
    let scope = match rule["scope"].as_str() {
        Some("Namespaced") => r.res.namespaced,
        Some("Cluster") => !r.res.namespaced,
        _ => true,
    };
    any(&rule["apiGroups"], &r.res.group)
        && any(&rule["apiVersions"], &r.res.version)
        && any(&rule["operations"], r.operation)
        && resources
        && scope
}

fn labels_match(selector: &Value, labels: &Value) -> bool {
    if selector.is_null() {
        return true;
    }
    let label = |k: &str| labels.get(k).and_then(Value::as_str);
    selector["matchLabels"].as_object().is_none_or(|m| m.iter().all(|(k, v)| label(k) == v.as_str()))
        && selector["matchExpressions"].as_array().is_none_or(|es| {
            es.iter().all(|e| {
                let key = e["key"].as_str().unwrap_or_default();
                let listed = label(key).is_some_and(|l| strs(&e["values"]).any(|v| v == l));
                match e["operator"].as_str() {
                    Some("In") => listed,
                    Some("NotIn") => !listed,
                    Some("Exists") => label(key).is_some(),
                    Some("DoesNotExist") => label(key).is_none(),
                    _ => false,
                }
            })
        })
}

/// Whether `matchConstraints` (or a binding's `matchResources`) covers the request.
fn resources_match(m: &Value, r: &Request, object: &Value, namespace: &Value) -> bool {
    if m.is_null() {
        return true;
    }
    let included = m["resourceRules"].as_array().is_some_and(|rs| rs.iter().any(|rule| rule_matches(rule, r)));
    let excluded = m["excludeResourceRules"].as_array().is_some_and(|rs| rs.iter().any(|rule| rule_matches(rule, r)));
    let ns_ok = !r.res.namespaced || labels_match(&m["namespaceSelector"], &namespace["metadata"]["labels"]);
    included && !excluded && ns_ok && labels_match(&m["objectSelector"], &object["metadata"]["labels"])
}

fn cel(v: &Value) -> Cel {
    kube::core::cel::cel::to_value(v).unwrap_or(Cel::Null)
}

fn request_value(r: &Request) -> Value {
    json!({
        "operation": r.operation, "name": r.name, "namespace": r.namespace, "dryRun": r.dry_run,
        "kind": {"group": r.res.group, "version": r.res.version, "kind": r.res.kind},
        "resource": {"group": r.res.group, "version": r.res.version, "resource": r.res.plural},
        "subResource": r.subresource, "userInfo": r.user.to_json(),
    })
}

/// A failed evaluation, or an expression that is not a bool.
fn run(ctx: &Context, expr: &str) -> Result<Cel, String> {
    thread_local! {
        // Policies change rarely and are evaluated on every write: each expression is parsed
        // once per thread.
        static PROGRAMS: std::cell::RefCell<HashMap<String, std::rc::Rc<Program>>> =
            std::cell::RefCell::new(HashMap::new());
    }
    let cached = PROGRAMS.with(|c| c.borrow().get(expr).cloned());
    let p = match cached {
        Some(p) => p,
        None => {
            let p = std::rc::Rc::new(Program::compile(expr).map_err(|e| format!("compilation failed: {e}"))?);
            PROGRAMS.with(|c| {
                let mut c = c.borrow_mut();
                if c.len() >= 1024 {
                    c.clear();
                }
                c.insert(expr.to_owned(), p.clone());
            });
            p
        }
    };
    p.execute(ctx).map_err(|e| e.to_string())
}

fn truth(ctx: &Context, expr: &str) -> Result<bool, String> {
    match run(ctx, expr)? {
        Cel::Bool(b) => Ok(b),
        other => Err(format!("expression '{expr}' resulted in a non-boolean value: {other:?}")),
    }
}

/// The policy's params for this binding; `Err(None)` skips the binding (parameterNotFoundAction
/// Allow), `Err(Some(message))` denies.
fn params(api: &State, policy: &Value, binding: &Value, r: &Request) -> Result<Option<Value>, Option<String>> {
    let Some(kind) = policy["spec"].get("paramKind").filter(|k| k.is_object()) else { return Ok(None) };
    let reference = &binding["spec"]["paramRef"];
    let res = api.registry.by_kind(kind["apiVersion"].as_str().unwrap_or(""), kind["kind"].as_str().unwrap_or(""));
    let ns =
        reference["namespace"].as_str().unwrap_or(if res.is_some_and(|x| x.namespaced) { r.namespace } else { "" });
    let found = res.and_then(|res| match reference["name"].as_str() {
        Some(name) => api.get(res, ns, name).ok(),
        None => api
            .list(res, res.namespaced.then_some(ns))
            .into_iter()
            .find(|o| labels_match(&reference["selector"], &o["metadata"]["labels"])),
    });
    match found {
        Some(p) => Ok(Some(p)),
        None if reference["parameterNotFoundAction"] == "Allow" => Err(None),
        None => Err(Some("no params found for policy binding with `Deny` parameterNotFoundAction".into())),
    }
}

/// Binds object, oldObject, request, params, namespaceObject, then each variable in order.
fn context(policy: &Value, r: &Request, bound: &[(&str, Option<&Value>)]) -> Context<'static> {
    let mut ctx = Context::default();
    ctx.register_all();
    for (name, v) in bound {
        let _ = ctx.add_variable(*name, v.map_or(Cel::Null, cel));
    }
    let _ = ctx.add_variable("request", cel(&request_value(r)));
    let mut vars: HashMap<Key, Cel> = HashMap::new();
    for v in policy["spec"]["variables"].as_array().into_iter().flatten() {
        let _ = ctx.add_variable("variables", Cel::Map(vars.clone().into()));
        if let (Some(name), Ok(value)) = (v["name"].as_str(), run(&ctx, v["expression"].as_str().unwrap_or("false"))) {
            vars.insert(Key::String(Arc::new(name.to_owned())), value);
        }
    }
    let _ = ctx.add_variable("variables", Cel::Map(vars.into()));
    ctx
}

/// One binding's verdict: denial messages (Deny), warnings (Warn), or nothing.
fn evaluate(policy: &Value, binding: &Value, ctx: &Context, r: &Request) -> (Option<ApiError>, Vec<String>) {
    let (pname, bname) =
        (policy["metadata"]["name"].as_str().unwrap_or(""), binding["metadata"]["name"].as_str().unwrap_or(""));
    let ignore = policy["spec"]["failurePolicy"] == "Ignore";
    let prefix = format!("ValidatingAdmissionPolicy '{pname}' with binding '{bname}' denied request: ");
    for c in policy["spec"]["matchConditions"].as_array().into_iter().flatten() {
        match truth(ctx, c["expression"].as_str().unwrap_or("true")) {
            Ok(true) => {}
            Ok(false) => return (None, Vec::new()),
            Err(_) if ignore => return (None, Vec::new()),
            Err(e) => return (Some(forbidden(format!("{prefix}{e}"), "Forbidden", r)), Vec::new()),
        }
    }
    let actions: Vec<&str> = strs(&binding["spec"]["validationActions"]).collect();
    let mut warnings = Vec::new();
    for v in policy["spec"]["validations"].as_array().into_iter().flatten() {
        let expr = v["expression"].as_str().unwrap_or("false");
        let message = match truth(ctx, expr) {
            Ok(true) => continue,
            Err(_) if ignore => continue,
            Err(e) => format!("expression '{expr}' resulted in error: {e}"),
            Ok(false) => v["messageExpression"]
                .as_str()
                .and_then(|m| match run(ctx, m) {
                    Ok(Cel::String(s)) if !s.trim().is_empty() => Some((*s).clone()),
                    _ => None,
                })
                .or_else(|| v["message"].as_str().map(str::to_owned))
                .unwrap_or_else(|| format!("failed expression: {expr}")),
        };
        if actions.contains(&"Warn") {
            warnings.push(format!(
                "Validation failed for ValidatingAdmissionPolicy '{pname}' with binding '{bname}': {message}"
            ));
        }
        if actions.contains(&"Deny") {
            let reason = v["reason"].as_str().unwrap_or("Invalid");
            return (Some(forbidden(format!("{prefix}{message}"), reason, r)), warnings);
        }
    }
    (None, warnings)
}

fn forbidden(message: String, reason: &str, r: &Request) -> ApiError {
    let (code, reason) = match reason {
        "Forbidden" => (403, "Forbidden"),
        "Unauthorized" => (401, "Unauthorized"),
        "RequestEntityTooLarge" => (413, "RequestEntityTooLarge"),
        _ => (422, "Invalid"),
    };
    ApiError {
        code,
        reason,
        message,
        details: Some(json!({"name": r.name, "group": r.res.group, "kind": r.res.plural})),
    }
}

/// Runs every matching binding; the first Deny fails the request, warnings are returned.
pub fn validate(
    api: &State,
    r: &Request,
    object: Option<&Value>,
    old: Option<&Value>,
) -> Result<Vec<String>, ApiError> {
    let (Some(policies), Some(bindings)) = (
        api.registry.get(GROUP, "v1", "validatingadmissionpolicies"),
        api.registry.get(GROUP, "v1", "validatingadmissionpolicybindings"),
    ) else {
        return Ok(Vec::new());
    };
    let bindings: Vec<&Value> = api.stored(bindings, None).collect();
    if bindings.is_empty() || r.res.group == GROUP {
        return Ok(Vec::new());
    }
    let ns_res = api.registry.get("", "v1", "namespaces");
    let namespace = ns_res.and_then(|n| api.get(n, "", r.namespace).ok()).unwrap_or(Value::Null);
    let subject = object.or(old).cloned().unwrap_or(Value::Null);
    let mut warnings = Vec::new();
    for binding in &bindings {
        let Ok(policy) = api.get(policies, "", binding["spec"]["policyName"].as_str().unwrap_or("")) else { continue };
        if !resources_match(&policy["spec"]["matchConstraints"], r, &subject, &namespace)
            || !resources_match(&binding["spec"]["matchResources"], r, &subject, &namespace)
        {
            continue;
        }
        let params = match params(api, &policy, binding, r) {
            Ok(p) => p,
            Err(None) => continue,
            Err(Some(m)) => {
                let (p, b) = (
                    policy["metadata"]["name"].as_str().unwrap_or(""),
                    binding["metadata"]["name"].as_str().unwrap_or(""),
                );
                return Err(forbidden(
                    format!("ValidatingAdmissionPolicy '{p}' with binding '{b}' denied request: {m}"),
                    "Forbidden",
                    r,
                ));
            }
        };
        let ns_bound = r.res.namespaced.then_some(&namespace);
        let ctx = context(
            &policy,
            r,
            &[("object", object), ("oldObject", old), ("params", params.as_ref()), ("namespaceObject", ns_bound)],
        );
        let (denied, warned) = evaluate(&policy, binding, &ctx, r);
        warnings.extend(warned);
        if let Some(e) = denied {
            return Err(e);
        }
    }
    Ok(warnings)
}
