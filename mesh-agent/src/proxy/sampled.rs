//! Sampling of the per-connection log lines a peer can provoke at will (policy denials, bad
//! HBONE requests, early resets): each one is always counted in the metrics, but the log of a
//! pod gets at most [`LINES_PER_SECOND`] of them, and the next line logged says how many were
//! left out meanwhile.

use std::{
    sync::Mutex,
    time::{Duration, Instant},
};

/// Lines a pod's sampler lets through per second.
pub const LINES_PER_SECOND: u32 = 10;

/// One pod's sampler.
#[derive(Debug)]
pub struct LogSampler {
    window: Mutex<Window>,
}

#[derive(Debug)]
struct Window {
    start: Instant,
    lines: u32,
    left_out: u64,
}

impl Default for LogSampler {
    fn default() -> Self {
        LogSampler {
            window: Mutex::new(Window {
                start: Instant::now(),
                lines: 0,
                left_out: 0,
            }),
        }
    }
}

impl LogSampler {
    /// `Some(left out since the last line logged)` when this line may be logged, `None` when it
    /// is left out (it is counted for the next one).
    pub fn admit(&self) -> Option<u64> {
        self.admit_at(Instant::now())
    }

    fn admit_at(&self, now: Instant) -> Option<u64> {
        let mut w = self.window.lock().unwrap_or_else(|e| e.into_inner());
        if now.saturating_duration_since(w.start) >= Duration::from_secs(1) {
            w.start = now;
            w.lines = 0;
        }
        if w.lines < LINES_PER_SECOND {
            w.lines += 1;
            Some(std::mem::take(&mut w.left_out))
        } else {
            w.left_out += 1;
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flood_is_sampled_and_the_next_line_says_how_much_was_left_out() {
        let sampler = LogSampler::default();
        let t0 = Instant::now();
        let admitted = (0..1000).filter(|_| sampler.admit_at(t0).is_some()).count();
        assert_eq!(admitted, LINES_PER_SECOND as usize);
        // Still within the second: left out.
        assert_eq!(sampler.admit_at(t0 + Duration::from_millis(999)), None);
        // A second later the next line is logged and says how many were not.
        let next = sampler.admit_at(t0 + Duration::from_secs(1));
        assert_eq!(next, Some(1000 - u64::from(LINES_PER_SECOND) + 1));
        assert_eq!(sampler.admit_at(t0 + Duration::from_secs(1)), Some(0));
    }
}
