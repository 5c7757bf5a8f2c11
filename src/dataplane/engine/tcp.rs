//! The kernel-socket TCP path on one thread's ring: multishot accept per
//! listener; resolve, admit and connect (with [`Retry`]'s policy) as a
//! connect linked to its timeout; then each direction as a receive from the
//! buffer ring and a send of what it got (after its first [`SPLICE_AFTER`]
//! bytes, by splice through a pipe pair), under the close policy of
//! [`crate::dataplane::relay`]: a FIN ends one direction (passed on as a
//! shutdown of writing), a reset or error on either side resets both, and
//! so does the idle timeout.
//!
//! Each direction keeps at most one receive and one send in flight and one
//! received chunk waiting: a slow reader stops the receives from its peer
//! (back-pressure), and a quiet connection holds no buffer. Single-shot
//! receives rather than multishot: a multishot receive keeps taking buffers
//! while the send side is blocked, so flow control would need a cancel and
//! a re-arm per stall; with single shots it is the order of submissions.
//!
//! A connection's entry lives until its last operation completed (counted in
//! `inflight`), so no completion ever finds its index reused. Once it is
//! done, the close of both its sockets goes through the ring too, with the
//! operations its last completions lead to: one system call for all of them.

use std::cell::RefCell;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, OwnedFd, RawFd};
use std::rc::{Rc, Weak};
use std::sync::Arc;
use std::time::{Duration, Instant};

use io_uring::cqueue;
use io_uring::types::Timespec;
use rand::rngs::SmallRng;
use socket2::{Domain, SockAddr, SockRef, Socket, Type};

use super::bufring::BufRing;
use super::ops;
use super::ring::{Op, Ring, Token};
use super::slots::Slots;
use super::splice::{self, Pipe, Pool};
use super::udp::Udp;
use crate::access_log::End;
use crate::dataplane::connect::Retry;
use crate::dataplane::flow::{resolve, FlowKey, Verdict};
use crate::dataplane::limits::{IdleCheck, Kept};
use crate::dataplane::proxy_protocol::{encode, HeaderBuf, MAX_HEADER_LEN};
use crate::dataplane::session::{self, Session};
use crate::dataplane::Shared;
use crate::model::Protocol;
use crate::state::Frontend;
use crate::telemetry::ConnectFailure;

/// Moves a splice relay makes in one go before it lets other connections
/// run (each moves up to a pipe's size).
const PUMP_ROUNDS: usize = 16;

/// Bytes a direction moves through the buffer ring before it switches to
/// splice (BENCHMARKS.md, "Splice for bulk, after the first bytes"):
/// short exchanges cost less as a receive and a send on the ring, bulk
/// costs less through a pipe.
pub const SPLICE_AFTER: u64 = 256 * 1024;

/// How long a listener waits before accepting again after the process ran
/// out of descriptors or memory (instead of spinning on the error).
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// Sizes of one thread's engine.
#[derive(Debug, Clone, Copy)]
pub struct Sizes {
    /// Submission queue entries.
    pub ring_entries: u32,
    /// Buffers in the buffer ring (a power of two).
    pub buffers: u32,
    /// Bytes per buffer (the largest single receive).
    pub buf_size: u32,
    /// A direction that moved this many bytes by buffer-ring receives and
    /// sends moves the rest by splice through a pipe pair (`Some(0)`: from
    /// the first byte; `None`: never). An internal switch for measuring:
    /// the environment variable `RINGVIP_SPLICE` is `1` (from the first
    /// byte), `0` (never), or unset ([`SPLICE_AFTER`]).
    pub splice_after: Option<u64>,
}

impl Default for Sizes {
    fn default() -> Self {
        // 512 × 64 KiB: 32 MiB of address space per thread, resident only
        // once bulk traffic has used it; 256 directions busy at once before
        // receives wait for a buffer. The extra 256 bytes hold what a UDP
        // receive puts before its payload (header, address, control
        // message), so the largest datagram or GRO run still fits.
        Self {
            ring_entries: 1024,
            buffers: 512,
            buf_size: 64 * 1024 + 256,
            splice_after: match std::env::var_os("RINGVIP_SPLICE") {
                Some(v) if v == "1" => Some(0),
                Some(v) if v == "0" => None,
                _ => Some(SPLICE_AFTER),
            },
        }
    }
}

/// A listener's accept loop.
struct Listener {
    /// The ring's own descriptor of the listening socket.
    fd: OwnedFd,
    local: SocketAddr,
    /// Set by [`Tcp::stop_listener`]: the next final completion removes it.
    stopping: bool,
    backoff: Timespec,
}

/// One direction's chunk: buffer `bid`, bytes `off..len` still to send.
#[derive(Debug, Clone, Copy)]
struct Chunk {
    bid: u16,
    off: u32,
    len: u32,
}

/// One direction of a relay.
#[derive(Debug, Default)]
struct Half {
    recv_armed: bool,
    sending: Option<Chunk>,
    queued: Option<Chunk>,
    /// The sender's FIN was read; passed on once what is queued is sent.
    eof: bool,
    done: bool,
    /// Bytes moved by buffer-ring receives and sends.
    moved: u64,
    /// The direction moves its bytes by splice now.
    spliced: bool,
    /// Splice relay: the pipe holding this direction's bytes in flight
    /// (none while idle), and the readiness polls in flight.
    pipe: Option<Pipe>,
    poll_in: bool,
    poll_out: bool,
}

impl Half {
    /// Whether this direction, still on the ring, has moved enough to go on
    /// by splice (after `after` bytes): it then takes no new receive, and
    /// switches once what it has in flight is done ([`Tcp::next_move`]).
    fn due(&self, after: Option<u64>) -> bool {
        !self.spliced && after.is_some_and(|a| self.moved >= a)
    }
}

/// Where a connection is.
enum Phase {
    /// Trying backends; boxed so an established connection does not carry it.
    Dialing(Box<Dial>),
    Relaying,
}

/// A connect in flight: the socket, and the address and timeout the kernel
/// reads when it takes the submission.
struct Dial {
    retry: Retry,
    sock: Option<OwnedFd>,
    ep: SocketAddr,
    addr: SockAddr,
    ts: Timespec,
}

/// A connection's place under the connection limits, given back when the
/// connection goes.
struct Admission {
    shared: Arc<Shared>,
    kept: Option<Kept>,
}

