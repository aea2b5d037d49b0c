//! The three kube-runtime controllers, their caches, the shared pod poller, the projection's
//! resync, and what every reconcile shares: per-object backoff, errors reported as Warning Events
//! and metrics, and objects that do not decode skipped with an Event.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use ep_api::order::OrderPhase;
use ep_api::{Experiment, RunPodOrder};
use futures::{Stream, StreamExt};
use kube::runtime::Controller;
use kube::runtime::controller::{Action, Config as ControllerConfig};
use kube::runtime::reflector::ObjectRef;
use kube::{Resource, ResourceExt};
use tokio::sync::watch;

use super::caches::{Caches, caches};
use super::shutdown_future;
use crate::context::{Context, RunnerBinary, Stores};
use crate::error::Error;
use crate::events::Events;
use crate::lenient::Lenient;
use crate::metrics::Metrics;
use crate::pool::{ProviderPool, SeenPods};
use crate::projection::Projector;
use crate::reason::Reason;
use crate::settings::SettingsHandle;
use crate::slots::Slots;
use crate::{experiment, order, provider};

/// What the controllers are built from.
pub struct Parts {
    pub client: kube::Client,
    pub settings: SettingsHandle,
    pub projector: Projector,
    pub metrics: Arc<Metrics>,
    pub events: Events,
    pub runner: RunnerBinary,
    pub staging: PathBuf,
}

/// Capped, jittered per-object backoff for transient errors.
#[derive(Default)]
struct Failures(Mutex<HashMap<String, (u32, Instant)>>);

impl Failures {
    fn next(&self, key: String) -> Duration {
        let mut m = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        let entry = m.entry(key).or_insert((0, Instant::now()));
        entry.0 = (entry.0 + 1).min(8);
        let wait = (Duration::from_millis(500) * 2u32.pow(entry.0 - 1)).min(Duration::from_secs(120))
            + Duration::from_millis(fastrand::u64(0..250));
        entry.1 = Instant::now() + wait;
        wait
    }

    fn reset(&self, key: &str) {
        self.0.lock().unwrap_or_else(PoisonError::into_inner).remove(key);
    }

    /// Whether the object waits out a backoff now (a poll must not retry it early).
    fn backing_off(&self, key: &str) -> bool {
        self.0.lock().unwrap_or_else(PoisonError::into_inner).get(key).is_some_and(|(_, until)| *until > Instant::now())
    }
}

/// When each order's last pass started, and how long order passes take (a moving average): what the
/// poller needs to keep its wake-ups to a share of the controller's capacity.
#[derive(Default)]
struct Passes {
    started: Mutex<HashMap<String, Instant>>,
    /// Exponentially weighted mean duration of an order pass, in microseconds (0: none yet).
    mean_us: std::sync::atomic::AtomicU64,
}

impl Passes {
    fn start(&self, key: &str) {
        self.started.lock().unwrap_or_else(PoisonError::into_inner).insert(key.to_owned(), Instant::now());
    }

    fn took(&self, d: Duration) {
        use std::sync::atomic::Ordering::Relaxed;
        let sample = u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        let old = self.mean_us.load(Relaxed);
        let new = if old == 0 { sample } else { (old * 7 + sample) / 8 };
        self.mean_us.store(new, Relaxed);
    }

    fn last_started(&self, key: &str) -> Option<Instant> {
        self.started.lock().unwrap_or_else(PoisonError::into_inner).get(key).copied()
    }

    fn forget(&self, keep: &HashSet<String>) {
        self.started.lock().unwrap_or_else(PoisonError::into_inner).retain(|k, _| keep.contains(k));
    }
}

