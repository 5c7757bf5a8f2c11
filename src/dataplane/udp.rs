//! UDP: a flow is (client ip:port, frontend); it pins one connected backend
//! socket until idle for the idle timeout, or until its endpoint stops being
//! usable. The table is per listener socket and per thread: SO_REUSEPORT keeps a
//! client's datagrams on one socket, so no locks are needed.

use std::cell::RefCell;
use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::rc::{Rc, Weak};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::rngs::SmallRng;
use tokio_uring::buf::BoundedBuf;
use tokio_uring::net::UdpSocket;

use super::flow::{pick, resolve, FlowKey, Verdict};
use super::session::Session;
use super::Shared;
use crate::access_log::End;
use crate::model::Protocol;
use crate::state::Frontend;

/// Flows one listener socket may hold; new clients beyond it are dropped.
pub const MAX_FLOWS_PER_LISTENER: usize = 65_536;
/// Largest datagram relayed.
const DATAGRAM: usize = 65_536;
/// Datagrams a frontend socket reads without waiting before it lets the
/// thread's other tasks (reply readers, other sockets) run.
const RECV_BATCH: usize = 64;

/// One flow's bookkeeping, generic over what the I/O side keeps with it.
#[derive(Debug)]
pub struct FlowEntry<T> {
    /// The backend this flow is pinned to.
    pub endpoint: SocketAddr,
    /// Last datagram in either direction.
    pub last_seen: Instant,
    /// Snapshot generation the endpoint was last checked against.
    pub generation: u64,
    /// I/O state (socket, reader task).
    pub io: T,
}

impl<T> FlowEntry<T> {
    /// Checks, once per snapshot `generation`, that the pinned endpoint is
    /// still usable (`usable` is asked only when the generation changed).
    /// False when it is not: the flow is to be removed.
    pub fn revalidate(
        &mut self,
        generation: u64,
        usable: impl FnOnce(&SocketAddr) -> bool,
    ) -> bool {
        if self.generation == generation {
            return true;
        }
        if !usable(&self.endpoint) {
            return false;
        }
        self.generation = generation;
        true
    }
}

/// Flow key → flow, with idle expiry. Pure: time is passed in. The kernel-socket
/// path keys by client address (one table per frontend socket); the TUN path by
/// (client, frontend).
#[derive(Debug)]
pub struct FlowTable<K, T> {
    flows: HashMap<K, FlowEntry<T>>,
    idle: Duration,
    max: usize,
}

impl<K: std::hash::Hash + Eq + Copy, T> FlowTable<K, T> {
    /// A table expiring flows idle longer than `idle`, holding at most `max`.
    pub fn new(idle: Duration, max: usize) -> Self {
        Self {
            flows: HashMap::new(),
            idle,
            max,
        }
    }

    /// The flow of a client, if any.
    pub fn get_mut(&mut self, client: &K) -> Option<&mut FlowEntry<T>> {
        self.flows.get_mut(client)
    }

    /// Records traffic on a flow.
    pub fn touch(&mut self, client: &K, now: Instant) {
        if let Some(f) = self.flows.get_mut(client) {
            f.last_seen = now;
        }
    }

    /// Adds a flow; gives it back when the table is full.
    pub fn insert(&mut self, client: K, e: FlowEntry<T>) -> Result<(), FlowEntry<T>> {
        if self.flows.len() >= self.max && !self.flows.contains_key(&client) {
            return Err(e);
        }
        self.flows.insert(client, e);
        Ok(())
    }

    /// Removes one flow.
    pub fn remove(&mut self, client: &K) -> Option<FlowEntry<T>> {
        self.flows.remove(client)
    }

    /// Removes and returns every flow.
    pub fn drain(&mut self) -> Vec<FlowEntry<T>> {
        self.flows.drain().map(|(_, f)| f).collect()
    }

    /// Removes and returns flows idle for longer than the idle timeout.
    pub fn expire(&mut self, now: Instant) -> Vec<FlowEntry<T>> {
        let idle = self.idle;
        let dead: Vec<K> = self
            .flows
            .iter()
            .filter(|(_, f)| now.saturating_duration_since(f.last_seen) > idle)
            .map(|(k, _)| *k)
            .collect();
        dead.iter().filter_map(|k| self.flows.remove(k)).collect()
    }