impl Drop for Admission {
    fn drop(&mut self) {
        if let Some(k) = self.kept.take() {
            self.shared.limits.release(k);
        }
    }
}

/// A client connection and, once connected, its backend.
struct Conn {
    serial: u32,
    client: OwnedFd,
    backend: Option<OwnedFd>,
    peer: SocketAddr,
    local: SocketAddr,
    /// Bytes for the backend before the client's (PROXY header, then what
    /// came with an upstream header), sent from `first_sent` on.
    first: Vec<u8>,
    first_sent: usize,
    fe: Arc<Frontend>,
    /// Held for its drop.
    _admission: Admission,
    session: Option<Session>,
    phase: Phase,
    /// Client → backend.
    up: Half,
    /// Backend → client.
    down: Half,
    inflight: u16,
    /// Receives that moved bytes (the idle check's activity).
    reads: u64,
    idle: IdleCheck,
    /// Set when the relay ends; the entry goes once nothing is in flight.
    end: Option<End>,
}

impl Conn {
    /// Descriptors of direction `d`: (read from, write to).
    fn ends(&self, d: Dir) -> Option<(RawFd, RawFd)> {
        let b = self.backend.as_ref()?.as_raw_fd();
        let c = self.client.as_raw_fd();
        Some(match d {
            Dir::Up => (c, b),
            Dir::Down => (b, c),
        })
    }

    fn half(&mut self, d: Dir) -> &mut Half {
        match d {
            Dir::Up => &mut self.up,
            Dir::Down => &mut self.down,
        }
    }
}

/// A direction of a relay.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Dir {
    /// Client → backend.
    Up,
    /// Backend → client.
    Down,
}

impl Dir {
    /// As a token's `aux`.
    fn aux(self) -> u16 {
        match self {
            Dir::Up => 0,
            Dir::Down => 1,
        }
    }

    fn from_aux(v: u16) -> Self {
        if v == 0 {
            Dir::Up
        } else {
            Dir::Down
        }
    }

    fn recv(self) -> Op {
        match self {
            Dir::Up => Op::RecvClient,
            Dir::Down => Op::RecvBackend,
        }
    }

    fn send(self) -> Op {
        match self {
            Dir::Up => Op::SendBackend,
            Dir::Down => Op::SendClient,
        }
    }
}

/// Closes `fd` with RST instead of FIN.
fn set_linger_zero(fd: RawFd) {
    // SAFETY: `fd` is a live descriptor owned by the caller for this call.
    let b = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
    let _ = SockRef::from(&b).set_linger(Some(Duration::ZERO));
}

/// `fd` (a duplicate of a client socket) as a runtime stream, to read an
/// upstream's PROXY header with the runtime's readiness. The socket stays
/// non-blocking for the engine too: io_uring's socket operations wait by
/// polling whatever the flag says.
fn header_stream(fd: OwnedFd) -> std::io::Result<tokio::net::TcpStream> {
    let s = std::net::TcpStream::from(fd);
    s.set_nonblocking(true)?;
    tokio::net::TcpStream::from_std(s)
}

fn set_nodelay(fd: RawFd) {
    // SAFETY: as above.
    let b = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
    let _ = SockRef::from(&b).set_tcp_nodelay(true);
}

fn peer_of(fd: RawFd) -> Option<SocketAddr> {
    // SAFETY: as above.
    let b = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
    SockRef::from(&b).peer_addr().ok()?.as_socket()
}

/// What a backend of `fe` gets before the client's bytes: `fe`'s PROXY
/// header for a client at `src` that connected to `dst`, then `early` (client
/// bytes that came with an upstream balancer's header). Empty for most.
fn first_bytes(fe: &Frontend, src: SocketAddr, dst: SocketAddr, early: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    if let Some(version) = fe.proxy_protocol {
        let mut buf: HeaderBuf = [0; MAX_HEADER_LEN];
        let n = encode(version, src, dst, &mut buf);
        out.extend_from_slice(buf.get(..n).unwrap_or_default());
    }
    out.extend_from_slice(early);
    out
}

fn timespec(d: Duration) -> Timespec {
    Timespec::new().sec(d.as_secs()).nsec(d.subsec_nanos())
}

/// One thread's TCP engine; see the module documentation.
pub struct Tcp {
    // Field order is drop order: connections and listeners close their
    // descriptors, then the ring goes (cancelling what is left), then the
    // buffers it may have lent.
    conns: Slots<Conn>,
    listeners: Slots<Listener>,
    /// The UDP path, on the same ring and buffers.
    udp: Udp,
    /// Empty pipes of the splice relay.
    pipes: Pool,
    /// When a direction switches to splice ([`Sizes::splice_after`]).
    splice_after: Option<u64>,
    ring: Ring,
    bufs: BufRing,
    shared: Arc<Shared>,
    rng: Rc<RefCell<SmallRng>>,
    /// Directions whose receive found the buffer ring empty: (index,
    /// serial, direction), re-armed as buffers come back.
    starved: Vec<(u32, u32, Dir)>,
    serial: u32,
    cqes: Vec<cqueue::Entry>,
    sweep: Vec<u32>,
    /// The engine itself, for the tasks that read an upstream balancer's
    /// PROXY header and then hand the connection back ([`Tcp::attach`]).
    this: Weak<RefCell<Tcp>>,
}

impl Drop for Tcp {
    fn drop(&mut self) {
        // Closes queued by the last round reach the kernel.
        let _ = self.ring.submit();
        // Sessions end as drains; then no receive may pick a buffer again.
        drop(self.conns.drain());
        self.bufs.unregister(self.ring.uring());
    }
}

impl Tcp {
    /// An engine with its ring and buffer ring, serving nothing yet.
    pub fn new(
        shared: Arc<Shared>,
        rng: Rc<RefCell<SmallRng>>,
        sizes: Sizes,
    ) -> std::io::Result<Self> {
        let ring = Ring::new(sizes.ring_entries)?;
        let mut bufs = BufRing::new(sizes.buffers, sizes.buf_size, 0)
            .map_err(|e| std::io::Error::other(e.to_string()))?;
        bufs.register(ring.uring())?;
        Ok(Self {
            conns: Slots::default(),
            listeners: Slots::default(),
            udp: Udp::new(shared.clone(), rng.clone()),
            pipes: Pool::default(),
            splice_after: sizes.splice_after,
            ring,
            bufs,
            shared,
            rng,
            starved: Vec::new(),
            serial: 0,
            cqes: Vec::with_capacity(256),
            sweep: Vec::new(),
            this: Weak::new(),
        })
    }

