//! The `s3s::S3` implementation over volume directories.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use base64::Engine as _;
use futures::StreamExt;
use md5::{Digest, Md5};
use s3s::checksum::ChecksumHasher;
use s3s::crypto::Checksum as _;
use s3s::dto::*;
use s3s::{S3, S3Error, S3ErrorCode, S3Request, S3Response, S3Result, s3_error};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncSeekExt, AsyncWriteExt};

use crate::Sim;

/// Largest single PUT RunPod accepts (it documents "under 500 MB").
pub const MAX_PUT_BYTES: i64 = 500 * 1024 * 1024;
/// Largest multipart part.
pub const MAX_PART_BYTES: i64 = 500 * 1024 * 1024;

const UPLOADS: &str = ".s3compat_uploads";
const META: &str = ".s3compat_meta";
const EMPTY_MD5: &str = "d41d8cd98f00b204e9800998ecf8427e";

/// What the S3 API remembers about an object it wrote (a sidecar file, like RunPod's hidden dirs).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
struct Sidecar {
    size: u64,
    mtime_ns: u128,
    md5: String,
    content_type: Option<String>,
    metadata: BTreeMap<String, String>,
    checksums: BTreeMap<String, String>,
}

/// All network volumes of the simulated account.
#[derive(Clone, Debug)]
pub struct Volumes {
    sim: Arc<Sim>,
    /// Bytes used per volume, walked at most once a second and kept current by our own writes
    /// (pods also write, so the walk is refreshed).
    used: Arc<std::sync::Mutex<std::collections::HashMap<PathBuf, (std::time::Instant, u64)>>>,
}

fn err(code: S3ErrorCode, msg: impl Into<String>) -> S3Error {
    S3Error::with_message(code, msg.into())
}

fn status_err(code: &'static str, status: u16, msg: impl Into<String>) -> S3Error {
    let mut e = S3Error::with_message(S3ErrorCode::Custom(code.into()), msg.into());
    e.set_status_code(http::StatusCode::from_u16(status).unwrap_or(http::StatusCode::INTERNAL_SERVER_ERROR));
    e
}

fn io_err(e: std::io::Error) -> S3Error {
    S3Error::internal_error(e)
}

fn mtime_ns(md: &std::fs::Metadata) -> u128 {
    md.modified().ok().and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok()).map_or(0, |d| d.as_nanos())
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// A key as a relative path; refuses what could leave the volume or touch the hidden dirs.
fn key_path(root: &Path, key: &str) -> S3Result<PathBuf> {
    let trimmed = key.trim_end_matches('/');
    if trimmed.is_empty() || key.starts_with('/') {
        return Err(err(S3ErrorCode::InvalidArgument, format!("invalid key {key:?}")));
    }
    let mut path = root.to_path_buf();
    for (i, part) in trimmed.split('/').enumerate() {
        if part.is_empty() || part == "." || part == ".." || (i == 0 && part.starts_with(".s3compat")) {
            return Err(err(S3ErrorCode::InvalidArgument, format!("invalid key {key:?}")));
        }
        path.push(part);
    }
    Ok(path)
}

/// Hashers for the checksums a request carries (headers or aws-chunked trailers).
fn hasher_for(algos: &[&str]) -> ChecksumHasher {
    let mut h = ChecksumHasher::default();
    for a in algos {
        match *a {
            "crc32" => h.crc32 = Some(s3s::crypto::Crc32::new()),
            "crc32c" => h.crc32c = Some(s3s::crypto::Crc32c::new()),
            "sha1" => h.sha1 = Some(s3s::crypto::Sha1::new()),
            "sha256" => h.sha256 = Some(s3s::crypto::Sha256::new()),
            "crc64nvme" => h.crc64nvme = Some(s3s::crypto::Crc64Nvme::new()),
            _ => {}
        }
    }
    h
}

/// Checksums a request declares, by algorithm, from its fields.
fn declared(
    crc32: &Option<String>,
    crc32c: &Option<String>,
    sha1: &Option<String>,
    sha256: &Option<String>,
    crc64: &Option<String>,
    algorithm: Option<&ChecksumAlgorithm>,
) -> (BTreeMap<String, String>, Vec<String>) {
    let mut m = BTreeMap::new();
    for (name, v) in [("crc32", crc32), ("crc32c", crc32c), ("sha1", sha1), ("sha256", sha256), ("crc64nvme", crc64)] {
        if let Some(v) = v {
            m.insert(name.to_owned(), v.clone());
        }
    }
    let mut algos: Vec<String> = m.keys().cloned().collect();
    if let Some(a) = algorithm {
        let a = a.as_str().to_ascii_lowercase();
        if !algos.contains(&a) {
            algos.push(a);
        }
    }
    (m, algos)
}

struct Written {
    size: u64,
    md5: String,
    checksums: BTreeMap<String, String>,
}

impl Volumes {
    pub fn new(sim: Arc<Sim>) -> Self {
        Self { sim, used: Arc::default() }
    }

