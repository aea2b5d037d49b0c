use super::*;

const PRO: &str = "NVIDIA RTX PRO 4500 Blackwell";

fn world() -> World {
    World::new(WorldConfig::default(), std::env::temp_dir().join("runpod-sim-unit"))
}

fn t(secs: i64) -> DateTime<Utc> {
    DateTime::from_timestamp(1_800_000_000 + secs, 0).unwrap()
}

fn req(name: &str) -> CreatePod {
    CreatePod {
        name: name.into(),
        image_name: "img".into(),
        gpu_type_id: PRO.into(),
        gpu_count: 1,
        cloud_type: "SECURE".into(),
        network_volume_id: Some("tgb8bx6fwl".into()),
        ..CreatePod::default()
    }
}

#[test]
fn creates_consume_stock_and_terminates_release_it() {
    let mut w = world();
    let ids: Vec<String> = (0..4).map(|i| w.create_pod(req(&format!("p{i}")), t(0)).unwrap().id.clone()).collect();
    assert_eq!(w.free(PRO, "EU-RO-1", "SECURE"), 0);
    assert_eq!(w.create_pod(req("p5"), t(0)).unwrap_err(), SimError::Capacity);
    assert_eq!(SimError::Capacity.to_string(), messages::CAPACITY);
    w.terminate_pod(&ids[0], t(1), "test").unwrap();
    assert_eq!(w.free(PRO, "EU-RO-1", "SECURE"), 1);
    assert_eq!(w.terminate_pod(&ids[0], t(1), "test").unwrap_err().to_string(), "pod not found to terminate");
    w.create_pod(req("p6"), t(2)).unwrap();
}

#[test]
fn network_volume_pins_the_data_center() {
    let mut w = world();
    let mut r = req("x");
    r.data_center_ids = vec!["US-KS-2".into()];
    assert_eq!(w.create_pod(r, t(0)).unwrap_err(), SimError::Capacity, "volume is in EU-RO-1");
    let pod = w.create_pod(req("y"), t(0)).unwrap();
    assert_eq!(pod.data_center_id, "EU-RO-1");
    let mut r = req("z");
    r.network_volume_id = Some("missing".into());
    assert!(matches!(w.create_pod(r, t(0)).unwrap_err(), SimError::Invalid(_)));
}

#[test]
fn balance_gates_creation_and_billing_draws_it_down() {
    let mut w = world();
    w.balance = 0.5;
    assert_eq!(w.create_pod(req("a"), t(0)).unwrap_err(), SimError::Balance, "an hour of credit is needed");
    w.balance = 10.0;
    let id = w.create_pod(req("a"), t(0)).unwrap().id.clone();
    w.tick(t(3600));
    let pod = &w.pods[&id];
    assert!((pod.accrued_usd - 0.72).abs() < 1e-9);
    assert!((w.balance - 9.28).abs() < 1e-9);
    // Out of money: a pod with a network volume is stopped, not terminated.
    w.tick(t(3600 * 14));
    assert_eq!(w.pods[&id].desired_status, PodStatus::Exited);
}

#[test]
fn spot_is_refused_unless_enabled() {
    let mut w = world();
    let mut r = req("spot");
    r.interruptible = true;
    assert_eq!(w.create_pod(r.clone(), t(0)).unwrap_err().to_string(), "Spot pods are no longer offered");
    w.config.spot_enabled = true;
    assert_eq!(w.create_pod(r, t(0)).unwrap().pod_type, "INTERRUPTABLE");
}

#[test]
fn runtime_appears_after_the_start_delay_and_terminate_after_ends_the_pod() {
    let mut w = world();
    let mut r = req("d");
    r.terminate_after = Some(t(100));
    let id = w.create_pod(r, t(0)).unwrap().id.clone();
    w.tick(t(1));
    assert!(!w.pods[&id].container_running);
    w.tick(t(6));
    assert!(w.pods[&id].container_running);
    assert!(!w.pods[&id].ports_visible(t(6)) || w.config.pods.ports_delay_seconds == 0.0);
    assert!(w.pods[&id].ports_visible(t(8)));
    w.tick(t(100));
    assert!(!w.pods.contains_key(&id), "terminateAfter reached");
    assert_eq!(w.free(PRO, "EU-RO-1", "SECURE"), 4);
}

#[test]
fn stop_releases_the_gpu_and_resume_needs_it_back() {
    let mut w = world();
    let id = w.create_pod(req("r"), t(0)).unwrap().id.clone();
    w.stop_pod(&id, t(1)).unwrap();
    assert_eq!(w.free(PRO, "EU-RO-1", "SECURE"), 4);
    for i in 0..4 {
        w.create_pod(req(&format!("o{i}")), t(2)).unwrap();
    }
    assert_eq!(w.resume_pod(&id, t(3)).unwrap_err(), SimError::ResumeNoGpus);
}

#[test]
fn lowest_price_reports_stock() {
    let w = world();
    let gpu = w.gpu_type(PRO).unwrap().clone();
    let lp = w.lowest_price(&gpu, 2, Some(true), Some("EU-RO-1"));
    assert_eq!((lp.uninterruptable_price, lp.stock_status.as_deref()), (Some(1.44), Some("High")));
    let lp = w.lowest_price(&gpu, 1, Some(true), Some("US-KS-2"));
    assert_eq!(lp.stock_status.as_deref(), Some("None"));
    assert!(lp.minimum_bid_price.is_none(), "no spot prices while spot is off");
}

#[test]
fn vanish_and_exit_are_unsolicited_transitions() {
    let mut w = world();
    let a = w.create_pod(req("a"), t(0)).unwrap().id.clone();
    let b = w.create_pod(req("b"), t(0)).unwrap().id.clone();
    w.vanish(&a, t(1)).unwrap();
    assert!(!w.pods.contains_key(&a));
    w.exit(&b, t(1)).unwrap();
    assert_eq!(w.pods[&b].desired_status, PodStatus::Exited);
}
