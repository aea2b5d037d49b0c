//! The operator process itself: leader election between replicas, and one shared pod list per
//! provider however many orders poll it.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use ep_testkit::e2e::{NS, exp, init_tls, phase, quickstart_stack, wait_until};
use ep_testkit::stack::{OperatorProcess, Stack, StackOptions};

fn leads(op: &OperatorProcess) -> bool {
    op.metric("ep_leader") == Some(1.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_lease_holder_acts_and_a_standby_takes_over() {
    init_tls();
    let mut stack = Stack::start(&StackOptions::default()).await.unwrap();
    // Replace the plain operator with two replicas electing a leader.
    stack.operator.take().unwrap().stop();
    let args = ["--leader-election", "--lease-namespace", "ep-system", "--lease-name", "ep-operator"];
    let mut a = stack.spawn_operator(&[&args[..], &["--identity", "replica-a"]].concat()).unwrap();
    wait_until("replica-a leads", Duration::from_secs(30), || leads(&a)).unwrap();
    let mut b = stack.spawn_operator(&[&args[..], &["--identity", "replica-b"]].concat()).unwrap();
    // A standby is ready (to lead), so a two-replica rollout completes.
    wait_until("replica-b ready", Duration::from_secs(30), || b.get("/readyz").is_some_and(|(c, _)| c == 200)).unwrap();
    assert!(!leads(&b), "one leader at a time");
    assert_eq!(b.get("/livez").unwrap().0, 200);
    let lease = stack.get("lease", Some("ep-system"), "ep-operator").unwrap().unwrap();
    assert_eq!(lease["spec"]["holderIdentity"], "replica-a");

    stack.apply_quickstart(false).unwrap();
    stack.apply(&exp("led").epochs(3, 0.0).yaml()).unwrap();
    stack.wait_for("exp", Some(NS), "led", Duration::from_secs(120), "Succeeded", |o| phase(o) == "Succeeded").unwrap();
    assert_eq!(
        b.metric("ep_reconciles_total{kind=\"Experiment\"}").unwrap_or(0.0),
        0.0,
        "the standby never reconciled"
    );
    assert!(a.metric("ep_reconciles_total{kind=\"Experiment\"}").unwrap() > 0.0);

    // The leader dies without releasing the lease: the standby takes over once it expires.
    a.kill();
    assert!(!a.running());
    wait_until("replica-b leads", Duration::from_secs(60), || leads(&b)).unwrap();
    stack.apply(&exp("after").epochs(3, 0.0).yaml()).unwrap();
    stack
        .wait_for("exp", Some(NS), "after", Duration::from_secs(120), "Succeeded", |o| phase(o) == "Succeeded")
        .unwrap();
    assert!(b.running());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orders_share_one_pod_list_per_poll_interval() {
    let stack = quickstart_stack(&StackOptions::default()).await.unwrap();
    let names = ["share-1", "share-2", "share-3"];
    for n in names {
        stack.apply(&exp(n).epochs(40, 0.5).yaml()).unwrap();
    }
    for n in names {
        let order = format!("{n}-a1");
        stack
            .wait_for("rpo", Some(NS), &order, Duration::from_secs(120), "RUNNER_ONLINE", |o| {
                phase(o) == "RUNNER_ONLINE"
            })
            .unwrap();
    }
    let op = stack.operator.as_ref().unwrap();
    let series = "ep_runpod_calls_total{operation=\"list_pods\",outcome=\"ok\"}";
    let before = op.metric(series).unwrap();
    let window = Duration::from_secs(6);
    tokio::time::sleep(window).await;
    for n in names {
        assert_eq!(
            phase(stack.get("rpo", Some(NS), &format!("{n}-a1")).unwrap().as_ref()),
            "RUNNER_ONLINE",
            "still running"
        );
    }
    let calls = op.metric(series).unwrap() - before;
    eprintln!("{calls} list_pods calls in {window:?} for 3 running orders");
    // Poll interval 1s: about one list per second for all three orders together; one list per
    // order per poll would make at least 18.
    assert!(calls <= 8.0, "{calls} list calls in {window:?} for 3 running orders");
    assert!(calls >= 3.0, "the orders are polled: {calls}");
}
