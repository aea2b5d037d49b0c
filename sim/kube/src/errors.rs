//! Errors as the API server returns them: a `Status` body with reason, code, details and causes.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use crate::registry::Resource;
use crate::validate::FieldError;

/// A failed request.
#[derive(Clone, Debug, PartialEq)]
pub struct ApiError {
    pub code: u16,
    pub reason: &'static str,
    pub message: String,
    pub details: Option<Value>,
}

impl ApiError {
    fn details(res: &Resource, name: &str) -> Value {
        json!({"name": name, "group": res.group, "kind": res.plural})
    }

    pub fn not_found(res: &Resource, name: &str) -> Self {
        Self {
            code: 404,
            reason: "NotFound",
            message: format!("{} {name:?} not found", res.qualified()),
            details: Some(Self::details(res, name)),
        }
    }

    pub fn already_exists(res: &Resource, name: &str) -> Self {
        Self {
            code: 409,
            reason: "AlreadyExists",
            message: format!("{} {name:?} already exists", res.qualified()),
            details: Some(Self::details(res, name)),
        }
    }

    pub fn conflict(res: &Resource, name: &str) -> Self {
        Self {
            code: 409,
            reason: "Conflict",
            message: format!(
                "Operation cannot be fulfilled on {} {name:?}: the object has been modified; please apply your changes to the latest version and try again",
                res.qualified()
            ),
            details: Some(Self::details(res, name)),
        }
    }

    /// 409 for a server-side apply that would take fields other managers own, worded as the API
    /// server words it.
    pub fn apply_conflicts(found: &[(String, String)]) -> Self {
        let n = found.len();
        let list: Vec<String> = found.iter().map(|(m, p)| format!("conflict with \"{m}\": {p}")).collect();
        let message = if n == 1 {
            format!("Apply failed with 1 conflict: {}", list[0])
        } else {
            format!("Apply failed with {n} conflicts: {}", list.join("\n"))
        };
        Self { code: 409, reason: "Conflict", message, details: None }
    }

    /// 422 with one cause per field error, worded `Kind.group "name" is invalid: field: ...`.
    pub fn invalid(res: &Resource, name: &str, errors: &[FieldError]) -> Self {
        let joined = if errors.len() == 1 {
            errors[0].message.clone()
        } else {
            format!("[{}]", errors.iter().map(|e| e.message.as_str()).collect::<Vec<_>>().join(", "))
        };
        // Causes carry the message without the field prefix; clients print `field: message`.
        let causes: Vec<Value> = errors
            .iter()
            .map(|e| {
                let msg = e.message.strip_prefix(&format!("{}: ", e.field)).unwrap_or(&e.message);
                json!({"reason": e.reason, "message": msg, "field": e.field})
            })
            .collect();
        Self {
            code: 422,
            reason: "Invalid",
            message: format!("{} {name:?} is invalid: {joined}", res.group_kind()),
            details: Some(json!({"name": name, "group": res.group, "kind": res.kind, "causes": causes})),
        }
    }

    pub fn bad_request(message: String) -> Self {
        Self { code: 400, reason: "BadRequest", message, details: None }
    }

    pub fn not_found_path(path: &str) -> Self {
        Self {
            code: 404,
            reason: "NotFound",
            message: format!("the server could not find the requested resource ({path})"),
            details: None,
        }
    }

    pub fn method_not_allowed(what: &str) -> Self {
        Self {
            code: 405,
            reason: "MethodNotAllowed",
            message: format!("the server does not allow this method on the requested resource ({what})"),
            details: None,
        }
    }

    pub fn gone(message: String) -> Self {
        Self { code: 410, reason: "Expired", message, details: None }
    }

    pub fn unsupported_media(ct: &str) -> Self {
        Self {
            code: 415,
            reason: "UnsupportedMediaType",
            message: format!(
                "the body of the request was in an unknown format - accepted media types include: application/json-patch+json, application/merge-patch+json, application/apply-patch+yaml, application/strategic-merge-patch+json (got {ct})"
            ),
            details: None,
        }
    }

    pub fn status(&self) -> Value {
        let mut s = json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": self.message, "reason": self.reason, "code": self.code});
        if let Some(d) = &self.details {
            s["details"] = d.clone();
        }
        s
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let code = StatusCode::from_u16(self.code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        (code, [(axum::http::header::CONTENT_TYPE, "application/json")], self.status().to_string()).into_response()
    }
}
