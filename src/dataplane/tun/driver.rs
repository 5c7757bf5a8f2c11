//! The loop of one TUN queue's thread: reads packets (into pooled buffers,
//! checksums verified where the kernel did not vouch for them), sends each
//! where `packet::classify` says, polls the stack, writes its packets out,
//! and sleeps until the device, a task or a timer needs it.

use std::io;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::unix::AsyncFd;
use tokio::sync::watch;

use super::ctx::Ctx;
use super::device::{QueueDevice, Tun};
use super::offload::{self, RxChecksum};
use super::packet::{classify, Classified};
use super::stack::{Stack, TunSettings};
use super::{tcp, udp};
use crate::dataplane::Shared;
use crate::state::Snapshot;

/// Packets read per round at most, so relays get their turn under load.
const READ_BATCH: usize = 256;

/// Runs the TUN front end on the current tokio-uring thread until `stop` closes.
pub async fn run(
    tun: Tun,
    shared: Arc<Shared>,
    settings: TunSettings,
    mut stop: watch::Receiver<Arc<Snapshot>>,
) -> io::Result<()> {
    // SAFETY: `Tun` owns its descriptor and closes it only when dropped, which
    // happens after the AsyncFd (its owner) is dropped.
    let fd = unsafe { AsyncFd::register(tun) }?;
    let ctx = Rc::new(Ctx::seeded(settings, shared));
    let mut sweep = tokio::time::interval(Duration::from_secs(1));
    // Whatever the MTU, a TSO super-packet can be 64 KiB of IPv6 payload
    // plus its header.
    let rx_max = settings.mtu.max(usize::from(u16::MAX) + 40);
    loop {
        let mut drained = false;
        for _ in 0..READ_BATCH {
            let mut buf = ctx.stack.borrow_mut().dev.buffer();
            match fd.get_ref().recv(&mut buf, rx_max) {
                Ok(RxChecksum::Unverified) if !offload::verify(&buf) => {
                    ctx.stack.borrow_mut().dev.recycle(buf);
                }
                Ok(_) => ingress(&ctx, buf),
                Err(e) => {
                    ctx.stack.borrow_mut().dev.recycle(buf);
                    if e.kind() != io::ErrorKind::WouldBlock {
                        tracing::warn!(error = %e, "reading the TUN failed");
                    }
                    drained = true;
                    break;
                }
            }
        }
        let delay = {
            let mut st = ctx.stack.borrow_mut();
            st.poll();
            st.reap();
            flush(&fd, &mut st);
            st.next_due().map(|d| {
                let t = smoltcp::time::Instant::now();
                if d > t {
                    d - t
                } else {
                    smoltcp::time::Duration::ZERO
                }
            })
        };
        if !drained {
            // Packets are still waiting: readiness is edge-triggered, so no new
            // wake-up would come for them. Let other tasks run, then read on.
            tokio::task::yield_now().await;
            continue;
        }
        let wait_write = ctx.stack.borrow().dev.tx_len() > 0;
        let sleep = tokio::time::sleep(delay.map_or(Duration::from_millis(100), |d| {
            Duration::from_micros(d.total_micros())
        }));
        tokio::select! {
            r = fd.readable() => {
                if let Ok(mut g) = r {
                    g.clear_ready();
                }
            }
            r = fd.writable(), if wait_write => {
                if let Ok(mut g) = r {
                    g.clear_ready();
                }
            }
            _ = ctx.poke.notified() => {}
            _ = sleep => {}
            _ = sweep.tick() => {
                let dead = ctx.flows.borrow_mut().open.expire(std::time::Instant::now());
                crate::dataplane::udp::end_all(dead, crate::access_log::End::IdleTimeout);
            }
            r = stop.changed() => if r.is_err() { return Ok(()) },
        }
    }
}

/// Writes the stack's queued packets to the TUN until it would block.
fn flush(fd: &AsyncFd<Tun>, st: &mut Stack) {
    while let Some(mut p) = st.dev.pop_tx() {
        // Only segments larger than any MSS can need cutting.
        let mss = match offload::tcp_flow(&p) {
            Some((key, len)) if len > 536 => st.client_mss(&key),
            _ => None,
        };
        let dev: &mut QueueDevice = &mut st.dev;
        match fd.get_ref().send(&mut p, mss) {
            Ok(_) => dev.recycle(p),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                dev.unpop_tx(p);
                return;
            }
            Err(e) => {
                tracing::debug!(error = %e, "writing to the TUN failed");
                dev.recycle(p);
            }
        }
    }
}

/// Sends one packet from the TUN where it belongs.
fn ingress(ctx: &Rc<Ctx>, packet: Vec<u8>) {
    match classify(&ctx.shared.snapshot.load(), &packet) {
        Classified::Stack => ctx.stack.borrow_mut().push_rx(packet),
        Classified::Drop => ctx.stack.borrow_mut().dev.recycle(packet),
        Classified::Syn { key, fe } => tcp::syn(ctx, key, fe, packet),
        Classified::Udp { key, fe, payload } => {
            if let Some(data) = packet.get(payload) {
                udp::ingress(ctx, key, fe, data);
            }
            ctx.stack.borrow_mut().dev.recycle(packet);
        }
    }
}
