//! TUN path support: packet builders, a small snapshot, and the packet path
//! without I/O (what the `tun_packet` fuzz target, the property tests and the
//! dataplane bench drive).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use smoltcp::phy::ChecksumCapabilities;
use smoltcp::wire::{
    IpAddress, IpProtocol, TcpControl, TcpPacket, TcpRepr, TcpSeqNumber, TcpTimestampRepr,
};

use crate::dataplane::tun::packet::{classify, ip_packet, Classified, ConnKey};
use crate::dataplane::tun::stack::{Stack, SynVerdict};
use crate::discovery::Update;
use crate::model::{
    AddressFamily, Endpoint, EndpointSlice, Object, ObjectKey, Protocol, Service, ServicePort,
    SlicePort, TargetPort,
};
use crate::state::{NodeContext, Snapshot, Store};

/// An IP+TCP packet carrying `tcp` from `src` to `dst` (same family), with
/// valid checksums.
pub fn tcp_packet_of(src: IpAddr, dst: IpAddr, tcp: &TcpRepr) -> Vec<u8> {
    let mut out = Vec::new();
    let emit = |b: &mut [u8], s: &IpAddress, d: &IpAddress| {
        let caps = ChecksumCapabilities::default();
        tcp.emit(&mut TcpPacket::new_unchecked(b), s, d, &caps);
    };
    ip_packet(src, dst, IpProtocol::Tcp, tcp.buffer_len(), &mut out, emit)
        .unwrap_or_else(|| panic!("{src} and {dst}: different families"));
    out
}

/// A client's TCP segment on `key` (client → VIP): a SYN carries MSS 1460;
/// `ack` and `tsval` are set when given.
pub fn segment(
    key: ConnKey,
    control: TcpControl,
    seq: u32,
    ack: Option<u32>,
    tsval: Option<u32>,
    payload: &[u8],
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
        timestamp: tsval.map(|tsval| TcpTimestampRepr { tsval, tsecr: 0 }),
        payload,
    };
    tcp_packet_of(key.0.ip(), key.1.ip(), &tcp)
}

/// A client's SYN on `key` with sequence number 1000 and no timestamp.
pub fn syn(key: ConnKey) -> Vec<u8> {
    segment(key, TcpControl::Syn, 1000, None, None, &[])
}

/// The packet path without I/O: classifies `packet` and hands smoltcp what it
/// would get, answering a held SYN as if its backend had accepted at once.
/// Returns how many packets the stack queued for the wire, dropping them.
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
        Classified::Syn { key, .. } => {
            if let SynVerdict::Hold = stack.syn(key, packet.to_vec()) {
                let _ = stack.accept(key);
            }
        }
        Classified::Drop | Classified::Udp { .. } => {}
    }
}

/// A small snapshot: Service `default/web` at 10.96.0.10 and fd00:10:96::10,
/// TCP 80 → 8080 and UDP 53 → 5353, with one endpoint 10.0.0.1 when
/// `with_endpoints`.
pub fn sample_snapshot(with_endpoints: bool) -> Snapshot {
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
    let mut st = Store::new();
    st.apply(Update::Reset(vec![
        Object::Service(svc),
        Object::EndpointSlice(slice),
    ]));
    let ctx = NodeContext {
        proxy_name: "ringvip".into(),
        ..NodeContext::default()
    };
    st.compile(&ctx, &crate::telemetry::Metrics::new(), 1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataplane::tun::packet::udp_packet;
    use crate::dataplane::tun::TunSettings;

    fn sa(s: &str) -> std::net::SocketAddr {
        s.parse().unwrap()
    }

    fn corpus() -> std::path::PathBuf {
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/tun_packet")
    }

    #[test]
    #[ignore = "writes the seed corpus; run by hand"]
    fn write_seed_corpus() {
        let key = (sa("10.1.0.5:40000"), sa("10.96.0.10:80"));
        let refused = (sa("10.1.0.5:40000"), sa("10.96.0.10:81"));
        let udp = |src: &str, dst: &str, payload: &[u8]| {
            let mut p = Vec::new();
            udp_packet(sa(src), sa(dst), payload, &mut p).unwrap();
            p
        };
        let seeds: Vec<(&str, Vec<u8>)> = vec![
            ("syn_v4", syn(key)),
            ("syn_refused_v4", syn(refused)),
            (
                "ack_unknown_v4",
                segment(key, TcpControl::None, 1000, Some(1), None, &[]),
            ),
            (
                "rst_v4",
                segment(key, TcpControl::Rst, 1000, None, None, &[]),
            ),
            (
                "fin_v4",
                segment(key, TcpControl::Fin, 1000, Some(1), None, &[]),
            ),
            ("udp_v4", udp("10.1.0.5:5000", "10.96.0.10:53", b"hello")),
            ("udp_v6", udp("[fd00::5]:5000", "[fd00:10:96::10]:53", b"q")),
            ("udp_closed_v4", udp("10.1.0.5:5000", "10.96.0.10:99", b"x")),
            ("truncated_v4", vec![0x45, 0, 0, 40, 0, 0]),
            ("bad_version", vec![0x95; 40]),
        ];
        for (name, bytes) in seeds {
            std::fs::write(corpus().join(name), bytes).unwrap();
        }
    }

    /// The fuzz corpus (fuzz/corpus/tun_packet) replayed through the fuzz
    /// target's entry point on stable, so CI exercises it.
    #[test]
    fn fuzz_corpus_replays() {
        let snap = sample_snapshot(true);
        let mut n = 0;
        for entry in std::fs::read_dir(corpus()).unwrap() {
            let path = entry.unwrap().path();
            let data = std::fs::read(&path).unwrap();
            let mut stack = Stack::new(TunSettings::default());
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
        assert!(n >= 10, "corpus too small: {n} files");
    }
}
