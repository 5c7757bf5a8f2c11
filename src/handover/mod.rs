//! Upgrades that drop nothing: a running ringvip hands its kernel sockets to
//! the next process over a Unix socket (`--handover PATH`).
//!
//! The running process ([`server`]) listens on PATH. A new process started
//! with the same PATH ([`take_over`]) connects, says hello, and receives the
//! inventory: every listening socket (data-plane listeners of every worker,
//! admin, DNS, healthCheckNodePorts) as SCM_RIGHTS descriptors, the ClientIP
//! affinity table and the UDP flow pins ([`wire`]). It serves on those
//! sockets ([`Inherited`]: taken where a bind would have been) and, once its
//! first snapshot is programmed, says [`wire::Message::Ready`]. Only then does
//! the running process stop accepting: it cancels its accepts and stops its
//! receives without shutting anything down, since the sockets (their accept
//! queues included) are the very ones the new process now takes from. It keeps
//! relaying what it has until that ends or the drain timeout, answers
//! [`wire::Message::Released`], and exits; the new process puts its own
//! socket at PATH for the next upgrade.
//!
//! Nothing is given up before `Ready`: if the new process dies or gives up
//! on the way, the running one keeps serving as if nothing happened. A second
//! process arriving while one is taking over is answered
//! [`wire::Message::Busy`] and exits with that error. With no process at PATH
//! (no file, or a stale one left by a crash), the new process binds afresh
//! and says so.

pub mod notify;
pub mod server;
pub mod take;
pub mod wire;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::os::fd::OwnedFd;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

pub use server::{Dump, Event, Server};
pub use take::{take_over, Start, TakeoverError, Taking};
pub use wire::{Pin, Role, SocketEntry, Transport};

/// Sockets received from the previous process, waiting to be taken where
/// this process would otherwise bind: each is taken once.
#[derive(Debug, Default)]
pub struct Inherited {
    fds: Mutex<HashMap<(Role, SocketAddr, Transport), Vec<OwnedFd>>>,
}

impl Inherited {
    /// Holds `sockets`.
    pub fn fill(&self, sockets: impl IntoIterator<Item = (SocketEntry, OwnedFd)>) {
        let mut map = self.lock();
        for (e, fd) in sockets {
            map.entry((e.role, e.addr, e.transport))
                .or_default()
                .push(fd);
        }
    }

    /// A received socket for `role` on `addr`, if one is left.
    pub fn take(&self, role: Role, addr: SocketAddr, transport: Transport) -> Option<OwnedFd> {
        let mut map = self.lock();
        let key = (role, addr, transport);
        let v = map.get_mut(&key)?;
        let fd = v.pop();
        if v.is_empty() {
            map.remove(&key);
        }
        fd
    }

    /// Drops every socket nobody took (what this process's snapshot does
    /// not want, or more copies than it has workers); says which.
    pub fn release_rest(&self) -> Vec<SocketEntry> {
        let mut map = self.lock();
        let mut gone = Vec::new();
        for ((role, addr, transport), fds) in map.drain() {
            gone.extend(std::iter::repeat_n(
                SocketEntry {
                    role,
                    addr,
                    transport,
                },
                fds.len(),
            ));
        }
        gone
    }

    fn lock(
        &self,
    ) -> std::sync::MutexGuard<'_, HashMap<(Role, SocketAddr, Transport), Vec<OwnedFd>>> {
        // A panic while holding the map leaves it whole (each step is one
        // insert or remove): use it as it is.
        self.fds.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// UDP flow pins received from the previous process: a client whose flow
/// the new process opens within the UDP idle timeout of the handover goes to
/// the endpoint its flow had. Set once before the data plane starts, then
/// read without a lock.
#[derive(Debug, Default)]
pub struct Pins {
    table: OnceLock<PinTable>,
}

#[derive(Debug)]
struct PinTable {
    by_flow: HashMap<(SocketAddr, SocketAddr), SocketAddr>,
    until: Instant,
}

impl Pins {
    /// Keeps `pins` until `now + keep` (a second call changes nothing).
    pub fn set(&self, pins: &[Pin], now: Instant, keep: Duration) {
        let by_flow = pins
            .iter()
            .map(|p| ((p.client, p.frontend), p.endpoint))
            .collect();
        let _ = self.table.set(PinTable {
            by_flow,
            until: now + keep,
        });
    }

    /// The endpoint the previous process had for `client`'s flow to
    /// `frontend`, while the pins are still kept at `now`.
    #[inline]
    pub fn get(
        &self,
        client: SocketAddr,
        frontend: SocketAddr,
        now: Instant,
    ) -> Option<SocketAddr> {
        let t = self.table.get()?;
        if now > t.until {
            return None;
        }
        t.by_flow.get(&(client, frontend)).copied()
    }

    /// True when the previous process had a flow of `client` to `frontend`
    /// when it handed over, however long ago (it may still relay it).
    #[inline]
    pub fn held(&self, client: SocketAddr, frontend: SocketAddr) -> bool {
        self.table
            .get()
            .is_some_and(|t| t.by_flow.contains_key(&(client, frontend)))
    }

    /// Pins held.
    pub fn len(&self) -> usize {
        self.table.get().map_or(0, |t| t.by_flow.len())
    }

    /// True when none are held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(role: Role, port: u16) -> SocketEntry {
        SocketEntry {
            role,
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            transport: Transport::Tcp,
        }
    }

    fn fd() -> OwnedFd {
        OwnedFd::from(std::net::UdpSocket::bind("127.0.0.1:0").unwrap())
    }

    #[test]
    fn each_inherited_socket_is_taken_once_and_the_rest_released() {
        let pool = Inherited::default();
        let l = entry(Role::Listener, 30080);
        pool.fill([(l, fd()), (l, fd()), (entry(Role::Health, 10256), fd())]);
        assert!(pool.take(Role::Listener, l.addr, Transport::Tcp).is_some());
        assert!(pool.take(Role::Listener, l.addr, Transport::Udp).is_none());
        assert!(pool.take(Role::Metrics, l.addr, Transport::Tcp).is_none());
        let rest = pool.release_rest();
        assert_eq!(rest.len(), 2, "{rest:?}");
        assert!(pool.take(Role::Listener, l.addr, Transport::Tcp).is_none());
    }

    #[test]
    fn pins_hold_until_the_idle_timeout_and_are_set_once() {
        let pins = Pins::default();
        let (c, f, e): (SocketAddr, SocketAddr, SocketAddr) = (
            "10.0.0.1:4000".parse().unwrap(),
            "127.0.0.1:30053".parse().unwrap(),
            "10.1.0.2:53".parse().unwrap(),
        );
        let t0 = Instant::now();
        assert_eq!(pins.get(c, f, t0), None);
        let p = Pin {
            client: c,
            frontend: f,
            endpoint: e,
        };
        pins.set(&[p], t0, Duration::from_secs(30));
        pins.set(&[], t0, Duration::from_secs(30));
        assert_eq!(pins.get(c, f, t0 + Duration::from_secs(30)), Some(e));
        assert_eq!(pins.get(f, c, t0), None);
        assert_eq!(pins.get(c, f, t0 + Duration::from_secs(31)), None);
    }
}
