//! The pure decisions of the order lifecycle: admission, GPU choice, the verdict on a running pod,
//! the create outcome and the drain's outcome.

use std::collections::BTreeMap;
use std::time::Duration;

use chrono::{DateTime, TimeZone, Utc};
use ep_api::RunPodOrderSpec;
use ep_api::experiment::{Approval, Envelope};
use ep_api::order::OutcomeState;
use ep_api::volume::{FORMAT_VERSION, Heartbeat, RunnerState, TerminalState};

use crate::order::drain::{Evidence, outcome, retention};
use crate::order::launch::{CreateStep, after_create};
use crate::order::provision::{admit, choose_gpus};
use crate::order::supervise::{RunView, Verdict, watch};
use crate::reason::Reason;
use crate::runpod::{GpuOffer, Pod, PodStatus, RunPodError, Runtime, Stock};
use crate::settings::Settings;

/// The quickstart's order (GPU choices rtx-pro-4500 then l4) under `policy`, with no price
/// ceiling of its own, so the policy's applies.
fn spec(policy: &str) -> RunPodOrderSpec {
    let mut spec = crate::fixtures::quickstart_order("quickstart-a1", 1).spec;
    policy.clone_into(&mut spec.policy);
    spec.max_cost_per_hour = None;
    spec
}

fn settings() -> Settings {
    Settings::embedded_default()
}

fn offer(id: &str, price: f64, stock: Stock) -> GpuOffer {
    GpuOffer {
        id: id.into(),
        display_name: id.into(),
        memory_gb: 24,
        max_gpu_count: 8,
        price_per_hour: Some(price),
        stock,
    }
}

#[test]
fn approval_is_required_when_the_policy_says_so() {
    let s = settings();
    let b = admit(&spec("paper-train"), &s, None).unwrap_err();
    assert_eq!(b.reason, Reason::AwaitingApproval);
    assert!(!b.reason.is_fatal());
    let mut approved = spec("paper_train");
    approved.approved = Some(true);
    approved.approved_by = Some("aster".into());
    let a = admit(&approved, &s, None).unwrap();
    assert_eq!(a.policy_name, "paper-train", "aliases resolve to the canonical name");
    assert_eq!(a.approved_by.as_deref(), Some("aster"));
    assert!(admit(&spec("smoke"), &s, None).is_ok(), "smoke needs no approval");
}

fn envelope(gpus: &[&str], per_hour: Option<f64>, total: Option<f64>, attempts: Option<i32>) -> Approval {
    Approval {
        approved_by: "aster".into(),
        envelope: Envelope {
            gpu_types: gpus.iter().map(|g| (*g).to_owned()).collect(),
            max_cost_per_hour: per_hour,
            max_total_usd: total,
            max_attempts: attempts,
        },
    }
}

/// The quickstart's order as attempt `n` of its experiment, after `spent` USD of earlier attempts.
fn attempt(n: i32, spent: f64) -> RunPodOrderSpec {
    let mut o = spec("paper-train");
    let run = o.run.as_mut().expect("the fixture order carries its run");
    run.attempt = n;
    run.spent_before_usd = Some(spent);
    o
}

#[test]
fn an_experiments_envelope_approves_its_retries_and_nothing_outside_it() {
    let s = settings();
    let env = envelope(&["rtx-pro-4500", "l4"], Some(0.5), Some(10.0), Some(3));
    let a = admit(&attempt(3, 9.0), &s, Some(&env)).unwrap();
    assert_eq!(a.approved_by.as_deref(), Some("aster (experiment envelope)"));
    assert_eq!(a.max_price, Some(0.5), "the envelope's $/h is a ceiling on the GPU choice");
    let past = admit(&attempt(4, 0.0), &s, Some(&env)).unwrap_err();
    assert_eq!(past.reason, Reason::AwaitingApproval);
    assert!(past.message.contains("attempt 4 is past the 3 attempts approved"), "{}", past.message);
    let spent = admit(&attempt(2, 10.0), &s, Some(&env)).unwrap_err();
    assert!(spent.message.contains("spent $10.00 of the $10.00 approved"), "{}", spent.message);
    let narrow = envelope(&["l4"], None, None, None);
    let gpus = admit(&attempt(1, 0.0), &s, Some(&narrow)).unwrap_err();
    assert!(gpus.message.contains("spec.gpu.types rtx-pro-4500 not among the approved l4"), "{}", gpus.message);
    let mut mine = attempt(1, 0.0);
    mine.experiment_ref = None;
    assert_eq!(
        admit(&mine, &s, Some(&env)).unwrap_err().reason,
        Reason::AwaitingApproval,
        "an envelope covers only its experiment's orders"
    );
}

