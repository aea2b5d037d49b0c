#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::atomic::{AtomicBool, Ordering};

use ep_api::experiment::{ExperimentPhase, ExperimentTransition};
use ep_api::order::{HeartbeatStatus, OrderPhase, OutcomeState, PhaseTransition, RunOutcome};
use ep_api::{ExperimentStatus, RunPodOrderStatus};

use super::*;
use crate::time;

/// An in-memory registry that can be taken down, refusing rows whose text holds a chosen word
/// (as PostgreSQL refuses U+0000), and recording every row that lands.
#[derive(Default)]
struct Fake {
    down: AtomicBool,
    landed: Mutex<Vec<String>>,
    refuse: Mutex<Option<String>>,
    /// What `experiment_statuses` answers (the table as a person may have edited it).
    held: Mutex<Vec<(String, String, String)>>,
}

fn describe(row: &Row) -> String {
    match row {
        Row::Experiment(r) => format!("experiment {} {}", r.name, r.status),
        Row::Attempt(r) => format!("attempt {} {}", r.run_id, r.status),
        Row::Order(r) => format!("order {} {}", r.name, r.phase),
        Row::Heartbeat(r) => format!("heartbeat {} {}", r.worker_id, r.running_jobs),
        Row::Session(r) => format!("session {}", r.run_id),
        Row::Instance(r) => format!("instance {}", r.pod_id),
        Row::Phase(r) => format!("phase {} {}", r.name, r.to_phase),
        Row::Progress(r) => format!("progress {} {}", r.run_id, r.step),
        Row::Settings { sha256, .. } => format!("settings {sha256}"),
    }
}

impl Registry for Fake {
    async fn experiment_statuses(&self) -> Result<Vec<(String, String, String)>, RegistryError> {
        Ok(self.held.lock().unwrap().clone())
    }
    async fn write_batch(&self, rows: &[Row]) -> Result<Vec<Result<(), RegistryError>>, RegistryError> {
        if self.down.load(Ordering::SeqCst) {
            return Err(RegistryError::Database(sqlx::Error::PoolTimedOut));
        }
        let refuse = self.refuse.lock().unwrap().clone();
        let mut landed = self.landed.lock().unwrap();
        let mut out = Vec::new();
        for row in rows {
            let text = describe(row);
            let parent_missing = match row {
                Row::Attempt(a) => !landed.iter().any(|l| l.starts_with(&format!("experiment {} ", a.experiment))),
                _ => false,
            };
            out.push(if parent_missing {
                Err(RegistryError::MissingParent { kind: "experiment", namespace: String::new(), name: String::new() })
            } else if matches!(row, Row::Attempt(a) if a.fencing_token < 5) {
                Err(RegistryError::StaleFencingToken { run_id: String::new(), offered: 1, held: 5 })
            } else if refuse.as_ref().is_some_and(|w| format!("{row:?}").contains(w.as_str())) {
                Err(RegistryError::Refused("unsupported Unicode escape sequence (SQLSTATE 22P05)".into()))
            } else {
                landed.push(text);
                Ok(())
            });
        }
        Ok(out)
    }
}

fn projector() -> Projector {
    Projector::new(Arc::new(Metrics::new()), true)
}

fn at(s: i64) -> k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime {
    time::to_micro(DateTime::from_timestamp(1_800_000_000 + s, 0).unwrap())
}

fn exp(name: &str, phase: ExperimentPhase, registry: &str) -> Experiment {
    let mut e = crate::fixtures::quickstart();
    e.metadata.name = Some(name.into());
    e.metadata.uid = Some(format!("uid-{name}"));
    e.status = Some(ExperimentStatus {
        phase: Some(phase),
        registry_status: Some(registry.into()),
        attempts: 1,
        transitions: vec![ExperimentTransition { phase, at: at(0), reason: Some("AttemptClaimed".into()) }],
        ..ExperimentStatus::default()
    });
    e
}

