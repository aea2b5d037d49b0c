//! The simulated account: catalog, stock, balance, volumes and pods, and how they change over time.
//!
//! Every operation takes the current simulated time, so the transports stay thin and the rules
//! (RunPod's exact error texts, stock, billing, start delays) live in one place.

use std::collections::BTreeMap;
use std::path::PathBuf;

use chrono::{DateTime, Utc};
use serde::Serialize;

use crate::config::{Faults, GpuTypeConfig, VolumeConfig, WorldConfig};
use crate::pods::PodProcess;

/// RunPod's error texts, exactly as its API sends them (runpod-api.md section 6).
pub mod messages {
    pub const CAPACITY: &str =
        "There are no longer any instances available with the requested specifications. Please refresh and try again.";
    pub const BALANCE: &str = "Your account balance is too low to rent a pod. Please add funds to your account.";
    pub const RESUME_NO_GPUS: &str = "There are not enough free GPUs on the host machine to start this pod.";
    pub const SPOT: &str = "Spot pods are no longer offered";
    pub const TERMINATE_NOT_FOUND: &str = "pod not found to terminate";
    pub const INTERNAL: &str = "Something went wrong. Please try again later or contact support.";
    pub const VOLUME_DELETE_MISSING: &str = "Tried to delete nonexistent network volume";
}

/// A failed operation, as RunPod would report it.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SimError {
    #[error("{}", messages::CAPACITY)]
    Capacity,
    #[error("{}", messages::RESUME_NO_GPUS)]
    ResumeNoGpus,
    #[error("{}", messages::BALANCE)]
    Balance,
    #[error("{}", messages::SPOT)]
    Spot,
    #[error("{}", messages::TERMINATE_NOT_FOUND)]
    TerminateNotFound,
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    Conflict(String),
}

impl SimError {
    /// `extensions.code` in GraphQL errors (RunPod's codes where known).
    pub fn graphql_code(&self) -> &'static str {
        match self {
            Self::Balance => "INSUFFICIENT_BALANCE",
            Self::TerminateNotFound | Self::NotFound(_) => "POD_NOT_FOUND",
            Self::Capacity | Self::ResumeNoGpus => "RESOURCE_UNAVAILABLE",
            Self::Spot | Self::Invalid(_) | Self::Conflict(_) => "BAD_USER_INPUT",
        }
    }
    /// HTTP status of the REST v2 problem response.
    pub fn rest_status(&self) -> u16 {
        match self {
            Self::Capacity | Self::ResumeNoGpus | Self::Spot => 400,
            Self::Balance => 402,
            Self::TerminateNotFound | Self::NotFound(_) => 404,
            Self::Invalid(_) => 422,
            Self::Conflict(_) => 409,
        }
    }
}

/// `desiredStatus` values.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum PodStatus {
    Running,
    Exited,
    Terminated,
}

impl PodStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Running => "RUNNING",
            Self::Exited => "EXITED",
            Self::Terminated => "TERMINATED",
        }
    }
}

/// What the container runs.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub enum StartCommand {
    /// GraphQL `dockerArgs`: a command line, run by `/bin/sh -c`.
    Shell(String),
    /// REST v2 `args`: argv, run directly.
    Argv(Vec<String>),
}

/// A create request, whichever transport it came through.
#[derive(Clone, Debug, Default)]
pub struct CreatePod {
    pub name: String,
    pub image_name: String,
    pub gpu_type_id: String,
    pub gpu_count: i32,
    /// SECURE, COMMUNITY or ALL.
    pub cloud_type: String,
    pub data_center_ids: Vec<String>,
    pub network_volume_id: Option<String>,
    pub volume_mount_path: Option<String>,
    pub volume_in_gb: i32,
    pub container_disk_in_gb: i32,
    pub min_vcpu_count: i32,
    pub min_memory_in_gb: i32,
    pub env: Vec<(String, String)>,
    pub ports: String,
    pub start: Option<StartCommand>,
    pub terminate_after: Option<DateTime<Utc>>,
    pub stop_after: Option<DateTime<Utc>>,
    pub interruptible: bool,
}

