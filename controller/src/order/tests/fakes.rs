//! In-memory fakes of what an order reconcile talks to: RunPod, the volume, and the rest of the
//! world. Small on purpose: they behave like RunPod as runpod-api.md describes it, nothing more.

use ep_api::experiment::{Approval, ExperimentPhase};
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError};

use ep_api::order::OrderPhase;
use ep_api::volume::{
    FORMAT_VERSION, Heartbeat, ManifestEntry, ResourceUsage, RunnerState, Terminal, TerminalState, keys,
};
use ep_api::{RunPodOrder, RunPodOrderStatus};
use k8s_openapi::api::core::v1::ConfigMap;
use sha2::{Digest, Sha256};
use tokio::sync::Semaphore;

use crate::context::RunnerBinary;
use crate::error::Error;
use crate::order::ledger::{self, Entry, Ledger};
use crate::order::world::{Connected, World};
use crate::order::{Done, step};
use crate::pool::{Conn, Sequence};
use crate::reason::Blocked;
use crate::runpod::{
    GpuOffer, GpuQuery, NetworkVolume, Pod, PodSpec, PodStatus, RunPodApi, RunPodError, Runtime, Stock,
};
use crate::settings::{NamespaceBudget, Settings};

pub use super::store::FakeStore;

pub fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// What the next create call does.
#[derive(Clone, Debug, PartialEq)]
pub enum Create {
    /// No machine: RunPod's capacity message.
    Capacity,
    /// The pod is created but the answer is lost (a timeout after RunPod acted).
    AnswerLost,
    /// RunPod refuses the request for good.
    Refused,
    /// The pod is created and the answer never comes (a connection that hangs).
    Hang,
}

/// RunPod, in memory.
#[derive(Default)]
pub struct FakeRunPod {
    pub pods: Mutex<Vec<Pod>>,
    /// Every create request, in order.
    pub creates: Mutex<Vec<PodSpec>>,
    pub terminated: Mutex<Vec<String>>,
    pub stopped: Mutex<Vec<String>>,
    pub script: Mutex<VecDeque<Create>>,
    /// Pods created but not listed yet (RunPod's list lags a create), with the lists left to hide them.
    pub unlisted: Mutex<HashMap<String, u32>>,
    /// Lists to hide a new pod from.
    pub list_lag: Mutex<u32>,
    pub lists: Mutex<u32>,
    /// Errors the next pod lists answer with (RunPod down, rate limiting).
    pub list_errors: Mutex<VecDeque<RunPodError>>,
    pub no_terminate_after: bool,
}

pub const GPU_A: &str = "NVIDIA RTX PRO 4500 Blackwell";
pub const GPU_B: &str = "NVIDIA L4";

impl FakeRunPod {
    fn new_pod(&self, spec: &PodSpec) -> Pod {
        let n = lock(&self.creates).len();
        Pod {
            id: format!("pod{n:011}"),
            name: spec.name.clone(),
            status: PodStatus::Running,
            image: spec.image.clone(),
            env: spec.env.clone(),
            gpu_type_id: Some(spec.gpu_type_id.clone()),
            gpu_display_name: Some(spec.gpu_type_id.replace("NVIDIA ", "")),
            gpu_count: spec.gpu_count,
            cost_per_hr: 0.72,
            machine_id: Some("m1".into()),
            data_center_id: spec.data_center_id.clone(),
            network_volume_id: spec.network_volume_id.clone(),
            runtime: None,
        }
    }

    /// The pod's container starts (runtime appears).
    pub fn start(&self, id: &str) {
        for p in lock(&self.pods).iter_mut().filter(|p| p.id == id) {
            p.runtime = Some(Runtime { uptime_seconds: 1, ports: None, gpu_ids: vec![] });
        }
    }

    /// The host is lost: the pod disappears.
    pub fn vanish(&self, id: &str) {
        lock(&self.pods).retain(|p| p.id != id);
    }

