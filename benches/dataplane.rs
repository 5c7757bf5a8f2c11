//! The data path's hot pieces, each alone:
//! - `flow_table/*`: the UDP flow table (lookup of an existing flow among
//!   10,000, and the once-a-second idle sweep over 10,000);
//! - `tun/classify_*`: deciding what a packet from the TUN is;
//! - `tun/udp_taken_32_datagrams_8_flows`: holding a round's UDP datagrams
//!   and handing them over per flow as runs (`tun::flows::Taken`; the
//!   `UDP_SEGMENT` sends themselves are the harness's to measure);
//! - `tun/smoltcp_pair_*`: bulk TCP through ringvip's smoltcp stack settings,
//!   a client interface and ringvip's any-IP `Stack` joined by in-memory
//!   queues (both ends are smoltcp, so this is twice the stack's cost per byte);
//! - `relay/echo_64k`: the kernel-socket relay (the io_uring engine) on
//!   loopback, 64 KiB sent through it to an echo backend and back;
//! - `engine/bufring_recycle`: a buffer back to the provided buffer ring;
//! - `engine/accept_to_connect`: a client's connect to the backend's accept
//!   through the engine, on loopback;
//! - `engine/udp_round_trip`: a 64-byte datagram through the engine's UDP
//!   path to an echo backend and the reply back, on loopback (one flow);
//! - `tun/*`: a TUN queue's reads and writes, 64 small packets a batch, in
//!   a network namespace of the bench's own (needs root): one `readv(2)` /
//!   `writev(2)` per packet (`*_each`, as the driver did) against the
//!   driver's io_uring `TunIo` (`*_uring`: 16 reads in flight, a batch of
//!   writes per submit);
//! - `session/*`: what a relayed connection costs for metrics (port, frontend
//!   and endpoint counters) and, with `--access-log`, its record's hand-over.
//!
//! Run: cargo bench --bench dataplane

use std::hint::black_box;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use std::sync::Arc;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use std::io::{Read, Write};

use ringvip::access_log::{self, End};
use ringvip::config::LogFormat;
use ringvip::dataplane::engine::bufring::BufRing;
use ringvip::dataplane::session::Session;
use ringvip::dataplane::tun::device::QueueDevice;
use ringvip::dataplane::tun::flows::Taken;
use ringvip::dataplane::tun::stack::Stack;
use ringvip::dataplane::tun::uring::{Done, TunIo};
use ringvip::dataplane::tun::{classify, udp_packet};
use ringvip::dataplane::tun::{Tun, TunSettings};
use ringvip::dataplane::udp::{FlowEntry, FlowTable};
use ringvip::dataplane::Shared;
use ringvip::testing::engine::Proxy;
use ringvip::testing::tun::{ingest_offline_queued, sample_snapshot};
use smoltcp::iface::{Config, Interface, SocketSet};
use smoltcp::socket::tcp;
use smoltcp::time::Instant as SmolInstant;
use smoltcp::wire::{HardwareAddress, IpAddress, IpCidr, Ipv4Address};

fn client(i: u32) -> SocketAddr {
    let [a, b, c, d] = (0x0a01_0000 + i).to_be_bytes();
    SocketAddr::from(([a, b, c, d], 40_000))
}

fn flow_table(c: &mut Criterion) {
    let now = Instant::now();
    let mut table = FlowTable::new(Duration::from_secs(30), 65_536);
    for i in 0..10_000 {
        let e = FlowEntry {
            endpoint: SocketAddr::from(([10, 0, 0, 1], 53)),
            last_seen: now,
            generation: 1,
            io: (),
        };
        let _ = table.insert(client(i), e);
    }
    let hit = client(4_321);
    c.bench_function("flow_table/lookup_hit_10k", |b| {
        b.iter(|| table.get_mut(black_box(&hit)).is_some())
    });
    // Nothing is idle yet: the sweep walks every flow and keeps them all.
    c.bench_function("flow_table/sweep_10k", |b| {
        b.iter(|| table.expire(black_box(now)).len())
    });
}

fn classify_bench(c: &mut Criterion) {
    let snap = sample_snapshot(true);
    let mut udp = Vec::new();
    let _ = udp_packet(
        "10.1.0.5:5000".parse().unwrap(),
        "10.96.0.10:53".parse().unwrap(),
        b"query",
        &mut udp,
    );
    c.bench_function("tun/classify_udp", |b| {
        b.iter(|| {
            matches!(
                classify(&snap, black_box(&udp)),
                ringvip::dataplane::tun::Classified::Udp { .. }
            )
        })
    });
}

