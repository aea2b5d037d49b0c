//! The listeners: the API (GraphQL, REST v2, `/_sim` admin) and the network-volume S3 API.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use serde::Serialize;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use crate::graphql::{RunPodSchema, schema};
use crate::world::messages;
use crate::{Sim, WorldConfig, admin, rest, s3};

/// How to start a simulator.
#[derive(Clone, Debug)]
pub struct SimOptions {
    pub api_listen: SocketAddr,
    pub s3_listen: SocketAddr,
    pub state_dir: PathBuf,
    pub config: WorldConfig,
    pub api_key: Option<String>,
}

/// What a client needs to reach the simulator (printed as one JSON line by the binary).
#[derive(Clone, Debug, Serialize)]
pub struct Endpoints {
    /// Base URL of the API (`RUNPOD_API_BASE_URL`).
    pub api: String,
    pub graphql: String,
    pub rest: String,
    pub s3: String,
    pub admin: String,
    pub api_key: String,
    pub s3_access_key: String,
    pub s3_secret_key: String,
    pub state_dir: String,
}

/// A running simulator; the listeners stop when it is dropped.
pub struct RunningSim {
    pub sim: Arc<Sim>,
    pub endpoints: Endpoints,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for RunningSim {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
        // Kill every pod process still running.
        let (mut w, _) = self.sim.world();
        w.pods.clear();
        w.gone.clear();
    }
}

#[derive(Clone)]
pub(crate) struct AppState {
    pub sim: Arc<Sim>,
    pub schema: RunPodSchema,
}

/// Binds both listeners and serves until the returned handle is dropped.
pub async fn start(opts: SimOptions) -> std::io::Result<RunningSim> {
    std::fs::create_dir_all(&opts.state_dir)?;
    let s3_creds = opts.config.s3.clone();
    for v in &opts.config.volumes {
        std::fs::create_dir_all(opts.state_dir.join("volumes").join(&v.id))?;
    }
    let sim = Sim::new(opts.config, opts.state_dir.clone(), opts.api_key);
    let api = TcpListener::bind(opts.api_listen).await?;
    let s3l = TcpListener::bind(opts.s3_listen).await?;
    let api_addr = api.local_addr()?;
    let s3_addr = s3l.local_addr()?;
    let state = AppState { sim: sim.clone(), schema: schema(sim.clone()) };
    let app = Router::new()
        .route("/graphql", post(graphql))
        .nest("/v2", rest::routes().layer(axum::middleware::from_fn_with_state(state.clone(), crate::ratelimit::layer)))
        .nest("/_sim", admin::routes())
        .with_state(state);
    let mut tasks = Vec::new();
    tasks.push(tokio::spawn(async move {
        if let Err(e) = axum::serve(api, app).await {
            tracing::error!(error = %e, "API listener stopped");
        }
    }));
    tasks.push(tokio::spawn(s3::serve(s3l, sim.clone(), s3_creds.clone())));
    let ticker = sim.clone();
    tasks.push(tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        loop {
            tick.tick().await;
            drop(ticker.world());
        }
    }));
    let base = format!("http://{api_addr}");
    let endpoints = Endpoints {
        graphql: format!("{base}/graphql"),
        rest: format!("{base}/v2"),
        admin: format!("{base}/_sim"),
        api: base,
        s3: format!("http://{s3_addr}"),
        api_key: sim.api_key.clone(),
        s3_access_key: s3_creds.access_key,
        s3_secret_key: s3_creds.secret_key,
        state_dir: opts.state_dir.display().to_string(),
    };
    Ok(RunningSim { sim, endpoints, tasks })
}

/// Checks the API key the way RunPod takes it: `Authorization: Bearer` or the legacy `?api_key=`.
pub(crate) fn authorized(sim: &Sim, headers: &HeaderMap, query: &std::collections::HashMap<String, String>) -> bool {
    presented(headers, query) == Some(sim.api_key.as_str())
}

