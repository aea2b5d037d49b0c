//! `ep-operator run`: the three controllers, the registry mirror, the pod poller, metrics and
//! health endpoints, leader election and graceful shutdown.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use ep_api::{Experiment, RunPodOrder, RunPodProvider};
use futures::StreamExt;
use k8s_openapi::api::core::v1::ObjectReference;
use kube::runtime::controller::{Action, Config as ControllerConfig};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::{Controller, watcher};
use kube::{Api, ResourceExt};
use tokio::sync::{Semaphore, watch};

use crate::context::{Context, Error, RunnerBinary};
use crate::metrics::{self, Metrics};
use crate::mirror::{Mirror, Write};
use crate::provider::{ProviderPool, Seen};
use crate::registry::PgRegistry;
use crate::settings::{EMBEDDED_DEFAULT, Settings, SettingsHandle, SettingsWatcher, content_hash};
use crate::{experiment, order, provider};

/// Everything `ep-operator run` is told.
#[derive(Clone, Debug)]
pub struct RunOptions {
    /// Kubeconfig file; None uses KUBECONFIG, ~/.kube/config or the in-cluster service account.
    pub kubeconfig: Option<PathBuf>,
    /// Settings file (hot reloaded); None runs on the embedded default.
    pub settings: Option<PathBuf>,
    /// PostgreSQL URL of the registry; None turns the mirror off.
    pub database_url: Option<String>,
    /// Address of /metrics, /livez and /readyz.
    pub listen: SocketAddr,
    pub leader_election: bool,
    pub lease_namespace: String,
    pub lease_name: String,
    /// Identity in the lease (the pod name in a cluster).
    pub identity: String,
    /// The ep-runner binary uploaded to volumes.
    pub runner_binary: PathBuf,
}

/// Capped per-object backoff for transient errors.
#[derive(Default)]
struct Failures(Mutex<HashMap<String, u32>>);

impl Failures {
    fn next(&self, key: String) -> Duration {
        let mut m = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        let n = m.entry(key).or_insert(0);
        *n = (*n + 1).min(8);
        let base = Duration::from_millis(500) * 2u32.pow(*n - 1);
        base.min(Duration::from_secs(120)) + Duration::from_millis(fastrand::u64(0..250))
    }
    fn reset(&self, key: &str) {
        self.0.lock().unwrap_or_else(PoisonError::into_inner).remove(key);
    }
}

struct Shared {
    ctx: Arc<Context>,
    failures: Failures,
}

fn key<K: kube::Resource>(kind: &str, o: &K) -> String {
    format!("{kind}/{}/{}", o.meta().namespace.clone().unwrap_or_default(), o.meta().name.clone().unwrap_or_default())
}

fn on_error<K: kube::Resource>(kind: &'static str, o: &K, e: &Error, s: &Shared) -> Action {
    s.ctx.metrics.error(kind, e.category());
    let k = key(kind, o);
    let wait = s.failures.next(k.clone());
    tracing::warn!(object = %k, error = %e, retry_in = ?wait, "reconcile failed");
    Action::requeue(wait)
}

/// Runs one reconcile; a success clears the object's error backoff.
async fn reconcile_with<K, F, Fut>(kind: &'static str, obj: Arc<K>, s: Arc<Shared>, f: F) -> Result<Action, Error>
where
    K: kube::Resource,
    F: FnOnce(Arc<K>, Arc<Context>) -> Fut,
    Fut: Future<Output = Result<Action, Error>>,
{
    let k = key(kind, obj.as_ref());
    let r = f(obj, s.ctx.clone()).await;
    if r.is_ok() {
        s.failures.reset(&k);
    }
    r
}

fn shutdown_future(rx: &watch::Receiver<bool>) -> impl Future<Output = ()> + Send + Sync + 'static {
    let mut rx = rx.clone();
    async move {
        let _ = rx.wait_for(|v| *v).await;
    }
}

async fn kube_client(opts: &RunOptions) -> Result<kube::Client, Box<dyn std::error::Error>> {
    let config = match &opts.kubeconfig {
        Some(path) => {
            let kc = kube::config::Kubeconfig::read_from(path)?;
            kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default()).await?
        }
        None => kube::Config::infer().await?,
    };
    let mut config = config;
    // Named in the API server's audit log (and in kube-sim's, which the RBAC test reads).
    config.headers.push((
        http::header::USER_AGENT,
        http::HeaderValue::from_static(concat!("ep-operator/", env!("CARGO_PKG_VERSION"))),
    ));
    Ok(kube::Client::try_from(config)?)
}

