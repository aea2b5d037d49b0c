//! A batch of the mirror written with one statement per table it touches: the rows of one kind
//! go in as one array per column (`UNNEST`), so a thousand experiments cost a few statements per
//! flush, not one per row. Same upserts and guards as the row-by-row path (`pg.rs`), which stays
//! for a batch a row of it spoils: PostgreSQL refuses a whole statement for one bad row, and only
//! row by row can that row be told apart and kept out.

use std::collections::{BTreeMap, BTreeSet};

use sqlx::PgConnection;

use super::{
    AttemptRow, ExperimentRow, HeartbeatRow, InstanceRow, OrderRow, PgRegistry, PhaseChange, ProgressRow,
    RegistryError, Row, SessionRow,
};

type Outcomes = Vec<Result<(), RegistryError>>;

/// One column of a kind's rows.
fn col<'a, R: 'a, T>(rows: &[&'a R], f: impl Fn(&'a R) -> T) -> Vec<T> {
    rows.iter().map(|r| f(r)).collect()
}

impl PgRegistry {
    /// Writes `rows` (sorted parents first) in one transaction with a statement per kind; per-row
    /// outcomes for what a guard refused (a stale fencing token, a missing parent).
    pub(super) async fn bulk(&self, rows: &[Row]) -> Result<Outcomes, RegistryError> {
        let mut out: Outcomes = rows.iter().map(|_| Ok(())).collect();
        let mut tx = self.pool.begin().await?;
        macro_rules! of {
            ($kind:ident) => {
                rows.iter().filter_map(|r| if let Row::$kind(x) = r { Some(x) } else { None }).collect::<Vec<_>>()
            };
        }
        experiments(&mut tx, &of!(Experiment)).await?;
        for r in rows {
            if let Row::Settings { sha256, body, at } = r {
                settings(&mut tx, sha256, body, *at).await?;
            }
        }
        instances(&mut tx, &of!(Instance)).await?;
        let attempts = of!(Attempt);
        let orders = of!(Order);
        let parents = attempts
            .iter()
            .map(|a| (a.namespace.clone(), a.experiment.clone()))
            .chain(orders.iter().filter_map(|o| o.experiment.clone().map(|e| (o.namespace.clone(), e))))
            .collect();
        let ids = self.experiment_ids(&mut tx, parents).await?;
        let id = |ns: &str, name: &str| ids.get(&(ns.to_owned(), name.to_owned())).copied();
        let (with_parent, orphans): (Vec<&AttemptRow>, Vec<&AttemptRow>) =
            attempts.iter().partition(|a| id(&a.namespace, &a.experiment).is_some());
        let stale = self::attempts(&mut tx, &with_parent, &|a| id(&a.namespace, &a.experiment)).await?;
        for (i, r) in rows.iter().enumerate() {
            let Row::Attempt(a) = r else { continue };
            if orphans.iter().any(|o| o.run_id == a.run_id) {
                out[i] = Err(RegistryError::MissingParent {
                    kind: "experiment",
                    namespace: a.namespace.clone(),
                    name: a.experiment.clone(),
                });
            } else if let Some(held) = stale.get(&a.run_id) {
                out[i] = Err(RegistryError::StaleFencingToken {
                    run_id: a.run_id.clone(),
                    offered: a.fencing_token,
                    held: *held,
                });
            }
        }
        // An order whose experiment is not in the registry (yet) is written without the link.
        self::orders(&mut tx, &orders, &|o| o.experiment.as_deref().and_then(|e| id(&o.namespace, e))).await?;
        spend(&mut tx, &orders).await?;
        heartbeats(&mut tx, &of!(Heartbeat)).await?;
        sessions(&mut tx, &of!(Session)).await?;
        phases(&mut tx, &of!(Phase)).await?;
        progress(&mut tx, &of!(Progress)).await?;
        tx.commit().await?;
        Ok(out)
    }

