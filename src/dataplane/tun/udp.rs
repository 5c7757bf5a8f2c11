//! UDP flows of the ClusterIP front end: a client datagram is sent to its
//! flow's backend socket, the flow opened on its first datagram (with the
//! kernel-socket path's `open_backend`); replies leave the TUN from the VIP.

use std::rc::{Rc, Weak};
use std::sync::Arc;
use std::time::Instant;

use tokio::net::UdpSocket;

use super::ctx::Ctx;
use super::packet::{udp_packet, ConnKey};
use crate::access_log::End;
use crate::dataplane::engine::gso::Cmsg;
use crate::dataplane::session::Session;
use crate::dataplane::udp::{connect_to, end_all, open_backend, register, try_send, FlowEntry};
use crate::state::Frontend;

/// Forwards one client datagram, opening the flow if needed.
pub fn ingress(ctx: &Rc<Ctx>, key: ConnKey, fe: Arc<Frontend>, data: &[u8]) {
    let now = Instant::now();
    let generation = ctx.shared.snapshot.load().generation;
    let mut flows = ctx.flows.borrow_mut();
    // Re-pin a flow whose endpoint left the usable set.
    if let Some(f) = flows.open.get_mut(&key) {
        if !f.revalidate(generation, |ep| fe.endpoints.contains(ep)) {
            end_all(flows.open.remove(&key), End::EndpointGone);
        }
    }
    if let Some(f) = flows.open.get_mut(&key) {
        f.last_seen = now;
        // Sent when the round's intake ends, with the flow's other datagrams
        // of the round (`send_taken`).
        ctx.taken.borrow_mut().push(key, data);
        return;
    }
    // A flow being set up takes the datagram in its queue (or drops it when
    // the queue is full): one flow per key, set up once.
    if flows.opening.contains(&key) {
        let _ = flows.opening.offer(key, data);
        return;
    }
    if !flows.room() {
        return;
    }
    let _ = flows.opening.offer(key, data);
    drop(flows);
    tokio::task::spawn_local(open(ctx.clone(), key, fe, now, generation));
}

/// Sends the datagrams of open flows this round took in: per flow, in the
/// order they came, a run of same-sized ones as one `UDP_SEGMENT` send (one
/// trip through the kernel's UDP output for the run; the backend still gets
/// each datagram as it was sent). A datagram the socket buffer cannot take
/// is dropped, as UDP may be; one whose flow ended meanwhile too.
pub fn send_taken(ctx: &Ctx) {
    let mut taken = ctx.taken.borrow_mut();
    if taken.is_empty() {
        return;
    }
    let flows = ctx.flows.borrow();
    taken.drain(|key, bytes, size, count| {
        let Some(f) = flows.open.get(&key) else {
            return;
        };
        let sent = send_run(&f.io.socket, bytes, size, count);
        if sent > 0 {
            f.io.session.to_backend(sent);
        }
    });
}

/// Sends `count` datagrams of `size` bytes (the last possibly shorter) laid
/// back to back in `bytes`; the bytes sent.
fn send_run(sock: &UdpSocket, bytes: &[u8], size: usize, count: usize) -> usize {
    if count == 1 {
        return try_send(sock, bytes).unwrap_or(0);
    }
    match u16::try_from(size).map(|seg| send_segmented(sock, bytes, seg)) {
        Ok(Ok(n)) => return n,
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::WouldBlock => return 0,
        // A route without segmentation offload: one by one.
        _ => {}
    }
    // `size` is never 0 here (an empty datagram is a run alone).
    bytes
        .chunks(size.max(1))
        .filter_map(|d| try_send(sock, d).ok())
        .sum()
}

/// One non-blocking `sendmsg` of `bytes` on the connected `sock`, cut by
/// the kernel into datagrams of `seg` bytes.
fn send_segmented(sock: &UdpSocket, bytes: &[u8], seg: u16) -> std::io::Result<usize> {
    use std::os::fd::AsRawFd;
    let mut cmsg = Cmsg::default();
    let mut iov = libc::iovec {
        iov_base: bytes.as_ptr().cast_mut().cast(),
        iov_len: bytes.len(),
    };
    // SAFETY: zeroed is a valid msghdr (no name, no iovecs, no control).
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cmsg.as_mut_ptr();
    msg.msg_controllen = cmsg.segment(seg) as _;
    // SAFETY: the descriptor is `sock`'s; `msg` points at `iov` (over
    // `bytes`, which the kernel only reads) and `cmsg`, all alive for the call.
    let n = unsafe { libc::sendmsg(sock.as_raw_fd(), &msg, libc::MSG_DONTWAIT) };
    usize::try_from(n).map_err(|_| std::io::Error::last_os_error())
}

