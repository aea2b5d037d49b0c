//! Reconcile-level tests: the order reconciler against in-memory fakes of RunPod, the volume and
//! the cluster, pass by pass, one row per failure mode (crossplane's table style, milliseconds each).

use ep_api::order::{OrderPhase, OutcomeState, StopRequest};
use ep_api::volume::{FORMAT_VERSION, TerminalState, keys};

use super::fakes::{Create, GPU_A, GPU_B, Sim, world_and_order};
use crate::order::pod::CREATE_SETTLE;
use std::time::Duration;

use crate::runpod::{PodStatus, RunPodError};

fn ready(s: &Sim) -> k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition {
    s.status().conditions.iter().find(|c| c.type_ == "Ready").cloned().expect("a Ready condition")
}

fn sim() -> Sim {
    let (world, order) = world_and_order();
    Sim::new(world, order)
}

/// Drives a fresh order to VERIFIED (nothing paid yet).
async fn claimed(s: &mut Sim) {
    s.until(OrderPhase::Verified, 10).await;
    assert!(s.world.runpod().creates.lock().unwrap().is_empty(), "nothing is paid for before VERIFIED");
}

/// Drives an order to RUNNER_ONLINE: the pod is created, starts, and the runner heartbeats.
async fn online(s: &mut Sim) {
    claimed(s).await;
    for _ in 0..3 {
        if s.status().pod_id.is_some() {
            break;
        }
        s.pass().await.unwrap();
    }
    let pod = s.status().pod_id.expect("the pod was created");
    s.world.runpod().start(&pod);
    s.heartbeat(s.token());
    s.until(OrderPhase::RunnerOnline, 5).await;
}

#[tokio::test]
async fn a_run_goes_through_every_phase_and_its_results_are_recorded_before_the_pod_ends() {
    let mut s = sim();
    online(&mut s).await;
    s.finish(TerminalState::Succeeded, 0);
    s.until(OrderPhase::Deleted, 8).await;
    let st = s.status();
    let phases: Vec<OrderPhase> = st.transitions.iter().map(|t| t.phase).collect();
    use OrderPhase::*;
    assert_eq!(phases, [Requested, Provisioned, Synced, Verified, RunnerOnline, Draining, Deleted]);
    let out = st.outcome.unwrap();
    assert_eq!((out.state, out.metrics["f1"]), (OutcomeState::Succeeded, 0.8));
    assert!(s.world.runpod().live().is_empty(), "the pod is gone");
    // The verdict was durable before the terminate call: a status holding the outcome was saved
    // while RunPod had terminated nothing yet.
    let saved = s.world.saved.lock().unwrap().clone();
    let terminated = s.world.terminated_at_save.lock().unwrap().clone();
    assert!(saved.iter().zip(&terminated).any(|(st, n)| st.outcome.is_some() && *n == 0), "{terminated:?}");
    assert_eq!(s.world.runpod().creates.lock().unwrap().len(), 1);
}

#[tokio::test]
async fn every_create_carries_a_dead_mans_switch() {
    let mut s = sim();
    s.world.runpod().script.lock().unwrap().push_back(Create::Capacity);
    online(&mut s).await;
    let creates = s.world.runpod().creates.lock().unwrap().clone();
    assert_eq!(creates.len(), 2);
    for c in &creates {
        let after = c.terminate_after.expect("terminateAfter set on every create");
        // The quickstart's maxRuntime (30m) with time to start and drain, well inside the smoke
        // policy's 1h lifetime plus its 15 min grace.
        let minutes = (after - super::fakes::t(0.0)).num_minutes();
        assert!((55..=56).contains(&minutes), "{after}");
        assert!(c.name.starts_with("ep-") && c.env.contains_key(crate::names::ENV_OWNER_UID));
        // The runner is told the same deadline (its own switch where the transport has none).
        let told = c.env.get(crate::names::ENV_POD_DEADLINE).expect("the deadline is in the pod's env");
        assert_eq!(*told, after.to_rfc3339_opts(chrono::SecondsFormat::Secs, true));
    }
}

