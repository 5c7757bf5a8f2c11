//! Property tests of the snapshot compile: for generated stores (small address
//! and port pools, so frontends collide and endpoints repeat), every frontend
//! uses only endpoints SEMANTICS.md allows, exactly the allowed set when the
//! rules leave no choice; listeners exist for exactly the frontends that may
//! accept; compile is deterministic; a compile with the control loop's cache
//! (recompiling, or patching, only what changed) gives what a full one gives.

use std::net::IpAddr;
use std::time::Duration;

use ipnet::IpNet;
use proptest::prelude::*;

use super::snapshot::{CompileCache, ListenerMode, NodeContext, Snapshot};
use super::store::Store;
use crate::discovery::Update;
use crate::model::*;
use crate::telemetry::Metrics;
use crate::testing::{check_snapshot, listeners_in, normalized};

const NODE: &str = "node-a";

fn config() -> ProptestConfig {
    ProptestConfig {
        cases: 96,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn pick<T: Clone + std::fmt::Debug + 'static>(items: &'static [T]) -> impl Strategy<Value = T> {
    prop::sample::select(items)
}

fn protocol() -> impl Strategy<Value = Protocol> {
    prop_oneof![3 => Just(Protocol::Tcp), 1 => Just(Protocol::Udp)]
}

fn namespace() -> impl Strategy<Value = &'static str> {
    prop_oneof![5 => Just("default"), 1 => Just("other")]
}

fn policy() -> impl Strategy<Value = TrafficPolicy> {
    prop_oneof![3 => Just(TrafficPolicy::Cluster), 2 => Just(TrafficPolicy::Local)]
}

/// Addresses a Service may use; few, so frontends collide.
const CLUSTER_IPS: &[&str] = &["10.96.0.1", "10.96.0.2", "fd00:10:96::1"];
const EXTERNAL_IPS: &[&str] = &["192.0.2.1", "192.0.2.2", "2001:db8::1"];

fn subset(pool: &'static [&'static str]) -> impl Strategy<Value = Vec<IpAddr>> {
    prop::sample::subsequence(pool, 0..=pool.len()).prop_map(|v| v.into_iter().map(ip).collect())
}

fn service(i: usize) -> impl Strategy<Value = Service> {
    let ports = prop::collection::vec(
        (
            protocol(),
            pick(&[53u16, 80, 443]),
            proptest::option::of(pick(&[30000u16, 30001])),
        ),
        1..4,
    );
    let kind = (
        pick(&[
            ServiceType::ClusterIp,
            ServiceType::NodePort,
            ServiceType::LoadBalancer,
            ServiceType::ExternalName,
        ]),
        prop::bool::weighted(0.1),
        prop_oneof![
            4 => Just(None),
            1 => Just(Some("ringvip".to_string())),
            1 => Just(Some("other".to_string()))
        ],
        any::<bool>(),
    );
    let addrs = (
        subset(CLUSTER_IPS),
        subset(EXTERNAL_IPS),
        subset(EXTERNAL_IPS),
        proptest::option::of(pick(&["192.0.2.0/24", "0.0.0.0/0", "2001:db8::/32"])),
    );
    let behaviour = (
        policy(),
        policy(),
        any::<bool>(),
        proptest::option::of(pick(&[31000u16, 31001])),
    );
    (namespace(), ports, kind, addrs, behaviour).prop_map(
        move |(ns, ports, kind, addrs, behaviour)| {
            let (service_type, headless, proxy_name, allocate) = kind;
            let (cluster_ips, external_ips, lb_ips, range) = addrs;
            let (etp, itp, affinity, hcnp) = behaviour;
            let names = ["", "a", "b"];
            Service {
                service_type,
                headless,
                proxy_name,
                allocate_lb_node_ports: allocate,
                cluster_ips,
                external_ips,
                load_balancer_ips: lb_ips,
                source_ranges: range.iter().map(|r| r.parse::<IpNet>().unwrap()).collect(),
                external_policy: etp,
                internal_policy: itp,
                affinity: if affinity {
                    Affinity::ClientIp {
                        timeout: Duration::from_secs(60),
                    }
                } else {
                    Affinity::None
                },
                health_check_node_port: hcnp,
                ports: ports
                    .into_iter()
                    .enumerate()
                    .map(|(j, (protocol, port, node_port))| ServicePort {
                        name: names[j].to_string(),
                        protocol,
                        port,
                        node_port,
                        target_port: TargetPort::Number(8080),
                    })
                    .collect(),
                ..Service::new(ObjectKey::new(ns, format!("s{i}")))
            }
        },
    )
}

