//! The HTTP core both transports share: auth header, User-Agent, timeouts, retries, and pacing by
//! the account's rate-limit headers.

use std::sync::Arc;
use std::time::Duration;

use reqwest::header::{HeaderMap, RETRY_AFTER};

use super::RunPodError;

/// Retries of transient failures.
#[derive(Clone, Debug, PartialEq)]
pub struct RetryPolicy {
    /// Attempts in total, the first included.
    pub max_attempts: u32,
    pub base_delay: Duration,
    pub max_delay: Duration,
    /// Longest Retry-After honoured before giving up on the call.
    pub max_retry_after: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_attempts: 4,
            base_delay: Duration::from_millis(250),
            max_delay: Duration::from_secs(8),
            max_retry_after: Duration::from_secs(60),
        }
    }
}

impl RetryPolicy {
    /// Delay before attempt `n + 1` (n >= 1): capped exponential with jitter in [50%, 100%].
    pub fn backoff(&self, n: u32) -> Duration {
        let exp = self.base_delay.saturating_mul(1u32 << n.saturating_sub(1).min(16));
        exp.min(self.max_delay).mul_f64(0.5 + fastrand::f64() * 0.5)
    }
}

/// Client settings.
#[derive(Clone, Debug)]
pub struct ClientOptions {
    /// Timeout of ordinary requests.
    pub timeout: Duration,
    /// Timeout of pod creation (RunPod can take long to place a pod).
    pub create_timeout: Duration,
    pub retry: RetryPolicy,
    pub user_agent: String,
}

impl Default for ClientOptions {
    fn default() -> Self {
        Self {
            timeout: super::DEFAULT_TIMEOUT,
            create_timeout: Duration::from_secs(120),
            retry: RetryPolicy::default(),
            user_agent: format!("ep-operator/{}", env!("CARGO_PKG_VERSION")),
        }
    }
}

/// Whether a call may be repeated when its outcome is unknown.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Idempotency {
    /// Reads, stop, resume, terminate: repeating them is harmless.
    Safe,
    /// Create: a repeat could rent a second pod, so only calls that never reached RunPod repeat.
    Unsafe,
}

/// A raw answer.
pub(crate) struct Answer {
    pub status: u16,
    pub body: bytes::Bytes,
}

#[derive(Clone)]
pub(crate) struct Http {
    client: reqwest::Client,
    pub base: String,
    key: Arc<str>,
    pub opts: ClientOptions,
    /// The account's rate-limit budget, shared with every client of the same key.
    pacer: Arc<super::pace::Pacer>,
}

impl std::fmt::Debug for Http {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The API key is never printed.
        f.debug_struct("Http").field("base", &self.base).field("key", &"<redacted>").finish_non_exhaustive()
    }
}

impl Http {
    pub fn new(base: &str, key: &str, opts: ClientOptions) -> Result<Self, RunPodError> {
        let client = reqwest::Client::builder()
            .user_agent(opts.user_agent.clone())
            .connect_timeout(Duration::from_secs(10))
            .build()
            .map_err(|e| RunPodError::InvalidRequest { message: format!("cannot build the HTTP client: {e}") })?;
        let pacer = super::pace::for_key(key);
        Ok(Self { client, base: base.trim_end_matches('/').to_owned(), key: key.into(), opts, pacer })
    }

    /// Waits for this account's next turn; the call that follows inside
    /// [`super::pace::prepaid`] uses it.
    pub async fn turn(&self) {
        self.pacer.wait().await;
    }

    /// See [`super::pace::Pacer::share`].
    pub fn spacing(&self, share: f64) -> Duration {
        self.pacer.share(share)
    }

