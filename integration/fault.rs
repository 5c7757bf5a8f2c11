//! Fault and load suite: limits, idle timeouts, backends stopped under load,
//! reloads and endpoint churn under load, SYN and UDP floods. Each test prints
//! its figure (`cargo nextest run --test fault --no-capture`) and asserts it.
//! NodePort tests run on loopback addresses of their own (`Loopback`);
//! ClusterIP tests in network namespaces they create (root; CI runs as root).
//! Loads are bounded in count and time.

mod support;

use std::io::{ErrorKind, Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use support::netns::Topology;
use support::*;

fn limit_hits(rv: &Ringvip, limit: &str) -> u64 {
    let m = admin_get(rv.metrics, "/metrics");
    metric::<f64>(
        &m,
        "ringvip_limit_hits_total",
        &[&format!("limit=\"{limit}\"")],
    )
    .unwrap_or_else(|| panic!("no limit_hits for {limit}:\n{m}")) as u64
}

/// Resident memory of a process, KiB.
fn rss_kib(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS")
}

/// Writes `ping` and expects it echoed within 2 s.
fn echoes(c: &mut TcpStream) -> bool {
    c.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    if c.write_all(b"ping").is_err() {
        return false;
    }
    let mut b = [0u8; 4];
    c.read_exact(&mut b).is_ok() && &b == b"ping"
}

/// True when the peer closed or reset `c` (not a read timeout).
fn closed(c: &mut TcpStream, within: Duration) -> bool {
    c.set_read_timeout(Some(within)).unwrap();
    let mut b = [0u8; 16];
    match c.read(&mut b) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => !matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut),
    }
}

/// Connects to `front` and expects the connection turned away: reset or
/// closed at once (the reset may already surface at connect).
fn reset_or_closed(front: SocketAddr) -> bool {
    match connect_from(None, front) {
        Err(e) => e.kind() == ErrorKind::ConnectionReset,
        Ok(mut c) => {
            let _ = c.write_all(b"ping");
            closed(&mut c, Duration::from_secs(2))
        }
    }
}

fn tools() -> Option<(PathBuf, PathBuf)> {
    let nginx = need_program("nginx", "real HTTP backends (nginx-light)")?;
    need_program("wrk", "HTTP load for the fault suite")?;
    Some((nginx, PathBuf::from("wrk")))
}

/// A NodePort Service with its endpoints on `port`.
fn nodeport(name: &str, node_port: u16, port: u16, eps: &[Ipv4Addr]) -> String {
    nodeport_service(name, node_port, port, eps, "")
}

// ---- limits and idle timeout --------------------------------------------------

#[test]
fn connection_limits_refuse_new_connections_and_keep_established_ones() {
    let net = Loopback::take();
    let be = net.addr(1, free_port());
    let _echo = Backend::start(be, "e", Mode::Echo);
    let (pa, pb) = (free_port(), free_port());
    let m = format!(
        "{}---\n{}",
        nodeport("a", pa, be.port(), &[net.ip(1)]),
        nodeport("b", pb, be.port(), &[net.ip(1)])
    );
    let rv = Ringvip::start(
        &m,
        &[
            "--max-connections",
            "3",
            "--max-connections-per-frontend",
            "2",
        ],
    );
    let mut a1 = connect_when_ready(np(pa));
    assert!(echoes(&mut a1));
    let mut a2 = connect_from(None, np(pa)).unwrap();
    assert!(echoes(&mut a2));
    // Frontend a is full: new connections are reset at once, five in a row.
    let mut slowest = Duration::ZERO;
    for _ in 0..5 {
        let start = Instant::now();
        assert!(reset_or_closed(np(pa)), "{}", rv.log());
        slowest = slowest.max(start.elapsed());
    }
    let mut b1 = connect_when_ready(np(pb));
    assert!(echoes(&mut b1));
    // Three in all: the global limit refuses b's second.
    assert!(reset_or_closed(np(pb)), "{}", rv.log());
    // Established connections are untouched.
    assert!(echoes(&mut a1) && echoes(&mut a2) && echoes(&mut b1));
    let m = admin_get(rv.metrics, "/metrics");
    let fe = format!("address=\"127.0.0.1:{pa}\"");
    assert_eq!(
        metric(&m, "ringvip_frontend_connections_active", &[&fe]),
        Some(2.0),
        "{m}"
    );
    let (per_fe, global) = (
        limit_hits(&rv, "max_connections_per_frontend"),
        limit_hits(&rv, "max_connections"),
    );
    assert_eq!((per_fe, global), (5, 1));
    // One line per burst, not one per connection.
    let log = rv.log();
    assert_eq!(
        log.matches("per-frontend connection limit reached").count(),
        1
    );
    assert_eq!(
        log.matches("connection limit reached (--max-connections)")
            .count(),
        1,
        "{log}"
    );
    // A closed connection frees its slot.
    drop(a1);
    // The slot is freed when the relay sees the close, asynchronously: a
    // delay is part of this contract.
    assert!(
        wait_until(Duration::from_secs(3), || {
            connect_from(None, np(pa)).is_ok_and(|mut c| echoes(&mut c))
        }),
        "slot not released\n{}",
        rv.log()
    );
    println!(
        "FIGURE limits (NodePort, --max-connections 3 --max-connections-per-frontend 2): \
         5 + 1 over-limit connections reset, slowest refusal {slowest:?}; \
         3 established kept echoing; limit_hits per_frontend={per_fe} global={global}; \
         1 log line per limit"
    );
    assert!(slowest < Duration::from_secs(1));
}

