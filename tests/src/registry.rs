//! Reading the registry back in tests: rows as text, the shape of one experiment's rows (what an
//! uninterrupted run writes, with names and times taken out), and waits on its status. Called from
//! tests only: a registry that cannot be read fails the test that reads it.

#![allow(clippy::unwrap_used, clippy::panic)]

use std::time::{Duration, Instant};

use serde_json::Value;
use sqlx::Row;

/// Every column of a query's rows as text (NULL as "∅"), in order; nothing before the operator
/// created the schema.
pub async fn rows(url: &str, sql: &str) -> Vec<Vec<String>> {
    let pool = sqlx::PgPool::connect(url).await.unwrap();
    let sql = format!("SELECT to_jsonb(t) FROM ({sql}) t");
    let out = match sqlx::query(sqlx::AssertSqlSafe(sql)).fetch_all(&pool).await {
        Ok(rows) => rows,
        Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("42P01") => vec![],
        Err(e) => panic!("{e}"),
    };
    pool.close().await;
    out.iter()
        .map(|r| {
            let v: Value = r.get(0);
            v.as_object()
                .unwrap()
                .iter()
                .map(|(k, v)| format!("{k}={}", if v.is_null() { "∅".to_owned() } else { v.to_string() }))
                .collect()
        })
        .collect()
}

/// The registry status of an experiment, if it has a row.
pub async fn registry_status(url: &str, name: &str) -> Option<String> {
    let r = rows(url, &format!("SELECT status FROM exp_registry.experiments WHERE name = '{name}'")).await;
    r.first().map(|r| r[0].trim_start_matches("status=").trim_matches('"').to_owned())
}

/// Waits (60 s at most) until the registry shows `want` for the experiment.
pub async fn wait_registry(url: &str, name: &str, want: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while registry_status(url, name).await.as_deref() != Some(want) {
        assert!(Instant::now() < deadline, "registry never showed {name} {want}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The rows one experiment left in the registry, with its name replaced by NAME and every id and
/// time left out: equal for two runs that went the same way.
pub async fn shape(url: &str, name: &str) -> Vec<Vec<String>> {
    let strip = |mut v: Vec<Vec<String>>| {
        for r in &mut v {
            for c in r.iter_mut() {
                *c = c.replace(name, "NAME");
            }
        }
        v
    };
    let mut out = strip(
        rows(
            url,
            &format!(
                "SELECT status, phase, worker_id, attempts, gpu, result_f1, result_auc, extra->'results' AS results, \
             finished_at IS NOT NULL AS finished FROM exp_registry.experiments WHERE name = '{name}'"
            ),
        )
        .await,
    );
    out.extend(strip(
        rows(
            url,
            &format!(
                "SELECT a.attempt, a.status, a.worker_id, a.exit_code, a.reason, a.result_f1, a.result_auc, \
             a.receipt IS NOT NULL AS receipt, a.finished_at IS NOT NULL AS finished FROM exp_registry.attempts a \
             JOIN exp_registry.experiments e ON e.id = a.experiment_id WHERE e.name = '{name}' ORDER BY a.attempt"
            ),
        )
        .await,
    ));
    out.extend(strip(
        rows(
            url,
            &format!(
                "SELECT phase, policy, worker_id, gpu_type_id, approved, reason, deleted_at IS NOT NULL AS deleted \
             FROM exp_registry.orders WHERE name = '{name}-a1'"
            ),
        )
        .await,
    ));
    out.extend(strip(
        rows(
            url,
            &format!(
                "SELECT s.end_reason, s.ended_at IS NOT NULL AS ended FROM exp_registry.worker_sessions s \
             JOIN exp_registry.attempts a ON a.run_id = s.run_id JOIN exp_registry.experiments e \
             ON e.id = a.experiment_id WHERE e.name = '{name}'"
            ),
        )
        .await,
    ));
    out.extend(strip(
        rows(
            url,
            &format!(
                // An experiment Waiting while its order waited out a fault before any pod (and
                // back) is history the fault made, not a difference in where the run ended.
                "SELECT kind, from_phase, to_phase, reason FROM exp_registry.phase_log \
             WHERE name IN ('{name}', '{name}-a1') \
             AND NOT (kind = 'Experiment' AND 'Waiting' IN (from_phase, COALESCE(to_phase, ''))) ORDER BY at, id"
            ),
        )
        .await,
    ));
    out
}
