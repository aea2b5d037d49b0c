//! PROVISIONED -> SYNCED: the runner binary and the attempt's payload on the volume, every file
//! verified by head_object; nothing is paid for while this waits.

use std::collections::BTreeMap;
use std::time::Duration;

use ep_api::RunPodOrderSpec;
use ep_api::experiment::{ExperimentPhase, PayloadSource as PayloadSpec};
use ep_api::order::OrderPhase;
use ep_api::volume::{self, PayloadManifest, keys};
use ep_volume::store::Usage;
use ep_volume::sync::{SyncError, SyncOptions, push};
use ep_volume::{Payload, PayloadSource, StoreError, VolumeStore};
use futures::{StreamExt, TryStreamExt};
use sha2::{Digest, Sha256};

use super::pass::Pass;
use super::world::{World, staging_dir};
use crate::error::Error;
use crate::pool::Conn;
use crate::reason::{Blocked, Reason};
use crate::runpod::RunPodApi;

/// Why an order has no attempt to run: made by hand and not bound yet, or with nothing that can
/// bind it (no experiment named, the experiment missing, or ended). `phase`: the named
/// experiment's phase (None when it does not exist).
pub fn unbound(spec: &RunPodOrderSpec, phase: Option<Option<ExperimentPhase>>) -> Blocked {
    let Some(e) = &spec.experiment_ref else {
        return Blocked::new(
            Reason::NothingRunnable,
            "spec.run is empty and spec.experimentRef names no experiment: there is nothing to run",
        );
    };
    match phase {
        None => Blocked::new(
            Reason::NothingRunnable,
            format!("spec.experimentRef names experiment {}, which does not exist: there is nothing to run", e.name),
        ),
        Some(Some(p @ (ExperimentPhase::Succeeded | ExperimentPhase::Failed))) => Blocked::new(
            Reason::NothingRunnable,
            format!(
                "experiment {} has ended ({p:?}) and starts no attempt this order could run: delete the order, \
                 or rerun the experiment",
                e.name
            ),
        ),
        Some(_) => Blocked::new(
            Reason::NotBound,
            format!("waiting for experiment {} to bind this order to an attempt (status.binding)", e.name),
        ),
    }
}

/// [`unbound`] for the order of a pass.
pub fn unbound_in<W: World>(w: &W, pass: &Pass<'_>) -> Blocked {
    let spec = &pass.order.spec;
    let phase = spec.experiment_ref.as_ref().map_or(Some(None), |e| w.experiment_phase(&pass.ns, &e.name));
    unbound(spec, phase)
}

/// A volume failure a person should see as a wait (volume full, S3 down), rather than a retry
/// that only the log shows.
pub fn store_block(e: &StoreError) -> Option<Blocked> {
    match e.status() {
        Some(507) => Some(Blocked::new(
            Reason::VolumeFull,
            format!("the network volume is full (HTTP 507): free space on it or grow it; {e}"),
        )),
        Some(s) if s >= 500 => Some(Blocked::new(Reason::S3Unavailable, format!("the volume's S3 API failed: {e}"))),
        None if matches!(e, StoreError::Request { .. }) => {
            Some(Blocked::new(Reason::S3Unavailable, format!("the volume's S3 API did not answer: {e}")))
        }
        _ => None,
    }
}

/// How long the listing behind a full volume's figures may take.
const USAGE_WITHIN: Duration = Duration::from_secs(10);

/// A full volume's wait with its figures: the volume's size as RunPod reports it and what a
/// listing finds on it (RunPod's 507 says neither).
async fn with_figures<A: RunPodApi, S: VolumeStore>(conn: &Conn<A, S>, b: Blocked) -> Blocked {
    if b.reason != Reason::VolumeFull {
        return b;
    }
    let size = match conn.api.network_volumes().await {
        Ok(v) => v.into_iter().find(|v| v.id == conn.volume_id).map(|v| v.size_gb),
        Err(_) => None,
    };
    // RunPod's first listing of files written inside pods can take minutes (it computes their
    // MD5s): the figures are worth a few seconds, not a stuck sync.
    let usage = tokio::time::timeout(USAGE_WITHIN, conn.store.usage()).await.ok().and_then(Result::ok).flatten();
    Blocked::new(Reason::VolumeFull, full_message(&conn.volume_id, size, usage))
}

