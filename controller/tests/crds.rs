//! `crds/` is generated from the types: these tests fail when it is stale.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers panic on setup failure by design

use std::process::Command;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;

fn crds_dir() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../crds")
}

#[test]
fn crds_dir_matches_the_types() {
    let files = ep_operator::crdgen::crd_files().unwrap();
    let mut on_disk: Vec<String> = std::fs::read_dir(crds_dir())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.ends_with(".yaml"))
        .collect();
    on_disk.sort();
    let mut expected: Vec<String> = files.iter().map(|(n, _)| n.clone()).collect();
    expected.sort();
    assert_eq!(on_disk, expected, "crds/ holds other files than the generated ones: run `make crds`");
    for (name, yaml) in files {
        let disk = std::fs::read_to_string(crds_dir().join(&name)).unwrap();
        assert!(disk == yaml, "crds/{name} is stale: run `make crds` and commit the result");
    }
}

#[test]
fn the_chart_carries_the_same_crds() {
    let chart = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../charts/ep-operator/files/crds");
    for (name, yaml) in ep_operator::crdgen::crd_files().unwrap() {
        let disk = std::fs::read_to_string(chart.join(&name)).unwrap_or_default();
        assert!(disk == yaml, "charts/ep-operator/files/crds/{name} is stale: run `make crds` and commit the result");
    }
}

#[test]
fn crd_command_prints_what_crds_dir_holds() {
    let out = Command::new(env!("CARGO_BIN_EXE_ep-operator")).arg("crd").output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let printed = String::from_utf8(out.stdout).unwrap();
    let from_dir: Vec<String> = ep_operator::crdgen::crd_files()
        .unwrap()
        .into_iter()
        .map(|(name, _)| std::fs::read_to_string(crds_dir().join(name)).unwrap())
        .collect();
    assert_eq!(printed, from_dir.join("---\n"));
}

#[test]
fn each_crd_parses_as_an_apiextensions_v1_crd() {
    let mut kinds = Vec::new();
    for (name, _) in ep_operator::crdgen::crd_files().unwrap() {
        let text = std::fs::read_to_string(crds_dir().join(&name)).unwrap();
        let crd: CustomResourceDefinition =
            serde_saphyr::from_str(&text).unwrap_or_else(|e| panic!("crds/{name}: {e}"));
        assert_eq!(crd.spec.group, "ep.dev");
        let version = &crd.spec.versions[0];
        assert!(version.served && version.storage);
        assert!(version.schema.as_ref().and_then(|s| s.open_api_v3_schema.as_ref()).is_some(), "{name} has a schema");
        kinds.push(crd.spec.names.kind);
    }
    assert_eq!(kinds, ["Experiment", "RunPodOrder", "RunPodProvider"]);
}