/// A port mapping of a running container.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PortMapping {
    pub ip: String,
    pub is_ip_public: bool,
    pub private_port: i32,
    pub public_port: i32,
    /// tcp or http.
    #[serde(rename = "type")]
    pub kind: String,
}

/// A pod.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Pod {
    pub id: String,
    /// The pod-scoped API key RunPod puts in the pod's RUNPOD_API_KEY: it acts on this pod only.
    #[serde(skip)]
    pub scoped_key: String,
    pub name: String,
    pub image_name: String,
    pub env: Vec<(String, String)>,
    pub gpu_type_id: String,
    pub gpu_display_name: String,
    pub gpu_count: i32,
    pub cloud_type: String,
    pub data_center_id: String,
    pub location: String,
    pub machine_id: String,
    pub pod_host_id: String,
    pub pod_type: String,
    pub cost_per_hr: f64,
    pub desired_status: PodStatus,
    pub last_status_change: String,
    pub created_at: DateTime<Utc>,
    pub last_started_at: DateTime<Utc>,
    /// When the container starts (None: never).
    pub runtime_at: Option<DateTime<Utc>>,
    /// When ports appear after the container started (None: never).
    pub ports_after_seconds: Option<f64>,
    /// Whether the container runs now.
    pub container_running: bool,
    pub port_mappings: Vec<PortMapping>,
    pub ports: String,
    pub start: Option<StartCommand>,
    pub volume_mount_path: String,
    pub network_volume_id: Option<String>,
    pub volume_in_gb: i32,
    pub container_disk_in_gb: i32,
    pub vcpu_count: i32,
    pub memory_in_gb: i32,
    pub terminate_after: Option<DateTime<Utc>>,
    pub stop_after: Option<DateTime<Utc>>,
    pub accrued_usd: f64,
    #[serde(skip)]
    pub billed_until: DateTime<Utc>,
    pub gpu_ids: Vec<String>,
    pub exit_code: Option<i32>,
    /// Pid of the container's main process while it runs.
    pub pid: Option<u32>,
    #[serde(skip)]
    pub process: Option<PodProcess>,
}

impl Pod {
    /// Seconds the container has been up.
    pub fn uptime_seconds(&self, now: DateTime<Utc>) -> i64 {
        match (self.container_running, self.runtime_at) {
            (true, Some(at)) => (now - at).num_seconds().max(0),
            _ => 0,
        }
    }
    /// Whether `runtime` reports ports now.
    pub fn ports_visible(&self, now: DateTime<Utc>) -> bool {
        match (self.container_running, self.runtime_at, self.ports_after_seconds) {
            (true, Some(at), Some(after)) => (now - at).as_seconds_f64() >= after,
            _ => false,
        }
    }
}

/// A pod shown as TERMINATED for a short while after it is gone.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct GonePod {
    pub pod: Pod,
    pub gone_at: DateTime<Utc>,
    pub reason: String,
}

/// Lowest price of a GPU type for a request.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct LowestPrice {
    pub gpu_type_id: String,
    pub gpu_name: String,
    pub uninterruptable_price: Option<f64>,
    pub minimum_bid_price: Option<f64>,
    pub stock_status: Option<String>,
    pub available_gpu_counts: Vec<i32>,
    pub max_unreserved_gpu_count: i32,
}

/// The whole simulated account.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct World {
    #[serde(skip)]
    pub config: WorldConfig,
    pub balance: f64,
    pub spend_usd: f64,
    /// Free GPUs by "gpu type id|data center|cloud".
    pub stock: BTreeMap<String, u32>,
    pub volumes: Vec<VolumeConfig>,
    pub pods: BTreeMap<String, Pod>,
    pub gone: Vec<GonePod>,
    pub faults: Faults,
    /// Requests served, by operation name.
    pub requests: BTreeMap<String, u64>,
    /// Pods ever created, by pod name (a name created twice is a duplicate the client made).
    pub created_by_name: BTreeMap<String, u32>,
    /// Requests refused with 429 by the rate-limit policy.
    pub rate_limited_answers: u64,
    #[serde(skip)]
    pub limiter: crate::ratelimit::Limiter,
    #[serde(skip)]
    pub state_dir: PathBuf,
}

