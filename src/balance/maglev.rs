//! Maglev consistent hashing (Eisenbud et al., "Maglev: A Fast and Reliable
//! Software Network Load Balancer", NSDI 2016, section 3.4).
//!
//! The lookup table depends only on the endpoint list and the table size:
//! every hash here has a fixed seed (never a per-process random one), so two
//! ringvip processes, on one box or on several gateway boxes, with the same
//! endpoints map every client to the same endpoint. Built in the snapshot
//! compile; a lookup is one hash and one array read.

use std::net::{IpAddr, SocketAddr};

/// Default table size: a prime well above 100 × the endpoints of any
/// ordinary Service, as the paper recommends for balance.
pub const DEFAULT_TABLE_SIZE: u32 = 65537;

/// Smallest table size accepted (a prime).
pub const MIN_TABLE_SIZE: u32 = 7;

/// Largest table size accepted: 4 MiB of table per Service port.
pub const MAX_TABLE_SIZE: u32 = 1_048_573;

/// Fixed seeds: part of the wire-visible behaviour (which backend a client
/// gets), so they never change between versions or processes.
const SEED_OFFSET: u64 = 0x6d61_676c_6576_3031;
const SEED_SKIP: u64 = 0x6d61_676c_6576_3032;
const SEED_CLIENT: u64 = 0x6d61_676c_6576_3033;
const SEED_PROPOSAL: u64 = 0x6d61_676c_6576_3034;

/// A Maglev lookup table over an endpoint list: slot → index into that list.
#[derive(Clone, PartialEq, Eq)]
pub struct Maglev {
    table: Box<[u32]>,
}

impl std::fmt::Debug for Maglev {
    // The table's 65537 entries would drown any debug print of a frontend.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Maglev")
            .field("size", &self.table.len())
            .finish()
    }
}

impl Maglev {
    /// Builds the table of `size` slots (a prime, see [`is_prime`]) over
    /// `endpoints`, identified by address and port. Every endpoint gets
    /// `size / n` or one more slots. Empty when there are no endpoints.
    pub fn build(endpoints: &[SocketAddr], size: u32) -> Maglev {
        let n = endpoints.len();
        let m = u64::from(size.max(1));
        if n == 0 {
            return Maglev {
                table: Box::new([]),
            };
        }
        // Each endpoint's permutation of the slots: offset + j × skip (mod m);
        // skip in 1..m, so with m prime every permutation visits every slot.
        let perm: Vec<(u64, u64)> = endpoints
            .iter()
            .map(|e| {
                let b = endpoint_bytes(e);
                let offset = hash(&b[..], SEED_OFFSET) % m;
                let skip = hash(&b[..], SEED_SKIP) % (m - 1).max(1) + 1;
                (offset, skip)
            })
            .collect();
        let mut next: Vec<u64> = vec![0; n];
        let mut table: Vec<u32> = vec![u32::MAX; m as usize];
        let mut filled = 0u64;
        'fill: loop {
            for (i, (&(offset, skip), next)) in perm.iter().zip(next.iter_mut()).enumerate() {
                // The endpoint's next free slot in its permutation.
                let free = loop {
                    let slot = ((offset + *next % m * skip) % m) as usize;
                    *next += 1;
                    match table.get_mut(slot) {
                        Some(t) if *t == u32::MAX => break t,
                        Some(_) => {}
                        // Never: slot < m = the table's length.
                        None => break 'fill,
                    }
                };
                *free = i as u32;
                filled += 1;
                if filled == m {
                    break 'fill;
                }
            }
        }
        Maglev {
            table: table.into_boxed_slice(),
        }
    }

    /// Number of slots (0 when built over no endpoint).
    pub fn size(&self) -> usize {
        self.table.len()
    }

    /// The endpoint index for `key` ([`client_key`]); proposal `k` > 0 is a
    /// further slot derived from the key, where the first one's endpoint
    /// could not be taken (backed off, or warming up in slow start): the same
    /// client gets the same sequence on every process.
    #[inline]
    pub fn lookup(&self, key: u64, k: u32) -> Option<usize> {
        let m = self.table.len() as u64;
        if m == 0 {
            return None;
        }
        let h = if k == 0 {
            key
        } else {
            mix(key ^ SEED_PROPOSAL.wrapping_mul(u64::from(k)))
        };
        self.table.get((h % m) as usize).map(|&i| i as usize)
    }

    /// How many slots each endpoint owns (for tests and `explain`).
    pub fn shares(&self, endpoints: usize) -> Vec<usize> {
        let mut out = vec![0; endpoints];
        for &i in self.table.iter() {
            if let Some(c) = out.get_mut(i as usize) {
                *c += 1;
            }
        }
        out
    }

    /// The slots, in order (endpoint indexes).
    pub fn slots(&self) -> &[u32] {
        &self.table
    }
}

/// The Maglev key of a client: its IP address only (ports left out, so a
/// client keeps its backend across connections), hashed with a fixed seed.
#[inline]
pub fn client_key(ip: IpAddr) -> u64 {
    match ip {
        IpAddr::V4(a) => hash(&a.octets(), SEED_CLIENT),
        IpAddr::V6(a) => hash(&a.octets(), SEED_CLIENT),
    }
}

/// A number in [0, 1) fixed for (`key`, `k`): the deterministic coin Maglev
/// uses to admit a client to an endpoint in slow start (the same client is
/// admitted on every process, and stays admitted as the weight grows).
#[inline]
pub fn unit(key: u64, k: u32) -> f64 {
    let h = mix(key.rotate_left(17) ^ u64::from(k).wrapping_mul(0x9e37_79b9_7f4a_7c15));
    (h >> 11) as f64 / (1u64 << 53) as f64
}

