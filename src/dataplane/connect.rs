//! Upstream connect with retry, shared by every TCP front end: picks an
//! endpoint, tries it with a growing timeout, and on failure tries another,
//! recording passive health and ClientIP affinity on the way.

use std::cell::RefCell;
use std::net::{IpAddr, SocketAddr};
use std::time::Instant;

use rand::rngs::SmallRng;
use tokio_uring::net::TcpStream;

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

/// Writes `fe`'s PROXY protocol header, if it asks for one, to a backend
/// just connected for a client at `src` that connected to `dst`: before any
/// client byte, so the backend reads it first.
pub async fn proxy_header(
    fe: &Frontend,
    backend: &TcpStream,
    src: SocketAddr,
    dst: SocketAddr,
) -> std::io::Result<()> {
    let Some(version) = fe.proxy_protocol else {
        return Ok(());
    };
    let mut buf: HeaderBuf = [0; MAX_HEADER_LEN];
    let n = encode(version, src, dst, &mut buf);
    // tokio-uring owns the buffer during the write: one small copy per
    // connection of a Service that opted in.
    let header = buf.get(..n).unwrap_or_default().to_vec();
    let (res, _) = backend.write_all(header).await;
    res
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
                if let Some(m) = fe.endpoint_metrics(&ep) {
                    m.connect_succeeded();
                }
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
        fe.connect_failure(last, Some(&ep));
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
