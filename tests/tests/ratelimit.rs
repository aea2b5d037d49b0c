//! REST v2's account-wide rate limit: with runpod-sim enforcing 60 requests per minute, thirty
//! running orders finish without one request refused, because the operator paces itself by the
//! `RateLimit` headers. `EP_RATELIMIT_SECONDS` sets how long the runs last (120 s by default; 600
//! for the ten-minute run).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use ep_testkit::e2e::{NS, exp, phase, quickstart_stack};
use ep_testkit::stack::{FAST_SETTINGS, StackOptions};

const ORDERS: usize = 30;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thirty_running_orders_under_sixty_requests_a_minute_get_no_429_and_all_finish() {
    let seconds: f64 = std::env::var("EP_RATELIMIT_SECONDS").ok().and_then(|v| v.parse().ok()).unwrap_or(120.0);
    let world = runpod_sim::config::DEFAULT_WORLD
        .replace("cloudType: SECURE, count: 4}", "cloudType: SECURE, count: 40}")
        .replace("stock:\n", "rateLimit:\n  - {name: minute, quota: 60, windowSeconds: 60}\nstock:\n");
    assert!(world.contains("quota: 60"));
    let settings = FAST_SETTINGS
        .replace("maxConcurrentGpus: 4", "maxConcurrentGpus: 40")
        .replace("maxUsdPerDay: 50", "maxUsdPerDay: 500")
        .replace("reconciles: 4", "reconciles: 16")
        // Thirty runners heartbeat on two cores here; this test is about RunPod's budget.
        .replace("heartbeatTimeout: 6s", "heartbeatTimeout: 60s");
    let stack =
        quickstart_stack(&StackOptions { world: Some(world), settings, ..StackOptions::default() }).await.unwrap();
    let started = Instant::now();
    let epochs = (seconds / 5.0).ceil() as u32;
    for n in 0..ORDERS {
        stack.apply(&exp(&format!("paced{n}")).epochs(epochs, 5.0).gpus(&["rtx-pro-4500"]).yaml()).unwrap();
    }
    // All thirty are online together at some point.
    let deadline = Instant::now() + Duration::from_secs(240);
    loop {
        let out = stack.kubectl(&["get", "rpo", "-n", NS, "-o", "json"]).unwrap();
        let list: serde_json::Value = serde_json::from_str(&out).unwrap();
        let online = list["items"].as_array().unwrap().iter().filter(|o| phase(Some(o)) == "RUNNER_ONLINE").count();
        if online == ORDERS {
            break;
        }
        if Instant::now() > deadline {
            let reasons: Vec<String> = list["items"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|o| phase(Some(o)) != "RUNNER_ONLINE")
                .map(|o| {
                    let name = o["metadata"]["name"].as_str().unwrap_or_default();
                    let log = stack.operator_log(1_000_000);
                    let lines: Vec<&str> = log.lines().filter(|l| l.contains(name)).collect();
                    format!(
                        "{name} {}: {}\n  {}",
                        phase(Some(o)),
                        o["status"]["conditions"],
                        lines[lines.len().saturating_sub(8)..].join("\n  ")
                    )
                })
                .collect();
            let world = stack.world().await.unwrap();
            panic!(
                "only {online} of {ORDERS} orders came online; the others:\n{}\nrequests: {}\nrefused: {}\noperator log:\n{}",
                reasons.join("\n"),
                world["requests"],
                world["rateLimitedAnswers"],
                stack.operator_log(60)
            );
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let all_online = started.elapsed();
    for name in (0..ORDERS).map(|n| format!("paced{n}")) {
        let done = |o: Option<&serde_json::Value>| {
            o.is_some_and(|e| ["Succeeded", "Failed"].contains(&phase(Some(e)).as_str()))
        };
        let within = Duration::from_secs_f64(seconds) + Duration::from_secs(300);
        let e = stack.wait_for("exp", Some(NS), &name, within, "an end", done).unwrap().unwrap();
        assert_eq!(e["status"]["phase"], "Succeeded", "{name}: {}", e["status"]);
    }
    let world = stack.world().await.unwrap();
    let requests: u64 = world["requests"]
        .as_object()
        .unwrap()
        .iter()
        .filter(|(k, _)| k.starts_with("rest"))
        .map(|(_, v)| v.as_u64().unwrap())
        .sum();
    let remaining = stack.operator.as_ref().unwrap().metric("ep_runpod_ratelimit_remaining{window=\"minute\"}");
    eprintln!(
        "{ORDERS} orders, {:.0} s runs: all online after {:.0} s, all done after {:.0} s; {requests} REST requests ({:.1}/min), {} refused; remaining quota metric {remaining:?}",
        seconds,
        all_online.as_secs_f64(),
        started.elapsed().as_secs_f64(),
        requests as f64 / started.elapsed().as_secs_f64() * 60.0,
        world["rateLimitedAnswers"],
    );
    assert_eq!(world["rateLimitedAnswers"], 0, "requests refused with 429");
    assert!(remaining.is_some(), "the remaining quota is exported");
    assert!(stack.live_pods().await.unwrap().is_empty());
}