    async fn used(&self, root: &Path) -> u64 {
        let cached = self
            .used
            .lock()
            .ok()
            .and_then(|m| m.get(root).copied())
            .filter(|(at, _)| at.elapsed() < std::time::Duration::from_secs(1));
        if let Some((_, bytes)) = cached {
            return bytes;
        }
        let r = root.to_path_buf();
        let bytes = tokio::task::spawn_blocking(move || Self::used_bytes(&r)).await.unwrap_or(0);
        if let Ok(mut m) = self.used.lock() {
            m.insert(root.to_path_buf(), (std::time::Instant::now(), bytes));
        }
        bytes
    }

    fn add_used(&self, root: &Path, bytes: u64) {
        if let Ok(mut m) = self.used.lock()
            && let Some(e) = m.get_mut(root)
        {
            e.1 += bytes;
        }
    }

    fn volume(&self, bucket: &str) -> S3Result<(PathBuf, u64)> {
        let (w, _) = self.sim.world();
        let v = w
            .volumes
            .iter()
            .find(|v| v.id == bucket)
            .ok_or_else(|| err(S3ErrorCode::NoSuchBucket, format!("network volume {bucket} does not exist")))?;
        Ok((w.volume_dir(bucket), v.size_gb.saturating_mul(1_000_000_000)))
    }

    fn max_put(&self) -> i64 {
        let (w, _) = self.sim.world();
        w.config.s3_max_put_bytes
    }

    fn faults(&self) -> crate::config::Faults {
        let (w, _) = self.sim.world();
        w.faults.clone()
    }

    fn sidecar_path(root: &Path, key: &str) -> PathBuf {
        let mut p = root.join(META);
        p.push(format!("{}.json", key.trim_end_matches('/')));
        p
    }

    fn etag_cache_path(root: &Path, key: &str) -> PathBuf {
        let mut p = root.join(META);
        p.push(format!("{}.etag", key.trim_end_matches('/')));
        p
    }

    /// The sidecar, if it still describes the file on disk (a pod may have rewritten it).
    async fn sidecar(root: &Path, key: &str, md: &std::fs::Metadata) -> Option<Sidecar> {
        let bytes = tokio::fs::read(Self::sidecar_path(root, key)).await.ok()?;
        let s: Sidecar = serde_json::from_slice(&bytes).ok()?;
        (s.size == md.len() && s.mtime_ns == mtime_ns(md)).then_some(s)
    }

    async fn write_sidecar(root: &Path, key: &str, s: &Sidecar) -> S3Result<()> {
        let p = Self::sidecar_path(root, key);
        if let Some(parent) = p.parent() {
            tokio::fs::create_dir_all(parent).await.map_err(io_err)?;
        }
        tokio::fs::write(&p, serde_json::to_vec(s).map_err(S3Error::internal_error)?).await.map_err(io_err)
    }

    /// Metadata and MD5 of an object, computing the MD5 of files written inside a pod.
    async fn describe(root: &Path, key: &str, path: &Path) -> S3Result<(std::fs::Metadata, Sidecar)> {
        let md =
            tokio::fs::metadata(path).await.map_err(|_| err(S3ErrorCode::NoSuchKey, format!("no such key {key}")))?;
        if md.is_dir() {
            if key.ends_with('/') {
                return Ok((md, Sidecar { md5: EMPTY_MD5.into(), ..Sidecar::default() }));
            }
            return Err(err(S3ErrorCode::NoSuchKey, format!("no such key {key}")));
        }
        if let Some(s) = Self::sidecar(root, key, &md).await {
            return Ok((md, s));
        }
        // RunPod computes the MD5 of a file written in a pod once and caches it; the cache is not
        // a sidecar, so such a file stays what it was for `s3HidePodFiles`.
        let cache = Self::etag_cache_path(root, key);
        if let Some(s) = tokio::fs::read(&cache)
            .await
            .ok()
            .and_then(|b| serde_json::from_slice::<Sidecar>(&b).ok())
            .filter(|s| s.size == md.len() && s.mtime_ns == mtime_ns(&md))
        {
            return Ok((md, s));
        }
        let (file, size, mtime) = (path.to_path_buf(), md.len(), mtime_ns(&md));
        // Computed and cached in one blocking task, which finishes even when the client gives up
        // waiting: the next listing finds the MD5 cached, as RunPod's does.
        let s = tokio::task::spawn_blocking(move || -> std::io::Result<Sidecar> {
            let mut f = std::fs::File::open(&file)?;
            let mut h = Md5::new();
            let mut buf = vec![0u8; 8 << 20];
            loop {
                let n = std::io::Read::read(&mut f, &mut buf)?;
                if n == 0 {
                    break;
                }
                h.update(&buf[..n]);
            }
            let s = Sidecar { size, mtime_ns: mtime, md5: hex::encode(h.finalize()), ..Sidecar::default() };
            if let Some(parent) = cache.parent() {
                let _ = std::fs::create_dir_all(parent);
            }
            let _ = std::fs::write(&cache, serde_json::to_vec(&s).unwrap_or_default());
            Ok(s)
        })
        .await
        .map_err(S3Error::internal_error)?
        .map_err(io_err)?;
        Ok((md, s))
    }

