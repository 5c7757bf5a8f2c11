//! Pick latency: uniform random, ClientIP affinity hit and miss, each
//! `ringvip.io/balance` algorithm through `choose` (with and without slow
//! start), and the Maglev table build.
//! Run: cargo bench --bench pick

use std::hint::black_box;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use std::sync::Arc;

use ringvip::balance::{choose, pick_random, AffinityTable, Balancer, Inputs, Maglev, Warmup};

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
    // A miss picks uniformly at random, as without an algorithm annotation.
    let fresh = |rng: &mut SmallRng| Some(rng.random_range(0..eps.len()));
    table.pick_with(1, client, &eps, t, now, |_| false, || fresh(&mut rng));
    c.bench_function("pick/affinity_hit_10", |b| {
        b.iter(|| {
            let f = || fresh(&mut rng);
            table.pick_with(1, black_box(client), &eps, t, now, |_| false, f)
        })
    });

    // Miss: the remembered entry has expired at every call, so each pick is a
    // fresh random choice written back (the table does not grow).
    let miss = AffinityTable::new();
    let short = Duration::from_nanos(1);
    let mut at = now;
    c.bench_function("pick/affinity_miss_10", |b| {
        b.iter(|| {
            at += Duration::from_nanos(2);
            let f = || fresh(&mut rng);
            miss.pick_with(1, black_box(client), &eps, short, at, |_| false, f)
        })
    });
}

/// One `choose` per iteration over 10 endpoints, a new client address each
/// time (Maglev hashes it), live counts read from atomics as the data path does.
fn algorithms(c: &mut Criterion) {
    let eps = endpoints(10);
    let active: Vec<std::sync::atomic::AtomicI64> = (0..10).map(|i| (i * 3).into()).collect();
    let now = Instant::now();
    // Endpoint 0 joined 10 s ago with a 60 s window: every pick pays for
    // slow start (a weight and a coin whenever endpoint 0 is proposed).
    let warm = Warmup::new(
        Duration::from_secs(60),
        (0..10)
            .map(|i| (i == 0).then(|| now - Duration::from_secs(10)))
            .collect(),
    );
    let algos = [
        ("random", Balancer::Random),
        ("round_robin", Balancer::RoundRobin(Arc::default())),
        ("least_connections", Balancer::LeastConnections),
        (
            "maglev",
            Balancer::Maglev(Arc::new(Maglev::build(&eps, 65537))),
        ),
    ];
    let mut rng = SmallRng::seed_from_u64(7);
    for (name, b) in &algos {
        for (suffix, warmup) in [("", None), ("_slow_start", warm.as_ref())] {
            let mut client = 0u32;
            c.bench_function(&format!("choose/{name}_10{suffix}"), |bench| {
                bench.iter(|| {
                    client = client.wrapping_add(1);
                    let inp = Inputs {
                        n: eps.len(),
                        active: |i: usize| active[i].load(std::sync::atomic::Ordering::Relaxed),
                        avoid: |_| false,
                        warmup,
                        client: IpAddr::from(client.to_be_bytes()),
                        now,
                    };
                    choose(black_box(b), &inp, &mut rng)
                })
            });
        }
    }
    let mut g = c.benchmark_group("maglev_build");
    g.sample_size(20);
    for n in [10u8, 100] {
        let eps = endpoints(n);
        g.bench_function(format!("65537_{n}"), |b| {
            b.iter(|| Maglev::build(black_box(&eps), 65537))
        });
    }
    g.finish();
}

criterion_group!(benches, bench, algorithms);
criterion_main!(benches);
