//! Snapshots of world objects in RunPod's GraphQL shapes (also used by the admin endpoint).

use async_graphql::{Enum, InputObject, SimpleObject};
use chrono::{DateTime, Utc};

use crate::config::VolumeConfig;
use crate::world::{Pod, World};

#[derive(Clone, Debug, SimpleObject)]
#[graphql(name = "Pod")]
pub struct PodView {
    pub id: String,
    pub name: String,
    pub image_name: String,
    /// `["KEY=value", ...]` as RunPod returns it.
    pub env: Vec<String>,
    pub desired_status: String,
    pub last_status_change: String,
    pub last_started_at: String,
    pub machine_id: String,
    pub pod_type: String,
    pub cost_per_hr: f64,
    pub adjusted_cost_per_hr: f64,
    pub gpu_count: i32,
    pub vcpu_count: i32,
    pub memory_in_gb: i32,
    pub volume_in_gb: i32,
    pub container_disk_in_gb: i32,
    pub volume_mount_path: String,
    pub ports: String,
    /// Legacy, always null.
    pub port: Option<i32>,
    /// Stuck at 0 on RunPod; read `runtime.uptimeInSeconds`.
    pub uptime_seconds: i32,
    pub docker_args: Option<String>,
    pub docker_id: Option<String>,
    pub template_id: Option<String>,
    pub container_registry_auth_id: Option<String>,
    pub network_volume_id: Option<String>,
    pub locked: bool,
    pub runtime: Option<RuntimeView>,
    pub machine: MachineView,
    pub network_volume: Option<NetworkVolumeView>,
}

#[derive(Clone, Debug, SimpleObject)]
#[graphql(name = "PodRuntime")]
pub struct RuntimeView {
    pub uptime_in_seconds: i32,
    pub ports: Option<Vec<PortView>>,
    pub gpus: Vec<RuntimeGpuView>,
    pub container: ContainerView,
}

#[derive(Clone, Debug, SimpleObject)]
#[graphql(name = "PodRuntimePorts")]
pub struct PortView {
    pub ip: String,
    pub is_ip_public: bool,
    pub private_port: i32,
    pub public_port: i32,
    #[graphql(name = "type")]
    pub kind: String,
}

#[derive(Clone, Debug, SimpleObject)]
#[graphql(name = "PodRuntimeGpus")]
pub struct RuntimeGpuView {
    pub id: String,
    pub gpu_util_percent: f64,
    pub memory_util_percent: f64,
}

#[derive(Clone, Debug, SimpleObject)]
#[graphql(name = "PodRuntimeContainer")]
pub struct ContainerView {
    pub cpu_percent: f64,
    pub memory_percent: f64,
}

#[derive(Clone, Debug, SimpleObject)]
#[graphql(name = "PodMachineInfo")]
pub struct MachineView {
    pub pod_host_id: String,
    pub gpu_display_name: String,
    pub gpu_type_id: String,
    pub data_center_id: String,
    pub location: String,
    pub secure_cloud: bool,
    pub cost_per_hr: f64,
}

#[derive(Clone, Debug, SimpleObject)]
#[graphql(name = "NetworkVolume")]
pub struct NetworkVolumeView {
    pub id: String,
    pub name: String,
    pub size: i32,
    pub data_center_id: String,
}

impl From<&VolumeConfig> for NetworkVolumeView {
    fn from(v: &VolumeConfig) -> Self {
        Self {
            id: v.id.clone(),
            name: v.name.clone(),
            size: i32::try_from(v.size_gb).unwrap_or(i32::MAX),
            data_center_id: v.data_center_id.clone(),
        }
    }
}

/// RunPod's `CloudTypeEnum`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Enum)]
#[graphql(name = "CloudTypeEnum")]
pub enum CloudTypeEnum {
    All,
    Secure,
    Community,
}

impl CloudTypeEnum {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::All => "ALL",
            Self::Secure => "SECURE",
            Self::Community => "COMMUNITY",
        }
    }
}

#[derive(Clone, Debug, InputObject)]
pub struct EnvironmentVariableInput {
    pub key: String,
    pub value: String,
}

/// A snapshot of one pod.
pub fn pod_view(pod: &Pod, world: &World, now: DateTime<Utc>) -> PodView {
    let runtime = pod.container_running.then(|| RuntimeView {
        uptime_in_seconds: i32::try_from(pod.uptime_seconds(now)).unwrap_or(i32::MAX),
        ports: pod.ports_visible(now).then(|| {
            pod.port_mappings
                .iter()
                .map(|p| PortView {
                    ip: p.ip.clone(),
                    is_ip_public: p.is_ip_public,
                    private_port: p.private_port,
                    public_port: p.public_port,
                    kind: p.kind.clone(),
                })
                .collect()
        }),
        gpus: pod
            .gpu_ids
            .iter()
            .map(|id| RuntimeGpuView { id: id.clone(), gpu_util_percent: 0.0, memory_util_percent: 0.0 })
            .collect(),
        container: ContainerView { cpu_percent: 0.0, memory_percent: 0.0 },
    });
    PodView {
        id: pod.id.clone(),
        name: pod.name.clone(),
        image_name: pod.image_name.clone(),
        env: pod.env.iter().map(|(k, v)| format!("{k}={v}")).collect(),
        desired_status: pod.desired_status.as_str().into(),
        last_status_change: pod.last_status_change.clone(),
        last_started_at: pod.last_started_at.to_rfc3339(),
        machine_id: pod.machine_id.clone(),
        pod_type: pod.pod_type.clone(),
        cost_per_hr: pod.cost_per_hr,
        adjusted_cost_per_hr: pod.cost_per_hr,
        gpu_count: pod.gpu_count,
        vcpu_count: pod.vcpu_count,
        memory_in_gb: pod.memory_in_gb,
        volume_in_gb: pod.volume_in_gb,
        container_disk_in_gb: pod.container_disk_in_gb,
        volume_mount_path: pod.volume_mount_path.clone(),
        ports: pod.ports.clone(),
        port: None,
        uptime_seconds: 0,
        docker_args: match &pod.start {
            Some(crate::world::StartCommand::Shell(s)) => Some(s.clone()),
            Some(crate::world::StartCommand::Argv(a)) => Some(a.join(" ")),
            None => None,
        },
        docker_id: None,
        template_id: None,
        container_registry_auth_id: None,
        network_volume_id: pod.network_volume_id.clone(),
        locked: false,
        runtime,
        machine: MachineView {
            pod_host_id: pod.pod_host_id.clone(),
            gpu_display_name: pod.gpu_display_name.clone(),
            gpu_type_id: pod.gpu_type_id.clone(),
            data_center_id: pod.data_center_id.clone(),
            location: pod.location.clone(),
            secure_cloud: pod.cloud_type == "SECURE",
            cost_per_hr: pod.cost_per_hr,
        },
        network_volume: pod
            .network_volume_id
            .as_ref()
            .and_then(|id| world.volumes.iter().find(|v| &v.id == id))
            .map(NetworkVolumeView::from),
    }
}

/// Every pod the account lists now: live ones, then recently terminated ones.
pub fn all_pods(world: &World, now: DateTime<Utc>) -> Vec<PodView> {
    let window = world.config.pods.terminated_visible_seconds;
    world
        .pods
        .values()
        .map(|p| pod_view(p, world, now))
        .chain(
            world
                .gone
                .iter()
                .filter(|g| (now - g.gone_at).as_seconds_f64() < window)
                .map(|g| pod_view(&g.pod, world, now)),
        )
        .collect()
}
