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
    /// Each window as last seen, counted down by the requests sent since.
    windows: Vec<Tracked>,
}

#[derive(Clone, Debug)]
struct Tracked {
    window: Window,
    reset_at: Instant,
}

tokio::task_local! {
    /// Set while a call runs whose turn was taken beforehand ([`Pacer::wait`] then [`prepaid`]).
    static PREPAID: std::cell::Cell<bool>;
}

/// Runs `f` as a call whose turn has already been taken: its first request does not wait again.
/// A create's time bound is for RunPod's answer, not for the account's queue.
pub async fn prepaid<F: Future>(f: F) -> F::Output {
    PREPAID.scope(std::cell::Cell::new(true), f).await
}

/// Whether this request's turn was taken beforehand (true once per [`prepaid`] scope).
pub(crate) fn take_prepaid() -> bool {
    PREPAID.try_with(|c| c.replace(false)).unwrap_or(false)
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
        let now = Instant::now();
        for t in p.lock().windows.clone() {
            let w = Window { reset: t.reset_at.saturating_duration_since(now), ..t.window };
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

    /// Waits for this request's turn. Each request sent counts against the windows at once, so
    /// many requests in flight together never spend more than the last answer said was left.
    pub async fn wait(&self) {
        let at = {
            let mut s = self.lock();
            let now = Instant::now();
            let mut at = s.next_at.map_or(now, |n| n.max(now));
            // A window whose reset has passed starts full again (as far as this client knows).
            s.windows.retain(|t| t.reset_at > at);
            if let Some(reset) = s.windows.iter().filter(|t| t.window.remaining == 0).map(|t| t.reset_at).max() {
                at = at.max(reset);
                s.windows.retain(|t| t.reset_at > at);
            }
            for t in &mut s.windows {
                t.window.remaining = t.window.remaining.saturating_sub(1);
            }
            let gap = spacing(&s.windows, at);
            s.next_at = Some(at + gap);
            at
        };
        tokio::time::sleep_until(at).await;
    }

    /// Reads an answer's rate-limit headers.
    pub fn observe(&self, headers: &HeaderMap) {
        let Some(limit) = headers.get("ratelimit").and_then(|v| v.to_str().ok()) else { return };
        let policy = headers.get("ratelimit-policy").and_then(|v| v.to_str().ok()).unwrap_or_default();
        let seen = parse(limit, policy);
        if seen.is_empty() {
            return;
        }
        let mut s = self.lock();
        let now = Instant::now();
        let windows = seen
            .into_iter()
            .map(|w| {
                let reset_at = now + w.reset;
                // Within the same window the answer may predate requests still in flight: keep
                // the lower count. A later reset is a new window: take RunPod's figure.
                let counted = s
                    .windows
                    .iter()
                    .find(|t| t.window.name == w.name && t.reset_at + Duration::from_secs(1) >= reset_at)
                    .map(|t| t.window.remaining);
                let remaining = counted.map_or(w.remaining, |c| c.min(w.remaining));
                Tracked { window: Window { remaining, ..w }, reset_at }
            })
            .collect();
        s.windows = windows;
    }

    /// The interval at which one kind of request (the pod list of each poll) uses at most
    /// `share` of what each window has left: `60` left of a 60 s window and a share of one half
    /// is one request every 2 s.
    pub fn share(&self, share: f64) -> Duration {
        let s = self.lock();
        let now = Instant::now();
        s.windows
            .iter()
            .filter(|t| t.reset_at > now)
            .map(|t| {
                let allowed = (t.window.remaining as f64 * share).max(1.0);
                t.reset_at.saturating_duration_since(now).div_f64(allowed)
            })
            .max()
            .unwrap_or_default()
    }

    /// A 429: nobody on this account calls before `after` has passed.
    pub fn hold(&self, after: Duration) {
        let mut s = self.lock();
        let until = Instant::now() + after;
        s.next_at = Some(s.next_at.map_or(until, |n| n.max(until)));
    }
}

/// The gap to leave after a request sent at `at`: the time left spread over the requests left,
/// in the tightest window that is below half its quota (one request is kept in reserve).
fn spacing(windows: &[Tracked], at: Instant) -> Duration {
    windows
        .iter()
        .filter(|t| t.window.quota.is_none_or(|q| t.window.remaining * 2 < q))
        .map(|t| {
            let left = t.reset_at.saturating_duration_since(at);
            left / u32::try_from(t.window.remaining.saturating_sub(1).max(1)).unwrap_or(u32::MAX)
        })
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
        let now = Instant::now();
        let w = |remaining, reset| Tracked {
            window: Window { name: "minute".into(), remaining, quota: Some(60), reset: Duration::ZERO },
            reset_at: now + Duration::from_secs(reset),
        };
        assert_eq!(spacing(&[w(50, 30)], now), Duration::ZERO);
        assert_eq!(spacing(&[w(11, 30)], now), Duration::from_secs(3));
        assert_eq!(spacing(&[w(1, 30)], now), Duration::from_secs(30));
    }

    #[tokio::test(start_paused = true)]
    async fn requests_in_flight_count_against_the_window_before_any_answer() {
        let p = for_key("rpa_TEST_IN_FLIGHT");
        let headers = |r: u32, t: u32| {
            let mut h = HeaderMap::new();
            h.insert("ratelimit", format!("\"minute\";r={r};t={t}").parse().unwrap());
            h.insert("ratelimit-policy", "\"minute\";q=60;w=60".parse().unwrap());
            h
        };
        p.observe(&headers(40, 60));
        let start = Instant::now();
        for _ in 0..10 {
            p.wait().await;
        }
        assert_eq!(start.elapsed(), Duration::ZERO, "plenty left: no waiting");
        // An answer that predates those ten requests does not give their budget back.
        p.observe(&headers(39, 60));
        assert_eq!(p.lock().windows[0].window.remaining, 30);
        // A burst larger than what is left waits for the reset instead of meeting a 429.
        for _ in 0..31 {
            p.wait().await;
        }
        assert!(
            start.elapsed() >= Duration::from_secs(59),
            "the 31st request waited for the reset: {:?}",
            start.elapsed()
        );
        // A new window (a later reset) takes RunPod's figure.
        p.observe(&headers(58, 60));
        assert_eq!(p.lock().windows[0].window.remaining, 58);
    }

    #[tokio::test(start_paused = true)]
    async fn the_poll_list_takes_at_most_its_share_of_what_is_left() {
        let p = for_key("rpa_TEST_SHARE");
        assert_eq!(p.share(0.5), Duration::ZERO, "no limit seen: no spacing");
        let mut h = HeaderMap::new();
        h.insert("ratelimit", "\"minute\";r=60;t=60, \"hour\";r=3000;t=3600".parse().unwrap());
        h.insert("ratelimit-policy", "\"minute\";q=60;w=60, \"hour\";q=3000;w=3600".parse().unwrap());
        p.observe(&h);
        // The hour is the tighter window: 1,500 requests over 3,600 s.
        assert_eq!(p.share(0.5), Duration::from_millis(2400));
        h.insert("ratelimit", "\"minute\";r=1;t=30, \"hour\";r=3000;t=3600".parse().unwrap());
        p.observe(&h);
        assert_eq!(p.share(0.5), Duration::from_secs(30), "the last request of a window waits for its reset");
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
