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
        // A datagram the socket buffer cannot take is dropped, as UDP may be.
        if let Ok(n) = try_send(&f.io.socket, data) {
            f.io.session.to_backend(n);
        }
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

    #[test]
    fn a_backends_burst_reaches_the_device_a_batch_at_a_time() {
        let shared = Shared::new(DataPlaneOptions::default());
        shared.snapshot.store(Arc::new(sample_snapshot(true)));
        let snap = shared.snapshot.load();
        let Some((_, fe)) = snap.frontends().next() else {
            panic!("no frontend")
        };
        let fe = fe.clone();
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
}
