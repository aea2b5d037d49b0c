//! Hot reload: poll the settings file's content hash, validate a changed file, swap it in.
//!
//! Polling the content (not mtime, not inotify) is deliberate: a ConfigMap volume updates by
//! swapping a `..data` symlink, which inotify on the file path misses and which can leave mtime
//! unchanged; reading and hashing a small file every few seconds costs nothing.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::{Settings, SettingsError, content_hash};

/// The outcome of the reloads so far.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ReloadStatus {
    /// Hash of the settings in force.
    pub active_sha256: String,
    /// Settings files applied after the first one.
    pub reloads: u64,
    /// Settings files refused.
    pub rejections: u64,
    /// The most recent refusal, cleared when a later file is applied.
    pub last_rejection: Option<Rejection>,
}

/// A refused settings file.
#[derive(Clone, Debug, PartialEq)]
pub struct Rejection {
    pub sha256: String,
    pub error: String,
    pub at: DateTime<Utc>,
}

/// Read side: the settings in force and the reload status. Cheap to clone.
#[derive(Clone, Debug)]
pub struct SettingsHandle {
    settings: watch::Receiver<Arc<Settings>>,
    status: watch::Receiver<ReloadStatus>,
}

impl SettingsHandle {
    /// The settings in force now.
    pub fn current(&self) -> Arc<Settings> {
        self.settings.borrow().clone()
    }
    /// The reload status now.
    pub fn status(&self) -> ReloadStatus {
        self.status.borrow().clone()
    }
    /// A receiver that wakes on every applied settings change.
    pub fn subscribe(&self) -> watch::Receiver<Arc<Settings>> {
        self.settings.clone()
    }
    /// A receiver that wakes on every reload or refusal.
    pub fn subscribe_status(&self) -> watch::Receiver<ReloadStatus> {
        self.status.clone()
    }
    /// A handle on fixed settings (no file behind them).
    pub fn fixed(settings: Settings) -> Self {
        let (_, settings) = watch::channel(Arc::new(settings));
        let (_, status) = watch::channel(ReloadStatus::default());
        Self { settings, status }
    }
}

/// Watches one settings file.
pub struct SettingsWatcher {
    path: PathBuf,
    last_seen: String,
    settings_tx: watch::Sender<Arc<Settings>>,
    status_tx: watch::Sender<ReloadStatus>,
}

impl SettingsWatcher {
    /// Loads the file; an invalid file at start-up is an error (there is no last good one yet).
    pub fn load(path: &Path) -> Result<(Self, SettingsHandle), SettingsError> {
        let bytes = read(path)?;
        let settings = parse(path, &bytes)?;
        let sha = content_hash(&bytes);
        let (settings_tx, settings) = watch::channel(Arc::new(settings));
        let (status_tx, status) =
            watch::channel(ReloadStatus { active_sha256: sha.clone(), ..ReloadStatus::default() });
        let watcher = Self { path: path.to_owned(), last_seen: sha, settings_tx, status_tx };
        Ok((watcher, SettingsHandle { settings, status }))
    }

    /// Checks the file once: applies a valid change, records a refused one. Returns true when
    /// the file's content differed from the last one seen.
    pub fn check(&mut self) -> bool {
        let bytes = match read(&self.path) {
            Ok(b) => b,
            Err(e) => {
                // A missing or unreadable file is refused like an invalid one, but only once per cause.
                let key = format!("read-error:{e}");
                if key != self.last_seen {
                    self.last_seen = key;
                    self.reject("", &e);
                    return true;
                }
                return false;
            }
        };
        let sha = content_hash(&bytes);
        if sha == self.last_seen {
            return false;
        }
        self.last_seen.clone_from(&sha);
        match parse(&self.path, &bytes) {
            Ok(settings) => {
                tracing::info!(sha256 = %sha, path = %self.path.display(), "settings applied");
                self.settings_tx.send_replace(Arc::new(settings));
                self.status_tx.send_modify(|s| {
                    s.active_sha256 = sha;
                    s.reloads += 1;
                    s.last_rejection = None;
                });
            }
            Err(e) => self.reject(&sha, &e),
        }
        true
    }

    fn reject(&self, sha: &str, e: &SettingsError) {
        tracing::warn!(error = %e, "settings refused; the last good settings stay in force");
        let rejection = Rejection { sha256: sha.to_owned(), error: e.to_string(), at: Utc::now() };
        self.status_tx.send_modify(|s| {
            s.rejections += 1;
            s.last_rejection = Some(rejection);
        });
    }

    /// Polls the file every `interval` until the task is aborted.
    pub fn spawn(mut self, interval: Duration) -> JoinHandle<()> {
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                self.check();
            }
        })
    }
}

fn read(path: &Path) -> Result<Vec<u8>, SettingsError> {
    std::fs::read(path).map_err(|source| SettingsError::Read { path: path.display().to_string(), source })
}

fn parse(path: &Path, bytes: &[u8]) -> Result<Settings, SettingsError> {
    let text = std::str::from_utf8(bytes)
        .map_err(|e| SettingsError::Parse { path: path.display().to_string(), message: format!("not UTF-8: {e}") })?;
    Settings::from_yaml(&path.display().to_string(), text)
}