fn endpoint(v6: bool) -> impl Strategy<Value = Endpoint> {
    (
        1u8..6,
        any::<(bool, bool, bool)>(),
        prop_oneof![Just(None), Just(Some(NODE)), Just(Some("node-b"))],
        prop_oneof![
            Just(None),
            Just(Some(vec![])),
            Just(Some(vec!["zone-a".to_string()])),
            Just(Some(vec!["zone-b".to_string()])),
        ],
    )
        .prop_map(
            move |(h, (ready, serving, terminating), node, hints)| Endpoint {
                ip: if v6 {
                    IpAddr::V6(std::net::Ipv6Addr::new(
                        0xfd00,
                        0,
                        0,
                        0,
                        0,
                        0,
                        0,
                        u16::from(h),
                    ))
                } else {
                    IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, h))
                },
                ready,
                serving,
                terminating,
                node_name: node.map(Into::into),
                zone: None,
                extra: crate::model::EndpointExtra::boxed(hints, None, None),
            },
        )
}

/// Slices of `svc` (most of them joined to it, some to nothing), their ports
/// drawn from the Service's own so that they usually match.
fn slices_for(svc: &Service) -> impl Strategy<Value = Vec<EndpointSlice>> {
    let ports: Vec<(String, Protocol)> = svc
        .ports
        .iter()
        .map(|p| (p.name.clone(), p.protocol))
        .collect();
    let key = svc.key.clone();
    let n = ports.len();
    prop::collection::vec(
        (
            any::<bool>(),
            prop::bool::weighted(0.9),
            prop::collection::vec(
                (
                    prop::bool::weighted(0.85),
                    prop::bool::weighted(0.9),
                    prop::option::weighted(0.9, pick(&[8080u16, 9090])),
                ),
                n,
            ),
            prop::collection::vec(endpoint(false), 0..6),
            prop::collection::vec(endpoint(true), 0..6),
        ),
        0..3,
    )
    .prop_map(move |raw| {
        raw.into_iter()
            .enumerate()
            .map(|(j, (v6, own, port_picks, eps4, eps6))| EndpointSlice {
                key: ObjectKey::new(key.namespace.clone(), format!("{}-{j}", key.name)),
                service_name: if own {
                    key.name.clone()
                } else {
                    "nobody".into()
                },
                family: if v6 {
                    AddressFamily::V6
                } else {
                    AddressFamily::V4
                },
                ports: ports
                    .iter()
                    .zip(&port_picks)
                    .filter(|(_, (include, _, _))| *include)
                    .map(|((name, proto), (_, same, port))| SlicePort {
                        name: name.clone(),
                        protocol: match (same, proto) {
                            (true, p) => *p,
                            (false, Protocol::Tcp) => Protocol::Udp,
                            (false, Protocol::Udp) => Protocol::Tcp,
                        },
                        port: *port,
                    })
                    .collect(),
                endpoints: if v6 { eps6 } else { eps4 },
            })
            .collect()
    })
}

/// Objects and this node's context.
/// Pods for the Services' selectors (`app: web|db`), on this node or another.
fn pods() -> impl Strategy<Value = Vec<Pod>> {
    let pod = (
        namespace(),
        pick(&["web", "db"]),
        pick(&["10.1.0.1", "10.1.0.2", "fd00:1::1"]),
        any::<bool>(),
        pick(&[NODE, "node-b"]),
    );
    prop::collection::vec(pod, 0..4).prop_map(|v| {
        v.into_iter()
            .enumerate()
            .map(|(j, (ns, app, addr, ready, node))| Pod {
                node_name: Some(node.into()),
                ready,
                ..crate::testing::builders::pod(
                    ns,
                    &format!("p{j}"),
                    addr,
                    crate::testing::builders::labels(&[("app", app)]),
                )
            })
            .collect()
    })
}

