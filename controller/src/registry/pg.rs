//! The PostgreSQL registry (sqlx, runtime-checked queries so builds need no database).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::postgres::PgPoolOptions;
use sqlx::{PgConnection, PgPool};

use super::{
    AttemptRow, ExperimentRow, HeartbeatRow, InstanceRow, OrderRow, PhaseChange, ProgressRow, Registry, RegistryError,
    Row, SessionRow,
};

/// Migrations of schema `exp_registry`, embedded at build time.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../migrations");

/// The registry on a PostgreSQL pool.
#[derive(Clone, Debug)]
pub struct PgRegistry {
    pub(super) pool: PgPool,
    /// Experiment ids by (namespace, name): children look their parent up once.
    pub(super) ids: Arc<Mutex<HashMap<(String, String), i64>>>,
}

impl PgRegistry {
    /// Connects lazily: the operator starts and reconciles even while the database is down.
    pub fn connect_lazy(url: &str) -> Result<Self, RegistryError> {
        let pool = PgPoolOptions::new().max_connections(4).acquire_timeout(Duration::from_secs(5)).connect_lazy(url)?;
        Ok(Self { pool, ids: Arc::default() })
    }

    /// Connects now, failing if the database does not answer.
    pub async fn connect(url: &str) -> Result<Self, RegistryError> {
        let pool =
            PgPoolOptions::new().max_connections(4).acquire_timeout(Duration::from_secs(10)).connect(url).await?;
        Ok(Self { pool, ids: Arc::default() })
    }

    /// Adopts what the database holds and applies pending migrations (under PostgreSQL's advisory
    /// lock, so replicas never race); applying twice is a no-op.
    pub async fn migrate(&self) -> Result<(), RegistryError> {
        super::schema::migrate(&self.pool).await
    }

    /// The pool, for queries the registry does not wrap.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    async fn experiment_id(&self, c: &mut PgConnection, namespace: &str, name: &str) -> Result<i64, RegistryError> {
        let key = (namespace.to_owned(), name.to_owned());
        if let Some(id) = self.ids.lock().unwrap_or_else(PoisonError::into_inner).get(&key) {
            return Ok(*id);
        }
        let id: i64 = sqlx::query_scalar("SELECT id FROM exp_registry.experiments WHERE namespace = $1 AND name = $2")
            .bind(namespace)
            .bind(name)
            .fetch_optional(&mut *c)
            .await?
            .ok_or_else(|| RegistryError::MissingParent {
                kind: "experiment",
                namespace: namespace.into(),
                name: name.into(),
            })?;
        self.ids.lock().unwrap_or_else(PoisonError::into_inner).insert(key, id);
        Ok(id)
    }

    /// Forgets cached parent ids (after a write failed: the database may have been replaced).
    fn forget_ids(&self) {
        self.ids.lock().unwrap_or_else(PoisonError::into_inner).clear();
    }

    async fn apply(&self, c: &mut PgConnection, row: &Row) -> Result<(), RegistryError> {
        match row {
            Row::Experiment(r) => self.experiment(c, r).await,
            Row::Attempt(r) => self.attempt(c, r).await,
            Row::Order(r) => self.order(c, r).await,
            Row::Heartbeat(r) => heartbeat(c, r).await,
            Row::Session(r) => session(c, r).await,
            Row::Instance(r) => instance(c, r).await,
            Row::Phase(r) => phase(c, r).await,
            Row::Progress(r) => progress(c, r).await,
            Row::Settings { sha256, body, at } => super::bulk::settings(c, sha256, body, *at).await,
        }
    }

    /// Every row in one transaction; when one is refused, the batch is redone row by row under
    /// savepoints so only that row stays out.
    async fn batch(&self, rows: &[Row], isolate: bool) -> Result<Vec<Result<(), RegistryError>>, RegistryError> {
        let mut tx = self.pool.begin().await?;
        let mut out = Vec::with_capacity(rows.len());
        for row in rows {
            if isolate {
                sqlx::query("SAVEPOINT row").execute(&mut *tx).await?;
            }
            match self.apply(&mut tx, row).await {
                Ok(()) => {
                    if isolate {
                        sqlx::query("RELEASE SAVEPOINT row").execute(&mut *tx).await?;
                    }
                    out.push(Ok(()));
                }
                Err(e) if e.is_row_level() && (isolate || !aborts(&e)) => {
                    if isolate {
                        sqlx::query("ROLLBACK TO SAVEPOINT row").execute(&mut *tx).await?;
                    }
                    out.push(Err(e));
                }
                Err(e) if e.is_row_level() => return Err(e),
                Err(e) => {
                    self.forget_ids();
                    return Err(e);
                }
            }
        }
        tx.commit().await?;
        Ok(out)
    }
}