    /// A pod created outside the operator with the same name (a second operator, or a hand).
    pub fn add(&self, pod: Pod) {
        lock(&self.pods).push(pod);
    }

    pub fn live(&self) -> Vec<Pod> {
        lock(&self.pods).iter().filter(|p| p.status != PodStatus::Terminated).cloned().collect()
    }
}

impl RunPodApi for FakeRunPod {
    async fn create_pod(&self, spec: &PodSpec) -> Result<Pod, RunPodError> {
        let next = lock(&self.script).pop_front();
        let pod = self.new_pod(spec);
        lock(&self.creates).push(spec.clone());
        match next {
            Some(Create::Capacity) => {
                return Err(RunPodError::Capacity {
                    message: "There are no longer any instances available with the requested specifications. Please refresh and try again.".into(),
                });
            }
            Some(Create::Refused) => return Err(RunPodError::InvalidRequest { message: "bad image".into() }),
            _ => {}
        }
        lock(&self.pods).push(pod.clone());
        let lag = *lock(&self.list_lag);
        if lag > 0 {
            lock(&self.unlisted).insert(pod.id.clone(), lag);
        }
        match next {
            Some(Create::AnswerLost) => {
                Err(RunPodError::Transient { message: "timed out".into(), may_have_applied: true })
            }
            Some(Create::Hang) => std::future::pending().await,
            _ => Ok(pod),
        }
    }
    async fn get_pod(&self, id: &str) -> Result<Option<Pod>, RunPodError> {
        Ok(lock(&self.pods).iter().find(|p| p.id == id).cloned())
    }
    async fn list_pods(&self) -> Result<Vec<Pod>, RunPodError> {
        *lock(&self.lists) += 1;
        if let Some(e) = lock(&self.list_errors).pop_front() {
            return Err(e);
        }
        let mut unlisted = lock(&self.unlisted);
        let pods = lock(&self.pods).iter().filter(|p| !unlisted.contains_key(&p.id)).cloned().collect();
        unlisted.retain(|_, n| {
            *n -= 1;
            *n > 0
        });
        Ok(pods)
    }
    async fn stop_pod(&self, id: &str) -> Result<(), RunPodError> {
        lock(&self.stopped).push(id.to_owned());
        for p in lock(&self.pods).iter_mut().filter(|p| p.id == id) {
            p.status = PodStatus::Exited;
        }
        Ok(())
    }
    async fn resume_pod(&self, _: &str, _: i32) -> Result<(), RunPodError> {
        Ok(())
    }
    async fn terminate_pod(&self, id: &str) -> Result<(), RunPodError> {
        lock(&self.terminated).push(id.to_owned());
        lock(&self.pods).retain(|p| p.id != id);
        Ok(())
    }
    async fn gpu_types(&self, _: &GpuQuery) -> Result<Vec<GpuOffer>, RunPodError> {
        let offer = |id: &str, price| GpuOffer {
            id: id.into(),
            display_name: id.into(),
            memory_gb: 24,
            max_gpu_count: 8,
            price_per_hour: Some(price),
            stock: Stock::High,
        };
        Ok(vec![offer(GPU_A, 0.72), offer(GPU_B, 0.39)])
    }
    async fn network_volumes(&self) -> Result<Vec<NetworkVolume>, RunPodError> {
        let vol =
            NetworkVolume { id: "vol1".into(), name: "data".into(), size_gb: 1, data_center_id: "EU-RO-1".into() };
        Ok(vec![vol])
    }
    fn supports_terminate_after(&self) -> bool {
        !self.no_terminate_after
    }
    fn self_terminate_base(&self) -> Option<String> {
        self.no_terminate_after.then(|| "http://rest.fake".to_owned())
    }
}

