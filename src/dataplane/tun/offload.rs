//! Checksum and segmentation offload across the TUN (`IFF_VNET_HDR` with
//! `TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6`).
//!
//! Every packet crossing the device carries a 10-byte `virtio_net_hdr`.
//!
//! Checksums: the kernel hands over locally generated TCP and UDP packets with
//! only the pseudo-header summed (`NEEDS_CSUM`), and accepts ours the same way:
//! local delivery and veth trust a partial checksum, so neither side ever sums
//! the payload. Without it the kernel summed every 64 KiB segment it wrote to
//! the TUN and smoltcp summed it again (about 11% of the CPU of a bulk stream,
//! measured with perf; see BENCHMARKS.md).
//!
//! Segmentation: a pod's TCP stack builds 64 KiB segments that cross its veth
//! whole; with TSO on the TUN they reach smoltcp whole too, instead of as 45
//! MTU-sized packets (one read each). The other way, smoltcp is told a large
//! MSS in the client's SYN ([`raise_syn_mss`]) so it sends 64 KiB segments, and
//! each goes out with `gso_size` set from the client's real MSS, so the kernel
//! (or the pod's veth) cuts it to what the client can take.
//!
//! UDP segmentation (`TUN_F_USO4 | TUN_F_USO6`, Linux 6.2 and later, asked
//! for when the kernel has it): a pod that sends with `UDP_SEGMENT` hands its
//! datagrams to the TUN as one super-packet (one read instead of one per
//! datagram, and no software segmentation in the kernel before the TUN);
//! [`split_udp`] cuts it into the datagrams the flow relays one by one.
//!
//! Pure functions over byte slices.

use std::net::SocketAddr;

use smoltcp::wire::checksum;
use smoltcp::wire::{IpAddress, IpProtocol, Ipv4Packet, Ipv6Packet, TcpPacket, UdpPacket};

/// Size of the `virtio_net_hdr` before every packet (the TUN's default).
pub const VNET_HDR_LEN: usize = 10;

/// `VIRTIO_NET_HDR_F_NEEDS_CSUM`: the checksum field holds the pseudo-header
/// sum; whoever needs the full checksum completes it from `csum_start`.
const F_NEEDS_CSUM: u8 = 1;
/// `VIRTIO_NET_HDR_F_DATA_VALID`: the kernel already verified the checksum.
const F_DATA_VALID: u8 = 2;

/// `VIRTIO_NET_HDR_GSO_TCPV4` and `_TCPV6`.
const GSO_TCPV4: u8 = 1;
const GSO_TCPV6: u8 = 4;
/// `VIRTIO_NET_HDR_GSO_UDP_L4`: a UDP super-packet cut every `gso_size`
/// payload bytes.
const GSO_UDP_L4: u8 = 5;
/// `VIRTIO_NET_HDR_GSO_ECN`, or-ed into `gso_type`.
const GSO_ECN: u8 = 0x80;

/// Offsets of the checksum field in the TCP and UDP headers.
const TCP_CSUM_OFFSET: u16 = 16;
const UDP_CSUM_OFFSET: u16 = 6;

/// What the kernel says about a received packet's transport checksum.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RxChecksum {
    /// Generated on this host and not summed yet: nothing to verify.
    Partial,
    /// Verified by the kernel.
    Valid,
    /// No promise (e.g. forwarded from another host): verify it ourselves.
    Unverified,
}

/// Reads the checksum state from a received header.
pub fn rx_checksum(hdr: &[u8; VNET_HDR_LEN]) -> RxChecksum {
    if hdr[0] & F_NEEDS_CSUM != 0 {
        RxChecksum::Partial
    } else if hdr[0] & F_DATA_VALID != 0 {
        RxChecksum::Valid
    } else {
        RxChecksum::Unverified
    }
}

/// The payload size a received UDP super-packet is cut at (`gso_size`), when
/// the header says it is one; `None` for everything else (TCP super-packets
/// go to smoltcp whole).
pub fn rx_udp_gso(hdr: &[u8; VNET_HDR_LEN]) -> Option<u16> {
    if hdr[1] & !GSO_ECN != GSO_UDP_L4 {
        return None;
    }
    Some(u16::from_ne_bytes([hdr[4], hdr[5]])).filter(|&s| s > 0)
}

