//! The object store the data plane needs (head, get, put; a listing only to explain a full volume),
//! and its S3 implementation.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use aws_sdk_s3::Client;
use aws_sdk_s3::config::{
    BehaviorVersion, Credentials, Region, RequestChecksumCalculation, ResponseChecksumValidation,
};
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{CompletedMultipartUpload, CompletedPart};
use bytes::Bytes;

/// Metadata key holding the hex sha256 of an object's content.
pub const SHA256_META: &str = "sha256";

/// What head_object tells.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ObjectInfo {
    pub size: u64,
    /// ETag without quotes (on RunPod: the MD5 of the content).
    pub etag: Option<String>,
    /// The sha256 recorded in metadata at upload, if any.
    pub sha256: Option<String>,
}

/// A store call failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{op} {key}: {message}")]
    Request { op: &'static str, key: String, status: Option<u16>, message: String },
    #[error("{path}: {source}")]
    Local { path: String, source: std::io::Error },
}

impl StoreError {
    /// HTTP status, when the store answered.
    pub fn status(&self) -> Option<u16> {
        match self {
            Self::Request { status, .. } => *status,
            Self::Local { .. } => None,
        }
    }
}

/// A network volume seen as an object store. Known keys only: no listing but [`VolumeStore::usage`].
pub trait VolumeStore: Send + Sync {
    fn head(&self, key: &str) -> impl Future<Output = Result<Option<ObjectInfo>, StoreError>> + Send;
    fn get(&self, key: &str) -> impl Future<Output = Result<Option<Bytes>, StoreError>> + Send;
    fn put_bytes(&self, key: &str, body: Bytes, sha256: &str) -> impl Future<Output = Result<(), StoreError>> + Send;
    /// Uploads a file: one PUT below `multipart_threshold`, multipart above.
    fn put_file(
        &self,
        key: &str,
        path: &Path,
        size: u64,
        sha256: &str,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;
    /// Deletes one object; an object that is already gone counts as success (RunPod has no batch delete).
    fn delete(&self, key: &str) -> impl Future<Output = Result<(), StoreError>> + Send;
    /// Requests sent so far (for reports and benchmarks).
    fn requests(&self) -> u64;
    /// The sizes of the objects directly under `prefix` (one directory, `Delimiter=/`: RunPod
    /// pages deep listings wrongly), keyed by full key. None when the store cannot list it
    /// completely (a repeated continuation token): the caller then asks object by object.
    fn list_dir(
        &self,
        prefix: &str,
    ) -> impl Future<Output = Result<Option<std::collections::BTreeMap<String, u64>>, StoreError>> + Send {
        let _ = prefix;
        async { Ok(None) }
    }
    /// What the volume holds, by listing it: only to give the figures of a full volume (HTTP
    /// 507). None when the store cannot tell.
    fn usage(&self) -> impl Future<Output = Result<Option<Usage>, StoreError>> + Send {
        async { Ok(None) }
    }
}

/// What a listing of a whole volume found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Usage {
    pub bytes: u64,
    pub objects: u64,
    /// False when the listing stopped at its page limit (bytes is then a lower bound).
    pub complete: bool,
}

/// Pages of 1,000 keys a usage listing reads at most.
const USAGE_PAGES: usize = 100;

/// Settings of the S3 client for a RunPod volume.
#[derive(Clone, Debug)]
pub struct S3Settings {
    pub endpoint: String,
    /// The data center id, as RunPod documents the region.
    pub region: String,
    pub bucket: String,
    pub access_key: String,
    pub secret_key: String,
    /// Below this a file goes in one PUT (RunPod refuses single PUTs of 500 MB and more).
    pub multipart_threshold: u64,
    pub part_size: u64,
}

impl S3Settings {
    pub fn new(endpoint: &str, region: &str, bucket: &str, access_key: &str, secret_key: &str) -> Self {
        Self {
            endpoint: endpoint.into(),
            region: region.into(),
            bucket: bucket.into(),
            access_key: access_key.into(),
            secret_key: secret_key.into(),
            multipart_threshold: 256 << 20,
            part_size: 64 << 20,
        }
    }
}

