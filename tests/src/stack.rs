//! The whole system as a user meets it: a throwaway PostgreSQL, runpod-sim, kube-sim and the
//! `ep-operator` binary, driven with kubectl. Used by `make sandbox` and the end-to-end tests.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::authority;
use crate::postgres::TempPostgres;
use crate::sim::{KubeSimProcess, RunPodSimProcess, workspace_bin};
use crate::{HarnessError, free_port, tools, workspace_root};

/// Operator settings for tests and the sandbox: fast polls so a run takes seconds.
pub const FAST_SETTINGS: &str = "\
pollInterval: 1s
heartbeatInterval: 1s
heartbeatTimeout: 6s
runtimeStartDeadline: 2m
concurrency: {reconciles: 4, syncs: 2}
gpuAliases:
  rtx-pro-4500: NVIDIA RTX PRO 4500 Blackwell
  l4: NVIDIA L4
  a100-80g: NVIDIA A100 80GB PCIe
policies:
  smoke: {aliases: [smoke_test], cloudType: SECURE, containerDiskGb: 20, requiresApproval: false, maxLifetime: 1h, maxCostPerHour: 1.0}
  paper-train: {aliases: [paper_train], cloudType: SECURE, containerDiskGb: 50, requiresApproval: true, maxLifetime: 12h}
budgets:
  default: {maxUsdPerDay: 50, maxConcurrentGpus: 4}
orphans: {action: Report}
";

/// What to start.
#[derive(Clone, Debug)]
pub struct StackOptions {
    /// runpod-sim clock speed (billing and pod timings).
    pub clock_speed: f64,
    /// Operator settings YAML.
    pub settings: String,
    /// runpod-sim world YAML (None: the default world).
    pub world: Option<String>,
    /// The operator's `--lease-duration`: short, so a restarted operator leads again within
    /// seconds of a crash (leader election is on, as in production).
    pub lease_duration: String,
    /// The quickstart provider's `spec.api.transport`: restV2 (the default) or graphql.
    pub transport: &'static str,
    /// kube-sim writes every request to [`Stack::audit_log`].
    pub audit: bool,
    /// SQL run on the database before the operator first starts (a registry that predates it).
    pub registry_seed: Option<String>,
}

impl Default for StackOptions {
    fn default() -> Self {
        Self {
            clock_speed: 60.0,
            settings: FAST_SETTINGS.to_owned(),
            world: None,
            lease_duration: "5s".into(),
            transport: "restV2",
            audit: false,
            registry_seed: None,
        }
    }
}

/// Runs `sql` (several statements) on the database at `url`.
pub async fn seed_database(url: &str, sql: &str) -> Result<(), HarnessError> {
    let failed = |e: sqlx::Error| HarnessError::Setup(format!("seeding the registry: {e}"));
    let pool = sqlx::PgPool::connect(url).await.map_err(failed)?;
    sqlx::raw_sql(sqlx::AssertSqlSafe(sql.to_owned())).execute(&pool).await.map_err(failed)?;
    pool.close().await;
    Ok(())
}

/// The running operator process.
pub struct OperatorProcess {
    child: Child,
    pub metrics_url: String,
    pub log: PathBuf,
    port: u16,
}

impl OperatorProcess {
    /// GET on the operator's health and metrics server: status code and body.
    pub fn get(&self, path: &str) -> Option<(u16, String)> {
        http_get(self.port, path)
    }

    /// The process id (for /proc figures).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The value of one metric line (`name{labels}` exactly as exported), if present.
    pub fn metric(&self, series: &str) -> Option<f64> {
        let (_, body) = self.get("/metrics")?;
        body.lines()
            .find_map(|l| l.strip_prefix(series).and_then(|v| v.strip_prefix(' ')).and_then(|v| v.trim().parse().ok()))
    }

    /// Whether the process is still running.
    pub fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// SIGKILL: no shutdown path runs (a crash).
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM and wait for a graceful exit.
    pub fn stop(&mut self) {
        crate::sim::terminate(&mut self.child, Duration::from_secs(10));
    }
}

