//! What a packet from the TUN is, decided from the snapshot and its bytes
//! alone: its (client, VIP), whether it opens a flow a backend should take,
//! what tells its SYN from a later one on the same 4-tuple; and the one UDP
//! packet builder the replies need. Pure: no I/O, no state.

use std::net::{IpAddr, SocketAddr};
use std::ops::Range;
use std::sync::Arc;

use smoltcp::phy::ChecksumCapabilities;
use smoltcp::wire::{
    IpAddress, IpProtocol, IpRepr, Ipv4Packet, Ipv6Packet, TcpPacket, UdpPacket, UdpRepr,
};

use crate::dataplane::flow::{resolve, FlowKey, Verdict};
use crate::model::Protocol;
use crate::state::{Frontend, Snapshot};

/// A connection's or UDP flow's identity: (client, VIP).
pub type ConnKey = (SocketAddr, SocketAddr);

/// What to do with one packet read from the TUN.
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
        /// (client, VIP).
        key: ConnKey,
        /// The frontend.
        fe: Arc<Frontend>,
    },
    /// A UDP datagram for a frontend with usable endpoints.
    Udp {
        /// (client, VIP).
        key: ConnKey,
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
            key: (key.src, key.dst),
            fe,
        },
        (Verdict::Forward(fe), Protocol::Udp) => {
            let start = ip.l4 + 8;
            let len = UdpPacket::new_checked(l4)
                .map(|u| usize::from(u.len()))
                .unwrap_or(8);
            Classified::Udp {
                key: (key.src, key.dst),
                fe,
                payload: start..(ip.l4 + len.max(8)).min(ip.end),
            }
        }
        (Verdict::Refuse(_), _) => Classified::Stack,
        (Verdict::Drop(_), _) => Classified::Drop,
    }
}

/// The (client, VIP) of a TCP or UDP packet from the TUN; `None` for
/// anything without ports.
pub fn conn_key(packet: &[u8]) -> Option<ConnKey> {
    let ip = parse_ip(packet)?;
    match (ip.proto, packet.get(ip.l4..ip.l4 + 4)?) {
        (IpProtocol::Tcp | IpProtocol::Udp, &[a, b, c, d]) => Some((
            SocketAddr::new(ip.src, u16::from_be_bytes([a, b])),
            SocketAddr::new(ip.dst, u16::from_be_bytes([c, d])),
        )),
        _ => None,
    }
}

/// A packet's flow for the ownership check: its key, and whether it is TCP
/// (`Some(true)` for a SYN opening a connection), or UDP (`None`). Nothing
/// for anything else (ICMP, fragments): the thread that read it answers.
pub fn flow_of(packet: &[u8]) -> Option<(ConnKey, Option<bool>)> {
    let ip = parse_ip(packet)?;
    let l4 = packet.get(ip.l4..ip.end)?;
    let key = |sport, dport| {
        (
            SocketAddr::new(ip.src, sport),
            SocketAddr::new(ip.dst, dport),
        )
    };
    match ip.proto {
        IpProtocol::Tcp => {
            let t = TcpPacket::new_checked(l4).ok()?;
            let syn = t.syn() && !t.ack() && !t.rst();
            Some((key(t.src_port(), t.dst_port()), Some(syn)))
        }
        IpProtocol::Udp => {
            let u = UdpPacket::new_checked(l4).ok()?;
            Some((key(u.src_port(), u.dst_port()), None))
        }
        _ => None,
    }
}

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

/// Writes an IP+UDP packet from `src` to `dst` carrying `payload` into `out`.
/// `None` when the families differ or the payload does not fit.
pub fn udp_packet(
    src: SocketAddr,
    dst: SocketAddr,
    payload: &[u8],
    out: &mut Vec<u8>,
) -> Option<()> {
    let udp = UdpRepr {
        src_port: src.port(),
        dst_port: dst.port(),
    };
    let len = 8 + payload.len();
    ip_packet(src.ip(), dst.ip(), IpProtocol::Udp, len, out, |b, s, d| {
        let fill = |p: &mut [u8]| p.copy_from_slice(payload);
        let caps = ChecksumCapabilities::default();
        udp.emit(
            &mut UdpPacket::new_unchecked(b),
            s,
            d,
            payload.len(),
            fill,
            &caps,
        );
    })
}

