//! Upstream connect with retry, shared by every TCP front end: picks an
//! endpoint, tries it with a growing timeout, and on failure tries another,
//! recording passive health and ClientIP affinity on the way.
//!
//! The policy ([`Retry`]) is apart from the I/O so the TUN front end
//! ([`connect`], on tokio's readiness-based sockets) and the io_uring engine
//! (kernel sockets, `engine::tcp`) follow the same one, and `flow::pick` is
//! called from this one place.

use std::cell::RefCell;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use rand::rngs::SmallRng;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use super::flow::{connect_timeout, pick};
use super::proxy_protocol::{encode, HeaderBuf, MAX_HEADER_LEN};
use super::Shared;
use crate::state::Frontend;
use crate::telemetry::ConnectFailure;

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

/// One connection's way through the connect tries: which endpoint next, with
/// what timeout, and what a success or failure records.
#[derive(Debug, Default)]
pub struct Retry {
    attempt: u32,
    /// Endpoints that failed, avoided by later picks (empty, so no
    /// allocation, until a try fails).
    tried: Vec<SocketAddr>,
    last: Option<ConnectFailure>,
    /// Index in the frontend's endpoints of the latest pick (its metrics).
    index: usize,
}

impl Retry {
    /// The next endpoint to try and its connect timeout, or `None` when the
    /// tries are used up or no endpoint is left.
    pub fn next(
        &mut self,
        fe: &Frontend,
        client: IpAddr,
        shared: &Shared,
        now: Instant,
        rng: &mut SmallRng,
    ) -> Option<(SocketAddr, Duration)> {
        let s = &shared.settings;
        if self.attempt >= s.connect_attempts {
            return None;
        }
        let picked = pick(fe, client, shared, self.attempt, &self.tried, now, rng)?;
        let limit = connect_timeout(s.connect_timeout, self.attempt);
        self.attempt += 1;
        self.index = picked.index;
        Some((picked.addr, limit))
    }

    /// The try of `ep` (the latest [`Retry::next`]) succeeded: health,
    /// metrics, and affinity follow it when it was not the first try.
    pub fn succeeded(&self, fe: &Frontend, client: IpAddr, shared: &Shared, ep: SocketAddr) {
        if self.attempt > 1 {
            if let Some(t) = fe.affinity {
                shared
                    .affinity
                    .record(fe.port_id, client, ep, t, Instant::now());
            }
        }
        shared.health.succeeded(ep);
        if let Some(m) = fe.endpoint_metrics_at(self.index) {
            m.connect_succeeded();
        }
    }

    /// The try of `ep` failed for `why`: counted, backed off, and avoided.
    pub fn failed(&mut self, fe: &Frontend, shared: &Shared, ep: SocketAddr, why: ConnectFailure) {
        tracing::debug!(service = %fe.service, endpoint = %ep, reason = ?why, "backend connect failed");
        fe.connect_failure(why, Some(&ep));
        shared.health.failed(ep, Instant::now());
        self.tried.push(ep);
        self.last = Some(why);
    }

    /// What to report once [`Retry::next`] gave up.
    pub fn error(&self, fe: &Frontend) -> ConnectError {
        ConnectError {
            service: fe.service.to_string(),
            port: fe.port_name.clone(),
            attempts: self.tried.len() as u32,
            last: self.last.unwrap_or(ConnectFailure::NoEndpoints),
        }
    }
}

/// Writes `fe`'s PROXY protocol header, if it asks for one, to a backend
/// just connected for a client at `src` that connected to `dst`: before any
/// client byte, so the backend reads it first.
pub async fn proxy_header(
    fe: &Frontend,
    backend: &mut TcpStream,
    src: SocketAddr,
    dst: SocketAddr,
) -> std::io::Result<()> {
    let Some(version) = fe.proxy_protocol else {
        return Ok(());
    };
    let mut buf: HeaderBuf = [0; MAX_HEADER_LEN];
    let n = encode(version, src, dst, &mut buf);
    backend.write_all(buf.get(..n).unwrap_or_default()).await
}

/// Connects to a backend of `fe`, retrying other endpoints with growing
/// timeouts. On success after a retry, affinity follows the backend that answered.
pub async fn connect(
    fe: &Frontend,
    client: IpAddr,
    shared: &Shared,
    rng: &RefCell<SmallRng>,
) -> Result<(TcpStream, SocketAddr), ConnectError> {
    let mut retry = Retry::default();
    loop {
        // Its own statement: the RNG's borrow must end before the await below
        // (other connections on this thread pick meanwhile).
        let next = retry.next(fe, client, shared, Instant::now(), &mut rng.borrow_mut());
        let Some((ep, limit)) = next else {
            break;
        };
        let why = match tokio::time::timeout(limit, TcpStream::connect(ep)).await {
            Ok(Ok(stream)) => {
                let _ = stream.set_nodelay(true);
                retry.succeeded(fe, client, shared, ep);
                return Ok((stream, ep));
            }
            Ok(Err(e)) => ConnectFailure::from_io(&e),
            Err(_) => ConnectFailure::Timeout,
        };
        retry.failed(fe, shared, ep, why);
    }
    Err(retry.error(fe))
}
