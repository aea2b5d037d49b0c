//! ep-operator: reconciles Experiments, RunPodOrders and RunPodProviders against RunPod, and
//! mirrors every state into the `exp_registry` PostgreSQL schema.

pub mod crdgen;
pub mod registry;
pub mod runpod;
pub mod settings;
