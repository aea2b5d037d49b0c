//! The fault matrix: RunPod and S3 faults injected into runpod-sim, and PostgreSQL stopped under an
//! operator that is killed and restarted. Each case must end as a run without the fault ends, show
//! its reason in the status people read (every status version is watched with `kubectl get -w`),
//! leave nothing billing, and leave a registry that converges to the cluster. The table goes into
//! docs/reliability.md.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use ep_testkit::e2e::{Exp, NS, Watch, exp, quickstart_stack};
use ep_testkit::registry::{rows, shape, wait_registry};
use ep_testkit::stack::{Stack, StackOptions};
use serde_json::{Value, json};

const VOLUME: &str = "tgb8bx6fwl";
const REASON_WITHIN: Duration = Duration::from_secs(60);

/// One row of the matrix.
struct Case {
    fault: &'static str,
    /// The reasons that say what happened (any one of them, in the object named).
    expected: Vec<&'static str>,
    /// The reason seen in status, with its message.
    shown: Option<(String, String)>,
    /// The experiment's phase at the end, and the number of attempts it took.
    ended: String,
    attempts: u64,
    /// Pods created per order of the experiment.
    creates: Vec<u32>,
    leaked: usize,
    /// The registry's rows agree with the cluster's objects.
    converged: bool,
    /// The registry's rows equal those of a run without the fault (None: the fault changes the
    /// run's history, a second attempt say).
    equal: Option<bool>,
    note: String,
}

struct Matrix<'a> {
    stack: &'a mut Stack,
    orders: Watch,
    experiments: Watch,
    baseline: Vec<Vec<String>>,
    started: Instant,
}

impl Matrix<'_> {
    fn apply(&self, e: &Exp) {
        self.stack.apply(&e.yaml()).unwrap();
    }

    async fn faults(&self, body: Value) {
        self.stack.faults(body).await.unwrap();
    }

    /// Waits for one of `want` in the status of the order (`-aN`) or the experiment.
    fn reason(&self, name: &str, want: &[&str]) -> Option<(String, String)> {
        let watch = if name.contains("-a") { &self.orders } else { &self.experiments };
        watch.wait_reason(name, want, REASON_WITHIN).map_err(|e| eprintln!("{e}")).ok()
    }

    /// Follows the experiment to its end and fills in the rest of the row.
    async fn finish(
        &mut self,
        fault: &'static str,
        name: &str,
        expected: &[&'static str],
        shown: Option<(String, String)>,
        one_attempt: bool,
    ) -> Case {
        let e = self.stack.wait_phase("exp", name, &["Succeeded", "Failed"]).unwrap();
        let ended = e["status"]["phase"].as_str().unwrap_or_default().to_owned();
        let attempts = e["status"]["attempts"].as_u64().unwrap_or(0);
        let mut creates = Vec::new();
        for n in 1..=attempts {
            let order = self.stack.get("rpo", Some(NS), &format!("{name}-a{n}")).unwrap();
            let pod = order.as_ref().and_then(|o| o["status"]["podName"].as_str()).unwrap_or_default().to_owned();
            creates.push(creates_of(self.stack, &pod).await);
        }
        let want = if ended == "Succeeded" { "COMPLETED" } else { "FAILED" };
        wait_registry(&self.stack.database_url, name, want).await;
        let converged = converges(self.stack, name).await;
        let equal = if one_attempt { Some(equals(&self.stack.database_url, name, &self.baseline).await) } else { None };
        let leaked = self.stack.live_pods().await.unwrap().len();
        let case = Case {
            fault,
            expected: expected.to_vec(),
            shown,
            ended,
            attempts,
            creates,
            leaked,
            converged,
            equal,
            note: String::new(),
        };
        eprintln!(
            "[{:>5.1}s] {fault}: shown {:?}, {} after {} attempt(s), creates {:?}, leaked {}, converged {}, equal {:?}",
            self.started.elapsed().as_secs_f64(),
            case.shown,
            case.ended,
            case.attempts,
            case.creates,
            case.leaked,
            case.converged,
            case.equal
        );
        case
    }
}

/// Pods runpod-sim created with this name, ever.
async fn creates_of(stack: &Stack, pod_name: &str) -> u32 {
    let world = stack.world().await.unwrap();
    world["createdByName"][pod_name].as_u64().map_or(0, |n| u32::try_from(n).unwrap_or(u32::MAX))
}

