//! One TUN queue's reads and writes on io_uring (the engine's [`Ring`]):
//! up to [`READS`] reads go in at once, each into a packet buffer of its
//! own (the stack's, so a packet is never copied), and the packets the stack
//! queued in a round go out as one batch of writes, one `io_uring_enter` for
//! all of them and for the next reads. Before, each packet cost a `readv(2)`
//! (after an epoll wake-up) and a `writev(2)`.
//!
//! Every operation completes within the submit that carries it: the queue is
//! `O_NONBLOCK`, so its writes never wait, and the reads are `RWF_NOWAIT`,
//! so one that finds the queue empty completes at once with `EAGAIN` (reads
//! left waiting on the device were all woken by every packet, and a 100 ms
//! back-off after the failures that followed made p99 latency 87 ms in the
//! first measurement, BENCHMARKS.md). The driver reaps them right after the
//! submit and nothing watches the ring's descriptor. After `EAGAIN` no read
//! is armed until the queue's descriptor is readable again, which the
//! driver learns from its reactor (epoll). An io_uring poll served for that
//! until 2026-11-29: its completion ran as task work that interrupted the
//! sleeping thread's `epoll_wait` (`EINTR`) and took a second one to see;
//! a multishot poll kept armed cost a completion per arriving packet
//! (`tun/udp_in_64_uring` took 290 µs against 220 µs for a `readv` each).
//!
//! Each slot keeps its `virtio_net_hdr` and its `iovec`s at a fixed address
//! (a boxed slice that never grows) for as long as its operation runs.

use std::io;
use std::os::fd::{AsRawFd, RawFd};

use io_uring::types::Fd;
use io_uring::{cqueue, opcode};

use super::offload::{rx_checksum, rx_udp_gso, tx_header, RxChecksum, VNET_HDR_LEN};
use crate::dataplane::engine::ops;
use crate::dataplane::engine::ring::{Op, Ring, Token};

/// Reads in one batch at most: 16 covers a burst of TSO super-packets or of
/// a few flows' datagrams per wake-up. A batch is twice the packets the
/// last one brought (at least 2), so a quiet queue wastes one read per
/// wake-up, not 15.
pub const READS: usize = 16;

/// Writes in flight at most (the stack's packets of one round beyond that
/// wait for the next).
pub const WRITES: usize = 256;

/// A received packet and what its header says.
#[derive(Debug)]
pub struct Received {
    /// The IP packet (the header stripped).
    pub packet: Vec<u8>,
    /// What the kernel vouches for about its checksum.
    pub checksum: RxChecksum,
    /// `Some(size)`: a UDP super-packet to cut every `size` payload bytes.
    pub udp_gso: Option<u16>,
}

/// What one completion was.
#[derive(Debug)]
pub enum Done {
    /// A packet read.
    Read(Received),
    /// A write finished (or failed: `Err`); its buffer is free again.
    Wrote(Vec<u8>, io::Result<()>),
    /// A read failed; its buffer is free again and the slot needs arming.
    ReadFailed(Vec<u8>, io::Error),
}

struct ReadSlot {
    hdr: [u8; VNET_HDR_LEN],
    iov: [libc::iovec; 2],
    buf: Vec<u8>,
    armed: bool,
}

struct WriteSlot {
    hdr: [u8; VNET_HDR_LEN],
    iov: [libc::iovec; 2],
    buf: Vec<u8>,
}

/// A queue's ring with its read and write slots.
pub struct TunIo {
    ring: Ring,
    fd: RawFd,
    max: usize,
    reads: Box<[ReadSlot]>,
    writes: Box<[WriteSlot]>,
    /// Write slots not in flight.
    idle_writes: Vec<u16>,
    cqes: Vec<cqueue::Entry>,
    /// Operations submitted and not completed (what `Drop` waits for).
    in_flight: usize,
    /// Packets may be waiting: the queue was readable, or the last read
    /// found one (no read found the queue empty since).
    readable: bool,
    /// Reads the next batch may have in flight.
    batch: usize,
}

