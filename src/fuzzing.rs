//! Fuzz oracles: the entry points of the cargo-fuzz targets `manifest`,
//! `compile` and `admin_http` in fuzz/, also replayed over their checked-in
//! corpora by unit tests (and used by the property tests). Each runs the
//! production code on the input and panics when a result breaks a rule that
//! must hold for any input — panicking is how an oracle reports.
#![allow(clippy::panic)]

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use crate::config::Limits;
use crate::discovery::file::parse_str;
use crate::discovery::Update;
use crate::model::{
    AddressFamily, Endpoint, Object, ObjectKey, Service, ServicePort, ServiceType, TargetPort,
    TrafficPolicy,
};
use crate::state::{
    EmptyAction, FrontendKey, FrontendKind, ListenerMode, NodeContext, Snapshot, Store,
};
use crate::telemetry::Metrics;

/// Manifest text in both formats: no panic, every error one line naming the
/// file, every object valid.
pub fn manifest(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    manifest_text("fuzz.yaml", &text);
    manifest_text("fuzz.json", &text);
}

/// Parses `text` as file `origin` and checks the result; returns the objects
/// (none when the file has an error, as the file source would serve).
pub fn manifest_text(origin: &str, text: &str) -> Vec<Object> {
    let limits = Limits::default();
    match parse_str(origin, text, &limits) {
        Ok(objects) => {
            objects.iter().for_each(|o| check_object(o, &limits));
            objects
        }
        Err(errors) => {
            assert!(!errors.is_empty(), "Err without errors");
            for e in errors {
                let line = e.to_string();
                assert!(line.starts_with(&format!("{origin}:")), "{line}");
            }
            Vec::new()
        }
    }
}

/// What every object that comes out of parsing must satisfy, whatever went in.
pub fn check_object(o: &Object, limits: &Limits) {
    match o {
        Object::Service(s) => {
            assert!(
                !s.key.name.is_empty() && !s.key.namespace.is_empty(),
                "{s:?}"
            );
            assert!(s.cluster_ips.len() <= 2, "{s:?}");
            for ip in &s.cluster_ips {
                assert!(
                    limits.service_cidrs.iter().any(|n| n.contains(ip)),
                    "{ip} outside the service CIDRs"
                );
            }
            let mut seen = BTreeSet::new();
            for p in &s.ports {
                assert_ne!(p.port, 0, "{s:?}");
                assert!(seen.insert((p.port, p.protocol)), "duplicate port {s:?}");
                if let Some(np) = p.node_port {
                    assert!(limits.node_port_range.contains(&np), "{s:?}");
                }
                if let TargetPort::Number(n) = p.target_port {
                    assert_ne!(n, 0, "{s:?}");
                }
            }
            if s.ports.len() > 1 {
                assert!(s.ports.iter().all(|p| !p.name.is_empty()), "{s:?}");
            }
            for ip in &s.external_ips {
                assert!(
                    !ip.is_loopback() && !ip.is_unspecified() && !ip.is_multicast(),
                    "{ip}"
                );
            }
            if let Some(p) = s.health_check_node_port {
                assert!(limits.node_port_range.contains(&p), "{s:?}");
                assert_eq!(s.external_policy, TrafficPolicy::Local, "{s:?}");
            }
        }
        Object::EndpointSlice(s) => {
            assert!(!s.service_name.is_empty(), "{s:?}");
            for e in &s.endpoints {
                assert_eq!(AddressFamily::of(&e.ip), s.family, "{s:?}");
            }
            for p in &s.ports {
                assert_ne!(p.port, Some(0), "{s:?}");
            }
        }
        Object::Node(n) => assert!(!n.name.is_empty(), "{n:?}"),
        Object::Pod(p) => assert!(!p.key.name.is_empty(), "{p:?}"),
    }
}

