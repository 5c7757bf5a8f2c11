//! The TUN device ringvip owns, and a queue-backed smoltcp `phy::Device`.
//! The stack only ever sees the queues; the driver moves packets between the
//! queues and the TUN fd. Keeping the fd out of the `Device` makes the packet
//! path testable and fuzzable without a kernel device.

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use smoltcp::phy::{self, Checksum, ChecksumCapabilities, DeviceCapabilities, Medium};
use smoltcp::time::Instant;

use super::offload::{rx_checksum, tx_header, RxChecksum, VNET_HDR_LEN};

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

/// `TUNSETIFF`: `_IOW('T', 202, int)`; not exported by libc.
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
/// `TUNSETOFFLOAD`: `_IOW('T', 208, unsigned int)`.
const TUNSETOFFLOAD: libc::c_ulong = 0x4004_54d0;
/// `TUN_F_USO4` and `TUN_F_USO6` (Linux 6.2): UDP segmentation offload,
/// granted only as a pair; not exported by libc.
const TUN_F_USO4: libc::c_uint = 0x20;
const TUN_F_USO6: libc::c_uint = 0x40;

/// One queue of a TUN device: IP packets behind a `virtio_net_hdr` (checksum
/// offload, see [`offload`](super::offload)), no packet-info header,
/// non-blocking. Closing the last queue removes the device and every route
/// through it.
///
/// Opened with `ioctl(TUNSETIFF)` directly rather than through the tun-tap
/// crate: tun-tap can set neither `IFF_MULTI_QUEUE` nor `IFF_VNET_HDR`; one
/// queue bound ClusterIP throughput to a single thread (4 streams: 0.23-0.30x
/// kernel DNAT), and checksums cost a tenth of the CPU (see BENCHMARKS.md).
#[derive(Debug)]
pub struct Tun {
    fd: OwnedFd,
    name: String,
    uso: bool,
}

impl Tun {
    /// Creates the multi-queue TUN device `name` with `queues` queues (at
    /// least one). The kernel steers each flow to one queue by a symmetric
    /// hash of its addresses and ports, so a thread per queue owns whole flows.
    pub fn open_queues(name: &str, queues: usize) -> Result<Vec<Tun>, TunError> {
        let first = Self::attach(name)?;
        // Later queues must attach to the name the kernel gave the first one.
        let real = first.name.clone();
        let mut all = vec![first];
        for _ in 1..queues.max(1) {
            all.push(Self::attach(&real)?);
        }
        Ok(all)
    }

