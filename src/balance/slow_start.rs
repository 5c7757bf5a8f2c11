//! Slow start (Envoy's `slow_start_config`, aggression 1.0): an endpoint that
//! becomes usable takes a share of new connections that grows linearly over
//! the window, from [`MIN_WEIGHT`] of its normal share to all of it.
//!
//! "Became usable" is when the endpoint joined the Service port's usable set,
//! not when a snapshot was compiled: [`Joined`] keeps those times in the
//! compile cache across recompiles, and each compiled frontend carries them
//! as a [`Warmup`]. Pure: the clock is an argument everywhere.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::balance::affinity::PortId;
use crate::model::{ObjectKey, TrafficPolicy};

/// Weight of an endpoint that has just joined (Envoy's `min_weight_percent`
/// default, 10%): enough that it gets some traffic and so a first check.
pub const MIN_WEIGHT: f64 = 0.1;

/// An endpoint's weight `since` it joined, at `now`: linear from
/// [`MIN_WEIGHT`] to 1 over `window`.
#[inline]
pub fn weight(since: Instant, window: Duration, now: Instant) -> f64 {
    if window.is_zero() {
        return 1.0;
    }
    let f = now.saturating_duration_since(since).as_secs_f64() / window.as_secs_f64();
    f.clamp(MIN_WEIGHT, 1.0)
}

/// The slow-start state of one frontend: the window and, at the index of
/// each of its endpoints, when it joined (`None`: before slow start could
/// matter, e.g. present since the Service or the process appeared).
#[derive(Debug, Clone, PartialEq)]
pub struct Warmup {
    window: Duration,
    since: Box<[Option<Instant>]>,
    /// After this instant no endpoint warms any more: picks skip slow start.
    until: Instant,
}

impl Warmup {
    /// The state for endpoints that joined at `since` (same order as the
    /// frontend's endpoints); `None` when none is in a window at all.
    pub fn new(window: Duration, since: Box<[Option<Instant>]>) -> Option<Warmup> {
        let until = since.iter().flatten().max()?.checked_add(window)?;
        Some(Warmup {
            window,
            since,
            until,
        })
    }

    /// Whether some endpoint may still be warming at `now` (one comparison:
    /// the common case once the window has passed).
    #[inline]
    pub fn active(&self, now: Instant) -> bool {
        now < self.until
    }

    /// Weight of the endpoint at `index` at `now` (1 when not warming).
    #[inline]
    pub fn weight(&self, index: usize, now: Instant) -> f64 {
        match self.since.get(index) {
            Some(Some(t)) => weight(*t, self.window, now),
            _ => 1.0,
        }
    }

    /// The window.
    pub fn window(&self) -> Duration {
        self.window
    }
}

/// Which usable set of a Service port: its own id and the traffic policy
/// (the cluster and the local set join and leave separately).
type SetKey = (PortId, TrafficPolicy);

/// When each usable endpoint joined, per Service and usable set, kept
/// across compiles.
#[derive(Debug, Default)]
pub struct Joined {
    services: HashMap<ObjectKey, HashMap<SetKey, HashMap<SocketAddr, Option<Instant>>>>,
}

impl Joined {
    /// Records the usable set `usable` of (`service`, `set`) at `now` and
    /// returns when each of its endpoints joined, in `usable`'s order. The
    /// first time a set is seen every endpoint counts as established
    /// (`None`): a Service that appears, or a process that starts, has no
    /// newcomers (Envoy applies slow start only to hosts added later).
    /// Endpoints that left are forgotten: coming back is joining again.
    pub fn update(
        &mut self,
        service: &ObjectKey,
        set: SetKey,
        usable: &[SocketAddr],
        window: Duration,
        now: Instant,
    ) -> Box<[Option<Instant>]> {
        let sets = self.services.entry(service.clone()).or_default();
        let seen = sets.contains_key(&set);
        let known = sets.entry(set).or_default();
        let mut next = HashMap::with_capacity(usable.len());
        let out = usable
            .iter()
            .map(|e| {
                let since = match known.get(e) {
                    // Past its window: established for good.
                    Some(Some(t)) if now.saturating_duration_since(*t) >= window => None,
                    Some(t) => *t,
                    None if seen => Some(now),
                    None => None,
                };
                next.insert(*e, since);
                since
            })
            .collect();
        *known = next;
        out
    }

    /// Keeps only the sets in `sets` for `service` (its ports and policies
    /// now); with none, forgets the Service.
    pub fn retain(&mut self, service: &ObjectKey, sets: &[SetKey]) {
        if sets.is_empty() {
            self.services.remove(service);
        } else if let Some(s) = self.services.get_mut(service) {
            s.retain(|k, _| sets.contains(k));
        }
    }

    /// Forgets Services `keep` rejects.
    pub fn retain_services(&mut self, keep: impl Fn(&ObjectKey) -> bool) {
        self.services.retain(|k, _| keep(k));
    }

    /// Number of Services tracked.
    pub fn len(&self) -> usize {
        self.services.len()
    }

    /// True when no Service is tracked.
    pub fn is_empty(&self) -> bool {
        self.services.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const W: Duration = Duration::from_secs(60);

    fn ep(i: u8) -> SocketAddr {
        SocketAddr::from(([10, 0, 0, i], 80))
    }

    #[test]
    fn weight_grows_linearly_from_the_floor() {
        let t0 = Instant::now();
        let at = |s: u64| weight(t0, W, t0 + Duration::from_secs(s));
        assert_eq!(at(0), MIN_WEIGHT);
        assert_eq!(at(3), MIN_WEIGHT);
        assert!((at(15) - 0.25).abs() < 1e-9);
        assert!((at(30) - 0.5).abs() < 1e-9);
        assert_eq!(at(60), 1.0);
        assert_eq!(at(600), 1.0);
        assert_eq!(weight(t0, Duration::ZERO, t0), 1.0);
    }

    #[test]
    fn first_sight_is_established_newcomers_warm() {
        let svc = ObjectKey::new("default", "web");
        let set = (7, TrafficPolicy::Cluster);
        let mut j = Joined::default();
        let t0 = Instant::now();
        assert_eq!(&*j.update(&svc, set, &[ep(1), ep(2)], W, t0), &[None, None]);
        let t1 = t0 + Duration::from_secs(5);
        assert_eq!(
            &*j.update(&svc, set, &[ep(1), ep(2), ep(3)], W, t1),
            &[None, None, Some(t1)]
        );
        // A recompile later (another endpoint changed) keeps ep(3)'s time.
        let t2 = t1 + Duration::from_secs(20);
        assert_eq!(
            &*j.update(&svc, set, &[ep(1), ep(3)], W, t2),
            &[None, Some(t1)]
        );
        // Past its window it is established; ep(2) coming back joins anew.
        let t3 = t1 + W;
        assert_eq!(
            &*j.update(&svc, set, &[ep(1), ep(2), ep(3)], W, t3),
            &[None, Some(t3), None]
        );
        j.retain(&svc, &[]);
        assert!(j.is_empty());
    }

    #[test]
    fn warmup_is_inactive_after_the_last_window() {
        let t0 = Instant::now();
        assert_eq!(Warmup::new(W, vec![None, None].into()), None);
        let w = Warmup::new(W, vec![None, Some(t0)].into()).unwrap();
        assert!(w.active(t0 + Duration::from_secs(59)));
        assert!(!w.active(t0 + W));
        assert_eq!(w.weight(0, t0), 1.0);
        assert_eq!(w.weight(1, t0), MIN_WEIGHT);
        assert_eq!(w.weight(9, t0), 1.0);
    }
}