#[tokio::test]
async fn the_dead_mans_switch_follows_the_runs_max_runtime_else_the_policys_lifetime() {
    let deadline = |max_runtime: Option<&str>| {
        let (world, mut order) = super::fakes::world_and_order();
        order.spec.run.as_mut().unwrap().limits = Some(ep_api::experiment::Limits {
            max_runtime: max_runtime.map(|r| r.parse().unwrap()),
            max_cost_usd: None,
        });
        async move {
            let mut s = Sim::new(world, order);
            claimed(&mut s).await;
            let at = s.now;
            s.pass().await.unwrap();
            let after = s.world.runpod().creates.lock().unwrap()[0].terminate_after.unwrap();
            (after - super::fakes::t(at)).num_seconds()
        }
    };
    // runtimeStartDeadline 20m + maxRuntime 30m + stop grace 20s + drain margin 15s + drain grace 5m.
    assert_eq!(deadline(Some("30m")).await, 55 * 60 + 35);
    // No maxRuntime, or one longer than the policy allows: the smoke policy's 1h plus its 15m grace.
    assert_eq!(deadline(None).await, 75 * 60);
    assert_eq!(deadline(Some("3h")).await, 75 * 60);
}

#[tokio::test]
async fn a_capacity_error_on_the_first_choice_uses_the_second() {
    let mut s = sim();
    s.world.runpod().script.lock().unwrap().push_back(Create::Capacity);
    online(&mut s).await;
    let creates = s.world.runpod().creates.lock().unwrap().clone();
    assert_eq!(creates.iter().map(|c| c.gpu_type_id.as_str()).collect::<Vec<_>>(), [GPU_A, GPU_B]);
    assert_eq!(s.status().gpu_choice, Some(1));
    assert!(s.events().contains(&"TryingNextGpu".to_owned()), "{:?}", s.events());
}

#[tokio::test]
async fn a_create_whose_answer_was_lost_is_adopted_not_repeated() {
    let mut s = sim();
    s.world.runpod().script.lock().unwrap().push_back(Create::AnswerLost);
    claimed(&mut s).await;
    s.pass().await.unwrap();
    assert!(s.status().pod_requested_at.is_some() && s.status().pod_id.is_none());
    assert_eq!(ready(&s).reason, "CreateOutcomeUnknown", "the unknown outcome is in status");
    s.now += 1.0;
    s.pass().await.unwrap();
    assert_eq!(s.world.runpod().creates.lock().unwrap().len(), 1, "one create only");
    let live = s.world.runpod().live();
    assert_eq!(s.status().pod_id.as_deref(), Some(live[0].id.as_str()), "the pod RunPod made was adopted");
}

#[tokio::test]
async fn a_pod_not_listed_yet_is_waited_for_then_a_create_never_seen_is_made_again() {
    let mut s = sim();
    *s.world.runpod().list_lag.lock().unwrap() = 3;
    s.world.runpod().script.lock().unwrap().push_back(Create::AnswerLost);
    claimed(&mut s).await;
    for _ in 0..6 {
        s.pass().await.unwrap();
        s.now += 1.0;
    }
    assert_eq!(s.world.runpod().creates.lock().unwrap().len(), 1, "pending creates are not repeated");
    assert!(s.status().pod_id.is_some(), "adopted once listed");
    // A create that never reached RunPod: after the settle time it is made again, once.
    let mut s = sim();
    claimed(&mut s).await;
    s.world.runpod().script.lock().unwrap().push_back(Create::AnswerLost);
    *s.world.runpod().list_lag.lock().unwrap() = 1000;
    s.pass().await.unwrap();
    s.world.runpod().pods.lock().unwrap().clear();
    s.now += CREATE_SETTLE.as_secs_f64() - 1.0;
    s.pass().await.unwrap();
    assert_eq!(s.world.runpod().creates.lock().unwrap().len(), 1);
    s.now += 1.0;
    s.pass().await.unwrap();
    assert!(s.events().contains(&"CreateLost".to_owned()), "{:?}", s.events());
    s.pass().await.unwrap();
    assert_eq!(s.world.runpod().creates.lock().unwrap().len(), 2);
}