    /// The registry ids of experiments, from the cache, else with one query for all it lacks.
    async fn experiment_ids(
        &self,
        c: &mut PgConnection,
        wanted: BTreeSet<(String, String)>,
    ) -> Result<BTreeMap<(String, String), i64>, RegistryError> {
        let mut found = BTreeMap::new();
        let mut missing = vec![];
        {
            let cache = self.ids.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            for key in wanted {
                match cache.get(&key) {
                    Some(id) => {
                        found.insert(key, *id);
                    }
                    None => missing.push(key),
                }
            }
        }
        if missing.is_empty() {
            return Ok(found);
        }
        let (ns, names): (Vec<String>, Vec<String>) = missing.into_iter().unzip();
        let rows: Vec<(String, String, i64)> = sqlx::query_as(
            "SELECT e.namespace, e.name, e.id FROM exp_registry.experiments e \
             JOIN UNNEST($1::text[], $2::text[]) AS u(namespace, name) USING (namespace, name)",
        )
        .bind(ns)
        .bind(names)
        .fetch_all(&mut *c)
        .await
        .map_err(RegistryError::classify)?;
        let mut cache = self.ids.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        for (ns, name, id) in rows {
            cache.insert((ns.clone(), name.clone()), id);
            found.insert((ns, name), id);
        }
        Ok(found)
    }
}

async fn experiments(c: &mut PgConnection, rows: &[&ExperimentRow]) -> Result<(), RegistryError> {
    if rows.is_empty() {
        return Ok(());
    }
    sqlx::query(
        "INSERT INTO exp_registry.experiments (namespace, name, uid, status, phase, worker_id, current_run_id, \
           attempts, gpu, result_f1, result_auc, cost_usd, started_at, finished_at, extra, updated_at, created_at, \
           approved_by, approved_at, approval_envelope) \
         SELECT u.namespace, u.name, u.uid, u.status, u.phase, u.worker_id, u.current_run_id, u.attempts, u.gpu, \
           u.result_f1, u.result_auc, u.cost_usd, u.started_at, u.finished_at, u.extra, now(), \
           COALESCE(u.created_at, now()), u.approved_by, u.approved_at, u.approval_envelope \
         FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[], $7::text[], \
           $8::int4[], $9::text[], $10::float8[], $11::float8[], $12::float8[], $13::timestamptz[], \
           $14::timestamptz[], $15::jsonb[], $16::timestamptz[], $17::text[], $18::timestamptz[], $19::jsonb[]) \
           AS u(namespace, name, uid, status, phase, worker_id, current_run_id, attempts, gpu, result_f1, \
             result_auc, cost_usd, started_at, finished_at, extra, created_at, approved_by, approved_at, \
             approval_envelope) \
         ON CONFLICT (namespace, name) DO UPDATE SET uid = EXCLUDED.uid, status = EXCLUDED.status, \
           phase = EXCLUDED.phase, worker_id = EXCLUDED.worker_id, current_run_id = EXCLUDED.current_run_id, \
           attempts = EXCLUDED.attempts, gpu = EXCLUDED.gpu, result_f1 = EXCLUDED.result_f1, \
           result_auc = EXCLUDED.result_auc, cost_usd = EXCLUDED.cost_usd, started_at = EXCLUDED.started_at, \
           finished_at = EXCLUDED.finished_at, extra = EXCLUDED.extra, approved_by = EXCLUDED.approved_by, \
           approved_at = EXCLUDED.approved_at, approval_envelope = EXCLUDED.approval_envelope, updated_at = now()",
    )
    .bind(col(rows, |r| r.namespace.clone()))
    .bind(col(rows, |r| r.name.clone()))
    .bind(col(rows, |r| r.uid.clone()))
    .bind(col(rows, |r| r.status.clone()))
    .bind(col(rows, |r| r.phase.clone()))
    .bind(col(rows, |r| r.worker_id.clone()))
    .bind(col(rows, |r| r.current_run_id.clone()))
    .bind(col(rows, |r| r.attempts))
    .bind(col(rows, |r| r.gpu.clone()))
    .bind(col(rows, |r| r.result_f1))
    .bind(col(rows, |r| r.result_auc))
    .bind(col(rows, |r| r.cost_usd))
    .bind(col(rows, |r| r.started_at))
    .bind(col(rows, |r| r.finished_at))
    .bind(col(rows, |r| r.extra.clone()))
    .bind(col(rows, |r| r.created_at))
    .bind(col(rows, |r| r.approved_by.clone()))
    .bind(col(rows, |r| r.approved_at))
    .bind(col(rows, |r| r.approval_envelope.clone()))
    .execute(&mut *c)
    .await
    .map_err(RegistryError::classify)?;
    Ok(())
}

