//! `make sandbox`: the main job on an embedded default, start to finish.
//!
//! Starts a throwaway PostgreSQL, runpod-sim (fast clock), kube-sim and the ep-operator binary;
//! applies `examples/quickstart/` with kubectl (the provider and its Secrets pointed at
//! runpod-sim); waits until the experiment is COMPLETED; prints `kubectl get exp,rpo`, the f1 and
//! auc, and the four registry queries of DESIGN section 7; then stops everything, or keeps it
//! running with `KEEP=1`.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use ep_testkit::stack::{Stack, StackOptions};

const QUERIES: [&str; 4] = [
    "SELECT name, status FROM exp_registry.experiments WHERE name = 'quickstart';",
    "SELECT name, status, result_f1, result_auc FROM exp_registry.experiments ORDER BY name;",
    "SELECT name, worker_id, started_at FROM exp_registry.experiments WHERE status = 'RUNNING';",
    "SELECT worker_id, last_seen, running_jobs FROM exp_registry.worker_heartbeats;",
];

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> ExitCode {
    if rustls::crypto::aws_lc_rs::default_provider().install_default().is_err() {
        eprintln!("sandbox: a rustls crypto provider was already installed");
    }
    match run().await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("sandbox: {e}");
            ExitCode::FAILURE
        }
    }
}

fn indent(text: &str) -> String {
    text.lines().map(|l| format!("    {l}\n")).collect()
}