/// A backend endpoint the test holds itself, to see both sides of a relay.
fn accept_within(l: &TcpListener, limit: Duration) -> TcpStream {
    l.set_nonblocking(true).unwrap();
    let end = Instant::now() + limit;
    loop {
        match l.accept() {
            Ok((s, _)) => {
                s.set_nonblocking(false).unwrap();
                return s;
            }
            Err(_) if Instant::now() < end => thread::sleep(Duration::from_millis(5)),
            Err(e) => panic!("backend never connected: {e}"),
        }
    }
}

/// Opens a client and its backend-side twin; `ping` travels between them.
fn pair(front: SocketAddr, l: &TcpListener) -> (TcpStream, TcpStream) {
    let mut c = connect_when_ready(front);
    c.write_all(b"ping").unwrap();
    let mut s = accept_within(l, Duration::from_secs(5));
    s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let mut b = [0u8; 4];
    s.read_exact(&mut b).unwrap();
    (c, s)
}

/// Idle for 1 s (timeout), the other kept busy: returns (idle closed after,
/// busy exchanges). Both sides of the idle one must be closed.
fn idle_and_busy(front: SocketAddr, l: &TcpListener) -> (Duration, u32) {
    let (mut idle_c, mut idle_s) = pair(front, l);
    let (mut busy_c, mut busy_s) = pair(front, l);
    let last_byte = Instant::now();
    let busy = thread::spawn(move || {
        let mut n = 0;
        let end = Instant::now() + Duration::from_millis(3000);
        while Instant::now() < end {
            busy_c.write_all(b"x").unwrap();
            let mut b = [0u8; 1];
            busy_s.read_exact(&mut b).expect("busy connection broke");
            busy_s.write_all(b"y").unwrap();
            busy_c
                .set_read_timeout(Some(Duration::from_secs(2)))
                .unwrap();
            busy_c.read_exact(&mut b).expect("busy connection broke");
            n += 1;
            thread::sleep(Duration::from_millis(300));
        }
        n
    });
    assert!(
        closed(&mut idle_c, Duration::from_secs(4)),
        "client side left open"
    );
    let after = last_byte.elapsed();
    assert!(
        closed(&mut idle_s, Duration::from_secs(1)),
        "backend side left open"
    );
    (after, busy.join().unwrap())
}

#[test]
fn idle_tcp_connections_are_closed_on_both_sides_busy_ones_stay() {
    let net = Loopback::take();
    let l = TcpListener::bind((net.ip(1), 0)).unwrap();
    let be = l.local_addr().unwrap();
    let p = free_port();
    let rv = Ringvip::start(
        &nodeport("idle", p, be.port(), &[net.ip(1)]),
        &["--tcp-idle-timeout-secs", "1"],
    );
    let (after, busy) = idle_and_busy(np(p), &l);
    let hits = limit_hits(&rv, "tcp_idle_timeout");
    println!(
        "FIGURE idle timeout (NodePort, --tcp-idle-timeout-secs 1): idle connection closed \
         both sides {after:?} after its last byte; busy one (a byte each way every 300 ms) \
         made {busy} exchanges over 3 s and stayed; tcp_idle_timeout hits={hits}"
    );
    assert!(after >= Duration::from_millis(900) && after < Duration::from_millis(2000));
    assert!(busy >= 8);
    assert_eq!(hits, 1);
}

// ---- ClusterIP (TUN) limits and idle timeout -----------------------------------

#[test]
fn clusterip_global_limit_drops_syns_and_idle_relays_close() {
    let Some(t) = Topology::setup(&[]) else {
        return;
    };
    let be = SocketAddr::from((t.pod_ip(2), 8080));
    let l = Topology::within(&t.pod, move || TcpListener::bind(be).unwrap());
    let m = clusterip("lim", "10.96.0.40", 80, "TCP", 8080, &[be.ip()], "");
    let rv = Ringvip::launch(
        Some(&t.node),
        &m,
        &["--max-connections", "2", "--tcp-idle-timeout-secs", "3"],
    );
    let vip: SocketAddr = "10.96.0.40:80".parse().unwrap();
    let (over, after, busy, later) = Topology::within(&t.node, move || {
        // Two connections fill the global limit; the third SYN gets no answer.
        let (mut idle_c, mut idle_s) = pair(vip, &l);
        let (mut busy_c, mut busy_s) = pair(vip, &l);
        let last_byte = Instant::now();
        let start = Instant::now();
        let over = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
            .unwrap()
            .connect_timeout(&vip.into(), Duration::from_millis(1500))
            .unwrap_err();
        let over = (over.kind(), start.elapsed());
        let mut busy = 0;
        while !closed(&mut idle_c, Duration::from_millis(300)) {
            busy_c.write_all(b"x").unwrap();
            let mut b = [0u8; 1];
            busy_s.read_exact(&mut b).expect("busy connection broke");
            busy += 1;
            assert!(
                last_byte.elapsed() < Duration::from_secs(5),
                "idle never closed"
            );
        }
        let after = last_byte.elapsed();
        assert!(
            closed(&mut idle_s, Duration::from_secs(1)),
            "backend side left open"
        );
        // The idle one's slot is free again.
        let later = connect_from(None, vip).is_ok();
        (over, after, busy, later)
    });
    println!(
        "FIGURE limits (ClusterIP, --max-connections 2 --tcp-idle-timeout-secs 3): \
         over-limit SYN unanswered, connect ended {:?} after {:?}; idle relay closed both \
         sides {after:?} after its last byte while the busy one made {busy} exchanges; \
         a new connection then succeeded: {later}",
        over.0, over.1
    );
    assert_eq!(over.0, ErrorKind::TimedOut, "{}", rv.log());
    assert!(after >= Duration::from_millis(2900) && after < Duration::from_millis(4500));
    assert!(later, "{}", rv.log());
    assert!(rv.log().contains("connection limit reached"));
}