/// Whether an error left the transaction aborted (PostgreSQL refused a statement).
fn aborts(e: &RegistryError) -> bool {
    !matches!(e, RegistryError::StaleFencingToken { .. })
        && !matches!(e, RegistryError::MissingParent { kind: "experiment", .. })
}

impl Registry for PgRegistry {
    async fn write_batch(&self, rows: &[Row]) -> Result<Vec<Result<(), RegistryError>>, RegistryError> {
        match self.bulk(rows).await {
            // A row PostgreSQL refused spoils its kind's statement: row by row under savepoints,
            // only that row stays out.
            Err(e) if e.is_row_level() => self.batch(rows, true).await,
            Err(e) => {
                self.forget_ids();
                Err(e)
            }
            ok => ok,
        }
    }

    async fn experiment_statuses(&self) -> Result<Vec<(String, String, String)>, RegistryError> {
        Ok(sqlx::query_as("SELECT namespace, name, status FROM exp_registry.experiments").fetch_all(&self.pool).await?)
    }
}

/// One row at a time, outside any batch (tools and tests).
impl PgRegistry {
    pub async fn upsert_experiment(&self, r: &ExperimentRow) -> Result<(), RegistryError> {
        let mut c = self.pool.acquire().await?;
        self.experiment(&mut c, r).await
    }
    pub async fn upsert_attempt(&self, r: &AttemptRow) -> Result<(), RegistryError> {
        let mut c = self.pool.acquire().await?;
        self.attempt(&mut c, r).await
    }
    pub async fn upsert_order(&self, r: &OrderRow) -> Result<(), RegistryError> {
        let mut c = self.pool.acquire().await?;
        self.order(&mut c, r).await
    }
    pub async fn record_heartbeat(&self, r: &HeartbeatRow) -> Result<(), RegistryError> {
        let mut c = self.pool.acquire().await?;
        heartbeat(&mut c, r).await
    }
    pub async fn upsert_session(&self, r: &SessionRow) -> Result<(), RegistryError> {
        let mut c = self.pool.acquire().await?;
        session(&mut c, r).await
    }
    pub async fn upsert_instance(&self, r: &InstanceRow) -> Result<(), RegistryError> {
        let mut c = self.pool.acquire().await?;
        instance(&mut c, r).await
    }
    pub async fn record_phase(&self, r: &PhaseChange) -> Result<(), RegistryError> {
        let mut c = self.pool.acquire().await?;
        phase(&mut c, r).await
    }
    pub async fn record_progress(&self, r: &ProgressRow) -> Result<(), RegistryError> {
        let mut c = self.pool.acquire().await?;
        progress(&mut c, r).await
    }
    pub async fn record_settings(&self, sha256: &str, body: &Value, at: DateTime<Utc>) -> Result<(), RegistryError> {
        let mut c = self.pool.acquire().await?;
        super::bulk::settings(&mut c, sha256, body, at).await
    }
}

impl PgRegistry {
    async fn experiment(&self, c: &mut PgConnection, r: &ExperimentRow) -> Result<(), RegistryError> {
        sqlx::query(
            "INSERT INTO exp_registry.experiments (namespace, name, uid, status, phase, worker_id, current_run_id, \
               attempts, gpu, result_f1, result_auc, cost_usd, started_at, finished_at, extra, updated_at, created_at, \
               approved_by, approved_at, approval_envelope) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, now(), COALESCE($16, now()), \
               $17, $18, $19) \
             ON CONFLICT (namespace, name) DO UPDATE SET uid = EXCLUDED.uid, status = EXCLUDED.status, \
               phase = EXCLUDED.phase, worker_id = EXCLUDED.worker_id, current_run_id = EXCLUDED.current_run_id, \
               attempts = EXCLUDED.attempts, gpu = EXCLUDED.gpu, result_f1 = EXCLUDED.result_f1, \
               result_auc = EXCLUDED.result_auc, cost_usd = EXCLUDED.cost_usd, started_at = EXCLUDED.started_at, \
               finished_at = EXCLUDED.finished_at, extra = EXCLUDED.extra, approved_by = EXCLUDED.approved_by, \
               approved_at = EXCLUDED.approved_at, approval_envelope = EXCLUDED.approval_envelope, updated_at = now()",
        )
        .bind(&r.namespace)
        .bind(&r.name)
        .bind(&r.uid)
        .bind(&r.status)
        .bind(&r.phase)
        .bind(&r.worker_id)
        .bind(&r.current_run_id)
        .bind(r.attempts)
        .bind(&r.gpu)
        .bind(r.result_f1)
        .bind(r.result_auc)
        .bind(r.cost_usd)
        .bind(r.started_at)
        .bind(r.finished_at)
        .bind(&r.extra)
        .bind(r.created_at)
        .bind(&r.approved_by)
        .bind(r.approved_at)
        .bind(&r.approval_envelope)
        .execute(&mut *c)
        .await
        .map_err(RegistryError::classify)?;
        Ok(())
    }