    fn used_bytes(root: &Path) -> u64 {
        fn walk(p: &Path) -> u64 {
            std::fs::read_dir(p)
                .into_iter()
                .flatten()
                .flatten()
                .map(|e| match e.metadata() {
                    Ok(m) if m.is_dir() => walk(&e.path()),
                    Ok(m) => m.len(),
                    Err(_) => 0,
                })
                .sum()
        }
        walk(root)
    }

    /// Streams a body into `tmp`, hashing MD5 and the declared checksums, then verifies them.
    async fn receive(
        body: Option<StreamingBlob>,
        tmp: &Path,
        content_md5: Option<&str>,
        declared: BTreeMap<String, String>,
        algos: &[String],
        trailers: Option<&s3s::TrailingHeaders>,
    ) -> S3Result<Written> {
        if let Some(parent) = tmp.parent() {
            tokio::fs::create_dir_all(parent).await.map_err(io_err)?;
        }
        let mut file = tokio::fs::File::create(tmp).await.map_err(io_err)?;
        let mut md5 = Md5::new();
        let algo_refs: Vec<&str> = algos.iter().map(String::as_str).collect();
        let mut hasher = hasher_for(&algo_refs);
        let mut size = 0u64;
        if let Some(mut body) = body {
            while let Some(chunk) = body.next().await {
                let chunk = chunk.map_err(|e| err(S3ErrorCode::IncompleteBody, e.to_string()))?;
                md5.update(&chunk);
                hasher.update(&chunk);
                size += chunk.len() as u64;
                file.write_all(&chunk).await.map_err(io_err)?;
            }
        }
        file.flush().await.map_err(io_err)?;
        drop(file);
        let md5 = md5.finalize();
        let mut want = declared;
        if let Some(h) = trailers.and_then(s3s::TrailingHeaders::take) {
            for (name, v) in &h {
                if let Some(algo) = name.as_str().strip_prefix("x-amz-checksum-")
                    && let Ok(v) = v.to_str()
                {
                    want.insert(algo.to_owned(), v.to_owned());
                }
            }
        }
        let got = hasher.finalize();
        let computed: BTreeMap<String, String> = [
            ("crc32", got.checksum_crc32),
            ("crc32c", got.checksum_crc32c),
            ("sha1", got.checksum_sha1),
            ("sha256", got.checksum_sha256),
            ("crc64nvme", got.checksum_crc64nvme),
        ]
        .into_iter()
        .filter_map(|(k, v)| v.map(|v| (k.to_owned(), v)))
        .collect();
        let fail = |msg: String| async move {
            let _ = tokio::fs::remove_file(tmp).await;
            Err::<Written, _>(err(S3ErrorCode::BadDigest, msg))
        };
        if let Some(expected) = content_md5
            && expected != b64(&md5)
        {
            return fail(format!("Content-MD5 {expected} does not match the body")).await;
        }
        for (algo, expected) in &want {
            if computed.get(algo).is_some_and(|c| c != expected) {
                return fail(format!("x-amz-checksum-{algo} {expected} does not match the body")).await;
            }
        }
        Ok(Written { size, md5: hex::encode(md5), checksums: want })
    }

    async fn land(
        &self,
        root: &Path,
        quota: u64,
        key: &str,
        tmp: &Path,
        written: &Written,
        sidecar: Sidecar,
    ) -> S3Result<()> {
        let path = key_path(root, key)?;
        // What the volume holds plus the object being landed.
        let used = self.used(root).await + written.size;
        if used > quota {
            let _ = tokio::fs::remove_file(tmp).await;
            return Err(status_err(
                "InsufficientStorage",
                507,
                format!("network volume is full ({used} of {quota} bytes)"),
            ));
        }
        if let Some(parent) = path.parent() {
            tokio::fs::create_dir_all(parent).await.map_err(io_err)?;
        }
        if tokio::fs::metadata(&path).await.is_ok_and(|m| m.is_dir()) {
            let _ = tokio::fs::remove_file(tmp).await;
            return Err(err(S3ErrorCode::InvalidArgument, format!("{key} is a directory on the volume")));
        }
        tokio::fs::rename(tmp, &path).await.map_err(io_err)?;
        self.add_used(root, written.size);
        let md = tokio::fs::metadata(&path).await.map_err(io_err)?;
        let s = Sidecar {
            size: written.size,
            mtime_ns: mtime_ns(&md),
            md5: written.md5.clone(),
            checksums: written.checksums.clone(),
            ..sidecar
        };
        Self::write_sidecar(root, key, &s).await
    }

