//! REST v2's account-wide rate limit: fixed windows per policy (RunPod's documented example is
//! `"minute";q=60;w=60, "hour";q=3000;w=3600, "day";q=50000;w=86400`), the IETF `RateLimit` and
//! `RateLimit-Policy` headers on every authenticated answer, and 429 with `Retry-After` and
//! RunPod's detail `rate limit exceeded for the <name> window` when a window is spent. Every key of
//! the account (pod-scoped keys too) draws on the same budget.

use std::time::{Duration, Instant};

use axum::extract::{Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};

use crate::server::AppState;

/// One window of the policy.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RatePolicy {
    /// The window's name in the headers, e.g. `minute`.
    pub name: String,
    /// Requests allowed per window.
    pub quota: u32,
    /// Window length, seconds (real time).
    pub window_seconds: u64,
}

/// The windows' state.
#[derive(Debug, Default)]
pub struct Limiter {
    windows: Vec<(Instant, u32)>,
}

/// What the limiter says about one request.
enum Verdict {
    Unlimited,
    Admitted { remaining: String },
    Refused { window: String, retry_after: u64, remaining: String },
}

impl Limiter {
    fn admit(&mut self, policies: &[RatePolicy], now: Instant) -> Verdict {
        if policies.is_empty() {
            return Verdict::Unlimited;
        }
        self.windows.resize(policies.len(), (now, 0));
        for (p, w) in policies.iter().zip(self.windows.iter_mut()) {
            if now.duration_since(w.0) >= Duration::from_secs(p.window_seconds) {
                *w = (now, 0);
            }
        }
        let full = policies.iter().zip(&self.windows).find(|(p, w)| w.1 >= p.quota);
        if let Some((p, w)) = full {
            let retry_after = reset(p, w, now).max(1);
            return Verdict::Refused { window: p.name.clone(), retry_after, remaining: self.header(policies, now) };
        }
        for w in &mut self.windows {
            w.1 += 1;
        }
        Verdict::Admitted { remaining: self.header(policies, now) }
    }

    /// `RateLimit: "minute";r=57;t=42, ...`
    fn header(&self, policies: &[RatePolicy], now: Instant) -> String {
        policies
            .iter()
            .zip(&self.windows)
            .map(|(p, w)| format!("\"{}\";r={};t={}", p.name, p.quota.saturating_sub(w.1), reset(p, w, now)))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// Seconds until the window resets.
fn reset(p: &RatePolicy, w: &(Instant, u32), now: Instant) -> u64 {
    let left = Duration::from_secs(p.window_seconds).saturating_sub(now.duration_since(w.0));
    left.as_secs() + u64::from(left.subsec_nanos() > 0)
}

/// `RateLimit-Policy: "minute";q=60;w=60, ...`
fn policy_header(policies: &[RatePolicy]) -> String {
    policies
        .iter()
        .map(|p| format!("\"{}\";q={};w={}", p.name, p.quota, p.window_seconds))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Middleware of the REST v2 routes: requests that carry a key draw on the account's budget.
pub(crate) async fn layer(State(s): State<AppState>, req: Request, next: Next) -> Response {
    let keyed = req.headers().contains_key(header::AUTHORIZATION)
        || req.uri().query().is_some_and(|q| q.split('&').any(|kv| kv.starts_with("api_key=")));
    if !keyed {
        return next.run(req).await;
    }
    let (verdict, policy) = {
        let (mut w, _) = s.sim.world();
        let policies = w.config.rate_limit.clone();
        let verdict = w.limiter.admit(&policies, Instant::now());
        if matches!(verdict, Verdict::Refused { .. }) {
            w.rate_limited_answers += 1;
        }
        (verdict, policy_header(&policies))
    };
    let (mut response, remaining) = match verdict {
        Verdict::Unlimited => return next.run(req).await,
        Verdict::Admitted { remaining } => (next.run(req).await, remaining),
        Verdict::Refused { window, retry_after, remaining } => {
            let detail = format!("rate limit exceeded for the {window} window");
            let body = serde_json::json!({"title": "Too Many Requests", "status": 429, "detail": detail});
            let r = (
                StatusCode::TOO_MANY_REQUESTS,
                [
                    (header::RETRY_AFTER, retry_after.to_string()),
                    (header::CONTENT_TYPE, "application/problem+json".into()),
                ],
                body.to_string(),
            )
                .into_response();
            (r, remaining)
        }
    };
    let h = response.headers_mut();
    for (name, value) in [("ratelimit-policy", policy), ("ratelimit", remaining)] {
        if let Ok(v) = HeaderValue::from_str(&value) {
            h.insert(name, v);
        }
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_spent_window_refuses_until_it_resets() {
        let policies = [RatePolicy { name: "minute".into(), quota: 2, window_seconds: 60 }];
        let mut l = Limiter::default();
        let t0 = Instant::now();
        assert!(
            matches!(l.admit(&policies, t0), Verdict::Admitted { ref remaining } if remaining == "\"minute\";r=1;t=60")
        );
        assert!(matches!(l.admit(&policies, t0), Verdict::Admitted { .. }));
        match l.admit(&policies, t0 + Duration::from_secs(20)) {
            Verdict::Refused { window, retry_after, .. } => assert_eq!((window.as_str(), retry_after), ("minute", 40)),
            _ => panic!("the third request in the window is refused"),
        }
        assert!(matches!(l.admit(&policies, t0 + Duration::from_secs(60)), Verdict::Admitted { .. }));
        assert!(matches!(l.admit(&[], t0), Verdict::Unlimited));
    }
}