/// The two pieces of a packet on the device: its header, then `len` bytes
/// at `data`.
fn header_then(hdr: &mut [u8; VNET_HDR_LEN], data: *mut u8, len: usize) -> [libc::iovec; 2] {
    [
        libc::iovec {
            iov_base: hdr.as_mut_ptr().cast(),
            iov_len: VNET_HDR_LEN,
        },
        libc::iovec {
            iov_base: data.cast(),
            iov_len: len,
        },
    ]
}

fn empty_iov() -> [libc::iovec; 2] {
    [libc::iovec {
        iov_base: std::ptr::null_mut(),
        iov_len: 0,
    }; 2]
}

impl TunIo {
    /// A ring for the queue `fd` (which must outlive this), reading packets
    /// of at most `max` bytes. Nothing is armed yet: see [`TunIo::arm`].
    pub fn new(fd: &impl AsRawFd, max: usize) -> io::Result<Self> {
        let entries = (READS + WRITES + 8).next_power_of_two() as u32;
        let ring = Ring::new(entries)?;
        let reads = (0..READS)
            .map(|_| ReadSlot {
                hdr: [0; VNET_HDR_LEN],
                iov: empty_iov(),
                buf: Vec::new(),
                armed: false,
            })
            .collect();
        let writes = (0..WRITES)
            .map(|_| WriteSlot {
                hdr: [0; VNET_HDR_LEN],
                iov: empty_iov(),
                buf: Vec::new(),
            })
            .collect();
        Ok(Self {
            ring,
            fd: fd.as_raw_fd(),
            max,
            reads,
            writes,
            idle_writes: (0..WRITES as u16).rev().collect(),
            cqes: Vec::with_capacity(entries as usize * 4),
            in_flight: 0,
            readable: true,
            batch: 2,
        })
    }

    /// When packets may be waiting, queues a batch of reads, each into a
    /// buffer from `buffer` (a slot whose last read found nothing keeps its
    /// buffer); submitted by the next [`TunIo::submit`]. Returns how many
    /// reads are armed.
    pub fn arm(&mut self, mut buffer: impl FnMut() -> Vec<u8>) -> usize {
        if !self.readable {
            // The driver waits for the queue's readiness instead.
            return 0;
        }
        let in_flight = self.reads.iter().filter(|s| s.armed).count();
        let mut room = self.batch.saturating_sub(in_flight);
        for (i, s) in self.reads.iter_mut().enumerate() {
            if room == 0 {
                break;
            }
            if s.armed {
                continue;
            }
            room -= 1;
            if s.buf.capacity() < self.max {
                let mut buf = buffer();
                buf.clear();
                buf.reserve(self.max);
                s.buf = buf;
            }
            let spare = s.buf.spare_capacity_mut();
            let len = spare.len().min(self.max);
            s.iov = header_then(&mut s.hdr, spare.as_mut_ptr().cast(), len);
            s.armed = true;
            let sqe = opcode::Readv::new(Fd(self.fd), s.iov.as_ptr(), 2)
                .rw_flags(libc::RWF_NOWAIT)
                .build();
            self.ring.push(sqe, Token::new(Op::TunRead, i as u32));
            self.in_flight += 1;
        }
        self.reads.iter().filter(|s| s.armed).count()
    }

    /// Packets may be waiting: the queue's descriptor became readable (or
    /// the driver's timer, a safety net should an event ever be missed).
    pub fn maybe_readable(&mut self) {
        self.readable = true;
    }

    /// Whether packets may be waiting (no read found the queue empty since
    /// it was last readable).
    pub fn readable(&self) -> bool {
        self.readable
    }

    /// Operations submitted whose completion was not taken yet (none after
    /// a submit's completions are taken: every one completes within it).
    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// Queues `packet` for the wire, with a header asking the kernel to
    /// complete its checksum and cut it by `mss` (see
    /// [`tx_header`]); gives it back when every write slot is busy.
    pub fn write(&mut self, mut packet: Vec<u8>, mss: Option<u16>) -> Result<(), Vec<u8>> {
        let Some(i) = self.idle_writes.pop() else {
            return Err(packet);
        };
        let Some(s) = self.writes.get_mut(usize::from(i)) else {
            return Err(packet);
        };
        s.hdr = tx_header(&mut packet, mss);
        s.iov = header_then(&mut s.hdr, packet.as_mut_ptr(), packet.len());
        s.buf = packet;
        let sqe = opcode::Writev::new(Fd(self.fd), s.iov.as_ptr(), 2).build();
        self.ring.push(sqe, Token::new(Op::TunWrite, u32::from(i)));
        self.in_flight += 1;
        Ok(())
    }

