//! Tests of the snapshot compile: joins, policies, listeners, the cache.

use super::*;
use crate::discovery::Update;
use crate::model::*;
use crate::state::Store;
use crate::telemetry::Metrics;
use crate::testing::builders::{self, endpoint, port, slice_port};
use std::collections::BTreeMap;

/// node-a: NodePorts on 192.0.2.1, which is local with 198.51.100.7.
fn ctx() -> NodeContext {
    builders::node("node-a", &["192.0.2.1"], &["192.0.2.1", "198.51.100.7"])
}

/// default/`name` at 10.96.0.10, port "http" 80/TCP to 8080.
fn svc(name: &str) -> Service {
    builders::service(
        "default",
        name,
        &["10.96.0.10"],
        vec![port("http", Protocol::Tcp, 80, 8080)],
    )
}

fn ep(ip: &str, node: &str, ready: bool, terminating: bool) -> Endpoint {
    Endpoint {
        ready,
        serving: ready || terminating,
        terminating,
        node_name: Some(node.into()),
        ..endpoint(ip)
    }
}

/// IPv4 slice default/`name` of `svc`, port "http" at `port`.
fn slice(name: &str, svc: &str, port: u16, eps: Vec<Endpoint>) -> EndpointSlice {
    EndpointSlice {
        family: AddressFamily::V4,
        ..builders::slice(
            "default",
            name,
            svc,
            vec![slice_port("http", Protocol::Tcp, port)],
            eps,
        )
    }
}

fn compile(objs: Vec<Object>) -> Snapshot {
    builders::snapshot(objs, &ctx())
}

fn fkey(a: &str, proto: Protocol) -> FrontendKey {
    FrontendKey {
        addr: a.parse().unwrap(),
        proto,
    }
}

#[test]
fn clusterip_joins_slices_by_port_name_and_protocol() {
    let mut s2 = slice(
        "web-2",
        "web",
        8080,
        vec![ep("10.0.0.3", "node-b", true, false)],
    );
    s2.ports[0].name = "other".into();
    let snap = compile(vec![
        Object::Service(svc("web")),
        Object::EndpointSlice(slice(
            "web-1",
            "web",
            8080,
            vec![
                ep("10.0.0.1", "node-a", true, false),
                ep("10.0.0.2", "node-b", true, false),
            ],
        )),
        Object::EndpointSlice(s2),
    ]);
    let fe = snap
        .frontend(&fkey("10.96.0.10:80", Protocol::Tcp))
        .unwrap();
    assert_eq!(
        &fe.endpoints[..],
        &[
            "10.0.0.1:8080".parse().unwrap(),
            "10.0.0.2:8080".parse::<SocketAddr>().unwrap()
        ]
    );
    assert!(snap
        .frontend(&fkey("10.96.0.10:80", Protocol::Udp))
        .is_none());
    // ClusterIPs never become kernel listeners
    assert!(snap.listeners().is_empty());
}

#[test]
fn duplicate_endpoints_keep_non_terminating_copy() {
    let snap = compile(vec![
        Object::Service(svc("web")),
        Object::EndpointSlice(slice(
            "a",
            "web",
            8080,
            vec![ep("10.0.0.1", "n", false, true)],
        )),
        Object::EndpointSlice(slice(
            "b",
            "web",
            8080,
            vec![ep("10.0.0.1", "n", true, false)],
        )),
        Object::EndpointSlice(slice(
            "c",
            "web",
            8080,
            vec![ep("10.0.0.2", "n", false, true)],
        )),
    ]);
    let fe = snap
        .frontend(&fkey("10.96.0.10:80", Protocol::Tcp))
        .unwrap();
    // 10.0.0.1 is ready via slice b, so the terminating 10.0.0.2 is not used
    assert_eq!(
        &fe.endpoints[..],
        &["10.0.0.1:8080".parse::<SocketAddr>().unwrap()]
    );
}