    async fn attempt(&self, c: &mut PgConnection, r: &AttemptRow) -> Result<(), RegistryError> {
        let experiment_id = self.experiment_id(c, &r.namespace, &r.experiment).await?;
        // The WHERE clause is the fencing check: an older token never overwrites a newer claim.
        let applied = sqlx::query(
            "INSERT INTO exp_registry.attempts (run_id, experiment_id, attempt, fencing_token, status, order_name, \
               worker_id, pod_id, pid, gpu_id, lease_expires_at, exit_code, reason, result_f1, result_auc, receipt, \
               cost_usd, started_at, finished_at, extra, reconcile_action, heartbeat_at, heartbeat_seq, updated_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18, $19, $20, $21, \
               $22, $23, now()) \
             ON CONFLICT (run_id) DO UPDATE SET fencing_token = EXCLUDED.fencing_token, status = EXCLUDED.status, \
               order_name = EXCLUDED.order_name, worker_id = EXCLUDED.worker_id, pod_id = EXCLUDED.pod_id, \
               pid = EXCLUDED.pid, gpu_id = EXCLUDED.gpu_id, lease_expires_at = EXCLUDED.lease_expires_at, \
               exit_code = EXCLUDED.exit_code, reason = EXCLUDED.reason, result_f1 = EXCLUDED.result_f1, \
               result_auc = EXCLUDED.result_auc, receipt = EXCLUDED.receipt, cost_usd = EXCLUDED.cost_usd, \
               finished_at = EXCLUDED.finished_at, extra = EXCLUDED.extra, \
               reconcile_action = EXCLUDED.reconcile_action, heartbeat_at = EXCLUDED.heartbeat_at, \
               heartbeat_seq = EXCLUDED.heartbeat_seq, updated_at = now() \
             WHERE exp_registry.attempts.fencing_token <= EXCLUDED.fencing_token",
        )
        .bind(&r.run_id)
        .bind(experiment_id)
        .bind(r.attempt)
        .bind(r.fencing_token)
        .bind(&r.status)
        .bind(&r.order_name)
        .bind(&r.worker_id)
        .bind(&r.pod_id)
        .bind(r.pid)
        .bind(&r.gpu_id)
        .bind(r.lease_expires_at)
        .bind(r.exit_code)
        .bind(&r.reason)
        .bind(r.result_f1)
        .bind(r.result_auc)
        .bind(&r.receipt)
        .bind(r.cost_usd)
        .bind(r.started_at)
        .bind(r.finished_at)
        .bind(&r.extra)
        .bind(&r.reconcile_action)
        .bind(r.heartbeat_at)
        .bind(r.heartbeat_seq)
        .execute(&mut *c)
        .await
        .map_err(RegistryError::classify)?
        .rows_affected();
        if applied == 0 {
            let held: i64 = sqlx::query_scalar("SELECT fencing_token FROM exp_registry.attempts WHERE run_id = $1")
                .bind(&r.run_id)
                .fetch_one(&mut *c)
                .await
                .map_err(RegistryError::classify)?;
            return Err(RegistryError::StaleFencingToken { run_id: r.run_id.clone(), offered: r.fencing_token, held });
        }
        Ok(())
    }

