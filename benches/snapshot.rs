//! The snapshot at scale (issue 17):
//! - `snapshot/lookup_among_100k_frontends`: the frontend lookup every new
//!   flow makes (`Snapshot::frontend`), hits spread over 100,000 ClusterIP
//!   frontends in a fixed random order;
//! - `snapshot/one_change_{1k,10k,100k}_services`: one EndpointSlice changed,
//!   then the compile with the control loop's cache, at 1,000, 10,000 and
//!   100,000 Services of 10 endpoints each (the previous snapshot dropped
//!   inside the timing, as publishing the next one drops it). Flat from 1k to
//!   100k is the goal: a change costs what it touches.
//! - `snapshot/one_pod_change_{1k,10k,100k}_services`: the same with Pods in
//!   file mode: each Service selects its 10 Pods, and one Pod's readiness
//!   flips per iteration (the store derives again only the slices of the
//!   Services selecting it).
//!
//! Run: cargo bench --features testing --bench snapshot

use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use criterion::{criterion_group, criterion_main, Criterion};
use ringvip::discovery::Update;
use ringvip::model::*;
use ringvip::state::{CompileCache, FrontendKey, Store};
use ringvip::telemetry::Metrics;
use ringvip::testing::builders::{self, node, port, service, slice, slice_port};

/// The ClusterIP of Service `s`: 10.96.0.0/12 has room for 1M of them.
fn cluster_ip(s: u32) -> Ipv4Addr {
    let [_, a, b, c] = (s + 1).to_be_bytes();
    Ipv4Addr::new(10, 96 + a, b, c)
}

/// Service `s` (ClusterIP, one TCP port) and its slice of `per` endpoints,
/// the first `keep` of them listed.
fn objects_of(s: u32, per: u32, keep: u32) -> [Object; 2] {
    let name = format!("svc-{s}");
    let svc = Service {
        cluster_ips: vec![IpAddr::V4(cluster_ip(s))],
        ..service(
            "default",
            &name,
            &[],
            vec![port("http", Protocol::Tcp, 80, 8080)],
        )
    };
    let [_, _, a, b] = s.to_be_bytes();
    let endpoints = (0..per.min(keep))
        .map(|e| Endpoint {
            node_name: Some(format!("node-{}", e % 3).into()),
            ..Endpoint::ready(IpAddr::V4(Ipv4Addr::new(10, 200 + (e as u8), a, b)))
        })
        .collect();
    let sl = slice(
        "default",
        &format!("{name}-1"),
        &name,
        vec![slice_port("http", Protocol::Tcp, 8080)],
        endpoints,
    );
    [Object::Service(svc), Object::EndpointSlice(sl)]
}

fn store(services: u32, per: u32) -> Store {
    builders::store(
        (0..services)
            .flat_map(|s| objects_of(s, per, per))
            .collect(),
    )
}

fn lookup(c: &mut Criterion) {
    let ctx = node("node-0", &["192.0.2.1"], &["192.0.2.1"]);
    let metrics = Metrics::new();
    let n = 100_000u32;
    let mut st = store(n, 1);
    let snap = st.compile_with(&ctx, &metrics, 1, &mut CompileCache::default());
    assert_eq!(snap.frontend_count(), n as usize);
    // A fixed pseudo-random order (an LCG), so consecutive lookups do not
    // walk the table in memory order.
    let mut x = 12345u64;
    let keys: Vec<FrontendKey> = (0..4096)
        .map(|_| {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let s = ((x >> 33) % u64::from(n)) as u32;
            FrontendKey {
                addr: SocketAddr::new(IpAddr::V4(cluster_ip(s)), 80),
                proto: Protocol::Tcp,
            }
        })
        .collect();
    let mut g = c.benchmark_group("snapshot");
    g.bench_function("lookup_among_100k_frontends", |b| {
        let mut i = 0usize;
        b.iter(|| {
            i = (i + 1) & 4095;
            let k = keys.get(i).unwrap_or(&keys[0]);
            black_box(snap.frontend(black_box(k)).is_some())
        })
    });
    g.finish();
}

fn one_change(c: &mut Criterion) {
    let ctx = node("node-0", &["192.0.2.1"], &["192.0.2.1"]);
    let metrics = Metrics::new();
    let mut g = c.benchmark_group("snapshot");
    g.sample_size(20);
    for (label, n) in [("1k", 1_000u32), ("10k", 10_000), ("100k", 100_000)] {
        let mut st = store(n, 10);
        let mut cache = CompileCache::default();
        let mut last = st.compile_with(&ctx, &metrics, 1, &mut cache);
        let mut gen = 1u64;
        g.bench_function(format!("one_change_{label}_services"), |b| {
            b.iter(|| {
                // Alternate one Service's slice between 10 and 5 endpoints,
                // so every iteration is a change.
                gen += 1;
                let keep = if gen.is_multiple_of(2) { 5 } else { 10 };
                let [_, sl] = objects_of(n / 2, 10, keep);
                st.apply(Update::Upsert(Box::new(sl)));
                last = st.compile_with(&ctx, &metrics, gen, &mut cache);
                black_box(last.generation)
            })
        });
    }
    g.finish();
}

/// Service `s` selecting `app: svc-<s>`, and its `per` Pods.
fn selected_objects(s: u32, per: u32) -> Vec<Object> {
    let [Object::Service(svc), _] = objects_of(s, per, 0) else {
        unreachable!("objects_of gives a Service and a slice")
    };
    let app = format!("svc-{s}");
    let mut out = vec![Object::Service(Service {
        selector: Some(builders::labels(&[("app", app.as_str())])),
        ..svc
    })];
    out.extend((0..per).map(|e| Object::Pod(pod_of(s, e, true))));
    out
}

/// Pod `e` of Service `s`, on node-<e % 3>.
fn pod_of(s: u32, e: u32, ready: bool) -> Pod {
    let [_, _, a, b] = s.to_be_bytes();
    let app = format!("svc-{s}");
    Pod {
        node_name: Some(format!("node-{}", e % 3)),
        ready,
        ..builders::pod(
            "default",
            &format!("svc-{s}-{e}"),
            &Ipv4Addr::new(10, 200 + (e as u8), a, b).to_string(),
            builders::labels(&[("app", app.as_str())]),
        )
    }
}

fn one_pod_change(c: &mut Criterion) {
    let ctx = node("node-0", &["192.0.2.1"], &["192.0.2.1"]);
    let metrics = Metrics::new();
    let mut g = c.benchmark_group("snapshot");
    g.sample_size(20);
    for (label, n) in [("1k", 1_000u32), ("10k", 10_000), ("100k", 100_000)] {
        let mut st = builders::store((0..n).flat_map(|s| selected_objects(s, 10)).collect());
        let mut cache = CompileCache::default();
        let mut last = st.compile_with(&ctx, &metrics, 1, &mut cache);
        assert_eq!(last.frontend_count(), n as usize);
        let mut gen = 1u64;
        g.bench_function(format!("one_pod_change_{label}_services"), |b| {
            b.iter(|| {
                // One Pod of one Service goes unready and ready again in
                // turn, so every iteration is a change.
                gen += 1;
                let p = pod_of(n / 2, 3, !gen.is_multiple_of(2));
                st.apply(Update::Upsert(Box::new(Object::Pod(p))));
                last = st.compile_with(&ctx, &metrics, gen, &mut cache);
                black_box(last.generation)
            })
        });
    }
    g.finish();
}

criterion_group!(benches, lookup, one_change, one_pod_change);
criterion_main!(benches);