/// How many live orders one poll tick may wake: half of what the controller can pass in a poll
/// interval (its concurrency times the interval over the mean pass), so that new orders and every
/// other change always find a slot. Without this bound the poll's wake-ups fill the queue and
/// kube-runtime, which takes held messages in no particular order, can leave a new order waiting
/// for minutes.
pub fn poll_share(concurrency: u16, poll: Duration, mean_pass: Duration) -> usize {
    if mean_pass.is_zero() {
        return usize::MAX;
    }
    let capacity = f64::from(concurrency.max(1)) * poll.as_secs_f64() / mean_pass.as_secs_f64();
    ((capacity / 2.0).floor() as usize).max(1)
}

/// The live orders a tick wakes: those not passed within the last poll interval, the longest
/// waiting first, at most `share` of them.
pub fn due(candidates: Vec<(&str, Option<Instant>)>, now: Instant, poll: Duration, share: usize) -> Vec<&str> {
    let mut due: Vec<(&str, Option<Instant>)> = candidates
        .into_iter()
        .filter(|(_, last)| last.is_none_or(|t| now.saturating_duration_since(t) >= poll.mul_f64(0.9)))
        .collect();
    // Never passed first, then the oldest pass.
    due.sort_by_key(|(_, last)| *last);
    due.into_iter().take(share).map(|(k, _)| k).collect()
}

struct Shared {
    ctx: Arc<Context>,
    failures: Failures,
    passes: Passes,
    /// Passes running at once, by kind (settings `concurrency.reconciles`, hot-reloaded).
    reconciles: HashMap<&'static str, Slots>,
    /// Objects already reported as undecodable, by uid and resourceVersion.
    undecodable: Mutex<HashSet<String>>,
}

fn key<K: Resource>(kind: &str, o: &K) -> String {
    format!("{kind}/{}/{}", o.meta().namespace.clone().unwrap_or_default(), o.meta().name.clone().unwrap_or_default())
}

/// Reports a failed reconcile where people look (a Warning Event on the object, the error metric)
/// and backs off per object.
fn on_error<K: Resource<DynamicType = ()>>(kind: &'static str, o: &K, e: &Error, s: &Shared) -> Action {
    if let Some(wait) = e.is_wait() {
        return Action::requeue(wait);
    }
    s.ctx.metrics.error(kind, e.category());
    let k = key(kind, o);
    let wait = s.failures.next(k.clone());
    tracing::warn!(object = %k, error = %e, retry_in = ?wait, "reconcile failed");
    let (events, reference, note) = (
        s.ctx.events.clone(),
        o.object_ref(&()),
        format!(
            "{} (failure domain: {}): {e}",
            e.category(),
            crate::reason::Domain::of_error_category(e.category()).as_str()
        ),
    );
    tokio::spawn(async move { events.publish(&reference, Reason::ReconcileError, "Reconcile", &note).await });
    Action::requeue(wait)
}

/// Runs one reconcile of a decoded object; an object that does not decode is reported once per
/// version and skipped. A success clears the object's error backoff.
async fn reconcile_with<K, F, Fut>(
    kind: &'static str,
    obj: Arc<Lenient<K>>,
    s: Arc<Shared>,
    f: F,
) -> Result<Action, Error>
where
    K: Resource<DynamicType = ()>,
    F: FnOnce(Arc<K>, Arc<Context>) -> Fut,
    Fut: Future<Output = Result<Action, Error>>,
{
    let k = key(kind, obj.as_ref());
    let inner = match &obj.inner {
        Ok(inner) => inner.clone(),
        Err(why) => {
            let version = format!(
                "{}/{}",
                obj.meta().uid.clone().unwrap_or_default(),
                obj.resource_version().unwrap_or_default()
            );
            if s.undecodable.lock().unwrap_or_else(PoisonError::into_inner).insert(version) {
                tracing::error!(object = %k, error = %why, "object does not decode; skipped");
                let note = format!("{kind} {k} does not match the operator's schema and is skipped: {why}");
                s.ctx.events.publish(&obj.object_ref(&()), Reason::Undecodable, "Decode", &note).await;
            }
            return Ok(Action::await_change());
        }
    };
    let _slot = match s.reconciles.get(kind) {
        Some(slots) => slots.acquire().await,
        None => None,
    };
    let start = Instant::now();
    if kind == order::KIND {
        s.passes.start(&k);
    }
    let r = f(inner, s.ctx.clone()).await;
    s.ctx.metrics.reconcile_took(kind, start.elapsed());
    if kind == order::KIND {
        s.passes.took(start.elapsed());
    }
    if r.is_ok() {
        s.failures.reset(&k);
    }
    r
}

