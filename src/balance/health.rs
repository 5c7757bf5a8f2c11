//! Passive health: an endpoint whose connects fail is skipped for a back-off
//! that doubles with each further failure, while other endpoints are usable.
//! Pure: the clock is an argument. Shared by all data-plane threads.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use dashmap::DashMap;

#[derive(Debug, Clone, Copy)]
struct Failing {
    until: Instant,
    backoff: Duration,
}

/// Endpoints currently backed off after failed connects.
#[derive(Debug)]
pub struct PassiveHealth {
    failing: DashMap<SocketAddr, Failing>,
    /// Entries in `failing`, so the common case (none) costs one atomic load.
    count: AtomicUsize,
    initial: Duration,
    max: Duration,
}

impl Default for PassiveHealth {
    fn default() -> Self {
        Self::new(Duration::from_secs(1), Duration::from_secs(30))
    }
}

impl PassiveHealth {
    /// Back-off starts at `initial` and doubles up to `max`.
    pub fn new(initial: Duration, max: Duration) -> Self {
        Self {
            failing: DashMap::new(),
            count: AtomicUsize::new(0),
            initial,
            max,
        }
    }

    /// Records a failed connect to `ep` at `now`.
    pub fn failed(&self, ep: SocketAddr, now: Instant) {
        let mut e = self.failing.entry(ep).or_insert_with(|| {
            self.count.fetch_add(1, Ordering::Relaxed);
            Failing {
                until: now,
                backoff: Duration::ZERO,
            }
        });
        let backoff = if e.backoff.is_zero() {
            self.initial
        } else {
            (e.backoff * 2).min(self.max)
        };
        *e = Failing {
            until: now + backoff,
            backoff,
        };
    }

    /// Records a successful connect: `ep` is healthy again.
    pub fn succeeded(&self, ep: SocketAddr) {
        if self.count.load(Ordering::Relaxed) > 0 && self.failing.remove(&ep).is_some() {
            self.count.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// Whether `ep` is backed off at `now`.
    #[inline]
    pub fn is_failing(&self, ep: &SocketAddr, now: Instant) -> bool {
        self.count.load(Ordering::Relaxed) > 0
            && self.failing.get(ep).is_some_and(|f| now < f.until)
    }

    /// How much longer `ep` stays backed off at `now`, if it is (for
    /// `ringvip explain`; not for the data path).
    pub fn backed_off_for(&self, ep: &SocketAddr, now: Instant) -> Option<Duration> {
        self.failing
            .get(ep)
            .map(|f| f.until.saturating_duration_since(now))
            .filter(|left| !left.is_zero())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ep(i: u8) -> SocketAddr {
        SocketAddr::from(([10, 0, 0, i], 80))
    }

    #[test]
    fn backoff_doubles_up_to_max_and_success_clears() {
        let h = PassiveHealth::new(Duration::from_secs(1), Duration::from_secs(3));
        let t0 = Instant::now();
        assert!(!h.is_failing(&ep(1), t0));
        h.failed(ep(1), t0);
        assert!(h.is_failing(&ep(1), t0 + Duration::from_millis(999)));
        assert!(!h.is_failing(&ep(1), t0 + Duration::from_secs(1)));
        // second failure: 2 s; third: capped at 3 s
        h.failed(ep(1), t0 + Duration::from_secs(1));
        assert!(h.is_failing(&ep(1), t0 + Duration::from_millis(2999)));
        h.failed(ep(1), t0 + Duration::from_secs(3));
        assert!(h.is_failing(&ep(1), t0 + Duration::from_millis(5999)));
        assert!(!h.is_failing(&ep(1), t0 + Duration::from_secs(6)));
        assert!(!h.is_failing(&ep(2), t0));
        h.succeeded(ep(1));
        h.failed(ep(1), t0 + Duration::from_secs(10));
        // after a success the back-off starts over at 1 s
        assert!(!h.is_failing(&ep(1), t0 + Duration::from_secs(11)));
    }
}
