//! `kubectl ep gpus` and `kubectl ep logs`: what RunPod and the volume know about a provider and
//! a run, read with the person's own kubeconfig (RBAC decides who may read a provider's Secrets;
//! `gpus` needs only read access to RunPodProviders).

use ep_api::order::OrderPhase;
use ep_api::provider::{CatalogGpu, RunPodProvider, Transport};
use ep_api::volume::keys;
use ep_api::{Experiment, RunPodOrder};
use ep_operator::pool::{clients, credentials};
use ep_operator::runpod::RunPodApi;
use ep_volume::store::VolumeStore;
use kube::api::ListParams;
use kube::{Api, Client, ResourceExt};
use serde_json::json;

/// Which GPUs to show.
pub struct GpuFilter {
    pub provider: Option<String>,
    pub min_vram: Option<i32>,
    pub max_price: Option<f64>,
    pub data_center: Option<String>,
}

/// Output format of `gpus`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    Table,
    Wide,
    Json,
    Yaml,
}

fn lowest(g: &CatalogGpu) -> Option<f64> {
    g.secure_price.into_iter().chain(g.community_price).reduce(f64::min)
}

fn keep(g: &CatalogGpu, f: &GpuFilter) -> bool {
    f.min_vram.is_none_or(|v| g.memory_gb >= v)
        && f.max_price.is_none_or(|p| lowest(g).is_some_and(|l| l <= p))
        && f.data_center.as_ref().is_none_or(|dc| g.data_centers.iter().any(|d| d.eq_ignore_ascii_case(dc)))
}

fn price(p: Option<f64>) -> String {
    p.map_or_else(|| "-".to_owned(), |p| format!("{p:.2}"))
}

fn or_dash(v: &[String]) -> String {
    if v.is_empty() { "-".to_owned() } else { v.join(",") }
}

/// Prints RunPod's catalog as each provider last saw it, cheapest first.
pub async fn gpus(client: Client, f: &GpuFilter, output: Output) -> Result<(), String> {
    let api = Api::<RunPodProvider>::all(client);
    let mut providers =
        api.list(&ListParams::default()).await.map_err(|e| format!("listing RunPodProviders: {e}"))?.items;
    if let Some(name) = &f.provider {
        providers.retain(|p| p.name_any() == *name);
        if providers.is_empty() {
            return Err(format!("RunPodProvider {name} does not exist (kubectl get rpp lists them)"));
        }
    }
    if providers.is_empty() {
        return Err("no RunPodProvider exists: the catalog is read through one (see docs/install.md)".into());
    }
    let mut rows: Vec<(String, String, CatalogGpu)> = Vec::new();
    for p in &providers {
        let Some(catalog) = p.status.as_ref().and_then(|s| s.catalog.as_ref()) else {
            let why = p
                .status
                .as_ref()
                .and_then(|s| ep_api::find_condition(&s.conditions, ep_api::CONDITION_READY))
                .map_or_else(
                    || "no status yet".to_owned(),
                    |c| format!("Ready={} {}: {}", c.status, c.reason, c.message),
                );
            eprintln!("RunPodProvider {} has no catalog yet ({why})", p.name_any());
            continue;
        };
        eprintln!(
            "RunPodProvider {}: catalog as of {} (pods run in {})",
            p.name_any(),
            catalog.observed_at.0,
            p.spec.network_volume.data_center
        );
        for g in catalog.gpus.iter().filter(|g| keep(g, f)) {
            rows.push((p.name_any(), p.spec.network_volume.data_center.clone(), g.clone()));
        }
    }
    rows.sort_by(|a, b| {
        lowest(&a.2).unwrap_or(f64::MAX).total_cmp(&lowest(&b.2).unwrap_or(f64::MAX)).then_with(|| a.2.id.cmp(&b.2.id))
    });
    if matches!(output, Output::Json | Output::Yaml) {
        let items: Vec<_> =
            rows.iter().map(|(p, dc, g)| json!({"provider": p, "volumeDataCenter": dc, "gpu": g})).collect();
        let format = if output == Output::Json { crate::output::Format::Json } else { crate::output::Format::Yaml };
        return format.print(&items);
    }
    let many = providers.len() > 1;
    let mut table: Vec<Vec<String>> = Vec::new();
    let mut head = vec!["ALIAS", "GPU", "VRAM", "SECURE $/H", "COMMUNITY $/H", "STOCK", "POLICIES"];
    if many {
        head.insert(0, "PROVIDER");
    }
    if output == Output::Wide {
        head.extend(["DISPLAY NAME", "IN STOCK AT"]);
    }
    table.push(head.iter().map(|s| (*s).to_owned()).collect());
    for (p, _, g) in &rows {
        let mut row = vec![
            or_dash(&g.aliases),
            g.id.clone(),
            format!("{}GB", g.memory_gb),
            price(g.secure_price),
            price(g.community_price),
            g.stock.clone(),
            or_dash(&g.policies),
        ];
        if many {
            row.insert(0, p.clone());
        }
        if output == Output::Wide {
            row.extend([g.display_name.clone(), or_dash(&g.data_centers)]);
        }
        table.push(row);
    }
    if rows.is_empty() {
        eprintln!("no GPU matches");
        return Ok(());
    }
    print_table(&table);
    Ok(())
}

