//! Choosing where a request goes: a backend Service by the route's weights ([`weighted`]),
//! then one of its endpoints by the power of two choices over peak-EWMA latency ([`PeakEwma`],
//! [`two_choices`]): of two endpoints drawn at random, the one whose latency estimate times
//! its requests in flight is lower. Peak-EWMA jumps to a slower response at once and decays
//! toward faster ones, so an endpoint that slows down sheds load quickly (Finagle's and
//! Linkerd's balancer). Pure: randomness and time are the caller's.

use std::time::Duration;

/// The backend a roll lands on: `roll` uniform in `0..total` where `total` is the sum of
/// `weights`; `None` when every weight is 0 (no backend takes requests: answered 500).
pub fn weighted(weights: &[u32], roll: u64) -> Option<usize> {
    let total: u64 = weights.iter().map(|w| u64::from(*w)).sum();
    if total == 0 {
        return None;
    }
    let mut left = roll % total;
    for (i, w) in weights.iter().enumerate() {
        let w = u64::from(*w);
        if left < w {
            return Some(i);
        }
        left -= w;
    }
    None
}

/// The latency estimate of one endpoint.
#[derive(Debug, Clone)]
pub struct PeakEwma {
    /// How fast the estimate forgets: the time constant of the decay.
    decay: Duration,
    /// The estimate, in nanoseconds.
    estimate: f64,
    /// When it was last updated.
    updated: Duration,
    /// Requests in flight to the endpoint.
    pending: u32,
}

/// What a new endpoint is assumed to take until measured (a guess on the slow side, so that a
/// new endpoint is tried without being flooded).
pub const DEFAULT_RTT: Duration = Duration::from_millis(30);
/// The decay's time constant.
pub const DEFAULT_DECAY: Duration = Duration::from_secs(10);

impl PeakEwma {
    pub fn new(now: Duration) -> Self {
        PeakEwma {
            decay: DEFAULT_DECAY,
            estimate: DEFAULT_RTT.as_nanos() as f64,
            updated: now,
            pending: 0,
        }
    }

    /// A request starts.
    pub fn start(&mut self) {
        self.pending = self.pending.saturating_add(1);
    }

    /// A request ended after `rtt` (a failure counts with the time it took).
    pub fn end(&mut self, rtt: Duration, now: Duration) {
        self.pending = self.pending.saturating_sub(1);
        let rtt = rtt.as_nanos() as f64;
        // A slower response is taken at once; a faster one pulls the estimate down by how
        // long it has been since the last one, over the decay's time constant.
        self.estimate = if rtt > self.estimate {
            rtt
        } else {
            let elapsed = now.saturating_sub(self.updated).as_secs_f64();
            let w = (-elapsed / self.decay.as_secs_f64()).exp();
            self.estimate * w + rtt * (1.0 - w)
        };
        self.updated = now;
    }

    /// The load: the estimate times the requests in flight (plus the one to be sent).
    pub fn load(&self) -> f64 {
        self.estimate * f64::from(self.pending + 1)
    }
}

/// Of endpoints `a` and `b` (drawn at random by the caller, distinct when there are two or
/// more), the one with the lower load.
pub fn two_choices(loads: &[f64], a: usize, b: usize) -> usize {
    if loads[b] < loads[a] {
        b
    } else {
        a
    }
}

#[cfg(test)]
mod tests {
    use rand::{rngs::StdRng, Rng, SeedableRng};

    use super::*;

    #[test]
    fn a_90_10_split_lands_within_3_percent() {
        let mut rng = StdRng::seed_from_u64(7);
        let weights = [90, 10];
        let mut counts = [0u32; 2];
        for _ in 0..2_000 {
            let i = weighted(&weights, rng.random()).expect("a backend");
            counts[i] += 1;
        }
        let share = f64::from(counts[1]) / 2_000.0;
        assert!((0.07..=0.13).contains(&share), "{counts:?}");
    }

    #[test]
    fn weights_of_zero_take_nothing() {
        assert_eq!(weighted(&[0, 0], 5), None);
        assert_eq!(weighted(&[], 5), None);
        for roll in 0..100 {
            assert_eq!(weighted(&[0, 3, 0], roll), Some(1));
        }
        assert_eq!(weighted(&[1, 1], 0), Some(0));
        assert_eq!(weighted(&[1, 1], 1), Some(1));
        assert_eq!(weighted(&[1, 1], u64::MAX), Some(1));
    }

    #[test]
    fn a_slow_endpoint_sheds_load_at_once_and_recovers_slowly() {
        let t = Duration::from_secs;
        let mut fast = PeakEwma::new(t(0));
        let mut slow = PeakEwma::new(t(0));
        for s in 1..=20 {
            fast.start();
            fast.end(Duration::from_millis(5), t(s));
            slow.start();
            slow.end(Duration::from_millis(5), t(s));
        }
        // One slow response: the estimate jumps to it.
        slow.start();
        slow.end(Duration::from_millis(500), t(21));
        assert!(slow.load() > 50.0 * fast.load());
        let loads = [fast.load(), slow.load()];
        assert_eq!(two_choices(&loads, 0, 1), 0);
        assert_eq!(two_choices(&loads, 1, 0), 0);
        // Fast answers pull it down over the decay's time, not at once.
        slow.start();
        slow.end(Duration::from_millis(5), t(22));
        let after_one = slow.load();
        assert!(after_one > 0.8 * 500e6, "{after_one}");
        for s in 23..=80 {
            slow.start();
            slow.end(Duration::from_millis(5), t(s));
        }
        assert!(slow.load() < 2.0 * fast.load(), "recovered");
    }

    #[test]
    fn requests_in_flight_count() {
        let t = Duration::from_secs;
        let (mut a, b) = (PeakEwma::new(t(0)), PeakEwma::new(t(0)));
        a.start();
        a.start();
        assert!((a.load() - 3.0 * b.load()).abs() < 1.0);
        assert_eq!(two_choices(&[a.load(), b.load()], 0, 1), 1);
    }
}
