//! One check, on the control runtime: a TCP connect, an HTTP GET, or a
//! grpc.health.v1 `Check` spoken as the few fixed HTTP/2 frames it needs
//! (no HTTP/2 or protobuf crate: the request never varies and the answer
//! is one small message; see [`grpc`]). Each returns `Ok` or why it failed,
//! in a short phrase for `ringvip status`.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Why one check failed, as shown in status.
pub type Failure = String;

/// Runs `f` within `timeout`.
async fn within<T>(
    timeout: Duration,
    f: impl std::future::Future<Output = Result<T, Failure>>,
) -> Result<T, Failure> {
    tokio::time::timeout(timeout, f)
        .await
        .unwrap_or_else(|_| Err(format!("timed out after {} ms", timeout.as_millis())))
}

async fn connect(addr: SocketAddr) -> Result<TcpStream, Failure> {
    TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect: {}", short_io(&e)))
}

fn short_io(e: &std::io::Error) -> String {
    match e.kind() {
        std::io::ErrorKind::ConnectionRefused => "connection refused".into(),
        std::io::ErrorKind::ConnectionReset => "connection reset".into(),
        _ => e.to_string(),
    }
}

/// The connect completes within `timeout`.
pub async fn tcp(addr: SocketAddr, timeout: Duration) -> Result<(), Failure> {
    within(timeout, async { connect(addr).await.map(drop) }).await
}

/// What an HTTP check sends.
#[derive(Debug, Clone, Copy)]
pub struct HttpGet<'a> {
    /// `Host` header value (the kubelet: the probe's host or the Pod IP,
    /// with the port).
    pub host: &'a str,
    /// Request path.
    pub path: &'a str,
    /// Extra headers; a `Host` or `User-Agent` among them replaces ours.
    pub headers: &'a [(String, String)],
    /// `User-Agent` unless `headers` has one.
    pub user_agent: &'a str,
}

/// `GET` answered with a status in 200..=399 within `timeout` (the
/// kubelet's and HAProxy's rule; redirects are not followed, a 3xx counts
/// as success).
pub async fn http(addr: SocketAddr, req: HttpGet<'_>, timeout: Duration) -> Result<(), Failure> {
    within(timeout, async {
        let mut s = connect(addr).await?;
        let has = |n: &str| req.headers.iter().any(|(k, _)| k.eq_ignore_ascii_case(n));
        let mut text = format!("GET {} HTTP/1.1\r\n", req.path);
        if !has("host") {
            text.push_str(&format!("Host: {}\r\n", req.host));
        }
        if !has("user-agent") {
            text.push_str(&format!("User-Agent: {}\r\n", req.user_agent));
        }
        if !has("accept") {
            text.push_str("Accept: */*\r\n");
        }
        for (k, v) in req.headers {
            text.push_str(&format!("{k}: {v}\r\n"));
        }
        text.push_str("Connection: close\r\n\r\n");
        s.write_all(text.as_bytes())
            .await
            .map_err(|e| format!("send: {}", short_io(&e)))?;
        // The status line is all that is read.
        let mut buf = [0u8; 64];
        let mut got = 0;
        while got < 12 {
            let Some(rest) = buf.get_mut(got..) else {
                break;
            };
            match s.read(rest).await {
                Ok(0) => break,
                Ok(n) => got += n,
                Err(e) => return Err(format!("receive: {}", short_io(&e))),
            }
        }
        let line = std::str::from_utf8(buf.get(..got).unwrap_or_default()).unwrap_or("");
        let code: u16 = line
            .strip_prefix("HTTP/1.")
            .and_then(|r| r.get(2..5))
            .and_then(|c| c.parse().ok())
            .ok_or_else(|| "no HTTP status line".to_string())?;
        if (200..400).contains(&code) {
            Ok(())
        } else {
            Err(format!("HTTP {code}"))
        }
    })
    .await
}

