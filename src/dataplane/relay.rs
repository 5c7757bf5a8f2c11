//! Upstream connect with retry, and the byte relay between a client and a
//! backend, shared by every front end.

use std::cell::RefCell;
use std::net::{IpAddr, Shutdown, SocketAddr};
use std::os::fd::{AsRawFd, BorrowedFd};
use std::rc::Rc;
use std::time::Instant;

use rand::rngs::SmallRng;
use socket2::SockRef;
use tokio_uring::buf::BoundedBuf;
use tokio_uring::net::TcpStream;

use super::flow::{connect_timeout, pick};
use super::limits::{idle_watchdog, Activity, ConnLimits};
use super::Shared;
use crate::state::Frontend;
use crate::telemetry::ConnectFailure;

/// Relay buffer per direction: starts small, grows with the traffic. An idle
/// connection holds two of these (io_uring reads own their buffer while they
/// wait); 512 bytes cost a bulk stream seven extra reads while it grows.
const BUF_START: usize = 512;
/// Largest relay buffer per direction.
const BUF_MAX: usize = 64 * 1024;

/// Doubles `buf` (up to `max`) when a read of `n` bytes filled it: an idle
/// connection costs a few KiB, a bulk transfer soon gets large reads.
pub fn grow(buf: &mut Vec<u8>, n: usize, max: usize) {
    if n == buf.len() && buf.len() < max {
        let size = (buf.len() * 2).min(max);
        buf.resize(size, 0);
    }
}

/// Every connect try failed.
#[derive(Debug, thiserror::Error)]
#[error("{service} port {port:?}: no backend accepted after {attempts} tries (last: {last:?})")]
pub struct ConnectError {
    /// The Service.
    pub service: String,
    /// Port name.
    pub port: String,
    /// Tries made.
    pub attempts: u32,
    /// Reason of the last failure.
    pub last: ConnectFailure,
}

/// Connects to a backend of `fe`, retrying other endpoints with growing
/// timeouts. On success after a retry, affinity follows the backend that answered.
pub async fn connect(
    fe: &Frontend,
    client: IpAddr,
    shared: &Shared,
    rng: &RefCell<SmallRng>,
) -> Result<(TcpStream, SocketAddr), ConnectError> {
    let s = &shared.settings;
    let mut tried: Vec<SocketAddr> = Vec::new();
    let mut last = ConnectFailure::NoEndpoints;
    for attempt in 0..s.connect_attempts {
        let now = Instant::now();
        let Some(ep) = pick(
            fe,
            client,
            shared,
            attempt,
            &tried,
            now,
            &mut *rng.borrow_mut(),
        ) else {
            break;
        };
        let limit = connect_timeout(s.connect_timeout, attempt);
        match tokio::time::timeout(limit, TcpStream::connect(ep)).await {
            Ok(Ok(stream)) => {
                if attempt > 0 {
                    if let Some(t) = fe.affinity {
                        shared.affinity.record(fe.port_id, client, ep, t, now);
                    }
                }
                let _ = stream.set_nodelay(true);
                shared.health.succeeded(ep);
                return Ok((stream, ep));
            }
            Ok(Err(e)) => {
                last = ConnectFailure::from_io(&e);
                tracing::debug!(service = %fe.service, endpoint = %ep, error = %e, "backend connect failed");
            }
            Err(_) => {
                last = ConnectFailure::Timeout;
                tracing::debug!(service = %fe.service, endpoint = %ep, "backend connect timed out");
            }
        }
        fe.metrics.connect_failure(last);
        shared.health.failed(ep, Instant::now());
        tried.push(ep);
    }
    Err(ConnectError {
        service: fe.service.to_string(),
        port: fe.port_name.clone(),
        attempts: tried.len() as u32,
        last,
    })
}

