//! The spend ledger against a real API server (kube-sim): admissions are serialized by the
//! ConfigMap's resourceVersion, so one decided on a ledger someone else has since written is
//! refused, read again and decided again.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::path::Path;

use chrono::Utc;
use ep_operator::order::ledger::{self, Entry, Ledger};
use ep_operator::reason::Reason;
use ep_operator::settings::NamespaceBudget;
use ep_testkit::sim::KubeSimProcess;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::Api;

async fn ledger_api(kubeconfig: &Path) -> Api<ConfigMap> {
    let kc = kube::config::Kubeconfig::read_from(kubeconfig).unwrap();
    let config = kube::Config::from_custom_kubeconfig(kc, &Default::default()).await.unwrap();
    Api::namespaced(kube::Client::try_from(config).unwrap(), "ml")
}

fn entry(order: &str, reserved: f64) -> Entry {
    Entry {
        order: order.into(),
        experiment: None,
        admitted_at: Utc::now(),
        gpus: 1,
        reserved_usd: reserved,
        spent_usd: 0.0,
        open: true,
        orders: 0,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_admissions_into_room_for_one_cannot_both_succeed() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let sim = KubeSimProcess::start(None).unwrap();
    let kubeconfig = sim.kubeconfig();
    let api = ledger_api(&kubeconfig).await;
    let ns = k8s_openapi::api::core::v1::Namespace {
        metadata: kube::api::ObjectMeta { name: Some("ml".into()), ..Default::default() },
        ..Default::default()
    };
    Api::all(api.clone().into_client()).create(&Default::default(), &ns).await.unwrap();
    let budget = NamespaceBudget { max_usd_per_day: 10.0, max_usd_per_month: None, max_concurrent_gpus: 4 };
    let none = HashMap::new();
    // The first admission creates the ledger.
    let seed = ledger::reserve(&api, "ml", "uid-seed", &entry("seed", 1.0), &budget, &none).await.unwrap();
    assert_eq!(seed, Ok(()));

    // Order a reads the ledger and decides; before it writes, order b is admitted into the same
    // room (on another connection, as another reconcile or replica would be).
    let mut raced = false;
    let verdict = ledger::update(&api, Some(&budget), |l: &mut Ledger| {
        if !std::mem::replace(&mut raced, true) {
            std::thread::scope(|s| {
                s.spawn(|| {
                    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
                    rt.block_on(async {
                        let api = ledger_api(&kubeconfig).await;
                        let b = ledger::reserve(&api, "ml", "uid-b", &entry("b", 6.0), &budget, &HashMap::new()).await;
                        assert_eq!(b.unwrap(), Ok(()));
                    });
                })
                .join()
                .unwrap();
            });
        }
        ledger::admit_change(l, "ml", "uid-a", &entry("a", 6.0), &budget, &none)
    })
    .await
    .unwrap();
    let refused = verdict.expect_err("a was decided on a stale ledger and must be decided again");
    assert_eq!(refused.reason, Reason::BudgetExceeded);
    assert!(refused.message.contains("$7.00 spent or reserved today"), "{}", refused.message);
    let cm = api.get(ledger::NAME).await.unwrap();
    let held = Ledger::from_data(cm.data.as_ref());
    let mut orders: Vec<&str> = held.entries.values().map(|e| e.order.as_str()).collect();
    orders.sort_unstable();
    assert_eq!(orders, ["b", "seed"], "only what fits is reserved");
    let budget_note = cm.metadata.annotations.unwrap_or_default().remove(ledger::BUDGET_ANNOTATION).unwrap();
    assert!(budget_note.contains("\"maxUsdPerDay\":10.0"), "{budget_note}");
}
