//! Per-endpoint series of a Service port, and their lifetime.
//!
//! Each endpoint of a Service port (an `IP:port` listed by its
//! EndpointSlices, ready or not) has 12 series: connections total and active,
//! connect failures by each of the 6 reasons, bytes each way, healthy and the
//! time of its last health change. The bound is therefore 12 × (endpoints of
//! the Service port) per Service port, and an endpoint's series exist only
//! while the endpoint is listed for that port.
//!
//! The compile takes one [`EndpointsLease`] on the endpoints of every
//! Service port it compiles (one lock and one hash of the port's labels per
//! port, then one hash of an address per endpoint) and keeps it with the
//! compiled Service (in the compile cache). Leases are counted per endpoint:
//! the first creates the endpoint's handles, the last one dropped removes
//! them from the set that is exported. That happens
//! when a recompile of the Service no longer lists the endpoint, or when the
//! Service goes; the compile drops the old leases only after taking the new
//! ones, so an endpoint that stays keeps its counts. The set is encoded at
//! each scrape (a `Collector`), so a removed endpoint has no series on the
//! next scrape, and an endpoint costs its atomics and its address (the
//! labels are its port's, held once, and the address is formatted at each
//! scrape), not a label set per series. An endpoint's handles are plain
//! atomics in one allocation (with its address), read at scrape: at a
//! million endpoints, a million allocations of ~140 bytes rather than
//! fourteen million. The data path holds `Arc<EndpointMetrics>`
//! only (never a lease): a connection still open on an endpoint that left
//! goes on counting into handles no longer exported.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::SystemTime;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, LabelSetEncoder};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;

use super::{
    counter_family, family, unix_seconds, ConnectFailure, Level, PortLabels, Traffic,
    ENDPOINT_BYTES_TOTAL, ENDPOINT_CHECK_UP, ENDPOINT_CONNECTIONS_ACTIVE,
    ENDPOINT_CONNECTIONS_TOTAL, ENDPOINT_CONNECT_FAILURES_TOTAL, ENDPOINT_HEALTHY,
    ENDPOINT_HEALTH_LAST_CHANGE_TIMESTAMP_SECONDS,
};

/// The labels of one endpoint of one Service port, borrowed for one scrape,
/// plus at most one more (`direction`, `reason`). The endpoint's `IP:port`
/// is formatted once per scrape, not kept per endpoint.
struct Labels<'a> {
    port: &'a PortLabels,
    endpoint: &'a str,
    extra: Option<(&'static str, &'static str)>,
}

impl<'a> Labels<'a> {
    fn of(ep: &'a Scraped<'a>) -> Labels<'a> {
        Labels {
            port: ep.port,
            endpoint: &ep.endpoint,
            extra: None,
        }
    }
}

impl EncodeLabelSet for Labels<'_> {
    fn encode(&self, encoder: &mut LabelSetEncoder) -> Result<(), std::fmt::Error> {
        self.port.encode(encoder)?;
        [("endpoint", self.endpoint)].encode(encoder)?;
        match self.extra {
            Some(label) => [label].encode(encoder),
            None => Ok(()),
        }
    }
}

/// One endpoint as one scrape sees it.
struct Scraped<'a> {
    port: &'a PortLabels,
    endpoint: String,
    metrics: &'a EndpointMetrics,
}

/// Handles of one endpoint of one Service port, resolved at compile;
/// every update on the data path is one atomic operation.
#[derive(Debug)]
pub struct EndpointMetrics {
    /// The endpoint (`IP:port`): its key among its port's endpoints.
    addr: SocketAddr,
    /// Connections (and UDP flows), bytes and connect failures.
    pub traffic: Traffic,
    healthy: Level,
    /// Unix time of the last health change, in seconds (`f64` bits).
    changed: AtomicU64,
    /// Active health check: 1 up, 0 down, -1 when the Service has none.
    check: Level,
}

impl EndpointMetrics {
    /// Handles of a healthy endpoint `addr` first seen at `now`.
    fn new(addr: SocketAddr, now: SystemTime) -> EndpointMetrics {
        let m = EndpointMetrics {
            addr,
            traffic: Traffic::default(),
            healthy: Level::default(),
            changed: AtomicU64::default(),
            check: Level::default(),
        };
        m.healthy.set(1);
        m.check.set(-1);
        m.set_changed(now);
        m
    }

