//! End-to-end: the real binary, real sockets, real clients. Everything runs on
//! loopback addresses each test takes for itself (`Loopback::take`, see
//! support/addrs.rs), so no root is needed.

mod support;

use std::collections::{HashMap, HashSet};
use std::io::{ErrorKind, Read};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket};
use std::process::Command;
use std::time::{Duration, Instant};

use support::*;

/// Three HTTP backends "1" to "3" on hosts .1 to .3 of a loopback block of
/// its own, and NodePort Service `name` on a free port with the first `eps`
/// of them as endpoints (and `spec` added), served by a started ringvip.
struct Web {
    net: Loopback,
    port: u16,
    node_port: u16,
    backends: Vec<Backend>,
    rv: Ringvip,
}

fn web(name: &str, eps: u8, spec: &str) -> Web {
    let (net, port, backends) = backends(3, Mode::Http);
    let node_port = free_port();
    let m = nodeport_service(name, node_port, port, &net.ips(1..=eps), spec);
    let rv = Ringvip::start(&m, &[]);
    assert_serving(np(node_port));
    Web {
        net,
        port,
        node_port,
        backends,
        rv,
    }
}

/// One backend of `mode` (host .1 of a loopback block of its own) behind
/// NodePort Service `name` on a free port, ringvip started with `args`.
fn one_backend(name: &str, mode: Mode, args: &[&str]) -> (Backend, Ringvip, u16) {
    let net = Loopback::take();
    let b = Backend::start(net.addr(1, free_port()), name, mode);
    let node_port = free_port();
    let m = nodeport_service(name, node_port, b.addr.port(), &[net.ip(1)], "");
    (b, Ringvip::start(&m, args), node_port)
}

/// The first request through `addr` is served. `Ringvip::start` and
/// `Ringvip::apply` return once the snapshot is published, and published
/// means the listeners are open: no retry is part of the contract.
fn assert_serving(addr: SocketAddr) {
    if let Err(e) = http_get(addr) {
        panic!("first request through {addr}: {e}");
    }
}

#[test]
fn balancing_spreads_over_all_endpoints() {
    let w = web("web", 3, "");
    let mut seen: HashMap<String, u32> = HashMap::new();
    for _ in 0..60 {
        *seen.entry(http_get(np(w.node_port)).unwrap()).or_default() += 1;
    }
    assert_eq!(seen.len(), 3, "{seen:?}\n{}", w.rv.log());
    assert!(seen.values().all(|&n| n >= 5), "uneven: {seen:?}");
}

#[test]
fn client_ip_affinity_sticks_and_expires() {
    let spec = "  sessionAffinity: ClientIP\n  sessionAffinityConfig:\n    clientIP:\n      timeoutSeconds: 1\n";
    let w = web("sticky", 3, spec);
    // Ten clients (distinct source IPs), each pinned to one backend while active.
    let sources = Loopback::take();
    let clients: Vec<IpAddr> = (1..=10).map(|i| IpAddr::V4(sources.ip(i))).collect();
    let mut first = Vec::new();
    for c in &clients {
        let b = http_get_from(Some(*c), np(w.node_port)).unwrap();
        for _ in 0..5 {
            assert_eq!(
                http_get_from(Some(*c), np(w.node_port)).unwrap(),
                b,
                "client {c} moved"
            );
        }
        first.push(b);
    }
    // Distinct clients are not all pinned to one backend.
    assert!(first.iter().collect::<HashSet<_>>().len() > 1, "{first:?}");
    // After the 1 s timeout each client picks afresh: some must move.
    std::thread::sleep(Duration::from_millis(1600));
    let moved = clients
        .iter()
        .zip(&first)
        .filter(|(c, b)| http_get_from(Some(**c), np(w.node_port)).unwrap() != **b)
        .count();
    assert!(moved > 0, "no client re-picked after affinity expiry");
}