#[tokio::test]
async fn a_second_pod_for_one_run_is_terminated_and_the_recorded_one_kept() {
    let mut s = sim();
    online(&mut s).await;
    let mine = s.world.runpod().live()[0].clone();
    let mut twin = mine.clone();
    twin.id = "twin0000000000".into();
    s.world.runpod().add(twin);
    s.now += 1.0;
    s.heartbeat(s.token());
    s.pass().await.unwrap();
    assert_eq!(*s.world.runpod().terminated.lock().unwrap(), ["twin0000000000"]);
    assert_eq!(s.status().pod_id, Some(mine.id));
    assert!(s.events().contains(&"DuplicatePodTerminated".to_owned()));
}

#[tokio::test]
async fn a_run_id_claimed_by_another_attempt_is_never_overwritten() {
    let mut s = sim();
    s.until(OrderPhase::Synced, 10).await;
    let run = s.order.spec.run.clone().unwrap();
    let mut other = crate::order::claim::run_spec("ep-quickstart", "quickstart", &run, "p", &s.world.settings);
    other.fencing_token = 1;
    let key = keys::run_file(&run.run_id, keys::SPEC);
    let body = serde_json::to_vec(&other).unwrap();
    s.world.store().put(&key, body.clone());
    s.until(OrderPhase::Failed, 3).await;
    assert_eq!(s.status().reason.as_deref(), Some("RunIdCollision"));
    assert_eq!(s.world.store().objects.lock().unwrap()[&key], body, "the other claim's spec is untouched");
    assert!(s.world.runpod().creates.lock().unwrap().is_empty());
    assert_eq!(other.version, FORMAT_VERSION);
}

#[tokio::test]
async fn an_order_made_by_hand_waits_unbound_until_its_experiment_binds_it() {
    let mut s = sim();
    s.order.spec.run = None;
    s.until(OrderPhase::Provisioned, 5).await;
    for _ in 0..3 {
        s.pass().await.unwrap();
    }
    assert_eq!(s.phase(), Some(OrderPhase::Provisioned));
    assert_eq!(s.status().reason.as_deref(), Some("NotBound"));
    assert!(s.world.runpod().creates.lock().unwrap().is_empty());
    // The experiment binds it (status.binding): it runs.
    let bound = crate::fixtures::quickstart_order("quickstart-a1", 1).spec.run;
    let mut st = s.status();
    st.binding = bound;
    s.order.status = Some(st);
    s.until(OrderPhase::Verified, 5).await;
    s.order.spec.experiment_ref = None;
    s.order.status.as_mut().unwrap().binding = None;
    s.order.status.as_mut().unwrap().phase = Some(OrderPhase::Provisioned);
    s.pass().await.unwrap();
    assert_eq!(s.status().reason.as_deref(), Some("NothingRunnable"));
}

#[tokio::test]
async fn an_order_made_by_hand_for_an_experiment_that_is_gone_or_over_says_nothing_is_runnable() {
    let mut s = sim();
    s.order.spec.run = None;
    s.until(OrderPhase::Provisioned, 5).await;
    *s.world.experiment.lock().unwrap() = None;
    s.pass().await.unwrap();
    assert_eq!(s.status().reason.as_deref(), Some("NothingRunnable"));
    assert!(s.status().message.unwrap_or_default().contains("does not exist"));
    *s.world.experiment.lock().unwrap() = Some(Some(ep_api::experiment::ExperimentPhase::Succeeded));
    s.pass().await.unwrap();
    assert_eq!(s.status().reason.as_deref(), Some("NothingRunnable"));
    assert!(s.status().message.unwrap_or_default().contains("has ended (Succeeded)"));
    assert!(s.world.runpod().creates.lock().unwrap().is_empty());
}

#[tokio::test]
async fn a_stop_before_launch_ends_the_order_without_a_pod() {
    let mut s = sim();
    s.until(OrderPhase::Synced, 10).await;
    s.order.spec.stop = Some(StopRequest { reason: "wrong learning rate".into() });
    s.pass().await.unwrap();
    assert_eq!(s.phase(), Some(OrderPhase::Deleted));
    assert_eq!(s.status().transitions.last().unwrap().reason.as_deref(), Some("StoppedBeforeLaunch"));
    assert!(s.world.runpod().creates.lock().unwrap().is_empty());
}

