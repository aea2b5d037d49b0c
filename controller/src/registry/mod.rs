//! The registry mirror: every state change written to PostgreSQL schema `exp_registry`.
//!
//! Postgres is a mirror, never the source of truth. Every write is an idempotent upsert keyed so
//! that a replay after an outage is harmless; writes that carry a fencing token are refused when
//! the registry already holds a newer one.

mod bulk;
mod pg;
pub mod schema;

use chrono::{DateTime, Utc};
use serde_json::Value;

pub use pg::PgRegistry;

/// Every migration's version and SQL, as embedded in the binary.
pub fn pg_migrations() -> Vec<(i64, String)> {
    pg::MIGRATOR.iter().map(|m| (m.version, m.sql.as_str().to_owned())).collect()
}

/// The experiment statuses of the hand-run pipeline, kept as they were.
pub mod status {
    pub const READY: &str = "READY";
    pub const RUNNING: &str = "RUNNING";
    pub const NEEDS_RERUN: &str = "NEEDS_RERUN";
    pub const COMPLETED: &str = "COMPLETED";
    pub const FAILED: &str = "FAILED";
    pub const FAILED_STATUS_DIVERGENCE: &str = "FAILED_STATUS_DIVERGENCE";
}

/// An experiment's status in the pipeline's words.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RegistryStatus {
    Ready,
    Running,
    NeedsRerun,
    Completed,
    Failed,
    FailedStatusDivergence,
}

impl RegistryStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Ready => status::READY,
            Self::Running => status::RUNNING,
            Self::NeedsRerun => status::NEEDS_RERUN,
            Self::Completed => status::COMPLETED,
            Self::Failed => status::FAILED,
            Self::FailedStatusDivergence => status::FAILED_STATUS_DIVERGENCE,
        }
    }

    /// Whether nothing more will happen to the experiment.
    pub fn is_final(self) -> bool {
        matches!(self, Self::Completed | Self::Failed | Self::FailedStatusDivergence)
    }
}

/// What an attempt is doing, in the registry's words.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttemptState {
    Claimed,
    Running,
    Draining,
    Succeeded,
    Failed,
    Stopped,
}

impl AttemptState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Claimed => "CLAIMED",
            Self::Running => "RUNNING",
            Self::Draining => "DRAINING",
            Self::Succeeded => "SUCCEEDED",
            Self::Failed => "FAILED",
            Self::Stopped => "STOPPED",
        }
    }
}

/// A registry write failed.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("registry unavailable: {0}")]
    Database(#[from] sqlx::Error),
    #[error("registry migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// The database holds a registry the operator cannot adopt without converting data.
    #[error("registry schema refused: {0}")]
    SchemaRefused(String),
    #[error("stale writer for run {run_id}: fencing token {offered} is older than {held}")]
    StaleFencingToken { run_id: String, offered: i64, held: i64 },
    #[error("{kind} {namespace}/{name} is not in the registry yet")]
    MissingParent { kind: &'static str, namespace: String, name: String },
    /// PostgreSQL refused the row itself (its data, not the connection): retrying it as it is cannot help.
    #[error("PostgreSQL refused the row: {0}")]
    Refused(String),
}

impl RegistryError {
    /// Stable label for metrics and event reasons.
    pub fn category(&self) -> &'static str {
        match self {
            Self::Database(_) => "database",
            Self::Migrate(_) => "migrate",
            Self::SchemaRefused(_) => "schema_refused",
            Self::StaleFencingToken { .. } => "stale_fencing_token",
            Self::MissingParent { .. } => "missing_parent",
            Self::Refused(_) => "refused",
        }
    }

    /// Sorts a database error: a row PostgreSQL refuses for its content (data exceptions,
    /// integrity violations other than a missing parent, limits) against the database being away.
    pub fn classify(e: sqlx::Error) -> Self {
        if let sqlx::Error::Database(d) = &e
            && let Some(code) = d.code()
        {
            if code == "23503" {
                return Self::MissingParent { kind: "parent", namespace: String::new(), name: d.message().to_owned() };
            }
            if code.starts_with("22") || code.starts_with("23") || code.starts_with("54") {
                return Self::Refused(format!("{} (SQLSTATE {code})", d.message()));
            }
        }
        Self::Database(e)
    }

    /// Whether the failure belongs to one row (the others can still be written).
    pub fn is_row_level(&self) -> bool {
        matches!(self, Self::Refused(_) | Self::MissingParent { .. } | Self::StaleFencingToken { .. })
    }
}

