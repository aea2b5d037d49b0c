//! Prometheus metrics and the health endpoints (`/metrics`, `/livez`, `/readyz`).
//!
//! Labels carry kinds, phases, operations and error categories only: never object names or other
//! unbounded values.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

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
    /// Reconcile errors by kind, category and failure domain.
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
    /// Experiments whose registry row the last audit found diverging from the cluster.
    pub registry_divergences: Gauge,
    /// Registry writes that failed (and will be retried).
    pub registry_errors: Counter,
    /// USD per hour of every pod of a provider's account (orders' and orphans'), by provider.
    pub pods_usd_per_hour: Family<Labels, Gauge<f64, AtomicU64>>,
    /// USD spent by ended orders, by namespace.
    pub spent_usd: Family<Labels, Counter<f64, AtomicU64>>,
    /// Registry rows PostgreSQL refused (quarantined).
    pub registry_refused: Counter,
    /// Pods the RunPod account holds that no order owns, by provider.
    pub orphan_pods: Family<Labels, Gauge>,
    /// 1 while a provider is Ready, by provider.
    pub provider_ready: Family<Labels, Gauge>,
    /// Settings files refused by hot reload.
    pub settings_rejections: Counter,
    /// 1, labelled with the operator's version.
    pub build_info: Family<Labels, Gauge>,
    /// 1 while this replica holds the leader lease.
    pub leader: Gauge,
    /// The concurrency limits in force (`concurrency.*` of the settings, hot-reloaded), by limit.
    pub concurrency_limit: Family<Labels, Gauge>,
    /// Requests left in each of RunPod's rate-limit windows, as the last answer said.
    pub runpod_ratelimit_remaining: Family<Labels, Gauge>,
    /// Where each object stands, as its last reconcile saw it; the families below are computed
    /// from it at each scrape, so an object that moves on leaves no stale series.
    standing: Mutex<HashMap<String, Standing>>,
    /// Each namespace's daily spend budget (USD), as the settings in force say.
    budgets: Mutex<BTreeMap<String, f64>>,
    objects: Family<Labels, Gauge>,
    orders_blocked: Family<Labels, Gauge>,
    phase_age: Family<Labels, Gauge<f64, AtomicU64>>,
    spend_usd_per_hour: Family<Labels, Gauge<f64, AtomicU64>>,
    budget_usd_per_day: Family<Labels, Gauge<f64, AtomicU64>>,
    ready: AtomicBool,
}

