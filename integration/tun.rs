//! ClusterIP capture end to end: ringvip runs in a network namespace the test
//! creates, with its TUN device routing the service CIDRs; backends live in a
//! second namespace across a veth pair. Needs root (CI runs as root).

mod support;

use std::collections::HashSet;
use std::io::{ErrorKind, Read, Write};
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use support::netns::{ip, Topology};
use support::*;

fn sa(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

struct Env {
    // Field order is drop order: ringvip, then backends, then the namespaces.
    rv: Ringvip,
    _backends: Vec<Backend>,
    t: Topology,
}

impl Env {
    /// `requests` curl requests through the VIP all succeed and reach all
    /// three backends.
    fn assert_balances(&self, requests: usize) {
        let mut seen = HashSet::new();
        for i in 0..requests {
            let (ok, body) = self.t.curl("http://10.96.0.10/");
            assert!(ok, "request {i} failed\n{}", self.rv.log());
            seen.insert(body);
        }
        assert_eq!(seen.len(), 3, "{seen:?}");
    }
}

/// Three HTTP backends on pod hosts .2 .3 .4 port 8080, Service `web` at
/// 10.96.0.10:80; `None` where namespace tests cannot run.
fn web(extra_spec: &str) -> Option<Env> {
    web_with(extra_spec, &[])
}

/// [`web`] with extra ringvip arguments.
fn web_with(extra_spec: &str, args: &[&str]) -> Option<Env> {
    let t = Topology::setup(&[3, 4])?;
    let backends: Vec<Backend> = (2..=4u8)
        .map(|h| t.backend((t.pod_ip(h), 8080).into(), &h.to_string(), Mode::Http))
        .collect();
    let eps: Vec<IpAddr> = (2..=4).map(|h| IpAddr::V4(t.pod_ip(h))).collect();
    let m = clusterip("web", "10.96.0.10", 80, "TCP", 8080, &eps, extra_spec);
    let rv = t.launch(&m, args);
    // Published means serving: the first request through the VIP is.
    let (ok, body) = t.curl("http://10.96.0.10/");
    assert!(
        ok,
        "first request through the ClusterIP: {body}\n{}",
        rv.log()
    );
    Some(Env {
        rv,
        _backends: backends,
        t,
    })
}

#[test]
fn clusterip_balances_with_curl_and_refuses_unknown_ports() {
    let Some(env) = web("") else {
        return;
    };
    env.assert_balances(30);
    // A port the Service does not define: refused (RST) at once.
    let start = Instant::now();
    let (ok, _) = env.t.curl("http://10.96.0.10:81/");
    assert!(!ok);
    assert!(
        start.elapsed() < Duration::from_secs(2),
        "refusal took {:?}",
        start.elapsed()
    );
    let e = Topology::within(&env.t.node, || {
        connect_from(None, sa("10.96.0.10:81")).unwrap_err()
    });
    assert_eq!(e.kind(), ErrorKind::ConnectionRefused);
}

/// Every queue of a multi-queue TUN is served: the kernel spreads flows over
/// the queues by hash, so 40 connections from different ports all succeed only
/// if each queue's thread answers its share.
#[test]
fn multi_queue_tun_serves_flows_on_every_queue() {
    let Some(env) = web_with("", &["--tun-queues", "3"]) else {
        return;
    };
    let out = env.t.on_node("ls", &["/sys/class/net/ringvip0/queues"]);
    let listing = String::from_utf8_lossy(&out.stdout);
    let rx = listing
        .split_whitespace()
        .filter(|q| q.starts_with("rx-"))
        .count();
    assert_eq!(rx, 3, "queues: {listing}\n{}", env.rv.log());
    env.assert_balances(40);
}

/// On a single process whose queues stay put, the thread that reads a SYN
/// owns the connection and the kernel keeps the rest of it on that queue:
/// no packet of 40 connections over 4 queues is passed between threads
/// (with flows owned by a hash of their key, about three in four SYNs were).
#[test]
fn a_single_process_passes_no_packet_between_its_tun_threads() {
    let Some(mut env) = web_with("", &["--tun-queues", "4"]) else {
        return;
    };
    env.assert_balances(40);
    assert_no_packet_passed_between_threads(&mut env.rv);
}

/// Stops `rv` and checks the count it logs at stop: no packet went from
/// one of its TUN threads to another.
fn assert_no_packet_passed_between_threads(rv: &mut Ringvip) {
    rv.sigterm();
    assert!(rv.wait_exit(Duration::from_secs(10)), "{}", rv.log());
    let log = rv.log();
    let line = log
        .lines()
        .find(|l| l.contains("stopped: TUN packets passed"))
        .unwrap_or_else(|| panic!("no count logged\n{log}"));
    let passed = line.split("packets_between_threads=").nth(1).map(str::trim);
    assert_eq!(passed, Some("0"), "{line}");
}

/// New UDP flows on a single process are opened by the thread that read
/// their first datagram: no hop between threads either.
#[test]
fn a_single_process_opens_new_udp_flows_where_they_arrive() {
    let Some(t) = Topology::setup(&[]) else {
        return;
    };
    let _u = t.udp_backend((t.pod_ip(2), 5353).into(), "u");
    let mut rv = t.launch(
        &t.pod_service("dns", "10.96.0.30", 53, "UDP", 5353),
        &["--tun-queues", "4"],
    );
    // 40 new flows (a new client port each), each answered at once.
    let answered = Topology::within(&t.node, || {
        (0..40)
            .filter(|_| {
                let c = UdpSocket::bind("0.0.0.0:0").unwrap();
                c.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
                let mut buf = [0u8; 64];
                c.send_to(b"q", "10.96.0.30:53").unwrap();
                c.recv(&mut buf).ok() == Some(3)
            })
            .count()
    });
    assert_eq!(answered, 40, "{}", rv.log());
    assert_no_packet_passed_between_threads(&mut rv);
}

#[test]
fn clusterip_affinity_sticks() {
    let Some(env) = web("  sessionAffinity: ClientIP\n") else {
        return;
    };
    let first = env.t.curl("http://10.96.0.10/").1;
    for _ in 0..15 {
        assert_eq!(env.t.curl("http://10.96.0.10/").1, first);
    }
}

#[test]
fn killed_backend_is_invisible_to_clients() {
    let Some(mut env) = web("") else {
        return;
    };
    env._backends[0].kill();
    // The SYN is answered only once a backend accepted, so no request fails.
    for i in 0..20 {
        let (ok, body) = env.t.curl("http://10.96.0.10/");
        assert!(ok, "request {i} failed\n{}", env.rv.log());
        assert_ne!(body, "backend-2");
    }
}

#[test]
fn no_endpoints_is_refused_and_udp_gets_port_unreachable() {
    let Some(t) = Topology::setup(&[]) else {
        return;
    };
    let m = format!(
        "{}---\n{}",
        clusterip("empty", "10.96.0.20", 80, "TCP", 8080, &[], ""),
        clusterip("uempty", "10.96.0.21", 53, "UDP", 5353, &[], "")
    );
    let rv = t.launch(&m, &[]);
    let e = Topology::within(&t.node, || {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            match connect_from(None, sa("10.96.0.20:80")) {
                Err(e) if e.kind() == ErrorKind::ConnectionRefused => return e,
                _ if Instant::now() > deadline => panic!("no refusal"),
                _ => std::thread::sleep(Duration::from_millis(50)),
            }
        }
    });
    assert_eq!(e.kind(), ErrorKind::ConnectionRefused, "{}", rv.log());
    let e = Topology::within(&t.node, || {
        let c = UdpSocket::bind("0.0.0.0:0").unwrap();
        c.connect("10.96.0.21:53").unwrap();
        c.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        c.send(b"q").unwrap();
        c.recv(&mut [0u8; 16]).unwrap_err()
    });
    assert_eq!(e.kind(), ErrorKind::ConnectionRefused, "{e:?}");
}

