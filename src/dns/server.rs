//! The DNS servers: one UDP socket and one TCP listener on `--dns-addr`, on the
//! control runtime. Each query reads the current [`Zone`] with one `load()`.
//! Out-of-zone queries go to `--dns-upstream` when set (bounded in number and
//! time; SERVFAIL when the upstream does not answer), else get REFUSED.
//! Every response sent is counted by response code and transport
//! ([`DnsMetrics`]).

use std::net::SocketAddr;
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::Semaphore;

use super::{answer, servfail, Options, Outcome, Transport, Zone, TCP_MAX};
use crate::telemetry::{DnsMetrics, DnsProtocol};

/// How long an upstream has to answer a forwarded query.
pub const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a TCP client may stay idle between queries.
pub const TCP_IDLE: Duration = Duration::from_secs(10);
/// Forwarded queries in flight at once; more get SERVFAIL at once.
pub const MAX_FORWARDS: usize = 256;
/// TCP connections at once; more are closed at once.
pub const MAX_TCP: usize = 128;

/// A DNS server failed to start.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The UDP socket could not be bound.
    #[error("binding DNS UDP socket {addr}: {source}")]
    Udp {
        /// Address.
        addr: SocketAddr,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The TCP listener could not be bound.
    #[error("binding DNS TCP listener {addr}: {source}")]
    Tcp {
        /// Address.
        addr: SocketAddr,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
}

/// Bound DNS sockets, ready to serve.
pub struct DnsServer {
    udp: Arc<UdpSocket>,
    tcp: TcpListener,
    zone: Arc<ArcSwap<Zone>>,
    upstream: Option<SocketAddr>,
    metrics: DnsMetrics,
}

impl DnsServer {
    /// Binds UDP and TCP on `addr` (the TCP port is the one UDP got when `addr`
    /// has port 0); responses will be counted in `metrics`.
    pub async fn bind(
        addr: SocketAddr,
        zone: Arc<ArcSwap<Zone>>,
        upstream: Option<SocketAddr>,
        metrics: DnsMetrics,
    ) -> Result<Self, ServerError> {
        // With port 0 the kernel picks the UDP port, and TCP must take the
        // same one, which another TCP socket may hold: pick again then.
        let tries = if addr.port() == 0 { PORT_PICKS } else { 1 };
        let mut attempt = 0;
        let (udp, tcp) = loop {
            attempt += 1;
            let udp = UdpSocket::bind(addr)
                .await
                .map_err(|source| ServerError::Udp { addr, source })?;
            let bound = udp
                .local_addr()
                .map_err(|source| ServerError::Udp { addr, source })?;
            match TcpListener::bind(bound).await {
                Ok(tcp) => break (udp, tcp),
                Err(e) if e.kind() == std::io::ErrorKind::AddrInUse && attempt < tries => {}
                Err(source) => {
                    return Err(ServerError::Tcp {
                        addr: bound,
                        source,
                    })
                }
            }
        };
        Ok(Self {
            udp: Arc::new(udp),
            tcp,
            zone,
            upstream,
            metrics,
        })
    }

    /// The bound address (UDP and TCP).
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.udp.local_addr()
    }

    /// Takes sockets bound before (handed over by the previous process):
    /// UDP and TCP on one address.
    pub fn from_std(
        udp: std::net::UdpSocket,
        tcp: std::net::TcpListener,
        zone: Arc<ArcSwap<Zone>>,
        upstream: Option<SocketAddr>,
        metrics: DnsMetrics,
    ) -> std::io::Result<Self> {
        udp.set_nonblocking(true)?;
        tcp.set_nonblocking(true)?;
        Ok(Self {
            udp: Arc::new(UdpSocket::from_std(udp)?),
            tcp: TcpListener::from_std(tcp)?,
            zone,
            upstream,
            metrics,
        })
    }

    /// Duplicates of the UDP socket and the TCP listener (for the next
    /// process of an upgrade).
    pub fn dup_sockets(&self) -> std::io::Result<(OwnedFd, OwnedFd)> {
        Ok((
            socket2::SockRef::from(&*self.udp).try_clone()?.into(),
            socket2::SockRef::from(&self.tcp).try_clone()?.into(),
        ))
    }

    /// Serves until the runtime stops or the returned tasks are aborted.
    pub fn spawn(self) -> Vec<tokio::task::JoinHandle<()>> {
        let opts = Options {
            forward: self.upstream.is_some(),
        };
        let forwards = Arc::new(Semaphore::new(MAX_FORWARDS));
        let udp = tokio::spawn(serve_udp(
            self.udp,
            self.zone.clone(),
            self.upstream,
            opts,
            forwards.clone(),
            self.metrics.clone(),
        ));
        let tcp = tokio::spawn(serve_tcp(
            self.tcp,
            self.zone,
            self.upstream,
            opts,
            forwards,
            self.metrics,
        ));
        vec![udp, tcp]
    }
}

