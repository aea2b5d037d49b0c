//! RunPod's GraphQL API (`POST /graphql`), as its SDKs and runpodctl call it.

use std::sync::Arc;

use async_graphql::{
    ComplexObject, Context, EmptySubscription, Error, ErrorExtensions, InputObject, Object, Schema, SimpleObject,
};

use crate::Sim;
use crate::views::{CloudTypeEnum, EnvironmentVariableInput, NetworkVolumeView, PodView, all_pods, pod_view};
use crate::world::{CreatePod, SimError, StartCommand};

pub type RunPodSchema = Schema<QueryRoot, MutationRoot, EmptySubscription>;

pub fn schema(sim: Arc<Sim>) -> RunPodSchema {
    Schema::build(QueryRoot, MutationRoot, EmptySubscription).data(sim).finish()
}

fn sim<'a>(ctx: &Context<'a>) -> &'a Arc<Sim> {
    // The schema is always built with the Sim as data (see `schema`).
    ctx.data_unchecked::<Arc<Sim>>()
}

fn business(e: &SimError) -> Error {
    let code = e.graphql_code();
    Error::new(e.to_string()).extend_with(|_, ext| ext.set("code", code))
}

pub struct QueryRoot;

#[derive(SimpleObject)]
#[graphql(name = "User")]
pub struct Myself {
    pub id: String,
    pub email: String,
    pub pub_key: Option<String>,
    pub client_balance: f64,
    pub current_spend_per_hr: f64,
    pub spend_limit: f64,
    pub pods: Vec<PodView>,
    pub network_volumes: Vec<NetworkVolumeView>,
}

#[derive(InputObject)]
pub struct PodFilter {
    pub pod_id: String,
}

#[derive(InputObject)]
pub struct GpuTypeFilter {
    pub id: Option<String>,
}

#[derive(InputObject)]
pub struct GpuLowestPriceInput {
    pub gpu_count: i32,
    pub secure_cloud: Option<bool>,
    pub data_center_id: Option<String>,
    pub min_memory_in_gb: Option<i32>,
    pub min_vcpu_count: Option<i32>,
    pub total_disk: Option<i32>,
    pub min_disk: Option<i32>,
    pub min_download: Option<i32>,
    pub min_upload: Option<i32>,
    pub country_code: Option<String>,
}

#[derive(SimpleObject)]
#[graphql(complex)]
pub struct GpuType {
    pub id: String,
    pub display_name: String,
    pub manufacturer: String,
    pub memory_in_gb: i32,
    pub cuda_cores: i32,
    pub secure_cloud: bool,
    pub community_cloud: bool,
    pub secure_price: Option<f64>,
    pub community_price: Option<f64>,
    pub secure_spot_price: Option<f64>,
    pub community_spot_price: Option<f64>,
    pub one_week_price: Option<f64>,
    pub one_month_price: Option<f64>,
    pub three_month_price: Option<f64>,
    pub six_month_price: Option<f64>,
    pub one_year_price: Option<f64>,
    pub cluster_price: Option<f64>,
    pub max_gpu_count: i32,
    pub max_gpu_count_secure_cloud: i32,
    pub max_gpu_count_community_cloud: i32,
    pub min_pod_gpu_count: i32,
    pub throughput: Option<i32>,
}

#[derive(SimpleObject)]
pub struct LowestPrice {
    pub gpu_name: String,
    pub gpu_type_id: String,
    pub uninterruptable_price: Option<f64>,
    pub minimum_bid_price: Option<f64>,
    pub stock_status: Option<String>,
    pub available_gpu_counts: Vec<i32>,
    pub max_unreserved_gpu_count: i32,
    pub min_memory: Option<i32>,
    pub min_vcpu: Option<i32>,
}