/// Whether `n` is prime (table sizes must be, so every skip generates a
/// full permutation).
pub fn is_prime(n: u32) -> bool {
    if n < 2 {
        return false;
    }
    let n = u64::from(n);
    let mut d = 2u64;
    while d * d <= n {
        if n % d == 0 {
            return false;
        }
        d += 1;
    }
    true
}

/// Address and port as bytes: 4 + 2 or 16 + 2, zero-padded to 18.
fn endpoint_bytes(e: &SocketAddr) -> [u8; 18] {
    let mut b = [0u8; 18];
    let port = e.port().to_be_bytes();
    match e.ip() {
        IpAddr::V4(a) => {
            b[..4].copy_from_slice(&a.octets());
            b[4..6].copy_from_slice(&port);
        }
        IpAddr::V6(a) => {
            b[..16].copy_from_slice(&a.octets());
            b[16..].copy_from_slice(&port);
        }
    }
    b
}

/// FNV-1a over `bytes` from a seeded basis, then a SplitMix64 finaliser: a
/// fixed, well-spread hash (std's hashers are not guaranteed stable across
/// Rust versions).
#[inline]
fn hash(bytes: &[u8], seed: u64) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64 ^ seed;
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    mix(h)
}

/// SplitMix64's finaliser.
#[inline]
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn eps(n: usize, base: u8) -> Vec<SocketAddr> {
        (0..n)
            .map(|i| SocketAddr::from(([10, base, (i / 250) as u8, (i % 250) as u8 + 1], 8080)))
            .collect()
    }

    #[test]
    fn primes() {
        assert!(is_prime(DEFAULT_TABLE_SIZE));
        assert!(is_prime(MIN_TABLE_SIZE));
        assert!(is_prime(MAX_TABLE_SIZE));
        assert!(!is_prime(65536));
        assert!(!is_prime(1));
    }

    #[test]
    fn fixed_seeds_give_fixed_tables() {
        // Pinned values: a change here changes which backend every client of
        // every deployed gateway gets; it must never happen by accident.
        let t = Maglev::build(&eps(3, 0), 13);
        assert_eq!(t.slots(), &[1, 0, 2, 2, 1, 0, 1, 0, 2, 2, 0, 1, 0]);
        assert_eq!(
            client_key(IpAddr::from([192, 0, 2, 1])),
            client_key("192.0.2.1".parse().unwrap())
        );
        assert_eq!(
            client_key(IpAddr::from([192, 0, 2, 1])),
            0xc4cf_d2cc_c16a_9de6
        );
    }

    #[test]
    fn empty_and_single() {
        assert_eq!(Maglev::build(&[], 13).lookup(5, 0), None);
        let one = Maglev::build(&eps(1, 0), 13);
        assert!((0..50).all(|k| one.lookup(k * 7919, 0) == Some(0)));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]

        /// Balance: every endpoint owns its share of the table within 1%
        /// (Maglev's population gives each endpoint ⌊M/N⌋ or ⌈M/N⌉ slots).
        #[test]
        fn balance_within_one_percent(n in 1usize..=100, base in 0u8..4) {
            let e = eps(n, base);
            let t = Maglev::build(&e, DEFAULT_TABLE_SIZE);
            let share = DEFAULT_TABLE_SIZE as f64 / n as f64;
            for (i, c) in t.shares(n).into_iter().enumerate() {
                let dev = (c as f64 - share).abs() / share;
                prop_assert!(dev <= 0.01, "endpoint {i}: {c} slots, share {share:.1}");
            }
        }

        /// Disruption: with one endpoint of N removed, at most 1/N + 1% of
        /// the clients (slots) change endpoint.
        #[test]
        fn one_removed_moves_at_most_its_share(n in 2usize..=60, gone in 0usize..60, base in 0u8..4) {
            let e = eps(n, base);
            let gone = gone % n;
            let mut rest = e.clone();
            rest.remove(gone);
            let before = Maglev::build(&e, DEFAULT_TABLE_SIZE);
            let after = Maglev::build(&rest, DEFAULT_TABLE_SIZE);
            let moved = before
                .slots()
                .iter()
                .zip(after.slots())
                .filter(|(&b, &a)| e[b as usize] != rest[a as usize])
                .count();
            let frac = moved as f64 / DEFAULT_TABLE_SIZE as f64;
            prop_assert!(frac <= 1.0 / n as f64 + 0.01, "{moved} slots moved ({frac:.4}) for n={n}");
        }
    }

    #[test]
    fn clients_spread_like_the_table() {
        // 100,000 client addresses over 10 endpoints: each within 5% of its
        // share (sampling noise is ~1% here; the table itself is exact).
        let e = eps(10, 0);
        let t = Maglev::build(&e, DEFAULT_TABLE_SIZE);
        let mut got = [0usize; 10];
        for i in 0..100_000u32 {
            let ip = IpAddr::from((0x0a80_0000u32 + i).to_be_bytes());
            got[t.lookup(client_key(ip), 0).unwrap()] += 1;
        }
        for c in got {
            assert!((9_500..=10_500).contains(&c), "{got:?}");
        }
    }

    #[test]
    fn unit_is_in_range_and_fixed() {
        for k in 0..1000u64 {
            let u = unit(k, 1);
            assert!((0.0..1.0).contains(&u));
            assert_eq!(u, unit(k, 1));
        }
    }
}