#[test]
fn removed_endpoint_gets_no_new_connections_but_established_keeps_streaming() {
    let (net, port, streamers) = backends(2, Mode::Stream);
    let streamer = &streamers[0];
    let node_port = free_port();
    let rv = Ringvip::start(
        &nodeport_service("s", node_port, port, &[net.ip(1)], ""),
        &[],
    );
    let mut conn = connect_when_ready(np(node_port));
    conn.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let mut buf = [0u8; 64];
    assert!(conn.read(&mut buf).unwrap() > 0);
    assert_eq!(
        streamer.accepted.load(std::sync::atomic::Ordering::SeqCst),
        1
    );

    // Move the Service to the other endpoint.
    rv.apply(&nodeport_service("s", node_port, port, &[net.ip(2)], ""));
    // New connections go to endpoint 2 only.
    for _ in 0..10 {
        let mut c = connect_from(None, np(node_port)).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        assert!(c.read(&mut buf).unwrap() > 0);
    }
    assert_eq!(
        streamer.accepted.load(std::sync::atomic::Ordering::SeqCst),
        1
    );
    // The established connection still streams, for a good while.
    assert_streams(&mut conn, "after endpoint removal");
}

#[test]
fn dead_backend_is_retried_around() {
    let mut w = web("r", 3, "");
    w.backends[0].kill();
    for i in 0..40 {
        let body = http_get(np(w.node_port))
            .unwrap_or_else(|e| panic!("request {i} failed: {e}\n{}", w.rv.log()));
        assert_ne!(body, "backend-1");
    }
    // The failures were counted, by reason.
    let m = admin_get(w.rv.metrics, "/metrics");
    let refused = connect_failures(&m, "r", "refused");
    assert!(
        refused.is_some_and(|n| n > 0),
        "refused connects not counted:\n{m}"
    );
    // Passive health: after its first refusal the dead endpoint is backed off
    // (1 s, doubling), so the 40 quick requests do not keep trying it (about a
    // third of them would without).
    assert!(
        refused.is_some_and(|n| n <= 3),
        "dead endpoint tried {refused:?} times"
    );
}

#[test]
fn no_endpoints_is_refused_at_once() {
    let node_port = free_port();
    let port = free_port();
    let _rv = Ringvip::start(&nodeport_service("empty", node_port, port, &[], ""), &[]);
    let t = Instant::now();
    let e = connect_from(None, np(node_port)).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::ConnectionRefused);
    assert!(t.elapsed() < Duration::from_secs(1));
}

#[test]
fn bad_manifest_is_reported_and_old_config_keeps_serving() {
    let w = web("keep", 1, "");
    w.rv.write_manifest("apiVersion: v1\nkind: Service\nmetadata:\n  name: keep\n  spec: [\n");
    // Waits for the report itself (the file is read asynchronously); the
    // first request after it is still served.
    assert!(
        wait_until(Duration::from_secs(5), || w
            .rv
            .log()
            .contains("manifest.yaml:")),
        "no error naming the file:\n{}",
        w.rv.log()
    );
    assert_eq!(http_get(np(w.node_port)).unwrap(), "backend-1");
    // semantic error too: the port is out of range
    w.rv.write_manifest(
        &nodeport_service("keep", w.node_port, w.port, &[w.net.ip(1)], "")
            .replace("port: 80", "port: 70000"),
    );
    assert!(wait_until(Duration::from_secs(5), || w
        .rv
        .log()
        .contains("70000")));
    for _ in 0..10 {
        assert_eq!(http_get(np(w.node_port)).unwrap(), "backend-1");
    }
}

#[test]
fn nodeport_disappears_with_its_service() {
    let w = web("gone", 1, "");
    let other_port = free_port();
    w.rv.apply(&nodeport_service(
        "other",
        other_port,
        w.port,
        &[w.net.ip(2)],
        "",
    ));
    // Published means programmed: the first connection after it gets the
    // new answer, on both ports.
    assert_eq!(http_get(np(other_port)).unwrap(), "backend-2");
    let e = connect_from(None, np(w.node_port)).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::ConnectionRefused, "{e}");
}