#[tokio::test]
async fn a_vanished_pod_drains_without_terminal_json_and_says_so() {
    let mut s = sim();
    online(&mut s).await;
    let pod = s.status().pod_id.unwrap();
    s.world.runpod().vanish(&pod);
    s.now += 1.0;
    s.until(OrderPhase::Deleted, 6).await;
    let st = s.status();
    assert_eq!(st.drain_reason.as_deref(), Some("PodVanished"));
    let out = st.outcome.unwrap();
    assert_eq!((out.state, out.reason.as_str()), (OutcomeState::Failed, "PodVanished"));
    assert!(out.message.unwrap().contains("no terminal.json"));
}

#[tokio::test]
async fn a_heartbeat_with_another_claims_token_drains_the_run() {
    let mut s = sim();
    online(&mut s).await;
    s.now += 1.0;
    s.heartbeat(s.token() + 1);
    s.pass().await.unwrap();
    assert_eq!(s.status().drain_reason.as_deref(), Some("FencingTokenMismatch"));
}

#[tokio::test]
async fn a_second_runner_with_the_same_claim_is_told_to_stop_and_the_first_keeps_the_run() {
    let mut s = sim();
    online(&mut s).await;
    let first = s.status().heartbeat.unwrap().runner.unwrap();
    assert_eq!(first.host, "pod-a");
    // A runner started later on another host writes the run's heartbeat with the same token.
    s.now += 1.0;
    s.heartbeat_from(s.token(), "pod-b", s.now);
    s.pass().await.unwrap();
    assert!(s.events().contains(&"DuplicateRunnerStopped".to_owned()), "{:?}", s.events());
    let key = keys::run_file(&s.run_id(), keys::OWNER);
    let owner = s.world.store().objects.lock().unwrap().get(&key).cloned().expect("owner.json");
    let owner: ep_api::volume::Owner = serde_json::from_slice(&owner).unwrap();
    assert_eq!(owner.runner.host, "pod-a", "the runner that started first keeps the run");
    assert_eq!(s.status().heartbeat.unwrap().runner.unwrap(), first, "status keeps the owner");
    assert_eq!(s.phase(), Some(OrderPhase::RunnerOnline), "the run goes on");
}

#[tokio::test]
async fn deleting_a_running_order_stops_the_runner_collects_then_terminates() {
    let mut s = sim();
    online(&mut s).await;
    let pod = s.status().pod_id.unwrap();
    s.deleting = true;
    s.now += 1.0;
    s.pass().await.unwrap();
    assert_eq!(s.phase(), Some(OrderPhase::Draining));
    assert_eq!(*s.world.runpod().stopped.lock().unwrap(), std::slice::from_ref(&pod), "SIGTERM through RunPod's stop");
    // The runner writes terminal.json within its grace; results are collected, then the pod ends.
    s.finish(TerminalState::Stopped, 143);
    s.until(OrderPhase::Deleted, 6).await;
    assert_eq!(s.status().outcome.unwrap().state, OutcomeState::Stopped);
    assert!(s.world.runpod().live().iter().all(|p| p.id != pod || p.status == PodStatus::Terminated));
}

#[tokio::test]
async fn a_create_runpod_refuses_for_good_fails_the_order_in_runpods_words() {
    let mut s = sim();
    s.world.runpod().script.lock().unwrap().push_back(Create::Refused);
    claimed(&mut s).await;
    assert!(s.world.store().has(&keys::run_file(&s.run_id(), keys::SPEC)), "the claim is on the volume first");
    s.pass().await.unwrap();
    assert_eq!(s.phase(), Some(OrderPhase::Failed));
    assert_eq!(s.status().reason.as_deref(), Some("CreateRejected"));
    assert!(s.status().message.unwrap().contains("bad image"));
    assert!(s.status().pod_requested_at.is_none(), "nothing was created, nothing to adopt");
}

