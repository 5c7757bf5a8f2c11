//! Listener lifecycle, as a client sees it: a listener the snapshot no longer
//! asks for is closed on every worker at once (no LISTEN or UNCONN socket left,
//! nothing in CLOSE-WAIT), and the FIRST connection after the change gets the
//! new answer (refused, dropped or served), never a connection that hangs.
//!
//! Each check runs right after ringvip has published the change; the only wait
//! is the contract's own: the kernel sockets follow within 100 ms. Everything
//! runs on loopback addresses each test takes for itself (`Loopback::take`),
//! no root needed.

mod support;

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::time::{Duration, Instant};

use support::*;

/// What the contract allows between a published snapshot and its sockets.
const SETTLE: Duration = Duration::from_millis(100);
/// ringvip's data-plane threads in these tests (`Ringvip::spawn`): each holds
/// its own SO_REUSEPORT socket per listener.
const WORKERS: usize = 2;

/// Asserts the first connection after a change is refused, and at once.
fn assert_refused(addr: SocketAddr, rv: &Ringvip) {
    let t = Instant::now();
    match echo(addr) {
        Answer::Refused => {}
        other => panic!(
            "first connection to {addr} after the change: {other:?}, not refused\n{}",
            rv.log()
        ),
    }
    assert!(
        t.elapsed() < Duration::from_millis(500),
        "refused only after {:?}",
        t.elapsed()
    );
}

/// Asserts the first connection after a change is relayed.
fn assert_served(addr: SocketAddr, rv: &Ringvip) {
    let r = echo(addr);
    assert!(
        r == Answer::Echoed,
        "first connection to {addr} after the change: {r:?}, not served\n{}",
        rv.log()
    );
}

/// Asserts the sockets on `port` reach exactly `listen` LISTEN sockets within
/// the contract's time, with nothing in CLOSE-WAIT.
fn assert_listening(port: u16, listen: usize) {
    let (ok, socks) = sockets_within(SETTLE, port, |s| {
        count(s, "LISTEN") == listen && count(s, "CLOSE-WAIT") == 0
    });
    assert!(
        ok,
        "port {port}: want {listen} LISTEN and no CLOSE-WAIT within {SETTLE:?}, have {socks:#?}"
    );
}

#[test]
fn deleted_service_closes_its_listeners_at_once() {
    let (net, port, _b) = backends(2, Mode::Echo);
    let node_port = free_port();
    let lb_ip = net.ip(9);
    let eps = [(net.ip(1), true, "node-a"), (net.ip(2), true, "node-a")];
    // A LoadBalancer: its nodePort on 127.0.0.1 and its ingress IP (local:
    // all of 127.0.0.0/8 is) on the same port.
    let m = service_with("gone", "TCP", node_port, port, &eps, "")
        .replace("type: NodePort", "type: LoadBalancer")
        .replacen(
            "\n---\n",
            &format!("\nstatus:\n  loadBalancer:\n    ingress:\n    - ip: \"{lb_ip}\"\n---\n"),
            1,
        );
    let rv = Ringvip::start(&m, &[]);
    let ext = SocketAddr::from((lb_ip, node_port));
    // Precondition: both frontends serve (listeners open asynchronously).
    assert!(
        wait_until(Duration::from_secs(5), || echo(np(node_port))
            == Answer::Echoed),
        "{}",
        rv.log()
    );
    assert!(wait_until(Duration::from_secs(5), || echo(ext) == Answer::Echoed));
    // One per worker and address.
    assert_listening(node_port, 2 * WORKERS);
    // An established connection: removing the Service closes nothing.
    let mut live = connect_from(None, np(node_port)).unwrap();
    live.set_read_timeout(Some(Duration::from_secs(2))).unwrap();

    rv.apply("");
    assert_listening(node_port, 0);
    assert_refused(np(node_port), &rv);
    assert_refused(ext, &rv);
    live.write_all(b"live").unwrap();
    let mut buf = [0u8; 4];
    live.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"live");
    drop(live);
    let (ok, socks) = sockets_within(Duration::from_secs(2), node_port, |s| {
        count(s, "CLOSE-WAIT") == 0
    });
    assert!(ok, "{socks:#?}");
}

#[test]
fn last_endpoint_gone_closes_the_listener_and_it_comes_back() {
    let (net, port, _b) = backends(1, Mode::Echo);
    let node_port = free_port();
    let with = service_with(
        "last",
        "TCP",
        node_port,
        port,
        &[(net.ip(1), true, "node-a")],
        "",
    );
    let without = service_with("last", "TCP", node_port, port, &[], "");
    let rv = Ringvip::start(&with, &[]);
    assert!(wait_until(Duration::from_secs(5), || echo(np(node_port))
        == Answer::Echoed));

    rv.apply(&without);
    assert_listening(node_port, 0);
    assert_refused(np(node_port), &rv);

    rv.apply(&with);
    assert_listening(node_port, WORKERS);
    assert_served(np(node_port), &rv);
}

#[test]
fn flapping_endpoints_leave_exactly_the_wanted_listeners() {
    let (net, port, _b) = backends(2, Mode::Echo);
    let node_port = free_port();
    let m = |ready: bool| {
        service_with(
            "flap",
            "TCP",
            node_port,
            port,
            &[(net.ip(1), ready, "node-a"), (net.ip(2), ready, "node-a")],
            "",
        )
    };
    let rv = Ringvip::start(&m(true), &[]);
    assert!(wait_until(Duration::from_secs(5), || echo(np(node_port))
        == Answer::Echoed));
    for i in 0..20 {
        let ready = i % 2 == 1;
        rv.apply(&m(ready));
        if ready {
            assert_listening(node_port, WORKERS);
            assert_served(np(node_port), &rv);
        } else {
            assert_listening(node_port, 0);
            assert_refused(np(node_port), &rv);
        }
    }
}

