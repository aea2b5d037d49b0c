#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;

use chrono::TimeZone;
use ep_api::volume::{FORMAT_VERSION, RunnerState};

use super::*;
use crate::runpod::{Runtime, Stock};

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
    let b = admit("ns", &spec("paper-train"), &s, &BudgetUsage::default()).unwrap_err();
    assert_eq!(b.reason, "AwaitingApproval");
    assert!(!b.fatal);
    let mut approved = spec("paper_train");
    approved.approved = Some(true);
    let a = admit("ns", &approved, &s, &BudgetUsage::default()).unwrap();
    assert_eq!(a.policy_name, "paper-train", "aliases resolve to the canonical name");
    assert!(admit("ns", &spec("smoke"), &s, &BudgetUsage::default()).is_ok(), "smoke needs no approval");
}

#[test]
fn unknown_policies_list_the_known_ones_and_spot_is_refused() {
    let s = settings();
    let b = admit("ns", &spec("paper-trian"), &s, &BudgetUsage::default()).unwrap_err();
    assert_eq!(b.reason, "UnknownPolicy");
    assert!(
        b.message.contains("spec.policy") && b.message.contains("paper-train") && b.message.contains("smoke"),
        "{}",
        b.message
    );
    let mut spot = spec("smoke");
    spot.gpu.interruptible = true;
    let b = admit("ns", &spot, &s, &BudgetUsage::default()).unwrap_err();
    assert_eq!((b.reason, b.fatal), ("SpotUnavailable", true));
}

#[test]
fn budgets_stop_spending_before_it_happens() {
    let s = settings(); // default budget: 2 GPUs, $50 a day
    let full = BudgetUsage { active_gpus: 2, spent_last_day: 0.0 };
    assert_eq!(admit("ns", &spec("smoke"), &s, &full).unwrap_err().reason, "BudgetExceeded");
    let spent = BudgetUsage { active_gpus: 0, spent_last_day: 50.0 };
    assert_eq!(admit("ns", &spec("smoke"), &s, &spent).unwrap_err().reason, "BudgetExceeded");
    let ok = BudgetUsage { active_gpus: 1, spent_last_day: 49.0 };
    let a = admit("ns", &spec("smoke"), &s, &ok).unwrap();
    assert_eq!(a.max_price, Some(1.0), "the policy's price ceiling applies");
    let mut cheaper = spec("smoke");
    cheaper.max_cost_per_hour = Some(0.5);
    assert_eq!(admit("ns", &cheaper, &s, &ok).unwrap().max_price, Some(0.5), "the lower ceiling wins");
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
    assert_eq!(b.reason, "OverPriceLimit");
    // Never a hard-coded list: an id the catalog lacks is refused, naming the aliases.
    let b = choose_gpus(&["NVIDIA H200".into()], &s, &offers, None).unwrap_err();
    assert_eq!(b.reason, "UnknownGpuType");
    assert!(b.message.contains("NVIDIA H200") && b.message.contains("rtx-pro-4500"), "{}", b.message);
    let b = choose_gpus(&["l4".into()], &s, &[offer("NVIDIA L4", 0.39, Stock::None)], None).unwrap_err();
    assert_eq!(b.reason, "NoStock");
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
    }
}

fn view<'a>(pod: Option<&'a Pod>, heartbeat: Option<&'a Heartbeat>, online: Option<i64>) -> RunView<'a> {
    RunView {
        pod,
        heartbeat,
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
        accrued_usd: 0.0,
        max_cost_usd: Some(10.0),
    }
}

#[test]
fn a_pod_is_online_only_with_a_runtime_and_a_heartbeat() {
    let (with, without) = (pod(true), pod(false));
    let beat = hb(5, 7);
    assert_eq!(watch(&view(Some(&without), None, None), t(10)), Verdict::Starting("WaitingForRuntime"));
    assert_eq!(watch(&view(Some(&with), None, None), t(10)), Verdict::Starting("WaitingForHeartbeat"));
    assert_eq!(watch(&view(Some(&without), Some(&beat), None), t(10)), Verdict::Starting("WaitingForRuntime"));
    assert_eq!(watch(&view(Some(&with), Some(&beat), None), t(10)), Verdict::Online);
    assert_eq!(watch(&view(Some(&with), Some(&beat), Some(6)), t(10)), Verdict::Healthy);
}