impl Drop for OperatorProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Everything, running.
pub struct Stack {
    pub pg: TempPostgres,
    pub database_url: String,
    pub runpod: RunPodSimProcess,
    pub kube: KubeSimProcess,
    pub operator: Option<OperatorProcess>,
    pub dir: tempfile::TempDir,
    operator_starts: u32,
    lease_duration: String,
    transport: &'static str,
}

impl Stack {
    /// Starts PostgreSQL, both simulators and the operator.
    pub async fn start(opts: &StackOptions) -> Result<Self, HarnessError> {
        let pg = TempPostgres::start()?;
        let database_url = pg.create_database("ep").await?;
        if let Some(seed) = &opts.registry_seed {
            seed_database(&database_url, seed).await?;
        }
        let speed = opts.clock_speed.to_string();
        let runpod = RunPodSimProcess::start(opts.world.as_deref(), &["--clock-speed", &speed])?;
        let dir = tempfile::Builder::new().prefix("ep-stack-").tempdir().map_err(HarnessError::io("temp dir"))?;
        let audit = opts.audit.then(|| dir.path().join("audit.jsonl"));
        let kube =
            KubeSimProcess::start_with(Some(&workspace_root().join("crds")), audit.as_deref(), Some(authority::USERS))?;
        authority::install(&kube.kubeconfig(), dir.path())?;
        authority::kubeconfig_as(&kube.kubeconfig(), authority::OPERATOR_USER, dir.path())?;
        std::fs::write(dir.path().join("settings.yaml"), &opts.settings).map_err(HarnessError::io("write settings"))?;
        let lease_duration = opts.lease_duration.clone();
        let mut stack = Self {
            pg,
            database_url,
            runpod,
            kube,
            operator: None,
            dir,
            operator_starts: 0,
            lease_duration,
            transport: opts.transport,
        };
        stack.start_operator()?;
        Ok(stack)
    }

    /// kube-sim's audit log (written when [`StackOptions::audit`] is set).
    pub fn audit_log(&self) -> PathBuf {
        self.dir.path().join("audit.jsonl")
    }

    pub fn settings_path(&self) -> PathBuf {
        self.dir.path().join("settings.yaml")
    }

    /// The administrator's kubeconfig (kube-sim's, with a context per person).
    pub fn kubeconfig(&self) -> PathBuf {
        self.kube.kubeconfig()
    }

    /// The operator's kubeconfig: the chart's ServiceAccount, held to the chart's RBAC.
    pub fn operator_kubeconfig(&self) -> PathBuf {
        self.dir.path().join(format!("kubeconfig-{}", authority::OPERATOR_USER.replace(':', "-")))
    }

    /// Runs kubectl as one of [`authority::USERS`] (`wren`, `aster`, `lark`, `finch`).
    pub fn kubectl_as(&self, user: &str, args: &[&str]) -> Result<String, HarnessError> {
        self.kubectl(&[args, &["--context", user]].concat())
    }

    /// Runs `kubectl ep` as one of [`authority::USERS`].
    pub fn kubectl_ep_as(&self, user: &str, args: &[&str]) -> Result<String, HarnessError> {
        run_plugin(&authority::kubeconfig_as(&self.kubeconfig(), user, self.dir.path())?, args)
    }

    /// Starts (or restarts) the operator binary and waits until /readyz answers.
    pub fn start_operator(&mut self) -> Result<&OperatorProcess, HarnessError> {
        self.start_operator_env(&[])
    }

