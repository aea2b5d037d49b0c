//! The registry as a projection of cluster state. Every reconcile projects the object it observed
//! (finished ones included, until deleted) and a resync projects every cached object; the rows are
//! derived from spec and status only ([`rows`]), so a restart after any crash, or an empty
//! database, converges to the rows of an uninterrupted run.
//!
//! Rows that changed since they were last written wait in a queue (one per key, newest wins) and
//! are written in batches, parents first. While PostgreSQL is away the queue holds and the lag is
//! exported; a row PostgreSQL refuses is quarantined (logged, counted, an Event and a condition on
//! its object) and never blocks the others.

pub mod audit;
pub mod rows;

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::Duration;

use chrono::{DateTime, Utc};
use ep_api::{Experiment, RunPodOrder};
use k8s_openapi::api::core::v1::ObjectReference;
use kube::{Resource, ResourceExt};
use serde_json::Value;
use tokio::sync::{Notify, watch};

use self::rows::WorkerBeat;
use crate::events::Events;
use crate::metrics::Metrics;
use crate::reason::{Blocked, Reason};
use crate::registry::{HeartbeatRow, InstanceRow, Registry, RegistryError, Row};

/// How many rows one transaction carries at most.
const BATCH: usize = 500;
/// How long rows gather between flushes while the mirror keeps up (the registry trails the
/// cluster by about this much).
const COALESCE: Duration = Duration::from_millis(400);

/// How far the registry is behind.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Lag {
    /// Rows waiting.
    pub pending: usize,
    /// When the oldest waiting row was queued, while the database is failing.
    pub behind_since: Option<DateTime<Utc>>,
    /// The last database error, while behind.
    pub error: Option<String>,
    /// The database holds a registry the operator refuses to adopt (nothing is written until it is fixed).
    pub schema_refused: Option<String>,
    /// Experiments whose registry row diverges from the cluster (last audit).
    pub divergences: usize,
}

impl Lag {
    /// True when PostgreSQL is unreachable and rows wait.
    pub fn is_behind(&self) -> bool {
        self.behind_since.is_some()
    }
}

/// Whose row it is: where a refusal is reported.
#[derive(Clone, Debug, Default)]
struct Owner {
    /// `namespace/experiment` the row belongs to (for the experiment's RegistrySynced condition).
    experiment: Option<(String, String)>,
    reference: Option<ObjectReference>,
}

#[derive(Default)]
struct State {
    seq: u64,
    pending: BTreeMap<u64, (Row, Owner, DateTime<Utc>)>,
    by_key: HashMap<String, u64>,
    /// A fingerprint of the row last written per key: an unchanged row is not written again.
    /// Only the fingerprint is kept (the rows themselves, every phase and progress row of every
    /// experiment, were most of the operator's memory at a thousand experiments).
    written: HashMap<String, u64>,
    /// The status last written for each experiment, for the divergence audit.
    written_status: HashMap<(String, String), String>,
    /// Rows PostgreSQL refused, by key, until their content changes.
    refused: HashMap<String, Row>,
    /// Why an experiment's rows are quarantined.
    quarantined: HashMap<(String, String), String>,
    /// Each worker's heartbeat contributions, by order uid.
    workers: HashMap<String, HashMap<String, WorkerBeat>>,
    /// Keys of deletions not written yet.
    deletions: HashMap<String, String>,
    /// Why an experiment's registry row diverges from the cluster (last audit), by (namespace, name).
    diverged: BTreeMap<(String, String), String>,
}

/// Cheap to clone; every clone feeds the same queue.
#[derive(Clone)]
pub struct Projector {
    state: Arc<Mutex<State>>,
    wake: Arc<Notify>,
    lag: watch::Sender<Lag>,
    metrics: Arc<Metrics>,
    /// False when no database is configured: nothing is queued.
    enabled: bool,
    /// The cluster's experiments and the audit interval, once the caches are filled.
    audit: Arc<OnceLock<(audit::ClusterFn, Duration)>>,
}

fn experiment_owner(exp: &Experiment) -> Owner {
    Owner {
        experiment: Some((exp.namespace().unwrap_or_default(), exp.name_any())),
        reference: Some(exp.object_ref(&())),
    }
}

