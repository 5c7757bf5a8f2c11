//! The smoltcp interface of the ClusterIP front end and its connections:
//! sockets spread over shards, one connection table from held SYN to removed
//! socket. A held SYN is answered by a fresh socket once its backend accepted;
//! everything else (and every refusal) goes to smoltcp, which answers with RST
//! or ICMP port unreachable itself. No I/O: the driver moves packets in and out.

use std::collections::{HashMap, VecDeque};

use smoltcp::iface::{Config, Interface, SocketSet};
use smoltcp::socket::tcp;
use smoltcp::time::Instant as SmolInstant;
use smoltcp::wire::{
    HardwareAddress, IpAddress, IpCidr, IpListenEndpoint, Ipv4Address, Ipv6Address,
};

use super::conns::{supersedes, Accepted, Conn, ConnSocket, Conns, Released};
use super::device::QueueDevice;
use super::offload;
use super::packet::{conn_key, syn_id, ConnKey};
use super::rings::{Ring, RingPool};

/// Sizes and caps of the TUN front end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TunSettings {
    /// MTU of the device (and largest segment smoltcp sends).
    pub mtu: usize,
    /// smoltcp receive and send buffer per TCP connection, each.
    pub socket_buffer: usize,
    /// TCP connections (established or being set up) at most.
    pub max_connections: usize,
    /// UDP flows at most.
    pub max_udp_flows: usize,
}

impl Default for TunSettings {
    fn default() -> Self {
        Self {
            mtu: 65_535,
            socket_buffer: 1024 * 1024,
            max_connections: 65_536,
            max_udp_flows: 65_536,
        }
    }
}

/// Socket sets the stack's connections are spread over. smoltcp finds the
/// socket of an incoming segment, and the sockets with something to send, by
/// walking its whole set: with one set, every packet cost a walk over every
/// connection (5,000 idle connections halved a bulk stream's throughput).
/// A packet is handled with its connection's shard only.
const SHARDS: usize = 256;

/// One socket set with the packets waiting for it and its next timer.
struct Shard {
    sockets: SocketSet<'static>,
    rx: VecDeque<Vec<u8>>,
    /// When a socket of this set next needs polling (retransmits, timeouts).
    due: Option<SmolInstant>,
}

/// A set of shards, a bit each: a round visits the shards it names instead
/// of walking all [`SHARDS`] of them (twice a round, and most are quiet).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct ShardSet([u64; SHARDS / 64]);

const _: () = assert!(SHARDS.is_multiple_of(64));

impl ShardSet {
    fn insert(&mut self, i: usize) {
        if let Some(w) = self.0.get_mut(i / 64) {
            *w |= 1 << (i % 64);
        }
    }

    fn remove(&mut self, i: usize) {
        if let Some(w) = self.0.get_mut(i / 64) {
            *w &= !(1 << (i % 64));
        }
    }

    fn contains(&self, i: usize) -> bool {
        self.0.get(i / 64).is_some_and(|w| w & (1 << (i % 64)) != 0)
    }

    fn union(mut self, other: &ShardSet) -> ShardSet {
        for (w, o) in self.0.iter_mut().zip(other.0) {
            *w |= o;
        }
        self
    }

    /// The shards in the set, in order.
    fn iter(self) -> impl Iterator<Item = usize> {
        self.0.into_iter().enumerate().flat_map(|(n, mut w)| {
            std::iter::from_fn(move || {
                (w != 0).then(|| {
                    let bit = w.trailing_zeros() as usize;
                    w &= w - 1;
                    n * 64 + bit
                })
            })
        })
    }
}

/// The shard of a connection: a hash of client and VIP, keyed by `seed`
/// (random per stack, so no client can choose 4-tuples that share one
/// shard and make every packet of that shard walk a crowded set).
fn shard_of(seed: &std::hash::RandomState, key: &ConnKey) -> usize {
    (std::hash::BuildHasher::hash_one(seed, key) % SHARDS as u64) as usize
}

/// What became of a SYN for a frontend with usable endpoints.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SynVerdict {
    /// Held: the caller connects to a backend, then calls [`Stack::accept`]
    /// or [`Stack::refuse`].
    Hold,
    /// Its connection exists (a retransmit): smoltcp has it.
    Stack,
    /// Dropped: its backend connect is in flight (the client retransmits), or
    /// the stack holds `max_connections` already.
    Dropped,
}