// ---- backends stopped under load ---------------------------------------------

#[test]
fn nodeport_serves_every_request_while_one_of_three_backends_stops() {
    let net = Loopback::take();
    let Some((nginx, _)) = tools() else {
        return;
    };
    let (port, mut webs) = nginxes(&nginx, net, 3);
    let p = free_port();
    let eps = net.ips(1..=3);
    let rv = Ringvip::start(&nodeport("kill", p, port, &eps), &[]);
    // Published means listening: the first request is served.
    assert_eq!(
        http_get(np(p)).map(|_| ()).map_err(|e| e.to_string()),
        Ok(())
    );
    let wrk = Wrk::start(None, &format!("http://127.0.0.1:{p}/"), 4, 16, true);
    thread::sleep(Duration::from_millis(1500));
    webs[0].drain_and_quit();
    let r = wrk.finish();
    println!(
        "FIGURE backend stopped (NodePort, loopback): wrk -t2 -c16 -d4s -H 'Connection: close', \
         1 of 3 nginx drained at 1.5 s (listener drops SYNs, SIGQUIT 300 ms later): {} \
         requests ({:.0}/s), {} socket errors, {} non-2xx",
        r.requests, r.per_sec, r.socket_errors, r.non_2xx
    );
    assert_eq!(r.errors(), 0, "{}\n{}", r.text, rv.log());
}

#[test]
fn clusterip_serves_every_request_while_one_of_three_backends_stops() {
    let Some(t) = Topology::setup(&[3, 4]) else {
        return;
    };
    let Some((nginx, _)) = tools() else {
        return;
    };
    let mut webs: Vec<Web> = (2..=4u8)
        .map(|h| {
            let addr = SocketAddr::from((t.pod_ip(h), 8080));
            let bin = nginx.clone();
            Topology::within(&t.pod, move || Web::start(&bin, addr, &h.to_string()))
        })
        .collect();
    let eps: Vec<IpAddr> = (2..=4).map(|h| IpAddr::V4(t.pod_ip(h))).collect();
    let rv = Ringvip::launch(
        Some(&t.node),
        &clusterip("web", "10.96.0.41", 80, "TCP", 8080, &eps, ""),
        &[],
    );
    let vip: SocketAddr = "10.96.0.41:80".parse().unwrap();
    // Published means serving: the first request through the VIP is.
    let first = Topology::within(&t.node, move || http_get(vip).map_err(|e| e.to_string()));
    assert!(first.is_ok(), "{first:?}\n{}", rv.log());
    let wrk = Wrk::start(Some(&t.node), "http://10.96.0.41/", 4, 16, true);
    thread::sleep(Duration::from_millis(1500));
    webs[0].drain_and_quit();
    let r = wrk.finish();
    println!(
        "FIGURE backend stopped (ClusterIP, TUN in a namespace): wrk -t2 -c16 -d4s \
         -H 'Connection: close', 1 of 3 nginx drained at 1.5 s (listener drops SYNs, SIGQUIT \
         300 ms later): {} requests ({:.0}/s), {} socket errors, {} non-2xx",
        r.requests, r.per_sec, r.socket_errors, r.non_2xx
    );
    assert_eq!(r.errors(), 0, "{}\n{}", r.text, rv.log());
}

// ---- reloads and churn under load --------------------------------------------

/// Persistent echo connections exchanging a message every 20 ms until `stop`;
/// returns (exchanges, broken connections).
fn echo_clients(
    front: SocketAddr,
    n: usize,
    stop: Arc<AtomicBool>,
) -> thread::JoinHandle<(u64, u64)> {
    thread::spawn(move || {
        let mut conns: Vec<TcpStream> = (0..n).map(|_| connect_when_ready(front)).collect();
        let (mut ok, mut broken) = (0u64, 0u64);
        let mut alive = vec![true; n];
        while !stop.load(Ordering::SeqCst) {
            for (c, a) in conns.iter_mut().zip(alive.iter_mut()) {
                if *a {
                    if echoes(c) {
                        ok += 1;
                    } else {
                        *a = false;
                        broken += 1;
                    }
                }
            }
            thread::sleep(Duration::from_millis(20));
        }
        (ok, broken)
    })
}

