//! The TUN stack's connection table: one entry per (client, VIP), from the
//! held SYN to the socket's removal. One map holds each connection's whole
//! state, so removing an entry forgets everything about it: nothing of a
//! refused or ended connection can stay behind in another map. Pure: no I/O,
//! no smoltcp sockets (only their handles).

use std::collections::HashMap;

use smoltcp::iface::SocketHandle;

use super::packet::{ConnKey, SynId};

/// A connection's smoltcp socket: its shard and its handle there.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ConnSocket {
    /// Index of the socket set.
    pub(crate) shard: usize,
    /// Handle in that set.
    pub(crate) handle: SocketHandle,
}

/// A connection answered by a smoltcp socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Accepted {
    /// Its socket.
    pub socket: ConnSocket,
    /// The SYN that opened it (to tell a later connection's SYN).
    pub syn: SynId,
    /// The client's own MSS when smoltcp was shown a larger one: segments to
    /// the client leave with it as `gso_size`, until the socket is removed
    /// (a closing socket still sends what it holds).
    pub mss: Option<u16>,
}

/// Where a connection is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Conn {
    /// Its SYN is held while a backend connect is in flight.
    Pending {
        /// The SYN, copied to its own size (the read buffer is 64 KiB).
        syn: Vec<u8>,
        /// The client's MSS, when the SYN's was raised.
        mss: Option<u16>,
    },
    /// A relay runs between its socket and a backend.
    Open(Accepted),
    /// Its relay ended; the socket goes once its TCP connection is over.
    Closing(Accepted),
}

/// Every connection of one stack.
#[derive(Debug, Default)]
pub struct Conns {
    map: HashMap<ConnKey, Conn>,
    /// The keys of the `Closing` entries, so the reaper visits only those.
    closing: Vec<ConnKey>,
}

/// What [`Conns::release`] did with an ended relay's socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Released {
    /// Its entry is closing: the reaper removes the socket once closed.
    Closing,
    /// A newer connection holds the key (see [`Conns::forget`]): the socket
    /// belongs to no entry and goes now.
    Orphan,
}

impl Conns {
    /// Connections held, open or closing.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// True when there is none.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// The entry of `key`.
    pub fn get(&self, key: &ConnKey) -> Option<&Conn> {
        self.map.get(key)
    }

    /// The accepted connection of `key`, open or closing.
    pub fn accepted(&self, key: &ConnKey) -> Option<Accepted> {
        match self.map.get(key)? {
            Conn::Open(a) | Conn::Closing(a) => Some(*a),
            Conn::Pending { .. } => None,
        }
    }

    /// The client MSS segments on `key` leave with, if it was raised.
    pub fn mss(&self, key: &ConnKey) -> Option<u16> {
        match self.map.get(key)? {
            Conn::Pending { mss, .. } => *mss,
            Conn::Open(a) | Conn::Closing(a) => a.mss,
        }
    }

    /// Holds a SYN for a key that has no entry.
    pub fn hold(&mut self, key: ConnKey, syn: Vec<u8>, mss: Option<u16>) {
        self.map.entry(key).or_insert(Conn::Pending { syn, mss });
    }

    /// Takes a held SYN (to answer it, or because it is refused): the SYN
    /// and the client's MSS. The entry goes with it.
    pub fn take_pending(&mut self, key: &ConnKey) -> Option<(Vec<u8>, Option<u16>)> {
        match self.map.remove(key)? {
            Conn::Pending { syn, mss } => Some((syn, mss)),
            other => {
                self.map.insert(*key, other);
                None
            }
        }
    }

    /// Records a connection whose held SYN a socket answered.
    pub fn open(&mut self, key: ConnKey, a: Accepted) {
        self.map.insert(key, Conn::Open(a));
    }

    /// An ended relay gives its socket back.
    pub fn release(&mut self, key: ConnKey, socket: ConnSocket) -> Released {
        let Some(entry) = self.map.get_mut(&key) else {
            return Released::Orphan;
        };
        match *entry {
            Conn::Open(a) if a.socket == socket => {
                *entry = Conn::Closing(a);
                self.closing.push(key);
                Released::Closing
            }
            Conn::Closing(a) if a.socket == socket => Released::Closing,
            _ => Released::Orphan,
        }
    }

    /// Forgets the connection of `key` at once (a newer connection takes
    /// its 4-tuple).
    pub fn forget(&mut self, key: &ConnKey) -> Option<Conn> {
        let gone = self.map.remove(key)?;
        if matches!(gone, Conn::Closing(_)) {
            self.closing.retain(|k| k != key);
        }
        Some(gone)
    }

    /// Removes the closing connections whose socket `over` says is done, and
    /// returns their sockets (for the caller to remove).
    pub fn reap(&mut self, mut over: impl FnMut(ConnSocket) -> bool) -> Vec<ConnSocket> {
        let mut gone = Vec::new();
        let map = &mut self.map;
        self.closing.retain(|key| {
            let Some(Conn::Closing(a)) = map.get(key) else {
                return false;
            };
            if !over(a.socket) {
                return true;
            }
            gone.push(a.socket);
            map.remove(key);
            false
        });
        gone
    }