/// A smoltcp client interface at 10.1.0.5 talking to 10.96.0.10:80 through
/// ringvip's `Stack`; packets are moved between the two by hand.
struct Pair {
    stack: Stack,
    iface: Interface,
    dev: QueueDevice,
    sockets: SocketSet<'static>,
    client: smoltcp::iface::SocketHandle,
    server: Option<ringvip::dataplane::tun::conns::ConnSocket>,
    snap: ringvip::state::Snapshot,
}

impl Pair {
    fn new(mtu: usize) -> Pair {
        let settings = TunSettings {
            mtu,
            ..TunSettings::default()
        };
        let mut dev = QueueDevice::new(mtu, 4096);
        let mut iface = Interface::new(
            Config::new(HardwareAddress::Ip),
            &mut dev,
            SmolInstant::now(),
        );
        iface.update_ip_addrs(|a| {
            let _ = a.push(IpCidr::new(IpAddress::v4(10, 1, 0, 5), 16));
        });
        let _ = iface
            .routes_mut()
            .add_default_ipv4_route(Ipv4Address::new(10, 1, 0, 1));
        let mut sockets = SocketSet::new(Vec::new());
        let size = settings.socket_buffer;
        let mut s = tcp::Socket::new(
            tcp::SocketBuffer::new(vec![0; size]),
            tcp::SocketBuffer::new(vec![0; size]),
        );
        s.set_nagle_enabled(false);
        s.set_ack_delay(None);
        s.connect(iface.context(), (IpAddress::v4(10, 96, 0, 10), 80), 40_000)
            .unwrap();
        let client = sockets.add(s);
        let mut p = Pair {
            stack: Stack::new(settings),
            iface,
            dev,
            sockets,
            client,
            server: None,
            snap: sample_snapshot(true),
        };
        // Handshake: the SYN goes through the classifier and is accepted as if
        // the backend had answered at once.
        p.iface.poll(SmolInstant::now(), &mut p.dev, &mut p.sockets);
        while let Some(syn) = p.dev.pop_tx() {
            ingest_offline_queued(&mut p.stack, &p.snap, &syn);
        }
        for _ in 0..4 {
            p.exchange();
        }
        let key = (
            "10.1.0.5:40000".parse().unwrap(),
            "10.96.0.10:80".parse().unwrap(),
        );
        p.server = Some(p.stack.connection(&key).expect("accepted socket"));
        assert!(p.sockets.get::<tcp::Socket>(p.client).may_send());
        p
    }

    /// Moves packets both ways once and lets both stacks react.
    fn exchange(&mut self) {
        let now = SmolInstant::now();
        self.iface.poll(now, &mut self.dev, &mut self.sockets);
        while let Some(p) = self.dev.pop_tx() {
            self.stack.push_rx(p);
        }
        self.stack.poll_at(now);
        while let Some(p) = self.stack.dev.pop_tx() {
            self.dev.push_rx(p);
        }
        self.iface.poll(now, &mut self.dev, &mut self.sockets);
    }

    /// Sends `n` bytes client → ringvip and reads them out of ringvip's socket.
    fn transfer(&mut self, n: usize, chunk: &[u8]) {
        let mut sent = 0;
        let mut got = 0;
        while got < n {
            if sent < n {
                let s = self.sockets.get_mut::<tcp::Socket>(self.client);
                sent += s
                    .send_slice(&chunk[..chunk.len().min(n - sent)])
                    .unwrap_or(0);
            }
            self.exchange();
            let s = self.server.and_then(|c| self.stack.tcp(c)).unwrap();
            while let Ok(k) = s.recv(|b| (b.len(), b.len())) {
                if k == 0 {
                    break;
                }
                got += k;
            }
        }
    }
}

fn smoltcp_pair(c: &mut Criterion) {
    let mut g = c.benchmark_group("tun");
    const N: usize = 4 << 20;
    g.throughput(Throughput::Bytes(N as u64));
    g.sample_size(10);
    let chunk = vec![0x5a; 256 * 1024];
    for mtu in [1500usize, 65_535] {
        let mut pair = Pair::new(mtu);
        g.bench_function(format!("smoltcp_pair_mtu{mtu}_4MiB"), |b| {
            b.iter(|| pair.transfer(N, &chunk))
        });
    }
    g.finish();
}

