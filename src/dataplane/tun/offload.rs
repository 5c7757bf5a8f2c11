//! Checksum offload across the TUN (`IFF_VNET_HDR` + `TUN_F_CSUM`).
//!
//! Every packet crossing the device carries a 10-byte `virtio_net_hdr`. With
//! it the kernel hands over locally generated TCP and UDP packets with only the
//! pseudo-header summed (`NEEDS_CSUM`), and accepts ours the same way: local
//! delivery and veth trust a partial checksum, so neither side ever sums the
//! payload. Without it the kernel summed every 64 KiB segment it wrote to the
//! TUN and smoltcp summed it again (about 11% of the CPU of a bulk stream,
//! measured with perf; see BENCHMARKS.md). Pure functions over byte slices.

use smoltcp::wire::checksum;
use smoltcp::wire::{IpAddress, IpProtocol, Ipv4Packet, Ipv6Packet, TcpPacket, UdpPacket};

/// Size of the `virtio_net_hdr` before every packet (the TUN's default).
pub const VNET_HDR_LEN: usize = 10;

/// `VIRTIO_NET_HDR_F_NEEDS_CSUM`: the checksum field holds the pseudo-header
/// sum; whoever needs the full checksum completes it from `csum_start`.
const F_NEEDS_CSUM: u8 = 1;
/// `VIRTIO_NET_HDR_F_DATA_VALID`: the kernel already verified the checksum.
const F_DATA_VALID: u8 = 2;

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

/// Prepares an outgoing packet and returns its header. TCP and UDP get the
/// pseudo-header sum in their checksum field and `NEEDS_CSUM`, so the kernel
/// completes the sum only if the packet leaves the host; everything else
/// (ICMP, whose checksum smoltcp computes) goes out as is.
pub fn tx_header(packet: &mut [u8]) -> [u8; VNET_HDR_LEN] {
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
    hdr
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataplane::tun::stack::udp_packet;
    use std::net::SocketAddr;

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
            let hdr = tx_header(&mut p);
            assert_ne!(p, full, "the field must hold the pseudo-header sum");
            assert!(!verify(&p), "a partial sum is not a valid checksum");
            complete(&hdr, &mut p);
            assert_eq!(p, full);
        }
    }

    #[test]
    fn partial_tcp_checksum_completes_to_the_full_one() {
        use smoltcp::phy::ChecksumCapabilities;
        use smoltcp::wire::{Ipv4Repr, TcpControl, TcpRepr, TcpSeqNumber};
        let tcp = TcpRepr {
            src_port: 80,
            dst_port: 40000,
            control: TcpControl::Psh,
            seq_number: TcpSeqNumber(7),
            ack_number: Some(TcpSeqNumber(9)),
            window_len: 1000,
            window_scale: None,
            max_seg_size: None,
            sack_permitted: false,
            sack_ranges: [None, None, None],
            timestamp: None,
            payload: b"hello, world",
        };
        let (s, d) = ("10.96.0.10".parse().unwrap(), "10.1.0.5".parse().unwrap());
        let ip = Ipv4Repr {
            src_addr: s,
            dst_addr: d,
            next_header: IpProtocol::Tcp,
            payload_len: tcp.buffer_len(),
            hop_limit: 64,
        };
        let mut full = vec![0u8; ip.buffer_len() + tcp.buffer_len()];
        let caps = ChecksumCapabilities::default();
        let mut p = Ipv4Packet::new_unchecked(&mut full[..]);
        ip.emit(&mut p, &caps);
        tcp.emit(
            &mut TcpPacket::new_unchecked(p.payload_mut()),
            &s.into(),
            &d.into(),
            &caps,
        );
        let mut p = full.clone();
        let hdr = tx_header(&mut p);
        assert_eq!(u16::from_ne_bytes([hdr[8], hdr[9]]), TCP_CSUM_OFFSET);
        complete(&hdr, &mut p);
        assert_eq!(p, full);
        // A flipped payload bit fails verification.
        let last = full.len() - 1;
        full[last] ^= 1;
        assert!(!verify(&full));
    }

    #[test]
    fn other_packets_go_out_untouched() {
        let mut junk = vec![0x45, 0, 0, 20, 0, 0, 0, 0, 64, 1, 0, 0];
        let before = junk.clone();
        assert_eq!(tx_header(&mut junk), [0; VNET_HDR_LEN]);
        assert_eq!(junk, before);
        assert!(verify(&[]));
        // A header claiming more bytes than the packet has is not touched.
        let mut short = Vec::new();
        udp_packet(sa("10.96.0.10:53"), sa("10.1.0.5:5000"), b"x", &mut short).unwrap();
        short.truncate(24);
        let before = short.clone();
        let _ = tx_header(&mut short);
        assert_eq!(short, before);
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