    /// Sends a request built by `build`, retrying what is safe to retry.
    pub async fn send(
        &self,
        op: &'static str,
        idempotency: Idempotency,
        timeout: Duration,
        build: impl Fn(&reqwest::Client) -> reqwest::RequestBuilder,
    ) -> Result<Answer, RunPodError> {
        let policy = &self.opts.retry;
        let mut attempt = 1;
        loop {
            if !(attempt == 1 && super::pace::take_prepaid()) {
                self.pacer.wait().await;
            }
            let result = build(&self.client).bearer_auth(&*self.key).timeout(timeout).send().await;
            let err = match result {
                Ok(resp) => {
                    let status = resp.status().as_u16();
                    let retry_after = retry_after(resp.headers());
                    self.pacer.observe(resp.headers());
                    if let (429, Some(after)) = (status, retry_after) {
                        self.pacer.hold(after);
                    }
                    let body = resp.bytes().await.unwrap_or_default();
                    if status == 429 || status >= 500 {
                        RunPodError::from_status(status, error_text(&body), retry_after)
                    } else {
                        return Ok(Answer { status, body });
                    }
                }
                Err(e) => {
                    // A refused connection never reached RunPod; anything later may have.
                    let may_have_applied = !e.is_connect();
                    let what = if e.is_timeout() { "timed out" } else { "failed" };
                    RunPodError::Transient { message: format!("{op} {what}: {}", without_url(&e)), may_have_applied }
                }
            };
            let repeatable = match (&err, idempotency) {
                (RunPodError::RateLimited { .. }, _) => true,
                (RunPodError::Transient { .. }, Idempotency::Safe) => true,
                (RunPodError::Transient { may_have_applied, .. }, Idempotency::Unsafe) => !may_have_applied,
                _ => false,
            };
            if !repeatable || attempt >= policy.max_attempts {
                tracing::debug!(op, attempt, error = %err, "RunPod call failed");
                return Err(err);
            }
            let delay = match &err {
                RunPodError::RateLimited { retry_after: Some(after), .. } => {
                    if *after > policy.max_retry_after {
                        return Err(err);
                    }
                    *after
                }
                _ => policy.backoff(attempt),
            };
            tracing::debug!(op, attempt, ?delay, error = %err, "retrying RunPod call");
            tokio::time::sleep(delay).await;
            attempt += 1;
        }
    }
}

fn retry_after(h: &HeaderMap) -> Option<Duration> {
    h.get(RETRY_AFTER)?.to_str().ok()?.trim().parse::<u64>().ok().map(Duration::from_secs)
}

/// The error text of a body: problem+json `detail`, GraphQL `errors[0].message`, v1 `error`, or the text.
pub(crate) fn error_text(body: &[u8]) -> String {
    if let Ok(v) = serde_json::from_slice::<serde_json::Value>(body) {
        for pointer in ["/detail", "/errors/0/message", "/error", "/message", "/title"] {
            if let Some(s) = v.pointer(pointer).and_then(serde_json::Value::as_str) {
                return s.to_owned();
            }
        }
    }
    let text = String::from_utf8_lossy(body);
    text.chars().take(300).collect()
}

fn without_url(e: &reqwest::Error) -> String {
    // reqwest errors carry the URL; the key is never in it (it travels in a header), but the
    // message reads better without it.
    let mut e2 = String::new();
    let s = e.to_string();
    e2.push_str(s.split(" for url (").next().unwrap_or(&s));
    let mut source = std::error::Error::source(e);
    while let Some(inner) = source {
        e2.push_str(": ");
        e2.push_str(&inner.to_string());
        source = inner.source();
    }
    e2
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_is_capped_and_jittered() {
        let p = RetryPolicy {
            max_attempts: 10,
            base_delay: Duration::from_millis(100),
            max_delay: Duration::from_secs(1),
            max_retry_after: Duration::from_secs(5),
        };
        for n in 1..10 {
            let d = p.backoff(n);
            let full = Duration::from_millis(100 * (1 << (n - 1))).min(Duration::from_secs(1));
            assert!(d <= full && d >= full / 2, "attempt {n}: {d:?} vs {full:?}");
        }
    }

    #[test]
    fn error_text_reads_every_shape() {
        assert_eq!(error_text(br#"{"title":"Bad Request","status":400,"detail":"no capacity"}"#), "no capacity");
        assert_eq!(
            error_text(br#"{"errors":[{"message":"pod not found to terminate"}]}"#),
            "pod not found to terminate"
        );
        assert_eq!(error_text(br#"{"error":"create pod: x","status":500}"#), "create pod: x");
        assert_eq!(error_text(b"error code: 502"), "error code: 502");
    }

    #[test]
    fn debug_never_shows_the_key() {
        let h = Http::new("http://x", "rpa_SECRET", ClientOptions::default()).unwrap();
        assert!(!format!("{h:?}").contains("rpa_SECRET"));
    }
}