    /// How many entries are closing.
    pub fn closing(&self) -> usize {
        self.closing.len()
    }
}

/// True when `new`, a SYN on the 4-tuple of a connection that is closing
/// (TIME-WAIT, or the client's FIN seen), starts a new connection, as the
/// kernel decides in tcp_timewait_state_process (RFC 6191): its timestamp is
/// newer, or without timestamps its sequence number is after the old one.
///
/// The kernel compares with the old connection's next expected sequence
/// number; smoltcp does not expose it, so this compares with the old
/// connection's initial one. That admits no duplicate: the only SYN the old
/// connection ever sent carries its own initial sequence number, and SYNs of
/// earlier connections (clock-driven ISNs and timestamps, RFC 6528) are older
/// still. A timestamp older than the old connection's is rejected (PAWS).
pub fn supersedes(old: SynId, new: SynId) -> bool {
    if new.seq == old.seq {
        // The old connection's own SYN, retransmitted.
        return false;
    }
    let after = |a: u32, b: u32| (a.wrapping_sub(b) as i32) > 0;
    match (old.tsval, new.tsval) {
        (Some(o), Some(n)) if n != o => after(n, o),
        _ => after(new.seq, old.seq),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(port: u16) -> ConnKey {
        (([10, 1, 0, 5], port).into(), ([10, 96, 0, 10], 80).into())
    }

    fn accepted(shard: usize) -> Accepted {
        Accepted {
            socket: ConnSocket {
                shard,
                handle: SocketHandle::default(),
            },
            syn: SynId {
                seq: 1,
                tsval: None,
            },
            mss: Some(1460),
        }
    }

    #[test]
    fn a_refused_syn_leaves_no_trace() {
        let mut c = Conns::default();
        c.hold(key(1), vec![1, 2, 3], Some(1460));
        assert_eq!(c.mss(&key(1)), Some(1460));
        assert_eq!(c.take_pending(&key(1)), Some((vec![1, 2, 3], Some(1460))));
        assert!(c.is_empty());
        assert_eq!(c.mss(&key(1)), None);
    }

    #[test]
    fn a_connection_lives_from_its_syn_to_its_reaping() {
        let mut c = Conns::default();
        c.hold(key(1), vec![], Some(1400));
        // A second SYN while connecting changes nothing.
        c.hold(key(1), vec![9], None);
        let (_, mss) = c.take_pending(&key(1)).unwrap();
        let a = Accepted { mss, ..accepted(3) };
        c.open(key(1), a);
        assert_eq!(c.take_pending(&key(1)), None, "an open entry is no SYN");
        assert_eq!(c.accepted(&key(1)), Some(a));
        assert_eq!(c.release(key(1), a.socket), Released::Closing);
        assert_eq!(c.mss(&key(1)), Some(1400), "a closing socket still sends");
        assert!(c.reap(|_| false).is_empty());
        assert_eq!(c.reap(|s| s == a.socket), vec![a.socket]);
        assert!(c.is_empty());
        assert_eq!(c.closing(), 0);
    }

    #[test]
    fn a_superseded_socket_is_an_orphan_and_never_touches_the_new_entry() {
        let mut c = Conns::default();
        let old = accepted(1);
        c.open(key(1), old);
        assert_eq!(c.forget(&key(1)), Some(Conn::Open(old)));
        c.open(key(1), accepted(2));
        assert_eq!(c.release(key(1), old.socket), Released::Orphan);
        assert_eq!(c.accepted(&key(1)), Some(accepted(2)));
        // Forgetting a closing entry drops it from the reaper's list too.
        assert_eq!(c.release(key(1), accepted(2).socket), Released::Closing);
        c.forget(&key(1));
        assert_eq!(c.closing(), 0);
    }

    #[test]
    fn a_newer_syn_without_timestamps_needs_a_later_sequence_number() {
        let old = SynId {
            seq: 1000,
            tsval: None,
        };
        let seq = |seq| SynId { seq, tsval: None };
        assert!(supersedes(old, seq(1001)));
        assert!(supersedes(old, seq(1000u32.wrapping_add(1 << 30))));
        assert!(!supersedes(old, seq(999)));
        assert!(!supersedes(old, seq(1000)));
        // Across the wrap of the sequence space.
        let high = SynId {
            seq: u32::MAX - 5,
            tsval: None,
        };
        assert!(supersedes(high, seq(10)));
        // A timestamp decides when both have one; PAWS rejects an older one.
        let ts = |seq, tsval| SynId {
            seq,
            tsval: Some(tsval),
        };
        assert!(supersedes(ts(1000, 100), ts(10, 101)));
        assert!(!supersedes(ts(1000, 100), ts(5000, 99)));
        assert!(
            !supersedes(ts(1000, 100), ts(1000, 200)),
            "its own SYN again"
        );
    }
}
