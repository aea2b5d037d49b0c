//! The runner's own dead-man's switch, for transports without terminateAfter (RunPod REST v2): at
//! the pod's deadline (`EP_POD_DEADLINE`) the run is stopped, given its grace to write
//! terminal.json, and the pod is terminated with the pod-scoped `RUNPOD_API_KEY` RunPod puts in
//! every pod (`DELETE <EP_RUNPOD_REST_URL>/v2/pods/$RUNPOD_POD_ID`). Without those variables
//! (GraphQL, where RunPod's terminateAfter does it, or a run outside RunPod) nothing happens.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use chrono::{DateTime, Utc};
use ep_api::volume::{ENV_POD_DEADLINE, ENV_SELF_TERMINATE_URL};

/// Where and when the pod ends itself.
#[derive(Clone, Debug)]
pub struct Switch {
    pub deadline: DateTime<Utc>,
    base: String,
    pod_id: String,
    key: String,
}

impl Switch {
    /// The switch the environment describes, if complete.
    pub fn from_env() -> Option<Self> {
        let var = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        let deadline = var(ENV_POD_DEADLINE)?.parse().ok()?;
        Some(Self {
            deadline,
            base: var(ENV_SELF_TERMINATE_URL)?,
            pod_id: var("RUNPOD_POD_ID")?,
            key: var("RUNPOD_API_KEY")?,
        })
    }

    /// Sleeps until the deadline (or `done`).
    pub fn wait(&self, done: &AtomicBool) -> bool {
        while Utc::now() < self.deadline {
            if done.load(Ordering::Relaxed) {
                return false;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        true
    }

    /// Terminates the pod, retrying a few times; a pod already gone counts as ended.
    pub fn terminate(&self) {
        let url = format!("{}/v2/pods/{}", self.base.trim_end_matches('/'), self.pod_id);
        let client = match reqwest::blocking::Client::builder().timeout(Duration::from_secs(30)).build() {
            Ok(c) => c,
            Err(e) => return eprintln!("ep-runner: cannot end the pod: {e}"),
        };
        for attempt in 1..=10 {
            match client.delete(&url).bearer_auth(&self.key).send() {
                Ok(r) if r.status().is_success() || r.status() == reqwest::StatusCode::NOT_FOUND => {
                    eprintln!("ep-runner: the pod reached its deadline {}; terminated it", self.deadline);
                    return;
                }
                Ok(r) => eprintln!("ep-runner: ending the pod (try {attempt}): HTTP {}", r.status()),
                Err(e) => eprintln!("ep-runner: ending the pod (try {attempt}): {e}"),
            }
            std::thread::sleep(Duration::from_secs(5));
        }
    }
}

/// Starts the switch: at the deadline it raises `stop` (the run stops as on SIGTERM, with its
/// grace), waits for the run to end (`ended`) at most `grace`, then terminates the pod.
pub fn arm(
    switch: Switch,
    stop: Arc<AtomicBool>,
    ended: Arc<AtomicBool>,
    grace: Duration,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        if !switch.wait(&AtomicBool::new(false)) {
            return;
        }
        stop.store(true, Ordering::Relaxed);
        let until = std::time::Instant::now() + grace;
        while !ended.load(Ordering::Relaxed) && std::time::Instant::now() < until {
            std::thread::sleep(Duration::from_millis(200));
        }
        switch.terminate();
    })
}