    /// Tells the engine its own handle, which connections from an upstream
    /// balancer need (their header is read on the runtime, then they come
    /// back here).
    pub fn attach(engine: &Rc<RefCell<Tcp>>) {
        engine.borrow_mut().this = Rc::downgrade(engine);
    }

    /// The ring's descriptor (readable when completions are waiting).
    pub fn ring_fd(&self) -> RawFd {
        self.ring.as_raw_fd()
    }

    /// The TCP idle timeout the relays follow.
    pub fn idle_timeout(&self) -> Option<Duration> {
        self.shared.limits.idle_timeout
    }

    /// Buffers of the ring not lent to a receive or a send.
    pub fn free_buffers(&self) -> u32 {
        self.bufs.free()
    }

    /// Connections open (dialing or relaying).
    pub fn connections(&self) -> usize {
        self.conns.len()
    }

    /// Directions of open connections that moved on to splice (tests).
    #[cfg(test)]
    fn spliced_directions(&self) -> usize {
        let mut idx = Vec::new();
        self.conns.indices(&mut idx);
        idx.iter()
            .filter_map(|&i| self.conns.get(i))
            .map(|c| usize::from(c.up.spliced) + usize::from(c.down.spliced))
            .sum()
    }

    /// Starts accepting on `fd` (a listening socket, its own descriptor),
    /// connections arriving for `local`. Returns the listener's index.
    pub fn listen(&mut self, fd: OwnedFd, local: SocketAddr) -> u32 {
        let raw = fd.as_raw_fd();
        let id = self.listeners.insert(Listener {
            fd,
            local,
            stopping: false,
            backoff: timespec(ACCEPT_BACKOFF),
        });
        self.ring
            .push(ops::accept_multi(raw), Token::new(Op::Accept, id));
        let _ = self.ring.submit();
        id
    }

    /// Marks listener `id` as closing: its accept ends on the failure the
    /// caller's shutdown of the socket causes, and is not armed again.
    pub fn stop_listener(&mut self, id: u32) {
        if let Some(l) = self.listeners.get_mut(id) {
            l.stopping = true;
        }
    }

    /// Starts receiving datagrams on `fd` (a bound UDP socket, its own
    /// descriptor), arriving for `local`. Returns the listener's index and
    /// serial.
    pub fn listen_udp(&mut self, fd: OwnedFd, local: SocketAddr) -> (u32, u32) {
        let r = self.udp.listen(&mut self.ring, &self.bufs, fd, local);
        let _ = self.ring.submit();
        r
    }

    /// Stops UDP listener `id`: see [`Udp::stop`].
    pub fn stop_udp(&mut self, id: u32) {
        self.udp.stop(&mut self.ring, id);
    }

    /// True once UDP listener `id` of `serial` and its flows are gone.
    pub fn udp_closed(&self, id: u32, serial: u32) -> bool {
        self.udp.closed(id, serial)
    }

    /// Stops receiving on UDP listener `id` without touching its socket
    /// (handed to the next process); its flows keep relaying replies until
    /// they idle out: see [`Udp::release`].
    pub fn release_udp(&mut self, id: u32) {
        self.udp.release(&mut self.ring, id);
    }

    /// Flows of UDP listener `id`.
    pub fn udp_listener_flows(&self, id: u32) -> usize {
        self.udp.listener_flows(id)
    }

    /// Each flow of UDP listener `id`: its client and endpoint.
    pub fn udp_pins(&self, id: u32, each: impl FnMut(SocketAddr, SocketAddr)) {
        self.udp.pins(id, each);
    }

    /// What the engine serves with (snapshot, settings, what the previous
    /// process handed over).
    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// UDP flows open on this thread.
    pub fn udp_flows(&self) -> usize {
        self.udp.flows()
    }

    /// The UDP path's periodic sweep (once a second): see [`Udp::sweep`].
    pub fn udp_sweep(&mut self, now: Instant) {
        self.udp.sweep(&mut self.ring, now);
    }

    /// Stops accepting on listener `id` without touching its socket, which
    /// another process may share (an upgrade's handover): the pending accept
    /// is cancelled, and the ring's descriptor closes once it completes.
    /// Connections still queued stay in the socket for the other process.
    pub fn release_listener(&mut self, id: u32) {
        if let Some(l) = self.listeners.get_mut(id) {
            l.stopping = true;
            let raw = l.fd.as_raw_fd();
            self.ring
                .push(ops::cancel_all(raw), Token::new(Op::Ignore, id));
            let _ = self.ring.submit();
        }
    }

    /// Serves a connection accepted outside the ring (a closing listener's
    /// queue), arrived for `local`.
    pub fn adopt(&mut self, client: OwnedFd, local: SocketAddr) {
        self.accepted(client, local);
        let _ = self.ring.submit();
    }

    /// Handles every completion posted so far and submits what they lead to;
    /// returns how many were handled.
    pub fn poll(&mut self) -> usize {
        let mut handled = 0;
        loop {
            let mut cqes = std::mem::take(&mut self.cqes);
            self.ring.drain(&mut cqes);
            if cqes.is_empty() {
                self.cqes = cqes;
                break;
            }
            handled += cqes.len();
            let now = Instant::now();
            for cqe in cqes.drain(..) {
                self.complete(&cqe, now);
            }
            self.cqes = cqes;
            self.bufs.publish();
            self.rearm_starved();
            self.udp.rearm_starved(&mut self.ring, &self.bufs);
            // Submitting may complete operations at once: loop for those.
            let _ = self.ring.submit();
        }
        handled
    }

    /// One idle check of every relay (every `timeout / CHECKS`): a relay
    /// quiet for four checks in a row is reset both ways.
    pub fn idle_check(&mut self) {
        let mut idx = std::mem::take(&mut self.sweep);
        self.conns.indices(&mut idx);
        for &i in &idx {
            let Some(c) = self.conns.get_mut(i) else {
                continue;
            };
            if c.end.is_some() || !matches!(c.phase, Phase::Relaying) {
                continue;
            }
            if c.idle.check(c.reads) {
                self.shared.limits.hits.tcp_idle_timeout.inc();
                self.reset(i, End::IdleTimeout);
            }
        }
        idx.clear();
        self.sweep = idx;
        let _ = self.ring.submit();
    }

