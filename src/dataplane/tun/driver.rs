//! The loop of one TUN queue's thread: reads packets (into pooled buffers,
//! checksums verified where the kernel did not vouch for them) from its
//! queue and its inbox, passes those of flows it does not hold on
//! ([`peer`](super::peer)), sends the others where `packet::classify` says,
//! polls the stack, writes its packets out, and sleeps until the device, its
//! inbox, a task or a timer needs it.

use std::io;
use std::os::fd::OwnedFd;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::unix::AsyncFd;
use tokio::sync::{mpsc, oneshot, watch};

use super::ctx::Ctx;
use super::device::{QueueDevice, Tun};
use super::offload::{self, RxChecksum};
use super::packet::{classify, flow_of, Classified};
use super::peer::{self, Origin, Passed, Route, Unowned};
use super::stack::{Stack, TunSettings};
use super::{tcp, udp};
use crate::dataplane::Shared;
use crate::handover::Pin;
use crate::state::Snapshot;

/// Packets read per round at most, so relays get their turn under load.
const READ_BATCH: usize = 256;

/// What the control loop asks of a TUN thread (the handover).
#[derive(Debug)]
pub enum TunCmd {
    /// Each UDP flow's endpoint, for the next process.
    Pins(oneshot::Sender<Vec<Pin>>),
    /// UDP flows still open (what a drain waits for).
    Flows(oneshot::Sender<usize>),
}

/// One thread's share of the device.
#[derive(Debug)]
pub struct Queue {
    /// Its queue.
    pub tun: Tun,
    /// Its number among the process's TUN threads.
    pub thread: usize,
    /// The receiving end of its inbox (see [`peer`](super::peer)).
    pub inbox: OwnedFd,
    /// The control loop's questions.
    pub cmds: mpsc::UnboundedReceiver<TunCmd>,
    /// Read nothing before the first snapshot: a process taking over holds
    /// its queues before it knows the Services, and a packet answered
    /// against the empty snapshot would be refused.
    pub wait_first: bool,
}

/// Runs the TUN front end on the current tokio-uring thread until `stop` closes.
pub async fn run(
    q: Queue,
    shared: Arc<Shared>,
    settings: TunSettings,
    mut stop: watch::Receiver<Arc<Snapshot>>,
) -> io::Result<()> {
    let Queue {
        tun,
        thread,
        inbox,
        mut cmds,
        wait_first,
    } = q;
    if wait_first && stop.wait_for(|s| s.generation > 0).await.is_err() {
        return Ok(());
    }
    // SAFETY: `Tun` owns its descriptor and closes it only when dropped, which
    // happens after the AsyncFd (its owner) is dropped.
    let fd = unsafe { AsyncFd::register(tun) }?;
    // SAFETY: as above: the AsyncFd owns the descriptor and closes it last.
    let inbox = unsafe { AsyncFd::register(inbox) }?;
    let mut ctx = Ctx::seeded(settings, shared);
    ctx.thread = thread;
    let ctx = Rc::new(ctx);
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
                Ok(_) => ingress(&ctx, buf, Origin::Local, 0),
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
        // Packets passed by the other threads and the other process: their
        // checksums were verified (or vouched for) where they were read.
        for _ in 0..READ_BATCH {
            let mut buf = ctx.stack.borrow_mut().dev.buffer();
            match peer::recv(inbox.get_ref(), &mut buf, rx_max) {
                Ok((origin, hops)) => {
                    if origin == Origin::Peer && hops == 0 {
                        ctx.shared.tun_links.received_from_peer();
                    }
                    ingress(&ctx, buf, origin, hops)
                }
                Err(_) => {
                    ctx.stack.borrow_mut().dev.recycle(buf);
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
            r = inbox.readable() => {
                if let Ok(mut g) = r {
                    g.clear_ready();
                }
            }
            Some(cmd) = cmds.recv() => answer(&ctx, cmd),
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

/// Answers the control loop.
fn answer(ctx: &Ctx, cmd: TunCmd) {
    match cmd {
        TunCmd::Pins(tx) => {
            let pins = ctx
                .flows
                .borrow()
                .open
                .endpoints()
                .map(|((client, frontend), endpoint)| Pin {
                    client,
                    frontend,
                    endpoint,
                })
                .collect();
            let _ = tx.send(pins);
        }
        TunCmd::Flows(tx) => {
            let _ = tx.send(ctx.flows.borrow().len());
        }
    }
}

/// Sends one packet where it belongs: handled here when this thread holds
/// its flow (or it is a SYN), passed to the next thread of the chain when
/// not, and when no thread of this process holds it, to the other process
/// of an upgrade or handled here as [`peer::decide`] says. `hops`: threads
/// it visited before this one.
fn ingress(ctx: &Rc<Ctx>, packet: Vec<u8>, origin: Origin, hops: u8) {
    let Some((key, tcp)) = flow_of(&packet) else {
        return handle(ctx, packet);
    };
    // Held here: a lookup in this thread's own tables (the common case).
    let unheld = match tcp {
        Some(_) if ctx.stack.borrow().holds_conn(&key) => None,
        Some(true) => Some(Unowned::Syn),
        Some(false) => Some(Unowned::Tcp),
        None if ctx.flows.borrow().holds(&key) => None,
        // Pinned or not matters only to `decide`, filled in there.
        None => Some(Unowned::Udp { pinned: false }),
    };
    let links = &ctx.shared.tun_links;
    // A datagram no one here holds is, on a process alone, the first of a
    // new flow (the kernel keeps a flow's packets on one queue while the
    // number of queues stays): the reader opens it, with no hop. Only while
    // another process holds queues too may its flow be elsewhere.
    let unheld = match unheld {
        Some(Unowned::Udp { .. }) if links.peer_role().is_none() => None,
        u => u,
    };
    let what = match peer::route(unheld, ctx.thread, links.threads(), hops) {
        Route::Here => unheld,
        Route::Next { thread, hops } => {
            if links.to_sibling(thread, origin, hops, &packet) != Passed::Nobody {
                // Passed on (or dropped with a full inbox: TCP retransmits).
                ctx.stack.borrow_mut().dev.recycle(packet);
                return;
            }
            unheld
        }
        Route::Nobody => unheld,
    };
    // Only while two processes run: one atomic load otherwise. A SYN and a
    // flow nobody here holds may be the other process's.
    if let (Some(what), Some(role)) = (what, links.peer_role()) {
        let what = match what {
            Unowned::Udp { .. } => Unowned::Udp {
                pinned: ctx.shared.pins.held(key.0, key.1),
            },
            w => w,
        };
        if peer::decide(Some(role), origin, what) && links.to_peer(&key, &packet) != Passed::Nobody
        {
            ctx.stack.borrow_mut().dev.recycle(packet);
            return;
        }
    }
    handle(ctx, packet);
}

/// Handles one packet here.
fn handle(ctx: &Rc<Ctx>, packet: Vec<u8>) {
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
