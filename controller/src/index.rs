//! The orders of each experiment, kept beside the orders' cache from the same watch: an
//! experiment's pass looks up its own orders instead of filtering every cached order (at a
//! thousand experiments that filter was a pass over a thousand orders, a thousand times).
//!
//! kube-runtime's reflector store has no secondary index, so this one follows the watch's events
//! as the store does: a re-list (`Init` .. `InitDone`) builds a fresh index that replaces the old
//! one whole, so an order deleted while the watch was down leaves it too. It is updated before the
//! store, so a name it gives may not be in the store yet (the lookup skips it) and never the
//! other way round.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, PoisonError, RwLock};

use ep_api::RunPodOrder;
use kube::ResourceExt;
use kube::runtime::watcher::Event;

use crate::lenient::Lenient;

/// (namespace, experiment) -> order names; and (namespace, order) -> its experiment.
#[derive(Debug, Default)]
struct Index {
    by_experiment: HashMap<(String, String), BTreeSet<String>>,
    experiment_of: HashMap<(String, String), String>,
}

impl Index {
    fn put(&mut self, o: &Lenient<RunPodOrder>) {
        let key = (o.namespace().unwrap_or_default(), o.name_any());
        self.remove(&key);
        let Some(exp) = o.get().and_then(|o| o.spec.experiment_ref.as_ref()).map(|r| r.name.clone()) else { return };
        self.by_experiment.entry((key.0.clone(), exp.clone())).or_default().insert(key.1.clone());
        self.experiment_of.insert(key, exp);
    }

    fn remove(&mut self, key: &(String, String)) {
        let Some(exp) = self.experiment_of.remove(key) else { return };
        let parent = (key.0.clone(), exp);
        if let Some(names) = self.by_experiment.get_mut(&parent) {
            names.remove(&key.1);
            if names.is_empty() {
                self.by_experiment.remove(&parent);
            }
        }
    }
}

/// The index, shared between the watch that feeds it and every reader.
#[derive(Clone, Debug, Default)]
pub struct OrdersByExperiment {
    live: Arc<RwLock<Index>>,
    /// The index a re-list is building, swapped in at its end.
    building: Arc<RwLock<Option<Index>>>,
}

impl OrdersByExperiment {
    /// Follows one watch event.
    pub fn observe(&self, ev: &Event<Lenient<RunPodOrder>>) {
        let mut building = self.building.write().unwrap_or_else(PoisonError::into_inner);
        match ev {
            Event::Init => *building = Some(Index::default()),
            Event::InitApply(o) => building.get_or_insert_default().put(o),
            Event::InitDone => {
                if let Some(fresh) = building.take() {
                    *self.live.write().unwrap_or_else(PoisonError::into_inner) = fresh;
                }
            }
            Event::Apply(o) => self.live.write().unwrap_or_else(PoisonError::into_inner).put(o),
            Event::Delete(o) => self
                .live
                .write()
                .unwrap_or_else(PoisonError::into_inner)
                .remove(&(o.namespace().unwrap_or_default(), o.name_any())),
        }
    }

    /// The names of the orders serving `experiment` in `namespace`.
    pub fn names(&self, namespace: &str, experiment: &str) -> Vec<String> {
        let live = self.live.read().unwrap_or_else(PoisonError::into_inner);
        live.by_experiment
            .get(&(namespace.to_owned(), experiment.to_owned()))
            .map(|n| n.iter().cloned().collect())
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn order(ns: &str, name: &str, exp: Option<&str>) -> Lenient<RunPodOrder> {
        let mut v = serde_json::json!({"apiVersion": "ep.dev/v1alpha1", "kind": "RunPodOrder",
            "metadata": {"name": name, "namespace": ns},
            "spec": {"policy": "smoke", "workerId": "w", "providerRef": "default", "image": "i",
                     "gpu": {"types": ["l4"], "count": 1, "cloudType": "SECURE"}}});
        if let Some(e) = exp {
            v["spec"]["experimentRef"] = serde_json::json!({"name": e});
        }
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn follows_applies_deletes_and_a_relist_that_drops_what_vanished() {
        let ix = OrdersByExperiment::default();
        ix.observe(&Event::Apply(order("ns", "a-1", Some("a"))));
        ix.observe(&Event::Apply(order("ns", "a-2", Some("a"))));
        ix.observe(&Event::Apply(order("other", "a-1", Some("a"))));
        ix.observe(&Event::Apply(order("ns", "free", None)));
        assert_eq!(ix.names("ns", "a"), ["a-1", "a-2"]);
        ix.observe(&Event::Delete(order("ns", "a-1", Some("a"))));
        assert_eq!(ix.names("ns", "a"), ["a-2"]);
        assert_eq!(ix.names("other", "a"), ["a-1"]);
        // A re-list: until it ends, readers see the old index; then only what it listed.
        ix.observe(&Event::Init);
        ix.observe(&Event::InitApply(order("ns", "a-3", Some("a"))));
        assert_eq!(ix.names("ns", "a"), ["a-2"]);
        ix.observe(&Event::InitDone);
        assert_eq!(ix.names("ns", "a"), ["a-3"]);
        assert!(ix.names("other", "a").is_empty());
    }
}