    /// Starts the operator with extra environment (e.g. `EP_CRASH_AT`) and waits until /readyz answers.
    pub fn start_operator_env(&mut self, env: &[(&str, &str)]) -> Result<&OperatorProcess, HarnessError> {
        let mut op = self.spawn_operator_env(&[], env)?;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(Some(status)) = op.child.try_wait() {
                return Err(HarnessError::Setup(format!("ep-operator exited with {status}:\n{}", tail(&op.log, 40))));
            }
            if op.get("/readyz").is_some_and(|(code, _)| code == 200) {
                break;
            }
            if Instant::now() > deadline {
                op.kill();
                return Err(HarnessError::Setup(format!("ep-operator never became ready:\n{}", tail(&op.log, 40))));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        self.operator = Some(op);
        self.operator.as_ref().ok_or_else(|| HarnessError::Setup("no operator".into()))
    }

    /// Spawns one more operator process with `extra` arguments, without waiting for it.
    pub fn spawn_operator(&mut self, extra: &[&str]) -> Result<OperatorProcess, HarnessError> {
        self.spawn_operator_env(extra, &[])
    }

    /// Spawns one more operator process with `extra` arguments and environment, without waiting.
    pub fn spawn_operator_env(
        &mut self,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Result<OperatorProcess, HarnessError> {
        self.operator_starts += 1;
        let port = free_port().map_err(HarnessError::io("free port"))?;
        let log = self.dir.path().join(format!("operator-{}.log", self.operator_starts));
        let out = std::fs::File::create(&log).map_err(HarnessError::io("operator log"))?;
        let err = out.try_clone().map_err(HarnessError::io("operator log"))?;
        let child = Command::new(workspace_bin("ep-operator")?)
            .arg("run")
            .arg("--kubeconfig")
            .arg(self.operator_kubeconfig())
            .arg("--settings")
            .arg(self.settings_path())
            .arg("--database-url")
            .arg(&self.database_url)
            .arg("--listen")
            .arg(format!("127.0.0.1:{port}"))
            .arg("--runner-binary")
            .arg(workspace_bin("ep-runner")?)
            .arg("--lease-duration")
            .arg(&self.lease_duration)
            .args(extra)
            .envs(env.iter().copied())
            .env("RUST_LOG", std::env::var("RUST_LOG").unwrap_or_else(|_| "info,kube=warn".into()))
            .env("NO_COLOR", "1")
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err))
            .spawn()
            .map_err(HarnessError::io("start ep-operator"))?;
        Ok(OperatorProcess { child, metrics_url: format!("http://127.0.0.1:{port}"), log, port })
    }

    /// The operator's log so far (every start), for failure messages.
    pub fn operator_log(&self, lines: usize) -> String {
        (1..=self.operator_starts)
            .map(|n| tail(&self.dir.path().join(format!("operator-{n}.log")), lines))
            .collect::<Vec<_>>()
            .join("\n---- restart ----\n")
    }

    /// Runs kubectl against kube-sim.
    pub fn kubectl(&self, args: &[&str]) -> Result<String, HarnessError> {
        kubectl(&self.kubeconfig(), args)
    }

    /// Runs kubectl with this workspace's `kubectl-ep` on PATH, so `kubectl ep ...` works as a plugin.
    pub fn kubectl_ep(&self, args: &[&str]) -> Result<String, HarnessError> {
        run_plugin(&self.kubeconfig(), args)
    }

    /// Copies `dir`'s YAML files with the provider and its Secrets pointed at runpod-sim (the only
    /// edit a user makes: their endpoints and keys) and returns the staged directory.
    pub fn stage(&self, dir: &Path) -> Result<PathBuf, HarnessError> {
        let staged =
            self.dir.path().join(format!("staged-{}", dir.file_name().and_then(|n| n.to_str()).unwrap_or("x")));
        self.runpod.stage(dir, &staged)?;
        Ok(staged)
    }