/// A UDP echo backend `u` on pod .2 port 5353 behind ClusterIP Service
/// `name` at `vip`:53, ringvip started; `None` where namespace tests cannot
/// run.
fn udp_echo_service(name: &str, vip: &str) -> Option<(Topology, UdpBackend, Ringvip)> {
    let t = Topology::setup(&[])?;
    let u = t.udp_backend((t.pod_ip(2), 5353).into(), "u");
    let rv = t.launch(&t.pod_service(name, vip, 53, "UDP", 5353), &[]);
    Some((t, u, rv))
}

/// [`udp_echo_service`] once its VIP answers at all: the precondition of the
/// tests that measure what comes after.
fn answering_udp_echo_service(name: &str, vip: &str) -> Option<(Topology, UdpBackend, Ringvip)> {
    let (t, u, rv) = udp_echo_service(name, vip)?;
    let addr = SocketAddr::new(vip.parse().unwrap(), 53);
    let ready = Topology::within(&t.node, move || wait_udp_ready(addr, b"ping").is_some());
    assert!(ready, "no UDP reply\n{}", rv.log());
    Some((t, u, rv))
}

#[test]
fn udp_round_trip_through_the_vip() {
    let Some((t, _u, rv)) = udp_echo_service("dns", "10.96.0.30") else {
        return;
    };
    let got = Topology::within(&t.node, || {
        let c = UdpSocket::bind("0.0.0.0:0").unwrap();
        c.set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        let mut buf = [0u8; 64];
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            c.send_to(b"ping", "10.96.0.30:53").unwrap();
            if let Ok((n, from)) = c.recv_from(&mut buf) {
                return Some((buf[..n].to_vec(), from));
            }
        }
        None
    });
    let (data, from) = got.unwrap_or_else(|| panic!("no UDP reply\n{}", rv.log()));
    assert_eq!(data, b"u:ping");
    assert_eq!(from, sa("10.96.0.30:53"), "reply must come from the VIP");
    // Later datagrams of the flow take the no-copy send path; all are counted.
    let more = Topology::within(&t.node, || {
        let c = UdpSocket::bind("0.0.0.0:0").unwrap();
        c.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let mut buf = [0u8; 64];
        (0..10)
            .filter(|i| {
                let msg = format!("m{i}");
                c.send_to(msg.as_bytes(), "10.96.0.30:53").unwrap();
                c.recv(&mut buf).ok() == Some(msg.len() + 2)
            })
            .count()
    });
    assert_eq!(more, 10, "{}", rv.log());
    let addr = rv.metrics;
    let metrics = Topology::within(&t.node, move || admin_get(addr, "/metrics"));
    let up = bytes_relayed(&metrics, "dns", "to_backend").unwrap_or(0);
    assert!(up >= 4 + 20, "to_backend {up}\n{metrics}");
}

