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

/// Segments one `UDP_SEGMENT` send may carry (the kernel's `UDP_MAX_SEGMENTS`
/// is 64 on older kernels).
pub const MAX_SEGMENTS: usize = 64;

/// Payload bytes one UDP send may carry.
pub const MAX_RUN_BYTES: usize = 65_507;

/// Datagrams for open flows taken in during one driver round, held until its
/// intake ends, then sent per flow in the order they came (`tun::udp::send_taken`):
/// a run of same-sized datagrams of one flow goes as one `UDP_SEGMENT` send,
/// which the kernel cuts into the same datagrams again. Buffers are kept
/// from round to round.
#[derive(Debug)]
pub struct Taken<K> {
    bytes: Vec<u8>,
    items: Vec<(K, usize, usize)>,
    run: Vec<u8>,
}

impl<K> Default for Taken<K> {
    fn default() -> Self {
        Self {
            bytes: Vec::new(),
            items: Vec::new(),
            run: Vec::new(),
        }
    }
}

impl<K: Ord + Copy> Taken<K> {
    /// Holds one datagram of flow `key`.
    pub fn push(&mut self, key: K, datagram: &[u8]) {
        self.items.push((key, self.bytes.len(), datagram.len()));
        self.bytes.extend_from_slice(datagram);
    }

    /// True when nothing is held.
    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// Hands over everything held, flow by flow, each flow's datagrams in
    /// the order they came, as runs: `send(key, bytes, size, count)` gets
    /// `count` datagrams of `size` bytes back to back, the last one possibly
    /// shorter (one datagram: `count` 1, `size` its length).
    pub fn drain(&mut self, mut send: impl FnMut(K, &[u8], usize, usize)) {
        // Stable: a flow's datagrams keep their order.
        self.items.sort_by_key(|&(k, _, _)| k);
        let mut i = 0;
        while let Some(&(key, _, size)) = self.items.get(i) {
            self.run.clear();
            let mut count = 0;
            for &(k, at, len) in self.items.get(i..).unwrap_or_default() {
                // The first always fits (an IPv6 datagram may be longer than
                // any run: it goes alone).
                let fits = k == key
                    && (count == 0
                        || (count < MAX_SEGMENTS
                            && self.run.len() + len <= MAX_RUN_BYTES
                            && len <= size));
                if !fits {
                    break;
                }
                self.run
                    .extend_from_slice(self.bytes.get(at..at + len).unwrap_or_default());
                count += 1;
                // A shorter datagram ends its run (an empty one is a run alone).
                if len < size || size == 0 {
                    break;
                }
            }
            send(key, &self.run, size, count);
            i += count;
        }
        self.items.clear();
        self.bytes.clear();
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

    /// What `drain` handed over: (key, datagrams of the run as sent, size).
    fn drained(t: &mut Taken<u8>) -> Vec<(u8, Vec<Vec<u8>>, usize)> {
        let mut out = Vec::new();
        t.drain(|k, bytes, size, count| {
            let dgrams: Vec<Vec<u8>> = bytes.chunks(size).map(<[u8]>::to_vec).collect();
            assert_eq!(dgrams.len(), count, "the run's bytes are its datagrams");
            out.push((k, dgrams, size));
        });
        out
    }

    #[test]
    fn taken_datagrams_go_per_flow_in_order_as_runs_of_one_size() {
        let mut t = Taken::default();
        t.push(2, b"b1");
        t.push(1, b"aaa");
        t.push(2, b"b2");
        t.push(1, b"bbb");
        t.push(1, b"cc");
        t.push(1, b"ddd");
        t.push(2, b"longer");
        let got = drained(&mut t);
        let d = |v: &[&[u8]]| v.iter().map(|x| x.to_vec()).collect::<Vec<_>>();
        assert_eq!(
            got,
            vec![
                // A shorter datagram ends a run; a longer one starts the next.
                (1, d(&[b"aaa", b"bbb", b"cc"]), 3),
                (1, d(&[b"ddd"]), 3),
                (2, d(&[b"b1", b"b2"]), 2),
                (2, d(&[b"longer"]), 6),
            ]
        );
        assert!(t.is_empty());
        assert!(drained(&mut t).is_empty(), "drained once");
    }

    #[test]
    fn a_run_stops_at_the_kernels_limits() {
        let mut t = Taken::default();
        for _ in 0..MAX_SEGMENTS + 1 {
            t.push(7, &[1u8; 8]);
        }
        let counts: Vec<usize> = drained(&mut t).iter().map(|(_, d, _)| d.len()).collect();
        assert_eq!(counts, vec![MAX_SEGMENTS, 1]);
        // Bytes: 60 datagrams of 1,400 would be 84,000.
        for _ in 0..60 {
            t.push(7, &[2u8; 1400]);
        }
        let counts: Vec<usize> = drained(&mut t).iter().map(|(_, d, _)| d.len()).collect();
        assert_eq!(
            counts,
            vec![MAX_RUN_BYTES / 1400, 60 - MAX_RUN_BYTES / 1400]
        );
        // A datagram longer than any run (IPv6's largest) goes alone.
        t.push(7, &[3u8; MAX_RUN_BYTES + 20]);
        t.push(7, &[3u8; MAX_RUN_BYTES + 20]);
        let counts: Vec<usize> = drained(&mut t).iter().map(|(_, d, _)| d.len()).collect();
        assert_eq!(counts, vec![1, 1]);
    }
}
