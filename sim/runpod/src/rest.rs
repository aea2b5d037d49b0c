//! RunPod's REST v2 API (`/v2/...`): nested create body, unknown keys refused (422), RFC 9457
//! problem responses (400 capacity, 402 balance, 404, 409 action not allowed).

use std::collections::{BTreeMap, HashMap};

use axum::Router;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use chrono::{DateTime, Utc};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::server::{AppState, authorized, authorized_for_pod, transport_fault};
use crate::world::{CreatePod, Pod, PodStatus, SimError, StartCommand, World};

pub(crate) fn routes() -> Router<AppState> {
    Router::new()
        .route("/pods", get(list_pods).post(create_pod))
        .route("/pods/{id}", get(get_pod).delete(delete_pod))
        .route("/pods/{id}/action", post(action))
        .route("/pods/{id}/logs", get(logs))
        .route("/catalog/gpus", get(catalog_gpus))
        .route("/network-volumes", get(network_volumes))
}

pub(crate) fn problem(status: u16, detail: &str) -> Response {
    let code = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let title = code.canonical_reason().unwrap_or("Error");
    (
        code,
        [(header::CONTENT_TYPE, "application/problem+json")],
        json!({"title": title, "status": status, "detail": detail}).to_string(),
    )
        .into_response()
}

fn sim_error(e: &SimError) -> Response {
    problem(e.rest_status(), &e.to_string())
}

async fn gate(state: &AppState, headers: &HeaderMap, query: &HashMap<String, String>, op: &str) -> Option<Response> {
    gate_for(state, headers, query, op, None).await
}

/// As `gate`, for a route on one pod: that pod's own scoped key is accepted too.
async fn gate_for(
    state: &AppState,
    headers: &HeaderMap,
    query: &HashMap<String, String>,
    op: &str,
    pod: Option<&str>,
) -> Option<Response> {
    if !headers.contains_key(header::AUTHORIZATION) && !query.contains_key("api_key") {
        return Some(problem(401, "missing bearer token"));
    }
    let ok = match pod {
        Some(id) => authorized_for_pod(&state.sim, headers, query, id),
        None => authorized(&state.sim, headers, query),
    };
    if !ok {
        return Some(problem(403, "access denied"));
    }
    transport_fault(&state.sim, op).await
}

fn status_of(p: &Pod) -> &'static str {
    match p.desired_status {
        PodStatus::Running => "RUNNING",
        PodStatus::Exited => "EXITED",
        PodStatus::Terminated => "TERMINATED",
    }
}

fn actions(p: &Pod) -> Vec<&'static str> {
    match p.desired_status {
        PodStatus::Running => vec!["stop", "restart", "terminate"],
        PodStatus::Exited => vec!["start", "terminate"],
        PodStatus::Terminated => vec![],
    }
}

fn pod_json(p: &Pod, now: DateTime<Utc>) -> Value {
    let runtime = p.container_running.then(|| {
        json!({
            "uptime": p.uptime_seconds(now),
            "ports": if p.ports_visible(now) {
                Value::Array(p.port_mappings.iter().map(|m| json!({"ip": m.ip, "private": m.private_port, "public": m.public_port, "type": m.kind})).collect())
            } else { Value::Null },
            "gpus": p.gpu_ids.iter().map(|_| json!({"util": 0.0, "memoryUtil": 0.0})).collect::<Vec<_>>(),
            "cpu": {"util": 0.0},
            "memory": {"util": 0.0},
        })
    });
    json!({
        "id": p.id,
        "name": p.name,
        "status": status_of(p),
        "actions": actions(p),
        "image": p.image_name,
        "gpu": {"id": p.gpu_type_id, "count": p.gpu_count, "displayName": p.gpu_display_name},
        "cloud": p.cloud_type,
        "dataCenterId": p.data_center_id,
        "machineId": p.machine_id,
        "costPerHr": p.cost_per_hr,
        "cost": p.accrued_usd,
        "env": p.env.iter().cloned().collect::<BTreeMap<String, String>>(),
        "ports": p.ports.split(',').filter(|s| !s.is_empty()).collect::<Vec<_>>(),
        "networkVolumeId": p.network_volume_id,
        "mounts": p.network_volume_id.as_ref().map(|v| json!({"network": [{"volumeId": v, "path": p.volume_mount_path}]})),
        "runtime": runtime,
        "createdAt": p.created_at.to_rfc3339(),
        "startedAt": p.last_started_at.to_rfc3339(),
    })
}

fn listed(w: &World, now: DateTime<Utc>) -> Vec<Value> {
    let window = w.config.pods.terminated_visible_seconds;
    w.pods
        .values()
        .map(|p| pod_json(p, now))
        .chain(w.gone.iter().filter(|g| (now - g.gone_at).as_seconds_f64() < window).map(|g| pod_json(&g.pod, now)))
        .collect()
}

