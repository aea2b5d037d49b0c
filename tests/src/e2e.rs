//! What the end-to-end tests share: an experiment like the quickstart with its own name and
//! training length, and small readers of the objects kubectl returns.

use std::time::{Duration, Instant};

use serde_json::Value;

use crate::HarnessError;
use crate::stack::{Stack, StackOptions};

/// The quickstart's namespace (its code ConfigMap lives there).
pub const NS: &str = "ep-quickstart";

/// Installs the process-wide rustls provider (idempotent).
pub fn init_tls() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
}

/// An Experiment running the quickstart's train.py.
#[derive(Clone, Debug)]
pub struct Exp {
    pub name: String,
    pub policy: String,
    pub epochs: u32,
    /// Seconds per epoch: long enough to watch, stop or break a run.
    pub sleep: f64,
    pub attempts: u32,
    pub backoff: Option<String>,
    pub gpus: Vec<String>,
    /// Keep, KeepLast or Discard.
    pub retention: String,
}

/// A three-epoch experiment on the `smoke` policy, GPU choices rtx-pro-4500 then l4.
pub fn exp(name: &str) -> Exp {
    Exp {
        name: name.to_owned(),
        policy: "smoke".into(),
        epochs: 3,
        sleep: 0.0,
        attempts: 1,
        backoff: None,
        gpus: vec!["rtx-pro-4500".into(), "l4".into()],
        retention: "Discard".into(),
    }
}

impl Exp {
    #[must_use]
    pub fn epochs(mut self, n: u32, sleep: f64) -> Self {
        self.epochs = n;
        self.sleep = sleep;
        self
    }
    #[must_use]
    pub fn policy(mut self, p: &str) -> Self {
        p.clone_into(&mut self.policy);
        self
    }
    #[must_use]
    pub fn attempts(mut self, n: u32, backoff: Option<&str>) -> Self {
        self.attempts = n;
        self.backoff = backoff.map(str::to_owned);
        self
    }
    #[must_use]
    pub fn gpus(mut self, g: &[&str]) -> Self {
        self.gpus = g.iter().map(|s| (*s).to_owned()).collect();
        self
    }
    #[must_use]
    pub fn retention(mut self, r: &str) -> Self {
        r.clone_into(&mut self.retention);
        self
    }

    /// The YAML a user would apply.
    pub fn yaml(&self) -> String {
        let backoff = self.backoff.as_ref().map(|b| format!(", backoff: {b}")).unwrap_or_default();
        format!(
            r#"apiVersion: ep.dev/v1alpha1
kind: Experiment
metadata: {{name: {name}, namespace: {NS}}}
spec:
  entry: {{command: [python3, train.py], args: [--epochs, "{epochs}", --epoch-sleep, "{sleep}"]}}
  payload: {{configMap: {{name: quickstart-code}}}}
  image: runpod/pytorch:1.0.2-cu1281-torch280-ubuntu2404
  gpu: {{types: [{gpus}], count: 1, cloudType: SECURE}}
  order: {{policy: {policy}, workerId: runpod-1, providerRef: default, maxCostPerHour: 1.0}}
  limits: {{maxRuntime: 30m, maxCostUsd: 2}}
  retry: {{maxAttempts: {attempts}{backoff}}}
  checkpoints: {{retention: {retention}, path: checkpoints/}}
  results: {{file: results.json, metrics: [f1, auc]}}
"#,
            name = self.name,
            epochs = self.epochs,
            sleep = self.sleep,
            gpus = self.gpus.join(", "),
            policy = self.policy,
            attempts = self.attempts,
            retention = self.retention,
        )
    }
}

/// `status.phase` of an object, or "".
pub fn phase(o: Option<&Value>) -> String {
    o.and_then(|o| o["status"]["phase"].as_str()).unwrap_or_default().to_owned()
}

/// The condition `type_` of an object.
pub fn condition(o: Option<&Value>, type_: &str) -> Option<Value> {
    o?["status"]["conditions"].as_array()?.iter().find(|c| c["type"] == type_).cloned()
}