#[ComplexObject]
impl GpuType {
    async fn lowest_price(&self, ctx: &Context<'_>, input: GpuLowestPriceInput) -> Option<LowestPrice> {
        let (w, _) = sim(ctx).world();
        let gpu = w.gpu_type(&self.id)?;
        let lp = w.lowest_price(gpu, input.gpu_count, input.secure_cloud, input.data_center_id.as_deref());
        Some(LowestPrice {
            gpu_name: lp.gpu_name,
            gpu_type_id: lp.gpu_type_id,
            uninterruptable_price: lp.uninterruptable_price,
            minimum_bid_price: lp.minimum_bid_price,
            stock_status: lp.stock_status,
            available_gpu_counts: lp.available_gpu_counts,
            max_unreserved_gpu_count: lp.max_unreserved_gpu_count,
            min_memory: input.min_memory_in_gb,
            min_vcpu: input.min_vcpu_count,
        })
    }
}

#[derive(SimpleObject)]
pub struct GpuAvailability {
    pub gpu_type_id: String,
    pub display_name: String,
    pub stock_status: Option<String>,
    pub available: bool,
}

#[derive(SimpleObject)]
pub struct DataCenter {
    pub id: String,
    pub name: String,
    pub location: String,
    pub gpu_availability: Vec<GpuAvailability>,
}

#[Object]
impl QueryRoot {
    async fn myself(&self, ctx: &Context<'_>) -> Myself {
        let (w, now) = sim(ctx).world();
        Myself {
            id: w.config.account.id.clone(),
            email: w.config.account.email.clone(),
            pub_key: None,
            client_balance: w.balance,
            current_spend_per_hr: w.current_spend_per_hr(),
            spend_limit: w.config.account.spend_limit,
            pods: all_pods(&w, now),
            network_volumes: w.volumes.iter().map(NetworkVolumeView::from).collect(),
        }
    }

    /// One pod, or null when it does not exist.
    async fn pod(&self, ctx: &Context<'_>, input: PodFilter) -> Option<PodView> {
        let (w, now) = sim(ctx).world();
        w.pods.get(&input.pod_id).map(|p| pod_view(p, &w, now))
    }

    /// The catalog; an unknown id gives `[]`.
    async fn gpu_types(&self, ctx: &Context<'_>, input: Option<GpuTypeFilter>) -> Vec<GpuType> {
        let (w, _) = sim(ctx).world();
        let spot = w.config.spot_enabled;
        w.config
            .gpu_types
            .iter()
            .filter(|g| input.as_ref().and_then(|f| f.id.as_ref()).is_none_or(|id| *id == g.id))
            .map(|g| GpuType {
                id: g.id.clone(),
                display_name: g.display_name.clone(),
                manufacturer: g.manufacturer.clone(),
                memory_in_gb: g.memory_in_gb,
                cuda_cores: 0,
                secure_cloud: g.secure_price.is_some(),
                community_cloud: g.community_price.is_some(),
                secure_price: g.secure_price,
                community_price: g.community_price,
                secure_spot_price: g.secure_price.filter(|_| spot).map(|p| p * 0.5),
                community_spot_price: g.community_price.filter(|_| spot).map(|p| p * 0.5),
                one_week_price: g.secure_price.map(|p| p * 0.95),
                one_month_price: g.secure_price.map(|p| p * 0.9),
                three_month_price: g.secure_price.map(|p| p * 0.85),
                six_month_price: g.secure_price.map(|p| p * 0.8),
                one_year_price: g.secure_price.map(|p| p * 0.75),
                cluster_price: None,
                max_gpu_count: g.max_gpu_count,
                max_gpu_count_secure_cloud: if g.secure_price.is_some() { g.max_gpu_count } else { 0 },
                max_gpu_count_community_cloud: if g.community_price.is_some() { g.max_gpu_count } else { 0 },
                min_pod_gpu_count: 1,
                throughput: None,
            })
            .collect()
    }

    async fn data_centers(&self, ctx: &Context<'_>) -> Vec<DataCenter> {
        let (w, _) = sim(ctx).world();
        w.config
            .data_centers
            .iter()
            .map(|d| DataCenter {
                id: d.id.clone(),
                name: d.name.clone(),
                location: d.location.clone(),
                gpu_availability: w
                    .config
                    .gpu_types
                    .iter()
                    .map(|g| {
                        let lp = w.lowest_price(g, 1, None, Some(&d.id));
                        GpuAvailability {
                            gpu_type_id: g.id.clone(),
                            display_name: g.display_name.clone(),
                            available: lp.max_unreserved_gpu_count > 0,
                            stock_status: lp.stock_status,
                        }
                    })
                    .collect(),
            })
            .collect()
    }
}