#[test]
fn nodeport_lb_and_external_ips_get_listeners_when_local() {
    let mut s = svc("web");
    s.service_type = ServiceType::LoadBalancer;
    s.ports[0].node_port = Some(30080);
    s.load_balancer_ips = vec![
        "198.51.100.7".parse().unwrap(),
        "203.0.113.9".parse().unwrap(),
    ];
    s.external_ips = vec!["198.51.100.7".parse().unwrap()];
    s.ports.push(ServicePort {
        node_port: Some(30053),
        ..port("dns", Protocol::Udp, 53, 53)
    });
    let mut sl = slice(
        "w",
        "web",
        8080,
        vec![ep("10.0.0.1", "node-b", true, false)],
    );
    sl.ports.push(slice_port("dns", Protocol::Udp, 5353));
    let snap = compile(vec![Object::Service(s), Object::EndpointSlice(sl)]);
    let l: Vec<_> = snap
        .listeners()
        .iter()
        .map(|l| (l.addr.to_string(), l.proto))
        .collect();
    assert_eq!(
        l,
        vec![
            ("192.0.2.1:30053".to_string(), Protocol::Udp),
            ("192.0.2.1:30080".to_string(), Protocol::Tcp),
            ("198.51.100.7:53".to_string(), Protocol::Udp),
            ("198.51.100.7:80".to_string(), Protocol::Tcp),
        ]
    );
    // the externalIP equals an LB IP: first claim wins, conflict recorded
    assert_eq!(snap.conflicts.len(), 2);
    // non-local LB IP is a frontend (for the TUN path) but not a listener
    assert!(snap
        .frontend(&fkey("203.0.113.9:80", Protocol::Tcp))
        .is_some());
    let udp = snap
        .frontend(&fkey("192.0.2.1:30053", Protocol::Udp))
        .unwrap();
    assert_eq!(
        &udp.endpoints[..],
        &["10.0.0.1:5353".parse::<SocketAddr>().unwrap()]
    );
}

#[test]
fn lb_without_node_port_allocation_has_no_nodeport() {
    let mut s = svc("web");
    s.service_type = ServiceType::LoadBalancer;
    s.allocate_lb_node_ports = false;
    s.ports[0].node_port = Some(30080);
    let snap = compile(vec![
        Object::Service(s),
        Object::EndpointSlice(slice(
            "w",
            "web",
            8080,
            vec![ep("10.0.0.1", "x", true, false)],
        )),
    ]);
    assert!(snap
        .frontend(&fkey("192.0.2.1:30080", Protocol::Tcp))
        .is_none());
}

#[test]
fn no_endpoints_means_no_listener_so_kernel_refuses() {
    let mut s = svc("web");
    s.service_type = ServiceType::NodePort;
    s.ports[0].node_port = Some(30080);
    let snap = compile(vec![Object::Service(s)]);
    assert!(snap.listeners().is_empty());
    let fe = snap
        .frontend(&fkey("192.0.2.1:30080", Protocol::Tcp))
        .unwrap();
    assert_eq!(fe.when_empty, EmptyAction::Refuse);
}

#[test]
fn external_local_without_local_endpoints_drops() {
    let mut s = svc("web");
    s.service_type = ServiceType::NodePort;
    s.ports[0].node_port = Some(30080);
    s.external_policy = TrafficPolicy::Local;
    let snap = compile(vec![
        Object::Service(s),
        Object::EndpointSlice(slice(
            "w",
            "web",
            8080,
            vec![ep("10.0.0.2", "node-b", true, false)],
        )),
    ]);
    let np = snap
        .frontend(&fkey("192.0.2.1:30080", Protocol::Tcp))
        .unwrap();
    assert!(np.endpoints.is_empty());
    assert_eq!(np.when_empty, EmptyAction::Drop);
    assert_eq!(snap.listeners()[0].mode, ListenerMode::Drop);
    assert_eq!(snap.no_local_external, 1);
    // ClusterIP traffic still uses the remote endpoint (internal policy Cluster)
    let cip = snap
        .frontend(&fkey("10.96.0.10:80", Protocol::Tcp))
        .unwrap();
    assert_eq!(cip.endpoints.len(), 1);
}

