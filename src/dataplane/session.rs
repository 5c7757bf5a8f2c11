//! One relayed TCP connection or UDP flow, from either front end, as metrics
//! and the access log see it: counted in its Service port's, its frontend's
//! and its endpoint's metrics while it lives, its bytes tallied at every
//! level, and one access-log record when it ends.
//!
//! Everything here runs on the data path: handles were resolved at snapshot
//! compile, so opening a session costs reference-count increments and atomic
//! adds, each relayed chunk three atomic adds and a `Cell` add, and the end
//! one `try_send` of a fixed-size record when the access log is on. No lock,
//! no allocation, no label lookup.

use std::cell::Cell;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use super::Shared;
use crate::access_log::{End, Record};
use crate::model::Protocol;
use crate::state::Frontend;
use crate::telemetry::{Count, EndpointMetrics, Traffic};

/// A live connection or flow; see the module documentation. Single-threaded
/// (it stays on the data-plane thread that opened it).
pub struct Session {
    shared: Arc<Shared>,
    fe: Arc<Frontend>,
    ep: Option<Arc<EndpointMetrics>>,
    client: SocketAddr,
    frontend: SocketAddr,
    endpoint: SocketAddr,
    /// When it opened; only taken when the access log is on.
    started: Option<Instant>,
    to_backend: Cell<u64>,
    to_client: Cell<u64>,
    ended: Cell<Option<End>>,
}

impl Session {
    /// A connection or flow from `client` to `frontend` through `fe`, relayed
    /// to `endpoint`; counted from now until it drops. TCP ones count in
    /// [`Shared::active`] (what a drain waits for), UDP ones in the port's
    /// active flows.
    pub fn open(
        shared: &Arc<Shared>,
        fe: Arc<Frontend>,
        client: SocketAddr,
        frontend: SocketAddr,
        endpoint: SocketAddr,
    ) -> Session {
        let ep = fe.endpoint_metrics(&endpoint).cloned();
        let pm = &fe.metrics;
        pm.connections_total.inc();
        match fe.proto {
            Protocol::Tcp => {
                pm.connections_active.inc();
                shared.active.fetch_add(1, Ordering::Relaxed);
            }
            Protocol::Udp => {
                pm.udp_flows_active.inc();
            }
        }
        for t in std::iter::once(&*fe.traffic).chain(ep.as_deref().map(|m| &m.traffic)) {
            t.connections_total.inc();
            t.connections_active.inc();
        }
        Session {
            started: shared.access_log.is_some().then(Instant::now),
            shared: shared.clone(),
            fe,
            ep,
            client,
            frontend,
            endpoint,
            to_backend: Cell::new(0),
            to_client: Cell::new(0),
            ended: Cell::new(None),
        }
    }

    /// `n` payload bytes relayed client → backend.
    #[inline]
    pub fn to_backend(&self, n: usize) {
        let port = &self.fe.metrics.bytes_to_backend;
        self.count(n, &self.to_backend, port, |t| &t.bytes_to_backend);
    }

    /// `n` payload bytes relayed backend → client.
    #[inline]
    pub fn to_client(&self, n: usize) {
        let port = &self.fe.metrics.bytes_to_client;
        self.count(n, &self.to_client, port, |t| &t.bytes_to_client);
    }

    /// Adds `n` bytes to this session's `tally`, the port's counter, and the
    /// frontend's and endpoint's counters `which` picks.
    #[inline]
    fn count(&self, n: usize, tally: &Cell<u64>, port: &Count, which: fn(&Traffic) -> &Count) {
        let n = n as u64;
        tally.set(tally.get() + n);
        port.inc_by(n);
        which(&self.fe.traffic).inc_by(n);
        if let Some(ep) = &self.ep {
            which(&ep.traffic).inc_by(n);
        }
    }

    /// Bytes relayed so far: client → backend, backend → client.
    pub fn bytes(&self) -> (u64, u64) {
        (self.to_backend.get(), self.to_client.get())
    }

