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
    fn start(addr: SocketAddr, n: usize) -> Flows {
        let stop = Arc::new(AtomicBool::new(false));
        let threads = (0..n)
            .map(|i| {
                let s = UdpSocket::bind("127.0.0.1:0").unwrap();
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
    let flows = Flows::start(np(p_udp), UDP_FLOWS);
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
    let Message::Inventory { sockets, .. } = &inv else {
        panic!("expected the inventory, got {inv:?}");
    };
    let fds = wire::recv_fds(&conn, sockets.len()).unwrap();
    (conn, inv.clone(), fds.len())
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

/// A ringvip capturing ClusterIPs on its TUN device refuses to hand over
/// (its ClusterIP flows would end with it, the TUN not being carried yet):
/// the new process exits saying why, and the ClusterIP is served on. Root
/// and /dev/net/tun: namespaces of its own.
#[test]
fn a_process_with_a_tun_device_refuses_and_keeps_serving_its_clusterips() {
    let Some(t) = netns::Topology::setup(&[]) else {
        return;
    };
    let be = SocketAddr::from((t.pod_ip(2), free_port()));
    let _be = t.backend(be, "1", Mode::Http);
    let m = clusterip(
        "web",
        "10.96.0.10",
        80,
        "TCP",
        be.port(),
        &[t.pod_ip(2).into()],
        "",
    );
    let old = t.launch(&m, &[]);
    let url = "http://10.96.0.10/";
    assert_eq!(
        t.curl(url),
        (true, "backend-1".to_string()),
        "{}",
        old.log()
    );
    let (cmd, dir) = old.successor_command();
    let err = refused_successor(&old, cmd, &dir);
    assert!(
        err.contains("refused the handover: it captures ClusterIPs on TUN device"),
        "{err}"
    );
    assert_eq!(
        t.curl(url),
        (true, "backend-1".to_string()),
        "{}",
        old.log()
    );
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
