//! Who handles a packet read from the TUN, when more than one thread (and,
//! during an upgrade, more than one process) holds queues of the device.
//!
//! The kernel spreads packets over every queue of the device: to the queue
//! that last wrote a packet of the flow (its automatic steering, which
//! forgets a flow idle for 3 s, and whose queue numbers move when a queue
//! detaches), otherwise by a hash of the flow that stays put while the
//! number of queues does. So the thread that reads a SYN owns that
//! connection: its SYN-ACK steers the rest of the connection to its queue,
//! and a single process with a fixed set of queues passes nothing between
//! its threads. While two processes hold queues, and whenever the number of
//! queues changes, a packet may land on a queue whose thread does not hold
//! its flow: that thread passes it along a chain of its siblings ([`route`]),
//! each through its [`Inbox`] (a `SOCK_SEQPACKET` socketpair: one packet,
//! one message, sent without waiting, a hop count in its header), until one
//! holds the flow or every thread has seen it.
//!
//! During an upgrade the same inboxes link the two processes (their sending
//! ends travel over the handover socket): [`decide`] says whether a packet
//! whose flow no thread of this process holds goes to the other one. SYNs
//! and new UDP flows are the new process's; the old one keeps what it has.

use std::hash::{Hash, Hasher};
use std::io::{self, IoSlice};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use arc_swap::ArcSwapOption;
use nix::sys::socket::{
    sendmsg, setsockopt, socketpair, sockopt, AddressFamily, MsgFlags, SockFlag, SockType,
};

use super::device::read_after;
use super::packet::ConnKey;

/// Socket buffer of an inbox: room for a burst of TSO super-packets.
const INBOX_BUFFER: usize = 4 * 1024 * 1024;

/// Where a packet handed to a thread comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// A queue of this process (read by this thread or passed by another).
    Local,
    /// The other process of an upgrade: never sent back there, except a UDP
    /// datagram the old process no longer has a flow for (see [`decide`]).
    Peer,
}

impl Origin {
    fn byte(self) -> u8 {
        match self {
            Origin::Local => 0,
            Origin::Peer => 1,
        }
    }
}

/// What the other process of an upgrade is to this one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The process this one took over from: it holds the flows it had.
    Previous,
    /// The process that took over from this one: every new flow is its.
    Next,
}

/// The other process of an upgrade: the sending ends of its threads' inboxes.
#[derive(Debug)]
pub struct Peer {
    /// What it is to this process.
    pub role: Role,
    inboxes: Vec<OwnedFd>,
    /// Set once a send found it gone (its inboxes closed: it exited).
    gone: AtomicBool,
}

impl Peer {
    /// The other process, reached through `inboxes` (one per thread of it).
    pub fn new(role: Role, inboxes: Vec<OwnedFd>) -> Self {
        Self {
            role,
            inboxes,
            gone: AtomicBool::new(false),
        }
    }
}

/// How this process's TUN threads reach each other and the other process.
#[derive(Debug, Default)]
pub struct Links {
    /// The sending end of each thread's inbox, by thread.
    siblings: OnceLock<Vec<OwnedFd>>,
    /// The other process of an upgrade, while there is one.
    peer: ArcSwapOption<Peer>,
    /// Packets sent to the other process, received from it, and passed
    /// between this process's threads (only those paths count).
    counts: [AtomicU64; 3],
}

/// Packets that took a detour, as [`Links::counts`] reports them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Counts {
    /// Sent to the other process of an upgrade.
    pub to_peer: u64,
    /// Received from it.
    pub from_peer: u64,
    /// Passed from one thread of this process to another.
    pub between_threads: u64,
}

/// A packet could not be passed on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Passed {
    /// Sent.
    Sent,
    /// The receiver's buffer is full: dropped (TCP retransmits it).
    Full,
    /// Nobody to send it to (no such thread, no other process, or it has
    /// exited): the caller handles the packet itself.
    Nobody,
}

impl Links {
    /// Sets the sending ends of this process's threads' inboxes (once).
    pub fn set_siblings(&self, ends: Vec<OwnedFd>) {
        let _ = self.siblings.set(ends);
    }

    /// Threads holding queues (at least one).
    #[inline]
    pub fn threads(&self) -> usize {
        self.siblings.get().map_or(1, |s| s.len().max(1))
    }

    /// Duplicates of the sending ends of this process's inboxes, for the
    /// other process of an upgrade.
    pub fn dup_siblings(&self) -> io::Result<Vec<OwnedFd>> {
        self.siblings
            .get()
            .map_or(&[][..], Vec::as_slice)
            .iter()
            .map(OwnedFd::try_clone)
            .collect()
    }

    /// Links this process with the other one of an upgrade.
    pub fn set_peer(&self, peer: Peer) {
        self.peer.store(Some(Arc::new(peer)));
    }

