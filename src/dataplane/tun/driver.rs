//! The loop of one TUN queue's thread: takes the packets its reads in flight
//! on io_uring brought in ([`uring`](super::uring): pooled buffers,
//! checksums verified where the kernel did not vouch for them, UDP
//! super-packets cut) and those of its inbox, passes those of flows it does
//! not hold on ([`peer`](super::peer)), sends the others where
//! `packet::classify` says, polls the stack, queues its packets for the wire
//! and submits those writes with the re-armed reads in one system call, and
//! sleeps until its queue, its inbox, a task or a timer needs it.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use std::time::Instant;

use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use tokio::sync::{mpsc, oneshot, watch};

use super::ctx::Ctx;
use super::device::Tun;
use super::offload::{self, RxChecksum};
use super::packet::{classify, flow_of, Classified};
use super::peer::{self, Origin, Passed, Route, Unowned};
use super::stack::{Stack, TunSettings};
use super::uring::{Done, Received, TunIo};
use super::{tcp, udp};
use crate::dataplane::engine::WatchedFd;
use crate::dataplane::Shared;
use crate::handover::Pin;
use crate::state::Snapshot;

/// Packets read from the inbox per round at most, so relays get their turn
/// under load (the queue's own reads are bounded by `uring::READS`).
const READ_BATCH: usize = 256;

/// How often quiet connections' rings give their pages back
/// ([`Stack::trim_idle`]): a connection idle for one to two periods holds
/// no ring memory.
const TRIM_PERIOD: Duration = Duration::from_millis(250);

/// How long reads wait after one failed before they are armed again.
const READ_BACKOFF: Duration = Duration::from_millis(100);

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

/// Runs the TUN front end on the current thread's runtime (a current-thread
/// tokio runtime with a `LocalSet`) until `stop` closes.
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
    // Whatever the MTU, a TSO super-packet can be 64 KiB of IPv6 payload
    // plus its header.
    let rx_max = settings.mtu.max(usize::from(u16::MAX) + 40);
    // Declared after `tun`, so the ring (and its reads in flight on the
    // queue) goes first.
    let mut io = TunIo::new(&tun, rx_max)?;
    // The queue's readiness, from the reactor: a packet arriving on a quiet
    // queue wakes the sleeping thread directly. Nothing watches the ring:
    // every operation on it completes within its submit (`uring`).
    // SAFETY: `tun` owns the descriptor and outlives this AsyncFd (declared
    // before it, dropped after it).
    let queue =
        unsafe { AsyncFd::register_with_interest(WatchedFd(tun.as_raw_fd()), Interest::READABLE) }
            .map_err(|e| io::Error::other(e.to_string()))?;
    // SAFETY: the AsyncFd owns the descriptor and closes it last.
    let inbox = unsafe { AsyncFd::register(inbox) }?;
    let mut ctx = Ctx::seeded(settings, shared);
    ctx.thread = thread;
    let ctx = Rc::new(ctx);
    let mut sweep = tokio::time::interval(Duration::from_secs(1));
    let mut trim = tokio::time::interval(TRIM_PERIOD);
    // Reads are not re-armed before this after one failed (a queue that
    // fails every read must not spin the thread).
    let mut reads_held_until: Option<Instant> = None;
    // The inbox may hold packets: it was readable and not read empty since.
    let mut inbox_ready = true;
    // The queue became readable while the thread slept.
    let mut queue_woke = false;
    loop {
        // Completions a submit did not hand over at once (none expected).
        io.complete(|done| completed(&ctx, done, &mut reads_held_until));
        // Packets came to a quiet queue: read them now, in this round.
        if std::mem::take(&mut queue_woke) && reads_held_until.is_none() {
            {
                let dev = &mut ctx.stack.borrow_mut().dev;
                io.arm(|| dev.buffer());
            }
            if io.submit().is_ok() {
                io.complete(|done| completed(&ctx, done, &mut reads_held_until));
            }
        }
        // Packets passed by the other threads and the other process: their
        // checksums were verified (or vouched for) where they were read.
        let mut inbox_drained = !inbox_ready;
        for _ in 0..READ_BATCH {
            if inbox_drained {
                break;
            }
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
                    inbox_drained = true;
                }
            }
        }
        inbox_ready = !inbox_drained;
        // The round's intake is in: its datagrams go to their backends.
        udp::send_taken(&ctx);
        // The relays this poll wakes forward what it took in before the
        // round's writes go out (the ACKs to clients run their TCP receive
        // in this thread): a request reaches its backend first.
        ctx.stack.borrow_mut().poll();
        tokio::task::yield_now().await;
        let (delay, reads) = {
            let mut st = ctx.stack.borrow_mut();
            st.poll();
            st.reap();
            let mut reads = 0;
            if reads_held_until.is_none_or(|t| Instant::now() >= t) {
                reads_held_until = None;
                let dev = &mut st.dev;
                reads = io.arm(|| dev.buffer());
            }
            flush(&mut io, &mut st);
            let delay = st.next_due().map(|d| {
                let t = smoltcp::time::Instant::now();
                if d > t {
                    d - t
                } else {
                    smoltcp::time::Duration::ZERO
                }
            });
            (delay, reads)
        };
        // What the reactor knows of the queue before these reads go in: if
        // they find it empty, that readiness is spent (its packets were
        // read) and is cleared, so the thread sleeps instead of waking at
        // once for an empty read. A packet arriving after the reads is a
        // new event, which clearing this one does not touch.
        let before = match queue.poll_read_ready(&mut Context::from_waker(Waker::noop())) {
            Poll::Ready(Ok(g)) if reads > 0 => Some(g),
            _ => None,
        };
        // One system call for the round's writes and re-armed reads, which
        // complete within it.
        if let Err(e) = io.submit() {
            tracing::debug!(error = %e, "submitting to the TUN's ring failed");
        }
        let read = io.complete(|done| completed(&ctx, done, &mut reads_held_until));
        if let Some(mut g) = before {
            if !io.readable() {
                g.clear_ready();
            }
        }
        if !inbox_drained {
            // Packets are still waiting: readiness is edge-triggered, so no new
            // wake-up would come for them. Let other tasks run, then read on.
            tokio::task::yield_now().await;
        }
        // Packets taken in this round's end, or left in the inbox: another
        // round at once (after the branches below that are ready too).
        let more = read > 0 || !inbox_drained;
        let mut wait = delay.map_or(Duration::from_millis(100), |d| {
            Duration::from_micros(d.total_micros())
        });
        if let Some(t) = reads_held_until {
            wait = wait.min(t.saturating_duration_since(Instant::now()));
        }
        let sleep = tokio::time::sleep(wait);
        let quiet = !io.readable() && reads_held_until.is_none();
        tokio::select! {
            _ = std::future::ready(()), if more => {}
            // Cleared before the reads it calls for, so a packet arriving
            // after them wakes the loop again.
            r = queue.readable(), if quiet => {
                if let Ok(mut g) = r {
                    g.clear_ready();
                }
                io.maybe_readable();
                queue_woke = true;
            }
            r = inbox.readable() => {
                if let Ok(mut g) = r {
                    g.clear_ready();
                }
                inbox_ready = true;
            }
            Some(cmd) = cmds.recv() => answer(&ctx, cmd),
            _ = ctx.poke.notified() => {}
            _ = sleep => io.maybe_readable(),
            _ = trim.tick() => ctx.stack.borrow_mut().trim_idle(),
            _ = sweep.tick() => {
                let dead = ctx.flows.borrow_mut().open.expire(Instant::now());
                crate::dataplane::udp::end_all(dead, crate::access_log::End::IdleTimeout);
            }
            r = stop.changed() => if r.is_err() { return Ok(()) },
        }
    }
}