    /// Installs `examples/quickstart/` pointed at runpod-sim as a person would from a terminal:
    /// the namespaces, then the two Secrets with `kubectl create secret generic --from-literal`
    /// (keys never written to a file), then the rest with `kubectl apply`; without the Experiment
    /// when `with_experiment` is false. Returns what kubectl printed.
    pub fn apply_quickstart(&self, with_experiment: bool) -> Result<String, HarnessError> {
        let staged = self.stage(&workspace_root().join("examples/quickstart"))?;
        let provider = staged.join("20-provider.yaml");
        let text = std::fs::read_to_string(&provider).map_err(HarnessError::io("read provider"))?;
        let text = text.replace("transport: restV2", &format!("transport: {}", self.transport));
        std::fs::write(&provider, text).map_err(HarnessError::io("stage provider"))?;
        let unstage = |f: &str| std::fs::remove_file(staged.join(f)).map_err(HarnessError::io("unstage"));
        unstage("10-secrets.yaml")?;
        if !with_experiment {
            unstage("30-experiment.yaml")?;
        }
        let mut out = self.kubectl(&["apply", "-f", &staged.join("00-namespaces.yaml").display().to_string()])?;
        let literal = |k: &str, v: &str| format!("--from-literal={k}={v}");
        let api_key = literal("apiKey", &self.runpod.get("api_key"));
        out += &self.kubectl(&["create", "secret", "generic", "runpod", "-n", "ep-system", &api_key])?;
        let (id, secret) = (self.runpod.get("s3_access_key"), self.runpod.get("s3_secret_key"));
        let (id, secret) = (literal("accessKeyId", &id), literal("secretAccessKey", &secret));
        out += &self.kubectl(&["create", "secret", "generic", "runpod-s3", "-n", "ep-system", &id, &secret])?;
        out += &self.kubectl(&["apply", "-f", &staged.display().to_string()])?;
        Ok(out)
    }

    /// `kubectl patch --type merge` of one object (`ns` None for cluster-scoped kinds).
    pub fn merge_patch(&self, kind: &str, ns: Option<&str>, name: &str, patch: &str) -> Result<String, HarnessError> {
        let mut args = vec!["patch", kind, name, "--type", "merge", "-p", patch];
        if let Some(ns) = ns {
            args.extend(["-n", ns]);
        }
        self.kubectl(&args)
    }

    /// `kubectl apply -f` of a YAML document.
    pub fn apply(&self, yaml: &str) -> Result<String, HarnessError> {
        let path = self.dir.path().join(format!("apply-{}.yaml", fastrand_name()));
        std::fs::write(&path, yaml).map_err(HarnessError::io("write yaml"))?;
        self.kubectl(&["apply", "-f", &path.display().to_string()])
    }

    /// An object as JSON (`kubectl get -o json`), or None when it does not exist.
    pub fn get(&self, kind: &str, ns: Option<&str>, name: &str) -> Result<Option<Value>, HarnessError> {
        let mut args = vec!["get", kind, name, "-o", "json", "--ignore-not-found"];
        if let Some(ns) = ns {
            args.extend(["-n", ns]);
        }
        let out = self.kubectl(&args)?;
        if out.trim().is_empty() {
            return Ok(None);
        }
        serde_json::from_str(&out).map(Some).map_err(|e| HarnessError::Setup(format!("kubectl get {kind} {name}: {e}")))
    }

