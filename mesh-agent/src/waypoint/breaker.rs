//! Circuit breaking and outlier detection, per backend service (Envoy's design, which Istio's
//! `DestinationRule` configures). Circuit breaking bounds what a service may have at once:
//! connections, requests waiting for a connection, requests in flight ([`Limits`], each counted
//! by a [`Gate`]); past a bound a request fails at once (503) instead of piling up behind a
//! service that is already behind. Outlier detection ([`Outlier`]) takes an endpoint out of the
//! balancer after consecutive failures, for longer each time it happens again, and never more
//! than a share of the service's endpoints at once. Pure state: time is given by the caller as a
//! [`Duration`] since any fixed instant (tests run on a synthetic clock).

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    time::Duration,
};

use serde::{Deserialize, Serialize};

/// The bounds of one backend service (the waypoint's `limits`), each counted by a [`Gate`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "snake_case", default)]
pub struct Limits {
    /// Connections open to the service's endpoints.
    pub max_connections: usize,
    /// Requests waiting for a connection.
    pub max_pending: usize,
    /// Requests in flight (retries included).
    pub max_requests: usize,
}

impl Default for Limits {
    /// Envoy's defaults: 1024 of each.
    fn default() -> Self {
        Limits {
            max_connections: 1024,
            max_pending: 1024,
            max_requests: 1024,
        }
    }
}

/// A counted bound: at most `max` [`Permit`]s out at once. Cheap to clone; clones share the
/// count.
#[derive(Debug, Clone)]
pub struct Gate {
    inner: Arc<GateInner>,
}

#[derive(Debug)]
struct GateInner {
    max: usize,
    in_use: AtomicUsize,
}

/// One unit of a [`Gate`], given back when dropped.
#[derive(Debug)]
pub struct Permit {
    gate: Arc<GateInner>,
}

impl Gate {
    pub fn new(max: usize) -> Self {
        Gate {
            inner: Arc::new(GateInner {
                max,
                in_use: AtomicUsize::new(0),
            }),
        }
    }

    /// A permit, or `None` when `max` are out (the caller answers 503).
    pub fn try_acquire(&self) -> Option<Permit> {
        let max = self.inner.max;
        self.inner
            .in_use
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .ok()?;
        Some(Permit {
            gate: Arc::clone(&self.inner),
        })
    }

    /// Permits out now.
    pub fn in_use(&self) -> usize {
        self.inner.in_use.load(Ordering::Acquire)
    }
}

impl Permit {
    /// Whether this permit is one of `gate`'s.
    pub fn of(&self, gate: &Gate) -> bool {
        Arc::ptr_eq(&self.gate, &gate.inner)
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.gate.in_use.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Outlier detection's settings (the waypoint's `outlier`). Durations are whole milliseconds
/// in the configuration (`base_ejection_ms`, `max_ejection_ms`), like the waypoint's other
/// durations.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "snake_case", default)]
pub struct OutlierSettings {
    /// Consecutive failures (a 5xx or a failed connect) that eject an endpoint (0: never).
    pub consecutive_errors: u32,
    /// The first ejection's length; the n-th consecutive one lasts n times as long.
    #[serde(rename = "base_ejection_ms", with = "millis")]
    pub base_ejection: Duration,
    /// The longest an ejection lasts, and how long an endpoint must stay back before its next
    /// ejection counts as a first one again.
    #[serde(rename = "max_ejection_ms", with = "millis")]
    pub max_ejection: Duration,
    /// The largest share of a service's endpoints ejected at once, in percent (0: none; one
    /// endpoint may always be ejected otherwise, as in Envoy).
    pub max_ejection_percent: u32,
}

impl Default for OutlierSettings {
    fn default() -> Self {
        OutlierSettings {
            consecutive_errors: 5,
            base_ejection: Duration::from_secs(30),
            max_ejection: Duration::from_secs(300),
            max_ejection_percent: 100,
        }
    }
}

/// A [`Duration`] as whole milliseconds.
mod millis {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        u64::deserialize(d).map(Duration::from_millis)
    }
}