/// The node the `compile` oracle compiles for: `node-a`, NodePorts on
/// 127.0.0.1 and ::1, and 192.0.2.1 as a local address (LB IPs and
/// externalIPs there get listeners).
pub fn node_context() -> NodeContext {
    let nodeport_addresses = vec![
        IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(Ipv6Addr::LOCALHOST),
    ];
    let mut local_addresses = nodeport_addresses.clone();
    local_addresses.push(IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1)));
    NodeContext {
        node_name: "node-a".into(),
        zone: None,
        proxy_name: "ringvip".into(),
        nodeport_addresses,
        local_addresses,
    }
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
        let Some(port) = s
            .ports
            .iter()
            .find(|p| p.name == sp.name && p.protocol == sp.protocol)
            .and_then(|p| p.port)
        else {
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
    let derived = st.selector_slices();
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

/// The admin HTTP servers fed raw bytes, each over a fresh loopback
/// connection: the health server, the metrics + API server and a
/// `healthCheckNodePort` server. Each answers only in its own shapes (hyper's
/// own error answers aside), and the health check port serves nothing but
/// the health answer.
pub fn admin_http(data: &[u8]) {
    ADMIN.with(|rig| {
        let rig = rig.get_or_init(AdminRig::start);
        for (server, addr) in [
            (Server::Health, rig.health),
            (Server::Metrics, rig.metrics),
            (Server::ServiceHealth, rig.service),
        ] {
            let reply = rig.rt.block_on(exchange(addr, data));
            check_replies(server, &reply, data);
        }
    });
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Server {
    Health,
    Metrics,
    ServiceHealth,
}

struct AdminRig {
    rt: tokio::runtime::Runtime,
    health: SocketAddr,
    metrics: SocketAddr,
    service: SocketAddr,
}

thread_local! {
    static ADMIN: std::cell::OnceCell<AdminRig> = const { std::cell::OnceCell::new() };
}

impl AdminRig {
    fn start() -> AdminRig {
        use crate::admin;
        let Ok(rt) = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        else {
            panic!("no runtime")
        };
        let (health, metrics, service) = rt.block_on(async {
            let bind = || admin::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)));
            let (Ok(h), Ok(m), Ok(s)) = (bind().await, bind().await, bind().await) else {
                panic!("cannot bind loopback listeners")
            };
            let addrs = (h.local_addr(), m.local_addr(), s.local_addr());
            let (Ok(ha), Ok(ma), Ok(sa)) = addrs else {
                panic!("no local address")
            };
            let state = Arc::new(crate::state::Health::new());
            let timeout = Duration::from_secs(60);
            tokio::spawn(admin::serve_health(h, state.clone(), timeout));
            let metrics = Arc::new(Metrics::new());
            let api: admin::FrontendsApi = Arc::new(|| r#"[{"frontend":"x"}]"#.to_string());
            tokio::spawn(admin::serve_metrics_with_api(m, metrics, api));
            let sh = Arc::new(admin::ServiceHealth::new(
                ObjectKey::new("default", "web"),
                2,
            ));
            tokio::spawn(admin::serve_service_health(s, sh, state, timeout));
            (ha, ma, sa)
        });
        AdminRig {
            rt,
            health,
            metrics,
            service,
        }
    }
}

/// Writes `data`, half-closes, and reads whatever comes back until the server
/// closes. A server that keeps the connection open after the client's EOF
/// for 5 s is a finding.
async fn exchange(addr: SocketAddr, data: &[u8]) -> Vec<u8> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Ok(mut s) = tokio::net::TcpStream::connect(addr).await else {
        panic!("admin server at {addr} is gone")
    };
    let (mut r, mut w) = s.split();
    let mut buf = Vec::new();
    let write = async {
        // The server may answer and close before reading everything.
        let _ = w.write_all(data).await;
        let _ = w.shutdown().await;
    };
    let read = async {
        let _ = r.read_to_end(&mut buf).await;
    };
    let both = async { tokio::join!(write, read) };
    if tokio::time::timeout(Duration::from_secs(5), both)
        .await
        .is_err()
    {
        panic!("{addr}: connection still open 5 s after the client's EOF");
    }
    buf
}

