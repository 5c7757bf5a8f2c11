//! Bulk relay by `splice(2)` through a pipe pair: the bytes a socket
//! received move into a pipe and from it into the other socket as page
//! references, never copied through user memory (what HAProxy does in
//! `mode tcp` with splicing on). The engine waits for readiness on its ring
//! (a one-shot poll) and splices with non-blocking calls when it is ready.
//!
//! Pipes are taken from a per-thread pool only while a direction has bytes
//! in flight, and given back once empty, so an idle relay holds no pipe.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

/// Bytes a pipe is asked to hold (the kernel default is 64 KiB; larger
/// pipes move more per call). Best effort: `fs.pipe-max-size` may refuse.
const PIPE_SIZE: i32 = 256 * 1024;

/// Pipes kept for reuse at most; beyond it an emptied pipe is closed.
const POOL_MAX: usize = 64;

/// One pipe pair and the bytes it holds.
#[derive(Debug)]
pub struct Pipe {
    r: OwnedFd,
    w: OwnedFd,
    /// Bytes spliced in and not yet out.
    pub len: u32,
}

impl Pipe {
    fn new() -> io::Result<Self> {
        let mut fds = [0; 2];
        // SAFETY: `fds` has room for the two descriptors pipe2 writes.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC | libc::O_NONBLOCK) } < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: pipe2 succeeded: both are new descriptors we own.
        let (r, w) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        // SAFETY: a plain fcntl on a descriptor we own.
        unsafe { libc::fcntl(w.as_raw_fd(), libc::F_SETPIPE_SZ, PIPE_SIZE) };
        Ok(Self { r, w, len: 0 })
    }

    /// Moves up to the pipe's room from socket `from` into the pipe: the
    /// bytes moved (0 at end of stream), `WouldBlock` when nothing is queued.
    pub fn fill(&mut self, from: RawFd) -> io::Result<u32> {
        let n = splice(from, self.w.as_raw_fd(), PIPE_SIZE as usize)?;
        self.len += n;
        Ok(n)
    }

    /// Moves what the pipe holds into socket `to`: the bytes moved,
    /// `WouldBlock` when `to` has no room.
    pub fn drain(&mut self, to: RawFd) -> io::Result<u32> {
        let n = splice(self.r.as_raw_fd(), to, self.len as usize)?;
        self.len -= n.min(self.len);
        Ok(n)
    }
}

fn splice(from: RawFd, to: RawFd, len: usize) -> io::Result<u32> {
    // SAFETY: plain descriptors, no offsets (sockets and pipes have none).
    let n = unsafe {
        libc::splice(
            from,
            std::ptr::null_mut(),
            to,
            std::ptr::null_mut(),
            len,
            libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK,
        )
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n as u32)
}

/// Empty pipes for reuse.
#[derive(Debug, Default)]
pub struct Pool {
    pipes: Vec<Pipe>,
}

impl Pool {
    /// An empty pipe (from the pool, or a new one).
    pub fn take(&mut self) -> io::Result<Pipe> {
        match self.pipes.pop() {
            Some(p) => Ok(p),
            None => Pipe::new(),
        }
    }

    /// Gives `p` back; a pipe still holding bytes is closed instead.
    pub fn give(&mut self, p: Pipe) {
        if p.len == 0 && self.pipes.len() < POOL_MAX {
            self.pipes.push(p);
        }
    }
}

/// Makes `fd` non-blocking (splice on a socket follows the socket's own
/// flag, not `SPLICE_F_NONBLOCK`).
pub fn set_nonblocking(fd: RawFd) -> io::Result<()> {
    // SAFETY: fcntl on a live descriptor the caller owns.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: as above.
    if unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::os::unix::net::UnixStream;

    #[test]
    fn bytes_move_through_a_pipe_and_an_empty_source_would_block() {
        let (mut a, b) = UnixStream::pair().unwrap();
        let (c, mut d) = UnixStream::pair().unwrap();
        b.set_nonblocking(true).unwrap();
        let mut pool = Pool::default();
        let mut p = pool.take().unwrap();
        a.write_all(b"hello").unwrap();
        assert_eq!(p.fill(b.as_raw_fd()).unwrap(), 5);
        assert_eq!(p.len, 5);
        assert_eq!(p.drain(c.as_raw_fd()).unwrap(), 5);
        assert_eq!(p.len, 0);
        let mut got = [0u8; 5];
        d.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"hello");
        let e = p.fill(b.as_raw_fd()).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::WouldBlock);
        drop(a);
        assert_eq!(p.fill(b.as_raw_fd()).unwrap(), 0);
        pool.give(p);
        assert_eq!(pool.pipes.len(), 1);
    }
}
