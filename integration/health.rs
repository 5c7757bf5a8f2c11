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

/// An nginx on host .1 of `net` at `port` reading PROXY headers, answering
/// with `vars` (nginx variables) as its body.
fn proxy_nginx(nginx: &std::path::Path, net: &Loopback, port: u16, vars: &str) -> Nginx {
    let addr = net.addr(1, port);
    let server =
        format!("listen {addr} proxy_protocol;\n    location / {{ return 200 \"{vars}\\n\"; }}");
    Nginx::with_server(nginx, addr, &server)
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
    let vars = "$proxy_protocol_addr:$proxy_protocol_port $proxy_protocol_server_addr:$proxy_protocol_server_port";
    let _ng = proxy_nginx(&nginx, &net, port, vars);
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

/// The `/api/frontends` rows of a running ringvip.
fn rows(rv: &Ringvip) -> Vec<serde_json::Value> {
    let text = admin_get(rv.metrics, "/api/frontends");
    let body = text.split("\r\n\r\n").nth(1).unwrap_or_default();
    serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {text}"))
}

/// The usable endpoints of the frontend at `addr`.
fn usable(rv: &Ringvip, addr: SocketAddr) -> Vec<String> {
    rows(rv)
        .iter()
        .find(|r| r["address"] == addr.to_string())
        .map(|r| {
            r["endpoints"]
                .as_array()
                .unwrap()
                .iter()
                .map(|e| e.as_str().unwrap().to_string())
                .collect()
        })
        .unwrap_or_default()
}

/// Waits until the usable endpoints of the frontend at `addr` satisfy `f`:
/// a precondition (the checker or prober has run), not the answer tested.
fn wait_usable(rv: &Ringvip, addr: SocketAddr, f: impl Fn(Vec<String>) -> bool) {
    let ok = wait_until(Duration::from_secs(5), || f(usable(rv, addr)));
    assert!(ok, "{:?}", rows(rv));
}

/// Bodies of `n` requests through `addr`, each as the client saw it.
fn bodies(addr: SocketAddr, n: usize) -> std::collections::BTreeSet<String> {
    (0..n)
        .map(|i| http_get(addr).unwrap_or_else(|e| panic!("request {i}: {e}")))
        .collect()
}

/// `ringvip.io/health-check: http:/healthz` with rise 1 / fall 1: a backend
/// that stops answering leaves the usable set before any client meets it
/// (no connect fails on it), shows as down with its last result in status
/// and metrics, and comes back once it answers again.
#[test]
fn a_failing_endpoint_leaves_and_returns() {
    let (net, port, mut b) = backends(2, Mode::Http);
    let node_port = free_port();
    let annotations = "  annotations:\n    ringvip.io/health-check: http:/healthz\n    ringvip.io/health-check-interval: 200ms\n    ringvip.io/health-check-rise: \"1\"\n    ringvip.io/health-check-fall: \"1\"\n";
    let m = nodeport_service("hc", node_port, port, &net.ips(1..=2), "").replace(
        "  namespace: default\nspec:",
        &format!("  namespace: default\n{annotations}spec:"),
    );
    let rv = Ringvip::start(&m, &[]);
    let front = np(node_port);
    let (a, dead) = (net.addr(1, port).to_string(), net.addr(2, port).to_string());
    // Both start up (HAProxy's init-state up) and serve.
    assert_eq!(usable(&rv, front), vec![a.clone(), dead.clone()]);
    b[1].kill();
    // Precondition: the checker has seen the backend gone (the check runs
    // every 200 ms, so this is what is waited for, not the answer).
    wait_usable(&rv, front, |u| u == [a.clone()]);
    let before = rv.metrics_text();
    assert_eq!(bodies(front, 20), ["backend-1".to_string()].into());
    let failures = |text: &str| -> u64 {
        text.lines()
            .filter(|l| {
                l.starts_with("ringvip_endpoint_connect_failures_total") && l.contains(&dead)
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .sum()
    };
    assert_eq!(
        failures(&rv.metrics_text()),
        failures(&before),
        "a client's connect met the endpoint the check took out"
    );
    // Status, JSON and wide, and the metrics show it.
    let row = rows(&rv)
        .into_iter()
        .find(|r| r["address"] == front.to_string())
        .unwrap();
    let check = row["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["endpoint"] == dead.as_str())
        .cloned()
        .unwrap();
    assert_eq!(check["health"], "down", "{row}");
    assert_eq!(check["last"], "connect: connection refused", "{row}");
    let wide = command_ok(&["status", "--admin", &rv.metrics.to_string(), "-o", "wide"]);
    assert!(
        wide.contains(&format!("{dead} down (connect: connection refused)")),
        "{wide}"
    );
    let text = rv.metrics_text();
    let sample = |name: &str| {
        text.lines()
            .find(|l| l.starts_with(name) && l.contains(&dead))
            .and_then(|l| l.rsplit(' ').next().map(str::to_string))
    };
    assert_eq!(
        sample("ringvip_endpoint_check_up").as_deref(),
        Some("0"),
        "{text}"
    );
    assert_eq!(
        sample("ringvip_endpoint_healthy").as_deref(),
        Some("0"),
        "{text}"
    );
    // Back: once the check has seen it answer, clients reach it again.
    b[1] = Backend::start(net.addr(2, port), "2", Mode::Http);
    wait_usable(&rv, front, |u| u.len() == 2);
    assert_eq!(
        bodies(front, 40),
        ["backend-1".to_string(), "backend-2".to_string()].into()
    );
}

/// A Pod manifest `web-<i>` at `ip` selected by app=web whose readiness
/// probe is `probe`; its file status says Ready, which a probe overrides.
fn probed_pod(i: u8, ip: std::net::Ipv4Addr, port: u16, probe: &str) -> String {
    format!(
        "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: web-{i}, namespace: default, labels: {{app: web}}}}\nspec:\n  nodeName: node-a\n  containers:\n  - name: c\n    ports: [{{name: http, containerPort: {port}}}]\n    readinessProbe: {probe}\nstatus:\n  podIP: {ip}\n  conditions: [{{type: Ready, status: \"True\"}}]\n"
    )
}

/// ringvip runs the Pods' readiness probes: a Pod whose probe has not
/// succeeded is not an endpoint even though its file says Ready; it joins
/// once its probe answers, and leaves when it stops (failureThreshold 1).
#[test]
fn readiness_probes_decide_which_pods_are_endpoints() {
    let net = Loopback::take();
    let port = free_port();
    let mut one = Backend::start(net.addr(1, port), "1", Mode::Http);
    let node_port = free_port();
    let probe = "{httpGet: {port: http, path: /ready}, periodSeconds: 1, failureThreshold: 1}";
    let manifest = format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: web, namespace: default}}\nspec:\n  type: NodePort\n  selector: {{app: web}}\n  ports:\n  - {{name: http, port: 80, targetPort: http, nodePort: {node_port}}}\n{}{}",
        probed_pod(1, net.ip(1), port, probe),
        probed_pod(2, net.ip(2), port, probe)
    );
    let rv = Ringvip::start(&manifest, &[]);
    let front = np(node_port);
    let (a, b) = (net.addr(1, port).to_string(), net.addr(2, port).to_string());
    // Before any probe result neither Pod is ready, whatever the file says
    // (probe::state's unit tests pin that down). The first probes run at a
    // random point of their first second, possibly before this query: only
    // pod 1, whose backend answers, may be usable already.
    let first = usable(&rv, front);
    assert!(first.is_empty() || first == [a.clone()], "{first:?}");
    // Precondition: the first probes ran (every second, spread over one).
    wait_usable(&rv, front, |u| u == [a.clone()]);
    assert_eq!(bodies(front, 10), ["backend-1".to_string()].into());
    let _two = Backend::start(net.addr(2, port), "2", Mode::Http);
    wait_usable(&rv, front, |u| u.len() == 2);
    assert_eq!(
        bodies(front, 40),
        ["backend-1".to_string(), "backend-2".to_string()].into()
    );
    one.kill();
    wait_usable(&rv, front, |u| u == [b.clone()]);
    assert_eq!(bodies(front, 10), ["backend-2".to_string()].into());
}

/// `ringvip check` names every bad annotation and an exec probe.
#[test]
fn check_reports_bad_annotations_and_exec_probes() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("bad.yaml");
    std::fs::write(
        &f,
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: bad\n  annotations:\n    ringvip.io/health-check: udp\n    ringvip.io/proxy-protocol: v3\nspec:\n  ports: [{port: 80}]\n---\napiVersion: v1\nkind: Pod\nmetadata: {name: p}\nspec:\n  containers:\n  - name: c\n    readinessProbe: {exec: {command: [cat, /ready]}}\n",
    )
    .unwrap();
    let out = command(&["check", f.to_str().unwrap()]);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!out.status.success(), "{text}");
    for want in [
        "metadata.annotations[ringvip.io/health-check]: unknown health check \"udp\"",
        "metadata.annotations[ringvip.io/proxy-protocol]: unknown PROXY protocol version \"v3\"",
        "spec.containers[0].readinessProbe.exec: exec probes cannot run in ringvip",
    ] {
        assert!(text.contains(want), "{want} not in {text}");
    }
}