/// One completion of the queue's ring: a packet read goes its way, a
/// written or failed buffer back to the pool; a failed read holds the reads
/// back for a while.
fn completed(ctx: &Rc<Ctx>, done: Done, reads_held_until: &mut Option<Instant>) {
    match done {
        Done::Read(r) => receive(ctx, r),
        Done::Wrote(buf, r) => {
            if let Err(e) = r {
                tracing::debug!(error = %e, "writing to the TUN failed");
            }
            ctx.stack.borrow_mut().dev.recycle(buf);
        }
        Done::ReadFailed(buf, e) => {
            ctx.stack.borrow_mut().dev.recycle(buf);
            if e.raw_os_error() != Some(libc::ECANCELED) {
                tracing::warn!(error = %e, "reading the TUN failed");
                *reads_held_until = Some(Instant::now() + READ_BACKOFF);
            }
        }
    }
}

/// A packet read from the queue: checksum verified where the kernel did not
/// vouch for it, a UDP super-packet cut into its datagrams, then on its way.
fn receive(ctx: &Rc<Ctx>, r: Received) {
    let Received {
        packet,
        checksum,
        udp_gso,
    } = r;
    match (udp_gso, checksum) {
        // The kernel builds super-packets with a partial checksum; one it
        // does not vouch for cannot be verified piece by piece.
        (Some(_), RxChecksum::Unverified) => {}
        (Some(size), _) => {
            offload::split_udp(
                &packet,
                size,
                || ctx.stack.borrow_mut().dev.buffer(),
                |p| ingress(ctx, p, Origin::Local, 0),
            );
        }
        (None, RxChecksum::Unverified) if !offload::verify(&packet) => {}
        (None, _) => return ingress(ctx, packet, Origin::Local, 0),
    }
    ctx.stack.borrow_mut().dev.recycle(packet);
}

/// Queues the stack's packets for the wire, as many as there are write slots.
fn flush(io: &mut TunIo, st: &mut Stack) {
    while io.write_room() > 0 {
        let Some(p) = st.dev.pop_tx() else { return };
        // Only segments larger than any MSS can need cutting.
        let mss = match offload::tcp_flow(&p) {
            Some((key, len)) if len > 536 => st.client_mss(&key),
            _ => None,
        };
        if let Err(p) = io.write(p, mss) {
            st.dev.unpop_tx(p);
            return;
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