#[derive(Debug, Clone)]
struct World {
    objects: Vec<Object>,
    ctx: NodeContext,
}

fn world() -> impl Strategy<Value = World> {
    let services = (service(0), service(1), service(2), service(3), 0..=4usize)
        .prop_map(|(a, b, c, d, n)| [a, b, c, d].into_iter().take(n).collect::<Vec<_>>())
        .prop_flat_map(|svcs| {
            let slices: Vec<_> = svcs.iter().map(slices_for).collect();
            (Just(svcs), slices)
        });
    (
        services,
        proptest::option::of(pick(&["zone-a", "zone-b"])),
        proptest::option::of(pick(&["zone-a", "zone-b"])),
        any::<bool>(),
        (
            prop::collection::vec(proptest::option::of(pick(&["web", "db"])), 4),
            pods(),
        ),
    )
        .prop_map(
            |((svcs, slices), ctx_zone, node_zone, dual, (selectors, pods))| {
                let mut objects: Vec<Object> = svcs
                    .into_iter()
                    .zip(selectors)
                    .map(|(svc, app)| Service {
                        selector: app.map(|a| crate::testing::builders::labels(&[("app", a)])),
                        ..svc
                    })
                    .map(Object::Service)
                    .collect();
                objects.extend(pods.into_iter().map(Object::Pod));
                objects.extend(slices.into_iter().flatten().map(Object::EndpointSlice));
                if let Some(z) = node_zone {
                    objects.push(Object::Node(Node {
                        name: NODE.into(),
                        zone: Some(z.into()),
                        addresses: vec![],
                        deleting: false,
                    }));
                }
                let mut nodeport_addresses = vec![ip("127.0.0.1")];
                if dual {
                    nodeport_addresses.push(ip("::1"));
                }
                let mut local_addresses = nodeport_addresses.clone();
                // 192.0.2.1 is this host's, 192.0.2.2 is not.
                local_addresses.push(ip("192.0.2.1"));
                World {
                    objects,
                    ctx: NodeContext {
                        node_name: NODE.into(),
                        zone: ctx_zone.map(str::to_string),
                        proxy_name: "ringvip".into(),
                        nodeport_addresses,
                        local_addresses,
                        proxy_protocol_from: Vec::new(),
                    },
                }
            },
        )
}

/// A store holding `st`'s objects, built from scratch (nothing kept from
/// the changes that led to `st`).
fn rebuilt(st: &Store) -> Store {
    let mut objects: Vec<Object> = st.services.values().cloned().map(Object::Service).collect();
    objects.extend(st.slices.values().cloned().map(Object::EndpointSlice));
    objects.extend(st.nodes.values().cloned().map(Object::Node));
    objects.extend(st.pods.values().cloned().map(Object::Pod));
    objects.extend(st.endpoints.values().cloned().map(Object::Endpoints));
    let mut fresh = Store::new();
    fresh.apply(Update::Reset(objects));
    fresh
}