/// A RunPod network volume through its S3 API (aws-sdk-s3: path style, checksums only when
/// required, the SDK's standard retries for 5xx and throttling).
#[derive(Clone, Debug)]
pub struct S3Volume {
    client: Client,
    settings: Arc<S3Settings>,
    requests: Arc<AtomicU64>,
}

fn req_err<E>(op: &'static str, key: &str, e: &aws_sdk_s3::error::SdkError<E>) -> StoreError
where
    E: std::error::Error + aws_sdk_s3::error::ProvideErrorMetadata + 'static,
{
    let status = e.raw_response().map(|r| r.status().as_u16());
    let message = match e.as_service_error() {
        Some(s) => {
            format!("{}: {} (HTTP {})", s.code().unwrap_or("error"), s.message().unwrap_or(""), status.unwrap_or(0))
        }
        None => format!("{e}"),
    };
    StoreError::Request { op, key: key.into(), status, message }
}

/// Tells the SigV4 signer the payload's sha256 instead of letting it hash the body.
///
/// Written here because the SDK's fluent builders expose only the unsigned override; the
/// precomputed one is the signer's own `PayloadSigningOverride`, put in the request's config bag
/// before signing.
#[derive(Debug)]
struct KnownPayload(String);

impl aws_smithy_runtime_api::client::interceptors::Intercept for KnownPayload {
    fn name(&self) -> &'static str {
        "KnownPayload"
    }

    fn modify_before_signing(
        &self,
        _: &mut aws_smithy_runtime_api::client::interceptors::context::BeforeTransmitInterceptorContextMut<'_>,
        _: &aws_smithy_runtime_api::client::runtime_components::RuntimeComponents,
        cfg: &mut aws_smithy_types::config_bag::ConfigBag,
    ) -> Result<(), aws_smithy_runtime_api::box_error::BoxError> {
        cfg.interceptor_state().store_put(aws_runtime::auth::PayloadSigningOverride::Precomputed(self.0.clone()));
        Ok(())
    }
}

impl S3Volume {
    /// Streams one object into `dest` (written beside it, then renamed) and returns its size and
    /// hex sha256, computed on the bytes as they arrive (`on_bytes` hears of each chunk written);
    /// None when there is no such object.
    pub async fn download(
        &self,
        key: &str,
        dest: &Path,
        on_bytes: &mut (dyn FnMut(u64) + Send),
    ) -> Result<Option<(u64, String)>, StoreError> {
        use sha2::Digest as _;
        use tokio::io::AsyncWriteExt as _;
        self.count();
        let mut body = match self.client.get_object().bucket(&self.settings.bucket).key(key).send().await {
            Ok(o) => o.body,
            Err(e) if e.raw_response().is_some_and(|r| r.status().as_u16() == 404) => return Ok(None),
            Err(e) => return Err(req_err("GetObject", key, &e)),
        };
        let local = |source| StoreError::Local { path: dest.display().to_string(), source };
        let partial = dest.with_extension("partial");
        let mut file = tokio::fs::File::create(&partial).await.map_err(local)?;
        let (mut hash, mut size) = (sha2::Sha256::new(), 0u64);
        while let Some(chunk) = body.next().await {
            let chunk = chunk.map_err(|e| StoreError::Request {
                op: "GetObject",
                key: key.into(),
                status: None,
                message: e.to_string(),
            })?;
            hash.update(&chunk);
            size += chunk.len() as u64;
            file.write_all(&chunk).await.map_err(local)?;
            on_bytes(chunk.len() as u64);
        }
        file.flush().await.map_err(local)?;
        drop(file);
        tokio::fs::rename(&partial, dest).await.map_err(local)?;
        Ok(Some((size, hex::encode(hash.finalize()))))
    }

    pub fn new(settings: S3Settings) -> Self {
        let conf = aws_sdk_s3::Config::builder()
            .behavior_version(BehaviorVersion::latest())
            .region(Region::new(settings.region.clone()))
            .endpoint_url(&settings.endpoint)
            .force_path_style(true)
            .credentials_provider(Credentials::new(&settings.access_key, &settings.secret_key, None, None, "ep-volume"))
            .request_checksum_calculation(RequestChecksumCalculation::WhenRequired)
            .response_checksum_validation(ResponseChecksumValidation::WhenRequired)
            .build();
        Self { client: Client::from_conf(conf), settings: Arc::new(settings), requests: Arc::new(AtomicU64::new(0)) }
    }

