//! Storage for the smoltcp sockets' receive and send rings, kept for the next
//! connection instead of freed.
//!
//! A ring is `TunSettings::socket_buffer` bytes (1 MiB), a mapping of its
//! own made fresh for every connection and unmapped at the end: with short
//! connections that mmap, munmap (a TLB shootdown each) and the page faults
//! of the first bytes took about 17 % of the TUN thread's time (perf of the
//! `cps` run in BENCHMARKS.md). A ring whose connection moved little has
//! touched only its first pages; those rings go back to a small pool, so
//! resident memory stays bounded (at most [`KEEP`] rings of at most
//! [`REUSE_MAX_BYTES`] touched each per stack) while the next connections
//! skip the mapping. Rings of bulk connections are freed as before.
//!
//! smoltcp sockets borrow their storage for their whole life
//! (`SocketBuffer<'static>`), so a ring is lent as a `'static` slice: the
//! stack removes the socket (which drops the borrow) before it gives the ring
//! back ([`Stack`](super::stack::Stack) keeps that order).

use std::ptr::NonNull;

/// Rings kept per stack at most.
pub const KEEP: usize = 64;

/// A ring is kept only when its connection moved at most this many bytes
/// through it: the pages it touched.
pub const REUSE_MAX_BYTES: u64 = 64 * 1024;

/// One ring's storage, owned here or lent to one socket.
#[derive(Debug)]
pub struct Ring {
    /// An anonymous mapping of its own, owned by this ring.
    ptr: NonNull<[u8]>,
}

impl Ring {
    /// Zeroed storage of `len` bytes (at 1 MiB, untouched zero pages).
    ///
    /// Mapped here rather than taken from the allocator: a ring is resident
    /// only in the pages its bytes touched, where the allocator's block for
    /// an object this size adds a page of its own bookkeeping (mimalloc's
    /// segment header), which doubled what an idle connection's two rings
    /// hold (BENCHMARKS.md, memory per idle ClusterIP connection).
    fn new(len: usize) -> Self {
        let len = len.max(1);
        // SAFETY: a fresh private anonymous mapping; no address is imposed.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        let Some(base) = NonNull::new(p.cast::<u8>()).filter(|_| p != libc::MAP_FAILED) else {
            // As the allocator does when it has no memory left.
            std::alloc::handle_alloc_error(std::alloc::Layout::new::<[u8; 4096]>());
        };
        Ring {
            ptr: NonNull::slice_from_raw_parts(base, len),
        }
    }

    /// The storage as a socket's buffer.
    ///
    /// # Safety
    ///
    /// The slice must be gone (its socket dropped) before this ring is
    /// dropped or lent again; nothing else reads or writes the ring meanwhile.
    pub unsafe fn lend(&mut self) -> &'static mut [u8] {
        // SAFETY: `ptr` is a live mapping owned by this ring; the caller
        // keeps it the one reference (see above).
        unsafe { self.ptr.as_mut() }
    }

    /// Gives the ring's pages back to the kernel: it is resident in none of
    /// them until bytes touch them again (zero-filled then).
    ///
    /// Only for a ring that holds no bytes (its socket's queue empty): what
    /// its storage contained is then never read again before it is written.
    pub fn release_pages(&mut self) {
        // SAFETY: the ring's own mapping; MADV_DONTNEED only replaces its
        // contents with zeroes, which an empty ring's socket never reads
        // before writing (see above).
        unsafe {
            libc::madvise(
                self.ptr.as_ptr().cast(),
                self.ptr.len(),
                libc::MADV_DONTNEED,
            )
        };
    }

    /// Pages of the ring resident now (tests).
    #[cfg(test)]
    pub fn resident_pages(&self) -> usize {
        let page = 4096;
        let mut v = vec![0u8; self.ptr.len().div_ceil(page)];
        // SAFETY: the ring's own mapping, page-aligned; one byte per page.
        let r = unsafe { libc::mincore(self.ptr.as_ptr().cast(), self.ptr.len(), v.as_mut_ptr()) };
        assert_eq!(r, 0);
        v.iter().filter(|b| *b & 1 == 1).count()
    }

    /// Size in bytes.
    pub fn len(&self) -> usize {
        self.ptr.len()
    }

    /// Never: rings have the stack's socket buffer size.
    pub fn is_empty(&self) -> bool {
        self.ptr.is_empty()
    }
}

impl Drop for Ring {
    fn drop(&mut self) {
        // SAFETY: mapped in `new` and not unmapped since; no lent slice
        // outlives its socket (the contract of `lend`).
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.ptr.len()) };
    }
}

/// The rings a stack keeps for its next connections.
#[derive(Debug)]
pub struct RingPool {
    size: usize,
    free: Vec<Ring>,
}

impl RingPool {
    /// A pool of rings of `size` bytes (empty until rings come back).
    pub fn new(size: usize) -> Self {
        RingPool {
            size,
            free: Vec::with_capacity(KEEP),
        }
    }

    /// A ring: a kept one, else a fresh one.
    pub fn take(&mut self) -> Ring {
        self.free.pop().unwrap_or_else(|| Ring::new(self.size))
    }

    /// Takes back a ring whose socket is gone, through which `moved` bytes
    /// went (`None`: unknown). Kept if it touched few pages and the pool has
    /// room; freed otherwise.
    pub fn give_back(&mut self, ring: Ring, moved: Option<u64>) {
        let small = moved.is_some_and(|m| m <= REUSE_MAX_BYTES);
        if small && self.free.len() < KEEP && ring.len() == self.size {
            self.free.push(ring);
        }
    }

    /// Rings kept now.
    pub fn kept(&self) -> usize {
        self.free.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_rings_come_back_and_big_or_unknown_ones_are_freed() {
        let mut pool = RingPool::new(4096);
        let a = pool.take();
        let b = pool.take();
        let c = pool.take();
        let a_at = a.ptr;
        pool.give_back(a, Some(100));
        pool.give_back(b, Some(REUSE_MAX_BYTES + 1));
        pool.give_back(c, None);
        assert_eq!(pool.kept(), 1);
        // The kept ring is the next one lent.
        assert_eq!(pool.take().ptr, a_at);
        assert_eq!(pool.kept(), 0);
    }

    #[test]
    fn the_pool_keeps_at_most_keep_rings() {
        let mut pool = RingPool::new(64);
        let rings: Vec<Ring> = (0..KEEP + 5).map(|_| pool.take()).collect();
        for r in rings {
            pool.give_back(r, Some(1));
        }
        assert_eq!(pool.kept(), KEEP);
    }

    #[test]
    fn released_pages_are_no_longer_resident() {
        let mut pool = RingPool::new(1 << 20);
        let mut r = pool.take();
        assert_eq!(r.resident_pages(), 0, "a fresh ring holds no page");
        // SAFETY: the slice is the ring's only reference and dies here.
        let s = unsafe { r.lend() };
        s[..10_000].fill(7);
        assert_eq!(r.resident_pages(), 3);
        r.release_pages();
        assert_eq!(r.resident_pages(), 0);
        // SAFETY: as above.
        let s = unsafe { r.lend() };
        assert_eq!(s[0], 0, "zero-filled when touched again");
    }

    #[test]
    fn a_lent_ring_holds_what_was_written() {
        let mut pool = RingPool::new(16);
        let mut r = pool.take();
        // SAFETY: the slice is the ring's only reference and dies here.
        let s = unsafe { r.lend() };
        s[15] = 7;
        assert_eq!(s.len(), 16);
        assert_eq!(s[15], 7);
    }
}