/// Prints rows in columns, as kubectl does (three spaces apart).
fn print_table(rows: &[Vec<String>]) {
    let cols = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> =
        (0..cols).map(|c| rows.iter().filter_map(|r| r.get(c)).map(|s| s.chars().count()).max().unwrap_or(0)).collect();
    for r in rows {
        let line: Vec<String> = r
            .iter()
            .enumerate()
            .map(|(i, s)| if i + 1 == r.len() { s.clone() } else { format!("{s:<w$}", w = widths[i]) })
            .collect();
        println!("{}", line.join("   ").trim_end());
    }
}

/// The order behind `name`: an order of that name, or the current (else last) order of an
/// experiment of that name.
async fn resolve_order(client: &Client, ns: &str, name: &str) -> Result<RunPodOrder, String> {
    let orders = Api::<RunPodOrder>::namespaced(client.clone(), ns);
    if let Some(o) = orders.get_opt(name).await.map_err(crate::orders::api_error)? {
        return Ok(o);
    }
    let exp = Api::<Experiment>::namespaced(client.clone(), ns)
        .get_opt(name)
        .await
        .map_err(crate::orders::api_error)?
        .ok_or_else(|| format!("neither a RunPodOrder nor an Experiment named {name} exists in {ns}"))?;
    let st = exp.status.unwrap_or_default();
    let order = st
        .current_attempt
        .and_then(|a| a.order)
        .or_else(|| st.history.iter().rev().find_map(|a| a.order.clone()))
        .ok_or_else(|| format!("experiment {ns}/{name} has no attempt yet"))?;
    orders.get_opt(&order).await.map_err(crate::orders::api_error)?.ok_or_else(|| {
        format!("experiment {ns}/{name}: its order {order} no longer exists (the registry keeps its history)")
    })
}

/// Whether the order may still write logs: not ended (DELETED or FAILED) and not gone.
async fn live(client: &Client, ns: &str, name: &str) -> Result<bool, String> {
    let order =
        Api::<RunPodOrder>::namespaced(client.clone(), ns).get_opt(name).await.map_err(crate::orders::api_error)?;
    let phase = order.and_then(|o| o.status?.phase);
    Ok(!matches!(phase, None | Some(OrderPhase::Deleted | OrderPhase::Failed)))
}

/// Prints the last `tail` lines (all when None).
fn print_tail(text: &str, tail: Option<usize>, to_stderr: bool) {
    let lines: Vec<&str> = text.lines().collect();
    let from = tail.map_or(0, |n| lines.len().saturating_sub(n));
    for l in &lines[from..] {
        if to_stderr {
            eprintln!("{l}");
        } else {
            println!("{l}");
        }
    }
}

/// What `logs` shows.
pub struct LogsArgs {
    pub name: String,
    pub container: bool,
    pub tail: Option<usize>,
    pub follow: bool,
    pub stderr: bool,
    pub attempt: Option<i32>,
}

/// The order `name` names, or with `attempt` the order of that attempt of the experiment `name`.
pub async fn order_of(client: &Client, ns: &str, name: &str, attempt: Option<i32>) -> Result<RunPodOrder, String> {
    match attempt {
        Some(n) => attempt_order(client, ns, name, n).await,
        None => resolve_order(client, ns, name).await,
    }
}

