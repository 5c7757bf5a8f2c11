//! Issue 15 items 1, 2, 5: readiness probes run by ringvip, active health
//! checks of endpoints, and PROXY protocol headers read by a real consumer
//! (nginx `listen ... proxy_protocol`). Everything runs on loopback addresses
//! each test takes for itself, so no root is needed.

mod support;

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::time::Duration;

use support::*;

/// One `GET /` through `addr` from `src`; returns the client's own address
/// and the body.
fn get_from(src: std::net::IpAddr, addr: SocketAddr) -> (SocketAddr, String) {
    let mut c = connect_from(Some(src), addr).expect("connect");
    let me = c.local_addr().unwrap();
    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(c, "GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n").unwrap();
    let mut s = String::new();
    c.read_to_string(&mut s).unwrap();
    let body = s
        .split("\r\n\r\n")
        .nth(1)
        .unwrap_or_default()
        .trim()
        .to_string();
    assert!(s.starts_with("HTTP/1.1 200"), "{s:?}");
    (me, body)
}

/// nginx reading the PROXY header sees the client's own address and port,
/// and the NodePort address it connected to, for v1 and v2; without the
/// annotation, the same nginx refuses the connection (no header).
#[test]
fn nginx_reads_the_client_address_from_the_proxy_header() {
    let Some(nginx) = need_program("nginx", "a real PROXY protocol consumer") else {
        return;
    };
    let net = Loopback::take();
    let port = free_port();
    let server = format!(
        "listen {} proxy_protocol;\n    location / {{ return 200 \"$proxy_protocol_addr:$proxy_protocol_port $proxy_protocol_server_addr:$proxy_protocol_server_port\\n\"; }}",
        net.addr(1, port)
    );
    let _ng = Nginx::with_server(&nginx, net.addr(1, port), &server);
    let client = std::net::IpAddr::V4(net.ip(9));
    for version in ["v1", "v2"] {
        let node_port = free_port();
        let m = nodeport_service("pp", node_port, port, &net.ips(1..=1), "")
            .replace(
                "  namespace: default\nspec:",
                &format!("  namespace: default\n  annotations:\n    ringvip.io/proxy-protocol: {version}\nspec:"),
            );
        let _rv = Ringvip::start(&m, &[]);
        let (me, body) = get_from(client, np(node_port));
        assert_eq!(
            body,
            format!("{} {}", me, np(node_port)),
            "PROXY {version}: nginx saw another client or frontend"
        );
    }
    // The same backend without the annotation: nginx gets no header.
    let node_port = free_port();
    let _rv = Ringvip::start(
        &nodeport_service("plain", node_port, port, &net.ips(1..=1), ""),
        &[],
    );
    let mut c = connect_from(Some(client), np(node_port)).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(c, "GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n").unwrap();
    let mut s = String::new();
    let _ = c.read_to_string(&mut s);
    assert!(!s.starts_with("HTTP/1.1 200"), "{s:?}");
}