#[test]
fn price_ceilings_combine_and_the_lowest_wins() {
    let s = settings();
    let a = admit(&spec("smoke"), &s, None).unwrap();
    assert_eq!(a.max_price, Some(1.0), "the policy's price ceiling applies");
    let mut cheaper = spec("smoke");
    cheaper.max_cost_per_hour = Some(0.5);
    assert_eq!(admit(&cheaper, &s, None).unwrap().max_price, Some(0.5), "the lower ceiling wins");
}

#[test]
fn gpu_choices_are_checked_against_the_live_catalog_in_the_authors_order() {
    let s = settings();
    let offers = [
        offer("NVIDIA L4", 0.39, Stock::High),
        offer("NVIDIA RTX PRO 4500 Blackwell", 0.72, Stock::Low),
        offer("NVIDIA A100 80GB PCIe", 1.64, Stock::High),
    ];
    let want = ["rtx-pro-4500".to_owned(), "l4".to_owned()];
    assert_eq!(choose_gpus(&want, &s, &offers, None).unwrap(), ["NVIDIA RTX PRO 4500 Blackwell", "NVIDIA L4"]);
    // Out of stock: skipped, not tried.
    let mut none = offers.clone();
    none[1].stock = Stock::None;
    assert_eq!(choose_gpus(&want, &s, &none, None).unwrap(), ["NVIDIA L4"]);
    // Above the ceiling: skipped.
    assert_eq!(choose_gpus(&["a100-80g".into(), "l4".into()], &s, &offers, Some(1.0)).unwrap(), ["NVIDIA L4"]);
    let b = choose_gpus(&["a100-80g".into()], &s, &offers, Some(1.0)).unwrap_err();
    assert_eq!(b.reason, Reason::OverPriceLimit);
    // Never a hard-coded list: an id the catalog lacks is refused, naming the aliases.
    let b = choose_gpus(&["NVIDIA H200".into()], &s, &offers, None).unwrap_err();
    assert_eq!(b.reason, Reason::UnknownGpuType);
    assert!(b.message.contains("NVIDIA H200") && b.message.contains("rtx-pro-4500"), "{}", b.message);
    let b = choose_gpus(&["l4".into()], &s, &[offer("NVIDIA L4", 0.39, Stock::None)], None).unwrap_err();
    assert_eq!(b.reason, Reason::NoStock);
}

fn t(secs: i64) -> DateTime<Utc> {
    Utc.timestamp_opt(1_800_000_000 + secs, 0).unwrap()
}

fn pod(runtime: bool) -> Pod {
    Pod {
        id: "p1".into(),
        name: "ep-run".into(),
        status: PodStatus::Running,
        image: String::new(),
        env: BTreeMap::new(),
        gpu_type_id: None,
        gpu_display_name: None,
        gpu_count: 1,
        cost_per_hr: 0.72,
        machine_id: None,
        data_center_id: None,
        network_volume_id: None,
        runtime: runtime.then(|| Runtime { uptime_seconds: 1, ports: None, gpu_ids: vec![] }),
    }
}

fn hb(at: i64, token: u64) -> Heartbeat {
    Heartbeat {
        version: FORMAT_VERSION,
        run_id: "run".into(),
        seq: 1,
        time: t(at),
        pid: Some(42),
        fencing_token: token,
        state: RunnerState::Running,
        gpus: vec![],
        runner: None,
    }
}

fn view<'a>(pod: Option<&'a Pod>, heartbeat: Option<&'a Heartbeat>, online: Option<i64>) -> RunView<'a> {
    RunView {
        pod,
        heartbeat,
        last_heartbeat: None,
        terminal_present: false,
        fencing_token: 7,
        pod_requested_at: t(0),
        online_at: online.map(t),
        stop_requested: false,
        deleting: false,
        heartbeat_timeout: Duration::from_secs(60),
        start_deadline: Duration::from_secs(600),
        max_runtime: Some(Duration::from_secs(3600)),
        max_lifetime: Duration::from_secs(7200),
        spent_usd: 0.0,
        max_cost_usd: Some(10.0),
    }
}