/// How a held SYN is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Dropped without an answer (over a connection limit, as the kernel
    /// path drops).
    Silently,
    /// Answered by smoltcp with RST (no backend accepted).
    Reset,
}

/// The smoltcp interface, its sockets and its connections.
pub struct Stack {
    /// smoltcp interface (any-IP).
    pub iface: Interface,
    /// Packet queues between the TUN and the interface. Packets for smoltcp
    /// go in through [`Stack::push_rx`], which files them under their shard.
    pub dev: QueueDevice,
    /// TCP sockets, sharded by connection.
    shards: Vec<Shard>,
    /// Shards whose sockets or queue changed since they were last polled.
    dirty: ShardSet,
    /// Shards with a timer (`Shard::due`).
    timed: ShardSet,
    /// The key of [`shard_of`].
    seed: std::hash::RandomState,
    /// Every connection, held SYN to closing socket.
    conns: Conns,
    settings: TunSettings,
    warned_full: bool,
    // After `shards`, so the sockets (which borrow the rings) drop first.
    /// The rings each socket borrows, until it is removed.
    /// (foldhash: the relays mark activity here per transfer.)
    lent: HashMap<ConnSocket, Lent, foldhash::fast::RandomState>,
    /// Rings for the next sockets.
    rings: RingPool,
}

/// A socket's rings, and the bytes that went through each (receive, send)
/// once its relay ended cleanly: what decides whether they are kept.
struct Lent {
    rx: Ring,
    tx: Ring,
    moved: Option<(u64, u64)>,
    /// Bytes moved through the rings since the last idle sweep.
    active: bool,
    /// The rings' pages went back to the kernel, and nothing moved since.
    trimmed: bool,
}

fn now() -> SmolInstant {
    SmolInstant::now()
}

/// TCP timestamp clock (RFC 7323): milliseconds, wrapping.
fn tsval() -> u32 {
    now().total_millis() as u32
}

impl Stack {
    /// A stack that accepts traffic for any address (routes decide what reaches it).
    pub fn new(settings: TunSettings) -> Self {
        let mut dev = QueueDevice::new(settings.mtu, 4096);
        let mut iface = Interface::new(Config::new(HardwareAddress::Ip), &mut dev, now());
        // Any-IP: accept for every prefix routed via one of our own addresses.
        // The addresses are never seen on the wire.
        let v4 = Ipv4Address::new(169, 254, 255, 254);
        let v6 = Ipv6Address::new(0xfe80, 0, 0, 0, 0, 0, 0xffff, 0xfffe);
        iface.update_ip_addrs(|a| {
            let _ = a.push(IpCidr::new(IpAddress::Ipv4(v4), 32));
            let _ = a.push(IpCidr::new(IpAddress::Ipv6(v6), 128));
        });
        let _ = iface.routes_mut().add_default_ipv4_route(v4);
        let _ = iface.routes_mut().add_default_ipv6_route(v6);
        iface.set_any_ip(true);
        Self {
            iface,
            dev,
            shards: (0..SHARDS)
                .map(|_| Shard {
                    sockets: SocketSet::new(Vec::new()),
                    rx: VecDeque::new(),
                    due: None,
                })
                .collect(),
            dirty: ShardSet::default(),
            timed: ShardSet::default(),
            seed: std::hash::RandomState::new(),
            conns: Conns::default(),
            settings,
            warned_full: false,
            lent: HashMap::default(),
            rings: RingPool::new(settings.socket_buffer),
        }
    }

    /// Queues a packet from the TUN for smoltcp, with its connection's shard
    /// (shard 0 for anything without ports: smoltcp answers those itself).
    pub fn push_rx(&mut self, packet: Vec<u8>) {
        let i = conn_key(&packet).map_or(0, |k| shard_of(&self.seed, &k));
        if let Some(sh) = self.shards.get_mut(i) {
            sh.rx.push_back(packet);
            self.dirty.insert(i);
        }
    }

    /// Runs the interface over everything queued and every timer due.
    pub fn poll(&mut self) {
        self.poll_at(now());
    }