#[tokio::test]
async fn files_that_disagree_once_are_read_again_with_the_pod_kept() {
    let mut s = sim();
    online(&mut s).await;
    let pod = s.status().pod_id.unwrap();
    s.finish(TerminalState::Succeeded, 0);
    let results = s.artifact_key("results.json");
    let good = s.world.store().objects.lock().unwrap()[&results].clone();
    // Read while the file is still settling: it disagrees with terminal.json.
    s.world.store().put(&results, &b"{}"[..]);
    s.now += 1.0;
    s.pass().await.unwrap();
    s.pass().await.unwrap();
    let st = s.status();
    assert_eq!(st.phase, Some(OrderPhase::Draining));
    assert!(st.outcome.is_none() && st.suspect_evidence.is_some(), "{st:#?}");
    assert!(s.world.runpod().live().iter().any(|p| p.id == pod), "the pod is kept for the next read");
    // The volume settles: the run is judged on what it really wrote.
    s.world.store().put(&results, good);
    s.until(OrderPhase::Deleted, 6).await;
    let st = s.status();
    assert_eq!(st.outcome.unwrap().state, OutcomeState::Succeeded);
    assert!(st.suspect_evidence.is_none());
}

#[tokio::test]
async fn the_same_disagreement_twice_is_a_status_divergence() {
    let mut s = sim();
    online(&mut s).await;
    s.finish(TerminalState::Succeeded, 0);
    s.world.store().put(&s.artifact_key("results.json"), &b"{}"[..]);
    s.now += 1.0;
    s.until(OrderPhase::Deleted, 8).await;
    let out = s.status().outcome.unwrap();
    assert_eq!((out.state, out.reason.as_str()), (OutcomeState::FailedStatusDivergence, "TerminalDivergence"));
}

#[tokio::test]
async fn a_lost_verdict_write_deletes_no_checkpoint_and_the_run_is_judged_again_alike() {
    let mut s = sim();
    online(&mut s).await;
    // The run keeps only its last checkpoint.
    let spec_key = keys::run_file(&s.run_id(), keys::SPEC);
    let mut spec: ep_api::volume::RunSpec =
        serde_json::from_slice(&s.world.store().objects.lock().unwrap()[&spec_key]).unwrap();
    spec.checkpoints.retention = ep_api::experiment::RetentionClass::KeepLast;
    s.world.store().put(&spec_key, serde_json::to_vec(&spec).unwrap());
    s.finish_with(TerminalState::Succeeded, 0, &[("checkpoints/1.pt", b"one"), ("checkpoints/2.pt", b"two")]);
    s.now += 1.0;
    // The pass that judges loses its status write (another writer got there first).
    *s.world.lose_saves.lock().unwrap() = 1;
    for _ in 0..3 {
        if s.phase() == Some(OrderPhase::Draining) && s.status().outcome.is_none() {
            break;
        }
        let _ = s.pass().await;
    }
    *s.world.lose_saves.lock().unwrap() = 1;
    assert!(s.pass().await.is_err(), "the verdict's write was lost");
    assert!(s.world.store().has(&s.artifact_key("checkpoints/1.pt")), "nothing is deleted before the verdict is saved");
    s.until(OrderPhase::Deleted, 6).await;
    let out = s.status().outcome.unwrap();
    assert_eq!(out.state, OutcomeState::Succeeded, "{out:?}");
    assert_eq!(out.retention.as_deref(), Some("KeepLast: kept 1, deleted 1"));
    assert!(!s.world.store().has(&s.artifact_key("checkpoints/1.pt")));
    assert!(s.world.store().has(&s.artifact_key("checkpoints/2.pt")));
}

#[tokio::test(start_paused = true)]
async fn a_create_that_hangs_is_given_up_within_its_bound_and_the_pod_adopted() {
    let mut s = sim();
    s.world.runpod().script.lock().unwrap().push_back(Create::Hang);
    claimed(&mut s).await;
    let started = tokio::time::Instant::now();
    s.pass().await.unwrap();
    // Given up within the bound (5 s to 30 s), not RunPod's 120 s request timeout.
    let waited = started.elapsed();
    assert!((5..=30).contains(&waited.as_secs()), "{waited:?}");
    assert!(s.status().pod_id.is_none() && s.status().pod_requested_at.is_some());
    s.now += 1.0;
    for _ in 0..3 {
        if s.status().pod_id.is_some() {
            break;
        }
        s.pass().await.unwrap();
    }
    assert_eq!(s.world.runpod().creates.lock().unwrap().len(), 1, "adopted, not created again");
    assert!(s.status().pod_id.is_some());
}