    /// Every listable key under the volume, sorted: files and empty directories (`dir/`).
    fn all_keys(root: &Path, hide_unsigned: bool) -> Vec<(String, std::fs::Metadata)> {
        fn walk(root: &Path, dir: &Path, prefix: &str, hide: bool, out: &mut Vec<(String, std::fs::Metadata)>) {
            let Ok(rd) = std::fs::read_dir(dir) else { return };
            let mut entries: Vec<_> = rd.flatten().collect();
            entries.sort_by_key(std::fs::DirEntry::file_name);
            if entries.is_empty() && !prefix.is_empty() {
                if let Ok(md) = std::fs::metadata(dir) {
                    out.push((prefix.to_owned(), md));
                }
                return;
            }
            for e in entries {
                let name = e.file_name().to_string_lossy().into_owned();
                if prefix.is_empty() && name.starts_with(".s3compat") {
                    continue;
                }
                let Ok(md) = e.metadata() else { continue };
                let key = format!("{prefix}{name}");
                if md.is_dir() {
                    walk(root, &e.path(), &format!("{key}/"), hide, out);
                } else {
                    if hide {
                        // Files not written through S3 have no sidecar and stay invisible to listings.
                        let side = Volumes::sidecar_path(root, &key);
                        let known = std::fs::read(&side)
                            .ok()
                            .and_then(|b| serde_json::from_slice::<Sidecar>(&b).ok())
                            .is_some_and(|s| s.size == md.len() && s.mtime_ns == mtime_ns(&md));
                        if !known {
                            continue;
                        }
                    }
                    out.push((key, md));
                }
            }
        }
        let mut out = Vec::new();
        walk(root, root, "", hide_unsigned, &mut out);
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    async fn list(
        &self,
        bucket: &str,
        prefix: Option<String>,
        delimiter: Option<String>,
        after: Option<String>,
        max_keys: Option<i32>,
    ) -> S3Result<(Vec<Object>, Vec<CommonPrefix>, Option<String>)> {
        let (root, _) = self.volume(bucket)?;
        let hide = self.faults().s3_hide_pod_files;
        let keys = tokio::task::spawn_blocking(move || Self::all_keys(&root, hide)).await.unwrap_or_default();
        // An empty delimiter or prefix means none (rclone and the AWS CLI send `delimiter=`).
        let prefix = prefix.filter(|p| !p.is_empty()).unwrap_or_default();
        let delimiter = delimiter.filter(|d| !d.is_empty());
        let max = usize::try_from(max_keys.unwrap_or(1000).clamp(1, 1000)).unwrap_or(1000);
        let mut objects = Vec::new();
        let mut prefixes: Vec<String> = Vec::new();
        let mut last = None;
        let mut truncated = false;
        for (key, md) in keys {
            if !key.starts_with(&prefix) || after.as_ref().is_some_and(|a| key.as_str() <= a.as_str()) {
                continue;
            }
            if let Some(d) = &delimiter
                && let Some(pos) = key[prefix.len()..].find(d.as_str())
            {
                let cp = key[..prefix.len() + pos + d.len()].to_owned();
                if after.as_ref().is_some_and(|a| cp.as_str() <= a.as_str()) || prefixes.last() == Some(&cp) {
                    continue;
                }
                if objects.len() + prefixes.len() == max {
                    truncated = true;
                    break;
                }
                last = Some(cp.clone());
                prefixes.push(cp);
                continue;
            }
            if objects.len() + prefixes.len() == max {
                truncated = true;
                break;
            }
            last = Some(key.clone());
            let size = if md.is_dir() { 0 } else { i64::try_from(md.len()).unwrap_or(i64::MAX) };
            objects.push(Object {
                key: Some(key),
                size: Some(size),
                last_modified: md.modified().ok().map(Timestamp::from),
                e_tag: None,
                storage_class: Some(ObjectStorageClass::from_static(ObjectStorageClass::STANDARD)),
                ..Object::default()
            });
        }
        // ETags in listings are MD5s, computed (slowly, for pod-written files) on demand.
        let (root, _) = self.volume(bucket)?;
        for o in &mut objects {
            if let Some(k) = &o.key {
                let path = key_path(&root, k)?;
                if let Ok((_, s)) = Self::describe(&root, k, &path).await {
                    o.e_tag = Some(ETag::Strong(s.md5));
                }
            }
        }
        let prefixes = prefixes.into_iter().map(|p| CommonPrefix { prefix: Some(p) }).collect();
        Ok((objects, prefixes, if truncated { last } else { None }))
    }
}

fn token_encode(key: &str) -> String {
    b64(key.as_bytes())
}

fn token_decode(t: &str) -> S3Result<String> {
    base64::engine::general_purpose::STANDARD
        .decode(t)
        .ok()
        .and_then(|b| String::from_utf8(b).ok())
        .ok_or_else(|| err(S3ErrorCode::InvalidArgument, "invalid continuation token"))
}

#[async_trait::async_trait]
impl S3 for Volumes {
    async fn list_buckets(&self, _req: S3Request<ListBucketsInput>) -> S3Result<S3Response<ListBucketsOutput>> {
        let (w, _) = self.sim.world();
        let buckets = w
            .volumes
            .iter()
            .map(|v| Bucket {
                name: Some(v.id.clone()),
                bucket_region: Some(v.data_center_id.clone()),
                ..Bucket::default()
            })
            .collect();
        Ok(S3Response::new(ListBucketsOutput { buckets: Some(buckets), ..ListBucketsOutput::default() }))
    }

    async fn head_bucket(&self, req: S3Request<HeadBucketInput>) -> S3Result<S3Response<HeadBucketOutput>> {
        let (_, _) = self.volume(&req.input.bucket)?;
        Ok(S3Response::new(HeadBucketOutput::default()))
    }

