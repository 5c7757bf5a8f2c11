//! Property tests of the TUN packet path (`classify`, then the smoltcp stack
//! through `ingest_offline`): arbitrary bytes and mutated valid IPv4/IPv6
//! TCP/UDP packets never panic and are classified the same way every time,
//! with payload ranges inside the packet; valid packets are classified as the
//! rules say (SYN to a frontend with endpoints held, UDP to one proxied with
//! its exact payload, everything else to the stack, which answers a SYN with
//! one SYN-ACK and never answers an RST).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::OnceLock;

use proptest::prelude::*;
use smoltcp::wire::TcpControl;

use super::packet::{classify, udp_packet, Classified};
use super::stack::{Stack, TunSettings};
use crate::state::Snapshot;
use crate::testing::tun::{ingest_offline, sample_snapshot, segment};

fn config() -> ProptestConfig {
    ProptestConfig {
        cases: 128,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

fn snap() -> &'static Snapshot {
    static SNAP: OnceLock<Snapshot> = OnceLock::new();
    SNAP.get_or_init(|| sample_snapshot(true))
}

fn stack() -> Stack {
    // Small socket buffers: a stack per case stays cheap.
    let settings = TunSettings {
        socket_buffer: 4096,
        ..TunSettings::default()
    };
    Stack::new(settings)
}

/// A TCP segment from `src` to `dst` (same family).
fn tcp(
    src: SocketAddr,
    dst: SocketAddr,
    control: TcpControl,
    ack: bool,
    payload: &[u8],
) -> Vec<u8> {
    segment((src, dst), control, 1000, ack.then_some(1), None, payload)
}

/// Where a generated packet goes.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Dst {
    /// 10.96.0.10:80 TCP / :53 UDP, which have an endpoint.
    Served,
    /// The VIP on a port the Service does not define.
    OtherPort,
    /// An address that is no frontend.
    Elsewhere,
}

/// A valid packet and what it must be classified as.
#[derive(Debug, Clone)]
struct Gen {
    packet: Vec<u8>,
    v6: bool,
    udp: bool,
    control: TcpControl,
    ack: bool,
    dst: Dst,
    src: SocketAddr,
    to: SocketAddr,
    payload: Vec<u8>,
}

fn valid_packet() -> impl Strategy<Value = Gen> {
    (
        any::<bool>(),
        any::<bool>(),
        prop::sample::select(
            &[
                TcpControl::Syn,
                TcpControl::None,
                TcpControl::Fin,
                TcpControl::Rst,
                TcpControl::Psh,
            ][..],
        ),
        any::<bool>(),
        prop::sample::select(&[Dst::Served, Dst::OtherPort, Dst::Elsewhere][..]),
        (any::<u32>(), 1u16..=u16::MAX),
        prop::collection::vec(any::<u8>(), 0..64),
    )
        .prop_map(|(v6, udp, control, ack, dst, (host, sport), payload)| {
            let (vip, elsewhere, client): (IpAddr, IpAddr, IpAddr) = if v6 {
                (
                    Ipv6Addr::new(0xfd00, 0x10, 0x96, 0, 0, 0, 0, 0x10).into(),
                    Ipv6Addr::new(0xfd00, 0x10, 0x96, 0, 0, 0, 0, 0x99).into(),
                    Ipv6Addr::from(u128::from(host) | (0xfd00_0001u128 << 96)).into(),
                )
            } else {
                let [_, b, c, d] = host.to_be_bytes();
                (
                    Ipv4Addr::new(10, 96, 0, 10).into(),
                    Ipv4Addr::new(10, 96, 0, 99).into(),
                    Ipv4Addr::new(10, 1 + b % 50, c, d).into(),
                )
            };
            let port = if udp { 53 } else { 80 };
            let to = match dst {
                Dst::Served => SocketAddr::new(vip, port),
                Dst::OtherPort => SocketAddr::new(vip, port + 1),
                Dst::Elsewhere => SocketAddr::new(elsewhere, port),
            };
            let src = SocketAddr::new(client, sport);
            let packet = if udp {
                let mut out = Vec::new();
                udp_packet(src, to, &payload, &mut out).expect("fits");
                out
            } else {
                tcp(src, to, control, ack, &payload)
            };
            Gen {
                packet,
                v6,
                udp,
                control,
                ack,
                dst,
                src,
                to,
                payload,
            }
        })
}

/// Classification as comparable text (Frontend has no PartialEq).
fn describe(c: &Classified) -> String {
    match c {
        Classified::Stack => "stack".into(),
        Classified::Drop => "drop".into(),
        Classified::Syn { key, fe } => {
            format!("syn {key:?} {} {:?}", fe.service, fe.endpoints)
        }
        Classified::Udp { key, fe, payload } => {
            format!("udp {key:?} {} {:?} {payload:?}", fe.service, fe.endpoints)
        }
    }
}