fn stock_key(gpu: &str, dc: &str, cloud: &str) -> String {
    format!("{gpu}|{dc}|{cloud}")
}

/// A random lower-case alphanumeric id of `n` characters.
pub fn random_id(n: usize) -> String {
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    (0..n).map(|_| char::from(ALPHABET[fastrand::usize(..ALPHABET.len())])).collect()
}

fn hex(n: usize) -> String {
    (0..n).map(|_| char::from(b"0123456789abcdef"[fastrand::usize(..16)])).collect()
}

fn status_change(what: &str, now: DateTime<Utc>) -> String {
    // RunPod's free-text form, e.g. "Rented by User: Thu Aug 20 2026 03:29:12 GMT+0000 (Coordinated Universal Time)".
    format!("{what}: {} GMT+0000 (Coordinated Universal Time)", now.format("%a %b %d %Y %H:%M:%S"))
}

impl World {
    /// A world from its configuration, with volume directories under `state_dir`.
    pub fn new(config: WorldConfig, state_dir: PathBuf) -> Self {
        let stock = config
            .stock
            .iter()
            .map(|s| (stock_key(&s.gpu_type_id, &s.data_center_id, &s.cloud_type), s.count))
            .collect();
        Self {
            balance: config.account.balance,
            spend_usd: 0.0,
            stock,
            volumes: config.volumes.clone(),
            pods: BTreeMap::new(),
            gone: Vec::new(),
            faults: config.faults.clone(),
            requests: BTreeMap::new(),
            created_by_name: BTreeMap::new(),
            rate_limited_answers: 0,
            limiter: crate::ratelimit::Limiter::default(),
            state_dir,
            config,
        }
    }

    /// Directory backing a network volume.
    pub fn volume_dir(&self, id: &str) -> PathBuf {
        self.state_dir.join("volumes").join(id)
    }

    /// Directory of a pod's own files (its log, its volume disk).
    pub fn pod_dir(&self, id: &str) -> PathBuf {
        self.state_dir.join("pods").join(id)
    }

    pub fn gpu_type(&self, id: &str) -> Option<&GpuTypeConfig> {
        self.config.gpu_types.iter().find(|g| g.id == id)
    }

    pub fn count(&mut self, op: &str) {
        *self.requests.entry(op.to_owned()).or_default() += 1;
    }

    /// Current spend per hour of running pods.
    pub fn current_spend_per_hr(&self) -> f64 {
        self.pods.values().filter(|p| p.desired_status == PodStatus::Running).map(|p| p.cost_per_hr).sum()
    }

    /// Free GPUs of a type in a data center and cloud tier.
    pub fn free(&self, gpu: &str, dc: &str, cloud: &str) -> u32 {
        self.stock.get(&stock_key(gpu, dc, cloud)).copied().unwrap_or(0)
    }

    fn take(&mut self, gpu: &str, dc: &str, cloud: &str, n: u32) {
        if let Some(s) = self.stock.get_mut(&stock_key(gpu, dc, cloud)) {
            *s = s.saturating_sub(n);
        }
    }

    fn give_back(&mut self, gpu: &str, dc: &str, cloud: &str, n: u32) {
        *self.stock.entry(stock_key(gpu, dc, cloud)).or_default() += n;
    }