    /// The other process's role, while it lives.
    #[inline]
    pub fn peer_role(&self) -> Option<Role> {
        let g = self.peer.load();
        g.as_ref()
            .filter(|p| !p.gone.load(Ordering::Relaxed))
            .map(|p| p.role)
    }

    /// Passes `packet` to `thread` of this process, the `hops`th thread it
    /// visits after the one that first had it.
    pub fn to_sibling(&self, thread: usize, origin: Origin, hops: u8, packet: &[u8]) -> Passed {
        match self.siblings.get().and_then(|s| s.get(thread)) {
            Some(fd) => {
                self.count(2);
                send(fd, origin, hops, packet)
            }
            None => Passed::Nobody,
        }
    }

    /// Counts a packet received from the other process.
    #[inline]
    pub fn received_from_peer(&self) {
        self.count(1);
    }

    #[inline]
    fn count(&self, i: usize) {
        if let Some(c) = self.counts.get(i) {
            c.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The packets that took a detour so far.
    pub fn counts(&self) -> Counts {
        let get = |i: usize| self.counts.get(i).map_or(0, |c| c.load(Ordering::Relaxed));
        Counts {
            to_peer: get(0),
            from_peer: get(1),
            between_threads: get(2),
        }
    }

    /// Passes `packet` of `key` to a thread of the other process (by a hash
    /// of the key, so one flow's packets go to one thread, which starts them
    /// on its own chain).
    pub fn to_peer(&self, key: &ConnKey, packet: &[u8]) -> Passed {
        let g = self.peer.load();
        let Some(p) = g.as_ref().filter(|p| !p.gone.load(Ordering::Relaxed)) else {
            return Passed::Nobody;
        };
        let Some(fd) = p.inboxes.get(owner(key, p.inboxes.len())) else {
            return Passed::Nobody;
        };
        let sent = send(fd, Origin::Peer, 0, packet);
        if sent == Passed::Nobody {
            // Its inboxes are closed: it exited. From now on this process
            // answers everything itself.
            if !p.gone.swap(true, Ordering::Relaxed) {
                let c = self.counts();
                tracing::info!(
                    packets_to_peer = c.to_peer,
                    packets_from_peer = c.from_peer,
                    "TUN: the other process of the handover is gone"
                );
            }
        } else {
            self.count(0);
        }
        sent
    }
}

/// The thread (of `threads`) of the other process a packet of `key` is sent
/// to: a hash of client and VIP, the same in every process of one build.
#[inline]
pub fn owner(key: &ConnKey, threads: usize) -> usize {
    if threads <= 1 {
        return 0;
    }
    // FNV-1a over the key: no allocation, no per-process seed (the other
    // process must compute the same owner).
    let mut h = Fnv(0xcbf2_9ce4_8422_2325);
    key.hash(&mut h);
    (h.finish() % threads as u64) as usize
}

struct Fnv(u64);

impl Hasher for Fnv {
    fn finish(&self) -> u64 {
        // Fold the high bits in: the low bits of FNV alone spread badly.
        self.0 ^ (self.0 >> 29)
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 ^= u64::from(*b);
            self.0 = self.0.wrapping_mul(0x0100_0000_01b3);
        }
    }
}

/// One thread's inbox: the receiving end it reads, the sending end others use.
#[derive(Debug)]
pub struct Inbox {
    /// Read by the owning thread.
    pub rx: OwnedFd,
    /// Written by the others (kept in [`Links`]).
    pub tx: OwnedFd,
}

/// `n` inboxes, non-blocking.
pub fn inboxes(n: usize) -> io::Result<Vec<Inbox>> {
    (0..n)
        .map(|_| {
            let (rx, tx) = socketpair(
                AddressFamily::Unix,
                SockType::SeqPacket,
                None,
                SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
            )?;
            // Best effort: a smaller buffer only drops more under bursts.
            let _ = setsockopt(&rx, sockopt::RcvBuf, &INBOX_BUFFER);
            let _ = setsockopt(&tx, sockopt::SndBuf, &INBOX_BUFFER);
            Ok(Inbox { rx, tx })
        })
        .collect()
}

fn send(fd: &impl AsFd, origin: Origin, hops: u8, packet: &[u8]) -> Passed {
    let hdr = [origin.byte(), hops];
    let iov = [IoSlice::new(&hdr), IoSlice::new(packet)];
    match sendmsg::<()>(
        fd.as_fd().as_raw_fd(),
        &iov,
        &[],
        MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_NOSIGNAL,
        None,
    ) {
        Ok(_) => Passed::Sent,
        Err(nix::errno::Errno::EAGAIN) | Err(nix::errno::Errno::ENOBUFS) => Passed::Full,
        Err(_) => Passed::Nobody,
    }
}

/// Reads one packet from an inbox into `buf` (replacing its contents,
/// without zeroing the buffer first): where it comes from and its hop count;
/// `WouldBlock` when none waits.
pub fn recv(fd: &impl AsFd, buf: &mut Vec<u8>, max: usize) -> io::Result<(Origin, u8)> {
    let mut hdr = [0u8; 2];
    // The socket is non-blocking; one read is one message.
    if read_after(fd.as_fd().as_raw_fd(), &mut hdr, buf, max)? < hdr.len() {
        // Every sending end is closed (this process is stopping), or a
        // message too short to be one of ours.
        return Err(io::ErrorKind::WouldBlock.into());
    }
    let origin = if hdr[0] == 1 {
        Origin::Peer
    } else {
        Origin::Local
    };
    Ok((origin, hdr[1]))
}

/// Where a packet goes next, by [`route`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// This thread handles it (it holds the flow, or it is a SYN).
    Here,
    /// To the inbox of `thread`, with the hop count `hops`.
    Next {
        /// The next sibling.
        thread: usize,
        /// Threads it will have visited after the first.
        hops: u8,
    },
    /// No thread of this process holds its flow: [`decide`].
    Nobody,
}

