//! `sessionAffinity: ClientIP`: a client IP keeps its endpoint while it keeps
//! opening connections within the timeout. Shared by all data-plane threads
//! (SO_REUSEPORT spreads one client's connections over them), hence a sharded map.

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use dashmap::DashMap;

/// Identity of a Service port across snapshots (a hash of namespace, name,
/// port name and protocol), so affinity survives snapshot swaps.
pub type PortId = u64;

#[derive(Debug, Clone, Copy)]
struct Entry {
    endpoint: SocketAddr,
    last_used: Instant,
    timeout: Duration,
}

impl Entry {
    fn live(&self, now: Instant) -> bool {
        now.saturating_duration_since(self.last_used) <= self.timeout
    }
}

/// Client IP → endpoint, per Service port.
#[derive(Debug, Default)]
pub struct AffinityTable {
    map: DashMap<(PortId, IpAddr), Entry>,
}

impl AffinityTable {
    /// An empty table.
    pub fn new() -> Self {
        Self::default()
    }

    /// Picks for a new flow: the index in `usable` of the remembered endpoint
    /// if it is still usable and was used within `timeout`, else `fresh()`
    /// (the Service's algorithm). Either way the entry's timer restarts at
    /// `now`. An endpoint `avoid` rejects (backed off after failed connects)
    /// loses its clients while another one is fine; `|_| false` avoids none.
    #[allow(clippy::too_many_arguments)]
    pub fn pick_with(
        &self,
        port: PortId,
        client: IpAddr,
        usable: &[SocketAddr],
        timeout: Duration,
        now: Instant,
        avoid: impl Fn(&SocketAddr) -> bool,
        fresh: impl FnOnce() -> Option<usize>,
    ) -> Option<usize> {
        let mut slot = self.map.entry((port, client)).or_insert(Entry {
            endpoint: SocketAddr::from(([0, 0, 0, 0], 0)),
            last_used: now,
            timeout: Duration::ZERO,
        });
        let e = slot.value_mut();
        let kept = (e.timeout != Duration::ZERO && e.live(now))
            .then(|| usable.iter().position(|u| *u == e.endpoint))
            .flatten()
            .filter(|_| !(avoid(&e.endpoint) && usable.iter().any(|u| !avoid(u))));
        if let Some(i) = kept {
            e.last_used = now;
            e.timeout = timeout;
            return Some(i);
        }
        match fresh().and_then(|i| usable.get(i).map(|p| (i, *p))) {
            Some((i, p)) => {
                *e = Entry {
                    endpoint: p,
                    last_used: now,
                    timeout,
                };
                Some(i)
            }
            None => {
                drop(slot);
                self.map.remove(&(port, client));
                None
            }
        }
    }

    /// The endpoint remembered for `client` on `port` and how much longer it
    /// stays remembered without use, when the entry is live at `now`.
    /// Read-only: unlike a pick, it restarts no timer (for `ringvip explain`).
    pub fn peek(
        &self,
        port: PortId,
        client: IpAddr,
        now: Instant,
    ) -> Option<(SocketAddr, Duration)> {
        let e = *self.map.get(&(port, client))?;
        if e.timeout == Duration::ZERO || !e.live(now) {
            return None;
        }
        let used = now.saturating_duration_since(e.last_used);
        Some((e.endpoint, e.timeout.saturating_sub(used)))
    }

    /// Remembers `endpoint` for the client (used after a retry succeeded elsewhere).
    pub fn record(
        &self,
        port: PortId,
        client: IpAddr,
        endpoint: SocketAddr,
        timeout: Duration,
        now: Instant,
    ) {
        self.map.insert(
            (port, client),
            Entry {
                endpoint,
                last_used: now,
                timeout,
            },
        );
    }

    /// Every entry live at `now`: (port, client, endpoint, idle for, its
    /// timeout), for the next process of an upgrade, which [`record`]s
    /// each as last used `idle` before its own now.
    ///
    /// [`record`]: AffinityTable::record
    pub fn export(&self, now: Instant) -> Vec<(PortId, IpAddr, SocketAddr, Duration, Duration)> {
        self.map
            .iter()
            .filter(|e| e.timeout != Duration::ZERO && e.live(now))
            .map(|e| {
                let ((port, client), v) = (*e.key(), *e.value());
                let idle = now.saturating_duration_since(v.last_used);
                (port, client, v.endpoint, idle, v.timeout)
            })
            .collect()
    }

