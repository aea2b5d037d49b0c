//! RunPod errors, classified from HTTP status and message text (runpod-api.md section 6).

use std::time::Duration;

/// A RunPod call failed. Every variant keeps RunPod's original message.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RunPodError {
    /// No machine with the requested GPU, data center and spec: try the next choice.
    #[error("no capacity: {message}")]
    Capacity { message: String },
    /// Not enough credit: stop trying every candidate and tell a person.
    #[error("insufficient balance: {message}")]
    InsufficientBalance { message: String },
    #[error("not found: {message}")]
    NotFound { message: String },
    /// The request itself is wrong: retrying cannot help.
    #[error("invalid request: {message}")]
    InvalidRequest { message: String },
    /// Bad or missing API key, or no access.
    #[error("unauthorized: {message}")]
    Unauthorized { message: String },
    #[error("rate limited: {message}")]
    RateLimited { message: String, retry_after: Option<Duration> },
    /// 5xx, timeouts, connection errors, `INTERNAL_SERVER_ERROR`. `may_have_applied` is true when
    /// the request could have reached RunPod (a create must then be checked by listing pods).
    #[error("transient RunPod failure: {message}")]
    Transient { message: String, may_have_applied: bool },
    /// RunPod no longer offers spot (interruptible) pods.
    #[error("spot pods unavailable: {message}")]
    SpotUnavailable { message: String },
}

impl RunPodError {
    /// RunPod's own words.
    pub fn message(&self) -> &str {
        match self {
            Self::Capacity { message }
            | Self::InsufficientBalance { message }
            | Self::NotFound { message }
            | Self::InvalidRequest { message }
            | Self::Unauthorized { message }
            | Self::RateLimited { message, .. }
            | Self::Transient { message, .. }
            | Self::SpotUnavailable { message } => message,
        }
    }

    /// Stable label for metrics and condition reasons.
    pub fn category(&self) -> &'static str {
        match self {
            Self::Capacity { .. } => "Capacity",
            Self::InsufficientBalance { .. } => "InsufficientBalance",
            Self::NotFound { .. } => "NotFound",
            Self::InvalidRequest { .. } => "InvalidRequest",
            Self::Unauthorized { .. } => "Unauthorized",
            Self::RateLimited { .. } => "RateLimited",
            Self::Transient { .. } => "Transient",
            Self::SpotUnavailable { .. } => "SpotUnavailable",
        }
    }

    /// Whether the same call may succeed later.
    pub fn is_retryable(&self) -> bool {
        matches!(self, Self::RateLimited { .. } | Self::Transient { .. })
    }

    /// Classifies a business error by its message (GraphQL answers these with HTTP 200).
    pub fn from_message(message: &str, code: Option<&str>) -> Self {
        let m = message.to_ascii_lowercase();
        let message = message.to_owned();
        if m.contains("no longer any instances available")
            || m.contains("no instances currently available")
            || m.contains("does not have the resources to deploy")
            || m.contains("not enough free gpus on the host machine")
        {
            Self::Capacity { message }
        } else if m.contains("balance is too low") || code == Some("INSUFFICIENT_BALANCE") {
            Self::InsufficientBalance { message }
        } else if m.contains("spot pods are no longer offered") {
            Self::SpotUnavailable { message }
        } else if m.contains("not found") || m.contains("nonexistent") || code == Some("POD_NOT_FOUND") {
            Self::NotFound { message }
        } else if m.contains("something went wrong") || code == Some("INTERNAL_SERVER_ERROR") {
            Self::Transient { message, may_have_applied: true }
        } else {
            Self::InvalidRequest { message }
        }
    }

    /// Classifies a non-2xx HTTP answer.
    pub fn from_status(status: u16, message: String, retry_after: Option<Duration>) -> Self {
        match status {
            401 | 403 => Self::Unauthorized { message },
            429 => Self::RateLimited { message, retry_after },
            402 => Self::InsufficientBalance { message },
            404 => Self::NotFound { message },
            500..=599 => {
                // REST v1 sends capacity and balance as 500; keep those classes.
                match Self::from_message(&message, None) {
                    e @ (Self::Capacity { .. } | Self::InsufficientBalance { .. } | Self::SpotUnavailable { .. }) => e,
                    _ => Self::Transient { message, may_have_applied: true },
                }
            }
            400 => match Self::from_message(&message, None) {
                e @ (Self::Capacity { .. } | Self::SpotUnavailable { .. }) => e,
                _ => Self::InvalidRequest { message },
            },
            _ => Self::InvalidRequest { message },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runpod_texts_map_to_their_class() {
        let cases = [
            (
                "There are no longer any instances available with the requested specifications. Please refresh and try again.",
                "Capacity",
            ),
            (
                "There are no longer any instances available with the request specifications. Please try again later.",
                "Capacity",
            ),
            ("create pod: There are no instances currently available", "Capacity"),
            (
                "create pod: This machine does not have the resources to deploy your pod. Please try a different machine",
                "Capacity",
            ),
            ("There are not enough free GPUs on the host machine to start this pod.", "Capacity"),
            ("Your account balance is too low to rent a pod. Please add funds to your account.", "InsufficientBalance"),
            ("create pod: Spot pods are no longer offered", "SpotUnavailable"),
            ("pod not found to terminate", "NotFound"),
            ("Tried to delete nonexistent network volume", "NotFound"),
            ("Something went wrong. Please try again later or contact support.", "Transient"),
            ("Field \"objectMounts\" is not defined by type \"PodFindAndDeployOnDemandInput\".", "InvalidRequest"),
        ];
        for (text, class) in cases {
            let e = RunPodError::from_message(text, None);
            assert_eq!(e.category(), class, "{text}");
            assert_eq!(e.message(), text, "the original message is kept");
        }
    }

    #[test]
    fn statuses_map_to_their_class() {
        assert_eq!(RunPodError::from_status(401, "missing bearer token".into(), None).category(), "Unauthorized");
        assert_eq!(RunPodError::from_status(403, "access denied".into(), None).category(), "Unauthorized");
        let e = RunPodError::from_status(429, "slow down".into(), Some(Duration::from_secs(3)));
        assert_eq!(
            e,
            RunPodError::RateLimited { message: "slow down".into(), retry_after: Some(Duration::from_secs(3)) }
        );
        assert_eq!(RunPodError::from_status(402, "x".into(), None).category(), "InsufficientBalance");
        assert_eq!(RunPodError::from_status(502, "error code: 502".into(), None).category(), "Transient");
        assert_eq!(
            RunPodError::from_status(500, "create pod: There are no instances currently available".into(), None)
                .category(),
            "Capacity"
        );
        assert_eq!(RunPodError::from_status(400, "There are no longer any instances available with the requested specifications. Please refresh and try again.".into(), None).category(), "Capacity");
        assert_eq!(RunPodError::from_status(422, "unknown field".into(), None).category(), "InvalidRequest");
        assert!(RunPodError::from_status(503, "x".into(), None).is_retryable());
        assert!(!RunPodError::from_status(400, "bad".into(), None).is_retryable());
    }
}