/// Within 15 s the registry's experiment, attempt and order rows agree with the cluster: the
/// experiment's status, one attempt and one order row per order, each order in its phase.
async fn converges(stack: &Stack, name: &str) -> bool {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let e = stack.get("exp", Some(NS), name).unwrap().unwrap();
        let mut cluster = vec![format!("status={}", e["status"]["registryStatus"])];
        let attempts = e["status"]["attempts"].as_u64().unwrap_or(0);
        for n in 1..=attempts {
            let o = stack.get("rpo", Some(NS), &format!("{name}-a{n}")).unwrap().unwrap();
            cluster.push(format!("name=\"{name}-a{n}\"|phase={}", o["status"]["phase"]));
        }
        cluster.push(format!("attempts={attempts}"));
        let url = &stack.database_url;
        let mut registry: Vec<String> =
            rows(url, &format!("SELECT status FROM exp_registry.experiments WHERE name = '{name}'"))
                .await
                .into_iter()
                .flatten()
                .collect();
        let orders = format!("SELECT name, phase FROM exp_registry.orders WHERE name LIKE '{name}-a%' ORDER BY name");
        registry.extend(rows(url, &orders).await.into_iter().map(|r| r.join("|")));
        let count = format!(
            "SELECT count(*) AS attempts FROM exp_registry.attempts a JOIN exp_registry.experiments e ON e.id = a.experiment_id WHERE e.name = '{name}'"
        );
        registry.extend(rows(url, &count).await.into_iter().flatten());
        if registry == cluster {
            return true;
        }
        if Instant::now() > deadline {
            eprintln!("{name}: registry {registry:?} != cluster {cluster:?}");
            return false;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// Within 15 s the registry rows of `name` equal those of the run without a fault.
async fn equals(url: &str, name: &str, baseline: &[Vec<String>]) -> bool {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let got = shape(url, name).await;
        if got == baseline {
            return true;
        }
        if Instant::now() > deadline {
            eprintln!("{name}: registry differs from a run without the fault:\n{got:#?}\nwant:\n{baseline:#?}");
            return false;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// A copy of the quickstart's code ConfigMap with one more file, so the payload is new to the
/// volume and its sync really uploads.
fn fresh_payload(stack: &Stack, name: &str) -> String {
    let mut cm = stack.get("configmap", Some(NS), "quickstart-code").unwrap().unwrap();
    let cm_name = format!("{name}-code");
    cm["metadata"] = json!({"name": cm_name, "namespace": NS});
    cm["data"]["fault.txt"] = json!(name);
    stack.apply(&cm.to_string()).unwrap();
    cm_name
}

fn with_payload(e: &Exp, cm: &str) -> String {
    e.yaml().replace("name: quickstart-code", &format!("name: {cm}"))
}

/// Writes the fault matrix into docs/reliability.md between its markers.
fn write_matrix(cases: &[Case]) {
    let mut table = String::from(
        "| Fault | Reason shown in status | Ended | Attempts | Pods created per attempt | Leaked pods | Registry converged | Rows equal to a run without it |\n\
         |---|---|---|---|---|---|---|---|\n",
    );
    for c in cases {
        let shown = c.shown.as_ref().map_or_else(|| "**none**".to_owned(), |(r, _)| format!("`{r}`"));
        let creates = c.creates.iter().map(u32::to_string).collect::<Vec<_>>().join(", ");
        let equal = c.equal.map_or("n/a (the fault changes the run)", |e| if e { "yes" } else { "**no**" });
        table.push_str(&format!(
            "| {}{} | {shown} | {} | {} | {creates} | {} | {} | {equal} |\n",
            c.fault,
            if c.note.is_empty() { String::new() } else { format!(" ({})", c.note) },
            c.ended,
            c.attempts,
            c.leaked,
            if c.converged { "yes" } else { "**no**" },
        ));
    }
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/reliability.md");
    let doc = std::fs::read_to_string(&path).unwrap();
    let (begin, end) = ("<!-- fault-matrix:begin -->\n", "<!-- fault-matrix:end -->");
    let (i, j) = (doc.find(begin).unwrap() + begin.len(), doc.find(end).unwrap());
    std::fs::write(&path, format!("{}{table}{}", &doc[..i], &doc[j..])).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_fault_ends_correctly_shows_its_reason_and_the_registry_converges() {
    // A 1 GB volume, so that a sparse file can fill it.
    let world = runpod_sim::config::DEFAULT_WORLD.replace("sizeGb: 50", "sizeGb: 1");
    let mut stack = quickstart_stack(&StackOptions { world: Some(world), ..StackOptions::default() }).await.unwrap();
    let (orders, experiments) = (stack.watch("rpo").unwrap(), stack.watch("exp").unwrap());
    stack.apply(&exp("steady").epochs(3, 2.0).yaml()).unwrap();
    stack.wait_phase("exp", "steady", &["Succeeded"]).unwrap();
    wait_registry(&stack.database_url, "steady", "COMPLETED").await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let baseline = shape(&stack.database_url, "steady").await;
    let mut m = Matrix { stack: &mut stack, orders, experiments, baseline, started: Instant::now() };
    let mut cases = Vec::new();

    // RunPod's API answers 502 to everything while the run is online.
    let e = exp("f-5xx").epochs(3, 2.0);
    m.apply(&e);
    m.stack.wait_phase("rpo", "f-5xx-a1", &["RUNNER_ONLINE"]).unwrap();
    m.faults(json!({"http5xxRate": 1.0})).await;
    let want = ["RunPodUnavailable"];
    let shown = m.reason("f-5xx-a1", &want);
    m.faults(json!({"http5xxRate": 0.0})).await;
    cases.push(m.finish("RunPod API 5xx (every call, mid-run)", "f-5xx", &want, shown, true).await);

    // RunPod rate limits every call while the run is online.
    let e = exp("f-429").epochs(3, 2.0);
    m.apply(&e);
    m.stack.wait_phase("rpo", "f-429-a1", &["RUNNER_ONLINE"]).unwrap();
    m.faults(json!({"rateLimited": 100_000, "retryAfterSeconds": 1})).await;
    let want = ["RunPodRateLimited"];
    let shown = m.reason("f-429-a1", &want);
    m.faults(json!({"rateLimited": 0})).await;
    cases.push(m.finish("RunPod API 429 with Retry-After (mid-run)", "f-429", &want, shown, true).await);

    // The create reaches RunPod but its answer is lost.
    m.faults(json!({"createLostAnswers": 1})).await;
    m.apply(&exp("f-lost").epochs(3, 2.0));
    let want = ["CreateOutcomeUnknown"];
    let shown = m.reason("f-lost-a1", &want);
    cases.push(m.finish("lost create answer", "f-lost", &want, shown, true).await);

    // Two creates hang for 60 s while another run is online and finishes: it is drained at once.
    m.apply(&exp("f-bystander").epochs(3, 2.0));
    m.stack.wait_phase("rpo", "f-bystander-a1", &["RUNNER_ONLINE"]).unwrap();
    m.faults(json!({"createTimeouts": 2, "createTimeoutSeconds": 60})).await;
    let hung_at = Instant::now();
    m.apply(&exp("f-hung1").epochs(3, 2.0));
    m.apply(&exp("f-hung2").epochs(3, 2.0));
    m.stack.wait_phase("exp", "f-bystander", &["Succeeded"]).unwrap();
    let bystander = hung_at.elapsed();
    let want = ["CreateOutcomeUnknown"];
    let shown = m.reason("f-hung1-a1", &want);
    let shown2 = m.reason("f-hung2-a1", &want);
    let mut c = m.finish("hung creates (2, 60 s each)", "f-hung1", &want, shown, true).await;
    let c2 = m.finish("hung creates", "f-hung2", &want, shown2.clone(), true).await;
    c.note = format!("another run drained {:.0} s after they began", bystander.as_secs_f64());
    c.creates.extend(c2.creates.iter());
    c.converged &= c2.converged;
    c.equal = c.equal.zip(c2.equal).map(|(a, b)| a && b);
    // Pods left billing are counted once both runs ended (the first ends while the second still runs).
    c.leaked = c2.leaked;
    let both = shown2.is_some() && c2.ended == "Succeeded";
    if !both {
        c.shown = None;
    }
    assert!(bystander < Duration::from_secs(45), "a hung create delayed another run's drain: {bystander:?}");
    cases.push(c);

    // RunPod has no machine for either GPU choice until the fault is lifted.
    m.faults(json!({"capacityFailures": 100_000})).await;
    m.apply(&exp("f-capacity").epochs(3, 2.0));
    let want = ["NoCapacity"];
    let shown = m.reason("f-capacity-a1", &want);
    m.faults(json!({"capacityFailures": 0})).await;
    // NoCapacity looks again after 30 s; a change to the order wakes it at once.
    m.stack.kubectl(&["annotate", "rpo", "f-capacity-a1", "-n", NS, "test/wake=1", "--overwrite"]).unwrap();
    // The GPU it lands on depends on when the fault was lifted (the first choice or the second).
    cases.push(m.finish("no capacity for any GPU choice", "f-capacity", &want, shown, false).await);

    // The pod vanishes on RunPod's side mid-run; the second attempt completes.
    m.apply(&exp("f-vanish").epochs(4, 2.0).attempts(2, Some("1s")));
    let order = m.stack.wait_phase("rpo", "f-vanish-a1", &["RUNNER_ONLINE"]).unwrap();
    let pod = order["status"]["podId"].as_str().unwrap().to_owned();
    m.stack.admin_post(&format!("pods/{pod}/vanish"), json!({})).await.unwrap();
    let want = ["PodVanished"];
    let shown = m.reason("f-vanish-a1", &want);
    cases.push(m.finish("pod vanished mid-run", "f-vanish", &want, shown, false).await);

    // The volume's S3 API answers 502 to every upload.
    let cm = fresh_payload(m.stack, "f-s3-502");
    m.faults(json!({"s3Put502": 100_000})).await;
    m.stack.apply(&with_payload(&exp("f-s3-502").epochs(3, 2.0), &cm)).unwrap();
    let want = ["S3Unavailable"];
    let shown = m.reason("f-s3-502-a1", &want);
    m.faults(json!({"s3Put502": 0})).await;
    cases.push(m.finish("S3 502 on every upload", "f-s3-502", &want, shown, true).await);

    // The volume is full (HTTP 507) until a file is removed from it.
    let filler = m.stack.volume_dir(VOLUME).join("filler.bin");
    std::fs::File::create(&filler).unwrap().set_len(1_000_000_000).unwrap();
    let cm = fresh_payload(m.stack, "f-s3-507");
    m.stack.apply(&with_payload(&exp("f-s3-507").epochs(3, 2.0), &cm)).unwrap();
    let want = ["VolumeFull"];
    // RunPod's first listing of a file written outside S3 computes its MD5 and may outlast the
    // operator's 10 s for the figures; the next pass has them.
    let shown = m
        .orders
        .wait_reason_where("f-s3-507-a1", &want, REASON_WITHIN, |m| m.contains("GB free"))
        .map_err(|e| eprintln!("{e}"))
        .ok();
    std::fs::remove_file(&filler).unwrap();
    let mut c = m.finish("S3 507, volume full", "f-s3-507", &want, shown, true).await;
    let figures = c.shown.as_ref().map(|(_, m)| m.clone()).unwrap_or_default();
    c.note = "the message gives used and free GB".into();
    cases.push(c);

    // PostgreSQL stops mid-run; the operator is killed and restarted while it is down.
    m.apply(&exp("f-pg").epochs(3, 2.0));
    m.stack.wait_phase("rpo", "f-pg-a1", &["RUNNER_ONLINE"]).unwrap();
    m.stack.pg.stop().unwrap();
    let want = ["RegistryUnavailable"];
    let shown = m.reason("f-pg", &want);
    m.stack.operator.take().unwrap().kill();
    m.stack.start_operator().unwrap();
    m.stack.wait_phase("exp", "f-pg", &["Succeeded", "Failed"]).unwrap();
    m.stack.pg.restart().unwrap();
    cases.push(m.finish("PostgreSQL down, operator restarted meanwhile", "f-pg", &want, shown, true).await);

    write_matrix(&cases);
    assert!(figures.contains("of 1 GB used") && figures.contains("GB free"), "VolumeFull figures: {figures}");
    let log = m.stack.operator_log(60);
    for c in &cases {
        let seen: BTreeSet<&str> = c.expected.iter().copied().collect();
        assert!(c.shown.is_some(), "{}: none of {seen:?} was shown in status\n{log}", c.fault);
        assert_eq!(c.ended, "Succeeded", "{}: the run did not succeed\n{log}", c.fault);
        assert!(c.creates.iter().all(|n| *n == 1), "{}: pods created per attempt {:?}", c.fault, c.creates);
        assert_eq!(c.leaked, 0, "{}: a pod was left billing", c.fault);
        assert!(c.converged, "{}: the registry does not match the cluster", c.fault);
        assert_ne!(c.equal, Some(false), "{}: the registry differs from a run without the fault", c.fault);
    }
}
