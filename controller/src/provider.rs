//! Reconciles `RunPodProvider`: resolves its Secrets, checks the account with one cheap call and
//! the volume with HeadBucket, reports `Ready` with a reason, and accounts for every pod the
//! account holds (owned pods are left to their orders; the rest are reported as orphans and
//! terminated only when the settings say so).

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use ep_api::CloudType;
use ep_api::provider::{CatalogGpu, Transport};
use ep_api::{CONDITION_READY, Progress, RunPodProvider, RunPodProviderStatus, set_condition, set_progress};
use kube::api::{Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::{Api, Resource, ResourceExt};
use serde_json::json;

use crate::context::Context;
use crate::error::Error;
use crate::names::{ENV_OWNER_UID, ENV_RUN_ID, MANAGER};
use crate::pool::ProviderConn;
use crate::reason::Reason;
use crate::registry::InstanceRow;
use crate::runpod::{CatalogEntry, PodStatus, RunPodApi, RunPodError, Stock};
use crate::settings::{OrphanAction, Settings};
use crate::time;

pub const KIND: &str = "RunPodProvider";

/// The verdict of one check.
struct Verdict {
    ready: bool,
    reason: Reason,
    message: String,
    size_gb: Option<i64>,
}

fn not_ready(reason: Reason, message: String) -> Verdict {
    Verdict { ready: false, reason, message, size_gb: None }
}

/// How often the catalog in status is refreshed.
const CATALOG_REFRESH: Duration = Duration::from_secs(60);

/// The catalog as people read it: aliases, prices, stock where this provider's pods run, where
/// else it is in stock, and which policies may rent it here. Sorted by the lowest price.
pub fn catalog_view(entries: &[CatalogEntry], data_center: &str, settings: &Settings) -> Vec<CatalogGpu> {
    let mut gpus: Vec<CatalogGpu> = entries
        .iter()
        .map(|e| {
            let here = e
                .availability
                .iter()
                .filter(|a| a.data_center_id == data_center)
                .map(|a| a.stock)
                .max_by_key(|s| s.rank())
                .unwrap_or(Stock::Unknown);
            let data_centers: BTreeSet<String> =
                e.availability.iter().filter(|a| a.stock.available()).map(|a| a.data_center_id.clone()).collect();
            let policies = settings
                .policies
                .iter()
                .filter(|(_, p)| {
                    let price = match p.cloud_type {
                        CloudType::Secure => e.secure_price,
                        CloudType::Community => e.community_price,
                        CloudType::All => e.secure_price.into_iter().chain(e.community_price).reduce(f64::min),
                    };
                    price.is_some_and(|price| p.max_cost_per_hour.is_none_or(|max| price <= max))
                })
                .map(|(name, _)| name.clone())
                .collect();
            CatalogGpu {
                id: e.id.clone(),
                display_name: e.display_name.clone(),
                aliases: settings.gpu_aliases.iter().filter(|(_, id)| **id == e.id).map(|(a, _)| a.clone()).collect(),
                memory_gb: e.memory_gb,
                secure_price: e.secure_price,
                community_price: e.community_price,
                stock: here.as_str().to_owned(),
                data_centers: data_centers.into_iter().collect(),
                policies,
            }
        })
        .collect();
    let lowest =
        |g: &CatalogGpu| g.secure_price.into_iter().chain(g.community_price).reduce(f64::min).unwrap_or(f64::MAX);
    gpus.sort_by(|a, b| lowest(a).total_cmp(&lowest(b)).then_with(|| a.id.cmp(&b.id)));
    gpus
}

/// How long a Ready provider trusts its last volume listing.
const VOLUMES_FRESH: Duration = Duration::from_secs(30);

async fn check(p: &RunPodProvider, ctx: &Context) -> (Verdict, Option<Arc<ProviderConn>>) {
    let conn = match ctx.providers.connect(&ctx.client, p, &ctx.metrics).await {
        Ok(c) => c,
        Err(e) => return (not_ready(e.reason(), e.to_string()), None),
    };
    let vol = &p.spec.network_volume;
    // A Ready provider is re-checked every poll (its orphans are counted from the shared pod
    // list); its volume need not be listed that often. One that is not Ready asks every time.
    let ready = p
        .status
        .as_ref()
        .and_then(|s| ep_api::find_condition(&s.conditions, CONDITION_READY))
        .is_some_and(|c| c.status == "True" && c.observed_generation == p.metadata.generation);
    let max_age = if ready { VOLUMES_FRESH } else { Duration::ZERO };
    let volumes = match conn.api.network_volumes_within(max_age).await {
        Ok(v) => v,
        Err(e @ RunPodError::Unauthorized { .. }) => {
            let k = &p.spec.api.api_key_secret_ref;
            let msg = format!(
                "RunPod refused the API key from Secret {}/{} key {:?}: {}",
                k.namespace,
                k.name,
                k.key,
                e.message()
            );
            return (not_ready(Reason::BadApiKey, msg), None);
        }
        Err(e @ RunPodError::RateLimited { .. }) => {
            return (
                not_ready(Reason::RunPodRateLimited, format!("RunPod rate limits this account's API key: {e}")),
                None,
            );
        }
        Err(e) => return (not_ready(Reason::RunPodUnavailable, format!("RunPod API did not answer: {e}")), None),
    };
    let Some(found) = volumes.iter().find(|v| v.id == vol.id) else {
        let have: Vec<String> = volumes.iter().map(|v| format!("{} ({})", v.id, v.data_center_id)).collect();
        let msg = format!(
            "spec.networkVolume.id {:?} is not a network volume of this account; it has: {}",
            vol.id,
            if have.is_empty() { "none".to_owned() } else { have.join(", ") }
        );
        return (not_ready(Reason::VolumeMissing, msg), None);
    };
    if !found.data_center_id.eq_ignore_ascii_case(&vol.data_center) {
        let msg = format!(
            "spec.networkVolume.dataCenter is {:?} but volume {} lives in {:?}; pods must be placed with their volume",
            vol.data_center, vol.id, found.data_center_id
        );
        return (not_ready(Reason::DataCenterMismatch, msg), None);
    }
    if let Err(e) = conn.store.check_bucket().await {
        let c = &p.spec.s3.credentials_secret_ref;
        return match e.status() {
            Some(401 | 403) => (
                not_ready(
                    Reason::S3Unauthorized,
                    format!("the volume's S3 API refused the credentials from Secret {}/{}: {e}", c.namespace, c.name),
                ),
                None,
            ),
            _ => (
                not_ready(Reason::S3Unreachable, format!("the volume's S3 API at {} failed: {e}", p.spec.s3.endpoint)),
                None,
            ),
        };
    }
    let message = format!(
        "account answers; volume {} ({} GB) in {}; S3 answers at {}",
        vol.id, found.size_gb, found.data_center_id, p.spec.s3.endpoint
    );
    (Verdict { ready: true, reason: Reason::Ready, message, size_gb: Some(found.size_gb) }, Some(conn))
}

/// The condition a provider on GraphQL carries (True while it stays on GraphQL).
pub const CONDITION_GRAPHQL_RETIRING: &str = "GraphqlRetiring";

const GRAPHQL_RETIRING: &str = "RunPod rate-limits its GraphQL API since 2026-09-17 and retires it in early 2027: \
     set spec.api.transport to restV2 (the default) on this provider; nothing else changes";

/// One pass of the provider reconciler.
#[tracing::instrument(skip_all, fields(kind = KIND, name = p.name_any()))]
pub async fn reconcile(p: Arc<RunPodProvider>, ctx: Arc<Context>) -> Result<Action, Error> {
    ctx.metrics.reconciled(KIND);
    let name = p.name_any();
    let now = time::now();
    let settings = ctx.settings.current();
    let (verdict, conn) = check(&p, &ctx).await;
    let mut st = p.status.clone().unwrap_or_default();
    let before = st.clone();
    let generation = p.meta().generation;
    let was_ready = ep_api::find_condition(&st.conditions, CONDITION_READY).map(|c| c.status == "True");
    set_condition(
        &mut st.conditions,
        CONDITION_READY,
        verdict.ready,
        verdict.reason.as_str(),
        &verdict.message,
        generation,
        time::to_k8s(now),
    );
    // A provider that cannot answer now (rate limit, RunPod or S3 unreachable) is still being worked
    // on; a refused key, a missing volume or a wrong data center needs a person.
    let transient =
        matches!(verdict.reason, Reason::RunPodRateLimited | Reason::RunPodUnavailable | Reason::S3Unreachable);
    let progress = match (verdict.ready, transient) {
        (true, _) => Progress::Settled,
        (false, true) => Progress::Working,
        (false, false) => Progress::Stalled(verdict.reason.as_str(), &verdict.message),
    };
    set_progress(&mut st.conditions, progress, generation, time::to_k8s(now));
    ctx.metrics.provider_ready.get_or_create(&vec![("provider", name.clone())]).set(i64::from(verdict.ready));
    let retiring_before = ep_api::find_condition(&st.conditions, CONDITION_GRAPHQL_RETIRING).is_some();
    let retiring = p.spec.api.transport == Transport::Graphql;
    st.conditions.retain(|c| c.type_ != CONDITION_GRAPHQL_RETIRING);
    if retiring {
        let (r, at) = (Reason::GraphqlRetiring, time::to_k8s(now));
        set_condition(
            &mut st.conditions,
            CONDITION_GRAPHQL_RETIRING,
            true,
            r.as_str(),
            GRAPHQL_RETIRING,
            generation,
            at,
        );
    }
    st.observed_generation = generation;
    if verdict.size_gb.is_some() {
        st.volume_size_gb = verdict.size_gb;
    }
    if let Some(conn) = conn {
        let orphans = account_for_pods(&ctx, &conn, settings.orphans.action, now).await?;
        st.orphan_pods = orphans;
        if conn.api.catalog_due(CATALOG_REFRESH.max(ctx.poll())) {
            // The catalog is for people (`kubectl ep gpus`); a failure here leaves the last one.
            match conn.api.catalog(&p.spec.network_volume.data_center).await {
                Ok(entries) => {
                    let gpus = catalog_view(&entries, &p.spec.network_volume.data_center, &settings);
                    st.catalog = Some(ep_api::provider::ProviderCatalog { observed_at: time::to_k8s(now), gpus });
                }
                Err(e) => tracing::debug!(provider = %name, error = %e, "catalog not refreshed"),
            }
        }
    }
    if st != before {
        save(&ctx, &name, &st).await?;
    }
    if was_ready != Some(verdict.ready) {
        ctx.events.publish(&p.object_ref(&()), verdict.reason, "Check", &verdict.message).await;
    }
    if retiring && !retiring_before {
        ctx.events.publish(&p.object_ref(&()), Reason::GraphqlRetiring, "Check", GRAPHQL_RETIRING).await;
    }
    Ok(Action::requeue(ctx.poll()))
}

async fn save(ctx: &Context, name: &str, st: &RunPodProviderStatus) -> Result<(), Error> {
    let body = json!({"apiVersion": "ep.dev/v1alpha1", "kind": KIND, "status": st});
    Api::<RunPodProvider>::all(ctx.client.clone())
        .patch_status(name, &PatchParams::apply(MANAGER).force(), &Patch::Apply(&body))
        .await?;
    Ok(())
}

/// Records every pod of the account in the registry, reports the ones no order owns, and
/// terminates those when the settings say so. Returns the orphans' ids.
async fn account_for_pods(
    ctx: &Context,
    conn: &ProviderConn,
    action: OrphanAction,
    now: chrono::DateTime<chrono::Utc>,
) -> Result<Vec<String>, Error> {
    let list = conn.pods(ctx.poll(), 0).await?;
    let owned: BTreeSet<String> = ctx.stores.orders.state().iter().filter_map(|o| o.meta().uid.clone()).collect();
    let mut orphans = Vec::new();
    let mut rows = HashMap::new();
    let mut spend = 0.0;
    for pod in list.pods.iter() {
        if pod.status == PodStatus::Terminated {
            continue;
        }
        let owner = pod.env.get(ENV_OWNER_UID).cloned();
        let orphan = owner.as_ref().is_none_or(|u| !owned.contains(u));
        if orphan {
            orphans.push(pod.id.clone());
        } else if pod.status == PodStatus::Running {
            spend += pod.cost_per_hr;
        }
        let row = InstanceRow {
            pod_id: pod.id.clone(),
            provider: conn.name.clone(),
            pod_name: Some(pod.name.clone()),
            owner_uid: owner,
            run_id: pod.env.get(ENV_RUN_ID).cloned(),
            desired_status: Some(format!("{:?}", pod.status).to_uppercase()),
            gpu_type_id: pod.gpu_type_id.clone(),
            data_center: pod.data_center_id.clone(),
            cost_per_hr: Some(pod.cost_per_hr),
            accrued_usd: None,
            orphan,
            seen_at: now,
            gone_at: None,
        };
        ctx.projector.instance(row.clone());
        rows.insert(pod.id.clone(), row);
    }
    let provider = vec![("provider", conn.name.clone())];
    ctx.metrics.pods_usd_per_hour.get_or_create(&provider).set(spend);
    ctx.metrics.orphan_pods.get_or_create(&provider).set(i64::try_from(orphans.len()).unwrap_or(i64::MAX));
    for mut row in ctx.seen_pods.replace(&conn.name, rows) {
        row.gone_at = Some(now);
        row.desired_status = Some("TERMINATED".into());
        ctx.projector.instance(row);
    }
    if action == OrphanAction::Terminate {
        for id in &orphans {
            tracing::warn!(provider = %conn.name, pod = %id, "terminating a pod no order owns (orphans.action: Terminate)");
            conn.api.terminate_pod(id).await?;
        }
        if !orphans.is_empty() {
            conn.invalidate().await;
        }
    }
    orphans.sort();
    Ok(orphans)
}
