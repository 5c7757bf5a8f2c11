//! A provided buffer ring (`IORING_REGISTER_PBUF_RING`): the kernel picks a
//! buffer from it only when data arrives, so a receive armed on an idle
//! connection holds no memory; the buffer comes back to the ring once its
//! bytes have been sent on.
//!
//! The ring's entries and the buffers are anonymous mappings: the ring must
//! be page aligned, and buffer pages cost resident memory only once a
//! receive has written to them.

use std::io;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU16, Ordering};

use io_uring::types::BufRingEntry;
use io_uring::IoUring;

/// A buffer ring could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum BufRingError {
    /// Entries must be a power of two between 1 and 32768.
    #[error("buffer ring entries must be a power of two up to 32768, not {0}")]
    Entries(u32),
    /// The mapping or registration failed.
    #[error("buffer ring: {0}")]
    Io(#[from] io::Error),
}

/// An anonymous private mapping, unmapped on drop.
struct Mapping {
    ptr: NonNull<u8>,
    len: usize,
}

impl Mapping {
    fn new(len: usize) -> io::Result<Self> {
        // SAFETY: a fresh anonymous mapping; no existing memory is touched.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let ptr = NonNull::new(p.cast::<u8>()).ok_or_else(|| io::Error::other("mmap gave null"))?;
        Ok(Self { ptr, len })
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: ptr/len are exactly what mmap returned.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

/// The buffers and the ring that lends them to the kernel. Single-threaded:
/// the owner recycles buffers and [`BufRing::publish`]es them once per
/// completion batch.
pub struct BufRing {
    ring: Mapping,
    bufs: Mapping,
    entries: u16,
    buf_size: u32,
    /// Tail as this side has written it (published by `publish`).
    tail: u16,
    /// Buffers the kernel may still pick (published or not).
    free: u32,
    bgid: u16,
    registered: bool,
}

impl BufRing {
    /// `entries` buffers of `buf_size` bytes, all free, not yet registered.
    pub fn new(entries: u32, buf_size: u32, bgid: u16) -> Result<Self, BufRingError> {
        if entries == 0 || entries > 32768 || !entries.is_power_of_two() {
            return Err(BufRingError::Entries(entries));
        }
        let n = entries as usize;
        let ring = Mapping::new(n * std::mem::size_of::<BufRingEntry>())?;
        let bufs = Mapping::new(n * buf_size as usize)?;
        let mut r = Self {
            ring,
            bufs,
            // At most 32768 (checked above): fits.
            entries: entries as u16,
            buf_size,
            tail: 0,
            free: 0,
            bgid,
            registered: false,
        };
        for bid in 0..entries {
            r.recycle(bid as u16);
        }
        r.publish();
        Ok(r)
    }

    /// Registers the ring with `ring` as buffer group [`BufRing::group`].
    pub fn register(&mut self, ring: &IoUring) -> io::Result<()> {
        // SAFETY: the ring mapping is page aligned, holds `entries`
        // entries, and outlives the registration (`unregister` comes first).
        unsafe {
            ring.submitter().register_buf_ring(
                self.ring.ptr.as_ptr() as u64,
                self.entries,
                self.bgid,
            )?;
        }
        self.registered = true;
        Ok(())
    }

    /// Unregisters from `ring` (before either is dropped: the kernel must not
    /// pick a buffer from memory that is gone).
    pub fn unregister(&mut self, ring: &IoUring) {
        if self.registered {
            let _ = ring.submitter().unregister_buf_ring(self.bgid);
            self.registered = false;
        }
    }

    /// The buffer group id receives name.
    pub fn group(&self) -> u16 {
        self.bgid
    }

    /// Size of each buffer.
    pub fn buf_size(&self) -> u32 {
        self.buf_size
    }

    /// Buffers not lent out (the kernel may pick them).
    pub fn free(&self) -> u32 {
        self.free
    }

    /// The kernel filled buffer `bid` (it is no longer free).
    #[inline]
    pub fn taken(&mut self) {
        self.free = self.free.saturating_sub(1);
    }

    /// Pointer to the start of buffer `bid`.
    #[inline]
    pub fn ptr(&self, bid: u16) -> *mut u8 {
        let i = (bid as usize) & (self.entries as usize - 1);
        // SAFETY: i < entries, so the offset stays inside the mapping.
        unsafe { self.bufs.ptr.as_ptr().add(i * self.buf_size as usize) }
    }

    /// The first `len` bytes of buffer `bid` (what a receive wrote there).
    #[inline]
    pub fn bytes(&self, bid: u16, len: usize) -> &[u8] {
        let len = len.min(self.buf_size as usize);
        // SAFETY: inside the mapping; the kernel wrote these bytes and does
        // not touch the buffer again until it is recycled.
        unsafe { std::slice::from_raw_parts(self.ptr(bid), len) }
    }

    /// Gives buffer `bid` back; the kernel sees it after [`BufRing::publish`].
    #[inline]
    pub fn recycle(&mut self, bid: u16) {
        let mask = self.entries as usize - 1;
        let slot = (self.tail as usize) & mask;
        let addr = self.ptr(bid) as u64;
        // SAFETY: slot < entries; the kernel only reads entries between its
        // head and the published tail, and this one is past the tail.
        let e = unsafe { &mut *self.ring.ptr.as_ptr().cast::<BufRingEntry>().add(slot) };
        e.set_addr(addr);
        e.set_len(self.buf_size);
        e.set_bid(bid);
        self.tail = self.tail.wrapping_add(1);
        self.free += 1;
    }

    /// Makes the recycled buffers visible to the kernel.
    #[inline]
    pub fn publish(&self) {
        let base = self.ring.ptr.as_ptr().cast::<BufRingEntry>();
        // SAFETY: the tail field lives in entry 0's reserved word, which the
        // kernel reads; writing it with release ordering publishes the entries.
        let tail = unsafe { &*(BufRingEntry::tail(base) as *const AtomicU16) };
        tail.store(self.tail, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_must_be_a_power_of_two() {
        assert!(matches!(
            BufRing::new(3, 64, 0),
            Err(BufRingError::Entries(3))
        ));
        assert!(matches!(
            BufRing::new(0, 64, 0),
            Err(BufRingError::Entries(0))
        ));
    }

    #[test]
    fn recycled_buffers_are_counted_and_addressed() {
        let mut r = BufRing::new(4, 64, 1).unwrap();
        assert_eq!(r.free(), 4);
        r.taken();
        r.taken();
        assert_eq!(r.free(), 2);
        assert_ne!(r.ptr(0), r.ptr(1));
        assert_eq!(r.ptr(1) as usize - r.ptr(0) as usize, 64);
        r.recycle(1);
        r.publish();
        assert_eq!(r.free(), 3);
    }
}