fn compile(objects: Vec<Object>, ctx: &NodeContext) -> (Store, Snapshot) {
    let mut st = Store::new();
    st.apply(Update::Reset(objects));
    let snap = st.compile(ctx, &Metrics::new(), 7);
    (st, snap)
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn compiled_frontends_follow_the_policy_rules(w in world()) {
        let (st, snap) = compile(w.objects, &w.ctx);
        // The same oracle the `compile` fuzz target uses.
        check_snapshot(&st, &w.ctx, &snap);
    }

    /// What `ringvip explain` reads of a frontend (its candidates, policy
    /// and zone) explains exactly the endpoints the compile kept, in order.
    #[test]
    fn explained_endpoints_are_the_compiled_ones(w in world()) {
        let (_, snap) = compile(w.objects, &w.ctx);
        for (key, fe) in snap.frontends() {
            let c = &fe.candidates;
            let all = c.endpoints();
            let eligible: Vec<_> = all
                .iter()
                .filter(|e| super::explain_endpoint(&all, e, c.place(), fe.policy).is_eligible())
                .map(|e| e.addr)
                .collect();
            prop_assert_eq!(&eligible[..], &fe.endpoints[..], "{:?}", key);
            prop_assert!(all.iter().all(|e| e.addr.is_ipv4() == key.addr.is_ipv4()));
        }
    }

    #[test]
    fn compile_is_deterministic(w in world()) {
        let (st, a) = compile(w.objects.clone(), &w.ctx);
        let b = st.compile(&w.ctx, &Metrics::new(), 7);
        prop_assert_eq!(normalized(&a), normalized(&b));
        // The order objects arrive in changes nothing.
        let mut rev = w.objects;
        rev.reverse();
        let (_, c) = compile(rev, &w.ctx);
        prop_assert_eq!(normalized(&a), normalized(&c));
    }

    /// Store `a`, then `b`'s objects one change at a time, then some of
    /// `a`'s deleted one at a time (Pods among them: selectors derive
    /// slices): after every change the compile with the cache (a patch of
    /// the last snapshot when it can, else the changed Services recompiled)
    /// gives exactly the snapshot a full compile of the same objects, in a
    /// store built from scratch, gives.
    #[test]
    fn cached_compile_equals_a_full_compile(
        a in world(),
        b in world(),
        deletes in proptest::collection::vec(any::<bool>(), 12),
    ) {
        let metrics = Metrics::new();
        let mut st = Store::new();
        let mut cache = CompileCache::default();
        let mut updates = vec![Update::Reset(a.objects.clone())];
        updates.extend(
            b.objects
                .into_iter()
                .filter(|o| !matches!(o, Object::Node(_)))
                .map(|o| Update::Upsert(Box::new(o))),
        );
        updates.extend(
            a.objects
                .iter()
                .zip(&deletes)
                .filter(|(_, d)| **d)
                .map(|(o, _)| {
                    let (kind, key) = o.id();
                    Update::Delete(kind, key)
                }),
        );
        for (g, u) in (1u64..).zip(updates) {
            st.apply(u);
            let cached = st.compile_with(&a.ctx, &metrics, g, &mut cache);
            // From scratch: the slices derived from Pods are kept up to date
            // change by change, and this checks that too.
            let full = rebuilt(&st).compile(&a.ctx, &metrics, g);
            prop_assert_eq!(normalized(&cached), normalized(&full), "generation {}", g);
            prop_assert_eq!(cached.skipped_ports, full.skipped_ports);
        }
    }
}

/// The generator reaches the interesting cases (or the properties are idle).
#[test]
fn generated_worlds_cover_the_cases() {
    use proptest::strategy::ValueTree;
    use proptest::test_runner::TestRunner;
    let mut runner = TestRunner::deterministic();
    let (mut accept, mut drop, mut terminating, mut conflicts, mut local_only) = (0, 0, 0, 0, 0);
    for _ in 0..300 {
        let w = world().new_tree(&mut runner).unwrap().current();
        let (st, snap) = compile(w.objects, &w.ctx);
        accept += listeners_in(&snap, ListenerMode::Accept);
        drop += listeners_in(&snap, ListenerMode::Drop);
        conflicts += snap.conflicts.len();
        for (_, fe) in snap.frontends() {
            let svc = &st.services[&fe.service];
            if fe.endpoints.iter().any(|e| {
                st.slices.values().any(|s| {
                    s.endpoints
                        .iter()
                        .any(|x| x.ip == e.ip() && !x.ready && x.terminating)
                })
            }) {
                terminating += 1;
            }
            if svc.internal_policy == TrafficPolicy::Local && !fe.endpoints.is_empty() {
                local_only += 1;
            }
        }
    }
    eprintln!("accept {accept} drop {drop} terminating {terminating} conflicts {conflicts} local {local_only}");
    assert!(accept > 40 && drop > 5 && terminating > 20 && conflicts > 0 && local_only > 20,
        "accept {accept} drop {drop} terminating {terminating} conflicts {conflicts} local {local_only}");
}
