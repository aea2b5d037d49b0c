//! The network volume, in memory: what the S3 store of a RunPod volume answers.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Mutex;

use bytes::Bytes;
use ep_volume::store::Usage;
use ep_volume::{ObjectInfo, StoreError, VolumeStore};
use sha2::{Digest, Sha256};

use super::fakes::lock;

/// The network volume, in memory: objects by key with their sha256.
#[derive(Default)]
pub struct FakeStore {
    pub objects: Mutex<BTreeMap<String, Bytes>>,
    /// While set, every write answers this HTTP status (507: volume full, 502: S3 down).
    pub fail_writes: Mutex<Option<u16>>,
}

impl FakeStore {
    pub fn put(&self, key: &str, body: impl Into<Bytes>) {
        lock(&self.objects).insert(key.to_owned(), body.into());
    }
    fn refuse(&self, key: &str) -> Result<(), StoreError> {
        match *lock(&self.fail_writes) {
            Some(status) => Err(StoreError::Request {
                op: "PutObject",
                key: key.into(),
                status: Some(status),
                message: format!("HTTP {status}"),
            }),
            None => Ok(()),
        }
    }
    pub fn has(&self, key: &str) -> bool {
        lock(&self.objects).contains_key(key)
    }
}

impl VolumeStore for FakeStore {
    async fn head(&self, key: &str) -> Result<Option<ObjectInfo>, StoreError> {
        Ok(lock(&self.objects).get(key).map(|b| ObjectInfo {
            size: b.len() as u64,
            etag: None,
            sha256: Some(hex::encode(Sha256::digest(b))),
        }))
    }
    async fn get(&self, key: &str) -> Result<Option<Bytes>, StoreError> {
        Ok(lock(&self.objects).get(key).cloned())
    }
    async fn put_bytes(&self, key: &str, body: Bytes, _: &str) -> Result<(), StoreError> {
        self.refuse(key)?;
        self.put(key, body);
        Ok(())
    }
    async fn put_file(&self, key: &str, path: &Path, _: u64, _: &str) -> Result<(), StoreError> {
        self.refuse(key)?;
        let body =
            std::fs::read(path).map_err(|source| StoreError::Local { path: path.display().to_string(), source })?;
        self.put(key, body);
        Ok(())
    }
    async fn delete(&self, key: &str) -> Result<(), StoreError> {
        lock(&self.objects).remove(key);
        Ok(())
    }
    fn requests(&self) -> u64 {
        0
    }
    async fn usage(&self) -> Result<Option<Usage>, StoreError> {
        let objects = lock(&self.objects);
        let bytes = objects.values().map(|b| b.len() as u64).sum();
        Ok(Some(Usage { bytes, objects: objects.len() as u64, complete: true }))
    }
}
