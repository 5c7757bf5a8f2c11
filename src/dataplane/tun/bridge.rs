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
use crate::access_log::End;
use crate::dataplane::limits::{Activity, ConnLimits};
use crate::dataplane::relay::{both_directions, read, reset, Ended};
use crate::dataplane::session::Session;

/// Relay buffer per direction. Large reads are what bulk throughput through
/// the TUN needs, and at this size the buffer is a lazily-resident mmap (see
/// `app::prepare_process`): measured with benches/compare, 9,700 idle
/// connections cost 243 MiB this way and 745 MiB with 16 KiB heap buffers
/// that grow.
const BUF_SIZE: usize = 256 * 1024;

/// One bridged connection: the client's socket in the stack, the driver to
/// wake when that socket has something to send or more room, and the backend.
#[derive(Clone, Copy)]
struct Bridge<'a> {
    stack: &'a RefCell<Stack>,
    poke: &'a Notify,
    socket: ConnSocket,
    backend: &'a TcpStream,
    session: &'a Session,
    activity: &'a Activity,
}

/// Relays between the connection's smoltcp socket and `backend` under the
/// data plane's close policy (`relay::both_directions`); bytes and how it
/// ended go to `session`.
pub async fn relay(
    stack: &RefCell<Stack>,
    poke: &Notify,
    socket: ConnSocket,
    backend: TcpStream,
    session: &Session,
    limits: &ConnLimits,
) {
    let activity = Activity::default();
    let c = Bridge {
        stack,
        poke,
        socket,
        backend: &backend,
        session,
        activity: &activity,
    };
    let (up, down) = (c.client_to_backend(), c.backend_to_client());
    let ended = both_directions(up, down, &activity, limits).await;
    if ended != End::Fin {
        reset(&backend, &activity);
        c.with_socket(tcp::Socket::abort);
    }
    session.end(ended);
    poke.notify_one();
}

/// A direction of the client's socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Way {
    Recv,
    Send,
}

impl Bridge<'_> {
    /// Runs `f` on the connection's smoltcp socket.
    /// `None` once the socket is gone (never while its relay runs: sockets
    /// are removed only after `release`).
    fn with_socket<R>(&self, f: impl FnOnce(&mut tcp::Socket<'static>) -> R) -> Option<R> {
        self.stack.borrow_mut().tcp(self.socket).map(f)
    }

    /// Waits until the socket has bytes to take (`Recv`) or room for more
    /// (`Send`), or says how that direction ended: the client's FIN ends its
    /// own; anything else (its RST, an aborted or closed socket) is a reset.
    async fn ready(&self, way: Way) -> Result<(), Ended> {
        poll_fn(|cx| {
            self.with_socket(|s| {
                let (can, may) = match way {
                    Way::Recv => (s.can_recv(), s.may_recv()),
                    Way::Send => (s.can_send(), s.may_send()),
                };
                if can {
                    return Poll::Ready(Ok(()));
                }
                // The bridge starts while the handshake completes (SYN-RECEIVED).
                if !may && s.state() != tcp::State::SynReceived {
                    let fin = way == Way::Recv && s.state() != tcp::State::Closed;
                    return Poll::Ready(Err(if fin { Ended::Fin } else { Ended::Reset }));
                }
                match way {
                    Way::Recv => s.register_recv_waker(cx.waker()),
                    Way::Send => s.register_send_waker(cx.waker()),
                }
                Poll::Pending
            })
            .unwrap_or(Poll::Ready(Err(Ended::Reset)))
        })
        .await
    }

    /// Client (smoltcp) → backend.
    async fn client_to_backend(self) -> Ended {
        let (c, backend) = (self, self.backend);
        let mut buf = vec![0u8; BUF_SIZE];
        loop {
            match c.ready(Way::Recv).await {
                Ok(()) => {}
                Err(Ended::Fin) => {
                    let _ = backend.shutdown(Shutdown::Write);
                    return Ended::Fin;
                }
                Err(Ended::Reset) => return Ended::Reset,
            }
            let n = c
                .with_socket(|s| s.recv_slice(&mut buf).unwrap_or(0))
                .unwrap_or(0);
            c.activity.touch();
            // Reading opened the window: let the driver advertise it.
            c.poke.notify_one();
            let (res, slice) = backend.write_all(buf.slice(..n)).await;
            buf = slice.into_inner();
            if res.is_err() {
                return Ended::Reset;
            }
            c.session.to_backend(n);
        }
    }

    /// Backend → client (smoltcp).
    async fn backend_to_client(self) -> Ended {
        let (c, backend) = (self, self.backend);
        let mut buf = vec![0u8; BUF_SIZE];
        loop {
            let (got, b) = read(backend, buf, c.activity).await;
            buf = b;
            let n = match got {
                Ok(n) => n,
                Err(Ended::Fin) => {
                    c.with_socket(tcp::Socket::close);
                    c.poke.notify_one();
                    return Ended::Fin;
                }
                Err(Ended::Reset) => return Ended::Reset,
            };
            let mut off = 0;
            while off < n {
                if c.ready(Way::Send).await.is_err() {
                    return Ended::Reset;
                }
                let rest = buf.get(off..n).unwrap_or_default();
                off += c
                    .with_socket(|s| s.send_slice(rest).unwrap_or(0))
                    .unwrap_or(0);
                c.poke.notify_one();
            }
            c.session.to_client(n);
        }
    }
}
