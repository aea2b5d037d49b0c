//! ep-operator: reconciles Experiments, RunPodOrders and RunPodProviders against RunPod, and
//! projects every state into the `exp_registry` PostgreSQL schema.

pub mod context;
pub mod crdgen;
pub mod error;
pub mod events;
pub mod experiment;
pub mod failpoint;
#[cfg(test)]
mod fixtures;
pub mod index;
pub mod lenient;
pub mod metrics;
pub mod names;
pub mod order;
pub mod pool;
pub mod projection;
pub mod provider;
pub mod reason;
pub mod registry;
pub mod run;
pub mod runpod;
pub mod settings;
pub mod slots;
pub mod time;