/// A round of the UDP benchmark's shape: 8 flows, 4 datagrams of 64 bytes
/// each, interleaved as they arrive, held and handed over as 8 runs.
fn udp_taken(c: &mut Criterion) {
    let mut taken = Taken::<u8>::default();
    let datagram = [0x5a_u8; 64];
    c.bench_function("tun/udp_taken_32_datagrams_8_flows", |b| {
        b.iter(|| {
            for _ in 0..4 {
                for flow in 0..8u8 {
                    taken.push(flow, &datagram);
                }
            }
            let mut runs = 0;
            taken.drain(|k, bytes, size, count| {
                black_box((k, bytes, size, count));
                runs += 1;
            });
            runs
        })
    });
}

/// What a TUN driver round costs the stack when nothing is due: a poll and
/// the next timer, with one established connection (the rounds of a quiet
/// or lightly loaded thread are mostly this).
fn quiet_poll(c: &mut Criterion) {
    let mut pair = Pair::new(1500);
    c.bench_function("tun/poll_quiet_stack", |b| {
        b.iter(|| {
            pair.stack.poll();
            std::hint::black_box(pair.stack.next_due())
        })
    });
}

/// An echo server on loopback (a thread per connection, blocking).
fn echo_server() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { continue };
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 64 * 1024];
                loop {
                    match s.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            if s.write_all(&buf[..n]).is_err() {
                                break;
                            }
                        }
                    }
                }
            });
        }
    });
    addr
}

/// The engine's relay on loopback: 64 KiB written through it to an echo
/// backend and read back (both directions, one connection).
fn relay(c: &mut Criterion) {
    let echo = echo_server();
    let proxy = Proxy::start(echo);
    let mut conn = std::net::TcpStream::connect(proxy.front).unwrap();
    conn.set_nodelay(true).unwrap();
    let out = vec![0x42u8; 64 * 1024];
    let mut back = vec![0u8; 64 * 1024];
    let mut g = c.benchmark_group("relay");
    g.throughput(Throughput::Bytes(2 * 64 * 1024));
    g.bench_function("echo_64k", |b| {
        b.iter(|| {
            conn.write_all(&out).unwrap();
            conn.read_exact(&mut back).unwrap();
        })
    });
    g.finish();
}

/// The engine's pieces: a buffer given back to the ring and published (what
/// each relayed chunk costs on top of its receive and send), a new
/// connection from the client's connect to the backend's accept through the
/// engine (multishot accept, resolve, admit, linked connect), and a UDP
/// request and its reply through the engine, on loopback.
fn engine(c: &mut Criterion) {
    let mut g = c.benchmark_group("engine");
    let mut ring = BufRing::new(512, 64 * 1024, 0).unwrap();
    let mut bid = 0u16;
    g.bench_function("bufring_recycle", |b| {
        b.iter(|| {
            ring.taken();
            ring.recycle(black_box(bid));
            ring.publish();
            bid = (bid + 1) & 511;
        })
    });
    let backend = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let proxy = Proxy::start(backend.local_addr().unwrap());
    g.bench_function("accept_to_connect", |b| {
        b.iter(|| {
            let client = std::net::TcpStream::connect(proxy.front).unwrap();
            let (accepted, _) = backend.accept().unwrap();
            // Closed with RST on both sides: no TIME_WAIT piles up over the
            // iterations.
            for s in [&client, &accepted] {
                socket2::SockRef::from(s)
                    .set_linger(Some(Duration::ZERO))
                    .unwrap();
            }
        })
    });
    let echo = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let echo_addr = echo.local_addr().unwrap();
    std::thread::spawn(move || {
        let mut buf = [0u8; 2048];
        // Ends with the process (the bench's last user of the socket).
        while let Ok((n, from)) = echo.recv_from(&mut buf) {
            let _ = echo.send_to(&buf[..n], from);
        }
    });
    let udp = Proxy::start_of(ringvip::model::Protocol::Udp, echo_addr);
    let client = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    client.connect(udp.front).unwrap();
    client
        .set_read_timeout(Some(Duration::from_secs(2)))
        .unwrap();
    let msg = [7u8; 64];
    let mut buf = [0u8; 2048];
    g.bench_function("udp_round_trip", |b| {
        b.iter(|| {
            client.send(&msg).unwrap();
            let n = client.recv(&mut buf).unwrap();
            assert_eq!(n, msg.len());
        })
    });
    g.finish();
}

