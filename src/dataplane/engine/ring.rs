//! One io_uring per data-plane thread and what its completions carry: a
//! [`Token`] in each operation's user data names the operation and the
//! listener or connection it belongs to, so dispatch is a match, not a lookup.

use std::io;
use std::os::fd::{AsRawFd, RawFd};

use io_uring::{cqueue, squeue, IoUring};

/// What an operation was for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Op {
    /// Multishot accept on a listener.
    Accept = 1,
    /// The back-off timer before a listener's accept is armed again.
    AcceptRetry,
    /// A backend connect.
    Connect,
    /// The timeout linked to a connect.
    ConnectTimeout,
    /// Receive from the client (buffer select).
    RecvClient,
    /// Receive from the backend (buffer select).
    RecvBackend,
    /// Send to the backend what the client sent.
    SendBackend,
    /// Send to the client what the backend sent.
    SendClient,
    /// Completions nobody waits for (cancels).
    Ignore,
    /// Send to the backend what goes before the client's bytes: the PROXY
    /// protocol header, and what an upstream balancer's client sent with
    /// its own header.
    SendFirst,
    /// Multishot receive of datagrams on a UDP listener.
    UdpRecv,
    /// Multishot receive of replies on a UDP flow's backend socket.
    UdpRecvBackend,
    /// A client's datagram sent to its flow's backend (the buffer in `aux`).
    UdpSendBackend,
    /// A datagram, or a run of them with `UDP_SEGMENT`, sent by `sendmsg`
    /// from a box of the UDP path (a reply to a client from the listener's
    /// socket, or a run to a backend).
    UdpSendMsg,
    /// A splice relay waits for its source to be readable (the direction
    /// in `aux`).
    SpliceIn,
    /// A splice relay waits for its destination to have room.
    SpliceOut,
    /// A read from a TUN queue into one of its read slots (the slot in
    /// `index`; see `tun::uring`).
    TunRead,
    /// A write of one packet to a TUN queue from one of its write slots.
    TunWrite,
    /// A connection's socket closed once the connection is done.
    Close,
}

impl Op {
    fn from_u8(v: u8) -> Option<Self> {
        Some(match v {
            1 => Op::Accept,
            2 => Op::AcceptRetry,
            3 => Op::Connect,
            4 => Op::ConnectTimeout,
            5 => Op::RecvClient,
            6 => Op::RecvBackend,
            7 => Op::SendBackend,
            8 => Op::SendClient,
            9 => Op::Ignore,
            10 => Op::SendFirst,
            11 => Op::UdpRecv,
            12 => Op::UdpRecvBackend,
            13 => Op::UdpSendBackend,
            14 => Op::UdpSendMsg,
            15 => Op::SpliceIn,
            16 => Op::SpliceOut,
            17 => Op::TunRead,
            18 => Op::TunWrite,
            19 => Op::Close,
            _ => return None,
        })
    }
}

/// An operation, the index of its listener or connection, and 16 bits the
/// operation may use (a buffer id), packed into the 64 bits of user data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Token {
    /// The operation.
    pub op: Op,
    /// Listener or connection index.
    pub index: u32,
    /// Operation-specific (the buffer a datagram send holds, so its
    /// completion needs no lookup).
    pub aux: u16,
}

impl Token {
    /// For `op` on entry `index`.
    pub fn new(op: Op, index: u32) -> Self {
        Self { op, index, aux: 0 }
    }

    /// For `op` on entry `index`, carrying `aux`.
    pub fn with_aux(op: Op, index: u32, aux: u16) -> Self {
        Self { op, index, aux }
    }

    /// As user data.
    #[inline]
    pub fn pack(self) -> u64 {
        ((self.aux as u64) << 48) | ((self.op as u64) << 32) | self.index as u64
    }

    /// From user data (`None` for user data this engine did not set).
    #[inline]
    pub fn unpack(v: u64) -> Option<Self> {
        if (v >> 40) as u8 != 0 {
            return None;
        }
        Some(Self {
            op: Op::from_u8((v >> 32) as u8)?,
            index: v as u32,
            aux: (v >> 48) as u16,
        })
    }
}