    /// Handles of `addr` exported nowhere (endpoints a compile did not lease).
    pub fn detached(addr: SocketAddr) -> Arc<EndpointMetrics> {
        Arc::new(EndpointMetrics::new(addr, SystemTime::now()))
    }

    fn set_changed(&self, now: SystemTime) {
        self.changed.store(unix_seconds(now).to_bits(), Relaxed);
    }

    /// Unix time of the last health change (or of the first appearance), in seconds.
    pub fn changed(&self) -> f64 {
        f64::from_bits(self.changed.load(Relaxed))
    }

    /// A connect to the endpoint failed at `now`: unhealthy (passive health
    /// backs it off) until a connect succeeds again.
    pub fn connect_failed(&self, reason: ConnectFailure, now: SystemTime) {
        self.traffic.connect_failure(reason);
        if self.healthy.get() != 0 {
            self.healthy.set(0);
            self.set_changed(now);
        }
    }

    /// A connect to the endpoint succeeded: healthy again if it was not.
    /// One atomic load when nothing changes.
    #[inline]
    pub fn connect_succeeded(&self) {
        if self.healthy.get() == 0 && self.check.get() != 0 {
            self.healthy.set(1);
            self.set_changed(SystemTime::now());
        }
    }

    /// 1 when usable, 0 after a failed connect (until one succeeds) or
    /// while the active health check finds it down.
    pub fn healthy(&self) -> i64 {
        self.healthy.get()
    }

    /// The active health check's verdict (`None`: the Service has none),
    /// set at compile; healthy follows it.
    pub fn set_check(&self, up: Option<bool>, now: SystemTime) {
        let v = match up {
            None => -1,
            Some(true) => 1,
            Some(false) => 0,
        };
        if self.check.get() == v {
            return;
        }
        self.check.set(v);
        let healthy = i64::from(up != Some(false));
        if self.healthy.get() != healthy {
            self.healthy.set(healthy);
            self.set_changed(now);
        }
    }

    /// The active health check's verdict: 1 up, 0 down, -1 none.
    pub fn check(&self) -> i64 {
        self.check.get()
    }
}

/// The endpoints of one Service port with series now: their handles and
/// the number of leases on each.
type PortLive = HashMap<SocketAddr, (usize, Arc<EndpointMetrics>)>;

/// Every Service port with an endpoint that has series now. Keyed by port
/// first, so a lease on a port's endpoints hashes the port's labels once,
/// then only addresses.
type Live = HashMap<PortLabels, PortLive>;

/// The endpoints with series now, with the number of leases on each.
#[derive(Debug, Default)]
pub(super) struct Endpoints {
    live: Mutex<Live>,
}

