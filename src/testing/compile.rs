//! The `compile` oracle: a manifest compiled into a snapshot, checked
//! against the SEMANTICS.md rules that hold for any store.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::net::{IpAddr, SocketAddr};

use super::builders::node;
use super::manifest_text;
use crate::discovery::Update;
use crate::model::{
    AddressFamily, Endpoint, ObjectKey, Service, ServicePort, ServiceType, TrafficPolicy,
};
use crate::state::{
    EmptyAction, FrontendKey, FrontendKind, ListenerMode, NodeContext, Snapshot, Store,
};
use crate::telemetry::Metrics;

/// The node the `compile` oracle compiles for: `node-a`, NodePorts on
/// 127.0.0.1 and ::1, and 192.0.2.1 as a local address (LB IPs and
/// externalIPs there get listeners).
pub fn node_context() -> NodeContext {
    node(
        "node-a",
        &["127.0.0.1", "::1"],
        &["127.0.0.1", "::1", "192.0.2.1"],
    )
}

/// A manifest compiled into a snapshot: no panic, [`check_snapshot`] holds,
/// and compiling again gives the same snapshot.
pub fn compile(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let objects = manifest_text("fuzz.yaml", &text);
    let ctx = node_context();
    let mut st = Store::new();
    st.apply(Update::Reset(objects));
    let metrics = Metrics::new();
    let snap = st.compile(&ctx, &metrics, 1);
    check_snapshot(&st, &ctx, &snap);
    let again = st.compile(&ctx, &metrics, 1);
    assert_eq!(
        normalized(&snap),
        normalized(&again),
        "compile is not deterministic"
    );
}

/// Every copy of every endpoint address of one Service port and family, from
/// the store's slices and those built from Pods.
fn copies(
    st: &Store,
    derived: &[crate::model::EndpointSlice],
    svc: &Service,
    sp: &ServicePort,
    v6: bool,
) -> BTreeMap<SocketAddr, Vec<Endpoint>> {
    let mut out: BTreeMap<SocketAddr, Vec<Endpoint>> = BTreeMap::new();
    for s in st.slices.values().chain(derived) {
        if s.key.namespace != svc.key.namespace
            || s.service_name != svc.key.name
            || (s.family == AddressFamily::V6) != v6
        {
            continue;
        }
        let Some(port) = s.port_for(sp) else {
            continue;
        };
        for e in s.endpoints.iter().filter(|e| e.ip.is_ipv6() == v6) {
            out.entry(SocketAddr::new(e.ip, port))
                .or_default()
                .push(e.clone());
        }
    }
    out
}