/// The world around one order.
pub struct FakeWorld {
    pub settings: Arc<Settings>,
    pub conn: Arc<Conn<FakeRunPod, FakeStore>>,
    pub provider_block: Mutex<Option<Blocked>>,
    pub others: Mutex<Vec<Arc<RunPodOrder>>>,
    pub config_maps: Mutex<HashMap<String, ConfigMap>>,
    pub saved: Mutex<Vec<RunPodOrderStatus>>,
    /// How many pods RunPod had terminated when each status was saved.
    pub terminated_at_save: Mutex<Vec<usize>>,
    /// Status writes still to lose (answered 409, as after a concurrent write).
    pub lose_saves: Mutex<u32>,
    /// The phase of the order's experiment (None: no such experiment).
    pub experiment: Mutex<Option<Option<ExperimentPhase>>>,
    /// The experiment's approval (spec.approval).
    pub approval: Mutex<Option<Approval>>,
    /// The namespace's spend ledger, as the ConfigMap would hold it.
    pub ledger: Mutex<Ledger>,
    runner: RunnerBinary,
    staging: tempfile::TempDir,
    slots: Semaphore,
    pub create_slots: Arc<Semaphore>,
}

impl FakeWorld {
    pub fn new(runpod: FakeRunPod) -> Self {
        let staging = tempfile::tempdir().unwrap_or_else(|e| panic!("temp dir: {e}"));
        let bin = staging.path().join("ep-runner");
        std::fs::write(&bin, b"#!/bin/sh\n").unwrap_or_else(|e| panic!("runner: {e}"));
        let runner = RunnerBinary::load(&bin).unwrap_or_else(|e| panic!("runner: {e}"));
        let conn = Conn::new(
            "default",
            runpod,
            FakeStore::default(),
            ("vol1", "EU-RO-1", "/workspace"),
            Arc::new(Sequence::default()),
        );
        Self {
            settings: Arc::new(Settings::embedded_default()),
            conn: Arc::new(conn),
            provider_block: Mutex::new(None),
            others: Mutex::default(),
            config_maps: Mutex::default(),
            saved: Mutex::default(),
            terminated_at_save: Mutex::default(),
            lose_saves: Mutex::default(),
            experiment: Mutex::new(Some(Some(ExperimentPhase::Running))),
            approval: Mutex::default(),
            ledger: Mutex::default(),
            runner,
            staging,
            slots: Semaphore::new(2),
            create_slots: Arc::new(Semaphore::new(1)),
        }
    }

    pub fn runpod(&self) -> &FakeRunPod {
        &self.conn.api
    }

    pub fn store(&self) -> &FakeStore {
        &self.conn.store
    }
}

impl World for FakeWorld {
    type Api = FakeRunPod;
    type Store = FakeStore;

