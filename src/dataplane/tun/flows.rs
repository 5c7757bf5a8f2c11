//! The UDP flows of the TUN path: those with a backend socket, and those
//! whose backend socket is being set up. Binding and connecting that socket
//! takes a trip through the ring, and a client (glibc's resolver with its A
//! and AAAA queries) sends its next datagram before it completes. The flow
//! exists from its first datagram on: later ones wait in [`Opening`],
//! bounded, and go out in order once the socket exists, so a flow is set up
//! (and counted) once. No I/O here: `tun::udp` does it.

use std::collections::HashMap;
use std::hash::Hash;
use std::time::Duration;

use super::packet::ConnKey;
use crate::dataplane::udp::{FlowIo, FlowTable};

/// Every UDP flow of one TUN queue.
pub struct Flows {
    /// Flows with a backend socket.
    pub open: FlowTable<ConnKey, FlowIo>,
    /// Flows whose backend socket is being set up, with their datagrams.
    pub opening: Opening<ConnKey>,
    max: usize,
    warned_full: bool,
}

impl Flows {
    /// No flows; at most `max`, idle ones expire after `idle`.
    pub fn new(idle: Duration, max: usize) -> Self {
        Self {
            open: FlowTable::new(idle, max),
            opening: Opening::default(),
            max,
            warned_full: false,
        }
    }

    /// True when the flow `key` is open or being set up here.
    #[inline]
    pub fn holds(&self, key: &ConnKey) -> bool {
        self.open.contains(key) || self.opening.contains(key)
    }

    /// Flows open or being set up.
    pub fn len(&self) -> usize {
        self.open.len() + self.opening.len()
    }

    /// True when there are none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// True when a new flow fits (open and opening ones count); warns once
    /// each time the table fills.
    pub fn room(&mut self) -> bool {
        if self.open.len() + self.opening.len() < self.max {
            self.warned_full = false;
            return true;
        }
        if !self.warned_full {
            tracing::warn!(
                max = self.max,
                "TUN UDP flow limit reached: datagrams of new flows are dropped"
            );
            self.warned_full = true;
        }
        false
    }
}

/// Datagrams a flow holds while its backend socket is set up; more are
/// dropped, as UDP may be (a resolver sends two, a burst more).
pub const OPENING_QUEUE: usize = 16;

/// What became of a datagram offered to [`Opening::offer`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Offered {
    /// A new flow: the caller sets up its backend socket, then calls
    /// [`Opening::finish`] (or [`Opening::abandon`]).
    New,
    /// Queued behind the flow being set up.
    Queued,
    /// The flow's queue is full: dropped.
    Dropped,
}

/// Flows being set up, each with the datagrams that wait for it.
#[derive(Debug)]
pub struct Opening<K> {
    flows: HashMap<K, Vec<Vec<u8>>>,
}

impl<K: Hash + Eq> Default for Opening<K> {
    fn default() -> Self {
        Self {
            flows: HashMap::new(),
        }
    }
}

impl<K: Hash + Eq> Opening<K> {
    /// Takes a datagram of a flow that has no backend socket yet.
    pub fn offer(&mut self, key: K, datagram: &[u8]) -> Offered {
        match self.flows.get_mut(&key) {
            Some(q) if q.len() >= OPENING_QUEUE => Offered::Dropped,
            Some(q) => {
                q.push(datagram.to_vec());
                Offered::Queued
            }
            None => {
                self.flows.insert(key, vec![datagram.to_vec()]);
                Offered::New
            }
        }
    }

    /// True when `key` is being set up.
    pub fn contains(&self, key: &K) -> bool {
        self.flows.contains_key(key)
    }

    /// The flow's socket exists: its datagrams, oldest first, to send now.
    pub fn finish(&mut self, key: &K) -> Vec<Vec<u8>> {
        self.flows.remove(key).unwrap_or_default()
    }

    /// The flow could not be set up: its datagrams are dropped.
    pub fn abandon(&mut self, key: &K) {
        self.flows.remove(key);
    }

    /// Flows being set up.
    pub fn len(&self) -> usize {
        self.flows.len()
    }

    /// True when no flow is being set up.
    pub fn is_empty(&self) -> bool {
        self.flows.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flow_is_new_once_and_keeps_its_datagrams_in_order() {
        let mut o = Opening::default();
        assert_eq!(o.offer(1, b"A"), Offered::New);
        assert_eq!(o.offer(1, b"AAAA"), Offered::Queued);
        assert_eq!(o.offer(2, b"x"), Offered::New);
        assert_eq!(o.len(), 2);
        assert_eq!(o.finish(&1), vec![b"A".to_vec(), b"AAAA".to_vec()]);
        assert!(!o.contains(&1));
        // Once finished, the next datagram of the key would open a new flow
        // (the caller only offers datagrams of flows without a socket).
        assert_eq!(o.offer(1, b"again"), Offered::New);
    }

    #[test]
    fn the_queue_is_bounded_and_an_abandoned_flow_forgets_it() {
        let mut o = Opening::default();
        assert_eq!(o.offer("k", b"0"), Offered::New);
        for _ in 1..OPENING_QUEUE {
            assert_eq!(o.offer("k", b"n"), Offered::Queued);
        }
        assert_eq!(o.offer("k", b"over"), Offered::Dropped);
        assert_eq!(o.finish(&"k").len(), OPENING_QUEUE);
        assert_eq!(o.offer("k", b"0"), Offered::New);
        o.abandon(&"k");
        assert!(o.is_empty());
        assert!(o.finish(&"k").is_empty());
    }
}
