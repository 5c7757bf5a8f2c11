//! Relays bytes between a smoltcp socket (the client side, on the TUN) and a
//! kernel TCP connection to the backend, with half-close and reset semantics.

use std::future::poll_fn;
use std::net::Shutdown;
use std::rc::Rc;
use std::task::Poll;

use smoltcp::socket::tcp;
use tokio_uring::buf::BoundedBuf;
use tokio_uring::net::TcpStream;

use super::stack::{ConnSocket, Ctx};
use crate::dataplane::limits::{idle_watchdog, Activity};
use crate::dataplane::relay::set_reset_on_close;
use crate::state::Frontend;

/// Relay buffer per direction. Large reads are what bulk throughput through
/// the TUN needs, and at this size the buffer is a lazily-resident mmap (see
/// `app::prepare_process`): measured with benches/compare, 9,700 idle
/// connections cost 243 MiB this way and 745 MiB with 16 KiB heap buffers
/// that grow.
const BUF_SIZE: usize = 256 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ended {
    Fin,
    Reset,
}

/// Relays until both directions are closed; a reset on either side resets both.
pub async fn relay(ctx: &Rc<Ctx>, h: ConnSocket, backend: TcpStream, fe: &Frontend) {
    let backend = Rc::new(backend);
    let activity = Activity::default();
    let up = client_to_backend(ctx, h, &backend, fe, &activity);
    let down = backend_to_client(ctx, h, &backend, fe, &activity);
    let limits = &ctx.shared.limits;
    let idle = idle_watchdog(
        &activity,
        limits.idle_timeout,
        &limits.hits.tcp_idle_timeout,
    );
    tokio::pin!(up, down, idle);
    // A FIN ends one direction; the other runs on. A reset ends both, and so
    // does the idle timeout.
    let both = async {
        tokio::select! {
            r = &mut up => if r == Ended::Reset { r } else { (&mut down).await },
            r = &mut down => if r == Ended::Reset { r } else { (&mut up).await },
        }
    };
    let ended = tokio::select! {
        r = both => r,
        () = &mut idle => Ended::Reset,
    };
    if ended == Ended::Reset {
        set_reset_on_close(&*backend);
        // A backend read or write may still be in flight (its future was
        // dropped, not the io_uring op), which keeps the descriptor open:
        // shutting the socket down completes it, so the close (RST) happens.
        let how = if activity.timed_out() {
            Shutdown::Both
        } else {
            Shutdown::Read
        };
        let _ = backend.shutdown(how);
        with_socket(ctx, h, tcp::Socket::abort);
    }
    ctx.poke.notify_one();
}

/// Runs `f` on the connection's smoltcp socket.
/// `None` once the socket is gone (never while its relay runs: sockets are
/// removed only after `release`).
fn with_socket<R>(
    ctx: &Ctx,
    h: ConnSocket,
    f: impl FnOnce(&mut tcp::Socket<'static>) -> R,
) -> Option<R> {
    ctx.stack.borrow_mut().tcp(h).map(f)
}

/// Client (smoltcp) → backend.
async fn client_to_backend(
    ctx: &Rc<Ctx>,
    h: ConnSocket,
    backend: &TcpStream,
    fe: &Frontend,
    activity: &Activity,
) -> Ended {
    let mut buf = vec![0u8; BUF_SIZE];
    loop {
        let got = poll_fn(|cx| {
            with_socket(ctx, h, |s| {
                if s.can_recv() {
                    return Poll::Ready(Ok(s.recv_slice(&mut buf).unwrap_or(0)));
                }
                // The bridge starts while the handshake completes (SYN-RECEIVED).
                if !s.may_recv() && s.state() != tcp::State::SynReceived {
                    let reset = s.state() == tcp::State::Closed;
                    return Poll::Ready(Err(if reset { Ended::Reset } else { Ended::Fin }));
                }
                s.register_recv_waker(cx.waker());
                Poll::Pending
            })
            .unwrap_or(Poll::Ready(Err(Ended::Reset)))
        })
        .await;
        let n = match got {
            Ok(n) => n,
            Err(Ended::Fin) => {
                let _ = backend.shutdown(Shutdown::Write);
                return Ended::Fin;
            }
            Err(Ended::Reset) => return Ended::Reset,
        };
        activity.touch();
        // Reading opened the window: let the driver advertise it.
        ctx.poke.notify_one();
        let (res, slice) = backend.write_all(buf.slice(..n)).await;
        buf = slice.into_inner();
        if res.is_err() {
            return Ended::Reset;
        }
        fe.metrics.bytes_to_backend.inc_by(n as u64);
    }
}

/// Backend → client (smoltcp).
async fn backend_to_client(
    ctx: &Rc<Ctx>,
    h: ConnSocket,
    backend: &TcpStream,
    fe: &Frontend,
    activity: &Activity,
) -> Ended {
    let mut buf = vec![0u8; BUF_SIZE];
    loop {
        let (res, b) = backend.read(buf).await;
        buf = b;
        let n = match res {
            Ok(0) => {
                with_socket(ctx, h, tcp::Socket::close);
                ctx.poke.notify_one();
                return Ended::Fin;
            }
            Ok(n) => n,
            Err(_) => return Ended::Reset,
        };
        activity.touch();
        let mut off = 0;
        while off < n {
            let sent = poll_fn(|cx| {
                with_socket(ctx, h, |s| {
                    if !s.may_send() && s.state() != tcp::State::SynReceived {
                        return Poll::Ready(None);
                    }
                    if s.can_send() {
                        let rest = buf.get(off..n).unwrap_or_default();
                        return Poll::Ready(Some(s.send_slice(rest).unwrap_or(0)));
                    }
                    s.register_send_waker(cx.waker());
                    Poll::Pending
                })
                .unwrap_or(Poll::Ready(None))
            })
            .await;
            match sent {
                Some(k) => off += k,
                None => return Ended::Reset,
            }
            ctx.poke.notify_one();
        }
        fe.metrics.bytes_to_client.inc_by(n as u64);
    }
}