/// Sets up the backend socket of a new flow, then sends the datagrams that
/// arrived meanwhile; on failure they are dropped with the flow.
async fn open(ctx: Rc<Ctx>, key: ConnKey, fe: Arc<Frontend>, now: Instant, generation: u64) {
    // A flow the previous process relayed (an upgrade) keeps its endpoint.
    let pinned = ctx
        .shared
        .pins
        .get(key.0, key.1, now)
        .filter(|ep| fe.endpoints.contains(ep));
    let opened = match pinned {
        Some(ep) => connect_to(ep).and_then(|s| Ok((ep, Rc::new(register(ep, s)?)))),
        None => open_backend(&fe, key.0.ip(), &ctx.shared, &ctx.rng, now),
    };
    let (ep, sock) = match opened {
        Ok(o) => o,
        Err(e) => {
            tracing::debug!(client = %key.0, vip = %key.1, "{e}");
            ctx.flows.borrow_mut().opening.abandon(&key);
            return;
        }
    };
    let session = Rc::new(Session::open(&ctx.shared, fe, key.0, key.1, ep));
    let reader = tokio::task::spawn_local(replies(
        ctx.clone(),
        key,
        sock.clone(),
        Rc::downgrade(&session),
    ));
    let entry = FlowEntry::opened(ep, sock.clone(), reader, session.clone(), now, generation);
    let mut flows = ctx.flows.borrow_mut();
    let queued = flows.opening.finish(&key);
    // Room was counted for this flow while it opened.
    if let Err(e) = flows.open.insert(key, entry) {
        e.io.ended(End::Limit);
        return;
    }
    drop(flows);
    for datagram in queued {
        if let Ok(n) = try_send(&sock, &datagram) {
            session.to_backend(n);
        }
    }
}

/// Replies a flow takes per wake-up before the driver writes them: a
/// backend's burst waits in its socket's buffer, not in the device's queue.
const REPLY_BATCH: usize = 16;

/// Backend → client: replies leave the TUN from the VIP. The datagrams
/// waiting are taken per wake-up (up to [`REPLY_BATCH`]), then the driver
/// is poked once to write them.
async fn replies(ctx: Rc<Ctx>, key: ConnKey, sock: Rc<UdpSocket>, session: Weak<Session>) {
    let mut buf = vec![0u8; 65_536];
    'flow: while sock.readable().await.is_ok() {
        let mut took = 0;
        while took < REPLY_BATCH {
            let n = match sock.try_recv(&mut buf) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                // The backend refused (ICMP) or the socket failed: the flow ends.
                Err(_) => break 'flow,
            };
            // Gone once the flow is removed (this task is then aborted too).
            let Some(session) = session.upgrade() else {
                return;
            };
            took += 1;
            let mut st = ctx.stack.borrow_mut();
            let mut out = st.dev.buffer();
            let payload = buf.get(..n).unwrap_or_default();
            if udp_packet(key.1, key.0, payload, &mut out).is_some() {
                st.dev.push_tx(out);
                session.to_client(n);
            } else {
                st.dev.recycle(out);
            }
        }
        if took > 0 {
            ctx.flows.borrow_mut().open.touch(&key, Instant::now());
            ctx.poke.notify_one();
        }
        if took == REPLY_BATCH {
            // More may wait (the socket stays readable): the driver writes
            // this batch first.
            tokio::task::yield_now().await;
        }
    }
    let gone = ctx.flows.borrow_mut().open.remove(&key);
    end_all(gone, End::Reset);
}

#[cfg(test)]
mod tests {
    use std::rc::Rc;

    use super::*;
    use crate::config::DataPlaneOptions;
    use crate::dataplane::tun::TunSettings;
    use crate::dataplane::Shared;
    use crate::testing::tun::sample_snapshot;

    /// Shared state holding the sample snapshot, and its first frontend.
    fn sample_shared() -> (Arc<Shared>, Arc<Frontend>) {
        let shared = Shared::new(DataPlaneOptions::default());
        shared.snapshot.store(Arc::new(sample_snapshot(true)));
        let snap = shared.snapshot.load();
        let Some((_, fe)) = snap.frontends().next() else {
            panic!("no frontend")
        };
        let fe = fe.clone();
        (shared, fe)
    }

