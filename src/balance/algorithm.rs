//! The per-Service balancing algorithms (`ringvip.io/balance`) and the one
//! choice every first try of a new flow makes: the algorithm proposes an
//! endpoint, passive health and slow start may turn the proposal down, and
//! the algorithm proposes again, a bounded number of times.
//!
//! Slow start composes the same way with every algorithm: an endpoint of
//! weight w < 1 is admitted with probability w each time it is proposed
//! (rejection sampling, so under `random` its share is exactly w times the
//! normal one). Maglev admits with a coin fixed per client, so the clients a
//! warming endpoint takes are the same on every process and only grow.
//!
//! Allocates nothing, takes no lock: atomics (round-robin's counter, the
//! live connection counts) and the random source passed in.

use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use rand::Rng;

use super::maglev::{self, Maglev};
use super::slow_start::Warmup;

/// Proposals before giving up on admission: then the last healthy
/// proposal (or any healthy endpoint) is taken.
pub const MAX_PROPOSALS: u32 = 8;

/// How a frontend chooses among its usable endpoints; compiled from
/// [`crate::model::Balance`].
#[derive(Debug, Clone)]
pub enum Balancer {
    /// Uniform random (kube-proxy's).
    Random,
    /// In turn, one counter per frontend shared by every data-plane thread.
    RoundRobin(Arc<AtomicUsize>),
    /// Power of two random choices over live active-connection counts.
    LeastConnections,
    /// Maglev table over the frontend's endpoints, keyed by client IP.
    Maglev(Arc<Maglev>),
}

impl Balancer {
    /// The name used by the annotation.
    pub fn name(&self) -> &'static str {
        match self {
            Balancer::Random => "random",
            Balancer::RoundRobin(_) => "round-robin",
            Balancer::LeastConnections => "least-connections",
            Balancer::Maglev(_) => "maglev",
        }
    }
}

/// What a choice reads about the endpoints besides their number.
pub struct Inputs<'a, A, F>
where
    A: Fn(usize) -> i64,
    F: Fn(usize) -> bool,
{
    /// Number of usable endpoints.
    pub n: usize,
    /// Live active connections of the endpoint at an index.
    pub active: A,
    /// Whether the endpoint at an index is to be avoided (backed off).
    pub avoid: F,
    /// Slow-start state, when the frontend has one.
    pub warmup: Option<&'a Warmup>,
    /// The client.
    pub client: IpAddr,
    /// The time.
    pub now: Instant,
}