#[test]
fn hundred_reloads_under_load_break_no_connection() {
    let net = Loopback::take();
    let Some((nginx, _)) = tools() else {
        return;
    };
    let (port, _webs) = nginxes(&nginx, net, 3);
    let echo_be = net.addr(9, free_port());
    let _echo = Backend::start(echo_be, "e", Mode::Echo);
    let (p, pe, pad) = (free_port(), free_port(), free_port());
    let eps = net.ips(1..=3);
    let base = format!(
        "{}---\n{}",
        nodeport("web", p, port, &eps),
        nodeport("echo", pe, echo_be.port(), &[net.ip(9)])
    );
    // The other version adds a Service: each reload compiles a different snapshot.
    let other = format!("{base}---\n{}", nodeport("pad", pad, port, &eps[..1]));
    let rv = Ringvip::start(&base, &[]);
    // Published means listening: the first request is served.
    assert_eq!(
        http_get(np(p)).map(|_| ()).map_err(|e| e.to_string()),
        Ok(())
    );
    let before = rv.generations();
    let stop = Arc::new(AtomicBool::new(false));
    let echo = echo_clients(np(pe), 8, stop.clone());
    // Load until the reloads are done (at most 40 s).
    let wrk = Wrk::start(None, &format!("http://127.0.0.1:{p}/"), 40, 4, false);
    thread::sleep(Duration::from_millis(500));
    let started = Instant::now();
    // File events are debounced (100 ms of quiet): each rewrite waits until its
    // snapshot is out; a SIGHUP re-reads at once (same objects: no new snapshot).
    for i in 0..100 {
        if i % 2 == 0 {
            rv.apply(if i % 4 == 0 { &other } else { &base });
        } else {
            let h = rv.log().matches("SIGHUP: reloading").count();
            rv.signal(libc::SIGHUP);
            assert!(wait_until(Duration::from_secs(3), || rv
                .log()
                .matches("SIGHUP: reloading")
                .count()
                > h));
            thread::sleep(Duration::from_millis(20));
        }
    }
    let took = started.elapsed();
    thread::sleep(Duration::from_millis(300));
    let r = wrk.interrupt();
    stop.store(true, Ordering::SeqCst);
    let (exchanges, broken) = echo.join().unwrap();
    let published = rv.generations() - before;
    println!(
        "FIGURE reloads: 100 reloads in {took:.1?} (50 manifest rewrites alternating two \
         versions, {published} snapshots published, + 50 SIGHUP re-reads) during wrk -t2 -c4 \
         keep-alive through a NodePort (from 0.5 s before to 0.3 s after): {} requests ({:.0}/s), {} socket errors, {} \
         non-2xx; 8 persistent echo connections: {exchanges} exchanges, {broken} broken",
        r.requests, r.per_sec, r.socket_errors, r.non_2xx
    );
    assert!(took < Duration::from_secs(39), "reloads outlasted the load");
    assert_eq!(r.errors(), 0, "{}\n{}", r.text, rv.log());
    assert_eq!(broken, 0);
    assert!(exchanges > 100);
    assert_eq!(published, 50);
}

#[test]
fn endpoint_churn_every_100ms_under_load_fails_no_request() {
    let net = Loopback::take();
    let Some((nginx, _)) = tools() else {
        return;
    };
    let port = free_port();
    let _webs: Vec<Web> = (1..=2)
        .map(|i| Web::start(&nginx, net.addr(i, port), &i.to_string()))
        .collect();
    // The churning endpoint is a live backend that counts what it accepts.
    let churner = Backend::start(net.addr(3, port), "c", Mode::Http);
    let p = free_port();
    let stable = [net.ip(1), net.ip(2)];
    let with = nodeport("churn", p, port, &[net.ip(1), net.ip(2), net.ip(3)]);
    let without = nodeport("churn", p, port, &stable);
    let rv = Ringvip::start(&without, &[]);
    // Published means listening: the first request is served.
    assert_eq!(
        http_get(np(p)).map(|_| ()).map_err(|e| e.to_string()),
        Ok(())
    );
    let before = rv.generations();
    let wrk = Wrk::start(None, &format!("http://127.0.0.1:{p}/"), 5, 16, true);
    thread::sleep(Duration::from_millis(300));
    // One change every 100 ms at most; file events are debounced (100 ms of
    // quiet), so each change waits until its snapshot is out before the next.
    let mut changes = 0u32;
    let started = Instant::now();
    let end = started + Duration::from_secs(4);
    while Instant::now() < end {
        let t = Instant::now();
        rv.apply(if changes.is_multiple_of(2) {
            &with
        } else {
            &without
        });
        changes += 1;
        thread::sleep(Duration::from_millis(100).saturating_sub(t.elapsed()));
    }
    let period = started.elapsed() / changes;
    let r = wrk.finish();
    let published = rv.generations() - before;
    let churned = churner.accepted.load(Ordering::SeqCst);
    println!(
        "FIGURE endpoint churn: 1 of 3 endpoints added/removed {changes} times, one change \
         every {period:.0?} on average ({published} snapshots published), during wrk -t2 \
         -c16 -d5s -H 'Connection: close' through a NodePort: {} requests ({:.0}/s), {} \
         socket errors, {} non-2xx; {churned} connections reached the churning endpoint",
        r.requests, r.per_sec, r.socket_errors, r.non_2xx
    );
    assert_eq!(r.errors(), 0, "{}\n{}", r.text, rv.log());
    assert!(published >= changes as usize && changes >= 10);
    assert!(churned > 0);
}