/// Where a packet that `thread` (of `threads`) has, `hops` threads after
/// the one that first had it, goes: `unheld` is `None` when this thread
/// holds its flow. Pure: the chain. A SYN is the reader's; any other packet
/// of a flow this thread does not hold goes to the next thread in turn, so
/// it visits each thread at most once and the last one of the round hands
/// it to [`decide`].
#[inline]
pub fn route(unheld: Option<Unowned>, thread: usize, threads: usize, hops: u8) -> Route {
    match unheld {
        None | Some(Unowned::Syn) => Route::Here,
        Some(_) if usize::from(hops) + 1 < threads => Route::Next {
            thread: (thread + 1) % threads,
            hops: hops + 1,
        },
        Some(_) => Route::Nobody,
    }
}

/// What kind of packet a thread holds no flow for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unowned {
    /// A TCP SYN (a new connection).
    Syn,
    /// Any other TCP segment.
    Tcp,
    /// A UDP datagram; `pinned`: the previous process had a flow of this
    /// key when it handed over.
    Udp {
        /// Held by the previous process at the handover.
        pinned: bool,
    },
}

/// Whether a packet of a flow this thread does not hold is handled here or
/// sent to the other process of an upgrade (`peer`, when there is one).
/// Pure: the whole ownership policy.
///
/// - The old process (its peer is [`Role::Next`]) takes nothing new: what
///   its own queues bring of flows it does not hold goes to the new one.
///   What the new one sent it and it does not hold is answered here (RST,
///   port unreachable), never sent back, except a UDP datagram: its flow
///   ended here (or never was), so it is returned once, to be opened by the
///   new process, which sends nothing back.
/// - The new process (its peer is [`Role::Previous`]) takes SYNs and UDP
///   flows the old one did not have; a segment of a connection it does not
///   hold, and a datagram of a flow the old one had, go to the old one.
#[inline]
pub fn decide(peer: Option<Role>, origin: Origin, what: Unowned) -> bool {
    match (peer, origin, what) {
        (None, ..) => false,
        (Some(Role::Next), Origin::Local, _) => true,
        (Some(Role::Next), Origin::Peer, Unowned::Udp { .. }) => true,
        (Some(Role::Next), Origin::Peer, _) => false,
        (Some(Role::Previous), Origin::Peer, _) => false,
        (Some(Role::Previous), Origin::Local, Unowned::Syn) => false,
        (Some(Role::Previous), Origin::Local, Unowned::Tcp) => true,
        (Some(Role::Previous), Origin::Local, Unowned::Udp { pinned }) => pinned,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(port: u16) -> ConnKey {
        (([10, 1, 0, 5], port).into(), ([10, 96, 0, 10], 80).into())
    }

    #[test]
    fn every_flow_has_one_owner_spread_over_the_threads() {
        let mut seen = [0usize; 4];
        for port in 1000..3000 {
            let o = owner(&key(port), 4);
            assert_eq!(o, owner(&key(port), 4));
            seen[o] += 1;
        }
        assert!(seen.iter().all(|&n| n > 300), "{seen:?}");
        assert_eq!(owner(&key(1), 1), 0);
    }

    /// Follows a packet along the chain from the thread `first` reading it,
    /// with the flow held by `holder` (if any): the threads it visits, and
    /// where it ends (`Here` at the last one visited, or `Nobody`).
    fn walk(
        what: Unowned,
        first: usize,
        holder: Option<usize>,
        threads: usize,
    ) -> (Vec<usize>, Route) {
        let (mut at, mut hops) = (first, 0u8);
        let mut visited = vec![at];
        loop {
            let unheld = if holder == Some(at) { None } else { Some(what) };
            match route(unheld, at, threads, hops) {
                Route::Next { thread, hops: h } => {
                    assert_eq!(usize::from(h), visited.len(), "hop count");
                    (at, hops) = (thread, h);
                    visited.push(at);
                }
                end => return (visited, end),
            }
        }
    }

    #[test]
    fn the_chain_visits_each_thread_once_and_finds_a_held_flow() {
        let kinds = [Unowned::Tcp, Unowned::Udp { pinned: false }];
        for threads in 1..=6 {
            for first in 0..threads {
                for what in kinds {
                    for holder in 0..threads {
                        let (seen, end) = walk(what, first, Some(holder), threads);
                        assert_eq!(end, Route::Here);
                        assert_eq!(seen.last(), Some(&holder), "handled by its holder");
                        let mut uniq = seen.clone();
                        uniq.sort_unstable();
                        uniq.dedup();
                        assert_eq!(uniq.len(), seen.len(), "{seen:?} visits a thread twice");
                    }
                    // Nobody holds it: every thread sees it once, then decide.
                    let (mut seen, end) = walk(what, first, None, threads);
                    assert_eq!(end, Route::Nobody);
                    seen.sort_unstable();
                    assert_eq!(seen, (0..threads).collect::<Vec<_>>());
                }
            }
        }
    }

    /// The single-process steady state: a SYN and a packet of a flow held
    /// by the thread reading it stay on that thread, whatever the number
    /// of threads.
    #[test]
    fn a_syn_and_a_held_flow_take_no_hop() {
        for threads in 1..=8 {
            for t in 0..threads {
                assert_eq!(route(Some(Unowned::Syn), t, threads, 0), Route::Here);
                assert_eq!(route(None, t, threads, 0), Route::Here);
            }
        }
        assert_eq!(route(Some(Unowned::Tcp), 0, 1, 0), Route::Nobody);
        // A hop count past the round (a bad message) ends the chain.
        assert_eq!(route(Some(Unowned::Tcp), 0, 256, 255), Route::Nobody);
    }

    /// No packet goes back and forth: what the new process received from
    /// the old one is always handled there, and the old one sends back only
    /// a datagram of a flow it does not have.
    #[test]
    fn the_policy_never_sends_a_packet_back_and_forth() {
        use Unowned::*;
        let all = [Syn, Tcp, Udp { pinned: true }, Udp { pinned: false }];
        for w in all {
            assert!(!decide(None, Origin::Local, w));
            assert!(!decide(Some(Role::Previous), Origin::Peer, w));
            assert!(decide(Some(Role::Next), Origin::Local, w));
        }
        assert!(!decide(Some(Role::Previous), Origin::Local, Syn));
        assert!(decide(Some(Role::Previous), Origin::Local, Tcp));
        assert!(decide(
            Some(Role::Previous),
            Origin::Local,
            Udp { pinned: true }
        ));
        assert!(!decide(
            Some(Role::Previous),
            Origin::Local,
            Udp { pinned: false }
        ));
        assert!(!decide(Some(Role::Next), Origin::Peer, Syn));
        assert!(!decide(Some(Role::Next), Origin::Peer, Tcp));
        assert!(decide(
            Some(Role::Next),
            Origin::Peer,
            Udp { pinned: false }
        ));
    }

    #[test]
    fn a_packet_crosses_an_inbox_whole_and_a_closed_peer_is_nobody() {
        let mut boxes = inboxes(2).unwrap();
        let b1 = boxes.pop().unwrap();
        let b0 = boxes.pop().unwrap();
        let links = Links::default();
        links.set_siblings(vec![b0.tx.try_clone().unwrap(), b1.tx.try_clone().unwrap()]);
        let p = vec![7u8; 70_000];
        assert_eq!(links.to_sibling(1, Origin::Local, 3, &p), Passed::Sent);
        let mut buf = Vec::new();
        assert_eq!(recv(&b1.rx, &mut buf, 80_000).unwrap(), (Origin::Local, 3));
        assert_eq!(buf, p);
        assert!(recv(&b1.rx, &mut buf, 80_000).is_err(), "one message");
        assert_eq!(links.to_sibling(2, Origin::Local, 1, &p), Passed::Nobody);

        let theirs = inboxes(1).unwrap().pop().unwrap();
        links.set_peer(Peer::new(Role::Previous, vec![theirs.tx]));
        assert_eq!(links.peer_role(), Some(Role::Previous));
        assert_eq!(links.to_peer(&key(1), b"x"), Passed::Sent);
        assert_eq!(recv(&theirs.rx, &mut buf, 100).unwrap(), (Origin::Peer, 0));
        assert_eq!(buf, b"x");
        drop(theirs.rx);
        assert_eq!(links.to_peer(&key(1), b"x"), Passed::Nobody);
        assert_eq!(links.peer_role(), None, "gone for good");
    }
}