/// Where one object stands, from its last observed status.
#[derive(Clone, Debug, PartialEq)]
pub struct Standing {
    pub kind: &'static str,
    pub namespace: String,
    pub phase: String,
    /// When the phase was entered (seconds since the epoch), if status says.
    pub since: Option<f64>,
    /// Failure domain and reason, while a gate blocks the object.
    pub blocked: Option<(&'static str, String)>,
    /// Whether nothing more happens to the object (its phase is final).
    pub terminal: bool,
    /// USD per hour of the pod it holds now (0 without a pod).
    pub usd_per_hour: f64,
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
            registry_divergences: Gauge::default(),
            registry_errors: Counter::default(),
            pods_usd_per_hour: Family::default(),
            spent_usd: Family::default(),
            registry_refused: Counter::default(),
            orphan_pods: Family::default(),
            provider_ready: Family::default(),
            settings_rejections: Counter::default(),
            build_info: Family::default(),
            leader: Gauge::default(),
            concurrency_limit: Family::default(),
            runpod_ratelimit_remaining: Family::default(),
            standing: Mutex::default(),
            budgets: Mutex::default(),
            objects: Family::default(),
            orders_blocked: Family::default(),
            phase_age: Family::default(),
            spend_usd_per_hour: Family::default(),
            budget_usd_per_day: Family::default(),
            ready: AtomicBool::new(false),
            registry: Registry::default(),
        };
        m.register_work(&mut registry);
        m.register_standing(&mut registry);
        m.build_info.get_or_create(&vec![("version", env!("CARGO_PKG_VERSION").to_owned())]).set(1);
        Self { registry, ..m }
    }

    /// Reconciles, RunPod calls, the registry mirror and the operator itself.
    fn register_work(&self, registry: &mut Registry) {
        registry.register("reconciles", "Reconciles by kind", self.reconciles.clone());
        registry.register(
            "reconcile_errors",
            "Reconcile errors by kind, category and failure domain",
            self.errors.clone(),
        );
        registry.register("phase_transitions", "Phase transitions by kind and phase entered", self.transitions.clone());
        registry.register("runpod_calls", "RunPod API calls by operation and outcome", self.runpod_calls.clone());
        registry.register(
            "runpod_call_duration_seconds",
            "RunPod API call latency by operation",
            self.runpod_latency.clone(),
        );
        registry.register("reconcile_duration_seconds", "Reconcile duration by kind", self.reconcile_duration.clone());
        registry.register(
            "registry_lag_seconds",
            "Age of the oldest registry write still waiting for PostgreSQL",
            self.registry_lag_seconds.clone(),
        );
        registry.register(
            "registry_pending_writes",
            "Registry writes waiting for PostgreSQL",
            self.registry_pending.clone(),
        );
        registry.register(
            "registry_divergences",
            "Experiments whose registry row diverges from the cluster at the last audit (reported, not overwritten)",
            self.registry_divergences.clone(),
        );
        registry.register(
            "registry_write_errors",
            "Registry writes that failed and will be retried",
            self.registry_errors.clone(),
        );
        registry.register("spent_usd", "USD spent by ended orders, by namespace", self.spent_usd.clone());
        registry.register(
            "registry_rows_refused",
            "Registry rows PostgreSQL refused; each is quarantined and reported on its object",
            self.registry_refused.clone(),
        );
        registry.register(
            "settings_rejections",
            "Settings edits refused by hot reload",
            self.settings_rejections.clone(),
        );
        registry.register("leader", "1 while this replica holds the leader lease", self.leader.clone());
        registry.register(
            "concurrency_limit",
            "Concurrency limits in force, by limit (settings concurrency.*, applied without a restart)",
            self.concurrency_limit.clone(),
        );
        registry.register(
            "runpod_ratelimit_remaining",
            "Requests left in each RunPod rate-limit window, as RunPod's last answer said",
            self.runpod_ratelimit_remaining.clone(),
        );
        registry.register("build_info", "The operator's version (always 1)", self.build_info.clone());
    }

    /// Where objects, providers and spend stand.
    fn register_standing(&self, registry: &mut Registry) {
        registry.register(
            "pods_usd_per_hour",
            "USD per hour of every pod in a provider's RunPod account, orphans included",
            self.pods_usd_per_hour.clone(),
        );
        registry.register(
            "spend_usd_per_hour",
            "USD per hour of the pods the orders of a namespace hold now",
            self.spend_usd_per_hour.clone(),
        );
        registry.register(
            "budget_usd_per_day",
            "A namespace's daily spend budget from the settings in force",
            self.budget_usd_per_day.clone(),
        );
        registry.register("objects", "Experiments and orders by namespace and phase", self.objects.clone());
        registry.register(
            "orders_blocked",
            "Orders a gate holds, by namespace, failure domain and reason",
            self.orders_blocked.clone(),
        );
        registry.register(
            "phase_age_max_seconds",
            "Seconds the oldest object of a kind has spent in its current, not final, phase",
            self.phase_age.clone(),
        );
        registry.register("provider_ready", "1 while a RunPodProvider is Ready", self.provider_ready.clone());
        registry.register("orphan_pods", "Pods of the account that no order owns", self.orphan_pods.clone());
    }

    /// Starts each error series at zero, so `rate()` and the alerts see the first error.
    pub fn init_errors(&self, kinds: &[&'static str], categories: &[&'static str]) {
        for kind in kinds {
            for category in categories {
                let _ = self.errors.get_or_create(&error_labels(kind, category));
            }
        }
    }

    /// Records where an object stands (key: kind/namespace/name).
    pub fn observe(&self, key: String, standing: Standing) {
        self.standing.lock().unwrap_or_else(PoisonError::into_inner).insert(key, standing);
    }

    /// Forgets an object that is gone.
    pub fn forget(&self, key: &str) {
        self.standing.lock().unwrap_or_else(PoisonError::into_inner).remove(key);
    }

    /// Records a namespace's daily budget (None: no budget applies).
    pub fn budget(&self, namespace: &str, usd_per_day: Option<f64>) {
        let mut b = self.budgets.lock().unwrap_or_else(PoisonError::into_inner);
        match usd_per_day {
            Some(v) => b.insert(namespace.to_owned(), v),
            None => b.remove(namespace),
        };
    }

    /// Recomputes the families derived from the objects' standing.
    fn derive(&self, standing: &HashMap<String, Standing>, now: f64) {
        let mut objects: BTreeMap<(&str, &str, &str), i64> = BTreeMap::new();
        let mut blocked: BTreeMap<(&str, &str, &str), i64> = BTreeMap::new();
        let mut age: BTreeMap<(&str, &str), f64> = BTreeMap::new();
        let mut spend: BTreeMap<&str, f64> = BTreeMap::new();
        for s in standing.values() {
            *objects.entry((s.kind, &s.namespace, &s.phase)).or_default() += 1;
            if let Some((domain, reason)) = &s.blocked {
                *blocked.entry((&s.namespace, domain, reason)).or_default() += 1;
            }
            if let (false, Some(since)) = (s.terminal, s.since) {
                let a = age.entry((s.kind, &s.phase)).or_default();
                *a = a.max(now - since);
            }
            if s.usd_per_hour > 0.0 {
                *spend.entry(&s.namespace).or_default() += s.usd_per_hour;
            }
        }
        let budgets = self.budgets.lock().unwrap_or_else(PoisonError::into_inner);
        for ns in budgets.keys() {
            spend.entry(ns).or_default();
        }
        self.objects.clear();
        for ((kind, ns, phase), n) in objects {
            let l = vec![("kind", kind.to_owned()), ("namespace", ns.to_owned()), ("phase", phase.to_owned())];
            self.objects.get_or_create(&l).set(n);
        }
        self.orders_blocked.clear();
        for ((ns, domain, reason), n) in blocked {
            let l = vec![("namespace", ns.to_owned()), ("domain", domain.to_owned()), ("reason", reason.to_owned())];
            self.orders_blocked.get_or_create(&l).set(n);
        }
        self.phase_age.clear();
        for ((kind, phase), a) in age {
            self.phase_age.get_or_create(&vec![("kind", kind.to_owned()), ("phase", phase.to_owned())]).set(a.max(0.0));
        }
        self.spend_usd_per_hour.clear();
        for (ns, usd) in spend {
            self.spend_usd_per_hour.get_or_create(&vec![("namespace", ns.to_owned())]).set(usd);
        }
        self.budget_usd_per_day.clear();
        for (ns, usd) in budgets.iter() {
            self.budget_usd_per_day.get_or_create(&vec![("namespace", ns.clone())]).set(*usd);
        }
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
        self.errors.get_or_create(&error_labels(kind, category)).inc();
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
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        // Held while the derived families are rebuilt and encoded, so two scrapes never interleave.
        let standing = self.standing.lock().unwrap_or_else(PoisonError::into_inner);
        self.derive(&standing, now.as_secs_f64());
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

/// The labels of one reconcile-error series: kind, category and the category's failure domain.
fn error_labels(kind: &str, category: &str) -> Labels {
    let domain = crate::reason::Domain::of_error_category(category).as_str();
    vec![("kind", kind.to_owned()), ("category", category.to_owned()), ("domain", domain.to_owned())]
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn standing(namespace: &str, phase: &str, since: f64, blocked: Option<&str>, usd: f64) -> Standing {
        Standing {
            kind: "RunPodOrder",
            namespace: namespace.into(),
            phase: phase.into(),
            since: Some(since),
            blocked: blocked.map(|r| ("paid", r.to_owned())),
            terminal: phase == "DELETED",
            usd_per_hour: usd,
        }
    }

    #[test]
    fn derived_series_follow_the_objects_and_leave_nothing_stale() {
        let m = Metrics::new();
        m.observe("a".into(), standing("team-a", "REQUESTED", 100.0, Some("AwaitingApproval"), 0.0));
        m.observe("b".into(), standing("team-a", "REQUESTED", 400.0, Some("AwaitingApproval"), 0.0));
        m.observe("c".into(), standing("team-a", "RUNNER_ONLINE", 300.0, None, 0.72));
        m.observe("d".into(), standing("team-b", "DELETED", 0.0, None, 0.0));
        m.budget("team-a", Some(50.0));
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs_f64();
        let text = m.render();
        assert!(
            text.contains(r#"ep_orders_blocked{namespace="team-a",domain="paid",reason="AwaitingApproval"} 2"#),
            "{text}"
        );
        assert!(text.contains(r#"ep_objects{kind="RunPodOrder",namespace="team-a",phase="REQUESTED"} 2"#), "{text}");
        assert!(text.contains(r#"ep_spend_usd_per_hour{namespace="team-a"} 0.72"#), "{text}");
        assert!(text.contains(r#"ep_budget_usd_per_day{namespace="team-a"} 50.0"#), "{text}");
        // The oldest REQUESTED order counts; a finished one has no phase age.
        let age = text
            .lines()
            .find_map(|l| l.strip_prefix(r#"ep_phase_age_max_seconds{kind="RunPodOrder",phase="REQUESTED"} "#))
            .unwrap();
        assert!((age.parse::<f64>().unwrap() - (now - 100.0)).abs() < 60.0, "{age}");
        assert!(!text.contains(r#"ep_phase_age_max_seconds{kind="RunPodOrder",phase="DELETED"}"#), "{text}");

        // Approved and gone: no blocked series is left behind.
        m.observe("a".into(), standing("team-a", "PROVISIONED", 500.0, None, 0.0));
        m.forget("b");
        let text = m.render();
        assert!(!text.contains("ep_orders_blocked{"), "{text}");
        assert!(!text.contains(r#"phase="REQUESTED""#), "{text}");
    }
}