    /// Runs the interface as if it were `at` (tests drive the clock): each
    /// shard with packets queued, sockets touched or a timer due.
    pub fn poll_at(&mut self, at: SmolInstant) {
        // Polling a shard changes no other shard's sets.
        for i in self.dirty.union(&self.timed).iter() {
            let due = self.shards.get(i).and_then(|sh| sh.due);
            if self.dirty.contains(i) || due.is_some_and(|d| d <= at) {
                self.poll_shard(i, at);
            }
        }
    }

    fn poll_shard(&mut self, i: usize, at: SmolInstant) {
        let Some(sh) = self.shards.get_mut(i) else {
            return;
        };
        // Only this shard's packets are in the device while it is polled, so
        // none is answered by another shard's sockets (or refused for lack of one).
        while let Some(p) = sh.rx.pop_front() {
            self.dev.push_rx(p);
        }
        self.iface.poll(at, &mut self.dev, &mut sh.sockets);
        self.dirty.remove(i);
        sh.due = self.iface.poll_at(at, &sh.sockets);
        if sh.due.is_some() {
            self.timed.insert(i);
        } else {
            self.timed.remove(i);
        }
    }

    /// When the interface next needs polling for a timer, if ever.
    pub fn next_due(&self) -> Option<SmolInstant> {
        self.timed
            .iter()
            .filter_map(|i| self.shards.get(i)?.due)
            .min()
    }

