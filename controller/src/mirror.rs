//! The registry mirror: reconcilers hand it rows, a background task writes them to PostgreSQL.
//!
//! Reconciling never waits for the database. Writes queue in memory, coalesced per key (only the
//! newest row of an experiment, order, attempt or worker is kept), and are written in the order
//! they were first queued so parents land before children. While PostgreSQL is unreachable the
//! queue holds, the lag is exported (metric, and a `RegistrySynced` condition through
//! [`Mirror::lag`]), and the queue drains when the database returns. Every write is an idempotent
//! upsert, so a replay is harmless.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde_json::Value;
use tokio::sync::{Notify, watch};

use crate::metrics::Metrics;
use crate::registry::{
    AttemptRow, ExperimentRow, HeartbeatRow, InstanceRow, OrderRow, PhaseChange, ProgressRow, Registry, RegistryError,
    SessionRow,
};

/// One write for the registry.
#[derive(Clone, Debug, PartialEq)]
pub enum Write {
    Experiment(ExperimentRow),
    Attempt(AttemptRow),
    Order(OrderRow),
    Heartbeat(HeartbeatRow),
    Session(SessionRow),
    Instance(InstanceRow),
    Phase(PhaseChange),
    Progress(ProgressRow),
    Settings { sha256: String, body: Value, at: DateTime<Utc> },
}

impl Write {
    /// Writes with the same key replace each other while queued.
    fn key(&self) -> String {
        match self {
            Self::Experiment(r) => format!("experiment/{}/{}", r.namespace, r.name),
            Self::Attempt(r) => format!("attempt/{}", r.run_id),
            Self::Order(r) => format!("order/{}/{}", r.namespace, r.name),
            Self::Heartbeat(r) => format!("heartbeat/{}", r.worker_id),
            Self::Session(r) => format!("session/{}/{}", r.worker_id, r.run_id),
            Self::Instance(r) => format!("instance/{}", r.pod_id),
            Self::Phase(r) => format!("phase/{}/{}/{}", r.uid, r.to_phase, r.at.timestamp()),
            Self::Progress(r) => format!("progress/{}/{}", r.run_id, r.step),
            Self::Settings { sha256, .. } => format!("settings/{sha256}"),
        }
    }

    async fn apply<R: Registry>(&self, r: &R) -> Result<(), RegistryError> {
        match self {
            Self::Experiment(row) => r.upsert_experiment(row).await,
            Self::Attempt(row) => r.upsert_attempt(row).await,
            Self::Order(row) => r.upsert_order(row).await,
            Self::Heartbeat(row) => r.record_heartbeat(row).await,
            Self::Session(row) => r.upsert_session(row).await,
            Self::Instance(row) => r.upsert_instance(row).await,
            Self::Phase(row) => r.record_phase(row).await,
            Self::Progress(row) => r.record_progress(row).await,
            Self::Settings { sha256, body, at } => r.record_settings(sha256, body, *at).await,
        }
    }
}

/// How far the registry is behind.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Lag {
    /// Writes waiting.
    pub pending: usize,
    /// When the oldest waiting write was queued, if the last attempt to write failed.
    pub behind_since: Option<DateTime<Utc>>,
    /// The last database error, while behind.
    pub error: Option<String>,
}

impl Lag {
    /// True when PostgreSQL is unreachable and writes wait.
    pub fn is_behind(&self) -> bool {
        self.behind_since.is_some()
    }
}

#[derive(Default)]
struct Queue {
    seq: u64,
    items: BTreeMap<u64, (Write, DateTime<Utc>)>,
    by_key: HashMap<String, u64>,
    /// The last row written per key, so an unchanged row is not written again.
    written: HashMap<String, Write>,
}

/// Cheap to clone; every clone feeds the same queue.
#[derive(Clone)]
pub struct Mirror {
    queue: Arc<Mutex<Queue>>,
    wake: Arc<Notify>,
    lag: watch::Sender<Lag>,
    metrics: Arc<Metrics>,
}

impl Mirror {
    pub fn new(metrics: Arc<Metrics>) -> Self {
        Self { queue: Arc::default(), wake: Arc::default(), lag: watch::Sender::new(Lag::default()), metrics }
    }

