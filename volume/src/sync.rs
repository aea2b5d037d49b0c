//! Payload sync: blobs the volume lacks go up and are verified on the volume, the manifest is
//! sealed last. With more than a few blobs to check, one listing of the blob directory tells which
//! are there and a second one verifies the uploads (about one request per file instead of three);
//! a blob a listing does not show, or a listing RunPod cannot page, falls back to head_object.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use ep_api::volume::{ManifestEntry, PayloadManifest, keys};
use futures::{StreamExt, TryStreamExt};
use sha2::{Digest, Sha256};

use crate::manifest::Payload;
use crate::store::{StoreError, VolumeStore};

/// Above this many blobs to check, listing the blob directory costs fewer requests than a HEAD each.
const LIST_ABOVE: usize = 8;

/// What became of one blob.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Synced {
    /// On the volume already.
    Present,
    /// Uploaded and verified.
    Uploaded,
    /// Uploaded; the listing after all uploads verifies it.
    Unverified,
}

/// How to sync.
#[derive(Clone, Debug)]
pub struct SyncOptions {
    /// Uploads in flight at once.
    pub parallelism: usize,
    /// A payload id sealed on this volume before (e.g. the last push of the same directory): its
    /// blobs were verified when it was sealed and blobs never change, so they are not checked again.
    pub previous: Option<String>,
    /// Check every blob with head_object even when a previous manifest vouches for it.
    pub verify_all: bool,
}

impl Default for SyncOptions {
    fn default() -> Self {
        Self { parallelism: 16, previous: None, verify_all: false }
    }
}

/// Where a sync stands (for progress bars).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Progress {
    pub files_done: u64,
    pub files_total: u64,
    pub bytes_done: u64,
    pub bytes_total: u64,
}

/// What a sync did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SyncReport {
    pub payload_id: String,
    pub files_total: u64,
    pub bytes_total: u64,
    /// Objects written (blobs; the manifest is counted apart).
    pub uploaded_files: u64,
    pub uploaded_bytes: u64,
    /// Blobs already on the volume.
    pub present_files: u64,
    pub manifest_written: bool,
    /// The payload was sealed already: nothing to do.
    pub already_sealed: bool,
    /// S3 requests made.
    pub requests: u64,
}

/// A sync failed; the payload stays unsealed (and so unusable).
#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("payload file {path:?}: the volume holds {found} after upload, expected {expected}")]
    Verify { path: String, expected: String, found: String },
    #[error("payload file {path:?} has no local source")]
    MissingSource { path: String },
}

fn describe(size: u64, sha256: Option<&str>) -> String {
    format!("{size} bytes, sha256 {}", sha256.unwrap_or("unknown"))
}

/// Pushes `payload` to the volume and seals it. Returns at once if it is sealed already.
pub async fn push<S: VolumeStore>(
    store: &S,
    payload: &Payload,
    opts: &SyncOptions,
    progress: &(dyn Fn(Progress) + Sync),
) -> Result<SyncReport, SyncError> {
    let start_requests = store.requests();
    let manifest_key = keys::payload_manifest(&payload.id);
    let total_bytes = payload.manifest.total_bytes();
    let mut report = SyncReport {
        payload_id: payload.id.clone(),
        files_total: payload.manifest.files.len() as u64,
        bytes_total: total_bytes,
        ..SyncReport::default()
    };
    if store.head(&manifest_key).await?.is_some_and(|i| i.size == payload.manifest_bytes.len() as u64) {
        report.already_sealed = true;
        report.present_files = report.files_total;
        report.requests = store.requests() - start_requests;
        progress(Progress {
            files_done: report.files_total,
            files_total: report.files_total,
            bytes_done: total_bytes,
            bytes_total: total_bytes,
        });
        return Ok(report);
    }
    let vouched: BTreeSet<String> = match (&opts.previous, opts.verify_all) {
        (Some(prev), false) if *prev != payload.id => match store.get(&keys::payload_manifest(prev)).await? {
            Some(bytes) if hex::encode(Sha256::digest(&bytes)) == *prev => {
                serde_json::from_slice::<PayloadManifest>(&bytes)
                    .map(|m| m.files.into_iter().map(|f| f.sha256).collect())
                    .unwrap_or_default()
            }
            _ => BTreeSet::new(),
        },
        _ => BTreeSet::new(),
    };
    // One blob per distinct content.
    let mut seen = BTreeSet::new();
    let todo: Vec<_> = payload.manifest.files.iter().filter(|f| seen.insert(f.sha256.clone())).collect();
    let unvouched = todo.iter().filter(|f| !vouched.contains(&f.sha256)).count();
    let blob_dir = keys::payload_blob("");
    let listed = if unvouched > LIST_ABOVE { store.list_dir(&blob_dir).await? } else { None };
    let files_done = AtomicU64::new(0);
    let bytes_done = AtomicU64::new(0);
    let uploaded = AtomicU64::new(0);
    let uploaded_bytes = AtomicU64::new(0);
    let unique_bytes: u64 = todo.iter().map(|f| f.size).sum();
    let tick = |size: u64| {
        let f = files_done.fetch_add(1, Ordering::Relaxed) + 1;
        let b = bytes_done.fetch_add(size, Ordering::Relaxed) + size;
        progress(Progress { files_done: f, files_total: todo.len() as u64, bytes_done: b, bytes_total: unique_bytes });
    };
    // Futures collected first: a closure held across the await would make the future non-Send.
    let blobs: Vec<_> = todo.iter().map(|entry| sync_blob(store, payload, entry, &vouched, listed.as_ref())).collect();
    let done: Vec<(Synced, &ManifestEntry)> = futures::stream::iter(blobs)
        .buffer_unordered(opts.parallelism.max(1))
        .map_ok(|(synced, entry)| {
            if synced != Synced::Present {
                uploaded.fetch_add(1, Ordering::Relaxed);
                uploaded_bytes.fetch_add(entry.size, Ordering::Relaxed);
            }
            tick(entry.size);
            (synced, entry)
        })
        .try_collect()
        .await?;
    let unverified: Vec<&ManifestEntry> =
        done.iter().filter(|(s, _)| *s == Synced::Unverified).map(|(_, e)| *e).collect();
    if !unverified.is_empty() {
        // One listing verifies every upload; what it does not show (a lagging listing, a page
        // RunPod could not serve) is asked with HEAD.
        let after = store.list_dir(&blob_dir).await?.unwrap_or_default();
        let heads: Vec<_> = unverified
            .into_iter()
            .filter(|e| after.get(&keys::payload_blob(&e.sha256)) != Some(&e.size))
            .map(|e| verify(store, payload, e))
            .collect();
        futures::stream::iter(heads).buffer_unordered(opts.parallelism.max(1)).try_collect::<Vec<()>>().await?;
    }
    // Sealed last: a payload is usable only once every blob it names is verified.
    store.put_bytes(&manifest_key, Bytes::from(payload.manifest_bytes.clone()), &payload.id).await?;
    match store.head(&manifest_key).await? {
        Some(i) if i.size == payload.manifest_bytes.len() as u64 => {}
        found => {
            return Err(SyncError::Verify {
                path: manifest_key,
                expected: describe(payload.manifest_bytes.len() as u64, Some(&payload.id)),
                found: found.map_or_else(|| "nothing".into(), |i| describe(i.size, i.sha256.as_deref())),
            });
        }
    }
    report.manifest_written = true;
    report.uploaded_files = uploaded.load(Ordering::Relaxed);
    report.uploaded_bytes = uploaded_bytes.load(Ordering::Relaxed);
    report.present_files = report.files_total - report.uploaded_files;
    report.requests = store.requests() - start_requests;
    Ok(report)
}

