//! The ClusterIP front end: packets from the TUN are classified against the
//! snapshot; new TCP flows have their SYN held until a backend accepted, then a
//! smoltcp socket answers it; UDP datagrams are proxied per flow; everything
//! else (and every refusal) goes to smoltcp, which answers with RST or ICMP port
//! unreachable itself.

use std::cell::RefCell;
use std::collections::{HashMap, VecDeque};
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::ops::Range;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use rand::rngs::SmallRng;
use rand::SeedableRng;
use smoltcp::iface::{Config, Interface, SocketHandle, SocketSet};
use smoltcp::phy::ChecksumCapabilities;
use smoltcp::socket::tcp;
use smoltcp::time::Instant as SmolInstant;
use smoltcp::wire::{
    HardwareAddress, IpAddress, IpCidr, IpListenEndpoint, IpProtocol, Ipv4Address, Ipv4Packet,
    Ipv4Repr, Ipv6Address, Ipv6Packet, Ipv6Repr, TcpPacket, UdpPacket, UdpRepr,
};
use tokio::io::unix::AsyncFd;
use tokio::sync::{watch, Notify};

use super::bridge;
use super::device::{QueueDevice, Tun};
use super::offload::{self, RxChecksum};
use super::opening::Opening;
use crate::dataplane::flow::{resolve, FlowKey, Verdict};
use crate::dataplane::relay::connect;
use crate::dataplane::udp::{FlowEntry, FlowIo, FlowTable};
use crate::dataplane::Shared;
use crate::model::Protocol;
use crate::state::{Frontend, Snapshot};

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

/// What to do with one packet read from the TUN. Pure: decided from the
/// snapshot and the packet bytes alone.
#[derive(Debug, Clone)]
pub enum Classified {
    /// Hand it to smoltcp: established TCP, and refusals it answers with RST or
    /// ICMP port unreachable.
    Stack,
    /// Drop silently (Local policy without local endpoints, source ranges,
    /// malformed packets).
    Drop,
    /// A new TCP connection to a frontend with usable endpoints.
    Syn {
        /// Client address.
        client: SocketAddr,
        /// VIP and port.
        vip: SocketAddr,
        /// The frontend.
        fe: Arc<Frontend>,
    },
    /// A UDP datagram for a frontend with usable endpoints.
    Udp {
        /// Client address.
        client: SocketAddr,
        /// VIP and port.
        vip: SocketAddr,
        /// The frontend.
        fe: Arc<Frontend>,
        /// Where the datagram's payload is in the packet.
        payload: Range<usize>,
    },
}

/// IP addresses, transport protocol and transport bytes of a packet.
struct Parsed {
    src: IpAddr,
    dst: IpAddr,
    proto: IpProtocol,
    /// Offset of the transport header.
    l4: usize,
    /// End of the IP payload.
    end: usize,
}

fn parse_ip(packet: &[u8]) -> Option<Parsed> {
    match packet.first()? >> 4 {
        4 => {
            let p = Ipv4Packet::new_checked(packet).ok()?;
            if p.more_frags() || p.frag_offset() != 0 {
                return None;
            }
            Some(Parsed {
                src: IpAddr::V4(p.src_addr()),
                dst: IpAddr::V4(p.dst_addr()),
                proto: p.next_header(),
                l4: usize::from(p.header_len()),
                end: usize::from(p.total_len()),
            })
        }
        6 => {
            let p = Ipv6Packet::new_checked(packet).ok()?;
            Some(Parsed {
                src: IpAddr::V6(p.src_addr()),
                dst: IpAddr::V6(p.dst_addr()),
                proto: p.next_header(),
                l4: 40,
                end: 40 + usize::from(p.payload_len()),
            })
        }
        _ => None,
    }
}

/// Classifies one packet from the TUN.
pub fn classify(snap: &Snapshot, packet: &[u8]) -> Classified {
    let Some(ip) = parse_ip(packet) else {
        // Fragments, extension headers and anything odd: smoltcp decides.
        return Classified::Stack;
    };
    let Some(l4) = packet.get(ip.l4..ip.end) else {
        return Classified::Drop;
    };
    let (proto, sport, dport) = match ip.proto {
        IpProtocol::Tcp => {
            let Ok(t) = TcpPacket::new_checked(l4) else {
                return Classified::Drop;
            };
            if !t.syn() || t.ack() || t.rst() {
                return Classified::Stack;
            }
            (Protocol::Tcp, t.src_port(), t.dst_port())
        }
        IpProtocol::Udp => {
            let Ok(u) = UdpPacket::new_checked(l4) else {
                return Classified::Drop;
            };
            (Protocol::Udp, u.src_port(), u.dst_port())
        }
        _ => return Classified::Stack,
    };
    let key = FlowKey {
        src: SocketAddr::new(ip.src, sport),
        dst: SocketAddr::new(ip.dst, dport),
        proto,
    };
    match (resolve(snap, &key), proto) {
        (Verdict::Forward(fe), Protocol::Tcp) => Classified::Syn {
            client: key.src,
            vip: key.dst,
            fe,
        },
        (Verdict::Forward(fe), Protocol::Udp) => {
            let start = ip.l4 + 8;
            let len = UdpPacket::new_checked(l4)
                .map(|u| usize::from(u.len()))
                .unwrap_or(8);
            Classified::Udp {
                client: key.src,
                vip: key.dst,
                fe,
                payload: start..(ip.l4 + len.max(8)).min(ip.end),
            }
        }
        (Verdict::Refuse(_), _) => Classified::Stack,
        (Verdict::Drop(_), _) => Classified::Drop,
    }
}