#[tokio::test]
async fn an_order_that_finds_every_create_slot_taken_waits_without_calling_runpod() {
    let mut s = sim();
    claimed(&mut s).await;
    let held = s.world.create_slots.clone().try_acquire_owned().unwrap();
    s.pass().await.unwrap();
    assert!(s.world.runpod().creates.lock().unwrap().is_empty());
    assert!(s.status().pod_requested_at.is_none(), "nothing was requested");
    let ready = s.status().conditions.into_iter().find(|c| c.type_ == "Ready").unwrap();
    assert!(ready.message.contains("create slot"), "{ready:?}");
    drop(held);
    s.pass().await.unwrap();
    assert_eq!(s.world.runpod().creates.lock().unwrap().len(), 1);
}

#[tokio::test]
async fn without_terminate_after_the_runner_is_told_its_deadline_and_where_to_end_its_pod() {
    let (mut world, order) = super::fakes::world_and_order();
    std::sync::Arc::get_mut(&mut world.conn).unwrap().api.no_terminate_after = true;
    let mut s = Sim::new(world, order);
    online(&mut s).await;
    let create = s.world.runpod().creates.lock().unwrap()[0].clone();
    assert!(create.terminate_after.is_none(), "REST v2 has no such field");
    assert_eq!(create.env.get(ep_api::volume::ENV_SELF_TERMINATE_URL).map(String::as_str), Some("http://rest.fake"));
    assert!(create.env.contains_key(crate::names::ENV_POD_DEADLINE));
}

#[tokio::test]
async fn a_full_or_failing_volume_shows_its_reason_in_status_and_the_sync_resumes_after() {
    for (status, reason, words) in [(507, "VolumeFull", "is full (HTTP 507)"), (502, "S3Unavailable", "S3 API failed")]
    {
        let mut s = sim();
        *s.world.store().fail_writes.lock().unwrap() = Some(status);
        s.until(OrderPhase::Provisioned, 4).await;
        s.pass().await.unwrap();
        let st = s.status();
        assert_eq!(st.phase, Some(OrderPhase::Provisioned));
        let ready = st.conditions.iter().find(|c| c.type_ == "Ready").unwrap();
        assert_eq!(ready.reason, reason, "{ready:?}");
        assert!(ready.message.contains(words), "{ready:?}");
        if status == 507 {
            // The figures: the volume's size from RunPod, what a listing finds on it.
            let used = s.world.store().objects.lock().unwrap().values().map(bytes::Bytes::len).sum::<usize>();
            let free = 1.0 - used as f64 / 1e9;
            let figures = format!("{:.2} GB of 1 GB used", used as f64 / 1e9);
            assert!(
                ready.message.contains(&figures) && ready.message.contains(&format!("{free:.2} GB free")),
                "{ready:?}"
            );
        }
        assert!(s.done.last().unwrap().requeue.is_some(), "looked at again");
        *s.world.store().fail_writes.lock().unwrap() = None;
        s.until(OrderPhase::Synced, 3).await;
    }
}

#[tokio::test]
async fn runpod_down_or_rate_limiting_shows_in_status_and_supervision_resumes_after() {
    let cases = [
        (RunPodError::Transient { message: "HTTP 502".into(), may_have_applied: false }, "RunPodUnavailable", 0),
        (
            RunPodError::RateLimited { message: "HTTP 429".into(), retry_after: Some(Duration::from_secs(7)) },
            "RunPodRateLimited",
            7,
        ),
    ];
    for (error, reason, retry_after) in cases {
        let mut s = sim();
        online(&mut s).await;
        s.world.runpod().list_errors.lock().unwrap().push_back(error);
        s.now += 2.0;
        s.pass().await.unwrap();
        assert_eq!(s.status().phase, Some(OrderPhase::RunnerOnline), "the run goes on");
        let c = ready(&s);
        assert_eq!((c.status.as_str(), c.reason.as_str()), ("False", reason), "{c:?}");
        assert_eq!(s.status().reason.as_deref(), Some(reason));
        let requeue = s.done.last().unwrap().requeue.unwrap();
        assert!(requeue >= Duration::from_secs(retry_after.max(1)), "{requeue:?}");
        s.heartbeat(s.token());
        s.now += 2.0;
        s.pass().await.unwrap();
        assert_eq!(ready(&s).reason, "RunnerOnline", "supervision resumed");
        assert_eq!(s.status().reason, None);
    }
}
