//! `ep-operator run`: the three controllers, the registry projection, the pod poller, metrics and
//! health endpoints, leader election and graceful shutdown.

mod caches;
mod controllers;
mod lease;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::ObjectReference;
use tokio::sync::watch;

use crate::context::RunnerBinary;
use crate::events::Events;
use crate::metrics::{self, Metrics};
use crate::projection::Projector;
use crate::reason::Reason;
use crate::registry::PgRegistry;
use crate::settings::{EMBEDDED_DEFAULT, Settings, SettingsHandle, SettingsWatcher, content_hash};

/// Everything `ep-operator run` is told.
#[derive(Clone, Debug)]
pub struct RunOptions {
    /// Kubeconfig file; None uses KUBECONFIG, ~/.kube/config or the in-cluster service account.
    pub kubeconfig: Option<PathBuf>,
    /// Settings file (hot reloaded); None runs on the embedded default.
    pub settings: Option<PathBuf>,
    /// PostgreSQL URL of the registry; None turns the projection off.
    pub database_url: Option<String>,
    /// Address of /metrics, /livez and /readyz.
    pub listen: SocketAddr,
    /// Only the holder of the Lease acts (on by default: two replicas never both act).
    pub leader_election: bool,
    pub lease_namespace: String,
    pub lease_name: String,
    /// How long a lease lasts without renewal (a crashed leader is replaced after this).
    pub lease_duration: Duration,
    /// Identity in the lease (the pod name in a cluster).
    pub identity: String,
    /// The ep-runner binary uploaded to volumes.
    pub runner_binary: PathBuf,
}

type BoxError = Box<dyn std::error::Error>;

async fn kube_client(opts: &RunOptions) -> Result<kube::Client, BoxError> {
    let mut config = match &opts.kubeconfig {
        Some(path) => {
            let kc = kube::config::Kubeconfig::read_from(path)?;
            kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default()).await?
        }
        None => kube::Config::infer().await?,
    };
    // Named in the API server's audit log (and in kube-sim's, which the RBAC test reads).
    config.headers.push((
        http::header::USER_AGENT,
        http::HeaderValue::from_static(concat!("ep-operator/", env!("CARGO_PKG_VERSION"))),
    ));
    Ok(kube::Client::try_from(config)?)
}

/// The operator's own pod, where settings refusals are reported.
fn own_pod(opts: &RunOptions) -> ObjectReference {
    ObjectReference {
        api_version: Some("v1".into()),
        kind: Some("Pod".into()),
        name: Some(opts.identity.clone()),
        namespace: Some(opts.lease_namespace.clone()),
        ..ObjectReference::default()
    }
}

/// Loads the settings, records them in the registry, and reports every reload: an applied file
/// in the registry, a refused one in a metric and an Event on the operator's pod.
fn settings(
    opts: &RunOptions,
    projector: &Projector,
    metrics: &Arc<Metrics>,
    events: Events,
) -> Result<SettingsHandle, BoxError> {
    let record = |p: &Projector, s: &Settings, sha: String| {
        p.settings(sha, serde_json::to_value(s).unwrap_or_default(), crate::time::now());
    };
    let Some(path) = &opts.settings else {
        let s = Settings::embedded_default();
        record(projector, &s, content_hash(EMBEDDED_DEFAULT.as_bytes()));
        return Ok(SettingsHandle::fixed(s));
    };
    let (watcher, handle) = SettingsWatcher::load(path)?;
    record(projector, &handle.current(), handle.status().active_sha256);
    watcher.spawn(Duration::from_secs(2));
    let mut status = handle.subscribe_status();
    let (projector, metrics, h, pod) = (projector.clone(), metrics.clone(), handle.clone(), own_pod(opts));
    tokio::spawn(async move {
        while status.changed().await.is_ok() {
            let st = status.borrow_and_update().clone();
            // The watcher counts rejections since start; the counter moves by what is new.
            let seen = metrics.settings_rejections.get();
            metrics.settings_rejections.inc_by(st.rejections.saturating_sub(seen));
            match &st.last_rejection {
                Some(r) => {
                    let note = format!("{}; the last good settings stay in force", r.error);
                    events.publish(&pod, Reason::SettingsRejected, "Reload", &note).await;
                }
                None => record(&projector, &h.current(), st.active_sha256.clone()),
            }
        }
    });
    Ok(handle)
}

