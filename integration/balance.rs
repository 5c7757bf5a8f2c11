//! Issue 15 items 3, 7 and 8 end to end, through real connections on
//! loopback (each test on loopback blocks of its own, see
//! support/addrs.rs): `ringvip.io/balance` (maglev across two processes,
//! round-robin, least-connections), a Service with an SCTP port beside its
//! TCP port, and a selector-less Service fed by a legacy `v1 Endpoints`.

mod support;

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{IpAddr, TcpStream};
use std::sync::atomic::Ordering;
use std::time::Duration;

use support::*;

/// `m` (a manifest of [`nodeport_service`]) with `annotations` on its Service.
fn annotated(m: &str, annotations: &str) -> String {
    m.replacen(
        "  namespace: default\nspec:",
        &format!("  namespace: default\n  annotations: {{{annotations}}}\nspec:"),
        1,
    )
}

/// The backend that answers a request from `src` through NodePort `port`.
fn backend_for(src: IpAddr, port: u16) -> String {
    http_get_from(Some(src), np(port)).unwrap_or_else(|e| panic!("from {src}: {e}"))
}

#[test]
fn two_processes_with_the_same_maglev_service_agree_for_1000_clients() {
    let (net, port, _backends) = backends(5, Mode::Http);
    let eps = net.ips(1..=5);
    let (np_a, np_b) = (free_port(), free_port());
    let maglev = "ringvip.io/balance: maglev";
    let a = Ringvip::start(
        &annotated(&nodeport_service("web", np_a, port, &eps, ""), maglev),
        &[],
    );
    let b = Ringvip::start(
        &annotated(&nodeport_service("web", np_b, port, &eps, ""), maglev),
        &[],
    );
    // 1,000 client addresses: hosts .1 to .250 of four loopback blocks.
    let clients: Vec<IpAddr> = (0..4)
        .flat_map(|_| Loopback::take().ips(1..=250))
        .map(IpAddr::V4)
        .collect();
    let mut per_backend: HashMap<String, u32> = HashMap::new();
    let mut first = Vec::with_capacity(clients.len());
    for c in &clients {
        let (x, y) = (backend_for(*c, np_a), backend_for(*c, np_b));
        assert_eq!(x, y, "client {c}: process A chose {x}, process B {y}");
        *per_backend.entry(x.clone()).or_default() += 1;
        first.push(x);
    }
    // Spread over all five (each owns a fifth of the table: ~200 clients).
    assert_eq!(per_backend.len(), 5, "{per_backend:?}");
    assert!(
        per_backend.values().all(|&n| (140..=260).contains(&n)),
        "{per_backend:?}"
    );

    // Endpoint 5 leaves process B: its clients move, the others stay
    // (Maglev's bound: at most 1/N + 1% of the clients move in all).
    b.apply(&annotated(
        &nodeport_service("web", np_b, port, &eps[..4], ""),
        maglev,
    ));
    let mut moved_others = 0;
    for (c, before) in clients.iter().zip(&first) {
        let now = backend_for(*c, np_b);
        assert_ne!(now, "backend-5", "client {c}");
        if before != "backend-5" && now != *before {
            moved_others += 1;
        }
    }
    assert!(
        moved_others <= 10,
        "{moved_others} clients of staying endpoints moved"
    );
    drop(a);
}

#[test]
fn round_robin_takes_turns_through_real_connections() {
    let (net, port, _backends) = backends(3, Mode::Http);
    let node_port = free_port();
    let m = nodeport_service("rr", node_port, port, &net.ips(1..=3), "");
    let _rv = Ringvip::start(&annotated(&m, "ringvip.io/balance: round-robin"), &[]);
    let got: Vec<String> = (0..30).map(|_| http_get(np(node_port)).unwrap()).collect();
    // In turn, whichever worker thread accepts: every window of three
    // consecutive connections covers the three backends.
    for w in got.windows(3) {
        let mut w = w.to_vec();
        w.sort();
        w.dedup();
        assert_eq!(w.len(), 3, "{got:?}");
    }
}