/// Attempts whose experiment id is known; returns those the fencing check refused (run id ->
/// the token the registry holds).
async fn attempts(
    c: &mut PgConnection,
    rows: &[&AttemptRow],
    experiment_id: &(dyn Fn(&AttemptRow) -> Option<i64> + Sync),
) -> Result<BTreeMap<String, i64>, RegistryError> {
    if rows.is_empty() {
        return Ok(BTreeMap::new());
    }
    // The WHERE clause is the fencing check: an older token never overwrites a newer claim. The
    // final SELECT sees the table as it was before the insert: a refused row's held token.
    let refused: Vec<(String, i64)> = sqlx::query_as(
        "WITH u AS (SELECT * FROM UNNEST($1::text[], $2::int8[], $3::int4[], $4::int8[], $5::text[], $6::text[], \
             $7::text[], $8::text[], $9::int4[], $10::text[], $11::timestamptz[], $12::int4[], $13::text[], \
             $14::float8[], $15::float8[], $16::text[], $17::float8[], $18::timestamptz[], $19::timestamptz[], \
             $20::jsonb[], $21::text[], $22::timestamptz[], $23::int8[]) \
           AS u(run_id, experiment_id, attempt, fencing_token, status, order_name, worker_id, pod_id, pid, gpu_id, \
             lease_expires_at, exit_code, reason, result_f1, result_auc, receipt, cost_usd, started_at, \
             finished_at, extra, reconcile_action, heartbeat_at, heartbeat_seq)), \
         applied AS (INSERT INTO exp_registry.attempts (run_id, experiment_id, attempt, fencing_token, status, \
             order_name, worker_id, pod_id, pid, gpu_id, lease_expires_at, exit_code, reason, result_f1, \
             result_auc, receipt, cost_usd, started_at, finished_at, extra, reconcile_action, heartbeat_at, \
             heartbeat_seq, updated_at) \
           SELECT run_id, experiment_id, attempt, fencing_token, status, order_name, worker_id, pod_id, pid, \
             gpu_id, lease_expires_at, exit_code, reason, result_f1, result_auc, receipt, cost_usd, started_at, \
             finished_at, extra, reconcile_action, heartbeat_at, heartbeat_seq, now() FROM u \
           ON CONFLICT (run_id) DO UPDATE SET fencing_token = EXCLUDED.fencing_token, status = EXCLUDED.status, \
             order_name = EXCLUDED.order_name, worker_id = EXCLUDED.worker_id, pod_id = EXCLUDED.pod_id, \
             pid = EXCLUDED.pid, gpu_id = EXCLUDED.gpu_id, lease_expires_at = EXCLUDED.lease_expires_at, \
             exit_code = EXCLUDED.exit_code, reason = EXCLUDED.reason, result_f1 = EXCLUDED.result_f1, \
             result_auc = EXCLUDED.result_auc, receipt = EXCLUDED.receipt, cost_usd = EXCLUDED.cost_usd, \
             finished_at = EXCLUDED.finished_at, extra = EXCLUDED.extra, \
             reconcile_action = EXCLUDED.reconcile_action, heartbeat_at = EXCLUDED.heartbeat_at, \
             heartbeat_seq = EXCLUDED.heartbeat_seq, updated_at = now() \
           WHERE exp_registry.attempts.fencing_token <= EXCLUDED.fencing_token \
           RETURNING run_id) \
         SELECT a.run_id, a.fencing_token FROM u JOIN exp_registry.attempts a USING (run_id) \
         WHERE u.run_id NOT IN (SELECT run_id FROM applied)",
    )
    .bind(col(rows, |r| r.run_id.clone()))
    .bind(col(rows, experiment_id))
    .bind(col(rows, |r| r.attempt))
    .bind(col(rows, |r| r.fencing_token))
    .bind(col(rows, |r| r.status.clone()))
    .bind(col(rows, |r| r.order_name.clone()))
    .bind(col(rows, |r| r.worker_id.clone()))
    .bind(col(rows, |r| r.pod_id.clone()))
    .bind(col(rows, |r| r.pid))
    .bind(col(rows, |r| r.gpu_id.clone()))
    .bind(col(rows, |r| r.lease_expires_at))
    .bind(col(rows, |r| r.exit_code))
    .bind(col(rows, |r| r.reason.clone()))
    .bind(col(rows, |r| r.result_f1))
    .bind(col(rows, |r| r.result_auc))
    .bind(col(rows, |r| r.receipt.clone()))
    .bind(col(rows, |r| r.cost_usd))
    .bind(col(rows, |r| r.started_at))
    .bind(col(rows, |r| r.finished_at))
    .bind(col(rows, |r| r.extra.clone()))
    .bind(col(rows, |r| r.reconcile_action.clone()))
    .bind(col(rows, |r| r.heartbeat_at))
    .bind(col(rows, |r| r.heartbeat_seq))
    .fetch_all(&mut *c)
    .await
    .map_err(RegistryError::classify)?;
    Ok(refused.into_iter().collect())
}

