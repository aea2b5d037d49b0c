//! The registry on a fresh throwaway PostgreSQL: migrations are idempotent, rows written through the
//! registry module answer the pipeline's four queries exactly as people type them.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers panic on setup failure by design

use chrono::{DateTime, TimeZone, Utc};
use ep_operator::registry::{
    AttemptRow, ExperimentRow, HeartbeatRow, InstanceRow, OrderRow, PgRegistry, PhaseChange, ProgressRow,
    RegistryError, SessionRow, status,
};
use ep_testkit::postgres::TempPostgres;
use serde_json::json;
use sqlx::Row;

fn t(secs: i64) -> DateTime<Utc> {
    Utc.timestamp_opt(1_764_480_000 + secs, 0).unwrap()
}

fn experiment(name: &str, status: &str) -> ExperimentRow {
    ExperimentRow {
        namespace: "fraud-detect".into(),
        name: name.into(),
        uid: format!("uid-{name}"),
        status: status.into(),
        extra: json!({}),
        ..ExperimentRow::default()
    }
}

fn attempt(run_id: &str, token: i64, status: &str) -> AttemptRow {
    AttemptRow {
        namespace: "fraud-detect".into(),
        experiment: "gnn-fraud-baseline".into(),
        run_id: run_id.into(),
        attempt: 2,
        fencing_token: token,
        status: status.into(),
        order_name: Some("gnn-fraud-baseline-a2".into()),
        worker_id: Some("runpod-1".into()),
        pod_id: Some("5xpma5eg46tqjq".into()),
        pid: Some(4242),
        gpu_id: Some("GPU-e0488b7e".into()),
        lease_expires_at: Some(t(120)),
        exit_code: None,
        reason: None,
        result_f1: None,
        result_auc: None,
        receipt: None,
        cost_usd: None,
        started_at: t(0),
        finished_at: None,
        extra: json!({}),
        reconcile_action: None,
        heartbeat_at: Some(t(90)),
        heartbeat_seq: Some(12),
    }
}

async fn registry(pg: &TempPostgres, db: &str) -> PgRegistry {
    let url = pg.create_database(db).await.unwrap();
    let r = PgRegistry::connect(&url).await.unwrap();
    r.migrate().await.unwrap();
    r
}

