//! Relays bytes between a smoltcp socket (the client side, on the TUN) and a
//! kernel TCP connection to the backend, with half-close and reset semantics.

use std::cell::RefCell;
use std::future::poll_fn;
use std::net::Shutdown;
use std::task::Poll;

use smoltcp::socket::tcp;
use tokio::sync::Notify;
use tokio_uring::buf::BoundedBuf;
use tokio_uring::net::TcpStream;

use super::conns::ConnSocket;
use super::stack::Stack;
use crate::dataplane::limits::{Activity, ConnLimits};
use crate::dataplane::relay::{both_directions, reset, Ended};
use crate::state::Frontend;

/// Relay buffer per direction. Large reads are what bulk throughput through
/// the TUN needs, and at this size the buffer is a lazily-resident mmap (see
/// `app::prepare_process`): measured with benches/compare, 9,700 idle
/// connections cost 243 MiB this way and 745 MiB with 16 KiB heap buffers
/// that grow.
const BUF_SIZE: usize = 256 * 1024;

/// The client side of a bridged connection: its socket in the stack, and the
/// driver to wake when the socket has something to send or more room.
#[derive(Clone, Copy)]
struct Client<'a> {
    stack: &'a RefCell<Stack>,
    poke: &'a Notify,
    socket: ConnSocket,
}

/// Relays between the connection's smoltcp socket and `backend` under the
/// data plane's close policy (`relay::both_directions`).
pub async fn relay(
    stack: &RefCell<Stack>,
    poke: &Notify,
    socket: ConnSocket,
    backend: TcpStream,
    fe: &Frontend,
    limits: &ConnLimits,
) {
    let c = Client {
        stack,
        poke,
        socket,
    };
    let activity = Activity::default();
    let up = client_to_backend(c, &backend, fe, &activity);
    let down = backend_to_client(c, &backend, fe, &activity);
    if both_directions(up, down, &activity, limits).await == Ended::Reset {
        reset(&backend, &activity);
        c.with_socket(tcp::Socket::abort);
    }
    poke.notify_one();
}

impl Client<'_> {
    /// Runs `f` on the connection's smoltcp socket.
    /// `None` once the socket is gone (never while its relay runs: sockets
    /// are removed only after `release`).
    fn with_socket<R>(&self, f: impl FnOnce(&mut tcp::Socket<'static>) -> R) -> Option<R> {
        self.stack.borrow_mut().tcp(self.socket).map(f)
    }
}

/// Client (smoltcp) → backend.
async fn client_to_backend(
    c: Client<'_>,
    backend: &TcpStream,
    fe: &Frontend,
    activity: &Activity,
) -> Ended {
    let mut buf = vec![0u8; BUF_SIZE];
    loop {
        let got = poll_fn(|cx| {
            c.with_socket(|s| {
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
        c.poke.notify_one();
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
    c: Client<'_>,
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
                c.with_socket(tcp::Socket::close);
                c.poke.notify_one();
                return Ended::Fin;
            }
            Ok(n) => n,
            Err(_) => return Ended::Reset,
        };
        activity.touch();
        let mut off = 0;
        while off < n {
            let sent = poll_fn(|cx| {
                c.with_socket(|s| {
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
            c.poke.notify_one();
        }
        fe.metrics.bytes_to_client.inc_by(n as u64);
    }
}
