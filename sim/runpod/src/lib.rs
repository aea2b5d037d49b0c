//! `runpod-sim`: a local RunPod for development and tests.
//!
//! It speaks RunPod's GraphQL API (the documents RunPod's own SDKs send), its REST v2 API, and the
//! network volume's S3 API over a local directory; pods run as local processes that see the volume
//! at their mount path. Faults, a faster clock and the whole world state are reachable through
//! `/_sim/...` on the API address.

pub mod admin;
pub mod clock;
pub mod config;
pub mod graphql;
pub mod pods;
pub mod ratelimit;
pub mod rest;
pub mod s3;
pub mod server;
pub mod views;
pub mod world;

use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};

use chrono::{DateTime, Utc};

pub use config::WorldConfig;
pub use server::{Endpoints, RunningSim, SimOptions, start};

/// The simulator's shared state.
#[derive(Debug)]
pub struct Sim {
    pub clock: clock::Clock,
    world: Mutex<world::World>,
    pub api_key: String,
    pub state_dir: PathBuf,
}

impl Sim {
    pub fn new(config: WorldConfig, state_dir: PathBuf, api_key: Option<String>) -> Arc<Self> {
        let api_key = api_key.unwrap_or_else(|| config.api_key.clone());
        Arc::new(Self {
            clock: clock::Clock::new(config.clock_speed),
            world: Mutex::new(world::World::new(config, state_dir.clone())),
            api_key,
            state_dir,
        })
    }

    /// The world, brought up to the current simulated time.
    pub fn world(&self) -> (MutexGuard<'_, world::World>, DateTime<Utc>) {
        let now = self.clock.now();
        let mut w = self.world.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        w.tick(now);
        (w, now)
    }
}