/// `PodFindAndDeployOnDemandInput` (and, with `bidPerGpu`, `PodRentInterruptableInput`).
#[derive(InputObject)]
pub struct PodFindAndDeployOnDemandInput {
    pub name: Option<String>,
    pub image_name: Option<String>,
    pub cloud_type: Option<CloudTypeEnum>,
    pub gpu_type_id: Option<String>,
    pub gpu_count: Option<i32>,
    pub volume_in_gb: Option<i32>,
    pub container_disk_in_gb: Option<i32>,
    pub min_vcpu_count: Option<i32>,
    pub min_memory_in_gb: Option<i32>,
    pub docker_args: Option<String>,
    pub ports: Option<String>,
    pub volume_mount_path: Option<String>,
    pub env: Option<Vec<EnvironmentVariableInput>>,
    pub network_volume_id: Option<String>,
    pub data_center_id: Option<String>,
    pub country_code: Option<String>,
    pub template_id: Option<String>,
    pub support_public_ip: Option<bool>,
    pub start_ssh: Option<bool>,
    pub start_jupyter: Option<bool>,
    pub allowed_cuda_versions: Option<Vec<String>>,
    pub min_cuda_version: Option<String>,
    pub min_download: Option<i32>,
    pub min_upload: Option<i32>,
    pub container_registry_auth_id: Option<String>,
    pub stop_after: Option<String>,
    pub terminate_after: Option<String>,
    pub compliance: Option<Vec<String>>,
    pub deploy_cost: Option<f64>,
}

#[derive(InputObject)]
pub struct PodRentInterruptableInput {
    #[graphql(flatten)]
    pub pod: PodFindAndDeployOnDemandInput,
    pub bid_per_gpu: f64,
}

#[derive(InputObject)]
pub struct PodStopInput {
    pub pod_id: String,
}

#[derive(InputObject)]
pub struct PodResumeInput {
    pub pod_id: String,
    pub gpu_count: Option<i32>,
    pub allowed_cuda_versions: Option<Vec<String>>,
}

#[derive(InputObject)]
pub struct PodTerminateInput {
    pub pod_id: String,
}

#[derive(InputObject)]
pub struct CreateNetworkVolumeInput {
    pub name: String,
    pub size: i32,
    pub data_center_id: String,
}

#[derive(InputObject)]
pub struct DeleteNetworkVolumeInput {
    pub id: String,
}

fn parse_time(field: &str, v: Option<String>) -> Result<Option<chrono::DateTime<chrono::Utc>>, Error> {
    v.map(|s| {
        chrono::DateTime::parse_from_rfc3339(&s)
            .map(|t| t.with_timezone(&chrono::Utc))
            .map_err(|e| Error::new(format!("{field}: invalid ISO datetime {s:?}: {e}")))
    })
    .transpose()
}

fn create_request(i: PodFindAndDeployOnDemandInput, interruptible: bool) -> Result<CreatePod, Error> {
    Ok(CreatePod {
        name: i.name.unwrap_or_default(),
        image_name: i.image_name.unwrap_or_default(),
        gpu_type_id: i.gpu_type_id.unwrap_or_default(),
        gpu_count: i.gpu_count.unwrap_or(1),
        cloud_type: i.cloud_type.unwrap_or(CloudTypeEnum::All).as_str().into(),
        data_center_ids: i.data_center_id.into_iter().collect(),
        network_volume_id: i.network_volume_id.filter(|s| !s.is_empty()),
        volume_mount_path: i.volume_mount_path,
        volume_in_gb: i.volume_in_gb.unwrap_or(0),
        container_disk_in_gb: i.container_disk_in_gb.unwrap_or(10),
        min_vcpu_count: i.min_vcpu_count.unwrap_or(1),
        min_memory_in_gb: i.min_memory_in_gb.unwrap_or(1),
        env: i.env.unwrap_or_default().into_iter().map(|e| (e.key, e.value)).collect(),
        ports: i.ports.unwrap_or_default(),
        start: i.docker_args.filter(|s| !s.trim().is_empty()).map(StartCommand::Shell),
        terminate_after: parse_time("terminateAfter", i.terminate_after)?,
        stop_after: parse_time("stopAfter", i.stop_after)?,
        interruptible,
    })
}