/// The VolumeFull message: size, used and free in GB (10^9 bytes, as RunPod counts them).
pub fn full_message(volume: &str, size_gb: Option<i64>, usage: Option<Usage>) -> String {
    let gb = |b: u64| format!("{:.2} GB", b as f64 / 1e9);
    let at_least = |u: &Usage| if u.complete { "" } else { "at least " };
    let figures = match (size_gb.and_then(|s| u64::try_from(s).ok()), usage) {
        (Some(size), Some(u)) => {
            let free = (size * 1_000_000_000).saturating_sub(u.bytes);
            format!("{}{} of {size} GB used ({} objects), {} free", at_least(&u), gb(u.bytes), u.objects, gb(free))
        }
        (Some(size), None) => format!("size {size} GB, usage unknown (the listing failed or took over 10 s)"),
        (None, Some(u)) => {
            format!(
                "{}{} used ({} objects), size unknown (RunPod did not list the volume)",
                at_least(&u),
                gb(u.bytes),
                u.objects
            )
        }
        (None, None) => "size and usage unknown".to_owned(),
    };
    format!(
        "network volume {volume} is full (HTTP 507): {figures}; free space on it (finished runs under ep/runs/, \
         unused payloads under ep/payloads/) or grow it in RunPod"
    )
}

/// Turns a store failure into a wait when it is one, else into a reconcile error.
fn store_result<T>(r: Result<T, StoreError>) -> Result<Result<T, Blocked>, Error> {
    match r {
        Ok(v) => Ok(Ok(v)),
        Err(e) => store_block(&e).map(Err).ok_or(Error::Store(e)),
    }
}

/// Checks a pushed payload: its manifest is sealed and hashes to its id, and every file it names
/// is on the volume with the right size and sha256. Returns the manifest.
async fn verify_sealed<S: VolumeStore>(store: &S, id: &str) -> Result<Result<PayloadManifest, Blocked>, StoreError> {
    let missing = |m: String| Ok(Err(Blocked::new(Reason::PayloadMissing, m)));
    let Some(bytes) = store.get(&keys::payload_manifest(id)).await? else {
        return missing(format!(
            "spec.payload.digest sha256:{id} is not sealed on the volume: run `kubectl ep push DIR` against this provider"
        ));
    };
    if hex::encode(Sha256::digest(&bytes)) != id {
        return missing(format!("the sealed manifest of payload sha256:{id} does not hash to its id"));
    }
    let manifest: PayloadManifest = match volume::parse(keys::PAYLOAD_DIR, &bytes) {
        Ok(m) => m,
        Err(e) => return missing(format!("the manifest of payload sha256:{id} does not parse: {e}")),
    };
    let heads: Vec<_> = manifest.files.iter().map(|f| blob_missing(store, f)).collect();
    let checks: Vec<Option<String>> = futures::stream::iter(heads).buffer_unordered(16).try_collect().await?;
    let bad: Vec<String> = checks.into_iter().flatten().collect();
    if !bad.is_empty() {
        return missing(format!("payload sha256:{id}: the volume lacks or holds a different {}", bad.join(", ")));
    }
    Ok(Ok(manifest))
}

/// A pushed payload narrowed to what the experiment declares (spec.payload.locations and excludes):
/// the id of the payload the run gets. When the declaration narrows it, the narrowed manifest is
/// sealed beside the pushed one (its files are the pushed blobs: nothing else is uploaded).
async fn declared_part<S: VolumeStore>(
    store: &S,
    id: &str,
    manifest: &PayloadManifest,
    spec: &PayloadSpec,
) -> Result<Result<(String, PayloadManifest), Blocked>, StoreError> {
    if spec.locations.is_empty() && spec.excludes.is_empty() {
        return Ok(Ok((id.to_owned(), manifest.clone())));
    }
    let narrowed = match ep_volume::manifest::select(manifest, &spec.locations, &spec.excludes) {
        Ok(m) => m,
        Err(e) => {
            let msg = format!("spec.payload of pushed payload sha256:{id}: {e}");
            return Ok(Err(Blocked::new(Reason::InvalidPayload, msg)));
        }
    };
    if narrowed.files.is_empty() {
        let msg = format!("spec.payload.locations and excludes leave no file of pushed payload sha256:{id}");
        return Ok(Err(Blocked::new(Reason::InvalidPayload, msg)));
    }
    if narrowed == *manifest {
        return Ok(Ok((id.to_owned(), narrowed)));
    }
    let body = serde_json::to_vec(&narrowed).unwrap_or_default();
    let sha = hex::encode(Sha256::digest(&body));
    if store.head(&keys::payload_manifest(&sha)).await?.is_none_or(|i| i.size != body.len() as u64) {
        store.put_bytes(&keys::payload_manifest(&sha), body.into(), &sha).await?;
    }
    Ok(Ok((sha, narrowed)))
}

