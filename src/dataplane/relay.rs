//! How a relayed TCP connection ends, the same on every front end. A FIN
//! ends one direction and the other runs on (half-close); a reset or an
//! error on either side resets both; no byte either way for the idle timeout
//! resets both. The TUN bridge (`tun::bridge`) follows the policy through
//! [`both_directions`] and [`set_reset_on_close`]; the kernel-socket engine
//! (`engine::tcp`) implements the same one on its completions.

use std::future::Future;
use std::os::fd::{AsRawFd, BorrowedFd};

use socket2::SockRef;

use super::limits::{idle_watchdog, Activity, ConnLimits};
use crate::access_log::End;

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
/// A direction still running when the relay ends is dropped; its I/O must
/// be readiness-based (nothing left in flight once its future is gone).
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