    async fn put_object(&self, req: S3Request<PutObjectInput>) -> S3Result<S3Response<PutObjectOutput>> {
        let i = req.input;
        let (root, quota) = self.volume(&i.bucket)?;
        let lost;
        {
            let (mut w, _) = self.sim.world();
            if w.faults.s3_put_502 > 0 {
                w.faults.s3_put_502 -= 1;
                return Err(status_err("BadGateway", 502, "Bad Gateway"));
            }
            lost = w.faults.s3_put_lost > 0 && !i.key.ends_with('/');
            if lost {
                w.faults.s3_put_lost -= 1;
            }
        }
        if lost {
            // A 200 for a write that never landed: the body is read and dropped.
            let mut i = i;
            if let Some(mut body) = i.body.take() {
                while let Some(chunk) = futures::StreamExt::next(&mut body).await {
                    chunk.map_err(|e| s3_error!(IncompleteBody, "{e}"))?;
                }
            }
            return Ok(S3Response::new(PutObjectOutput {
                e_tag: Some(ETag::Strong(EMPTY_MD5.into())),
                ..PutObjectOutput::default()
            }));
        }
        if i.key.ends_with('/') {
            let dir = key_path(&root, &i.key)?;
            tokio::fs::create_dir_all(&dir).await.map_err(io_err)?;
            return Ok(S3Response::new(PutObjectOutput {
                e_tag: Some(ETag::Strong(EMPTY_MD5.into())),
                ..PutObjectOutput::default()
            }));
        }
        key_path(&root, &i.key)?;
        let max_put = self.max_put();
        if i.content_length.is_some_and(|l| l >= max_put) {
            return Err(err(
                S3ErrorCode::EntityTooLarge,
                format!("single PUT must be under {max_put} bytes on a RunPod volume: use multipart upload"),
            ));
        }
        let (decl, algos) = declared(
            &i.checksum_crc32,
            &i.checksum_crc32c,
            &i.checksum_sha1,
            &i.checksum_sha256,
            &i.checksum_crc64nvme,
            i.checksum_algorithm.as_ref(),
        );
        let tmp = root.join(UPLOADS).join(format!("put-{}", crate::world::random_id(16)));
        let written =
            Self::receive(i.body, &tmp, i.content_md5.as_deref(), decl, &algos, req.trailing_headers.as_ref()).await?;
        if i64::try_from(written.size).unwrap_or(i64::MAX) >= max_put {
            let _ = tokio::fs::remove_file(&tmp).await;
            return Err(err(
                S3ErrorCode::EntityTooLarge,
                format!("single PUT must be under {max_put} bytes: use multipart upload"),
            ));
        }
        let side = Sidecar {
            content_type: i.content_type.clone(),
            metadata: i.metadata.unwrap_or_default().into_iter().collect(),
            ..Sidecar::default()
        };
        self.land(&root, quota, &i.key, &tmp, &written, side).await?;
        let c = &written.checksums;
        Ok(S3Response::new(PutObjectOutput {
            e_tag: Some(ETag::Strong(written.md5.clone())),
            checksum_crc32: c.get("crc32").cloned(),
            checksum_crc32c: c.get("crc32c").cloned(),
            checksum_sha1: c.get("sha1").cloned(),
            checksum_sha256: c.get("sha256").cloned(),
            checksum_crc64nvme: c.get("crc64nvme").cloned(),
            ..PutObjectOutput::default()
        }))
    }

    async fn head_object(&self, req: S3Request<HeadObjectInput>) -> S3Result<S3Response<HeadObjectOutput>> {
        let i = req.input;
        let (root, _) = self.volume(&i.bucket)?;
        let path = key_path(&root, &i.key)?;
        let (md, s) = Self::describe(&root, &i.key, &path).await?;
        let with_checksums = i.checksum_mode.as_ref().is_some_and(|m| m.as_str() == ChecksumMode::ENABLED);
        let c = |k: &str| if with_checksums { s.checksums.get(k).cloned() } else { None };
        Ok(S3Response::new(HeadObjectOutput {
            content_length: Some(if md.is_dir() { 0 } else { i64::try_from(md.len()).unwrap_or(i64::MAX) }),
            e_tag: Some(ETag::Strong(s.md5.clone())),
            last_modified: md.modified().ok().map(Timestamp::from),
            metadata: (!s.metadata.is_empty()).then(|| s.metadata.clone().into_iter().collect()),
            content_type: s.content_type.clone(),
            accept_ranges: Some("bytes".into()),
            checksum_crc32: c("crc32"),
            checksum_crc32c: c("crc32c"),
            checksum_sha1: c("sha1"),
            checksum_sha256: c("sha256"),
            checksum_crc64nvme: c("crc64nvme"),
            ..HeadObjectOutput::default()
        }))
    }

