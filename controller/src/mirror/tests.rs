#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::atomic::{AtomicBool, Ordering};

use super::*;

/// An in-memory registry that can be taken down, recording every write that lands.
#[derive(Default)]
struct Fake {
    down: AtomicBool,
    writes: Mutex<Vec<String>>,
    experiments: Mutex<Vec<String>>,
}

impl Fake {
    fn land(&self, what: String) -> Result<(), RegistryError> {
        if self.down.load(Ordering::SeqCst) {
            return Err(RegistryError::Database(sqlx::Error::PoolTimedOut));
        }
        self.writes.lock().unwrap().push(what);
        Ok(())
    }
}

impl Registry for Fake {
    async fn upsert_experiment(&self, r: &ExperimentRow) -> Result<(), RegistryError> {
        self.land(format!("experiment {} {}", r.name, r.status))?;
        self.experiments.lock().unwrap().push(r.name.clone());
        Ok(())
    }
    async fn upsert_attempt(&self, r: &AttemptRow) -> Result<(), RegistryError> {
        if self.down.load(Ordering::SeqCst) {
            return Err(RegistryError::Database(sqlx::Error::PoolTimedOut));
        }
        if !self.experiments.lock().unwrap().contains(&r.experiment) {
            return Err(RegistryError::MissingParent {
                kind: "experiment",
                namespace: r.namespace.clone(),
                name: r.experiment.clone(),
            });
        }
        if r.fencing_token < 5 {
            return Err(RegistryError::StaleFencingToken {
                run_id: r.run_id.clone(),
                offered: r.fencing_token,
                held: 5,
            });
        }
        self.land(format!("attempt {} {}", r.run_id, r.status))
    }
    async fn upsert_order(&self, r: &OrderRow) -> Result<(), RegistryError> {
        self.land(format!("order {} {}", r.name, r.phase))
    }
    async fn record_heartbeat(&self, r: &HeartbeatRow) -> Result<(), RegistryError> {
        self.land(format!("heartbeat {}", r.worker_id))
    }
    async fn upsert_session(&self, r: &SessionRow) -> Result<(), RegistryError> {
        self.land(format!("session {}", r.run_id))
    }
    async fn upsert_instance(&self, r: &InstanceRow) -> Result<(), RegistryError> {
        self.land(format!("instance {}", r.pod_id))
    }
    async fn record_phase(&self, r: &PhaseChange) -> Result<(), RegistryError> {
        self.land(format!("phase {} {}", r.name, r.to_phase))
    }
    async fn record_progress(&self, r: &ProgressRow) -> Result<(), RegistryError> {
        self.land(format!("progress {} {}", r.run_id, r.step))
    }
    async fn record_settings(&self, sha256: &str, _: &Value, _: DateTime<Utc>) -> Result<(), RegistryError> {
        self.land(format!("settings {sha256}"))
    }
}

fn exp(name: &str, status: &str) -> Write {
    Write::Experiment(ExperimentRow {
        namespace: "ns".into(),
        name: name.into(),
        uid: "u".into(),
        status: status.into(),
        attempts: 1,
        ..ExperimentRow::default()
    })
}

fn attempt(experiment: &str, run: &str, token: i64, status: &str) -> Write {
    Write::Attempt(AttemptRow {
        namespace: "ns".into(),
        experiment: experiment.into(),
        run_id: run.into(),
        attempt: 1,
        fencing_token: token,
        status: status.into(),
        ..AttemptRow::default()
    })
}

#[tokio::test]
async fn writes_wait_while_the_database_is_down_and_land_in_order_when_it_returns() {
    let m = Mirror::new(Arc::new(Metrics::new()));
    let db = Fake::default();
    db.down.store(true, Ordering::SeqCst);
    m.send(exp("a", "READY"));
    m.send(attempt("a", "r1", 9, "CLAIMED"));
    m.send(exp("a", "RUNNING"));
    m.send(attempt("a", "r1", 9, "RUNNING"));
    m.send(exp("a", "COMPLETED"));
    assert!(!m.flush(&db).await);
    let lag = m.lag();
    assert!(lag.is_behind());
    assert_eq!(lag.pending, 2, "coalesced to the newest row per key");
    assert!(lag.error.unwrap().contains("registry unavailable"));
    db.down.store(false, Ordering::SeqCst);
    assert!(m.flush(&db).await);
    assert!(!m.lag().is_behind());
    assert_eq!(m.lag().pending, 0);
    assert_eq!(*db.writes.lock().unwrap(), ["experiment a COMPLETED", "attempt r1 RUNNING"]);
}

#[tokio::test]
async fn a_child_waits_for_its_parent_and_an_unchanged_row_is_not_written_twice() {
    let m = Mirror::new(Arc::new(Metrics::new()));
    let db = Fake::default();
    m.send(attempt("b", "r2", 9, "CLAIMED"));
    assert!(m.flush(&db).await, "a missing parent is not a database failure");
    assert_eq!(m.lag().pending, 1);
    m.send(exp("b", "RUNNING"));
    assert!(m.flush(&db).await);
    assert!(m.flush(&db).await);
    assert_eq!(*db.writes.lock().unwrap(), ["experiment b RUNNING", "attempt r2 CLAIMED"]);
    m.send(exp("b", "RUNNING"));
    assert_eq!(m.lag().pending, 0, "the same row again is skipped");
}

#[tokio::test]
async fn a_stale_fencing_token_never_lands() {
    let m = Mirror::new(Arc::new(Metrics::new()));
    let db = Fake::default();
    m.send(exp("c", "RUNNING"));
    m.send(attempt("c", "r3", 2, "RUNNING"));
    assert!(m.flush(&db).await);
    assert_eq!(m.lag().pending, 0, "dropped, not retried forever");
    assert_eq!(*db.writes.lock().unwrap(), ["experiment c RUNNING"]);
}