/// Writes into `out` an IP packet from `src` to `dst` whose `l4_len` bytes
/// of transport header and payload `emit` fills in (given the addresses, for
/// its checksum). `None` when the families differ or the packet would not
/// fit its length field.
pub fn ip_packet(
    src: IpAddr,
    dst: IpAddr,
    proto: IpProtocol,
    l4_len: usize,
    out: &mut Vec<u8>,
    emit: impl FnOnce(&mut [u8], &IpAddress, &IpAddress),
) -> Option<()> {
    if src.is_ipv4() != dst.is_ipv4() {
        return None;
    }
    let (s, d) = (IpAddress::from(src), IpAddress::from(dst));
    let ip = IpRepr::new(s, d, proto, l4_len, 64);
    // IPv4's length field counts its header, IPv6's only the payload.
    let length_field = if src.is_ipv4() {
        ip.buffer_len()
    } else {
        l4_len
    };
    if length_field > usize::from(u16::MAX) {
        return None;
    }
    out.clear();
    out.resize(ip.buffer_len(), 0);
    ip.emit(&mut out[..], &ChecksumCapabilities::default());
    emit(out.get_mut(ip.header_len()..)?, &s, &d);
    Some(())
}

#[cfg(test)]
mod tests {
    use smoltcp::wire::TcpControl;

    use super::*;
    use crate::testing::tun::{sample_snapshot, segment, syn};

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn syn_to_a_frontend_with_endpoints_is_held() {
        let key = (sa("10.1.0.5:40000"), sa("10.96.0.10:80"));
        let p = syn(key);
        assert!(matches!(
            classify(&sample_snapshot(true), &p),
            Classified::Syn { .. }
        ));
        // Without endpoints smoltcp answers (RST): no listener will exist.
        assert!(matches!(
            classify(&sample_snapshot(false), &p),
            Classified::Stack
        ));
        // Non-SYN segments always go to the stack.
        let a = segment(key, TcpControl::None, 1000, Some(1), None, &[]);
        assert!(matches!(
            classify(&sample_snapshot(true), &a),
            Classified::Stack
        ));
        assert_eq!(conn_key(&a), Some(key));
    }

    #[test]
    fn udp_payload_range_is_exact() {
        let mut p = Vec::new();
        udp_packet(sa("10.1.0.5:5000"), sa("10.96.0.10:53"), b"hello", &mut p).unwrap();
        match classify(&sample_snapshot(true), &p) {
            Classified::Udp { payload, key, .. } => {
                assert_eq!(&p[payload], b"hello");
                assert_eq!(key, (sa("10.1.0.5:5000"), sa("10.96.0.10:53")));
            }
            other => panic!("{other:?}"),
        }
        // No endpoints: the stack answers with ICMP port unreachable.
        assert!(matches!(
            classify(&sample_snapshot(false), &p),
            Classified::Stack
        ));
    }

    #[test]
    fn garbage_never_panics() {
        let snap = sample_snapshot(true);
        for len in 0..80 {
            for seed in 0..20u8 {
                let mut p: Vec<u8> = (0..len)
                    .map(|i| (i as u8).wrapping_mul(seed).wrapping_add(seed))
                    .collect();
                if let Some(b) = p.first_mut() {
                    *b = if seed % 2 == 0 { 0x45 } else { 0x60 };
                }
                let _ = classify(&snap, &p);
                let _ = conn_key(&p);
                let _ = syn_id(&p);
            }
        }
    }
}
