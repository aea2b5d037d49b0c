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
    others: Others,
}

/// CPU of the other processes on the machine, in ms (per experiment once divided).
#[derive(Clone, Copy, Debug, Default)]
struct Others {
    kube_sim: f64,
    runpod_sim: f64,
    /// The pods: runners and training processes, runpod-sim's reaped children.
    pods: f64,
}

impl Others {
    fn now(stack: &Stack) -> Self {
        Self {
            kube_sim: cpu_ms(stack.kube.pid()),
            runpod_sim: cpu_ms(stack.runpod.pid()),
            pods: children_cpu_ms(stack.runpod.pid()),
        }
    }

    fn minus(&self, before: &Self, n: f64) -> Self {
        Self {
            kube_sim: (self.kube_sim - before.kube_sim) / n,
            runpod_sim: (self.runpod_sim - before.runpod_sim) / n,
            pods: (self.pods - before.pods) / n,
        }
    }
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

/// cutime + cstime: the CPU of a process's children it has waited for, in ms.
fn children_cpu_ms(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f.get(13).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0)
        + f.get(14).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    ticks * 1000.0 / clock_ticks()
}

/// CPU ms of one `python3 train.py` of a tiny experiment on its own (mean of 10 runs): the least a
/// pod costs, whatever the control plane does.
fn python_alone_ms() -> f64 {
    let dir = tempfile::tempdir().ok();
    let Some(dir) = dir else { return 0.0 };
    let script = ep_testkit::workspace_root().join("examples/quickstart/train.py");
    let me = std::process::id();
    let before = children_cpu_ms(me);
    let runs = 10;
    for _ in 0..runs {
        let _ = std::process::Command::new("python3")
            .arg(&script)
            .args(["--epochs", "1", "--samples", "100", "--epoch-sleep", "0"])
            .current_dir(dir.path())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status();
    }
    (children_cpu_ms(me) - before) / f64::from(runs)
}

/// Waits until every experiment is Succeeded or Failed and returns the seconds from `started`
/// to the last one's terminal transition (its `status.transitions` time, to the microsecond),
/// so how often this loop looks does not change the figure. It watches the registry (one cheap
/// count) and asks the cluster only once the registry says all are done: polling with kubectl
/// would spend the cores being measured.
async fn wait_finished(
    stack: &Stack,
    pool: &sqlx::PgPool,
    n: usize,
    started: chrono::DateTime<chrono::Utc>,
) -> Result<f64, String> {
    let deadline = Instant::now() + Duration::from_secs(1800);
    let mut last_cluster_look = Instant::now();
    loop {
        let registry_done: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM exp_registry.experiments WHERE status IN ('COMPLETED', 'FAILED', 'FAILED_STATUS_DIVERGENCE')",
        )
        .fetch_one(pool)
        .await
        .unwrap_or(0);
        // The registry trails the cluster; look at the cluster when it says all are done, and
        // every 20 s in case the mirror is behind.
        if registry_done >= i64::try_from(n).unwrap_or(i64::MAX)
            || last_cluster_look.elapsed() > Duration::from_secs(20)
        {
            last_cluster_look = Instant::now();
            let json = stack.kubectl(&["get", "exp", "-n", NS, "-o", "json"]).map_err(|e| e.to_string())?;
            let list: serde_json::Value = serde_json::from_str(&json).map_err(|e| e.to_string())?;
            let items = list["items"].as_array().cloned().unwrap_or_default();
            let terminal = |p: &serde_json::Value| p == "Succeeded" || p == "Failed";
            let done: Vec<&serde_json::Value> = items.iter().filter(|i| terminal(&i["status"]["phase"])).collect();
            if done.len() == n {
                let last = done
                    .iter()
                    .filter_map(|i| {
                        i["status"]["transitions"].as_array()?.iter().rev().find(|t| terminal(&t["phase"]))?["at"]
                            .as_str()
                            .and_then(|at| chrono::DateTime::parse_from_rfc3339(at).ok())
                    })
                    .max()
                    .ok_or("no terminal transition time")?;
                return Ok((last.with_timezone(&chrono::Utc) - started).as_seconds_f64());
            }
            if Instant::now() > deadline {
                return Err(format!("N={n}: only {} finished in 30 minutes", done.len()));
            }
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
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

    let others0 = Others::now(&stack);

    let names: Vec<String> = (0..n).map(|i| format!("s{i:04}")).collect();
    let started = chrono::Utc::now();
    apply_all(&stack, &names, 0.0, 1)?;
    let seconds = wait_finished(&stack, &pool, n, started).await?;
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
        others: Others::now(&stack).minus(&others0, n as f64),
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
    let cores = std::thread::available_parallelism().map_or(1.0, |c| c.get() as f64);
    let python = python_alone_ms();
    println!(
        "one tiny experiment's `python3 train.py` alone: {python:.1} CPU ms, at most {:.1} exp/s on {cores} cores",
        cores * 1000.0 / python
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
                let o = r.others;
                let all = r.cpu_ms + o.kube_sim + o.runpod_sim + o.pods;
                println!(
                    "        CPU ms per experiment: operator {:.1}, kube-sim {:.1}, runpod-sim {:.1}, pods {:.1}; all {:.1}: at most {:.1} exp/s on {cores} cores",
                    r.cpu_ms,
                    o.kube_sim,
                    o.runpod_sim,
                    o.pods,
                    all,
                    cores * 1000.0 / all
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