/// An endpoint taken out of the balancer (for logs and metrics).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ejection {
    pub endpoint: SocketAddr,
    /// When it comes back.
    pub until: Duration,
    /// Its ejections in a row, this one included (the length's multiplier).
    pub times: u32,
}

/// Outlier detection for one backend service. Only endpoints with something to remember (a
/// failure since their last success, or an ejection not yet forgiven) take memory.
#[derive(Debug)]
pub struct Outlier {
    settings: OutlierSettings,
    endpoints: HashMap<SocketAddr, EndpointState>,
}

#[derive(Debug, Default)]
struct EndpointState {
    /// Failures since the last success or ejection.
    consecutive: u32,
    /// Ejections in a row: back to 0 once the endpoint has stayed back for `max_ejection`.
    times_ejected: u32,
    /// The end of the last ejection (in the future while ejected).
    until: Option<Duration>,
}

impl EndpointState {
    fn is_ejected(&self, now: Duration) -> bool {
        self.until.is_some_and(|until| now < until)
    }

    /// Forgets past ejections once the endpoint has been back for `max_ejection`.
    fn decay(&mut self, now: Duration, max_ejection: Duration) {
        if let Some(until) = self.until {
            if now >= until.saturating_add(max_ejection) {
                self.times_ejected = 0;
                self.until = None;
            }
        }
    }

    fn is_blank(&self) -> bool {
        self.consecutive == 0 && self.times_ejected == 0 && self.until.is_none()
    }
}

impl Outlier {
    pub fn new(settings: OutlierSettings) -> Self {
        Outlier {
            settings,
            endpoints: HashMap::new(),
        }
    }

    /// The result of a request to `endpoint` (`failed`: a 5xx or a failed connect), the
    /// service having `endpoints` endpoints now; the ejection it causes, if any.
    ///
    /// Results from an endpoint already ejected (requests that were in flight) are ignored.
    /// An ejection refused by `max_ejection_percent` keeps the count, so that the endpoint's
    /// next failure ejects it once there is room. When every endpoint of a service is ejected
    /// the caller should balance over all of them (Envoy's panic routing): this only decides
    /// who is out.
    pub fn on_result(
        &mut self,
        endpoint: SocketAddr,
        failed: bool,
        now: Duration,
        endpoints: usize,
    ) -> Option<Ejection> {
        let max_ejection = self.settings.max_ejection;
        if !failed {
            if let Some(state) = self.endpoints.get_mut(&endpoint) {
                if !state.is_ejected(now) {
                    state.consecutive = 0;
                    state.decay(now, max_ejection);
                }
                if state.is_blank() {
                    self.endpoints.remove(&endpoint);
                }
            }
            return None;
        }
        if self.settings.consecutive_errors == 0 {
            return None;
        }
        let ejected = self.ejected_count(now);
        let state = self.endpoints.entry(endpoint).or_default();
        if state.is_ejected(now) {
            return None;
        }
        state.decay(now, max_ejection);
        state.consecutive = state.consecutive.saturating_add(1);
        if state.consecutive < self.settings.consecutive_errors {
            return None;
        }
        let percent = u64::from(self.settings.max_ejection_percent.min(100));
        let room = percent > 0
            && (ejected == 0 || (ejected as u64 + 1) * 100 <= percent * endpoints as u64);
        if !room {
            return None;
        }
        state.consecutive = 0;
        state.times_ejected = state.times_ejected.saturating_add(1);
        let length = self
            .settings
            .base_ejection
            .saturating_mul(state.times_ejected)
            .min(max_ejection);
        let until = now.saturating_add(length);
        state.until = Some(until);
        Some(Ejection {
            endpoint,
            until,
            times: state.times_ejected,
        })
    }

    /// Whether `endpoint` is out of the balancer now; it comes back by itself at its
    /// ejection's `until`.
    pub fn is_ejected(&self, endpoint: SocketAddr, now: Duration) -> bool {
        self.endpoints
            .get(&endpoint)
            .is_some_and(|s| s.is_ejected(now))
    }