#[test]
fn internal_local_uses_local_endpoints_for_clusterip() {
    let mut s = svc("web");
    s.internal_policy = TrafficPolicy::Local;
    let snap = compile(vec![
        Object::Service(s),
        Object::EndpointSlice(slice(
            "w",
            "web",
            8080,
            vec![
                ep("10.0.0.1", "node-a", true, false),
                ep("10.0.0.2", "node-b", true, false),
            ],
        )),
    ]);
    let cip = snap
        .frontend(&fkey("10.96.0.10:80", Protocol::Tcp))
        .unwrap();
    assert_eq!(
        &cip.endpoints[..],
        &["10.0.0.1:8080".parse::<SocketAddr>().unwrap()]
    );
    assert_eq!(snap.no_local_internal, 0);
}

#[test]
fn health_check_counts_distinct_local_ready_endpoints() {
    let mut s = svc("web");
    s.service_type = ServiceType::LoadBalancer;
    s.external_policy = TrafficPolicy::Local;
    s.health_check_node_port = Some(31000);
    let snap = compile(vec![
        Object::Service(s.clone()),
        Object::EndpointSlice(slice(
            "w",
            "web",
            8080,
            vec![
                ep("10.0.0.1", "node-a", true, false),
                ep("10.0.0.2", "node-a", false, true),
                ep("10.0.0.3", "node-b", true, false),
            ],
        )),
    ]);
    assert_eq!(
        snap.health_checks,
        vec![HealthCheck {
            port: 31000,
            service: s.key.clone(),
            local_endpoints: 1
        }]
    );
    // Cluster policy: no health check server.
    s.external_policy = TrafficPolicy::Cluster;
    assert!(compile(vec![Object::Service(s)]).health_checks.is_empty());
}

#[test]
fn skipped_services_have_no_frontends() {
    let mut headless = svc("h");
    headless.headless = true;
    headless.cluster_ips.clear();
    let mut other_proxy = svc("o");
    other_proxy.proxy_name = Some("cilium".into());
    let mut labelled = svc("l");
    labelled.headless_label = true;
    let mut mine = svc("m");
    mine.proxy_name = Some("ringvip".into());
    mine.cluster_ips = vec!["10.96.0.11".parse().unwrap()];
    let snap = compile(vec![
        Object::Service(headless),
        Object::Service(other_proxy),
        Object::Service(labelled),
        Object::Service(mine),
    ]);
    assert_eq!(snap.frontend_count(), 1);
    assert!(snap
        .frontend(&fkey("10.96.0.11:80", Protocol::Tcp))
        .is_some());
}

#[test]
fn source_ranges_only_on_lb_and_open_range_allows_all() {
    let mut s = svc("web");
    s.service_type = ServiceType::LoadBalancer;
    s.ports[0].node_port = Some(30080);
    s.load_balancer_ips = vec!["198.51.100.7".parse().unwrap()];
    s.source_ranges = vec!["203.0.113.0/24".parse().unwrap()];
    let objs = vec![
        Object::Service(s.clone()),
        Object::EndpointSlice(slice(
            "w",
            "web",
            8080,
            vec![ep("10.0.0.1", "x", true, false)],
        )),
    ];
    let snap = compile(objs);
    let lb = snap
        .frontend(&fkey("198.51.100.7:80", Protocol::Tcp))
        .unwrap();
    assert!(lb.allows("203.0.113.5".parse().unwrap()));
    assert!(!lb.allows("192.0.2.99".parse().unwrap()));
    let np = snap
        .frontend(&fkey("192.0.2.1:30080", Protocol::Tcp))
        .unwrap();
    assert!(np.allows("192.0.2.99".parse().unwrap()));

    s.source_ranges.push("0.0.0.0/0".parse().unwrap());
    let snap = compile(vec![Object::Service(s)]);
    let lb = snap
        .frontend(&fkey("198.51.100.7:80", Protocol::Tcp))
        .unwrap();
    assert!(lb.allows("192.0.2.99".parse().unwrap()));
}

#[test]
fn affinity_and_port_id_are_stable() {
    let mut s = svc("web");
    s.affinity = Affinity::ClientIp {
        timeout: Duration::from_secs(60),
    };
    let a = compile(vec![Object::Service(s.clone())]);
    let b = compile(vec![Object::Service(s)]);
    let k = fkey("10.96.0.10:80", Protocol::Tcp);
    assert_eq!(
        a.frontend(&k).unwrap().affinity,
        Some(Duration::from_secs(60))
    );
    assert_eq!(
        a.frontend(&k).unwrap().port_id,
        b.frontend(&k).unwrap().port_id
    );
}