    async fn get_object(&self, req: S3Request<GetObjectInput>) -> S3Result<S3Response<GetObjectOutput>> {
        let i = req.input;
        let (root, _) = self.volume(&i.bucket)?;
        let path = key_path(&root, &i.key)?;
        let (md, s) = Self::describe(&root, &i.key, &path).await?;
        let len = md.len();
        let (start, end) = match &i.range {
            Some(r) => {
                let rg = r.check(len).map_err(|_| s3_error!(InvalidRange))?;
                (rg.start, rg.end)
            }
            None => (0, len),
        };
        let mut f = tokio::fs::File::open(&path).await.map_err(io_err)?;
        f.seek(std::io::SeekFrom::Start(start)).await.map_err(io_err)?;
        let stream = tokio_util::io::ReaderStream::with_capacity(f.take(end - start), 1 << 20);
        Ok(S3Response::new(GetObjectOutput {
            body: Some(StreamingBlob::wrap(stream)),
            content_length: Some(i64::try_from(end - start).unwrap_or(i64::MAX)),
            content_range: i.range.as_ref().map(|_| format!("bytes {start}-{}/{len}", end.saturating_sub(1))),
            e_tag: Some(ETag::Strong(s.md5.clone())),
            last_modified: md.modified().ok().map(Timestamp::from),
            metadata: (!s.metadata.is_empty()).then(|| s.metadata.clone().into_iter().collect()),
            content_type: s.content_type.clone(),
            accept_ranges: Some("bytes".into()),
            ..GetObjectOutput::default()
        }))
    }

    async fn delete_object(&self, req: S3Request<DeleteObjectInput>) -> S3Result<S3Response<DeleteObjectOutput>> {
        let i = req.input;
        let (root, _) = self.volume(&i.bucket)?;
        let path = key_path(&root, &i.key)?;
        if i.key.ends_with('/') {
            let _ = tokio::fs::remove_dir(&path).await;
        } else {
            let _ = tokio::fs::remove_file(&path).await;
            let _ = tokio::fs::remove_file(Self::sidecar_path(&root, &i.key)).await;
        }
        Ok(S3Response::new(DeleteObjectOutput::default()))
    }

    async fn copy_object(&self, req: S3Request<CopyObjectInput>) -> S3Result<S3Response<CopyObjectOutput>> {
        let i = req.input;
        let CopySource::Bucket { bucket: src_bucket, key: src_key, .. } = &i.copy_source else {
            return Err(s3_error!(NotImplemented, "only bucket/key copy sources"));
        };
        let (src_root, _) = self.volume(src_bucket)?;
        let (root, quota) = self.volume(&i.bucket)?;
        let src = key_path(&src_root, src_key)?;
        let (_, side) = Self::describe(&src_root, src_key, &src).await?;
        let tmp = root.join(UPLOADS).join(format!("copy-{}", crate::world::random_id(16)));
        if let Some(p) = tmp.parent() {
            tokio::fs::create_dir_all(p).await.map_err(io_err)?;
        }
        tokio::fs::copy(&src, &tmp).await.map_err(io_err)?;
        let written = Written { size: side.size, md5: side.md5.clone(), checksums: side.checksums.clone() };
        self.land(&root, quota, &i.key, &tmp, &written, side.clone()).await?;
        Ok(S3Response::new(CopyObjectOutput {
            copy_object_result: Some(CopyObjectResult {
                e_tag: Some(ETag::Strong(side.md5)),
                last_modified: Some(Timestamp::from(SystemTime::now())),
                ..CopyObjectResult::default()
            }),
            ..CopyObjectOutput::default()
        }))
    }

    async fn list_objects_v2(&self, req: S3Request<ListObjectsV2Input>) -> S3Result<S3Response<ListObjectsV2Output>> {
        let i = req.input;
        let after = match &i.continuation_token {
            Some(t) => Some(token_decode(t)?),
            None => i.start_after.clone(),
        };
        let (objects, prefixes, next) =
            self.list(&i.bucket, i.prefix.clone(), i.delimiter.clone(), after, i.max_keys).await?;
        let mut next_token = next.as_deref().map(token_encode);
        if self.faults().s3_repeat_continuation_token && next_token.is_some() && i.continuation_token.is_some() {
            // RunPod's paging bug: the same token comes back twice (runpod-python #505).
            next_token.clone_from(&i.continuation_token);
        }
        let count = i32::try_from(objects.len() + prefixes.len()).unwrap_or(i32::MAX);
        Ok(S3Response::new(ListObjectsV2Output {
            name: Some(i.bucket),
            prefix: i.prefix,
            delimiter: i.delimiter.filter(|d| !d.is_empty()),
            max_keys: Some(i.max_keys.unwrap_or(1000)),
            key_count: Some(count),
            is_truncated: Some(next_token.is_some()),
            continuation_token: i.continuation_token,
            next_continuation_token: next_token,
            contents: Some(objects),
            common_prefixes: Some(prefixes),
            start_after: i.start_after,
            ..ListObjectsV2Output::default()
        }))
    }

    async fn list_objects(&self, req: S3Request<ListObjectsInput>) -> S3Result<S3Response<ListObjectsOutput>> {
        let i = req.input;
        let (objects, prefixes, next) =
            self.list(&i.bucket, i.prefix.clone(), i.delimiter.clone(), i.marker.clone(), i.max_keys).await?;
        Ok(S3Response::new(ListObjectsOutput {
            name: Some(i.bucket),
            prefix: i.prefix,
            marker: i.marker,
            delimiter: i.delimiter.filter(|d| !d.is_empty()),
            max_keys: Some(i.max_keys.unwrap_or(1000)),
            is_truncated: Some(next.is_some()),
            next_marker: next,
            contents: Some(objects),
            common_prefixes: Some(prefixes),
            ..ListObjectsOutput::default()
        }))
    }