fn settings(
    opts: &RunOptions,
    mirror: &Mirror,
    metrics: &Arc<Metrics>,
    recorder: Recorder,
) -> Result<SettingsHandle, Box<dyn std::error::Error>> {
    let record = |s: &Settings, sha: String| {
        mirror.send(Write::Settings {
            sha256: sha,
            body: serde_json::to_value(s).unwrap_or_default(),
            at: crate::time::now(),
        });
    };
    let Some(path) = &opts.settings else {
        let s = Settings::embedded_default();
        record(&s, content_hash(EMBEDDED_DEFAULT.as_bytes()));
        return Ok(SettingsHandle::fixed(s));
    };
    let (watcher, handle) = SettingsWatcher::load(path)?;
    record(&handle.current(), handle.status().active_sha256);
    watcher.spawn(Duration::from_secs(2));
    let mut status = handle.subscribe_status();
    let (mirror, metrics, h) = (mirror.clone(), metrics.clone(), handle.clone());
    let pod = ObjectReference {
        api_version: Some("v1".into()),
        kind: Some("Pod".into()),
        name: Some(opts.identity.clone()),
        namespace: Some(opts.lease_namespace.clone()),
        ..ObjectReference::default()
    };
    tokio::spawn(async move {
        while status.changed().await.is_ok() {
            let st = status.borrow_and_update().clone();
            metrics.settings_rejections.set(i64::try_from(st.rejections).unwrap_or(i64::MAX));
            if let Some(r) = &st.last_rejection {
                // Visible where people look: an event on the operator's own pod.
                let ev = Event {
                    type_: EventType::Warning,
                    reason: "SettingsRejected".into(),
                    note: Some(
                        format!("{}; the last good settings stay in force", r.error).chars().take(1000).collect(),
                    ),
                    action: "Reload".into(),
                    secondary: None,
                };
                if let Err(e) = recorder.publish(&ev, &pod).await {
                    tracing::debug!(error = %e, "settings event not published");
                }
            } else {
                mirror.send(Write::Settings {
                    sha256: st.active_sha256.clone(),
                    body: serde_json::to_value(h.current().as_ref()).unwrap_or_default(),
                    at: crate::time::now(),
                });
            }
        }
    });
    Ok(handle)
}

