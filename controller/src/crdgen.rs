//! CRD YAML generated from the Rust types in `ep-api` (the single source of truth for `crds/`).

/// Header of every generated file.
pub const HEADER: &str = "# Generated from the types in api/ by `make crds` (ep-operator crd). Do not edit.\n";

/// One `(file name, YAML)` per CRD, in the order `ep-operator crd` prints them.
pub fn crd_files() -> Result<Vec<(String, String)>, serde_saphyr::ser_error::Error> {
    ep_api::crds()
        .into_iter()
        .map(|crd| {
            let name = crd.metadata.name.clone().unwrap_or_default();
            Ok((format!("{name}.yaml"), format!("{HEADER}{}", serde_saphyr::to_string(&crd)?)))
        })
        .collect()
}

/// All CRDs as one multi-document YAML stream.
pub fn crd_stream() -> Result<String, serde_saphyr::ser_error::Error> {
    Ok(crd_files()?.into_iter().map(|(_, yaml)| yaml).collect::<Vec<_>>().join("---\n"))
}
