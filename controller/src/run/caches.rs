//! The operator's caches: one watch per kind feeding a shared reflector store, the handles that
//! wake the controllers from it, and the orders-by-experiment index fed by the orders' watch.

use ep_api::{Experiment, RunPodOrder, RunPodProvider};
use futures::{StreamExt, TryStreamExt};
use kube::runtime::reflector;
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Resource, ResourceExt};
use tokio::sync::watch;

use crate::context::Stores;
use crate::lenient::Lenient;

/// A shared cache, the handles of the controllers woken from it, and the watch feeding it.
pub(super) struct Cache<K: Resource + Clone + 'static>
where
    K::DynamicType: std::hash::Hash + Eq + Clone,
{
    store: reflector::Store<K>,
    handles: Vec<reflector::ReflectHandle<K>>,
    watch: tokio::task::JoinHandle<()>,
}

/// One watch of every object of a kind feeding one cache; each subscriber is woken only after the
/// cache holds the change, so an experiment never reads an order older than the event that woke
/// it. The watch runs on its own task: the caches fill whatever the controllers are doing, and the
/// controllers start only once every cache holds its initial list (a pass before that would read
/// "missing" for an object that exists and say so in status).
fn shared<K>(
    client: &kube::Client,
    wc: &watcher::Config,
    subscribers: usize,
    index: impl Fn(&watcher::Event<K>) + Send + 'static,
) -> Option<Cache<K>>
where
    K: Resource<DynamicType = ()> + Clone + std::fmt::Debug + serde::de::DeserializeOwned + Send + Sync + 'static,
{
    let (store, writer) = reflector::store_shared(1024);
    let handles = (0..subscribers).map(|_| writer.subscribe()).collect::<Option<Vec<_>>>()?;
    let kind = K::kind(&()).to_string();
    // What the operator never reads stays out of the cache: managedFields and kubectl's copy of
    // the applied object (together often larger than the object itself, times every object).
    let watch = watcher(Api::<K>::all(client.clone()), wc.clone())
        .default_backoff()
        .modify(|o| {
            o.managed_fields_mut().clear();
            o.annotations_mut().remove("kubectl.kubernetes.io/last-applied-configuration");
        })
        .inspect_ok(move |ev| index(ev))
        .reflect_shared(writer)
        .for_each(move |r| {
            let kind = kind.clone();
            async move {
                if let Err(e) = r {
                    tracing::warn!(%kind, error = %e, "watch failed; retrying");
                }
            }
        });
    Some(Cache { store, handles, watch: tokio::spawn(watch) })
}

/// The three caches, filled, and the handles of the controllers woken from them.
pub(super) struct Caches {
    pub(super) stores: Stores,
    pub(super) providers: reflector::ReflectHandle<Lenient<RunPodProvider>>,
    pub(super) experiments: [reflector::ReflectHandle<Lenient<Experiment>>; 2],
    pub(super) orders: [reflector::ReflectHandle<Lenient<RunPodOrder>>; 2],
    pub(super) watches: [tokio::task::JoinHandle<()>; 3],
}

/// Starts the watches and waits until every cache holds its initial list; None on shutdown.
pub(super) async fn caches(client: &kube::Client, stop: &watch::Receiver<bool>) -> Option<Caches> {
    let wc = watcher::Config::default();
    let by_experiment = crate::index::OrdersByExperiment::default();
    let ix = by_experiment.clone();
    let orders = shared::<Lenient<RunPodOrder>>(client, &wc, 2, move |ev| ix.observe(ev))?;
    let experiments = shared::<Lenient<Experiment>>(client, &wc, 2, |_| {})?;
    let providers = shared::<Lenient<RunPodProvider>>(client, &wc, 1, |_| {})?;
    let watches = [orders.watch, experiments.watch, providers.watch];
    let stores = Stores {
        experiments: experiments.store,
        orders: orders.store,
        providers: providers.store,
        orders_by_experiment: by_experiment,
    };
    let mut stopping = stop.clone();
    tokio::select! {
        () = stores.ready() => tracing::debug!("caches hold their initial lists"),
        _ = stopping.wait_for(|v| *v) => {
            watches.iter().for_each(tokio::task::JoinHandle::abort);
            return None;
        }
    }
    let mut order_handles = orders.handles.into_iter();
    let mut experiment_handles = experiments.handles.into_iter();
    Some(Caches {
        stores,
        providers: providers.handles.into_iter().next()?,
        experiments: [experiment_handles.next()?, experiment_handles.next()?],
        orders: [order_handles.next()?, order_handles.next()?],
        watches,
    })
}
