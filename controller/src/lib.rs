//! ep-operator: reconciles Experiments, RunPodOrders and RunPodProviders against RunPod, and
//! mirrors every state into the `exp_registry` PostgreSQL schema.

pub mod context;
pub mod crdgen;
pub mod experiment;
#[cfg(test)]
mod fixtures;
pub mod metrics;
pub mod mirror;
pub mod names;
pub mod order;
pub mod provider;
pub mod registry;
pub mod run;
pub mod runpod;
pub mod settings;
pub mod time;