/// The file's path when the volume lacks its blob or holds another content under its key.
async fn blob_missing<S: VolumeStore>(
    store: &S,
    f: &ep_api::volume::ManifestEntry,
) -> Result<Option<String>, StoreError> {
    let info = store.head(&keys::payload_blob(&f.sha256)).await?;
    let ok = info.is_some_and(|i| i.size == f.size && i.sha256.as_deref().is_none_or(|s| s == f.sha256));
    Ok((!ok).then(|| f.path.clone()))
}

/// Builds a ConfigMap payload (locations and excludes honoured) and pushes it.
async fn push_config_map<W: World>(
    w: &W,
    pass: &Pass<'_>,
    conn: &Conn<W::Api, W::Store>,
    spec: &PayloadSpec,
    cm_name: &str,
) -> Result<Result<(String, PayloadManifest), Blocked>, Error> {
    let Some(cm) = w.config_map(&pass.ns, cm_name).await? else {
        return Ok(Err(Blocked::new(
            Reason::PayloadMissing,
            format!("spec.payload.configMap: ConfigMap {}/{cm_name} does not exist", pass.ns),
        )));
    };
    let mut files: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    for (k, v) in cm.data.clone().unwrap_or_default() {
        files.insert(k, v.into_bytes());
    }
    for (k, v) in cm.binary_data.clone().unwrap_or_default() {
        files.insert(k, v.0);
    }
    let dir = staging_dir(w.staging(), &pass.ns, &pass.name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).map_err(Error::io("staging", &dir))?;
    let raw = dir.join("files");
    let staged = Payload::from_memory(&files, &raw).and_then(|_| {
        Payload::build(&PayloadSource {
            root: raw.clone(),
            locations: spec.locations.clone(),
            excludes: spec.excludes.clone(),
            cache_dir: None,
        })
    });
    let payload = match staged {
        Ok(p) => p,
        Err(e) => {
            let _ = std::fs::remove_dir_all(&dir);
            return Ok(Err(Blocked::new(Reason::InvalidPayload, format!("spec.payload (ConfigMap {cm_name}): {e}"))));
        }
    };
    let _permit = w.sync_slots().acquire().await.map_err(|_| Error::ShuttingDown)?;
    let pushed = push(&conn.store, &payload, &SyncOptions::default(), &|_| {}).await;
    let _ = std::fs::remove_dir_all(&dir);
    match pushed {
        Ok(report) => {
            tracing::info!(order = %pass.name, payload = %report.payload_id, uploaded = report.uploaded_files, "payload synced");
            Ok(Ok((report.payload_id, payload.manifest)))
        }
        Err(SyncError::Store(e)) => store_result(Err(e)),
        Err(e) => Err(e.into()),
    }
}

/// PROVISIONED -> SYNCED.
pub async fn run<W: World>(w: &W, pass: &mut Pass<'_>) -> Result<Option<Duration>, Error> {
    let Some(t) = pass.template() else { return Ok(pass.block(unbound_in(w, pass))) };
    let conn = match w.provider(&pass.order.spec.provider_ref).await {
        Ok(c) => c,
        Err(b) => return Ok(pass.block(b)),
    };
    match store_result(w.runner().ensure_on(&conn.store).await)? {
        Ok(true) => {
            let note = format!("uploaded {} to volume {}", w.runner().key(), conn.volume_id);
            pass.notice(Reason::RunnerUploaded, note);
        }
        Ok(false) => {}
        Err(b) => return Ok(pass.block(with_figures(&conn, b).await)),
    }
    let payload = &t.payload;
    let (id, manifest) = match (&payload.digest, &payload.config_map) {
        (Some(d), _) => {
            let id = d.trim_start_matches("sha256:");
            let manifest = match store_result(verify_sealed(&conn.store, id).await)? {
                Ok(Ok(m)) => m,
                Ok(Err(b)) | Err(b) => return Ok(pass.block(b)),
            };
            match store_result(declared_part(&conn.store, id, &manifest, payload).await)? {
                Ok(Ok(part)) => part,
                Ok(Err(b)) | Err(b) => return Ok(pass.block(b)),
            }
        }
        (None, Some(cm)) => match push_config_map(w, pass, &conn, payload, &cm.name).await? {
            Ok(part) => part,
            Err(b) => return Ok(pass.block(with_figures(&conn, b).await)),
        },
        (None, None) => {
            let b = Blocked::new(Reason::InvalidPayload, "spec.run.payload names neither digest nor configMap");
            return Ok(pass.block(b));
        }
    };
    if let Err(b) = super::entry::gate(&t.entry, &manifest, &id) {
        return Ok(pass.block(b));
    }
    let msg = format!("payload sha256:{id} and runner {} verified on volume {}", w.runner().version, conn.volume_id);
    pass.st.payload_id = Some(id);
    pass.enter(OrderPhase::Synced, Reason::Synced, &msg);
    Ok(Some(Duration::ZERO))
}