#[test]
fn thousand_service_changes_under_load_leave_exactly_the_wanted_listeners() {
    let net = Loopback::take();
    use rand::{Rng, SeedableRng};
    const TCP: usize = 6;
    const UDP: usize = 2;
    const WORKERS: usize = 2; // Ringvip::spawn's --workers
    let eps = net.ips(1..=3);
    let tcp_target = free_port();
    let udp_target = free_port();
    let _tcp: Vec<Backend> = eps
        .iter()
        .map(|a| Backend::start(SocketAddr::from((*a, tcp_target)), "e", Mode::Echo))
        .collect();
    let _udp: Vec<UdpBackend> = eps
        .iter()
        .map(|a| UdpBackend::start(SocketAddr::from((*a, udp_target)), "u"))
        .collect();
    let mut ports: Vec<u16> = Vec::new();
    while ports.len() < TCP + UDP {
        let p = free_port();
        if !ports.contains(&p) {
            ports.push(p);
        }
    }
    // Service i: present, and which of the three endpoints are ready.
    let mut model: Vec<(bool, [bool; 3])> = vec![(true, [true; 3]); TCP + UDP];
    let manifest = |model: &[(bool, [bool; 3])]| -> String {
        model
            .iter()
            .enumerate()
            .filter(|(_, (present, _))| *present)
            .map(|(i, (_, ready))| {
                let (proto, target) = if i < TCP {
                    ("TCP", tcp_target)
                } else {
                    ("UDP", udp_target)
                };
                let e: Vec<(Ipv4Addr, bool, &str)> = eps
                    .iter()
                    .zip(ready)
                    .map(|(a, r)| (*a, *r, "node-a"))
                    .collect();
                service_with(&format!("s{i}"), proto, ports[i], target, &e, "")
            })
            .collect::<Vec<_>>()
            .join("---\n")
    };
    let rv = Ringvip::start(&manifest(&model), &[]);
    for p in &ports[..TCP] {
        assert_eq!(echo(np(*p)), Answer::Echoed, "first connection to {p}");
    }

    // Client load over every TCP port, and datagrams over the UDP ones. A
    // connect waits through the kernel's first SYN retransmission (sent after
    // 1 s, the next after 3 s): a listener's close can drop the SYN that
    // raced it without a reset (see `benches/listener_close_race.py`, which
    // shows the same with plain kernel sockets), and the retransmission then
    // finds the port's new state. A SYN still unanswered at 3.5 s is ours.
    const CONNECT_LIMIT: Duration = Duration::from_millis(3500);
    let stop = Arc::new(AtomicBool::new(false));
    let tcp_clients: Vec<thread::JoinHandle<Vec<(Answer, Duration)>>> = (0..3u64)
        .map(|t| {
            let (stop, ports) = (stop.clone(), ports[..TCP].to_vec());
            thread::spawn(move || {
                let mut rng = rand::rngs::SmallRng::seed_from_u64(t);
                let mut seen = Vec::new();
                while !stop.load(Ordering::SeqCst) && seen.len() < 100_000 {
                    let port = ports[rng.random_range(0..ports.len())];
                    seen.push(echo_within(np(port), CONNECT_LIMIT));
                }
                seen
            })
        })
        .collect();
    let udp_client = {
        let (stop, ports) = (stop.clone(), ports[TCP..].to_vec());
        thread::spawn(move || {
            let (mut answered, mut other) = (0u64, 0u64);
            let mut buf = [0u8; 64];
            let mut i = 0usize;
            while !stop.load(Ordering::SeqCst) && i < 100_000 {
                let c = UdpSocket::bind("127.0.0.1:0").unwrap();
                c.set_read_timeout(Some(Duration::from_millis(300)))
                    .unwrap();
                c.connect(np(ports[i % ports.len()])).unwrap();
                let _ = c.send(b"q");
                match c.recv(&mut buf) {
                    Ok(_) => answered += 1,
                    Err(_) => other += 1,
                }
                i += 1;
            }
            (answered, other)
        })
    };

    // 1,000 random changes, ten per manifest rewrite; each rewrite is checked
    // once its snapshot is out: within 100 ms every port holds exactly the
    // listening sockets it should.
    let mut rng = rand::rngs::SmallRng::seed_from_u64(11);
    let (mut adds, mut deletes, mut flaps) = (0u32, 0u32, 0u32);
    let filter = format!(
        "( {} )",
        ports
            .iter()
            .map(|p| format!("sport = :{p}"))
            .collect::<Vec<_>>()
            .join(" or ")
    );
    let wanted = |model: &[(bool, [bool; 3])]| -> Vec<(u16, &'static str, usize)> {
        model
            .iter()
            .enumerate()
            .map(|(i, (present, ready))| {
                let n = if *present && ready.iter().any(|r| *r) {
                    WORKERS
                } else {
                    0
                };
                (ports[i], if i < TCP { "LISTEN" } else { "UNCONN" }, n)
            })
            .collect()
    };
    let have = |socks: &[Sock]| -> Vec<(u16, &'static str, usize)> {
        ports
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let state = if i < TCP { "LISTEN" } else { "UNCONN" };
                let n = socks
                    .iter()
                    .filter(|s| s.state == state && s.local.ends_with(&format!(":{p}")))
                    .count();
                (*p, state, n)
            })
            .collect()
    };
    let mut lags: Vec<Duration> = Vec::new();
    let started = Instant::now();
    for round in 0..100 {
        for _ in 0..10 {
            let i = rng.random_range(0..model.len());
            let s = &mut model[i];
            match (s.0, rng.random_range(0..3)) {
                (false, _) => {
                    *s = (true, [rng.random(), rng.random(), rng.random()]);
                    adds += 1;
                }
                (true, 0) => {
                    s.0 = false;
                    deletes += 1;
                }
                (true, _) => {
                    let e = rng.random_range(0..3);
                    s.1[e] = !s.1[e];
                    flaps += 1;
                }
            }
        }
        rv.apply(&manifest(&model));
        let want = wanted(&model);
        // Sampled with `ss -l`, which the load's TIME-WAIT sockets do not
        // slow down; three client threads load the same 2 cores as ringvip's
        // workers, so a worker may be scheduled late: the figure reports the
        // lag, the assertion bounds it at 1 s and wants the exact set.
        let t = Instant::now();
        let mut sampled = t;
        let mut socks = listening(&filter);
        while have(&socks) != want && t.elapsed() < Duration::from_secs(1) {
            thread::sleep(Duration::from_millis(2));
            sampled = Instant::now();
            socks = listening(&filter);
        }
        lags.push(sampled - t);
        // The counts come first: a long log must not hide them.
        assert!(
            have(&socks) == want,
            "round {round}: after {:?} the sockets are\n{:?}\nnot the snapshot's \
             listeners\n{want:?}\n{socks:#?}\n{}",
            t.elapsed(),
            have(&socks),
            rv.log()
        );
        // (A CLOSE-WAIT here may be a relay that is closing under the load:
        // what may not be is one that stays, checked once the load stops.)
    }
    let took = started.elapsed();
    stop.store(true, Ordering::SeqCst);
    let timed: Vec<(Answer, Duration)> = tcp_clients
        .into_iter()
        .flat_map(|h| h.join().unwrap())
        .collect();
    let (answered, unanswered) = udp_client.join().unwrap();
    let seen: Vec<Answer> = timed.iter().map(|(a, _)| a.clone()).collect();
    let n = |k: Answer| seen.iter().filter(|s| **s == k).count();
    // Answered only after the kernel sent the SYN again.
    let resent = timed
        .iter()
        .filter(|(a, took)| *a != Answer::Dropped && *took >= Duration::from_secs(1))
        .count();
    lags.sort();
    let within_100ms = lags
        .iter()
        .filter(|l| **l <= Duration::from_millis(100))
        .count();
    println!(
        "FIGURE listener churn: {adds} adds, {deletes} deletes, {flaps} endpoint flaps over \
         {TCP} TCP and {UDP} UDP NodePort Services in 100 rewrites, {took:.1?}; 3 TCP clients: \
         {} served, {} refused or reset, {resent} answered after a SYN retransmission, {} SYNs \
         unanswered for {CONNECT_LIMIT:?}, {} hung; UDP: {answered} answered, \
         {unanswered} refused or lost; sockets matched the snapshot within 100 ms after \
         {within_100ms} of 100 rewrites (median {:?}, max {:?})",
        n(Answer::Echoed),
        n(Answer::Refused) + n(Answer::Reset),
        n(Answer::Dropped),
        n(Answer::Hung),
        lags[50],
        lags[99]
    );
    assert_eq!(adds + deletes + flaps, 1000);
    assert_eq!(n(Answer::Hung), 0, "connections accepted and never relayed");
    assert_eq!(n(Answer::Dropped), 0, "SYNs unanswered");
    // The kernel's race costs a SYN now and then, not one in a hundred.
    assert!(
        resent * 100 <= seen.len(),
        "{resent} of {} SYNs resent",
        seen.len()
    );
    assert!(n(Answer::Echoed) > 100 && n(Answer::Refused) + n(Answer::Reset) > 0);
    let (ok, socks) = sockets_within(Duration::from_secs(2), ports[0], |_| {
        count(&sockets(&filter), "CLOSE-WAIT") == 0
    });
    assert!(ok, "{socks:#?}");
}

