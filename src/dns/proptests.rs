//! The zone kept up to date change by change ([`ZoneParts`]) is the zone a
//! full build of the same store gives, after every change of a generated
//! sequence: Services of every kind coming, changing and going, slices and
//! Pods (selectors) under them, addresses shared between Services (one PTR
//! name with records from several parts).

use hickory_proto::rr::Name;
use proptest::prelude::*;

use super::{Zone, ZoneConfig, ZoneParts};
use crate::discovery::Update;
use crate::model::*;
use crate::state::Store;
use crate::testing::builders::{self, labels};

fn pick<T: Clone + std::fmt::Debug + 'static>(items: &'static [T]) -> impl Strategy<Value = T> {
    prop::sample::select(items)
}

/// Few addresses, so names are shared.
const IPS: &[&str] = &["10.96.0.1", "10.244.0.1", "10.244.0.2", "fd00::1"];

#[derive(Debug, Clone)]
enum Op {
    Service {
        i: usize,
        kind: u8,
        ip: &'static str,
        named: bool,
        app: Option<&'static str>,
        publish_not_ready: bool,
    },
    DeleteService(usize),
    Slice {
        i: usize,
        eps: Vec<(&'static str, bool, Option<&'static str>)>,
    },
    DeleteSlice(usize),
    Pod {
        j: usize,
        app: &'static str,
        ip: &'static str,
        ready: bool,
        hostname: bool,
    },
    DeletePod(usize),
}

fn op() -> impl Strategy<Value = Op> {
    let service = (
        0..3usize,
        0..3u8,
        pick(IPS),
        any::<bool>(),
        proptest::option::of(pick(&["web", "db"])),
        any::<bool>(),
    )
        .prop_map(|(i, kind, ip, named, app, publish_not_ready)| Op::Service {
            i,
            kind,
            ip,
            named,
            app,
            publish_not_ready,
        });
    let ep = (
        pick(IPS),
        any::<bool>(),
        proptest::option::of(pick(&["h0", "h1"])),
    );
    let slice =
        (0..3usize, prop::collection::vec(ep, 0..3)).prop_map(|(i, eps)| Op::Slice { i, eps });
    let pod = (
        0..3usize,
        pick(&["web", "db"]),
        pick(IPS),
        any::<bool>(),
        any::<bool>(),
    )
        .prop_map(|(j, app, ip, ready, hostname)| Op::Pod {
            j,
            app,
            ip,
            ready,
            hostname,
        });
    prop_oneof![
        4 => service,
        1 => (0..3usize).prop_map(Op::DeleteService),
        3 => slice,
        1 => (0..3usize).prop_map(Op::DeleteSlice),
        2 => pod,
        1 => (0..3usize).prop_map(Op::DeletePod),
    ]
}

fn update(op: Op) -> Update {
    let svc_name = |i: usize| format!("s{i}");
    match op {
        Op::Service {
            i,
            kind,
            ip,
            named,
            app,
            publish_not_ready,
        } => {
            let name = if named { "http" } else { "" };
            let ips: &[&str] = if kind == 0 { &[ip] } else { &[] };
            let base = builders::service(
                "default",
                &svc_name(i),
                ips,
                vec![builders::port(name, Protocol::Tcp, 80, 8080)],
            );
            let svc = Service {
                headless: kind == 1,
                service_type: if kind == 2 {
                    ServiceType::ExternalName
                } else {
                    ServiceType::ClusterIp
                },
                external_name: (kind == 2).then(|| "db.example.com".to_string()),
                selector: app.map(|a| labels(&[("app", a)])),
                publish_not_ready,
                ..base
            };
            Update::Upsert(Box::new(Object::Service(svc)))
        }
        Op::DeleteService(i) => {
            Update::Delete(Kind::Service, ObjectKey::new("default", svc_name(i)))
        }
        Op::Slice { i, eps } => {
            let endpoints = eps
                .into_iter()
                .map(|(ip, ready, hostname)| {
                    Endpoint {
                        ready,
                        serving: ready,
                        ..builders::endpoint(ip)
                    }
                    .with_hostname(hostname.map(str::to_string))
                })
                .collect();
            let s = builders::slice(
                "default",
                &format!("{}-1", svc_name(i)),
                &svc_name(i),
                vec![builders::slice_port("http", Protocol::Tcp, 8080)],
                endpoints,
            );
            Update::Upsert(Box::new(Object::EndpointSlice(s)))
        }
        Op::DeleteSlice(i) => Update::Delete(
            Kind::EndpointSlice,
            ObjectKey::new("default", format!("{}-1", svc_name(i))),
        ),
        Op::Pod {
            j,
            app,
            ip,
            ready,
            hostname,
        } => Update::Upsert(Box::new(Object::Pod(Pod {
            ready,
            hostname: hostname.then(|| format!("p{j}")),
            subdomain: hostname.then(|| svc_name(j)),
            ..builders::pod("default", &format!("p{j}"), ip, labels(&[("app", app)]))
        }))),
        Op::DeletePod(j) => Update::Delete(Kind::Pod, ObjectKey::new("default", format!("p{j}"))),
    }
}

/// Every name with its node, in name order.
fn names(z: &Zone) -> Vec<(Name, super::zone::Node)> {
    let mut v: Vec<(Name, super::zone::Node)> = z
        .iter()
        .map(|(n, node)| (n.clone(), node.clone()))
        .collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 128,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn a_zone_updated_change_by_change_is_the_full_build(
        ops in prop::collection::vec(op(), 1..24),
    ) {
        let cfg = ZoneConfig::new("cluster.local", 5).unwrap();
        let mut st = Store::new();
        let mut parts = ZoneParts::new(&cfg);
        let mut published = Zone::empty(&cfg);
        for (g, op) in (1u64..).zip(ops) {
            st.apply(update(op));
            let dirty = st.take_dirty();
            match parts.update(&st, &dirty, g) {
                // A new zone, with this generation's serial.
                Some(kept) => published = kept,
                // No record changed: the zone published before is still
                // the full build, serial included.
                None => prop_assert!(published.generation < g),
            }
            let full = Zone::compile(&st, &cfg, published.generation);
            prop_assert_eq!(names(&published), names(&full), "generation {}", g);
            prop_assert_eq!(published.soa(), full.soa());
            if let Err(e) = parts.check_refs() {
                prop_assert!(false, "generation {}: {}", g, e);
            }
        }
    }
}