/// One experiment as the registry shows it.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ExperimentRow {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    /// One of [`status`].
    pub status: String,
    pub phase: Option<String>,
    pub worker_id: Option<String>,
    pub current_run_id: Option<String>,
    pub attempts: i32,
    pub gpu: Option<String>,
    pub result_f1: Option<f64>,
    pub result_auc: Option<f64>,
    pub cost_usd: Option<f64>,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
    /// The object's creationTimestamp (a rebuilt registry holds the same).
    pub created_at: Option<DateTime<Utc>>,
    /// The approval in force: who, when the operator first saw it, and its envelope.
    pub approved_by: Option<String>,
    pub approved_at: Option<DateTime<Utc>>,
    pub approval_envelope: Option<Value>,
    pub extra: Value,
}

/// One attempt.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct AttemptRow {
    pub namespace: String,
    pub experiment: String,
    pub run_id: String,
    pub attempt: i32,
    pub fencing_token: i64,
    /// CLAIMED, RUNNING, DRAINING, SUCCEEDED, FAILED or STOPPED.
    pub status: String,
    pub order_name: Option<String>,
    pub worker_id: Option<String>,
    pub pod_id: Option<String>,
    pub pid: Option<i32>,
    pub gpu_id: Option<String>,
    pub lease_expires_at: Option<DateTime<Utc>>,
    pub exit_code: Option<i32>,
    pub reason: Option<String>,
    pub result_f1: Option<f64>,
    pub result_auc: Option<f64>,
    pub receipt: Option<String>,
    pub cost_usd: Option<f64>,
    pub started_at: DateTime<Utc>,
    pub finished_at: Option<DateTime<Utc>>,
    /// What the operator repaired to bind the attempt (a stale binding), if anything.
    pub reconcile_action: Option<String>,
    /// The run's newest heartbeat (as status holds it) and its sequence number.
    pub heartbeat_at: Option<DateTime<Utc>>,
    pub heartbeat_seq: Option<i64>,
    pub extra: Value,
}

/// One order.
#[derive(Clone, Debug, PartialEq)]
pub struct OrderRow {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    pub experiment: Option<String>,
    pub run_id: Option<String>,
    pub attempt: Option<i32>,
    pub policy: String,
    pub worker_id: String,
    pub provider: String,
    pub phase: String,
    pub reason: Option<String>,
    pub approved: bool,
    /// Who approved the spending in force (the order's approver or its experiment's envelope).
    pub approved_by: Option<String>,
    /// USD reserved against the namespace's budget at admission.
    pub reserved_usd: Option<f64>,
    pub pod_id: Option<String>,
    pub gpu_type_id: Option<String>,
    pub gpu_display_name: Option<String>,
    pub data_center: Option<String>,
    pub cost_per_hr: Option<f64>,
    pub accrued_usd: Option<f64>,
    pub deleted_at: Option<DateTime<Utc>>,
    /// The object's creationTimestamp (a rebuilt registry holds the same).
    pub created_at: Option<DateTime<Utc>>,
    pub extra: Value,
}

/// The latest heartbeat of a worker.
#[derive(Clone, Debug, PartialEq)]
pub struct HeartbeatRow {
    pub worker_id: String,
    pub last_seen: DateTime<Utc>,
    pub running_jobs: i32,
    pub run_id: Option<String>,
    pub pod_id: Option<String>,
    pub seq: Option<i64>,
    pub pid: Option<i32>,
    pub gpu_ids: Option<String>,
    pub fencing_token: Option<i64>,
}