impl Projector {
    pub fn new(metrics: Arc<Metrics>, enabled: bool) -> Self {
        Self {
            state: Arc::default(),
            wake: Arc::default(),
            lag: watch::Sender::new(Lag::default()),
            metrics,
            enabled,
            audit: Arc::default(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Queues a row unless it is what was written (or refused) last for its key.
    fn queue(&self, st: &mut State, row: Row, owner: Owner) -> u64 {
        let key = row.key();
        if let Some(seq) = st.by_key.get(&key).copied()
            && let Some(item) = st.pending.get_mut(&seq)
        {
            (item.0, item.1) = (row, owner);
            return seq;
        }
        if st.written.get(&key).is_some_and(|f| *f == fingerprint(&row)) || st.refused.get(&key) == Some(&row) {
            return 0;
        }
        st.seq += 1;
        let seq = st.seq;
        st.pending.insert(seq, (row, owner, Utc::now()));
        st.by_key.insert(key, seq);
        seq
    }

    fn queue_all(&self, rows: Vec<Row>, owner: &Owner) {
        if !self.enabled {
            return;
        }
        let mut st = self.lock();
        for row in rows {
            self.queue(&mut st, row, owner.clone());
        }
        self.metrics.registry_pending.set(i64::try_from(st.pending.len()).unwrap_or(i64::MAX));
        drop(st);
        self.wake.notify_one();
    }

    /// Projects an experiment as observed.
    pub fn experiment(&self, exp: &Experiment) {
        self.queue_all(rows::experiment(exp, None), &experiment_owner(exp));
    }

    /// Projects an experiment being deleted (recorded as ended). True once the registry holds it
    /// (or when there is no registry): only then may its finalizer go.
    pub fn experiment_deleted(&self, exp: &Experiment, now: DateTime<Utc>) -> bool {
        if !self.enabled {
            return true;
        }
        let uid = exp.uid().unwrap_or_default();
        let mut st = self.lock();
        if let Some(key) = st.deletions.get(&uid).cloned() {
            if st.by_key.contains_key(&key) {
                return false;
            }
            st.deletions.remove(&uid);
            return true;
        }
        let at = exp.meta().deletion_timestamp.as_ref().map_or(now, crate::time::from_k8s);
        let rows = rows::experiment(exp, Some(at));
        let key = rows.first().map(Row::key).unwrap_or_default();
        let owner = experiment_owner(exp);
        for row in rows {
            self.queue(&mut st, row, owner.clone());
        }
        st.deletions.insert(uid, key);
        drop(st);
        self.wake.notify_one();
        false
    }

    /// Projects an order as observed, and its worker's heartbeat row.
    pub fn order(&self, order: &RunPodOrder) {
        if !self.enabled {
            return;
        }
        let (rows, beat) = rows::order(order);
        let ns = order.namespace().unwrap_or_default();
        let owner = Owner {
            experiment: order.spec.experiment_ref.as_ref().map(|e| (ns, e.name.clone())),
            reference: Some(order.object_ref(&())),
        };
        let mut st = self.lock();
        for row in rows {
            self.queue(&mut st, row, owner.clone());
        }
        if let Some(beat) = beat {
            let worker = beat.worker_id.clone();
            let uid = order.uid().unwrap_or_default();
            let contributions = st.workers.entry(worker).or_default();
            contributions.insert(uid, beat);
            if let Some(row) = worker_row(contributions) {
                self.queue(&mut st, Row::Heartbeat(row), Owner::default());
            }
        }
        drop(st);
        self.wake.notify_one();
    }

    /// Records a pod the RunPod account holds.
    pub fn instance(&self, row: InstanceRow) {
        self.queue_all(vec![Row::Instance(row)], &Owner::default());
    }

    /// Records a settings file applied.
    pub fn settings(&self, sha256: String, body: Value, at: DateTime<Utc>) {
        self.queue_all(vec![Row::Settings { sha256, body, at }], &Owner::default());
    }

    /// Forgets what was written, so the next projection of every object rewrites its rows
    /// (after an outage, or to repair a database changed by hand).
    pub fn resync(&self) {
        let mut st = self.lock();
        // A divergent row is reported, not overwritten: its written row stays remembered.
        let keep: std::collections::HashSet<String> =
            st.diverged.keys().map(|(ns, n)| format!("experiment/{ns}/{n}")).collect();
        st.written.retain(|k, _| keep.contains(k));
        let diverged: std::collections::HashSet<(String, String)> = st.diverged.keys().cloned().collect();
        st.written_status.retain(|k, _| diverged.contains(k));
    }

    /// The lag now.
    pub fn lag(&self) -> Lag {
        self.lag.borrow().clone()
    }

    /// Wakes on every change between caught up and behind.
    pub fn subscribe(&self) -> watch::Receiver<Lag> {
        self.lag.subscribe()
    }

    /// The registry's schema was refused (or, with None, accepted at last): every experiment says so.
    pub fn schema_refused(&self, why: Option<String>) {
        self.lag.send_if_modified(|cur| {
            let changed = cur.schema_refused != why;
            cur.schema_refused = why;
            changed
        });
    }

    /// Why the registry does not hold an experiment's rows, if it does not.
    pub fn health(&self, namespace: &str, experiment: &str) -> Option<Blocked> {
        let lag = self.lag();
        if let Some(why) = lag.schema_refused {
            return Some(Blocked::new(Reason::RegistrySchemaRefused, why));
        }
        if let Some(since) = lag.behind_since {
            let msg = format!(
                "{} registry writes wait since {}: {}",
                lag.pending,
                since.to_rfc3339(),
                lag.error.unwrap_or_default()
            );
            return Some(Blocked::new(Reason::RegistryUnavailable, msg));
        }
        let st = self.lock();
        let key = (namespace.to_owned(), experiment.to_owned());
        if let Some(why) = st.diverged.get(&key) {
            return Some(Blocked::new(Reason::RegistryDivergence, why.clone()));
        }
        st.quarantined.get(&key).map(|why| Blocked::new(Reason::RowRefused, why.clone()))
    }

    /// Writes what is queued, once, in batches. Returns false when the database failed.
    pub async fn flush<R: Registry>(&self, registry: &R, events: Option<&Events>) -> bool {
        let mut failure = None;
        let mut oldest = None;
        // Rows that wait for a parent are tried once per flush; the rest do not queue behind them.
        let mut waited = std::collections::HashSet::new();
        loop {
            let mut items: Vec<(u64, Row, Owner, DateTime<Utc>)> = {
                let st = self.lock();
                st.pending
                    .iter()
                    .filter(|(s, _)| !waited.contains(*s))
                    .take(BATCH)
                    .map(|(s, (r, o, at))| (*s, r.clone(), o.clone(), *at))
                    .collect()
            };
            if items.is_empty() {
                break;
            }
            items.sort_by_key(|(seq, row, ..)| (row.rank(), *seq));
            let rows: Vec<Row> = items.iter().map(|(_, r, ..)| r.clone()).collect();
            match registry.write_batch(&rows).await {
                Ok(outcomes) => {
                    for seq in self.settle(&items, outcomes, events).await {
                        waited.insert(seq);
                    }
                }
                Err(e) => {
                    self.metrics.registry_errors.inc();
                    oldest = items.iter().map(|i| i.3).min();
                    failure = Some(e.to_string());
                    break;
                }
            }
        }
        self.publish_lag(failure, oldest)
    }

    /// Applies a batch's outcomes; returns the rows that wait for their parent.
    async fn settle(
        &self,
        items: &[(u64, Row, Owner, DateTime<Utc>)],
        outcomes: Vec<Result<(), RegistryError>>,
        events: Option<&Events>,
    ) -> Vec<u64> {
        let mut waiting = Vec::new();
        let mut refusals = Vec::new();
        {
            let mut st = self.lock();
            for ((seq, row, owner, _), outcome) in items.iter().zip(outcomes) {
                match outcome {
                    Ok(()) => done(&mut st, *seq, row, false),
                    Err(RegistryError::StaleFencingToken { .. }) => {
                        // The split-brain gate refused a stale writer: the row must not land, ever.
                        tracing::warn!(row = %row.key(), "registry refused a stale fencing token; row dropped");
                        done(&mut st, *seq, row, false);
                    }
                    Err(RegistryError::MissingParent { .. }) => waiting.push(*seq),
                    Err(e) => {
                        let why = format!("registry row {} refused: {e}", row.key());
                        tracing::error!(row = %row.key(), error = %e, "registry row quarantined");
                        done(&mut st, *seq, row, true);
                        if let Some(exp) = &owner.experiment {
                            st.quarantined.insert(exp.clone(), why.clone());
                        }
                        refusals.push((owner.reference.clone(), why));
                    }
                }
            }
        }
        for (reference, why) in refusals {
            self.metrics.registry_refused.inc();
            if let (Some(ev), Some(r)) = (events, reference) {
                ev.publish(&r, Reason::RowRefused, "Mirror", &why).await;
            }
        }
        waiting
    }

    fn publish_lag(&self, failure: Option<String>, oldest: Option<DateTime<Utc>>) -> bool {
        let pending = self.lock().pending.len();
        self.metrics.registry_pending.set(i64::try_from(pending).unwrap_or(i64::MAX));
        let ok = failure.is_none();
        let lag = Lag { pending, behind_since: if ok { None } else { oldest }, error: failure, ..Lag::default() };
        let secs = lag.behind_since.map_or(0.0, |t| (Utc::now() - t).num_milliseconds() as f64 / 1000.0);
        self.metrics.registry_lag_seconds.set(secs);
        self.lag.send_if_modified(|cur| {
            let changed = cur.is_behind() != lag.is_behind() || cur.error != lag.error;
            *cur = lag;
            changed
        });
        ok
    }

    /// Writes forever: at once when something is queued, with capped backoff while the database
    /// is down. Rows waiting for a parent get another pass shortly.
    pub async fn run<R: Registry>(self, registry: R, events: Option<Events>) {
        let mut backoff = Duration::from_millis(500);
        let mut next_audit = tokio::time::Instant::now();
        loop {
            if let Some(every) = self.audit_every()
                && tokio::time::Instant::now() >= next_audit
            {
                next_audit = tokio::time::Instant::now() + every;
                if let Err(e) = self.audit(&registry, events.as_ref()).await {
                    tracing::warn!(error = %e, "registry audit failed; tried again at the next one");
                }
            }
            if self.lock().pending.is_empty() {
                let _ = tokio::time::timeout(Duration::from_secs(1), self.wake.notified()).await;
                continue;
            }
            if self.flush(&registry, events.as_ref()).await {
                backoff = Duration::from_millis(500);
                // Rows gather for a moment: a newer version of a row replaces the queued one,
                // and one statement per table carries every experiment that changed meanwhile.
                tokio::time::sleep(COALESCE).await;
            } else {
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(10));
            }
        }
    }
}

/// A row is settled: off the queue (unless a newer one replaced it meanwhile), remembered as
/// written or refused.
fn done(st: &mut State, seq: u64, row: &Row, refused: bool) {
    let key = row.key();
    if st.pending.get(&seq).is_some_and(|(cur, ..)| cur == row) {
        st.pending.remove(&seq);
        st.by_key.remove(&key);
    }
    if refused {
        st.refused.insert(key, row.clone());
    } else {
        st.refused.remove(&key);
        st.written.insert(key, fingerprint(row));
        if let Row::Experiment(e) = row {
            st.written_status.insert((e.namespace.clone(), e.name.clone()), e.status.clone());
        }
    }
}

/// A row's fingerprint: a hash of every field (as `Debug` prints them), computed without
/// building the text.
fn fingerprint(row: &Row) -> u64 {
    use std::hash::Hasher;
    struct Feed(std::hash::DefaultHasher);
    impl std::fmt::Write for Feed {
        fn write_str(&mut self, s: &str) -> std::fmt::Result {
            self.0.write(s.as_bytes());
            Ok(())
        }
    }
    let mut feed = Feed(std::hash::DefaultHasher::new());
    let _ = std::fmt::write(&mut feed, format_args!("{row:?}"));
    feed.0.finish()
}

/// One row per worker: the newest heartbeat of any of its runs, and how many of them are live.
fn worker_row(contributions: &HashMap<String, WorkerBeat>) -> Option<HeartbeatRow> {
    let newest = contributions.values().max_by_key(|b| (b.last_seen, b.seq))?;
    let running = contributions.values().filter(|b| b.running).count();
    Some(HeartbeatRow {
        worker_id: newest.worker_id.clone(),
        last_seen: newest.last_seen,
        running_jobs: i32::try_from(running).unwrap_or(i32::MAX),
        run_id: newest.run_id.clone(),
        pod_id: newest.pod_id.clone(),
        seq: newest.seq,
        pid: newest.pid,
        gpu_ids: newest.gpu_ids.clone(),
        fencing_token: newest.fencing_token,
    })
}

#[cfg(test)]
mod tests;
