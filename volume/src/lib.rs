//! `ep-volume`: everything that moves bytes between the cluster side and a RunPod network volume.
//!
//! - [`manifest`]: a payload directory becomes a manifest (declared locations, gitignore-style
//!   excludes, paths confined to the root, sha256 and mode per file); its sha256 is the payload id.
//! - [`sync`]: the payload's files go to a content-addressed blob store on the volume (only what
//!   the volume does not hold yet), are verified by head_object, and the manifest is sealed last.
//! - [`collect`]: a finished run's terminal files are verified (head_object against size and MD5)
//!   and parsed before anything may delete the pod.
//! - [`store`]: the narrow object-store trait these use, and its S3 implementation.
//!
//! Nothing here lists a bucket: RunPod's listings are slow and unreliable, so only known keys are read.

pub mod collect;
pub mod manifest;
pub mod store;
pub mod sync;

pub use manifest::{ManifestError, Payload, PayloadSource};
pub use store::{ObjectInfo, S3Volume, StoreError, VolumeStore};