/// grpc.health.v1.Health/Check for `service` over cleartext HTTP/2
/// (prior knowledge, as the kubelet's gRPC probe), answered `SERVING`
/// within `timeout`. The request is written as fixed frames; of the answer,
/// only the DATA of stream 1 is decoded (its `status` field), so response
/// headers need no HPACK decoder: a trailers-only answer (an error
/// `grpc-status`) ends the stream without DATA and fails.
pub async fn grpc(
    addr: SocketAddr,
    authority: &str,
    service: &str,
    timeout: Duration,
) -> Result<(), Failure> {
    within(timeout, async {
        let mut s = connect(addr).await?;
        let req = grpc_request(authority, service);
        s.write_all(&req)
            .await
            .map_err(|e| format!("send: {}", short_io(&e)))?;
        let mut data: Vec<u8> = Vec::new();
        loop {
            let mut head = [0u8; 9];
            s.read_exact(&mut head)
                .await
                .map_err(|_| "connection closed before the answer".to_string())?;
            let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
            let (kind, flags) = (head[3], head[4]);
            let stream = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
            if len > MAX_FRAME {
                return Err(format!("HTTP/2 frame of {len} bytes"));
            }
            let mut payload = vec![0u8; len];
            s.read_exact(&mut payload)
                .await
                .map_err(|_| "connection closed in a frame".to_string())?;
            match (kind, stream) {
                // SETTINGS (not an ACK): acknowledge.
                (4, 0) if flags & 1 == 0 => {
                    s.write_all(&frame(4, 1, 0, &[]))
                        .await
                        .map_err(|e| format!("send: {}", short_io(&e)))?;
                }
                // PING: answer it.
                (6, 0) if flags & 1 == 0 => {
                    s.write_all(&frame(6, 1, 0, &payload))
                        .await
                        .map_err(|e| format!("send: {}", short_io(&e)))?;
                }
                (7, 0) => return Err("GOAWAY".into()),
                (3, 1) => return Err("stream reset".into()),
                (0, 1) => {
                    data.extend_from_slice(&payload);
                    if let Some(status) = health_status(&data) {
                        return match status {
                            1 => Ok(()),
                            0 => Err("status UNKNOWN".into()),
                            2 => Err("status NOT_SERVING".into()),
                            3 => Err("status SERVICE_UNKNOWN".into()),
                            n => Err(format!("status {n}")),
                        };
                    }
                    if flags & 1 != 0 {
                        return Err("no health status in the answer".into());
                    }
                }
                (1, 1) if flags & 1 != 0 => {
                    return Err("answered without a message (grpc-status error)".into())
                }
                _ => {}
            }
        }
    })
    .await
}

/// Largest frame accepted (the HTTP/2 default SETTINGS_MAX_FRAME_SIZE).
const MAX_FRAME: usize = 16384;