    async fn order(&self, c: &mut PgConnection, r: &OrderRow) -> Result<(), RegistryError> {
        // An order whose experiment is not in the registry (yet) is written without the link.
        let experiment_id = match &r.experiment {
            Some(name) => match self.experiment_id(c, &r.namespace, name).await {
                Ok(id) => Some(id),
                Err(RegistryError::MissingParent { .. }) => None,
                Err(e) => return Err(e),
            },
            None => None,
        };
        sqlx::query(
            "INSERT INTO exp_registry.orders (namespace, name, uid, experiment_id, run_id, attempt, policy, worker_id, \
               provider, phase, reason, approved, pod_id, gpu_type_id, gpu_display_name, data_center, cost_per_hr, \
               accrued_usd, deleted_at, extra, updated_at, created_at, approved_by, reserved_usd) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18, $19, $20, now(), \
               COALESCE($21, now()), $22, $23) \
             ON CONFLICT (namespace, name) DO UPDATE SET uid = EXCLUDED.uid, experiment_id = EXCLUDED.experiment_id, \
               run_id = EXCLUDED.run_id, attempt = EXCLUDED.attempt, policy = EXCLUDED.policy, \
               worker_id = EXCLUDED.worker_id, provider = EXCLUDED.provider, phase = EXCLUDED.phase, \
               reason = EXCLUDED.reason, approved = EXCLUDED.approved, pod_id = EXCLUDED.pod_id, \
               gpu_type_id = EXCLUDED.gpu_type_id, gpu_display_name = EXCLUDED.gpu_display_name, \
               data_center = EXCLUDED.data_center, cost_per_hr = EXCLUDED.cost_per_hr, \
               accrued_usd = EXCLUDED.accrued_usd, deleted_at = EXCLUDED.deleted_at, extra = EXCLUDED.extra, \
               approved_by = EXCLUDED.approved_by, reserved_usd = EXCLUDED.reserved_usd, updated_at = now()",
        )
        .bind(&r.namespace)
        .bind(&r.name)
        .bind(&r.uid)
        .bind(experiment_id)
        .bind(&r.run_id)
        .bind(r.attempt)
        .bind(&r.policy)
        .bind(&r.worker_id)
        .bind(&r.provider)
        .bind(&r.phase)
        .bind(&r.reason)
        .bind(r.approved)
        .bind(&r.pod_id)
        .bind(&r.gpu_type_id)
        .bind(&r.gpu_display_name)
        .bind(&r.data_center)
        .bind(r.cost_per_hr)
        .bind(r.accrued_usd)
        .bind(r.deleted_at)
        .bind(&r.extra)
        .bind(r.created_at)
        .bind(&r.approved_by)
        .bind(r.reserved_usd)
        .execute(&mut *c)
        .await
        .map_err(RegistryError::classify)?;
        spend(c, r).await
    }
}

/// The order's row of today (UTC) in the spend ledger: what it reserved and spent that is not on
/// an earlier day's row, so the rows of one order add up to its totals however often it is written.
async fn spend(c: &mut PgConnection, r: &OrderRow) -> Result<(), RegistryError> {
    let (reserved, spent) = (r.reserved_usd.unwrap_or(0.0), r.accrued_usd.unwrap_or(0.0));
    if reserved <= 0.0 && spent <= 0.0 {
        return Ok(());
    }
    sqlx::query(
        "INSERT INTO exp_registry.spend_ledger (order_uid, day, namespace, order_name, experiment, reserved_usd, \
           spent_usd, updated_at) \
         SELECT $1, (now() AT TIME ZONE 'UTC')::date, $2, $3, $4, greatest($5 - COALESCE(sum(reserved_usd), 0), 0), \
           greatest($6 - COALESCE(sum(spent_usd), 0), 0), now() \
         FROM exp_registry.spend_ledger WHERE order_uid = $1 AND day <> (now() AT TIME ZONE 'UTC')::date \
         ON CONFLICT (order_uid, day) DO UPDATE SET namespace = EXCLUDED.namespace, order_name = EXCLUDED.order_name, \
           experiment = EXCLUDED.experiment, reserved_usd = EXCLUDED.reserved_usd, spent_usd = EXCLUDED.spent_usd, \
           updated_at = now()",
    )
    .bind(&r.uid)
    .bind(&r.namespace)
    .bind(&r.name)
    .bind(&r.experiment)
    .bind(reserved)
    .bind(spent)
    .execute(&mut *c)
    .await
    .map_err(RegistryError::classify)?;
    Ok(())
}

async fn heartbeat(c: &mut PgConnection, r: &HeartbeatRow) -> Result<(), RegistryError> {
    // A replayed (older) heartbeat never moves last_seen backwards.
    sqlx::query(
        "INSERT INTO exp_registry.worker_heartbeats (worker_id, last_seen, running_jobs, run_id, pod_id, seq, pid, \
           gpu_ids, fencing_token) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) \
         ON CONFLICT (worker_id) DO UPDATE SET last_seen = EXCLUDED.last_seen, running_jobs = EXCLUDED.running_jobs, \
           run_id = EXCLUDED.run_id, pod_id = EXCLUDED.pod_id, seq = EXCLUDED.seq, pid = EXCLUDED.pid, \
           gpu_ids = EXCLUDED.gpu_ids, fencing_token = EXCLUDED.fencing_token \
         WHERE exp_registry.worker_heartbeats.last_seen <= EXCLUDED.last_seen",
    )
    .bind(&r.worker_id)
    .bind(r.last_seen)
    .bind(r.running_jobs)
    .bind(&r.run_id)
    .bind(&r.pod_id)
    .bind(r.seq)
    .bind(r.pid)
    .bind(&r.gpu_ids)
    .bind(r.fencing_token)
    .execute(&mut *c)
    .await
    .map_err(RegistryError::classify)?;
    Ok(())
}