/// Consumes a controller's results: a failure of the machinery itself is logged, never dropped.
async fn drain_results<K: Resource, E: std::fmt::Display>(
    kind: &'static str,
    results: impl Stream<Item = Result<(ObjectRef<K>, Action), E>>,
) {
    results
        .for_each(|r| async move {
            if let Err(e) = r {
                tracing::debug!(kind, error = %e, "controller result");
            }
        })
        .await;
}

/// Whether a poll of RunPod can change the order (a pod may exist for it).
fn live(o: &RunPodOrder) -> bool {
    matches!(
        o.status.as_ref().and_then(|s| s.phase),
        Some(OrderPhase::Verified | OrderPhase::RunnerOnline | OrderPhase::Draining)
    )
}

/// One pod-list call per poll interval per provider, shared by every order; each refresh wakes
/// the live orders that are not backing off.
fn poller(shared: Arc<Shared>, stop: watch::Receiver<bool>) -> impl Stream<Item = ObjectRef<Lenient<RunPodOrder>>> {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut stop = stop;
        loop {
            let ctx = &shared.ctx;
            let poll = ctx.poll();
            tokio::select! {
                () = tokio::time::sleep(poll) => {}
                _ = stop.wait_for(|v| *v) => return,
            }
            for p in ctx.stores.providers.state().iter().filter_map(|l| l.get().cloned()) {
                if let Ok(conn) = ctx.providers.get(&ctx.client, &p, &ctx.metrics).await
                    && let Err(e) = conn.pods(poll / 2, 0).await
                {
                    tracing::warn!(provider = %p.name_any(), error = %e, "pod list failed");
                }
            }
            let orders = ctx.stores.all_orders();
            let keys: Vec<(String, Arc<RunPodOrder>)> = orders
                .into_iter()
                .filter(|o| live(o))
                .map(|o| (key(order::KIND, o.as_ref()), o))
                .filter(|(k, _)| !shared.failures.backing_off(k))
                .collect();
            let mean = Duration::from_micros(shared.passes.mean_us.load(std::sync::atomic::Ordering::Relaxed));
            let concurrency = shared.reconciles.get(order::KIND).map_or(1, Slots::size);
            let share = poll_share(u16::try_from(concurrency).unwrap_or(u16::MAX), poll, mean);
            let candidates = keys.iter().map(|(k, _)| (k.as_str(), shared.passes.last_started(k))).collect();
            let wake: HashSet<&str> = due(candidates, Instant::now(), poll, share).into_iter().collect();
            tracing::debug!(live = keys.len(), share, mean_pass = ?mean, woken = wake.len(), "poll tick");
            for (_, o) in keys.iter().filter(|(k, _)| wake.contains(k.as_str())) {
                let r = ObjectRef::new(&o.name_any()).within(&o.namespace().unwrap_or_default());
                let _ = tx.send(r);
            }
            shared.passes.forget(&keys.iter().map(|(k, _)| k.clone()).collect());
        }
    });
    futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|r| (r, rx)) })
}

/// The most passes of one kind kube-runtime runs at once; `concurrency.reconciles` below it
/// applies without a restart (above it, from the next start).
const RECONCILES_CEILING: u16 = 64;

