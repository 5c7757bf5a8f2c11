//! PROXY protocol v2 from upstream load balancers, on LoadBalancer IPs
//! only, from `--proxy-protocol-from` addresses only: the hook of the kernel
//! relay (a policy check and one read loop around the pure parser in
//! [`super::proxy_protocol`]). From an address outside the list nothing is
//! read, the connection is plain; from an address in it, a missing or
//! malformed header resets the connection and counts
//! `ringvip_proxy_protocol_rejected_total` (HAProxy `accept-proxy`).

use std::net::SocketAddr;
use std::time::Duration;

use arc_swap::ArcSwap;
use ipnet::IpNet;
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

use super::proxy_protocol::{parse_v2, Parse};
use crate::model::Protocol;
use crate::state::{FrontendKey, FrontendKind, Snapshot};
use crate::telemetry::Counter;

/// Longest header accepted (HAProxy reads it from one buffer too; TLVs of
/// cloud balancers stay well below).
pub const MAX_HEADER: usize = 1024;

/// How long an allowed upstream may take to send its header.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(3);

/// Who may send PROXY headers, and the count of those refused.
#[derive(Debug, Clone, Default)]
pub struct Upstream {
    /// `--proxy-protocol-from`.
    pub from: Box<[IpNet]>,
    /// Connections reset for a missing or malformed header.
    pub rejected: Counter,
}

/// What the connection says about its client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Accepted {
    /// The original client and the address it connected to, when the
    /// header names them (not for the LOCAL command).
    pub addrs: Option<(SocketAddr, SocketAddr)>,
    /// Client bytes read after the header: the backend gets them first.
    pub early: Vec<u8>,
}

impl Upstream {
    /// Whether a connection from `peer` to `local` must start with a
    /// header: `peer` is listed and `local` is a LoadBalancer IP frontend.
    /// Without `--proxy-protocol-from` this is one length check.
    pub fn expects_header(
        &self,
        snap: &ArcSwap<Snapshot>,
        peer: SocketAddr,
        local: SocketAddr,
    ) -> bool {
        !self.from.is_empty()
            && self.from.iter().any(|n| n.contains(&peer.ip()))
            && snap
                .load()
                .frontend(&FrontendKey {
                    addr: local,
                    proto: Protocol::Tcp,
                })
                .is_some_and(|fe| fe.kind == FrontendKind::LoadBalancer)
    }

    /// Reads the header; `None` (counted) when it is missing, malformed,
    /// too long or too slow: the caller resets the connection.
    pub async fn read_header(&self, client: &mut TcpStream) -> Option<Accepted> {
        let got = tokio::time::timeout(HEADER_TIMEOUT, read_header(client)).await;
        let accepted = got.ok().flatten();
        if accepted.is_none() {
            self.rejected.inc();
        }
        accepted
    }
}

async fn read_header(client: &mut TcpStream) -> Option<Accepted> {
    let mut seen: Vec<u8> = Vec::new();
    let mut buf = vec![0u8; MAX_HEADER];
    loop {
        let n = client.read(&mut buf).await.ok().filter(|n| *n > 0)?;
        seen.extend_from_slice(buf.get(..n)?);
        match parse_v2(&seen) {
            Ok(Parse::Done(p)) => {
                return Some(Accepted {
                    addrs: p.addrs,
                    early: seen.get(p.len..)?.to_vec(),
                })
            }
            Ok(Parse::Need(need)) if need <= MAX_HEADER => {}
            Ok(Parse::Need(_)) | Err(_) => return None,
        }
    }
}