/// Chooses the index of an endpoint; `None` only when there is none.
/// Avoided endpoints are skipped while another will do (better a doubtful
/// endpoint than none).
pub fn choose<A, F, R>(b: &Balancer, inp: &Inputs<'_, A, F>, rng: &mut R) -> Option<usize>
where
    A: Fn(usize) -> i64,
    F: Fn(usize) -> bool,
    R: Rng + ?Sized,
{
    let n = inp.n;
    if n == 0 {
        return None;
    }
    let warm = inp.warmup.filter(|w| w.active(inp.now));
    let key = match b {
        Balancer::Maglev(_) => maglev::client_key(inp.client),
        _ => 0,
    };
    let mut healthy_fallback = None;
    let mut first = 0usize;
    for k in 0..MAX_PROPOSALS {
        let i = match propose(b, k, first, key, inp, rng) {
            Some(i) if i < n => i,
            _ => break,
        };
        if k == 0 {
            first = i;
        }
        if (inp.avoid)(i) {
            continue;
        }
        let Some(w) = warm.map(|w| w.weight(i, inp.now)).filter(|w| *w < 1.0) else {
            return Some(i);
        };
        let coin = match b {
            // One coin per client, whatever the proposal: a client is admitted
            // to a warming endpoint exactly when its coin is below the weight.
            Balancer::Maglev(_) => maglev::unit(key, 0),
            _ => rng.random::<f64>(),
        };
        if coin < w {
            return Some(i);
        }
        healthy_fallback = Some(i);
    }
    if healthy_fallback.is_some() {
        return healthy_fallback;
    }
    // Every proposal was avoided: the first endpoint not avoided, scanning
    // from the first proposal (deterministic for Maglev), else that one.
    (0..n)
        .map(|j| (first + j) % n)
        .find(|&i| !(inp.avoid)(i))
        .or(Some(first))
}

/// Proposal number `k` of algorithm `b`; `first` is proposal 0's answer.
#[inline]
fn propose<A, F, R>(
    b: &Balancer,
    k: u32,
    first: usize,
    key: u64,
    inp: &Inputs<'_, A, F>,
    rng: &mut R,
) -> Option<usize>
where
    A: Fn(usize) -> i64,
    F: Fn(usize) -> bool,
    R: Rng + ?Sized,
{
    let n = inp.n;
    match b {
        Balancer::Random => Some(rng.random_range(0..n)),
        Balancer::RoundRobin(next) => Some(if k == 0 {
            next.fetch_add(1, Ordering::Relaxed) % n
        } else {
            // Turned down: the next in turn, without taking another turn
            // from the shared counter.
            (first + k as usize) % n
        }),
        Balancer::LeastConnections => {
            if n == 1 {
                return Some(0);
            }
            let a = rng.random_range(0..n);
            // A second, distinct endpoint: uniform over the other n-1.
            let b = (a + 1 + rng.random_range(0..n - 1)) % n;
            Some(if (inp.active)(b) < (inp.active)(a) {
                b
            } else {
                a
            })
        }
        Balancer::Maglev(t) => t.lookup(key, k),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::balance::slow_start::MIN_WEIGHT;
    use rand::rngs::SmallRng;
    use rand::SeedableRng;
    use std::net::SocketAddr;
    use std::time::Duration;

    fn eps(n: u8) -> Vec<SocketAddr> {
        (1..=n)
            .map(|i| SocketAddr::from(([10, 0, 0, i], 80)))
            .collect()
    }

    fn client(i: u32) -> IpAddr {
        IpAddr::from((0xc000_0200u32 + i).to_be_bytes())
    }

    /// Counts picks per endpoint over `rounds` choices with `active` counts
    /// and the `warmup` state at `now`, one client per round.
    fn tally(
        b: &Balancer,
        n: usize,
        active: &[i64],
        warmup: Option<&Warmup>,
        now: Instant,
        rounds: u32,
    ) -> Vec<u32> {
        let mut rng = SmallRng::seed_from_u64(42);
        let mut got = vec![0u32; n];
        for r in 0..rounds {
            let inp = Inputs {
                n,
                active: |i: usize| active[i],
                avoid: |_| false,
                warmup,
                client: client(r),
                now,
            };
            got[choose(b, &inp, &mut rng).unwrap()] += 1;
        }
        got
    }

    #[test]
    fn round_robin_takes_turns_across_callers() {
        let b = Balancer::RoundRobin(Arc::default());
        let got = tally(&b, 4, &[0; 4], None, Instant::now(), 400);
        assert_eq!(got, vec![100; 4]);
    }

    #[test]
    fn least_connections_prefers_the_idle() {
        let b = Balancer::LeastConnections;
        // Endpoint 2 has no connection, the others many: it wins every pair
        // it is in (2 of 3 pairs with n = 3), never loses one.
        let got = tally(&b, 3, &[50, 40, 0], None, Instant::now(), 3000);
        assert!(got[2] > 1800 && got[2] < 2200, "{got:?}");
        assert!(got[0] < got[1], "{got:?}");
        // n = 1: always it.
        assert_eq!(tally(&b, 1, &[9], None, Instant::now(), 10), vec![10]);
    }

    #[test]
    fn maglev_is_a_function_of_the_client() {
        let e = eps(5);
        let b = Balancer::Maglev(Arc::new(Maglev::build(&e, 251)));
        let mut r1 = SmallRng::seed_from_u64(1);
        let mut r2 = SmallRng::seed_from_u64(2);
        for c in 0..200 {
            let inp = Inputs {
                n: 5,
                active: |_| 0,
                avoid: |_| false,
                warmup: None,
                client: client(c),
                now: Instant::now(),
            };
            assert_eq!(choose(&b, &inp, &mut r1), choose(&b, &inp, &mut r2));
        }
    }

    #[test]
    fn avoided_endpoints_are_skipped_unless_all_are() {
        let e = eps(4);
        let algos = [
            Balancer::Random,
            Balancer::RoundRobin(Arc::default()),
            Balancer::LeastConnections,
            Balancer::Maglev(Arc::new(Maglev::build(&e, 251))),
        ];
        let mut rng = SmallRng::seed_from_u64(3);
        for b in &algos {
            for c in 0..200 {
                let mut inp = Inputs {
                    n: 4,
                    active: |_| 0,
                    avoid: |i: usize| i != 3,
                    warmup: None,
                    client: client(c),
                    now: Instant::now(),
                };
                assert_eq!(choose(b, &inp, &mut rng), Some(3), "{}", b.name());
                inp.n = 0;
                assert_eq!(choose(b, &inp, &mut rng), None);
            }
            let all = Inputs {
                n: 4,
                active: |_| 0,
                avoid: |_| true,
                warmup: None,
                client: client(1),
                now: Instant::now(),
            };
            assert!(choose(b, &all, &mut rng).is_some());
        }
    }

    /// Slow start, for every algorithm: endpoint 0 joined at t0 with a 100 s
    /// window; its share of new connections, relative to an established
    /// endpoint's, follows its weight (10% floor, 50% at half the window,
    /// all of it after).
    #[test]
    fn slow_start_share_grows_linearly_for_every_algorithm() {
        let n = 4usize;
        let e = eps(n as u8);
        let t0 = Instant::now();
        let window = Duration::from_secs(100);
        let warm = Warmup::new(window, vec![Some(t0), None, None, None].into()).unwrap();
        let rounds = 40_000;
        for make in [
            || Balancer::Random,
            || Balancer::RoundRobin(Arc::default()),
            || Balancer::LeastConnections,
        ] {
            let b = make();
            for (secs, want) in [
                (0u64, MIN_WEIGHT),
                (25, 0.25),
                (50, 0.5),
                (75, 0.75),
                (100, 1.0),
            ] {
                let now = t0 + Duration::from_secs(secs);
                let got = tally(&b, n, &[0; 4], Some(&warm), now, rounds);
                let normal = f64::from(got[1] + got[2] + got[3]) / 3.0;
                let rel = f64::from(got[0]) / normal;
                // Round-robin and P2C hand a turned-down turn to a neighbour,
                // so their relative share is near, not exactly, the weight.
                assert!(
                    (rel - want).abs() < 0.05 + want * 0.1,
                    "{} at {secs}s: share {rel:.3}, weight {want} ({got:?})",
                    b.name()
                );
            }
        }
        // Maglev: the clients the warming endpoint keeps are a fixed subset
        // of those it owns, growing with the weight.
        let b = Balancer::Maglev(Arc::new(Maglev::build(&e, 65537)));
        let owned = tally(&b, n, &[0; 4], None, t0, rounds)[0];
        let mut last = 0;
        for (secs, want) in [(0u64, MIN_WEIGHT), (50, 0.5), (100, 1.0)] {
            let now = t0 + Duration::from_secs(secs);
            let got = tally(&b, n, &[0; 4], Some(&warm), now, rounds)[0];
            let rel = f64::from(got) / f64::from(owned);
            assert!(
                (rel - want).abs() < 0.05,
                "maglev at {secs}s: {rel:.3} of its clients"
            );
            assert!(got >= last);
            last = got;
        }
    }
}