    /// Creates an on-demand (or, when enabled, spot) pod.
    pub fn create_pod(&mut self, req: CreatePod, now: DateTime<Utc>) -> Result<&Pod, SimError> {
        if req.interruptible && !self.config.spot_enabled {
            return Err(SimError::Spot);
        }
        let gpu = self.gpu_type(&req.gpu_type_id).cloned().ok_or(SimError::Capacity)?;
        let count = req.gpu_count.max(1);
        if count > gpu.max_gpu_count {
            return Err(SimError::Capacity);
        }
        let clouds: &[&str] = match req.cloud_type.as_str() {
            "SECURE" => &["SECURE"],
            "COMMUNITY" => &["COMMUNITY"],
            _ => &["SECURE", "COMMUNITY"],
        };
        // A network volume pins the pod to the volume's data center.
        let mut dcs: Vec<String> = if let Some(vid) = &req.network_volume_id {
            let vol = self
                .volumes
                .iter()
                .find(|v| &v.id == vid)
                .ok_or_else(|| SimError::Invalid(format!("Network volume {vid} does not exist")))?;
            if !req.data_center_ids.is_empty() && !req.data_center_ids.contains(&vol.data_center_id) {
                return Err(SimError::Capacity);
            }
            vec![vol.data_center_id.clone()]
        } else if req.data_center_ids.is_empty() {
            self.config.data_centers.iter().map(|d| d.id.clone()).collect()
        } else {
            req.data_center_ids.clone()
        };
        dcs.retain(|d| self.config.data_centers.iter().any(|c| &c.id == d));
        let per_gpu_for = |cloud: &str| if cloud == "SECURE" { gpu.secure_price } else { gpu.community_price };
        let cost_estimate =
            clouds.iter().filter_map(|c| per_gpu_for(c)).fold(f64::INFINITY, f64::min) * f64::from(count);
        // RunPod wants at least one hour of credit before it deploys.
        if self.balance < cost_estimate || self.balance <= 0.0 {
            return Err(SimError::Balance);
        }
        if self.faults.capacity_failures > 0 {
            self.faults.capacity_failures -= 1;
            return Err(SimError::Capacity);
        }
        let needed = u32::try_from(count).unwrap_or(u32::MAX);
        let (dc, cloud, price) = dcs
            .iter()
            .flat_map(|dc| clouds.iter().map(move |c| (dc.clone(), (*c).to_owned())))
            .find_map(|(dc, cloud)| {
                let price = per_gpu_for(&cloud)?;
                (self.free(&gpu.id, &dc, &cloud) >= needed).then_some((dc, cloud, price))
            })
            .ok_or(SimError::Capacity)?;
        self.take(&gpu.id, &dc, &cloud, needed);
        let id = random_id(14);
        let location =
            self.config.data_centers.iter().find(|d| d.id == dc).map(|d| d.location.clone()).unwrap_or_default();
        let timing = &self.config.pods;
        let failing_image = self.faults.failing_images.contains(&req.image_name);
        let runtime_at = (!self.faults.runtime_never_appears && !failing_image)
            .then(|| now + chrono::Duration::milliseconds((timing.start_delay_seconds * 1000.0) as i64));
        let ports_after_seconds = (!self.faults.starts_without_ports).then_some(timing.ports_delay_seconds);
        let pod = Pod {
            pod_host_id: format!("{id}-{}", hex(8)),
            machine_id: random_id(12),
            name: req.name,
            image_name: req.image_name,
            env: req.env,
            gpu_display_name: gpu.display_name.clone(),
            gpu_type_id: gpu.id.clone(),
            gpu_count: count,
            cloud_type: cloud,
            data_center_id: dc,
            location,
            pod_type: if req.interruptible { "INTERRUPTABLE" } else { "RESERVED" }.into(),
            cost_per_hr: (price * f64::from(count) * 1000.0).round() / 1000.0,
            desired_status: PodStatus::Running,
            last_status_change: status_change("Rented by User", now),
            created_at: now,
            last_started_at: now,
            runtime_at,
            ports_after_seconds,
            container_running: false,
            port_mappings: Vec::new(),
            ports: req.ports.replace(' ', ""),
            start: req.start,
            volume_mount_path: req.volume_mount_path.unwrap_or_else(|| "/workspace".into()),
            network_volume_id: req.network_volume_id,
            volume_in_gb: req.volume_in_gb,
            container_disk_in_gb: req.container_disk_in_gb,
            vcpu_count: req.min_vcpu_count.max(4 * count),
            memory_in_gb: req.min_memory_in_gb.max(gpu.memory_in_gb * count),
            terminate_after: req.terminate_after,
            stop_after: req.stop_after,
            accrued_usd: 0.0,
            billed_until: now,
            gpu_ids: (0..count).map(|_| format!("GPU-{}-{}-{}", hex(8), hex(4), hex(12))).collect(),
            exit_code: None,
            pid: None,
            process: None,
            scoped_key: format!("rpa_pod_{}", random_id(32)),
            id: id.clone(),
        };
        *self.created_by_name.entry(pod.name.clone()).or_default() += 1;
        if failing_image {
            // What docker tells RunPod's container log when an image cannot be pulled.
            let dir = self.pod_dir(&id);
            let log = format!(
                "{} create container {image}\n{} error pulling image: Error response from daemon: pull access denied for {image}, repository does not exist or may require 'docker login': denied: requested access to the resource is denied\n",
                now.to_rfc3339(),
                now.to_rfc3339(),
                image = pod.image_name,
            );
            let _ = std::fs::create_dir_all(&dir).and_then(|()| std::fs::write(dir.join("container.log"), log));
        }
        self.pods.insert(id.clone(), pod);
        self.pods.get(&id).ok_or(SimError::Capacity)
    }

