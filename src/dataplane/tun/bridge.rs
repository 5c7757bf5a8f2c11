//! Relays bytes between a smoltcp socket (the client side, on the TUN) and a
//! kernel TCP connection to the backend, with half-close and reset semantics.

use std::future::poll_fn;
use std::net::Shutdown;
use std::rc::Rc;
use std::task::Poll;

use smoltcp::iface::SocketHandle;
use smoltcp::socket::tcp;
use tokio_uring::buf::BoundedBuf;
use tokio_uring::net::TcpStream;

use super::stack::Ctx;
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
pub async fn relay(ctx: &Rc<Ctx>, h: SocketHandle, backend: TcpStream, fe: &Frontend) {
    fe.metrics.connections_total.inc();
    fe.metrics.connections_active.inc();
    let backend = Rc::new(backend);
    let up = std::pin::pin!(client_to_backend(ctx, h, &backend, fe));
    let down = std::pin::pin!(backend_to_client(ctx, h, &backend, fe));
    let ended = match futures_select(up, down).await {
        (Ended::Reset, _) => Ended::Reset,
        (Ended::Fin, other) => other.await,
    };
    if ended == Ended::Reset {
        set_reset_on_close(&*backend);
        ctx.stack
            .borrow_mut()
            .sockets
            .get_mut::<tcp::Socket>(h)
            .abort();
    }
    ctx.poke.notify_one();
    fe.metrics.connections_active.dec();
}

/// Waits for the first of two futures; returns its output and the other one.
async fn futures_select<'a, A, B>(
    mut a: std::pin::Pin<&'a mut A>,
    mut b: std::pin::Pin<&'a mut B>,
) -> (
    Ended,
    std::pin::Pin<&'a mut dyn std::future::Future<Output = Ended>>,
)
where
    A: std::future::Future<Output = Ended> + 'a,
    B: std::future::Future<Output = Ended> + 'a,
{
    enum Which {
        A(Ended),
        B(Ended),
    }
    let w = poll_fn(|cx| {
        if let Poll::Ready(r) = a.as_mut().poll(cx) {
            return Poll::Ready(Which::A(r));
        }
        if let Poll::Ready(r) = b.as_mut().poll(cx) {
            return Poll::Ready(Which::B(r));
        }
        Poll::Pending
    })
    .await;
    match w {
        Which::A(r) => (r, b),
        Which::B(r) => (r, a),
    }
}

/// Client (smoltcp) → backend.
async fn client_to_backend(
    ctx: &Rc<Ctx>,
    h: SocketHandle,
    backend: &TcpStream,
    fe: &Frontend,
) -> Ended {
    let mut buf = vec![0u8; BUF_SIZE];
    loop {
        let got = poll_fn(|cx| {
            let mut st = ctx.stack.borrow_mut();
            let s = st.sockets.get_mut::<tcp::Socket>(h);
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
        .await;
        let n = match got {
            Ok(n) => n,
            Err(Ended::Fin) => {
                let _ = backend.shutdown(Shutdown::Write);
                return Ended::Fin;
            }
            Err(Ended::Reset) => return Ended::Reset,
        };
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
    h: SocketHandle,
    backend: &TcpStream,
    fe: &Frontend,
) -> Ended {
    let mut buf = vec![0u8; BUF_SIZE];
    loop {
        let (res, b) = backend.read(buf).await;
        buf = b;
        let n = match res {
            Ok(0) => {
                ctx.stack
                    .borrow_mut()
                    .sockets
                    .get_mut::<tcp::Socket>(h)
                    .close();
                ctx.poke.notify_one();
                return Ended::Fin;
            }
            Ok(n) => n,
            Err(_) => return Ended::Reset,
        };
        let mut off = 0;
        while off < n {
            let sent = poll_fn(|cx| {
                let mut st = ctx.stack.borrow_mut();
                let s = st.sockets.get_mut::<tcp::Socket>(h);
                if !s.may_send() && s.state() != tcp::State::SynReceived {
                    return Poll::Ready(None);
                }
                if s.can_send() {
                    return Poll::Ready(Some(s.send_slice(&buf[off..n]).unwrap_or(0)));
                }
                s.register_send_waker(cx.waker());
                Poll::Pending
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