#[test]
fn a_runtime_that_never_appears_ends_the_attempt_at_the_deadline() {
    let p = pod(false);
    assert_eq!(watch(&view(Some(&p), None, None), t(599)), Verdict::Starting("WaitingForRuntime"));
    assert_eq!(watch(&view(Some(&p), None, None), t(600)), Verdict::Drain("RuntimeNeverAppeared"));
}

#[test]
fn lost_heartbeats_and_vanished_pods_drain() {
    let p = pod(true);
    let beat = hb(100, 7);
    assert_eq!(watch(&view(Some(&p), Some(&beat), Some(10)), t(160)), Verdict::Healthy);
    assert_eq!(watch(&view(Some(&p), Some(&beat), Some(10)), t(161)), Verdict::Drain("HeartbeatLost"));
    assert_eq!(
        watch(&view(None, Some(&beat), Some(10)), t(101)),
        Verdict::Drain("HeartbeatLost"),
        "pod gone from RunPod's list"
    );
    assert_eq!(watch(&view(None, None, None), t(5)), Verdict::Drain("PodGone"));
    let mut exited = pod(true);
    exited.status = PodStatus::Exited;
    assert_eq!(watch(&view(Some(&exited), Some(&beat), Some(10)), t(101)), Verdict::Drain("PodExited"));
}

#[test]
fn a_heartbeat_from_another_claim_is_a_split_brain() {
    let p = pod(true);
    let stale = hb(100, 6);
    assert_eq!(watch(&view(Some(&p), Some(&stale), Some(10)), t(101)), Verdict::Drain("FencingTokenMismatch"));
}

#[test]
fn stop_delete_finish_and_limits_drain_in_that_order() {
    let p = pod(true);
    let beat = hb(100, 7);
    let mut v = view(Some(&p), Some(&beat), Some(10));
    v.accrued_usd = 10.0;
    assert_eq!(watch(&v, t(101)), Verdict::Drain("CostLimitReached"));
    assert_eq!(watch(&v, t(3610)), Verdict::Drain("LifetimeReached"), "max runtime counts from online");
    v.terminal_present = true;
    assert_eq!(watch(&v, t(101)), Verdict::Drain("RunFinished"));
    v.stop_requested = true;
    assert_eq!(watch(&v, t(101)), Verdict::Drain("StopRequested"));
    v.deleting = true;
    assert_eq!(watch(&v, t(101)), Verdict::Drain("OrderDeleted"));
}

#[test]
fn outcomes_follow_the_verified_evidence() {
    let ok = Evidence::Verified {
        state: TerminalState::Succeeded,
        reason: "exit 0".into(),
        exit_code: Some(0),
        metrics: BTreeMap::new(),
    };
    assert_eq!(outcome("RunFinished", &ok).0, "Succeeded");
    let failed = Evidence::Verified {
        state: TerminalState::Failed,
        reason: "exit 3".into(),
        exit_code: Some(3),
        metrics: BTreeMap::new(),
    };
    assert_eq!(outcome("RunFinished", &failed).1, "NonZeroExit");
    let stopped = Evidence::Verified {
        state: TerminalState::Stopped,
        reason: "SIGTERM".into(),
        exit_code: None,
        metrics: BTreeMap::new(),
    };
    assert_eq!(outcome("OrderDeleted", &stopped).0, "Stopped");
    assert_eq!(
        outcome("HeartbeatLost", &Evidence::NoTerminal),
        (
            "Failed",
            "HeartbeatLost".to_owned(),
            Some("the runner left no terminal.json: the run did not finish".to_owned())
        )
    );
    let (state, reason, _) =
        outcome("RunFinished", &Evidence::Untrusted("terminal.json carries fencing token 1".into()));
    assert_eq!((state, reason.as_str()), ("FailedStatusDivergence", "TerminalDivergence"));
}