async fn orders(
    c: &mut PgConnection,
    rows: &[&OrderRow],
    experiment_id: &(dyn Fn(&OrderRow) -> Option<i64> + Sync),
) -> Result<(), RegistryError> {
    if rows.is_empty() {
        return Ok(());
    }
    sqlx::query(
        "INSERT INTO exp_registry.orders (namespace, name, uid, experiment_id, run_id, attempt, policy, worker_id, \
           provider, phase, reason, approved, pod_id, gpu_type_id, gpu_display_name, data_center, cost_per_hr, \
           accrued_usd, deleted_at, extra, updated_at, created_at, approved_by, reserved_usd) \
         SELECT u.namespace, u.name, u.uid, u.experiment_id, u.run_id, u.attempt, u.policy, u.worker_id, \
           u.provider, u.phase, u.reason, u.approved, u.pod_id, u.gpu_type_id, u.gpu_display_name, \
           u.data_center, u.cost_per_hr, u.accrued_usd, u.deleted_at, u.extra, now(), \
           COALESCE(u.created_at, now()), u.approved_by, u.reserved_usd \
         FROM UNNEST($1::text[], $2::text[], $3::text[], $4::int8[], $5::text[], $6::int4[], $7::text[], \
           $8::text[], $9::text[], $10::text[], $11::text[], $12::bool[], $13::text[], $14::text[], $15::text[], \
           $16::text[], $17::float8[], $18::float8[], $19::timestamptz[], $20::jsonb[], $21::timestamptz[], \
           $22::text[], $23::float8[]) \
           AS u(namespace, name, uid, experiment_id, run_id, attempt, policy, worker_id, provider, phase, reason, \
             approved, pod_id, gpu_type_id, gpu_display_name, data_center, cost_per_hr, accrued_usd, deleted_at, \
             extra, created_at, approved_by, reserved_usd) \
         ON CONFLICT (namespace, name) DO UPDATE SET uid = EXCLUDED.uid, experiment_id = EXCLUDED.experiment_id, \
           run_id = EXCLUDED.run_id, attempt = EXCLUDED.attempt, policy = EXCLUDED.policy, \
           worker_id = EXCLUDED.worker_id, provider = EXCLUDED.provider, phase = EXCLUDED.phase, \
           reason = EXCLUDED.reason, approved = EXCLUDED.approved, pod_id = EXCLUDED.pod_id, \
           gpu_type_id = EXCLUDED.gpu_type_id, gpu_display_name = EXCLUDED.gpu_display_name, \
           data_center = EXCLUDED.data_center, cost_per_hr = EXCLUDED.cost_per_hr, \
           accrued_usd = EXCLUDED.accrued_usd, deleted_at = EXCLUDED.deleted_at, extra = EXCLUDED.extra, \
           approved_by = EXCLUDED.approved_by, reserved_usd = EXCLUDED.reserved_usd, updated_at = now()",
    )
    .bind(col(rows, |r| r.namespace.clone()))
    .bind(col(rows, |r| r.name.clone()))
    .bind(col(rows, |r| r.uid.clone()))
    .bind(col(rows, experiment_id))
    .bind(col(rows, |r| r.run_id.clone()))
    .bind(col(rows, |r| r.attempt))
    .bind(col(rows, |r| r.policy.clone()))
    .bind(col(rows, |r| r.worker_id.clone()))
    .bind(col(rows, |r| r.provider.clone()))
    .bind(col(rows, |r| r.phase.clone()))
    .bind(col(rows, |r| r.reason.clone()))
    .bind(col(rows, |r| r.approved))
    .bind(col(rows, |r| r.pod_id.clone()))
    .bind(col(rows, |r| r.gpu_type_id.clone()))
    .bind(col(rows, |r| r.gpu_display_name.clone()))
    .bind(col(rows, |r| r.data_center.clone()))
    .bind(col(rows, |r| r.cost_per_hr))
    .bind(col(rows, |r| r.accrued_usd))
    .bind(col(rows, |r| r.deleted_at))
    .bind(col(rows, |r| r.extra.clone()))
    .bind(col(rows, |r| r.created_at))
    .bind(col(rows, |r| r.approved_by.clone()))
    .bind(col(rows, |r| r.reserved_usd))
    .execute(&mut *c)
    .await
    .map_err(RegistryError::classify)?;
    Ok(())
}

