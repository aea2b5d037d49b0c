//! Why a reconcile failed. A gate that blocks is not an error (it is a [`crate::reason::Blocked`]
//! written to status); these are the failures that retry with capped per-object backoff.

use std::time::Duration;

use ep_volume::StoreError;
use ep_volume::sync::SyncError;

use crate::pool::ProviderError;
use crate::runpod::RunPodError;

/// A reconcile failed; the object is retried with backoff and the failure is reported as a
/// Warning Event and in `ep_reconcile_errors_total`.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("RunPod API: {0}")]
    RunPod(#[from] RunPodError),
    #[error("network volume: {0}")]
    Store(#[from] StoreError),
    #[error(transparent)]
    Provider(#[from] ProviderError),
    #[error("payload sync: {0}")]
    Sync(#[from] SyncError),
    #[error("{what} {path}: {source}")]
    Io { what: &'static str, path: String, source: std::io::Error },
    #[error("encoding {what}: {source}")]
    Json { what: &'static str, source: serde_json::Error },
    #[error("finalizer: {0}")]
    Finalizer(&'static str),
    /// A write found the object changed since it was read (possibly by this operator's own last
    /// write, not yet in its cache): nothing was decided on stale state; the object is read again.
    #[error("the object changed since it was read")]
    Conflict,
    /// Deletion waits for the drain to finish: not a failure, the object is looked at again.
    #[error("draining before the finalizer is removed")]
    CleanupPending(Duration),
    #[error("the operator is shutting down")]
    ShuttingDown,
}

impl Error {
    /// Every value [`Error::category`] gives (the metrics start each at zero).
    pub const CATEGORIES: &'static [&'static str] = &[
        "kubernetes",
        "runpod_rate_limited",
        "runpod_unauthorized",
        "runpod",
        "s3",
        "provider",
        "sync",
        "io",
        "encoding",
        "finalizer",
        "conflict",
        "cleanup_pending",
        "shutdown",
    ];

    /// Stable label for metrics and event reasons.
    pub fn category(&self) -> &'static str {
        match self {
            Self::Kube(_) => "kubernetes",
            Self::RunPod(e) => match e {
                RunPodError::RateLimited { .. } => "runpod_rate_limited",
                RunPodError::Unauthorized { .. } => "runpod_unauthorized",
                _ => "runpod",
            },
            Self::Store(_) => "s3",
            Self::Provider(_) => "provider",
            Self::Sync(_) => "sync",
            Self::Io { .. } => "io",
            Self::Json { .. } => "encoding",
            Self::Finalizer(_) => "finalizer",
            Self::Conflict => "conflict",
            Self::CleanupPending(_) => "cleanup_pending",
            Self::ShuttingDown => "shutdown",
        }
    }

    /// Whether the failure is really a wait that retries on its own schedule (not counted as an error).
    pub fn is_wait(&self) -> Option<Duration> {
        match self {
            Self::CleanupPending(d) => Some(*d),
            Self::Conflict => Some(Duration::from_millis(100)),
            _ => None,
        }
    }

    /// A write's failure: a stale read (409 Conflict) is [`Error::Conflict`].
    pub fn write(e: kube::Error) -> Self {
        match &e {
            kube::Error::Api(s) if s.code == 409 && s.reason == "Conflict" => Self::Conflict,
            _ => Self::Kube(e),
        }
    }

    /// Wraps a JSON encoding failure.
    pub fn json(what: &'static str) -> impl FnOnce(serde_json::Error) -> Self {
        move |source| Self::Json { what, source }
    }

    /// Wraps a local file failure.
    pub fn io(what: &'static str, path: &std::path::Path) -> impl FnOnce(std::io::Error) -> Self {
        let path = path.display().to_string();
        move |source| Self::Io { what, path, source }
    }
}

/// The error of a reconcile run through kube-runtime's `finalizer()`.
pub fn from_finalizer(e: kube::runtime::finalizer::Error<Error>) -> Error {
    use kube::runtime::finalizer::Error as F;
    match e {
        F::ApplyFailed(e) | F::CleanupFailed(e) => e,
        F::AddFinalizer(e) | F::RemoveFinalizer(e) => Error::Kube(e),
        F::UnnamedObject => Error::Finalizer("the object has no name"),
        F::InvalidFinalizer => Error::Finalizer("the finalizer name is not a JSON pointer"),
    }
}