fn shutdown_future(rx: &watch::Receiver<bool>) -> impl Future<Output = ()> + Send + Sync + 'static {
    let mut rx = rx.clone();
    async move {
        let _ = rx.wait_for(|v| *v).await;
    }
}

/// Flips `stop` on SIGTERM or SIGINT.
fn on_signal(stop: watch::Sender<bool>) {
    tokio::spawn(async move {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            () = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending().await } } => {}
        }
        tracing::info!("shutting down");
        let _ = stop.send(true);
    });
}

/// Migrations, then the projection's writer, forever.
fn start_registry(url: &str, projector: Projector, events: Events) -> Result<(), BoxError> {
    let registry = PgRegistry::connect_lazy(url)?;
    tokio::spawn(async move {
        let mut wait = Duration::from_millis(500);
        while let Err(e) = registry.migrate().await {
            tracing::warn!(error = %e, "registry migrations not applied yet; retrying");
            if matches!(e, crate::registry::RegistryError::SchemaRefused(_)) {
                projector.schema_refused(Some(e.to_string()));
            }
            tokio::time::sleep(wait).await;
            wait = (wait * 2).min(Duration::from_secs(10));
        }
        projector.schema_refused(None);
        projector.run(registry, Some(events)).await;
    });
    Ok(())
}

/// Staging directories of operators that are gone (a crash leaves them behind).
fn remove_stale_staging(root: &std::path::Path) {
    let Ok(entries) = std::fs::read_dir(root) else { return };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(pid) = name.strip_prefix("ep-operator-").and_then(|p| p.parse::<u32>().ok()) else { continue };
        if pid != std::process::id() && !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

/// Runs the operator until SIGTERM or SIGINT (or, with leader election, until the lease is lost).
pub async fn run(opts: RunOptions) -> Result<(), BoxError> {
    let metrics = Arc::new(Metrics::new());
    // Bound first: an operator that cannot serve its probes and metrics does not start.
    let listener = tokio::net::TcpListener::bind(opts.listen)
        .await
        .map_err(|e| format!("--listen {}: cannot bind: {e}", opts.listen))?;
    let client = kube_client(&opts).await?;
    let events = Events::new(&client, &opts.identity);
    let projector = Projector::new(metrics.clone(), opts.database_url.is_some());
    let settings = settings(&opts, &projector, &metrics, events.clone())?;
    let runner = RunnerBinary::load(&opts.runner_binary).map_err(|e| {
        format!("--runner-binary {}: {e} (build it with `cargo build -p ep-runner`)", opts.runner_binary.display())
    })?;
    let (stop_tx, stop_rx) = watch::channel(false);
    on_signal(stop_tx.clone());
    let server = tokio::spawn(metrics::serve(listener, metrics.clone(), shutdown_future(&stop_rx)));
    // Ready once the API server answers: a standby replica is ready too (it serves metrics and is
    // ready to lead), so a two-replica rollout completes; `ep_leader` says which one acts.
    client.apiserver_version().await.map_err(|e| format!("the Kubernetes API does not answer: {e}"))?;
    metrics.set_ready(true);
    let lease = if opts.leader_election {
        match lease::lead(&client, &opts, &metrics, &stop_tx, &stop_rx).await? {
            Some(task) => Some(task),
            None => {
                server.abort();
                return Ok(());
            }
        }
    } else {
        tracing::warn!("leader election is off: make sure no other replica runs");
        None
    };
    metrics.leader.set(1);
    if let Some(url) = &opts.database_url {
        start_registry(url, projector.clone(), events.clone())?;
    } else {
        tracing::warn!("no --database-url: the registry projection is off");
    }
    let staging = std::env::temp_dir().join(format!("ep-operator-{}", std::process::id()));
    remove_stale_staging(&std::env::temp_dir());
    let parts = controllers::Parts {
        client,
        settings,
        projector: projector.clone(),
        metrics: metrics.clone(),
        events,
        runner,
        staging: staging.clone(),
    };
    tracing::info!(listen = %opts.listen, "ep-operator running");
    controllers::run(parts, &stop_rx).await;
    metrics.set_ready(false);
    metrics.leader.set(0);
    let _ = stop_tx.send(true);
    // Give the projection a moment to write what the last passes queued.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
    while opts.database_url.is_some() && projector.lag().pending > 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    if let Some(t) = lease {
        t.abort();
    }
    let _ = server.await;
    let _ = std::fs::remove_dir_all(&staging);
    Ok(())
}