/// The order of attempt `n` of the experiment `name`.
async fn attempt_order(client: &Client, ns: &str, name: &str, n: i32) -> Result<RunPodOrder, String> {
    let exp = Api::<Experiment>::namespaced(client.clone(), ns)
        .get_opt(name)
        .await
        .map_err(crate::orders::api_error)?
        .ok_or_else(|| format!("--attempt needs an Experiment; {ns}/{name} is none"))?;
    let st = exp.status.unwrap_or_default();
    let order = st
        .history
        .iter()
        .chain(st.current_attempt.iter())
        .find(|a| a.attempt == n)
        .and_then(|a| a.order.clone())
        .ok_or_else(|| format!("experiment {ns}/{name} has no attempt {n} (it made {})", st.attempts))?;
    resolve_order(client, ns, &order).await
}

/// The training script's stdout and stderr from the volume, or (`--container`) the pod's
/// container log from RunPod (REST v2 `GET /v2/pods/{id}/logs`).
pub async fn logs(client: Client, ns: &str, a: &LogsArgs) -> Result<(), String> {
    let order = order_of(&client, ns, &a.name, a.attempt).await?;
    let oname = order.name_any();
    let provider = Api::<RunPodProvider>::all(client.clone())
        .get_opt(&order.spec.provider_ref)
        .await
        .map_err(crate::orders::api_error)?
        .ok_or_else(|| {
            format!("RunPodOrder {ns}/{oname}: spec.providerRef {} does not exist", order.spec.provider_ref)
        })?;
    let st = order.status.clone().unwrap_or_default();
    if a.container {
        // RunPod's API key: only for the container log (the volume needs its S3 keys alone).
        let (creds, _) = credentials(&client, &provider).await.map_err(|e| e.to_string())?;
        let (api, _) = clients(&provider, &creds).map_err(|e| e.to_string())?;
        if provider.spec.api.transport == Transport::Graphql {
            return Err(format!(
                "RunPodProvider {} speaks GraphQL, which has no container logs; set spec.api.transport: restV2",
                provider.name_any()
            ));
        }
        let pod =
            st.pod_id.clone().ok_or_else(|| format!("RunPodOrder {ns}/{oname} has no pod (phase {:?})", st.phase))?;
        match api.container_logs(&pod).await.map_err(|e| format!("RunPod: {e}"))? {
            Some(text) => print_tail(&text, a.tail, false),
            None => match &st.container_log {
                Some(kept) => {
                    eprintln!("pod {pod} is gone; its container log's last lines as the operator kept them:");
                    print_tail(kept, a.tail, false);
                }
                None => {
                    return Err(format!("pod {pod} of RunPodOrder {ns}/{oname} is gone; RunPod keeps no log of it"));
                }
            },
        }
        return Ok(());
    }
    let run =
        st.run_id.clone().ok_or_else(|| format!("RunPodOrder {ns}/{oname} has no run yet (phase {:?})", st.phase))?;
    let store = ep_operator::pool::volume(&client, &provider).await.map_err(|e| e.to_string())?;
    let streams: &[(&str, bool)] =
        if a.stderr { &[("stderr.log", true)] } else { &[("stdout.log", false), ("stderr.log", true)] };
    // Bytes of each stream already printed: following prints only what is new.
    let mut printed = vec![0usize; streams.len()];
    let (mut found, mut last) = (false, !a.follow);
    loop {
        for (i, (file, to_stderr)) in streams.iter().enumerate() {
            let key = keys::run_file(&run, &format!("{}/{file}", keys::LOGS_DIR));
            match store.get(&key).await {
                Ok(Some(bytes)) if bytes.len() > printed[i] => {
                    found = true;
                    let new = String::from_utf8_lossy(&bytes[printed[i]..]).into_owned();
                    print_tail(&new, if printed[i] == 0 { a.tail } else { None }, *to_stderr);
                    printed[i] = bytes.len();
                }
                Ok(_) => {}
                Err(e) => return Err(format!("reading {key} from volume {}: {e}", provider.spec.network_volume.id)),
            }
        }
        if last {
            break;
        }
        // After the run ends, one more read catches what it wrote last.
        last = !live(&client, ns, &oname).await?;
        if !last {
            tokio::time::sleep(std::time::Duration::from_secs(2)).await;
        }
    }
    if !found {
        let hint = if provider.spec.api.transport == Transport::RestV2 {
            " (the runner has not started; `--container` shows the pod's own log)"
        } else {
            " (the runner has not started)"
        };
        return Err(format!("run {run} has written no log yet{hint}"));
    }
    Ok(())
}
