//! Snapshot compile time for 10,000 Services × 10 endpoints (NodePorts included).
//! Run: cargo bench --features testing --bench compile

use std::net::{IpAddr, Ipv4Addr};

use criterion::{criterion_group, criterion_main, Criterion};
use ringvip::discovery::Update;
use ringvip::model::*;
use ringvip::state::CompileCache;
use ringvip::telemetry::Metrics;
use ringvip::testing::builders::{self, node, port, service, slice, slice_port};

fn objects(services: u32, per: u32) -> Vec<Object> {
    let mut out = Vec::new();
    for s in 0..services {
        let name = format!("svc-{s}");
        let [_, _, a, b] = (s + 1).to_be_bytes();
        let node_port = s % 2 == 0;
        out.push(Object::Service(Service {
            service_type: if node_port {
                ServiceType::NodePort
            } else {
                ServiceType::ClusterIp
            },
            cluster_ips: vec![IpAddr::V4(Ipv4Addr::new(10, 96, a, b))],
            ..service(
                "default",
                &name,
                &[],
                vec![ServicePort {
                    node_port: node_port.then_some(30000 + (s % 2700) as u16),
                    ..port("http", Protocol::Tcp, 80, 8080)
                }],
            )
        }));
        out.push(Object::EndpointSlice(slice(
            "default",
            &format!("{name}-1"),
            &name,
            vec![slice_port("http", Protocol::Tcp, 8080)],
            (0..per)
                .map(|e| Endpoint {
                    node_name: Some(format!("node-{}", e % 3).into()),
                    ..Endpoint::ready(IpAddr::V4(Ipv4Addr::new(
                        10,
                        244,
                        (s % 250) as u8,
                        e as u8 + 1,
                    )))
                })
                .collect(),
        )));
    }
    out
}

fn bench(c: &mut Criterion) {
    let store = builders::store(objects(10_000, 10));
    let ctx = node("node-0", &["192.0.2.1"], &["192.0.2.1"]);
    let metrics = Metrics::new();
    let mut g = c.benchmark_group("compile");
    g.sample_size(10);
    g.bench_function("10k_services_x_10_endpoints", |b| {
        b.iter(|| store.compile(&ctx, &metrics, 1))
    });
    // One EndpointSlice changed between compiles, with the cache the control
    // loop keeps: only that Service is compiled again.
    // Unique nodePorts here (the objects above reuse some, and a frontend
    // claimed twice makes every compile a full one).
    let mut next_port = 30000u16;
    let unique: Vec<Object> = objects(10_000, 10)
        .into_iter()
        .map(|o| match o {
            Object::Service(mut s) if s.ports[0].node_port.is_some() => {
                s.ports[0].node_port = Some(next_port);
                next_port += 1;
                Object::Service(s)
            }
            other => other,
        })
        .collect();
    let mut changed = builders::store(unique);
    let mut cache = CompileCache::default();
    changed.compile_with(&ctx, &metrics, 1, &mut cache);
    let flip = objects(1, 10).pop().map(|o| match o {
        Object::EndpointSlice(mut s) => {
            s.endpoints.truncate(5);
            Object::EndpointSlice(s)
        }
        other => other,
    });
    g.bench_function("one_slice_changed_10k_services_cached", |b| {
        let mut n = 0u64;
        b.iter(|| {
            // Alternate the slice so every iteration sees a change.
            n += 1;
            if n.is_multiple_of(2) {
                changed.apply(Update::Upsert(Box::new(flip.clone().unwrap())));
            } else {
                changed.apply(Update::Upsert(Box::new(objects(1, 10).pop().unwrap())));
            }
            changed.compile_with(&ctx, &metrics, n, &mut cache)
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