    /// Endpoints out of the balancer now.
    pub fn ejected_count(&self, now: Duration) -> usize {
        self.endpoints
            .values()
            .filter(|s| s.is_ejected(now))
            .count()
    }

    /// Forgets the endpoints `keep` rejects (those the service no longer has), so that they
    /// neither take memory nor count against `max_ejection_percent`.
    pub fn retain(&mut self, mut keep: impl FnMut(&SocketAddr) -> bool) {
        self.endpoints.retain(|e, _| keep(e));
    }
}

#[cfg(test)]
mod tests {
    use std::net::{IpAddr, Ipv4Addr};

    use super::*;

    const A: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1)), 80);
    const B: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, 0, 0, 2)), 80);
    const C: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, 0, 0, 3)), 80);

    fn t(secs: u64) -> Duration {
        Duration::from_secs(secs)
    }

    /// `n` failures of `endpoint` at `now`: the ejection the last one caused.
    fn fail(o: &mut Outlier, endpoint: SocketAddr, n: u32, now: Duration) -> Option<Ejection> {
        let mut last = None;
        for _ in 0..n {
            last = o.on_result(endpoint, true, now, 3);
        }
        last
    }

    #[test]
    fn a_gate_lets_max_through_and_takes_back_on_drop() {
        let gate = Gate::new(2);
        let a = gate.try_acquire().expect("first");
        let b = gate.clone().try_acquire().expect("second, through a clone");
        assert!(gate.try_acquire().is_none(), "third over the limit");
        assert_eq!(gate.in_use(), 2);
        drop(a);
        assert_eq!(gate.in_use(), 1);
        let _c = gate.try_acquire().expect("room again");
        drop(b);
        assert_eq!(gate.in_use(), 1);
        assert!(Gate::new(0).try_acquire().is_none());
    }

    #[test]
    fn settings_have_envoys_defaults_and_reject_unknown_fields() {
        let limits: Limits = serde_yaml::from_str("max_pending: 7").expect("limits");
        assert_eq!(
            limits,
            Limits {
                max_pending: 7,
                ..Limits::default()
            }
        );
        assert_eq!(Limits::default().max_connections, 1024);
        assert!(serde_yaml::from_str::<Limits>("max_conns: 7").is_err());

        let o: OutlierSettings =
            serde_yaml::from_str("base_ejection_ms: 1500\nmax_ejection_percent: 10")
                .expect("outlier");
        assert_eq!(o.base_ejection, Duration::from_millis(1500));
        assert_eq!(o.max_ejection, t(300));
        assert_eq!(o.consecutive_errors, 5);
        assert_eq!(o.max_ejection_percent, 10);
        assert!(serde_yaml::from_str::<OutlierSettings>("base_ejection: 1500").is_err());
        // What the admin endpoint dumps reads back the same.
        let dumped = serde_yaml::to_string(&o).expect("serialise");
        assert!(dumped.contains("base_ejection_ms: 1500"), "{dumped}");
        assert_eq!(
            serde_yaml::from_str::<OutlierSettings>(&dumped).ok(),
            Some(o)
        );
    }

    #[test]
    fn ejected_after_n_consecutive_failures_and_not_before() {
        let mut o = Outlier::new(OutlierSettings::default());
        assert_eq!(fail(&mut o, A, 4, t(1)), None);
        assert!(!o.is_ejected(A, t(1)));
        let e = fail(&mut o, A, 1, t(1)).expect("the fifth failure ejects");
        assert_eq!(
            e,
            Ejection {
                endpoint: A,
                until: t(31),
                times: 1
            }
        );
        assert!(o.is_ejected(A, t(1)));
        assert!(!o.is_ejected(B, t(1)));
        assert_eq!(o.ejected_count(t(1)), 1);
    }

    #[test]
    fn a_success_resets_the_count() {
        let mut o = Outlier::new(OutlierSettings::default());
        fail(&mut o, A, 4, t(1));
        assert_eq!(o.on_result(A, false, t(1), 3), None);
        assert_eq!(fail(&mut o, A, 4, t(1)), None, "counting from 0 again");
        assert!(fail(&mut o, A, 1, t(1)).is_some());
    }

    #[test]
    fn an_endpoint_returns_after_its_ejection_and_the_next_lasts_longer() {
        let mut o = Outlier::new(OutlierSettings::default());
        let first = fail(&mut o, A, 5, t(0)).expect("ejected");
        assert_eq!(first.until, t(30));
        assert!(o.is_ejected(A, t(29)));
        assert!(!o.is_ejected(A, t(30)), "back by itself");
        assert_eq!(o.ejected_count(t(30)), 0);
        // Failures while ejected (requests in flight) do not count.
        assert_eq!(fail(&mut o, A, 10, t(10)), None);
        // Back, failing again: twice as long.
        assert_eq!(fail(&mut o, A, 4, t(40)), None);
        let second = fail(&mut o, A, 1, t(40)).expect("ejected again");
        assert_eq!((second.until, second.times), (t(100), 2));
    }

    #[test]
    fn ejections_are_capped_and_forgiven_after_max_ejection() {
        let mut o = Outlier::new(OutlierSettings {
            base_ejection: t(100),
            max_ejection: t(250),
            ..OutlierSettings::default()
        });
        let mut now = t(0);
        let mut lengths = Vec::new();
        for _ in 0..4 {
            let e = fail(&mut o, A, 5, now).expect("ejected");
            lengths.push(e.until - now);
            // Back for less than max_ejection: still counts as a repeat offender.
            now = e.until + t(10);
        }
        assert_eq!(lengths, [t(100), t(200), t(250), t(250)]);
        // Back for a full max_ejection: a first ejection again.
        let back = now - t(10);
        let e = fail(&mut o, A, 5, back + t(250)).expect("ejected");
        assert_eq!((e.until - (back + t(250)), e.times), (t(100), 1));
    }

    #[test]
    fn no_more_than_the_percent_is_ejected() {
        let mut o = Outlier::new(OutlierSettings {
            max_ejection_percent: 50,
            ..OutlierSettings::default()
        });
        let eject = |o: &mut Outlier, e, now| {
            let mut last = None;
            for _ in 0..5 {
                last = o.on_result(e, true, now, 4);
            }
            last
        };
        // 50% of 4: two.
        assert!(eject(&mut o, A, t(0)).is_some());
        assert!(eject(&mut o, B, t(5)).is_some());
        assert_eq!(eject(&mut o, C, t(5)), None, "a third would be 75%");
        assert!(!o.is_ejected(C, t(5)));
        // A comes back (B is still out): C's next failure ejects it.
        assert!(o.on_result(C, true, t(30), 4).is_some());
        assert_eq!(o.ejected_count(t(30)), 2);

        // One endpoint may always be ejected, even where the percent rounds down to none...
        let mut o = Outlier::new(OutlierSettings {
            max_ejection_percent: 10,
            ..OutlierSettings::default()
        });
        assert!(eject(&mut o, A, t(0)).is_some());
        assert_eq!(eject(&mut o, B, t(0)), None);
        // ...but none at 0%.
        let mut o = Outlier::new(OutlierSettings {
            max_ejection_percent: 0,
            ..OutlierSettings::default()
        });
        assert_eq!(eject(&mut o, A, t(0)), None);
    }

    #[test]
    fn forgotten_endpoints_do_not_count() {
        let mut o = Outlier::new(OutlierSettings::default());
        fail(&mut o, A, 5, t(0)).expect("ejected");
        o.retain(|e| *e != A);
        assert!(!o.is_ejected(A, t(0)));
        assert_eq!(o.ejected_count(t(0)), 0);
        // A success of an endpoint with nothing to remember leaves nothing behind.
        o.on_result(B, true, t(0), 3);
        o.on_result(B, false, t(0), 3);
        assert!(o.endpoints.is_empty());
    }
}