/// Applies `concurrency.*` from each settings reload to the running limits.
fn follow_concurrency(shared: Arc<Shared>) {
    let mut settings = shared.ctx.settings.subscribe();
    tokio::spawn(async move {
        loop {
            let c = settings.borrow_and_update().concurrency.clone();
            let reconciles = usize::from(c.reconciles);
            let ctx = &shared.ctx;
            let mut changed = ctx.sync_slots.resize(usize::from(c.syncs));
            changed |= ctx.create_slots.resize(reconciles.saturating_sub(1));
            for slots in shared.reconciles.values() {
                changed |= slots.resize(reconciles);
            }
            // The limits as the slots hold them, not as the file says them.
            let limit = |l: &str| vec![("limit", l.to_owned())];
            let held = shared.reconciles.get(order::KIND).map_or(0, Slots::size);
            ctx.metrics.concurrency_limit.get_or_create(&limit("reconciles")).set(i64::try_from(held).unwrap_or(0));
            let syncs = i64::try_from(ctx.sync_slots.size()).unwrap_or(0);
            ctx.metrics.concurrency_limit.get_or_create(&limit("syncs")).set(syncs);
            if changed {
                tracing::info!(reconciles, syncs = c.syncs, "concurrency changed");
            }
            if settings.changed().await.is_err() {
                return;
            }
        }
    });
}

/// The registry's divergence audit, against the experiments the caches hold.
fn audit(ctx: &Arc<Context>, every: Duration) {
    let c = ctx.clone();
    let cluster =
        move || c.stores.all_experiments().iter().map(|e| (e.namespace().unwrap_or_default(), e.name_any())).collect();
    ctx.projector.audit_against(Arc::new(cluster), every);
}

/// Re-projects every cached object now and then, so a registry changed or emptied by hand
/// converges without a restart.
fn resync(ctx: Arc<Context>, every: Duration) {
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(every).await;
            ctx.projector.resync();
            for e in ctx.stores.all_experiments() {
                ctx.projector.experiment(&e);
            }
            for o in ctx.stores.all_orders() {
                ctx.projector.order(&o);
            }
        }
    });
}

/// The experiment an order serves: a change to the order wakes it.
fn parent_of(o: &Lenient<RunPodOrder>) -> Option<ObjectRef<Lenient<Experiment>>> {
    let name = o.get()?.spec.experiment_ref.as_ref()?.name.clone();
    Some(ObjectRef::new(&name).within(&o.namespace()?))
}

/// The current order of an approved experiment: an approval given on the experiment admits its
/// waiting order at once.
fn approved_order(e: &Lenient<Experiment>) -> Option<ObjectRef<Lenient<RunPodOrder>>> {
    let exp = e.get().filter(|x| x.spec.approval.is_some())?;
    let order = exp.status.as_ref()?.current_attempt.as_ref()?.order.clone()?;
    Some(ObjectRef::new(&order).within(&e.namespace()?))
}

/// The context every pass shares, and the controllers' own state.
fn shared_state(p: Parts, stores: Stores) -> Arc<Shared> {
    let settings = p.settings.current();
    let ctx = Arc::new(Context {
        client: p.client.clone(),
        stores,
        settings: p.settings,
        providers: ProviderPool::default(),
        seen_pods: SeenPods::default(),
        projector: p.projector,
        metrics: p.metrics,
        events: p.events,
        runner: p.runner,
        sync_slots: Slots::new(usize::from(settings.concurrency.syncs)),
        create_slots: Slots::new(usize::from(settings.concurrency.reconciles.saturating_sub(1))),
        staging: p.staging,
    });
    ctx.metrics.init_errors(&[experiment::KIND, order::KIND, provider::KIND], Error::CATEGORIES);
    Arc::new(Shared {
        ctx,
        failures: Failures::default(),
        passes: Passes::default(),
        reconciles: [experiment::KIND, order::KIND, provider::KIND]
            .into_iter()
            .map(|k| (k, Slots::new(usize::from(settings.concurrency.reconciles))))
            .collect(),
        undecodable: Mutex::default(),
    })
}