// ---- floods ------------------------------------------------------------------

fn checksum(data: &[u8], mut sum: u32) -> u16 {
    for c in data.chunks(2) {
        sum += u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]));
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// An IPv4 packet from `src` to `dst` carrying a TCP SYN or a UDP datagram.
fn packet(src: SocketAddrV4, dst: SocketAddrV4, udp: bool, seq: u32) -> Vec<u8> {
    let l4: Vec<u8> = if udp {
        let mut u = Vec::with_capacity(12);
        u.extend_from_slice(&src.port().to_be_bytes());
        u.extend_from_slice(&dst.port().to_be_bytes());
        u.extend_from_slice(&12u16.to_be_bytes());
        u.extend_from_slice(&[0, 0]); // no checksum (allowed over IPv4)
        u.extend_from_slice(b"food");
        u
    } else {
        let mut t = vec![0u8; 20];
        t[0..2].copy_from_slice(&src.port().to_be_bytes());
        t[2..4].copy_from_slice(&dst.port().to_be_bytes());
        t[4..8].copy_from_slice(&seq.to_be_bytes());
        t[12] = 5 << 4;
        t[13] = 0x02; // SYN
        t[14..16].copy_from_slice(&64240u16.to_be_bytes());
        let mut pseudo = Vec::new();
        pseudo.extend_from_slice(&src.ip().octets());
        pseudo.extend_from_slice(&dst.ip().octets());
        pseudo.extend_from_slice(&[0, 6, 0, 20]);
        pseudo.extend_from_slice(&t);
        let c = checksum(&pseudo, 0);
        t[16..18].copy_from_slice(&c.to_be_bytes());
        t
    };
    let mut ip = vec![0u8; 20];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&((20 + l4.len()) as u16).to_be_bytes());
    ip[8] = 64;
    ip[9] = if udp { 17 } else { 6 };
    ip[12..16].copy_from_slice(&src.ip().octets());
    ip[16..20].copy_from_slice(&dst.ip().octets());
    let c = checksum(&ip, 0);
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    ip.extend_from_slice(&l4);
    ip
}

use std::net::SocketAddrV4;

/// Sends `n` packets from `n` different spoofed sources (10.77.0.0/16, routed
/// nowhere in the namespace) to `dst`, in bursts of `burst` every 50 ms.
fn flood(dst: SocketAddrV4, n: u32, udp: bool, burst: u32) -> Duration {
    let s = socket2::Socket::new(
        socket2::Domain::IPV4,
        socket2::Type::RAW,
        Some(socket2::Protocol::from(libc::IPPROTO_RAW)),
    )
    .expect("raw socket (root)");
    let to = socket2::SockAddr::from(SocketAddr::V4(dst));
    let start = Instant::now();
    for i in 0..n {
        let src = SocketAddrV4::new(
            Ipv4Addr::new(10, 77, (i / 250) as u8, (i % 250 + 1) as u8),
            10_000 + (i % 50_000) as u16,
        );
        let p = packet(src, dst, udp, i.wrapping_mul(2_654_435_761));
        s.send_to(&p, &to).expect("send flood packet");
        if i % burst == burst - 1 {
            thread::sleep(Duration::from_millis(50));
        }
    }
    start.elapsed()
}

