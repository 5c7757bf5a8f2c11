//! UDP flows, shared by both front ends: a flow is (client ip:port,
//! frontend); it pins one connected backend socket until idle for the idle
//! timeout, or until its endpoint stops being usable. The pure
//! [`FlowTable`] is per listener socket and per thread (SO_REUSEPORT keeps a
//! client's datagrams on one socket, so no locks are needed); the
//! kernel-socket path runs it on the io_uring engine
//! (`engine::udp`), the TUN path with the reactor's sockets of [`FlowIo`].

use std::cell::RefCell;
use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::rc::Rc;
use std::time::{Duration, Instant};

use rand::rngs::SmallRng;
use tokio::net::UdpSocket;

use super::flow::pick;
use super::session::Session;
use super::Shared;
use crate::access_log::End;
use crate::state::Frontend;

/// Flows one listener socket may hold; new clients beyond it are dropped.
pub const MAX_FLOWS_PER_LISTENER: usize = 65_536;

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

    /// The flow of a client, if any, to read.
    pub fn get(&self, client: &K) -> Option<&FlowEntry<T>> {
        self.flows.get(client)
    }

    /// True when the client has a flow.
    #[inline]
    pub fn contains(&self, client: &K) -> bool {
        self.flows.contains_key(client)
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
        // Aborted first, so the reader is never polled again.
        self.reader.abort();
        // The aborted task (and its handle on the socket) goes only when the
        // runtime next gets to it: the socket takes no more datagrams from now.
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
/// socket connected to it: how both front ends open a backend flow (UDP
/// connect has no handshake: the call returns at once).
pub fn connect_backend(
    fe: &Frontend,
    client: IpAddr,
    shared: &Shared,
    rng: &RefCell<SmallRng>,
    now: Instant,
) -> Result<(SocketAddr, std::net::UdpSocket), OpenError> {
    let ep = pick(fe, client, shared, 0, &[], now, &mut *rng.borrow_mut())
        .ok_or(OpenError::NoEndpoint)?
        .addr;
    Ok((ep, connect_to(ep)?))
}

/// Opens a UDP socket connected to `ep` (a flow whose endpoint is known:
/// one the previous process pinned, see `handover::Pins`).
pub fn connect_to(ep: SocketAddr) -> Result<std::net::UdpSocket, OpenError> {
    let io = |source| OpenError::Io {
        endpoint: ep,
        source,
    };
    let any: IpAddr = match ep {
        SocketAddr::V4(_) => Ipv4Addr::UNSPECIFIED.into(),
        SocketAddr::V6(_) => Ipv6Addr::UNSPECIFIED.into(),
    };
    let sock = std::net::UdpSocket::bind(SocketAddr::new(any, 0)).map_err(io)?;
    sock.connect(ep).map_err(io)?;
    Ok(sock)
}

/// [`connect_backend`] as a socket of the thread's reactor (the TUN path's
/// flows).
pub fn open_backend(
    fe: &Frontend,
    client: IpAddr,
    shared: &Shared,
    rng: &RefCell<SmallRng>,
    now: Instant,
) -> Result<(SocketAddr, Rc<UdpSocket>), OpenError> {
    let (ep, sock) = connect_backend(fe, client, shared, rng, now)?;
    Ok((ep, Rc::new(register(ep, sock)?)))
}

/// Hands the socket connected to `ep` to the thread's reactor.
pub fn register(ep: SocketAddr, sock: std::net::UdpSocket) -> Result<UdpSocket, OpenError> {
    let io = |source| OpenError::Io {
        endpoint: ep,
        source,
    };
    sock.set_nonblocking(true).map_err(io)?;
    UdpSocket::from_std(sock).map_err(io)
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