/// Cuts a UDP super-packet (IPv4 or IPv6, no extension headers) into its
/// datagrams of `size` payload bytes (the last one shorter), each a whole
/// IP packet written into a buffer from `buffer` and handed to `emit`:
/// lengths set, the IPv4 header checksum recomputed, the UDP checksum field
/// holding the pseudo-header sum of its own length (the kernel handed the
/// super-packet over as a partial sum, and a partial sum is what each piece
/// is). Returns the datagrams emitted; 0 (nothing emitted) for a packet that
/// is not a well-formed UDP super-packet.
pub fn split_udp(
    packet: &[u8],
    size: u16,
    mut buffer: impl FnMut() -> Vec<u8>,
    mut emit: impl FnMut(Vec<u8>),
) -> usize {
    let Some((src, dst, IpProtocol::Udp, start, end)) = transport(packet) else {
        return 0;
    };
    let v4 = matches!(src, IpAddress::Ipv4(_));
    let (Some(head), Some(payload), true) = (
        packet.get(..start + 8),
        packet.get(start + 8..end),
        size > 0 && (v4 || start == 40),
    ) else {
        return 0;
    };
    let mut n = 0;
    for chunk in payload.chunks(usize::from(size)) {
        let udp_len = 8 + chunk.len();
        let (Ok(udp_len16), Ok(ip_len16), Ok(udp_len32)) = (
            u16::try_from(udp_len),
            u16::try_from(start + udp_len),
            u32::try_from(udp_len),
        ) else {
            return n;
        };
        let mut out = buffer();
        out.clear();
        out.extend_from_slice(head);
        out.extend_from_slice(chunk);
        let pseudo = checksum::pseudo_header(&src, &dst, IpProtocol::Udp, udp_len32);
        let [l0, l1] = udp_len16.to_be_bytes();
        let [c0, c1] = pseudo.to_be_bytes();
        if let Some(u) = out.get_mut(start + 4..start + 8) {
            u.copy_from_slice(&[l0, l1, c0, c1]);
        }
        if v4 {
            let mut ip = Ipv4Packet::new_unchecked(&mut out[..]);
            ip.set_total_len(ip_len16);
            // Each piece its own identification, as the kernel numbers them.
            ip.set_ident(ip.ident().wrapping_add(n as u16));
            ip.fill_checksum();
        } else {
            Ipv6Packet::new_unchecked(&mut out[..]).set_payload_len(udp_len16);
        }
        emit(out);
        n += 1;
    }
    n
}

/// Where the transport header is and which protocol it is; `None` for
/// anything but unfragmented TCP or UDP.
fn transport(packet: &[u8]) -> Option<(IpAddress, IpAddress, IpProtocol, usize, usize)> {
    match packet.first()? >> 4 {
        4 => {
            let p = Ipv4Packet::new_checked(packet).ok()?;
            if p.more_frags() || p.frag_offset() != 0 {
                return None;
            }
            let proto = p.next_header();
            let start = usize::from(p.header_len());
            let end = usize::from(p.total_len());
            Some((p.src_addr().into(), p.dst_addr().into(), proto, start, end))
        }
        6 => {
            let p = Ipv6Packet::new_checked(packet).ok()?;
            let end = 40 + usize::from(p.payload_len());
            Some((
                p.src_addr().into(),
                p.dst_addr().into(),
                p.next_header(),
                40,
                end,
            ))
        }
        _ => None,
    }
}

/// Verifies the TCP or UDP checksum of a packet the kernel did not vouch for.
/// Other protocols and malformed packets pass: smoltcp checks or drops those.
pub fn verify(packet: &[u8]) -> bool {
    let Some((src, dst, proto, start, end)) = transport(packet) else {
        return true;
    };
    let Some(l4) = packet.get(start..end) else {
        return true;
    };
    match proto {
        IpProtocol::Tcp => TcpPacket::new_checked(l4).is_ok_and(|t| t.verify_checksum(&src, &dst)),
        IpProtocol::Udp => UdpPacket::new_checked(l4).is_ok_and(|u| u.verify_checksum(&src, &dst)),
        _ => true,
    }
}