    /// Says how it ended (the first call wins); a session dropped without
    /// one ended by [`End::Drain`]: its thread stopped with it still open.
    pub fn end(&self, how: End) {
        if self.ended.get().is_none() {
            self.ended.set(Some(how));
        }
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        let fe = &self.fe;
        match fe.proto {
            Protocol::Tcp => {
                fe.metrics.connections_active.dec();
                self.shared.active.fetch_sub(1, Ordering::Relaxed);
            }
            Protocol::Udp => {
                fe.metrics.udp_flows_active.dec();
            }
        }
        fe.traffic.connections_active.dec();
        if let Some(ep) = &self.ep {
            ep.traffic.connections_active.dec();
        }
        if let Some(log) = &self.shared.access_log {
            log.push(Record {
                fe: fe.clone(),
                client: self.client,
                frontend: self.frontend,
                endpoint: Some(self.endpoint),
                to_backend: self.to_backend.get(),
                to_client: self.to_client.get(),
                duration: self.started.map(|t| t.elapsed()).unwrap_or_default(),
                ended: self.ended.get().unwrap_or(End::Drain),
                at: SystemTime::now(),
            });
        }
    }
}

/// Logs a connection that never reached a backend (refused by a limit, or
/// no backend accepted): `ended` says which.
pub fn refused(
    shared: &Shared,
    fe: &Arc<Frontend>,
    client: SocketAddr,
    frontend: SocketAddr,
    ended: End,
) {
    if let Some(log) = &shared.access_log {
        log.push(Record {
            fe: fe.clone(),
            client,
            frontend,
            endpoint: None,
            to_backend: 0,
            to_client: 0,
            duration: std::time::Duration::ZERO,
            ended,
            at: SystemTime::now(),
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::access_log;
    use crate::config::{DataPlaneOptions, LogFormat};

    #[test]
    fn a_session_counts_at_every_level_and_logs_once() {
        let (log, writer, out) = access_log::to_buffer(LogFormat::Json);
        let shared = Shared::with_access_log(DataPlaneOptions::default(), Some(log));
        let snap = crate::testing::tun::sample_snapshot(true);
        let Some(fe) = snap
            .frontends()
            .find(|(k, _)| k.proto == Protocol::Tcp && k.addr.is_ipv4())
            .map(|(_, fe)| fe.clone())
        else {
            panic!("no TCP frontend")
        };
        let ep = fe.endpoints[0];
        let epm = fe.endpoint_metrics(&ep).unwrap().clone();
        let client: SocketAddr = "192.0.2.9:40000".parse().unwrap();
        let vip: SocketAddr = "10.96.0.10:80".parse().unwrap();

        let s = Session::open(&shared, fe.clone(), client, vip, ep);
        s.to_backend(5);
        s.to_client(7);
        s.to_client(3);
        let active = |m: &Frontend| {
            (
                m.metrics.connections_active.get(),
                m.traffic.connections_active.get(),
                epm.traffic.connections_active.get(),
                shared.active.load(Ordering::Relaxed),
            )
        };
        assert_eq!(active(&fe), (1, 1, 1, 1));
        s.end(End::Reset);
        s.end(End::Fin); // the first reason wins
        drop(s);
        assert_eq!(active(&fe), (0, 0, 0, 0));
        for t in [&fe.traffic, &epm.traffic] {
            assert_eq!(t.connections_total.get(), 1);
            assert_eq!(t.bytes_to_backend.get(), 5);
            assert_eq!(t.bytes_to_client.get(), 10);
        }
        assert_eq!(fe.metrics.connections_total.get(), 1);
        assert_eq!(fe.metrics.bytes_to_client.get(), 10);

        refused(&shared, &fe, client, vip, End::Limit);
        // Dropped while still open (its thread stopped): a drain.
        drop(Session::open(&shared, fe.clone(), client, vip, ep));
        writer.finish();
        let text = out.text();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 3, "{text}");
        assert_eq!(lines[0]["ended"], "reset");
        assert_eq!(lines[0]["endpoint"], ep.to_string());
        assert_eq!(lines[0]["bytes_to_backend"], 5);
        assert_eq!(lines[0]["bytes_to_client"], 10);
        assert_eq!(lines[1]["ended"], "limit");
        assert_eq!(lines[1]["endpoint"], serde_json::Value::Null);
        assert_eq!(lines[2]["ended"], "drain");
    }
}
