//! kube-rs against kube-sim: typed Api, the runtime watcher, a Controller that writes status, a
//! watch resumed from a resourceVersion, and 409 on a stale update.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers panic on setup failure by design

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use ep_api::{Experiment, ExperimentStatus};
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams, WatchEvent, WatchParams};
use kube::runtime::controller::Action;
use kube::runtime::{Controller, WatchStreamExt, watcher};
use kube::{Client, CustomResourceExt, ResourceExt};
use serde_json::json;

async fn sim() -> (kube_sim::RunningKubeSim, Client) {
    let sim = kube_sim::start(kube_sim::Options::default()).await.unwrap();
    let client = sim.client().unwrap();
    let crds: Api<k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition> =
        Api::all(client.clone());
    crds.create(&PostParams::default(), &Experiment::crd()).await.unwrap();
    (sim, client)
}

fn experiment(name: &str) -> Experiment {
    serde_json::from_value(json!({
        "apiVersion": "ep.dev/v1alpha1", "kind": "Experiment", "metadata": {"name": name},
        "spec": {
            "entry": {"command": ["python3", "train.py"]},
            "payload": {"digest": format!("sha256:{}", "a".repeat(64))},
            "image": "runpod/pytorch", "gpu": {"types": ["rtx-pro-4500"]},
            "order": {"policy": "paper-train", "workerId": "runpod-1"},
            "checkpoints": {"retention": "Keep"}
        }
    }))
    .unwrap()
}

#[tokio::test]
async fn typed_api_crud_and_409_on_a_stale_update() {
    let (_sim, client) = sim().await;
    let exps: Api<Experiment> = Api::namespaced(client.clone(), "default");
    let created = exps.create(&PostParams::default(), &experiment("a")).await.unwrap();
    assert_eq!(created.metadata.generation, Some(1));
    assert!(created.uid().is_some());
    let mut stale = created.clone();
    let mut fresh = exps.get("a").await.unwrap();
    fresh.spec.suspend = true;
    let updated = exps.replace("a", &PostParams::default(), &fresh).await.unwrap();
    assert_eq!(updated.metadata.generation, Some(2));
    stale.spec.image = "other".into();
    let err = exps.replace("a", &PostParams::default(), &stale).await.unwrap_err();
    match err {
        kube::Error::Api(s) => {
            assert_eq!(s.code, 409);
            assert_eq!(s.reason, "Conflict");
            assert!(s.message.contains("the object has been modified"), "{}", s.message);
        }
        other => panic!("expected 409, got {other}"),
    }
    let list = exps.list(&ListParams::default()).await.unwrap();
    assert_eq!(list.items.len(), 1);
    // Status goes through the status subresource; the main endpoint ignores it.
    let status = ExperimentStatus { attempts: 1, ..ExperimentStatus::default() };
    let patched = exps
        .patch_status(
            "a",
            &PatchParams::apply("ep-operator").force(),
            &Patch::Apply(json!({"apiVersion": "ep.dev/v1alpha1", "kind": "Experiment", "status": status})),
        )
        .await
        .unwrap();
    assert_eq!(patched.status.unwrap().attempts, 1);
    assert_eq!(patched.metadata.generation, Some(2), "status changes do not bump the generation");
    let mut with_status = exps.get("a").await.unwrap();
    with_status.status.as_mut().unwrap().attempts = 99;
    let after = exps.replace("a", &PostParams::default(), &with_status).await.unwrap();
    assert_eq!(after.status.unwrap().attempts, 1, "the main endpoint ignores status");
}

