//! The process's heap: mimalloc (the global allocator, chosen in
//! `main.rs`), and handing its freed pages back to the kernel at a moment
//! ringvip chooses.

/// Hands the pages freed so far back to the kernel now. mimalloc otherwise
/// purges them 1 s after they are freed, inside whichever allocation or
/// free comes next: after the first snapshot at 10,000 Services that was a
/// file reload's, 9 ms of `madvise` in a reload of 0.5 ms (and with glibc,
/// `malloc_trim` was needed to give the first list's pages back at all).
/// Takes milliseconds after a large first load: call it off the control
/// loop's task. Without mimalloc as the allocator (unit tests) it finds
/// nothing to do.
pub fn release_free_memory() {
    // SAFETY: mi_collect takes no pointer; it walks mimalloc's own
    // structures, and may be called from any thread at any time.
    unsafe { libmimalloc_sys::mi_collect(true) }
}