    /// HeadBucket: whether the volume's S3 API answers and accepts the credentials.
    pub async fn check_bucket(&self) -> Result<(), StoreError> {
        self.count();
        let b = &self.settings.bucket;
        self.client.head_bucket().bucket(b).send().await.map_err(|e| req_err("HeadBucket", b, &e))?;
        Ok(())
    }

    fn count(&self) {
        self.requests.fetch_add(1, Ordering::Relaxed);
    }

    /// One PutObject with the sha256 in metadata.
    async fn put(&self, key: &str, body: ByteStream, sha256: &str) -> Result<(), StoreError> {
        self.count();
        let put =
            self.client.put_object().bucket(&self.settings.bucket).key(key).metadata(SHA256_META, sha256).body(body);
        // The body's sha256 is known (blobs are named by it): the signature carries it as the
        // payload hash, so the client does not hash every byte again, and a server that checks
        // SigV4 payload hashes (S3 answers XAmzContentSHA256Mismatch) verifies the bytes it got.
        let known = sha256.len() == 64 && sha256.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
        let sent = if known {
            put.customize().interceptor(KnownPayload(sha256.to_owned())).send().await
        } else {
            put.send().await
        };
        sent.map_err(|e| req_err("PutObject", key, &e))?;
        Ok(())
    }

    /// Over TLS a multipart part is not hashed into the signature (UNSIGNED-PAYLOAD, as `aws s3`
    /// and rclone send S3 parts over HTTPS): TLS guards it in flight and the whole object is
    /// verified after upload. Over plain HTTP the part stays signed.
    fn unsigned_parts(&self) -> bool {
        self.settings.endpoint.starts_with("https://")
    }

    async fn multipart(&self, key: &str, path: &Path, size: u64, sha256: &str) -> Result<(), StoreError> {
        let b = &self.settings.bucket;
        self.count();
        let up = self
            .client
            .create_multipart_upload()
            .bucket(b)
            .key(key)
            .metadata(SHA256_META, sha256)
            .send()
            .await
            .map_err(|e| req_err("CreateMultipartUpload", key, &e))?;
        let id = up.upload_id().unwrap_or_default().to_owned();
        let part = self.settings.part_size.max(1 << 20);
        let mut parts = Vec::new();
        let mut offset = 0u64;
        let mut n = 1;
        while offset < size {
            let len = part.min(size - offset);
            let body = ByteStream::read_from()
                .path(path)
                .offset(offset)
                .length(aws_sdk_s3::primitives::Length::Exact(len))
                .build()
                .await
                .map_err(|e| StoreError::Local {
                    path: path.display().to_string(),
                    source: std::io::Error::other(e),
                })?;
            self.count();
            let up = self.client.upload_part().bucket(b).key(key).upload_id(&id).part_number(n).body(body);
            let sent = if self.unsigned_parts() {
                up.customize().disable_payload_signing().send().await
            } else {
                up.send().await
            };
            let p = sent.map_err(|e| req_err("UploadPart", key, &e))?;
            parts.push(CompletedPart::builder().part_number(n).set_e_tag(p.e_tag().map(str::to_owned)).build());
            offset += len;
            n += 1;
        }
        let done = CompletedMultipartUpload::builder().set_parts(Some(parts)).build();
        self.count();
        match self
            .client
            .complete_multipart_upload()
            .bucket(b)
            .key(key)
            .upload_id(&id)
            .multipart_upload(done)
            .send()
            .await
        {
            Ok(_) => Ok(()),
            Err(e) => {
                // RunPod's complete can outlast the proxy (524) while the merge finishes: check by
                // head_object before calling it a failure.
                let err = req_err("CompleteMultipartUpload", key, &e);
                match self.head(key).await? {
                    Some(info) if info.size == size && info.sha256.as_deref() == Some(sha256) => Ok(()),
                    _ => Err(err),
                }
            }
        }
    }
}

