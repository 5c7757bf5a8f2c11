//! Property tests of the snapshot compile: for generated stores (small address
//! and port pools, so frontends collide and endpoints repeat), every frontend
//! uses only endpoints SEMANTICS.md allows, exactly the allowed set when the
//! rules leave no choice; listeners exist for exactly the frontends that may
//! accept; compile is deterministic.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use ipnet::IpNet;
use proptest::prelude::*;

use super::snapshot::{EmptyAction, FrontendKind, ListenerMode, NodeContext, Snapshot};
use super::store::Store;
use crate::discovery::Update;
use crate::model::*;
use crate::telemetry::Metrics;

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
                node_name: node.map(str::to_string),
                zone: None,
                zone_hints: hints,
                hostname: None,
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
    )
        .prop_map(|((svcs, slices), ctx_zone, node_zone, dual)| {
            let mut objects: Vec<Object> = svcs.into_iter().map(Object::Service).collect();
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
                },
            }
        })
}

fn compile(objects: Vec<Object>, ctx: &NodeContext) -> (Store, Snapshot) {
    let mut st = Store::new();
    st.apply(Update::Reset(objects));
    let snap = st.compile(ctx, &Metrics::new(), 7);
    (st, snap)
}

/// One merged view of a Service port's endpoints of one family, as
/// SEMANTICS.md describes the inputs: every copy of every address.
#[derive(Debug, Default)]
struct Copies {
    by_addr: BTreeMap<SocketAddr, Vec<Endpoint>>,
}

impl Copies {
    fn of(st: &Store, svc: &Service, sp: &ServicePort, v6: bool) -> Copies {
        let mut c = Copies::default();
        for s in st.slices.values() {
            if s.key.namespace != svc.key.namespace || s.service_name != svc.key.name {
                continue;
            }
            if (s.family == AddressFamily::V6) != v6 {
                continue;
            }
            let Some(port) = s
                .ports
                .iter()
                .find(|p| p.name == sp.name && p.protocol == sp.protocol)
                .and_then(|p| p.port)
            else {
                continue;
            };
            for e in &s.endpoints {
                if e.ip.is_ipv6() == v6 {
                    c.by_addr
                        .entry(SocketAddr::new(e.ip, port))
                        .or_default()
                        .push(e.clone());
                }
            }
        }
        c
    }

    fn has_duplicates(&self) -> bool {
        self.by_addr.values().any(|v| v.len() > 1)
    }
}

fn is_local(e: &Endpoint) -> bool {
    e.node_name.as_deref() == Some(NODE)
}

