//! `ep-api`: the types every part of ep-operator agrees on.
//!
//! - [`experiment`], [`order`], [`provider`]: the custom resources of API group `ep.dev/v1alpha1`.
//! - [`volume`]: the files exchanged through the RunPod network volume (run spec, manifests,
//!   heartbeats, terminal files) and the key layout under `ep/`.
//! - [`duration`]: durations in Kubernetes / Go syntax.
//!
//! No client code lives here: nothing in this crate talks to a server.

// kube's derive takes one `printcolumn(...)` per column; clippy reads the repeats as duplicates.
#![allow(clippy::duplicated_attributes)]

pub mod common;
pub mod duration;
pub mod experiment;
pub mod order;
pub mod provider;
pub mod volume;

pub use common::*;
pub use duration::GoDuration;
pub use experiment::{Experiment, ExperimentSpec, ExperimentStatus};
pub use order::{RunPodOrder, RunPodOrderSpec, RunPodOrderStatus};
pub use provider::{RunPodProvider, RunPodProviderSpec, RunPodProviderStatus};

/// API group of every ep-operator resource.
pub const GROUP: &str = "ep.dev";
/// API version of every ep-operator resource.
pub const VERSION: &str = "v1alpha1";

/// All CRDs, in the order `ep-operator crd` prints them and `crds/` stores them.
pub fn crds() -> Vec<k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition> {
    use kube::CustomResourceExt;
    vec![Experiment::crd(), RunPodOrder::crd(), RunPodProvider::crd()]
}
