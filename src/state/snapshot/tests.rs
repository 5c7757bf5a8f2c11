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

/// [`svc`] of `service_type` with NodePort `node_port` on its port.
fn exposed(name: &str, service_type: ServiceType, node_port: u16) -> Service {
    let mut s = svc(name);
    s.service_type = service_type;
    s.ports[0].node_port = Some(node_port);
    s
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

/// A ready endpoint at `ip` on `node`.
fn up(ip: &str, node: &str) -> Endpoint {
    ep(ip, node, true, false)
}

/// IPv4 slice default/`name` of `svc`, port "http" at 8080.
fn slice(name: &str, svc: &str, eps: Vec<Endpoint>) -> EndpointSlice {
    EndpointSlice {
        family: AddressFamily::V4,
        ..builders::slice(
            "default",
            name,
            svc,
            vec![slice_port("http", Protocol::Tcp, 8080)],
            eps,
        )
    }
}

/// [`slice`] as an object.
fn sliced(name: &str, svc: &str, eps: Vec<Endpoint>) -> Object {
    Object::EndpointSlice(slice(name, svc, eps))
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

/// The TCP frontend at `addr`, which must exist.
fn tcp<'a>(snap: &'a Snapshot, addr: &str) -> &'a Arc<Frontend> {
    match snap.frontend(&fkey(addr, Protocol::Tcp)) {
        Some(fe) => fe,
        None => panic!("no TCP frontend at {addr}"),
    }
}

/// Whether `snap` has a frontend at `addr` for `proto`.
fn has(snap: &Snapshot, addr: &str, proto: Protocol) -> bool {
    snap.frontend(&fkey(addr, proto)).is_some()
}

fn addrs(v: &[&str]) -> Vec<SocketAddr> {
    v.iter().map(|a| a.parse().unwrap()).collect()
}

#[test]
fn clusterip_joins_slices_by_port_name_and_protocol() {
    let mut s2 = slice("web-2", "web", vec![up("10.0.0.3", "node-b")]);
    s2.ports[0].name = "other".into();
    let snap = compile(vec![
        Object::Service(svc("web")),
        sliced(
            "web-1",
            "web",
            vec![up("10.0.0.1", "node-a"), up("10.0.0.2", "node-b")],
        ),
        Object::EndpointSlice(s2),
    ]);
    let fe = tcp(&snap, "10.96.0.10:80");
    assert_eq!(
        fe.endpoints.to_vec(),
        addrs(&["10.0.0.1:8080", "10.0.0.2:8080"])
    );
    assert!(!has(&snap, "10.96.0.10:80", Protocol::Udp));
    // ClusterIPs never become kernel listeners
    assert!(snap.listeners().is_empty());
}

#[test]
fn duplicate_endpoints_keep_non_terminating_copy() {
    let snap = compile(vec![
        Object::Service(svc("web")),
        sliced("a", "web", vec![ep("10.0.0.1", "n", false, true)]),
        sliced("b", "web", vec![ep("10.0.0.1", "n", true, false)]),
        sliced("c", "web", vec![ep("10.0.0.2", "n", false, true)]),
    ]);
    // 10.0.0.1 is ready via slice b, so the terminating 10.0.0.2 is not used
    let fe = tcp(&snap, "10.96.0.10:80");
    assert_eq!(fe.endpoints.to_vec(), addrs(&["10.0.0.1:8080"]));
}

#[test]
fn nodeport_lb_and_external_ips_get_listeners_when_local() {
    let mut s = exposed("web", ServiceType::LoadBalancer, 30080);
    s.load_balancer_ips = vec![
        "198.51.100.7".parse().unwrap(),
        "203.0.113.9".parse().unwrap(),
    ];
    s.external_ips = vec!["198.51.100.7".parse().unwrap()];
    s.ports.push(ServicePort {
        node_port: Some(30053),
        ..port("dns", Protocol::Udp, 53, 53)
    });
    let mut sl = slice("w", "web", vec![up("10.0.0.1", "node-b")]);
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
    assert!(has(&snap, "203.0.113.9:80", Protocol::Tcp));
    let udp = snap
        .frontend(&fkey("192.0.2.1:30053", Protocol::Udp))
        .unwrap();
    assert_eq!(udp.endpoints.to_vec(), addrs(&["10.0.0.1:5353"]));
}