impl VolumeStore for S3Volume {
    async fn head(&self, key: &str) -> Result<Option<ObjectInfo>, StoreError> {
        self.count();
        match self.client.head_object().bucket(&self.settings.bucket).key(key).send().await {
            Ok(h) => Ok(Some(ObjectInfo {
                size: u64::try_from(h.content_length().unwrap_or(0)).unwrap_or(0),
                etag: h.e_tag().map(|e| e.trim_matches('"').to_owned()),
                sha256: h.metadata().and_then(|m| m.get(SHA256_META)).cloned(),
            })),
            Err(e) if e.raw_response().is_some_and(|r| r.status().as_u16() == 404) => Ok(None),
            Err(e) => Err(req_err("HeadObject", key, &e)),
        }
    }

    async fn get(&self, key: &str) -> Result<Option<Bytes>, StoreError> {
        self.count();
        match self.client.get_object().bucket(&self.settings.bucket).key(key).send().await {
            Ok(o) => {
                let data = o.body.collect().await.map_err(|e| StoreError::Request {
                    op: "GetObject",
                    key: key.into(),
                    status: None,
                    message: e.to_string(),
                })?;
                Ok(Some(data.into_bytes()))
            }
            Err(e) if e.raw_response().is_some_and(|r| r.status().as_u16() == 404) => Ok(None),
            Err(e) => Err(req_err("GetObject", key, &e)),
        }
    }

    async fn put_bytes(&self, key: &str, body: Bytes, sha256: &str) -> Result<(), StoreError> {
        self.put(key, ByteStream::from(body), sha256).await
    }

    async fn put_file(&self, key: &str, path: &Path, size: u64, sha256: &str) -> Result<(), StoreError> {
        if size >= self.settings.multipart_threshold {
            return self.multipart(key, path, size, sha256).await;
        }
        let body = ByteStream::from_path(path)
            .await
            .map_err(|e| StoreError::Local { path: path.display().to_string(), source: std::io::Error::other(e) })?;
        self.put(key, body, sha256).await
    }

    async fn delete(&self, key: &str) -> Result<(), StoreError> {
        self.count();
        match self.client.delete_object().bucket(&self.settings.bucket).key(key).send().await {
            Ok(_) => Ok(()),
            Err(e) if e.raw_response().is_some_and(|r| r.status().as_u16() == 404) => Ok(()),
            Err(e) => Err(req_err("DeleteObject", key, &e)),
        }
    }

    fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }

    async fn list_dir(&self, prefix: &str) -> Result<Option<std::collections::BTreeMap<String, u64>>, StoreError> {
        let mut found = std::collections::BTreeMap::new();
        let mut token: Option<String> = None;
        loop {
            self.count();
            let page = self
                .client
                .list_objects_v2()
                .bucket(&self.settings.bucket)
                .prefix(prefix)
                .delimiter("/")
                .set_continuation_token(token.clone())
                .send()
                .await
                .map_err(|e| req_err("ListObjectsV2", prefix, &e))?;
            for o in page.contents() {
                if let (Some(k), Some(size)) = (o.key(), o.size()) {
                    found.insert(k.to_owned(), u64::try_from(size).unwrap_or(0));
                }
            }
            let next = page.next_continuation_token().filter(|_| page.is_truncated() == Some(true));
            match next {
                None => return Ok(Some(found)),
                // RunPod's paging bug: the same token twice. What was listed cannot be trusted
                // to be all.
                Some(t) if Some(t) == token.as_deref() => return Ok(None),
                Some(t) => token = Some(t.to_owned()),
            }
        }
    }

    async fn usage(&self) -> Result<Option<Usage>, StoreError> {
        let mut usage = Usage { bytes: 0, objects: 0, complete: false };
        let mut token: Option<String> = None;
        for _ in 0..USAGE_PAGES {
            self.count();
            let page = self
                .client
                .list_objects_v2()
                .bucket(&self.settings.bucket)
                .set_continuation_token(token.clone())
                .send()
                .await
                .map_err(|e| req_err("ListObjectsV2", "", &e))?;
            for o in page.contents() {
                usage.objects += 1;
                usage.bytes += u64::try_from(o.size().unwrap_or(0)).unwrap_or(0);
            }
            let next = page.next_continuation_token().filter(|_| page.is_truncated() == Some(true));
            // A repeated token (RunPod's listings do this) ends the walk as incomplete.
            if next.is_none() || next == token.as_deref() {
                usage.complete = next.is_none();
                return Ok(Some(usage));
            }
            token = next.map(str::to_owned);
        }
        Ok(Some(usage))
    }
}
