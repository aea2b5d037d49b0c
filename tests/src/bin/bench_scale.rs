//! `make bench-scale`: the control plane at N = 100, 300 and 1,000 tiny experiments, through the
//! real binaries (release build): PostgreSQL, runpod-sim with plenty of stock, kube-sim with its
//! audit log, and ep-operator.
//!
//! For each N it prints experiments per second (first apply to the last one finished), Kubernetes
//! calls per experiment (kube-sim's audit log, kubectl's own requests excluded), registry statements
//! per experiment (pg_stat_statements), operator CPU ms per experiment and peak RSS, whether all N
//! reached the registry as COMPLETED and how many pods are left; then the operator is restarted
//! over the N finished experiments (time to ready and to a first pass over every object). A last
//! phase holds 50 orders RUNNER_ONLINE and counts registry statements per running order per poll.
//! The per-experiment figures of the largest N are divided by those of the smallest.
//!
//! `EP_SCALE_N=100,300` chooses the sizes (empty: none), `EP_SCALE_STEADY` the running orders of the
//! last phase, `EP_SCALE_RECONCILES` the operator's reconciles setting.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use ep_testkit::e2e::NS;
use ep_testkit::stack::{FAST_SETTINGS, Stack, StackOptions};

/// One size's figures.
#[derive(Clone, Debug, Default)]
struct Run {
    n: usize,
    seconds: f64,
    kube_calls: f64,
    statements: f64,
    cpu_ms: f64,
    peak_rss_mib: f64,
    completed: i64,
    pods_left: usize,
    restart_ready_s: f64,
    restart_first_pass_s: f64,
}

fn world() -> String {
    runpod_sim::config::DEFAULT_WORLD
        .replace("balance: 500.0, spendLimit: 80.0", "balance: 1000000.0, spendLimit: 100000.0")
        .replace("cloudType: SECURE, count: 4}", "cloudType: SECURE, count: 5000}")
        .replace("cloudType: SECURE, count: 8}", "cloudType: SECURE, count: 5000}")
}

fn settings(reconciles: u16) -> String {
    FAST_SETTINGS
        .replace("maxConcurrentGpus: 4", "maxConcurrentGpus: 5000")
        .replace("maxUsdPerDay: 50", "maxUsdPerDay: 1000000")
        .replace("reconciles: 4", &format!("reconciles: {reconciles}"))
        // Hundreds of runners share two cores here; heartbeats are not what this measures.
        .replace("heartbeatTimeout: 6s", "heartbeatTimeout: 120s")
}

/// A tiny experiment: one epoch on 100 samples.
fn experiment(name: &str, epoch_sleep: f64, epochs: u32) -> String {
    format!(
        r#"apiVersion: ep.dev/v1alpha1
kind: Experiment
metadata: {{name: {name}, namespace: {NS}}}
spec:
  entry: {{command: [python3, train.py], args: [--epochs, "{epochs}", --samples, "100", --epoch-sleep, "{epoch_sleep}"]}}
  payload: {{configMap: {{name: quickstart-code}}}}
  image: runpod/pytorch:1.0.2-cu1281-torch280-ubuntu2404
  gpu: {{types: [rtx-pro-4500, l4], count: 1, cloudType: SECURE}}
  order: {{policy: smoke, workerId: runpod-1, providerRef: default, maxCostPerHour: 1.0}}
  limits: {{maxRuntime: 30m, maxCostUsd: 2}}
  retry: {{maxAttempts: 1}}
  checkpoints: {{retention: Discard, path: checkpoints/}}
  results: {{file: results.json, metrics: [f1, auc]}}
"#
    )
}

/// utime + stime of a process, in ms.
fn cpu_ms(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the parenthesised command name; utime and stime are the 14th and 15th.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f.get(11).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0)
        + f.get(12).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    ticks * 1000.0 / clock_ticks()
}

fn clock_ticks() -> f64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(100.0)
}

