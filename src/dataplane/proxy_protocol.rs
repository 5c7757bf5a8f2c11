//! PROXY protocol headers (HAProxy's proxy-protocol.txt), pure: v1 (text) and
//! v2 (binary) written into a caller-given buffer, v2 parsed with a typed
//! error. No I/O here, so the kernel relay, the TUN bridge and a future
//! io_uring engine each hook it in with a few lines.

use std::net::{IpAddr, Ipv6Addr, SocketAddr};

use crate::model::ProxyProtocol;

/// Longest header [`encode`] writes: v1 with two IPv6 addresses is 104 bytes
/// (the specification's bound is 107), v2 with IPv6 is 52.
pub const MAX_HEADER_LEN: usize = 108;

/// The 12-byte signature that starts every v2 header.
pub const V2_SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";

/// Fixed part of a v2 header: signature, version/command, family, length.
const V2_FIXED: usize = 16;

/// A buffer [`encode`] always fits in.
pub type HeaderBuf = [u8; MAX_HEADER_LEN];

/// Writes the header for a TCP connection from `src` (the client) to `dst`
/// (the address it connected to) into `buf`; returns its length. Mixed
/// families are written as IPv6 (the IPv4 one mapped), as both versions need
/// one family for both addresses.
pub fn encode(
    version: ProxyProtocol,
    src: SocketAddr,
    dst: SocketAddr,
    buf: &mut HeaderBuf,
) -> usize {
    let (src, dst) = same_family(src, dst);
    match version {
        ProxyProtocol::V1 => encode_v1(src, dst, buf),
        ProxyProtocol::V2 => encode_v2(src, dst, buf),
    }
}

/// Both addresses in one family: IPv6 with the IPv4 one mapped when they differ.
fn same_family(src: SocketAddr, dst: SocketAddr) -> (SocketAddr, SocketAddr) {
    let v6 = |a: SocketAddr| match a.ip() {
        IpAddr::V4(v4) => SocketAddr::new(IpAddr::V6(v4.to_ipv6_mapped()), a.port()),
        IpAddr::V6(_) => a,
    };
    if src.is_ipv4() == dst.is_ipv4() {
        (src, dst)
    } else {
        (v6(src), v6(dst))
    }
}

fn encode_v1(src: SocketAddr, dst: SocketAddr, buf: &mut HeaderBuf) -> usize {
    use std::io::Write;
    let proto = if src.is_ipv4() { "TCP4" } else { "TCP6" };
    let mut w = std::io::Cursor::new(&mut buf[..]);
    // The buffer holds the longest possible line, so the write cannot fail;
    // the position is what was written either way.
    let _ = write!(
        w,
        "PROXY {proto} {} {} {} {}\r\n",
        src.ip(),
        dst.ip(),
        src.port(),
        dst.port()
    );
    w.position() as usize
}

fn encode_v2(src: SocketAddr, dst: SocketAddr, buf: &mut HeaderBuf) -> usize {
    buf[..12].copy_from_slice(&V2_SIGNATURE);
    buf[12] = 0x21; // version 2, command PROXY
    let (sp, dp) = (src.port().to_be_bytes(), dst.port().to_be_bytes());
    match (src.ip(), dst.ip()) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            buf[13] = 0x11; // AF_INET, STREAM
            buf[14..16].copy_from_slice(&12u16.to_be_bytes());
            buf[16..20].copy_from_slice(&s.octets());
            buf[20..24].copy_from_slice(&d.octets());
            buf[24..26].copy_from_slice(&sp);
            buf[26..28].copy_from_slice(&dp);
            V2_FIXED + 12
        }
        (s, d) => {
            buf[13] = 0x21; // AF_INET6, STREAM
            buf[14..16].copy_from_slice(&36u16.to_be_bytes());
            buf[16..32].copy_from_slice(&v6(s).octets());
            buf[32..48].copy_from_slice(&v6(d).octets());
            buf[48..50].copy_from_slice(&sp);
            buf[50..52].copy_from_slice(&dp);
            V2_FIXED + 36
        }
    }
}

fn v6(ip: IpAddr) -> Ipv6Addr {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    }
}

