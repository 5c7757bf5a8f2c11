//! Pick latency: uniform random, ClientIP affinity hit and miss.
//! Run: cargo bench --bench pick

use std::hint::black_box;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion};
use rand::rngs::SmallRng;
use rand::SeedableRng;
use ringvip::balance::{pick_random, AffinityTable};

fn endpoints(n: u8) -> Vec<SocketAddr> {
    (0..n)
        .map(|i| SocketAddr::from(([10, 0, 0, i], 8080)))
        .collect()
}

fn bench(c: &mut Criterion) {
    let eps = endpoints(10);
    let mut rng = SmallRng::seed_from_u64(1);
    c.bench_function("pick/random_10", |b| {
        b.iter(|| pick_random(black_box(&eps), &mut rng))
    });

    let table = AffinityTable::new();
    let now = Instant::now();
    let t = Duration::from_secs(10800);
    let client = IpAddr::from([192, 0, 2, 1]);
    table.pick_avoiding(1, client, &eps, t, now, &mut rng, |_| false);
    c.bench_function("pick/affinity_hit_10", |b| {
        b.iter(|| table.pick_avoiding(1, black_box(client), &eps, t, now, &mut rng, |_| false))
    });

    // Miss: the remembered entry has expired at every call, so each pick is a
    // fresh random choice written back (the table does not grow).
    let miss = AffinityTable::new();
    let short = Duration::from_nanos(1);
    let mut at = now;
    c.bench_function("pick/affinity_miss_10", |b| {
        b.iter(|| {
            at += Duration::from_nanos(2);
            miss.pick_avoiding(1, black_box(client), &eps, short, at, &mut rng, |_| false)
        })
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