/// Peak resident set (VmHWM) in MiB.
fn peak_rss_mib(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

/// Requests in the audit log not sent by kubectl (the operator's).
fn operator_kube_calls(audit: &std::path::Path) -> usize {
    std::fs::read_to_string(audit)
        .unwrap_or_default()
        .lines()
        .filter(|l| {
            serde_json::from_str::<serde_json::Value>(l)
                .is_ok_and(|v| !v["userAgent"].as_str().unwrap_or("").starts_with("kubectl"))
        })
        .count()
}

async fn statements(pool: &sqlx::PgPool) -> Result<f64, sqlx::Error> {
    // Only the operator's statements: the bench's own go through this pool, whose queries mention
    // pg_stat_statements or count registry rows, and are left out.
    let n: Option<i64> = sqlx::query_scalar(
        "SELECT sum(calls)::bigint FROM pg_stat_statements s JOIN pg_database d ON d.oid = s.dbid \
         WHERE d.datname = 'ep' AND s.query NOT ILIKE '%pg_stat_statements%' AND s.query NOT ILIKE 'SELECT count(*) FROM exp_registry%'",
    )
    .fetch_one(pool)
    .await?;
    Ok(n.unwrap_or(0) as f64)
}

/// The operator's statements by kind (first words), most called first, per experiment.
async fn breakdown(pool: &sqlx::PgPool, per: f64) -> Result<String, sqlx::Error> {
    let rows: Vec<(String, i64)> = sqlx::query_as(
        "SELECT regexp_replace(left(s.query, 60), '\\s+', ' ', 'g'), sum(calls)::bigint FROM pg_stat_statements s \
         JOIN pg_database d ON d.oid = s.dbid WHERE d.datname = 'ep' AND s.query NOT ILIKE '%pg_stat_statements%' \
         AND s.query NOT ILIKE 'SELECT count(*) FROM exp_registry%' GROUP BY 1 ORDER BY 2 DESC LIMIT 12",
    )
    .fetch_all(pool)
    .await?;
    Ok(rows.iter().map(|(q, n)| format!("      {:>7.2}  {q}\n", *n as f64 / per)).collect())
}

async fn reset(pool: &sqlx::PgPool) -> Result<(), sqlx::Error> {
    sqlx::query("SELECT pg_stat_statements_reset()").execute(pool).await.map(|_| ())
}

fn phases(stack: &Stack) -> Vec<String> {
    stack
        .kubectl(&["get", "exp", "-n", NS, "-o", "custom-columns=P:.status.phase", "--no-headers"])
        .unwrap_or_default()
        .lines()
        .map(str::to_owned)
        .collect()
}

fn apply_all(stack: &Stack, names: &[String], epoch_sleep: f64, epochs: u32) -> Result<(), String> {
    for (i, chunk) in names.chunks(250).enumerate() {
        let yaml: Vec<String> = chunk.iter().map(|n| experiment(n, epoch_sleep, epochs)).collect();
        let file = stack.dir.path().join(format!("batch-{i}.yaml"));
        std::fs::write(&file, yaml.join("---\n")).map_err(|e| e.to_string())?;
        stack.kubectl(&["apply", "-f", &file.display().to_string()]).map_err(|e| e.to_string())?;
    }
    Ok(())
}

fn metric_sum(stack: &Stack, name: &str) -> f64 {
    let Some((_, body)) = stack.operator.as_ref().and_then(|o| o.get("/metrics")) else { return 0.0 };
    body.lines()
        .filter(|l| l.starts_with(name))
        .filter_map(|l| l.rsplit_once(' ').and_then(|(_, v)| v.parse::<f64>().ok()))
        .sum()
}

async fn one_size(n: usize, reconciles: u16) -> Result<Run, String> {
    let e = |e: ep_testkit::HarnessError| e.to_string();
    let stack = Stack::start(&StackOptions {
        world: Some(world()),
        settings: settings(reconciles),
        audit: true,
        ..StackOptions::default()
    })
    .await
    .map_err(e)?;
    stack.apply_quickstart(false).map_err(e)?;
    let pool = sqlx::PgPool::connect(&stack.database_url).await.map_err(|e| e.to_string())?;
    sqlx::query("CREATE EXTENSION IF NOT EXISTS pg_stat_statements").execute(&pool).await.map_err(|e| e.to_string())?;
    reset(&pool).await.map_err(|e| e.to_string())?;
    let pid = stack.operator.as_ref().map(ep_testkit::stack::OperatorProcess::pid).ok_or("no operator")?;
    let audit = stack.audit_log();
    let (calls0, cpu0) = (operator_kube_calls(&audit), cpu_ms(pid));

    let names: Vec<String> = (0..n).map(|i| format!("s{i:04}")).collect();
    let started = Instant::now();
    apply_all(&stack, &names, 0.0, 1)?;
    let deadline = Instant::now() + Duration::from_secs(1800);
    loop {
        let p = phases(&stack);
        let done = p.iter().filter(|p| *p == "Succeeded" || *p == "Failed").count();
        if done == n {
            break;
        }
        if Instant::now() > deadline {
            return Err(format!("N={n}: only {done} finished in 30 minutes"));
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let seconds = started.elapsed().as_secs_f64();
    let count_completed = || async {
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM exp_registry.experiments WHERE status = 'COMPLETED'")
            .fetch_one(&pool)
            .await
            .unwrap_or(0)
    };
    let mirror_deadline = Instant::now() + Duration::from_secs(120);
    let mut completed = count_completed().await;
    while completed < i64::try_from(n).unwrap_or(i64::MAX) && Instant::now() < mirror_deadline {
        tokio::time::sleep(Duration::from_millis(500)).await;
        completed = count_completed().await;
    }
    if std::env::var_os("EP_SCALE_BREAKDOWN").is_some() {
        print!(
            "    registry statements per experiment, by kind:\n{}",
            breakdown(&pool, n as f64).await.map_err(|e| e.to_string())?
        );
    }
    let mut run = Run {
        n,
        seconds,
        kube_calls: (operator_kube_calls(&audit) - calls0) as f64 / n as f64,
        statements: statements(&pool).await.map_err(|e| e.to_string())? / n as f64,
        cpu_ms: (cpu_ms(pid) - cpu0) / n as f64,
        peak_rss_mib: peak_rss_mib(pid),
        completed,
        pods_left: stack.live_pods().await.map_err(e)?.len(),
        ..Run::default()
    };

    // Restart over N finished experiments.
    let mut stack = stack;
    if let Some(op) = stack.operator.as_mut() {
        op.stop();
    }
    let t = Instant::now();
    stack.start_operator().map_err(e)?;
    run.restart_ready_s = t.elapsed().as_secs_f64();
    let deadline = Instant::now() + Duration::from_secs(120);
    while metric_sum(&stack, "ep_reconciles_total{kind=\"Experiment\"}") < n as f64
        || metric_sum(&stack, "ep_reconciles_total{kind=\"RunPodOrder\"}") < n as f64
    {
        if Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    run.restart_first_pass_s = t.elapsed().as_secs_f64();
    Ok(run)
}

/// Registry statements per running order per poll, with `m` orders online.
async fn steady(m: usize, reconciles: u16) -> Result<(f64, f64), String> {
    let e = |e: ep_testkit::HarnessError| e.to_string();
    let stack = Stack::start(&StackOptions {
        world: Some(world()),
        settings: settings(reconciles),
        audit: true,
        ..StackOptions::default()
    })
    .await
    .map_err(e)?;
    stack.apply_quickstart(false).map_err(e)?;
    let pool = sqlx::PgPool::connect(&stack.database_url).await.map_err(|e| e.to_string())?;
    sqlx::query("CREATE EXTENSION IF NOT EXISTS pg_stat_statements").execute(&pool).await.map_err(|e| e.to_string())?;
    let names: Vec<String> = (0..m).map(|i| format!("r{i:03}")).collect();
    // Long enough to stay online through the measurement.
    apply_all(&stack, &names, 1.0, 600)?;
    let deadline = Instant::now()
        + Duration::from_secs(std::env::var("EP_SCALE_ONLINE_WITHIN").ok().and_then(|v| v.parse().ok()).unwrap_or(600));
    loop {
        let online = stack
            .kubectl(&["get", "rpo", "-n", NS, "-o", "custom-columns=P:.status.phase", "--no-headers"])
            .unwrap_or_default()
            .lines()
            .filter(|p| *p == "RUNNER_ONLINE")
            .count();
        if online == m {
            break;
        }
        if Instant::now() > deadline {
            let why = stack
                .kubectl(&["get", "rpo", "-n", NS, "--no-headers", "-o", "custom-columns=N:.metadata.name,P:.status.phase,R:.status.conditions[?(@.type==\"Ready\")].message"])
                .unwrap_or_default();
            let why: Vec<&str> = why.lines().filter(|l| !l.contains("RUNNER_ONLINE")).take(5).collect();
            let stuck = stack.kubectl(&["get", "rpo", "-n", NS, "-o", "json"]).unwrap_or_default();
            let _ = std::fs::write(std::env::temp_dir().join("bench-scale-orders.json"), stuck);
            let kept = std::env::temp_dir().join("bench-scale-operator.log");
            let _ = std::fs::copy(stack.dir.path().join("operator-1.log"), &kept);
            eprintln!("bench-scale: the operator's log is kept in {}", kept.display());
            return Err(format!("only {online} of {m} online in time: {why:#?}\n{}", stack.operator_log(20)));
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let audit = stack.audit_log();
    tokio::time::sleep(Duration::from_secs(5)).await;
    reset(&pool).await.map_err(|e| e.to_string())?;
    let calls0 = operator_kube_calls(&audit);
    let window = 30.0;
    tokio::time::sleep(Duration::from_secs_f64(window)).await;
    let polls = window / 1.0; // pollInterval 1s
    let per_order_poll = statements(&pool).await.map_err(|e| e.to_string())? / (m as f64 * polls);
    let kube_per_order_poll = (operator_kube_calls(&audit) - calls0) as f64 / (m as f64 * polls);
    Ok((per_order_poll, kube_per_order_poll))
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> ExitCode {
    if rustls::crypto::aws_lc_rs::default_provider().install_default().is_err() {
        eprintln!("bench-scale: a rustls crypto provider was already installed");
    }
    let sizes: Vec<usize> = std::env::var("EP_SCALE_N")
        .unwrap_or_else(|_| "100,300,1000".into())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    let reconciles: u16 = std::env::var("EP_SCALE_RECONCILES").ok().and_then(|v| v.parse().ok()).unwrap_or(16);
    println!(
        "bench-scale: tiny experiments (1 epoch, 100 samples), plenty of stock, poll 1 s, reconciles {reconciles}"
    );
    println!(
        "{:>6} {:>8} {:>8} {:>10} {:>10} {:>9} {:>9} {:>10} {:>6} {:>10} {:>10}",
        "N",
        "seconds",
        "exp/s",
        "kube/exp",
        "stmts/exp",
        "cpu ms",
        "RSS MiB",
        "COMPLETED",
        "pods",
        "restart",
        "1st pass"
    );
    let mut runs = Vec::new();
    for n in sizes {
        match one_size(n, reconciles).await {
            Ok(r) => {
                println!(
                    "{:>6} {:>8.1} {:>8.2} {:>10.1} {:>10.1} {:>9.1} {:>9.1} {:>10} {:>6} {:>9.2}s {:>9.2}s",
                    r.n,
                    r.seconds,
                    r.n as f64 / r.seconds,
                    r.kube_calls,
                    r.statements,
                    r.cpu_ms,
                    r.peak_rss_mib,
                    r.completed,
                    r.pods_left,
                    r.restart_ready_s,
                    r.restart_first_pass_s
                );
                runs.push(r);
            }
            Err(e) => {
                eprintln!("bench-scale: {e}");
                return ExitCode::FAILURE;
            }
        }
    }
    if let (Some(small), Some(large)) = (runs.first(), runs.last())
        && large.n > small.n
    {
        println!(
            "ratios N={} / N={} per experiment: kube calls {:.2}x, statements {:.2}x, cpu {:.2}x; exp/s {:.2}x",
            large.n,
            small.n,
            large.kube_calls / small.kube_calls,
            large.statements / small.statements,
            large.cpu_ms / small.cpu_ms,
            (large.n as f64 / large.seconds) / (small.n as f64 / small.seconds)
        );
    }
    let m: usize = std::env::var("EP_SCALE_STEADY").ok().and_then(|v| v.parse().ok()).unwrap_or(50);
    match steady(m, reconciles).await {
        Ok((stmts, kube)) => {
            println!(
                "steady: {m} orders online, 30 s at poll 1 s: {stmts:.2} registry statements and {kube:.2} Kubernetes calls per running order per poll"
            );
        }
        Err(e) => {
            eprintln!("bench-scale: steady: {e}");
            return ExitCode::FAILURE;
        }
    }
    ExitCode::SUCCESS
}