/// Builds the controllers and runs them until `stop`.
pub async fn run(p: Parts, stop: &watch::Receiver<bool>) {
    let client = p.client.clone();
    let Some(Caches {
        stores,
        providers,
        experiments: [experiments, approvals],
        orders: [order_events, children],
        watches,
    }) = caches(&client, stop).await
    else {
        return;
    };
    let providers = Controller::for_shared_stream(providers, stores.providers.clone());
    let experiments = Controller::for_shared_stream(experiments, stores.experiments.clone());
    let orders = Controller::for_shared_stream(order_events, stores.orders.clone());
    let shared = shared_state(p, stores);
    let ctx = shared.ctx.clone();
    let settings = ctx.settings.current();
    // kube-runtime's own limit is a ceiling fixed at start; the slots above apply the settings.
    let config = ControllerConfig::default().concurrency(RECONCILES_CEILING.max(settings.concurrency.reconciles));
    follow_concurrency(shared.clone());
    resync(ctx.clone(), Duration::from_secs(600));
    audit(&ctx, settings.poll_interval.get() * 10);
    let lag = ctx.projector.subscribe();
    let lag_changes = futures::stream::unfold(lag, |mut l| async move { l.changed().await.ok().map(|()| ((), l)) });

    let s = shared.clone();
    let providers = providers.with_config(config.clone()).graceful_shutdown_on(shutdown_future(stop)).run(
        |o, s| reconcile_with(provider::KIND, o, s, provider::reconcile),
        |o, e, s| on_error(provider::KIND, o.as_ref(), e, &s),
        s,
    );
    let s = shared.clone();
    let experiments = experiments
        .watches_shared_stream(children, |o| parent_of(&o))
        .reconcile_all_on(lag_changes)
        .with_config(config.clone())
        .graceful_shutdown_on(shutdown_future(stop))
        .run(
            |o, s| reconcile_with(experiment::KIND, o, s, experiment::reconcile),
            |o, e, s| on_error(experiment::KIND, o.as_ref(), e, &s),
            s,
        );
    let s = shared.clone();
    let orders = orders
        .watches_shared_stream(approvals, |e| approved_order(&e))
        .reconcile_on(poller(shared.clone(), stop.clone()))
        .with_config(config)
        .graceful_shutdown_on(shutdown_future(stop))
        .run(
            |o, s| reconcile_with(order::KIND, o, s, order::reconcile),
            |o, e, s| on_error(order::KIND, o.as_ref(), e, &s),
            s,
        );
    tokio::join!(
        drain_results(provider::KIND, providers),
        drain_results(experiment::KIND, experiments),
        drain_results(order::KIND, orders)
    );
    watches.iter().for_each(tokio::task::JoinHandle::abort);
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::{due, poll_share};

    #[test]
    fn the_poll_wakes_at_most_half_of_what_the_controller_can_pass() {
        // 16 slots, 1 s poll, 200 ms passes: 80 passes a poll, 40 for the poll's wake-ups.
        assert_eq!(poll_share(16, Duration::from_secs(1), Duration::from_millis(200)), 40);
        assert_eq!(poll_share(4, Duration::from_secs(10), Duration::from_secs(30)), 1);
        assert_eq!(poll_share(4, Duration::from_secs(1), Duration::ZERO), usize::MAX);
    }

    #[test]
    fn the_longest_waiting_live_orders_are_woken_first() {
        let now = Instant::now();
        let poll = Duration::from_secs(1);
        let ago = |ms| Some(now.checked_sub(Duration::from_millis(ms)).unwrap());
        let candidates = vec![("recent", ago(100)), ("old", ago(5000)), ("never", None), ("older", ago(9000))];
        assert_eq!(due(candidates.clone(), now, poll, 2), ["never", "older"]);
        // One passed within the poll interval is not due at all.
        assert_eq!(due(candidates, now, poll, 10), ["never", "older", "old"]);
    }
}
