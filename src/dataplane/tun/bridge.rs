//! Relays bytes between a smoltcp socket (the client side, on the TUN) and a
//! kernel TCP connection to the backend, with half-close and reset semantics.
//!
//! Bytes move between the kernel socket and the smoltcp socket's own rings:
//! a non-blocking `send(2)` straight from the receive ring, a `recv(2)`
//! straight into the free part of the send ring, waiting on the backend's
//! readiness (epoll) when it has nothing or takes nothing. No relay buffer,
//! no copy between the rings and a buffer, and nothing left in flight when a
//! direction's future is dropped.

use std::cell::RefCell;
use std::future::poll_fn;
use std::io;
use std::net::Shutdown;
use std::task::Poll;

use smoltcp::socket::tcp;
use socket2::SockRef;
use tokio::net::TcpStream;
use tokio::sync::Notify;

use super::conns::ConnSocket;
use super::stack::Stack;
use crate::access_log::End;
use crate::dataplane::limits::{Activity, ConnLimits};
use crate::dataplane::relay::{both_directions, set_reset_on_close, Ended};
use crate::dataplane::session::Session;

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
/// ended go to `session`. Says how it ended.
pub async fn relay(
    stack: &RefCell<Stack>,
    poke: &Notify,
    socket: ConnSocket,
    backend: TcpStream,
    session: &Session,
    limits: &ConnLimits,
) -> End {
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
        // Dropped below: the backend sees RST.
        set_reset_on_close(&backend);
        c.with_socket(tcp::Socket::abort);
    }
    session.end(ended);
    poke.notify_one();
    ended
}

/// What one non-blocking transfer between the rings and the backend did.
enum Moved {
    /// This many bytes (0 from the backend: its FIN).
    Bytes(usize),
    /// The backend has nothing to give or no room: wait for its readiness.
    Blocked,
    /// The backend failed, or the smoltcp socket is gone or closed.
    Failed,
}

impl Moved {
    fn of(res: io::Result<usize>) -> (usize, Self) {
        match res {
            Ok(n) => (n, Moved::Bytes(n)),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => (0, Moved::Blocked),
            Err(_) => (0, Moved::Failed),
        }
    }
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
        loop {
            match c.ready(Way::Recv).await {
                Ok(()) => {}
                Err(Ended::Fin) => {
                    let _ = SockRef::from(backend).shutdown(Shutdown::Write);
                    return Ended::Fin;
                }
                Err(Ended::Reset) => return Ended::Reset,
            }
            // The contiguous bytes at the head of the receive ring, straight
            // into the backend; what it takes leaves the ring.
            let moved = c.with_socket(|s| {
                s.recv(|ring| Moved::of(backend.try_write(ring)))
                    .unwrap_or(Moved::Failed)
            });
            match moved.unwrap_or(Moved::Failed) {
                Moved::Bytes(n) => {
                    c.activity.touch();
                    c.stack.borrow_mut().touch(c.socket);
                    // Reading opened the window: let the driver advertise it.
                    c.poke.notify_one();
                    c.session.to_backend(n);
                }
                Moved::Blocked => {
                    if backend.writable().await.is_err() {
                        return Ended::Reset;
                    }
                }
                Moved::Failed => return Ended::Reset,
            }
        }
    }

    /// Backend → client (smoltcp).
    async fn backend_to_client(self) -> Ended {
        let (c, backend) = (self, self.backend);
        loop {
            if c.ready(Way::Send).await.is_err() {
                return Ended::Reset;
            }
            // Straight from the backend into the free space of the send ring.
            let moved = c.with_socket(|s| {
                s.send(|ring| Moved::of(backend.try_read(ring)))
                    .unwrap_or(Moved::Failed)
            });
            match moved.unwrap_or(Moved::Failed) {
                Moved::Bytes(0) => {
                    c.with_socket(tcp::Socket::close);
                    c.poke.notify_one();
                    return Ended::Fin;
                }
                Moved::Bytes(n) => {
                    c.activity.touch();
                    c.stack.borrow_mut().touch(c.socket);
                    c.poke.notify_one();
                    c.session.to_client(n);
                }
                Moved::Blocked => {
                    if backend.readable().await.is_err() {
                        return Ended::Reset;
                    }
                }
                Moved::Failed => return Ended::Reset,
            }
        }
    }
}