    /// Removes and returns flows whose endpoint `usable` rejects.
    pub fn retain_usable(&mut self, usable: impl Fn(&SocketAddr) -> bool) -> Vec<FlowEntry<T>> {
        let dead: Vec<K> = self
            .flows
            .iter()
            .filter(|(_, f)| !usable(&f.endpoint))
            .map(|(k, _)| *k)
            .collect();
        dead.iter().filter_map(|k| self.flows.remove(k)).collect()
    }

    /// Each flow's key and endpoint.
    pub fn endpoints(&self) -> impl Iterator<Item = (K, SocketAddr)> + '_ {
        self.flows.iter().map(|(k, f)| (*k, f.endpoint))
    }

    /// Number of flows.
    pub fn len(&self) -> usize {
        self.flows.len()
    }

    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.flows.is_empty()
    }
}

/// The I/O half of a flow (kernel-socket and TUN paths alike): its backend
/// socket, reply task and session. Dropping it stops the task, closes the
/// socket and ends the session (the reply task holds it only weakly).
pub struct FlowIo {
    pub(crate) socket: Rc<UdpSocket>,
    pub(crate) reader: tokio::task::JoinHandle<()>,
    pub(crate) session: Rc<Session>,
}

impl FlowIo {
    /// Says how the flow ended, before it is dropped.
    pub fn ended(&self, how: End) {
        self.session.end(how);
    }
}

impl FlowEntry<FlowIo> {
    /// A new flow pinned to `endpoint` through its connected `socket`, whose
    /// replies `reader` relays; counted by `session` until dropped.
    pub fn opened(
        endpoint: SocketAddr,
        socket: Rc<UdpSocket>,
        reader: tokio::task::JoinHandle<()>,
        session: Rc<Session>,
        now: Instant,
        generation: u64,
    ) -> Self {
        Self {
            endpoint,
            last_seen: now,
            generation,
            io: FlowIo {
                socket,
                reader,
                session,
            },
        }
    }
}

impl Drop for FlowIo {
    fn drop(&mut self) {
        // Aborted first, so the reader is never polled again: the receive the
        // shutdown completes is only reaped.
        self.reader.abort();
        // An aborted task's pending receive keeps the socket open in the ring
        // until it completes, that is until the backend next sends, if ever:
        // the shutdown completes it now, and the socket closes.
        let _ = with_sock_ref(&self.socket, |s| s.shutdown(std::net::Shutdown::Both));
    }
}

/// Ends the flows in `dead` (taken out of their table) by `how`, as the
/// access log reports them; dropping them closes their sockets.
pub fn end_all(dead: impl IntoIterator<Item = FlowEntry<FlowIo>>, how: End) {
    for f in dead {
        f.io.ended(how);
    }
}

/// The flows of one frontend socket, shared by its receive loop, reply readers
/// and sweeper, and held by its listener so closing it ends them all.
pub type Table = Rc<RefCell<FlowTable<SocketAddr, FlowIo>>>;

/// An empty flow table for one frontend socket.
pub fn table(settings: &crate::config::DataPlaneOptions) -> Table {
    Rc::new(RefCell::new(FlowTable::new(
        settings.udp_idle_timeout,
        MAX_FLOWS_PER_LISTENER,
    )))
}