fn order(exp: &str, uid: &str, phase: OrderPhase, token: i64) -> RunPodOrder {
    let mut o = crate::fixtures::quickstart_order(&format!("{exp}-a1"), 1);
    o.metadata.uid = Some(uid.into());
    o.spec.experiment_ref = Some(ep_api::order::ExperimentRef { name: exp.into() });
    let phases = [
        OrderPhase::Requested,
        OrderPhase::Verified,
        OrderPhase::RunnerOnline,
        OrderPhase::Draining,
        OrderPhase::Deleted,
    ];
    let upto = phases.iter().position(|p| *p == phase).unwrap();
    o.status = Some(RunPodOrderStatus {
        phase: Some(phase),
        run_id: Some(format!("{exp}-run")),
        fencing_token: Some(token),
        online_at: (upto >= 2).then(|| time::to_k8s(DateTime::from_timestamp(1_800_000_002, 0).unwrap())),
        heartbeat: (upto >= 2).then(|| HeartbeatStatus {
            time: time::to_k8s(DateTime::from_timestamp(1_800_000_003, 0).unwrap()),
            seq: 3,
            pid: Some(7),
            gpu_ids: None,
            lease_expires_at: None,
            runner: None,
        }),
        transitions: phases[..=upto]
            .iter()
            .enumerate()
            .map(|(i, p)| PhaseTransition { phase: *p, at: at(i64::try_from(i).unwrap()), reason: None })
            .collect(),
        ..RunPodOrderStatus::default()
    });
    o
}

fn landed(db: &Fake) -> Vec<String> {
    db.landed.lock().unwrap().clone()
}

#[tokio::test]
async fn rows_wait_while_the_database_is_down_and_land_parents_first_when_it_returns() {
    let p = projector();
    let db = Fake::default();
    db.down.store(true, Ordering::SeqCst);
    p.order(&order("a", "o1", OrderPhase::Verified, 9));
    p.experiment(&exp("a", ExperimentPhase::Running, "RUNNING"));
    p.experiment(&exp("a", ExperimentPhase::Succeeded, "COMPLETED"));
    assert!(!p.flush(&db, None).await);
    let lag = p.lag();
    assert!(lag.is_behind() && lag.error.unwrap().contains("registry unavailable"));
    assert!(p.health("ep-quickstart", "a").is_some_and(|b| b.reason == Reason::RegistryUnavailable));
    db.down.store(false, Ordering::SeqCst);
    assert!(p.flush(&db, None).await);
    assert_eq!(p.lag().pending, 0);
    let rows = landed(&db);
    assert_eq!(rows[0], "experiment a COMPLETED", "coalesced to the newest, and parents first: {rows:?}");
    assert!(rows.contains(&"attempt a-run CLAIMED".to_owned()), "{rows:?}");
    assert!(p.health("ep-quickstart", "a").is_none());
}

#[tokio::test]
async fn an_unchanged_object_is_not_written_twice_and_a_resync_rewrites_it() {
    let p = projector();
    let db = Fake::default();
    let e = exp("b", ExperimentPhase::Running, "RUNNING");
    p.experiment(&e);
    assert!(p.flush(&db, None).await);
    let first = landed(&db).len();
    p.experiment(&e);
    assert_eq!(p.lag().pending, 0, "the same rows again are skipped");
    p.resync();
    p.experiment(&e);
    assert!(p.flush(&db, None).await);
    assert_eq!(landed(&db).len(), first * 2, "a resync writes every row again (idempotent upserts)");
}

#[tokio::test]
async fn a_child_waits_for_its_parent_and_a_stale_token_never_lands() {
    let p = projector();
    let db = Fake::default();
    p.order(&order("c", "o3", OrderPhase::Verified, 9));
    assert!(p.flush(&db, None).await, "a missing parent is not a database failure");
    assert!(!landed(&db).iter().any(|r| r.starts_with("attempt")));
    p.experiment(&exp("c", ExperimentPhase::Running, "RUNNING"));
    assert!(p.flush(&db, None).await);
    assert!(p.flush(&db, None).await);
    assert!(landed(&db).contains(&"attempt c-run CLAIMED".to_owned()));
    p.order(&order("c", "o3", OrderPhase::RunnerOnline, 2));
    assert!(p.flush(&db, None).await);
    assert!(!landed(&db).contains(&"attempt c-run RUNNING".to_owned()), "stale writer dropped");
    assert_eq!(p.lag().pending, 0, "dropped, not retried forever");
}

#[tokio::test]
async fn a_row_postgres_refuses_is_quarantined_and_keeps_no_other_row_out() {
    let p = projector();
    let db = Fake::default();
    *db.refuse.lock().unwrap() = Some("poison".into());
    let mut bad = exp("poison", ExperimentPhase::Succeeded, "COMPLETED");
    bad.status.as_mut().unwrap().results = Some([("f1\u{0}".to_owned(), 1.0)].into_iter().collect());
    p.experiment(&bad);
    p.experiment(&exp("healthy", ExperimentPhase::Succeeded, "COMPLETED"));
    assert!(p.flush(&db, None).await, "a refused row is not an outage");
    assert!(landed(&db).contains(&"experiment healthy COMPLETED".to_owned()));
    assert_eq!(p.lag().pending, 0, "quarantined, not retried as it is");
    let why = p.health("ep-quickstart", "poison").unwrap();
    assert_eq!(why.reason, Reason::RowRefused);
    assert!(why.message.contains("22P05"), "{}", why.message);
    assert!(p.health("ep-quickstart", "healthy").is_none(), "only its own object says so");
    // The quarantine holds across projections of the same content.
    p.experiment(&bad);
    assert_eq!(p.lag().pending, 0);
}