/// Today's (UTC) spend-ledger row of each order that reserved or spent anything: what is not on
/// an earlier day's row (see `pg::spend`).
async fn spend(c: &mut PgConnection, rows: &[&OrderRow]) -> Result<(), RegistryError> {
    let rows: Vec<&OrderRow> = rows
        .iter()
        .copied()
        .filter(|r| r.reserved_usd.unwrap_or(0.0) > 0.0 || r.accrued_usd.unwrap_or(0.0) > 0.0)
        .collect();
    if rows.is_empty() {
        return Ok(());
    }
    sqlx::query(
        "INSERT INTO exp_registry.spend_ledger (order_uid, day, namespace, order_name, experiment, reserved_usd, \
           spent_usd, updated_at) \
         SELECT u.uid, (now() AT TIME ZONE 'UTC')::date, u.namespace, u.name, u.experiment, \
           greatest(u.reserved - COALESCE(e.reserved, 0), 0), greatest(u.spent - COALESCE(e.spent, 0), 0), now() \
         FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[], $5::float8[], $6::float8[]) \
           AS u(uid, namespace, name, experiment, reserved, spent) \
         LEFT JOIN LATERAL (SELECT sum(l.reserved_usd) AS reserved, sum(l.spent_usd) AS spent \
           FROM exp_registry.spend_ledger l \
           WHERE l.order_uid = u.uid AND l.day <> (now() AT TIME ZONE 'UTC')::date) e ON true \
         ON CONFLICT (order_uid, day) DO UPDATE SET namespace = EXCLUDED.namespace, order_name = EXCLUDED.order_name, \
           experiment = EXCLUDED.experiment, reserved_usd = EXCLUDED.reserved_usd, spent_usd = EXCLUDED.spent_usd, \
           updated_at = now()",
    )
    .bind(col(&rows, |r| r.uid.clone()))
    .bind(col(&rows, |r| r.namespace.clone()))
    .bind(col(&rows, |r| r.name.clone()))
    .bind(col(&rows, |r| r.experiment.clone()))
    .bind(col(&rows, |r| r.reserved_usd.unwrap_or(0.0)))
    .bind(col(&rows, |r| r.accrued_usd.unwrap_or(0.0)))
    .execute(&mut *c)
    .await
    .map_err(RegistryError::classify)?;
    Ok(())
}