#[test]
fn a_pod_is_online_only_with_a_runtime_and_a_heartbeat() {
    let (with, without) = (pod(true), pod(false));
    let beat = hb(5, 7);
    assert_eq!(watch(&view(Some(&without), None, None), t(10)), Verdict::Starting(Reason::WaitingForRuntime));
    assert_eq!(watch(&view(Some(&with), None, None), t(10)), Verdict::Starting(Reason::WaitingForHeartbeat));
    assert_eq!(watch(&view(Some(&without), Some(&beat), None), t(10)), Verdict::Starting(Reason::WaitingForRuntime));
    assert_eq!(watch(&view(Some(&with), Some(&beat), None), t(10)), Verdict::Online);
    assert_eq!(watch(&view(Some(&with), Some(&beat), Some(6)), t(10)), Verdict::Healthy);
}

#[test]
fn a_runtime_that_never_appears_ends_the_attempt_at_the_deadline() {
    let p = pod(false);
    assert_eq!(watch(&view(Some(&p), None, None), t(599)), Verdict::Starting(Reason::WaitingForRuntime));
    assert_eq!(watch(&view(Some(&p), None, None), t(600)), Verdict::Drain(Reason::RuntimeNeverAppeared));
}

#[test]
fn lost_heartbeats_and_vanished_pods_drain() {
    let p = pod(true);
    let beat = hb(100, 7);
    assert_eq!(watch(&view(Some(&p), Some(&beat), Some(10)), t(160)), Verdict::Healthy);
    assert_eq!(watch(&view(Some(&p), Some(&beat), Some(10)), t(161)), Verdict::Drain(Reason::HeartbeatLost));
    assert_eq!(
        watch(&view(None, Some(&beat), Some(10)), t(101)),
        Verdict::Drain(Reason::PodVanished),
        "pod gone from RunPod's list after the runner was online: not a lost heartbeat"
    );
    assert_eq!(watch(&view(None, None, None), t(5)), Verdict::Drain(Reason::PodGone));
    let mut exited = pod(true);
    exited.status = PodStatus::Exited;
    assert_eq!(watch(&view(Some(&exited), Some(&beat), Some(10)), t(101)), Verdict::Drain(Reason::PodExited));
}

#[test]
fn a_heartbeat_from_another_claim_is_a_split_brain() {
    let p = pod(true);
    let stale = hb(100, 6);
    assert_eq!(watch(&view(Some(&p), Some(&stale), Some(10)), t(101)), Verdict::Drain(Reason::FencingTokenMismatch));
}

#[test]
fn stop_delete_finish_and_limits_drain_in_that_order() {
    let p = pod(true);
    let beat = hb(100, 7);
    let mut v = view(Some(&p), Some(&beat), Some(10));
    v.spent_usd = 10.0;
    assert_eq!(watch(&v, t(101)), Verdict::Drain(Reason::CostLimitReached));
    assert_eq!(watch(&v, t(3610)), Verdict::Drain(Reason::LifetimeReached), "max runtime counts from online");
    v.terminal_present = true;
    assert_eq!(watch(&v, t(101)), Verdict::Drain(Reason::RunFinished));
    v.stop_requested = true;
    assert_eq!(watch(&v, t(101)), Verdict::Drain(Reason::StopRequested));
    v.deleting = true;
    assert_eq!(watch(&v, t(101)), Verdict::Drain(Reason::OrderDeleted));
}