#[tokio::test]
async fn migrations_are_idempotent_and_the_pipeline_queries_work_as_written() {
    let pg = TempPostgres::start().unwrap();
    let reg = registry(&pg, "queries").await;
    // Twice more: a no-op, also when run through the binary as an operator would.
    reg.migrate().await.unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_ep-operator"))
        .args(["migrate", "--database-url", &pg.url("queries")])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let applied: i64 = sqlx::query_scalar("SELECT count(*) FROM _sqlx_migrations").fetch_one(reg.pool()).await.unwrap();
    assert_eq!(applied, i64::try_from(ep_operator::registry::pg_migrations().len()).unwrap());

    let mut done = experiment("gnn-fraud-baseline", status::COMPLETED);
    done.result_f1 = Some(0.912);
    done.result_auc = Some(0.968);
    done.attempts = 2;
    done.worker_id = Some("runpod-1".into());
    done.started_at = Some(t(0));
    done.finished_at = Some(t(3600));
    reg.upsert_experiment(&done).await.unwrap();
    let mut running = experiment("gnn-fraud-deep", status::RUNNING);
    running.worker_id = Some("runpod-2".into());
    running.started_at = Some(t(60));
    reg.upsert_experiment(&running).await.unwrap();
    reg.upsert_experiment(&experiment("gnn-fraud-features", status::READY)).await.unwrap();
    // Replaying a write is harmless.
    reg.upsert_experiment(&done).await.unwrap();

    reg.record_heartbeat(&HeartbeatRow {
        worker_id: "runpod-2".into(),
        last_seen: t(100),
        running_jobs: 1,
        run_id: Some("r-deep-a1".into()),
        pod_id: Some("abcdefghijklmn".into()),
        seq: Some(10),
        pid: Some(77),
        gpu_ids: Some("GPU-1".into()),
        fencing_token: Some(1),
    })
    .await
    .unwrap();

    // The four queries of DESIGN.md section 7, character for character.
    let rows = sqlx::query("SELECT name, status FROM exp_registry.experiments WHERE name = 'gnn-fraud-baseline';")
        .fetch_all(reg.pool())
        .await
        .unwrap();
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].get::<String, _>("name"), "gnn-fraud-baseline");
    assert_eq!(rows[0].get::<String, _>("status"), "COMPLETED");

    let rows = sqlx::query("SELECT name, status, result_f1, result_auc FROM exp_registry.experiments ORDER BY name;")
        .fetch_all(reg.pool())
        .await
        .unwrap();
    let got: Vec<(String, String, Option<f64>, Option<f64>)> =
        rows.iter().map(|r| (r.get(0), r.get(1), r.get(2), r.get(3))).collect();
    assert_eq!(
        got,
        vec![
            ("gnn-fraud-baseline".into(), "COMPLETED".into(), Some(0.912), Some(0.968)),
            ("gnn-fraud-deep".into(), "RUNNING".into(), None, None),
            ("gnn-fraud-features".into(), "READY".into(), None, None),
        ]
    );

    let rows =
        sqlx::query("SELECT name, worker_id, started_at FROM exp_registry.experiments WHERE status = 'RUNNING';")
            .fetch_all(reg.pool())
            .await
            .unwrap();
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].get::<String, _>("name"), "gnn-fraud-deep");
    assert_eq!(rows[0].get::<String, _>("worker_id"), "runpod-2");
    assert_eq!(rows[0].get::<DateTime<Utc>, _>("started_at"), t(60));

    let rows = sqlx::query("SELECT worker_id, last_seen, running_jobs FROM exp_registry.worker_heartbeats;")
        .fetch_all(reg.pool())
        .await
        .unwrap();
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].get::<String, _>("worker_id"), "runpod-2");
    assert_eq!(rows[0].get::<DateTime<Utc>, _>("last_seen"), t(100));
    assert_eq!(rows[0].get::<i32, _>("running_jobs"), 1);

    // The same four queries through psql, as people run them.
    let psql = std::process::Command::new("psql")
        .args([&pg.url("queries"), "-X", "-A", "-t", "-c"])
        .arg("SELECT name, status, result_f1, result_auc FROM exp_registry.experiments ORDER BY name;")
        .output();
    if let Ok(out) = psql {
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let text = String::from_utf8(out.stdout).unwrap();
        assert!(text.starts_with("gnn-fraud-baseline|COMPLETED|0.912|0.968\n"), "{text}");
    }
}

