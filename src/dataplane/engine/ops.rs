//! The io_uring operations the TCP and UDP paths submit, built from plain
//! descriptors and the engine's own memory (which outlives each operation).

use std::os::fd::RawFd;

use io_uring::types::{CancelBuilder, Fd, Timespec};
use io_uring::{opcode, squeue};
use socket2::SockAddr;

/// Accept connections on `listener` until it fails or is shut down
/// (one submission, a completion per connection).
pub fn accept_multi(listener: RawFd) -> squeue::Entry {
    opcode::AcceptMulti::new(Fd(listener))
        .flags(libc::SOCK_CLOEXEC)
        .build()
}

/// A one-shot timer (`ts` must live until the operation is submitted).
pub fn timeout(ts: &Timespec) -> squeue::Entry {
    opcode::Timeout::new(ts).build()
}

/// Connect `sock` to `addr`, linked to the timeout that must follow it
/// ([`connect_timeout`]): `addr` must live until submission (the kernel
/// copies it when it takes the operation).
pub fn connect(sock: RawFd, addr: &SockAddr) -> squeue::Entry {
    opcode::Connect::new(Fd(sock), addr.as_ptr().cast(), addr.len())
        .build()
        .flags(squeue::Flags::IO_LINK)
}

/// Cancels the connect before it when `ts` elapses (the connect then
/// completes with `ECANCELED`).
pub fn connect_timeout(ts: &Timespec) -> squeue::Entry {
    opcode::LinkTimeout::new(ts).build()
}

/// Receive from `sock` into a buffer the kernel picks from `group` when
/// bytes arrive (none is held while the socket is quiet).
pub fn recv(sock: RawFd, group: u16, max: u32) -> squeue::Entry {
    opcode::Recv::new(Fd(sock), std::ptr::null_mut(), max)
        .buf_group(group)
        .build()
        .flags(squeue::Flags::BUFFER_SELECT)
}

/// Send `len` bytes at `ptr` on `sock` (no SIGPIPE on a reset peer).
pub fn send(sock: RawFd, ptr: *const u8, len: u32) -> squeue::Entry {
    opcode::Send::new(Fd(sock), ptr, len)
        .flags(libc::MSG_NOSIGNAL)
        .build()
}

/// Closes `fd` (the caller gave up ownership of it).
pub fn close(fd: RawFd) -> squeue::Entry {
    opcode::Close::new(Fd(fd)).build()
}

/// Cancels every operation pending on `sock`.
pub fn cancel_all(sock: RawFd) -> squeue::Entry {
    opcode::AsyncCancel2::new(CancelBuilder::fd(Fd(sock)).all()).build()
}

/// Receive datagrams on `sock` until cancelled or failed, each into a buffer
/// the kernel picks from `group` (one submission, a completion per
/// datagram). Each buffer starts with the `io_uring_recvmsg_out` header and
/// the source address, laid out by `msg`'s name length (`msg` must live
/// until the operation ends).
pub fn recv_msg_multi(sock: RawFd, msg: *const libc::msghdr, group: u16) -> squeue::Entry {
    opcode::RecvMsgMulti::new(Fd(sock), msg, group).build()
}

/// Receive on the connected `sock` until cancelled or failed, each datagram
/// into a buffer the kernel picks from `group`.
pub fn recv_multi(sock: RawFd, group: u16) -> squeue::Entry {
    opcode::RecvMulti::new(Fd(sock), group).build()
}

/// Send the message `msg` describes on `sock` (`msg`, its address and its
/// iovec must live until the operation completes).
pub fn send_msg(sock: RawFd, msg: *const libc::msghdr) -> squeue::Entry {
    opcode::SendMsg::new(Fd(sock), msg)
        .flags(libc::MSG_NOSIGNAL as u32)
        .build()
}

/// Completes once `sock` is ready for `mask` (`POLLIN`, `POLLOUT`; errors
/// and hang-ups always), once.
pub fn poll(sock: RawFd, mask: i16) -> squeue::Entry {
    opcode::PollAdd::new(Fd(sock), mask as u32).build()
}