async fn heartbeats(c: &mut PgConnection, rows: &[&HeartbeatRow]) -> Result<(), RegistryError> {
    if rows.is_empty() {
        return Ok(());
    }
    // A replayed (older) heartbeat never moves last_seen backwards.
    sqlx::query(
        "INSERT INTO exp_registry.worker_heartbeats (worker_id, last_seen, running_jobs, run_id, pod_id, seq, pid, \
           gpu_ids, fencing_token) \
         SELECT * FROM UNNEST($1::text[], $2::timestamptz[], $3::int4[], $4::text[], $5::text[], $6::int8[], \
           $7::int4[], $8::text[], $9::int8[]) \
         ON CONFLICT (worker_id) DO UPDATE SET last_seen = EXCLUDED.last_seen, running_jobs = EXCLUDED.running_jobs, \
           run_id = EXCLUDED.run_id, pod_id = EXCLUDED.pod_id, seq = EXCLUDED.seq, pid = EXCLUDED.pid, \
           gpu_ids = EXCLUDED.gpu_ids, fencing_token = EXCLUDED.fencing_token \
         WHERE exp_registry.worker_heartbeats.last_seen <= EXCLUDED.last_seen",
    )
    .bind(col(rows, |r| r.worker_id.clone()))
    .bind(col(rows, |r| r.last_seen))
    .bind(col(rows, |r| r.running_jobs))
    .bind(col(rows, |r| r.run_id.clone()))
    .bind(col(rows, |r| r.pod_id.clone()))
    .bind(col(rows, |r| r.seq))
    .bind(col(rows, |r| r.pid))
    .bind(col(rows, |r| r.gpu_ids.clone()))
    .bind(col(rows, |r| r.fencing_token))
    .execute(&mut *c)
    .await
    .map_err(RegistryError::classify)?;
    Ok(())
}

async fn sessions(c: &mut PgConnection, rows: &[&SessionRow]) -> Result<(), RegistryError> {
    if rows.is_empty() {
        return Ok(());
    }
    sqlx::query(
        "INSERT INTO exp_registry.worker_sessions (worker_id, run_id, pod_id, started_at, ended_at, end_reason) \
         SELECT * FROM UNNEST($1::text[], $2::text[], $3::text[], $4::timestamptz[], $5::timestamptz[], $6::text[]) \
         ON CONFLICT (worker_id, run_id) DO UPDATE SET pod_id = COALESCE(EXCLUDED.pod_id, exp_registry.worker_sessions.pod_id), \
           ended_at = COALESCE(EXCLUDED.ended_at, exp_registry.worker_sessions.ended_at), \
           end_reason = COALESCE(EXCLUDED.end_reason, exp_registry.worker_sessions.end_reason)",
    )
    .bind(col(rows, |r| r.worker_id.clone()))
    .bind(col(rows, |r| r.run_id.clone()))
    .bind(col(rows, |r| r.pod_id.clone()))
    .bind(col(rows, |r| r.started_at))
    .bind(col(rows, |r| r.ended_at))
    .bind(col(rows, |r| r.end_reason.clone()))
    .execute(&mut *c)
    .await
    .map_err(RegistryError::classify)?;
    Ok(())
}

async fn instances(c: &mut PgConnection, rows: &[&InstanceRow]) -> Result<(), RegistryError> {
    if rows.is_empty() {
        return Ok(());
    }
    sqlx::query(
        "INSERT INTO exp_registry.provider_instances (pod_id, provider, pod_name, owner_uid, run_id, desired_status, \
           gpu_type_id, data_center, cost_per_hr, accrued_usd, orphan, first_seen, last_seen, gone_at) \
         SELECT u.pod_id, u.provider, u.pod_name, u.owner_uid, u.run_id, u.desired_status, u.gpu_type_id, \
           u.data_center, u.cost_per_hr, u.accrued_usd, u.orphan, u.seen_at, u.seen_at, u.gone_at \
         FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[], $7::text[], \
           $8::text[], $9::float8[], $10::float8[], $11::bool[], $12::timestamptz[], $13::timestamptz[]) \
           AS u(pod_id, provider, pod_name, owner_uid, run_id, desired_status, gpu_type_id, data_center, \
             cost_per_hr, accrued_usd, orphan, seen_at, gone_at) \
         ON CONFLICT (pod_id) DO UPDATE SET pod_name = EXCLUDED.pod_name, owner_uid = EXCLUDED.owner_uid, \
           run_id = EXCLUDED.run_id, desired_status = EXCLUDED.desired_status, gpu_type_id = EXCLUDED.gpu_type_id, \
           data_center = EXCLUDED.data_center, cost_per_hr = EXCLUDED.cost_per_hr, \
           accrued_usd = GREATEST(exp_registry.provider_instances.accrued_usd, EXCLUDED.accrued_usd), \
           orphan = EXCLUDED.orphan, \
           first_seen = LEAST(exp_registry.provider_instances.first_seen, EXCLUDED.first_seen), \
           last_seen = GREATEST(exp_registry.provider_instances.last_seen, EXCLUDED.last_seen), \
           gone_at = COALESCE(exp_registry.provider_instances.gone_at, EXCLUDED.gone_at)",
    )
    .bind(col(rows, |r| r.pod_id.clone()))
    .bind(col(rows, |r| r.provider.clone()))
    .bind(col(rows, |r| r.pod_name.clone()))
    .bind(col(rows, |r| r.owner_uid.clone()))
    .bind(col(rows, |r| r.run_id.clone()))
    .bind(col(rows, |r| r.desired_status.clone()))
    .bind(col(rows, |r| r.gpu_type_id.clone()))
    .bind(col(rows, |r| r.data_center.clone()))
    .bind(col(rows, |r| r.cost_per_hr))
    .bind(col(rows, |r| r.accrued_usd))
    .bind(col(rows, |r| r.orphan))
    .bind(col(rows, |r| r.seen_at))
    .bind(col(rows, |r| r.gone_at))
    .execute(&mut *c)
    .await
    .map_err(RegistryError::classify)?;
    Ok(())
}