    /// Write slots free.
    pub fn write_room(&self) -> usize {
        self.idle_writes.len()
    }

    /// Submits everything queued in one system call (the writes and reads
    /// that can complete at once complete in it).
    pub fn submit(&mut self) -> io::Result<usize> {
        self.ring.submit()
    }

    /// Submits everything queued and waits until at least `want`
    /// completions are posted (benches and tests; the driver never blocks).
    pub fn submit_and_wait(&mut self, want: usize) -> io::Result<usize> {
        self.ring.uring().submit_and_wait(want)
    }

    /// Hands every completion posted so far to `f`, in the order posted.
    /// Returns how many packets were read.
    pub fn complete(&mut self, mut f: impl FnMut(Done)) -> usize {
        let mut cqes = std::mem::take(&mut self.cqes);
        self.ring.drain(&mut cqes);
        let mut read = 0;
        for cqe in cqes.drain(..) {
            if let Some(done) = self.finish(&cqe) {
                read += usize::from(matches!(done, Done::Read(_)));
                f(done);
            }
        }
        self.cqes = cqes;
        if read > 0 {
            self.batch = (read * 2).clamp(2, READS);
        }
        read
    }

    /// Makes sense of one completion, in the order posted: a packet read
    /// says packets may wait, a read that found nothing says none does
    /// (until the queue is readable again).
    fn finish(&mut self, cqe: &cqueue::Entry) -> Option<Done> {
        let t = Token::unpack(cqe.user_data())?;
        let res = cqe.result();
        match t.op {
            Op::TunRead => {
                let s = self.reads.get_mut(t.index as usize)?;
                self.in_flight = self.in_flight.saturating_sub(1);
                s.armed = false;
                let Ok(n) = usize::try_from(res) else {
                    if res == -libc::EAGAIN {
                        // Nothing waits: the slot keeps its buffer.
                        self.readable = false;
                        return None;
                    }
                    let buf = std::mem::take(&mut s.buf);
                    return Some(Done::ReadFailed(buf, io::Error::from_raw_os_error(-res)));
                };
                self.readable = true;
                let mut buf = std::mem::take(&mut s.buf);
                let len = n.saturating_sub(VNET_HDR_LEN).min(s.iov[1].iov_len);
                // SAFETY: the kernel wrote `len` bytes into the spare
                // capacity the iovec described (`reserve` made it that long).
                unsafe { buf.set_len(len) };
                Some(Done::Read(Received {
                    packet: buf,
                    checksum: rx_checksum(&s.hdr),
                    udp_gso: rx_udp_gso(&s.hdr),
                }))
            }
            Op::TunWrite => {
                let s = self.writes.get_mut(t.index as usize)?;
                self.in_flight = self.in_flight.saturating_sub(1);
                self.idle_writes.push(t.index as u16);
                let buf = std::mem::take(&mut s.buf);
                let r = if res < 0 {
                    Err(io::Error::from_raw_os_error(-res))
                } else {
                    Ok(())
                };
                Some(Done::Wrote(buf, r))
            }
            _ => None,
        }
    }
}

impl Drop for TunIo {
    /// Cancels anything in flight and waits (boundedly) until
    /// the kernel has let go of every buffer; a buffer it may still hold is
    /// leaked rather than freed under it.
    fn drop(&mut self) {
        self.ring
            .push(ops::cancel_all(self.fd), Token::new(Op::Ignore, 0));
        for _ in 0..100 {
            if self.in_flight == 0 {
                return;
            }
            let _ = self.ring.uring().submit_and_wait(1);
            self.complete(|_| {});
        }
        for s in self.reads.iter_mut().filter(|s| s.armed) {
            std::mem::forget(std::mem::take(&mut s.buf));
        }
        for s in self.writes.iter_mut() {
            std::mem::forget(std::mem::take(&mut s.buf));
        }
    }
}
