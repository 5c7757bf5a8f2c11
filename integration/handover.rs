//! Upgrades that drop nothing (issue 14): a new ringvip started with the
//! handover socket of a running one takes over its listening sockets (every
//! worker's NodePort TCP and UDP sockets, admin, DNS), its ClientIP affinity
//! table and its UDP flow pins; the old one stops accepting, relays what it
//! has until that ends, and exits.
//!
//! The load test runs a bounded load through NodePorts (wrk with a new
//! connection per request to nginx, 8 long-lived echo streams, UDP flows,
//! ClientIP affinity clients) while the node proxy is handed over
//! [`ROUNDS`] times in a row, and prints its figures. The fault tests play
//! the misbehaving side: a new process that dies after it got the sockets,
//! a second new process arriving meanwhile, a missing or stale socket, the
//! old process killed right after the handover.
//!
//! Everything runs on loopback addresses each test takes for itself, as
//! the user running the tests (no root needed: handing sockets over needs no
//! privilege). Each process gets a handover socket of the test's own.

mod support;

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use ringvip::handover::wire::{self, Message, Role};
use support::*;

/// Handovers in a row in the load test, as the issue asks; each round
/// starts a process, waits for its first snapshot and the release, and lets
/// the load run on it for [`BETWEEN_ROUNDS`]: about 20 s in all.
const ROUNDS: usize = 20;
/// Long-lived echo streams across every handover.
const STREAMS: usize = 8;
/// UDP flows across every handover (each its own client port).
const UDP_FLOWS: usize = 16;
/// ClientIP affinity clients (each its own source address).
const STICKY_CLIENTS: u8 = 8;
/// How long the load runs on each new process before the next handover.
const BETWEEN_ROUNDS: Duration = Duration::from_millis(700);
/// The UDP idle timeout of every process: the old process's flows (which
/// only relay late replies once the new process reads the frontend socket)
/// end this long after their last datagram, and the old process exits.
const UDP_IDLE_SECS: &str = "2";

// ---- load ---------------------------------------------------------------------

/// Echo streams: each writes a numbered 8-byte message every 20 ms and reads
/// it back; a stream that fails once counts as broken.
struct Streams {
    stop: Arc<AtomicBool>,
    threads: Vec<thread::JoinHandle<Result<u64, String>>>,
}

impl Streams {
    fn start(addr: SocketAddr, n: usize) -> Streams {
        let stop = Arc::new(AtomicBool::new(false));
        let threads = (0..n)
            .map(|i| {
                let mut c = connect_when_ready(addr);
                c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                let stop = stop.clone();
                thread::spawn(move || {
                    let mut seq = 0u64;
                    while !stop.load(Ordering::SeqCst) {
                        let msg = ((i as u64) << 48 | seq).to_be_bytes();
                        let mut back = [0u8; 8];
                        c.write_all(&msg)
                            .and_then(|()| c.read_exact(&mut back))
                            .map_err(|e| format!("stream {i} broke after {seq} echoes: {e}"))?;
                        if back != msg {
                            return Err(format!("stream {i}: echo {seq} came back wrong"));
                        }
                        seq += 1;
                        thread::sleep(Duration::from_millis(20));
                    }
                    Ok(seq)
                })
            })
            .collect();
        Streams { stop, threads }
    }

    /// Stops and closes the streams: (echoes, broken streams' errors).
    fn finish(self) -> (u64, Vec<String>) {
        self.stop.store(true, Ordering::SeqCst);
        let mut echoes = 0;
        let mut broken = Vec::new();
        for t in self.threads {
            match t.join().unwrap() {
                Ok(n) => echoes += n,
                Err(e) => broken.push(e),
            }
        }
        (echoes, broken)
    }
}

/// UDP flows to a UDP echo NodePort: each sends a datagram every 20 ms and
/// waits up to 1 s for its reply, which names the backend.
struct Flows {
    stop: Arc<AtomicBool>,
    threads: Vec<thread::JoinHandle<FlowSeen>>,
}

/// What one flow saw.
#[derive(Debug, Default)]
struct FlowSeen {
    sent: u64,
    lost: u64,
    backends: BTreeSet<String>,
}

impl Flows {
    /// `n` flows to `addr`, each from its own port on `bind`.
    fn start(bind: Ipv4Addr, addr: SocketAddr, n: usize) -> Flows {
        let stop = Arc::new(AtomicBool::new(false));
        let threads = (0..n)
            .map(|i| {
                let s = UdpSocket::bind((bind, 0)).unwrap();
                s.connect(addr).unwrap();
                s.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
                let stop = stop.clone();
                thread::spawn(move || {
                    let mut seen = FlowSeen::default();
                    let mut buf = [0u8; 256];
                    while !stop.load(Ordering::SeqCst) {
                        let msg = format!("{i}-{}", seen.sent);
                        seen.sent += 1;
                        s.send(msg.as_bytes()).unwrap();
                        // Replies of earlier datagrams that came late are
                        // skipped; only this one's counts.
                        let deadline = Instant::now() + Duration::from_secs(1);
                        let got = loop {
                            match s.recv(&mut buf) {
                                Ok(k) => {
                                    let r = String::from_utf8_lossy(&buf[..k]).to_string();
                                    if let Some((name, payload)) = r.split_once(':') {
                                        if payload == msg {
                                            break Some(name.to_string());
                                        }
                                    }
                                    if Instant::now() > deadline {
                                        break None;
                                    }
                                }
                                Err(_) => break None,
                            }
                        };
                        match got {
                            Some(name) => {
                                seen.backends.insert(name);
                            }
                            None => seen.lost += 1,
                        }
                        thread::sleep(Duration::from_millis(20));
                    }
                    seen
                })
            })
            .collect();
        Flows { stop, threads }
    }

    fn finish(self) -> Vec<FlowSeen> {
        self.stop.store(true, Ordering::SeqCst);
        self.threads
            .into_iter()
            .map(|t| t.join().unwrap())
            .collect()
    }
}