/// What a relayed connection adds on the data plane for metrics and the
/// access log: open a session (port, frontend and endpoint counters), count
/// two chunks each way, end and drop it; with the access log on, the drop
/// also hands a record to the writer thread (writing to a sink here; when it
/// falls behind, records are dropped and counted, never waited for).
fn session(c: &mut Criterion) {
    let snap = sample_snapshot(true);
    let fe = snap
        .frontends()
        .find(|(k, _)| k.proto == ringvip::model::Protocol::Tcp && k.addr.is_ipv4())
        .map(|(_, f)| f.clone())
        .unwrap();
    let ep = fe.endpoints[0];
    let client: SocketAddr = "10.1.0.5:40000".parse().unwrap();
    let vip: SocketAddr = "10.96.0.10:80".parse().unwrap();
    let run = |shared: &Arc<Shared>| {
        let s = Session::open(shared, fe.clone(), client, vip, ep);
        s.to_backend(black_box(100));
        s.to_client(black_box(1000));
        s.to_backend(black_box(100));
        s.to_client(black_box(1000));
        s.end(End::Fin);
        drop(s);
    };
    let plain = Shared::new(Default::default());
    c.bench_function("session/open_count_close", |b| b.iter(|| run(&plain)));
    let (log, writer) = access_log::start(
        Box::new(std::io::sink()),
        LogFormat::Json,
        access_log::CAPACITY,
    );
    let dropped = log.dropped().clone();
    let logged = Shared::with_access_log(Default::default(), Some(log));
    c.bench_function("session/open_count_close_access_log", |b| {
        b.iter(|| run(&logged))
    });
    drop(logged);
    writer.finish();
    eprintln!(
        "session/open_count_close_access_log: {} records dropped (writer behind)",
        dropped.get()
    );
}

/// Packets per batch in `tun/*`.
const TUN_BATCH: usize = 64;

#[derive(Clone, Copy)]
enum TunMode {
    ReadEach,
    ReadRing,
    WriteEach,
    WriteRing,
}

/// A thread in a network namespace of its own with a TUN device
/// (10.77.0.1/24): `udp_in` datagrams go from a socket there to 10.77.0.2,
/// out through the TUN, and are read from it; `out` packets are written to
/// the TUN for a socket on 10.77.0.1 and taken from it. Criterion's closures
/// send it a mode and a count and get the time back.
struct TunBench {
    jobs: std::sync::mpsc::Sender<(TunMode, u64)>,
    took: std::sync::mpsc::Receiver<Duration>,
}