    /// `podStop`: the container stops, the GPU goes back to the pool, the pod stays on its host.
    pub fn stop_pod(&mut self, id: &str, now: DateTime<Utc>) -> Result<&Pod, SimError> {
        let grace = self.config.pods.stop_grace_seconds;
        let pod = self.pods.get_mut(id).ok_or_else(|| SimError::NotFound(format!("pod {id} not found")))?;
        if pod.desired_status == PodStatus::Running {
            pod.desired_status = PodStatus::Exited;
            pod.last_status_change = status_change("Exited by User", now);
            stop_container(pod, grace);
            let (g, d, c, n) =
                (pod.gpu_type_id.clone(), pod.data_center_id.clone(), pod.cloud_type.clone(), pod.gpu_count);
            self.give_back(&g, &d, &c, u32::try_from(n).unwrap_or(0));
        }
        self.pods.get(id).ok_or_else(|| SimError::NotFound(format!("pod {id} not found")))
    }

    /// `podResume`: needs the GPU back on the same host.
    pub fn resume_pod(&mut self, id: &str, now: DateTime<Utc>) -> Result<&Pod, SimError> {
        let pod = self.pods.get(id).ok_or_else(|| SimError::NotFound(format!("pod {id} not found")))?;
        if pod.desired_status == PodStatus::Running {
            return self.pods.get(id).ok_or(SimError::Capacity);
        }
        let (g, d, c, n) = (pod.gpu_type_id.clone(), pod.data_center_id.clone(), pod.cloud_type.clone(), pod.gpu_count);
        let n = u32::try_from(n).unwrap_or(0);
        if self.faults.resume_failures > 0 || self.free(&g, &d, &c) < n {
            self.faults.resume_failures = self.faults.resume_failures.saturating_sub(1);
            return Err(SimError::ResumeNoGpus);
        }
        if self.balance <= 0.0 {
            return Err(SimError::Balance);
        }
        self.take(&g, &d, &c, n);
        let delay = self.config.pods.start_delay_seconds;
        let never = self.faults.runtime_never_appears;
        let pod = self.pods.get_mut(id).ok_or(SimError::Capacity)?;
        pod.desired_status = PodStatus::Running;
        pod.last_status_change = status_change("Resumed by User", now);
        pod.last_started_at = now;
        pod.billed_until = now;
        pod.exit_code = None;
        pod.runtime_at = (!never).then(|| now + chrono::Duration::milliseconds((delay * 1000.0) as i64));
        Ok(pod)
    }

