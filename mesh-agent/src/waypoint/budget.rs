//! The retry budget: retries may add at most a share of the requests' own rate (default 20%),
//! plus a small floor so that a quiet service can still retry, so that retries never multiply
//! an outage (Finagle's and Linkerd's design). Each request deposits `percent`% of a token, each
//! retry withdraws one; deposits expire after `ttl`, so the budget follows the recent rate. One
//! budget per backend service, shared by its requests. Time is given by the caller (tests run
//! on a synthetic clock).

use std::{collections::VecDeque, time::Duration};

/// A budget's settings (the waypoint's `retry_budget`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Settings {
    /// Retries allowed, as a percentage of the requests (20: retries add at most 20% to the
    /// load; at most 100).
    pub percent: u32,
    /// Retries allowed per second whatever the rate (so that a quiet service retries at all).
    pub min_per_second: u32,
    /// How long a deposit counts.
    pub ttl: Duration,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            percent: 20,
            min_per_second: 10,
            ttl: Duration::from_secs(10),
        }
    }
}

/// A retry budget. Time is a [`Duration`] since any fixed instant, never going back.
#[derive(Debug)]
pub struct Budget {
    settings: Settings,
    /// Deposits (in thousandths of a retry, so that sums are exact) by the second they were
    /// made, oldest first.
    deposits: VecDeque<(u64, u64)>,
    /// Withdrawals by second, oldest first, in the same unit.
    withdrawals: VecDeque<(u64, u64)>,
}

/// One retry, in the budget's unit.
const RETRY: u64 = 1000;

impl Budget {
    pub fn new(settings: Settings) -> Self {
        Budget {
            settings,
            deposits: VecDeque::new(),
            withdrawals: VecDeque::new(),
        }
    }

    /// A request was sent (its first try).
    pub fn deposit(&mut self, now: Duration) {
        let second = now.as_secs();
        // At most one retry per request: beyond 100% is 100%.
        let share = u64::from(self.settings.percent.min(100)) * RETRY / 100;
        add(&mut self.deposits, second, share);
    }

    /// Whether a retry may be sent now; if so, it is counted.
    pub fn try_withdraw(&mut self, now: Duration) -> bool {
        let second = now.as_secs();
        let ttl = self.settings.ttl.as_secs().max(1);
        let oldest = second.saturating_sub(ttl - 1);
        for queue in [&mut self.deposits, &mut self.withdrawals] {
            while queue.front().is_some_and(|(s, _)| *s < oldest) {
                queue.pop_front();
            }
        }
        let deposited: u64 = self.deposits.iter().map(|(_, t)| t).sum();
        let withdrawn: u64 = self.withdrawals.iter().map(|(_, t)| t).sum();
        let floor = u64::from(self.settings.min_per_second) * ttl * RETRY;
        if deposited + floor >= withdrawn + RETRY {
            add(&mut self.withdrawals, second, RETRY);
            true
        } else {
            false
        }
    }
}

fn add(queue: &mut VecDeque<(u64, u64)>, second: u64, tokens: u64) {
    match queue.back_mut() {
        Some((s, t)) if *s == second => *t += tokens,
        _ => queue.push_back((second, tokens)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `rate` requests per second for `secs` seconds, each failing and retried as long as the
    /// budget allows (at most `tries` retries each): the retries sent.
    fn storm(budget: &mut Budget, rate: u32, secs: u32, tries: u32) -> u32 {
        let mut retries = 0;
        for i in 0..rate * secs {
            let now = Duration::from_secs_f64(f64::from(i) / f64::from(rate));
            budget.deposit(now);
            for _ in 0..tries {
                if budget.try_withdraw(now) {
                    retries += 1;
                } else {
                    break;
                }
            }
        }
        retries
    }

    #[test]
    fn an_outage_gets_its_share_of_retries_and_no_more() {
        // 1,000 requests/s for a minute, every one failing, each wanting 3 retries: without a
        // budget 180,000 retries (4x the load); with it, 20% plus the floor.
        let mut budget = Budget::new(Settings::default());
        let retries = storm(&mut budget, 1000, 60, 3);
        let requests = 60_000.0;
        let share = f64::from(retries) / requests;
        assert!(
            (0.2..=0.2 + 0.02).contains(&share),
            "{retries} retries for {requests} requests ({share:.3})"
        );
    }

    #[test]
    fn a_quiet_service_still_retries_up_to_the_floor() {
        // 1 request/s for 30 s, each wanting 3 retries: the floor (10/s) allows all 90.
        let mut budget = Budget::new(Settings::default());
        assert_eq!(storm(&mut budget, 1, 30, 3), 90);
        // With no floor, 20% of 30 requests: 6.
        let mut budget = Budget::new(Settings {
            min_per_second: 0,
            ..Settings::default()
        });
        assert_eq!(storm(&mut budget, 1, 30, 3), 6);
    }

    #[test]
    fn the_budget_follows_the_recent_rate() {
        let mut budget = Budget::new(Settings {
            min_per_second: 0,
            ..Settings::default()
        });
        // A busy minute fills the budget; 20 s of silence empties it.
        for i in 0..60_000u32 {
            budget.deposit(Duration::from_millis(u64::from(i)));
        }
        assert!(budget.try_withdraw(Duration::from_secs(60)));
        assert!(
            !budget.try_withdraw(Duration::from_secs(80)),
            "deposits expired"
        );
    }
}
