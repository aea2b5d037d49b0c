//! `/_sim/...`: the test harness's handle on the world (no RunPod equivalent; loopback only).
//!
//! - `GET  /_sim/world`                 whole state: pods, stock, balance, spend, request counts
//! - `POST /_sim/faults`                JSON merge into the injected faults
//! - `POST /_sim/clock/advance`         `{"seconds": N}`
//! - `POST /_sim/stock`                 `{"gpuTypeId", "dataCenterId", "cloudType", "count"}`
//! - `POST /_sim/balance`               `{"balance": USD}`
//! - `POST /_sim/pods/{id}/vanish`      the pod disappears (host lost)
//! - `POST /_sim/pods/{id}/exit`        the pod turns EXITED on its own

use std::time::Duration;

use axum::Router;
use axum::extract::{Path, State};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::config::Faults;
use crate::rest::problem;
use crate::server::AppState;

pub(crate) fn routes() -> Router<AppState> {
    Router::new()
        .route("/world", get(world))
        .route("/faults", post(faults))
        .route("/clock/advance", post(advance))
        .route("/stock", post(stock))
        .route("/balance", post(balance))
        .route("/pods/{id}/vanish", post(vanish))
        .route("/pods/{id}/exit", post(exit))
}

async fn world(State(s): State<AppState>) -> Response {
    let (w, now) = s.sim.world();
    let mut v = serde_json::to_value(&*w).unwrap_or(Value::Null);
    v["now"] = json!(now.to_rfc3339());
    v["clockSpeed"] = json!(s.sim.clock.speed());
    axum::Json(v).into_response()
}

fn merge(target: &mut Value, patch: Value) {
    match (target, patch) {
        (Value::Object(t), Value::Object(p)) => {
            for (k, v) in p {
                merge(t.entry(k).or_insert(Value::Null), v);
            }
        }
        (t, p) => *t = p,
    }
}

async fn faults(State(s): State<AppState>, body: axum::Json<Value>) -> Response {
    let (mut w, _) = s.sim.world();
    let mut current = serde_json::to_value(&w.faults).unwrap_or(Value::Null);
    merge(&mut current, body.0);
    match serde_json::from_value::<Faults>(current) {
        Ok(f) => {
            w.faults = f;
            axum::Json(serde_json::to_value(&w.faults).unwrap_or(Value::Null)).into_response()
        }
        Err(e) => problem(422, &format!("faults: {e}")),
    }
}

#[derive(Deserialize)]
struct Advance {
    seconds: f64,
}

async fn advance(State(s): State<AppState>, body: axum::Json<Advance>) -> Response {
    s.sim.clock.advance(Duration::from_secs_f64(body.seconds.max(0.0)));
    let now = s.sim.clock.now();
    axum::Json(json!({"now": now.to_rfc3339()})).into_response()
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Stock {
    gpu_type_id: String,
    data_center_id: String,
    #[serde(default = "secure")]
    cloud_type: String,
    count: u32,
}

fn secure() -> String {
    "SECURE".into()
}

async fn stock(State(s): State<AppState>, body: axum::Json<Stock>) -> Response {
    let (mut w, _) = s.sim.world();
    w.stock.insert(format!("{}|{}|{}", body.gpu_type_id, body.data_center_id, body.cloud_type), body.count);
    axum::Json(json!({"ok": true})).into_response()
}

#[derive(Deserialize)]
struct Balance {
    balance: f64,
}

async fn balance(State(s): State<AppState>, body: axum::Json<Balance>) -> Response {
    let (mut w, _) = s.sim.world();
    w.balance = body.balance;
    axum::Json(json!({"balance": w.balance})).into_response()
}

async fn vanish(State(s): State<AppState>, Path(id): Path<String>) -> Response {
    let (mut w, now) = s.sim.world();
    match w.vanish(&id, now) {
        Ok(()) => axum::Json(json!({"ok": true})).into_response(),
        Err(e) => problem(404, &e.to_string()),
    }
}

async fn exit(State(s): State<AppState>, Path(id): Path<String>) -> Response {
    let (mut w, now) = s.sim.world();
    match w.exit(&id, now) {
        Ok(()) => axum::Json(json!({"ok": true})).into_response(),
        Err(e) => problem(404, &e.to_string()),
    }
}