/// The backend each ClientIP client is served by (one request each).
fn sticky_backends(clients: &[Ipv4Addr], front: SocketAddr) -> Vec<String> {
    clients
        .iter()
        .map(|ip| {
            http_get_from(Some((*ip).into()), front).unwrap_or_else(|e| format!("failed: {e}"))
        })
        .collect()
}

/// One DNS query over UDP: whether the responder answered it (a response
/// with its id; the NodePort Services here have no ClusterIP, so no record).
fn dns_answers(addr: SocketAddr, name: &str) -> bool {
    let s = UdpSocket::bind("127.0.0.1:0").unwrap();
    s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    s.send_to(&a_query(name), addr).unwrap();
    let mut buf = [0u8; 512];
    match s.recv(&mut buf) {
        Ok(k) if k >= 12 => buf[..2] == [0x12, 0x34] && buf[2] & 0x80 != 0,
        _ => false,
    }
}

/// Start times of the connections an access log recorded for `frontend`
/// (each line's end time minus its duration), sorted.
fn accepts(log: &Path, frontend: SocketAddr) -> Vec<f64> {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let mut out: Vec<f64> = text
        .lines()
        .filter(|l| l.contains(&format!(" frontend={frontend} ")))
        .filter_map(|l| {
            let time: jiff::Timestamp = l.split_whitespace().next()?.parse().ok()?;
            let ms: f64 = l
                .split(" duration_ms=")
                .nth(1)?
                .split(' ')
                .next()?
                .parse()
                .ok()?;
            Some(time.as_nanosecond() as f64 / 1e6 - ms)
        })
        .collect();
    out.sort_by(f64::total_cmp);
    out
}