/// The ring: submission with overflow handled by submitting early.
pub struct Ring {
    ring: IoUring,
}

impl Ring {
    /// A ring of `entries` submission slots (completions: twice that).
    pub fn new(entries: u32) -> io::Result<Self> {
        let ring = IoUring::builder()
            // Completions beyond the queue are kept by the kernel rather than
            // dropped (the default since 5.5, asked for explicitly).
            .setup_cqsize(entries * 4)
            // A completion that comes in while the thread runs (a multishot
            // receive fed from the other core's softirq) waits for the
            // thread's next system call instead of an inter-processor
            // interrupt that forces it into the kernel: 0.19 interrupts per
            // UDP request fewer, and UDP ×1.12–1.18, connections/s
            // ×1.12–1.16 on this machine (a VM, where each costs a VM exit;
            // BENCHMARKS.md). A sleeping thread is still woken at once.
            .setup_coop_taskrun()
            .build(entries)?;
        Ok(Self { ring })
    }

    /// The io_uring itself (registration, submitter).
    pub fn uring(&self) -> &IoUring {
        &self.ring
    }

    /// Queues `sqe` tagged with `token`; when the queue is full, what is
    /// queued is submitted first.
    #[inline]
    pub fn push(&mut self, sqe: squeue::Entry, token: Token) {
        let sqe = sqe.user_data(token.pack());
        loop {
            // SAFETY: every pointer an operation carries (buffers, addresses,
            // timespecs) is owned by the engine and outlives the operation.
            if unsafe { self.ring.submission().push(&sqe) }.is_ok() {
                return;
            }
            if self.ring.submit().is_err() {
                // EBUSY with completions pending: make room by waiting is not
                // an option on this thread; drop nothing, retry after the
                // kernel has taken some.
                std::thread::yield_now();
            }
        }
    }

    /// Submits what is queued (no wait). With nothing queued and no
    /// completions held back by the kernel it makes no system call: the
    /// engine submits after every batch of completions, and at a fixed load
    /// of small requests an empty `io_uring_enter` came once per request.
    pub fn submit(&mut self) -> io::Result<usize> {
        let sq = self.ring.submission();
        if sq.is_empty() && !sq.cq_overflow() {
            return Ok(0);
        }
        drop(sq);
        self.ring.submit()
    }

    /// Moves every completion posted so far into `out` (a reused vector:
    /// the queue's head is synced once per batch, not per entry).
    #[inline]
    pub fn drain(&mut self, out: &mut Vec<cqueue::Entry>) {
        out.extend(self.ring.completion());
    }
}

impl AsRawFd for Ring {
    fn as_raw_fd(&self) -> RawFd {
        self.ring.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_round_trip_and_foreign_data_is_refused() {
        for op in [Op::Accept, Op::Connect, Op::SendClient, Op::Ignore] {
            let t = Token::new(op, u32::MAX - 3);
            assert_eq!(Token::unpack(t.pack()), Some(t));
        }
        let t = Token::with_aux(Op::UdpSendBackend, 5, u16::MAX);
        assert_eq!(Token::unpack(t.pack()), Some(t));
        assert_eq!(Token::unpack((1 << 40) | (11 << 32)), None);
        assert_eq!(Token::unpack(0), None);
        assert_eq!(Token::unpack(77 << 32), None);
    }

    #[test]
    fn every_operation_decodes_to_itself() {
        // The table in `from_u8` must follow the enum's discriminants: an
        // entry off by one would hand a completion to the wrong handler.
        let mut decoded = 0;
        for v in 0..=u8::MAX {
            if let Some(op) = Op::from_u8(v) {
                assert_eq!(op as u8, v, "{op:?}");
                decoded += 1;
            }
        }
        // Every operation, `Close` being the last.
        assert_eq!(decoded, Op::Close as usize);
    }
}