#[tokio::test]
async fn every_table_takes_idempotent_writes() {
    let pg = TempPostgres::start().unwrap();
    let reg = registry(&pg, "tables").await;
    reg.upsert_experiment(&experiment("gnn-fraud-baseline", status::RUNNING)).await.unwrap();

    // Attempts: the fencing token only moves forward (db claim gate).
    reg.upsert_attempt(&attempt("r-base-a2", 5, "CLAIMED")).await.unwrap();
    reg.upsert_attempt(&attempt("r-base-a2", 5, "RUNNING")).await.unwrap();
    let err = reg.upsert_attempt(&attempt("r-base-a2", 4, "FAILED")).await.unwrap_err();
    assert!(matches!(err, RegistryError::StaleFencingToken { offered: 4, held: 5, .. }), "{err}");
    let status: String = sqlx::query_scalar("SELECT status FROM exp_registry.attempts WHERE run_id = 'r-base-a2'")
        .fetch_one(reg.pool())
        .await
        .unwrap();
    assert_eq!(status, "RUNNING", "the stale writer changed nothing");
    // An attempt of an experiment the registry does not know is an error, not a silent orphan row.
    let mut stray = attempt("r-x", 1, "CLAIMED");
    stray.experiment = "nope".into();
    assert!(matches!(reg.upsert_attempt(&stray).await.unwrap_err(), RegistryError::MissingParent { .. }));

    let order = OrderRow {
        namespace: "fraud-detect".into(),
        name: "gnn-fraud-baseline-a2".into(),
        uid: "uid-o".into(),
        experiment: Some("gnn-fraud-baseline".into()),
        run_id: Some("r-base-a2".into()),
        attempt: Some(2),
        policy: "paper-train".into(),
        worker_id: "runpod-1".into(),
        provider: "default".into(),
        phase: "RUNNER_ONLINE".into(),
        reason: None,
        approved: true,
        pod_id: Some("5xpma5eg46tqjq".into()),
        gpu_type_id: Some("NVIDIA RTX PRO 4500 Blackwell".into()),
        gpu_display_name: Some("RTX PRO 4500".into()),
        data_center: Some("EU-RO-1".into()),
        cost_per_hr: Some(0.72),
        accrued_usd: Some(1.0),
        deleted_at: None,
        created_at: None,
        approved_by: Some("aster".into()),
        reserved_usd: Some(3.0),
        extra: json!({"terminateAfter": "2026-11-30T20:00:00Z"}),
    };
    reg.upsert_order(&order).await.unwrap();
    reg.upsert_order(&order).await.unwrap();
    // The spend ledger: one row per order and UTC day; an order's rows add up to its totals
    // however often it is written, and spend seen on an earlier day stays on that day.
    sqlx::query(
        "INSERT INTO exp_registry.spend_ledger (order_uid, day, namespace, order_name, reserved_usd, spent_usd) \
         VALUES ('uid-o', '2020-01-15', 'fraud-detect', 'gnn-fraud-baseline-a2', 3.0, 0.25)",
    )
    .execute(reg.pool())
    .await
    .unwrap();
    reg.upsert_order(&OrderRow { accrued_usd: Some(1.75), ..order.clone() }).await.unwrap();
    let days: Vec<(f64, f64)> = sqlx::query_as(
        "SELECT reserved_usd, spent_usd FROM exp_registry.spend_ledger WHERE order_uid = 'uid-o' ORDER BY day",
    )
    .fetch_all(reg.pool())
    .await
    .unwrap();
    assert_eq!(days, vec![(3.0, 0.25), (0.0, 1.5)], "today holds what is not on the earlier day");
    let january: f64 = sqlx::query_scalar(
        "SELECT sum(spent_usd) FROM exp_registry.spend_ledger \
         WHERE namespace = 'fraud-detect' AND day >= '2020-01-01' AND day < '2020-02-01'",
    )
    .fetch_one(reg.pool())
    .await
    .unwrap();
    assert_eq!(january, 0.25, "what the namespace spent in a month, in one query");

    let session = SessionRow {
        worker_id: "runpod-1".into(),
        run_id: "r-base-a2".into(),
        pod_id: None,
        started_at: t(0),
        ended_at: None,
        end_reason: None,
    };
    reg.upsert_session(&session).await.unwrap();
    reg.upsert_session(&SessionRow { ended_at: Some(t(50)), end_reason: Some("COMPLETED".into()), ..session.clone() })
        .await
        .unwrap();
    // A replay of the opening write does not reopen the session.
    reg.upsert_session(&session).await.unwrap();

    let instance = InstanceRow {
        pod_id: "5xpma5eg46tqjq".into(),
        provider: "default".into(),
        pod_name: Some("ep-r-base-a2".into()),
        owner_uid: Some("uid-o".into()),
        run_id: Some("r-base-a2".into()),
        desired_status: Some("RUNNING".into()),
        gpu_type_id: None,
        data_center: Some("EU-RO-1".into()),
        cost_per_hr: Some(0.72),
        accrued_usd: Some(2.0),
        orphan: false,
        seen_at: t(10),
        gone_at: None,
    };
    reg.upsert_instance(&instance).await.unwrap();
    // An older observation arriving late never moves last_seen or spend backwards.
    reg.upsert_instance(&InstanceRow { seen_at: t(5), accrued_usd: Some(1.0), ..instance.clone() }).await.unwrap();

    let change = PhaseChange {
        kind: "RunPodOrder".into(),
        namespace: "fraud-detect".into(),
        name: "gnn-fraud-baseline-a2".into(),
        uid: "uid-o".into(),
        from_phase: Some("VERIFIED".into()),
        to_phase: "RUNNER_ONLINE".into(),
        reason: Some("HeartbeatReceived".into()),
        message: None,
        at: t(30),
    };
    reg.record_phase(&change).await.unwrap();
    reg.record_phase(&change).await.unwrap();

    let progress = ProgressRow {
        run_id: "r-base-a2".into(),
        step: 3,
        total: Some(20),
        metrics: json!({"loss": 0.4}),
        reported_at: t(40),
    };
    reg.record_progress(&progress).await.unwrap();
    reg.record_progress(&progress).await.unwrap();

    reg.record_settings("abc", &json!({"pollInterval": "10s"}), t(1)).await.unwrap();
    reg.record_settings("abc", &json!({"pollInterval": "10s"}), t(2)).await.unwrap();

    let counts: (i64, i64, i64, i64, i64, i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM exp_registry.orders), (SELECT count(*) FROM exp_registry.worker_sessions), \
                (SELECT count(*) FROM exp_registry.provider_instances), (SELECT count(*) FROM exp_registry.phase_log), \
                (SELECT count(*) FROM exp_registry.progress), (SELECT count(*) FROM exp_registry.settings), \
                (SELECT count(*) FROM exp_registry.attempts)",
    )
    .fetch_one(reg.pool())
    .await
    .unwrap();
    assert_eq!(counts, (1, 1, 1, 1, 1, 1, 1), "replays added no rows");

    let (ended, reason): (Option<DateTime<Utc>>, Option<String>) =
        sqlx::query_as("SELECT ended_at, end_reason FROM exp_registry.worker_sessions")
            .fetch_one(reg.pool())
            .await
            .unwrap();
    assert_eq!((ended, reason.as_deref()), (Some(t(50)), Some("COMPLETED")));
    let (last_seen, spent): (DateTime<Utc>, f64) =
        sqlx::query_as("SELECT last_seen, accrued_usd FROM exp_registry.provider_instances")
            .fetch_one(reg.pool())
            .await
            .unwrap();
    assert_eq!((last_seen, spent), (t(10), 2.0));
    let (first, last): (DateTime<Utc>, DateTime<Utc>) =
        sqlx::query_as("SELECT first_applied_at, last_applied_at FROM exp_registry.settings")
            .fetch_one(reg.pool())
            .await
            .unwrap();
    assert_eq!((first, last), (t(1), t(2)));

    // The phase log is append-only.
    let err = sqlx::query("UPDATE exp_registry.phase_log SET reason = 'x'").execute(reg.pool()).await.unwrap_err();
    assert!(err.to_string().contains("append-only"), "{err}");
    // Statuses outside the pipeline's vocabulary are refused by the database itself.
    let err = reg.upsert_experiment(&experiment("typo", "COMPLETE")).await.unwrap_err();
    assert!(err.to_string().contains("experiments_status_check"), "{err}");
}