    fn complete(&mut self, cqe: &cqueue::Entry, now: Instant) {
        let Some(t) = Token::unpack(cqe.user_data()) else {
            return;
        };
        let res = cqe.result();
        match t.op {
            Op::UdpRecv | Op::UdpRecvBackend | Op::UdpSendBackend | Op::UdpSendMsg => self
                .udp
                .complete(&mut self.ring, &mut self.bufs, t, cqe, now),
            Op::Accept => self.on_accept(t.index, res, cqueue::more(cqe.flags())),
            Op::AcceptRetry => self.arm_accept(t.index),
            Op::Connect => self.on_connect(t.index, res),
            Op::ConnectTimeout => self.settle(t.index),
            Op::RecvClient => self.on_recv(t.index, Dir::Up, res, cqe.flags()),
            Op::RecvBackend => self.on_recv(t.index, Dir::Down, res, cqe.flags()),
            Op::SendBackend => self.on_send(t.index, Dir::Up, res),
            Op::SendClient => self.on_send(t.index, Dir::Down, res),
            Op::SendFirst => self.on_send_first(t.index, res),
            Op::SpliceIn => self.on_poll(t.index, Dir::from_aux(t.aux), false, res),
            Op::SpliceOut => self.on_poll(t.index, Dir::from_aux(t.aux), true, res),
            // The TUN path's own rings, never this one.
            Op::Ignore | Op::Close | Op::TunRead | Op::TunWrite => {}
        }
    }

    fn on_accept(&mut self, id: u32, res: i32, more: bool) {
        let local = match self.listeners.get(id) {
            Some(l) => l.local,
            None => return,
        };
        if res >= 0 {
            // SAFETY: a successful accept returns a new descriptor we own.
            let fd = unsafe { OwnedFd::from_raw_fd(res) };
            self.accepted(fd, local);
        }
        if more {
            return;
        }
        let Some(l) = self.listeners.get_mut(id) else {
            return;
        };
        if l.stopping {
            self.listeners.remove(id);
            return;
        }
        if matches!(
            -res,
            libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM
        ) {
            tracing::warn!(local = %l.local, error = %std::io::Error::from_raw_os_error(-res), "accept failed");
            let ts = &l.backoff as *const Timespec;
            // SAFETY: the listener (and its timespec) stays until this
            // timer's completion, which is what re-arms or removes it.
            self.ring.push(
                ops::timeout(unsafe { &*ts }),
                Token::new(Op::AcceptRetry, id),
            );
        } else {
            // The kernel ended the multishot (or one accept failed for
            // good): arm it again.
            self.arm_accept(id);
        }
    }

    fn arm_accept(&mut self, id: u32) {
        let Some(l) = self.listeners.get(id) else {
            return;
        };
        if l.stopping {
            self.listeners.remove(id);
            return;
        }
        let raw = l.fd.as_raw_fd();
        self.ring
            .push(ops::accept_multi(raw), Token::new(Op::Accept, id));
    }

    /// A new client connection: resolve, admit, and start dialing (after
    /// its PROXY header when it comes from a listed upstream balancer).
    fn accepted(&mut self, client: OwnedFd, local: SocketAddr) {
        let Some(peer) = peer_of(client.as_raw_fd()) else {
            return; // already gone
        };
        let upstream = &self.shared.upstream;
        if upstream.expects_header(&self.shared.snapshot, peer, local) {
            self.read_upstream_header(client, peer, local);
            return;
        }
        self.admit(client, peer, local, local, Vec::new());
    }

    /// Reads an upstream balancer's PROXY v2 header on the runtime (it may
    /// take several reads), then serves the connection as from the client
    /// the header names; a missing or bad header resets it.
    fn read_upstream_header(&mut self, client: OwnedFd, peer: SocketAddr, local: SocketAddr) {
        let (Some(engine), Ok(reader)) = (self.this.upgrade(), client.try_clone()) else {
            set_linger_zero(client.as_raw_fd());
            return;
        };
        let shared = self.shared.clone();
        tokio::task::spawn_local(async move {
            let got = match header_stream(reader) {
                Ok(mut stream) => shared.upstream.read_header(&mut stream).await,
                Err(_) => None,
            };
            let Some(a) = got else {
                set_linger_zero(client.as_raw_fd());
                return;
            };
            let (peer, origin) = a.addrs.unwrap_or((peer, local));
            let mut tcp = engine.borrow_mut();
            tcp.admit(client, peer, local, origin, a.early);
            let _ = tcp.ring.submit();
        });
    }

    /// Resolves and admits a client connection from `peer` to `local`, and
    /// starts dialing. `origin` and `early` come from an upstream header.
    fn admit(
        &mut self,
        client: OwnedFd,
        peer: SocketAddr,
        local: SocketAddr,
        origin: SocketAddr,
        early: Vec<u8>,
    ) {
        let key = FlowKey {
            src: peer,
            dst: local,
            proto: Protocol::Tcp,
        };
        let fe = match resolve(&self.shared.snapshot.load(), &key) {
            Verdict::Forward(fe) => fe,
            // The kernel completed the handshake already: the closest to
            // refuse or drop is a reset.
            Verdict::Refuse(_) | Verdict::Drop(_) => {
                set_linger_zero(client.as_raw_fd());
                return;
            }
        };
        let Some(slot) = self.shared.limits.admit(&fe) else {
            set_linger_zero(client.as_raw_fd());
            session::refused(&self.shared, &fe, peer, local, End::Limit);
            return;
        };
        let first = first_bytes(&fe, peer, origin, &early);
        let kept = slot.keep();
        self.serial = self.serial.wrapping_add(1);
        let conn = Conn {
            serial: self.serial,
            client,
            backend: None,
            peer,
            local,
            first,
            first_sent: 0,
            fe,
            _admission: Admission {
                shared: self.shared.clone(),
                kept: Some(kept),
            },
            session: None,
            phase: Phase::Dialing(Box::new(Dial {
                retry: Retry::default(),
                sock: None,
                ep: local,
                addr: SockAddr::from(local),
                ts: Timespec::new(),
            })),
            up: Half::default(),
            down: Half::default(),
            inflight: 0,
            // One ahead of the check's start, so the first check (which
            // may come at once) seeds it instead of counting as quiet: a
            // relay is then reset between 1 and 1.25 idle timeouts after
            // its last byte, as with a watchdog of its own.
            reads: 1,
            idle: IdleCheck::default(),
            end: None,
        };
        let i = self.conns.insert(conn);
        self.dial(i);
    }

