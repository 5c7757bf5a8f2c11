//! ringvip's own io_uring engine for the kernel-socket front end: one ring
//! per data-plane thread, beside that thread's tokio-uring runtime (which
//! keeps the control work: listener changes). The ring's
//! descriptor is registered with the runtime's reactor, so one thread waits
//! on both; each wake-up handles every completion posted and submits what
//! they lead to in one system call.
//!
//! - [`ring`]: the ring and the tokens that tie completions to entries;
//! - [`bufring`]: the provided buffer ring receives take buffers from;
//! - [`gso`]: UDP runs received whole (`UDP_GRO`) and sent whole
//!   (`UDP_SEGMENT`);
//! - [`ops`]: the operations submitted;
//! - [`splice`]: pipes for the bulk relay by splice (behind a switch);
//! - [`tcp`]: the NodePort / LoadBalancer / externalIP TCP path on them
//!   (and the owner of the ring, which it shares with the UDP path);
//! - [`udp`]: the same front end's UDP path.

pub mod bufring;
pub mod gso;
pub mod ops;
pub mod ring;
pub mod slots;
pub mod splice;
pub mod tcp;
pub mod udp;

use std::cell::RefCell;
use std::os::fd::{AsRawFd, RawFd};
use std::rc::Rc;

use tokio::io::unix::AsyncFd;
use tokio::io::Interest;

use crate::dataplane::limits::CHECKS;

pub use tcp::{Sizes, Tcp};

/// A thread's engine, shared by its listeners and its driver task.
pub type Engine = Rc<RefCell<Tcp>>;

/// A descriptor owned elsewhere (an engine's ring, a TUN queue), as the
/// reactor sees it.
pub(crate) struct WatchedFd(pub(crate) RawFd);

impl AsRawFd for WatchedFd {
    fn as_raw_fd(&self) -> RawFd {
        self.0
    }
}

/// How often UDP flows are checked for idleness and for endpoints gone.
const UDP_SWEEP: std::time::Duration = std::time::Duration::from_secs(1);

/// Runs `engine` on the current thread's runtime until the runtime stops:
/// completions as they are posted, idle checks on their period.
pub async fn drive(engine: Engine) -> std::io::Result<()> {
    let ring_fd = WatchedFd(engine.borrow().ring_fd());
    // SAFETY: the descriptor is the engine's ring, which this task keeps
    // alive (it holds the engine) for as long as the AsyncFd exists.
    let fd = unsafe { AsyncFd::register_with_interest(ring_fd, Interest::READABLE) }
        .map_err(|e| std::io::Error::other(e.to_string()))?;
    let idle = engine.borrow().idle_timeout();
    let mut tick = idle.map(|t| tokio::time::interval(t / CHECKS));
    let mut udp_tick = tokio::time::interval(UDP_SWEEP);
    loop {
        let check = async {
            match &mut tick {
                Some(t) => {
                    t.tick().await;
                }
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            guard = fd.readable() => {
                let mut guard = guard?;
                engine.borrow_mut().poll();
                // Completions posted after the poll re-arm readiness
                // themselves (the reactor keeps the newer event).
                guard.clear_ready();
                engine.borrow_mut().poll();
            }
            () = check => engine.borrow_mut().idle_check(),
            _ = udp_tick.tick() => engine.borrow_mut().udp_sweep(std::time::Instant::now()),
        }
    }
}