#[tokio::test]
async fn a_worker_row_counts_its_live_runs() {
    let p = projector();
    let db = Fake::default();
    p.experiment(&exp("x", ExperimentPhase::Running, "RUNNING"));
    p.experiment(&exp("y", ExperimentPhase::Running, "RUNNING"));
    p.order(&order("x", "ox", OrderPhase::RunnerOnline, 9));
    p.order(&order("y", "oy", OrderPhase::RunnerOnline, 9));
    assert!(p.flush(&db, None).await);
    assert!(landed(&db).contains(&"heartbeat runpod-1 2".to_owned()), "{:?}", landed(&db));
    p.order(&order("x", "ox", OrderPhase::Deleted, 9));
    assert!(p.flush(&db, None).await);
    assert_eq!(landed(&db).iter().rfind(|r| r.starts_with("heartbeat")).unwrap(), "heartbeat runpod-1 1");
}

#[test]
fn rows_are_derived_from_status_alone_and_text_postgres_cannot_store_is_cleaned() {
    let mut o = order("d", "od", OrderPhase::Deleted, 9);
    let st = o.status.as_mut().unwrap();
    st.outcome = Some(RunOutcome {
        state: OutcomeState::Succeeded,
        reason: "RunFinished".into(),
        message: None,
        exit_code: Some(0),
        metrics: [("f1".to_owned(), 0.9)].into_iter().collect(),
        artifacts: None,
        usage: None,
        retention: None,
        finished_at: time::to_k8s(DateTime::from_timestamp(1_800_000_009, 0).unwrap()),
    });
    let (a, _) = rows::order(&o);
    let (b, _) = rows::order(&o);
    assert_eq!(a, b, "the same object gives the same rows");
    let names: Vec<String> = a.iter().map(describe).collect();
    assert!(names.contains(&"attempt d-run SUCCEEDED".to_owned()), "{names:?}");
    let phases: Vec<&String> = names.iter().filter(|n| n.starts_with("phase")).collect();
    assert_eq!(phases.len(), 5);
    assert_eq!(
        rows::clean_json(serde_json::json!({"a\u{0}": ["b\u{0}"]})),
        serde_json::json!({"a\u{FFFD}": ["b\u{FFFD}"]})
    );
}

#[tokio::test]
async fn a_row_that_diverges_from_the_cluster_is_reported_on_its_experiment_and_not_overwritten() {
    let p = projector();
    let db = Fake::default();
    let e = exp("c", ExperimentPhase::Running, "RUNNING");
    p.experiment(&e);
    assert!(p.flush(&db, None).await);
    p.audit_against(
        Arc::new(|| [("ep-quickstart".to_owned(), "c".to_owned())].into_iter().collect()),
        Duration::from_secs(1),
    );
    // Someone marked the live run COMPLETED by hand.
    *db.held.lock().unwrap() = vec![("ep-quickstart".into(), "c".into(), "COMPLETED".into())];
    p.audit(&db, None).await.unwrap();
    let why = p.health("ep-quickstart", "c").unwrap();
    assert_eq!(why.reason, Reason::RegistryDivergence);
    assert!(why.message.contains("says COMPLETED and the cluster says RUNNING"), "{}", why.message);
    assert_eq!(p.lag().divergences, 1);
    // The periodic resync does not silently put it back.
    let writes = |db: &Fake| landed(db).iter().filter(|r| r.starts_with("experiment c ")).count();
    let before = writes(&db);
    p.resync();
    p.experiment(&e);
    assert!(p.flush(&db, None).await);
    assert_eq!(writes(&db), before, "the divergent row is left for a person");
    // Corrected by hand: the report goes.
    *db.held.lock().unwrap() = vec![("ep-quickstart".into(), "c".into(), "RUNNING".into())];
    p.audit(&db, None).await.unwrap();
    assert!(p.health("ep-quickstart", "c").is_none());
    assert_eq!(p.lag().divergences, 0);
}
