//! The paid pod as an external resource (crossplane's observe / create / delete): what RunPod
//! holds for a run is observed in one place, from one pod list, and created and deleted
//! idempotently. Adoption and de-duplication live here only.

use std::time::Duration;

use chrono::{DateTime, Utc};

use crate::names::ENV_RUN_ID;
use crate::runpod::{Pod, PodStatus, RunPodApi, RunPodError};

/// How long a create whose answer was lost may take to show up in the pod list.
pub const CREATE_SETTLE: Duration = Duration::from_secs(30);

/// What RunPod holds for one run.
#[derive(Clone, Debug, PartialEq)]
pub enum Observed {
    /// No pod, none asked for (or the last ask was settled as lost).
    Absent,
    /// A create was asked for at `since` and the pod is not listed yet: wait, never create again.
    CreatePending { since: DateTime<Utc> },
    /// A create was asked for at `since`, and the pod was never listed within [`CREATE_SETTLE`].
    CreateLost { since: DateTime<Utc> },
    /// The run's pod.
    Exists(Pod),
    /// More than one pod for the run: keep one, terminate the rest.
    Duplicates { keep: Pod, extra: Vec<Pod> },
    /// The pod recorded for the run is no longer listed.
    Gone { id: String },
}

/// Who the run's pod is: its derived name, its run id tag, what status recorded.
#[derive(Clone, Copy, Debug)]
pub struct Identity<'a> {
    pub pod_name: &'a str,
    pub run_id: &'a str,
    /// The pod id status recorded, if any.
    pub recorded: Option<&'a str>,
    /// When a create was asked for (status.podRequestedAt), if one was.
    pub requested_at: Option<DateTime<Utc>>,
}

/// The pods of a run in a list trusted for it (fetched after its last create returned).
pub fn observe(pods: &[Pod], who: &Identity<'_>, now: DateTime<Utc>) -> Observed {
    let mut found: Vec<&Pod> = pods
        .iter()
        .filter(|p| p.status != PodStatus::Terminated)
        .filter(|p| p.name == who.pod_name || p.env.get(ENV_RUN_ID).is_some_and(|r| r == who.run_id))
        .collect();
    if found.len() > 1 {
        // Keep the recorded pod, else the oldest listed one; the rest are duplicates.
        let at = found.iter().position(|p| Some(p.id.as_str()) == who.recorded).unwrap_or(0);
        let keep = found.remove(at).clone();
        return Observed::Duplicates { keep, extra: found.into_iter().cloned().collect() };
    }
    if let Some(p) = found.pop() {
        return Observed::Exists(p.clone());
    }
    match (who.recorded, who.requested_at) {
        (Some(id), _) => Observed::Gone { id: id.to_owned() },
        (None, Some(since)) if (now - since).to_std().unwrap_or_default() < CREATE_SETTLE => {
            Observed::CreatePending { since }
        }
        (None, Some(since)) => Observed::CreateLost { since },
        (None, None) => Observed::Absent,
    }
}

/// Terminates pods; one already gone counts as success.
pub async fn delete<A: RunPodApi>(api: &A, pods: &[Pod]) -> Result<(), RunPodError> {
    for p in pods {
        api.terminate_pod(&p.id).await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::collections::BTreeMap;

    use chrono::TimeZone;

    use super::*;

    fn t(s: i64) -> DateTime<Utc> {
        Utc.timestamp_opt(1_800_000_000 + s, 0).unwrap()
    }

    fn pod(id: &str, name: &str, run: Option<&str>, status: PodStatus) -> Pod {
        let mut env = BTreeMap::new();
        if let Some(r) = run {
            env.insert(ENV_RUN_ID.to_owned(), r.to_owned());
        }
        Pod {
            id: id.into(),
            name: name.into(),
            status,
            image: "img".into(),
            env,
            gpu_type_id: None,
            gpu_display_name: None,
            gpu_count: 1,
            cost_per_hr: 0.5,
            machine_id: None,
            data_center_id: None,
            network_volume_id: None,
            runtime: None,
        }
    }

    fn who(recorded: Option<&'static str>, requested: Option<i64>) -> Identity<'static> {
        Identity { pod_name: "ep-run-a1", run_id: "run-a1", recorded, requested_at: requested.map(t) }
    }

    #[test]
    fn a_run_is_found_by_name_or_by_its_run_id_tag_and_terminated_pods_do_not_count() {
        let by_name = pod("p1", "ep-run-a1", None, PodStatus::Running);
        let by_tag = pod("p2", "renamed", Some("run-a1"), PodStatus::Running);
        let other = pod("p3", "ep-other", Some("other"), PodStatus::Running);
        let dead = pod("p4", "ep-run-a1", None, PodStatus::Terminated);
        assert_eq!(
            observe(&[other.clone(), by_name.clone(), dead.clone()], &who(None, Some(0)), t(1)),
            Observed::Exists(by_name.clone())
        );
        assert_eq!(observe(&[by_tag.clone(), other.clone()], &who(None, None), t(1)), Observed::Exists(by_tag));
        assert_eq!(observe(&[other, dead], &who(None, None), t(1)), Observed::Absent);
    }

    #[test]
    fn duplicates_keep_the_recorded_pod() {
        let a = pod("p1", "ep-run-a1", None, PodStatus::Running);
        let b = pod("p2", "ep-run-a1", Some("run-a1"), PodStatus::Running);
        match observe(&[a.clone(), b.clone()], &who(Some("p2"), Some(0)), t(1)) {
            Observed::Duplicates { keep, extra } => {
                assert_eq!(keep.id, "p2");
                assert_eq!(extra, vec![a]);
            }
            o => panic!("{o:?}"),
        }
    }

    #[test]
    fn an_unlisted_create_is_pending_until_it_settles_then_lost_and_a_recorded_pod_is_gone() {
        assert_eq!(observe(&[], &who(None, Some(0)), t(29)), Observed::CreatePending { since: t(0) });
        assert_eq!(observe(&[], &who(None, Some(0)), t(30)), Observed::CreateLost { since: t(0) });
        assert_eq!(observe(&[], &who(Some("p9"), Some(0)), t(1)), Observed::Gone { id: "p9".into() });
    }
}