/// Serves one UDP frontend socket until the task is aborted. Once `stop`
/// is set (the socket handed to the next process), no datagram is taken
/// after the one being waited for; the flows keep relaying replies.
pub async fn serve(
    sock: Rc<UdpSocket>,
    table: Table,
    local: SocketAddr,
    shared: Arc<Shared>,
    rng: Rc<RefCell<SmallRng>>,
    stop: Rc<std::cell::Cell<bool>>,
) {
    let _sweeper = AbortOnDrop(tokio_uring::spawn(sweep(
        table.clone(),
        shared.clone(),
        local,
    )));
    let mut buf = vec![0u8; DATAGRAM];
    let mut warned_full = false;
    // Datagrams taken since the last wait on the ring. After one arrives, the
    // next ones already queued are read at once with plain non-blocking calls:
    // one ring round trip per datagram would bound the rate by the event loop.
    let mut batch = 0usize;
    loop {
        if stop.get() {
            // The sweeper (dropped with this task) still expires the flows.
            std::future::pending::<()>().await;
        }
        let ready = if (1..RECV_BATCH).contains(&batch) {
            match try_recv_from(&sock, &mut buf) {
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => None,
                r => Some(r),
            }
        } else {
            None
        };
        let res = match ready {
            Some(r) => {
                batch += 1;
                r
            }
            None => {
                batch = 1;
                let (res, b) = sock.recv_from(buf).await;
                buf = b;
                res
            }
        };
        let (n, client) = match res {
            Ok(r) => r,
            Err(e) => {
                tracing::debug!(%local, error = %e, "udp receive failed");
                continue;
            }
        };
        let now = Instant::now();
        let (backend, session) = match current_backend(&table, &shared, client, local, now) {
            Some(s) => s,
            None => match open_flow(&table, &sock, &shared, &rng, client, local, now).await {
                Ok(s) => s,
                Err(FlowError::Open(OpenError::NoEndpoint)) => continue,
                Err(FlowError::Full) => {
                    if !warned_full {
                        tracing::warn!(%local, max = MAX_FLOWS_PER_LISTENER, "udp flow table full: dropping datagrams of new clients");
                        warned_full = true;
                    }
                    continue;
                }
                Err(FlowError::Open(e)) => {
                    tracing::debug!(%local, error = %e, "udp backend socket failed");
                    continue;
                }
            },
        };
        // Most datagrams go out at once; only a full socket buffer waits.
        let res = match try_send(&backend, buf.get(..n).unwrap_or_default()) {
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                let (res, slice) = backend.send(buf.slice(..n)).await;
                buf = slice.into_inner();
                res
            }
            other => other,
        };
        match res {
            Ok(sent) => session.to_backend(sent),
            Err(_) => {
                let gone = table.borrow_mut().remove(&client);
                end_all(gone, End::Reset);
            }
        }
    }
}

/// The backend socket of an existing flow, after checking (once per snapshot
/// generation) that its endpoint is still usable; a stale flow is removed.
fn current_backend(
    table: &Table,
    shared: &Shared,
    client: SocketAddr,
    local: SocketAddr,
    now: Instant,
) -> Option<(Rc<UdpSocket>, Rc<Session>)> {
    let mut t = table.borrow_mut();
    let f = t.get_mut(&client)?;
    let snap = shared.snapshot.load();
    let usable = |ep: &SocketAddr| {
        let key = FlowKey {
            src: client,
            dst: local,
            proto: Protocol::Udp,
        };
        matches!(resolve(&snap, &key), Verdict::Forward(fe) if fe.endpoints.contains(ep))
    };
    if !f.revalidate(snap.generation, usable) {
        end_all(t.remove(&client), End::EndpointGone);
        return None;
    }
    f.last_seen = now;
    Some((f.io.socket.clone(), f.io.session.clone()))
}

enum FlowError {
    Full,
    Open(OpenError),
}

/// Why a new flow has no backend socket.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// No endpoint of the frontend is usable.
    #[error("no usable endpoint")]
    NoEndpoint,
    /// The socket to the picked backend could not be opened.
    #[error("opening a UDP socket to backend {endpoint}: {source}")]
    Io {
        /// The backend.
        endpoint: SocketAddr,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
}

/// Picks the backend of a new flow from `client` through `fe` and opens a
/// socket connected to it: how both front ends open a backend flow.
pub async fn open_backend(
    fe: &Frontend,
    client: IpAddr,
    shared: &Shared,
    rng: &RefCell<SmallRng>,
    now: Instant,
) -> Result<(SocketAddr, Rc<UdpSocket>), OpenError> {
    let ep = pick(fe, client, shared, 0, &[], now, &mut *rng.borrow_mut())
        .ok_or(OpenError::NoEndpoint)?
        .addr;
    Ok((ep, connect_backend(ep).await?))
}

/// Opens a UDP socket connected to `ep`.
pub async fn connect_backend(ep: SocketAddr) -> Result<Rc<UdpSocket>, OpenError> {
    let io = |source| OpenError::Io {
        endpoint: ep,
        source,
    };
    let any: IpAddr = match ep {
        SocketAddr::V4(_) => Ipv4Addr::UNSPECIFIED.into(),
        SocketAddr::V6(_) => Ipv6Addr::UNSPECIFIED.into(),
    };
    let sock = UdpSocket::bind(SocketAddr::new(any, 0)).await.map_err(io)?;
    sock.connect(ep).await.map_err(io)?;
    Ok(Rc::new(sock))
}