#[tokio::test]
async fn registry_survives_a_database_restart() {
    let mut pg = TempPostgres::start().unwrap();
    let url = pg.create_database("restart").await.unwrap();
    let reg = PgRegistry::connect_lazy(&url).unwrap();
    reg.migrate().await.unwrap();
    pg.stop().unwrap();
    let err = reg.upsert_experiment(&experiment("a", status::READY)).await.unwrap_err();
    assert_eq!(err.category(), "database");
    pg.restart().unwrap();
    reg.upsert_experiment(&experiment("a", status::READY)).await.unwrap();
    let n: i64 =
        sqlx::query_scalar("SELECT count(*) FROM exp_registry.experiments").fetch_one(reg.pool()).await.unwrap();
    assert_eq!(n, 1);
}

#[tokio::test]
async fn a_batch_writes_every_row_postgres_accepts_and_reports_the_one_it_refuses() {
    use ep_operator::registry::{Registry, Row};
    let pg = TempPostgres::start().unwrap();
    let reg = registry(&pg, "batch").await;
    let mut poisoned = experiment("poisoned", status::COMPLETED);
    poisoned.extra = json!({"results": {"f1\u{0}": 1.0}});
    let rows = [
        Row::Experiment(experiment("gnn-fraud-baseline", status::RUNNING)),
        Row::Experiment(poisoned),
        Row::Attempt(attempt("r-base-a2", 9, "RUNNING")),
        Row::Attempt(attempt("r-orphan-a1", 9, "RUNNING")),
        Row::Experiment(experiment("gnn-fraud-deep", status::READY)),
    ];
    let mut orphan = rows[3].clone();
    if let Row::Attempt(a) = &mut orphan {
        a.experiment = "never-mirrored".into();
    }
    let rows = [rows[..3].to_vec(), vec![orphan, rows[4].clone()]].concat();
    let outcomes = reg.write_batch(&rows).await.unwrap();
    let kinds: Vec<&str> = outcomes
        .iter()
        .map(|o| o.as_ref().map_or_else(ep_operator::registry::RegistryError::category, |()| "ok"))
        .collect();
    assert_eq!(kinds, ["ok", "refused", "ok", "missing_parent", "ok"]);
    let names: Vec<String> = sqlx::query_scalar("SELECT name FROM exp_registry.experiments ORDER BY name")
        .fetch_all(reg.pool())
        .await
        .unwrap();
    assert_eq!(names, ["gnn-fraud-baseline", "gnn-fraud-deep"], "the refused row kept nothing else out");
    let attempts: i64 =
        sqlx::query_scalar("SELECT count(*) FROM exp_registry.attempts").fetch_one(reg.pool()).await.unwrap();
    assert_eq!(attempts, 1);
}