/// The rules of SEMANTICS.md that hold for any store: every frontend belongs
/// to a proxied Service port at one of its addresses; it uses only endpoints
/// of that port which some slice shows ready or serving-and-terminating (local
/// ones under Local policy), in a stable order; where no address repeats, it
/// uses exactly the ready ones (else exactly the serving-and-terminating ones)
/// unless topology narrows a Cluster set; listeners exist for exactly the
/// local non-ClusterIP frontends that accept (endpoints) or drop (Local
/// policy, endpoints elsewhere); healthCheckNodePorts for exactly the eTP=Local
/// Services that have one.
pub fn check_snapshot(st: &Store, ctx: &NodeContext, snap: &Snapshot) {
    let zone = ctx
        .zone
        .clone()
        .or_else(|| st.node(&ctx.node_name).and_then(|n| n.zone.clone()));
    // From scratch, not from the store's per-Service record of them: that
    // record is kept up to date change by change, which this checks.
    let derived: Vec<crate::model::EndpointSlice> = if st.pods.is_empty() {
        Vec::new()
    } else {
        let zones = |n: &str| st.node(n).and_then(|n| n.zone.clone());
        st.services
            .values()
            .flat_map(|svc| crate::discovery::selector::slices_for(svc, st.pods.values(), &zones))
            .collect()
    };
    let local: BTreeSet<IpAddr> = ctx.local_addresses.iter().copied().collect();
    let is_local = |e: &Endpoint| e.node_name.as_deref() == Some(ctx.node_name.as_str());
    let usable = |e: &Endpoint| e.ready || (e.serving && e.terminating);
    for (key, fe) in snap.frontends() {
        let Some(svc) = st.services.get(&fe.service) else {
            panic!("frontend {key:?} of unknown Service {}", fe.service)
        };
        assert!(
            svc.is_proxied(&ctx.proxy_name),
            "{} is not proxied",
            svc.key
        );
        let Some(sp) = svc
            .ports
            .iter()
            .find(|p| p.name == fe.port_name && p.protocol == fe.proto)
        else {
            panic!(
                "frontend {key:?}: {} has no port {:?}",
                svc.key, fe.port_name
            )
        };
        assert_eq!(key.proto, sp.protocol);
        let a = key.addr;
        let policy = match fe.kind {
            FrontendKind::ClusterIp => {
                assert!(
                    svc.cluster_ips.contains(&a.ip()) && a.port() == sp.port,
                    "{a}"
                );
                svc.internal_policy
            }
            FrontendKind::NodePort => {
                assert!(ctx.nodeport_addresses.contains(&a.ip()), "{a}");
                assert_eq!(Some(a.port()), sp.node_port, "{a}");
                assert!(
                    svc.service_type == ServiceType::NodePort
                        || (svc.service_type == ServiceType::LoadBalancer
                            && svc.allocate_lb_node_ports),
                    "{a}"
                );
                svc.external_policy
            }
            FrontendKind::LoadBalancer => {
                assert_eq!(svc.service_type, ServiceType::LoadBalancer);
                assert!(
                    svc.load_balancer_ips.contains(&a.ip()) && a.port() == sp.port,
                    "{a}"
                );
                svc.external_policy
            }
            FrontendKind::ExternalIp => {
                assert!(
                    svc.external_ips.contains(&a.ip()) && a.port() == sp.port,
                    "{a}"
                );
                svc.external_policy
            }
        };
        if fe.kind != FrontendKind::LoadBalancer {
            assert!(fe.source_ranges.is_empty(), "{a}");
        }
        assert!(
            fe.endpoints
                .windows(2)
                .all(|w| matches!(w, [x, y] if x < y)),
            "{a}: endpoints not sorted and unique: {:?}",
            fe.endpoints
        );
        let copies = copies(st, &derived, svc, sp, a.is_ipv6());
        for ep in fe.endpoints.iter() {
            let Some(c) = copies.get(ep) else {
                panic!("{a} uses {ep}, which no slice of {} has", svc.key)
            };
            assert!(c.iter().any(usable), "{a}: {ep} is not usable: {c:?}");
            if policy == TrafficPolicy::Local {
                assert!(c.iter().any(is_local), "{a}: Local policy uses remote {ep}");
            }
        }
        if policy == TrafficPolicy::Cluster && fe.endpoints.is_empty() {
            assert_eq!(fe.when_empty, EmptyAction::Refuse, "{a}");
        }
        // Where no address repeats, the set is exactly what the rules give.
        if copies.values().all(|c| c.len() == 1) {
            let pool: Vec<(SocketAddr, &Endpoint)> = copies
                .iter()
                .filter_map(|(x, c)| c.first().map(|e| (*x, e)))
                .filter(|(_, e)| policy == TrafficPolicy::Cluster || is_local(e))
                .collect();
            let addrs = |f: &dyn Fn(&Endpoint) -> bool| -> BTreeSet<SocketAddr> {
                pool.iter().filter(|(_, e)| f(e)).map(|(x, _)| *x).collect()
            };
            let ready = addrs(&|e| e.ready);
            let fallback = addrs(&|e| e.serving && e.terminating);
            let got: BTreeSet<SocketAddr> = fe.endpoints.iter().copied().collect();
            if !ready.is_empty() {
                assert!(
                    !got.is_empty() && got.is_subset(&ready),
                    "{a}: {got:?} vs ready {ready:?}"
                );
                if policy == TrafficPolicy::Local || zone.is_none() {
                    assert_eq!(got, ready, "{a}");
                }
            } else {
                assert_eq!(got, fallback, "{a}: terminating fallback");
            }
            let cluster_usable = copies.values().flatten().any(usable);
            if got.is_empty() {
                let want = if policy == TrafficPolicy::Local && cluster_usable {
                    EmptyAction::Drop
                } else {
                    EmptyAction::Refuse
                };
                assert_eq!(fe.when_empty, want, "{a}");
            }
        }
        let served_here = a.ip().is_loopback() || local.contains(&a.ip());
        let want_mode = if fe.kind == FrontendKind::ClusterIp || !served_here {
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
        assert_eq!(
            modes,
            want_mode.into_iter().collect::<Vec<_>>(),
            "listener of {a}"
        );
    }
    for l in snap.listeners() {
        let k = FrontendKey {
            addr: l.addr,
            proto: l.proto,
        };
        let Some(fe) = snap.frontend(&k) else {
            panic!("listener {} without a frontend", l.addr)
        };
        assert_eq!(l.mode == ListenerMode::Accept, !fe.endpoints.is_empty());
    }
    for svc in st
        .services
        .values()
        .filter(|s| s.is_proxied(&ctx.proxy_name))
    {
        for sp in &svc.ports {
            for ip in &svc.cluster_ips {
                let k = FrontendKey {
                    addr: SocketAddr::new(*ip, sp.port),
                    proto: sp.protocol,
                };
                assert!(
                    snap.frontend(&k).is_some(),
                    "{} {k:?} has no frontend",
                    svc.key
                );
            }
        }
    }
    let mut want: Vec<(u16, ObjectKey)> = st
        .services
        .values()
        .filter(|s| s.is_proxied(&ctx.proxy_name) && s.external_policy == TrafficPolicy::Local)
        .filter_map(|s| s.health_check_node_port.map(|p| (p, s.key.clone())))
        .collect();
    want.sort_by_key(|(p, _)| *p);
    let got: Vec<(u16, ObjectKey)> = snap
        .health_checks
        .iter()
        .map(|h| (h.port, h.service.clone()))
        .collect();
    assert_eq!(got, want, "health checks");
}

/// How many listeners of `snap` are in `mode`.
pub fn listeners_in(snap: &Snapshot, mode: ListenerMode) -> usize {
    snap.listeners().iter().filter(|l| l.mode == mode).count()
}

/// Everything observable in a snapshot, as comparable text.
pub fn normalized(s: &Snapshot) -> String {
    let fes: BTreeMap<_, _> = s.frontends().collect();
    let mut out = String::new();
    for (k, f) in fes {
        let _ = writeln!(
            out,
            "{k:?} {} {} {:?} {:?} {:?} {:?} {:?} {}",
            f.service,
            f.port_name,
            f.kind,
            f.endpoints,
            f.affinity,
            f.source_ranges,
            f.when_empty,
            f.port_id
        );
    }
    let _ = write!(
        out,
        "{:?}\n{:?}\n{:?}\n{} {}",
        s.listeners(),
        s.health_checks,
        s.conflicts,
        s.no_local_internal,
        s.no_local_external
    );
    out
}