#[test]
fn reset_counts_changes() {
    let mut st = Store::new();
    let c = st.apply(Update::Reset(vec![
        Object::Service(svc("a")),
        Object::Service(svc("b")),
    ]));
    assert_eq!(c.services, 2);
    let mut b2 = svc("b");
    b2.selector = Some(BTreeMap::new());
    let c = st.apply(Update::Reset(vec![
        Object::Service(svc("a")),
        Object::Service(b2),
    ]));
    assert_eq!(c.services, 1);
    let c = st.apply(Update::Delete(
        Kind::Service,
        ObjectKey::new("default", "a"),
    ));
    assert_eq!(c.services, 1);
    assert_eq!(st.service_count(), 1);
}

/// What a snapshot serves, comparable across compiles.
type Served = Vec<(FrontendKey, Vec<SocketAddr>, EmptyAction, String)>;

fn served(s: &Snapshot) -> (Served, Vec<ListenerSpec>, Vec<String>, Vec<HealthCheck>) {
    let mut f: Served = s
        .frontends()
        .map(|(k, fe)| {
            (
                *k,
                fe.endpoints.to_vec(),
                fe.when_empty,
                fe.service.name.clone(),
            )
        })
        .collect();
    f.sort_by_key(|e| e.0);
    (
        f,
        s.listeners().to_vec(),
        s.conflicts.clone(),
        s.health_checks.clone(),
    )
}