/// Checks one snapshot against the store it came from.
fn check(st: &Store, ctx: &NodeContext, snap: &Snapshot) -> Result<(), TestCaseError> {
    let zone = ctx
        .zone
        .clone()
        .or_else(|| st.node(NODE).and_then(|n| n.zone.clone()));
    let local: BTreeSet<IpAddr> = ctx.local_addresses.iter().copied().collect();
    for (key, fe) in snap.frontends() {
        let svc = st
            .services
            .get(&fe.service)
            .expect("frontend of a stored Service");
        prop_assert!(
            svc.is_proxied(&ctx.proxy_name),
            "{} is not proxied",
            svc.key
        );
        let sp = svc
            .ports
            .iter()
            .find(|p| p.name == fe.port_name && p.protocol == fe.proto)
            .expect("frontend of a Service port");
        prop_assert_eq!(key.proto, sp.protocol);
        let a = key.addr;
        let policy = match fe.kind {
            FrontendKind::ClusterIp => {
                prop_assert!(svc.cluster_ips.contains(&a.ip()) && a.port() == sp.port);
                svc.internal_policy
            }
            FrontendKind::NodePort => {
                prop_assert!(ctx.nodeport_addresses.contains(&a.ip()));
                prop_assert_eq!(Some(a.port()), sp.node_port);
                prop_assert!(
                    svc.service_type == ServiceType::NodePort
                        || (svc.service_type == ServiceType::LoadBalancer
                            && svc.allocate_lb_node_ports)
                );
                svc.external_policy
            }
            FrontendKind::LoadBalancer => {
                prop_assert!(svc.service_type == ServiceType::LoadBalancer);
                prop_assert!(svc.load_balancer_ips.contains(&a.ip()) && a.port() == sp.port);
                svc.external_policy
            }
            FrontendKind::ExternalIp => {
                prop_assert!(svc.external_ips.contains(&a.ip()) && a.port() == sp.port);
                svc.external_policy
            }
        };
        if fe.kind != FrontendKind::LoadBalancer {
            prop_assert!(fe.source_ranges.is_empty());
        }
        // A stable order without repeats.
        prop_assert!(
            fe.endpoints.windows(2).all(|w| w[0] < w[1]),
            "{:?}",
            fe.endpoints
        );

        let copies = Copies::of(st, svc, sp, a.is_ipv6());
        let usable = |e: &Endpoint| e.ready || (e.serving && e.terminating);
        for ep in fe.endpoints.iter() {
            let c = copies.by_addr.get(ep);
            prop_assert!(
                c.is_some(),
                "{} uses {} which no slice of {} has",
                a,
                ep,
                svc.key
            );
            let c = c.map(Vec::as_slice).unwrap_or_default();
            // Never an endpoint that is neither ready nor serving-and-terminating.
            prop_assert!(c.iter().any(usable), "{a}: {ep} is not usable: {c:?}");
            if policy == TrafficPolicy::Local {
                prop_assert!(c.iter().any(is_local), "{a}: Local policy uses remote {ep}");
            }
        }
        if policy == TrafficPolicy::Cluster && fe.endpoints.is_empty() {
            prop_assert_eq!(fe.when_empty, EmptyAction::Refuse);
        }

        // Where no address repeats, the set is exactly what the rules give.
        if !copies.has_duplicates() {
            let one = |addr: &SocketAddr| copies.by_addr[addr][0].clone();
            let pool: Vec<SocketAddr> = copies
                .by_addr
                .keys()
                .copied()
                .filter(|x| policy == TrafficPolicy::Cluster || is_local(&one(x)))
                .collect();
            let ready: BTreeSet<SocketAddr> =
                pool.iter().copied().filter(|x| one(x).ready).collect();
            let fallback: BTreeSet<SocketAddr> = pool
                .iter()
                .copied()
                .filter(|x| one(x).serving && one(x).terminating)
                .collect();
            let got: BTreeSet<SocketAddr> = fe.endpoints.iter().copied().collect();
            if !ready.is_empty() {
                prop_assert!(
                    !got.is_empty() && got.is_subset(&ready),
                    "{a}: {got:?} vs ready {ready:?}"
                );
                if policy == TrafficPolicy::Local || zone.is_none() {
                    prop_assert_eq!(&got, &ready, "{}", a);
                }
            } else {
                prop_assert_eq!(&got, &fallback, "{}: terminating fallback", a);
            }
            // Drop (not refuse) only for Local policy with endpoints elsewhere.
            let cluster_usable = copies.by_addr.values().any(|c| usable(&c[0]));
            if got.is_empty() {
                let want = if policy == TrafficPolicy::Local && cluster_usable {
                    EmptyAction::Drop
                } else {
                    EmptyAction::Refuse
                };
                prop_assert_eq!(fe.when_empty, want, "{}", a);
            }
        }

        // Listeners: exactly for local non-ClusterIP frontends that accept or drop.
        let want_mode = if fe.kind == FrontendKind::ClusterIp
            || !(a.ip().is_loopback() || local.contains(&a.ip()))
        {
            None
        } else if !fe.endpoints.is_empty() {
            Some(ListenerMode::Accept)
        } else if fe.when_empty == EmptyAction::Drop {
            Some(ListenerMode::Drop)
        } else {
            None
        };
        let modes: Vec<ListenerMode> = snap
            .listeners()
            .iter()
            .filter(|l| l.addr == a && l.proto == key.proto)
            .map(|l| l.mode)
            .collect();
        prop_assert_eq!(
            modes,
            want_mode.into_iter().collect::<Vec<_>>(),
            "listener of {}",
            a
        );
    }
    // No listener without its frontend; none refusing ones accept.
    for l in snap.listeners() {
        let fe = snap.frontend(&super::FrontendKey {
            addr: l.addr,
            proto: l.proto,
        });
        prop_assert!(fe.is_some(), "listener {} without a frontend", l.addr);
        if let Some(fe) = fe {
            prop_assert_eq!(l.mode == ListenerMode::Accept, !fe.endpoints.is_empty());
        }
    }
    // Every address of every proxied Service port has a frontend (its own
    // or, on a clash, the first claimant's).
    for svc in st
        .services
        .values()
        .filter(|s| s.is_proxied(&ctx.proxy_name))
    {
        for sp in &svc.ports {
            for ip in &svc.cluster_ips {
                let k = super::FrontendKey {
                    addr: SocketAddr::new(*ip, sp.port),
                    proto: sp.protocol,
                };
                prop_assert!(
                    snap.frontend(&k).is_some(),
                    "{} {:?} has no frontend",
                    svc.key,
                    k
                );
            }
        }
    }
    // Health checks: eTP=Local Services with a healthCheckNodePort, sorted.
    let want: Vec<(u16, ObjectKey)> = {
        let mut v: Vec<_> = st
            .services
            .values()
            .filter(|s| s.is_proxied(&ctx.proxy_name) && s.external_policy == TrafficPolicy::Local)
            .filter_map(|s| s.health_check_node_port.map(|p| (p, s.key.clone())))
            .collect();
        v.sort_by_key(|(p, _)| *p);
        v
    };
    let got: Vec<(u16, ObjectKey)> = snap
        .health_checks
        .iter()
        .map(|h| (h.port, h.service.clone()))
        .collect();
    prop_assert_eq!(got, want);
    Ok(())
}

/// Everything observable in a snapshot, comparable.
fn normalized(s: &Snapshot) -> String {
    let fes: BTreeMap<_, _> = s
        .frontends()
        .map(|(k, f)| {
            (
                *k,
                format!(
                    "{} {} {:?} {:?} {:?} {:?} {:?} {:?} {}",
                    f.service,
                    f.port_name,
                    f.kind,
                    f.endpoints,
                    f.affinity,
                    f.source_ranges,
                    f.when_empty,
                    f.proto,
                    f.port_id
                ),
            )
        })
        .collect();
    format!(
        "{fes:?}\n{:?}\n{:?}\n{:?}\n{} {}",
        s.listeners(),
        s.health_checks,
        s.conflicts,
        s.no_local_internal,
        s.no_local_external
    )
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn compiled_frontends_follow_the_policy_rules(w in world()) {
        let (st, snap) = compile(w.objects, &w.ctx);
        check(&st, &w.ctx, &snap)?;
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
        accept += snap
            .listeners()
            .iter()
            .filter(|l| l.mode == ListenerMode::Accept)
            .count();
        drop += snap
            .listeners()
            .iter()
            .filter(|l| l.mode == ListenerMode::Drop)
            .count();
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