    /// A connection's smoltcp socket; its shard is polled on the next round.
    pub fn tcp(&mut self, c: ConnSocket) -> Option<&mut tcp::Socket<'static>> {
        let sh = self.shards.get_mut(c.shard)?;
        self.dirty.insert(c.shard);
        Some(sh.sockets.get_mut::<tcp::Socket>(c.handle))
    }

    /// The socket of an accepted connection.
    pub fn connection(&self, key: &ConnKey) -> Option<ConnSocket> {
        self.conns.accepted(key).map(|a| a.socket)
    }

    /// The client's MSS for segments of `key`, when smoltcp was shown a
    /// larger one (see offload.rs).
    pub fn client_mss(&self, key: &ConnKey) -> Option<u16> {
        self.conns.mss(key)
    }

    /// True when a connection of `key` is held here (SYN held, open or
    /// closing).
    #[inline]
    pub fn holds_conn(&self, key: &ConnKey) -> bool {
        self.conns.get(key).is_some()
    }

    /// Connections held, open or closing.
    pub fn connections(&self) -> usize {
        self.conns.len()
    }

    /// Takes a SYN for a frontend with usable endpoints.
    pub fn syn(&mut self, key: ConnKey, mut packet: Vec<u8>) -> SynVerdict {
        if self.holds(&key, &packet) {
            self.push_rx(packet);
            return SynVerdict::Stack;
        }
        if self.conns.get(&key).is_some() {
            self.dev.recycle(packet);
            return SynVerdict::Dropped;
        }
        if self.conns.len() >= self.settings.max_connections {
            self.dev.recycle(packet);
            if !self.warned_full {
                tracing::warn!(
                    max = self.settings.max_connections,
                    "TUN connection limit reached: new SYNs are dropped"
                );
                self.warned_full = true;
            }
            return SynVerdict::Dropped;
        }
        self.warned_full = false;
        // smoltcp may then send segments as large as the TUN takes; the
        // kernel cuts them to the client's MSS (see offload.rs).
        let raised = u16::try_from(self.settings.mtu.saturating_sub(60)).unwrap_or(u16::MAX);
        let mss = offload::raise_syn_mss(&mut packet, raised);
        // Hold a copy the size of the SYN: the read buffer is MTU-sized
        // (64 KiB, resident), and a SYN flood can hold thousands.
        let held = packet.to_vec();
        self.dev.recycle(packet);
        self.conns.hold(key, held, mss);
        SynVerdict::Hold
    }

    /// True when a connection holds `key` and the SYN in `packet` is its own
    /// (a retransmit) or not newer. A connection that is closing and sees a
    /// newer SYN ([`supersedes`]) is forgotten at once, so the SYN opens a new
    /// connection instead of waiting for the client's SYN retransmits.
    fn holds(&mut self, key: &ConnKey, packet: &[u8]) -> bool {
        let Some(conn) = self.conns.accepted(key) else {
            return false;
        };
        let closing = self.tcp(conn.socket).is_none_or(|s| {
            matches!(
                s.state(),
                tcp::State::CloseWait
                    | tcp::State::LastAck
                    | tcp::State::Closing
                    | tcp::State::TimeWait
                    | tcp::State::Closed
            )
        });
        // Parsed only for a closing connection: a live one's SYN is a retransmit.
        let newer = closing && syn_id(packet).is_some_and(|new| supersedes(conn.syn, new));
        if !newer {
            return true;
        }
        match self.conns.forget(key) {
            // Its relay is over: the socket goes now, without a packet.
            Some(Conn::Closing(a)) => self.remove_socket(a.socket),
            // Its relay still runs (client gone, backend still sending): the
            // closed socket ends it, and `release` then removes the socket.
            // A closed socket takes no segment, so the new one gets them all.
            _ => {
                if let Some(s) = self.tcp(conn.socket) {
                    close_silently(s);
                }
            }
        }
        false
    }

    /// Answers a held SYN with a fresh socket listening on exactly its
    /// VIP:port. Returns the socket when the SYN was taken.
    pub fn accept(&mut self, key: ConnKey) -> Option<ConnSocket> {
        let (syn, mss) = self.conns.take_pending(&key)?;
        let id = syn_id(&syn)?;
        let (mut rx, mut tx) = (self.rings.take(), self.rings.take());
        // SAFETY: the rings go into `self.lent` right after the socket joins
        // its set, and leave it only in `remove_socket`, after the socket is
        // removed; until then (`s` declared after them) the socket drops first.
        let mut s = tcp::Socket::new(
            tcp::SocketBuffer::new(unsafe { rx.lend() }),
            tcp::SocketBuffer::new(unsafe { tx.lend() }),
        );
        s.set_nagle_enabled(false);
        s.set_ack_delay(None);
        s.set_tsval_generator(Some(tsval));
        // A peer that stops acknowledging (a spoofed SYN's SYN-ACK, a vanished
        // client) releases its socket and backend connection instead of
        // holding a slot under --tun-max-connections forever.
        s.set_timeout(Some(smoltcp::time::Duration::from_secs(60)));
        let ep = IpListenEndpoint {
            addr: Some(key.1.ip().into()),
            port: key.1.port(),
        };
        s.listen(ep).ok()?;
        let shard = shard_of(&self.seed, &key);
        let handle = self.shards.get_mut(shard)?.sockets.add(s);
        let socket = ConnSocket { shard, handle };
        self.lent.insert(
            socket,
            Lent {
                rx,
                tx,
                moved: None,
                // Not trimmed before one whole sweep period has passed.
                active: true,
                trimmed: false,
            },
        );
        self.push_rx(syn);
        self.poll_shard(shard, now());
        // Another listener on the same VIP:port must never linger: it would
        // take a different client's SYN.
        let sockets = &mut self.shards.get_mut(shard)?.sockets;
        if sockets.get::<tcp::Socket>(handle).state() == tcp::State::Listen {
            self.remove_socket(socket);
            return None;
        }
        self.conns.open(
            key,
            Accepted {
                socket,
                syn: id,
                mss,
            },
        );
        Some(socket)
    }

    /// Refuses a held SYN; its entry goes.
    pub fn refuse(&mut self, key: &ConnKey, how: Refusal) {
        let Some((syn, _)) = self.conns.take_pending(key) else {
            return;
        };
        match how {
            // No listener exists for it: smoltcp answers with RST.
            Refusal::Reset => self.push_rx(syn),
            Refusal::Silently => self.dev.recycle(syn),
        }
    }

    /// Takes back the socket of an ended relay: it is removed once closed
    /// (the driver's next round polls it, so an aborted one sends its RST
    /// first), or now when a newer connection holds its key. `moved`: the
    /// bytes client → backend and back, when the relay ended by FIN both
    /// ways (its rings hold nothing else); rings that moved little are
    /// kept for the next connections.
    pub fn release(&mut self, key: ConnKey, c: ConnSocket, moved: Option<(u64, u64)>) {
        if let Some(l) = self.lent.get_mut(&c) {
            l.moved = moved;
        }
        if self.conns.release(key, c) == Released::Orphan {
            self.remove_socket(c);
        }
    }

    /// Bytes moved through connection `c`'s rings (its relay says so).
    pub fn touch(&mut self, c: ConnSocket) {
        if let Some(l) = self.lent.get_mut(&c) {
            l.active = true;
            l.trimmed = false;
        }
    }

    /// The idle sweep (every `driver::TRIM_PERIOD`): the rings of
    /// connections through which nothing moved since the last sweep and
    /// which hold no bytes give their pages back, so an idle connection holds no ring memory
    /// (a ring is 1 MiB of address space; its touched pages stay resident
    /// otherwise). Once per quiet spell: a trimmed connection is trimmed
    /// again only after bytes moved.
    pub fn trim_idle(&mut self) {
        for (c, l) in self.lent.iter_mut() {
            if std::mem::take(&mut l.active) || l.trimmed {
                continue;
            }
            let Some(sh) = self.shards.get(c.shard) else {
                continue;
            };
            let s = sh.sockets.get::<tcp::Socket>(c.handle);
            if s.recv_queue() == 0 && s.send_queue() == 0 {
                l.rx.release_pages();
                l.tx.release_pages();
                l.trimmed = true;
            }
        }
    }

    /// Removes sockets whose relay ended and whose TCP connection is over.
    pub fn reap(&mut self) {
        let shards = &self.shards;
        let over = |c: ConnSocket| {
            shards.get(c.shard).is_none_or(|sh| {
                matches!(
                    sh.sockets.get::<tcp::Socket>(c.handle).state(),
                    tcp::State::Closed | tcp::State::TimeWait
                )
            })
        };
        for c in self.conns.reap(over) {
            self.remove_socket(c);
        }
    }

    fn remove_socket(&mut self, c: ConnSocket) {
        if let Some(sh) = self.shards.get_mut(c.shard) {
            sh.sockets.remove(c.handle);
        }
        // The socket and its borrow of the rings are gone.
        if let Some(Lent { rx, tx, moved, .. }) = self.lent.remove(&c) {
            self.rings.give_back(rx, moved.map(|m| m.0));
            self.rings.give_back(tx, moved.map(|m| m.1));
        }
    }

    /// Rings kept for the next connections (tests).
    #[cfg(test)]
    pub fn rings_kept(&self) -> usize {
        self.rings.kept()
    }
}