async fn session(c: &mut PgConnection, r: &SessionRow) -> Result<(), RegistryError> {
    sqlx::query(
        "INSERT INTO exp_registry.worker_sessions (worker_id, run_id, pod_id, started_at, ended_at, end_reason) \
         VALUES ($1, $2, $3, $4, $5, $6) \
         ON CONFLICT (worker_id, run_id) DO UPDATE SET pod_id = COALESCE(EXCLUDED.pod_id, exp_registry.worker_sessions.pod_id), \
           ended_at = COALESCE(EXCLUDED.ended_at, exp_registry.worker_sessions.ended_at), \
           end_reason = COALESCE(EXCLUDED.end_reason, exp_registry.worker_sessions.end_reason)",
    )
    .bind(&r.worker_id)
    .bind(&r.run_id)
    .bind(&r.pod_id)
    .bind(r.started_at)
    .bind(r.ended_at)
    .bind(&r.end_reason)
    .execute(&mut *c)
    .await
    .map_err(RegistryError::classify)?;
    Ok(())
}

async fn instance(c: &mut PgConnection, r: &InstanceRow) -> Result<(), RegistryError> {
    sqlx::query(
        "INSERT INTO exp_registry.provider_instances (pod_id, provider, pod_name, owner_uid, run_id, desired_status, \
           gpu_type_id, data_center, cost_per_hr, accrued_usd, orphan, first_seen, last_seen, gone_at) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $12, $13) \
         ON CONFLICT (pod_id) DO UPDATE SET pod_name = EXCLUDED.pod_name, owner_uid = EXCLUDED.owner_uid, \
           run_id = EXCLUDED.run_id, desired_status = EXCLUDED.desired_status, gpu_type_id = EXCLUDED.gpu_type_id, \
           data_center = EXCLUDED.data_center, cost_per_hr = EXCLUDED.cost_per_hr, \
           accrued_usd = GREATEST(exp_registry.provider_instances.accrued_usd, EXCLUDED.accrued_usd), \
           orphan = EXCLUDED.orphan, \
           first_seen = LEAST(exp_registry.provider_instances.first_seen, EXCLUDED.first_seen), \
           last_seen = GREATEST(exp_registry.provider_instances.last_seen, EXCLUDED.last_seen), \
           gone_at = COALESCE(exp_registry.provider_instances.gone_at, EXCLUDED.gone_at)",
    )
    .bind(&r.pod_id)
    .bind(&r.provider)
    .bind(&r.pod_name)
    .bind(&r.owner_uid)
    .bind(&r.run_id)
    .bind(&r.desired_status)
    .bind(&r.gpu_type_id)
    .bind(&r.data_center)
    .bind(r.cost_per_hr)
    .bind(r.accrued_usd)
    .bind(r.orphan)
    .bind(r.seen_at)
    .bind(r.gone_at)
    .execute(&mut *c)
    .await
    .map_err(RegistryError::classify)?;
    Ok(())
}

async fn phase(c: &mut PgConnection, r: &PhaseChange) -> Result<(), RegistryError> {
    sqlx::query(
        "INSERT INTO exp_registry.phase_log (kind, namespace, name, uid, from_phase, to_phase, reason, message, at) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) ON CONFLICT (uid, to_phase, at) DO NOTHING",
    )
    .bind(&r.kind)
    .bind(&r.namespace)
    .bind(&r.name)
    .bind(&r.uid)
    .bind(&r.from_phase)
    .bind(&r.to_phase)
    .bind(&r.reason)
    .bind(&r.message)
    .bind(r.at)
    .execute(&mut *c)
    .await
    .map_err(RegistryError::classify)?;
    Ok(())
}

async fn progress(c: &mut PgConnection, r: &ProgressRow) -> Result<(), RegistryError> {
    sqlx::query(
        "INSERT INTO exp_registry.progress (run_id, step, total, metrics, reported_at) VALUES ($1, $2, $3, $4, $5) \
         ON CONFLICT (run_id, step) DO UPDATE SET total = EXCLUDED.total, metrics = EXCLUDED.metrics, \
           reported_at = EXCLUDED.reported_at",
    )
    .bind(&r.run_id)
    .bind(r.step)
    .bind(r.total)
    .bind(&r.metrics)
    .bind(r.reported_at)
    .execute(&mut *c)
    .await
    .map_err(RegistryError::classify)?;
    Ok(())
}