fn presented<'a>(headers: &'a HeaderMap, query: &'a std::collections::HashMap<String, String>) -> Option<&'a str> {
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    bearer.or(query.get("api_key").map(String::as_str))
}

/// The account key, or the pod-scoped key of pod `id` itself (RunPod's RUNPOD_API_KEY in a pod).
pub(crate) fn authorized_for_pod(
    sim: &Sim,
    headers: &HeaderMap,
    query: &std::collections::HashMap<String, String>,
    id: &str,
) -> bool {
    let key = presented(headers, query);
    key == Some(sim.api_key.as_str()) || {
        let (w, _) = sim.world();
        w.pods.get(id).is_some_and(|p| key == Some(p.scoped_key.as_str()))
    }
}

/// Injected transport faults shared by GraphQL and REST: latency, 502, 429.
pub(crate) async fn transport_fault(sim: &Sim, op: &str) -> Option<Response> {
    let (latency, verdict) = {
        let (mut w, _) = sim.world();
        w.count(op);
        let f = &mut w.faults;
        let latency = f.latency_ms;
        let verdict = if f.rate_limited > 0 {
            f.rate_limited -= 1;
            Some((StatusCode::TOO_MANY_REQUESTS, f.retry_after_seconds))
        } else if f.http5xx > 0 || (f.http5xx_rate > 0.0 && fastrand::f64() < f.http5xx_rate) {
            f.http5xx = f.http5xx.saturating_sub(1);
            Some((StatusCode::BAD_GATEWAY, 0))
        } else {
            None
        };
        (latency, verdict)
    };
    if latency > 0 {
        tokio::time::sleep(Duration::from_millis(latency)).await;
    }
    verdict.map(|(status, retry)| {
        if status == StatusCode::TOO_MANY_REQUESTS {
            (
                status,
                [(header::RETRY_AFTER, retry.to_string()), (header::CONTENT_TYPE, "application/problem+json".into())],
                r#"{"title":"Too Many Requests","status":429,"detail":"rate limit exceeded for the minute window"}"#,
            )
                .into_response()
        } else {
            (status, "error code: 502").into_response()
        }
    })
}

async fn graphql(
    State(state): State<AppState>,
    Query(query): Query<std::collections::HashMap<String, String>>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    if !authorized(&state.sim, &headers, &query) {
        return (StatusCode::UNAUTHORIZED, "401 Unauthorized").into_response();
    }
    if let Some(r) = transport_fault(&state.sim, "graphql").await {
        return r;
    }
    let request: async_graphql::Request = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => {
            let body = serde_json::json!({"errors": [{"message": format!("invalid request body: {e}")}]});
            return (StatusCode::BAD_REQUEST, axum::Json(body)).into_response();
        }
    };
    let internal = {
        let (mut w, _) = state.sim.world();
        if w.faults.internal_errors > 0 {
            w.faults.internal_errors -= 1;
            true
        } else {
            false
        }
    };
    if internal {
        let body = serde_json::json!({"errors": [{"message": messages::INTERNAL, "extensions": {"code": "INTERNAL_SERVER_ERROR"}}], "data": null});
        return axum::Json(body).into_response();
    }
    let mut response = state.schema.execute(request).await;
    // Parse and validation errors (unknown fields, bad types) carry no path and come back as 400.
    // Business errors carry the field's path and come back as 200 with `data: {field: null}`, as
    // RunPod does (async-graphql nulls the whole `data` of a failed mutation).
    let request_error = response.is_err() && response.errors.iter().all(|e| e.path.is_empty());
    if response.data == async_graphql::Value::Null && !request_error {
        let mut data = async_graphql::indexmap::IndexMap::new();
        for e in &response.errors {
            if let Some(async_graphql::PathSegment::Field(f)) = e.path.first() {
                data.insert(async_graphql::Name::new(f), async_graphql::Value::Null);
            }
        }
        response.data = async_graphql::Value::Object(data);
    }
    let status = if request_error { StatusCode::BAD_REQUEST } else { StatusCode::OK };
    (status, axum::Json(response)).into_response()
}