async fn open_flow(
    table: &Table,
    sock: &Rc<UdpSocket>,
    shared: &Arc<Shared>,
    rng: &RefCell<SmallRng>,
    client: SocketAddr,
    local: SocketAddr,
    now: Instant,
) -> Result<(Rc<UdpSocket>, Rc<Session>), FlowError> {
    let (fe, generation) = {
        let snap = shared.snapshot.load();
        let key = FlowKey {
            src: client,
            dst: local,
            proto: Protocol::Udp,
        };
        match resolve(&snap, &key) {
            Verdict::Forward(fe) => (fe, snap.generation),
            _ => return Err(FlowError::Open(OpenError::NoEndpoint)),
        }
    };
    if table.borrow().len() >= MAX_FLOWS_PER_LISTENER {
        return Err(FlowError::Full);
    }
    // A flow the previous process relayed (an upgrade) keeps its endpoint.
    let pinned = shared
        .pins
        .get(client, local, now)
        .filter(|ep| fe.endpoints.contains(ep));
    let (ep, backend) = match pinned {
        Some(ep) => (ep, connect_backend(ep).await.map_err(FlowError::Open)?),
        None => open_backend(&fe, client.ip(), shared, rng, now)
            .await
            .map_err(FlowError::Open)?,
    };
    let session = Rc::new(Session::open(shared, fe, client, local, ep));
    let reader = tokio_uring::spawn(replies(
        backend.clone(),
        sock.clone(),
        client,
        table.clone(),
        Rc::downgrade(&session),
    ));
    let entry = FlowEntry::opened(
        ep,
        backend.clone(),
        reader,
        session.clone(),
        now,
        generation,
    );
    table.borrow_mut().insert(client, entry).map_err(|e| {
        e.io.ended(End::Limit);
        FlowError::Full
    })?;
    Ok((backend, session))
}

/// Backend → client, sent from the frontend address.
async fn replies(
    backend: Rc<UdpSocket>,
    front: Rc<UdpSocket>,
    client: SocketAddr,
    table: Table,
    session: Weak<Session>,
) {
    let mut buf = vec![0u8; DATAGRAM];
    loop {
        let (res, b) = backend.read(buf).await;
        buf = b;
        let n = match res {
            Ok(n) => n,
            Err(_) => break, // e.g. ICMP port unreachable from the backend
        };
        table.borrow_mut().touch(&client, Instant::now());
        let res = match try_send_to(&front, buf.get(..n).unwrap_or_default(), client) {
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                let (res, slice) = front.send_to(buf.slice(..n), client).await;
                buf = slice.into_inner();
                res
            }
            other => other,
        };
        if res.is_err() {
            break;
        }
        // Gone once the flow is removed (this task is then aborted too).
        let Some(session) = session.upgrade() else {
            return;
        };
        session.to_client(n);
    }
    // Dropping the entry aborts this task; it is the last thing done here.
    let gone = table.borrow_mut().remove(&client);
    end_all(gone, End::Reset);
}

/// Once a second: expires idle flows, and after a snapshot change drops flows
/// whose endpoint is no longer usable (closing their backend sockets).
async fn sweep(table: Table, shared: Arc<Shared>, local: SocketAddr) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut checked = 0u64;
    loop {
        tick.tick().await;
        let dead = table.borrow_mut().expire(Instant::now());
        end_all(dead, End::IdleTimeout);
        let snap = shared.snapshot.load();
        if snap.generation != checked {
            checked = snap.generation;
            let key = FlowKey {
                src: SocketAddr::new(local.ip(), 0),
                dst: local,
                proto: Protocol::Udp,
            };
            let usable: &[SocketAddr] = match snap.frontend(&crate::state::FrontendKey {
                addr: key.dst,
                proto: key.proto,
            }) {
                Some(fe) => &fe.endpoints,
                None => &[],
            };
            let dead = table.borrow_mut().retain_usable(|e| usable.contains(e));
            end_all(dead, End::EndpointGone);
        }
    }
}