#[tokio::test]
async fn watcher_sees_added_modified_deleted_and_resumes_from_a_resource_version() {
    let (_sim, client) = sim().await;
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), "default");
    let mut events = watcher(cms.clone(), watcher::Config::default()).applied_objects().boxed();
    let mut raw = cms.watch(&WatchParams::default(), "0").await.unwrap().boxed();

    let cm: ConfigMap = serde_json::from_value(json!({"metadata": {"name": "one"}, "data": {"k": "v"}})).unwrap();
    cms.create(&PostParams::default(), &cm).await.unwrap();
    let seen = tokio::time::timeout(Duration::from_secs(5), events.try_next()).await.unwrap().unwrap().unwrap();
    assert_eq!(seen.name_any(), "one");
    cms.patch("one", &PatchParams::default(), &Patch::Merge(json!({"data": {"k": "v2"}}))).await.unwrap();
    let seen = tokio::time::timeout(Duration::from_secs(5), events.try_next()).await.unwrap().unwrap().unwrap();
    assert_eq!(seen.data.unwrap()["k"], "v2");
    cms.delete("one", &Default::default()).await.unwrap();

    let mut kinds = Vec::new();
    let mut last_rv = String::new();
    while kinds.len() < 3 {
        match tokio::time::timeout(Duration::from_secs(5), raw.try_next()).await.unwrap().unwrap().unwrap() {
            WatchEvent::Added(o) => {
                last_rv = o.resource_version().unwrap();
                kinds.push("ADDED");
            }
            WatchEvent::Modified(_) => kinds.push("MODIFIED"),
            WatchEvent::Deleted(_) => kinds.push("DELETED"),
            _ => {}
        }
    }
    assert_eq!(kinds, ["ADDED", "MODIFIED", "DELETED"]);

    // A new watch from the ADDED event's resourceVersion replays what came after it.
    let mut resumed = cms.watch(&WatchParams::default(), &last_rv).await.unwrap().boxed();
    let mut replayed = Vec::new();
    while replayed.len() < 2 {
        match tokio::time::timeout(Duration::from_secs(5), resumed.try_next()).await.unwrap().unwrap().unwrap() {
            WatchEvent::Modified(_) => replayed.push("MODIFIED"),
            WatchEvent::Deleted(_) => replayed.push("DELETED"),
            WatchEvent::Added(_) => replayed.push("ADDED"),
            _ => {}
        }
    }
    assert_eq!(replayed, ["MODIFIED", "DELETED"]);
}

#[tokio::test]
async fn a_controller_reconciles_and_writes_status() {
    let (_sim, client) = sim().await;
    let exps: Api<Experiment> = Api::namespaced(client.clone(), "default");
    for n in ["x", "y"] {
        exps.create(&PostParams::default(), &experiment(n)).await.unwrap();
    }
    let reconciles = Arc::new(AtomicUsize::new(0));
    let ctx = Arc::new((exps.clone(), reconciles.clone()));
    let controller = Controller::new(exps.clone(), watcher::Config::default())
        .run(
            |obj: Arc<Experiment>, ctx: Arc<(Api<Experiment>, Arc<AtomicUsize>)>| async move {
                ctx.1.fetch_add(1, Ordering::SeqCst);
                let status = json!({"apiVersion": "ep.dev/v1alpha1", "kind": "Experiment", "status": {"phase": "Pending", "attempts": 0, "observedGeneration": obj.metadata.generation}});
                ctx.0.patch_status(&obj.name_any(), &PatchParams::apply("test-controller").force(), &Patch::Apply(status)).await?;
                Ok::<_, kube::Error>(Action::await_change())
            },
            |_, _: &kube::Error, _| Action::requeue(Duration::from_secs(1)),
            ctx,
        )
        .for_each(|_| async {});
    let handle = tokio::spawn(controller);
    for _ in 0..100 {
        let all = exps.list(&ListParams::default()).await.unwrap();
        if all.items.iter().all(|e| e.status.as_ref().is_some_and(|s| s.observed_generation == Some(1))) {
            handle.abort();
            assert!(reconciles.load(Ordering::SeqCst) >= 2);
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the controller never wrote status to both experiments");
}

#[tokio::test]
async fn the_written_kubeconfig_works_as_is_and_crds_load_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("kubeconfig");
    let crds = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../crds");
    let _sim = kube_sim::start(kube_sim::Options {
        kubeconfig_out: Some(path.clone()),
        crds: Some(crds),
        ..kube_sim::Options::default()
    })
    .await
    .unwrap();
    let kubeconfig = kube::config::Kubeconfig::read_from(&path).unwrap();
    let config =
        kube::Config::from_custom_kubeconfig(kubeconfig, &kube::config::KubeConfigOptions::default()).await.unwrap();
    assert_eq!(config.default_namespace, "default");
    let client = Client::try_from(config).unwrap();
    // The CRDs from crds/ are served from the start: no CRD was posted by this test.
    let exps: Api<Experiment> = Api::namespaced(client.clone(), "default");
    exps.create(&PostParams::default(), &experiment("from-start")).await.unwrap();
    let providers: Api<ep_api::RunPodProvider> = Api::all(client);
    assert!(
        providers.list(&ListParams::default()).await.unwrap().items.is_empty(),
        "cluster-scoped kinds are served too"
    );
}