    fn settings(&self) -> Arc<Settings> {
        self.settings.clone()
    }
    async fn provider(&self, _: &str) -> Connected<FakeRunPod, FakeStore> {
        match lock(&self.provider_block).clone() {
            Some(b) => Err(b),
            None => Ok(self.conn.clone()),
        }
    }
    fn orders(&self, _: &str) -> Vec<Arc<RunPodOrder>> {
        lock(&self.others).clone()
    }
    fn experiment_phase(&self, _: &str, _: &str) -> Option<Option<ExperimentPhase>> {
        *lock(&self.experiment)
    }
    async fn secret_key(&self, _: &str, _: &str, _: &str) -> Result<Option<String>, Error> {
        Ok(Some("s3cret".into()))
    }
    async fn config_map(&self, _: &str, name: &str) -> Result<Option<ConfigMap>, Error> {
        Ok(lock(&self.config_maps).get(name).cloned())
    }
    async fn save_status(
        &self,
        _: &RunPodOrder,
        rv: Option<&str>,
        status: &RunPodOrderStatus,
    ) -> Result<Option<String>, Error> {
        let mut saved = lock(&self.saved);
        if std::mem::replace(&mut *lock(&self.lose_saves), 0) > 0 {
            return Err(Error::Conflict);
        }
        // The API server's precondition: a write decided on an older version is refused.
        if rv.is_some_and(|rv| rv != saved.len().to_string()) {
            return Err(Error::Conflict);
        }
        saved.push(status.clone());
        lock(&self.terminated_at_save).push(lock(&self.conn.api.terminated).len());
        Ok(Some(saved.len().to_string()))
    }
    fn runner(&self) -> &RunnerBinary {
        &self.runner
    }
    fn staging(&self) -> &Path {
        self.staging.path()
    }
    fn sync_slots(&self) -> &Semaphore {
        &self.slots
    }
    fn create_slots(&self) -> &Semaphore {
        &self.create_slots
    }
    fn record_spend(&self, _: &str, _: f64) {}
    fn experiment_approval(&self, _: &str, _: &str) -> Option<Approval> {
        lock(&self.approval).clone()
    }
    async fn reserve(&self, ns: &str, uid: &str, e: Entry, b: &NamespaceBudget) -> Result<Result<(), Blocked>, Error> {
        let live = crate::order::world::live_orders(&lock(&self.others));
        Ok(ledger::admit_change(&mut lock(&self.ledger), ns, uid, &e, b, &live).1)
    }
    async fn settle(&self, _: &str, uid: &str, spent: f64) -> Result<(), Error> {
        lock(&self.ledger).settle(uid, spent);
        Ok(())
    }
}

pub use super::t;

/// One order driven pass by pass against a fake world, its status kept as the API server would.
pub struct Sim {
    pub world: FakeWorld,
    pub order: RunPodOrder,
    pub now: f64,
    pub deleting: bool,
    pub done: Vec<Done>,
}

impl Sim {
    pub fn new(world: FakeWorld, order: RunPodOrder) -> Self {
        Self { world, order, now: 0.0, deleting: false, done: vec![] }
    }

    pub fn status(&self) -> RunPodOrderStatus {
        self.order.status.clone().unwrap_or_default()
    }

    pub fn phase(&self) -> Option<OrderPhase> {
        self.status().phase
    }

    /// One pass at the current time; its status writes land on the order.
    pub async fn pass(&mut self) -> Result<(), Error> {
        // Each pass follows a poll: the shared pod list is fresh.
        self.world.conn.invalidate().await;
        let done = step(&self.world, &self.order, self.deleting, t(self.now)).await;
        let saved = lock(&self.world.saved).clone();
        if let Some(st) = saved.last() {
            self.order.status = Some(st.clone());
        }
        self.order.metadata.resource_version = Some(saved.len().to_string());
        self.done.push(done?);
        Ok(())
    }

    /// Passes (a second apart) until the order reaches `phase`, at most `max` of them.
    pub async fn until(&mut self, phase: OrderPhase, max: usize) {
        for _ in 0..max {
            if self.phase() == Some(phase) {
                return;
            }
            self.pass().await.unwrap_or_else(|e| panic!("pass failed: {e}"));
            self.now += 1.0;
        }
        assert_eq!(self.phase(), Some(phase), "{:#?}", self.status());
    }

    /// Every Event reason published so far.
    pub fn events(&self) -> Vec<String> {
        self.done.iter().flat_map(|d| d.events.iter().map(|(r, _)| r.to_string())).collect()
    }

    /// The run id the order claimed.
    pub fn run_id(&self) -> String {
        self.status().run_id.unwrap_or_default()
    }

    /// The runner heartbeats now with the claim's fencing token (or another).
    pub fn heartbeat(&self, token: u64) {
        self.heartbeat_from(token, "pod-a", 0.0);
    }

