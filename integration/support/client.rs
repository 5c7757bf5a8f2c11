//! Clients: HTTP requests, connections from chosen sources, and one
//! request classified as its client saw it ([`Answer`]).

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream, UdpSocket};
use std::time::{Duration, Instant};

use super::wait_until;

/// One HTTP GET through `addr` from source `src` (any port); returns the body.
pub fn http_get_from(src: Option<IpAddr>, addr: SocketAddr) -> std::io::Result<String> {
    let mut c = connect_from(src, addr)?;
    c.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(c, "GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")?;
    let mut s = String::new();
    c.read_to_string(&mut s)?;
    match s.split("\r\n\r\n").nth(1) {
        Some(body) if s.starts_with("HTTP/1.1 200") => Ok(body.trim().to_string()),
        _ => Err(std::io::Error::other(format!("bad response {s:?}"))),
    }
}

pub fn http_get(addr: SocketAddr) -> std::io::Result<String> {
    http_get_from(None, addr)
}

/// A TCP connection (either family) from a chosen source address.
pub fn connect_from(src: Option<IpAddr>, addr: SocketAddr) -> std::io::Result<TcpStream> {
    let s = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        None,
    )?;
    if let Some(ip) = src {
        s.bind(&SocketAddr::new(ip, 0).into())?;
    }
    s.connect_timeout(&addr.into(), Duration::from_secs(3))?;
    Ok(s.into())
}

/// Connects once the frontend accepts (ringvip opens listeners asynchronously).
pub fn connect_when_ready(addr: SocketAddr) -> TcpStream {
    let mut conn = None;
    assert!(
        wait_until(Duration::from_secs(5), || {
            conn = connect_from(None, addr).ok();
            conn.is_some()
        }),
        "{addr} never accepted"
    );
    conn.expect("checked above")
}

/// Bytes read from a streaming connection over `dur` (it must not stall).
pub fn bytes_within(conn: &mut TcpStream, dur: Duration) -> usize {
    let mut buf = [0u8; 64];
    let end = Instant::now() + dur;
    let mut got = 0;
    while Instant::now() < end {
        got += conn.read(&mut buf).unwrap();
    }
    got
}

/// Sends `len` patterned bytes through `c` to an echo backend, half-closes
/// (FIN), and reads to the end: whether exactly those bytes came back.
pub fn echoed_after_fin(c: &mut TcpStream, len: u32) -> bool {
    let payload: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
    c.write_all(&payload).unwrap();
    c.shutdown(std::net::Shutdown::Write).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut back = Vec::new();
    c.read_to_end(&mut back).unwrap();
    back == payload
}

/// Asserts that `conn`, to a [`Mode::Stream`](super::Mode) backend, keeps
/// streaming (`when`, e.g. "after its endpoint left"): more than 10 bytes
/// within 500 ms.
pub fn assert_streams(conn: &mut TcpStream, when: &str) {
    let got = bytes_within(conn, Duration::from_millis(500));
    assert!(got > 10, "stream stalled {when} ({got} bytes)");
}

