//! Uniform random choice, as kube-proxy's iptables/nftables modes do.

use std::net::SocketAddr;

use rand::Rng;

/// Picks one endpoint uniformly at random; `None` when there are none.
#[inline]
pub fn pick_random<R: Rng + ?Sized>(endpoints: &[SocketAddr], rng: &mut R) -> Option<SocketAddr> {
    match endpoints.len() {
        0 => None,
        1 => endpoints.first().copied(),
        n => endpoints.get(rng.random_range(0..n)).copied(),
    }
}

/// Picks uniformly among endpoints that `avoid` rejects not, or among all of
/// them when it rejects every one (better a doubtful endpoint than none).
/// Allocates nothing: two passes over the slice.
pub fn pick_avoiding<R: Rng + ?Sized>(
    endpoints: &[SocketAddr],
    avoid: impl Fn(&SocketAddr) -> bool,
    rng: &mut R,
) -> Option<SocketAddr> {
    let ok = endpoints.iter().filter(|e| !avoid(e)).count();
    if ok == 0 {
        return pick_random(endpoints, rng);
    }
    let k = rng.random_range(0..ok);
    endpoints.iter().filter(|e| !avoid(e)).nth(k).copied()
}

/// Picks for a retry after failed connects: uniformly among endpoints not yet
/// `tried`, or among all of them once every one has been tried.
pub fn pick_retry<R: Rng + ?Sized>(
    endpoints: &[SocketAddr],
    tried: &[SocketAddr],
    rng: &mut R,
) -> Option<SocketAddr> {
    pick_avoiding(endpoints, |e| tried.contains(e), rng)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::SmallRng;
    use rand::SeedableRng;

    fn eps(n: u16) -> Vec<SocketAddr> {
        (0..n)
            .map(|i| SocketAddr::from(([10, 0, 0, i as u8 + 1], 8080)))
            .collect()
    }

    #[test]
    fn empty_set_picks_nothing() {
        let mut rng = SmallRng::seed_from_u64(1);
        assert_eq!(pick_random(&[], &mut rng), None);
        assert_eq!(pick_retry(&[], &[], &mut rng), None);
    }

    #[test]
    fn random_is_roughly_uniform() {
        let e = eps(4);
        let mut rng = SmallRng::seed_from_u64(7);
        let mut counts = [0u32; 4];
        for _ in 0..40_000 {
            let p = pick_random(&e, &mut rng).unwrap();
            counts[e.iter().position(|x| *x == p).unwrap()] += 1;
        }
        for c in counts {
            assert!((9_000..11_000).contains(&c), "counts {counts:?}");
        }
    }

    #[test]
    fn retry_avoids_tried_endpoints_until_all_tried() {
        let e = eps(3);
        let mut rng = SmallRng::seed_from_u64(3);
        for _ in 0..1000 {
            let p = pick_retry(&e, &e[..2], &mut rng).unwrap();
            assert_eq!(p, e[2]);
        }
        // every endpoint tried: any may be picked again
        let mut seen = std::collections::HashSet::new();
        for _ in 0..1000 {
            seen.insert(pick_retry(&e, &e, &mut rng).unwrap());
        }
        assert_eq!(seen.len(), 3);
    }
}