/// A ClusterIP UDP flow idle for its timeout ends (its gauge back to 0) on
/// the TUN thread's own timer, with nothing else waking the thread; not
/// before.
#[test]
fn an_idle_clusterip_udp_flow_ends_after_its_timeout() {
    let Some(t) = Topology::setup(&[]) else {
        return;
    };
    let _u = t.udp_backend((t.pod_ip(2), 5353).into(), "u");
    let rv = t.launch(
        &t.pod_service("idle", "10.96.0.31", 53, "UDP", 5353),
        &["--udp-idle-timeout-secs", "1"],
    );
    let addr = rv.metrics;
    let vip: SocketAddr = sa("10.96.0.31:53");
    // The probe's flow is the one watched: answered, then idle.
    let c = Topology::within(&t.node, move || wait_udp_ready(vip, b"ping"));
    assert!(c.is_some(), "no UDP reply\n{}", rv.log());
    let gauge = |t: &Topology| {
        Topology::within(&t.node, move || {
            let m = admin_get(addr, "/metrics");
            metric::<u64>(&m, "ringvip_udp_flows_active", &["service=\"idle\""])
        })
    };
    let answered = Instant::now();
    assert_eq!(gauge(&t), Some(1), "{}", rv.log());
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(gauge(&t), Some(1), "ended before its idle timeout");
    // Idle 1 s, swept once a second: gone within 2 s of the last datagram
    // (which arrived a little before `answered`).
    let mut ended = None;
    while answered.elapsed() < Duration::from_secs(5) {
        if gauge(&t) == Some(0) {
            ended = Some(answered.elapsed());
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let ended = ended.unwrap_or_else(|| panic!("the idle flow never ended\n{}", rv.log()));
    assert!(ended >= Duration::from_millis(900), "ended after {ended:?}");
    assert!(ended <= Duration::from_secs(3), "ended after {ended:?}");
}

/// A queue that goes quiet between packets is not a failing queue: the
/// reads that find it empty are no error (the first io_uring version took
/// their `EAGAIN` for one, logged it and held reads back 100 ms, which made
/// p99 latency 87 ms).
#[test]
fn reads_that_find_the_queue_empty_are_no_error() {
    let Some(env) = web("") else {
        return;
    };
    let out = Topology::within(&env.t.node, || {
        let mut c = connect_from(None, sa("10.96.0.10:80")).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let mut reply = vec![0u8; 4096];
        // A request, then requests on new connections with quiet gaps.
        c.write_all(b"GET / HTTP/1.0\r\n\r\n").unwrap();
        let _ = c.read(&mut reply);
        (0..30)
            .filter(|_| {
                std::thread::sleep(Duration::from_millis(5));
                http_get(sa("10.96.0.10:80")).is_ok()
            })
            .count()
    });
    assert_eq!(out, 30, "{}", env.rv.log());
    env.assert_balances(30);
    let log = env.rv.log();
    assert!(!log.contains("reading the TUN failed"), "{log}");
}

/// A packet that comes to a quiet queue is read when it arrives, not when
/// the thread's timer (100 ms with nothing else due) next wakes it: the
/// queue's readiness wakes the sleeping thread. Twenty datagrams, each after
/// a quiet gap longer than the timer: every one answered, the median answer
/// within 20 ms. A thread that missed the wake-up answers each only when its
/// timer fires (with the readiness branch taken out of the driver's wait:
/// every answer after 128–130 ms); the median, not the slowest, so one
/// scheduling stall on a busy machine does not decide it.
#[test]
fn a_packet_to_a_quiet_queue_is_read_when_it_arrives() {
    let Some((t, _u, rv)) = answering_udp_echo_service("quiet", "10.96.0.33") else {
        return;
    };
    let mut answers: Vec<Option<Duration>> = Topology::within(&t.node, || {
        let c = UdpSocket::bind("0.0.0.0:0").unwrap();
        c.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let mut buf = [0u8; 64];
        (0..20)
            .map(|i| {
                std::thread::sleep(Duration::from_millis(120));
                let msg = format!("q{i}");
                let sent = Instant::now();
                c.send_to(msg.as_bytes(), "10.96.0.33:53").unwrap();
                match c.recv(&mut buf) {
                    Ok(n) if n == msg.len() + 2 => Some(sent.elapsed()),
                    _ => None,
                }
            })
            .collect()
    });
    assert!(
        answers.iter().all(Option::is_some),
        "a datagram went unanswered: {answers:?}\n{}",
        rv.log()
    );
    answers.sort();
    let median = answers[answers.len() / 2].unwrap_or(Duration::MAX);
    assert!(
        median < Duration::from_millis(20),
        "median answer {median:?}, all {answers:?}\n{}",
        rv.log()
    );
}

/// Every operation on a TUN queue's ring completes within the submit that
/// carries it: the queue is non-blocking and the reads are `RWF_NOWAIT`.
/// The driver relies on it: it takes the completions right after each
/// submit and nothing watches the ring's descriptor, so an operation left in
/// flight would wait for the driver's timer. Reads that find the queue
/// empty, a read that finds a packet, and a write, each on a real queue.
#[test]
fn tun_ring_operations_complete_within_their_submit() {
    use ringvip::dataplane::tun::uring::{Done, TunIo};
    use ringvip::dataplane::tun::{udp_packet, Tun};
    let Some(t) = Topology::setup(&[]) else {
        return;
    };
    let seen = Topology::within(&t.node, || {
        let tun = Tun::open_queues("rvring0", 1).unwrap().pop().unwrap();
        // No IPv6 on it: the kernel's own packets (router solicitations,
        // MLD reports) would come in at any time.
        std::fs::write("/proc/sys/net/ipv6/conf/rvring0/disable_ipv6", "1").unwrap();
        ip(&["addr", "add", "10.78.0.1/24", "dev", "rvring0"]);
        ip(&["link", "set", "rvring0", "up"]);
        let mut io = TunIo::new(&tun, 2048).unwrap();
        let mut seen = Vec::new();
        let mut round = |io: &mut TunIo, what: &'static str| {
            io.submit().unwrap();
            let mut read = Vec::new();
            let mut wrote = 0;
            // What the submit completed, taken without entering the kernel.
            io.complete(|d| match d {
                Done::Read(r) => read.push(r.packet),
                Done::Wrote(_, r) => wrote += usize::from(r.is_ok()),
                Done::ReadFailed(_, e) => panic!("{what}: read failed: {e}"),
            });
            let ours = read.iter().filter(|p| p.ends_with(b"in")).count();
            seen.push((what, io.in_flight(), read.len(), ours, wrote));
        };
        // Nothing waits yet: the reads find the queue empty.
        io.arm(Vec::new);
        round(&mut io, "empty");
        // A datagram routed into the TUN, then reads.
        let s = UdpSocket::bind("10.78.0.1:0").unwrap();
        s.send_to(b"in", "10.78.0.2:9").unwrap();
        io.maybe_readable();
        io.arm(Vec::new);
        round(&mut io, "packet");
        // A packet written to the TUN, for the socket.
        let mut p = Vec::new();
        udp_packet(sa("10.78.0.2:9"), s.local_addr().unwrap(), b"out", &mut p).unwrap();
        io.write(p, None).unwrap();
        round(&mut io, "write");
        s.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
        let mut buf = [0u8; 16];
        let got = s.recv(&mut buf).map(|n| buf[..n].to_vec()).ok();
        (seen, got)
    });
    let (rounds, got) = seen;
    // (round, left in flight, packets read, ours among them, written)
    let want = [
        ("empty", 0, 0, 0, 0),
        ("packet", 0, 1, 1, 0),
        ("write", 0, 0, 0, 1),
    ];
    assert_eq!(rounds, want);
    assert_eq!(got.as_deref(), Some(&b"out"[..]));
}

/// A client that sends with `UDP_SEGMENT` (one send, several datagrams):
/// with UDP segmentation offload on the TUN the datagrams reach ringvip as one
/// super-packet, which it cuts; the backend gets each datagram alone and the
/// client each reply.
#[test]
fn udp_segmentation_offload_delivers_every_datagram() {
    let Some((t, _u, rv)) = answering_udp_echo_service("gso", "10.96.0.32") else {
        return;
    };
    let replies = Topology::within(&t.node, || {
        use std::os::fd::AsRawFd;
        let c = UdpSocket::bind("0.0.0.0:0").unwrap();
        c.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let size: libc::c_int = 1000;
        // SAFETY: setsockopt reads the int we pass, nothing else.
        let r = unsafe {
            libc::setsockopt(
                c.as_raw_fd(),
                libc::SOL_UDP,
                libc::UDP_SEGMENT,
                (&size as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        assert_eq!(r, 0, "UDP_SEGMENT: {}", std::io::Error::last_os_error());
        // Three datagrams of 1000, 1000 and 500 bytes in one send.
        let payload: Vec<u8> = (0..2500u32).map(|i| b'a' + (i / 1000) as u8).collect();
        c.send_to(&payload, "10.96.0.32:53").unwrap();
        let mut buf = [0u8; 2048];
        let mut got = Vec::new();
        while let Ok(n) = c.recv(&mut buf) {
            got.push(buf[..n].to_vec());
            if got.len() == 3 {
                break;
            }
        }
        got
    });
    let want: Vec<Vec<u8>> = [(b'a', 1000), (b'b', 1000), (b'c', 500)]
        .iter()
        .map(|&(b, n)| [&b"u:"[..], &vec![b; n]].concat())
        .collect();
    let mut got = replies;
    got.sort();
    assert_eq!(
        got.iter().map(Vec::len).collect::<Vec<_>>(),
        vec![1002, 1002, 502],
        "{}",
        rv.log()
    );
    assert_eq!(got, want);
}

/// A datagram whose checksum the kernel did not vouch for (a raw socket's,
/// like one forwarded from a NIC without offload) is verified in ringvip: a
/// corrupt one is dropped, an intact one is answered.
#[test]
fn udp_with_a_bad_checksum_is_dropped() {
    let Some((t, _u, rv)) = udp_echo_service("raw", "10.96.0.31") else {
        return;
    };
    let client = SocketAddr::from((t.node_ip(), 40_053));
    let (bad, good) = Topology::within(&t.node, move || {
        let replies = UdpSocket::bind(client).unwrap();
        replies
            .set_read_timeout(Some(Duration::from_millis(300)))
            .unwrap();
        let raw = socket2::Socket::new(
            socket2::Domain::IPV4,
            socket2::Type::RAW,
            Some(socket2::Protocol::from(libc::IPPROTO_RAW)),
        )
        .unwrap();
        let vip = sa("10.96.0.31:53");
        let mut packet = Vec::new();
        ringvip::dataplane::tun::udp_packet(client, vip, b"ping", &mut packet).unwrap();
        let mut corrupt = packet.clone();
        let last = corrupt.len() - 1;
        corrupt[last] ^= 0x20; // "ping" -> "pinG": the checksum no longer matches
        let mut buf = [0u8; 64];
        let mut answered = |p: &[u8]| {
            raw.send_to(p, &vip.into()).unwrap();
            replies.recv(&mut buf).ok().map(|n| buf[..n].to_vec())
        };
        // Wait until the frontend answers intact datagrams at all.
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut good = None;
        while good.is_none() && Instant::now() < deadline {
            good = answered(&packet);
        }
        let bad = (0..3).find_map(|_| answered(&corrupt));
        (bad, good)
    });
    assert_eq!(good.as_deref(), Some(&b"u:ping"[..]), "{}", rv.log());
    assert_eq!(bad, None, "a corrupt datagram reached the backend");
}

#[test]
fn ipv6_vip() {
    let Some(t) = Topology::setup(&[]) else {
        return;
    };
    let pod6 = IpAddr::V6(t.pod_ip6());
    let addr = SocketAddr::new(pod6, 8080);
    let _b = t.backend(addr, "v6", Mode::Http);
    let m = clusterip("web6", "fd00:10:96::10", 80, "TCP", 8080, &[pod6], "");
    let rv = t.launch(&m, &[]);
    // The first request (the veth addresses are added without DAD).
    let (_, body) = t.curl("http://[fd00:10:96::10]/");
    assert_eq!(body, "backend-v6", "{}", rv.log());
}

/// The node-proxy case: a pod (MTU 1500 veth) reaches a ClusterIP through
/// the node, which forwards into the TUN. 2 MB echoed through the VIP come back
/// intact: checksums of forwarded packets, and the segments ringvip sends as
/// 64 KiB that the kernel cuts to the pod's MSS, both hold.
#[test]
fn pod_reaches_a_clusterip_through_the_node() {
    pod_echo_through_the_node(false);
}

/// [`pod_reaches_a_clusterip_through_the_node`] over IPv6 (TCPv6 segmentation).
#[test]
fn pod_reaches_an_ipv6_clusterip_through_the_node() {
    pod_echo_through_the_node(true);
}

fn pod_echo_through_the_node(v6: bool) {
    let Some(t) = Topology::setup(&[3]) else {
        return;
    };
    // Backend and client both live in the pod namespace; the client's packets
    // to the VIP still go through the node (its only route there).
    let (backend, client, vip, cidr, via, forward): (IpAddr, IpAddr, &str, &str, String, &str) =
        if v6 {
            let pod = IpAddr::V6(t.pod_ip6());
            let node = t.node_ip6().to_string();
            (
                pod,
                pod,
                "fd00:10:96::41",
                "fd00:10:96::/112",
                node,
                "net.ipv6.conf.all.forwarding=1",
            )
        } else {
            let node = t.node_ip().to_string();
            (
                IpAddr::V4(t.pod_ip(3)),
                IpAddr::V4(t.pod_ip(2)),
                "10.96.0.41",
                "10.96.0.0/12",
                node,
                "net.ipv4.ip_forward=1",
            )
        };
    let echo = SocketAddr::new(backend, 7000);
    let _e = t.backend(echo, "e", Mode::Echo);
    let m = clusterip("fwd", vip, 7000, "TCP", 7000, &[backend], "");
    let rv = t.launch(&m, &[]);
    ip(&["-n", &t.pod, "route", "add", cidr, "via", &via]);
    let fwd = t.on_node("sysctl", &["-qw", forward]);
    assert!(fwd.status.success(), "{fwd:?}");
    let vip = SocketAddr::new(vip.parse().unwrap(), 7000);
    let back = Topology::within(&t.pod, move || {
        // The first connection from the pod, once its route is in place.
        let mut c = connect_from(Some(client), vip).expect("the pod reached the ClusterIP");
        let payload: Vec<u8> = (0..2_000_000u32).map(|i| (i % 253) as u8).collect();
        let mut reader = c.try_clone().unwrap();
        reader
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let r = std::thread::spawn(move || {
            let mut back = Vec::new();
            let _ = reader.read_to_end(&mut back);
            back
        });
        c.write_all(&payload).unwrap();
        c.shutdown(std::net::Shutdown::Write).unwrap();
        r.join().unwrap() == payload
    });
    assert!(
        back,
        "bytes lost or changed on the forwarded path\n{}",
        rv.log()
    );
}

#[test]
fn half_close_reset_and_endpoint_churn_while_streaming() {
    let Some(t) = Topology::setup(&[3]) else {
        return;
    };
    let (echo, stream) = (
        SocketAddr::from((t.pod_ip(2), 7000)),
        SocketAddr::from((t.pod_ip(3), 7000)),
    );
    let _e = t.backend(echo, "e", Mode::Echo);
    let _s = t.backend(stream, "s", Mode::Stream);
    let eps = |ip: IpAddr| clusterip("svc", "10.96.0.40", 7000, "TCP", 7000, &[ip], "");
    let rv = t.launch(&eps(IpAddr::V4(t.pod_ip(2))), &[]);
    // Half-close: all echoed bytes come back after our FIN.
    let back = Topology::within(&t.node, || {
        let mut c = connect_when_ready(sa("10.96.0.40:7000"));
        echoed_after_fin(&mut c, 300_000)
    });
    assert!(
        back,
        "echo through the VIP lost or changed bytes\n{}",
        rv.log()
    );

    // Endpoint churn: switch the Service to the streaming backend, stream, then
    // move it back; the established stream keeps flowing.
    rv.apply(&eps(IpAddr::V4(t.pod_ip(3))));
    let mut conn = Topology::within(&t.node, || {
        connect_from(None, sa("10.96.0.40:7000")).unwrap()
    });
    conn.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let mut buf = [0u8; 64];
    assert!(conn.read(&mut buf).unwrap() > 0);
    rv.apply(&eps(IpAddr::V4(t.pod_ip(2))));
    assert_streams(&mut conn, "after its endpoint left");
}

/// A client held by a full receive window goes on as soon as its backend
/// takes bytes again: reading from a full ring tells the client at once,
/// not at the TUN thread's next timer (up to 100 ms later). The backend
/// reads 512 KiB, pauses 5 ms, and so on: 8 MiB is 16 pauses (80 ms), and the
/// 1 MiB ring empties every second pause, so each late window update adds
/// most of 100 ms.
#[test]
fn a_client_held_by_a_full_window_resumes_when_the_backend_reads() {
    const TOTAL: usize = 8 << 20;
    const BURST: usize = 512 << 10;
    let Some(t) = Topology::setup(&[]) else {
        return;
    };
    let addr = SocketAddr::from((t.pod_ip(2), 7100));
    let listener = t.on_pod_thread(move || {
        let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        // A small buffer: the backend's pauses reach the ring at once.
        s.set_recv_buffer_size(16 << 10).unwrap();
        s.bind(&addr.into()).unwrap();
        s.listen(8).unwrap();
        std::net::TcpListener::from(s)
    });
    let reader = std::thread::spawn(move || {
        let (mut c, _) = listener.accept().unwrap();
        let (mut got, mut buf) = (0usize, vec![0u8; 64 << 10]);
        let mut start = None;
        loop {
            let mut burst = 0;
            while burst < BURST {
                match c.read(&mut buf) {
                    Ok(0) => return (got, start.map(|s: Instant| s.elapsed())),
                    Ok(n) => {
                        start.get_or_insert_with(Instant::now);
                        got += n;
                        burst += n;
                    }
                    Err(e) => panic!("backend read: {e}"),
                }
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    });
    let m = t.pod_service("slow", "10.96.0.60", 7100, "TCP", 7100);
    let rv = t.launch(&m, &[]);
    Topology::within(&t.node, || {
        let mut c = connect_when_ready(sa("10.96.0.60:7100"));
        c.write_all(&vec![7u8; TOTAL]).unwrap();
        c.shutdown(std::net::Shutdown::Write).unwrap();
    });
    let (got, took) = reader.join().unwrap();
    let took = took.unwrap_or_default();
    assert_eq!(got, TOTAL, "bytes lost on the way\n{}", rv.log());
    // 80 ms of pauses (88 ms measured); with the updates left to the
    // thread's timer it took 473 ms.
    assert!(
        took < Duration::from_millis(300),
        "8 MiB to a backend that pauses took {took:?}: the client waited for window updates\n{}",
        rv.log()
    );
    eprintln!("8 MiB to a backend pausing 5 ms per 512 KiB: {took:?}");
}

#[test]
fn iperf3_through_the_clusterip() {
    let Some((t, [iperf3])) = Topology::setup_with(&[], [("iperf3", "bulk TCP through the VIP")])
    else {
        return;
    };
    let server = t.spawn_on_pod(
        &iperf3,
        &["-s", "-1", "-B", &t.pod_ip(2).to_string(), "-p", "5201"],
    );
    let m = t.pod_service("perf", "10.96.0.50", 5201, "TCP", 5201);
    let rv = t.launch(&m, &[]);
    std::thread::sleep(Duration::from_millis(300));
    let out = t.on_node(
        iperf3.to_str().unwrap(),
        &["-c", "10.96.0.50", "-t", "2", "-J"],
    );
    drop(server);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}\n{}", rv.log());
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    let bytes = v["end"]["sum_received"]["bytes"].as_f64().unwrap_or(0.0);
    assert!(bytes > 1e6, "iperf3 moved only {bytes} bytes");
    eprintln!(
        "iperf3 through the VIP: {:.2} Gbit/s (debug builds are slow; see BENCHMARKS.md)",
        v["end"]["sum_received"]["bits_per_second"]
            .as_f64()
            .unwrap_or(0.0)
            / 1e9
    );
}

#[test]
fn connection_cap_drops_new_syns_with_a_warning() {
    let Some(t) = Topology::setup(&[]) else {
        return;
    };
    let addr = SocketAddr::from((t.pod_ip(2), 7000));
    let _s = t.backend(addr, "s", Mode::Stream);
    let m = t.pod_service("cap", "10.96.0.60", 7000, "TCP", 7000);
    // One queue: the cap is split across queues, and this test counts exactly.
    let rv = t.launch(&m, &["--tun-max-connections", "2", "--tun-queues", "1"]);
    let (held, third) = Topology::within(&t.node, || {
        let mut held = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(5);
        while held.len() < 2 && Instant::now() < deadline {
            if let Ok(c) = connect_from(None, sa("10.96.0.60:7000")) {
                held.push(c);
            }
        }
        let third = connect_from(None, sa("10.96.0.60:7000"));
        (held, third)
    });
    assert_eq!(held.len(), 2, "{}", rv.log());
    let e = third.expect_err("a third connection got through the cap");
    assert_eq!(e.kind(), ErrorKind::TimedOut, "{e}");
    assert!(
        rv.log().contains("TUN connection limit reached"),
        "{}",
        rv.log()
    );
}

/// A real UDP peer: dnsmasq in the pod answering dig through the VIP.
#[test]
fn dns_server_answers_dig_through_the_vip() {
    let Some((t, [dnsmasq, dig])) = Topology::setup_with(
        &[],
        [
            ("dnsmasq", "a real DNS server behind a UDP ClusterIP"),
            ("dig", "a real DNS client"),
        ],
    ) else {
        return;
    };
    let server = t.spawn_dnsmasq(&dnsmasq, 5353, &["/web.test/192.0.2.80".into()]);
    let m = t.pod_service("dns", "10.96.0.70", 53, "UDP", 5353);
    let rv = t.launch(&m, &[]);
    let ask = |server: &str, port: &str| {
        let at = format!("@{server}");
        let out = t.on_node(
            dig.to_str().unwrap(),
            &["+short", "+time=1", "+tries=1", "-p", port, &at, "web.test"],
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    // Precondition: dnsmasq itself answers (it starts asynchronously).
    let direct = t.pod_ip(2).to_string();
    assert!(
        wait_until(Duration::from_secs(5), || ask(&direct, "5353")
            == "192.0.2.80"),
        "dnsmasq never answered"
    );
    // Then the first query through the VIP is answered.
    let answer = ask("10.96.0.70", "53");
    drop(server);
    assert_eq!(answer, "192.0.2.80", "dig through the VIP\n{}", rv.log());
}

/// `ringvip.io/proxy-protocol: v2` on the ClusterIP path: nginx behind the
/// VIP reads the client's address and the VIP it connected to from the
/// header ringvip writes before the client's bytes.
#[test]
fn clusterip_sends_the_proxy_header_to_nginx() {
    let Some((t, [nginx])) =
        Topology::setup_with(&[], [("nginx", "a real PROXY protocol consumer")])
    else {
        return;
    };
    let addr: SocketAddr = (t.pod_ip(2), 8080).into();
    let server = format!(
        "listen {addr} proxy_protocol;\n    location / {{ return 200 \"$proxy_protocol_server_addr:$proxy_protocol_server_port from $proxy_protocol_addr\\n\"; }}"
    );
    let _ng = t.on_pod_thread(move || Nginx::with_server(&nginx, addr, &server));
    let m = clusterip(
        "pp",
        "10.96.0.10",
        80,
        "TCP",
        8080,
        &[IpAddr::V4(t.pod_ip(2))],
        "",
    )
    .replace(
        "metadata: {name: pp, namespace: default}",
        "metadata: {name: pp, namespace: default, annotations: {ringvip.io/proxy-protocol: v2}}",
    );
    let rv = t.launch(&m, &[]);
    let (ok, body) = t.curl("http://10.96.0.10/");
    assert!(ok, "{body}\n{}", rv.log());
    let (vip, client) = body.split_once(" from ").unwrap_or_default();
    assert_eq!(vip, "10.96.0.10:80", "{body}");
    // The client is curl in the node namespace: never the VIP, never empty.
    assert!(
        client.parse::<IpAddr>().is_ok() && client != "10.96.0.10",
        "{body}"
    );
}

/// After a crash (SIGKILL: no drain, no clean-up) nothing is in the way of
/// the next start: the killed process's TUN device and routes went with it,
/// its handover socket file is left but stale, its ports are free. The
/// restarted process, on the same TUN name, handover path and admin ports,
/// serves the first request through the ClusterIP.
#[test]
fn a_restart_after_sigkill_finds_nothing_in_its_way() {
    let Some(mut env) = web("") else {
        return;
    };
    let handover = env.rv.handover.clone();
    let admin = (env.rv.health, env.rv.metrics);
    let manifest = std::fs::read_to_string(env.rv.path().join("manifest.yaml")).unwrap();
    env.rv.signal(libc::SIGKILL);
    assert!(env.rv.wait_exit(Duration::from_secs(5)), "not killed");
    assert!(handover.exists(), "no socket file left to be stale");

    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("manifest.yaml"), manifest).unwrap();
    let mut cmd = std::process::Command::new("ip");
    cmd.args(["netns", "exec", &env.t.node])
        .arg(bin())
        .args(["run", "--manifests"])
        .arg(dir.path());
    let started = Instant::now();
    let args = ["--handover", handover.to_str().unwrap()];
    let rv = Ringvip::spawn_with_admin(cmd, dir, &args, "snapshot published", admin);
    let (ok, body) = env.t.curl("http://10.96.0.10/");
    println!(
        "restart after SIGKILL: start → first request served {:?}",
        started.elapsed()
    );
    assert!(ok, "first request after the restart: {body}\n{}", rv.log());
    assert!(
        rv.log().contains("stale handover socket"),
        "the stale socket file was not recognised:\n{}",
        rv.log()
    );
    env.rv = rv;
}
