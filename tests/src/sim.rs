//! runpod-sim as a separate process, as the operator and real clients meet it.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::HarnessError;

/// A binary of this workspace, built next to the running test (`target/<profile>/NAME`).
pub fn workspace_bin(name: &str) -> Result<PathBuf, HarnessError> {
    let exe = std::env::current_exe().map_err(HarnessError::io("locate the test binary"))?;
    let dir = exe.parent().and_then(|d| if d.ends_with("deps") { d.parent() } else { Some(d) });
    let path = dir.map(|d| d.join(name)).ok_or_else(|| HarnessError::Setup("no target directory".into()))?;
    if path.exists() {
        Ok(path)
    } else {
        Err(HarnessError::Setup(format!("{} is not built: run `cargo build --workspace`", path.display())))
    }
}

/// A running runpod-sim process; stopped (and its pods with it) on drop.
pub struct RunPodSimProcess {
    child: Child,
    _state: tempfile::TempDir,
    /// The JSON line the simulator printed: api, graphql, rest, s3, admin, api_key, s3_access_key, ...
    pub endpoints: Value,
}

impl RunPodSimProcess {
    /// Starts the simulator with an optional world YAML and extra arguments.
    pub fn start(world: Option<&str>, extra: &[&str]) -> Result<Self, HarnessError> {
        let state =
            tempfile::Builder::new().prefix("runpod-sim-").tempdir().map_err(HarnessError::io("create state dir"))?;
        let mut cmd = Command::new(workspace_bin("runpod-sim")?);
        cmd.arg("--state-dir").arg(state.path().join("state"));
        if let Some(yaml) = world {
            let path = state.path().join("world.yaml");
            std::fs::write(&path, yaml).map_err(HarnessError::io("write world"))?;
            cmd.arg("--config").arg(path);
        }
        cmd.args(extra).stdout(Stdio::piped()).stderr(Stdio::inherit());
        let mut child = cmd.spawn().map_err(HarnessError::io("start runpod-sim"))?;
        let stdout = child.stdout.take().ok_or_else(|| HarnessError::Setup("no stdout".into()))?;
        let mut line = String::new();
        let started = Instant::now();
        BufReader::new(stdout).read_line(&mut line).map_err(HarnessError::io("read runpod-sim endpoints"))?;
        let endpoints: Value = serde_json::from_str(&line).map_err(|e| {
            HarnessError::Setup(format!(
                "runpod-sim printed {line:?} instead of its endpoints ({e}) after {:?}",
                started.elapsed()
            ))
        })?;
        Ok(Self { child, _state: state, endpoints })
    }

    /// The simulator's process id (for CPU figures).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// An endpoint field, e.g. `"graphql"`.
    pub fn get(&self, key: &str) -> String {
        self.endpoints[key].as_str().unwrap_or_default().to_owned()
    }
}

/// SIGTERM, then SIGKILL if the process has not exited within `grace`.
pub fn terminate(child: &mut Child, grace: Duration) {
    let _ = Command::new("kill").arg("-TERM").arg(child.id().to_string()).status();
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
}

impl RunPodSimProcess {
    /// `text` with RunPod's endpoints and the examples' placeholder keys replaced by this
    /// simulator's: the only edit a user makes to the quickstart.
    pub fn point_at(&self, text: &str) -> String {
        text.replace("https://api.runpod.io", &self.get("api"))
            .replace("https://s3api-eu-ro-1.runpod.io", &self.get("s3"))
            .replace("rpa_REPLACE_ME", &self.get("api_key"))
            .replace("user_REPLACE_ME", &self.get("s3_access_key"))
            .replace("rps_REPLACE_ME", &self.get("s3_secret_key"))
    }

    /// Copies the YAML files of `src` into `dest`, each passed through [`Self::point_at`].
    pub fn stage(&self, src: &std::path::Path, dest: &std::path::Path) -> Result<(), HarnessError> {
        std::fs::create_dir_all(dest).map_err(HarnessError::io("stage"))?;
        for entry in std::fs::read_dir(src).map_err(HarnessError::io("read examples"))? {
            let p = entry.map_err(HarnessError::io("read examples"))?.path();
            if p.extension().is_some_and(|e| e == "yaml") {
                let text = std::fs::read_to_string(&p).map_err(HarnessError::io("read yaml"))?;
                std::fs::write(dest.join(p.file_name().unwrap_or_default()), self.point_at(&text))
                    .map_err(HarnessError::io("stage"))?;
            }
        }
        Ok(())
    }
}

impl Drop for RunPodSimProcess {
    fn drop(&mut self) {
        // SIGTERM lets the simulator kill its pod processes; SIGKILL only if it hangs.
        terminate(&mut self.child, Duration::from_secs(5));
    }
}

/// A running kube-sim process with a kubeconfig for kubectl and kube-rs; stopped on drop.
pub struct KubeSimProcess {
    child: Child,
    dir: tempfile::TempDir,
    pub url: String,
}

impl KubeSimProcess {
    /// Starts kube-sim with the CRDs of `crds` loaded.
    pub fn start(crds: Option<&std::path::Path>) -> Result<Self, HarnessError> {
        Self::start_audited(crds, None)
    }

    /// Starts kube-sim recording every resource request in `audit_log` (JSON lines).
    pub fn start_audited(
        crds: Option<&std::path::Path>,
        audit_log: Option<&std::path::Path>,
    ) -> Result<Self, HarnessError> {
        Self::start_with(crds, audit_log, None)
    }

    /// Starts kube-sim; with `users` (a `--users` file's YAML) it authenticates those tokens over
    /// HTTPS and authorizes with RBAC, and the kubeconfig holds one context per user.
    pub fn start_with(
        crds: Option<&std::path::Path>,
        audit_log: Option<&std::path::Path>,
        users: Option<&str>,
    ) -> Result<Self, HarnessError> {
        let dir =
            tempfile::Builder::new().prefix("kube-sim-").tempdir().map_err(HarnessError::io("create temp dir"))?;
        let mut cmd = Command::new(workspace_bin("kube-sim")?);
        cmd.arg("--kubeconfig-out").arg(dir.path().join("kubeconfig"));
        if let Some(yaml) = users {
            let path = dir.path().join("users.yaml");
            std::fs::write(&path, yaml).map_err(HarnessError::io("write users"))?;
            cmd.arg("--users").arg(path);
        }
        if let Some(c) = crds {
            cmd.arg("--crds").arg(c);
        }
        if let Some(a) = audit_log {
            cmd.arg("--audit-log").arg(a);
        }
        cmd.stdout(Stdio::piped()).stderr(Stdio::inherit());
        let mut child = cmd.spawn().map_err(HarnessError::io("start kube-sim"))?;
        let stdout = child.stdout.take().ok_or_else(|| HarnessError::Setup("no stdout".into()))?;
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line).map_err(HarnessError::io("read kube-sim address"))?;
        let v: Value =
            serde_json::from_str(&line).map_err(|e| HarnessError::Setup(format!("kube-sim printed {line:?} ({e})")))?;
        let url = v["url"].as_str().unwrap_or_default().to_owned();
        Ok(Self { child, dir, url })
    }

    /// The simulator's process id (for CPU figures).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The kubeconfig kube-sim wrote.
    pub fn kubeconfig(&self) -> PathBuf {
        self.dir.path().join("kubeconfig")
    }
}

impl Drop for KubeSimProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