pub struct MutationRoot;

#[Object]
impl MutationRoot {
    async fn pod_find_and_deploy_on_demand(
        &self,
        ctx: &Context<'_>,
        input: PodFindAndDeployOnDemandInput,
    ) -> Result<Option<PodView>, Error> {
        deploy(ctx, input, false).await
    }

    async fn pod_rent_interruptable(
        &self,
        ctx: &Context<'_>,
        input: PodRentInterruptableInput,
    ) -> Result<Option<PodView>, Error> {
        deploy(ctx, input.pod, true).await
    }

    async fn pod_stop(&self, ctx: &Context<'_>, input: PodStopInput) -> Result<Option<PodView>, Error> {
        let (mut w, now) = sim(ctx).world();
        w.stop_pod(&input.pod_id, now).map_err(|e| business(&e))?;
        Ok(w.pods.get(&input.pod_id).map(|p| pod_view(p, &w, now)))
    }

    async fn pod_resume(&self, ctx: &Context<'_>, input: PodResumeInput) -> Result<Option<PodView>, Error> {
        let (mut w, now) = sim(ctx).world();
        w.resume_pod(&input.pod_id, now).map_err(|e| business(&e))?;
        Ok(w.pods.get(&input.pod_id).map(|p| pod_view(p, &w, now)))
    }

    /// Returns a scalar (null); an unknown id is "pod not found to terminate".
    async fn pod_terminate(&self, ctx: &Context<'_>, input: PodTerminateInput) -> Result<Option<bool>, Error> {
        let (mut w, now) = sim(ctx).world();
        w.terminate_pod(&input.pod_id, now, "terminated by user").map_err(|e| business(&e))?;
        Ok(None)
    }

    async fn create_network_volume(
        &self,
        ctx: &Context<'_>,
        input: CreateNetworkVolumeInput,
    ) -> Result<NetworkVolumeView, Error> {
        let (mut w, _) = sim(ctx).world();
        let size = u64::try_from(input.size).map_err(|_| Error::new("size must be positive"))?;
        let v = w.create_volume(&input.name, size, &input.data_center_id).map_err(|e| business(&e))?;
        Ok(NetworkVolumeView::from(&v))
    }

    async fn delete_network_volume(
        &self,
        ctx: &Context<'_>,
        input: DeleteNetworkVolumeInput,
    ) -> Result<Option<bool>, Error> {
        let (mut w, _) = sim(ctx).world();
        w.delete_volume(&input.id).map_err(|e| business(&e))?;
        Ok(None)
    }
}

async fn deploy(ctx: &Context<'_>, input: PodFindAndDeployOnDemandInput, spot: bool) -> Result<Option<PodView>, Error> {
    let sim = sim(ctx);
    let mut req = create_request(input, spot)?;
    req.terminate_after = req.terminate_after.map(|t| sim.clock.from_wall(t));
    req.stop_after = req.stop_after.map(|t| sim.clock.from_wall(t));
    let (view, delay) = {
        let (mut w, now) = sim.world();
        let pod = w.create_pod(req, now).map_err(|e| business(&e))?;
        let id = pod.id.clone();
        if w.faults.create_lost_answers > 0 {
            // The pod exists on RunPod's side; the caller hears only an internal error.
            w.faults.create_lost_answers -= 1;
            return Err(Error::new(crate::world::messages::INTERNAL)
                .extend_with(|_, ext| ext.set("code", "INTERNAL_SERVER_ERROR")));
        }
        let view = w.pods.get(&id).map(|p| pod_view(p, &w, now));
        let delay = if w.faults.create_timeouts > 0 {
            w.faults.create_timeouts -= 1;
            Some(w.faults.create_timeout_seconds)
        } else {
            None
        };
        (view, delay)
    };
    if let Some(secs) = delay {
        // The pod exists on RunPod's side; the caller only hears back after its timeout.
        tokio::time::sleep(std::time::Duration::from_secs(secs)).await;
    }
    Ok(view)
}