/// Runs the operator until SIGTERM or SIGINT (or, with leader election, until the lease is lost).
pub async fn run(opts: RunOptions) -> Result<(), Box<dyn std::error::Error>> {
    let metrics = Arc::new(Metrics::new());
    let mirror = Mirror::new(metrics.clone());
    let client = kube_client(&opts).await?;
    let reporter = Reporter { controller: "ep-operator".into(), instance: Some(opts.identity.clone()) };
    let settings = settings(&opts, &mirror, &metrics, Recorder::new(client.clone(), reporter.clone()))?;
    let runner = RunnerBinary::load(&opts.runner_binary).map_err(|e| {
        format!("--runner-binary {}: {e} (build it with `cargo build -p ep-runner`)", opts.runner_binary.display())
    })?;
    let (stop_tx, stop_rx) = watch::channel(false);
    {
        let stop_tx = stop_tx.clone();
        tokio::spawn(async move {
            let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                () = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending().await } } => {}
            }
            tracing::info!("shutting down");
            let _ = stop_tx.send(true);
        });
    }
    let server = tokio::spawn(metrics::serve(opts.listen, metrics.clone(), shutdown_future(&stop_rx)));

    if let Some(url) = &opts.database_url {
        let registry = PgRegistry::connect_lazy(url)?;
        let (r, m) = (registry.clone(), mirror.clone());
        tokio::spawn(async move {
            // Migrations first (idempotent); the mirror holds its queue until they are applied.
            let mut wait = Duration::from_millis(500);
            loop {
                match r.migrate().await {
                    Ok(()) => break,
                    Err(e) => {
                        tracing::warn!(error = %e, "registry migrations not applied yet; retrying");
                        tokio::time::sleep(wait).await;
                        wait = (wait * 2).min(Duration::from_secs(10));
                    }
                }
            }
            m.run(r).await;
        });
    } else {
        tracing::warn!("no --database-url: the registry mirror is off");
    }

    // Ready once the API server answers: a standby replica is ready too (it serves metrics and is
    // ready to lead), so a two-replica rollout completes; `ep_leader` says which one acts.
    client.apiserver_version().await.map_err(|e| format!("the Kubernetes API does not answer: {e}"))?;
    metrics.set_ready(true);
    let mut lease_task = None;
    if opts.leader_election {
        let manager = kube_lease_manager::LeaseManagerBuilder::new(client.clone(), &opts.lease_name)
            .with_namespace(&opts.lease_namespace)
            .with_identity(&opts.identity)
            .with_duration(15)
            .with_grace(5)
            .build()
            .await?;
        let (mut leader, task) = manager.watch().await;
        lease_task = Some(task);
        tracing::info!(lease = %opts.lease_name, namespace = %opts.lease_namespace, identity = %opts.identity, "waiting for leadership");
        let mut stop = stop_rx.clone();
        tokio::select! {
            r = leader.wait_for(|v| *v) => { r?; }
            _ = stop.wait_for(|v| *v) => { server.abort(); return Ok(()); }
        }
        metrics.leader.set(1);
        tracing::info!("leading");
        let (stop_tx, metrics) = (stop_tx.clone(), metrics.clone());
        tokio::spawn(async move {
            let _ = leader.wait_for(|v| !*v).await;
            metrics.leader.set(0);
            tracing::error!("leader lease lost: stopping so that only one replica acts");
            let _ = stop_tx.send(true);
            // Keep the receiver alive until the process ends so the lease is not released twice.
            std::future::pending::<()>().await;
        });
    }

    let reconciles = settings.current().concurrency.reconciles;
    let syncs = settings.current().concurrency.syncs;
    let ctx = Arc::new(Context {
        client: client.clone(),
        settings: settings.clone(),
        providers: ProviderPool::default(),
        seen_pods: Seen::default(),
        mirror: mirror.clone(),
        metrics: metrics.clone(),
        recorder: Recorder::new(
            client.clone(),
            Reporter { controller: "ep-operator".into(), instance: Some(opts.identity.clone()) },
        ),
        runner,
        sync_slots: Semaphore::new(usize::from(syncs.max(1))),
        staging: std::env::temp_dir().join(format!("ep-operator-{}", std::process::id())),
    });
    let shared = Arc::new(Shared { ctx: ctx.clone(), failures: Failures::default() });
    let config = ControllerConfig::default().concurrency(reconciles.max(1));

    // One list call per poll interval per provider, shared by every order; each refresh wakes the orders.
    let (tick_tx, tick_rx) = tokio::sync::mpsc::unbounded_channel::<()>();
    {
        let ctx = ctx.clone();
        let mut stop = stop_rx.clone();
        tokio::spawn(async move {
            loop {
                let poll = ctx.poll();
                tokio::select! {
                    () = tokio::time::sleep(poll) => {}
                    _ = stop.wait_for(|v| *v) => return,
                }
                let providers = Api::<RunPodProvider>::all(ctx.client.clone()).list(&Default::default()).await;
                for p in providers.map(|l| l.items).unwrap_or_default() {
                    if let Ok(conn) = ctx.providers.get(&ctx.client, &p.name_any(), &ctx.metrics).await
                        && let Err(e) = conn.pods(poll / 2).await
                    {
                        tracing::warn!(provider = %p.name_any(), error = %e, "pod list failed");
                    }
                }
                let _ = tick_tx.send(());
            }
        });
    }
    let ticks = futures::stream::unfold(tick_rx, |mut rx| async move { rx.recv().await.map(|t| (t, rx)) });
    let lag_changes =
        futures::stream::unfold(
            mirror.subscribe(),
            |mut lag| async move { lag.changed().await.ok().map(|()| ((), lag)) },
        );

    let s = shared.clone();
    let providers = Controller::new(Api::<RunPodProvider>::all(client.clone()), watcher::Config::default())
        .with_config(config.clone())
        .graceful_shutdown_on(shutdown_future(&stop_rx))
        .run(
            |o, s| reconcile_with(provider::KIND_NAME, o, s, provider::reconcile),
            |o, e, s| on_error(provider::KIND_NAME, o.as_ref(), e, &s),
            s,
        )
        .for_each(|_| async {});
    let s = shared.clone();
    let experiments = Controller::new(Api::<Experiment>::all(client.clone()), watcher::Config::default())
        .watches(Api::<RunPodOrder>::all(client.clone()), watcher::Config::default(), |o: RunPodOrder| {
            let ns = o.namespace()?;
            o.spec.experiment_ref.map(|r| ObjectRef::new(&r.name).within(&ns))
        })
        .reconcile_all_on(lag_changes)
        .with_config(config.clone())
        .graceful_shutdown_on(shutdown_future(&stop_rx))
        .run(
            |o, s| reconcile_with(experiment::KIND, o, s, experiment::reconcile),
            |o, e, s| on_error(experiment::KIND, o.as_ref(), e, &s),
            s,
        )
        .for_each(|_| async {});
    let s = shared.clone();
    let orders = Controller::new(Api::<RunPodOrder>::all(client.clone()), watcher::Config::default())
        .reconcile_all_on(ticks)
        .with_config(config)
        .graceful_shutdown_on(shutdown_future(&stop_rx))
        .run(
            |o, s| reconcile_with(order::KIND, o, s, order::reconcile),
            |o, e, s| on_error(order::KIND, o.as_ref(), e, &s),
            s,
        )
        .for_each(|_| async {});
    tracing::info!(listen = %opts.listen, "ep-operator running");
    tokio::join!(providers, experiments, orders);
    metrics.set_ready(false);
    let _ = stop_tx.send(true);
    // Give the mirror a moment to write what the last passes queued.
    if opts.database_url.is_some() {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
        while mirror.lag().pending > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    if let Some(t) = lease_task {
        t.abort();
    }
    let _ = server.await;
    let _ = std::fs::remove_dir_all(&ctx.staging);
    Ok(())
}