/// Polls `f` until it holds.
pub fn wait_until(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) -> Result<(), HarnessError> {
    let deadline = Instant::now() + timeout;
    while !f() {
        if Instant::now() > deadline {
            return Err(HarnessError::Setup(format!("{what} not reached in {timeout:?}")));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}

/// The whole stack with the quickstart's namespaces, Secrets, provider and code ConfigMap applied
/// (its Experiment left out, for the test to apply its own).
pub async fn quickstart_stack(opts: &StackOptions) -> Result<Stack, HarnessError> {
    init_tls();
    let stack = Stack::start(opts).await?;
    stack.apply_quickstart(false)?;
    Ok(stack)
}

impl Stack {
    /// Pods runpod-sim's account holds (any state but terminated).
    pub async fn live_pods(&self) -> Result<Vec<Value>, HarnessError> {
        let world = self.world().await?;
        Ok(world["pods"]
            .as_object()
            .cloned()
            .unwrap_or_default()
            .into_values()
            .filter(|p| p["desiredStatus"] != "TERMINATED")
            .collect())
    }

    /// Waits until an object in [`NS`] reaches one of `want` phases.
    pub fn wait_phase(&self, kind: &str, name: &str, want: &[&str]) -> Result<Value, HarnessError> {
        let obj = self.wait_for(kind, Some(NS), name, Duration::from_secs(180), &want.join(" or "), |o| {
            want.contains(&phase(o).as_str())
        })?;
        obj.ok_or_else(|| HarnessError::Setup(format!("{kind} {name} is gone")))
    }
}

/// `kubectl get KIND -n NS -w -o json` running in the background: every version of every object of
/// the kind that the API server sends, so a reason written to status for a moment is still seen.
pub struct Watch {
    child: std::process::Child,
    file: std::path::PathBuf,
}

impl Watch {
    /// Every version of the object `name` seen so far, oldest first.
    pub fn versions(&self, name: &str) -> Vec<Value> {
        let text = std::fs::read_to_string(&self.file).unwrap_or_default();
        serde_json::Deserializer::from_str(&text)
            .into_iter::<Value>()
            .map_while(Result::ok)
            .filter(|o| o["metadata"]["name"] == name)
            .collect()
    }

    /// Every reason the object's status carried: `status.reason` and each condition's reason.
    pub fn reasons(&self, name: &str) -> std::collections::BTreeSet<String> {
        let mut out = std::collections::BTreeSet::new();
        for o in self.versions(name) {
            for field in ["reason", "drainReason"] {
                if let Some(r) = o["status"][field].as_str() {
                    out.insert(r.to_owned());
                }
            }
            for c in o["status"]["conditions"].as_array().cloned().unwrap_or_default() {
                if let Some(r) = c["reason"].as_str() {
                    out.insert(r.to_owned());
                }
            }
        }
        out
    }

    /// Waits until the object's status has carried one of `want`; returns it with its message.
    pub fn wait_reason(&self, name: &str, want: &[&str], timeout: Duration) -> Result<(String, String), HarnessError> {
        self.wait_reason_where(name, want, timeout, |_| true)
    }

    /// Like [`Watch::wait_reason`], for a reason whose message also satisfies `ok`.
    pub fn wait_reason_where(
        &self,
        name: &str,
        want: &[&str],
        timeout: Duration,
        ok: impl Fn(&str) -> bool,
    ) -> Result<(String, String), HarnessError> {
        let deadline = Instant::now() + timeout;
        loop {
            for o in self.versions(name) {
                // Why a run drains is its own field; what it says is in the Ready condition.
                if let Some(r) = o["status"]["drainReason"].as_str().filter(|r| want.contains(r)) {
                    let message = o["status"]["message"].as_str().unwrap_or_default();
                    if ok(message) {
                        return Ok((r.to_owned(), message.to_owned()));
                    }
                }
                let conditions = o["status"]["conditions"].as_array().cloned().unwrap_or_default();
                for c in conditions {
                    if let Some(r) = c["reason"].as_str().filter(|r| want.contains(r)) {
                        let message = c["message"].as_str().unwrap_or_default();
                        if ok(message) {
                            return Ok((r.to_owned(), message.to_owned()));
                        }
                    }
                }
            }
            if Instant::now() > deadline {
                return Err(HarnessError::Setup(format!(
                    "{name}: none of {want:?} in status within {timeout:?}; seen {:?}",
                    self.reasons(name)
                )));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Stack {
    /// Starts watching `kind` in [`NS`] with kubectl.
    pub fn watch(&self, kind: &str) -> Result<Watch, HarnessError> {
        let file = self.dir.path().join(format!("watch-{kind}.json"));
        let out = std::fs::File::create(&file).map_err(HarnessError::io("watch file"))?;
        let child = std::process::Command::new(crate::tools::kubectl()?)
            .env("KUBECONFIG", self.kubeconfig())
            .args(["get", kind, "-n", NS, "-w", "-o", "json"])
            .stdout(out)
            .stderr(std::process::Stdio::null())
            .spawn()
            .map_err(HarnessError::io("kubectl get -w"))?;
        Ok(Watch { child, file })
    }
}

/// Runs an end-to-end test body `async fn NAME(transport: &'static str)` once per RunPod transport,
/// as the tests `NAME::rest_v2` and `NAME::graphql`.
#[macro_export]
macro_rules! on_both_transports {
    ($body:ident) => {
        mod $body {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn rest_v2() {
                super::$body("restV2").await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn graphql() {
                super::$body("graphql").await;
            }
        }
    };
}
