//! The TUN device ringvip owns, and a queue-backed smoltcp `phy::Device`.
//! The stack only ever sees the queues; the driver moves packets between the
//! queues and the TUN fd. Keeping the fd out of the `Device` makes the packet
//! path testable and fuzzable without a kernel device.

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsRawFd, RawFd};

use smoltcp::phy::{self, ChecksumCapabilities, DeviceCapabilities, Medium};
use smoltcp::time::Instant;

/// The TUN device could not be created.
#[derive(Debug, thiserror::Error)]
#[error("cannot create TUN device {name:?}: {source} (needs CAP_NET_ADMIN and /dev/net/tun)")]
pub struct TunError {
    /// Requested name.
    pub name: String,
    /// Cause.
    #[source]
    pub source: io::Error,
}

/// An open, non-blocking TUN device (IP packets, no packet-info header).
/// Closing it removes the device and every route through it.
#[derive(Debug)]
pub struct Tun {
    iface: tun_tap::Iface,
}

impl Tun {
    /// Creates (or attaches to) the TUN device `name`.
    pub fn open(name: &str) -> Result<Tun, TunError> {
        let err = |source| TunError {
            name: name.to_string(),
            source,
        };
        let iface = tun_tap::Iface::without_packet_info(name, tun_tap::Mode::Tun).map_err(err)?;
        iface.set_non_blocking().map_err(err)?;
        Ok(Tun { iface })
    }

    /// The kernel's name of the device.
    pub fn name(&self) -> &str {
        self.iface.name()
    }

    /// Reads one packet; `WouldBlock` when none is waiting.
    pub fn recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        self.iface.recv(buf)
    }

    /// Writes one packet.
    pub fn send(&self, buf: &[u8]) -> io::Result<usize> {
        self.iface.send(buf)
    }
}

impl AsRawFd for Tun {
    fn as_raw_fd(&self) -> RawFd {
        self.iface.as_raw_fd()
    }
}

/// Packets waiting to enter the stack (`rx`) and to leave it (`tx`), with a
/// free list so steady-state traffic allocates nothing.
#[derive(Debug)]
pub struct QueueDevice {
    rx: VecDeque<Vec<u8>>,
    tx: VecDeque<Vec<u8>>,
    free: Vec<Vec<u8>>,
    mtu: usize,
    /// Packets the stack may queue for the wire before it must wait.
    tx_limit: usize,
}

impl QueueDevice {
    /// A device with this MTU; at most `tx_limit` packets queued for the wire.
    pub fn new(mtu: usize, tx_limit: usize) -> Self {
        Self {
            rx: VecDeque::new(),
            tx: VecDeque::new(),
            free: Vec::new(),
            mtu,
            tx_limit,
        }
    }

    /// A buffer for one packet (from the free list when possible).
    pub fn buffer(&mut self) -> Vec<u8> {
        let mut b = self.free.pop().unwrap_or_default();
        b.clear();
        b
    }

    /// Returns a buffer to the free list.
    pub fn recycle(&mut self, b: Vec<u8>) {
        if self.free.len() < 256 {
            self.free.push(b);
        }
    }

    /// Queues a packet for the stack to receive.
    pub fn push_rx(&mut self, packet: Vec<u8>) {
        self.rx.push_back(packet);
    }

    /// Queues a packet for the wire (built outside the stack, e.g. UDP replies).
    pub fn push_tx(&mut self, packet: Vec<u8>) {
        self.tx.push_back(packet);
    }

    /// The next packet for the wire.
    pub fn pop_tx(&mut self) -> Option<Vec<u8>> {
        self.tx.pop_front()
    }

    /// Puts back a packet the wire did not take yet.
    pub fn unpop_tx(&mut self, p: Vec<u8>) {
        self.tx.push_front(p);
    }

    /// Packets queued for the wire.
    pub fn tx_len(&self) -> usize {
        self.tx.len()
    }

    /// The MTU.
    pub fn mtu(&self) -> usize {
        self.mtu
    }
}

/// A received packet handed to the stack; its buffer is recycled afterwards.
pub struct Rx<'a> {
    buf: Vec<u8>,
    free: &'a mut Vec<Vec<u8>>,
}

impl phy::RxToken for Rx<'_> {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        let r = f(&self.buf);
        if self.free.len() < 256 {
            self.free.push(self.buf);
        }
        r
    }
}

/// A slot for one packet the stack sends.
pub struct Tx<'a> {
    queue: &'a mut VecDeque<Vec<u8>>,
    buf: Vec<u8>,
}

impl phy::TxToken for Tx<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(mut self, len: usize, f: F) -> R {
        self.buf.resize(len, 0);
        let r = f(&mut self.buf);
        self.queue.push_back(self.buf);
        r
    }
}

impl phy::Device for QueueDevice {
    type RxToken<'a> = Rx<'a>;
    type TxToken<'a> = Tx<'a>;

    fn receive(&mut self, _: Instant) -> Option<(Rx<'_>, Tx<'_>)> {
        let p = self.rx.pop_front()?;
        let buf = self.free.pop().unwrap_or_default();
        Some((
            Rx {
                buf: p,
                free: &mut self.free,
            },
            Tx {
                queue: &mut self.tx,
                buf,
            },
        ))
    }

    fn transmit(&mut self, _: Instant) -> Option<Tx<'_>> {
        if self.tx.len() >= self.tx_limit {
            return None;
        }
        let buf = self.free.pop().unwrap_or_default();
        Some(Tx {
            queue: &mut self.tx,
            buf,
        })
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ip;
        caps.max_transmission_unit = self.mtu;
        // The kernel verified and will verify checksums of what crosses the TUN
        // only if we give it correct ones: compute on send, verify on receive.
        caps.checksum = ChecksumCapabilities::default();
        caps
    }
}