/// Closes a socket without a packet to its peer (an aborted smoltcp socket
/// sends an RST, which would hit the client's new connection on the same
/// 4-tuple): its wakers are woken, so a relay waiting on it ends, and an
/// empty closed socket, holding no buffers, takes its place.
fn close_silently(s: &mut tcp::Socket<'static>) {
    s.abort();
    *s = tcp::Socket::new(
        tcp::SocketBuffer::new(Vec::new()),
        tcp::SocketBuffer::new(Vec::new()),
    );
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use smoltcp::wire::{IpProtocol, Ipv4Packet, TcpControl, TcpPacket};

    use super::*;
    use crate::dataplane::tun::packet::{udp_packet, SynId};
    use crate::testing::tun::{segment, syn};

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn key() -> ConnKey {
        (sa("10.1.0.5:40000"), sa("10.96.0.10:80"))
    }

    fn stack() -> Stack {
        Stack::new(TunSettings::default())
    }

    /// Holds `packet` as a SYN of `key` and answers it at once.
    fn accepted(st: &mut Stack, key: ConnKey, packet: Vec<u8>) -> ConnSocket {
        assert_eq!(st.syn(key, packet), SynVerdict::Hold);
        st.accept(key).expect("accepted")
    }

    /// The stack's next TCP segment to the client: (seq, flags SYN/FIN/RST, TSval).
    fn reply(st: &mut Stack) -> (u32, bool, bool, bool, Option<u32>) {
        let out = st.dev.pop_tx().expect("a reply");
        let SynId { seq, tsval } = syn_id(&out).expect("TCP");
        let ip = Ipv4Packet::new_checked(&out[..]).unwrap();
        let t = TcpPacket::new_checked(ip.payload()).unwrap();
        (seq, t.syn(), t.fin(), t.rst(), tsval)
    }

    /// Opens a connection from `key` with ISN 1000 (and TSval 100), then the
    /// client closes it (FIN): the socket is in CLOSE-WAIT.
    fn closed_by_client(st: &mut Stack, key: ConnKey) -> ConnSocket {
        let h = accepted(
            st,
            key,
            segment(key, TcpControl::Syn, 1000, None, Some(100), &[]),
        );
        let (iss, syn, ..) = reply(st);
        assert!(syn);
        let ack = Some(iss.wrapping_add(1));
        st.push_rx(segment(key, TcpControl::None, 1001, ack, Some(101), &[]));
        st.push_rx(segment(key, TcpControl::Fin, 1001, ack, Some(102), &[]));
        st.poll();
        while st.dev.pop_tx().is_some() {}
        assert_eq!(st.tcp(h).unwrap().state(), tcp::State::CloseWait);
        h
    }

    #[test]
    fn refused_syn_gets_rst_from_the_stack() {
        let mut st = stack();
        st.push_rx(syn(key()));
        st.poll();
        let out = st.dev.pop_tx().expect("a reply");
        let ip = Ipv4Packet::new_checked(&out[..]).unwrap();
        assert_eq!(ip.src_addr(), std::net::Ipv4Addr::new(10, 96, 0, 10));
        let t = TcpPacket::new_checked(ip.payload()).unwrap();
        assert!(t.rst());
    }

    #[test]
    fn held_syn_is_answered_from_the_vip() {
        let mut st = stack();
        let h = accepted(&mut st, key(), syn(key()));
        assert_eq!(st.tcp(h).unwrap().state(), tcp::State::SynReceived);
        let out = st.dev.pop_tx().expect("a SYN-ACK");
        let ip = Ipv4Packet::new_checked(&out[..]).unwrap();
        let t = TcpPacket::new_checked(ip.payload()).unwrap();
        assert!(t.syn() && t.ack());
        assert_eq!(t.src_port(), 80);
        // Its MSS was raised for smoltcp; the client's is kept for the way back.
        assert_eq!(st.client_mss(&key()), Some(1460));
    }

    #[test]
    fn held_syns_are_counted_and_bounded() {
        let mut st = Stack::new(TunSettings {
            max_connections: 2,
            ..TunSettings::default()
        });
        let k = |port| (sa(&format!("10.1.0.5:{port}")), sa("10.96.0.10:80"));
        assert_eq!(st.syn(k(1), syn(k(1))), SynVerdict::Hold);
        // Its retransmit while the backend connect runs.
        assert_eq!(st.syn(k(1), syn(k(1))), SynVerdict::Dropped);
        assert_eq!(st.syn(k(2), syn(k(2))), SynVerdict::Hold);
        assert_eq!(st.syn(k(3), syn(k(3))), SynVerdict::Dropped, "full");
        st.accept(k(1)).expect("accepted");
        assert_eq!(st.syn(k(1), syn(k(1))), SynVerdict::Stack, "a retransmit");
        assert_eq!(st.connections(), 2);
    }

    #[test]
    fn a_refused_syn_leaves_nothing_behind() {
        // A SYN flood from spoofed sources refused by --max-connections once
        // left each SYN's client MSS behind in a map of its own.
        let mut st = stack();
        for port in 1..=100 {
            let k = (sa(&format!("10.1.0.5:{port}")), sa("10.96.0.10:80"));
            assert_eq!(st.syn(k, syn(k)), SynVerdict::Hold);
            assert_eq!(st.client_mss(&k), Some(1460));
            let how = if port % 2 == 0 {
                Refusal::Silently
            } else {
                Refusal::Reset
            };
            st.refuse(&k, how);
            assert_eq!(st.client_mss(&k), None);
        }
        assert_eq!(st.connections(), 0);
    }

    #[test]
    fn syn_ack_echoes_the_clients_timestamps() {
        // Without timestamps the client's kernel cannot reuse the port from
        // TIME-WAIT (tcp_tw_reuse needs them).
        let mut st = stack();
        let k = key();
        accepted(
            &mut st,
            k,
            segment(k, TcpControl::Syn, 1000, None, Some(77), &[]),
        );
        let (_, syn, _, _, tsval) = reply(&mut st);
        assert!(syn);
        assert!(tsval.is_some(), "SYN-ACK without a timestamp option");
    }

    #[test]
    fn a_newer_syn_on_a_closing_connection_opens_a_new_one() {
        let mut st = stack();
        let k = key();
        let old = closed_by_client(&mut st, k);
        // The old SYN again, and a SYN with an older timestamp: still the old
        // connection's (smoltcp ignores them).
        assert!(st.holds(&k, &segment(k, TcpControl::Syn, 1000, None, Some(100), &[])));
        assert!(st.holds(&k, &segment(k, TcpControl::Syn, 9000, None, Some(50), &[])));
        assert_eq!(st.connection(&k), Some(old));
        // The client reused the port for a new connection: newer timestamp.
        let new = segment(k, TcpControl::Syn, 500, None, Some(5000), &[]);
        assert_eq!(st.syn(k, new), SynVerdict::Hold);
        assert_eq!(st.connection(&k), None);
        // Its relay still runs: the old socket is closed (it takes nothing).
        assert_eq!(st.tcp(old).unwrap().state(), tcp::State::Closed);
        let h = st.accept(k).expect("the new SYN is answered");
        let (_, syn, _, rst, _) = reply(&mut st);
        assert!(syn && !rst);
        assert_eq!(st.tcp(h).unwrap().state(), tcp::State::SynReceived);
        // The old relay ends: releasing its socket leaves the new connection.
        st.release(k, old, None);
        assert_eq!(st.connection(&k), Some(h));
    }

    #[test]
    fn an_aborted_connection_sends_its_rst_before_it_leaves_the_table() {
        let mut st = stack();
        let h = closed_by_client(&mut st, key());
        st.tcp(h).unwrap().abort();
        st.release(key(), h, None);
        // One round of the driver: poll, then reap.
        st.poll();
        st.reap();
        let (_, _, _, rst, _) = reply(&mut st);
        assert!(rst, "the client never hears of the abort");
        assert_eq!(st.connection(&key()), None);
        assert_eq!(st.connections(), 0);
    }

    #[test]
    fn rings_of_short_clean_connections_serve_the_next_ones() {
        let mut st = stack();
        let (small, big, unknown) = (
            (sa("10.1.0.5:40001"), sa("10.96.0.10:80")),
            (sa("10.1.0.5:40002"), sa("10.96.0.10:80")),
            (sa("10.1.0.5:40003"), sa("10.96.0.10:80")),
        );
        let hs = closed_by_client(&mut st, small);
        let hb = closed_by_client(&mut st, big);
        let hu = closed_by_client(&mut st, unknown);
        for h in [hs, hb, hu] {
            st.tcp(h).unwrap().abort();
        }
        st.release(small, hs, Some((300, 5_000)));
        st.release(big, hb, Some((300, 10 << 20)));
        st.release(unknown, hu, None);
        st.poll();
        st.reap();
        assert_eq!(st.connections(), 0);
        // Both rings of the short one; one of the bulk one (its receive
        // side moved little); none of the one that ended by reset.
        assert_eq!(st.rings_kept(), 3);
        let again = (sa("10.1.0.5:40004"), sa("10.96.0.10:80"));
        let h = accepted(&mut st, again, syn(again));
        assert_eq!(st.rings_kept(), 1);
        assert_eq!(st.tcp(h).unwrap().state(), tcp::State::SynReceived);
    }

    #[test]
    fn rings_of_an_idle_connection_give_their_pages_back() {
        let mut st = stack();
        let k = key();
        let h = accepted(
            &mut st,
            k,
            segment(k, TcpControl::Syn, 1000, None, Some(100), &[]),
        );
        let (iss, ..) = reply(&mut st);
        let ack = Some(iss.wrapping_add(1));
        let resident = |st: &Stack| {
            let l = st.lent.get(&h).unwrap();
            (l.rx.resident_pages(), l.tx.resident_pages())
        };
        // A request comes in and is taken out; an answer goes out and is
        // acknowledged: both rings touched, both empty.
        st.push_rx(segment(
            k,
            TcpControl::None,
            1001,
            ack,
            Some(101),
            &[b'q'; 500],
        ));
        st.poll();
        let mut out = [0u8; 600];
        assert_eq!(st.tcp(h).unwrap().recv_slice(&mut out), Ok(500));
        assert_eq!(st.tcp(h).unwrap().send_slice(&[b'a'; 700]), Ok(700));
        st.touch(h);
        st.poll();
        while st.dev.pop_tx().is_some() {}
        let acked = Some(iss.wrapping_add(701));
        st.push_rx(segment(k, TcpControl::None, 1501, acked, Some(102), &[]));
        st.poll();
        assert_eq!(st.tcp(h).unwrap().send_queue(), 0);
        assert_eq!(resident(&st), (1, 1));
        // The sweep after the one that saw bytes move trims them.
        st.trim_idle();
        assert_eq!(resident(&st), (1, 1), "bytes moved since the last sweep");
        st.trim_idle();
        assert_eq!(resident(&st), (0, 0));
        // Bytes waiting in a ring keep it; moving them re-arms the sweep.
        st.push_rx(segment(
            k,
            TcpControl::None,
            1501,
            acked,
            Some(103),
            &[b'r'; 100],
        ));
        st.poll();
        st.trim_idle();
        st.trim_idle();
        assert_eq!(resident(&st).0, 1, "a ring holding bytes is not trimmed");
        assert_eq!(st.tcp(h).unwrap().recv_slice(&mut out), Ok(100));
        st.touch(h);
        st.trim_idle();
        st.trim_idle();
        assert_eq!(resident(&st), (0, 0));
        assert_eq!(st.tcp(h).unwrap().state(), tcp::State::Established);
    }

    #[test]
    fn a_shard_set_names_exactly_its_shards_in_order() {
        let mut a = ShardSet::default();
        assert_eq!(a.iter().count(), 0);
        for i in [255, 0, 64, 63, 130] {
            a.insert(i);
        }
        a.insert(64);
        assert_eq!(a.iter().collect::<Vec<_>>(), [0, 63, 64, 130, 255]);
        a.remove(63);
        a.remove(7);
        assert!(!a.contains(63) && a.contains(64) && a.contains(255));
        let mut b = ShardSet::default();
        b.insert(7);
        b.insert(255);
        assert_eq!(a.union(&b).iter().collect::<Vec<_>>(), [0, 7, 64, 130, 255]);
        a.insert(SHARDS);
        assert_eq!(a.iter().count(), 4, "no shard beyond the last");
    }

    #[test]
    fn no_two_stacks_spread_connections_alike() {
        let (a, b) = (stack(), stack());
        let keys: Vec<ConnKey> = (0..64u16)
            .map(|p| (sa(&format!("10.1.0.5:{}", 40_000 + p)), sa("10.96.0.10:80")))
            .collect();
        let shards =
            |st: &Stack| -> Vec<usize> { keys.iter().map(|k| shard_of(&st.seed, k)).collect() };
        assert_eq!(
            shards(&a),
            shards(&a),
            "one stack, one shard per connection"
        );
        assert_ne!(
            shards(&a),
            shards(&b),
            "a client cannot tell which connections share a shard"
        );
    }

    #[test]
    fn a_timer_alone_gets_its_shard_polled() {
        let mut st = stack();
        accepted(&mut st, key(), syn(key()));
        st.poll();
        let (_, syn_flag, ..) = reply(&mut st);
        assert!(syn_flag, "the SYN-ACK");
        assert!(st.dev.pop_tx().is_none());
        // Nothing touches the socket from here: only its timer calls for a poll.
        let due = st.next_due().expect("the SYN-ACK's retransmission timer");
        st.poll_at(due);
        let (_, syn_flag, ..) = reply(&mut st);
        assert!(syn_flag, "the SYN-ACK again when its timer fires");
    }

    #[test]
    fn unanswered_syn_ack_releases_the_socket() {
        let mut st = stack();
        let h = accepted(&mut st, key(), syn(key()));
        let later = SmolInstant::now() + smoltcp::time::Duration::from_secs(30);
        st.poll_at(later);
        assert_eq!(st.tcp(h).unwrap().state(), tcp::State::SynReceived);
        let much_later = later + smoltcp::time::Duration::from_secs(31);
        st.poll_at(much_later);
        st.poll_at(much_later);
        assert_eq!(st.tcp(h).unwrap().state(), tcp::State::Closed);
    }

    #[test]
    fn udp_to_a_port_without_frontend_gets_port_unreachable() {
        let mut st = stack();
        let mut p = Vec::new();
        udp_packet(sa("10.1.0.5:5000"), sa("10.96.0.10:54"), b"x", &mut p).unwrap();
        st.push_rx(p);
        st.poll();
        let out = st.dev.pop_tx().expect("an ICMP reply");
        let ip = Ipv4Packet::new_checked(&out[..]).unwrap();
        assert_eq!(ip.next_header(), IpProtocol::Icmp);
        let icmp = smoltcp::wire::Icmpv4Packet::new_checked(ip.payload()).unwrap();
        assert_eq!(
            icmp.msg_type(),
            smoltcp::wire::Icmpv4Message::DstUnreachable
        );
        assert_eq!(icmp.msg_code(), 3, "port unreachable");
    }
}