    #[test]
    fn a_backends_burst_reaches_the_device_a_batch_at_a_time() {
        let (shared, fe) = sample_shared();
        crate::testing::run_local(async {
            let ctx = Rc::new(Ctx::seeded(TunSettings::default(), shared.clone()));
            let backend = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
            let ep = backend.local_addr().unwrap();
            let sock = register(ep, connect_to(ep).unwrap()).unwrap();
            backend.connect(sock.local_addr().unwrap()).unwrap();
            let burst = 2 * REPLY_BATCH + 3;
            for i in 0..burst {
                backend.send(&[i as u8]).unwrap();
            }
            let key = (([10, 1, 0, 5], 5353).into(), ([10, 96, 0, 10], 53).into());
            let session = Rc::new(Session::open(&ctx.shared, fe, key.0, key.1, ep));
            let reader = tokio::task::spawn_local(replies(
                ctx.clone(),
                key,
                Rc::new(sock),
                Rc::downgrade(&session),
            ));
            // What the device holds each time the reply task has had a turn.
            let mut seen = Vec::new();
            for _ in 0..1000 {
                tokio::task::yield_now().await;
                let queued = ctx.stack.borrow().dev.tx_len();
                if seen.last() != Some(&queued) {
                    seen.push(queued);
                }
                if queued == burst {
                    break;
                }
            }
            reader.abort();
            assert_eq!(
                seen,
                vec![0, REPLY_BATCH, 2 * REPLY_BATCH, burst],
                "the burst should come in batches"
            );
        });
    }

    /// A flow of `ctx` whose backend socket sends to `backend`.
    fn open_flow(ctx: &Rc<Ctx>, key: ConnKey, fe: Arc<Frontend>, backend: &std::net::UdpSocket) {
        let ep = backend.local_addr().unwrap();
        let sock = Rc::new(register(ep, connect_to(ep).unwrap()).unwrap());
        let session = Rc::new(Session::open(&ctx.shared, fe, key.0, key.1, ep));
        let reader = tokio::task::spawn_local(async {});
        // Opened under the current snapshot: not re-checked against its endpoints.
        let generation = ctx.shared.snapshot.load().generation;
        let entry = FlowEntry::opened(ep, sock, reader, session, Instant::now(), generation);
        assert!(ctx.flows.borrow_mut().open.insert(key, entry).is_ok());
    }

    #[test]
    fn a_rounds_datagrams_of_a_flow_go_to_the_backend_as_one_send() {
        use crate::dataplane::engine::gso::{enable_gro, segment_size, CMSG_ROOM};
        use std::os::fd::AsRawFd;
        let (shared, fe) = sample_shared();
        crate::testing::run_local(async {
            let ctx = Rc::new(Ctx::seeded(TunSettings::default(), shared.clone()));
            // One backend takes runs whole (UDP_GRO), as a kernel socket may;
            // the other, as most do, datagram by datagram.
            let whole = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
            enable_gro(whole.as_raw_fd()).unwrap();
            let plain = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
            plain
                .set_read_timeout(Some(std::time::Duration::from_secs(2)))
                .unwrap();
            let k1 = (([10, 1, 0, 5], 5353).into(), ([10, 96, 0, 10], 53).into());
            let k2 = (([10, 1, 0, 6], 5353).into(), ([10, 96, 0, 10], 53).into());
            open_flow(&ctx, k1, fe.clone(), &whole);
            open_flow(&ctx, k2, fe.clone(), &plain);
            // One round's intake, the two flows interleaved.
            for i in 0..5u8 {
                ingress(&ctx, k1, fe.clone(), &[i; 64]);
                ingress(&ctx, k2, fe.clone(), &[b'a' + i; 64]);
            }
            ingress(&ctx, k2, fe.clone(), b"end");
            send_taken(&ctx);
            // The first flow's five came as one send: one message, cut at 64.
            let mut buf = [0u8; 2048];
            let mut ctl = [0u8; CMSG_ROOM];
            let mut iov = libc::iovec {
                iov_base: buf.as_mut_ptr().cast(),
                iov_len: buf.len(),
            };
            // SAFETY: zeroed is a valid msghdr; its pointers are set below.
            let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
            msg.msg_iov = &mut iov;
            msg.msg_iovlen = 1;
            msg.msg_control = ctl.as_mut_ptr().cast();
            msg.msg_controllen = ctl.len();
            // SAFETY: a live socket; `msg` points at `buf` and `ctl`.
            let n = unsafe { libc::recvmsg(whole.as_raw_fd(), &mut msg, libc::MSG_DONTWAIT) };
            assert_eq!(n, 5 * 64, "the run was not one send");
            let ctl_len = msg.msg_controllen;
            assert_eq!(segment_size(&ctl[..ctl_len]), Some(64));
            let sent: Vec<u8> = (0..5u8).flat_map(|i| [i; 64]).collect();
            assert_eq!(&buf[..5 * 64], &sent[..]);
            // The second flow's datagrams arrive one by one, in order, as sent.
            for i in 0..5u8 {
                let n = plain.recv(&mut buf).unwrap();
                assert_eq!(&buf[..n], &[b'a' + i; 64][..]);
            }
            let n = plain.recv(&mut buf).unwrap();
            assert_eq!(&buf[..n], b"end");
            // Each flow's session counted its bytes.
            let flows = ctx.flows.borrow();
            let Some(f) = flows.open.get(&k2) else {
                panic!("flow gone")
            };
            assert_eq!(f.io.session.bytes().0, 5 * 64 + 3);
        });
    }
}