/// The MSS option of a TCP SYN: where its value is, and the value.
fn syn_mss(packet: &[u8]) -> Option<(usize, u16)> {
    let (_, _, proto, start, end) = transport(packet)?;
    if proto != IpProtocol::Tcp {
        return None;
    }
    let tcp = packet.get(start..end)?;
    let t = TcpPacket::new_checked(tcp).ok()?;
    if !t.syn() {
        return None;
    }
    let opts_end = usize::from(t.header_len());
    let mut at = 20;
    while at < opts_end {
        match *tcp.get(at)? {
            0 => return None, // end of options
            1 => at += 1,     // no-op
            2 => {
                let v = tcp.get(at + 2..at + 4)?;
                return Some((
                    start + at + 2,
                    u16::from_be_bytes([*v.first()?, *v.get(1)?]),
                ));
            }
            _ => at += usize::from(*tcp.get(at + 1)?).max(2),
        }
    }
    None
}

/// Raises the MSS option of a client's SYN to `to` before smoltcp reads it, so
/// smoltcp builds segments as large as the TUN allows; returns the client's
/// own MSS when it was lower (the flow then needs `gso_size`, see
/// [`tx_header`]). The checksum is left as it was: the kernel's partial sum
/// is not verified, and a verified one has been checked already.
pub fn raise_syn_mss(packet: &mut [u8], to: u16) -> Option<u16> {
    let (at, mss) = syn_mss(packet)?;
    if mss >= to {
        return None;
    }
    packet
        .get_mut(at..at + 2)?
        .copy_from_slice(&to.to_be_bytes());
    Some(mss)
}

/// The (client, VIP) of an outgoing TCP packet and its payload length; the key
/// under which a flow's real MSS is kept.
pub fn tcp_flow(packet: &[u8]) -> Option<((SocketAddr, SocketAddr), usize)> {
    let (src, dst, proto, start, end) = transport(packet)?;
    if proto != IpProtocol::Tcp {
        return None;
    }
    let t = TcpPacket::new_checked(packet.get(start..end)?).ok()?;
    let payload = (end - start).checked_sub(usize::from(t.header_len()))?;
    let client = SocketAddr::new(dst.into(), t.dst_port());
    let vip = SocketAddr::new(src.into(), t.src_port());
    Some(((client, vip), payload))
}