/// Closes a TCP socket with RST instead of FIN when it is dropped.
pub fn set_reset_on_close(fd: &impl AsRawFd) {
    // SAFETY: `fd` is borrowed from a live socket object for this whole call,
    // so the descriptor stays open while the BorrowedFd exists.
    let borrowed = unsafe { BorrowedFd::borrow_raw(fd.as_raw_fd()) };
    let sock = SockRef::from(&borrowed);
    let _ = sock.set_linger(Some(std::time::Duration::ZERO));
}

/// Relays bytes both ways until both directions are closed. A FIN is passed on
/// as a half-close; a reset or error on either side resets both. With no byte
/// either way for the idle timeout, both sides are reset.
pub async fn relay(client: TcpStream, backend: TcpStream, fe: &Frontend, limits: &ConnLimits) {
    let client = Rc::new(client);
    let backend = Rc::new(backend);
    let activity = Rc::new(Activity::default());
    let up = tokio_uring::spawn(copy(
        client.clone(),
        backend.clone(),
        fe.metrics.bytes_to_backend.clone(),
        activity.clone(),
    ));
    let down = copy(
        backend.clone(),
        client.clone(),
        fe.metrics.bytes_to_client.clone(),
        activity.clone(),
    );
    let both = async {
        let down = down.await;
        (up.await.unwrap_or(Ended::Reset), down)
    };
    let watchdog = async {
        idle_watchdog(
            &activity,
            limits.idle_timeout,
            &limits.hits.tcp_idle_timeout,
        )
        .await;
        // Wake both copies, reads and writes stuck on a full peer alike;
        // they see the idle flag and end as a reset.
        set_reset_on_close(&*client);
        set_reset_on_close(&*backend);
        let _ = client.shutdown(Shutdown::Both);
        let _ = backend.shutdown(Shutdown::Both);
        std::future::pending::<()>().await;
    };
    let (up, down) = tokio::select! {
        r = both => r,
        () = watchdog => (Ended::Reset, Ended::Reset),
    };
    if up == Ended::Reset || down == Ended::Reset {
        set_reset_on_close(&*client);
        set_reset_on_close(&*backend);
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ended {
    Fin,
    Reset,
}

/// Copies `from` → `to`. On EOF, half-closes `to`. On any error, makes both
/// sockets reset on close and wakes the opposite direction by shutting down
/// reading on both, so it ends too.
async fn copy(
    from: Rc<TcpStream>,
    to: Rc<TcpStream>,
    bytes: prometheus_client::metrics::counter::Counter,
    activity: Rc<Activity>,
) -> Ended {
    let mut buf = vec![0u8; BUF_START];
    loop {
        let (res, b) = from.read(buf).await;
        buf = b;
        let n = match res {
            // The idle watchdog shut reading down: not the peer's FIN.
            Ok(0) if activity.timed_out() => return Ended::Reset,
            Ok(0) => {
                let _ = to.shutdown(Shutdown::Write);
                return Ended::Fin;
            }
            Ok(n) => n,
            Err(_) => break,
        };
        activity.touch();
        let (res, slice) = to.write_all(buf.slice(..n)).await;
        buf = slice.into_inner();
        if res.is_err() {
            break;
        }
        bytes.inc_by(n as u64);
        grow(&mut buf, n, BUF_MAX);
    }
    set_reset_on_close(&*from);
    set_reset_on_close(&*to);
    let _ = from.shutdown(Shutdown::Read);
    let _ = to.shutdown(Shutdown::Read);
    Ended::Reset
}

#[cfg(test)]
mod tests {
    use super::grow;

    #[test]
    fn buffers_grow_only_when_filled() {
        let mut b = vec![0u8; 4];
        grow(&mut b, 3, 16);
        assert_eq!(b.len(), 4);
        grow(&mut b, 4, 16);
        assert_eq!(b.len(), 8);
        grow(&mut b, 8, 16);
        grow(&mut b, 16, 16);
        assert_eq!(b.len(), 16);
    }
}