async fn run() -> Result<(), Box<dyn std::error::Error>> {
    let started = Instant::now();
    println!("==> starting a throwaway PostgreSQL, runpod-sim (real-time clock), kube-sim and ep-operator");
    // One clock: the durations a user writes (maxRuntime, a policy's maxLifetime) are real minutes
    // here, and the operator's cost and runpod-sim's billing count the same seconds.
    let mut opts = StackOptions { clock_speed: 1.0, ..StackOptions::default() };
    if let Some(p) = std::env::var_os("EP_SETTINGS") {
        opts.settings = std::fs::read_to_string(p)?;
    }
    let stack = Stack::start(&opts).await?;
    let op = stack.operator.as_ref().ok_or("operator not started")?;
    println!("    PostgreSQL      {}", stack.database_url);
    println!("    RunPod API      {}   volume S3 {}", stack.runpod.get("api"), stack.runpod.get("s3"));
    println!("    Kubernetes API  {}   (KUBECONFIG={})", stack.kube.url, stack.kubeconfig().display());
    println!("    people          contexts wren (author), aster (approver), lark (platform admin), finch (viewer)");
    println!("    ep-operator     runs as {} with the chart's RBAC", ep_testkit::authority::OPERATOR_USER);
    println!("    ep-operator     {}/metrics   log {}", op.metrics_url, op.log.display());

    println!("==> examples/quickstart/ pointed at runpod-sim: kubectl create secret generic runpod|runpod-s3");
    println!("    --from-literal=... (runpod-sim's keys), then kubectl apply -f for the rest");
    let balance = stack.world().await?["balance"].as_f64().unwrap_or_default();
    // EP_SANDBOX_MINUTES=10: the quickstart trains for that many real minutes (its 20 epochs
    // spaced out), and the operator's cost must agree with runpod-sim's billing within 5%.
    let minutes: Option<f64> = std::env::var("EP_SANDBOX_MINUTES").ok().map(|m| m.parse()).transpose()?;
    print!("{}", indent(&stack.apply_quickstart(minutes.is_none())?));
    if let Some(m) = minutes {
        let yaml =
            std::fs::read_to_string(ep_testkit::workspace_root().join("examples/quickstart/30-experiment.yaml"))?;
        let spaced = format!(r#"args: [--epochs, "20", --epoch-sleep, "{}"]"#, m * 60.0 / 20.0);
        let yaml = yaml.replace(r#"args: [--epochs, "20"]"#, &spaced);
        if !yaml.contains(&spaced) {
            return Err("examples/quickstart/30-experiment.yaml no longer has args: [--epochs, \"20\"]".into());
        }
        println!("    the quickstart with {spaced}: about {m} minutes of training");
        print!("{}", indent(&stack.apply(&yaml)?));
    }

    println!("==> waiting for the experiment (kubectl get exp quickstart -n ep-quickstart -w)");
    let last = std::cell::RefCell::new(String::new());
    let exp = stack.wait_for(
        "exp",
        Some("ep-quickstart"),
        "quickstart",
        Duration::from_secs(300) + Duration::from_secs_f64(minutes.unwrap_or(0.0) * 60.0),
        "Succeeded or Failed",
        |o| {
            let phase = o.and_then(|o| o["status"]["phase"].as_str()).unwrap_or("").to_owned();
            let order = o.and_then(|o| o["status"]["currentAttempt"]["order"].as_str()).unwrap_or("").to_owned();
            let line = format!("{phase} {order}");
            if *last.borrow() != line && !phase.is_empty() {
                last.replace(line.clone());
                println!(
                    "    {:>5.1}s  experiment {phase}{}",
                    started.elapsed().as_secs_f64(),
                    if order.is_empty() { String::new() } else { format!(" (order {order})") }
                );
            }
            matches!(phase.as_str(), "Succeeded" | "Failed")
        },
    );
    let exp = exp?.ok_or("the experiment disappeared")?;

    println!("==> kubectl get exp,rpo -n ep-quickstart");
    print!("{}", indent(&stack.kubectl(&["get", "exp,rpo", "-n", "ep-quickstart"])?));
    let st = &exp["status"];
    println!(
        "==> results: f1 {}  auc {}  (receipt {})",
        st["results"]["f1"],
        st["results"]["auc"],
        st["artifacts"]["receipt"].as_str().unwrap_or("none")
    );

    // The mirror writes asynchronously: give it a moment to reach the final state.
    let pool = sqlx::PgPool::connect(&stack.database_url).await?;
    let deadline = Instant::now() + Duration::from_secs(15);
    while Instant::now() < deadline {
        let s: Option<String> =
            sqlx::query_scalar("SELECT status FROM exp_registry.experiments WHERE name = 'quickstart'")
                .fetch_optional(&pool)
                .await?;
        if matches!(s.as_deref(), Some("COMPLETED" | "FAILED" | "FAILED_STATUS_DIVERGENCE")) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    println!("==> registry queries (DESIGN section 7), with psql");
    for q in QUERIES {
        println!("$ psql -c \"{q}\"");
        // psql comes with `make deps` (postgresql-client).
        let out = std::process::Command::new("psql").arg(&stack.database_url).args(["-X", "-c", q]).output()?;
        if !out.status.success() {
            return Err(format!("psql: {}", String::from_utf8_lossy(&out.stderr)).into());
        }
        print!("{}", indent(&String::from_utf8_lossy(&out.stdout)));
    }
    let billed = balance - stack.world().await?["balance"].as_f64().unwrap_or_default();
    let order = stack.get("rpo", Some("ep-quickstart"), "quickstart-a1")?.unwrap_or_default();
    let cost = order["status"]["accruedCostUsd"].as_f64().unwrap_or_default();
    let off = if billed > 0.0 { (cost - billed).abs() / billed } else { 1.0 };
    println!(
        "==> cost: the operator counted ${cost:.6}; runpod-sim billed ${billed:.6} for the same pod ({:.2}% apart)",
        off * 100.0
    );
    if minutes.is_some() && off >= 0.05 {
        return Err(format!("the operator's cost is {:.2}% off runpod-sim's billing (at most 5%)", off * 100.0).into());
    }
    let live = stack.live_pods().await?.len();
    println!("==> runpod-sim holds {live} live pods; finished in {:.1}s", started.elapsed().as_secs_f64());
    let ok = st["phase"] == "Succeeded";
    if std::env::var_os("KEEP").is_some() {
        let bin = ep_testkit::sim::workspace_bin("kubectl-ep")?;
        let plugins = bin.parent().map(|d| d.display().to_string()).unwrap_or_default();
        println!("==> KEEP set: everything stays up until Ctrl-C. Next, in another terminal:");
        println!("    export KUBECONFIG={}", stack.kubeconfig().display());
        println!("    export PATH={plugins}:$PATH   # kubectl ep, and its completion in kubectl's");
        println!(
            "    kubectl ep gpus                                   # what RunPod (runpod-sim) offers, cheapest first"
        );
        println!("    sed 's/name: quickstart$/name: mine/' examples/quickstart/30-experiment.yaml > mine.yaml");
        println!("    kubectl ep run examples/quickstart -f mine.yaml   # push the code, apply, follow to the end");
        println!("    kubectl get exp -n ep-quickstart                  # PHASE, REASON, PROGRESS, COST, F1, AUC");
        println!("    kubectl ep logs mine -n ep-quickstart; kubectl ep pull mine -n ep-quickstart");
        println!("    kubectl ep rerun mine -n ep-quickstart; kubectl ep describe mine -n ep-quickstart");
        println!("    kubectl --context wren apply -f my-experiment.yaml   # as the author; aster approves:");
        println!(
            "    kubectl ep approve <experiment> -n <namespace> --context aster   # an envelope for all its attempts"
        );
        println!("    psql '{}'", stack.database_url);
        println!("    curl {}/metrics", op.metrics_url);
        tokio::signal::ctrl_c().await?;
    }
    println!("==> stopping");
    drop(stack);
    if ok { Ok(()) } else { Err("the quickstart experiment did not succeed".into()) }
}