#[test]
fn compile_cache_recompiles_only_what_changed_and_matches_a_full_compile() {
    let mut a = svc("a");
    a.service_type = ServiceType::NodePort;
    a.ports[0].node_port = Some(30080);
    a.external_policy = TrafficPolicy::Local;
    a.health_check_node_port = Some(30999);
    let mut b = svc("b");
    b.cluster_ips = vec!["10.96.0.11".parse().unwrap()];
    // c claims a's ClusterIP: a conflict, a wins.
    let c = svc("c");
    let mut st = Store::new();
    st.apply(Update::Reset(vec![
        Object::Service(a),
        Object::Service(b),
        Object::Service(c),
        Object::EndpointSlice(slice(
            "a-1",
            "a",
            8080,
            vec![ep("10.0.0.1", "node-a", true, false)],
        )),
        Object::EndpointSlice(slice(
            "b-1",
            "b",
            8080,
            vec![ep("10.0.0.2", "node-b", true, false)],
        )),
    ]));
    let (ctx, metrics) = (ctx(), Metrics::new());
    let mut cache = CompileCache::default();
    let first = st.compile_with(&ctx, &metrics, 1, &mut cache);
    assert_eq!(served(&first), served(&st.compile(&ctx, &metrics, 1)));
    assert_eq!(first.conflicts.len(), 1);
    let fe = |s: &Snapshot, a: &str| s.frontend(&fkey(a, Protocol::Tcp)).unwrap().clone();

    // b's endpoints change: only b is compiled again.
    st.apply(Update::Upsert(Box::new(Object::EndpointSlice(slice(
        "b-1",
        "b",
        8080,
        vec![ep("10.0.0.3", "node-b", true, false)],
    )))));
    let second = st.compile_with(&ctx, &metrics, 2, &mut cache);
    assert_eq!(served(&second), served(&st.compile(&ctx, &metrics, 2)));
    assert!(Arc::ptr_eq(
        &fe(&first, "10.96.0.10:80"),
        &fe(&second, "10.96.0.10:80")
    ));
    assert!(Arc::ptr_eq(
        &fe(&first, "192.0.2.1:30080"),
        &fe(&second, "192.0.2.1:30080")
    ));
    assert!(!Arc::ptr_eq(
        &fe(&first, "10.96.0.11:80"),
        &fe(&second, "10.96.0.11:80")
    ));
    assert_eq!(
        &*fe(&second, "10.96.0.11:80").endpoints,
        &["10.0.0.3:8080".parse().unwrap()]
    );

    // The Node's zone changes: everything is compiled again.
    st.apply(Update::Upsert(Box::new(Object::Node(Node {
        name: "node-a".into(),
        zone: Some("z1".into()),
        addresses: vec![],
        deleting: false,
    }))));
    let third = st.compile_with(&ctx, &metrics, 3, &mut cache);
    assert_eq!(served(&third), served(&st.compile(&ctx, &metrics, 3)));
    assert!(!Arc::ptr_eq(
        &fe(&second, "10.96.0.10:80"),
        &fe(&third, "10.96.0.10:80")
    ));

    // a deleted: c now owns the ClusterIP, a's NodePort and health check go.
    st.apply(Update::Delete(
        Kind::Service,
        ObjectKey::new("default", "a"),
    ));
    let fourth = st.compile_with(&ctx, &metrics, 4, &mut cache);
    assert_eq!(served(&fourth), served(&st.compile(&ctx, &metrics, 4)));
    assert!(fourth.conflicts.is_empty());
    assert_eq!(fe(&fourth, "10.96.0.10:80").service.name, "c");
    assert!(fourth.health_checks.is_empty() && fourth.listeners().is_empty());
    assert_eq!(cache.services_kept(), 2);

    // A slice moving from b to c changes both; nothing changed, nothing
    // compiled: the same frontends again.
    st.apply(Update::Upsert(Box::new(Object::EndpointSlice(slice(
        "b-1",
        "c",
        8080,
        vec![ep("10.0.0.4", "node-b", true, false)],
    )))));
    let fifth = st.compile_with(&ctx, &metrics, 5, &mut cache);
    assert_eq!(served(&fifth), served(&st.compile(&ctx, &metrics, 5)));
    assert!(fe(&fifth, "10.96.0.11:80").endpoints.is_empty());
    assert_eq!(
        &*fe(&fifth, "10.96.0.10:80").endpoints,
        &["10.0.0.4:8080".parse().unwrap()]
    );
    let sixth = st.compile_with(&ctx, &metrics, 6, &mut cache);
    assert!(Arc::ptr_eq(
        &fe(&fifth, "10.96.0.11:80"),
        &fe(&sixth, "10.96.0.11:80")
    ));
    assert!(Arc::ptr_eq(
        &fe(&fifth, "10.96.0.10:80"),
        &fe(&sixth, "10.96.0.10:80")
    ));

    // Patched in place (no conflicts left): a NodePort Service with a
    // health check comes, changes and goes.
    let mut d = svc("d");
    d.cluster_ips = vec!["10.96.0.12".parse().unwrap()];
    d.service_type = ServiceType::NodePort;
    d.ports[0].node_port = Some(30081);
    d.external_policy = TrafficPolicy::Local;
    d.health_check_node_port = Some(30998);
    let d_slice = |ip: &str| {
        Object::EndpointSlice(slice("d-1", "d", 8080, vec![ep(ip, "node-a", true, false)]))
    };
    let steps = vec![
        vec![
            Update::Upsert(Box::new(Object::Service(d.clone()))),
            Update::Upsert(Box::new(d_slice("10.0.0.5"))),
        ],
        vec![Update::Upsert(Box::new(d_slice("10.0.0.6")))],
        vec![Update::Delete(
            Kind::EndpointSlice,
            ObjectKey::new("default", "d-1"),
        )],
        vec![Update::Delete(
            Kind::Service,
            ObjectKey::new("default", "d"),
        )],
    ];
    for (i, updates) in steps.into_iter().enumerate() {
        for u in updates {
            st.apply(u);
        }
        let g = 7 + i as u64;
        let patched = st.compile_with(&ctx, &metrics, g, &mut cache);
        let full = st.compile(&ctx, &metrics, g);
        assert_eq!(served(&patched), served(&full), "step {i}");
        assert_eq!(patched.no_local_external, full.no_local_external);
        assert!(cache.can_patch());
        assert!(Arc::ptr_eq(
            &fe(&sixth, "10.96.0.11:80"),
            &fe(&patched, "10.96.0.11:80")
        ));
    }
    assert_eq!(cache.services_kept(), 2);
}