#[test]
fn lb_without_node_port_allocation_has_no_nodeport() {
    let mut s = exposed("web", ServiceType::LoadBalancer, 30080);
    s.allocate_lb_node_ports = false;
    let snap = compile(vec![
        Object::Service(s),
        sliced("w", "web", vec![up("10.0.0.1", "x")]),
    ]);
    assert!(!has(&snap, "192.0.2.1:30080", Protocol::Tcp));
}

#[test]
fn no_endpoints_means_no_listener_so_kernel_refuses() {
    let s = exposed("web", ServiceType::NodePort, 30080);
    let snap = compile(vec![Object::Service(s)]);
    assert!(snap.listeners().is_empty());
    assert_eq!(
        tcp(&snap, "192.0.2.1:30080").when_empty,
        EmptyAction::Refuse
    );
}

#[test]
fn external_local_without_local_endpoints_drops() {
    let mut s = exposed("web", ServiceType::NodePort, 30080);
    s.external_policy = TrafficPolicy::Local;
    let snap = compile(vec![
        Object::Service(s),
        sliced("w", "web", vec![up("10.0.0.2", "node-b")]),
    ]);
    let np = tcp(&snap, "192.0.2.1:30080");
    assert!(np.endpoints.is_empty());
    assert_eq!(np.when_empty, EmptyAction::Drop);
    assert_eq!(snap.listeners()[0].mode, ListenerMode::Drop);
    assert_eq!(snap.no_local_external, 1);
    // ClusterIP traffic still uses the remote endpoint (internal policy Cluster)
    assert_eq!(tcp(&snap, "10.96.0.10:80").endpoints.len(), 1);
}

#[test]
fn internal_local_uses_local_endpoints_for_clusterip() {
    let mut s = svc("web");
    s.internal_policy = TrafficPolicy::Local;
    let snap = compile(vec![
        Object::Service(s),
        sliced(
            "w",
            "web",
            vec![up("10.0.0.1", "node-a"), up("10.0.0.2", "node-b")],
        ),
    ]);
    let cip = tcp(&snap, "10.96.0.10:80");
    assert_eq!(cip.endpoints.to_vec(), addrs(&["10.0.0.1:8080"]));
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
        sliced(
            "w",
            "web",
            vec![
                up("10.0.0.1", "node-a"),
                ep("10.0.0.2", "node-a", false, true),
                up("10.0.0.3", "node-b"),
            ],
        ),
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
    assert!(has(&snap, "10.96.0.11:80", Protocol::Tcp));
}