fn holds(i: &crate::store::ObjectInfo, entry: &ManifestEntry) -> bool {
    i.size == entry.size && i.sha256.as_deref() == Some(entry.sha256.as_str())
}

/// Makes one blob present: whether it was there, or uploaded (and then verified unless a listing
/// will verify it).
///
/// A named function rather than a closure: its future must be `Send` for every borrow lifetime,
/// which the compiler cannot prove for a closure returning an async block.
async fn sync_blob<'a, S: VolumeStore>(
    store: &S,
    payload: &Payload,
    entry: &'a ManifestEntry,
    vouched: &BTreeSet<String>,
    listed: Option<&std::collections::BTreeMap<String, u64>>,
) -> Result<(Synced, &'a ManifestEntry), SyncError> {
    if vouched.contains(&entry.sha256) {
        return Ok((Synced::Present, entry));
    }
    let key = keys::payload_blob(&entry.sha256);
    let present = match listed {
        // Blobs are named by their sha256: the key and the size say it is this content.
        Some(l) => l.get(&key) == Some(&entry.size),
        None => store.head(&key).await?.is_some_and(|i| holds(&i, entry)),
    };
    if present {
        return Ok((Synced::Present, entry));
    }
    let path = payload.files.get(&entry.path).ok_or_else(|| SyncError::MissingSource { path: entry.path.clone() })?;
    if let Err(e) = store.put_file(&key, path, entry.size, &entry.sha256).await {
        // A 5xx that outlived the SDK's retries may still have landed: check, then try once more.
        if !store.head(&key).await?.is_some_and(|i| holds(&i, entry)) {
            tracing::debug!(key, error = %e, "retrying upload");
            store.put_file(&key, path, entry.size, &entry.sha256).await?;
        }
    }
    if listed.is_some() {
        return Ok((Synced::Unverified, entry));
    }
    verify(store, payload, entry).await?;
    Ok((Synced::Uploaded, entry))
}

/// Checks with head_object that the volume holds the blob; an upload that answered 200 and did
/// not land (a proxy can do that) is made once more before the sync fails.
async fn verify<S: VolumeStore>(store: &S, payload: &Payload, entry: &ManifestEntry) -> Result<(), SyncError> {
    let key = keys::payload_blob(&entry.sha256);
    if store.head(&key).await?.is_some_and(|i| holds(&i, entry)) {
        return Ok(());
    }
    let path = payload.files.get(&entry.path).ok_or_else(|| SyncError::MissingSource { path: entry.path.clone() })?;
    tracing::debug!(key, "an upload did not land: once more");
    store.put_file(&key, path, entry.size, &entry.sha256).await?;
    match store.head(&key).await? {
        Some(i) if holds(&i, entry) => Ok(()),
        found => Err(SyncError::Verify {
            path: entry.path.clone(),
            expected: describe(entry.size, Some(&entry.sha256)),
            found: found.map_or_else(|| "nothing".into(), |i| describe(i.size, i.sha256.as_deref())),
        }),
    }
}