#[test]
fn udp_round_trip_replies_from_the_frontend() {
    let (net, port, _u) = udp_backends(1);
    let node_port = free_port();
    let m = nodeport_service("dns", node_port, port, &[net.ip(1)], "").replace("TCP", "UDP");
    let rv = Ringvip::start(&m, &["--udp-idle-timeout-secs", "2"]);
    let c = UdpSocket::bind("127.0.0.1:0").unwrap();
    c.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let mut buf = [0u8; 256];
    // The first datagram after start is answered.
    c.send_to(b"ping", np(node_port)).unwrap();
    let (n, from) = c.recv_from(&mut buf).expect("first datagram answered");
    assert_eq!(&buf[..n], b"u1:ping");
    assert_eq!(
        from,
        np(node_port),
        "reply must come from the NodePort address"
    );
    // The same flow keeps working.
    for i in 0..20 {
        let msg = format!("m{i}");
        c.send_to(msg.as_bytes(), np(node_port)).unwrap();
        let (n, _) = c.recv_from(&mut buf).unwrap();
        assert_eq!(&buf[..n], format!("u1:{msg}").as_bytes());
    }
    // A burst (read by the frontend in one batch) comes back whole and in order.
    for i in 0..30 {
        c.send_to(format!("b{i}").as_bytes(), np(node_port))
            .unwrap();
    }
    for i in 0..30 {
        let (n, _) = c.recv_from(&mut buf).unwrap();
        assert_eq!(&buf[..n], format!("u1:b{i}").as_bytes());
    }
    // Payload bytes are counted both ways: at least "ping" and m0..m19 (54
    // bytes) to the backend, each echoed with a 3-byte prefix.
    let metrics = admin_get(rv.metrics, "/metrics");
    let up = bytes_relayed(&metrics, "dns", "to_backend").unwrap_or(0);
    let down = bytes_relayed(&metrics, "dns", "to_client").unwrap_or(0);
    assert!(up >= 54, "to_backend {up}\n{metrics}");
    assert!(down >= up + 3 * 21, "to_client {down}, to_backend {up}");
}

#[test]
fn half_close_is_passed_on() {
    let (_b, _rv, node_port) = one_backend("echo", Mode::Echo, &[]);
    let mut c = connect_when_ready(np(node_port));
    // Half-close: the echo backend sees EOF only if the FIN was passed on, and
    // its replies must still reach us on our open read side.
    assert!(echoed_after_fin(&mut c, 200_000));
}

#[test]
fn backend_reset_is_passed_on_as_reset() {
    let (_b, _rv, node_port) = one_backend("rst", Mode::Reset, &[]);
    let mut c = connect_when_ready(np(node_port));
    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut buf = [0u8; 16];
    let r = c.read(&mut buf);
    assert!(
        matches!(&r, Err(e) if e.kind() == ErrorKind::ConnectionReset),
        "expected a reset, got {r:?}"
    );
}