    async fn create_multipart_upload(
        &self,
        req: S3Request<CreateMultipartUploadInput>,
    ) -> S3Result<S3Response<CreateMultipartUploadOutput>> {
        let i = req.input;
        let (root, _) = self.volume(&i.bucket)?;
        key_path(&root, &i.key)?;
        let id = crate::world::random_id(32);
        let dir = root.join(UPLOADS).join(&id);
        tokio::fs::create_dir_all(&dir).await.map_err(io_err)?;
        let info = Upload {
            key: i.key.clone(),
            content_type: i.content_type,
            metadata: i.metadata.unwrap_or_default().into_iter().collect(),
            initiated_ns: SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_nanos()),
        };
        tokio::fs::write(dir.join("upload.json"), serde_json::to_vec(&info).map_err(S3Error::internal_error)?)
            .await
            .map_err(io_err)?;
        Ok(S3Response::new(CreateMultipartUploadOutput {
            bucket: Some(i.bucket),
            key: Some(i.key),
            upload_id: Some(id),
            ..CreateMultipartUploadOutput::default()
        }))
    }

    async fn upload_part(&self, req: S3Request<UploadPartInput>) -> S3Result<S3Response<UploadPartOutput>> {
        let i = req.input;
        let (root, _) = self.volume(&i.bucket)?;
        let dir = upload_dir(&root, &i.upload_id).await?;
        if i.content_length.is_some_and(|l| l > MAX_PART_BYTES) {
            return Err(err(S3ErrorCode::EntityTooLarge, format!("a part may hold at most {MAX_PART_BYTES} bytes")));
        }
        if !(1..=10_000).contains(&i.part_number) {
            return Err(err(S3ErrorCode::InvalidArgument, "part number must be 1..10000"));
        }
        let (decl, algos) = declared(
            &i.checksum_crc32,
            &i.checksum_crc32c,
            &i.checksum_sha1,
            &i.checksum_sha256,
            &i.checksum_crc64nvme,
            i.checksum_algorithm.as_ref(),
        );
        let tmp = dir.join(format!("part-{}.tmp-{}", i.part_number, crate::world::random_id(8)));
        let written =
            Self::receive(i.body, &tmp, i.content_md5.as_deref(), decl, &algos, req.trailing_headers.as_ref()).await?;
        tokio::fs::rename(&tmp, dir.join(format!("part-{:05}", i.part_number))).await.map_err(io_err)?;
        tokio::fs::write(dir.join(format!("part-{:05}.md5", i.part_number)), &written.md5).await.map_err(io_err)?;
        let c = &written.checksums;
        Ok(S3Response::new(UploadPartOutput {
            e_tag: Some(ETag::Strong(written.md5.clone())),
            checksum_crc32: c.get("crc32").cloned(),
            checksum_crc32c: c.get("crc32c").cloned(),
            checksum_sha256: c.get("sha256").cloned(),
            ..UploadPartOutput::default()
        }))
    }

    async fn complete_multipart_upload(
        &self,
        req: S3Request<CompleteMultipartUploadInput>,
    ) -> S3Result<S3Response<CompleteMultipartUploadOutput>> {
        let i = req.input;
        let (root, quota) = self.volume(&i.bucket)?;
        let dir = upload_dir(&root, &i.upload_id).await?;
        {
            let (mut w, _) = self.sim.world();
            if w.faults.s3_complete_502 > 0 {
                w.faults.s3_complete_502 -= 1;
                return Err(status_err("BadGateway", 502, "Bad Gateway"));
            }
        }
        let info: Upload = serde_json::from_slice(&tokio::fs::read(dir.join("upload.json")).await.map_err(io_err)?)
            .map_err(S3Error::internal_error)?;
        let parts = i.multipart_upload.and_then(|m| m.parts).unwrap_or_default();
        if parts.is_empty() {
            return Err(err(S3ErrorCode::MalformedXML, "no parts given"));
        }
        let tmp = root.join(UPLOADS).join(format!("complete-{}", crate::world::random_id(16)));
        let mut out = tokio::fs::File::create(&tmp).await.map_err(io_err)?;
        let mut md5 = Md5::new();
        let mut size = 0u64;
        let mut prev = 0;
        for p in &parts {
            let n = p.part_number.unwrap_or(0);
            if n <= prev {
                let _ = tokio::fs::remove_file(&tmp).await;
                return Err(err(S3ErrorCode::InvalidPartOrder, "parts must be in ascending order"));
            }
            prev = n;
            let part = dir.join(format!("part-{n:05}"));
            let stored = tokio::fs::read_to_string(dir.join(format!("part-{n:05}.md5"))).await.unwrap_or_default();
            if let Some(e) = &p.e_tag
                && e.value() != stored
            {
                let _ = tokio::fs::remove_file(&tmp).await;
                return Err(err(S3ErrorCode::InvalidPart, format!("part {n}: ETag does not match")));
            }
            let mut f = tokio::fs::File::open(&part)
                .await
                .map_err(|_| err(S3ErrorCode::InvalidPart, format!("part {n} was not uploaded")))?;
            let mut buf = vec![0u8; 1 << 20];
            loop {
                let k = f.read(&mut buf).await.map_err(io_err)?;
                if k == 0 {
                    break;
                }
                md5.update(&buf[..k]);
                out.write_all(&buf[..k]).await.map_err(io_err)?;
                size += k as u64;
            }
        }
        out.flush().await.map_err(io_err)?;
        drop(out);
        let written = Written { size, md5: hex::encode(md5.finalize()), checksums: BTreeMap::new() };
        let side = Sidecar { content_type: info.content_type, metadata: info.metadata, ..Sidecar::default() };
        self.land(&root, quota, &info.key, &tmp, &written, side).await?;
        let _ = tokio::fs::remove_dir_all(&dir).await;
        {
            let (mut w, _) = self.sim.world();
            if w.faults.s3_complete_timeouts > 0 {
                // The merge finished, but the proxy gave up waiting (Cloudflare 524).
                w.faults.s3_complete_timeouts -= 1;
                return Err(status_err("GatewayTimeout", 524, "A timeout occurred"));
            }
        }
        Ok(S3Response::new(CompleteMultipartUploadOutput {
            bucket: Some(i.bucket),
            key: Some(info.key),
            e_tag: Some(ETag::Strong(written.md5)),
            ..CompleteMultipartUploadOutput::default()
        }))
    }

