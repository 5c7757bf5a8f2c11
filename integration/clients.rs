//! Real clients through ringvip's ClusterIP (TUN) path, as a pod uses them:
//! glibc's resolver against a DNS Service, a resolver-like A+AAAA pair from
//! fresh sockets, and a connection-per-request Redis client whose ports come
//! back while ringvip may still remember them. ringvip runs in a network
//! namespace the test creates (see support/netns.rs). Needs root; CI runs as
//! root and installs the clients (.ci/run).

mod support;

use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use support::netns::Topology;
use support::*;

/// `ringvip_connections_total` of a Service (UDP flows count there too).
fn flows_total(t: &Topology, rv: &Ringvip, service: &str) -> u64 {
    let addr = rv.metrics;
    let metrics = t.on_node_thread(move || admin_get(addr, "/metrics"));
    let svc = format!("service=\"{service}\"");
    metric(&metrics, "ringvip_connections_total", &[&svc])
        .unwrap_or_else(|| panic!("no ringvip_connections_total for {service}\n{metrics}"))
}

/// Sends two datagrams back to back from each of `sockets` fresh sockets
/// (what glibc's resolver does with its A and AAAA queries) and counts the
/// sockets that did not get both replies within a second. The sockets are
/// all bound first and stay open until all are done, so each has a port of
/// its own: a port the kernel handed out again would make a later socket the
/// same flow as an earlier one.
fn pairs_lost(to: SocketAddr, sockets: usize) -> usize {
    let open: Vec<UdpSocket> = (0..sockets)
        .map(|_| UdpSocket::bind("0.0.0.0:0").unwrap())
        .collect();
    open.iter()
        .enumerate()
        .filter(|(i, c)| {
            c.connect(to).unwrap();
            c.send(format!("A{i}").as_bytes()).unwrap();
            c.send(format!("AAAA{i}").as_bytes()).unwrap();
            let deadline = Instant::now() + Duration::from_secs(1);
            let mut buf = [0u8; 64];
            let mut got = 0;
            while got < 2 {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    break;
                }
                c.set_read_timeout(Some(left)).unwrap();
                match c.recv(&mut buf) {
                    Ok(_) => got += 1,
                    Err(_) => break,
                }
            }
            got < 2
        })
        .count()
}

/// A UDP Service with a ClusterIP and a NodePort: from 30 fresh sockets each,
/// the A+AAAA-like pair gets both replies on both paths, and each socket is
/// one flow, counted once.
#[test]
fn a_datagram_pair_from_fresh_sockets_gets_both_replies() {
    let Some(t) = Topology::setup(&[]) else {
        return;
    };
    let addr = SocketAddr::from((t.pod_ip(2), 5353));
    let _echo = t.udp_backend(addr, "u");
    let node_port = 30_053;
    let m = nodeport_service(
        "pair",
        node_port,
        5353,
        &[t.pod_ip(2)],
        "  clusterIP: 10.96.0.53\n",
    )
    .replace("TCP", "UDP");
    let rv = t.launch(&m, &[]);
    let vip = SocketAddr::from(([10, 96, 0, 53], 80));
    let np = SocketAddr::from(([127, 0, 0, 1], node_port));
    let probes = Topology::within(&t.node, move || {
        Some((
            wait_udp_ready(vip, b"ready?")?,
            wait_udp_ready(np, b"ready?")?,
        ))
    });
    assert!(probes.is_some(), "the Service never answered\n{}", rv.log());
    let before = flows_total(&t, &rv, "pair");
    let (via_vip, via_np) =
        Topology::within(&t.node, move || (pairs_lost(vip, 30), pairs_lost(np, 30)));
    assert_eq!(
        via_vip,
        0,
        "sockets that lost a reply through the ClusterIP\n{}",
        rv.log()
    );
    assert_eq!(via_np, 0, "sockets that lost a reply through the NodePort");
    assert_eq!(
        flows_total(&t, &rv, "pair") - before,
        60,
        "one flow per socket and path, each counted once"
    );
    drop(probes);
}