#[test]
fn syn_and_udp_floods_leave_clients_served_and_memory_bounded() {
    let Some(t) = Topology::setup(&[3]) else {
        return;
    };
    let Some((nginx, _)) = tools() else {
        return;
    };
    // RINGVIP_FAULT_SYNS / RINGVIP_FAULT_SYN_BURST raise the SYN flood to
    // look for where legitimate clients start to fail (RELIABILITY.md).
    let knob = |name: &str, default: u32| -> u32 {
        std::env::var(name)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    };
    let syns = knob("RINGVIP_FAULT_SYNS", 1000);
    let syn_burst = knob("RINGVIP_FAULT_SYN_BURST", 50);
    const DATAGRAMS: u32 = 3000;
    const UDP_BURST: u32 = 150;
    // The UDP flood overruns the flow cap: new flows are dropped, the
    // legitimate client's flow (opened before) carries on.
    const UDP_CAP: u32 = 2000;
    const RSS_BOUND_MIB: u64 = 160;
    let _webs: Vec<Web> = (2..=3u8)
        .map(|h| {
            let addr = SocketAddr::from((t.pod_ip(h), 8080));
            let bin = nginx.clone();
            Topology::within(&t.pod, move || Web::start(&bin, addr, &h.to_string()))
        })
        .collect();
    let ua = SocketAddr::from((t.pod_ip(2), 5353));
    let _udp = Topology::within(&t.pod, move || UdpBackend::start(ua, "u"));
    let eps: Vec<IpAddr> = (2..=3).map(|h| IpAddr::V4(t.pod_ip(h))).collect();
    let m = format!(
        "{}---\n{}",
        clusterip("web", "10.96.0.42", 80, "TCP", 8080, &eps, ""),
        clusterip("dns", "10.96.0.43", 53, "UDP", 5353, &[ua.ip()], "")
    );
    let cap = UDP_CAP.to_string();
    // One TUN queue: the flow cap is split across queues, each warning once.
    let rv = Ringvip::launch(
        Some(&t.node),
        &m,
        &["--tun-max-udp-flows", &cap, "--tun-queues", "1"],
    );
    let vip: SocketAddr = "10.96.0.42:80".parse().unwrap();
    let uvip: SocketAddr = "10.96.0.43:53".parse().unwrap();
    // Published means serving: the first request through the VIP is.
    let first = Topology::within(&t.node, move || http_get(vip).map_err(|e| e.to_string()));
    assert!(first.is_ok(), "{first:?}\n{}", rv.log());
    let rss_start = rss_kib(rv.pid());

    // Legitimate clients through both floods: new HTTP connections, and one
    // UDP flow asking every 20 ms.
    let stop = Arc::new(AtomicBool::new(false));
    let (http_ok, http_failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let (udp_ok, udp_lost) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let legit = {
        let (stop, ok, failed, uok, ulost) = (
            stop.clone(),
            http_ok.clone(),
            http_failed.clone(),
            udp_ok.clone(),
            udp_lost.clone(),
        );
        let ns = t.node.to_string();
        thread::spawn(move || {
            Topology::within(&ns, move || {
                let u = UdpSocket::bind("0.0.0.0:0").unwrap();
                u.connect(uvip).unwrap();
                u.set_read_timeout(Some(Duration::from_millis(500)))
                    .unwrap();
                while !stop.load(Ordering::SeqCst) {
                    match http_get(vip) {
                        Ok(_) => ok.fetch_add(1, Ordering::SeqCst),
                        Err(_) => failed.fetch_add(1, Ordering::SeqCst),
                    };
                    let _ = u.send(b"hello");
                    let mut b = [0u8; 64];
                    match u.recv(&mut b) {
                        Ok(_) => uok.fetch_add(1, Ordering::SeqCst),
                        Err(_) => ulost.fetch_add(1, Ordering::SeqCst),
                    };
                    thread::sleep(Duration::from_millis(20));
                }
            })
        })
    };
    let dst = |a: SocketAddr| match a {
        SocketAddr::V4(v) => v,
        SocketAddr::V6(_) => unreachable!(),
    };
    let (tv, uv) = (dst(vip), dst(uvip));
    let syn_time = Topology::within(&t.node, move || flood(tv, syns, false, syn_burst));
    thread::sleep(Duration::from_millis(500));
    let rss_syn = rss_kib(rv.pid());
    let udp_time = Topology::within(&t.node, move || flood(uv, DATAGRAMS, true, UDP_BURST));
    thread::sleep(Duration::from_millis(500));
    let rss_udp = rss_kib(rv.pid());
    stop.store(true, Ordering::SeqCst);
    legit.join().unwrap();
    let maddr = rv.metrics;
    let m = Topology::within(&t.node, move || admin_get(maddr, "/metrics"));
    let conns = metric(&m, "ringvip_connections_total", &["service=\"web\""]).unwrap_or(0.0);
    let flows = metric(&m, "ringvip_udp_flows_active", &["service=\"dns\""]).unwrap_or(0.0);
    let (ok, failed) = (
        http_ok.load(Ordering::SeqCst),
        http_failed.load(Ordering::SeqCst),
    );
    let (uok, ulost) = (
        udp_ok.load(Ordering::SeqCst),
        udp_lost.load(Ordering::SeqCst),
    );
    println!(
        "FIGURE floods (ClusterIP, TUN in a namespace): {syns} spoofed SYNs from {syns} \
         sources in {syn_time:?}, then {DATAGRAMS} UDP datagrams from {DATAGRAMS} sources in \
         {udp_time:?}; ringvip relayed {conns} TCP connections and held {flows} UDP flows (cap {UDP_CAP}); \
         legitimate clients meanwhile: {ok} HTTP requests ok, {failed} failed, {uok} UDP \
         answers, {ulost} lost or later than 1 s; RSS {} MiB at start, {} MiB after the SYN flood, {} MiB \
         after the UDP flood (bound {RSS_BOUND_MIB} MiB)",
        rss_start / 1024,
        rss_syn / 1024,
        rss_udp / 1024
    );
    assert_eq!(failed, 0, "{}", rv.log());
    // An answer later than 1 s counts as lost (UDP under load, debug build);
    // the flow must keep being answered.
    assert!(ulost * 5 <= uok, "legitimate UDP flow starved");
    assert!(ok > 10 && uok > 10);
    assert!(
        conns >= f64::from(syns),
        "the SYN flood did not reach ringvip"
    );
    assert_eq!(
        flows,
        f64::from(UDP_CAP),
        "the UDP flood did not fill the cap"
    );
    assert_eq!(
        rv.log().matches("TUN UDP flow limit reached").count(),
        1,
        "{}",
        rv.log()
            .lines()
            .filter(|l| !l.contains("INFO"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert!(rss_syn.max(rss_udp) < RSS_BOUND_MIB * 1024);
    // The allocator's arenas are never backed by huge pages, whatever the
    // host's THP mode (they multiplied this test's RSS by 60).
    let status = std::fs::read_to_string(format!("/proc/{}/status", rv.pid())).unwrap();
    assert!(
        status
            .lines()
            .any(|l| l.split_whitespace().eq(["THP_enabled:", "0"])),
        "{status}"
    );
}

#[test]
fn syn_flood_on_a_nodeport_meets_the_kernel_not_ringvip() {
    let Some(t) = Topology::setup(&[]) else {
        return;
    };
    const SYNS: u32 = 20_000;
    let node_ip = t.node_ip();
    // Replies to the spoofed sources leave towards the pod side, which drops
    // them (no such address there, no forwarding): the route also satisfies
    // reverse-path filtering in the node namespace.
    let out = t.on_node(
        "ip",
        &[
            "route",
            "add",
            "10.77.0.0/16",
            "via",
            &t.pod_ip(2).to_string(),
        ],
    );
    assert!(out.status.success(), "{out:?}");
    let be = SocketAddr::from((t.pod_ip(2), 8080));
    let _b = Topology::within(&t.pod, move || Backend::start(be, "b", Mode::Http));
    let np_port = 30080;
    let m = nodeport("flood", np_port, 8080, &[t.pod_ip(2)]);
    let cidr = format!("{node_ip}/32");
    let rv = Ringvip::launch(Some(&t.node), &m, &["--nodeport-addresses", &cidr]);
    let front = SocketAddr::from((node_ip, np_port));
    // Published means listening: the first request is served.
    let first = Topology::within(&t.pod, move || http_get(front).map_err(|e| e.to_string()));
    assert!(first.is_ok(), "{first:?}\n{}", rv.log());
    let rss_start = rss_kib(rv.pid());
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let legit = {
        let (stop, ok, failed) = (stop.clone(), ok.clone(), failed.clone());
        let ns = t.pod.to_string();
        thread::spawn(move || {
            Topology::within(&ns, move || {
                while !stop.load(Ordering::SeqCst) {
                    match http_get(front) {
                        Ok(_) => ok.fetch_add(1, Ordering::SeqCst),
                        Err(_) => failed.fetch_add(1, Ordering::SeqCst),
                    };
                    thread::sleep(Duration::from_millis(20));
                }
            })
        })
    };
    let dst = SocketAddrV4::new(node_ip, np_port);
    let took = Topology::within(&t.pod, move || flood(dst, SYNS, false, 1000));
    thread::sleep(Duration::from_millis(300));
    let rss_end = rss_kib(rv.pid());
    stop.store(true, Ordering::SeqCst);
    legit.join().unwrap();
    let (ok, failed) = (ok.load(Ordering::SeqCst), failed.load(Ordering::SeqCst));
    let cookies = syncookies_sent(&t);
    println!(
        "FIGURE SYN flood (NodePort in a namespace): {SYNS} spoofed SYNs from {SYNS} sources \
         in {took:?}; legitimate clients meanwhile: {ok} HTTP requests ok, {failed} failed; \
         ringvip RSS {} KiB before, {} KiB after; the node's kernel sent {cookies} SYN \
         cookies (ringvip only sees completed handshakes)",
        rss_start, rss_end
    );
    assert_eq!(failed, 0, "{}", rv.log());
    assert!(ok > 5);
    assert!(rss_end < rss_start + 8 * 1024);
    assert!(cookies > 0, "the flood did not reach the listener");
}

/// `TcpExt: SyncookiesSent` of the node namespace.
fn syncookies_sent(t: &Topology) -> u64 {
    let out = t.on_node("cat", &["/proc/net/netstat"]);
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let rows: Vec<&str> = text.lines().filter(|l| l.starts_with("TcpExt:")).collect();
    let (names, values) = (rows[0].split_whitespace(), rows[1].split_whitespace());
    names
        .zip(values)
        .find(|(n, _)| *n == "SyncookiesSent")
        .and_then(|(_, v)| v.parse().ok())
        .expect("SyncookiesSent")
}