const PIPELINE: &str = include_str!("../../tests/fixtures/pipeline/registry.sql");

async fn seeded(pg: &TempPostgres, db: &str, sql: &str) -> String {
    let url = pg.create_database(db).await.unwrap();
    ep_testkit::stack::seed_database(&url, sql).await.unwrap();
    url
}

fn migrate_command(url: &str) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_ep-operator"))
        .args(["migrate", "--database-url", url])
        .output()
        .unwrap()
}

#[tokio::test]
async fn the_pipelines_own_registry_is_adopted_twice_alike_and_takes_the_operators_writes() {
    let pg = TempPostgres::start().unwrap();
    let url = seeded(&pg, "pipeline", PIPELINE).await;
    for _ in 0..2 {
        let out = migrate_command(&url);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    }
    let reg = PgRegistry::connect(&url).await.unwrap();
    let old: Vec<(String, String)> =
        sqlx::query_as("SELECT name, status FROM exp_registry.experiments WHERE namespace = '' ORDER BY name")
            .fetch_all(reg.pool())
            .await
            .unwrap();
    assert_eq!(old.len(), 4, "{old:?}");
    let mut done = experiment("gnn-fraud-v2", status::COMPLETED);
    done.result_f1 = Some(0.93);
    reg.upsert_experiment(&done).await.unwrap();
    reg.upsert_attempt(&AttemptRow { experiment: "gnn-fraud-v2".into(), ..attempt("r-v2-a1", 1, "SUCCEEDED") })
        .await
        .unwrap();
    reg.record_heartbeat(&HeartbeatRow {
        worker_id: "runpod-2".into(),
        last_seen: t(100),
        running_jobs: 1,
        run_id: Some("r-v2-a1".into()),
        pod_id: None,
        seq: Some(1),
        pid: None,
        gpu_ids: None,
        fencing_token: Some(1),
    })
    .await
    .unwrap();
    let n: i64 =
        sqlx::query_scalar("SELECT count(*) FROM exp_registry.experiments").fetch_one(reg.pool()).await.unwrap();
    assert_eq!(n, 5);
    let beats: i64 =
        sqlx::query_scalar("SELECT count(*) FROM exp_registry.worker_heartbeats").fetch_one(reg.pool()).await.unwrap();
    assert_eq!(beats, 2, "the pipeline's worker row was updated, not duplicated");
}

#[tokio::test]
async fn a_registry_that_needs_converting_is_refused_by_name_and_left_as_it_was() {
    let pg = TempPostgres::start().unwrap();
    let seed = PIPELINE.replace("result_f1   double precision", "result_f1   text");
    let url = seeded(&pg, "converting", &seed).await;
    let out = migrate_command(&url);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("exp_registry.experiments.result_f1 is text; the operator writes double precision"), "{err}");
    let pool = sqlx::PgPool::connect(&url).await.unwrap();
    let cols: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM information_schema.columns WHERE table_schema = 'exp_registry' AND table_name = 'experiments'",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(cols, 6, "no column added");
    let tables: i64 =
        sqlx::query_scalar("SELECT count(*) FROM information_schema.tables WHERE table_schema = 'exp_registry'")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(tables, 2, "no table created");
}

#[tokio::test]
async fn two_replicas_migrating_one_fresh_database_at_once_both_succeed() {
    let pg = TempPostgres::start().unwrap();
    let url = pg.create_database("race").await.unwrap();
    let (a, b) = (PgRegistry::connect(&url).await.unwrap(), PgRegistry::connect(&url).await.unwrap());
    let (ra, rb) = tokio::join!(a.migrate(), b.migrate());
    ra.unwrap();
    rb.unwrap();
    let applied: i64 = sqlx::query_scalar("SELECT count(*) FROM _sqlx_migrations").fetch_one(a.pool()).await.unwrap();
    assert_eq!(applied, i64::try_from(ep_operator::registry::pg_migrations().len()).unwrap());
}