    /// `podTerminate`: gone for good.
    pub fn terminate_pod(&mut self, id: &str, now: DateTime<Utc>, reason: &str) -> Result<(), SimError> {
        let mut pod = self.pods.remove(id).ok_or(SimError::TerminateNotFound)?;
        if pod.desired_status == PodStatus::Running {
            let n = u32::try_from(pod.gpu_count).unwrap_or(0);
            self.give_back(&pod.gpu_type_id, &pod.data_center_id, &pod.cloud_type, n);
        }
        stop_container(&mut pod, 0.0);
        pod.desired_status = PodStatus::Terminated;
        pod.last_status_change = status_change("Terminated", now);
        self.gone.push(GonePod { pod, gone_at: now, reason: reason.into() });
        Ok(())
    }

    /// Lowest price and stock of a GPU type for a request.
    pub fn lowest_price(
        &self,
        gpu: &GpuTypeConfig,
        gpu_count: i32,
        secure_cloud: Option<bool>,
        data_center: Option<&str>,
    ) -> LowestPrice {
        let clouds: Vec<&str> = match secure_cloud {
            Some(true) => vec!["SECURE"],
            Some(false) => vec!["COMMUNITY"],
            None => vec!["SECURE", "COMMUNITY"],
        };
        let free: u32 = self
            .config
            .data_centers
            .iter()
            .filter(|d| data_center.is_none_or(|want| want == d.id))
            .flat_map(|d| clouds.iter().map(move |c| (d.id.as_str(), *c)))
            .map(|(d, c)| self.free(&gpu.id, d, c))
            .sum();
        let price = clouds
            .iter()
            .filter_map(|c| if *c == "SECURE" { gpu.secure_price } else { gpu.community_price })
            .fold(None, |m: Option<f64>, p| Some(m.map_or(p, |m| m.min(p))));
        let count = gpu_count.max(1);
        let stock = match free {
            0 => "None",
            1 => "Low",
            2 | 3 => "Medium",
            _ => "High",
        };
        let usable = i32::try_from(free).unwrap_or(i32::MAX).min(gpu.max_gpu_count);
        LowestPrice {
            gpu_type_id: gpu.id.clone(),
            gpu_name: gpu.display_name.clone(),
            uninterruptable_price: price.map(|p| p * f64::from(count)),
            minimum_bid_price: if self.config.spot_enabled { price.map(|p| p * 0.5 * f64::from(count)) } else { None },
            stock_status: price.map(|_| stock.to_owned()),
            available_gpu_counts: (1..=usable).collect(),
            max_unreserved_gpu_count: usable,
        }
    }

    /// Creates a network volume.
    pub fn create_volume(&mut self, name: &str, size_gb: u64, dc: &str) -> Result<VolumeConfig, SimError> {
        if !self.config.data_centers.iter().any(|d| d.id == dc) {
            return Err(SimError::Invalid(format!("Unknown data center {dc}")));
        }
        let v = VolumeConfig { id: random_id(10), name: name.into(), size_gb, data_center_id: dc.into() };
        self.volumes.push(v.clone());
        Ok(v)
    }

    /// Deletes a network volume (its files go too).
    pub fn delete_volume(&mut self, id: &str) -> Result<(), SimError> {
        let before = self.volumes.len();
        self.volumes.retain(|v| v.id != id);
        if self.volumes.len() == before {
            return Err(SimError::NotFound(format!("{}: {id}", messages::VOLUME_DELETE_MISSING)));
        }
        let _ = std::fs::remove_dir_all(self.volume_dir(id));
        Ok(())
    }

