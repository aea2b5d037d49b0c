//! The split-brain gate on runners: the claim (run id, fencing token) is the operator's, and the
//! runner that heartbeats for it is recorded in status. A heartbeat from another runner with the
//! same token (a duplicate pod, a runner started by hand in the pod) is a second owner: the runner
//! that started first keeps the run, and `owner.json` tells every other one to stop (the runner
//! checks it at every beat and, displaced, stops its command and writes nothing more).

use ep_api::order::RunnerRef;
use ep_api::volume::{FORMAT_VERSION, Heartbeat, Owner, RunnerIdentity, keys};
use ep_volume::VolumeStore;
use sha2::{Digest, Sha256};

use super::pass::Pass;
use crate::reason::Reason;

/// A recorded runner as status keeps it.
pub fn to_ref(r: &RunnerIdentity) -> RunnerRef {
    RunnerRef {
        host: r.host.clone(),
        pid: i64::from(r.pid),
        started_at: r.started_at.to_rfc3339_opts(chrono::SecondsFormat::Nanos, true),
    }
}

fn to_identity(r: &RunnerRef) -> Option<RunnerIdentity> {
    Some(RunnerIdentity {
        host: r.host.clone(),
        pid: u32::try_from(r.pid).ok()?,
        started_at: chrono::DateTime::parse_from_rfc3339(&r.started_at).ok()?.with_timezone(&chrono::Utc),
    })
}

/// What a heartbeat says about the run's owner.
#[derive(Clone, Debug, PartialEq)]
pub enum Ownership {
    /// The recorded owner (or the first runner seen, to record).
    Owner(RunnerRef),
    /// Two runners: `keep` keeps the run, `stop` is told to stop.
    Duplicate { keep: RunnerIdentity, stop: RunnerIdentity },
}

/// Decides from the recorded owner and the runner a heartbeat names.
pub fn ownership(recorded: Option<&RunnerRef>, beat: &RunnerIdentity) -> Ownership {
    let Some(owner) = recorded.and_then(to_identity) else { return Ownership::Owner(to_ref(beat)) };
    if owner == *beat {
        return Ownership::Owner(to_ref(beat));
    }
    if (beat.started_at, &beat.host, beat.pid) < (owner.started_at, &owner.host, owner.pid) {
        Ownership::Duplicate { keep: beat.clone(), stop: owner }
    } else {
        Ownership::Duplicate { keep: owner, stop: beat.clone() }
    }
}

/// The gate in a pass: the run's owner after this heartbeat, and whether the heartbeat is another
/// runner's (then it does not count as the owner's beat). Two owners: owner.json and an Event.
pub async fn check<S: VolumeStore>(
    pass: &mut Pass<'_>,
    store: &S,
    run_id: &str,
    hb: Option<&Heartbeat>,
) -> Result<(Option<RunnerRef>, bool), crate::error::Error> {
    let recorded = pass.st.heartbeat.as_ref().and_then(|b| b.runner.clone());
    let Some(id) = hb.and_then(|h| h.runner.as_ref()) else { return Ok((recorded, false)) };
    match ownership(recorded.as_ref(), id) {
        Ownership::Owner(r) => Ok((Some(r), false)),
        Ownership::Duplicate { keep, stop } => {
            write(store, run_id, &keep, &stop).await?;
            let note = format!(
                "two runners heartbeat for run {run_id} with one claim: {keep} keeps it; {stop} is told to stop \
                 (owner.json)"
            );
            pass.notice(Reason::DuplicateRunnerStopped, note);
            Ok((Some(to_ref(&keep)), *id != keep))
        }
    }
}

/// Writes owner.json naming `keep`.
pub async fn write<S: VolumeStore>(
    store: &S,
    run_id: &str,
    keep: &RunnerIdentity,
    stop: &RunnerIdentity,
) -> Result<(), ep_volume::StoreError> {
    let owner = Owner {
        version: FORMAT_VERSION,
        run_id: run_id.to_owned(),
        runner: keep.clone(),
        reason: format!("two runners heartbeat with one claim; {stop} stops"),
    };
    let body = serde_json::to_vec_pretty(&owner).unwrap_or_default();
    let sha = hex::encode(Sha256::digest(&body));
    store.put_bytes(&keys::run_file(run_id, keys::OWNER), body.into(), &sha).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn runner(host: &str, pid: u32, at: i64) -> RunnerIdentity {
        RunnerIdentity { host: host.into(), pid, started_at: chrono::Utc.timestamp_opt(1_800_000_000 + at, 5).unwrap() }
    }

    #[test]
    fn the_first_runner_is_recorded_and_of_two_the_one_that_started_first_keeps_the_run() {
        let a = runner("pod-a", 10, 0);
        let b = runner("pod-a", 99, 30);
        assert_eq!(ownership(None, &a), Ownership::Owner(to_ref(&a)));
        assert_eq!(ownership(Some(&to_ref(&a)), &a), Ownership::Owner(to_ref(&a)), "nanoseconds survive status");
        assert_eq!(ownership(Some(&to_ref(&a)), &b), Ownership::Duplicate { keep: a.clone(), stop: b.clone() });
        // Seen the newer one first: the older still keeps the run.
        assert_eq!(ownership(Some(&to_ref(&b)), &a), Ownership::Duplicate { keep: a, stop: b });
    }
}
