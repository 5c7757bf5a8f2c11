//! The proxy's readiness model, kube-proxy's (`pkg/proxy/healthcheck/proxy_health.go`):
//! unhealthy when an update has been queued for at least the health timeout
//! without being applied; `/healthz` also fails while this Node is being
//! deleted. The control loop writes it (queued, applied, Node deletion); the
//! admin and `healthCheckNodePort` servers only read it.
//!
//! One difference, on purpose: kube-proxy only judges an IP family once it has
//! synced at least once, so a first sync that never finishes stays "healthy"
//! forever. Here an update queued before the first apply counts like any other.

use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

/// Shared health state, written by the store/app, read by the HTTP server.
/// Not on the data path: a std `Mutex` held for a few instructions.
#[derive(Debug, Default)]
pub struct Health {
    state: Mutex<HealthState>,
}

#[derive(Debug, Default)]
struct HealthState {
    /// When the oldest update not yet applied arrived.
    oldest_pending: Option<SystemTime>,
    /// When the data plane last caught up with everything queued.
    last_updated: Option<SystemTime>,
    node_deleting: bool,
}

/// The health of the proxy at one instant; see [`Health::report`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HealthReport {
    /// No update has been pending for the health timeout or longer.
    /// Does not include [`HealthReport::node_deleting`].
    pub healthy: bool,
    /// This Node is being deleted (deletionTimestamp set, or tainted
    /// `ToBeDeletedByClusterAutoscaler`).
    pub node_deleting: bool,
    /// When the data plane last applied everything queued; `None` before the
    /// first apply.
    pub last_updated: Option<SystemTime>,
    /// The `now` the report was made for.
    pub current_time: SystemTime,
}

impl HealthReport {
    /// What `/healthz` reports: healthy and the Node is not being deleted.
    pub fn healthz(&self) -> bool {
        self.healthy && !self.node_deleting
    }
}

impl Health {
    /// Healthy, nothing pending, nothing applied yet, Node eligible.
    pub fn new() -> Health {
        Health::default()
    }

    fn lock(&self) -> MutexGuard<'_, HealthState> {
        // The state is plain data always left consistent, so a panic in
        // another holder does not make it unusable.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// An update arrived at `at` and is not yet applied. The oldest pending
    /// time is kept until [`Health::applied`].
    pub fn queued(&self, at: SystemTime) {
        let mut s = self.lock();
        s.oldest_pending = Some(match s.oldest_pending {
            Some(t) if t <= at => t,
            _ => at,
        });
    }

    /// The data plane now uses everything queued so far: clears the pending
    /// time and records `at` as the last update.
    pub fn applied(&self, at: SystemTime) {
        let mut s = self.lock();
        s.oldest_pending = None;
        s.last_updated = Some(at);
    }

    /// Mark this Node as being deleted (or not any more).
    pub fn set_node_deleting(&self, v: bool) {
        self.lock().node_deleting = v;
    }

    /// The health at `now`: unhealthy when an update has been pending since
    /// `T` and `now - T >= timeout` (kube-proxy's comparison). A pending time
    /// in the future of `now` (clock stepped back) counts as fresh.
    pub fn report(&self, now: SystemTime, timeout: Duration) -> HealthReport {
        let s = self.lock();
        let healthy = match s.oldest_pending {
            None => true,
            Some(t) => now.duration_since(t).map_or(true, |age| age < timeout),
        };
        HealthReport {
            healthy,
            node_deleting: s.node_deleting,
            last_updated: s.last_updated,
            current_time: now,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::UNIX_EPOCH;

    const TIMEOUT: Duration = Duration::from_secs(1);

    fn at(secs: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(secs)
    }

    #[test]
    fn report_pending_and_applied() {
        let h = Health::new();
        let r = h.report(at(1000), TIMEOUT);
        assert!(r.healthy && !r.node_deleting && r.healthz());
        assert_eq!(r.last_updated, None);
        assert_eq!(r.current_time, at(1000));

        h.queued(at(1000));
        h.queued(at(1005)); // keeps the oldest
        assert!(h.report(at(1000), TIMEOUT).healthy);
        assert!(
            !h.report(at(1001), TIMEOUT).healthy,
            "age == timeout is late"
        );
        assert!(!h.report(at(1003), TIMEOUT).healthy);
        // A pending time in the future of `now` counts as fresh.
        assert!(h.report(at(900), TIMEOUT).healthy);

        h.applied(at(1010));
        let r = h.report(at(2000), TIMEOUT);
        assert!(r.healthy);
        assert_eq!(r.last_updated, Some(at(1010)));

        // An older out-of-order time replaces a newer pending one.
        h.queued(at(2000));
        h.queued(at(1990));
        assert!(!h.report(at(1995), Duration::from_secs(5)).healthy);

        h.set_node_deleting(true);
        let r = h.report(at(1990), TIMEOUT);
        assert!(r.healthy && r.node_deleting && !r.healthz());
    }
}