/// Why a v2 header is rejected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    /// The first 12 bytes are not the v2 signature.
    #[error("not a PROXY protocol v2 signature")]
    Signature,
    /// The version nibble is not 2.
    #[error("PROXY protocol version {0} (expected 2)")]
    Version(u8),
    /// The command is neither LOCAL nor PROXY.
    #[error("unknown PROXY protocol command {0:#x}")]
    Command(u8),
    /// The address block is shorter than its family needs.
    #[error("address block of {len} bytes is too short for family {family:#x}")]
    Short {
        /// Family/protocol byte.
        family: u8,
        /// Length announced.
        len: u16,
    },
}

/// A parsed v2 header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Parsed {
    /// Bytes the header takes (signature to end of TLVs): the client's data
    /// starts after them.
    pub len: usize,
    /// The original connection's source and destination; `None` for the
    /// LOCAL command (health checks of the upstream balancer) and for
    /// families other than TCP/UDP over IPv4/IPv6 (kept as sent).
    pub addrs: Option<(SocketAddr, SocketAddr)>,
}

/// Outcome of looking at the first bytes of a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Parse {
    /// A whole header.
    Done(Parsed),
    /// A valid beginning: at least this many bytes in all are needed.
    Need(usize),
}

/// Parses a v2 header at the start of `buf`.
pub fn parse_v2(buf: &[u8]) -> Result<Parse, ParseError> {
    let sig = buf.len().min(12);
    if buf.get(..sig) != V2_SIGNATURE.get(..sig) {
        return Err(ParseError::Signature);
    }
    let Some(&[_, _, _, _, _, _, _, _, _, _, _, _, vc, family, l0, l1]) = buf.get(..V2_FIXED)
    else {
        return Ok(Parse::Need(V2_FIXED));
    };
    let (ver, cmd) = (vc >> 4, vc & 0x0f);
    if ver != 2 {
        return Err(ParseError::Version(ver));
    }
    if cmd > 1 {
        return Err(ParseError::Command(cmd));
    }
    let len = u16::from_be_bytes([l0, l1]);
    let total = V2_FIXED + usize::from(len);
    let Some(body) = buf.get(V2_FIXED..total) else {
        return Ok(Parse::Need(total));
    };
    // The address block an IPv4 or IPv6 family needs, TLVs may follow.
    let need = match family >> 4 {
        1 => 12,
        2 => 36,
        _ => 0,
    };
    if body.len() < need {
        return Err(ParseError::Short { family, len });
    }
    let addrs = match (cmd, family >> 4, family & 0x0f) {
        (1, 1, 1 | 2) => v4_addrs(body),
        (1, 2, 1 | 2) => v6_addrs(body),
        _ => None,
    };
    Ok(Parse::Done(Parsed { len: total, addrs }))
}

/// Source and destination of an IPv4 address block (at least 12 bytes).
fn v4_addrs(b: &[u8]) -> Option<(SocketAddr, SocketAddr)> {
    let a: &[u8; 12] = b.get(..12)?.try_into().ok()?;
    let ip = |o: [u8; 4]| IpAddr::from(o);
    Some((
        SocketAddr::new(
            ip([a[0], a[1], a[2], a[3]]),
            u16::from_be_bytes([a[8], a[9]]),
        ),
        SocketAddr::new(
            ip([a[4], a[5], a[6], a[7]]),
            u16::from_be_bytes([a[10], a[11]]),
        ),
    ))
}