#[test]
fn no_migration_drops_or_rewrites_data() {
    for m in ep_operator::registry::pg_migrations() {
        for (i, line) in m.1.lines().enumerate() {
            let l = line.trim().to_ascii_uppercase();
            if l.starts_with("--") {
                continue;
            }
            for bad in ["DROP TABLE", "DROP COLUMN", "DROP SCHEMA", "TRUNCATE", "DELETE FROM", " TYPE ", "RENAME"] {
                assert!(!l.contains(bad), "migration {} line {}: {bad} would drop or rewrite data: {line}", m.0, i + 1);
            }
        }
    }
}

/// The health viewer reads the registry through the read-only role the migrations make, and can
/// change nothing in it.
#[tokio::test]
async fn a_member_of_the_reader_role_reads_every_table_and_writes_none() {
    let pg = TempPostgres::start().unwrap();
    let db = "readers";
    let reg = registry(&pg, db).await;
    reg.upsert_experiment(&experiment("visible", "RUNNING")).await.unwrap();
    sqlx::raw_sql("CREATE ROLE finch LOGIN IN ROLE exp_registry_reader").execute(reg.pool()).await.unwrap();
    let finch = sqlx::PgPool::connect(&pg.url(db).replace("postgres@", "finch@")).await.unwrap();
    let tables: Vec<String> = sqlx::query_scalar(
        "SELECT table_name::text FROM information_schema.tables WHERE table_schema = 'exp_registry' ORDER BY 1",
    )
    .fetch_all(reg.pool())
    .await
    .unwrap();
    assert!(tables.len() >= 4, "{tables:?}");
    for t in &tables {
        let sql = format!("SELECT count(*) FROM exp_registry.{t}");
        sqlx::query_scalar::<_, i64>(sqlx::AssertSqlSafe(sql)).fetch_one(&finch).await.unwrap();
    }
    let status: String = sqlx::query_scalar("SELECT status FROM exp_registry.experiments WHERE name = 'visible'")
        .fetch_one(&finch)
        .await
        .unwrap();
    assert_eq!(status, "RUNNING");
    for write in [
        "UPDATE exp_registry.experiments SET status = 'COMPLETED'",
        "DELETE FROM exp_registry.experiments",
        "CREATE TABLE exp_registry.mine (x int)",
    ] {
        let err = sqlx::raw_sql(write).execute(&finch).await.unwrap_err().to_string();
        assert!(err.contains("permission denied"), "{write}: {err}");
    }
    // A migration run again (a restart) keeps the grants.
    reg.migrate().await.unwrap();
    sqlx::query_scalar::<_, i64>("SELECT count(*) FROM exp_registry.attempts").fetch_one(&finch).await.unwrap();
}