    /// Tries the next backend of connection `i`, or refuses the client when
    /// none is left.
    fn dial(&mut self, i: u32) {
        let Some(c) = self.conns.get_mut(i) else {
            return;
        };
        let Phase::Dialing(d) = &mut c.phase else {
            return;
        };
        loop {
            let next = d.retry.next(
                &c.fe,
                c.peer.ip(),
                &self.shared,
                Instant::now(),
                &mut self.rng.borrow_mut(),
            );
            let Some((ep, limit)) = next else {
                tracing::debug!(client = %c.peer, "{}", d.retry.error(&c.fe));
                set_linger_zero(c.client.as_raw_fd());
                session::refused(&self.shared, &c.fe, c.peer, c.local, End::NoBackend);
                self.conns.remove(i);
                return;
            };
            let sock = match Socket::new(Domain::for_address(ep), Type::STREAM.cloexec(), None) {
                Ok(s) => OwnedFd::from(s),
                Err(e) => {
                    d.retry
                        .failed(&c.fe, &self.shared, ep, ConnectFailure::from_io(&e));
                    continue;
                }
            };
            d.ep = ep;
            d.addr = SockAddr::from(ep);
            d.ts = timespec(limit);
            let raw = sock.as_raw_fd();
            d.sock = Some(sock);
            self.ring
                .push(ops::connect(raw, &d.addr), Token::new(Op::Connect, i));
            self.ring.push(
                ops::connect_timeout(&d.ts),
                Token::new(Op::ConnectTimeout, i),
            );
            c.inflight += 2;
            return;
        }
    }

    fn on_connect(&mut self, i: u32, res: i32) {
        let Some(c) = self.conns.get_mut(i) else {
            return;
        };
        c.inflight -= 1;
        let Phase::Dialing(d) = &mut c.phase else {
            return;
        };
        if res < 0 {
            // The linked timeout cancels the connect: ECANCELED.
            let why = if -res == libc::ECANCELED {
                ConnectFailure::Timeout
            } else {
                ConnectFailure::from_io(&std::io::Error::from_raw_os_error(-res))
            };
            let ep = d.ep;
            d.sock = None;
            d.retry.failed(&c.fe, &self.shared, ep, why);
            self.dial(i);
            return;
        }
        let ep = d.ep;
        d.retry.succeeded(&c.fe, c.peer.ip(), &self.shared, ep);
        let backend = d.sock.take();
        c.phase = Phase::Relaying;
        let Some(backend) = backend else {
            return;
        };
        set_nodelay(backend.as_raw_fd());
        set_nodelay(c.client.as_raw_fd());
        c.backend = Some(backend);
        c.session = Some(Session::open(
            &self.shared,
            c.fe.clone(),
            c.peer,
            c.local,
            ep,
        ));
        // The backend is connected and nothing was written to it yet: what
        // goes before the client's bytes is sent first, and the relay starts
        // once it is out.
        if c.first.is_empty() {
            self.start_relay(i);
        } else {
            self.send_first(i);
        }
    }

    /// Sends (the rest of) connection `i`'s first bytes to its backend.
    fn send_first(&mut self, i: u32) {
        let Some(c) = self.conns.get_mut(i) else {
            return;
        };
        let (Some(backend), Some(rest)) = (c.backend.as_ref(), c.first.get(c.first_sent..)) else {
            return;
        };
        let fd = backend.as_raw_fd();
        let len = rest.len() as u32;
        c.inflight += 1;
        // The Vec is neither touched nor dropped while the send is in flight
        // (a connection is freed only with nothing in flight).
        self.ring.push(
            ops::send(fd, rest.as_ptr(), len),
            Token::new(Op::SendFirst, i),
        );
    }

    fn on_send_first(&mut self, i: u32, res: i32) {
        let Some(c) = self.conns.get_mut(i) else {
            return;
        };
        c.inflight -= 1;
        if c.end.is_some() {
            self.free_if_done(i);
            return;
        }
        if res <= 0 {
            tracing::debug!(client = %c.peer, error = %std::io::Error::from_raw_os_error(-res), "first bytes to the backend not written");
            self.reset(i, End::Reset);
            return;
        }
        c.first_sent += res as usize;
        if c.first_sent < c.first.len() {
            self.send_first(i);
            return;
        }
        c.first = Vec::new();
        self.start_relay(i);
    }

    /// Connection `i` is connected and its first bytes are out: both
    /// directions start.
    fn start_relay(&mut self, i: u32) {
        for d in [Dir::Up, Dir::Down] {
            self.next_move(i, d);
        }
    }

    /// Direction `d` of connection `i` has no send in flight and nothing
    /// queued: its next bytes go by a buffer-ring receive, or by splice once
    /// it has moved [`Sizes::splice_after`] bytes and its last receive is
    /// in (it stays spliced).
    fn next_move(&mut self, i: u32, d: Dir) {
        let after = self.splice_after;
        let Some(c) = self.conns.get_mut(i) else {
            return;
        };
        let h = c.half(d);
        let switch = h.due(after);
        if switch && (h.recv_armed || h.sending.is_some() || h.queued.is_some()) {
            // Its completion comes back here.
            return;
        }
        if !switch && !h.spliced {
            self.arm_recv(i, d);
            return;
        }
        if switch {
            // splice(2) reads and writes without blocking only on
            // non-blocking sockets; the ring's operations on the other
            // direction are not affected (io_uring polls either way).
            let Some((from, to)) = c.ends(d) else {
                return;
            };
            if splice::set_nonblocking(from).is_err() || splice::set_nonblocking(to).is_err() {
                self.reset(i, End::Reset);
                return;
            }
            c.half(d).spliced = true;
        }
        self.pump(i, d);
    }