#[test]
fn load_balancer_source_ranges_are_enforced() {
    let (net, port, _b) = backends(3, Mode::Http);
    let lb_port = free_port();
    // The LB ingress IP is a local loopback address, so ringvip serves it.
    let lb_ip = net.ip(100);
    // The source ranges: a block of their own; the outsider is in `net`.
    let allowed = Loopback::take();
    let m = format!(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: lb\n  namespace: default\nspec:\n  type: LoadBalancer\n  allocateLoadBalancerNodePorts: false\n  loadBalancerSourceRanges: [\"{}\"]\n  ports:\n  - name: p\n    port: {lb_port}\n    targetPort: {port}\nstatus:\n  loadBalancer:\n    ingress:\n    - ip: \"{lb_ip}\"\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: lb-1\n  namespace: default\n  labels: {{kubernetes.io/service-name: lb}}\naddressType: IPv4\nports: [{{name: p, port: {port}, protocol: TCP}}]\nendpoints:\n- addresses: [\"{}\"]\n",
        allowed.cidr(),
        net.ip(1)
    );
    let _rv = Ringvip::start(&m, &[]);
    let lb = SocketAddr::from((lb_ip, lb_port));
    let inside = Some(IpAddr::V4(allowed.ip(5)));
    let outside = Some(IpAddr::V4(net.ip(5)));
    // The first request from inside the ranges is served.
    assert_eq!(http_get_from(inside, lb).unwrap(), "backend-1");
    // Outsiders are dropped in the kernel (no handshake at all), as kube-proxy drops them.
    let e = connect_from(outside, lb).expect_err("client outside the source ranges connected");
    assert_eq!(e.kind(), ErrorKind::TimedOut, "{e}");
}

#[test]
fn check_command_reports_errors_and_exit_codes() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.yaml");
    // Only checked, never served: a documentation address.
    let ep = [Ipv4Addr::new(192, 0, 2, 1)];
    std::fs::write(&good, nodeport_service("ok", 30080, 8080, &ep, "")).unwrap();
    command_ok(&["check", good.to_str().unwrap()]);

    let bad = dir.path().join("bad.yaml");
    std::fs::write(
        &bad,
        nodeport_service("bad", 80, 8080, &ep, "  sessionAffinity: ClientIP\n  sessionAffinityConfig: {clientIP: {timeoutSeconds: 0}}\n"),
    )
    .unwrap();
    let out = command(&["check", bad.to_str().unwrap()]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(text.contains("bad.yaml"), "{text}");
    assert!(text.contains("nodePort"), "{text}");
    assert!(text.contains("timeoutSeconds"), "{text}");
}

#[test]
fn health_and_metrics_endpoints_answer() {
    let w = web("m", 1, "");
    let h = admin_get(w.rv.health, "/healthz");
    assert!(h.starts_with("HTTP/1.1 200"), "{h}");
    assert!(h.contains("\"healthy\":true"), "{h}");
    let l = admin_get(w.rv.health, "/livez");
    assert!(l.starts_with("HTTP/1.1 200"), "{l}");
    let m = admin_get(w.rv.metrics, "/metrics");
    assert!(m.contains("ringvip_connections_total"), "{m}");
    assert!(m.contains("service=\"m\""), "{m}");
}

#[test]
fn demo_runs_and_shows_balancing_and_affinity() {
    // Demos started at once race for the demo's ports (it finds 10256 and
    // 10249 free, then binds them): one demo at a time, across binaries.
    let _demo = exclusive("demo");
    let text = command_ok(&["demo", "--once"]);
    assert!(text.contains("curl http://127.0.0.1:"), "{text}");
    assert!(text.contains("random NodePort"), "{text}");
}

/// Real peers: nginx backends, curl as the client.
#[test]
fn nginx_backends_through_a_nodeport_with_curl() {
    let Some([nginx, curl]) = need_programs([
        ("nginx", "real HTTP backends"),
        ("curl", "a real HTTP client"),
    ]) else {
        return;
    };
    let net = Loopback::take();
    let port = free_port();
    let _n: Vec<Nginx> = (1..=2)
        .map(|i| Nginx::start(&nginx, net.addr(i, port), &i.to_string()))
        .collect();
    let node_port = free_port();
    let _rv = Ringvip::start(
        &nodeport_service("ng", node_port, port, &net.ips(1..=2), ""),
        &[],
    );
    assert_serving(np(node_port));
    let mut seen = HashSet::new();
    for _ in 0..30 {
        let out = Command::new(&curl)
            .args(["-sS", "--max-time", "5"])
            .arg(format!("http://127.0.0.1:{node_port}/"))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        seen.insert(String::from_utf8_lossy(&out.stdout).trim().to_string());
    }
    assert_eq!(
        seen,
        HashSet::from(["backend-1".to_string(), "backend-2".to_string()])
    );
}

#[test]
fn udp_without_endpoints_gets_port_unreachable() {
    let node_port = free_port();
    let m = nodeport_service("udp-empty", node_port, free_port(), &[], "").replace("TCP", "UDP");
    let _rv = Ringvip::start(&m, &[]);
    let c = UdpSocket::bind("127.0.0.1:0").unwrap();
    c.connect(np(node_port)).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    c.send(b"ping").unwrap();
    let mut buf = [0u8; 16];
    let e = c.recv(&mut buf).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::ConnectionRefused, "{e}");
}

#[test]
fn udp_flow_moves_when_its_endpoint_is_removed() {
    let (net, port, _u) = udp_backends(2);
    let node_port = free_port();
    let m = |ep| nodeport_service("flow", node_port, port, &[ep], "").replace("TCP", "UDP");
    let rv = Ringvip::start(&m(net.ip(1)), &[]);
    let c = UdpSocket::bind("127.0.0.1:0").unwrap();
    c.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let mut buf = [0u8; 64];
    let mut ask = || -> Option<String> {
        c.send_to(b"x", np(node_port)).ok()?;
        let (n, _) = c.recv_from(&mut buf).ok()?;
        Some(String::from_utf8_lossy(&buf[..n]).into_owned())
    };
    assert_eq!(ask().as_deref(), Some("u1:x"), "first datagram");
    rv.apply(&m(net.ip(2)));
    // The same client flow is re-pinned at once, well before the idle timeout (30 s).
    assert_eq!(ask().as_deref(), Some("u2:x"));
}

