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

    /// The simulated instant of a wall-clock instant a client named (terminateAfter, stopAfter):
    /// as far ahead of simulated now as it is of real now, scaled by the speed. A client computes
    /// such deadlines from its own (real) clock; read against the faster simulated clock as they
    /// are, every pod would end minutes early in real time.
    pub fn from_wall(&self, wall: DateTime<Utc>) -> DateTime<Utc> {
        let ahead = (wall - Utc::now()).as_seconds_f64() * self.speed;
        self.now() + chrono::Duration::milliseconds((ahead * 1000.0) as i64)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_wall_clock_deadline_passes_when_real_time_reaches_it() {
        let c = Clock::new(60.0);
        let deadline = c.from_wall(Utc::now() + chrono::Duration::seconds(2));
        let ahead = (deadline - c.now()).as_seconds_f64();
        // Two real seconds ahead is two minutes of simulated time at 60x.
        assert!((118.0..=120.5).contains(&ahead), "{ahead}");
    }
}