/// What holds for any input: no panic, same answer twice, ranges in bounds,
/// held flows only for real frontends with endpoints.
fn check_any(packet: &[u8]) -> Result<Classified, TestCaseError> {
    let snap = snap();
    let c = classify(snap, packet);
    prop_assert_eq!(describe(&c), describe(&classify(snap, packet)));
    match &c {
        Classified::Udp {
            payload,
            key: (_, vip),
            fe,
        } => {
            prop_assert!(
                payload.start <= payload.end && payload.end <= packet.len(),
                "{payload:?} of {}",
                packet.len()
            );
            prop_assert!(!fe.endpoints.is_empty());
            let key = crate::state::FrontendKey {
                addr: *vip,
                proto: crate::model::Protocol::Udp,
            };
            prop_assert!(snap.frontend(&key).is_some());
        }
        Classified::Syn { key: (_, vip), fe } => {
            prop_assert!(!fe.endpoints.is_empty());
            let key = crate::state::FrontendKey {
                addr: *vip,
                proto: crate::model::Protocol::Tcp,
            };
            prop_assert!(snap.frontend(&key).is_some());
        }
        Classified::Stack | Classified::Drop => {}
    }
    let mut st = stack();
    let replies = ingest_offline(&mut st, snap, packet);
    // One packet in never makes a flood out.
    prop_assert!(replies <= 2, "{replies} replies");
    Ok(c)
}

/// One edit of a packet: (what, where as a fraction, a byte).
fn mutate(p: &[u8], edits: &[(u8, u16, u8)]) -> Vec<u8> {
    let mut b = p.to_vec();
    for &(what, at, byte) in edits {
        let pos = (usize::from(at) * b.len() / usize::from(u16::MAX)).min(b.len());
        match what % 5 {
            0 => {
                if let Some(x) = b.get_mut(pos) {
                    *x ^= byte | 1;
                }
            }
            1 => {
                if let Some(x) = b.get_mut(pos) {
                    *x = byte;
                }
            }
            2 => b.truncate(pos),
            3 => b.insert(pos, byte),
            _ => b.extend(std::iter::repeat_n(byte, usize::from(byte % 64))),
        }
    }
    b
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn arbitrary_bytes_never_panic(p in prop::collection::vec(any::<u8>(), 0..256)) {
        check_any(&p)?;
    }

    /// Bytes that start like an IPv4 or IPv6 header get past the first check.
    #[test]
    fn arbitrary_ip_like_bytes_never_panic(v6 in any::<bool>(), mut p in prop::collection::vec(any::<u8>(), 1..256)) {
        p[0] = if v6 { 0x60 } else { 0x45 };
        if !v6 && p.len() >= 4 {
            // A total length that matches, so the parser goes on to TCP/UDP.
            let len = u16::try_from(p.len()).unwrap().to_be_bytes();
            p[2] = len[0];
            p[3] = len[1];
        }
        check_any(&p)?;
    }

    #[test]
    fn valid_packets_are_classified_by_the_rules(g in valid_packet()) {
        let c = check_any(&g.packet)?;
        let served = g.dst == Dst::Served && !g.v6; // the v6 VIP has no endpoint
        match (&c, g.udp) {
            (Classified::Udp { key, payload, .. }, true) => {
                prop_assert!(served, "{:?}", g);
                prop_assert_eq!(*key, (g.src, g.to));
                prop_assert_eq!(&g.packet[payload.clone()], &g.payload[..]);
            }
            (Classified::Syn { key, .. }, false) => {
                prop_assert!(served && g.control == TcpControl::Syn && !g.ack, "{:?}", g);
                prop_assert_eq!(*key, (g.src, g.to));
            }
            (Classified::Stack, _) => {
                // Refusals and established-flow segments.
                prop_assert!(!served || (!g.udp && (g.control != TcpControl::Syn || g.ack)), "{:?}", g);
            }
            (other, _) => prop_assert!(false, "{} for {:?}", describe(other), g),
        }
        let mut st = stack();
        let replies = ingest_offline(&mut st, snap(), &g.packet);
        if matches!(c, Classified::Syn { .. }) {
            prop_assert_eq!(replies, 1, "a held SYN is answered with one SYN-ACK");
        }
        if !g.udp && g.control == TcpControl::Rst {
            prop_assert_eq!(replies, 0, "an RST is never answered");
        }
        if matches!(c, Classified::Udp { .. }) {
            prop_assert_eq!(replies, 0);
        }
    }

    #[test]
    fn mutated_packets_never_panic(g in valid_packet(), edits in prop::collection::vec(any::<(u8, u16, u8)>(), 1..6)) {
        check_any(&mutate(&g.packet, &edits))?;
    }

    /// A flow's SYN retransmitted after it was answered goes to its socket,
    /// and a sequence of arbitrary packets through one stack never panics.
    #[test]
    fn packet_sequences_through_one_stack(gs in prop::collection::vec(valid_packet(), 1..8), edits in prop::collection::vec(any::<(u8, u16, u8)>(), 0..4)) {
        let mut st = stack();
        for (i, g) in gs.iter().enumerate() {
            let p = if i % 2 == 1 { mutate(&g.packet, &edits) } else { g.packet.clone() };
            let replies = ingest_offline(&mut st, snap(), &p);
            prop_assert!(replies <= 2);
        }
    }
}