/// How often [`DnsServer::bind`] picks a port again when asked for port 0
/// and the TCP side of the picked one is taken.
const PORT_PICKS: u32 = 16;

static ROTATE: AtomicUsize = AtomicUsize::new(0);

fn next_rotation() -> usize {
    ROTATE.fetch_add(1, Ordering::Relaxed)
}

/// Sends `reply` to `peer` and counts it when it went out.
async fn send_udp(sock: &UdpSocket, reply: &[u8], peer: SocketAddr, metrics: &DnsMetrics) {
    match sock.send_to(reply, peer).await {
        Ok(_) => metrics.responded(DnsProtocol::Udp, super::response_code(reply)),
        Err(e) => tracing::debug!("dns udp send to {peer}: {e}"),
    }
}

async fn serve_udp(
    sock: Arc<UdpSocket>,
    zone: Arc<ArcSwap<Zone>>,
    upstream: Option<SocketAddr>,
    opts: Options,
    forwards: Arc<Semaphore>,
    metrics: DnsMetrics,
) {
    let mut buf = vec![0u8; 65536];
    let mut out = Vec::with_capacity(TCP_MAX);
    loop {
        let (n, peer) = match sock.recv_from(&mut buf).await {
            Ok(x) => x,
            Err(e) => {
                // ICMP errors from earlier sends surface here; keep serving.
                tracing::debug!("dns udp recv: {e}");
                continue;
            }
        };
        let msg = buf.get(..n).unwrap_or_default();
        let outcome = answer(
            &zone.load(),
            msg,
            Transport::Udp,
            opts,
            next_rotation(),
            &mut out,
        );
        match (outcome, upstream) {
            (Outcome::Reply, _) => send_udp(&sock, &out, peer, &metrics).await,
            (Outcome::Forward, Some(up)) => match forwards.clone().try_acquire_owned() {
                Ok(permit) => {
                    let q = msg.to_vec();
                    let sock = sock.clone();
                    let metrics = metrics.clone();
                    tokio::spawn(async move {
                        let reply = match forward_udp(up, &q).await {
                            Some(r) => r,
                            None => {
                                let mut r = Vec::new();
                                if servfail(&q, &mut r).is_none() {
                                    return;
                                }
                                r
                            }
                        };
                        send_udp(&sock, &reply, peer, &metrics).await;
                        drop(permit);
                    });
                }
                Err(_) => {
                    if servfail(msg, &mut out).is_some() {
                        send_udp(&sock, &out, peer, &metrics).await;
                    }
                }
            },
            _ => {}
        }
    }
}

/// Whether `reply` answers `query`: a response with the same id.
fn answers(query: &[u8], reply: &[u8]) -> bool {
    match (reply.first_chunk::<3>(), query.first_chunk::<2>()) {
        (Some([r0, r1, flags]), Some(id)) => {
            [*r0, *r1] == *id && flags & 0x80 != 0 && reply.len() >= 12
        }
        _ => false,
    }
}

