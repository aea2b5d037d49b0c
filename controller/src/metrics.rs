//! Prometheus metrics and the health endpoints (`/metrics`, `/livez`, `/readyz`).
//!
//! Labels carry kinds, phases, operations and error categories only: never object names or other
//! unbounded values.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

type Labels = Vec<(&'static str, String)>;

/// Every metric the operator exports.
pub struct Metrics {
    registry: Registry,
    /// Reconciles by kind.
    pub reconciles: Family<Labels, Counter>,
    /// Reconcile errors by kind and category.
    pub errors: Family<Labels, Counter>,
    /// Phase transitions by kind and phase entered.
    pub transitions: Family<Labels, Counter>,
    /// RunPod API calls by operation and outcome (ok or an error category).
    pub runpod_calls: Family<Labels, Counter>,
    /// RunPod API call latency by operation.
    pub runpod_latency: Family<Labels, Histogram>,
    /// Reconcile duration by kind.
    pub reconcile_duration: Family<Labels, Histogram>,
    /// Seconds the oldest unwritten registry write has waited (0 when caught up).
    pub registry_lag_seconds: Gauge<f64, AtomicU64>,
    /// Registry writes waiting for PostgreSQL.
    pub registry_pending: Gauge,
    /// Registry writes that failed (and will be retried).
    pub registry_errors: Counter,
    /// USD per hour of every pod the operator's orders hold now.
    pub spend_usd_per_hour: Gauge<f64, AtomicU64>,
    /// USD spent by ended orders, by namespace.
    pub spent_usd: Family<Labels, Counter<f64, AtomicU64>>,
    /// Registry rows PostgreSQL refused (quarantined).
    pub registry_refused: Counter,
    /// Pods the RunPod account holds that no order owns.
    pub orphan_pods: Gauge,
    /// Settings files refused by hot reload.
    pub settings_rejections: Gauge,
    /// 1 while this replica holds the leader lease.
    pub leader: Gauge,
    /// Requests left in each of RunPod's rate-limit windows, as the last answer said.
    pub runpod_ratelimit_remaining: Family<Labels, Gauge>,
    ready: AtomicBool,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("ep");
        let m = Self {
            reconciles: Family::default(),
            errors: Family::default(),
            transitions: Family::default(),
            runpod_calls: Family::default(),
            runpod_latency: Family::new_with_constructor(latency_histogram),
            reconcile_duration: Family::new_with_constructor(latency_histogram),
            registry_lag_seconds: Gauge::default(),
            registry_pending: Gauge::default(),
            registry_errors: Counter::default(),
            spend_usd_per_hour: Gauge::default(),
            spent_usd: Family::default(),
            registry_refused: Counter::default(),
            orphan_pods: Gauge::default(),
            settings_rejections: Gauge::default(),
            leader: Gauge::default(),
            runpod_ratelimit_remaining: Family::default(),
            ready: AtomicBool::new(false),
            registry: Registry::default(),
        };
        registry.register("reconciles", "Reconciles by kind", m.reconciles.clone());
        registry.register("reconcile_errors", "Reconcile errors by kind and category", m.errors.clone());
        registry.register("phase_transitions", "Phase transitions by kind and phase entered", m.transitions.clone());
        registry.register("runpod_calls", "RunPod API calls by operation and outcome", m.runpod_calls.clone());
        registry.register(
            "runpod_call_duration_seconds",
            "RunPod API call latency by operation",
            m.runpod_latency.clone(),
        );
        registry.register("reconcile_duration_seconds", "Reconcile duration by kind", m.reconcile_duration.clone());
        registry.register(
            "registry_lag_seconds",
            "Age of the oldest registry write still waiting for PostgreSQL",
            m.registry_lag_seconds.clone(),
        );
        registry.register(
            "registry_pending_writes",
            "Registry writes waiting for PostgreSQL",
            m.registry_pending.clone(),
        );
        registry.register(
            "registry_write_errors",
            "Registry writes that failed and will be retried",
            m.registry_errors.clone(),
        );
        registry.register("spend_usd_per_hour", "USD per hour of the pods held now", m.spend_usd_per_hour.clone());
        registry.register("spent_usd", "USD spent by ended orders, by namespace", m.spent_usd.clone());
        registry.register(
            "registry_rows_refused",
            "Registry rows PostgreSQL refused; each is quarantined and reported on its object",
            m.registry_refused.clone(),
        );
        registry.register("orphan_pods", "Pods of the account that no order owns", m.orphan_pods.clone());
        registry.register("settings_rejections", "Settings files refused by hot reload", m.settings_rejections.clone());
        registry.register("leader", "1 while this replica holds the leader lease", m.leader.clone());
        registry.register(
            "runpod_ratelimit_remaining",
            "Requests left in each RunPod rate-limit window, as RunPod's last answer said",
            m.runpod_ratelimit_remaining.clone(),
        );
        Self { registry, ..m }
    }

    /// Copies what RunPod's rate-limit headers last said into the gauges.
    pub fn rate_limits(&self) {
        for w in crate::runpod::pace::windows() {
            let remaining = i64::try_from(w.remaining).unwrap_or(i64::MAX);
            self.runpod_ratelimit_remaining.get_or_create(&vec![("window", w.name)]).set(remaining);
        }
    }

    pub fn reconciled(&self, kind: &'static str) {
        self.reconciles.get_or_create(&vec![("kind", kind.to_owned())]).inc();
    }

    pub fn error(&self, kind: &'static str, category: &'static str) {
        self.errors.get_or_create(&vec![("kind", kind.to_owned()), ("category", category.to_owned())]).inc();
    }

    pub fn transition(&self, kind: &'static str, phase: &str) {
        self.transitions.get_or_create(&vec![("kind", kind.to_owned()), ("phase", phase.to_owned())]).inc();
    }

    pub fn runpod_call(&self, operation: &'static str, outcome: &'static str, took: std::time::Duration) {
        self.runpod_calls
            .get_or_create(&vec![("operation", operation.to_owned()), ("outcome", outcome.to_owned())])
            .inc();
        self.runpod_latency.get_or_create(&vec![("operation", operation.to_owned())]).observe(took.as_secs_f64());
    }

    pub fn reconcile_took(&self, kind: &'static str, took: std::time::Duration) {
        self.reconcile_duration.get_or_create(&vec![("kind", kind.to_owned())]).observe(took.as_secs_f64());
    }

    /// Counts what an ended order cost.
    pub fn spent(&self, namespace: &str, usd: f64) {
        self.spent_usd.get_or_create(&vec![("namespace", namespace.to_owned())]).inc_by(usd);
    }

    /// Marks the operator ready (controllers running) or not.
    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::Relaxed);
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed)
    }

    /// The text exposition format.
    pub fn render(&self) -> String {
        let mut out = String::new();
        if encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}

/// Buckets from 5 ms to about 80 s.
fn latency_histogram() -> Histogram {
    Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(0.005, 2.0, 15))
}

async fn render(State(m): State<Arc<Metrics>>) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], m.render())
}

async fn readyz(State(m): State<Arc<Metrics>>) -> impl IntoResponse {
    if m.is_ready() { (StatusCode::OK, "ok\n") } else { (StatusCode::SERVICE_UNAVAILABLE, "not ready\n") }
}

/// Serves the endpoints on a bound listener until `shutdown` resolves.
pub async fn serve(
    listener: tokio::net::TcpListener,
    metrics: Arc<Metrics>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = Router::new()
        .route("/metrics", get(render))
        .route("/livez", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .with_state(metrics);
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(%addr, "serving /metrics, /livez and /readyz");
    }
    axum::serve(listener, app).with_graceful_shutdown(shutdown).await
}