    async fn abort_multipart_upload(
        &self,
        req: S3Request<AbortMultipartUploadInput>,
    ) -> S3Result<S3Response<AbortMultipartUploadOutput>> {
        let i = req.input;
        let (root, _) = self.volume(&i.bucket)?;
        let dir = upload_dir(&root, &i.upload_id).await?;
        tokio::fs::remove_dir_all(&dir).await.map_err(io_err)?;
        Ok(S3Response::new(AbortMultipartUploadOutput::default()))
    }

    async fn list_parts(&self, req: S3Request<ListPartsInput>) -> S3Result<S3Response<ListPartsOutput>> {
        let i = req.input;
        let (root, _) = self.volume(&i.bucket)?;
        let dir = upload_dir(&root, &i.upload_id).await?;
        let mut parts = Vec::new();
        let mut rd = tokio::fs::read_dir(&dir).await.map_err(io_err)?;
        while let Some(e) = rd.next_entry().await.map_err(io_err)? {
            let name = e.file_name().to_string_lossy().into_owned();
            if let Some(n) = name.strip_prefix("part-").filter(|n| n.len() == 5).and_then(|n| n.parse::<i32>().ok()) {
                let md = e.metadata().await.map_err(io_err)?;
                let md5 = tokio::fs::read_to_string(dir.join(format!("{name}.md5"))).await.unwrap_or_default();
                parts.push(Part {
                    part_number: Some(n),
                    size: Some(i64::try_from(md.len()).unwrap_or(i64::MAX)),
                    e_tag: Some(ETag::Strong(md5)),
                    last_modified: md.modified().ok().map(Timestamp::from),
                    ..Part::default()
                });
            }
        }
        parts.sort_by_key(|p| p.part_number);
        Ok(S3Response::new(ListPartsOutput {
            bucket: Some(i.bucket),
            key: Some(i.key),
            upload_id: Some(i.upload_id),
            parts: Some(parts),
            is_truncated: Some(false),
            ..ListPartsOutput::default()
        }))
    }

    async fn list_multipart_uploads(
        &self,
        req: S3Request<ListMultipartUploadsInput>,
    ) -> S3Result<S3Response<ListMultipartUploadsOutput>> {
        let i = req.input;
        let (root, _) = self.volume(&i.bucket)?;
        let mut uploads = Vec::new();
        if let Ok(mut rd) = tokio::fs::read_dir(root.join(UPLOADS)).await {
            while let Ok(Some(e)) = rd.next_entry().await {
                let id = e.file_name().to_string_lossy().into_owned();
                if let Ok(bytes) = tokio::fs::read(e.path().join("upload.json")).await
                    && let Ok(info) = serde_json::from_slice::<Upload>(&bytes)
                    && i.prefix.as_ref().is_none_or(|p| info.key.starts_with(p.as_str()))
                {
                    uploads.push(MultipartUpload {
                        key: Some(info.key),
                        upload_id: Some(id),
                        ..MultipartUpload::default()
                    });
                }
            }
        }
        uploads.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(S3Response::new(ListMultipartUploadsOutput {
            bucket: Some(i.bucket),
            uploads: Some(uploads),
            is_truncated: Some(false),
            ..ListMultipartUploadsOutput::default()
        }))
    }
}

#[derive(Serialize, Deserialize)]
struct Upload {
    key: String,
    content_type: Option<String>,
    metadata: BTreeMap<String, String>,
    initiated_ns: u128,
}

async fn upload_dir(root: &Path, id: &str) -> S3Result<PathBuf> {
    if id.is_empty() || !id.bytes().all(|b| b.is_ascii_alphanumeric()) {
        return Err(err(S3ErrorCode::NoSuchUpload, format!("no such upload {id}")));
    }
    let dir = root.join(UPLOADS).join(id);
    if tokio::fs::metadata(dir.join("upload.json")).await.is_ok() {
        Ok(dir)
    } else {
        Err(err(S3ErrorCode::NoSuchUpload, format!("no such upload {id}")))
    }
}