/// `release_ms` of a new process's "handover complete" line.
fn release_ms(log: &str) -> f64 {
    log.lines()
        .find(|l| l.contains("handover complete"))
        .and_then(|l| l.split("release_ms=").nth(1))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(f64::NAN)
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

// ---- the load test --------------------------------------------------------------

#[test]
fn handovers_under_load_drop_nothing() {
    let Some(nginx) = need_program("nginx", "real HTTP backends (nginx-light)") else {
        return;
    };
    if need_program("wrk", "HTTP load through the NodePort").is_none() {
        return;
    }
    let net = Loopback::take();
    let (web_port, _webs) = nginxes(&nginx, net, 3);
    let echo_port = free_port();
    let _echo = Backend::start(net.addr(10, echo_port), "echo", Mode::Echo);
    let udp_port = free_port();
    let _u1 = UdpBackend::start(net.addr(21, udp_port), "u1");
    let _u2 = UdpBackend::start(net.addr(22, udp_port), "u2");
    let (p_web, p_sticky, p_echo, p_udp) = (free_port(), free_port(), free_port(), free_port());
    let webs = net.ips(1..=3);
    let udp_eps = [(net.ip(21), true, "node-a"), (net.ip(22), true, "node-a")];
    let manifest = [
        nodeport_service("web", p_web, web_port, &webs, ""),
        nodeport_service(
            "sticky",
            p_sticky,
            web_port,
            &webs,
            "  sessionAffinity: ClientIP\n",
        ),
        nodeport_service("echo", p_echo, echo_port, &[net.ip(10)], ""),
        service_with("udp", "UDP", p_udp, udp_port, &udp_eps, ""),
    ]
    .join("---\n");
    let dns = SocketAddr::from((Ipv4Addr::LOCALHOST, free_port()));
    let logs = tempfile::tempdir().unwrap();
    let access = |round: usize| logs.path().join(format!("access-{round}.log"));
    let args = |round: usize| -> Vec<String> {
        [
            "--dns-addr",
            &dns.to_string(),
            "--udp-idle-timeout-secs",
            UDP_IDLE_SECS,
            "--access-log",
            access(round).to_str().unwrap(),
        ]
        .map(String::from)
        .to_vec()
    };
    let first_args = args(0);
    let first_args: Vec<&str> = first_args.iter().map(String::as_str).collect();
    let mut current = Ringvip::start(&manifest, &first_args);
    let name = "web.default.svc.cluster.local";
    assert!(dns_answers(dns, name), "DNS before: {}", current.log());

    let clients = Loopback::take().ips(1..=STICKY_CLIENTS);
    let sticky_before = sticky_backends(&clients, np(p_sticky));
    assert!(
        sticky_before.iter().all(|b| b.starts_with("backend-")),
        "{sticky_before:?}"
    );
    let streams = Streams::start(np(p_echo), STREAMS);
    let flows = Flows::start(Ipv4Addr::LOCALHOST, np(p_udp), UDP_FLOWS);
    let wrk = Wrk::start(None, &format!("http://{}/", np(p_web)), 120, 8, true);
    thread::sleep(BETWEEN_ROUNDS);

    let started = Instant::now();
    let mut olds = Vec::new();
    let mut releases = Vec::new();
    let mut sticky_moved = Vec::new();
    let mut failures = Vec::new();
    for round in 1..=ROUNDS {
        let a = args(round);
        let a: Vec<&str> = a.iter().map(String::as_str).collect();
        let next = current.successor(&a, "handover complete");
        releases.push(release_ms(&next.log()));
        olds.push(std::mem::replace(&mut current, next));
        // The first request of each kind on the new process, right after.
        let sticky = sticky_backends(&clients, np(p_sticky));
        if sticky != sticky_before {
            sticky_moved.push((round, sticky));
        }
        if !dns_answers(dns, name) {
            failures.push(format!("round {round}: DNS unanswered"));
        }
        let health = admin_get(current.health, "/healthz");
        if !health.starts_with("HTTP/1.1 200") {
            failures.push(format!("round {round}: /healthz {health}"));
        }
        thread::sleep(BETWEEN_ROUNDS);
    }
    let rounds_took = started.elapsed();
    let w = wrk.interrupt();
    let (echoes, broken) = streams.finish();
    let seen = flows.finish();

    // Every old process exits once what it relays has ended (the streams
    // were the first one's; the UDP flows idle out after UDP_IDLE_SECS).
    let mut not_exited = Vec::new();
    for (i, old) in olds.iter_mut().enumerate() {
        if !old.wait_exit(Duration::from_secs(15)) {
            not_exited.push(format!("process {i}:\n{}", old.log()));
        }
    }

    // The time from the old process's last accept to the new one's first,
    // per handover (negative: both accepted for a while).
    let mut gaps: Vec<f64> = (1..=ROUNDS)
        .filter_map(|r| {
            let old = accepts(&access(r - 1), np(p_web));
            let new = accepts(&access(r), np(p_web));
            Some(new.first()? - old.last()?)
        })
        .collect();
    let (lost, sent): (u64, u64) = seen
        .iter()
        .fold((0, 0), |(l, s), f| (l + f.lost, s + f.sent));
    let moved_flows: Vec<_> = seen.iter().filter(|f| f.backends.len() != 1).collect();
    let max_gap = gaps.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    println!(
        "handover x{ROUNDS} in {:.1} s under load: wrk {} requests ({:.0}/s, new connection each), {} errors; \
         {STREAMS} echo streams: {echoes} echoes, {} broken; {UDP_FLOWS} UDP flows: {sent} datagrams, {lost} lost, \
         {} changed backend; {STICKY_CLIENTS} ClientIP clients: {} rounds with a client moved; \
         old process's last accept -> new one's first: median {:.1} ms, max {:.1} ms (negative: overlap); \
         Ready -> Released: median {:.2} ms",
        rounds_took.as_secs_f64(),
        w.requests,
        w.per_sec,
        w.errors(),
        broken.len(),
        moved_flows.len(),
        sticky_moved.len(),
        median(&mut gaps),
        max_gap,
        median(&mut releases),
    );
    assert_eq!(w.errors(), 0, "failed requests:\n{}", w.text);
    assert!(broken.is_empty(), "broken streams: {broken:?}");
    assert_eq!(lost, 0, "UDP datagrams lost: {seen:?}");
    assert!(
        moved_flows.is_empty(),
        "UDP flows that changed backend: {moved_flows:?}"
    );
    assert!(
        sticky_moved.is_empty(),
        "ClientIP clients moved: {sticky_moved:?} (before: {sticky_before:?})"
    );
    assert!(failures.is_empty(), "{failures:?}");
    assert!(
        not_exited.is_empty(),
        "old processes still running: {not_exited:?}"
    );
    assert_eq!(gaps.len(), ROUNDS, "every process accepted web connections");
}

// ---- fault cases ----------------------------------------------------------------

/// A running ringvip with one HTTP NodePort: (it, the NodePort, its backend).
fn one_web() -> (Ringvip, SocketAddr, Backend) {
    let net = Loopback::take();
    let be = Backend::start(net.addr(1, free_port()), "1", Mode::Http);
    let port = free_port();
    let m = nodeport_service("web", port, be.addr.port(), &[net.ip(1)], "");
    let rv = Ringvip::start(&m, &[]);
    connect_when_ready(np(port));
    (rv, np(port), be)
}

/// The start of a handover, played by the test as the new process: hello,
/// and the inventory with its descriptors. Returns the connection (still
/// open: the running process waits for Ready) and what was received.
fn begin_handover(path: &Path) -> (UnixStream, Message, usize) {
    let mut conn = UnixStream::connect(path).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let hello = Message::Hello {
        version: wire::VERSION,
        pid: std::process::id(),
    };
    wire::send(&mut conn, &hello).unwrap();
    let inv = wire::recv(&mut conn).unwrap();
    let Message::Inventory { sockets, tun, .. } = &inv else {
        panic!("expected the inventory, got {inv:?}");
    };
    let inboxes = tun.as_ref().map_or(0, |t| t.inboxes);
    let fds = wire::recv_fds(&conn, sockets.len() + inboxes).unwrap();
    (conn, inv.clone(), fds.len() - inboxes)
}

#[test]
fn a_new_process_dying_mid_handover_leaves_the_old_one_serving() {
    let (old, front, _be) = one_web();
    let (conn, inv, fds) = begin_handover(&old.handover);
    let Message::Inventory { sockets, .. } = inv else {
        unreachable!()
    };
    // Both workers' sockets of the NodePort, and the admin servers.
    let listeners = sockets
        .iter()
        .filter(|s| s.role == Role::Listener && s.addr == front)
        .count();
    assert_eq!(listeners, 2, "{sockets:?}");
    assert!(
        sockets
            .iter()
            .any(|s| s.role == Role::Health && s.addr == old.health),
        "{sockets:?}"
    );
    assert!(
        sockets
            .iter()
            .any(|s| s.role == Role::Metrics && s.addr == old.metrics),
        "{sockets:?}"
    );
    assert_eq!(fds, sockets.len());
    // The new process dies (its descriptors close with it) before Ready.
    drop(conn);
    assert_eq!(
        http_get(front).unwrap(),
        "backend-1",
        "the first request after: {}",
        old.log()
    );
    // A precondition, not the answer: the old process notices the death on
    // its conversation thread; then a real new process may take over.
    assert!(
        wait_until(Duration::from_secs(5), || old
            .log()
            .contains("went away before it was ready")),
        "{}",
        old.log()
    );
    let new = old.successor(&[], "handover complete");
    assert_eq!(
        http_get(front).unwrap(),
        "backend-1",
        "after the real handover: {}",
        new.log()
    );
}

/// Runs `cmd` (a new process for `old`'s handover socket) and expects it to
/// exit with an error at once; returns what it logged. Bounded, so that one
/// that serves instead fails here.
fn refused_successor(
    old: &Ringvip,
    mut cmd: std::process::Command,
    dir: &tempfile::TempDir,
) -> String {
    let log = dir.path().join("refused.log");
    let mut second = cmd
        .args(shared_args(old.health, old.metrics))
        .arg("--handover")
        .arg(&old.handover)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let mut status = None;
    wait_until(Duration::from_secs(10), || {
        status = second.try_wait().unwrap();
        status.is_some()
    });
    if status.is_none() {
        let _ = second.kill();
        let _ = second.wait();
    }
    let err = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(
        status.is_some_and(|s| !s.success()),
        "the new process must exit with an error ({status:?}): {err}"
    );
    err
}

// ---- ClusterIPs on the TUN device (issue 14 item 2) -------------------------------

/// The ClusterIPs of the TUN tests: long-lived echo streams, HTTP with
/// ClientIP affinity over two pods, UDP echo over two pods.
const ECHO_VIP: &str = "10.96.0.10";
const WEB_VIP: &str = "10.96.0.11";
const UDP_VIP: &str = "10.96.0.12";
/// Requests of the request loop at most (it stops earlier when told).
const MAX_REQUESTS: u64 = 50_000;

fn vip(ip: &str, port: u16) -> SocketAddr {
    SocketAddr::new(ip.parse().unwrap(), port)
}

/// A node and pod namespace pair with the backends of [`ECHO_VIP`],
/// [`WEB_VIP`] and [`UDP_VIP`] and the manifest serving them; `None` (the
/// test skips, saying why) without root and /dev/net/tun.
struct TunScene {
    t: netns::Topology,
    manifest: String,
    _tcp: Vec<Backend>,
    _udp: Vec<UdpBackend>,
}

impl TunScene {
    fn setup() -> Option<TunScene> {
        let t = netns::Topology::setup(&[3])?;
        let (echo_port, web_port, udp_port) = (free_port(), free_port(), free_port());
        let (p2, p3) = (t.pod_ip(2), t.pod_ip(3));
        let pods = [std::net::IpAddr::V4(p2), std::net::IpAddr::V4(p3)];
        let tcp = vec![
            t.backend((p2, echo_port).into(), "echo", Mode::Echo),
            t.backend((p2, web_port).into(), "2", Mode::Http),
            t.backend((p3, web_port).into(), "3", Mode::Http),
        ];
        let udp = vec![
            t.udp_backend((p2, udp_port).into(), "u2"),
            t.udp_backend((p3, udp_port).into(), "u3"),
        ];
        let affinity = "  sessionAffinity: ClientIP\n";
        let manifest = [
            clusterip("echo", ECHO_VIP, 7, "TCP", echo_port, &pods[..1], ""),
            clusterip("web", WEB_VIP, 80, "TCP", web_port, &pods, affinity),
            clusterip("udp", UDP_VIP, 53, "UDP", udp_port, &pods, ""),
        ]
        .join("---\n");
        Some(TunScene {
            t,
            manifest,
            _tcp: tcp,
            _udp: udp,
        })
    }

    /// ringvip's arguments: two TUN queues, a short UDP idle timeout (the
    /// old process's flows end that long after the load stops), an access
    /// log at `log`.
    fn args(log: &Path) -> Vec<String> {
        [
            "--tun-queues",
            "2",
            "--udp-idle-timeout-secs",
            TUN_UDP_IDLE_SECS,
            "--access-log",
            log.to_str().unwrap(),
        ]
        .map(String::from)
        .to_vec()
    }

    fn launch(&self, log: &Path) -> Ringvip {
        let a = Self::args(log);
        let a: Vec<&str> = a.iter().map(String::as_str).collect();
        self.t.launch(&self.manifest, &a)
    }

    /// [`TunScene::launch`], then one request to [`WEB_VIP`]: the process
    /// and the pod its ClientIP affinity keeps this node on.
    fn start(&self, log: &Path) -> (Ringvip, String) {
        let rv = self.launch(log);
        let (_, first) = self.request();
        let pod = first.unwrap_or_else(|e| panic!("{e}: {}", rv.log()));
        (rv, pod)
    }

    fn successor(&self, old: &Ringvip, log: &Path) -> Ringvip {
        let a = Self::args(log);
        let a: Vec<&str> = a.iter().map(String::as_str).collect();
        old.successor_in(Some(&self.t.node), &a, "handover complete")
    }

    /// One HTTP request to [`WEB_VIP`] from the node: (its client port,
    /// the backend that answered or the error).
    fn request(&self) -> (u16, Result<String, String>) {
        self.t.on_node_thread(|| {
            let mut c = match std::net::TcpStream::connect_timeout(
                &vip(WEB_VIP, 80),
                Duration::from_secs(5),
            ) {
                Ok(c) => c,
                Err(e) => return (0, Err(e.to_string())),
            };
            let port = c.local_addr().map_or(0, |a| a.port());
            c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let mut s = String::new();
            let res = write!(c, "GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
                .and_then(|()| c.read_to_string(&mut s).map(|_| ()))
                .map_err(|e| e.to_string())
                .and_then(|()| match s.split("\r\n\r\n").nth(1) {
                    Some(body) if s.starts_with("HTTP/1.1 200") => Ok(body.trim().to_string()),
                    _ => Err(format!("bad response {s:?}")),
                });
            (port, res)
        })
    }

    /// One datagram on a new UDP flow to [`UDP_VIP`]: the pod that answered.
    fn udp_once(&self) -> Option<String> {
        let node = self.t.node_ip();
        self.t.on_node_thread(move || {
            let s = UdpSocket::bind((node, 0)).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
            s.connect(vip(UDP_VIP, 53)).unwrap();
            udp_ask(&s, "once")
        })
    }

    /// The TUN device and a route through it, as `ip` shows them.
    fn device_and_route(&self) -> (bool, String) {
        let link = self.t.on_node("ip", &["link", "show", "ringvip0"]);
        let routes = self.t.on_node("ip", &["route", "show", "dev", "ringvip0"]);
        (
            link.status.success(),
            String::from_utf8_lossy(&routes.stdout).trim().to_string(),
        )
    }
}

/// A bounded loop of HTTP requests, each on a new connection, as curl in a
/// loop makes them: (requests, failures, backends that answered).
struct Requests {
    stop: Arc<AtomicBool>,
    thread: thread::JoinHandle<(u64, Vec<String>, BTreeSet<String>)>,
}

impl Requests {
    fn start(addr: SocketAddr) -> Requests {
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let thread = thread::spawn(move || {
            let (mut n, mut failed, mut backends) = (0, Vec::new(), BTreeSet::new());
            while !s.load(Ordering::SeqCst) && n < MAX_REQUESTS {
                n += 1;
                match http_get(addr) {
                    Ok(b) => {
                        backends.insert(b);
                    }
                    Err(e) => failed.push(format!("request {n}: {e}")),
                }
            }
            (n, failed, backends)
        });
        Requests { stop, thread }
    }

    fn finish(self) -> (u64, Vec<String>, BTreeSet<String>) {
        self.stop.store(true, Ordering::SeqCst);
        self.thread.join().unwrap()
    }
}

/// The UDP idle timeout of the TUN tests: longer than [`STEERING_FORGETS`],
/// so that a UDP flow idle across the handover is still the old process's.
const TUN_UDP_IDLE_SECS: &str = "7";

/// UDP flows that send once, sit idle while the handover happens (their
/// next datagram lands on either process's queues), and send again.
struct IdleFlows {
    socks: Vec<(UdpSocket, String)>,
}

impl IdleFlows {
    /// `n` flows from `bind` to `addr`, each answered once.
    fn start(bind: Ipv4Addr, addr: SocketAddr, n: usize) -> IdleFlows {
        let socks = (0..n)
            .map(|_| {
                let s = UdpSocket::bind((bind, 0)).unwrap();
                s.connect(addr).unwrap();
                s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
                let pod = udp_ask(&s, "first").expect("a first answer");
                (s, pod)
            })
            .collect();
        IdleFlows { socks }
    }

    /// Sends again on each (once idle past [`STEERING_FORGETS`]): those
    /// not answered by the pod that answered first.
    fn finish(self) -> Vec<String> {
        let mut moved = Vec::new();
        for (i, (s, pod)) in self.socks.iter().enumerate() {
            let again = udp_ask(s, "again");
            if again.as_deref() != Some(pod.as_str()) {
                moved.push(format!("idle flow {i}: {pod} then {again:?}"));
            }
        }
        moved
    }
}

/// One datagram `msg` on a connected socket: the pod that answered it.
fn udp_ask(s: &UdpSocket, msg: &str) -> Option<String> {
    s.send(msg.as_bytes()).ok()?;
    let mut buf = [0u8; 256];
    let n = s.recv(&mut buf).ok()?;
    let r = String::from_utf8_lossy(&buf[..n]).to_string();
    r.strip_suffix(&format!(":{msg}")).map(str::to_string)
}

/// How long a flow must be idle before the kernel forgets which queue
/// wrote it last (`TUN_FLOW_EXPIRE`, 3 s, swept by a timer rounded up to
/// the second) and hashes its next packet over every queue, those of both
/// processes; a margin added.
const STEERING_FORGETS: Duration = Duration::from_millis(4_500);

/// Connections that echo once, sit idle while the handover happens, and
/// echo again: their packets land on either process's queues.
struct IdleStreams {
    conns: Vec<std::net::TcpStream>,
    since: Instant,
}

impl IdleStreams {
    fn start(addr: SocketAddr, n: usize) -> IdleStreams {
        let conns = (0..n)
            .map(|i| {
                let mut c = connect_when_ready(addr);
                c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                let mut back = [0u8; 8];
                c.write_all(&(i as u64).to_be_bytes()).unwrap();
                c.read_exact(&mut back).unwrap();
                c
            })
            .collect();
        IdleStreams {
            conns,
            since: Instant::now(),
        }
    }

    /// Once idle past [`STEERING_FORGETS`]: echoes on each again, then
    /// closes them; the errors of those that broke.
    fn finish(self) -> Vec<String> {
        thread::sleep(STEERING_FORGETS.saturating_sub(self.since.elapsed()));
        let mut broken = Vec::new();
        for (i, mut c) in self.conns.into_iter().enumerate() {
            let msg = (i as u64 | 1 << 40).to_be_bytes();
            let mut back = [0u8; 8];
            let r = c.write_all(&msg).and_then(|()| c.read_exact(&mut back));
            match r {
                Ok(()) if back == msg => {}
                Ok(()) => broken.push(format!("idle stream {i}: wrong echo")),
                Err(e) => broken.push(format!("idle stream {i}: {e}")),
            }
        }
        broken
    }
}

/// The value of `key=` on the first line of `log` containing `marker`.
fn logged_value(log: &str, marker: &str, key: &str) -> String {
    log.lines()
        .find(|l| l.contains(marker))
        .and_then(|l| l.split(&format!("{key}=")).nth(1))
        .and_then(|v| v.split_whitespace().next())
        .unwrap_or("?")
        .to_string()
}

/// Whether `log` (an access log) has a record of the connection from the
/// node's `port` to [`WEB_VIP`].
fn logged(log: &Path, node: Ipv4Addr, port: u16) -> bool {
    let want = format!(" client={node}:{port} frontend={WEB_VIP}:80 ");
    std::fs::read_to_string(log).is_ok_and(|t| t.contains(&want))
}

/// The ClusterIPs' flows survive a handover: while 8 echo streams, a
/// request loop and UDP flows run through the TUN device, a new process
/// attaches its queues to the same device and takes over. No request
/// fails, no stream breaks, every UDP flow stays with its pod, the ClientIP
/// client stays on its pod; the first connection after the handover is the
/// new process's; the old one exits once its streams and flows end, and the
/// device and its routes stay, served by the new one. Root and
/// /dev/net/tun: namespaces of its own.
#[test]
fn clusterip_flows_survive_a_handover_of_the_tun_device() {
    let Some(sc) = TunScene::setup() else {
        return;
    };
    let logs = tempfile::tempdir().unwrap();
    let (log_old, log_new) = (logs.path().join("old.log"), logs.path().join("new.log"));
    let (mut old, affine) = sc.start(&log_old);
    let node = sc.t.node_ip();
    let streams =
        sc.t.on_node_thread(|| Streams::start(vip(ECHO_VIP, 7), STREAMS));
    let flows =
        sc.t.on_node_thread(move || Flows::start(node, vip(UDP_VIP, 53), UDP_FLOWS));
    let requests = sc.t.on_node_thread(|| Requests::start(vip(WEB_VIP, 80)));
    let idle =
        sc.t.on_node_thread(|| IdleStreams::start(vip(ECHO_VIP, 7), STREAMS));
    let idle_udp =
        sc.t.on_node_thread(move || IdleFlows::start(node, vip(UDP_VIP, 53), UDP_FLOWS));
    thread::sleep(BETWEEN_ROUNDS);

    let t0 = Instant::now();
    let new = sc.successor(&old, &log_new);
    let took = t0.elapsed();
    // The first connection after the handover: the new process's.
    let (port, after) = sc.request();
    thread::sleep(BETWEEN_ROUNDS * 2);
    let idle_broken = idle.finish();
    let idle_moved = idle_udp.finish();
    let old_alive = !old.wait_exit(Duration::from_millis(1));
    let (requests_made, failed, backends) = requests.finish();
    let (echoes, broken) = streams.finish();
    let seen = flows.finish();
    // A precondition, not the answer: the old process ends once its
    // streams have closed and its UDP flows idled out.
    let exited = old.wait_exit(Duration::from_secs(15));
    let exited_after = t0.elapsed();
    let (device, routes) = sc.device_and_route();
    let (_, served_after_exit) = sc.request();
    let udp_after_exit = sc.udp_once();
    let echo_after_exit = sc.t.on_node_thread(|| {
        let mut c = connect_when_ready(vip(ECHO_VIP, 7));
        c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut back = [0u8; 4];
        c.write_all(b"ping")
            .and_then(|()| c.read_exact(&mut back))
            .map(|()| back == *b"ping")
            .unwrap_or(false)
    });
    // The access log is written behind the relay: wait for its record
    // (a precondition of reading it, not the answer under test).
    let in_new = wait_until(Duration::from_secs(5), || logged(&log_new, node, port));
    let in_old = logged(&log_old, node, port);

    let (lost, sent): (u64, u64) = seen
        .iter()
        .fold((0, 0), |(l, s), f| (l + f.lost, s + f.sent));
    let moved_flows: Vec<_> = seen.iter().filter(|f| f.backends.len() != 1).collect();
    println!(
        "FIGURE handover (ClusterIP, TUN device in a namespace, 2 queues per process): \
         new process serving in {:.0} ms, Ready -> Released {:.2} ms; {requests_made} requests \
         (new connection each), {} failed; {STREAMS} echo streams: {echoes} echoes, {} broken; \
         {STREAMS} streams idle across it: {} broken; {UDP_FLOWS} UDP flows: {sent} datagrams, {lost} lost, {} changed pod; {UDP_FLOWS} UDP flows idle across it: {} not answered by their pod; old process \
         exited {:.1} s after the handover began, having sent {} packets to the new one and \
         received {} from it",
        took.as_secs_f64() * 1e3,
        release_ms(&new.log()),
        failed.len(),
        broken.len(),
        idle_broken.len(),
        moved_flows.len(),
        idle_moved.len(),
        exited_after.as_secs_f64(),
        logged_value(&old.log(), "TUN packets forwarded", "packets_to_peer"),
        logged_value(&old.log(), "TUN packets forwarded", "packets_from_peer"),
    );
    let logs = || format!("old:\n{}\nnew:\n{}", old.log(), new.log());
    assert_eq!(after.as_deref(), Ok(affine.as_str()), "{}", logs());
    assert!(failed.is_empty(), "failed requests: {failed:?}\n{}", logs());
    assert!(broken.is_empty(), "broken streams: {broken:?}\n{}", logs());
    assert!(
        idle_broken.is_empty(),
        "idle streams broken: {idle_broken:?}\n{}",
        logs()
    );
    assert!(
        idle_moved.is_empty(),
        "idle UDP flows: {idle_moved:?}\n{}",
        logs()
    );
    assert_eq!(lost, 0, "UDP datagrams lost: {seen:?}\n{}", logs());
    assert!(
        moved_flows.is_empty(),
        "UDP flows that changed pod: {moved_flows:?}"
    );
    assert_eq!(
        backends,
        BTreeSet::from([affine.clone()]),
        "the ClientIP client moved"
    );
    assert!(
        in_new && !in_old,
        "the first connection after the handover: new {in_new}, old {in_old}\n{}",
        logs()
    );
    assert!(
        old_alive,
        "the old process left before its streams ended:\n{}",
        logs()
    );
    assert!(exited, "the old process never exited:\n{}", logs());
    assert!(
        device,
        "the TUN device went with the old process:\n{}",
        logs()
    );
    assert!(
        routes.contains("10.96.0.0/12"),
        "routes after the old process: {routes:?}"
    );
    assert_eq!(served_after_exit, Ok(affine), "{}", logs());
    assert!(udp_after_exit.is_some(), "{}", logs());
    assert!(echo_after_exit, "{}", logs());
}

/// A new process that dies mid-handover, after it attached queues to the
/// device and got the inventory but before it said Ready, leaves the old
/// one serving its ClusterIPs: the test plays that process (its queues
/// attached, then closed with the conversation). Root and /dev/net/tun.
#[test]
fn a_new_process_dying_mid_handover_leaves_the_old_one_serving_its_clusterips() {
    let Some(sc) = TunScene::setup() else {
        return;
    };
    let logs = tempfile::tempdir().unwrap();
    let (old, affine) = sc.start(&logs.path().join("old.log"));
    let streams =
        sc.t.on_node_thread(|| Streams::start(vip(ECHO_VIP, 7), STREAMS));
    let (conn, inv, _) = begin_handover(&old.handover);
    let Message::Inventory { tun: Some(tun), .. } = inv else {
        panic!("no TUN device in the inventory: {inv:?}")
    };
    assert_eq!((tun.name.as_str(), tun.inboxes), ("ringvip0", 2));
    let name = tun.name.clone();
    let queues = sc.t.on_node_thread(move || {
        ringvip::dataplane::tun::Tun::open_queues(&name, 2).expect("attach to the device")
    });
    // It dies: its queues and the conversation close.
    drop(queues);
    drop(conn);
    let (_, after) = sc.request();
    let udp = sc.udp_once();
    let (echoes, broken) = streams.finish();
    println!(
        "FIGURE new process dead mid-handover (ClusterIP, TUN): first request after {after:?}, \
         UDP answered by {udp:?}; {STREAMS} streams: {echoes} echoes, {} broken",
        broken.len()
    );
    assert_eq!(after, Ok(affine), "{}", old.log());
    assert!(udp.is_some(), "{}", old.log());
    assert!(
        broken.is_empty(),
        "broken streams: {broken:?}\n{}",
        old.log()
    );
}

/// The old process killed right after the handover: the new one serves the
/// first new connection and UDP flow, and holds the device and its routes.
/// Root and /dev/net/tun.
#[test]
fn the_old_process_killed_right_after_a_tun_handover_leaves_the_new_one_serving() {
    let Some(sc) = TunScene::setup() else {
        return;
    };
    let logs = tempfile::tempdir().unwrap();
    let (mut old, affine) = sc.start(&logs.path().join("old.log"));
    let new = sc.successor(&old, &logs.path().join("new.log"));
    old.signal(libc::SIGKILL);
    assert!(old.wait_exit(Duration::from_secs(5)));
    let (_, after) = sc.request();
    let udp = sc.udp_once();
    let (device, routes) = sc.device_and_route();
    println!(
        "FIGURE old process killed after a handover (ClusterIP, TUN): first request {after:?}, \
         UDP answered by {udp:?}, device kept {device}"
    );
    assert_eq!(after, Ok(affine), "{}", new.log());
    assert!(udp.is_some(), "{}", new.log());
    assert!(device, "{}", new.log());
    assert!(routes.contains("10.96.0.0/12"), "{routes:?}");
}

#[test]
fn a_second_new_process_gives_way_with_a_clear_error() {
    let (old, front, _be) = one_web();
    let (conn, _, _) = begin_handover(&old.handover);
    // A real second process arrives while the first is taking over.
    let (cmd, dir) = old.successor_command();
    let err = refused_successor(&old, cmd, &dir);
    let want = format!(
        "is already being taken over by process {}",
        std::process::id()
    );
    assert!(err.contains(&want), "{err}");
    assert_eq!(http_get(front).unwrap(), "backend-1", "{}", old.log());
    drop(conn);
    assert_eq!(http_get(front).unwrap(), "backend-1", "{}", old.log());
}

#[test]
fn a_missing_or_stale_handover_socket_is_a_fresh_start() {
    let net = Loopback::take();
    let be = Backend::start(net.addr(1, free_port()), "1", Mode::Http);
    let dir = tempfile::tempdir().unwrap();
    let m = |port| nodeport_service("web", port, be.addr.port(), &[net.ip(1)], "");
    // No file, in a directory that does not exist yet.
    let missing = dir.path().join("run/ringvip/handover.sock");
    let port = free_port();
    let rv = Ringvip::start(&m(port), &["--handover", missing.to_str().unwrap()]);
    assert_eq!(http_get(np(port)).unwrap(), "backend-1", "{}", rv.log());
    assert!(rv.log().contains("no handover socket at"), "{}", rv.log());
    // It listens there now, for the next one.
    assert!(UnixStream::connect(&missing).is_ok(), "{}", rv.log());
    drop(rv);
    // A socket file nobody listens on, as a killed process leaves it.
    let stale = dir.path().join("stale.sock");
    drop(std::os::unix::net::UnixListener::bind(&stale).unwrap());
    let port = free_port();
    let rv = Ringvip::start(&m(port), &["--handover", stale.to_str().unwrap()]);
    assert_eq!(http_get(np(port)).unwrap(), "backend-1", "{}", rv.log());
    assert!(
        rv.log().contains("stale handover socket at"),
        "{}",
        rv.log()
    );
    assert!(UnixStream::connect(&stale).is_ok(), "{}", rv.log());
}

/// Also covers the healthCheckNodePort server (externalTrafficPolicy:
/// Local): its listener is handed over like the others (bound afresh, it
/// would have failed with the port taken, and not been retried).
#[test]
fn the_old_process_killed_right_after_the_handover_leaves_the_new_one_serving() {
    let net = Loopback::take();
    let be = Backend::start(net.addr(1, free_port()), "1", Mode::Http);
    let (port, hc) = (free_port(), free_port());
    let spec = format!("  externalTrafficPolicy: Local\n  healthCheckNodePort: {hc}\n");
    let m = nodeport_service("lb", port, be.addr.port(), &[net.ip(1)], &spec)
        .replace("type: NodePort", "type: LoadBalancer");
    let mut old = Ringvip::start(&m, &[]);
    assert!(
        admin_get(np(hc), "/").starts_with("HTTP/1.1 200"),
        "{}",
        old.log()
    );
    let new = old.successor(&[], "handover complete");
    old.signal(libc::SIGKILL);
    assert!(old.wait_exit(Duration::from_secs(5)));
    assert_eq!(http_get(np(port)).unwrap(), "backend-1", "{}", new.log());
    assert!(admin_get(new.health, "/healthz").starts_with("HTTP/1.1 200"));
    let r = admin_get(np(hc), "/");
    assert!(
        r.starts_with("HTTP/1.1 200") && r.contains("\"localEndpoints\":1"),
        "{r}\n{}",
        new.log()
    );
}

// ---- the operator's ways in -------------------------------------------------------

/// The pid in the `MAINPID=` of a notify message, with READY=1 required.
fn main_pid(msg: &str) -> Option<u32> {
    if !msg.lines().any(|l| l == "READY=1") {
        return None;
    }
    msg.lines()
        .find_map(|l| l.strip_prefix("MAINPID=")?.parse().ok())
}

/// `config/ringvip.service`'s ExecStart and ExecReload command lines, run by
/// hand as systemd would (the binary, manifests and handover paths made this
/// test's; `--no-tun` and the suite's shared settings added), with a notify
/// socket standing in for systemd's: the reload's new process takes over and
/// becomes the unit's main pid, and the first one exits.
#[test]
fn the_systemd_units_reload_hands_over_and_moves_the_main_pid() {
    let unit = include_str!("../config/ringvip.service");
    let line = |key: &str| {
        unit.lines()
            .find_map(|l| l.strip_prefix(key))
            .unwrap_or_else(|| panic!("no {key} in the unit"))
            .to_string()
    };
    assert_eq!(line("Type="), "notify");
    assert_eq!(
        line("NotifyAccess="),
        "all",
        "the reload's process is not the one started"
    );
    assert_eq!(
        line("RuntimeDirectory="),
        "ringvip",
        "/run/ringvip, the socket's directory"
    );
    let (start, reload) = (line("ExecStart="), line("ExecReload="));

    let net = Loopback::take();
    let be = Backend::start(net.addr(1, free_port()), "1", Mode::Http);
    let port = free_port();
    let dir = tempfile::tempdir().unwrap();
    let manifests = dir.path().join("manifests");
    std::fs::create_dir(&manifests).unwrap();
    let m = nodeport_service("web", port, be.addr.port(), &[net.ip(1)], "");
    std::fs::write(manifests.join("web.yaml"), m).unwrap();
    let handover = dir.path().join("run/handover.sock");
    let health = SocketAddr::from((Ipv4Addr::LOCALHOST, free_port()));
    let metrics = SocketAddr::from((Ipv4Addr::LOCALHOST, free_port()));
    let ours = |cmd: &str| {
        let run = format!(
            "{} run --no-tun {}",
            bin(),
            shared_args(health, metrics).join(" ")
        );
        cmd.replace("/usr/local/bin/ringvip run", &run)
            .replace("/etc/ringvip/manifests", manifests.to_str().unwrap())
            .replace("/run/ringvip/handover.sock", handover.to_str().unwrap())
    };
    let notify_path = dir.path().join("notify");
    let notify = std::os::unix::net::UnixDatagram::bind(&notify_path).unwrap();
    notify
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let next_main_pid = || {
        let mut buf = [0u8; 256];
        let n = notify.recv(&mut buf).expect("a notify message");
        let msg = String::from_utf8_lossy(&buf[..n]).to_string();
        main_pid(&msg).unwrap_or_else(|| panic!("not READY=1 with MAINPID=: {msg:?}"))
    };
    let log = |name: &str| std::fs::File::create(dir.path().join(name)).unwrap();
    let read_log = |name: &str| std::fs::read_to_string(dir.path().join(name)).unwrap_or_default();

    // ExecStart: systemd splits it into words and execs it; so does sh here.
    let mut first = std::process::Command::new("/bin/sh")
        .args(["-c", &format!("exec {}", ours(&start))])
        .env("NOTIFY_SOCKET", &notify_path)
        .env("RINGVIP_LOG", "info")
        .stderr(log("first.log"))
        .spawn()
        .unwrap();
    assert_eq!(next_main_pid(), first.id(), "{}", read_log("first.log"));
    assert_eq!(http_get(np(port)).unwrap(), "backend-1");

    // ExecReload: returns at once, its new process in the background.
    let status = std::process::Command::new("/bin/sh")
        .args(["-c", &ours(&reload)])
        .env("NOTIFY_SOCKET", &notify_path)
        .env("RINGVIP_LOG", "info")
        .stderr(log("second.log"))
        .status()
        .unwrap();
    assert!(status.success());
    let second = next_main_pid();
    assert_ne!(second, first.id());
    // Kill the new process however the test ends.
    struct Kill(u32);
    impl Drop for Kill {
        fn drop(&mut self) {
            // SAFETY: signals only the process this test started.
            unsafe { libc::kill(self.0 as libc::pid_t, libc::SIGKILL) };
        }
    }
    let _second = Kill(second);
    assert!(
        read_log("second.log").contains("handover complete"),
        "{}",
        read_log("second.log")
    );
    assert_eq!(
        http_get(np(port)).unwrap(),
        "backend-1",
        "{}",
        read_log("second.log")
    );
    // The first process had nothing left to relay: it exits.
    let mut exited = None;
    wait_until(Duration::from_secs(10), || {
        exited = first.try_wait().unwrap();
        exited.is_some()
    });
    if exited.is_none() {
        let _ = first.kill();
    }
    assert!(
        exited.is_some_and(|s| s.success()),
        "{exited:?}: {}",
        read_log("first.log")
    );
}

/// In a pod (`--linger-after-handover`, as config/daemonset.yaml runs it) the
/// old process does not exit once drained, which would restart its container
/// and take the node back: it waits for its pod's deletion (SIGTERM).
#[test]
fn a_lingering_old_process_waits_for_sigterm_after_the_handover() {
    let net = Loopback::take();
    let be = Backend::start(net.addr(1, free_port()), "1", Mode::Http);
    let port = free_port();
    let m = nodeport_service("web", port, be.addr.port(), &[net.ip(1)], "");
    let mut old = Ringvip::start(&m, &["--linger-after-handover"]);
    let new = old.successor(&[], "handover complete");
    // A precondition: the old process has drained (nothing was open).
    assert!(
        wait_until(Duration::from_secs(10), || old
            .log()
            .contains("waiting for SIGTERM")),
        "{}",
        old.log()
    );
    assert!(
        !old.wait_exit(Duration::from_millis(300)),
        "exited: {}",
        old.log()
    );
    assert_eq!(http_get(np(port)).unwrap(), "backend-1", "{}", new.log());
    old.sigterm();
    assert!(old.wait_exit(Duration::from_secs(5)), "{}", old.log());
}

/// A new process started with `--no-tun` cannot take the ClusterIPs over
/// from one capturing them: it exits saying so before anything changes
/// hands, and the running one serves on. Root and /dev/net/tun.
#[test]
fn a_new_process_without_a_tun_does_not_take_over_clusterips() {
    let Some(sc) = TunScene::setup() else {
        return;
    };
    let logs = tempfile::tempdir().unwrap();
    let (old, affine) = sc.start(&logs.path().join("old.log"));
    let (cmd, dir) = old.successor_command();
    let err = refused_successor(&old, cmd, &dir);
    assert!(
        err.contains("captures ClusterIPs on TUN device ringvip0, which this process (--no-tun) could not take over"),
        "{err}"
    );
    let (_, after) = sc.request();
    assert_eq!(after, Ok(affine), "{}", old.log());
}