    /// A runner on `host` that started at `started` (seconds of the fake clock) heartbeats now.
    pub fn heartbeat_from(&self, token: u64, host: &str, started: f64) {
        let runner = ep_api::volume::RunnerIdentity { host: host.into(), pid: 7, started_at: t(started) };
        let hb = Heartbeat {
            version: FORMAT_VERSION,
            run_id: self.run_id(),
            seq: 1,
            time: t(self.now),
            pid: Some(42),
            fencing_token: token,
            state: RunnerState::Running,
            gpus: vec![],
            runner: Some(runner),
        };
        let body = serde_json::to_vec(&hb).unwrap_or_default();
        self.world.store().put(&keys::run_file(&self.run_id(), keys::HEARTBEAT), body);
    }

    pub fn token(&self) -> u64 {
        u64::try_from(self.status().fencing_token.unwrap_or(0)).unwrap_or(0)
    }

    /// The runner finishes: results, usage and terminal.json (written last).
    pub fn finish(&self, state: TerminalState, exit: i32) {
        self.finish_with(state, exit, &[]);
    }

    /// The key of an artifact of the run.
    pub fn artifact_key(&self, path: &str) -> String {
        format!("{}{}/{path}", keys::run_prefix(&self.run_id()), keys::ARTIFACTS_DIR)
    }

    /// As `finish`, with more artifacts (checkpoints, say) listed in terminal.json.
    pub fn finish_with(&self, state: TerminalState, exit: i32, extra: &[(&str, &[u8])]) {
        let run = self.run_id();
        let results = br#"{"f1": 0.8, "auc": 0.95}"#.to_vec();
        let path = "results.json";
        let store = self.world.store();
        store.put(&self.artifact_key(path), results.clone());
        let mut artifacts = vec![ManifestEntry {
            path: path.into(),
            size: results.len() as u64,
            sha256: hex::encode(Sha256::digest(&results)),
            mode: 0o644,
            md5: None,
        }];
        for (p, body) in extra {
            store.put(&self.artifact_key(p), body.to_vec());
            artifacts.push(ManifestEntry {
                path: (*p).into(),
                size: body.len() as u64,
                sha256: hex::encode(Sha256::digest(body)),
                mode: 0o644,
                md5: None,
            });
        }
        let usage = ResourceUsage {
            version: FORMAT_VERSION,
            run_id: run.clone(),
            wall_seconds: 1.0,
            cpu_user_seconds: 0.5,
            cpu_system_seconds: 0.1,
            peak_rss_bytes: 1 << 20,
            samples: 1,
            gpus: vec![],
        };
        store.put(&keys::run_file(&run, keys::RESOURCE_USAGE), serde_json::to_vec(&usage).unwrap_or_default());
        let metrics = if state == TerminalState::Succeeded {
            [("f1".to_owned(), 0.8), ("auc".to_owned(), 0.95)].into_iter().collect()
        } else {
            BTreeMap::new()
        };
        let terminal = Terminal {
            version: FORMAT_VERSION,
            run_id: run.clone(),
            attempt: 1,
            fencing_token: self.token(),
            state,
            exit_code: Some(exit),
            signal: None,
            reason: format!("exit {exit}"),
            started_at: t(0.0),
            finished_at: t(self.now),
            artifacts,
            metrics,
        };
        store.put(&keys::run_file(&run, keys::TERMINAL), serde_json::to_vec(&terminal).unwrap_or_default());
    }
}

/// The quickstart's order for attempt 1, with its payload pushed as a ConfigMap.
pub fn world_and_order() -> (FakeWorld, RunPodOrder) {
    let world = FakeWorld::new(FakeRunPod::default());
    let cm: ConfigMap = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "quickstart-code", "namespace": "ep-quickstart"},
        "data": {"train.py": "print('hello')\n"}
    }))
    .unwrap_or_else(|e| panic!("{e}"));
    lock(&world.config_maps).insert("quickstart-code".into(), cm);
    let mut order = crate::fixtures::quickstart_order("quickstart-a1", 1);
    order.metadata.namespace = Some("ep-quickstart".into());
    (world, order)
}