/// A DNS query (RFC 1035) for the A record of `name`.
pub fn a_query(name: &str) -> Vec<u8> {
    let mut q = vec![0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
    for label in name.split('.') {
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    q.extend_from_slice(&[0, 0, 1, 0, 1]);
    q
}

/// GET `path` from an admin server; the whole response, headers included.
pub fn admin_get(addr: SocketAddr, path: &str) -> String {
    let mut c = TcpStream::connect(addr).unwrap();
    write!(
        c,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut s = String::new();
    c.read_to_string(&mut s).unwrap();
    s
}

/// What one request through a frontend got, as its client saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// HTTP served: the body's backend name (`backend-<name>`).
    Backend(String),
    /// An echo backend sent the bytes back.
    Echoed,
    /// Refused at connect.
    Refused,
    /// Reset or closed without an answer (a connection that raced a
    /// listener's close, or was refused after the handshake).
    Reset,
    /// The SYN went unanswered for 1 s (a dropping listener).
    Dropped,
    /// Connected, then nothing for 2 s: a listener that accepted and never
    /// relayed. Never acceptable.
    Hung,
}

/// Connects to `addr`, or says how the connect failed (a SYN unanswered for
/// 1 s: `Dropped`).
fn connect_or_answer(addr: SocketAddr) -> Result<TcpStream, Answer> {
    connect_within(addr, Duration::from_secs(1))
}

/// Connects to `addr`, or says how the connect failed: `Dropped` when no
/// answer came within `limit` (past 1 s, the kernel has sent the SYN again).
fn connect_within(addr: SocketAddr, limit: Duration) -> Result<TcpStream, Answer> {
    let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
        .unwrap_or_else(|e| panic!("socket: {e}"));
    match s.connect_timeout(&addr.into(), limit) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => return Err(Answer::Refused),
        Err(e) if e.kind() == std::io::ErrorKind::TimedOut => return Err(Answer::Dropped),
        Err(_) => return Err(Answer::Reset),
    }
    let c: TcpStream = s.into();
    c.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    Ok(c)
}

fn timed_out(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
    )
}

/// One HTTP GET through `addr`, classified.
pub fn ask(addr: SocketAddr) -> Answer {
    let mut c = match connect_or_answer(addr) {
        Ok(c) => c,
        Err(a) => return a,
    };
    if write!(c, "GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n").is_err() {
        return Answer::Reset;
    }
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    loop {
        match c.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if timed_out(&e) => {
                return if got.is_empty() {
                    Answer::Hung
                } else {
                    Answer::Reset
                };
            }
            Err(_) => break,
        }
    }
    let text = String::from_utf8_lossy(&got);
    match text.split("\r\n\r\n").nth(1) {
        Some(body) if text.starts_with("HTTP/1.1 200") => {
            Answer::Backend(body.trim().trim_start_matches("backend-").to_string())
        }
        _ => Answer::Reset,
    }
}

/// One `ping` through `addr` to an echo backend, classified.
pub fn echo(addr: SocketAddr) -> Answer {
    match connect_or_answer(addr) {
        Ok(c) => ping(c),
        Err(a) => a,
    }
}

/// One `ping` through `addr` to an echo backend, classified, waiting up to
/// `limit` for the connect; with how long the connect took (over 1 s: the
/// first SYN went unanswered and the kernel's retransmission was answered).
pub fn echo_within(addr: SocketAddr, limit: Duration) -> (Answer, Duration) {
    let t = Instant::now();
    let c = connect_within(addr, limit);
    let took = t.elapsed();
    match c {
        Ok(c) => (ping(c), took),
        Err(a) => (a, took),
    }
}

fn ping(mut c: TcpStream) -> Answer {
    let _ = c.write_all(b"ping");
    let mut b = [0u8; 4];
    match c.read_exact(&mut b) {
        Ok(()) if &b == b"ping" => Answer::Echoed,
        Err(e) if timed_out(&e) => Answer::Hung,
        _ => Answer::Reset,
    }
}

/// One connection to `addr` is refused at connect.
pub fn refused(addr: SocketAddr) -> bool {
    ask(addr) == Answer::Refused
}

/// Waits until `to` answers a datagram at all (ringvip sets up the TUN and
/// the NodePort listener after it logs its first snapshot): a precondition,
/// so a poll; the socket used here is not one the test counts. It is given
/// back for the caller to hold, so no counted socket gets its port (and its
/// flow) while the test runs.
pub fn wait_udp_ready(to: SocketAddr, probe: &[u8]) -> Option<UdpSocket> {
    let c = UdpSocket::bind("0.0.0.0:0").unwrap();
    c.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut buf = [0u8; 64];
    while Instant::now() < deadline {
        c.send_to(probe, to).unwrap();
        if c.recv(&mut buf).is_ok() {
            return Some(c);
        }
    }
    None
}
