//! One data-plane thread's kernel listeners, kept equal to the snapshot's:
//! new ones opened before removed ones close, and a removed one closed at once.
//!
//! Closing is the delicate part. Dropping a tokio-uring task does not cancel
//! its pending io_uring operation: the runtime keeps the operation, and with it
//! the descriptor, until the kernel completes it. An aborted accept loop
//! therefore left its socket listening, and the connection that finally
//! completed that accept was neither relayed nor closed (CLOSE-WAIT for as long
//! as ringvip ran). A listener is closed by shutting its socket down through a
//! second descriptor, which completes the pending operation at once. The same
//! holds for a TCP listener's multishot accept in the thread's engine ring:
//! the engine is told the listener is stopping, the shutdown ends the accept,
//! and the engine then drops its descriptor instead of arming it again. A UDP
//! listener's multishot receive, and its flows', are cancelled in the ring
//! instead (a shutdown does not end a receive on an unconnected socket).

use std::collections::HashMap;
use std::net::Shutdown;
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use socket2::Socket;

use super::engine::Engine;
use super::socket::{open_or_take, ListenError, WorkerDump};
use crate::model::Protocol;
use crate::state::{ListenerMode, ListenerSpec};

/// What a thread must do to go from the listeners it holds to the ones a
/// snapshot wants.
#[derive(Debug, PartialEq, Eq)]
pub struct Plan<'a> {
    /// Wanted and not held: opened first, so a replaced listener's address
    /// never goes unserved.
    pub open: Vec<&'a ListenerSpec>,
    /// Held and no longer wanted: closed after the opens.
    pub close: Vec<ListenerSpec>,
}

/// Compares what is held with what is wanted (`want` sorted, as
/// [`crate::state::Snapshot::listeners`] gives it).
pub fn plan<'a, 'h>(
    held: impl IntoIterator<Item = &'h ListenerSpec>,
    want: &'a [ListenerSpec],
) -> Plan<'a> {
    let held: Vec<&ListenerSpec> = held.into_iter().collect();
    Plan {
        open: want.iter().filter(|s| !held.contains(s)).collect(),
        close: held
            .into_iter()
            .filter(|s| want.binary_search(s).is_err())
            .cloned()
            .collect(),
    }
}

/// A listener serving on this thread.
pub struct Listener {
    /// A second descriptor of the socket the ring holds (or the only one, for
    /// a dropping listener): shutdown through it reaches the same socket.
    sock: Socket,
    kind: Kind,
}

enum Kind {
    /// Its socket filter drops every packet; nothing runs.
    Drop,
    Tcp {
        /// The listener's index in the engine.
        id: u32,
        engine: Engine,
        /// Its address (what its connections arrived for).
        local: std::net::SocketAddr,
    },
    Udp {
        /// The listener's index and serial in the engine.
        id: u32,
        serial: u32,
        engine: Engine,
    },
}

impl Listener {
    /// Opens `spec`'s socket and starts serving it on this thread.
    pub fn start(
        spec: &ListenerSpec,
        inherited: &crate::handover::Inherited,
        engine: &Engine,
    ) -> Result<Self, ListenError> {
        let sock = open_or_take(spec, inherited)?;
        if spec.mode == ListenerMode::Drop {
            return Ok(Self {
                sock,
                kind: Kind::Drop,
            });
        }
        let ring_side = sock.try_clone().map_err(|source| ListenError {
            addr: spec.addr,
            proto: spec.proto,
            source,
        })?;
        let kind = match spec.proto {
            Protocol::Tcp => {
                let id = engine
                    .borrow_mut()
                    .listen(OwnedFd::from(ring_side), spec.addr);
                Kind::Tcp {
                    id,
                    engine: engine.clone(),
                    local: spec.addr,
                }
            }
            Protocol::Udp => {
                let (id, serial) = engine
                    .borrow_mut()
                    .listen_udp(OwnedFd::from(ring_side), spec.addr);
                Kind::Udp {
                    id,
                    serial,
                    engine: engine.clone(),
                }
            }
        };
        Ok(Self { sock, kind })
    }