/// An expired UDP flow closes its backend socket. (Its reader's pending
/// io_uring receive once kept the socket open, with its buffer, until the
/// backend sent again: a descriptor and 64 KiB per flow, never returned.)
#[test]
fn expired_udp_flows_close_their_backend_sockets() {
    let (net, port, _u) = udp_backends(1);
    let backend = net.addr(1, port);
    let node_port = free_port();
    let m = nodeport_service("flows", node_port, port, &[net.ip(1)], "").replace("TCP", "UDP");
    // Idle 3 s: long enough that no flow expires while the 100 are made.
    let rv = Ringvip::start(&m, &["--udp-idle-timeout-secs", "3"]);
    let mut buf = [0u8; 64];
    // Kept open until all are made: a closed client's port may be handed out
    // again, and the same client address is the same flow.
    let mut clients = Vec::new();
    for i in 0..100 {
        let c = UdpSocket::bind("127.0.0.1:0").unwrap();
        c.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        c.send_to(b"q", np(node_port)).unwrap();
        let (n, _) = c
            .recv_from(&mut buf)
            .unwrap_or_else(|e| panic!("flow {i}: {e}"));
        assert_eq!(&buf[..n], b"u1:q");
        clients.push(c);
    }
    let flow_sockets = || sockets(&format!("dst {backend}")).len();
    assert_eq!(flow_sockets(), 100);
    // Expiry is the contract's delay: idle 3 s, swept once a second.
    assert!(
        wait_until(Duration::from_secs(8), || flow_sockets() == 0),
        "{} flow sockets still open after the flows expired\n{}",
        flow_sockets(),
        rv.log()
    );
}

#[test]
fn blackholed_backend_times_out_and_is_retried_around() {
    use ringvip::model::Protocol;
    use ringvip::state::{ListenerMode, ListenerSpec};
    let net = Loopback::take();
    let port = free_port();
    // A socket whose filter drops every SYN: connects to it time out.
    let _hole = ringvip::dataplane::socket::open(&ListenerSpec {
        addr: net.addr(1, port),
        proto: Protocol::Tcp,
        mode: ListenerMode::Drop,
        allow: Vec::new().into(),
    })
    .unwrap();
    let _b = Backend::start(net.addr(2, port), "2", Mode::Http);
    let node_port = free_port();
    let rv = Ringvip::start(
        &nodeport_service("hole", node_port, port, &net.ips(1..=2), ""),
        &[],
    );
    assert_serving(np(node_port));
    for _ in 0..10 {
        assert_eq!(http_get(np(node_port)).unwrap(), "backend-2");
    }
    let m = admin_get(rv.metrics, "/metrics");
    let timeouts = connect_failures(&m, "hole", "timeout");
    assert!(
        timeouts.is_some_and(|n| n > 0),
        "no connect timeout counted:\n{m}"
    );
}

#[test]
fn health_check_node_port_reports_local_endpoints() {
    let (net, port, _b) = backends(3, Mode::Http);
    let node_port = free_port();
    let hc = free_port();
    let spec = format!("  externalTrafficPolicy: Local\n  healthCheckNodePort: {hc}\n");
    let m = |node: &str| {
        nodeport_service("lb", node_port, port, &[net.ip(1)], &spec)
            .replace("type: NodePort", "type: LoadBalancer")
            .replace("nodeName: node-a", &format!("nodeName: {node}"))
    };
    let rv = Ringvip::start(&m("node-a"), &[]);
    let hc_addr = np(hc);
    // The first probe: health check servers are open once the snapshot is published.
    let r = admin_get(hc_addr, "/any/path");
    assert!(r.starts_with("HTTP/1.1 200"), "{r}\n{}", rv.log());
    assert!(r.contains("\"localEndpoints\":1"), "{r}");
    assert!(r.contains("\"serviceProxyHealthy\":true"), "{r}");
    assert!(
        r.contains("\"namespace\":\"default\",\"name\":\"lb\""),
        "{r}"
    );
    assert!(
        r.to_ascii_lowercase()
            .contains("x-load-balancing-endpoint-weight: 1"),
        "{r}"
    );
    // The only endpoint moves to another node: the first probe after the
    // change gets 503, no local endpoints.
    rv.apply(&m("node-b"));
    let r = admin_get(hc_addr, "/");
    assert!(r.starts_with("HTTP/1.1 503"), "{r}\n{}", rv.log());
    assert!(r.contains("\"localEndpoints\":0"), "{r}");
    // The Service goes away: so does its health check port, at once.
    rv.apply("");
    let e = std::net::TcpStream::connect(hc_addr).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::ConnectionRefused, "{e}");
}