async fn phases(c: &mut PgConnection, rows: &[&PhaseChange]) -> Result<(), RegistryError> {
    if rows.is_empty() {
        return Ok(());
    }
    sqlx::query(
        "INSERT INTO exp_registry.phase_log (kind, namespace, name, uid, from_phase, to_phase, reason, message, at) \
         SELECT * FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[], $7::text[], \
           $8::text[], $9::timestamptz[]) \
         ON CONFLICT (uid, to_phase, at) DO NOTHING",
    )
    .bind(col(rows, |r| r.kind.clone()))
    .bind(col(rows, |r| r.namespace.clone()))
    .bind(col(rows, |r| r.name.clone()))
    .bind(col(rows, |r| r.uid.clone()))
    .bind(col(rows, |r| r.from_phase.clone()))
    .bind(col(rows, |r| r.to_phase.clone()))
    .bind(col(rows, |r| r.reason.clone()))
    .bind(col(rows, |r| r.message.clone()))
    .bind(col(rows, |r| r.at))
    .execute(&mut *c)
    .await
    .map_err(RegistryError::classify)?;
    Ok(())
}

async fn progress(c: &mut PgConnection, rows: &[&ProgressRow]) -> Result<(), RegistryError> {
    if rows.is_empty() {
        return Ok(());
    }
    sqlx::query(
        "INSERT INTO exp_registry.progress (run_id, step, total, metrics, reported_at) \
         SELECT * FROM UNNEST($1::text[], $2::int8[], $3::int8[], $4::jsonb[], $5::timestamptz[]) \
         ON CONFLICT (run_id, step) DO UPDATE SET total = EXCLUDED.total, metrics = EXCLUDED.metrics, \
           reported_at = EXCLUDED.reported_at",
    )
    .bind(col(rows, |r| r.run_id.clone()))
    .bind(col(rows, |r| r.step))
    .bind(col(rows, |r| r.total))
    .bind(col(rows, |r| r.metrics.clone()))
    .bind(col(rows, |r| r.reported_at))
    .execute(&mut *c)
    .await
    .map_err(RegistryError::classify)?;
    Ok(())
}

/// The settings the operator runs with, once per content.
pub(super) async fn settings(
    c: &mut PgConnection,
    sha256: &str,
    body: &serde_json::Value,
    at: chrono::DateTime<chrono::Utc>,
) -> Result<(), RegistryError> {
    sqlx::query(
        "INSERT INTO exp_registry.settings (sha256, body, first_applied_at, last_applied_at) VALUES ($1, $2, $3, $3) \
         ON CONFLICT (sha256) DO UPDATE SET last_applied_at = GREATEST(exp_registry.settings.last_applied_at, EXCLUDED.last_applied_at)",
    )
    .bind(sha256)
    .bind(body)
    .bind(at)
    .execute(&mut *c)
    .await
    .map_err(RegistryError::classify)?;
    Ok(())
}