#[test]
fn traffic_policy_local_switch_swaps_accepting_and_dropping_listeners() {
    let (net, port, _b) = backends(1, Mode::Echo);
    let node_port = free_port();
    // With eTP Local and no endpoint on this node, kube-proxy drops: clients
    // time out. The listener stays (its filter drops every SYN).
    let m = |policy: &str, node: &str| {
        service_with(
            "local",
            "TCP",
            node_port,
            port,
            &[(net.ip(1), true, node)],
            &format!("  externalTrafficPolicy: {policy}\n"),
        )
    };
    let rv = Ringvip::start(&m("Local", "node-a"), &[]);
    assert!(wait_until(Duration::from_secs(5), || echo(np(node_port))
        == Answer::Echoed));
    for (policy, node, served) in [
        ("Local", "node-b", false),
        ("Local", "node-a", true),
        ("Local", "node-b", false),
        ("Cluster", "node-b", true),
        ("Local", "node-b", false),
        ("Cluster", "node-b", true),
    ] {
        rv.apply(&m(policy, node));
        // Exactly one socket per worker: the old mode's sockets are gone.
        assert_listening(node_port, WORKERS);
        if served {
            assert_served(np(node_port), &rv);
        } else {
            match echo(np(node_port)) {
                Answer::Dropped => {}
                other => panic!(
                    "{policy}/{node}: first connection {other:?}, not dropped\n{}",
                    rv.log()
                ),
            }
        }
    }
}

#[test]
fn deleted_udp_service_unbinds_at_once_with_its_flows() {
    let (net, port, _u) = udp_backends(1);
    let backend = net.addr(1, port);
    let node_port = free_port();
    let m = service_with(
        "dns",
        "UDP",
        node_port,
        port,
        &[(net.ip(1), true, "node-a")],
        "",
    );
    let rv = Ringvip::start(&m, &[]);
    let c = UdpSocket::bind("127.0.0.1:0").unwrap();
    c.connect(np(node_port)).unwrap();
    c.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let mut buf = [0u8; 64];
    // Precondition: a flow exists (its backend socket is connected to the pod).
    assert!(wait_until(Duration::from_secs(5), || {
        c.send(b"q").is_ok() && c.recv(&mut buf).is_ok_and(|n| &buf[..n] == b"u1:q")
    }));
    let flow_sockets = || sockets(&format!("dst {backend}"));
    assert_eq!(flow_sockets().len(), 1, "{:#?}", flow_sockets());

    rv.apply("");
    let (ok, socks) = sockets_within(SETTLE, node_port, |s| s.is_empty());
    assert!(ok, "port {node_port} still bound: {socks:#?}");
    assert!(
        flow_sockets().is_empty(),
        "flow sockets left: {:#?}",
        flow_sockets()
    );
    // The flow's client and a fresh one: ICMP port unreachable, at once.
    for sock in [c, UdpSocket::bind("127.0.0.1:0").unwrap()] {
        sock.connect(np(node_port)).unwrap();
        sock.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
        sock.send(b"q").unwrap();
        let e = sock
            .recv(&mut buf)
            .expect_err("a datagram to a deleted Service was answered");
        assert_eq!(e.kind(), ErrorKind::ConnectionRefused, "{e}\n{}", rv.log());
    }
}

#[test]
fn health_check_node_port_closes_with_its_service() {
    let (net, port, _b) = backends(1, Mode::Echo);
    let node_port = free_port();
    let hc = free_port();
    let m = service_with(
        "hc",
        "TCP",
        node_port,
        port,
        &[(net.ip(1), true, "node-a")],
        &format!("  externalTrafficPolicy: Local\n  healthCheckNodePort: {hc}\n"),
    )
    .replace("type: NodePort", "type: LoadBalancer");
    let rv = Ringvip::start(&m, &[]);
    // Precondition: the health check server answers (it opens asynchronously).
    assert!(wait_until(Duration::from_secs(5), || {
        TcpStream::connect(np(hc)).is_ok() && admin_get(np(hc), "/").starts_with("HTTP/1.1 200")
    }));
    rv.apply("");
    assert_listening(hc, 0);
    assert_listening(node_port, 0);
    assert_refused(np(hc), &rv);
    assert_refused(np(node_port), &rv);
}

#[test]
fn a_port_held_by_another_socket_is_served_once_it_is_free() {
    let (net, port, _b) = backends(1, Mode::Echo);
    let node_port = free_port();
    // Another program's socket on the port, without SO_REUSEPORT: ringvip's
    // bind fails with "address in use".
    let squatter = std::net::TcpListener::bind(np(node_port)).unwrap();
    let m = service_with(
        "late",
        "TCP",
        node_port,
        port,
        &[(net.ip(1), true, "node-a")],
        "",
    );
    let rv = Ringvip::start(&m, &[]);
    assert!(
        wait_until(Duration::from_secs(5), || rv.log().contains("in use")),
        "the failed bind was not reported:\n{}",
        rv.log()
    );
    let published = rv.generations();

    // The port frees with no change to the manifests: ringvip takes it on its
    // own, within its retry period, and the first client is served.
    drop(squatter);
    let (ok, socks) = sockets_within(Duration::from_secs(3), node_port, |s| {
        count(s, "LISTEN") == WORKERS
    });
    assert!(
        ok,
        "port {node_port} not taken up once free: {socks:#?}\n{}",
        rv.log()
    );
    assert_served(np(node_port), &rv);
    assert_eq!(rv.generations(), published, "no snapshot was needed");
}