#[test]
fn sigterm_drains_established_connections_and_refuses_new_ones() {
    let (_s, mut rv, node_port) =
        one_backend("drain", Mode::Stream, &["--drain-timeout-secs", "10"]);
    let mut conn = connect_when_ready(np(node_port));
    conn.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let mut buf = [0u8; 64];
    assert!(conn.read(&mut buf).unwrap() > 0);
    rv.sigterm();
    // New clients are refused at once: the first one after ringvip says it
    // drains (it says so once its listeners are closed).
    assert!(
        wait_until(Duration::from_secs(2), || rv
            .log()
            .contains("SIGTERM: draining")),
        "{}",
        rv.log()
    );
    let e = connect_from(None, np(node_port)).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::ConnectionRefused, "{e}\n{}", rv.log());
    // ...while the established stream keeps flowing and ringvip waits for it.
    assert_streams(&mut conn, "during drain");
    assert!(
        !rv.wait_exit(Duration::from_millis(200)),
        "exited before the connection ended"
    );
    // The client goes away: the drain completes and ringvip exits well
    // before the 10 s drain timeout.
    drop(conn);
    assert!(rv.wait_exit(Duration::from_secs(5)), "{}", rv.log());
    assert!(rv.log().contains("drained"), "{}", rv.log());
}

#[test]
fn status_shows_frontends_endpoints_and_traffic() {
    let w = web("st", 2, "");
    for _ in 0..4 {
        http_get(np(w.node_port)).unwrap();
    }
    let admin = w.rv.metrics.to_string();
    let run = |fmt: &str| command_ok(&["status", "--admin", &admin, "-o", fmt]);
    let table = run("table");
    let line = table
        .lines()
        .find(|l| l.contains(&np(w.node_port).to_string()))
        .unwrap_or_else(|| panic!("no NodePort row:\n{table}"));
    assert!(
        line.contains("default/st") && line.contains("NodePort"),
        "{line}"
    );
    let rows: serde_json::Value = serde_json::from_str(&run("json")).unwrap();
    let row = rows
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["address"] == np(w.node_port).to_string())
        .unwrap();
    assert_eq!(row["endpoints"].as_array().unwrap().len(), 2);
    // wait_serving's probes plus our four requests
    assert!(row["total"].as_u64().unwrap() >= 4, "{row}");
    assert!(row["bytes_to_client"].as_u64().unwrap() > 0, "{row}");
    // Nothing listening: a clear error, exit code 2.
    let out = command(&["status", "--admin", &np(free_port()).to_string()]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot reach the admin API"));
}

/// The harness's own promise (support/addrs.rs): loopback blocks taken at
/// once in one process are all different, and another process cannot take
/// a block this one holds.
#[test]
fn loopback_blocks_are_never_shared() {
    let Some(flock) = need_program("flock", "another process trying a held block") else {
        return;
    };
    let blocks: Vec<Loopback> = (0..16)
        .map(|_| std::thread::spawn(Loopback::take))
        .map(|h| h.join().unwrap())
        .collect();
    let distinct: HashSet<String> = blocks.iter().map(Loopback::cidr).collect();
    assert_eq!(distinct.len(), blocks.len(), "{blocks:?}");
    for b in &blocks {
        let other = Command::new(&flock)
            .arg("--nonblock")
            .arg(b.lock_path())
            .arg("true")
            .status()
            .unwrap();
        assert_eq!(other.code(), Some(1), "{} taken twice", b.cidr());
    }
}