#[tokio::test]
async fn a_batch_of_many_experiments_costs_one_statement_per_table_and_keeps_every_guard() {
    use ep_operator::registry::{Registry, Row};
    let pg = TempPostgres::start().unwrap();
    let reg = registry(&pg, "bulk").await;
    // An earlier claim of run b000-a1 holds token 9: the batch's token 5 for it is stale.
    reg.upsert_experiment(&experiment("b000", status::RUNNING)).await.unwrap();
    let held = AttemptRow { experiment: "b000".into(), ..attempt("b000-a1", 9, "RUNNING") };
    reg.upsert_attempt(&held).await.unwrap();
    let mut rows = vec![];
    for i in 0..50 {
        let name = format!("b{i:03}");
        let run = format!("{name}-a1");
        let order = format!("{name}-a1");
        rows.push(Row::Experiment(ExperimentRow { attempts: 1, ..experiment(&name, status::RUNNING) }));
        let a = AttemptRow { experiment: name.clone(), attempt: 1, ..attempt(&run, 5, "RUNNING") };
        rows.push(Row::Attempt(a));
        rows.push(Row::Order(OrderRow {
            namespace: "fraud-detect".into(),
            name: order.clone(),
            uid: format!("uid-{order}"),
            experiment: Some(name.clone()),
            run_id: Some(run.clone()),
            attempt: Some(1),
            policy: "smoke".into(),
            worker_id: "runpod-1".into(),
            provider: "default".into(),
            phase: "RUNNER_ONLINE".into(),
            reason: None,
            approved: false,
            approved_by: None,
            reserved_usd: Some(0.5),
            pod_id: Some(format!("pod{i}")),
            gpu_type_id: None,
            gpu_display_name: None,
            data_center: None,
            cost_per_hr: Some(0.5),
            accrued_usd: Some(0.01 * f64::from(i)),
            deleted_at: None,
            created_at: None,
            extra: json!({}),
        }));
        rows.push(Row::Phase(PhaseChange {
            kind: "RunPodOrder".into(),
            namespace: "fraud-detect".into(),
            name: order.clone(),
            uid: format!("uid-{order}"),
            from_phase: Some("VERIFIED".into()),
            to_phase: "RUNNER_ONLINE".into(),
            reason: None,
            message: None,
            at: t(i64::from(i)),
        }));
        rows.push(Row::Session(SessionRow {
            worker_id: format!("w{i}"),
            run_id: run.clone(),
            pod_id: Some(format!("pod{i}")),
            started_at: t(0),
            ended_at: None,
            end_reason: None,
        }));
        rows.push(Row::Progress(ProgressRow {
            run_id: run.clone(),
            step: 1,
            total: Some(3),
            metrics: json!({"loss": 0.5}),
            reported_at: t(5),
        }));
    }
    let mut stray = attempt("nowhere-a1", 1, "CLAIMED");
    stray.experiment = "never-mirrored".into();
    rows.push(Row::Attempt(stray));
    rows.sort_by_key(Row::rank);
    sqlx::query("CREATE EXTENSION IF NOT EXISTS pg_stat_statements").execute(reg.pool()).await.unwrap();
    sqlx::query("SELECT pg_stat_statements_reset()").execute(reg.pool()).await.unwrap();
    let outcomes = reg.write_batch(&rows).await.unwrap();
    let statements: i64 = sqlx::query_scalar(
        "SELECT sum(calls)::bigint FROM pg_stat_statements s JOIN pg_database d ON d.oid = s.dbid \
         WHERE d.datname = 'bulk' AND s.query NOT ILIKE '%pg_stat_statements%'",
    )
    .fetch_one(reg.pool())
    .await
    .unwrap();
    assert!(statements <= 12, "{statements} statements for {} rows", rows.len());
    let refused: Vec<(&Row, &str)> =
        rows.iter().zip(&outcomes).filter_map(|(r, o)| o.as_ref().err().map(|e| (r, e.category()))).collect();
    let refused: Vec<(String, &str)> = refused.into_iter().map(|(r, c)| (r.key(), c)).collect();
    assert_eq!(
        refused,
        [("attempt/b000-a1".to_owned(), "stale_fencing_token"), ("attempt/nowhere-a1".to_owned(), "missing_parent")]
    );
    let pool = reg.pool().clone();
    let count = |sql: &'static str| {
        let pool = pool.clone();
        async move { sqlx::query_scalar::<_, i64>(sql).fetch_one(&pool).await.unwrap() }
    };
    assert_eq!(count("SELECT count(*) FROM exp_registry.experiments").await, 50);
    assert_eq!(count("SELECT count(*) FROM exp_registry.attempts WHERE fencing_token = 5").await, 49);
    assert_eq!(count("SELECT fencing_token FROM exp_registry.attempts WHERE run_id = 'b000-a1'").await, 9);
    assert_eq!(count("SELECT count(*) FROM exp_registry.orders WHERE experiment_id IS NOT NULL").await, 50);
    assert_eq!(count("SELECT count(*) FROM exp_registry.phase_log").await, 50);
    assert_eq!(count("SELECT count(*) FROM exp_registry.worker_sessions").await, 50);
    assert_eq!(count("SELECT count(*) FROM exp_registry.progress").await, 50, "every run's progress");
    let spent: f64 =
        sqlx::query_scalar("SELECT sum(spent_usd) FROM exp_registry.spend_ledger").fetch_one(reg.pool()).await.unwrap();
    assert!((spent - 12.25).abs() < 1e-9, "the ledger holds every order's spend: {spent}");
}
