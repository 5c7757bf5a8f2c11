//! How a relayed TCP connection ends, the same on every front end, and the
//! kernel-socket relay. A FIN ends one direction and the other runs on
//! (half-close); a reset or an error on either side resets both; no byte
//! either way for the idle timeout resets both. The TUN bridge
//! (`tun::bridge`) follows the same policy through [`both_directions`] and
//! [`reset`].

use std::future::Future;
use std::net::Shutdown;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::rc::Rc;

use socket2::SockRef;
use tokio_uring::buf::BoundedBuf;
use tokio_uring::net::TcpStream;

use super::limits::{idle_watchdog, Activity, ConnLimits};
use super::session::Session;
use crate::access_log::End;

/// Relay buffer per direction: starts small, grows with the traffic. An idle
/// connection holds two of these (io_uring reads own their buffer while they
/// wait); 512 bytes cost a bulk stream seven extra reads while it grows.
const BUF_START: usize = 512;
/// Largest relay buffer per direction.
const BUF_MAX: usize = 64 * 1024;

/// Doubles `buf` (up to `max`) when a read of `n` bytes filled it: an idle
/// connection costs a few KiB, a bulk transfer soon gets large reads.
pub fn grow(buf: &mut Vec<u8>, n: usize, max: usize) {
    if n == buf.len() && buf.len() < max {
        let size = (buf.len() * 2).min(max);
        buf.resize(size, 0);
    }
}

/// Closes a TCP socket with RST instead of FIN when it is dropped.
pub fn set_reset_on_close(fd: &impl AsRawFd) {
    // SAFETY: `fd` is borrowed from a live socket object for this whole call,
    // so the descriptor stays open while the BorrowedFd exists.
    let borrowed = unsafe { BorrowedFd::borrow_raw(fd.as_raw_fd()) };
    let sock = SockRef::from(&borrowed);
    let _ = sock.set_linger(Some(std::time::Duration::ZERO));
}

/// How one direction of a relay, or the whole relay, ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    /// The sender closed its side: passed on as a half-close.
    Fin,
    /// A reset, an error, or the idle timeout.
    Reset,
}

/// Runs both directions of a relay under the close policy: a FIN ends one
/// direction and the other runs on; a reset of either ends both; so does the
/// idle timeout (counted in `limits`). Says why the relay ended:
/// [`End::Fin`] (both directions closed), [`End::Reset`] or
/// [`End::IdleTimeout`]; anything but `Fin` is to be passed on as a reset.
/// A direction still running when the relay ends is dropped: its I/O still
/// in flight is the caller's to wake, which [`reset`] does.
pub async fn both_directions(
    up: impl Future<Output = Ended>,
    down: impl Future<Output = Ended>,
    activity: &Activity,
    limits: &ConnLimits,
) -> End {
    tokio::pin!(up, down);
    let both = async {
        tokio::select! {
            r = &mut up => if r == Ended::Reset { r } else { (&mut down).await },
            r = &mut down => if r == Ended::Reset { r } else { (&mut up).await },
        }
    };
    let idle = idle_watchdog(activity, limits.idle_timeout, &limits.hits.tcp_idle_timeout);
    tokio::select! {
        r = both => match r {
            Ended::Fin => End::Fin,
            Ended::Reset => End::Reset,
        },
        () = idle => End::IdleTimeout,
    }
}

/// Resets a kernel TCP socket of a relay that ended with [`Ended::Reset`]:
/// it closes with RST, and a read or write of a dropped direction still in
/// flight in the ring (which keeps the descriptor open) completes now. After
/// the idle timeout both ways are shut, so a write stuck on a full peer
/// completes too.
pub fn reset(sock: &TcpStream, activity: &Activity) {
    set_reset_on_close(sock);
    let how = if activity.timed_out() {
        Shutdown::Both
    } else {
        Shutdown::Read
    };
    let _ = sock.shutdown(how);
}

/// Relays bytes between a client and a backend, both kernel sockets, until
/// both directions are closed (see the module's close policy); bytes and
/// how it ended go to `session`.
pub async fn relay(
    client: TcpStream,
    backend: TcpStream,
    session: Rc<Session>,
    limits: &ConnLimits,
) {
    let client = Rc::new(client);
    let backend = Rc::new(backend);
    let activity = Rc::new(Activity::default());
    // Its own task: each direction then runs as soon as its I/O completes.
    let up = tokio_uring::spawn(copy(
        client.clone(),
        backend.clone(),
        (session.clone(), Session::to_backend),
        activity.clone(),
    ));
    let down = copy(
        backend.clone(),
        client.clone(),
        (session.clone(), Session::to_client),
        activity.clone(),
    );
    let up = async { up.await.unwrap_or(Ended::Reset) };
    let ended = both_directions(up, down, &activity, limits).await;
    if ended != End::Fin {
        reset(&client, &activity);
        reset(&backend, &activity);
    }
    session.end(ended);
}

/// Reads what a kernel socket of a relay has into `buf`: the byte count, or
/// how its direction ended (its FIN; a reset, an error, or reading shut down
/// by [`reset`] after the idle timeout). Bytes read count as activity.
pub async fn read(
    from: &TcpStream,
    buf: Vec<u8>,
    activity: &Activity,
) -> (Result<usize, Ended>, Vec<u8>) {
    let (res, buf) = from.read(buf).await;
    let got = match res {
        // Not the peer's FIN: the relay shut reading down.
        Ok(0) if activity.timed_out() => Err(Ended::Reset),
        Ok(0) => Err(Ended::Fin),
        Ok(n) => {
            activity.touch();
            Ok(n)
        }
        Err(_) => Err(Ended::Reset),
    };
    (got, buf)
}

/// Copies `from` → `to`. On EOF, half-closes `to`; on an error, reports a
/// reset (the relay resets both sockets).
async fn copy(
    from: Rc<TcpStream>,
    to: Rc<TcpStream>,
    (session, count): (Rc<Session>, fn(&Session, usize)),
    activity: Rc<Activity>,
) -> Ended {
    let mut buf = vec![0u8; BUF_START];
    loop {
        let (got, b) = read(&from, buf, &activity).await;
        buf = b;
        let n = match got {
            Ok(n) => n,
            Err(Ended::Fin) => {
                let _ = to.shutdown(Shutdown::Write);
                return Ended::Fin;
            }
            Err(Ended::Reset) => return Ended::Reset,
        };
        let (res, slice) = to.write_all(buf.slice(..n)).await;
        buf = slice.into_inner();
        if res.is_err() {
            return Ended::Reset;
        }
        count(&session, n);
        grow(&mut buf, n, BUF_MAX);
    }
}

#[cfg(test)]
mod tests {
    use super::grow;

    #[test]
    fn buffers_grow_only_when_filled() {
        let mut b = vec![0u8; 4];
        grow(&mut b, 3, 16);
        assert_eq!(b.len(), 4);
        grow(&mut b, 4, 16);
        assert_eq!(b.len(), 8);
        grow(&mut b, 8, 16);
        grow(&mut b, 16, 16);
        assert_eq!(b.len(), 16);
    }
}