    /// Advances the world to `now`: billing, container start and exit, terminateAfter, balance.
    pub fn tick(&mut self, now: DateTime<Utc>) {
        let mut terminate = Vec::new();
        let mut stop = Vec::new();
        let ids: Vec<String> = self.pods.keys().cloned().collect();
        for id in ids {
            let Some(pod) = self.pods.get_mut(&id) else { continue };
            if pod.desired_status == PodStatus::Running && now > pod.billed_until {
                let hours = (now - pod.billed_until).as_seconds_f64() / 3600.0;
                let cost = hours * pod.cost_per_hr;
                pod.accrued_usd += cost;
                pod.billed_until = now;
                self.balance -= cost;
                self.spend_usd += cost;
            }
            if pod.desired_status == PodStatus::Running
                && !pod.container_running
                && pod.runtime_at.is_some_and(|at| at <= now)
            {
                pod.container_running = true;
                pod.port_mappings = crate::pods::port_mappings(&pod.ports);
                if pod.start.is_some() {
                    match crate::pods::spawn(pod, &self.state_dir) {
                        Ok(p) => {
                            pod.pid = Some(p.pid());
                            pod.process = Some(p);
                        }
                        Err(e) => {
                            tracing::warn!(pod = %pod.id, error = %e, "container start command failed to launch");
                            pod.exit_code = Some(127);
                            pod.desired_status = PodStatus::Exited;
                            pod.container_running = false;
                            pod.last_status_change = status_change("Exited", now);
                        }
                    }
                }
            }
            if let Some(code) = pod.process.as_mut().and_then(PodProcess::exited) {
                // The container's main process ended: the pod reads EXITED, the GPU is released.
                pod.exit_code = Some(code);
                pod.pid = None;
                pod.process = None;
                if pod.desired_status == PodStatus::Running {
                    stop.push((id.clone(), "Exited"));
                }
            }
            if pod.terminate_after.is_some_and(|t| t <= now) {
                terminate.push((id.clone(), "terminateAfter reached"));
            } else if pod.desired_status == PodStatus::Running && pod.stop_after.is_some_and(|t| t <= now) {
                stop.push((id.clone(), "stopAfter reached"));
            }
        }
        if self.balance <= 0.0 {
            // Out of money: pods with a network volume stop, the others are terminated (RunPod pricing docs).
            for (id, pod) in &self.pods {
                if pod.desired_status == PodStatus::Running {
                    if pod.network_volume_id.is_some() {
                        stop.push((id.clone(), "balance exhausted"));
                    } else {
                        terminate.push((id.clone(), "balance exhausted"));
                    }
                }
            }
        }
        for (id, why) in stop {
            if let Some(pod) = self.pods.get(&id)
                && pod.desired_status == PodStatus::Running
            {
                let _ = self.stop_pod(&id, now);
                if let Some(pod) = self.pods.get_mut(&id) {
                    pod.last_status_change = status_change(why, now);
                }
            }
        }
        for (id, why) in terminate {
            let _ = self.terminate_pod(&id, now, why);
        }
        for p in self.pods.values_mut() {
            if let Some(proc) = p.process.as_mut() {
                proc.enforce_grace();
            }
        }
        let window = self.config.pods.terminated_visible_seconds;
        self.gone.retain_mut(|g| {
            if let Some(proc) = g.pod.process.as_mut() {
                proc.enforce_grace();
            }
            (now - g.gone_at).as_seconds_f64() < window.max(0.0)
                || g.pod.process.as_ref().is_some_and(PodProcess::alive)
        });
    }

    /// Makes a pod vanish without a trace, as after host loss (test hook).
    pub fn vanish(&mut self, id: &str, now: DateTime<Utc>) -> Result<(), SimError> {
        self.terminate_pod(id, now, "host lost")?;
        if let Some(g) = self.gone.last_mut() {
            g.gone_at = now - chrono::Duration::days(1);
        }
        Ok(())
    }

    /// Stops a pod as RunPod does on its own (interruption, maintenance; test hook).
    pub fn exit(&mut self, id: &str, now: DateTime<Utc>) -> Result<(), SimError> {
        self.stop_pod(id, now)?;
        if let Some(p) = self.pods.get_mut(id) {
            p.last_status_change = status_change("Exited by RunPod", now);
        }
        Ok(())
    }
}

fn stop_container(pod: &mut Pod, grace: f64) {
    pod.container_running = false;
    pod.port_mappings.clear();
    if let Some(p) = pod.process.as_mut() {
        p.stop(grace);
    }
    pod.pid = None;
}

#[cfg(test)]
mod tests;
