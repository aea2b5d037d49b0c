//! Result collection at DRAINING: nothing may delete a pod before its results are verified here.

use std::collections::BTreeMap;

use ep_api::volume::{self, ManifestEntry, ResourceUsage, Results, ResultsSpec, Terminal, TerminalState, keys};
use sha2::{Digest, Sha256};

use crate::store::{StoreError, VolumeStore};

/// A verified run.
#[derive(Clone, Debug, PartialEq)]
pub struct Collected {
    pub terminal: Terminal,
    pub metrics: BTreeMap<String, f64>,
    pub usage: ResourceUsage,
    /// sha256 over the verified artifact manifest.
    pub receipt: String,
}

/// Why a run's results cannot be trusted yet. Every variant keeps the pod alive and says what differs.
#[derive(Debug, thiserror::Error)]
pub enum CollectError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("run {run_id}: {file} is not on the volume yet")]
    Missing { run_id: String, file: String },
    #[error("run {run_id}: {0}", .source)]
    Format { run_id: String, source: volume::FormatError },
    #[error(
        "run {run_id}: artifact {path:?} differs from terminal.json: expected {expected}, the volume holds {found}"
    )]
    Tampered { run_id: String, path: String, expected: String, found: String },
    #[error("run {run_id}: terminal.json {what}")]
    Divergent { run_id: String, what: String },
}

fn entry_desc(e: &ManifestEntry) -> String {
    format!("{} bytes, md5 {}", e.size, e.md5.as_deref().unwrap_or("none"))
}

/// Reads and verifies a finished run.
pub async fn collect<S: VolumeStore>(
    store: &S,
    run_id: &str,
    fencing_token: u64,
    contract: &ResultsSpec,
) -> Result<Collected, CollectError> {
    let missing = |file: &str| CollectError::Missing { run_id: run_id.into(), file: file.into() };
    let fmt = |source| CollectError::Format { run_id: run_id.into(), source };
    let divergent = |what: String| CollectError::Divergent { run_id: run_id.into(), what };
    let bytes = store.get(&keys::run_file(run_id, keys::TERMINAL)).await?.ok_or_else(|| missing(keys::TERMINAL))?;
    let terminal: Terminal = volume::parse(keys::TERMINAL, &bytes).map_err(fmt)?;
    if terminal.run_id != run_id {
        return Err(divergent(format!("names run {} instead", terminal.run_id)));
    }
    if terminal.fencing_token != fencing_token {
        return Err(divergent(format!(
            "carries fencing token {} but the claim holds {fencing_token}: a stale writer",
            terminal.fencing_token
        )));
    }
    // Every artifact by head_object: RunPod's ETag is the MD5, so nothing is downloaded.
    for a in &terminal.artifacts {
        let key = format!("{}{}/{}", keys::run_prefix(run_id), keys::ARTIFACTS_DIR, a.path);
        let info = store.head(&key).await?;
        let ok = info
            .as_ref()
            .is_some_and(|i| i.size == a.size && (a.md5.is_none() || i.etag.as_deref() == a.md5.as_deref()));
        if !ok {
            return Err(CollectError::Tampered {
                run_id: run_id.into(),
                path: a.path.clone(),
                expected: entry_desc(a),
                found: info.map_or_else(
                    || "nothing".into(),
                    |i| format!("{} bytes, md5 {}", i.size, i.etag.unwrap_or_default()),
                ),
            });
        }
    }
    let usage_bytes =
        store.get(&keys::run_file(run_id, keys::RESOURCE_USAGE)).await?.ok_or_else(|| missing(keys::RESOURCE_USAGE))?;
    let usage: ResourceUsage = volume::parse(keys::RESOURCE_USAGE, &usage_bytes).map_err(fmt)?;
    let mut metrics = BTreeMap::new();
    if terminal.state == TerminalState::Succeeded {
        let entry = terminal
            .artifacts
            .iter()
            .find(|a| a.path == contract.file)
            .ok_or_else(|| divergent(format!("says SUCCEEDED but lists no {}", contract.file)))?;
        let key = format!("{}{}/{}", keys::run_prefix(run_id), keys::ARTIFACTS_DIR, contract.file);
        let data = store.get(&key).await?.ok_or_else(|| missing(&contract.file))?;
        let sha = hex::encode(Sha256::digest(&data));
        if sha != entry.sha256 {
            return Err(CollectError::Tampered {
                run_id: run_id.into(),
                path: contract.file.clone(),
                expected: format!("sha256 {}", entry.sha256),
                found: format!("sha256 {sha}"),
            });
        }
        let results = Results::parse(&data)
            .map_err(|e| divergent(format!("says SUCCEEDED but {} does not parse: {e}", contract.file)))?;
        metrics = results
            .metrics(&contract.metrics)
            .map_err(|e| divergent(format!("says SUCCEEDED but {}: {e}", contract.file)))?;
        for (name, value) in &terminal.metrics {
            if metrics.get(name) != Some(value) {
                return Err(divergent(format!(
                    "reports {name} = {value} but {} says {:?}",
                    contract.file,
                    metrics.get(name)
                )));
            }
        }
    }
    let receipt = hex::encode(Sha256::digest(serde_json::to_vec(&terminal.artifacts).unwrap_or_default()));
    Ok(Collected { terminal, metrics, usage, receipt })
}