    /// Queues a write; an identical row already written is skipped.
    pub fn send(&self, w: Write) {
        let key = w.key();
        let mut q = self.queue.lock().unwrap_or_else(PoisonError::into_inner);
        if q.written.get(&key) == Some(&w) && !q.by_key.contains_key(&key) {
            return;
        }
        if let Some(seq) = q.by_key.get(&key).copied() {
            // Keep the first position (parents stay ahead of children), take the newest row.
            if let Some(item) = q.items.get_mut(&seq) {
                item.0 = w;
                return;
            }
        }
        q.seq += 1;
        let seq = q.seq;
        q.items.insert(seq, (w, Utc::now()));
        q.by_key.insert(key, seq);
        self.metrics.registry_pending.set(i64::try_from(q.items.len()).unwrap_or(i64::MAX));
        drop(q);
        self.wake.notify_one();
    }

    /// The lag now.
    pub fn lag(&self) -> Lag {
        self.lag.borrow().clone()
    }

    /// Wakes on every change between caught up and behind.
    pub fn subscribe(&self) -> watch::Receiver<Lag> {
        self.lag.subscribe()
    }

    /// Writes what is queued, once, in order. Returns false when the database failed.
    pub async fn flush<R: Registry>(&self, registry: &R) -> bool {
        let items: Vec<(u64, Write, DateTime<Utc>)> = {
            let q = self.queue.lock().unwrap_or_else(PoisonError::into_inner);
            q.items.iter().map(|(s, (w, at))| (*s, w.clone(), *at)).collect()
        };
        let mut failure = None;
        let mut oldest = None;
        for (seq, w, queued_at) in items {
            match w.apply(registry).await {
                Ok(()) => self.done(seq, &w),
                Err(RegistryError::StaleFencingToken { .. }) => {
                    // The split-brain gate refused a stale writer: the row must not land, ever.
                    tracing::warn!(write = %w.key(), "registry refused a stale fencing token; write dropped");
                    self.done(seq, &w);
                }
                Err(e) if waits_for_parent(&e) => {
                    // Its parent row is further back in the queue or not mirrored yet: next pass.
                    oldest.get_or_insert(queued_at);
                }
                Err(e) => {
                    self.metrics.registry_errors.inc();
                    oldest.get_or_insert(queued_at);
                    failure = Some(e.to_string());
                    break;
                }
            }
        }
        let pending = self.queue.lock().unwrap_or_else(PoisonError::into_inner).items.len();
        self.metrics.registry_pending.set(i64::try_from(pending).unwrap_or(i64::MAX));
        let ok = failure.is_none();
        let lag = Lag { pending, behind_since: if ok { None } else { oldest }, error: failure };
        let secs = lag.behind_since.map_or(0.0, |t| (Utc::now() - t).num_milliseconds() as f64 / 1000.0);
        self.metrics.registry_lag_seconds.set(secs);
        self.lag.send_if_modified(|cur| {
            let changed = cur.is_behind() != lag.is_behind() || cur.error != lag.error;
            *cur = lag;
            changed
        });
        ok
    }

    fn done(&self, seq: u64, w: &Write) {
        let mut q = self.queue.lock().unwrap_or_else(PoisonError::into_inner);
        let key = w.key();
        // A newer row for the same key may have replaced it while the write was in flight.
        if q.items.get(&seq).is_some_and(|(cur, _)| cur == w) {
            q.items.remove(&seq);
            q.by_key.remove(&key);
        }
        q.written.insert(key, w.clone());
    }

    /// Drains the queue forever: at once when something is queued, with capped backoff while the
    /// database is down.
    pub async fn run<R: Registry>(self, registry: R) {
        let mut backoff = Duration::from_millis(500);
        loop {
            let pending = !self.queue.lock().unwrap_or_else(PoisonError::into_inner).items.is_empty();
            if !pending {
                self.wake.notified().await;
                continue;
            }
            if self.flush(&registry).await {
                backoff = Duration::from_millis(500);
                // Rows waiting for a parent get another pass shortly.
                tokio::time::sleep(Duration::from_millis(200)).await;
            } else {
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(10));
            }
        }
    }
}

/// A child row whose parent is not in the registry yet (foreign key or explicit check).
fn waits_for_parent(e: &RegistryError) -> bool {
    match e {
        RegistryError::MissingParent { .. } => true,
        RegistryError::Database(sqlx::Error::Database(d)) => d.code().as_deref() == Some("23503"),
        _ => false,
    }
}

#[cfg(test)]
mod tests;