/// glibc's resolver in a pod-like namespace whose resolv.conf names a DNS
/// ClusterIP with dnsmasq behind it: `getent ahosts` (getaddrinfo, which
/// sends the A and AAAA queries back to back from one socket) resolves 50
/// names, none of them after a resolver timeout.
#[test]
fn glibc_resolves_fifty_names_through_a_dns_clusterip() {
    let Some((t, [dnsmasq, getent])) = Topology::setup_with(
        &[],
        [
            ("dnsmasq", "a real DNS server behind a UDP ClusterIP"),
            ("getent", "glibc's resolver as a pod uses it"),
        ],
    ) else {
        return;
    };
    let names: Vec<String> = (1..=50)
        .map(|i| format!("/name{i}.test/192.0.2.{i}"))
        .collect();
    let _server = t.spawn_dnsmasq(&dnsmasq, 5353, &names);
    let m = t.pod_service("kube-dns", "10.96.0.54", 53, "UDP", 5353);
    let rv = t.launch(&m, &[]);
    // A timeout of 2 s, tried once: a lost reply shows as a lookup of 2 s or a
    // failed one, where an answered one takes milliseconds.
    let _conf = t.resolv_conf("nameserver 10.96.0.54\noptions timeout:2 attempts:1\n");
    let dns = SocketAddr::from(([10, 96, 0, 54], 53));
    // Precondition (ringvip and dnsmasq up): any answer at all, from a socket
    // of its own; the lookups below are not retried.
    let ready =
        Topology::within(&t.node, move || wait_udp_ready(dns, &a_query("name1.test"))).is_some();
    assert!(ready, "the DNS ClusterIP never answered\n{}", rv.log());
    let getent = getent.to_str().unwrap().to_string();
    for i in 1..=50 {
        let name = format!("name{i}.test");
        let start = Instant::now();
        let out = t.on_node(&getent, &["ahosts", &name]);
        let took = start.elapsed();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && text.contains(&format!("192.0.2.{i} ")),
            "{name}: {text:?} after {took:?}\n{}",
            rv.log()
        );
        assert!(
            took < Duration::from_millis(1500),
            "{name} took {took:?}: the resolver waited for a lost reply"
        );
    }
}

/// The rate of one `redis-benchmark -k 0` run (a new connection per request).
fn redis_rate(t: &Topology, bench: &str, vip: &str, requests: &str) -> f64 {
    let out = t.on_node(
        bench,
        &[
            "-h", vip, "-p", "6379", "-t", "get", "-n", requests, "-c", "20", "-k", "0", "-q",
        ],
    );
    let text = String::from_utf8_lossy(&out.stdout);
    // Progress lines end in \r; the summary is "GET: <rate> requests per second, ...".
    text.rsplit(['\r', '\n'])
        .find_map(|l| {
            l.strip_prefix("GET: ")?
                .split(" requests per second")
                .next()?
                .trim()
                .parse()
                .ok()
        })
        .unwrap_or_else(|| panic!("no rate in redis-benchmark's output: {text:?}"))
}

/// Four back-to-back runs of redis-benchmark with a new connection per request
/// and port reuse (tcp_tw_reuse=1) through a ClusterIP: the later runs reuse
/// client ports of the earlier ones, and each keeps at least half the first
/// run's rate (through ringvip they fell to a tenth: the kernel reuses a
/// port from TIME-WAIT only with TCP timestamps, which ringvip's SYN-ACK did
/// not offer). A ratio within one test, so a slow box slows all runs alike.
#[test]
fn connection_per_request_runs_keep_their_rate() {
    let Some((t, [server, bench])) = Topology::setup_with(
        &[],
        [
            ("redis-server", "a real TCP server behind a ClusterIP"),
            ("redis-benchmark", "a connection-per-request client"),
        ],
    ) else {
        return;
    };
    let pod = t.pod_ip(2).to_string();
    let _redis = t.spawn_on_pod(
        &server,
        &[
            "--bind",
            &pod,
            "--port",
            "6379",
            "--protected-mode",
            "no",
            "--save",
            "",
            "--appendonly",
            "no",
        ],
    );
    let m = t.pod_service("redis", "10.96.0.55", 6379, "TCP", 6379);
    let rv = t.launch(&m, &[]);
    let reuse = t.on_node("sysctl", &["-qw", "net.ipv4.tcp_tw_reuse=1"]);
    assert!(reuse.status.success(), "{reuse:?}");
    // Precondition: redis answers through the VIP (it starts asynchronously).
    let vip = SocketAddr::from(([10, 96, 0, 55], 6379));
    let up = Topology::within(&t.node, move || {
        wait_until(Duration::from_secs(5), || {
            connect_from(None, vip).is_ok_and(|mut c| {
                use std::io::{Read, Write};
                let mut b = [0u8; 7];
                c.write_all(b"PING\r\n").is_ok() && c.read_exact(&mut b).is_ok()
            })
        })
    });
    assert!(
        up,
        "redis never answered through the ClusterIP\n{}",
        rv.log()
    );
    let bench = bench.to_str().unwrap().to_string();
    let rates: Vec<f64> = (0..4)
        .map(|_| redis_rate(&t, &bench, "10.96.0.55", "8000"))
        .collect();
    eprintln!("redis-benchmark -k 0 through the ClusterIP, req/s: {rates:?}");
    for (i, r) in rates.iter().enumerate().skip(1) {
        assert!(
            *r * 2.0 >= rates[0],
            "run {} did {r:.0} req/s, under half of the first run's {:.0}: {rates:?}\n{}",
            i + 1,
            rates[0],
            rv.log()
        );
    }
}