/// Checks every response in `reply` (pipelined requests get one each).
fn check_replies(server: Server, reply: &[u8], request: &[u8]) {
    // An HTTP/1.0 request gets an HTTP/1.0 answer.
    let text = String::from_utf8_lossy(reply).replace("HTTP/1.0 ", "HTTP/1.1 ");
    if text.is_empty() {
        return;
    }
    assert!(
        text.starts_with("HTTP/1.1 "),
        "{server:?}: not an HTTP/1.x response: {text:?} to {request:?}"
    );
    for piece in text.split("HTTP/1.1 ").skip(1) {
        let status: u16 = piece.get(..3).and_then(|s| s.parse().ok()).unwrap_or(0);
        let (head, body) = piece.split_once("\r\n\r\n").unwrap_or((piece, ""));
        let head = head.to_ascii_lowercase();
        // Ours carry nosniff; hyper's own error answers do not and are empty.
        let ours = head.contains("x-content-type-options: nosniff");
        assert!(
            !text.contains("# TYPE") || server == Server::Metrics,
            "{server:?} served metrics"
        );
        if !ours {
            assert!(
                (400..600).contains(&status) && body.is_empty(),
                "{server:?}: unexpected {status}: {piece:?}"
            );
            continue;
        }
        let allowed: &[u16] = match server {
            Server::Health => &[200, 404, 405, 503],
            Server::Metrics => &[200, 404, 405],
            Server::ServiceHealth => &[200, 503],
        };
        assert!(allowed.contains(&status), "{server:?}: {status}: {piece:?}");
        if server == Server::ServiceHealth {
            // Any path and method: the health answer and nothing else.
            assert!(
                head.contains("x-load-balancing-endpoint-weight: 2")
                    && head.contains("content-type: application/json"),
                "{piece:?}"
            );
            assert!(
                body.is_empty() || body.starts_with(r#"{"service":{"namespace":"default","name":"web"},"localEndpoints":2,"serviceProxyHealthy":"#),
                "{piece:?}"
            );
        }
    }
}

/// Replays a checked-in corpus directory through `oracle`; the number of files.
pub fn replay(dir: &std::path::Path, oracle: fn(&[u8])) -> usize {
    let Ok(entries) = std::fs::read_dir(dir) else {
        panic!("{}: no corpus", dir.display())
    };
    let mut n = 0;
    for e in entries.flatten() {
        let Ok(data) = std::fs::read(e.path()) else {
            panic!("{}: unreadable", e.path().display())
        };
        oracle(&data);
        n += 1;
    }
    n
}

#[cfg(test)]
mod tests {
    use super::*;

    fn corpus(name: &str) -> std::path::PathBuf {
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("fuzz/corpus")
            .join(name)
    }

    #[test]
    fn manifest_corpus_replays() {
        let n = replay(&corpus("manifest"), manifest);
        assert!(n >= 10, "corpus too small: {n}");
    }

    #[test]
    fn compile_corpus_replays() {
        let n = replay(&corpus("compile"), compile);
        assert!(n >= 10, "corpus too small: {n}");
    }

    #[test]
    fn admin_http_corpus_replays() {
        let n = replay(&corpus("admin_http"), admin_http);
        assert!(n >= 10, "corpus too small: {n}");
    }

    /// The compile seeds are real: together they give frontends with
    /// endpoints, listeners of both modes and health checks.
    #[test]
    fn compile_seeds_cover_listeners_and_health_checks() {
        let mut accept = 0;
        let mut drop = 0;
        let mut checks = 0;
        for e in std::fs::read_dir(corpus("compile")).unwrap() {
            let text = std::fs::read_to_string(e.unwrap().path()).unwrap_or_default();
            let objects = manifest_text("seed.yaml", &text);
            let mut st = Store::new();
            st.apply(Update::Reset(objects));
            let snap = st.compile(&node_context(), &Metrics::new(), 1);
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
            checks += snap.health_checks.len();
        }
        assert!(
            accept > 0 && drop > 0 && checks > 0,
            "{accept} {drop} {checks}"
        );
    }

    /// The health check port answers every path and method with the health
    /// answer only: never metrics, the API or /healthz's body.
    #[test]
    fn health_check_port_serves_only_the_health_answer() {
        for req in [
            "GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
            "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
            "GET /api/frontends HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
            "GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
            "POST /anything?x=1 HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nConnection: close\r\n\r\nabc",
        ] {
            ADMIN.with(|rig| {
                let rig = rig.get_or_init(AdminRig::start);
                let reply = rig.rt.block_on(exchange(rig.service, req.as_bytes()));
                let text = String::from_utf8_lossy(&reply);
                assert!(text.starts_with("HTTP/1.1 200 OK\r\n"), "{req}: {text}");
                let body = text.split_once("\r\n\r\n").unwrap().1;
                let v: serde_json::Value = serde_json::from_str(body).unwrap();
                assert_eq!(
                    v,
                    serde_json::json!({"service": {"namespace": "default", "name": "web"}, "localEndpoints": 2, "serviceProxyHealthy": true})
                );
                check_replies(Server::ServiceHealth, &reply, req.as_bytes());
            });
        }
        // The metrics server, fed the same, does serve metrics: the oracle
        // would notice them on the health check port.
        let reply = ADMIN.with(|rig| {
            let rig = rig.get_or_init(AdminRig::start);
            rig.rt.block_on(exchange(
                rig.metrics,
                b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
            ))
        });
        assert!(String::from_utf8_lossy(&reply).contains("# TYPE"));
        let caught = std::panic::catch_unwind(|| check_replies(Server::ServiceHealth, &reply, b""));
        assert!(
            caught.is_err(),
            "metrics on the health check port must fail the oracle"
        );
    }
}