/// An echo connection through `port`, checked with one round trip: once it
/// returns, ringvip has connected the backend and counts the connection.
fn held(port: u16) -> TcpStream {
    let mut c = connect_from(None, np(port)).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    c.write_all(b"x").unwrap();
    let mut b = [0u8; 1];
    c.read_exact(&mut b).unwrap();
    c
}

#[test]
fn least_connections_sends_new_connections_to_the_less_busy() {
    let (net, port, backends) = backends(2, Mode::Echo);
    let node_port = free_port();
    let m = nodeport_service("lc", node_port, port, &net.ips(1..=2), "");
    let _rv = Ringvip::start(&annotated(&m, "ringvip.io/balance: least-connections"), &[]);
    // With two endpoints both are compared each time: a new connection goes
    // to the one with fewer open, so the open counts never differ by more
    // than one (random would wander off within a few connections).
    let mut open = Vec::new();
    for i in 1..=20 {
        open.push(held(node_port));
        let n: Vec<u32> = backends
            .iter()
            .map(|b| b.accepted.load(Ordering::SeqCst))
            .collect();
        assert!(n[0].abs_diff(n[1]) <= 1, "after {i} connections: {n:?}");
    }
}

#[test]
fn an_sctp_port_is_skipped_and_the_tcp_port_served() {
    let (net, port, _backends) = backends(1, Mode::Http);
    let node_port = free_port();
    // A second port, SCTP, beside the TCP one.
    let m = nodeport_service("mixed", node_port, port, &net.ips(1..=1), "").replacen(
        "  ports:\n  - name: p\n",
        "  ports:\n  - name: sig\n    protocol: SCTP\n    port: 3868\n  - name: p\n",
        1,
    );
    let rv = Ringvip::start(&m, &[]);
    // The first request is served (no retry: start returns once published).
    assert_eq!(http_get(np(node_port)).unwrap(), "backend-1");
    // A Node object changes every Service's compile: still one warning.
    let node = "---\napiVersion: v1\nkind: Node\nmetadata:\n  name: node-a\n  labels: {topology.kubernetes.io/zone: z1}\n";
    rv.apply(&format!("{m}\n{node}"));
    assert_eq!(http_get(np(node_port)).unwrap(), "backend-1");
    let log = rv.log();
    assert_eq!(log.matches("SCTP is not supported").count(), 1, "{log}");
    assert_eq!(rv.metric("ringvip_skipped_service_ports", &[]), Some(1.0));
}

#[test]
fn a_selectorless_service_is_fed_by_its_legacy_endpoints() {
    let (net, port, _backends) = backends(2, Mode::Http);
    let node_port = free_port();
    let (ready, not_ready) = (net.ip(1), net.ip(2));
    let m = format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: ext}}\nspec:\n  type: NodePort\n  ports:\n  - {{name: p, port: 80, targetPort: {port}, nodePort: {node_port}}}\n---\napiVersion: v1\nkind: Endpoints\nmetadata: {{name: ext}}\nsubsets:\n- addresses: [{{ip: \"{ready}\"}}]\n  notReadyAddresses: [{{ip: \"{not_ready}\"}}]\n  ports: [{{name: p, port: {port}}}]\n"
    );
    let rv = Ringvip::start(&m, &[]);
    for _ in 0..10 {
        assert_eq!(http_get(np(node_port)).unwrap(), "backend-1");
    }
    // Opting out of mirroring takes the endpoints away: refused at once.
    let skip = m.replacen(
        "metadata: {name: ext}\nsubsets",
        "metadata:\n  name: ext\n  labels: {endpointslice.kubernetes.io/skip-mirror: \"true\"}\nsubsets",
        1,
    );
    rv.apply(&skip);
    assert!(refused(np(node_port)), "{}", rv.log());
}