/// Writes an IP+UDP packet from `src` to `dst` carrying `payload` into `out`.
/// `None` when the families differ or the payload does not fit.
pub fn udp_packet(
    src: SocketAddr,
    dst: SocketAddr,
    payload: &[u8],
    out: &mut Vec<u8>,
) -> Option<()> {
    let caps = ChecksumCapabilities::default();
    let udp = UdpRepr {
        src_port: src.port(),
        dst_port: dst.port(),
    };
    let udp_len = 8 + payload.len();
    let fill = |b: &mut [u8]| b.copy_from_slice(payload);
    match (src.ip(), dst.ip()) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            let ip = Ipv4Repr {
                src_addr: s,
                dst_addr: d,
                next_header: IpProtocol::Udp,
                payload_len: udp_len,
                hop_limit: 64,
            };
            if ip.buffer_len() + udp_len > usize::from(u16::MAX) {
                return None;
            }
            out.clear();
            out.resize(ip.buffer_len() + udp_len, 0);
            let mut p = Ipv4Packet::new_unchecked(&mut out[..]);
            ip.emit(&mut p, &caps);
            let mut u = UdpPacket::new_unchecked(p.payload_mut());
            udp.emit(&mut u, &s.into(), &d.into(), payload.len(), fill, &caps);
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            let ip = Ipv6Repr {
                src_addr: s,
                dst_addr: d,
                next_header: IpProtocol::Udp,
                payload_len: udp_len,
                hop_limit: 64,
            };
            if udp_len > usize::from(u16::MAX) {
                return None;
            }
            out.clear();
            out.resize(ip.buffer_len() + udp_len, 0);
            let mut p = Ipv6Packet::new_unchecked(&mut out[..]);
            ip.emit(&mut p);
            let mut u = UdpPacket::new_unchecked(p.payload_mut());
            udp.emit(&mut u, &s.into(), &d.into(), payload.len(), fill, &caps);
        }
        _ => return None,
    }
    Some(())
}

/// An IP+TCP packet carrying `tcp` from `src` to `dst` (same family), with
/// valid checksums. The one TCP packet builder of the tests.
#[cfg(test)]
pub(crate) fn tcp_packet_of(src: IpAddr, dst: IpAddr, tcp: &smoltcp::wire::TcpRepr) -> Vec<u8> {
    let caps = ChecksumCapabilities::default();
    let emit_tcp = |b: &mut [u8], s: IpAddress, d: IpAddress| {
        tcp.emit(&mut TcpPacket::new_unchecked(b), &s, &d, &caps);
    };
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            let ip = Ipv4Repr {
                src_addr: s,
                dst_addr: d,
                next_header: IpProtocol::Tcp,
                payload_len: tcp.buffer_len(),
                hop_limit: 64,
            };
            let mut out = vec![0u8; ip.buffer_len() + tcp.buffer_len()];
            let mut p = Ipv4Packet::new_unchecked(&mut out[..]);
            ip.emit(&mut p, &caps);
            emit_tcp(p.payload_mut(), s.into(), d.into());
            out
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            let ip = Ipv6Repr {
                src_addr: s,
                dst_addr: d,
                next_header: IpProtocol::Tcp,
                payload_len: tcp.buffer_len(),
                hop_limit: 64,
            };
            let mut out = vec![0u8; ip.buffer_len() + tcp.buffer_len()];
            let mut p = Ipv6Packet::new_unchecked(&mut out[..]);
            ip.emit(&mut p);
            emit_tcp(p.payload_mut(), s.into(), d.into());
            out
        }
        _ => panic!("{src} and {dst} are of different families"),
    }
}

/// A connection's identity: (client, VIP).
pub type ConnKey = (SocketAddr, SocketAddr);

/// What tells a connection's SYN from the SYN of a later connection on the
/// same 4-tuple: its sequence number and, when it carries one, its timestamp.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SynId {
    /// Initial sequence number.
    pub seq: u32,
    /// TSval of the timestamp option (RFC 7323).
    pub tsval: Option<u32>,
}

/// The [`SynId`] of a TCP segment (any flags), `None` when it is not TCP.
pub fn syn_id(packet: &[u8]) -> Option<SynId> {
    let ip = parse_ip(packet)?;
    if ip.proto != IpProtocol::Tcp {
        return None;
    }
    let tcp = TcpPacket::new_checked(packet.get(ip.l4..ip.end)?).ok()?;
    // Checksums were verified on the way in (offload::verify or the kernel).
    let repr = smoltcp::wire::TcpRepr::parse(
        &tcp,
        &ip.src.into(),
        &ip.dst.into(),
        &ChecksumCapabilities::ignored(),
    )
    .ok()?;
    Some(SynId {
        seq: repr.seq_number.0 as u32,
        tsval: repr.timestamp.map(|t| t.tsval),
    })
}

/// True when `new`, a SYN on the 4-tuple of a connection that is closing
/// (TIME-WAIT, or the client's FIN seen), starts a new connection, as the
/// kernel decides in tcp_timewait_state_process (RFC 6191): its timestamp is
/// newer, or without timestamps its sequence number is after the old one.
///
/// The kernel compares with the old connection's next expected sequence
/// number; smoltcp does not expose it, so this compares with the old
/// connection's initial one. That admits no duplicate: the only SYN the old
/// connection ever sent carries its own initial sequence number, and SYNs of
/// earlier connections (clock-driven ISNs and timestamps, RFC 6528) are older
/// still. A timestamp older than the old connection's is rejected (PAWS).
pub fn supersedes(old: SynId, new: SynId) -> bool {
    if new.seq == old.seq {
        // The old connection's own SYN, retransmitted.
        return false;
    }
    let after = |a: u32, b: u32| (a.wrapping_sub(b) as i32) > 0;
    match (old.tsval, new.tsval) {
        (Some(o), Some(n)) if n != o => after(n, o),
        _ => after(new.seq, old.seq),
    }
}

/// An accepted connection: its socket and the SYN that opened it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Conn {
    sock: ConnSocket,
    syn: SynId,
}

/// Socket sets the stack's connections are spread over. smoltcp finds the
/// socket of an incoming segment, and the sockets with something to send, by
/// walking its whole set: with one set, every packet cost a walk over every
/// connection (5,000 idle connections halved a bulk stream's throughput).
/// A packet is handled with its connection's shard only.
const SHARDS: usize = 256;

/// A connection's socket: its shard and its handle there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnSocket {
    shard: usize,
    handle: SocketHandle,
}

/// One socket set with the packets waiting for it and its next timer.
struct Shard {
    sockets: SocketSet<'static>,
    rx: VecDeque<Vec<u8>>,
    /// Polled since its sockets or queue last changed?
    dirty: bool,
    /// When a socket of this set next needs polling (retransmits, timeouts).
    due: Option<SmolInstant>,
}

/// The shard of a connection: a hash of client and VIP.
fn shard_of(key: &ConnKey) -> usize {
    let mut h = std::hash::DefaultHasher::new();
    std::hash::Hash::hash(key, &mut h);
    (std::hash::Hasher::finish(&h) % SHARDS as u64) as usize
}