/// A worker serving a run.
#[derive(Clone, Debug, PartialEq)]
pub struct SessionRow {
    pub worker_id: String,
    pub run_id: String,
    pub pod_id: Option<String>,
    pub started_at: DateTime<Utc>,
    pub ended_at: Option<DateTime<Utc>>,
    pub end_reason: Option<String>,
}

/// A pod the RunPod account holds.
#[derive(Clone, Debug, PartialEq)]
pub struct InstanceRow {
    pub pod_id: String,
    pub provider: String,
    pub pod_name: Option<String>,
    pub owner_uid: Option<String>,
    pub run_id: Option<String>,
    pub desired_status: Option<String>,
    pub gpu_type_id: Option<String>,
    pub data_center: Option<String>,
    pub cost_per_hr: Option<f64>,
    pub accrued_usd: Option<f64>,
    pub orphan: bool,
    pub seen_at: DateTime<Utc>,
    pub gone_at: Option<DateTime<Utc>>,
}

/// A phase change of any object.
#[derive(Clone, Debug, PartialEq)]
pub struct PhaseChange {
    pub kind: String,
    pub namespace: String,
    pub name: String,
    pub uid: String,
    pub from_phase: Option<String>,
    pub to_phase: String,
    pub reason: Option<String>,
    pub message: Option<String>,
    pub at: DateTime<Utc>,
}

/// Progress of a run at one step.
#[derive(Clone, Debug, PartialEq)]
pub struct ProgressRow {
    pub run_id: String,
    pub step: i64,
    pub total: Option<i64>,
    pub metrics: Value,
    pub reported_at: DateTime<Utc>,
}

/// One row for the registry.
#[derive(Clone, Debug, PartialEq)]
pub enum Row {
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

impl Row {
    /// Rows with the same key replace each other.
    pub fn key(&self) -> String {
        match self {
            Self::Experiment(r) => format!("experiment/{}/{}", r.namespace, r.name),
            Self::Attempt(r) => format!("attempt/{}", r.run_id),
            Self::Order(r) => format!("order/{}/{}", r.namespace, r.name),
            Self::Heartbeat(r) => format!("heartbeat/{}", r.worker_id),
            Self::Session(r) => format!("session/{}/{}", r.worker_id, r.run_id),
            Self::Instance(r) => format!("instance/{}", r.pod_id),
            Self::Phase(r) => format!("phase/{}/{}/{}", r.uid, r.to_phase, r.at.timestamp_micros()),
            Self::Progress(r) => format!("progress/{}/{}", r.run_id, r.step),
            Self::Settings { sha256, .. } => format!("settings/{sha256}"),
        }
    }

    /// Writes parents before children: experiments, then attempts and orders, then the rest.
    pub fn rank(&self) -> u8 {
        match self {
            Self::Experiment(_) | Self::Settings { .. } | Self::Instance(_) => 0,
            Self::Attempt(_) | Self::Order(_) | Self::Heartbeat(_) | Self::Session(_) | Self::Phase(_) => 1,
            Self::Progress(_) => 2,
        }
    }
}

/// What the operator writes to the registry. Every method is idempotent.
pub trait Registry: Send + Sync {
    /// Writes rows in one transaction; a row PostgreSQL refuses, or whose parent is missing, does
    /// not keep the others out. Returns one outcome per row, in order; Err only when the database
    /// itself failed (nothing was written).
    fn write_batch(
        &self,
        rows: &[Row],
    ) -> impl Future<Output = Result<Vec<Result<(), RegistryError>>, RegistryError>> + Send;

    /// Every experiment row's (namespace, name, status), for the divergence audit.
    fn experiment_statuses(&self) -> impl Future<Output = Result<Vec<(String, String, String)>, RegistryError>> + Send;
}
