//! The DNS query path and the DNS zone compile.
//! Run: cargo bench --features testing --bench dns
//!
//! `dns/answer_*` is the whole per-query cost inside ringvip (parse with
//! hickory-proto, one lookup, copy of the precomputed records); the socket
//! round trip comes on top and is measured by benches/dns-compare.sh.
//!
//! `dns/one_change_{1k,10k,100k}_services`: one Service's ClusterIP changed,
//! then the zone brought up to date and published as the control loop does
//! (`ZoneParts::update` with the store's record of what changed). Flat from
//! 1k to 100k is the goal (issue 17): a change costs what it touches.
//! `dns/one_endpoint_change_*`: one endpoint of a ClusterIP Service flips
//! readiness, which changes no record: the zone is left as published.

use std::net::{IpAddr, Ipv4Addr};

use criterion::{criterion_group, criterion_main, Criterion};
use hickory_proto::op::{Message, MessageType, OpCode, Query};
use hickory_proto::rr::{Name, RecordType};
use ringvip::discovery::Update;
use ringvip::dns::{answer, Options, Transport, Zone, ZoneConfig, ZoneParts};
use ringvip::model::*;
use ringvip::state::Store;
use ringvip::testing::builders::{self, endpoint, labels, pod, port, service, slice, slice_port};

/// ClusterIP Service `s` with one named port, at the `v`th of its addresses.
fn cluster_ip_service(s: u32, v: u8) -> Service {
    let [_, a, b, c] = (s + 1).to_be_bytes();
    Service {
        cluster_ips: vec![IpAddr::V4(Ipv4Addr::new(10, 96 + a + v, b, c))],
        ..service(
            "default",
            &format!("svc-{s}"),
            &[],
            vec![port("http", Protocol::Tcp, 80, 8080)],
        )
    }
}

/// `services` ClusterIP Services with one named port, plus one headless Service
/// with 10 ready endpoints from Pods matched by its selector.
fn store(services: u32) -> Store {
    let mut objs = Vec::new();
    for s in 0..services {
        objs.push(Object::Service(cluster_ip_service(s, 0)));
    }
    let app = labels(&[("app", "db")]);
    objs.push(Object::Service(Service {
        headless: true,
        selector: Some(app.clone()),
        ..service(
            "default",
            "db",
            &[],
            vec![port("pg", Protocol::Tcp, 5432, 5432)],
        )
    }));
    for i in 0..10u8 {
        let name = format!("db-{i}");
        objs.push(Object::Pod(Pod {
            hostname: Some(name.clone()),
            subdomain: Some("db".into()),
            ..pod(
                "default",
                &name,
                &format!("10.244.0.{}", i + 1),
                app.clone(),
            )
        }));
    }
    builders::store(objs)
}

fn query(name: &str, t: RecordType) -> Vec<u8> {
    let mut m = Message::new(1, MessageType::Query, OpCode::Query);
    m.add_query(Query::query(Name::from_ascii(name).unwrap(), t));
    m.to_vec().unwrap()
}

fn bench(c: &mut Criterion) {
    let cfg = ZoneConfig::new("cluster.local", 5).unwrap();
    let st = store(10_000);
    let zone = Zone::compile(&st, &cfg, 1);
    let mut out = Vec::with_capacity(65535);
    let mut g = c.benchmark_group("dns");
    for (id, name, t) in [
        (
            "answer_a",
            "svc-4242.default.svc.cluster.local.",
            RecordType::A,
        ),
        (
            "answer_headless_10",
            "db.default.svc.cluster.local.",
            RecordType::A,
        ),
        (
            "answer_nxdomain",
            "svc-4242.default.svc.cluster.local.default.svc.cluster.local.",
            RecordType::A,
        ),
        (
            "answer_srv",
            "_http._tcp.svc-7.default.svc.cluster.local.",
            RecordType::SRV,
        ),
    ] {
        let q = query(name, t);
        g.bench_function(id, |b| {
            b.iter(|| answer(&zone, &q, Transport::Udp, Options::default(), 0, &mut out))
        });
    }
    g.sample_size(10);
    g.bench_function("compile_10k_services", |b| {
        b.iter(|| Zone::compile(&st, &cfg, 1))
    });
    g.finish();
}

fn one_change(c: &mut Criterion) {
    let cfg = ZoneConfig::new("cluster.local", 5).unwrap();
    let mut g = c.benchmark_group("dns");
    g.sample_size(20);
    for (label, n) in [("1k", 1_000u32), ("10k", 10_000), ("100k", 100_000)] {
        let mut st = store(n);
        let mut parts = ZoneParts::new(&cfg);
        let mut gen = 1u64;
        let all = st.take_dirty();
        parts.update(&st, &all, gen);
        g.bench_function(format!("one_change_{label}_services"), |b| {
            b.iter(|| {
                // One Service's address moves back and forth, so every
                // iteration changes its A and PTR names.
                gen += 1;
                let svc = cluster_ip_service(n / 2, (gen % 2) as u8);
                st.apply(Update::Upsert(Box::new(Object::Service(svc))));
                let dirty = st.take_dirty();
                parts.update(&st, &dirty, gen)
            })
        });
        // An endpoint of a ClusterIP Service becomes ready or not: no
        // record changes, so the part is built, found equal and dropped.
        g.bench_function(format!("one_endpoint_change_{label}_services"), |b| {
            b.iter(|| {
                gen += 1;
                let eps = Endpoint {
                    ready: gen.is_multiple_of(2),
                    ..endpoint("10.244.9.9")
                };
                let ports = vec![slice_port("http", Protocol::Tcp, 8080)];
                let svc = format!("svc-{}", n / 2);
                let es = slice("default", &format!("{svc}-1"), &svc, ports, vec![eps]);
                st.apply(Update::Upsert(Box::new(Object::EndpointSlice(es))));
                let dirty = st.take_dirty();
                parts.update(&st, &dirty, gen)
            })
        });
    }
    g.finish();
}

criterion_group!(benches, bench, one_change);
criterion_main!(benches);