async fn forward_udp(upstream: SocketAddr, query: &[u8]) -> Option<Vec<u8>> {
    let local: SocketAddr = if upstream.is_ipv4() {
        ([0, 0, 0, 0], 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let s = UdpSocket::bind(local).await.ok()?;
    s.connect(upstream).await.ok()?;
    s.send(query).await.ok()?;
    let mut buf = vec![0u8; 65536];
    let deadline = tokio::time::Instant::now() + UPSTREAM_TIMEOUT;
    loop {
        let n = tokio::time::timeout_at(deadline, s.recv(&mut buf))
            .await
            .ok()?
            .ok()?;
        if answers(query, buf.get(..n).unwrap_or_default()) {
            buf.truncate(n);
            return Some(buf);
        }
    }
}

async fn forward_tcp(upstream: SocketAddr, query: &[u8]) -> Option<Vec<u8>> {
    let work = async {
        let mut s = TcpStream::connect(upstream).await.ok()?;
        let len = u16::try_from(query.len()).ok()?;
        let mut framed = Vec::with_capacity(query.len() + 2);
        framed.extend_from_slice(&len.to_be_bytes());
        framed.extend_from_slice(query);
        s.write_all(&framed).await.ok()?;
        let n = s.read_u16().await.ok()?;
        let mut reply = vec![0u8; usize::from(n)];
        s.read_exact(&mut reply).await.ok()?;
        answers(query, &reply).then_some(reply)
    };
    tokio::time::timeout(UPSTREAM_TIMEOUT, work).await.ok()?
}

async fn serve_tcp(
    listener: TcpListener,
    zone: Arc<ArcSwap<Zone>>,
    upstream: Option<SocketAddr>,
    opts: Options,
    forwards: Arc<Semaphore>,
    metrics: DnsMetrics,
) {
    let conns = Arc::new(Semaphore::new(MAX_TCP));
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                tracing::debug!("dns tcp accept: {e}");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let Ok(permit) = conns.clone().try_acquire_owned() else {
            tracing::debug!("dns tcp: too many connections, closing {peer}");
            continue;
        };
        let zone = zone.clone();
        let forwards = forwards.clone();
        let metrics = metrics.clone();
        tokio::spawn(async move {
            serve_conn(stream, zone, upstream, opts, forwards, metrics).await;
            drop(permit);
        });
    }
}

async fn serve_conn(
    mut stream: TcpStream,
    zone: Arc<ArcSwap<Zone>>,
    upstream: Option<SocketAddr>,
    opts: Options,
    forwards: Arc<Semaphore>,
    metrics: DnsMetrics,
) {
    let mut buf = vec![0u8; TCP_MAX];
    let mut out = Vec::with_capacity(1024);
    loop {
        let len = match tokio::time::timeout(TCP_IDLE, stream.read_u16()).await {
            Ok(Ok(n)) => usize::from(n),
            _ => return,
        };
        let Some(msg) = buf.get_mut(..len) else {
            return;
        };
        match tokio::time::timeout(TCP_IDLE, stream.read_exact(msg)).await {
            Ok(Ok(_)) => {}
            _ => return,
        }
        let msg = &*msg;
        let outcome = answer(
            &zone.load(),
            msg,
            Transport::Tcp,
            opts,
            next_rotation(),
            &mut out,
        );
        let reply: Vec<u8>;
        let bytes: &[u8] = match (outcome, upstream) {
            (Outcome::Reply, _) => &out,
            (Outcome::Forward, Some(up)) => {
                let got = match forwards.clone().try_acquire_owned() {
                    Ok(_permit) => forward_tcp(up, msg).await,
                    Err(_) => None,
                };
                match got {
                    Some(r) => {
                        reply = r;
                        &reply
                    }
                    None => {
                        if servfail(msg, &mut out).is_none() {
                            return;
                        }
                        &out
                    }
                }
            }
            _ => return,
        };
        let Ok(n) = u16::try_from(bytes.len()) else {
            return;
        };
        let mut framed = Vec::with_capacity(bytes.len() + 2);
        framed.extend_from_slice(&n.to_be_bytes());
        framed.extend_from_slice(bytes);
        if stream.write_all(&framed).await.is_err() {
            return;
        }
        metrics.responded(DnsProtocol::Tcp, super::response_code(bytes));
    }
}

/// A running DNS responder: publish a new zone after every compile.
pub struct Dns {
    /// The zone as built from the store so far, updated change by change.
    parts: super::ZoneParts,
    /// The zone the servers answer from.
    pub zone: Arc<ArcSwap<Zone>>,
    /// Bound address (UDP and TCP).
    pub addr: SocketAddr,
    /// Duplicates of its UDP socket and TCP listener (for a handover).
    sockets: Option<(OwnedFd, OwnedFd)>,
    /// The UDP and TCP servers.
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

/// Why DNS could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// Bad cluster domain.
    #[error(transparent)]
    Zone(#[from] super::ZoneError),
    /// Binding failed.
    #[error(transparent)]
    Bind(#[from] ServerError),
}

impl Dns {
    /// Binds `addr`, or takes `inherited` (UDP socket, TCP listener) when
    /// given: sockets the previous process served `addr` on. Starts serving
    /// an empty zone for `domain` on the current tokio runtime, counting
    /// responses in `metrics`.
    pub async fn start_on(
        addr: SocketAddr,
        inherited: Option<(OwnedFd, OwnedFd)>,
        domain: &str,
        ttl: u32,
        upstream: Option<SocketAddr>,
        metrics: DnsMetrics,
    ) -> Result<Dns, StartError> {
        let config = super::ZoneConfig::new(domain, ttl)?;
        let mut parts = super::ZoneParts::new(&config);
        let zone = Arc::new(ArcSwap::from_pointee(parts.publish(0)));
        let server = match inherited {
            Some((udp, tcp)) => {
                DnsServer::from_std(udp.into(), tcp.into(), zone.clone(), upstream, metrics)
                    .map_err(|source| ServerError::Udp { addr, source })?
            }
            None => DnsServer::bind(addr, zone.clone(), upstream, metrics).await?,
        };
        let addr = server
            .local_addr()
            .map_err(|source| ServerError::Udp { addr, source })?;
        let sockets = server.dup_sockets().ok();
        let tasks = server.spawn();
        tracing::info!(%addr, domain, ?upstream, "serving cluster DNS");
        Ok(Dns {
            parts,
            zone,
            addr,
            sockets,
            tasks,
        })
    }

    /// Duplicates of the UDP socket and TCP listener, for the next process.
    pub fn handover_sockets(&self) -> Option<(OwnedFd, OwnedFd)> {
        let (u, t) = self.sockets.as_ref()?;
        Some((u.try_clone().ok()?, t.try_clone().ok()?))
    }

    /// Stops taking queries (the next process serves the same sockets);
    /// nothing is shut down.
    pub fn stop_serving(&self) {
        for t in &self.tasks {
            t.abort();
        }
    }

    /// Brings the zone up to date with the store after the changes in
    /// `dirty` and makes it the answers (unless no record changed: then the
    /// zone answering stays, SOA serial included).
    pub fn publish(
        &mut self,
        store: &crate::state::Store,
        dirty: &crate::state::store::Dirty,
        generation: u64,
    ) {
        if let Some(zone) = self.parts.update(store, dirty, generation) {
            self.zone.store(Arc::new(zone));
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};

    use hickory_proto::rr::RecordType;

    use super::*;
    use crate::dns::tests::query_bytes;
    use crate::telemetry::{Metrics, DNS_RESPONSES_TOTAL};

    fn query(name: &str) -> Vec<u8> {
        query_bytes(name, RecordType::A, None)
    }

    /// The value of `ringvip_dns_responses_total{rcode, protocol}`.
    fn responses(text: &str, rcode: &str, protocol: &str) -> Option<String> {
        let prefix = format!("{DNS_RESPONSES_TOTAL}{{rcode=\"{rcode}\",protocol=\"{protocol}\"}} ");
        text.lines()
            .find_map(|l| l.strip_prefix(&prefix))
            .map(str::to_string)
    }

    /// Each response a client receives is counted once, under its response
    /// code and the transport it came over.
    #[test]
    fn responses_are_counted_by_rcode_and_transport() {
        let mut metrics = Metrics::new();
        let dns_metrics = DnsMetrics::default();
        metrics.register_dns(&dns_metrics);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let dns = rt
            .block_on(Dns::start_on(
                "127.0.0.1:0".parse().unwrap(),
                None,
                "cluster.local",
                5,
                None,
                dns_metrics,
            ))
            .unwrap();
        let addr = dns.addr;
        // The clients are blocking sockets on a thread of their own while
        // the runtime serves on this one.
        let client = std::thread::spawn(move || {
            let timeout = Some(Duration::from_secs(5));
            let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
            udp.set_read_timeout(timeout).unwrap();
            let mut buf = [0u8; 512];
            for _ in 0..2 {
                udp.send_to(&query("nope.default.svc.cluster.local."), addr)
                    .unwrap();
                let n = udp.recv(&mut buf).unwrap();
                assert_eq!(crate::dns::response_code(&buf[..n]), 3, "NXDOMAIN");
            }
            // Out of the zone, no upstream: REFUSED, over TCP.
            let mut tcp = std::net::TcpStream::connect(addr).unwrap();
            tcp.set_read_timeout(timeout).unwrap();
            let q = query("example.com.");
            let mut framed = (q.len() as u16).to_be_bytes().to_vec();
            framed.extend_from_slice(&q);
            tcp.write_all(&framed).unwrap();
            let mut len = [0u8; 2];
            tcp.read_exact(&mut len).unwrap();
            let mut reply = vec![0u8; usize::from(u16::from_be_bytes(len))];
            tcp.read_exact(&mut reply).unwrap();
            assert_eq!(crate::dns::response_code(&reply), 5, "REFUSED");
        });
        rt.block_on(async {
            while !client.is_finished() {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        });
        client.join().unwrap();
        let text = metrics.encode();
        let counted = [
            ("NXDOMAIN", "udp", "2"),
            ("REFUSED", "tcp", "1"),
            ("NOERROR", "udp", "0"),
            ("REFUSED", "udp", "0"),
            ("NXDOMAIN", "tcp", "0"),
        ];
        for (rcode, protocol, want) in counted {
            assert_eq!(
                responses(&text, rcode, protocol).as_deref(),
                Some(want),
                "{rcode} {protocol}\n{text}"
            );
        }
    }
}