/// Aborts a task when dropped.
#[derive(Debug)]
pub struct AbortOnDrop(pub tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Sends one datagram on a connected socket without waiting (`WouldBlock`
/// when its buffer is full). A plain non-blocking send costs one system call
/// and no buffer hand-over, where an io_uring send costs a round trip through
/// the ring before the next datagram is read.
pub fn try_send(sock: &UdpSocket, data: &[u8]) -> std::io::Result<usize> {
    with_sock_ref(sock, |s| s.send_with_flags(data, libc::MSG_DONTWAIT))
}

/// [`try_send`] to `to` on an unconnected socket.
pub fn try_send_to(sock: &UdpSocket, data: &[u8], to: SocketAddr) -> std::io::Result<usize> {
    with_sock_ref(sock, |s| {
        s.send_to_with_flags(data, &to.into(), libc::MSG_DONTWAIT)
    })
}

/// Receives one datagram without waiting (`WouldBlock` when none is queued).
pub fn try_recv_from(sock: &UdpSocket, buf: &mut [u8]) -> std::io::Result<(usize, SocketAddr)> {
    // SAFETY: initialised bytes are valid `MaybeUninit<u8>`; recv only writes.
    let uninit = unsafe { &mut *(buf as *mut [u8] as *mut [std::mem::MaybeUninit<u8>]) };
    let (n, from) = with_sock_ref(sock, |s| s.recv_from_with_flags(uninit, libc::MSG_DONTWAIT))?;
    let from = from.as_socket().ok_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "datagram from a non-IP address",
        )
    })?;
    Ok((n, from))
}

fn with_sock_ref<R>(sock: &UdpSocket, f: impl FnOnce(socket2::SockRef<'_>) -> R) -> R {
    use std::os::fd::{AsRawFd, BorrowedFd};
    // SAFETY: `sock` owns the descriptor and outlives the borrow.
    let fd = unsafe { BorrowedFd::borrow_raw(sock.as_raw_fd()) };
    f(socket2::SockRef::from(&fd))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(ep: &str, t: Instant) -> FlowEntry<()> {
        FlowEntry {
            endpoint: ep.parse().unwrap(),
            last_seen: t,
            generation: 0,
            io: (),
        }
    }

    fn c(p: u16) -> SocketAddr {
        SocketAddr::from(([192, 0, 2, 1], p))
    }

    /// A table of at most `max` flows, client port i+1 pinned to `eps[i]`
    /// and last seen at `t0`.
    fn table(max: usize, eps: &[&str], t0: Instant) -> FlowTable<SocketAddr, ()> {
        let mut t = FlowTable::new(Duration::from_secs(30), max);
        for (port, ep) in (1..).zip(eps) {
            t.insert(c(port), entry(ep, t0)).unwrap();
        }
        t
    }

    #[test]
    fn idle_flows_expire_active_ones_stay() {
        let t0 = Instant::now();
        let mut t = table(10, &["10.0.0.1:53", "10.0.0.2:53"], t0);
        t.touch(&c(2), t0 + Duration::from_secs(20));
        assert!(t.expire(t0 + Duration::from_secs(30)).is_empty());
        let gone = t.expire(t0 + Duration::from_secs(31));
        assert_eq!(gone.len(), 1);
        assert_eq!(gone[0].endpoint, "10.0.0.1:53".parse().unwrap());
        assert_eq!(t.len(), 1);
        assert_eq!(t.expire(t0 + Duration::from_secs(51)).len(), 1);
        assert!(t.is_empty());
    }

    #[test]
    fn table_is_bounded() {
        let t0 = Instant::now();
        let mut t = table(2, &["10.0.0.1:53", "10.0.0.1:53"], t0);
        assert!(t.insert(c(3), entry("10.0.0.1:53", t0)).is_err());
        // replacing an existing client is allowed
        assert!(t.insert(c(2), entry("10.0.0.2:53", t0)).is_ok());
    }

    #[test]
    fn flows_of_unusable_endpoints_are_dropped() {
        let mut t = table(10, &["10.0.0.1:53", "10.0.0.2:53"], Instant::now());
        let keep: SocketAddr = "10.0.0.2:53".parse().unwrap();
        let gone = t.retain_usable(|e| *e == keep);
        assert_eq!(gone.len(), 1);
        assert!(t.get_mut(&c(1)).is_none());
        assert!(t.get_mut(&c(2)).is_some());
    }
}