#[test]
fn outcomes_follow_the_verified_evidence() {
    let ok = Evidence::Verified {
        state: TerminalState::Succeeded,
        reason: "exit 0".into(),
        exit_code: Some(0),
        metrics: BTreeMap::new(),
    };
    assert_eq!(outcome(Reason::RunFinished, &ok).0, OutcomeState::Succeeded);
    let failed = Evidence::Verified {
        state: TerminalState::Failed,
        reason: "exit 3".into(),
        exit_code: Some(3),
        metrics: BTreeMap::new(),
    };
    assert_eq!(outcome(Reason::RunFinished, &failed).1, Reason::NonZeroExit);
    let stopped = Evidence::Verified {
        state: TerminalState::Stopped,
        reason: "SIGTERM".into(),
        exit_code: None,
        metrics: BTreeMap::new(),
    };
    assert_eq!(outcome(Reason::OrderDeleted, &stopped).0, OutcomeState::Stopped);
    assert_eq!(
        outcome(Reason::HeartbeatLost, &Evidence::NoTerminal),
        (
            OutcomeState::Failed,
            Reason::HeartbeatLost,
            Some("the runner left no terminal.json: the run did not finish".to_owned())
        )
    );
    let (state, reason, _) =
        outcome(Reason::RunFinished, &Evidence::Untrusted("terminal.json carries fencing token 1".into()));
    assert_eq!((state, reason), (OutcomeState::FailedStatusDivergence, Reason::TerminalDivergence));
}

#[test]
fn a_capacity_error_moves_to_the_next_choice_and_every_other_failure_is_classified() {
    let choices = ["a".to_owned(), "b".to_owned()];
    let capacity = Err(RunPodError::Capacity { message: "no longer any instances available".into() });
    assert_eq!(after_create(&capacity, 0, &choices), CreateStep::TryNext(1));
    match after_create(&capacity, 1, &choices) {
        CreateStep::Block(b) => assert_eq!(b.reason, Reason::NoCapacity),
        s => panic!("{s:?}"),
    }
    let lost = Err(RunPodError::Transient { message: "timeout".into(), may_have_applied: true });
    assert_eq!(after_create(&lost, 0, &choices), CreateStep::OutcomeUnknown, "never retried blind: adopt first");
    let before = Err(RunPodError::Transient { message: "connect".into(), may_have_applied: false });
    assert_eq!(after_create(&before, 0, &choices), CreateStep::Retry);
    let broke = Err(RunPodError::InsufficientBalance { message: "balance is too low".into() });
    assert!(
        matches!(after_create(&broke, 0, &choices), CreateStep::Block(b) if b.reason == Reason::InsufficientBalance)
    );
    let bad = Err(RunPodError::InvalidRequest { message: "unknown field".into() });
    assert!(matches!(after_create(&bad, 0, &choices), CreateStep::Block(b) if b.reason.is_fatal()));
}

#[test]
fn retention_keeps_all_the_newest_or_nothing() {
    let arts = ["checkpoints/e1.pt", "checkpoints/e3.pt", "checkpoints/e2.pt", "results.json"].map(String::from);
    let (_, keep) = retention(ep_api::experiment::RetentionClass::Keep, "checkpoints/", &arts);
    assert!(keep.is_empty());
    let (summary, last) = retention(ep_api::experiment::RetentionClass::KeepLast, "checkpoints/", &arts);
    assert_eq!(last, ["checkpoints/e2.pt", "checkpoints/e1.pt"]);
    assert_eq!(summary, "KeepLast: kept 1, deleted 2");
    let (_, all) = retention(ep_api::experiment::RetentionClass::Discard, "/checkpoints", &arts);
    assert_eq!(all.len(), 3, "results are never checkpoints");
}

#[test]
fn a_heartbeat_read_that_finds_nothing_or_an_older_beat_does_not_lose_a_live_runner() {
    let with = pod(true);
    // Online at 0, the last heartbeat status holds at 100, timeout 60 s: at 130 a read that finds
    // no heartbeat file (a write racing the read) or an older one is not a lost runner.
    let mut v = view(Some(&with), None, Some(0));
    v.last_heartbeat = Some(t(100));
    assert_eq!(watch(&v, t(130)), Verdict::Healthy);
    let old = hb(20, 7);
    v.heartbeat = Some(&old);
    assert_eq!(watch(&v, t(130)), Verdict::Healthy);
    // Past the timeout from the newest beat, it is.
    assert_eq!(watch(&v, t(161)), Verdict::Drain(Reason::HeartbeatLost));
    v.last_heartbeat = None;
    assert_eq!(watch(&v, t(130)), Verdict::Drain(Reason::HeartbeatLost));
}
