//! The sandbox provider's clock: real time, or real time sped up by the
//! `--time-scale` factor (N simulated seconds per real second), so that the
//! 12 h and 24 h timeout notices can be tested in seconds.
//!
//! Receipts carry the simulated time (signingTime and daticert), so that
//! the intervals between them are the simulated ones a gateway reasons on.

use std::time::{Duration, Instant};

use jiff::{SignedDuration, Timestamp};

/// A clock that runs `scale` times faster than real time from its start.
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    start_real: Instant,
    start_sim: Timestamp,
    scale: f64,
}

impl Clock {
    /// A clock starting now (`now` is the real time at this instant).
    pub fn new(now: Timestamp, scale: f64) -> Clock {
        Clock {
            start_real: Instant::now(),
            start_sim: now,
            scale: if scale.is_finite() && scale >= 1.0 {
                scale
            } else {
                1.0
            },
        }
    }

    /// The scale factor.
    pub fn scale(&self) -> f64 {
        self.scale
    }

    /// The simulated current time (whole seconds: daticert and signingTime
    /// have seconds precision).
    pub fn now(&self) -> Timestamp {
        let real = self.start_real.elapsed().as_secs_f64();
        let sim = SignedDuration::from_secs_f64(real * self.scale);
        let t = self.start_sim + sim;
        Timestamp::from_second(t.as_second()).unwrap_or(t)
    }

    /// The real duration corresponding to `simulated` seconds.
    pub fn real(&self, simulated: f64) -> Duration {
        Duration::from_secs_f64((simulated.max(0.0)) / self.scale)
    }

    /// Sleeps for `simulated` seconds of this clock.
    pub async fn sleep(&self, simulated: f64) {
        tokio::time::sleep(self.real(simulated)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scaled_durations() {
        let c = Clock::new(Timestamp::UNIX_EPOCH, 3600.0);
        assert_eq!(c.real(3600.0), Duration::from_secs(1));
        assert_eq!(c.real(-5.0), Duration::ZERO);
        let one = Clock::new(Timestamp::UNIX_EPOCH, 0.0);
        assert!((one.scale() - 1.0).abs() < f64::EPSILON);
    }
}
