//! The REST v2 transport: `<base>/v2/...`, problem+json errors.

use std::collections::BTreeMap;

use serde::Deserialize;
use serde_json::{Value, json};

use super::http::{Answer, ClientOptions, Http, Idempotency, error_text};
use super::{
    Availability, CatalogEntry, GpuOffer, GpuQuery, NetworkVolume, Pod, PodSpec, PodStatus, PortMapping, RunPodApi,
    RunPodError, Runtime, Stock,
};

/// RunPod's REST v2 API.
#[derive(Clone, Debug)]
pub struct RestTransport {
    pub(super) http: Http,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct V2Pod {
    id: String,
    #[serde(default)]
    name: String,
    status: String,
    #[serde(default)]
    image: String,
    #[serde(default)]
    env: BTreeMap<String, String>,
    gpu: Option<V2Gpu>,
    #[serde(default)]
    cost_per_hr: f64,
    machine_id: Option<String>,
    data_center_id: Option<String>,
    network_volume_id: Option<String>,
    runtime: Option<V2Runtime>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct V2Gpu {
    id: String,
    #[serde(default)]
    count: i32,
    display_name: Option<String>,
}

#[derive(Deserialize)]
struct V2Runtime {
    #[serde(default)]
    uptime: i64,
    ports: Option<Vec<V2Port>>,
    #[serde(default)]
    gpus: Vec<Value>,
}

#[derive(Deserialize)]
struct V2Port {
    ip: String,
    private: i32,
    public: i32,
    #[serde(rename = "type")]
    kind: String,
}

impl From<V2Pod> for Pod {
    fn from(p: V2Pod) -> Self {
        Self {
            status: PodStatus::parse(&p.status),
            gpu_type_id: p.gpu.as_ref().map(|g| g.id.clone()),
            gpu_display_name: p.gpu.as_ref().and_then(|g| g.display_name.clone()),
            gpu_count: p.gpu.as_ref().map_or(0, |g| g.count),
            runtime: p.runtime.map(|r| Runtime {
                uptime_seconds: r.uptime,
                ports: r.ports.map(|ps| {
                    ps.into_iter()
                        .map(|q| PortMapping {
                            is_public: q.kind == "tcp",
                            ip: q.ip,
                            private_port: q.private,
                            public_port: q.public,
                            kind: q.kind,
                        })
                        .collect()
                }),
                gpu_ids: r.gpus.iter().enumerate().map(|(i, _)| format!("gpu{i}")).collect(),
            }),
            id: p.id,
            name: p.name,
            image: p.image,
            env: p.env,
            cost_per_hr: p.cost_per_hr,
            machine_id: p.machine_id,
            data_center_id: p.data_center_id,
            network_volume_id: p.network_volume_id,
        }
    }
}

impl RestTransport {
    pub fn new(endpoint: &str, api_key: &str, opts: ClientOptions) -> Result<Self, RunPodError> {
        Ok(Self { http: Http::new(endpoint, api_key, opts)? })
    }

    fn url(&self, path: &str) -> String {
        format!("{}/v2{path}", self.http.base)
    }

    async fn get(&self, op: &'static str, path: &str) -> Result<Answer, RunPodError> {
        let url = self.url(path);
        self.http.send(op, Idempotency::Safe, self.http.opts.timeout, |c| c.get(&url)).await
    }

    async fn action(&self, op: &'static str, id: &str, action: &str) -> Result<Answer, RunPodError> {
        let url = self.url(&format!("/pods/{id}/action"));
        let body = json!({"action": action});
        self.http.send(op, Idempotency::Safe, self.http.opts.timeout, |c| c.post(&url).json(&body)).await
    }
}

fn ok_json<T: for<'de> Deserialize<'de>>(op: &str, a: &Answer) -> Result<T, RunPodError> {
    if !(200..300).contains(&a.status) {
        return Err(RunPodError::from_status(a.status, error_text(&a.body), None));
    }
    serde_json::from_slice(&a.body)
        .map_err(|e| RunPodError::InvalidRequest { message: format!("{op}: unexpected answer shape: {e}") })
}

#[derive(Deserialize)]
struct PodList {
    pods: Vec<V2Pod>,
}

#[derive(Deserialize)]
struct Catalog {
    gpus: Vec<CatalogGpu>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct CatalogGpu {
    id: String,
    display_name: String,
    #[serde(default)]
    memory_in_gb: i32,
    #[serde(default)]
    max_gpu_count: i32,
    #[serde(default)]
    prices: CatalogPrices,
    #[serde(default)]
    availability: Vec<CatalogAvailability>,
}

#[derive(Default, Deserialize)]
struct CatalogPrices {
    secure: Option<f64>,
    community: Option<f64>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct CatalogAvailability {
    data_center_id: String,
    cloud: String,
    status: String,
}

#[derive(Deserialize)]
struct Volumes {
    #[serde(rename = "networkVolumes")]
    network_volumes: Vec<V2Volume>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct V2Volume {
    id: String,
    name: String,
    size: i64,
    data_center: String,
}

impl RunPodApi for RestTransport {
    async fn create_pod(&self, spec: &PodSpec) -> Result<Pod, RunPodError> {
        let mut body = json!({
            "name": spec.name,
            "image": spec.image,
            "gpu": {"id": spec.gpu_type_id, "count": spec.gpu_count},
            "cloud": spec.cloud_type.as_runpod(),
            "env": spec.env,
            "ports": spec.ports,
            "disk": spec.container_disk_gb,
        });
        if let Some(dc) = &spec.data_center_id {
            body["dataCenterIds"] = json!([dc]);
        }
        if let Some(v) = &spec.network_volume_id {
            body["mounts"] = json!({"network": [{"volumeId": v, "path": spec.volume_mount_path}]});
        }
        if let Some(argv) = &spec.start_command {
            body["args"] = json!(argv);
        }
        let url = self.url("/pods");
        let a = self
            .http
            .send("createPod", Idempotency::Unsafe, self.http.opts.create_timeout, |c| c.post(&url).json(&body))
            .await?;
        ok_json::<V2Pod>("createPod", &a).map(Pod::from)
    }

    async fn get_pod(&self, id: &str) -> Result<Option<Pod>, RunPodError> {
        let a = self.get("getPod", &format!("/pods/{id}")).await?;
        if a.status == 404 {
            return Ok(None);
        }
        ok_json::<V2Pod>("getPod", &a).map(|p| Some(Pod::from(p)))
    }

    async fn list_pods(&self) -> Result<Vec<Pod>, RunPodError> {
        let a = self.get("listPods", "/pods").await?;
        Ok(ok_json::<PodList>("listPods", &a)?.pods.into_iter().map(Pod::from).collect())
    }

    async fn stop_pod(&self, id: &str) -> Result<(), RunPodError> {
        let a = self.action("stopPod", id, "stop").await?;
        ok_json::<Value>("stopPod", &a).map(|_| ())
    }

    async fn resume_pod(&self, id: &str, _gpu_count: i32) -> Result<(), RunPodError> {
        let a = self.action("startPod", id, "start").await?;
        ok_json::<Value>("startPod", &a).map(|_| ())
    }

    async fn terminate_pod(&self, id: &str) -> Result<(), RunPodError> {
        let url = self.url(&format!("/pods/{id}"));
        let a = self.http.send("deletePod", Idempotency::Safe, self.http.opts.timeout, |c| c.delete(&url)).await?;
        match a.status {
            200..=299 | 404 => Ok(()),
            s => Err(RunPodError::from_status(s, error_text(&a.body), None)),
        }
    }

    async fn gpu_types(&self, query: &GpuQuery) -> Result<Vec<GpuOffer>, RunPodError> {
        let a = self.get("catalogGpus", "/catalog/gpus?include=AVAILABILITY&product=POD").await?;
        let catalog: Catalog = ok_json("catalogGpus", &a)?;
        let count = f64::from(query.gpu_count.max(1));
        Ok(catalog
            .gpus
            .into_iter()
            .filter(|g| query.id.as_ref().is_none_or(|id| *id == g.id))
            .map(|g| {
                let clouds: &[&str] = match query.cloud_type {
                    ep_api::CloudType::Secure => &["SECURE"],
                    ep_api::CloudType::Community => &["COMMUNITY"],
                    ep_api::CloudType::All => &["SECURE", "COMMUNITY"],
                };
                let stock = g
                    .availability
                    .iter()
                    .filter(|a| clouds.contains(&a.cloud.as_str()))
                    .filter(|a| query.data_center_id.as_ref().is_none_or(|d| *d == a.data_center_id))
                    .map(|a| Stock::parse(Some(&a.status)))
                    .max_by_key(|s| s.rank())
                    .unwrap_or(Stock::None);
                let price = clouds
                    .iter()
                    .filter_map(|c| if *c == "SECURE" { g.prices.secure } else { g.prices.community })
                    .fold(None, |m: Option<f64>, p| Some(m.map_or(p, |m| m.min(p))));
                GpuOffer {
                    id: g.id,
                    display_name: g.display_name,
                    memory_gb: g.memory_in_gb,
                    max_gpu_count: g.max_gpu_count,
                    price_per_hour: price.map(|p| p * count),
                    stock,
                }
            })
            .collect())
    }

    async fn catalog(&self, _data_center: &str) -> Result<Vec<CatalogEntry>, RunPodError> {
        let a = self.get("catalogGpus", "/catalog/gpus?include=AVAILABILITY&product=POD").await?;
        let catalog: Catalog = ok_json("catalogGpus", &a)?;
        Ok(catalog
            .gpus
            .into_iter()
            .map(|g| CatalogEntry {
                availability: g
                    .availability
                    .iter()
                    .filter_map(|a| {
                        let cloud = match a.cloud.as_str() {
                            "SECURE" => ep_api::CloudType::Secure,
                            "COMMUNITY" => ep_api::CloudType::Community,
                            _ => return None,
                        };
                        Some(Availability {
                            data_center_id: a.data_center_id.clone(),
                            cloud,
                            stock: Stock::parse(Some(&a.status)),
                        })
                    })
                    .collect(),
                id: g.id,
                display_name: g.display_name,
                memory_gb: g.memory_in_gb,
                secure_price: g.prices.secure,
                community_price: g.prices.community,
            })
            .collect())
    }

    async fn container_logs(&self, id: &str) -> Result<Option<String>, RunPodError> {
        let a = self.get("podLogs", &format!("/pods/{id}/logs")).await?;
        match a.status {
            200..=299 => Ok(Some(String::from_utf8_lossy(&a.body).into_owned())),
            404 => Ok(None),
            s => Err(RunPodError::from_status(s, error_text(&a.body), None)),
        }
    }

    async fn network_volumes(&self) -> Result<Vec<NetworkVolume>, RunPodError> {
        let a = self.get("networkVolumes", "/network-volumes").await?;
        Ok(ok_json::<Volumes>("networkVolumes", &a)?
            .network_volumes
            .into_iter()
            .map(|v| NetworkVolume { id: v.id, name: v.name, size_gb: v.size, data_center_id: v.data_center })
            .collect())
    }

    fn supports_terminate_after(&self) -> bool {
        false
    }
    fn self_terminate_base(&self) -> Option<String> {
        Some(self.http.base.clone())
    }
}
