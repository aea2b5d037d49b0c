//! Resume from checkpoint (`checkpoints.resume`): the newest complete checkpoint an earlier
//! attempt reported, as a volume key. A checkpoint is complete once the script names it in
//! progress.json (after renaming it into place); the order keeps the last one it read, at every
//! poll and once more when the run is judged, so a lost pod still leaves its last checkpoint.

use ep_api::experiment::AttemptStatus;
use ep_api::volume::keys;
use ep_api::{Experiment, RunPodOrder};
use kube::ResourceExt;

/// The checkpoint the next attempt resumes from, newest attempt first; None when the experiment
/// does not resume or no earlier attempt reported one.
pub fn checkpoint(exp: &Experiment, orders: &[&RunPodOrder], history: &[AttemptStatus]) -> Option<String> {
    let policy = exp.spec.checkpoints.as_ref().filter(|c| c.resume)?;
    let dir = policy.path.trim_matches('/');
    history.iter().rev().find_map(|a| {
        let name = a.order.as_deref()?;
        let order = orders.iter().find(|o| o.name_any() == name)?;
        let file = order.status.as_ref()?.progress.as_ref()?.checkpoint.as_ref()?;
        Some(format!("{}{}/{dir}/{file}", keys::run_prefix(&a.run_id), keys::ARTIFACTS_DIR))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use ep_api::order::ProgressStatus;

    #[test]
    fn the_newest_attempt_with_a_checkpoint_is_resumed_from() {
        let mut exp = crate::fixtures::quickstart();
        let with = |name: &str, ck: Option<&str>| {
            let mut o = crate::fixtures::quickstart_order(name, 1);
            o.status = Some(ep_api::RunPodOrderStatus {
                progress: Some(ProgressStatus {
                    step: 3,
                    total: None,
                    metrics: Default::default(),
                    checkpoint: ck.map(str::to_owned),
                    reported_at: crate::time::to_k8s(chrono::Utc::now()),
                }),
                ..Default::default()
            });
            o
        };
        let (a1, a2) = (with("q-a1", Some("epoch-003.json")), with("q-a2", None));
        let history = vec![
            AttemptStatus { attempt: 1, run_id: "r1".into(), order: Some("q-a1".into()), ..Default::default() },
            AttemptStatus { attempt: 2, run_id: "r2".into(), order: Some("q-a2".into()), ..Default::default() },
        ];
        assert_eq!(checkpoint(&exp, &[&a1, &a2], &history), None, "resume is off");
        exp.spec.checkpoints.as_mut().unwrap().resume = true;
        let key = checkpoint(&exp, &[&a1, &a2], &history).unwrap();
        assert_eq!(key, format!("{}artifacts/checkpoints/epoch-003.json", keys::run_prefix("r1")));
    }
}
