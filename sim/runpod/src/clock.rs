//! The simulated clock: real time scaled by a speed factor, plus manual advances.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};

/// Simulated time. Billing, start delays and terminateAfter all read it.
#[derive(Debug)]
pub struct Clock {
    start_real: Instant,
    start_sim: DateTime<Utc>,
    speed: f64,
    advanced: Mutex<Duration>,
}

impl Clock {
    /// A clock starting at the real current time, running `speed` times faster.
    pub fn new(speed: f64) -> Self {
        Self {
            start_real: Instant::now(),
            start_sim: Utc::now(),
            speed: speed.max(0.0),
            advanced: Mutex::new(Duration::ZERO),
        }
    }

    /// Simulated now.
    pub fn now(&self) -> DateTime<Utc> {
        let real = self.start_real.elapsed().as_secs_f64() * self.speed;
        let advanced = *self.advanced.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let sim = Duration::from_secs_f64(real) + advanced;
        self.start_sim + chrono::Duration::from_std(sim).unwrap_or(chrono::Duration::MAX)
    }

    /// Jumps forward.
    pub fn advance(&self, by: Duration) {
        *self.advanced.lock().unwrap_or_else(std::sync::PoisonError::into_inner) += by;
    }

    /// The speed factor.
    pub fn speed(&self) -> f64 {
        self.speed
    }
}