/// An HTTP/2 frame.
fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = (payload.len() as u32).to_be_bytes();
    let mut f = vec![len[1], len[2], len[3], kind, flags];
    f.extend(stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// An HPACK string literal, not Huffman-coded (7-bit prefix length).
fn hpack_str(out: &mut Vec<u8>, s: &str) {
    hpack_int(out, 0x00, 7, s.len());
    out.extend_from_slice(s.as_bytes());
}

/// An HPACK integer with an `n`-bit prefix after `first`'s high bits.
fn hpack_int(out: &mut Vec<u8>, first: u8, n: u32, mut v: usize) {
    let max = (1usize << n) - 1;
    if v < max {
        out.push(first | v as u8);
        return;
    }
    out.push(first | max as u8);
    v -= max;
    while v >= 128 {
        out.push((v % 128) as u8 | 0x80);
        v /= 128;
    }
    out.push(v as u8);
}

/// The whole request: preface, empty SETTINGS, HEADERS, one DATA frame.
fn grpc_request(authority: &str, service: &str) -> Vec<u8> {
    let mut out = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    out.extend(frame(4, 0, 0, &[]));
    let mut h = vec![0x83, 0x86]; // :method POST, :scheme http (static table)
                                  // Literals without indexing, names from the static table.
    hpack_int(&mut h, 0x00, 4, 4); // :path
    hpack_str(&mut h, "/grpc.health.v1.Health/Check");
    hpack_int(&mut h, 0x00, 4, 1); // :authority
    hpack_str(&mut h, authority);
    hpack_int(&mut h, 0x00, 4, 31); // content-type
    hpack_str(&mut h, "application/grpc");
    h.push(0x00); // te: new name
    hpack_str(&mut h, "te");
    hpack_str(&mut h, "trailers");
    out.extend(frame(1, 0x4, 1, &h)); // END_HEADERS
                                      // HealthCheckRequest { string service = 1; }
    let mut msg = Vec::new();
    if !service.is_empty() {
        msg.push(0x0a);
        let mut n = service.len();
        while n >= 0x80 {
            msg.push((n as u8 & 0x7f) | 0x80);
            n >>= 7;
        }
        msg.push(n as u8);
        msg.extend_from_slice(service.as_bytes());
    }
    let mut body = vec![0u8]; // not compressed
    body.extend((msg.len() as u32).to_be_bytes());
    body.extend(msg);
    out.extend(frame(0, 0x1, 1, &body)); // END_STREAM
    out
}

/// The `status` of a whole HealthCheckResponse message in `data` (gRPC
/// length-prefixed), `None` while incomplete. A message without the field
/// is status 0 (UNKNOWN), as protobuf defaults it.
fn health_status(data: &[u8]) -> Option<u64> {
    let &[_, a, b, c, d, ..] = data else {
        return None;
    };
    let len = u32::from_be_bytes([a, b, c, d]) as usize;
    let mut msg = data.get(5..5 + len)?;
    let mut status = 0;
    while let Some((&tag, rest)) = msg.split_first() {
        let (v, rest) = varint(rest)?;
        match tag {
            0x08 => status = v,
            // A length-delimited field we do not know: skip it.
            t if t & 7 == 2 => {
                let skip = usize::try_from(v).ok()?;
                msg = rest.get(skip..)?;
                continue;
            }
            _ => {}
        }
        msg = rest;
    }
    Some(status)
}

fn varint(b: &[u8]) -> Option<(u64, &[u8])> {
    let mut v = 0u64;
    for (i, &x) in b.iter().enumerate().take(10) {
        v |= u64::from(x & 0x7f) << (7 * i);
        if x & 0x80 == 0 {
            return Some((v, b.get(i + 1..)?));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    /// A fake gRPC health server answering `status` (or trailers only when
    /// `None`); returns what it read of the request.
    async fn server(status: Option<u8>) -> (SocketAddr, tokio::task::JoinHandle<Vec<u8>>) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let h = tokio::spawn(async move {
            let (mut s, _) = l.accept().await.unwrap();
            let mut got = vec![0u8; 4096];
            let n = s.read(&mut got).await.unwrap();
            got.truncate(n);
            s.write_all(&frame(4, 0, 0, &[0, 3, 0, 0, 0, 100]))
                .await
                .unwrap();
            s.write_all(&frame(6, 0, 0, &[1; 8])).await.unwrap();
            match status {
                Some(st) => {
                    s.write_all(&frame(1, 4, 1, &[0x88])).await.unwrap(); // :status 200
                    s.write_all(&frame(0, 0, 1, &[0, 0, 0, 0, 2, 0x08, st]))
                        .await
                        .unwrap();
                }
                None => s.write_all(&frame(1, 5, 1, &[0x88])).await.unwrap(),
            }
            let mut rest = vec![0u8; 64];
            let _ = tokio::time::timeout(Duration::from_millis(200), s.read(&mut rest)).await;
            got
        });
        (addr, h)
    }

    #[tokio::test]
    async fn grpc_check_reads_the_health_status() {
        let t = Duration::from_secs(2);
        let (addr, h) = server(Some(1)).await;
        assert_eq!(grpc(addr, "10.0.0.1:9090", "web", t).await, Ok(()));
        let req = h.await.unwrap();
        assert!(req.starts_with(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"));
        let text = String::from_utf8_lossy(&req);
        assert!(text.contains("/grpc.health.v1.Health/Check"), "{text}");
        assert!(req.ends_with(&[0, 0, 0, 0, 5, 0x0a, 3, b'w', b'e', b'b']));
        let (addr, _) = server(Some(2)).await;
        assert_eq!(
            grpc(addr, "x", "", t).await,
            Err("status NOT_SERVING".to_string())
        );
        let (addr, _) = server(None).await;
        assert!(grpc(addr, "x", "", t)
            .await
            .unwrap_err()
            .contains("without a message"));
    }

    #[tokio::test]
    async fn http_status_decides_and_headers_replace_ours() {
        for (answer, want) in [
            ("HTTP/1.1 204 No Content\r\n\r\n", Ok(())),
            ("HTTP/1.1 302 Found\r\nLocation: /x\r\n\r\n", Ok(())),
            ("HTTP/1.0 503 Busy\r\n\r\n", Err("HTTP 503".to_string())),
            (
                "SSH-2.0-OpenSSH\r\n",
                Err("no HTTP status line".to_string()),
            ),
        ] {
            let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = l.local_addr().unwrap();
            let h = tokio::spawn(async move {
                let (mut s, _) = l.accept().await.unwrap();
                let mut got = vec![0u8; 1024];
                let n = s.read(&mut got).await.unwrap();
                s.write_all(answer.as_bytes()).await.unwrap();
                String::from_utf8_lossy(&got[..n]).to_string()
            });
            let headers = [("Host".to_string(), "example".to_string())];
            let req = HttpGet {
                host: "10.0.0.1:80",
                path: "/ready",
                headers: &headers,
                user_agent: "kube-probe/ringvip",
            };
            assert_eq!(
                http(addr, req, Duration::from_secs(2)).await,
                want,
                "{answer}"
            );
            let sent = h.await.unwrap();
            assert!(sent.starts_with("GET /ready HTTP/1.1\r\n"), "{sent}");
            assert!(
                sent.contains("Host: example\r\n") && !sent.contains("10.0.0.1"),
                "{sent}"
            );
            assert!(
                sent.contains("User-Agent: kube-probe/ringvip\r\n"),
                "{sent}"
            );
        }
    }

    #[tokio::test]
    async fn tcp_refused_and_timeouts_say_so() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        assert_eq!(tcp(addr, Duration::from_secs(1)).await, Ok(()));
        drop(l);
        assert_eq!(
            tcp(addr, Duration::from_secs(1)).await,
            Err("connect: connection refused".to_string())
        );
    }
}