    /// Splice relay: moves direction `d`'s bytes until its source has none
    /// (then waits for it to be readable) or its destination has no room
    /// (then waits for room, reading nothing meanwhile: back-pressure).
    /// After [`PUMP_ROUNDS`] moves it yields to other connections.
    fn pump(&mut self, i: u32, d: Dir) {
        let Some(c) = self.conns.get_mut(i) else {
            return;
        };
        let Some((from, to)) = c.ends(d) else {
            return;
        };
        if c.end.is_some() {
            return;
        }
        for _ in 0..PUMP_ROUNDS {
            let h = c.half(d);
            if h.done || h.poll_in || h.poll_out {
                return;
            }
            if let Some(p) = h.pipe.as_mut().filter(|p| p.len > 0) {
                match p.drain(to) {
                    Ok(n) => {
                        let left = p.len;
                        if let Some(s) = &c.session {
                            match d {
                                Dir::Up => s.to_backend(n as usize),
                                Dir::Down => s.to_client(n as usize),
                            }
                        }
                        if left > 0 {
                            self.wait_splice(i, d, true);
                            return;
                        }
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        self.wait_splice(i, d, true);
                        return;
                    }
                    Err(_) => {
                        self.reset(i, End::Reset);
                        return;
                    }
                }
            }
            let h = c.half(d);
            if h.eof {
                if let Some(p) = h.pipe.take() {
                    self.pipes.give(p);
                }
                self.fin(i, d);
                return;
            }
            let p = match h.pipe.take() {
                Some(p) => p,
                None => match self.pipes.take() {
                    Ok(p) => p,
                    Err(e) => {
                        tracing::debug!(client = %c.peer, error = %e, "no pipe for the splice relay");
                        self.reset(i, End::Reset);
                        return;
                    }
                },
            };
            let h = c.half(d);
            let p = h.pipe.insert(p);
            match p.fill(from) {
                Ok(0) => h.eof = true,
                Ok(_) => c.reads += 1,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    // Empty: an idle direction holds no pipe.
                    if let Some(p) = h.pipe.take() {
                        self.pipes.give(p);
                    }
                    self.wait_splice(i, d, false);
                    return;
                }
                Err(_) => {
                    self.reset(i, End::Reset);
                    return;
                }
            }
        }
        // Its share is used: the poll completes at once, after the others.
        let out = c.half(d).pipe.as_ref().is_some_and(|p| p.len > 0);
        self.wait_splice(i, d, out);
    }

    /// Splice relay: waits for direction `d`'s source to be readable, or
    /// (`out`) its destination to have room.
    fn wait_splice(&mut self, i: u32, d: Dir, out: bool) {
        let Some(c) = self.conns.get_mut(i) else {
            return;
        };
        let Some((from, to)) = c.ends(d) else {
            return;
        };
        let h = c.half(d);
        let (fd, mask, op) = if out {
            h.poll_out = true;
            (to, libc::POLLOUT, Op::SpliceOut)
        } else {
            h.poll_in = true;
            (from, libc::POLLIN, Op::SpliceIn)
        };
        c.inflight += 1;
        self.ring
            .push(ops::poll(fd, mask), Token::with_aux(op, i, d.aux()));
    }

    fn on_poll(&mut self, i: u32, d: Dir, out: bool, res: i32) {
        let Some(c) = self.conns.get_mut(i) else {
            return;
        };
        c.inflight -= 1;
        let h = c.half(d);
        if out {
            h.poll_out = false;
        } else {
            h.poll_in = false;
        }
        if c.end.is_some() {
            self.free_if_done(i);
            return;
        }
        if res < 0 {
            self.reset(i, End::Reset);
            return;
        }
        // Errors and hang-ups surface as the splice's own result.
        self.pump(i, d);
    }

    /// A linked timeout (or any other bookkeeping-only completion) of
    /// connection `i`.
    fn settle(&mut self, i: u32) {
        if let Some(c) = self.conns.get_mut(i) {
            c.inflight -= 1;
        }
        self.free_if_done(i);
    }

    fn arm_recv(&mut self, i: u32, d: Dir) {
        let after = self.splice_after;
        let Some(c) = self.conns.get_mut(i) else {
            return;
        };
        let ended = c.end.is_some();
        let h = c.half(d);
        if ended
            || h.recv_armed
            || h.eof
            || h.done
            || h.queued.is_some()
            || h.spliced
            || h.due(after)
        {
            return;
        }
        let Some((from, _)) = c.ends(d) else {
            return;
        };
        c.half(d).recv_armed = true;
        c.inflight += 1;
        self.ring.push(
            ops::recv(from, self.bufs.group(), self.bufs.buf_size()),
            Token::new(d.recv(), i),
        );
    }

    fn on_recv(&mut self, i: u32, d: Dir, res: i32, flags: u32) {
        let bid = cqueue::buffer_select(flags);
        if bid.is_some() {
            self.bufs.taken();
        }
        let Some(c) = self.conns.get_mut(i) else {
            if let Some(b) = bid {
                self.bufs.recycle(b);
            }
            return;
        };
        c.inflight -= 1;
        c.half(d).recv_armed = false;
        if c.end.is_some() {
            if let Some(b) = bid {
                self.bufs.recycle(b);
            }
            self.free_if_done(i);
            return;
        }
        match (res, bid) {
            (n, Some(bid)) if n > 0 => {
                c.reads += 1;
                let chunk = Chunk {
                    bid,
                    off: 0,
                    len: n as u32,
                };
                if c.half(d).sending.is_none() {
                    self.send(i, d, chunk);
                    self.arm_recv(i, d);
                } else {
                    // Back-pressure: no new receive until this one is sent.
                    c.half(d).queued = Some(chunk);
                }
            }
            (0, _) => {
                c.half(d).eof = true;
                if c.half(d).sending.is_none() {
                    self.fin(i, d);
                }
            }
            (n, _) if -n == libc::ENOBUFS => {
                let serial = c.serial;
                self.starved.push((i, serial, d));
            }
            (_, b) => {
                if let Some(b) = b {
                    self.bufs.recycle(b);
                }
                self.reset(i, End::Reset);
            }
        }
    }

    fn send(&mut self, i: u32, d: Dir, chunk: Chunk) {
        let Some(c) = self.conns.get_mut(i) else {
            return;
        };
        let Some((_, to)) = c.ends(d) else {
            return;
        };
        c.half(d).sending = Some(chunk);
        c.inflight += 1;
        // SAFETY: off < len <= buf_size: inside buffer `bid`, which stays
        // lent to this direction until the send completes.
        let ptr = unsafe { self.bufs.ptr(chunk.bid).add(chunk.off as usize) };
        self.ring.push(
            ops::send(to, ptr, chunk.len - chunk.off),
            Token::new(d.send(), i),
        );
    }

    fn on_send(&mut self, i: u32, d: Dir, res: i32) {
        let Some(c) = self.conns.get_mut(i) else {
            return;
        };
        c.inflight -= 1;
        let Some(mut chunk) = c.half(d).sending.take() else {
            return;
        };
        if c.end.is_some() || res <= 0 {
            self.bufs.recycle(chunk.bid);
            if let Some(q) = c.half(d).queued.take() {
                self.bufs.recycle(q.bid);
            }
            if c.end.is_none() {
                self.reset(i, End::Reset);
            } else {
                self.free_if_done(i);
            }
            return;
        }
        let n = res as u32;
        if let Some(s) = &c.session {
            match d {
                Dir::Up => s.to_backend(n as usize),
                Dir::Down => s.to_client(n as usize),
            }
        }
        c.half(d).moved += u64::from(n);
        chunk.off += n;
        if chunk.off < chunk.len {
            self.send(i, d, chunk);
            return;
        }
        self.bufs.recycle(chunk.bid);
        if let Some(q) = c.half(d).queued.take() {
            self.send(i, d, q);
            self.arm_recv(i, d);
        } else if c.half(d).eof {
            self.fin(i, d);
        } else {
            self.next_move(i, d);
        }
    }

    /// Direction `d`'s sender closed and everything it sent is passed on:
    /// half-close the receiver's side; when both directions are done the
    /// relay ended with FIN.
    fn fin(&mut self, i: u32, d: Dir) {
        let Some(c) = self.conns.get_mut(i) else {
            return;
        };
        if let Some((_, to)) = c.ends(d) {
            // A system call, not the ring's IORING_OP_SHUTDOWN: the kernel
            // always hands that one to an io-wq worker thread, and the hop
            // cost 4 % of the connection rate (BENCHMARKS.md).
            // SAFETY: `to` is a live descriptor of this connection.
            unsafe { libc::shutdown(to, libc::SHUT_WR) };
        }
        c.half(d).done = true;
        if c.up.done && c.down.done {
            c.end = Some(End::Fin);
            if let Some(s) = &c.session {
                s.end(End::Fin);
            }
            self.free_if_done(i);
        }
    }

    /// Ends connection `i` as `why` (anything but FIN): both sockets close
    /// with RST once their operations, cancelled now, have completed.
    fn reset(&mut self, i: u32, why: End) {
        let Some(c) = self.conns.get_mut(i) else {
            return;
        };
        if c.end.is_some() {
            return;
        }
        c.end = Some(why);
        if let Some(s) = &c.session {
            s.end(why);
        }
        for fd in [Some(&c.client), c.backend.as_ref()].into_iter().flatten() {
            let raw = fd.as_raw_fd();
            set_linger_zero(raw);
            self.ring
                .push(ops::cancel_all(raw), Token::new(Op::Ignore, i));
        }
        self.free_if_done(i);
    }

    /// Drops connection `i` once it ended and nothing of it is in flight;
    /// its sockets close through the ring.
    fn free_if_done(&mut self, i: u32) {
        if !self
            .conns
            .get(i)
            .is_some_and(|c| c.end.is_some() && c.inflight == 0)
        {
            return;
        }
        let Some(Conn {
            client, backend, ..
        }) = self.conns.remove(i)
        else {
            return;
        };
        for fd in [Some(client), backend].into_iter().flatten() {
            // Nothing of the connection is in flight: no operation can
            // still name the descriptor when the close runs.
            self.ring
                .push(ops::close(fd.into_raw_fd()), Token::new(Op::Close, i));
        }
    }

    /// Receives that found no buffer are armed again as buffers come back.
    fn rearm_starved(&mut self) {
        while self.bufs.free() > 0 {
            let Some((i, serial, d)) = self.starved.pop() else {
                return;
            };
            if self.conns.get(i).is_some_and(|c| c.serial == serial) {
                self.next_move(i, d);
            }
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::testing::engine::{loopback_listener, shared_for};
    use rand::SeedableRng;
    use tokio_uring::buf::BoundedBuf;
    use tokio_uring::net::{TcpListener, TcpStream};

    /// A small engine, so tests run out of buffers quickly.
    pub(crate) const SIZES: Sizes = Sizes {
        ring_entries: 64,
        buffers: 8,
        buf_size: 4096,
        splice_after: None,
    };

    /// An engine on this thread's runtime proxying a loopback listener to
    /// `backend`; its driver runs as a task.
    fn engine(backend: SocketAddr) -> (super::super::Engine, SocketAddr) {
        engine_with(backend, SIZES)
    }

    fn engine_with(backend: SocketAddr, sizes: Sizes) -> (super::super::Engine, SocketAddr) {
        let (fd, front) = loopback_listener();
        let rng = Rc::new(RefCell::new(SmallRng::seed_from_u64(7)));
        let tcp = Tcp::new(shared_for(front, backend), rng, sizes).unwrap();
        let e = Rc::new(RefCell::new(tcp));
        e.borrow_mut().listen(fd, front);
        tokio_uring::spawn(super::super::drive(e.clone()));
        (e, front)
    }

    async fn read_exact(s: &TcpStream, n: usize) -> Vec<u8> {
        let mut got = Vec::new();
        while got.len() < n {
            let (r, b) = s.read(vec![0u8; 65536]).await;
            let k = r.unwrap();
            assert!(k > 0, "EOF after {} of {n} bytes", got.len());
            got.extend_from_slice(&b[..k]);
        }
        got
    }

    /// Half-close: the backend sees EOF, and can still answer.
    async fn half_close_is_passed_on(client: &TcpStream, b: &TcpStream) {
        client.shutdown(std::net::Shutdown::Write).unwrap();
        let (r, _) = b.read(vec![0u8; 16]).await;
        assert_eq!(r.unwrap(), 0);
        let (r, _) = b.write_all(b"late".to_vec()).await;
        r.unwrap();
        assert_eq!(read_exact(client, 4).await, b"late");
    }

    #[test]
    fn an_idle_relay_holds_no_buffer_and_a_fin_is_passed_on() {
        tokio_uring::start(async {
            let backend = TcpListener::bind("127.0.0.1:0".parse().unwrap()).unwrap();
            let (e, front) = engine(backend.local_addr().unwrap());
            let client = TcpStream::connect(front).await.unwrap();
            let (b, _) = backend.accept().await.unwrap();
            let data: Vec<u8> = (0..20_000u32).map(|i| i as u8).collect();
            let (r, _) = client.write_all(data.clone()).await;
            r.unwrap();
            assert_eq!(read_exact(&b, data.len()).await, data);
            let (r, _) = b.write_all(data.clone().slice(..5000)).await;
            r.unwrap();
            assert_eq!(read_exact(&client, 5000).await, data[..5000]);
            // Both directions quiet, receives armed on both sockets: every
            // buffer is back in the ring.
            assert_eq!(e.borrow().free_buffers(), SIZES.buffers);
            assert_eq!(e.borrow().connections(), 1);
            half_close_is_passed_on(&client, &b).await;
        });
    }

    fn open_descriptors() -> usize {
        std::fs::read_dir("/proc/self/fd").unwrap().count()
    }

    #[test]
    fn a_relay_ended_by_fin_both_ways_closes_both_its_sockets() {
        tokio_uring::start(async {
            let backend = TcpListener::bind("127.0.0.1:0".parse().unwrap()).unwrap();
            let (e, front) = engine(backend.local_addr().unwrap());
            let before = open_descriptors();
            for _ in 0..3 {
                let client = TcpStream::connect(front).await.unwrap();
                let (b, _) = backend.accept().await.unwrap();
                half_close_is_passed_on(&client, &b).await;
                b.shutdown(std::net::Shutdown::Write).unwrap();
                let (r, _) = client.read(vec![0u8; 16]).await;
                assert_eq!(r.unwrap(), 0, "the backend's FIN is passed on");
                drop((client, b));
            }
            // The last FIN's completion frees the entry and queues the
            // closes; they reach the kernel with the next submission.
            for _ in 0..100 {
                if e.borrow().connections() == 0 && open_descriptors() == before {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            assert_eq!(e.borrow().connections(), 0);
            assert_eq!(open_descriptors(), before, "the proxy's sockets are closed");
        });
    }

    #[test]
    fn a_splice_relay_moves_bulk_both_ways_and_passes_a_half_close_on() {
        tokio_uring::start(async {
            let backend = TcpListener::bind("127.0.0.1:0".parse().unwrap()).unwrap();
            let sizes = Sizes {
                splice_after: Some(0),
                ..SIZES
            };
            let (e, front) = engine_with(backend.local_addr().unwrap(), sizes);
            let client = TcpStream::connect(front).await.unwrap();
            let (b, _) = backend.accept().await.unwrap();
            // More than a pipe holds, so the relay loops and waits for room.
            let data: Vec<u8> = (0..3_000_000u32).map(|i| (i * 7) as u8).collect();
            let up = client.write_all(data.clone());
            let (got, (r, _)) = tokio::join!(read_exact(&b, data.len()), up);
            r.unwrap();
            assert!(got == data, "client→backend bytes differ");
            let (r, _) = b.write_all(data.clone().slice(..100_000)).await;
            r.unwrap();
            assert!(read_exact(&client, 100_000).await == data[..100_000]);
            // No buffer of the ring was used.
            assert_eq!(e.borrow().free_buffers(), SIZES.buffers);
            half_close_is_passed_on(&client, &b).await;
        });
    }

    #[test]
    fn a_direction_moves_on_to_splice_after_its_first_bytes_and_keeps_its_order() {
        tokio_uring::start(async {
            let backend = TcpListener::bind("127.0.0.1:0".parse().unwrap()).unwrap();
            let sizes = Sizes {
                splice_after: Some(64 * 1024),
                ..SIZES
            };
            let (e, front) = engine_with(backend.local_addr().unwrap(), sizes);
            let client = TcpStream::connect(front).await.unwrap();
            let (b, _) = backend.accept().await.unwrap();
            // A short exchange stays on the ring both ways.
            let (r, _) = client.write_all(b"ping".to_vec()).await;
            r.unwrap();
            assert_eq!(read_exact(&b, 4).await, b"ping");
            let (r, _) = b.write_all(b"pong".to_vec()).await;
            r.unwrap();
            assert_eq!(read_exact(&client, 4).await, b"pong");
            assert_eq!(e.borrow().spliced_directions(), 0);
            // Bulk client → backend: past 64 KiB that direction splices,
            // and every byte arrives once and in order across the switch.
            let data: Vec<u8> = (0..1_000_000u32)
                .map(|i| (i * 13 + i / 251) as u8)
                .collect();
            let up = client.write_all(data.clone());
            let (got, (r, _)) = tokio::join!(read_exact(&b, data.len()), up);
            r.unwrap();
            assert!(got == data, "client→backend bytes differ across the switch");
            assert_eq!(e.borrow().spliced_directions(), 1);
            // The other direction still relays on the ring, and a FIN is
            // passed on through the spliced one.
            let (r, _) = b.write_all(data.clone().slice(..10_000)).await;
            r.unwrap();
            assert!(read_exact(&client, 10_000).await == data[..10_000]);
            assert_eq!(e.borrow().spliced_directions(), 1);
            half_close_is_passed_on(&client, &b).await;
        });
    }

    #[test]
    fn a_slow_reader_holds_at_most_two_buffers_of_its_direction() {
        tokio_uring::start(async {
            let backend = TcpListener::bind("127.0.0.1:0".parse().unwrap()).unwrap();
            let (e, front) = engine(backend.local_addr().unwrap());
            let client = TcpStream::connect(front).await.unwrap();
            // Accepted and never read: the backend's receive buffer fills,
            // the engine's send to it stalls.
            let (_b, _) = backend.accept().await.unwrap();
            let chunk = vec![7u8; 64 * 1024];
            let mut sent = 0usize;
            // Bounded: 32 MiB at most, well beyond what the kernel buffers
            // on loopback, stopping as soon as writes block (timeout).
            while sent < 32 << 20 {
                let w = client.write(chunk.clone()).submit();
                match tokio::time::timeout(std::time::Duration::from_millis(300), w).await {
                    Ok((Ok(n), _)) => sent += n,
                    _ => break,
                }
            }
            assert!(sent > 0);
            assert!(
                e.borrow().free_buffers() >= SIZES.buffers - 2,
                "free {} of {}",
                e.borrow().free_buffers(),
                SIZES.buffers
            );
        });
    }
}
