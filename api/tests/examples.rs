//! The examples people apply as they are: every document parses as its kind, custom resources
//! pass their CEL rules, and the code ConfigMap is in sync with train.py.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers panic on setup failure by design

use std::path::Path;

use ep_api::{Experiment, RunPodProvider};
use serde_json::Value;

#[test]
fn quickstart_documents_are_valid() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/quickstart");
    let mut kinds = Vec::new();
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    for f in files {
        let text = std::fs::read_to_string(&f).unwrap();
        let docs: Vec<Value> =
            serde_saphyr::from_str_multiple(&text).unwrap_or_else(|e| panic!("{}: {e}", f.display()));
        for d in docs {
            let kind = d["kind"].as_str().unwrap().to_owned();
            match kind.as_str() {
                "Experiment" => serde_json::from_value::<Experiment>(d).unwrap().validate_cel().unwrap(),
                "RunPodProvider" => serde_json::from_value::<RunPodProvider>(d).unwrap().validate_cel().unwrap(),
                "ConfigMap" => {
                    let train = std::fs::read_to_string(dir.join("train.py")).unwrap();
                    assert_eq!(
                        d["data"]["train.py"].as_str(),
                        Some(train.as_str()),
                        "40-code.configmap.yaml is stale: run `make examples`"
                    );
                }
                _ => {}
            }
            kinds.push(kind);
        }
    }
    assert_eq!(kinds, ["Namespace", "Namespace", "Secret", "Secret", "RunPodProvider", "Experiment", "ConfigMap"]);
}