/// Sends `header` then a GET through `addr` from `src`; the body, or `None`
/// when the connection was reset or closed without an answer.
fn get_with_header(src: std::net::IpAddr, addr: SocketAddr, header: &[u8]) -> Option<String> {
    let mut c = connect_from(Some(src), addr).ok()?;
    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut req = header.to_vec();
    req.extend_from_slice(b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n");
    // Header and request in one write: the request bytes read with the
    // header must reach the backend too.
    c.write_all(&req).ok()?;
    let mut s = String::new();
    c.read_to_string(&mut s).ok()?;
    s.starts_with("HTTP/1.1 200").then(|| {
        s.split("\r\n\r\n")
            .nth(1)
            .unwrap_or_default()
            .trim()
            .to_string()
    })
}

/// `--proxy-protocol-from`: on a LoadBalancer IP, an upstream balancer's
/// PROXY v2 header names the client for source ranges and for the header
/// passed on to nginx; the same upstream without a header is reset and
/// counted; an address outside the list is served as plain.
#[test]
fn upstream_proxy_headers_on_load_balancer_ips() {
    use ringvip::dataplane::proxy_protocol::{encode, MAX_HEADER_LEN};
    use ringvip::model::ProxyProtocol;
    let Some(nginx) = need_program("nginx", "a real PROXY protocol consumer") else {
        return;
    };
    let net = Loopback::take();
    let port = free_port();
    let _ng = proxy_nginx(
        &nginx,
        &net,
        port,
        "$proxy_protocol_addr:$proxy_protocol_port",
    );
    let (upstream, other, lb) = (net.ip(9), net.ip(10), net.ip(3));
    let node_port = free_port();
    let ranges = format!("  loadBalancerSourceRanges: [203.0.113.0/24, {other}/32]\n");
    let m = service_with(
        "lb",
        "TCP",
        node_port,
        port,
        &[(net.ip(1), true, "node-a")],
        &ranges,
    )
    .replace("type: NodePort", "type: LoadBalancer")
    .replace(
        "  namespace: default\nspec:",
        "  namespace: default\n  annotations:\n    ringvip.io/proxy-protocol: v2\nspec:",
    )
    .replacen(
        "\n---\n",
        &format!("\nstatus:\n  loadBalancer:\n    ingress:\n    - ip: \"{lb}\"\n---\n"),
        1,
    );
    let rv = Ringvip::start(&m, &["--proxy-protocol-from", &format!("{upstream}/32")]);
    let front = SocketAddr::new(lb.into(), node_port);
    let header = |client: &str| {
        let mut buf = [0u8; MAX_HEADER_LEN];
        let n = encode(ProxyProtocol::V2, client.parse().unwrap(), front, &mut buf);
        buf[..n].to_vec()
    };
    let up = std::net::IpAddr::V4(upstream);
    assert_eq!(
        get_with_header(up, front, &header("203.0.113.7:4242")).as_deref(),
        Some("203.0.113.7:4242"),
        "{}",
        rv.log()
    );
    // The original client decides source ranges: this one is outside.
    assert_eq!(get_with_header(up, front, &header("198.51.100.1:1")), None);
    // The upstream without a header: reset and counted.
    assert_eq!(get_with_header(up, front, b""), None);
    assert_eq!(
        rv.metric("ringvip_proxy_protocol_rejected_total", &[]),
        Some(1.0)
    );
    // Not listed: nothing is parsed, the client is who connected.
    let (me, body) = get_from(std::net::IpAddr::V4(other), front);
    assert_eq!(body, me.to_string());
}

/// `trafficDistribution: PreferSameNode` in file mode: ringvip sets the
/// hints the EndpointSlice controller would, and, as kube-proxy 1.34, this
/// node (node-a) uses only its own Pod while it is ready, the others once
/// it is not.
#[test]
fn prefer_same_node_keeps_traffic_on_this_node() {
    let (net, port, _b) = backends(3, Mode::Http);
    let node_port = free_port();
    let pod = |i: u8, node: &str, ready: bool| {
        format!(
            "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: p-{i}, namespace: default, labels: {{app: t}}}}\nspec:\n  nodeName: {node}\n  containers:\n  - name: c\n    ports: [{{name: http, containerPort: {port}}}]\nstatus:\n  podIP: {}\n  conditions: [{{type: Ready, status: \"{}\"}}]\n",
            net.ip(i),
            if ready { "True" } else { "False" }
        )
    };
    let manifest = |local_ready: bool| {
        format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: t, namespace: default}}\nspec:\n  type: NodePort\n  trafficDistribution: PreferSameNode\n  selector: {{app: t}}\n  ports:\n  - {{name: http, port: 80, targetPort: http, nodePort: {node_port}}}\n{}{}{}",
            pod(1, "node-a", local_ready),
            pod(2, "node-b", true),
            pod(3, "node-c", true)
        )
    };
    let rv = Ringvip::start(&manifest(true), &[]);
    let front = np(node_port);
    assert_eq!(bodies(front, 20), ["backend-1".to_string()].into());
    // This node's Pod not ready: the node hints name no ready endpoint
    // here, so the whole set is used (never nothing).
    rv.apply(&manifest(false));
    assert_eq!(
        bodies(front, 40),
        ["backend-2".to_string(), "backend-3".to_string()].into()
    );
}
