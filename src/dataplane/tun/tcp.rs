//! TCP connections of the ClusterIP front end: a SYN for a frontend with
//! usable endpoints is held while a backend connect runs; a backend that
//! accepts gets the SYN answered and the connection bridged to it, otherwise
//! the SYN is refused.

use std::rc::Rc;
use std::sync::Arc;

use super::bridge;
use super::ctx::Ctx;
use super::packet::ConnKey;
use super::stack::{Refusal, SynVerdict};
use crate::access_log::End;
use crate::dataplane::connect::{connect, proxy_header};
use crate::dataplane::session::{self, Session};
use crate::state::Frontend;

/// Takes a SYN for `fe` (a frontend with usable endpoints).
pub fn syn(ctx: &Rc<Ctx>, key: ConnKey, fe: Arc<Frontend>, packet: Vec<u8>) {
    if ctx.stack.borrow_mut().syn(key, packet) == SynVerdict::Hold {
        tokio::task::spawn_local(open(ctx.clone(), key, fe));
    }
}

/// Connects to a backend for a held SYN, then answers it and relays (or
/// refuses it).
async fn open(ctx: Rc<Ctx>, key: ConnKey, fe: Arc<Frontend>) {
    // Over --max-connections(-per-frontend): the SYN is dropped, no SYN-ACK
    // or RST, as with --tun-max-connections.
    let Some(_slot) = ctx.shared.limits.admit(&fe) else {
        ctx.stack.borrow_mut().refuse(&key, Refusal::Silently);
        session::refused(&ctx.shared, &fe, key.0, key.1, End::Limit);
        return;
    };
    let connected = match connect(&fe, key.0.ip(), &ctx.shared, &ctx.rng).await {
        Ok((mut backend, ep)) => proxy_header(&fe, &mut backend, key.0, key.1)
            .await
            .map(|()| (backend, ep))
            .map_err(|e| format!("PROXY header to {ep} not written: {e}")),
        Err(e) => Err(e.to_string()),
    };
    let (backend, ep) = match connected {
        Ok(connected) => connected,
        Err(e) => {
            tracing::debug!(client = %key.0, "{e}");
            ctx.stack.borrow_mut().refuse(&key, Refusal::Reset);
            ctx.poke.notify_one();
            session::refused(&ctx.shared, &fe, key.0, key.1, End::NoBackend);
            return;
        }
    };
    let Some(socket) = ctx.stack.borrow_mut().accept(key) else {
        return;
    };
    ctx.poke.notify_one();
    let session = Session::open(&ctx.shared, fe, key.0, key.1, ep);
    let ended = bridge::relay(
        &ctx.stack,
        &ctx.poke,
        socket,
        backend,
        &session,
        &ctx.shared.limits,
    )
    .await;
    // Ended by FIN both ways, everything that came in went out: the bytes
    // say how much of each ring was touched.
    let moved = (ended == End::Fin).then(|| session.bytes());
    drop(session);
    ctx.stack.borrow_mut().release(key, socket, moved);
    ctx.poke.notify_one();
}

#[cfg(test)]
mod tests {
    use rand::SeedableRng;

    use super::*;
    use crate::config::DataPlaneOptions;
    use crate::dataplane::tun::TunSettings;
    use crate::dataplane::Shared;
    use crate::testing::tun::{sample_snapshot, syn as syn_packet};

    #[test]
    fn syns_refused_by_max_connections_leave_nothing_behind() {
        // A SYN flood from spoofed sources while --max-connections is reached:
        // every SYN is held, then refused. Each once left its client MSS
        // behind for good.
        let shared = Shared::new(DataPlaneOptions {
            max_connections: 1,
            ..Default::default()
        });
        shared.snapshot.store(Arc::new(sample_snapshot(true)));
        let snap = shared.snapshot.load();
        let Some((_, fe)) = snap.frontends().next() else {
            panic!("no frontend")
        };
        let slot = shared.limits.admit(fe).expect("the one slot");
        crate::testing::run_local(async {
            let ctx = Rc::new(Ctx::new(
                TunSettings::default(),
                shared.clone(),
                rand::rngs::SmallRng::seed_from_u64(1),
            ));
            for port in 1000..1100u16 {
                let key = (([10, 1, 0, 5], port).into(), ([10, 96, 0, 10], 80).into());
                syn(&ctx, key, fe.clone(), syn_packet(key));
                assert_eq!(ctx.stack.borrow().client_mss(&key), Some(1460));
            }
            // The refusals run in the spawned tasks, on their first poll.
            for _ in 0..10 {
                tokio::task::yield_now().await;
            }
            let st = ctx.stack.borrow();
            assert_eq!(st.connections(), 0, "held SYNs left behind");
            assert_eq!(
                st.client_mss(&(([10, 1, 0, 5], 1000).into(), ([10, 96, 0, 10], 80).into())),
                None
            );
        });
        drop(slot);
    }
}