    /// Removes entries idle longer than their timeout; returns how many.
    pub fn sweep(&self, now: Instant) -> usize {
        let before = self.map.len();
        self.map.retain(|_, e| e.live(now));
        before - self.map.len()
    }

    /// Number of remembered clients.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// True when nothing is remembered.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::SmallRng;
    use rand::SeedableRng;

    const T: Duration = Duration::from_secs(10);

    fn client(i: u8) -> IpAddr {
        IpAddr::from([192, 0, 2, i])
    }

    /// A fresh table, five endpoints, a start time and a seeded generator.
    fn setup(seed: u64) -> (AffinityTable, Vec<SocketAddr>, Instant, SmallRng) {
        let eps = (1..=5)
            .map(|i| SocketAddr::from(([10, 0, 0, i], 80)))
            .collect();
        (
            AffinityTable::new(),
            eps,
            Instant::now(),
            SmallRng::seed_from_u64(seed),
        )
    }

    /// A pick that avoids no endpoint, with timeout `T`.
    fn pick(
        t: &AffinityTable,
        port: PortId,
        c: IpAddr,
        usable: &[SocketAddr],
        now: Instant,
        rng: &mut SmallRng,
    ) -> Option<SocketAddr> {
        let fresh = || Some(rand::Rng::random_range(rng, 0..usable.len().max(1)));
        let i = t.pick_with(port, c, usable, T, now, |_| false, fresh)?;
        usable.get(i).copied()
    }

    #[test]
    fn sticks_within_timeout_and_refreshes() {
        let (t, e, t0, mut rng) = setup(1);
        let first = pick(&t, 1, client(1), &e, t0, &mut rng).unwrap();
        // each use within the timeout refreshes the timer: 9 s steps stay sticky
        for i in 1..=10u64 {
            let now = t0 + Duration::from_secs(9 * i);
            assert_eq!(pick(&t, 1, client(1), &e, now, &mut rng), Some(first));
        }
    }

    #[test]
    fn expires_after_timeout() {
        let (t, e, t0, mut rng) = setup(2);
        // after expiry a new random pick is made; over many clients some must differ
        let mut changed = 0;
        for i in 0..50u8 {
            let c = client(i);
            let a = pick(&t, 1, c, &e, t0, &mut rng).unwrap();
            let b = pick(&t, 1, c, &e, t0 + T + Duration::from_millis(1), &mut rng);
            if Some(a) != b {
                changed += 1;
            }
        }
        assert!(changed > 20, "only {changed} of 50 re-picked after expiry");
        assert_eq!(t.sweep(t0 + T * 3), 50);
    }

    #[test]
    fn unusable_endpoint_is_dropped_and_repicked() {
        let (t, e, t0, mut rng) = setup(3);
        let first = pick(&t, 1, client(1), &e, t0, &mut rng).unwrap();
        let rest: Vec<_> = e.iter().copied().filter(|x| *x != first).collect();
        let second = pick(&t, 1, client(1), &rest, t0, &mut rng).unwrap();
        assert_ne!(first, second);
        assert_eq!(pick(&t, 1, client(1), &e, t0, &mut rng), Some(second));
    }

    #[test]
    fn keyed_by_port_and_client_ip_only() {
        let (t, e, t0, mut rng) = setup(4);
        t.record(1, client(1), e[0], T, t0);
        t.record(2, client(1), e[3], T, t0);
        assert_eq!(pick(&t, 1, client(1), &e, t0, &mut rng), Some(e[0]));
        assert_eq!(pick(&t, 2, client(1), &e, t0, &mut rng), Some(e[3]));
        assert_eq!(t.len(), 2);
    }

    #[test]
    fn no_endpoints_leaves_no_entry() {
        let (t, _, t0, mut rng) = setup(5);
        assert_eq!(pick(&t, 1, client(1), &[], t0, &mut rng), None);
        assert!(t.is_empty());
    }
}