    fn attach(name: &str) -> Result<Tun, TunError> {
        let err = |source| TunError {
            name: name.to_string(),
            source,
        };
        if name.len() >= libc::IFNAMSIZ || name.contains('\0') {
            return Err(err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "interface names are at most 15 bytes",
            )));
        }
        // SAFETY: a plain open(2) of a NUL-terminated path.
        let raw = unsafe {
            libc::open(
                c"/dev/net/tun".as_ptr(),
                libc::O_RDWR | libc::O_NONBLOCK | libc::O_CLOEXEC,
            )
        };
        if raw < 0 {
            return Err(err(io::Error::last_os_error()));
        }
        // SAFETY: `raw` is a descriptor we just opened and own alone.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: ifreq is plain old data; all zeroes is a valid value.
        let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
        for (dst, src) in req.ifr_name.iter_mut().zip(name.bytes()) {
            *dst = src as libc::c_char;
        }
        req.ifr_ifru.ifru_flags =
            (libc::IFF_TUN | libc::IFF_NO_PI | libc::IFF_MULTI_QUEUE | libc::IFF_VNET_HDR)
                as libc::c_short;
        // SAFETY: TUNSETIFF reads and writes the ifreq we pass, nothing else.
        if unsafe { libc::ioctl(fd.as_raw_fd(), TUNSETIFF as _, &mut req) } < 0 {
            return Err(err(io::Error::last_os_error()));
        }
        // Checksums and TCP segmentation (see offload.rs), and UDP
        // segmentation where the kernel has it (it refuses unknown flags
        // with EINVAL: asked again without). Without ECN offload the kernel
        // segments the rare ECN-marked super-packet itself.
        let offload = libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_TSO6;
        let set = |flags: libc::c_uint| {
            // SAFETY: TUNSETOFFLOAD takes its argument by value.
            unsafe { libc::ioctl(fd.as_raw_fd(), TUNSETOFFLOAD as _, flags) >= 0 }
        };
        let uso = set(offload | TUN_F_USO4 | TUN_F_USO6);
        if !uso && !set(offload) {
            return Err(err(io::Error::last_os_error()));
        }
        let len = req.ifr_name.iter().position(|&c| c == 0).unwrap_or(0);
        let name = req
            .ifr_name
            .iter()
            .take(len)
            .map(|&c| c as u8 as char)
            .collect();
        Ok(Tun { fd, name, uso })
    }

    /// The kernel's name of the device.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Whether the kernel took UDP segmentation offload: UDP super-packets
    /// may then arrive (see [`offload::split_udp`](super::offload::split_udp)).
    pub fn uso(&self) -> bool {
        self.uso
    }

    /// Reads one packet of at most `max` bytes into `buf` (replacing its
    /// contents, without zeroing the buffer first); `WouldBlock` when none is
    /// waiting.
    pub fn recv(&self, buf: &mut Vec<u8>, max: usize) -> io::Result<RxChecksum> {
        let mut hdr = [0u8; VNET_HDR_LEN];
        read_after(self.fd.as_raw_fd(), &mut hdr, buf, max)?;
        Ok(rx_checksum(&hdr))
    }

    /// Writes one packet, asking the kernel to complete its TCP or UDP
    /// checksum only if it ever needs it (the checksum field is rewritten),
    /// and to cut a TCP segment into pieces of `mss` payload bytes when larger.
    pub fn send(&self, packet: &mut [u8], mss: Option<u16>) -> io::Result<usize> {
        let hdr = tx_header(packet, mss);
        let iov = [
            libc::iovec {
                iov_base: hdr.as_ptr().cast_mut().cast(),
                iov_len: hdr.len(),
            },
            libc::iovec {
                iov_base: packet.as_mut_ptr().cast(),
                iov_len: packet.len(),
            },
        ];
        // SAFETY: writev(2) only reads the two buffers, alive for the call.
        let n = unsafe { libc::writev(self.fd.as_raw_fd(), iov.as_ptr(), 2) };
        let n = usize::try_from(n).map_err(|_| io::Error::last_os_error())?;
        Ok(n.saturating_sub(VNET_HDR_LEN))
    }
}

/// Reads one packet (or message) from `fd`: its first `head.len()` bytes
/// into `head`, at most `max` more into `buf` (replacing its contents,
/// without zeroing the buffer first). Returns the bytes read in all.
pub(super) fn read_after(
    fd: RawFd,
    head: &mut [u8],
    buf: &mut Vec<u8>,
    max: usize,
) -> io::Result<usize> {
    buf.clear();
    buf.reserve(max);
    let spare = buf.spare_capacity_mut();
    let iov = [
        libc::iovec {
            iov_base: head.as_mut_ptr().cast(),
            iov_len: head.len(),
        },
        libc::iovec {
            iov_base: spare.as_mut_ptr().cast(),
            iov_len: spare.len().min(max),
        },
    ];
    // SAFETY: readv(2) writes at most iov_len bytes into each buffer, both
    // owned by the caller and alive for the call.
    let n = unsafe { libc::readv(fd, iov.as_ptr(), 2) };
    let n = usize::try_from(n).map_err(|_| io::Error::last_os_error())?;
    let len = n.saturating_sub(head.len());
    // SAFETY: the kernel initialised the first `len` bytes of the spare
    // capacity, which `reserve` made at least `max >= len` long.
    unsafe { buf.set_len(len) };
    Ok(n)
}

impl AsRawFd for Tun {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
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
        // TCP and UDP checksums are the driver's job (offload.rs): the TUN
        // hands over partial sums, which smoltcp must not verify, and takes
        // partial sums back. IP header and ICMP checksums stay smoltcp's.
        let mut checksum = ChecksumCapabilities::default();
        checksum.tcp = Checksum::None;
        checksum.udp = Checksum::None;
        caps.checksum = checksum;
        caps
    }
}
