//! Pacing by RunPod's rate-limit headers. REST v2 answers every authenticated request with
//! `RateLimit-Policy: "minute";q=60;w=60, ...` and `RateLimit: "minute";r=57;t=42, ...` (the IETF
//! httpapi draft). The budget belongs to the account, so every client using one API key shares one
//! pacer. While a window has more than half its quota left, requests go at once; below that, the
//! requests left are spread over the time left, and a spent window waits for its reset. A 429's
//! Retry-After holds everyone back. No crate parses these headers, hence this file.

use std::collections::HashMap;
use std::sync::{Arc, LazyLock, Mutex, PoisonError};
use std::time::Duration;

use reqwest::header::HeaderMap;
use sha2::{Digest, Sha256};
use tokio::time::Instant;

/// What the last answer said about one window.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Window {
    pub name: String,
    pub remaining: u64,
    pub quota: Option<u64>,
    pub reset: Duration,
}

#[derive(Debug, Default)]
struct State {
    /// The earliest instant the next request may start.
    next_at: Option<Instant>,
    windows: Vec<Window>,
}

/// One account's pacer.
#[derive(Debug, Default)]
pub struct Pacer {
    state: Mutex<State>,
}

static PACERS: LazyLock<Mutex<HashMap<String, Arc<Pacer>>>> = LazyLock::new(Mutex::default);

/// The pacer of the account behind `api_key` (shared by every client using that key).
pub fn for_key(api_key: &str) -> Arc<Pacer> {
    let id = hex::encode(&Sha256::digest(api_key.as_bytes())[..8]);
    PACERS.lock().unwrap_or_else(PoisonError::into_inner).entry(id).or_default().clone()
}

/// The windows every pacer last saw, for the metrics (the lowest remaining per window name).
pub fn windows() -> Vec<Window> {
    let pacers: Vec<Arc<Pacer>> = PACERS.lock().unwrap_or_else(PoisonError::into_inner).values().cloned().collect();
    let mut out: Vec<Window> = Vec::new();
    for p in pacers {
        for w in p.lock().windows.clone() {
            match out.iter_mut().find(|o| o.name == w.name) {
                Some(o) if w.remaining < o.remaining => *o = w,
                Some(_) => {}
                None => out.push(w),
            }
        }
    }
    out
}

impl Pacer {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Waits for this request's turn.
    pub async fn wait(&self) {
        let at = {
            let mut s = self.lock();
            let now = Instant::now();
            let at = s.next_at.map_or(now, |n| n.max(now));
            let gap = spacing(&s.windows);
            s.next_at = Some(at + gap);
            at
        };
        tokio::time::sleep_until(at).await;
    }

    /// Reads an answer's rate-limit headers.
    pub fn observe(&self, headers: &HeaderMap) {
        let Some(limit) = headers.get("ratelimit").and_then(|v| v.to_str().ok()) else { return };
        let policy = headers.get("ratelimit-policy").and_then(|v| v.to_str().ok()).unwrap_or_default();
        let windows = parse(limit, policy);
        if windows.is_empty() {
            return;
        }
        let mut s = self.lock();
        let now = Instant::now();
        if let Some(spent) = windows.iter().filter(|w| w.remaining == 0).map(|w| w.reset).max() {
            s.next_at = Some(s.next_at.map_or(now, |n| n.max(now)).max(now + spent));
        }
        s.windows = windows;
    }

    /// A 429: nobody on this account calls before `after` has passed.
    pub fn hold(&self, after: Duration) {
        let mut s = self.lock();
        let until = Instant::now() + after;
        s.next_at = Some(s.next_at.map_or(until, |n| n.max(until)));
    }
}

/// The gap to leave after a request: the time left spread over the requests left, in the
/// tightest window that is below half its quota (one request is kept in reserve).
fn spacing(windows: &[Window]) -> Duration {
    windows
        .iter()
        .filter(|w| w.quota.is_none_or(|q| w.remaining * 2 < q))
        .map(|w| w.reset / u32::try_from(w.remaining.saturating_sub(1).max(1)).unwrap_or(u32::MAX))
        .max()
        .unwrap_or_default()
}

/// Parses `"minute";r=57;t=42, "hour";r=2990;t=3542` with the quotas of
/// `"minute";q=60;w=60, "hour";q=3000;w=3600`.
pub fn parse(limit: &str, policy: &str) -> Vec<Window> {
    let quotas: HashMap<String, u64> =
        items(policy).filter_map(|(name, p)| Some((name, p.get("q")?.parse().ok()?))).collect();
    items(limit)
        .filter_map(|(name, p)| {
            let remaining = p.get("r")?.parse().ok()?;
            let reset = Duration::from_secs(p.get("t").and_then(|t| t.parse().ok()).unwrap_or(0));
            Some(Window { quota: quotas.get(&name).copied(), name, remaining, reset })
        })
        .collect()
}

/// The list items of a structured header: a name and its parameters.
fn items(header: &str) -> impl Iterator<Item = (String, HashMap<String, String>)> + '_ {
    header.split(',').filter_map(|item| {
        let mut parts = item.split(';').map(str::trim);
        let name = parts.next()?.trim_matches('"').to_owned();
        let params = parts.filter_map(|kv| kv.split_once('=')).map(|(k, v)| (k.to_owned(), v.to_owned())).collect();
        (!name.is_empty()).then_some((name, params))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_runpods_headers() {
        let w = parse("\"minute\";r=57;t=42, \"hour\";r=2990;t=3542", "\"minute\";q=60;w=60, \"hour\";q=3000;w=3600");
        assert_eq!(
            w[0],
            Window { name: "minute".into(), remaining: 57, quota: Some(60), reset: Duration::from_secs(42) }
        );
        assert_eq!(w[1].remaining, 2990);
        assert!(parse("garbage", "").is_empty());
    }

    #[test]
    fn plenty_left_goes_at_once_and_little_left_is_spread_over_the_reset() {
        let w = |remaining, reset| Window {
            name: "minute".into(),
            remaining,
            quota: Some(60),
            reset: Duration::from_secs(reset),
        };
        assert_eq!(spacing(&[w(50, 30)]), Duration::ZERO);
        assert_eq!(spacing(&[w(11, 30)]), Duration::from_secs(3));
        assert_eq!(spacing(&[w(1, 30)]), Duration::from_secs(30));
    }

    #[tokio::test(start_paused = true)]
    async fn a_spent_window_holds_every_client_of_the_key_until_its_reset() {
        let a = for_key("rpa_TEST_SPENT");
        let b = for_key("rpa_TEST_SPENT");
        let mut h = HeaderMap::new();
        h.insert("ratelimit", "\"minute\";r=0;t=20".parse().unwrap());
        h.insert("ratelimit-policy", "\"minute\";q=60;w=60".parse().unwrap());
        a.observe(&h);
        let start = Instant::now();
        b.wait().await;
        assert!(start.elapsed() >= Duration::from_secs(20), "the other client waited: {:?}", start.elapsed());
        assert!(!Arc::ptr_eq(&a, &for_key("rpa_OTHER_ACCOUNT")));
    }
}
