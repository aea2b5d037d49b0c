//! Terminal divergence, both ways: now and then the registry's experiment statuses are read back
//! and compared with the cluster's (the rows last written for each experiment, and the experiments
//! the cluster holds). A difference is reported (a `RegistrySynced` condition with reason
//! `RegistryDivergence` on the experiment, a Warning Event, the `ep_registry_divergences` gauge and
//! a log line) and never silently overwritten: the resync leaves a divergent row alone until the
//! row is corrected or the experiment moves on (its next status is written as usual).

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;

use k8s_openapi::api::core::v1::ObjectReference;

use super::Projector;
use crate::events::Events;
use crate::reason::Reason;
use crate::registry::{Registry, RegistryError, status};

/// The experiments the cluster holds, by (namespace, name).
pub type ClusterFn = Arc<dyn Fn() -> HashSet<(String, String)> + Send + Sync>;

/// An experiment as one side says it: (namespace, name) and its registry status word.
pub type Said = BTreeMap<(String, String), String>;

fn is_final(s: &str) -> bool {
    [status::COMPLETED, status::FAILED, status::FAILED_STATUS_DIVERGENCE].contains(&s) || s == "STOPPED"
}

/// What differs between the cluster (what was last written for each experiment, and which
/// experiments exist) and the registry's rows (the pipeline's own rows, namespace '', are not the
/// operator's and are left out). Only differences where one side is final count: a row one state
/// behind is the projection catching up, not a divergence.
pub fn compare(cluster: &Said, registry: &Said, exists: &HashSet<(String, String)>) -> Said {
    let mut out = Said::new();
    for (key, said) in cluster {
        match registry.get(key) {
            None => {
                out.insert(key.clone(), format!("the registry has no row for it; the cluster says {said}"));
            }
            Some(held) if held != said && (is_final(held) || is_final(said)) => {
                out.insert(
                    key.clone(),
                    format!(
                        "the registry row says {held} and the cluster says {said}; the operator does not overwrite it: \
                         correct the row (exp_registry.experiments) or find what wrote it"
                    ),
                );
            }
            Some(_) => {}
        }
    }
    for (key, held) in registry {
        if !key.0.is_empty() && !is_final(held) && !cluster.contains_key(key) && !exists.contains(key) {
            out.insert(
                key.clone(),
                format!("the registry row says {held} for an experiment the cluster does not hold"),
            );
        }
    }
    out
}

impl Projector {
    /// Tells the projector which experiments the cluster holds, and how often to audit.
    pub fn audit_against(&self, cluster: ClusterFn, every: std::time::Duration) {
        let _ = self.audit.set((cluster, every));
    }

    /// How often the registry is audited, once the cluster is known.
    pub fn audit_every(&self) -> Option<std::time::Duration> {
        self.audit.get().map(|(_, every)| *every)
    }

    /// The experiment rows last written, as the cluster says them.
    fn written_experiments(&self) -> Said {
        let st = self.lock();
        st.written_status.iter().map(|(k, status)| (k.clone(), status.clone())).collect()
    }

    /// One audit: compares, records what diverges, reports what is new. Rows written or queued while
    /// the registry was read are left for the next audit.
    pub async fn audit<R: Registry>(&self, registry: &R, events: Option<&Events>) -> Result<(), RegistryError> {
        let Some((cluster, _)) = self.audit.get() else { return Ok(()) };
        let before = self.written_experiments();
        let held: Said = registry.experiment_statuses().await?.into_iter().map(|(ns, n, s)| ((ns, n), s)).collect();
        let exists = cluster();
        let mut found = compare(&before, &held, &exists);
        let after = self.written_experiments();
        let (new, changed) = {
            let mut st = self.lock();
            found.retain(|k, _| {
                before.get(k) == after.get(k) && !st.by_key.contains_key(&format!("experiment/{}/{}", k.0, k.1))
            });
            let new: Vec<_> = found
                .iter()
                .filter(|(k, _)| !st.diverged.contains_key(*k))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            let changed = st.diverged != found;
            st.diverged = found;
            (new, changed)
        };
        let n = self.lock().diverged.len();
        self.metrics.registry_divergences.set(i64::try_from(n).unwrap_or(i64::MAX));
        for ((ns, name), why) in new {
            tracing::warn!(namespace = %ns, experiment = %name, "registry divergence: {why}");
            if let Some(ev) = events.filter(|_| exists.contains(&(ns.clone(), name.clone()))) {
                let reference = ObjectReference {
                    api_version: Some("ep.dev/v1alpha1".into()),
                    kind: Some("Experiment".into()),
                    namespace: Some(ns.clone()),
                    name: Some(name.clone()),
                    ..ObjectReference::default()
                };
                ev.publish(&reference, Reason::RegistryDivergence, "Audit", &why).await;
            }
        }
        if changed {
            self.lag.send_modify(|l| l.divergences = n);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn said(list: &[(&str, &str, &str)]) -> Said {
        list.iter().map(|(ns, n, s)| ((ns.to_string(), n.to_string()), s.to_string())).collect()
    }

    #[test]
    fn a_final_state_on_either_side_that_the_other_does_not_share_is_a_divergence() {
        let cluster = said(&[("ml", "done", "COMPLETED"), ("ml", "live", "RUNNING"), ("ml", "lag", "RUNNING")]);
        let registry = said(&[
            ("ml", "done", "RUNNING"),       // the cluster finished it, the registry never heard
            ("ml", "live", "COMPLETED"),     // someone marked a live run done
            ("ml", "lag", "READY"),          // one step behind: not a divergence
            ("ml", "ghost", "RUNNING"),      // no such experiment
            ("ml", "gone", "FAILED"),        // deleted experiments stay in the ledger
            ("", "pipeline-era", "RUNNING"), // the pipeline's own row
        ]);
        let exists: HashSet<_> = [("ml".to_owned(), "live".to_owned())].into_iter().collect();
        let d = compare(&cluster, &registry, &exists);
        let keys: Vec<&str> = d.keys().map(|k| k.1.as_str()).collect();
        assert_eq!(keys, ["done", "ghost", "live"], "{d:?}");
        assert!(
            d[&("ml".into(), "done".into())].contains("the registry row says RUNNING and the cluster says COMPLETED")
        );
        let missing = compare(&said(&[("ml", "new", "READY")]), &Said::new(), &exists);
        assert!(missing[&("ml".into(), "new".into())].contains("no row"));
    }
}
