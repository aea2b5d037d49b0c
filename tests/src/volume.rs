//! A RunPod network volume for tests: runpod-sim in-process, and an `S3Volume` on its S3 API.

use std::net::SocketAddr;
use std::path::PathBuf;

use ep_volume::S3Volume;
use ep_volume::store::S3Settings;
use runpod_sim::{RunningSim, SimOptions, WorldConfig};

/// runpod-sim in this process on free loopback ports, its state in a temp dir that lives as long
/// as the returned handle.
pub async fn start_runpod_sim(config: WorldConfig) -> Result<(RunningSim, tempfile::TempDir), crate::HarnessError> {
    let dir = tempfile::tempdir().map_err(crate::HarnessError::io("create temp dir"))?;
    let any = SocketAddr::from(([127, 0, 0, 1], 0));
    let opts =
        SimOptions { api_listen: any, s3_listen: any, state_dir: dir.path().join("state"), config, api_key: None };
    let sim = runpod_sim::start(opts).await.map_err(crate::HarnessError::io("start runpod-sim"))?;
    Ok((sim, dir))
}

/// The default world's volume.
pub const VOLUME: &str = "tgb8bx6fwl";

/// A simulator with its volume reachable by S3 and as a directory.
pub struct SimVolume {
    pub sim: RunningSim,
    pub store: S3Volume,
    /// The volume's directory: what a pod sees at /workspace.
    pub workspace: PathBuf,
    _dir: tempfile::TempDir,
}

impl SimVolume {
    pub async fn start(patch: impl FnOnce(&mut WorldConfig, &mut S3Settings)) -> Result<Self, crate::HarnessError> {
        let mut config = WorldConfig::default();
        let mut settings = S3Settings::new("http://unset", "EU-RO-1", VOLUME, "", "");
        patch(&mut config, &mut settings);
        let (sim, dir) = start_runpod_sim(config).await?;
        settings.endpoint.clone_from(&sim.endpoints.s3);
        settings.access_key.clone_from(&sim.endpoints.s3_access_key);
        settings.secret_key.clone_from(&sim.endpoints.s3_secret_key);
        let workspace = dir.path().join("state/volumes").join(&settings.bucket);
        Ok(Self { store: S3Volume::new(settings), sim, workspace, _dir: dir })
    }

    /// The simulator's whole world state (`/_sim/world`).
    pub async fn world(&self) -> serde_json::Value {
        let url = format!("{}/world", self.sim.endpoints.admin);
        match reqwest::get(url).await {
            Ok(r) => r.json().await.unwrap_or_default(),
            Err(_) => serde_json::Value::Null,
        }
    }

    /// Posts a fault set to the simulator's admin endpoint.
    pub async fn faults(&self, body: serde_json::Value) {
        let url = format!("{}/faults", self.sim.endpoints.admin);
        let _ = reqwest::Client::new().post(url).json(&body).send().await;
    }
}