/// The shard a packet from the TUN belongs to: its TCP/UDP (client, VIP),
/// or shard 0 for anything without ports (smoltcp answers those itself).
fn shard_of_packet(packet: &[u8]) -> usize {
    let Some(ip) = parse_ip(packet) else {
        return 0;
    };
    let ports = packet.get(ip.l4..ip.l4 + 4);
    match (ip.proto, ports) {
        (IpProtocol::Tcp | IpProtocol::Udp, Some(&[a, b, c, d])) => shard_of(&(
            SocketAddr::new(ip.src, u16::from_be_bytes([a, b])),
            SocketAddr::new(ip.dst, u16::from_be_bytes([c, d])),
        )),
        _ => 0,
    }
}

/// The smoltcp interface, its sockets and the flows being set up.
pub struct Stack {
    /// smoltcp interface (any-IP).
    pub iface: Interface,
    /// Packet queues between the TUN and the interface. Packets for smoltcp
    /// go in through [`Stack::push_rx`], which files them under their shard.
    pub dev: QueueDevice,
    /// TCP sockets, sharded by connection.
    shards: Vec<Shard>,
    /// Established (or closing) connections.
    conns: HashMap<ConnKey, Conn>,
    /// SYNs held while a backend connect is in flight.
    pending: HashMap<ConnKey, Vec<u8>>,
    /// The client's own MSS, for connections whose SYN smoltcp saw with a
    /// larger one: segments to them go out with this `gso_size`.
    client_mss: HashMap<ConnKey, u16>,
    /// Sockets whose relay ended, removed once closed.
    closing: Vec<(ConnKey, ConnSocket)>,
    /// UDP flows.
    udp: FlowTable<ConnKey, FlowIo>,
    /// UDP flows whose backend socket is being set up, with their datagrams.
    udp_opening: Opening<ConnKey>,
    settings: TunSettings,
    warned_full: bool,
    warned_udp_full: bool,
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
    pub fn new(settings: TunSettings, udp_idle: Duration) -> Self {
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
                    dirty: false,
                    due: None,
                })
                .collect(),
            conns: HashMap::new(),
            pending: HashMap::new(),
            client_mss: HashMap::new(),
            closing: Vec::new(),
            udp: FlowTable::new(udp_idle, settings.max_udp_flows),
            udp_opening: Opening::default(),
            settings,
            warned_full: false,
            warned_udp_full: false,
        }
    }

    /// Queues a packet from the TUN for smoltcp, with its connection's shard.
    pub fn push_rx(&mut self, packet: Vec<u8>) {
        let i = shard_of_packet(&packet);
        if let Some(sh) = self.shards.get_mut(i) {
            sh.rx.push_back(packet);
            sh.dirty = true;
        }
    }

    /// Runs the interface over everything queued and every timer due.
    pub fn poll(&mut self) {
        self.poll_at(now());
    }

    /// Runs the interface as if it were `at` (tests drive the clock): each
    /// shard with packets queued, sockets touched or a timer due.
    pub fn poll_at(&mut self, at: SmolInstant) {
        for i in 0..SHARDS {
            let Some(sh) = self.shards.get(i) else { break };
            if sh.dirty || sh.due.is_some_and(|d| d <= at) {
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
        sh.dirty = false;
        sh.due = self.iface.poll_at(at, &sh.sockets);
    }

    /// When the interface next needs polling for a timer, if ever.
    pub fn next_due(&self) -> Option<SmolInstant> {
        self.shards.iter().filter_map(|s| s.due).min()
    }

    /// A connection's smoltcp socket; its shard is polled on the next round.
    pub fn tcp(&mut self, c: ConnSocket) -> Option<&mut tcp::Socket<'static>> {
        let sh = self.shards.get_mut(c.shard)?;
        sh.dirty = true;
        Some(sh.sockets.get_mut::<tcp::Socket>(c.handle))
    }

    /// The socket of an accepted connection.
    pub fn connection(&self, key: &ConnKey) -> Option<ConnSocket> {
        self.conns.get(key).map(|c| c.sock)
    }

    /// True when a connection holds `key` and the SYN in `packet` is its own
    /// (a retransmit) or not newer. A connection that is closing and sees a
    /// newer SYN ([`supersedes`]) is forgotten at once, so the SYN opens a new
    /// connection instead of waiting for the client's SYN retransmits.
    fn holds(&mut self, key: &ConnKey, packet: &[u8]) -> bool {
        let Some(conn) = self.conns.get(key).copied() else {
            return false;
        };
        let closing = self.tcp(conn.sock).is_none_or(|s| {
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
        if !(closing && newer) {
            return true;
        }
        self.conns.remove(key);
        self.client_mss.remove(key);
        match self.closing.iter().position(|(_, c)| *c == conn.sock) {
            // Its relay is over: the socket goes now, without a packet.
            Some(i) => {
                self.closing.swap_remove(i);
                if let Some(sh) = self.shards.get_mut(conn.sock.shard) {
                    sh.sockets.remove(conn.sock.handle);
                }
            }
            // Its relay still runs (client gone, backend still sending): the
            // closed socket ends it, and `release` then removes the socket.
            // A closed socket takes no segment, so the new one gets them all.
            None => {
                if let Some(s) = self.tcp(conn.sock) {
                    close_silently(s);
                }
            }
        }
        false
    }

    /// Removes sockets whose relay ended and whose TCP connection is over.
    fn reap(&mut self) {
        let shards = &mut self.shards;
        let conns = &mut self.conns;
        let client_mss = &mut self.client_mss;
        self.closing.retain(|(key, c)| {
            let Some(sh) = shards.get_mut(c.shard) else {
                return false;
            };
            let s = sh.sockets.get::<tcp::Socket>(c.handle);
            let done = matches!(s.state(), tcp::State::Closed | tcp::State::TimeWait);
            if done {
                sh.sockets.remove(c.handle);
                // A newer connection may hold the key already (see `holds`).
                if conns.get(key).is_some_and(|held| held.sock == *c) {
                    conns.remove(key);
                    client_mss.remove(key);
                }
            }
            !done
        });
    }

    /// Answers a held SYN with a fresh socket listening on exactly its VIP:port.
    /// Returns the socket when the SYN was taken.
    fn accept(&mut self, key: ConnKey, syn: Vec<u8>) -> Option<ConnSocket> {
        let id = syn_id(&syn)?;
        let size = self.settings.socket_buffer;
        let mut s = tcp::Socket::new(
            tcp::SocketBuffer::new(vec![0; size]),
            tcp::SocketBuffer::new(vec![0; size]),
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
        let shard = shard_of(&key);
        let handle = self.shards.get_mut(shard)?.sockets.add(s);
        let c = ConnSocket { shard, handle };
        self.push_rx(syn);
        self.poll_shard(shard, now());
        // Another listener on the same VIP:port must never linger: it would
        // take a different client's SYN.
        let sockets = &mut self.shards.get_mut(shard)?.sockets;
        if sockets.get::<tcp::Socket>(handle).state() == tcp::State::Listen {
            sockets.remove(handle);
            return None;
        }
        self.conns.insert(key, Conn { sock: c, syn: id });
        Some(c)
    }

    /// Marks a connection's socket for removal once closed: the driver's
    /// next round polls it (an aborted one sends its RST then) and reaps it.
    pub fn release(&mut self, key: ConnKey, c: ConnSocket) {
        self.closing.push((key, c));
    }
}

/// The packet path without I/O: classifies `packet` and hands smoltcp what it
/// would get, answering a held SYN as if its backend had accepted at once.
/// Returns how many packets the stack queued for the wire, dropping them. For
/// fuzzing and tests.
pub fn ingest_offline(stack: &mut Stack, snap: &Snapshot, packet: &[u8]) -> usize {
    ingest_offline_queued(stack, snap, packet);
    let mut n = 0;
    while let Some(p) = stack.dev.pop_tx() {
        stack.dev.recycle(p);
        n += 1;
    }
    n
}

/// [`ingest_offline`], leaving the stack's replies queued in `stack.dev` for
/// the caller (benchmarks drive a peer with them).
pub fn ingest_offline_queued(stack: &mut Stack, snap: &Snapshot, packet: &[u8]) {
    match classify(snap, packet) {
        Classified::Stack => {
            stack.push_rx(packet.to_vec());
            stack.poll();
        }
        Classified::Syn { client, vip, .. } => {
            let key = (client, vip);
            if !stack.holds(&key, packet) {
                let _ = stack.accept(key, packet.to_vec());
            }
        }
        Classified::Drop | Classified::Udp { .. } => {}
    }
}

/// A small snapshot for the fuzz target and tests: Service `default/web` at
/// 10.96.0.10 and fd00:10:96::10, TCP 80 → 8080 and UDP 53 → 5353, with one
/// endpoint 10.0.0.1 when `with_endpoints`.
pub fn sample_snapshot(with_endpoints: bool) -> Snapshot {
    use crate::discovery::Update;
    use crate::model::{
        AddressFamily, Endpoint, EndpointSlice, Object, ObjectKey, Service, ServicePort, SlicePort,
        TargetPort,
    };
    use std::net::{Ipv4Addr, Ipv6Addr};
    let port = |name: &str, protocol, port, target| ServicePort {
        name: name.into(),
        protocol,
        port,
        node_port: None,
        target_port: TargetPort::Number(target),
    };
    let svc = Service {
        cluster_ips: vec![
            IpAddr::V4(Ipv4Addr::new(10, 96, 0, 10)),
            IpAddr::V6(Ipv6Addr::new(0xfd00, 0x10, 0x96, 0, 0, 0, 0, 0x10)),
        ],
        ports: vec![
            port("tcp", Protocol::Tcp, 80, 8080),
            port("udp", Protocol::Udp, 53, 5353),
        ],
        ..Service::new(ObjectKey::new("default", "web"))
    };
    let slice_port = |name: &str, protocol, port| SlicePort {
        name: name.into(),
        protocol,
        port: Some(port),
    };
    let slice = EndpointSlice {
        key: ObjectKey::new("default", "web-1"),
        service_name: "web".into(),
        family: AddressFamily::V4,
        ports: vec![
            slice_port("tcp", Protocol::Tcp, 8080),
            slice_port("udp", Protocol::Udp, 5353),
        ],
        endpoints: if with_endpoints {
            vec![Endpoint::ready(IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1)))]
        } else {
            vec![]
        },
    };
    let mut st = crate::state::Store::new();
    st.apply(Update::Reset(vec![
        Object::Service(svc),
        Object::EndpointSlice(slice),
    ]));
    let ctx = crate::state::NodeContext {
        proxy_name: "ringvip".into(),
        ..crate::state::NodeContext::default()
    };
    st.compile(&ctx, &crate::telemetry::Metrics::new(), 1)
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

/// Everything the TUN thread's tasks share.
pub struct Ctx {
    /// The stack.
    pub stack: RefCell<Stack>,
    /// Wakes the driver to poll and flush.
    pub poke: Notify,
    /// Snapshot, affinity, settings.
    pub shared: Arc<Shared>,
    rng: RefCell<SmallRng>,
}

/// Runs the TUN front end on the current tokio-uring thread until `stop` closes.
pub async fn run(
    tun: Tun,
    shared: Arc<Shared>,
    settings: TunSettings,
    mut stop: watch::Receiver<Arc<Snapshot>>,
) -> io::Result<()> {
    // SAFETY: `Tun` owns its descriptor and closes it only when dropped, which
    // happens after the AsyncFd (its owner) is dropped.
    let fd = unsafe { AsyncFd::register(tun) }?;
    let ctx = Rc::new(Ctx {
        stack: RefCell::new(Stack::new(settings, shared.settings.udp_idle_timeout)),
        poke: Notify::new(),
        shared,
        rng: RefCell::new(SmallRng::from_os_rng()),
    });
    let mut sweep = tokio::time::interval(Duration::from_secs(1));
    // Whatever the MTU, a TSO super-packet can be 64 KiB of IPv6 payload
    // plus its header.
    let rx_max = settings.mtu.max(usize::from(u16::MAX) + 40);
    loop {
        // Packets in, through the classifier, read straight into pooled buffers.
        // At most a batch at a time, so relays get their turn under load.
        let mut drained = false;
        for _ in 0..256 {
            let mut buf = ctx.stack.borrow_mut().dev.buffer();
            match fd.get_ref().recv(&mut buf, rx_max) {
                Ok(RxChecksum::Unverified) if !offload::verify(&buf) => {
                    ctx.stack.borrow_mut().dev.recycle(buf);
                }
                Ok(_) => ingress(&ctx, buf),
                Err(e) => {
                    ctx.stack.borrow_mut().dev.recycle(buf);
                    if e.kind() != io::ErrorKind::WouldBlock {
                        tracing::warn!(error = %e, "reading the TUN failed");
                    }
                    drained = true;
                    break;
                }
            }
        }
        let delay = {
            let mut st = ctx.stack.borrow_mut();
            st.poll();
            st.reap();
            let st = &mut *st;
            flush(&fd, &mut st.dev, &st.client_mss);
            let t = now();
            st.next_due().map(|d| {
                if d > t {
                    d - t
                } else {
                    smoltcp::time::Duration::ZERO
                }
            })
        };
        if !drained {
            // Packets are still waiting: readiness is edge-triggered, so no new
            // wake-up would come for them. Let other tasks run, then read on.
            tokio::task::yield_now().await;
            continue;
        }
        let wait_write = ctx.stack.borrow().dev.tx_len() > 0;
        let sleep = tokio::time::sleep(delay.map_or(Duration::from_millis(100), |d| {
            Duration::from_micros(d.total_micros())
        }));
        tokio::select! {
            r = fd.readable() => {
                if let Ok(mut g) = r {
                    g.clear_ready();
                }
            }
            r = fd.writable(), if wait_write => {
                if let Ok(mut g) = r {
                    g.clear_ready();
                }
            }
            _ = ctx.poke.notified() => {}
            _ = sleep => {}
            _ = sweep.tick() => {
                let dead = ctx.stack.borrow_mut().udp.expire(std::time::Instant::now());
                drop(dead);
            }
            r = stop.changed() => if r.is_err() { return Ok(()) },
        }
    }
}

/// Writes queued packets to the TUN until it would block.
fn flush(fd: &AsyncFd<Tun>, dev: &mut QueueDevice, client_mss: &HashMap<ConnKey, u16>) {
    while let Some(mut p) = dev.pop_tx() {
        // Only segments larger than any MSS can need cutting.
        let mss = match offload::tcp_flow(&p) {
            Some((key, len)) if len > 536 && !client_mss.is_empty() => {
                client_mss.get(&key).copied()
            }
            _ => None,
        };
        match fd.get_ref().send(&mut p, mss) {
            Ok(_) => dev.recycle(p),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                dev.unpop_tx(p);
                return;
            }
            Err(e) => {
                tracing::debug!(error = %e, "writing to the TUN failed");
                dev.recycle(p);
            }
        }
    }
}

/// Handles one packet from the TUN.
fn ingress(ctx: &Rc<Ctx>, packet: Vec<u8>) {
    let verdict = classify(&ctx.shared.snapshot.load(), &packet);
    let mut st = ctx.stack.borrow_mut();
    match verdict {
        Classified::Stack => st.push_rx(packet),
        Classified::Drop => st.dev.recycle(packet),
        Classified::Syn { client, vip, fe } => {
            let key = (client, vip);
            if st.holds(&key, &packet) {
                // A retransmitted SYN for a connection already answered.
                st.push_rx(packet);
            } else if st.pending.contains_key(&key) {
                // Still connecting to a backend: the client retransmits.
                st.dev.recycle(packet);
            } else if st.pending.len() + st.conns.len() >= st.settings.max_connections {
                st.dev.recycle(packet);
                if !st.warned_full {
                    tracing::warn!(
                        max = st.settings.max_connections,
                        "TUN connection limit reached: new SYNs are dropped"
                    );
                    st.warned_full = true;
                }
            } else {
                st.warned_full = false;
                let mut packet = packet;
                // smoltcp may then send segments as large as the TUN takes; the
                // kernel cuts them to the client's MSS (see offload.rs).
                let raised = u16::try_from(st.settings.mtu.saturating_sub(60)).unwrap_or(u16::MAX);
                if let Some(mss) = offload::raise_syn_mss(&mut packet, raised) {
                    st.client_mss.insert(key, mss);
                }
                // Hold a copy the size of the SYN: the read buffer is MTU-sized
                // (64 KiB, resident), and a SYN flood can hold thousands.
                let held = packet.to_vec();
                st.dev.recycle(packet);
                st.pending.insert(key, held);
                drop(st);
                tokio_uring::spawn(open_connection(ctx.clone(), key, fe));
            }
        }
        Classified::Udp {
            client,
            vip,
            fe,
            payload,
        } => {
            drop(st);
            if let Some(data) = packet.get(payload) {
                udp_ingress(ctx, (client, vip), fe, data);
            }
            ctx.stack.borrow_mut().dev.recycle(packet);
        }
    }
}

/// Connects to a backend for a held SYN, then answers it (or refuses).
async fn open_connection(ctx: Rc<Ctx>, key: ConnKey, fe: Arc<Frontend>) {
    // Over --max-connections(-per-frontend): the SYN is dropped, no SYN-ACK
    // or RST, as with --tun-max-connections.
    let Some(_slot) = ctx.shared.limits.admit(&fe) else {
        let mut st = ctx.stack.borrow_mut();
        if let Some(syn) = st.pending.remove(&key) {
            st.dev.recycle(syn);
        }
        return;
    };
    let res = connect(&fe, key.0.ip(), &ctx.shared, &ctx.rng).await;
    let (handle, backend) = {
        let mut st = ctx.stack.borrow_mut();
        let Some(syn) = st.pending.remove(&key) else {
            st.client_mss.remove(&key);
            return;
        };
        match res {
            Ok((backend, _)) => match st.accept(key, syn) {
                Some(h) => (h, backend),
                None => {
                    st.client_mss.remove(&key);
                    return;
                }
            },
            Err(e) => {
                st.client_mss.remove(&key);
                tracing::debug!(client = %key.0, "{e}");
                // No listener exists for it: smoltcp answers with RST.
                st.push_rx(syn);
                drop(st);
                ctx.poke.notify_one();
                return;
            }
        }
    };
    ctx.poke.notify_one();
    let counted = crate::dataplane::ActiveConnection::new(&ctx.shared, &fe);
    bridge::relay(&ctx, handle, backend, &fe).await;
    drop(counted);
    ctx.stack.borrow_mut().release(key, handle);
    ctx.poke.notify_one();
}

/// Forwards one client datagram, opening the flow if needed.
fn udp_ingress(ctx: &Rc<Ctx>, key: ConnKey, fe: Arc<Frontend>, data: &[u8]) {
    let now = std::time::Instant::now();
    let generation = ctx.shared.snapshot.load().generation;
    let mut st = ctx.stack.borrow_mut();
    // Re-pin a flow whose endpoint left the usable set.
    if let Some(f) = st.udp.get_mut(&key) {
        if f.generation != generation {
            if fe.endpoints.contains(&f.endpoint) {
                f.generation = generation;
            } else {
                st.udp.remove(&key);
            }
        }
    }
    if let Some(f) = st.udp.get_mut(&key) {
        f.last_seen = now;
        // A datagram the socket buffer cannot take is dropped, as UDP may be.
        if let Ok(n) = crate::dataplane::udp::try_send(&f.io.socket, data) {
            fe.metrics.bytes_to_backend.inc_by(n as u64);
        }
        return;
    }
    // A flow being set up takes the datagram in its queue (or drops it when
    // the queue is full): one flow per key, set up once.
    if st.udp_opening.contains(&key) {
        let _ = st.udp_opening.offer(key, data);
        return;
    }
    if st.udp.len() + st.udp_opening.len() >= st.settings.max_udp_flows {
        if !st.warned_udp_full {
            tracing::warn!(
                max = st.settings.max_udp_flows,
                "TUN UDP flow limit reached: datagrams of new flows are dropped"
            );
            st.warned_udp_full = true;
        }
        return;
    }
    st.warned_udp_full = false;
    let _ = st.udp_opening.offer(key, data);
    drop(st);
    tokio_uring::spawn(open_udp_flow(ctx.clone(), key, fe, now, generation));
}

/// Sets up the backend socket of a new flow, then sends the datagrams that
/// arrived meanwhile; on failure they are dropped with the flow.
async fn open_udp_flow(
    ctx: Rc<Ctx>,
    key: ConnKey,
    fe: Arc<Frontend>,
    now: std::time::Instant,
    generation: u64,
) {
    let Some((ep, sock)) = udp_backend(&ctx, key, &fe, now).await else {
        ctx.stack.borrow_mut().udp_opening.abandon(&key);
        return;
    };
    let sock = Rc::new(sock);
    let reader = tokio_uring::spawn(udp_replies(ctx.clone(), key, sock.clone(), fe.clone()));
    let fe_bytes = fe.metrics.bytes_to_backend.clone();
    fe.metrics.udp_flows_active.inc();
    fe.metrics.connections_total.inc();
    let entry = FlowEntry {
        endpoint: ep,
        last_seen: now,
        generation,
        io: FlowIo {
            socket: sock.clone(),
            reader,
            fe,
        },
    };
    let mut st = ctx.stack.borrow_mut();
    let queued = st.udp_opening.finish(&key);
    // Room was counted for this flow while it opened.
    if st.udp.insert(key, entry).is_err() {
        return;
    }
    drop(st);
    for datagram in queued {
        if let Ok(n) = crate::dataplane::udp::try_send(&sock, &datagram) {
            fe_bytes.inc_by(n as u64);
        }
    }
}

/// Picks a backend for a new flow and opens a socket connected to it.
async fn udp_backend(
    ctx: &Ctx,
    key: ConnKey,
    fe: &Frontend,
    now: std::time::Instant,
) -> Option<(SocketAddr, tokio_uring::net::UdpSocket)> {
    let ep = crate::dataplane::flow::pick(
        fe,
        key.0.ip(),
        &ctx.shared,
        0,
        &[],
        now,
        &mut *ctx.rng.borrow_mut(),
    )?;
    let any: IpAddr = match ep {
        SocketAddr::V4(_) => std::net::Ipv4Addr::UNSPECIFIED.into(),
        SocketAddr::V6(_) => std::net::Ipv6Addr::UNSPECIFIED.into(),
    };
    let sock = tokio_uring::net::UdpSocket::bind(SocketAddr::new(any, 0))
        .await
        .ok()?;
    sock.connect(ep).await.ok()?;
    Some((ep, sock))
}

/// Backend → client: replies leave the TUN from the VIP.
async fn udp_replies(
    ctx: Rc<Ctx>,
    key: ConnKey,
    sock: Rc<tokio_uring::net::UdpSocket>,
    fe: Arc<Frontend>,
) {
    let mut buf = vec![0u8; 65_536];
    loop {
        let (res, b) = sock.read(buf).await;
        buf = b;
        let Ok(n) = res else { break };
        let mut st = ctx.stack.borrow_mut();
        st.udp.touch(&key, std::time::Instant::now());
        let mut out = st.dev.buffer();
        let payload = buf.get(..n).unwrap_or_default();
        if udp_packet(key.1, key.0, payload, &mut out).is_some() {
            st.dev.push_tx(out);
            fe.metrics.bytes_to_client.inc_by(n as u64);
        }
        drop(st);
        ctx.poke.notify_one();
    }
    let gone = ctx.stack.borrow_mut().udp.remove(&key);
    drop(gone);
}

#[cfg(test)]
mod tests {
    use super::*;
    use smoltcp::wire::{TcpControl, TcpRepr, TcpSeqNumber};

    fn snapshot(endpoints: bool) -> Snapshot {
        sample_snapshot(endpoints)
    }

    fn tcp_packet(src: SocketAddr, dst: SocketAddr, control: TcpControl, ack: bool) -> Vec<u8> {
        let tcp = TcpRepr {
            src_port: src.port(),
            dst_port: dst.port(),
            control,
            seq_number: TcpSeqNumber(1000),
            ack_number: ack.then_some(TcpSeqNumber(1)),
            window_len: 65535,
            window_scale: None,
            max_seg_size: Some(1460),
            sack_permitted: false,
            sack_ranges: [None, None, None],
            timestamp: None,
            payload: &[],
        };
        tcp_packet_of(src.ip(), dst.ip(), &tcp)
    }

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn syn_to_a_frontend_with_endpoints_is_held() {
        let p = tcp_packet(
            sa("10.1.0.5:40000"),
            sa("10.96.0.10:80"),
            TcpControl::Syn,
            false,
        );
        assert!(matches!(
            classify(&snapshot(true), &p),
            Classified::Syn { .. }
        ));
        // Without endpoints smoltcp answers (RST): no listener will exist.
        assert!(matches!(classify(&snapshot(false), &p), Classified::Stack));
        // Non-SYN segments always go to the stack.
        let a = tcp_packet(
            sa("10.1.0.5:40000"),
            sa("10.96.0.10:80"),
            TcpControl::None,
            true,
        );
        assert!(matches!(classify(&snapshot(true), &a), Classified::Stack));
    }

    #[test]
    fn udp_payload_range_is_exact() {
        let mut p = Vec::new();
        udp_packet(sa("10.1.0.5:5000"), sa("10.96.0.10:53"), b"hello", &mut p).unwrap();
        match classify(&snapshot(true), &p) {
            Classified::Udp {
                payload, client, ..
            } => {
                assert_eq!(&p[payload], b"hello");
                assert_eq!(client, sa("10.1.0.5:5000"));
            }
            other => panic!("{other:?}"),
        }
        // No endpoints: the stack answers with ICMP port unreachable.
        assert!(matches!(classify(&snapshot(false), &p), Classified::Stack));
    }

    #[test]
    #[ignore = "writes the seed corpus; run by hand"]
    fn write_seed_corpus() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/tun_packet");
        let mut udp = Vec::new();
        udp_packet(sa("10.1.0.5:5000"), sa("10.96.0.10:53"), b"hello", &mut udp).unwrap();
        let mut udp6 = Vec::new();
        udp_packet(
            sa("[fd00::5]:5000"),
            sa("[fd00:10:96::10]:53"),
            b"q",
            &mut udp6,
        )
        .unwrap();
        let mut udp_closed = Vec::new();
        udp_packet(
            sa("10.1.0.5:5000"),
            sa("10.96.0.10:99"),
            b"x",
            &mut udp_closed,
        )
        .unwrap();
        let seeds: Vec<(&str, Vec<u8>)> = vec![
            (
                "syn_v4",
                tcp_packet(
                    sa("10.1.0.5:40000"),
                    sa("10.96.0.10:80"),
                    TcpControl::Syn,
                    false,
                ),
            ),
            (
                "syn_refused_v4",
                tcp_packet(
                    sa("10.1.0.5:40000"),
                    sa("10.96.0.10:81"),
                    TcpControl::Syn,
                    false,
                ),
            ),
            (
                "ack_unknown_v4",
                tcp_packet(
                    sa("10.1.0.5:40000"),
                    sa("10.96.0.10:80"),
                    TcpControl::None,
                    true,
                ),
            ),
            (
                "rst_v4",
                tcp_packet(
                    sa("10.1.0.5:40000"),
                    sa("10.96.0.10:80"),
                    TcpControl::Rst,
                    false,
                ),
            ),
            (
                "fin_v4",
                tcp_packet(
                    sa("10.1.0.5:40000"),
                    sa("10.96.0.10:80"),
                    TcpControl::Fin,
                    true,
                ),
            ),
            ("udp_v4", udp),
            ("udp_v6", udp6),
            ("udp_closed_v4", udp_closed),
            ("truncated_v4", vec![0x45, 0, 0, 40, 0, 0]),
            ("bad_version", vec![0x95; 40]),
        ];
        for (name, bytes) in seeds {
            std::fs::write(dir.join(name), bytes).unwrap();
        }
    }

    /// The fuzz corpus (fuzz/corpus/tun_packet) replayed through the fuzz
    /// target's entry point on stable, so CI exercises it.
    #[test]
    fn fuzz_corpus_replays() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/tun_packet");
        let snap = sample_snapshot(true);
        let mut n = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            let data = std::fs::read(&path).unwrap();
            let mut stack = Stack::new(TunSettings::default(), Duration::from_secs(30));
            let out = ingest_offline(&mut stack, &snap, &data);
            let name = path.file_name().unwrap().to_string_lossy().to_string();
            // The known seeds answer as the stack must: SYN-ACK, RST, ICMP.
            match name.as_str() {
                // udp_v6: the Service has no IPv6 endpoints, so the v6 VIP refuses.
                "syn_v4" | "syn_refused_v4" | "ack_unknown_v4" | "udp_closed_v4" | "udp_v6" => {
                    assert_eq!(out, 1, "{name}: expected one reply")
                }
                "rst_v4" | "truncated_v4" | "bad_version" | "udp_v4" => {
                    assert_eq!(out, 0, "{name}: expected no reply")
                }
                _ => {}
            }
            n += 1;
        }
        assert!(n >= 10, "corpus too small: {n} files in {}", dir.display());
    }

    #[test]
    fn garbage_never_panics() {
        let snap = snapshot(true);
        for len in 0..80 {
            for seed in 0..20u8 {
                let mut p: Vec<u8> = (0..len)
                    .map(|i| (i as u8).wrapping_mul(seed).wrapping_add(seed))
                    .collect();
                if let Some(b) = p.first_mut() {
                    *b = if seed % 2 == 0 { 0x45 } else { 0x60 };
                }
                let _ = classify(&snap, &p);
            }
        }
    }

    #[test]
    fn refused_syn_gets_rst_from_the_stack() {
        let mut st = Stack::new(TunSettings::default(), Duration::from_secs(30));
        let p = tcp_packet(
            sa("10.1.0.5:40000"),
            sa("10.96.0.10:80"),
            TcpControl::Syn,
            false,
        );
        st.push_rx(p);
        st.poll();
        let out = st.dev.pop_tx().expect("a reply");
        let ip = Ipv4Packet::new_checked(&out[..]).unwrap();
        assert_eq!(
            ip.src_addr(),
            "10.96.0.10".parse::<std::net::Ipv4Addr>().unwrap()
        );
        let t = TcpPacket::new_checked(ip.payload()).unwrap();
        assert!(t.rst());
    }

    #[test]
    fn held_syn_is_answered_from_the_vip() {
        let mut st = Stack::new(TunSettings::default(), Duration::from_secs(30));
        let key = (sa("10.1.0.5:40000"), sa("10.96.0.10:80"));
        let p = tcp_packet(key.0, key.1, TcpControl::Syn, false);
        let h = st.accept(key, p).expect("accepted");
        assert_eq!(st.tcp(h).unwrap().state(), tcp::State::SynReceived);
        let out = st.dev.pop_tx().expect("a SYN-ACK");
        let ip = Ipv4Packet::new_checked(&out[..]).unwrap();
        let t = TcpPacket::new_checked(ip.payload()).unwrap();
        assert!(t.syn() && t.ack());
        assert_eq!(t.src_port(), 80);
    }

    /// A client segment with chosen sequence numbers and timestamp.
    fn segment(
        key: ConnKey,
        control: TcpControl,
        seq: u32,
        ack: Option<u32>,
        tsval: Option<u32>,
    ) -> Vec<u8> {
        let tcp = TcpRepr {
            src_port: key.0.port(),
            dst_port: key.1.port(),
            control,
            seq_number: TcpSeqNumber(seq as i32),
            ack_number: ack.map(|a| TcpSeqNumber(a as i32)),
            window_len: 65535,
            window_scale: None,
            max_seg_size: (control == TcpControl::Syn).then_some(1460),
            sack_permitted: false,
            sack_ranges: [None, None, None],
            timestamp: tsval.map(|tsval| smoltcp::wire::TcpTimestampRepr { tsval, tsecr: 0 }),
            payload: &[],
        };
        tcp_packet_of(key.0.ip(), key.1.ip(), &tcp)
    }

    /// The stack's next TCP segment to the client: (seq, flags SYN/FIN/RST, TSval).
    fn reply(st: &mut Stack) -> (u32, bool, bool, bool, Option<u32>) {
        let out = st.dev.pop_tx().expect("a reply");
        let id = syn_id(&out).expect("TCP");
        let ip = Ipv4Packet::new_checked(&out[..]).unwrap();
        let t = TcpPacket::new_checked(ip.payload()).unwrap();
        (id.seq, t.syn(), t.fin(), t.rst(), id.tsval)
    }

    /// Opens a connection from `key` with ISN 1000 (and TSval 100), then the
    /// client closes it (FIN): the socket is in CLOSE-WAIT.
    fn closed_by_client(st: &mut Stack, key: ConnKey) -> ConnSocket {
        let h = st
            .accept(key, segment(key, TcpControl::Syn, 1000, None, Some(100)))
            .expect("accepted");
        let (iss, syn, ..) = reply(st);
        assert!(syn);
        let ack = Some(iss.wrapping_add(1));
        st.push_rx(segment(key, TcpControl::None, 1001, ack, Some(101)));
        st.push_rx(segment(key, TcpControl::Fin, 1001, ack, Some(102)));
        st.poll();
        while st.dev.pop_tx().is_some() {}
        assert_eq!(st.tcp(h).unwrap().state(), tcp::State::CloseWait);
        h
    }

    #[test]
    fn syn_ack_echoes_the_clients_timestamps() {
        // Without timestamps the client's kernel cannot reuse the port from
        // TIME-WAIT (tcp_tw_reuse needs them).
        let mut st = Stack::new(TunSettings::default(), Duration::from_secs(30));
        let key = (sa("10.1.0.5:40000"), sa("10.96.0.10:80"));
        st.accept(key, segment(key, TcpControl::Syn, 1000, None, Some(77)))
            .expect("accepted");
        let (_, syn, _, _, tsval) = reply(&mut st);
        assert!(syn);
        assert!(tsval.is_some(), "SYN-ACK without a timestamp option");
    }

    #[test]
    fn a_newer_syn_on_a_closing_connection_opens_a_new_one() {
        let mut st = Stack::new(TunSettings::default(), Duration::from_secs(30));
        let key = (sa("10.1.0.5:40000"), sa("10.96.0.10:80"));
        let old = closed_by_client(&mut st, key);
        // The old SYN again, and a SYN with an older timestamp: still the old
        // connection's (smoltcp ignores them).
        assert!(st.holds(&key, &segment(key, TcpControl::Syn, 1000, None, Some(100))));
        assert!(st.holds(&key, &segment(key, TcpControl::Syn, 9000, None, Some(50))));
        assert_eq!(st.connection(&key), Some(old));
        // The client reused the port for a new connection: newer timestamp.
        let new = segment(key, TcpControl::Syn, 500, None, Some(5000));
        assert!(!st.holds(&key, &new));
        assert_eq!(st.connection(&key), None);
        // Its relay still runs: the old socket is closed (it takes nothing).
        assert_eq!(st.tcp(old).unwrap().state(), tcp::State::Closed);
        let h = st.accept(key, new).expect("the new SYN is answered");
        let (_, syn, _, rst, _) = reply(&mut st);
        assert!(syn && !rst);
        assert_eq!(st.tcp(h).unwrap().state(), tcp::State::SynReceived);
        // The old relay ends: releasing its socket leaves the new connection.
        st.release(key, old);
        assert_eq!(st.connection(&key), Some(h));
    }

    #[test]
    fn a_newer_syn_without_timestamps_needs_a_later_sequence_number() {
        let old = SynId {
            seq: 1000,
            tsval: None,
        };
        let seq = |seq| SynId { seq, tsval: None };
        assert!(supersedes(old, seq(1001)));
        assert!(supersedes(old, seq(1000u32.wrapping_add(1 << 30))));
        assert!(!supersedes(old, seq(999)));
        assert!(!supersedes(old, seq(1000)));
        // Across the wrap of the sequence space.
        let high = SynId {
            seq: u32::MAX - 5,
            tsval: None,
        };
        assert!(supersedes(high, seq(10)));
        // A timestamp decides when both have one; PAWS rejects an older one.
        let ts = |seq, tsval| SynId {
            seq,
            tsval: Some(tsval),
        };
        assert!(supersedes(ts(1000, 100), ts(10, 101)));
        assert!(!supersedes(ts(1000, 100), ts(5000, 99)));
        assert!(
            !supersedes(ts(1000, 100), ts(1000, 200)),
            "its own SYN again"
        );
    }

    #[test]
    fn an_aborted_connection_sends_its_rst_before_it_leaves_the_table() {
        let mut st = Stack::new(TunSettings::default(), Duration::from_secs(30));
        let key = (sa("10.1.0.5:40000"), sa("10.96.0.10:80"));
        let h = closed_by_client(&mut st, key);
        st.tcp(h).unwrap().abort();
        st.release(key, h);
        // One round of the driver: poll, then reap.
        st.poll();
        st.reap();
        let (_, _, _, rst, _) = reply(&mut st);
        assert!(rst, "the client never hears of the abort");
        assert_eq!(st.connection(&key), None);
        assert!(st.closing.is_empty());
    }

    #[test]
    fn unanswered_syn_ack_releases_the_socket() {
        let mut st = Stack::new(TunSettings::default(), Duration::from_secs(30));
        let key = (sa("10.1.0.5:40000"), sa("10.96.0.10:80"));
        let p = tcp_packet(key.0, key.1, TcpControl::Syn, false);
        let h = st.accept(key, p).expect("accepted");
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
        let mut st = Stack::new(TunSettings::default(), Duration::from_secs(30));
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
