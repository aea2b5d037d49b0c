//! `kubectl ep run DIR -f experiment.yaml`: push the code, fill in its digest, apply the
//! Experiment, then follow it until it ends, as one command.

use std::path::Path;
use std::time::Duration;

use ep_api::Experiment;
use ep_api::experiment::ExperimentPhase;
use kube::api::{Patch, PatchParams};
use kube::{Api, Client, ResourceExt};

use crate::orders::api_error;
use crate::push::{PushArgs, provider_volume, push_to};
use crate::runpod::{LogsArgs, logs};

/// Reads the Experiment of `file`, naming the file and the field that does not fit.
fn read(file: &Path) -> Result<Experiment, String> {
    let text = std::fs::read_to_string(file).map_err(|e| format!("{}: {e}", file.display()))?;
    let exp: Experiment = serde_saphyr::from_str(&text).map_err(|e| format!("{}: {e}", file.display()))?;
    if exp.metadata.name.as_deref().is_none_or(str::is_empty) {
        return Err(format!("{}: metadata.name is required", file.display()));
    }
    Ok(exp)
}

/// One line of what the experiment is doing, printed when it changes.
fn line(exp: &Experiment) -> String {
    let st = exp.status.clone().unwrap_or_default();
    let mut out = st.phase.map_or_else(|| "Pending".to_owned(), |p| format!("{p:?}"));
    if let Some(r) = &st.reason {
        out.push_str(&format!(" ({r})"));
    }
    if let Some(p) = &st.progress {
        out.push_str(&format!(" {}", p.summary));
    }
    if st.phase == Some(ExperimentPhase::Waiting)
        && let Some(m) = &st.message
    {
        out.push_str(&format!(": {m}"));
    }
    out
}

/// Pushes `dir`, applies the Experiment of `file` with the payload's digest, and with `follow`
/// prints its phase changes and its script's output until it ends; fails when it fails.
pub async fn run(client: Client, ns: &str, dir: &Path, file: &Path, follow: bool) -> Result<(), String> {
    let mut exp = read(file)?;
    let ns = exp.metadata.namespace.clone().unwrap_or_else(|| ns.to_owned());
    let name = exp.name_any();
    let (store, label) = provider_volume(&client, &exp.spec.order.provider_ref).await?;
    let args = PushArgs {
        dir: dir.to_path_buf(),
        locations: exp.spec.payload.locations.clone(),
        excludes: exp.spec.payload.excludes.clone(),
        parallelism: 16,
        entry: Some((file.display().to_string(), exp.spec.entry.clone())),
        ..PushArgs::default()
    };
    let digest = push_to(&store, &label, &args).await?.digest;
    exp.spec.payload.digest = Some(digest.clone());
    exp.spec.payload.config_map = None;
    exp.metadata.namespace = Some(ns.clone());
    exp.metadata.managed_fields = None;
    exp.status = None;
    let api = Api::<Experiment>::namespaced(client.clone(), &ns);
    api.patch(&name, &PatchParams::apply("kubectl-ep").force(), &Patch::Apply(&exp)).await.map_err(api_error)?;
    println!("experiment.ep.dev/{name} applied in {ns} with payload {digest}");
    if !follow {
        return Ok(());
    }
    let (mut last, mut followed) = (String::new(), None);
    loop {
        let now = api.get(&name).await.map_err(api_error)?;
        let shown = line(&now);
        if shown != last {
            println!("{name}: {shown}");
            last = shown;
        }
        let st = now.status.clone().unwrap_or_default();
        let ended = matches!(st.phase, Some(ExperimentPhase::Succeeded | ExperimentPhase::Failed));
        let last_attempt = st.history.last().map(|a| a.attempt);
        if ended && last_attempt.is_some() && last_attempt != followed {
            // A run too short to follow live: its output, once.
            let a = LogsArgs {
                name: name.clone(),
                container: false,
                tail: None,
                follow: false,
                stderr: false,
                attempt: last_attempt,
            };
            if let Err(e) = logs(client.clone(), &ns, &a).await {
                eprintln!("{name}: {e}");
            }
        }
        match st.phase {
            Some(ExperimentPhase::Succeeded) => {
                println!("{name}: {}", st.metrics.unwrap_or_else(|| "succeeded".to_owned()));
                return Ok(());
            }
            Some(ExperimentPhase::Failed) => return Err(format!("{name} failed: {}", st.message.unwrap_or_default())),
            _ => {}
        }
        // Once an attempt's runner is online, its output is followed until that run ends.
        let attempt = st.current_attempt.as_ref().map(|a| a.attempt);
        if st.reason.as_deref() == Some("Running") && attempt.is_some() && attempt != followed {
            followed = attempt;
            let a = LogsArgs { name: name.clone(), container: false, tail: None, follow: true, stderr: false, attempt };
            if let Err(e) = logs(client.clone(), &ns, &a).await {
                eprintln!("{name}: {e}");
            }
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
}