/// Prepares an outgoing packet and returns its header. TCP and UDP get the
/// pseudo-header sum in their checksum field and `NEEDS_CSUM`, so the kernel
/// completes the sum only if the packet leaves the host; everything else
/// (ICMP, whose checksum smoltcp computes) goes out as is. A TCP packet whose
/// payload exceeds `mss` (the client's own MSS, when smoltcp was told a larger
/// one) is marked for segmentation into pieces of that size.
pub fn tx_header(packet: &mut [u8], mss: Option<u16>) -> [u8; VNET_HDR_LEN] {
    let mut hdr = [0u8; VNET_HDR_LEN];
    let Some((src, dst, proto, start, end)) = transport(packet) else {
        return hdr;
    };
    let offset = match proto {
        IpProtocol::Tcp => TCP_CSUM_OFFSET,
        IpProtocol::Udp => UDP_CSUM_OFFSET,
        _ => return hdr,
    };
    let (Ok(start16), Ok(len)) = (u16::try_from(start), u32::try_from(end - start)) else {
        return hdr;
    };
    let field = start + usize::from(offset);
    let Some(slot) = packet
        .get_mut(field..field + 2)
        .filter(|_| field + 2 <= end)
    else {
        return hdr;
    };
    let pseudo = checksum::pseudo_header(&src, &dst, proto, len);
    slot.copy_from_slice(&pseudo.to_be_bytes());
    hdr[0] = F_NEEDS_CSUM;
    // gso_type 0 (none), hdr_len 0; csum_start and csum_offset in the host's
    // byte order (the TUN's default for virtio headers).
    hdr[6..8].copy_from_slice(&start16.to_ne_bytes());
    hdr[8..10].copy_from_slice(&offset.to_ne_bytes());
    if let (IpProtocol::Tcp, Some(mss)) = (proto, mss) {
        let tcp_len = packet
            .get(start..end)
            .and_then(|t| TcpPacket::new_checked(t).ok())
            .map(|t| usize::from(t.header_len()));
        if let Some(tcp_len) = tcp_len {
            // Every piece repeats this header's options: they come out of the
            // client's MSS, which counts payload only.
            let size = usize::from(mss).saturating_sub(tcp_len - 20).max(1);
            let payload = end - start - tcp_len;
            if let (true, Ok(size), Ok(hdr_len)) = (
                payload > size,
                u16::try_from(size),
                u16::try_from(start + tcp_len),
            ) {
                hdr[1] = if matches!(src, IpAddress::Ipv4(_)) {
                    GSO_TCPV4
                } else {
                    GSO_TCPV6
                };
                hdr[2..4].copy_from_slice(&hdr_len.to_ne_bytes());
                hdr[4..6].copy_from_slice(&size.to_ne_bytes());
            }
        }
    }
    hdr
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataplane::tun::packet::udp_packet;
    use crate::testing::tun::tcp_packet_of;

    /// What the kernel does with a `NEEDS_CSUM` packet that leaves the host:
    /// sum from `csum_start` (the field holds the pseudo-header sum) and store
    /// the complement at `csum_start + csum_offset`.
    fn complete(hdr: &[u8; VNET_HDR_LEN], packet: &mut [u8]) {
        assert_eq!(hdr[0], F_NEEDS_CSUM);
        let start = usize::from(u16::from_ne_bytes([hdr[6], hdr[7]]));
        let offset = usize::from(u16::from_ne_bytes([hdr[8], hdr[9]]));
        let sum = !checksum::data(&packet[start..]);
        packet[start + offset..start + offset + 2].copy_from_slice(&sum.to_be_bytes());
    }

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn partial_udp_checksum_completes_to_the_full_one() {
        for (src, dst) in [
            ("10.96.0.10:53", "10.1.0.5:5000"),
            ("[fd00:10:96::10]:53", "[fd00::5]:5000"),
        ] {
            let mut full = Vec::new();
            udp_packet(sa(src), sa(dst), b"an odd-length payload", &mut full).unwrap();
            assert!(verify(&full));
            let mut p = full.clone();
            let hdr = tx_header(&mut p, None);
            assert_ne!(p, full, "the field must hold the pseudo-header sum");
            assert!(!verify(&p), "a partial sum is not a valid checksum");
            complete(&hdr, &mut p);
            assert_eq!(p, full);
        }
    }

    #[test]
    fn partial_tcp_checksum_completes_to_the_full_one() {
        let mut full = tcp_segment(smoltcp::wire::TcpControl::Psh, None, b"hello, world");
        assert!(verify(&full));
        let mut p = full.clone();
        let hdr = tx_header(&mut p, None);
        assert_eq!(u16::from_ne_bytes([hdr[8], hdr[9]]), TCP_CSUM_OFFSET);
        complete(&hdr, &mut p);
        assert_eq!(p, full);
        // A flipped payload bit fails verification.
        let last = full.len() - 1;
        full[last] ^= 1;
        assert!(!verify(&full));
    }

    /// A TCP segment from the VIP to a client, with a timestamp option (12
    /// bytes with padding) as Linux clients negotiate.
    fn tcp_segment(
        control: smoltcp::wire::TcpControl,
        mss: Option<u16>,
        payload: &[u8],
    ) -> Vec<u8> {
        use smoltcp::wire::{TcpRepr, TcpSeqNumber};
        let tcp = TcpRepr {
            src_port: 80,
            dst_port: 40000,
            control,
            seq_number: TcpSeqNumber(7),
            ack_number: Some(TcpSeqNumber(9)),
            window_len: 1000,
            window_scale: Some(7),
            max_seg_size: mss,
            sack_permitted: true,
            sack_ranges: [None, None, None],
            timestamp: Some(smoltcp::wire::TcpTimestampRepr::new(1, 2)),
            payload,
        };
        tcp_packet_of(
            "10.96.0.10".parse().unwrap(),
            "10.1.0.5".parse().unwrap(),
            &tcp,
        )
    }

    #[test]
    fn syn_mss_is_raised_and_the_real_one_returned() {
        use smoltcp::wire::{TcpControl, TcpOption};
        let mut syn = tcp_segment(TcpControl::Syn, Some(1460), &[]);
        assert_eq!(raise_syn_mss(&mut syn, 65_475), Some(1460));
        let ip = Ipv4Packet::new_checked(&syn[..]).unwrap();
        let t = TcpPacket::new_checked(ip.payload()).unwrap();
        let mut opts = t.options();
        let mut seen = None;
        while !opts.is_empty() {
            let (rest, o) = TcpOption::parse(opts).unwrap();
            if let TcpOption::MaxSegmentSize(m) = o {
                seen = Some(m);
            }
            opts = rest;
        }
        assert_eq!(seen, Some(65_475));
        // Already large enough, no option, or not a SYN: untouched.
        assert_eq!(raise_syn_mss(&mut syn, 65_475), None);
        let mut bare = tcp_segment(TcpControl::Syn, None, &[]);
        assert_eq!(raise_syn_mss(&mut bare, 65_475), None);
        let mut data = tcp_segment(TcpControl::None, Some(1460), b"x");
        let before = data.clone();
        assert_eq!(raise_syn_mss(&mut data, 65_475), None);
        assert_eq!(data, before);
    }

    #[test]
    fn large_segments_carry_the_clients_mss_as_gso_size() {
        use smoltcp::wire::TcpControl;
        let payload = vec![7u8; 4000];
        let mut p = tcp_segment(TcpControl::Psh, None, &payload);
        let ((client, vip), len) = tcp_flow(&p).unwrap();
        assert_eq!((client, vip), (sa("10.1.0.5:40000"), sa("10.96.0.10:80")));
        assert_eq!(len, 4000);
        let hdr = tx_header(&mut p, Some(1460));
        assert_eq!(hdr[0], F_NEEDS_CSUM);
        assert_eq!(hdr[1], GSO_TCPV4);
        // 20 IP + 20 TCP + 12 timestamp option (with padding); pieces of
        // 1460 - 12 payload bytes, as Linux sizes them for this client.
        let tcp_len = usize::from(u16::from_ne_bytes([hdr[2], hdr[3]])) - 20;
        assert_eq!(
            u16::from_ne_bytes([hdr[4], hdr[5]]),
            1460 - (tcp_len as u16 - 20)
        );
        // Small enough already: no segmentation asked for.
        let mut small = tcp_segment(TcpControl::Psh, None, &payload[..1000]);
        assert_eq!(tx_header(&mut small, Some(1460))[1], 0);
        // No MSS known (a node-local client): none either.
        let mut big = tcp_segment(TcpControl::Psh, None, &payload);
        assert_eq!(tx_header(&mut big, None)[1], 0);
    }

    #[test]
    fn other_packets_go_out_untouched() {
        let mut junk = vec![0x45, 0, 0, 20, 0, 0, 0, 0, 64, 1, 0, 0];
        let before = junk.clone();
        assert_eq!(tx_header(&mut junk, None), [0; VNET_HDR_LEN]);
        assert_eq!(junk, before);
        assert!(verify(&[]));
        // A header claiming more bytes than the packet has is not touched.
        let mut short = Vec::new();
        udp_packet(sa("10.96.0.10:53"), sa("10.1.0.5:5000"), b"x", &mut short).unwrap();
        short.truncate(24);
        let before = short.clone();
        let _ = tx_header(&mut short, Some(100));
        assert_eq!(short, before);
    }

    #[test]
    fn udp_super_packets_are_cut_into_their_datagrams() {
        for (src, dst) in [
            ("10.1.0.5:5000", "10.96.0.10:53"),
            ("[fd00::5]:5000", "[fd00:10:96::10]:53"),
        ] {
            // What the kernel hands over for a UDP_SEGMENT send of 2.5
            // datagrams of 1000 bytes: one packet, a partial checksum.
            let payload: Vec<u8> = (0..2500u32).map(|i| i as u8).collect();
            let mut sup = Vec::new();
            udp_packet(sa(src), sa(dst), &payload, &mut sup).unwrap();
            let _ = tx_header(&mut sup, None);
            let mut hdr = [0u8; VNET_HDR_LEN];
            hdr[0] = F_NEEDS_CSUM;
            hdr[1] = GSO_UDP_L4;
            hdr[4..6].copy_from_slice(&1000u16.to_ne_bytes());
            assert_eq!(rx_udp_gso(&hdr), Some(1000));
            let mut got = Vec::new();
            let n = split_udp(&sup, 1000, Vec::new, |p| got.push(p));
            assert_eq!(n, 3);
            for (i, p) in got.iter().enumerate() {
                let chunk = &payload[i * 1000..(i * 1000 + 1000).min(2500)];
                // Each is the datagram the pod's socket would have sent
                // alone, with its partial checksum: completed, it verifies.
                let mut want = Vec::new();
                udp_packet(sa(src), sa(dst), chunk, &mut want).unwrap();
                let mut piece = p.clone();
                let (_, _, _, start, _) = transport(&piece).unwrap();
                let mut h = [0u8; VNET_HDR_LEN];
                h[0] = F_NEEDS_CSUM;
                h[6..8].copy_from_slice(&(start as u16).to_ne_bytes());
                h[8..10].copy_from_slice(&UDP_CSUM_OFFSET.to_ne_bytes());
                complete(&h, &mut piece);
                assert!(verify(&piece), "piece {i} of {src}");
                if piece[0] >> 4 == 4 {
                    let ip = Ipv4Packet::new_checked(&piece[..]).unwrap();
                    assert!(ip.verify_checksum());
                    // The identification is the only other difference.
                    piece[4..6].copy_from_slice(&want[4..6]);
                    piece[10..12].copy_from_slice(&want[10..12]);
                }
                assert_eq!(piece, want, "piece {i} of {src}");
            }
        }
    }

    #[test]
    fn what_is_not_a_udp_super_packet_is_not_cut() {
        let mut hdr = [0u8; VNET_HDR_LEN];
        hdr[1] = GSO_TCPV4;
        hdr[4..6].copy_from_slice(&1000u16.to_ne_bytes());
        assert_eq!(rx_udp_gso(&hdr), None);
        hdr[1] = GSO_UDP_L4 | GSO_ECN;
        assert_eq!(rx_udp_gso(&hdr), Some(1000));
        hdr[4..6].copy_from_slice(&0u16.to_ne_bytes());
        assert_eq!(rx_udp_gso(&hdr), None, "no size: nothing to cut at");
        let tcp = tcp_segment(smoltcp::wire::TcpControl::Psh, None, &[1; 3000]);
        assert_eq!(split_udp(&tcp, 1000, Vec::new, |_| panic!("TCP cut")), 0);
        assert_eq!(split_udp(&[0x45, 0, 0], 1000, Vec::new, |_| panic!()), 0);
        let mut udp = Vec::new();
        udp_packet(sa("10.1.0.5:1"), sa("10.96.0.10:53"), b"", &mut udp).unwrap();
        assert_eq!(split_udp(&udp, 1000, Vec::new, |_| panic!("empty")), 0);
        assert_eq!(split_udp(&udp, 0, Vec::new, |_| panic!("size 0")), 0);
    }

    #[test]
    fn rx_flags() {
        let mut h = [0u8; VNET_HDR_LEN];
        assert_eq!(rx_checksum(&h), RxChecksum::Unverified);
        h[0] = F_DATA_VALID;
        assert_eq!(rx_checksum(&h), RxChecksum::Valid);
        h[0] = F_NEEDS_CSUM;
        assert_eq!(rx_checksum(&h), RxChecksum::Partial);
    }
}
