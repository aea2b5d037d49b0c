//! The GraphQL transport: `POST <base>/graphql` with variables.

use std::collections::BTreeMap;

use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

use super::http::{Answer, ClientOptions, Http, Idempotency, error_text};
use super::{
    GpuOffer, GpuQuery, NetworkVolume, Pod, PodSpec, PodStatus, PortMapping, RunPodApi, RunPodError, Runtime, Stock,
};

/// RunPod's GraphQL API.
#[derive(Clone, Debug)]
pub struct GraphqlTransport {
    pub(super) http: Http,
}

const POD_FIELDS: &str = "fragment PodFields on Pod { id name desiredStatus imageName env costPerHr gpuCount machineId \
    networkVolumeId machine { gpuDisplayName gpuTypeId dataCenterId } \
    runtime { uptimeInSeconds ports { ip isIpPublic privatePort publicPort type } gpus { id } } }";

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct GqlPod {
    id: String,
    #[serde(default)]
    name: String,
    desired_status: String,
    #[serde(default)]
    image_name: String,
    #[serde(default)]
    env: Vec<String>,
    #[serde(default)]
    cost_per_hr: f64,
    #[serde(default)]
    gpu_count: i32,
    machine_id: Option<String>,
    network_volume_id: Option<String>,
    machine: Option<GqlMachine>,
    runtime: Option<GqlRuntime>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct GqlMachine {
    gpu_display_name: Option<String>,
    gpu_type_id: Option<String>,
    data_center_id: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct GqlRuntime {
    #[serde(default)]
    uptime_in_seconds: i64,
    ports: Option<Vec<GqlPort>>,
    #[serde(default)]
    gpus: Vec<GqlGpu>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct GqlPort {
    ip: String,
    is_ip_public: bool,
    private_port: i32,
    public_port: i32,
    #[serde(rename = "type")]
    kind: String,
}

#[derive(Deserialize)]
struct GqlGpu {
    id: String,
}

impl From<GqlPod> for Pod {
    fn from(p: GqlPod) -> Self {
        let machine = p.machine;
        Self {
            env: p
                .env
                .iter()
                .filter_map(|kv| kv.split_once('='))
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .collect::<BTreeMap<_, _>>(),
            status: PodStatus::parse(&p.desired_status),
            gpu_type_id: machine.as_ref().and_then(|m| m.gpu_type_id.clone()),
            gpu_display_name: machine.as_ref().and_then(|m| m.gpu_display_name.clone()),
            data_center_id: machine.and_then(|m| m.data_center_id),
            runtime: p.runtime.map(|r| Runtime {
                uptime_seconds: r.uptime_in_seconds,
                ports: r.ports.map(|ps| {
                    ps.into_iter()
                        .map(|q| PortMapping {
                            ip: q.ip,
                            is_public: q.is_ip_public,
                            private_port: q.private_port,
                            public_port: q.public_port,
                            kind: q.kind,
                        })
                        .collect()
                }),
                gpu_ids: r.gpus.into_iter().map(|g| g.id).collect(),
            }),
            id: p.id,
            name: p.name,
            image: p.image_name,
            gpu_count: p.gpu_count,
            cost_per_hr: p.cost_per_hr,
            machine_id: p.machine_id,
            network_volume_id: p.network_volume_id,
        }
    }
}

/// Quotes argv for `dockerArgs`, which RunPod hands to the image as a command line.
pub(crate) fn shell_join(argv: &[String]) -> String {
    argv.iter()
        .map(|a| {
            if !a.is_empty() && a.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_./=:,@%+".contains(&b)) {
                a.clone()
            } else {
                format!("'{}'", a.replace('\'', r"'\''"))
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

impl GraphqlTransport {
    pub fn new(endpoint: &str, api_key: &str, opts: ClientOptions) -> Result<Self, RunPodError> {
        Ok(Self { http: Http::new(endpoint, api_key, opts)? })
    }

    /// Runs one document and returns `data.<field>` (None when null). GraphQL answers
    /// `INTERNAL_SERVER_ERROR` with HTTP 200, so those are retried here for safe operations.
    async fn call<T: DeserializeOwned>(
        &self,
        op: &'static str,
        query: &str,
        variables: Value,
        field: &str,
        idempotency: Idempotency,
    ) -> Result<Option<T>, RunPodError> {
        let policy = &self.http.opts.retry;
        let mut attempt = 1;
        loop {
            // HTTP-level failures were already retried by `send`; only errors in the body repeat here.
            match self.call_once(op, query, &variables, field, idempotency).await? {
                Err(e @ RunPodError::Transient { .. })
                    if idempotency == Idempotency::Safe && attempt < policy.max_attempts =>
                {
                    tracing::debug!(op, attempt, error = %e, "retrying RunPod call");
                    tokio::time::sleep(policy.backoff(attempt)).await;
                    attempt += 1;
                }
                other => return other,
            }
        }
    }

    async fn call_once<T: DeserializeOwned>(
        &self,
        op: &'static str,
        query: &str,
        variables: &Value,
        field: &str,
        idempotency: Idempotency,
    ) -> Result<Result<Option<T>, RunPodError>, RunPodError> {
        let url = format!("{}/graphql", self.http.base);
        let body = json!({"query": query, "variables": variables});
        let timeout =
            if idempotency == Idempotency::Unsafe { self.http.opts.create_timeout } else { self.http.opts.timeout };
        let Answer { status, body } = self.http.send(op, idempotency, timeout, |c| c.post(&url).json(&body)).await?;
        if !(200..300).contains(&status) {
            return Err(RunPodError::from_status(status, error_text(&body), None));
        }
        let v: Value = match serde_json::from_slice(&body) {
            Ok(v) => v,
            Err(e) => {
                return Ok(Err(RunPodError::Transient {
                    message: format!("{op}: unreadable answer: {e}"),
                    may_have_applied: true,
                }));
            }
        };
        if let Some(first) = v.pointer("/errors/0") {
            let message = first.get("message").and_then(Value::as_str).unwrap_or("unknown GraphQL error");
            let code = first.pointer("/extensions/code").and_then(Value::as_str);
            return Ok(Err(RunPodError::from_message(message, code)));
        }
        Ok(match v.pointer(&format!("/data/{field}")) {
            None | Some(Value::Null) => Ok(None),
            Some(data) => serde_json::from_value(data.clone())
                .map(Some)
                .map_err(|e| RunPodError::InvalidRequest { message: format!("{op}: unexpected answer shape: {e}") }),
        })
    }
}

#[derive(Deserialize)]
struct MyPods {
    #[serde(default)]
    pods: Vec<GqlPod>,
}

#[derive(Deserialize)]
struct MyVolumes {
    #[serde(default, rename = "networkVolumes")]
    network_volumes: Vec<GqlVolume>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct GqlGpuType {
    id: String,
    display_name: String,
    #[serde(default)]
    memory_in_gb: i32,
    #[serde(default)]
    max_gpu_count: i32,
    lowest_price: Option<GqlLowestPrice>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct GqlLowestPrice {
    uninterruptable_price: Option<f64>,
    stock_status: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct GqlVolume {
    id: String,
    name: String,
    size: i64,
    data_center_id: String,
}

impl RunPodApi for GraphqlTransport {
    async fn create_pod(&self, spec: &PodSpec) -> Result<Pod, RunPodError> {
        let mut input = json!({
            "name": spec.name,
            "imageName": spec.image,
            "gpuTypeId": spec.gpu_type_id,
            "gpuCount": spec.gpu_count,
            "cloudType": spec.cloud_type.as_runpod(),
            "containerDiskInGb": spec.container_disk_gb,
            "volumeInGb": 0,
            "volumeMountPath": spec.volume_mount_path,
            "env": spec.env.iter().map(|(k, v)| json!({"key": k, "value": v})).collect::<Vec<_>>(),
            "ports": spec.ports.join(","),
        });
        if let Some(dc) = &spec.data_center_id {
            input["dataCenterId"] = json!(dc);
        }
        if let Some(v) = &spec.network_volume_id {
            input["networkVolumeId"] = json!(v);
        }
        if let Some(argv) = &spec.start_command {
            input["dockerArgs"] = json!(shell_join(argv));
        }
        if let Some(t) = spec.terminate_after {
            input["terminateAfter"] = json!(t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true));
        }
        let q = format!(
            "mutation Create($input: PodFindAndDeployOnDemandInput!) {{ podFindAndDeployOnDemand(input: $input) {{ ...PodFields }} }} {POD_FIELDS}"
        );
        let pod: Option<GqlPod> = self
            .call(
                "podFindAndDeployOnDemand",
                &q,
                json!({"input": input}),
                "podFindAndDeployOnDemand",
                Idempotency::Unsafe,
            )
            .await?;
        pod.map(Pod::from).ok_or_else(|| RunPodError::Transient {
            message: "podFindAndDeployOnDemand returned no pod and no error".into(),
            may_have_applied: true,
        })
    }

    async fn get_pod(&self, id: &str) -> Result<Option<Pod>, RunPodError> {
        let q = format!("query Pod($input: PodFilter!) {{ pod(input: $input) {{ ...PodFields }} }} {POD_FIELDS}");
        let pod: Option<GqlPod> =
            self.call("pod", &q, json!({"input": {"podId": id}}), "pod", Idempotency::Safe).await?;
        Ok(pod.map(Pod::from))
    }

    async fn list_pods(&self) -> Result<Vec<Pod>, RunPodError> {
        let q = format!("query Pods {{ myself {{ pods {{ ...PodFields }} }} }} {POD_FIELDS}");
        let me: Option<MyPods> = self.call("myself.pods", &q, json!({}), "myself", Idempotency::Safe).await?;
        Ok(me.map(|m| m.pods.into_iter().map(Pod::from).collect()).unwrap_or_default())
    }

    async fn stop_pod(&self, id: &str) -> Result<(), RunPodError> {
        let q = "mutation Stop($input: PodStopInput!) { podStop(input: $input) { id desiredStatus } }";
        let _: Option<Value> =
            self.call("podStop", q, json!({"input": {"podId": id}}), "podStop", Idempotency::Safe).await?;
        Ok(())
    }

    async fn resume_pod(&self, id: &str, gpu_count: i32) -> Result<(), RunPodError> {
        let q = "mutation Resume($input: PodResumeInput!) { podResume(input: $input) { id desiredStatus } }";
        let input = json!({"input": {"podId": id, "gpuCount": gpu_count}});
        let _: Option<Value> = self.call("podResume", q, input, "podResume", Idempotency::Safe).await?;
        Ok(())
    }

    async fn terminate_pod(&self, id: &str) -> Result<(), RunPodError> {
        let q = "mutation Terminate($input: PodTerminateInput!) { podTerminate(input: $input) }";
        match self
            .call::<Value>("podTerminate", q, json!({"input": {"podId": id}}), "podTerminate", Idempotency::Safe)
            .await
        {
            Ok(_) | Err(RunPodError::NotFound { .. }) => Ok(()),
            Err(e) => Err(e),
        }
    }

    async fn gpu_types(&self, query: &GpuQuery) -> Result<Vec<GpuOffer>, RunPodError> {
        let q = "query Gpus($filter: GpuTypeFilter, $price: GpuLowestPriceInput!) { gpuTypes(input: $filter) { \
                 id displayName memoryInGb maxGpuCount lowestPrice(input: $price) { uninterruptablePrice stockStatus } } }";
        let mut price = json!({"gpuCount": query.gpu_count.max(1)});
        match query.cloud_type {
            ep_api::CloudType::Secure => price["secureCloud"] = json!(true),
            ep_api::CloudType::Community => price["secureCloud"] = json!(false),
            ep_api::CloudType::All => {}
        }
        if let Some(dc) = &query.data_center_id {
            price["dataCenterId"] = json!(dc);
        }
        let filter = query.id.as_ref().map(|id| json!({"id": id}));
        let types: Option<Vec<GqlGpuType>> =
            self.call("gpuTypes", q, json!({"filter": filter, "price": price}), "gpuTypes", Idempotency::Safe).await?;
        Ok(types
            .unwrap_or_default()
            .into_iter()
            .map(|t| GpuOffer {
                stock: Stock::parse(t.lowest_price.as_ref().and_then(|l| l.stock_status.as_deref())),
                price_per_hour: t.lowest_price.and_then(|l| l.uninterruptable_price),
                id: t.id,
                display_name: t.display_name,
                memory_gb: t.memory_in_gb,
                max_gpu_count: t.max_gpu_count,
            })
            .collect())
    }

    async fn network_volumes(&self) -> Result<Vec<NetworkVolume>, RunPodError> {
        let q = "query Volumes { myself { networkVolumes { id name size dataCenterId } } }";
        let me: Option<MyVolumes> =
            self.call("myself.networkVolumes", q, json!({}), "myself", Idempotency::Safe).await?;
        Ok(me
            .map(|m| {
                m.network_volumes
                    .into_iter()
                    .map(|v| NetworkVolume {
                        id: v.id,
                        name: v.name,
                        size_gb: v.size,
                        data_center_id: v.data_center_id,
                    })
                    .collect()
            })
            .unwrap_or_default())
    }

    fn supports_terminate_after(&self) -> bool {
        true
    }
    fn self_terminate_base(&self) -> Option<String> {
        // terminateAfter does it: RunPod ends the pod itself.
        None
    }
}

#[cfg(test)]
mod tests {
    use super::shell_join;

    #[test]
    fn docker_args_quote_what_a_shell_would_split() {
        let argv = ["sh", "-c", "echo 'hi' > /workspace/x; sleep 1", ""].map(String::from);
        assert_eq!(shell_join(&argv), r#"sh -c 'echo '\''hi'\'' > /workspace/x; sleep 1' ''"#);
        let out = std::process::Command::new("sh")
            .arg("-c")
            .arg(format!("printf '%s|' {}", shell_join(&argv[1..])))
            .output()
            .unwrap();
        assert_eq!(String::from_utf8(out.stdout).unwrap(), "-c|echo 'hi' > /workspace/x; sleep 1||");
    }
}