    /// Waits until `pred` holds for the object (or it is gone, when `pred` accepts None).
    pub fn wait_for(
        &self,
        kind: &str,
        ns: Option<&str>,
        name: &str,
        timeout: Duration,
        what: &str,
        pred: impl Fn(Option<&Value>) -> bool,
    ) -> Result<Option<Value>, HarnessError> {
        let deadline = Instant::now() + timeout;
        loop {
            let obj = self.get(kind, ns, name)?;
            if pred(obj.as_ref()) {
                return Ok(obj);
            }
            if Instant::now() > deadline {
                return Err(HarnessError::Setup(format!(
                    "{kind} {name}: {what} not reached in {timeout:?}; last seen:\n{}\n\noperator log:\n{}",
                    obj.map(|o| serde_json::to_string_pretty(&o["status"]).unwrap_or_default())
                        .unwrap_or_else(|| "gone".into()),
                    self.operator_log(
                        std::env::var("EP_TEST_LOG_LINES").ok().and_then(|v| v.parse().ok()).unwrap_or(60)
                    )
                )));
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    /// runpod-sim's world state (`/_sim/world`).
    pub async fn world(&self) -> Result<Value, HarnessError> {
        let url = format!("{}/world", self.runpod.get("admin"));
        let r = reqwest::get(&url).await.map_err(|e| HarnessError::Setup(format!("GET {url}: {e}")))?;
        r.json().await.map_err(|e| HarnessError::Setup(format!("GET {url}: {e}")))
    }

    /// Polls runpod-sim's world until `ok` holds; false after `within`.
    pub async fn wait_for_world(&self, within: std::time::Duration, ok: impl Fn(&Value) -> bool) -> bool {
        let deadline = std::time::Instant::now() + within;
        while std::time::Instant::now() < deadline {
            if self.world().await.is_ok_and(|w| ok(&w)) {
                return true;
            }
            tokio::time::sleep(std::time::Duration::from_millis(250)).await;
        }
        false
    }

    /// Posts a fault set to runpod-sim (`/_sim/faults`), e.g. `{"capacityFailures": 1}`.
    pub async fn faults(&self, body: Value) -> Result<(), HarnessError> {
        self.admin_post("faults", body).await
    }

    /// Posts to a runpod-sim admin path, e.g. `pods/<id>/vanish`.
    pub async fn admin_post(&self, path: &str, body: Value) -> Result<(), HarnessError> {
        let url = format!("{}/{path}", self.runpod.get("admin"));
        let r = reqwest::Client::new().post(&url).json(&body).send().await;
        match r {
            Ok(r) if r.status().is_success() => Ok(()),
            Ok(r) => Err(HarnessError::Setup(format!("POST {url}: {}", r.status()))),
            Err(e) => Err(HarnessError::Setup(format!("POST {url}: {e}"))),
        }
    }

    /// The simulated volume's directory (what `/workspace` holds inside pods).
    pub fn volume_dir(&self, volume: &str) -> PathBuf {
        PathBuf::from(self.runpod.get("state_dir")).join("volumes").join(volume)
    }
}

/// Runs kubectl with a kubeconfig.
pub fn kubectl(kubeconfig: &Path, args: &[&str]) -> Result<String, HarnessError> {
    run_kubectl(kubeconfig, None, args)
}

/// `kubectl ep ARGS` with this workspace's `kubectl-ep` on PATH.
fn run_plugin(kubeconfig: &Path, args: &[&str]) -> Result<String, HarnessError> {
    let plugin = workspace_bin("kubectl-ep")?;
    let dir = plugin.parent().map(Path::to_path_buf).unwrap_or_default();
    let path = format!("{}:{}", dir.display(), std::env::var("PATH").unwrap_or_default());
    run_kubectl(kubeconfig, Some(&path), &[&["ep"], args].concat())
}

fn run_kubectl(kubeconfig: &Path, path: Option<&str>, args: &[&str]) -> Result<String, HarnessError> {
    let mut cmd = Command::new(tools::kubectl()?);
    cmd.env("KUBECONFIG", kubeconfig).args(args);
    if let Some(p) = path {
        cmd.env("PATH", p);
    }
    let out = cmd.output().map_err(HarnessError::io("run kubectl"))?;
    if !out.status.success() {
        return Err(HarnessError::Setup(format!(
            "kubectl {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn fastrand_name() -> String {
    format!("{:x}", std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos()))
}

/// A blocking HTTP/1.0 GET (the harness has no runtime of its own here).
fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").as_bytes()).ok()?;
    let mut buf = String::new();
    let _ = s.read_to_string(&mut buf);
    let code = buf.split_whitespace().nth(1)?.parse().ok()?;
    let body = buf.split_once("\r\n\r\n").map_or(String::new(), |(_, b)| b.to_owned());
    Some((code, body))
}

/// The last `n` lines of a file.
pub fn tail(path: &Path, n: usize) -> String {
    let Ok(f) = std::fs::File::open(path) else { return String::new() };
    let lines: Vec<String> = BufReader::new(f).lines().map_while(Result::ok).collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}