impl TunBench {
    fn start() -> Result<TunBench, String> {
        let (jobs, job_rx) = std::sync::mpsc::channel::<(TunMode, u64)>();
        let (took_tx, took) = std::sync::mpsc::channel();
        let (ready_tx, ready) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let setup = || -> Result<_, String> {
                // SAFETY: unshare(2) changes only this thread's namespaces.
                if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
                    return Err(format!("unshare: {}", std::io::Error::last_os_error()));
                }
                let tun = Tun::open_queues("rvbench0", 1)
                    .map_err(|e| e.to_string())?
                    .pop()
                    .ok_or("no queue")?;
                // `ip` runs in this thread's namespace (a child inherits it).
                for args in [
                    &["link", "set", "lo", "up"][..],
                    &["addr", "add", "10.77.0.1/24", "dev", "rvbench0"],
                    &["link", "set", "rvbench0", "up"],
                ] {
                    let ok = std::process::Command::new("ip").args(args).status();
                    if !ok.is_ok_and(|s| s.success()) {
                        return Err(format!("ip {args:?} failed"));
                    }
                }
                Ok(tun)
            };
            let tun = match setup() {
                Ok(t) => t,
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                    return;
                }
            };
            let max = usize::from(u16::MAX) + 40;
            let mut io = TunIo::new(&tun, max).expect("ring");
            let out = std::net::UdpSocket::bind("10.77.0.1:0").expect("sender");
            out.connect("10.77.0.2:9").expect("route");
            let sink = std::net::UdpSocket::bind("10.77.0.1:7000").expect("sink");
            sink.set_nonblocking(true).expect("nonblocking");
            let payload = [7u8; 64];
            let mut packets: Vec<Vec<u8>> = (0..TUN_BATCH)
                .map(|i| {
                    let mut p = Vec::new();
                    let from = SocketAddr::from(([10, 77, 0, 2], 9000 + i as u16));
                    udp_packet(from, "10.77.0.1:7000".parse().unwrap(), &payload, &mut p)
                        .expect("packet");
                    p
                })
                .collect();
            let mut spare: Vec<Vec<u8>> = (0..32).map(|_| Vec::with_capacity(max)).collect();
            let mut buf = Vec::with_capacity(max);
            let mut rbuf = [0u8; 256];
            io.arm(|| spare.pop().unwrap_or_default());
            io.submit().expect("submit");
            let _ = ready_tx.send(Ok(()));
            let drain_sink = |rbuf: &mut [u8]| {
                let mut got = 0;
                while got < TUN_BATCH {
                    if sink.recv(rbuf).is_ok() {
                        got += 1;
                    }
                }
            };
            while let Ok((mode, iters)) = job_rx.recv() {
                let start = Instant::now();
                for _ in 0..iters {
                    match mode {
                        TunMode::ReadEach | TunMode::ReadRing => {
                            for _ in 0..TUN_BATCH {
                                let _ = out.send(&payload);
                            }
                            let mut got = 0;
                            while got < TUN_BATCH {
                                if let TunMode::ReadEach = mode {
                                    if tun.recv(&mut buf, max).is_ok() {
                                        got += 1;
                                    }
                                    continue;
                                }
                                io.complete(|d| {
                                    if let Done::Read(r) = d {
                                        got += 1;
                                        spare.push(r.packet);
                                    }
                                });
                                if got < TUN_BATCH && !io.readable() {
                                    // As the driver does: wait for the
                                    // queue's readiness, then read.
                                    wait_readable(&tun);
                                    io.maybe_readable();
                                }
                                io.arm(|| spare.pop().unwrap_or_default());
                                io.submit().expect("submit");
                            }
                        }
                        TunMode::WriteEach => {
                            for p in &mut packets {
                                tun.send(p, None).expect("writev");
                            }
                            drain_sink(&mut rbuf);
                        }
                        TunMode::WriteRing => {
                            for p in packets.drain(..) {
                                io.write(p, None).expect("a write slot");
                            }
                            while packets.len() < TUN_BATCH {
                                io.submit_and_wait(1).expect("wait");
                                io.complete(|d| {
                                    if let Done::Wrote(p, r) = d {
                                        r.expect("write");
                                        packets.push(p);
                                    }
                                });
                            }
                            drain_sink(&mut rbuf);
                        }
                    }
                }
                if took_tx.send(start.elapsed()).is_err() {
                    return;
                }
            }
        });
        ready.recv().map_err(|e| e.to_string())??;
        Ok(TunBench { jobs, took })
    }

    fn run(&self, mode: TunMode, iters: u64) -> Duration {
        self.jobs.send((mode, iters)).expect("bench thread");
        self.took.recv().expect("bench thread")
    }
}

/// Blocks until the TUN queue has a packet (or a second passed).
fn wait_readable(tun: &Tun) {
    use std::os::fd::AsRawFd;
    let mut pfd = libc::pollfd {
        fd: tun.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one pollfd, ours, for the length of the call.
    unsafe { libc::poll(&mut pfd, 1, 1000) };
}

fn tun_io(c: &mut Criterion) {
    let w = match TunBench::start() {
        Ok(w) => w,
        Err(e) => {
            eprintln!("tun/*: skipped, needs root for a network namespace and /dev/net/tun ({e})");
            return;
        }
    };
    let mut g = c.benchmark_group("tun");
    g.throughput(Throughput::Elements(TUN_BATCH as u64));
    for (name, mode) in [
        ("udp_in_64_each", TunMode::ReadEach),
        ("udp_in_64_uring", TunMode::ReadRing),
        ("out_64_each", TunMode::WriteEach),
        ("out_64_uring", TunMode::WriteRing),
    ] {
        g.bench_function(name, |b| b.iter_custom(|iters| w.run(mode, iters)));
    }
    g.finish();
}

criterion_group!(
    benches,
    flow_table,
    classify_bench,
    smoltcp_pair,
    quiet_poll,
    udp_taken,
    relay,
    engine,
    tun_io,
    session
);
criterion_main!(benches);