    /// Closes the listener: its socket leaves LISTEN (TCP) or is unbound (UDP)
    /// before this returns.
    pub async fn close(self) {
        match self.kind {
            Kind::Drop => {}
            Kind::Tcp { id, engine, local } => {
                let mut engine = engine.borrow_mut();
                // Set before the shutdown, so the accept ends on the failure
                // the shutdown causes instead of being armed again.
                engine.stop_listener(id);
                // Connections already queued are served or refused under the
                // current snapshot, rather than reset by the shutdown below.
                while let Ok((c, _)) = self.sock.accept() {
                    engine.adopt(OwnedFd::from(c), local);
                }
                // The socket leaves LISTEN at once and the ring's accept
                // fails with EINVAL. A SYN that races in is reset, or, in the
                // kernel's narrow window where it was looked up on this socket
                // just before it left LISTEN, dropped (drop reason TCP_CLOSE)
                // and answered on its retransmission 1 s later: any server's
                // close has it (`benches/listener_close_race.py`).
                let _ = self.sock.shutdown(Shutdown::Read);
            }
            Kind::Udp { id, serial, engine } => {
                // The engine cancels the listener's receive and its flows'
                // receives; each socket closes once the ring has let go of
                // it (the cancels complete as they are submitted, so the
                // first polls normally find everything gone). Bounded: a
                // cancel the kernel never completed would not hold up the
                // snapshot for more than a second.
                engine.borrow_mut().stop_udp(id);
                for _ in 0..1000 {
                    let closed = {
                        let mut e = engine.borrow_mut();
                        e.poll();
                        e.udp_closed(id, serial)
                    };
                    if closed {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            }
        }
    }
}

impl Listener {
    /// Stops taking anything new from the socket, which the next process
    /// shares, without shutting it down (that would end it for that process
    /// too): a TCP listener's accept is cancelled, and so is a UDP
    /// listener's receive (a datagram it completed first is still relayed).
    /// Gives back what must stay: a UDP listener, whose flows keep relaying
    /// replies until they idle out.
    fn release(self) -> Option<Listener> {
        match &self.kind {
            Kind::Drop => None,
            Kind::Tcp { id, engine, .. } => {
                engine.borrow_mut().release_listener(*id);
                None
            }
            Kind::Udp { id, engine, .. } => {
                engine.borrow_mut().release_udp(*id);
                Some(self)
            }
        }
    }

    /// UDP flows it holds.
    fn flows(&self) -> usize {
        match &self.kind {
            Kind::Udp { id, engine, .. } => engine.borrow().udp_listener_flows(*id),
            _ => 0,
        }
    }

    /// Each UDP flow's client and endpoint.
    fn pins(&self, frontend: std::net::SocketAddr, out: &mut Vec<crate::handover::Pin>) {
        if let Kind::Udp { id, engine, .. } = &self.kind {
            engine.borrow().udp_pins(*id, |client, endpoint| {
                out.push(crate::handover::Pin {
                    client,
                    frontend,
                    endpoint,
                })
            });
        }
    }
}

/// How soon a thread opens again a listener whose open failed.
pub const LISTEN_RETRY: Duration = Duration::from_millis(500);

/// The listeners one thread holds, with the opens that failed (retried on each
/// snapshot and every [`LISTEN_RETRY`], reported once per distinct error).
pub struct Listeners {
    /// Thread index; thread 0 logs for all.
    id: usize,
    held: HashMap<ListenerSpec, Listener>,
    failing: HashMap<ListenerSpec, String>,
    /// UDP listeners released to the next process, kept for their flows.
    released: Vec<Listener>,
}

impl Listeners {
    /// No listeners yet.
    pub fn new(id: usize) -> Self {
        Self {
            id,
            held: HashMap::new(),
            failing: HashMap::new(),
            released: Vec::new(),
        }
    }

    /// A duplicate of every held listener's socket with its spec, and the
    /// UDP flows' endpoints (for the next process; nothing changes here).
    pub fn dump(&self) -> WorkerDump {
        let mut d = WorkerDump::default();
        for (spec, l) in &self.held {
            match l.sock.try_clone() {
                Ok(s) => d.sockets.push((spec.clone(), OwnedFd::from(s))),
                Err(e) => {
                    tracing::warn!(addr = %spec.addr, error = %e, "handover: cannot duplicate a listener")
                }
            }
            l.pins(spec.addr, &mut d.pins);
        }
        d
    }

    /// Stops accepting on every listener (see [`Listener::release`]); the
    /// sockets stay open for the process that took them. Nothing is opened
    /// again: the thread only relays what it has from now on.
    pub fn release(&mut self) {
        for (_, l) in self.held.drain() {
            if let Some(keep) = l.release() {
                self.released.push(keep);
            }
        }
        self.failing.clear();
    }

    /// True while some wanted listener could not be opened (its address taken
    /// by another socket, say): the thread tries again after
    /// [`LISTEN_RETRY`] rather than leave the port unserved until the next
    /// change.
    pub fn retrying(&self) -> bool {
        !self.failing.is_empty()
    }

    /// UDP flows still relaying on released listeners.
    pub fn released_flows(&self) -> usize {
        self.released.iter().map(Listener::flows).sum()
    }

    /// Makes the held listeners equal to `want`; returns once the removed
    /// ones are closed.
    pub async fn sync(&mut self, want: &[ListenerSpec], engine: &Engine) {
        let Plan { open, close } = plan(self.held.keys(), want);
        let shared = engine.borrow().shared().clone();
        for spec in open {
            match Listener::start(spec, &shared.inherited, engine) {
                Ok(l) => {
                    if self.failing.remove(spec).is_some() || self.id == 0 {
                        tracing::info!(addr = %spec.addr, proto = %spec.proto, mode = ?spec.mode, "listening");
                    }
                    self.held.insert(spec.clone(), l);
                }
                Err(e) => {
                    let msg = e.to_string();
                    if self.failing.get(spec) != Some(&msg) && self.id == 0 {
                        tracing::warn!("{msg}");
                    }
                    self.failing.insert(spec.clone(), msg);
                }
            }
        }
        for spec in close {
            if let Some(l) = self.held.remove(&spec) {
                if self.id == 0 {
                    tracing::info!(addr = %spec.addr, proto = %spec.proto, mode = ?spec.mode, "closed");
                }
                l.close().await;
            }
        }
        self.failing
            .retain(|spec, _| want.binary_search(spec).is_ok());
    }
}

/// How far each kernel-socket thread has applied the published snapshots.
/// The control loop waits on it before it calls a snapshot published, so a
/// client that connects after that sees the new listeners, never the old.
#[derive(Debug)]
pub struct Programmed {
    applied: Vec<AtomicU64>,
    changed: tokio::sync::Notify,
}

impl Programmed {
    /// For `threads` threads, none of which has applied anything.
    pub fn new(threads: usize) -> Arc<Self> {
        Arc::new(Self {
            applied: (0..threads).map(|_| AtomicU64::new(0)).collect(),
            changed: tokio::sync::Notify::new(),
        })
    }

    /// Thread `id` holds the listeners of snapshot `generation`.
    pub fn applied(&self, id: usize, generation: u64) {
        if let Some(a) = self.applied.get(id) {
            a.fetch_max(generation, Ordering::Release);
            self.changed.notify_waiters();
        }
    }

    /// True when every thread has applied `generation` (or a later one).
    pub fn reached(&self, generation: u64) -> bool {
        self.applied
            .iter()
            .all(|a| a.load(Ordering::Acquire) >= generation)
    }

    /// Waits until every thread has applied `generation`; false when `limit`
    /// passed first.
    pub async fn wait(&self, generation: u64, limit: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            // Registered before the check, so an update in between still wakes us.
            changed.as_mut().enable();
            if self.reached(generation) {
                return true;
            }
            if tokio::time::timeout_at(deadline, changed).await.is_err() {
                return self.reached(generation);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(port: u16, proto: Protocol, mode: ListenerMode) -> ListenerSpec {
        ListenerSpec {
            addr: std::net::SocketAddr::from(([192, 0, 2, 1], port)),
            proto,
            mode,
            allow: Vec::new().into(),
        }
    }

    #[test]
    fn plan_opens_the_new_and_closes_the_gone() {
        let a = spec(30001, Protocol::Tcp, ListenerMode::Accept);
        let b = spec(30002, Protocol::Udp, ListenerMode::Accept);
        let c = spec(30003, Protocol::Tcp, ListenerMode::Accept);
        let held = [a.clone(), b.clone()];
        let mut want = vec![b.clone(), c.clone()];
        want.sort();
        let p = plan(held.iter(), &want);
        assert_eq!(p.open, vec![&c]);
        assert_eq!(p.close, vec![a]);
    }

    #[test]
    fn a_mode_switch_is_a_new_listener_and_the_old_one_closes() {
        let accept = spec(30001, Protocol::Tcp, ListenerMode::Accept);
        let drop = spec(30001, Protocol::Tcp, ListenerMode::Drop);
        let want = vec![drop.clone()];
        let p = plan([&accept], &want);
        assert_eq!(p.open, vec![&drop]);
        assert_eq!(p.close, vec![accept]);
        assert_eq!(
            plan([&drop], &want),
            Plan {
                open: vec![],
                close: vec![]
            }
        );
    }
}