impl Endpoints {
    fn lock(&self) -> MutexGuard<'_, Live> {
        // Plain data, left consistent at every step: a panic elsewhere does
        // not make it unusable.
        self.live.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Takes a lease on the series of each of `endpoints` of `port` (one
    /// lock, one hash of the port's labels), creating those no lease holds
    /// (healthy, counters at zero, last change `now`).
    pub(super) fn lease(
        self: &Arc<Self>,
        port: &PortLabels,
        endpoints: &[SocketAddr],
        now: SystemTime,
    ) -> EndpointsLease {
        let mut live = self.lock();
        let held = match live.get_mut(port) {
            Some(held) => held,
            None => live.entry(port.clone()).or_default(),
        };
        let metrics = endpoints
            .iter()
            .map(|ep| {
                let (n, m) = held
                    .entry(*ep)
                    .or_insert_with(|| (0, Arc::new(EndpointMetrics::new(*ep, now))));
                *n += 1;
                m.clone()
            })
            .collect();
        drop(live);
        EndpointsLease {
            endpoints: self.clone(),
            port: port.clone(),
            metrics,
        }
    }

    fn release(&self, port: &PortLabels, endpoints: &[Arc<EndpointMetrics>]) {
        let mut live = self.lock();
        let Some(held) = live.get_mut(port) else {
            return;
        };
        for ep in endpoints.iter().map(|m| &m.addr) {
            if let Some((n, _)) = held.get_mut(ep) {
                *n -= 1;
                if *n == 0 {
                    held.remove(ep);
                }
            }
        }
        if held.is_empty() {
            live.remove(port);
        }
    }

    /// (port, endpoint) pairs with series now.
    #[cfg(test)]
    pub(super) fn live(&self) -> usize {
        self.lock().values().map(HashMap::len).sum()
    }
}

impl Collector for Endpoints {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let live = self.lock();
        let scraped: Vec<Scraped<'_>> = live
            .iter()
            .flat_map(|(port, held)| {
                held.iter().map(move |(ep, (_, m))| Scraped {
                    port,
                    endpoint: ep.to_string(),
                    metrics: m,
                })
            })
            .collect();
        let all = || scraped.iter().map(|ep| (ep, ep.metrics));
        let e = &mut encoder;
        family(
            e,
            counter_family(ENDPOINT_CONNECTIONS_TOTAL),
            "Connections (and UDP flows) relayed to an endpoint, per Service port",
            MetricType::Counter,
            all().map(|(ep, m)| {
                let v = m.traffic.connections_total.get();
                (Labels::of(ep), ConstCounter::new(v))
            }),
        )?;
        family(
            e,
            ENDPOINT_CONNECTIONS_ACTIVE,
            "Connections (and UDP flows) open to an endpoint, per Service port",
            MetricType::Gauge,
            all().map(|(ep, m)| {
                let v = m.traffic.connections_active.get();
                (Labels::of(ep), ConstGauge::new(v))
            }),
        )?;
        family(
            e,
            counter_family(ENDPOINT_CONNECT_FAILURES_TOTAL),
            "Failed connects to an endpoint, per Service port and reason",
            MetricType::Counter,
            all().flat_map(|(ep, m)| {
                ConnectFailure::ALL.iter().map(move |r| {
                    let labels = Labels {
                        extra: Some(("reason", r.as_str())),
                        ..Labels::of(ep)
                    };
                    (labels, ConstCounter::new(m.traffic.connect_failures(*r)))
                })
            }),
        )?;
        family(
            e,
            counter_family(ENDPOINT_BYTES_TOTAL),
            "Payload bytes relayed with an endpoint, per Service port and direction",
            MetricType::Counter,
            all().flat_map(|(ep, m)| {
                [
                    ("to_backend", &m.traffic.bytes_to_backend),
                    ("to_client", &m.traffic.bytes_to_client),
                ]
                .into_iter()
                .map(move |(direction, c)| {
                    let labels = Labels {
                        extra: Some(("direction", direction)),
                        ..Labels::of(ep)
                    };
                    (labels, ConstCounter::new(c.get()))
                })
            }),
        )?;
        family(
            e,
            ENDPOINT_CHECK_UP,
            "1 when the active health check (ringvip.io/health-check) finds the endpoint up, 0 when down; only for Services with one",
            MetricType::Gauge,
            all()
                .filter(|(_, m)| m.check.get() >= 0)
                .map(|(ep, m)| (Labels::of(ep), ConstGauge::new(m.check.get()))),
        )?;
        family(
            e,
            ENDPOINT_HEALTHY,
            "1 when the endpoint is usable, 0 after a failed connect (passive health) until one succeeds, or while its active health check finds it down",
            MetricType::Gauge,
            all().map(|(ep, m)| (Labels::of(ep), ConstGauge::new(m.healthy.get()))),
        )?;
        family(
            e,
            ENDPOINT_HEALTH_LAST_CHANGE_TIMESTAMP_SECONDS,
            "Unix time of the endpoint's last health change (or of its first appearance), in seconds",
            MetricType::Gauge,
            all().map(|(ep, m)| (Labels::of(ep), ConstGauge::new(m.changed()))),
        )
    }
}

/// Keeps the series of some endpoints of one Service port exported while
/// it lives (see the module documentation).
#[derive(Debug)]
pub struct EndpointsLease {
    endpoints: Arc<Endpoints>,
    port: PortLabels,
    /// The endpoints' handles, each with its address.
    metrics: Box<[Arc<EndpointMetrics>]>,
}

impl EndpointsLease {
    /// The handles of each endpoint, in the order they were leased.
    pub fn metrics(&self) -> &[Arc<EndpointMetrics>] {
        &self.metrics
    }
}

impl Drop for EndpointsLease {
    fn drop(&mut self) {
        self.endpoints.release(&self.port, &self.metrics);
    }
}