/// Source and destination of an IPv6 address block (at least 36 bytes).
fn v6_addrs(b: &[u8]) -> Option<(SocketAddr, SocketAddr)> {
    let src: [u8; 16] = b.get(..16)?.try_into().ok()?;
    let dst: [u8; 16] = b.get(16..32)?.try_into().ok()?;
    let ports: &[u8; 4] = b.get(32..36)?.try_into().ok()?;
    Some((
        SocketAddr::new(IpAddr::from(src), u16::from_be_bytes([ports[0], ports[1]])),
        SocketAddr::new(IpAddr::from(dst), u16::from_be_bytes([ports[2], ports[3]])),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn header(v: ProxyProtocol, src: &str, dst: &str) -> Vec<u8> {
        let mut buf = [0u8; MAX_HEADER_LEN];
        let n = encode(v, sa(src), sa(dst), &mut buf);
        buf[..n].to_vec()
    }

    #[test]
    fn v1_lines_as_in_the_specification() {
        assert_eq!(
            header(ProxyProtocol::V1, "192.0.2.1:56324", "10.96.0.10:443"),
            b"PROXY TCP4 192.0.2.1 10.96.0.10 56324 443\r\n"
        );
        assert_eq!(
            header(ProxyProtocol::V1, "[2001:db8::1]:1", "[fd00::a]:80"),
            b"PROXY TCP6 2001:db8::1 fd00::a 1 80\r\n"
        );
        let longest = header(
            ProxyProtocol::V1,
            "[ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff]:65535",
            "[ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff]:65535",
        );
        assert_eq!(longest.len(), 104);
        assert!(longest.len() <= 107);
    }

    #[test]
    fn v2_bytes_as_in_the_specification() {
        let h = header(ProxyProtocol::V2, "192.0.2.1:56324", "10.96.0.10:443");
        let mut want = V2_SIGNATURE.to_vec();
        want.extend([0x21, 0x11, 0, 12, 192, 0, 2, 1, 10, 96, 0, 10]);
        want.extend(56324u16.to_be_bytes());
        want.extend(443u16.to_be_bytes());
        assert_eq!(h, want);
        let h6 = header(ProxyProtocol::V2, "[2001:db8::1]:1", "[fd00::a]:80");
        assert_eq!((h6[13], h6.len()), (0x21, 52));
    }

    #[test]
    fn mixed_families_are_written_as_ipv6() {
        assert_eq!(
            header(ProxyProtocol::V1, "192.0.2.1:1", "[fd00::a]:80"),
            b"PROXY TCP6 ::ffff:192.0.2.1 fd00::a 1 80\r\n"
        );
    }

    #[test]
    fn v2_round_trips_and_reports_what_is_missing() {
        for (src, dst) in [
            ("192.0.2.1:56324", "10.96.0.10:443"),
            ("[2001:db8::1]:1", "[fd00::a]:80"),
        ] {
            let mut h = header(ProxyProtocol::V2, src, dst);
            let whole = h.len();
            for cut in 0..whole {
                let want = if cut < 16 { 16 } else { whole };
                assert_eq!(parse_v2(&h[..cut]), Ok(Parse::Need(want)), "cut at {cut}");
            }
            h.extend(b"GET / HTTP/1.1\r\n");
            assert_eq!(
                parse_v2(&h),
                Ok(Parse::Done(Parsed {
                    len: whole,
                    addrs: Some((sa(src), sa(dst)))
                }))
            );
        }
    }

    #[test]
    fn v2_local_command_and_tlvs() {
        // LOCAL, AF_UNSPEC, no addresses: the balancer's own check.
        let mut local = V2_SIGNATURE.to_vec();
        local.extend([0x20, 0x00, 0, 0]);
        assert_eq!(
            parse_v2(&local),
            Ok(Parse::Done(Parsed {
                len: 16,
                addrs: None
            }))
        );
        // TLVs after the addresses are skipped with the header.
        let mut h = header(ProxyProtocol::V2, "192.0.2.1:1", "10.0.0.1:2");
        h[15] += 4;
        h.extend([0x04, 0, 1, 0xaa]); // PP2_TYPE_NOOP
        match parse_v2(&h) {
            Ok(Parse::Done(p)) => assert_eq!(p.len, 32),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn malformed_v2_headers_are_typed_errors() {
        assert_eq!(parse_v2(b"GET / HTTP/1.1\r\n"), Err(ParseError::Signature));
        assert_eq!(parse_v2(b"\r\n\r\nX"), Err(ParseError::Signature));
        let mut h = header(ProxyProtocol::V2, "192.0.2.1:1", "10.0.0.1:2");
        h[12] = 0x11;
        assert_eq!(parse_v2(&h), Err(ParseError::Version(1)));
        h[12] = 0x22;
        assert_eq!(parse_v2(&h), Err(ParseError::Command(2)));
        h[12] = 0x21;
        h[15] = 4;
        assert_eq!(
            parse_v2(&h),
            Err(ParseError::Short {
                family: 0x11,
                len: 4
            })
        );
    }
}