#[test]
fn source_ranges_only_on_lb_and_open_range_allows_all() {
    let mut s = exposed("web", ServiceType::LoadBalancer, 30080);
    s.load_balancer_ips = vec!["198.51.100.7".parse().unwrap()];
    s.source_ranges = vec!["203.0.113.0/24".parse().unwrap()];
    let objs = vec![
        Object::Service(s.clone()),
        sliced("w", "web", vec![up("10.0.0.1", "x")]),
    ];
    let snap = compile(objs);
    let lb = tcp(&snap, "198.51.100.7:80");
    assert!(lb.allows("203.0.113.5".parse().unwrap()));
    assert!(!lb.allows("192.0.2.99".parse().unwrap()));
    let np = tcp(&snap, "192.0.2.1:30080");
    assert!(np.allows("192.0.2.99".parse().unwrap()));

    s.source_ranges.push("0.0.0.0/0".parse().unwrap());
    let snap = compile(vec![Object::Service(s)]);
    let lb = tcp(&snap, "198.51.100.7:80");
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
    let k = "10.96.0.10:80";
    assert_eq!(tcp(&a, k).affinity, Some(Duration::from_secs(60)));
    assert_eq!(tcp(&a, k).port_id, tcp(&b, k).port_id);
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

/// A store, the cache it compiles with, and what it compiles for.
struct Cached {
    st: Store,
    cache: CompileCache,
    ctx: NodeContext,
    metrics: Metrics,
}

impl Cached {
    /// Applies `updates`, compiles with the cache as generation `g`, and
    /// checks the result serves the same as a full compile.
    fn step(&mut self, updates: Vec<Update>, g: u64) -> Snapshot {
        for u in updates {
            self.st.apply(u);
        }
        let cached = self
            .st
            .compile_with(&self.ctx, &self.metrics, g, &mut self.cache);
        let full = self.st.compile(&self.ctx, &self.metrics, g);
        assert_eq!(served(&cached), served(&full), "generation {g}");
        assert_eq!(cached.no_local_external, full.no_local_external);
        cached
    }
}

fn upsert(o: Object) -> Update {
    Update::Upsert(Box::new(o))
}

/// Whether `a` and `b` hold the very same TCP frontend at `addr`.
fn same(a: &Snapshot, b: &Snapshot, addr: &str) -> bool {
    Arc::ptr_eq(tcp(a, addr), tcp(b, addr))
}

#[test]
fn compile_cache_recompiles_only_what_changed_and_matches_a_full_compile() {
    let mut a = exposed("a", ServiceType::NodePort, 30080);
    a.external_policy = TrafficPolicy::Local;
    a.health_check_node_port = Some(30999);
    let mut b = svc("b");
    b.cluster_ips = vec!["10.96.0.11".parse().unwrap()];
    // c claims a's ClusterIP: a conflict, a wins.
    let c = svc("c");
    let mut run = Cached {
        st: Store::new(),
        cache: CompileCache::default(),
        ctx: ctx(),
        metrics: Metrics::new(),
    };
    let first = run.step(
        vec![Update::Reset(vec![
            Object::Service(a),
            Object::Service(b),
            Object::Service(c),
            sliced("a-1", "a", vec![up("10.0.0.1", "node-a")]),
            sliced("b-1", "b", vec![up("10.0.0.2", "node-b")]),
        ])],
        1,
    );
    assert_eq!(first.conflicts.len(), 1);

    // b's endpoints change: only b is compiled again.
    let b_slice = sliced("b-1", "b", vec![up("10.0.0.3", "node-b")]);
    let second = run.step(vec![upsert(b_slice)], 2);
    assert!(same(&first, &second, "10.96.0.10:80"));
    assert!(same(&first, &second, "192.0.2.1:30080"));
    assert!(!same(&first, &second, "10.96.0.11:80"));
    assert_eq!(
        tcp(&second, "10.96.0.11:80").endpoints.to_vec(),
        addrs(&["10.0.0.3:8080"])
    );

    // The Node's zone changes: everything is compiled again.
    let node = Node {
        name: "node-a".into(),
        zone: Some("z1".into()),
        addresses: vec![],
        deleting: false,
    };
    let third = run.step(vec![upsert(Object::Node(node))], 3);
    assert!(!same(&second, &third, "10.96.0.10:80"));

    // a deleted: c now owns the ClusterIP, a's NodePort and health check go.
    let gone = Update::Delete(Kind::Service, ObjectKey::new("default", "a"));
    let fourth = run.step(vec![gone], 4);
    assert!(fourth.conflicts.is_empty());
    assert_eq!(tcp(&fourth, "10.96.0.10:80").service.name, "c");
    assert!(fourth.health_checks.is_empty() && fourth.listeners().is_empty());
    assert_eq!(run.cache.services_kept(), 2);

    // A slice moving from b to c changes both; nothing changed, nothing
    // compiled: the same frontends again.
    let moved = sliced("b-1", "c", vec![up("10.0.0.4", "node-b")]);
    let fifth = run.step(vec![upsert(moved)], 5);
    assert!(tcp(&fifth, "10.96.0.11:80").endpoints.is_empty());
    assert_eq!(
        tcp(&fifth, "10.96.0.10:80").endpoints.to_vec(),
        addrs(&["10.0.0.4:8080"])
    );
    let sixth = run
        .st
        .compile_with(&run.ctx, &run.metrics, 6, &mut run.cache);
    assert!(same(&fifth, &sixth, "10.96.0.11:80"));
    assert!(same(&fifth, &sixth, "10.96.0.10:80"));

    // Patched in place (no conflicts left): a NodePort Service with a
    // health check comes, changes and goes.
    let mut d = exposed("d", ServiceType::NodePort, 30081);
    d.cluster_ips = vec!["10.96.0.12".parse().unwrap()];
    d.external_policy = TrafficPolicy::Local;
    d.health_check_node_port = Some(30998);
    let d_slice = |ip: &str| upsert(sliced("d-1", "d", vec![up(ip, "node-a")]));
    let steps = vec![
        vec![upsert(Object::Service(d.clone())), d_slice("10.0.0.5")],
        vec![d_slice("10.0.0.6")],
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
        let patched = run.step(updates, 7 + i as u64);
        assert!(run.cache.can_patch(), "step {i}");
        assert!(same(&sixth, &patched, "10.96.0.11:80"));
    }
    assert_eq!(run.cache.services_kept(), 2);
}

/// An endpoint's series live while its Service port lists it: a recompile
/// keeps those of the endpoints that stay (same atomics, same counts) and
/// removes those of an endpoint that left, patched or fully compiled; the
/// Service going removes them all.
#[test]
fn endpoint_series_follow_the_endpoints_of_the_port() {
    use crate::telemetry::ENDPOINT_CONNECTIONS_TOTAL;
    let mut run = Cached {
        st: Store::new(),
        cache: CompileCache::default(),
        ctx: ctx(),
        metrics: Metrics::new(),
    };
    let both = vec![up("10.0.0.1", "node-a"), up("10.0.0.2", "node-b")];
    let first = run.step(
        vec![Update::Reset(vec![
            Object::Service(svc("a")),
            sliced("a-1", "a", both),
        ])],
        1,
    );
    let one: SocketAddr = "10.0.0.1:8080".parse().unwrap();
    let kept = tcp(&first, "10.96.0.10:80")
        .endpoint_metrics(&one)
        .unwrap()
        .clone();
    kept.traffic.connections_total.inc_by(3);
    // Used, so exported (an endpoint never used has no series).
    let two: SocketAddr = "10.0.0.2:8080".parse().unwrap();
    tcp(&first, "10.96.0.10:80")
        .endpoint_metrics(&two)
        .unwrap()
        .traffic
        .connections_total
        .inc();
    let series = |m: &Metrics, ip: &str| {
        let text = m.encode();
        let label = format!("endpoint=\"{ip}:8080\"");
        text.lines().filter(|l| l.contains(&label)).count()
    };
    let count_of_one = |m: &Metrics| {
        let l = r#"namespace="default",service="a",port="http",protocol="TCP",endpoint="10.0.0.1:8080""#;
        let name = format!("{ENDPOINT_CONNECTIONS_TOTAL}{{{l}}} ");
        m.encode()
            .lines()
            .find_map(|x| x.strip_prefix(&name).map(str::to_string))
    };
    assert_eq!(
        (
            series(&run.metrics, "10.0.0.1"),
            series(&run.metrics, "10.0.0.2")
        ),
        (12, 12)
    );

    // 10.0.0.2 leaves: patched in place.
    let second = run.step(
        vec![upsert(sliced("a-1", "a", vec![up("10.0.0.1", "node-a")]))],
        2,
    );
    assert!(run.cache.can_patch());
    assert_eq!(
        (
            series(&run.metrics, "10.0.0.1"),
            series(&run.metrics, "10.0.0.2")
        ),
        (12, 0)
    );
    assert_eq!(count_of_one(&run.metrics).as_deref(), Some("3"));
    let again = tcp(&second, "10.96.0.10:80")
        .endpoint_metrics(&one)
        .unwrap();
    assert!(Arc::ptr_eq(&kept, again));

    // The zone changes: a full compile, the same series.
    let node = Node {
        name: "node-a".into(),
        zone: Some("z1".into()),
        addresses: vec![],
        deleting: false,
    };
    run.step(vec![upsert(Object::Node(node))], 3);
    assert_eq!(
        (
            series(&run.metrics, "10.0.0.1"),
            series(&run.metrics, "10.0.0.2")
        ),
        (12, 0)
    );
    assert_eq!(count_of_one(&run.metrics).as_deref(), Some("3"));

    // The Service goes: so do its endpoints' series.
    let gone = Update::Delete(Kind::Service, ObjectKey::new("default", "a"));
    run.step(vec![gone], 4);
    assert_eq!(series(&run.metrics, "10.0.0.1"), 0);
}

#[test]
fn sctp_ports_are_skipped_and_counted_the_others_served() {
    let mut s = svc("web");
    s.skipped_ports = vec![SkippedPort {
        name: "sig".into(),
        port: 3868,
    }];
    let snap = compile(vec![
        Object::Service(s),
        sliced("web-1", "web", vec![up("10.0.0.1", "node-a")]),
    ]);
    assert_eq!(tcp(&snap, "10.96.0.10:80").endpoints.len(), 1);
    assert_eq!(snap.skipped_ports, 1);
    // Patched compiles keep the count right as the Service comes and goes.
    let mut run = Cached {
        st: Store::new(),
        cache: CompileCache::default(),
        ctx: ctx(),
        metrics: Metrics::new(),
    };
    let mut s = svc("web");
    s.skipped_ports = vec![SkippedPort {
        name: String::new(),
        port: 9,
    }];
    let first = run.step(vec![Update::Reset(vec![Object::Service(s)])], 1);
    assert_eq!(first.skipped_ports, 1);
    let gone = run.step(
        vec![Update::Delete(
            Kind::Service,
            ObjectKey::new("default", "web"),
        )],
        2,
    );
    assert_eq!(gone.skipped_ports, 0);
}

/// default/web with `balance` and `slow_start` over ready endpoints `ips`
/// (port 8080), as the objects to reset a store to.
fn balanced(balance: Balance, slow_start: Option<Duration>, ips: &[&str]) -> Vec<Object> {
    let mut s = exposed("web", ServiceType::NodePort, 30080);
    s.options = ServiceOptions {
        balance,
        slow_start,
        ..ServiceOptions::default()
    };
    let eps = ips.iter().map(|ip| up(ip, "node-b")).collect();
    vec![Object::Service(s), sliced("web-1", "web", eps)]
}

#[test]
fn maglev_tables_depend_only_on_the_endpoints() {
    let m = Balance::Maglev { table_size: 65537 };
    let a = compile(balanced(m, None, &["10.0.0.1", "10.0.0.2", "10.0.0.3"]));
    // Another process, its objects in another order: the same table.
    let mut objs = balanced(m, None, &["10.0.0.3", "10.0.0.1", "10.0.0.2"]);
    objs.reverse();
    let b = compile(objs);
    let table = |s: &Snapshot, addr: &str| match &tcp(s, addr).balancer {
        crate::balance::Balancer::Maglev(t) => t.clone(),
        other => panic!("{other:?}"),
    };
    let ta = table(&a, "10.96.0.10:80");
    assert_eq!(ta.size(), 65537);
    assert_eq!(*ta, *table(&b, "10.96.0.10:80"));
    // The ClusterIP and the NodePort use the same set: one table.
    assert!(Arc::ptr_eq(&ta, &table(&a, "192.0.2.1:30080")));
}

#[test]
fn slow_start_times_survive_recompiles() {
    use crate::balance::slow_start::MIN_WEIGHT;
    let w = Duration::from_secs(60);
    let rr = Balance::RoundRobin;
    let mut run = Cached {
        st: Store::new(),
        cache: CompileCache::default(),
        ctx: ctx(),
        metrics: Metrics::new(),
    };
    let t0 = std::time::Instant::now();
    let at = |s: u64| t0 + Duration::from_secs(s);
    let compile_at = |run: &mut Cached, objs: Vec<Object>, g: u64, now| {
        run.st.apply(Update::Reset(objs));
        run.st
            .compile_at(&run.ctx, &run.metrics, g, &mut run.cache, now)
    };
    // First sight: nobody warms (a Service or a process that starts).
    let s1 = compile_at(
        &mut run,
        balanced(rr, Some(w), &["10.0.0.1", "10.0.0.2"]),
        1,
        at(0),
    );
    assert!(tcp(&s1, "10.96.0.10:80").warmup.is_none());
    // 10.0.0.3 joins at 10 s: it starts at the floor.
    let three = ["10.0.0.1", "10.0.0.2", "10.0.0.3"];
    let s2 = compile_at(&mut run, balanced(rr, Some(w), &three), 2, at(10));
    let fe = tcp(&s2, "10.96.0.10:80");
    let warm = fe.warmup.as_deref().unwrap();
    assert_eq!(warm.weight(2, at(10)), MIN_WEIGHT);
    assert_eq!(warm.weight(0, at(10)), 1.0);
    // The NodePort (same set) warms the same endpoint.
    assert!(tcp(&s2, "192.0.2.1:30080").warmup.is_some());
    // 10.0.0.4 joins at 40 s: a recompile of the Service. 10.0.0.3 keeps
    // having joined at 10 s (half-way at 40 s), 10.0.0.4 starts now.
    let four = ["10.0.0.1", "10.0.0.2", "10.0.0.3", "10.0.0.4"];
    let s3 = compile_at(&mut run, balanced(rr, Some(w), &four), 3, at(40));
    let warm = tcp(&s3, "10.96.0.10:80").warmup.clone().unwrap();
    assert!((warm.weight(2, at(40)) - 0.5).abs() < 1e-9);
    assert_eq!(warm.weight(3, at(40)), MIN_WEIGHT);
    // A full recompile (the node context changed) keeps the times too.
    run.ctx.local_addresses.push("203.0.113.9".parse().unwrap());
    let s4 = compile_at(&mut run, balanced(rr, Some(w), &four), 4, at(45));
    assert_eq!(
        tcp(&s4, "10.96.0.10:80").warmup.as_deref(),
        Some(&*warm),
        "join times kept across a full compile"
    );
    // Without the annotation: no slow start, and the times are forgotten.
    let s5 = compile_at(&mut run, balanced(rr, None, &four), 5, at(50));
    assert!(tcp(&s5, "10.96.0.10:80").warmup.is_none());
    let s6 = compile_at(&mut run, balanced(rr, Some(w), &four), 6, at(55));
    assert!(tcp(&s6, "10.96.0.10:80").warmup.is_none());
}

/// A change to one Service among many copies only what it touches: the next
/// snapshot shares every frontend shard but the changed Service's with the
/// last one, and the listener list when no listener changed.
#[test]
fn a_patch_shares_what_it_did_not_change() {
    let mut objects = Vec::new();
    for i in 0..2000u32 {
        let name = format!("s{i}");
        let mut s = exposed(&name, ServiceType::NodePort, 30000 + i as u16);
        let [_, _, a, b] = (i + 1).to_be_bytes();
        s.cluster_ips = vec![IpAddr::from([10, 96, a, b])];
        objects.push(Object::Service(s));
        let ip = format!("10.1.{a}.{b}");
        objects.push(sliced(&format!("{name}-1"), &name, vec![up(&ip, "node-a")]));
    }
    let mut run = Cached {
        st: Store::new(),
        cache: CompileCache::default(),
        ctx: ctx(),
        metrics: Metrics::new(),
    };
    let first = run.step(vec![Update::Reset(objects)], 1);
    // 4,000 frontends over 1,024 shards by a per-process random hash: about
    // 1,003 shards in use on average (sd about 4.5); a bound well below that.
    let used = first.frontends.shared_shards(&first.frontends);
    assert!(used > 950, "{used} shards in use");

    // s7 keeps an endpoint (and so its listener): only its two frontends'
    // shards (ClusterIP, NodePort) are new.
    let moved = sliced("s7-1", "s7", vec![up("10.2.0.1", "node-a")]);
    let second = run.step(vec![upsert(moved)], 2);
    assert!(run.cache.can_patch());
    assert!(second.frontends.shared_shards(&first.frontends) >= used - 2);
    assert!(Arc::ptr_eq(&first.listeners, &second.listeners));

    // s8 loses its endpoints: its listener goes, so the list is new.
    let emptied = sliced("s8-1", "s8", vec![]);
    let third = run.step(vec![upsert(emptied)], 3);
    assert!(!Arc::ptr_eq(&second.listeners, &third.listeners));
    assert_eq!(third.listeners().len(), first.listeners().len() - 1);
}

/// Each frontend's endpoint handles are its endpoints', at the same index,
/// whether it uses every endpoint listed (the lease's list, shared) or a
/// subset (a list of its own); dual-stack Services share nothing across
/// families.
#[test]
fn endpoint_handles_follow_the_endpoints_of_each_frontend() {
    let mut dual = svc("dual");
    dual.cluster_ips = vec!["10.96.0.20".parse().unwrap(), "fd00::20".parse().unwrap()];
    let v6 = EndpointSlice {
        family: AddressFamily::V6,
        ..slice("dual-6", "dual", vec![up("fd00::1", "node-a")])
    };
    let snap = compile(vec![
        Object::Service(svc("web")),
        sliced(
            "web-1",
            "web",
            vec![up("10.0.0.2", "node-a"), up("10.0.0.1", "node-b")],
        ),
        Object::Service(Service {
            cluster_ips: vec!["10.96.0.11".parse().unwrap()],
            ..svc("part")
        }),
        sliced(
            "part-1",
            "part",
            vec![
                up("10.0.1.1", "node-a"),
                ep("10.0.1.2", "node-a", false, false),
                up("10.0.1.3", "node-a"),
            ],
        ),
        Object::Service(dual),
        sliced("dual-4", "dual", vec![up("10.0.2.1", "node-a")]),
        Object::EndpointSlice(v6),
    ]);
    let mut seen = 0;
    for (key, fe) in snap.frontends() {
        let handles: Vec<SocketAddr> = fe.endpoint_metrics.iter().map(|m| m.addr()).collect();
        assert_eq!(handles, fe.endpoints.to_vec(), "{key:?}");
        seen += fe.endpoints.len();
    }
    assert_eq!(seen, 2 + 2 + 1 + 1, "every usable endpoint checked");
}