async fn list_pods(State(s): State<AppState>, Query(q): Query<HashMap<String, String>>, h: HeaderMap) -> Response {
    if let Some(r) = gate(&s, &h, &q, "rest.listPods").await {
        return r;
    }
    // v2 has no server-side filters and silently ignores unknown query parameters.
    let (w, now) = s.sim.world();
    axum::Json(json!({"pods": listed(&w, now)})).into_response()
}

async fn get_pod(
    State(s): State<AppState>,
    Path(id): Path<String>,
    Query(q): Query<HashMap<String, String>>,
    h: HeaderMap,
) -> Response {
    if let Some(r) = gate_for(&s, &h, &q, "rest.getPod", Some(&id)).await {
        return r;
    }
    let (w, now) = s.sim.world();
    match w.pods.get(&id) {
        Some(p) => axum::Json(pod_json(p, now)).into_response(),
        None => problem(404, &format!("pod {id} not found")),
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct CreateBody {
    name: String,
    image: Option<String>,
    template_id: Option<String>,
    gpu: Option<GpuBody>,
    cpu: Option<Value>,
    cloud: Option<String>,
    data_center_ids: Option<Vec<String>>,
    disk: Option<Value>,
    args: Option<Vec<String>>,
    ports: Option<Vec<String>>,
    env: Option<BTreeMap<String, String>>,
    registry: Option<Value>,
    mounts: Option<Mounts>,
    start_ssh: Option<bool>,
    start_jupyter: Option<bool>,
    global_networking: Option<bool>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct GpuBody {
    id: String,
    count: Option<i32>,
    allowed_cuda_versions: Option<Vec<String>>,
    min_cuda_version: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Mounts {
    persistent: Option<Persistent>,
    network: Option<Vec<NetworkMount>>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Persistent {
    size: i32,
    path: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct NetworkMount {
    volume_id: String,
    path: Option<String>,
}

async fn create_pod(
    State(s): State<AppState>,
    Query(q): Query<HashMap<String, String>>,
    h: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    if let Some(r) = gate(&s, &h, &q, "rest.createPod").await {
        return r;
    }
    let b: CreateBody = match serde_json::from_slice(&body) {
        Ok(b) => b,
        Err(e) => return problem(422, &format!("request body: {e}")),
    };
    let _ = (&b.template_id, &b.registry, b.start_ssh, b.start_jupyter, b.global_networking);
    if b.cpu.is_some() {
        return problem(422, "cpu pods are not simulated");
    }
    let Some(gpu) = b.gpu else { return problem(422, "gpu: required") };
    let _ = (&gpu.allowed_cuda_versions, &gpu.min_cuda_version);
    let Some(image) = b.image else { return problem(422, "image: required unless templateId is given") };
    let network = b.mounts.as_ref().and_then(|m| m.network.as_ref());
    if network.is_some_and(|n| n.len() > 1) {
        return problem(422, "mounts.network: at most 1 item");
    }
    let network = network.and_then(|n| n.first());
    let req = CreatePod {
        name: b.name,
        image_name: image,
        gpu_type_id: gpu.id,
        gpu_count: gpu.count.unwrap_or(1),
        cloud_type: b.cloud.unwrap_or_else(|| "SECURE".into()),
        data_center_ids: b.data_center_ids.unwrap_or_default(),
        network_volume_id: network.map(|n| n.volume_id.clone()),
        volume_mount_path: network
            .and_then(|n| n.path.clone())
            .or_else(|| b.mounts.as_ref().and_then(|m| m.persistent.as_ref()).and_then(|p| p.path.clone())),
        volume_in_gb: b.mounts.as_ref().and_then(|m| m.persistent.as_ref()).map_or(0, |p| p.size),
        container_disk_in_gb: b.disk.as_ref().and_then(Value::as_i64).and_then(|d| i32::try_from(d).ok()).unwrap_or(50),
        min_vcpu_count: 1,
        min_memory_in_gb: 1,
        env: b.env.unwrap_or_default().into_iter().collect(),
        ports: b.ports.unwrap_or_default().join(","),
        start: b.args.filter(|a| !a.is_empty()).map(StartCommand::Argv),
        terminate_after: None,
        stop_after: None,
        interruptible: false,
    };
    let (response, delay) = {
        let (mut w, now) = s.sim.world();
        let response = match w.create_pod(req, now) {
            Ok(p) => (StatusCode::CREATED, axum::Json(pod_json(p, now))).into_response(),
            Err(e) => return sim_error(&e),
        };
        if w.faults.create_lost_answers > 0 {
            // The pod exists on RunPod's side; the caller hears only a bad gateway.
            w.faults.create_lost_answers -= 1;
            return (StatusCode::BAD_GATEWAY, "502 Bad Gateway").into_response();
        }
        let delay = (w.faults.create_timeouts > 0).then(|| {
            w.faults.create_timeouts -= 1;
            w.faults.create_timeout_seconds
        });
        (response, delay)
    };
    if let Some(secs) = delay {
        // The pod exists on RunPod's side; the caller only hears back after its timeout.
        tokio::time::sleep(std::time::Duration::from_secs(secs)).await;
    }
    response
}

async fn delete_pod(
    State(s): State<AppState>,
    Path(id): Path<String>,
    Query(q): Query<HashMap<String, String>>,
    h: HeaderMap,
) -> Response {
    if let Some(r) = gate_for(&s, &h, &q, "rest.deletePod", Some(&id)).await {
        return r;
    }
    let (mut w, now) = s.sim.world();
    match w.terminate_pod(&id, now, "terminated by user") {
        Ok(()) => StatusCode::NO_CONTENT.into_response(),
        Err(e) => sim_error(&e),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ActionBody {
    action: String,
}

async fn action(
    State(s): State<AppState>,
    Path(id): Path<String>,
    Query(q): Query<HashMap<String, String>>,
    h: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    if let Some(r) = gate_for(&s, &h, &q, "rest.podAction", Some(&id)).await {
        return r;
    }
    let a: ActionBody = match serde_json::from_slice(&body) {
        Ok(a) => a,
        Err(e) => return problem(422, &format!("request body: {e}")),
    };
    let (mut w, now) = s.sim.world();
    let Some(pod) = w.pods.get(&id) else { return problem(404, &format!("pod {id} not found")) };
    if !actions(pod).contains(&a.action.as_str()) {
        let status = status_of(pod);
        return problem(409, &format!("action {} is not allowed while the pod is {status}", a.action));
    }
    let result = match a.action.as_str() {
        "stop" => w.stop_pod(&id, now).map(|_| ()),
        "start" => w.resume_pod(&id, now).map(|_| ()),
        "restart" => w.stop_pod(&id, now).map(|_| ()).and_then(|()| w.resume_pod(&id, now).map(|_| ())),
        "terminate" => {
            return match w.terminate_pod(&id, now, "terminated by user") {
                Ok(()) => StatusCode::NO_CONTENT.into_response(),
                Err(e) => sim_error(&e),
            };
        }
        other => return problem(422, &format!("unknown action {other}")),
    };
    match result.and_then(|()| w.pods.get(&id).ok_or_else(|| SimError::NotFound(id.clone()))) {
        Ok(p) => axum::Json(pod_json(p, now)).into_response(),
        Err(e) => sim_error(&e),
    }
}

async fn logs(
    State(s): State<AppState>,
    Path(id): Path<String>,
    Query(q): Query<HashMap<String, String>>,
    h: HeaderMap,
) -> Response {
    if let Some(r) = gate(&s, &h, &q, "rest.podLogs").await {
        return r;
    }
    let path = {
        let (w, _) = s.sim.world();
        if !w.pods.contains_key(&id) {
            return problem(404, &format!("pod {id} not found"));
        }
        w.pod_dir(&id).join("container.log")
    };
    let text = tokio::fs::read_to_string(path).await.unwrap_or_default();
    ([(header::CONTENT_TYPE, "text/plain; charset=utf-8")], text).into_response()
}

async fn catalog_gpus(State(s): State<AppState>, Query(q): Query<HashMap<String, String>>, h: HeaderMap) -> Response {
    if let Some(r) = gate(&s, &h, &q, "rest.catalogGpus").await {
        return r;
    }
    let (w, _) = s.sim.world();
    let gpus: Vec<Value> = w
        .config
        .gpu_types
        .iter()
        .map(|g| {
            let availability: Vec<Value> = w
                .config
                .data_centers
                .iter()
                .flat_map(|d| ["SECURE", "COMMUNITY"].map(|c| (d, c)))
                .map(|(d, c)| {
                    let free = w.free(&g.id, &d.id, c);
                    let status = match free {
                        0 => "NONE",
                        1 => "LOW",
                        2 | 3 => "MEDIUM",
                        _ => "HIGH",
                    };
                    json!({"dataCenterId": d.id, "cloud": c, "status": status, "count": free})
                })
                .collect();
            json!({
                "id": g.id, "displayName": g.display_name, "manufacturer": g.manufacturer, "memoryInGb": g.memory_in_gb,
                "maxGpuCount": g.max_gpu_count,
                "prices": {"secure": g.secure_price, "community": g.community_price},
                "availability": availability,
            })
        })
        .collect();
    axum::Json(json!({"gpus": gpus})).into_response()
}

async fn network_volumes(
    State(s): State<AppState>,
    Query(q): Query<HashMap<String, String>>,
    h: HeaderMap,
) -> Response {
    if let Some(r) = gate(&s, &h, &q, "rest.networkVolumes").await {
        return r;
    }
    let (w, _) = s.sim.world();
    let vols: Vec<Value> = w
        .volumes
        .iter()
        .map(|v| json!({"id": v.id, "name": v.name, "size": v.size_gb, "dataCenter": v.data_center_id, "type": "STANDARD"}))
        .collect();
    axum::Json(json!({"networkVolumes": vols})).into_response()
}
